//! Reading a compact JWS (RFC 7515, section 7.1) and checking its claims
//! (RFC 7519). Signatures are checked by the host, through `edge_sdk::crypto`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use edge_sdk::crypto::Algorithm;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::config::Settings;

/// The reason a request is rejected, which fixes its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Rejection {
    /// No token: 401 without an error code (RFC 6750, section 3.1).
    Missing,
    /// The token is malformed, expired, badly signed or not for this
    /// route: 401 `invalid_token`.
    Invalid(String),
    /// The token is valid but lacks a scope or claim: 403
    /// `insufficient_scope`.
    Insufficient(String),
}

fn invalid(message: impl Into<String>) -> Rejection {
    Rejection::Invalid(message.into())
}

/// The protected header members the worker reads.
#[derive(Debug, Deserialize)]
pub struct Header {
    pub alg: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub crit: Option<Value>,
}

/// A token split into its parts, before its signature is checked.
#[derive(Debug)]
pub struct Token<'a> {
    pub header: Header,
    pub alg: Algorithm,
    /// The header and payload as sent, joined by `.`: the signed bytes.
    pub signing_input: &'a str,
    pub signature: Vec<u8>,
    payload: &'a str,
}

impl<'a> Token<'a> {
    /// Splits and decodes a compact JWS, and checks its algorithm against
    /// the route's allow-list.
    pub fn parse(text: &'a str, allowed: &[Algorithm]) -> Result<Token<'a>, Rejection> {
        let mut parts = text.split('.');
        let (Some(header), Some(payload), Some(signature), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(invalid(
                "the token is not three base64url parts joined by dots",
            ));
        };
        let signing_input = &text[..header.len() + 1 + payload.len()];
        let header: Header = serde_json::from_slice(&decode(header, "header")?)
            .map_err(|e| invalid(format!("the token header is not valid JSON: {e}")))?;
        if header.alg == "none" {
            return Err(invalid("unsigned tokens (alg none) are not accepted"));
        }
        let alg = Algorithm::from_name(&header.alg)
            .filter(|alg| allowed.contains(alg))
            .ok_or_else(|| invalid(format!("the algorithm {:?} is not allowed", header.alg)))?;
        if header.crit.is_some() {
            return Err(invalid(
                "the token header has crit extensions, which are not supported",
            ));
        }
        Ok(Token {
            header,
            alg,
            signing_input,
            signature: decode(signature, "signature")?,
            payload,
        })
    }

    /// Decodes the payload as a JSON object of claims. Call it only after
    /// the signature is verified.
    pub fn claims(&self) -> Result<Map<String, Value>, Rejection> {
        serde_json::from_slice(&decode(self.payload, "payload")?)
            .map_err(|_| invalid("the token payload is not a JSON object"))
    }
}

fn decode(part: &str, name: &str) -> Result<Vec<u8>, Rejection> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| invalid(format!("the token {name} is not base64url")))
}

/// Checks the time, issuer and audience claims, then the required scopes and
/// claims. `now` is in seconds since the Unix epoch.
pub fn check_claims(
    claims: &Map<String, Value>,
    settings: &Settings,
    now: f64,
) -> Result<(), Rejection> {
    let config = &settings.config;
    let leeway = settings.leeway.as_secs_f64();
    match numeric_date(claims, "exp")? {
        Some(exp) if now > exp + leeway => return Err(invalid("the token has expired")),
        None if config.require_exp => return Err(invalid("the token has no exp claim")),
        _ => {}
    }
    if let Some(nbf) = numeric_date(claims, "nbf")? {
        if now + leeway < nbf {
            return Err(invalid("the token is not valid yet (nbf)"));
        }
    }
    if let Some(issuers) = &config.issuer {
        let iss = claims.get("iss").and_then(Value::as_str);
        if !iss.is_some_and(|iss| issuers.values().iter().any(|expected| expected == iss)) {
            return Err(invalid("the token's issuer is not accepted"));
        }
    }
    if let Some(audiences) = &config.audience {
        let accepted = |aud: &str| audiences.values().iter().any(|expected| expected == aud);
        let matches = match claims.get("aud") {
            Some(Value::String(aud)) => accepted(aud),
            Some(Value::Array(auds)) => auds.iter().filter_map(Value::as_str).any(accepted),
            _ => false,
        };
        if !matches {
            return Err(invalid("the token is not for this audience"));
        }
    }
    let scopes = granted_scopes(claims);
    let missing: Vec<&str> = config
        .required_scopes
        .iter()
        .map(String::as_str)
        .filter(|scope| !scopes.contains(scope))
        .collect();
    if !missing.is_empty() {
        return Err(Rejection::Insufficient(format!(
            "the token lacks the scope {}",
            missing.join(" ")
        )));
    }
    for (name, expected) in &config.required_claims {
        let holds = match claims.get(name) {
            Some(Value::Array(values)) => values.contains(expected),
            Some(value) => value == expected,
            None => false,
        };
        if !holds {
            return Err(Rejection::Insufficient(format!(
                "the token's {name} claim is not {expected}"
            )));
        }
    }
    Ok(())
}

/// Reads a NumericDate claim: seconds since the epoch, possibly fractional.
fn numeric_date(claims: &Map<String, Value>, name: &str) -> Result<Option<f64>, Rejection> {
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(number)) => Ok(number.as_f64()),
        Some(_) => Err(invalid(format!("the {name} claim is not a number"))),
    }
}

