//! Native tests of the worker's flow, with `testing::on_fetch` standing in
//! for the upstreams.

use std::cell::RefCell;
use std::rc::Rc;
use std::time::Duration;

use edge_sdk::fetch::{FetchError, Request as FetchRequest, Response as FetchResponse};
use edge_sdk::testing;
use serde_json::json;

use super::*;

const CONFIG: &str = r#"{
    "sections": [
        {"name": "rows", "upstream": "recs", "path": "/rows?user={user}&device={device}",
         "timeout": "300ms", "list": "rows"},
        {"name": "billing", "upstream": "billing", "path": "/users/{user}/plan",
         "timeout": "100ms", "required": true},
        {"name": "history", "upstream": "history", "path": "/users/{user}/continue"}
    ],
    "forward_headers": ["accept-language"],
    "devices": {
        "mobile": {"sections": {
            "rows": {"max_items": 1, "fields": ["id", "image=images.small"]},
            "billing": {"fields": ["plan"]}
        }},
        "tv": {"sections": {
            "rows": {"fields": ["id", "title", "image=images.large"]},
            "billing": {},
            "history": {}
        }}
    }
}"#;

/// Builds a request for `device` by the user `u 7`, whom it puts in the
/// context as an auth worker before this one would.
fn request(device: &str) -> Request {
    testing::clear_context();
    edge_sdk::context::set("user", "u 7").unwrap();
    Request {
        method: "GET".to_string(),
        path: format!("/{device}/home"),
        headers: [("accept-language", "de")].into_iter().collect(),
        params: vec![("device".to_string(), device.to_string())],
        ..Request::default()
    }
}

fn ok_json(value: serde_json::Value) -> Result<FetchResponse, FetchError> {
    Ok(FetchResponse {
        status: 200,
        headers: Default::default(),
        body: value.to_string().into_bytes(),
    })
}

/// Returns a fetch handler that responds as healthy upstreams would and
/// records each request.
fn healthy(
    seen: Rc<RefCell<Vec<FetchRequest>>>,
) -> impl Fn(FetchRequest) -> Result<FetchResponse, FetchError> {
    move |request| {
        seen.borrow_mut().push(request.clone());
        match request.upstream.as_str() {
            "recs" => ok_json(json!({"rows": [
                {"id": 1, "title": "a", "images": {"small": "a-s", "large": "a-l"}},
                {"id": 2, "title": "b", "images": {"small": "b-s", "large": "b-l"}}
            ]})),
            "billing" => ok_json(json!({"plan": "premium", "card": "4242"})),
            "history" => ok_json(json!([{"id": 9}])),
            _ => Err(FetchError::NotAllowed),
        }
    }
}

fn respond_of(action: Action) -> Response {
    match action {
        Action::Respond(response) => response,
        other => panic!("expected Action::Respond, got {other:?}"),
    }
}

fn json_body(response: &Response) -> serde_json::Value {
    serde_json::from_slice(&response.body).expect("response body is JSON")
}

#[test]
fn mobile_gets_compact_shape() {
    testing::set_config(CONFIG);
    let seen = Rc::new(RefCell::new(Vec::new()));
    testing::on_fetch(healthy(seen.clone()));
    let response = respond_of(BffAggregate::on_request(request("mobile")));
    assert_eq!(response.status, 200);
    assert_eq!(response.headers.get(PARTIAL_HEADER), None);
    assert_eq!(response.headers.get("cache-control"), Some("private"));
    assert_eq!(
        json_body(&response),
        json!({
            "device": "mobile",
            "user": "u 7",
            "rows": [{"id": 1, "image": "a-s"}],
            "billing": {"plan": "premium"},
            "partial": []
        })
    );
    let seen = seen.borrow();
    assert_eq!(seen.len(), 2, "mobile does not show history");
    assert_eq!(seen[0].path, "/rows?user=u%207&device=mobile");
    assert_eq!(seen[0].timeout, Some(Duration::from_millis(300)));
    assert_eq!(seen[0].headers.get("x-user-id"), Some("u 7"));
    assert_eq!(seen[0].headers.get("accept-language"), Some("de"));
    assert_eq!(seen[1].path, "/users/u%207/plan");
}

