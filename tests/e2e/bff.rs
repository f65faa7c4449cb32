//! Worker fetches and the bff-aggregate worker: fan-out to real upstreams,
//! shapes per device class, partial failure, breakers, and the fetch
//! import's own errors and limits (through the fixture worker's `fetch`
//! mode).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{edge, get, send, Node, Reply, Result, Upstream};

/// An address where nothing listens.
fn closed_port() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    addr.to_string()
}

/// `[upstreams.NAME]` tables with one target each and no retries, so that a
/// failure reaches the worker after one attempt.
fn upstreams(targets: &[(&str, String)]) -> String {
    targets
        .iter()
        .map(|(name, addr)| {
            format!(
                "[upstreams.{name}]\ntargets = [\"{addr}\"]\n\
                 [upstreams.{name}.retry]\nmax_retries = 0\n\n"
            )
        })
        .collect()
}

/// The recommendations upstream's body: four rows with every field.
fn rows_body() -> Value {
    let rows: Vec<Value> = (1..=4)
        .map(|id| {
            json!({
                "id": id,
                "title": format!("title {id}"),
                "synopsis": format!("synopsis {id}"),
                "images": {"small": format!("{id}-s.jpg"), "large": format!("{id}-l.jpg")},
            })
        })
        .collect();
    json!({ "rows": rows, "total": 4 })
}

/// The three sections of the home page, each with `timeout` and the
/// billing section required when `billing_required` is set.
fn sections(timeout: &str, billing_required: bool) -> String {
    format!(
        "sections = [\n\
         {{ name = \"rows\", upstream = \"recs\", path = \"/rows?user={{user}}&device={{device}}\", \
         timeout = \"{timeout}\", list = \"rows\" }},\n\
         {{ name = \"continue_watching\", upstream = \"history\", \
         path = \"/users/{{user}}/continue\", timeout = \"{timeout}\" }},\n\
         {{ name = \"billing\", upstream = \"billing\", path = \"/users/{{user}}/plan\", \
         timeout = \"{timeout}\", required = {billing_required} }},\n]\n"
    )
}

