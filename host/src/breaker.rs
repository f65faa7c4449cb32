//! Circuit breakers, one per upstream target: closed while the target
//! responds, open (every request refused at once) after it fails too often,
//! and half-open after a cool-down, when a bounded number of probe requests
//! decide whether it closes again.
//!
//! The state is shared by every serving thread. Reading it is one atomic
//! load, and counting a response while closed is one or two atomic updates.
//! Failures that may change the state, and every half-open probe, take a
//! mutex for a few instructions, never across an await.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Settings of the breakers of one upstream.
#[derive(Debug, Clone)]
pub struct BreakerSettings {
    /// Consecutive failures that open the breaker; 0 turns this trigger off.
    pub consecutive_failures: u32,
    /// The failure fraction (0 to 1) over `window` that opens the breaker;
    /// `None` turns this trigger off.
    pub error_rate: Option<f64>,
    /// The rolling window of the error rate.
    pub window: Duration,
    /// Requests the window must contain before the error rate counts.
    pub min_requests: u32,
    /// The first cool-down before probes go through.
    pub cool_down: Duration,
    /// The maximum cool-down; the cool-down doubles each time a probe fails.
    pub max_cool_down: Duration,
    /// Probe requests allowed at once while half-open; this many successes
    /// close the breaker.
    pub half_open_probes: u32,
}

/// The three states of a breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Closed = 0,
    Open = 1,
    HalfOpen = 2,
}

impl State {
    /// The name used in logs and on the admin listener.
    pub fn name(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }

    fn from_u8(value: u8) -> State {
        match value {
            1 => State::Open,
            2 => State::HalfOpen,
            _ => State::Closed,
        }
    }
}

/// Buckets of the rolling window.
const BUCKETS: usize = 10;

/// The circuit breaker of one target.
#[derive(Debug)]
pub struct Breaker {
    /// The target, as `upstream/address`, for log lines.
    label: String,
    settings: BreakerSettings,
    state: AtomicU8,
    /// Transitions into the open state since the node started.
    opened_total: AtomicU64,
    consecutive_failures: AtomicU32,
    /// Requests and failures per bucket of `window / BUCKETS`, packed with
    /// the bucket's sequence number since `epoch` (see [`pack`]).
    buckets: [AtomicU64; BUCKETS],
    epoch: Instant,
    inner: Mutex<Inner>,
}

#[derive(Debug)]
struct Inner {
    opened_at: Instant,
    cool_down: Duration,
    probes_in_flight: u32,
    probe_successes: u32,
}

/// Bits of a packed bucket: the sequence number (modulo 2^24), then the
/// requests and the failures counted in it (each saturating at 2^20 - 1).
const SEQUENCE_BITS: u32 = 24;
const COUNT_BITS: u32 = 20;
const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
const SEQUENCE_MASK: u64 = (1 << SEQUENCE_BITS) - 1;

fn pack(sequence: u64, requests: u64, failures: u64) -> u64 {
    ((sequence & SEQUENCE_MASK) << (2 * COUNT_BITS)) | (requests << COUNT_BITS) | failures
}

fn unpack(bucket: u64) -> (u64, u64, u64) {
    (
        bucket >> (2 * COUNT_BITS),
        (bucket >> COUNT_BITS) & COUNT_MAX,
        bucket & COUNT_MAX,
    )
}

/// The admission of one request through a breaker, as a normal request or
/// as a half-open probe. Record its outcome with [`Permit::succeeded`] or
/// [`Permit::failed`]; dropping it without one (the client went away, or
/// the failure was the client's) frees its probe slot and counts nothing.
#[derive(Debug)]
pub struct Permit<'a> {
    breaker: &'a Breaker,
    probe: bool,
}

/// The rejection of a request by a breaker.
#[derive(Debug, Clone, Copy)]
pub struct Refused {
    /// Time until the breaker lets probes through again; zero while it is
    /// half-open and every probe slot is taken.
    pub retry_in: Duration,
}

