//! Rate limits: the host counts requests itself, before workers and the
//! upstream, per node ([`local`]) or across nodes in Redis ([`redis`]).
//!
//! A route has any number of limits, each with an algorithm, a rate, a key
//! and a scope. A limit runs as soon as its key is known: every key kind
//! today (client address, header, route) is known before the first worker,
//! so all limits run there, in config order. The first that rejects a
//! request sends 429, and the earlier limits still count the request.
//!
//! Algorithms, all with the same arithmetic locally and in Redis:
//!
//! - token bucket: GCRA, the bucket holds `burst` requests and refills at
//!   the rate;
//! - leaky bucket: the same meter with a default burst of 1, so requests
//!   leave at a constant rate; in queue mode a request that comes too soon
//!   waits for its turn, up to `queue` requests deep, instead of being
//!   refused, and gives its place back when its client goes away
//!   ([`queue`]);
//! - fixed window: a count per window aligned to the clock (Unix time);
//!   up to twice the limit can pass around a window's edge;
//! - sliding window: weighted counters, the previous window's count
//!   weighted by the part of it still inside the sliding window plus the
//!   current count. Exact when the previous window's requests were spread
//!   evenly; at worst (all of them at its very end) it admits up to twice the
//!   limit in one sliding window, like a fixed window, but never more than
//!   the limit in one fixed window.

mod batch;
mod lease;
pub mod local;
mod queue;
pub mod redis;

use std::fmt;
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::header::{HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::config::LimitConfig;
use crate::context::RequestContext;
use crate::error::Refusal;
use lease::Leases;
use local::LocalTable;
use redis::RedisBackend;

/// The environment variable that shifts the rate-limit clock of a node, for
/// tests only: a signed duration such as `300s` or `-5m`. Global limits use
/// Redis's clock, so they ignore it; it proves that.
pub const CLOCK_OFFSET_ENV: &str = "EDGE_TEST_CLOCK_OFFSET";

/// Client keys a limit keeps counts for unless `max_keys` is set.
pub const DEFAULT_MAX_KEYS: usize = 100_000;

/// How often a failing global limit logs that it falls back.
const FALLBACK_LOG_INTERVAL: Duration = Duration::from_secs(10);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    TokenBucket,
    LeakyBucket,
    FixedWindow,
    SlidingWindow,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    #[default]
    Local,
    Global,
}

/// The behaviour of a global limit while Redis is unreachable or too slow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FailMode {
    /// Count on this node, with a local limiter of the same shape.
    #[default]
    FailOpen,
    /// Send 503 `ratelimit_unavailable`.
    FailClosed,
}

/// The behaviour of a leaky bucket for a request that comes too soon.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LeakyMode {
    #[default]
    Reject,
    Queue,
}

/// The part of a request that a limit counts requests by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeySource {
    /// The client's address, after trusted proxies' `X-Forwarded-For`.
    ClientIp,
    /// One count for the whole route.
    Route,
    /// A request header's value as the client sent it; requests without the
    /// header are counted by client address.
    Header(HeaderName),
    /// A request context value that a worker set, such as the user id that
    /// jwt-auth sets as `user`. The limit runs right after the first worker
    /// that sets it, before the next worker. Requests on which no worker set
    /// it are counted by client address, before the upstream is called or a
    /// worker's own response is sent.
    Context(String),
}

impl KeySource {
    fn parse(text: &str) -> Result<KeySource, String> {
        match text {
            "ip" => Ok(KeySource::ClientIp),
            "route" => Ok(KeySource::Route),
            _ => {
                if let Some(name) = text.strip_prefix("header:") {
                    return HeaderName::from_bytes(name.as_bytes())
                        .map(KeySource::Header)
                        .map_err(|_| format!("{name:?} is not a valid header name"));
                }
                if let Some(name) = text.strip_prefix("context:") {
                    crate::context::check_name(name)?;
                    return Ok(KeySource::Context(name.to_owned()));
                }
                Err(format!(
                    "{text:?} is not a key; use ip, route, header:NAME (such as \
                     header:x-api-key) or context:NAME (such as context:user)"
                ))
            }
        }
    }

    /// Returns the name of the context value this key reads, if it reads
    /// one; such a limit runs after workers instead of before them.
    pub fn context_name(&self) -> Option<&str> {
        match self {
            KeySource::Context(name) => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for KeySource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeySource::ClientIp => f.write_str("ip"),
            KeySource::Route => f.write_str("route"),
            KeySource::Header(name) => write!(f, "header:{name}"),
            KeySource::Context(name) => write!(f, "context:{name}"),
        }
    }
}

/// Requests per period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub period: Duration,
    /// Whether the period was written as a unit, such as `s` or `min`.
    unit: Option<&'static str>,
}

impl Rate {
    /// The maximum count of requests per period.
    pub const MAX_COUNT: u64 = 1_000_000_000;

    /// Parses `10/s`, `100/min`, `1000/h`, `50000/day` or `5/10s`.
    pub fn parse(text: &str) -> Result<Rate, String> {
        let usage = || {
            format!(
                "{text:?} is not a rate; write requests per period, such as 10/s, 100/min, \
                 1000/h, 50000/day or 5/10s"
            )
        };
        let (count, per) = text.split_once('/').ok_or_else(usage)?;
        let count: u64 = count.trim().parse().map_err(|_| usage())?;
        let per = per.trim();
        let unit = match per {
            "s" | "sec" | "second" => Some(("s", 1)),
            "m" | "min" | "minute" => Some(("min", 60)),
            "h" | "hour" => Some(("h", 3600)),
            "d" | "day" => Some(("day", 86_400)),
            _ => None,
        };
        let (unit, period) = match unit {
            Some((name, seconds)) => (Some(name), Duration::from_secs(seconds)),
            None => (None, humantime::parse_duration(per).map_err(|_| usage())?),
        };
        if !(1..=Self::MAX_COUNT).contains(&count) {
            return Err(format!(
                "{text:?}: the count must be from 1 to {}",
                Self::MAX_COUNT
            ));
        }
        if period < Duration::from_millis(1) || period > Duration::from_secs(366 * 86_400) {
            return Err(format!("{text:?}: the period must be from 1ms to 366 days"));
        }
        if period.as_nanos() < u128::from(count) {
            return Err(format!("{text:?} is more than one request per nanosecond"));
        }
        Ok(Rate {
            count,
            period,
            unit,
        })
    }

