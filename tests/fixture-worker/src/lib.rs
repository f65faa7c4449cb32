//! `fixture-worker`: a test-only worker for the host's end-to-end tests. The
//! config key `mode` selects what it does:
//!
//! - `counter`: increments a `static` counter and responds 200 with its value
//!   as text, which is `1` when every call gets a fresh instance.
//! - `loop`: loops forever, until the host's CPU deadline stops it.
//! - `alloc`: allocates and writes `bytes` bytes (default 1 GiB) in 1 MiB
//!   chunks that it keeps, then responds 200.
//! - `panic`: panics with the message `fixture panic`.
//! - `echo`: responds 200 with the request it received as JSON: `method`,
//!   `path`, `query`, `headers` (name to value, repeated names joined by
//!   `, `), `client_addr`, `route` and `params` (name to value).
//! - `spin`: busy-waits `ms` milliseconds of the host's monotonic clock, then
//!   continues.
//! - `work`: runs a fixed amount of computation, the number of rounds in the
//!   request header `x-rounds` (default 1), and responds 200 with its result;
//!   unlike `spin`, its CPU time does not depend on what else runs.
//! - `set`: continues, setting the `set_headers` table, removing the
//!   `remove_headers` array and, if given, changing the path to `path`.
//! - `route`: routes to `upstream`, setting the optional `set_headers` table.
//! - `respond`: responds with `status` (default 200), `body` (default empty)
//!   and the `headers` table.
//! - `response-header`: continues, and implements the response hook, which
//!   sets the `response_headers` table and `x-seen-status` to the upstream's
//!   status.
//! - `config`: responds 200 with the whole config as JSON.
//! - `log`: writes `fixture log` at each level, then continues.
//! - `clock`: responds 200 with `{"now_unix_ms":..,"monotonic_ns":..}`.
//! - `sleep`: sleeps `ms` milliseconds (default 10) with
//!   `std::thread::sleep`, then continues.
//! - `context-set`: sets the context value `name` to the request header
//!   `from_header` (when the request has it) or else to `value` (when given),
//!   then continues; a rejected value gets 500 `context_rejected`.
//! - `context-get`: continues, setting the header `x-context-NAME` to the
//!   context value `NAME` for each name in `names` that has one.
//! - `secret`: responds 200 with the secret `name` as the body, or 404 when
//!   the worker's entry names no such secret.
//! - `secret-leak`: writes 100 log lines that contain the secret `name`, then
//!   panics with a message that contains it.
//! - `fetch`: sends the `requests` array (each with `upstream`, `path`, and
//!   optional `method`, `headers` table, `body` text and `timeout_ms`) in
//!   one fetch call, and responds 200 with `{"results": [...]}`: per request
//!   either `{"status", "headers", "body"}` (the body as text) or
//!   `{"error": "not_allowed" | "timed_out" | "unavailable" |
//!   "response_too_large" | "invalid_request", "detail": ...}`. With
//!   `rounds` (default 1), it makes that many fetch calls one after
//!   another and reports every result in order.
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/fixture-worker.wasm"
//!
//! [routes.workers.config]
//! mode = "set"
//! set_headers = { "x-fixture" = "1" }
//! remove_headers = ["x-remove-me"]
//! path = "/rewritten"
//! ```
//!
//! The fixture does not check header names, values or statuses, so tests can
//! make it send invalid ones to the host. A missing or unknown `mode`, or a
//! config value of the wrong type, makes it respond 500 with
//! `{"error":"worker_config_invalid","message":"..."}`.

use std::collections::BTreeMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};

use edge_sdk::{
    Action, Hooks, Request, RequestChanges, Response, ResponseChanges, ResponseHead, Worker,
};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

const MIB: u64 = 1024 * 1024;

/// Calls made to this instance. The host creates a fresh instance for every
/// call, so it never exceeds 1 there.
static CALLS: AtomicU64 = AtomicU64::new(0);

/// The modes the config key `mode` may name.
const MODES: &[&str] = &[
    "counter",
    "loop",
    "alloc",
    "panic",
    "echo",
    "spin",
    "set",
    "route",
    "respond",
    "response-header",
    "config",
    "log",
    "clock",
    "sleep",
    "context-set",
    "context-get",
    "secret",
    "secret-leak",
    "fetch",
    "stderr",
    "log-many",
];

