//! The per-request state that the pipeline fills as a request passes its
//! stages, and the last step that reads it: the observability headers, the
//! RED metrics and the access-log record.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use http::header::{HeaderName, HeaderValue, CONTENT_LENGTH};
use http::{Method, Response, Uri, Version};

use crate::access_log::{AccessLog, LoggedBody, Record};
use crate::header_value;
use crate::metrics::Reason;
use crate::node::{Node, RouteObserve};
use crate::proxy::ResponseBody;
use crate::trace::{AttributeValue, RequestSpans, TraceContext, X_REQUEST_ID};

/// `X-Request-Duration`: the time the request spent in the node.
pub static X_REQUEST_DURATION: HeaderName = HeaderName::from_static("x-request-duration");
/// `X-Gateway-Node`: the name of the node that served the request.
pub static X_GATEWAY_NODE: HeaderName = HeaderName::from_static("x-gateway-node");

/// What the node learns about one request while it handles it.
#[derive(Debug)]
pub struct Exchange {
    pub started: Instant,
    /// The request id sent upstream and on the response, unless the route
    /// turns it off.
    pub request_id: Option<HeaderValue>,
    /// The trace context, on routes that pass it on or when the node
    /// exports spans.
    pub trace: Option<TraceContext>,
    /// The request's spans, when the node exports them over OTLP.
    pub spans: Option<RequestSpans>,
    /// The client's address, from `X-Forwarded-For` behind a trusted
    /// proxy, once the pipeline has worked it out; until then the access log
    /// records the connection's peer.
    pub client: Option<IpAddr>,
    /// Index into [`Node::routes`], once a route matched.
    pub route: Option<usize>,
    /// Index into [`Node::upstreams`], once an upstream was chosen.
    pub upstream: Option<usize>,
    /// The target of the upstream's last attempt.
    pub target: Option<SocketAddr>,
    /// Why the request ended as it did; a refusal overrides it.
    pub reason: Reason,
    pub ratelimit_time: Duration,
    pub worker_time: Duration,
    /// Time from sending the request upstream until its response head.
    pub upstream_time: Duration,
    /// The time the request went upstream, kept until its response head
    /// arrives. A request dropped before then, such as by the drain, counts
    /// the wait so far as its upstream time.
    pub upstream_since: Option<Instant>,
    /// Time worker calls waited for their fetches.
    pub fetch_wait: Duration,
    /// The user id a worker set on the request context as `user`, for the
    /// access log. The pipeline fills it from the context once workers can
    /// set context values.
    pub user: Option<String>,
    /// The request line, kept for the access log when it is on.
    request_line: Option<RequestLine>,
}

#[derive(Debug)]
struct RequestLine {
    time: SystemTime,
    method: Method,
    uri: Uri,
    version: Version,
    bytes_in: Option<u64>,
    /// The connection's peer, for a line written when the request is
    /// dropped before the pipeline worked out the client.
    peer: IpAddr,
    log: Arc<AccessLog>,
}

/// The observability headers of requests that matched no route.
const UNROUTED: RouteObserve = RouteObserve {
    request_id: true,
    request_duration: true,
    gateway_node: true,
    trace_context: true,
};

impl Exchange {
    /// Starts the state of a request that arrived at `started`, keeping its
    /// request line when the node writes an access log. `client_id` is
    /// `false` when the request is known to carry no `X-Request-Id`.
    pub fn new<B>(
        node: &Node,
        request: &http::Request<B>,
        client_id: bool,
        started: Instant,
        peer: IpAddr,
    ) -> Exchange {
        let request_line = node.access_log.as_ref().map(|log| RequestLine {
            peer,
            log: Arc::clone(log),
            time: SystemTime::now(),
            method: request.method().clone(),
            uri: request.uri().clone(),
            version: request.version(),
            bytes_in: request
                .headers()
                .get(CONTENT_LENGTH)
                .and_then(|value| value.to_str().ok())
                .and_then(|value| value.parse().ok()),
        });
        let request_id = node.request_ids.then(|| {
            if client_id {
                crate::trace::request_id(request.headers())
            } else {
                crate::trace::new_request_id()
            }
        });
        Exchange {
            started,
            request_id,
            trace: None,
            spans: None,
            client: None,
            route: None,
            upstream: None,
            target: None,
            reason: Reason::Proxied,
            ratelimit_time: Duration::ZERO,
            worker_time: Duration::ZERO,
            upstream_time: Duration::ZERO,
            upstream_since: None,
            fetch_wait: Duration::ZERO,
            user: None,
            request_line,
        }
    }

