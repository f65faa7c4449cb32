//! Circuit breakers, timeouts, retries, load balancing, health checks and
//! the admin listener, against real upstreams that tests make fail, stall
//! and recover.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::harness::{edge, get, send, Got, Node, Reply, Result, Upstream};

const TOKEN: &str = "test-admin-token-0123456789";

/// An upstream that fails with `status` while `failing` is set and echoes
/// otherwise; `/healthz` follows the same switch.
async fn switchable(failing: Arc<AtomicBool>, failure: fn() -> Reply) -> Upstream {
    Upstream::start(move |_| {
        if failing.load(Ordering::SeqCst) {
            failure()
        } else {
            Reply::Echo
        }
    })
    .await
}

/// An upstream that names itself in `x-target` and counts the requests
/// other than health checks.
async fn named(name: &'static str, served: Arc<AtomicUsize>, down: Arc<AtomicBool>) -> Upstream {
    Upstream::start(move |received| {
        let is_check = received.target == "/healthz";
        if down.load(Ordering::SeqCst) {
            return Reply::Status(503);
        }
        if !is_check {
            served.fetch_add(1, Ordering::SeqCst);
        }
        Reply::Headers(vec![("x-target", name)])
    })
    .await
}

/// An address where nothing listens.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

fn admin_block() -> String {
    format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n")
}

async fn admin_get(node: &Node, path: &str) -> Result<Got> {
    let url = format!("{}{path}", node.admin_url.as_ref().expect("admin listener"));
    send(
        "GET",
        &url,
        &[("authorization", &format!("Bearer {TOKEN}"))],
        b"",
    )
    .await
}

/// The admin view of the first upstream's target `index` at `path`.
async fn admin_target(node: &Node, path: &str, index: usize) -> Result<serde_json::Value> {
    let got = admin_get(node, path).await?;
    assert_eq!(got.status, 200);
    Ok(got.json()["upstreams"][0]["targets"][index].clone())
}

/// Polls `check` every 50 ms for up to 5 s.
async fn eventually<F, Fut>(what: &str, mut check: F) -> Result
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<bool>>,
{
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        if check().await? {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Err(format!("timed out waiting until {what}").into())
}

#[tokio::test]
async fn breaker_opens_on_500s_and_a_probe_closes_it() -> Result {
    let failing = Arc::new(AtomicBool::new(true));
    let upstream = switchable(failing.clone(), || Reply::Status(500)).await;
    let config = format!(
        "{}[upstreams.pay]\ntargets = [\"{}\"]\nfailure_statuses = [500]\n\
         [upstreams.pay.breaker]\nconsecutive_failures = 3\ncool_down = \"1s\"\n\
         [upstreams.pay.retry]\nmax_retries = 0\n\n\
         [[routes]]\nname = \"pay\"\nupstream = \"pay\"\n",
        admin_block(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..3 {
        assert_eq!(get(&node.url("/charge")).await?.status, 500);
    }
    assert_eq!(upstream.count(), 3);

    let refused = get(&node.url("/charge")).await?;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "circuit_open");
    assert_eq!(refused.header("retry-after"), Some("1"));
    assert_eq!(
        upstream.count(),
        3,
        "an open breaker sends nothing upstream"
    );
    let breaker = admin_target(&node, "/breakers", 0).await?;
    assert_eq!(breaker["state"], "open");
    assert_eq!(breaker["opened_total"], 1);
    assert!(node.log_contains("circuit breaker open"));

    failing.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&node.url("/charge")).await?.status, 200, "the probe");
    assert_eq!(upstream.count(), 4);
    assert_eq!(
        admin_target(&node, "/breakers", 0).await?["state"],
        "closed"
    );
    assert_eq!(get(&node.url("/charge")).await?.status, 200);
    assert!(node.log_contains("circuit breaker half_open"));
    assert!(node.log_contains("circuit breaker closed"));
    Ok(())
}

