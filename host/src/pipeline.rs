//! The request pipeline: one function takes a request through every stage in
//! order, and each stage can end it with a [`Refusal`].
//!
//! ```text
//! stage               refusals
//! one Host            400 invalid_host
//! hop-by-hop removal
//! client cert subject (set by the node only)
//! normalise path      400 invalid_path
//! redirect to HTTPS   308 (a redirecting listener), 400 invalid_host
//! route               404 no_route
//! WebSocket handshake 501 unsupported_upgrade, 400 invalid_upgrade
//! rate limits         429 rate_limited, 503 ratelimit_unavailable,
//!                     400 repeated_key_header
//! body limit          413 body_too_large
//! request workers     the worker's own response, 500 worker_failed,
//!                     503 worker_timeout or worker_busy; limits keyed by a
//!                     worker's value run right after that worker
//! upstream            503 no_healthy_upstream, 503 circuit_open,
//!                     503 upstream_busy, 502 upstream_unavailable,
//!                     504 upstream_timeout,
//!                     400 invalid_body, 413 body_too_large; a 101 to a
//!                     handshake starts its tunnel (`upgrade`)
//! response workers    500 worker_failed, 503 worker_timeout or worker_busy
//! respond             X-Request-Id, X-Request-Duration, X-Gateway-Node,
//!                     RED metrics, the access-log line, the request's spans
//! ```

use std::borrow::Cow;
use std::collections::HashSet;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use futures_util::future::Either;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::request::Parts;
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri};
use hyper::body::Body as _;
use hyper::body::Incoming;

use crate::context::RequestContext;
use crate::error::Refusal;
use crate::exchange::Exchange;
use crate::idle::Activity;
use crate::metrics::{Phase, Reason};
use crate::node::{Node, Route};
use crate::proxy::{RequestBody, ResponseBody};
use crate::ratelimit::{KeyInput, LimitSet, Shown};
use crate::route::{encode_path, encode_query, host_name, normalize_path, resolve_dot_segments};
use crate::trace::{
    new_span_id, AttributeValue, RequestSpans, SpanKind, TraceContext, X_REQUEST_ID,
};
use crate::upgrade;
use crate::worker::{wit, Binding, FetchOrigin, FetchTrace, WorkerError};

/// The connection a request arrived on, with what the node works out once
/// per connection rather than per request.
#[derive(Debug, Clone)]
pub struct Connection {
    pub peer: SocketAddr,
    /// Index into [`Node::listeners`].
    pub listener: usize,
    /// True when the connection is TLS.
    pub secure: bool,
    /// The subject of the client's verified certificate, on a listener that
    /// checks client certificates.
    pub client_subject: Option<HeaderValue>,
    /// Whether the peer is one of the listener's trusted proxies.
    peer_trusted: bool,
    /// The peer's IP address as a header value, for `X-Forwarded-For`.
    peer_header: HeaderValue,
    /// The requests of a connection that may speak HTTP/2, whose upstream
    /// calls the pipeline counts, so that a client cancelling most of them
    /// gets its connection shut down.
    pub activity: Option<Arc<Activity>>,
    /// The serving thread's drain, which waits for the connection's
    /// WebSocket tunnel; `None` outside a serving thread.
    pub drain: Option<crate::drain::Drain>,
}

impl Connection {
    /// Describes a plain connection from `peer` to listener `listener`; the
    /// listener marks it secure after a TLS handshake.
    pub fn new(node: &Node, peer: SocketAddr, listener: usize) -> Connection {
        let peer_trusted = node.listeners[listener]
            .trusted_proxies
            .iter()
            .any(|net| net.contains(&peer.ip()));
        let peer_header = HeaderValue::from_str(&peer.ip().to_string())
            .expect("an IP address is a valid header value");
        Connection {
            peer,
            listener,
            secure: false,
            client_subject: None,
            peer_trusted,
            peer_header,
            activity: None,
            drain: None,
        }
    }
}

/// Handles one client request and returns the response to send, whether the
/// upstream's, a worker's or the node's own refusal.
pub async fn handle(
    node: &Node,
    connection: &Connection,
    mut request: Request<Incoming>,
) -> Response<ResponseBody> {
    let listener = connection.listener;
    if request.version() == http::Version::HTTP_2 {
        trim_field_values(request.headers_mut());
    }
    let fields = RequestFields::scan(request.headers());
    let mut exchange = Exchange::new(
        node,
        &request,
        fields.may_have(RequestFields::REQUEST_ID),
        Instant::now(),
        connection.peer.ip(),
    );
    // The rate limit that decided, when the route has any: its state goes
    // on every response of the route.
    let mut shown = None;
    let served = serve(node, connection, request, fields, &mut shown, &mut exchange);
    let mut response = match served.await {
        Ok(response) => response,
        Err(refusal) => {
            exchange.reason = Reason::of(&refusal);
            refusal.to_response()
        }
    };
    let headers = response.headers_mut();
    if let Some(shown) = shown {
        shown.apply(headers);
    }
    headers.append(header::VIA, node.via.clone());
    if let Some(route) = exchange.route {
        for (name, value) in &node.routes[route].response_headers {
            headers.append(name.clone(), value.clone());
        }
    }
    if let Some(hsts) = &node.listeners[listener].hsts {
        headers
            .entry(header::STRICT_TRANSPORT_SECURITY)
            .or_insert_with(|| hsts.clone());
    }
    // Observability headers, RED metrics and the access-log line.
    let client = exchange.client.unwrap_or(connection.peer.ip());
    exchange.finish(node, client, response)
}

