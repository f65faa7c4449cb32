//! The worker's config: the sections to fetch and the shape of each section
//! per device class, read and checked on every call.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

/// Keys of the response body that the worker sets itself, which a section
/// may not use as its name.
const RESERVED_KEYS: [&str; 3] = ["device", "user", "partial"];

/// Returns whether `forward_headers` and `upstream_user_header` may not
/// name the request header `name`. The node or the worker (`Accept`) sets
/// such a header on section requests. Others describe the client's
/// connection, or claim where the request came from, which a client could
/// forge.
fn not_forwarded(name: &str) -> bool {
    name.eq_ignore_ascii_case("accept") || edge_sdk::is_set_by_node(name)
}

/// The worker's config table, as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// The source of the device class: `param:NAME` (a route path parameter)
    /// or `header:NAME`. Default: `param:device`.
    #[serde(default = "default_device_source")]
    pub device: String,
    /// The class used when the request's class has no shape; without it such
    /// a request gets 404 `unknown_device`.
    pub default_device: Option<String>,
    /// The request context value with the user id, which an auth worker
    /// before this one sets. Default: `user`.
    #[serde(default = "default_user_context")]
    pub user_context: String,
    /// A request header read for the user id when the context has none, for
    /// an earlier worker that sets a header instead. Clients can send any
    /// header, so only name one that an earlier worker always sets or
    /// removes. Default: none.
    pub user_header: Option<String>,
    /// The header that carries the user id to the section upstreams.
    /// Default: `x-user-id`.
    #[serde(default = "default_upstream_user_header")]
    pub upstream_user_header: String,
    /// Whether a request without a user id gets 401 `user_missing`.
    /// Default: false.
    #[serde(default)]
    pub require_user: bool,
    /// Client request headers copied to every section request, such as
    /// `accept-language`. Default: none.
    #[serde(default)]
    pub forward_headers: Vec<String>,
    /// The upstream calls, in the order their results appear.
    pub sections: Vec<Section>,
    /// Shapes by device class, such as `mobile` or `tv`.
    pub devices: BTreeMap<String, DeviceShape>,
}

fn default_device_source() -> String {
    "param:device".to_string()
}

fn default_user_context() -> String {
    "user".to_string()
}

fn default_upstream_user_header() -> String {
    "x-user-id".to_string()
}

/// One upstream call whose result becomes a key of the response.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Section {
    /// The key in the response body, and the name in `partial`.
    pub name: String,
    /// The upstream, which the route entry's `fetch` list must name.
    pub upstream: String,
    /// The path and query, with `{user}`, `{device}` and `{PARAM}` (a route
    /// path parameter) replaced by percent-encoded values.
    pub path: String,
    /// Default: `GET`.
    #[serde(default = "default_method")]
    pub method: String,
    /// Time allowed for this call, such as `250ms` or `1s`. Default: the
    /// node's fetch timeout.
    pub timeout: Option<String>,
    /// Whether a failure of this section fails the whole response with 502.
    /// Default: false.
    #[serde(default)]
    pub required: bool,
    /// The key of the list inside the upstream's JSON object, as a dotted
    /// path such as `data.rows`. Default: the whole body.
    pub list: Option<String>,
}

fn default_method() -> String {
    "GET".to_string()
}

/// The sections a device class shows, and their shapes. Sections it does not
/// name are not fetched for it.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceShape {
    pub sections: BTreeMap<String, Shape>,
}

/// The shape of one section for one device class.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Shape {
    /// Fields kept on each item (or on the object, for a section that is not
    /// a list): `NAME` keeps a field, `NAME=PATH` takes a dotted path such as
    /// `image=images.small`. Default: every field.
    pub fields: Option<Vec<String>>,
    /// The maximum number of items kept of a list. Default: all.
    pub max_items: Option<usize>,
}

/// The source of the device class.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceSource {
    /// A route path parameter.
    Param(String),
    /// A request header.
    Header(String),
}

/// One field of a shape: the output key and the dotted path it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Field {
    pub key: String,
    pub path: Vec<String>,
}

impl Config {
    /// Reads and checks the config.
    pub fn load() -> Result<Config, String> {
        let config: Config = edge_sdk::config::parse()
            .map_err(|error| format!("invalid bff-aggregate config: {error}"))?;
        config
            .check()
            .map_err(|reason| format!("invalid bff-aggregate config: {reason}"))?;
        Ok(config)
    }

    /// Checks what the types alone do not, returning why it is invalid.
    pub fn check(&self) -> Result<(), String> {
        self.device_source()?;
        if self.sections.is_empty() {
            return Err("`sections` is empty".to_string());
        }
        for (index, section) in self.sections.iter().enumerate() {
            section
                .check()
                .map_err(|reason| format!("sections[{index}] {reason}"))?;
            let repeated = self.sections[..index]
                .iter()
                .any(|earlier| earlier.name == section.name);
            if repeated {
                return Err(format!(
                    "sections[{index}] name {:?} is used twice",
                    section.name
                ));
            }
        }
        self.check_forward_headers()?;
        if self.devices.is_empty() {
            return Err("`devices` is empty".to_string());
        }
        for (device, shape) in &self.devices {
            if shape.sections.is_empty() {
                return Err(format!("devices.{device}.sections is empty"));
            }
            for (name, section_shape) in &shape.sections {
                if !self.sections.iter().any(|section| section.name == *name) {
                    return Err(format!(
                        "devices.{device}.sections names {name:?}, which is not in `sections`"
                    ));
                }
                for field in section_shape.fields.iter().flatten() {
                    parse_field(field).map_err(|reason| {
                        format!("devices.{device}.sections.{name}.fields: {reason}")
                    })?;
                }
            }
        }
        if let Some(default) = &self.default_device {
            if !self.devices.contains_key(default) {
                return Err(format!(
                    "default_device {default:?} is not a key of `devices`"
                ));
            }
        }
        Ok(())
    }

