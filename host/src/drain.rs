//! The drain of a serving thread: when the node stops, each open connection
//! finishes its requests in flight and closes, and the thread waits until
//! they have.
//!
//! hyper-util's `GracefulShutdown` does the same with a watch channel. Each
//! connection polls the channel's `changed` future whenever it is polled
//! itself, several times a request, and each of those polls takes the
//! channel's lock. Here a connection registers its task's waker once and
//! then reads a flag.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, Waker};

use hyper::body::{Body, Incoming};
use hyper::rt::{Read, Write};
use hyper::service::HttpService;
use hyper_util::server::conn::auto;
use slab::Slab;
use tokio::sync::Notify;

use crate::idle::Activity;

/// The drain signal of one serving thread and the count of its open
/// connections. Clones share them.
#[derive(Debug, Clone, Default)]
pub struct Drain {
    shared: Arc<Shared>,
}

#[derive(Debug, Default)]
struct Shared {
    draining: AtomicBool,
    /// The wakers of the connections' tasks, to wake when the drain starts.
    wakers: Mutex<Slab<Waker>>,
    open: AtomicUsize,
    /// Woken when the last open connection closes.
    closed: Notify,
}

impl Drain {
    /// Wraps a connection so that it shuts down gracefully once the drain
    /// starts. It counts as open until it is dropped.
    pub fn watch<C: GracefulShutdown>(&self, connection: C) -> Watched<C> {
        self.watch_cancels(connection, None)
    }

    /// Works as [`Drain::watch`] does, and also shuts the connection down
    /// gracefully once its client cancelled too many upstream calls (see
    /// [`crate::idle::CANCELLED_MIN_REQUESTS`]).
    pub fn watch_cancels<C: GracefulShutdown>(
        &self,
        connection: C,
        activity: Option<Arc<Activity>>,
    ) -> Watched<C> {
        self.shared.open.fetch_add(1, Ordering::SeqCst);
        Watched {
            connection,
            shared: self.shared.clone(),
            registered: None,
            shut_down: false,
            activity,
        }
    }

    /// Counts work that outlives its connection's HTTP, such as a WebSocket
    /// tunnel, as open until the returned guard drops. The drain waits for
    /// it as for a connection, up to the drain timeout, but does not tell it
    /// to stop.
    pub fn hold(&self) -> DrainGuard {
        self.shared.open.fetch_add(1, Ordering::SeqCst);
        DrainGuard {
            shared: self.shared.clone(),
        }
    }

    /// Starts the drain, and returns when every watched connection has been
    /// dropped.
    pub async fn shutdown(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
        // Cloned rather than taken, so that each entry stays until its
        // connection drops it and no key is handed out twice.
        let wakers: Vec<Waker> = self
            .shared
            .lock_wakers()
            .iter()
            .map(|(_, waker)| waker.clone())
            .collect();
        for waker in wakers {
            waker.wake();
        }
        loop {
            let closed = self.shared.closed.notified();
            tokio::pin!(closed);
            // Registered before the count is read, so that a connection
            // closing in between still wakes this future.
            closed.as_mut().enable();
            if self.shared.open.load(Ordering::SeqCst) == 0 {
                return;
            }
            closed.await;
        }
    }
}

/// Work that the drain waits for until it drops; see [`Drain::hold`].
pub struct DrainGuard {
    shared: Arc<Shared>,
}

impl Drop for DrainGuard {
    fn drop(&mut self) {
        self.shared.close_one();
    }
}

impl Shared {
    /// Counts one connection or held piece of work as closed, and wakes the
    /// drain when it was the last.
    fn close_one(&self) {
        if self.open.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.closed.notify_waiters();
        }
    }

    fn lock_wakers(&self) -> std::sync::MutexGuard<'_, Slab<Waker>> {
        self.wakers.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

pin_project_lite::pin_project! {
    /// A connection that shuts down gracefully when its thread drains.
    pub struct Watched<C> {
        #[pin]
        connection: C,
        shared: Arc<Shared>,
        // The connection's entry among the wakers, and a clone of that
        // waker to tell whether a later poll comes with another.
        registered: Option<(usize, Waker)>,
        shut_down: bool,
        // The connection's requests, when it watches their cancels.
        activity: Option<Arc<Activity>>,
    }

    impl<C> PinnedDrop for Watched<C> {
        fn drop(this: Pin<&mut Self>) {
            let this = this.project();
            if let Some((key, _)) = this.registered.take() {
                this.shared.lock_wakers().try_remove(key);
            }
            this.shared.close_one();
        }
    }
}

impl<C: GracefulShutdown> Future for Watched<C> {
    type Output = C::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let mut this = self.project();
        if let (false, Some(activity)) = (*this.shut_down, this.activity.as_ref()) {
            if activity.cancels_too_many(cx.waker()) {
                let (calls, cancels) = activity.upstream_counts();
                tracing::warn!(
                    calls,
                    cancels,
                    "shutting down a client connection that cancelled half of its upstream \
                     calls or more; its requests in flight finish"
                );
                *this.shut_down = true;
                this.connection.as_mut().graceful_shutdown();
            }
        }
        if !*this.shut_down {
            if this.shared.draining.load(Ordering::SeqCst) {
                *this.shut_down = true;
                this.connection.as_mut().graceful_shutdown();
            } else {
                register(this.shared, this.registered, cx.waker());
                // The drain may have started while the waker was being
                // registered, after the wakers were read.
                if this.shared.draining.load(Ordering::SeqCst) {
                    *this.shut_down = true;
                    this.connection.as_mut().graceful_shutdown();
                }
            }
        }
        this.connection.poll(cx)
    }
}

