//! Request identity: the `X-Request-Id` a request carries through the node,
//! and its W3C trace context (`traceparent`, `tracestate`), continued from
//! the client or started here, and passed on to upstreams. With an OTLP
//! exporter (the `otlp` cargo feature), each request also records its spans
//! here and hands them to the exporter's queue.

use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use prometheus::IntCounter;

/// `X-Request-Id`: kept from the client when valid, else generated.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// The W3C Trace Context headers.
pub static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub static TRACESTATE: HeaderName = HeaderName::from_static("tracestate");

/// The maximum length of a client `X-Request-Id` that the node keeps; a
/// longer one is replaced.
pub const MAX_REQUEST_ID_LEN: usize = 128;

/// The maximum `tracestate` length passed on. W3C Trace Context allows 32
/// entries and recommends that vendors propagate at least 512 characters.
const MAX_TRACESTATE_LEN: usize = 512;

/// Returns the client's `X-Request-Id` when it is one value of 1 to
/// [`MAX_REQUEST_ID_LEN`] characters from `A-Z a-z 0-9 - _ . : + / =`,
/// else a new random 128-bit id in 32 lower-case hex digits.
pub fn request_id(headers: &HeaderMap) -> HeaderValue {
    let mut values = headers.get_all(&X_REQUEST_ID).iter();
    if let (Some(value), None) = (values.next(), values.next()) {
        if is_valid_request_id(value.as_bytes()) {
            return value.clone();
        }
    }
    new_request_id()
}

fn is_valid_request_id(id: &[u8]) -> bool {
    (1..=MAX_REQUEST_ID_LEN).contains(&id.len())
        && id
            .iter()
            .all(|&byte| byte.is_ascii_alphanumeric() || b"-_.:+/=".contains(&byte))
}

/// Generates a random 128-bit request id as 32 lower-case hex digits.
pub fn new_request_id() -> HeaderValue {
    let mut text = [0u8; 32];
    encode_hex(&fastrand::u128(..).to_be_bytes(), &mut text);
    crate::header_value::shared(&text).expect("hex digits are a valid header value")
}

/// The trace context of one request: the trace it belongs to, the node's
/// own span in it, and the client's span when the client sent one.
#[derive(Debug, Clone)]
pub struct TraceContext {
    pub trace_id: [u8; 16],
    /// The node's span, the parent of every request the node sends on.
    pub span_id: [u8; 8],
    /// The client's span, when the request carried a valid `traceparent`.
    pub parent_id: Option<[u8; 8]>,
    /// The trace flags; bit 0 is `sampled`.
    pub flags: u8,
    /// The client's `tracestate`, passed on unchanged with a valid
    /// `traceparent` and dropped otherwise, as the specification requires.
    pub tracestate: Option<HeaderValue>,
}

impl TraceContext {
    /// Starts a new sampled trace, with a new span id for the node.
    pub fn start() -> TraceContext {
        TraceContext {
            trace_id: new_trace_id(),
            span_id: new_span_id(),
            parent_id: None,
            flags: 0x01,
            tracestate: None,
        }
    }

    /// Continues the client's trace when its `traceparent` is valid, else
    /// starts a new sampled trace. Either way the node gets a new span id.
    pub fn from_request(headers: &HeaderMap) -> TraceContext {
        let mut parents = headers.get_all(&TRACEPARENT).iter();
        let parsed = match (parents.next(), parents.next()) {
            (Some(value), None) => parse_traceparent(value.as_bytes()),
            _ => None,
        };
        match parsed {
            Some((trace_id, parent_id, flags)) => TraceContext {
                trace_id,
                span_id: new_span_id(),
                parent_id: Some(parent_id),
                flags,
                tracestate: tracestate(headers),
            },
            None => TraceContext::start(),
        }
    }

    /// Returns the `traceparent` for a request the node sends on behalf of
    /// this one (to the upstream, or a worker's outbound fetch): this trace,
    /// with the node's span as the parent.
    pub fn traceparent(&self) -> HeaderValue {
        self.traceparent_with(self.span_id)
    }

