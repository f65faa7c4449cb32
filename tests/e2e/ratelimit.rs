//! Rate limits through real nodes: local limits, global limits in a real
//! redis-server (and a real Redis Cluster) started on loopback, Redis
//! outages, skewed node clocks and the leaky bucket's queue.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use http::StatusCode;
use tokio::io::AsyncWriteExt;

use crate::harness::{get, get_h2_with, send, Got, Node, Redis, RedisCluster, Result, Upstream};

fn app(upstream: &Upstream) -> String {
    format!("[upstreams.app]\ntargets = [\"{}\"]\n\n", upstream.addr)
}

/// Formats a route on `prefix` to `app` with the limits in `limits` (TOML
/// for `[[routes.limits]]` entries).
fn route(name: &str, prefix: &str, limits: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"app\"\n\n{limits}\n"
    )
}

fn limit(fields: &str) -> String {
    format!("[[routes.limits]]\n{fields}\n")
}

/// The `[redis]` table of the counting tests. Its timeout is long because a
/// decision that timed out on a loaded test machine would fall back to the
/// local count and change what the tests count. The tests of Redis failures
/// set their own.
fn redis_table(redis: &Redis) -> String {
    format!("[redis]\nurl = \"{}\"\ntimeout = \"2s\"\n\n", redis.url())
}

/// Returns a config with Redis and one route, `limited`, on every path to
/// `app`, with one limit of `fields`.
fn limited_config(redis: &Redis, upstream: &Upstream, fields: &str) -> String {
    format!(
        "{}{}{}",
        redis_table(redis),
        app(upstream),
        route("limited", "/", &limit(fields)),
    )
}

/// Sends `count` GETs to `url` at once, each on its own connection, with
/// `headers`.
async fn concurrent(url: &str, count: usize, headers: &[(&str, &str)]) -> Result<Vec<Got>> {
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..count {
        let url = url.to_owned();
        let headers: Vec<(String, String)> = headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect();
        tasks.spawn(async move {
            let headers: Vec<(&str, &str)> = headers
                .iter()
                .map(|(n, v)| (n.as_str(), v.as_str()))
                .collect();
            send("GET", &url, &headers, b"").await
        });
    }
    let mut responses = Vec::new();
    while let Some(result) = tasks.join_next().await {
        responses.push(result??);
    }
    Ok(responses)
}

fn count(responses: &[Got], status: u16) -> usize {
    responses.iter().filter(|r| r.status == status).count()
}

/// Checks that every response is a 200 or a 429 and returns the 200s.
fn admitted(responses: &[Got]) -> usize {
    for response in responses {
        assert!(
            response.status == 200 || response.status == 429,
            "unexpected {}: {:?}",
            response.status,
            String::from_utf8_lossy(&response.body)
        );
    }
    count(responses, 200)
}

fn header_u64(got: &Got, name: &str) -> u64 {
    got.header(name)
        .unwrap_or_else(|| panic!("no {name} header in {:?}", got.headers))
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a number: {:?}", got.header(name)))
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap()
}

/// Waits, when needed, until at least `needed` is left in the current
/// window of length `window` (windows are aligned to Unix time), so that a
/// test's requests all fall in one fixed window.
async fn wait_for_window(window: Duration, needed: Duration) {
    let now = unix_now().as_millis() as u64;
    let window_ms = window.as_millis() as u64;
    let left = window_ms - now % window_ms;
    if left < needed.as_millis() as u64 {
        tokio::time::sleep(Duration::from_millis(left + 100)).await;
    }
}

#[tokio::test]
async fn token_bucket_headers_match_its_state() -> Result {
    let upstream = Upstream::echo().await;
    // One request per 10 s, three at once.
    let config = format!(
        "{}{}{}",
        app(&upstream),
        route(
            "api",
            "/",
            &limit("name = \"burst\"\nkey = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"6/min\"\nburst = 3")
        ),
        route("open", "/open", "")
    );
    let node = Node::start(&config)?;
    for (remaining, reset) in [(2, 10), (1, 20), (0, 30)] {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(header_u64(&got, "ratelimit-limit"), 3);
        assert_eq!(header_u64(&got, "ratelimit-remaining"), remaining);
        assert_eq!(header_u64(&got, "x-rate-limit-remaining"), remaining);
        // Seconds until the bucket is full again, rounded up.
        assert_eq!(header_u64(&got, "ratelimit-reset"), reset);
        assert!(got.header("retry-after").is_none());
    }
    let refused = get(&node.url("/")).await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(refused.header("content-type"), Some("application/json"));
    let body = refused.json();
    assert_eq!(body["error"], "rate_limited");
    assert_eq!(body["limit"], "burst");
    assert_eq!(body["retry_after"], 10);
    // The next token comes 10 s after the first request.
    assert_eq!(refused.header("retry-after"), Some("10"));
    assert_eq!(header_u64(&refused, "ratelimit-remaining"), 0);
    assert_eq!(header_u64(&refused, "x-rate-limit-remaining"), 0);
    assert_eq!(header_u64(&refused, "ratelimit-reset"), 30);
    assert_eq!(upstream.count(), 3);

    // A route without limits carries no rate-limit headers.
    let open = get(&node.url("/open")).await?;
    assert_eq!(open.status, 200);
    assert!(open.header("ratelimit-limit").is_none());
    Ok(())
}

#[tokio::test]
async fn fixed_window_retry_after_is_the_window_end() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        route(
            "api",
            "/",
            &limit("key = \"route\"\nalgorithm = \"fixed_window\"\nrate = \"2/10s\"")
        )
    );
    let node = Node::start(&config)?;
    wait_for_window(Duration::from_secs(10), Duration::from_secs(3)).await;
    for remaining in [1, 0] {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(header_u64(&got, "ratelimit-remaining"), remaining);
    }
    let refused = get(&node.url("/")).await?;
    let left = 10.0 - (unix_now().as_secs_f64() % 10.0);
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["limit"], "route 2/10s");
    let retry = header_u64(&refused, "retry-after") as f64;
    assert!(
        (retry - left).abs() <= 1.0,
        "retry-after {retry}, window ends in {left:.2} s"
    );
    assert_eq!(header_u64(&refused, "ratelimit-reset") as f64, retry);
    Ok(())
}

