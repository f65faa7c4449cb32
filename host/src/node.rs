//! A node's shared state, built once from the config: routes with their
//! bound workers, upstreams, and the worker runtime.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use http::{HeaderName, HeaderValue, Method};
use ipnet::IpNet;

use crate::access_log::{AccessLog, Names, Sink};
use crate::balance::{HashKey, Policy};
use crate::breaker::BreakerSettings;
use crate::config::{
    BalanceName, CertificateConfig, Config, ConfigError, ListenerConfig, UpstreamConfig,
};
use crate::health::{ActiveSettings, PassiveSettings};
use crate::metrics::Metrics;
use crate::proxy::{Upstream, UpstreamSettings};
use crate::ratelimit::{Limit, LimitSet, LimitSpec, RateLimiter, SystemClock};
use crate::retry::RetrySettings;
use crate::route::{HostMatch, PathMatch, RouteRule, Router};
use crate::tls::{CertificateFiles, ListenerTls, ServerSettings, TlsError, UpstreamTls};
use crate::trace::SpanQueue;
use crate::worker::{
    AllowedUpstreams, Binding, FetchAccess, FetchLimits, LoadError, LogThrottle, Retention,
    Runtime, RuntimeSettings, Secret,
};

/// Returns the part of the node that reads request header `name` after a
/// route matched: one of the route's limits, or the hash key of an upstream,
/// where the route or a worker on it may send the request.
fn header_needed_by(
    name: &HeaderName,
    limits: &[Limit],
    hash_keys: &[(&str, crate::balance::HashKey)],
) -> Option<String> {
    use crate::balance::HashKey;
    use crate::ratelimit::KeySource;

    if let Some(limit) = limits
        .iter()
        .find(|limit| matches!(&limit.spec.key, KeySource::Header(key) if key == name))
    {
        return Some(format!("the limit {:?}", limit.spec.name));
    }
    hash_keys.iter().find_map(|(upstream, key)| {
        let reads = match key {
            HashKey::Header(key) => key == name,
            HashKey::Cookie(_) => name == http::header::COOKIE,
            HashKey::ClientIp => false,
        };
        reads.then(|| format!("the hash_key of upstream {upstream:?}"))
    })
}

/// The shortest secret value a worker may be given, in bytes.
pub const MIN_SECRET_LEN: usize = 8;

/// A route, ready to serve.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// Index into [`Node::upstreams`].
    pub upstream: Option<usize>,
    /// The largest request body accepted, in bytes.
    pub max_body: u64,
    /// Time allowed for the upstream exchange as a whole.
    pub timeout: Option<Duration>,
    /// Workers in the order they run.
    pub workers: Vec<Binding>,
    /// Rate limits in config order.
    pub limits: Vec<Limit>,
    /// The limits whose key is known before the first worker: client
    /// address, header or route.
    pub start_limits: LimitSet,
    /// The limits keyed by a context value, which run once a worker sets it.
    pub context_limits: LimitSet,
    /// The observability headers the route sends.
    pub observe: RouteObserve,
    /// Headers appended to every response of the route.
    pub response_headers: Vec<(HeaderName, HeaderValue)>,
    /// The names of `response_headers`, which an upstream may not send as
    /// trailers, or `None` when there are none.
    pub response_header_names: Option<Arc<[HeaderName]>>,
    /// Request headers removed once the route matches.
    pub remove_request_headers: Vec<HeaderName>,
    /// Whether the route's context limits ever get their value.
    pub context_watch: ContextWatch,
    /// Bounds the warnings about requests that found no upstream.
    pub no_upstream_log: LogThrottle,
    /// The route's WebSocket settings, or `None` when the route rejects
    /// WebSocket handshakes.
    pub websocket: Option<crate::upgrade::WebSocket>,
}

/// A watch for a limit keyed by a context value that no worker ever sets,
/// such as `context:usr` for `context:user`. Such a limit silently counts
/// every request by address, so once a route has served
/// [`ContextWatch::REQUESTS`] requests without the value and none with it,
/// the node warns once.
#[derive(Debug, Default)]
pub struct ContextWatch {
    set: AtomicBool,
    unset: AtomicU64,
}

impl ContextWatch {
    /// The number of requests without the value that makes the node warn.
    pub const REQUESTS: u64 = 1000;

