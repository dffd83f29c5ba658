//! JSON whose objects name each member once. RFC 8259 leaves duplicate names to the parser, and
//! parsers disagree (serde_json keeps the last, others the first), so a document with duplicates
//! can mean one thing to us and another to the next reader: JWT claims a verifier reads
//! differently from what we checked (RFC 7519 §4 requires unique claim names), or a key store
//! whose authenticated content is not the content an editor sees. Both are refused.

use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeOwned, Deserializer, MapAccess, SeqAccess, Visitor};

/// Why a document was refused.
#[derive(Debug, thiserror::Error)]
pub enum StrictJsonError {
    /// An object names a member twice (the error says which, and where).
    #[error("{0}")]
    Duplicate(serde_json::Error),
    /// Not JSON, or not the JSON `T` expects.
    #[error("{0}")]
    Invalid(serde_json::Error),
}

/// Parses `bytes` as JSON into `T`, refusing a duplicate member name in any object.
pub fn from_slice<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, StrictJsonError> {
    // The first pass accepts every JSON value, so a data error from it can only be a duplicate.
    serde_json::from_slice::<UniqueNames>(bytes).map_err(|e| {
        if e.is_data() {
            StrictJsonError::Duplicate(e)
        } else {
            StrictJsonError::Invalid(e)
        }
    })?;
    serde_json::from_slice(bytes).map_err(StrictJsonError::Invalid)
}

/// A JSON value that has been checked for duplicate names, and thrown away.
struct UniqueNames;

impl<'de> de::Deserialize<'de> for UniqueNames {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        d.deserialize_any(UniqueNames)
    }
}

impl<'de> Visitor<'de> for UniqueNames {
    type Value = UniqueNames;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<Self, E> {
        Ok(UniqueNames)
    }
    fn visit_i64<E>(self, _: i64) -> Result<Self, E> {
        Ok(UniqueNames)
    }
    fn visit_u64<E>(self, _: u64) -> Result<Self, E> {
        Ok(UniqueNames)
    }
    fn visit_f64<E>(self, _: f64) -> Result<Self, E> {
        Ok(UniqueNames)
    }
    fn visit_str<E>(self, _: &str) -> Result<Self, E> {
        Ok(UniqueNames)
    }
    fn visit_unit<E>(self) -> Result<Self, E> {
        Ok(UniqueNames)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self, A::Error> {
        while seq.next_element::<UniqueNames>()?.is_some() {}
        Ok(UniqueNames)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self, A::Error> {
        let mut seen = HashSet::new();
        while let Some(name) = map.next_key::<String>()? {
            if !seen.insert(name.clone()) {
                return Err(de::Error::custom(format!(
                    "member {name:?} appears more than once"
                )));
            }
            map.next_value::<UniqueNames>()?;
        }
        Ok(UniqueNames)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::Value;

    #[test]
    fn duplicate_names_are_refused_at_any_depth() {
        let ok: Value = from_slice(br#"{"a":1,"b":{"a":2},"c":[{"a":3},{"a":4}]}"#).unwrap();
        assert_eq!(ok["c"][1]["a"], 4);
        for dup in [
            &br#"{"iss":"x","iss":"y"}"#[..],
            br#"{"k":{"a":1,"a":1}}"#,
            br#"[{"a":1,"a":2}]"#,
            br#"{"a":1,"\u0061":2}"#,
        ] {
            let err = from_slice::<Value>(dup).unwrap_err();
            assert!(matches!(err, StrictJsonError::Duplicate(_)), "{err}");
            assert!(err.to_string().contains("appears more than once"), "{err}");
        }
        assert!(matches!(
            from_slice::<Value>(b"{"),
            Err(StrictJsonError::Invalid(_))
        ));
        assert!(matches!(
            from_slice::<Vec<u8>>(b"{}"),
            Err(StrictJsonError::Invalid(_))
        ));
    }
}
