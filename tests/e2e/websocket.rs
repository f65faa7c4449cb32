//! WebSocket proxying: handshakes through a real node to a real WebSocket
//! upstream on loopback, frames both ways, closes, the idle timeout, the
//! drain, the open-tunnel gauge and the refusals.
//!
//! The upstream and the client here speak RFC 6455 themselves: the client
//! masks its frames, the upstream computes `Sec-WebSocket-Accept` and echoes
//! each text or binary message.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use base64::Engine as _;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::harness::{raw_request, send, KeyKind, Node, Result, TestCa, TlsClient};

/// Extra header fields of a request.
type Fields = &'static [(&'static str, &'static str)];

/// The GUID that RFC 6455 (section 1.3) appends to the key.
const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const TEXT: u8 = 0x1;
const BINARY: u8 = 0x2;
const CLOSE: u8 = 0x8;
const TOKEN: &str = "websocket-admin-token";

/// Returns the `Sec-WebSocket-Accept` of a key (RFC 6455, section 4.2.2).
fn accept_of(key: &str) -> String {
    let digest = aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA1_FOR_LEGACY_USE_ONLY,
        format!("{key}{GUID}").as_bytes(),
    );
    base64::engine::general_purpose::STANDARD.encode(digest.as_ref())
}

/// The upstream's response to a handshake.
#[derive(Clone, Copy)]
enum Answer {
    /// 101, then echoes each message. When the client half-closes, it sends
    /// the text `eof` and closes.
    Echo,
    /// 101, then a close frame, then closes the connection.
    CloseAtOnce,
    /// This status with a small body, on a connection that stays open.
    Status(u16),
    /// Waits this long, then responds as `Echo` does.
    Delay(Duration),
    /// 101 with `Upgrade: irc/6.9`, which the client did not request.
    OtherProtocol,
}

/// A request head the upstream received.
#[derive(Debug, Clone)]
struct Seen {
    /// The number of the connection it came on, from 0 in accept order.
    connection: usize,
    method: String,
    target: String,
    /// Lower-case names; repeated fields joined with `, `.
    headers: HashMap<String, String>,
}

/// What a [`WsUpstream`] records, shared by its connections.
#[derive(Default)]
struct Record {
    seen: Mutex<Vec<Seen>>,
    /// Tunnels in which the upstream read the end of the client's stream.
    eofs: AtomicUsize,
    /// The connections the node closed between requests, by number.
    closed: Mutex<Vec<usize>>,
}

/// A WebSocket upstream on loopback. Requests without `Upgrade` get a
/// plain 200 with the body `plain`.
struct WsUpstream {
    addr: SocketAddr,
    record: Arc<Record>,
}

impl WsUpstream {
    async fn start(answer: Answer) -> WsUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let record = Arc::new(Record::default());
        let record_by_task = record.clone();
        tokio::spawn(async move {
            let mut connection = 0;
            while let Ok((stream, _)) = listener.accept().await {
                let record = record_by_task.clone();
                tokio::spawn(async move {
                    let _ = serve_upstream(stream, connection, answer, record).await;
                });
                connection += 1;
            }
        });
        WsUpstream { addr, record }
    }

    fn seen(&self) -> Vec<Seen> {
        self.record.seen.lock().unwrap().clone()
    }

    fn eofs(&self) -> usize {
        self.record.eofs.load(Ordering::SeqCst)
    }

    fn closed(&self) -> Vec<usize> {
        self.record.closed.lock().unwrap().clone()
    }
}