    /// Returns the `traceparent` of this trace with `parent` as the parent
    /// span, such as the node's client span of an upstream call.
    pub fn traceparent_with(&self, parent: [u8; 8]) -> HeaderValue {
        let mut text = *b"00-00000000000000000000000000000000-0000000000000000-00";
        encode_hex(&self.trace_id, &mut text[3..35]);
        encode_hex(&parent, &mut text[36..52]);
        encode_hex(&[self.flags], &mut text[53..55]);
        crate::header_value::shared(&text).expect("hex digits are a valid header value")
    }

    /// Sets `traceparent`, with `parent` as the parent span, and
    /// `tracestate` on the headers of a request the node sends on,
    /// replacing the client's. `client_state` is `false` when the headers
    /// are known to hold no `tracestate`, which then needs no removal.
    pub fn propagate(&self, parent: [u8; 8], headers: &mut HeaderMap, client_state: bool) {
        headers.insert(TRACEPARENT.clone(), self.traceparent_with(parent));
        match &self.tracestate {
            Some(state) => {
                headers.insert(TRACESTATE.clone(), state.clone());
            }
            None if client_state => {
                headers.remove(&TRACESTATE);
            }
            None => {}
        }
    }

    /// The trace id in 32 lower-case hex digits.
    pub fn trace_id_hex(&self) -> String {
        hex::encode(self.trace_id)
    }

    /// The node's span id in 16 lower-case hex digits.
    pub fn span_id_hex(&self) -> String {
        hex::encode(self.span_id)
    }
}

/// The role of a span, as OTLP's `Span.SpanKind` names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpanKind {
    /// The node handling a client's request.
    Server,
    /// A request the node sends: the upstream call or a worker fetch.
    Client,
    /// A stage inside the node: rate limits, a worker call.
    Internal,
}

/// The value of a span attribute. Values that need formatting (a method,
/// an address) are kept as they are and turned into text by the exporter,
/// off the request path.
#[derive(Debug, Clone)]
pub enum AttributeValue {
    Static(&'static str),
    Shared(Arc<str>),
    Owned(String),
    Int(i64),
    Method(http::Method),
    Ip(std::net::IpAddr),
}

/// One finished span, ready for export.
#[derive(Debug, Clone)]
pub struct SpanRecord {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_id: Option<[u8; 8]>,
    pub name: &'static str,
    pub kind: SpanKind,
    /// Start and end, in nanoseconds since the Unix epoch.
    pub start_unix_nanos: u64,
    pub end_unix_nanos: u64,
    pub attributes: Vec<(&'static str, AttributeValue)>,
    /// Whether the span ended in an error: a 5xx response, a refusal of the
    /// node, or a failed call.
    pub error: bool,
}

/// Maps the monotonic clock to wall-clock time for one request, so that
/// every span of it is timed with [`Instant`] and exported as Unix time.
#[derive(Debug, Clone, Copy)]
pub struct SpanClock {
    started: Instant,
    started_unix_nanos: u64,
}

impl SpanClock {
    /// Pairs `started` with the wall-clock time now.
    pub fn new(started: Instant) -> SpanClock {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |since| since.as_nanos() as u64);
        let started_unix_nanos = now.saturating_sub(started.elapsed().as_nanos() as u64);
        SpanClock {
            started,
            started_unix_nanos,
        }
    }

    /// Converts `at` to nanoseconds since the Unix epoch.
    pub fn unix_nanos(&self, at: Instant) -> u64 {
        let since = at.saturating_duration_since(self.started).as_nanos() as u64;
        self.started_unix_nanos.saturating_add(since)
    }
}

/// The queue between the request path and the span exporter: each request
/// hands over its spans in one message, and a full queue drops them.
#[derive(Debug, Clone)]
pub struct SpanQueue {
    sender: SyncSender<Vec<SpanRecord>>,
    dropped: IntCounter,
}

impl SpanQueue {
    /// Wraps the sending half of the exporter's channel; `dropped` counts
    /// the spans a full queue rejects.
    pub fn new(sender: SyncSender<Vec<SpanRecord>>, dropped: IntCounter) -> SpanQueue {
        SpanQueue { sender, dropped }
    }

