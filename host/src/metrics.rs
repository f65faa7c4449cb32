//! RED metrics (rate, errors, duration) per route and upstream, and the
//! node's state (breakers, health, limits, pools, workers), in the
//! Prometheus text format on the admin listener's `/metrics`.
//!
//! Request counters and histograms are updated on the request path through
//! handles resolved once per route, upstream and worker: a request pays a few
//! atomic additions, with no label lookup or string formatting. Counters whose
//! label set is large (route × upstream × status class × reason) resolve
//! their handle on first use and keep it. State metrics are read from the
//! node when `/metrics` is scraped.
//!
//! Labels are route, upstream, target, limit and module names from the
//! config, status classes and refusal codes: never a path, a client address
//! or a user id, so the number of series is bounded by the config.

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

use crate::breaker::State;
use crate::error::Refusal;
use crate::node::Node;

/// Upper bounds of the duration histograms, in seconds: 100 µs to 10 s.
const DURATION_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// The `route` label of requests that matched no route.
pub const NO_ROUTE: &str = "none";
/// The `upstream` label of requests that reached no upstream.
pub const NO_UPSTREAM: &str = "none";

/// Why a request ended as it did: the `reason` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Reason {
    /// The upstream's response.
    Proxied,
    /// A worker responded itself, with a status other than 401 or 403.
    WorkerResponse,
    /// A worker responded 401 or 403.
    AuthFailed,
    /// A redirecting listener sent 308.
    Redirect,
    NoRoute,
    InvalidPath,
    InvalidHost,
    InvalidMethod,
    InvalidBody,
    BodyTimeout,
    UnsupportedTransferCoding,
    UnsupportedMethod,
    UnsupportedUpgrade,
    InvalidUpgrade,
    BodyTooLarge,
    RepeatedKeyHeader,
    NoUpstream,
    UpstreamUnavailable,
    UpstreamTimeout,
    CircuitOpen,
    NoHealthyUpstream,
    UpstreamBusy,
    WorkerFailed,
    WorkerTimeout,
    WorkerBusy,
    RateLimited,
    RateLimitUnavailable,
    LoopDetected,
    /// The client went away, or the node stopped, before the response head
    /// was ready. Only the access log records it, with status 499.
    ClientClosed,
}

impl Reason {
    const COUNT: usize = Reason::ClientClosed as usize + 1;