/// The JSON body of the fixture's error responses.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// Config of the `alloc` mode.
#[derive(Debug, Deserialize)]
struct AllocConfig {
    /// Bytes to allocate. Default: 1 GiB.
    bytes: Option<u64>,
}

/// Config of the `stderr` mode.
#[derive(Debug, Deserialize)]
struct StderrConfig {
    /// Lines of 100 bytes to write to stderr.
    lines: usize,
    /// Whether to panic after writing them.
    #[serde(default)]
    panic: bool,
}

/// Config of the `log-many` mode.
#[derive(Debug, Deserialize)]
struct LogManyConfig {
    /// Info lines to write in one call.
    lines: usize,
}

/// Config of the `spin` mode.
#[derive(Debug, Deserialize)]
struct SpinConfig {
    /// Milliseconds to busy-wait.
    ms: u64,
}

/// Config of the `sleep` mode.
#[derive(Debug, Deserialize)]
struct SleepConfig {
    /// Milliseconds to sleep.
    #[serde(default = "default_sleep_ms")]
    ms: u64,
}

fn default_sleep_ms() -> u64 {
    10
}

/// Config of the `set` mode.
#[derive(Debug, Deserialize)]
struct SetConfig {
    #[serde(default)]
    set_headers: BTreeMap<String, String>,
    #[serde(default)]
    remove_headers: Vec<String>,
    path: Option<String>,
}

/// Config of the `route` mode.
#[derive(Debug, Deserialize)]
struct RouteConfig {
    upstream: String,
    #[serde(default)]
    set_headers: BTreeMap<String, String>,
}

/// Config of the `context-set` mode.
#[derive(Debug, Deserialize)]
struct ContextSetConfig {
    name: String,
    from_header: Option<String>,
    value: Option<String>,
}

/// Config of the `context-get` mode.
#[derive(Debug, Deserialize)]
struct ContextGetConfig {
    names: Vec<String>,
}

/// Config of the `secret` mode.
#[derive(Debug, Deserialize)]
struct SecretConfig {
    name: String,
}

/// Config of the `respond` mode.
#[derive(Debug, Deserialize)]
struct RespondConfig {
    status: Option<u16>,
    #[serde(default)]
    body: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
}

/// Config of the `response-header` mode.
#[derive(Debug, Deserialize)]
struct ResponseHeaderConfig {
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
}

/// Config of the `fetch` mode.
#[derive(Debug, Deserialize)]
struct FetchConfig {
    requests: Vec<FetchRequestConfig>,
    /// Fetch calls made one after another, each sending every request.
    #[serde(default = "one_round")]
    rounds: usize,
}

fn one_round() -> usize {
    1
}

/// One request of the `fetch` mode.
#[derive(Debug, Deserialize)]
struct FetchRequestConfig {
    upstream: String,
    path: String,
    #[serde(default = "default_method")]
    method: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    #[serde(default)]
    body: String,
    timeout_ms: Option<u64>,
}

fn default_method() -> String {
    "GET".to_string()
}

/// One result as the `fetch` mode reports it.
#[derive(Debug, Serialize)]
#[serde(untagged)]
enum FetchResultBody {
    Response {
        status: u16,
        /// Header values by name, repeated names joined by `, `.
        headers: BTreeMap<String, String>,
        body: String,
    },
    Error {
        error: &'static str,
        detail: Option<String>,
    },
}

/// The body of the `fetch` mode's response.
#[derive(Debug, Serialize)]
struct FetchBody {
    results: Vec<FetchResultBody>,
}

/// The request as the `echo` mode reports it.
#[derive(Debug, Serialize)]
struct EchoBody {
    method: String,
    path: String,
    query: Option<String>,
    /// Header values by name, with the values of a repeated name joined by `, `.
    headers: BTreeMap<String, String>,
    client_addr: String,
    route: String,
    params: BTreeMap<String, String>,
}

/// The body of the `clock` mode's response.
#[derive(Debug, Serialize)]
struct ClockBody {
    now_unix_ms: u64,
    monotonic_ns: u64,
}

