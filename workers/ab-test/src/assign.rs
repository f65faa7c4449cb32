//! Assignment of a user to a variant by a stable hash of the user id.
//!
//! The hash is XXH64 (seed 0) of the bytes `EXPERIMENT:USER_ID`. The
//! experiment name salts the hash, so one user's variants in two experiments
//! are independent. Experiment names cannot contain `:`, so two different
//! (experiment, user) pairs never hash the same input. The 64-bit hash `h`
//! becomes a point in `[0, total_weight)` as `(h * total_weight) >> 64`
//! (128-bit product), and the variant whose cumulative weight range contains
//! the point wins. Any system that has XXH64 can reproduce an assignment, for
//! instance to join experiment exposure with analytics offline.

use xxhash_rust::xxh64::Xxh64;

/// Returns the 64-bit assignment hash of `user_id` in `experiment`.
pub fn user_hash(experiment: &str, user_id: &str) -> u64 {
    let mut hasher = Xxh64::new(0);
    hasher.update(experiment.as_bytes());
    hasher.update(b":");
    hasher.update(user_id.as_bytes());
    hasher.digest()
}

/// Returns the index of the weight range that `hash` falls in. `weights`
/// must be non-empty and `total` their sum, greater than 0.
pub fn pick(weights: impl IntoIterator<Item = u64>, total: u64, hash: u64) -> usize {
    let point = ((u128::from(hash) * u128::from(total)) >> 64) as u64;
    let mut end = 0;
    let mut last = 0;
    for (index, weight) in weights.into_iter().enumerate() {
        end += weight;
        if point < end {
            return index;
        }
        last = index;
    }
    // Unreachable while `total` is the sum of the weights, because the point
    // is below `total`.
    last
}

#[cfg(test)]
mod tests {
    use super::*;

    const USERS: u32 = 100_000;

    /// Assigns `USERS` user ids and returns the share of each weight range
    /// in percent.
    fn shares(experiment: &str, weights: &[u64]) -> Vec<f64> {
        let total = weights.iter().sum();
        let mut counts = vec![0u32; weights.len()];
        for user in 0..USERS {
            let hash = user_hash(experiment, &format!("user-{user}"));
            counts[pick(weights.iter().copied(), total, hash)] += 1;
        }
        counts
            .iter()
            .map(|&count| f64::from(count) * 100.0 / f64::from(USERS))
            .collect()
    }

    fn assert_within_one_point(experiment: &str, weights: &[u64]) {
        let total: u64 = weights.iter().sum();
        let shares = shares(experiment, weights);
        for (weight, share) in weights.iter().zip(&shares) {
            let expected = *weight as f64 * 100.0 / total as f64;
            assert!(
                (share - expected).abs() < 1.0,
                "{experiment}: weight {weight} of {total} got {share:.2}%, expected {expected:.2}%"
            );
        }
    }

    #[test]
    fn weights_honoured_over_100k_users() {
        assert_within_one_point("checkout", &[90, 10]);
        assert_within_one_point("checkout", &[50, 50]);
        assert_within_one_point("pricing", &[50, 30, 20]);
        assert_within_one_point("search", &[1, 1, 1, 1, 1]);
        assert_within_one_point("rollout", &[99, 1]);
        assert_within_one_point("ranking", &[333, 333, 334]);
    }

    #[test]
    fn ids_that_differ_slightly_spread_evenly() {
        // Sequential numeric ids, as a database hands them out.
        let total = 2;
        let mut first = 0;
        for user in 0..USERS {
            let hash = user_hash("numeric", &user.to_string());
            if pick([1, 1], total, hash) == 0 {
                first += 1;
            }
        }
        let share = f64::from(first) * 100.0 / f64::from(USERS);
        assert!((share - 50.0).abs() < 1.0, "got {share:.2}%");
    }

    #[test]
    fn same_user_same_variant() {
        let weights = [90, 10];
        for user in ["alice", "bob", "7", ""] {
            let first = pick(weights, 100, user_hash("checkout", user));
            for _ in 0..3 {
                assert_eq!(pick(weights, 100, user_hash("checkout", user)), first);
            }
        }
    }

    #[test]
    fn experiments_are_independent() {
        // With two 50/50 experiments, each of the four combinations should
        // hold a quarter of the users if the salts decorrelate them.
        let mut combinations = [0u32; 4];
        for user in 0..USERS {
            let id = format!("user-{user}");
            let a = pick([1, 1], 2, user_hash("header-colour", &id));
            let b = pick([1, 1], 2, user_hash("checkout-flow", &id));
            combinations[a * 2 + b] += 1;
        }
        for count in combinations {
            let share = f64::from(count) * 100.0 / f64::from(USERS);
            assert!((share - 25.0).abs() < 1.0, "got {share:.2}%");
        }
    }

    #[test]
    fn hash_is_xxh64_of_experiment_colon_user() {
        // Reference values from xxhash-rust's one-shot function, so that the
        // streaming form above stays byte-for-byte the documented input.
        assert_eq!(
            user_hash("checkout", "alice"),
            xxhash_rust::xxh64::xxh64(b"checkout:alice", 0)
        );
        // XXH64 of the empty input with seed 0, from the XXH64 specification.
        assert_eq!(xxhash_rust::xxh64::xxh64(b"", 0), 0xEF46_DB37_51D8_E999);
    }

    #[test]
    fn pick_bounds() {
        assert_eq!(pick([90, 10], 100, 0), 0);
        assert_eq!(pick([90, 10], 100, u64::MAX), 1);
        assert_eq!(pick([1], 1, u64::MAX), 0);
        // The point for 0.9 of the hash range is 90, the first of variant 1.
        let ninety_percent = ((u128::from(u64::MAX) + 1) * 9 / 10) as u64;
        assert_eq!(pick([90, 10], 100, ninety_percent - 1), 0);
        assert_eq!(pick([90, 10], 100, ninety_percent + 1), 1);
    }
}
