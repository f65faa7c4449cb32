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
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// The requests of one connection: the number in flight, a count of every
/// start and end, which shows whether anything happened in a period, and
/// the requests the client cancelled before their response.
#[derive(Debug, Default)]
pub struct Activity {
    in_flight: AtomicUsize,
    events: AtomicU64,
    ended: AtomicU64,
    cancelled: AtomicU64,
}

/// A connection on which at least this many requests ended is closed when
/// half of them or more were cancelled by the client before their response.
/// Each such request may have reached the upstream, which keeps working on
/// it after the node closes its upstream connection. Without this, a client
/// that resets HTTP/2 streams right after sending them could put unbounded
/// work on upstreams over one connection. That is the HTTP/2 "rapid reset"
/// attack with a delay, which h2's own count of early resets does not see.
pub const CANCELLED_MIN_REQUESTS: u64 = 100;

impl Activity {
    /// Counts a request as in flight until the returned guard is dropped.
    pub fn start(self: &Arc<Activity>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        self.events.fetch_add(1, Ordering::Relaxed);
        InFlight {
            activity: self.clone(),
            answered: false,
        }
    }

    /// Whether the client cancelled so many requests that the connection
    /// should close: see [`CANCELLED_MIN_REQUESTS`].
    fn cancels_too_many(&self) -> bool {
        let ended = self.ended.load(Ordering::Relaxed);
        ended >= CANCELLED_MIN_REQUESTS && self.cancelled.load(Ordering::Relaxed) * 2 >= ended
    }
}

/// A request in flight on its connection.
pub struct InFlight {
    activity: Arc<Activity>,
    /// Whether the response head was ready. A request dropped before then
    /// was cancelled by its client.
    answered: bool,
}

impl InFlight {
    /// Notes that the request's response head is ready.
    pub fn answered(&mut self) {
        self.answered = true;
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.activity;
        activity.in_flight.fetch_sub(1, Ordering::Relaxed);
        activity.events.fetch_add(1, Ordering::Relaxed);
        activity.ended.fetch_add(1, Ordering::Relaxed);
        if !self.answered {
            activity.cancelled.fetch_add(1, Ordering::Relaxed);
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

    /// Returns true once the connection has been idle for a whole period,
    /// or its client cancelled too many requests. Otherwise it sets the
    /// timer for the next period, which wakes the connection's task to check
    /// again.
    fn idle_expired(&mut self, cx: &mut Context<'_>) -> bool {
        if self.closed {
            return true;
        }
        if self.activity.cancels_too_many() {
            tracing::warn!(
                cancelled = self.activity.cancelled.load(Ordering::Relaxed),
                ended = self.activity.ended.load(Ordering::Relaxed),
                "closing a client connection that cancelled half of its requests or more \
                 before their response"
            );
            self.closed = true;
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
