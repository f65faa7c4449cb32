//! `path-router`: sends each request to an upstream chosen by its path and
//! method.
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/path-router.wasm"
//!
//! [routes.workers.config]
//! rules = [
//!     { prefix = "/users", upstream = "users" },
//!     { prefix = "/checkout", methods = ["POST"], upstream = "payments" },
//!     { prefix = "/api", upstream = "api", strip_prefix = true },
//!     { exact = "/", upstream = "web" },
//! ]
//! ```
//!
//! Each rule has exactly one of `prefix` or `exact`, and `upstream`, the name
//! of an upstream in the node's config. The worker checks rules in order and
//! the first match wins:
//!
//! - `prefix` matches whole path segments: `/users` matches `/users` and
//!   `/users/7`, but not `/usersx`. A trailing `/` on a prefix is ignored.
//! - `exact` matches that path only.
//! - `methods`, if present, limits the rule to those methods, ignoring case.
//! - `strip_prefix = true` (prefix rules only) removes the prefix from the path
//!   sent to the upstream, leaving at least `/`: with prefix `/api`,
//!   `/api/orders` goes on as `/orders` and `/api` as `/`.
//!
//! A match routes the request to the rule's upstream. When no rule matches,
//! the worker responds 404 with `{"error":"no_rule","message":"no rule
//! matches GET /x"}`, a code of its own, so that a client can tell it from the
//! node's `no_route`. An invalid config makes every request fail with 500 and
//! `{"error":"worker_config_invalid","message":"..."}`, and logs an error.

use edge_sdk::{Action, Request, RequestChanges, Response, Worker};
use serde::{Deserialize, Serialize};

/// The worker's config table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    rules: Vec<Rule>,
}

/// One routing rule, as written in the config.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Rule {
    prefix: Option<String>,
    exact: Option<String>,
    #[serde(default)]
    methods: Vec<String>,
    upstream: String,
    #[serde(default)]
    strip_prefix: bool,
}

/// The JSON body of the worker's error responses.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// The upstream and path for a request that a rule matches.
#[derive(Debug, PartialEq, Eq)]
struct Destination<'a> {
    upstream: &'a str,
    /// The path to send on, when the rule strips its prefix.
    path: Option<String>,
}

impl Rule {
    /// Checks the rule on its own, returning why it is invalid.
    fn check(&self) -> Result<(), String> {
        let path = match (&self.prefix, &self.exact) {
            (Some(path), None) | (None, Some(path)) => path,
            (Some(_), Some(_)) => return Err("has both `prefix` and `exact`".to_string()),
            (None, None) => return Err("needs `prefix` or `exact`".to_string()),
        };
        if !path.starts_with('/') {
            return Err(format!("path {path:?} does not start with `/`"));
        }
        if self.strip_prefix && self.prefix.is_none() {
            return Err("`strip_prefix` needs `prefix`".to_string());
        }
        if self.upstream.is_empty() {
            return Err("`upstream` is empty".to_string());
        }
        if self.methods.iter().any(String::is_empty) {
            return Err("`methods` contains an empty string".to_string());
        }
        Ok(())
    }

    /// Returns where this rule sends a `method` request for `path`, or `None`
    /// when the rule does not match.
    fn destination(&self, method: &str, path: &str) -> Option<Destination<'_>> {
        let method_allowed = self.methods.is_empty()
            || self
                .methods
                .iter()
                .any(|allowed| allowed.eq_ignore_ascii_case(method));
        if !method_allowed {
            return None;
        }
        if let Some(exact) = &self.exact {
            return (path == exact).then_some(Destination {
                upstream: &self.upstream,
                path: None,
            });
        }
        let prefix = self.prefix.as_deref()?;
        let rest = strip_segment_prefix(path, prefix)?;
        let path = self.strip_prefix.then(|| {
            if rest.is_empty() {
                "/".to_string()
            } else {
                rest.to_string()
            }
        });
        Some(Destination {
            upstream: &self.upstream,
            path,
        })
    }
}

/// Returns what follows `prefix` in `path` when `prefix` matches whole
/// segments: empty, or starting with `/`. A trailing `/` on `prefix` is
/// ignored, so `/` matches every path.
fn strip_segment_prefix<'p>(path: &'p str, prefix: &str) -> Option<&'p str> {
    let prefix = prefix.trim_end_matches('/');
    let rest = path.strip_prefix(prefix)?;
    (rest.is_empty() || rest.starts_with('/')).then_some(rest)
}