/// Collects the scopes in `scope` (space-separated, RFC 8693) or `scp` (a list or a
/// space-separated string).
fn granted_scopes(claims: &Map<String, Value>) -> Vec<&str> {
    let mut scopes = Vec::new();
    for name in ["scope", "scp"] {
        match claims.get(name) {
            Some(Value::String(text)) => scopes.extend(text.split(' ').filter(|s| !s.is_empty())),
            Some(Value::Array(values)) => scopes.extend(values.iter().filter_map(Value::as_str)),
            _ => {}
        }
    }
    scopes
}

/// Returns a claim's value as header text: strings as they are, other values as
/// JSON. `None` when it is missing or not a valid header value.
pub fn claim_text(claims: &Map<String, Value>, name: &str) -> Option<String> {
    let text = match claims.get(name)? {
        Value::String(text) => text.clone(),
        Value::Null => return None,
        other => other.to_string(),
    };
    let valid = text
        .bytes()
        .all(|byte| (byte >= 0x20 && byte != 0x7f) || byte == b'\t');
    valid.then_some(text)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(text: &str) -> String {
        URL_SAFE_NO_PAD.encode(text)
    }

    fn settings(extra: &str) -> Settings {
        crate::config::tests_settings(&format!(
            r#"{{"algorithms":["HS256","RS256"],"hmac_secret_name":"s"{extra}}}"#
        ))
    }

    #[test]
    fn parse_rejects_alg_none_and_unlisted_algorithms() {
        let none = format!("{}.{}.", b64(r#"{"alg":"none"}"#), b64("{}"));
        let error = Token::parse(&none, &[Algorithm::Hs256]).unwrap_err();
        assert_eq!(
            error,
            invalid("unsigned tokens (alg none) are not accepted")
        );
        let es = format!("{}.{}.c2ln", b64(r#"{"alg":"ES256"}"#), b64("{}"));
        let error = Token::parse(&es, &[Algorithm::Hs256]).unwrap_err();
        assert_eq!(error, invalid("the algorithm \"ES256\" is not allowed"));
    }

    #[test]
    fn parse_rejects_malformed_tokens() {
        for text in ["", "a.b", "a.b.c.d", "!!.e30.c2ln", "e30.e30.c2ln"] {
            assert!(
                matches!(
                    Token::parse(text, &[Algorithm::Hs256]),
                    Err(Rejection::Invalid(_))
                ),
                "{text:?}"
            );
        }
    }

    #[test]
    fn parse_keeps_signing_input() {
        let text = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"HS256","kid":"k1"}"#),
            b64("{}")
        );
        let token = Token::parse(&text, &[Algorithm::Hs256]).unwrap();
        assert_eq!(token.signing_input, &text[..text.rfind('.').unwrap()]);
        assert_eq!(token.header.kid.as_deref(), Some("k1"));
        assert_eq!(token.signature, b"sig");
    }

    #[test]
    fn claims_time_checks_use_leeway() {
        let settings = settings(r#","leeway":"10s""#);
        let claims = |json: &str| serde_json::from_str::<Map<String, Value>>(json).unwrap();
        assert!(check_claims(&claims(r#"{"exp":100}"#), &settings, 105.0).is_ok());
        assert_eq!(
            check_claims(&claims(r#"{"exp":100}"#), &settings, 111.0),
            Err(invalid("the token has expired"))
        );
        assert_eq!(
            check_claims(&claims(r#"{"exp":1000,"nbf":200}"#), &settings, 150.0),
            Err(invalid("the token is not valid yet (nbf)"))
        );
        assert_eq!(
            check_claims(&claims("{}"), &settings, 0.0),
            Err(invalid("the token has no exp claim"))
        );
    }

    #[test]
    fn claims_scopes_and_audience() {
        let settings = settings(
            r#","audience":["api","web"],"required_scopes":["read"],
               "required_claims":{"role":"admin"}"#,
        );
        let claims = |json: &str| serde_json::from_str::<Map<String, Value>>(json).unwrap();
        let ok = r#"{"exp":10,"aud":["x","web"],"scope":"read write","role":["admin"]}"#;
        assert_eq!(check_claims(&claims(ok), &settings, 0.0), Ok(()));
        let no_scope = r#"{"exp":10,"aud":"api","scp":["write"],"role":"admin"}"#;
        assert!(matches!(
            check_claims(&claims(no_scope), &settings, 0.0),
            Err(Rejection::Insufficient(_))
        ));
        let wrong_aud = r#"{"exp":10,"aud":"other","scope":"read","role":"admin"}"#;
        assert_eq!(
            check_claims(&claims(wrong_aud), &settings, 0.0),
            Err(invalid("the token is not for this audience"))
        );
        let no_role = r#"{"exp":10,"aud":"api","scope":"read","role":"user"}"#;
        assert!(matches!(
            check_claims(&claims(no_role), &settings, 0.0),
            Err(Rejection::Insufficient(_))
        ));
    }

    #[test]
    fn claim_text_refuses_control_characters() {
        let claims: Map<String, Value> =
            serde_json::from_str(r#"{"a":"x\r\ny","b":7,"c":"ok"}"#).unwrap();
        assert_eq!(claim_text(&claims, "a"), None);
        assert_eq!(claim_text(&claims, "b").as_deref(), Some("7"));
        assert_eq!(claim_text(&claims, "c").as_deref(), Some("ok"));
    }
}
