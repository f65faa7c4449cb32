//! The local limiter: the four algorithms as pure functions of a small state
//! and the time, and a sharded, bounded table of states by client key.
//!
//! Every algorithm keeps 16 bytes per client key ([`State`]), so a table of
//! 100,000 keys takes about 3 MiB. The table is split into shards, each
//! behind its own mutex that is held only for one state update, so serving
//! threads rarely wait for each other. A shard that reaches its share of
//! `max_keys` first drops the keys that are idle (their state is the same as
//! a fresh key's), then, if that frees too little, the keys that would
//! become idle soonest. Idle keys are also swept out every
//! [`SWEEP_INTERVAL`].

use std::collections::HashMap;
use std::hash::{BuildHasher, BuildHasherDefault, Hasher, RandomState};
use std::sync::{Mutex, PoisonError};

use super::{Decision, Shape};

/// How often a shard drops its idle keys, in nanoseconds.
pub const SWEEP_INTERVAL: u64 = 10_000_000_000;

/// Shards of a table. A power of two.
const SHARDS: usize = 32;

/// The state of one client key under one limit.
///
/// - token and leaky bucket (GCRA): `t` is the theoretical arrival time, the
///   time at which the bucket is empty again, in nanoseconds;
/// - fixed window: `t` is the window's index and `c` its count;
/// - sliding window: `t` is the current window's index, `c` its count and
///   `p` the previous window's count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct State {
    pub t: u64,
    pub c: u32,
    pub p: u32,
}

impl Shape {
    /// Returns whether requests over the burst wait their turn (a leaky
    /// bucket in queue mode) instead of being rejected.
    pub fn queues(&self) -> bool {
        matches!(*self, Shape::Bucket { queue, .. } if queue > 0)
    }

    /// Decides one request at `now` (nanoseconds on the limiter's clock) and
    /// updates `state` when it is admitted.
    pub fn decide(&self, state: &mut State, now: u64) -> Decision {
        match *self {
            Shape::Bucket {
                interval_ns,
                burst,
                queue,
            } => {
                let t = interval_ns;
                let capacity = burst.saturating_add(queue);
                let tat = state.t.max(now);
                let new_tat = tat.saturating_add(t);
                // The bucket's level after this request, as time to drain.
                let ahead = new_tat - now;
                let room = capacity.saturating_mul(t);
                if ahead > room {
                    return Decision {
                        allowed: false,
                        limit: capacity,
                        remaining: 0,
                        reset_ns: tat - now,
                        retry_after_ns: ahead - room,
                        delay_ns: 0,
                    };
                }
                state.t = new_tat;
                Decision {
                    allowed: true,
                    limit: capacity,
                    remaining: (room - ahead) / t,
                    reset_ns: ahead,
                    retry_after_ns: 0,
                    delay_ns: ahead.saturating_sub(burst.saturating_mul(t)),
                }
            }
            Shape::FixedWindow { limit, window_ns } => {
                // Another thread may have decided a later time first. Going
                // back to its earlier window would reset the later count, so
                // the request counts in the state's window instead.
                let now = now.max(state.t * window_ns);
                let window = now / window_ns;
                if state.t != window {
                    *state = State {
                        t: window,
                        c: 0,
                        p: 0,
                    };
                }
                let reset = (window + 1) * window_ns - now;
                let count = u64::from(state.c);
                if count >= limit {
                    return Decision::denied(limit, reset, reset);
                }
                state.c += 1;
                Decision {
                    allowed: true,
                    limit,
                    remaining: limit - count - 1,
                    reset_ns: reset,
                    retry_after_ns: 0,
                    delay_ns: 0,
                }
            }
            Shape::SlidingWindow { limit, window_ns } => {
                // As in the fixed window, a request never goes back to an earlier window.
                let now = now.max(state.t * window_ns);
                let window = now / window_ns;
                if state.t != window {
                    let previous = if state.t + 1 == window { state.c } else { 0 };
                    *state = State {
                        t: window,
                        c: 0,
                        p: previous,
                    };
                }
                let w = u128::from(window_ns);
                let elapsed = u128::from(now - window * window_ns);
                let (c, p, n) = (u128::from(state.c), u128::from(state.p), u128::from(limit));
                // The estimate of requests in the last window, scaled by the
                // window's length: the previous window's count weighted by
                // the part of it still inside, plus the current count.
                let estimate = p * (w - elapsed) + c * w;
                let until_end = w - elapsed;
                if estimate + w > n * w {
                    let retry = sliding_retry(c, p, n, w, elapsed);
                    return Decision::denied(limit, sliding_reset(c, p, until_end, w), retry);
                }
                state.c += 1;
                let estimate = estimate + w;
                Decision {
                    allowed: true,
                    limit,
                    remaining: ((n * w - estimate) / w) as u64,
                    reset_ns: sliding_reset(c + 1, p, until_end, w),
                    retry_after_ns: 0,
                    delay_ns: 0,
                }
            }
        }
    }

