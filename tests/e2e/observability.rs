//! Observability: the RED metrics after known traffic, the request id,
//! duration and node headers, trace context, the access log, readiness
//! during a drain, and the status page in a headless Chromium.

use std::collections::HashMap;
use std::time::Duration;

use crate::harness::{get, raw_request, send, Got, Node, Reply, Result, Upstream};

const TOKEN: &str = "observability-admin-token";

fn admin_table() -> String {
    format!("[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n")
}

/// Returns the config of a node with the admin listener and one route,
/// `api`, from `/` to `upstream`.
fn admin_api_config(upstream: &Upstream) -> String {
    format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        admin_table(),
        upstream.addr
    )
}

fn fixture_route(name: &str, mode: &str, extra: &str, config: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"/{name}\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n{extra}\n\
         [routes.workers.config]\nmode = \"{mode}\"\n{config}\n\n"
    )
}

/// GETs an admin path with the bearer token.
async fn admin_get(node: &Node, path: &str) -> Result<Got> {
    let url = format!("{}{path}", node.admin_url.as_ref().expect("admin listener"));
    let bearer = format!("Bearer {TOKEN}");
    send("GET", &url, &[("authorization", &bearer)], b"").await
}

/// The samples of a scrape, as (metric name, labels, value); a histogram
/// counts as its `+Inf` bucket.
type Samples = Vec<(String, HashMap<String, String>, f64)>;

async fn scrape(node: &Node) -> Result<Samples> {
    let got = admin_get(node, "/metrics").await?;
    assert_eq!(got.status, 200);
    assert!(got
        .header("content-type")
        .unwrap()
        .starts_with("text/plain"));
    let text = String::from_utf8(got.body.to_vec())?;
    let lines = text.lines().map(|line| Ok(line.to_owned()));
    let parsed = prometheus_parse::Scrape::parse(lines)?;
    let samples = parsed
        .samples
        .into_iter()
        .map(|sample| {
            let value = match sample.value {
                prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Untyped(v) => v,
                prometheus_parse::Value::Histogram(buckets) => {
                    buckets.last().map_or(0.0, |bucket| bucket.count)
                }
                prometheus_parse::Value::Summary(_) => f64::NAN,
            };
            let labels = sample
                .labels
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect();
            (sample.metric, labels, value)
        })
        .collect();
    Ok(samples)
}