/// A server connection that can finish its request in flight and close.
/// hyper-util's `GracefulConnection` is sealed and leaves out hyper's
/// HTTP/1 connection with upgrades, which WebSocket routes need.
pub trait GracefulShutdown: Future {
    /// Starts the graceful shutdown; the connection must still be polled.
    fn graceful_shutdown(self: Pin<&mut Self>);
}

type BoxError = Box<dyn std::error::Error + Send + Sync>;

impl<I, S, B> GracefulShutdown for hyper::server::conn::http1::Connection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: Read + Write + Unpin + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::Connection::graceful_shutdown(self);
    }
}

impl<I, S, B> GracefulShutdown for hyper::server::conn::http1::UpgradeableConnection<I, S>
where
    S: HttpService<Incoming, ResBody = B>,
    S::Error: Into<BoxError>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        hyper::server::conn::http1::UpgradeableConnection::graceful_shutdown(self);
    }
}

impl<I, S, E, B> GracefulShutdown for auto::UpgradeableConnection<'_, I, S, E>
where
    S: hyper::service::Service<http::Request<Incoming>, Response = http::Response<B>>,
    S::Future: 'static,
    S::Error: Into<BoxError>,
    I: Read + Write + Unpin + Send + 'static,
    B: Body + 'static,
    B::Error: Into<BoxError>,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, B>,
{
    fn graceful_shutdown(self: Pin<&mut Self>) {
        auto::UpgradeableConnection::graceful_shutdown(self);
    }
}

/// Keeps `waker` among the wakers of the drain, replacing the connection's
/// earlier one only when it would not wake the same task.
fn register(shared: &Shared, registered: &mut Option<(usize, Waker)>, waker: &Waker) {
    match registered {
        Some((_, known)) if known.will_wake(waker) => {}
        Some((key, known)) => {
            *known = waker.clone();
            if let Some(entry) = shared.lock_wakers().get_mut(*key) {
                *entry = waker.clone();
            }
        }
        None => {
            let key = shared.lock_wakers().insert(waker.clone());
            *registered = Some((key, waker.clone()));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::time::Duration;

    use http_body_util::Empty;
    use hyper::server::conn::http1;
    use hyper::service::service_fn;
    use hyper_util::rt::TokioIo;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A drained HTTP/1 connection sends the response to the request in
    /// flight with `Connection: close`, then closes, and the drain returns.
    #[tokio::test]
    async fn drain_finishes_the_request_in_flight() {
        let drain = Arc::new(Drain::default());
        let (mut client, server) = tokio::io::duplex(4096);
        let (release, released) = tokio::sync::oneshot::channel::<()>();
        let released = Arc::new(tokio::sync::Mutex::new(Some(released)));
        let service = service_fn(move |_request| {
            let released = released.clone();
            async move {
                if let Some(released) = released.lock().await.take() {
                    let _ = released.await;
                }
                Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
            }
        });
        let watched =
            drain.watch(http1::Builder::new().serve_connection(TokioIo::new(server), service));
        let served = tokio::spawn(watched);

        client
            .write_all(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
            .await
            .expect("the request is written");
        // Let the connection read the request and wait in the service.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let draining = {
            let drain = drain.clone();
            tokio::spawn(async move { drain.shutdown().await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!draining.is_finished(), "the drain waits for the request");
        release.send(()).expect("the service waits");

        let mut response = Vec::new();
        client
            .read_to_end(&mut response)
            .await
            .expect("the response is read");
        let response = String::from_utf8_lossy(&response).to_ascii_lowercase();
        assert!(response.starts_with("http/1.1 200"), "{response}");
        assert!(response.contains("connection: close"), "{response}");
        served.await.expect("no panic").expect("no error");
        tokio::time::timeout(Duration::from_secs(5), draining)
            .await
            .expect("the drain ends")
            .expect("no panic");
    }

    /// With no connection open, the drain returns at once. A connection
    /// that starts after the drain shuts down at its first poll.
    #[tokio::test]
    async fn drain_without_connections_returns() {
        let drain = Drain::default();
        tokio::time::timeout(Duration::from_secs(5), drain.shutdown())
            .await
            .expect("nothing to wait for");
        let (_client, server) = tokio::io::duplex(64);
        let service = service_fn(|_request| async {
            Ok::<_, std::convert::Infallible>(http::Response::new(Empty::<bytes::Bytes>::new()))
        });
        let watched =
            drain.watch(http1::Builder::new().serve_connection(TokioIo::new(server), service));
        tokio::time::timeout(Duration::from_secs(5), watched)
            .await
            .expect("an idle connection closes when drained")
            .expect("no error");
    }
}
