//! Reading a compact JWS (RFC 7515, section 7.1) and checking its claims
//! (RFC 7519). Signatures are checked by the host, through `edge_sdk::crypto`.

use std::cell::Cell;
use std::fmt;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use edge_sdk::crypto::Algorithm;
use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::{Number, Value};

use crate::config::Settings;
use crate::text::Text;

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

/// The protected header members the worker reads. Other members are
/// skipped without being copied.
#[derive(Debug, Deserialize)]
struct Header<'a> {
    #[serde(borrow)]
    alg: Text<'a>,
    #[serde(default, borrow)]
    kid: Option<Text<'a>>,
    /// Whether the header has `crit`, even `"crit": null`.
    #[serde(default, deserialize_with = "present")]
    crit: bool,
}

/// Deserializes any value as `true`: the member is present.
fn present<'de, D: Deserializer<'de>>(deserializer: D) -> Result<bool, D::Error> {
    IgnoredAny::deserialize(deserializer).map(|_| true)
}

/// The longest `alg` value a rejection quotes; longer ones are cut.
const MAX_QUOTED_ALG: usize = 32;

/// A token split into its parts, before its signature is checked.
#[derive(Debug)]
pub struct Token<'a> {
    pub alg: Algorithm,
    /// The header's `kid`, when it has one.
    pub kid: Option<String>,
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
        let header_json = decode(header, "header")?;
        // serde reads a struct from a JSON array too; RFC 7515 requires an
        // object.
        if header_json.trim_ascii_start().first() != Some(&b'{') {
            return Err(invalid("the token header is not a JSON object"));
        }
        let header: Header = serde_json::from_slice(&header_json)
            .map_err(|e| invalid(format!("the token header is not valid JSON: {e}")))?;
        if header.alg == "none" {
            return Err(invalid("unsigned tokens (alg none) are not accepted"));
        }
        let alg = Algorithm::from_name(&header.alg)
            .filter(|alg| allowed.contains(alg))
            .ok_or_else(|| {
                let mut quoted: String = header.alg.chars().take(MAX_QUOTED_ALG).collect();
                if quoted.len() < header.alg.len() {
                    quoted.push_str("...");
                }
                invalid(format!("the algorithm {quoted:?} is not allowed"))
            })?;
        if header.crit {
            return Err(invalid(
                "the token header has crit extensions, which are not supported",
            ));
        }
        Ok(Token {
            alg,
            kid: header.kid.as_ref().map(String::from),
            signing_input,
            signature: decode(signature, "signature")?,
            payload,
        })
    }

    /// Decodes the payload into JSON text, for [`Claims::parse`]. Call it
    /// only after the signature is verified.
    pub fn payload(&self) -> Result<String, Rejection> {
        String::from_utf8(decode(self.payload, "payload")?)
            .map_err(|_| invalid("the token payload is not a JSON object"))
    }
}

fn decode(part: &str, name: &str) -> Result<Vec<u8>, Rejection> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| invalid(format!("the token {name} is not base64url")))
}

/// The claims of a token that the route's checks and headers read. The
/// payload is parsed in one pass, and the values of other claims are
/// checked as JSON but never built.
#[derive(Debug)]
pub struct Claims<'a> {
    /// Claim names and values, each name once, the last value of a repeated
    /// name winning as in a JSON object parsed into a map.
    values: Vec<(Text<'a>, Value)>,
}

impl<'a> Claims<'a> {
    /// Parses the JSON object `payload`, keeping the claims that `settings`
    /// reads.
    pub fn parse(payload: &'a str, settings: &Settings) -> Result<Claims<'a>, Rejection> {
        let config = &settings.config;
        let wanted = |name: &str| {
            matches!(
                name,
                "exp" | "nbf" | "iat" | "iss" | "aud" | "sub" | "scope" | "scp"
            ) || name == config.user_claim.as_str()
                || config.claim_headers.contains_key(name)
                || config.required_claims.contains_key(name)
        };
        let failed_claim = Cell::new(None);
        let mut deserializer = serde_json::Deserializer::from_str(payload);
        let claims = ClaimsSeed {
            wanted,
            failed_claim: &failed_claim,
        }
        .deserialize(&mut deserializer)
        .and_then(|claims| deserializer.end().map(|()| claims))
        .map_err(|error| match failed_claim.take() {
            Some(name) if is_number_out_of_range(&error) => number_out_of_range(&name),
            _ => invalid("the token payload is not a JSON object"),
        })?;
        Ok(claims)
    }

    /// Returns the value of the claim `name`, if the token has it and the
    /// route's settings read it.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|(claim, _)| claim.as_str() == name)
            .map(|(_, value)| value)
    }
}

