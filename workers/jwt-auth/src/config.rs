//! The worker's config table and its checks.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use edge_sdk::crypto::{Algorithm, FetchOptions, Key, KeySet, KeyType};
use serde::de::{self, Deserializer, SeqAccess, Visitor};
use serde::Deserialize;

use crate::text::Text;

/// The config table of one route binding. Its strings borrow from the
/// config's JSON text, which the worker reads again on every call.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config<'a> {
    /// Algorithms a token may use, such as `["RS256"]`.
    #[serde(borrow)]
    pub algorithms: Vec<Text<'a>>,
    /// The realm in `WWW-Authenticate`. Default: the route's name.
    #[serde(default, borrow)]
    pub realm: Option<Text<'a>>,
    /// A cookie that carries the token when there is no `Authorization`
    /// header.
    #[serde(default, borrow)]
    pub cookie: Option<Text<'a>>,
    /// Accepted `iss` values; any one must match. Default: not checked.
    #[serde(default, borrow)]
    pub issuer: Option<OneOrMany<'a>>,
    /// Accepted audiences; the token's `aud` must hold one. Default: not
    /// checked.
    #[serde(default, borrow)]
    pub audience: Option<OneOrMany<'a>>,
    /// Clock skew allowed for `exp` and `nbf`, such as `"30s"`. Default: 60s.
    #[serde(default, borrow)]
    pub leeway: Option<Text<'a>>,
    /// Whether a token without `exp` is rejected. Default: true.
    #[serde(default = "default_true")]
    pub require_exp: bool,
    /// Scopes the token must grant (in `scope`, space-separated, or `scp`).
    #[serde(default, borrow)]
    pub required_scopes: Vec<Text<'a>>,
    /// Claims the token must carry with these values; an array claim must
    /// contain the value. Numbers compare by value, so 1 matches 1.0.
    #[serde(default)]
    pub required_claims: BTreeMap<String, serde_json::Value>,
    /// The claim that names the user. Default: `sub`.
    #[serde(default = "default_user_claim", borrow)]
    pub user_claim: Text<'a>,
    /// The header that carries the user to the upstream. Default:
    /// `x-user-id`.
    #[serde(default = "default_user_header", borrow)]
    pub user_header: Text<'a>,
    /// Claims copied to headers, claim name to header name.
    #[serde(default, borrow)]
    pub claim_headers: BTreeMap<Text<'a>, Text<'a>>,
    /// The name of the secret, in the worker's `secrets`, that contains the
    /// HMAC key.
    #[serde(default, borrow)]
    pub hmac_secret_name: Option<Text<'a>>,
    /// A PEM public key or certificate.
    #[serde(default, borrow)]
    pub public_key_pem: Option<Text<'a>>,
    /// A JWK set, as JSON text or a table.
    #[serde(default)]
    pub jwks: Option<serde_json::Value>,
    /// The upstream that serves the JWK set. It must be listed in the
    /// worker's `fetch`.
    #[serde(default, borrow)]
    pub jwks_upstream: Option<Text<'a>>,
    /// The path of the JWK set on `jwks_upstream`.
    #[serde(default = "default_jwks_path", borrow)]
    pub jwks_path: Text<'a>,
    /// The minimum time between two fetches of the JWK set. Default: 10s.
    #[serde(default, borrow)]
    pub jwks_refetch_interval: Option<Text<'a>>,
    /// How long a fetched JWK set stays fresh without `Cache-Control`.
    /// Default: 5m.
    #[serde(default, borrow)]
    pub jwks_max_age: Option<Text<'a>>,
}

/// One string or a list of strings.
#[derive(Debug)]
pub struct OneOrMany<'a>(Vec<Text<'a>>);

impl<'a> OneOrMany<'a> {
    /// Returns the values as a slice.
    pub fn values(&self) -> &[Text<'a>] {
        &self.0
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for OneOrMany<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(OneOrManyVisitor)
    }
}

/// Reads a string or a list of strings in one pass, where an untagged enum
/// would buffer the value first.
struct OneOrManyVisitor;

impl<'de> Visitor<'de> for OneOrManyVisitor {
    type Value = OneOrMany<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a string or a list of strings")
    }

    fn visit_borrowed_str<E: de::Error>(self, text: &'de str) -> Result<Self::Value, E> {
        Ok(OneOrMany(vec![Text::borrowed(text)]))
    }

    fn visit_str<E: de::Error>(self, text: &str) -> Result<Self::Value, E> {
        self.visit_string(text.to_owned())
    }

    fn visit_string<E: de::Error>(self, text: String) -> Result<Self::Value, E> {
        Ok(OneOrMany(vec![Text::from(text)]))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut values = Vec::with_capacity(seq.size_hint().unwrap_or(0));
        while let Some(value) = seq.next_element()? {
            values.push(value);
        }
        Ok(OneOrMany(values))
    }
}