#[test]
fn tv_gets_rich_shape() {
    testing::set_config(CONFIG);
    testing::on_fetch(healthy(Rc::default()));
    let response = respond_of(BffAggregate::on_request(request("TV")));
    let body = json_body(&response);
    assert_eq!(body["device"], "tv");
    assert_eq!(body["rows"].as_array().unwrap().len(), 2);
    assert_eq!(
        body["rows"][1],
        json!({"id": 2, "title": "b", "image": "b-l"})
    );
    assert_eq!(body["billing"], json!({"plan": "premium", "card": "4242"}));
    assert_eq!(body["history"], json!([{"id": 9}]));
}

#[test]
fn failed_section_is_partial() {
    testing::set_config(CONFIG);
    let inner = healthy(Rc::default());
    testing::on_fetch(move |request| match request.upstream.as_str() {
        "history" => Err(FetchError::TimedOut),
        "recs" => Ok(FetchResponse {
            status: 500,
            headers: Default::default(),
            body: Vec::new(),
        }),
        _ => inner(request),
    });
    let response = respond_of(BffAggregate::on_request(request("tv")));
    assert_eq!(response.status, 200);
    assert_eq!(response.headers.get(PARTIAL_HEADER), Some("rows, history"));
    let body = json_body(&response);
    assert_eq!(body["partial"], json!(["rows", "history"]));
    assert!(body.get("rows").is_none());
    assert!(body.get("history").is_none());
    assert_eq!(body["billing"]["plan"], "premium");
}

#[test]
fn required_section_failing_is_502() {
    testing::set_config(CONFIG);
    let inner = healthy(Rc::default());
    testing::on_fetch(move |request| match request.upstream.as_str() {
        "billing" => Err(FetchError::Unavailable("circuit_open".to_string())),
        _ => inner(request),
    });
    let response = respond_of(BffAggregate::on_request(request("mobile")));
    assert_eq!(response.status, 502);
    let body = json_body(&response);
    assert_eq!(body["error"], "required_section_failed");
    assert_eq!(body["failed"], json!({"billing": "circuit_open"}));
}

#[test]
fn every_section_failing_is_502() {
    testing::set_config(CONFIG);
    testing::on_fetch(|_| Err(FetchError::TimedOut));
    let response = respond_of(BffAggregate::on_request(request("tv")));
    assert_eq!(response.status, 502);
    let body = json_body(&response);
    assert_eq!(body["error"], "all_sections_failed");
    assert_eq!(
        body["failed"],
        json!({"rows": "timed_out", "billing": "timed_out", "history": "timed_out"})
    );
}

#[test]
fn invalid_json_fails_section() {
    testing::set_config(CONFIG);
    let inner = healthy(Rc::default());
    testing::on_fetch(move |request| match request.upstream.as_str() {
        "recs" => ok_json(json!({"items": []})),
        "history" => Ok(FetchResponse {
            status: 200,
            headers: Default::default(),
            body: b"not json".to_vec(),
        }),
        _ => inner(request),
    });
    let response = respond_of(BffAggregate::on_request(request("tv")));
    assert_eq!(response.status, 200);
    assert_eq!(json_body(&response)["partial"], json!(["rows", "history"]));
}

#[test]
fn unknown_device_is_404() {
    testing::set_config(CONFIG);
    testing::on_fetch(|_| panic!("nothing is fetched for an unknown device"));
    let response = respond_of(BffAggregate::on_request(request("fridge")));
    assert_eq!(response.status, 404);
    let body = json_body(&response);
    assert_eq!(body["error"], "unknown_device");
    assert_eq!(
        body["message"],
        "device class \"fridge\" has no shape; expected one of mobile, tv"
    );
}

#[test]
fn default_device_used_for_unknown_class() {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["default_device"] = json!("mobile");
    testing::set_config(&config.to_string());
    testing::on_fetch(healthy(Rc::default()));
    let response = respond_of(BffAggregate::on_request(request("fridge")));
    assert_eq!(response.status, 200);
    assert_eq!(json_body(&response)["device"], "mobile");
}

#[test]
fn required_user_section_is_401() {
    testing::set_config(CONFIG);
    testing::on_fetch(|_| panic!("nothing is fetched when billing needs a user"));
    let without_user = request("mobile");
    testing::clear_context();
    let response = respond_of(BffAggregate::on_request(without_user));
    assert_eq!(response.status, 401);
    let body = json_body(&response);
    assert_eq!(body["error"], "user_missing");
    assert_eq!(
        body["message"],
        "the sections rows, billing need a user id, and the request has none in the context value \"user\""
    );
}

