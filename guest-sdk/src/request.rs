//! The request a worker receives and the changes it can make to it.

use crate::headers::{record_remove, record_set, Headers};

/// The request passed to the worker's hooks, after routing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Request {
    /// The method in upper case, such as `GET`.
    pub method: String,
    /// The path after percent-decoding and dot-segment removal. The route
    /// matched this path, and the upstream receives it unless a worker
    /// changes it.
    pub path: String,
    /// The query string without the leading `?`, if the URL had one.
    pub query: Option<String>,
    /// The request headers, including changes made by earlier workers.
    pub headers: Headers,
    /// The client's IP address as text, such as `203.0.113.7` or `::1`.
    pub client_addr: String,
    /// The name of the route that matched.
    pub route: String,
    /// Values of the named segments of the route's path pattern, such as
    /// `device` for the pattern `/{device}/home`, in pattern order.
    pub params: Vec<(String, String)>,
}

impl Request {
    /// Returns the first value of the header `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Returns the value of the route's path parameter `name`.
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(param_name, _)| param_name == name)
            .map(|(_, value)| value.as_str())
    }
}

/// Changes to the request that the host applies before the next worker or the
/// upstream.
///
/// Header names are stored lower-case. For each name the last call wins: a
/// `set_header` replaces an earlier `set_header` or `remove_header` of the
/// same name, and a `remove_header` cancels an earlier `set_header`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
#[must_use]
pub struct RequestChanges {
    /// Headers to set, each replacing every earlier value of the same name.
    pub set_headers: Vec<(String, String)>,
    /// Names of headers to remove.
    pub remove_headers: Vec<String>,
    /// A new path for the request, starting with `/`.
    pub path: Option<String>,
}

impl RequestChanges {
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

    /// Replaces the path sent on. It must start with `/`, which the SDK does
    /// not check.
    pub fn path(mut self, path: impl Into<String>) -> Self {
        self.path = Some(path.into());
        self
    }

    /// Returns `true` when these changes change nothing.
    pub fn is_empty(&self) -> bool {
        self.set_headers.is_empty() && self.remove_headers.is_empty() && self.path.is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_request() -> Request {
        Request {
            method: "GET".to_string(),
            path: "/users/7".to_string(),
            headers: [("x-api-key", "k1")].into_iter().collect(),
            params: vec![("id".to_string(), "7".to_string())],
            ..Request::default()
        }
    }

    #[test]
    fn request_header_ignores_case() {
        let request = sample_request();
        assert_eq!(request.header("X-Api-Key"), Some("k1"));
        assert_eq!(request.header("x-missing"), None);
    }

    #[test]
    fn request_param_by_name() {
        let request = sample_request();
        assert_eq!(request.param("id"), Some("7"));
        assert_eq!(request.param("ID"), None);
    }

    #[test]
    fn set_header_lowercases_and_replaces() {
        let changes = RequestChanges::new()
            .set_header("X-Tenant", "a")
            .set_header("x-tenant", "b");
        assert_eq!(
            changes.set_headers,
            [("x-tenant".to_string(), "b".to_string())]
        );
    }

    #[test]
    fn remove_header_cancels_set() {
        let changes = RequestChanges::new()
            .set_header("x-debug", "1")
            .remove_header("X-Debug");
        assert!(changes.set_headers.is_empty());
        assert_eq!(changes.remove_headers, ["x-debug"]);
    }

    #[test]
    fn set_header_cancels_remove() {
        let changes = RequestChanges::new()
            .remove_header("x-debug")
            .remove_header("x-debug")
            .set_header("x-debug", "1");
        assert!(changes.remove_headers.is_empty());
        assert_eq!(changes.set_headers.len(), 1);
    }

    #[test]
    fn path_sets_new_path() {
        let changes = RequestChanges::new().path("/v2/users");
        assert_eq!(changes.path.as_deref(), Some("/v2/users"));
        assert!(!changes.is_empty());
        assert!(RequestChanges::new().is_empty());
    }
}
