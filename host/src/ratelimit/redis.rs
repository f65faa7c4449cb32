//! Global limits: one decision per Redis round trip, made by a Lua script
//! on the server (`decide.lua`) with the server's clock.
//!
//! Each serving thread keeps its own multiplexed connection, created in
//! the background on the thread's runtime, so a decision never crosses
//! threads. The script is loaded when a connection opens and called with
//! `EVALSHA`; a `NOSCRIPT` reply (a restarted or flushed server) loads it
//! again. A decision waits at most the configured timeout. A connection
//! that fails or times out is dropped. The next decision tries a new
//! connection at once and waits for it (within the timeout), so a restarted
//! server costs at most the decisions that found the old connection broken.
//! When that attempt fails too, the thread counts as "down": its decisions
//! fail at once, without waiting, while new connections are tried in the
//! background after a backoff of 100 ms, doubling to 2 s. A thread's first
//! connection is waited for as well, so a node that just started does not
//! fall back while it connects.
//!
//! On a single server, the decisions of one thread are sent in micro-batches
//! ([`super::batch`]): one `EVALSHA` decides up to [`super::batch::MAX_KEYS`]
//! requests. A cluster spreads keys over shards, so there each decision is
//! its own command.

use std::cell::RefCell;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use ::redis::aio::MultiplexedConnection;
use ::redis::cluster::ClusterClient;
use ::redis::cluster_async::ClusterConnection;
use ::redis::{AsyncConnectionConfig, Client, Cmd, ErrorKind, RedisError, ServerErrorKind};
use tokio::sync::Notify;
use tokio::time::Instant;

use super::batch::{self, Batcher, FlushSettings};
use super::{Decision, Shape};
use crate::config::RedisConfig;

/// The decision script.
pub const SCRIPT: &str = include_str!("decide.lua");

/// The separator of the decisions in the script's reply.
const DECISION_SEPARATOR: u8 = b',';

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(2);

/// The reason a global decision could not be made.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// The last connection failed and the next attempt is not due yet.
    #[error("redis is unreachable (retrying in the background)")]
    Down,
    /// No reply within the timeout.
    #[error("redis did not answer within {0:?}")]
    Timeout(Duration),
    #[error("redis error: {0}")]
    Redis(#[from] RedisError),
    #[error("unexpected reply from the rate-limit script: {0}")]
    Reply(String),
    /// The script could not decide for the request's key, such as one that
    /// contains a value of another type.
    #[error("redis cannot decide for this key: {0}")]
    Key(String),
}

/// The Redis server or cluster that global limits count in, shared by every
/// serving thread.
pub struct RedisBackend {
    /// Tells this backend's per-thread connections apart.
    id: usize,
    /// The name in log lines.
    pub description: Arc<str>,
    timeout: Duration,
    sha: String,
    /// Decisions sent to Redis; a batch carries several in one round trip.
    decisions_sent: AtomicU64,
    /// The script's hash, the timeout and the connector, for the batches.
    settings: FlushSettings,
}

/// Opens the serving threads' connections to Redis, for decisions and for
/// the batches that find their connection broken.
pub(super) struct Connector {
    target: Target,
    pub(super) description: Arc<str>,
    /// Whether a decision failed since Redis last replied, on any thread.
    /// The first reply after that is logged, once for the node.
    failed: AtomicBool,
    timeout: Duration,
    connect_timeout: Duration,
}

enum Target {
    Single(Client),
    Cluster(Box<ClusterClient>),
}

impl Target {
    /// Another handle to the same server or cluster.
    fn handle(&self) -> Target {
        match self {
            Target::Single(client) => Target::Single(client.clone()),
            Target::Cluster(client) => Target::Cluster(client.clone()),
        }
    }
}

/// The pause between the tries of a connection attempt that requests wait
/// for, while the server refuses connections.
const RETRY_PAUSE: Duration = Duration::from_millis(10);

/// Opens a connection to `target` and loads the script on it.
async fn open(target: Target, connect_timeout: Duration) -> Result<Connection, RedisError> {
    let mut connection = match target {
        Target::Single(client) => {
            let config = AsyncConnectionConfig::new()
                .set_connection_timeout(Some(connect_timeout))
                .set_response_timeout(None);
            Connection::Single(
                client
                    .get_multiplexed_async_connection_with_config(&config)
                    .await?,
            )
        }
        Target::Cluster(client) => Connection::Cluster(client.get_async_connection().await?),
    };
    connection.load_script().await?;
    Ok(connection)
}