#[test]
fn user_in_every_section_is_401() {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["sections"][1]["required"] = json!(false);
    testing::set_config(&config.to_string());
    testing::on_fetch(|_| panic!("nothing is fetched when every section needs a user"));
    let without_user = request("tv");
    testing::clear_context();
    let response = respond_of(BffAggregate::on_request(without_user));
    assert_eq!(response.status, 401);
    assert_eq!(json_body(&response)["error"], "user_missing");
}

#[test]
fn missing_user_skips_optional_sections() {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["sections"][0]["path"] = json!("/rows?device={device}");
    config["sections"][1]["required"] = json!(false);
    testing::set_config(&config.to_string());
    let seen = Rc::default();
    testing::on_fetch(healthy(Rc::clone(&seen)));
    let without_user = request("tv");
    testing::clear_context();
    let response = respond_of(BffAggregate::on_request(without_user));
    assert_eq!(response.status, 200);
    let body = json_body(&response);
    assert_eq!(body["user"], serde_json::Value::Null);
    assert_eq!(body["partial"], json!(["billing", "history"]));
    assert!(body["rows"].is_array());
    let upstreams: Vec<String> = seen.borrow().iter().map(|r| r.upstream.clone()).collect();
    assert_eq!(upstreams, ["recs"]);
}

#[test]
fn require_user_is_401() {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["require_user"] = json!(true);
    testing::set_config(&config.to_string());
    let without_user = request("mobile");
    testing::clear_context();
    let response = respond_of(BffAggregate::on_request(without_user));
    assert_eq!(response.status, 401);
    assert_eq!(json_body(&response)["error"], "user_missing");
}

#[test]
fn user_header_when_context_empty() {
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["user_header"] = json!("x-account");
    testing::set_config(&config.to_string());
    let seen = Rc::new(RefCell::new(Vec::new()));
    testing::on_fetch(healthy(seen.clone()));
    let mut from_header = request("mobile");
    testing::clear_context();
    from_header.headers.append("x-account", "acct-1");
    let response = respond_of(BffAggregate::on_request(from_header.clone()));
    assert_eq!(json_body(&response)["user"], "acct-1");
    assert_eq!(seen.borrow()[0].headers.get("x-user-id"), Some("acct-1"));

    edge_sdk::context::set("user", "ctx-9").unwrap();
    let response = respond_of(BffAggregate::on_request(from_header));
    assert_eq!(json_body(&response)["user"], "ctx-9", "the context wins");
}

#[test]
fn user_id_that_leaves_its_segment_is_400() {
    testing::set_config(CONFIG);
    testing::on_fetch(|_| panic!("nothing is fetched for a user id that leaves its segment"));
    for user in [
        "..",
        ".",
        "x/../..",
        "a\\b",
        "/",
        "..;",
        "\u{FF0E}\u{FF0E}",
        "a\u{FF0F}b",
    ] {
        let request = request("tv");
        testing::clear_context();
        edge_sdk::context::set("user", user).unwrap();
        let response = respond_of(BffAggregate::on_request(request));
        assert_eq!(response.status, 400, "{user:?}");
        let body = json_body(&response);
        assert_eq!(body["error"], "invalid_user");
        assert!(
            body["message"]
                .as_str()
                .unwrap()
                .contains(&format!("{user:?}")),
            "{body}"
        );
    }
}

#[test]
fn query_keeps_dotted_user_id() {
    // Only `rows` is fetched for mobile without billing: its user id goes in
    // the query, where a slash or dots change nothing.
    let mut config: serde_json::Value = serde_json::from_str(CONFIG).unwrap();
    config["devices"]["mobile"]["sections"] = json!({"rows": {}});
    testing::set_config(&config.to_string());
    let seen = Rc::new(RefCell::new(Vec::new()));
    testing::on_fetch(healthy(seen.clone()));
    let request = request("mobile");
    edge_sdk::context::set("user", "../a/b").unwrap();
    let response = respond_of(BffAggregate::on_request(request));
    assert_eq!(response.status, 200);
    assert_eq!(seen.borrow()[0].path, "/rows?user=..%2Fa%2Fb&device=mobile");
}

#[test]
fn header_ignored_without_user_header() {
    testing::set_config(CONFIG);
    testing::on_fetch(healthy(Rc::default()));
    let mut spoofed = request("mobile");
    testing::clear_context();
    spoofed.headers.append("x-user-id", "someone-else");
    let response = respond_of(BffAggregate::on_request(spoofed));
    assert_eq!(response.status, 401, "the header is not a user id");
    assert_eq!(json_body(&response)["error"], "user_missing");
}