/// The default shapes: compact for mobile, rich for tv, every section for
/// desktop.
const SHAPES: &str = "\
[routes.workers.config.devices.mobile.sections]
rows = { max_items = 2, fields = [\"id\", \"title\", \"image=images.small\"] }
billing = { fields = [\"plan\"] }

[routes.workers.config.devices.tv.sections]
rows = { max_items = 10, fields = [\"id\", \"title\", \"synopsis\", \"image=images.large\"] }
continue_watching = {}
billing = {}

[routes.workers.config.devices.desktop.sections]
rows = {}
continue_watching = {}
billing = {}
";

/// A node whose route `GET /{device}/home` runs bff-aggregate over the
/// upstreams `recs`, `history` and `billing`, with `extra` TOML before the
/// route. A fixture worker before it stands in for an auth worker: it sets
/// the context value `user` from the `x-user-id` header.
fn home_config(extra: &str, sections: &str, shapes: &str) -> String {
    format!(
        "{extra}[[routes]]\nname = \"home\"\npattern = \"/{{device}}/home\"\nmethods = [\"GET\"]\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"context-set\"\nname = \"user\"\nfrom_header = \"x-user-id\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/bff-aggregate.wasm\"\n\
         fetch = [\"recs\", \"history\", \"billing\"]\n\n\
         [routes.workers.config]\n{sections}\n{shapes}\n"
    )
}

/// Healthy upstreams for the three sections.
struct Services {
    recs: Upstream,
    history: Upstream,
    billing: Upstream,
}

impl Services {
    async fn healthy() -> Services {
        Services {
            recs: Upstream::start(|_| Reply::Json(Duration::ZERO, rows_body())).await,
            history: Upstream::start(|_| {
                Reply::Json(Duration::ZERO, json!([{"id": 3, "position_s": 1200}]))
            })
            .await,
            billing: Upstream::start(|_| {
                Reply::Json(
                    Duration::ZERO,
                    json!({"plan": "premium", "renews": "2027-01-01"}),
                )
            })
            .await,
        }
    }

    fn toml(&self) -> String {
        upstreams(&[
            ("recs", self.recs.addr.to_string()),
            ("history", self.history.addr.to_string()),
            ("billing", self.billing.addr.to_string()),
        ])
    }

    fn counts(&self) -> [usize; 3] {
        [
            self.recs.count(),
            self.history.count(),
            self.billing.count(),
        ]
    }
}

/// Starts a node with the home route over `services`, every section with
/// `timeout`, the default shapes, and billing required when
/// `billing_required` is set.
fn home_node(services: &Services, timeout: &str, billing_required: bool) -> Result<Node> {
    Node::start(&home_config(
        &services.toml(),
        &sections(timeout, billing_required),
        SHAPES,
    ))
}

/// GETs `path` as the user `u-7`, whom the route's first worker puts in the
/// request context.
async fn get_home(node: &Node, path: &str) -> Result<crate::harness::Got> {
    send("GET", &node.url(path), &[("x-user-id", "u-7")], b"").await
}

#[tokio::test]
async fn shapes_per_device_class() -> Result {
    let services = Services::healthy().await;
    let node = home_node(&services, "2s", false)?;

    let mobile = get_home(&node, "/mobile/home").await?;
    assert_eq!(mobile.status, 200);
    assert_eq!(mobile.header("content-type"), Some("application/json"));
    assert_eq!(mobile.header("x-partial-response"), None);
    assert_eq!(
        mobile.json(),
        json!({
            "device": "mobile",
            "user": "u-7",
            "rows": [
                {"id": 1, "title": "title 1", "image": "1-s.jpg"},
                {"id": 2, "title": "title 2", "image": "2-s.jpg"},
            ],
            "billing": {"plan": "premium"},
            "partial": [],
        })
    );
    assert_eq!(
        services.counts(),
        [1, 0, 1],
        "mobile does not show continue_watching"
    );
    let seen = services.recs.last();
    assert_eq!(seen.target, "/rows?user=u-7&device=mobile");
    assert_eq!(seen.headers["x-user-id"], "u-7");
    assert_eq!(services.billing.last().target, "/users/u-7/plan");

    let tv = get_home(&node, "/tv/home").await?;
    assert_eq!(tv.status, 200);
    let body = tv.json();
    assert_eq!(body["device"], "tv");
    assert_eq!(body["rows"].as_array().unwrap().len(), 4);
    assert_eq!(
        body["rows"][3],
        json!({"id": 4, "title": "title 4", "synopsis": "synopsis 4", "image": "4-l.jpg"})
    );
    assert_eq!(
        body["continue_watching"],
        json!([{"id": 3, "position_s": 1200}])
    );
    assert_eq!(
        body["billing"],
        json!({"plan": "premium", "renews": "2027-01-01"})
    );

    let desktop = get_home(&node, "/desktop/home").await?;
    assert_eq!(desktop.json()["rows"][0], rows_body()["rows"][0]);

    let before = services.counts();
    let unknown = get_home(&node, "/fridge/home").await?;
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown_device");
    assert_eq!(
        services.counts(),
        before,
        "an unknown device class reaches no upstream"
    );
    Ok(())
}

#[tokio::test]
async fn changed_shape_changes_response() -> Result {
    let services = Services::healthy().await;
    let first = home_node(&services, "2s", false)?;
    let before = get_home(&first, "/mobile/home").await?.json();
    assert_eq!(before["rows"].as_array().unwrap().len(), 2);
    assert_eq!(before["rows"][0]["image"], "1-s.jpg");
    assert!(before.get("continue_watching").is_none());

    let shapes = SHAPES
        .replace(
            "rows = { max_items = 2, fields = [\"id\", \"title\", \"image=images.small\"] }",
            "rows = { max_items = 3, fields = [\"id\", \"thumb=images.small\"] }\n\
             continue_watching = {}",
        )
        .replace(
            "billing = { fields = [\"plan\"] }",
            "billing = { fields = [\"renews\"] }",
        );
    let second = Node::start(&home_config(
        &services.toml(),
        &sections("2s", false),
        &shapes,
    ))?;
    let after = get_home(&second, "/mobile/home").await?.json();
    assert_eq!(
        after["rows"],
        json!([
            {"id": 1, "thumb": "1-s.jpg"},
            {"id": 2, "thumb": "2-s.jpg"},
            {"id": 3, "thumb": "3-s.jpg"},
        ])
    );
    assert_eq!(after["billing"], json!({"renews": "2027-01-01"}));
    assert_eq!(
        after["continue_watching"],
        json!([{"id": 3, "position_s": 1200}])
    );
    Ok(())
}

#[tokio::test]
async fn section_missing_from_fetch_list_stops_node() -> Result {
    let promo_sections = "sections = [\n\
         { name = \"rows\", upstream = \"recs\", path = \"/rows\", list = \"rows\" },\n\
         { name = \"promo\", upstream = \"promo\", path = \"/p\" },\n]\n";
    let shapes = "[routes.workers.config.devices.tv.sections]\nrows = {}\npromo = {}\n";
    let extra = upstreams(&[
        ("recs", closed_port()),
        ("history", closed_port()),
        ("billing", closed_port()),
        ("promo", closed_port()),
    ]);
    // `promo` is an upstream, but the entry's `fetch` list leaves it out.
    let Err(error) = Node::start(&home_config(&extra, promo_sections, shapes)) else {
        panic!("the node started with a section it may not fetch from");
    };
    let error = error.to_string();
    assert!(
        error.contains("sections[1] upstream \"promo\" is not in the worker entry's `fetch` list"),
        "{error}"
    );
    Ok(())
}

#[tokio::test]
async fn failed_sections_give_partial_200() -> Result {
    let recs = Upstream::start(|_| Reply::Json(Duration::ZERO, rows_body())).await;
    let history = Upstream::start(|_| Reply::Status(500)).await;
    let slow = Upstream::start(|_| Reply::Json(Duration::from_secs(3), json!({}))).await;
    let promo_sections = "sections = [\n\
         { name = \"rows\", upstream = \"recs\", path = \"/rows\", list = \"rows\" },\n\
         { name = \"continue_watching\", upstream = \"history\", path = \"/c\" },\n\
         { name = \"billing\", upstream = \"billing\", path = \"/b\" },\n\
         { name = \"promo\", upstream = \"promo\", path = \"/p\", timeout = \"100ms\" },\n]\n";
    let shapes = "[routes.workers.config.devices.tv.sections]\n\
                  rows = {}\ncontinue_watching = {}\nbilling = {}\npromo = {}\n";
    let extra = upstreams(&[
        ("recs", recs.addr.to_string()),
        ("history", history.addr.to_string()),
        ("billing", closed_port()),
        ("promo", slow.addr.to_string()),
    ]);
    let config = home_config(&extra, promo_sections, shapes).replace(
        "fetch = [\"recs\", \"history\", \"billing\"]",
        "fetch = [\"recs\", \"history\", \"billing\", \"promo\"]",
    );
    let node = Node::start(&config)?;

    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("x-partial-response"),
        Some("continue_watching, billing, promo")
    );
    let body = got.json();
    assert_eq!(
        body["partial"],
        json!(["continue_watching", "billing", "promo"])
    );
    assert_eq!(body["rows"].as_array().unwrap().len(), 4);
    for failed in ["continue_watching", "billing", "promo"] {
        assert!(body.get(failed).is_none(), "{failed} is left out");
    }
    assert_eq!(history.count(), 1);
    assert_eq!(slow.count(), 1);
    assert!(node.log_contains("section promo from upstream promo failed: timed_out"));
    assert!(node.log_contains("section billing from upstream billing failed: upstream_unavailable"));
    Ok(())
}

#[tokio::test]
async fn required_section_failing_is_502() -> Result {
    let services = Services::healthy().await;
    let config = home_config(
        &upstreams(&[
            ("recs", services.recs.addr.to_string()),
            ("history", services.history.addr.to_string()),
            ("billing", closed_port()),
        ]),
        &sections("2s", true),
        SHAPES,
    );
    let node = Node::start(&config)?;
    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 502);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.header("x-partial-response"), None);
    let body = got.json();
    assert_eq!(body["error"], "required_section_failed");
    assert_eq!(body["message"], "required section failed: billing");
    assert_eq!(body["failed"], json!({"billing": "upstream_unavailable"}));
    assert!(body.get("rows").is_none(), "a 502 carries no sections");
    Ok(())
}

#[tokio::test]
async fn every_section_failing_is_502() -> Result {
    let failing = Upstream::start(|_| Reply::Status(500)).await;
    let config = home_config(
        &upstreams(&[
            ("recs", failing.addr.to_string()),
            ("history", closed_port()),
            ("billing", failing.addr.to_string()),
        ]),
        &sections("2s", false),
        SHAPES,
    );
    let node = Node::start(&config)?;
    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 502);
    let body = got.json();
    assert_eq!(body["error"], "all_sections_failed");
    assert_eq!(
        body["failed"],
        json!({
            "rows": "status 500",
            "continue_watching": "upstream_unavailable",
            "billing": "status 500",
        })
    );
    Ok(())
}

#[tokio::test]
async fn missing_user_is_401_or_partial() -> Result {
    let services = Services::healthy().await;
    let node = home_node(&services, "2s", true)?;

    // Billing is required and needs the user id, so a request without one
    // gets 401 and reaches no upstream.
    let got = get(&node.url("/tv/home")).await?;
    assert_eq!(got.status, 401);
    assert_eq!(got.header("content-type"), Some("application/json"));
    let body = got.json();
    assert_eq!(body["error"], "user_missing");
    assert_eq!(
        body["message"],
        "the sections rows, continue_watching, billing need a user id, \
         and the request has none in the context value \"user\""
    );
    assert_eq!(services.counts(), [0, 0, 0]);

    // With optional sections only, those that need the user are left out
    // and the others are served.
    let anonymous_rows = sections("2s", false).replace("user={user}&", "");
    let node = Node::start(&home_config(&services.toml(), &anonymous_rows, SHAPES))?;
    let got = get(&node.url("/tv/home")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(
        got.header("x-partial-response"),
        Some("continue_watching, billing")
    );
    let body = got.json();
    assert_eq!(body["user"], Value::Null);
    assert_eq!(body["partial"], json!(["continue_watching", "billing"]));
    assert_eq!(body["rows"].as_array().map(Vec::len), Some(4));
    assert_eq!(services.counts(), [1, 0, 0]);
    assert_eq!(services.recs.last().target, "/rows?device=tv");
    Ok(())
}

#[tokio::test]
async fn user_id_that_leaves_its_segment_is_400() -> Result {
    let services = Services::healthy().await;
    let node = home_node(&services, "2s", false)?;
    // Unicode NFKC folds the last three to `..`, `..` and `a\b`, as some
    // upstreams do after decoding.
    for (user, reason) in [
        ("..", "is a dot segment"),
        (".", "is a dot segment"),
        ("x/../..", "contains a slash"),
        ("a\\b", "contains a slash"),
        ("\u{2025}", "is a dot segment"),
        ("\u{FE52}\u{FE52}", "is a dot segment"),
        ("a\u{FE68}b", "contains a slash"),
    ] {
        let got = send("GET", &node.url("/tv/home"), &[("x-user-id", user)], b"").await?;
        assert_eq!(got.status, 400, "{user:?}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        let body = got.json();
        assert_eq!(body["error"], "invalid_user");
        assert_eq!(
            body["message"],
            format!("the user id {user:?} {reason}, so it cannot go in a path")
        );
    }
    assert_eq!(services.counts(), [0, 0, 0], "no upstream was called");
    Ok(())
}

#[tokio::test]
async fn unsafe_path_parameter_gets_400() -> Result {
    let services = Services::healthy().await;
    let sections = sections("2s", false).replace("/rows?", "/rows/{id}?");
    let config = home_config(&services.toml(), &sections, SHAPES).replace(
        "pattern = \"/{device}/home\"",
        "pattern = \"/{device}/home/{id}\"",
    );
    let node = Node::start(&config)?;
    // `%E2%80%A5` is U+2025, which Unicode NFKC folds to `..`.
    for (id, value, reason) in [
        ("%E2%80%A5", "\u{2025}", "is a dot segment"),
        ("%EF%B9%A8x", "\u{FE68}x", "contains a slash"),
        ("%EF%BC%9Bx", "\u{FF1B}x", "contains a semicolon"),
    ] {
        let got = get_home(&node, &format!("/tv/home/{id}")).await?;
        assert_eq!(got.status, 400, "{id}");
        assert_eq!(got.header("content-type"), Some("application/json"));
        let body = got.json();
        assert_eq!(body["error"], "invalid_parameter", "{id}");
        assert_eq!(
            body["message"],
            format!("the path parameter \"id\", {value:?}, {reason}, so it cannot go in a path")
        );
    }
    assert_eq!(services.counts(), [0, 0, 0], "no upstream was called");

    let got = get_home(&node, "/tv/home/abc").await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(services.recs.last().target, "/rows/abc?user=u-7&device=tv");
    Ok(())
}

#[tokio::test]
async fn large_section_is_cut_while_parsed() -> Result {
    // About 900 KiB of rows, under the 1 MiB fetch cap: built whole it
    // would not fit the worker's default 16 MiB of memory.
    let rows: Vec<Value> = (0..12_000)
        .map(|id| json!({"id": id, "title": format!("title {id}"), "images": {"small": "s.jpg"}}))
        .collect();
    let big = json!({ "rows": rows, "total": 12_000 });
    assert!(big.to_string().len() > 600 << 10);
    let recs = Upstream::start(move |_| Reply::Json(Duration::ZERO, big.clone())).await;
    let services = Services {
        recs,
        ..Services::healthy().await
    };
    let node = home_node(&services, "2s", false)?;
    let got = get_home(&node, "/mobile/home").await?;
    assert_eq!(got.status, 200, "{}", String::from_utf8_lossy(&got.body));
    assert_eq!(got.header("x-partial-response"), None);
    assert_eq!(
        got.json()["rows"],
        json!([
            {"id": 0, "title": "title 0", "image": "s.jpg"},
            {"id": 1, "title": "title 1", "image": "s.jpg"},
        ])
    );
    Ok(())
}

#[tokio::test]
async fn request_duration_leaves_out_fetch_waits() -> Result {
    let services = Services {
        billing: Upstream::start(|_| {
            Reply::Json(Duration::from_secs(1), json!({"plan": "premium"}))
        })
        .await,
        ..Services::healthy().await
    };
    let node = home_node(&services, "3s", false)?;
    let got = get_home(&node, "/mobile/home").await?;
    assert_eq!(got.status, 200);
    let duration = got
        .header("x-request-duration")
        .expect("x-request-duration");
    let millis: f64 = duration.trim_end_matches("ms").parse()?;
    // The section took a second; the node's own share is the workers' calls.
    assert!(millis < 500.0, "{duration}");
    Ok(())
}

#[tokio::test]
async fn sections_are_requested_concurrently() -> Result {
    // Each upstream answers after 300 ms and notes when a request arrived.
    // Had the worker fetched one section after another, each request would
    // arrive only after the previous one was answered.
    let delay = Duration::from_millis(300);
    let arrivals = Arc::new(Mutex::new(Vec::new()));
    let slow = |body: Value| {
        let arrivals = arrivals.clone();
        Upstream::start(move |_| {
            arrivals.lock().unwrap().push(Instant::now());
            Reply::Json(delay, body.clone())
        })
    };
    let recs = slow(rows_body()).await;
    let history = slow(json!([])).await;
    let billing = slow(json!({"plan": "basic"})).await;
    let extra = upstreams(&[
        ("recs", recs.addr.to_string()),
        ("history", history.addr.to_string()),
        ("billing", billing.addr.to_string()),
    ]);
    let node = Node::start(&home_config(&extra, &sections("2s", false), SHAPES))?;

    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["partial"], json!([]));
    let arrivals = arrivals.lock().unwrap().clone();
    assert_eq!(arrivals.len(), 3);
    let first = *arrivals.iter().min().unwrap();
    let last = *arrivals.iter().max().unwrap();
    assert!(
        last - first < delay,
        "the last section request arrived {:?} after the first, which was answered after {delay:?}",
        last - first
    );
    Ok(())
}

#[tokio::test]
async fn sections_past_call_limit_go_in_next_call() -> Result {
    let services = Services::healthy().await;
    let extra = format!(
        "[runtime.fetch]\nmax_requests_per_call = 2\n\n{}",
        services.toml()
    );
    let node = Node::start(&home_config(&extra, &sections("2s", false), SHAPES))?;
    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["partial"], json!([]), "{:?}", got.body);
    assert_eq!(got.json()["billing"]["plan"], "premium");
    assert_eq!(services.counts(), [1, 1, 1]);

    // The limit per worker call still caps them all.
    let services = Services::healthy().await;
    let extra = format!(
        "[runtime.fetch]\nmax_requests_per_call = 1\nmax_requests_per_hook = 2\n\n{}",
        services.toml()
    );
    let node = Node::start(&home_config(&extra, &sections("2s", false), SHAPES))?;
    let got = get_home(&node, "/tv/home").await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(got.json()["partial"], json!(["billing"]), "{:?}", got.body);
    assert_eq!(services.counts(), [1, 1, 0]);
    Ok(())
}

#[tokio::test]
async fn fan_out_carries_request_id() -> Result {
    let services = Services::healthy().await;
    let node = home_node(&services, "2s", false)?;
    let got = send(
        "GET",
        &node.url("/tv/home"),
        &[("x-user-id", "u-7"), ("x-request-id", "req-42")],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    for upstream in [&services.recs, &services.history, &services.billing] {
        let seen = upstream.last().headers;
        assert_eq!(seen["x-request-id"], "req-42");
        let via = seen["via"].to_str().unwrap_or_default();
        assert!(via.starts_with("1.1 "), "{via}");
    }
    Ok(())
}

#[tokio::test]
async fn open_breaker_fails_section_fast() -> Result {
    let recs = Upstream::start(|_| Reply::Json(Duration::ZERO, rows_body())).await;
    let billing = Upstream::start(|_| Reply::Status(503)).await;
    let extra = format!(
        "{}[upstreams.billing]\ntargets = [\"{}\"]\n\
         [upstreams.billing.retry]\nmax_retries = 0\n\
         [upstreams.billing.breaker]\nconsecutive_failures = 2\ncool_down = \"30s\"\n\n\
         [[routes]]\nname = \"probe\"\npath = \"/probe\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\nfetch = [\"billing\"]\n\
         [routes.workers.config]\nmode = \"fetch\"\n\
         requests = [{{ upstream = \"billing\", path = \"/b\" }}]\n\n",
        upstreams(&[
            ("recs", recs.addr.to_string()),
            ("history", recs.addr.to_string()),
        ]),
        billing.addr
    );
    let node = Node::start(&home_config(&extra, &sections("2s", false), SHAPES))?;

    // Two failures open the billing target's breaker.
    for _ in 0..2 {
        let got = get_home(&node, "/mobile/home").await?;
        assert_eq!(got.status, 200);
        assert_eq!(got.header("x-partial-response"), Some("billing"));
    }
    assert_eq!(billing.count(), 2);
    assert!(node.log_contains("circuit breaker open"));

    let got = get_home(&node, "/mobile/home").await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["partial"], json!(["billing"]));
    let probe = get(&node.url("/probe")).await?;
    assert_eq!(
        probe.json()["results"][0],
        json!({"error": "unavailable", "detail": "circuit_open"})
    );
    assert_eq!(
        billing.count(),
        2,
        "an open breaker sends nothing to the upstream"
    );
    Ok(())
}

/// A route `/fetch` running the fixture worker's `fetch` mode with
/// `requests` (a TOML array) and the `fetch` list `allowed`.
fn fetch_route(allowed: &str, requests: &str, worker_extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"fetch\"\npath = \"/fetch\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         fetch = {allowed}\n{worker_extra}\n\
         [routes.workers.config]\nmode = \"fetch\"\nrequests = {requests}\n"
    )
}

#[tokio::test]
async fn fetch_errors_reach_worker() -> Result {
    let app = Upstream::echo().await;
    let secret = Upstream::echo().await;
    let big = Upstream::start(|_| Reply::Bytes(2 << 20)).await;
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    // Responds to HEAD with the length the body would have, over the cap.
    let head = Upstream::start(|_| {
        Reply::Body(
            vec![("content-length", (2 << 20).to_string())],
            String::new(),
        )
    })
    .await;
    let requests = "[\n\
        { upstream = \"secret\", path = \"/s\" },\n\
        { upstream = \"ghost\", path = \"/g\" },\n\
        { upstream = \"app\", path = \"nope\" },\n\
        { upstream = \"app\", path = \"/x\", method = \"G T\" },\n\
        { upstream = \"app\", path = \"/x\", headers = { \"bad name\" = \"1\" } },\n\
        { upstream = \"big\", path = \"/big\" },\n\
        { upstream = \"slow\", path = \"/slow\", timeout_ms = 100 },\n\
        { upstream = \"down\", path = \"/down\" },\n\
        { upstream = \"app\", path = \"/ok?q=1\" },\n\
        { upstream = \"head\", path = \"/big\", method = \"HEAD\" },\n\
        { upstream = \"app\", path = \"/x\", method = \"delete\" },\n\
        { upstream = \"app\", path = \"/x\", method = \"CONNECT\" },\n]";
    let config = format!(
        "{}{}",
        upstreams(&[
            ("app", app.addr.to_string()),
            ("secret", secret.addr.to_string()),
            ("big", big.addr.to_string()),
            ("slow", slow.addr.to_string()),
            ("down", closed_port()),
            ("head", head.addr.to_string()),
        ]),
        fetch_route(
            "[\"app\", \"big\", \"slow\", \"down\", \"head\"]",
            requests,
            "",
        )
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/fetch")).await?;
    assert_eq!(got.status, 200);
    let results = got.json()["results"].clone();
    let error = |index: usize| results[index]["error"].as_str().unwrap_or("").to_owned();
    assert_eq!(
        error(0),
        "not_allowed",
        "declared but not in the fetch list"
    );
    assert_eq!(error(1), "not_allowed", "not an upstream at all");
    assert_eq!(error(2), "invalid_request");
    assert_eq!(
        results[2]["detail"],
        "path \"nope\" does not start with `/`"
    );
    assert_eq!(error(3), "invalid_request");
    assert_eq!(results[3]["detail"], "invalid method \"G T\"");
    assert_eq!(error(4), "invalid_request");
    assert_eq!(results[4]["detail"], "invalid header name \"bad name\"");
    assert_eq!(error(5), "response_too_large");
    assert_eq!(results[5]["detail"], "1048576");
    assert_eq!(error(6), "timed_out");
    assert_eq!(error(7), "unavailable");
    assert_eq!(results[7]["detail"], "upstream_unavailable");
    assert_eq!(results[8]["status"], 200);
    let echoed: Value = serde_json::from_str(results[8]["body"].as_str().unwrap())?;
    assert_eq!(echoed["target"], "/ok?q=1");
    assert_eq!(
        results[9]["status"], 200,
        "a HEAD answer has no body, whatever its length says: {}",
        results[9]
    );
    assert_eq!(results[9]["body"], "");
    assert_eq!(error(10), "invalid_request");
    assert_eq!(
        results[10]["detail"],
        "method \"delete\" is not allowed; use an upper-case method other than CONNECT"
    );
    assert_eq!(error(11), "invalid_request");

    assert_eq!(secret.count(), 0, "a not-allowed request is never sent");
    assert_eq!(app.count(), 1, "invalid requests are never sent");
    assert_eq!(app.last().target, "/ok?q=1");
    Ok(())
}

#[tokio::test]
async fn fetch_limits_cap_requests_and_timeouts() -> Result {
    let app = Upstream::echo().await;
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let requests = "[\n\
        { upstream = \"slow\", path = \"/slow\", timeout_ms = 60000 },\n\
        { upstream = \"app\", path = \"/1\" },\n\
        { upstream = \"app\", path = \"/2\" },\n\
        { upstream = \"app\", path = \"/3\" },\n]";
    let config = format!(
        "[runtime.fetch]\ndefault_timeout = \"100ms\"\nmax_timeout = \"200ms\"\n\
         max_requests_per_call = 3\nmax_requests_per_hook = 2\n\n{}{}",
        upstreams(&[
            ("app", app.addr.to_string()),
            ("slow", slow.addr.to_string()),
        ]),
        fetch_route("[\"app\", \"slow\"]", requests, "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/fetch")).await?;
    assert_eq!(got.status, 200);
    let results = got.json()["results"].clone();
    assert_eq!(
        results[0]["error"], "timed_out",
        "max_timeout cuts the request's own 60 s timeout"
    );
    assert_eq!(results[1]["status"], 200);
    assert_eq!(results[2]["error"], "invalid_request");
    assert_eq!(
        results[2]["detail"],
        "over the limit of 2 requests per worker call"
    );
    assert_eq!(results[3]["error"], "invalid_request");
    assert_eq!(
        results[3]["detail"],
        "over the limit of 3 requests per fetch call"
    );
    assert_eq!(app.count(), 1);
    Ok(())
}

#[tokio::test]
async fn fetch_drops_hop_by_hop_headers() -> Result {
    let app = Upstream::echo().await;
    let requests = "[{ upstream = \"app\", path = \"/h\", method = \"POST\", body = \"hello\", \
        headers = { \"connection\" = \"x-drop\", \"x-drop\" = \"1\", \"keep-alive\" = \"timeout=5\", \
        \"te\" = \"trailers\", \"upgrade\" = \"h2c\", \"proxy-authorization\" = \"Basic eA==\", \
        \"content-length\" = \"99\", \"x-keep\" = \"1\" } }]";
    let config = format!(
        "{}{}",
        upstreams(&[("app", app.addr.to_string())]),
        fetch_route("[\"app\"]", requests, "")
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/fetch")).await?;
    assert_eq!(got.json()["results"][0]["status"], 200);
    let seen = app.last();
    assert_eq!(seen.method, "POST");
    assert_eq!(seen.body_len, 5);
    assert_eq!(seen.headers["content-length"], "5");
    assert_eq!(seen.headers["host"], "app");
    assert_eq!(seen.headers["x-keep"], "1");
    for dropped in [
        "x-drop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(
            !seen.headers.contains_key(dropped),
            "{dropped} was forwarded"
        );
    }
    Ok(())
}

#[tokio::test]
async fn cpu_deadline_ignores_fetch_wait() -> Result {
    // The deadline leaves room for a loaded test machine, the wait is ten
    // times as long.
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_millis(1000))).await;
    let config = format!(
        "{}{}",
        upstreams(&[("slow", slow.addr.to_string())]),
        fetch_route(
            "[\"slow\"]",
            "[{ upstream = \"slow\", path = \"/slow\", timeout_ms = 3000 }]",
            "cpu_deadline = \"100ms\"",
        )
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/fetch")).await?;
    assert_eq!(
        got.status, 200,
        "the 1000 ms wait does not count against the 100 ms deadline"
    );
    assert_eq!(got.json()["results"][0]["status"], 200);
    assert!(!node.log().contains("worker call failed"));
    Ok(())
}

#[tokio::test]
async fn hook_wait_cap_cuts_fetch_timeouts() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let config = format!(
        "[runtime.fetch]\nmax_wait_per_hook = \"300ms\"\n\n{}{}",
        upstreams(&[("slow", slow.addr.to_string())]),
        fetch_route(
            "[\"slow\"]",
            "[{ upstream = \"slow\", path = \"/slow\", timeout_ms = 5000 }]\nrounds = 2",
            "",
        )
    );
    let node = Node::start(&config)?;

    // The first request's 5 s timeout is cut to the hook's 300 ms of
    // waiting. The second, sent after, has nothing left and is not sent.
    let started = Instant::now();
    let got = get(&node.url("/fetch")).await?;
    assert_eq!(got.status, 200);
    let results = &got.json()["results"];
    assert_eq!(results[0]["error"], "timed_out");
    assert_eq!(results[1]["error"], "invalid_request");
    assert_eq!(
        results[1]["detail"],
        "over the limit of 300ms of waiting per worker call"
    );
    assert_eq!(slow.count(), 1);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "the fetch waited {:?}",
        started.elapsed()
    );
    Ok(())
}

