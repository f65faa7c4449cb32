//! WebSocket proxying (RFC 6455) for HTTP/1.1 clients: the checks on a
//! handshake, the headers it keeps on its way upstream, and the tunnel that
//! copies bytes both ways once the upstream has responded 101.
//!
//! A handshake runs the route's limits and workers as any request does and
//! goes upstream on a new connection that never returns to the pool. After
//! the 101, the node takes both connections over from hyper
//! (`hyper::upgrade::on`) and copies bytes between them until one side
//! closes, the tunnel is idle for too long, or the node's drain ends.

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use http::header::{self, HeaderMap, HeaderValue};
use http::request::Parts;
use http::{Method, Response, StatusCode, Version};
use hyper::upgrade::OnUpgrade;
use hyper_util::rt::TokioIo;
use prometheus::IntCounter;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::drain::{Drain, DrainGuard};
use crate::error::Refusal;
use crate::node::{Node, Route};
use crate::proxy::Upstream;

/// A route's WebSocket settings (`websocket = true`).
#[derive(Debug, Clone)]
pub struct WebSocket {
    /// The route's `websocket_idle_timeout`, or `None` for the upstream's
    /// `idle_timeout`. Zero means no limit.
    pub idle_timeout: Option<Duration>,
}

/// The protocol switch a request names in its `Upgrade` header, read
/// before the node removes that header with the other hop-by-hop fields.
#[derive(Debug)]
pub enum Requested {
    /// `websocket` (or `websocket/VERSION`), as written, whether the
    /// `Connection` header lists `upgrade`, and whether the request
    /// announces a body.
    WebSocket {
        protocol: HeaderValue,
        connection_upgrade: bool,
        body: bool,
    },
    /// Protocols other than WebSocket and `h2c`, as written.
    Other(String),
}

/// Reads the `Upgrade` header of a request. Returns `None` when it names
/// only `h2c`, a switch to HTTP/2 that the node declines by responding in
/// HTTP/1.1, as RFC 9110 (section 7.8) allows.
pub fn requested(headers: &HeaderMap) -> Option<Requested> {
    let mut others = Vec::new();
    for protocol in protocols(headers.get_all(header::UPGRADE)) {
        if is_websocket(protocol) {
            let protocol = HeaderValue::from_bytes(protocol)
                .expect("a part of a header value is a valid header value");
            return Some(Requested::WebSocket {
                protocol,
                connection_upgrade: lists_upgrade(headers),
                body: has_body(headers),
            });
        }
        if !protocol.eq_ignore_ascii_case(b"h2c") {
            others.push(String::from_utf8_lossy(protocol).into_owned());
        }
    }
    (!others.is_empty()).then(|| Requested::Other(others.join(", ")))
}

/// Splits `Upgrade` values into their protocols, skipping empty elements.
fn protocols<'a>(
    values: impl IntoIterator<Item = &'a HeaderValue>,
) -> impl Iterator<Item = &'a [u8]> {
    values
        .into_iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .map(<[u8]>::trim_ascii)
        .filter(|protocol| !protocol.is_empty())
}

/// Returns whether a protocol is WebSocket, which may name its version:
/// `websocket/13`.
fn is_websocket(protocol: &[u8]) -> bool {
    let name = protocol
        .split(|&byte| byte == b'/')
        .next()
        .unwrap_or(protocol);
    name.eq_ignore_ascii_case(b"websocket")
}

/// Returns whether the `Connection` header lists the `upgrade` option.
fn lists_upgrade(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .flat_map(|value| value.as_bytes().split(|&byte| byte == b','))
        .any(|option| option.trim_ascii().eq_ignore_ascii_case(b"upgrade"))
}

/// A WebSocket handshake that the route accepts, on its way upstream.
#[derive(Debug)]
pub struct Handshake {
    /// The protocol the client named in `Upgrade`.
    protocol: HeaderValue,
    /// Resolves to the client's connection once the node has sent the 101.
    client: OnUpgrade,
}

/// Marks an upstream request as a WebSocket handshake, so that the
/// upstream client sends it on a connection of its own and accepts a 101.
#[derive(Debug, Clone, Copy)]
pub struct UpgradeRequest;