    fn period_ns(&self) -> u64 {
        self.period.as_nanos() as u64
    }
}

impl fmt::Display for Rate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.unit {
            Some(unit) => write!(f, "{}/{unit}", self.count),
            None => write!(
                f,
                "{}/{}",
                self.count,
                humantime::format_duration(self.period)
            ),
        }
    }
}

/// The arithmetic of a limit, shared by the local limiter and the Redis
/// script.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shape {
    /// A token or leaky bucket (GCRA): one request per `interval_ns`,
    /// `burst` at once, and up to `queue` more that wait for their turn.
    Bucket {
        interval_ns: u64,
        burst: u64,
        queue: u64,
    },
    FixedWindow {
        limit: u64,
        window_ns: u64,
    },
    SlidingWindow {
        limit: u64,
        window_ns: u64,
    },
}

/// One limit's decision on one request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// `RateLimit-Limit`: the requests the limit admits at once.
    pub limit: u64,
    /// Requests that would still be admitted now, after this one.
    pub remaining: u64,
    /// Until the limit is back to its full quota.
    pub reset_ns: u64,
    /// When refused: until a request would be admitted.
    pub retry_after_ns: u64,
    /// Leaky bucket in queue mode: how long this request waits its turn.
    pub delay_ns: u64,
}

/// A limit as configured, checked.
#[derive(Debug, Clone)]
pub struct LimitSpec {
    pub name: Arc<str>,
    pub key: KeySource,
    pub algorithm: Algorithm,
    pub rate: Rate,
    pub shape: Shape,
    pub scope: Scope,
    pub fail: FailMode,
    pub max_keys: usize,
    /// The requests a node takes from Redis at once for one key; 1 for a
    /// decision per request.
    pub lease: u64,
}