async fn serve(
    node: &Node,
    connection: &Connection,
    request: Request<Incoming>,
    mut fields: RequestFields,
    shown: &mut Option<Shown>,
    exchange: &mut Exchange,
) -> Result<Response<ResponseBody>, Refusal> {
    let (mut parts, body) = request.into_parts();

    // An upper-case method, one Host agreeing with the target, and no
    // hop-by-hop headers before any route or worker looks at the request.
    check_method(&parts.method)?;
    canonicalize_host(&mut parts)?;
    if fields.may_have(RequestFields::TRANSFER_ENCODING) {
        check_transfer_coding(&parts.headers)?;
    }
    let hop_by_hop = fields.hop_by_hop();
    let upgrade = if hop_by_hop & UPGRADE_PRESENT != 0 {
        upgrade::requested(&parts.headers)
    } else {
        None
    };
    remove_present_hop_by_hop(&mut parts.headers, hop_by_hop);
    if fields.may_have(RequestFields::VIA) && names_this_node(&parts.headers, &node.via) {
        return Err(Refusal::LoopDetected);
    }
    if parts.version == http::Version::HTTP_2 {
        join_cookies(&mut parts.headers);
    }
    let listener = &node.listeners[connection.listener];

    // Only the node sets the client certificate's subject.
    for name in &listener.subject_headers_to_remove {
        parts.headers.remove(name);
    }
    if !listener.underscores_in_headers {
        remove_underscore_headers(&mut parts.headers);
    }
    if let (Some(name), Some(subject)) =
        (&listener.client_subject_header, &connection.client_subject)
    {
        parts.headers.insert(name.clone(), subject.clone());
        fields = RequestFields::UNKNOWN;
    }

    // Route on the normalised path, never the raw one.
    let uri = &parts.uri;
    let raw_path = uri.path();
    let path = normalize_path(raw_path).map_err(|e| Refusal::InvalidPath(e.to_string()))?;
    // Raw non-ASCII bytes decode to themselves, but go upstream encoded, as
    // a request target must be ASCII (RFC 9112, section 3.2).
    let path_changed = path != raw_path
        || !raw_path.is_ascii()
        || uri.query().is_some_and(|query| !query.is_ascii());

    if let Some(redirect) = &listener.redirect {
        if !redirect
            .except
            .iter()
            .any(|prefix| prefix.matches(&path).is_some())
        {
            exchange.reason = Reason::Redirect;
            return redirect_to_https(&parts, redirect);
        }
    }
    let matched = {
        let host = parts
            .headers
            .get(header::HOST)
            .and_then(|h| h.to_str().ok())
            .map(host_name);
        node.router.find(host.as_deref(), &parts.method, &path)
    };
    let matched = matched.ok_or(Refusal::NoRoute)?;
    let route = &node.routes[matched.index];
    exchange.route = Some(matched.index);
    // A switch of protocols only on a route that carries it.
    let handshake = match upgrade {
        Some(requested) => upgrade::check(
            route,
            &parts.method,
            parts.version,
            &mut parts.extensions,
            requested,
        )?,
        None => None,
    };
    for name in &route.remove_request_headers {
        parts.headers.remove(name);
    }
    if route.observe.trace_context || node.spans.is_some() {
        let trace = if fields.may_have(RequestFields::TRACEPARENT) {
            TraceContext::from_request(&parts.headers)
        } else {
            TraceContext::start()
        };
        exchange.trace = Some(trace);
    }
    if node.spans.is_some() {
        let mut spans = RequestSpans::new(exchange.started);
        let root = &mut spans.root_attributes;
        root.push((
            "http.request.method",
            AttributeValue::Method(parts.method.clone()),
        ));
        root.push(("url.path", AttributeValue::Owned(path.to_string())));
        root.push(("edge.route", AttributeValue::Shared(route.name.clone())));
        exchange.spans = Some(spans);
    }

    let client_ip = client_ip(
        &parts.headers,
        connection.peer.ip(),
        &listener.trusted_proxies,
    );
    exchange.client = Some(client_ip);

    // Limits whose key is known now (client address, header, route), before
    // any worker runs or the body is looked at.
    let mut context = RequestContext::default();
    if !route.start_limits.is_empty() {
        let input = KeyInput {
            received: exchange.started,
            client_ip,
            headers: &parts.headers,
            context: &context,
        };
        check_limits(node, route, route.start_limits, &input, shown, exchange).await?;
    }

    // Refuse a body the route cannot take before anything else sees it.
    let length = if fields.may_have(RequestFields::CONTENT_LENGTH) {
        content_length(&parts.headers)
    } else {
        None
    };
    if let Some(length) = length {
        if length > route.max_body {
            return Err(Refusal::BodyTooLarge {
                limit: route.max_body,
            });
        }
        // `0005` is valid, but an upstream could read leading zeros another
        // way, so the length goes upstream as a plain number.
        let written = parts.headers[header::CONTENT_LENGTH].as_bytes();
        if written.len() > 1 && written[0] == b'0' {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(length));
        }
    }

    // Request-phase workers, in order.
    let mut upstream = route.upstream;
    let mut worker_path: Option<String> = None;
    // The worker that set `worker_path` last.
    let mut path_setter: Option<&Binding> = None;
    let mut view = None;
    if !route.workers.is_empty() {
        let mut request_view = worker_request(&parts, &path, client_ip, route, matched.params);
        let mut pending_limits = route.context_limits;
        for (worker_index, binding) in route.workers.iter().enumerate() {
            let (origin, span_id) = fetch_origin(node, route, exchange);
            let started = Instant::now();
            // Boxed like the limits' future: only routes with workers pay
            // for the allocation, which costs far less than the call.
            let action =
                Box::pin(
                    node.runtime
                        .on_request(binding, &request_view, &mut context, origin),
                )
                .await;
            note_worker_call(
                node,
                exchange,
                binding,
                (worker_index, Phase::Request),
                span_id,
                started,
                action.is_err(),
            );
            note_context(exchange, &context);
            let action = action.map_err(|e| worker_refusal(route, binding, exchange, e))?;
            let changes = match action {
                wit::Action::Continue(changes) => changes,
                wit::Action::Respond(response) => {
                    // A response the worker makes itself, such as jwt-auth's
                    // 401, still counts against the context limits, by address
                    // when no worker set their value, so that guessing tokens
                    // is limited too.
                    if !pending_limits.is_empty() {
                        let input = KeyInput {
                            received: exchange.started,
                            client_ip,
                            headers: &parts.headers,
                            context: &context,
                        };
                        check_limits(node, route, pending_limits, &input, shown, exchange).await?;
                    }
                    exchange.reason = match response.status {
                        401 | 403 => Reason::AuthFailed,
                        _ => Reason::WorkerResponse,
                    };
                    return worker_response(response)
                        .map_err(|reason| invalid_decision(route, binding, exchange, &reason));
                }
                wit::Action::Route(to) => {
                    upstream = Some(node.upstream_index(&to.upstream).ok_or_else(|| {
                        let reason = format!("routed to unknown upstream {:?}", to.upstream);
                        invalid_decision(route, binding, exchange, &reason)
                    })?);
                    to.changes
                }
            };
            if changes.path.is_some() {
                path_setter = Some(binding);
            }
            apply_request_changes(
                changes,
                &mut parts.headers,
                &mut request_view,
                &mut worker_path,
            )
            .map_err(|reason| invalid_decision(route, binding, exchange, &reason))?;
            // Limits keyed by a context value this worker set run before the
            // next worker, so an over-quota user triggers nothing more.
            let ready = pending_limits.ready(&route.limits, &context);
            if !ready.is_empty() {
                route.context_watch.value_set();
                pending_limits = pending_limits.without(ready);
                let input = KeyInput {
                    received: exchange.started,
                    client_ip,
                    headers: &parts.headers,
                    context: &context,
                };
                check_limits(node, route, ready, &input, shown, exchange).await?;
            }
        }
        // No worker set the value of these limits: they count the request
        // by client address.
        if !pending_limits.is_empty() {
            route.context_watch.value_unset(route, pending_limits);
            let input = KeyInput {
                received: exchange.started,
                client_ip,
                headers: &parts.headers,
                context: &context,
            };
            check_limits(node, route, pending_limits, &input, shown, exchange).await?;
        }
        view = Some(request_view);
        // Workers may have set any field.
        fields = RequestFields::UNKNOWN;
    }
    let Some(upstream_index) = upstream else {
        if let Some(suppressed) = route.no_upstream_log.admit() {
            tracing::warn!(
                route = %route.name,
                suppressed,
                "request answered 500 no_upstream: the route has no upstream and no worker \
                 chose one; set the route's upstream, or make a worker route or respond"
            );
        }
        return Err(Refusal::NoUpstream);
    };
    exchange.upstream = Some(upstream_index);
    let upstream = &node.upstreams[upstream_index];

    // Proxy to the upstream, streaming the body both ways.
    let wire_path = match &worker_path {
        Some(path) => Some(encode_path(path)),
        // Owned, because the normalised path may borrow the request's URI,
        // which `prepare_upstream_request` replaces.
        None if path_changed => Some(Cow::Owned(encode_path(&path).into_owned())),
        None => None,
    };
    prepare_upstream_request(
        &mut parts,
        fields,
        wire_path.as_deref(),
        connection,
        &upstream.name,
        node,
    )
    .map_err(|refusal| match (refusal, path_setter) {
        // The worker's path, encoded and with the client's query, is too
        // long for a request target: the worker's fault.
        (Refusal::InvalidPath(reason), Some(binding)) => {
            let reason = format!("set a path the upstream request cannot carry: {reason}");
            invalid_decision(route, binding, exchange, &reason)
        }
        (refusal, _) => refusal,
    })?;
    drop(wire_path);
    if route.observe.request_id {
        if let Some(id) = &exchange.request_id {
            parts.headers.insert(X_REQUEST_ID.clone(), id.clone());
        }
    }
    // With span export, the upstream call is a span of its own and the
    // upstream's parent; else the node's span is.
    let client_span = exchange.spans.is_some().then(new_span_id);
    if let (Some(trace), true) = (&exchange.trace, route.observe.trace_context) {
        let parent = client_span.unwrap_or(trace.span_id);
        let client_state = fields.may_have(RequestFields::TRACESTATE);
        trace.propagate(parent, &mut parts.headers, client_state);
    }
    if let Some(handshake) = &handshake {
        handshake.prepare(&mut parts);
    }
    // hyper sends a GET or HEAD whose body has no length without that body,
    // so such a body goes chunked, as any other method's does.
    if matches!(parts.method, Method::GET | Method::HEAD)
        && !body.is_end_stream()
        && !parts.headers.contains_key(header::CONTENT_LENGTH)
    {
        parts.headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
    }
    let request = Request::from_parts(parts, RequestBody::new(body, route.max_body));
    let started = Instant::now();
    exchange.upstream_since = Some(started);
    let call = connection.activity.as_deref().map(Activity::upstream_call);
    let sent = upstream
        .send_noting_target(request, client_ip, route.timeout, &mut exchange.target)
        .await;
    if let Some(call) = call {
        call.finish();
    }
    exchange.upstream_since = None;
    // A request that no breaker or health check let through made no call,
    // nor did one that waited for a full target's slot. The time counts as
    // upstream time all the same: a wait for a slot, however it ended, as
    // when the request is served, and a refusal at once takes microseconds.
    let called = !matches!(
        sent,
        Err(Refusal::CircuitOpen { .. }
            | Refusal::NoHealthyUpstream { .. }
            | Refusal::UpstreamBusy { .. })
    );
    exchange.upstream_time = started.elapsed();
    if let (Some(span_id), true) = (client_span, called) {
        let name = node.metrics.upstream_names()[upstream_index].clone();
        record_upstream_span(exchange, name, span_id, started, &sent);
    }
    let mut response = sent?;
    match handshake {
        // A 101 keeps the fields that switch protocols, and starts the tunnel.
        Some(handshake) => handshake.answer(
            node,
            connection.drain.as_ref(),
            route,
            upstream_index,
            exchange.request_id.as_ref(),
            &mut response,
        )?,
        None if response.body().hop_by_hop_removed() => {}
        None => {
            // The fields that `Connection` names are hop-by-hop in the
            // trailers too.
            let named = remove_hop_by_hop(response.headers_mut());
            response
                .body_mut()
                .remove_connection_options_from_trailers(named);
        }
    }
    single_content_length(response.headers_mut());
    if let Some(names) = &route.response_header_names {
        response
            .body_mut()
            .remove_route_headers_from_trailers(names);
    }
    // A 204 has no content, so it has no length (RFC 9110, section 8.6).
    // HTTP/2 clients fail a stream whose 204 has one.
    if response.status() == StatusCode::NO_CONTENT {
        response.headers_mut().remove(header::CONTENT_LENGTH);
    }
    // The node speaks its own HTTP version to the client, whatever the
    // upstream spoke.
    *response.version_mut() = http::Version::HTTP_11;

    // Response-phase workers, in reverse order.
    if let Some(view) = &view {
        if route.workers.iter().any(|w| w.response_hook) {
            Box::pin(run_response_hooks(
                node,
                route,
                view,
                &mut context,
                &mut response,
                exchange,
            ))
            .await?;
        }
    }
    Ok(response.map(ResponseBody::Upstream))
}

