//! Requests from the worker to upstreams of the node, sent in parallel by
//! the host.
//!
//! A worker names an upstream declared in the node's config, never an
//! address, and reaches only the upstreams that its route entry lists:
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/my-worker.wasm"
//! fetch = ["recommendations", "billing"]
//! ```
//!
//! [`send`] takes every request at once. The host sends them concurrently,
//! over the same connections, load balancing and circuit breakers as the
//! requests it proxies. It returns when each has a response or has timed
//! out, so a call takes about as long as its slowest request, not the sum.
//! The time spent waiting does not count against the worker's CPU deadline.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! use edge_sdk::fetch::{self, Request};
//!
//! let results = fetch::send(vec![
//!     Request::get("recommendations", "/rows?user=7").timeout(Duration::from_millis(200)),
//!     Request::get("billing", "/status?user=7").timeout(Duration::from_millis(100)),
//! ]);
//! for result in results {
//!     match result {
//!         Ok(response) if response.status == 200 => { /* use response.body */ }
//!         Ok(response) => edge_sdk::log::warn(&format!("status {}", response.status)),
//!         Err(error) => edge_sdk::log::warn(&format!("fetch failed: {error}")),
//!     }
//! }
//! ```
//!
//! The host adds the incoming request's `X-Request-Id` and its own `Via` to
//! each request, and sends the upstream's name as `Host` unless the request
//! sets one. Hop-by-hop headers and `Content-Length` are dropped.
//!
//! On targets other than `wasm32`, for native unit tests, [`send`] passes each
//! request to the handler that `testing::on_fetch` sets.

use std::fmt;
use std::time::Duration;

use serde::de::DeserializeOwned;

use crate::headers::Headers;

/// A request to an upstream.
#[derive(Debug, Clone, PartialEq, Eq)]
#[must_use]
pub struct Request {
    /// The name of an upstream in the node's config, which the route entry's
    /// `fetch` list must name.
    pub upstream: String,
    /// The method, such as `GET`.
    pub method: String,
    /// The path and query, such as `/rows?limit=10`; it must start with `/`.
    pub path: String,
    /// The request headers.
    pub headers: Headers,
    /// The request body; empty for none.
    pub body: Vec<u8>,
    /// The time allowed for the whole exchange; `None` for the node's
    /// default. The node's maximum caps it, and it is sent in whole
    /// milliseconds.
    pub timeout: Option<Duration>,
}

impl Request {
    /// Creates a request with `method` to `path` on `upstream`, without
    /// headers or body.
    pub fn new(
        method: impl Into<String>,
        upstream: impl Into<String>,
        path: impl Into<String>,
    ) -> Self {
        Self {
            upstream: upstream.into(),
            method: method.into(),
            path: path.into(),
            headers: Headers::new(),
            body: Vec::new(),
            timeout: None,
        }
    }

    /// Creates a `GET` request to `path` on `upstream`.
    pub fn get(upstream: impl Into<String>, path: impl Into<String>) -> Self {
        Self::new("GET", upstream, path)
    }

    /// Adds a header, keeping earlier values of the same name.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.headers.append(name, value);
        self
    }

    /// Replaces the body.
    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    /// Sets the time allowed for the whole exchange.
    pub fn timeout(mut self, timeout: Duration) -> Self {
        self.timeout = Some(timeout);
        self
    }
}

/// An upstream's response, read whole. Every status is a response: a 500
/// from the upstream is `Ok` with status 500.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The HTTP status code.
    pub status: u16,
    /// The response headers, without hop-by-hop headers.
    pub headers: Headers,
    /// The whole response body.
    pub body: Vec<u8>,
}

impl Response {
    /// Returns the first value of the header `name`, ignoring ASCII case.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name)
    }

    /// Returns `true` for a status from 200 to 299.
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }

    /// Deserializes the body as JSON into `T`.
    ///
    /// # Errors
    ///
    /// Returns serde's error when the body is not JSON of that shape.
    pub fn json<T: DeserializeOwned>(&self) -> Result<T, serde_json::Error> {
        serde_json::from_slice(&self.body)
    }
}

/// The reason a request got no response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// The route entry's `fetch` list does not name the upstream, or no
    /// upstream has that name. Nothing was sent.
    NotAllowed,
    /// The exchange did not finish within the request's timeout.
    TimedOut,
    /// No response could be had, for the cause the code names: `upstream_unavailable`
    /// (the connection failed or broke), `circuit_open` (every target's
    /// breaker is open) or `no_healthy_upstream`.
    Unavailable(String),
    /// The response body is larger than the node's cap, in bytes.
    ResponseTooLarge(u64),
    /// The request is invalid, or over the node's cap on requests per call
    /// or per worker call. Nothing was sent.
    InvalidRequest(String),
}

impl fmt::Display for FetchError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FetchError::NotAllowed => f.write_str("the route does not allow this upstream"),
            FetchError::TimedOut => f.write_str("timed out"),
            FetchError::Unavailable(code) => write!(f, "upstream unavailable: {code}"),
            FetchError::ResponseTooLarge(cap) => {
                write!(f, "response body larger than the cap of {cap} bytes")
            }
            FetchError::InvalidRequest(reason) => write!(f, "invalid request: {reason}"),
        }
    }
}

