//! The worker runtime: loads WebAssembly components and runs each hook call
//! in a fresh instance with a CPU deadline and a memory cap.
//!
//! Isolation: every call gets a new `Store` and instance, made from a
//! pre-instantiated component on wasmtime's pooling allocator, so nothing a
//! worker keeps in memory reaches the next request. WASI is linked with an
//! empty context, so a guest reaches only the host API of the `worker` world
//! (`log`, `config`, `clock`, `context`, `secrets`, `upstreams`, `fetch`,
//! `crypto`).
//!
//! Bounds: epoch interruption enforces the CPU deadline, with a ticker
//! thread advancing the engine's epoch every [`EPOCH_TICK`]. A resource
//! limiter enforces the memory cap by trapping a growth past it. The deadline
//! counts the guest's running time ([`running_time`]). Time a call spends
//! waiting for the network in a host import (a key set fetch, a fetch),
//! yielded to other requests, or off the CPU does not count. Network waits
//! have their own timeouts.
//!
//! Calls are async: a running guest yields to the other requests of its
//! serving thread at every tick. A synchronous call measured 0.5 to 1.7 µs
//! cheaper, but it keeps the thread until the guest returns: 20 requests
//! behind four clients of a worker that loops to its 500 ms deadline took
//! 19.8 s instead of 0.8 s (BENCHMARKS.md), so one slow route would stall
//! every route on its thread.

mod cache;
pub mod crypto;
pub mod engine;
mod fetch;
mod host_api;
mod running_time;
mod stderr;
mod upstreams;

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::Context as _;
use tokio::sync::{Semaphore, SemaphorePermit};
use wasmtime::component::{
    Component, ComponentExportIndex, ComponentNamedList, HasSelf, Instance, InstancePre, Lift,
    Linker, Lower, TypedFunc,
};
use wasmtime::{Engine, Store, Trap, UpdateDeadline, WasmBacktrace};

use cache::ModuleCache;
pub use cache::{check_dir as check_cache_dir, content_hash, CacheOutcome, Pruned, Retention};
pub use crypto::AllowedUpstreams;
use crypto::HostCrypto;
use fetch::FetchState;
pub use fetch::{FetchAccess, FetchLimits, FetchOrigin, FetchTrace};
pub use host_api::Secret;
use host_api::{StoreState, WorkerSettings};
use running_time::RunningTime;

/// Converts header fields to the WIT form a worker reads. A value that is
/// not UTF-8 has its invalid bytes replaced with U+FFFD.
pub fn wit_headers(headers: &http::HeaderMap) -> Vec<wit::Header> {
    headers
        .iter()
        .map(|(name, value)| wit::Header {
            name: name.as_str().to_owned(),
            // `from_utf8` checks ASCII a word at a time, where the lossy
            // conversion scans byte by byte, which shows on long values
            // such as a bearer token.
            value: match std::str::from_utf8(value.as_bytes()) {
                Ok(text) => text.to_owned(),
                Err(_) => String::from_utf8_lossy(value.as_bytes()).into_owned(),
            },
        })
        .collect()
}

use crate::context::RequestContext;

/// Host bindings generated from the `worker` world in `wit/`.
pub mod bindings {
    wasmtime::component::bindgen!({
        path: "../wit",
        world: "worker",
        imports: {
            "edge:worker/fetch.send": async,
            "edge:worker/crypto.[static]key-set.from-upstream": async | trappable,
            "edge:worker/crypto.[method]key-set.find": async | trappable,
            "edge:worker/crypto": trappable,
        },
        with: {
            "edge:worker/crypto.key": crate::worker::crypto::KeyHandle,
            "edge:worker/crypto.key-set": crate::worker::crypto::KeySetHandle,
        },
        exports: { default: async },
    });
}

/// The WIT package this host implements. Workers built against an earlier
/// 0.1.x load too, because the linker matches semver-compatible names.
pub const WIT_PACKAGE: &str = "edge:worker@0.1.2";

/// The records of the worker contract, as host types.
pub use bindings::edge::worker::types as wit;

/// How often the epoch advances. A running guest yields to other requests
/// on its thread at every tick, and its deadline is checked then.
pub const EPOCH_TICK: Duration = Duration::from_millis(1);