#[tokio::test]
async fn headers_describe_the_limit_with_the_least_remaining() -> Result {
    let upstream = Upstream::echo().await;
    let limits = format!(
        "{}{}",
        limit("name = \"wide\"\nkey = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"10/h\""),
        limit("name = \"narrow\"\nkey = \"header:x-api-key\"\nalgorithm = \"token_bucket\"\nrate = \"3/h\"")
    );
    let worker = "[[routes.workers]]\nmodule = \"{modules}/fixture-worker.wasm\"\n\
                  [routes.workers.config]\nmode = \"respond\"\nstatus = 202\n";
    let config = format!(
        "{}{}{}{}",
        app(&upstream),
        route("api", "/", &limits),
        route(
            "worker",
            "/worker",
            &limit("key = \"ip\"\nalgorithm = \"token_bucket\"\nrate = \"5/h\"")
        ),
        worker
    );
    let node = Node::start(&config)?;
    let key = [("x-api-key", "k1")];
    let first = send("GET", &node.url("/"), &key, b"").await?;
    assert_eq!(first.status, 200);
    // wide has 9 left, narrow 2: the headers describe narrow.
    assert_eq!(header_u64(&first, "ratelimit-limit"), 3);
    assert_eq!(header_u64(&first, "ratelimit-remaining"), 2);
    // Another API key from the same address: wide has 8 left, narrow 2.
    let other = send("GET", &node.url("/"), &[("x-api-key", "k2")], b"").await?;
    assert_eq!(header_u64(&other, "ratelimit-remaining"), 2);
    send("GET", &node.url("/"), &key, b"").await?;
    send("GET", &node.url("/"), &key, b"").await?;
    let refused = send("GET", &node.url("/"), &key, b"").await?;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["limit"], "narrow");
    assert_eq!(header_u64(&refused, "ratelimit-limit"), 3);
    // Without the header, narrow counts by client address: it has room,
    // and wide has 10 - 5 = 5 left (the refused request counted for wide).
    let anonymous = get(&node.url("/")).await?;
    assert_eq!(anonymous.status, 200);
    assert_eq!(header_u64(&anonymous, "ratelimit-remaining"), 2);

    // A worker's own response on a limited route carries the headers too.
    let worker = get(&node.url("/worker")).await?;
    assert_eq!(worker.status, 202);
    assert_eq!(header_u64(&worker, "ratelimit-remaining"), 4);
    Ok(())
}

/// Four routes, one per algorithm, each admitting 50 requests of the route
/// in the test's time, in `scope`.
fn half_limits(scope: &str) -> String {
    [
        ("tb", "token_bucket", "50/h", ""),
        ("lb", "leaky_bucket", "50/h", "burst = 50\n"),
        ("fw", "fixed_window", "50/366d", ""),
        ("sw", "sliding_window", "50/366d", ""),
    ]
    .iter()
    .map(|(name, algorithm, rate, extra)| {
        route(
            name,
            &format!("/{name}"),
            &limit(&format!(
                "key = \"route\"\nalgorithm = \"{algorithm}\"\nrate = \"{rate}\"\n{extra}scope = \"{scope}\""
            )),
        )
    })
    .collect()
}

async fn concurrent_requests_admit_exactly_the_limit(scope: &str) -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "{}{}{}",
        redis_table(&redis),
        app(&upstream),
        half_limits(scope)
    );
    let node = Node::start(&config)?;
    for name in ["tb", "lb", "fw", "sw"] {
        let responses = concurrent(&node.url(&format!("/{name}")), 100, &[]).await?;
        assert_eq!(admitted(&responses), 50, "{scope} {name}");
        let remaining: Vec<u64> = responses
            .iter()
            .map(|r| header_u64(r, "ratelimit-remaining"))
            .collect();
        // Every admitted request saw a different remaining count.
        let mut seen: Vec<u64> = responses
            .iter()
            .zip(&remaining)
            .filter(|(r, _)| r.status == 200)
            .map(|(_, &n)| n)
            .collect();
        seen.sort_unstable();
        assert_eq!(seen, (0..50).collect::<Vec<u64>>(), "{scope} {name}");
    }
    assert_eq!(upstream.count(), 200);
    if scope == "global" {
        assert_eq!(redis.cli(&["dbsize"]), "4");
    }
    Ok(())
}

#[tokio::test]
async fn concurrent_requests_admit_exactly_the_local_limit() -> Result {
    concurrent_requests_admit_exactly_the_limit("local").await
}

#[tokio::test]
async fn concurrent_requests_admit_exactly_the_global_limit() -> Result {
    concurrent_requests_admit_exactly_the_limit("global").await
}

#[tokio::test]
async fn three_nodes_share_one_global_limit() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "{}{}{}{}",
        redis_table(&redis),
        app(&upstream),
        route(
            "global",
            "/global",
            &limit("key = \"route\"\nalgorithm = \"fixed_window\"\nrate = \"100/min\"\nscope = \"global\"")
        ),
        route(
            "local",
            "/local",
            &limit("key = \"route\"\nalgorithm = \"fixed_window\"\nrate = \"100/min\"")
        ),
    );
    let nodes = [
        Node::start(&config)?,
        Node::start(&config)?,
        Node::start(&config)?,
    ];
    wait_for_window(Duration::from_secs(60), Duration::from_secs(5)).await;
    for (path, expected) in [("/global", 100), ("/local", 300)] {
        let mut total = 0;
        // 150 requests to each node, 50 to each at a time.
        for _ in 0..3 {
            let batches = nodes.iter().map(|node| {
                let url = node.url(path);
                async move { concurrent(&url, 50, &[]).await }
            });
            for responses in futures_util::future::join_all(batches).await {
                total += admitted(&responses?);
            }
        }
        assert_eq!(total, expected, "{path}: {}", nodes[0].log());
    }
    Ok(())
}

/// Returns the `EVALSHA` calls `redis` has served.
fn evalsha_calls(redis: &Redis) -> u64 {
    let stats = redis.cli(&["info", "commandstats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a call count"))
}