async fn serve_upstream(
    mut stream: TcpStream,
    connection: usize,
    answer: Answer,
    record: Arc<Record>,
) -> Result {
    loop {
        let Some(head) = read_head(&mut stream).await? else {
            record.closed.lock().unwrap().push(connection);
            return Ok(());
        };
        let request = parse_request(&head, connection);
        record.seen.lock().unwrap().push(request.clone());
        let Some(key) = request.headers.get("sec-websocket-key") else {
            stream
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nplain")
                .await?;
            continue;
        };
        let accept = accept_of(key);
        let switch = |protocol: Option<&String>| {
            let protocol = protocol
                .and_then(|offered| offered.split(',').next())
                .map(|first| format!("sec-websocket-protocol: {}\r\n", first.trim()))
                .unwrap_or_default();
            format!(
                "HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\
                 connection: Upgrade\r\nsec-websocket-accept: {accept}\r\n{protocol}\
                 keep-alive: timeout=5\r\nx-upstream: ws\r\n\r\n"
            )
        };
        let protocol = request.headers.get("sec-websocket-protocol");
        match answer {
            Answer::Status(status) => {
                let reply =
                    format!("HTTP/1.1 {status} Refused\r\ncontent-length: 7\r\n\r\nrefused");
                stream.write_all(reply.as_bytes()).await?;
                continue;
            }
            Answer::CloseAtOnce => {
                stream.write_all(switch(protocol).as_bytes()).await?;
                write_frame(&mut stream, CLOSE, &[0x03, 0xe8], false).await?;
                stream.shutdown().await?;
                return Ok(());
            }
            Answer::OtherProtocol => {
                let reply = "HTTP/1.1 101 Switching Protocols\r\nupgrade: irc/6.9\r\n\
                             connection: upgrade\r\n\r\n";
                stream.write_all(reply.as_bytes()).await?;
                return Ok(());
            }
            Answer::Delay(wait) => {
                tokio::time::sleep(wait).await;
                stream.write_all(switch(protocol).as_bytes()).await?;
            }
            Answer::Echo => stream.write_all(switch(protocol).as_bytes()).await?,
        }
        return echo(stream, &record.eofs).await;
    }
}

/// Echoes each message until the client's stream ends, then sends `eof`
/// and closes, so that a half-close shows in both directions.
async fn echo(mut stream: TcpStream, eofs: &AtomicUsize) -> Result {
    loop {
        match read_frame(&mut stream).await? {
            Some((CLOSE, payload)) => {
                write_frame(&mut stream, CLOSE, &payload, false).await?;
            }
            Some((opcode, payload)) => write_frame(&mut stream, opcode, &payload, false).await?,
            None => {
                eofs.fetch_add(1, Ordering::SeqCst);
                write_frame(&mut stream, TEXT, b"eof", false).await?;
                stream.shutdown().await?;
                return Ok(());
            }
        }
    }
}

/// Reads an HTTP head up to its blank line, a byte at a time so that no
/// frame after it is consumed. Returns `None` at the end of the stream.
async fn read_head(stream: &mut (impl AsyncRead + Unpin)) -> Result<Option<String>> {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        if stream.read(&mut byte).await? == 0 {
            return Ok(None);
        }
        head.push(byte[0]);
    }
    Ok(Some(String::from_utf8(head)?))
}

fn parse_request(head: &str, connection: usize) -> Seen {
    let mut lines = head.split("\r\n");
    let mut request_line = lines.next().unwrap_or_default().split(' ');
    let method = request_line.next().unwrap_or_default().to_owned();
    let target = request_line.next().unwrap_or_default().to_owned();
    Seen {
        connection,
        method,
        target,
        headers: parse_headers(lines),
    }
}

fn parse_headers<'a>(lines: impl Iterator<Item = &'a str>) -> HashMap<String, String> {
    let mut headers: HashMap<String, String> = HashMap::new();
    for line in lines.filter(|line| !line.is_empty()) {
        let (name, value) = line.split_once(':').unwrap();
        let name = name.trim().to_ascii_lowercase();
        let value = value.trim().to_owned();
        headers
            .entry(name)
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(&value);
            })
            .or_insert(value);
    }
    headers
}