/// Sums the samples of `metric` whose labels include `labels`.
fn total(samples: &Samples, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|(name, have, _)| {
            name == metric
                && labels
                    .iter()
                    .all(|(k, v)| have.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|(_, _, value)| value)
        .sum()
}

#[tokio::test]
async fn unparsed_requests_are_counted() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&admin_api_config(&upstream))?;
    // Conflicting lengths, and more than 100 header fields: hyper's 400 and
    // 431, before routing or the access log.
    let many_fields: String = (0..101).map(|n| format!("X-{n}: 1\r\n")).collect();
    let requests = [
        "POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!"
            .to_owned(),
        format!("GET /x HTTP/1.1\r\nHost: a\r\n{many_fields}\r\n"),
    ];
    for (request, status) in requests.iter().zip(["400", "431"]) {
        let response = raw_request(node.addr, request).await?;
        assert!(
            response.starts_with(&format!("HTTP/1.1 {status}")),
            "{response}"
        );
    }
    let samples = scrape(&node).await?;
    assert_eq!(total(&samples, "edge_unparsed_requests_total", &[]), 2.0);
    assert!(node.log_contains("hyper could not read its head"));
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn metrics_count_each_reason() -> Result {
    let app = Upstream::echo().await;
    let failing = Upstream::start(|_| Reply::Status(503)).await;
    let mut config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [upstreams.failing]\ntargets = [\"{}\"]\n\
         [upstreams.failing.retry]\nmax_retries = 0\n\
         [upstreams.failing.breaker]\nconsecutive_failures = 1\ncool_down = \"60s\"\n\n\
         [[routes]]\nname = \"ok\"\nprefix = \"/ok\"\nupstream = \"app\"\n\n\
         [[routes]]\nname = \"limited\"\nprefix = \"/limited\"\nupstream = \"app\"\n\
         [[routes.limits]]\nname = \"per-route\"\nkey = \"route\"\n\
         algorithm = \"token_bucket\"\nrate = \"1/min\"\nburst = 1\n\n\
         [[routes]]\nname = \"failing\"\nprefix = \"/failing\"\nupstream = \"failing\"\n\n",
        admin_table(),
        app.addr,
        failing.addr
    );
    config.push_str(&fixture_route("auth", "respond", "", "status = 401"));
    config.push_str(&fixture_route("panics", "panic", "", ""));
    config.push_str(&fixture_route(
        "loops",
        "loop",
        "cpu_deadline = \"5ms\"",
        "",
    ));
    let node = Node::start(&config)?;

    let before = scrape(&node).await?;
    assert_eq!(total(&before, "edge_requests_total", &[]), 0.0);
    for _ in 0..3 {
        assert_eq!(get(&node.url("/ok/x")).await?.status, 200);
    }
    assert_eq!(get(&node.url("/limited")).await?.status, 200);
    assert_eq!(get(&node.url("/limited")).await?.status, 429);
    assert_eq!(get(&node.url("/failing")).await?.status, 503);
    let open = get(&node.url("/failing")).await?;
    assert_eq!(open.json()["error"], "circuit_open");
    assert_eq!(get(&node.url("/auth")).await?.status, 401);
    assert_eq!(get(&node.url("/panics")).await?.status, 500);
    assert_eq!(get(&node.url("/loops")).await?.status, 503);
    assert_eq!(get(&node.url("/nowhere")).await?.status, 404);

    let after = scrape(&node).await?;
    let requests = |labels: &[(&str, &str)]| total(&after, "edge_requests_total", labels);
    let cases: [(&[(&str, &str)], f64); 10] = [
        (
            &[
                ("route", "ok"),
                ("upstream", "app"),
                ("status_class", "2xx"),
                ("reason", "proxied"),
            ],
            3.0,
        ),
        (&[("route", "limited"), ("reason", "proxied")], 1.0),
        (
            &[
                ("route", "limited"),
                ("upstream", "none"),
                ("status_class", "4xx"),
                ("reason", "rate_limited"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "failing"),
                ("upstream", "failing"),
                ("status_class", "5xx"),
                ("reason", "proxied"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "failing"),
                ("status_class", "5xx"),
                ("reason", "circuit_open"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "auth"),
                ("status_class", "4xx"),
                ("reason", "auth_failed"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "panics"),
                ("status_class", "5xx"),
                ("reason", "worker_failed"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "loops"),
                ("status_class", "5xx"),
                ("reason", "worker_timeout"),
            ],
            1.0,
        ),
        (
            &[
                ("route", "none"),
                ("upstream", "none"),
                ("reason", "no_route"),
            ],
            1.0,
        ),
        (&[], 11.0),
    ];
    for (labels, expected) in cases {
        assert_eq!(requests(labels), expected, "edge_requests_total{labels:?}");
    }
    assert_eq!(
        total(&after, "edge_request_duration_seconds", &[("route", "ok")]),
        3.0
    );
    assert_eq!(
        total(
            &after,
            "edge_upstream_duration_seconds",
            &[("route", "ok"), ("upstream", "app")]
        ),
        3.0
    );
    assert_eq!(
        total(
            &after,
            "edge_worker_duration_seconds",
            &[
                ("route", "auth"),
                ("module", "fixture-worker.wasm"),
                ("phase", "request")
            ]
        ),
        1.0
    );
    let target = failing.addr.to_string();
    assert_eq!(
        total(
            &after,
            "edge_breaker_state",
            &[("upstream", "failing"), ("target", &target)]
        ),
        1.0
    );
    assert_eq!(
        total(
            &after,
            "edge_breaker_opened_total",
            &[("upstream", "failing")]
        ),
        1.0
    );
    let limit = [("route", "limited"), ("limit", "per-route")];
    let decision = |kind| {
        let mut labels = limit.to_vec();
        labels.push(("decision", kind));
        total(&after, "edge_ratelimit_decisions_total", &labels)
    };
    assert_eq!(decision("allowed"), 1.0);
    assert_eq!(decision("rejected"), 1.0);
    assert_eq!(total(&after, "edge_worker_instances_max", &[]), 128.0);
    assert_eq!(total(&after, "edge_worker_instances", &[]), 0.0);
    assert_eq!(
        total(
            &after,
            "edge_worker_module_info",
            &[("module", "fixture-worker.wasm")]
        ),
        1.0
    );
    assert_eq!(total(&after, "edge_worker_modules_loaded", &[]), 1.0);
    // The node keeps its connections to the echo upstream open for reuse.
    assert!(total(&after, "edge_upstream_connections", &[("upstream", "app")]) >= 1.0);
    // No path, client address or user id becomes a label.
    for (_, labels, _) in &after {
        for value in labels.values() {
            assert!(!value.starts_with('/'), "a path as a label: {labels:?}");
            assert!(!value.contains("/x"), "a path as a label: {labels:?}");
        }
        assert!(!labels.contains_key("path"));
        assert!(!labels.contains_key("client"));
    }
    Ok(())
}