/// Checks a request to switch protocols against its route.
/// Returns the handshake to carry on, or `None` when the request goes on as
/// a plain request without its `Upgrade` (a protocol other than WebSocket
/// on a route without `websocket`).
///
/// `extensions` are the request's, from which a handshake takes hyper's
/// `OnUpgrade`.
pub fn check(
    route: &Route,
    method: &Method,
    version: Version,
    extensions: &mut http::Extensions,
    requested: Requested,
) -> Result<Option<Handshake>, Refusal> {
    let protocol = match requested {
        Requested::Other(_) if route.websocket.is_none() => return Ok(None),
        Requested::Other(protocols) => {
            return Err(Refusal::UnsupportedUpgrade {
                protocol: protocols,
                route_has_websocket: true,
            })
        }
        Requested::WebSocket { protocol, .. } if route.websocket.is_none() => {
            return Err(Refusal::UnsupportedUpgrade {
                protocol: String::from_utf8_lossy(protocol.as_bytes()).into_owned(),
                route_has_websocket: false,
            })
        }
        Requested::WebSocket {
            protocol,
            connection_upgrade,
            body,
        } => {
            if !connection_upgrade {
                return Err(invalid("its Connection header does not list `upgrade`"));
            }
            if body {
                return Err(invalid("it has a body, which a handshake never has"));
            }
            protocol
        }
    };
    if version != Version::HTTP_11 {
        return Err(invalid("it needs HTTP/1.1"));
    }
    if method != Method::GET {
        return Err(invalid("its method must be GET"));
    }
    let client = extensions
        .remove::<OnUpgrade>()
        // hyper's HTTP/1.1 server adds it to every request with `Upgrade`
        // (`wants_upgrade` in hyper's `proto/h1/role.rs`), so a listener's
        // request always has it.
        .ok_or_else(|| invalid("its connection cannot be switched"))?;
    Ok(Some(Handshake { protocol, client }))
}

fn invalid(reason: &str) -> Refusal {
    Refusal::InvalidUpgrade(format!("invalid WebSocket handshake: {reason}"))
}

/// Returns whether the request announces a body: a `Transfer-Encoding`, or
/// a `Content-Length` other than 0.
fn has_body(headers: &HeaderMap) -> bool {
    headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get_all(header::CONTENT_LENGTH)
            .iter()
            .any(|length| length.as_bytes().trim_ascii() != b"0")
}

impl Handshake {
    /// Puts back the two hop-by-hop fields that ask the upstream to switch,
    /// after the node removed every hop-by-hop field, and marks the
    /// request for the upstream client.
    pub fn prepare(&self, parts: &mut Parts) {
        let headers = &mut parts.headers;
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, self.protocol.clone());
        parts.extensions.insert(UpgradeRequest);
    }

    /// Turns the upstream's response into the client's. A 101 keeps its
    /// `Upgrade` and gets `Connection: upgrade`, and the tunnel starts: it
    /// waits until both sides have switched and then copies bytes. Any
    /// other response goes to the client as usual, and the client's
    /// connection stays HTTP.
    ///
    /// It removes the response's hop-by-hop fields itself, and puts back
    /// those that a 101 needs.
    pub fn answer<B>(
        self,
        node: &Node,
        drain: Option<&Drain>,
        route: &Route,
        upstream: usize,
        request_id: Option<&HeaderValue>,
        response: &mut Response<B>,
    ) -> Result<(), Refusal> {
        if response.status() != StatusCode::SWITCHING_PROTOCOLS {
            crate::pipeline::remove_hop_by_hop(response.headers_mut());
            return Ok(());
        }
        let upstream = &node.upstreams[upstream];
        let Some((protocol, upstream_side)) = take_switch(response) else {
            tracing::warn!(
                route = %route.name,
                upstream = %upstream.name,
                "upstream switched a WebSocket handshake to another protocol; responding 502"
            );
            return Err(Refusal::UpstreamUnavailable {
                upstream: upstream.name.clone(),
            });
        };

        let mut tunnel = Tunnel::new(node, route, upstream, self.client, upstream_side);
        tunnel.log.request_id = request_id
            .and_then(|id| id.to_str().ok())
            .map(str::to_owned);
        tunnel.drain_guard = drain.map(Drain::hold);
        tokio::spawn(tunnel.run());

        let headers = response.headers_mut();
        // Every hop-by-hop field goes, then these two come back.
        crate::pipeline::remove_hop_by_hop(headers);
        headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
        headers.insert(header::UPGRADE, protocol);
        Ok(())
    }
}

/// Takes the upstream's side of a 101 that switches to WebSocket, with the
/// protocol its `Upgrade` names. Returns `None` for a switch to any other
/// protocol.
fn take_switch<B>(response: &mut Response<B>) -> Option<(HeaderValue, OnUpgrade)> {
    let protocol = response.headers().get(header::UPGRADE)?.clone();
    if !protocols([&protocol]).any(is_websocket) {
        return None;
    }
    let upstream_side = response.extensions_mut().remove::<OnUpgrade>()?;
    Some((protocol, upstream_side))
}