    /// Records a request on which a worker set a limit's value.
    pub fn value_set(&self) {
        if !self.set.load(Ordering::Relaxed) {
            self.set.store(true, Ordering::Relaxed);
        }
    }

    /// Records a request that reached the upstream with the `pending`
    /// limits' values unset.
    pub fn value_unset(&self, route: &Route, pending: LimitSet) {
        if self.set.load(Ordering::Relaxed) {
            return;
        }
        if self.unset.fetch_add(1, Ordering::Relaxed) + 1 == Self::REQUESTS {
            let names: Vec<String> = route
                .limits
                .iter()
                .enumerate()
                .filter(|(index, _)| pending.contains(*index))
                .filter_map(|(_, limit)| limit.spec.key.context_name().map(str::to_owned))
                .collect();
            tracing::warn!(
                route = &*route.name,
                "no worker has set the context values {names:?} in {} requests, so the \
                 limits keyed by them count every request by client address; check the \
                 names against what the route's workers set",
                Self::REQUESTS
            );
        }
    }
}

/// The observability headers of a route, from `[routes.observability]`.
#[derive(Debug, Clone, Copy)]
pub struct RouteObserve {
    pub request_id: bool,
    pub request_duration: bool,
    pub gateway_node: bool,
    pub trace_context: bool,
}

/// Where a node is in its life, for the admin listener's `/readyz`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Built, listeners not bound yet.
    Starting = 0,
    Serving = 1,
    /// Shutting down: no new connections, open ones finishing.
    Draining = 2,
}

impl Phase {
    /// The name `/readyz` reports.
    pub fn name(self) -> &'static str {
        match self {
            Phase::Starting => "starting",
            Phase::Serving => "serving",
            Phase::Draining => "draining",
        }
    }
}

/// The node's current [`Phase`], shared by the serving and admin threads.
#[derive(Debug, Default)]
pub struct Lifecycle(std::sync::atomic::AtomicU8);

impl Lifecycle {
    pub fn get(&self) -> Phase {
        match self.0.load(std::sync::atomic::Ordering::Relaxed) {
            1 => Phase::Serving,
            2 => Phase::Draining,
            _ => Phase::Starting,
        }
    }

    pub fn set(&self, phase: Phase) {
        self.0
            .store(phase as u8, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Settings of one listener that the pipeline needs.
#[derive(Debug)]
pub struct Listener {
    pub trusted_proxies: Vec<IpNet>,
    /// The TLS config, on an HTTPS listener.
    pub tls: Option<Arc<ListenerTls>>,
    /// The header that carries the client certificate's subject, on a
    /// listener that checks client certificates.
    pub client_subject_header: Option<HeaderName>,
    /// The subject headers of every listener that checks client
    /// certificates, removed from requests on this one, so that a client of
    /// a listener without them cannot forge a subject either.
    pub subject_headers_to_remove: Vec<HeaderName>,
    /// The redirect to HTTPS, on a plain-HTTP listener that has one.
    pub redirect: Option<Redirect>,
    /// The `Strict-Transport-Security` value for responses, on an HTTPS
    /// listener that sets one.
    pub hsts: Option<HeaderValue>,
    /// Whether request headers with an underscore in their names are kept.
    pub underscores_in_headers: bool,
}

/// The HTTP-to-HTTPS redirect of a listener.
#[derive(Debug)]
pub struct Redirect {
    /// The port in the `https://` URL. Set when the listeners are bound
    /// unless the config gives it.
    pub port: OnceLock<u16>,
    /// Path prefixes served as usual instead of redirected.
    pub except: Vec<PathMatch>,
}

/// Everything a serving thread needs to handle a request.
pub struct Node {
    pub name: String,
    /// `Via` value added to requests and responses.
    pub via: HeaderValue,
    pub router: Router,
    /// Routes by config index.
    pub routes: Vec<Route>,
    /// Shared with the workers' fetches and key set downloads.
    pub upstreams: Arc<[Upstream]>,
    upstream_names: HashMap<String, usize>,
    pub listeners: Vec<Listener>,
    pub runtime: Runtime,
    pub ratelimit: RateLimiter,
    pub metrics: Metrics,
    /// Whether requests are counted and timed (`[metrics] enabled`).
    pub request_metrics: bool,
    /// The access log, when the config has an `[access_log]` table.
    pub access_log: Option<Arc<AccessLog>>,
    /// The queue of the OTLP span exporter, when `[tracing] otlp_endpoint`
    /// is set (in a build with the `otlp` feature).
    pub spans: Option<SpanQueue>,
    /// The `X-Gateway-Node` value: the node's name.
    pub gateway_node: HeaderValue,
    /// Whether any route sends `X-Request-Id` or the access log is on, so
    /// that requests get an id on arrival.
    pub request_ids: bool,
    pub lifecycle: Lifecycle,
    /// Bounds the log lines about requests that hyper could not parse.
    pub unparsed_log: LogThrottle,
}

/// An error that kept a node from being built.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{file}:{line}: routes[{route}].workers[{worker}]: {error}")]
    Module {
        file: String,
        line: usize,
        route: usize,
        worker: usize,
        error: LoadError,
    },
    #[error("{file}:{line}: {field}: {error}")]
    Tls {
        file: String,
        line: usize,
        field: String,
        error: Box<TlsError>,
    },
    #[error("cannot start the worker runtime: {0:#}")]
    Runtime(anyhow::Error),
    #[error("cannot set up rate limiting: {0}")]
    RateLimit(String),
    #[error("cannot start the access log: {0:#}")]
    AccessLog(anyhow::Error),
    #[error("cannot start the OTLP span export: {0:#}")]
    Tracing(anyhow::Error),
}

/// Whether building a node may create and write files.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileAccess {
    /// Open the access log, store compiled modules in the module cache and
    /// create a missing development certificate, as serving needs.
    ReadWrite,
    /// Create and change no file, as `edge check` needs: check that the
    /// access log could be opened, only read the module cache, and use a
    /// development certificate only when it exists already.
    ReadOnly,
}

impl Node {
    /// Builds the node: the router, upstreams, and every worker module
    /// loaded, compiled (or taken from the cache) and bound to its route.
    pub fn build(config: &Config) -> Result<Node, BuildError> {
        Node::build_with(config, FileAccess::ReadWrite)
    }

