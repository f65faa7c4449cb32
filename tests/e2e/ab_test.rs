//! The `ab-test` worker through a real node: variant headers, the sticky
//! cookie, per-variant upstreams and config errors.

use crate::cli::check_fails;
use crate::harness::{send, shared_cache_dir, Node, Reply, Result, Upstream};

/// Returns the config of a node with upstreams `app` (the route's) and `v2`
/// (variant `new`'s), and an ab-test worker on every path with the extra
/// config lines `extra`. The CPU deadline is generous because these tests
/// check behaviour, and a loaded machine can stretch the 50ms default.
fn config(app: &Upstream, v2: &Upstream, extra: &str) -> String {
    format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n[upstreams.v2]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"shop\"\nprefix = \"/\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/ab-test.wasm\"\n\
         cpu_deadline = \"2s\"\n\
         [routes.workers.config]\nexperiment = \"checkout\"\n\
         variants = [\n\
         {{ name = \"control\", weight = 50 }},\n\
         {{ name = \"new\", weight = 50, upstream = \"v2\" }},\n]\n\
         user_id = [{{ cookie = \"uid\" }}, {{ header = \"x-user-id\" }}]\n{extra}\n",
        app.addr, v2.addr
    )
}

/// Returns the `Set-Cookie` values of a response.
fn set_cookies(got: &crate::harness::Got) -> Vec<String> {
    got.headers
        .get_all("set-cookie")
        .iter()
        .map(|value| value.to_str().unwrap().to_string())
        .collect()
}

/// Returns the variant the upstreams saw for the last request, checking
/// that it went to the variant's upstream with one value per header.
fn last_variant(app: &Upstream, v2: &Upstream, app_before: usize) -> String {
    let (seen, expected) = if app.count() > app_before {
        (app.last(), "control")
    } else {
        (v2.last(), "new")
    };
    let variants: Vec<_> = seen.headers.get_all("x-variant").iter().collect();
    assert_eq!(variants.len(), 1, "one x-variant reaches the upstream");
    assert_eq!(variants[0], expected, "the variant's upstream got it");
    let experiments: Vec<_> = seen.headers.get_all("x-experiment").iter().collect();
    assert_eq!(experiments, ["checkout"]);
    expected.to_string()
}

#[tokio::test]
async fn ab_test() -> Result {
    let (app, v2) = (Upstream::echo().await, Upstream::echo().await);
    let node = Node::start(&config(&app, &v2, ""))?;

    // Users get their variant on every request, and each variant goes to
    // its own upstream.
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..40 {
        let id = format!("user-{user}");
        let before = app.count();
        let got = send("GET", &node.url("/cart"), &[("x-user-id", &id)], b"").await?;
        assert_eq!(got.status, 200);
        let first = last_variant(&app, &v2, before);
        for _ in 0..2 {
            let before = app.count();
            send("GET", &node.url("/cart"), &[("x-user-id", &id)], b"").await?;
            assert_eq!(last_variant(&app, &v2, before), first, "user {id}");
        }
        seen.insert(first);
    }
    assert_eq!(seen.len(), 2, "40 users at 50/50 reach both variants");
    Ok(())
}

#[tokio::test]
async fn ab_test_strips_client_headers() -> Result {
    let (app, v2) = (Upstream::echo().await, Upstream::echo().await);
    let node = Node::start(&config(&app, &v2, ""))?;
    for _ in 0..10 {
        let before = app.count();
        let got = send(
            "GET",
            &node.url("/"),
            &[
                ("x-variant", "forged"),
                ("x-experiment", "forged"),
                ("x-user-id", "mallory"),
            ],
            b"",
        )
        .await?;
        assert_eq!(got.status, 200);
        // last_variant checks one value each, and that it is not "forged".
        last_variant(&app, &v2, before);
    }
    Ok(())
}

#[tokio::test]
async fn ab_test_sticky_cookie() -> Result {
    let (app, v2) = (Upstream::echo().await, Upstream::echo().await);
    let node = Node::start(&config(
        &app,
        &v2,
        "cookie = { path = \"/shop\", max_age = \"1h\", secure = true }",
    ))?;

    // An anonymous first request gets a random draw and the cookie.
    let before = app.count();
    let first = send("GET", &node.url("/shop"), &[], b"").await?;
    assert_eq!(first.status, 200);
    let variant = last_variant(&app, &v2, before);
    assert_eq!(
        set_cookies(&first),
        [format!(
            "ab_checkout={variant}; Path=/shop; Max-Age=3600; HttpOnly; SameSite=Lax; Secure"
        )]
    );

    // The same cookie gives the same variant, and no new cookie.
    let cookie = format!("theme=dark; ab_checkout={variant}");
    for _ in 0..10 {
        let before = app.count();
        let again = send("GET", &node.url("/shop"), &[("cookie", &cookie)], b"").await?;
        assert_eq!(again.status, 200);
        assert_eq!(last_variant(&app, &v2, before), variant);
        assert!(set_cookies(&again).is_empty(), "{:?}", set_cookies(&again));
    }

    // A cookie for a variant the experiment no longer has is replaced.
    let stale = send(
        "GET",
        &node.url("/shop"),
        &[("cookie", "ab_checkout=retired")],
        b"",
    )
    .await?;
    let cookies = set_cookies(&stale);
    assert_eq!(cookies.len(), 1);
    assert!(
        cookies[0].starts_with("ab_checkout=control;")
            || cookies[0].starts_with("ab_checkout=new;"),
        "{cookies:?}"
    );
    Ok(())
}