#[tokio::test]
async fn leased_limit_needs_few_redis_calls() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let leased = |name: &str, prefix: &str| {
        route(
            name,
            prefix,
            &limit(
                "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"100/h\"\n\
                 scope = \"global\"\nlease = 10",
            ),
        )
    };
    let config = format!(
        "{}{}{}{}",
        redis_table(&redis),
        app(&upstream),
        leased("one-by-one", "/one-by-one"),
        leased("at-once", "/at-once"),
    );
    let nodes = [
        Node::start(&config)?,
        Node::start(&config)?,
        Node::start(&config)?,
    ];

    // One request at a time, in turn to each node: each node takes 10 at a
    // time from Redis and uses them all, so exactly the bucket's 100 are
    // admitted (it refills one request every 36 s).
    let before = evalsha_calls(&redis);
    let mut total = 0;
    let mut first = None;
    for i in 0..150 {
        let got = get(&nodes[i % 3].url("/one-by-one")).await?;
        total += admitted(std::slice::from_ref(&got));
        first.get_or_insert(got);
    }
    assert_eq!(total, 100, "{}", nodes[0].log());
    // Ten leases of ten, then one refusal per node, which each node keeps
    // until its retry time.
    let calls = evalsha_calls(&redis) - before;
    assert!(calls <= 15, "{calls} EVALSHA calls for 150 requests");
    // The first response counts what Redis has left and what the node's
    // lease still holds.
    let first = first.expect("a response");
    assert_eq!(header_u64(&first, "ratelimit-limit"), 100);
    assert_eq!(header_u64(&first, "ratelimit-remaining"), 99);
    // The reset agrees with it: one request to refill, 36 s (not the 360 s
    // Redis takes to refill the lease of ten).
    assert!(
        (35..=36).contains(&header_u64(&first, "ratelimit-reset")),
        "{:?}",
        first.headers
    );
    assert_eq!(
        upstream.count(),
        100,
        "refused requests reached the upstream"
    );
    let refused = get(&nodes[1].url("/one-by-one")).await?;
    assert_eq!(refused.status, StatusCode::TOO_MANY_REQUESTS);
    assert!(header_u64(&refused, "retry-after") >= 1);
    assert_eq!(
        evalsha_calls(&redis) - before,
        calls,
        "a kept refusal asks Redis"
    );

    // Many at once: one request per node calls Redis while the others wait
    // for its lease, so at most one lease per node is left unused at the
    // end (nine requests each), and never more than the limit is admitted.
    let mut total = 0;
    for _ in 0..3 {
        let batches = nodes.iter().map(|node| {
            let url = node.url("/at-once");
            async move { concurrent(&url, 50, &[]).await }
        });
        for responses in futures_util::future::join_all(batches).await {
            total += admitted(&responses?);
        }
    }
    assert!((100 - 3 * 9..=100).contains(&total), "{total} admitted");
    assert_eq!(upstream.count(), 100 + total);
    Ok(())
}

#[tokio::test]
async fn leased_burst_takes_little_more_than_it_uses() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    // One request every 100 ms with a burst of 300, ten at a time: a lease
    // lives 1 s.
    let config = limited_config(
        &redis,
        &upstream,
        "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"600/min\"\n\
         burst = 300\nscope = \"global\"\nlease = 10",
    );
    let node = Node::start(&config)?;
    let responses = concurrent(&node.url("/"), 100, &[]).await?;
    assert_eq!(admitted(&responses), 100);
    // The requests that waited for a lease and found it used up asked
    // Redis for themselves alone, so Redis lost at most the nine a lease
    // leaves unused. Once the node's lease has expired, the next request
    // shows what Redis had left, less itself.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let after = get(&node.url("/")).await?;
    let remaining = header_u64(&after, "ratelimit-remaining");
    assert!(
        remaining >= 300 - 100 - 9 - 1,
        "{remaining} remaining after a burst of 100"
    );
    Ok(())
}

#[tokio::test]
async fn leased_burst_headers_count_what_is_left() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    // Nothing refills during the test: one request every 3 minutes.
    let config = limited_config(
        &redis,
        &upstream,
        "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"20/h\"\n\
         burst = 20\nscope = \"global\"\nlease = 5",
    );
    let node = Node::start(&config)?;

    let responses = concurrent(&node.url("/"), 10, &[]).await?;
    assert_eq!(admitted(&responses), 10);
    // A concurrent response may not yet count a lease whose reply is still
    // on its way, at most four requests.
    for got in &responses {
        let remaining = header_u64(got, "ratelimit-remaining");
        assert!((10 - 4..20).contains(&remaining), "{remaining} remaining");
    }

    // Then each request shows one fewer, whatever order the burst's
    // replies came in, until the bucket is empty.
    for expected in (0..10).rev() {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(header_u64(&got, "ratelimit-remaining"), expected);
        let reset = header_u64(&got, "ratelimit-reset");
        assert_eq!(
            reset,
            (20 - expected) * 180,
            "reset at {expected} remaining"
        );
    }
    assert_eq!(get(&node.url("/")).await?.status, 429);
    Ok(())
}

#[tokio::test]
async fn http2_padded_key_is_one_key() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}{}",
        app(&upstream),
        route(
            "keyed",
            "/",
            &limit(
                "key = \"header:x-api-key\"\nalgorithm = \"token_bucket\"\n\
                 rate = \"1/min\"\nburst = 1",
            ),
        ),
    );
    let node = Node::start(&config)?;
    let url = node.url("/");
    assert_eq!(get_h2_with(&url, &[("x-api-key", "k1")]).await?.status, 200);
    for padded in ["k1 ", " k1", "k1\t"] {
        let got = get_h2_with(&url, &[("x-api-key", padded)]).await?;
        assert_eq!(got.status, StatusCode::TOO_MANY_REQUESTS, "{padded:?}");
    }
    assert_eq!(upstream.count(), 1, "a padded key reached the upstream");
    Ok(())
}

#[tokio::test]
async fn leased_limit_outlives_a_redis_outage() -> Result {
    let upstream = Upstream::echo().await;
    let mut redis = Redis::start()?;
    let leased = |fail: &str| {
        limit(&format!(
            "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"1000/h\"\n\
             scope = \"global\"\nlease = 10\non_redis_error = \"{fail}\""
        ))
    };
    let config = format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"200ms\"\n\n{}{}{}",
        redis.url(),
        app(&upstream),
        route("open", "/open", &leased("fail_open")),
        route("closed", "/closed", &leased("fail_closed")),
    );
    let node = Node::start(&config)?;
    // Each route's first request takes a lease of ten.
    assert_eq!(get(&node.url("/open")).await?.status, StatusCode::OK);
    assert_eq!(get(&node.url("/closed")).await?.status, StatusCode::OK);
    redis.stop();
    let started = Instant::now();
    let closed = concurrent(&node.url("/closed"), 20, &[]).await?;
    let open = concurrent(&node.url("/open"), 20, &[]).await?;
    // The nine requests left in each lease are admitted. Then fail closed
    // responds 503 and fail open counts on the node.
    assert_eq!(count(&closed, 200), 9, "{}", node.log());
    assert_eq!(count(&closed, 503), 11);
    assert_eq!(count(&open, 200), 20);
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(upstream.count(), 2 + 9 + 20);
    Ok(())
}

#[tokio::test]
async fn leased_limit_waits_for_a_hung_redis_once() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"500ms\"\n\n{}{}",
        redis.url(),
        app(&upstream),
        route(
            "closed",
            "/closed",
            &limit(
                "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"1000/h\"\n\
                 scope = \"global\"\nlease = 10\non_redis_error = \"fail_closed\""
            )
        ),
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/closed")).await?.status, StatusCode::OK);
    redis.signal("-STOP");
    // Nine requests use the rest of the lease. One of the others calls
    // Redis and the rest wait for it. When that call times out, they all
    // fail at once instead of calling Redis again for a second timeout.
    let started = Instant::now();
    let closed = concurrent(&node.url("/closed"), 20, &[]).await?;
    let took = started.elapsed();
    redis.signal("-CONT");
    assert_eq!(count(&closed, 200), 9, "{}", node.log());
    assert_eq!(count(&closed, 503), 11);
    assert!(took < Duration::from_millis(900), "{took:?}");
    Ok(())
}