/// The limits of a request, decided at once or still deciding.
type LimitCheck<'a> = Either<
    std::future::Ready<Result<(), Refusal>>,
    Pin<Box<dyn Future<Output = Result<(), Refusal>> + Send + 'a>>,
>;

/// Runs the limits of `which`, adding the time they took to the exchange.
/// Local limits decide at once. The others wait in a future of their own,
/// boxed so that it does not make every request's future larger.
fn check_limits<'a>(
    node: &'a Node,
    route: &'a Route,
    which: LimitSet,
    input: &'a KeyInput<'a>,
    shown: &'a mut Option<Shown>,
    exchange: &'a mut Exchange,
) -> LimitCheck<'a> {
    // Only the access log and the trace span record this time, so the clock
    // is read only when one of them is on.
    let started = (node.access_log.is_some() || exchange.spans.is_some()).then(Instant::now);
    if let Some(checked) = node.ratelimit.check_now(&route.limits, which, input, shown) {
        note_limit_time(exchange, started, &checked);
        return Either::Left(std::future::ready(checked));
    }
    Either::Right(Box::pin(async move {
        let checked = node
            .ratelimit
            .check(&route.limits, which, input, shown)
            .await;
        note_limit_time(exchange, started, &checked);
        checked
    }))
}

/// Adds the time the limits took since `started` to the exchange, and their
/// span when spans are exported.
fn note_limit_time(
    exchange: &mut Exchange,
    started: Option<Instant>,
    checked: &Result<(), Refusal>,
) {
    let Some(started) = started else {
        return;
    };
    exchange.ratelimit_time += started.elapsed();
    if let (Some(spans), Some(trace)) = (&mut exchange.spans, &exchange.trace) {
        let mut attributes = Vec::new();
        if let Err(refusal) = checked {
            attributes.push(("error.type", AttributeValue::Static(refusal.code())));
        }
        spans.record(
            trace,
            new_span_id(),
            None,
            "ratelimit",
            SpanKind::Internal,
            (started, Instant::now()),
            attributes,
            checked.is_err(),
        );
    }
}

/// Builds what a worker call's fetches carry from the request: its id, its
/// trace with a new span id for the worker call (returned too, for the
/// call's span), and the route's metrics.
fn fetch_origin(node: &Node, route: &Route, exchange: &Exchange) -> (FetchOrigin, [u8; 8]) {
    let span_id = new_span_id();
    let request_id = if route.observe.request_id {
        exchange.request_id.clone()
    } else {
        None
    };
    let trace = exchange.trace.as_ref().map(|context| FetchTrace {
        context: context.clone(),
        parent: if exchange.spans.is_some() {
            span_id
        } else {
            context.span_id
        },
        export: node
            .spans
            .clone()
            .zip(exchange.spans.as_ref().map(|spans| spans.clock)),
    });
    let metrics = exchange
        .route
        .filter(|_| node.request_metrics)
        .and_then(|index| node.metrics.route_shared(index));
    let origin = FetchOrigin {
        request_id,
        trace,
        metrics,
        client_ip: exchange.client,
    };
    (origin, span_id)
}

/// Records a worker call that started at `started`: its time on the
/// exchange, its span when spans are exported, and its duration metric.
fn note_worker_call(
    node: &Node,
    exchange: &mut Exchange,
    binding: &Binding,
    (worker_index, phase): (usize, Phase),
    span_id: [u8; 8],
    started: Instant,
    failed: bool,
) {
    let took = started.elapsed();
    exchange.worker_time += took;
    let phase_name = match phase {
        Phase::Request => "request",
        Phase::Response => "response",
    };
    record_worker_span(exchange, binding, span_id, phase_name, started, failed);
    if node.request_metrics {
        node.metrics
            .route(exchange.route)
            .worker(worker_index, phase, took);
    }
}

/// Records the span of one worker hook call, when spans are exported.
fn record_worker_span(
    exchange: &mut Exchange,
    binding: &Binding,
    span_id: [u8; 8],
    phase: &'static str,
    started: Instant,
    failed: bool,
) {
    let (Some(spans), Some(trace)) = (&mut exchange.spans, &exchange.trace) else {
        return;
    };
    let attributes = vec![
        (
            "edge.worker",
            AttributeValue::Shared(binding.module.name.clone()),
        ),
        ("edge.phase", AttributeValue::Static(phase)),
    ];
    spans.record(
        trace,
        span_id,
        None,
        "worker",
        SpanKind::Internal,
        (started, Instant::now()),
        attributes,
        failed,
    );
}

/// Records the span of the upstream call, whose id the upstream received as
/// its parent in `traceparent`.
fn record_upstream_span<B>(
    exchange: &mut Exchange,
    upstream: Arc<str>,
    span_id: [u8; 8],
    started: Instant,
    sent: &Result<Response<B>, Refusal>,
) {
    let (Some(spans), Some(trace)) = (&mut exchange.spans, &exchange.trace) else {
        return;
    };
    let mut attributes = vec![("edge.upstream", AttributeValue::Shared(upstream))];
    if let Some(target) = exchange.target {
        attributes.push(("server.address", AttributeValue::Ip(target.ip())));
        attributes.push(("server.port", AttributeValue::Int(i64::from(target.port()))));
    }
    let error = match sent {
        Ok(response) => {
            let status = response.status().as_u16();
            attributes.push((
                "http.response.status_code",
                AttributeValue::Int(i64::from(status)),
            ));
            status >= 500
        }
        Err(refusal) => {
            attributes.push(("error.type", AttributeValue::Static(refusal.code())));
            true
        }
    };
    spans.record(
        trace,
        span_id,
        None,
        "upstream",
        SpanKind::Client,
        (started, Instant::now()),
        attributes,
        error,
    );
}

/// Copies to the exchange what the workers left on the context: the user id
/// (as `user`) for the access log, and the time their calls waited for
/// fetches, which is not the node's own time.
fn note_context(exchange: &mut Exchange, context: &RequestContext) {
    exchange.fetch_wait = context.fetch_wait;
    if let Some(user) = context.get("user") {
        if exchange.user.as_deref() != Some(user) {
            exchange.user = Some(user.to_owned());
        }
    }
}