    /// Builds the node as [`Node::build`] does, but creates and changes no
    /// file. The node has no access log, so it is for validating a config
    /// and inspecting routes, not for serving.
    pub fn build_read_only(config: &Config) -> Result<Node, BuildError> {
        Node::build_with(config, FileAccess::ReadOnly)
    }

    fn build_with(config: &Config, files: FileAccess) -> Result<Node, BuildError> {
        let cache_dir = config.cache_dir();
        let usable = match &config.runtime.cache_dir {
            // An empty path is the config's own folder, and `/` the root:
            // the entries would mix with other files.
            Some(dir) if dir.as_os_str().is_empty() || cache_dir == std::path::Path::new("/") => {
                Err("must name a folder of its own, not \"\" or /".to_owned())
            }
            _ => crate::worker::check_cache_dir(&cache_dir),
        };
        usable.map_err(|message| {
            let line = config.line_of_key("runtime", "cache_dir");
            config.invalid(line, "runtime.cache_dir", &message)
        })?;
        let settings = RuntimeSettings {
            cache_dir: config.cache_dir(),
            read_only_cache: files == FileAccess::ReadOnly,
            cache_retention: Retention {
                max_size: config.runtime.cache_max_size.as_u64(),
                max_age: config.runtime.cache_max_age,
            },
            max_instances: config.runtime.max_instances,
            queue_limit: config.runtime.queue_limit,
            queue_timeout: config.runtime.queue_timeout,
            max_memory: config.runtime.max_memory.as_u64() as usize,
            upstreams: Arc::new(config.upstreams.keys().cloned().collect()),
            instance_pool: config.routes.iter().any(|route| !route.workers.is_empty()),
        };
        let runtime = Runtime::new(&settings).map_err(BuildError::Runtime)?;
        let clock = SystemClock::from_env().map_err(BuildError::RateLimit)?;
        let ratelimit = RateLimiter::new(
            std::sync::Arc::new(clock),
            config.redis.as_ref().map(|r| r.get_ref()),
        )
        .map_err(BuildError::RateLimit)?;

        let mut upstreams = Vec::new();
        let mut upstream_names = HashMap::new();
        let mut next_target = 0;
        for (name, upstream) in &config.upstreams {
            upstream_names.insert(name.clone(), upstreams.len());
            let tls = match &upstream.tls {
                Some(tls) => {
                    let field = format!("upstreams.{name}.tls");
                    let line = config.line_of(upstream.targets.span().start);
                    let built = UpstreamTls::new(
                        tls.ca
                            .as_ref()
                            .map(|ca| config.resolve(ca.get_ref()))
                            .as_deref(),
                        tls.server_name.as_ref().map(|n| n.get_ref().as_str()),
                        tls.client_certificate
                            .as_ref()
                            .map(|c| certificate_files(config, c))
                            .as_ref(),
                    );
                    Some(built.map_err(|error| tls_error(config, line, field, error))?)
                }
                None => None,
            };
            upstreams.push(Upstream::new(
                name.clone(),
                upstream.targets.get_ref(),
                next_target,
                upstream_settings(upstream),
                tls,
            ));
            next_target += upstream.targets.get_ref().len();
        }
        let upstreams: Arc<[Upstream]> = upstreams.into();

        let via = HeaderValue::from_str(&format!("1.1 {}", config.node.name))
            .unwrap_or_else(|_| HeaderValue::from_static("1.1 edge"));
        let fetch = &config.runtime.fetch;
        let fetch_limits = FetchLimits {
            default_timeout: fetch.default_timeout,
            max_timeout: fetch.max_timeout,
            max_response_body: fetch.max_response_body.as_u64(),
            max_requests_per_call: fetch.max_requests_per_call,
            max_requests_per_hook: fetch.max_requests_per_hook,
            max_wait_per_hook: fetch.max_wait_per_hook,
        };

        // Binding calls each worker's `hooks` export, which is async.
        let binder = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| BuildError::Runtime(e.into()))?;
        let mut rules = Vec::new();
        let mut routes = Vec::new();
        for (index, route) in config.routes.iter().enumerate() {
            let name: Arc<str> = Arc::from(route.name.get_ref().as_str());
            let path = config.path_match(route).map_err(|(span, field, message)| {
                config.invalid(
                    config.line_of(span),
                    &format!("routes[{index}].{field}"),
                    &message,
                )
            })?;
            if !route.case_sensitive && !path.to_string().is_ascii() {
                return Err(config
                    .invalid(
                        config.line_of(route.name.span().start),
                        &format!("routes[{index}].case_sensitive"),
                        &format!(
                            "the {path} has characters beyond ASCII, whose case \
                             case_sensitive = false does not fold (an upstream may read É as é); \
                             write the rule in ASCII or keep the route case-sensitive"
                        ),
                    )
                    .into());
            }
            rules.push(RouteRule {
                index,
                name: name.to_string(),
                host: HostMatch::parse(route.host.as_deref()),
                methods: route
                    .methods
                    .iter()
                    .filter_map(|m| Method::from_bytes(m.to_ascii_uppercase().as_bytes()).ok())
                    .collect(),
                path,
                case_sensitive: route.case_sensitive,
            });
            let mut workers = Vec::new();
            // The route's share of the instance pool, which all its workers'
            // calls draw on.
            let route_slots = route
                .max_instances
                .as_ref()
                .map(|max| Arc::new(tokio::sync::Semaphore::new(*max.get_ref() as usize)));
            for (worker_index, worker) in route.workers.iter().enumerate() {
                let module_error = |error: LoadError| BuildError::Module {
                    file: config.source.name.clone(),
                    line: config.line_of(worker.module.span().start),
                    route: index,
                    worker: worker_index,
                    error,
                };
                let mut secrets = HashMap::with_capacity(worker.secrets.len());
                for (secret_name, source) in &worker.secrets {
                    let invalid = |message: &str| {
                        config.invalid(
                            config.line_of(source.span().start),
                            &format!(
                                "routes[{index}].workers[{worker_index}].secrets.{secret_name}"
                            ),
                            message,
                        )
                    };
                    let value = source
                        .get_ref()
                        .resolve()
                        .map_err(|message| invalid(&message))?;
                    if value.len() < MIN_SECRET_LEN {
                        return Err(invalid(&format!(
                            "the value is {} bytes long; a secret must be at least \
                             {MIN_SECRET_LEN} bytes, because the node removes secrets from \
                             worker logs by their value, and a shorter one matches ordinary \
                             text and shows in the pattern it leaves",
                            value.len()
                        ))
                        .into());
                    }
                    secrets.insert(secret_name.clone(), Secret(value));
                }
                let path = config.resolve(worker.module.get_ref());
                let module = runtime.load(&path).map_err(module_error)?;
                let fetch = (!worker.fetch.is_empty()).then(|| {
                    let allowed: Vec<String> =
                        worker.fetch.iter().map(|n| n.get_ref().clone()).collect();
                    FetchAccess::new(
                        upstreams.clone(),
                        &allowed,
                        fetch_limits.clone(),
                        via.clone(),
                    )
                });
                let allowed = AllowedUpstreams::new(
                    upstreams.clone(),
                    worker.fetch.iter().map(|u| u.get_ref().clone()).collect(),
                );
                let mut binding = binder
                    .block_on(runtime.bind(
                        module,
                        name.clone(),
                        &worker.config,
                        secrets,
                        *worker.cpu_deadline.get_ref(),
                        worker.max_memory.get_ref().as_u64() as usize,
                        fetch,
                        allowed,
                    ))
                    .map_err(module_error)?;
                if let Some(slots) = &route_slots {
                    binding.share_slots(slots.clone());
                }
                workers.push(binding);
            }
            if route.limits.len() > LimitSet::MAX_LIMITS {
                return Err(config
                    .invalid(
                        config.line_of(route.name.span().start),
                        &format!("routes[{index}].limits"),
                        &format!(
                            "the route has {} limits; the maximum is {}",
                            route.limits.len(),
                            LimitSet::MAX_LIMITS
                        ),
                    )
                    .into());
            }
            let mut limits = Vec::new();
            for (limit_index, limit) in route.limits.iter().enumerate() {
                let field = |name: &str| format!("routes[{index}].limits[{limit_index}].{name}");
                let spec = LimitSpec::parse(limit).map_err(|(span, name, message)| {
                    let line = config.line_of(span.unwrap_or(limit.key.span().start));
                    config.invalid(line, &field(name), &message)
                })?;
                if let Some(context_name) = spec.key.context_name() {
                    if route.workers.is_empty() {
                        let message = format!(
                            "no worker on this route can set context value {context_name:?}; \
                             add the worker that sets it, or key the limit by ip, route or \
                             header:NAME"
                        );
                        let line = config.line_of(limit.key.span().start);
                        return Err(config.invalid(line, &field("key"), &message).into());
                    }
                }
                limits.push(ratelimit.limit(&name, spec));
            }
            let context_limits = LimitSet::of(&limits, |l| l.spec.key.context_name().is_some());
            let mut response_headers = Vec::with_capacity(route.response_headers.len());
            for (name, value) in &route.response_headers {
                let header =
                    crate::pipeline::response_header(name, value.get_ref()).map_err(|message| {
                        config.invalid(
                            config.line_of(value.span().start),
                            &format!("routes[{index}].response_headers.{name}"),
                            &message,
                        )
                    })?;
                response_headers.push(header);
            }
            // A worker may send the request to any upstream, so every
            // upstream's hash key counts.
            let hash_keys: Vec<(&str, crate::balance::HashKey)> = config
                .upstreams
                .iter()
                .filter_map(|(name, upstream)| {
                    let key = upstream.hash_key.as_ref()?;
                    Some((
                        name.as_str(),
                        crate::balance::HashKey::parse(key.get_ref()).ok()?,
                    ))
                })
                .collect();
            let mut remove_request_headers = Vec::with_capacity(route.remove_request_headers.len());
            for (position, name) in route.remove_request_headers.iter().enumerate() {
                let header = crate::pipeline::removable_request_header(name.get_ref())
                    .and_then(|header| {
                        if header == crate::trace::X_REQUEST_ID && route.observability.request_id {
                            return Err("the node sets x-request-id on the upstream request, \
                                        from the client's id when it is valid; set \
                                        observability.request_id = false on the route instead"
                                .to_owned());
                        }
                        match header_needed_by(&header, &limits, &hash_keys) {
                            Some(user) => Err(format!(
                                "{user} reads {header}, so removing it would change what the \
                                 route does"
                            )),
                            None => Ok(header),
                        }
                    })
                    .map_err(|message| {
                        config.invalid(
                            config.line_of(name.span().start),
                            &format!("routes[{index}].remove_request_headers[{position}]"),
                            &message,
                        )
                    })?;
                remove_request_headers.push(header);
            }
            let observability = &route.observability;
            routes.push(Route {
                observe: RouteObserve {
                    request_id: observability.request_id,
                    request_duration: observability.request_duration,
                    gateway_node: observability.gateway_node,
                    trace_context: observability.trace_context,
                },
                start_limits: LimitSet::of(&limits, |l| l.spec.key.context_name().is_none()),
                context_limits,
                limits,
                name,
                upstream: route
                    .upstream
                    .as_ref()
                    .and_then(|u| upstream_names.get(u.get_ref()).copied()),
                max_body: route.max_body.as_u64(),
                timeout: route.timeout,
                workers,
                response_header_names: (!response_headers.is_empty()).then(|| {
                    response_headers
                        .iter()
                        .map(|(name, _)| name.clone())
                        .collect()
                }),
                response_headers,
                remove_request_headers,
                context_watch: ContextWatch::default(),
                no_upstream_log: LogThrottle::default(),
                websocket: route.websocket.then_some(crate::upgrade::WebSocket {
                    idle_timeout: route.websocket_idle_timeout,
                }),
            });
        }