#[tokio::test]
async fn hanging_probe_times_out_and_reopens_the_breaker() -> Result {
    let upstream = Upstream::start(|_| Reply::Delay(Duration::from_secs(5))).await;
    let config = format!(
        "{}[upstreams.slow]\ntargets = [\"{}\"]\nresponse_timeout = \"300ms\"\n\
         [upstreams.slow.breaker]\nconsecutive_failures = 2\ncool_down = \"500ms\"\n\
         [upstreams.slow.retry]\nmax_retries = 0\n\n\
         [[routes]]\nname = \"slow\"\nupstream = \"slow\"\n",
        admin_block(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..2 {
        assert_eq!(
            get(&node.url("/")).await?.json()["error"],
            "upstream_timeout"
        );
    }
    assert_eq!(get(&node.url("/")).await?.json()["error"], "circuit_open");
    tokio::time::sleep(Duration::from_millis(600)).await;

    let probe = get(&node.url("/")).await?;
    assert_eq!(probe.status, 504, "the hanging probe ends at its timeout");
    assert_eq!(upstream.count(), 3);
    let reopened = get(&node.url("/")).await?;
    assert_eq!(reopened.json()["error"], "circuit_open");
    let breaker = admin_target(&node, "/breakers", 0).await?;
    assert_eq!(breaker["state"], "open");
    assert_eq!(breaker["cool_down_ms"], 1000, "the cool-down doubled");
    Ok(())
}

#[tokio::test]
async fn get_is_retried_on_another_target_but_a_sent_post_is_not() -> Result {
    let failing = Upstream::start(|_| Reply::Status(503)).await;
    let healthy = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\", \"{}\"]\n\
         [upstreams.app.breaker]\nenabled = false\n\
         [upstreams.app.retry]\nbackoff = \"1ms\"\nmax_backoff = \"2ms\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        failing.addr, healthy.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..4 {
        assert_eq!(get(&node.url("/read")).await?.status, 200);
    }
    assert!(
        failing.count() >= 1,
        "some GETs reached the failing target first"
    );
    assert_eq!(healthy.count(), 4);

    let failing_before = failing.count();
    let mut rejected = 0;
    for _ in 0..4 {
        let got = send("POST", &node.url("/write"), &[], b"payload").await?;
        rejected += usize::from(got.status == 503);
    }
    assert!(
        rejected >= 1,
        "round robin sent some POSTs to the failing target"
    );
    assert_eq!(failing.count() - failing_before, rejected);
    assert_eq!(healthy.count(), 4 + 4 - rejected, "no POST was sent twice");
    Ok(())
}

#[tokio::test]
async fn request_that_never_left_is_retried_with_its_full_body() -> Result {
    let healthy = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\", \"{}\"]\n\
         [upstreams.app.breaker]\nenabled = false\n\
         [upstreams.app.retry]\nbackoff = \"1ms\"\nmax_backoff = \"2ms\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        closed_port(),
        healthy.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..4 {
        let got = send("POST", &node.url("/write"), &[], b"0123456789").await?;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.json()["body_len"],
            10,
            "the retried POST carries its body"
        );
    }
    assert_eq!(healthy.count(), 4);
    Ok(())
}

#[tokio::test]
async fn retries_stay_within_the_budget_when_every_target_fails() -> Result {
    let (first, second) = (
        Upstream::start(|_| Reply::Status(503)).await,
        Upstream::start(|_| Reply::Status(503)).await,
    );
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\", \"{}\"]\n\
         [upstreams.app.breaker]\nenabled = false\n\
         [upstreams.app.retry]\nmax_retries = 3\nbackoff = \"1ms\"\nmax_backoff = \"1ms\"\n\
         budget_percent = 20\nmin_retries_per_second = 0\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        first.addr, second.addr
    );
    let node = Node::start(&config)?;
    let requests = 50;
    for _ in 0..requests {
        assert_eq!(get(&node.url("/")).await?.status, 503);
    }
    let attempts = first.count() + second.count();
    assert!(attempts > requests, "some requests were retried");
    assert!(
        attempts <= requests + requests / 5,
        "{attempts} attempts for {requests} requests exceed the 20 % budget"
    );
    Ok(())
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() -> Result {
    let served: Vec<_> = (0..3).map(|_| Arc::new(AtomicUsize::new(0))).collect();
    let up = Arc::new(AtomicBool::new(false));
    let targets = [
        named("a", served[0].clone(), up.clone()).await,
        named("b", served[1].clone(), up.clone()).await,
        named("c", served[2].clone(), up.clone()).await,
    ];
    let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", t.addr)).collect();
    let config = format!(
        "[upstreams.app]\ntargets = [{}]\n\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        list.join(", ")
    );
    let node = Node::start(&config)?;
    for _ in 0..30 {
        assert_eq!(get(&node.url("/")).await?.status, 200);
    }
    for count in &served {
        assert_eq!(count.load(Ordering::SeqCst), 10);
    }
    Ok(())
}

#[tokio::test]
async fn least_outstanding_avoids_a_slow_target() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_millis(400))).await;
    let fast = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\", \"{}\"]\nbalance = \"least_outstanding\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        slow.addr, fast.addr
    );
    let node = Node::start(&config)?;
    let mut tasks = Vec::new();
    for _ in 0..30 {
        let url = node.url("/");
        tasks.push(tokio::spawn(async move {
            get(&url).await.map(|got| got.status)
        }));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    for task in tasks {
        assert_eq!(task.await.unwrap()?, 200);
    }
    // Round robin would send 15 to each; the slow target has a request in
    // flight most of the time, so the fast one wins the comparisons.
    assert!(
        slow.count() <= 8,
        "the slow target got {} of 30",
        slow.count()
    );
    assert_eq!(slow.count() + fast.count(), 30);
    Ok(())
}

