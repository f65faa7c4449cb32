//! Routing, forwarding headers, streaming and upstream failures.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{
    free_port, get, get_h2, get_h2_with, raw_request, send, Node, Reply, Result, Upstream,
};

/// A config with one route, `all`, on every path to `upstream`.
fn one_route(upstream: &Upstream) -> String {
    format!(
        "{}\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", upstream)
    )
}

fn upstream_block(name: &str, upstream: &Upstream) -> String {
    format!("[upstreams.{name}]\ntargets = [\"{}\"]\n", upstream.addr)
}

#[tokio::test]
async fn routes_by_host_method_and_path() -> Result {
    let (users, admin, writes, fallback) = (
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
        Upstream::echo().await,
    );
    let config = format!(
        r#"
{}{}{}{}
[[routes]]
name = "fallback"
prefix = "/"
upstream = "fallback"

[[routes]]
name = "users"
prefix = "/users"
upstream = "users"

[[routes]]
name = "user-writes"
prefix = "/users"
methods = ["POST", "PUT"]
upstream = "writes"

[[routes]]
name = "admin"
host = "admin.example.com"
prefix = "/"
upstream = "admin"
"#,
        upstream_block("users", &users),
        upstream_block("admin", &admin),
        upstream_block("writes", &writes),
        upstream_block("fallback", &fallback),
    );
    let node = Node::start(&config)?;

    assert_eq!(get(&node.url("/users/7")).await?.status, 200);
    assert_eq!(users.last().target, "/users/7");
    send("POST", &node.url("/users"), &[], b"{}").await?;
    assert_eq!(writes.last().method, "POST");
    send(
        "GET",
        &node.url("/users"),
        &[("host", "admin.example.com")],
        b"",
    )
    .await?;
    assert_eq!(admin.count(), 1);
    get(&node.url("/usersx")).await?;
    assert_eq!(fallback.last().target, "/usersx");
    assert_eq!(users.count(), 1);
    Ok(())
}

#[tokio::test]
async fn unmatched_request_gets_404_json() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"users\"\nprefix = \"/users\"\nupstream = \"users\"\n",
        upstream_block("users", &upstream)
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/orders")).await?;
    assert_eq!(got.status, 404);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.json()["error"], "no_route");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn looped_request_gets_508() -> Result {
    let app = Upstream::echo().await;
    let port = free_port();
    // The `loop` upstream is the node itself.
    let config = format!(
        "[node]\nname = \"loop-node\"\n\n[[listeners]]\naddr = \"127.0.0.1:{port}\"\n\n\
         [upstreams.loop]\ntargets = [\"127.0.0.1:{port}\"]\n{}\n\
         [[routes]]\nname = \"loop\"\nprefix = \"/loop\"\nupstream = \"loop\"\n\n\
         [[routes]]\nname = \"app\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream_block("app", &app)
    );
    let node = Node::start(&config)?;

    // The node sends the request to itself once and rejects it there. That
    // rejection comes back as the first pass's upstream response.
    let got = get(&node.url("/loop/x")).await?;
    assert_eq!(got.status, 508);
    assert_eq!(got.header("content-type"), Some("application/json"));
    assert_eq!(got.json()["error"], "loop_detected");

    // A client's `Via` that names the node is rejected before routing.
    let via = [("via", "1.0 cache-1, 1.1 loop-node")];
    let got = send("GET", &node.url("/app"), &via, b"").await?;
    assert_eq!(got.status, 508);
    assert_eq!(
        got.json()["message"],
        "this request passed through this node before (its Via names the node), so it is not \
         sent on again"
    );
    assert_eq!(app.count(), 0, "nothing reached the upstream");

    // Other proxies' names, and this name inside a longer one, pass.
    let via = [("via", "1.1 loop-node-2, 1.1 other (loop-node)")];
    let got = send("GET", &node.url("/app"), &via, b"").await?;
    assert_eq!(got.status, 200);
    assert_eq!(app.count(), 1);
    Ok(())
}

#[tokio::test]
async fn unasked_protocol_switch_gets_502() -> Result {
    let upstream = Upstream::start(|_| Reply::Status(101)).await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n[upstreams.app.breaker]\n\
         consecutive_failures = 2\n[upstreams.app.retry]\nmax_retries = 0\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    for _ in 0..2 {
        let got = get(&node.url("/switch")).await?;
        assert_eq!(got.status, 502);
        assert_eq!(got.json()["error"], "upstream_unavailable");
    }
    // The breaker counts it as a failure, as it does an invalid response.
    let got = get(&node.url("/switch")).await?;
    assert_eq!(got.status, 503);
    assert_eq!(got.json()["error"], "circuit_open");
    assert_eq!(upstream.count(), 2);
    Ok(())
}

#[tokio::test]
async fn slow_upload_gets_408() -> Result {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\nresponse_timeout = \"300ms\"\n\
         [upstreams.app.breaker]\nconsecutive_failures = 1\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await?;
    // Half of the announced body, then nothing more.
    stream
        .write_all(b"POST /upload HTTP/1.1\r\nHost: t\r\nContent-Length: 800\r\n\r\n")
        .await?;
    stream.write_all(&[b'a'; 400]).await?;
    let mut response = Vec::new();
    let mut buffer = [0u8; 4096];
    while !response.windows(4).any(|w| w == b"\r\n\r\n") {
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await??;
        assert!(
            read > 0,
            "the node closed the connection without a response"
        );
        response.extend_from_slice(&buffer[..read]);
    }
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 408"), "{response}");
    // The upstream was not at fault: its breaker stays closed.
    let got = get(&node.url("/after")).await?;
    assert_eq!(got.status, 200);
    assert!(!node.log().contains("upstream timed out"), "{}", node.log());
    Ok(())
}

