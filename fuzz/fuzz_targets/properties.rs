//! A configuration entry in the properties format (and every other
//! format's validator on the same text).
#![no_main]
use meshwork_coord::config::Format;
use meshwork_coord::config::format::{parse_properties, validate};

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let parsed = parse_properties(text);
    // The validator agrees with the parser.
    assert_eq!(parsed.is_ok(), validate(Format::Properties, text).is_ok());
    for f in [Format::Json, Format::Yaml, Format::Toml, Format::Text] {
        let _ = validate(f, text);
    }
});