/// The state and counters of a breaker, for the admin listener.
#[derive(Debug, Clone, Copy)]
pub struct Snapshot {
    pub state: State,
    pub consecutive_failures: u32,
    pub opened_total: u64,
    /// The cool-down the breaker waits (or waited last) while open.
    pub cool_down: Duration,
    /// Time left in the cool-down, while open.
    pub retry_in: Duration,
}

impl Breaker {
    /// Creates a closed breaker; `label` names the target in log lines.
    pub fn new(label: String, settings: BreakerSettings) -> Breaker {
        let now = Instant::now();
        Breaker {
            label,
            state: AtomicU8::new(State::Closed as u8),
            opened_total: AtomicU64::new(0),
            consecutive_failures: AtomicU32::new(0),
            buckets: Default::default(),
            epoch: now,
            inner: Mutex::new(Inner {
                opened_at: now,
                cool_down: settings.cool_down,
                probes_in_flight: 0,
                probe_successes: 0,
            }),
            settings,
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        State::from_u8(self.state.load(Ordering::Relaxed))
    }

    /// Transitions into the open state since the node started.
    pub fn opened_total(&self) -> u64 {
        self.opened_total.load(Ordering::Relaxed)
    }

    /// Whether a request could go through now, without taking a permit.
    pub fn allows(&self, now: Instant) -> bool {
        self.state() == State::Closed || self.admit(now, false).is_ok()
    }

    /// Lets a request through, or refuses it while open or while every
    /// half-open probe slot is taken.
    pub fn acquire(&self, now: Instant) -> Result<Permit<'_>, Refused> {
        if self.state() == State::Closed {
            return Ok(Permit {
                breaker: self,
                probe: false,
            });
        }
        self.admit(now, true).map(|probe| Permit {
            breaker: self,
            probe,
        })
    }

    /// Checks or, when `take`, takes a probe slot. Returns whether the
    /// admission is a probe: false when the breaker closed meanwhile.
    fn admit(&self, now: Instant, take: bool) -> Result<bool, Refused> {
        let mut inner = self.lock();
        match self.state() {
            State::Closed => Ok(false),
            State::Open => {
                let reopen = inner.opened_at + inner.cool_down;
                if now < reopen {
                    return Err(Refused {
                        retry_in: reopen - now,
                    });
                }
                if take {
                    inner.probes_in_flight = 1;
                    inner.probe_successes = 0;
                    self.set_state(State::HalfOpen, &inner, "cool-down over, sending probes");
                }
                Ok(true)
            }
            State::HalfOpen => {
                if inner.probes_in_flight >= self.settings.half_open_probes {
                    return Err(Refused {
                        retry_in: Duration::ZERO,
                    });
                }
                if take {
                    inner.probes_in_flight += 1;
                }
                Ok(true)
            }
        }
    }

    fn record_success(&self, probe: bool, now: Instant) {
        // Loads first: most responses change nothing, and a store would
        // bounce the cache line between serving threads.
        if self.consecutive_failures.load(Ordering::Relaxed) != 0 {
            self.consecutive_failures.store(0, Ordering::Relaxed);
        }
        if self.settings.error_rate.is_some() {
            self.count(now, false);
        }
        if !probe {
            return;
        }
        let mut inner = self.lock();
        if self.state() == State::HalfOpen {
            inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
            inner.probe_successes += 1;
            if inner.probe_successes >= self.settings.half_open_probes {
                inner.cool_down = self.settings.cool_down;
                for bucket in &self.buckets {
                    bucket.store(0, Ordering::Relaxed);
                }
                self.set_state(State::Closed, &inner, "probes succeeded");
            }
        }
    }