/// Reads and checks the config, returning a message for the log and the
/// client when it is invalid.
fn load_config() -> Result<Config, String> {
    let config: Config = edge_sdk::config::parse()
        .map_err(|error| format!("invalid path-router config: {error}"))?;
    for (index, rule) in config.rules.iter().enumerate() {
        rule.check()
            .map_err(|reason| format!("invalid path-router config: rules[{index}] {reason}"))?;
    }
    Ok(config)
}

/// Returns the destination of the first rule that matches.
fn first_match<'a>(rules: &'a [Rule], method: &str, path: &str) -> Option<Destination<'a>> {
    rules.iter().find_map(|rule| rule.destination(method, path))
}

fn error_response(status: u16, error: &'static str, message: String) -> Action {
    Action::respond(Response::json(status, &ErrorBody { error, message }))
}

struct PathRouter;

impl Worker for PathRouter {
    fn check_config() -> Result<(), String> {
        load_config().map(drop)
    }

    fn on_request(request: Request) -> Action {
        let config = match load_config() {
            Ok(config) => config,
            Err(message) => {
                edge_sdk::log::error(&message);
                return error_response(500, "worker_config_invalid", message);
            }
        };
        match first_match(&config.rules, &request.method, &request.path) {
            Some(Destination { upstream, path }) => {
                let mut changes = RequestChanges::new();
                if let Some(path) = path {
                    changes = changes.path(path);
                }
                Action::Route {
                    upstream: upstream.to_string(),
                    changes,
                }
            }
            None => {
                let message = format!("no rule matches {} {}", request.method, request.path);
                error_response(404, "no_rule", message)
            }
        }
    }
}

edge_sdk::export_worker!(PathRouter);

#[cfg(test)]
mod tests {
    use edge_sdk::testing;

    use super::*;

    fn prefix_rule(prefix: &str, upstream: &str) -> Rule {
        Rule {
            prefix: Some(prefix.to_string()),
            exact: None,
            methods: Vec::new(),
            upstream: upstream.to_string(),
            strip_prefix: false,
        }
    }

    fn exact_rule(exact: &str, upstream: &str) -> Rule {
        Rule {
            exact: Some(exact.to_string()),
            prefix: None,
            ..prefix_rule("", upstream)
        }
    }

