//! Configuration formats and their syntax validation.
//!
//! A configuration item declares its [`Format`]; publishing it runs
//! [`validate`] first, so a syntax error is reported with its position
//! before anything reaches a service. Lines and columns are 1-based and
//! columns count characters (not bytes).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The syntax a configuration item is written in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    /// Free text: any UTF-8 is valid.
    #[default]
    Text,
    /// JSON (RFC 8259).
    Json,
    /// TOML 1.0; the document must be a table.
    Toml,
    /// YAML 1.2, a single document.
    Yaml,
    /// Java `.properties`.
    Properties,
}

impl Format {
    /// Every format, in declaration order.
    pub const ALL: [Format; 5] = [
        Format::Text,
        Format::Json,
        Format::Toml,
        Format::Yaml,
        Format::Properties,
    ];

    /// The lowercase name used in APIs and storage (`"json"`, ...).
    pub fn as_str(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "json",
            Format::Toml => "toml",
            Format::Yaml => "yaml",
            Format::Properties => "properties",
        }
    }

    /// The name used in messages (`"JSON"`, `"properties"`, ...).
    pub fn label(self) -> &'static str {
        match self {
            Format::Text => "text",
            Format::Json => "JSON",
            Format::Toml => "TOML",
            Format::Yaml => "YAML",
            Format::Properties => "properties",
        }
    }

    /// The media type to serve this format with.
    pub fn media_type(self) -> &'static str {
        match self {
            Format::Text | Format::Properties => "text/plain; charset=utf-8",
            Format::Json => "application/json",
            Format::Toml => "application/toml",
            Format::Yaml => "application/yaml",
        }
    }
}

impl fmt::Display for Format {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A format name that is not one of [`Format::ALL`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown config format {0:?}: expected one of text, json, toml, yaml, properties")]
pub struct UnknownFormat(pub String);

impl FromStr for Format {
    type Err = UnknownFormat;

    /// Parses a format name, ignoring ASCII case; `yml` and `txt` are accepted too.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "text" | "txt" => Ok(Format::Text),
            "json" => Ok(Format::Json),
            "toml" => Ok(Format::Toml),
            "yaml" | "yml" => Ok(Format::Yaml),
            "properties" => Ok(Format::Properties),
            _ => Err(UnknownFormat(s.to_owned())),
        }
    }
}

/// A syntax error in a configuration, with its position when known.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {}{}: {message}", .format.label(), Position(*.line, *.column))]
pub struct FormatError {
    /// The format the content failed to parse as.
    pub format: Format,
    /// 1-based line of the error, when known.
    pub line: Option<usize>,
    /// 1-based column (in characters) of the error, when known.
    pub column: Option<usize>,
    /// What is wrong, without the position.
    pub message: String,
}

/// Renders " at line L, column C" (or less) for [`FormatError`]'s message.
struct Position(Option<usize>, Option<usize>);

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.0, self.1) {
            (Some(line), Some(column)) => write!(f, " at line {line}, column {column}"),
            (Some(line), None) => write!(f, " at line {line}"),
            _ => Ok(()),
        }
    }
}

/// Checks that `content` is syntactically valid `format`.
pub fn validate(format: Format, content: &str) -> Result<(), FormatError> {
    match format {
        Format::Text => Ok(()),
        Format::Json => validate_json(content),
        Format::Toml => validate_toml(content),
        Format::Yaml => validate_yaml(content),
        Format::Properties => parse_properties(content).map(|_| ()),
    }
}

fn validate_json(content: &str) -> Result<(), FormatError> {
    let Err(e) = serde_json::from_str::<serde::de::IgnoredAny>(content) else {
        return Ok(());
    };
    let full = e.to_string();
    let (line, column) = (e.line(), e.column());
    if line == 0 {
        return Err(FormatError {
            format: Format::Json,
            line: None,
            column: None,
            message: full,
        });
    }
    let suffix = format!(" at line {line} column {column}");
    let message = full.strip_suffix(&suffix).unwrap_or(&full).to_owned();
    Err(FormatError {
        format: Format::Json,
        line: Some(line),
        column: Some(char_column(content, line, column)),
        message,
    })
}

/// Converts serde_json's byte column on a 1-based `line` to a character column.
fn char_column(content: &str, line: usize, byte_column: usize) -> usize {
    let Some(text) = content.split('\n').nth(line.saturating_sub(1)) else {
        return byte_column.max(1);
    };
    let mut end = byte_column.min(text.len());
    let partial = !text.is_char_boundary(end);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let chars = text.get(..end).map_or(0, |s| s.chars().count());
    (chars + usize::from(partial)).max(1)
}