/// Writes one final frame, masked with a fixed key when `masked`.
async fn write_frame(
    stream: &mut (impl AsyncWrite + Unpin),
    opcode: u8,
    payload: &[u8],
    masked: bool,
) -> Result {
    let mut frame = vec![0x80 | opcode];
    let mask_bit = if masked { 0x80 } else { 0 };
    match payload.len() {
        len @ 0..=125 => frame.push(mask_bit | len as u8),
        len @ 126..=0xffff => {
            frame.push(mask_bit | 126);
            frame.extend_from_slice(&(len as u16).to_be_bytes());
        }
        len => {
            frame.push(mask_bit | 127);
            frame.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        let key = [0x37, 0xfa, 0x21, 0x3d];
        frame.extend_from_slice(&key);
        frame.extend(
            payload
                .iter()
                .enumerate()
                .map(|(i, byte)| byte ^ key[i % 4]),
        );
    } else {
        frame.extend_from_slice(payload);
    }
    stream.write_all(&frame).await?;
    Ok(())
}

/// Reads one frame and returns its opcode and unmasked payload, or `None`
/// at the end of the stream. Messages here are never fragmented.
async fn read_frame(stream: &mut (impl AsyncRead + Unpin)) -> Result<Option<(u8, Vec<u8>)>> {
    let mut start = [0u8; 2];
    match stream.read_exact(&mut start).await {
        Ok(_) => {}
        Err(error) if error.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
        Err(error) => return Err(error.into()),
    }
    assert_eq!(start[0] & 0x80, 0x80, "a final frame");
    let opcode = start[0] & 0x0f;
    let masked = start[1] & 0x80 != 0;
    let len = match start[1] & 0x7f {
        126 => u64::from(stream.read_u16().await?),
        127 => stream.read_u64().await?,
        len => u64::from(len),
    };
    let mut key = [0u8; 4];
    if masked {
        stream.read_exact(&mut key).await?;
    }
    let mut payload = vec![0u8; len as usize];
    stream.read_exact(&mut payload).await?;
    if masked {
        for (i, byte) in payload.iter_mut().enumerate() {
            *byte ^= key[i % 4];
        }
    }
    Ok(Some((opcode, payload)))
}

/// A client connection to the node after its handshake, over TCP or TLS.
struct WsClient<S = TcpStream> {
    stream: S,
    /// The response's status line and lower-case headers.
    status: u16,
    headers: HashMap<String, String>,
    /// The key the client sent.
    key: String,
}

impl WsClient {
    /// Sends a handshake for `path` with `extra` fields and reads the
    /// response head; a response that is not 101 leaves its body unread.
    async fn connect(addr: SocketAddr, path: &str, extra: &[(&str, &str)]) -> Result<WsClient> {
        let stream = TcpStream::connect(addr).await?;
        WsClient::handshake(stream, path, extra).await
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsClient<S> {
    /// Sends a handshake on `stream`, as [`WsClient::connect`] does.
    async fn handshake(mut stream: S, path: &str, extra: &[(&str, &str)]) -> Result<WsClient<S>> {
        let key =
            base64::engine::general_purpose::STANDARD.encode(fastrand::u128(..).to_be_bytes());
        let mut request = format!(
            "GET {path} HTTP/1.1\r\nhost: chat.example\r\nupgrade: websocket\r\n\
             sec-websocket-key: {key}\r\nsec-websocket-version: 13\r\n"
        );
        if !extra
            .iter()
            .any(|(name, _)| name.eq_ignore_ascii_case("connection"))
        {
            request.push_str("connection: Upgrade\r\n");
        }
        for (name, value) in extra {
            request.push_str(&format!("{name}: {value}\r\n"));
        }
        request.push_str("\r\n");
        stream.write_all(request.as_bytes()).await?;
        let head = read_head(&mut stream)
            .await?
            .ok_or("the node closed the connection before a response")?;
        let mut lines = head.split("\r\n");
        let status = lines
            .next()
            .and_then(|line| line.split(' ').nth(1))
            .and_then(|status| status.parse().ok())
            .ok_or("no status line")?;
        Ok(WsClient {
            stream,
            status,
            headers: parse_headers(lines),
            key,
        })
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).map(String::as_str)
    }

    /// Reads the body of a response with a `Content-Length`.
    async fn body(&mut self) -> Result<String> {
        let length: usize = self.header("content-length").ok_or("no length")?.parse()?;
        let mut body = vec![0u8; length];
        self.stream.read_exact(&mut body).await?;
        Ok(String::from_utf8(body)?)
    }

    async fn send(&mut self, opcode: u8, payload: &[u8]) -> Result {
        write_frame(&mut self.stream, opcode, payload, true).await
    }

    /// Reads the next frame within five seconds.
    async fn recv(&mut self) -> Result<Option<(u8, Vec<u8>)>> {
        tokio::time::timeout(Duration::from_secs(5), read_frame(&mut self.stream))
            .await
            .map_err(|_| "no frame within 5 s")?
    }
}

/// Builds a config with an admin listener and the routes `ws` (`/ws`, with
/// `websocket = true` and `route_extra`) and `plain` (`/plain`, without),
/// both to `upstream`, after `before`.
fn config(upstream: &WsUpstream, before: &str, upstream_extra: &str, route_extra: &str) -> String {
    format!(
        "{before}[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [upstreams.chat]\ntargets = [\"{}\"]\n{upstream_extra}\n\
         [[routes]]\nname = \"ws\"\nprefix = \"/ws\"\nupstream = \"chat\"\nwebsocket = true\n\
         {route_extra}\n\
         [[routes]]\nname = \"plain\"\nprefix = \"/plain\"\nupstream = \"chat\"\n",
        upstream.addr
    )
}

/// Returns the value of the sample `name` with `labels`, or `None`.
async fn metric(node: &Node, name: &str, labels: &[(&str, &str)]) -> Result<Option<f64>> {
    let url = format!(
        "{}/metrics",
        node.admin_url.as_ref().expect("admin listener")
    );
    let bearer = format!("Bearer {TOKEN}");
    let got = send("GET", &url, &[("authorization", &bearer)], b"").await?;
    let text = String::from_utf8(got.body.to_vec())?;
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let scrape = prometheus_parse::Scrape::parse(lines)?;
    let value = scrape
        .samples
        .into_iter()
        .filter(|sample| sample.metric == name)
        .find(|sample| {
            labels
                .iter()
                .all(|(label, value)| sample.labels.get(label) == Some(*value))
        })
        .map(|sample| match sample.value {
            prometheus_parse::Value::Counter(value) | prometheus_parse::Value::Gauge(value) => {
                value
            }
            _ => f64::NAN,
        });
    Ok(value)
}

/// Polls the sample until it has `expected`, for up to five seconds.
async fn wait_for_metric(
    node: &Node,
    name: &str,
    labels: &[(&str, &str)],
    expected: f64,
) -> Result<Option<f64>> {
    let mut value = None;
    for _ in 0..100 {
        value = metric(node, name, labels).await?;
        if value == Some(expected) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(value)
}

#[tokio::test]
async fn websocket_echoes_messages_both_ways() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let extra = [
        ("connection", "keep-alive, Upgrade, x-hop"),
        ("x-hop", "for-the-node"),
        ("keep-alive", "timeout=5"),
        ("te", "trailers"),
        ("proxy-authorization", "Basic c2VjcmV0"),
        ("sec-websocket-protocol", "chat, superchat"),
        ("sec-websocket-extensions", "x-test-extension"),
        ("origin", "http://chat.example"),
    ];
    let mut client = WsClient::connect(node.addr, "/ws/room?id=7", &extra).await?;
    assert_eq!(client.status, 101, "{:?}", client.headers);
    assert_eq!(client.header("upgrade"), Some("websocket"));
    assert_eq!(client.header("connection"), Some("upgrade"));
    let accept = accept_of(&client.key);
    assert_eq!(client.header("sec-websocket-accept"), Some(accept.as_str()));
    assert_eq!(client.header("sec-websocket-protocol"), Some("chat"));
    assert_eq!(client.header("x-upstream"), Some("ws"));
    assert!(
        client.header("keep-alive").is_none(),
        "{:?}",
        client.headers
    );
    assert!(client.header("x-request-id").is_some());

    let messages: Vec<(u8, Vec<u8>)> = vec![
        (TEXT, b"hello".to_vec()),
        (BINARY, vec![0, 1, 2, 255]),
        (TEXT, "x".repeat(300).into_bytes()),
        (BINARY, (0..70_000).map(|i| (i % 251) as u8).collect()),
        (TEXT, "ünïcode".as_bytes().to_vec()),
    ];
    for (opcode, payload) in &messages {
        client.send(*opcode, payload).await?;
        let echoed = client.recv().await?.ok_or("the tunnel closed")?;
        assert_eq!(echoed.0, *opcode);
        assert_eq!(&echoed.1, payload);
    }
    // Several messages in flight at once come back in order.
    for (opcode, payload) in &messages {
        client.send(*opcode, payload).await?;
    }
    for (opcode, payload) in &messages {
        let echoed = client.recv().await?.ok_or("the tunnel closed")?;
        assert_eq!(echoed.0, *opcode);
        assert_eq!(&echoed.1, payload);
    }

    let seen = upstream.seen();
    assert_eq!(seen.len(), 1);
    let request = &seen[0];
    assert_eq!(request.method, "GET");
    assert_eq!(request.target, "/ws/room?id=7");
    let headers = &request.headers;
    assert_eq!(
        headers.get("upgrade").map(String::as_str),
        Some("websocket")
    );
    assert_eq!(
        headers.get("connection").map(String::as_str),
        Some("upgrade")
    );
    assert_eq!(headers.get("sec-websocket-key"), Some(&client.key));
    assert_eq!(
        headers.get("sec-websocket-version").map(String::as_str),
        Some("13")
    );
    assert_eq!(
        headers.get("sec-websocket-protocol").map(String::as_str),
        Some("chat, superchat")
    );
    assert_eq!(
        headers.get("sec-websocket-extensions").map(String::as_str),
        Some("x-test-extension")
    );
    assert_eq!(
        headers.get("origin").map(String::as_str),
        Some("http://chat.example")
    );
    assert_eq!(
        headers.get("x-forwarded-for").map(String::as_str),
        Some("127.0.0.1")
    );
    assert_eq!(
        headers.get("x-forwarded-proto").map(String::as_str),
        Some("http")
    );
    assert_eq!(
        headers.get("x-forwarded-host").map(String::as_str),
        Some("chat.example")
    );
    assert!(headers.contains_key("x-request-id"), "{headers:?}");
    assert!(headers.contains_key("via"), "{headers:?}");
    for hop_by_hop in ["keep-alive", "te", "proxy-authorization", "x-hop"] {
        assert!(
            !headers.contains_key(hop_by_hop),
            "{hop_by_hop} went upstream"
        );
    }
    Ok(())
}

#[tokio::test]
async fn websocket_handshake_writes_access_log_and_tunnel_line() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let before = "[access_log]\npath = \"access.log\"\n\n";
    let node = Node::start(&config(&upstream, before, "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[("x-request-id", "ws-log-1")]).await?;
    assert_eq!(client.status, 101);
    client.send(TEXT, b"0123456789").await?;
    client.recv().await?.ok_or("the tunnel closed")?;
    client.stream.shutdown().await?;
    assert_eq!(client.recv().await?, Some((TEXT, b"eof".to_vec())));
    assert_eq!(client.recv().await?, None);

    let path = node.dir().join("access.log");
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(&path).unwrap_or_default();
        if !text.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let line: serde_json::Value = serde_json::from_str(text.lines().next().ok_or("no line")?)?;
    assert_eq!(line["status"], 101, "{line}");
    assert_eq!(line["route"], "ws", "{line}");
    assert_eq!(line["upstream"], "chat", "{line}");
    assert_eq!(line["reason"], "proxied", "{line}");
    assert_eq!(line["request_id"], "ws-log-1", "{line}");

    assert!(
        node.log_contains("WebSocket tunnel ended"),
        "{}",
        node.log()
    );
    let log = node.log();
    let ended = log
        .lines()
        .find(|line| line.contains("WebSocket tunnel ended"))
        .unwrap();
    assert!(ended.contains("ws-log-1"), "{ended}");
    assert!(ended.contains("closed"), "{ended}");
    // The frame is 10 bytes of payload, 2 of header and 4 of mask; the echo
    // and `eof` are 12 and 5 bytes.
    assert!(ended.contains("bytes_from_client=16"), "{ended}");
    assert!(ended.contains("bytes_from_upstream=17"), "{ended}");
    Ok(())
}

#[tokio::test]
async fn websocket_off_route_gets_501() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/plain/chat", &[]).await?;
    assert_eq!(client.status, 501);
    assert_eq!(client.header("content-type"), Some("application/json"));
    let body: serde_json::Value = serde_json::from_str(&client.body().await?)?;
    assert_eq!(body["error"], "unsupported_upgrade");
    let message = body["message"].as_str().unwrap();
    assert!(message.contains("websocket = true"), "{message}");
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    Ok(())
}

#[tokio::test]
async fn websocket_worker_refusal_stops_handshake() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let route_extra = "[[routes.workers]]\nmodule = \"{modules}/fixture-worker.wasm\"\n\
                       [routes.workers.config]\nmode = \"respond\"\nstatus = 401\nbody = \"no\"\n";
    let node = Node::start(&config(&upstream, "", "", route_extra))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 401);
    assert_eq!(client.body().await?, "no");
    assert!(client.header("upgrade").is_none());
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());
    Ok(())
}

