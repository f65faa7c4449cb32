//! The worker's config table: parsing and validation.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::classify::DeviceClass;

/// The config table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default = "default_class")]
    default_class: DeviceClass,
    #[serde(default = "default_header")]
    header: String,
    #[serde(default)]
    upstreams: BTreeMap<String, String>,
    #[serde(default)]
    path_prefixes: BTreeMap<String, String>,
}

fn default_class() -> DeviceClass {
    DeviceClass::Desktop
}

fn default_header() -> String {
    "x-device-class".to_string()
}

/// The validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The class of a client whose `User-Agent` is missing or unknown.
    pub default_class: DeviceClass,
    /// The request header that carries the class to the upstream,
    /// lower-case.
    pub header: String,
    /// The upstream for each class that has its own.
    pub upstreams: BTreeMap<DeviceClass, String>,
    /// The path prefix for each class whose paths are rewritten, without a
    /// trailing `/`.
    pub path_prefixes: BTreeMap<DeviceClass, String>,
}

/// Parses and validates the config JSON `json`. An error names the field.
pub fn parse(json: &str) -> Result<Config, String> {
    let raw: RawConfig = edge_sdk::config::from_json(json).map_err(|error| error.to_string())?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<Config, String> {
    if let Some(problem) = edge_sdk::settable_header_problem(&raw.header) {
        return Err(format!("header: {:?} {problem}", raw.header));
    }
    let mut upstreams = BTreeMap::new();
    for (key, upstream) in raw.upstreams {
        let class = class_key("upstreams", &key)?;
        if upstream.is_empty() {
            return Err(format!("upstreams.{key}: is empty"));
        }
        upstreams.insert(class, upstream);
    }
    let mut path_prefixes = BTreeMap::new();
    for (key, prefix) in raw.path_prefixes {
        let class = class_key("path_prefixes", &key)?;
        let field = format!("path_prefixes.{key}");
        if !prefix.starts_with('/') {
            return Err(format!("{field}: {prefix:?} does not start with `/`"));
        }
        if prefix
            .bytes()
            .any(|byte| byte < 0x20 || byte == 0x7f || byte == b'?' || byte == b'#')
        {
            return Err(format!(
                "{field}: {prefix:?} contains `?`, `#` or a control character"
            ));
        }
        let trimmed = prefix.trim_end_matches('/');
        if trimmed.is_empty() {
            return Err(format!("{field}: {prefix:?} adds nothing to the path"));
        }
        if trimmed
            .split('/')
            .skip(1)
            .any(|segment| matches!(segment, "" | "." | ".."))
        {
            return Err(format!(
                "{field}: {prefix:?} has an empty, `.` or `..` segment"
            ));
        }
        path_prefixes.insert(class, trimmed.to_string());
    }
    Ok(Config {
        default_class: raw.default_class,
        header: raw.header.to_ascii_lowercase(),
        upstreams,
        path_prefixes,
    })
}

/// Parses the key `key` of the table `table` as a device class.
fn class_key(table: &str, key: &str) -> Result<DeviceClass, String> {
    DeviceClass::ALL
        .into_iter()
        .find(|class| class.as_str() == key)
        .ok_or_else(|| {
            format!(
                "{table}.{key}: unknown device class; expected mobile, tablet, desktop, tv or bot"
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_config_defaults() {
        let config = parse("{}").unwrap();
        assert_eq!(config.default_class, DeviceClass::Desktop);
        assert_eq!(config.header, "x-device-class");
        assert!(config.upstreams.is_empty());
        assert!(config.path_prefixes.is_empty());
    }

    #[test]
    fn full_config() {
        let config = parse(
            r#"{"default_class":"mobile","header":"X-Device",
                "upstreams":{"tv":"tv-app","bot":"prerender"},
                "path_prefixes":{"mobile":"/m/","tablet":"/t"}}"#,
        )
        .unwrap();
        assert_eq!(config.default_class, DeviceClass::Mobile);
        assert_eq!(config.header, "x-device");
        assert_eq!(config.upstreams[&DeviceClass::Tv], "tv-app");
        assert_eq!(config.upstreams[&DeviceClass::Bot], "prerender");
        assert_eq!(config.path_prefixes[&DeviceClass::Mobile], "/m");
        assert_eq!(config.path_prefixes[&DeviceClass::Tablet], "/t");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (
                r#"{"default_class":"phone"}"#,
                "default_class: unknown variant `phone`, expected one of `mobile`, `tablet`, \
                 `desktop`, `tv`, `bot`",
            ),
            (
                r#"{"upstreams":{"watch":"w"}}"#,
                "upstreams.watch: unknown device class; expected mobile, tablet, desktop, tv \
                 or bot",
            ),
            (r#"{"upstreams":{"tv":""}}"#, "upstreams.tv: is empty"),
            (
                r#"{"upstreams":{"tv":1}}"#,
                "upstreams.tv: invalid type: integer `1`, expected a string",
            ),
            (
                r#"{"path_prefixes":{"mobile":"m"}}"#,
                "path_prefixes.mobile: \"m\" does not start with `/`",
            ),
            (
                r#"{"path_prefixes":{"mobile":"/"}}"#,
                "path_prefixes.mobile: \"/\" adds nothing to the path",
            ),
            (
                r#"{"path_prefixes":{"mobile":"/m?x=1"}}"#,
                "path_prefixes.mobile: \"/m?x=1\" contains `?`, `#` or a control character",
            ),
            (
                r#"{"path_prefixes":{"mobile":"/a/../b"}}"#,
                "path_prefixes.mobile: \"/a/../b\" has an empty, `.` or `..` segment",
            ),
            (
                r#"{"header":"x device"}"#,
                "header: \"x device\" is not a valid header name",
            ),
            (
                r#"{"header":"Transfer-Encoding"}"#,
                "header: \"Transfer-Encoding\" is a header the node sets itself, so a worker \
                 cannot set it",
            ),
            (
                r#"{"upstream":{"tv":"t"}}"#,
                "unknown field `upstream`, expected one of `default_class`, `header`, \
                 `upstreams`, `path_prefixes`",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(parse(json).unwrap_err(), expected, "config {json}");
        }
    }
}
