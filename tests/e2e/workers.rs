//! Workers on the request path: the example workers, chaining, isolation,
//! and what happens when a worker fails.

use std::time::{Duration, Instant};

use crate::cli::write_config;
use crate::harness::{edge, get, get_h2, send, Node, Reply, Result, TlsClient, Upstream};

/// A route `name` on `prefix` to upstream `app`, running the fixture worker
/// with `mode` and extra TOML for its entry.
fn fixture_route(name: &str, prefix: &str, mode: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n{extra}\n\
         [routes.workers.config]\nmode = \"{mode}\"\n\n"
    )
}

fn app(upstream: &Upstream) -> String {
    format!("[upstreams.app]\ntargets = [\"{}\"]\n\n", upstream.addr)
}

#[tokio::test]
async fn add_header() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\nupstream = \"app\"\n\n[[routes.workers]]\n\
         module = \"{{modules}}/add-header.wasm\"\n[routes.workers.config]\n\
         headers = {{ \"x-edge\" = \"hello\", \"x-team\" = \"platform\" }}\n\
         response_headers = {{ \"x-served-by\" = \"edge\" }}\n",
        app(&upstream)
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/anything")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-served-by"), Some("edge"));
    let seen = upstream.last().headers;
    assert_eq!(seen["x-edge"], "hello");
    assert_eq!(seen["x-team"], "platform");
    Ok(())
}

#[tokio::test]
async fn path_router() -> Result {
    let (users, payments) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "[upstreams.users]\ntargets = [\"{}\"]\n[upstreams.payments]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\n\n[[routes.workers]]\n\
         module = \"{{modules}}/path-router.wasm\"\n[routes.workers.config]\nrules = [\n\
         {{ prefix = \"/users\", upstream = \"users\" }},\n\
         {{ prefix = \"/checkout\", methods = [\"POST\"], upstream = \"payments\" }},\n]\n",
        users.addr, payments.addr
    );
    let node = Node::start(&config)?;

    assert_eq!(get(&node.url("/users/7")).await?.status, 200);
    assert_eq!(users.last().target, "/users/7");
    assert_eq!(
        send("POST", &node.url("/checkout"), &[], b"{}")
            .await?
            .status,
        200
    );
    assert_eq!(payments.last().method, "POST");

    let wrong_method = get(&node.url("/checkout")).await?;
    assert_eq!(wrong_method.status, 404);
    assert_eq!(wrong_method.json()["error"], "no_rule");
    let unknown = get(&node.url("/nothing")).await?;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.header("content-type"), Some("application/json"));
    assert_eq!(users.count(), 1);
    assert_eq!(payments.count(), 1);
    Ok(())
}

#[tokio::test]
async fn workers_change_headers_and_path_in_order() -> Result {
    let upstream = Upstream::echo().await;
    // The first worker sets x-step, removes x-secret and rewrites the path.
    // The second runs after it and sets x-step again, so its value wins.
    let config = format!(
        "{}[[routes]]\nname = \"chain\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"set\"\nset_headers = {{ \"x-step\" = \"one\" }}\n\
         remove_headers = [\"x-secret\"]\npath = \"/rewritten\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/add-header.wasm\"\n\
         [routes.workers.config]\nheaders = {{ \"x-step\" = \"two\" }}\n",
        app(&upstream)
    );
    let node = Node::start(&config)?;
    let got = send(
        "GET",
        &node.url("/original?q=1"),
        &[("x-secret", "s3cr3t")],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/rewritten?q=1");
    assert_eq!(
        seen.headers["x-step"], "two",
        "the later worker's value wins"
    );
    assert!(!seen.headers.contains_key("x-secret"));
    Ok(())
}

#[tokio::test]
async fn worker_sees_request_and_responds_itself() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[[routes]]\nname = \"device\"\npattern = \"/{{device}}/home\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"echo\"\n",
        app(&upstream)
    );
    let node = Node::start(&config)?;
    let got = send(
        "GET",
        &node.url("/mobile/./home?x=1"),
        &[("x-test", "yes")],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    let seen = got.json();
    assert_eq!(seen["method"], "GET");
    assert_eq!(seen["path"], "/mobile/home");
    assert_eq!(seen["query"], "x=1");
    assert_eq!(seen["route"], "device");
    assert_eq!(seen["client_addr"], "127.0.0.1");
    assert_eq!(seen["params"]["device"], "mobile");
    assert_eq!(seen["headers"]["x-test"], "yes");
    assert_eq!(
        upstream.count(),
        0,
        "a worker's own response never reaches the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn worker_chooses_upstream() -> Result {
    let (main, other) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "{}[upstreams.other]\ntargets = [\"{}\"]\n\n{}upstream = \"other\"\n",
        app(&main),
        other.addr,
        fixture_route("choose", "/", "route", "")
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/x")).await?.status, 200);
    assert_eq!(other.count(), 1);
    assert_eq!(main.count(), 0);
    Ok(())
}

#[tokio::test]
async fn worker_routing_to_unknown_upstream_fails_cleanly() -> Result {
    let main = Upstream::echo().await;
    let config = format!(
        "{}{}upstream = \"missing\"\n",
        app(&main),
        fixture_route("choose", "/", "route", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/x")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(main.count(), 0);
    Ok(())
}

#[tokio::test]
async fn worker_state_never_survives_a_request() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        fixture_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    for _ in 0..5 {
        let got = get(&node.url("/count")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"1");
    }
    Ok(())
}

#[tokio::test]
async fn looping_worker_stops_at_deadline() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}",
        app(&upstream),
        fixture_route("loop", "/loop", "loop", "cpu_deadline = \"100ms\""),
        fixture_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    let started = std::time::Instant::now();
    let got = get(&node.url("/loop")).await?;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "worker_timeout");
    // The log line carries the id the client got, to match the two.
    let request_id = got.header("x-request-id").unwrap_or_default().to_owned();
    assert!(!request_id.is_empty());
    assert_eq!(got.header("retry-after"), Some("1"));
    assert!(started.elapsed() < Duration::from_secs(2));
    assert_eq!(get(&node.url("/after")).await?.status, 200);
    assert_eq!(upstream.count(), 0);
    assert!(node.log_contains("route=loop"));
    let log = node.log();
    assert!(
        log.contains("worker call failed")
            && log.contains("route=loop")
            && log.contains("fixture-worker.wasm"),
        "{log}"
    );
    assert!(log.contains(&format!("request_id={request_id}")), "{log}");
    Ok(())
}

