//! OTLP span export (the `otlp` cargo feature): a background thread takes
//! the spans requests put in the [`SpanQueue`], encodes them as an OTLP
//! `ExportTraceServiceRequest` (protobuf) and posts them to the collector
//! over HTTP, once per `[tracing] otlp_interval`.
//!
//! The request path only moves its spans into a bounded channel. A full
//! channel drops them, as does a failed export, and both count in
//! `edge_otlp_spans_dropped_total`. An unreachable collector is logged at
//! most once per [`FAILURE_LOG_INTERVAL`].

use std::sync::mpsc::{self, Receiver, TryRecvError};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bytes::Bytes;
use http::{header, HeaderValue, Method, Request, StatusCode, Uri};
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{
    span, status, ResourceSpans, ScopeSpans, Span, Status,
};
use prometheus::IntCounter;
use prost::Message as _;

use crate::config::TracingConfig;
use crate::trace::{AttributeValue, SpanKind, SpanQueue, SpanRecord};

/// The maximum number of spans in one export request, the OpenTelemetry
/// SDKs' `max_export_batch_size` default.
const MAX_BATCH: usize = 512;

/// The shortest time between two log lines about failed exports.
pub const FAILURE_LOG_INTERVAL: Duration = Duration::from_secs(30);

/// The export destination and timing, from `[tracing]`.
#[derive(Debug, Clone)]
pub struct ExportSettings {
    /// The collector's URL for traces, path included.
    pub url: Uri,
    pub queue: usize,
    pub interval: Duration,
    pub timeout: Duration,
    /// `service.instance.id` of the exported resource: the node's name.
    pub node: String,
}

impl ExportSettings {
    /// Reads the settings of a validated `[tracing]` table; `None` when it
    /// names no endpoint.
    pub fn from_config(config: &TracingConfig, node: &str) -> anyhow::Result<Option<Self>> {
        let Some(endpoint) = &config.otlp_endpoint else {
            return Ok(None);
        };
        let base: Uri = endpoint
            .get_ref()
            .parse()
            .with_context(|| format!("invalid tracing.otlp_endpoint {:?}", endpoint.get_ref()))?;
        Ok(Some(ExportSettings {
            url: traces_url(&base)?,
            queue: config.otlp_queue,
            interval: config.otlp_interval,
            timeout: config.otlp_timeout,
            node: node.to_owned(),
        }))
    }
}

/// Returns the URL spans are posted to: `base` with the path `/v1/traces`
/// when it has none, else `base` as written.
fn traces_url(base: &Uri) -> anyhow::Result<Uri> {
    let path = base.path();
    if path.is_empty() || path == "/" {
        let mut parts = base.clone().into_parts();
        parts.path_and_query = Some("/v1/traces".parse()?);
        return Ok(Uri::from_parts(parts)?);
    }
    Ok(base.clone())
}

/// Starts the exporter thread and returns the queue that feeds it.
/// `dropped` and `exported` count spans.
pub fn start(
    settings: ExportSettings,
    dropped: IntCounter,
    exported: IntCounter,
) -> anyhow::Result<SpanQueue> {
    let (sender, receiver) = mpsc::sync_channel(settings.queue.max(1));
    let queue = SpanQueue::new(sender, dropped.clone());
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the OTLP exporter's runtime")?;
    let exporter = Exporter {
        settings,
        dropped,
        exported,
        connection: None,
        failures: FailureLog::default(),
    };
    std::thread::Builder::new()
        .name("edge-otlp".to_owned())
        .spawn(move || runtime.block_on(exporter.run(receiver)))
        .context("cannot start the OTLP exporter thread")?;
    Ok(queue)
}

/// The exporter thread's state.
struct Exporter {
    settings: ExportSettings,
    dropped: IntCounter,
    exported: IntCounter,
    /// The open connection to the collector, reused between exports.
    connection: Option<SendRequest<Full<Bytes>>>,
    failures: FailureLog,
}