    /// Hands `spans` to the exporter without waiting, or drops and counts
    /// them when the queue is full or the exporter has stopped.
    pub fn send(&self, spans: Vec<SpanRecord>) {
        if spans.is_empty() {
            return;
        }
        match self.sender.try_send(spans) {
            Ok(()) => {}
            Err(TrySendError::Full(spans) | TrySendError::Disconnected(spans)) => {
                self.dropped.inc_by(spans.len() as u64)
            }
        }
    }
}

/// The spans of one request, collected while it passes the pipeline and
/// sent to the exporter when its response head is ready.
#[derive(Debug)]
pub struct RequestSpans {
    pub clock: SpanClock,
    /// The finished stage spans.
    pub spans: Vec<SpanRecord>,
    /// Attributes of the request's own span, completed when it ends.
    pub root_attributes: Vec<(&'static str, AttributeValue)>,
}

impl RequestSpans {
    /// Starts the span list of a request that arrived at `started`.
    pub fn new(started: Instant) -> RequestSpans {
        RequestSpans {
            clock: SpanClock::new(started),
            spans: Vec::with_capacity(4),
            root_attributes: Vec::with_capacity(8),
        }
    }

    /// Records the request's own span (the node's span in `trace`, a child
    /// of the client's) from `started` to `ended`, and returns every span
    /// of the request.
    pub fn finish(
        mut self,
        trace: &TraceContext,
        (started, ended): (Instant, Instant),
        error: bool,
    ) -> Vec<SpanRecord> {
        self.spans.push(SpanRecord {
            trace_id: trace.trace_id,
            span_id: trace.span_id,
            parent_id: trace.parent_id,
            name: "request",
            kind: SpanKind::Server,
            start_unix_nanos: self.clock.unix_nanos(started),
            end_unix_nanos: self.clock.unix_nanos(ended),
            attributes: self.root_attributes,
            error,
        });
        self.spans
    }

    /// Records a stage of the request in `trace`: a child of the node's
    /// span unless `parent` names another.
    #[expect(
        clippy::too_many_arguments,
        reason = "each argument is one field of the span"
    )]
    pub fn record(
        &mut self,
        trace: &TraceContext,
        span_id: [u8; 8],
        parent: Option<[u8; 8]>,
        name: &'static str,
        kind: SpanKind,
        (start, end): (Instant, Instant),
        attributes: Vec<(&'static str, AttributeValue)>,
        error: bool,
    ) {
        self.spans.push(SpanRecord {
            trace_id: trace.trace_id,
            span_id,
            parent_id: Some(parent.unwrap_or(trace.span_id)),
            name,
            kind,
            start_unix_nanos: self.clock.unix_nanos(start),
            end_unix_nanos: self.clock.unix_nanos(end),
            attributes,
            error,
        });
    }
}

/// Parses a `traceparent` value (W3C Trace Context, level 1): version, trace
/// id, parent id and flags in lower-case hex. Version `ff`, an all-zero
/// trace or parent id, and upper-case hex are invalid. A later version may
/// append fields after a `-`, which are ignored.
fn parse_traceparent(value: &[u8]) -> Option<([u8; 16], [u8; 8], u8)> {
    if value.len() < 55 {
        return None;
    }
    let version = decode_hex::<1>(&value[0..2])?[0];
    if version == 0xff || (version == 0 && value.len() != 55) {
        return None;
    }
    if value.len() > 55 && value[55] != b'-' {
        return None;
    }
    if value[2] != b'-' || value[35] != b'-' || value[52] != b'-' {
        return None;
    }
    let trace_id = decode_hex::<16>(&value[3..35])?;
    let parent_id = decode_hex::<8>(&value[36..52])?;
    let flags = decode_hex::<1>(&value[53..55])?[0];
    if trace_id == [0; 16] || parent_id == [0; 8] {
        return None;
    }
    Some((trace_id, parent_id, flags))
}

/// Joins the client's `tracestate` values with commas, when they fit in
/// [`MAX_TRACESTATE_LEN`] bytes; a longer one is dropped whole rather than
/// cut inside an entry.
fn tracestate(headers: &HeaderMap) -> Option<HeaderValue> {
    let mut values = headers.get_all(&TRACESTATE).iter();
    let first = values.next()?;
    let Some(second) = values.next() else {
        return (first.len() <= MAX_TRACESTATE_LEN).then(|| first.clone());
    };
    let mut joined = Vec::with_capacity(first.len() + second.len() + 1);
    for value in [first, second].into_iter().chain(values) {
        if !joined.is_empty() {
            joined.push(b',');
        }
        joined.extend_from_slice(value.as_bytes());
        if joined.len() > MAX_TRACESTATE_LEN {
            return None;
        }
    }
    HeaderValue::from_bytes(&joined).ok()
}

fn new_trace_id() -> [u8; 16] {
    loop {
        let id = fastrand::u128(..).to_be_bytes();
        if id != [0; 16] {
            return id;
        }
    }
}

/// Generates a random, non-zero span id.
pub fn new_span_id() -> [u8; 8] {
    fastrand::u64(1..).to_be_bytes()
}

/// Writes `bytes` as lower-case hex into `out`, which is twice as long.
fn encode_hex(bytes: &[u8], out: &mut [u8]) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    for (byte, pair) in bytes.iter().zip(out.chunks_exact_mut(2)) {
        pair[0] = DIGITS[usize::from(byte >> 4)];
        pair[1] = DIGITS[usize::from(byte & 0x0f)];
    }
}