    /// Returns the time at which a key's state becomes the same as a fresh
    /// key's, so it can be dropped without changing any decision.
    pub fn idle_at(&self, state: &State) -> u64 {
        match *self {
            Shape::Bucket { .. } => state.t,
            Shape::FixedWindow { window_ns, .. } => state.t.saturating_add(1) * window_ns,
            Shape::SlidingWindow { window_ns, .. } => {
                let windows = if state.c > 0 { 2 } else { 1 };
                state.t.saturating_add(windows) * window_ns
            }
        }
    }
}

/// Nanoseconds until the requests counted now have left the sliding window.
fn sliding_reset(c: u128, p: u128, until_end: u128, w: u128) -> u64 {
    let reset = if c > 0 {
        until_end + w
    } else if p > 0 {
        until_end
    } else {
        0
    };
    reset as u64
}

/// Nanoseconds until a sliding window admits a request again, given the
/// current count `c`, the previous count `p`, the limit `n`, the window `w`
/// and the time `elapsed` in the current window.
fn sliding_retry(c: u128, p: u128, n: u128, w: u128, elapsed: u128) -> u64 {
    // In this window: p * (w - e) + (c + 1) * w <= n * w, so
    // e >= w - (n - c - 1) * w / p.
    if c < n && p > 0 {
        let needed = w - (n - c - 1) * w / p;
        if needed < w {
            return (needed - elapsed).max(1) as u64;
        }
    }
    // In the next window the current count becomes the previous one:
    // c * (w - e) + w <= n * w, so e >= w - (n - 1) * w / c.
    let needed = if c > n - 1 { w - (n - 1) * w / c } else { 0 };
    (w - elapsed + needed).max(1) as u64
}

impl Decision {
    fn denied(limit: u64, reset_ns: u64, retry_after_ns: u64) -> Decision {
        Decision {
            allowed: false,
            limit,
            remaining: 0,
            reset_ns,
            retry_after_ns,
            delay_ns: 0,
        }
    }
}

/// A table of states by key hash, bounded to about `max_keys` entries.
pub struct LocalTable {
    shape: Shape,
    shards: Box<[Mutex<Shard>]>,
    shard_cap: usize,
    hasher: RandomState,
    /// The random keys of [`LocalTable::hash_ipv4`]'s mixer. The two
    /// multipliers are odd.
    ipv4_keys: [u64; 3],
}

struct Shard {
    map: HashMap<u64, State, BuildHasherDefault<KeyHasher>>,
    /// When idle keys were last swept out.
    swept_at: u64,
    /// The latest time a decision of this shard was made at.
    latest: u64,
}

impl std::fmt::Debug for LocalTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalTable")
            .field("shape", &self.shape)
            .field("keys", &self.len())
            .finish_non_exhaustive()
    }
}

