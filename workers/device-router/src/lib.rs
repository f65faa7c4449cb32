//! `device-router`: classifies the client as mobile, tablet, desktop, tv or
//! bot from its `User-Agent` and the `Sec-CH-UA-Mobile` client hint, sets
//! `X-Device-Class` on the request to the upstream, and can send each class to its own
//! upstream or under its own path prefix.
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/device-router.wasm"
//!
//! [routes.workers.config]
//! default_class = "desktop"            # for a missing or unknown User-Agent
//! upstreams = { tv = "tv-app", bot = "prerender" }
//! path_prefixes = { mobile = "/mobile", tablet = "/mobile" }
//! ```
//!
//! The worker sets `X-Device-Class` (or the configured `header`) on the
//! request, replacing any value the client sent. A class with an entry in
//! `upstreams` goes to that upstream, and the others to the route's own. A
//! class with an entry in `path_prefixes` has the prefix put before its path
//! (`/home` becomes `/mobile/home`), unless the path already starts with
//! that prefix. [`classify`] describes how the class is decided.
//!
//! The node rejects an invalid config when it loads the module, with a
//! message that names the field. Should one reach a request anyway, the
//! request fails with 500 and `{"error":"worker_config_invalid",...}`.

mod classify;
mod config;

use edge_sdk::{Action, Request, RequestChanges, Response, Worker};
use serde::Serialize;

use crate::classify::classify;
use crate::config::Config;

/// The JSON body of the response to a request when the config is invalid.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// Reads and checks the config, returning a message for the log and the
/// client when it is invalid.
fn load_config() -> Result<Config, String> {
    config::parse(&edge_sdk::config::json())
        .map_err(|message| format!("invalid device-router config: {message}"))
}

