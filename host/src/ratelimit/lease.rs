//! Leases of a global limit: requests a node took from Redis at once for one
//! client key, which it then admits without asking Redis again.
//!
//! Redis counts a lease's requests when it grants them, so the nodes
//! together never admit more than Redis granted. What a lease changes is
//! when its requests are admitted: within its lifetime, which is the time
//! the limit's rate takes to produce that many requests, and never past the
//! end of a fixed window. A lease whose lifetime ends unused is dropped, so
//! its requests are lost rather than admitted late.
//!
//! A refusal is kept too, until the time Redis said a request would be
//! admitted again, so a flood of refused requests does not reach Redis.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Mutex, MutexGuard, PoisonError};

use super::local::KeyHasher;
use super::Decision;
use super::Shape;

/// Independently locked parts of the table, so that threads deciding for
/// different keys rarely wait for each other.
const SHARDS: usize = 16;

/// Leases by key hash; the keys are already hashes.
type Table = HashMap<u64, Lease, BuildHasherDefault<KeyHasher>>;

/// The leases one node holds for one global limit.
pub struct Leases {
    shards: [Mutex<Table>; SHARDS],
    /// How long a lease lives.
    lifetime_ns: u64,
    /// Whether a lease ends with the window it was granted in.
    ends_with_window: bool,
    /// The most leases one shard holds.
    max_per_shard: usize,
}

/// Requests of one key that the node may still admit, or, with none left,
/// a refusal until `expires_ns`.
#[derive(Debug, Clone, Copy)]
struct Lease {
    left: u64,
    expires_ns: u64,
    limit: u64,
    /// What Redis had left for other nodes when it granted the lease.
    remaining: u64,
    /// When the limit is reset, on the node's clock.
    reset_at_ns: u64,
}

