//! Closes a client connection served by hyper's automatic HTTP/1 and HTTP/2
//! detection once it has had no request in flight for a whole timeout.
//!
//! hyper's HTTP/2 server has no timer for a client that sends half a
//! preface, a preface and nothing more, a header block it never finishes, or
//! no new request on an idle connection. Such connections would stay open
//! for ever and could use up the node's file descriptors. The HTTP/1
//! server's header timeout covers the same cases on HTTP/1 connections.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use futures_util::task::AtomicWaker;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The requests of one connection: the number in flight, a count of every
/// start and end, which shows whether anything happened in a period, and
/// the upstream calls that its client cancelled.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    events: AtomicU64,
    upstream_calls: AtomicU64,
    upstream_cancels: AtomicU64,
    /// The connection's task, woken when it should shut down.
    connection_task: AtomicWaker,
}

/// A connection whose client cancelled at least this many requests while
/// their upstream calls were in flight, half of its upstream calls or more,
/// is shut down gracefully: no new requests, and those in flight finish.
/// The upstream keeps working on each cancelled request after the node
/// closes its upstream connection. Without the limit, a client that resets
/// HTTP/2 streams right after sending them could put unbounded work on
/// upstreams over one connection. That is the HTTP/2 "rapid reset" attack
/// with a delay, which h2's own count of early resets does not see.
/// Requests that never reach an upstream do not count either way, so they
/// cannot dilute the share.
pub const CANCELLED_MIN_REQUESTS: u64 = 100;

impl Activity {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Activity>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        InFlight(self.clone())
    }

    /// Counts an upstream call. The returned guard counts it as cancelled
    /// unless [`UpstreamCall::finish`] is called before it is dropped.
    pub fn upstream_call(&self) -> UpstreamCall<'_> {
        self.upstream_calls.fetch_add(1, Ordering::Relaxed);
        UpstreamCall {
            activity: self,
            finished: false,
        }
    }

    /// Whether the client cancelled so many upstream calls that the
    /// connection should shut down: see [`CANCELLED_MIN_REQUESTS`]. Keeps
    /// `waker` to wake when that becomes true.
    pub fn cancels_too_many(&self, waker: &Waker) -> bool {
        self.connection_task.register(waker);
        self.cancelled_too_many()
    }

    fn cancelled_too_many(&self) -> bool {
        let cancels = self.upstream_cancels.load(Ordering::Relaxed);
        cancels >= CANCELLED_MIN_REQUESTS
            && cancels * 2 >= self.upstream_calls.load(Ordering::Relaxed)
    }

    /// Returns the upstream calls made and cancelled, for the log.
    pub fn upstream_counts(&self) -> (u64, u64) {
        (
            self.upstream_calls.load(Ordering::Relaxed),
            self.upstream_cancels.load(Ordering::Relaxed),
        )
    }
}

/// A request in flight on its connection.
pub struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
        self.0.events.fetch_add(1, Ordering::Relaxed);
    }
}

/// An upstream call in flight, counted as cancelled if dropped unfinished.
pub struct UpstreamCall<'a> {
    activity: &'a Activity,
    finished: bool,
}

impl UpstreamCall<'_> {
    /// Notes that the call returned, with a response or an error.
    pub fn finish(mut self) {
        self.finished = true;
    }
}

impl Drop for UpstreamCall<'_> {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        self.activity
            .upstream_cancels
            .fetch_add(1, Ordering::Relaxed);
        if self.activity.cancelled_too_many() {
            self.activity.connection_task.wake();
        }
    }
}

/// A response body that keeps its request in flight until it ends or is
/// dropped, so a long download never counts as idle.
pub struct TrackedBody<B> {
    inner: B,
    in_flight: Option<InFlight>,
}

impl<B> TrackedBody<B> {
    pub fn new(inner: B, in_flight: InFlight) -> TrackedBody<B> {
        TrackedBody {
            inner,
            in_flight: Some(in_flight),
        }
    }
}

impl<B: Body<Data = Bytes> + Unpin> Body for TrackedBody<B> {
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        let this = self.get_mut();
        let frame = ready!(Pin::new(&mut this.inner).poll_frame(cx));
        if frame.is_none() {
            this.in_flight = None;
        }
        Poll::Ready(frame)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// A client connection's stream that reads as closed once its connection
/// had no request in flight and no request start or end for a whole
/// timeout, whatever bytes arrived. A connection is closed between one and
/// two timeouts after it went idle.
///
/// NOTE: a response that the client never reads (an HTTP/2 stream window
/// of zero) stays in flight, so it keeps its connection open until the
/// client goes away.
pub struct IdleClose<T> {
    inner: T,
    activity: Arc<Activity>,
    timeout: Duration,
    timer: Pin<Box<Sleep>>,
    /// The activity's event count when the timer was last set.
    events_then: u64,
    closed: bool,
}

impl<T> IdleClose<T> {
    pub fn new(inner: T, activity: Arc<Activity>, timeout: Duration) -> IdleClose<T> {
        IdleClose {
            inner,
            activity,
            timeout,
            timer: Box::pin(tokio::time::sleep(timeout)),
            events_then: 0,
            closed: false,
        }
    }

    /// Returns true once the connection has been idle for a whole period.
    /// Otherwise it sets the timer for the next period, which wakes the
    /// connection's task to check again.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return true;
        }
        while self.timer.as_mut().poll(cx).is_ready() {
            let events = self.activity.events.load(Ordering::Relaxed);
            let in_flight = self.activity.in_flight.load(Ordering::Relaxed);
            if in_flight == 0 && events == self.events_then {
                tracing::debug!(
                    "closing a client connection with no request for its header timeout"
                );
                self.closed = true;
                return true;
            }
            self.events_then = events;
            self.timer.as_mut().reset(Instant::now() + self.timeout);
        }
        false
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for IdleClose<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        // Checked before each read, so that bytes which never make a
        // request, such as a header block trickled without end, do not
        // keep the connection open either.
        if this.idle_expired(cx) {
            // End of stream: hyper closes the connection.
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for IdleClose<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
