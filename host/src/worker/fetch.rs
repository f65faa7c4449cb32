//! The host side of the `fetch` import: requests from a worker to the
//! upstreams its route entry allows. They go out at once over the node's
//! upstream client, so they share its connection pools, balancing, circuit
//! breakers, retries and health with proxied requests.
//!
//! A worker names upstreams, never addresses. Every request of one `send`
//! call runs concurrently on the calling thread, and the call returns when
//! each has a response or has timed out. The time the guest waits here is
//! not charged to its CPU deadline (see [`FetchState::waited`]).
//!
//! Each request carries the incoming request's `X-Request-Id` and a
//! `traceparent` in its trace, and counts in the route's
//! `edge_upstream_duration_seconds` as a proxied call does.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Uri};
use http_body_util::BodyExt as _;

use super::bindings::edge::worker::fetch::{FetchError, IncomingResponse, OutgoingRequest};
use super::wit;
use crate::error::Refusal;
use crate::metrics::RouteMetrics;
use crate::pipeline::remove_hop_by_hop;
use crate::proxy::{BodyTimedOut, PooledBody, RequestBody, Upstream};
use crate::trace::{
    new_span_id, AttributeValue, SpanClock, SpanKind, SpanQueue, SpanRecord, TraceContext,
};

/// The result of one request, as the guest receives it.
pub type FetchResult = Result<IncomingResponse, FetchError>;

/// The header that carries the incoming request's id to the upstreams.
static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Node-wide limits on fetches, from `[runtime.fetch]`.
#[derive(Debug, Clone)]
pub struct FetchLimits {
    /// The timeout of a request that sets none.
    pub default_timeout: Duration,
    /// The maximum timeout a request may set.
    pub max_timeout: Duration,
    /// The largest response body, in bytes.
    pub max_response_body: u64,
    /// Requests in one `send` call.
    pub max_requests_per_call: usize,
    /// Requests one hook call may send over all its `send` calls.
    pub max_requests_per_hook: usize,
    /// The total time one hook call may wait in its `send` calls.
    pub max_wait_per_hook: Duration,
}

/// The fetch access of one worker binding: the node's upstreams, the names
/// its route entry allows, and the node's limits.
pub struct FetchAccess {
    upstreams: Arc<[Upstream]>,
    /// Allowed upstream names and their index in `upstreams`.
    allowed: HashMap<String, usize>,
    limits: FetchLimits,
    /// The node's `Via` value, added to every request.
    via: HeaderValue,
}

impl std::fmt::Debug for FetchAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FetchAccess")
            .field("allowed", &self.allowed.keys().collect::<Vec<_>>())
            .field("limits", &self.limits)
            .finish_non_exhaustive()
    }
}

impl FetchAccess {
    /// Returns whether requests to the upstream `name` are allowed.
    pub fn allows(&self, name: &str) -> bool {
        self.allowed.contains_key(name)
    }

    /// Grants access to the upstreams named in `allowed`; names that are not
    /// upstreams are skipped (config validation rejects them).
    pub fn new(
        upstreams: Arc<[Upstream]>,
        allowed: &[String],
        limits: FetchLimits,
        via: HeaderValue,
    ) -> FetchAccess {
        let allowed = allowed
            .iter()
            .filter_map(|name| {
                let index = upstreams.iter().position(|u| u.name == *name)?;
                Some((name.clone(), index))
            })
            .collect();
        FetchAccess {
            upstreams,
            allowed,
            limits,
            via,
        }
    }
}

/// The request identity that the fetches of one hook call carry. The
/// default carries nothing, and then the client's `X-Request-Id`, when it
/// sent one, is still passed on.
#[derive(Debug, Clone, Default)]
pub struct FetchOrigin {
    /// The request's id, whether the client sent it or the node made it.
    pub request_id: Option<HeaderValue>,
    /// The request's trace, and the span of the worker call that fetches.
    pub trace: Option<FetchTrace>,
    /// The route's metrics, when request metrics are on.
    pub metrics: Option<Arc<RouteMetrics>>,
    /// The client's address, which saves parsing the request's
    /// `client-addr` text again.
    pub client_ip: Option<IpAddr>,
}

/// The trace a worker's fetches belong to.
#[derive(Debug, Clone)]
pub struct FetchTrace {
    pub context: TraceContext,
    /// The span of the worker call, the parent of each fetch's span.
    pub parent: [u8; 8],
    /// The span queue and the request's clock, when the node exports spans.
    pub export: Option<(SpanQueue, SpanClock)>,
}

