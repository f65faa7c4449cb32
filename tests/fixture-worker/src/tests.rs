//! Native tests of the fixture's modes, except `loop`, which only ends under
//! the host's CPU deadline.

use edge_sdk::log::Level;
use edge_sdk::testing;

use super::*;

fn request() -> Request {
    Request {
        method: "GET".to_string(),
        path: "/echo".to_string(),
        query: Some("a=1".to_string()),
        headers: [("x-a", "1"), ("x-a", "2"), ("accept", "*/*")]
            .into_iter()
            .collect(),
        client_addr: "127.0.0.1".to_string(),
        route: "fixture".to_string(),
        params: vec![("id".to_string(), "7".to_string())],
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

fn pair(name: &str, value: &str) -> (String, String) {
    (name.to_string(), value.to_string())
}

#[test]
fn counter_responds_count() {
    testing::set_config(r#"{"mode":"counter"}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    let count: u64 = String::from_utf8(response.body).unwrap().parse().unwrap();
    assert!(count >= 1);
}

#[test]
fn alloc_small_amount() {
    testing::set_config(r#"{"mode":"alloc","bytes":3145729}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    assert_eq!(response.body, b"allocated 3145729 bytes");
}

#[test]
fn echo_reports_request() {
    testing::set_config(r#"{"mode":"echo"}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    assert_eq!(
        json_body(&response),
        serde_json::json!({
            "method": "GET",
            "path": "/echo",
            "query": "a=1",
            "headers": { "x-a": "1, 2", "accept": "*/*" },
            "client_addr": "127.0.0.1",
            "route": "fixture",
            "params": { "id": "7" },
        })
    );
}

#[test]
fn spin_waits_then_continues() {
    testing::set_config(r#"{"mode":"spin","ms":5}"#);
    let start = std::time::Instant::now();
    assert_eq!(Fixture::on_request(request()), Action::next());
    assert!(start.elapsed() >= std::time::Duration::from_millis(5));
}

#[test]
fn spin_without_ms_is_500() {
    testing::set_config(r#"{"mode":"spin"}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 500);
    assert_eq!(
        json_body(&response)["message"],
        "invalid config for mode `spin`: missing field `ms`"
    );
}

#[test]
fn set_changes_request() {
    testing::set_config(
        r#"{"mode":"set","set_headers":{"x-b":"2"},"remove_headers":["x-a"],"path":"/new"}"#,
    );
    let Action::Continue(changes) = Fixture::on_request(request()) else {
        panic!("expected Action::Continue");
    };
    assert_eq!(changes.set_headers, [pair("x-b", "2")]);
    assert_eq!(changes.remove_headers, ["x-a"]);
    assert_eq!(changes.path.as_deref(), Some("/new"));
}

#[test]
fn route_to_upstream() {
    testing::set_config(r#"{"mode":"route","upstream":"other","set_headers":{"x-b":"2"}}"#);
    let Action::Route { upstream, changes } = Fixture::on_request(request()) else {
        panic!("expected Action::Route");
    };
    assert_eq!(upstream, "other");
    assert_eq!(changes.set_headers, [pair("x-b", "2")]);
    assert_eq!(changes.path, None);
}

#[test]
fn respond_with_config() {
    testing::set_config(r#"{"mode":"respond","status":418,"body":"tea","headers":{"x-b":"2"}}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 418);
    assert_eq!(response.body, b"tea");
    assert_eq!(response.headers.get("x-b"), Some("2"));
}

#[test]
fn respond_defaults_to_200() {
    testing::set_config(r#"{"mode":"respond"}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    assert!(response.body.is_empty());
    assert!(response.headers.is_empty());
}

#[test]
fn response_header_mode() {
    testing::set_config(r#"{"mode":"response-header","response_headers":{"x-b":"2"}}"#);
    assert!(Fixture::hooks().response);
    assert_eq!(Fixture::on_request(request()), Action::next());
    let head = ResponseHead {
        status: 201,
        headers: Default::default(),
    };
    let changes = Fixture::on_response(request(), head);
    assert_eq!(
        changes.set_headers,
        [pair("x-b", "2"), pair("x-seen-status", "201")]
    );
}

#[test]
fn other_modes_skip_response_hook() {
    testing::set_config(r#"{"mode":"echo"}"#);
    assert!(!Fixture::hooks().response);
    testing::set_config("{}");
    assert!(!Fixture::hooks().response);
}

#[test]
fn config_mode_returns_json() {
    testing::set_config(r#"{"mode":"config","limit":5}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    assert_eq!(
        response.headers.get("content-type"),
        Some("application/json")
    );
    assert_eq!(
        json_body(&response),
        serde_json::json!({"mode": "config", "limit": 5})
    );
}

#[test]
fn log_writes_each_level() {
    testing::set_config(r#"{"mode":"log"}"#);
    assert_eq!(Fixture::on_request(request()), Action::next());
    let levels: Vec<Level> = testing::take_logs()
        .into_iter()
        .map(|(level, message)| {
            assert_eq!(message, "fixture log");
            level
        })
        .collect();
    assert_eq!(
        levels,
        [
            Level::Trace,
            Level::Debug,
            Level::Info,
            Level::Warn,
            Level::Error
        ]
    );
}

#[test]
fn clock_reports_both_clocks() {
    testing::set_config(r#"{"mode":"clock"}"#);
    let body = json_body(&respond_of(Fixture::on_request(request())));
    assert!(body["now_unix_ms"].as_u64().unwrap() > 1_577_836_800_000);
    assert!(body["monotonic_ns"].is_u64());
}

#[test]
fn unknown_mode_is_500() {
    testing::set_config(r#"{"mode":"dance"}"#);
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 500);
    let body = json_body(&response);
    assert_eq!(body["error"], "worker_config_invalid");
    assert!(body["message"]
        .as_str()
        .unwrap()
        .starts_with("unknown mode \"dance\"; expected one of counter, loop,"));
    assert_eq!(testing::take_logs().len(), 1);
}

#[test]
fn missing_mode_is_500() {
    testing::set_config("{}");
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 500);
    assert!(json_body(&response)["message"]
        .as_str()
        .unwrap()
        .starts_with("missing config key `mode`"));
}

#[test]
#[should_panic(expected = "fixture panic")]
fn panic_mode_panics() {
    testing::set_config(r#"{"mode":"panic"}"#);
    let _ = Fixture::on_request(request());
}

#[test]
fn fetch_reports_each_result() {
    testing::set_config(
        r#"{"mode":"fetch","requests":[
            {"upstream":"rows","path":"/rows","headers":{"x-a":"1"}},
            {"upstream":"other","path":"/"}
        ]}"#,
    );
    testing::on_fetch(|request| {
        if request.upstream != "rows" {
            return Err(edge_sdk::fetch::FetchError::NotAllowed);
        }
        assert_eq!(request.method, "GET");
        assert_eq!(request.headers.get("x-a"), Some("1"));
        Ok(edge_sdk::fetch::Response {
            status: 200,
            headers: [("x-b", "2")].into_iter().collect(),
            body: b"rows".to_vec(),
        })
    });
    let response = respond_of(Fixture::on_request(request()));
    assert_eq!(response.status, 200);
    let body = json_body(&response);
    assert_eq!(body["results"][0]["status"], 200);
    assert_eq!(body["results"][0]["headers"]["x-b"], "2");
    assert_eq!(body["results"][0]["body"], "rows");
    assert_eq!(body["results"][1]["error"], "not_allowed");
}