#[test]
fn explain_lists_fetch_upstreams() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n{}",
        home_config(
            &upstreams(&[
                ("recs", "127.0.0.1:9".to_owned()),
                ("history", "127.0.0.1:9".to_owned()),
                ("billing", "127.0.0.1:9".to_owned()),
            ]),
            &sections("2s", false),
            SHAPES,
        )
    )
    .replace(
        "{modules}",
        &crate::harness::modules_dir().display().to_string(),
    );
    std::fs::write(&path, config).unwrap();
    let output = edge(&[
        "routes",
        "explain",
        "--config",
        &path.display().to_string(),
        "GET",
        "/tv/home",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(stdout.contains("bff-aggregate.wasm"), "{stdout}");
    assert!(
        stdout.contains("    fetch: recs, history, billing"),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "      timeout 1s by default, at most 10s; at most 16 requests a send call and 64 a \
             hook call, waiting at most 30s in all; responses up to 1.0 MiB"
        ),
        "{stdout}"
    );
}

#[test]
fn check_rejects_unknown_fetch_upstream() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
             [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
             [[routes]]\nname = \"r\"\nupstream = \"app\"\n\n\
             [[routes.workers]]\nmodule = \"m.wasm\"\nfetch = [\"app\", \"ghost\"]\n",
            "edge.toml:13: routes[0].workers[0].fetch: no upstream named \"ghost\"",
        ),
        (
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
             [runtime.fetch]\ndefault_timeout = \"2s\"\nmax_timeout = \"1s\"\n",
            "runtime.fetch.max_timeout: 1s is shorter than runtime.fetch.default_timeout (2s)",
        ),
        (
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
             [runtime.fetch]\nmax_requests_per_call = 0\n",
            "runtime.fetch.max_requests_per_call: must be at least 1",
        ),
        (
            "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
             [runtime]\nmax_memory = \"1MiB\"\n[runtime.fetch]\nmax_response_body = \"2MiB\"\n",
            "runtime.fetch.max_response_body: 2.0 MiB is over runtime.max_memory (1.0 MiB)",
        ),
    ];
    for (text, expected) in cases {
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        let output = edge(&["check", &path.display().to_string()]);
        assert!(!output.status.success(), "check passed: {text}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(expected), "{stderr}");
    }
}