/// The fetch state of one hook call.
#[derive(Debug, Default)]
pub struct FetchState {
    /// The incoming request's `X-Request-Id`; `None` when it has none, or
    /// for the `hooks` call, which runs at load without a request.
    request_id: Option<HeaderValue>,
    trace: Option<FetchTrace>,
    metrics: Option<Arc<RouteMetrics>>,
    /// The client's address, the key of a `client_ip` consistent hash.
    client_ip: Option<IpAddr>,
    /// Whether a request is being handled; `hooks` may not fetch.
    in_request: bool,
    /// Requests sent so far in this hook call.
    sent: usize,
    /// Time spent waiting in `send`. The CPU deadline does not count it.
    pub waited: Duration,
}

impl FetchState {
    /// Prepares the state of a hook call on `request`. The id in `origin`
    /// wins over an `X-Request-Id` header the client sent.
    pub fn for_request(request: &wit::Request, origin: FetchOrigin) -> FetchState {
        let request_id = origin.request_id.or_else(|| {
            request
                .headers
                .iter()
                .find(|h| h.name.eq_ignore_ascii_case(X_REQUEST_ID.as_str()))
                .and_then(|h| HeaderValue::from_str(&h.value).ok())
        });
        FetchState {
            request_id,
            trace: origin.trace,
            metrics: origin.metrics,
            client_ip: origin
                .client_ip
                .or_else(|| request.client_addr.parse().ok()),
            in_request: true,
            sent: 0,
            waited: Duration::ZERO,
        }
    }

    /// Sends `requests` at once over `access` and returns their results in
    /// order, once each has a response or has timed out.
    pub async fn send(
        &mut self,
        access: Option<&FetchAccess>,
        requests: Vec<OutgoingRequest>,
    ) -> Vec<FetchResult> {
        let Some(access) = access.filter(|_| self.in_request) else {
            let reason = if self.in_request {
                "the route entry of this worker has no `fetch` list"
            } else {
                "fetch is only available while a request is handled, not in `hooks`"
            };
            tracing::debug!(reason, "rejected a worker's fetch");
            return requests
                .iter()
                .map(|_| Err(FetchError::NotAllowed))
                .collect();
        };
        let limits = &access.limits;
        // Each request's timeout is cut to the hook's wait left, so this
        // call cannot wait past it.
        let wait_left = limits.max_wait_per_hook.saturating_sub(self.waited);
        let mut planned = Vec::with_capacity(requests.len());
        for (index, request) in requests.into_iter().enumerate() {
            let plan = if index >= limits.max_requests_per_call {
                Err(FetchError::InvalidRequest(format!(
                    "over the limit of {} requests per fetch call",
                    limits.max_requests_per_call
                )))
            } else if self.sent >= limits.max_requests_per_hook {
                Err(FetchError::InvalidRequest(format!(
                    "over the limit of {} requests per worker call",
                    limits.max_requests_per_hook
                )))
            } else if wait_left.is_zero() {
                Err(FetchError::InvalidRequest(format!(
                    "over the limit of {} of waiting per worker call",
                    humantime::format_duration(limits.max_wait_per_hook)
                )))
            } else {
                let span_id = new_span_id();
                let trace = self.trace.as_ref().map(|trace| (&trace.context, span_id));
                access
                    .prepare(request, self.request_id.as_ref(), trace)
                    .map(|mut plan| {
                        plan.timeout = plan.timeout.min(wait_left);
                        plan
                    })
            };
            if plan.is_ok() {
                self.sent += 1;
            }
            planned.push(plan);
        }
        let client_ip = self.client_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let started = Instant::now();
        let record = Recorder {
            metrics: self.metrics.as_deref(),
            trace: self.trace.as_ref(),
        };
        let results = join_all(planned.into_iter().map(|plan| async move {
            match plan {
                Ok(plan) => access.exchange(plan, client_ip, record).await,
                Err(error) => Err(error),
            }
        }))
        .await;
        self.waited += started.elapsed();
        results
    }
}

/// A checked request, ready to send.
struct Planned {
    upstream: usize,
    request: Request<RequestBody>,
    timeout: Duration,
    /// The span id sent in `traceparent`, when the request has a trace.
    span_id: Option<[u8; 8]>,
}

/// The sinks of a fetch's duration and span.
#[derive(Clone, Copy)]
struct Recorder<'a> {
    metrics: Option<&'a RouteMetrics>,
    trace: Option<&'a FetchTrace>,
}

