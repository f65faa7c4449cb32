//! The worker's config table: parsing and validation.

use std::collections::HashSet;
use std::time::Duration;

use edge_sdk::is_token;
use serde::Deserialize;

use crate::cookie::{is_attribute_value, StickyCookie};

/// The sticky cookie's lifetime when the config sets none.
const DEFAULT_MAX_AGE: Duration = Duration::from_secs(30 * 24 * 60 * 60);
/// The maximum length of an experiment or variant name, so that the cookie
/// stays short.
const MAX_NAME_LEN: usize = 64;

/// The config table as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    experiment: String,
    variants: Vec<RawVariant>,
    #[serde(default)]
    user_id: Vec<UserIdSource>,
    #[serde(default)]
    cookie: RawCookie,
    #[serde(default = "default_experiment_header")]
    experiment_header: String,
    #[serde(default = "default_variant_header")]
    variant_header: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawVariant {
    name: String,
    weight: u32,
    upstream: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCookie {
    name: Option<String>,
    path: Option<String>,
    domain: Option<String>,
    max_age: Option<String>,
    #[serde(default)]
    secure: bool,
}

fn default_experiment_header() -> String {
    "x-experiment".to_string()
}

fn default_variant_header() -> String {
    "x-variant".to_string()
}

/// A source of the user id. The worker tries the sources in config
/// order and takes the first non-empty value.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UserIdSource {
    /// The request context value of this name, set by an earlier worker.
    Context(String),
    /// The request cookie of this name.
    Cookie(String),
    /// The request header of this name.
    Header(String),
}

/// One variant of the experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    pub name: String,
    pub weight: u64,
    /// The upstream that requests in this variant go to, instead of the
    /// route's own.
    pub upstream: Option<String>,
}

/// The validated config.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub experiment: String,
    pub variants: Vec<Variant>,
    pub total_weight: u64,
    pub user_id: Vec<UserIdSource>,
    pub cookie: StickyCookie,
    pub experiment_header: String,
    pub variant_header: String,
}

impl Config {
    /// Returns the variant named `name`.
    pub fn variant(&self, name: &str) -> Option<&Variant> {
        self.variants.iter().find(|variant| variant.name == name)
    }

    /// Names the upstreams the variants route to, with the field that names
    /// each, such as `variants[1].upstream`.
    pub fn upstreams(&self) -> impl Iterator<Item = (String, &str)> {
        self.variants
            .iter()
            .enumerate()
            .filter_map(|(index, variant)| {
                let upstream = variant.upstream.as_deref()?;
                Some((format!("variants[{index}].upstream"), upstream))
            })
    }
}

/// Parses and validates the config JSON `json`. An error names the field.
pub fn parse(json: &str) -> Result<Config, String> {
    let raw: RawConfig = edge_sdk::config::from_json(json).map_err(|error| error.to_string())?;
    validate(raw)
}

