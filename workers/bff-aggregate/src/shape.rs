//! Cuts an upstream's JSON down to the shape a device class gets: the list
//! inside the response, at most `max_items` items, and only the configured
//! fields of each.

use serde_json::{Map, Value};

use crate::config::{parse_field, Field, Shape};

/// Shapes the JSON `body` of a section: takes the list at the dotted path
/// `list` (the whole body when `None`), keeps at most `shape.max_items`
/// items, and keeps only `shape.fields` of each object. Returns why the body
/// does not fit.
pub fn apply(body: Value, list: Option<&str>, shape: &Shape) -> Result<Value, String> {
    let value = match list {
        Some(path) => {
            let segments: Vec<String> = path.split('.').map(str::to_string).collect();
            match lookup(&body, &segments) {
                Some(Value::Array(items)) => Value::Array(items.clone()),
                Some(_) => return Err(format!("`{path}` in the response is not a list")),
                None => return Err(format!("the response has no `{path}`")),
            }
        }
        None => body,
    };
    // Fields were checked at load.
    let fields: Option<Vec<Field>> = shape
        .fields
        .as_ref()
        .map(|fields| fields.iter().filter_map(|f| parse_field(f).ok()).collect());
    let shaped = match value {
        Value::Array(items) => {
            let kept = shape.max_items.unwrap_or(items.len());
            Value::Array(
                items
                    .into_iter()
                    .take(kept)
                    .map(|item| select(item, fields.as_deref()))
                    .collect(),
            )
        }
        other => select(other, fields.as_deref()),
    };
    Ok(shaped)
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
    fn no_fields_keeps_everything() {
        let body = json!([{"id": 1, "x": [1, 2]}, 5]);
        let shaped = apply(body.clone(), None, &Shape::default()).unwrap();
        assert_eq!(shaped, body);
    }
}