#[tokio::test]
async fn ab_test_keeps_upstream_cookies() -> Result {
    let app =
        Upstream::start(|_| Reply::Headers(vec![("set-cookie", "session=abc; Path=/")])).await;
    let v2 = Upstream::start(|_| Reply::Headers(vec![("set-cookie", "session=abc; Path=/")])).await;
    let node = Node::start(&config(&app, &v2, ""))?;
    let got = send("GET", &node.url("/"), &[], b"").await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let cookies = set_cookies(&got);
    assert_eq!(cookies.len(), 2, "{cookies:?}");
    assert_eq!(cookies[0], "session=abc; Path=/");
    assert!(cookies[1].starts_with("ab_checkout="), "{cookies:?}");
    Ok(())
}

#[tokio::test]
async fn ab_test_user_cookie_is_user_id() -> Result {
    let (app, v2) = (Upstream::echo().await, Upstream::echo().await);
    let node = Node::start(&config(&app, &v2, ""))?;
    // The `uid` cookie comes before the header in `user_id`, so the variant
    // follows the cookie's id whatever the header contains.
    let before = app.count();
    send("GET", &node.url("/"), &[("cookie", "uid=42")], b"").await?;
    let by_cookie = last_variant(&app, &v2, before);
    for header in ["a", "b", "c", "d"] {
        let before = app.count();
        send(
            "GET",
            &node.url("/"),
            &[("cookie", "uid=42"), ("x-user-id", header)],
            b"",
        )
        .await?;
        assert_eq!(last_variant(&app, &v2, before), by_cookie);
    }
    Ok(())
}

#[tokio::test]
async fn ab_test_reads_context_user() -> Result {
    let (app, v2) = (Upstream::echo().await, Upstream::echo().await);
    // Route `/ctx`: a fixture worker sets context `user` from `x-login`, and
    // ab-test reads it. Route `/hdr`: ab-test reads `x-login` itself. The
    // same experiment and user id give the same variant on both.
    let ab_test = |user_id: &str| {
        format!(
            "[[routes.workers]]\nmodule = \"{{modules}}/ab-test.wasm\"\n\
             cpu_deadline = \"2s\"\n\
             [routes.workers.config]\nexperiment = \"checkout\"\n\
             variants = [{{ name = \"control\", weight = 1 }}, \
             {{ name = \"new\", weight = 1, upstream = \"v2\" }}]\n\
             user_id = [{user_id}]\n\n"
        )
    };
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n[upstreams.v2]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"ctx\"\nprefix = \"/ctx\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"context-set\"\nname = \"user\"\n\
         from_header = \"x-login\"\n\n{}\
         [[routes]]\nname = \"hdr\"\nprefix = \"/hdr\"\nupstream = \"app\"\n\n{}",
        app.addr,
        v2.addr,
        ab_test("{ context = \"user\" }"),
        ab_test("{ header = \"x-login\" }"),
    );
    let node = Node::start(&config)?;
    let mut seen = std::collections::BTreeSet::new();
    for user in 0..20 {
        let login = format!("user-{user}");
        let headers = [("x-login", login.as_str())];
        let before = app.count();
        send("GET", &node.url("/ctx"), &headers, b"").await?;
        let by_context = last_variant(&app, &v2, before);
        let before = app.count();
        send("GET", &node.url("/hdr"), &headers, b"").await?;
        assert_eq!(last_variant(&app, &v2, before), by_context, "{login}");
        seen.insert(by_context);
    }
    assert_eq!(seen.len(), 2, "20 users at 50/50 reach both variants");
    Ok(())
}

#[test]
fn ab_test_invalid_config_rejected() {
    let base = "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
                [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
                [[routes]]\nname = \"shop\"\nprefix = \"/\"\nupstream = \"app\"\n\n\
                [[routes.workers]]\nmodule = \"{modules}/ab-test.wasm\"\n\
                [routes.workers.config]\nexperiment = \"checkout\"\n";
    let cases = [
        (
            "variants = [{ name = \"a\", weight = 1 }, { name = \"b\", weight = 0 }]",
            "variants[1].weight: must be greater than 0",
        ),
        (
            "variants = [{ name = \"a\", weight = 1 }, { name = \"a\", weight = 2 }]",
            "variants[1].name: \"a\" names another variant already",
        ),
        ("variants = []", "variants: needs at least one variant"),
        (
            "variant_header = \"Content-Length\"\nvariants = [{ name = \"a\", weight = 1 }]",
            "variant_header: \"Content-Length\" is a header the node sets itself, so a worker \
             cannot set it",
        ),
        (
            "variants = [{ name = \"a\", weight = \"half\" }]",
            "variants[0].weight: invalid type: string \"half\", expected u32",
        ),
        (
            "variants = [{ name = \"a\", weight = 1, upstream = \"missing\" }]",
            "variants[0].upstream: no upstream named \"missing\" in the node's config",
        ),
    ];
    // The shared compile cache spares compiling the module for each case.
    let runtime = format!(
        "[runtime]\ncache_dir = {:?}\n",
        shared_cache_dir().display().to_string()
    );
    for (variants, expected) in cases {
        let stderr = check_fails(&format!("{runtime}{base}{variants}\n"));
        assert!(stderr.contains("routes[0].workers[0]"), "{stderr}");
        assert!(
            stderr.contains("the worker rejected its config: invalid ab-test config"),
            "{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
}