#[derive(Clone)]
pub(super) enum Connection {
    Single(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl Connection {
    async fn query<T: ::redis::FromRedisValue>(&mut self, cmd: &Cmd) -> Result<T, RedisError> {
        match self {
            Connection::Single(c) => cmd.query_async(c).await,
            Connection::Cluster(c) => cmd.query_async(c).await,
        }
    }
}

/// One serving thread's connection to Redis.
pub(super) struct Link {
    state: Mutex<LinkState>,
    /// Whether the connection has replied since it was opened. Read with
    /// every reply, so it is an atomic beside the lock.
    replied: AtomicBool,
    /// Woken when a connection attempt ends.
    settled: Notify,
    /// The decisions waiting for the next batch.
    pub(super) batcher: Batcher,
}

enum LinkState {
    /// Nothing tried yet.
    Idle,
    /// An attempt is under way. With `wait`, the thread's first connection
    /// or the first attempt after a connection broke, decisions wait for it
    /// (within their timeout). Otherwise they fail at once, as while down.
    Connecting { wait: bool },
    Up {
        connection: Connection,
        generation: u64,
        /// The wait before the next attempt, should this connection time
        /// out before it ever replies.
        backoff: Duration,
    },
    Down {
        retry_at: Instant,
        backoff: Duration,
    },
}

static NEXT_ID: AtomicUsize = AtomicUsize::new(0);
static NEXT_GENERATION: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// This thread's links, by backend id.
    static LINKS: RefCell<Vec<Option<Arc<Link>>>> = const { RefCell::new(Vec::new()) };
}

impl RedisBackend {
    /// Creates a backend for the `[redis]` table. It connects lazily, on each
    /// serving thread's first global decision.
    pub fn new(config: &RedisConfig) -> Result<RedisBackend, String> {
        let (target, description) = match (&config.url, &config.cluster) {
            (Some(url), _) => {
                let client = Client::open(url.get_ref().as_str()).map_err(|e| e.to_string())?;
                (Target::Single(client), redacted(url.get_ref()))
            }
            (None, Some(nodes)) => {
                let client = ClusterClient::builder(nodes.get_ref().iter().map(String::as_str))
                    .connection_timeout(config.connect_timeout)
                    .response_timeout(config.timeout)
                    .retries(2)
                    .build()
                    .map_err(|e| e.to_string())?;
                let names: Vec<String> = nodes.get_ref().iter().map(|n| redacted(n)).collect();
                (
                    Target::Cluster(Box::new(client)),
                    format!("cluster {}", names.join(", ")),
                )
            }
            (None, None) => return Err("no Redis url or cluster".to_owned()),
        };
        let description: Arc<str> = Arc::from(description);
        let connector = Connector {
            target,
            description: description.clone(),
            failed: AtomicBool::new(false),
            timeout: config.timeout,
            connect_timeout: config.connect_timeout,
        };
        Ok(RedisBackend {
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
            description,
            timeout: config.timeout,
            sha: ::redis::Script::new(SCRIPT).get_hash().to_owned(),
            decisions_sent: AtomicU64::new(0),
            settings: FlushSettings {
                sha: Arc::from(::redis::Script::new(SCRIPT).get_hash()),
                timeout: config.timeout,
                connector: Arc::new(connector),
            },
        })
    }

    /// Decisions asked of Redis so far.
    pub fn decisions_sent(&self) -> u64 {
        self.decisions_sent.load(Ordering::Relaxed)
    }

    /// Notes that a decision failed, so that the next reply logs that Redis
    /// replies again.
    pub fn note_failure(&self) {
        self.settings
            .connector
            .failed
            .store(true, Ordering::Relaxed);
    }

