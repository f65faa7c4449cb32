//! Cuts an upstream's JSON down to the shape a device class gets: the list
//! inside the response, at most `max_items` items, and only the configured
//! fields of each.
//!
//! The body is read as it is parsed, keeping only what the shape needs: the
//! values beside the list and the items past `max_items` are skipped, not
//! built. A section body of a few hundred KiB whose every value were built
//! would take many times its size in the worker's memory.

use std::fmt;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde_json::{Map, Value};

use crate::config::{parse_field, Field, Shape};

/// Shapes the JSON `body` of a section: takes the list at the dotted path
/// `list` (the whole body when `None`), keeps at most `shape.max_items`
/// items, and keeps only `shape.fields` of each object. Returns why the body
/// does not fit.
pub fn apply(body: &[u8], list: Option<&str>, shape: &Shape) -> Result<Value, String> {
    let invalid = |error: serde_json::Error| format!("invalid JSON: {error}");
    let mut parser = serde_json::Deserializer::from_slice(body);
    let value = match list {
        Some(path) => {
            let segments: Vec<&str> = path.split('.').collect();
            let found = At {
                path: &segments,
                max_items: shape.max_items,
            }
            .deserialize(&mut parser)
            .map_err(invalid)?;
            match found {
                Found::List(items) => Value::Array(items),
                Found::NotList => return Err(format!("`{path}` in the response is not a list")),
                Found::Missing => return Err(format!("the response has no `{path}`")),
            }
        }
        None => match (At {
            path: &[],
            max_items: shape.max_items,
        })
        .deserialize(&mut parser)
        .map_err(invalid)?
        {
            Found::List(items) => Value::Array(items),
            // Not a list: parsed again whole, as an object's fields are
            // picked from the whole of it.
            _ => serde_json::from_slice(body).map_err(invalid)?,
        },
    };
    parser.end().map_err(invalid)?;
    // Fields were checked at load.
    let fields: Option<Vec<Field>> = shape
        .fields
        .as_ref()
        .map(|fields| fields.iter().filter_map(|f| parse_field(f).ok()).collect());
    let shaped = match value {
        Value::Array(items) => Value::Array(
            items
                .into_iter()
                .map(|item| select(item, fields.as_deref()))
                .collect(),
        ),
        other => select(other, fields.as_deref()),
    };
    Ok(shaped)
}

/// The value the parser found at a path.
enum Found {
    /// The list, cut to `max_items`.
    List(Vec<Value>),
    NotList,
    Missing,
}

/// A parser that finds the list at `path`, a list of object keys, and
/// keeps at most `max_items` of its items. It skips everything else.
struct At<'a> {
    path: &'a [&'a str],
    max_items: Option<usize>,
}

impl<'de> DeserializeSeed<'de> for At<'_> {
    type Value = Found;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Found, D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for At<'_> {
    type Value = Found;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a JSON value")
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Found, A::Error> {
        if !self.path.is_empty() {
            while seq.next_element::<IgnoredAny>()?.is_some() {}
            return Ok(Found::Missing);
        }
        let max_items = self.max_items.unwrap_or(usize::MAX);
        let mut items = Vec::new();
        while items.len() < max_items {
            match seq.next_element::<Value>()? {
                Some(item) => items.push(item),
                None => return Ok(Found::List(items)),
            }
        }
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Found::List(items))
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Found, A::Error> {
        let Some((first, rest)) = self.path.split_first() else {
            while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
            return Ok(Found::NotList);
        };
        // As when the object is built whole, the last of repeated keys wins.
        let mut found = Found::Missing;
        while let Some(key) = map.next_key::<std::borrow::Cow<'de, str>>()? {
            if key == *first {
                found = map.next_value_seed(At {
                    path: rest,
                    max_items: self.max_items,
                })?;
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }

    fn visit_bool<E>(self, _: bool) -> Result<Found, E> {
        Ok(self.scalar())
    }

    fn visit_i64<E>(self, _: i64) -> Result<Found, E> {
        Ok(self.scalar())
    }

    fn visit_u64<E>(self, _: u64) -> Result<Found, E> {
        Ok(self.scalar())
    }

    fn visit_f64<E>(self, _: f64) -> Result<Found, E> {
        Ok(self.scalar())
    }

    fn visit_str<E>(self, _: &str) -> Result<Found, E> {
        Ok(self.scalar())
    }

    fn visit_unit<E>(self) -> Result<Found, E> {
        Ok(self.scalar())
    }
}

impl At<'_> {
    /// Returns what a value that is neither a list nor an object means at
    /// this path.
    fn scalar(&self) -> Found {
        if self.path.is_empty() {
            Found::NotList
        } else {
            Found::Missing
        }
    }
}

