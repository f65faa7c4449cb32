//! `ab-test`: assigns each user to a variant of an experiment by a stable hash
//! of the user id, sets the variant on the request to the upstream, keeps the variant
//! in a sticky cookie, and can send each variant to its own upstream.
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/ab-test.wasm"
//!
//! [routes.workers.config]
//! experiment = "checkout-redesign"
//! variants = [
//!     { name = "control", weight = 90 },
//!     { name = "redesign", weight = 10, upstream = "checkout-v2" },
//! ]
//! # Where the user id comes from; the first non-empty source wins. `context`
//! # reads a request context value that an earlier worker set.
//! user_id = [{ context = "user" }, { cookie = "uid" }, { header = "x-user-id" }]
//! # Optional; these are the defaults except `secure`.
//! cookie = { name = "ab_checkout-redesign", path = "/", max_age = "30d", secure = true }
//! ```
//!
//! The variant for a request is, in this order:
//!
//! 1. with a user id: the variant its hash picks (see [`assign`]), so the
//!    same user gets the same variant on every device;
//! 2. without one, the variant the sticky cookie names, if it names one of
//!    this experiment's variants;
//! 3. otherwise the variant that the hash of a fresh random id picks, which
//!    is a draw by weight.
//!
//! The worker sets `X-Experiment` and `X-Variant` on the request to the
//! upstream, replacing any the client sent. When the request's sticky
//! cookie is missing or names another variant, the response hook adds a
//! `Set-Cookie` for the chosen variant (`HttpOnly`, `SameSite=Lax`, and
//! `Secure` when configured), keeping the upstream's own cookies.
//!
//! The node rejects an invalid config when it loads the module, with a
//! message that names the field. Should one reach a request anyway, the
//! request fails with 500 and `{"error":"worker_config_invalid",...}`.

mod assign;
mod config;
mod cookie;

use edge_sdk::{
    Action, Hooks, Request, RequestChanges, Response, ResponseChanges, ResponseHead, Worker,
};
use serde::Serialize;

use crate::config::{Config, UserIdSource};

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
        .map_err(|message| format!("invalid ab-test config: {message}"))
}

/// Returns the first non-empty user id from the configured sources, in
/// order. `context` reads a request context value.
fn user_id(
    sources: &[UserIdSource],
    request: &Request,
    context: impl Fn(&str) -> Option<String>,
) -> Option<String> {
    sources.iter().find_map(|source| {
        let value = match source {
            UserIdSource::Context(name) => context(name),
            UserIdSource::Cookie(name) => cookie::find(&request.headers, name).map(str::to_owned),
            UserIdSource::Header(name) => request.header(name).map(str::to_owned),
        };
        value.filter(|value| !value.trim().is_empty())
    })
}

/// Returns a fresh random id for an anonymous user, 128 bits in hex.
fn random_id() -> String {
    let mut bytes = [0u8; 16];
    if let Err(error) = getrandom::fill(&mut bytes) {
        // The draw then depends on the clock, which still spreads users by
        // weight but is predictable.
        edge_sdk::log::warn(&format!(
            "cannot read random bytes, using the clock: {error}"
        ));
        bytes[..8].copy_from_slice(&edge_sdk::clock::monotonic_ns().to_le_bytes());
        bytes[8..].copy_from_slice(&edge_sdk::clock::now_unix_ms().to_le_bytes());
    }
    bytes.iter().map(|byte| format!("{byte:02x}")).collect()
}

/// Returns the index of the variant for `request`.
fn choose_variant(
    config: &Config,
    request: &Request,
    context: impl Fn(&str) -> Option<String>,
) -> usize {
    let weights = || config.variants.iter().map(|variant| variant.weight);
    if let Some(id) = user_id(&config.user_id, request, context) {
        let hash = assign::user_hash(&config.experiment, &id);
        return assign::pick(weights(), config.total_weight, hash);
    }
    let sticky = cookie::find(&request.headers, &config.cookie.name)
        .and_then(|name| config.variants.iter().position(|v| v.name == name));
    if let Some(index) = sticky {
        return index;
    }
    let hash = assign::user_hash(&config.experiment, &random_id());
    assign::pick(weights(), config.total_weight, hash)
}

/// Decides the request: headers for the upstream, and the variant's
/// upstream when it has one.
fn decide(config: &Config, request: &Request, context: impl Fn(&str) -> Option<String>) -> Action {
    let variant = &config.variants[choose_variant(config, request, context)];
    let changes = RequestChanges::new()
        .set_header(&config.experiment_header, &config.experiment)
        .set_header(&config.variant_header, &variant.name);
    match &variant.upstream {
        Some(upstream) => Action::Route {
            upstream: upstream.clone(),
            changes,
        },
        None => Action::Continue(changes),
    }
}

