//! `jwt-auth`: lets a request through only with a valid JSON Web Token, and
//! passes the user's identity to the upstream.
//!
//! ```toml
//! [upstreams.idp]
//! targets = ["10.0.0.5:8080"]
//!
//! [[routes.workers]]
//! module = "modules/jwt-auth.wasm"
//! fetch = ["idp"]                      # the JWK set comes from here
//!
//! [routes.workers.config]
//! algorithms = ["RS256", "ES256"]       # the allow-list; `none` is never accepted
//! jwks_upstream = "idp"
//! jwks_path = "/.well-known/jwks.json"
//! issuer = "https://idp.example.com"
//! audience = "api"
//! required_scopes = ["read:users"]
//! claim_headers = { email = "x-user-email" }
//! ```
//!
//! The token comes from `Authorization: Bearer` or, when configured, a cookie.
//! The worker parses it and checks its claims; the host checks its signature
//! with a key handle of the `crypto` import, so an algorithm that does not fit
//! the key's type fails. Rejections follow RFC 6750: 401 with
//! `WWW-Authenticate: Bearer realm="..."` when there is no token, 401 with
//! `error="invalid_token"` for a bad one, 403 with
//! `error="insufficient_scope"` for a valid token that lacks a scope or claim,
//! each with a JSON body. On success the request goes on with the user header
//! (`x-user-id` from `sub` by default) and the mapped claim headers, and the
//! request context's `user` is set to the same value. Those headers are always
//! removed from what the client sent first.

mod config;
mod text;
mod token;

use edge_sdk::{Action, Request, RequestChanges, Response, Worker};
use serde::Serialize;

use config::{Keys, Settings};
use token::{check_claims, claim_text, Claims, Rejection, Token};

struct JwtAuth;

impl Worker for JwtAuth {
    fn check_config() -> Result<(), String> {
        let json = edge_sdk::config::json();
        Settings::load(&json)?.check_keys()
    }

    fn on_request(request: Request) -> Action {
        let json = edge_sdk::config::json();
        let settings = match Settings::load(&json) {
            Ok(settings) => settings,
            Err(message) => {
                edge_sdk::log::error(&message);
                return Action::respond(Response::json(
                    500,
                    &ErrorBody {
                        error: "worker_config_invalid",
                        message,
                    },
                ));
            }
        };
        match authenticate(&request, &settings) {
            Ok(changes) => Action::Continue(changes),
            Err(rejection) => Action::respond(reject(&request, &settings, rejection)),
        }
    }
}

edge_sdk::export_worker!(JwtAuth);

/// Checks the request's token and returns the header changes for the
/// upstream.
fn authenticate(request: &Request, settings: &Settings) -> Result<RequestChanges, Rejection> {
    let config = &settings.config;
    let text = find_token(request, config.cookie.as_deref())?;
    let token = Token::parse(text, &settings.algorithms)?;

    // The host keeps the key and checks the signature.
    let key = match settings.keys() {
        Ok(Keys::Single(key)) => key,
        Ok(Keys::Set(set)) => set
            .find(token.kid.as_deref(), token.alg)
            .ok_or_else(|| Rejection::Invalid("no key matches the token's kid and alg".into()))?,
        Err(error) => {
            // The host logs failed key set fetches itself, at a bounded rate.
            edge_sdk::log::debug(&format!("jwt-auth: no key to check tokens with: {error}"));
            return Err(Rejection::Invalid("the token cannot be checked now".into()));
        }
    };
    let valid = key
        .verify(token.alg, token.signing_input.as_bytes(), &token.signature)
        .map_err(|error| match error {
            // The token's choice, so the client may learn it.
            edge_sdk::crypto::Error::AlgorithmMismatch => {
                Rejection::Invalid(format!("the token's key rejects it: {error}"))
            }
            // Other reasons describe the route's key (its length, say), so
            // they go to the node's log, not to the client.
            _ => {
                edge_sdk::log::warn(&format!(
                    "jwt-auth: the key cannot check a {} token: {error}",
                    token.alg
                ));
                Rejection::Invalid("the token cannot be checked with this route's key".into())
            }
        })?;
    if !valid {
        return Err(Rejection::Invalid(
            "the token's signature is invalid".into(),
        ));
    }

    let payload = token.payload()?;
    let claims = Claims::parse(&payload, settings)?;
    let now = edge_sdk::clock::now_unix_ms() as f64 / 1000.0;
    check_claims(&claims, settings, now)?;
    let user = claim_text(&claims, &config.user_claim)
        .filter(|user| !user.trim().is_empty())
        .ok_or_else(|| {
            Rejection::Insufficient(format!(
                "the token has no usable {} claim",
                config.user_claim
            ))
        })?;

    // Remove every header this worker sets, then set those the token fills.
    let mut changes = RequestChanges::new().remove_header(&config.user_header);
    for header in config.claim_headers.values() {
        changes = changes.remove_header(header);
    }
    for (claim, header) in &config.claim_headers {
        if let Some(value) = claim_text(&claims, claim) {
            changes = changes.set_header(header, value);
        }
    }
    // Later workers, limits keyed `context:user` and the access log read it.
    if let Err(error) = edge_sdk::context::set("user", &user) {
        return Err(Rejection::Insufficient(format!(
            "the {} claim cannot be the request's user: {error}",
            config.user_claim
        )));
    }
    Ok(changes.set_header(&config.user_header, user))
}

