//! Secrets named in the worker's entry of the route's config (the
//! `[routes.workers.secrets]` table), with values written there or read from
//! an environment variable of the node. The host never logs their values;
//! a worker should not either.
//!
//! On targets other than `wasm32`, for native unit tests, [`get`] reads the
//! secrets that `testing::set_secret` stores.

/// Returns the secret named `name`, if the worker's entry names it.
pub fn get(name: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::secrets::get(name);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::secret_get(name);
}