/// A config error: the byte offset to point at, the field and the message.
pub type SpecError = (Option<usize>, &'static str, String);

impl LimitSpec {
    /// Checks a `[[routes.limits]]` entry.
    pub fn parse(config: &LimitConfig) -> Result<LimitSpec, SpecError> {
        let at = |span: std::ops::Range<usize>| Some(span.start);
        let key = KeySource::parse(config.key.get_ref())
            .map_err(|m| (at(config.key.span()), "key", m))?;
        let rate =
            Rate::parse(config.rate.get_ref()).map_err(|m| (at(config.rate.span()), "rate", m))?;
        let algorithm = *config.algorithm.get_ref();
        let is_bucket = matches!(algorithm, Algorithm::TokenBucket | Algorithm::LeakyBucket);
        if let (Some(burst), false) = (&config.burst, is_bucket) {
            let message = "`burst` applies to token_bucket and leaky_bucket only; a window \
                           admits the rate's count per window";
            return Err((at(burst.span()), "burst", message.to_owned()));
        }
        if algorithm != Algorithm::LeakyBucket {
            if let Some(mode) = &config.mode {
                let message = "`mode` applies to leaky_bucket only";
                return Err((at(mode.span()), "mode", message.to_owned()));
            }
            if let Some(queue) = &config.queue {
                let message = "`queue` applies to leaky_bucket in queue mode only";
                return Err((at(queue.span()), "queue", message.to_owned()));
            }
        }
        let mode = config
            .mode
            .as_ref()
            .map(|m| *m.get_ref())
            .unwrap_or_default();
        let queue = match (&config.queue, mode) {
            (Some(queue), LeakyMode::Queue) => {
                let size = *queue.get_ref();
                if !(1..=1_000_000).contains(&size) {
                    let message = "must be from 1 to 1000000".to_owned();
                    return Err((at(queue.span()), "queue", message));
                }
                size
            }
            (Some(queue), LeakyMode::Reject) => {
                let message = "`queue` needs mode = \"queue\"; in reject mode a request that \
                               comes too soon is refused"
                    .to_owned();
                return Err((at(queue.span()), "queue", message));
            }
            (None, LeakyMode::Queue) => {
                let message =
                    "queue mode needs `queue`, the most requests that may wait".to_owned();
                return Err((
                    config.mode.as_ref().map(|m| m.span().start),
                    "queue",
                    message,
                ));
            }
            (None, LeakyMode::Reject) => 0,
        };
        let default_burst = if algorithm == Algorithm::TokenBucket {
            rate.count
        } else {
            1
        };
        let burst = match &config.burst {
            Some(burst) => {
                let value = *burst.get_ref();
                if !(1..=Rate::MAX_COUNT).contains(&value) {
                    let message = format!("must be from 1 to {}", Rate::MAX_COUNT);
                    return Err((at(burst.span()), "burst", message));
                }
                value
            }
            None => default_burst,
        };
        let shape = match algorithm {
            Algorithm::TokenBucket | Algorithm::LeakyBucket => Shape::Bucket {
                interval_ns: rate.period_ns() / rate.count,
                burst,
                queue,
            },
            Algorithm::FixedWindow => Shape::FixedWindow {
                limit: rate.count,
                window_ns: rate.period_ns(),
            },
            Algorithm::SlidingWindow => Shape::SlidingWindow {
                limit: rate.count,
                window_ns: rate.period_ns(),
            },
        };
        let scope = config.scope;
        if let (Some(fail), Scope::Local) = (&config.on_redis_error, scope) {
            let message = "`on_redis_error` applies to global limits only".to_owned();
            return Err((at(fail.span()), "on_redis_error", message));
        }
        let max_keys = match &config.max_keys {
            Some(max) => {
                let value = *max.get_ref();
                if !(1..=100_000_000).contains(&value) {
                    let message = "must be from 1 to 100000000".to_owned();
                    return Err((at(max.span()), "max_keys", message));
                }
                value
            }
            None => DEFAULT_MAX_KEYS,
        };
        let lease = match &config.lease {
            Some(lease) => {
                let value = *lease.get_ref();
                let refusal = if scope == Scope::Local {
                    Some("`lease` applies to global limits only".to_owned())
                } else if algorithm != Algorithm::TokenBucket {
                    Some(
                        "`lease` applies to token_bucket only: a bucket takes back the \
                         requests a node leased and did not use, a window cannot"
                            .to_owned(),
                    )
                } else if !(1..=burst).contains(&value) {
                    Some(format!("must be from 1 to {burst}, the bucket's burst"))
                } else {
                    None
                };
                if let Some(message) = refusal {
                    return Err((at(lease.span()), "lease", message));
                }
                value
            }
            None => 1,
        };
        let name = match &config.name {
            Some(name) => {
                let text = name.get_ref();
                if text.is_empty() || text.chars().any(char::is_control) {
                    let message = "must be non-empty, without control characters".to_owned();
                    return Err((at(name.span()), "name", message));
                }
                text.clone()
            }
            None => format!("{key} {rate}"),
        };
        Ok(LimitSpec {
            name: Arc::from(name),
            key,
            algorithm,
            rate,
            shape,
            scope,
            fail: config
                .on_redis_error
                .as_ref()
                .map(|f| *f.get_ref())
                .unwrap_or_default(),
            max_keys,
            lease,
        })
    }

    /// Describes the limit in one line for `routes explain`.
    pub fn describe(&self) -> String {
        let mut text = match (self.algorithm, self.shape) {
            (Algorithm::TokenBucket, Shape::Bucket { burst, .. }) => {
                format!("token bucket {}, burst {burst}", self.rate)
            }
            (Algorithm::LeakyBucket, Shape::Bucket { burst, queue, .. }) => {
                let mut text = format!("leaky bucket {}", self.rate);
                if burst > 1 {
                    text.push_str(&format!(", burst {burst}"));
                }
                if queue > 0 {
                    text.push_str(&format!(", up to {queue} requests wait their turn"));
                } else {
                    text.push_str(", requests that come too soon are refused");
                }
                text
            }
            (Algorithm::FixedWindow, _) => format!("fixed window {}", self.rate),
            _ => format!("sliding window {} (weighted counters)", self.rate),
        };
        let key = match &self.key {
            KeySource::ClientIp => "per client address".to_owned(),
            KeySource::Route => "for the whole route".to_owned(),
            KeySource::Header(name) => {
                format!("per value of header {name} (else per client address)")
            }
            KeySource::Context(name) => {
                format!("per context value {name} that a worker sets (else per client address)")
            }
        };
        text.push_str(&format!(", {key}"));
        match self.scope {
            Scope::Local => text.push_str(&format!(
                ", local to this node (up to {} keys)",
                self.max_keys
            )),
            Scope::Global => text.push_str(match self.fail {
                FailMode::FailOpen => {
                    ", global in Redis; counts on this node while Redis is unreachable"
                }
                FailMode::FailClosed => ", global in Redis; 503 while Redis is unreachable",
            }),
        }
        if self.lease > 1 {
            text.push_str(&format!(
                "; leases {} requests at a time from Redis per key",
                self.lease
            ));
        }
        text
    }
}

/// Checks that `url` is a Redis URL the client accepts.
pub fn check_redis_url(url: &str) -> Result<(), String> {
    use ::redis::IntoConnectionInfo as _;
    // The client's own message names neither a port out of range nor port
    // 0, which it accepts.
    if let Some(port) = url_port(url) {
        match port.parse::<u16>() {
            Ok(0) => return Err(format!("{url:?} has port 0; a client cannot connect to it")),
            Ok(_) => {}
            Err(_) => {
                return Err(format!(
                    "{url:?} has port {port}; the port must be at most 65535"
                ))
            }
        }
    }
    url.into_connection_info()
        .map(|_| ())
        .map_err(|e| format!("{url:?} is not a Redis URL ({e}); write redis://HOST:PORT/DB"))
}

/// Returns the digits of a `redis://` or `rediss://` URL's port, if it
/// has one.
fn url_port(url: &str) -> Option<&str> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))?;
    let authority = rest.split(['/', '?', '#']).next()?;
    let host_port = authority
        .rsplit_once('@')
        .map_or(authority, |(_, host)| host);
    let port = match host_port.strip_prefix('[') {
        Some(bracketed) => bracketed.split_once("]:")?.1,
        None => host_port.rsplit_once(':')?.1,
    };
    (!port.is_empty() && port.bytes().all(|b| b.is_ascii_digit())).then_some(port)
}

/// The rate-limit clock: Unix time in nanoseconds, advancing with the
/// monotonic clock.
pub trait Clock: Send + Sync {
    fn now_ns(&self) -> u64;

    /// Returns the time of `instant` on this clock. A clock that does not
    /// follow the monotonic clock, such as a test's, returns its current
    /// time instead.
    fn at_ns(&self, _instant: std::time::Instant) -> u64 {
        self.now_ns()
    }
}

/// The node's clock, anchored to the system time at start and then
/// monotonic, shifted by [`CLOCK_OFFSET_ENV`] when a test sets it.
pub struct SystemClock {
    anchor_ns: u64,
    start: std::time::Instant,
}