#[tokio::test]
async fn websocket_upstream_refusal_keeps_http() -> Result {
    let upstream = WsUpstream::start(Answer::Status(403)).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 403);
    assert!(client.header("upgrade").is_none(), "{:?}", client.headers);
    assert_eq!(client.body().await?, "refused");

    // The client's connection still carries plain HTTP requests.
    let request = "GET /plain/after HTTP/1.1\r\nhost: chat.example\r\n\r\n";
    client.stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut client.stream)
        .await?
        .ok_or("connection closed")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 2, "{seen:?}");
    assert_eq!(seen[1].target, "/plain/after");
    Ok(())
}

#[tokio::test]
async fn websocket_handshake_skips_the_pool() -> Result {
    let upstream = WsUpstream::start(Answer::Status(403)).await;
    // One serving thread, so that every request uses the same pool.
    let before = "[node]\nthreads = 1\n\n";
    let node = Node::start(&config(&upstream, before, "", ""))?;
    let plain = send("GET", &node.url("/plain/first"), &[], b"").await?;
    assert_eq!(plain.status, 200);
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 403);
    assert_eq!(client.body().await?, "refused");
    let plain = send("GET", &node.url("/plain/second"), &[], b"").await?;
    assert_eq!(plain.status, 200);

    // The handshake went on a new connection, and the node closed it after
    // the 403 instead of keeping it for the next request.
    let seen = upstream.seen();
    let connections: Vec<usize> = seen.iter().map(|seen| seen.connection).collect();
    assert_eq!(connections, [0, 1, 0], "{seen:?}");
    let mut closed = Vec::new();
    for _ in 0..100 {
        closed = upstream.closed();
        if !closed.is_empty() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(closed, [1]);
    Ok(())
}

