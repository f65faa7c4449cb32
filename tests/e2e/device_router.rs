//! The `device-router` worker through a real node: the class header, routing
//! per class, the path prefix rewrite and config errors.

use crate::cli::check_fails;
use crate::harness::{send, shared_cache_dir, Node, Result, Upstream};

const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) \
                      AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 \
                      Safari/604.1";
const GALAXY_TAB: &str = "Mozilla/5.0 (Linux; Android 14; SM-X710) AppleWebKit/537.36 (KHTML, \
                          like Gecko) Chrome/131.0.0.0 Safari/537.36";
const WINDOWS_CHROME: &str = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 \
                              (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36";
const TIZEN_TV: &str = "Mozilla/5.0 (SMART-TV; LINUX; Tizen 6.0) AppleWebKit/537.36 (KHTML, \
                        like Gecko) 76.0.3809.146/6.0 TV Safari/537.36";
const GOOGLEBOT: &str = "Mozilla/5.0 (compatible; Googlebot/2.1; +http://www.google.com/bot.html)";

struct Setup {
    node: Node,
    app: Upstream,
    tv: Upstream,
    prerender: Upstream,
}

/// Starts a node whose route sends tv and bot clients to their own upstreams and
/// puts mobile and tablet paths under prefixes. The CPU deadline is generous
/// because these tests check behaviour, and a loaded machine can stretch the
/// 50ms default.
async fn setup() -> Result<Setup> {
    let (app, tv, prerender) = (
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    );
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n[upstreams.tv-app]\ntargets = [\"{}\"]\n\
         [upstreams.prerender]\ntargets = [\"{}\"]\n\n\
         [[routes]]\nname = \"web\"\nprefix = \"/\"\nupstream = \"app\"\n\
         response_headers = {{ vary = \"User-Agent, Sec-CH-UA-Mobile\" }}\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/device-router.wasm\"\n\
         cpu_deadline = \"2s\"\n\
         [routes.workers.config]\ndefault_class = \"mobile\"\n\
         upstreams = {{ tv = \"tv-app\", bot = \"prerender\" }}\n\
         path_prefixes = {{ mobile = \"/mobile\", tablet = \"/tablet/\" }}\n",
        app.addr, tv.addr, prerender.addr
    );
    let node = Node::start(&config)?;
    Ok(Setup {
        node,
        app,
        tv,
        prerender,
    })
}

/// Checks that `upstream` got the request last, for `target`, with exactly
/// one `x-device-class` of `class`.
fn assert_last(upstream: &Upstream, target: &str, class: &str) {
    let seen = upstream.last();
    assert_eq!(seen.target, target);
    let classes: Vec<_> = seen.headers.get_all("x-device-class").iter().collect();
    assert_eq!(classes, [class], "for {target}");
}

#[tokio::test]
async fn device_router() -> Result {
    let Setup {
        node,
        app,
        tv,
        prerender,
    } = setup().await?;
    let get = |headers: &'static [(&'static str, &'static str)]| {
        let url = node.url("/home?tab=1");
        async move { send("GET", &url, headers, b"").await }
    };

    let got = get(&[("user-agent", IPHONE)]).await?;
    assert_eq!(got.status, 200);
    assert_last(&app, "/mobile/home?tab=1", "mobile");
    // The route's response headers tell caches what the choice depended on.
    assert_eq!(got.header("vary"), Some("User-Agent, Sec-CH-UA-Mobile"));

    assert_eq!(get(&[("user-agent", GALAXY_TAB)]).await?.status, 200);
    assert_last(&app, "/tablet/home?tab=1", "tablet");

    assert_eq!(get(&[("user-agent", WINDOWS_CHROME)]).await?.status, 200);
    assert_last(&app, "/home?tab=1", "desktop");

    // The client hint makes a desktop-looking Chromium mobile.
    let hinted = get(&[("user-agent", WINDOWS_CHROME), ("sec-ch-ua-mobile", "?1")]).await?;
    assert_eq!(hinted.status, 200);
    assert_last(&app, "/mobile/home?tab=1", "mobile");

    // No User-Agent: the default class, mobile here.
    assert_eq!(get(&[]).await?.status, 200);
    assert_last(&app, "/mobile/home?tab=1", "mobile");
    assert_eq!(app.count(), 5);

    assert_eq!(get(&[("user-agent", TIZEN_TV)]).await?.status, 200);
    assert_last(&tv, "/home?tab=1", "tv");
    assert_eq!(get(&[("user-agent", GOOGLEBOT)]).await?.status, 200);
    assert_last(&prerender, "/home?tab=1", "bot");
    assert_eq!(get(&[("user-agent", "curl/8.5.0")]).await?.status, 200);
    assert_last(&prerender, "/home?tab=1", "bot");

    assert_eq!(app.count(), 5);
    assert_eq!(tv.count(), 1);
    assert_eq!(prerender.count(), 2);
    Ok(())
}

