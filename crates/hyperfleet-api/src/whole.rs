//! Integers as JSON Schema counts them: `2.0` is the integer 2 (a number
//! with no fractional part), so integer fields of requests accept it too;
//! `2.5` and negative numbers stay refused. Used with
//! `#[serde(deserialize_with = ...)]`.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

/// A non-negative whole number, from a JSON integer or a float like `2.0`.
struct Whole(u64);

impl<'de> Deserialize<'de> for Whole {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Whole;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a non-negative integer")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Whole, E> {
                Ok(Whole(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Whole, E> {
                u64::try_from(v)
                    .map(Whole)
                    .map_err(|_| E::invalid_value(de::Unexpected::Signed(v), &self))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Whole, E> {
                // 2^64 is the first float past u64::MAX.
                if v.fract() == 0.0 && (0.0..18_446_744_073_709_551_616.0).contains(&v) {
                    Ok(Whole(v as u64))
                } else {
                    Err(E::invalid_value(de::Unexpected::Float(v), &self))
                }
            }
        }
        d.deserialize_any(V)
    }
}

fn narrow<T: TryFrom<u64>, E: de::Error>(w: Whole) -> Result<T, E> {
    T::try_from(w.0).map_err(|_| {
        E::invalid_value(
            de::Unexpected::Unsigned(w.0),
            &"an integer in range for the field",
        )
    })
}

/// An optional integer field.
pub(crate) fn opt<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    Option::<Whole>::deserialize(d)?.map(narrow).transpose()
}

/// An optional integer field where null means something of its own
/// (`Some(None)`), apart from an absent field (`None`, with
/// `#[serde(default)]`).
pub(crate) fn opt_nullable<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    opt(d).map(Some)
}

/// A list of integers.
pub(crate) fn vec<'de, D, T>(d: D) -> Result<Vec<T>, D::Error>
where
    D: Deserializer<'de>,
    T: TryFrom<u64>,
{
    Vec::<Whole>::deserialize(d)?
        .into_iter()
        .map(narrow)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Deserialize)]
    struct T {
        #[serde(default, deserialize_with = "opt")]
        n: Option<u32>,
        #[serde(default, deserialize_with = "vec")]
        v: Vec<u32>,
    }

    fn parse(s: &str) -> Result<T, serde_json::Error> {
        serde_json::from_str(s)
    }

    #[test]
    fn whole_floats_are_integers_and_nothing_else_is() {
        let t = parse(r#"{"n": 2.0, "v": [1, 65535.0]}"#).unwrap();
        assert_eq!((t.n, t.v), (Some(2), vec![1, 65535]));
        assert_eq!(parse(r#"{"n": null}"#).unwrap().n, None);
        assert_eq!(parse("{}").unwrap().n, None);
        for bad in [
            r#"{"n": 2.5}"#,
            r#"{"n": -1}"#,
            r#"{"n": -1.0}"#,
            r#"{"n": 4294967296}"#,
            r#"{"n": 1e300}"#,
            r#"{"n": "2"}"#,
            r#"{"v": [1.5]}"#,
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