#[tokio::test]
async fn worker_over_memory_cap_fails_cleanly() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}",
        app(&upstream),
        fixture_route("alloc", "/alloc", "alloc", "max_memory = \"8MiB\""),
        fixture_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/alloc")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);
    assert_eq!(get(&node.url("/after")).await?.status, 200);
    assert!(
        node.log_contains("raise the worker's max_memory if it needs that much"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn panicking_worker_gets_worker_failed() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}",
        app(&upstream),
        fixture_route("panic", "/panic", "panic", ""),
        fixture_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/panic")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);
    assert_eq!(get(&node.url("/after")).await?.status, 200);
    node.log_contains("fixture panic");
    let log = node.log();
    assert!(
        log.contains("fixture panic"),
        "the guest's panic message is logged: {log}"
    );
    Ok(())
}

#[tokio::test]
async fn stderr_output_never_fails_worker() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}",
        app(&upstream),
        fixture_route("chatty", "/chatty", "stderr", "")
            .replace("mode = \"stderr\"", "mode = \"stderr\"\nlines = 100"),
        fixture_route("last-words", "/last-words", "stderr", "").replace(
            "mode = \"stderr\"",
            "mode = \"stderr\"\nlines = 100\npanic = true"
        ),
    );
    let node = Node::start(&config)?;

    // 10 KB of output is far past what the node keeps of a call's stderr.
    let got = get(&node.url("/chatty")).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(upstream.last().headers["x-stderr-lines"], "100");

    // A panic after that output still has its message in the log.
    let got = get(&node.url("/last-words")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 1);
    node.log_contains("fixture panic after 100 lines");
    let log = node.log();
    assert!(
        log.contains("fixture panic after 100 lines"),
        "the panic message is the end of the guest's stderr: {log}"
    );
    assert!(
        log.contains("earlier bytes not kept"),
        "the log says that earlier output was dropped: {log}"
    );
    // A guest gets no environment, so the standard library's hint to set
    // RUST_BACKTRACE cannot help.
    assert!(!log.contains("RUST_BACKTRACE"), "{log}");
    Ok(())
}

#[tokio::test]
async fn recursing_worker_reports_stack_overflow() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}{}",
        app(&upstream),
        fixture_route("recurse", "/recurse", "recurse", ""),
        fixture_route("small", "/small", "recurse-small", ""),
        fixture_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;

    // Big frames exhaust the guest's stack in its linear memory, small ones
    // the native stack its frames run on. Neither may take the node down.
    for path in ["/recurse", "/small", "/recurse"] {
        let got = get(&node.url(path)).await?;
        assert_eq!(got.status, 500, "{path}");
        assert_eq!(got.json()["error"], "worker_failed", "{path}");
    }
    assert_eq!(upstream.count(), 0);
    assert_eq!(get(&node.url("/after")).await?.status, 200);

    // The log is read from the node's stderr on another thread.
    node.log_contains("fixture_worker::recurse_small");
    let log = node.log();
    assert!(
        log.contains("out of bounds memory access, which is also how a guest's stack overflow"),
        "the big frames' trap is named: {log}"
    );
    assert!(
        log.contains("stack overflow (its call stack is exhausted)"),
        "the small frames' trap is named: {log}"
    );
    assert!(
        log.contains("fixture_worker::recurse <"),
        "the log names the big frames' function: {log}"
    );
    assert!(
        log.contains("fixture_worker::recurse_small"),
        "the log names the small frames' function: {log}"
    );
    Ok(())
}

#[tokio::test]
async fn sleeping_worker_continues() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        fixture_route("sleep", "/sleep", "sleep", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/sleep")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(upstream.count(), 1);
    Ok(())
}

/// Returns a number of rounds of the fixture's `work` mode at `url` that
/// keeps one call busy for at least `duration`.
async fn rounds_lasting(url: &str, duration: Duration) -> Result<u64> {
    let mut rounds = 1u64 << 16;
    loop {
        let started = Instant::now();
        let got = send("GET", url, &[("x-rounds", &rounds.to_string())], b"").await?;
        assert_eq!(got.status, 200, "{:?}", got.body);
        if started.elapsed() >= duration || rounds >= 1 << 40 {
            return Ok(rounds);
        }
        rounds *= 2;
    }
}