impl SystemClock {
    pub fn new(offset: i128) -> SystemClock {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as i128);
        SystemClock {
            anchor_ns: (unix + offset).max(0) as u64,
            start: std::time::Instant::now(),
        }
    }

    /// Reads the test-only offset from the environment.
    pub fn from_env() -> Result<SystemClock, String> {
        let Ok(text) = std::env::var(CLOCK_OFFSET_ENV) else {
            return Ok(SystemClock::new(0));
        };
        let (sign, magnitude) = match text.strip_prefix('-') {
            Some(rest) => (-1, rest),
            None => (1, text.trim_start_matches('+')),
        };
        let offset = humantime::parse_duration(magnitude)
            .map_err(|e| format!("{CLOCK_OFFSET_ENV}={text:?}: {e}"))?;
        tracing::warn!(offset = %text, "the rate-limit clock is shifted for a test");
        Ok(SystemClock::new(sign * offset.as_nanos() as i128))
    }
}

impl Clock for SystemClock {
    fn now_ns(&self) -> u64 {
        self.at_ns(std::time::Instant::now())
    }

    fn at_ns(&self, instant: std::time::Instant) -> u64 {
        // Whole seconds and nanoseconds in u64, without `as_nanos`'s u128.
        let elapsed = instant.saturating_duration_since(self.start);
        self.anchor_ns + elapsed.as_secs() * 1_000_000_000 + u64::from(elapsed.subsec_nanos())
    }
}

/// Admits one log line per interval.
#[derive(Debug, Default)]
pub struct IntervalLog {
    next_ns: AtomicU64,
    suppressed: AtomicU64,
}

impl IntervalLog {
    /// `Some(events suppressed since the last line)` when a line is due.
    pub fn admit(&self, now_ns: u64, interval: Duration) -> Option<u64> {
        let next = self.next_ns.load(Ordering::Relaxed);
        if now_ns >= next
            && self
                .next_ns
                .compare_exchange(
                    next,
                    now_ns + interval.as_nanos() as u64,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                )
                .is_ok()
        {
            return Some(self.suppressed.swap(0, Ordering::Relaxed));
        }
        self.suppressed.fetch_add(1, Ordering::Relaxed);
        None
    }
}

/// The node's rate limiting: its clock and its Redis backend.
pub struct RateLimiter {
    clock: Arc<dyn Clock>,
    backend: Option<Arc<RedisBackend>>,
    key_prefix: String,
}

impl RateLimiter {
    pub fn new(
        clock: Arc<dyn Clock>,
        redis: Option<&crate::config::RedisConfig>,
    ) -> Result<RateLimiter, String> {
        let backend = match redis {
            Some(config) => Some(Arc::new(RedisBackend::new(config)?)),
            None => None,
        };
        Ok(RateLimiter {
            clock,
            backend,
            key_prefix: redis.map_or_else(|| "edge".to_owned(), |r| r.key_prefix.clone()),
        })
    }

    /// The rate-limit clock.
    pub fn clock(&self) -> &dyn Clock {
        self.clock.as_ref()
    }

    /// Returns the Redis backend, when the config has one.
    pub fn backend(&self) -> Option<&RedisBackend> {
        self.backend.as_deref()
    }

    /// Builds the runtime limit of `spec` on route `route`.
    pub fn limit(&self, route: &str, spec: LimitSpec) -> Limit {
        let global = match (spec.scope, &self.backend) {
            (Scope::Global, Some(backend)) => Some(Global {
                backend: backend.clone(),
                // The hash tag contains the route, the limit and the client
                // key, so that a cluster spreads clients over its shards
                // while each decision touches one slot.
                key_head: format!(
                    "{}:rl:{{{}:{}:",
                    self.key_prefix,
                    escape(route),
                    escape(&spec.name)
                ),
                key_tail: match spec.shape {
                    Shape::Bucket { .. } => "}:gcra",
                    Shape::FixedWindow { .. } => "}:fw",
                    Shape::SlidingWindow { .. } => "}:sw",
                },
                script: redis::ScriptSpec::of(&spec.shape, spec.lease),
                leases: match spec.shape {
                    Shape::Bucket { interval_ns, .. } if spec.lease > 1 => {
                        Some(Leases::new(interval_ns, spec.lease, spec.max_keys))
                    }
                    _ => None,
                },
                fallbacks: AtomicU64::new(0),
                log: IntervalLog::default(),
            }),
            _ => None,
        };
        Limit {
            local: LocalTable::new(spec.shape, spec.max_keys),
            global,
            spec,
            counts: DecisionCounts::default(),
        }
    }

    /// Decides the limits of `which` at once, as [`RateLimiter::check`]
    /// does, when every one of them is local and none queues requests.
    /// Otherwise returns `None` without changing anything, and `check` must
    /// decide. Local limits then need no future of their own, which would
    /// make every request's future larger.
    pub fn check_now(
        &self,
        limits: &[Limit],
        which: LimitSet,
        request: &KeyInput<'_>,
        shown: &mut Option<Shown>,
    ) -> Option<Result<(), Refusal>> {
        let chosen = || {
            limits
                .iter()
                .enumerate()
                .filter(move |(index, _)| which.contains(*index))
                .map(|(_, limit)| limit)
        };
        if !chosen().all(Limit::decides_now) {
            return None;
        }
        for limit in chosen() {
            let decided = limit
                .decide_local(self.clock.as_ref(), request)
                .and_then(|(decision, _)| limit.note(&decision, shown));
            if decided.is_err() {
                return Some(decided);
            }
        }
        Some(Ok(()))
    }