impl Recorder<'_> {
    /// Records one finished fetch: its call time in the route's upstream
    /// histogram (unless no call was made) and its span.
    fn finish(&self, plan: &PlannedInfo, upstream: &Upstream, result: &FetchResult) {
        let ended = Instant::now();
        if let (Some(metrics), Some(took)) = (self.metrics, plan.call_time) {
            metrics.upstream(plan.upstream, took);
        }
        let (Some(trace), Some(span_id)) = (self.trace, plan.span_id) else {
            return;
        };
        let Some((queue, clock)) = &trace.export else {
            return;
        };
        let mut attributes = vec![
            (
                "edge.upstream",
                AttributeValue::Owned(upstream.name.clone()),
            ),
            (
                "http.request.method",
                AttributeValue::Method(plan.method.clone()),
            ),
        ];
        let error = match result {
            Ok(response) => {
                attributes.push((
                    "http.response.status_code",
                    AttributeValue::Int(i64::from(response.status)),
                ));
                response.status >= 500
            }
            Err(error) => {
                let kind = match error {
                    FetchError::TimedOut => "timed_out".to_owned(),
                    FetchError::Unavailable(code) => code.clone(),
                    FetchError::ResponseTooLarge(_) => "response_too_large".to_owned(),
                    FetchError::NotAllowed => "not_allowed".to_owned(),
                    FetchError::InvalidRequest(_) => "invalid_request".to_owned(),
                };
                attributes.push(("error.type", AttributeValue::Owned(kind)));
                true
            }
        };
        let span = SpanRecord {
            trace_id: trace.context.trace_id,
            span_id,
            parent_id: Some(trace.parent),
            name: "fetch",
            kind: SpanKind::Client,
            start_unix_nanos: clock.unix_nanos(plan.started),
            end_unix_nanos: clock.unix_nanos(ended),
            attributes,
            error,
        };
        queue.send(vec![span]);
    }
}

/// A sent request, as [`Recorder::finish`] records it.
struct PlannedInfo {
    upstream: usize,
    method: Method,
    span_id: Option<[u8; 8]>,
    started: Instant,
    /// Time from sending until the response head or the failure; `None`
    /// when an open breaker or failed health checks stopped the request.
    call_time: Option<Duration>,
}

impl FetchAccess {
    /// Checks a guest's request and builds the one sent upstream.
    fn prepare(
        &self,
        request: OutgoingRequest,
        request_id: Option<&HeaderValue>,
        trace: Option<(&TraceContext, [u8; 8])>,
    ) -> Result<Planned, FetchError> {
        let Some(&upstream) = self.allowed.get(&request.upstream) else {
            return Err(FetchError::NotAllowed);
        };
        let invalid = |reason: String| FetchError::InvalidRequest(reason);
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| invalid(format!("invalid method {:?}", request.method)))?;
        // As for clients' requests: many frameworks upper-case a method, so
        // `get` could reach a handler that the upstream's rules keep for
        // `GET`. CONNECT would ask the upstream for a tunnel.
        if crate::pipeline::check_method(&method).is_err() || method == Method::CONNECT {
            return Err(invalid(format!(
                "method {:?} is not allowed; use an upper-case method other than CONNECT",
                request.method
            )));
        }
        if !request.path_and_query.starts_with('/') {
            return Err(invalid(format!(
                "path {:?} does not start with `/`",
                request.path_and_query
            )));
        }
        let path_and_query = PathAndQuery::try_from(request.path_and_query.as_str())
            .map_err(|_| invalid(format!("invalid path {:?}", request.path_and_query)))?;

