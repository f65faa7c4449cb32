//! The shared harness: real `edge` nodes started as processes, real upstream
//! HTTP servers on loopback, and plain HTTP clients.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

pub type Result<T = ()> = std::result::Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// The repository's root folder.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The folder scripts/build-workers writes components to.
pub fn modules_dir() -> PathBuf {
    let dir = repo_root().join("modules");
    for module in [
        "add-header.wasm",
        "path-router.wasm",
        "ab-test.wasm",
        "device-router.wasm",
        "bff-aggregate.wasm",
        "jwt-auth.wasm",
        "fixture-worker.wasm",
        "fixture-worker-no-wasi.wasm",
    ] {
        assert!(
            dir.join(module).exists(),
            "{} is missing; run scripts/build-workers first",
            dir.join(module).display()
        );
    }
    std::fs::canonicalize(dir).expect("modules folder")
}

/// A compile cache shared by every node in this test run, so each module
/// compiles once.
pub fn shared_cache_dir() -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join("edge-e2e-cache")
}

/// A running `edge serve` process, killed on drop.
pub struct Node {
    child: Child,
    /// The first listener's address.
    pub addr: SocketAddr,
    /// Every listener's base URL, such as `https://127.0.0.1:4431`, in
    /// config order.
    pub urls: Vec<String>,
    /// The admin listener's base URL, when the config has one.
    pub admin_url: Option<String>,
    /// Holds the config file until the node stops.
    _dir: tempfile::TempDir,
    stderr: Arc<Mutex<String>>,
}

impl Node {
    /// Starts a node on `config`, after replacing `{modules}` with the
    /// modules folder and adding a loopback listener on a free port and the
    /// shared compile cache, unless the config sets its own.
    pub fn start(config: &str) -> Result<Node> {
        Node::start_with_env(config, &[])
    }

    /// Starts a node as [`Node::start`] does, with extra environment
    /// variables.
    pub fn start_with_env(config: &str, env: &[(&str, &str)]) -> Result<Node> {
        let dir = tempfile::tempdir()?;
        let mut text = config.replace("{modules}", &modules_dir().display().to_string());
        if !text.contains("[[listeners]]") {
            text = format!("[[listeners]]\naddr = \"127.0.0.1:0\"\n\n{text}");
        }
        if !text.contains("[runtime]") {
            text.push_str(&format!(
                "\n[runtime]\ncache_dir = {:?}\n",
                shared_cache_dir().display().to_string()
            ));
        }
        let path = dir.path().join("edge.toml");
        let listeners = text.matches("[[listeners]]").count();
        std::fs::write(&path, text)?;
        let config = path.display().to_string();
        Node::spawn(&["serve", "--config", &config], dir, listeners, env)
    }

    /// Starts `edge` with `args`, such as `demo`, and waits until its
    /// `listeners` listeners listen.
    pub fn start_with_args(args: &[&str], listeners: usize) -> Result<Node> {
        Node::spawn(args, tempfile::tempdir()?, listeners, &[])
    }

