//! The node's wall clock and a monotonic clock.
//!
//! On targets other than `wasm32`, for native unit tests, both functions read
//! the standard library's clocks instead of calling the host.

/// Returns milliseconds since the Unix epoch, from the node's wall clock.
pub fn now_unix_ms() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::clock::now_unix_ms();

    #[cfg(not(target_arch = "wasm32"))]
    return std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |since_epoch| since_epoch.as_millis() as u64);
}

/// Returns nanoseconds from a monotonic clock with an arbitrary start. Use it
/// to measure durations within one call.
pub fn monotonic_ns() -> u64 {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::clock::monotonic_ns();

    #[cfg(not(target_arch = "wasm32"))]
    return {
        static START: std::sync::OnceLock<std::time::Instant> = std::sync::OnceLock::new();
        START
            .get_or_init(std::time::Instant::now)
            .elapsed()
            .as_nanos() as u64
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn monotonic_ns_never_decreases() {
        let first = monotonic_ns();
        let second = monotonic_ns();
        assert!(second >= first);
    }

    #[test]
    fn now_unix_ms_is_after_2020() {
        // 2020-01-01T00:00:00Z in milliseconds.
        assert!(now_unix_ms() > 1_577_836_800_000);
    }
}