    fn record_failure(&self, probe: bool, now: Instant) {
        let consecutive = self
            .consecutive_failures
            .fetch_add(1, Ordering::Relaxed)
            .saturating_add(1);
        let (requests, failures) = if self.settings.error_rate.is_some() {
            self.count(now, true)
        } else {
            (0, 0)
        };
        let mut inner = self.lock();
        match self.state() {
            State::HalfOpen if probe => {
                inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
                inner.cool_down = (inner.cool_down * 2).min(self.settings.max_cool_down);
                inner.opened_at = now;
                self.set_state(State::Open, &inner, "probe failed");
            }
            State::Closed => {
                let settings = &self.settings;
                let by_count = settings.consecutive_failures > 0
                    && consecutive >= settings.consecutive_failures;
                let by_rate = settings.error_rate.is_some_and(|rate| {
                    requests >= u64::from(settings.min_requests.max(1))
                        && failures as f64 > rate * requests as f64
                });
                if by_count || by_rate {
                    inner.opened_at = now;
                    let reason = if by_count {
                        "consecutive failures reached the threshold"
                    } else {
                        "error rate over the window exceeded the threshold"
                    };
                    self.set_state(State::Open, &inner, reason);
                }
            }
            State::Open | State::HalfOpen => {}
        }
    }

    /// Counts a response in the rolling window. For a failure, returns the
    /// window's requests and failures; for a success, zeros, because only a
    /// failure can open the breaker.
    fn count(&self, now: Instant, failed: bool) -> (u64, u64) {
        let width = (self.settings.window / BUCKETS as u32).max(Duration::from_millis(1));
        let sequence =
            (now.saturating_duration_since(self.epoch).as_nanos() / width.as_nanos()) as u64;
        let bucket = &self.buckets[(sequence % BUCKETS as u64) as usize];
        let failed = u64::from(failed);
        let mut current = bucket.load(Ordering::Relaxed);
        loop {
            let (stored, requests, failures) = unpack(current);
            let next = if stored == sequence & SEQUENCE_MASK {
                pack(
                    sequence,
                    (requests + 1).min(COUNT_MAX),
                    (failures + failed).min(COUNT_MAX),
                )
            } else {
                pack(sequence, 1, failed)
            };
            match bucket.compare_exchange_weak(current, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => break,
                Err(actual) => current = actual,
            }
        }
        if failed == 0 {
            return (0, 0);
        }
        self.buckets
            .iter()
            .map(|bucket| unpack(bucket.load(Ordering::Relaxed)))
            .filter(|(stored, requests, _)| {
                let age = (sequence & SEQUENCE_MASK).wrapping_sub(*stored) & SEQUENCE_MASK;
                *requests > 0 && age < BUCKETS as u64
            })
            .fold((0, 0), |(r, f), (_, requests, failures)| {
                (r + requests, f + failures)
            })
    }

    fn release_probe(&self) {
        let mut inner = self.lock();
        inner.probes_in_flight = inner.probes_in_flight.saturating_sub(1);
    }