#[tokio::test]
async fn full_target_queues_then_gets_503() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_millis(500))).await;
    let config = |queue_timeout: &str| {
        format!(
            "{}[upstreams.app]\ntargets = [\"{}\"]\nmax_requests_per_target = 2\n\
             queue_timeout = \"{queue_timeout}\"\n\n\
             [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
            admin_block(),
            slow.addr
        )
    };
    let send_five = |url: String| async move {
        let mut tasks = Vec::new();
        for _ in 0..5 {
            let url = url.clone();
            tasks.push(tokio::spawn(async move { get(&url).await }));
        }
        let mut responses = Vec::new();
        for task in tasks {
            responses.push(task.await.unwrap()?);
        }
        Result::<Vec<Got>>::Ok(responses)
    };

    // Two requests hold the two slots for 500 ms; the other three wait
    // 100 ms for one, then get 503 without reaching the upstream.
    let node = Node::start(&config("100ms"))?;
    let responses = send_five(node.url("/")).await?;
    let served = responses.iter().filter(|got| got.status == 200).count();
    assert_eq!(served, 2);
    for busy in responses.iter().filter(|got| got.status != 200) {
        assert_eq!(busy.status, 503);
        assert_eq!(busy.json()["error"], "upstream_busy");
        assert_eq!(busy.headers["retry-after"], "1");
    }
    assert_eq!(slow.count(), 2, "a refused request reached the upstream");
    assert!(
        node.log_contains("no target took the request while it waited"),
        "{}",
        node.log()
    );
    drop(node);

    // With a longer queue every request is served, two at a time: the
    // last pair starts after two rounds of 500 ms.
    let node = Node::start(&config("5s"))?;
    let started = Instant::now();
    let sending = tokio::spawn(send_five(node.url("/")));
    // The admin view counts the two in flight, though the upstream balances
    // round robin, which counts nothing of its own.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let target = admin_target(&node, "/health", 0).await?;
    assert_eq!(target["outstanding"], 2);
    assert_eq!(target["max_requests"], 2);
    let responses = sending.await.unwrap()?;
    assert!(responses.iter().all(|got| got.status == 200));
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "five requests through two slots took {:?}",
        started.elapsed()
    );
    assert_eq!(slow.count(), 2 + 5);
    Ok(())
}

/// Returns a config with one route to the upstream `app` over `targets`,
/// one request slot per target, and the upstream's `settings` lines.
fn one_slot_each(targets: &[&Upstream], settings: &str) -> String {
    let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", t.addr)).collect();
    format!(
        "[upstreams.app]\ntargets = [{}]\nmax_requests_per_target = 1\n{settings}\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        list.join(", ")
    )
}

/// Sends `count` GET requests to `url` at once.
fn get_at_once(url: &str, count: usize) -> Vec<tokio::task::JoinHandle<Result<Got>>> {
    (0..count)
        .map(|_| {
            let url = url.to_owned();
            tokio::spawn(async move { get(&url).await })
        })
        .collect()
}

#[tokio::test]
async fn full_target_spills_to_a_free_one() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let fast = Upstream::echo().await;
    let config = one_slot_each(&[&slow, &fast], "queue_timeout = \"50ms\"\n");
    let node = Node::start(&config)?;

    // Two requests at once take one slot each, so one request is in flight
    // at the slow target.
    let url = node.url("/");
    let in_flight = get_at_once(&url, 2);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(slow.count(), 1);

    // Round robin sends every other request to the full slow target. Each
    // of those goes to the fast one instead of waiting 50 ms for the slot
    // and getting 503.
    for _ in 0..6 {
        let got = get(&url).await?;
        assert_eq!(got.status, 200, "{:?}", got.body);
    }
    assert_eq!(slow.count(), 1);
    assert_eq!(fast.count(), 1 + 6);
    for request in in_flight {
        assert_eq!(request.await.unwrap()?.status, 200);
    }
    Ok(())
}