/// Returns whether `path` lies under `prefix`, matching whole segments.
fn is_under(path: &str, prefix: &str) -> bool {
    path.strip_prefix(prefix)
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// The bytes of a `User-Agent` that are classified. Real ones are a few
/// hundred bytes long, and matching costs time for every byte, so a client
/// cannot spend the worker's CPU deadline with a huge one.
const USER_AGENT_READ: usize = 1024;

/// Returns the first `max` bytes of `text`, or fewer, ending on a character
/// boundary.
fn head(text: &str, max: usize) -> &str {
    let mut end = max.min(text.len());
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// Decides the request: the class header, the path prefix and the upstream
/// of the client's class.
fn decide(config: &Config, request: &Request) -> Action {
    let class = classify(
        request
            .header("user-agent")
            .map(|agent| head(agent, USER_AGENT_READ)),
        request.header("sec-ch-ua-mobile"),
    )
    .unwrap_or(config.default_class);
    let mut changes = RequestChanges::new().set_header(&config.header, class.as_str());
    if let Some(prefix) = config.path_prefixes.get(&class) {
        if !is_under(&request.path, prefix) {
            changes = changes.path(format!("{prefix}{}", request.path));
        }
    }
    match config.upstreams.get(&class) {
        Some(upstream) => Action::Route {
            upstream: upstream.clone(),
            changes,
        },
        None => Action::Continue(changes),
    }
}

struct DeviceRouter;

impl Worker for DeviceRouter {
    fn check_config() -> Result<(), String> {
        let config = load_config()?;
        for (class, upstream) in &config.upstreams {
            if !edge_sdk::upstreams::exists(upstream) {
                return Err(format!(
                    "invalid device-router config: upstreams.{}: no upstream named {upstream:?} \
                     in the node's config",
                    class.as_str()
                ));
            }
        }
        Ok(())
    }

    fn on_request(request: Request) -> Action {
        match load_config() {
            Ok(config) => decide(&config, &request),
            Err(message) => {
                edge_sdk::log::error(&message);
                Action::respond(Response::json(
                    500,
                    &ErrorBody {
                        error: "worker_config_invalid",
                        message,
                    },
                ))
            }
        }
    }
}

edge_sdk::export_worker!(DeviceRouter);

#[cfg(test)]
mod tests {
    use edge_sdk::testing;

    use super::*;

    #[test]
    fn long_user_agent_head_only() {
        let class_of = |agent: &str| {
            let action = decide(&config(), &request("/home", &[("user-agent", agent)]));
            let (Action::Continue(changes) | Action::Route { changes, .. }) = action else {
                panic!("expected a decision, got {action:?}");
            };
            changes
        };
        let long_mobile = format!("{IPHONE}{}", "a".repeat(300_000));
        assert_eq!(class_of(&long_mobile), class_of(IPHONE));
        let hidden = format!("{}{IPHONE}", "é".repeat(USER_AGENT_READ));
        assert_eq!(class_of(&hidden), class_of("okhttp/4.12.0"));
        assert_eq!(head("aé", 2), "a");
    }

    const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) \
                          AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 \
                          Safari/604.1";
    const TIZEN: &str = "Mozilla/5.0 (SMART-TV; LINUX; Tizen 6.0) AppleWebKit/537.36 (KHTML, \
                         like Gecko) 76.0.3809.146/6.0 TV Safari/537.36";

    fn config() -> Config {
        config::parse(
            r#"{"default_class":"tablet","upstreams":{"tv":"tv-app"},
                "path_prefixes":{"mobile":"/mobile"}}"#,
        )
        .unwrap()
    }

    fn request(path: &str, headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".to_string(),
            path: path.to_string(),
            headers: headers.iter().copied().collect(),
            ..Request::default()
        }
    }

    #[test]
    fn mobile_gets_prefix() {
        let action = decide(&config(), &request("/home", &[("user-agent", IPHONE)]));
        assert_eq!(
            action,
            Action::Continue(
                RequestChanges::new()
                    .set_header("x-device-class", "mobile")
                    .path("/mobile/home")
            )
        );
    }

    #[test]
    fn prefix_not_added_twice() {
        for path in ["/mobile", "/mobile/home"] {
            let action = decide(&config(), &request(path, &[("user-agent", IPHONE)]));
            assert_eq!(
                action,
                Action::Continue(RequestChanges::new().set_header("x-device-class", "mobile")),
                "path {path}"
            );
        }
        let action = decide(&config(), &request("/mobiles", &[("user-agent", IPHONE)]));
        let Action::Continue(changes) = action else {
            panic!("expected Action::Continue");
        };
        assert_eq!(changes.path.as_deref(), Some("/mobile/mobiles"));
    }

    #[test]
    fn root_path_gets_prefix() {
        let action = decide(&config(), &request("/", &[("user-agent", IPHONE)]));
        let Action::Continue(changes) = action else {
            panic!("expected Action::Continue");
        };
        assert_eq!(changes.path.as_deref(), Some("/mobile/"));
    }

    #[test]
    fn tv_routes_to_its_upstream() {
        let action = decide(&config(), &request("/home", &[("user-agent", TIZEN)]));
        assert_eq!(
            action,
            Action::Route {
                upstream: "tv-app".to_string(),
                changes: RequestChanges::new().set_header("x-device-class", "tv"),
            }
        );
    }

    #[test]
    fn unknown_gets_default_class() {
        for headers in [&[][..], &[("user-agent", "okhttp/4.12.0")][..]] {
            let action = decide(&config(), &request("/home", headers));
            assert_eq!(
                action,
                Action::Continue(RequestChanges::new().set_header("x-device-class", "tablet"))
            );
        }
    }

    #[test]
    fn mobile_hint_counts() {
        let action = decide(
            &config(),
            &request(
                "/home",
                &[
                    ("user-agent", "Mozilla/5.0 (X11; Linux x86_64)"),
                    ("sec-ch-ua-mobile", "?1"),
                ],
            ),
        );
        let Action::Continue(changes) = action else {
            panic!("expected Action::Continue");
        };
        assert_eq!(changes.path.as_deref(), Some("/mobile/home"));
    }

    #[test]
    fn on_request_reads_config() {
        testing::set_config(r#"{"header":"x-class"}"#);
        let action = DeviceRouter::on_request(request("/", &[("user-agent", IPHONE)]));
        assert_eq!(
            action,
            Action::Continue(RequestChanges::new().set_header("x-class", "mobile"))
        );
    }

    #[test]
    fn check_config_needs_declared_upstreams() {
        testing::set_config(r#"{"upstreams":{"tv":"tv-app"}}"#);
        assert_eq!(
            DeviceRouter::check_config().unwrap_err(),
            "invalid device-router config: upstreams.tv: no upstream named \"tv-app\" in the \
             node's config"
        );
        testing::set_upstreams(&["tv-app"]);
        assert_eq!(DeviceRouter::check_config(), Ok(()));
    }

    #[test]
    fn invalid_config_is_500() {
        testing::set_config(r#"{"default_class":"phone"}"#);
        let Action::Respond(response) = DeviceRouter::on_request(request("/", &[])) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "worker_config_invalid");
        assert!(body["message"]
            .as_str()
            .unwrap()
            .starts_with("invalid device-router config: default_class: unknown variant"));
        assert_eq!(testing::take_logs().len(), 1);
        assert!(DeviceRouter::check_config().is_err());
    }
}