/// The leading bytes of a WebAssembly binary.
const WASM_MAGIC: &[u8; 4] = b"\0asm";
/// Version and layer bytes of a core module.
const CORE_MODULE_VERSION: [u8; 4] = [1, 0, 0, 0];
/// Version and layer bytes of a component.
const COMPONENT_VERSION: [u8; 4] = [0x0d, 0, 1, 0];

/// Settings of the runtime, from the `[runtime]` table.
#[derive(Debug, Clone)]
pub struct RuntimeSettings {
    pub cache_dir: PathBuf,
    /// Whether the module cache is only read: its folder is not created
    /// and compiled modules are not stored, as `edge check` needs.
    pub read_only_cache: bool,
    /// The module cache's limits for [`Runtime::prune_cache`].
    pub cache_retention: Retention,
    pub max_instances: u32,
    pub queue_limit: usize,
    pub queue_timeout: Duration,
    pub max_memory: usize,
    /// The names of the node's upstreams, for the `upstreams` import.
    pub upstreams: Arc<HashSet<String>>,
    /// Whether instances come from a pool that is reserved at start. A node
    /// without workers needs none, and then reserves no address space.
    pub instance_pool: bool,
}

/// The failure of a worker call that returned no decision.
#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    /// Every instance slot stayed busy for the queue timeout, or the queue
    /// was full.
    #[error("no worker instance became free in time")]
    Busy,
    /// The call ran past its CPU deadline and was interrupted.
    #[error("worker ran past its CPU deadline of {0:?}")]
    Timeout(Duration),
    /// The guest trapped, panicked, exceeded its memory cap or returned an
    /// invalid decision.
    #[error("{0}")]
    Failed(String),
}

/// An error that kept a module from loading or binding to a route.
#[derive(Debug, thiserror::Error)]
#[error("module {path}: {message}")]
pub struct LoadError {
    pub path: PathBuf,
    pub message: String,
}

/// A compiled component, ready to instantiate.
pub struct Module {
    /// The file it was loaded from.
    pub path: PathBuf,
    /// The file name, used in logs and errors.
    pub name: Arc<str>,
    /// The SHA-256 of its bytes, in hex.
    pub hash: String,
    /// Whether it came from the compile cache.
    pub cache: CacheOutcome,
    instance_pre: InstancePre<StoreState>,
    exports: HandlerExports,
}

/// The indices of the `handler` functions among a component's exports, looked
/// up once at load so that a call fetches only the function it runs.
struct HandlerExports {
    hooks: ComponentExportIndex,
    on_request: ComponentExportIndex,
    on_response: ComponentExportIndex,
}

impl HandlerExports {
    /// The exported interface, as the `worker` world names it.
    const INTERFACE: &str = "edge:worker/handler@0.1.2";

    fn find(component: &Component) -> Result<HandlerExports, String> {
        let missing = |name: &str| {
            format!(
                "it does not export `{name}` of {}; build it with the guest SDK's \
                 export_worker! macro",
                Self::INTERFACE
            )
        };
        let (_, interface) = component
            .get_export(None, Self::INTERFACE)
            .ok_or_else(|| missing("handler"))?;
        let function = |name: &str| {
            component
                .get_export_index(Some(&interface), name)
                .ok_or_else(|| missing(name))
        };
        Ok(HandlerExports {
            hooks: function("hooks")?,
            on_request: function("on-request")?,
            on_response: function("on-response")?,
        })
    }
}

impl std::fmt::Debug for Module {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Module")
            .field("path", &self.path)
            .field("hash", &self.hash)
            .field("cache", &self.cache)
            .finish_non_exhaustive()
    }
}

/// A module bound to one route with that route's config and limits.
#[derive(Debug)]
pub struct Binding {
    pub module: Arc<Module>,
    settings: Arc<WorkerSettings>,
    cpu_deadline: Duration,
    memory_cap: usize,
    /// Whether the worker asked for its response hook.
    pub response_hook: bool,
    /// Limits log lines about this binding's failed calls.
    pub log_throttle: LogThrottle,
    /// The instance slots of the binding's route, when the route has a share
    /// of the pool (`routes[].max_instances`).
    route_slots: Option<Arc<Semaphore>>,
}

impl Binding {
    /// The module's file name.
    pub fn module_name(&self) -> &str {
        &self.module.name
    }