#[tokio::test]
async fn sleeping_worker_stops_at_deadline() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}ms = 5000\n",
        app(&upstream),
        fixture_route("sleep", "/", "sleep", "cpu_deadline = \"100ms\"")
    );
    let node = Node::start(&config)?;

    // A sleep counts as running time, and is cut off at the deadline
    // rather than after its 5 s.
    let started = Instant::now();
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "worker_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "the sleep was not cut off: {:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn deadline_counts_only_the_workers_own_running_time() -> Result {
    let upstream = Upstream::echo().await;
    // One serving thread: concurrent calls take turns at every epoch tick,
    // so each one's wall time includes the others' turns.
    let config = format!(
        "[node]\nthreads = 1\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         [runtime]\nmax_instances = 32\ncache_dir = {:?}\n\n{}{}",
        crate::harness::shared_cache_dir().display().to_string(),
        app(&upstream),
        fixture_route("work", "/", "work", "cpu_deadline = \"1s\"")
    );
    let node = Node::start(&config)?;
    let url = node.url("/work");
    let mut rounds = rounds_lasting(&url, Duration::from_millis(40)).await?;

    // Together the calls need more than the deadline, each one less. A
    // machine busy during the calibration makes the calls too short to
    // overlap that long, so they grow until they do.
    for attempt in 0.. {
        assert!(attempt < 6, "32 calls of {rounds} rounds never took 1.2s");
        let calls: Vec<_> = (0..32)
            .map(|_| {
                let url = url.clone();
                tokio::spawn(async move {
                    send("GET", &url, &[("x-rounds", &rounds.to_string())], b"").await
                })
            })
            .collect();
        let started = Instant::now();
        for call in calls {
            let got = call.await??;
            assert_eq!(got.status, 200, "{:?}", got.body);
        }
        if started.elapsed() > Duration::from_millis(1200) {
            break;
        }
        rounds *= 2;
    }
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn deadline_ignores_time_the_node_was_stopped() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        fixture_route("work", "/", "work", "cpu_deadline = \"1s\"")
    );
    let node = Node::start(&config)?;
    let url = node.url("/work");
    let rounds = rounds_lasting(&url, Duration::from_millis(200)).await?;

    // The kernel stops the node for longer than the deadline while the
    // call runs, as a busy machine does for shorter spells: the call used
    // a fifth of its deadline and succeeds.
    let call = tokio::spawn({
        let url = url.clone();
        async move { send("GET", &url, &[("x-rounds", &rounds.to_string())], b"").await }
    });
    tokio::time::sleep(Duration::from_millis(50)).await;
    node.signal("STOP");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    node.signal("CONT");
    let got = call.await??;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn busy_instances_get_503_worker_busy() -> Result {
    let upstream = Upstream::echo().await;
    // One instance slot and two serving threads: while one thread runs a
    // slow worker, a request on the other waits 20ms and is turned away.
    let config = format!(
        "[node]\nthreads = 2\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         [runtime]\nmax_instances = 1\nqueue_timeout = \"20ms\"\ncache_dir = {:?}\n\n{}{}",
        crate::harness::shared_cache_dir().display().to_string(),
        app(&upstream),
        fixture_route("spin", "/", "spin", "cpu_deadline = \"2s\"")
            .replace("mode = \"spin\"", "mode = \"spin\"\nms = 600")
    );
    let node = Node::start(&config)?;
    let first_url = node.url("/first");
    let first = tokio::spawn(async move { get(&first_url).await });
    tokio::time::sleep(Duration::from_millis(150)).await;
    let second = get(&node.url("/second")).await?;
    assert_eq!(second.status, 503);
    assert_eq!(second.json()["error"], "worker_busy");
    assert_eq!(second.header("retry-after"), Some("1"));
    assert_eq!(first.await??.status, 200);
    assert_eq!(upstream.count(), 1);
    Ok(())
}

#[tokio::test]
async fn route_share_keeps_slots_for_other_routes() -> Result {
    let upstream = Upstream::echo().await;
    // Two instance slots, of which the slow route may hold one.
    let config = format!(
        "[node]\nthreads = 2\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         [runtime]\nmax_instances = 2\nqueue_timeout = \"20ms\"\ncache_dir = {:?}\n\n{}{}{}",
        crate::harness::shared_cache_dir().display().to_string(),
        app(&upstream),
        fixture_route("slow", "/slow", "spin", "cpu_deadline = \"2s\"")
            .replace("mode = \"spin\"", "mode = \"spin\"\nms = 600")
            .replace(
                "upstream = \"app\"\n",
                "upstream = \"app\"\nmax_instances = 1\n"
            ),
        fixture_route("fast", "/", "set", "")
    );
    let node = Node::start(&config)?;
    let slow_url = node.url("/slow/first");
    let first = tokio::spawn(async move { get(&slow_url).await });
    tokio::time::sleep(Duration::from_millis(150)).await;

    // The slow route's share is taken, though a pool slot is free.
    let second = get(&node.url("/slow/second")).await?;
    assert_eq!(second.status, 503);
    assert_eq!(second.json()["error"], "worker_busy");
    assert_eq!(second.header("retry-after"), Some("1"));

    // The other route gets the free slot.
    let fast = get(&node.url("/other")).await?;
    assert_eq!(fast.status, 200);
    assert_eq!(first.await??.status, 200);
    assert_eq!(upstream.count(), 2);
    Ok(())
}

#[tokio::test]
async fn response_hook_sees_upstream_status() -> Result {
    let upstream = Upstream::start(|_| Reply::Status(418)).await;
    let config = format!(
        "{}{}response_headers = {{ \"x-after\" = \"yes\" }}\n",
        app(&upstream),
        fixture_route("hook", "/", "response-header", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 418);
    assert_eq!(got.header("x-seen-status"), Some("418"));
    assert_eq!(got.header("x-after"), Some("yes"));
    Ok(())
}

#[tokio::test]
async fn worker_cannot_set_framing_headers() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}response_headers = {{ \"content-length\" = \"3\" }}\n{}set_headers = {{ \"transfer-encoding\" = \"chunked\" }}\n",
        app(&upstream),
        fixture_route("hook", "/hook", "response-header", ""),
        fixture_route("set", "/", "set", "")
    );
    let node = Node::start(&config)?;
    let hooked = get(&node.url("/hook")).await?;
    assert_eq!(hooked.status, 500);
    assert_eq!(hooked.json()["error"], "worker_failed");
    let before = upstream.count();
    let set = get(&node.url("/set")).await?;
    assert_eq!(set.status, 500);
    assert_eq!(set.json()["error"], "worker_failed");
    assert_eq!(
        upstream.count(),
        before,
        "the request with the bad change never went upstream"
    );
    assert!(
        node.log_contains("which the node manages"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn worker_header_cap_fails_cleanly() -> Result {
    let upstream = Upstream::echo().await;
    let table =
        |count: usize| -> String { (0..count).map(|i| format!("x-h{i} = \"v\"\n")).collect() };
    let inline = |count: usize| -> String {
        let pairs: Vec<String> = (0..count).map(|i| format!("\"x-h{i}\" = \"v\"")).collect();
        format!("set_headers = {{ {} }}\n", pairs.join(", "))
    };
    let config = format!(
        "{}{}[routes.workers.config.headers]\n{}\n{}{}",
        app(&upstream),
        fixture_route("over-cap", "/over-cap", "respond", ""),
        table(1001),
        fixture_route("set-over-cap", "/set-over-cap", "set", ""),
        inline(1001),
    );
    let node = Node::start(&config)?;

    // The unit tests check that 1,000 headers pass, which this test's
    // client could not read in a response.
    for path in ["/over-cap", "/set-over-cap"] {
        let got = get(&node.url(path)).await?;
        assert_eq!(got.status, 500, "{path}");
        assert_eq!(got.json()["error"], "worker_failed", "{path}");
    }
    assert_eq!(upstream.count(), 0);
    assert!(
        node.log_contains("set 1001 headers; a worker may set, or remove, at most 1000"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn worker_path_over_cap_fails_cleanly() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}path = \"{}\"\n",
        app(&upstream),
        fixture_route("long", "/", "set", ""),
        "/a".repeat(10_000)
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);
    assert!(
        node.log_contains("set a path of 20000 bytes; the maximum is 16384"),
        "{}",
        node.log()
    );
    drop(node);

    // A path under the cap that percent-encoding triples, with a long
    // client query, is too long for a request target: the worker's fault.
    let config = format!(
        "{}{}path = \"/{}\"\n",
        app(&upstream),
        fixture_route("encoded", "/", "set", ""),
        "é".repeat(8000)
    );
    let node = Node::start(&config)?;
    let query = "q=".to_owned() + &"x".repeat(20_000);
    let got = get(&node.url(&format!("/?{query}"))).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);
    assert!(
        node.log_contains("set a path the upstream request cannot carry"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn own_response_drops_framing_headers() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}body = \"hello\"\n[routes.workers.config.headers]\n\
         content-length = \"999\"\ntransfer-encoding = \"chunked\"\n\
         connection = \"close, x-kept\"\nx-kept = \"1\"\n",
        app(&upstream),
        fixture_route("own", "/", "respond", "")
    );
    let node = Node::start(&config)?;

    // The node frames the worker's body itself and keeps the connection.
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("content-length"), Some("5"));
    assert_eq!(got.header("transfer-encoding"), None);
    assert_eq!(got.header("connection"), None);
    assert_eq!(got.header("x-kept"), Some("1"));
    assert_eq!(&got.body[..], b"hello");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn own_204_has_no_body() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}status = 204\nbody = \"hello\"\n",
        app(&upstream),
        fixture_route("own", "/", "respond", "")
    );
    let node = Node::start(&config)?;
    // HTTP/2 clients fail a stream whose 204 has a body or a length.
    let got = get_h2(&node.url("/")).await?;
    assert_eq!(got.status, 204);
    assert_eq!(got.header("content-length"), None);
    assert!(got.body.is_empty());
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 204);
    assert!(got.body.is_empty());
    Ok(())
}