#[tokio::test]
async fn other_transfer_coding_gets_501() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: gzip, chunked\r\n\
         Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 501"), "{response}");
    assert!(
        response.contains("\"unsupported_transfer_coding\""),
        "{response}"
    );
    let twice = raw_request(
        node.addr,
        "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked, chunked\r\n\
         Connection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n",
    )
    .await?;
    assert!(twice.starts_with("HTTP/1.1 400"), "{twice}");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn escaped_characters_stay_escaped_upstream() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"all\"\nprefix = \"/\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    // A segment of one escaped character once reached the upstream decoded,
    // so `/admin/%3F` arrived as `/admin/?` and `/%23/x` as `/`.
    for (sent, expected) in [
        ("/admin/%3F", "/admin/%3F"),
        ("/%3F/home", "/%3F/home"),
        ("/%23/x", "/%23/x"),
        ("/a/%25/b", "/a/%25/b"),
        ("/a/%20/b", "/a/%20/b"),
    ] {
        let got = get(&node.url(sent)).await?;
        assert_eq!(got.status, 200, "{sent}");
        assert_eq!(upstream.last().target, expected, "{sent}");
    }

    // Raw UTF-8 in the path or query goes upstream percent-encoded, as the
    // decoded form of `%C3%A9` does. Raw bytes that are not UTF-8 get 400.
    let response = raw_request(
        node.addr,
        "GET /caf\u{e9}/x?q=1 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(upstream.last().target, "/caf%C3%A9/x?q=1");
    let response = raw_request(
        node.addr,
        "GET /x?q=caf\u{e9}&r=%41 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(upstream.last().target, "/x?q=caf%C3%A9&r=%41");
    let before = upstream.count();
    let response = raw_request(
        node.addr,
        b"GET /caf\xe9 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert_eq!(upstream.count(), before);
    Ok(())
}

#[tokio::test]
async fn path_is_normalised_before_routing() -> Result {
    let (users, admin) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "{}{}\n[[routes]]\nname = \"users\"\nprefix = \"/users\"\nupstream = \"users\"\n\n\
         [[routes]]\nname = \"admin\"\nprefix = \"/admin\"\nupstream = \"admin\"\n",
        upstream_block("users", &users),
        upstream_block("admin", &admin)
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/admin/../users/%37")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(users.last().target, "/users/7");
    get(&node.url("/users/a%20b?x=1")).await?;
    assert_eq!(users.last().target, "/users/a%20b?x=1");
    assert_eq!(admin.count(), 0);

    let encoded_slash = get(&node.url("/admin%2F..%2Fusers")).await?;
    assert_eq!(encoded_slash.status, 400);
    assert_eq!(encoded_slash.json()["error"], "invalid_path");
    // Tomcat and Spring read `;` as the start of path parameters, so these
    // would reach /admin there while the node matched another route.
    for sent in ["/users/..;/admin/x", "/admin;a/x", "/users/..%3B/admin/x"] {
        let got = get(&node.url(sent)).await?;
        assert_eq!(got.status, 400, "{sent}");
        assert_eq!(got.json()["error"], "invalid_path", "{sent}");
        let message = got.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("';'"), "{message}");
    }
    assert_eq!(admin.count(), 0);
    assert_eq!(users.count(), 2);
    Ok(())
}

#[tokio::test]
async fn case_insensitive_route_matches_any_case() -> Result {
    let (admin, other) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "{}{}\n[[routes]]\nname = \"admin\"\nprefix = \"/admin\"\nupstream = \"admin\"\n\
         case_sensitive = false\n\n\
         [[routes]]\nname = \"reports\"\npattern = \"/reports/{{id}}/pdf\"\nupstream = \"admin\"\n\
         case_sensitive = false\n\n\
         [[routes]]\nname = \"users\"\nprefix = \"/users\"\nupstream = \"admin\"\n\n\
         [[routes]]\nname = \"rest\"\nprefix = \"/\"\nupstream = \"other\"\n",
        upstream_block("admin", &admin),
        upstream_block("other", &other)
    );
    let node = Node::start(&config)?;
    for sent in ["/admin/x", "/ADMIN/x", "/%41dmin/x", "/Reports/7/PDF"] {
        assert_eq!(get(&node.url(sent)).await?.status, 200, "{sent}");
        assert_eq!(admin.last().target, sent.replace("%41", "A"), "{sent}");
    }
    assert_eq!(other.count(), 0);
    // Whole segments still: `/administrator` is not below `/admin`.
    get(&node.url("/ADMINistrator")).await?;
    assert_eq!(other.count(), 1);
    // Other routes still match case-sensitively.
    get(&node.url("/USERS/1")).await?;
    assert_eq!(other.count(), 2);

    let dir = tempfile::tempdir()?;
    let with_listener = format!("[[listeners]]\naddr = \"127.0.0.1:0\"\n{config}");
    let path = crate::cli::write_config(dir.path(), &with_listener);
    let explained =
        crate::harness::edge(&["routes", "explain", "--config", &path, "GET", "/USERS"]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(text.contains("(any case) does not match /USERS"), "{text}");
    let explained =
        crate::harness::edge(&["routes", "explain", "--config", &path, "GET", "/ADMIN"]);
    let text = String::from_utf8_lossy(&explained.stdout);
    assert!(
        text.contains("matches route \"admin\" (prefix /admin, any case)"),
        "{text}"
    );

    // Letters beyond ASCII are not folded, so such a rule is rejected.
    let accented = with_listener.replace("prefix = \"/admin\"", "prefix = \"/caf%C3%A9\"");
    let output = crate::harness::edge(&["check", &crate::cli::write_config(dir.path(), &accented)]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("routes[0].case_sensitive"), "{text}");
    assert!(text.contains("characters beyond ASCII"), "{text}");
    Ok(())
}

#[tokio::test]
async fn route_removes_listed_request_headers() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"app\"\nprefix = \"/\"\nupstream = \"app\"\n\
         remove_request_headers = [\"X-HTTP-Method-Override\", \"x-debug\"]\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "POST /items HTTP/1.1\r\nHost: test\r\nX-HTTP-Method-Override: DELETE\r\n\
         X-Debug: 1\r\nX-Kept: 1\r\nContent-Length: 0005\r\nConnection: close\r\n\r\nhello",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last();
    assert!(!seen.headers.contains_key("x-http-method-override"));
    assert!(!seen.headers.contains_key("x-debug"));
    assert_eq!(seen.headers["x-kept"], "1");
    // A length with leading zeros goes upstream as a plain number.
    assert_eq!(seen.headers["content-length"], "5");
    assert_eq!(seen.body_len, 5);

    for (name, reason) in [
        ("host", "a request needs it"),
        ("transfer-encoding", "hop-by-hop"),
        ("content-length", "framing"),
        ("bad name", "not a valid header name"),
        ("x-forwarded-for", "forwarding header"),
        ("via", "forwarding header"),
    ] {
        let bad = format!("[[listeners]]\naddr = \"127.0.0.1:0\"\n{config}")
            .replace("\"x-debug\"", &format!("{name:?}"));
        let dir = tempfile::tempdir()?;
        let output = crate::harness::edge(&["check", &crate::cli::write_config(dir.path(), &bad)]);
        let text = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{name}");
        assert!(text.contains("remove_request_headers[1]"), "{text}");
        assert!(text.contains(reason), "{text}");
    }

    // The hash key of any upstream, where a worker may send the request.
    let hashed = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[upstreams.sticky]\ntargets = [\"127.0.0.1:9\"]\n\
         balance = \"consistent_hash\"\nhash_key = \"header:x-debug\"\n{config}"
    );
    let dir = tempfile::tempdir()?;
    let output = crate::harness::edge(&["check", &crate::cli::write_config(dir.path(), &hashed)]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(
        text.contains("the hash_key of upstream \"sticky\" reads x-debug"),
        "{text}"
    );

    // The node sets x-request-id itself unless the route turns that off.
    let request_id = format!("[[listeners]]\naddr = \"127.0.0.1:0\"\n{config}")
        .replace("\"x-debug\"", "\"x-request-id\"");
    let output =
        crate::harness::edge(&["check", &crate::cli::write_config(dir.path(), &request_id)]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("observability.request_id = false"), "{text}");

    // A limit of the route that counts by the header would lose its key.
    let limited = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n{config}\n[[routes.limits]]\n\
         key = \"header:x-debug\"\nalgorithm = \"fixed_window\"\nrate = \"10/s\"\n"
    );
    let dir = tempfile::tempdir()?;
    let output = crate::harness::edge(&["check", &crate::cli::write_config(dir.path(), &limited)]);
    let text = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "{text}");
    assert!(text.contains("remove_request_headers[1]"), "{text}");
    assert!(text.contains("reads x-debug"), "{text}");
    Ok(())
}