/// Builds the 308 redirect to the same host, path and query over HTTPS.
/// 308 keeps the method and body, unlike 301.
fn redirect_to_https(
    parts: &Parts,
    redirect: &crate::node::Redirect,
) -> Result<Response<ResponseBody>, Refusal> {
    let host = parts
        .headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .map(host_name)
        .filter(|host| !host.is_empty())
        .ok_or_else(|| {
            Refusal::InvalidHost("a redirect to HTTPS needs the request's Host".to_owned())
        })?;
    let port = match redirect.port.get() {
        Some(443) | None => String::new(),
        Some(port) => format!(":{port}"),
    };
    let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
    let location = HeaderValue::from_str(&format!("https://{host}{port}{target}"))
        .map_err(|_| Refusal::InvalidHost("the Host is not a valid host name".to_owned()))?;
    let mut response = Response::new(ResponseBody::full(Bytes::new()));
    *response.status_mut() = StatusCode::PERMANENT_REDIRECT;
    response.headers_mut().insert(header::LOCATION, location);
    Ok(response)
}

/// Makes the `Host` header the one host the request is for: the target's
/// authority when the request has one (HTTP/2, or an absolute-form HTTP/1.1
/// target), replacing any `Host` the client sent, as RFC 9112, section 3.2.2
/// requires of a proxy. Rejects a request with several `Host` headers, or an
/// HTTP/1.1 request without one.
fn canonicalize_host(parts: &mut Parts) -> Result<(), Refusal> {
    if let Some(authority) = parts.uri.authority() {
        check_host(authority.as_str().as_bytes()).map_err(|reason| {
            Refusal::InvalidHost(format!("the request target's authority {reason}"))
        })?;
        let value = HeaderValue::from_str(authority.as_str()).map_err(|_| {
            Refusal::InvalidHost("the request target's authority is not a valid host".to_owned())
        })?;
        parts.headers.insert(header::HOST, value);
        return Ok(());
    }
    let mut hosts = parts.headers.get_all(header::HOST).iter();
    match (hosts.next(), hosts.next()) {
        (Some(host), None) => check_host(host.as_bytes())
            .map_err(|reason| Refusal::InvalidHost(format!("the Host header {reason}"))),
        (Some(_), Some(_)) => Err(Refusal::InvalidHost(
            "the request has more than one Host header".to_owned(),
        )),
        (None, _) if parts.version == http::Version::HTTP_10 => Ok(()),
        (None, _) => Err(Refusal::InvalidHost(
            "the request has no Host header".to_owned(),
        )),
    }
}

/// Removes the headers whose names have an underscore. Servers that turn
/// header names into variables (CGI, WSGI, PHP) read `X_User_Id` as
/// `X-User-Id`, which a worker may set and the node may strip. Standard
/// names have none, so most requests only pay for the scan.
fn remove_underscore_headers(headers: &mut HeaderMap) {
    if !headers.keys().any(|name| name.as_str().contains('_')) {
        return;
    }
    let names: Vec<HeaderName> = headers
        .keys()
        .filter(|name| name.as_str().contains('_'))
        .cloned()
        .collect();
    for name in names {
        headers.remove(&name);
    }
}

/// Joins an HTTP/2 request's `Cookie` fields into one, with `; ` between
/// them, as a request forwarded to HTTP/1.1 must have (RFC 9113, section
/// 8.2.3). HTTP/2 clients send each cookie as a field of its own, and
/// HTTP/1.1 servers read only the first field or join them with commas.
fn join_cookies(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::COOKIE).iter();
    if fields.next().is_none() || fields.next().is_none() {
        return;
    }
    let mut joined = Vec::new();
    for field in headers.get_all(header::COOKIE) {
        if !joined.is_empty() {
            joined.extend_from_slice(b"; ");
        }
        joined.extend_from_slice(field.as_bytes());
    }
    // Each part was a valid value, and `; ` is valid between them.
    if let Ok(value) = HeaderValue::from_bytes(&joined) {
        headers.insert(header::COOKIE, value);
    }
}

/// Removes spaces and tabs around field values. HTTP/1.1 parsers drop
/// them (RFC 9112, section 5), but the h2 crate passes them on, although
/// RFC 9113 (section 8.2.1) makes such a request malformed. Without this,
/// `k1 ` and `k1` would be two rate-limit keys, while the HTTP/1.1 upstream
/// reads both as `k1`.
fn trim_field_values(headers: &mut HeaderMap) {
    for value in headers.values_mut() {
        let bytes = value.as_bytes();
        let trimmed = bytes.trim_ascii();
        if trimmed.len() == bytes.len() {
            continue;
        }
        // A part of a valid value is valid, so the node's own checks then
        // read the value that an upstream reads.
        if let Ok(mut shorter) = HeaderValue::from_bytes(trimmed) {
            shorter.set_sensitive(value.is_sensitive());
            *value = shorter;
        }
    }
}

/// Rejects a method with lower-case letters. Methods are case-sensitive
/// (RFC 9110, section 9.1) and routes match them exactly, but some upstream
/// frameworks upper-case them, so `delete` could reach a handler that the
/// route for `DELETE`, and its workers, were meant to guard.
///
/// Rejects CONNECT too: the node opens no tunnels, and an upstream's 2xx
/// to a CONNECT makes hyper close the client's connection unanswered.
pub(crate) fn check_method(method: &Method) -> Result<(), Refusal> {
    let standard = matches!(
        *method,
        Method::GET | Method::POST | Method::HEAD | Method::PUT | Method::DELETE | Method::OPTIONS
    );
    if standard {
        return Ok(());
    }
    if *method == Method::CONNECT {
        return Err(Refusal::UnsupportedMethod(method.as_str().to_owned()));
    }
    if method
        .as_str()
        .bytes()
        .any(|byte| byte.is_ascii_lowercase())
    {
        return Err(Refusal::InvalidMethod(method.as_str().to_owned()));
    }
    Ok(())
}

/// Checks that `host` is `host[:port]` as RFC 3986 defines it: a registered
/// name or IPv4 address, or an IPv6 address in brackets, then an optional
/// port of up to five digits. Returns why it is not.
pub(crate) fn check_host(host: &[u8]) -> Result<(), &'static str> {
    if host.contains(&b'@') {
        return Err("has userinfo (`user@`), which is not allowed");
    }
    let (name, port) = if let Some(rest) = host.strip_prefix(b"[") {
        let close = rest
            .iter()
            .position(|&byte| byte == b']')
            .ok_or("has an IPv6 address without its closing bracket")?;
        let address = &rest[..close];
        let valid = std::str::from_utf8(address)
            .is_ok_and(|text| text.parse::<std::net::Ipv6Addr>().is_ok());
        if !valid {
            return Err("has an invalid IPv6 address");
        }
        match &rest[close + 1..] {
            [] => (address, None),
            [b':', port @ ..] => (address, Some(port)),
            _ => return Err("has text after its IPv6 address"),
        }
    } else {
        match host.iter().rposition(|&byte| byte == b':') {
            Some(colon) => (&host[..colon], Some(&host[colon + 1..])),
            None => (host, None),
        }
    };
    if name.is_empty() {
        return Err("is empty");
    }
    if !host.starts_with(b"[") {
        // A leading dot or two dots in a row make an empty label, which no
        // DNS name has. Rejecting it keeps `a..example.com` off the route of
        // `*.example.com`.
        let mut previous = b'.';
        for &byte in name {
            if !REG_NAME[usize::from(byte)] {
                return Err("is not a host name or address");
            }
            if byte == b'.' && previous == b'.' {
                return Err("has an empty label");
            }
            previous = byte;
        }
    }
    // RFC 3986 allows an empty port, as in `example.com:`.
    if let Some(port) = port.filter(|port| !port.is_empty()) {
        let digits = port.len() <= 5 && port.iter().all(u8::is_ascii_digit);
        let in_range = digits
            && std::str::from_utf8(port)
                .ok()
                .and_then(|port| port.parse::<u16>().ok())
                .is_some();
        if !in_range {
            return Err("has an invalid port");
        }
    }
    Ok(())
}

/// The bytes of a reg-name (RFC 3986, section 3.2.2), by value. They are
/// unreserved, percent-encoded and sub-delims characters, which include the
/// dots of an IPv4 address, and never userinfo, a path or spaces. It is a
/// table because it runs on every byte of every request's host.
static REG_NAME: [bool; 256] = {
    let mut table = [false; 256];
    let mut byte = 0;
    while byte < 256 {
        table[byte] = (byte as u8).is_ascii_alphanumeric();
        byte += 1;
    }
    let others = b"-._~%!$&'()*+,;=";
    let mut i = 0;
    while i < others.len() {
        table[others[i] as usize] = true;
        i += 1;
    }
    table
};