/// Returns the response changes that set the sticky cookie, when the
/// request's cookie does not already name the variant the request got.
fn sticky_cookie_changes(
    config: &Config,
    request: &Request,
    response: &ResponseHead,
) -> ResponseChanges {
    // The request hook set this header, replacing any client copy.
    let Some(variant) = request
        .header(&config.variant_header)
        .and_then(|name| config.variant(name))
    else {
        return ResponseChanges::new();
    };
    if cookie::find(&request.headers, &config.cookie.name) == Some(variant.name.as_str()) {
        return ResponseChanges::new();
    }
    // Values set for a name replace the upstream's, so list its cookies too.
    let mut changes = ResponseChanges::new();
    for value in response.headers.get_all("set-cookie") {
        changes = changes.append_header("set-cookie", value);
    }
    changes.append_header("set-cookie", config.cookie.set_cookie(&variant.name))
}

struct AbTest;

impl Worker for AbTest {
    fn check_config() -> Result<(), String> {
        let config = load_config()?;
        for (field, upstream) in config.upstreams() {
            if !edge_sdk::upstreams::exists(upstream) {
                return Err(format!(
                    "invalid ab-test config: {field}: no upstream named {upstream:?} in the \
                     node's config"
                ));
            }
        }
        Ok(())
    }

    fn hooks() -> Hooks {
        // An invalid config fails every request before the upstream.
        Hooks {
            response: load_config().is_ok(),
        }
    }

    fn on_request(request: Request) -> Action {
        match load_config() {
            Ok(config) => decide(&config, &request, edge_sdk::context::get),
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

    fn on_response(request: Request, response: ResponseHead) -> ResponseChanges {
        match load_config() {
            Ok(config) => sticky_cookie_changes(&config, &request, &response),
            Err(message) => {
                edge_sdk::log::error(&message);
                ResponseChanges::new()
            }
        }
    }
}

edge_sdk::export_worker!(AbTest);

#[cfg(test)]
mod tests {
    use edge_sdk::{testing, Headers};

    use super::*;

    const CONFIG: &str = r#"{"experiment":"checkout","variants":[
        {"name":"control","weight":50},{"name":"new","weight":50,"upstream":"v2"}],
        "user_id":[{"context":"user"},{"cookie":"uid"},{"header":"x-user-id"}],
        "cookie":{"secure":true}}"#;

    fn config() -> Config {
        config::parse(CONFIG).unwrap()
    }

    fn request(headers: &[(&str, &str)]) -> Request {
        Request {
            method: "GET".to_string(),
            path: "/".to_string(),
            headers: headers.iter().copied().collect(),
            ..Request::default()
        }
    }

    fn no_context(_: &str) -> Option<String> {
        None
    }

    /// Returns the variant header of a decision and whether it routes.
    fn variant_of(action: &Action) -> (String, Option<String>) {
        let (changes, upstream) = match action {
            Action::Continue(changes) => (changes, None),
            Action::Route { upstream, changes } => (changes, Some(upstream.clone())),
            Action::Respond(_) => panic!("unexpected response"),
        };
        let variant = changes
            .set_headers
            .iter()
            .find(|(name, _)| name == "x-variant")
            .map(|(_, value)| value.clone())
            .expect("x-variant set");
        (variant, upstream)
    }

    #[test]
    fn sets_headers_and_routes_variant() {
        let config = config();
        let action = decide(&config, &request(&[("x-user-id", "alice")]), no_context);
        let expected = config.variants
            [assign::pick([50, 50], 100, assign::user_hash("checkout", "alice"))]
        .clone();
        let (variant, upstream) = variant_of(&action);
        assert_eq!(variant, expected.name);
        assert_eq!(upstream, expected.upstream);
        let changes = match action {
            Action::Continue(changes) | Action::Route { changes, .. } => changes,
            Action::Respond(_) => unreachable!(),
        };
        assert_eq!(
            changes.set_headers[0],
            ("x-experiment".to_string(), "checkout".to_string())
        );
    }

    #[test]
    fn same_user_same_variant() {
        let config = config();
        for user in ["alice", "bob", "carol", "dave", "erin"] {
            let first = variant_of(&decide(
                &config,
                &request(&[("x-user-id", user)]),
                no_context,
            ));
            for _ in 0..5 {
                let again = variant_of(&decide(
                    &config,
                    &request(&[("x-user-id", user)]),
                    no_context,
                ));
                assert_eq!(again, first, "user {user}");
            }
        }
    }

    #[test]
    fn sources_tried_in_order() {
        let config = config();
        let request = request(&[("cookie", "uid=from-cookie"), ("x-user-id", "from-header")]);
        let from_context = |name: &str| (name == "user").then(|| "from-context".to_string());
        assert_eq!(
            user_id(&config.user_id, &request, from_context).as_deref(),
            Some("from-context")
        );
        assert_eq!(
            user_id(&config.user_id, &request, no_context).as_deref(),
            Some("from-cookie")
        );
        let header_only = super::tests::request(&[("x-user-id", "from-header")]);
        assert_eq!(
            user_id(&config.user_id, &header_only, no_context).as_deref(),
            Some("from-header")
        );
        let blank = super::tests::request(&[("cookie", "uid="), ("x-user-id", " ")]);
        assert_eq!(user_id(&config.user_id, &blank, no_context), None);
    }

