//! Stand-ins for the host imports, so a worker's hooks can run in native unit
//! tests (`cargo test` on the build machine's own target).
//!
//! This module exists only on targets other than `wasm32`. There the
//! [`config`](crate::config) functions read the config that [`set_config`]
//! stores, [`log`](crate::log) lines collect in a buffer that [`take_logs`]
//! drains, [`clock`](crate::clock) reads the standard library's clocks, and
//! [`fetch::send`](crate::fetch::send) passes each request to the handler
//! that [`on_fetch`] sets. The config, the log buffer and the fetch handler
//! belong to the current thread, and the standard test harness runs each
//! test on its own thread, so tests do not see each other's state.
//!
//! ```
//! use edge_sdk::{log::Level, testing};
//!
//! testing::set_config(r#"{ "greeting": "hello" }"#);
//! assert_eq!(edge_sdk::config::get("greeting").as_deref(), Some("hello"));
//!
//! edge_sdk::log::warn("checked");
//! assert_eq!(testing::take_logs(), [(Level::Warn, "checked".to_string())]);
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
    static FETCH: RefCell<Option<FetchHandler>> = const { RefCell::new(None) };
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

pub(crate) fn config_json() -> String {
    CONFIG.with(|config| serde_json::Value::Object(config.borrow().clone()).to_string())
}