impl LocalTable {
    /// Creates a table for `shape` that keeps at most about `max_keys` keys.
    pub fn new(shape: Shape, max_keys: usize) -> LocalTable {
        let shard_cap = max_keys.div_ceil(SHARDS).max(1);
        let shards = (0..SHARDS)
            .map(|_| {
                Mutex::new(Shard {
                    map: HashMap::default(),
                    swept_at: 0,
                    latest: 0,
                })
            })
            .collect();
        LocalTable {
            shape,
            shards,
            shard_cap,
            hasher: RandomState::new(),
            ipv4_keys: [
                fastrand::u64(..),
                fastrand::u64(..) | 1,
                fastrand::u64(..) | 1,
            ],
        }
    }

    /// Hashes a client key with this table's random seed. Distinct keys are
    /// told apart by their 64-bit hash alone; the seed keeps clients from
    /// choosing keys that collide.
    pub fn hash(&self, domain: u8, key: &[u8]) -> u64 {
        let mut hasher = self.hasher.build_hasher();
        hasher.write_u8(domain);
        hasher.write(key);
        hasher.finish()
    }

    /// Hashes an IPv4 client address with a keyed mixer instead of SipHash,
    /// at about a fifth of the instructions (callgrind). The mixer is a
    /// bijection of the 40 bits of `domain` and address, so no two addresses
    /// share a hash, and its random keys keep clients from telling which
    /// shard or bucket their address lands in. A hash of another domain or
    /// key type equals one of these only by chance, as two SipHash values do.
    pub fn hash_ipv4(&self, domain: u8, ip: std::net::Ipv4Addr) -> u64 {
        let [key, multiplier, second_multiplier] = self.ipv4_keys;
        let mut x = (u64::from(domain) << 32 | u64::from(u32::from(ip))) ^ key;
        // Each step is invertible: a xor, a multiplication by an odd number
        // and a xor with a right shift of itself.
        x = x.wrapping_mul(multiplier);
        x ^= x >> 29;
        x = x.wrapping_mul(second_multiplier);
        x ^ (x >> 32)
    }

    /// Decides one request for the key with hash `key` at `now`.
    pub fn decide(&self, key: u64, now: u64) -> Decision {
        // Bits 32 to 36 pick the shard: the map uses the low bits for its
        // bucket and the top seven as tags.
        let shard = &self.shards[(key >> 32) as usize & (SHARDS - 1)];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        // Requests are decided at their arrival time, and a serving thread
        // may decide one that arrived before another thread's last one. A
        // bucket decided at an earlier time than its last decision would
        // count that request as further ahead than it is, so the time never
        // goes back within a shard.
        let now = now.max(shard.latest);
        shard.latest = now;
        if now.saturating_sub(shard.swept_at) >= SWEEP_INTERVAL {
            shard.sweep_idle(&self.shape, now);
        }
        if let Some(state) = shard.map.get_mut(&key) {
            return self.shape.decide(state, now);
        }
        if shard.map.len() >= self.shard_cap {
            shard.make_room(&self.shape, now, self.shard_cap);
        }
        let mut state = State::default();
        let decision = self.shape.decide(&mut state, now);
        if decision.allowed {
            shard.map.insert(key, state);
        }
        decision
    }

    /// Gives back one queue place of a bucket at the key with hash `key`:
    /// moves its theoretical arrival time back by one interval, never before
    /// `now`.
    pub fn give_back(&self, key: u64, now: u64) {
        let Shape::Bucket { interval_ns, .. } = self.shape else {
            return;
        };
        let shard = &self.shards[(key >> 32) as usize & (SHARDS - 1)];
        let mut shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(state) = shard.map.get_mut(&key) {
            state.t = state.t.saturating_sub(interval_ns).max(now);
        }
    }