#[tokio::test]
async fn queued_request_takes_first_free_slot() -> Result {
    let slow = Upstream::start(|_| {
        Reply::Delayed(
            Duration::from_secs(3),
            Box::new(Reply::Headers(vec![("x-target", "slow")])),
        )
    })
    .await;
    let quick = Upstream::start(|_| {
        Reply::Delayed(
            Duration::from_millis(500),
            Box::new(Reply::Headers(vec![("x-target", "quick")])),
        )
    })
    .await;
    let config = one_slot_each(&[&slow, &quick], "queue_timeout = \"5s\"\n");
    let node = Node::start(&config)?;
    let url = node.url("/");
    let in_flight = get_at_once(&url, 2);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(slow.count(), 1);
    assert_eq!(quick.count(), 1);

    // Round robin chooses the slow target for the third request, and both
    // are full. The quick target's slot comes free first and serves it.
    let got = get(&url).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.header("x-target"), Some("quick"));
    assert_eq!(slow.count(), 1);
    for request in in_flight {
        assert_eq!(request.await.unwrap()?.status, 200);
    }
    Ok(())
}

#[tokio::test]
async fn queue_wait_leaves_response_timeout_whole() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_millis(1500))).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\nmax_requests_per_target = 1\n\
         queue_timeout = \"5s\"\nresponse_timeout = \"2s\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        slow.addr
    );
    let node = Node::start(&config)?;
    let url = node.url("/");
    let first = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;

    // The second request waits 1.4 s for the slot, then the upstream takes
    // 1.5 s, within its 2 s response timeout.
    let second = get(&url).await?;
    assert_eq!(second.status, 200, "{:?}", second.body);
    assert_eq!(first.await.unwrap()?.status, 200);
    assert_eq!(slow.count(), 2);
    Ok(())
}

/// Returns the `error` code of a response the node made, or "" for an
/// upstream's response.
fn node_error(got: &Got) -> String {
    serde_json::from_slice::<serde_json::Value>(&got.body)
        .ok()
        .and_then(|body| body["error"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

#[tokio::test]
async fn queued_request_skips_target_whose_breaker_opened() -> Result {
    let failing = |_: &_| Reply::Delayed(Duration::from_millis(300), Box::new(Reply::Status(503)));
    let first = Upstream::start(failing).await;
    let second = Upstream::start(failing).await;
    let config = one_slot_each(
        &[&first, &second],
        "queue_timeout = \"5s\"\n\
         [upstreams.app.breaker]\nconsecutive_failures = 1\ncool_down = \"30s\"\n\
         [upstreams.app.retry]\nmax_retries = 0\n",
    );
    let node = Node::start(&config)?;
    let url = node.url("/");

    // Two requests hold both slots, and four more queue behind them. The
    // two fail and open both breakers as their slots come free.
    let requests: Vec<_> = (0..6)
        .map(|index| {
            let url = url.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(if index < 2 { 0 } else { 100 })).await;
                get(&url).await
            })
        })
        .collect();
    let mut statuses = Vec::new();
    let mut errors = Vec::new();
    for request in requests {
        let got = request.await.unwrap()?;
        statuses.push(got.status);
        errors.push(node_error(&got));
        // The wait of about 200 ms for a slot is upstream time, which
        // `X-Request-Duration` leaves out.
        if node_error(&got) == "circuit_open" {
            let duration = got.header("x-request-duration").unwrap_or_default();
            let ms: f64 = duration.trim_end_matches("ms").parse()?;
            assert!(ms < 150.0, "x-request-duration: {duration}");
        }
    }
    assert_eq!(statuses, [503; 6]);
    assert_eq!(
        first.count() + second.count(),
        2,
        "a queued request reached an open target"
    );
    assert_eq!(
        errors.iter().filter(|e| *e == "circuit_open").count(),
        4,
        "{errors:?}"
    );
    Ok(())
}

