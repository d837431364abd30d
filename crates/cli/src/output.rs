//! How the client commands print what the API answered: a table by default (as
//! kubectl and `etcdctl -w table` do), more columns with `-o wide`, the API's
//! JSON unchanged with `-o json` or `--json` (for scripts and `jq`).

use std::io::Write;

use serde_json::Value;

/// Output format of a listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub(crate) enum Format {
    /// Columns for a person.
    #[default]
    Table,
    /// The table with more columns.
    Wide,
    /// The API's JSON answer, pretty-printed.
    Json,
}

/// `-o table|wide|json` and `--json`.
#[derive(clap::Args, Clone, Debug)]
pub(crate) struct OutputArgs {
    /// Output format: `table`, `wide` (more columns) or `json` (the API's answer).
    #[arg(
        short = 'o',
        long = "output",
        value_enum,
        default_value_t,
        global = true
    )]
    output: Format,
    /// Same as `-o json`.
    #[arg(long, global = true)]
    json: bool,
}

impl OutputArgs {
    /// The format asked for.
    pub(crate) fn format(&self) -> Format {
        if self.json { Format::Json } else { self.output }
    }

    /// Prints `v` as JSON when asked for, else as the table `table` makes of it.
    pub(crate) fn print(&self, v: &Value, table: impl FnOnce(&Value, bool) -> Table) {
        match self.format() {
            Format::Json => print_json(v),
            f => table(v, f == Format::Wide).print(),
        }
    }
}

/// Writes to stdout; a reader that went away (`| head`) ends output quietly.
pub(crate) fn out(text: &str) {
    let mut o = std::io::stdout().lock();
    let _ = o.write_all(text.as_bytes()).and_then(|()| o.flush());
}

/// Pretty JSON on stdout.
pub(crate) fn print_json(v: &Value) {
    let text = serde_json::to_string_pretty(v).unwrap_or_else(|_| v.to_string());
    out(&format!("{text}\n"));
}

/// Rows under a header, columns left-aligned and three spaces apart.
#[derive(Debug)]
pub(crate) struct Table {
    caption: Option<String>,
    header: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// An empty table with these column names.
    pub(crate) fn new(header: &[&'static str]) -> Table {
        Table {
            caption: None,
            header: header.to_vec(),
            rows: Vec::new(),
        }
    }

    /// A line printed above the header.
    pub(crate) fn caption(&mut self, caption: String) {
        self.caption = Some(caption);
    }

    /// Adds a row (missing cells print empty, extra ones are dropped).
    pub(crate) fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    /// The table as text. Control characters in cells (a terminal escape in a
    /// holder's name, a newline in a description) print as `?`.
    pub(crate) fn render(&self) -> String {
        let n = self.header.len();
        let rows: Vec<Vec<String>> = self
            .rows
            .iter()
            .map(|r| {
                (0..n)
                    .map(|i| {
                        r.get(i)
                            .map(|c| {
                                c.chars()
                                    .map(|ch| if ch.is_control() { '?' } else { ch })
                                    .collect()
                            })
                            .unwrap_or_default()
                    })
                    .collect()
            })
            .collect();
        let mut widths: Vec<usize> = self.header.iter().map(|h| h.chars().count()).collect();
        for r in &rows {
            for (w, c) in widths.iter_mut().zip(r) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut text = self
            .caption
            .as_ref()
            .map_or(String::new(), |c| format!("{c}\n"));
        let header: Vec<String> = self.header.iter().map(|h| (*h).to_string()).collect();
        for r in std::iter::once(&header).chain(&rows) {
            let mut line = String::new();
            for (i, (c, w)) in r.iter().zip(&widths).enumerate() {
                line.push_str(c);
                if i + 1 < n {
                    line.extend(std::iter::repeat_n(' ', w - c.chars().count() + 3));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }

    /// Prints the table on stdout.
    pub(crate) fn print(&self) {
        out(&self.render());
    }
}

/// A JSON value as a cell: strings bare, null as `-`, arrays joined by commas.
pub(crate) fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".to_string(),
        Value::String(s) if s.is_empty() => "-".to_string(),
        Value::String(s) => s.clone(),
        Value::Array(a) if a.is_empty() => "-".to_string(),
        Value::Array(a) => a.iter().map(cell).collect::<Vec<_>>().join(","),
        other => other.to_string(),
    }
}

/// Unix milliseconds as UTC time to the second (RFC 3339); `-` for 0 or none.
pub(crate) fn time_ms(v: &Value) -> String {
    let Some(ms) = v.as_i64().filter(|ms| *ms > 0) else {
        return "-".to_string();
    };
    let fmt = time::macros::format_description!("[year]-[month]-[day]T[hour]:[minute]:[second]Z");
    time::OffsetDateTime::from_unix_timestamp(ms / 1000)
        .ok()
        .and_then(|t| t.format(&fmt).ok())
        .unwrap_or_else(|| ms.to_string())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;
    use serde_json::json;

    #[test]
    fn columns_align_and_control_characters_are_masked() {
        let mut t = Table::new(&["NAME", "HOLDER", "N"]);
        t.row(vec!["a".into(), "node-1".into(), "3".into()]);
        t.row(vec!["longer-name".into(), "x\u{1b}[2Jy".into()]);
        assert_eq!(
            t.render(),
            "NAME          HOLDER   N\n\
             a             node-1   3\n\
             longer-name   x?[2Jy\n"
        );
    }

    #[test]
    fn cells_and_times() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!("")), "-");
        assert_eq!(cell(&json!(["a", "b"])), "a,b");
        assert_eq!(cell(&json!(7)), "7");
        assert_eq!(time_ms(&json!(0)), "-");
        assert_eq!(
            time_ms(&json!(1_796_418_487_780_i64)),
            "2026-12-04T21:08:07Z"
        );
    }
}