impl Exporter {
    /// Exports what has queued up once per interval, until every sender is
    /// gone. It sleeps rather than waits on the channel, so that requests
    /// never wake this thread.
    async fn run(mut self, receiver: Receiver<Vec<SpanRecord>>) {
        loop {
            tokio::time::sleep(self.settings.interval).await;
            let mut batch = Vec::new();
            let mut stopped = false;
            loop {
                match receiver.try_recv() {
                    Ok(spans) => {
                        batch.extend(spans);
                        if batch.len() >= MAX_BATCH {
                            self.export(std::mem::take(&mut batch)).await;
                        }
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        stopped = true;
                        break;
                    }
                }
            }
            if !batch.is_empty() {
                self.export(batch).await;
            }
            if stopped {
                return;
            }
        }
    }

    /// Posts one batch and counts its spans as exported or dropped.
    async fn export(&mut self, spans: Vec<SpanRecord>) {
        let count = spans.len() as u64;
        let body = encode(spans, &self.settings.node);
        let posted = tokio::time::timeout(self.settings.timeout, self.post(body)).await;
        let result = match posted {
            Ok(result) => result,
            Err(_) => Err(anyhow::anyhow!(
                "timed out after {}",
                humantime::format_duration(self.settings.timeout)
            )),
        };
        match result {
            Ok(()) => self.exported.inc_by(count),
            Err(error) => {
                self.connection = None;
                self.dropped.inc_by(count);
                if let Some(suppressed) = self.failures.admit() {
                    tracing::warn!(
                        endpoint = %self.settings.url,
                        error = %format!("{error:#}"),
                        spans = count,
                        suppressed,
                        "failed to export spans over OTLP"
                    );
                }
            }
        }
    }

    /// Sends one export request on the open connection, or a new one.
    async fn post(&mut self, body: Vec<u8>) -> anyhow::Result<()> {
        let url = &self.settings.url;
        let mut sender = match self.connection.take() {
            Some(sender) if !sender.is_closed() => sender,
            _ => connect(url).await?,
        };
        sender
            .ready()
            .await
            .context("the collector closed the connection")?;
        let authority = url.authority().map_or("", |a| a.as_str());
        let request = Request::builder()
            .method(Method::POST)
            .uri(url.path_and_query().map_or("/v1/traces", |p| p.as_str()))
            .header(header::HOST, authority)
            .header(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/x-protobuf"),
            )
            .body(Full::new(Bytes::from(body)))
            .context("cannot build the export request")?;
        let response = sender
            .send_request(request)
            .await
            .context("the export request failed")?;
        let status = response.status();
        // Read the body whole, so that the connection can be reused.
        let _ = response.into_body().collect().await;
        if status != StatusCode::OK {
            anyhow::bail!("the collector responded {status}");
        }
        self.connection = Some(sender);
        Ok(())
    }
}

/// Opens an HTTP/1.1 connection to the collector of `url`.
async fn connect(url: &Uri) -> anyhow::Result<SendRequest<Full<Bytes>>> {
    let host = url.host().context("the endpoint has no host")?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let port = url.port_u16().unwrap_or(80);
    let stream = tokio::net::TcpStream::connect((host, port))
        .await
        .with_context(|| format!("cannot connect to {host}:{port}"))?;
    let _ = stream.set_nodelay(true);
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("the HTTP handshake with the collector failed")?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// Admits one log line per [`FAILURE_LOG_INTERVAL`] and counts the rest.
#[derive(Default)]
struct FailureLog {
    last: Option<Instant>,
    suppressed: u64,
}

impl FailureLog {
    /// Returns `Some(failures not logged since the last line)` when a line
    /// may be logged now.
    fn admit(&mut self) -> Option<u64> {
        let now = Instant::now();
        if self
            .last
            .is_some_and(|last| now.duration_since(last) < FAILURE_LOG_INTERVAL)
        {
            self.suppressed += 1;
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.suppressed))
    }
}