    /// Makes this binding's calls hold one of `slots`, the share of the
    /// instance pool of its route, as well as a slot of the pool.
    pub fn share_slots(&mut self, slots: Arc<Semaphore>) {
        self.route_slots = Some(slots);
    }
}

/// The permits a call holds: of its route's share, when the route has one,
/// and of the pool.
type Slots<'a> = (Option<SemaphorePermit<'a>>, SemaphorePermit<'a>);

/// Loads modules and runs calls; one per node, shared by every thread.
pub struct Runtime {
    engine: Engine,
    linker: Linker<StoreState>,
    cache: ModuleCache,
    /// Loaded modules by content hash, so a module used by several routes
    /// is compiled and pre-instantiated once.
    modules: Mutex<HashMap<String, Arc<Module>>>,
    slots: Semaphore,
    max_instances: usize,
    waiting: AtomicUsize,
    queue_limit: usize,
    queue_timeout: Duration,
    max_memory: usize,
    upstreams: Arc<HashSet<String>>,
    ticker: Arc<EpochTicker>,
    crypto: Arc<HostCrypto>,
}

impl Runtime {
    /// Creates the engine, instance pool, linker, cache and epoch ticker.
    pub fn new(settings: &RuntimeSettings) -> anyhow::Result<Runtime> {
        let config = engine::engine_config(
            settings.max_instances,
            settings.max_memory,
            settings.instance_pool,
        );
        let engine = Engine::new(&config)
            .map_err(anyhow::Error::from)
            .with_context(|| {
                format!(
                    "cannot create the wasmtime engine. Its instance pool reserves virtual \
                     address space (not memory) for runtime.max_instances = {} slots of \
                     runtime.max_memory = {} each, plus guard regions; lower them, or raise \
                     the process's address-space limit (ulimit -v, systemd LimitAS=)",
                    settings.max_instances,
                    crate::config::binary(bytesize::ByteSize::b(settings.max_memory as u64)),
                )
            })?;

        let mut linker = Linker::new(&engine);
        wasmtime_wasi::p2::add_to_linker_async(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI")?;
        host_api::link_counted_poll(&mut linker)
            .map_err(anyhow::Error::from)
            .context("cannot link WASI's poll")?;
        bindings::Worker::add_to_linker::<_, HasSelf<_>>(&mut linker, |state| state)
            .map_err(anyhow::Error::from)
            .context("cannot link the worker host API")?;

        let cache = if settings.read_only_cache {
            ModuleCache::read_only(settings.cache_dir.clone(), &engine)
        } else {
            ModuleCache::new(
                settings.cache_dir.clone(),
                &engine,
                settings.cache_retention,
            )?
        };
        let ticker = EpochTicker::spawn(engine.clone())?;
        Ok(Runtime {
            engine,
            linker,
            cache,
            modules: Mutex::new(HashMap::new()),
            slots: Semaphore::new(settings.max_instances as usize),
            max_instances: settings.max_instances as usize,
            waiting: AtomicUsize::new(0),
            queue_limit: settings.queue_limit,
            queue_timeout: settings.queue_timeout,
            max_memory: settings.max_memory,
            upstreams: settings.upstreams.clone(),
            ticker,
            crypto: Arc::new(HostCrypto::default()),
        })
    }

    /// Removes the module cache's entries past its retention, keeping those
    /// of the modules loaded so far. Call it once every module is loaded.
    pub fn prune_cache(&self) -> Pruned {
        self.cache.prune()
    }

    /// Loads (or returns the already loaded) module at `path`, checking
    /// that it is a component of the `worker` world.
    pub fn load(&self, path: &Path) -> Result<Arc<Module>, LoadError> {
        let fail = |message: String| LoadError {
            path: path.to_owned(),
            message,
        };
        let bytes = std::fs::read(path).map_err(|e| {
            fail(format!(
                "cannot read file: {e}; build the worker with `edge worker build CRATE_FOLDER`, \
                 which prints where the module went, or fix the path"
            ))
        })?;
        check_component_header(&bytes).map_err(fail)?;
        let hash = content_hash(&bytes);
        if let Some(module) = self.modules.lock().expect("module map poisoned").get(&hash) {
            return Ok(module.clone());
        }
        let (component, cache) = self
            .cache
            .load(&self.engine, &bytes, &hash)
            .map_err(|e| fail(format!("invalid component: {e:#}")))?;
        let module = Arc::new(
            self.prepare(path, component, hash.clone(), cache)
                .map_err(fail)?,
        );
        tracing::info!(
            module = %path.display(),
            hash = %&hash[..12],
            cache = ?cache,
            "loaded worker module"
        );
        let mut modules = self.modules.lock().expect("module map poisoned");
        Ok(modules.entry(hash).or_insert(module).clone())
    }

    fn prepare(
        &self,
        path: &Path,
        component: Component,
        hash: String,
        cache: CacheOutcome,
    ) -> Result<Module, String> {
        let instance_pre = self.linker.instantiate_pre(&component).map_err(|e| {
            format!(
                "it needs an import this host does not provide; build it against \
                 the {WIT_PACKAGE} `worker` world: {e:#}"
            )
        })?;
        // The generated bindings check every export's type once here. Calls
        // then instantiate from `instance_pre` and fetch one function each
        // instead of all of them.
        bindings::WorkerPre::new(instance_pre.clone()).map_err(|e| {
            format!(
                "it does not export the {WIT_PACKAGE} `handler` interface; build it \
                 with the guest SDK's export_worker! macro: {e:#}"
            )
        })?;
        let name = path.file_name().map_or_else(
            || path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        );
        let exports = HandlerExports::find(&component)?;
        Ok(Module {
            path: path.to_owned(),
            name: name.into(),
            hash,
            cache,
            instance_pre,
            exports,
        })
    }

    /// Binds a loaded module to a route with its config and limits, and
    /// calls its `hooks` export, which checks the config and names the hooks
    /// the worker implements.
    #[expect(
        clippy::too_many_arguments,
        reason = "one argument per setting of the route's worker entry"
    )]
    pub async fn bind(
        &self,
        module: Arc<Module>,
        route: Arc<str>,
        config: &toml::Table,
        secrets: HashMap<String, Secret>,
        cpu_deadline: Duration,
        memory_cap: usize,
        fetch: Option<FetchAccess>,
        key_set_upstreams: AllowedUpstreams,
    ) -> Result<Binding, LoadError> {
        let settings = Arc::new(WorkerSettings::new(
            route,
            module.name.clone(),
            config,
            secrets,
            self.upstreams.clone(),
            fetch,
            key_set_upstreams,
        ));
        let mut binding = Binding {
            module,
            settings,
            cpu_deadline,
            memory_cap: memory_cap.min(self.max_memory),
            response_hook: false,
            log_throttle: LogThrottle::default(),
            route_slots: None,
        };
        let index = &binding.module.exports.hooks;
        let hooks = self
            .call(
                &binding,
                &mut RequestContext::default(),
                FetchState::default(),
                async |instance, store| {
                    let hooks = instance.get_typed_func::<(), (Result<wit::HookSet, String>,)>(
                        &mut *store,
                        index,
                    )?;
                    Ok(hooks.call_async(&mut *store, ()).await?.0)
                },
            )
            .await
            .map_err(|e| LoadError {
                path: binding.module.path.clone(),
                message: format!("it failed to start, before it read its config: {e}"),
            })?
            .map_err(|message| LoadError {
                path: binding.module.path.clone(),
                message: format!("the worker rejected its config: {message}"),
            })?;
        binding.response_hook = hooks.contains(wit::HookSet::RESPONSE);
        Ok(binding)
    }

    /// Returns the worker instances running now, and the pool's size.
    pub fn instances(&self) -> (usize, usize) {
        let free = self.slots.available_permits().min(self.max_instances);
        (self.max_instances - free, self.max_instances)
    }

    /// Returns the requests waiting for a free instance now.
    pub fn waiting(&self) -> usize {
        self.waiting.load(Ordering::Relaxed)
    }

    /// Returns the loaded modules, ordered by file name.
    pub fn modules(&self) -> Vec<Arc<Module>> {
        let mut modules: Vec<Arc<Module>> = self
            .modules
            .lock()
            .expect("module map poisoned")
            .values()
            .cloned()
            .collect();
        modules.sort_by(|a, b| a.name.cmp(&b.name).then_with(|| a.hash.cmp(&b.hash)));
        modules
    }

    /// Waits for a slot of the route's share, when the route has one, then
    /// for a slot of the pool. A free slot is taken at once. Otherwise the
    /// call waits in the bounded queue, for one queue timeout in all.
    async fn reserve<'a>(&'a self, binding: &'a Binding) -> Result<Slots<'a>, WorkerError> {
        let mut deadline = None;
        let route = match &binding.route_slots {
            Some(slots) => Some(self.acquire(slots, &mut deadline).await?),
            None => None,
        };
        let pool = self.acquire(&self.slots, &mut deadline).await?;
        Ok((route, pool))
    }

    /// Takes a permit of `slots`, waiting in the queue until `deadline`
    /// (set on the first wait) when none is free.
    async fn acquire<'a>(
        &self,
        slots: &'a Semaphore,
        deadline: &mut Option<tokio::time::Instant>,
    ) -> Result<SemaphorePermit<'a>, WorkerError> {
        if let Ok(permit) = slots.try_acquire() {
            return Ok(permit);
        }
        if self.waiting.fetch_add(1, Ordering::Relaxed) >= self.queue_limit {
            self.waiting.fetch_sub(1, Ordering::Relaxed);
            return Err(WorkerError::Busy);
        }
        let deadline =
            *deadline.get_or_insert_with(|| tokio::time::Instant::now() + self.queue_timeout);
        let acquired = tokio::time::timeout_at(deadline, slots.acquire()).await;
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            _ => Err(WorkerError::Busy),
        }
    }

    /// Runs the request hook in a fresh instance, which reads and sets the
    /// request's `context` values.
    pub async fn on_request(
        &self,
        binding: &Binding,
        request: &wit::Request,
        context: &mut RequestContext,
        origin: FetchOrigin,
    ) -> Result<wit::Action, WorkerError> {
        let index = &binding.module.exports.on_request;
        let fetch = FetchState::for_request(request, origin);
        self.call(binding, context, fetch, async |instance, store| {
            let on_request =
                checked_at_load::<(&wit::Request,), (wit::Action,)>(instance, &mut *store, index)?;
            Ok(on_request.call_async(&mut *store, (request,)).await?.0)
        })
        .await
    }

    /// Runs the response hook in a fresh instance, which reads and sets the
    /// request's `context` values.
    pub async fn on_response(
        &self,
        binding: &Binding,
        request: &wit::Request,
        response: &wit::ResponseHead,
        context: &mut RequestContext,
        origin: FetchOrigin,
    ) -> Result<wit::ResponseChanges, WorkerError> {
        let index = &binding.module.exports.on_response;
        let fetch = FetchState::for_request(request, origin);
        self.call(binding, context, fetch, async |instance, store| {
            let on_response = checked_at_load::<
                (&wit::Request, &wit::ResponseHead),
                (wit::ResponseChanges,),
            >(instance, &mut *store, index)?;
            Ok(on_response
                .call_async(&mut *store, (request, response))
                .await?
                .0)
        })
        .await
    }

    /// Waits for an instance slot, instantiates the binding's module in a new
    /// store and runs `run` on it. The guest yields to other tasks at every
    /// epoch tick and is interrupted once its CPU deadline has passed.
    /// `context` moves into the store for the call and back out after it,
    /// with the values the guest set, whether or not the call succeeded.
    ///
    /// The deadline counts the guest's running time (see [`running_time`]).
    /// The time it waited for its fetches does not count, because the fetch
    /// timeouts bound that wait. Neither do its turns yielded to other
    /// requests, nor the time the kernel ran other processes.
    async fn call<R>(
        &self,
        binding: &Binding,
        context: &mut RequestContext,
        fetch: FetchState,
        run: impl AsyncFnOnce(&Instance, &mut Store<StoreState>) -> wasmtime::Result<R>,
    ) -> Result<R, WorkerError> {
        let _slots = self.reserve(binding).await?;
        let _ticking = self.ticker.call_started();
        let state = StoreState::new(
            binding.settings.clone(),
            binding.memory_cap,
            self.crypto.clone(),
            std::mem::take(context),
            fetch,
            RunningTime::start(binding.cpu_deadline),
        );
        let mut store = Store::new(&self.engine, state);
        store.limiter(|state| &mut state.limiter);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut store| {
            // Neither network waits in host imports nor the time other
            // requests on the thread ran while this guest yielded are the
            // guest's running time.
            let data = store.data_mut();
            let waited = data.fetch.waited + data.host_wait;
            let deadline = data.running.deadline();
            let (so_far, yields) = data.running.tick(waited);
            if so_far >= deadline {
                return Ok(UpdateDeadline::Interrupt);
            }
            let yields = yields.clone();
            Ok(UpdateDeadline::YieldCustom(
                1,
                Box::pin(async move { yields.yield_once().await }),
            ))
        });
        let result = match binding
            .module
            .instance_pre
            .instantiate_async(&mut store)
            .await
        {
            Ok(instance) => run(&instance, &mut store).await,
            Err(error) => Err(error),
        };
        *context = std::mem::take(&mut store.data_mut().context);
        context.fetch_wait += store.data().fetch.waited;
        let log_lines = store.data().log_lines;
        // The warning counts against the binding's lines a second, as the
        // guest's own lines do, so its rate does not grow with the requests.
        let admitted = (log_lines > host_api::MAX_LOG_LINES)
            .then(|| {
                binding
                    .settings
                    .log_throttle
                    .admit_per_second(host_api::LOG_LINES_PER_SECOND)
            })
            .flatten();
        if let Some(suppressed) = admitted {
            tracing::warn!(
                route = &*binding.settings.route,
                worker = &*binding.settings.module,
                suppressed,
                "the worker wrote {log_lines} log lines in one call; the {} past the cap of {} \
                 a call were dropped",
                log_lines - host_api::MAX_LOG_LINES,
                host_api::MAX_LOG_LINES
            );
        }
        result.map_err(|error| classify_trap(error, &store, binding))
    }
}

