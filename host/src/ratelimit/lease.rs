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
//! lease whose lifetime ended unused are lost, so the size of a key's next
//! lease follows what the last one served: twice the requests it admitted,
//! at least one and at most the limit's lease. A quiet key then takes about
//! twice what it uses, and does not drain its bucket for the other nodes.
//! Giving unused requests back later would count them twice when the bucket
//! refilled in the meantime.
//!
//! A refusal is kept too, until the retry time in Redis's reply, so a flood
//! of rejected requests does not reach Redis.
//!
//! One request per key calls Redis at a time. The others of that key wait
//! for its reply and then share the lease (or the refusal) it brings.
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
    /// The time the bucket takes to produce one request.
    interval_ns: u64,
    /// How long a lease lives.
    lifetime_ns: u64,
    /// The limit's lease: the largest a key's lease grows.
    size: u64,
    /// The maximum number of leases one shard holds.
    max_per_shard: usize,
}

/// Requests of one key that the node may still admit, or, with none left,
/// a refusal until `expires_ns`.
#[derive(Debug, Default)]
struct Lease {
    left: u64,
    expires_ns: u64,
    limit: u64,
    /// The requests Redis had left for other nodes when it granted the lease.
    remaining: u64,
    /// When the limit is reset, on the node's clock.
    reset_at_ns: u64,
    /// When `remaining` and `reset_at_ns` were taken from a reply.
    noted_at_ns: u64,
    /// The requests the last lease took.
    granted: u64,
    /// The size of the key's next lease.
    next_size: u64,
    /// Set while a request of this key calls Redis, and woken when it is done.
    asking: Option<Arc<Notify>>,
    /// Whether the last request that asked found Redis unavailable.
    failed: bool,
}

impl Lease {
    fn is_live(&self, now_ns: u64) -> bool {
        self.asking.is_some() || now_ns < self.expires_ns
    }
}

/// The next step of a request of a leased limit.
pub enum Take {
    /// Decided from the node's lease or kept refusal.
    Decided(Decision),
    /// Call Redis for a lease of `size` requests, then [`Leases::keep`] the
    /// reply. The [`Asking`] guard wakes the waiting requests.
    Ask { size: u64 },
    /// The request this one waited for found Redis unavailable.
    Unavailable,
    /// Another request of the key is asking Redis; wait for it, then take
    /// again.
    Wait(OwnedNotified),
}

impl Leases {
    /// Creates the leases of a bucket that releases a request every
    /// `interval_ns` and is leased `lease` requests at a time, for at most
    /// `max_keys` keys.
    pub fn new(interval_ns: u64, lease: u64, max_keys: usize) -> Leases {
        // A lease that lives shorter than a round trip to Redis would expire
        // before the requests waiting for it could use it.
        let lifetime_ns = interval_ns.saturating_mul(lease).max(MIN_LIFETIME_NS);
        Leases {
            shards: std::array::from_fn(|_| Mutex::new(Table::default())),
            interval_ns,
            lifetime_ns,
            size: lease,
            max_per_shard: max_keys.div_ceil(SHARDS).max(1),
        }
    }

    /// Decides one request of `key` from its lease or its kept refusal, or
    /// returns whether it calls Redis or waits. `waited` is set when the
    /// request has waited for another one's call.
    pub fn take(&self, key: u64, now_ns: u64, waited: bool) -> Take {
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && !self.make_room(&mut shard, now_ns) {
            // No room to coordinate, so this request calls Redis for itself
            // alone, because the node could not keep the rest of a lease.
            return Take::Ask { size: 1 };
        }
        let size = self.size;
        let lease = shard.entry(key).or_insert_with(|| Lease {
            next_size: size,
            ..Lease::default()
        });
        // Every request that waited for a call that failed falls back, so
        // none of them waits for Redis a second time.
        if waited && lease.failed {
            return Take::Unavailable;
        }
        if let Some(asking) = &lease.asking {
            return Take::Wait(asking.clone().notified_owned());
        }
        if now_ns >= lease.expires_ns {
            // A request that did not wait calls Redis again.
            lease.failed = false;
            if lease.left > 0 {
                // The lease expired with requests unused.
                let used = lease.granted.saturating_sub(lease.left);
                lease.next_size = used.saturating_mul(2).clamp(1, size);
                lease.left = 0;
            }
            lease.asking = Some(Arc::new(Notify::new()));
            return Take::Ask {
                size: lease.next_size,
            };
        }
        if lease.left == 0 {
            return Take::Decided(Decision {
                allowed: false,
                limit: lease.limit,
                remaining: 0,
                reset_ns: self.reset_ns(lease, lease.left, now_ns),
                retry_after_ns: lease.expires_ns - now_ns,
                delay_ns: 0,
            });
        }
        lease.left -= 1;
        let decision = Decision {
            allowed: true,
            limit: lease.limit,
            remaining: lease.remaining + lease.left,
            reset_ns: self.reset_ns(lease, lease.left, now_ns),
            retry_after_ns: 0,
            delay_ns: 0,
        };
        if lease.left == 0 {
            // Used up: the next request asks Redis, for a larger lease.
            lease.expires_ns = 0;
            lease.next_size = lease.next_size.saturating_mul(2).min(size);
        }
        Take::Decided(decision)
    }

