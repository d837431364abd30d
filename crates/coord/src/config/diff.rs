//! Line diffs between two versions of a configuration: unified text for
//! terminals and reviews, and aligned rows for a side-by-side view.

use std::time::Duration;

use serde::Serialize;
use similar::{ChangeTag, TextDiff};

/// How long a diff may search for the smallest edit before it settles for a
/// larger (still correct) one; keeps huge, very different inputs cheap.
const DIFF_TIMEOUT: Duration = Duration::from_secs(1);

fn line_diff<'a>(old: &'a str, new: &'a str) -> TextDiff<'a, 'a, 'a, str> {
    TextDiff::configure()
        .timeout(DIFF_TIMEOUT)
        .diff_lines(old, new)
}

/// A unified diff (`---`/`+++` header, `@@` hunks with `context` lines
/// around each change); empty when the texts are equal.
pub fn unified(old: &str, new: &str, old_label: &str, new_label: &str, context: usize) -> String {
    line_diff(old, new)
        .unified_diff()
        .context_radius(context)
        .header(old_label, new_label)
        .to_string()
}

/// What a [`DiffRow`] shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DiffKind {
    /// The same line on both sides.
    Equal,
    /// A line only in the old version.
    Delete,
    /// A line only in the new version.
    Insert,
    /// An old line replaced by a new one.
    Replace,
}

/// One row of a side-by-side diff; line numbers are 1-based.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DiffRow {
    /// What the row shows.
    pub kind: DiffKind,
    /// Line number in the old version, if the row has an old side.
    pub old_line: Option<usize>,
    /// Line number in the new version, if the row has a new side.
    pub new_line: Option<usize>,
    /// The old line, without its line terminator.
    pub old: Option<String>,
    /// The new line, without its line terminator.
    pub new: Option<String>,
}

/// Aligns every line of both versions into rows: equal lines side by side,
/// and in each run of changes the deleted lines paired with the inserted
/// ones as `replace` rows, the extras as `delete` or `insert` rows.
pub fn side_by_side(old: &str, new: &str) -> Vec<DiffRow> {
    let diff = line_diff(old, new);
    let mut rows = Vec::new();
    let mut deleted: Vec<(usize, String)> = Vec::new();
    let mut inserted: Vec<(usize, String)> = Vec::new();
    for change in diff.iter_all_changes() {
        let text = strip_terminator(change.value()).to_owned();
        match change.tag() {
            ChangeTag::Equal => {
                flush(&mut rows, &mut deleted, &mut inserted);
                rows.push(DiffRow {
                    kind: DiffKind::Equal,
                    old_line: change.old_index().map(|i| i + 1),
                    new_line: change.new_index().map(|i| i + 1),
                    old: Some(text.clone()),
                    new: Some(text),
                });
            }
            ChangeTag::Delete => {
                if let Some(i) = change.old_index() {
                    deleted.push((i + 1, text));
                }
            }
            ChangeTag::Insert => {
                if let Some(i) = change.new_index() {
                    inserted.push((i + 1, text));
                }
            }
        }
    }
    flush(&mut rows, &mut deleted, &mut inserted);
    rows
}

/// Emits one run of changes: pairs first, then the unpaired rest.
fn flush(
    rows: &mut Vec<DiffRow>,
    deleted: &mut Vec<(usize, String)>,
    inserted: &mut Vec<(usize, String)>,
) {
    let mut old_side = deleted.drain(..);
    let mut new_side = inserted.drain(..);
    loop {
        let row = match (old_side.next(), new_side.next()) {
            (Some((ol, o)), Some((nl, n))) => DiffRow {
                kind: DiffKind::Replace,
                old_line: Some(ol),
                new_line: Some(nl),
                old: Some(o),
                new: Some(n),
            },
            (Some((ol, o)), None) => DiffRow {
                kind: DiffKind::Delete,
                old_line: Some(ol),
                new_line: None,
                old: Some(o),
                new: None,
            },
            (None, Some((nl, n))) => DiffRow {
                kind: DiffKind::Insert,
                old_line: None,
                new_line: Some(nl),
                old: None,
                new: Some(n),
            },
            (None, None) => break,
        };
        rows.push(row);
    }
}

