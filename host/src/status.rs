//! The status page on the admin listener: one HTML page with inline script
//! and styles that polls `/status.json` every second and draws routes with
//! RED sparklines, targets with breaker state and health, rate-limit fill
//! levels and loaded modules.
//!
//! A browser cannot send the bearer token, so it opens
//! `/status?token=TOKEN` once: the node checks the token, starts a session
//! with a random id, sets it as an `HttpOnly`, `SameSite=Strict` cookie and
//! redirects to `/status`, so the token leaves the address bar and history.
//! The node keeps each session's expiry itself. A session cookie opens GET
//! requests of the page and its data only, never the rest of the admin API.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, COOKIE, LOCATION, SET_COOKIE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

use crate::node::Node;

/// The session cookie's name.
const COOKIE_NAME: &str = "edge_status";
/// The maximum number of sessions kept at once; a new log-in past it ends
/// the oldest.
const MAX_SESSIONS: usize = 64;
/// The paths a session cookie opens.
const SESSION_PATHS: [&str; 2] = ["/status", "/status.json"];

/// The status page's sessions. Only the SHA-256 of each cookie value is
/// kept, so the node's memory contains nothing a browser could present.
pub struct Sessions {
    timeout: Duration,
    /// Each live session's cookie digest and expiry, oldest first.
    live: Mutex<VecDeque<([u8; 32], Instant)>>,
}

impl Sessions {
    /// Creates an empty set of sessions that each last `timeout`.
    pub fn new(timeout: Duration) -> Arc<Sessions> {
        Arc::new(Sessions {
            timeout,
            live: Mutex::new(VecDeque::new()),
        })
    }

    /// Handles `/status?token=...`: starts a session, sets its cookie and
    /// redirects to `/status` when the token is right, and returns 401 when
    /// it is wrong. Returns `None` when the request has no `token` parameter.
    pub fn log_in<B>(
        &self,
        request: &Request<B>,
        token_digest: &[u8; 32],
    ) -> Option<Response<Full<Bytes>>> {
        let token = request.uri().query()?.split('&').find_map(|pair| {
            let (name, value) = pair.split_once('=')?;
            (name == "token").then(|| {
                percent_encoding::percent_decode_str(value)
                    .decode_utf8_lossy()
                    .into_owned()
            })
        })?;
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        if !same_digest(&digest, token_digest) {
            return Some(crate::admin::error(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "the token is not the admin token",
            ));
        }
        let mut id = [0u8; 32];
        if aws_lc_rs::rand::fill(&mut id).is_err() {
            tracing::error!("cannot draw random bytes for a status-page session");
            return Some(crate::admin::error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "session_failed",
                "the node cannot start a session; use the bearer token",
            ));
        }
        let value = hex::encode(id);
        self.start(Sha256::digest(value.as_bytes()).into(), Instant::now());
        let cookie = format!(
            "{COOKIE_NAME}={value}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}",
            self.timeout.as_secs()
        );
        let mut response = Response::new(Full::new(Bytes::new()));
        *response.status_mut() = StatusCode::SEE_OTHER;
        let headers = response.headers_mut();
        headers.insert(LOCATION, HeaderValue::from_static("/status"));
        headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if let Ok(cookie) = HeaderValue::from_str(&cookie) {
            headers.insert(SET_COOKIE, cookie);
        }
        Some(response)
    }

    /// Records a session whose cookie value has `digest`, dropping expired
    /// sessions and, past [`MAX_SESSIONS`], the oldest.
    fn start(&self, digest: [u8; 32], now: Instant) {
        let mut live = self.live.lock().expect("session list poisoned");
        live.retain(|(_, expiry)| *expiry > now);
        if live.len() >= MAX_SESSIONS {
            live.pop_front();
        }
        live.push_back((digest, now + self.timeout));
    }

    /// Returns whether the request is a GET of the status page or its data
    /// with the cookie of a live session.
    pub fn opens<B>(&self, request: &Request<B>) -> bool {
        if request.method() != Method::GET || !SESSION_PATHS.contains(&request.uri().path()) {
            return false;
        }
        let now = Instant::now();
        request
            .headers()
            .get_all(COOKIE)
            .iter()
            .filter_map(|value| value.to_str().ok())
            .flat_map(|value| value.split(';'))
            .filter_map(|pair| pair.trim().split_once('='))
            .filter(|(name, _)| *name == COOKIE_NAME)
            .any(|(_, value)| self.is_live(&Sha256::digest(value.as_bytes()).into(), now))
    }

    /// Returns whether a session whose cookie value has `digest` is live at
    /// `now`. Every session is compared, so the time taken does not tell
    /// which one came close.
    fn is_live(&self, digest: &[u8; 32], now: Instant) -> bool {
        let live = self.live.lock().expect("session list poisoned");
        live.iter().fold(false, |found, (known, expiry)| {
            found | (same_digest(digest, known) & (*expiry > now))
        })
    }
}

