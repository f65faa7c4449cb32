//! Stand-ins for the host imports, so a worker's hooks can run in native unit
//! tests (`cargo test` on the build machine's own target).
//!
//! This module exists only on targets other than `wasm32`. There the
//! [`config`](crate::config) functions read the config that [`set_config`]
//! stores, [`log`](crate::log) lines collect in a buffer that [`take_logs`]
//! drains, [`clock`](crate::clock) reads the standard library's clocks,
//! [`context`](crate::context) values live until [`clear_context`],
//! [`secrets`](crate::secrets) come from [`set_secret`], and
//! [`fetch::send`](crate::fetch::send) passes each request to the handler
//! that [`on_fetch`] sets. All of this state belongs to the current thread,
//! and the standard test harness runs each test on its own thread, so tests
//! do not see each other's state.
//!
//! ```
//! use edge_sdk::{log::Level, testing};
//!
//! testing::set_config(r#"{ "greeting": "hello" }"#);
//! assert_eq!(edge_sdk::config::get("greeting").as_deref(), Some("hello"));
//!
//! edge_sdk::log::warn("checked");
//! assert_eq!(testing::take_logs(), [(Level::Warn, "checked".to_string())]);
//!
//! edge_sdk::context::set("user", "alice").unwrap();
//! assert_eq!(edge_sdk::context::get("user").as_deref(), Some("alice"));
//! assert!(edge_sdk::context::set("User", "x").is_err());
//!
//! testing::set_secret("hmac", "s3cret");
//! assert_eq!(edge_sdk::secrets::get("hmac").as_deref(), Some("s3cret"));
//! ```

use std::cell::RefCell;

use crate::fetch::{FetchError, Request as FetchRequest, Response as FetchResponse};
use crate::log::Level;

/// A stand-in for the host's fetch: one result per request.
type FetchHandler = Box<dyn Fn(FetchRequest) -> Result<FetchResponse, FetchError>>;

thread_local! {
    static CONFIG: RefCell<serde_json::Map<String, serde_json::Value>> =
        RefCell::new(serde_json::Map::new());
    static LOGS: RefCell<Vec<(Level, String)>> = const { RefCell::new(Vec::new()) };
    static UPSTREAMS: RefCell<Vec<String>> = const { RefCell::new(Vec::new()) };
    static CONTEXT: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    static SECRETS: RefCell<Vec<(String, String)>> = const { RefCell::new(Vec::new()) };
    static FETCH: RefCell<Option<FetchHandler>> = const { RefCell::new(None) };
    static FETCH_ALLOWED: RefCell<Option<Vec<String>>> = const { RefCell::new(None) };
}

/// Sets the upstreams [`fetch::allowed`](crate::fetch::allowed) reports as
/// allowed on this thread. Until the first call it allows every upstream.
pub fn set_fetch_allowed(names: &[&str]) {
    FETCH_ALLOWED.with(|allowed| {
        *allowed.borrow_mut() = Some(names.iter().map(|name| name.to_string()).collect());
    });
}

pub(crate) fn fetch_allowed(name: &str) -> bool {
    FETCH_ALLOWED.with(|allowed| {
        allowed
            .borrow()
            .as_ref()
            .is_none_or(|names| names.iter().any(|allowed| allowed == name))
    })
}

/// Sets the function that answers this thread's
/// [`fetch::send`](crate::fetch::send) calls, one request at a time. Until
/// the first call every request fails with [`FetchError::NotAllowed`].
pub fn on_fetch(handler: impl Fn(FetchRequest) -> Result<FetchResponse, FetchError> + 'static) {
    FETCH.with(|fetch| *fetch.borrow_mut() = Some(Box::new(handler)));
}

pub(crate) fn fetch(request: FetchRequest) -> Result<FetchResponse, FetchError> {
    FETCH.with(|fetch| match &*fetch.borrow() {
        Some(handler) => handler(request),
        None => Err(FetchError::NotAllowed),
    })
}

/// The maximum number of context values on a request, as on the host.
const MAX_CONTEXT_VALUES: usize = 32;
/// The maximum context name length, in bytes, as on the host.
const MAX_CONTEXT_NAME_LEN: usize = 64;
/// The maximum context value length, in bytes, as on the host.
const MAX_CONTEXT_VALUE_LEN: usize = 1024;