    /// Runs, in order, the limits of `limits` whose bit is set in `which`
    /// (bit `i` for `limits[i]`). Returns the refusal of the first that
    /// refuses; otherwise waits out the longest queue delay. `shown` is
    /// updated to the limit that decides the response headers: the refusing
    /// one, else the one with the fewest requests remaining.
    pub async fn check(
        &self,
        limits: &[Limit],
        which: LimitSet,
        request: &KeyInput<'_>,
        shown: &mut Option<Shown>,
    ) -> Result<(), Refusal> {
        let mut delay_ns = 0;
        let mut places = queue::Places::new(self.clock.as_ref(), request);
        let chosen = limits
            .iter()
            .enumerate()
            .filter(|(index, _)| which.contains(*index))
            .map(|(_, limit)| limit);
        for limit in chosen {
            let (decision, counted) = limit.decide(self.clock.as_ref(), request).await?;
            limit.note(&decision, shown)?;
            if decision.delay_ns > 0 {
                places.hold(limit, counted);
                delay_ns = delay_ns.max(decision.delay_ns);
            }
        }
        if delay_ns > 0 {
            // Dropped here when the client goes away: `places` then gives
            // the queue places back. Boxed, because only queued requests
            // sleep and the timer would make every decision's future larger.
            Box::pin(tokio::time::sleep(Duration::from_nanos(delay_ns))).await;
            places.release();
        }
        Ok(())
    }
}

/// Appends `tag` and the first 128 bits of the SHA-256 of `bytes` in hex, so
/// that keys stay short and API keys are not stored.
fn push_digest(key: &mut Vec<u8>, tag: &[u8], bytes: &[u8]) {
    key.extend_from_slice(tag);
    let digest = Sha256::digest(bytes);
    key.extend_from_slice(hex::encode(&digest[..16]).as_bytes());
}

/// Escapes the characters that structure a Redis key.
fn escape(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '%' | ':' | '{' | '}' => out.push_str(&format!("%{:02X}", c as u32)),
            _ => out.push(c),
        }
    }
    out
}

/// The parts of a request that limits take their keys from.
pub struct KeyInput<'a> {
    /// When the node received the request. Local limits decide at this
    /// time, which saves reading the clock again for each limit.
    pub received: std::time::Instant,
    pub client_ip: IpAddr,
    pub headers: &'a HeaderMap,
    pub context: &'a RequestContext,
}

/// A set of a route's limits, as a bit per limit index.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LimitSet(u64);

impl LimitSet {
    /// The maximum number of limits on one route, one per bit.
    pub const MAX_LIMITS: usize = 64;

    /// Returns the set of `limits` for which `select` is true.
    pub fn of(limits: &[Limit], select: impl Fn(&Limit) -> bool) -> LimitSet {
        let mut bits = 0;
        for (index, limit) in limits.iter().enumerate().take(Self::MAX_LIMITS) {
            if select(limit) {
                bits |= 1 << index;
            }
        }
        LimitSet(bits)
    }

    /// Returns whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// Returns whether the limit at `index` is in the set.
    pub fn contains(self, index: usize) -> bool {
        index < Self::MAX_LIMITS && self.0 & (1 << index) != 0
    }

    /// Returns the limits of this set whose context value `context` holds.
    pub fn ready(self, limits: &[Limit], context: &RequestContext) -> LimitSet {
        let mut bits = 0;
        for (index, limit) in limits.iter().enumerate() {
            let known = limit
                .spec
                .key
                .context_name()
                .is_some_and(|name| context.get(name).is_some());
            if self.contains(index) && known {
                bits |= 1 << index;
            }
        }
        LimitSet(bits)
    }

    /// Returns this set without the limits of `other`.
    pub fn without(self, other: LimitSet) -> LimitSet {
        LimitSet(self.0 & !other.0)
    }
}

/// A limit of a route, ready to decide.
pub struct Limit {
    pub spec: LimitSpec,
    /// The local limiter, or a global limit's fallback.
    local: LocalTable,
    global: Option<Global>,
    /// Decisions made, for metrics and the status page.
    pub counts: DecisionCounts,
}

/// The decisions of one limit since the node started, and the local key it
/// decided last, whose fill level the status page shows.
#[derive(Debug, Default)]
pub struct DecisionCounts {
    pub allowed: AtomicU64,
    pub rejected: AtomicU64,
    /// The local table's hash of the key decided last; 0 before the first.
    last_key: AtomicU64,
}

impl DecisionCounts {
    fn count(&self, allowed: bool) {
        let counter = if allowed {
            &self.allowed
        } else {
            &self.rejected
        };
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// How full a limit is for one key: requests it would admit now, of `limit`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fill {
    pub available: u64,
    pub limit: u64,
}

struct Global {
    backend: Arc<RedisBackend>,
    key_head: String,
    key_tail: &'static str,
    /// The script's arguments for each request.
    script: redis::ScriptSpec,
    /// Requests taken from Redis ahead, when the limit leases them.
    leases: Option<Leases>,
    /// Decisions made on this node because Redis was unavailable.
    fallbacks: AtomicU64,
    log: IntervalLog,
}

impl fmt::Debug for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Limit")
            .field("spec", &self.spec)
            .finish_non_exhaustive()
    }
}

/// The part of a request a limit counts it by.
enum KeyValue<'a> {
    Ip(IpAddr),
    /// A header's value.
    Bytes(&'a [u8]),
    /// A request context value.
    Context(&'a [u8]),
    Route,
}

/// The store a decision was counted in, so that a queued request can give
/// its place back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Counted {
    /// In the local table, under this key hash.
    Local(u64),
    /// In Redis.
    Global,
}

impl Limit {
    /// Returns whether a decision of this limit never waits, because the
    /// limit is local and does not queue requests.
    fn decides_now(&self) -> bool {
        self.global.is_none() && !self.spec.shape.queues()
    }