    /// Returns the label value: `proxied`, `worker_response`, `auth_failed`,
    /// `redirect`, or the refusal's `error` code.
    pub fn name(self) -> &'static str {
        match self {
            Reason::Proxied => "proxied",
            Reason::WorkerResponse => "worker_response",
            Reason::AuthFailed => "auth_failed",
            Reason::Redirect => "redirect",
            Reason::NoRoute => "no_route",
            Reason::InvalidPath => "invalid_path",
            Reason::InvalidHost => "invalid_host",
            Reason::InvalidMethod => "invalid_method",
            Reason::InvalidBody => "invalid_body",
            Reason::BodyTimeout => "body_timeout",
            Reason::UnsupportedTransferCoding => "unsupported_transfer_coding",
            Reason::UnsupportedMethod => "unsupported_method",
            Reason::UnsupportedUpgrade => "unsupported_upgrade",
            Reason::InvalidUpgrade => "invalid_upgrade",
            Reason::BodyTooLarge => "body_too_large",
            Reason::RepeatedKeyHeader => "repeated_key_header",
            Reason::NoUpstream => "no_upstream",
            Reason::UpstreamUnavailable => "upstream_unavailable",
            Reason::UpstreamTimeout => "upstream_timeout",
            Reason::CircuitOpen => "circuit_open",
            Reason::NoHealthyUpstream => "no_healthy_upstream",
            Reason::UpstreamBusy => "upstream_busy",
            Reason::WorkerFailed => "worker_failed",
            Reason::WorkerTimeout => "worker_timeout",
            Reason::WorkerBusy => "worker_busy",
            Reason::RateLimited => "rate_limited",
            Reason::RateLimitUnavailable => "ratelimit_unavailable",
            Reason::LoopDetected => "loop_detected",
            Reason::ClientClosed => "client_closed",
        }
    }

    /// Returns the reason of a refusal.
    pub fn of(refusal: &Refusal) -> Reason {
        match refusal {
            Refusal::NoRoute => Reason::NoRoute,
            Refusal::InvalidPath(_) => Reason::InvalidPath,
            Refusal::InvalidHost(_) => Reason::InvalidHost,
            Refusal::InvalidMethod(_) => Reason::InvalidMethod,
            Refusal::InvalidBody => Reason::InvalidBody,
            Refusal::BodyTimeout => Reason::BodyTimeout,
            Refusal::UnsupportedTransferCoding(_) => Reason::UnsupportedTransferCoding,
            Refusal::UnsupportedMethod(_) => Reason::UnsupportedMethod,
            Refusal::UnsupportedUpgrade { .. } => Reason::UnsupportedUpgrade,
            Refusal::InvalidUpgrade(_) => Reason::InvalidUpgrade,
            Refusal::BodyTooLarge { .. } => Reason::BodyTooLarge,
            Refusal::RepeatedKeyHeader { .. } => Reason::RepeatedKeyHeader,
            Refusal::NoUpstream => Reason::NoUpstream,
            Refusal::UpstreamUnavailable { .. } => Reason::UpstreamUnavailable,
            Refusal::UpstreamTimeout { .. } => Reason::UpstreamTimeout,
            Refusal::CircuitOpen { .. } => Reason::CircuitOpen,
            Refusal::NoHealthyUpstream { .. } => Reason::NoHealthyUpstream,
            Refusal::UpstreamBusy { .. } => Reason::UpstreamBusy,
            Refusal::WorkerFailed => Reason::WorkerFailed,
            Refusal::WorkerTimeout => Reason::WorkerTimeout,
            Refusal::WorkerBusy => Reason::WorkerBusy,
            Refusal::RateLimited { .. } => Reason::RateLimited,
            Refusal::RateLimitUnavailable { .. } => Reason::RateLimitUnavailable,
            Refusal::LoopDetected => Reason::LoopDetected,
        }
    }

    /// Returns whether the node or a worker rejected the request, rather
    /// than the upstream or a worker responding to it.
    pub fn is_refusal(self) -> bool {
        !matches!(
            self,
            Reason::Proxied | Reason::WorkerResponse | Reason::Redirect | Reason::ClientClosed
        )
    }
}

/// Status classes: `1xx` to `5xx`, and `other` for anything else.
const STATUS_CLASSES: [&str; 6] = ["other", "1xx", "2xx", "3xx", "4xx", "5xx"];

fn status_class(status: u16) -> usize {
    match status / 100 {
        class @ 1..=5 => usize::from(class),
        _ => 0,
    }
}

/// The phase a worker hook ran in: the `phase` label.
#[derive(Debug, Clone, Copy)]
pub enum Phase {
    Request = 0,
    Response = 1,
}

/// The node's metrics: the registry and the families in it.
pub struct Metrics {
    registry: Registry,
    upstream_names: Arc<[Arc<str>]>,
    /// Handles by route index, and one for requests that matched none.
    /// Shared so that worker fetches can record into their route's.
    pub routes: Vec<Arc<RouteMetrics>>,
    pub unrouted: RouteMetrics,
    pub access_log_dropped: IntCounter,
    pub access_log_written: IntCounter,
    /// Spans dropped because the OTLP queue was full or an export failed.
    pub otlp_spans_dropped: IntCounter,
    /// Spans the OTLP collector accepted.
    pub otlp_spans_exported: IntCounter,
    /// Requests that hyper rejected before the node saw them.
    pub unparsed_requests: IntCounter,
    /// WebSocket tunnels open now, by route.
    pub websocket_tunnels: IntGaugeVec,
    /// Bytes that WebSocket tunnels carried, by route and direction
    /// (`upstream` for client to upstream, `client` for the reverse).
    pub websocket_bytes: IntCounterVec,
    state: StateMetrics,
}

/// The metrics that describe the node's state, set on each scrape.
struct StateMetrics {
    breaker_state: IntGaugeVec,
    breaker_opened: IntCounterVec,
    target_up: IntGaugeVec,
    connections: IntGaugeVec,
    limit_decisions: IntCounterVec,
    limit_redis_errors: IntCounterVec,
    worker_instances: IntGauge,
    worker_instances_max: IntGauge,
    worker_queue: IntGauge,
    modules: IntGaugeVec,
    compile_cache: IntGaugeVec,
}

