//! Listeners and serving threads.
//!
//! One acceptor thread takes connections from every listener and hands them
//! in turn to the serving threads. Each serving thread runs a single-threaded
//! tokio runtime, so a request stays on one core from accept to response and
//! the upstream connection pool needs no lock. Connections speak HTTP/1.1 or
//! HTTP/2, detected from the first bytes: over TLS the client picks one with
//! ALPN, over plain TCP it sends HTTP/2 with prior knowledge.

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::Context as _;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, watch};

use crate::config::ListenerConfig;
use crate::drain::Drain;
use crate::idle::{Activity, IdleClose, TrackedBody};
use crate::node::Node;
use crate::pipeline::{self, Connection};
use crate::send_timeout::SendTimeout;
use crate::timer::{self, CoarseTimer};
use crate::worker::LogThrottle;

/// A connection on its way from the acceptor to a serving thread.
///
/// The stream travels as a std socket, deregistered from the acceptor's
/// reactor. A tokio `TcpStream` stays bound to the reactor that created it,
/// so otherwise every readiness event of the connection would wake the
/// acceptor thread first and reach the serving thread by a cross-thread
/// wake-up.
struct Accepted {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    /// Index of the listener that accepted it.
    listener: usize,
}

/// A running node: its bound addresses and the threads serving them.
pub struct Server {
    /// The bound address of each listener, in config order.
    pub addrs: Vec<SocketAddr>,
    shutdown: watch::Sender<bool>,
    /// Ends the drain at once.
    stop_now: Arc<watch::Sender<bool>>,
    threads: Vec<JoinHandle<()>>,
}

/// A handle that ends a node's drain at once, from another thread.
#[derive(Clone)]
pub struct Stopper(Arc<watch::Sender<bool>>);

impl Stopper {
    /// Closes the connections still open in the drain. Their requests in
    /// flight are dropped, and each writes its access-log line.
    pub fn stop_now(&self) {
        let _ = self.0.send(true);
    }
}

impl Server {
    /// Binds every listener and starts the acceptor and `threads` serving
    /// threads.
    pub fn start(
        node: Arc<Node>,
        listeners: &[ListenerConfig],
        threads: usize,
        drain_timeout: Duration,
    ) -> anyhow::Result<Server> {
        let mut bound = Vec::new();
        let mut addrs = Vec::new();
        for listener in listeners {
            let addr = *listener.addr.get_ref();
            let socket = bind(addr).map_err(|error| {
                let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
                    "; another process listens there (a node still running?) or a connection \
                     still uses that port: stop it, or change listeners[].addr"
                } else {
                    ""
                };
                anyhow::anyhow!("cannot listen on {addr}: {error}{hint}")
            })?;
            addrs.push(socket.local_addr()?);
            bound.push(socket);
        }
        set_redirect_ports(&node, &addrs);
        let (shutdown, shutdown_rx) = watch::channel(false);
        let (stop_now, stop_now_rx) = watch::channel(false);

        let mut senders = Vec::new();
        let mut handles = Vec::new();
        for index in 0..threads {
            let (sender, receiver) = mpsc::unbounded_channel();
            senders.push(sender);
            let node = node.clone();
            let stops = Stops {
                shutdown: shutdown_rx.clone(),
                stop_now: stop_now_rx.clone(),
            };
            let timeouts: Vec<(Duration, Duration)> = listeners
                .iter()
                .map(|l| (l.header_timeout, l.send_timeout))
                .collect();
            let handle = std::thread::Builder::new()
                .name(format!("edge-serve-{index}"))
                .spawn(move || serve_thread(node, receiver, stops, timeouts, drain_timeout))
                .context("cannot start a serving thread")?;
            handles.push(handle);
        }

        let reloading: Vec<_> = node
            .listeners
            .iter()
            .enumerate()
            .filter_map(|(index, listener)| Some((index, listener.tls.clone()?)))
            .collect();
        let access_log = node.access_log.clone();
        let reopen = move || {
            if let Some(log) = &access_log {
                log.reopen();
            }
        };
        let reloader = crate::tls::spawn_reloader(reloading, reopen, shutdown_rx.clone())
            .context("cannot start the reload thread")?;
        handles.push(reloader);

        let acceptor_shutdown = shutdown_rx.clone();
        let acceptor = std::thread::Builder::new()
            .name("edge-accept".to_owned())
            .spawn(move || accept_thread(bound, senders, acceptor_shutdown))
            .context("cannot start the acceptor thread")?;
        handles.push(acceptor);
        Ok(Server {
            addrs,
            shutdown,
            stop_now: Arc::new(stop_now),
            threads: handles,
        })
    }

    /// Returns a handle that ends the drain at once.
    pub fn stopper(&self) -> Stopper {
        Stopper(self.stop_now.clone())
    }

    /// Stops accepting, lets open connections finish within the drain
    /// timeout, and waits for every thread to end.
    pub fn shutdown(self) {
        let _ = self.shutdown.send(true);
        for thread in self.threads {
            let _ = thread.join();
        }
    }
}

