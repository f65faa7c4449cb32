//! The wasmtime configuration of the worker runtime: the instance pool and
//! the engine settings every call's fresh instance is made with.

use wasmtime::{Enabled, InstanceAllocationStrategy, PoolingAllocationConfig};

/// The native stack a guest call runs on: the guest's own frames, at most
/// [`MAX_WASM_STACK`], and below them the host functions it calls.
pub const ASYNC_STACK_SIZE: usize = 1 << 20;

/// The most of [`ASYNC_STACK_SIZE`] that a guest's frames may use. A guest
/// past it traps with a stack overflow. It must leave room for the host:
/// with both at 512 KiB, a guest that recursed until the wasm stack was full
/// overflowed the fiber's stack in a host frame, which aborts the process.
pub const MAX_WASM_STACK: usize = 512 << 10;

/// Returns the engine configuration of a runtime with `max_instances`
/// instance slots, each with linear memories of at most `max_memory` bytes.
/// Without `pooled`, instances are allocated on demand and nothing is
/// reserved at start.
pub fn engine_config(max_instances: u32, max_memory: usize, pooled: bool) -> wasmtime::Config {
    let mut pool = PoolingAllocationConfig::default();
    // A Rust component for wasm32-wasip2 contains a few core instances,
    // one or two memories and a few tables, so leave room for that per
    // slot.
    pool.total_component_instances(max_instances)
        .total_core_instances(max_instances.saturating_mul(8))
        .total_memories(max_instances.saturating_mul(2))
        .total_tables(max_instances.saturating_mul(4))
        .total_stacks(max_instances)
        .max_memory_size(max_memory)
        // Keeping the first pages of a memory or table resident between
        // instances, with pagemap_scan resetting only dirty pages, keeps a
        // fresh instance cheap under concurrency.
        .linear_memory_keep_resident(2 << 20)
        .table_keep_resident(2 << 20)
        .async_stack_keep_resident(ASYNC_STACK_SIZE)
        .pagemap_scan(Enabled::Auto);
    let mut config = wasmtime::Config::new();
    config
        .wasm_component_model(true)
        .async_stack_size(ASYNC_STACK_SIZE)
        .max_wasm_stack(MAX_WASM_STACK)
        .epoch_interruption(true)
        .allocation_strategy(if pooled {
            InstanceAllocationStrategy::Pooling(pool)
        } else {
            InstanceAllocationStrategy::OnDemand
        });
    // `perf` can then name the functions of guests in its profiles.
    if std::env::var_os("EDGE_PERF_MAP").is_some_and(|value| value == "1") {
        config.profiler(wasmtime::ProfilingStrategy::PerfMap);
    }
    config
}