#[tokio::test]
async fn absolute_form_target_decides_the_host() -> Result {
    let (public, secret) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "{}{}\n[[routes]]\nname = \"public\"\nhost = \"public.example.com\"\nupstream = \"public\"\n\n\
         [[routes]]\nname = \"secret\"\nhost = \"secret.example.com\"\nupstream = \"secret\"\n",
        upstream_block("public", &public),
        upstream_block("secret", &secret)
    );
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "GET http://public.example.com/admin HTTP/1.1\r\nHost: secret.example.com\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(public.last().headers["host"], "public.example.com");
    assert_eq!(secret.count(), 0);
    Ok(())
}

#[tokio::test]
async fn absolute_form_without_path_sends_slash() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    let cases = [
        ("http://a.example#top", "/"),
        ("http://a.example#/p", "/"),
        ("http://a.example?q=1", "/?q=1"),
        ("http://a.example?q=1#top", "/?q=1"),
        ("http://a.example", "/"),
    ];
    for (target, expected) in cases {
        let response = raw_request(
            node.addr,
            format!("GET {target} HTTP/1.1\r\nHost: a.example\r\nConnection: close\r\n\r\n"),
        )
        .await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{target}: {response}");
        assert_eq!(upstream.last().target, expected, "{target}");
    }
    Ok(())
}

#[tokio::test]
async fn bad_host_headers_get_400() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    for request in [
        "GET / HTTP/1.1\r\nHost: a.example.com\r\nHost: b.example.com\r\nConnection: close\r\n\r\n",
        "GET / HTTP/1.1\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: evil.com/x?\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a@evil.com\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: api.example.com:abc\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost:\r\nConnection: close\r\n\r\n",
        "GET /x HTTP/1.1\r\nHost: a..example.com\r\nConnection: close\r\n\r\n",
        "GET http://user:pw@example.com/x HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
        "GET http://u:p@abs.example/a HTTP/1.1\r\nHost: abs.example\r\nConnection: close\r\n\r\n",
    ] {
        let response = raw_request(node.addr, request).await?;
        assert!(
            response.starts_with("HTTP/1.1 400"),
            "{request:?}: {response}"
        );
        assert!(
            response.contains("\"invalid_host\""),
            "{request:?}: {response}"
        );
    }
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn lower_case_method_gets_400() -> Result {
    let (guarded, open) = (Upstream::echo().await, Upstream::echo().await);
    let config = format!(
        "{}{}[[routes]]\nname = \"delete\"\nprefix = \"/api\"\nmethods = [\"DELETE\"]\n\
         upstream = \"guarded\"\n\n[[routes]]\nname = \"open\"\nprefix = \"/api\"\n\
         upstream = \"open\"\n",
        upstream_block("guarded", &guarded),
        upstream_block("open", &open)
    );
    let node = Node::start(&config)?;
    for method in ["delete", "Delete", "get", "purge"] {
        let request =
            format!("{method} /api/users/7 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let response = raw_request(node.addr, &request).await?;
        assert!(response.starts_with("HTTP/1.1 400"), "{method}: {response}");
        assert!(
            response.contains("\"error\":\"invalid_method\""),
            "{method}: {response}"
        );
    }
    assert_eq!(guarded.count() + open.count(), 0);

    // Upper-case methods, standard or not, are served.
    let response = raw_request(
        node.addr,
        "DELETE /api/users/7 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(guarded.count(), 1);
    let response = raw_request(
        node.addr,
        "PURGE /api/users/7 HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(open.count(), 1);
    Ok(())
}

#[tokio::test]
async fn http10_without_host_gets_upstream_name() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let response = raw_request(node.addr, "GET /old HTTP/1.0\r\n\r\n").await?;
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert_eq!(upstream.last().headers["host"], "app");
    Ok(())
}

#[tokio::test]
async fn connection_header_cannot_strip_host() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "GET / HTTP/1.1\r\nHost: keep.example.com\r\nConnection: close, host\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    assert_eq!(upstream.last().headers["host"], "keep.example.com");
    Ok(())
}

#[tokio::test]
async fn forwarding_headers_are_set() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[node]\nname = \"edge-test\"\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\n{}\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let got = send(
        "GET",
        &node.url("/"),
        &[
            ("x-forwarded-for", "6.6.6.6"),
            ("forwarded", "for=6.6.6.6;proto=https"),
        ],
        b"",
    )
    .await?;
    assert_eq!(got.header("via"), Some("1.1 edge-test"));
    let seen = upstream.last().headers;
    // The peer is not a trusted proxy, so its claims are replaced or removed.
    assert_eq!(seen["x-forwarded-for"], "127.0.0.1");
    assert!(seen.get("forwarded").is_none(), "{seen:?}");
    assert_eq!(seen["x-forwarded-proto"], "http");
    assert_eq!(seen["x-forwarded-host"], node.addr.to_string().as_str());
    assert_eq!(seen["host"], node.addr.to_string().as_str());
    assert_eq!(seen["via"], "1.1 edge-test");

    // The node responds to `Expect: 100-continue` itself and does not pass it on.
    let expecting = send(
        "POST",
        &node.url("/"),
        &[("expect", "100-continue")],
        b"body",
    )
    .await?;
    assert_eq!(expecting.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.body_len, 4);
    assert!(!seen.headers.contains_key("expect"));
    Ok(())
}