        let listeners = config
            .listeners
            .iter()
            .enumerate()
            .map(|(index, listener)| build_listener(config, index, listener, files))
            .collect::<Result<Vec<_>, _>>()?;
        // A static value is cloned without touching a shared reference
        // count, which every serving thread would otherwise update per
        // response. One name is leaked per node built.
        let name: &'static str = Box::leak(config.node.name.clone().into_boxed_str());
        let gateway_node = HeaderValue::from_str(name)
            .map(|_| HeaderValue::from_static(name))
            .unwrap_or_else(|_| HeaderValue::from_static("edge"));
        let route_workers: Vec<(Arc<str>, Vec<Arc<str>>)> = routes
            .iter()
            .map(|route| {
                let modules = route
                    .workers
                    .iter()
                    .map(|w| w.module.name.clone())
                    .collect();
                (route.name.clone(), modules)
            })
            .collect();
        let upstream_list: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
        let registry = Metrics::new(&route_workers, &upstream_list);
        // A WebSocket route shows 0 open tunnels before its first one.
        for route in routes.iter().filter(|route| route.websocket.is_some()) {
            registry
                .websocket_tunnels
                .with_label_values(&[&*route.name])
                .set(0);
        }
        let access_log = match &config.access_log {
            Some(access_log) => {
                let sink = match &access_log.path {
                    Some(path) => Sink::File(config.resolve(path.get_ref())),
                    None => Sink::Stdout,
                };
                let names = Names {
                    node: config.node.name.clone(),
                    routes: route_workers.iter().map(|(name, _)| name.clone()).collect(),
                    upstreams: registry.upstream_names().to_vec(),
                };
                let opened = match files {
                    FileAccess::ReadWrite => AccessLog::start(
                        sink,
                        *access_log.buffer.get_ref(),
                        names,
                        registry.access_log_dropped.clone(),
                        registry.access_log_written.clone(),
                    )
                    .map(|log| Some(Arc::new(log))),
                    FileAccess::ReadOnly => crate::access_log::check_sink(&sink).map(|()| None),
                };
                opened.map_err(|error| match &access_log.path {
                    // A missing folder or a file it may not write: name the line.
                    Some(path) => BuildError::from(config.invalid(
                        config.line_of(path.span().start),
                        "access_log.path",
                        &format!("{error:#}"),
                    )),
                    None => BuildError::AccessLog(error),
                })?
            }
            None => None,
        };
        let spans = start_span_export(config, &registry)?;
        let request_ids =
            config.access_log.is_some() || routes.iter().any(|route| route.observe.request_id);
        Ok(Node {
            spans,
            metrics: registry,
            request_metrics: config.metrics.enabled,
            access_log,
            gateway_node,
            request_ids,
            lifecycle: Lifecycle::default(),
            unparsed_log: LogThrottle::default(),
            name: config.node.name.clone(),
            via,
            router: Router::new(rules),
            routes,
            upstreams,
            upstream_names,
            listeners,
            runtime,
            ratelimit,
        })
    }