/// A config that the fixture cannot act on, with the message it responds with.
#[derive(Debug)]
struct InvalidConfig(String);

fn read_mode() -> Result<String, InvalidConfig> {
    edge_sdk::config::get("mode").ok_or_else(|| {
        InvalidConfig(format!(
            "missing config key `mode`; expected one of {}",
            MODES.join(", ")
        ))
    })
}

fn parse_config<T: DeserializeOwned>(mode: &str) -> Result<T, InvalidConfig> {
    edge_sdk::config::parse()
        .map_err(|error| InvalidConfig(format!("invalid config for mode `{mode}`: {error}")))
}

fn invalid_config_response(InvalidConfig(message): InvalidConfig) -> Action {
    edge_sdk::log::error(&message);
    Action::respond(Response::json(
        500,
        &ErrorBody {
            error: "worker_config_invalid",
            message,
        },
    ))
}

fn with_set_headers(
    mut changes: RequestChanges,
    headers: BTreeMap<String, String>,
) -> RequestChanges {
    for (name, value) in headers {
        changes = changes.set_header(name, value);
    }
    changes
}

fn count_calls() -> Action {
    let count = CALLS.fetch_add(1, Ordering::SeqCst) + 1;
    Action::respond(
        Response::new(200)
            .header("content-type", "text/plain")
            .body(count.to_string()),
    )
}

fn loop_forever() -> ! {
    let mut iterations: u64 = 0;
    loop {
        // `black_box` keeps the optimiser from proving the loop has no effect.
        iterations = black_box(iterations.wrapping_add(1));
    }
}

/// Recurses without end, each frame with a buffer on the stack, so the
/// guest's stack in linear memory runs out first.
#[inline(never)]
#[expect(
    unconditional_recursion,
    reason = "the mode exists to overflow the stack"
)]
fn recurse(depth: u64) -> u64 {
    let frame = black_box([depth as u8; 512]);
    recurse(depth + 1).wrapping_add(u64::from(frame[0]))
}

/// Recurses without end with small frames, so the native stack that the
/// guest's frames run on runs out first.
#[inline(never)]
#[expect(
    unconditional_recursion,
    reason = "the mode exists to overflow the stack"
)]
fn recurse_small(depth: u64) -> u64 {
    let next = black_box(depth) + 1;
    recurse_small(next).wrapping_add(black_box(1))
}

fn allocate(config: AllocConfig) -> Action {
    const PAGE: usize = 4096;
    let total = config.bytes.unwrap_or(1024 * MIB);
    let mut chunks: Vec<Vec<u8>> = Vec::new();
    let mut allocated: u64 = 0;
    while allocated < total {
        let size = (total - allocated).min(MIB) as usize;
        let mut chunk = vec![0u8; size];
        // Write one byte per page so every page is really used.
        for index in (0..size).step_by(PAGE) {
            chunk[index] = 1;
        }
        chunks.push(black_box(chunk));
        allocated += size as u64;
    }
    black_box(&chunks);
    Action::respond(
        Response::new(200)
            .header("content-type", "text/plain")
            .body(format!("allocated {allocated} bytes")),
    )
}

/// Returns header values by name, with the values of a repeated name joined
/// by `, `.
fn joined_headers(headers: &edge_sdk::Headers) -> BTreeMap<String, String> {
    let mut joined_by_name: BTreeMap<String, String> = BTreeMap::new();
    for (name, value) in headers.iter() {
        joined_by_name
            .entry(name.to_string())
            .and_modify(|joined| {
                joined.push_str(", ");
                joined.push_str(value);
            })
            .or_insert_with(|| value.to_string());
    }
    joined_by_name
}

