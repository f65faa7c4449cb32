//! Refusals: every way the node can fail a request, and the one place that
//! turns each into a status, a JSON body and headers.

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_TYPE, RETRY_AFTER};
use http::{HeaderValue, Response, StatusCode};

use crate::proxy::ResponseBody;

/// The origin of a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The client sent something the node rejects.
    Client,
    /// A worker failed, timed out or made an invalid decision.
    Worker,
    /// The upstream could not be reached or was too slow.
    Upstream,
    /// The node itself: config or capacity.
    Host,
}

/// A rejection the node sends itself, with an error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// No route matches the host, method and path.
    NoRoute,
    /// The path has malformed escapes, an encoded slash or invalid UTF-8.
    InvalidPath(String),
    /// The request has no `Host`, several, or an invalid one.
    InvalidHost(String),
    /// The method has lower-case letters. Methods are case-sensitive, and
    /// an upstream that upper-cases `delete` would run a route the node
    /// never matched.
    InvalidMethod(String),
    /// The client's body broke off or had invalid chunked framing.
    InvalidBody,
    /// The client sent its body too slowly: it was still arriving when the
    /// upstream's response timeout passed.
    BodyTimeout,
    /// The request body uses a transfer coding other than chunked.
    UnsupportedTransferCoding(String),
    /// A CONNECT request. The node opens no CONNECT tunnels.
    UnsupportedMethod(String),
    /// A request to switch protocols that the route does not carry:
    /// WebSocket on a route without `websocket = true`, or a protocol other
    /// than WebSocket on a route with it.
    UnsupportedUpgrade {
        protocol: String,
        route_has_websocket: bool,
    },
    /// A WebSocket handshake that RFC 6455 (section 4.1) does not allow,
    /// such as one with a body or without `Connection: upgrade`.
    InvalidUpgrade(String),
    /// The body is larger than the route allows.
    BodyTooLarge { limit: u64 },
    /// The request sends the header a rate limit keys on more than once, so
    /// the limit cannot tell which value to count.
    RepeatedKeyHeader { limit: Arc<str>, header: String },
    /// The route has no upstream and no worker chose one.
    NoUpstream,
    /// Connecting to the upstream failed, the connection broke, or the
    /// response was invalid.
    UpstreamUnavailable { upstream: String },
    /// The upstream did not connect or respond in time.
    UpstreamTimeout { upstream: String },
    /// Every breaker of the upstream's healthy targets is open.
    CircuitOpen { upstream: String, retry_after: u64 },
    /// Every target of the upstream fails its health checks or is ejected.
    NoHealthyUpstream { upstream: String, retry_after: u64 },
    /// The chosen target had `max_requests_per_target` requests in flight
    /// for the upstream's whole `queue_timeout`.
    UpstreamBusy { upstream: String },
    /// A worker trapped, panicked, ran out of memory or decided something
    /// invalid.
    WorkerFailed,
    /// A worker ran past its CPU deadline.
    WorkerTimeout,
    /// No worker instance became free in time.
    WorkerBusy,
    /// A rate limit of the route refused the request.
    RateLimited {
        limit: Arc<str>,
        /// Whole seconds until a request would be admitted.
        retry_after: u64,
    },
    /// A global rate limit set to `fail_closed` could not reach Redis.
    RateLimitUnavailable { limit: Arc<str> },
    /// A request whose `Via` names this node, so it passed through the node
    /// before. Sending it on would repeat the loop until a limit runs out.
    LoopDetected,
}

impl Refusal {
    /// The status code sent to the client.
    pub fn status(&self) -> StatusCode {
        match self {
            Refusal::NoRoute => StatusCode::NOT_FOUND,
            Refusal::InvalidPath(_)
            | Refusal::InvalidHost(_)
            | Refusal::InvalidMethod(_)
            | Refusal::InvalidBody
            | Refusal::InvalidUpgrade(_)
            | Refusal::RepeatedKeyHeader { .. } => StatusCode::BAD_REQUEST,
            Refusal::BodyTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Refusal::BodyTimeout => StatusCode::REQUEST_TIMEOUT,
            Refusal::UnsupportedTransferCoding(_)
            | Refusal::UnsupportedMethod(_)
            | Refusal::UnsupportedUpgrade { .. } => StatusCode::NOT_IMPLEMENTED,
            Refusal::NoUpstream | Refusal::WorkerFailed => StatusCode::INTERNAL_SERVER_ERROR,
            Refusal::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
            Refusal::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            Refusal::WorkerTimeout
            | Refusal::WorkerBusy
            | Refusal::RateLimitUnavailable { .. }
            | Refusal::CircuitOpen { .. }
            | Refusal::NoHealthyUpstream { .. }
            | Refusal::UpstreamBusy { .. } => StatusCode::SERVICE_UNAVAILABLE,
            Refusal::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Refusal::LoopDetected => StatusCode::LOOP_DETECTED,
        }
    }