    /// Finds an upstream by name.
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstream_names.get(name).copied()
    }
}

/// Turns an upstream's validated config into its settings.
fn upstream_settings(upstream: &UpstreamConfig) -> UpstreamSettings {
    let policy = match upstream.balance {
        BalanceName::RoundRobin => Policy::RoundRobin,
        BalanceName::LeastOutstanding => Policy::LeastOutstanding,
        BalanceName::ConsistentHash => {
            let key = upstream.hash_key.as_ref().map(|key| key.get_ref().as_str());
            Policy::ConsistentHash(
                HashKey::parse(key.unwrap_or_default()).expect("validated hash key"),
            )
        }
    };
    let breaker = &upstream.breaker;
    let retry = &upstream.retry;
    UpstreamSettings {
        connect_timeout: upstream.connect_timeout,
        response_timeout: upstream.response_timeout,
        idle_timeout: Some(upstream.idle_timeout).filter(|idle| !idle.is_zero()),
        max_idle: upstream.max_idle_per_target,
        keepalive_timeout: upstream.keepalive_timeout,
        max_in_flight: upstream.max_requests_per_target,
        queue_timeout: upstream
            .queue_timeout
            .unwrap_or(crate::config::DEFAULT_UPSTREAM_QUEUE_TIMEOUT),
        policy,
        breaker: breaker.enabled.then(|| BreakerSettings {
            consecutive_failures: breaker.consecutive_failures,
            error_rate: (breaker.error_rate_percent > 0)
                .then(|| f64::from(breaker.error_rate_percent) / 100.0),
            window: breaker.window,
            min_requests: breaker.min_requests,
            cool_down: breaker.cool_down,
            max_cool_down: breaker.max_cool_down,
            half_open_probes: breaker.half_open_probes,
        }),
        failure_statuses: upstream.failure_statuses.clone(),
        retry: RetrySettings {
            max_retries: retry.max_retries,
            backoff: retry.backoff,
            max_backoff: retry.max_backoff,
            budget_ratio: f64::from(retry.budget_percent) / 100.0,
            min_retries_per_second: retry.min_retries_per_second,
            on_statuses: retry.on_statuses.clone(),
        },
        active_health: upstream
            .health
            .active
            .as_ref()
            .map(|active| ActiveSettings {
                path: active.path.get_ref().clone(),
                interval: active.interval,
                timeout: active.timeout,
                healthy_threshold: active.healthy_threshold,
                unhealthy_threshold: active.unhealthy_threshold,
            }),
        passive_health: upstream
            .health
            .passive
            .as_ref()
            .map(|passive| PassiveSettings {
                consecutive_failures: passive.consecutive_failures,
                ejection_time: passive.ejection_time,
                max_ejection_time: passive.max_ejection_time,
            }),
    }
}