/// Refuses a request body in a transfer coding other than chunked, such as
/// `gzip, chunked`: hyper removes the chunked framing, and forwarding the
/// rest without its coding would change the body.
fn check_transfer_coding(headers: &HeaderMap) -> Result<(), Refusal> {
    let codings = headers
        .get_all(header::TRANSFER_ENCODING)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii);
    let mut chunked = false;
    // Empty list elements, as in `, chunked`, count for nothing (RFC 9110,
    // section 5.6.1).
    for coding in codings.filter(|coding| !coding.is_empty()) {
        if !coding.eq_ignore_ascii_case(b"chunked") {
            return Err(Refusal::UnsupportedTransferCoding(
                String::from_utf8_lossy(coding).into_owned(),
            ));
        }
        // Chunked applied twice is invalid framing (RFC 9112, section 6.1).
        if chunked {
            return Err(Refusal::InvalidBody);
        }
        chunked = true;
    }
    Ok(())
}

/// Replaces a `Content-Length` sent as a list of one repeated value (`5, 5`,
/// or two fields of `5`) with that value. hyper accepts such a list when the
/// values agree, as RFC 9110 (section 8.6) allows, and the node returns 502
/// when they do not. An HTTP/2 client fails a stream whose length is a list.
fn single_content_length(headers: &mut HeaderMap) {
    let mut fields = headers.get_all(header::CONTENT_LENGTH).iter();
    let (Some(first), second) = (fields.next(), fields.next()) else {
        return;
    };
    if second.is_none() && !first.as_bytes().contains(&b',') {
        return;
    }
    let length = first
        .as_bytes()
        .split(|&byte| byte == b',')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if let Ok(value) = HeaderValue::from_bytes(length) {
        headers.insert(header::CONTENT_LENGTH, value);
    }
}