        let mut headers = HeaderMap::with_capacity(request.headers.len() + 3);
        for wit::Header { name, value } in request.headers {
            let parsed = HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| invalid(format!("invalid header name {name:?}")))?;
            let value = HeaderValue::from_str(&value)
                .map_err(|_| invalid(format!("invalid value for header {name:?}")))?;
            headers.append(parsed, value);
        }
        // The node frames the body and manages the connection itself.
        remove_hop_by_hop(&mut headers);
        headers.remove(header::CONTENT_LENGTH);
        headers.remove(header::EXPECT);
        if !headers.contains_key(header::HOST) {
            let name = &self.upstreams[upstream].name;
            if let Ok(host) = HeaderValue::from_str(name) {
                headers.insert(header::HOST, host);
            }
        }
        if let Some(id) = request_id {
            headers.insert(X_REQUEST_ID.clone(), id.clone());
        }
        // The node's own trace context replaces any the worker set.
        if let Some((context, span_id)) = trace {
            context.propagate(span_id, &mut headers, true);
        }
        headers.append(header::VIA, self.via.clone());
        if !request.body.is_empty() {
            headers.insert(
                header::CONTENT_LENGTH,
                HeaderValue::from(request.body.len()),
            );
        }

        let timeout = request
            .timeout_ms
            .map_or(self.limits.default_timeout, |ms| {
                Duration::from_millis(u64::from(ms))
            })
            .min(self.limits.max_timeout);
        let mut built = Request::new(RequestBody::full(Bytes::from(request.body)));
        *built.method_mut() = method;
        *built.uri_mut() = Uri::from(path_and_query);
        *built.headers_mut() = headers;
        Ok(Planned {
            upstream,
            request: built,
            timeout,
            span_id: trace.map(|(_, span_id)| span_id),
        })
    }

    /// Sends one request and reads its whole response within its timeout.
    async fn exchange(
        &self,
        plan: Planned,
        client_ip: IpAddr,
        record: Recorder<'_>,
    ) -> FetchResult {
        let upstream = &self.upstreams[plan.upstream];
        let mut info = PlannedInfo {
            upstream: plan.upstream,
            method: plan.request.method().clone(),
            span_id: plan.span_id,
            started: Instant::now(),
            call_time: None,
        };
        let call_time = &mut info.call_time;
        let started = info.started;
        let exchange = async {
            let sent = upstream
                .send(plan.request, client_ip, Some(plan.timeout))
                .await;
            // A request that no breaker or health check let through made no
            // call, as on the proxy path.
            if !matches!(
                sent,
                Err(Refusal::CircuitOpen { .. } | Refusal::NoHealthyUpstream { .. })
            ) {
                *call_time = Some(started.elapsed());
            }
            let response = sent.map_err(fetch_error)?;
            let (mut head, body) = response.into_parts();
            remove_hop_by_hop(&mut head.headers);
            let body = read_capped(body, &head.headers, self.limits.max_response_body).await?;
            Ok(IncomingResponse {
                status: head.status.as_u16(),
                headers: super::wit_headers(&head.headers),
                body: body.to_vec(),
            })
        };
        let result = match tokio::time::timeout(plan.timeout, exchange).await {
            Ok(result) => result,
            Err(_) => {
                info.call_time.get_or_insert(plan.timeout);
                Err(FetchError::TimedOut)
            }
        };
        if let Err(error) = &result {
            tracing::debug!(upstream = %upstream.name, ?error, "worker fetch failed");
        }
        record.finish(&info, upstream, &result);
        result
    }
}

/// Reads a response body whole, failing once it is larger than `cap` bytes
/// (at once when `Content-Length` shows it is). The response to a `HEAD`, and
/// a 204 or 304, has no body whatever its `Content-Length` declares.
async fn read_capped(
    mut body: PooledBody,
    headers: &HeaderMap,
    cap: u64,
) -> Result<Bytes, FetchError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > cap) && !http_body::Body::is_end_stream(&body) {
        return Err(FetchError::ResponseTooLarge(cap));
    }
    let mut collected = BytesMut::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|error| {
            if error.downcast_ref::<BodyTimedOut>().is_some() {
                FetchError::TimedOut
            } else {
                FetchError::Unavailable("upstream_unavailable".to_owned())
            }
        })?;
        if let Some(data) = frame.data_ref() {
            if (collected.len() + data.len()) as u64 > cap {
                return Err(FetchError::ResponseTooLarge(cap));
            }
            collected.extend_from_slice(data);
        }
    }
    Ok(collected.freeze())
}

/// Maps the upstream client's refusal to the error the guest sees: a
/// timeout, or why the upstream is unavailable as the refusal's code.
fn fetch_error(refusal: Refusal) -> FetchError {
    match refusal {
        Refusal::UpstreamTimeout { .. } => FetchError::TimedOut,
        other => FetchError::Unavailable(other.code().to_owned()),
    }
}

impl super::bindings::edge::worker::fetch::Host for super::host_api::StoreState {
    async fn send(&mut self, requests: Vec<OutgoingRequest>) -> Vec<FetchResult> {
        let access = self.settings.fetch.as_ref();
        self.fetch.send(access, requests).await
    }

    fn allowed(&mut self, upstream: String) -> bool {
        self.settings
            .fetch
            .as_ref()
            .is_some_and(|access| access.allows(&upstream))
    }
}
