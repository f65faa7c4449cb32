//! What a worker instance can reach: the per-call store state and the host
//! side of the `log`, `config`, `clock`, `context`, `secrets` and
//! `upstreams` imports. The `fetch` and `crypto` imports have their own
//! modules.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use std::future::Future;

use wasmtime::component::{Linker, Resource, ResourceTable};
use wasmtime::{ResourceLimiter, StoreContextMut, Trap};
use wasmtime_wasi::p2::bindings::io::poll::{Host as PollHost, HostPollable};
use wasmtime_wasi::p2::DynPollable;
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use super::bindings::edge::worker::{clock, config, context, log, secrets, types};
use super::crypto::{AllowedUpstreams, HostCrypto};
use super::fetch::{FetchAccess, FetchState};
use super::running_time::RunningTime;
use super::stderr::StderrTail;
use crate::context::RequestContext;

/// The last bytes of a guest's stderr kept per call, to show a panic
/// message in logs.
const STDERR_CAPTURE: usize = 2048;

/// The state of one store: one call of one worker.
pub struct StoreState {
    /// WASI, built on the guest's first WASI call. A worker that neither
    /// panics nor prints makes none, which saves building a context (two
    /// seeded random number generators and a stderr buffer) on every call.
    wasi: Option<Wasi>,
    pub(super) table: ResourceTable,
    pub(super) limiter: MemoryCap,
    pub(super) settings: Arc<WorkerSettings>,
    /// Keys and key sets shared by every call on the node.
    pub(super) crypto: Arc<HostCrypto>,
    /// Time the call spent waiting in host calls for the network, which
    /// does not count against its CPU deadline.
    pub(super) host_wait: Duration,
    /// The request's context values, moved in for the call and back out
    /// after it.
    pub(super) context: RequestContext,
    /// The call's fetches: its request's id and the time spent waiting.
    pub(super) fetch: FetchState,
    /// The call's running time, which its CPU deadline counts.
    pub(super) running: RunningTime,
    /// Log lines the guest wrote in this call, kept or not.
    pub(super) log_lines: u32,
    /// The last error line the caps dropped in this call, redacted. A call
    /// that fails names it, because it is often the panic message of a
    /// worker built without WASI.
    pub(super) dropped_error: Option<String>,
}

/// A WASI context that grants nothing, with the guest's stderr captured.
struct Wasi {
    ctx: WasiCtx,
    stderr: StderrTail,
}

impl Wasi {
    /// Builds a WASI context that grants nothing: no preopened directories,
    /// environment, arguments or network. Stdin is empty, stdout discarded
    /// and stderr captured.
    fn new() -> Wasi {
        let stderr = StderrTail::new(STDERR_CAPTURE);
        let ctx = WasiCtx::builder()
            .allow_tcp(false)
            .allow_udp(false)
            .allow_ip_name_lookup(false)
            .stderr(stderr.clone())
            .build();
        Wasi { ctx, stderr }
    }
}

impl StoreState {
    /// Builds the state for one call with the worker's settings. WASI is
    /// built on first use.
    pub fn new(
        settings: Arc<WorkerSettings>,
        memory_cap: usize,
        crypto: Arc<HostCrypto>,
        context: RequestContext,
        fetch: FetchState,
        running: RunningTime,
    ) -> StoreState {
        StoreState {
            context,
            fetch,
            running,
            wasi: None,
            table: ResourceTable::new(),
            limiter: MemoryCap {
                cap: memory_cap,
                exceeded: None,
                exceeded_initially: false,
            },
            settings,
            crypto,
            host_wait: Duration::ZERO,
            log_lines: 0,
            dropped_error: None,
        }
    }

    /// Returns what the guest wrote to stderr, such as a panic message, with
    /// its secrets redacted.
    pub fn stderr(&self) -> String {
        match &self.wasi {
            Some(wasi) => {
                let text = wasi.stderr.text();
                let text = without_backtrace_hint(text.trim_end());
                one_line(&self.settings.redact(text.trim_end())).into_owned()
            }
            None => String::new(),
        }
    }
}

/// The line the Rust standard library adds to a panic message. A guest
/// gets no environment variables, so setting it on the node changes nothing.
const BACKTRACE_HINT: &str =
    "note: run with `RUST_BACKTRACE=1` environment variable to display a backtrace";

/// Removes the standard library's backtrace hint from the end of a guest's
/// stderr, because following it cannot help.
fn without_backtrace_hint(text: &str) -> &str {
    text.strip_suffix(BACKTRACE_HINT).unwrap_or(text)
}

