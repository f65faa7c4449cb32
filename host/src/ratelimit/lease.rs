//! Leases of a global token bucket: requests a node took from Redis at once
//! for one client key, which it then admits without asking Redis again.
//!
//! Redis counts a lease's requests when it grants them, so the nodes
//! together never admit more than Redis granted. What a lease changes is
//! when its requests are admitted: within its lifetime, which is the time
//! the limit's rate takes to produce that many requests (at least
//! [`MIN_LIFETIME_NS`]). So over any span of time the nodes admit at most
//! the limit plus what its rate produces in one lifetime: `lease` requests,
//! or the rate's share of a millisecond when that is more. Requests of a
//! lease whose lifetime ended unused are given back to the bucket with the
//! key's next ask, so a key that sends fewer requests than a lease holds does
//! not drain its bucket for the other nodes.
//!
//! A refusal is kept too, until the retry time in Redis's reply, so a flood
//! of rejected requests does not reach Redis.
//!
//! One request per key asks Redis at a time; the others of that key wait
//! for its answer and then share the lease (or the refusal) it brings.
//! Without that, every request that came while the lease was empty would
//! take a lease of its own and leave the rest of the limit to this node.

use std::collections::HashMap;
use std::hash::BuildHasherDefault;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use tokio::sync::futures::OwnedNotified;
use tokio::sync::Notify;

use super::local::KeyHasher;
use super::Decision;

/// The shortest a lease lives, however fast the limit's rate produces it.
pub const MIN_LIFETIME_NS: u64 = 1_000_000;

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
    /// The most leases one shard holds.
    max_per_shard: usize,
}

/// Requests of one key that the node may still admit, or, with none left,
/// a refusal until `expires_ns`.
#[derive(Debug, Default)]
struct Lease {
    left: u64,
    expires_ns: u64,
    limit: u64,
    /// What Redis had left for other nodes when it granted the lease.
    remaining: u64,
    /// When the limit is reset, on the node's clock.
    reset_at_ns: u64,
    /// Set while a request of this key asks Redis; woken when it is done.
    asking: Option<Arc<Notify>>,
}

impl Lease {
    fn is_live(&self, now_ns: u64) -> bool {
        self.asking.is_some() || now_ns < self.expires_ns
    }
}

/// What a request of a leased limit does next.
pub enum Take {
    /// Decided from the node's lease or kept refusal.
    Decided(Decision),
    /// Ask Redis, giving back `unused` requests of the key's expired
    /// lease; then [`Leases::keep`] the answer and [`Leases::done`].
    Ask { unused: u64 },
    /// Another request of the key is asking Redis; wait for it, then take
    /// again.
    Wait(OwnedNotified),
}