    fn upstream_of<'a>(rules: &'a [Rule], method: &str, path: &str) -> Option<&'a str> {
        first_match(rules, method, path).map(|destination| destination.upstream)
    }

    fn request(method: &str, path: &str) -> Request {
        Request {
            method: method.to_string(),
            path: path.to_string(),
            ..Request::default()
        }
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let rules = [prefix_rule("/users", "users")];
        assert_eq!(upstream_of(&rules, "GET", "/users"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/users/"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/users/7"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/usersx"), None);
        assert_eq!(upstream_of(&rules, "GET", "/user"), None);
        assert_eq!(upstream_of(&rules, "GET", "/"), None);
    }

    #[test]
    fn prefix_trailing_slash_ignored() {
        let rules = [prefix_rule("/users/", "users")];
        assert_eq!(upstream_of(&rules, "GET", "/users"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/users/7"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/usersx"), None);
    }

    #[test]
    fn root_prefix_matches_everything() {
        let rules = [prefix_rule("/", "web")];
        assert_eq!(upstream_of(&rules, "GET", "/"), Some("web"));
        assert_eq!(upstream_of(&rules, "GET", "/a/b"), Some("web"));
    }

    #[test]
    fn exact_matches_only_that_path() {
        let rules = [exact_rule("/", "web")];
        assert_eq!(upstream_of(&rules, "GET", "/"), Some("web"));
        assert_eq!(upstream_of(&rules, "GET", "/a"), None);
    }

    #[test]
    fn first_matching_rule_wins() {
        let rules = [
            prefix_rule("/users/admin", "admin"),
            prefix_rule("/users", "users"),
            prefix_rule("/", "web"),
        ];
        assert_eq!(upstream_of(&rules, "GET", "/users/admin/1"), Some("admin"));
        assert_eq!(upstream_of(&rules, "GET", "/users/1"), Some("users"));
        assert_eq!(upstream_of(&rules, "GET", "/other"), Some("web"));
    }

    #[test]
    fn methods_ignore_case() {
        let rules = [
            Rule {
                methods: vec!["post".to_string(), "PUT".to_string()],
                ..prefix_rule("/checkout", "payments")
            },
            prefix_rule("/checkout", "web"),
        ];
        assert_eq!(upstream_of(&rules, "POST", "/checkout"), Some("payments"));
        assert_eq!(upstream_of(&rules, "PUT", "/checkout/1"), Some("payments"));
        assert_eq!(upstream_of(&rules, "GET", "/checkout"), Some("web"));
    }

    #[test]
    fn strip_prefix_leaves_rest() {
        let rules = [Rule {
            strip_prefix: true,
            ..prefix_rule("/api", "api")
        }];
        let path_of = |path| first_match(&rules, "GET", path).and_then(|d| d.path);
        assert_eq!(path_of("/api/orders/7").as_deref(), Some("/orders/7"));
        assert_eq!(path_of("/api/").as_deref(), Some("/"));
        assert_eq!(path_of("/api").as_deref(), Some("/"));
    }

    #[test]
    fn strip_root_prefix_keeps_path() {
        let rules = [Rule {
            strip_prefix: true,
            ..prefix_rule("/", "web")
        }];
        let destination = first_match(&rules, "GET", "/a/b").unwrap();
        assert_eq!(destination.path.as_deref(), Some("/a/b"));
    }

    #[test]
    fn without_strip_path_unchanged() {
        let rules = [prefix_rule("/api", "api")];
        let destination = first_match(&rules, "GET", "/api/orders").unwrap();
        assert_eq!(destination.path, None);
    }

    #[test]
    fn rule_check_rejects_invalid() {
        let both = Rule {
            exact: Some("/".to_string()),
            ..prefix_rule("/a", "a")
        };
        assert_eq!(both.check().unwrap_err(), "has both `prefix` and `exact`");
        let neither = Rule {
            prefix: None,
            ..prefix_rule("/a", "a")
        };
        assert_eq!(neither.check().unwrap_err(), "needs `prefix` or `exact`");
        let relative = prefix_rule("users", "users");
        assert_eq!(
            relative.check().unwrap_err(),
            "path \"users\" does not start with `/`"
        );
        let strip_exact = Rule {
            strip_prefix: true,
            ..exact_rule("/a", "a")
        };
        assert_eq!(
            strip_exact.check().unwrap_err(),
            "`strip_prefix` needs `prefix`"
        );
        assert_eq!(
            prefix_rule("/a", "").check().unwrap_err(),
            "`upstream` is empty"
        );
        assert_eq!(prefix_rule("/a", "a").check(), Ok(()));
    }

    #[test]
    fn on_request_routes_match() {
        testing::set_config(
            r#"{"rules":[
                {"prefix":"/users","upstream":"users"},
                {"prefix":"/checkout","methods":["POST"],"upstream":"payments"},
                {"prefix":"/api","upstream":"api","strip_prefix":true},
                {"exact":"/","upstream":"web"}
            ]}"#,
        );
        assert_eq!(
            PathRouter::on_request(request("GET", "/users/7")),
            Action::route("users")
        );
        assert_eq!(
            PathRouter::on_request(request("POST", "/checkout")),
            Action::route("payments")
        );
        assert_eq!(
            PathRouter::on_request(request("GET", "/")),
            Action::route("web")
        );
        assert_eq!(
            PathRouter::on_request(request("GET", "/api/orders")),
            Action::Route {
                upstream: "api".to_string(),
                changes: RequestChanges::new().path("/orders"),
            }
        );
    }

    #[test]
    fn on_request_no_match_is_404() {
        testing::set_config(
            r#"{"rules":[{"prefix":"/checkout","methods":["POST"],"upstream":"payments"}]}"#,
        );
        let Action::Respond(response) = PathRouter::on_request(request("GET", "/checkout")) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 404);
        assert_eq!(
            response.headers.get("content-type"),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            body,
            serde_json::json!({"error": "no_rule", "message": "no rule matches GET /checkout"})
        );
    }

    #[test]
    fn on_request_invalid_config_is_500() {
        testing::set_config(r#"{"rules":[{"prefix":"/a"}]}"#);
        let Action::Respond(response) = PathRouter::on_request(request("GET", "/a")) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "worker_config_invalid");
        assert_eq!(
            body["message"],
            "invalid path-router config: rules[0]: missing field `upstream`"
        );
        let logs = testing::take_logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].1, body["message"]);
    }

    #[test]
    fn on_request_invalid_rule_names_index() {
        testing::set_config(
            r#"{"rules":[{"exact":"/","upstream":"web"},{"prefix":"x","upstream":"x"}]}"#,
        );
        let Action::Respond(response) = PathRouter::on_request(request("GET", "/")) else {
            panic!("expected Action::Respond");
        };
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            body["message"],
            "invalid path-router config: rules[1] path \"x\" does not start with `/`"
        );
    }
}
