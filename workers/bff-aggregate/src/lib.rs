//! `bff-aggregate`: a backend-for-frontend worker. For one endpoint, such as
//! `GET /{device}/home`, it calls several upstreams at once and stitches
//! their JSON into one response shaped for the client's device class.
//!
//! ```toml
//! [[routes]]
//! name = "home"
//! pattern = "/{device}/home"
//! methods = ["GET"]
//!
//! [[routes.workers]]
//! module = "modules/bff-aggregate.wasm"
//! fetch = ["recommendations", "history", "billing"]
//!
//! [routes.workers.config]
//! sections = [
//!     { name = "rows", upstream = "recommendations", path = "/rows?user={user}", timeout = "300ms", list = "rows" },
//!     { name = "continue_watching", upstream = "history", path = "/users/{user}/continue", timeout = "200ms" },
//!     { name = "billing", upstream = "billing", path = "/users/{user}/plan", timeout = "100ms", required = true },
//! ]
//!
//! [routes.workers.config.devices.mobile.sections]
//! rows = { max_items = 5, fields = ["id", "title", "image=images.small"] }
//! billing = { fields = ["plan"] }
//!
//! [routes.workers.config.devices.tv.sections]
//! rows = { max_items = 20, fields = ["id", "title", "synopsis", "image=images.large"] }
//! continue_watching = {}
//! billing = { fields = ["plan", "renews"] }
//! ```
//!
//! On each request the worker:
//!
//! 1. reads the device class, lower-cased, from the route parameter
//!    `device` (or the `device` source in the config). A class without a
//!    shape falls back to `default_device`, or else gets 404
//!    `unknown_device`;
//! 2. reads the user id from the request context value `user_context`
//!    (default `user`), which an auth worker before this one sets, or else
//!    from the request header `user_header` when one is configured; with
//!    `require_user`, a request without one gets 401 `user_missing`, and
//!    so does one whose required section, or every section, has `{user}`
//!    in its path. A user id that is `.` or `..` or has a slash gets 400
//!    `invalid_user` when a section puts it in its path;
//! 3. fetches every section the device class names, all at once, each with
//!    its own timeout, sending the user id under `upstream_user_header`
//!    (default `x-user-id`) and the `forward_headers` of the client's
//!    request;
//! 4. shapes each section's JSON: the list at `list`, at most `max_items`
//!    items, and only `fields` (`NAME`, or `NAME=DOTTED.PATH` to rename);
//! 5. responds 200 with `{"device": .., "user": .., SECTION: .., "partial":
//!    [..]}`.
//!
//! A section fails when its fetch fails or times out, its status is not
//! 2xx, or its body is not JSON of the expected form. A failed section is
//! left out of the body and named in `partial` and in the
//! `X-Partial-Response` header. A failed `required` section makes the
//! response 502 `required_section_failed`, and when every section fails it
//! is 502 `all_sections_failed`; both bodies name each failed section and
//! why in `failed`. An invalid config makes every request fail with 500
//! `worker_config_invalid` (and the node refuses to load it).

mod config;
mod shape;

use std::collections::BTreeMap;

use edge_sdk::fetch::{self, FetchError};
use edge_sdk::{Action, Request, Response, Worker};
use serde::Serialize;
use serde_json::{Map, Value};
use unicode_normalization::UnicodeNormalization;

use config::{Config, DeviceSource, Section, Shape};

/// The response header that lists failed sections.
const PARTIAL_HEADER: &str = "x-partial-response";

/// The JSON body of the worker's error responses.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
    /// Failed sections and why, on 502 responses.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    failed: BTreeMap<String, String>,
}

fn error_response(status: u16, error: &'static str, message: String) -> Action {
    let body = ErrorBody {
        error,
        message,
        failed: BTreeMap::new(),
    };
    Action::respond(Response::json(status, &body))
}

/// Returns the device class of a request, or the error response for one
/// without a known class.
fn device_class(config: &Config, request: &Request) -> Result<String, Action> {
    let source = config
        .device_source()
        .map_err(|message| error_response(500, "worker_config_invalid", message))?;
    let found = match &source {
        DeviceSource::Param(name) => request.param(name),
        DeviceSource::Header(name) => request.header(name),
    };
    let class = found.map(str::to_ascii_lowercase).unwrap_or_default();
    if config.devices.contains_key(&class) {
        return Ok(class);
    }
    if let Some(default) = &config.default_device {
        return Ok(default.clone());
    }
    let message = format!(
        "device class {class:?} has no shape; expected one of {}",
        config
            .devices
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    );
    Err(error_response(404, "unknown_device", message))
}