fn same_digest(a: &[u8; 32], b: &[u8; 32]) -> bool {
    a.iter()
        .zip(b)
        .fold(0u8, |difference, (x, y)| difference | (x ^ y))
        == 0
}

/// Serves the page. Its script and styles are inline, and its content
/// security policy lets it load nothing else and talk only to this origin.
pub fn page() -> Response<Full<Bytes>> {
    let mut response = Response::new(Full::new(Bytes::from_static(PAGE.as_bytes())));
    let headers = response.headers_mut();
    headers.insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    headers.insert(
        "content-security-policy",
        HeaderValue::from_static(
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; \
             connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; \
             frame-ancestors 'none'",
        ),
    );
    headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

/// Builds the data the page polls: counters are totals since the node
/// started, so the page derives rates from the difference between polls.
pub fn snapshot(node: &Node, now: Instant) -> Value {
    let routes: Vec<Value> = node
        .routes
        .iter()
        .enumerate()
        .map(|(index, route)| {
            let totals = node.metrics.totals(node.metrics.route(Some(index)));
            json!({
                "name": &*route.name,
                "upstream": route.upstream.map(|u| node.upstreams[u].name.as_str()),
                "requests": totals.requests,
                "errors": totals.errors,
                "refused": totals.refused,
                "duration_sum": totals.duration_sum,
                "duration_count": totals.duration_count,
            })
        })
        .collect();
    let upstreams: Vec<Value> = node
        .upstreams
        .iter()
        .map(|upstream| {
            let targets: Vec<Value> = upstream
                .targets
                .iter()
                .map(|target| {
                    let breaker = target.breaker.as_ref().map(|b| b.snapshot(now));
                    json!({
                        "target": target.addr.to_string(),
                        "breaker": breaker.map_or("disabled", |b| b.state.name()),
                        "opened_total": breaker.map_or(0, |b| b.opened_total),
                        "retry_in_ms": breaker.map_or(0, |b| b.retry_in.as_millis() as u64),
                        "up": target.health.is_up(now),
                        "connections": target
                            .connections
                            .load(std::sync::atomic::Ordering::Relaxed),
                    })
                })
                .collect();
            json!({ "name": upstream.name, "targets": targets })
        })
        .collect();
    let clock = node.ratelimit.clock();
    let limits: Vec<Value> = node
        .routes
        .iter()
        .flat_map(|route| {
            route.limits.iter().map(move |limit| {
                let fill = limit.fill(clock);
                let counts = &limit.counts;
                json!({
                    "route": &*route.name,
                    "limit": &*limit.spec.name,
                    "scope": match limit.spec.scope {
                        crate::ratelimit::Scope::Local => "local",
                        crate::ratelimit::Scope::Global => "global",
                    },
                    "available": fill.map(|f| f.available),
                    "size": fill.map(|f| f.limit),
                    "allowed": counts.allowed.load(std::sync::atomic::Ordering::Relaxed),
                    "rejected": counts.rejected.load(std::sync::atomic::Ordering::Relaxed),
                })
            })
        })
        .collect();
    let modules: Vec<Value> = node
        .runtime
        .modules()
        .iter()
        .map(|module| {
            json!({
                "name": &*module.name,
                "hash": module.hash,
                "source": match module.cache {
                    crate::worker::CacheOutcome::Hit => "cache_hit",
                    crate::worker::CacheOutcome::Compiled => "compiled",
                },
            })
        })
        .collect();
    let (running, max) = node.runtime.instances();
    json!({
        "node": node.name,
        "phase": node.lifecycle.get().name(),
        "request_metrics": node.request_metrics,
        "routes": routes,
        "upstreams": upstreams,
        "limits": limits,
        "modules": modules,
        "workers": { "running": running, "max": max, "queue": node.runtime.waiting() },
    })
}

/// The page: markup, styles and the polling script.
const PAGE: &str = r##"<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Edge status</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 1.5em; color: #1d2330; background: #fafbfc; }
h1 { font-size: 1.3em; margin: 0 0 .2em; }
h2 { font-size: 1.05em; margin: 1.4em 0 .4em; }
table { border-collapse: collapse; min-width: 40em; background: #fff; }
th, td { text-align: left; padding: .25em .7em; border-bottom: 1px solid #e3e6ea; }
th { font-weight: 600; color: #4a5160; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
.state { font-weight: 600; padding: .05em .45em; border-radius: .3em; }
.closed, .up { background: #d8f3df; color: #17622d; }
.open, .down { background: #fbd9d7; color: #8c1d18; }
.half_open { background: #fdf0c8; color: #7a5a00; }
.disabled { background: #eceef1; color: #4a5160; }
.bar { display: inline-block; width: 10em; height: .8em; background: #eceef1; vertical-align: middle; }
.bar > span { display: block; height: 100%; background: #3a7bd5; }
code { font-size: .9em; }
#error { color: #8c1d18; }
svg { vertical-align: middle; }
</style>
</head>
<body>
<h1>Edge node <span id="node"></span></h1>
<div>phase <span id="phase"></span> · worker instances <span id="workers"></span> · updated <span id="updated">never</span> <span id="error"></span></div>
<h2>Routes</h2>
<table><thead><tr><th>route</th><th>upstream</th><th>req/s</th><th>5xx/s</th><th>refused/s</th><th>mean ms</th><th>rate, last 60 s</th></tr></thead><tbody id="routes"></tbody></table>
<h2>Upstream targets</h2>
<table><thead><tr><th>upstream</th><th>target</th><th>breaker</th><th>health</th><th>connections</th><th>opened</th></tr></thead><tbody id="targets"></tbody></table>
<h2>Rate limits</h2>
<table><thead><tr><th>route</th><th>limit</th><th>fill (last key)</th><th>available</th><th>allowed</th><th>rejected</th></tr></thead><tbody id="limits"></tbody></table>
<h2>Worker modules</h2>
<table><thead><tr><th>module</th><th>SHA-256</th><th>source</th></tr></thead><tbody id="modules"></tbody></table>
<script>
"use strict";
const samplesByRoute = new Map();
let previous = null;

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text;
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function badge(row, text, kind, key) {
  const td = cell(row, "");
  const span = document.createElement("span");
  span.className = "state " + kind;
  span.textContent = text;
  span.dataset.key = key;
  td.appendChild(span);
  return span;
}

function sparkline(values) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", "180");
  svg.setAttribute("height", "28");
  const max = Math.max(1, ...values);
  const points = values.map((v, i) => `${i * 3},${27 - (v / max) * 25}`).join(" ");
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", points);
  line.setAttribute("fill", "none");
  line.setAttribute("stroke", "#3a7bd5");
  line.setAttribute("stroke-width", "1.5");
  svg.appendChild(line);
  return svg;
}

function render(data, now) {
  document.getElementById("node").textContent = data.node;
  document.getElementById("phase").textContent = data.phase;
  document.getElementById("workers").textContent =
    `${data.workers.running}/${data.workers.max} (queue ${data.workers.queue})`;
  const seconds = previous ? Math.max(0.001, (now - previous.time) / 1000) : 1;
  const routes = document.getElementById("routes");
  routes.replaceChildren();
  for (const route of data.routes) {
    const before = previous && previous.routes.get(route.name);
    const rate = before ? (route.requests - before.requests) / seconds : 0;
    const errors = before ? (route.errors - before.errors) / seconds : 0;
    const refused = before ? (route.refused - before.refused) / seconds : 0;
    const count = route.duration_count - (before ? before.duration_count : 0);
    const sum = route.duration_sum - (before ? before.duration_sum : 0);
    const samples = samplesByRoute.get(route.name) || [];
    samples.push(rate);
    while (samples.length > 60) samples.shift();
    samplesByRoute.set(route.name, samples);
    const row = document.createElement("tr");
    row.dataset.route = route.name;
    cell(row, route.name);
    cell(row, route.upstream || "");
    cell(row, rate.toFixed(1), "num");
    cell(row, errors.toFixed(1), "num");
    cell(row, refused.toFixed(1), "num");
    cell(row, count > 0 ? (sum / count * 1000).toFixed(3) : "", "num");
    cell(row, "").appendChild(sparkline(samples));
    routes.appendChild(row);
  }
  const targets = document.getElementById("targets");
  targets.replaceChildren();
  for (const upstream of data.upstreams) {
    for (const target of upstream.targets) {
      const row = document.createElement("tr");
      const key = `${upstream.name}/${target.target}`;
      cell(row, upstream.name);
      cell(row, target.target);
      const breaker = badge(row, target.breaker.replace("_", "-"), target.breaker, key);
      breaker.classList.add("breaker");
      if (target.breaker === "open") breaker.title = `probes in ${target.retry_in_ms} ms`;
      badge(row, target.up ? "up" : "down", target.up ? "up" : "down", key).classList.add("health");
      cell(row, String(target.connections), "num");
      cell(row, String(target.opened_total), "num");
      targets.appendChild(row);
    }
  }
  const limits = document.getElementById("limits");
  limits.replaceChildren();
  for (const limit of data.limits) {
    const row = document.createElement("tr");
    cell(row, limit.route);
    cell(row, limit.limit);
    const fill = cell(row, "");
    const bar = document.createElement("span");
    bar.className = "bar";
    const level = document.createElement("span");
    const share = limit.size ? limit.available / limit.size : 1;
    level.style.width = `${Math.round(share * 100)}%`;
    bar.appendChild(level);
    fill.appendChild(bar);
    const available = cell(row, limit.size === null ? `${limit.scope}, no local level`
      : `${limit.available}/${limit.size}`, "num fill");
    available.dataset.key = `${limit.route}/${limit.limit}`;
    if (limit.size !== null) available.dataset.available = String(limit.available);
    cell(row, String(limit.allowed), "num");
    cell(row, String(limit.rejected), "num");
    limits.appendChild(row);
  }
  const modules = document.getElementById("modules");
  modules.replaceChildren();
  for (const module of data.modules) {
    const row = document.createElement("tr");
    cell(row, module.name);
    const hash = cell(row, "");
    const code = document.createElement("code");
    code.textContent = module.hash;
    hash.appendChild(code);
    cell(row, module.source);
    modules.appendChild(row);
  }
  previous = { time: now, routes: new Map(data.routes.map((r) => [r.name, r])) };
  document.getElementById("updated").textContent = new Date(now).toLocaleTimeString();
}

async function poll() {
  try {
    const response = await fetch("/status.json", { credentials: "same-origin", cache: "no-store" });
    if (!response.ok) throw new Error(`status.json: HTTP ${response.status}`);
    render(await response.json(), Date.now());
    document.getElementById("error").textContent = "";
  } catch (error) {
    document.getElementById("error").textContent = String(error.message || error);
  }
  setTimeout(poll, 1000);
}
poll();
</script>
</body>
</html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_expire_and_the_oldest_goes_first() {
        let sessions = Sessions::new(Duration::from_secs(60));
        let start = Instant::now();
        sessions.start([1; 32], start);
        assert!(sessions.is_live(&[1; 32], start + Duration::from_secs(59)));
        assert!(!sessions.is_live(&[1; 32], start + Duration::from_secs(60)));
        assert!(!sessions.is_live(&[2; 32], start));

        for n in 0..MAX_SESSIONS as u8 {
            sessions.start([n + 2; 32], start);
        }
        // The first session made room for the last.
        assert!(!sessions.is_live(&[1; 32], start));
        assert!(sessions.is_live(&[2; 32], start));
        assert!(sessions.is_live(&[MAX_SESSIONS as u8 + 1; 32], start));
    }
}