impl Leases {
    /// The leases of a limit of `shape` that leases `lease` requests at a
    /// time, for at most `max_keys` keys.
    pub fn new(shape: &Shape, lease: u64, max_keys: usize) -> Leases {
        let (lifetime_ns, ends_with_window) = match *shape {
            Shape::Bucket { interval_ns, .. } => (interval_ns.saturating_mul(lease), false),
            Shape::FixedWindow { limit, window_ns } => (share(window_ns, lease, limit), true),
            Shape::SlidingWindow { limit, window_ns } => (share(window_ns, lease, limit), false),
        };
        Leases {
            shards: std::array::from_fn(|_| Mutex::new(Table::default())),
            lifetime_ns,
            ends_with_window,
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Decides one request of `key` from its lease or its kept refusal, if
    /// the node holds one.
    pub fn take(&self, key: u64, now_ns: u64) -> Option<Decision> {
        let mut shard = self.shard(key);
        let lease = shard.get_mut(&key)?;
        if now_ns >= lease.expires_ns {
            shard.remove(&key);
            return None;
        }
        if lease.left == 0 {
            return Some(Decision {
                allowed: false,
                limit: lease.limit,
                remaining: 0,
                reset_ns: lease.reset_at_ns.saturating_sub(now_ns),
                retry_after_ns: lease.expires_ns - now_ns,
                delay_ns: 0,
            });
        }
        lease.left -= 1;
        let decision = Decision {
            allowed: true,
            limit: lease.limit,
            remaining: lease.remaining + lease.left,
            reset_ns: lease.reset_at_ns.saturating_sub(now_ns),
            retry_after_ns: 0,
            delay_ns: 0,
        };
        if lease.left == 0 {
            shard.remove(&key);
        }
        Some(decision)
    }

    /// Keeps what Redis decided for `key`: the `granted - 1` requests an
    /// admitted request took beyond itself, for later requests, or a
    /// refusal until its retry time. Returns the decision to show for the
    /// request.
    pub fn keep(&self, key: u64, now_ns: u64, decision: Decision, granted: u64) -> Decision {
        let left = granted.saturating_sub(1);
        let expires_ns = if !decision.allowed {
            now_ns.saturating_add(decision.retry_after_ns)
        } else if left == 0 {
            return decision;
        } else if self.ends_with_window {
            now_ns.saturating_add(self.lifetime_ns.min(decision.reset_ns))
        } else {
            now_ns.saturating_add(self.lifetime_ns)
        };
        let mut shard = self.shard(key);
        if shard.len() >= self.max_per_shard && !shard.contains_key(&key) {
            shard.retain(|_, lease| lease.left > 0 && now_ns < lease.expires_ns);
            if shard.len() >= self.max_per_shard {
                // The table is full of live leases: decide this request and
                // keep nothing, which only admits less or asks Redis again.
                return decision;
            }
        }
        let lease = shard.entry(key).or_insert(Lease {
            left: 0,
            expires_ns,
            limit: decision.limit,
            remaining: decision.remaining,
            reset_at_ns: now_ns.saturating_add(decision.reset_ns),
        });
        // Two requests of one key that asked Redis at the same time both
        // got a lease; the node keeps both. A refusal replaces the lease.
        lease.left = if decision.allowed {
            lease.left.saturating_add(left)
        } else {
            0
        };
        lease.limit = decision.limit;
        lease.expires_ns = expires_ns;
        lease.remaining = decision.remaining;
        lease.reset_at_ns = now_ns.saturating_add(decision.reset_ns);
        Decision {
            remaining: lease.remaining + lease.left,
            ..decision
        }
    }

    /// The keys the node holds leases or refusals for.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|shard| shard.lock().unwrap_or_else(PoisonError::into_inner).len())
            .sum()
    }

    fn shard(&self, key: u64) -> MutexGuard<'_, Table> {
        // The key is already a hash; its high bits pick the shard.
        self.shards[(key >> 60) as usize % SHARDS]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

/// The time a window of `window_ns` takes to produce `lease` of its `limit`
/// requests, at most the window.
fn share(window_ns: u64, lease: u64, limit: u64) -> u64 {
    let ns = u128::from(window_ns) * u128::from(lease) / u128::from(limit.max(1));
    u64::try_from(ns).unwrap_or(u64::MAX).min(window_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: u64 = 1_000_000_000;

    fn admitted(limit: u64, remaining: u64, reset_ns: u64) -> Decision {
        Decision {
            allowed: true,
            limit,
            remaining,
            reset_ns,
            retry_after_ns: 0,
            delay_ns: 0,
        }
    }

    #[test]
    fn a_lease_admits_what_it_holds_then_asks_again() {
        let shape = Shape::FixedWindow {
            limit: 100,
            window_ns: 60 * S,
        };
        let leases = Leases::new(&shape, 10, 1000);
        assert!(leases.take(7, 0).is_none());
        // Redis granted 10: this request and 9 more; 80 are left in Redis.
        let shown = leases.keep(7, 0, admitted(100, 80, 30 * S), 10);
        assert_eq!(shown.remaining, 89);
        for left in (0..9).rev() {
            let decision = leases.take(7, S).expect("a request from the lease");
            assert_eq!(decision.remaining, 80 + left);
            assert_eq!(decision.reset_ns, 29 * S);
        }
        assert!(leases.take(7, S).is_none());
        assert_eq!(leases.len(), 0);
    }

    #[test]
    fn a_lease_ends_with_its_lifetime_and_its_window() {
        // 10 of 100 per minute: 6 s of the window's rate.
        let window = Shape::FixedWindow {
            limit: 100,
            window_ns: 60 * S,
        };
        let leases = Leases::new(&window, 10, 1000);
        leases.keep(1, 0, admitted(100, 50, 50 * S), 10);
        assert!(leases.take(1, 5 * S).is_some());
        assert!(leases.take(1, 6 * S).is_none());
        // Two seconds before the window ends, the lease ends with it.
        leases.keep(2, 0, admitted(100, 50, 2 * S), 10);
        assert!(leases.take(2, S).is_some());
        assert!(leases.take(2, 2 * S).is_none());
        // A bucket's lease lives as long as the bucket takes to refill it.
        let bucket = Shape::Bucket {
            interval_ns: S / 10,
            burst: 100,
            queue: 0,
        };
        let leases = Leases::new(&bucket, 5, 1000);
        leases.keep(3, 0, admitted(100, 50, S), 5);
        assert!(leases.take(3, S / 2 - 1).is_some());
        assert!(leases.take(3, S / 2).is_none());
    }

    #[test]
    fn a_refusal_is_kept_until_its_retry_time() {
        let shape = Shape::FixedWindow {
            limit: 100,
            window_ns: 60 * S,
        };
        let leases = Leases::new(&shape, 10, 1000);
        let refused = Decision {
            allowed: false,
            limit: 100,
            remaining: 0,
            reset_ns: 20 * S,
            retry_after_ns: 20 * S,
            delay_ns: 0,
        };
        assert!(!leases.keep(9, 0, refused, 0).allowed);
        let decision = leases.take(9, 5 * S).expect("the kept refusal");
        assert!(!decision.allowed);
        assert_eq!((decision.retry_after_ns, decision.reset_ns), (15 * S, 15 * S));
        assert!(leases.take(9, 20 * S).is_none(), "asks Redis again");
    }

    #[test]
    fn the_table_stays_bounded() {
        let shape = Shape::SlidingWindow {
            limit: 1000,
            window_ns: S,
        };
        let leases = Leases::new(&shape, 10, 32);
        for key in 0..10_000u64 {
            leases.keep(key.wrapping_mul(0x9E37_79B9_7F4A_7C15), 0, admitted(1000, 5, S), 10);
        }
        assert!(leases.len() <= 32, "{} leases", leases.len());
        // Once they expire, new keys take their places.
        leases.keep(42, S, admitted(1000, 5, S), 10);
        assert!(leases.take(42, S).is_some());
    }
}
