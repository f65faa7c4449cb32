//! Log lines from the worker. The host adds the route and module to each line.
//!
//! Standard output and standard error are not a log: the host links WASI
//! with an empty context, so write log lines through this module.
//!
//! On targets other than `wasm32`, for native unit tests, lines go to a buffer
//! of the current thread that `testing::take_logs` returns.

/// The severity of a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Very detailed tracing, usually off.
    Trace,
    /// Details useful while debugging a worker.
    Debug,
    /// Normal events.
    Info,
    /// Something unexpected that the worker handled.
    Warn,
    /// A failure, such as an invalid config.
    Error,
}

/// Writes one log line at `level`.
pub fn write(level: Level, message: &str) {
    #[cfg(target_arch = "wasm32")]
    {
        use crate::bindings::edge::worker::log as host;
        let level = match level {
            Level::Trace => host::Level::Trace,
            Level::Debug => host::Level::Debug,
            Level::Info => host::Level::Info,
            Level::Warn => host::Level::Warn,
            Level::Error => host::Level::Error,
        };
        host::write(level, message);
    }
    #[cfg(not(target_arch = "wasm32"))]
    crate::testing::record_log(level, message);
}

/// Writes a log line at [`Level::Trace`].
pub fn trace(message: &str) {
    write(Level::Trace, message);
}

/// Writes a log line at [`Level::Debug`].
pub fn debug(message: &str) {
    write(Level::Debug, message);
}

/// Writes a log line at [`Level::Info`].
pub fn info(message: &str) {
    write(Level::Info, message);
}

/// Writes a log line at [`Level::Warn`].
pub fn warn(message: &str) {
    write(Level::Warn, message);
}

/// Writes a log line at [`Level::Error`].
pub fn error(message: &str) {
    write(Level::Error, message);
}

/// Sends the message of a panic in this call to the node's log as an error
/// line. On `wasm32-unknown-unknown` the standard library has no stderr, so
/// without this hook a panicking worker would fail with no message. (On
/// `wasm32-wasip2` the host reads the message from the guest's stderr.)
#[cfg(all(target_arch = "wasm32", target_os = "unknown"))]
pub(crate) fn log_panics() {
    // A fresh instance serves each call, so the hook is set on every entry.
    // The closure captures nothing, so boxing it allocates nothing.
    std::panic::set_hook(Box::new(|info| error(&format!("worker panicked: {info}"))));
}

/// Does nothing: the standard library writes panic messages to stderr.
#[cfg(not(all(target_arch = "wasm32", target_os = "unknown")))]
pub(crate) fn log_panics() {}