    /// Ends the Redis call of a request that [`Leases::take`] sent there,
    /// and wakes the requests that wait for it. With `failed` set (Redis was
    /// unavailable), they fall back instead of calling Redis again.
    fn done(&self, key: u64, failed: bool) {
        let asking = self.shard(key).get_mut(&key).and_then(|lease| {
            lease.failed = failed && lease.asking.is_some();
            lease.asking.take()
        });
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
        // A grant of one, used by this request, leaves no requests to keep,
        // but its count of what Redis has left is kept.
        let single = decision.allowed && left == 0;
        let mut shard = self.shard(key);
        if !shard.contains_key(&key) && !self.make_room(&mut shard, now_ns) {
            // The table is full of live leases: decide this request and keep
            // nothing, which only admits less or asks Redis again.
            return decision;
        }
        let size = self.size;
        let lease = shard.entry(key).or_insert_with(|| Lease {
            next_size: size,
            ..Lease::default()
        });
        let live = now_ns < lease.expires_ns;
        self.note_redis_state(lease, now_ns, &decision);

        if !decision.allowed && live && lease.left > 0 {
            // A request that asked on its own (see `take`) was refused while
            // the node holds a lease: admit it from the lease instead.
            lease.left -= 1;
            return Decision {
                allowed: true,
                remaining: lease.remaining + lease.left,
                reset_ns: self.reset_ns(lease, lease.left, now_ns),
                retry_after_ns: 0,
                ..decision
            };
        }

        if single {
            // The lease this request asked for held only itself: the next
            // may be larger.
            lease.next_size = lease.next_size.saturating_mul(2).min(self.size);
        } else {
            // A grant adds to what the node still holds, and a refusal
            // replaces it.
            lease.left = match (decision.allowed, live) {
                (true, true) => lease.left.saturating_add(left),
                (true, false) => left,
                (false, _) => 0,
            };
            if decision.allowed {
                lease.granted = lease.left + 1;
            }
            lease.expires_ns = if decision.allowed {
                now_ns.saturating_add(self.lifetime_ns)
            } else {
                now_ns.saturating_add(decision.retry_after_ns)
            };
        }
        let held_by_node = if now_ns < lease.expires_ns {
            lease.left
        } else {
            0
        };
        Decision {
            remaining: lease.remaining + held_by_node,
            reset_ns: self.reset_ns(lease, held_by_node, now_ns),
            ..decision
        }
    }

    /// Takes Redis's remaining count and reset time from `decision` when it
    /// is the latest state of the bucket that the node has seen. Replies of
    /// one key can arrive out of order: a lease, and the single requests
    /// that asked alongside it. The reply whose bucket is full latest is the
    /// latest state, because taking requests moves that moment later and
    /// time passing does not. Judging by arrival would let an older grant's
    /// count stand after a newer one, and show more remaining than the
    /// bucket has. A state noted more than a lease's lifetime ago gives way
    /// to any reply, so a bucket that Redis lost (a restart or a flush)
    /// does not keep its old count.
    fn note_redis_state(&self, lease: &mut Lease, now_ns: u64, decision: &Decision) {
        let reset_at_ns = now_ns.saturating_add(decision.reset_ns);
        let old = now_ns >= lease.noted_at_ns.saturating_add(self.lifetime_ns);
        lease.limit = decision.limit;
        if reset_at_ns >= lease.reset_at_ns || old {
            lease.remaining = decision.remaining;
            lease.reset_at_ns = reset_at_ns;
            lease.noted_at_ns = now_ns;
        }
    }