#[tokio::test]
async fn sighup_does_not_stop_a_node_without_tls() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    // logrotate sends SIGHUP after it moves the log files.
    node.signal("HUP");
    assert!(node.log_contains("SIGHUP received"));
    assert_eq!(get(&node.url("/")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn trusted_proxy_forwarded_for_is_appended() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\ntrusted_proxies = [\"127.0.0.0/8\"]\n\n{}\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    send(
        "GET",
        &node.url("/"),
        &[("x-forwarded-for", "203.0.113.5")],
        b"",
    )
    .await?;
    assert_eq!(
        upstream.last().headers["x-forwarded-for"],
        "203.0.113.5, 127.0.0.1"
    );
    send(
        "GET",
        &node.url("/"),
        &[
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "203.0.113.5"),
        ],
        b"",
    )
    .await?;
    assert_eq!(
        upstream.last().headers["x-forwarded-for"],
        "198.51.100.1, 203.0.113.5, 127.0.0.1"
    );
    // An empty value names no hop, so it leaves no empty element.
    send(
        "GET",
        &node.url("/"),
        &[("x-forwarded-for", ""), ("x-forwarded-for", "203.0.113.5")],
        b"",
    )
    .await?;
    assert_eq!(
        upstream.last().headers["x-forwarded-for"],
        "203.0.113.5, 127.0.0.1"
    );
    send("GET", &node.url("/"), &[("x-forwarded-for", " ")], b"").await?;
    assert_eq!(upstream.last().headers["x-forwarded-for"], "127.0.0.1");
    // A trusted proxy's `Forwarded` chain goes on, with this hop added.
    send(
        "GET",
        &node.url("/"),
        &[("forwarded", "for=203.0.113.5;proto=https")],
        b"",
    )
    .await?;
    let forwarded: Vec<_> = upstream
        .last()
        .headers
        .get_all("forwarded")
        .iter()
        .map(|value| value.to_str().unwrap_or_default().to_owned())
        .collect();
    assert_eq!(
        forwarded,
        ["for=203.0.113.5;proto=https", "for=127.0.0.1;proto=http"]
    );
    // obs-text from an earlier hop is kept byte for byte, not rejected.
    let response = raw_request(
        node.addr,
        "GET / HTTP/1.1\r\nHost: t\r\nX-Forwarded-For: caf\u{e9}\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let forwarded = upstream.last().headers["x-forwarded-for"]
        .as_bytes()
        .to_vec();
    assert_eq!(forwarded, "caf\u{e9}, 127.0.0.1".as_bytes());
    Ok(())
}

#[tokio::test]
async fn hop_by_hop_headers_removed_both_ways() -> Result {
    let upstream = Upstream::start(|_| {
        Reply::Headers(vec![
            ("connection", "x-hop-back"),
            ("x-hop-back", "1"),
            ("x-end-back", "1"),
            ("keep-alive", "timeout=5"),
        ])
    })
    .await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "GET /hop HTTP/1.1\r\nHost: test\r\nConnection: close, x-hop\r\nX-Hop: 1\r\nX-End: 1\r\n\
         Keep-Alive: timeout=5\r\nTE: trailers\r\nUpgrade: foo\r\nProxy-Authorization: secret\r\n\
         HTTP2-Settings: AAMAAABkAAQAoAAAAAIAAAAA\r\n\r\n",
    )
    .await?;
    let seen = upstream.last().headers;
    assert!(seen.contains_key("x-end"));
    for name in [
        "x-hop",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
        "http2-settings",
    ] {
        assert!(
            !seen.contains_key(name),
            "upstream saw hop-by-hop header {name}"
        );
    }
    assert_ne!(
        seen.get("connection").map(|v| v.to_str().unwrap()),
        Some("close, x-hop")
    );

    let head = response
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .to_ascii_lowercase();
    assert!(head.starts_with("http/1.1 200"), "{head}");
    assert!(head.contains("x-end-back: 1"), "{head}");
    assert!(
        !head.contains("x-hop-back"),
        "client saw x-hop-back: {head}"
    );
    assert!(
        !head.contains("keep-alive"),
        "client saw keep-alive: {head}"
    );
    Ok(())
}

#[tokio::test]
async fn http2_prior_knowledge_is_proxied() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let got = get_h2(&node.url("/h2?q=1")).await?;
    assert_eq!(got.status, 200);
    let seen = upstream.last();
    assert_eq!(seen.target, "/h2?q=1");
    assert_eq!(seen.headers["host"], node.addr.to_string().as_str());
    Ok(())
}

/// Sends GETs for `path` on one HTTP/2 connection, ten at a time, and
/// cancels each after 20 ms, until the node shuts the connection down or
/// 300 were sent. With `padding`, each round also sends ten requests that
/// the node rejects itself (a lower-case method). First it sends one GET
/// for `/uncancelled`, which it never cancels. Returns how many were
/// cancelled, whether the node closed the connection, and the status of
/// the uncancelled request.
async fn cancel_http2_requests(
    node: &Node,
    path: &str,
    padding: bool,
) -> Result<(usize, bool, Option<u16>)> {
    use hyper_util::rt::{TokioExecutor, TokioIo};
    let stream = tokio::net::TcpStream::connect(node.addr).await?;
    let (sender, connection) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream)).await?;
    let connection = tokio::spawn(connection);
    let empty = http_body_util::Empty::<bytes::Bytes>::new;

    let uncancelled = {
        let mut sender = sender.clone();
        let request = http::Request::get(node.url("/uncancelled")).body(empty())?;
        tokio::spawn(async move { sender.send_request(request).await })
    };

    let mut cancelled = 0;
    while cancelled < 300 && !connection.is_finished() {
        let mut round = Vec::new();
        for _ in 0..10 {
            let mut cancelling = sender.clone();
            let request = http::Request::get(node.url(path)).body(empty())?;
            round.push(tokio::spawn(async move {
                let _ = tokio::time::timeout(
                    Duration::from_millis(20),
                    cancelling.send_request(request),
                )
                .await;
            }));
            if padding {
                let mut sender = sender.clone();
                let request = http::Request::builder()
                    .method(http::Method::from_bytes(b"get")?)
                    .uri(node.url(path))
                    .body(empty())?;
                round.push(tokio::spawn(async move {
                    let _ = sender.send_request(request).await;
                }));
            }
        }
        for request in round {
            request.await?;
        }
        cancelled += 10;
        // Lets the node read the resets before the next round.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    let uncancelled = tokio::time::timeout(Duration::from_secs(10), uncancelled).await??;
    let uncancelled_status = uncancelled.ok().map(|response| response.status().as_u16());
    let closed = tokio::time::timeout(Duration::from_secs(5), connection)
        .await
        .is_ok();
    Ok((cancelled, closed, uncancelled_status))
}

#[tokio::test]
async fn http2_cancelling_client_is_cut_off() -> Result {
    let upstream = Upstream::start(|_| Reply::Delay(Duration::from_secs(2))).await;
    let node = Node::start(&one_route(&upstream))?;
    for padding in [false, true] {
        let before = upstream.count();
        let (cancelled, closed, uncancelled) =
            cancel_http2_requests(&node, "/slow", padding).await?;
        // Each cancelled request reached the upstream, which keeps working
        // on it. Once 100 upstream calls were cancelled, half of them or
        // more, the node shuts the connection down gracefully. Requests the
        // node rejects itself do not dilute that share.
        assert!(
            closed,
            "padding {padding}: the connection stayed open after {cancelled} cancels"
        );
        // About 100 on an idle machine. A loaded one may cancel some
        // requests before they reach the upstream, which do not count.
        assert!(
            cancelled < 300,
            "padding {padding}: {cancelled} cancels before the shutdown"
        );
        let reached = upstream.count() - before;
        assert!(
            reached <= cancelled + 1,
            "padding {padding}: {reached} reached the upstream"
        );
        // The request in flight when the shutdown began still finishes.
        assert_eq!(uncancelled, Some(200), "padding {padding}");
    }
    assert!(node.log_contains("cancelled half of its upstream calls or more"));
    // Other connections are served as before.
    assert_eq!(get_h2(&node.url("/after")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn underscore_headers_are_removed() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[[listeners]]\naddr = \"127.0.0.1:0\"\n\
         underscores_in_headers = true\n\n{}",
        one_route(&upstream)
    );
    let node = Node::start(&config)?;
    let headers = [
        ("x_user_id", "admin"),
        ("x_forwarded_for", "10.0.0.1"),
        ("x-kept", "1"),
    ];
    let got = send("GET", &node.url("/"), &headers, b"").await?;
    assert_eq!(got.status, 200);
    let seen = upstream.last();
    assert!(
        !seen.headers.contains_key("x_user_id"),
        "{:?}",
        seen.headers
    );
    assert!(
        !seen.headers.contains_key("x_forwarded_for"),
        "{:?}",
        seen.headers
    );
    assert_eq!(seen.headers["x-kept"], "1");

    // The second listener keeps them.
    let url = format!("http://{}/", node.listener_addr(1));
    assert_eq!(send("GET", &url, &headers, b"").await?.status, 200);
    assert_eq!(upstream.last().headers["x_user_id"], "admin");
    Ok(())
}

#[tokio::test]
async fn http2_cookie_fields_are_joined() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    let cookies = [
        ("cookie", "sid=abc"),
        ("cookie", "theme=dark"),
        ("cookie", "lang=en"),
    ];
    assert_eq!(get_h2_with(&node.url("/"), &cookies).await?.status, 200);
    let seen = upstream.last();
    let fields: Vec<_> = seen.headers.get_all("cookie").iter().collect();
    assert_eq!(fields, ["sid=abc; theme=dark; lang=en"]);

    // One field stays as it is.
    assert_eq!(
        get_h2_with(&node.url("/"), &cookies[..1]).await?.status,
        200
    );
    assert_eq!(upstream.last().headers["cookie"], "sid=abc");
    Ok(())
}