fn default_true() -> bool {
    true
}

fn default_user_claim() -> Text<'static> {
    Text::borrowed("sub")
}

/// The maximum `leeway`. A longer one is most likely a mistake, such as
/// `60h` for `60s`, and would accept tokens that expired long ago.
const MAX_LEEWAY: Duration = Duration::from_secs(600);

fn default_user_header() -> Text<'static> {
    Text::borrowed("x-user-id")
}

fn default_jwks_path() -> Text<'static> {
    Text::borrowed("/.well-known/jwks.json")
}

/// The source of the key for a token: one key, or a JWK set.
pub enum Keys {
    Single(Key),
    Set(KeySet),
}

/// The config after its checks, with values in their working types.
pub struct Settings<'a> {
    pub config: Config<'a>,
    pub algorithms: Vec<Algorithm>,
    pub leeway: Duration,
    pub fetch: FetchOptions,
}

impl<'a> Settings<'a> {
    /// Reads and checks the config JSON text `json`, which
    /// `edge_sdk::config::json` returns.
    pub fn load(json: &'a str) -> Result<Settings<'a>, String> {
        let config: Config = edge_sdk::config::from_json(json)
            .map_err(|e| format!("invalid jwt-auth config: {e}"))?;
        Settings::check(config).map_err(|e| format!("invalid jwt-auth config: {e}"))
    }

    fn check(config: Config<'a>) -> Result<Settings<'a>, String> {
        if config.algorithms.is_empty() {
            return Err("`algorithms` is empty; list the algorithms tokens may use".to_owned());
        }
        let mut algorithms = Vec::new();
        for name in &config.algorithms {
            match Algorithm::from_name(name) {
                Some(alg) => algorithms.push(alg),
                None => {
                    return Err(format!(
                        "algorithms: {name:?} is not supported; use HS256, HS384, HS512, \
                         RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384 or EdDSA"
                    ))
                }
            }
        }
        for (key, list) in [("issuer", &config.issuer), ("audience", &config.audience)] {
            if list.as_ref().is_some_and(|list| list.values().is_empty()) {
                return Err(format!(
                    "`{key}` is an empty list, which no token matches; list the accepted \
                     values or leave `{key}` out"
                ));
            }
        }
        let sources = [
            config.hmac_secret_name.is_some(),
            config.public_key_pem.is_some(),
            config.jwks.is_some(),
            config.jwks_upstream.is_some(),
        ];
        if sources.iter().filter(|&&set| set).count() != 1 {
            return Err(
                "set exactly one of `hmac_secret_name`, `public_key_pem`, `jwks` and \
                 `jwks_upstream`"
                    .to_owned(),
            );
        }
        if !config.jwks_path.starts_with('/') {
            return Err(format!(
                "jwks_path {:?} must start with '/'",
                config.jwks_path
            ));
        }
        for (key, name) in [("user_header", &config.user_header)].into_iter().chain(
            config
                .claim_headers
                .values()
                .map(|name| ("claim_headers", name)),
        ) {
            if let Some(problem) = edge_sdk::settable_header_problem(name) {
                return Err(format!("{key}: {name:?} {problem}"));
            }
        }
        if let Some(cookie) = &config.cookie {
            if !edge_sdk::is_token(cookie) {
                return Err(format!("cookie: {cookie:?} is not a valid cookie name"));
            }
        }
        if config
            .public_key_pem
            .as_deref()
            .is_some_and(|pem| pem.contains("PRIVATE KEY-----"))
        {
            return Err(
                "public_key_pem: contains a private key; give only the public key \
                        (`openssl pkey -in KEY -pubout`), so that the signing key stays out of \
                        the config"
                    .to_string(),
            );
        }
        let leeway = parse_duration("leeway", config.leeway.as_deref(), Duration::from_secs(60))?;
        if leeway > MAX_LEEWAY {
            return Err(format!(
                "leeway: {:?} is over the maximum of 10m, because a longer leeway accepts \
                 tokens long expired; fix the clocks that far apart instead",
                config.leeway.as_deref().unwrap_or_default()
            ));
        }
        let defaults = FetchOptions::default();
        let fetch = FetchOptions {
            min_refetch_interval: parse_duration(
                "jwks_refetch_interval",
                config.jwks_refetch_interval.as_deref(),
                defaults.min_refetch_interval,
            )?,
            default_max_age: parse_duration(
                "jwks_max_age",
                config.jwks_max_age.as_deref(),
                defaults.default_max_age,
            )?,
        };
        Ok(Settings {
            config,
            algorithms,
            leeway,
            fetch,
        })
    }

    /// Checks the configured key once, when the node loads the worker: the
    /// key material parses, and the allowed algorithms fit it.
    pub fn check_keys(&self) -> Result<(), String> {
        if self.config.jwks_upstream.is_some() {
            // Fetched on the first request, so that a node starts while the
            // identity provider is down.
            return Ok(());
        }
        if let Some(name) = &self.config.hmac_secret_name {
            self.check_hmac_secret_length(name)?;
        }
        match self
            .keys()
            .map_err(|e| format!("invalid jwt-auth key: {e}"))?
        {
            Keys::Single(key) => {
                let key_type = key.key_type();
                let unfit: Vec<&str> = self
                    .algorithms
                    .iter()
                    .filter(|alg| !fits(**alg, key_type))
                    .map(|alg| alg.name())
                    .collect();
                if !unfit.is_empty() {
                    // The host rejects them anyway; warn at load.
                    edge_sdk::log::warn(&format!(
                        "jwt-auth: algorithms {unfit:?} do not fit the {key_type:?} key, so \
                         tokens using them are always rejected"
                    ));
                }
                Ok(())
            }
            Keys::Set(_) => Ok(()),
        }
    }

    /// Checks that the HMAC secret is at least as long as the output of the
    /// largest hash the allowed algorithms use, as RFC 7518 (section 3.2)
    /// requires: a shorter one is open to guessing.
    fn check_hmac_secret_length(&self, name: &str) -> Result<(), String> {
        let needed = self
            .algorithms
            .iter()
            .filter_map(|alg| match alg {
                Algorithm::Hs256 => Some((32, alg)),
                Algorithm::Hs384 => Some((48, alg)),
                Algorithm::Hs512 => Some((64, alg)),
                _ => None,
            })
            .max_by_key(|(bytes, _)| *bytes);
        let (Some((bytes, alg)), Some(secret)) = (needed, edge_sdk::secrets::get(name)) else {
            return Ok(());
        };
        if secret.len() < bytes {
            return Err(format!(
                "invalid jwt-auth key: the secret {name:?} has {} bytes, and {} needs at \
                 least {bytes}",
                secret.len(),
                alg.name()
            ));
        }
        Ok(())
    }

    /// Makes the key handles for this call.
    pub fn keys(&self) -> Result<Keys, edge_sdk::crypto::Error> {
        let config = &self.config;
        if let Some(name) = &config.hmac_secret_name {
            let secret = edge_sdk::secrets::get(name).ok_or_else(|| {
                edge_sdk::crypto::Error::InvalidKey(format!(
                    "no secret named {name:?}; add it to the worker's `secrets` table"
                ))
            })?;
            return Key::from_hmac_secret(secret.as_bytes()).map(Keys::Single);
        }
        if let Some(pem) = &config.public_key_pem {
            return Key::from_pem(pem).map(Keys::Single);
        }
        if let Some(jwks) = &config.jwks {
            return match jwks {
                serde_json::Value::String(text) => KeySet::from_jwks(text),
                other => KeySet::from_jwks(&other.to_string()),
            }
            .map(Keys::Set);
        }
        let upstream = config.jwks_upstream.as_deref().unwrap_or_default();
        KeySet::from_upstream(upstream, &config.jwks_path, self.fetch).map(Keys::Set)
    }
}

/// Returns whether `alg` works with keys of `key_type`.
fn fits(alg: Algorithm, key_type: KeyType) -> bool {
    use Algorithm::*;
    match key_type {
        KeyType::Hmac => matches!(alg, Hs256 | Hs384 | Hs512),
        KeyType::Rsa => matches!(alg, Rs256 | Rs384 | Rs512 | Ps256 | Ps384 | Ps512),
        KeyType::EcP256 => alg == Es256,
        KeyType::EcP384 => alg == Es384,
        KeyType::Ed25519 => alg == EdDsa,
    }
}

/// Parses a duration such as `30s`, `500ms`, `5m` or `1h`.
fn parse_duration(key: &str, text: Option<&str>, default: Duration) -> Result<Duration, String> {
    let Some(text) = text else {
        return Ok(default);
    };
    let split = text
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let invalid = || format!("{key}: {text:?} is not a duration such as \"30s\" or \"500ms\"");
    let number: u64 = number.parse().map_err(|_| invalid())?;
    let millis = match unit {
        "ms" => number,
        "s" => number.saturating_mul(1000),
        "m" => number.saturating_mul(60_000),
        "h" => number.saturating_mul(3_600_000),
        _ => return Err(invalid()),
    };
    Ok(Duration::from_millis(millis))
}

/// Builds checked settings from JSON, for other modules' unit tests. The
/// text is leaked, so that the settings can borrow it for the whole test.
#[cfg(test)]
pub fn tests_settings(json: String) -> Settings<'static> {
    let json: &'static str = Box::leak(json.into_boxed_str());
    Settings::check(serde_json::from_str(json).unwrap()).unwrap()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(json: &str) -> Result<Settings<'_>, String> {
        Settings::check(serde_json::from_str(json).map_err(|e| e.to_string())?)
    }