    /// Decides one request of a limit for the state at the Redis key that
    /// `write_key` appends to a buffer; `spec` is the limit's
    /// [`ScriptSpec::decide`].
    pub async fn decide(
        &self,
        write_key: impl FnOnce(&mut Vec<u8>),
        spec: &Arc<str>,
    ) -> Result<Verdict, Failure> {
        let queued_at = Instant::now();
        let deadline = queued_at + self.timeout;
        let link = self.link();
        // The rare waits (a connection being opened, a cluster's own
        // command) are boxed, so that this future, which every global
        // decision creates and moves, stays small.
        if !link.single_up() {
            let connecting = self.settings.connector.connection(&link, deadline);
            let cluster = Box::pin(connecting).await?;
            if let Some((connection, generation)) = cluster {
                self.decisions_sent.fetch_add(1, Ordering::Relaxed);
                let mut key = Vec::new();
                write_key(&mut key);
                let alone = self.decide_alone(&link, connection, generation, &key, spec, deadline);
                return Box::pin(alone).await;
            }
        }
        self.decisions_sent.fetch_add(1, Ordering::Relaxed);
        // The batch's timer bounds the wait, so this needs no timer of its own.
        let start = || {
            tokio::spawn(batch::flush_loop(link.clone(), self.settings.clone()));
        };
        link.batcher.push(write_key, spec, queued_at, start).await
    }

    /// Decides one request with a command of its own (on a cluster).
    async fn decide_alone(
        &self,
        link: &Link,
        mut connection: Connection,
        generation: u64,
        key: &[u8],
        spec: &str,
        deadline: Instant,
    ) -> Result<Verdict, Failure> {
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(1).arg(key).arg(spec);
        let mut reply =
            tokio::time::timeout_at(deadline, connection.query::<::redis::Value>(&cmd)).await;
        if let Ok(Err(error)) = &reply {
            if error.kind() == ErrorKind::Server(ServerErrorKind::NoScript) {
                // The server lost its scripts (restarted or flushed) while
                // the connection stayed up.
                let load = async {
                    connection.load_script().await?;
                    connection.query::<::redis::Value>(&cmd).await
                };
                reply = tokio::time::timeout_at(deadline, load).await;
            }
        }
        match reply {
            Ok(Ok(reply)) => {
                link.note_reply(&self.settings.connector);
                reply_text(&reply).and_then(parse_decision)
            }
            Ok(Err(error)) => {
                // A server error reply leaves the connection usable; any
                // other error means it broke.
                if matches!(error.kind(), ErrorKind::Server(_) | ErrorKind::Extension) {
                    link.note_reply(&self.settings.connector);
                } else {
                    link.mark_broken(generation);
                }
                Err(Failure::Redis(error))
            }
            Err(_) => {
                link.mark_timed_out(generation);
                Err(Failure::Timeout(self.timeout))
            }
        }
    }

    /// Gives back the place a queued request of a leaky bucket took at
    /// `key`, because its client went away: in the background, at most one
    /// timeout later, and not at all while this thread's link is down.
    pub fn give_back(&self, key: Vec<u8>, spec: &ScriptSpec) {
        let Some(give_back) = &spec.give_back else {
            return;
        };
        let Some((mut connection, _)) = self.link().connection_now() else {
            return;
        };
        let mut cmd = ::redis::cmd("EVALSHA");
        cmd.arg(&self.sha).arg(1).arg(key).arg(&**give_back);
        let timeout = self.timeout;
        tokio::spawn(async move {
            let sent = connection.query::<::redis::Value>(&cmd);
            match tokio::time::timeout(timeout, sent).await {
                Ok(Ok(_)) => {}
                Ok(Err(error)) => {
                    tracing::debug!(%error, "failed to give back a queued request's place");
                }
                Err(_) => tracing::debug!("giving back a queued request's place timed out"),
            }
        });
    }