#[tokio::test]
async fn websocket_upstream_close_reaches_client() -> Result {
    let upstream = WsUpstream::start(Answer::CloseAtOnce).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101);
    assert_eq!(client.recv().await?, Some((CLOSE, vec![0x03, 0xe8])));
    assert_eq!(
        client.recv().await?,
        None,
        "the node closes the client side"
    );
    Ok(())
}

#[tokio::test]
async fn websocket_client_close_reaches_upstream() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101);
    client.send(CLOSE, &[0x03, 0xe8]).await?;
    assert_eq!(client.recv().await?, Some((CLOSE, vec![0x03, 0xe8])));
    // A half-close: the upstream reads the end, and its reply still comes
    // back on the other half.
    client.stream.shutdown().await?;
    assert_eq!(client.recv().await?, Some((TEXT, b"eof".to_vec())));
    assert_eq!(client.recv().await?, None);
    assert_eq!(upstream.eofs(), 1);
    Ok(())
}

#[tokio::test]
async fn websocket_idle_timeout_closes_tunnel() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let route_extra = "websocket_idle_timeout = \"600ms\"\n";
    let node = Node::start(&config(&upstream, "", "", route_extra))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101);
    // Traffic keeps the tunnel open past the timeout.
    for _ in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        client.send(TEXT, b"ping").await?;
        assert_eq!(client.recv().await?, Some((TEXT, b"ping".to_vec())));
    }
    let silent = Instant::now();
    assert_eq!(
        client.recv().await?,
        None,
        "the node closes a silent tunnel"
    );
    let waited = silent.elapsed();
    assert!(waited >= Duration::from_millis(500), "{waited:?}");
    assert!(waited < Duration::from_secs(3), "{waited:?}");
    assert!(node.log_contains("idle_timeout"), "{}", node.log());
    Ok(())
}