    #[test]
    fn needs_exactly_one_key_source() {
        let error = check(r#"{"algorithms":["HS256"]}"#).err().unwrap();
        assert!(error.contains("exactly one"), "{error}");
        let error = check(r#"{"algorithms":["HS256"],"hmac_secret_name":"s","jwks":"{}"}"#)
            .err()
            .unwrap();
        assert!(error.contains("exactly one"), "{error}");
    }

    #[test]
    fn rejects_unknown_and_none_algorithms() {
        for alg in ["none", "HS1", "rs256"] {
            let json = format!(r#"{{"algorithms":["{alg}"],"hmac_secret_name":"s"}}"#);
            let error = check(&json).err().unwrap();
            assert!(error.contains("not supported"), "{error}");
        }
        let error = check(r#"{"algorithms":[],"hmac_secret_name":"s"}"#)
            .err()
            .unwrap();
        assert!(error.contains("empty"), "{error}");
    }

    #[test]
    fn reads_durations_and_defaults() {
        let settings = check(
            r#"{"algorithms":["RS256"],"jwks_upstream":"idp","leeway":"5s",
                "jwks_refetch_interval":"1500ms"}"#,
        )
        .unwrap();
        assert_eq!(settings.leeway, Duration::from_secs(5));
        assert_eq!(
            settings.fetch.min_refetch_interval,
            Duration::from_millis(1500)
        );
        assert_eq!(settings.fetch.default_max_age, Duration::from_secs(300));
        assert_eq!(settings.config.user_header, "x-user-id");
        assert!(
            check(r#"{"algorithms":["RS256"],"hmac_secret_name":"s","leeway":"5 s"}"#).is_err()
        );
    }

    #[test]
    fn rejects_bad_header_names() {
        let error = check(r#"{"algorithms":["HS256"],"hmac_secret_name":"s","user_header":"x y"}"#)
            .err()
            .unwrap();
        assert!(error.contains("user_header"), "{error}");
        let error = check(
            r#"{"algorithms":["HS256"],"hmac_secret_name":"s","claim_headers":{"sub":"Content-Length"}}"#,
        )
        .err()
        .unwrap();
        assert_eq!(
            error,
            "claim_headers: \"Content-Length\" is a header the node sets itself, so a worker \
             cannot set it"
        );
    }

    #[test]
    fn private_key_pem_rejected() {
        let error = check(
            r#"{"algorithms":["RS256"],
                "public_key_pem":"-----BEGIN PRIVATE KEY-----\nMIIB\n-----END PRIVATE KEY-----\n"}"#,
        )
        .err()
        .unwrap();
        assert!(
            error.starts_with("public_key_pem: contains a private key"),
            "{error}"
        );
    }

    #[test]
    fn caps_leeway() {
        let config = |leeway: &str| {
            format!(r#"{{"algorithms":["HS256"],"hmac_secret_name":"s","leeway":"{leeway}"}}"#)
        };
        assert_eq!(
            check(&config("10m")).unwrap().leeway,
            Duration::from_secs(600)
        );
        assert_eq!(
            check(&config("60h")).err().unwrap(),
            "leeway: \"60h\" is over the maximum of 10m, because a longer leeway accepts \
             tokens long expired; fix the clocks that far apart instead"
        );
    }

    #[test]
    fn issuer_and_audience_take_one_or_many() {
        let settings = check(
            r#"{"algorithms":["HS256"],"hmac_secret_name":"s","issuer":"https://idp",
                "audience":["api","web\u0021"]}"#,
        )
        .unwrap();
        let issuers = settings.config.issuer.as_ref().unwrap().values();
        assert_eq!(issuers, ["https://idp"]);
        let audiences = settings.config.audience.as_ref().unwrap().values();
        assert_eq!(audiences, ["api", "web!"]);
        let error = check(r#"{"algorithms":["HS256"],"hmac_secret_name":"s","audience":5}"#)
            .err()
            .unwrap();
        assert!(
            error.contains("expected a string or a list of strings"),
            "{error}"
        );
        for key in ["issuer", "audience"] {
            let json = format!(r#"{{"algorithms":["HS256"],"hmac_secret_name":"s","{key}":[]}}"#);
            let Err(error) = check(&json) else {
                panic!("{key}: an empty list passed");
            };
            assert!(error.contains("is an empty list"), "{error}");
        }
        let error = check(r#"{"algorithms":["HS256"],"hmac_secret_name":"s","issuer":[5]}"#)
            .err()
            .unwrap();
        assert!(error.contains("expected a string"), "{error}");
    }
}
