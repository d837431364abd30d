//! The console never shows secrets in clear: values of keys that name one
//! (`password`, `secret`, `token`, `api_key`, `private_key`, `credential`, ...)
//! are replaced by [`MASK`] wherever config content is displayed, in
//! `key = value`, `key: value` and `"key": "value"` lines.

/// What a secret value is shown as.
pub const MASK: &str = "••••••";

const WORDS: [&str; 8] = [
    "password",
    "passwd",
    "secret",
    "token",
    "apikey",
    "api_key",
    "private_key",
    "credential",
];

/// Whether a key names a secret.
pub fn is_secret_key(key: &str) -> bool {
    let k = key
        .trim()
        .trim_matches(|c| c == '"' || c == '\'')
        .to_ascii_lowercase()
        .replace('-', "_");
    WORDS.iter().any(|w| k.contains(w))
}

/// `content` with every secret value masked.
pub fn mask(content: &str) -> String {
    let mut out = String::with_capacity(content.len());
    for (i, line) in content.split('\n').enumerate() {
        if i > 0 {
            out.push('\n');
        }
        out.push_str(&mask_line(line));
    }
    out
}

fn mask_line(line: &str) -> String {
    // The first `=` or `:` separates key and value.
    let Some(pos) = line.find(['=', ':']) else {
        return line.to_string();
    };
    let (key, rest) = line.split_at(pos);
    if !is_secret_key(key) || key.trim().is_empty() {
        return line.to_string();
    }
    let value = &rest[1..];
    if value.trim().is_empty() || value.trim() == "{" || value.trim() == "[" {
        return line.to_string();
    }
    let trailing_comma = value.trim_end().ends_with(',');
    let quote = if value.trim_start().starts_with('"') {
        "\""
    } else {
        ""
    };
    format!(
        "{key}{sep} {quote}{MASK}{quote}{comma}",
        sep = &rest[..1],
        comma = if trailing_comma { "," } else { "" }
    )
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
    }
}