#[tokio::test]
async fn retry_never_waits_for_a_slot() -> Result {
    let busy = Upstream::start(|_| Reply::Delay(Duration::from_secs(2))).await;
    let failing = Upstream::start(|_| Reply::Status(503)).await;
    let config = one_slot_each(
        &[&busy, &failing],
        "queue_timeout = \"1s\"\n[upstreams.app.retry]\nmax_retries = 3\n",
    );
    let node = Node::start(&config)?;
    let url = node.url("/");
    let holding = tokio::spawn({
        let url = url.clone();
        async move { get(&url).await }
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(busy.count(), 1);

    // The failing target responds 503. Its retry could only wait for the
    // busy target's slot, so the client gets the upstream's own 503.
    let got = get(&url).await?;
    assert_eq!(got.status, 503);
    assert_eq!(node_error(&got), "", "{:?}", got.body);
    assert_eq!(busy.count(), 1);
    assert_eq!(holding.await.unwrap()?.status, 200);
    Ok(())
}

#[tokio::test]
async fn consistent_hash_moves_only_the_removed_targets_keys() -> Result {
    let names = ["a", "b", "c", "d"];
    let up = Arc::new(AtomicBool::new(false));
    let mut targets = Vec::new();
    for name in names {
        targets.push(named(name, Arc::new(AtomicUsize::new(0)), up.clone()).await);
    }
    let config_for = |targets: &[&Upstream]| {
        let list: Vec<String> = targets.iter().map(|t| format!("\"{}\"", t.addr)).collect();
        format!(
            "[upstreams.app]\ntargets = [{}]\nbalance = \"consistent_hash\"\n\
             hash_key = \"header:x-user-id\"\n\n\
             [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
            list.join(", ")
        )
    };
    let owners = |node: Node| async move {
        let mut owners = Vec::new();
        for user in 0..100 {
            let id = format!("user-{user}");
            let got = send("GET", &node.url("/"), &[("x-user-id", &id)], b"").await?;
            owners.push(got.header("x-target").unwrap_or("?").to_owned());
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(owners)
    };
    let all: Vec<&Upstream> = targets.iter().collect();
    let before = owners(Node::start(&config_for(&all))?).await?;
    let again = owners(Node::start(&config_for(&all))?).await?;
    assert_eq!(before, again, "the same key goes to the same target");
    for name in names {
        let share = before.iter().filter(|owner| *owner == name).count();
        assert!(
            (10..=45).contains(&share),
            "target {name} owns {share} of 100 keys"
        );
    }

    let without_c: Vec<&Upstream> = [0, 1, 3].iter().map(|&i| &targets[i]).collect();
    let after = owners(Node::start(&config_for(&without_c))?).await?;
    for (user, (old, new)) in before.iter().zip(&after).enumerate() {
        if old != "c" {
            assert_eq!(old, new, "user-{user} moved although its target stayed");
        } else {
            assert_ne!(new, "c");
        }
    }
    Ok(())
}

#[tokio::test]
async fn active_checks_remove_and_restore_targets() -> Result {
    let (served_a, served_b) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (down_a, down_b) = (
        Arc::new(AtomicBool::new(false)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = named("a", served_a.clone(), down_a.clone()).await;
    let b = named("b", served_b.clone(), down_b.clone()).await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\", \"{}\"]\n\
         [upstreams.app.health.active]\npath = \"/healthz\"\ninterval = \"100ms\"\n\
         healthy_threshold = 2\nunhealthy_threshold = 2\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        admin_block(),
        a.addr,
        b.addr
    );
    let node = Node::start(&config)?;
    // An idle pool, with no connection opened yet, serves its first request.
    assert_eq!(get(&node.url("/")).await?.status, 200);

    down_a.store(true, Ordering::SeqCst);
    eventually("target a is unhealthy", || async {
        Ok(admin_target(&node, "/health", 0).await?["active"] == "unhealthy")
    })
    .await?;
    let before = served_a.load(Ordering::SeqCst);
    for _ in 0..6 {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.header("x-target"), Some("b"));
    }
    assert_eq!(served_a.load(Ordering::SeqCst), before);

    down_b.store(true, Ordering::SeqCst);
    eventually("target b is unhealthy", || async {
        Ok(admin_target(&node, "/health", 1).await?["active"] == "unhealthy")
    })
    .await?;
    let served_b_before = served_b.load(Ordering::SeqCst);
    let refused = get(&node.url("/")).await?;
    assert_eq!(refused.status, 503);
    assert_eq!(refused.json()["error"], "no_healthy_upstream");
    assert!(refused.header("retry-after").is_some());
    assert_eq!(served_b.load(Ordering::SeqCst), served_b_before);

    down_a.store(false, Ordering::SeqCst);
    eventually("target a is healthy again", || async {
        Ok(get(&node.url("/")).await?.status == 200)
    })
    .await?;
    assert!(node.log_contains("target marked unhealthy"));
    assert!(node.log_contains("target marked healthy"));
    Ok(())
}

#[tokio::test]
async fn passive_ejection_removes_failing_targets() -> Result {
    let (failing_a, failing_b) = (
        Arc::new(AtomicBool::new(true)),
        Arc::new(AtomicBool::new(false)),
    );
    let a = switchable(failing_a.clone(), || Reply::Status(502)).await;
    let b = switchable(failing_b.clone(), || Reply::Status(502)).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\", \"{}\"]\n\
         [upstreams.app.breaker]\nenabled = false\n\
         [upstreams.app.retry]\nmax_retries = 0\n\
         [upstreams.app.health.passive]\nconsecutive_failures = 2\nejection_time = \"2s\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        a.addr, b.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..4 {
        get(&node.url("/")).await?;
    }
    assert_eq!(a.count(), 2, "a is ejected after two failures");
    for _ in 0..4 {
        assert_eq!(get(&node.url("/")).await?.status, 200);
    }
    assert_eq!(a.count(), 2);

    failing_b.store(true, Ordering::SeqCst);
    let mut last = get(&node.url("/")).await?;
    for _ in 0..3 {
        if last.status == 503 {
            break;
        }
        last = get(&node.url("/")).await?;
    }
    assert_eq!(last.status, 503);
    assert_eq!(last.json()["error"], "no_healthy_upstream");
    let attempts = a.count() + b.count();
    assert_eq!(
        get(&node.url("/")).await?.json()["error"],
        "no_healthy_upstream"
    );
    assert_eq!(
        a.count() + b.count(),
        attempts,
        "nothing reached an ejected target"
    );

    failing_a.store(false, Ordering::SeqCst);
    failing_b.store(false, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    assert_eq!(get(&node.url("/")).await?.status, 200, "the ejection ended");
    assert!(node.log_contains("ejected target"));
    Ok(())
}

#[tokio::test]
async fn callers_deadline_does_not_count_against_the_breaker() -> Result {
    let upstream = Upstream::start(|_| Reply::Delay(Duration::from_secs(1))).await;
    let config = format!(
        "{}[upstreams.slow]\ntargets = [\"{}\"]\nresponse_timeout = \"5s\"\n\
         [upstreams.slow.breaker]\nconsecutive_failures = 2\ncool_down = \"1h\"\nmax_cool_down = \"1h\"\n\n\
         [[routes]]\nname = \"short\"\nprefix = \"/short\"\nupstream = \"slow\"\n\
         timeout = \"200ms\"\n\n\
         [[routes]]\nname = \"patient\"\nupstream = \"slow\"\n",
        admin_block(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    // The route's own deadline ends these, well before the upstream's 5 s
    // response timeout: the upstream did nothing wrong.
    for _ in 0..3 {
        let got = get(&node.url("/short")).await?;
        assert_eq!(got.status, 504);
        assert_eq!(got.json()["error"], "upstream_timeout");
    }
    let breaker = admin_target(&node, "/breakers", 0).await?;
    assert_eq!(breaker["state"], "closed", "{breaker}");
    let got = get(&node.url("/")).await?;
    assert_eq!(
        got.status, 200,
        "the other route still reaches the upstream"
    );
    assert!(!node.log_contains("upstream timed out"), "{}", node.log());
    Ok(())
}

#[tokio::test]
async fn route_timeout_bounds_the_whole_exchange() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(5))).await;
    let config = format!(
        "[upstreams.slow]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"slow\"\nupstream = \"slow\"\ntimeout = \"300ms\"\n",
        slow.addr
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"], "upstream_timeout");
    assert_eq!(slow.count(), 1, "no retry after the route's timeout");
    Ok(())
}

#[tokio::test]
async fn stalled_response_body_is_cut_off_at_the_idle_timeout() -> Result {
    let stalling = Upstream::start(|_| Reply::StalledBody(Duration::from_secs(30))).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\nidle_timeout = \"300ms\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        stalling.addr
    );
    let node = Node::start(&config)?;
    let result = tokio::time::timeout(Duration::from_secs(10), get(&node.url("/"))).await?;
    assert!(
        result.is_err(),
        "the body ends with an error, not complete: {result:?}"
    );
    Ok(())
}

#[tokio::test]
async fn admin_listener_requires_the_bearer_token() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        admin_block(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    let admin = node.admin_url.clone().expect("admin listener");
    assert!(admin.starts_with("http://127.0.0.1:"));

    let missing = get(&format!("{admin}/breakers")).await?;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.json()["error"], "unauthorized");
    assert_eq!(missing.header("www-authenticate"), Some("Bearer"));
    let wrong = send(
        "GET",
        &format!("{admin}/health"),
        &[("authorization", "Bearer not-the-token-at-all")],
        b"",
    )
    .await?;
    assert_eq!(wrong.status, 401);
    // The scheme is case-insensitive.
    let lower = send(
        "GET",
        &format!("{admin}/health"),
        &[("authorization", &format!("bearer {TOKEN}"))],
        b"",
    )
    .await?;
    assert_eq!(lower.status, 200);

    // The probes accept GET and HEAD, and the other paths accept GET only.
    for (method, path, allowed) in [
        ("POST", "/healthz", "GET, HEAD"),
        ("DELETE", "/readyz", "GET, HEAD"),
        ("POST", "/metrics", "GET"),
    ] {
        let bearer = format!("Bearer {TOKEN}");
        let got = send(
            method,
            &format!("{admin}{path}"),
            &[("authorization", &bearer)],
            b"",
        )
        .await?;
        assert_eq!(got.status, 405, "{method} {path}");
        assert_eq!(got.json()["error"], "method_not_allowed", "{method} {path}");
        assert_eq!(got.header("allow"), Some(allowed), "{method} {path}");
    }
    assert_eq!(
        send("HEAD", &format!("{admin}/healthz"), &[], b"")
            .await?
            .status,
        200
    );
    // An unknown path is not found, whatever the method.
    for method in ["GET", "POST"] {
        let bearer = format!("Bearer {TOKEN}");
        let got = send(
            method,
            &format!("{admin}/deploy"),
            &[("authorization", &bearer)],
            b"",
        )
        .await?;
        assert_eq!(got.status, 404, "{method}");
        assert_eq!(got.json()["error"], "not_found", "{method}");
    }

    let breakers = admin_get(&node, "/breakers").await?;
    assert_eq!(breakers.status, 200);
    assert_eq!(breakers.json()["upstreams"][0]["upstream"], "app");
    assert_eq!(
        breakers.json()["upstreams"][0]["targets"][0]["state"],
        "closed"
    );
    let health = admin_get(&node, "/health").await?;
    assert_eq!(health.json()["upstreams"][0]["targets"][0]["up"], true);
    assert_eq!(health.json()["upstreams"][0]["balance"], "round_robin");
    let metrics = admin_get(&node, "/metrics").await?;
    let text = String::from_utf8_lossy(&metrics.body);
    // The exposition sorts labels by name, so `target` comes first.
    assert!(
        text.lines().any(
            |line| line.starts_with("edge_breaker_state{") && line.contains("upstream=\"app\"")
        ),
        "{text}"
    );
    assert_eq!(admin_get(&node, "/nothing").await?.status, 404);
    assert_eq!(
        upstream.count(),
        0,
        "admin requests never reach an upstream"
    );
    Ok(())
}

#[test]
fn invalid_resilience_settings_name_the_line_and_field() -> Result {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("edge.toml");
    let cases = [
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\nbalance = \"consistent_hash\"\n",
            "upstreams.app.hash_key: consistent_hash needs a hash_key",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n[upstreams.app.breaker]\n\
             half_open_probes = 0\n",
            "upstreams.app.breaker.half_open_probes: must be at least 1",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\nmax_requests_per_target = 0\n",
            "upstreams.app.max_requests_per_target: must be at least 1",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\nqueue_timeout = \"2s\"\n",
            "upstreams.app.queue_timeout: applies only with max_requests_per_target",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n[admin]\ntoken = \"short\"\n",
            "admin.token: must be at least 16 characters",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n[admin]\ntoken = \" 0123456789abcdef \"\n",
            "admin.token: may hold only visible ASCII characters",
        ),
        (
            "[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n[upstreams.\"a\\u001b[31m\"]\n\
             targets = [\"127.0.0.1:9\"]\n",
            "upstream name \"a\\u{1b}[31m\" contains a control character",
        ),
    ];
    for (upstream, expected) in cases {
        let text = format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n{upstream}\n\
             [[routes]]\nname = \"app\"\nupstream = \"app\"\n"
        );
        std::fs::write(&path, text)?;
        let output = edge(&["check", path.to_str().unwrap()]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success());
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
        assert!(
            stderr.contains("edge.toml:"),
            "the error names the file: {stderr}"
        );
    }
    Ok(())
}

