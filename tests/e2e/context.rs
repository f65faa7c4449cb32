//! Request context values and secrets. Later workers and `context:NAME`
//! limits read what one worker sets, secrets reach only their own worker,
//! and a worker built against the first release of the contract still loads.

use crate::harness::{get, send, Node, Result, Upstream};

fn app(upstream: &Upstream) -> String {
    format!("[upstreams.app]\ntargets = [\"{}\"]\n\n", upstream.addr)
}

/// A fixture worker entry with `mode` and the rest of its config table.
fn fixture(mode: &str, config: &str) -> String {
    format!(
        "[[routes.workers]]\nmodule = \"{{modules}}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"{mode}\"\n{config}\n"
    )
}

/// Returns a route whose first worker sets context `user` from `x-login` and
/// whose second copies it into `x-context-user` for the upstream.
fn user_route(limits: &str) -> String {
    format!(
        "[[routes]]\nname = \"api\"\nupstream = \"app\"\n{limits}\n{}{}",
        fixture("context-set", "name = \"user\"\nfrom_header = \"x-login\""),
        fixture("context-get", "names = [\"user\"]"),
    )
}

#[tokio::test]
async fn context_passes_between_workers() -> Result {
    let upstream = Upstream::echo().await;
    let node = Node::start(&format!("{}{}", app(&upstream), user_route("")))?;

    let got = send("GET", &node.url("/a"), &[("x-login", "alice")], b"").await?;
    assert_eq!(got.status, 200);
    assert_eq!(upstream.last().headers["x-context-user"], "alice");

    // A request without the header gets no value: nothing leaks from the
    // previous request.
    get(&node.url("/b")).await?;
    assert!(!upstream.last().headers.contains_key("x-context-user"));
    Ok(())
}

#[tokio::test]
async fn context_rejects_invalid_names_and_values() -> Result {
    let upstream = Upstream::echo().await;
    let long_value = "v".repeat(1025);
    let config = format!(
        "{}[[routes]]\nname = \"name\"\nprefix = \"/name\"\nupstream = \"app\"\n{}\
         [[routes]]\nname = \"value\"\nprefix = \"/value\"\nupstream = \"app\"\n{}",
        app(&upstream),
        fixture("context-set", "name = \"User\"\nvalue = \"x\""),
        fixture(
            "context-set",
            &format!("name = \"user\"\nvalue = \"{long_value}\"")
        ),
    );
    let node = Node::start(&config)?;

    let bad_name = get(&node.url("/name")).await?;
    assert_eq!(bad_name.status, 500);
    assert_eq!(bad_name.json()["error"], "context_rejected");
    let message = bad_name.json()["message"].as_str().unwrap_or("").to_owned();
    assert!(message.contains("lower-case"), "{message}");

    let bad_value = get(&node.url("/value")).await?;
    assert_eq!(bad_value.status, 500);
    let message = bad_value.json()["message"]
        .as_str()
        .unwrap_or("")
        .to_owned();
    assert!(message.contains("maximum is 1024"), "{message}");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn context_limit_counts_per_user() -> Result {
    let upstream = Upstream::echo().await;
    let limit = "[[routes.limits]]\nname = \"per-user\"\nkey = \"context:user\"\n\
                 algorithm = \"fixed_window\"\nrate = \"2/min\"\n";
    let node = Node::start(&format!("{}{}", app(&upstream), user_route(limit)))?;
    let as_user = |user: &'static str| {
        let url = node.url("/a");
        async move { send("GET", &url, &[("x-login", user)], b"").await }
    };

    assert_eq!(as_user("alice").await?.status, 200);
    assert_eq!(as_user("alice").await?.status, 200);
    let refused = as_user("alice").await?;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["error"], "rate_limited");
    assert_eq!(refused.json()["limit"], "per-user");
    assert_eq!(refused.header("ratelimit-remaining"), Some("0"));
    assert_eq!(upstream.count(), 2);

    // Another user from the same address has a count of their own.
    let bob = as_user("bob").await?;
    assert_eq!(bob.status, 200);
    assert_eq!(bob.header("ratelimit-remaining"), Some("1"));
    assert_eq!(upstream.count(), 3);
    Ok(())
}

#[tokio::test]
async fn context_limit_without_value_counts_address() -> Result {
    let upstream = Upstream::echo().await;
    let limit = "[[routes.limits]]\nname = \"per-user\"\nkey = \"context:user\"\n\
                 algorithm = \"fixed_window\"\nrate = \"1/min\"\n";
    let node = Node::start(&format!("{}{}", app(&upstream), user_route(limit)))?;

    // No x-login: no worker sets `user`, so both requests share the count of
    // the client address.
    assert_eq!(get(&node.url("/a")).await?.status, 200);
    assert_eq!(get(&node.url("/a")).await?.status, 429);
    assert_eq!(upstream.count(), 1);
    Ok(())
}