    /// The stable machine-readable code in the body's `error` field.
    pub fn code(&self) -> &'static str {
        match self {
            Refusal::NoRoute => "no_route",
            Refusal::InvalidPath(_) => "invalid_path",
            Refusal::InvalidHost(_) => "invalid_host",
            Refusal::InvalidMethod(_) => "invalid_method",
            Refusal::InvalidBody => "invalid_body",
            Refusal::BodyTooLarge { .. } => "body_too_large",
            Refusal::RepeatedKeyHeader { .. } => "repeated_key_header",
            Refusal::BodyTimeout => "body_timeout",
            Refusal::UnsupportedTransferCoding(_) => "unsupported_transfer_coding",
            Refusal::UnsupportedMethod(_) => "unsupported_method",
            Refusal::UnsupportedUpgrade { .. } => "unsupported_upgrade",
            Refusal::InvalidUpgrade(_) => "invalid_upgrade",
            Refusal::NoUpstream => "no_upstream",
            Refusal::UpstreamUnavailable { .. } => "upstream_unavailable",
            Refusal::UpstreamTimeout { .. } => "upstream_timeout",
            Refusal::CircuitOpen { .. } => "circuit_open",
            Refusal::NoHealthyUpstream { .. } => "no_healthy_upstream",
            Refusal::UpstreamBusy { .. } => "upstream_busy",
            Refusal::WorkerFailed => "worker_failed",
            Refusal::WorkerTimeout => "worker_timeout",
            Refusal::WorkerBusy => "worker_busy",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::RateLimitUnavailable { .. } => "ratelimit_unavailable",
            Refusal::LoopDetected => "loop_detected",
        }
    }

    /// Where the failure came from.
    pub fn source(&self) -> Source {
        match self {
            Refusal::NoRoute
            | Refusal::InvalidPath(_)
            | Refusal::InvalidHost(_)
            | Refusal::InvalidMethod(_)
            | Refusal::InvalidBody
            | Refusal::BodyTooLarge { .. }
            | Refusal::RepeatedKeyHeader { .. }
            | Refusal::BodyTimeout
            | Refusal::UnsupportedTransferCoding(_)
            | Refusal::UnsupportedMethod(_)
            | Refusal::UnsupportedUpgrade { .. }
            | Refusal::InvalidUpgrade(_)
            | Refusal::RateLimited { .. } => Source::Client,
            Refusal::WorkerFailed | Refusal::WorkerTimeout => Source::Worker,
            Refusal::UpstreamUnavailable { .. }
            | Refusal::UpstreamTimeout { .. }
            | Refusal::CircuitOpen { .. }
            | Refusal::NoHealthyUpstream { .. }
            | Refusal::UpstreamBusy { .. } => Source::Upstream,
            Refusal::NoUpstream
            | Refusal::WorkerBusy
            | Refusal::RateLimitUnavailable { .. }
            | Refusal::LoopDetected => Source::Host,
        }
    }

    /// A sentence for the client. It names no internal detail beyond the
    /// upstream's name; the log line carries the cause.
    pub fn message(&self) -> String {
        match self {
            Refusal::NoRoute => "no route matches this request".to_owned(),
            Refusal::InvalidPath(reason) => format!("invalid request path: {reason}"),
            Refusal::InvalidHost(reason) => format!("invalid Host: {reason}"),
            Refusal::InvalidMethod(method) => format!(
                "invalid method {method:?}: methods are case-sensitive and this node accepts \
                 only upper-case ones, such as {:?}",
                method.to_ascii_uppercase()
            ),
            Refusal::InvalidBody => {
                "the request body broke off or has invalid chunked framing".to_owned()
            }
            Refusal::UnsupportedTransferCoding(coding) => {
                format!("the transfer coding {coding:?} is not supported; send the body chunked or with a Content-Length")
            }
            Refusal::UnsupportedMethod(method) => {
                format!("the method {method} is not supported: this node proxies requests and opens no CONNECT tunnels; WebSocket needs HTTP/1.1 and `Upgrade: websocket`")
            }
            Refusal::UnsupportedUpgrade {
                protocol,
                route_has_websocket: false,
            } => {
                format!("switching to {protocol:?} is not enabled on this route: its config needs `websocket = true`")
            }
            Refusal::UnsupportedUpgrade {
                protocol,
                route_has_websocket: true,
            } => {
                format!(
                    "switching to {protocol:?} is not supported: this route carries WebSocket only"
                )
            }
            Refusal::InvalidUpgrade(reason) => reason.clone(),
            Refusal::BodyTimeout => {
                "the request body arrived too slowly; the upstream's response timeout or the \
                 route's timeout passed"
                    .to_owned()
            }
            Refusal::BodyTooLarge { limit } => {
                format!("the request body is larger than this route's limit of {limit} bytes")
            }
            Refusal::RepeatedKeyHeader { limit, header } => {
                format!("the header {header} appears more than once; rate limit {limit:?} counts requests by it, so send it once")
            }
            Refusal::NoUpstream => "this route has no upstream and no worker chose one".to_owned(),
            Refusal::UpstreamUnavailable { upstream } => {
                format!("upstream {upstream} could not be reached or sent an invalid response")
            }
            Refusal::UpstreamTimeout { upstream } => {
                format!("upstream {upstream} did not answer in time")
            }
            Refusal::CircuitOpen { upstream, .. } => {
                format!("upstream {upstream} is failing; its circuit breakers are open")
            }
            Refusal::NoHealthyUpstream { upstream, .. } => {
                format!("upstream {upstream} has no healthy target")
            }
            Refusal::UpstreamBusy { upstream } => {
                format!("upstream {upstream} has its maximum of requests in flight; retry shortly")
            }
            Refusal::WorkerFailed => "a worker on this route failed".to_owned(),
            Refusal::WorkerTimeout => "a worker on this route ran past its CPU deadline".to_owned(),
            Refusal::WorkerBusy => "all worker instances are busy; retry shortly".to_owned(),
            Refusal::RateLimited { limit, retry_after } => {
                format!("rate limit {limit:?} exceeded; retry in {retry_after} s")
            }
            Refusal::RateLimitUnavailable { limit } => {
                format!("rate limit {limit:?} cannot be checked right now; retry shortly")
            }
            Refusal::LoopDetected => "this request passed through this node before (its Via \
                                      names the node), so it is not sent on again"
                .to_owned(),
        }
    }

    /// Seconds the client should wait before retrying, for 429s and 503s.
    fn retry_after(&self) -> Option<u64> {
        match self {
            Refusal::WorkerBusy
            | Refusal::WorkerTimeout
            | Refusal::RateLimitUnavailable { .. }
            | Refusal::UpstreamBusy { .. } => Some(1),
            Refusal::RateLimited { retry_after, .. }
            | Refusal::CircuitOpen { retry_after, .. }
            | Refusal::NoHealthyUpstream { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Builds the response: the status, `{"error": code, "message": ...}`
    /// (with `limit` and `retry_after` for rate limits) and `Retry-After`
    /// where it applies.
    pub fn to_response(&self) -> Response<ResponseBody> {
        let mut body = serde_json::json!({ "error": self.code(), "message": self.message() });
        match self {
            Refusal::RateLimited { limit, retry_after } => {
                body["limit"] = serde_json::Value::from(&**limit);
                body["retry_after"] = serde_json::Value::from(*retry_after);
            }
            Refusal::RateLimitUnavailable { limit } | Refusal::RepeatedKeyHeader { limit, .. } => {
                body["limit"] = serde_json::Value::from(&**limit);
            }
            _ => {}
        }
        let mut response = Response::new(ResponseBody::full(Bytes::from(body.to_string())));
        *response.status_mut() = self.status();
        let headers = response.headers_mut();
        headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if let Some(seconds) = self.retry_after() {
            headers.insert(RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}