    /// Returns how many requests the key with hash `key` would have admitted
    /// at `now`, and the most it can admit at once, without counting one.
    pub fn level(&self, key: u64, now: u64) -> (u64, u64) {
        let shard = &self.shards[(key >> 32) as usize & (SHARDS - 1)];
        let mut state = shard
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .map
            .get(&key)
            .copied()
            .unwrap_or_default();
        let trial = self.shape.decide(&mut state, now);
        let available = if trial.allowed {
            trial.remaining + 1
        } else {
            0
        };
        (available, trial.limit)
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().unwrap_or_else(PoisonError::into_inner).map.len())
            .sum()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The most keys the table holds.
    pub fn capacity(&self) -> usize {
        self.shard_cap * SHARDS
    }
}

impl Shard {
    fn sweep_idle(&mut self, shape: &Shape, now: u64) {
        self.map.retain(|_, state| shape.idle_at(state) > now);
        self.swept_at = now;
        // Give memory back after a burst of keys has gone idle.
        if self.map.capacity() > 64 && self.map.len() < self.map.capacity() / 4 {
            self.map.shrink_to(self.map.len() * 2);
        }
    }

    /// Frees room in a full shard: drops idle keys, and when fewer than a
    /// quarter of the slots come free that way, the keys that would become
    /// idle soonest, down to three quarters of the cap. One pass frees at
    /// least a quarter of the shard, so the cost per new key stays constant.
    fn make_room(&mut self, shape: &Shape, now: u64, cap: usize) {
        self.sweep_idle(shape, now);
        let target = cap - cap / 4;
        if self.map.len() <= target {
            return;
        }
        let mut idle_at: Vec<u64> = self.map.values().map(|s| shape.idle_at(s)).collect();
        let drop = idle_at.len() - target;
        let (_, &mut threshold, _) = idle_at.select_nth_unstable(drop - 1);
        let mut dropped = 0;
        self.map.retain(|_, state| {
            if dropped < drop && shape.idle_at(state) <= threshold {
                dropped += 1;
                false
            } else {
                true
            }
        });
    }
}