/// The fields of a tunnel's closing log line.
struct TunnelLog {
    route: Arc<str>,
    upstream: String,
    request_id: Option<String>,
}

/// A tunnel between a client and an upstream, from the 101 until either
/// side closes.
struct Tunnel {
    client: OnUpgrade,
    upstream: OnUpgrade,
    idle_timeout: Option<Duration>,
    /// The route's open-tunnel gauge, raised once both sides have switched.
    open: prometheus::IntGauge,
    to_upstream: IntCounter,
    to_client: IntCounter,
    log: TunnelLog,
    /// Keeps the serving thread's drain waiting for the tunnel.
    drain_guard: Option<DrainGuard>,
}

/// The cause of a tunnel's end, for its log line.
#[derive(Debug, Clone, Copy)]
enum Ending {
    /// Both sides closed their halves.
    Closed,
    /// No bytes went either way for the idle timeout.
    IdleTimeout,
    /// Reading or writing one side failed, such as a reset connection.
    Failed,
    /// The node stopped: the drain timeout passed with the tunnel open.
    NodeStopped,
}

impl Ending {
    fn name(self) -> &'static str {
        match self {
            Ending::Closed => "closed",
            Ending::IdleTimeout => "idle_timeout",
            Ending::Failed => "failed",
            Ending::NodeStopped => "node_stopped",
        }
    }
}

impl Tunnel {
    /// Prepares the tunnel of `route` to a target of `upstream`, with its
    /// idle timeout: the route's, else the upstream's.
    fn new(
        node: &Node,
        route: &Route,
        upstream: &Upstream,
        client: OnUpgrade,
        upstream_side: OnUpgrade,
    ) -> Tunnel {
        let idle_timeout = route
            .websocket
            .as_ref()
            .and_then(|websocket| websocket.idle_timeout)
            .or(upstream.settings.idle_timeout)
            .filter(|idle| !idle.is_zero());
        let metrics = &node.metrics;
        let route_name = &*route.name;
        let bytes = |direction| {
            metrics
                .websocket_bytes
                .with_label_values(&[route_name, direction])
        };
        Tunnel {
            client,
            upstream: upstream_side,
            idle_timeout,
            open: metrics.websocket_tunnels.with_label_values(&[route_name]),
            to_upstream: bytes("upstream"),
            to_client: bytes("client"),
            log: TunnelLog {
                route: route.name.clone(),
                upstream: upstream.name.clone(),
                request_id: None,
            },
            drain_guard: None,
        }
    }

    async fn run(mut self) {
        let switched = tokio::try_join!(&mut self.client, &mut self.upstream);
        let (client, upstream) = match switched {
            Ok(pair) => pair,
            Err(error) => {
                // The client went away before the 101 reached it, or a
                // response worker replaced the 101.
                tracing::debug!(route = %self.log.route, %error,
                    "WebSocket handshake did not switch; closing the upstream connection");
                return;
            }
        };
        let activity = Arc::new(Activity::new());
        let mut client = Metered {
            inner: TokioIo::new(client),
            activity: activity.clone(),
            read: self.to_upstream.clone(),
            from_client: true,
        };
        let mut upstream = Metered {
            inner: TokioIo::new(upstream),
            activity: activity.clone(),
            read: self.to_client.clone(),
            from_client: false,
        };
        self.open.inc();
        let mut open = OpenTunnel {
            gauge: self.open,
            activity: activity.clone(),
            ending: Ending::NodeStopped,
            log: self.log,
            _drain_guard: self.drain_guard,
        };
        let idle_timeout = self.idle_timeout;
        open.ending = tokio::select! {
            copied = tokio::io::copy_bidirectional(&mut client, &mut upstream) => match copied {
                Ok(_) => Ending::Closed,
                Err(error) => {
                    tracing::debug!(route = %open.log.route, %error, "WebSocket tunnel failed");
                    Ending::Failed
                }
            },
            () = idle(&activity, idle_timeout) => Ending::IdleTimeout,
        };
        // Both connections close as they drop here, and `open` logs.
    }
}

