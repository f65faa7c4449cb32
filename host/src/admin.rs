//! The admin listener: a separate HTTP/1.1 listener, on loopback unless the
//! config sets another address, that shows breaker states and target health as
//! JSON (and as Prometheus metrics) to requests with the configured bearer
//! token.
//!
//! | path           | what it returns                                        |
//! |----------------|--------------------------------------------------------|
//! | `/breakers`    | every target's breaker: state, failures, cool-down     |
//! | `/health`      | every target's health: checks, ejection, in flight     |
//! | `/metrics`     | RED metrics and the node's state as Prometheus text    |
//! | `/status`      | a live HTML status page (see [`crate::status`])        |
//! | `/status.json` | the data the status page polls                         |
//! | `/healthz`     | liveness, without a token                              |
//! | `/readyz`      | readiness (503 while starting or draining), no token   |

use std::net::SocketAddr;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use anyhow::Context as _;
use bytes::Bytes;
use http::header::{AUTHORIZATION, CONTENT_TYPE, WWW_AUTHENTICATE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::watch;

/// Time allowed for a request head on the admin listener.
const ADMIN_HEADER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);
use crate::config::{AdminConfig, Config};
use crate::node::Node;

/// A running admin listener.
pub struct Admin {
    pub addr: SocketAddr,
    pub thread: JoinHandle<()>,
}

/// Returns the admin listener's bearer token: the one in the config, or the
/// first line of `token_file`, which must be at least 16 characters.
pub fn read_token(config: &Config, admin: &AdminConfig) -> anyhow::Result<String> {
    match (&admin.token, &admin.token_file) {
        (Some(token), _) => Ok(token.get_ref().clone()),
        (None, Some(file)) => {
            let path = config.resolve(file.get_ref());
            // Errors name the config file and the line of `token_file`.
            let invalid = |message: String| {
                let line = config.line_of(file.span().start);
                config.invalid(line, "admin.token_file", &message)
            };
            let text = std::fs::read_to_string(&path)
                .map_err(|e| invalid(format!("cannot read {}: {e}", path.display())))?;
            let token = text.lines().next().unwrap_or_default().trim().to_owned();
            if let Some(problem) = crate::config::token_problem(&token) {
                return Err(invalid(format!("the token in {} {problem}", path.display())).into());
            }
            Ok(token)
        }
        (None, None) => anyhow::bail!("admin: set token or token_file"),
    }
}

/// Binds the admin listener and starts its thread, which serves until
/// `shutdown` turns true.
pub fn start(
    node: Arc<Node>,
    config: &Config,
    admin: &AdminConfig,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<Admin> {
    let token = read_token(config, admin)?;
    let token_digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
    let sessions = crate::status::Sessions::new(admin.session_timeout);
    let addr = *admin.addr.get_ref();
    let listener = std::net::TcpListener::bind(addr).map_err(|error| {
        let hint = if error.kind() == std::io::ErrorKind::AddrInUse {
            "; another process listens there (a node still running?): stop it, or change \
             admin.addr"
        } else {
            ""
        };
        anyhow::anyhow!("cannot listen on {addr} for the admin listener: {error}{hint}")
    })?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    if !addr.ip().is_loopback() {
        tracing::warn!(
            %addr,
            "the admin listener is not on loopback; it speaks plain HTTP, so its bearer \
             token crosses the network in clear"
        );
    }
    let thread = crate::listener::spawn_runtime_thread("edge-admin", move || async move {
        let listener = match tokio::net::TcpListener::from_std(listener) {
            Ok(listener) => listener,
            Err(error) => {
                tracing::error!(%error, "cannot register the admin listener");
                return;
            }
        };
        let accept_errors = crate::worker::LogThrottle::default();
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let stream = match accepted {
                        Ok((stream, _)) => stream,
                        Err(error) => {
                            crate::listener::back_off_after_accept_error(&error, &accept_errors)
                                .await;
                            continue;
                        }
                    };
                    let node = node.clone();
                    let sessions = sessions.clone();
                    tokio::spawn(async move {
                        let service = hyper::service::service_fn(move |request| {
                            let response = serve(&node, &token_digest, &sessions, &request);
                            async move { Ok::<_, std::convert::Infallible>(response) }
                        });
                        // A client gets as long for its request head as on
                        // the default listener, so a slow one cannot hold a
                        // connection open.
                        let _ = hyper::server::conn::http1::Builder::new()
                            .timer(hyper_util::rt::TokioTimer::new())
                            .header_read_timeout(ADMIN_HEADER_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service)
                            .await;
                    });
                }
                _ = shutdown.wait_for(|stop| *stop) => break,
            }
        }
    })
    .context("cannot start the admin thread")?;
    Ok(Admin { addr, thread })
}

/// Returns 405 with the methods the path allows in `Allow`.
fn method_not_allowed(allowed: &'static str) -> Response<Full<Bytes>> {
    let mut response = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        &format!("use {allowed}"),
    );
    response
        .headers_mut()
        .insert(http::header::ALLOW, HeaderValue::from_static(allowed));
    response
}