    /// Returns the time until the bucket is full when the `held_by_node`
    /// requests of the node's lease count as left in it, as the remaining
    /// count sent to the client counts them.
    /// Redis's reset counts them as taken: a lease of 100 taken from a full
    /// bucket of 100 would show 99 remaining with a reset of 100 intervals.
    fn reset_ns(&self, lease: &Lease, held_by_node: u64, now_ns: u64) -> u64 {
        lease
            .reset_at_ns
            .saturating_sub(now_ns)
            .saturating_sub(held_by_node.saturating_mul(self.interval_ns))
    }

    /// Counts the keys the node holds leases or refusals for.
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

/// The request of a key that calls Redis for a lease. When it is dropped,
/// with or without a reply, the requests that wait for it are woken.
pub struct Asking<'a> {
    leases: &'a Leases,
    key: u64,
    /// Set when Redis was unavailable.
    pub failed: bool,
}

impl<'a> Asking<'a> {
    pub fn new(leases: &'a Leases, key: u64) -> Asking<'a> {
        Asking {
            leases,
            key,
            failed: false,
        }
    }
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.leases.done(self.key, self.failed);
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
        match leases.take(key, now_ns, false) {
            Take::Decided(decision) => Some(decision),
            Take::Ask { .. } => {
                leases.done(key, false);
                None
            }
            Take::Unavailable => panic!("nobody asked"),
            Take::Wait(_) => panic!("nobody else asks"),
        }
    }

    #[test]
    fn a_lease_admits_what_it_holds_then_asks_again() {
        // 100 per minute, 10 at a time: a lease lives 6 s.
        let interval = S * 6 / 10;
        let leases = Leases::new(interval, 10, 1000);
        assert!(decided(&leases, 7, 0).is_none());
        // Redis granted 10: this request and 9 more; 80 are left in Redis,
        // which refills the 20 taken in 12 s.
        let shown = leases.keep(7, 0, admitted(100, 80, 20 * interval), 10);
        // The reset agrees with the remaining: 11 requests to refill.
        assert_eq!((shown.remaining, shown.reset_ns), (89, 11 * interval));
        for left in (0..9).rev() {
            let decision = decided(&leases, 7, S).expect("a request from the lease");
            assert_eq!(decision.remaining, 80 + left);
            assert_eq!(decision.reset_ns, (20 - left) * interval - S);
        }
        assert!(decided(&leases, 7, S).is_none());
    }

    #[test]
    fn one_request_asks_while_the_others_wait() {
        let leases = Leases::new(S * 6 / 10, 10, 1000);
        assert!(matches!(leases.take(3, 0, false), Take::Ask { size: 10 }));
        let Take::Wait(answered) = leases.take(3, 0, false) else {
            panic!("a second request asks too");
        };
        let asking = Asking::new(&leases, 3);
        assert!(leases.keep(3, 0, admitted(100, 90, 30 * S), 10).allowed);
        drop(asking);
        // The waiting request was woken, and takes from the lease.
        futures_util::FutureExt::now_or_never(answered).expect("woken");
        assert!(decided(&leases, 3, 0).expect("from the lease").allowed);
    }