/// Returns once the tunnel has carried no bytes for `timeout`; never
/// without one.
async fn idle(activity: &Activity, timeout: Option<Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    loop {
        let deadline = activity.last_read() + timeout;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

/// An open tunnel, until it drops: it lowers the gauge and writes the
/// tunnel's closing log line, also when the node stops with it open.
struct OpenTunnel {
    gauge: prometheus::IntGauge,
    activity: Arc<Activity>,
    ending: Ending,
    log: TunnelLog,
    _drain_guard: Option<DrainGuard>,
}

impl Drop for OpenTunnel {
    fn drop(&mut self) {
        self.gauge.dec();
        let activity = &self.activity;
        tracing::info!(
            route = %self.log.route,
            upstream = %self.log.upstream,
            request.id = self.log.request_id.as_deref().unwrap_or(""),
            ending = self.ending.name(),
            duration_ms = activity.started.elapsed().as_millis() as u64,
            bytes_from_client = activity.from_client.load(Ordering::Relaxed),
            bytes_from_upstream = activity.from_upstream.load(Ordering::Relaxed),
            "WebSocket tunnel ended"
        );
    }
}

/// The bytes a tunnel carried and when it last read any.
struct Activity {
    started: Instant,
    /// Milliseconds from `started` to the last read that returned bytes.
    last_read_ms: AtomicU64,
    from_client: AtomicU64,
    from_upstream: AtomicU64,
}

impl Activity {
    fn new() -> Activity {
        Activity {
            started: Instant::now(),
            last_read_ms: AtomicU64::new(0),
            from_client: AtomicU64::new(0),
            from_upstream: AtomicU64::new(0),
        }
    }

    fn last_read(&self) -> Instant {
        self.started + Duration::from_millis(self.last_read_ms.load(Ordering::Relaxed))
    }
}

/// One side of a tunnel, which counts the bytes read from it.
struct Metered<T> {
    inner: T,
    activity: Arc<Activity>,
    /// The route's counter of bytes in this side's direction.
    read: IntCounter,
    from_client: bool,
}

impl<T: AsyncRead + Unpin> AsyncRead for Metered<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.inner).poll_read(cx, buf);
        let read = (buf.filled().len() - before) as u64;
        if read > 0 {
            let activity = &self.activity;
            let elapsed = activity.started.elapsed().as_millis() as u64;
            activity.last_read_ms.store(elapsed, Ordering::Relaxed);
            let total = if self.from_client {
                &activity.from_client
            } else {
                &activity.from_upstream
            };
            total.fetch_add(read, Ordering::Relaxed);
            self.read.inc_by(read);
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Metered<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upgrade_headers(upgrade: &str, connection: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(header::UPGRADE, HeaderValue::from_str(upgrade).unwrap());
        headers.insert(
            header::CONNECTION,
            HeaderValue::from_str(connection).unwrap(),
        );
        headers
    }

    #[test]
    fn requested_finds_websocket_in_a_list() {
        let headers = upgrade_headers("foo/2, WebSocket/13", "keep-alive, Upgrade");
        let Some(Requested::WebSocket {
            protocol,
            connection_upgrade,
            body,
        }) = requested(&headers)
        else {
            panic!("websocket expected");
        };
        assert_eq!(protocol, "WebSocket/13");
        assert!(!body);
        assert!(connection_upgrade);
    }

    #[test]
    fn requested_ignores_h2c() {
        let headers = upgrade_headers("h2c", "Upgrade, HTTP2-Settings");
        assert!(requested(&headers).is_none());
    }

    #[test]
    fn requested_names_other_protocols() {
        let headers = upgrade_headers("h2c, irc/6.9", "upgrade");
        let Some(Requested::Other(protocols)) = requested(&headers) else {
            panic!("another protocol expected");
        };
        assert_eq!(protocols, "irc/6.9");
    }

    #[test]
    fn requested_notes_missing_connection_upgrade() {
        let headers = upgrade_headers("websocket", "keep-alive");
        let Some(Requested::WebSocket {
            connection_upgrade, ..
        }) = requested(&headers)
        else {
            panic!("websocket expected");
        };
        assert!(!connection_upgrade);
    }

    #[test]
    fn requested_notes_a_chunked_body() {
        let mut headers = upgrade_headers("websocket", "upgrade");
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        let Some(Requested::WebSocket { body, .. }) = requested(&headers) else {
            panic!("websocket expected");
        };
        assert!(body);
    }

    #[test]
    fn has_body_reads_length_and_coding() {
        let mut headers = HeaderMap::new();
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
        assert!(!has_body(&headers));
        headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(has_body(&headers));
        headers.remove(header::CONTENT_LENGTH);
        headers.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(has_body(&headers));
    }
}
