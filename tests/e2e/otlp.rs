//! OTLP span export (the `otlp` feature): a loopback collector decodes what
//! a node exports and checks trace ids, parent and child links, names and
//! attributes against what the upstream and the client saw.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper_util::rt::TokioIo;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::trace::v1::{span::SpanKind, Span};
use prost::Message as _;

use crate::cli::check_fails;
use crate::harness::{get, send, Node, Result, Upstream};

/// One export request as the collector received it.
#[derive(Debug, Clone)]
struct Export {
    path: String,
    content_type: Option<String>,
    body: Bytes,
}

/// A real OTLP/HTTP receiver on loopback: a hyper server that records every
/// request and responds 200 with an empty `ExportTraceServiceResponse`.
struct Collector {
    addr: SocketAddr,
    exports: Arc<Mutex<Vec<Export>>>,
}

impl Collector {
    async fn start() -> Collector {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let exports = Arc::new(Mutex::new(Vec::new()));
        let task_exports = exports.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let exports = task_exports.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |request: http::Request<hyper::body::Incoming>| {
                            let exports = exports.clone();
                            async move {
                                let path = request.uri().path().to_owned();
                                let content_type = request
                                    .headers()
                                    .get("content-type")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned);
                                let body = request.into_body().collect().await?.to_bytes();
                                exports.lock().unwrap().push(Export {
                                    path,
                                    content_type,
                                    body,
                                });
                                Ok::<_, hyper::Error>(http::Response::new(Full::new(Bytes::new())))
                            }
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Collector { addr, exports }
    }

    /// Decodes every span received so far.
    fn spans(&self) -> Vec<Span> {
        let exports = self.exports.lock().unwrap();
        let mut spans = Vec::new();
        for export in exports.iter() {
            assert_eq!(export.path, "/v1/traces");
            assert_eq!(
                export.content_type.as_deref(),
                Some("application/x-protobuf")
            );
            let request = ExportTraceServiceRequest::decode(export.body.clone())
                .expect("a valid ExportTraceServiceRequest");
            for resource in request.resource_spans {
                for scope in resource.scope_spans {
                    spans.extend(scope.spans);
                }
            }
        }
        spans
    }

    /// Waits up to five seconds for `count` spans of `trace_id`.
    async fn wait_for_trace(&self, trace_id: &[u8], count: usize) -> Vec<Span> {
        let mut found = Vec::new();
        for _ in 0..100 {
            found = self
                .spans()
                .into_iter()
                .filter(|span| span.trace_id == trace_id)
                .collect();
            if found.len() >= count {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        found
    }
}

fn hex_bytes(text: &str) -> Vec<u8> {
    hex::decode(text).expect("hex digits")
}

/// Returns the string or integer attributes of a span, as text.
fn attributes(span: &Span) -> HashMap<String, String> {
    span.attributes
        .iter()
        .filter_map(|kv| {
            let value = match kv.value.as_ref()?.value.as_ref()? {
                Value::StringValue(text) => text.clone(),
                Value::IntValue(number) => number.to_string(),
                other => format!("{other:?}"),
            };
            Some((kv.key.clone(), value))
        })
        .collect()
}

fn one<'a>(spans: &'a [Span], name: &str) -> &'a Span {
    let named: Vec<&Span> = spans.iter().filter(|span| span.name == name).collect();
    assert_eq!(named.len(), 1, "one {name} span in {spans:#?}");
    named[0]
}

fn trace_table(collector: &Collector, extra: &str) -> String {
    format!(
        "[tracing]\notlp_endpoint = \"http://{}\"\notlp_interval = \"50ms\"\n{extra}\n",
        collector.addr
    )
}