#[tokio::test]
async fn websocket_upstream_idle_timeout_is_the_default() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "idle_timeout = \"500ms\"\n", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101);
    let silent = Instant::now();
    assert_eq!(
        client.recv().await?,
        None,
        "the node closes a silent tunnel"
    );
    assert!(silent.elapsed() < Duration::from_secs(3));
    Ok(())
}

#[tokio::test]
async fn websocket_tunnel_outlives_drain_until_timeout() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let before = "[node]\ndrain_timeout = \"2s\"\n\n";
    let mut node = Node::start(&config(&upstream, before, "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101);
    node.signal("TERM");
    assert!(
        node.log_contains("draining open connections"),
        "{}",
        node.log()
    );
    let signalled = Instant::now();
    // The tunnel carries messages during the drain.
    client.send(TEXT, b"still here").await?;
    assert_eq!(client.recv().await?, Some((TEXT, b"still here".to_vec())));
    let status = tokio::task::spawn_blocking(move || {
        let status = node.wait_exit();
        (status, node.log())
    });
    assert_eq!(client.recv().await?, None, "the drain closes the tunnel");
    let closed = signalled.elapsed();
    let (status, log) = status.await?;
    assert!(status.is_some(), "the node did not exit: {log}");
    assert!(closed >= Duration::from_millis(1500), "{closed:?}");
    assert!(signalled.elapsed() < Duration::from_secs(5), "{log}");
    assert!(log.contains("node_stopped"), "{log}");
    Ok(())
}

#[tokio::test]
async fn websocket_open_tunnels_gauge_rises_and_falls() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let route = [("route", "ws")];
    // The series is there, at 0, before the first tunnel.
    assert_eq!(
        metric(&node, "edge_websocket_tunnels", &route).await?,
        Some(0.0)
    );
    let plain = [("route", "plain")];
    assert_eq!(metric(&node, "edge_websocket_tunnels", &plain).await?, None);

    let mut first = WsClient::connect(node.addr, "/ws", &[]).await?;
    let mut second = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!((first.status, second.status), (101, 101));
    first.send(TEXT, b"one").await?;
    first.recv().await?;
    second.send(TEXT, b"two").await?;
    second.recv().await?;
    let open = wait_for_metric(&node, "edge_websocket_tunnels", &route, 2.0).await?;
    assert_eq!(open, Some(2.0));

    first.stream.shutdown().await?;
    assert_eq!(first.recv().await?, Some((TEXT, b"eof".to_vec())));
    let open = wait_for_metric(&node, "edge_websocket_tunnels", &route, 1.0).await?;
    assert_eq!(open, Some(1.0));
    drop(second);
    let open = wait_for_metric(&node, "edge_websocket_tunnels", &route, 0.0).await?;
    assert_eq!(open, Some(0.0));

    let handshakes = [
        ("route", "ws"),
        ("upstream", "chat"),
        ("status_class", "1xx"),
        ("reason", "proxied"),
    ];
    assert_eq!(
        metric(&node, "edge_requests_total", &handshakes).await?,
        Some(2.0)
    );
    let from_client = [("route", "ws"), ("direction", "upstream")];
    let from_client = metric(&node, "edge_websocket_bytes_total", &from_client).await?;
    // Two masked frames of three bytes, nine bytes each.
    assert_eq!(from_client, Some(18.0));
    Ok(())
}