/// Returns the `handler` function at `index` of a fresh instance as a typed
/// function, without checking its type again. `get_typed_func` checks the
/// whole request and action types on every call, about 3,300 instructions
/// (callgrind, add-header), while every instance of a module has the types
/// that [`Runtime::prepare`] checked once.
fn checked_at_load<Params, Results>(
    instance: &Instance,
    store: &mut Store<StoreState>,
    index: &ComponentExportIndex,
) -> wasmtime::Result<TypedFunc<Params, Results>>
where
    Params: ComponentNamedList + Lower,
    Results: ComponentNamedList + Lift,
{
    let func = instance.get_func(&mut *store, index).ok_or_else(|| {
        wasmtime::format_err!("the handler function is missing from the instance")
    })?;
    // SAFETY: `index` is a function export of the `handler` interface that
    // `HandlerExports::find` found in this instance's component. In
    // `prepare`, `bindings::WorkerPre::new` checked that the component's
    // `on-request` and `on-response` have the types of the generated
    // bindings, which the two callers name here. The generated bindings
    // call `new_unchecked` on the same grounds.
    #[allow(unsafe_code)]
    let typed = unsafe { TypedFunc::new_unchecked(func) };
    Ok(typed)
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker.stop();
    }
}

/// Turns a failed call into the error the pipeline reports.
fn classify_trap(
    error: wasmtime::Error,
    store: &Store<StoreState>,
    binding: &Binding,
) -> WorkerError {
    if let Some(Trap::Interrupt) = error.downcast_ref::<Trap>() {
        return WorkerError::Timeout(binding.cpu_deadline);
    }
    let limiter = &store.data().limiter;
    if let (Some(desired), true) = (limiter.exceeded, limiter.exceeded_initially) {
        return WorkerError::Failed(format!(
            "the module's initial memory of {desired} bytes is over the worker's max_memory of \
             {} bytes; raise max_memory to at least that",
            binding.memory_cap
        ));
    }
    if let Some(desired) = limiter.exceeded {
        return WorkerError::Failed(format!(
            "worker exceeded its memory cap of {} bytes (it asked for {desired}); raise the \
             worker's max_memory if it needs that much",
            binding.memory_cap
        ));
    }
    let mut message = match error.downcast_ref::<Trap>() {
        Some(Trap::StackOverflow) => {
            "worker trapped: stack overflow (its call stack is exhausted)".to_owned()
        }
        // A Rust guest's stack sits below its data in linear memory, so a
        // stack that overflows there reads or writes out of bounds.
        Some(Trap::MemoryOutOfBounds) => "worker trapped: out of bounds memory access, which \
             is also how a guest's stack overflow into its data shows"
            .to_owned(),
        Some(trap) => format!("worker trapped: {trap}"),
        None => format!("worker trapped: {:#}", error.root_cause()),
    };
    // Only the innermost frames are named, because the whole backtrace of a
    // deep recursion would be thousands of lines in one log record.
    if let Some(backtrace) = error.downcast_ref::<WasmBacktrace>() {
        let demangled = |frame: &wasmtime::FrameInfo| match frame.func_name() {
            Some(name) => format!("{:#}", rustc_demangle::demangle(name)),
            None => "?".to_owned(),
        };
        // A panic's innermost frames are the standard library's panic and
        // abort machinery, so the worker's own functions come after them.
        let mut frames: Vec<String> = backtrace
            .frames()
            .iter()
            .map(demangled)
            .filter(|name| !is_runtime_frame(name))
            .take(BACKTRACE_FRAMES)
            .collect();
        if frames.is_empty() {
            frames = backtrace
                .frames()
                .iter()
                .take(BACKTRACE_FRAMES)
                .map(demangled)
                .collect();
        }
        if !frames.is_empty() {
            message.push_str(&format!(" (in {})", frames.join(" < ")));
        }
    }
    let stderr = store.data().stderr();
    if !stderr.is_empty() {
        message.push_str(&format!("; stderr: {stderr}"));
    }
    if let Some(line) = &store.data().dropped_error {
        message.push_str(&format!("; last error line, over the log cap: {line}"));
    }
    WorkerError::Failed(message)
}