/// Returns the user id of the request: the context value, or else the
/// configured header.
fn user_id(config: &Config, request: &Request) -> Option<String> {
    edge_sdk::context::get(&config.user_context)
        .or_else(|| {
            let header = config.user_header.as_deref()?;
            request.header(header).map(str::to_string)
        })
        .filter(|user| !user.is_empty())
}

/// Percent-encodes every byte except RFC 3986's unreserved characters, so
/// that a value cannot change the path or query it is put into.
fn encode(value: &str) -> String {
    let mut encoded = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-._~".contains(&byte) {
            encoded.push(byte as char);
        } else {
            encoded.push_str(&format!("%{byte:02X}"));
        }
    }
    encoded
}

/// The reason of a section whose path needs the user id when the request
/// has none.
const USER_MISSING: &str = "user_missing";

/// Returns why `value` cannot fill a placeholder in the path part of a
/// section's path, before any `?`. Encoding alone does not keep a value to
/// its segment there: `.` and `..` are dot segments, and many servers decode
/// `%2F` and `%5C` before they resolve them.
fn unsafe_segment(value: &str) -> Option<&'static str> {
    // Some servers fold compatibility forms to ASCII (Unicode NFKC) after
    // decoding, such as `‥` to `..` and `﹨` to `\`. So the check reads the
    // value as NFKC folds it.
    let folded: String = value.nfkc().collect();
    if folded == "." || folded == ".." {
        return Some("is a dot segment");
    }
    if folded.contains(['/', '\\']) {
        return Some("contains a slash");
    }
    // Servlet containers read `..;x` as `..` with a path parameter.
    if folded.contains(';') {
        return Some("contains a semicolon");
    }
    None
}

/// Returns the first route path parameter that a planned section puts in its
/// path before any `?` and that is unsafe there, with its value and the reason.
fn unsafe_parameter<'a>(
    planned: &[(&Section, &Shape)],
    request: &'a Request,
) -> Option<(&'a str, &'a str, &'static str)> {
    request.params.iter().find_map(|(name, value)| {
        // `{device}` and `{user}` name the device class and the user id.
        if name == "device" || name == "user" {
            return None;
        }
        let in_a_path = in_a_section_path(planned, &format!("{{{name}}}"));
        let reason = unsafe_segment(value).filter(|_| in_a_path)?;
        Some((name.as_str(), value.as_str(), reason))
    })
}

/// Returns whether a planned section puts `placeholder`, such as `{user}`, in
/// its path before any `?`.
fn in_a_section_path(planned: &[(&Section, &Shape)], placeholder: &str) -> bool {
    planned.iter().any(|(section, _)| {
        let path = section.path.split('?').next().unwrap_or_default();
        path.contains(placeholder)
    })
}

/// Fills the `{NAME}` placeholders of a section's path: `user`, `device`, or
/// a route path parameter. Returns why a placeholder cannot be filled.
fn render_path(
    template: &str,
    request: &Request,
    device: &str,
    user: Option<&str>,
) -> Result<String, String> {
    let mut rendered = String::with_capacity(template.len());
    let mut rest = template;
    while let Some(open) = rest.find('{') {
        rendered.push_str(&rest[..open]);
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| format!("path {template:?} has a `{{` without its `}}`"))?;
        let name = &after[..close];
        let value = match name {
            "device" => device,
            "user" => user.ok_or_else(|| USER_MISSING.to_string())?,
            param => request
                .param(param)
                .ok_or_else(|| format!("the route has no path parameter {param:?}"))?,
        };
        let in_path = !rendered.contains('?');
        if let Some(reason) = unsafe_segment(value).filter(|_| in_path) {
            return Err(format!("the value of {{{name}}}, {value:?}, {reason}"));
        }
        rendered.push_str(&encode(value));
        rest = &after[close + 1..];
    }
    rendered.push_str(rest);
    Ok(rendered)
}