/// The request counters of one route and upstream slot, by status class ×
/// reason, each resolved on first use.
type CounterRow = Box<[OnceLock<IntCounter>]>;

/// The handles of one route.
pub struct RouteMetrics {
    name: Arc<str>,
    duration: Histogram,
    /// Request counters by upstream slot (0 for none, `i + 1` for upstream
    /// `i`), each a row of status class × reason, resolved on first use.
    rows: Box<[OnceLock<CounterRow>]>,
    /// Upstream call durations by upstream index, resolved on first use.
    upstream_duration: Box<[OnceLock<Histogram>]>,
    /// Worker call durations by worker index and phase.
    workers: Vec<[Histogram; 2]>,
    requests: IntCounterVec,
    upstream_vec: HistogramVec,
    upstream_names: Arc<[Arc<str>]>,
}

impl std::fmt::Debug for RouteMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RouteMetrics")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// A request's totals on one route, for the status page.
#[derive(Debug, Clone, Copy, Default)]
pub struct RouteTotals {
    pub requests: u64,
    /// Responses with a 5xx status.
    pub errors: u64,
    /// Requests the node or a worker refused.
    pub refused: u64,
    pub duration_sum: f64,
    pub duration_count: u64,
}

fn counter_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntCounterVec {
    let vec = IntCounterVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

fn gauge_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> IntGaugeVec {
    let vec = IntGaugeVec::new(Opts::new(name, help), labels).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

fn gauge(registry: &Registry, name: &str, help: &str) -> IntGauge {
    let gauge = IntGauge::new(name, help).expect("valid metric");
    registry
        .register(Box::new(gauge.clone()))
        .expect("unique metric");
    gauge
}

fn counter(registry: &Registry, name: &str, help: &str) -> IntCounter {
    let counter = IntCounter::new(name, help).expect("valid metric");
    registry
        .register(Box::new(counter.clone()))
        .expect("unique metric");
    counter
}

fn histogram_vec(registry: &Registry, name: &str, help: &str, labels: &[&str]) -> HistogramVec {
    let opts = HistogramOpts::new(name, help).buckets(DURATION_BUCKETS.to_vec());
    let vec = HistogramVec::new(opts, labels).expect("valid metric");
    registry
        .register(Box::new(vec.clone()))
        .expect("unique metric");
    vec
}

impl Metrics {
    /// Registers every metric. `routes` lists each route's name and the
    /// module names of its workers, in order; `upstreams` the upstream
    /// names by index.
    pub fn new(routes: &[(Arc<str>, Vec<Arc<str>>)], upstreams: &[String]) -> Metrics {
        let registry = Registry::new_custom(Some("edge".to_owned()), None).expect("valid prefix");
        let requests = counter_vec(
            &registry,
            "requests_total",
            "Requests by route, upstream, status class and reason (proxied, worker_response, \
             auth_failed, redirect, or the refusal's error code).",
            &["route", "upstream", "status_class", "reason"],
        );
        let request_duration = histogram_vec(
            &registry,
            "request_duration_seconds",
            "Time from a request's arrival until its response head was ready.",
            &["route"],
        );
        let upstream_duration = histogram_vec(
            &registry,
            "upstream_duration_seconds",
            "Time from sending a request upstream until its response head arrived, retries \
             included.",
            &["route", "upstream"],
        );
        let worker_duration = histogram_vec(
            &registry,
            "worker_duration_seconds",
            "Time of one worker hook call, waiting for an instance included.",
            &["route", "module", "phase"],
        );
        let upstream_names: Arc<[Arc<str>]> = upstreams
            .iter()
            .map(|name| Arc::from(name.as_str()))
            .collect();
        let route_metrics = |name: &Arc<str>, modules: &[Arc<str>]| RouteMetrics {
            name: name.clone(),
            duration: request_duration.with_label_values(&[&**name]),
            rows: (0..=upstreams.len()).map(|_| OnceLock::new()).collect(),
            upstream_duration: (0..upstreams.len()).map(|_| OnceLock::new()).collect(),
            workers: modules
                .iter()
                .map(|module| {
                    ["request", "response"]
                        .map(|phase| worker_duration.with_label_values(&[name, module, phase]))
                })
                .collect(),
            requests: requests.clone(),
            upstream_vec: upstream_duration.clone(),
            upstream_names: upstream_names.clone(),
        };
        let routes = routes
            .iter()
            .map(|(name, modules)| Arc::new(route_metrics(name, modules)))
            .collect();
        let unrouted = route_metrics(&Arc::from(NO_ROUTE), &[]);
        let state = StateMetrics {
            breaker_state: gauge_vec(
                &registry,
                "breaker_state",
                "Circuit breaker state: 0 closed, 1 open, 2 half-open.",
                &["upstream", "target"],
            ),
            breaker_opened: counter_vec(
                &registry,
                "breaker_opened_total",
                "Transitions of a breaker into the open state.",
                &["upstream", "target"],
            ),
            target_up: gauge_vec(
                &registry,
                "target_up",
                "Whether a target gets traffic: 1 healthy, 0 failing checks or ejected.",
                &["upstream", "target"],
            ),
            connections: gauge_vec(
                &registry,
                "upstream_connections",
                "Open keep-alive connections to a target, idle or busy, over all serving \
                 threads.",
                &["upstream", "target"],
            ),
            limit_decisions: counter_vec(
                &registry,
                "ratelimit_decisions_total",
                "Rate-limit decisions by route, limit and decision (allowed or rejected).",
                &["route", "limit", "decision"],
            ),
            limit_redis_errors: counter_vec(
                &registry,
                "ratelimit_redis_errors_total",
                "Global rate-limit decisions that could not reach Redis in time and fell \
                 back (open or closed).",
                &["route", "limit"],
            ),
            worker_instances: gauge(
                &registry,
                "worker_instances",
                "Worker instances running now.",
            ),
            worker_instances_max: gauge(
                &registry,
                "worker_instances_max",
                "The size of the worker instance pool (runtime.max_instances).",
            ),
            worker_queue: gauge(
                &registry,
                "worker_queue",
                "Requests waiting for a free worker instance.",
            ),
            modules: gauge_vec(
                &registry,
                "worker_module_info",
                "Loaded worker modules, with their SHA-256 content hash; always 1.",
                &["module", "hash"],
            ),
            compile_cache: gauge_vec(
                &registry,
                "worker_modules_loaded",
                "Loaded worker modules by source: cache_hit (the compile cache) or compiled.",
                &["source"],
            ),
        };
        Metrics {
            access_log_dropped: counter(
                &registry,
                "access_log_dropped_total",
                "Access-log lines dropped because the writer fell behind.",
            ),
            access_log_written: counter(
                &registry,
                "access_log_lines_total",
                "Access-log lines written.",
            ),
            otlp_spans_dropped: counter(
                &registry,
                "otlp_spans_dropped_total",
                "Trace spans dropped because the OTLP export queue was full or an export failed.",
            ),
            otlp_spans_exported: counter(
                &registry,
                "otlp_spans_exported_total",
                "Trace spans the OTLP collector accepted.",
            ),
            unparsed_requests: counter(
                &registry,
                "unparsed_requests_total",
                "HTTP/1 requests that hyper rejected before the node saw them, with its 400, 414 \
                 or 431: invalid framing, or a head too large.",
            ),
            websocket_tunnels: gauge_vec(
                &registry,
                "websocket_tunnels",
                "WebSocket tunnels open now: handshakes the upstream answered 101 whose \
                 connections still carry bytes.",
                &["route"],
            ),
            websocket_bytes: counter_vec(
                &registry,
                "websocket_bytes_total",
                "Bytes carried by WebSocket tunnels after the handshake, by direction: upstream \
                 (from the client) or client (from the upstream).",
                &["route", "direction"],
            ),
            registry,
            upstream_names,
            routes,
            unrouted,
            state,
        }
    }

    /// Returns the handles of route `index`, or of unrouted requests.
    pub fn route(&self, index: Option<usize>) -> &RouteMetrics {
        index.map_or(&self.unrouted, |index| &self.routes[index])
    }

    /// Returns a shared handle to the metrics of route `index`.
    pub fn route_shared(&self, index: usize) -> Option<Arc<RouteMetrics>> {
        self.routes.get(index).cloned()
    }

    /// Sets the state metrics from the node and renders every metric in the
    /// Prometheus text format (version 0.0.4).
    pub fn render(&self, node: &Node, now: Instant) -> String {
        self.update_state(node, now);
        let mut buffer = Vec::new();
        let encoder = TextEncoder::new();
        if let Err(error) = encoder.encode(&self.registry.gather(), &mut buffer) {
            tracing::warn!(%error, "failed to encode metrics");
        }
        String::from_utf8(buffer).unwrap_or_default()
    }

    fn update_state(&self, node: &Node, now: Instant) {
        let state = &self.state;
        for upstream in node.upstreams.iter() {
            for target in &upstream.targets {
                let address = target.addr.to_string();
                let labels = [upstream.name.as_str(), address.as_str()];
                if let Some(breaker) = &target.breaker {
                    let value = match breaker.state() {
                        State::Closed => 0,
                        State::Open => 1,
                        State::HalfOpen => 2,
                    };
                    state.breaker_state.with_label_values(&labels).set(value);
                    raise_to(
                        &state.breaker_opened.with_label_values(&labels),
                        breaker.opened_total(),
                    );
                }
                let up = i64::from(target.health.is_up(now));
                state.target_up.with_label_values(&labels).set(up);
                let open = target.connections.load(Ordering::Relaxed);
                state
                    .connections
                    .with_label_values(&labels)
                    .set(open as i64);
            }
        }
        for route in &node.routes {
            for limit in &route.limits {
                let labels = |decision: &'static str| [&*route.name, &*limit.spec.name, decision];
                let allowed = limit.counts.allowed.load(Ordering::Relaxed);
                let rejected = limit.counts.rejected.load(Ordering::Relaxed);
                raise_to(
                    &state.limit_decisions.with_label_values(&labels("allowed")),
                    allowed,
                );
                raise_to(
                    &state.limit_decisions.with_label_values(&labels("rejected")),
                    rejected,
                );
                if limit.spec.scope == crate::ratelimit::Scope::Global {
                    let errors = state
                        .limit_redis_errors
                        .with_label_values(&[&*route.name, &*limit.spec.name]);
                    raise_to(&errors, limit.fallbacks());
                }
            }
        }
        let (running, max) = node.runtime.instances();
        state.worker_instances.set(running as i64);
        state.worker_instances_max.set(max as i64);
        state.worker_queue.set(node.runtime.waiting() as i64);
        let (mut hits, mut compiled) = (0, 0);
        for module in node.runtime.modules() {
            state
                .modules
                .with_label_values(&[&*module.name, module.hash.as_str()])
                .set(1);
            match module.cache {
                crate::worker::CacheOutcome::Hit => hits += 1,
                crate::worker::CacheOutcome::Compiled => compiled += 1,
            }
        }
        state
            .compile_cache
            .with_label_values(&["cache_hit"])
            .set(hits);
        state
            .compile_cache
            .with_label_values(&["compiled"])
            .set(compiled);
    }

    /// Sums the request counters of `route`, for the status page.
    pub fn totals(&self, route: &RouteMetrics) -> RouteTotals {
        let mut totals = RouteTotals {
            duration_sum: route.duration.get_sample_sum(),
            duration_count: route.duration.get_sample_count(),
            ..RouteTotals::default()
        };
        for row in route.rows.iter().filter_map(OnceLock::get) {
            for (index, cell) in row.iter().enumerate() {
                let Some(counter) = cell.get() else { continue };
                let count = counter.get();
                let (class, reason) = (index / Reason::COUNT, index % Reason::COUNT);
                totals.requests += count;
                if class == 5 {
                    totals.errors += count;
                }
                if reason_from_index(reason).is_some_and(Reason::is_refusal) {
                    totals.refused += count;
                }
            }
        }
        totals
    }

    /// The upstream names by index.
    pub fn upstream_names(&self) -> &[Arc<str>] {
        &self.upstream_names
    }
}

fn reason_from_index(index: usize) -> Option<Reason> {
    const ALL: [Reason; Reason::COUNT] = [
        Reason::Proxied,
        Reason::WorkerResponse,
        Reason::AuthFailed,
        Reason::Redirect,
        Reason::NoRoute,
        Reason::InvalidPath,
        Reason::InvalidHost,
        Reason::InvalidMethod,
        Reason::InvalidBody,
        Reason::BodyTimeout,
        Reason::UnsupportedTransferCoding,
        Reason::UnsupportedMethod,
        Reason::UnsupportedUpgrade,
        Reason::InvalidUpgrade,
        Reason::BodyTooLarge,
        Reason::RepeatedKeyHeader,
        Reason::NoUpstream,
        Reason::UpstreamUnavailable,
        Reason::UpstreamTimeout,
        Reason::CircuitOpen,
        Reason::NoHealthyUpstream,
        Reason::UpstreamBusy,
        Reason::WorkerFailed,
        Reason::WorkerTimeout,
        Reason::WorkerBusy,
        Reason::RateLimited,
        Reason::RateLimitUnavailable,
        Reason::LoopDetected,
        Reason::ClientClosed,
    ];
    ALL.get(index).copied()
}

/// Raises a counter that mirrors a count kept elsewhere to `value`.
fn raise_to(counter: &IntCounter, value: u64) {
    let current = counter.get();
    if value > current {
        counter.inc_by(value - current);
    }
}

impl RouteMetrics {
    /// Counts a finished request: its upstream (index, or none), status and
    /// reason, and the time until its response head.
    pub fn record(&self, upstream: Option<usize>, status: u16, reason: Reason, took: Duration) {
        self.duration.observe(took.as_secs_f64());
        let slot = upstream.map_or(0, |index| index + 1);
        let Some(row) = self.rows.get(slot) else {
            return;
        };
        let row = row.get_or_init(|| {
            (0..STATUS_CLASSES.len() * Reason::COUNT)
                .map(|_| OnceLock::new())
                .collect()
        });
        let class = status_class(status);
        let cell = &row[class * Reason::COUNT + reason as usize];
        cell.get_or_init(|| {
            let upstream = match upstream {
                Some(index) => &*self.upstream_names[index],
                None => NO_UPSTREAM,
            };
            self.requests.with_label_values(&[
                &*self.name,
                upstream,
                STATUS_CLASSES[class],
                reason.name(),
            ])
        })
        .inc();
    }

    /// Records the time of an upstream exchange, until its response head: a
    /// proxied call or a worker's fetch.
    pub fn upstream(&self, upstream: usize, took: Duration) {
        let Some(cell) = self.upstream_duration.get(upstream) else {
            return;
        };
        cell.get_or_init(|| {
            self.upstream_vec
                .with_label_values(&[&*self.name, &*self.upstream_names[upstream]])
        })
        .observe(took.as_secs_f64());
    }

    /// Records the time of one worker hook call.
    pub fn worker(&self, worker: usize, phase: Phase, took: Duration) {
        if let Some(handles) = self.workers.get(worker) {
            handles[phase as usize].observe(took.as_secs_f64());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reasons_round_trip_through_their_index() {
        for index in 0..Reason::COUNT {
            let reason = reason_from_index(index).unwrap();
            assert_eq!(reason as usize, index, "{}", reason.name());
        }
        assert!(reason_from_index(Reason::COUNT).is_none());
    }

    #[test]
    fn record_resolves_each_series_once() {
        let routes = vec![(Arc::from("api"), vec![Arc::from("auth.wasm")])];
        let metrics = Metrics::new(&routes, &["users".to_owned()]);
        let route = metrics.route(Some(0));
        for _ in 0..3 {
            route.record(Some(0), 200, Reason::Proxied, Duration::from_micros(300));
        }
        route.record(None, 429, Reason::RateLimited, Duration::from_micros(20));
        route.upstream(0, Duration::from_micros(250));
        route.worker(0, Phase::Request, Duration::from_micros(15));
        let totals = metrics.totals(route);
        assert_eq!(totals.requests, 4);
        assert_eq!(totals.refused, 1);
        assert_eq!(totals.errors, 0);
        let text = String::from_utf8({
            let mut buffer = Vec::new();
            TextEncoder::new()
                .encode(&metrics.registry.gather(), &mut buffer)
                .unwrap();
            buffer
        })
        .unwrap();
        assert!(text.contains(
            "edge_requests_total{reason=\"proxied\",route=\"api\",status_class=\"2xx\",\
             upstream=\"users\"} 3"
        ));
        assert!(text.contains(
            "edge_requests_total{reason=\"rate_limited\",route=\"api\",status_class=\"4xx\",\
             upstream=\"none\"} 1"
        ));
        assert!(text
            .contains("edge_upstream_duration_seconds_count{route=\"api\",upstream=\"users\"} 1"));
        assert!(text.contains(
            "edge_worker_duration_seconds_count{module=\"auth.wasm\",phase=\"request\",\
             route=\"api\"} 1"
        ));
    }
}