#[tokio::test]
async fn http2_field_values_are_trimmed() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    // The node keeps a client's request id only when it is valid, and a
    // space is not valid in one, so the id shows the node read it trimmed.
    let padded = [("x-request-id", " abc123\t")];
    let got = get_h2_with(&node.url("/"), &padded).await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.headers["x-request-id"], "abc123");
    assert_eq!(upstream.last().headers["x-request-id"], "abc123");
    Ok(())
}

/// Starts an upstream that writes the bytes of `response` for every request
/// head it reads on a connection, and keeps the connection open.
async fn fixed_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    scripted_upstream(response, false).await
}

/// Starts an upstream that responds to the first request head on each
/// connection with the bytes of `response`, then closes the connection.
async fn closing_upstream(response: &'static [u8]) -> std::net::SocketAddr {
    scripted_upstream(response, true).await
}

/// Starts an upstream that writes the bytes of `response` for each request
/// head it reads, and closes the connection after the first one when
/// `close` is set.
async fn scripted_upstream(response: &'static [u8], close: bool) -> std::net::SocketAddr {
    counted_scripted_upstream(response, close).await.0
}

/// Starts an upstream as [`scripted_upstream`] does, and returns the count
/// of connections it has accepted too.
async fn counted_scripted_upstream(
    response: &'static [u8],
    close: bool,
) -> (std::net::SocketAddr, Arc<AtomicUsize>) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            counter.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let mut head = Vec::new();
                let mut buffer = [0u8; 4096];
                while let Ok(read @ 1..) = stream.read(&mut buffer).await {
                    head.extend_from_slice(&buffer[..read]);
                    while let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                        head.drain(..end + 4);
                        if stream.write_all(response).await.is_err() || close {
                            return;
                        }
                    }
                }
            });
        }
    });
    (addr, accepted)
}

/// Starts a node with one serving thread in front of a scripted upstream
/// that sends `response` to every request. Returns the node and the
/// upstream's count of accepted connections. With one thread, a request
/// finds the last one's connection in the pool.
async fn node_before(response: &'static [u8]) -> Result<(Node, Arc<AtomicUsize>)> {
    let (addr, accepted) = counted_scripted_upstream(response, false).await;
    let node = Node::start(&format!(
        "[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{addr}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    Ok((node, accepted))
}

#[tokio::test]
async fn upstream_framings_and_connection_reuse() -> Result {
    // Each case: the upstream's response, whether the upstream closes the
    // connection after it, the body the client gets, and whether the node
    // sends the next request on the same connection.
    let cases: [(&'static [u8], bool, &str, bool); 9] = [
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "hello",
            true,
        ),
        (
            b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n\
              2;ext=\"a b\"\r\nhe\r\n3\r\nllo\r\n0\r\n\r\n",
            false,
            "hello",
            true,
        ),
        (
            b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "hello",
            true,
        ),
        (
            b"HTTP/1.0 200 OK\r\nconnection: keep-alive\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "hello",
            true,
        ),
        // Both framings: chunked wins, and the connection is not trusted
        // with another request.
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\ntransfer-encoding: chunked\r\n\r\n\
              5\r\nhello\r\n0\r\n\r\n",
            false,
            "hello",
            false,
        ),
        (
            b"HTTP/1.1 200 OK\r\nconnection: close\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "hello",
            false,
        ),
        (
            b"HTTP/1.0 200 OK\r\ncontent-length: 5\r\n\r\nhello",
            false,
            "hello",
            false,
        ),
        // Bytes past the end of the response.
        (
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nhello!",
            false,
            "hello",
            false,
        ),
        // No length: the body runs until the upstream closes.
        (b"HTTP/1.1 200 OK\r\n\r\nhello", true, "hello", false),
    ];
    for (response, close, body, reused) in cases {
        let printable = String::from_utf8_lossy(response);
        let (addr, accepted) = counted_scripted_upstream(response, close).await;
        // One serving thread, whose pool the second request finds the first
        // one's connection in.
        let node = Node::start(&format!(
            "[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ))?;
        for _ in 0..2 {
            let got = get(&node.url("/")).await?;
            assert_eq!(got.status, 200, "{printable}");
            assert_eq!(got.body, body, "{printable}");
        }
        let expected = if reused { 1 } else { 2 };
        assert_eq!(accepted.load(Ordering::SeqCst), expected, "{printable}");
    }
    Ok(())
}

#[tokio::test]
async fn retried_status_keeps_its_connection() -> Result {
    // Every response is a short 503, which GET retries once: both attempts
    // of each request go over the one connection.
    let (node, accepted) =
        node_before(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy").await?;
    for _ in 0..3 {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 503);
        assert_eq!(got.body, "busy");
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    Ok(())
}

#[tokio::test]
async fn retry_skips_stale_pooled_connections() -> Result {
    // Each target responds to the first request on a connection and closes
    // it when the next one arrives, as an upstream closing idle connections
    // can, so both pools hold a connection that fails once used.
    async fn closes_on_second_request() -> std::net::SocketAddr {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buffer = [0u8; 4096];
                    let mut head = Vec::new();
                    while !head.windows(4).any(|window| window == b"\r\n\r\n") {
                        match stream.read(&mut buffer).await {
                            Ok(read @ 1..) => head.extend_from_slice(&buffer[..read]),
                            _ => return,
                        }
                    }
                    let response = b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok";
                    if stream.write_all(response).await.is_err() {
                        return;
                    }
                    // The next request gets no response: the connection closes.
                    let _ = stream.read(&mut buffer).await;
                });
            }
        });
        addr
    }
    let (a, b) = (
        closes_on_second_request().await,
        closes_on_second_request().await,
    );
    let node = Node::start(&format!(
        "[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{a}\", \"{b}\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    // The first two requests leave a connection in each target's pool. The
    // third meets one of them closed, and its retry goes to the other
    // target on a new connection instead of the other pooled one.
    for _ in 0..3 {
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200, "{:?}", got.body);
        assert_eq!(got.body, "ok");
    }
    Ok(())
}