/// Returns whether `name` is a frame of the Rust runtime inside a guest: the
/// standard library, its panic and abort paths, or the guest SDK's panic hook.
fn is_runtime_frame(name: &str) -> bool {
    const PREFIXES: [&str; 8] = [
        "std::",
        "core::",
        "alloc::",
        "__rustc::",
        "__rust_",
        "rust_panic",
        "abort",
        "edge_sdk::log::",
    ];
    PREFIXES.iter().any(|prefix| name.starts_with(prefix))
}

/// How many of a trap's innermost guest frames its error names.
const BACKTRACE_FRAMES: usize = 3;

/// Checks the binary header, so that a core module or a non-wasm file gets
/// a message naming what it is.
fn check_component_header(bytes: &[u8]) -> Result<(), String> {
    if !bytes.starts_with(WASM_MAGIC) {
        return Err("not a WebAssembly binary (it does not start with \\0asm)".to_owned());
    }
    if bytes.len() < 8 {
        return Err(format!(
            "not a WebAssembly binary: {} bytes is too short for its 8-byte header",
            bytes.len()
        ));
    }
    let version: [u8; 4] = bytes[4..8].try_into().expect("slice of 4 bytes");
    if version == CORE_MODULE_VERSION {
        return Err(
            "it is a core WebAssembly module, not a component; build the worker \
                    for wasm32-wasip2 (edge worker build) so that it is a component"
                .to_owned(),
        );
    }
    if version != COMPONENT_VERSION {
        return Err(format!(
            "unsupported WebAssembly version or layer {version:02x?}"
        ));
    }
    Ok(())
}