#[tokio::test]
async fn spans_link_request_stages_and_upstream() -> Result {
    let collector = Collector::start().await;
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n\n\
         [[routes.limits]]\nkey = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"100/s\"\n",
        trace_table(&collector, ""),
        upstream.addr
    );
    let node = Node::start(&config)?;

    let client_trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let client_span = "00f067aa0ba902b7";
    let got = send(
        "GET",
        &node.url("/api/items"),
        &[
            (
                "traceparent",
                &format!("00-{client_trace}-{client_span}-01"),
            ),
            ("x-request-id", "otlp-round-trip-1"),
        ],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-request-id"), Some("otlp-round-trip-1"));
    let seen = upstream.last().headers;
    assert_eq!(seen["x-request-id"], "otlp-round-trip-1");
    let sent_parent = seen["traceparent"]
        .to_str()?
        .split('-')
        .nth(2)
        .unwrap()
        .to_owned();

    let spans = collector.wait_for_trace(&hex_bytes(client_trace), 3).await;
    assert_eq!(spans.len(), 3, "{spans:#?}");
    let root = one(&spans, "request");
    assert_eq!(root.kind, SpanKind::Server as i32);
    assert_eq!(root.parent_span_id, hex_bytes(client_span));
    let root_attributes = attributes(root);
    assert_eq!(root_attributes["edge.route"], "api");
    assert_eq!(root_attributes["edge.upstream"], "app");
    assert_eq!(root_attributes["http.response.status_code"], "200");
    assert_eq!(root_attributes["http.request.method"], "GET");
    assert_eq!(root_attributes["url.path"], "/api/items");
    assert_eq!(root_attributes["edge.reason"], "proxied");
    assert_eq!(root_attributes["edge.request_id"], "otlp-round-trip-1");
    assert!(root.start_time_unix_nano > 0);
    assert!(root.end_time_unix_nano >= root.start_time_unix_nano);

    let call = one(&spans, "upstream");
    assert_eq!(call.kind, SpanKind::Client as i32);
    assert_eq!(call.parent_span_id, root.span_id);
    assert_eq!(
        call.span_id,
        hex_bytes(&sent_parent),
        "the upstream's traceparent names the upstream span"
    );
    let call_attributes = attributes(call);
    assert_eq!(call_attributes["edge.upstream"], "app");
    assert_eq!(call_attributes["http.response.status_code"], "200");
    assert_eq!(
        call_attributes["server.port"],
        upstream.addr.port().to_string()
    );
    assert!(call.start_time_unix_nano >= root.start_time_unix_nano);
    assert!(call.end_time_unix_nano <= root.end_time_unix_nano);

    let limits = one(&spans, "ratelimit");
    assert_eq!(limits.kind, SpanKind::Internal as i32);
    assert_eq!(limits.parent_span_id, root.span_id);

    // Without a client traceparent the node starts a trace, and the
    // generated request id is the one on the response and the span.
    let got = get(&node.url("/api/fresh")).await?;
    let id = got
        .header("x-request-id")
        .expect("a generated id")
        .to_owned();
    let seen = upstream.last().headers;
    let traceparent = seen["traceparent"].to_str()?.to_owned();
    let trace_id = traceparent.split('-').nth(1).unwrap();
    let spans = collector.wait_for_trace(&hex_bytes(trace_id), 3).await;
    let root = one(&spans, "request");
    assert!(root.parent_span_id.is_empty(), "a new trace has no parent");
    assert_eq!(attributes(root)["edge.request_id"], id);
    assert_eq!(seen["x-request-id"], id.as_str());
    Ok(())
}

#[tokio::test]
async fn spans_cover_workers_and_fetches() -> Result {
    let collector = Collector::start().await;
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"fan\"\npath = \"/fan\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\nfetch = [\"app\"]\n\
         [routes.workers.config]\nmode = \"fetch\"\n\
         requests = [{{ upstream = \"app\", path = \"/one\" }}, \
         {{ upstream = \"app\", path = \"/two\" }}]\n",
        trace_table(&collector, ""),
        upstream.addr
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/fan")).await?;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let fetched = upstream.received();
    assert_eq!(fetched.len(), 2);
    let traceparent = fetched[0].headers["traceparent"].to_str()?.to_owned();
    let trace_id = hex_bytes(traceparent.split('-').nth(1).unwrap());

    // The request, the worker call and its two fetches.
    let spans = collector.wait_for_trace(&trace_id, 4).await;
    assert_eq!(spans.len(), 4, "{spans:#?}");
    let root = one(&spans, "request");
    assert_eq!(attributes(root)["edge.route"], "fan");
    assert_eq!(attributes(root)["http.response.status_code"], "200");
    let worker = one(&spans, "worker");
    assert_eq!(worker.parent_span_id, root.span_id);
    assert_eq!(attributes(worker)["edge.worker"], "fixture-worker.wasm");
    assert_eq!(attributes(worker)["edge.phase"], "request");
    let fetches: Vec<&Span> = spans.iter().filter(|s| s.name == "fetch").collect();
    assert_eq!(fetches.len(), 2);
    for received in &fetched {
        let parent = received.headers["traceparent"]
            .to_str()?
            .split('-')
            .nth(2)
            .unwrap();
        let span = fetches
            .iter()
            .find(|span| span.span_id == hex_bytes(parent))
            .expect("a fetch span whose id the upstream received");
        assert_eq!(span.kind, SpanKind::Client as i32);
        assert_eq!(span.parent_span_id, worker.span_id);
        let fetch_attributes = attributes(span);
        assert_eq!(fetch_attributes["edge.upstream"], "app");
        assert_eq!(fetch_attributes["http.request.method"], "GET");
        assert_eq!(fetch_attributes["http.response.status_code"], "200");
    }
    Ok(())
}