#[tokio::test]
async fn connection_idle_past_keepalive_is_not_reused() -> Result {
    let (addr, accepted) =
        counted_scripted_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok", false).await;
    let node = Node::start(&format!(
        "[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{addr}\"]\n\
         keepalive_timeout = \"300ms\"\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    // Back to back, the second request reuses the first one's connection.
    for _ in 0..2 {
        assert_eq!(get(&node.url("/")).await?.status, 200);
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1);
    // After the keep-alive timeout, the idle connection is not used again.
    tokio::time::sleep(Duration::from_millis(600)).await;
    assert_eq!(get(&node.url("/")).await?.status, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn invalid_upstream_responses_get_502() -> Result {
    let responses: [&'static [u8]; 5] = [
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 6\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: five\r\n\r\nhello",
        b"HTTP/1.1 2000 OK\r\n\r\n",
        b"not http at all\r\n\r\n",
    ];
    for response in responses {
        let printable = String::from_utf8_lossy(response);
        let addr = fixed_upstream(response).await;
        let node = Node::start(&format!(
            "[upstreams.app]\ntargets = [\"{addr}\"]\n[upstreams.app.retry]\nmax_retries = 0\n\n\
             [[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ))?;
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 502, "{printable}");
        assert_eq!(got.json()["error"], "upstream_unavailable", "{printable}");
        assert!(
            node.log_contains("invalid response head"),
            "{printable}: {}",
            node.log()
        );
    }
    Ok(())
}

#[tokio::test]
async fn invalid_chunk_cuts_the_response_off() -> Result {
    let (node, accepted) =
        node_before(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\nzz\r\n")
            .await?;
    let got = get(&node.url("/")).await;
    assert!(got.is_err(), "the response was whole: {got:?}");
    assert!(
        node.log_contains("invalid chunked encoding"),
        "{}",
        node.log()
    );
    // The broken connection is not used again.
    let _ = get(&node.url("/")).await;
    assert_eq!(accepted.load(Ordering::SeqCst), 2);
    Ok(())
}

#[tokio::test]
async fn upstream_body_cut_short_is_logged() -> Result {
    // The head promises 100 bytes; the connection closes after 5, before
    // the client has any of them.
    let addr = closing_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nhello").await;
    let node = Node::start(&format!(
        "[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    let got = get(&node.url("/")).await;
    assert!(got.is_err(), "the response was whole: {got:?}");
    let logged = node.log_contains("upstream response body failed");
    let log = node.log();
    assert!(logged, "{log}");
    assert!(log.contains("upstream=app"), "{log}");
    assert!(log.contains(&format!("target={addr}")), "{log}");
    Ok(())
}

#[tokio::test]
async fn repeated_upstream_content_length_sent_once() -> Result {
    let responses: [&'static [u8]; 2] = [
        b"HTTP/1.1 200 OK\r\ncontent-length: 5, 5\r\n\r\nhello",
        b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\ncontent-length: 5\r\n\r\nhello",
    ];
    for response in responses {
        let addr = fixed_upstream(response).await;
        let node = Node::start(&format!(
            "[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
        ))?;
        let got = get(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        let lengths: Vec<_> = got.headers.get_all("content-length").iter().collect();
        assert_eq!(lengths, ["5"]);
        assert_eq!(got.body, "hello");
        // An HTTP/2 client fails a stream whose length is a list.
        let got = get_h2(&node.url("/")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(got.body, "hello");
    }
    Ok(())
}

#[tokio::test]
async fn upstream_204_length_is_dropped() -> Result {
    let addr = fixed_upstream(b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n").await;
    let node = Node::start(&format!(
        "[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    // An HTTP/2 client fails a stream whose 204 has a length.
    let got = get_h2(&node.url("/")).await?;
    assert_eq!(got.status, 204);
    assert_eq!(got.header("content-length"), None);
    let got = get(&node.url("/")).await?;
    assert_eq!(got.status, 204);
    assert_eq!(got.header("content-length"), None);
    Ok(())
}

#[tokio::test]
async fn upstream_trailers_are_filtered() -> Result {
    let addr = fixed_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ntrailer: x-checksum\r\n\r\n\
          5\r\nhello\r\n0\r\ncontent-length: 99\r\nset-cookie: session=evil\r\n\
          x-request-id: forged\r\nratelimit-remaining: 999\r\nx-request-duration: 0ms\r\n\
          connection: x-hop\r\nx-hop: 1\r\ngrpc-status: 0\r\nx-frame-options: ALLOW\r\n\
          x-checksum: abc\r\n\r\n",
    )
    .await;
    // The route's own response header may not come as a trailer either.
    let node = Node::start(&format!(
        "[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n\
         response_headers = {{ \"x-frame-options\" = \"DENY\" }}\n"
    ))?;
    // HTTP/2 carries trailers to the client. With `content-length` among
    // them the client failed the stream.
    let got = get_h2(&node.url("/")).await?;
    assert_eq!(got.status, 200);
    assert_eq!(got.body, "hello");
    let trailers = got
        .trailers
        .as_ref()
        .expect("trailers reach an HTTP/2 client");
    let mut names: Vec<&str> = trailers.keys().map(|name| name.as_str()).collect();
    names.sort_unstable();
    assert_eq!(names, ["grpc-status", "x-checksum"]);
    assert_eq!(got.header("x-frame-options"), Some("DENY"));

    // A field that the head's `Connection` names is hop-by-hop in the
    // trailers as well.
    let addr = fixed_upstream(
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\nconnection: x-foo\r\n\
          x-foo: head\r\nx-bar: kept\r\n\r\n5\r\nhello\r\n0\r\nx-foo: trailer\r\n\
          x-t: kept\r\n\r\n",
    )
    .await;
    let node = Node::start(&format!(
        "[upstreams.app]\ntargets = [\"{addr}\"]\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    let got = get_h2(&node.url("/")).await?;
    assert_eq!(got.body, "hello");
    assert_eq!(got.header("x-foo"), None);
    assert_eq!(got.header("x-bar"), Some("kept"));
    let trailers = got.trailers.as_ref().expect("trailers");
    let names: Vec<&str> = trailers.keys().map(|name| name.as_str()).collect();
    assert_eq!(names, ["x-t"]);
    Ok(())
}

#[tokio::test]
async fn connect_gets_501() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    for target in ["/echo", "127.0.0.1:9"] {
        let request = format!("CONNECT {target} HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n");
        let response = raw_request(node.addr, &request).await?;
        assert!(response.starts_with("HTTP/1.1 501"), "{target}: {response}");
        assert!(
            response.contains("\"error\":\"unsupported_method\""),
            "{target}: {response}"
        );
    }
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn websocket_upgrade_gets_501() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    for upgrade in ["websocket", "WebSocket/13", "h2c, websocket"] {
        let request = format!(
            "GET /chat HTTP/1.1\r\nHost: a\r\nUpgrade: {upgrade}\r\nConnection: Upgrade, close\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
        );
        let response = raw_request(node.addr, &request).await?;
        assert!(
            response.starts_with("HTTP/1.1 501"),
            "{upgrade}: {response}"
        );
        assert!(
            response.contains("\"error\":\"unsupported_upgrade\""),
            "{upgrade}: {response}"
        );
    }
    assert_eq!(upstream.count(), 0);

    // The server may ignore an upgrade it does not take (RFC 9110, section
    // 7.8): an h2c upgrade goes on as a plain request, without `Upgrade`.
    let response = raw_request(
        node.addr,
        "GET /page HTTP/1.1\r\nHost: a\r\nUpgrade: h2c\r\nConnection: Upgrade, HTTP2-Settings\r\n\
         HTTP2-Settings: AAMAAABkAAQCAAAAAAIAAAAA\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let seen = upstream.last();
    assert!(seen.headers.get("upgrade").is_none());
    assert!(seen.headers.get("http2-settings").is_none());
    Ok(())
}

#[tokio::test]
async fn unsized_get_body_reaches_upstream() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&one_route(&upstream))?;
    for method in ["GET", "HEAD"] {
        let request = format!(
            "{method} /search HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\
             Connection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n"
        );
        let response = raw_request(node.addr, &request).await?;
        assert!(response.starts_with("HTTP/1.1 200"), "{method}: {response}");
        let seen = upstream.last();
        assert_eq!(seen.method, method);
        assert_eq!(seen.body_len, 5, "{method}: the body was dropped");
    }
    // A GET without a body still goes without one.
    get(&node.url("/plain")).await?;
    let seen = upstream.last();
    assert_eq!(seen.body_len, 0);
    assert!(seen.headers.get("transfer-encoding").is_none());
    Ok(())
}

#[tokio::test]
async fn early_answer_to_stalled_body_spares_the_pool() -> Result {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    // The upstream responds to every request head at once, before any body, as
    // a 401 or a 413 does.
    let addr = fixed_upstream(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok").await;
    let node = Node::start(&format!(
        "[node]\nthreads = 1\n\n[upstreams.app]\ntargets = [\"{addr}\"]\n\
         response_timeout = \"2s\"\n\n[[routes]]\nname = \"all\"\nupstream = \"app\"\n"
    ))?;
    // A client sends 10 bytes of a 100,000-byte body, reads the response and
    // keeps the connection open.
    let mut stalled = tokio::net::TcpStream::connect(node.listener_addr(0)).await?;
    stalled
        .write_all(b"POST /upload HTTP/1.1\r\nhost: a\r\ncontent-length: 100000\r\n\r\n0123456789")
        .await?;
    let mut status_line = [0u8; 12];
    stalled.read_exact(&mut status_line).await?;
    assert_eq!(&status_line, b"HTTP/1.1 200");

    // The next requests get their responses at once, not after the response
    // timeout on a connection still busy with the stalled body.
    for _ in 0..3 {
        let started = std::time::Instant::now();
        let got = send("POST", &node.url("/next"), &[], b"v=1").await?;
        assert_eq!(got.status, 200);
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "took {:?}",
            started.elapsed()
        );
    }
    drop(stalled);
    Ok(())
}

#[tokio::test]
async fn upstream_down_gets_502_and_node_keeps_serving() -> Result {
    let healthy = Upstream::echo().await;
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let config = format!(
        "{}[upstreams.gone]\ntargets = [\"{closed}\"]\n\n[[routes]]\nname = \"gone\"\nprefix = \"/gone\"\n\
         upstream = \"gone\"\n\n[[routes]]\nname = \"ok\"\nprefix = \"/\"\nupstream = \"ok\"\n",
        upstream_block("ok", &healthy)
    );
    let node = Node::start(&config)?;
    let got = get(&node.url("/gone")).await?;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"], "upstream_unavailable");
    assert!(node.log_contains("connect failed"), "{}", node.log());
    assert!(node.log().contains("upstream=gone"), "{}", node.log());
    assert_eq!(get(&node.url("/fine")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn slow_upstream_gets_504_and_node_keeps_serving() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(3))).await;
    let healthy = Upstream::echo().await;
    let config = format!(
        "[upstreams.slow]\ntargets = [\"{}\"]\nresponse_timeout = \"300ms\"\n{}\n\
         [[routes]]\nname = \"slow\"\nprefix = \"/slow\"\nupstream = \"slow\"\n\n\
         [[routes]]\nname = \"ok\"\nprefix = \"/\"\nupstream = \"ok\"\n",
        slow.addr,
        upstream_block("ok", &healthy)
    );
    let node = Node::start(&config)?;
    let started = std::time::Instant::now();
    let got = get(&node.url("/slow")).await?;
    assert_eq!(got.status, 504);
    assert_eq!(got.json()["error"], "upstream_timeout");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "the timeout did not cut the wait"
    );
    assert_eq!(get(&node.url("/fine")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn body_over_content_length_limit_gets_413() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"small\"\nupstream = \"app\"\nmax_body = \"1KiB\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let got = send("POST", &node.url("/upload"), &[], &[b'a'; 2048]).await?;
    assert_eq!(got.status, 413);
    assert_eq!(got.json()["error"], "body_too_large");
    assert_eq!(upstream.count(), 0);
    let fits = send("POST", &node.url("/upload"), &[], &[b'a'; 1000]).await?;
    assert_eq!(fits.status, 200);
    assert_eq!(upstream.last().body_len, 1000);
    Ok(())
}

#[tokio::test]
async fn chunked_body_over_limit_is_cut_off() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}\n[[routes]]\nname = \"small\"\nupstream = \"app\"\nmax_body = \"1KiB\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let chunk = "a".repeat(800);
    let request = format!(
        "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         320\r\n{chunk}\r\n320\r\n{chunk}\r\n0\r\n\r\n"
    );
    let response = raw_request(node.addr, &request).await?;
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(response.contains("\"body_too_large\""), "{response}");
    // The upstream may have seen the start of the request, but never a
    // complete one.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(upstream.count() <= 1);
    assert_eq!(upstream.complete_count(), 0);
    Ok(())
}

#[tokio::test]
async fn silent_connection_is_closed() -> Result {
    use tokio::io::AsyncReadExt;
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\n\n{}\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await?;
    let mut buffer = [0u8; 16];
    // The node closes the connection; the bound only keeps a broken node
    // from hanging the test.
    let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await?;
    assert_eq!(
        read?, 0,
        "the node closed the connection without a response"
    );
    assert_eq!(get(&node.url("/")).await?.status, 200);
    Ok(())
}

/// Sends `bytes` on a new connection and returns how long the node took to
/// close it, or `None` when it was still open after ten seconds.
async fn closed_after(addr: std::net::SocketAddr, bytes: &[u8]) -> Result<Option<Duration>> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let started = std::time::Instant::now();
    let mut stream = tokio::net::TcpStream::connect(addr).await?;
    stream.write_all(bytes).await?;
    let mut buffer = [0u8; 4096];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await;
        match read {
            Err(_) => return Ok(None),
            Ok(Ok(0) | Err(_)) => return Ok(Some(started.elapsed())),
            // The node's SETTINGS frame and its acknowledgement.
            Ok(Ok(_)) => {}
        }
    }
}

#[tokio::test]
async fn http2_connection_without_request_is_closed() -> Result {
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    // An empty SETTINGS frame, then a HEADERS frame on stream 1 without
    // END_HEADERS, whose CONTINUATION never comes.
    const SETTINGS: &[u8] = &[0, 0, 0, 4, 0, 0, 0, 0, 0];
    const OPEN_HEADERS: &[u8] = &[0, 0, 1, 1, 0x01, 0, 0, 0, 1, 0x82];
    let upstream = Upstream::start(|received| {
        if received.target.starts_with("/slow") {
            Reply::Delay(Duration::from_millis(1500))
        } else {
            Reply::Echo
        }
    })
    .await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\n\n{}\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;

    let half_preface = &PREFACE[..16];
    let settings = [PREFACE, SETTINGS].concat();
    let open_headers = [PREFACE, SETTINGS, OPEN_HEADERS].concat();
    for (case, bytes) in [
        ("half a preface", half_preface),
        ("a preface and settings", &settings[..]),
        ("an unfinished header block", &open_headers[..]),
    ] {
        let closed = closed_after(node.addr, bytes).await?;
        let closed = closed.unwrap_or_else(|| panic!("{case}: still open after 10 s"));
        // Between one and two header timeouts, plus scheduling.
        assert!(
            closed < Duration::from_secs(3),
            "{case}: closed after {closed:?}"
        );
    }
    assert_eq!(upstream.count(), 0);

    // A request in flight for longer than the timeout is not cut off, and
    // the node keeps serving HTTP/2.
    let slow = get_h2(&node.url("/slow")).await?;
    assert_eq!(slow.status, 200);
    assert_eq!(get_h2(&node.url("/after")).await?.status, 200);
    Ok(())
}

#[tokio::test]
async fn stalled_second_head_closes_connection() -> Result {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\nheader_timeout = \"300ms\"\n\n{}\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    let mut stream = tokio::net::TcpStream::connect(node.addr).await?;
    stream
        .write_all(b"GET /first HTTP/1.1\r\nHost: t\r\n\r\n")
        .await?;
    // Then the start of a second head, which never ends.
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    while !received.windows(4).any(|w| w == b"\r\n\r\n") {
        let read =
            tokio::time::timeout(Duration::from_secs(10), stream.read(&mut buffer)).await??;
        assert!(
            read > 0,
            "the node closed the connection before the first response"
        );
        received.extend_from_slice(&buffer[..read]);
    }
    assert!(received.starts_with(b"HTTP/1.1 200"));
    stream.write_all(b"GET /second HTTP/1.1\r\nHo").await?;
    // Drain the first response's body, then expect the close; the bound
    // only keeps a broken node from hanging the test.
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match stream.read(&mut buffer).await {
                Ok(0) | Err(_) => return,
                Ok(_) => continue,
            }
        }
    })
    .await;
    assert!(
        closed.is_ok(),
        "the node kept a connection with a stalled head open"
    );
    assert_eq!(
        upstream.count(),
        1,
        "only the complete request reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn shutdown_lets_requests_in_flight_finish() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_millis(800))).await;
    let config = one_route(&slow);
    let mut node = Node::start(&config)?;
    let url = node.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.interrupt();
    let got = in_flight.await??;
    assert_eq!(got.status, 200);
    assert_eq!(got.json()["target"], "/slow");
    let status = tokio::task::spawn_blocking(move || node.wait_exit()).await?;
    assert!(status.is_some_and(|s| s.success()), "node exit: {status:?}");
    Ok(())
}

#[tokio::test]
async fn signals_together_stop_at_once() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(5))).await;
    let mut node = Node::start(&one_route(&slow))?;
    let url = node.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    let signalled = std::time::Instant::now();
    // The second comes while the first is still being handled: it must not
    // be lost before the node listens for a second signal.
    node.signals_together(&["TERM", "INT"]);
    let (status, log) = tokio::task::spawn_blocking(move || (node.wait_exit(), node.log())).await?;

    // The default drain_timeout is 10 s, and the request in flight takes 5 s.
    assert!(signalled.elapsed() < Duration::from_secs(3), "{log}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "node exit: {status:?}"
    );
    assert!(log.contains("second signal: stopping"), "{log}");
    assert!(
        in_flight.await?.is_err(),
        "the request in flight was cut off"
    );
    Ok(())
}

#[tokio::test]
async fn second_signal_cuts_the_drain_short() -> Result {
    let slow = Upstream::start(|_| Reply::Delay(Duration::from_secs(5))).await;
    let config = format!(
        "[access_log]\npath = \"access.log\"\n\n{}",
        one_route(&slow)
    );
    let mut node = Node::start(&config)?;
    let url = node.url("/slow");
    let in_flight = tokio::spawn(async move { get(&url).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    node.signal("TERM");
    assert!(
        node.log_contains("draining open connections"),
        "{}",
        node.log()
    );
    let signalled = std::time::Instant::now();
    node.signal("TERM");
    let status = tokio::task::spawn_blocking(move || {
        let status = node.wait_exit();
        // The node's folder goes with it.
        let access_log = std::fs::read_to_string(node.dir().join("access.log"));
        (status, node.log(), access_log)
    })
    .await?;

    let (status, log, access_log) = status;
    // The default drain_timeout is 10 s, and the request in flight takes 5 s.
    assert!(signalled.elapsed() < Duration::from_secs(2), "{log}");
    assert!(
        status.is_some_and(|s| !s.success()),
        "node exit: {status:?}"
    );
    assert!(log.contains("second signal: stopping"), "{log}");
    assert!(!log.contains("did not stop in time"), "{log}");
    assert!(
        in_flight.await?.is_err(),
        "the request in flight was cut off"
    );
    // The request cut off still has its access-log line.
    let text = access_log?;
    let line: serde_json::Value = serde_json::from_str(text.lines().next().unwrap_or_default())?;
    assert_eq!(line["path"], "/slow", "{text}");
    assert_eq!(line["status"], 499, "{text}");
    // It waited for the upstream from about 0.2 s until the second signal,
    // and that wait counts as upstream time, not the gateway's.
    let upstream = line["durations_ms"]["upstream"]
        .as_f64()
        .unwrap_or_default();
    let gateway = line["durations_ms"]["gateway"].as_f64().unwrap_or_default();
    assert!(upstream >= 100.0, "{text}");
    assert!(gateway < upstream, "{text}");
    Ok(())
}

#[tokio::test]
async fn malformed_chunked_body_gets_400() -> Result {
    let upstream = Upstream::echo().await;
    let config = one_route(&upstream);
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "POST /upload HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
         zz\r\nabc\r\n0\r\n\r\n",
    )
    .await?;
    assert!(response.starts_with("HTTP/1.1 400"), "{response}");
    assert!(response.contains("\"invalid_body\""), "{response}");
    assert_eq!(upstream.complete_count(), 0);
    Ok(())
}

#[tokio::test]
async fn large_bodies_stream_without_buffering() -> Result {
    const SIZE: usize = 50 << 20;
    let upstream = Upstream::start(|received| {
        if received.method == "GET" {
            Reply::Bytes(SIZE)
        } else {
            Reply::Echo
        }
    })
    .await;
    let config = format!(
        "{}\n[[routes]]\nname = \"big\"\nupstream = \"app\"\nmax_body = \"100MiB\"\n",
        upstream_block("app", &upstream)
    );
    let node = Node::start(&config)?;
    // Warm up so the baseline includes the connection and buffers.
    get(&node.url("/warm")).await?;
    let before = node.rss_kib();

    let response = crate::harness::get_streaming(&node.url("/download")).await?;
    assert_eq!(response, SIZE);
    let after_download = node.rss_kib();

    let sent = crate::harness::post_streaming(&node.url("/upload"), SIZE).await?;
    assert_eq!(sent.status, 200);
    assert_eq!(upstream.last().body_len, SIZE);
    let after_upload = node.rss_kib();

    let growth = after_download.max(after_upload).saturating_sub(before);
    assert!(
        growth < 10 * 1024,
        "resident memory grew by {growth} KiB while streaming 50 MiB"
    );
    Ok(())
}
