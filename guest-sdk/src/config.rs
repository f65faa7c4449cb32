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

use serde::de::DeserializeOwned;

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
    parse_json(&json())
}

/// Deserializes the config JSON text `text` into `T`.
pub(crate) fn parse_json<T: DeserializeOwned>(text: &str) -> Result<T, ConfigError> {
    serde_json::from_str(text).map_err(ConfigError)
}

/// An error from [`parse`]: the config does not match the expected type.
///
/// It displays serde's message, such as ``missing field `headers` ``, without
/// the line and column, because those point into the JSON text the host made
/// from the config file, not into the file itself.
#[derive(Debug)]
pub struct ConfigError(serde_json::Error);

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let message = self.0.to_string();
        // serde_json appends " at line L column C" when it has a position.
        let position = format!(" at line {} column {}", self.0.line(), self.0.column());
        f.write_str(message.strip_suffix(&position).unwrap_or(&message))
    }
}

impl std::error::Error for ConfigError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.0)
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
        let sample: Sample = parse_json(r#"{"headers":{"x-a":"1"}}"#).unwrap();
        assert_eq!(sample.headers["x-a"], "1");
    }

    #[test]
    fn error_shows_serde_message_only() {
        let error = parse_json::<Sample>(r#"{"other":1}"#).unwrap_err();
        assert_eq!(
            error.to_string(),
            "unknown field `other`, expected `headers`"
        );
    }

    #[test]
    fn error_for_missing_field() {
        let error = parse_json::<Sample>("{}").unwrap_err();
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