fn content_length(headers: &HeaderMap) -> Option<u64> {
    headers
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// Returns the client's address: the peer, or when the peer is a trusted
/// proxy, the nearest address in `X-Forwarded-For` that is not trusted.
fn client_ip(headers: &HeaderMap, peer: IpAddr, trusted: &[ipnet::IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut client = peer;
    for value in headers.get_all(&X_FORWARDED_FOR).iter().rev() {
        let Ok(value) = value.to_str() else { break };
        for hop in value.rsplit(',') {
            let Some(ip) = forwarded_ip(hop.trim()) else {
                return client;
            };
            client = ip;
            if !is_trusted(&ip) {
                return client;
            }
        }
    }
    client
}

/// Parses one `X-Forwarded-For` entry: an IP address, or an address with a
/// port as some proxies write it (`1.2.3.4:5678`, `[::1]:5678`). An
/// IPv4-mapped IPv6 address becomes the IPv4 address, so that one client
/// has one rate-limit key whichever form a proxy wrote.
fn forwarded_ip(hop: &str) -> Option<IpAddr> {
    let ip = hop
        .parse::<IpAddr>()
        .or_else(|_| hop.parse::<SocketAddr>().map(|addr| addr.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

/// Returns this hop's `Forwarded` element (RFC 7239, section 4): the peer,
/// with an IPv6 address in brackets and quotes, and the protocol.
fn forwarded_element(peer: IpAddr, proto: &str) -> HeaderValue {
    let element = match peer {
        IpAddr::V4(ip) => format!("for={ip};proto={proto}"),
        IpAddr::V6(ip) => format!("for=\"[{ip}]\";proto={proto}"),
    };
    HeaderValue::from_str(&element).expect("an IP address and a scheme form a valid header value")
}

pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Headers that describe one connection and never cross a proxy (RFC 9110,
/// section 7.6.1), besides those the `Connection` header names.
static HOP_BY_HOP: [HeaderName; 10] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::PROXY_AUTHENTICATE,
    header::PROXY_AUTHORIZATION,
    // The settings of an `Upgrade: h2c` request, which belong to its
    // connection (RFC 7540, section 3.2.1).
    HeaderName::from_static("http2-settings"),
];

/// The presence in a request head of the fields that the node removes,
/// reads or replaces on every request: a bit each, those of [`HOP_BY_HOP`]
/// first. One pass over the names finds them, and the node looks up only
/// those present, because looking up an absent name still costs a hash of
/// it. A clear bit means the field is absent; a set bit, that it may be
/// there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RequestFields(u32);

impl RequestFields {
    const TRANSFER_ENCODING: u32 = 1 << 5;
    const EXPECT: u32 = 1 << 10;
    const FORWARDED: u32 = 1 << 11;
    const VIA: u32 = 1 << 12;
    const CONTENT_LENGTH: u32 = 1 << 13;
    const X_FORWARDED_FOR: u32 = 1 << 14;
    const REQUEST_ID: u32 = 1 << 15;
    const TRACEPARENT: u32 = 1 << 16;
    const TRACESTATE: u32 = 1 << 17;

    /// Any field may be present, as after workers changed the head.
    const UNKNOWN: RequestFields = RequestFields(u32::MAX);

    fn scan(headers: &HeaderMap) -> RequestFields {
        let mut present = 0;
        for name in headers.keys() {
            if let Some(index) = field_index(name) {
                present |= 1 << index;
            }
        }
        RequestFields(present)
    }

    fn may_have(self, field: u32) -> bool {
        self.0 & field != 0
    }

    /// The bits of [`HOP_BY_HOP`], as [`hop_by_hop_present`] returns them.
    fn hop_by_hop(self) -> u16 {
        (self.0 & ((1 << HOP_BY_HOP.len()) - 1)) as u16
    }
}

/// Removes hop-by-hop headers, including every header named in
/// `Connection`, except `Host` and `Content-Length`: a peer cannot strip
/// those, because the message means something else without them. Returns
/// the names that `Connection` gave.
pub fn remove_hop_by_hop(headers: &mut HeaderMap) -> Vec<HeaderName> {
    remove_present_hop_by_hop(headers, hop_by_hop_present(headers))
}

/// Returns which of [`HOP_BY_HOP`] the headers hold, a bit per index. One
/// pass over the names finds them: most messages carry none, or only
/// `Connection: keep-alive`, so looking for each name would cost a hashed
/// lookup apiece.
fn hop_by_hop_present(headers: &HeaderMap) -> u16 {
    let mut present = 0u16;
    for name in headers.keys() {
        if let Some(index) = hop_by_hop_index(name) {
            present |= 1 << index;
        }
    }
    present
}

/// The bit of `Upgrade`, `HOP_BY_HOP[6]`, in [`hop_by_hop_present`]'s
/// result.
const UPGRADE_PRESENT: u16 = 1 << 6;

/// Works as [`remove_hop_by_hop`] does, given which hop-by-hop headers are
/// present.
fn remove_present_hop_by_hop(headers: &mut HeaderMap, present: u16) -> Vec<HeaderName> {
    if present == 0 {
        return Vec::new();
    }
    // `Connection` is HOP_BY_HOP[0]. The options `keep-alive` and `close`
    // name no other header than `Keep-Alive`, which is on the list anyway.
    let mut named = Vec::new();
    if present & 1 != 0 && !only_connection_options(headers) {
        // The options are split as bytes, not text, so one option with a byte
        // outside ASCII does not keep the others from being removed.
        named = headers
            .get_all(header::CONNECTION)
            .iter()
            .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
            .map(<[u8]>::trim_ascii)
            .filter(|option| {
                !option.is_empty()
                    && !option.eq_ignore_ascii_case(b"keep-alive")
                    && !option.eq_ignore_ascii_case(b"close")
            })
            .filter_map(|name| HeaderName::from_bytes(name).ok())
            .filter(|name| *name != header::HOST && *name != header::CONTENT_LENGTH)
            .collect();
        for name in &named {
            headers.remove(name);
        }
    }
    for (index, name) in HOP_BY_HOP.iter().enumerate() {
        if present & (1 << index) != 0 {
            headers.remove(name);
        }
    }
    named
}

/// True when the only `Connection` value is `keep-alive` or `close`, as on
/// most messages, which then name no header to remove.
fn only_connection_options(headers: &HeaderMap) -> bool {
    let mut values = headers.get_all(header::CONNECTION).iter();
    match (values.next(), values.next()) {
        (Some(value), None) => {
            let value = value.as_bytes();
            value.eq_ignore_ascii_case(b"keep-alive") || value.eq_ignore_ascii_case(b"close")
        }
        _ => false,
    }
}

/// Returns the index of `name` in [`HOP_BY_HOP`].
fn hop_by_hop_index(name: &HeaderName) -> Option<usize> {
    field_index(name).filter(|&index| index < HOP_BY_HOP.len())
}

/// Returns the bit of `name` in [`RequestFields`]. A match on the text
/// compiles to a switch on its length, cheaper than comparing with each name.
fn field_index(name: &HeaderName) -> Option<usize> {
    let index = match name.as_str() {
        "connection" => 0,
        "keep-alive" => 1,
        "proxy-connection" => 2,
        "te" => 3,
        "trailer" => 4,
        "transfer-encoding" => 5,
        "upgrade" => 6,
        "proxy-authenticate" => 7,
        "proxy-authorization" => 8,
        "http2-settings" => 9,
        "expect" => 10,
        "forwarded" => 11,
        "via" => 12,
        "content-length" => 13,
        "x-forwarded-for" => 14,
        "x-request-id" => 15,
        "traceparent" => 16,
        "tracestate" => 17,
        _ => return None,
    };
    debug_assert!(index >= HOP_BY_HOP.len() || HOP_BY_HOP[index] == name);
    Some(index)
}

/// Checks one entry of a route's `response_headers` and returns it as a
/// header, or returns the reason it cannot be one.
pub(crate) fn response_header(
    name: &str,
    value: &str,
) -> Result<(HeaderName, HeaderValue), String> {
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if is_managed(&header_name) {
        return Err(format!(
            "{name} is a framing or hop-by-hop header, which the node sets itself"
        ));
    }
    let header_value = HeaderValue::from_str(value)
        .map_err(|_| format!("{value:?} is not a valid header value"))?;
    Ok((header_name, header_value))
}

/// Checks one entry of a route's `remove_request_headers` and returns it as
/// a header name, or returns the reason the node cannot remove it.
pub(crate) fn removable_request_header(name: &str) -> Result<HeaderName, String> {
    let header_name = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("{name:?} is not a valid header name"))?;
    if header_name == header::HOST {
        return Err("host names the upstream's virtual host, and a request needs it".to_owned());
    }
    let forwarding = [
        &X_FORWARDED_FOR,
        &X_FORWARDED_PROTO,
        &X_FORWARDED_HOST,
        &header::FORWARDED,
        &header::VIA,
    ];
    if forwarding.contains(&&header_name) {
        return Err(format!(
            "{name} is a forwarding header, which the node reads from trusted proxies and sets \
             itself"
        ));
    }
    if is_managed(&header_name) {
        return Err(format!(
            "{name} is a framing or hop-by-hop header, which the node handles itself"
        ));
    }
    Ok(header_name)
}

/// True for headers that describe the message framing or the connection,
/// which the node sets itself: `Content-Length` and the hop-by-hop headers.
/// Returns whether an element of the request's `Via` is `via`, the element
/// this node adds to the requests it sends. Such a request came back through
/// an upstream or a worker fetch that leads to the node.
fn names_this_node(headers: &HeaderMap, via: &HeaderValue) -> bool {
    headers.get_all(header::VIA).iter().any(|value| {
        value
            .as_bytes()
            .split(|&byte| byte == b',')
            .any(|element| element.trim_ascii() == via.as_bytes())
    })
}

fn is_managed(name: &HeaderName) -> bool {
    *name == header::CONTENT_LENGTH || is_hop_by_hop(name)
}

/// Returns whether `name` is one of [`HOP_BY_HOP`].
pub(crate) fn is_hop_by_hop(name: &HeaderName) -> bool {
    hop_by_hop_index(name).is_some()
}

/// Turns the request head into the one sent upstream: origin-form URI with
/// the normalised (or worker-set) path, `Host` kept, and the forwarding
/// headers set. Hop-by-hop headers were removed on arrival, and workers
/// cannot set them.
fn prepare_upstream_request(
    parts: &mut Parts,
    fields: RequestFields,
    new_path: Option<&str>,
    connection: &Connection,
    upstream_name: &str,
    node: &Node,
) -> Result<(), Refusal> {
    let path_and_query = match new_path {
        Some(path) => {
            let text = match parts.uri.query() {
                Some(query) => format!("{path}?{}", encode_query(query)),
                None => path.to_owned(),
            };
            PathAndQuery::try_from(text).map_err(|e| Refusal::InvalidPath(e.to_string()))?
        }
        None => parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/")),
    };
    parts.uri = Uri::from(path_and_query);
    // An absolute-form target with neither path nor query (`http://host#top`)
    // leaves an empty one, which hyper would send as an empty request target.
    // HTTP/1.1 requires `/` there (RFC 9112, section 3.2.1).
    if parts.uri.path().is_empty() {
        parts.uri = Uri::from_static("/");
    }
    parts.version = http::Version::HTTP_11;

    let headers = &mut parts.headers;
    // The node answered any `Expect: 100-continue` itself.
    if fields.may_have(RequestFields::EXPECT) {
        headers.remove(header::EXPECT);
    }
    match headers.get(header::HOST).cloned() {
        Some(host) => {
            headers.insert(X_FORWARDED_HOST.clone(), host);
        }
        // An HTTP/1.0 request may come without Host, but the request sent
        // upstream is HTTP/1.1, which requires one: the upstream's name, as
        // nginx sends its `proxy_host`.
        None => {
            if let Ok(name) = HeaderValue::from_str(upstream_name) {
                headers.insert(header::HOST, name);
            }
        }
    }
    let client_chain = fields.may_have(RequestFields::X_FORWARDED_FOR) && connection.peer_trusted;
    let forwarded_for = match client_chain && headers.contains_key(&X_FORWARDED_FOR) {
        true => {
            // Bytes, not text: an earlier hop's value may hold obs-text,
            // which is a valid header value but not UTF-8.
            let mut joined = Vec::new();
            for value in headers.get_all(&X_FORWARDED_FOR) {
                // An empty value names no hop, and would leave an empty
                // element in the list.
                let hops = value.as_bytes().trim_ascii();
                if !hops.is_empty() {
                    joined.extend_from_slice(hops);
                    joined.extend_from_slice(b", ");
                }
            }
            if joined.is_empty() {
                connection.peer_header.clone()
            } else {
                joined.extend_from_slice(connection.peer_header.as_bytes());
                crate::header_value::shared(&joined).expect(
                    "header values joined by \", \" and an IP address form a valid header value",
                )
            }
        }
        false => connection.peer_header.clone(),
    };
    headers.insert(X_FORWARDED_FOR.clone(), forwarded_for);
    let proto = if connection.secure { "https" } else { "http" };
    // RFC 7239 `Forwarded` carries the same claims as `X-Forwarded-For`, so
    // only a trusted proxy's chain goes on, with this hop added to it.
    if fields.may_have(RequestFields::FORWARDED) && headers.contains_key(header::FORWARDED) {
        if connection.peer_trusted {
            headers.append(
                header::FORWARDED,
                forwarded_element(connection.peer.ip(), proto),
            );
        } else {
            headers.remove(header::FORWARDED);
        }
    }
    headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    headers.append(header::VIA, node.via.clone());
    Ok(())
}

/// Builds the request record workers see.
fn worker_request(
    parts: &Parts,
    path: &str,
    client_ip: IpAddr,
    route: &Route,
    params: Vec<(String, String)>,
) -> wit::Request {
    wit::Request {
        method: parts.method.as_str().to_owned(),
        path: path.to_owned(),
        query: parts.uri.query().map(str::to_owned),
        headers: crate::worker::wit_headers(&parts.headers),
        client_addr: client_ip.to_string(),
        route: route.name.to_string(),
        params,
    }
}

/// Applies a worker's request changes to the outgoing headers and to the
/// view later workers see. Returns why a change is invalid.
fn apply_request_changes(
    changes: wit::RequestChanges,
    headers: &mut HeaderMap,
    view: &mut wit::Request,
    path: &mut Option<String>,
) -> Result<(), String> {
    apply_header_changes(
        headers,
        Some(&mut view.headers),
        &changes.remove_headers,
        changes.set_headers,
    )?;
    if let Some(new_path) = changes.path {
        if new_path.len() > MAX_WORKER_PATH {
            return Err(format!(
                "set a path of {} bytes; the maximum is {MAX_WORKER_PATH}",
                new_path.len()
            ));
        }
        if !new_path.starts_with('/') || new_path.bytes().any(|b| b < 0x20 || b == 0x7f) {
            return Err(format!(
                "set an invalid path {new_path:?}; a path starts with '/' and has no \
                 control characters"
            ));
        }
        let new_path = resolve_dot_segments(&new_path);
        view.path.clone_from(&new_path);
        *path = Some(new_path);
    }
    Ok(())
}

/// The longest path a worker may set, in bytes. A request target may have
/// at most 65,534 bytes here. A shorter path that percent-encoding and the
/// client's query make longer than that fails the worker when it is sent.
const MAX_WORKER_PATH: usize = 16 * 1024;

/// The maximum number of headers a worker may set, or remove, in one list.
/// More would cost the node time its CPU deadline does not count, and a
/// header map has room for about 24,000 entries at most.
const MAX_HEADER_CHANGES: usize = 1000;

/// Applies a worker's header changes to `headers`, and to the worker
/// request `view` when later workers see it. Takes time linear in the
/// changes and the headers.
fn apply_header_changes(
    headers: &mut HeaderMap,
    view: Option<&mut Vec<wit::Header>>,
    remove: &[String],
    set: Vec<wit::Header>,
) -> Result<(), String> {
    for (verb, count) in [("set", set.len()), ("removed", remove.len())] {
        if count > MAX_HEADER_CHANGES {
            return Err(format!(
                "{verb} {count} headers; a worker may set, or remove, at most \
                 {MAX_HEADER_CHANGES} in one call"
            ));
        }
    }
    // One header set, the common case, needs no record of names.
    if remove.is_empty() && set.len() == 1 {
        let wit::Header { name, value } = set.into_iter().next().expect("one header");
        let (parsed, header_value) = checked_header(&name, &value)?;
        headers
            .try_insert(parsed.clone(), header_value)
            .map_err(|_| too_many_headers(&name))?;
        if let Some(view) = view {
            view.retain(|h| h.name != parsed.as_str());
            view.push(view_header(name, &parsed, value));
        }
        return Ok(());
    }

    // Names whose earlier values are gone: removed, or replaced by the
    // first value set for the name.
    let mut replaced: HashSet<HeaderName> = HashSet::new();
    for name in remove {
        let parsed = HeaderName::from_bytes(name.as_bytes())
            .map_err(|_| format!("removed an invalid header name {name:?}"))?;
        headers.remove(&parsed);
        replaced.insert(parsed);
    }
    let mut added = Vec::new();
    // The first value listed for a name replaces the earlier ones; further
    // values of that name in the same list are added beside it.
    let mut set_names: HashSet<HeaderName> = HashSet::new();
    for wit::Header { name, value } in set {
        let (parsed, header_value) = checked_header(&name, &value)?;
        let stored = if set_names.contains(&parsed) {
            headers.try_append(parsed.clone(), header_value).map(drop)
        } else {
            set_names.insert(parsed.clone());
            replaced.insert(parsed.clone());
            headers.try_insert(parsed.clone(), header_value).map(drop)
        };
        stored.map_err(|_| too_many_headers(&name))?;
        if view.is_some() {
            added.push(view_header(name, &parsed, value));
        }
    }
    if let Some(view) = view {
        let replaced: HashSet<&str> = replaced.iter().map(HeaderName::as_str).collect();
        view.retain(|h| !replaced.contains(h.name.as_str()));
        view.append(&mut added);
    }
    Ok(())
}

/// Checks a header a worker set: a valid name the node does not manage,
/// and a valid value.
fn checked_header(name: &str, value: &str) -> Result<(HeaderName, HeaderValue), String> {
    let parsed = HeaderName::from_bytes(name.as_bytes())
        .map_err(|_| format!("set an invalid header name {name:?}"))?;
    if is_managed(&parsed) {
        return Err(format!(
            "set the header {name:?}, which the node manages for each connection"
        ));
    }
    let value = HeaderValue::from_str(value)
        .map_err(|_| format!("set an invalid value for header {name:?}"))?;
    Ok((parsed, value))
}

fn too_many_headers(name: &str) -> String {
    format!("set more headers than a header map holds, at {name:?}")
}

/// Returns a header as workers see it: its name in lower case, as the node
/// stores names.
fn view_header(name: String, parsed: &HeaderName, value: String) -> wit::Header {
    let name = if name == parsed.as_str() {
        name
    } else {
        parsed.as_str().to_owned()
    };
    wit::Header { name, value }
}

/// Builds the response a worker chose to send itself.
fn worker_response(response: wit::Response) -> Result<Response<ResponseBody>, String> {
    let status = StatusCode::from_u16(response.status)
        .ok()
        .filter(|status| status.as_u16() >= 200)
        .ok_or_else(|| format!("responded with an invalid status {}", response.status))?;
    // The node frames the body itself, so the worker's framing and
    // connection headers are dropped rather than refused.
    let own_headers = response
        .headers
        .into_iter()
        .filter(|h| HeaderName::from_bytes(h.name.as_bytes()).map_or(true, |n| !is_managed(&n)))
        .collect();
    let mut headers = HeaderMap::new();
    apply_header_changes(&mut headers, None, &[], own_headers)?;
    // A 204 or 304 has no content (RFC 9110, sections 15.3.5 and 15.4.5).
    // HTTP/2 clients fail a stream whose 204 carries a body or a length.
    let body = if matches!(status, StatusCode::NO_CONTENT | StatusCode::NOT_MODIFIED) {
        Bytes::new()
    } else {
        Bytes::from(response.body)
    };
    let mut built = Response::new(ResponseBody::full(body));
    *built.status_mut() = status;
    *built.headers_mut() = headers;
    Ok(built)
}

async fn run_response_hooks<B>(
    node: &Node,
    route: &Route,
    view: &wit::Request,
    context: &mut RequestContext,
    response: &mut Response<B>,
    exchange: &mut Exchange,
) -> Result<(), Refusal> {
    let hooked = route.workers.iter().enumerate().rev();
    for (worker_index, binding) in hooked.filter(|(_, w)| w.response_hook) {
        let head = wit::ResponseHead {
            status: response.status().as_u16(),
            headers: crate::worker::wit_headers(response.headers()),
        };
        let (origin, span_id) = fetch_origin(node, route, exchange);
        let started = Instant::now();
        let changes = node
            .runtime
            .on_response(binding, view, &head, context, origin)
            .await;
        note_worker_call(
            node,
            exchange,
            binding,
            (worker_index, Phase::Response),
            span_id,
            started,
            changes.is_err(),
        );
        note_context(exchange, context);
        let changes = changes.map_err(|e| worker_refusal(route, binding, exchange, e))?;
        apply_header_changes(
            response.headers_mut(),
            None,
            &changes.remove_headers,
            changes.set_headers,
        )
        .map_err(|reason| invalid_decision(route, binding, exchange, &reason))?;
        remove_hop_by_hop(response.headers_mut());
    }
    Ok(())
}

/// Logs a failed worker call with its route and module, and returns the
/// refusal to send.
fn worker_refusal(
    route: &Route,
    binding: &Binding,
    exchange: &Exchange,
    error: WorkerError,
) -> Refusal {
    let refusal = match &error {
        WorkerError::Busy => Refusal::WorkerBusy,
        WorkerError::Timeout(_) => Refusal::WorkerTimeout,
        WorkerError::Failed(_) => Refusal::WorkerFailed,
    };
    if let Some(suppressed) = binding.log_throttle.admit() {
        match exchange.request_id.as_ref().and_then(|id| id.to_str().ok()) {
            Some(request_id) => tracing::warn!(
                route = %route.name,
                worker = binding.module_name(),
                request_id = %request_id,
                error = %error,
                suppressed,
                "worker call failed"
            ),
            None => tracing::warn!(
                route = %route.name,
                worker = binding.module_name(),
                error = %error,
                suppressed,
                "worker call failed"
            ),
        }
    }
    refusal
}

fn invalid_decision(
    route: &Route,
    binding: &Binding,
    exchange: &Exchange,
    reason: &str,
) -> Refusal {
    worker_refusal(
        route,
        binding,
        exchange,
        WorkerError::Failed(format!("worker {reason}")),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn forwarded_ip_reads_ports_and_mapped_addresses() {
        let v4: IpAddr = "9.9.9.9".parse().unwrap();
        assert_eq!(forwarded_ip("9.9.9.9"), Some(v4));
        assert_eq!(forwarded_ip("9.9.9.9:1234"), Some(v4));
        assert_eq!(forwarded_ip("::ffff:9.9.9.9"), Some(v4));
        assert_eq!(forwarded_ip("[::ffff:9.9.9.9]:80"), Some(v4));
        assert_eq!(forwarded_ip("[2001:db8::1]:80"), "2001:db8::1".parse().ok());
        assert_eq!(forwarded_ip("unknown"), None);
    }

    #[test]
    fn check_host_accepts_names_addresses_and_ports() {
        for host in [
            "example.com",
            "example.com:8080",
            "127.0.0.1",
            "127.0.0.1:80",
            "[::1]",
            "[::1]:8443",
            "[::ffff:127.0.0.1]",
            "example.com:",
            "xn--bcher-kva.example",
        ] {
            assert_eq!(check_host(host.as_bytes()), Ok(()), "{host}");
        }
    }

    #[test]
    fn check_host_rejects_bad_values() {
        for host in [
            "",
            ":80",
            "evil.com/x?",
            "a b",
            "a@evil.com",
            "u:p@abs.example",
            "api.example.com:abc",
            "api.example.com:123456",
            "example.com:99999",
            "[::1",
            "[:::::]",
            "[1.2.3.4]",
            "[zz]",
            "[::1]x",
            "a..example.com",
            ".example.com",
            "..",
        ] {
            assert!(check_host(host.as_bytes()).is_err(), "{host:?} passed");
        }
        assert_eq!(
            check_host(b"u:p@abs.example"),
            Err("has userinfo (`user@`), which is not allowed")
        );
    }

    #[test]
    fn upgrade_bit_is_upgrade() {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        assert_eq!(hop_by_hop_present(&headers), UPGRADE_PRESENT);
    }

    #[test]
    fn request_fields_found_in_one_pass() {
        let mut headers = HeaderMap::new();
        headers.insert(header::HOST, HeaderValue::from_static("example.com"));
        headers.insert("x-other", HeaderValue::from_static("1"));
        let none = RequestFields::scan(&headers);
        assert_eq!(none, RequestFields(0));
        for (name, field) in [
            ("transfer-encoding", RequestFields::TRANSFER_ENCODING),
            ("expect", RequestFields::EXPECT),
            ("forwarded", RequestFields::FORWARDED),
            ("via", RequestFields::VIA),
            ("content-length", RequestFields::CONTENT_LENGTH),
            ("x-forwarded-for", RequestFields::X_FORWARDED_FOR),
            ("x-request-id", RequestFields::REQUEST_ID),
            ("traceparent", RequestFields::TRACEPARENT),
            ("tracestate", RequestFields::TRACESTATE),
        ] {
            let mut with = headers.clone();
            with.insert(name, HeaderValue::from_static("1"));
            let fields = RequestFields::scan(&with);
            assert!(fields.may_have(field), "{name}");
            assert_eq!(fields, RequestFields(field), "{name}");
            assert!(RequestFields::UNKNOWN.may_have(field));
        }
        headers.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        headers.insert(header::VIA, HeaderValue::from_static("1.1 a"));
        let fields = RequestFields::scan(&headers);
        assert_eq!(fields.hop_by_hop(), UPGRADE_PRESENT);
        assert_eq!(fields.hop_by_hop(), hop_by_hop_present(&headers));
    }

    #[test]
    fn hop_by_hop_with_non_ascii_option() {
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-a, \xff").expect("obs-text is a valid value"),
        );
        headers.append(header::CONNECTION, HeaderValue::from_static("close"));
        headers.insert("x-a", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut headers);
        assert!(headers.get("x-a").is_none());
        assert!(headers.get(header::CONNECTION).is_none());
    }

    #[test]
    fn hop_by_hop_removes_a_lone_connection_option() {
        for option in ["keep-alive", "Close"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONNECTION, HeaderValue::from_static(option));
            headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
            headers.insert("x-end", HeaderValue::from_static("1"));
            remove_hop_by_hop(&mut headers);
            assert!(headers.get(header::CONNECTION).is_none(), "{option}");
            assert!(headers.get("keep-alive").is_none(), "{option}");
            assert!(headers.get("x-end").is_some(), "{option}");
        }
    }

    #[test]
    fn hop_by_hop_removes_connection_named_headers() {
        let mut headers = HeaderMap::new();
        headers.insert(header::CONNECTION, HeaderValue::from_static("close, x-hop"));
        headers.insert("x-hop", HeaderValue::from_static("1"));
        headers.insert("x-end", HeaderValue::from_static("1"));
        headers.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        remove_hop_by_hop(&mut headers);
        assert!(headers.get("x-hop").is_none());
        assert!(headers.get("keep-alive").is_none());
        assert!(headers.get(header::CONNECTION).is_none());
        assert!(headers.get("x-end").is_some());
    }

    #[test]
    fn repeated_set_header_keeps_each_value() {
        let header = |name: &str, value: &str| wit::Header {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        let mut headers = HeaderMap::new();
        headers.insert("set-cookie", HeaderValue::from_static("old=1"));
        headers.insert("x-one", HeaderValue::from_static("old"));
        let mut view = vec![header("set-cookie", "old=1"), header("x-one", "old")];
        let set = vec![
            header("set-cookie", "a=1"),
            header("x-one", "new"),
            header("set-cookie", "b=2"),
        ];
        apply_header_changes(&mut headers, Some(&mut view), &[], set).unwrap();
        let cookies: Vec<_> = headers.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
        assert_eq!(headers.get_all("x-one").iter().collect::<Vec<_>>(), ["new"]);
        let view_cookies: Vec<_> = view
            .iter()
            .filter(|h| h.name == "set-cookie")
            .map(|h| h.value.as_str())
            .collect();
        assert_eq!(view_cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn header_changes_over_the_cap_fail() {
        let many = |count: usize| -> Vec<wit::Header> {
            (0..count)
                .map(|i| wit::Header {
                    name: format!("x-h{i}"),
                    value: "v".to_owned(),
                })
                .collect()
        };
        let mut headers = HeaderMap::new();
        let error = apply_header_changes(&mut headers, None, &[], many(30_000)).unwrap_err();
        assert!(error.contains("set 30000 headers"), "{error}");
        assert!(headers.is_empty());

        let removed: Vec<String> = (0..1001).map(|i| format!("x-h{i}")).collect();
        let error = apply_header_changes(&mut headers, None, &removed, Vec::new()).unwrap_err();
        assert!(error.contains("removed 1001 headers"), "{error}");

        let mut view = Vec::new();
        apply_header_changes(&mut headers, Some(&mut view), &[], many(1000)).unwrap();
        assert_eq!(headers.len(), 1000);
        assert_eq!(view.len(), 1000);
    }

    #[test]
    fn removed_and_replaced_names_leave_the_view() {
        let header = |name: &str, value: &str| wit::Header {
            name: name.to_owned(),
            value: value.to_owned(),
        };
        let mut headers = HeaderMap::new();
        let mut view = vec![
            header("x-gone", "1"),
            header("x-kept", "2"),
            header("x-new", "old"),
        ];
        let set = vec![
            header("X-New", "a"),
            header("x-new", "b"),
            header("x-other", "c"),
        ];
        apply_header_changes(&mut headers, Some(&mut view), &["x-gone".to_owned()], set).unwrap();
        let names: Vec<_> = view
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_str()))
            .collect();
        assert_eq!(
            names,
            [
                ("x-kept", "2"),
                ("x-new", "a"),
                ("x-new", "b"),
                ("x-other", "c")
            ]
        );
    }

    #[test]
    fn client_ip_walks_trusted_forwarded_for() {
        let trusted: Vec<ipnet::IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let mut headers = HeaderMap::new();
        headers.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 10.1.1.1"),
        );
        let peer: IpAddr = "10.0.0.1".parse().unwrap();
        assert_eq!(
            client_ip(&headers, peer, &trusted),
            "203.0.113.9".parse::<IpAddr>().unwrap()
        );
        let untrusted_peer: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(
            client_ip(&headers, untrusted_peer, &trusted),
            untrusted_peer
        );
    }
}