/// Gives each HTTP-to-HTTPS redirect without a configured port the bound
/// port of the first TLS listener.
fn set_redirect_ports(node: &Node, addrs: &[SocketAddr]) {
    let tls_port = node
        .listeners
        .iter()
        .zip(addrs)
        .find(|(listener, _)| listener.tls.is_some())
        .map(|(_, addr)| addr.port());
    for redirect in node.listeners.iter().filter_map(|l| l.redirect.as_ref()) {
        if let Some(port) = tls_port {
            let _ = redirect.port.set(port);
        }
    }
}

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

/// Starts a thread named `name` that runs the future `task` makes on a
/// single-threaded runtime of its own.
pub fn spawn_runtime_thread<F, T>(name: &str, task: F) -> std::io::Result<JoinHandle<()>>
where
    F: FnOnce() -> T + Send + 'static,
    T: std::future::Future<Output = ()>,
{
    std::thread::Builder::new()
        .name(name.to_owned())
        .spawn(move || runtime().block_on(task()))
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime")
}

/// Waits a little after a failed `accept`, such as when the process is out
/// of file descriptors, instead of spinning, and logs at most
/// [`LogThrottle::PER_SECOND`] lines a second.
pub(crate) async fn back_off_after_accept_error(error: &std::io::Error, log: &LogThrottle) {
    if let Some(suppressed) = log.admit() {
        tracing::warn!(%error, suppressed, "accept failed");
    }
    tokio::time::sleep(Duration::from_millis(50)).await;
}

fn accept_thread(
    listeners: Vec<std::net::TcpListener>,
    senders: Vec<mpsc::UnboundedSender<Accepted>>,
    mut shutdown: watch::Receiver<bool>,
) {
    runtime().block_on(async move {
        let senders = Arc::new(senders);
        let mut tasks = tokio::task::JoinSet::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let listener = match TcpListener::from_std(listener) {
                Ok(listener) => listener,
                Err(error) => {
                    tracing::error!(%error, "cannot register a listener");
                    continue;
                }
            };
            let senders = senders.clone();
            tasks.spawn(async move {
                let mut turn = index;
                let accept_errors = LogThrottle::default();
                loop {
                    match listener.accept().await {
                        Ok((stream, peer)) => {
                            let _ = stream.set_nodelay(true);
                            // Stays non-blocking, as `TcpStream::from_std`
                            // on the serving thread requires.
                            let stream = match stream.into_std() {
                                Ok(stream) => stream,
                                Err(error) => {
                                    tracing::warn!(
                                        %error,
                                        %peer,
                                        "failed to deregister an accepted connection; closing it"
                                    );
                                    continue;
                                }
                            };
                            let accepted = Accepted {
                                stream,
                                peer,
                                listener: index,
                            };
                            let _ = senders[turn % senders.len()].send(accepted);
                            turn = turn.wrapping_add(1);
                        }
                        Err(error) => back_off_after_accept_error(&error, &accept_errors).await,
                    }
                }
            });
        }
        let _ = shutdown.wait_for(|stop| *stop).await;
        tasks.abort_all();
    });
}

/// The signals a serving thread watches: the start of the drain, and its
/// end before the drain timeout.
struct Stops {
    shutdown: watch::Receiver<bool>,
    stop_now: watch::Receiver<bool>,
}

