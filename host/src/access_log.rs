//! The access log: one JSON line per request, written by a background
//! thread so that the request path never waits for the disk or a pipe.
//!
//! A request hands its [`Record`] to the writer through a bounded channel
//! when its response body ends (or the client goes away). When the channel
//! is full the record is dropped and counted in
//! `edge_access_log_dropped_total`. Request headers are never logged, so
//! `Authorization` and cookies cannot appear; query parameters whose names
//! look like credentials have their values replaced by `REDACTED`.

use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::mpsc::{self, Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context as _;
use bytes::Bytes;
use http::{HeaderValue, Method, Uri, Version};
use http_body::{Body, Frame, SizeHint};
use prometheus::IntCounter;
use serde::Serialize;

use crate::metrics::Reason;
use crate::proxy::{BoxError, ResponseBody};

/// The value that replaces a credential in a logged query string.
pub const REDACTED: &str = "REDACTED";

/// Where access-log lines go.
#[derive(Debug, Clone)]
pub enum Sink {
    Stdout,
    /// A file, appended to (created when missing).
    File(PathBuf),
}

/// The sending half of the access log, shared by every serving thread.
pub struct AccessLog {
    sender: SyncSender<Box<Record>>,
    dropped: IntCounter,
}

/// Names the writer thread needs to turn indices into text.
pub struct Names {
    pub node: String,
    pub routes: Vec<Arc<str>>,
    pub upstreams: Vec<Arc<str>>,
}

/// One request as the access log records it.
#[derive(Debug)]
pub struct Record {
    pub time: SystemTime,
    pub started: Instant,
    pub request_id: Option<HeaderValue>,
    pub trace_id: Option<[u8; 16]>,
    pub span_id: Option<[u8; 8]>,
    pub client: IpAddr,
    pub method: Method,
    /// The request target as received; the writer drops or redacts its
    /// query.
    pub uri: Uri,
    pub version: Version,
    pub route: Option<usize>,
    pub upstream: Option<usize>,
    pub target: Option<SocketAddr>,
    pub status: u16,
    pub reason: Reason,
    /// The request's `Content-Length`, when it had one.
    pub bytes_in: Option<u64>,
    pub bytes_out: u64,
    /// Time until the response head was ready.
    pub head: Duration,
    /// Time until the response body ended or the client went away.
    pub total: Duration,
    pub ratelimit: Duration,
    pub workers: Duration,
    pub upstream_time: Duration,
    /// Whether the response body was sent whole.
    pub completed: bool,
    /// The user id a worker set on the request context.
    pub user: Option<String>,
}

impl AccessLog {
    /// Opens the sink and starts the writer thread with a channel of
    /// `capacity` lines.
    pub fn start(
        sink: Sink,
        capacity: usize,
        names: Names,
        dropped: IntCounter,
        written: IntCounter,
    ) -> anyhow::Result<AccessLog> {
        let output: Box<dyn Write + Send> = match &sink {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(path) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("cannot open access_log.path {}", path.display()))?,
            ),
        };
        let (sender, receiver) = mpsc::sync_channel(capacity.max(1));
        std::thread::Builder::new()
            .name("edge-access-log".to_owned())
            .spawn(move || write_lines(receiver, output, &names, &written))
            .context("cannot start the access-log thread")?;
        Ok(AccessLog { sender, dropped })
    }

    /// Hands a record to the writer, or drops and counts it when the writer
    /// has fallen behind.
    pub fn send(&self, record: Box<Record>) {
        match self.sender.try_send(record) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => self.dropped.inc(),
            // The writer thread ended after a write error it logged.
            Err(TrySendError::Disconnected(_)) => self.dropped.inc(),
        }
    }
}

/// Writes records as they come and flushes whenever the channel is empty,
/// so lines reach the sink within one burst.
fn write_lines(
    receiver: Receiver<Box<Record>>,
    output: Box<dyn Write + Send>,
    names: &Names,
    written: &IntCounter,
) {
    let mut output = BufWriter::with_capacity(64 << 10, output);
    let mut line = Vec::with_capacity(512);
    while let Ok(first) = receiver.recv() {
        let mut next = Some(first);
        while let Some(record) = next {
            line.clear();
            if serde_json::to_writer(&mut line, &record.line(names)).is_ok() {
                line.push(b'\n');
                if let Err(error) = output.write_all(&line) {
                    tracing::error!(%error, "cannot write the access log; stopping it");
                    return;
                }
                written.inc();
            }
            next = receiver.try_recv().ok();
        }
        if let Err(error) = output.flush() {
            tracing::error!(%error, "cannot write the access log; stopping it");
            return;
        }
    }
}

fn millis(duration: Duration) -> f64 {
    (duration.as_nanos() as f64 / 1_000.0).round() / 1_000.0
}

/// One access-log line, borrowing from its record.
#[derive(Serialize)]
struct Line<'a> {
    time: String,
    node: &'a str,
    request_id: Option<&'a str>,
    trace_id: Option<String>,
    span_id: Option<String>,
    client: IpAddr,
    method: &'a str,
    path: &'a str,
    query: Option<String>,
    protocol: String,
    route: Option<&'a str>,
    upstream: Option<&'a str>,
    target: Option<SocketAddr>,
    status: u16,
    reason: &'static str,
    bytes_in: Option<u64>,
    bytes_out: u64,
    completed: bool,
    durations_ms: Durations,
    user: Option<&'a str>,
}

