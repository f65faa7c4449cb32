//! Values on the request context: a worker sets one (such as the user id it
//! authenticated), and later workers of the same request, rate limits keyed
//! `context:NAME` and the access log read it. Nothing in the context
//! survives the request.
//!
//! On targets other than `wasm32`, for native unit tests, these functions
//! use the current thread's context, which `testing::clear_context` empties.

/// Returns the value set under `name` by this or an earlier worker of the
/// request.
pub fn get(name: &str) -> Option<String> {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::context::get(name);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::context_get(name);
}

/// Sets `name` to `value` for the rest of the request, replacing an earlier
/// value.
///
/// # Errors
///
/// Returns the rule that was broken, and sets nothing, when `name` is not 1
/// to 64 bytes of lower-case letters, digits, `-`, `_` and `.`, when `value`
/// is longer than 1024 bytes, or when the request already carries 32 values.
pub fn set(name: &str, value: &str) -> Result<(), String> {
    #[cfg(target_arch = "wasm32")]
    return crate::bindings::edge::worker::context::set(name, value);

    #[cfg(not(target_arch = "wasm32"))]
    return crate::testing::context_set(name, value);
}