/// Deserializes a JSON object into [`Claims`], keeping the members whose
/// names `wanted` accepts.
struct ClaimsSeed<'c, F> {
    wanted: F,
    /// Set to the name of the kept claim whose value failed to parse.
    failed_claim: &'c Cell<Option<String>>,
}

impl<'de, F: Fn(&str) -> bool> DeserializeSeed<'de> for ClaimsSeed<'_, F> {
    type Value = Claims<'de>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Claims<'de>, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de, F: Fn(&str) -> bool> Visitor<'de> for ClaimsSeed<'_, F> {
    type Value = Claims<'de>;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a JSON object of claims")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Claims<'de>, A::Error> {
        let mut values: Vec<(Text<'de>, Value)> = Vec::new();
        while let Some(name) = map.next_key::<Text<'de>>()? {
            if !(self.wanted)(&name) {
                map.next_value::<IgnoredAny>()?;
                continue;
            }
            let value = match map.next_value::<Value>() {
                Ok(value) => value,
                Err(error) => {
                    self.failed_claim.set(Some(name.to_string()));
                    return Err(error);
                }
            };
            match values.iter_mut().find(|(claim, _)| *claim == name) {
                Some((_, earlier)) => *earlier = value,
                None => values.push((name, value)),
            }
        }
        Ok(Claims { values })
    }
}