    /// This thread's link to Redis.
    fn link(&self) -> Arc<Link> {
        LINKS.with(|links| {
            let mut links = links.borrow_mut();
            if links.len() <= self.id {
                links.resize(self.id + 1, None);
            }
            links[self.id]
                .get_or_insert_with(|| {
                    Arc::new(Link {
                        state: Mutex::new(LinkState::Idle),
                        replied: AtomicBool::new(true),
                        settled: Notify::new(),
                        batcher: Batcher::default(),
                    })
                })
                .clone()
        })
    }
}

impl Connector {
    /// Waits until `deadline` for the thread's connection when it is being
    /// opened, and starts an attempt when one is due. Returns a connection to
    /// a cluster and its generation, or `None` for a connection to a single
    /// server, which only the link's batches use.
    pub(super) async fn connection(
        &self,
        link: &Arc<Link>,
        deadline: Instant,
    ) -> Result<Option<(Connection, u64)>, Failure> {
        // A connection that is up needs no registration for the end of an
        // attempt, so the common case skips it.
        if let LinkState::Up {
            connection,
            generation,
            ..
        } = &*link.state.lock().unwrap_or_else(PoisonError::into_inner)
        {
            return Ok(match connection {
                Connection::Single(_) => None,
                Connection::Cluster(_) => Some((connection.clone(), *generation)),
            });
        }
        loop {
            let settled = link.settled.notified();
            tokio::pin!(settled);
            {
                let mut state = link.state.lock().unwrap_or_else(PoisonError::into_inner);
                match &*state {
                    LinkState::Up {
                        connection: Connection::Single(_),
                        ..
                    } => return Ok(None),
                    LinkState::Up {
                        connection,
                        generation,
                        ..
                    } => return Ok(Some((connection.clone(), *generation))),
                    LinkState::Idle => {
                        *state = LinkState::Connecting { wait: true };
                        self.spawn_connect(link.clone(), FIRST_BACKOFF, true);
                    }
                    LinkState::Down { retry_at, backoff } => {
                        if Instant::now() < *retry_at {
                            return Err(Failure::Down);
                        }
                        // The first attempt after a connection broke is
                        // waited for, as the thread's first connection is:
                        // a restarted server is usually back by then.
                        // Later attempts run in the background.
                        let backoff = *backoff;
                        let right_after_break = backoff == FIRST_BACKOFF;
                        *state = LinkState::Connecting {
                            wait: right_after_break,
                        };
                        self.spawn_connect(link.clone(), backoff, right_after_break);
                        if !right_after_break {
                            return Err(Failure::Down);
                        }
                    }
                    LinkState::Connecting { wait: true } => {}
                    LinkState::Connecting { wait: false } => return Err(Failure::Down),
                }
                // Registered before the lock is released, so the end of the
                // attempt cannot be missed.
                settled.as_mut().enable();
            }
            if tokio::time::timeout_at(deadline, settled).await.is_err() {
                return Err(Failure::Timeout(self.timeout));
            }
        }
    }

    /// Opens a connection and loads the script on this thread's runtime.
    /// An attempt that requests wait for (`wait`) is bounded by their
    /// timeout, so a server that accepts connections but never replies
    /// delays them once, not for the whole connect timeout.
    fn spawn_connect(&self, link: Arc<Link>, backoff: Duration, wait: bool) {
        let connect_timeout = if wait {
            self.timeout.min(self.connect_timeout)
        } else {
            self.connect_timeout
        };
        let description = self.description.clone();
        let deadline = Instant::now() + connect_timeout;
        let target = self.target.handle();
        let try_timeout = self.connect_timeout;
        tokio::spawn(async move {
            let result = loop {
                let opening = open(target.handle(), try_timeout);
                match tokio::time::timeout_at(deadline, opening).await {
                    Ok(Ok(connection)) => break Ok(connection),
                    // A server restarting right after the connection broke
                    // refuses connections for a few milliseconds, so an
                    // attempt that requests wait for tries again within
                    // their timeout.
                    Ok(Err(error))
                        if wait
                            && error.is_connection_refusal()
                            && Instant::now() + RETRY_PAUSE < deadline =>
                    {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    Ok(Err(error)) => break Err(Failure::Redis(error)),
                    Err(_) => break Err(Failure::Timeout(connect_timeout)),
                }
            };
            let mut state = link.state.lock().unwrap_or_else(PoisonError::into_inner);
            *state = match result {
                Ok(connection) => {
                    // A server that accepts connections but does not reply
                    // (CLIENT PAUSE, as during a failover) connects every
                    // time, so the link counts as back once it replies.
                    tracing::debug!(redis = %description, "connected to redis");
                    link.replied.store(false, Ordering::Relaxed);
                    LinkState::Up {
                        connection,
                        generation: NEXT_GENERATION.fetch_add(1, Ordering::Relaxed),
                        backoff,
                    }
                }
                Err(error) => {
                    tracing::debug!(redis = %description, %error, "cannot connect to redis");
                    LinkState::Down {
                        retry_at: Instant::now() + backoff,
                        backoff: (backoff * 2).min(MAX_BACKOFF),
                    }
                }
            };
            drop(state);
            link.settled.notify_waiters();
        });
    }
}

impl Link {
    /// Returns whether the connection to a single server is up, so that a
    /// decision can join the next batch without waiting.
    fn single_up(&self) -> bool {
        matches!(
            &*self.state.lock().unwrap_or_else(PoisonError::into_inner),
            LinkState::Up {
                connection: Connection::Single(_),
                ..
            }
        )
    }