fn fetch(config: FetchConfig) -> Action {
    use edge_sdk::fetch::{self, FetchError};

    let mut results = Vec::new();
    for _ in 0..config.rounds {
        let requests = config
            .requests
            .iter()
            .map(|request| {
                let mut built = fetch::Request::new(
                    request.method.clone(),
                    request.upstream.clone(),
                    request.path.clone(),
                )
                .body(request.body.clone());
                for (name, value) in &request.headers {
                    built = built.header(name.clone(), value.clone());
                }
                if let Some(ms) = request.timeout_ms {
                    built = built.timeout(std::time::Duration::from_millis(ms));
                }
                built
            })
            .collect();
        results.extend(
            fetch::send(requests)
                .into_iter()
                .map(|result| match result {
                    Ok(response) => FetchResultBody::Response {
                        status: response.status,
                        headers: joined_headers(&response.headers),
                        body: String::from_utf8_lossy(&response.body).into_owned(),
                    },
                    Err(error) => {
                        let (error, detail) = match error {
                            FetchError::NotAllowed => ("not_allowed", None),
                            FetchError::TimedOut => ("timed_out", None),
                            FetchError::Unavailable(code) => ("unavailable", Some(code)),
                            FetchError::ResponseTooLarge(cap) => {
                                ("response_too_large", Some(cap.to_string()))
                            }
                            FetchError::InvalidRequest(reason) => ("invalid_request", Some(reason)),
                        };
                        FetchResultBody::Error { error, detail }
                    }
                }),
        );
    }
    Action::respond(Response::json(200, &FetchBody { results }))
}

fn echo(request: Request) -> Action {
    let headers = joined_headers(&request.headers);
    let body = EchoBody {
        method: request.method,
        path: request.path,
        query: request.query,
        headers,
        client_addr: request.client_addr,
        route: request.route,
        params: request.params.into_iter().collect(),
    };
    Action::respond(Response::json(200, &body))
}

fn spin(config: SpinConfig) -> Action {
    let start = edge_sdk::clock::monotonic_ns();
    let duration_ns = config.ms.saturating_mul(1_000_000);
    while edge_sdk::clock::monotonic_ns().saturating_sub(start) < duration_ns {
        black_box(());
    }
    Action::next()
}

fn work(request: &Request) -> Action {
    let rounds: u64 = request
        .header("x-rounds")
        .and_then(|value| value.parse().ok())
        .unwrap_or(1);
    // xorshift64: the compiler can neither skip nor shorten the loop.
    let mut state = black_box(0x9e37_79b9_7f4a_7c15_u64);
    for _ in 0..rounds {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
    }
    Action::respond(Response::new(200).body(state.to_string()))
}

fn set(config: SetConfig) -> Action {
    let mut changes = with_set_headers(RequestChanges::new(), config.set_headers);
    for name in config.remove_headers {
        changes = changes.remove_header(name);
    }
    if let Some(path) = config.path {
        changes = changes.path(path);
    }
    Action::Continue(changes)
}

fn route(config: RouteConfig) -> Action {
    Action::Route {
        upstream: config.upstream,
        changes: with_set_headers(RequestChanges::new(), config.set_headers),
    }
}

fn respond(config: RespondConfig) -> Action {
    let mut response = Response::new(config.status.unwrap_or(200)).body(config.body);
    for (name, value) in config.headers {
        response = response.header(name, value);
    }
    Action::respond(response)
}

fn write_logs() -> Action {
    edge_sdk::log::trace("fixture log");
    edge_sdk::log::debug("fixture log");
    edge_sdk::log::info("fixture log");
    edge_sdk::log::warn("fixture log");
    edge_sdk::log::error("fixture log");
    Action::next()
}

/// Writes many info lines in one call, more than the node keeps of a call.
fn write_many_logs(config: LogManyConfig) -> Action {
    for line in 0..config.lines {
        edge_sdk::log::info(&format!("fixture line {line}"));
    }
    Action::next()
}

fn read_clock() -> Action {
    let body = ClockBody {
        now_unix_ms: edge_sdk::clock::now_unix_ms(),
        monotonic_ns: edge_sdk::clock::monotonic_ns(),
    };
    Action::respond(Response::json(200, &body))
}

fn set_context(request: &Request, config: ContextSetConfig) -> Action {
    let from_header = config
        .from_header
        .as_deref()
        .and_then(|name| request.headers.get(name));
    let Some(value) = from_header.or(config.value.as_deref()) else {
        return Action::next();
    };
    match edge_sdk::context::set(&config.name, value) {
        Ok(()) => Action::next(),
        Err(message) => Action::respond(Response::json(
            500,
            &ErrorBody {
                error: "context_rejected",
                message,
            },
        )),
    }
}

