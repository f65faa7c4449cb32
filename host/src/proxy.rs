//! The upstream client: keep-alive HTTP/1.1 connections per target, kept in
//! a small FIFO pool per serving thread, and the body types that stream
//! requests and responses through without buffering them.
//!
//! Each serving thread runs its own single-threaded runtime, so the pool is a
//! thread-local with no lock. A connection returns to the pool when the
//! response body's last frame has been read, not when the server polls the
//! body once more (it may never do so).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::error::Error as StdError;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;

use crate::error::Refusal;
use crate::timer;
use crate::tls::UpstreamTls;
use crate::worker::LogThrottle;

/// Boxed error of a body.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// One target of an upstream.
#[derive(Debug)]
pub struct Target {
    /// Index of this target across the node, for the thread-local pools.
    pub id: usize,
    pub addr: SocketAddr,
}

/// An upstream: its targets and timeouts.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub connect_timeout: Duration,
    pub response_timeout: Duration,
    pub max_idle: usize,
    /// TLS to the targets; `None` for plain HTTP.
    pub tls: Option<UpstreamTls>,
    next: AtomicUsize,
    /// Limits log lines about failed upstream calls.
    failures: LogThrottle,
}

impl Upstream {
    /// Creates an upstream whose targets get ids from `first_id` on.
    pub fn new(
        name: String,
        addrs: &[SocketAddr],
        first_id: usize,
        connect_timeout: Duration,
        response_timeout: Duration,
        max_idle: usize,
        tls: Option<UpstreamTls>,
    ) -> Upstream {
        let targets = addrs
            .iter()
            .enumerate()
            .map(|(offset, &addr)| Target {
                id: first_id + offset,
                addr,
            })
            .collect();
        Upstream {
            name,
            targets,
            connect_timeout,
            response_timeout,
            max_idle,
            tls,
            next: AtomicUsize::new(0),
            failures: LogThrottle::default(),
        }
    }

    /// Picks the next target in turn.
    fn pick(&self) -> &Target {
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        &self.targets[turn % self.targets.len()]
    }

    /// Sends a request to one of the targets and returns its response
    /// head; the body streams on as it arrives.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, Refusal> {
        let target = self.pick();
        // The coarse timer: a tokio timer per request costs about a
        // thousand instructions more, and this timeout needs no precision.
        let sent = timer::timeout(self.response_timeout, self.send_to(target, request)).await;
        match sent {
            Ok(result) => result,
            Err(_) => {
                self.log_failure(target, None, "upstream timed out");
                Err(Refusal::UpstreamTimeout {
                    upstream: self.name.clone(),
                })
            }
        }
    }

    async fn send_to(
        &self,
        target: &Target,
        mut request: Request<RequestBody>,
    ) -> Result<Response<PooledBody>, Refusal> {
        // A pooled connection may have been closed by the target while idle.
        // hyper then returns the unsent request, which goes out on the next
        // pooled connection or a new one.
        while let Some(mut sender) = take_idle(target.id).await {
            match sender.try_send_request(request).await {
                Ok(response) => return Ok(self.pooled(target, sender, response)),
                Err(mut error) => match error.take_message() {
                    Some(unsent) => request = unsent,
                    None => return Err(self.failure(target, error.into_error())),
                },
            }
        }
        let mut sender = self.connect(target).await?;
        match sender.send_request(request).await {
            Ok(response) => Ok(self.pooled(target, sender, response)),
            Err(error) => Err(self.failure(target, error)),
        }
    }

    async fn connect(&self, target: &Target) -> Result<http1::SendRequest<RequestBody>, Refusal> {
        // With TLS, the connect timeout covers the handshake too.
        let connecting = tokio::time::timeout(self.connect_timeout, async {
            let stream = TcpStream::connect(target.addr).await?;
            let _ = stream.set_nodelay(true);
            match &self.tls {
                None => Ok(Connected::Plain(stream)),
                Some(tls) => {
                    let name = match &tls.server_name {
                        Some(name) => name.clone(),
                        None => ServerName::IpAddress(target.addr.ip().into()),
                    };
                    let stream = tls.connector.connect(name, stream).await?;
                    Ok(Connected::Tls(Box::new(stream)))
                }
            }
        });
        let connected = match connecting.await {
            Ok(Ok(connected)) => connected,
            Ok(Err(error)) => {
                let error: std::io::Error = error;
                self.log_failure(target, Some(&error), "connect failed");
                return Err(Refusal::UpstreamUnavailable {
                    upstream: self.name.clone(),
                });
            }
            Err(_) => {
                self.log_failure(target, None, "connect timed out");
                return Err(Refusal::UpstreamTimeout {
                    upstream: self.name.clone(),
                });
            }
        };
        let handshake = match connected {
            Connected::Plain(stream) => handshake(TokioIo::new(stream)).await,
            Connected::Tls(stream) => handshake(TokioIo::new(stream)).await,
        };
        handshake.map_err(|error| self.failure(target, error))
    }

    fn pooled(
        &self,
        target: &Target,
        sender: http1::SendRequest<RequestBody>,
        response: Response<Incoming>,
    ) -> Response<PooledBody> {
        response.map(|body| PooledBody::new(body, sender, target.id, self.max_idle))
    }

    fn failure(&self, target: &Target, error: hyper::Error) -> Refusal {
        if let Some(too_large) = find_cause::<BodyTooLarge>(&error) {
            return Refusal::BodyTooLarge {
                limit: too_large.limit,
            };
        }
        if find_cause::<ClientBodyError>(&error).is_some() {
            tracing::debug!(upstream = %self.name, %error, "client request body failed");
            return Refusal::InvalidBody;
        }
        self.log_failure(target, Some(&error), "upstream request failed");
        Refusal::UpstreamUnavailable {
            upstream: self.name.clone(),
        }
    }
}

