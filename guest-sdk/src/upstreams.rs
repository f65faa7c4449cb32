//! The upstreams declared in the node's config.
//!
//! A worker that routes requests to upstreams named in its config checks
//! those names in [`Worker::check_config`](crate::Worker::check_config), so
//! that a typo stops the node at load instead of failing requests.
//!
//! On targets other than `wasm32`, for native unit tests, [`exists`] reads the
//! current thread's names that `testing::set_upstreams` stores.

/// Returns whether the node's config declares an upstream named `name`.
pub fn exists(name: &str) -> bool {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::upstreams::exists(name);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::upstream_exists(name);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exists_reads_test_upstreams() {
        assert!(!exists("users"));
        crate::testing::set_upstreams(&["users", "payments"]);
        assert!(exists("users"));
        assert!(exists("payments"));
        assert!(!exists("Users"));
    }
}