/// Returns whether a fetch result is the node's refusal of a request past
/// its limit of requests per `send` call.
fn is_over_call_limit(result: &Result<fetch::Response, FetchError>) -> bool {
    matches!(result, Err(FetchError::InvalidRequest(reason)) if reason.ends_with("requests per fetch call"))
}

/// Builds a section's request, or returns why it cannot be sent.
fn section_request(
    config: &Config,
    section: &Section,
    request: &Request,
    device: &str,
    user: Option<&str>,
) -> Result<fetch::Request, String> {
    let path = render_path(&section.path, request, device, user)?;
    let mut built = fetch::Request::new(section.method.as_str(), section.upstream.as_str(), path)
        .header("accept", "application/json");
    for name in &config.forward_headers {
        for value in request.headers.get_all(name) {
            built = built.header(name.as_str(), value);
        }
    }
    if let Some(user) = user {
        built = built.header(config.upstream_user_header.as_str(), user);
    }
    if let Some(timeout) = section.timeout() {
        built = built.timeout(timeout);
    }
    Ok(built)
}

/// Turns a section's fetch result into its shaped JSON, or the reason it
/// failed.
fn section_value(
    section: &Section,
    shape: &Shape,
    result: Result<fetch::Response, FetchError>,
) -> Result<Value, String> {
    let response = result.map_err(|error| match error {
        FetchError::NotAllowed => "not_allowed".to_string(),
        FetchError::TimedOut => "timed_out".to_string(),
        FetchError::Unavailable(code) => code,
        FetchError::ResponseTooLarge(_) => "response_too_large".to_string(),
        FetchError::InvalidRequest(reason) => format!("invalid_request: {reason}"),
    })?;
    if !response.is_success() {
        return Err(format!("status {}", response.status));
    }
    shape::apply(&response.body, section.list.as_deref(), shape)
}

/// Fetches the sections of the device class and stitches the response.
fn aggregate(config: &Config, request: &Request) -> Action {
    let device = match device_class(config, request) {
        Ok(device) => device,
        Err(action) => return action,
    };
    let user = user_id(config, request);
    if config.require_user && user.is_none() {
        let message = format!(
            "the request has no user id in the context value {:?}",
            config.user_context
        );
        return error_response(401, "user_missing", message);
    }
    let shapes = &config.devices[&device].sections;
    let planned: Vec<(&Section, &Shape)> = config
        .sections
        .iter()
        .filter_map(|section| Some((section, shapes.get(&section.name)?)))
        .collect();
    // A route parameter or user id that would leave its path segment is the
    // client's error, not a section's failure.
    if let Some((name, value, reason)) = unsafe_parameter(&planned, request) {
        let message =
            format!("the path parameter {name:?}, {value:?}, {reason}, so it cannot go in a path");
        edge_sdk::log::info(&message);
        return error_response(400, "invalid_parameter", message);
    }
    if let Some(user) = &user {
        let in_a_path = in_a_section_path(&planned, "{user}");
        if let Some(reason) = unsafe_segment(user).filter(|_| in_a_path) {
            let message = format!("the user id {user:?} {reason}, so it cannot go in a path");
            return error_response(400, "invalid_user", message);
        }
    }

    // Requests that cannot be built fail their section without being sent.
    let mut outcomes: Vec<Option<Result<Value, String>>> = Vec::with_capacity(planned.len());
    let mut requests = Vec::with_capacity(planned.len());
    for (section, _) in &planned {
        match section_request(config, section, request, &device, user.as_deref()) {
            Ok(built) => {
                requests.push(built);
                outcomes.push(None);
            }
            Err(reason) => outcomes.push(Some(Err(reason))),
        }
    }
    if user.is_none() {
        if let Some(action) = user_needed(config, &planned, &outcomes) {
            return action;
        }
    }
    // The sections to send, by their index in `planned`.
    let mut unsent: Vec<usize> = (0..planned.len())
        .filter(|&index| outcomes[index].is_none())
        .collect();
    while !unsent.is_empty() {
        let results = fetch::send(requests);
        // The node sends at most its per-call number of requests and
        // returns an error for the rest, which go in the next call.
        let sent = results
            .iter()
            .position(is_over_call_limit)
            .unwrap_or(results.len());
        for (&index, result) in unsent.iter().zip(results).take(sent.max(1)) {
            let (section, shape) = planned[index];
            outcomes[index] = Some(section_value(section, shape, result));
        }
        unsent.drain(..sent.max(1).min(unsent.len()));
        // Built again, because `send` took them.
        let mut next = Vec::with_capacity(unsent.len());
        unsent.retain(|&index| {
            match section_request(config, planned[index].0, request, &device, user.as_deref()) {
                Ok(built) => {
                    next.push(built);
                    true
                }
                Err(reason) => {
                    outcomes[index] = Some(Err(reason));
                    false
                }
            }
        });
        requests = next;
    }

    let mut body = Map::new();
    body.insert("device".to_string(), Value::String(device));
    body.insert("user".to_string(), user.map_or(Value::Null, Value::String));
    let mut failed = BTreeMap::new();
    let mut partial = Vec::new();
    let mut required_failed = Vec::new();
    for ((section, _), outcome) in planned.iter().zip(outcomes) {
        match outcome.unwrap_or(Err("no result".to_string())) {
            Ok(value) => {
                body.insert(section.name.clone(), value);
            }
            Err(reason) => {
                edge_sdk::log::info(&format!(
                    "section {} from upstream {} failed: {reason}",
                    section.name, section.upstream
                ));
                if section.required {
                    required_failed.push(section.name.clone());
                }
                partial.push(section.name.clone());
                failed.insert(section.name.clone(), reason);
            }
        }
    }

    if !planned.is_empty() && failed.len() == planned.len() {
        let message = format!("every section failed: {}", partial.join(", "));
        let body = ErrorBody {
            error: "all_sections_failed",
            message,
            failed,
        };
        return Action::respond(Response::json(502, &body));
    }
    if !required_failed.is_empty() {
        let message = format!("required section failed: {}", required_failed.join(", "));
        let body = ErrorBody {
            error: "required_section_failed",
            message,
            failed,
        };
        return Action::respond(Response::json(502, &body));
    }
    let header = partial.join(", ");
    body.insert(
        "partial".to_string(),
        Value::Array(partial.into_iter().map(Value::String).collect()),
    );
    // The body is personal: no shared cache may keep it.
    let mut response = Response::json(200, &Value::Object(body)).header("cache-control", "private");
    if !header.is_empty() {
        response = response.header(PARTIAL_HEADER, header);
    }
    Action::respond(response)
}