impl Upstream {
    /// Logs a failed call at info level, at most ten lines a second per
    /// upstream, with the number of lines suppressed before this one.
    fn log_failure(&self, target: &Target, error: Option<&dyn std::fmt::Display>, message: &str) {
        if let Some(suppressed) = self.failures.admit() {
            match error {
                Some(error) => tracing::info!(
                    upstream = %self.name,
                    target = %target.addr,
                    %error,
                    suppressed,
                    "{message}"
                ),
                None => tracing::info!(
                    upstream = %self.name,
                    target = %target.addr,
                    suppressed,
                    "{message}"
                ),
            }
        }
    }
}

/// A new connection to a target, before the HTTP handshake.
enum Connected {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Starts HTTP/1.1 on a new connection and spawns the task that drives it.
async fn handshake<T>(io: T) -> Result<http1::SendRequest<RequestBody>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new().writev(false).handshake(io).await?;
    tokio::spawn(async move {
        if let Err(error) = connection.await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
    });
    Ok(sender)
}

/// Returns the first error of type `E` in the chain of causes of `error`.
fn find_cause<E: StdError + 'static>(error: &hyper::Error) -> Option<&E> {
    let mut cause = error.source();
    while let Some(inner) = cause {
        if let Some(found) = inner.downcast_ref::<E>() {
            return Some(found);
        }
        cause = inner.source();
    }
    None
}

thread_local! {
    /// Idle connections of this thread, indexed by target id.
    static IDLE: RefCell<Vec<VecDeque<http1::SendRequest<RequestBody>>>> =
        const { RefCell::new(Vec::new()) };
}

/// Takes the longest-idle connection to a target that is still open, waiting
/// for it to finish its previous exchange if needed. The most recently
/// returned connection is often still finishing its last response, and
/// waiting for it costs a task wake-up: first-in first-out measured about
/// 0.9 µs per request less than last-in first-out (BENCHMARKS.md).
async fn take_idle(target: usize) -> Option<http1::SendRequest<RequestBody>> {
    loop {
        let mut sender = IDLE.with_borrow_mut(|idle| idle.get_mut(target)?.pop_front())?;
        if sender.is_closed() {
            continue;
        }
        if sender.is_ready() || sender.ready().await.is_ok() {
            return Some(sender);
        }
    }
}

fn put_idle(target: usize, sender: http1::SendRequest<RequestBody>, max_idle: usize) {
    if sender.is_closed() {
        return;
    }
    IDLE.with_borrow_mut(|idle| {
        if idle.len() <= target {
            idle.resize_with(target + 1, VecDeque::new);
        }
        let list = &mut idle[target];
        if list.len() < max_idle {
            list.push_back(sender);
        }
    });
}

/// A response body from an upstream that returns its connection to the pool
/// once the last frame has been read.
pub struct PooledBody {
    inner: Incoming,
    /// The connection, until it goes back to the pool.
    sender: Option<http1::SendRequest<RequestBody>>,
    target: usize,
    max_idle: usize,
}

impl PooledBody {
    fn new(
        inner: Incoming,
        sender: http1::SendRequest<RequestBody>,
        target: usize,
        max_idle: usize,
    ) -> PooledBody {
        let mut body = PooledBody {
            inner,
            sender: Some(sender),
            target,
            max_idle,
        };
        body.release_if_done();
        body
    }

    fn release_if_done(&mut self) {
        if self.inner.is_end_stream() {
            if let Some(sender) = self.sender.take() {
                put_idle(self.target, sender, self.max_idle);
            }
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        match &polled {
            Poll::Ready(None) => this.release_if_done(),
            Poll::Ready(Some(Ok(_))) => this.release_if_done(),
            // A broken body: the connection is not reusable.
            Poll::Ready(Some(Err(_))) => this.sender = None,
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

/// The body sent to the client: the upstream's, or one the node made.
pub enum ResponseBody {
    Upstream(PooledBody),
    Full(Full<Bytes>),
}

impl ResponseBody {
    /// Creates a body with these bytes.
    pub fn full(bytes: impl Into<Bytes>) -> ResponseBody {
        ResponseBody::Full(Full::new(bytes.into()))
    }
}

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.get_mut() {
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx).map_err(Into::into),
            ResponseBody::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Full(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Full(body) => body.size_hint(),
        }
    }
}

/// The error a request body yields once it crosses the route's limit; it
/// aborts the upstream request.
#[derive(Debug, thiserror::Error)]
#[error("request body exceeds the limit of {limit} bytes")]
pub struct BodyTooLarge {
    pub limit: u64,
}

/// The error a request body yields when the client's body itself failed:
/// invalid chunked framing, or the client went away mid-body.
#[derive(Debug, thiserror::Error)]
#[error("client request body failed: {0}")]
pub struct ClientBodyError(#[source] hyper::Error);

/// A client's request body on its way upstream, cut off with an error at the
/// route's size limit.
pub struct RequestBody {
    inner: Incoming,
    limit: u64,
    seen: u64,
}

impl RequestBody {
    /// Wraps a client body with the route's limit in bytes.
    pub fn new(inner: Incoming, limit: u64) -> RequestBody {
        RequestBody {
            inner,
            limit,
            seen: 0,
        }
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        let frame = match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => frame,
            Poll::Ready(Some(Err(error))) => {
                return Poll::Ready(Some(Err(Box::new(ClientBodyError(error)))));
            }
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => return Poll::Pending,
        };
        if let Some(data) = frame.data_ref() {
            this.seen += data.len() as u64;
            if this.seen > this.limit {
                return Poll::Ready(Some(Err(Box::new(BodyTooLarge { limit: this.limit }))));
            }
        }
        Poll::Ready(Some(Ok(frame)))
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}