    /// Returns the connection when it is up, without waiting.
    pub(super) fn connection_now(&self) -> Option<(Connection, u64)> {
        match &*self.state.lock().unwrap_or_else(PoisonError::into_inner) {
            LinkState::Up {
                connection,
                generation,
                ..
            } => Some((connection.clone(), *generation)),
            _ => None,
        }
    }

    /// Returns the connection to a single server when it is up.
    pub(super) fn single_connection(&self) -> Option<(MultiplexedConnection, u64)> {
        match self.connection_now()? {
            (Connection::Single(connection), generation) => Some((connection, generation)),
            (Connection::Cluster(_), _) => None,
        }
    }

    /// Notes that the connection replied. The first reply on any thread
    /// after a decision failed is logged.
    pub(super) fn note_reply(&self, connector: &Connector) {
        if !self.replied.load(Ordering::Relaxed) {
            self.replied.store(true, Ordering::Relaxed);
        }
        if connector.failed.load(Ordering::Relaxed)
            && connector.failed.swap(false, Ordering::Relaxed)
        {
            tracing::info!(redis = %connector.description, "redis replies again");
        }
    }

    /// Drops the connection of `generation` after it broke, unless a newer
    /// one has replaced it. The next request tries a new connection at once
    /// and waits for it. Later attempts back off.
    pub(super) fn mark_broken(&self, generation: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        if matches!(&*state, LinkState::Up { generation: current, .. } if *current == generation) {
            *state = LinkState::Down {
                retry_at: Instant::now(),
                backoff: FIRST_BACKOFF,
            };
        }
    }

    /// Drops the connection of `generation` after a command on it timed
    /// out, unless a newer one has replaced it. A connection that replied
    /// before is treated as broken. One that never replied was opened to a
    /// server that accepts connections but does not reply. The link then
    /// backs off from where it was, and requests fail at once until the
    /// next attempt, instead of each waiting out the timeout on a new
    /// connection.
    pub(super) fn mark_timed_out(&self, generation: u64) {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let LinkState::Up {
            generation: current,
            backoff,
            ..
        } = &*state
        else {
            return;
        };
        if *current != generation {
            return;
        }
        let backoff = *backoff;
        *state = if self.replied.load(Ordering::Relaxed) {
            LinkState::Down {
                retry_at: Instant::now(),
                backoff: FIRST_BACKOFF,
            }
        } else {
            LinkState::Down {
                retry_at: Instant::now() + backoff,
                backoff: (backoff * 2).min(MAX_BACKOFF),
            }
        };
    }
}

/// The script arguments of one limit's requests, formatted once per limit:
/// the algorithm and its parameters in microseconds.
#[derive(Debug, Clone)]
pub struct ScriptSpec {
    /// The argument that decides a request.
    pub decide: Arc<str>,
    /// The argument that gives back a queued request's place (buckets only).
    pub give_back: Option<Arc<str>>,
    /// A bucket's argument without its lease size (buckets only).
    bucket: Option<Arc<str>>,
}

impl ScriptSpec {
    /// Formats the argument that decides a request of a bucket and takes a
    /// lease of `size` requests instead of the limit's.
    pub fn with_lease(&self, size: u64) -> String {
        match &self.bucket {
            Some(bucket) => format!("{bucket} {size}"),
            None => self.decide.to_string(),
        }
    }