/// Returns a 401 for a request without a user id when a required section,
/// or every section, needs one. Signing in fixes it, so it is not a gateway
/// error, and no upstream is called.
fn user_needed(
    config: &Config,
    planned: &[(&Section, &Shape)],
    outcomes: &[Option<Result<Value, String>>],
) -> Option<Action> {
    let needing: Vec<&Section> = planned
        .iter()
        .zip(outcomes)
        .filter(|(_, outcome)| matches!(outcome, Some(Err(reason)) if reason == USER_MISSING))
        .map(|((section, _), _)| *section)
        .collect();
    let required = needing.iter().any(|section| section.required);
    if needing.is_empty() || (!required && needing.len() < planned.len()) {
        return None;
    }
    let names: Vec<&str> = needing
        .iter()
        .map(|section| section.name.as_str())
        .collect();
    let message = format!(
        "the sections {} need a user id, and the request has none in the context value {:?}",
        names.join(", "),
        config.user_context
    );
    Some(error_response(401, "user_missing", message))
}

struct BffAggregate;

impl Worker for BffAggregate {
    fn check_config() -> Result<(), String> {
        let config = Config::load()?;
        // Only at load: a section the entry may not fetch from would fail
        // every request.
        for (index, section) in config.sections.iter().enumerate() {
            if !edge_sdk::fetch::allowed(&section.upstream) {
                return Err(format!(
                    "invalid bff-aggregate config: sections[{index}] upstream {:?} is not in \
                     the worker entry's `fetch` list; add it there",
                    section.upstream
                ));
            }
        }
        Ok(())
    }

    fn on_request(request: Request) -> Action {
        match Config::load() {
            Ok(config) => aggregate(&config, &request),
            Err(message) => {
                edge_sdk::log::error(&message);
                error_response(500, "worker_config_invalid", message)
            }
        }
    }
}

edge_sdk::export_worker!(BffAggregate);

#[cfg(test)]
mod tests;