    /// Counts `decision` and updates `shown`; returns the refusal when the
    /// decision denies the request.
    fn note(&self, decision: &Decision, shown: &mut Option<Shown>) -> Result<(), Refusal> {
        self.counts.count(decision.allowed);
        let this = Shown::of(decision);
        if !decision.allowed {
            *shown = Some(this);
            return Err(Refusal::RateLimited {
                limit: self.spec.name.clone(),
                retry_after: seconds_ceil(decision.retry_after_ns).max(1),
            });
        }
        if shown.is_none_or(|s| this.remaining < s.remaining) {
            *shown = Some(this);
        }
        Ok(())
    }

    /// Decides a local limit at the request's arrival time.
    fn decide_local(
        &self,
        clock: &dyn Clock,
        request: &KeyInput<'_>,
    ) -> Result<(Decision, Counted), Refusal> {
        let value = self.key_value(request)?;
        let key = self.local_key(&value);
        // A load first: most requests of a busy limit come from the key
        // decided last, and a store would bounce the cache line.
        if self.counts.last_key.load(Ordering::Relaxed) != key {
            self.counts.last_key.store(key, Ordering::Relaxed);
        }
        let now = clock.at_ns(request.received);
        Ok((self.local.decide(key, now), Counted::Local(key)))
    }

    async fn decide(
        &self,
        clock: &dyn Clock,
        request: &KeyInput<'_>,
    ) -> Result<(Decision, Counted), Refusal> {
        let Some(global) = &self.global else {
            return self.decide_local(clock, request);
        };
        let value = self.key_value(request)?;
        // The node's leases of this limit and the key's hash in them. When
        // this request is the one of its key that calls Redis, `asking` is
        // the guard that wakes the others when it is done.
        let mut leased = None;
        let mut asking = None;
        // The script's argument when this request takes a smaller lease than
        // the limit's.
        let mut smaller: Option<Arc<str>> = None;
        // Set when the request this one waited for found Redis unavailable:
        // asking again would double the wait.
        let mut unavailable = false;
        if let Some(leases) = &global.leases {
            let key = self.local_key(&value);
            leased = Some((leases, key));
            let mut waited = false;
            loop {
                match leases.take(key, clock.now_ns(), waited) {
                    lease::Take::Decided(decision) => return Ok((decision, Counted::Global)),
                    lease::Take::Ask { size } => {
                        asking = Some(lease::Asking::new(leases, key));
                        if size < self.spec.lease {
                            smaller = Some(Arc::from(global.script.with_lease(size)));
                        }
                        break;
                    }
                    lease::Take::Unavailable => {
                        unavailable = true;
                        break;
                    }
                    // A request waits for one other request's reply at most.
                    // If that brought nothing it can use, it calls Redis
                    // alongside the current caller, so a limit whose leases
                    // do not outlive a round trip costs one round trip, as
                    // without a lease. It requests a lease of one, because a
                    // full lease for each of a burst's requests would take
                    // most of the bucket to this node, where it expires
                    // unused.
                    lease::Take::Wait(_) if waited => {
                        if self.spec.lease > 1 {
                            smaller = Some(Arc::from(global.script.with_lease(1)));
                        }
                        break;
                    }
                    lease::Take::Wait(answered) => {
                        // The asking request's Redis timeout bounds the
                        // wait: it wakes this one when it is done or dropped.
                        // Boxed, because most decisions do not wait and the
                        // future of each would grow by its size.
                        waited = true;
                        Box::pin(answered).await;
                    }
                }
            }
        }
        let spec = smaller.as_ref().unwrap_or(&global.script.decide);
        let outcome = if unavailable {
            Err(redis::Failure::Down)
        } else {
            let write_key = |key: &mut Vec<u8>| global.push_redis_key(&value, key);
            global.backend.decide(write_key, spec).await
        };
        let failure = match outcome {
            Ok(verdict) => {
                let decision = match leased {
                    Some((leases, key)) => {
                        leases.keep(key, clock.now_ns(), verdict.decision, verdict.granted)
                    }
                    None => verdict.decision,
                };
                drop(asking);
                return Ok((decision, Counted::Global));
            }
            Err(failure) => failure,
        };
        if let Some(asking) = &mut asking {
            asking.failed = true;
        }
        drop(asking);
        // Redis replied to a key it cannot decide for: no outage.
        if !matches!(failure, redis::Failure::Key(_)) {
            global.backend.note_failure();
        }
        let fallbacks = global.fallbacks.fetch_add(1, Ordering::Relaxed) + 1;
        let now = clock.now_ns();
        if global.log.admit(now, FALLBACK_LOG_INTERVAL).is_some() {
            tracing::warn!(
                limit = %self.spec.name,
                redis = %global.backend.description,
                error = %failure,
                fallbacks,
                "global rate limit has no decision from redis; {}",
                match self.spec.fail {
                    FailMode::FailOpen => "counting on this node",
                    FailMode::FailClosed => "answering 503",
                }
            );
        }
        match self.spec.fail {
            FailMode::FailOpen => {
                let key = self.local_key(&value);
                Ok((self.local.decide(key, now), Counted::Local(key)))
            }
            FailMode::FailClosed => Err(Refusal::RateLimitUnavailable {
                limit: self.spec.name.clone(),
            }),
        }
    }

    /// Gives back the queue place a request took in the store `counted`
    /// names, when the request will not leave (see [`queue`]).
    fn give_back(&self, counted: Counted, clock: &dyn Clock, request: &KeyInput<'_>) {
        match (counted, &self.global) {
            (Counted::Local(key), _) => self.local.give_back(key, clock.now_ns()),
            (Counted::Global, Some(global)) => {
                // The request was counted, so its key was valid then too.
                if let Ok(value) = self.key_value(request) {
                    let key = global.redis_key(&value);
                    global.backend.give_back(key, &global.script);
                }
            }
            (Counted::Global, None) => {}
        }
    }

    /// Decisions of this global limit made on this node because Redis was
    /// unavailable.
    pub fn fallbacks(&self) -> u64 {
        self.global
            .as_ref()
            .map_or(0, |g| g.fallbacks.load(Ordering::Relaxed))
    }

