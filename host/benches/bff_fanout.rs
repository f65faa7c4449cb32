//! Latency of the bff-aggregate worker's fan-out through a real node: three
//! loopback upstreams that each respond after 50 ms, behind one
//! `GET /tv/home`, against a plain proxied request to one of them.
//!
//! If the sections were fetched one after another, an aggregated response
//! would take the sum (150 ms); fetched at once, it takes about the slowest
//! call (50 ms) plus the node's own time.
//!
//! Run with `scripts/bench --bff`, or after `scripts/build-workers` with
//! `cargo bench -p edge --bench bff_fanout [-- REQUESTS]` (default 300
//! requests per row and client count).

use std::convert::Infallible;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;

type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The delay of every upstream.
const UPSTREAM_DELAY: Duration = Duration::from_millis(50);

/// Starts an HTTP/1.1 upstream that responds to every request with `body` after
/// [`UPSTREAM_DELAY`].
async fn delayed_upstream(body: &'static str) -> Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(|_request: http::Request<Incoming>| async {
                        tokio::time::sleep(UPSTREAM_DELAY).await;
                        let mut response =
                            http::Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        response.headers_mut().insert(
                            http::header::CONTENT_TYPE,
                            http::HeaderValue::from_static("application/json"),
                        );
                        Ok::<_, Infallible>(response)
                    });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    Ok(addr)
}

/// Writes the node's config: `/{device}/home` aggregates the three
/// upstreams, and `/direct` proxies to one of them.
fn config(
    module: &Path,
    cache: &Path,
    recs: SocketAddr,
    history: SocketAddr,
    billing: SocketAddr,
) -> String {
    format!(
        r#"[[listeners]]
addr = "127.0.0.1:0"

[runtime]
cache_dir = "{cache}"

[upstreams.recs]
targets = ["{recs}"]
[upstreams.history]
targets = ["{history}"]
[upstreams.billing]
targets = ["{billing}"]

[[routes]]
name = "direct"
path = "/direct"
upstream = "recs"

[[routes]]
name = "home"
pattern = "/{{device}}/home"
methods = ["GET"]

[[routes.workers]]
module = "{module}"
fetch = ["recs", "history", "billing"]
# The deadline counts wall time, so calls that share a busy serving thread
# take longer than their CPU time; a generous one keeps 503s out of the figures.
cpu_deadline = "1s"

[routes.workers.config]
user_header = "x-user-id"
sections = [
    {{ name = "rows", upstream = "recs", path = "/rows?user={{user}}", timeout = "1s", list = "rows" }},
    {{ name = "continue_watching", upstream = "history", path = "/users/{{user}}/continue", timeout = "1s" }},
    {{ name = "billing", upstream = "billing", path = "/users/{{user}}/plan", timeout = "1s", required = true }},
]

[routes.workers.config.devices.tv.sections]
rows = {{ max_items = 10, fields = ["id", "title", "image=images.large"] }}
continue_watching = {{}}
billing = {{ fields = ["plan"] }}
"#,
        cache = cache.display(),
        module = module.display(),
    )
}

/// A running `edge serve`, killed on drop.
struct Node {
    child: Child,
    addr: SocketAddr,
}

impl Node {
    fn start(config_path: &Path) -> Result<Node> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge"))
            .args(["serve", "--config", &config_path.display().to_string()])
            .env("EDGE_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let mut lines = BufReader::new(stdout).lines();
        let addr = loop {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("listening on ") {
                        break url.trim_start_matches("http://").parse()?;
                    }
                }
                _ => return Err("the node exited before listening".into()),
            }
        };
        std::thread::spawn(move || for _ in lines {});
        Ok(Node { child, addr })
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Sends `count` GETs for `path` one after another on one keep-alive
/// connection, and returns each request's time to the last body byte.
async fn client(addr: SocketAddr, path: &'static str, count: usize) -> Result<Vec<Duration>> {
    let stream = tokio::net::TcpStream::connect(addr).await?;
    stream.set_nodelay(true)?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut latencies = Vec::with_capacity(count);
    for _ in 0..count {
        let request = http::Request::builder()
            .uri(path)
            .header("host", "bench")
            .header("x-user-id", "u-7")
            .body(Full::new(Bytes::new()))?;
        let started = Instant::now();
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        latencies.push(started.elapsed());
        if status != 200 {
            return Err(format!(
                "{path} answered {status}: {}",
                String::from_utf8_lossy(&body)
            )
            .into());
        }
        if String::from_utf8_lossy(&body).contains(r#""partial":[""#) {
            return Err(format!("{path} was partial: {}", String::from_utf8_lossy(&body)).into());
        }
    }
    Ok(latencies)
}

/// Runs `clients` concurrent clients of `requests` requests each and
/// returns every latency, sorted.
async fn measure(
    addr: SocketAddr,
    path: &'static str,
    clients: usize,
    requests: usize,
) -> Result<Vec<Duration>> {
    let tasks: Vec<_> = (0..clients)
        .map(|_| tokio::spawn(client(addr, path, requests)))
        .collect();
    let mut all = Vec::new();
    for task in tasks {
        all.extend(task.await??);
    }
    all.sort();
    Ok(all)
}

fn percentile(sorted: &[Duration], share: f64) -> f64 {
    let index = ((sorted.len() as f64 * share).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[index].as_secs_f64() * 1000.0
}

fn main() -> Result {
    let requests: usize = std::env::args()
        .skip(1)
        .find(|arg| !arg.starts_with('-'))
        .map_or(Ok(300), |arg| arg.parse())?;
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let module = std::fs::canonicalize(repo.join("modules/bff-aggregate.wasm"))
        .map_err(|_| "modules/bff-aggregate.wasm is missing; run scripts/build-workers first")?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let recs = delayed_upstream(
            r#"{"rows":[{"id":1,"title":"a","images":{"large":"1-l.jpg"}},{"id":2,"title":"b","images":{"large":"2-l.jpg"}}]}"#,
        )
        .await?;
        let history = delayed_upstream(r#"[{"id":3,"position_s":1200}]"#).await?;
        let billing = delayed_upstream(r#"{"plan":"premium","renews":"2027-01-01"}"#).await?;
        let dir = tempfile::tempdir()?;
        let config_path = dir.path().join("edge.toml");
        std::fs::write(
            &config_path,
            config(&module, &dir.path().join("cache"), recs, history, billing),
        )?;
        let node = Node::start(&config_path)?;

        // Warm-up: compile cache, connection pools.
        measure(node.addr, "/tv/home", 4, 10).await?;
        measure(node.addr, "/direct", 4, 10).await?;

        println!(
            "upstream delay {} ms each; {requests} requests per client\n",
            UPSTREAM_DELAY.as_millis()
        );
        println!("| request | clients | p50 ms | p90 ms | p99 ms | max ms |");
        println!("|---|---|---|---|---|---|");
        for clients in [1, 8] {
            for (label, path) in [
                ("`/direct`: one upstream call, proxied", "/direct"),
                ("`/tv/home`: three upstream calls, aggregated", "/tv/home"),
            ] {
                let sorted = measure(node.addr, path, clients, requests).await?;
                println!(
                    "| {label} | {clients} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    percentile(&sorted, 0.50),
                    percentile(&sorted, 0.90),
                    percentile(&sorted, 0.99),
                    percentile(&sorted, 1.0),
                );
            }
        }
        drop(node);
        Ok(())
    })
}