#[tokio::test]
async fn websocket_refusals_reach_no_upstream() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    // A protocol other than WebSocket on a WebSocket route.
    let request = "GET /ws HTTP/1.1\r\nhost: chat.example\r\nupgrade: irc/6.9\r\n\
                   connection: upgrade, close\r\n\r\n";
    let response = raw_request(node.addr, request).await?;
    assert!(response.starts_with("HTTP/1.1 501"), "{response}");
    assert!(
        response.contains("\"error\":\"unsupported_upgrade\""),
        "{response}"
    );
    assert!(response.contains("WebSocket only"), "{response}");

    // Handshakes that RFC 6455 does not allow.
    let invalid: [Fields; 3] = [
        &[("content-length", "5")],
        &[("transfer-encoding", "chunked")],
        &[("connection", "keep-alive")],
    ];
    for extra in invalid {
        let mut client = WsClient::connect(node.addr, "/ws", extra).await?;
        assert_eq!(client.status, 400, "{extra:?}");
        let body: serde_json::Value = serde_json::from_str(&client.body().await?)?;
        assert_eq!(body["error"], "invalid_upgrade", "{extra:?}");
    }
    // A POST handshake is no handshake.
    let request = "POST /ws HTTP/1.1\r\nhost: chat.example\r\nupgrade: websocket\r\n\
                   connection: upgrade\r\ncontent-length: 0\r\n\r\n";
    let mut stream = TcpStream::connect(node.addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream).await?.ok_or("closed")?;
    assert!(head.starts_with("HTTP/1.1 400"), "{head}");

    // An HTTP/1.0 handshake is invalid too.
    let request = "GET /ws HTTP/1.0\r\nhost: chat.example\r\nupgrade: websocket\r\n\
                   connection: upgrade\r\n\r\n";
    let response = raw_request(node.addr, request).await?;
    assert!(response.starts_with("HTTP/1.0 400"), "{response}");
    assert!(response.contains("HTTP/1.1"), "{response}");
    assert!(upstream.seen().is_empty(), "{:?}", upstream.seen());

    // The node declines `h2c` by responding in HTTP/1.1, as before.
    let request = "GET /ws/h2c HTTP/1.1\r\nhost: chat.example\r\nupgrade: h2c\r\n\
                   connection: upgrade, http2-settings\r\nhttp2-settings: AAMAAABkAAQAAP__\r\n\r\n";
    let mut stream = TcpStream::connect(node.addr).await?;
    stream.write_all(request.as_bytes()).await?;
    let head = read_head(&mut stream).await?.ok_or("closed")?;
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    let seen = upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert!(!seen[0].headers.contains_key("upgrade"), "{seen:?}");
    Ok(())
}