    /// Formats the arguments of a limit of `shape`. A bucket takes `lease`
    /// requests at once (1 for one at a time).
    pub fn of(shape: &Shape, lease: u64) -> ScriptSpec {
        match *shape {
            Shape::Bucket {
                interval_ns,
                burst,
                queue,
            } => {
                // With the fraction: a Lua number is a double.
                let interval_us = interval_ns as f64 / 1000.0;
                let bucket = format!("1 {interval_us} {burst} {queue}");
                ScriptSpec {
                    decide: format!("{bucket} {lease}").into(),
                    give_back: Some(format!("4 {interval_us}").into()),
                    bucket: Some(bucket.into()),
                }
            }
            Shape::FixedWindow { limit, window_ns } => ScriptSpec {
                decide: format!("2 {} {limit}", window_ns / 1000).into(),
                give_back: None,
                bucket: None,
            },
            Shape::SlidingWindow { limit, window_ns } => ScriptSpec {
                decide: format!("3 {} {limit}", window_ns / 1000).into(),
                give_back: None,
                bucket: None,
            },
        }
    }
}

impl Connection {
    async fn load_script(&mut self) -> Result<(), RedisError> {
        match self {
            Connection::Single(c) => load_script(c).await,
            Connection::Cluster(c) => load_script(c).await,
        }
    }
}

/// Loads the decision script on `connection`.
pub(super) async fn load_script(
    connection: &mut impl ::redis::aio::ConnectionLike,
) -> Result<(), RedisError> {
    let mut load = ::redis::cmd("SCRIPT");
    load.arg("LOAD").arg(SCRIPT);
    load.query_async::<::redis::Value>(connection).await?;
    Ok(())
}

/// Returns the text of one reply of the script.
pub(super) fn reply_text(reply: &::redis::Value) -> Result<&[u8], Failure> {
    use ::redis::Value;
    match reply {
        Value::BulkString(bytes) => Ok(bytes.as_slice()),
        Value::SimpleString(text) => Ok(text.as_bytes()),
        Value::ServerError(error) => Err(Failure::Redis(error.clone().into())),
        _ => Err(Failure::Reply(format!("{reply:?}"))),
    }
}

/// Splits the text of one reply of the script into the decisions of its
/// keys, in order.
pub(super) fn split_decisions(text: &[u8]) -> impl Iterator<Item = &[u8]> {
    text.split(|&byte| byte == DECISION_SEPARATOR)
}

/// One decision of the script.
#[derive(Debug, Clone, Copy)]
pub struct Verdict {
    pub decision: Decision,
    /// The requests the decision took: 0 when refused, 1 without a lease,
    /// up to the lease with one.
    pub granted: u64,
}

/// Parses one decision of the script's reply.
pub(super) fn parse_decision(text: &[u8]) -> Result<Verdict, Failure> {
    if let Some(error) = text.strip_prefix(b"E ") {
        return Err(Failure::Key(String::from_utf8_lossy(error).into_owned()));
    }
    let Some(values) = parse_fields(text) else {
        return Err(Failure::Reply(String::from_utf8_lossy(text).into_owned()));
    };
    Ok(Verdict {
        decision: decision(&values[..6])?,
        granted: u64::try_from(values[6]).unwrap_or(0),
    })
}

/// The digits that always fit in an `i64`, so that the parse of a longer
/// field only checks for overflow.
const SAFE_DIGITS: u32 = 18;

/// Parses the seven fields of one decision: optionally negative decimal
/// integers, such as the script's `%d` output, separated by single spaces.
/// Returns `None` for anything else or on overflow.
fn parse_fields(text: &[u8]) -> Option<[i64; 7]> {
    let mut values = [0i64; 7];
    // The field being parsed, its magnitude so far, whether it has a minus
    // sign and how many digits it has.
    let mut field = 0;
    let mut magnitude: i64 = 0;
    let mut negative = false;
    let mut digits = 0;
    for &byte in text {
        if byte.is_ascii_digit() {
            let digit = i64::from(byte - b'0');
            magnitude = if digits < SAFE_DIGITS {
                magnitude * 10 + digit
            } else {
                magnitude.checked_mul(10)?.checked_add(digit)?
            };
            digits += 1;
            continue;
        }
        match byte {
            b'-' if digits == 0 && !negative => negative = true,
            b' ' if digits > 0 && field + 1 < values.len() => {
                values[field] = if negative { -magnitude } else { magnitude };
                field += 1;
                magnitude = 0;
                negative = false;
                digits = 0;
            }
            _ => return None,
        }
    }
    if digits == 0 || field + 1 != values.len() {
        return None;
    }
    values[field] = if negative { -magnitude } else { magnitude };
    Some(values)
}

/// Turns the script's values into a decision, from microseconds to
/// nanoseconds.
fn decision(values: &[i64]) -> Result<Decision, Failure> {
    let &[allowed, limit, remaining, reset_us, retry_us, delay_us] = values else {
        return Err(Failure::Reply(format!("{values:?}")));
    };
    let ns = |us: i64| u64::try_from(us).unwrap_or(0).saturating_mul(1000);
    let count = |n: i64| u64::try_from(n).unwrap_or(0);
    Ok(Decision {
        allowed: allowed == 1,
        limit: count(limit),
        remaining: count(remaining),
        reset_ns: ns(reset_us),
        retry_after_ns: ns(retry_us),
        delay_ns: ns(delay_us),
    })
}

/// Removes the password from a Redis URL, for logs.
fn redacted(url: &str) -> String {
    match url.split_once("://").and_then(|(scheme, rest)| {
        let (auth, host) = rest.rsplit_once('@')?;
        let user = auth.split(':').next().unwrap_or("");
        Some(format!("{scheme}://{user}:***@{host}"))
    }) {
        Some(safe) => safe,
        None => url.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passwords_stay_out_of_logs() {
        assert_eq!(
            redacted("redis://user:secret@10.0.0.1:6379/0"),
            "redis://user:***@10.0.0.1:6379/0"
        );
        assert_eq!(redacted("redis://127.0.0.1"), "redis://127.0.0.1");
    }

    #[test]
    fn script_replies_become_decisions() {
        let d = decision(&[1, 10, 7, 2_500_000, 0, 100]).unwrap();
        assert!(d.allowed);
        assert_eq!((d.limit, d.remaining), (10, 7));
        assert_eq!(d.reset_ns, 2_500_000_000);
        assert_eq!(d.delay_ns, 100_000);
        assert!(decision(&[1, 2]).is_err());
    }

    #[test]
    fn script_arguments_carry_the_lease() {
        let bucket = Shape::Bucket {
            interval_ns: 1500,
            burst: 10,
            queue: 0,
        };
        let spec = ScriptSpec::of(&bucket, 8);
        assert_eq!(&*spec.decide, "1 1.5 10 0 8");
        assert_eq!(spec.with_lease(2), "1 1.5 10 0 2");
        assert_eq!(spec.give_back.as_deref(), Some("4 1.5"));
        let window = Shape::FixedWindow {
            limit: 100,
            window_ns: 60_000_000_000,
        };
        assert_eq!(&*ScriptSpec::of(&window, 1).decide, "2 60000000 100");
    }

    #[test]
    fn text_replies_become_decisions() {
        use ::redis::Value;
        let reply = Value::BulkString(b"0 10 0 2500000 400000 0 0,1 10 6 1 0 0 4".to_vec());
        let text = reply_text(&reply).unwrap();
        let verdicts: Vec<Verdict> = split_decisions(text)
            .map(|d| parse_decision(d).unwrap())
            .collect();
        assert_eq!(verdicts.len(), 2);
        assert!(verdicts[1].decision.allowed);
        assert_eq!((verdicts[0].granted, verdicts[1].granted), (0, 4));
        let d = &verdicts[0].decision;
        assert!(!d.allowed);
        assert_eq!(d.retry_after_ns, 400_000_000);
        assert_eq!(
            parse_fields(b"-12 0 1 22 333 -4444 999999999999999999"),
            Some([-12, 0, 1, 22, 333, -4444, 999_999_999_999_999_999])
        );
        assert_eq!(
            parse_fields(b"-9223372036854775807 0 0 0 0 0 9223372036854775807"),
            Some([-i64::MAX, 0, 0, 0, 0, 0, i64::MAX])
        );
        assert_eq!(parse_fields(b"1 0 0 0 0 0 9223372036854775808"), None);
        assert_eq!(
            parse_fields(b"1 0 0 0 0 0 00000000000000000000001"),
            Some([1, 0, 0, 0, 0, 0, 1])
        );
        assert_eq!(parse_fields(b"1 0 0 0 0 0 -"), None);
        assert_eq!(parse_fields(b"1 0 0 0 0 0 1.5"), None);
        assert_eq!(parse_fields(b"1 0 0 0 0 0 1-"), None);
        for bad in [
            "1 10 7",
            "1 10 7 2 0 0",
            "1 10 7 2 0 0 1 9",
            "1 10 x 2 0 0 1",
            "1  10 7 2 0 0 1",
            "1 10 7 2 0 0 1 ",
            " 1 10 7 2 0 0 1",
            "1 10 7 2 0 0 -",
            "1 10 7 2 0 0 --1",
            "",
        ] {
            assert!(
                matches!(parse_decision(bad.as_bytes()), Err(Failure::Reply(_))),
                "{bad}"
            );
        }
        let array = Value::Array(vec![Value::Int(1)]);
        assert!(matches!(reply_text(&array), Err(Failure::Reply(_))));
    }
}