#[test]
fn routes_explain_shows_the_upstream_resilience_settings() -> Result {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("edge.toml");
    let text = "[[listeners]]\naddr = \"127.0.0.1:0\"\n\
                [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\nbalance = \"least_outstanding\"\n\
                [upstreams.app.health.active]\npath = \"/healthz\"\n\n\
                [[routes]]\nname = \"app\"\nupstream = \"app\"\ntimeout = \"5s\"\n";
    std::fs::write(&path, text)?;
    let output = edge(&[
        "routes",
        "explain",
        "--config",
        path.to_str().unwrap(),
        "GET",
        "/",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    for expected in [
        "least_outstanding",
        "breaker: opens after 5 consecutive failures",
        "retries: up to 1",
        "active health: GET /healthz every 5s",
        "passive health: off",
        "route timeout: 5s",
        "idle body 60s",
    ] {
        assert!(
            stdout.contains(expected),
            "expected {expected:?} in {stdout}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn route_timeout_cuts_off_a_stalled_body() -> Result {
    let stalling = Upstream::start(|_| Reply::StalledBody(Duration::from_secs(30))).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\nidle_timeout = \"0s\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\ntimeout = \"300ms\"\n",
        stalling.addr
    );
    let node = Node::start(&config)?;
    let result = tokio::time::timeout(Duration::from_secs(10), get(&node.url("/"))).await?;
    assert!(
        result.is_err(),
        "the body ends with an error, not complete: {result:?}"
    );
    assert_eq!(stalling.count(), 1);
    Ok(())
}

#[tokio::test]
async fn retry_with_every_breaker_open_returns_the_upstream_answer() -> Result {
    let failing = Upstream::start(|_| Reply::Status(503)).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n\
         [upstreams.app.breaker]\nconsecutive_failures = 1\ncool_down = \"1h\"\nmax_cool_down = \"1h\"\n\n\
         [[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        failing.addr
    );
    let node = Node::start(&config)?;
    let first = get(&node.url("/")).await?;
    assert_eq!(first.status, 503);
    assert_eq!(
        &first.body[..],
        b"upstream says no",
        "the upstream's own 503, not the node's circuit_open"
    );
    assert_eq!(
        failing.count(),
        1,
        "the breaker opened, so no retry was sent"
    );
    let second = get(&node.url("/")).await?;
    assert_eq!(second.json()["error"], "circuit_open");
    assert_eq!(failing.count(), 1);
    Ok(())
}

/// Sends a GET for `path` on a connection with a small receive buffer, and
/// returns the connection unread.
async fn get_without_reading(addr: &str, path: &str) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr.parse()?).await?;
    let head = format!("GET {path} HTTP/1.1\r\nhost: localhost\r\n\r\n");
    stream.write_all(head.as_bytes()).await?;
    Ok(stream)
}