fn get_context(config: ContextGetConfig) -> Action {
    let mut changes = RequestChanges::new();
    for name in config.names {
        if let Some(value) = edge_sdk::context::get(&name) {
            changes = changes.set_header(format!("x-context-{name}"), value);
        }
    }
    Action::Continue(changes)
}

fn read_secret(config: SecretConfig) -> Action {
    match edge_sdk::secrets::get(&config.name) {
        Some(value) => Action::respond(Response::new(200).body(value)),
        None => Action::respond(Response::new(404)),
    }
}

fn leak_secret(config: SecretConfig) -> Action {
    let secret = edge_sdk::secrets::get(&config.name).unwrap_or_default();
    for line in 0..100 {
        edge_sdk::log::info(&format!("line {line}: the secret is {secret}"));
    }
    panic!("giving up with the secret {secret}");
}

/// Writes lines to stderr, as a worker printing its own debug output does,
/// then panics or lets the request through.
fn write_stderr(config: StderrConfig) -> Action {
    for line in 0..config.lines {
        eprintln!("{line:>6} {}", "x".repeat(92));
    }
    if config.panic {
        panic!("fixture panic after {} lines", config.lines);
    }
    Action::Continue(RequestChanges::new().set_header("x-stderr-lines", config.lines.to_string()))
}

fn config_response() -> Action {
    Action::respond(
        Response::new(200)
            .header("content-type", "application/json")
            .body(edge_sdk::config::json()),
    )
}

/// Runs the request hook of the configured mode.
fn handle_request(request: Request) -> Result<Action, InvalidConfig> {
    let mode = read_mode()?;
    let action = match mode.as_str() {
        "counter" => count_calls(),
        "loop" => loop_forever(),
        "recurse" => {
            recurse(0);
            unreachable!("recursion without end returned")
        }
        "recurse-small" => {
            recurse_small(0);
            unreachable!("recursion without end returned")
        }
        "alloc" => allocate(parse_config(&mode)?),
        "panic" => panic!("fixture panic"),
        "echo" => echo(request),
        "spin" => spin(parse_config(&mode)?),
        "work" => work(&request),
        "set" => set(parse_config(&mode)?),
        "route" => route(parse_config(&mode)?),
        "respond" => respond(parse_config(&mode)?),
        "response-header" => {
            // Check the config now, so a bad one fails the request visibly.
            parse_config::<ResponseHeaderConfig>(&mode)?;
            Action::next()
        }
        "config" => config_response(),
        "log" => write_logs(),
        "clock" => read_clock(),
        "sleep" => {
            let config: SleepConfig = parse_config(&mode)?;
            std::thread::sleep(std::time::Duration::from_millis(config.ms));
            Action::next()
        }
        "context-set" => set_context(&request, parse_config(&mode)?),
        "context-get" => get_context(parse_config(&mode)?),
        "secret" => read_secret(parse_config(&mode)?),
        "secret-leak" => leak_secret(parse_config(&mode)?),
        "fetch" => fetch(parse_config(&mode)?),
        "stderr" => write_stderr(parse_config(&mode)?),
        "log-many" => write_many_logs(parse_config(&mode)?),
        other => {
            return Err(InvalidConfig(format!(
                "unknown mode {other:?}; expected one of {}",
                MODES.join(", ")
            )))
        }
    };
    Ok(action)
}

struct Fixture;

impl Worker for Fixture {
    fn hooks() -> Hooks {
        let response = read_mode().is_ok_and(|mode| mode == "response-header");
        Hooks { response }
    }

    fn on_request(request: Request) -> Action {
        handle_request(request).unwrap_or_else(invalid_config_response)
    }

    fn on_response(_request: Request, response: ResponseHead) -> ResponseChanges {
        let config: ResponseHeaderConfig = match parse_config("response-header") {
            Ok(config) => config,
            Err(InvalidConfig(message)) => {
                edge_sdk::log::error(&message);
                return ResponseChanges::new();
            }
        };
        let mut changes = ResponseChanges::new();
        for (name, value) in config.response_headers {
            changes = changes.set_header(name, value);
        }
        changes.set_header("x-seen-status", response.status.to_string())
    }
}

edge_sdk::export_worker!(Fixture);

#[cfg(test)]
mod tests;
