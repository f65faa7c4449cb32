//! The host side of the `fetch` import: requests from a worker to the
//! upstreams its route entry allows. They go out at once over the node's
//! upstream client, so they share its connection pools, balancing, circuit
//! breakers, retries and health with proxied requests.
//!
//! A worker names upstreams, never addresses. Every request of one `send`
//! call runs concurrently on the calling thread, and the call returns when
//! each has a response or has timed out. The time the guest waits here is
//! not charged to its CPU deadline (see [`FetchState::waited`]).

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
use crate::pipeline::remove_hop_by_hop;
use crate::proxy::{BodyTimedOut, PooledBody, RequestBody, Upstream};

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

/// The fetch state of one hook call.
#[derive(Debug, Default)]
pub struct FetchState {
    /// The incoming request's `X-Request-Id`; `None` when it has none, or
    /// for the `hooks` call, which runs at load without a request.
    request_id: Option<HeaderValue>,
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
    /// Prepares the state of a hook call on `request`.
    pub fn for_request(request: &wit::Request) -> FetchState {
        let request_id = request
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(X_REQUEST_ID.as_str()))
            .and_then(|h| HeaderValue::from_str(&h.value).ok());
        FetchState {
            request_id,
            client_ip: request.client_addr.parse().ok(),
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
            } else {
                access.prepare(request, self.request_id.as_ref())
            };
            if plan.is_ok() {
                self.sent += 1;
            }
            planned.push(plan);
        }
        let client_ip = self.client_ip.unwrap_or(IpAddr::from([127, 0, 0, 1]));
        let started = Instant::now();
        let results = join_all(planned.into_iter().map(|plan| async move {
            match plan {
                Ok(plan) => access.exchange(plan, client_ip).await,
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
}

impl FetchAccess {
    /// Checks a guest's request and builds the one sent upstream.
    fn prepare(
        &self,
        request: OutgoingRequest,
        request_id: Option<&HeaderValue>,
    ) -> Result<Planned, FetchError> {
        let Some(&upstream) = self.allowed.get(&request.upstream) else {
            return Err(FetchError::NotAllowed);
        };
        let invalid = |reason: String| FetchError::InvalidRequest(reason);
        let method = Method::from_bytes(request.method.as_bytes())
            .map_err(|_| invalid(format!("invalid method {:?}", request.method)))?;
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
        })
    }

    /// Sends one request and reads its whole response within its timeout.
    async fn exchange(&self, plan: Planned, client_ip: IpAddr) -> FetchResult {
        let upstream = &self.upstreams[plan.upstream];
        let exchange = async {
            let response = upstream
                .send(plan.request, client_ip, Some(plan.timeout))
                .await
                .map_err(fetch_error)?;
            let (mut head, body) = response.into_parts();
            remove_hop_by_hop(&mut head.headers);
            let body = read_capped(body, &head.headers, self.limits.max_response_body).await?;
            Ok(IncomingResponse {
                status: head.status.as_u16(),
                headers: head
                    .headers
                    .iter()
                    .map(|(name, value)| wit::Header {
                        name: name.as_str().to_owned(),
                        value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
                    })
                    .collect(),
                body: body.to_vec(),
            })
        };
        let result = tokio::time::timeout(plan.timeout, exchange)
            .await
            .unwrap_or(Err(FetchError::TimedOut));
        if let Err(error) = &result {
            tracing::debug!(upstream = %upstream.name, ?error, "worker fetch failed");
        }
        result
    }
}

/// Reads a response body whole, failing once it is larger than `cap` bytes
/// (at once when `Content-Length` shows it is).
async fn read_capped(
    mut body: PooledBody,
    headers: &HeaderMap,
    cap: u64,
) -> Result<Bytes, FetchError> {
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > cap) {
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