#[tokio::test]
async fn demo_serves_its_routes() -> Result {
    let modules = crate::harness::modules_dir().display().to_string();
    let node = Node::start_with_args(
        &[
            "demo",
            "--listen",
            "127.0.0.1:0",
            "--http-listen",
            "127.0.0.1:0",
            "--modules",
            &modules,
        ],
        2,
    )?;
    // The HTTPS listener uses the development certificate, whose CA the
    // demo wrote beside it.
    assert!(node.urls[0].starts_with("https://"), "{:?}", node.urls);
    let client = TlsClient::new(
        &node.dir().join(".edge-dev-tls/ca.pem"),
        &[b"h2", b"http/1.1"],
    );
    let https = node.listener_addr(0);
    let users = client.get(https, "localhost", "/api/users/7", &[]).await?;
    assert_eq!(users.alpn.as_deref(), Some(&b"h2"[..]));
    let users = users.got;
    assert_eq!(users.status, 200);
    assert_eq!(users.json()["upstream"], "users");
    assert_eq!(
        users.json()["headers"]["x-edge-demo"],
        "added by the add-header worker"
    );
    assert_eq!(users.json()["headers"]["x-forwarded-proto"], "https");
    let unknown = client
        .get(https, "localhost", "/api/unknown", &[])
        .await?
        .got;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "no_rule");
    let site = client.get(https, "localhost", "/", &[]).await?.got;
    assert_eq!(site.json()["upstream"], "web");
    assert_eq!(site.header("x-powered-by"), Some("edge"));
    assert_eq!(site.json()["headers"]["x-device-class"], "desktop");
    let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) Mobile/15E148";
    let phone = client
        .get(https, "localhost", "/home", &[("user-agent", iphone)])
        .await?
        .got;
    assert_eq!(phone.json()["path"], "/mobile/home");
    assert_eq!(phone.json()["headers"]["x-device-class"], "mobile");

    // Plain HTTP is redirected to the HTTPS listener.
    let http = &node.urls[1];
    let checkout = send(
        "POST",
        &format!("{http}/api/checkout"),
        &[("host", "localhost")],
        b"{}",
    )
    .await?;
    assert_eq!(checkout.status, 308);
    assert_eq!(
        checkout.header("location"),
        Some(format!("https://localhost:{}/api/checkout", https.port()).as_str())
    );
    Ok(())
}

