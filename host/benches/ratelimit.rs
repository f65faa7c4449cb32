//! CPU time a rate limit adds to a request, measured in-process: the
//! limiter's decision and the four response headers, without the network.
//!
//! Usage: cargo bench -p edge --bench ratelimit [-- --redis redis://HOST:PORT] [--only TEXT]
//!        [--iterations N] [--timeout DURATION] [--in-flight N]
//! Without `--redis` only the local limiter is measured; `--only` runs the
//! cases whose label contains TEXT; `--iterations` sets the requests of each
//! local case (default 5,000,000; a global case runs a sixteenth of them),
//! fewer for a run under callgrind. `--timeout` sets the Redis timeout
//! (default 50ms). A run under callgrind needs a longer one, such as 5s,
//! because otherwise its decisions time out and fall back to the local
//! limiter, which the run reports. `--in-flight` sets the requests a global
//! case keeps in flight (default 32), so the batches of a run under
//! callgrind can be as small as a node's. Each case prints
//! the CPU time per request of this process (user + system, from
//! /proc/self/stat) minus that of building the same response headers
//! without a limit (the upstream's four and the four the node adds).
//! Each case fills one header map, cleared between requests, because hyper
//! parses each response into a cleared map that an earlier message on the
//! connection left behind, so the node's maps keep their capacity.

use std::net::{IpAddr, Ipv4Addr};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use http::header::{HeaderMap, HeaderValue, CONTENT_LENGTH, CONTENT_TYPE, DATE, SERVER, VIA};

use edge::config::{LimitConfig, RedisConfig};
use edge::context::RequestContext;
use edge::ratelimit::{KeyInput, Limit, LimitSet, LimitSpec, RateLimiter, SystemClock};

/// User plus system CPU time of this process, in nanoseconds.
fn cpu_ns() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("read /proc/self/stat");
    let fields: Vec<&str> = stat.rsplit(") ").next().unwrap().split(' ').collect();
    let ticks: f64 = fields[11].parse::<f64>().unwrap() + fields[12].parse::<f64>().unwrap();
    // CLK_TCK is 100 on Linux.
    ticks * 10_000_000.0
}

/// Clears `headers` and fills it with a response's headers as an upstream
/// sends them.
fn response_headers(headers: &mut HeaderMap) {
    headers.clear();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static("text/plain"));
    headers.insert(CONTENT_LENGTH, HeaderValue::from_static("30"));
    headers.insert(
        DATE,
        HeaderValue::from_static("Fri, 04 Dec 2026 19:00:00 GMT"),
    );
    headers.insert(SERVER, HeaderValue::from_static("nginx"));
}

/// Adds the headers the node sets on every response after the rate-limit
/// headers (`Via` and the observability headers), so that a case pays for
/// a map growth only when the limit's headers cause it.
fn node_headers(headers: &mut HeaderMap) {
    headers.append(VIA, HeaderValue::from_static("1.1 bench"));
    headers.insert("x-request-id", HeaderValue::from_static("0123456789abcdef"));
    headers.insert("x-request-duration", HeaderValue::from_static("0.000123"));
    headers.insert("x-gateway-node", HeaderValue::from_static("bench"));
}

/// Returns when the next request was received: a microsecond after the
/// one before, as at a million requests a second. A node reads the clock
/// once per request whether or not the route has a limit, so the time
/// costs a case only this addition.
fn received() -> Instant {
    static START: LazyLock<Instant> = LazyLock::new(Instant::now);
    static MICROS: AtomicU64 = AtomicU64::new(0);
    *START + Duration::from_micros(MICROS.fetch_add(1, Ordering::Relaxed))
}