#[test]
fn invalid_configs_are_rejected() {
    let cases = [
        (
            json!({"sections": [], "devices": {}}),
            "`sections` is empty",
        ),
        (
            json!({"sections": [{"name": "user", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"user": {}}}}}),
            "sections[0] name \"user\" is a key the worker sets itself",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "x"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[0] path \"x\" does not start with `/`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/", "timeout": "5m"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[0] timeout: \"5m\" is not a duration",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"},
                                {"name": "a", "upstream": "b", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[1] name \"a\" is used twice",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"b": {}}}}}),
            "devices.tv.sections names \"b\", which is not in `sections`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {"fields": ["x="]}}}}}),
            "devices.tv.sections.a.fields: \"x=\" is not",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}}, "device": "query:d"}),
            "device \"query:d\" is not `param:NAME` or `header:NAME`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}}, "default_device": "pc"}),
            "default_device \"pc\" is not a key of `devices`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/u/{user"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[0] path \"/u/{user\" has a `{` without its `}`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/u/user}"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[0] path \"/u/user}\" has a `}` without its `{`",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/u/{}"}],
                   "devices": {"tv": {"sections": {"a": {}}}}}),
            "sections[0] path \"/u/{}\" has an invalid placeholder {}",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}},
                   "forward_headers": ["accept-language", "X-User-Id"]}),
            "forward_headers[1] \"X-User-Id\" carries the user id",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}},
                   "user_header": "x-account", "forward_headers": ["x-account"]}),
            "forward_headers[0] \"x-account\" carries the user id",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}}, "forward_headers": ["Host"]}),
            "forward_headers[0] \"Host\" is set by the node or the worker",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}},
                   "forward_headers": ["accept-language", "X-Forwarded-For"]}),
            "forward_headers[1] \"X-Forwarded-For\" is set by the node or the worker",
        ),
        (
            json!({"sections": [{"name": "a", "upstream": "a", "path": "/"}],
                   "devices": {"tv": {"sections": {"a": {}}}}, "upstream_user_header": "host"}),
            "upstream_user_header \"host\" is a header the node or the worker sets",
        ),
    ];
    for (config, expected) in cases {
        testing::set_config(&config.to_string());
        let error = BffAggregate::check_config().unwrap_err();
        assert!(
            error.starts_with(&format!("invalid bff-aggregate config: {expected}")),
            "{error}"
        );
    }
}

#[test]
fn unfetchable_section_rejected_at_load() {
    testing::set_config(
        &json!({"sections": [{"name": "a", "upstream": "recs", "path": "/"},
                             {"name": "b", "upstream": "promo", "path": "/"}],
                "devices": {"tv": {"sections": {"a": {}, "b": {}}}}})
        .to_string(),
    );
    testing::set_fetch_allowed(&["recs"]);
    let error = BffAggregate::check_config().unwrap_err();
    assert_eq!(
        error,
        "invalid bff-aggregate config: sections[1] upstream \"promo\" is not in the worker \
         entry's `fetch` list; add it there"
    );
    testing::set_fetch_allowed(&["recs", "promo"]);
    assert_eq!(BffAggregate::check_config(), Ok(()));
}

#[test]
fn invalid_config_request_is_500() {
    testing::set_config(r#"{"sections": []}"#);
    let response = respond_of(BffAggregate::on_request(request("tv")));
    assert_eq!(response.status, 500);
    assert_eq!(json_body(&response)["error"], "worker_config_invalid");
}

#[test]
fn render_path_encodes_values() {
    let request = request("tv");
    assert_eq!(
        render_path("/{device}/{user}?q={device}", &request, "tv", Some("a b&c")),
        Ok("/tv/a%20b%26c?q=tv".to_string())
    );
    assert_eq!(
        render_path("/{device}?q={user}", &request, "tv", Some("../a/b")),
        Ok("/tv?q=..%2Fa%2Fb".to_string())
    );
    assert_eq!(
        render_path("/{missing}", &request, "tv", None),
        Err("the route has no path parameter \"missing\"".to_string())
    );
    assert_eq!(
        render_path("/{user", &request, "tv", None),
        Err("path \"/{user\" has a `{` without its `}`".to_string())
    );
    assert_eq!(
        render_path("/users/{user}/plan", &request, "tv", Some("..")),
        Err("the value of {user}, \"..\", is a dot segment".to_string())
    );
    assert_eq!(
        render_path("/users/{user}", &request, "tv", Some("a/b")),
        Err("the value of {user}, \"a/b\", contains a slash".to_string())
    );
}