fn serve_thread(
    node: Arc<Node>,
    mut connections: mpsc::UnboundedReceiver<Accepted>,
    stops: Stops,
    listener_timeouts: Vec<(Duration, Duration)>,
    drain_timeout: Duration,
) {
    let Stops {
        mut shutdown,
        mut stop_now,
    } = stops;
    runtime().block_on(async move {
        let builders: Vec<Arc<Builders>> = listener_timeouts
            .iter()
            .map(|&(header, send)| Arc::new(Builders::new(header, send)))
            .collect();
        let timeouts = listener_timeouts
            .iter()
            .map(|(header, _)| header)
            .chain(
                node.upstreams
                    .iter()
                    .map(|upstream| &upstream.settings.response_timeout),
            )
            .chain(
                node.routes
                    .iter()
                    .filter_map(|route| route.timeout.as_ref()),
            )
            .chain(
                node.upstreams
                    .iter()
                    .filter_map(|upstream| upstream.settings.idle_timeout.as_ref()),
            );
        tokio::spawn(timer::sweep(sweep_granularity(timeouts)));
        tokio::spawn(crate::proxy::close_idle_connections());
        let drain = Drain::default();
        loop {
            tokio::select! {
                accepted = connections.recv() => {
                    let Some(Accepted { stream, peer, listener }) = accepted else { break };
                    let connection = Connection::new(&node, peer, listener);
                    let stream = match TcpStream::from_std(stream) {
                        Ok(stream) => stream,
                        Err(error) => {
                            tracing::warn!(
                                %error,
                                %peer,
                                "failed to register a connection with the serving thread; \
                                 closing it"
                            );
                            continue;
                        }
                    };
                    let listener = &node.listeners[connection.listener];
                    let acceptor = listener.tls.as_ref().map(|tls| tls.acceptor());
                    let wants_subject = listener.client_subject_header.is_some();
                    let builders = builders[connection.listener].clone();
                    let node = node.clone();
                    let drain = drain.clone();
                    tokio::spawn(async move {
                        let header_timeout = builders.header_timeout;
                        let peer = connection.peer;
                        let Some(acceptor) = acceptor else {
                            // hyper's header timer starts with the first bytes,
                            // which also tell HTTP/1 from HTTP/2, so a client
                            // that sends nothing would hold its connection
                            // forever.
                            let first_bytes =
                                tokio::time::timeout(header_timeout, peek_preface(&stream));
                            let Ok(first_bytes) = first_bytes.await else {
                                tracing::debug!(%peer, "closing a connection that sent nothing");
                                return;
                            };
                            serve(node, connection, &builders, first_bytes, &drain, stream).await;
                            return;
                        };
                        if tokio::time::timeout(header_timeout, stream.readable()).await.is_err() {
                            tracing::debug!(%peer, "closing a connection that sent nothing");
                            return;
                        }
                        let mut stream = stream;
                        if crate::tls::reject_old_protocol(&mut stream).await {
                            tracing::debug!(
                                %peer,
                                "rejected a client that offers only TLS 1.1 or older"
                            );
                            return;
                        }
                        let mut connection = connection;
                        let accepting = acceptor.accept(stream);
                        let stream = match tokio::time::timeout(header_timeout, accepting).await {
                            Ok(Ok(stream)) => stream,
                            Ok(Err(error)) if crate::tls::is_client_certificate_error(&error) => {
                                // Worth an operator's eye, unlike the scanners
                                // and broken clients of the arm below.
                                if let Some(suppressed) = CERTIFICATE_REJECTIONS.admit() {
                                    tracing::info!(
                                        %peer,
                                        %error,
                                        suppressed,
                                        "rejected a client certificate"
                                    );
                                }
                                return;
                            }
                            Ok(Err(error)) => {
                                tracing::debug!(%peer, %error, "TLS handshake failed");
                                return;
                            }
                            Err(_) => {
                                tracing::debug!(
                                    %peer,
                                    "closing a connection whose TLS handshake timed out"
                                );
                                return;
                            }
                        };
                        connection.secure = true;
                        let session = stream.get_ref().1;
                        if wants_subject {
                            connection.client_subject = session
                                .peer_certificates()
                                .and_then(|chain| chain.first())
                                .and_then(crate::tls::client_subject);
                        }
                        let first_bytes = match session.alpn_protocol() {
                            Some(b"h2") => FirstBytes::MaybeHttp2,
                            _ => FirstBytes::Http1,
                        };
                        serve(node, connection, &builders, first_bytes, &drain, stream).await;
                    });
                }
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
        tokio::select! {
            drained = tokio::time::timeout(drain_timeout, drain.shutdown()) => {
                if drained.is_err() {
                    tracing::warn!(
                        ?drain_timeout,
                        "connections still open after the drain timeout; closing them"
                    );
                }
            }
            // The runtime drops the connections' tasks when this returns.
            _ = stop_now.wait_for(|stop| *stop) => {}
        }
    });
}

/// Limits the log lines about rejected client certificates, which any
/// client can cause with a handshake, across the node's listeners.
static CERTIFICATE_REJECTIONS: LogThrottle = LogThrottle::new();

/// Serves HTTP on an accepted (and, for TLS, handshaken) connection until
/// it closes or the drain ends.
async fn serve<T>(
    node: Arc<Node>,
    mut connection: Connection,
    builders: &Builders,
    first_bytes: FirstBytes,
    drain: &Drain,
    stream: T,
) where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    // TODO: an HTTP/2 stream the client gives no flow-control window waits without limit, as hyper has no per-stream send timer.
    let stream = SendTimeout::new(stream, builders.send_timeout);
    // The requests of a connection that may speak HTTP/2, whose upstream
    // calls the pipeline counts.
    let activity = match first_bytes {
        FirstBytes::Http1 => None,
        FirstBytes::MaybeHttp2 => Some(Arc::new(Activity::default())),
    };
    connection.activity.clone_from(&activity);
    connection.drain = Some(drain.clone());
    // One reference count per request instead of two.
    let context = Arc::new((node, connection));
    let errors_context = context.clone();
    let served: Result<(), Box<dyn std::error::Error + Send + Sync>> = match first_bytes {
        FirstBytes::Http1 => {
            let service = service_fn(move |request| {
                let context = context.clone();
                async move {
                    let (node, connection) = &*context;
                    let response = pipeline::handle(node, connection, request).await;
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            let io = TokioIo::new(stream);
            let connection = builders.http1.serve_connection(io, service);
            drain
                .watch(connection.with_upgrades())
                .await
                .map_err(Into::into)
        }
        FirstBytes::MaybeHttp2 => {
            // HTTP/2 has no header timer in hyper: the connection closes
            // itself after a header timeout without a request in flight.
            let activity = activity.unwrap_or_default();
            let cancels = Some(activity.clone());
            let io = TokioIo::new(IdleClose::new(
                stream,
                activity.clone(),
                builders.header_timeout,
            ));
            let service = service_fn(move |request| {
                let context = context.clone();
                let in_flight = activity.start();
                async move {
                    let (node, connection) = &*context;
                    let response = pipeline::handle(node, connection, request).await;
                    let response = response.map(|body| TrackedBody::new(body, in_flight));
                    Ok::<_, std::convert::Infallible>(response)
                }
            });
            drain
                .watch_cancels(
                    builders.auto.serve_connection_with_upgrades(io, service),
                    cancels,
                )
                .await
        }
    };
    if let Err(error) = served {
        let (node, connection) = &*errors_context;
        note_connection_error(node, connection, &*error);
    }
}

/// Counts and logs a request that hyper rejected before the node saw it,
/// which leaves no access-log line. Other connection errors are logged at
/// debug level only: a client that went away, or a header timeout, which
/// hyper also reports for an idle keep-alive connection.
fn note_connection_error(
    node: &Node,
    connection: &Connection,
    error: &(dyn std::error::Error + 'static),
) {
    let unparsed = error.downcast_ref::<hyper::Error>().is_some_and(|error| {
        error.is_parse() || error.is_parse_too_large() || error.is_parse_status()
    });
    if !unparsed {
        tracing::debug!(%error, "client connection ended with an error");
        return;
    }
    node.metrics.unparsed_requests.inc();
    if let Some(suppressed) = node.unparsed_log.admit() {
        tracing::info!(
            peer = %connection.peer,
            %error,
            suppressed,
            "rejected a request before routing it: hyper could not read its head"
        );
    }
}

/// The HTTP/2 connection preface (RFC 9113, section 3.4), which a client
/// speaking HTTP/2 with prior knowledge sends first.
const HTTP2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

enum FirstBytes {
    /// Cannot be the HTTP/2 preface.
    Http1,
    /// The preface, part of it, or nothing readable: hyper's automatic
    /// detection decides.
    MaybeHttp2,
}

/// Waits for the connection's first bytes and looks at them without
/// consuming them. HTTP/1 connections then go straight to hyper's HTTP/1
/// server, which saves the automatic detection's buffering on every read.
async fn peek_preface(stream: &TcpStream) -> FirstBytes {
    let mut first = [0; HTTP2_PREFACE.len()];
    match stream.peek(&mut first).await {
        Ok(read) if read > 0 && !HTTP2_PREFACE.starts_with(&first[..read]) => FirstBytes::Http1,
        _ => FirstBytes::MaybeHttp2,
    }
}

/// Returns how often each serving thread sweeps for expired coarse timers:
/// a tenth of the shortest timeout they serve (header, upstream response,
/// response body idle and route timeouts), so a timer fires at most 10 %
/// late.
fn sweep_granularity<'a>(timeouts: impl Iterator<Item = &'a Duration>) -> Duration {
    let shortest = timeouts.min().copied().unwrap_or(Duration::from_secs(1));
    (shortest / 10).clamp(Duration::from_millis(1), Duration::from_secs(1))
}

/// The HTTP servers of one listener.
struct Builders {
    http1: hyper::server::conn::http1::Builder,
    auto: auto::Builder<TokioExecutor>,
    header_timeout: Duration,
    send_timeout: Duration,
}

impl Builders {
    fn new(header_timeout: Duration, send_timeout: Duration) -> Builders {
        // The same HTTP/1 settings on both. `writev(false)` copies small
        // bodies into the head's buffer: one write instead of a vectored
        // one, which measured about 6 % less CPU.
        let mut http1 = hyper::server::conn::http1::Builder::new();
        http1
            .writev(false)
            .timer(CoarseTimer)
            .header_read_timeout(header_timeout);
        let mut auto = auto::Builder::new(TokioExecutor::new());
        auto.http1()
            .writev(false)
            .timer(CoarseTimer)
            .header_read_timeout(header_timeout);
        auto.http2().timer(TokioTimer::new());
        Builders {
            http1,
            auto,
            header_timeout,
            send_timeout,
        }
    }
}