    /// The route's observability switches, or the defaults before routing.
    pub fn observe<'a>(&self, node: &'a Node) -> &'a RouteObserve {
        match self.route {
            Some(index) => &node.routes[index].observe,
            None => &UNROUTED,
        }
    }

    /// Adds the observability headers to the response, records the RED
    /// metrics and wraps the body to write the access-log line when it
    /// ends.
    pub fn finish(
        mut self,
        node: &Node,
        client: IpAddr,
        mut response: Response<ResponseBody>,
    ) -> Response<ResponseBody> {
        let head = self.started.elapsed();
        let status = response.status().as_u16();
        if let Some(spans) = self.spans.take() {
            self.send_spans(node, spans, status);
        }
        if node.request_metrics {
            let route = node.metrics.route(self.route);
            route.record(self.upstream, status, self.reason, head);
            if let (Some(upstream), false) = (self.upstream, self.upstream_time.is_zero()) {
                route.upstream(upstream, self.upstream_time);
            }
        }
        let observe = self.observe(node);
        let headers = response.headers_mut();
        if observe.request_duration {
            let gateway = head.saturating_sub(self.upstream_time + self.fetch_wait);
            headers.insert(X_REQUEST_DURATION.clone(), duration_value(gateway));
        }
        if observe.gateway_node {
            headers.insert(X_GATEWAY_NODE.clone(), node.gateway_node.clone());
        }
        if observe.request_id {
            if let Some(id) = &self.request_id {
                headers.insert(X_REQUEST_ID.clone(), id.clone());
            }
        }
        let Some(line) = self.request_line.take() else {
            return response;
        };
        let (record, log) = self.record(line, client, status, head);
        response.map(|body| ResponseBody::Logged(Box::new(LoggedBody::new(body, record, log))))
    }

    /// Builds the access-log record of the request, whose response head
    /// took `head`, and returns it with the log it goes to.
    fn record(
        &mut self,
        line: RequestLine,
        client: IpAddr,
        status: u16,
        head: Duration,
    ) -> (Box<Record>, Arc<AccessLog>) {
        let record = Box::new(Record {
            time: line.time,
            started: self.started,
            // A copy, so that a long response does not keep the buffer
            // the id was cut from.
            request_id: self.request_id.take().map(|id| header_value::owned(&id)),
            trace_id: self.trace.as_ref().map(|trace| trace.trace_id),
            span_id: self.trace.as_ref().map(|trace| trace.span_id),
            client,
            method: line.method,
            uri: line.uri,
            version: line.version,
            route: self.route,
            upstream: self.upstream,
            target: self.target,
            status,
            reason: self.reason,
            bytes_in: line.bytes_in,
            bytes_out: 0,
            head,
            total: head,
            ratelimit: self.ratelimit_time,
            workers: self.worker_time,
            upstream_time: self.upstream_time,
            completed: false,
            user: self.user.take(),
        });
        (record, line.log)
    }
}

impl Drop for Exchange {
    /// Writes the access-log line of a request dropped before its response
    /// head was ready: its client went away, or the node stopped first. The
    /// line has status 499, as nginx logs such requests, and reason
    /// `client_closed`.
    fn drop(&mut self) {
        let Some(line) = self.request_line.take() else {
            return;
        };
        let client = self.client.unwrap_or(line.peer);
        self.reason = Reason::ClientClosed;
        if let Some(since) = self.upstream_since {
            self.upstream_time = since.elapsed();
        }
        let head = self.started.elapsed();
        let (record, log) = self.record(line, client, STATUS_CLIENT_CLOSED, head);
        log.send(record);
    }
}

/// The status the access log records for a request whose client went away
/// before the response, as nginx does.
const STATUS_CLIENT_CLOSED: u16 = 499;

impl Exchange {
    /// Completes the request's span with its outcome and hands every span
    /// of the request to the exporter. The span ends when the response head
    /// is ready.
    // TODO: end the request span when the response body ends, as the access
    // log's `total` does, by moving it into the logged body.
    fn send_spans(&self, node: &Node, mut spans: RequestSpans, status: u16) {
        let (Some(trace), Some(queue)) = (&self.trace, &node.spans) else {
            return;
        };
        let root = &mut spans.root_attributes;
        root.push((
            "http.response.status_code",
            AttributeValue::Int(i64::from(status)),
        ));
        root.push(("edge.reason", AttributeValue::Static(self.reason.name())));
        if let Some(upstream) = self.upstream {
            let name = node.metrics.upstream_names()[upstream].clone();
            root.push(("edge.upstream", AttributeValue::Shared(name)));
        }
        if let Some(id) = self.request_id.as_ref().and_then(|id| id.to_str().ok()) {
            root.push(("edge.request_id", AttributeValue::Owned(id.to_owned())));
        }
        let error = status >= 500;
        queue.send(spans.finish(trace, (self.started, std::time::Instant::now()), error));
    }
}

/// Formats a duration as milliseconds with three decimals, such as
/// `0.412ms`, without an allocation of its own.
fn duration_value(duration: Duration) -> HeaderValue {
    let micros = duration.as_micros();
    let mut digits = itoa::Buffer::new();
    let whole = digits.format(micros / 1000).as_bytes();
    let fraction = (micros % 1000) as u16;
    let mut text = [0u8; 48];
    text[..whole.len()].copy_from_slice(whole);
    let end = whole.len() + 6;
    text[whole.len()..end].copy_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
        b'm',
        b's',
    ]);
    header_value::shared(&text[..end]).expect("digits are a valid header value")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_value_is_milliseconds_with_three_decimals() {
        assert_eq!(duration_value(Duration::from_micros(412)), "0.412ms");
        assert_eq!(duration_value(Duration::from_micros(12_034)), "12.034ms");
        assert_eq!(duration_value(Duration::ZERO), "0.000ms");
    }
}