/// The thread that advances the engine's epoch every [`EPOCH_TICK`] while
/// calls run. It parks once a tick has passed with no call running or
/// started, so an idle node, or one whose routes have no workers, does not
/// wake a core every tick.
struct EpochTicker {
    /// Calls between `call_started` and the drop of its guard.
    in_flight: AtomicUsize,
    /// Calls started since the node began, to see whether any started
    /// during the last tick.
    started: AtomicU64,
    parked: AtomicBool,
    stop: AtomicBool,
    thread: std::sync::OnceLock<std::thread::Thread>,
}

impl EpochTicker {
    fn spawn(engine: Engine) -> anyhow::Result<Arc<EpochTicker>> {
        let ticker = Arc::new(EpochTicker {
            in_flight: AtomicUsize::new(0),
            started: AtomicU64::new(0),
            parked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            thread: std::sync::OnceLock::new(),
        });
        let running = ticker.clone();
        std::thread::Builder::new()
            .name("edge-epoch".to_owned())
            .spawn(move || running.run(&engine))
            .context("cannot start the epoch ticker thread")?;
        Ok(ticker)
    }

    fn run(&self, engine: &Engine) {
        // Set before the first park, so that a call that reads `parked` as
        // true can wake this thread.
        let _ = self.thread.set(std::thread::current());
        let mut seen = self.started.load(Ordering::Relaxed);
        while !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(EPOCH_TICK);
            engine.increment_epoch();
            let started = self.started.load(Ordering::Relaxed);
            let idle = started == seen;
            seen = started;
            if idle && self.in_flight.load(Ordering::SeqCst) == 0 {
                // Store `parked` before reading `in_flight` again, both SeqCst.
                // A call starting now is then either counted here, or it reads
                // `parked` as true and unparks this thread.
                self.parked.store(true, Ordering::SeqCst);
                let still_idle = self.in_flight.load(Ordering::SeqCst) == 0;
                if still_idle && !self.stop.load(Ordering::SeqCst) {
                    std::thread::park();
                }
                self.parked.store(false, Ordering::SeqCst);
                seen = self.started.load(Ordering::Relaxed);
            }
        }
    }

    /// Counts a call as running until the returned guard drops, waking the
    /// ticker if it is parked.
    fn call_started(&self) -> CallGuard<'_> {
        self.started.fetch_add(1, Ordering::Relaxed);
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        if self.parked.load(Ordering::SeqCst) {
            self.unpark();
        }
        CallGuard { ticker: self }
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.unpark();
    }

    fn unpark(&self) {
        if let Some(thread) = self.thread.get() {
            thread.unpark();
        }
    }
}