    #[test]
    fn user_id_wins_over_sticky_cookie() {
        let config = config();
        let hashed = variant_of(&decide(
            &config,
            &request(&[("x-user-id", "alice")]),
            no_context,
        ))
        .0;
        let other = if hashed == "new" { "control" } else { "new" };
        let cookie = format!("ab_checkout={other}");
        let both = request(&[("x-user-id", "alice"), ("cookie", &cookie)]);
        assert_eq!(variant_of(&decide(&config, &both, no_context)).0, hashed);
    }

    #[test]
    fn anonymous_keeps_sticky_variant() {
        let config = config();
        for variant in ["control", "new"] {
            let cookie = format!("ab_checkout={variant}");
            for _ in 0..10 {
                let action = decide(&config, &request(&[("cookie", &cookie)]), no_context);
                assert_eq!(variant_of(&action).0, variant);
            }
        }
    }

    #[test]
    fn anonymous_draw_follows_weights() {
        let config = config::parse(
            r#"{"experiment":"e","variants":[{"name":"a","weight":80},{"name":"b","weight":20}]}"#,
        )
        .unwrap();
        let draws = 10_000;
        let mut a = 0;
        for _ in 0..draws {
            if variant_of(&decide(&config, &request(&[]), no_context)).0 == "a" {
                a += 1;
            }
        }
        let share = f64::from(a) * 100.0 / f64::from(draws);
        // 10,000 draws at p = 0.8: one standard deviation is 0.4 points.
        assert!((share - 80.0).abs() < 3.0, "got {share:.1}%");
    }

    #[test]
    fn unknown_sticky_variant_is_redrawn() {
        let config = config();
        let action = decide(
            &config,
            &request(&[("cookie", "ab_checkout=retired")]),
            no_context,
        );
        let (variant, _) = variant_of(&action);
        assert!(variant == "control" || variant == "new");
    }

    fn head(set_cookies: &[&str]) -> ResponseHead {
        ResponseHead {
            status: 200,
            headers: set_cookies
                .iter()
                .map(|value| ("set-cookie", *value))
                .collect::<Headers>(),
        }
    }

    #[test]
    fn response_sets_cookie_when_missing() {
        let config = config();
        let seen = request(&[("x-variant", "new")]);
        let changes = sticky_cookie_changes(&config, &seen, &head(&["session=1; Path=/"]));
        assert_eq!(
            changes.set_headers,
            [
                ("set-cookie".to_string(), "session=1; Path=/".to_string()),
                (
                    "set-cookie".to_string(),
                    "ab_checkout=new; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax; Secure"
                        .to_string()
                ),
            ]
        );
    }

    #[test]
    fn response_keeps_matching_cookie() {
        let config = config();
        let seen = request(&[("x-variant", "new"), ("cookie", "ab_checkout=new")]);
        assert!(sticky_cookie_changes(&config, &seen, &head(&[])).is_empty());
    }

    #[test]
    fn response_replaces_other_variant_cookie() {
        let config = config();
        let seen = request(&[("x-variant", "control"), ("cookie", "ab_checkout=retired")]);
        let changes = sticky_cookie_changes(&config, &seen, &head(&[]));
        assert_eq!(changes.set_headers.len(), 1);
        assert!(changes.set_headers[0].1.starts_with("ab_checkout=control;"));
    }

    #[test]
    fn response_without_variant_header_changes_nothing() {
        let config = config();
        let seen = request(&[("x-variant", "bogus")]);
        assert!(sticky_cookie_changes(&config, &seen, &head(&[])).is_empty());
    }

    #[test]
    fn invalid_config_is_500() {
        testing::set_config(r#"{"experiment":"e","variants":[{"name":"a","weight":0}]}"#);
        let Action::Respond(response) = AbTest::on_request(request(&[])) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "worker_config_invalid");
        assert_eq!(
            body["message"],
            "invalid ab-test config: variants[0].weight: must be greater than 0"
        );
        assert_eq!(testing::take_logs().len(), 1);
        assert_eq!(
            AbTest::check_config().unwrap_err(),
            "invalid ab-test config: variants[0].weight: must be greater than 0"
        );
        assert!(!AbTest::hooks().response);
    }

    #[test]
    fn check_config_needs_declared_upstreams() {
        testing::set_config(CONFIG);
        assert_eq!(
            AbTest::check_config().unwrap_err(),
            "invalid ab-test config: variants[1].upstream: no upstream named \"v2\" in the \
             node's config"
        );
        testing::set_upstreams(&["v2"]);
        assert_eq!(AbTest::check_config(), Ok(()));
    }

    #[test]
    fn on_request_reads_context() {
        testing::set_config(CONFIG);
        testing::clear_context();
        edge_sdk::context::set("user", "alice").unwrap();
        let from_context = AbTest::on_request(request(&[]));
        let from_header = decide(&config(), &request(&[("x-user-id", "alice")]), no_context);
        assert_eq!(variant_of(&from_context), variant_of(&from_header));
    }

    #[test]
    fn random_ids_differ() {
        let first = random_id();
        assert_eq!(first.len(), 32);
        assert_ne!(first, random_id());
    }
}