#[tokio::test]
async fn quiet_key_leases_shrink() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    // Ten a second, five at a time: a lease lives 500 ms.
    let config = limited_config(
        &redis,
        &upstream,
        "key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"10/s\"\n\
         burst = 10\nscope = \"global\"\nlease = 5",
    );
    let nodes = [
        Node::start(&config)?,
        Node::start(&config)?,
        Node::start(&config)?,
    ];
    // Two nodes take a lease of five each for one request each, which
    // empties the bucket.
    for node in &nodes[..2] {
        assert_eq!(get(&node.url("/")).await?.status, StatusCode::OK);
    }
    // Their leases expire with eight requests unused, which are lost; the
    // bucket has refilled six. Each of the two used one of its five, so its
    // next lease is two, and the third node finds requests left too. With
    // leases of five it would find none.
    tokio::time::sleep(Duration::from_millis(600)).await;
    for node in &nodes {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, StatusCode::OK, "{}", node.log());
    }
    Ok(())
}

/// Sends requests with 20 API keys, 15 each, spread over `nodes`, against
/// a global token bucket of 10 per key, and 100 concurrent requests
/// against a global sliding window of 50 for the route. Returns the
/// requests admitted per key and for the route.
async fn global_counts(nodes: &[Node]) -> Result<(Vec<usize>, usize)> {
    let mut per_key = Vec::new();
    for key in 0..20 {
        let key = format!("key-{key}");
        let mut tasks = Vec::new();
        for i in 0..15 {
            let url = nodes[i % nodes.len()].url("/keyed");
            let key = key.clone();
            tasks.push(async move { send("GET", &url, &[("x-api-key", &key)], b"").await });
        }
        let responses: Vec<Got> = futures_util::future::join_all(tasks)
            .await
            .into_iter()
            .collect::<Result<_>>()?;
        per_key.push(admitted(&responses));
    }
    let mut route_total = 0;
    let batches = nodes.iter().map(|node| {
        let url = node.url("/route");
        async move { concurrent(&url, 100 / nodes.len() + 1, &[]).await }
    });
    for responses in futures_util::future::join_all(batches).await {
        route_total += admitted(&responses?);
    }
    Ok((per_key, route_total))
}

fn keyed_and_route_limits(upstream: &Upstream) -> String {
    format!(
        "{}{}{}",
        app(upstream),
        route(
            "keyed",
            "/keyed",
            &limit("key = \"header:x-api-key\"\nalgorithm = \"token_bucket\"\nrate = \"10/h\"\nscope = \"global\"")
        ),
        route(
            "route",
            "/route",
            &limit("key = \"route\"\nalgorithm = \"sliding_window\"\nrate = \"50/366d\"\nscope = \"global\"")
        ),
    )
}

#[tokio::test]
async fn redis_cluster_counts_like_one_server() -> Result {
    let upstream = Upstream::echo().await;

    let redis = Redis::start()?;
    let config = format!(
        "{}{}",
        redis_table(&redis),
        keyed_and_route_limits(&upstream)
    );
    let nodes = [
        Node::start(&config)?,
        Node::start(&config)?,
        Node::start(&config)?,
    ];
    let single = global_counts(&nodes).await?;
    drop(nodes);

    let cluster = RedisCluster::start(3)?;
    let seeds: Vec<String> = cluster.urls().iter().map(|u| format!("{u:?}")).collect();
    let config = format!(
        "[redis]\ncluster = [{}]\ntimeout = \"500ms\"\n\n{}",
        seeds.join(", "),
        keyed_and_route_limits(&upstream)
    );
    let nodes = [
        Node::start(&config)?,
        Node::start(&config)?,
        Node::start(&config)?,
    ];
    let clustered = global_counts(&nodes).await?;

    assert_eq!(single.0, vec![10; 20]);
    assert_eq!(single.1, 50);
    assert_eq!(clustered, single);
    // The keys are spread over the shards: 20 API keys and the route.
    let sizes: Vec<usize> = cluster
        .nodes
        .iter()
        .map(|n| n.cli(&["dbsize"]).parse().unwrap())
        .collect();
    assert_eq!(sizes.iter().sum::<usize>(), 21, "{sizes:?}");
    assert!(sizes.iter().filter(|&&n| n > 0).count() >= 2, "{sizes:?}");
    for node in &nodes {
        assert!(
            !node.log().contains("no decision from redis"),
            "{}",
            node.log()
        );
    }
    Ok(())
}

