//! The upstream client: keep-alive HTTP/1.1 connections per target, kept in
//! a small FIFO pool per serving thread, and the body types that stream
//! requests and responses through without buffering them.
//!
//! Plain HTTP targets use [`h1`], which the request's own task drives.
//! TLS targets and WebSocket handshakes use hyper's client, whose
//! connections each run in a task of their own.
//!
//! Each serving thread runs its own single-threaded runtime, so the pool is a
//! thread-local with no lock. A connection returns to the pool when the
//! response body's last frame has been read, not when the server polls the
//! body once more (it may never do so).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::error::Error as StdError;
use std::future::Future;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures_util::future::select_all;
use http::header::{self, HeaderMap, HeaderName};
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::balance::{self, Policy};
use crate::breaker::{Breaker, BreakerSettings, Permit};
use crate::error::Refusal;
use crate::h1::{self, ToSend};
use crate::health::{ActiveSettings, PassiveSettings, TargetHealth};
use crate::retry::{self, is_idempotent, RetryBudget, RetrySettings};
use crate::timer::{self, Deadline};
use crate::tls::UpstreamTls;
use crate::upgrade::UpgradeRequest;
use crate::worker::LogThrottle;

/// Boxed error of a body.
pub type BoxError = Box<dyn StdError + Send + Sync>;

/// One target of an upstream, with its breaker and health.
#[derive(Debug)]
pub struct Target {
    /// Index of this target across the node, for the thread-local pools.
    pub id: usize,
    pub addr: SocketAddr,
    /// `upstream/address`, for log lines.
    pub label: String,
    /// The logger of failed calls, shared with the response bodies.
    log: Arc<FailureLog>,
    /// The hash of the address that consistent hashing scores with.
    identity: u64,
    /// `None` when the upstream's breakers are off.
    pub breaker: Option<Breaker>,
    pub health: TargetHealth,
    /// Requests in flight, counted for the least-outstanding policy only.
    pub outstanding: Arc<AtomicUsize>,
    /// Open connections to the target, idle or busy, across every serving
    /// thread's pool.
    pub connections: Arc<AtomicUsize>,
    /// A permit per request in flight, when the upstream caps them.
    slots: Option<Arc<Semaphore>>,
}

/// The settings of an upstream, from its config.
#[derive(Debug, Clone)]
pub struct UpstreamSettings {
    pub connect_timeout: Duration,
    /// Time from sending a request until its response headers arrive, per
    /// attempt.
    pub response_timeout: Duration,
    /// Time a response body may go without a frame; `None` for no limit.
    pub idle_timeout: Option<Duration>,
    pub max_idle: usize,
    /// How long a connection may wait idle in the pool.
    pub keepalive_timeout: Duration,
    /// Requests in flight to one target at a time; `None` for no limit.
    pub max_in_flight: Option<usize>,
    /// How long a request waits for a slot of a full target.
    pub queue_timeout: Duration,
    pub policy: Policy,
    pub breaker: Option<BreakerSettings>,
    /// Response statuses counted as failures by the breakers and passive
    /// health.
    pub failure_statuses: Vec<u16>,
    pub retry: RetrySettings,
    pub active_health: Option<ActiveSettings>,
    pub passive_health: Option<PassiveSettings>,
}

/// An upstream: its targets, their breakers and health, and how requests
/// are spread over them and retried.
#[derive(Debug)]
pub struct Upstream {
    pub name: String,
    pub targets: Vec<Target>,
    pub settings: UpstreamSettings,
    /// Active health-check settings, read by the checker thread.
    pub active_health: Option<ActiveSettings>,
    /// TLS to the targets; `None` for plain HTTP.
    pub tls: Option<UpstreamTls>,
    next: AtomicUsize,
    budget: RetryBudget,
}

/// The failure of one attempt.
enum SendError {
    /// The client's body failed or was too large: not the target's fault,
    /// and not retried.
    Client(Refusal),
    /// The target failed. `unsent` is the request when it never left the
    /// node, so it can go to another target whatever its method. `stale`
    /// is set when a pooled connection turned out closed by the target
    /// after the request went out, so that a retry takes a new connection.
    Upstream {
        refusal: Refusal,
        unsent: Option<Box<Request<RequestBody>>>,
        stale: bool,
    },
}

/// The outcome of choosing a target.
enum Choice<'a> {
    Target(usize, Option<Permit<'a>>),
    /// Every target is failing health checks or ejected; the duration is a
    /// hint for `Retry-After`.
    NoneHealthy(Duration),
    /// Healthy targets exist but every breaker among them is open.
    AllOpen(Duration),
}

impl Upstream {
    /// Creates an upstream whose targets get ids from `first_id` on.
    pub fn new(
        name: String,
        addrs: &[SocketAddr],
        first_id: usize,
        settings: UpstreamSettings,
        tls: Option<UpstreamTls>,
    ) -> Upstream {
        // Log lines about failed calls are limited across the targets.
        let failures = Arc::new(LogThrottle::default());
        let targets = addrs
            .iter()
            .enumerate()
            .map(|(offset, &addr)| {
                let label = format!("{name}/{addr}");
                Target {
                    id: first_id + offset,
                    addr,
                    breaker: settings
                        .breaker
                        .clone()
                        .map(|breaker| Breaker::new(label.clone(), breaker)),
                    label,
                    log: Arc::new(FailureLog {
                        upstream: name.clone(),
                        target: addr,
                        throttle: failures.clone(),
                    }),
                    identity: balance::target_identity(&addr),
                    health: TargetHealth::default(),
                    outstanding: Arc::new(AtomicUsize::new(0)),
                    connections: Arc::new(AtomicUsize::new(0)),
                    slots: settings
                        .max_in_flight
                        .map(|max| Arc::new(Semaphore::new(max))),
                }
            })
            .collect();
        Upstream {
            name,
            targets,
            active_health: settings.active_health.clone(),
            budget: RetryBudget::new(&settings.retry),
            settings,
            tls,
            next: AtomicUsize::new(0),
        }
    }