/// The table's keys are already keyed hashes, so the map uses them as they
/// are.
#[derive(Default)]
pub(super) struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }

    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(byte);
        }
    }

    fn write_u64(&mut self, value: u64) {
        self.0 = value;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: u64 = 1_000_000;
    const S: u64 = 1_000_000_000;
    /// A start time that is not on a window edge.
    const T0: u64 = 1_000 * S;

    /// Runs `count` requests at `now` and returns how many were admitted.
    fn admitted(shape: &Shape, state: &mut State, now: u64, count: usize) -> usize {
        (0..count)
            .filter(|_| shape.decide(state, now).allowed)
            .count()
    }

    fn token_bucket(per_second: u64, burst: u64) -> Shape {
        Shape::Bucket {
            interval_ns: S / per_second,
            burst,
            queue: 0,
        }
    }

    #[test]
    fn token_bucket_bursts_then_refills_at_the_rate() {
        // 10/s with a burst of 5.
        let shape = token_bucket(10, 5);
        let mut state = State::default();
        let first = shape.decide(&mut state, T0);
        assert!(first.allowed);
        assert_eq!((first.limit, first.remaining), (5, 4));
        assert_eq!(admitted(&shape, &mut state, T0, 10), 4);
        let denied = shape.decide(&mut state, T0);
        assert!(!denied.allowed);
        assert_eq!(denied.remaining, 0);
        // The next token arrives after one interval, 100 ms.
        assert_eq!(denied.retry_after_ns, 100 * MS);
        // Full again after five intervals.
        assert_eq!(denied.reset_ns, 500 * MS);
        assert!(!shape.decide(&mut state, T0 + 99 * MS).allowed);
        assert!(shape.decide(&mut state, T0 + 100 * MS).allowed);
        assert!(!shape.decide(&mut state, T0 + 150 * MS).allowed);
        // Over a long run it admits the rate, not more.
        let mut total = 0;
        for step in 0..100 {
            total += admitted(&shape, &mut state, T0 + 200 * MS + step * 50 * MS, 3);
        }
        // 100 steps of 50 ms = 5 s at 10/s; the bucket was empty at the start.
        assert!((49..=51).contains(&total), "{total}");
        // After a pause the whole burst is back, and no more.
        assert_eq!(admitted(&shape, &mut state, T0 + 60 * S, 10), 5);
    }

    #[test]
    fn earlier_arrival_decided_later_counts_once() {
        // 1/s with a burst of 2: nothing refills within these milliseconds.
        let table = LocalTable::new(token_bucket(1, 2), 100);
        let later = table.decide(7, T0 + MS);
        assert!(later.allowed);
        assert_eq!(later.remaining, 1);
        // Another thread decides a request that arrived a millisecond before.
        let earlier = table.decide(7, T0);
        assert!(earlier.allowed, "the burst has room for it");
        assert_eq!(earlier.remaining, 0);
        assert!(!table.decide(7, T0 + 2 * MS).allowed);
    }

    #[test]
    fn leaky_bucket_rejects_faster_than_its_outflow() {
        // 10/s, burst 1: one request per 100 ms, no bursts.
        let shape = token_bucket(10, 1);
        let mut state = State::default();
        assert_eq!(admitted(&shape, &mut state, T0, 3), 1);
        assert!(!shape.decide(&mut state, T0 + 50 * MS).allowed);
        assert!(shape.decide(&mut state, T0 + 100 * MS).allowed);
        assert!(shape.decide(&mut state, T0 + 200 * MS).allowed);
        // A request every 100 ms passes, one every 90 ms does not always.
        let passed = (3..20)
            .filter(|i| shape.decide(&mut state, T0 + i * 90 * MS).allowed)
            .count();
        assert!(passed < 17, "{passed}");
    }

    #[test]
    fn leaky_bucket_queue_spaces_requests_and_bounds_the_queue() {
        // 10/s with up to 3 requests waiting.
        let shape = Shape::Bucket {
            interval_ns: 100 * MS,
            burst: 1,
            queue: 3,
        };
        let mut state = State::default();
        let delays: Vec<Option<u64>> = (0..6)
            .map(|_| {
                let d = shape.decide(&mut state, T0);
                d.allowed.then_some(d.delay_ns)
            })
            .collect();
        assert_eq!(
            delays,
            [
                Some(0),
                Some(100 * MS),
                Some(200 * MS),
                Some(300 * MS),
                None,
                None
            ]
        );
        // The first queued request has left after 100 ms, so one more fits,
        // behind the other two.
        let next = shape.decide(&mut state, T0 + 100 * MS);
        assert!(next.allowed);
        assert_eq!(next.delay_ns, 300 * MS);
        let refused = shape.decide(&mut state, T0 + 100 * MS);
        assert!(!refused.allowed);
        assert_eq!(refused.retry_after_ns, 100 * MS);
    }

    #[test]
    fn fixed_window_resets_at_the_window_edge() {
        let shape = Shape::FixedWindow {
            limit: 3,
            window_ns: 60 * S,
        };
        let mut state = State::default();
        let edge = 120 * S; // a window starts here
        let first = shape.decide(&mut state, edge - 10 * S);
        assert_eq!((first.remaining, first.reset_ns), (2, 10 * S));
        assert_eq!(admitted(&shape, &mut state, edge - 5 * S, 5), 2);
        let denied = shape.decide(&mut state, edge - 1);
        assert!(!denied.allowed);
        assert_eq!(denied.retry_after_ns, 1);
        // The new window admits the whole limit at once: up to twice the
        // limit can pass around an edge.
        assert_eq!(admitted(&shape, &mut state, edge, 5), 3);
        let denied = shape.decide(&mut state, edge + 30 * S);
        assert_eq!(denied.retry_after_ns, 30 * S);
    }

    /// Returns a fixed and a sliding window of one second that admit `limit`.
    fn windows_of_one_second(limit: u64) -> [Shape; 2] {
        [
            Shape::FixedWindow {
                limit,
                window_ns: S,
            },
            Shape::SlidingWindow {
                limit,
                window_ns: S,
            },
        ]
    }

    #[test]
    fn windows_never_go_back_to_an_earlier_window() {
        for shape in windows_of_one_second(2) {
            let mut state = State::default();
            assert!(shape.decide(&mut state, T0 + S).allowed);
            // This request read its time before the first one but is decided after it.
            assert!(shape.decide(&mut state, T0 + S - 1).allowed, "{shape:?}");
            assert!(!shape.decide(&mut state, T0 + S).allowed, "{shape:?}");
        }
    }

    #[test]
    fn sliding_window_weighs_the_previous_window() {
        let shape = Shape::SlidingWindow {
            limit: 10,
            window_ns: 60 * S,
        };
        let mut state = State::default();
        let edge = 120 * S;
        assert_eq!(admitted(&shape, &mut state, edge - 30 * S, 20), 10);
        // Just after the edge the previous 10 still count almost fully.
        assert_eq!(admitted(&shape, &mut state, edge + S, 20), 0);
        // A quarter into the window, 3/4 of them count: 7.5, so 2 more pass.
        assert_eq!(admitted(&shape, &mut state, edge + 15 * S, 20), 2);
        let denied = shape.decide(&mut state, edge + 15 * S);
        assert!(!denied.allowed);
        // The next admission needs 10 * (1 - e/60) + 2 + 1 <= 10, so
        // e >= 18 s: three seconds from now.
        assert_eq!(denied.retry_after_ns, 3 * S);
        assert!(!shape.decide(&mut state, edge + 18 * S - 1).allowed);
        assert!(shape.decide(&mut state, edge + 18 * S).allowed);
        // Two windows later nothing counts.
        assert_eq!(admitted(&shape, &mut state, edge + 150 * S, 20), 10);
    }

    #[test]
    fn sliding_retry_crosses_into_the_next_window_when_full() {
        let shape = Shape::SlidingWindow {
            limit: 4,
            window_ns: 10 * S,
        };
        let mut state = State::default();
        assert_eq!(admitted(&shape, &mut state, 5 * S, 4), 4);
        let denied = shape.decide(&mut state, 5 * S);
        // Next window: 4 * (1 - e/10) + 1 <= 4, e >= 2.5 s; 5 s to the edge.
        assert_eq!(denied.retry_after_ns, 7_500 * MS);
        assert!(!shape.decide(&mut state, 12_500 * MS - 1).allowed);
        assert!(shape.decide(&mut state, 12_500 * MS).allowed);
    }

    #[test]
    fn remaining_never_goes_negative_and_denials_do_not_count() {
        let [fixed, sliding] = windows_of_one_second(2);
        for shape in [token_bucket(1, 2), fixed, sliding] {
            let mut state = State::default();
            let remaining: Vec<u64> = (0..4)
                .map(|_| shape.decide(&mut state, T0).remaining)
                .collect();
            assert_eq!(remaining, [1, 0, 0, 0], "{shape:?}");
        }
    }

    #[test]
    fn given_back_places_go_to_the_next_request() {
        // 10/s with up to 3 requests waiting.
        let queued = Shape::Bucket {
            interval_ns: 100 * MS,
            burst: 1,
            queue: 3,
        };
        let table = LocalTable::new(queued, 1000);
        let key = table.hash(0, b"route");
        for _ in 0..4 {
            assert!(table.decide(key, T0).allowed);
        }
        assert!(!table.decide(key, T0).allowed);
        // Two queued requests leave before their turns, 50 ms in.
        table.give_back(key, T0 + 50 * MS);
        table.give_back(key, T0 + 50 * MS);
        let next = table.decide(key, T0 + 50 * MS);
        assert!(next.allowed);
        // The place of the request due at 200 ms.
        assert_eq!(next.delay_ns, 150 * MS);
        // Giving back more places than are queued never moves the bucket
        // before now, so no burst builds up.
        for _ in 0..10 {
            table.give_back(key, T0 + 60 * MS);
        }
        assert_eq!(table.decide(key, T0 + 60 * MS).delay_ns, 0);
        assert_eq!(table.decide(key, T0 + 60 * MS).delay_ns, 100 * MS);
    }

    #[test]
    fn give_back_leaves_windows_alone() {
        let window = Shape::FixedWindow {
            limit: 1,
            window_ns: S,
        };
        let table = LocalTable::new(window, 1000);
        let key = table.hash(0, b"a");
        assert!(table.decide(key, T0).allowed);
        table.give_back(key, T0);
        assert!(!table.decide(key, T0).allowed);
    }

    #[test]
    fn table_keeps_keys_apart() {
        let table = LocalTable::new(token_bucket(1, 1), 1000);
        let a = table.hash(0, b"a");
        let b = table.hash(0, b"b");
        assert!(table.decide(a, T0).allowed);
        assert!(!table.decide(a, T0).allowed);
        assert!(table.decide(b, T0).allowed);
        assert_eq!(table.len(), 2);
    }

    #[test]
    fn ipv4_hashes_are_distinct_and_spread_over_shards() {
        let table = LocalTable::new(token_bucket(1, 1), 1000);
        let mut seen = std::collections::HashSet::new();
        let mut per_shard = [0u32; SHARDS];
        // A /16 of neighbouring addresses, as one network's clients are.
        for n in 0..65_536u32 {
            let hash = table.hash_ipv4(4, std::net::Ipv4Addr::from(0x0a00_0000 | n));
            assert!(seen.insert(hash), "address {n} collided");
            per_shard[(hash >> 32) as usize & (SHARDS - 1)] += 1;
        }
        // 2,048 a shard on average; a poor mix would leave shards empty.
        for (shard, count) in per_shard.iter().enumerate() {
            assert!((1_500..2_600).contains(count), "shard {shard} got {count}");
        }
        let other_domain = table.hash_ipv4(5, std::net::Ipv4Addr::new(10, 0, 0, 1));
        assert!(!seen.contains(&other_domain));
    }

    #[test]
    fn a_million_keys_stay_within_the_bound() {
        // One request an hour.
        let hourly = Shape::Bucket {
            interval_ns: 3600 * S,
            burst: 1,
            queue: 0,
        };
        let table = LocalTable::new(hourly, 10_000);
        for i in 0u32..1_000_000 {
            // Every key stays busy for an hour, so none is idle.
            let key = table.hash(0, &i.to_le_bytes());
            assert!(table.decide(key, T0 + u64::from(i) * 1000).allowed);
        }
        let len = table.len();
        assert!(len <= table.capacity(), "{len}");
        assert!(len >= table.capacity() / 2, "{len}");
        // The most recent keys are the ones kept.
        let recent = table.hash(0, &999_999u32.to_le_bytes());
        assert!(!table.decide(recent, T0 + 1_000 * S).allowed);
    }

    #[test]
    fn idle_keys_are_swept_out() {
        let table = LocalTable::new(token_bucket(10, 1), 100_000);
        for i in 0u32..5_000 {
            table.decide(table.hash(0, &i.to_le_bytes()), T0);
        }
        assert_eq!(table.len(), 5_000);
        // Each bucket refills in 100 ms; a sweep runs on a shard's next
        // use after the sweep interval.
        let later = T0 + SWEEP_INTERVAL + S;
        for i in 0u32..1_000 {
            table.decide(table.hash(1, &i.to_le_bytes()), later);
        }
        assert!(table.len() <= 1_000, "{}", table.len());
    }
}
