//! Order ids in JSON: Snowflake ids pass 2^53, which a JavaScript number cannot
//! hold exactly, so every id the shop writes is a JSON string (as Twitter's
//! `id_str` and Discord's snowflakes are). Reading accepts a string or a number.
//! Use as `#[serde(with = "crate::ids")]` on an `i64` field.

use serde::{Deserialize, Deserializer, Serializer, de};

/// An order id from a URL path segment (400 naming it when it is not one).
pub(crate) fn from_path(id: &str) -> Result<i64, crate::ApiError> {
    id.parse()
        .map_err(|_| crate::ApiError::invalid(format!("order id {id:?} is not an integer")))
}

/// Writes the id as a decimal string.
pub fn serialize<S: Serializer>(id: &i64, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(id)
}

/// Reads an id from a decimal string or a JSON integer.
pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Id<'a> {
        Number(i64),
        Text(&'a str),
        Owned(String),
    }
    let parse = |t: &str| {
        t.parse::<i64>()
            .map_err(|_| de::Error::custom(format!("id {t:?} is not a decimal integer")))
    };
    match Id::deserialize(d)? {
        Id::Number(n) => Ok(n),
        Id::Text(t) => parse(t),
        Id::Owned(t) => parse(&t),
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct O {
        #[serde(with = "super")]
        id: i64,
    }

    #[test]
    fn ids_above_2_pow_53_are_strings_both_ways() {
        let o = O {
            id: 9_007_199_254_740_993,
        };
        let json = serde_json::to_string(&o).unwrap();
        assert_eq!(json, r#"{"id":"9007199254740993"}"#);
        assert_eq!(serde_json::from_str::<O>(&json).unwrap(), o);
        assert_eq!(
            serde_json::from_str::<O>(r#"{"id":9007199254740993}"#).unwrap(),
            o
        );
        let err = serde_json::from_str::<O>(r#"{"id":"12x"}"#).unwrap_err();
        assert!(err.to_string().contains("not a decimal integer"), "{err}");
    }
}