    /// Returns the fill level of a local limit for the key it decided last
    /// (for a `route` key, its only key), without counting a request; `None`
    /// for a global limit or before the first decision.
    // TODO: a global limit's level lives in Redis; reading it needs a round trip per scrape.
    pub fn fill(&self, clock: &dyn Clock) -> Option<Fill> {
        if self.global.is_some() {
            return None;
        }
        let key = self.counts.last_key.load(Ordering::Relaxed);
        if key == 0 {
            return None;
        }
        let (available, limit) = self.local.level(key, clock.now_ns());
        Some(Fill { available, limit })
    }

    /// Returns the number of client keys the node keeps counts for.
    pub fn local_keys(&self) -> usize {
        self.local.len()
    }

    /// Returns the value this limit counts `request` by. A key header sent
    /// more than once is rejected: counting one of its values would let a
    /// client pass a fresh value in the other on every request.
    fn key_value<'a>(&self, request: &'a KeyInput<'_>) -> Result<KeyValue<'a>, Refusal> {
        Ok(match &self.spec.key {
            KeySource::ClientIp => KeyValue::Ip(request.client_ip),
            KeySource::Route => KeyValue::Route,
            KeySource::Header(name) => {
                let mut values = request.headers.get_all(name).iter();
                match (values.next(), values.next()) {
                    (Some(value), None) => KeyValue::Bytes(value.as_bytes()),
                    (None, _) => KeyValue::Ip(request.client_ip),
                    (Some(_), Some(_)) => {
                        return Err(Refusal::RepeatedKeyHeader {
                            limit: self.spec.name.clone(),
                            header: name.to_string(),
                        })
                    }
                }
            }
            KeySource::Context(name) => match request.context.get(name) {
                Some(value) => KeyValue::Context(value.as_bytes()),
                None => KeyValue::Ip(request.client_ip),
            },
        })
    }

    fn local_key(&self, value: &KeyValue<'_>) -> u64 {
        match value {
            KeyValue::Ip(IpAddr::V4(ip)) => self.local.hash_ipv4(4, *ip),
            KeyValue::Ip(IpAddr::V6(ip)) => self.local.hash(6, &ip.octets()),
            KeyValue::Bytes(bytes) => self.local.hash(1, bytes),
            KeyValue::Context(bytes) => self.local.hash(2, bytes),
            KeyValue::Route => self.local.hash(0, &[]),
        }
    }
}

impl Global {
    /// Builds the Redis key of a client, as [`Global::push_redis_key`] does.
    fn redis_key(&self, value: &KeyValue<'_>) -> Vec<u8> {
        let mut key = Vec::with_capacity(self.key_head.len() + 48);
        self.push_redis_key(value, &mut key);
        key
    }

    /// Appends the Redis key of a client to `key`: the client address as
    /// text, a header value as the first 128 bits of its SHA-256 (so API
    /// keys are not stored), or `route`.
    fn push_redis_key(&self, value: &KeyValue<'_>, key: &mut Vec<u8>) {
        use std::io::Write as _;
        key.extend_from_slice(self.key_head.as_bytes());
        match value {
            KeyValue::Ip(IpAddr::V4(ip)) => {
                // By hand: formatting through `Display` costs more.
                key.extend_from_slice(b"ip=");
                for (index, octet) in ip.octets().into_iter().enumerate() {
                    if index > 0 {
                        key.push(b'.');
                    }
                    push_decimal(key, octet);
                }
            }
            KeyValue::Ip(ip) => {
                // Writing to a `Vec` cannot fail.
                let _ = write!(key, "ip={ip}");
            }
            KeyValue::Bytes(bytes) => push_digest(key, b"h=", bytes),
            KeyValue::Context(bytes) => push_digest(key, b"c=", bytes),
            KeyValue::Route => key.extend_from_slice(b"route"),
        }
        key.extend_from_slice(self.key_tail.as_bytes());
    }
}

fn push_decimal(out: &mut Vec<u8>, value: u8) {
    if value >= 100 {
        out.push(b'0' + value / 100);
    }
    if value >= 10 {
        out.push(b'0' + value / 10 % 10);
    }
    out.push(b'0' + value % 10);
}

/// The state of the limit the response headers describe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shown {
    pub limit: u64,
    pub remaining: u64,
    pub reset_secs: u64,
}

pub(crate) static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub(crate) static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub(crate) static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");
pub(crate) static X_RATE_LIMIT_REMAINING: HeaderName =
    HeaderName::from_static("x-rate-limit-remaining");

impl Shown {
    fn of(decision: &Decision) -> Shown {
        Shown {
            limit: decision.limit,
            remaining: if decision.allowed {
                decision.remaining
            } else {
                0
            },
            reset_secs: seconds_ceil(decision.reset_ns),
        }
    }

    /// Sets `RateLimit-Limit`, `RateLimit-Remaining`, `RateLimit-Reset`
    /// and `X-Rate-Limit-Remaining`, replacing any the upstream sent.
    pub fn apply(&self, headers: &mut HeaderMap) {
        let remaining = number(self.remaining);
        headers.insert(RATELIMIT_LIMIT.clone(), number(self.limit));
        headers.insert(RATELIMIT_REMAINING.clone(), remaining.clone());
        headers.insert(RATELIMIT_RESET.clone(), number(self.reset_secs));
        headers.insert(X_RATE_LIMIT_REMAINING.clone(), remaining);
    }
}

/// Header values of the numbers below this are made once and shared.
const SMALL_NUMBERS: usize = 4096;