/// One request through the limits: decide, then set the headers (unless
/// `headers` is false) on `response`.
async fn one_request(
    limiter: &RateLimiter,
    limits: &[Limit],
    client: u32,
    headers: bool,
    response: &mut HeaderMap,
) {
    let request = HeaderMap::new();
    let context = RequestContext::default();
    let input = KeyInput {
        received: received(),
        client_ip: IpAddr::V4(Ipv4Addr::from(client)),
        headers: &request,
        context: &context,
    };
    let mut shown = None;
    let all = LimitSet::of(limits, |_| true);
    // As the node does: local limits decide at once, the others wait.
    if limiter.check_now(limits, all, &input, &mut shown).is_none() {
        let _ = limiter.check(limits, all, &input, &mut shown).await;
    }
    response_headers(response);
    if let (Some(shown), true) = (shown, headers) {
        shown.apply(response);
    }
    node_headers(response);
    std::hint::black_box(response);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut redis_url = None;
    let mut only = None;
    let mut iterations = 5_000_000u32;
    let mut timeout = "50ms".to_owned();
    let mut in_flight = 32u32;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--redis" => redis_url = args.next(),
            "--only" => only = args.next(),
            "--iterations" => {
                iterations = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .expect("--iterations takes a number")
            }
            "--in-flight" => {
                in_flight = args
                    .next()
                    .and_then(|n| n.parse().ok())
                    .filter(|&n| n > 0)
                    .expect("--in-flight takes a number above 0")
            }
            "--timeout" => timeout = args.next().expect("--timeout takes a duration, such as 2s"),
            _ => {}
        }
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let redis_config: Option<RedisConfig> = redis_url.as_ref().map(|url| {
        toml::from_str(&format!("url = {url:?}\ntimeout = {timeout:?}")).expect("redis config")
    });
    let limiter =
        Rc::new(RateLimiter::new(Arc::new(SystemClock::new(0)), redis_config.as_ref()).unwrap());

    // The cost of the response headers alone, subtracted from every case.
    let mut response = HeaderMap::new();
    let started = cpu_ns();
    for _ in 0..iterations {
        response_headers(&mut response);
        node_headers(&mut response);
        std::hint::black_box(&mut response);
    }
    let baseline = (cpu_ns() - started) / f64::from(iterations);

    // The headers alone.
    let shown = edge::ratelimit::Shown {
        limit: 1000,
        remaining: 999,
        reset_secs: 1,
    };
    let headers_label = "the four response headers only";
    let skip = |label: &str| {
        only.as_ref()
            .is_some_and(|only| !label.contains(only.as_str()))
    };
    let started = cpu_ns();
    for _ in 0..if skip(headers_label) { 0 } else { iterations } {
        response_headers(&mut response);
        shown.apply(&mut response);
        node_headers(&mut response);
        std::hint::black_box(&mut response);
    }
    let headers_only = (cpu_ns() - started) / f64::from(iterations) - baseline;

    // Label, scope, lease, clients, whether to set the headers.
    let mut cases = vec![
        ("local token bucket, one client", "local", 1, 1, true),
        (
            "local token bucket, 100,000 clients",
            "local",
            1,
            100_000,
            true,
        ),
        (
            "local token bucket, one client, decision only",
            "local",
            1,
            1,
            false,
        ),
    ];
    let global_label = format!("global token bucket, one client, {in_flight} in flight");
    let leased_label =
        format!("global token bucket, lease = 100, one client, {in_flight} in flight");
    if redis_url.is_some() {
        cases.push((&global_label, "global", 1, 1, true));
        cases.push((&leased_label, "global", 100, 1, true));
    }
    println!("| limit | CPU ns per request |");
    println!("|---|---:|");
    if !skip(headers_label) {
        println!("| {headers_label} | {headers_only:.0} |");
    }
    for (label, scope, lease, clients, headers) in cases {
        if skip(label) {
            continue;
        }
        let config: LimitConfig = toml::from_str(&format!(
            "key = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"1000000/s\"\nburst = 1000\nscope = \"{scope}\"\n{}",
            if lease > 1 { format!("lease = {lease}") } else { String::new() }
        ))
        .expect("limit config");
        let limits = Rc::new(vec![
            limiter.limit("bench", LimitSpec::parse(&config).unwrap())
        ]);
        let iterations: u32 = if scope == "global" {
            iterations / 16
        } else {
            iterations
        };
        let run = |count: u32| {
            let (limiter, limits) = (limiter.clone(), limits.clone());
            async move {
                if scope == "local" {
                    let mut response = HeaderMap::new();
                    for i in 0..count {
                        one_request(&limiter, &limits, i % clients, headers, &mut response).await;
                    }
                    return;
                }
                // Requests in flight, as from as many client connections.
                let tasks = tokio::task::LocalSet::new();
                for _ in 0..in_flight {
                    let (limiter, limits) = (limiter.clone(), limits.clone());
                    tasks.spawn_local(async move {
                        let mut response = HeaderMap::new();
                        for i in 0..count / in_flight {
                            one_request(&limiter, &limits, i % clients, headers, &mut response)
                                .await;
                        }
                    });
                }
                tasks.await;
            }
        };
        runtime.block_on(run(iterations / 10));
        let started = cpu_ns();
        runtime.block_on(run(iterations));
        let per_request = (cpu_ns() - started) / f64::from(iterations) - baseline;
        println!("| {label} | {per_request:.0} |");
        let fallbacks = limits[0].fallbacks();
        if fallbacks > 0 {
            eprintln!("{label}: {fallbacks} decisions fell back to the local limiter");
        }
    }
    if let Some(backend) = limiter.backend() {
        eprintln!("decisions sent to redis: {}", backend.decisions_sent());
    }
}