impl std::error::Error for FetchError {}

/// Sends every request at once and returns one result per request, in the
/// same order, when each has a response or has timed out.
pub fn send(requests: Vec<Request>) -> Vec<Result<Response, FetchError>> {
    #[cfg(target_arch = "wasm32")]
    return wasm::send(requests);

    #[cfg(not(target_arch = "wasm32"))]
    return requests.into_iter().map(crate::testing::fetch).collect();
}

/// Returns whether the worker's entry may send requests to the upstream
/// `upstream`: its `fetch` list names it. Check the upstreams a config names
/// in [`Worker::check_config`](crate::Worker::check_config), so that a missing
/// entry stops the node at load instead of failing every request.
pub fn allowed(upstream: &str) -> bool {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::fetch::allowed(upstream);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::fetch_allowed(upstream);
}

/// Milliseconds of a timeout, saturating at `u32::MAX` (about 49 days).
#[cfg(any(target_arch = "wasm32", test))]
fn timeout_ms(timeout: Duration) -> u32 {
    u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX)
}

#[cfg(target_arch = "wasm32")]
mod wasm {
    use super::{timeout_ms, FetchError, Request, Response};
    use crate::bindings::edge::worker::fetch as wit;
    use crate::bindings::edge::worker::types::Header;
    use crate::headers::Headers;

    pub(super) fn send(requests: Vec<Request>) -> Vec<Result<Response, FetchError>> {
        let requests = requests.into_iter().map(to_wit).collect::<Vec<_>>();
        wit::send(&requests)
            .into_iter()
            .map(|result| result.map(from_wit).map_err(error_from_wit))
            .collect()
    }

    fn to_wit(request: Request) -> wit::OutgoingRequest {
        wit::OutgoingRequest {
            upstream: request.upstream,
            method: request.method,
            path_and_query: request.path,
            headers: request
                .headers
                .into_pairs()
                .into_iter()
                .map(|(name, value)| Header { name, value })
                .collect(),
            body: request.body,
            timeout_ms: request.timeout.map(timeout_ms),
        }
    }

    fn from_wit(response: wit::IncomingResponse) -> Response {
        Response {
            status: response.status,
            headers: Headers::from_pairs(
                response
                    .headers
                    .into_iter()
                    .map(|header| (header.name, header.value))
                    .collect(),
            ),
            body: response.body,
        }
    }

    fn error_from_wit(error: wit::FetchError) -> FetchError {
        match error {
            wit::FetchError::NotAllowed => FetchError::NotAllowed,
            wit::FetchError::TimedOut => FetchError::TimedOut,
            wit::FetchError::Unavailable(code) => FetchError::Unavailable(code),
            wit::FetchError::ResponseTooLarge(cap) => FetchError::ResponseTooLarge(cap),
            wit::FetchError::InvalidRequest(reason) => FetchError::InvalidRequest(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing;

    #[test]
    fn request_builder_sets_fields() {
        let request = Request::new("POST", "billing", "/charge")
            .header("Content-Type", "application/json")
            .body("{}")
            .timeout(Duration::from_millis(250));
        assert_eq!(request.method, "POST");
        assert_eq!(request.upstream, "billing");
        assert_eq!(request.path, "/charge");
        assert_eq!(
            request.headers.get("content-type"),
            Some("application/json")
        );
        assert_eq!(request.body, b"{}");
        assert_eq!(request.timeout, Some(Duration::from_millis(250)));
    }

    #[test]
    fn timeout_ms_saturates() {
        assert_eq!(timeout_ms(Duration::from_millis(1500)), 1500);
        assert_eq!(timeout_ms(Duration::from_secs(u64::MAX)), u32::MAX);
    }

    #[test]
    fn send_keeps_order_with_test_handler() {
        testing::on_fetch(|request| match request.upstream.as_str() {
            "rows" => Ok(Response {
                status: 200,
                headers: Headers::new(),
                body: br#"{"n":1}"#.to_vec(),
            }),
            _ => Err(FetchError::NotAllowed),
        });
        let results = send(vec![
            Request::get("other", "/"),
            Request::get("rows", "/rows"),
        ]);
        assert_eq!(results[0], Err(FetchError::NotAllowed));
        let response = results[1].as_ref().unwrap();
        assert!(response.is_success());
        let value: serde_json::Value = response.json().unwrap();
        assert_eq!(value["n"], 1);
    }

    #[test]
    fn send_without_handler_is_not_allowed() {
        let results = send(vec![Request::get("rows", "/rows")]);
        assert_eq!(results, [Err(FetchError::NotAllowed)]);
    }

    #[test]
    fn error_display_names_cause() {
        let unavailable = FetchError::Unavailable("circuit_open".to_string());
        assert_eq!(
            unavailable.to_string(),
            "upstream unavailable: circuit_open"
        );
        assert_eq!(
            FetchError::ResponseTooLarge(1024).to_string(),
            "response body larger than the cap of 1024 bytes"
        );
    }
}
