//! The console never shows secrets in clear: values of keys that name one
//! (`password`, `secret`, `token`, `api_key`, `private_key`, `credential`, ...)
//! are replaced by [`MASK`] wherever config content is displayed, in
//! `key = value`, `key: value` and `"key": "value"` lines.

/// What a secret value is shown as.
pub const MASK: &str = "••••••";

/// `key = value` / `key: value` pairs whose key names a secret, anywhere in a
/// line (so inline tables and JSON objects on one line are covered too).
fn pattern() -> &'static regex::Regex {
    static RE: std::sync::OnceLock<regex::Regex> = std::sync::OnceLock::new();
    RE.get_or_init(|| {
        regex::Regex::new(
            r#"(?i)((?:^|[\s{,"'])["']?[a-z0-9_.-]*(?:password|passwd|secret|token|api[_-]?key|apikey|private[_-]?key|credential)[a-z0-9_.-]*["']?\s*[:=]\s*)("(?:[^"\\]|\\.)*"|'[^']*'|[^,}\s][^,}]*?)(\s*(?:[,}]|$))"#,
        )
        .expect("the secret pattern is a valid constant regex")
    })
}

/// `content` with every secret value masked.
pub fn mask(content: &str) -> String {
    content
        .split('\n')
        .map(|line| {
            pattern()
                .replace_all(line, |c: &regex::Captures<'_>| {
                    let value = &c[2];
                    let quote = match value.chars().next() {
                        Some(q @ ('"' | '\'')) => q.to_string(),
                        _ => String::new(),
                    };
                    format!("{}{quote}{MASK}{quote}{}", &c[1], &c[3])
                })
                .into_owned()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// Whether content about to be published still holds a masked value (the user
/// must type the secret again rather than publish the mask).
pub fn holds_mask(content: &str) -> bool {
    content.contains(MASK)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_are_masked_in_every_format() {
        let toml = "name = \"shop\"\npassword = \"hunter2\"\n[db]\napi-key = 'k1'";
        let m = mask(toml);
        assert!(!m.contains("hunter2") && !m.contains("k1"), "{m}");
        assert!(m.contains("name = \"shop\""));
        let yaml = "db:\n  user: app\n  secret_token: abc";
        assert!(!mask(yaml).contains("abc"));
        let json = "{\n  \"client_secret\": \"xyz\",\n  \"port\": 80\n}";
        let m = mask(json);
        assert!(!m.contains("xyz") && m.contains("\"port\": 80"), "{m}");
        assert!(m.contains("\"client_secret\": \"••••••\","), "{m}");
        assert!(holds_mask(&m));
        let inline = "auth = { jwt = { secret = \"s3\", issuer = \"me\" } }\nlist = [1, 2]";
        let m = mask(inline);
        assert!(!m.contains("s3") && m.contains("issuer = \"me\""), "{m}");
        let props = "db.password=abc\ndb.user=app";
        let m = mask(props);
        assert!(!m.contains("abc") && m.contains("db.user=app"), "{m}");
        let one_line_json = r#"{"token": "t-1", "port": 80}"#;
        let m = mask(one_line_json);
        assert!(!m.contains("t-1") && m.contains("\"port\": 80"), "{m}");
    }
}