fn validate_toml(content: &str) -> Result<(), FormatError> {
    let Err(e) = toml::from_str::<toml::Table>(content) else {
        return Ok(());
    };
    let (line, column) = match e.span() {
        Some(span) => {
            let (line, column) = line_column_at(content, span.start);
            (Some(line), Some(column))
        }
        None => (None, None),
    };
    Err(FormatError {
        format: Format::Toml,
        line,
        column,
        message: e.message().trim_end().to_owned(),
    })
}

/// The 1-based line and character column of byte `offset` in `content`.
fn line_column_at(content: &str, offset: usize) -> (usize, usize) {
    let mut end = offset.min(content.len());
    while !content.is_char_boundary(end) {
        end -= 1;
    }
    let before = content.get(..end).unwrap_or("");
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map_or(0, |i| i + 1);
    let column = before.get(line_start..).map_or(0, |s| s.chars().count()) + 1;
    (line, column)
}

fn validate_yaml(content: &str) -> Result<(), FormatError> {
    let Err(e) = yaml_serde::from_str::<yaml_serde::Value>(content) else {
        return Ok(());
    };
    let full = e.to_string();
    let Some(location) = e.location() else {
        return Err(FormatError {
            format: Format::Yaml,
            line: None,
            column: None,
            message: full,
        });
    };
    let (line, column) = (location.line(), location.column());
    let marker = format!(" at line {line} column {column}");
    let message = match full.find(&marker) {
        Some(at) => format!("{}{}", &full[..at], &full[at + marker.len()..]),
        None => full,
    };
    Err(FormatError {
        format: Format::Yaml,
        line: Some(line),
        column: Some(column),
        message,
    })
}

/// Parses Java `.properties` content into its key/value pairs.
///
/// Follows `java.util.Properties.load`: natural lines end with `\n`, `\r\n`
/// or `\r`; a line ending in an odd number of backslashes continues on the
/// next one (whose leading whitespace is skipped); lines whose first
/// non-blank character is `#` or `!` are comments; the key ends at the first
/// unescaped `=`, `:` or whitespace; escapes are `\t \n \r \f \uXXXX` and
/// `\c` for any other `c`. Unlike Java, an empty key and a malformed or
/// unpaired-surrogate `\u` escape are errors. A key given twice keeps the
/// last value.
pub fn parse_properties(content: &str) -> Result<BTreeMap<String, String>, FormatError> {
    let mut map = BTreeMap::new();
    let mut lines = NaturalLines::new(content);
    while let Some((number, first)) = lines.next() {
        let trimmed = first.trim_start_matches(is_blank);
        if trimmed.is_empty() || trimmed.starts_with('#') || trimmed.starts_with('!') {
            continue;
        }
        // Assemble the logical line, remembering where each character was.
        let mut logical: Vec<Located> = Vec::new();
        let mut segment = (number, first.len() - trimmed.len(), trimmed);
        loop {
            let (line, skipped_bytes, text) = segment;
            let continues = ends_with_odd_backslashes(text);
            let body = if continues {
                &text[..text.len() - 1]
            } else {
                text
            };
            let column0 = first_column(lines.text_of(line), skipped_bytes);
            logical.extend(body.chars().enumerate().map(|(i, c)| Located {
                c,
                line,
                column: column0 + i,
            }));
            if !continues {
                break;
            }
            match lines.next() {
                Some((next_number, next)) => {
                    let rest = next.trim_start_matches(is_blank);
                    segment = (next_number, next.len() - rest.len(), rest);
                }
                None => break,
            }
        }
        let (key, value) = split_entry(&logical)?;
        map.insert(key, value);
    }
    Ok(map)
}

/// A character of a logical line and its 1-based position in the content.
#[derive(Clone, Copy)]
struct Located {
    c: char,
    line: usize,
    column: usize,
}

/// Whitespace as `.properties` defines it: space, tab and form feed.
fn is_blank(c: char) -> bool {
    matches!(c, ' ' | '\t' | '\x0c')
}

fn ends_with_odd_backslashes(text: &str) -> bool {
    text.bytes().rev().take_while(|b| *b == b'\\').count() % 2 == 1
}

/// The 1-based character column of byte offset `skipped` in `line_text`.
fn first_column(line_text: &str, skipped: usize) -> usize {
    line_text.get(..skipped).map_or(0, |s| s.chars().count()) + 1
}