fn validate(raw: RawConfig) -> Result<Config, String> {
    check_name("experiment", &raw.experiment)?;
    if raw.variants.is_empty() {
        return Err("variants: needs at least one variant".to_string());
    }
    let mut names = HashSet::new();
    let mut variants = Vec::with_capacity(raw.variants.len());
    for (index, variant) in raw.variants.into_iter().enumerate() {
        let field = |key: &str| format!("variants[{index}].{key}");
        check_name(&field("name"), &variant.name)?;
        if !names.insert(variant.name.clone()) {
            return Err(format!(
                "{}: {:?} names another variant already; variant names must be unique",
                field("name"),
                variant.name
            ));
        }
        if variant.weight == 0 {
            return Err(format!("{}: must be greater than 0", field("weight")));
        }
        if variant.upstream.as_deref() == Some("") {
            return Err(format!("{}: is empty", field("upstream")));
        }
        variants.push(Variant {
            name: variant.name,
            weight: u64::from(variant.weight),
            upstream: variant.upstream,
        });
    }
    let total_weight = variants.iter().map(|variant| variant.weight).sum();

    for (index, source) in raw.user_id.iter().enumerate() {
        let (kind, name) = match source {
            UserIdSource::Context(name) => ("context", name),
            UserIdSource::Cookie(name) => ("cookie", name),
            UserIdSource::Header(name) => ("header", name),
        };
        if !is_token(name) {
            return Err(format!(
                "user_id[{index}].{kind}: {name:?} is not a valid name; use letters, digits \
                 and `-_.`"
            ));
        }
    }

    let cookie = sticky_cookie(raw.cookie, &raw.experiment)?;
    if raw
        .user_id
        .contains(&UserIdSource::Cookie(cookie.name.clone()))
    {
        return Err(format!(
            "cookie.name: {:?} is also a user_id cookie; the sticky cookie needs a name of \
             its own",
            cookie.name
        ));
    }

    for (field, name) in [
        ("experiment_header", &raw.experiment_header),
        ("variant_header", &raw.variant_header),
    ] {
        if let Some(problem) = edge_sdk::settable_header_problem(name) {
            return Err(format!("{field}: {name:?} {problem}"));
        }
    }
    if raw
        .experiment_header
        .eq_ignore_ascii_case(&raw.variant_header)
    {
        return Err("variant_header: must differ from experiment_header".to_string());
    }

    Ok(Config {
        experiment: raw.experiment,
        variants,
        total_weight,
        user_id: raw.user_id,
        cookie,
        experiment_header: raw.experiment_header.to_ascii_lowercase(),
        variant_header: raw.variant_header.to_ascii_lowercase(),
    })
}

/// Checks an experiment or variant name: it goes into a header value, a
/// cookie name and a cookie value, and `:` separates it in the hash input.
fn check_name(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field}: is empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(format!("{field}: is longer than {MAX_NAME_LEN} bytes"));
    }
    if !name
        .bytes()
        .all(|byte| byte.is_ascii_alphanumeric() || b"-_.".contains(&byte))
    {
        return Err(format!(
            "{field}: {name:?} contains a character other than letters, digits and `-_.`"
        ));
    }
    Ok(())
}