/// Serves one admin request.
fn serve(
    node: &Node,
    token_digest: &[u8; 32],
    sessions: &crate::status::Sessions,
    request: &Request<Incoming>,
) -> Response<Full<Bytes>> {
    // Probes carry no token, and the responses reveal nothing beyond the phase.
    let probe = matches!(request.uri().path(), "/healthz" | "/readyz");
    if probe && !matches!(*request.method(), Method::GET | Method::HEAD) {
        return method_not_allowed("GET, HEAD");
    }
    match request.uri().path() {
        "/healthz" => return json_response(json!({ "status": "ok" })),
        "/readyz" => {
            let phase = node.lifecycle.get();
            let ready = phase == crate::node::Phase::Serving;
            let mut response = json_response(json!({ "ready": ready, "phase": phase.name() }));
            if !ready {
                *response.status_mut() = StatusCode::SERVICE_UNAVAILABLE;
            }
            return response;
        }
        _ => {}
    }
    if request.uri().path() == "/status" && request.method() == Method::GET {
        if let Some(response) = sessions.log_in(request, token_digest) {
            return response;
        }
    }
    let by_cookie = sessions.opens(request);
    if !by_cookie && !authorized(request, token_digest) {
        let mut response = error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "a valid bearer token is required",
        );
        response
            .headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return response;
    }
    let path = request.uri().path();
    if !PATHS.contains(&path) {
        return not_found();
    }
    if request.method() != Method::GET {
        return method_not_allowed("GET");
    }
    let now = Instant::now();
    match path {
        "/breakers" => json_response(breakers(node, now)),
        "/health" => json_response(health(node, now)),
        "/metrics" => {
            let text = node.metrics.render(node, now);
            let mut response = Response::new(Full::new(Bytes::from(text)));
            response.headers_mut().insert(
                CONTENT_TYPE,
                HeaderValue::from_static("text/plain; version=0.0.4"),
            );
            response
        }
        "/status" => crate::status::page(),
        "/status.json" => json_response(crate::status::snapshot(node, now)),
        _ => not_found(),
    }
}

fn not_found() -> Response<Full<Bytes>> {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        "use /breakers, /health, /metrics, /status, /status.json, /healthz or /readyz",
    )
}

/// The paths that need the token, served on GET only.
const PATHS: [&str; 5] = [
    "/breakers",
    "/health",
    "/metrics",
    "/status",
    "/status.json",
];

/// Compares the bearer token by its SHA-256 digest, so the comparison time
/// does not depend on how much of the token matched.
pub(crate) fn authorized<B>(request: &Request<B>, token_digest: &[u8; 32]) -> bool {
    let Some(given) = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split_once(' '))
        // The scheme is case-insensitive (RFC 9110, section 11.1).
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token)
    else {
        return false;
    };
    let digest: [u8; 32] = Sha256::digest(given.trim().as_bytes()).into();
    digest
        .iter()
        .zip(token_digest)
        .fold(0u8, |difference, (a, b)| difference | (a ^ b))
        == 0
}

fn breakers(node: &Node, now: Instant) -> Value {
    let upstreams: Vec<Value> = node
        .upstreams
        .iter()
        .map(|upstream| {
            let targets: Vec<Value> = upstream
                .targets
                .iter()
                .map(|target| match &target.breaker {
                    None => json!({ "target": target.addr.to_string(), "state": "disabled" }),
                    Some(breaker) => {
                        let snapshot = breaker.snapshot(now);
                        json!({
                            "target": target.addr.to_string(),
                            "state": snapshot.state.name(),
                            "consecutive_failures": snapshot.consecutive_failures,
                            "opened_total": snapshot.opened_total,
                            "cool_down_ms": snapshot.cool_down.as_millis() as u64,
                            "retry_in_ms": snapshot.retry_in.as_millis() as u64,
                        })
                    }
                })
                .collect();
            json!({ "upstream": upstream.name, "targets": targets })
        })
        .collect();
    json!({ "upstreams": upstreams })
}

fn health(node: &Node, now: Instant) -> Value {
    let upstreams: Vec<Value> = node
        .upstreams
        .iter()
        .map(|upstream| {
            let targets: Vec<Value> = upstream
                .targets
                .iter()
                .map(|target| {
                    let health = &target.health;
                    let ejected_for = health.ejected_for(now);
                    json!({
                        "target": target.addr.to_string(),
                        "up": health.is_up(now),
                        "active": if upstream.active_health.is_none() {
                            "unchecked"
                        } else if health.is_unhealthy() {
                            "unhealthy"
                        } else {
                            "healthy"
                        },
                        "last_check_error": health.last_error(),
                        "ejected": !ejected_for.is_zero(),
                        "ejected_for_ms": ejected_for.as_millis() as u64,
                        "outstanding": upstream.in_flight(target),
                        "max_requests": upstream.settings.max_in_flight,
                    })
                })
                .collect();
            json!({
                "upstream": upstream.name,
                "balance": upstream.settings.policy.name(),
                "targets": targets,
            })
        })
        .collect();
    json!({ "upstreams": upstreams })
}

pub(crate) fn json_response(value: Value) -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from(value.to_string())));
    response
        .headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    response
}

pub(crate) fn error(status: StatusCode, code: &str, message: &str) -> Response<Full<Bytes>> {
    let mut response = json_response(json!({ "error": code, "message": message }));
    *response.status_mut() = status;
    response
}