/// Splits content into natural lines (`\n`, `\r\n` or `\r`), numbered from 1.
struct NaturalLines<'a> {
    lines: Vec<&'a str>,
    next: usize,
}

impl<'a> NaturalLines<'a> {
    fn new(content: &'a str) -> Self {
        let mut lines = Vec::new();
        let mut rest = content;
        while !rest.is_empty() {
            match rest.find(['\n', '\r']) {
                Some(at) => {
                    lines.push(&rest[..at]);
                    let skip = if rest[at..].starts_with("\r\n") { 2 } else { 1 };
                    rest = &rest[at + skip..];
                }
                None => {
                    lines.push(rest);
                    rest = "";
                }
            }
        }
        NaturalLines { lines, next: 0 }
    }

    /// The text of 1-based line `number`.
    fn text_of(&self, number: usize) -> &'a str {
        self.lines
            .get(number.saturating_sub(1))
            .copied()
            .unwrap_or("")
    }
}

impl<'a> Iterator for NaturalLines<'a> {
    type Item = (usize, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let line = self.lines.get(self.next).copied()?;
        self.next += 1;
        Some((self.next, line))
    }
}

fn properties_error(at: &Located, message: impl Into<String>) -> FormatError {
    FormatError {
        format: Format::Properties,
        line: Some(at.line),
        column: Some(at.column),
        message: message.into(),
    }
}

/// Splits a logical line (leading whitespace already skipped) into its
/// unescaped key and value.
fn split_entry(logical: &[Located]) -> Result<(String, String), FormatError> {
    let mut key_end = logical.len();
    let mut i = 0;
    while i < logical.len() {
        match logical[i].c {
            '\\' => i += 2,
            '=' | ':' => {
                key_end = i;
                break;
            }
            c if is_blank(c) => {
                key_end = i;
                break;
            }
            _ => i += 1,
        }
    }
    let key_end = key_end.min(logical.len());
    if key_end == 0
        && let Some(first) = logical.first()
    {
        return Err(properties_error(
            first,
            format!("empty key before {:?}", first.c),
        ));
    }
    // Skip blanks, at most one separator, and blanks again.
    let mut value_start = key_end;
    while value_start < logical.len() && is_blank(logical[value_start].c) {
        value_start += 1;
    }
    if value_start < logical.len() && matches!(logical[value_start].c, '=' | ':') {
        value_start += 1;
        while value_start < logical.len() && is_blank(logical[value_start].c) {
            value_start += 1;
        }
    }
    let key = unescape(&logical[..key_end])?;
    let value = unescape(&logical[value_start..])?;
    Ok((key, value))
}

/// Resolves `.properties` escapes.
fn unescape(chars: &[Located]) -> Result<String, FormatError> {
    let mut out = String::with_capacity(chars.len());
    let mut i = 0;
    while i < chars.len() {
        let at = &chars[i];
        if at.c != '\\' {
            out.push(at.c);
            i += 1;
            continue;
        }
        let Some(escaped) = chars.get(i + 1) else {
            // A lone trailing backslash (only possible at end of input).
            i += 1;
            continue;
        };
        match escaped.c {
            't' => out.push('\t'),
            'n' => out.push('\n'),
            'r' => out.push('\r'),
            'f' => out.push('\x0c'),
            'u' => {
                let high = hex4(chars, i)?;
                i += 6;
                let c = if (0xD800..0xDC00).contains(&high) {
                    let paired = chars.get(i).map(|l| l.c) == Some('\\')
                        && chars.get(i + 1).map(|l| l.c) == Some('u');
                    let low = if paired { hex4(chars, i).ok() } else { None };
                    match low {
                        Some(low) if (0xDC00..0xE000).contains(&low) => {
                            i += 6;
                            char::from_u32(0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00))
                        }
                        _ => None,
                    }
                } else {
                    char::from_u32(high)
                };
                match c {
                    Some(c) => out.push(c),
                    None => {
                        return Err(properties_error(
                            at,
                            format!("unpaired surrogate in escape \\u{high:04X}"),
                        ));
                    }
                }
                continue;
            }
            other => out.push(other),
        }
        i += 2;
    }
    Ok(out)
}