/// Decodes `2 * N` lower-case hex digits.
fn decode_hex<const N: usize>(text: &[u8]) -> Option<[u8; N]> {
    let digit = |byte: u8| match byte {
        b'0'..=b'9' => Some(byte - b'0'),
        b'a'..=b'f' => Some(byte - b'a' + 10),
        _ => None,
    };
    if text.len() != 2 * N {
        return None;
    }
    let mut out = [0u8; N];
    for (byte, pair) in out.iter_mut().zip(text.chunks_exact(2)) {
        *byte = (digit(pair[0])? << 4) | digit(pair[1])?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const VALID: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.append(*name, HeaderValue::from_static(value));
        }
        map
    }

    #[test]
    fn traceparent_continues_a_valid_trace() {
        let context = TraceContext::from_request(&headers(&[
            ("traceparent", VALID),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert_eq!(context.trace_id_hex(), "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_eq!(context.parent_id, Some(0x00f067aa0ba902b7u64.to_be_bytes()));
        assert_ne!(context.span_id, context.parent_id.unwrap());
        assert_eq!(context.flags, 1);
        let outgoing = context.traceparent();
        let outgoing = outgoing.to_str().unwrap();
        assert!(outgoing.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"));
        assert!(outgoing.ends_with("-01"));
        assert_eq!(outgoing.len(), 55);
        assert_eq!(context.tracestate.unwrap(), "congo=t61rcWkgMzE");
    }

    #[test]
    fn traceparent_rejects_invalid_values() {
        for value in [
            "",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7",
            "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            "00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",
            "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01",
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra",
            "00_4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
        ] {
            assert!(parse_traceparent(value.as_bytes()).is_none(), "{value:?}");
        }
        let later = "01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01-extra";
        assert!(parse_traceparent(later.as_bytes()).is_some());
    }

    #[test]
    fn invalid_traceparent_starts_a_trace_and_drops_tracestate() {
        let context = TraceContext::from_request(&headers(&[
            ("traceparent", "garbage"),
            ("tracestate", "congo=t61rcWkgMzE"),
        ]));
        assert!(context.parent_id.is_none());
        assert!(context.tracestate.is_none());
        assert_ne!(context.trace_id, [0; 16]);
    }

    #[test]
    fn request_id_keeps_valid_and_replaces_invalid() {
        let kept = request_id(&headers(&[("x-request-id", "abc-123_X.y:z")]));
        assert_eq!(kept, "abc-123_X.y:z");
        let long = "a".repeat(MAX_REQUEST_ID_LEN + 1);
        let mut map = HeaderMap::new();
        map.insert("x-request-id", HeaderValue::from_str(&long).unwrap());
        for map in [
            map,
            headers(&[("x-request-id", "has space")]),
            headers(&[("x-request-id", "")]),
            headers(&[("x-request-id", "a"), ("x-request-id", "b")]),
            HeaderMap::new(),
        ] {
            let id = request_id(&map);
            assert_eq!(id.len(), 32);
            assert!(id.as_bytes().iter().all(u8::is_ascii_hexdigit));
        }
    }
}