fn sticky_cookie(raw: RawCookie, experiment: &str) -> Result<StickyCookie, String> {
    let name = raw.name.unwrap_or_else(|| format!("ab_{experiment}"));
    if !is_token(&name) {
        return Err(format!("cookie.name: {name:?} is not a valid cookie name"));
    }
    let path = raw.path.unwrap_or_else(|| "/".to_string());
    if !path.starts_with('/') || !is_attribute_value(&path) {
        return Err(format!(
            "cookie.path: {path:?} must start with `/` and contain no `;` or control characters"
        ));
    }
    if let Some(domain) = &raw.domain {
        if !is_attribute_value(domain) || domain.contains(' ') {
            return Err(format!("cookie.domain: {domain:?} is not a valid domain"));
        }
    }
    let max_age = match &raw.max_age {
        Some(text) => humantime::parse_duration(text)
            .map_err(|error| format!("cookie.max_age: {text:?} is not a duration: {error}"))?,
        None => DEFAULT_MAX_AGE,
    };
    if max_age.as_secs() == 0 {
        return Err("cookie.max_age: must be at least 1s".to_string());
    }
    Ok(StickyCookie {
        name,
        path,
        domain: raw.domain,
        max_age_secs: max_age.as_secs(),
        secure: raw.secure,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = r#"{"experiment":"checkout","variants":[
        {"name":"control","weight":90},{"name":"new","weight":10,"upstream":"v2"}]}"#;

    fn error_of(json: &str) -> String {
        parse(json).unwrap_err()
    }

    #[test]
    fn minimal_config_defaults() {
        let config = parse(MINIMAL).unwrap();
        assert_eq!(config.experiment, "checkout");
        assert_eq!(config.total_weight, 100);
        assert_eq!(config.variants[1].upstream.as_deref(), Some("v2"));
        assert!(config.user_id.is_empty());
        assert_eq!(config.cookie.name, "ab_checkout");
        assert_eq!(config.cookie.path, "/");
        assert_eq!(config.cookie.max_age_secs, 30 * 24 * 3600);
        assert!(!config.cookie.secure);
        assert_eq!(config.experiment_header, "x-experiment");
        assert_eq!(config.variant_header, "x-variant");
        assert_eq!(
            config.upstreams().collect::<Vec<_>>(),
            [("variants[1].upstream".to_string(), "v2")]
        );
    }

    #[test]
    fn full_config() {
        let config = parse(
            r#"{"experiment":"checkout","variants":[{"name":"a","weight":1}],
            "user_id":[{"context":"user"},{"cookie":"uid"},{"header":"x-user-id"}],
            "cookie":{"name":"exp","path":"/shop","domain":"example.com","max_age":"1h",
                      "secure":true},
            "experiment_header":"X-Exp","variant_header":"X-Arm"}"#,
        )
        .unwrap();
        assert_eq!(
            config.user_id,
            [
                UserIdSource::Context("user".to_string()),
                UserIdSource::Cookie("uid".to_string()),
                UserIdSource::Header("x-user-id".to_string()),
            ]
        );
        assert_eq!(config.cookie.max_age_secs, 3600);
        assert_eq!(config.cookie.domain.as_deref(), Some("example.com"));
        assert!(config.cookie.secure);
        assert_eq!(config.experiment_header, "x-exp");
        assert_eq!(config.variant_header, "x-arm");
    }

    #[test]
    fn errors_name_the_field() {
        let cases = [
            (r#"{"variants":[]}"#, "missing field `experiment`"),
            (
                r#"{"experiment":"e","variants":[]}"#,
                "variants: needs at least one variant",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":0}]}"#,
                "variants[0].weight: must be greater than 0",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1},{"name":"a","weight":2}]}"#,
                "variants[1].name: \"a\" names another variant already; variant names must be \
                 unique",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":-1}]}"#,
                "variants[0].weight: invalid value: integer `-1`, expected u32",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":"ten"}]}"#,
                "variants[0].weight: invalid type: string \"ten\", expected u32",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a b","weight":1}]}"#,
                "variants[0].name: \"a b\" contains a character other than letters, digits \
                 and `-_.`",
            ),
            (
                r#"{"experiment":"e:1","variants":[{"name":"a","weight":1}]}"#,
                "experiment: \"e:1\" contains a character other than letters, digits and `-_.`",
            ),
            (
                r#"{"experiment":"","variants":[{"name":"a","weight":1}]}"#,
                "experiment: is empty",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1,"upstream":""}]}"#,
                "variants[0].upstream: is empty",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1,"wieght":1}]}"#,
                "variants[0]: unknown field `wieght`, expected one of `name`, `weight`, \
                 `upstream`",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "user_id":[{"query":"u"}]}"#,
                "user_id[0]: unknown variant `query`, expected one of `context`, `cookie`, \
                 `header`",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "user_id":[{"header":"x user"}]}"#,
                "user_id[0].header: \"x user\" is not a valid name; use letters, digits and \
                 `-_.`",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "cookie":{"max_age":"soon"}}"#,
                "cookie.max_age: \"soon\" is not a duration: expected number at 0",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "cookie":{"max_age":"0s"}}"#,
                "cookie.max_age: must be at least 1s",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "cookie":{"path":"shop"}}"#,
                "cookie.path: \"shop\" must start with `/` and contain no `;` or control \
                 characters",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "cookie":{"name":"uid"},"user_id":[{"cookie":"uid"}]}"#,
                "cookie.name: \"uid\" is also a user_id cookie; the sticky cookie needs a \
                 name of its own",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "variant_header":"X-Experiment"}"#,
                "variant_header: must differ from experiment_header",
            ),
            (
                r#"{"experiment":"e","variants":[{"name":"a","weight":1}],
                   "variant_header":"Host"}"#,
                "variant_header: \"Host\" is a header the node sets itself, so a worker \
                 cannot set it",
            ),
        ];
        for (json, expected) in cases {
            assert_eq!(error_of(json), expected, "config {json}");
        }
    }

    #[test]
    fn long_name_rejected() {
        let name = "v".repeat(MAX_NAME_LEN + 1);
        let json = format!(r#"{{"experiment":"e","variants":[{{"name":"{name}","weight":1}}]}}"#);
        assert_eq!(error_of(&json), "variants[0].name: is longer than 64 bytes");
    }
}