    /// Checks that `forward_headers` passes on no header the worker or the
    /// node sets for the section requests: a client could otherwise send
    /// them its own user id, or a `Host` of its choice.
    fn check_forward_headers(&self) -> Result<(), String> {
        let user_header = &self.upstream_user_header;
        if not_forwarded(user_header) {
            return Err(format!(
                "upstream_user_header {user_header:?} is a header the node or the worker sets \
                 for each section request; choose another, such as x-user-id"
            ));
        }
        let user_headers = [Some(&self.upstream_user_header), self.user_header.as_ref()];
        for (index, name) in self.forward_headers.iter().enumerate() {
            let user_header = user_headers
                .iter()
                .flatten()
                .any(|user| user.eq_ignore_ascii_case(name));
            if user_header {
                return Err(format!(
                    "forward_headers[{index}] {name:?} carries the user id, which the worker \
                     sets itself"
                ));
            }
            if not_forwarded(name) {
                return Err(format!(
                    "forward_headers[{index}] {name:?} is set by the node or the worker for \
                     each section request, or could be forged by the client"
                ));
            }
        }
        Ok(())
    }

    /// Returns where the device class is read from.
    pub fn device_source(&self) -> Result<DeviceSource, String> {
        match self.device.split_once(':') {
            Some(("param", name)) if !name.is_empty() => Ok(DeviceSource::Param(name.to_string())),
            Some(("header", name)) if !name.is_empty() => {
                Ok(DeviceSource::Header(name.to_string()))
            }
            _ => Err(format!(
                "device {:?} is not `param:NAME` or `header:NAME`",
                self.device
            )),
        }
    }
}

impl Section {
    fn check(&self) -> Result<(), String> {
        if self.name.is_empty() {
            return Err("`name` is empty".to_string());
        }
        if RESERVED_KEYS.contains(&self.name.as_str()) {
            return Err(format!(
                "name {:?} is a key the worker sets itself ({})",
                self.name,
                RESERVED_KEYS.join(", ")
            ));
        }
        if self.upstream.is_empty() {
            return Err("`upstream` is empty".to_string());
        }
        if !self.path.starts_with('/') {
            return Err(format!("path {:?} does not start with `/`", self.path));
        }
        check_placeholders(&self.path)
            .map_err(|reason| format!("path {:?} {reason}", self.path))?;
        if let Some(timeout) = &self.timeout {
            parse_duration(timeout).map_err(|reason| format!("timeout: {reason}"))?;
        }
        Ok(())
    }

    /// Returns the section's timeout, checked at load.
    pub fn timeout(&self) -> Option<Duration> {
        self.timeout.as_deref().and_then(|t| parse_duration(t).ok())
    }
}

/// Checks the `{NAME}` placeholders of a section's path: each closed, with
/// a name and no `{` inside. Whether a route has the path parameter a name
/// refers to shows only on a request.
fn check_placeholders(path: &str) -> Result<(), String> {
    let mut rest = path;
    while let Some(open) = rest.find(['{', '}']) {
        if rest.as_bytes()[open] == b'}' {
            return Err("has a `}` without its `{`".to_string());
        }
        let after = &rest[open + 1..];
        let close = after
            .find('}')
            .ok_or_else(|| "has a `{` without its `}`".to_string())?;
        let name = &after[..close];
        if name.is_empty() || name.contains('{') {
            return Err(format!("has an invalid placeholder {{{name}}}"));
        }
        rest = &after[close + 1..];
    }
    Ok(())
}

/// Parses a field of a shape: `NAME` or `NAME=DOTTED.PATH`.
pub fn parse_field(text: &str) -> Result<Field, String> {
    let (key, path) = match text.split_once('=') {
        Some((key, path)) => (key.trim(), path.trim()),
        None => (text.trim(), text.trim()),
    };
    if key.is_empty() || path.is_empty() {
        return Err(format!("{text:?} is not `NAME` or `NAME=PATH`"));
    }
    let path: Vec<String> = path.split('.').map(str::to_string).collect();
    if path.iter().any(String::is_empty) {
        return Err(format!("{text:?} has an empty segment in its path"));
    }
    Ok(Field {
        key: key.to_string(),
        path,
    })
}

/// Parses a duration written as a whole number of `ms` or `s`, such as
/// `250ms` or `2s`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let invalid = || format!("{text:?} is not a duration such as \"250ms\" or \"2s\"");
    let (digits, unit) = text
        .find(|c: char| !c.is_ascii_digit())
        .map(|at| text.split_at(at))
        .ok_or_else(invalid)?;
    let value: u64 = digits.parse().map_err(|_| invalid())?;
    let duration = match unit {
        "ms" => Duration::from_millis(value),
        "s" => Duration::from_secs(value),
        _ => return Err(invalid()),
    };
    if duration.is_zero() {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(duration)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_units() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        for bad in ["", "ms", "10", "1.5s", "10m", "0ms", "-1s"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn field_forms() {
        assert_eq!(
            parse_field("title"),
            Ok(Field {
                key: "title".to_string(),
                path: vec!["title".to_string()],
            })
        );
        assert_eq!(
            parse_field("image=images.small"),
            Ok(Field {
                key: "image".to_string(),
                path: vec!["images".to_string(), "small".to_string()],
            })
        );
        for bad in ["", "=a", "a=", "a=b..c"] {
            assert!(parse_field(bad).is_err(), "{bad:?} passed");
        }
    }
}
