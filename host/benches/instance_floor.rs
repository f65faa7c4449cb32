//! Measures the floor of a fresh instance on this host: the thread CPU time
//! of a new store, an instantiation from an `InstancePre`, one call and the
//! store's drop, directly on wasmtime without edge's runtime around it.
//!
//! Usage: cargo bench -p edge --bench instance_floor [-- ADD_HEADER_WASM]
//!
//! It times two components on two engine configurations: a synchronous
//! instantiation and drop without a call, then the whole sequence with a
//! synchronous and with an asynchronous call:
//!
//! - `smallest`: a component with one exported function, no imports and no
//!   memory, the least an instantiation can do;
//! - `add-header`: modules/add-header.wasm (from `scripts/build-workers`)
//!   with a WASI p2 context built for every call and its `config.json`
//!   import returning `{"headers":{"x-bench":"1"}}`, the worker's other
//!   imports trapping;
//! - `runtime` engine: the configuration `Runtime::new` uses, from
//!   `edge::worker::engine::engine_config`;
//! - `prototype` engine: wasmtime's defaults with the pooling allocator,
//!   `pagemap_scan` and 2 MiB kept resident for memories and tables.
//!
//! The difference between `smallest` and `add-header` on one engine is what
//! the guest itself costs. The difference between add-header here and in
//! `worker_call` is what edge's runtime adds around it.

mod common;

use std::path::PathBuf;

use anyhow::Context as _;
use edge::worker::{engine, wit};
use wasmtime::component::{Component, ComponentExportIndex, InstancePre, Linker, ResourceTable};
use wasmtime::{Enabled, Engine, InstanceAllocationStrategy, PoolingAllocationConfig, Store};
use wasmtime_wasi::{WasiCtx, WasiCtxView, WasiView};

use common::thread_cpu_time;

/// Calls per round, unless the `CALLS` environment variable sets another number.
const CALLS: u32 = 20_000;
const ROUNDS: usize = 7;

/// The smallest component: one exported function, no imports, no memory.
const SMALLEST_WAT: &str = r#"
(component
  (core module $m
    (func (export "run") (result i32) i32.const 42))
  (core instance $i (instantiate $m))
  (func (export "run") (result u32) (canon lift (core func $i "run"))))
"#;

/// The add-header config the guest reads through `config.json`.
const ADD_HEADER_CONFIG: &str = r#"{"headers":{"x-bench":"1"}}"#;

/// Epoch ticks a call may run for. Nothing advances the epoch here.
const EPOCH_DEADLINE: u64 = 1 << 40;

/// The store state of one call, with a WASI context because a component
/// built for wasm32-wasip2 imports WASI.
struct CallState {
    ctx: WasiCtx,
    table: ResourceTable,
}

impl CallState {
    fn new() -> CallState {
        CallState {
            ctx: WasiCtx::builder().build(),
            table: ResourceTable::new(),
        }
    }
}

impl WasiView for CallState {
    fn ctx(&mut self) -> WasiCtxView<'_> {
        WasiCtxView {
            ctx: &mut self.ctx,
            table: &mut self.table,
        }
    }
}

/// Returns the engine configuration of the earlier prototype.
fn prototype_config() -> wasmtime::Config {
    let mut pool = PoolingAllocationConfig::default();
    pool.total_component_instances(2)
        .total_core_instances(16)
        .total_memories(4)
        .total_tables(8)
        .total_stacks(2)
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(2 << 20)
        .pagemap_scan(Enabled::Auto);
    let mut config = wasmtime::Config::new();
    config
        .wasm_component_model(true)
        .allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
    config
}

/// One component, pre-instantiated for sync and for async calls.
struct Prepared {
    sync: InstancePre<CallState>,
    async_: InstancePre<CallState>,
    kind: Guest,
}

#[derive(Clone, Copy)]
enum Guest {
    /// `run: func() -> u32` at the component's top level.
    Smallest(ComponentExportIndex),
    /// `on-request` of the `handler` interface.
    AddHeader(ComponentExportIndex),
}

fn prepare(engine: &Engine, bytes: &[u8], add_header: bool) -> anyhow::Result<Prepared> {
    let component = Component::new(engine, bytes)?;
    let kind = if add_header {
        let (_, interface) = component
            .get_export(None, "edge:worker/handler@0.1.2")
            .context("add-header does not export the handler interface")?;
        let index = component
            .get_export_index(Some(&interface), "on-request")
            .context("add-header does not export on-request")?;
        Guest::AddHeader(index)
    } else {
        let index = component
            .get_export_index(None, "run")
            .context("the smallest component does not export run")?;
        Guest::Smallest(index)
    };
    let sync = link(engine, &component, add_header, false)?;
    let async_ = link(engine, &component, add_header, true)?;
    Ok(Prepared { sync, async_, kind })
}

fn link(
    engine: &Engine,
    component: &Component,
    add_header: bool,
    asynchronous: bool,
) -> anyhow::Result<InstancePre<CallState>> {
    let mut linker = Linker::<CallState>::new(engine);
    if add_header {
        if asynchronous {
            wasmtime_wasi::p2::add_to_linker_async(&mut linker)?;
        } else {
            wasmtime_wasi::p2::add_to_linker_sync(&mut linker)?;
        }
        linker
            .instance("edge:worker/config@0.1.2")?
            .func_wrap("json", |_, ()| Ok((ADD_HEADER_CONFIG.to_owned(),)))?;
        linker.define_unknown_imports_as_traps(component)?;
    }
    Ok(linker.instantiate_pre(component)?)
}

fn request() -> wit::Request {
    common::request([])
}