/// A running call, as counted by [`EpochTicker`].
struct CallGuard<'a> {
    ticker: &'a EpochTicker,
}

impl Drop for CallGuard<'_> {
    fn drop(&mut self) {
        self.ticker.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Admits at most [`LogThrottle::PER_SECOND`] log lines a second, so that a
/// worker failing on every request cannot flood the log.
#[derive(Debug, Default)]
pub struct LogThrottle {
    /// The current second (since the Unix epoch) in the high 32 bits and the
    /// lines logged in it in the low 32 bits.
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl LogThrottle {
    /// Log lines admitted per second.
    pub const PER_SECOND: u64 = 10;

    /// Creates a throttle that has admitted nothing yet, for a `static`.
    pub const fn new() -> LogThrottle {
        LogThrottle {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Returns `Some(lines suppressed since the last admitted one)` when a
    /// line may be logged now, else counts it as suppressed.
    pub fn admit(&self) -> Option<u64> {
        self.admit_per_second(Self::PER_SECOND)
    }

    /// Works as [`LogThrottle::admit`] does, with at most `per_second` lines
    /// admitted each second.
    pub fn admit_per_second(&self, per_second: u64) -> Option<u64> {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs())
            & 0xffff_ffff;
        let state = self.state.load(Ordering::Relaxed);
        let next = if state >> 32 == second {
            if state & 0xffff_ffff >= per_second {
                self.suppressed.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            state + 1
        } else {
            (second << 32) | 1
        };
        // A lost race only lets one extra line through.
        self.state.store(next, Ordering::Relaxed);
        Some(self.suppressed.swap(0, Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn guest_text_stays_one_log_line() {
        assert_eq!(host_api::one_line("plain\ttext"), "plain\ttext");
        assert_eq!(
            host_api::one_line("a\nINFO forged\r\u{1b}[31m"),
            "a\\nINFO forged\\r\\u{1b}[31m"
        );
    }

    #[test]
    fn runtime_frames_are_recognised() {
        for name in [
            "std::process::abort",
            "core::panicking::panic_fmt",
            "__rustc::rust_panic",
            "abort",
            "edge_sdk::log::log_panics::{{closure}}",
        ] {
            assert!(is_runtime_frame(name), "{name}");
        }
        for name in ["fixture_worker::recurse", "my_worker::handle_abort"] {
            assert!(!is_runtime_frame(name), "{name}");
        }
    }
    use super::*;

    #[test]
    fn wit_headers_replace_invalid_utf8() {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            "x-text",
            http::HeaderValue::from_bytes("caf\u{e9} ok".as_bytes()).expect("valid header value"),
        );
        headers.insert(
            "x-bytes",
            http::HeaderValue::from_bytes(b"a\xffb").expect("valid header value"),
        );
        let converted = wit_headers(&headers);
        let value = |name: &str| {
            converted
                .iter()
                .find(|header| header.name == name)
                .map(|header| header.value.as_str())
        };
        assert_eq!(value("x-text"), Some("caf\u{e9} ok"));
        assert_eq!(value("x-bytes"), Some("a\u{fffd}b"));
    }
}