    /// Sends a request to one of the targets and returns its response
    /// head; the body streams on as it arrives.
    ///
    /// A failed attempt goes to another target when retries allow it: any
    /// request that never left the node, and an idempotent request without
    /// a body (the body streams from the client, so once sent it is gone).
    /// `timeout` bounds every attempt, the backoffs and the response body.
    pub async fn send(
        &self,
        request: Request<RequestBody>,
        client_ip: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<Response<PooledBody>, Refusal> {
        self.send_noting_target(request, client_ip, timeout, &mut None)
            .await
    }

    /// Sends a request as [`Upstream::send`] does, and sets `target` to the
    /// address of each attempt's target as it is chosen.
    ///
    /// A plain function that returns a future, because an `async fn` keeps a
    /// second copy of each argument taken by value, and this future is part
    /// of every request's.
    pub fn send_noting_target<'a>(
        &'a self,
        request: Request<RequestBody>,
        client_ip: IpAddr,
        timeout: Option<Duration>,
        target_addr: &'a mut Option<SocketAddr>,
    ) -> impl Future<Output = Result<Response<PooledBody>, Refusal>> + Send + 'a {
        let attempts = Attempts::new(self, request, client_ip, timeout);
        async move {
            let mut attempts = attempts?;
            loop {
                let reserved = attempts.reserved.take();
                let slot =
                    match reserved.map_or_else(|| attempts.free_slot(), |slot| Ok(Some(slot))) {
                        Ok(slot) => slot,
                        Err(AllFull) => {
                            *target_addr = Some(attempts.next_target().addr);
                            // Boxed: only upstreams with a cap wait here.
                            Some(Box::pin(self.wait_for_slot(&mut attempts)).await?)
                        }
                    };
                let fresh = attempts.fresh;
                let (target, request, attempt_deadline) = attempts.start(target_addr, slot);
                // The coarse timer: a tokio timer per request costs about a
                // thousand instructions more, and this timeout needs no
                // precision.
                let sending = self.send_to(target, request, fresh);
                let sent = timer::timeout_at(attempt_deadline, sending).await;
                if let Some(result) = attempts.finish(sent) {
                    return result;
                }
                // Boxed: retries are rare, and their timer would make every
                // request's future larger.
                Box::pin(self.back_off(attempts.retries, attempts.deadline)).await;
            }
        }
    }

    /// Chooses a target by the upstream's policy among those that are up
    /// and whose breaker lets a request through, preferring targets not in
    /// `tried` (a bit per target index, modulo 64).
    fn choose(
        &self,
        key: Option<u64>,
        tried: u64,
        now: Instant,
    ) -> Result<(usize, Option<Permit<'_>>), Refusal> {
        let mut choice = self.choose_excluding(key, tried, now);
        if tried != 0 && !matches!(choice, Choice::Target(..)) {
            choice = self.choose_excluding(key, 0, now);
        }
        match choice {
            Choice::Target(index, permit) => Ok((index, permit)),
            Choice::NoneHealthy(wait) => Err(Refusal::NoHealthyUpstream {
                upstream: self.name.clone(),
                retry_after: whole_seconds(wait),
            }),
            Choice::AllOpen(wait) => Err(Refusal::CircuitOpen {
                upstream: self.name.clone(),
                retry_after: whole_seconds(wait),
            }),
        }
    }

    fn choose_excluding(&self, key: Option<u64>, tried: u64, now: Instant) -> Choice<'_> {
        let count = self.targets.len();
        let eligible =
            |index: usize| tried & (1 << (index % 64)) == 0 && self.is_eligible(index, now);
        let preferred = match (&self.settings.policy, key) {
            (Policy::ConsistentHash(_), Some(key)) => (0..count)
                .filter(|&index| eligible(index))
                .max_by_key(|&index| balance::score(key, self.targets[index].identity)),
            (Policy::LeastOutstanding, _) if count > 1 => {
                let first = fastrand::usize(..count);
                let second = (first + 1 + fastrand::usize(..count - 1)) % count;
                let load = |index: usize| self.targets[index].outstanding.load(Ordering::Relaxed);
                match (eligible(first), eligible(second)) {
                    (true, true) if load(second) < load(first) => Some(second),
                    (true, _) => Some(first),
                    (false, true) => Some(second),
                    (false, false) => None,
                }
            }
            _ => None,
        };
        if let Some(index) = preferred {
            if let Some(permit) = self.admit(index, now) {
                return Choice::Target(index, permit);
            }
        }
        // Round robin, and the fallback of the other policies: each target
        // in turn from the next position.
        let turn = self.next.fetch_add(1, Ordering::Relaxed);
        let mut any_up = false;
        let mut open_wait = Duration::MAX;
        let mut down_wait = Duration::MAX;
        for step in 0..count {
            let index = (turn + step) % count;
            let target = &self.targets[index];
            if tried & (1 << (index % 64)) != 0 {
                continue;
            }
            if !target.health.is_up(now) {
                let wait = match &self.active_health {
                    Some(active) if target.health.is_unhealthy() => active.interval,
                    _ => target.health.ejected_for(now),
                };
                down_wait = down_wait.min(wait);
                continue;
            }
            any_up = true;
            match &target.breaker {
                None => return Choice::Target(index, None),
                Some(breaker) => match breaker.acquire(now) {
                    Ok(permit) => return Choice::Target(index, Some(permit)),
                    Err(refused) => open_wait = open_wait.min(refused.retry_in),
                },
            }
        }
        if any_up {
            Choice::AllOpen(open_wait)
        } else {
            Choice::NoneHealthy(down_wait)
        }
    }

    /// Returns whether a target is up and its breaker lets a request
    /// through.
    fn is_eligible(&self, index: usize, now: Instant) -> bool {
        let target = &self.targets[index];
        target.health.is_up(now) && target.breaker.as_ref().is_none_or(|b| b.allows(now))
    }

    /// Takes a breaker permit for a target; the inner `None` is for a
    /// target without a breaker.
    fn admit(&self, index: usize, now: Instant) -> Option<Option<Permit<'_>>> {
        match &self.targets[index].breaker {
            None => Some(None),
            Some(breaker) => breaker.acquire(now).ok().map(Some),
        }
    }

    /// Records an attempt's outcome in the target's breaker and passive
    /// health.
    fn record(&self, target: &Target, permit: Option<Permit<'_>>, succeeded: bool, now: Instant) {
        if let Some(permit) = permit {
            if succeeded {
                permit.succeeded(now);
            } else {
                permit.failed(now);
            }
        }
        if let Some(passive) = &self.settings.passive_health {
            if succeeded {
                target.health.record_success();
            } else {
                target.health.record_failure(passive, &target.label, now);
            }
        }
    }

    fn may_retry(&self, retries: u32, deadline: Option<Instant>, now: Instant) -> bool {
        retries < self.settings.retry.max_retries
            && deadline.is_none_or(|deadline| now < deadline)
            && self.budget.withdraw(now)
    }

    /// Waits the jittered backoff before retry number `retry`, but not past
    /// the deadline. Retries are rare, so a tokio timer is fine here.
    async fn back_off(&self, retry: u32, deadline: Option<Instant>) {
        let mut wait = retry::backoff(&self.settings.retry, retry);
        if let Some(deadline) = deadline {
            wait = wait.min(deadline.saturating_duration_since(Instant::now()));
        }
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Returns the requests in flight to `target`, when the node counts
    /// them: for the least-outstanding policy, or when the upstream caps
    /// them with `max_requests_per_target`.
    pub fn in_flight(&self, target: &Target) -> Option<usize> {
        if self.settings.policy == Policy::LeastOutstanding {
            return Some(target.outstanding.load(Ordering::Relaxed));
        }
        let (max, slots) = self.settings.max_in_flight.zip(target.slots.as_ref())?;
        Some(max.saturating_sub(slots.available_permits()))
    }

    /// Waits for the first request slot to come free at the target of the
    /// next attempt or at any other target it may go to, and moves the
    /// attempt to that slot's target. The wait ends after the upstream's
    /// `queue_timeout`, and no later than the caller's deadline.
    async fn wait_for_slot(
        &self,
        attempts: &mut Attempts<'_>,
    ) -> Result<OwnedSemaphorePermit, Refusal> {
        let mut until = Instant::now() + self.settings.queue_timeout;
        if let Some(deadline) = attempts.deadline {
            until = until.min(deadline);
        }
        // The attempt starts later than its target was chosen.
        attempts.chosen_at = None;
        let chosen = attempts.next_index();
        // Targets that were down, or whose breaker turned the request away,
        // when their slot came free.
        let mut passed = 0u64;
        loop {
            let now = Instant::now();
            let waits: Vec<_> = (0..self.targets.len())
                .filter(|&index| {
                    let bit = 1 << (index % 64);
                    passed & bit == 0
                        && (index == chosen || attempts.tried & bit == 0)
                        && self.is_eligible(index, now)
                })
                .filter_map(|index| {
                    let slots = self.targets[index].slots.clone()?;
                    Some(Box::pin(
                        async move { (index, slots.acquire_owned().await) },
                    ))
                })
                .collect();
            if waits.is_empty() {
                // Every target the request may go to was taken out while it
                // waited: the refusal is the one a new request would get.
                self.choose(attempts.key, attempts.tried, now)?;
                break;
            }
            let Ok(((index, acquired), ..)) =
                tokio::time::timeout_at(until.into(), select_all(waits)).await
            else {
                break;
            };
            // The semaphores are never closed.
            let Ok(slot) = acquired else {
                break;
            };
            // The slot came free while the target may have gone down or its
            // breaker opened, often through the request that held the slot.
            if self.is_eligible(index, Instant::now()) && attempts.move_to(index) {
                return Ok(slot);
            }
            passed |= 1 << (index % 64);
        }
        let message = "no target took the request while it waited: each was full \
                       (max_requests_per_target), down or open; the target named was chosen first";
        self.log_failure(&self.targets[chosen], None, message);
        Err(Refusal::UpstreamBusy {
            upstream: self.name.clone(),
        })
    }

    /// Marks an attempt in flight to `target`, holding its request `slot`.
    fn mark_in_flight(
        &self,
        target: &Target,
        slot: Option<OwnedSemaphorePermit>,
    ) -> Option<InFlight> {
        let outstanding = (self.settings.policy == Policy::LeastOutstanding).then(|| {
            target.outstanding.fetch_add(1, Ordering::Relaxed);
            target.outstanding.clone()
        });
        if outstanding.is_none() && slot.is_none() {
            return None;
        }
        Some(InFlight {
            outstanding,
            _slot: slot,
        })
    }

    /// Sends a request to `target` on a pooled connection, or on a new one
    /// when `fresh` is set or the pool has none.
    async fn send_to(
        &self,
        target: &Target,
        request: ToSend<'_, RequestBody>,
        fresh: bool,
    ) -> Result<Response<PooledBody>, SendError> {
        let (progress, handshake) = match &request {
            // A WebSocket handshake takes a new connection, which its tunnel
            // keeps after a 101 and which never returns to the pool.
            ToSend::Request(request) => (
                request.body().progress(),
                request.extensions().get::<UpgradeRequest>().is_some(),
            ),
            ToSend::Head(_) => (None, false),
        };
        if self.tls.is_none() && !handshake {
            return self.send_plain(target, request, progress, fresh).await;
        }
        // hyper's client takes the request it sends, so a lent head, which
        // only plain targets get (see `RetryHead`), goes as a copy.
        let mut request = match request {
            ToSend::Request(request) => request,
            ToSend::Head(parts) => {
                Box::new(Request::from_parts(parts.clone(), RequestBody::empty()))
            }
        };
        // A pooled connection may have been closed by the target while idle.
        // hyper then returns the unsent request, which goes out on the next
        // pooled connection or a new one.
        if !handshake && !fresh {
            let keepalive = self.settings.keepalive_timeout;
            while let Some(mut sender) = take_idle(target.id, keepalive).await {
                match sender.try_send_request(*request).await {
                    Ok(response) => return Ok(self.pooled(target, sender, response, progress)),
                    Err(mut error) => match error.take_message() {
                        Some(unsent) => request = Box::new(unsent),
                        None => return Err(self.failure(target, &error.into_error(), None)),
                    },
                }
            }
        }
        // Boxed: a new connection is rare, and its future (TLS included)
        // would otherwise make every request's future larger.
        let mut sender = match Box::pin(self.connect(target)).await {
            Ok(sender) => sender,
            Err(refusal) => {
                return Err(SendError::Upstream {
                    refusal,
                    unsent: Some(request),
                    stale: false,
                })
            }
        };
        match sender.try_send_request(*request).await {
            Ok(response) if handshake => {
                Ok(response
                    .map(|body| PooledBody::new(Inner::Hyper(body), None, target, 0, progress)))
            }
            Ok(response) => Ok(self.pooled(target, sender, response, progress)),
            Err(mut error) => {
                let unsent = error.take_message().map(Box::new);
                Err(self.failure(target, &error.into_error(), unsent))
            }
        }
    }

    /// Sends a request over plain HTTP/1.1 on a connection of this thread's
    /// pool or a new one, driven by the request's own task ([`h1`]).
    async fn send_plain(
        &self,
        target: &Target,
        mut request: ToSend<'_, RequestBody>,
        progress: Option<Arc<BodyProgress>>,
        fresh: bool,
    ) -> Result<Response<PooledBody>, SendError> {
        // `take_idle_plain` passes over an idle connection that the target
        // closed. One that fails on its first write returns the unsent
        // request, which then goes out on the next one.
        let keepalive = self.settings.keepalive_timeout;
        let pooled = || {
            if fresh {
                None
            } else {
                take_idle_plain(target.id, keepalive)
            }
        };
        while let Some(connection) = pooled() {
            match connection.send(request).await {
                Ok(response) => return Ok(self.pooled_plain(target, response, progress)),
                Err(failure) => match failure.unsent {
                    Some(unsent) => request = unsent,
                    None => {
                        let mut error = self.failure(target, &failure.error, None);
                        if let SendError::Upstream { stale, .. } = &mut error {
                            *stale = closed_by_target(&failure.error);
                        }
                        return Err(error);
                    }
                },
            }
        }
        // Boxed: a new connection is rare, and its future would otherwise
        // make every request's future larger.
        let stream = match Box::pin(self.connect_tcp(target)).await {
            Ok(stream) => stream,
            Err(refusal) => {
                return Err(SendError::Upstream {
                    refusal,
                    unsent: owned(request),
                    stale: false,
                })
            }
        };
        let connection = h1::Connection::new(stream, OpenConnection::new(&target.connections));
        match connection.send(request).await {
            Ok(response) => Ok(self.pooled_plain(target, response, progress)),
            Err(failure) => {
                let unsent = failure.unsent.and_then(owned);
                Err(self.failure(target, &failure.error, unsent))
            }
        }
    }

    fn pooled_plain(
        &self,
        target: &Target,
        response: Response<h1::ResponseBody<RequestBody>>,
        progress: Option<Arc<BodyProgress>>,
    ) -> Response<PooledBody> {
        let max_idle = self.settings.max_idle;
        response.map(|body| PooledBody::new(Inner::Plain(body), None, target, max_idle, progress))
    }

    /// Opens a TCP connection to a target within the connect timeout.
    async fn connect_tcp(&self, target: &Target) -> Result<TcpStream, Refusal> {
        let timeout = self.settings.connect_timeout;
        let stream = self.connected(
            target,
            tokio::time::timeout(timeout, TcpStream::connect(target.addr)).await,
        )?;
        let _ = stream.set_nodelay(true);
        Ok(stream)
    }

    /// Returns the connection that a connect within a timeout made, or logs
    /// why there is none and returns the refusal for it.
    fn connected<T>(
        &self,
        target: &Target,
        connecting: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
    ) -> Result<T, Refusal> {
        match connecting {
            Ok(Ok(connected)) => Ok(connected),
            Ok(Err(error)) => {
                self.log_failure(target, Some(&error), "connect failed");
                Err(Refusal::UpstreamUnavailable {
                    upstream: self.name.clone(),
                })
            }
            Err(_) => {
                self.log_failure(target, None, "connect timed out");
                Err(Refusal::UpstreamTimeout {
                    upstream: self.name.clone(),
                })
            }
        }
    }

    /// Opens a new connection to a target, with TLS when the upstream has
    /// it.
    pub async fn connect(
        &self,
        target: &Target,
    ) -> Result<http1::SendRequest<RequestBody>, Refusal> {
        // With TLS, the connect timeout covers the handshake too.
        let connecting = tokio::time::timeout(self.settings.connect_timeout, async {
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
        let connected = self.connected(target, connecting.await)?;
        let open = OpenConnection::new(&target.connections);
        let handshake = match connected {
            Connected::Plain(stream) => handshake(TokioIo::new(stream), open).await,
            Connected::Tls(stream) => handshake(TokioIo::new(stream), open).await,
        };
        handshake.map_err(|error| {
            self.log_failure(target, Some(&error), "upstream handshake failed");
            Refusal::UpstreamUnavailable {
                upstream: self.name.clone(),
            }
        })
    }

    fn pooled(
        &self,
        target: &Target,
        sender: http1::SendRequest<RequestBody>,
        response: Response<Incoming>,
        progress: Option<Arc<BodyProgress>>,
    ) -> Response<PooledBody> {
        let max_idle = self.settings.max_idle;
        response.map(|body| {
            PooledBody::new(Inner::Hyper(body), Some(sender), target, max_idle, progress)
        })
    }

    fn failure(
        &self,
        target: &Target,
        error: &(dyn StdError + 'static),
        unsent: Option<Box<Request<RequestBody>>>,
    ) -> SendError {
        if let Some(too_large) = find_cause::<BodyTooLarge>(error) {
            return SendError::Client(Refusal::BodyTooLarge {
                limit: too_large.limit,
            });
        }
        if find_cause::<ClientBodyError>(error).is_some() {
            tracing::debug!(upstream = %self.name, %error, "client request body failed");
            return SendError::Client(Refusal::InvalidBody);
        }
        self.log_failure(target, Some(error), "upstream request failed");
        SendError::Upstream {
            refusal: Refusal::UpstreamUnavailable {
                upstream: self.name.clone(),
            },
            unsent,
            stale: false,
        }
    }
}

/// Returns whether a pooled connection failed because the target had
/// closed it: no response at all, or a reset.
fn closed_by_target(error: &h1::Error) -> bool {
    match error {
        h1::Error::ClosedBeforeResponse => true,
        h1::Error::Read(error) => error.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

/// Returns the request that `sending` hands over, or `None` for a lent
/// head, which its owner keeps.
fn owned(sending: ToSend<'_, RequestBody>) -> Option<Box<Request<RequestBody>>> {
    match sending {
        ToSend::Request(request) => Some(request),
        ToSend::Head(_) => None,
    }
}

/// No target an attempt may go to has a free request slot.
struct AllFull;

/// The state of one call of [`Upstream::send`] between its attempts.
struct Attempts<'a> {
    upstream: &'a Upstream,
    deadline: Option<Instant>,
    /// The consistent-hash key, when the policy has one.
    key: Option<u64>,
    /// The head, when the request may be sent again after it left the
    /// node.
    head: Option<RetryHead>,
    /// How far the client's body has come, when it has one.
    body_progress: Option<Arc<BodyProgress>>,
    /// The request for the next attempt, unless a kept head is lent to it.
    /// Boxed, because the request moves through several futures on its way
    /// to the connection.
    request: Option<Box<Request<RequestBody>>>,
    /// The targets tried, a bit per target index (modulo 64).
    tried: u64,
    retries: u32,
    /// The target of the next attempt and its breaker's permit.
    next: Option<(usize, Option<Permit<'a>>)>,
    /// The request slot a retry took when its target was chosen.
    reserved: Option<OwnedSemaphorePermit>,
    /// The attempt in flight: its target, breaker permit and in-flight mark.
    current: Option<(usize, Option<Permit<'a>>, Option<InFlight>)>,
    /// The attempt in flight ends at the caller's deadline, before the
    /// upstream's `response_timeout`.
    cut_short: bool,
    /// When the first attempt's target was chosen, until it starts.
    chosen_at: Option<Instant>,
    /// Whether the request is a WebSocket handshake, which may get a 101.
    handshake: bool,
    /// Whether the next attempt takes a new connection, as after a pooled
    /// one that the target had closed.
    fresh: bool,
}

impl<'a> Attempts<'a> {
    /// Prepares the attempts of a request and chooses the first target.
    fn new(
        upstream: &'a Upstream,
        request: Request<RequestBody>,
        client_ip: IpAddr,
        timeout: Option<Duration>,
    ) -> Result<Attempts<'a>, Refusal> {
        let settings = &upstream.settings;
        let now = Instant::now();
        let deadline = timeout.map(|timeout| now + timeout);
        upstream.budget.deposit();
        let key = match &settings.policy {
            Policy::ConsistentHash(key) => key.hash(request.headers(), client_ip),
            _ => None,
        };
        let handshake = request.extensions().get::<UpgradeRequest>().is_some();
        // A copied head loses the handshake's mark, so a handshake goes again
        // only when it never left the node.
        let repeatable = settings.retry.max_retries > 0
            && is_idempotent(request.method())
            && request.body().is_empty()
            && !handshake;
        let body_progress = request.body().progress();
        let (request, head) = match repeatable {
            // A plain target's client encodes a lent head, so the request's
            // own head is kept, and its empty body dropped.
            true if upstream.tls.is_none() => (None, Some(RetryHead::Own(request.into_parts().0))),
            true => {
                let copy = RetryHead::Copy(copy_head(&request));
                (Some(Box::new(request)), Some(copy))
            }
            false => (Some(Box::new(request)), None),
        };
        // A retry chooses its target before it gives up the failed attempt's
        // outcome, so that a retry with nowhere to go returns that outcome
        // rather than a 503 of its own.
        let next = upstream.choose(key, 0, now)?;
        Ok(Attempts {
            upstream,
            deadline,
            key,
            head,
            body_progress,
            request,
            tried: 0,
            retries: 0,
            next: Some(next),
            reserved: None,
            current: None,
            cut_short: false,
            chosen_at: Some(now),
            handshake,
            fresh: false,
        })
    }

    /// Returns the target index of the next attempt.
    fn next_index(&self) -> usize {
        let (index, _) = self.next.as_ref().expect("a target for each attempt");
        *index
    }

    /// Returns the target of the next attempt.
    fn next_target(&self) -> &'a Target {
        &self.upstream.targets[self.next_index()]
    }

    /// Takes a request slot for the next attempt when its upstream caps
    /// them: at its target, or else at another target with a free one,
    /// which the attempt then goes to. Returns `None` for an upstream
    /// without a cap.
    fn free_slot(&mut self) -> Result<Option<OwnedSemaphorePermit>, AllFull> {
        let Some(slots) = &self.next_target().slots else {
            return Ok(None);
        };
        if let Ok(slot) = slots.clone().try_acquire_owned() {
            return Ok(Some(slot));
        }
        self.spill_over().map(Some).ok_or(AllFull)
    }

    /// Chooses the target of a retry, and takes its request slot when the
    /// upstream caps them. Returns `false` when no target can take the
    /// retry now. The send loop uses the slot taken here, so a retry does
    /// not wait for one, and the failed attempt's outcome returns at once.
    fn choose_retry(&mut self, now: Instant) -> bool {
        let Ok(choice) = self.upstream.choose(self.key, self.tried, now) else {
            return false;
        };
        self.next = Some(choice);
        match self.free_slot() {
            Ok(slot) => {
                self.reserved = slot;
                true
            }
            Err(AllFull) => {
                self.next = None;
                false
            }
        }
    }

    /// Sends the next attempt to target `index`, with a breaker permit of
    /// its own unless it is the target already chosen. Returns `false`
    /// when that target's breaker turns the request away.
    fn move_to(&mut self, index: usize) -> bool {
        if self.next_index() == index {
            return true;
        }
        match self.upstream.admit(index, Instant::now()) {
            Some(permit) => {
                self.next = Some((index, permit));
                true
            }
            None => false,
        }
    }

    /// Moves the next attempt from its full target to another one with a
    /// free request slot, chosen as the policy would choose among the
    /// targets not yet tried, and returns that slot. Returns `None`, and
    /// leaves the next attempt's target as it was, when every target is
    /// full, down or refused by its breaker.
    fn spill_over(&mut self) -> Option<OwnedSemaphorePermit> {
        let upstream = self.upstream;
        let (first, _) = self.next.as_ref()?;
        let mut passed = self.tried | 1 << (first % 64);
        let now = Instant::now();
        for _ in 1..upstream.targets.len() {
            let Choice::Target(index, permit) = upstream.choose_excluding(self.key, passed, now)
            else {
                return None;
            };
            let slots = upstream.targets[index].slots.as_ref()?;
            if let Ok(slot) = slots.clone().try_acquire_owned() {
                self.next = Some((index, permit));
                return Some(slot);
            }
            passed |= 1 << (index % 64);
        }
        None
    }

    /// Starts the next attempt: returns its target, its request and the
    /// time it ends, and notes the target's address in `target_addr`.
    fn start(
        &mut self,
        target_addr: &mut Option<SocketAddr>,
        slot: Option<OwnedSemaphorePermit>,
    ) -> (&'a Target, ToSend<'_, RequestBody>, Instant) {
        let upstream = self.upstream;
        // The first attempt starts as soon as its target is chosen, so it
        // reuses that reading of the clock.
        let now = self.chosen_at.take().unwrap_or_else(Instant::now);
        let (index, permit) = self.next.take().expect("a target for each attempt");
        self.tried |= 1 << (index % 64);
        let target = &upstream.targets[index];
        *target_addr = Some(target.addr);
        let response_timeout = upstream.settings.response_timeout;
        let attempt_timeout = match self.deadline {
            Some(deadline) => response_timeout.min(deadline.saturating_duration_since(now)),
            None => response_timeout,
        };
        self.cut_short = attempt_timeout < response_timeout;
        self.current = Some((index, permit, upstream.mark_in_flight(target, slot)));
        let request = match (self.request.take(), &self.head) {
            (Some(request), _) => ToSend::Request(request),
            (None, Some(RetryHead::Own(parts))) => ToSend::Head(parts),
            (None, _) => panic!("a request for each attempt"),
        };
        (target, request, now + attempt_timeout)
    }

    /// Judges the attempt in flight by what it `sent`: returns the response
    /// or the refusal, or `None` when it has prepared a retry, which goes
    /// after the backoff.
    fn finish(
        &mut self,
        sent: Result<Result<Response<PooledBody>, SendError>, timer::Elapsed>,
    ) -> Option<Result<Response<PooledBody>, Refusal>> {
        let upstream = self.upstream;
        let settings = &upstream.settings;
        let (index, permit, in_flight) = self.current.take().expect("an attempt in flight");
        let target = &upstream.targets[index];
        let now = Instant::now();

        let (refusal, unsent) = match sent {
            // Unless the request is a WebSocket handshake, the node removed
            // the client's `Upgrade`, so a switch of protocols is one the
            // client never asked for: an invalid response, which the breaker
            // counts.
            Ok(Ok(response))
                if response.status() == http::StatusCode::SWITCHING_PROTOCOLS
                    && !self.handshake =>
            {
                upstream.log_failure(target, None, "upstream switched protocols unasked");
                let refusal = Refusal::UpstreamUnavailable {
                    upstream: upstream.name.clone(),
                };
                (refusal, None)
            }
            Ok(Ok(response)) => {
                let status = response.status().as_u16();
                let failed = settings.failure_statuses.contains(&status);
                upstream.record(target, permit, !failed, now);
                let retry_status = settings.retry.on_statuses.contains(&status);
                if retry_status
                    && self.head.is_some()
                    && upstream.may_retry(self.retries, self.deadline, now)
                    && self.choose_retry(now)
                {
                    tracing::debug!(upstream = %upstream.name, target = %target.addr, status,
                        "retrying upstream request after a retryable status");
                    response.into_body().discard();
                    self.request = self.head.as_ref().and_then(RetryHead::request);
                    self.retries += 1;
                    return None;
                }
                let timeouts = BodyTimeouts::new(settings.idle_timeout, self.deadline);
                return Some(Ok(response.map(|body| body.watched(in_flight, timeouts))));
            }
            Ok(Err(SendError::Client(refusal))) => return Some(Err(refusal)),
            Ok(Err(SendError::Upstream {
                refusal,
                unsent,
                stale,
            })) => {
                self.fresh = stale;
                (refusal, unsent)
            }
            Err(_)
                if self
                    .body_progress
                    .as_ref()
                    .is_some_and(|progress| progress.waiting.load(Ordering::Relaxed)) =>
            {
                // The client, not the upstream, was late: the node was still
                // waiting for its body. No breaker or health record, and no
                // retry, as the body is partly sent.
                tracing::debug!(upstream = %upstream.name, target = %target.addr,
                    "client body still arriving when the response timeout passed");
                drop(permit);
                return Some(Err(Refusal::BodyTimeout));
            }
            Err(_) if self.cut_short => {
                // The caller's deadline (a route's or a worker fetch's timeout)
                // ended the attempt before the upstream's response timeout.
                // Nothing goes to the breaker or health, so that clients
                // cannot open a slow upstream's breaker through a route with
                // a short deadline. No retry either: the deadline has passed.
                tracing::debug!(upstream = %upstream.name, target = %target.addr,
                    "the caller's deadline passed before the upstream answered");
                drop(permit);
                return Some(Err(Refusal::UpstreamTimeout {
                    upstream: upstream.name.clone(),
                }));
            }
            Err(_) => {
                upstream.log_failure(target, None, "upstream timed out");
                let refusal = Refusal::UpstreamTimeout {
                    upstream: upstream.name.clone(),
                };
                (refusal, None)
            }
        };

        // The attempt failed: retry it when the request can go again.
        upstream.record(target, permit, false, now);
        self.request = unsent.or_else(|| self.head.as_ref().and_then(RetryHead::request));
        let lent = matches!(self.head, Some(RetryHead::Own(_)));
        if (self.request.is_none() && !lent)
            || !upstream.may_retry(self.retries, self.deadline, now)
        {
            return Some(Err(refusal));
        }
        if !self.choose_retry(now) {
            return Some(Err(refusal));
        }
        tracing::debug!(upstream = %upstream.name, target = %target.addr, code = refusal.code(),
            "retrying failed upstream request");
        self.retries += 1;
        None
    }
}

/// Rounds a wait up to whole seconds for `Retry-After`, at least 1.
fn whole_seconds(wait: Duration) -> u64 {
    if wait == Duration::MAX {
        return 1;
    }
    wait.as_secs_f64().ceil().max(1.0) as u64
}

/// The head of a request without a body, kept to send it again.
enum RetryHead {
    /// The request's own head, lent to each attempt: plain targets' client
    /// encodes it without taking it. Copying the head cost about 1,200
    /// instructions per request (callgrind).
    Own(http::request::Parts),
    /// A copy: hyper's client, for TLS targets, takes the request it sends.
    Copy(CopiedHead),
}

impl RetryHead {
    /// Returns the request of another attempt, or `None` for a head that is
    /// lent to it.
    fn request(&self) -> Option<Box<Request<RequestBody>>> {
        match self {
            RetryHead::Own(_) => None,
            RetryHead::Copy(copy) => Some(Box::new(repeat(copy))),
        }
    }
}

/// A copy of a request's head, kept to send a request without a body again.
/// The header fields are copied into one buffer, each as its name's and its
/// value's lengths and then their bytes. Cloning and later dropping each
/// name and value instead cost about 850 more instructions per request
/// (callgrind), and most requests are never sent again.
struct CopiedHead {
    method: http::Method,
    uri: http::Uri,
    version: http::Version,
    fields: Vec<u8>,
}

/// Copies a request's head, to send a request without a body again.
fn copy_head(request: &Request<RequestBody>) -> CopiedHead {
    let headers = request.headers();
    let size = headers
        .iter()
        .map(|(name, value)| 8 + name.as_str().len() + value.len())
        .sum();
    let mut fields = Vec::with_capacity(size);
    for (name, value) in headers {
        // A field is far shorter than 4 GiB, because hyper rejects an
        // HTTP/1 head over about 400 KB, and an HTTP/2 one well before that.
        fields.extend_from_slice(&(name.as_str().len() as u32).to_le_bytes());
        fields.extend_from_slice(&(value.len() as u32).to_le_bytes());
        fields.extend_from_slice(name.as_str().as_bytes());
        fields.extend_from_slice(value.as_bytes());
    }
    CopiedHead {
        method: request.method().clone(),
        uri: request.uri().clone(),
        version: request.version(),
        fields,
    }
}

/// Builds a request without a body from a copied head.
fn repeat(head: &CopiedHead) -> Request<RequestBody> {
    let mut request = Request::new(RequestBody::empty());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    let headers = request.headers_mut();
    let mut rest = head.fields.as_slice();
    while let Some((lengths, after)) = rest.split_first_chunk::<8>() {
        let name_len = u32::from_le_bytes([lengths[0], lengths[1], lengths[2], lengths[3]]);
        let value_len = u32::from_le_bytes([lengths[4], lengths[5], lengths[6], lengths[7]]);
        let (name, after) = after.split_at(name_len as usize);
        let (value, after) = after.split_at(value_len as usize);
        rest = after;
        // Both were a valid name and value when they were copied.
        let name = http::HeaderName::from_bytes(name).expect("a copied header name is valid");
        let value = http::HeaderValue::from_bytes(value).expect("a copied header value is valid");
        headers.append(name, value);
    }
    request
}

/// An attempt in flight, until its response body ends or is dropped. It
/// counts for the least-outstanding policy, and it keeps one of the
/// target's request slots when the upstream caps them.
struct InFlight {
    outstanding: Option<Arc<AtomicUsize>>,
    _slot: Option<OwnedSemaphorePermit>,
}

impl Drop for InFlight {
    fn drop(&mut self) {
        if let Some(outstanding) = &self.outstanding {
            outstanding.fetch_sub(1, Ordering::Relaxed);
        }
    }
}

/// The idle and total timeouts of a response body.
struct BodyTimeouts {
    idle: Option<Duration>,
    total: Option<Instant>,
    /// Armed on the first poll that has to wait.
    deadline: Option<Deadline>,
    /// Frames read, and the count when the deadline was last armed: the idle
    /// timer is moved only when it fires, not on every frame.
    frames: u64,
    frames_when_armed: u64,
}

impl BodyTimeouts {
    fn new(idle: Option<Duration>, total: Option<Instant>) -> Option<BodyTimeouts> {
        if idle.is_none() && total.is_none() {
            return None;
        }
        Some(BodyTimeouts {
            idle,
            total,
            deadline: None,
            frames: 0,
            frames_when_armed: 0,
        })
    }

    /// Returns the next deadline from `now`.
    fn next_deadline(&self, now: Instant) -> Instant {
        let idle = self.idle.map(|idle| now + idle);
        match (idle, self.total) {
            (Some(idle), Some(total)) => idle.min(total),
            (Some(at), None) | (None, Some(at)) => at,
            (None, None) => unreachable!("BodyTimeouts has a timeout"),
        }
    }

    /// Returns the timeout that has passed while the body waits, if any. A
    /// body that stays idle is cut off between `idle` and twice `idle` after
    /// its last frame.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<BodyTimedOut> {
        loop {
            let deadline = match &mut self.deadline {
                Some(deadline) => deadline,
                None => {
                    self.frames_when_armed = self.frames;
                    self.deadline
                        .insert(Deadline::new(self.next_deadline(Instant::now())))
                }
            };
            if deadline.poll_elapsed(cx).is_pending() {
                return None;
            }
            let now = Instant::now();
            if self.total.is_some_and(|total| now >= total) {
                return Some(BodyTimedOut::Total);
            }
            if self.frames == self.frames_when_armed {
                return Some(BodyTimedOut::Idle);
            }
            self.frames_when_armed = self.frames;
            let next = self.next_deadline(now);
            if let Some(deadline) = &mut self.deadline {
                deadline.reset(next);
            }
        }
    }
}

/// The error a response body yields when a timeout cuts it off.
#[derive(Debug, Clone, Copy, thiserror::Error)]
pub enum BodyTimedOut {
    #[error("the upstream response body was idle past the idle timeout")]
    Idle,
    #[error("the upstream response passed the route's timeout")]
    Total,
}

impl Upstream {
    /// Logs a failed call as a warning, at most ten lines a second per
    /// upstream, with the number of lines suppressed before this one.
    fn log_failure(&self, target: &Target, error: Option<&dyn std::fmt::Display>, message: &str) {
        target.log.warn(error, message);
    }
}

/// Logs the failed calls and response bodies of one target.
#[derive(Debug)]
struct FailureLog {
    upstream: String,
    target: SocketAddr,
    /// The limit on log lines, shared by the upstream's targets.
    throttle: Arc<LogThrottle>,
}

impl FailureLog {
    /// Logs a warning about the target, at most ten lines a second per
    /// upstream, with the number of lines suppressed before this one.
    fn warn(&self, error: Option<&dyn std::fmt::Display>, message: &str) {
        let target = self.target;
        let Some(suppressed) = self.throttle.admit() else {
            return;
        };
        match error {
            Some(error) => tracing::warn!(
                upstream = %self.upstream,
                %target,
                %error,
                suppressed,
                "{message}"
            ),
            None => tracing::warn!(upstream = %self.upstream, %target, suppressed, "{message}"),
        }
    }
}

/// A new connection to a target, before the HTTP handshake.
enum Connected {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Counts a connection to a target as open until it drops.
pub(crate) struct OpenConnection(Arc<AtomicUsize>);

impl OpenConnection {
    pub(crate) fn new(count: &Arc<AtomicUsize>) -> OpenConnection {
        count.fetch_add(1, Ordering::Relaxed);
        OpenConnection(count.clone())
    }
}

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Starts HTTP/1.1 on a new connection and spawns the task that drives it,
/// which keeps `open` until the connection closes.
async fn handshake<T>(
    io: T,
    open: OpenConnection,
) -> Result<http1::SendRequest<RequestBody>, hyper::Error>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (sender, connection) = http1::Builder::new().writev(false).handshake(io).await?;
    tokio::spawn(async move {
        // With upgrades, a 101 hands the connection to the response's
        // `hyper::upgrade::on`, which a WebSocket tunnel takes.
        if let Err(error) = connection.with_upgrades().await {
            tracing::debug!(%error, "upstream connection ended with an error");
        }
        drop(open);
    });
    Ok(sender)
}

/// Returns the first error of type `E` in the chain of causes of `error`.
fn find_cause<'a, E: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a E> {
    let mut cause = error.source();
    while let Some(inner) = cause {
        if let Some(found) = inner.downcast_ref::<E>() {
            return Some(found);
        }
        cause = inner.source();
    }
    None
}

/// Idle connections of one kind, indexed by target id.
type Pool<T> = RefCell<Vec<VecDeque<T>>>;

thread_local! {
    /// Idle hyper connections of this thread (TLS targets), each with the
    /// time it became idle.
    static IDLE: Pool<(Instant, http1::SendRequest<RequestBody>)> =
        const { RefCell::new(Vec::new()) };
    /// Idle plain HTTP/1.1 connections of this thread, each with the time it
    /// became idle.
    static IDLE_PLAIN: Pool<(Instant, h1::Connection)> = const { RefCell::new(Vec::new()) };
}

/// Adds an idle connection to the back of its target's list, unless the
/// list contains `max_idle` already.
fn push_idle<T>(pool: &Pool<T>, target: usize, connection: T, max_idle: usize) {
    let mut idle = pool.borrow_mut();
    if idle.len() <= target {
        idle.resize_with(target + 1, VecDeque::new);
    }
    let list = &mut idle[target];
    if list.len() < max_idle {
        list.push_back(connection);
    }
}

thread_local! {
    /// The [`close_idle_connections`] task of this thread, while it waits
    /// for a connection to be pooled.
    static IDLE_WATCHER: RefCell<Option<Waker>> = const { RefCell::new(None) };
}

/// Closes this thread's idle plain connections once their target closes
/// them or sends anything, so that none lingers half-closed in the pool.
/// Spawn one per serving thread.
///
/// No task drives an idle plain connection, so this one polls them all: when
/// one of their sockets turns readable, and once a second to watch the
/// connections pooled since. With the pool empty it waits for the next
/// connection to be pooled, so an idle node does not wake up.
pub async fn close_idle_connections() {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    std::future::poll_fn(|cx| {
        let pooled = IDLE_PLAIN.with_borrow_mut(|idle| {
            let mut pooled = false;
            for list in idle.iter_mut() {
                list.retain_mut(|(_, connection)| connection.poll_usable(cx));
                pooled |= !list.is_empty();
            }
            pooled
        });
        if pooled {
            while tick.poll_tick(cx).is_ready() {}
        } else {
            IDLE_WATCHER.with_borrow_mut(|watcher| *watcher = Some(cx.waker().clone()));
        }
        Poll::<()>::Pending
    })
    .await
}

/// Takes the longest-idle plain connection to a target that the target
/// has not closed and that has waited at most `keepalive`.
fn take_idle_plain(target: usize, keepalive: Duration) -> Option<h1::Connection> {
    loop {
        let (idle_since, mut connection) =
            IDLE_PLAIN.with_borrow_mut(|idle| idle.get_mut(target)?.pop_front())?;
        if idle_since.elapsed() <= keepalive && connection.is_usable() {
            return Some(connection);
        }
    }
}

/// Takes the longest-idle connection to a target that is still open, waiting
/// for it to finish its previous exchange if needed. The most recently
/// returned connection is often still finishing its last response, and
/// waiting for it costs a task wake-up: first-in first-out measured about
/// 0.9 µs per request less than last-in first-out (BENCHMARKS.md).
async fn take_idle(target: usize, keepalive: Duration) -> Option<http1::SendRequest<RequestBody>> {
    loop {
        let (idle_since, mut sender) =
            IDLE.with_borrow_mut(|idle| idle.get_mut(target)?.pop_front())?;
        if sender.is_closed() || idle_since.elapsed() > keepalive {
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
    IDLE.with(|pool| push_idle(pool, target, (Instant::now(), sender), max_idle));
}

/// A response body from an upstream that returns its connection to the pool
/// once the last frame has been read.
///
/// Boxed, because the response moves through several futures on its way to
/// the client, and a response this small moves without a call to `memcpy`.
/// The allocation costs less than those copies (callgrind).
pub struct PooledBody(Box<PooledState>);

/// The state of a [`PooledBody`].
pub struct PooledState {
    inner: Inner,
    /// The connection, until it goes back to the pool.
    sender: Option<http1::SendRequest<RequestBody>>,
    /// The target's id, for the pool.
    target: usize,
    log: Arc<FailureLog>,
    max_idle: usize,
    /// Marks the request in flight until the body ends or is dropped.
    in_flight: Option<InFlight>,
    timeouts: Option<BodyTimeouts>,
    /// How far the request's body has gone, when it had one.
    request_body: Option<Arc<BodyProgress>>,
    /// The names of the route's `response_headers`, removed from trailers.
    route_headers: Option<Arc<[HeaderName]>>,
    /// The names that the response head's `Connection` gave, removed from
    /// trailers.
    connection_named: Vec<HeaderName>,
}

/// A response body as the connection's client reads it.
enum Inner {
    /// From hyper's client: TLS targets and WebSocket handshakes.
    Hyper(Incoming),
    /// From a plain HTTP/1.1 connection, which the body carries.
    Plain(h1::ResponseBody<RequestBody>),
}

impl Inner {
    fn is_end_stream(&self) -> bool {
        match self {
            Inner::Hyper(body) => body.is_end_stream(),
            Inner::Plain(body) => body.is_end_stream(),
        }
    }
}

impl std::ops::Deref for PooledBody {
    type Target = PooledState;

    fn deref(&self) -> &PooledState {
        &self.0
    }
}

impl std::ops::DerefMut for PooledBody {
    fn deref_mut(&mut self) -> &mut PooledState {
        &mut self.0
    }
}

impl PooledBody {
    fn new(
        inner: Inner,
        sender: Option<http1::SendRequest<RequestBody>>,
        target: &Target,
        max_idle: usize,
        request_body: Option<Arc<BodyProgress>>,
    ) -> PooledBody {
        let mut body = PooledBody(Box::new(PooledState {
            inner,
            sender,
            target: target.id,
            log: target.log.clone(),
            max_idle,
            in_flight: None,
            timeouts: None,
            request_body,
            route_headers: None,
            connection_named: Vec::new(),
        }));
        body.release_if_done();
        body
    }

    /// Reads what has arrived of the body, up to 64 KiB, and drops it. A
    /// short response read whole, such as a retried 503, then returns its
    /// connection to the pool instead of closing it.
    fn discard(mut self) {
        let mut cx = Context::from_waker(Waker::noop());
        let mut budget: usize = 64 * 1024;
        while budget > 0 {
            let Poll::Ready(Some(Ok(frame))) = Pin::new(&mut self).poll_frame(&mut cx) else {
                return;
            };
            // A trailers frame counts as one byte, so the loop always ends.
            let size = frame.data_ref().map_or(0, Bytes::len);
            budget = budget.saturating_sub(size.max(1));
        }
    }

    fn watched(mut self, in_flight: Option<InFlight>, timeouts: Option<BodyTimeouts>) -> Self {
        if self.inner.is_end_stream() {
            return self;
        }
        self.in_flight = in_flight;
        self.timeouts = timeouts;
        self
    }
}

impl PooledState {
    /// Returns whether the connection's client left the hop-by-hop fields
    /// out of the response head.
    pub fn hop_by_hop_removed(&self) -> bool {
        match &self.inner {
            Inner::Hyper(_) => false,
            Inner::Plain(body) => body.hop_by_hop_removed(),
        }
    }

    /// Removes these names, a route's `response_headers`, from the body's
    /// trailers too.
    pub fn remove_route_headers_from_trailers(&mut self, names: &Arc<[HeaderName]>) {
        self.route_headers = Some(names.clone());
    }

    /// Removes these names, those that the response head's `Connection`
    /// gave, from the body's trailers.
    pub fn remove_connection_options_from_trailers(&mut self, names: Vec<HeaderName>) {
        self.connection_named = names;
    }

    fn release_if_done(&mut self) {
        if self.inner.is_end_stream() {
            self.in_flight = None;
            self.timeouts = None;
            // A plain connection returns only when the whole request went
            // out, so the rule below holds for it too.
            if let Inner::Plain(body) = &mut self.inner {
                if let Some(connection) = body.take_connection() {
                    let idle = (Instant::now(), connection);
                    IDLE_PLAIN.with(|pool| push_idle(pool, self.target, idle, self.max_idle));
                    // The watcher waits only while the pool is empty.
                    if let Some(watcher) = IDLE_WATCHER.with_borrow_mut(Option::take) {
                        watcher.wake();
                    }
                }
                return;
            }
            let Some(sender) = self.sender.take() else {
                return;
            };
            // An upstream that responded before reading the whole request
            // body, such as a 401 or a 413, leaves its connection busy
            // with the rest of it, which the client may send slowly or
            // never. Pooled, that connection would hold up the next
            // request on it until its timeout. It is dropped instead, and
            // the rest of the body is not sent.
            if let Some(progress) = &self.request_body {
                if !progress.sent.load(Ordering::Relaxed) {
                    progress.abandoned.store(true, Ordering::Relaxed);
                    return;
                }
            }
            put_idle(self.target, sender, self.max_idle);
        }
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self.get_mut().0;
        let mut polled = match &mut this.inner {
            Inner::Hyper(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
            Inner::Plain(body) => Pin::new(body).poll_frame(cx).map_err(BoxError::from),
        };
        match &mut polled {
            Poll::Ready(None) => this.release_if_done(),
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(trailers) = frame.trailers_mut() {
                    let named = this.connection_named.iter();
                    let route = this.route_headers.as_deref().unwrap_or_default();
                    filter_trailers(trailers, named.chain(route));
                }
                if let Some(timeouts) = &mut this.timeouts {
                    timeouts.frames += 1;
                }
                this.release_if_done();
            }
            // A broken body: the connection is not reusable. The client
            // sees its response cut short, so the node logs the cause.
            Poll::Ready(Some(Err(error))) => {
                this.sender = None;
                this.log
                    .warn(Some(&**error), "upstream response body failed");
            }
            Poll::Pending => {
                let expired = this.timeouts.as_mut().and_then(|t| t.poll_expired(cx));
                if let Some(expired) = expired {
                    this.log
                        .warn(Some(&expired), "cut off an upstream response body");
                    this.sender = None;
                    this.timeouts = None;
                    return Poll::Ready(Some(Err(Box::new(expired))));
                }
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Hyper(body) => body.size_hint(),
            Inner::Plain(body) => body.size_hint(),
        }
    }
}

/// Fields an upstream may not send as trailers, which HTTP/2 clients
/// receive. They are those that RFC 9110 (section 6.5.1) rules out, because
/// they frame, route, authenticate or control the response or describe its
/// content, and those the node sets itself on a response. An HTTP/2 client
/// fails a stream whose trailers hold `content-length`.
static NOT_TRAILERS: [&HeaderName; 31] = [
    &header::CONTENT_LENGTH,
    &header::CONTENT_TYPE,
    &header::CONTENT_ENCODING,
    &header::CONTENT_RANGE,
    &header::CONTENT_DISPOSITION,
    &header::CONTENT_LOCATION,
    &header::HOST,
    &header::AUTHORIZATION,
    &header::WWW_AUTHENTICATE,
    &header::PROXY_AUTHENTICATE,
    &header::COOKIE,
    &header::SET_COOKIE,
    &header::CACHE_CONTROL,
    &header::EXPIRES,
    &header::AGE,
    &header::LOCATION,
    &header::REFRESH,
    &header::RETRY_AFTER,
    &header::VARY,
    &header::VIA,
    &header::STRICT_TRANSPORT_SECURITY,
    &header::ALT_SVC,
    &crate::pipeline::X_FORWARDED_FOR,
    &crate::trace::X_REQUEST_ID,
    &crate::trace::TRACEPARENT,
    &crate::exchange::X_REQUEST_DURATION,
    &crate::exchange::X_GATEWAY_NODE,
    &crate::ratelimit::RATELIMIT_LIMIT,
    &crate::ratelimit::RATELIMIT_REMAINING,
    &crate::ratelimit::RATELIMIT_RESET,
    &crate::ratelimit::X_RATE_LIMIT_REMAINING,
];

/// Removes the hop-by-hop fields, those in [`NOT_TRAILERS`] and `names`
/// (those the response head's `Connection` gave, and the route's
/// `response_headers`) from an upstream's trailers.
fn filter_trailers<'a>(trailers: &mut HeaderMap, names: impl Iterator<Item = &'a HeaderName>) {
    crate::pipeline::remove_hop_by_hop(trailers);
    for &name in &NOT_TRAILERS {
        trailers.remove(name);
    }
    for name in names {
        trailers.remove(name);
    }
}

/// The body sent to the client: the upstream's, or one the node made.
pub enum ResponseBody {
    Upstream(PooledBody),
    Full(Full<Bytes>),
    /// A body that writes the access-log line when it ends.
    Logged(Box<crate::access_log::LoggedBody>),
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
            ResponseBody::Upstream(body) => Pin::new(body).poll_frame(cx),
            ResponseBody::Full(body) => Pin::new(body)
                .poll_frame(cx)
                .map_err(|never| match never {}),
            ResponseBody::Logged(body) => Pin::new(&mut **body).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ResponseBody::Upstream(body) => body.is_end_stream(),
            ResponseBody::Full(body) => body.is_end_stream(),
            ResponseBody::Logged(body) => body.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ResponseBody::Upstream(body) => body.size_hint(),
            ResponseBody::Full(body) => body.size_hint(),
            ResponseBody::Logged(body) => body.size_hint(),
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
/// route's size limit; or, for a request the node sends itself, no body or
/// a body kept whole in memory.
pub struct RequestBody {
    inner: Option<Incoming>,
    /// The whole body of a request the node sends itself, such as a worker's
    /// fetch, until it is sent.
    full: Option<Bytes>,
    limit: u64,
    seen: u64,
    /// How far the client's body has come, shared with the attempt and the
    /// response body. Only bodies that have bytes to come get one.
    progress: Option<Arc<BodyProgress>>,
}

/// How far a client's request body has gone upstream.
#[derive(Debug, Default)]
pub struct BodyProgress {
    /// Set while the node waits for the client's next bytes, so that a
    /// timeout can tell a slow client from a slow upstream.
    waiting: AtomicBool,
    /// Set once the last of the body went to the upstream connection.
    sent: AtomicBool,
    /// Set when the response ended before the body was sent: the upstream
    /// responded without reading it all. The rest is not sent, and the
    /// connection is closed rather than pooled, because hyper would keep it
    /// busy writing the rest while the pool hands it to another request.
    abandoned: AtomicBool,
}

/// The error a request body yields once its response has ended first.
#[derive(Debug, thiserror::Error)]
#[error("the upstream responded before it read the whole request body")]
struct ResponseEndedFirst;

impl RequestBody {
    /// Wraps a client body with the route's limit in bytes.
    pub fn new(inner: Incoming, limit: u64) -> RequestBody {
        let progress = (!inner.is_end_stream()).then(Arc::default);
        RequestBody {
            inner: Some(inner),
            full: None,
            limit,
            seen: 0,
            progress,
        }
    }

    /// Returns the progress of this body; `None` when it has no bytes to
    /// come from the client.
    pub fn progress(&self) -> Option<Arc<BodyProgress>> {
        self.progress.clone()
    }

    /// Creates an empty body.
    pub fn empty() -> RequestBody {
        RequestBody {
            inner: None,
            full: None,
            limit: 0,
            seen: 0,
            progress: None,
        }
    }

    /// Creates a body of these bytes, sent as one frame.
    pub fn full(bytes: Bytes) -> RequestBody {
        RequestBody {
            full: (!bytes.is_empty()).then_some(bytes),
            ..RequestBody::empty()
        }
    }

    /// Returns whether the body has no bytes left to send: none at all, or
    /// the client sent none.
    pub fn is_empty(&self) -> bool {
        self.full.is_none() && self.inner.as_ref().is_none_or(Body::is_end_stream)
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
        if let Some(bytes) = this.full.take() {
            return Poll::Ready(Some(Ok(Frame::data(bytes))));
        }
        let Some(inner) = &mut this.inner else {
            return Poll::Ready(None);
        };
        if let Some(progress) = &this.progress {
            if progress.abandoned.load(Ordering::Relaxed) {
                return Poll::Ready(Some(Err(Box::new(ResponseEndedFirst))));
            }
        }
        let polled = Pin::new(&mut *inner).poll_frame(cx);
        if let Some(progress) = &this.progress {
            progress
                .waiting
                .store(polled.is_pending(), Ordering::Relaxed);
            // hyper stops polling a body whose `is_end_stream` is true, so the
            // last frame may never be followed by a `None`.
            let ended = matches!(polled, Poll::Ready(None))
                || (matches!(polled, Poll::Ready(Some(Ok(_)))) && inner.is_end_stream());
            if ended {
                progress.sent.store(true, Ordering::Relaxed);
            }
        }
        let frame = match polled {
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
        self.is_empty()
    }

    fn size_hint(&self) -> SizeHint {
        match (&self.full, &self.inner) {
            (Some(bytes), _) => SizeHint::with_exact(bytes.len() as u64),
            (None, Some(inner)) => inner.size_hint(),
            (None, None) => SizeHint::with_exact(0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repeat_keeps_fields_in_order() {
        let mut request = Request::new(RequestBody::empty());
        *request.method_mut() = http::Method::PUT;
        *request.uri_mut() = http::Uri::from_static("/a/b?c=d");
        let headers = request.headers_mut();
        headers.append("x-one", http::HeaderValue::from_static("1"));
        headers.append("x-two", http::HeaderValue::from_static("first"));
        headers.append("x-two", http::HeaderValue::from_static(""));
        headers.append(
            "x-obs-text",
            http::HeaderValue::from_bytes(b"caf\xe9").expect("obs-text is a valid value"),
        );
        headers.append("x-two", http::HeaderValue::from_static("third"));
        headers.append(
            http::header::HOST,
            http::HeaderValue::from_static("example.com"),
        );

        let repeated = repeat(&copy_head(&request));
        assert_eq!(repeated.method(), http::Method::PUT);
        assert_eq!(repeated.uri(), "/a/b?c=d");
        assert_eq!(repeated.version(), request.version());
        let fields = |request: &Request<RequestBody>| {
            request
                .headers()
                .iter()
                .map(|(name, value)| (name.clone(), value.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(fields(&repeated), fields(&request));
    }

    #[test]
    fn repeat_of_empty_head() {
        let request = Request::new(RequestBody::empty());
        let repeated = repeat(&copy_head(&request));
        assert!(repeated.headers().is_empty());
        assert_eq!(repeated.uri(), "/");
    }
}