    #[test]
    fn lease_size_follows_what_the_last_served() {
        // Ten requests a second, eight at a time: a lease lives 800 ms.
        let leases = Leases::new(S / 10, 8, 1000);
        assert!(matches!(leases.take(3, 0, false), Take::Ask { size: 8 }));
        leases.keep(3, 0, admitted(100, 50, S), 8);
        leases.done(3, false);
        assert!(decided(&leases, 3, 1).is_some());
        // Two of the eight were used when it expired: the next lease is four.
        assert!(matches!(leases.take(3, S, false), Take::Ask { size: 4 }));
        leases.keep(3, S, admitted(100, 50, S), 4);
        leases.done(3, false);
        for _ in 0..3 {
            assert!(decided(&leases, 3, S + 1).is_some());
        }
        // Used up: the next one doubles again.
        assert!(matches!(
            leases.take(3, S + 2, false),
            Take::Ask { size: 8 }
        ));
        leases.done(3, false);
        // One request of a lease of eight: the next is two. Redis granting
        // only the asking request (a nearly empty bucket) uses that lease
        // up, so the one after doubles.
        leases.keep(3, S + 2, admitted(100, 50, S), 8);
        assert!(matches!(
            leases.take(3, 3 * S, false),
            Take::Ask { size: 2 }
        ));
        leases.keep(3, 3 * S, admitted(100, 50, S), 1);
        leases.done(3, false);
        assert!(matches!(
            leases.take(3, 3 * S, false),
            Take::Ask { size: 4 }
        ));
        leases.done(3, false);
        // A short lease lives at least a millisecond.
        let leases = Leases::new(1000, 5, 1000);
        leases.keep(4, 0, admitted(100, 50, S), 5);
        assert!(decided(&leases, 4, MIN_LIFETIME_NS - 1).is_some());
        assert!(decided(&leases, 4, MIN_LIFETIME_NS).is_none());
    }

    #[test]
    fn waiters_of_a_failed_ask_do_not_ask_again() {
        let leases = Leases::new(S / 10, 8, 1000);
        assert!(matches!(leases.take(5, 0, false), Take::Ask { .. }));
        assert!(matches!(leases.take(5, 0, false), Take::Wait(_)));
        let mut asking = Asking::new(&leases, 5);
        asking.failed = true;
        drop(asking);
        // Every request that waited falls back, however many there were.
        assert!(matches!(leases.take(5, 0, true), Take::Unavailable));
        assert!(matches!(leases.take(5, 0, true), Take::Unavailable));
        // One that did not wait asks again.
        assert!(matches!(leases.take(5, 0, false), Take::Ask { .. }));
        leases.done(5, false);
        assert!(matches!(leases.take(5, 0, false), Take::Ask { .. }));
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
    fn replies_out_of_order_keep_the_latest_count() {
        // One request a second, five at a time, from a bucket of 20.
        let leases = Leases::new(S, 5, 1000);
        // A lease of five leaves 10 in Redis; then two requests that asked
        // for themselves alone leave 9 and 8. Taking moves the moment the
        // bucket is full later: 10, 11 and 12 intervals from now.
        let lease = admitted(20, 10, 10 * S);
        let singles = [admitted(20, 9, 11 * S), admitted(20, 8, 12 * S)];

        // The lease's reply first: each single's count is newer.
        let shown = leases.keep(1, 0, lease, 5);
        assert_eq!(shown.remaining, 10 + 4);
        assert_eq!(leases.keep(1, 0, singles[0], 1).remaining, 9 + 4);
        assert_eq!(leases.keep(1, 0, singles[1], 1).remaining, 8 + 4);
        let next = decided(&leases, 1, 0).expect("from the lease");
        assert_eq!(next.remaining, 8 + 3);
        // The reset agrees: 20 - 11 requests to refill.
        assert_eq!(next.reset_ns, 9 * S);

        // The singles' replies first: the lease's older count does not
        // replace theirs.
        assert_eq!(leases.keep(2, 0, singles[0], 1).remaining, 9);
        assert_eq!(leases.keep(2, 0, singles[1], 1).remaining, 8);
        assert_eq!(leases.keep(2, 0, lease, 5).remaining, 8 + 4);
        assert_eq!(
            decided(&leases, 2, 0).expect("from the lease").remaining,
            8 + 3
        );

        // A count noted longer than a lease's lifetime ago gives way, as
        // after Redis lost the bucket.
        let restarted = admitted(20, 19, S);
        assert_eq!(leases.keep(2, 6 * S, restarted, 1).remaining, 19);
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
        // A key without room calls Redis for itself alone, because the rest
        // of a lease would be lost.
        assert!(matches!(
            leases.take(u64::MAX, 0, false),
            Take::Ask { size: 1 }
        ));
        // Once they expire, new keys take their places.
        leases.keep(42, S, admitted(1000, 5, S), 10);
        assert!(decided(&leases, 42, S).is_some());
    }
}