/// Keeps only `fields` of an object; other values, and every value when
/// `fields` is `None`, pass unchanged. A field missing from the object is
/// left out.
fn select(value: Value, fields: Option<&[Field]>) -> Value {
    let (Some(fields), Value::Object(_)) = (fields, &value) else {
        return value;
    };
    let mut selected = Map::with_capacity(fields.len());
    for field in fields {
        if let Some(found) = lookup(&value, &field.path) {
            selected.insert(field.key.clone(), found.clone());
        }
    }
    Value::Object(selected)
}

/// Returns the value at a dotted path of object keys.
fn lookup<'a>(value: &'a Value, path: &[String]) -> Option<&'a Value> {
    path.iter()
        .try_fold(value, |current, key| current.as_object()?.get(key))
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    /// Shapes `body` as the section's bytes.
    fn apply(body: Value, list: Option<&str>, shape: &Shape) -> Result<Value, String> {
        super::apply(body.to_string().as_bytes(), list, shape)
    }

    fn shape(fields: Option<&[&str]>, max_items: Option<usize>) -> Shape {
        Shape {
            fields: fields.map(|f| f.iter().map(|s| s.to_string()).collect()),
            max_items,
        }
    }

    #[test]
    fn keeps_fields_and_max_items() {
        let body = json!([
            {"id": 1, "title": "a", "images": {"small": "a-s", "large": "a-l"}, "synopsis": "x"},
            {"id": 2, "title": "b", "images": {"small": "b-s", "large": "b-l"}},
            {"id": 3, "title": "c"},
        ]);
        let shaped = apply(
            body,
            None,
            &shape(Some(&["id", "image=images.small"]), Some(2)),
        )
        .unwrap();
        assert_eq!(
            shaped,
            json!([{"id": 1, "image": "a-s"}, {"id": 2, "image": "b-s"}])
        );
    }

    #[test]
    fn missing_field_left_out() {
        let shaped = apply(
            json!([{"id": 3}]),
            None,
            &shape(Some(&["id", "title"]), None),
        )
        .unwrap();
        assert_eq!(shaped, json!([{"id": 3}]));
    }

    #[test]
    fn list_at_dotted_path() {
        let body = json!({"data": {"rows": [{"id": 1}, {"id": 2}]}, "total": 2});
        let shaped = apply(body, Some("data.rows"), &shape(None, Some(1))).unwrap();
        assert_eq!(shaped, json!([{"id": 1}]));
    }

    #[test]
    fn list_path_errors() {
        let body = json!({"data": {"rows": 3}});
        assert_eq!(
            apply(body.clone(), Some("data.rows"), &Shape::default()),
            Err("`data.rows` in the response is not a list".to_string())
        );
        assert_eq!(
            apply(body, Some("items"), &Shape::default()),
            Err("the response has no `items`".to_string())
        );
    }

    #[test]
    fn object_section_keeps_fields() {
        let body = json!({"plan": "premium", "card": "4242", "renews": "2027-01-01"});
        let shaped = apply(body, None, &shape(Some(&["plan"]), Some(1))).unwrap();
        assert_eq!(shaped, json!({"plan": "premium"}));
    }

    #[test]
    fn long_list_is_cut_while_parsed() {
        let mut body = String::from(r#"{"total": 1, "rows": ["#);
        for index in 0..200_000 {
            body.push_str(&format!(r#"{{"id": {index}, "title": "t"}},"#));
        }
        body.push_str(r#"{"id": -1}], "next": {"rows": 5}}"#);
        let shaped = super::apply(
            body.as_bytes(),
            Some("rows"),
            &shape(Some(&["id"]), Some(2)),
        )
        .unwrap();
        assert_eq!(shaped, json!([{"id": 0}, {"id": 1}]));
    }

    #[test]
    fn skipped_values_must_still_be_json() {
        for body in [
            r#"{"rows": [1, 2, x]}"#,
            r#"{"other": [}, "rows": [1]}"#,
            r#"{"rows": [1]} trailing"#,
        ] {
            let error =
                super::apply(body.as_bytes(), Some("rows"), &shape(None, Some(1))).unwrap_err();
            assert!(error.starts_with("invalid JSON: "), "{body}: {error}");
        }
    }

    #[test]
    fn repeated_key_takes_the_last() {
        let body = br#"{"rows": [1], "rows": [2, 3]}"#;
        let shaped = super::apply(body, Some("rows"), &Shape::default()).unwrap();
        assert_eq!(shaped, json!([2, 3]));
    }

    #[test]
    fn no_fields_keeps_everything() {
        let body = json!([{"id": 1, "x": [1, 2]}, 5]);
        let shaped = apply(body.clone(), None, &Shape::default()).unwrap();
        assert_eq!(shaped, body);
    }
}