fn strip_terminator(line: &str) -> &str {
    let line = line.strip_suffix('\n').unwrap_or(line);
    line.strip_suffix('\r').unwrap_or(line)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn row(
        kind: DiffKind,
        old_line: Option<usize>,
        new_line: Option<usize>,
        old: Option<&str>,
        new: Option<&str>,
    ) -> DiffRow {
        DiffRow {
            kind,
            old_line,
            new_line,
            old: old.map(str::to_owned),
            new: new.map(str::to_owned),
        }
    }

    #[test]
    fn unified_equal_texts_is_empty() {
        assert_eq!(unified("a\nb\n", "a\nb\n", "v1", "v2", 3), "");
        assert_eq!(unified("", "", "v1", "v2", 3), "");
    }

    #[test]
    fn unified_has_header_and_hunks() {
        let old = "a\nb\nc\nd\ne\nf\ng\n";
        let new = "a\nb\nC\nd\ne\nf\ng\nh\n";
        let text = unified(old, new, "app.toml@3", "app.toml@4", 1);
        assert_eq!(
            text,
            "--- app.toml@3\n+++ app.toml@4\n\
             @@ -2,3 +2,3 @@\n b\n-c\n+C\n d\n\
             @@ -7 +7,2 @@\n g\n+h\n"
        );
        // With more context the two hunks merge.
        let text = unified(old, new, "a", "b", 3);
        assert_eq!(text.matches("@@ -").count(), 1, "{text}");
    }

    #[test]
    fn unified_marks_missing_final_newline() {
        let text = unified("a\nb", "a\nc", "old", "new", 3);
        assert!(text.contains("\\ No newline at end of file"), "{text}");
    }

    #[test]
    fn side_by_side_pairs_replacements() {
        let rows = side_by_side("a\nb\nc\nd\n", "a\nB\nx\nd\ne\n");
        assert_eq!(
            rows,
            vec![
                row(DiffKind::Equal, Some(1), Some(1), Some("a"), Some("a")),
                row(DiffKind::Replace, Some(2), Some(2), Some("b"), Some("B")),
                row(DiffKind::Replace, Some(3), Some(3), Some("c"), Some("x")),
                row(DiffKind::Equal, Some(4), Some(4), Some("d"), Some("d")),
                row(DiffKind::Insert, None, Some(5), None, Some("e")),
            ]
        );
    }

    #[test]
    fn side_by_side_extras_are_delete_or_insert() {
        let rows = side_by_side("k=1\nold1\nold2\nold3\nz\n", "k=1\nnew1\nz\n");
        assert_eq!(
            rows,
            vec![
                row(DiffKind::Equal, Some(1), Some(1), Some("k=1"), Some("k=1")),
                row(
                    DiffKind::Replace,
                    Some(2),
                    Some(2),
                    Some("old1"),
                    Some("new1")
                ),
                row(DiffKind::Delete, Some(3), None, Some("old2"), None),
                row(DiffKind::Delete, Some(4), None, Some("old3"), None),
                row(DiffKind::Equal, Some(5), Some(3), Some("z"), Some("z")),
            ]
        );
        let rows = side_by_side("", "one\r\ntwo");
        assert_eq!(
            rows,
            vec![
                row(DiffKind::Insert, None, Some(1), None, Some("one")),
                row(DiffKind::Insert, None, Some(2), None, Some("two")),
            ]
        );
        assert!(side_by_side("", "").is_empty());
    }

    #[test]
    fn side_by_side_covers_every_line() {
        let old = "1\n2\n3\n4\n5\n6\n";
        let new = "0\n2\n3\n5\n6\n7\n8\n";
        let rows = side_by_side(old, new);
        let olds: Vec<usize> = rows.iter().filter_map(|r| r.old_line).collect();
        let news: Vec<usize> = rows.iter().filter_map(|r| r.new_line).collect();
        assert_eq!(olds, (1..=6).collect::<Vec<_>>());
        assert_eq!(news, (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn rows_serialize_lowercase() {
        let json = serde_json::to_value(side_by_side("a\n", "b\n")).unwrap();
        assert_eq!(
            json,
            serde_json::json!([
                {"kind": "replace", "old_line": 1, "new_line": 1, "old": "a", "new": "b"}
            ])
        );
    }
}