#[tokio::test]
async fn headers_carry_id_duration_and_node() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[node]\nname = \"edge-obs-1\"\n\n[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n\n\
         [[routes]]\nname = \"quiet\"\nprefix = \"/quiet\"\nupstream = \"app\"\n\
         [routes.observability]\nrequest_id = false\nrequest_duration = false\n\
         gateway_node = false\ntrace_context = false\n",
        upstream.addr
    );
    let node = Node::start(&config)?;

    let got = get(&node.url("/api/a")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.header("x-gateway-node"), Some("edge-obs-1"));
    let duration = got
        .header("x-request-duration")
        .expect("x-request-duration");
    let number = duration.strip_suffix("ms").expect("a value in ms");
    let (whole, fraction) = number.split_once('.').expect("three decimals");
    assert!(whole.bytes().all(|b| b.is_ascii_digit()), "{duration}");
    assert_eq!(fraction.len(), 3, "{duration}");
    let generated = got.header("x-request-id").expect("x-request-id").to_owned();
    assert_eq!(generated.len(), 32);
    assert!(generated.bytes().all(|b| b.is_ascii_hexdigit()));
    assert_eq!(upstream.last().headers["x-request-id"], generated.as_str());

    // A valid client id is kept and reaches the upstream.
    let got = send(
        "GET",
        &node.url("/api/b"),
        &[("x-request-id", "client-id.42")],
        b"",
    )
    .await?;
    assert_eq!(got.header("x-request-id"), Some("client-id.42"));
    assert_eq!(upstream.last().headers["x-request-id"], "client-id.42");

    // An invalid one is replaced, on the response and upstream alike.
    let long = "a".repeat(200);
    for bad in ["has space", "quote\"d", long.as_str()] {
        let got = send("GET", &node.url("/api/c"), &[("x-request-id", bad)], b"").await?;
        let id = got.header("x-request-id").expect("x-request-id");
        assert_ne!(id, bad);
        assert_eq!(id.len(), 32, "{bad:?}");
        assert_eq!(upstream.last().headers["x-request-id"], id);
    }

    // Refusals carry the headers too.
    let missing = get(&node.url("/nowhere")).await?;
    assert_eq!(missing.status, 404);
    assert!(missing.header("x-request-id").is_some());
    assert_eq!(missing.header("x-gateway-node"), Some("edge-obs-1"));

    // A route can turn each off.
    let quiet = send(
        "GET",
        &node.url("/quiet"),
        &[("x-request-id", "kept-as-sent")],
        b"",
    )
    .await?;
    assert_eq!(quiet.status, 200);
    for name in ["x-request-id", "x-request-duration", "x-gateway-node"] {
        assert!(quiet.header(name).is_none(), "{name} on a quiet route");
    }
    let seen = upstream.last().headers;
    assert_eq!(seen["x-request-id"], "kept-as-sent");
    assert!(seen.get("traceparent").is_none());
    Ok(())
}

/// Splits a `traceparent` into trace id, parent id and flags.
fn trace_parts(value: &str) -> (String, String, String) {
    let parts: Vec<&str> = value.split('-').collect();
    assert_eq!(parts.len(), 4, "{value}");
    assert_eq!(parts[0], "00");
    (
        parts[1].to_owned(),
        parts[2].to_owned(),
        parts[3].to_owned(),
    )
}

#[tokio::test]
async fn traceparent_continued_or_started() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;

    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let got = send(
        "GET",
        &node.url("/continued"),
        &[("traceparent", client), ("tracestate", "vendor=abc")],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    let seen = upstream.last().headers;
    let (trace, parent, flags) = trace_parts(seen["traceparent"].to_str()?);
    assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_ne!(
        parent, "00f067aa0ba902b7",
        "the node's span is the new parent"
    );
    assert_eq!(parent.len(), 16);
    assert_eq!(flags, "01");
    assert_eq!(seen["tracestate"], "vendor=abc");

    // Absent: a new trace starts.
    get(&node.url("/started")).await?;
    let seen = upstream.last().headers;
    let (trace, parent, _) = trace_parts(seen["traceparent"].to_str()?);
    assert_eq!(trace.len(), 32);
    assert_ne!(trace, "0".repeat(32));
    assert_ne!(parent, "0".repeat(16));

    // Invalid: a new trace starts and the client's tracestate is dropped.
    let invalid = "00-00000000000000000000000000000000-00f067aa0ba902b7-01";
    send(
        "GET",
        &node.url("/invalid"),
        &[("traceparent", invalid), ("tracestate", "vendor=abc")],
        b"",
    )
    .await?;
    let seen = upstream.last().headers;
    let (trace, _, _) = trace_parts(seen["traceparent"].to_str()?);
    assert_ne!(trace, "0".repeat(32));
    assert!(seen.get("tracestate").is_none());
    Ok(())
}

