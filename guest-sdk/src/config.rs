//! The worker's own settings, from its entry in the route's config.
//!
//! The host passes the worker binding's config table as JSON. Read one key
//! with [`get`], the whole table with [`json`], or deserialize it into your
//! own type with [`parse`]. The config is the same for every call of one
//! binding, but no state survives between calls, so a worker parses it again
//! on each call.
//!
//! On targets other than `wasm32`, for native unit tests, these functions read
//! the current thread's config that `testing::set_config` stores.

use std::fmt;

use serde::de::{Deserialize, DeserializeOwned};

/// Returns the value of the top-level key `key`. Strings come back as they
/// are, and numbers, booleans, arrays and tables as JSON text.
pub fn get(key: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::config::get(key);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::config_get(key);
}

/// Returns the whole config table as a JSON object.
pub fn json() -> String {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::config::json();

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::config_json();
}

/// Deserializes the whole config table into `T`.
///
/// # Errors
///
/// Returns [`ConfigError`] when the table does not match `T`, such as a
/// missing field or a value of the wrong type.
pub fn parse<T: DeserializeOwned>() -> Result<T, ConfigError> {
    from_json(&json())
}

/// Deserializes the config JSON text `text` into `T`, as [`parse`] does
/// with the binding's config. `T` may borrow strings from `text`, so a worker
/// can read [`json`] once and deserialize it without copying each value.
/// Workers also use it to test their config types.
///
/// # Errors
///
/// Returns [`ConfigError`] when `text` does not match `T`.
pub fn from_json<'a, T: Deserialize<'a>>(text: &'a str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(|error| ConfigError::locate::<T>(text, error))
}

/// An error from [`parse`]: the config does not match the expected type.
///
/// It displays the field's path and serde's message, such as
/// ``variants[1].weight: invalid type: string "x", expected u32``, without
/// serde_json's line and column, which point into the JSON text the host
/// made from the config file, not into the file itself.
#[derive(Debug)]
pub struct ConfigError {
    /// The path of the field at fault, such as `variants[1].weight`, or
    /// `None` for the table itself.
    path: Option<String>,
    error: serde_json::Error,
}

impl ConfigError {
    /// Finds the path of the field at fault by parsing `text` again with
    /// tracking, which only a failed parse pays for.
    fn locate<'a, T: Deserialize<'a>>(text: &'a str, error: serde_json::Error) -> ConfigError {
        let mut deserializer = serde_json::Deserializer::from_str(text);
        match serde_path_to_error::deserialize::<_, T>(&mut deserializer) {
            Err(tracked) => {
                let mut path = tracked.path().to_string();
                let error = tracked.into_inner();
                // For an unknown field the path ends with that field, which
                // the message names already.
                let message = error.to_string();
                if let Some(field) = message
                    .strip_prefix("unknown field `")
                    .and_then(|rest| rest.split('`').next())
                {
                    if let Some(parent) = path.strip_suffix(field) {
                        path = parent.strip_suffix('.').unwrap_or(parent).to_owned();
                    }
                }
                ConfigError {
                    path: (!path.is_empty() && path != ".").then_some(path),
                    error,
                }
            }
            Ok(_) => ConfigError { path: None, error },
        }
    }

    /// Returns the path of the field at fault, such as `variants[1].weight`,
    /// or `None` when the error is about the table itself.
    pub fn path(&self) -> Option<&str> {
        self.path.as_deref()
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(path) = &self.path {
            write!(f, "{path}: ")?;
        }
        let message = self.error.to_string();
        // serde_json appends " at line L column C" when it has a position.
        let position = format!(
            " at line {} column {}",
            self.error.line(),
            self.error.column()
        );
        f.write_str(message.strip_suffix(&position).unwrap_or(&message))
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Sample {
        headers: BTreeMap<String, String>,
    }

    #[test]
    fn parse_reads_table() {
        let sample: Sample = from_json(r#"{"headers":{"x-a":"1"}}"#).unwrap();
        assert_eq!(sample.headers["x-a"], "1");
    }

    #[test]
    fn error_shows_serde_message_only() {
        let error = from_json::<Sample>(r#"{"other":1}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown field `other`, expected `headers`"
        );
    }

    #[test]
    fn error_names_the_field_at_fault() {
        let error = from_json::<Sample>(r#"{"headers":{"x-a":1}}"#).unwrap_err();
        assert_eq!(error.path(), Some("headers.x-a"));
        assert_eq!(
            error.to_string(),
            "headers.x-a: invalid type: integer `1`, expected a string"
        );
    }

    #[test]
    fn unknown_nested_field_names_its_table() {
        #[derive(Debug, Deserialize)]
        struct Outer {
            #[allow(dead_code)]
            inner: Sample,
        }
        let error = from_json::<Outer>(r#"{"inner":{"other":1}}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "inner: unknown field `other`, expected `headers`"
        );
    }

    #[test]
    fn error_for_missing_field() {
        let error = from_json::<Sample>("{}").unwrap_err();
        assert_eq!(error.to_string(), "missing field `headers`");
    }

    #[test]
    fn get_and_parse_use_test_config() {
        crate::testing::set_config(r#"{"name":"edge","limit":5,"headers":{"x-a":"1"}}"#);
        assert_eq!(get("name").as_deref(), Some("edge"));
        assert_eq!(get("limit").as_deref(), Some("5"));
        assert_eq!(get("headers").as_deref(), Some(r#"{"x-a":"1"}"#));
        assert_eq!(get("missing"), None);
        let error = parse::<Sample>().unwrap_err();
        assert!(error.to_string().starts_with("unknown field `"));
    }
}