/// Builds a listener's settings, loading its certificates.
fn build_listener(
    config: &Config,
    index: usize,
    listener: &ListenerConfig,
    files: FileAccess,
) -> Result<Listener, BuildError> {
    let mut built = Listener {
        trusted_proxies: listener.trusted_proxies.clone(),
        tls: None,
        client_subject_header: None,
        subject_headers_to_remove: subject_headers(config),
        redirect: None,
        hsts: None,
        underscores_in_headers: listener.underscores_in_headers,
    };
    if let Some(redirect) = &listener.redirect_https {
        let port = OnceLock::new();
        if let Some(configured) = redirect.port {
            let _ = port.set(configured);
        }
        let except = redirect
            .except
            .iter()
            .map(|path| {
                PathMatch::prefix(path.get_ref()).map_err(|message| {
                    config.invalid(
                        config.line_of(path.span().start),
                        &format!("listeners[{index}].redirect_https.except"),
                        &message,
                    )
                })
            })
            .collect::<Result<_, _>>()?;
        built.redirect = Some(Redirect { port, except });
    }
    let Some(tls) = &listener.tls else {
        return Ok(built);
    };
    let line = config.line_of(listener.addr.span().start);
    let field = |name: String| format!("listeners[{index}].tls.{name}");
    let mut certificates = Vec::new();
    let mut dev_ca = None;
    if tls.dev_certificate {
        let dir = config.source.base_dir.join(".edge-dev-tls");
        let dev = match files {
            FileAccess::ReadWrite => Some(crate::tls::dev_certificate(&dir).map_err(|error| {
                tls_error(config, line, field("dev_certificate".into()), error)
            })?),
            // Serving creates a missing or expiring one, so there is nothing
            // to check yet.
            FileAccess::ReadOnly => crate::tls::existing_dev_certificate(&dir),
        };
        if let Some(dev) = dev {
            certificates.push(dev.files);
            dev_ca = Some(dev.ca);
        }
    }
    certificates.extend(
        tls.certificates
            .iter()
            .map(|c| certificate_files(config, c)),
    );
    if certificates.is_empty() {
        // Only a read-only build gets here: the config requires
        // `certificates` or `dev_certificate`.
        return Ok(built);
    }
    let settings = ServerSettings {
        certificates,
        sni_fallback: tls.sni_fallback,
        client_ca: tls
            .client_ca
            .as_ref()
            .map(|ca| config.resolve(ca.get_ref())),
        client_auth: tls
            .client_auth
            .as_ref()
            .map(|auth| *auth.get_ref())
            .unwrap_or_default(),
    };
    let loaded = ListenerTls::load(settings, tls.reload_interval, dev_ca).map_err(|error| {
        let (entry, entry_line) =
            failed_entry(config, tls, &error).unwrap_or_else(|| ("certificates".to_owned(), line));
        tls_error(config, entry_line, field(entry), error)
    })?;
    built.tls = Some(Arc::new(loaded));
    built.hsts = tls
        .hsts
        .as_ref()
        .and_then(|value| HeaderValue::from_str(value.get_ref()).ok());
    if tls.client_ca.is_some() {
        built.client_subject_header =
            HeaderName::from_bytes(tls.client_subject_header.get_ref().as_bytes()).ok();
    }
    Ok(built)
}