/// Escapes the line breaks and other control characters (but tabs) of a
/// guest's text, so that it stays one record of the node's log. A guest, or
/// a client value it logs, then cannot start what looks like a line of its
/// own.
pub fn one_line(text: &str) -> std::borrow::Cow<'_, str> {
    if !text.chars().any(|c| c.is_control() && c != '\t') {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut escaped = String::with_capacity(text.len() + 16);
    for c in text.chars() {
        match c {
            '\n' => escaped.push_str("\\n"),
            '\r' => escaped.push_str("\\r"),
            '\t' => escaped.push('\t'),
            c if c.is_control() => escaped.extend(c.escape_default()),
            c => escaped.push(c),
        }
    }
    std::borrow::Cow::Owned(escaped)
}

impl WasiView for StoreState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        let wasi = self.wasi.get_or_insert_with(Wasi::new);
        WasiCtxView {
            ctx: &mut wasi.ctx,
            table: &mut self.table,
        }
    }
}

/// Caps the linear memory of one instance, recording a growth past the cap
/// so that the resulting trap can be reported as such.
pub struct MemoryCap {
    cap: usize,
    /// The size a denied growth asked for.
    pub exceeded: Option<usize>,
    /// Whether the denied growth was the memory's initial size, which the
    /// module sets, rather than a growth the guest asked for later.
    pub exceeded_initially: bool,
}

impl ResourceLimiter for MemoryCap {
    fn memory_growing(
        &mut self,
        current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.cap {
            self.exceeded = Some(desired);
            self.exceeded_initially = current == 0;
            wasmtime::bail!(
                "worker memory cap exceeded: growing to {desired} bytes, cap is {} bytes",
                self.cap
            );
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        // Each table element costs a pointer; hold tables to the same cap.
        Ok(desired.saturating_mul(size_of::<usize>()) <= self.cap)
    }
}

/// A worker's config from one route, prepared once at load for the
/// `config` import.
#[derive(Debug)]
pub struct WorkerSettings {
    /// The route the worker is bound to, added to its log lines.
    pub route: Arc<str>,
    /// The module's file name, added to its log lines.
    pub module: Arc<str>,
    /// Each top-level key: strings as they are, other values as JSON.
    values: HashMap<String, String>,
    /// The whole table as a JSON object.
    json: String,
    /// The upstreams the worker may fetch from; `None` without a `fetch`
    /// list.
    pub fetch: Option<FetchAccess>,
    /// The upstreams the worker may fetch key sets from.
    pub key_set_upstreams: AllowedUpstreams,
    /// The worker's secrets by name, resolved when the node loads.
    secrets: HashMap<String, Secret>,
    /// The names of the node's upstreams.
    pub(super) upstreams: Arc<HashSet<String>>,
    /// Admits the worker's log lines, over all its calls.
    pub(super) log_throttle: super::LogThrottle,
}

/// A secret value, kept out of `Debug` output and so out of logs.
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

impl WorkerSettings {
    /// Returns a guest's log message as the node prints it: secrets
    /// redacted, cut to [`MAX_LOG_BYTES`], on one line.
    fn printable(&self, message: &str) -> String {
        // Redact before cutting, so that a cut cannot leave part of a secret.
        let redacted = self.redact(message);
        let mut end = redacted.len().min(MAX_LOG_BYTES);
        while !redacted.is_char_boundary(end) {
            end -= 1;
        }
        one_line(&redacted[..end]).into_owned()
    }

    /// Prepares the config table of a worker bound to `route`.
    pub fn new(
        route: Arc<str>,
        module: Arc<str>,
        table: &toml::Table,
        secrets: HashMap<String, Secret>,
        upstreams: Arc<HashSet<String>>,
        fetch: Option<FetchAccess>,
        key_set_upstreams: AllowedUpstreams,
    ) -> WorkerSettings {
        let values = table
            .iter()
            .map(|(key, value)| {
                let text = match value {
                    toml::Value::String(text) => text.clone(),
                    other => serde_json::to_string(other).unwrap_or_default(),
                };
                (key.clone(), text)
            })
            .collect();
        let json = serde_json::to_string(table).unwrap_or_else(|_| "{}".to_owned());
        WorkerSettings {
            route,
            module,
            values,
            json,
            secrets,
            upstreams,
            fetch,
            key_set_upstreams,
            log_throttle: super::LogThrottle::default(),
        }
    }
}

impl types::Host for StoreState {}

/// The maximum number of log lines one call writes. Later ones are counted,
/// and one warning at the end of the call reports how many were dropped.
pub(super) const MAX_LOG_LINES: u32 = 64;
/// The maximum number of log lines a worker bound to one route writes a
/// second, over all its calls, so that a worker that logs (or panics) on
/// every request cannot flood the node's log.
pub(super) const LOG_LINES_PER_SECOND: u64 = 100;
/// The maximum length of a kept log message, in bytes; a longer one is cut.
const MAX_LOG_BYTES: usize = 4096;

impl WorkerSettings {
    /// Replaces every secret value in `text` with `[secret NAME]`, so that a
    /// worker that logs or panics with a secret does not put it in the node's
    /// logs.
    pub fn redact<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let mut text = std::borrow::Cow::Borrowed(text);
        for (name, secret) in &self.secrets {
            if !secret.0.is_empty() && text.contains(secret.0.as_str()) {
                text = std::borrow::Cow::Owned(
                    text.replace(secret.0.as_str(), &format!("[secret {name}]")),
                );
            }
        }
        text
    }
}