/// Empties this thread's request context, as a new request starts.
pub fn clear_context() {
    CONTEXT.with(|context| context.borrow_mut().clear());
}

/// Stores the secret `name` for this thread, replacing an earlier value.
pub fn set_secret(name: &str, value: &str) {
    SECRETS.with(|secrets| {
        let mut secrets = secrets.borrow_mut();
        secrets.retain(|(key, _)| key != name);
        secrets.push((name.to_string(), value.to_string()));
    });
}

pub(crate) fn secret_get(name: &str) -> Option<String> {
    SECRETS.with(|secrets| {
        secrets
            .borrow()
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    })
}

pub(crate) fn context_get(name: &str) -> Option<String> {
    CONTEXT.with(|context| {
        context
            .borrow()
            .iter()
            .find(|(key, _)| key == name)
            .map(|(_, value)| value.clone())
    })
}

/// Sets a context value with the host's rules, so that a worker's unit test
/// fails where the host would reject the value.
pub(crate) fn context_set(name: &str, value: &str) -> Result<(), String> {
    let allowed = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b);
    if name.is_empty() || name.len() > MAX_CONTEXT_NAME_LEN || !name.bytes().all(allowed) {
        return Err(format!(
            "context name {name:?} must be 1 to {MAX_CONTEXT_NAME_LEN} bytes of lower-case \
             letters, digits, '-', '_' and '.'"
        ));
    }
    if value.len() > MAX_CONTEXT_VALUE_LEN {
        return Err(format!(
            "value of context {name:?} is {} bytes; the maximum is {MAX_CONTEXT_VALUE_LEN}",
            value.len()
        ));
    }
    CONTEXT.with(|context| {
        let mut context = context.borrow_mut();
        if let Some((_, old)) = context.iter_mut().find(|(key, _)| key == name) {
            *old = value.to_string();
            return Ok(());
        }
        if context.len() >= MAX_CONTEXT_VALUES {
            return Err(format!(
                "cannot set context {name:?}: the request already holds \
                 {MAX_CONTEXT_VALUES} values"
            ));
        }
        context.push((name.to_string(), value.to_string()));
        Ok(())
    })
}

/// Stores `json` as this thread's worker config, replacing the previous one.
/// Until the first call the config is an empty table.
///
/// # Panics
///
/// Panics if `json` is not a JSON object, because the host always passes a
/// table.
pub fn set_config(json: &str) {
    let table = match serde_json::from_str(json) {
        Ok(serde_json::Value::Object(table)) => table,
        Ok(other) => panic!("test config must be a JSON object, got {other}"),
        Err(error) => panic!("test config is not valid JSON: {error}"),
    };
    CONFIG.with(|config| *config.borrow_mut() = table);
}

/// Stores `names` as this thread's upstreams, which
/// [`upstreams::exists`](crate::upstreams::exists) reads, replacing the
/// previous ones. Until the first call there are none.
pub fn set_upstreams(names: &[&str]) {
    UPSTREAMS.with(|upstreams| {
        *upstreams.borrow_mut() = names.iter().map(|name| name.to_string()).collect();
    });
}

/// Returns the log lines written on this thread since the last call, oldest
/// first, and clears them.
pub fn take_logs() -> Vec<(Level, String)> {
    LOGS.with(|logs| std::mem::take(&mut *logs.borrow_mut()))
}

pub(crate) fn record_log(level: Level, message: &str) {
    LOGS.with(|logs| logs.borrow_mut().push((level, message.to_string())));
}

/// Returns a key the way the host does: strings as they are, other values as
/// JSON text.
pub(crate) fn config_get(key: &str) -> Option<String> {
    CONFIG.with(|config| {
        config.borrow().get(key).map(|value| match value {
            serde_json::Value::String(text) => text.clone(),
            other => other.to_string(),
        })
    })
}

pub(crate) fn upstream_exists(name: &str) -> bool {
    UPSTREAMS.with(|upstreams| upstreams.borrow().iter().any(|upstream| upstream == name))
}

pub(crate) fn config_json() -> String {
    CONFIG.with(|config| serde_json::Value::Object(config.borrow().clone()).to_string())
}
