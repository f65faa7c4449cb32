//! A node's shared state, built once from the config: routes with their
//! bound workers, upstreams, and the worker runtime.

use std::collections::HashMap;
use std::sync::Arc;

use http::{HeaderValue, Method};
use ipnet::IpNet;

use crate::config::{Config, ConfigError};
use crate::proxy::Upstream;
use crate::ratelimit::{Limit, LimitSpec, RateLimiter, SystemClock};
use crate::route::{HostMatch, RouteRule, Router};
use crate::worker::{Binding, LoadError, Runtime, RuntimeSettings};

/// A route, ready to serve.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    /// Index into [`Node::upstreams`].
    pub upstream: Option<usize>,
    /// The largest request body accepted, in bytes.
    pub max_body: u64,
    /// Workers in the order they run.
    pub workers: Vec<Binding>,
    /// Rate limits in config order.
    pub limits: Vec<Limit>,
    /// Whether any limit runs at stage `i`: 0 before the first worker,
    /// `i + 1` right after worker `i`.
    pub limit_stages: Vec<bool>,
}

impl Route {
    /// True when some limit runs at `stage`.
    pub fn limits_at(&self, stage: usize) -> bool {
        self.limit_stages.get(stage).copied().unwrap_or(false)
    }
}

/// Settings of one listener that the pipeline needs.
#[derive(Debug)]
pub struct Listener {
    pub trusted_proxies: Vec<IpNet>,
}

/// Everything a serving thread needs to handle a request.
pub struct Node {
    pub name: String,
    /// `Via` value added to requests and responses.
    pub via: HeaderValue,
    pub router: Router,
    /// Routes by config index.
    pub routes: Vec<Route>,
    pub upstreams: Vec<Upstream>,
    upstream_names: HashMap<String, usize>,
    pub listeners: Vec<Listener>,
    pub runtime: Runtime,
    pub ratelimit: RateLimiter,
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
    #[error("cannot start the worker runtime: {0:#}")]
    Runtime(anyhow::Error),
    #[error("cannot set up rate limiting: {0}")]
    RateLimit(String),
}

impl Node {
    /// Builds the node: the router, upstreams, and every worker module
    /// loaded, compiled (or taken from the cache) and bound to its route.
    pub fn build(config: &Config) -> Result<Node, BuildError> {
        let settings = RuntimeSettings {
            cache_dir: config.cache_dir(),
            max_instances: config.runtime.max_instances,
            queue_limit: config.runtime.queue_limit,
            queue_timeout: config.runtime.queue_timeout,
            max_memory: config.runtime.max_memory.as_u64() as usize,
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
            upstreams.push(Upstream::new(
                name.clone(),
                upstream.targets.get_ref(),
                next_target,
                upstream.connect_timeout,
                upstream.response_timeout,
                upstream.max_idle_per_target,
            ));
            next_target += upstream.targets.get_ref().len();
        }

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
            });
            let mut workers = Vec::new();
            for (worker_index, worker) in route.workers.iter().enumerate() {
                let module_error = |error: LoadError| BuildError::Module {
                    file: config.source.name.clone(),
                    line: config.line_of(worker.module.span().start),
                    route: index,
                    worker: worker_index,
                    error,
                };
                let path = config.resolve(worker.module.get_ref());
                let module = runtime.load(&path).map_err(module_error)?;
                let binding = binder
                    .block_on(runtime.bind(
                        module,
                        name.clone(),
                        &worker.config,
                        worker.cpu_deadline,
                        worker.max_memory.get_ref().as_u64() as usize,
                    ))
                    .map_err(module_error)?;
                workers.push(binding);
            }
            let mut limits = Vec::new();
            for (limit_index, limit) in route.limits.iter().enumerate() {
                let spec = LimitSpec::parse(limit).map_err(|(span, field, message)| {
                    let line = config.line_of(span.unwrap_or(limit.key.span().start));
                    let field = format!("routes[{index}].limits[{limit_index}].{field}");
                    config.invalid(line, &field, &message)
                })?;
                limits.push(ratelimit.limit(&name, spec));
            }
            let mut limit_stages = vec![false; workers.len() + 1];
            for limit in &limits {
                limit_stages[limit.stage] = true;
            }
            routes.push(Route {
                limits,
                limit_stages,
                name,
                upstream: route
                    .upstream
                    .as_ref()
                    .and_then(|u| upstream_names.get(u.get_ref()).copied()),
                max_body: route.max_body.as_u64(),
                workers,
            });
        }

        let via = HeaderValue::from_str(&format!("1.1 {}", config.node.name))
            .unwrap_or_else(|_| HeaderValue::from_static("1.1 edge"));
        Ok(Node {
            name: config.node.name.clone(),
            via,
            router: Router::new(rules),
            routes,
            upstreams,
            upstream_names,
            listeners: config
                .listeners
                .iter()
                .map(|l| Listener {
                    trusted_proxies: l.trusted_proxies.clone(),
                })
                .collect(),
            runtime,
            ratelimit,
        })
    }

    /// Finds an upstream by name.
    pub fn upstream_index(&self, name: &str) -> Option<usize> {
        self.upstream_names.get(name).copied()
    }
}