#[tokio::test]
async fn worker_reads_config_and_clock() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}number = 7\nnested = {{ a = [1, 2] }}\n",
        app(&upstream),
        fixture_route("clock", "/clock", "clock", ""),
        fixture_route("config", "/", "config", "")
    );
    let node = Node::start(&config)?;
    let config_seen = get(&node.url("/config")).await?.json();
    assert_eq!(config_seen["mode"], "config");
    assert_eq!(config_seen["number"], 7);
    assert_eq!(config_seen["nested"]["a"][1], 2);
    let clock = get(&node.url("/clock")).await?.json();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as u64;
    let worker_now = clock["now_unix_ms"].as_u64().unwrap();
    assert!(
        worker_now.abs_diff(now) < 5_000,
        "worker clock {worker_now}, host {now}"
    );
    Ok(())
}

#[tokio::test]
async fn compiled_modules_come_from_cache_on_restart() -> Result {
    let upstream = Upstream::echo().await;
    let cache = tempfile::tempdir()?;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[runtime]\ncache_dir = {:?}\n{}{}",
        cache.path().display().to_string(),
        app(&upstream),
        fixture_route("counter", "/", "counter", "")
    );
    let first = Node::start(&config)?;
    assert!(first.log_contains("cache=Compiled"), "{}", first.log());
    drop(first);
    let entries = std::fs::read_dir(cache.path())?.count();
    assert_eq!(entries, 1, "one compiled module in the cache");
    let second = Node::start(&config)?;
    assert!(second.log_contains("cache=Hit"), "{}", second.log());
    assert_eq!(get(&second.url("/")).await?.status, 200);
    Ok(())
}

/// A config with the fixture worker on `/` and add-header on `/added`, with
/// its module cache in `cache`.
fn cached_pair_config(upstream: &Upstream, cache: &std::path::Path) -> String {
    format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[runtime]\ncache_dir = {:?}\n{}\
         [[routes]]\nname = \"added\"\nprefix = \"/added\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/add-header.wasm\"\n\
         [routes.workers.config]\nheaders = {{ \"x-edge\" = \"hello\" }}\n\n{}",
        cache.display().to_string(),
        app(upstream),
        fixture_route("counter", "/", "counter", "")
    )
}

/// Returns the cache entries in `cache`, with the entry of the module whose
/// file is `module` first.
fn cache_entries(cache: &std::path::Path, module: &str) -> Vec<std::path::PathBuf> {
    let bytes = std::fs::read(crate::harness::modules_dir().join(module)).unwrap();
    let hash = edge::worker::content_hash(&bytes);
    let mut entries: Vec<_> = std::fs::read_dir(cache)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .collect();
    entries.sort_by_key(|path| !path.display().to_string().contains(&hash));
    entries
}

