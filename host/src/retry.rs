//! Retries of failed upstream requests: which requests may be sent again,
//! the jittered exponential backoff between attempts, and the retry budget
//! that keeps retries from multiplying the load on a struggling upstream.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use http::Method;

/// Settings of an upstream's retries.
#[derive(Debug, Clone)]
pub struct RetrySettings {
    /// Attempts after the first; 0 turns retries off.
    pub max_retries: u32,
    /// The backoff before the first retry; it doubles for each later one.
    pub backoff: Duration,
    pub max_backoff: Duration,
    /// Retries allowed as a fraction of requests (0 to 1).
    pub budget_ratio: f64,
    /// Retries allowed each second beyond the ratio, so that a quiet
    /// upstream can still retry.
    pub min_retries_per_second: u32,
    /// Response statuses that are retried (for requests that may be sent
    /// again).
    pub on_statuses: Vec<u16>,
}

/// Whether a method may be sent twice without changing the outcome
/// (RFC 9110, section 9.2.2).
pub fn is_idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// The retry budget of an upstream: each request deposits `budget_ratio`
/// of a token, each retry withdraws a whole one, and `min_retries_per_second`
/// retries a second need no token.
#[derive(Debug)]
pub struct RetryBudget {
    /// Thousandths of a token.
    balance: AtomicI64,
    /// The current second since `start` (high 32 bits) and the retries
    /// taken from the per-second allowance in it (low 32 bits).
    second: AtomicU64,
    start: Instant,
    deposit: i64,
    /// The maximum balance, so a long quiet spell cannot save up
    /// a burst of retries.
    cap: i64,
    per_second: u32,
}

/// Thousandths of a token per token.
const TOKEN: i64 = 1000;

impl RetryBudget {
    /// Creates an empty budget.
    pub fn new(settings: &RetrySettings) -> RetryBudget {
        let deposit = (settings.budget_ratio * TOKEN as f64).round() as i64;
        RetryBudget {
            balance: AtomicI64::new(0),
            second: AtomicU64::new(0),
            start: Instant::now(),
            deposit,
            cap: (deposit * 100).max(TOKEN * 10),
            per_second: settings.min_retries_per_second,
        }
    }

    /// Counts a request.
    pub fn deposit(&self) {
        // A load first: a full budget, the usual case, then costs no write
        // to the cache line that every serving thread shares. Racing
        // deposits may overshoot the cap by a few tokens.
        if self.deposit == 0 || self.balance.load(Ordering::Relaxed) >= self.cap {
            return;
        }
        self.balance.fetch_add(self.deposit, Ordering::Relaxed);
    }

    /// Takes the allowance for one retry; false when the budget is spent.
    pub fn withdraw(&self, now: Instant) -> bool {
        if self.per_second > 0 {
            let second = now.saturating_duration_since(self.start).as_secs();
            let mut current = self.second.load(Ordering::Relaxed);
            loop {
                let (at, used) = (current >> 32, (current & 0xFFFF_FFFF) as u32);
                let next = if at == second {
                    if used >= self.per_second {
                        break;
                    }
                    (second << 32) | u64::from(used + 1)
                } else {
                    (second << 32) | 1
                };
                match self.second.compare_exchange_weak(
                    current,
                    next,
                    Ordering::Relaxed,
                    Ordering::Relaxed,
                ) {
                    Ok(_) => return true,
                    Err(actual) => current = actual,
                }
            }
        }
        let previous = self.balance.fetch_sub(TOKEN, Ordering::Relaxed);
        if previous >= TOKEN {
            return true;
        }
        self.balance.fetch_add(TOKEN, Ordering::Relaxed);
        false
    }
}

/// Returns the backoff before retry number `retry` (from 1): a random time up to
/// `backoff * 2^(retry - 1)`, capped at `max_backoff` ("full jitter").
pub fn backoff(settings: &RetrySettings, retry: u32) -> Duration {
    let ceiling = settings
        .backoff
        .saturating_mul(1 << retry.saturating_sub(1).min(16))
        .min(settings.max_backoff);
    ceiling.mul_f64(fastrand::f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(ratio: f64, per_second: u32) -> RetrySettings {
        RetrySettings {
            max_retries: 2,
            backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(40),
            budget_ratio: ratio,
            min_retries_per_second: per_second,
            on_statuses: vec![503],
        }
    }

    #[test]
    fn budget_allows_the_ratio_of_requests() {
        let budget = RetryBudget::new(&settings(0.2, 0));
        let now = Instant::now();
        let mut retries = 0;
        for _ in 0..100 {
            budget.deposit();
            while budget.withdraw(now) {
                retries += 1;
            }
        }
        assert_eq!(retries, 20);
    }

    #[test]
    fn per_second_allowance_refills_each_second() {
        let budget = RetryBudget::new(&settings(0.0, 3));
        let now = Instant::now();
        assert_eq!((0..10).filter(|_| budget.withdraw(now)).count(), 3);
        let later = now + Duration::from_secs(1);
        assert_eq!((0..10).filter(|_| budget.withdraw(later)).count(), 3);
    }

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        let settings = settings(0.2, 0);
        for retry in 1..10 {
            let ceiling = Duration::from_millis(10 * (1 << (retry - 1))).min(settings.max_backoff);
            assert!(backoff(&settings, retry) <= ceiling);
        }
    }
}