#[tokio::test]
async fn redis_outage_fails_open_or_closed_and_recovers() -> Result {
    let upstream = Upstream::echo().await;
    let mut redis = Redis::start()?;
    let config = format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"200ms\"\nconnect_timeout = \"5s\"\n\n{}{}{}",
        redis.url(),
        app(&upstream),
        route(
            "open",
            "/open",
            &limit("key = \"header:x-user\"\nalgorithm = \"token_bucket\"\nrate = \"3/h\"\nscope = \"global\"\non_redis_error = \"fail_open\"")
        ),
        route(
            "closed",
            "/closed",
            &limit("key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"1000/h\"\nscope = \"global\"\non_redis_error = \"fail_closed\"")
        ),
    );
    let node = Node::start(&config)?;
    let user = |name: &'static str| [("x-user", name)];
    for _ in 0..3 {
        assert_eq!(
            send("GET", &node.url("/open"), &user("a"), b"")
                .await?
                .status,
            200
        );
    }
    assert_eq!(
        send("GET", &node.url("/open"), &user("a"), b"")
            .await?
            .status,
        429
    );
    assert_eq!(get(&node.url("/closed")).await?.status, 200);

    redis.stop();
    // Fail open: the node counts locally, with a fresh local limiter of the
    // same shape, and keeps serving.
    for _ in 0..3 {
        let started = Instant::now();
        let got = send("GET", &node.url("/open"), &user("a"), b"").await?;
        assert_eq!(got.status, 200);
        // Bounded by the 200 ms Redis timeout, not the 5 s connect timeout.
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert_eq!(
        send("GET", &node.url("/open"), &user("a"), b"")
            .await?
            .status,
        429
    );
    // Fail closed: 503 with the limit named, and nothing reaches the
    // upstream.
    let reached = upstream.count();
    for _ in 0..4 {
        let started = Instant::now();
        let got = get(&node.url("/closed")).await?;
        assert_eq!(got.status, 503);
        assert_eq!(got.header("content-type"), Some("application/json"));
        assert_eq!(got.json()["error"], "ratelimit_unavailable");
        assert_eq!(got.json()["limit"], "route 1000/h");
        assert_eq!(got.header("retry-after"), Some("1"));
        assert!(started.elapsed() < Duration::from_secs(3));
    }
    assert_eq!(upstream.count(), reached);
    assert!(
        node.log_contains("global rate limit has no decision from redis; counting on this node")
    );
    assert!(node.log_contains("global rate limit has no decision from redis; answering 503"));

    redis.restart()?;
    // Every serving thread reconnects by itself: wait until the fail-closed
    // route has returned 200 ten times in a row (each request on a new
    // connection, so on every thread in turn).
    let started = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "the node did not reconnect to redis: {}",
            node.log()
        );
        in_a_row = if get(&node.url("/closed")).await?.status == 200 {
            in_a_row + 1
        } else {
            0
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Counting is global again: a new user's three requests are in Redis.
    for remaining in [2, 1, 0] {
        let got = send("GET", &node.url("/open"), &user("b"), b"").await?;
        assert_eq!(got.status, 200);
        assert_eq!(header_u64(&got, "ratelimit-remaining"), remaining);
    }
    assert_eq!(
        send("GET", &node.url("/open"), &user("b"), b"")
            .await?
            .status,
        429
    );
    let keys = redis.cli(&["--scan", "--pattern", "edge:rl:{open:*"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
    assert!(node.log_contains("redis replies again"));
    Ok(())
}

#[tokio::test]
async fn restarted_redis_costs_no_request() -> Result {
    let upstream = Upstream::echo().await;
    let mut redis = Redis::start()?;
    let config = format!(
        "[node]\nthreads = 1\n\n{}",
        outage_config(&upstream, &redis)
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/closed")).await?.status, 200);

    // No request arrives during the outage. The first one after it finds
    // the old connection broken, so its batch goes again on a new
    // connection. The requests after it wait for that connection instead of
    // failing while the node backs off.
    redis.restart()?;
    let mut statuses = Vec::new();
    for _ in 0..10 {
        statuses.push(get(&node.url("/closed")).await?.status.as_u16());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(statuses, [200; 10], "{}", node.log());
    // No decision failed, so the log has no recovery to report.
    assert!(
        !node.log().contains("redis replies again"),
        "{}",
        node.log()
    );

    // A burst that arrives together right after a restart shares one batch
    // on the broken connection: all of it goes again, none of it fails.
    redis.restart()?;
    let burst = concurrent(&node.url("/closed"), 20, &[]).await?;
    let statuses: Vec<u16> = burst.iter().map(|got| got.status.as_u16()).collect();
    assert_eq!(statuses, [200; 20], "{}", node.log());
    // Both restarts counted in the new server: the burst, nothing twice.
    let keys = redis.cli(&["--scan", "--pattern", "edge:rl:{closed:*"]);
    assert_eq!(keys.lines().count(), 1, "{keys}");
    let count = redis.cli(&["hget", keys.trim(), "c"]);
    assert_eq!(count, "20", "{}", redis.cli(&["hgetall", keys.trim()]));
    Ok(())
}

#[tokio::test]
async fn redis_back_within_the_timeout_costs_no_request() -> Result {
    let upstream = Upstream::echo().await;
    let mut redis = Redis::start()?;
    let config = format!(
        "[node]\nthreads = 1\n\n{}",
        outage_config(&upstream, &redis).replace("timeout = \"100ms\"", "timeout = \"3s\"")
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/closed")).await?.status, 200);

    // The burst finds the connection broken and Redis refusing connections
    // for a while; Redis is back well within the 3 s timeout.
    redis.stop();
    let url = node.url("/closed");
    let burst = tokio::spawn(async move { concurrent(&url, 20, &[]).await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    redis.start_again()?;
    let statuses: Vec<u16> = burst
        .await??
        .iter()
        .map(|got| got.status.as_u16())
        .collect();
    assert_eq!(statuses, [200; 20], "{}", node.log());
    Ok(())
}

/// Formats the config of a node with a fail-open and a fail-closed global
/// limit on `redis`, waiting at most 100 ms for it and 5 s to connect.
fn outage_config(upstream: &Upstream, redis: &Redis) -> String {
    format!(
        "[redis]\nurl = \"{}\"\ntimeout = \"100ms\"\nconnect_timeout = \"5s\"\n\n{}{}{}",
        redis.url(),
        app(upstream),
        route(
            "open",
            "/open",
            &limit("key = \"ip\"\nalgorithm = \"sliding_window\"\nrate = \"100000/min\"\nscope = \"global\"")
        ),
        route(
            "closed",
            "/closed",
            &limit("key = \"ip\"\nalgorithm = \"fixed_window\"\nrate = \"100000/min\"\nscope = \"global\"\non_redis_error = \"fail_closed\"")
        ),
    )
}

#[tokio::test]
async fn node_starting_on_hung_redis_waits_once() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let node = Node::start(&outage_config(&upstream, &redis))?;
    // No request has made a connection yet when Redis stops replying.
    redis.signal("-STOP");
    let mut waited = 0;
    for _ in 0..20 {
        let sent = Instant::now();
        assert_eq!(get(&node.url("/closed")).await?.status, 503);
        if sent.elapsed() >= Duration::from_millis(90) {
            waited += 1;
        }
    }
    // Each serving thread's first connection attempt is waited for, within
    // the 100 ms timeout, and not for the 5 s connect timeout.
    assert!(
        waited <= 4,
        "{waited} of 20 requests waited for the timeout"
    );
    redis.signal("-CONT");
    Ok(())
}

#[tokio::test]
async fn hung_redis_costs_at_most_its_timeout() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let node = Node::start(&outage_config(&upstream, &redis))?;
    assert_eq!(
        admitted(&concurrent(&node.url("/open"), 10, &[]).await?),
        10
    );

    redis.signal("-STOP");
    let (open_url, closed_url) = (node.url("/open"), node.url("/closed"));
    let started = Instant::now();
    let mut slowest = Duration::ZERO;
    let mut waited = 0;
    while started.elapsed() < Duration::from_millis(1500) {
        let sent = Instant::now();
        let (open, closed) = tokio::join!(get(&open_url), get(&closed_url));
        assert_eq!(open?.status, 200);
        assert_eq!(closed?.status, 503);
        slowest = slowest.max(sent.elapsed());
        if sent.elapsed() >= Duration::from_millis(90) {
            waited += 1;
        }
    }
    // The first requests wait out the 100 ms timeout, and the next ones the
    // attempt to reconnect right after the break, which has the same
    // timeout. Then a thread's requests fall back without waiting, also
    // while it tries to reconnect, so none waits for the 5 s connect
    // timeout, and only the first few pairs wait at all.
    assert!(slowest < Duration::from_secs(3), "slowest {slowest:?}");
    assert!(
        waited <= 6,
        "{waited} pairs of requests waited for the timeout"
    );

    redis.signal("-CONT");
    let started = Instant::now();
    let mut in_a_row = 0;
    while in_a_row < 10 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            node.log()
        );
        let ok = get(&node.url("/closed")).await?.status == 200;
        in_a_row = if ok { in_a_row + 1 } else { 0 };
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

/// Returns the number of connections Redis has accepted since it started.
fn connections_received(redis: &Redis) -> u64 {
    let stats = redis.cli(&["info", "stats"]);
    stats
        .lines()
        .find_map(|line| line.strip_prefix("total_connections_received:"))
        .and_then(|count| count.trim().parse().ok())
        .expect("INFO stats has total_connections_received")
}

#[tokio::test]
async fn paused_redis_backs_off() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    // One serving thread: one link to Redis.
    let config = format!(
        "[node]\nthreads = 1\n\n{}",
        outage_config(&upstream, &redis)
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/closed")).await?.status, 200);

    // A paused server (as during a failover) accepts connections but does
    // not run the script's commands, so each new connection times out too.
    let before = connections_received(&redis);
    redis.cli(&["client", "pause", "2500", "WRITE"]);
    let started = Instant::now();
    let (mut sent, mut waited) = (0, 0);
    while started.elapsed() < Duration::from_millis(2000) {
        let began = Instant::now();
        assert_eq!(get(&node.url("/closed")).await?.status, 503);
        sent += 1;
        if began.elapsed() >= Duration::from_millis(90) {
            waited += 1;
        }
    }
    let opened = connections_received(&redis) - before;
    // Before, every request waited out the 100 ms timeout on a new
    // connection: about 20 requests, 20 connections. Now the link backs off
    // (100, 200, 400, 800 ms) and requests fail at once in between.
    assert!(
        opened <= 8,
        "{opened} connections opened for {sent} requests"
    );
    assert!(waited <= 8, "{waited} of {sent} requests waited");
    assert!(sent >= 50, "only {sent} requests in 2 s");
    assert_eq!(
        upstream.count(),
        1,
        "a refused request reached the upstream"
    );

    let started = Instant::now();
    while get(&node.url("/closed")).await?.status != 200 {
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{}",
            node.log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(node.log_contains("redis replies again"));
    assert_eq!(node.log().matches("redis replies again").count(), 1);
    Ok(())
}

#[tokio::test]
async fn wrong_type_key_fails_only_its_request() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let fields = "key = \"header:x-api-key\"\nalgorithm = \"token_bucket\"\nrate = \"1000/s\"\n\
                  scope = \"global\"\non_redis_error = \"fail_closed\"";
    // One serving thread, so that the two keys' requests share batches.
    let config = format!(
        "[node]\nthreads = 1\n\n{}",
        limited_config(&redis, &upstream, fields)
    );
    let node = Node::start(&config)?;
    let bad = [("x-api-key", "bad")];
    assert_eq!(send("GET", &node.url("/"), &bad, b"").await?.status, 200);
    // Another program's value of another type under the bad key's name.
    let keys = redis.cli(&["--scan", "--pattern", "edge:rl:*"]);
    let key = keys.trim();
    assert_eq!(keys.lines().count(), 1, "{keys}");
    redis.cli(&["del", key]);
    redis.cli(&["rpush", key, "a"]);

    let url = node.url("/");
    let (good, bad) = tokio::join!(
        concurrent(&url, 20, &[("x-api-key", "good")]),
        concurrent(&url, 20, &[("x-api-key", "bad")]),
    );
    let (good, bad) = (good?, bad?);
    assert_eq!(
        count(&good, 200),
        20,
        "a good key failed beside the bad one"
    );
    assert_eq!(count(&bad, 503), 20);
    // The first request and the good key's.
    assert_eq!(
        upstream.count(),
        21,
        "a refused request reached the upstream"
    );
    assert!(
        node.log_contains("redis cannot decide for this key: WRONGTYPE"),
        "{}",
        node.log()
    );
    // Redis replied to every batch: no outage to report.
    assert!(
        !node.log().contains("redis replies again"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test]
async fn redis_killed_under_load_never_fails_a_request() -> Result {
    let upstream = Upstream::echo().await;
    let mut redis = Redis::start()?;
    let node = Node::start(&outage_config(&upstream, &redis))?;
    let url = node.url("/open");
    let load = tokio::spawn(async move {
        let mut statuses = Vec::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            for got in concurrent(&url, 16, &[]).await? {
                statuses.push(got.status.as_u16());
            }
        }
        Ok::<_, Box<dyn std::error::Error + Send + Sync>>(statuses)
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    redis.stop();
    let statuses = load.await??;
    assert!(statuses.len() > 100, "{}", statuses.len());
    assert!(statuses.iter().all(|&s| s == 200), "{statuses:?}");
    assert!(
        node.log_contains("global rate limit has no decision from redis; counting on this node")
    );
    Ok(())
}

#[tokio::test]
async fn skewed_node_clock_agrees_on_a_global_limit() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "{}{}{}{}",
        redis_table(&redis),
        app(&upstream),
        route(
            "global",
            "/global",
            &limit("key = \"route\"\nalgorithm = \"fixed_window\"\nrate = \"30/min\"\nscope = \"global\"")
        ),
        route(
            "local",
            "/local",
            &limit("key = \"route\"\nalgorithm = \"fixed_window\"\nrate = \"30/min\"")
        ),
    );
    let nodes = [
        Node::start(&config)?,
        Node::start_with_env(&config, &[("EDGE_TEST_CLOCK_OFFSET", "+150s")])?,
        Node::start_with_env(&config, &[("EDGE_TEST_CLOCK_OFFSET", "-200s")])?,
    ];
    wait_for_window(Duration::from_secs(60), Duration::from_secs(5)).await;

    // The offset is real: local windows on the skewed nodes end at other
    // times (30 s and 20 s apart from the unskewed node's).
    let local_resets: Vec<i64> =
        futures_util::future::join_all(nodes.iter().map(|n| get_reset(n.url("/local"))))
            .await
            .into_iter()
            .collect::<Result<_>>()?;
    assert!(
        (local_resets[0] - local_resets[1]).abs() >= 25,
        "{local_resets:?}"
    );
    assert!(
        (local_resets[0] - local_resets[2]).abs() >= 15,
        "{local_resets:?}"
    );

    // The global window is Redis's: every node reports the same reset, and
    // together they admit the limit exactly.
    let mut resets = Vec::new();
    let mut total = 0;
    for node in &nodes {
        let responses = concurrent(&node.url("/global"), 20, &[]).await?;
        total += admitted(&responses);
        resets.extend(responses.iter().map(|r| header_u64(r, "ratelimit-reset")));
    }
    assert_eq!(total, 30);
    let (min, max) = (resets.iter().min().unwrap(), resets.iter().max().unwrap());
    assert!(max - min <= 1, "resets {min}..{max}");
    Ok(())
}

async fn get_reset(url: String) -> Result<i64> {
    Ok(header_u64(&get(&url).await?, "ratelimit-reset") as i64)
}

/// Starts a node whose one route has a leaky bucket in queue mode of `scope`
/// with `rate` and `queue`, and its Redis and upstream. It warms the
/// connection to Redis with one request, then lets the bucket drain for
/// `drain`.
async fn queued_node(
    scope: &str,
    rate: &str,
    queue: u32,
    drain: Duration,
) -> Result<(Node, Upstream, Redis)> {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "{}{}{}",
        redis_table(&redis),
        app(&upstream),
        route(
            "queued",
            "/",
            &limit(&format!(
                "key = \"route\"\nalgorithm = \"leaky_bucket\"\nrate = \"{rate}\"\nmode = \"queue\"\nqueue = {queue}\nscope = \"{scope}\""
            ))
        ),
    );
    let node = Node::start(&config)?;
    get(&node.url("/")).await?;
    tokio::time::sleep(drain).await;
    Ok((node, upstream, redis))
}

async fn leaky_queue_releases_at_the_rate(scope: &str) -> Result {
    // One request per 100 ms; four may wait.
    let (node, _upstream, _redis) =
        queued_node(scope, "10/s", 4, Duration::from_millis(300)).await?;

    let started = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let url = node.url("/");
        tasks.spawn(async move {
            let got = get(&url).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((got, started.elapsed()))
        });
    }
    let mut passed = Vec::new();
    let mut refused = Vec::new();
    while let Some(result) = tasks.join_next().await {
        let (got, at) = result??;
        match got.status.as_u16() {
            200 => passed.push(at),
            429 => refused.push((got, at)),
            other => panic!("unexpected status {other}"),
        }
    }
    // One at once and four queued; the rest is rejected without waiting.
    assert_eq!(passed.len(), 5, "{scope}");
    assert_eq!(refused.len(), 3, "{scope}");
    passed.sort();
    for (got, at) in &refused {
        assert_eq!(got.header("retry-after"), Some("1"));
        // Before the second queued request is released, 200 ms in.
        assert!(
            *at < passed[2],
            "{scope}: rejected after {at:?}, {passed:?}"
        );
    }
    // Released one per 100 ms: the i-th is never out before i * 100 ms (a
    // timer fires late under load, never early), nor much later.
    for (i, at) in passed.iter().enumerate() {
        let due = Duration::from_millis(100 * i as u64);
        assert!(*at + Duration::from_millis(5) >= due, "{scope}: {passed:?}");
    }
    assert!(
        passed[4] < Duration::from_millis(1500),
        "{scope}: {passed:?}"
    );
    Ok(())
}

#[tokio::test]
async fn local_leaky_queue_releases_at_the_rate() -> Result {
    leaky_queue_releases_at_the_rate("local").await
}

#[tokio::test]
async fn global_leaky_queue_releases_at_the_rate() -> Result {
    leaky_queue_releases_at_the_rate("global").await
}

/// Clients that go away while queued give their places back: a request
/// that comes after them is admitted at the next turn of the rate, instead
/// of being refused because the queue looks full, or waiting behind them.
async fn leaky_queue_forgets_clients_that_left(scope: &str) -> Result {
    // One request per 500 ms; three may wait.
    let (node, upstream, _redis) = queued_node(scope, "2/s", 3, Duration::from_millis(600)).await?;

    // One request leaves at once and takes the bucket's only turn now.
    let started = Instant::now();
    assert_eq!(get(&node.url("/")).await?.status, 200);
    // Three clients queue behind it (turns at 500, 1000 and 1500 ms), then
    // go away before their turns.
    let mut streams = Vec::new();
    for _ in 0..3 {
        let mut stream = tokio::net::TcpStream::connect(node.addr).await?;
        stream
            .write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n")
            .await?;
        streams.push(stream);
    }
    tokio::time::sleep(Duration::from_millis(150)).await;
    drop(streams);
    tokio::time::sleep(Duration::from_millis(150)).await;
    let received = upstream.count();

    // Had they kept their places, the queue would be full and this would be
    // refused. Now it takes the first turn, 500 ms after the first request.
    let got = get(&node.url("/")).await?;
    let at = started.elapsed();
    assert_eq!(
        got.status,
        200,
        "{scope}: {:?}",
        String::from_utf8_lossy(&got.body)
    );
    assert!(
        at >= Duration::from_millis(495),
        "{scope}: admitted after {at:?}"
    );
    assert!(
        at < Duration::from_millis(900),
        "{scope}: admitted after {at:?}"
    );
    // The clients that left never reached the upstream.
    assert_eq!(upstream.count(), received + 1, "{scope}");
    // The next one keeps the rate: its turn is 500 ms later still.
    let got = get(&node.url("/")).await?;
    let at = started.elapsed();
    assert_eq!(got.status, 200, "{scope}");
    assert!(
        at >= Duration::from_millis(995),
        "{scope}: admitted after {at:?}"
    );
    Ok(())
}

#[tokio::test]
async fn local_leaky_queue_forgets_clients_that_left() -> Result {
    leaky_queue_forgets_clients_that_left("local").await
}

#[tokio::test]
async fn global_leaky_queue_forgets_clients_that_left() -> Result {
    leaky_queue_forgets_clients_that_left("global").await
}

/// The same limits, local and global: every request gets the same status
/// and headers from both. The reset and Retry-After may differ by a second,
/// because the two clocks are read a moment apart.
#[tokio::test]
async fn global_limits_answer_like_local_ones() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let shapes = [
        (
            "tb",
            "algorithm = \"token_bucket\"\nrate = \"6/min\"\nburst = 3",
        ),
        (
            "lb",
            "algorithm = \"leaky_bucket\"\nrate = \"6/min\"\nburst = 2",
        ),
        ("fw", "algorithm = \"fixed_window\"\nrate = \"4/min\""),
        ("sw", "algorithm = \"sliding_window\"\nrate = \"4/min\""),
    ];
    let mut routes = String::new();
    for (name, shape) in shapes {
        for scope in ["local", "global"] {
            routes.push_str(&route(
                &format!("{scope}-{name}"),
                &format!("/{scope}/{name}"),
                &limit(&format!("key = \"route\"\n{shape}\nscope = \"{scope}\"")),
            ));
        }
    }
    let config = format!("{}{}{routes}", redis_table(&redis), app(&upstream));
    let node = Node::start(&config)?;
    wait_for_window(Duration::from_secs(60), Duration::from_secs(5)).await;
    for (name, _) in shapes {
        for request in 0..6 {
            let local = get(&node.url(&format!("/local/{name}"))).await?;
            let global = get(&node.url(&format!("/global/{name}"))).await?;
            let context = format!("{name}, request {request}");
            assert_eq!(local.status, global.status, "{context}");
            for header in [
                "ratelimit-limit",
                "ratelimit-remaining",
                "x-rate-limit-remaining",
            ] {
                assert_eq!(
                    local.header(header),
                    global.header(header),
                    "{context}: {header}"
                );
            }
            for header in ["ratelimit-reset", "retry-after"] {
                let (l, g) = (local.header(header), global.header(header));
                assert_eq!(l.is_some(), g.is_some(), "{context}: {header}");
                if let (Some(l), Some(g)) = (l, g) {
                    let (l, g): (i64, i64) = (l.parse()?, g.parse()?);
                    assert!((l - g).abs() <= 1, "{context}: {header} {l} and {g}");
                }
            }
        }
    }
    Ok(())
}

#[tokio::test]
async fn flushed_scripts_are_loaded_again() -> Result {
    let upstream = Upstream::echo().await;
    let redis = Redis::start()?;
    let config = format!(
        "{}{}{}",
        redis_table(&redis),
        app(&upstream),
        route(
            "api",
            "/",
            &limit("key = \"route\"\nalgorithm = \"token_bucket\"\nrate = \"10/h\"\nscope = \"global\"\non_redis_error = \"fail_closed\"")
        ),
    );
    let node = Node::start(&config)?;
    let first = get(&node.url("/")).await?;
    assert_eq!(header_u64(&first, "ratelimit-remaining"), 9);
    assert_eq!(redis.cli(&["script", "flush"]), "OK");
    // The connection stays up; its next EVALSHA gets NOSCRIPT, loads the
    // script and runs it, and the count goes on.
    for remaining in [8, 7] {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(header_u64(&got, "ratelimit-remaining"), remaining);
    }
    assert!(
        !node.log().contains("no decision from redis"),
        "{}",
        node.log()
    );
    Ok(())
}

#[test]
fn script_applies_one_limit_argument_to_every_key() -> Result {
    let redis = Redis::start()?;
    let script = edge::ratelimit::redis::SCRIPT;
    // A token bucket of one request per second and a burst of 2, as one
    // argument for three keys: the first key takes both places.
    let bucket = "1 1000000 2 0 1";
    let shared = redis.cli(&["eval", script, "3", "{t}:a", "{t}:a", "{t}:b", bucket]);
    let decisions: Vec<&str> = shared.split(',').collect();
    assert_eq!(decisions.len(), 3, "{shared}");
    assert_eq!(decisions[0], "1 2 1 1000000 0 0 1", "{shared}");
    assert_eq!(decisions[1], "1 2 0 2000000 0 0 1", "{shared}");
    assert_eq!(decisions[2], "1 2 1 1000000 0 0 1", "{shared}");
    // One argument per key: a bucket and a fixed window of 5 per minute.
    let window = "2 60000000 5";
    let mixed = redis.cli(&["eval", script, "2", "{t}:c", "{t}:d", bucket, window]);
    let decisions: Vec<&str> = mixed.split(',').collect();
    assert_eq!(decisions.len(), 2, "{mixed}");
    assert_eq!(decisions[0], "1 2 1 1000000 0 0 1", "{mixed}");
    assert!(decisions[1].starts_with("1 5 4 "), "{mixed}");
    let wrong = redis.cli(&[
        "eval", script, "3", "{t}:e", "{t}:f", "{t}:g", bucket, bucket,
    ]);
    assert_eq!(
        wrong,
        "ERR expected one ARGV entry or one per key, got 2 for 3 keys"
    );
    Ok(())
}

#[test]
fn script_counts_repeated_keys_in_one_call() -> Result {
    let redis = Redis::start()?;
    let script = edge::ratelimit::redis::SCRIPT;
    let allowed =
        |reply: &str| -> Vec<bool> { reply.split(',').map(|d| d.starts_with("1 ")).collect() };

    // A fixed and a sliding window of 3 a minute, five requests each for
    // one key in one call: three admitted, and the stored count is 3.
    for (algorithm, key) in [("2", "{t}:fixed"), ("3", "{t}:sliding")] {
        let spec = format!("{algorithm} 60000000 3");
        let reply = redis.cli(&["eval", script, "5", key, key, key, key, key, &spec]);
        assert_eq!(allowed(&reply), [true, true, true, false, false], "{reply}");
        assert_eq!(redis.cli(&["hget", key, "c"]), "3", "{algorithm}");
        let ttl: i64 = redis.cli(&["pttl", key]).parse()?;
        assert!(ttl > 0, "{algorithm}: the key has an expiry, got {ttl}");
        // The next call reads what the first wrote.
        let reply = redis.cli(&["eval", script, "1", key, &spec]);
        assert_eq!(allowed(&reply), [false], "{reply}");
    }

    // A token bucket of one a second with a burst of 2: two of four
    // admitted. A give back (algorithm 4) in the same call returns one
    // place, which the last request takes.
    let bucket = "1 1000000 2 0 1";
    let key = "{t}:bucket";
    let reply = redis.cli(&["eval", script, "4", key, key, key, key, bucket]);
    assert_eq!(allowed(&reply), [true, true, false, false], "{reply}");
    let reply = redis.cli(&["eval", script, "2", key, key, "4 1000000", bucket]);
    let decisions: Vec<&str> = reply.split(',').collect();
    assert_eq!(decisions[0], "", "{reply}");
    assert!(decisions[1].starts_with("1 "), "{reply}");
    let ttl: i64 = redis.cli(&["pttl", key]).parse()?;
    assert!(ttl > 0, "the bucket has an expiry, got {ttl}");
    Ok(())
}

#[tokio::test]
async fn repeated_key_header_is_rejected() -> Result {
    let upstream = Upstream::echo().await;
    let limits = limit(
        "name = \"per_key\"\nkey = \"header:x-api-key\"\nalgorithm = \"token_bucket\"\nrate = \"3/h\"",
    );
    let config = format!("{}{}", app(&upstream), route("api", "/", &limits));
    let node = Node::start(&config)?;

    // A second value would otherwise start a fresh count on every request.
    for second in ["b1", "b2", "b3", "b4"] {
        let got = send(
            "GET",
            &node.url("/"),
            &[("x-api-key", "a"), ("x-api-key", second)],
            b"",
        )
        .await?;
        assert_eq!(got.status, 400);
        assert_eq!(got.json()["error"], "repeated_key_header");
        assert_eq!(got.json()["limit"], "per_key");
        let message = got.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("x-api-key"), "{message}");
        assert_eq!(got.header("content-type"), Some("application/json"));
    }
    assert_eq!(upstream.count(), 0);

    // One value is counted as before.
    let single = send("GET", &node.url("/"), &[("x-api-key", "a")], b"").await?;
    assert_eq!(single.status, 200);
    assert_eq!(header_u64(&single, "ratelimit-remaining"), 2);
    assert_eq!(upstream.count(), 1);
    Ok(())
}