/// Checks that add-header set its one header.
fn check_action(action: &wit::Action) -> anyhow::Result<()> {
    match action {
        wit::Action::Continue(changes) if changes.set_headers.len() == 1 => Ok(()),
        other => anyhow::bail!("add-header returned {other:?}, expected one header set"),
    }
}

// Not inlined, so that a profiler can collect inside it alone.
#[inline(never)]
fn call_sync(
    engine: &Engine,
    prepared: &Prepared,
    request: &wit::Request,
    instantiate_only: bool,
) -> anyhow::Result<()> {
    let mut store = Store::new(engine, CallState::new());
    store.set_epoch_deadline(EPOCH_DEADLINE);
    let instance = prepared.sync.instantiate(&mut store)?;
    if instantiate_only {
        return Ok(());
    }
    match prepared.kind {
        Guest::Smallest(index) => {
            let run = instance.get_typed_func::<(), (u32,)>(&mut store, index)?;
            let (value,) = run.call(&mut store, ())?;
            anyhow::ensure!(value == 42, "run returned {value}, expected 42");
        }
        Guest::AddHeader(index) => {
            let on_request =
                instance.get_typed_func::<(&wit::Request,), (wit::Action,)>(&mut store, index)?;
            let (action,) = on_request.call(&mut store, (request,))?;
            check_action(&action)?;
        }
    }
    Ok(())
}

#[inline(never)]
async fn call_async(
    engine: &Engine,
    prepared: &Prepared,
    request: &wit::Request,
) -> anyhow::Result<()> {
    let mut store = Store::new(engine, CallState::new());
    store.set_epoch_deadline(EPOCH_DEADLINE);
    let instance = prepared.async_.instantiate_async(&mut store).await?;
    match prepared.kind {
        Guest::Smallest(index) => {
            let run = instance.get_typed_func::<(), (u32,)>(&mut store, index)?;
            let (value,) = run.call_async(&mut store, ()).await?;
            anyhow::ensure!(value == 42, "run returned {value}, expected 42");
        }
        Guest::AddHeader(index) => {
            let on_request =
                instance.get_typed_func::<(&wit::Request,), (wit::Action,)>(&mut store, index)?;
            let (action,) = on_request.call_async(&mut store, (request,)).await?;
            check_action(&action)?;
        }
    }
    Ok(())
}

/// Runs `ROUNDS` rounds of `calls` calls and returns the best thread CPU
/// time per call, in microseconds.
fn best_of_rounds(
    calls: u32,
    mut round: impl FnMut() -> anyhow::Result<()>,
) -> anyhow::Result<f64> {
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let started = thread_cpu_time();
        round()?;
        let cpu = (thread_cpu_time() - started).as_secs_f64() * 1e6 / f64::from(calls);
        best = best.min(cpu);
    }
    Ok(best)
}

/// Counts what instantiating `bytes` creates: core modules, core instances
/// (instantiations only, not bags of exports), memories and tables.
fn describe(bytes: &[u8]) -> anyhow::Result<String> {
    use wasmparser::{Instance, Parser, Payload};
    let (mut modules, mut instances, mut memories, mut tables, mut imports) = (0, 0, 0, 0, 0);
    for payload in Parser::new(0).parse_all(bytes) {
        match payload? {
            Payload::ModuleSection { .. } => modules += 1,
            Payload::InstanceSection(section) => {
                for instance in section {
                    if let Instance::Instantiate { .. } = instance? {
                        instances += 1;
                    }
                }
            }
            Payload::MemorySection(section) => memories += section.count(),
            Payload::TableSection(section) => tables += section.count(),
            Payload::ImportSection(section) => imports += section.count(),
            _ => {}
        }
    }
    Ok(format!(
        "{modules} core modules, {instances} core instantiations, {memories} memories, \
         {tables} tables, {imports} core imports"
    ))
}

fn main() -> anyhow::Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let add_header_path = std::env::args()
        .skip(1)
        .find(|a| a != "--bench")
        .map_or_else(|| repo.join("modules/add-header.wasm"), PathBuf::from);
    let add_header = std::fs::read(&add_header_path).with_context(|| {
        format!(
            "cannot read {}; run scripts/build-workers first",
            add_header_path.display()
        )
    })?;
    let smallest = wat::parse_str(SMALLEST_WAT)?;
    println!("smallest: {}", describe(&smallest)?);
    println!("add-header: {}", describe(&add_header)?);

    let calls = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CALLS);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let request = request();
    let engines = [
        ("runtime", engine::engine_config(2, 64 << 20, true)),
        ("prototype", prototype_config()),
    ];
    println!("best of {ROUNDS} rounds of {calls} calls, thread CPU µs per call:");
    for (engine_name, config) in engines {
        let engine = Engine::new(&config)?;
        for (guest_name, bytes, is_add_header) in [
            ("smallest", &smallest, false),
            ("add-header", &add_header, true),
        ] {
            let prepared = prepare(&engine, bytes, is_add_header)?;
            let sync_rounds = |instantiate_only| {
                best_of_rounds(calls, || {
                    for _ in 0..calls {
                        call_sync(&engine, &prepared, &request, instantiate_only)?;
                    }
                    Ok(())
                })
            };
            let instantiate = sync_rounds(true)?;
            let sync = sync_rounds(false)?;
            let asynchronous = best_of_rounds(calls, || {
                rt.block_on(async {
                    for _ in 0..calls {
                        call_async(&engine, &prepared, &request).await?;
                    }
                    anyhow::Ok(())
                })
            })?;
            println!(
                "{engine_name:>9} engine, {guest_name:>10}: instantiate and drop {instantiate:6.2}, \
                 sync call {sync:6.2}, async call {asynchronous:6.2}"
            );
        }
    }
    Ok(())
}