/// The stage durations of a line, in milliseconds.
#[derive(Serialize)]
struct Durations {
    total: f64,
    head: f64,
    gateway: f64,
    ratelimit: f64,
    workers: f64,
    upstream: f64,
}

impl Record {
    fn line<'a>(&'a self, names: &'a Names) -> Line<'a> {
        Line {
            time: humantime::format_rfc3339_millis(self.time).to_string(),
            node: &names.node,
            request_id: self.request_id.as_ref().and_then(|id| id.to_str().ok()),
            trace_id: self.trace_id.map(hex::encode),
            span_id: self.span_id.map(hex::encode),
            client: self.client,
            method: self.method.as_str(),
            path: self.uri.path(),
            query: self.uri.query().map(redact_query),
            protocol: format!("{:?}", self.version),
            route: self.route.map(|index| &*names.routes[index]),
            upstream: self.upstream.map(|index| &*names.upstreams[index]),
            target: self.target,
            status: self.status,
            reason: self.reason.name(),
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            completed: self.completed,
            durations_ms: Durations {
                total: millis(self.total),
                head: millis(self.head),
                gateway: millis(self.head.saturating_sub(self.upstream_time)),
                ratelimit: millis(self.ratelimit),
                workers: millis(self.workers),
                upstream: millis(self.upstream_time),
            },
            user: self.user.as_deref(),
        }
    }
}

/// Returns whether a query parameter's name looks like it carries a
/// credential: it contains `token`, `secret`, `passw`, `key`, `auth`,
/// `session`, `signature`, `credential`, or is `sig`, `pwd`, `code` or
/// `jwt` (case-insensitive).
fn is_sensitive(name: &str) -> bool {
    let name = name.to_ascii_lowercase();
    const PARTS: [&str; 8] = [
        "token",
        "secret",
        "passw",
        "key",
        "auth",
        "session",
        "signature",
        "credential",
    ];
    PARTS.iter().any(|part| name.contains(part))
        || matches!(name.as_str(), "sig" | "pwd" | "code" | "jwt")
}

/// Replaces the values of credential-like parameters in a query string with
/// [`REDACTED`]; the names, order and other values stay as sent.
pub fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    for (index, pair) in query.split('&').enumerate() {
        if index > 0 {
            out.push('&');
        }
        let (name, value) = match pair.split_once('=') {
            Some((name, value)) => (name, Some(value)),
            None => (pair, None),
        };
        let decoded = percent_encoding::percent_decode_str(name).decode_utf8_lossy();
        match value {
            Some(_) if is_sensitive(&decoded) => {
                out.push_str(name);
                out.push('=');
                out.push_str(REDACTED);
            }
            _ => out.push_str(pair),
        }
    }
    out
}

/// A response body that counts the bytes sent and hands the access-log
/// record to the writer when it ends or is dropped.
pub struct LoggedBody {
    inner: ResponseBody,
    record: Option<Box<Record>>,
    log: Arc<AccessLog>,
}

impl LoggedBody {
    pub fn new(inner: ResponseBody, record: Box<Record>, log: Arc<AccessLog>) -> LoggedBody {
        let mut body = LoggedBody {
            inner,
            record: Some(record),
            log,
        };
        if body.inner.is_end_stream() {
            body.finish(true);
        }
        body
    }

    fn finish(&mut self, completed: bool) {
        if let Some(mut record) = self.record.take() {
            record.total = record.started.elapsed();
            record.completed = completed;
            self.log.send(record);
        }
    }
}

impl Drop for LoggedBody {
    fn drop(&mut self) {
        self.finish(false);
    }
}

impl Body for LoggedBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(Some(Ok(frame))) => {
                if let (Some(data), Some(record)) = (frame.data_ref(), this.record.as_mut()) {
                    record.bytes_out += data.len() as u64;
                }
                if this.inner.is_end_stream() {
                    this.finish(true);
                }
            }
            Poll::Ready(None) => this.finish(true),
            Poll::Ready(Some(Err(_))) => this.finish(false),
            Poll::Pending => {}
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redact_query_hides_credentials_only() {
        let cases = [
            ("a=1&b=2", "a=1&b=2"),
            ("token=abc&page=2", "token=REDACTED&page=2"),
            ("access_token=x", "access_token=REDACTED"),
            ("API_KEY=x&q=key", "API_KEY=REDACTED&q=key"),
            (
                "key=1&secret=2&password=3",
                "key=REDACTED&secret=REDACTED&password=REDACTED",
            ),
            ("client%5Fsecret=z", "client%5Fsecret=REDACTED"),
            (
                "sig=1&code=2&jwt=3",
                "sig=REDACTED&code=REDACTED&jwt=REDACTED",
            ),
            ("flag&token", "flag&token"),
            ("x-session-id=9", "x-session-id=REDACTED"),
        ];
        for (query, expected) in cases {
            assert_eq!(redact_query(query), expected, "{query}");
        }
    }
}
