//! The minimum a hyper 1 reverse proxy does per request, as a floor for
//! `scripts/bench`: one current-thread runtime, HTTP/1.1 only, a per-thread
//! pool of `http1::handshake` connections to one upstream, and the same
//! forwarding headers that nginx, HAProxy and edge set in the benchmark. It
//! has no routing, timeouts, hop-by-hop removal or limits.
//!
//! With a worker module, it also calls that worker's request hook in a fresh
//! instance on edge's worker runtime for every request, with the module's
//! `headers = { "x-bench" = "1" }` config, and sets the headers the worker
//! returns. This is the floor of a worker hop in any proxy, next to edge's.
//!
//! Usage: minimal_proxy LISTEN_ADDR UPSTREAM_ADDR [WORKER_MODULE]

use std::cell::RefCell;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::Arc;
use std::time::Duration;

use http::header::{HeaderName, HeaderValue, HOST};
use http::{Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Empty};
use hyper::body::Incoming;
use hyper::client::conn::http1 as client;
use hyper::server::conn::http1 as server;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};

use edge::context::RequestContext;
use edge::worker::{wit, Binding, Runtime, RuntimeSettings};

type Body = http_body_util::combinators::UnsyncBoxBody<bytes::Bytes, hyper::Error>;

thread_local! {
    /// Idle upstream connections, oldest first.
    static IDLE: RefCell<Vec<client::SendRequest<Incoming>>> = const { RefCell::new(Vec::new()) };
}

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");

/// Returns an idle connection to `upstream`, or opens a new one.
async fn connection(upstream: SocketAddr) -> hyper::Result<client::SendRequest<Incoming>> {
    while let Some(mut sender) = IDLE.with_borrow_mut(Vec::pop) {
        if sender.ready().await.is_ok() {
            return Ok(sender);
        }
    }
    let stream = TcpStream::connect(upstream)
        .await
        .expect("cannot connect to the upstream");
    stream.set_nodelay(true).expect("cannot set TCP_NODELAY");
    let (sender, connection) = client::Builder::new()
        .writev(false)
        .handshake(TokioIo::new(stream))
        .await?;
    tokio::task::spawn_local(async move {
        let _ = connection.await;
    });
    Ok(sender)
}

/// A worker bound to the proxy's one route.
struct Worker {
    runtime: Runtime,
    binding: Binding,
}

impl Worker {
    async fn load(module: &str, cache_dir: &std::path::Path) -> anyhow::Result<Worker> {
        let settings = RuntimeSettings {
            cache_dir: cache_dir.to_owned(),
            read_only_cache: false,
            cache_retention: Default::default(),
            max_instances: 2,
            queue_limit: 2,
            queue_timeout: Duration::from_millis(20),
            max_memory: 64 << 20,
            upstreams: Default::default(),
            instance_pool: true,
        };
        let runtime = Runtime::new(&settings)?;
        let loaded = runtime.load(std::path::Path::new(module))?;
        let config: toml::Table = r#"headers = { "x-bench" = "1" }"#.parse()?;
        let binding = runtime
            .bind(
                loaded,
                Arc::from("bench"),
                &config,
                Default::default(),
                Duration::from_secs(1),
                16 << 20,
                None,
                Default::default(),
            )
            .await?;
        Ok(Worker { runtime, binding })
    }

    /// Calls the request hook and sets the headers it returns.
    async fn run(&self, parts: &mut http::request::Parts, peer: &str) {
        let headers = parts
            .headers
            .iter()
            .map(|(name, value)| wit::Header {
                name: name.as_str().to_owned(),
                value: String::from_utf8_lossy(value.as_bytes()).into_owned(),
            })
            .collect();
        let view = wit::Request {
            method: parts.method.as_str().to_owned(),
            path: parts.uri.path().to_owned(),
            query: parts.uri.query().map(str::to_owned),
            headers,
            client_addr: peer.to_owned(),
            route: "bench".to_owned(),
            params: Vec::new(),
        };
        let mut context = RequestContext::default();
        let action = self
            .runtime
            .on_request(&self.binding, &view, &mut context, Default::default())
            .await;
        if let Ok(wit::Action::Continue(changes)) = action {
            for header in changes.set_headers {
                if let (Ok(name), Ok(value)) = (
                    HeaderName::from_bytes(header.name.as_bytes()),
                    HeaderValue::from_str(&header.value),
                ) {
                    parts.headers.insert(name, value);
                }
            }
        }
    }
}

async fn proxy(
    request: Request<Incoming>,
    peer: HeaderValue,
    upstream: SocketAddr,
    worker: Option<Rc<Worker>>,
) -> Result<Response<Body>, Infallible> {
    let (mut parts, body) = request.into_parts();
    if let Some(worker) = &worker {
        worker
            .run(&mut parts, peer.to_str().unwrap_or_default())
            .await;
    }
    parts.uri = parts
        .uri
        .path_and_query()
        .cloned()
        .map_or_else(Uri::default, Uri::from);
    parts.headers.remove(http::header::CONNECTION);
    if let Some(host) = parts.headers.get(HOST).cloned() {
        parts.headers.insert(X_FORWARDED_HOST.clone(), host);
    }
    parts.headers.insert(X_FORWARDED_FOR.clone(), peer);
    parts
        .headers
        .insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
    let answer = match connection(upstream).await {
        Ok(mut sender) => {
            let sent = sender.send_request(Request::from_parts(parts, body)).await;
            IDLE.with_borrow_mut(|idle| idle.insert(0, sender));
            sent
        }
        Err(error) => Err(error),
    };
    Ok(match answer {
        Ok(response) => response.map(|body| body.boxed_unsync()),
        Err(_) => {
            let mut response =
                Response::new(Empty::new().map_err(|never| match never {}).boxed_unsync());
            *response.status_mut() = StatusCode::BAD_GATEWAY;
            response
        }
    })
}

fn main() {
    let mut args = std::env::args().skip(1);
    let usage = "usage: minimal_proxy LISTEN_ADDR UPSTREAM_ADDR [WORKER_MODULE]";
    let listen: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let upstream: SocketAddr = args.next().expect(usage).parse().expect(usage);
    let module = args.next();
    let cache = tempfile::tempdir().expect("cannot create a cache folder");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    let local = tokio::task::LocalSet::new();
    local.block_on(&runtime, async move {
        let worker = match &module {
            Some(module) => Some(Rc::new(
                Worker::load(module, cache.path())
                    .await
                    .expect("cannot load the worker"),
            )),
            None => None,
        };
        let listener = TcpListener::bind(listen).await.expect("cannot listen");
        println!("listening on http://{listen}");
        loop {
            let Ok((stream, peer)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            let peer =
                HeaderValue::from_str(&peer.ip().to_string()).expect("an IP is a header value");
            let worker = worker.clone();
            tokio::task::spawn_local(async move {
                let service = service_fn(move |request| {
                    proxy(request, peer.clone(), upstream, worker.clone())
                });
                let _ = server::Builder::new()
                    .writev(false)
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}