impl Leases {
    /// The leases of a bucket that releases a request every `interval_ns`
    /// and is leased `lease` requests at a time, for at most `max_keys` keys.
    pub fn new(interval_ns: u64, lease: u64, max_keys: usize) -> Leases {
        // A lease that lives shorter than a round trip to Redis would expire
        // before the requests waiting for it could use it.
        let lifetime_ns = interval_ns.saturating_mul(lease).max(MIN_LIFETIME_NS);
        Leases {
            shards: std::array::from_fn(|_| Mutex::new(Table::default())),
            lifetime_ns,
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Decides one request of `key` from its lease or its kept refusal, or
    /// says who asks Redis.
    pub fn take(&self, key: u64, now_ns: u64) -> Take {
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && !self.make_room(&mut shard, now_ns) {
            // No room to coordinate: this request asks on its own.
            return Take::Ask { unused: 0 };
        }
        let lease = shard.entry(key).or_default();
        if let Some(asking) = &lease.asking {
            return Take::Wait(asking.clone().notified_owned());
        }
        if now_ns >= lease.expires_ns {
            lease.asking = Some(Arc::new(Notify::new()));
            let unused = std::mem::take(&mut lease.left);
            return Take::Ask { unused };
        }
        if lease.left == 0 {
            return Take::Decided(Decision {
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
            // Used up: the next request asks Redis.
            lease.expires_ns = 0;
        }
        Take::Decided(decision)
    }

    /// Ends the ask of a request that [`Leases::take`] told to ask, whether
    /// or not Redis answered, and wakes the requests that wait for it.
    pub fn done(&self, key: u64) {
        let asking = self
            .shard(key)
            .get_mut(&key)
            .and_then(|lease| lease.asking.take());
        if let Some(asking) = asking {
            asking.notify_waiters();
        }
    }

    /// Drops expired leases from a full shard; returns whether it has room
    /// for one more.
    fn make_room(&self, shard: &mut Table, now_ns: u64) -> bool {
        if shard.len() >= self.max_per_shard {
            shard.retain(|_, lease| lease.is_live(now_ns));
        }
        shard.len() < self.max_per_shard
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
        } else {
            now_ns.saturating_add(self.lifetime_ns)
        };
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && !self.make_room(&mut shard, now_ns) {
            // The table is full of live leases: decide this request and keep
            // nothing, which only admits less or asks Redis again.
            return decision;
        }
        let lease = shard.entry(key).or_default();
        let live = now_ns < lease.expires_ns;
        if !decision.allowed && live && lease.left > 0 {
            // A request that asked on its own (see `take`) was refused while
            // the node holds a lease: admit it from the lease instead.
            lease.left -= 1;
            return Decision {
                allowed: true,
                remaining: lease.remaining + lease.left,
                retry_after_ns: 0,
                ..decision
            };
        }
        // A grant adds to what the node still holds; a refusal replaces it.
        lease.left = match (decision.allowed, live) {
            (true, true) => lease.left.saturating_add(left),
            (true, false) => left,
            (false, _) => 0,
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

/// The request of a key that asks Redis for a lease; when it is dropped,
/// answered or not, the requests that wait for it are woken.
pub struct Asking<'a> {
    pub leases: &'a Leases,
    pub key: u64,
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.leases.done(self.key);
    }
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

    /// The decision `take` made, or `None` when it says to ask Redis.
    fn decided(leases: &Leases, key: u64, now_ns: u64) -> Option<Decision> {
        match leases.take(key, now_ns) {
            Take::Decided(decision) => Some(decision),
            Take::Ask { .. } => {
                leases.done(key);
                None
            }
            Take::Wait(_) => panic!("nobody else asks"),
        }
    }

    #[test]
    fn a_lease_admits_what_it_holds_then_asks_again() {
        // 100 per minute, 10 at a time: a lease lives 6 s.
        let leases = Leases::new(S * 6 / 10, 10, 1000);
        assert!(decided(&leases, 7, 0).is_none());
        // Redis granted 10: this request and 9 more; 80 are left in Redis.
        let shown = leases.keep(7, 0, admitted(100, 80, 30 * S), 10);
        assert_eq!(shown.remaining, 89);
        for left in (0..9).rev() {
            let decision = decided(&leases, 7, S).expect("a request from the lease");
            assert_eq!(decision.remaining, 80 + left);
            assert_eq!(decision.reset_ns, 29 * S);
        }
        assert!(decided(&leases, 7, S).is_none());
    }

    #[test]
    fn one_request_asks_while_the_others_wait() {
        let leases = Leases::new(S * 6 / 10, 10, 1000);
        assert!(matches!(leases.take(3, 0), Take::Ask { unused: 0 }));
        let Take::Wait(answered) = leases.take(3, 0) else {
            panic!("a second request asks too");
        };
        let asking = Asking {
            leases: &leases,
            key: 3,
        };
        assert!(leases.keep(3, 0, admitted(100, 90, 30 * S), 10).allowed);
        drop(asking);
        // The waiting request was woken, and takes from the lease.
        futures_util::FutureExt::now_or_never(answered).expect("woken");
        assert!(decided(&leases, 3, 0).expect("from the lease").allowed);
    }

    #[test]
    fn an_expired_lease_gives_back_what_it_did_not_use() {
        // Ten requests a second, five at a time: a lease lives half a second.
        let leases = Leases::new(S / 10, 5, 1000);
        leases.keep(3, 0, admitted(100, 50, S), 5);
        assert!(decided(&leases, 3, S / 2 - 1).is_some());
        // Three of the four are left when it expires; the next ask gives
        // them back.
        assert!(matches!(leases.take(3, S / 2), Take::Ask { unused: 3 }));
        leases.done(3);
        assert!(matches!(leases.take(3, S / 2), Take::Ask { unused: 0 }));
        leases.done(3);
        // A short lease lives at least a millisecond.
        let leases = Leases::new(1000, 5, 1000);
        leases.keep(4, 0, admitted(100, 50, S), 5);
        assert!(decided(&leases, 4, MIN_LIFETIME_NS - 1).is_some());
        assert!(decided(&leases, 4, MIN_LIFETIME_NS).is_none());
    }

    #[test]
    fn a_refusal_is_kept_until_its_retry_time() {
        let leases = Leases::new(S * 6 / 10, 10, 1000);
        let refused = Decision {
            allowed: false,
            limit: 100,
            remaining: 0,
            reset_ns: 20 * S,
            retry_after_ns: 20 * S,
            delay_ns: 0,
        };
        assert!(!leases.keep(9, 0, refused, 0).allowed);
        let decision = decided(&leases, 9, 5 * S).expect("the kept refusal");
        assert!(!decision.allowed);
        assert_eq!(
            (decision.retry_after_ns, decision.reset_ns),
            (15 * S, 15 * S)
        );
        assert!(decided(&leases, 9, 20 * S).is_none(), "asks Redis again");
    }

    #[test]
    fn the_table_stays_bounded() {
        // 1000 a second, 10 at a time: a lease lives 10 ms.
        let leases = Leases::new(S / 1000, 10, 32);
        for key in 0..10_000u64 {
            leases.keep(
                key.wrapping_mul(0x9E37_79B9_7F4A_7C15),
                0,
                admitted(1000, 5, S),
                10,
            );
        }
        assert!(leases.len() <= 32, "{} leases", leases.len());
        // Once they expire, new keys take their places.
        leases.keep(42, S, admitted(1000, 5, S), 10);
        assert!(decided(&leases, 42, S).is_some());
    }
}