/// The subject header names of every listener that checks client
/// certificates.
fn subject_headers(config: &Config) -> Vec<HeaderName> {
    let mut names: Vec<HeaderName> = Vec::new();
    for tls in config
        .listeners
        .iter()
        .filter_map(|listener| listener.tls.as_ref())
    {
        let header = tls.client_subject_header.get_ref().as_bytes();
        if let (Some(_), Ok(name)) = (&tls.client_ca, HeaderName::from_bytes(header)) {
            if !names.contains(&name) {
                names.push(name);
            }
        }
    }
    names
}

fn certificate_files(config: &Config, certificate: &CertificateConfig) -> CertificateFiles {
    CertificateFiles {
        cert: config.resolve(certificate.cert.get_ref()),
        key: config.resolve(certificate.key.get_ref()),
    }
}

fn tls_error(config: &Config, line: usize, field: String, error: TlsError) -> BuildError {
    BuildError::Tls {
        file: config.source.name.clone(),
        line,
        field,
        error: Box::new(error),
    }
}

/// Finds the config entry of the file a TLS error names, as a field name
/// and line.
fn failed_entry(
    config: &Config,
    tls: &crate::config::ListenerTlsConfig,
    error: &TlsError,
) -> Option<(String, usize)> {
    let path = error.path()?;
    if let Some(ca) = &tls.client_ca {
        if config.resolve(ca.get_ref()) == path {
            return Some(("client_ca".to_owned(), config.line_of(ca.span().start)));
        }
    }
    tls.certificates.iter().enumerate().find_map(|(index, c)| {
        let (name, spanned) = if config.resolve(c.cert.get_ref()) == path {
            ("cert", &c.cert)
        } else if config.resolve(c.key.get_ref()) == path {
            ("key", &c.key)
        } else {
            return None;
        };
        let line = config.line_of(spanned.span().start);
        Some((format!("certificates[{index}].{name}"), line))
    })
}

/// Starts the OTLP span exporter when `[tracing] otlp_endpoint` is set.
#[cfg(feature = "otlp")]
fn start_span_export(config: &Config, metrics: &Metrics) -> Result<Option<SpanQueue>, BuildError> {
    let settings = crate::otlp::ExportSettings::from_config(&config.tracing, &config.node.name)
        .map_err(BuildError::Tracing)?;
    let Some(settings) = settings else {
        return Ok(None);
    };
    let queue = crate::otlp::start(
        settings,
        metrics.otlp_spans_dropped.clone(),
        metrics.otlp_spans_exported.clone(),
    )
    .map_err(BuildError::Tracing)?;
    Ok(Some(queue))
}

/// Returns no exporter: config validation rejects an endpoint in a build
/// without the `otlp` feature.
#[cfg(not(feature = "otlp"))]
fn start_span_export(
    _config: &Config,
    _metrics: &Metrics,
) -> Result<Option<SpanQueue>, BuildError> {
    Ok(None)
}