impl log::Host for StoreState {
    fn write(&mut self, level: log::Level, message: String) {
        // A line the node's log level filters out costs nothing, and uses
        // none of the worker's budget.
        let enabled = match level {
            log::Level::Trace => tracing::enabled!(tracing::Level::TRACE),
            log::Level::Debug => tracing::enabled!(tracing::Level::DEBUG),
            log::Level::Info => tracing::enabled!(tracing::Level::INFO),
            log::Level::Warn => tracing::enabled!(tracing::Level::WARN),
            log::Level::Error => tracing::enabled!(tracing::Level::ERROR),
        };
        if !enabled {
            return;
        }
        self.log_lines += 1;
        if self.log_lines > MAX_LOG_LINES {
            if level == log::Level::Error {
                self.dropped_error = Some(self.settings.printable(&message));
            }
            return;
        }
        let message = self.settings.printable(&message);
        let route = &*self.settings.route;
        let worker = &*self.settings.module;
        let Some(suppressed) = self
            .settings
            .log_throttle
            .admit_per_second(LOG_LINES_PER_SECOND)
        else {
            if level == log::Level::Error {
                self.dropped_error = Some(message);
            }
            return;
        };
        if suppressed > 0 {
            tracing::warn!(
                route,
                worker,
                suppressed,
                "worker log lines suppressed: over {LOG_LINES_PER_SECOND} a second"
            );
        }
        match level {
            log::Level::Trace => tracing::trace!(route, worker, "{message}"),
            log::Level::Debug => tracing::debug!(route, worker, "{message}"),
            log::Level::Info => tracing::info!(route, worker, "{message}"),
            log::Level::Warn => tracing::warn!(route, worker, "{message}"),
            log::Level::Error => tracing::error!(route, worker, "{message}"),
        }
    }
}

impl config::Host for StoreState {
    fn get(&mut self, key: String) -> Option<String> {
        self.settings.values.get(&key).cloned()
    }

    fn json(&mut self) -> String {
        self.settings.json.clone()
    }
}

impl context::Host for StoreState {
    fn get(&mut self, name: String) -> Option<String> {
        self.context.get(&name).map(str::to_owned)
    }

    fn set(&mut self, name: String, value: String) -> Result<(), String> {
        self.context.set(name, value)
    }
}

impl secrets::Host for StoreState {
    fn get(&mut self, name: String) -> Option<String> {
        self.settings
            .secrets
            .get(&name)
            .map(|secret| secret.0.clone())
    }
}

impl clock::Host for StoreState {
    fn now_unix_ms(&mut self) -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64)
    }

    fn monotonic_ns(&mut self) -> u64 {
        monotonic_start().elapsed().as_nanos() as u64
    }
}

fn monotonic_start() -> Instant {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *START.get_or_init(Instant::now)
}

/// The WASI interface whose `poll` and `pollable.block` the node replaces,
/// as `wasmtime_wasi` defines it.
const WASI_POLL: &str = "wasi:io/poll@0.2.12";

/// Replaces WASI's `poll` and `pollable.block` with ones that count the time
/// a guest blocks in them as running time, and end the wait at the guest's
/// deadline. A guest granted nothing else can block only to sleep.
pub(super) fn link_counted_poll(linker: &mut Linker<StoreState>) -> wasmtime::Result<()> {
    linker.allow_shadowing(true);
    let mut poll = linker.instance(WASI_POLL)?;
    poll.func_wrap_async(
        "poll",
        |mut store: StoreContextMut<'_, StoreState>,
         (pollables,): (Vec<Resource<DynPollable>>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let waiting = PollHost::poll(&mut state.table, pollables);
                Ok((counted_sleep(&mut state.running, waiting).await?,))
            })
        },
    )?;
    poll.func_wrap_async(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, StoreState>, (pollable,): (Resource<DynPollable>,)| {
            Box::new(async move {
                let state = store.data_mut();
                let waiting = HostPollable::block(&mut state.table, pollable);
                counted_sleep(&mut state.running, waiting).await
            })
        },
    )?;
    linker.allow_shadowing(false);
    Ok(())
}

/// Runs a guest's sleep, counting it as running time, and traps as at the
/// deadline when the deadline passes first.
async fn counted_sleep<R>(
    running: &mut RunningTime,
    sleep: impl Future<Output = wasmtime::Result<R>>,
) -> wasmtime::Result<R> {
    let left = running.left();
    let start = RunningTime::sleep_begins();
    let slept = tokio::time::timeout(left, sleep).await;
    running.sleep_ended(start);
    slept.unwrap_or_else(|_| Err(Trap::Interrupt.into()))
}