/// Checks the time, issuer and audience claims, then the required scopes and
/// claims. `now` is in seconds since the Unix epoch.
pub fn check_claims(claims: &Claims, settings: &Settings, now: f64) -> Result<(), Rejection> {
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
    // `iat` is not compared with the clock, but it must be a NumericDate.
    numeric_date(claims, "iat")?;
    // RFC 7519, section 4.1.2: `sub` is a StringOrURI, so a JSON string.
    if claims.get("sub").is_some_and(|sub| !sub.is_string()) {
        return Err(invalid(
            "the sub claim is not a string; RFC 7519 requires a StringOrURI",
        ));
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
    if !config.required_scopes.is_empty() {
        check_scopes(claims, settings)?;
    }
    for (name, expected) in &config.required_claims {
        let holds = match claims.get(name) {
            Some(Value::Array(values)) => values.iter().any(|value| claim_equals(value, expected)),
            Some(value) => claim_equals(value, expected),
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

/// Returns whether a claim value equals a required value. Numbers compare
/// by value, so that 1 matches 1.0, and other values must be equal as JSON.
fn claim_equals(value: &Value, expected: &Value) -> bool {
    match (value, expected) {
        (Value::Number(value), Value::Number(expected)) => numbers_equal(value, expected),
        _ => value == expected,
    }
}

/// Compares two JSON numbers by value. Whole numbers compare as integers,
/// so two integers above 2^53 that round to the same f64 stay unequal.
fn numbers_equal(a: &Number, b: &Number) -> bool {
    match (whole_number(a), whole_number(b)) {
        (Some(a), Some(b)) => a == b,
        (None, None) => a.as_f64() == b.as_f64(),
        _ => false,
    }
}

/// Returns the number as an integer when it has no fractional part.
fn whole_number(number: &Number) -> Option<i128> {
    if let Some(integer) = number.as_i64() {
        return Some(integer.into());
    }
    if let Some(integer) = number.as_u64() {
        return Some(integer.into());
    }
    // Every whole f64 of magnitude below 2^127 converts to i128 exactly.
    let float = number.as_f64()?;
    (float.fract() == 0.0 && float.abs() < 2f64.powi(127)).then_some(float as i128)
}

/// Checks that the token grants every scope the route requires.
fn check_scopes(claims: &Claims, settings: &Settings) -> Result<(), Rejection> {
    let scopes = granted_scopes(claims);
    let missing: Vec<&str> = settings
        .config
        .required_scopes
        .iter()
        .map(Text::as_str)
        .filter(|scope| !scopes.contains(scope))
        .collect();
    if !missing.is_empty() {
        return Err(Rejection::Insufficient(format!(
            "the token lacks the scope {}",
            missing.join(" ")
        )));
    }
    Ok(())
}

/// The claims whose values are NumericDates (RFC 7519, section 2).
const NUMERIC_DATE_CLAIMS: [&str; 3] = ["exp", "nbf", "iat"];

/// The limit of a NumericDate, 2^63 seconds either side of 1970: the range
/// of a signed 64-bit count of seconds, such as a 64-bit Unix `time_t`. A
/// larger value names no real time.
const NUMERIC_DATE_LIMIT: f64 = 9_223_372_036_854_775_808.0;

/// Reads a NumericDate claim: seconds since the epoch, possibly fractional.
fn numeric_date(claims: &Claims, name: &str) -> Result<Option<f64>, Rejection> {
    let number = match claims.get(name) {
        None => return Ok(None),
        Some(Value::Number(number)) => number,
        Some(_) => return Err(not_a_numeric_date(name, "it is not a number")),
    };
    // Every i64 is in range, although i64::MAX rounds up to 2^63 as an f64.
    let seconds = number.as_f64().unwrap_or(f64::NAN);
    if number.is_i64() || (-NUMERIC_DATE_LIMIT..NUMERIC_DATE_LIMIT).contains(&seconds) {
        Ok(Some(seconds))
    } else {
        Err(not_a_numeric_date(name, "the number is out of range"))
    }
}

fn not_a_numeric_date(name: &str, reason: &str) -> Rejection {
    invalid(format!(
        "the {name} claim is not a valid NumericDate: {reason}"
    ))
}

/// Returns whether serde_json failed on a number too large for an f64,
/// such as 1e400. RFC 8259 (section 6) lets a parser limit the range of
/// numbers, so the JSON itself is valid.
// NOTE: serde_json has no error kind for this, so the message text is
// matched; claims_reject_numbers_out_of_range checks that it still is.
fn is_number_out_of_range(error: &serde_json::Error) -> bool {
    error.is_syntax() && error.to_string().starts_with("number out of range")
}

/// Builds the rejection of a token whose claim `name` has a number that
/// serde_json cannot read.
fn number_out_of_range(name: &str) -> Rejection {
    if NUMERIC_DATE_CLAIMS.contains(&name) {
        not_a_numeric_date(name, "the number is out of range")
    } else {
        invalid(format!("the {name} claim contains a number out of range"))
    }
}

/// Collects the scopes in `scope` (space-separated, RFC 8693) or `scp` (a list or a
/// space-separated string).
fn granted_scopes<'c>(claims: &'c Claims) -> Vec<&'c str> {
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
pub fn claim_text(claims: &Claims, name: &str) -> Option<String> {
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

    fn settings(extra: &str) -> Settings<'static> {
        crate::config::tests_settings(format!(
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
    fn parse_rejects_odd_headers() {
        let token = |header: &str| format!("{}.{}.c2ln", b64(header), b64("{}"));
        let cases = [
            (
                r#"["HS256"]"#,
                "the token header is not a JSON object".to_owned(),
            ),
            (
                r#"{"alg":"HS256","crit":null}"#,
                "the token header has crit extensions, which are not supported".to_owned(),
            ),
            (
                &format!(r#"{{"alg":"{}"}}"#, "A".repeat(100)),
                format!("the algorithm \"{}...\" is not allowed", "A".repeat(32)),
            ),
        ];
        for (header, message) in cases {
            let error = Token::parse(&token(header), &[Algorithm::Hs256]).unwrap_err();
            assert_eq!(error, invalid(message), "{header}");
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
        assert_eq!(token.kid.as_deref(), Some("k1"));
        assert_eq!(token.signature, b"sig");
    }

    #[test]
    fn claims_time_checks_use_leeway() {
        let settings = settings(r#","leeway":"10s""#);
        let claims = |json: &'static str| Claims::parse(json, &settings).unwrap();
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
    fn claims_reject_sub_that_is_not_string() {
        let settings = settings("");
        for sub in ["7", "1.5", "{\"id\":\"u1\"}", "null", "true", "[\"u1\"]"] {
            let json = format!(r#"{{"exp":10,"sub":{sub}}}"#);
            let claims = Claims::parse(&json, &settings).unwrap();
            assert_eq!(
                check_claims(&claims, &settings, 0.0),
                Err(invalid(
                    "the sub claim is not a string; RFC 7519 requires a StringOrURI"
                )),
                "sub {sub}"
            );
        }
        let claims = Claims::parse(r#"{"exp":10,"sub":"u1"}"#, &settings).unwrap();
        assert_eq!(check_claims(&claims, &settings, 0.0), Ok(()));
    }

    #[test]
    fn claims_reject_invalid_numeric_dates() {
        let settings = settings("");
        let out_of_range = "the number is out of range";
        let cases = [
            (r#"{"exp":1e400}"#, "exp", out_of_range),
            (r#"{"exp":10,"nbf":-1e400}"#, "nbf", out_of_range),
            (r#"{"exp":10,"iat":1e400}"#, "iat", out_of_range),
            (r#"{"exp":18446744073709551616}"#, "exp", out_of_range),
            (r#"{"exp":9223372036854775808}"#, "exp", out_of_range),
            (r#"{"exp":10,"nbf":-9.3e18}"#, "nbf", out_of_range),
            (
                r#"{"exp":10,"iat":1.8446744073709552e19}"#,
                "iat",
                out_of_range,
            ),
            (r#"{"exp":"10"}"#, "exp", "it is not a number"),
            (r#"{"exp":10,"nbf":null}"#, "nbf", "it is not a number"),
            (r#"{"exp":10,"iat":{"s":1}}"#, "iat", "it is not a number"),
        ];
        for (json, name, reason) in cases {
            let result = Claims::parse(json, &settings)
                .and_then(|claims| check_claims(&claims, &settings, 0.0));
            let message = format!("the {name} claim is not a valid NumericDate: {reason}");
            assert_eq!(result, Err(invalid(message)), "{json}");
        }
        // The ends of the signed 64-bit range, and a fractional iat.
        for json in [
            r#"{"exp":9223372036854775807,"nbf":-9223372036854775808,"iat":1.5}"#,
            r#"{"exp":9.2e18,"nbf":-9.2e18,"iat":0}"#,
        ] {
            let claims = Claims::parse(json, &settings).unwrap();
            assert_eq!(check_claims(&claims, &settings, 0.0), Ok(()), "{json}");
        }
    }

    #[test]
    fn claims_reject_numbers_out_of_range() {
        let settings = settings(r#","required_claims":{"n":1}"#);
        assert_eq!(
            Claims::parse(r#"{"exp":10,"n":[1,1e400]}"#, &settings).unwrap_err(),
            invalid("the n claim contains a number out of range")
        );
        // Only the claims the settings read are parsed as numbers.
        let claims = Claims::parse(r#"{"exp":10,"n":1,"jti":1e400}"#, &settings).unwrap();
        assert_eq!(check_claims(&claims, &settings, 0.0), Ok(()));
        // A malformed number is malformed JSON, not a number out of range.
        assert_eq!(
            Claims::parse(r#"{"exp":1e}"#, &settings).unwrap_err(),
            invalid("the token payload is not a JSON object")
        );
    }

    #[test]
    fn claims_scopes_and_audience() {
        let settings = settings(
            r#","audience":["api","web"],"required_scopes":["read"],
               "required_claims":{"role":"admin"}"#,
        );
        let claims = |json: &'static str| Claims::parse(json, &settings).unwrap();
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
    fn required_number_claims_compare_by_value() {
        let settings = settings(
            r#","required_claims":{"n":1,"half":0.5,"big":9007199254740993,"flag":true,
               "name":"1"}"#,
        );
        let check = |json: String| {
            let claims = Claims::parse(&json, &settings).unwrap();
            check_claims(&claims, &settings, 0.0)
        };
        let token = |n: &str, half: &str, big: &str, flag: &str, name: &str| {
            format!(r#"{{"exp":10,"n":{n},"half":{half},"big":{big},"flag":{flag},"name":{name}}}"#)
        };
        let accepted = [
            token("1", "0.5", "9007199254740993", "true", "\"1\""),
            token("1.0", "5e-1", "9007199254740993", "true", "\"1\""),
            token("1e0", "0.50", "9007199254740993", "true", "\"1\""),
            token(
                "[2, 1.0]",
                "[0.5]",
                "[9007199254740993]",
                "[true]",
                "[\"1\"]",
            ),
        ];
        for json in accepted {
            assert_eq!(check(json.clone()), Ok(()), "{json}");
        }
        let insufficient = |name: &str, expected: &str| {
            Err(Rejection::Insufficient(format!(
                "the token's {name} claim is not {expected}"
            )))
        };
        let rejected = [
            (
                token("1.5", "0.5", "9007199254740993", "true", "\"1\""),
                "n",
                "1",
            ),
            (
                token("\"1\"", "0.5", "9007199254740993", "true", "\"1\""),
                "n",
                "1",
            ),
            (
                token("true", "0.5", "9007199254740993", "true", "\"1\""),
                "n",
                "1",
            ),
            (
                token("1", "1", "9007199254740993", "true", "\"1\""),
                "half",
                "0.5",
            ),
            // Both round to the f64 9007199254740992.
            (
                token("1", "0.5", "9007199254740992", "true", "\"1\""),
                "big",
                "9007199254740993",
            ),
            (
                token("1", "0.5", "9007199254740993", "1", "\"1\""),
                "flag",
                "true",
            ),
            (
                token("1", "0.5", "9007199254740993", "true", "1"),
                "name",
                "\"1\"",
            ),
        ];
        for (json, name, expected) in rejected {
            assert_eq!(check(json.clone()), insufficient(name, expected), "{json}");
        }
    }

    #[test]
    fn claim_text_refuses_control_characters() {
        let settings = settings(r#","claim_headers":{"a":"x-a","b":"x-b","c":"x-c"}"#);
        let claims = Claims::parse(r#"{"a":"x\r\ny","b":7,"c":"ok"}"#, &settings).unwrap();
        assert_eq!(claim_text(&claims, "a"), None);
        assert_eq!(claim_text(&claims, "b").as_deref(), Some("7"));
        assert_eq!(claim_text(&claims, "c").as_deref(), Some("ok"));
    }

    #[test]
    fn claims_keep_only_what_settings_read() {
        let settings = settings(r#","claim_headers":{"email":"x-email"}"#);
        let json = r#"{"sub":"u1","email":"a@b","jti":"7","nested":{"x":[1,{"y":null}]}}"#;
        let claims = Claims::parse(json, &settings).unwrap();
        assert_eq!(claims.get("sub"), Some(&Value::from("u1")));
        assert_eq!(claims.get("email"), Some(&Value::from("a@b")));
        assert_eq!(claims.get("jti"), None);
        assert_eq!(claims.get("nested"), None);
    }

    #[test]
    fn claims_last_repeated_name_wins() {
        let settings = settings("");
        let claims =
            Claims::parse(r#"{"exp":1,"sub":"a","exp":2,"\u0073ub":"b"}"#, &settings).unwrap();
        assert_eq!(claims.get("exp"), Some(&Value::from(2)));
        assert_eq!(claims.get("sub"), Some(&Value::from("b")));
    }

    #[test]
    fn claims_reject_what_is_not_an_object() {
        let settings = settings("");
        let not_objects = [
            "[]",
            "\"text\"",
            "{\"sub\":\"a\"} x",
            "{\"jti\":[1,}",
            "{\"jti\":\"bad \\q escape\"}",
            "",
        ];
        for json in not_objects {
            assert_eq!(
                Claims::parse(json, &settings).unwrap_err(),
                invalid("the token payload is not a JSON object"),
                "{json:?}"
            );
        }
    }

    #[test]
    fn payload_must_be_utf8() {
        let text = format!(
            "{}.{}.c2ln",
            b64(r#"{"alg":"HS256"}"#),
            URL_SAFE_NO_PAD.encode(b"{\"jti\":\"\xff\"}")
        );
        let token = Token::parse(&text, &[Algorithm::Hs256]).unwrap();
        assert_eq!(
            token.payload().unwrap_err(),
            invalid("the token payload is not a JSON object")
        );
    }
}