#[tokio::test]
async fn damaged_cache_entry_is_compiled_again() -> Result {
    let upstream = Upstream::echo().await;
    let cache = tempfile::tempdir()?;
    let config = cached_pair_config(&upstream, cache.path());
    drop(Node::start(&config)?);
    let entry = cache_entries(cache.path(), "add-header.wasm").remove(0);
    let mut bytes = std::fs::read(&entry)?;
    let middle = bytes.len() / 2;
    for byte in &mut bytes[middle..middle + 64] {
        *byte = !*byte;
    }
    std::fs::write(&entry, bytes)?;

    let node = Node::start(&config)?;
    let log = node.log();
    assert!(log.contains("digest does not match"), "{log}");
    let loaded = log
        .lines()
        .find(|line| line.contains("add-header.wasm hash="))
        .unwrap_or_default();
    assert!(loaded.contains("cache=Compiled"), "{log}");
    let got = get(&node.url("/added")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(upstream.last().headers["x-edge"], "hello");
    drop(node);
    // The entry was written again, and the next start loads it.
    let node = Node::start(&config)?;
    assert!(
        !node.log_contains("digest does not match"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn cache_entry_of_another_module_is_not_run() -> Result {
    let upstream = Upstream::echo().await;
    let cache = tempfile::tempdir()?;
    let config = cached_pair_config(&upstream, cache.path());
    drop(Node::start(&config)?);
    let entries = cache_entries(cache.path(), "add-header.wasm");
    assert_eq!(entries.len(), 2, "{entries:?}");
    // The fixture worker's compiled code under add-header's name.
    std::fs::copy(&entries[1], &entries[0])?;

    let node = Node::start(&config)?;
    let log = node.log();
    assert!(log.contains("belongs to another module"), "{log}");
    let got = get(&node.url("/added")).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(upstream.last().headers["x-edge"], "hello");
    Ok(())
}

#[tokio::test]
async fn cache_entry_that_is_no_file_is_skipped() -> Result {
    let upstream = Upstream::echo().await;
    let cache = tempfile::tempdir()?;
    let config = cached_pair_config(&upstream, cache.path());
    drop(Node::start(&config)?);
    let entry = cache_entries(cache.path(), "add-header.wasm").remove(0);
    std::fs::remove_file(&entry)?;
    // A FIFO blocks a reader until a writer opens it.
    let path = std::ffi::CString::new(entry.display().to_string())?;
    // SAFETY: `path` is a valid C string for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(path.as_ptr(), 0o600) }, 0);

    let node = Node::start(&config)?;
    assert!(node.log_contains("not a regular file"), "{}", node.log());
    assert_eq!(get(&node.url("/added")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn cache_entry_others_could_write_is_not_trusted() -> Result {
    use std::os::unix::fs::PermissionsExt as _;

    let upstream = Upstream::echo().await;
    let parent = tempfile::tempdir()?;
    let cache = parent.path().join("cache");
    let config = cached_pair_config(&upstream, &cache);
    drop(Node::start(&config)?);
    let entry = cache_entries(&cache, "add-header.wasm").remove(0);
    std::fs::set_permissions(&entry, std::fs::Permissions::from_mode(0o666))?;

    let node = Node::start(&config)?;
    assert!(
        node.log_contains("other users can write to it"),
        "{}",
        node.log()
    );
    assert_eq!(get(&node.url("/added")).await?.status, 200);
    drop(node);
    // Compiled again and written back, private.
    let mode = std::fs::metadata(&entry)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "mode {mode:o}");

    // A huge file in an entry's place is not read whole.
    let file = std::fs::File::create(&entry)?;
    file.set_len(1 << 30)?;
    let node = Node::start(&config)?;
    assert!(
        node.log_contains("far more than its module"),
        "{}",
        node.log()
    );
    assert_eq!(get(&node.url("/added")).await?.status, 200);
    drop(node);

    // A cache folder that others can write gets a warning at start.
    std::fs::set_permissions(&cache, std::fs::Permissions::from_mode(0o777))?;
    let node = Node::start(&config)?;
    assert!(
        node.log_contains("another user can replace the module cache's entries"),
        "{}",
        node.log()
    );
    Ok(())
}

/// Writes a cache entry for a module no node loads (its hash is `fill`
/// repeated), of another engine key, last used `age` ago.
fn foreign_cache_entry(cache: &std::path::Path, fill: &str, age: Duration) -> std::path::PathBuf {
    let path = cache.join(format!("{}-0123456789abcdef.cwasm", fill.repeat(32)));
    std::fs::write(&path, vec![0; 4096]).unwrap();
    let file = std::fs::File::options().write(true).open(&path).unwrap();
    file.set_modified(std::time::SystemTime::now() - age)
        .unwrap();
    path
}

#[tokio::test]
async fn cache_prune_keeps_own_entries() -> Result {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir()?;
    let cache = dir.path().join("cache");
    let config = cached_pair_config(&upstream, &cache);
    drop(Node::start(&config)?);
    let own = cache_entries(&cache, "add-header.wasm");
    assert_eq!(own.len(), 2, "{own:?}");
    let two_hours = Duration::from_secs(7200);
    let old_own = std::fs::File::options().write(true).open(&own[0])?;
    old_own.set_modified(std::time::SystemTime::now() - two_hours)?;
    let stale = foreign_cache_entry(&cache, "ab", two_hours);
    let recent = foreign_cache_entry(&cache, "cd", Duration::ZERO);
    let other = cache.join("README");
    std::fs::write(&other, "not an entry")?;

    // `edge check` reads the cache and changes nothing.
    let checked = edge(&["check", &write_config(dir.path(), &config)]);
    assert!(checked.status.success(), "{checked:?}");
    assert!(stale.exists());

    let with_age = config.replace("[runtime]\n", "[runtime]\ncache_max_age = \"1h\"\n");
    // A node that cannot listen does not serve, and prunes nothing.
    let taken = std::net::TcpListener::bind("127.0.0.1:0")?;
    let busy = with_age.replace("127.0.0.1:0", &taken.local_addr()?.to_string());
    let failed = edge(&["serve", "--config", &write_config(dir.path(), &busy)]);
    let stderr = String::from_utf8_lossy(&failed.stderr);
    assert!(stderr.contains("cannot listen"), "{stderr}");
    assert!(
        stale.exists(),
        "a node that failed to start pruned the cache"
    );

    let node = Node::start(&with_age)?;
    assert!(
        node.log_contains("pruned the module cache"),
        "{}",
        node.log()
    );
    assert!(
        !stale.exists(),
        "an entry unused for longer than the age goes"
    );
    assert!(recent.exists(), "a recently used entry stays");
    assert!(
        own.iter().all(|entry| entry.exists()),
        "the node's own entries stay"
    );
    assert!(other.exists(), "files that are not entries stay");
    let used = std::fs::metadata(&own[0])?.modified()?;
    assert!(
        used.elapsed()? < two_hours,
        "a loaded entry counts as used now"
    );
    assert_eq!(get(&node.url("/added")).await?.status, 200);
    drop(node);

    // A size the node's own entries alone exceed: everything else goes,
    // they stay, and the log warns about the size.
    let tiny = config.replace("[runtime]\n", "[runtime]\ncache_max_size = \"1KiB\"\n");
    let node = Node::start(&tiny)?;
    assert!(
        !recent.exists(),
        "the least recently used go to fit the size"
    );
    assert!(own.iter().all(|entry| entry.exists()));
    assert!(node.log_contains("raise it"), "{}", node.log());
    assert_eq!(get(&node.url("/added")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn cache_is_private_to_the_node_user() -> Result {
    use std::os::unix::fs::PermissionsExt as _;

    let upstream = Upstream::echo().await;
    let parent = tempfile::tempdir()?;
    let cache = parent.path().join("cache");
    drop(Node::start(&cached_pair_config(&upstream, &cache))?);
    let mode = std::fs::metadata(&cache)?.permissions().mode();
    assert_eq!(mode & 0o777, 0o700, "folder mode {mode:o}");
    for entry in cache_entries(&cache, "add-header.wasm") {
        let mode = std::fs::metadata(&entry)?.permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "{} mode {mode:o}", entry.display());
    }
    Ok(())
}

#[tokio::test]
async fn sighup_while_starting_does_not_stop_the_node() -> Result {
    use std::io::BufRead as _;

    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir()?;
    // A cold cache, so the node compiles both modules before it listens.
    let config = cached_pair_config(&upstream, &dir.path().join("cache")).replace(
        "{modules}",
        &crate::harness::modules_dir().display().to_string(),
    );
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, config)?;
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["serve", "--config", &path.display().to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()?;
    std::thread::sleep(Duration::from_millis(200));
    // logrotate may send SIGHUP at any time, also while a node starts.
    let pid = child.id().to_string();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid])
        .status()?
        .success());
    let stdout = std::io::BufReader::new(child.stdout.take().expect("piped stdout"));
    let listening = stdout
        .lines()
        .map_while(std::result::Result::ok)
        .any(|line| line.starts_with("listening on "));
    let _ = std::process::Command::new("kill").arg(&pid).status();
    let status = child.wait()?;
    assert!(listening, "the node ended before listening: {status}");
    Ok(())
}

#[tokio::test]
async fn route_without_upstream_logs_why() -> Result {
    let upstream = Upstream::echo().await;
    // The worker lets the request through, and the route names no upstream.
    let route = fixture_route("nowhere", "/", "log-many", "")
        .replace("upstream = \"app\"\n", "")
        .replace("mode = \"log-many\"", "mode = \"log-many\"\nlines = 1");
    let node = Node::start(&format!("{}{route}", app(&upstream)))?;

    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "no_upstream");
    assert_eq!(upstream.count(), 0);

    assert!(node.log_contains("no_upstream"), "{}", node.log());
    let log = node.log();
    assert!(log.contains("route=nowhere"), "{log}");
    assert!(log.contains("set the route's upstream"), "{log}");
    Ok(())
}

/// A route with the fixture worker built for wasm32-unknown-unknown, which
/// imports no WASI.
fn no_wasi_route(name: &str, prefix: &str, mode: &str, extra: &str) -> String {
    fixture_route(name, prefix, mode, extra)
        .replace("fixture-worker.wasm", "fixture-worker-no-wasi.wasm")
}

#[tokio::test]
async fn no_wasi_worker_logs_its_panic() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}{}",
        app(&upstream),
        no_wasi_route("panic", "/panic", "panic", ""),
        no_wasi_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/panic")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);
    assert_eq!(get(&node.url("/after")).await?.status, 200);
    node.log_contains("fixture panic");
    let log = node.log();
    assert!(log.contains("worker panicked"), "{log}");
    assert!(log.contains("fixture panic"), "{log}");
    assert!(log.contains("fixture-worker-no-wasi.wasm"), "{log}");
    Ok(())
}

#[tokio::test]
async fn no_wasi_panic_survives_log_cap() -> Result {
    let upstream = Upstream::echo().await;
    // 100 log lines, past the cap of 64 a call, then a panic.
    let route = no_wasi_route(
        "leak",
        "/",
        "secret-leak",
        "[routes.workers.secrets]\nsigning = \"value-of-the-secret\"",
    )
    .replace(
        "mode = \"secret-leak\"",
        "mode = \"secret-leak\"\nname = \"signing\"",
    );
    let node = Node::start(&format!("{}{route}", app(&upstream)))?;

    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");

    assert!(node.log_contains("worker call failed"), "{}", node.log());
    let log = node.log();
    let failed = log
        .lines()
        .find(|line| line.contains("worker call failed"))
        .unwrap_or_default();
    assert!(
        failed.contains("last error line, over the log cap: worker panicked"),
        "{log}"
    );
    assert!(
        failed.contains("giving up with the secret [secret signing]"),
        "{log}"
    );
    assert!(!log.contains("value-of-the-secret"), "{log}");
    Ok(())
}

#[tokio::test]
async fn no_wasi_worker_state_never_survives() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        no_wasi_route("counter", "/", "counter", "")
    );
    let node = Node::start(&config)?;
    for _ in 0..3 {
        let got = get(&node.url("/count")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(&got.body[..], b"1");
    }
    Ok(())
}

#[tokio::test]
async fn no_wasi_worker_grows_memory_to_its_cap() -> Result {
    let upstream = Upstream::echo().await;
    // 4 MiB is more than the free pages of the 2 MiB initial memory, so the
    // SDK's allocator must grow the memory.
    let config = format!(
        "{}{}{}",
        app(&upstream),
        no_wasi_route("grow", "/grow", "alloc", "max_memory = \"16MiB\"")
            .replace("mode = \"alloc\"", "mode = \"alloc\"\nbytes = 4194304"),
        no_wasi_route("over", "/over", "alloc", "max_memory = \"8MiB\"")
    );
    let node = Node::start(&config)?;
    let grown = get(&node.url("/grow")).await?;
    assert_eq!(grown.status, 200);
    let over = get(&node.url("/over")).await?;
    assert_eq!(over.status, 500);
    assert_eq!(over.json()["error"], "worker_failed");
    assert!(node.log_contains("memory cap"), "{}", node.log());
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn worker_log_lines_are_throttled() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!("{}{}", app(&upstream), fixture_route("log", "/", "log", ""));
    let node = Node::start(&config)?;

    // Each call writes five lines, three of them at a level the node prints.
    let calls = 200;
    let started = Instant::now();
    for _ in 0..calls {
        assert_eq!(get(&node.url("/log")).await?.status, 200);
    }
    let seconds = started.elapsed().as_secs() + 1;

    // A later second admits lines again and reports the suppressed ones.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&node.url("/log")).await?.status, 200);
    assert!(
        node.log_contains("worker log lines suppressed"),
        "{}",
        node.log()
    );

    let log = node.log();
    let printed = log
        .lines()
        .filter(|line| line.contains("fixture log"))
        .count();
    // The budget is 100 lines in each second of the clock: the calls touch
    // at most `seconds + 1` of them, and the last call one more, with its
    // three printed lines.
    assert!(
        printed as u64 <= 100 * (seconds + 1) + 3,
        "{printed} lines printed in about {seconds} s"
    );
    assert!(printed < 3 * calls, "{printed} lines printed");
    assert_eq!(upstream.count(), calls + 1);
    Ok(())
}

#[tokio::test]
async fn lines_past_call_cap_dropped() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        fixture_route("log", "/", "log-many", "")
            .replace("mode = \"log-many\"", "mode = \"log-many\"\nlines = 200")
    );
    let node = Node::start(&config)?;

    assert_eq!(get(&node.url("/one")).await?.status, 200);
    let warning = "the worker wrote 200 log lines in one call; \
                   the 136 past the cap of 64 a call were dropped";
    node.log_contains(warning);
    let log = node.log();
    let printed = log
        .lines()
        .filter(|line| line.contains("fixture line"))
        .count();
    assert_eq!(printed, 64, "{log}");
    assert!(log.contains("fixture line 63"), "{log}");
    assert!(!log.contains("fixture line 64"), "{log}");
    assert_eq!(log.matches(warning).count(), 1, "{log}");

    // The warning shares the binding's 100 lines a second with the guest's
    // own lines, so a burst of calls cannot flood the node's log with it.
    let calls = 50;
    let started = Instant::now();
    for _ in 0..calls {
        assert_eq!(get(&node.url("/burst")).await?.status, 200);
    }
    let seconds = started.elapsed().as_secs() + 1;
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&node.url("/last")).await?.status, 200);
    node.log_contains("worker log lines suppressed");
    let log = node.log();
    let warnings = log.matches(warning).count() as u64;
    let lines = log
        .lines()
        .filter(|line| line.contains("fixture line"))
        .count() as u64;
    // Each second of the burst admits at most 100 lines, warnings included.
    // The first call and the last run in seconds of their own and add 65
    // lines each.
    assert!(
        lines + warnings <= 100 * (seconds + 1) + 2 * 65,
        "{lines} lines and {warnings} warnings in about {seconds} s"
    );
    assert!(warnings < calls, "{warnings} warnings for {calls} calls");
    assert_eq!(upstream.count(), calls as usize + 2);
    Ok(())
}