#[tokio::test]
async fn access_log_lines_carry_fields_without_secrets() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[node]\nname = \"edge-log\"\n\n[access_log]\npath = \"access.log\"\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n\n{}",
        upstream.addr,
        fixture_route(
            "who",
            "context-set",
            "",
            "name = \"user\"\nfrom_header = \"x-login\""
        )
    );
    let node = Node::start(&config)?;
    let got = send(
        "GET",
        &node.url(
            "/api/items?page=2&access_token=tok-SECRET-1&api_key=key-SECRET-2\
             &password=pw-SECRET-3;Refresh=rf-SECRET-6;q=x",
        ),
        &[
            ("authorization", "Bearer auth-SECRET-4"),
            ("cookie", "session=cookie-SECRET-5"),
            ("x-request-id", "log-test-1"),
        ],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    let posted = send("POST", &node.url("/api/upload"), &[], b"0123456789").await?;
    assert_eq!(posted.status, 200);
    assert_eq!(get(&node.url("/missing")).await?.status, 404);
    let who = send("GET", &node.url("/who"), &[("x-login", "alice")], b"").await?;
    assert_eq!(who.status, 200);

    let path = node.dir().join("access.log");
    let lines = access_log_lines(&path, 4).await?;
    let text = std::fs::read_to_string(&path)?;
    for secret in ["SECRET", "auth-", "cookie-"] {
        assert!(!text.contains(secret), "{secret} in the access log: {text}");
    }
    let first = &lines[0];
    assert_eq!(first["node"], "edge-log");
    assert_eq!(first["request_id"], "log-test-1");
    assert_eq!(first["method"], "GET");
    assert_eq!(first["path"], "/api/items");
    assert_eq!(
        first["query"],
        "page=2&access_token=REDACTED&api_key=REDACTED&password=REDACTED;Refresh=REDACTED;q=x"
    );
    assert_eq!(first["route"], "api");
    assert_eq!(first["upstream"], "app");
    assert_eq!(first["target"], upstream.addr.to_string());
    assert_eq!(first["status"], 200);
    assert_eq!(first["reason"], "proxied");
    assert_eq!(first["completed"], true);
    assert_eq!(first["client"], "127.0.0.1");
    assert_eq!(first["trace_id"].as_str().map(str::len), Some(32));
    assert!(first["bytes_out"].as_u64().unwrap() > 0);
    assert!(first["time"].as_str().unwrap().ends_with('Z'));
    for stage in [
        "total",
        "head",
        "gateway",
        "ratelimit",
        "workers",
        "upstream",
    ] {
        assert!(
            first["durations_ms"][stage].is_number(),
            "durations_ms.{stage}"
        );
    }
    assert!(first["user"].is_null());
    assert_eq!(lines[1]["method"], "POST");
    assert_eq!(lines[1]["bytes_in"], 10);
    assert_eq!(lines[2]["status"], 404);
    assert_eq!(lines[2]["reason"], "no_route");
    assert!(lines[2]["route"].is_null());
    assert_eq!(lines[3]["route"], "who");
    assert_eq!(lines[3]["user"], "alice");
    Ok(())
}

#[tokio::test]
async fn access_log_keeps_requests_clients_gave_up() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let config = format!(
        "[access_log]\npath = \"access.log\"\n\n[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"slow\"\nupstream = \"app\"\n",
        slow.addr
    );
    let node = Node::start(&config)?;
    // The client gives up before the upstream's response head.
    let url = node.url("/abandoned");
    let gave_up = tokio::time::timeout(Duration::from_millis(300), get(&url)).await;
    assert!(gave_up.is_err(), "the request finished: {gave_up:?}");

    let lines = access_log_lines(&node.dir().join("access.log"), 1).await?;
    let line = &lines[0];
    assert_eq!(line["status"], 499, "{line}");
    assert_eq!(line["reason"], "client_closed", "{line}");
    assert_eq!(line["path"], "/abandoned", "{line}");
    assert_eq!(line["route"], "slow", "{line}");
    assert_eq!(line["completed"], false, "{line}");
    Ok(())
}