#[tokio::test]
async fn device_router_strips_client_class() -> Result {
    let Setup { node, app, .. } = setup().await?;
    let got = send(
        "GET",
        &node.url("/home"),
        &[
            ("user-agent", WINDOWS_CHROME),
            ("x-device-class", "tv"),
            ("X-Device-Class", "bot"),
        ],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    assert_last(&app, "/home", "desktop");
    Ok(())
}

#[tokio::test]
async fn device_router_keeps_prefixed_path() -> Result {
    let Setup { node, app, .. } = setup().await?;
    let got = send(
        "GET",
        &node.url("/mobile/home"),
        &[("user-agent", IPHONE)],
        b"",
    )
    .await?;
    assert_eq!(got.status, 200);
    assert_last(&app, "/mobile/home", "mobile");
    Ok(())
}

#[test]
fn device_router_invalid_config_rejected() {
    let base = "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
                [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
                [[routes]]\nname = \"web\"\nprefix = \"/\"\nupstream = \"app\"\n\n\
                [[routes.workers]]\nmodule = \"{modules}/device-router.wasm\"\n\
                [routes.workers.config]\n";
    let cases = [
        (
            "path_prefixes = { mobile = \"m\" }",
            "path_prefixes.mobile: \"m\" does not start with `/`",
        ),
        (
            "upstreams = { phone = \"app\" }",
            "upstreams.phone: unknown device class; expected mobile, tablet, desktop, tv or bot",
        ),
        (
            "upstreams = { tv = \"tv-app\" }",
            "upstreams.tv: no upstream named \"tv-app\" in the node's config",
        ),
        (
            "default_class = \"watch\"",
            "default_class: unknown variant `watch`",
        ),
    ];
    // The shared compile cache spares compiling the module for each case.
    let runtime = format!(
        "[runtime]\ncache_dir = {:?}\n",
        shared_cache_dir().display().to_string()
    );
    for (line, expected) in cases {
        let stderr = check_fails(&format!("{runtime}{base}{line}\n"));
        assert!(stderr.contains("routes[0].workers[0]"), "{stderr}");
        assert!(
            stderr.contains("the worker rejected its config: invalid device-router config"),
            "{stderr}"
        );
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in {stderr}"
        );
    }
}

#[test]
fn route_response_headers_must_be_valid() {
    let base =
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
                [[routes]]\nname = \"web\"\nupstream = \"app\"\n";
    for (line, expected) in [
        (
            "response_headers = { \"bad name\" = \"x\" }",
            "not a valid header name",
        ),
        (
            "response_headers = { vary = \"a\\nb\" }",
            "not a valid header value",
        ),
        (
            "response_headers = { content-length = \"3\" }",
            "framing or hop-by-hop header",
        ),
    ] {
        let stderr = check_fails(&format!("{base}{line}\n"));
        assert!(stderr.contains("edge.toml:9"), "{stderr}");
        assert!(stderr.contains("routes[0].response_headers."), "{stderr}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}