#[tokio::test]
async fn filtered_log_lines_use_no_budget() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!("{}{}", app(&upstream), fixture_route("log", "/", "log", ""));
    let node = Node::start(&config)?;

    // Each call writes five lines, of which the node prints the three at
    // info and above. 30 calls print 90 lines, under the 100 a second, as
    // long as the trace and debug lines count for nothing.
    for _ in 0..30 {
        assert_eq!(get(&node.url("/log")).await?.status, 200);
    }
    // The log is read from the node's stderr on another thread.
    let printed = |log: &str| {
        log.lines()
            .filter(|line| line.contains("fixture log"))
            .count()
    };
    for _ in 0..100 {
        if printed(&node.log()) >= 90 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = node.log();
    assert_eq!(printed(&log), 90, "{log}");
    assert!(!log.contains("worker log lines suppressed"), "{log}");
    Ok(())
}

#[tokio::test]
async fn module_over_memory_cap_fails_to_load() -> Result {
    let upstream = Upstream::echo().await;
    // A worker built without WASI starts with 2 MiB of memory.
    let config = format!(
        "{}{}",
        app(&upstream),
        no_wasi_route("small", "/", "counter", "max_memory = \"1MiB\"")
    );
    let error = match Node::start(&config) {
        Ok(_) => panic!("the node started with a module over its memory cap"),
        Err(error) => error.to_string(),
    };
    assert!(error.contains("initial memory of 2097152 bytes"), "{error}");
    assert!(error.contains("max_memory of 1048576 bytes"), "{error}");
    assert!(error.contains("raise max_memory"), "{error}");
    Ok(())
}