#[tokio::test]
async fn unreachable_collector_drops_spans_and_keeps_serving() -> Result {
    let closed = {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.local_addr()?
    };
    let upstream = Upstream::echo().await;
    let token = "otlp-test-admin-token";
    let config = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n\
         [tracing]\notlp_endpoint = \"http://{closed}\"\notlp_interval = \"50ms\"\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..5 {
        assert_eq!(get(&node.url("/x")).await?.status, 200);
    }
    // Each request has two spans: its own and the upstream call's.
    let metrics_url = format!("{}/metrics", node.admin_url.as_ref().unwrap());
    let bearer = format!("Bearer {token}");
    let mut dropped = 0.0;
    for _ in 0..100 {
        let got = send("GET", &metrics_url, &[("authorization", &bearer)], b"").await?;
        let text = String::from_utf8(got.body.to_vec())?;
        dropped = metric_value(&text, "edge_otlp_spans_dropped_total");
        if dropped >= 10.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, 10.0);
    for _ in 0..5 {
        assert_eq!(get(&node.url("/y")).await?.status, 200);
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failures = node.log().matches("failed to export spans").count();
    assert_eq!(failures, 1, "logged once per interval: {}", node.log());
    Ok(())
}

#[tokio::test]
async fn full_queue_drops_and_counts_spans() -> Result {
    let collector = Collector::start().await;
    let upstream = Upstream::echo().await;
    let token = "otlp-test-admin-token";
    // One request's spans fit in the queue, and the exporter takes them
    // only after a minute.
    let config = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{token}\"\n\n\
         [tracing]\notlp_endpoint = \"http://{}\"\notlp_interval = \"1m\"\notlp_queue = 1\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        collector.addr, upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..3 {
        assert_eq!(get(&node.url("/x")).await?.status, 200);
    }
    let metrics_url = format!("{}/metrics", node.admin_url.as_ref().unwrap());
    let bearer = format!("Bearer {token}");
    let got = send("GET", &metrics_url, &[("authorization", &bearer)], b"").await?;
    let text = String::from_utf8(got.body.to_vec())?;
    assert_eq!(metric_value(&text, "edge_otlp_spans_dropped_total"), 4.0);
    assert_eq!(metric_value(&text, "edge_otlp_spans_exported_total"), 0.0);
    Ok(())
}

#[test]
fn check_rejects_invalid_otlp_endpoints() {
    let base = "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
                [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
                [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n\n";
    for (endpoint, expected) in [
        ("https://127.0.0.1:4318", "must be an http:// URL"),
        ("127.0.0.1:4318", "must be an http:// URL"),
        ("http://", "is not a valid URL"),
        (
            "http://127.0.0.1:4318/v1/traces?x=1",
            "must not have a query",
        ),
    ] {
        let text = format!("{base}[tracing]\notlp_endpoint = \"{endpoint}\"\n");
        let stderr = check_fails(&text);
        assert!(stderr.contains("tracing.otlp_endpoint"), "{stderr}");
        assert!(stderr.contains(expected), "{endpoint}: {stderr}");
    }
    let text = format!(
        "{base}[tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\notlp_interval = \"0s\"\n"
    );
    let stderr = check_fails(&text);
    assert!(stderr.contains("tracing.otlp_interval"), "{stderr}");
}

/// Reads an unlabelled metric's value from Prometheus text.
fn metric_value(text: &str, name: &str) -> f64 {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' '))
        .and_then(|value| value.trim().parse().ok())
        .unwrap_or(f64::NAN)
}