// TODO: encode straight from SpanRecord; converting to the generated types is half the cost.
/// Encodes spans as one OTLP `ExportTraceServiceRequest`, under a resource
/// named `edge` with the node's name as its instance id.
pub fn encode(spans: Vec<SpanRecord>, node: &str) -> Vec<u8> {
    let resource = Resource {
        attributes: vec![
            key_value("service.name", AttributeValue::Static("edge")),
            key_value(
                "service.instance.id",
                AttributeValue::Owned(node.to_owned()),
            ),
        ],
        ..Default::default()
    };
    let scope = InstrumentationScope {
        name: "edge".to_owned(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ..Default::default()
    };
    let request = ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(resource),
            scope_spans: vec![ScopeSpans {
                scope: Some(scope),
                spans: spans.into_iter().map(to_proto).collect(),
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    };
    request.encode_to_vec()
}

fn to_proto(record: SpanRecord) -> Span {
    let kind = match record.kind {
        SpanKind::Server => span::SpanKind::Server,
        SpanKind::Client => span::SpanKind::Client,
        SpanKind::Internal => span::SpanKind::Internal,
    };
    let status = record.error.then(|| Status {
        code: status::StatusCode::Error as i32,
        message: String::new(),
    });
    Span {
        trace_id: record.trace_id.to_vec(),
        span_id: record.span_id.to_vec(),
        parent_span_id: record.parent_id.map_or_else(Vec::new, |id| id.to_vec()),
        name: record.name.to_owned(),
        kind: kind as i32,
        start_time_unix_nano: record.start_unix_nanos,
        end_time_unix_nano: record.end_unix_nanos,
        attributes: record
            .attributes
            .into_iter()
            .map(|(key, value)| key_value(key, value))
            .collect(),
        status,
        ..Default::default()
    }
}

fn key_value(key: &str, value: AttributeValue) -> KeyValue {
    let value = match value {
        AttributeValue::Static(text) => any_value::Value::StringValue(text.to_owned()),
        AttributeValue::Shared(text) => any_value::Value::StringValue(text.to_string()),
        AttributeValue::Owned(text) => any_value::Value::StringValue(text),
        AttributeValue::Int(number) => any_value::Value::IntValue(number),
        AttributeValue::Method(method) => any_value::Value::StringValue(method.to_string()),
        AttributeValue::Ip(ip) => any_value::Value::StringValue(ip.to_string()),
    };
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traces_url_completes_base_urls() {
        let cases = [
            ("http://127.0.0.1:4318", "http://127.0.0.1:4318/v1/traces"),
            ("http://127.0.0.1:4318/", "http://127.0.0.1:4318/v1/traces"),
            (
                "http://collector/custom/path",
                "http://collector/custom/path",
            ),
        ];
        for (base, expected) in cases {
            let url = traces_url(&base.parse().unwrap()).unwrap();
            assert_eq!(url.to_string(), expected, "{base}");
        }
    }

    #[test]
    fn encode_keeps_ids_links_and_attributes() {
        let record = SpanRecord {
            trace_id: [7; 16],
            span_id: [1; 8],
            parent_id: Some([2; 8]),
            name: "upstream",
            kind: SpanKind::Client,
            start_unix_nanos: 10,
            end_unix_nanos: 20,
            attributes: vec![
                ("edge.upstream", AttributeValue::Owned("app".to_owned())),
                ("http.response.status_code", AttributeValue::Int(502)),
            ],
            error: true,
        };
        let bytes = encode(vec![record], "node-a");
        let decoded = ExportTraceServiceRequest::decode(bytes.as_slice()).unwrap();
        let resource = decoded.resource_spans[0].resource.as_ref().unwrap();
        assert_eq!(resource.attributes[1].key, "service.instance.id");
        let span = &decoded.resource_spans[0].scope_spans[0].spans[0];
        assert_eq!(span.trace_id, vec![7; 16]);
        assert_eq!(span.span_id, vec![1; 8]);
        assert_eq!(span.parent_span_id, vec![2; 8]);
        assert_eq!(span.name, "upstream");
        assert_eq!(span.kind, span::SpanKind::Client as i32);
        assert_eq!(
            span.status.as_ref().unwrap().code,
            status::StatusCode::Error as i32
        );
        assert_eq!(span.attributes.len(), 2);
        assert_eq!(
            span.attributes[1].value.as_ref().unwrap().value,
            Some(any_value::Value::IntValue(502))
        );
    }

    #[test]
    fn failure_log_admits_one_line_per_interval() {
        let mut log = FailureLog::default();
        assert_eq!(log.admit(), Some(0));
        assert_eq!(log.admit(), None);
        assert_eq!(log.admit(), None);
        log.last = Some(Instant::now() - FAILURE_LOG_INTERVAL);
        assert_eq!(log.admit(), Some(2));
    }
}
