//! Responses a worker sends itself, and changes to the upstream's response.

use serde::Serialize;

use crate::headers::{record_append, record_remove, record_set, Headers};

/// A response the worker sends instead of calling the upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Response {
    /// The HTTP status code, from 100 to 599.
    pub status: u16,
    /// The response headers, in order.
    pub headers: Headers,
    /// The response body.
    pub body: Vec<u8>,
}

impl Response {
    /// Creates a response with `status`, no headers and an empty body.
    pub fn new(status: u16) -> Self {
        Self {
            status,
            headers: Headers::new(),
            body: Vec::new(),
        }
    }

    /// Creates a response whose body is `value` as JSON, with the header
    /// `content-type: application/json`.
    ///
    /// If `value` cannot be serialized (a map with non-string keys, or a
    /// `Serialize` impl that fails), this logs an error and returns a 500
    /// response with the body
    /// `{"error":"response_serialize_failed","message":"..."}` instead.
    pub fn json(status: u16, value: &impl Serialize) -> Self {
        match serde_json::to_vec(value) {
            Ok(body) => Self::new(status)
                .header("content-type", "application/json")
                .body(body),
            Err(error) => {
                let message = format!("failed to serialize the JSON response body: {error}");
                crate::log::error(&message);
                let body = serde_json::json!({
                    "error": "response_serialize_failed",
                    "message": message,
                });
                Self::new(500)
                    .header("content-type", "application/json")
                    .body(body.to_string())
            }
        }
    }

    /// Adds a header, keeping earlier values of the same name. The name is
    /// stored lower-case.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }
}

/// The upstream's response status and headers, given to the response hook.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResponseHead {
    /// The HTTP status code from the upstream.
    pub status: u16,
    /// The upstream's response headers.
    pub headers: Headers,
}

impl ResponseHead {
    /// Returns the first value of the header `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }
}

/// Changes to the response headers that the host applies before sending the
/// response on.
///
/// Header names are stored lower-case, and for each name the last call wins,
/// as with [`RequestChanges`](crate::RequestChanges).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct ResponseChanges {
    /// Headers to set, each replacing every earlier value of the same name.
    pub set_headers: Vec<(String, String)>,
    /// Names of headers to remove.
    pub remove_headers: Vec<String>,
}

impl ResponseChanges {
    /// Creates an empty set of changes.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the header `name` to `value`, replacing every earlier value.
    pub fn set_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        record_set(
            &mut self.set_headers,
            &mut self.remove_headers,
            name.into(),
            value.into(),
        );
        self
    }

    /// Removes every value of the header `name`.
    pub fn remove_header(mut self, name: impl Into<String>) -> Self {
        record_remove(&mut self.set_headers, &mut self.remove_headers, name.into());
        self
    }

    /// Adds a value for the header `name`, keeping the values these changes
    /// already set for it. Together they still replace the upstream's
    /// values, so to add a `set-cookie` beside the upstream's own, append
    /// each of the upstream's values first.
    pub fn append_header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        record_append(
            &mut self.set_headers,
            &mut self.remove_headers,
            name.into(),
            value.into(),
        );
        self
    }

    /// Returns `true` when these changes change nothing.
    pub fn is_empty(&self) -> bool {
        self.set_headers.is_empty() && self.remove_headers.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::log::Level;

    #[test]
    fn response_builder_sets_fields() {
        let response = Response::new(403)
            .header("X-Reason", "blocked")
            .header("x-reason", "again")
            .body("no");
        assert_eq!(response.status, 403);
        assert_eq!(
            response.headers.get_all("x-reason").collect::<Vec<_>>(),
            ["blocked", "again"]
        );
        assert_eq!(response.body, b"no");
    }

    #[test]
    fn json_sets_content_type_and_body() {
        let response = Response::json(404, &serde_json::json!({ "error": "no_route" }));
        assert_eq!(response.status, 404);
        assert_eq!(
            response.headers.get("content-type"),
            Some("application/json")
        );
        assert_eq!(response.body, br#"{"error":"no_route"}"#);
    }

    #[test]
    fn json_serialize_failure_is_500() {
        let mut map = BTreeMap::new();
        map.insert((1, 2), "value");
        let response = Response::json(200, &map);
        assert_eq!(response.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "response_serialize_failed");
        let logs = crate::testing::take_logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].0, Level::Error);
    }

    #[test]
    fn response_changes_last_call_wins() {
        let changes = ResponseChanges::new()
            .set_header("Server", "edge")
            .remove_header("x-powered-by")
            .set_header("server", "edge-2");
        assert_eq!(
            changes.set_headers,
            [("server".to_string(), "edge-2".to_string())]
        );
        assert_eq!(changes.remove_headers, ["x-powered-by"]);
        assert!(!changes.is_empty());
    }

    #[test]
    fn append_header_keeps_earlier_values() {
        let changes = ResponseChanges::new()
            .remove_header("set-cookie")
            .append_header("Set-Cookie", "a=1")
            .append_header("set-cookie", "b=2");
        assert_eq!(
            changes.set_headers,
            [
                ("set-cookie".to_string(), "a=1".to_string()),
                ("set-cookie".to_string(), "b=2".to_string()),
            ]
        );
        assert!(changes.remove_headers.is_empty());
        let replaced = changes.set_header("set-cookie", "c=3");
        assert_eq!(
            replaced.set_headers,
            [("set-cookie".to_string(), "c=3".to_string())]
        );
    }

    #[test]
    fn response_head_header_ignores_case() {
        let head = ResponseHead {
            status: 200,
            headers: [("content-type", "text/html")].into_iter().collect(),
        };
        assert_eq!(head.header("Content-Type"), Some("text/html"));
    }
}