/// Finds the token in `Authorization: Bearer` or the configured cookie, and
/// makes sure the request carries no other token. An upstream that reads a
/// second `Authorization` header or token cookie would trust a token that
/// was never checked.
fn find_token<'a>(request: &'a Request, cookie: Option<&str>) -> Result<&'a str, Rejection> {
    if request.headers.get_all("authorization").nth(1).is_some() {
        return Err(Rejection::Invalid(
            "the request has more than one Authorization header".into(),
        ));
    }
    let token = find_one_token(request, cookie)?;
    if let Some(name) = cookie {
        if lookalike_cookie_values(request, name).any(|value| value != token) {
            return Err(Rejection::Invalid(format!(
                "the request carries another token in its {name} cookie"
            )));
        }
    }
    Ok(token)
}

/// Returns the values of every cookie that some framework reads as `name`:
/// names compared without case (ASP.NET) and percent-decoded (PHP), and
/// pairs split on commas as well as semicolons (RFC 2965 parsers).
fn lookalike_cookie_values<'a, 'n>(
    request: &'a Request,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    cookie_pairs(request, &[';', ','])
        .filter(move |(cookie_name, _)| reads_as(cookie_name, name))
        .map(|(_, value)| value)
}

/// Returns the cookies of the request as (name, value) pairs, the pairs
/// split on `separators`, with blanks around names and values trimmed (as
/// cookie parsers do, so `tok =forged` names the cookie `tok`), values
/// unquoted, and empty values left out.
fn cookie_pairs<'a>(
    request: &'a Request,
    separators: &'static [char],
) -> impl Iterator<Item = (&'a str, &'a str)> + use<'a> {
    request
        .headers
        .get_all("cookie")
        .flat_map(move |header| header.split(separators))
        .filter_map(|pair| pair.trim().split_once('='))
        .map(|(name, value)| (name.trim_end(), value.trim_start().trim_matches('"')))
        .filter(|(_, value)| !value.is_empty())
}

/// Returns true when the cookie name `candidate` is `name` once
/// percent-decoded and compared without case.
fn reads_as(candidate: &str, name: &str) -> bool {
    if candidate.eq_ignore_ascii_case(name) {
        return true;
    }
    if !candidate.contains('%') {
        return false;
    }
    let bytes = candidate.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        let escaped = (bytes[index] == b'%')
            .then(|| candidate.get(index + 1..index + 3))
            .flatten()
            .and_then(|hex| u8::from_str_radix(hex, 16).ok());
        match escaped {
            Some(byte) => {
                decoded.push(byte);
                index += 3;
            }
            None => {
                decoded.push(bytes[index]);
                index += 1;
            }
        }
    }
    decoded.eq_ignore_ascii_case(name.as_bytes())
}

