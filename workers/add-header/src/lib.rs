//! `add-header`: sets fixed headers on the request sent to the upstream and,
//! optionally, on the response sent back to the client.
//!
//! ```toml
//! [[routes.workers]]
//! module = "modules/add-header.wasm"
//!
//! [routes.workers.config]
//! # Set on the request to the upstream, replacing earlier values.
//! headers = { "x-edge-region" = "eu-west", "x-forwarded-proto" = "https" }
//! # Optional: set on the upstream's response.
//! response_headers = { "strict-transport-security" = "max-age=63072000" }
//! ```
//!
//! Header names must be HTTP tokens and values must not contain control
//! characters other than tab. The node rejects an invalid config when it
//! loads the module: one with neither `headers` nor `response_headers`, with
//! an unknown key, or with a bad header. Should one reach a request anyway,
//! the request fails with 500 and the body
//! `{"error":"worker_config_invalid","message":"..."}`, and an error is logged.

use std::collections::BTreeMap;

use edge_sdk::{
    Action, Hooks, Request, RequestChanges, Response, ResponseChanges, ResponseHead, Worker,
};
use serde::{Deserialize, Serialize};

/// The worker's config table.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    /// Headers set on the request to the upstream.
    #[serde(default)]
    headers: BTreeMap<String, String>,
    /// Headers set on the upstream's response.
    #[serde(default)]
    response_headers: BTreeMap<String, String>,
}

/// The JSON body of the response to a request when the config is invalid.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// Reads and checks the config, returning a message for the log and the
/// client when it is invalid.
fn load_config() -> Result<Config, String> {
    let config: Config =
        edge_sdk::config::parse().map_err(|error| format!("invalid add-header config: {error}"))?;
    if config.headers.is_empty() && config.response_headers.is_empty() {
        return Err(
            "invalid add-header config: set `headers`, `response_headers` or both".to_owned(),
        );
    }
    for (key, headers) in [
        ("headers", &config.headers),
        ("response_headers", &config.response_headers),
    ] {
        for (name, value) in headers {
            check_header(name, value)
                .map_err(|reason| format!("invalid add-header config: {key}.{name}: {reason}"))?;
        }
    }
    Ok(config)
}

/// Checks that `name` is an HTTP token and `value` a valid field value
/// (RFC 9110, sections 5.1 and 5.5).
fn check_header(name: &str, value: &str) -> Result<(), &'static str> {
    const TOKEN_SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    if name.is_empty() {
        return Err("header name is empty");
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || TOKEN_SYMBOLS.contains(&byte))
    {
        return Err("header name contains a character that is not allowed in an HTTP token");
    }
    if value
        .bytes()
        .any(|byte| (byte < 0x20 && byte != b'\t') || byte == 0x7f)
    {
        return Err("header value contains a control character");
    }
    Ok(())
}

fn invalid_config_response(message: String) -> Action {
    edge_sdk::log::error(&message);
    Action::respond(Response::json(
        500,
        &ErrorBody {
            error: "worker_config_invalid",
            message,
        },
    ))
}

struct AddHeader;

impl Worker for AddHeader {
    fn check_config() -> Result<(), String> {
        load_config().map(drop)
    }

    fn hooks() -> Hooks {
        // An invalid config needs no response hook: every request fails
        // before the upstream.
        let response = load_config().is_ok_and(|config| !config.response_headers.is_empty());
        Hooks { response }
    }

    fn on_request(_request: Request) -> Action {
        let config = match load_config() {
            Ok(config) => config,
            Err(message) => return invalid_config_response(message),
        };
        let mut changes = RequestChanges::new();
        for (name, value) in config.headers {
            changes = changes.set_header(name, value);
        }
        Action::Continue(changes)
    }

    fn on_response(_request: Request, _response: ResponseHead) -> ResponseChanges {
        let config = match load_config() {
            Ok(config) => config,
            Err(message) => {
                edge_sdk::log::error(&message);
                return ResponseChanges::new();
            }
        };
        let mut changes = ResponseChanges::new();
        for (name, value) in config.response_headers {
            changes = changes.set_header(name, value);
        }
        changes
    }
}