#[tokio::test]
async fn context_limit_unset_value_warns() -> Result {
    let upstream = Upstream::echo().await;
    // `usr` for `user`: a typo that would count every request by address.
    let limit = "[[routes.limits]]\nname = \"per-user\"\nkey = \"context:usr\"\n\
                 algorithm = \"fixed_window\"\nrate = \"1000000/min\"\n";
    let node = Node::start(&format!("{}{}", app(&upstream), user_route(limit)))?;
    for _ in 0..1000 {
        assert_eq!(
            send("GET", &node.url("/a"), &[("x-login", "alice")], b"")
                .await?
                .status,
            200
        );
    }
    assert!(node.log_contains("no worker has set the context values [\"usr\"] in 1000 requests"));
    Ok(())
}

#[tokio::test]
async fn context_limit_counts_worker_responses() -> Result {
    let upstream = Upstream::echo().await;
    // The worker responds 401 itself and sets no context value, as an auth
    // worker does for a bad token, so the limit counts those by address.
    let config = format!(
        "{}[[routes]]\nname = \"api\"\nupstream = \"app\"\n\
         [[routes.limits]]\nname = \"per-user\"\nkey = \"context:user\"\n\
         algorithm = \"fixed_window\"\nrate = \"2/min\"\n{}\
         status = 401\nbody = \"no\"\n",
        app(&upstream),
        fixture("respond", ""),
    );
    let node = Node::start(&config)?;

    assert_eq!(get(&node.url("/a")).await?.status, 401);
    assert_eq!(get(&node.url("/a")).await?.status, 401);
    let refused = get(&node.url("/a")).await?;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["limit"], "per-user");
    assert_eq!(upstream.count(), 0);
    Ok(())
}

#[tokio::test]
async fn secrets_reach_their_worker() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[[routes]]\nname = \"inline\"\nprefix = \"/inline\"\nupstream = \"app\"\n{}\
         [routes.workers.secrets]\nsigning = \"inline-value\"\n\n\
         [[routes]]\nname = \"env\"\nprefix = \"/env\"\nupstream = \"app\"\n{}\
         [routes.workers.secrets]\nsigning = {{ env = \"EDGE_TEST_SECRET\" }}\n\n\
         [[routes]]\nname = \"none\"\nprefix = \"/none\"\nupstream = \"app\"\n{}",
        app(&upstream),
        fixture("secret", "name = \"signing\""),
        fixture("secret", "name = \"signing\""),
        fixture("secret", "name = \"signing\""),
    );
    let node = Node::start_with_env(&config, &[("EDGE_TEST_SECRET", "from-env")])?;

    let inline = get(&node.url("/inline")).await?;
    assert_eq!(inline.status, 200);
    assert_eq!(&inline.body[..], b"inline-value");
    let env = get(&node.url("/env")).await?;
    assert_eq!(env.status, 200);
    assert_eq!(&env.body[..], b"from-env");
    // Each binding reads only the secrets of its own entry.
    assert_eq!(get(&node.url("/none")).await?.status, 404);
    assert!(!node.log_contains("inline-value"));
    assert!(!node.log_contains("from-env"));
    Ok(())
}

#[tokio::test]
async fn secrets_never_reach_the_node_log() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[[routes]]\nname = \"leak\"\nupstream = \"app\"\n{}\
         [routes.workers.secrets]\nsigning = \"value-of-the-signing-secret\"\n",
        app(&upstream),
        fixture("secret-leak", "name = \"signing\""),
    );
    let node = Node::start(&config)?;

    let got = get(&node.url("/leak")).await?;
    assert_eq!(got.status, 500);
    assert_eq!(got.json()["error"], "worker_failed");
    assert_eq!(upstream.count(), 0);

    // The dropped lines are counted once the call ends, and the failure is
    // logged after that. The log is read on another thread, so wait for both.
    assert!(node.log_contains("the 36 past the cap of 64 a call were dropped"));
    assert!(node.log_contains("giving up with the secret [secret signing]"));

    let log = node.log();
    assert!(!log.contains("value-of-the-signing-secret"), "{log}");
    assert!(log.contains("the secret is [secret signing]"), "{log}");
    assert!(
        log.contains("giving up with the secret [secret signing]"),
        "{log}"
    );

    // One call writes at most 64 lines, and the rest are counted.
    assert_eq!(log.matches("the secret is [secret signing]").count(), 64);
    assert!(
        log.contains(
            "wrote 100 log lines in one call; the 36 past the cap of 64 a call were dropped"
        ),
        "{log}"
    );
    Ok(())
}

#[tokio::test]
async fn worker_built_against_0_1_0_loads() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "{}[[routes]]\nname = \"api\"\nupstream = \"app\"\n\n[[routes.workers]]\n\
         module = \"{{modules}}/compat-worker.wasm\"\n",
        app(&upstream)
    );
    let node = Node::start(&config)?;
    assert_eq!(get(&node.url("/a")).await?.status, 200);
    assert_eq!(upstream.last().headers["x-compat"], "0.1.0");
    Ok(())
}