/// Sends an HTTP/2 GET for `/big` with the largest flow-control windows, on
/// a connection with a small receive buffer, and returns the connection
/// unread: the node may send as much as it has, and the socket fills.
async fn get_h2_without_reading(addr: &str) -> Result<tokio::net::TcpStream> {
    use tokio::io::AsyncWriteExt;
    let socket = tokio::net::TcpSocket::new_v4()?;
    socket.set_recv_buffer_size(4096)?;
    let mut stream = socket.connect(addr.parse()?).await?;
    let mut bytes = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
    // SETTINGS: SETTINGS_INITIAL_WINDOW_SIZE (4) = 2^31 - 1.
    bytes.extend_from_slice(&[0, 0, 6, 0x4, 0, 0, 0, 0, 0, 0, 4, 0x7f, 0xff, 0xff, 0xff]);
    // WINDOW_UPDATE of the connection up to 2^31 - 1.
    let increment: u32 = 0x7fff_ffff - 65_535;
    bytes.extend_from_slice(&[0, 0, 4, 0x8, 0, 0, 0, 0, 0]);
    bytes.extend_from_slice(&increment.to_be_bytes());
    // HEADERS on stream 1, END_STREAM and END_HEADERS: GET and http from
    // the static table, then `:path: /big` and `:authority: localhost` as
    // literals with indexed names.
    let mut block = vec![0x82, 0x86, 0x44, 4];
    block.extend_from_slice(b"/big");
    block.extend_from_slice(&[0x41, 9]);
    block.extend_from_slice(b"localhost");
    bytes.extend_from_slice(&[0, 0, block.len() as u8, 0x1, 0x5, 0, 0, 0, 1]);
    bytes.extend_from_slice(&block);
    stream.write_all(&bytes).await?;
    Ok(stream)
}