edge_sdk::export_worker!(AddHeader);

#[cfg(test)]
mod tests {
    use edge_sdk::log::Level;
    use edge_sdk::testing;

    use super::*;

    fn request() -> Request {
        Request {
            method: "GET".to_string(),
            path: "/".to_string(),
            ..Request::default()
        }
    }

    fn response_head() -> ResponseHead {
        ResponseHead {
            status: 200,
            headers: Default::default(),
        }
    }

    fn pair(name: &str, value: &str) -> (String, String) {
        (name.to_string(), value.to_string())
    }

    #[test]
    fn sets_request_headers() {
        testing::set_config(r#"{"headers":{"X-Edge":"1","x-region":"eu"}}"#);
        let Action::Continue(changes) = AddHeader::on_request(request()) else {
            panic!("expected Action::Continue");
        };
        assert_eq!(
            changes.set_headers,
            [pair("x-edge", "1"), pair("x-region", "eu")]
        );
        assert!(changes.remove_headers.is_empty());
        assert_eq!(changes.path, None);
    }

    #[test]
    fn hooks_without_response_headers() {
        testing::set_config(r#"{"headers":{"x-edge":"1"}}"#);
        assert!(!AddHeader::hooks().response);
    }

    #[test]
    fn hooks_with_response_headers() {
        testing::set_config(r#"{"headers":{},"response_headers":{"server":"edge"}}"#);
        assert!(AddHeader::hooks().response);
    }

    #[test]
    fn sets_response_headers() {
        testing::set_config(r#"{"headers":{},"response_headers":{"Server":"edge"}}"#);
        let changes = AddHeader::on_response(request(), response_head());
        assert_eq!(changes.set_headers, [pair("server", "edge")]);
    }

    #[test]
    fn no_headers_at_all_is_500() {
        testing::set_config(r#"{"response_headers":{}}"#);
        let Action::Respond(response) = AddHeader::on_request(request()) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        assert_eq!(
            response.headers.get("content-type"),
            Some("application/json")
        );
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(body["error"], "worker_config_invalid");
        assert_eq!(
            body["message"],
            "invalid add-header config: set `headers`, `response_headers` or both"
        );
        let logs = testing::take_logs();
        assert_eq!(logs.len(), 1);
        assert_eq!(logs[0].0, Level::Error);
        assert_eq!(logs[0].1, body["message"]);
    }

    #[test]
    fn unknown_key_is_500() {
        testing::set_config(r#"{"headers":{},"header":{"x-a":"1"}}"#);
        let Action::Respond(response) = AddHeader::on_request(request()) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        assert!(!AddHeader::hooks().response);
    }

    #[test]
    fn non_string_value_is_500() {
        testing::set_config(r#"{"headers":{"x-a":1}}"#);
        let Action::Respond(response) = AddHeader::on_request(request()) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
    }

    #[test]
    fn invalid_header_name_is_500() {
        testing::set_config(r#"{"headers":{"x bad":"1"}}"#);
        let Action::Respond(response) = AddHeader::on_request(request()) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
        let body: serde_json::Value = serde_json::from_slice(&response.body).unwrap();
        assert_eq!(
            body["message"],
            "invalid add-header config: headers.x bad: header name contains a character \
             that is not allowed in an HTTP token"
        );
    }

    #[test]
    fn invalid_response_header_value_is_500() {
        testing::set_config(r#"{"headers":{},"response_headers":{"x-a":"1\r\nx-b: 2"}}"#);
        let Action::Respond(response) = AddHeader::on_request(request()) else {
            panic!("expected Action::Respond");
        };
        assert_eq!(response.status, 500);
    }

    #[test]
    fn check_header_cases() {
        assert_eq!(check_header("x-edge", "a b\tc"), Ok(()));
        assert_eq!(check_header("x-edge", "caf\u{e9}"), Ok(()));
        assert!(check_header("", "1").is_err());
        assert!(check_header("x:edge", "1").is_err());
        assert!(check_header("x-edge", "a\nb").is_err());
        assert!(check_header("x-edge", "a\u{7f}").is_err());
    }
}