/// Waits up to five seconds for the file at `path` to have `lines` lines,
/// and returns them parsed.
async fn access_log_lines(path: &std::path::Path, lines: usize) -> Result<Vec<serde_json::Value>> {
    let mut text = String::new();
    for _ in 0..100 {
        text = std::fs::read_to_string(path).unwrap_or_default();
        if text.lines().count() >= lines {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let parsed: Vec<serde_json::Value> = text
        .lines()
        .map(serde_json::from_str)
        .collect::<std::result::Result<_, _>>()?;
    assert_eq!(parsed.len(), lines, "{text}");
    Ok(parsed)
}

#[tokio::test]
async fn access_log_sighup_and_client() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n\
         [access_log]\npath = \"access.log\"\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    let path = node.dir().join("access.log");
    // Behind a trusted proxy the log names the client, not the proxy.
    let first = send(
        "GET",
        &node.url("/one"),
        &[("x-forwarded-for", "203.0.113.7")],
        b"",
    )
    .await?;
    assert_eq!(first.status, 200);
    let lines = access_log_lines(&path, 1).await?;
    assert_eq!(lines[0]["client"], "203.0.113.7");

    // logrotate moves the file and sends SIGHUP: new lines go to a new file.
    let rotated = node.dir().join("access.log.1");
    std::fs::rename(&path, &rotated)?;
    node.signal("HUP");
    assert!(node.log_contains("reopened the access log"));
    assert_eq!(get(&node.url("/two")).await?.status, 200);
    let lines = access_log_lines(&path, 1).await?;
    assert_eq!(lines[0]["path"], "/two");
    assert_eq!(lines[0]["client"], "127.0.0.1");
    let old = access_log_lines(&rotated, 1).await?;
    assert_eq!(old[0]["path"], "/one");
    Ok(())
}

#[tokio::test]
async fn access_log_survives_failed_writes() -> Result {
    let upstream = Upstream::echo().await;
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("access.log");
    // Every write to /dev/full fails, as on a full disk.
    std::os::unix::fs::symlink("/dev/full", &path)?;
    let config = format!(
        "{}[access_log]\npath = {:?}\n\n[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        admin_table(),
        path.display().to_string(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..3 {
        assert_eq!(get(&node.url("/lost")).await?.status, 200);
    }
    let mut dropped = 0.0;
    for _ in 0..100 {
        dropped = scrape(&node)
            .await?
            .iter()
            .filter(|(name, _, _)| name.ends_with("access_log_dropped_total"))
            .map(|(_, _, value)| value)
            .sum();
        if dropped >= 3.0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(dropped, 3.0, "{}", node.log());
    assert!(
        node.log_contains("cannot write the access log"),
        "{}",
        node.log()
    );

    // Once the file can be written again, SIGHUP opens it, and lines follow.
    std::fs::remove_file(&path)?;
    std::fs::write(&path, "")?;
    node.signal("HUP");
    assert!(
        node.log_contains("reopened the access log"),
        "{}",
        node.log()
    );
    assert_eq!(get(&node.url("/kept")).await?.status, 200);
    let lines = access_log_lines(&path, 1).await?;
    assert_eq!(lines[0]["path"], "/kept");
    Ok(())
}

#[tokio::test]
async fn admin_listener_backs_off_without_file_descriptors() -> Result {
    let upstream = Upstream::echo().await;
    let config = admin_api_config(&upstream);
    let node = Node::start(&config)?;
    // Sets the soft limit only, which the node's user may raise again.
    let set_limit = |files: usize| {
        let status = std::process::Command::new("prlimit")
            .args([
                "--pid",
                &node.pid().to_string(),
                &format!("--nofile={files}:"),
            ])
            .status()
            .expect("run prlimit");
        assert!(status.success());
    };
    let open = std::fs::read_dir(format!("/proc/{}/fd", node.pid()))?.count();
    // Room for two more files: the third connection finds none.
    set_limit(open + 2);
    let admin = node.admin_url.clone().expect("admin listener");
    let addr = admin.trim_start_matches("http://").to_owned();
    let mut connections = Vec::new();
    for _ in 0..6 {
        connections.push(tokio::net::TcpStream::connect(&addr).await?);
    }

    let mut logged = false;
    for _ in 0..100 {
        if node.log_contains("accept failed") {
            logged = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(logged, "{}", node.log());
    // With descriptors again, the listener that backed off serves. The
    // limit goes back up because the node may have used the freed ones.
    set_limit(4096);
    drop(connections);
    let readyz = format!("{admin}/readyz");
    let mut readiness = 0;
    for _ in 0..20 {
        let attempt = tokio::time::timeout(Duration::from_secs(1), get(&readyz));
        if let Ok(Ok(got)) = attempt.await {
            readiness = got.status.as_u16();
            break;
        }
    }
    assert_eq!(readiness, 200, "{}", node.log());
    Ok(())
}

#[test]
fn access_log_pipe_without_reader_fails_fast() {
    let dir = tempfile::tempdir().unwrap();
    let pipe = dir.path().join("access.pipe");
    let created = std::process::Command::new("mkfifo")
        .arg(&pipe)
        .status()
        .unwrap();
    assert!(created.success());

    let config = crate::cli::write_config(
        dir.path(),
        &format!(
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[access_log]\npath = {:?}\n\n\
             [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
             [[routes]]\nname = \"api\"\nupstream = \"app\"\n",
            pipe.display().to_string()
        ),
    );
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["serve", &config])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();

    // Opening a pipe for writing used to wait for a reader for ever.
    let mut status = None;
    for _ in 0..100 {
        status = child.try_wait().unwrap();
        if status.is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if status.is_none() {
        let _ = child.kill();
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(status.is_some_and(|s| !s.success()), "{stderr}");
    assert!(
        stderr.contains("a named pipe that no process reads"),
        "{stderr}"
    );
}

#[test]
fn access_log_missing_folder_error() {
    let stderr = crate::cli::check_fails(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[access_log]\n\
         path = \"no/such/folder/access.log\"\n\n\
         [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
         [[routes]]\nname = \"api\"\nupstream = \"app\"\n",
    );
    assert!(stderr.contains("edge.toml:5: access_log.path"), "{stderr}");
    assert!(stderr.contains("no/such/folder/access.log"), "{stderr}");
}

#[tokio::test]
async fn readiness_false_while_draining() -> Result {
    let upstream = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let config = format!(
        "[node]\ndrain_timeout = \"10s\"\n\n{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"slow\"\nprefix = \"/\"\nupstream = \"app\"\n",
        admin_table(),
        upstream.addr
    );
    let mut node = Node::start(&config)?;
    let admin = node.admin_url.clone().expect("admin listener");
    let ready = get(&format!("{admin}/readyz")).await?;
    assert_eq!(ready.status, 200);
    assert_eq!(ready.json()["phase"], "serving");
    let live = get(&format!("{admin}/healthz")).await?;
    assert_eq!(live.status, 200);

    let url = node.url("/slow");
    let slow = tokio::spawn(async move { get(&url).await });
    // Drain only once the request is at the upstream, so it is in flight.
    for _ in 0..200 {
        if upstream.count() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(upstream.count(), 1);
    node.interrupt();
    let mut draining = None;
    for _ in 0..200 {
        let got = get(&format!("{admin}/readyz")).await?;
        if got.status == 503 {
            draining = Some(got);
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let draining = draining.expect("/readyz turned 503 during the drain");
    assert_eq!(draining.json()["ready"], false);
    assert_eq!(draining.json()["phase"], "draining");
    assert_eq!(get(&format!("{admin}/healthz")).await?.status, 200);
    let finished = slow.await??;
    assert_eq!(
        finished.status, 200,
        "the open request finished during the drain"
    );
    assert!(node.wait_exit().is_some());
    Ok(())
}

#[tokio::test]
async fn status_requires_token_then_cookie() -> Result {
    let upstream = Upstream::echo().await;
    let config = admin_api_config(&upstream);
    let node = Node::start(&config)?;
    let admin = node.admin_url.clone().expect("admin listener");
    assert_eq!(get(&format!("{admin}/status")).await?.status, 401);
    assert_eq!(get(&format!("{admin}/status.json")).await?.status, 401);
    assert_eq!(
        get(&format!("{admin}/status?token=wrong")).await?.status,
        401
    );
    let login = get(&format!("{admin}/status?token={TOKEN}")).await?;
    assert_eq!(login.status, 303);
    assert_eq!(login.header("location"), Some("/status"));
    let cookie = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.contains("HttpOnly"));
    assert!(cookie.contains("SameSite=Strict"));
    assert!(!cookie.contains(TOKEN), "the cookie holds no token");
    let pair = cookie.split(';').next().unwrap().to_owned();
    let page = send("GET", &format!("{admin}/status"), &[("cookie", &pair)], b"").await?;
    assert_eq!(page.status, 200);
    assert!(page.header("content-security-policy").is_some());
    let data = send(
        "GET",
        &format!("{admin}/status.json"),
        &[("cookie", &pair)],
        b"",
    )
    .await?;
    assert_eq!(data.status, 200);
    assert_eq!(data.json()["routes"][0]["name"], "api");
    // The cookie opens GET requests only.
    let posted = send(
        "POST",
        &format!("{admin}/status.json"),
        &[("cookie", &pair)],
        b"",
    )
    .await?;
    assert_eq!(posted.status, 401);
    // Nor the rest of the admin API.
    for path in ["/metrics", "/breakers", "/health"] {
        let got = send("GET", &format!("{admin}{path}"), &[("cookie", &pair)], b"").await?;
        assert_eq!(got.status, 401, "{path}");
    }
    // Each log-in starts its own session with a random id.
    let again = get(&format!("{admin}/status?token={TOKEN}")).await?;
    let other = again.header("set-cookie").expect("a session cookie");
    assert_ne!(other.split(';').next().unwrap(), pair);
    let forged = "edge_status=0000000000000000000000000000000000000000000000000000000000000000";
    let got = send(
        "GET",
        &format!("{admin}/status.json"),
        &[("cookie", forged)],
        b"",
    )
    .await?;
    assert_eq!(got.status, 401);
    Ok(())
}

#[tokio::test]
async fn status_session_ends_at_its_timeout() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\nsession_timeout = \"1s\"\n\n[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        admin_table().trim_end(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    let admin = node.admin_url.clone().expect("admin listener");
    let login = get(&format!("{admin}/status?token={TOKEN}")).await?;
    let cookie = login
        .header("set-cookie")
        .expect("a session cookie")
        .to_owned();
    assert!(cookie.contains("Max-Age=1"), "{cookie}");
    let pair = cookie.split(';').next().unwrap().to_owned();
    let data = format!("{admin}/status.json");
    assert_eq!(
        send("GET", &data, &[("cookie", &pair)], b"").await?.status,
        200
    );
    // The node ends the session itself, whatever the browser keeps.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        send("GET", &data, &[("cookie", &pair)], b"").await?.status,
        401
    );
    Ok(())
}

#[tokio::test]
async fn edge_top_prints_routes_targets_and_limits() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n\
         [[routes.limits]]\nname = \"per-ip\"\nkey = \"ip\"\nalgorithm = \"token_bucket\"\n\
         rate = \"10/s\"\nburst = 10\n",
        admin_table(),
        upstream.addr
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/a")).await?.status, 200);
    let admin = node.admin_url.clone().expect("admin listener");
    let admin = admin.trim_start_matches("http://").to_owned();

    // Requests during the frame's interval, so that its rates are numbers.
    let top_admin = admin.clone();
    let top = tokio::task::spawn_blocking(move || {
        crate::harness::edge(&[
            "top",
            "--admin",
            &top_admin,
            "--token",
            TOKEN,
            "--once",
            "--interval",
            "1s",
        ])
    });
    for _ in 0..5 {
        assert_eq!(get(&node.url("/b")).await?.status, 200);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let output = top.await?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains(", serving;"), "{stdout}");
    let api = stdout
        .lines()
        .find(|line| line.starts_with("api "))
        .unwrap_or_default();
    assert!(!api.is_empty(), "{stdout}");
    let cells: Vec<&str> = api.split_whitespace().collect();
    assert!(
        cells
            .get(2)
            .is_some_and(|rate| rate.parse::<f64>().is_ok_and(|r| r > 0.0)),
        "REQ/S is a number above zero: {stdout}"
    );
    assert!(stdout.contains(&upstream.addr.to_string()), "{stdout}");
    assert!(stdout.contains("per-ip"), "{stdout}");

    // A wrong token gets the admin listener's refusal, not a frame.
    let refused = crate::harness::edge(&["top", "--admin", &admin, "--token", "wrong", "--once"]);
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("401"), "{stderr}");
    assert!(
        stderr.contains("check the token given by --token"),
        "{stderr}"
    );

    // A server that returns JSON but is no admin listener is named as such.
    let other =
        Upstream::start(|_| Reply::Json(Duration::ZERO, serde_json::json!({"ok": true}))).await;
    let other_addr = other.addr.to_string();
    // Off this thread, which runs the test server.
    let wrong = tokio::task::spawn_blocking(move || {
        crate::harness::edge(&["top", "--admin", &other_addr, "--token", TOKEN, "--once"])
    })
    .await?;
    assert!(!wrong.status.success());
    let stderr = String::from_utf8_lossy(&wrong.stderr);
    assert!(
        stderr.contains("did not respond as an edge admin listener"),
        "{stderr}"
    );

    // Nothing listening: the error names the flag that picks the address.
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .to_string();
    let nobody = crate::harness::edge(&["top", "--admin", &closed, "--token", TOKEN, "--once"]);
    assert!(!nobody.status.success());
    let stderr = String::from_utf8_lossy(&nobody.stderr);
    assert!(stderr.contains("pass --admin"), "{stderr}");
    Ok(())
}

#[tokio::test]
async fn fetch_carries_request_id_and_trace() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[upstreams.app]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"fan\"\npath = \"/fan\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\nfetch = [\"app\"]\n\
         [routes.workers.config]\nmode = \"fetch\"\n\
         requests = [{{ upstream = \"app\", path = \"/one\" }}, \
         {{ upstream = \"app\", path = \"/two\", headers = {{ traceparent = \"forged\" }} }}]\n",
        admin_table(),
        upstream.addr
    );
    let node = Node::start(&config)?;

    // No X-Request-Id and no traceparent from the client: the node makes
    // both, and each fetch carries them.
    let got = get(&node.url("/fan")).await?;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    let id = got
        .header("x-request-id")
        .expect("a generated id")
        .to_owned();
    assert_eq!(id.len(), 32);
    assert_eq!(upstream.complete_count(), 2);
    let fetched = upstream.received();
    let mut traces = Vec::new();
    let mut parents = Vec::new();
    for received in &fetched {
        assert_eq!(received.headers["x-request-id"], id.as_str());
        let (trace, parent, flags) = trace_parts(received.headers["traceparent"].to_str()?);
        assert_eq!(trace.len(), 32);
        assert_ne!(trace, "0".repeat(32));
        assert_ne!(parent, "0".repeat(16));
        assert_eq!(flags, "01");
        traces.push(trace);
        parents.push(parent);
    }
    assert_eq!(
        traces[0], traces[1],
        "both fetches are in the request's trace"
    );
    assert_ne!(parents[0], parents[1], "each fetch has its own span id");

    // A client's trace and id carry on into the fetches, with a new span id
    // per fetch; the worker's own traceparent is replaced.
    let client = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let got = send(
        "GET",
        &node.url("/fan"),
        &[("traceparent", client), ("x-request-id", "fan-out-7")],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    assert_eq!(upstream.complete_count(), 4);
    for received in &upstream.received()[2..] {
        assert_eq!(received.headers["x-request-id"], "fan-out-7");
        let (trace, parent, _) = trace_parts(received.headers["traceparent"].to_str()?);
        assert_eq!(trace, "4bf92f3577b34da6a3ce929d0e0e4736");
        assert_ne!(parent, "00f067aa0ba902b7");
    }

    // Fetches count in the route's upstream metrics like proxied calls.
    let samples = scrape(&node).await?;
    let calls = total(
        &samples,
        "edge_upstream_duration_seconds",
        &[("route", "fan"), ("upstream", "app")],
    );
    assert_eq!(calls, 4.0);
    Ok(())
}

#[tokio::test]
async fn idle_connection_closed_upstream_is_dropped() -> Result {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // An upstream that responds to one request per connection with keep-alive,
    // then closes the connection while it is idle in the node's pool, as an
    // upstream's keep-alive timeout does.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buffer = [0u8; 4096];
                let _ = stream.read(&mut buffer).await;
                let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                let _ = stream.write_all(response).await;
                tokio::time::sleep(Duration::from_secs(1)).await;
            });
        }
    });

    let node = Node::start(&format!(
        "{}[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{addr}\"]\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n",
        admin_table()
    ))?;
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 200);

    let open =
        |samples: &Samples| total(samples, "edge_upstream_connections", &[("upstream", "app")]);
    assert_eq!(open(&scrape(&node).await?), 1.0);
    // The node notices the close and drops the connection from its pool.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    let mut samples = scrape(&node).await?;
    while open(&samples) > 0.0 && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
        samples = scrape(&node).await?;
    }
    assert_eq!(open(&samples), 0.0);
    // The next request opens a new connection.
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 200);
    Ok(())
}