/// Reads the four hex digits of the `\uXXXX` escape starting at `start`.
fn hex4(chars: &[Located], start: usize) -> Result<u32, FormatError> {
    let mut value = 0u32;
    for k in 0..4 {
        let digit = chars.get(start + 2 + k).and_then(|l| l.c.to_digit(16));
        match digit {
            Some(d) => value = value * 16 + d,
            None => {
                return Err(properties_error(
                    &chars[start],
                    "malformed \\uXXXX escape: expected 4 hex digits after \\u",
                ));
            }
        }
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;
    use proptest::prelude::*;

    fn err(format: Format, content: &str) -> FormatError {
        validate(format, content).unwrap_err()
    }

    #[test]
    fn format_names_round_trip() {
        for f in Format::ALL {
            assert_eq!(f.to_string().parse::<Format>().unwrap(), f);
            let json = serde_json::to_string(&f).unwrap();
            assert_eq!(json, format!("\"{}\"", f.as_str()));
            assert_eq!(serde_json::from_str::<Format>(&json).unwrap(), f);
        }
        assert_eq!("YML".parse::<Format>().unwrap(), Format::Yaml);
        assert_eq!(Format::default(), Format::Text);
        let e = "xml".parse::<Format>().unwrap_err();
        assert!(e.to_string().contains("\"xml\""));
    }

    #[test]
    fn text_accepts_anything() {
        assert!(validate(Format::Text, "{{{ \u{0} é").is_ok());
    }

    #[test]
    fn json_errors_have_positions() {
        assert!(validate(Format::Json, r#"{"a": [1, 2, {"b": null}]}"#).is_ok());
        let e = err(Format::Json, "{\n  \"a\": 1,\n  \"b\" 2\n}");
        assert_eq!((e.line, e.column), (Some(3), Some(7)));
        assert_eq!(e.message, "expected `:`");
        assert_eq!(
            e.to_string(),
            "invalid JSON at line 3, column 7: expected `:`"
        );
        // Columns count characters, not bytes.
        let e = err(Format::Json, "{\"é\": x}");
        assert_eq!((e.line, e.column), (Some(1), Some(7)));
        let e = err(Format::Json, "");
        assert_eq!(e.line, Some(1));
        assert!(e.message.contains("EOF"), "{e}");
        let e = err(Format::Json, "[1,\n");
        assert_eq!(e.line, Some(2));
        assert_eq!(e.column, Some(1));
    }

    #[test]
    fn toml_errors_have_positions() {
        assert!(validate(Format::Toml, "a = 1\n[b]\nc = \"d\"\n").is_ok());
        let e = err(Format::Toml, "a = 1\n\n[server]\nport 80\n");
        assert_eq!(e.line, Some(4));
        assert_eq!(e.column, Some(6), "{e}");
        assert!(
            e.to_string()
                .starts_with("invalid TOML at line 4, column 6: "),
            "{e}"
        );
        let e = err(Format::Toml, "a = 1\na = 2\n");
        assert_eq!(e.line, Some(2), "{e}");
        assert!(e.message.contains("duplicate"), "{e}");
        let e = err(Format::Toml, "é = \"ok\"\n");
        assert_eq!((e.line, e.column), (Some(1), Some(1)), "{e}");
        let e = err(Format::Toml, "k = \"é\" x\n");
        assert_eq!((e.line, e.column), (Some(1), Some(9)), "{e}");
    }

    #[test]
    fn yaml_errors_have_positions() {
        assert!(validate(Format::Yaml, "a: 1\nb:\n  - x\n  - y\n").is_ok());
        assert!(validate(Format::Yaml, "").is_ok());
        let e = err(Format::Yaml, "a: 1\nb: [1, 2\n");
        assert_eq!(e.line, Some(3), "{e}");
        assert!(!e.message.contains(" at line 3 column"), "{e}");
        let e = err(Format::Yaml, "a: 1\n  b: 2\n");
        assert_eq!((e.line, e.column), (Some(2), Some(4)), "{e}");
        assert!(
            e.to_string()
                .starts_with("invalid YAML at line 2, column 4: "),
            "{e}"
        );
        let e = err(Format::Yaml, "a: 1\n---\nb: 2\n");
        assert!(e.message.contains("more than one document"), "{e}");
        let e = err(Format::Yaml, "a: *nope\n");
        assert!(e.message.contains("unknown anchor"), "{e}");
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_crash() {
        let deep = "[".repeat(100_000);
        assert!(validate(Format::Json, &deep).is_err());
        assert!(validate(Format::Yaml, &deep).is_err());
        assert!(validate(Format::Toml, &format!("a = {deep}")).is_err());
        let tables = "{a=".repeat(100_000);
        assert!(validate(Format::Toml, &format!("a = {tables}")).is_err());
    }

    #[test]
    fn properties_basics() {
        let map = parse_properties(
            "# comment\n! also comment\n\n  a = 1\nb:2\nc 3\nd\ne=\\\n    continued\\\n  more\n\
             path=c:\\\\dir\\\\\nkey\\ with\\=sep = v\\tx\\u00e9\\uD83D\\uDE00\ndup=1\ndup=2\n\
             trailing = keep   \r\nmac=1\rlast=x",
        )
        .unwrap();
        let get = |k: &str| map.get(k).map(String::as_str);
        assert_eq!(get("a"), Some("1"));
        assert_eq!(get("b"), Some("2"));
        assert_eq!(get("c"), Some("3"));
        assert_eq!(get("d"), Some(""));
        assert_eq!(get("e"), Some("continuedmore"));
        assert_eq!(get("path"), Some("c:\\dir\\"));
        assert_eq!(get("key with=sep"), Some("v\txé😀"));
        assert_eq!(get("dup"), Some("2"));
        assert_eq!(get("trailing"), Some("keep   "));
        assert_eq!(get("mac"), Some("1"));
        assert_eq!(get("last"), Some("x"));
        assert_eq!(map.len(), 11);
        // `key = = v` keeps the second separator in the value; a comment
        // marker inside a continuation is content.
        let map = parse_properties("k = = v\nx=a\\\n# not a comment").unwrap();
        assert_eq!(map["k"], "= v");
        assert_eq!(map["x"], "a# not a comment");
        assert!(parse_properties("").unwrap().is_empty());
        assert!(parse_properties("a=1\\").unwrap()["a"] == "1");
    }

    #[test]
    fn properties_errors_have_positions() {
        let e = err(Format::Properties, "a=1\n  = value\n");
        assert_eq!((e.line, e.column), (Some(2), Some(3)));
        assert_eq!(
            e.to_string(),
            "invalid properties at line 2, column 3: empty key before '='"
        );
        let e = err(Format::Properties, "a=1\nb=x\\u12G4\n");
        assert_eq!((e.line, e.column), (Some(2), Some(4)));
        assert!(e.message.contains("malformed"), "{e}");
        let e = err(Format::Properties, "a=\\u12");
        assert_eq!((e.line, e.column), (Some(1), Some(3)));
        let e = err(Format::Properties, "a=\\uD800x");
        assert!(e.message.contains("unpaired surrogate"), "{e}");
        let e = err(Format::Properties, "a=\\uDC00");
        assert!(e.message.contains("unpaired surrogate"), "{e}");
        // Position of an escape on a continuation line.
        let e = err(Format::Properties, "a=ok\\\n    \\uZZZZ");
        assert_eq!((e.line, e.column), (Some(2), Some(5)));
        // An escape split across a continuation is joined first, as in Java.
        assert_eq!(parse_properties("a=\\u00\\\n   e9").unwrap()["a"], "é");
    }

    /// Escapes a key or value the way `Properties.store` would.
    fn escape(s: &str, is_key: bool) -> String {
        let mut out = String::new();
        for (i, c) in s.chars().enumerate() {
            match c {
                '\\' | '=' | ':' | '#' | '!' => {
                    out.push('\\');
                    out.push(c);
                }
                ' ' if is_key || i == 0 => out.push_str("\\ "),
                '\t' => out.push_str("\\t"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\x0c' => out.push_str("\\f"),
                c if (c as u32) < 0x20 || c as u32 > 0x7e => {
                    let mut buf = [0u16; 2];
                    for unit in c.encode_utf16(&mut buf) {
                        out.push_str(&format!("\\u{unit:04X}"));
                    }
                }
                c => out.push(c),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn validate_never_panics(content in any::<String>()) {
            for f in Format::ALL {
                let _ = validate(f, &content);
            }
        }

        #[test]
        fn validate_never_panics_on_syntax_soup(
            content in "[\\[\\]{}()\"'=:#!\\\\u0-9a-fA-F \n\r\t.,\\-|>&*?é😀]{0,200}"
        ) {
            for f in Format::ALL {
                if let Err(e) = validate(f, &content) {
                    prop_assert!(!e.message.is_empty());
                    if let Some(line) = e.line {
                        prop_assert!(line >= 1);
                    }
                    if let Some(column) = e.column {
                        prop_assert!(column >= 1);
                    }
                }
            }
        }

        #[test]
        fn properties_round_trip(
            entries in proptest::collection::btree_map(".{1,20}", ".{0,40}", 0..10)
        ) {
            let mut text = String::new();
            for (k, v) in &entries {
                text.push_str(&escape(k, true));
                text.push('=');
                text.push_str(&escape(v, false));
                text.push('\n');
            }
            prop_assert_eq!(parse_properties(&text).unwrap(), entries);
        }
    }
}