/// Returns the non-empty values of the cookie `name`, unquoted.
fn cookie_values<'a, 'n>(
    request: &'a Request,
    name: &'n str,
) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
    cookie_pairs(request, &[';'])
        .filter(move |(cookie_name, _)| *cookie_name == name)
        .map(|(_, value)| value)
}

fn find_one_token<'a>(request: &'a Request, cookie: Option<&str>) -> Result<&'a str, Rejection> {
    let authorization = request
        .header("authorization")
        .map(|value| value.trim_matches([' ', '\t']));
    // Every value that starts with the word is taken as a bearer token, and
    // must then be one: upstreams that split on a tab or a colon, or strip
    // the word, read `Bearer\t<token>` or `Bearer<token>` as one.
    if let Some(authorization) = authorization {
        let word = authorization.get(..6);
        if word.is_some_and(|word| word.eq_ignore_ascii_case("bearer")) {
            return bearer_token(&authorization[6..]);
        }
    }
    // An empty cookie of the same name (say, a cleared one on another path)
    // must not hide the one that carries the token.
    let from_cookie = cookie.and_then(|name| cookie_values(request, name).next());
    match (from_cookie, authorization) {
        (Some(_), Some(_)) => Err(Rejection::Invalid(
            "the request has an Authorization header of another scheme next to its token \
             cookie, which the upstream might read as a token"
                .into(),
        )),
        (Some(token), None) => Ok(token),
        (None, _) => Err(Rejection::Missing),
    }
}

/// Returns the token after `Bearer`: one or more spaces, then a token68
/// (RFC 6750, section 2.1), which a JWT's characters fit.
fn bearer_token(rest: &str) -> Result<&str, Rejection> {
    let token = rest.trim_start_matches(' ');
    if token.len() == rest.len() && !rest.is_empty() {
        return Err(Rejection::Invalid(
            "the Authorization header is not `Bearer` and a space before the token".into(),
        ));
    }
    if token.is_empty() {
        return Err(Rejection::Invalid("the bearer token is empty".into()));
    }
    let body = token.trim_end_matches('=');
    let token68 = body
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "-._~+/".contains(c));
    if !token68 {
        return Err(Rejection::Invalid(
            "the bearer token has characters that no token has".into(),
        ));
    }
    Ok(token)
}

/// The JSON body of a rejection.
#[derive(Debug, Serialize)]
struct ErrorBody {
    error: &'static str,
    message: String,
}

/// Builds the 401 or 403 response for a rejection (RFC 6750, section 3).
fn reject(request: &Request, settings: &Settings, rejection: Rejection) -> Response {
    let realm = settings.config.realm.as_deref().unwrap_or(&request.route);
    let mut challenge = format!("Bearer realm=\"{}\"", quote(realm));
    let (status, error, message) = match rejection {
        Rejection::Missing => (
            401,
            "missing_token",
            "the request has no bearer token".into(),
        ),
        Rejection::Invalid(message) => (401, "invalid_token", message),
        Rejection::Insufficient(message) => (403, "insufficient_scope", message),
    };
    if status == 403 || error == "invalid_token" {
        challenge.push_str(&format!(
            ", error=\"{error}\", error_description=\"{}\"",
            quote(&message)
        ));
    }
    if status == 403 && !settings.config.required_scopes.is_empty() {
        let scope = settings.config.required_scopes.join(" ");
        challenge.push_str(&format!(", scope=\"{}\"", quote(&scope)));
    }
    edge_sdk::log::debug(&format!(
        "jwt-auth: rejected with {status} {error}: {message}"
    ));
    Response::json(status, &ErrorBody { error, message })
        .header("www-authenticate", challenge)
        .header("cache-control", "no-store")
}

/// Makes text safe inside a quoted-string: RFC 6750 allows no `"` or `\` in
/// its parameters, and a header value no control characters.
fn quote(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c == '"' || c == '\\' || c.is_control() {
                '\''
            } else {
                c
            }
        })
        .collect()
}
