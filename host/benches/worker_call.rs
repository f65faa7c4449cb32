//! Measures one worker call in a fresh instance, without the network: the
//! time per `on_request` call of a module built by `scripts/build-workers`.
//!
//! Usage: cargo bench -p edge --bench worker_call [-- MODULE CONFIG_TOML [HEADER]...]
//! Defaults to modules/add-header.wasm with `headers = { "x-bench" = "1" }`.
//! Each HEADER, written `name: value`, is added to the request. With
//! `HOOK=response` in the environment, it times `on_response` instead.
//! `MAX_INSTANCES` sets the size of the instance pool (default 2; a node's
//! default is 128).

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use edge::context::RequestContext;
use edge::worker::{wit, Runtime, RuntimeSettings};

use common::thread_cpu_time;

/// Calls per round, unless the `CALLS` environment variable sets another number.
const CALLS: u32 = 20_000;
const ROUNDS: usize = 7;

fn main() -> anyhow::Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let mut args = std::env::args().skip(1).filter(|a| a != "--bench");
    let module = args
        .next()
        .map_or_else(|| repo.join("modules/add-header.wasm"), PathBuf::from);
    let config: toml::Table = args
        .next()
        .unwrap_or_else(|| r#"headers = { "x-bench" = "1" }"#.to_owned())
        .parse()?;
    let mut headers = Vec::new();
    for header in args {
        let (name, value) = header
            .split_once(':')
            .ok_or_else(|| anyhow::anyhow!("header {header:?} is not `name: value`"))?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    let response_hook = std::env::var("HOOK").is_ok_and(|hook| hook == "response");
    let max_instances = std::env::var("MAX_INSTANCES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    let cache = tempfile::tempdir()?;
    let settings = RuntimeSettings {
        cache_dir: cache.path().to_owned(),
        read_only_cache: false,
        cache_retention: Default::default(),
        max_instances,
        queue_limit: 2,
        queue_timeout: Duration::from_millis(20),
        max_memory: 64 << 20,
        upstreams: Default::default(),
        instance_pool: true,
    };
    let runtime = Runtime::new(&settings)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let loaded = runtime.load(&module)?;
        let binding = runtime
            .bind(
                loaded,
                Arc::from("bench"),
                &config,
                Default::default(),
                Duration::from_secs(10),
                16 << 20,
                None,
                Default::default(),
            )
            .await?;
        let request = common::request(headers.clone());
        let calls = std::env::var("CALLS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(CALLS);
        let mut best = f64::MAX;
        for round in 0..ROUNDS {
            let started = Instant::now();
            let cpu_started = thread_cpu_time();
            let head = wit::ResponseHead {
                status: 200,
                headers: Vec::new(),
            };
            for _ in 0..calls {
                let mut context = RequestContext::default();
                if response_hook {
                    runtime
                        .on_response(&binding, &request, &head, &mut context, Default::default())
                        .await?;
                } else {
                    runtime
                        .on_request(&binding, &request, &mut context, Default::default())
                        .await?;
                }
            }
            let per_call = |time: Duration| time.as_secs_f64() * 1e6 / f64::from(calls);
            let cpu = per_call(thread_cpu_time() - cpu_started);
            best = best.min(cpu);
            println!(
                "round {round}: {cpu:.2} µs CPU per call, {:.2} µs elapsed",
                per_call(started.elapsed())
            );
        }
        println!("best: {best:.2} µs CPU per call ({})", module.display());
        anyhow::Ok(())
    })
}