/// Converts a number to a header value without an allocation of its own:
/// one of the values made once below [`SMALL_NUMBERS`], else one cut from
/// the thread's buffer of node-made values.
fn number(value: u64) -> HeaderValue {
    static SMALL: std::sync::LazyLock<Vec<HeaderValue>> = std::sync::LazyLock::new(|| {
        let mut text = String::new();
        let mut ends = Vec::with_capacity(SMALL_NUMBERS);
        for n in 0..SMALL_NUMBERS {
            text.push_str(&n.to_string());
            ends.push(text.len());
        }
        // Made once per process, so the values can borrow it for ever.
        let text: &'static str = Box::leak(text.into_boxed_str());
        let mut start = 0;
        ends.into_iter()
            .map(|end| {
                let value = HeaderValue::from_static(&text[start..end]);
                start = end;
                value
            })
            .collect()
    });
    match SMALL.get(value as usize) {
        Some(value) => value.clone(),
        None => crate::header_value::shared(itoa::Buffer::new().format(value).as_bytes())
            .expect("digits are a valid header value"),
    }
}

/// Whole seconds, rounded up.
fn seconds_ceil(ns: u64) -> u64 {
    ns.div_ceil(1_000_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_with_units_and_durations() {
        let rate = Rate::parse("10/s").unwrap();
        assert_eq!((rate.count, rate.period), (10, Duration::from_secs(1)));
        assert_eq!(
            Rate::parse("100/min").unwrap().period,
            Duration::from_secs(60)
        );
        assert_eq!(
            Rate::parse("1000/h").unwrap().period,
            Duration::from_secs(3600)
        );
        assert_eq!(
            Rate::parse("5/10s").unwrap().period,
            Duration::from_secs(10)
        );
        assert_eq!(Rate::parse("5/10s").unwrap().to_string(), "5/10s");
        assert_eq!(Rate::parse("100/minute").unwrap().to_string(), "100/min");
        for bad in ["10", "x/s", "0/s", "10/fortnight", "10/0s", "2000000000/s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn keys_parse() {
        assert_eq!(KeySource::parse("ip").unwrap(), KeySource::ClientIp);
        assert_eq!(
            KeySource::parse("header:X-Api-Key").unwrap(),
            KeySource::Header(HeaderName::from_static("x-api-key"))
        );
        assert!(KeySource::parse("header:bad name").is_err());
        assert_eq!(
            KeySource::parse("context:user").unwrap(),
            KeySource::Context("user".to_owned())
        );
        assert!(KeySource::parse("context:User").is_err());
        assert!(KeySource::parse("context:").is_err());
        assert!(KeySource::parse("value:user")
            .unwrap_err()
            .contains("context:NAME"));
        assert!(KeySource::parse("cookie").is_err());
    }

    #[test]
    fn redis_keys_are_hash_tagged_per_client() {
        let limiter = RateLimiter {
            clock: Arc::new(SystemClock::new(0)),
            backend: Some(Arc::new(
                RedisBackend::new(&crate::config::RedisConfig {
                    url: Some(toml::Spanned::new(0..0, "redis://127.0.0.1:1".to_owned())),
                    cluster: None,
                    timeout: Duration::from_millis(5),
                    connect_timeout: Duration::from_millis(5),
                    key_prefix: "edge".to_owned(),
                })
                .unwrap(),
            )),
            key_prefix: "edge".to_owned(),
        };
        let spec = LimitSpec {
            name: Arc::from("per:ip"),
            key: KeySource::ClientIp,
            algorithm: Algorithm::FixedWindow,
            rate: Rate::parse("10/s").unwrap(),
            shape: Shape::FixedWindow {
                limit: 10,
                window_ns: 1_000_000_000,
            },
            scope: Scope::Global,
            fail: FailMode::FailOpen,
            max_keys: 10,
            lease: 1,
        };
        let limit = limiter.limit("api{v1}", spec);
        let global = limit.global.as_ref().unwrap();
        let redis_key = |value: KeyValue<'_>| String::from_utf8(global.redis_key(&value)).unwrap();
        let ip: IpAddr = "203.0.113.9".parse().unwrap();
        assert_eq!(
            redis_key(KeyValue::Ip(ip)),
            "edge:rl:{api%7Bv1%7D:per%3Aip:ip=203.0.113.9}:fw"
        );
        for text in ["0.0.0.0", "10.20.30.40", "255.255.255.255", "1.100.9.99"] {
            let ip: IpAddr = text.parse().unwrap();
            assert!(redis_key(KeyValue::Ip(ip)).contains(&format!(":ip={text}}}")));
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        assert!(redis_key(KeyValue::Ip(v6)).contains(":ip=2001:db8::1}"));
        let header = redis_key(KeyValue::Bytes(b"secret-key"));
        assert!(!header.contains("secret"), "{header}");
        assert_eq!(
            header.len(),
            "edge:rl:{api%7Bv1%7D:per%3Aip:h=}:fw".len() + 32
        );
        let mut appended = b"earlier".to_vec();
        global.push_redis_key(&KeyValue::Route, &mut appended);
        assert_eq!(appended, b"earlieredge:rl:{api%7Bv1%7D:per%3Aip:route}:fw");
    }

    #[test]
    fn headers_show_the_decision() {
        let mut headers = HeaderMap::new();
        Shown {
            limit: 10,
            remaining: 3,
            reset_secs: 7,
        }
        .apply(&mut headers);
        assert_eq!(headers["ratelimit-limit"], "10");
        assert_eq!(headers["ratelimit-remaining"], "3");
        assert_eq!(headers["ratelimit-reset"], "7");
        assert_eq!(headers["x-rate-limit-remaining"], "3");
        assert_eq!(number(0), "0");
        assert_eq!(number(4095), "4095");
        assert_eq!(number(4096), "4096");
        assert_eq!(number(u64::MAX), u64::MAX.to_string().as_str());
        assert_eq!(seconds_ceil(1), 1);
        assert_eq!(seconds_ceil(2_000_000_000), 2);
    }
}