/// Waits up to ten seconds for a GET of `url` to get 200, and returns the
/// statuses it got on the way.
async fn statuses_until_ok(url: &str) -> Result<Vec<u16>> {
    let mut statuses = Vec::new();
    for _ in 0..40 {
        let status = get(url).await?.status.as_u16();
        statuses.push(status);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    Ok(statuses)
}

#[tokio::test]
async fn client_that_stops_reading_is_cut_off() -> Result {
    let big = Upstream::start(|received| {
        if received.target == "/big" {
            Reply::Bytes(64 << 20)
        } else {
            Reply::Echo
        }
    })
    .await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nsend_timeout = \"1s\"\n\n{}",
        one_slot_each(&[&big], "queue_timeout = \"50ms\"\n")
    );
    let node = Node::start(&config)?;
    let addr = node
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();

    for protocol in ["HTTP/1.1", "HTTP/2"] {
        let unread = match protocol {
            "HTTP/1.1" => get_without_reading(&addr, "/big").await?,
            _ => get_h2_without_reading(&addr).await?,
        };
        // The unread response keeps the target's only slot.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 503, "{protocol}: {:?}", got.body);
        assert_eq!(got.json()["error"], "upstream_busy", "{protocol}");

        // After the send timeout the node closes that connection, and the
        // slot serves others again while the client is still connected.
        let statuses = statuses_until_ok(&node.url("/")).await?;
        assert_eq!(statuses.last(), Some(&200), "{protocol}: {statuses:?}");
        drop(unread);
    }
    Ok(())
}