    /// Returns the state and counters.
    pub fn snapshot(&self, now: Instant) -> Snapshot {
        let inner = self.lock();
        let state = self.state();
        let retry_in = match state {
            State::Open => (inner.opened_at + inner.cool_down).saturating_duration_since(now),
            _ => Duration::ZERO,
        };
        Snapshot {
            state,
            consecutive_failures: self.consecutive_failures.load(Ordering::Relaxed),
            opened_total: self.opened_total(),
            cool_down: inner.cool_down,
            retry_in,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set_state(&self, state: State, inner: &Inner, reason: &str) {
        let previous = State::from_u8(self.state.swap(state as u8, Ordering::Relaxed));
        if state == State::Open {
            self.opened_total.fetch_add(1, Ordering::Relaxed);
        }
        // Each cycle through the states waits one cool-down, so a breaker
        // logs at most three lines per cool-down and needs no throttle.
        tracing::info!(
            target_name = %self.label,
            from = previous.name(),
            to = state.name(),
            cool_down_ms = inner.cool_down.as_millis() as u64,
            consecutive_failures = self.consecutive_failures.load(Ordering::Relaxed),
            "circuit breaker {}: {reason}",
            state.name()
        );
    }
}

impl Permit<'_> {
    /// Whether this request is a half-open probe.
    pub fn is_probe(&self) -> bool {
        self.probe
    }

    /// Records a successful response.
    pub fn succeeded(self, now: Instant) {
        let this = std::mem::ManuallyDrop::new(self);
        this.breaker.record_success(this.probe, now);
    }

    /// Records a connect error, a timeout or a failure status.
    pub fn failed(self, now: Instant) {
        let this = std::mem::ManuallyDrop::new(self);
        this.breaker.record_failure(this.probe, now);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.probe {
            self.breaker.release_probe();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings() -> BreakerSettings {
        BreakerSettings {
            consecutive_failures: 3,
            error_rate: None,
            window: Duration::from_secs(10),
            min_requests: 10,
            cool_down: Duration::from_secs(1),
            max_cool_down: Duration::from_secs(4),
            half_open_probes: 1,
        }
    }

    fn fail(breaker: &Breaker, now: Instant) {
        breaker.acquire(now).expect("admitted").failed(now);
    }

    #[test]
    fn opens_after_consecutive_failures_and_closes_after_a_probe() {
        let breaker = Breaker::new("app/t".into(), settings());
        let start = Instant::now();
        for _ in 0..3 {
            fail(&breaker, start);
        }
        assert_eq!(breaker.state(), State::Open);
        let refused = breaker.acquire(start).expect_err("open refuses");
        assert_eq!(refused.retry_in, Duration::from_secs(1));

        let later = start + Duration::from_secs(1);
        let probe = breaker.acquire(later).expect("probe after the cool-down");
        assert!(probe.is_probe());
        assert_eq!(breaker.state(), State::HalfOpen);
        assert!(breaker.acquire(later).is_err(), "one probe at a time");
        probe.succeeded(later);
        assert_eq!(breaker.state(), State::Closed);
        assert_eq!(breaker.opened_total(), 1);
    }

    #[test]
    fn failed_probe_reopens_with_a_doubled_capped_cool_down() {
        let breaker = Breaker::new("app/t".into(), settings());
        let mut now = Instant::now();
        for _ in 0..3 {
            fail(&breaker, now);
        }
        for expected in [2, 4, 4] {
            now += breaker.snapshot(now).cool_down;
            fail(&breaker, now);
            assert_eq!(breaker.state(), State::Open);
            assert_eq!(
                breaker.snapshot(now).cool_down,
                Duration::from_secs(expected)
            );
        }
    }

    #[test]
    fn dropped_probe_frees_its_slot() {
        let breaker = Breaker::new("app/t".into(), settings());
        let now = Instant::now();
        for _ in 0..3 {
            fail(&breaker, now);
        }
        let later = now + Duration::from_secs(1);
        drop(breaker.acquire(later).expect("probe"));
        assert!(breaker.acquire(later).is_ok(), "the slot is free again");
    }

    #[test]
    fn opens_on_error_rate_with_minimum_requests() {
        let mut settings = settings();
        settings.consecutive_failures = 0;
        settings.error_rate = Some(0.5);
        let breaker = Breaker::new("app/t".into(), settings);
        let now = Instant::now();
        for _ in 0..4 {
            breaker.acquire(now).unwrap().succeeded(now);
            fail(&breaker, now);
        }
        assert_eq!(
            breaker.state(),
            State::Closed,
            "8 requests are under the minimum"
        );
        fail(&breaker, now);
        fail(&breaker, now);
        assert_eq!(breaker.state(), State::Open, "6 of 10 failed");
    }

    #[test]
    fn failures_leave_the_error_rate_window() {
        let mut settings = settings();
        settings.consecutive_failures = 0;
        settings.error_rate = Some(0.5);
        let breaker = Breaker::new("app/t".into(), settings);
        let start = Instant::now();
        for _ in 0..9 {
            fail(&breaker, start);
        }
        assert_eq!(
            breaker.state(),
            State::Closed,
            "9 requests are under the minimum"
        );
        let later = start + Duration::from_secs(11);
        for _ in 0..9 {
            breaker.acquire(later).unwrap().succeeded(later);
        }
        fail(&breaker, later);
        assert_eq!(
            breaker.state(),
            State::Closed,
            "the old failures left the window: 1 of 10 failed"
        );
    }
}