#[tokio::test]
async fn websocket_upstream_down_gets_502() -> Result {
    // A port that nothing listens on: bound, then closed.
    let closed = TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
    let upstream = WsUpstream {
        addr: closed,
        record: Arc::default(),
    };
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 502);
    let body: serde_json::Value = serde_json::from_str(&client.body().await?)?;
    assert_eq!(body["error"], "upstream_unavailable");
    Ok(())
}

#[tokio::test]
async fn websocket_slow_handshake_gets_504() -> Result {
    let upstream = WsUpstream::start(Answer::Delay(Duration::from_secs(3))).await;
    let upstream_extra = "response_timeout = \"300ms\"\n";
    let node = Node::start(&config(&upstream, "", upstream_extra, ""))?;
    let started = Instant::now();
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 504);
    assert!(started.elapsed() < Duration::from_secs(2));
    let body: serde_json::Value = serde_json::from_str(&client.body().await?)?;
    assert_eq!(body["error"], "upstream_timeout");
    Ok(())
}

#[tokio::test]
async fn websocket_over_tls_listener() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("WebSocket test CA");
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let (cert, key) = ca
        .issue(&["chat.example"], KeyKind::EcdsaP256)
        .write(dir.path(), "chat");
    let listener = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.tls]\n\
         [[listeners.tls.certificates]]\ncert = {:?}\nkey = {:?}\n\n",
        cert.display().to_string(),
        key.display().to_string()
    );
    let node = Node::start(&config(&upstream, &listener, "", ""))?;

    // The client offers only HTTP/1.1: the node has no WebSocket over
    // HTTP/2.
    let tls = TlsClient::new(&ca_file, &[b"http/1.1"]);
    let stream = tls.connect(node.addr, "chat.example").await?;
    let mut client = WsClient::handshake(stream, "/ws", &[]).await?;
    assert_eq!(client.status, 101, "{:?}", client.headers);
    for message in [&b"over tls"[..], &[7u8; 1000][..]] {
        client.send(BINARY, message).await?;
        assert_eq!(client.recv().await?, Some((BINARY, message.to_vec())));
    }

    let seen = upstream.seen();
    assert_eq!(
        seen[0].headers.get("x-forwarded-proto").map(String::as_str),
        Some("https")
    );
    Ok(())
}

#[tokio::test]
async fn websocket_switch_to_other_protocol_gets_502() -> Result {
    let upstream = WsUpstream::start(Answer::OtherProtocol).await;
    let node = Node::start(&config(&upstream, "", "", ""))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 502);
    assert!(client.header("upgrade").is_none(), "{:?}", client.headers);
    let body: serde_json::Value = serde_json::from_str(&client.body().await?)?;
    assert_eq!(body["error"], "upstream_unavailable");
    assert!(node.log_contains("another protocol"), "{}", node.log());
    Ok(())
}

#[tokio::test]
async fn websocket_workers_change_both_heads() -> Result {
    let upstream = WsUpstream::start(Answer::Echo).await;
    let route_extra = "[[routes.workers]]\nmodule = \"{modules}/add-header.wasm\"\n\
                       [routes.workers.config]\nheaders = { \"x-edge\" = \"hello\" }\n\
                       response_headers = { \"x-served-by\" = \"edge\" }\n";
    let node = Node::start(&config(&upstream, "", "", route_extra))?;
    let mut client = WsClient::connect(node.addr, "/ws", &[]).await?;
    assert_eq!(client.status, 101, "{:?}", client.headers);
    assert_eq!(client.header("x-served-by"), Some("edge"));
    let seen = upstream.seen();
    assert_eq!(
        seen[0].headers.get("x-edge").map(String::as_str),
        Some("hello")
    );
    client.send(TEXT, b"after workers").await?;
    assert_eq!(
        client.recv().await?,
        Some((TEXT, b"after workers".to_vec()))
    );
    Ok(())
}