    fn spawn(
        args: &[&str],
        dir: tempfile::TempDir,
        listeners: usize,
        env: &[(&str, &str)],
    ) -> Result<Node> {
        let mut child = Command::new(env!("CARGO_BIN_EXE_edge"))
            .args(args)
            .current_dir(dir.path())
            .env("EDGE_LOG", "info")
            .envs(env.iter().copied())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()?;
        let stderr = Arc::new(Mutex::new(String::new()));
        let mut err_pipe = child.stderr.take().expect("piped stderr");
        let sink = stderr.clone();
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = err_pipe.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buffer[..n]));
            }
        });
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut urls = Vec::new();
        let mut admin_url = None;
        while urls.len() < listeners {
            match lines.next() {
                Some(Ok(line)) => {
                    if let Some(url) = line.strip_prefix("admin listening on ") {
                        admin_url = Some(url.to_owned());
                    }
                    if let Some(url) = line.strip_prefix("listening on ") {
                        urls.push(url.to_owned());
                    }
                }
                _ => {
                    let _ = child.wait();
                    std::thread::sleep(Duration::from_millis(100));
                    return Err(format!(
                        "node exited before listening: {}",
                        stderr.lock().unwrap()
                    )
                    .into());
                }
            }
        }
        let addr = urls[0]
            .split_once("://")
            .map_or("", |(_, addr)| addr)
            .parse()?;
        // Keep draining stdout so the node never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        Ok(Node {
            child,
            addr,
            urls,
            admin_url,
            _dir: dir,
            stderr,
        })
    }

    /// The URL of `path` on this node's first listener.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.urls[0])
    }

    /// The address of the listener with this index.
    pub fn listener_addr(&self, index: usize) -> SocketAddr {
        let url = &self.urls[index];
        url.split_once("://").unwrap().1.parse().unwrap()
    }

    /// The folder the node runs in and its config file is in.
    pub fn dir(&self) -> &Path {
        self._dir.path()
    }

    /// Sends a signal, such as `HUP`, to the node.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill")
            .args([&format!("-{name}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Sends the signals `names`, such as `["TERM", "INT"]`, one right
    /// after the other from one shell, microseconds apart.
    pub fn signals_together(&self, names: &[&str]) {
        let pid = self.child.id().to_string();
        let script: Vec<String> = names
            .iter()
            .map(|name| format!("kill -{name} {pid}"))
            .collect();
        let status = Command::new("sh")
            .args(["-c", &script.join("; ")])
            .status()
            .expect("run sh");
        assert!(status.success());
    }

    /// Everything the node has logged so far.
    pub fn log(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Waits up to five seconds for the log to contain `needle`, because the
    /// log is read from the node's stderr on another thread.
    pub fn log_contains(&self, needle: &str) -> bool {
        for _ in 0..100 {
            if self.log().contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        false
    }

    /// Sends SIGINT, as Ctrl-C does, to ask the node to drain and stop.
    pub fn interrupt(&self) {
        let status = Command::new("kill")
            .args(["-INT", &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Waits up to ten seconds for the node to exit and returns its status.
    pub fn wait_exit(&mut self) -> Option<std::process::ExitStatus> {
        for _ in 0..200 {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Returns the node's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The node's resident memory in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("VmRSS in /proc status")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the `edge` binary with `args` and returns its output.
pub fn edge(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(args)
        .output()
        .expect("run edge")
}

/// A request as an upstream received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: String,
    /// The request target as sent, path and query.
    pub target: String,
    pub headers: HeaderMap,
    pub body_len: usize,
}

type Handler = Arc<dyn Fn(&Received) -> Reply + Send + Sync>;

/// What a test upstream sends back.
pub enum Reply {
    /// A JSON echo of the request.
    Echo,
    /// This status with a small body.
    Status(u16),
    /// Waits, then echoes.
    Delay(Duration),
    /// A response with these extra headers and an echo body.
    Headers(Vec<(&'static str, &'static str)>),
    /// A streamed body of this many bytes, in 64 KiB chunks.
    Bytes(usize),
    /// Response headers and a first chunk at once, then a body that stalls
    /// this long before it ends.
    StalledBody(Duration),
    /// Waits, then sends this JSON body with status 200.
    Json(Duration, serde_json::Value),
    /// A 200 response with these headers and this body.
    Body(Vec<(&'static str, String)>, String),
    /// Waits, then sends the inner reply.
    Delayed(Duration, Box<Reply>),
}

/// A real HTTP/1.1 server on loopback that records what it receives.
pub struct Upstream {
    pub addr: SocketAddr,
    received: Arc<Mutex<Vec<Received>>>,
    count: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Upstream {
    /// Starts an upstream that echoes every request as JSON.
    pub async fn echo() -> Upstream {
        Upstream::start(|_| Reply::Echo).await
    }

    /// Starts an upstream whose replies `handler` chooses.
    pub async fn start(handler: impl Fn(&Received) -> Reply + Send + Sync + 'static) -> Upstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let handler: Handler = Arc::new(handler);
        let (task_received, task_count) = (received.clone(), count.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let (received, count, handler) =
                    (task_received.clone(), task_count.clone(), handler.clone());
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |request| {
                        serve_upstream(request, received.clone(), count.clone(), handler.clone())
                    });
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        Upstream {
            addr,
            received,
            count,
            task,
        }
    }

    /// Requests received so far, including ones whose body broke.
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Requests received with their whole body.
    pub fn complete_count(&self) -> usize {
        self.received.lock().unwrap().len()
    }

    /// Returns every request received in full, in the order they ended.
    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The last request received in full.
    pub fn last(&self) -> Received {
        self.received
            .lock()
            .unwrap()
            .last()
            .cloned()
            .expect("the upstream received a request")
    }
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn serve_upstream(
    request: Request<Incoming>,
    received: Arc<Mutex<Vec<Received>>>,
    count: Arc<AtomicUsize>,
    handler: Handler,
) -> std::result::Result<Response<BoxBody<Bytes, Infallible>>, hyper::Error> {
    count.fetch_add(1, Ordering::SeqCst);
    let (parts, mut body) = request.into_parts();
    let mut body_len = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            body_len += data.len();
        }
    }
    let record = Received {
        method: parts.method.to_string(),
        target: parts.uri.to_string(),
        headers: parts.headers.clone(),
        body_len,
    };
    received.lock().unwrap().push(record.clone());
    let echo = || {
        let headers: BTreeMap<String, String> = record
            .headers
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_str().unwrap_or("").to_owned()))
            .collect();
        let json = serde_json::json!({
            "method": record.method, "target": record.target,
            "headers": headers, "body_len": record.body_len,
        });
        Full::new(Bytes::from(json.to_string())).boxed()
    };
    let mut reply = handler(&record);
    if let Reply::Delayed(delay, inner) = reply {
        tokio::time::sleep(delay).await;
        reply = *inner;
    }
    let response = match reply {
        Reply::Echo => Response::new(echo()),
        Reply::Status(status) => {
            let mut response = Response::new(Full::new(Bytes::from("upstream says no")).boxed());
            *response.status_mut() = StatusCode::from_u16(status).unwrap();
            response
        }
        Reply::Delay(delay) => {
            tokio::time::sleep(delay).await;
            Response::new(echo())
        }
        Reply::Json(delay, value) => {
            tokio::time::sleep(delay).await;
            let mut response = Response::new(Full::new(Bytes::from(value.to_string())).boxed());
            response
                .headers_mut()
                .insert("content-type", "application/json".parse().unwrap());
            response
        }
        Reply::Headers(headers) => {
            let mut response = Response::new(echo());
            for (name, value) in headers {
                response.headers_mut().append(name, value.parse().unwrap());
            }
            response
        }
        Reply::Delayed(..) => Response::new(echo()),
        Reply::Body(headers, body) => {
            let mut response = Response::new(Full::new(Bytes::from(body)).boxed());
            for (name, value) in headers {
                response.headers_mut().append(name, value.parse().unwrap());
            }
            response
        }
        Reply::StalledBody(stall) => {
            let frames = futures_util::stream::unfold(0, move |step| async move {
                match step {
                    0 => Some((Ok::<_, Infallible>(Frame::data(Bytes::from("first"))), 1)),
                    1 => {
                        tokio::time::sleep(stall).await;
                        Some((Ok(Frame::data(Bytes::from("last"))), 2))
                    }
                    _ => None,
                }
            });
            Response::new(StreamBody::new(frames).boxed())
        }
        Reply::Bytes(total) => {
            let chunk = Bytes::from(vec![b'x'; 64 * 1024]);
            let chunks = (0..total.div_ceil(chunk.len())).map(move |i| {
                let len = chunk.len().min(total - i * chunk.len());
                Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
            });
            Response::new(StreamBody::new(futures_util::stream::iter(chunks)).boxed())
        }
    };
    Ok(response)
}

/// A response as the client saw it.
#[derive(Debug)]
pub struct Got {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
    /// The trailer fields after the body, if any came.
    pub trailers: Option<HeaderMap>,
}

impl Got {
    /// The body parsed as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|e| {
            panic!(
                "body is not JSON ({e}): {:?}",
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// A header's value as text.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

/// Reads a whole response.
async fn collect(response: Response<Incoming>) -> Result<Got> {
    let (parts, body) = response.into_parts();
    let collected = body.collect().await?;
    let trailers = collected.trailers().cloned();
    Ok(Got {
        status: parts.status,
        headers: parts.headers,
        body: collected.to_bytes(),
        trailers,
    })
}

/// Sends a request with a small body over a new HTTP/1.1 connection.
pub async fn send(
    method: &str,
    url: &str,
    headers: &[(&str, &str)],
    body: &'static [u8],
) -> Result<Got> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().unwrap().clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    if !headers
        .iter()
        .any(|(name, _)| name.eq_ignore_ascii_case("host"))
    {
        request = request.header("host", authority.as_str());
    }
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::from_static(body)))?)
        .await?;
    collect(response).await
}

/// Sends a request with an owned body of type `content_type` over a new
/// HTTP/1.1 connection.
pub async fn send_owned(method: &str, url: &str, content_type: &str, body: String) -> Result<Got> {
    let uri: http::Uri = url.parse()?;
    let authority = uri.authority().unwrap().clone();
    let stream = tokio::net::TcpStream::connect(authority.as_str()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let request = Request::builder()
        .method(method)
        .uri(uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"))
        .header("host", authority.as_str())
        .header("content-type", content_type)
        .body(Full::new(Bytes::from(body)))?;
    collect(sender.send_request(request).await?).await
}

/// Sends a GET over a new HTTP/1.1 connection.
pub async fn get(url: &str) -> Result<Got> {
    send("GET", url, &[], b"").await
}

/// Sends a GET over HTTP/2 with prior knowledge.
pub async fn get_h2(url: &str) -> Result<Got> {
    get_h2_with(url, &[]).await
}

/// Sends a GET with these headers over HTTP/2 with prior knowledge.
pub async fn get_h2_with(url: &str, headers: &[(&str, &str)]) -> Result<Got> {
    let uri: http::Uri = url.parse()?;
    let stream = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str()).await?;
    let (mut sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let mut request = Request::builder().uri(uri);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = sender
        .send_request(request.body(Full::new(Bytes::new()))?)
        .await?;
    collect(response).await
}

/// Writes a raw HTTP/1.1 request and reads the raw response until the
/// server closes the connection.
pub async fn raw_request(addr: SocketAddr, request: impl AsRef<[u8]>) -> Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(request.as_ref()).await?;
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_end(&mut response)).await??;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

/// GETs `url` and returns the body's length, reading it frame by frame.
pub async fn get_streaming(url: &str) -> Result<usize> {
    let (mut sender, path) = connect(url).await?;
    let request = Request::builder()
        .uri(path)
        .header("host", "test")
        .body(Full::new(Bytes::new()))?;
    let response = sender.send_request(request).await?;
    assert_eq!(response.status(), 200);
    let mut body = response.into_body();
    let mut total = 0;
    while let Some(frame) = body.frame().await {
        if let Some(data) = frame?.data_ref() {
            total += data.len();
        }
    }
    Ok(total)
}

/// POSTs `size` bytes to `url` as a chunked body made frame by frame.
pub async fn post_streaming(url: &str, size: usize) -> Result<Got> {
    let (mut sender, path) = connect(url).await?;
    let chunk = Bytes::from(vec![b'y'; 64 * 1024]);
    let frames = (0..size.div_ceil(chunk.len())).map(move |i| {
        let len = chunk.len().min(size - i * chunk.len());
        Ok::<_, Infallible>(Frame::data(chunk.slice(..len)))
    });
    let body = StreamBody::new(futures_util::stream::iter(frames));
    let request = Request::builder()
        .method("POST")
        .uri(path)
        .header("host", "test")
        .body(body)?;
    let response = sender.send_request(request).await?;
    collect(response).await
}

async fn connect<B>(url: &str) -> Result<(hyper::client::conn::http1::SendRequest<B>, String)>
where
    B: hyper::body::Body + Send + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let uri: http::Uri = url.parse()?;
    let stream = tokio::net::TcpStream::connect(uri.authority().unwrap().as_str()).await?;
    let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    let path = uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/")
        .to_owned();
    Ok((sender, path))
}

/// A rustls client that trusts one CA, for HTTPS requests to nodes.
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
}

/// A response over TLS, with what the handshake chose.
#[derive(Debug)]
pub struct TlsGot {
    pub got: Got,
    /// The ALPN protocol the server chose.
    pub alpn: Option<Vec<u8>>,
    /// The server's certificate, DER.
    pub peer_cert: Vec<u8>,
}

impl TlsClient {
    /// A client that trusts the CA certificates in `ca` (PEM) and offers
    /// `alpn`.
    pub fn new(ca: &Path, alpn: &[&[u8]]) -> TlsClient {
        TlsClient::build(ca, alpn, None)
    }

    /// A client that also presents a certificate chain and key (PEM files).
    pub fn with_client_cert(ca: &Path, alpn: &[&[u8]], cert: &Path, key: &Path) -> TlsClient {
        TlsClient::build(ca, alpn, Some((cert, key)))
    }

    fn build(ca: &Path, alpn: &[&[u8]], identity: Option<(&Path, &Path)>) -> TlsClient {
        use rustls::pki_types::pem::PemObject;
        use rustls::pki_types::{CertificateDer, PrivateKeyDer};
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(ca).expect("read CA file") {
            roots.add(cert.expect("parse CA")).expect("add CA");
        }
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots);
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((cert, key)) => {
                let chain = CertificateDer::pem_file_iter(cert)
                    .unwrap()
                    .collect::<std::result::Result<Vec<_>, _>>()
                    .unwrap();
                let key = PrivateKeyDer::from_pem_file(key).unwrap();
                builder.with_client_auth_cert(chain, key).unwrap()
            }
        };
        config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
        // Every connection makes a full handshake, so that it sees the
        // certificate the node serves now.
        config.resumption = rustls::client::Resumption::disabled();
        TlsClient {
            config: Arc::new(config),
        }
    }

    /// Opens a TLS connection to `addr` with `server_name` as SNI.
    pub async fn connect(
        &self,
        addr: SocketAddr,
        server_name: &str,
    ) -> Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        let stream = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from(server_name.to_owned())?;
        let connector = tokio_rustls::TlsConnector::from(self.config.clone());
        Ok(connector.connect(name, stream).await?)
    }

    /// Sends a GET for `path` on a new connection, over HTTP/2 when ALPN
    /// chose it and HTTP/1.1 otherwise.
    pub async fn get(
        &self,
        addr: SocketAddr,
        server_name: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<TlsGot> {
        let stream = self.connect(addr, server_name).await?;
        let (_, session) = stream.get_ref();
        let alpn = session.alpn_protocol().map(<[u8]>::to_vec);
        let peer_cert = session.peer_certificates().unwrap()[0].to_vec();
        let authority = format!("{server_name}:{}", addr.port());
        let mut request = Request::builder();
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = if alpn.as_deref() == Some(b"h2") {
            let request = request
                .uri(format!("https://{authority}{path}"))
                .body(Full::new(Bytes::new()))?;
            let (mut sender, connection) =
                hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
                    .await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        } else {
            let request = request
                .uri(path)
                .header("host", &authority)
                .body(Full::new(Bytes::new()))?;
            let (mut sender, connection) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            tokio::spawn(connection);
            sender.send_request(request).await?
        };
        Ok(TlsGot {
            got: collect(response).await?,
            alpn,
            peer_cert,
        })
    }
}

/// A test CA that issues server and client certificates.
pub struct TestCa {
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

/// The key type of a test certificate.
#[derive(Debug, Clone, Copy)]
pub enum KeyKind {
    EcdsaP256,
    Rsa2048,
    Ed25519,
}

/// A certificate and key issued by a [`TestCa`], as PEM text.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: Vec<u8>,
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, name);
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let key = rcgen::KeyPair::generate().unwrap();
        TestCa {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// Issues a certificate for `names` (the first is also the CN) valid
    /// from `not_before` to `not_after`.
    pub fn issue_valid(
        &self,
        names: &[&str],
        kind: KeyKind,
        not_before: time::OffsetDateTime,
        not_after: time::OffsetDateTime,
    ) -> Issued {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = rcgen::CertificateParams::new(names.clone()).unwrap();
        // Encoded from the most general attribute to the most specific, as
        // CAs usually do.
        params.distinguished_name = rcgen::DistinguishedName::new();
        params
            .distinguished_name
            .push(rcgen::DnType::OrganizationName, "Example");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        params.not_before = not_before;
        params.not_after = not_after;
        let key = match kind {
            KeyKind::EcdsaP256 => rcgen::KeyPair::generate().unwrap(),
            KeyKind::Rsa2048 => {
                rcgen::KeyPair::generate_rsa_for(&rcgen::PKCS_RSA_SHA256, rcgen::RsaKeySize::_2048)
                    .unwrap()
            }
            KeyKind::Ed25519 => rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap(),
        };
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Issued {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            der: cert.der().to_vec(),
        }
    }

    /// Issues a certificate for `names` valid from an hour ago for a year.
    pub fn issue(&self, names: &[&str], kind: KeyKind) -> Issued {
        let now = time::OffsetDateTime::now_utc();
        self.issue_valid(
            names,
            kind,
            now - time::Duration::hours(1),
            now + time::Duration::days(365),
        )
    }
}

impl Issued {
    /// Writes `NAME.pem` and `NAME.key` into `dir` and returns their paths.
    pub fn write(&self, dir: &Path, name: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{name}.pem"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }
}

/// Starts an HTTPS upstream that echoes requests, with a certificate from
/// `ca` for `upstream.test`, requiring a client certificate from
/// `client_ca` when given. Returns its address and a request counter.
pub async fn tls_upstream(
    ca: &TestCa,
    client_ca: Option<&TestCa>,
) -> (SocketAddr, Arc<AtomicUsize>, tokio::task::JoinHandle<()>) {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let issued = ca.issue(&["upstream.test"], KeyKind::EcdsaP256);
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap();
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(client_ca) => {
            let mut roots = rustls::RootCertStore::empty();
            roots
                .add(CertificateDer::from_pem_slice(client_ca.pem().as_bytes()).unwrap())
                .unwrap();
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots),
                provider,
            )
            .build()
            .unwrap();
            builder.with_client_cert_verifier(verifier)
        }
    };
    let config = builder
        .with_single_cert(
            vec![CertificateDer::from_pem_slice(issued.cert_pem.as_bytes()).unwrap()],
            PrivateKeyDer::from_pem_slice(issued.key_pem.as_bytes()).unwrap(),
        )
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let task_count = count.clone();
    let task = tokio::spawn(async move {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let (acceptor, count) = (acceptor.clone(), task_count.clone());
            tokio::spawn(async move {
                let Ok(stream) = acceptor.accept(stream).await else {
                    return;
                };
                let service = hyper::service::service_fn(move |request: Request<Incoming>| {
                    count.fetch_add(1, Ordering::SeqCst);
                    let proto = request
                        .headers()
                        .get("x-forwarded-proto")
                        .map(|v| v.to_str().unwrap_or("").to_owned());
                    async move {
                        let body = serde_json::json!({ "tls_upstream": true, "proto": proto });
                        Ok::<_, Infallible>(Response::new(Full::new(Bytes::from(body.to_string()))))
                    }
                });
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
    (addr, count, task)
}

/// A free TCP port on 127.0.0.1 (free when this returns).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a free port")
        .port()
}

/// A `redis-server` process on a loopback port, killed on drop.
pub struct Redis {
    child: Option<Child>,
    pub port: u16,
    args: Vec<String>,
    dir: tempfile::TempDir,
}

impl Redis {
    /// Starts a server without persistence on a free port.
    pub fn start() -> Result<Redis> {
        Redis::start_on(free_port(), &[])
    }

    fn start_on(port: u16, extra: &[&str]) -> Result<Redis> {
        let dir = tempfile::tempdir()?;
        let mut args: Vec<String> = [
            "--port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--protected-mode",
            "no",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        args.extend(extra.iter().map(|s| s.to_string()));
        let mut redis = Redis {
            child: None,
            port,
            args,
            dir,
        };
        redis.launch()?;
        Ok(redis)
    }

    fn launch(&mut self) -> Result {
        let log = std::fs::File::create(self.dir.path().join("redis.log"))?;
        let child = Command::new("redis-server")
            .args(&self.args)
            .current_dir(self.dir.path())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start redis-server ({e}); scripts/test installs it, or run \
                     `apt-get install redis-server`"
                )
            })?;
        self.child = Some(child);
        for _ in 0..200 {
            if self.ping() {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        let log = std::fs::read_to_string(self.dir.path().join("redis.log")).unwrap_or_default();
        Err(format!(
            "redis-server on port {} did not answer PING: {log}",
            self.port
        )
        .into())
    }

    fn ping(&self) -> bool {
        use std::io::Write as _;
        let Ok(mut stream) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return false;
        };
        let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
        let mut reply = [0u8; 5];
        stream.write_all(b"PING\r\n").is_ok()
            && stream.read_exact(&mut reply).is_ok()
            && &reply == b"+PONG"
    }

    /// The URL nodes connect with.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server, as a crash would.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops (SIGSTOP) or continues (SIGCONT) the server: a stopped server
    /// accepts connections but answers nothing.
    pub fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("redis is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Starts the server again on the same port, empty.
    pub fn restart(&mut self) -> Result {
        self.stop();
        self.launch()
    }

    /// Starts the server after [`Redis::stop`], on the same port, empty.
    pub fn start_again(&mut self) -> Result {
        self.launch()
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new("redis-cli")
            .args(["-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).trim().to_owned()
    }
}

impl Drop for Redis {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A Redis Cluster of `redis-server` processes on loopback, each a primary
/// with a third of the hash slots, joined with `redis-cli --cluster create`.
pub struct RedisCluster {
    pub nodes: Vec<Redis>,
}

impl RedisCluster {
    pub fn start(size: usize) -> Result<RedisCluster> {
        let mut nodes = Vec::new();
        while nodes.len() < size {
            // A cluster node also listens on its port + 10000 (the bus).
            let port = free_port();
            if port > 55_535 || std::net::TcpListener::bind(("127.0.0.1", port + 10_000)).is_err() {
                continue;
            }
            nodes.push(Redis::start_on(
                port,
                &[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ],
            )?);
        }
        let addrs: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()?;
        if !output.status.success() {
            return Err(format!(
                "redis-cli --cluster create failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            )
            .into());
        }
        let cluster = RedisCluster { nodes };
        for _ in 0..200 {
            if cluster
                .nodes
                .iter()
                .all(|n| n.cli(&["cluster", "info"]).contains("cluster_state:ok"))
            {
                return Ok(cluster);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err("the Redis Cluster did not reach cluster_state:ok".into())
    }

    /// The `[redis]` table's `cluster` value.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(Redis::url).collect()
    }
}
