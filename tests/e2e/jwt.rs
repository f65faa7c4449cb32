//! The jwt-auth worker through a real node: tokens signed in the test with
//! real RSA, EC, Ed25519 and HMAC keys, every rejection, header stripping,
//! and JWK sets served by a loopback key server that rotates its keys.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::{encode, EncodingKey, Header};
use serde_json::{json, Value};

use crate::harness::{send, Got, Node, Reply, Result, Upstream};

const SECRET: &str = "a-shared-secret-of-at-least-thirty-two-bytes";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn pem(tag: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(tag, der.to_vec()))
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Claims that pass the HMAC route's checks, with `extra` merged in.
fn claims(extra: Value) -> Value {
    let mut claims = json!({
        "sub": "user-7", "iss": "https://idp.test", "aud": "api",
        "exp": now() + 300, "scope": "read write", "email": "u7@example.com",
    });
    for (name, value) in extra.as_object().unwrap() {
        if value.is_null() {
            claims.as_object_mut().unwrap().remove(name);
        } else {
            claims[name] = value.clone();
        }
    }
    claims
}

fn sign(
    alg: jsonwebtoken::Algorithm,
    kid: Option<&str>,
    claims: &Value,
    key: &EncodingKey,
) -> String {
    let mut header = Header::new(alg);
    header.kid = kid.map(str::to_owned);
    encode(&header, claims, key).unwrap()
}

fn secret(bytes: &[u8]) -> EncodingKey {
    EncodingKey::from_secret(bytes).unwrap()
}

fn hs256(claims: &Value) -> String {
    sign(
        jsonwebtoken::Algorithm::HS256,
        None,
        claims,
        &secret(SECRET.as_bytes()),
    )
}

/// Signs the payload text as it is, with HS256 and the test's secret, for
/// JSON that a `serde_json::Value` cannot hold, such as 1e400.
fn hs256_text(payload: &str) -> String {
    let signing_input = format!(
        "{}.{}",
        b64(br#"{"alg":"HS256","typ":"JWT"}"#),
        b64(payload.as_bytes())
    );
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, SECRET.as_bytes());
    let tag = aws_lc_rs::hmac::sign(&key, signing_input.as_bytes());
    format!("{signing_input}.{}", b64(tag.as_ref()))
}

async fn get_with(node: &Node, path: &str, headers: &[(&str, &str)]) -> Result<Got> {
    send("GET", &node.url(path), headers, b"").await
}

async fn get_bearer(node: &Node, path: &str, token: &str) -> Result<Got> {
    let authorization = format!("Bearer {token}");
    get_with(node, path, &[("authorization", &authorization)]).await
}

/// Checks a 401 `invalid_token` whose message contains `reason`.
fn assert_invalid(got: &Got, reason: &str) {
    assert_eq!(got.status, 401, "{:?}", got.body);
    let challenge = got.header("www-authenticate").unwrap_or_default();
    assert!(challenge.starts_with("Bearer realm=\""), "{challenge}");
    assert!(challenge.contains("error=\"invalid_token\""), "{challenge}");
    let body = got.json();
    assert_eq!(body["error"], "invalid_token");
    let message = body["message"].as_str().unwrap_or_default();
    assert!(message.contains(reason), "{message:?} lacks {reason:?}");
}

/// Checks a 401 `invalid_token` response in full: the challenge with its
/// description, the JSON body and `Cache-Control`.
fn assert_invalid_exactly(got: &Got, realm: &str, message: &str) {
    assert_eq!(got.status, 401, "{:?}", got.body);
    let challenge = format!(
        "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{message}\""
    );
    assert_eq!(got.header("www-authenticate"), Some(challenge.as_str()));
    assert_eq!(
        got.json(),
        json!({ "error": "invalid_token", "message": message })
    );
    assert_eq!(got.header("cache-control"), Some("no-store"));
}

fn route(name: &str, prefix: &str, config: &str, extra: &str) -> String {
    format!(
        "[[routes]]\nname = \"{name}\"\nprefix = \"{prefix}\"\nupstream = \"app\"\n\n\
         [[routes.workers]]\nmodule = \"{{modules}}/jwt-auth.wasm\"\n{extra}\n\
         [routes.workers.config]\n{config}\n\n"
    )
}

fn hmac_config() -> String {
    format!(
        "[upstreams.app]\ntargets = [\"{{app}}\"]\n\n{}",
        route(
            "hs",
            "/",
            "algorithms = [\"HS256\"]\nhmac_secret_name = \"jwt_key\"\nrealm = \"edge-api\"\n\
             issuer = \"https://idp.test\"\naudience = [\"api\", \"web\"]\nleeway = \"5s\"\n\
             required_scopes = [\"read\"]\ncookie = \"session\"\n\
             claim_headers = { email = \"x-user-email\" }\n\
             [routes.workers.secrets]\njwt_key = { env = \"JWT_TEST_KEY\" }",
            "",
        )
    )
}

/// Starts a node on the HMAC route's config, with its secret in the
/// environment, proxying to `app`.
fn start_hmac_node(app: &Upstream, extra: &str) -> Result<Node> {
    let config = hmac_config().replace("{app}", &app.addr.to_string());
    Node::start_with_env(&format!("{config}{extra}"), &[("JWT_TEST_KEY", SECRET)])
}

#[tokio::test]
async fn jwt_rejections_reach_no_upstream() -> Result {
    let app = Upstream::echo().await;
    let node = start_hmac_node(&app, "")?;

    // No token: the challenge has the realm and no error code.
    let got = get_with(&node, "/x", &[("x-user-id", "admin")]).await?;
    assert_eq!(got.status, 401);
    assert_eq!(
        got.header("www-authenticate"),
        Some("Bearer realm=\"edge-api\"")
    );
    assert_eq!(got.json()["error"], "missing_token");
    let got = get_with(&node, "/x", &[("authorization", "Basic dTpw")]).await?;
    assert_eq!(got.status, 401);
    assert_eq!(got.json()["error"], "missing_token");

    let other_key = secret(b"another-secret");
    let none_token = format!(
        "{}.{}.",
        b64(br#"{"alg":"none","typ":"JWT"}"#),
        b64(claims(json!({})).to_string().as_bytes())
    );
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "malformed",
            "not-a-token".to_owned(),
            "three base64url parts",
        ),
        (
            "empty parts",
            "..".to_owned(),
            "the token header is not a JSON object",
        ),
        (
            "bad signature",
            sign(
                jsonwebtoken::Algorithm::HS256,
                None,
                &claims(json!({})),
                &other_key,
            ),
            "signature is invalid",
        ),
        (
            "expired",
            hs256(&claims(json!({ "exp": now() - 60 }))),
            "expired",
        ),
        (
            "nbf in the future",
            hs256(&claims(json!({ "nbf": now() + 60 }))),
            "not valid yet",
        ),
        ("no exp", hs256(&claims(json!({ "exp": null }))), "no exp"),
        (
            "wrong iss",
            hs256(&claims(json!({ "iss": "https://evil.test" }))),
            "issuer",
        ),
        (
            "wrong aud",
            hs256(&claims(json!({ "aud": "other" }))),
            "audience",
        ),
        ("alg none", none_token, "alg none"),
        (
            "alg not allowed",
            sign(
                jsonwebtoken::Algorithm::HS384,
                None,
                &claims(json!({})),
                &secret(SECRET.as_bytes()),
            ),
            "\"HS384\" is not allowed",
        ),
    ];
    for (case, token, reason) in &cases {
        let got = get_with(
            &node,
            "/x",
            &[
                ("authorization", &format!("Bearer {token}")),
                ("x-user-id", "admin"),
            ],
        )
        .await?;
        assert_invalid(&got, reason);
        assert_eq!(got.header("cache-control"), Some("no-store"), "{case}");
        assert_eq!(app.count(), 0, "{case} reached the upstream");
    }

    // A valid token without the required scope.
    let got = get_bearer(&node, "/x", &hs256(&claims(json!({ "scope": "write" })))).await?;
    assert_eq!(got.status, 403);
    let challenge = got.header("www-authenticate").unwrap();
    assert!(
        challenge.contains("error=\"insufficient_scope\""),
        "{challenge}"
    );
    assert!(challenge.contains("scope=\"read\""), "{challenge}");
    assert_eq!(got.json()["error"], "insufficient_scope");
    assert_eq!(app.count(), 0);

    // A valid token whose subject is empty names no user.
    for sub in ["", "  "] {
        let got = get_bearer(&node, "/x", &hs256(&claims(json!({ "sub": sub })))).await?;
        assert_eq!(got.status, 403, "sub {sub:?}: {:?}", got.body);
        assert_eq!(got.json()["error"], "insufficient_scope");
        let message = got.json()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        assert!(message.contains("no usable sub claim"), "{message}");
    }
    assert_eq!(app.count(), 0);
    Ok(())
}

#[tokio::test]
async fn jwt_sub_must_be_string() -> Result {
    let app = Upstream::echo().await;
    let node = start_hmac_node(&app, "")?;
    for sub in [json!(7), json!({ "id": "user-7" }), Value::Null] {
        let mut payload = claims(json!({}));
        payload["sub"] = sub.clone();
        let got = get_bearer(&node, "/x", &hs256(&payload)).await?;
        assert_invalid_exactly(
            &got,
            "edge-api",
            "the sub claim is not a string; RFC 7519 requires a StringOrURI",
        );
    }
    assert_eq!(
        app.count(),
        0,
        "a token whose sub is not a string reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn jwt_numeric_dates_out_of_range() -> Result {
    let app = Upstream::echo().await;
    let node = start_hmac_node(&app, "")?;
    let base = r#""sub":"user-7","iss":"https://idp.test","aud":"api","scope":"read""#;
    let exp = now() + 300;
    let out_of_range = "the number is out of range";
    let cases = [
        (format!(r#"{{{base},"exp":1e400}}"#), "exp", out_of_range),
        (
            format!(r#"{{{base},"exp":18446744073709551616}}"#),
            "exp",
            out_of_range,
        ),
        (
            format!(r#"{{{base},"exp":{exp},"nbf":-1e400}}"#),
            "nbf",
            out_of_range,
        ),
        (
            format!(r#"{{{base},"exp":{exp},"iat":1e400}}"#),
            "iat",
            out_of_range,
        ),
        (
            format!(r#"{{{base},"exp":{exp},"iat":"yesterday"}}"#),
            "iat",
            "it is not a number",
        ),
    ];
    for (payload, claim, reason) in &cases {
        let got = get_bearer(&node, "/x", &hs256_text(payload)).await?;
        let message = format!("the {claim} claim is not a valid NumericDate: {reason}");
        assert_invalid_exactly(&got, "edge-api", &message);
    }
    assert_eq!(
        app.count(),
        0,
        "a token with an invalid NumericDate reached the upstream"
    );

    // The same payload with dates in range passes, so the signing above is
    // sound.
    let payload = format!(r#"{{{base},"exp":{exp},"iat":{}}}"#, now());
    let got = get_bearer(&node, "/x", &hs256_text(&payload)).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    Ok(())
}

#[tokio::test]
async fn jwt_required_claims_compare_numbers_by_value() -> Result {
    let app = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n\n{}",
        app.addr,
        route(
            "claims",
            "/",
            "algorithms = [\"HS256\"]\nhmac_secret_name = \"jwt_key\"\n\
             required_claims = { n = 1, half = 0.5, tier = \"1\" }\n\
             [routes.workers.secrets]\njwt_key = { env = \"JWT_TEST_KEY\" }",
            "",
        )
    );
    let node = Node::start_with_env(&config, &[("JWT_TEST_KEY", SECRET)])?;
    let with = |n: Value, half: Value, tier: Value| {
        hs256(&claims(json!({ "n": n, "half": half, "tier": tier })))
    };

    for (n, half) in [
        (json!(1), json!(0.5)),
        (json!(1.0), json!(0.5)),
        (json!([3, 1.0]), json!([0.5])),
    ] {
        let got = get_bearer(&node, "/x", &with(n.clone(), half, json!("1"))).await?;
        assert_eq!(got.status, 200, "n {n}: {:?}", got.body);
    }
    assert_eq!(app.count(), 3);

    // A number other than 1, and the string "1", do not match n = 1. The
    // number 1 does not match tier = "1".
    for (n, tier, message) in [
        (json!(1.5), json!("1"), "the token's n claim is not 1"),
        (json!("1"), json!("1"), "the token's n claim is not 1"),
        (json!(1), json!(1), "the token's tier claim is not \"1\""),
    ] {
        let got = get_bearer(&node, "/x", &with(n.clone(), json!(0.5), tier)).await?;
        assert_eq!(got.status, 403, "n {n}: {:?}", got.body);
        assert_eq!(
            got.json(),
            json!({ "error": "insufficient_scope", "message": message })
        );
        let description = message.replace('"', "'");
        assert_eq!(
            got.header("www-authenticate"),
            Some(
                format!(
                    "Bearer realm=\"claims\", error=\"insufficient_scope\", \
                     error_description=\"{description}\""
                )
                .as_str()
            )
        );
    }
    assert_eq!(
        app.count(),
        3,
        "a token without the required claims reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn jwt_valid_token_strips_spoofed_headers() -> Result {
    let app = Upstream::echo().await;
    let node = start_hmac_node(&app, "")?;
    let spoofed = [("x-user-id", "admin"), ("x-user-email", "root@example.com")];

    let token = hs256(&claims(json!({ "aud": ["web", "x"] })));
    let authorization = format!("Bearer {token}");
    let mut headers = vec![("authorization", authorization.as_str())];
    headers.extend(spoofed);
    let got = get_with(&node, "/x", &headers).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    let seen = app.last().headers;
    assert_eq!(seen.get_all("x-user-id").iter().count(), 1);
    assert_eq!(seen["x-user-id"], "user-7");
    assert_eq!(seen["x-user-email"], "u7@example.com");

    // A token without the mapped claim: the client's value is removed, not
    // passed on.
    let token = hs256(&claims(json!({ "email": null })));
    let authorization = format!("Bearer {token}");
    let mut headers = vec![("authorization", authorization.as_str())];
    headers.extend(spoofed);
    assert_eq!(get_with(&node, "/x", &headers).await?.status, 200);
    let seen = app.last().headers;
    assert_eq!(seen["x-user-id"], "user-7");
    assert!(seen.get("x-user-email").is_none());

    // From the configured cookie, within the leeway of an expired token.
    let token = hs256(&claims(json!({ "exp": now() - 2 })));
    let cookie = format!("theme=dark; session={token}");
    let got = get_with(&node, "/x", &[("cookie", &cookie), ("x-user-id", "admin")]).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(app.last().headers["x-user-id"], "user-7");
    assert_eq!(app.count(), 2 + 1);

    // An empty cookie of the same name before the one with the token does
    // not hide it.
    let cookie = format!("session=; theme=dark; session={token}");
    let got = get_with(&node, "/x", &[("cookie", &cookie)]).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(app.count(), 3 + 1);

    // A second token the worker did not check never reaches the upstream,
    // which might read that one instead.
    let forged = hs256(&claims(json!({ "sub": "admin" })))
        .rsplit_once('.')
        .map(|(signed, _)| format!("{signed}.AAAA"))
        .unwrap_or_default();
    let valid = hs256(&claims(json!({})));
    let bearer = format!("Bearer {valid}");
    let two_cookies = format!("session={valid}; session={forged}");
    let bearer_and_cookie = format!("session={forged}");
    // Cookie parsers read `session =x` as the cookie `session`.
    let bearer_and_spaced_cookie = format!("session ={forged}");
    let forged_bearer = format!("Bearer {forged}");
    let valid_cookie = format!("session={valid}");
    // Upstreams that split the scheme on any blank or a colon read these as
    // bearer tokens too, so they may not hide behind the checked cookie.
    let tab_bearer = format!("Bearer\t{forged}");
    let colon_bearer = format!("Bearer:{forged}");
    let glued_bearer = format!("Bearer{forged}");
    let other_scheme = format!("JWT {forged}");
    // Cookie names that ASP.NET (case), PHP (percent-decoding) or an
    // RFC 2965 parser (commas) read as `session`.
    let upper_cookie = format!("SESSION={forged}; session={valid}");
    let encoded_cookie = format!("s%65ssion={forged}; session={valid}");
    let comma_cookie = format!("x=1,session={forged}; session={valid}");
    let cases: [(&str, Vec<(&str, &str)>); 11] = [
        (
            "a cookie token and a bearer token after a tab",
            vec![("cookie", &valid_cookie), ("authorization", &tab_bearer)],
        ),
        (
            "a cookie token and a bearer token after a colon",
            vec![("cookie", &valid_cookie), ("authorization", &colon_bearer)],
        ),
        (
            "a cookie token and a bearer token glued to the scheme",
            vec![("cookie", &valid_cookie), ("authorization", &glued_bearer)],
        ),
        (
            "a cookie token and a token of another scheme",
            vec![("cookie", &valid_cookie), ("authorization", &other_scheme)],
        ),
        ("an upper-case cookie name", vec![("cookie", &upper_cookie)]),
        (
            "a percent-encoded cookie name",
            vec![("cookie", &encoded_cookie)],
        ),
        ("a cookie after a comma", vec![("cookie", &comma_cookie)]),
        (
            "two Authorization headers",
            vec![
                ("authorization", &bearer),
                ("authorization", &forged_bearer),
            ],
        ),
        ("two token cookies", vec![("cookie", &two_cookies)]),
        (
            "a bearer token and another in the cookie",
            vec![("authorization", &bearer), ("cookie", &bearer_and_cookie)],
        ),
        (
            "a bearer token and another in a cookie with a blank after its name",
            vec![
                ("authorization", &bearer),
                ("cookie", &bearer_and_spaced_cookie),
            ],
        ),
    ];
    for (case, headers) in &cases {
        let got = get_with(&node, "/x", headers).await?;
        assert_eq!(got.status, 401, "{case}: {:?}", got.body);
        assert_eq!(got.json()["error"], "invalid_token", "{case}");
    }
    assert_eq!(
        app.count(),
        3 + 1,
        "a request with two tokens reached the upstream"
    );
    Ok(())
}

/// The test's public-key pairs and the PEM or JWK forms the node gets.
struct Keys {
    rsa: EncodingKey,
    rsa_public_pem: String,
    p256: EncodingKey,
    p256_public_pem: String,
    p384: EncodingKey,
    p384_jwk: Value,
    ed: EncodingKey,
    ed_jwk: Value,
}

fn ec_jwk(pair: &EcdsaKeyPair, crv: &str, kid: &str) -> Value {
    let point = pair.public_key().as_ref();
    let size = (point.len() - 1) / 2;
    json!({
        "kty": "EC", "crv": crv, "kid": kid, "use": "sig",
        "x": b64(&point[1..1 + size]), "y": b64(&point[1 + size..]),
    })
}

fn rsa_jwk(pair: &RsaKeyPair, kid: &str) -> Value {
    let components: aws_lc_rs::rsa::PublicKeyComponents<Vec<u8>> = pair.public_key().into();
    json!({
        "kty": "RSA", "kid": kid, "alg": "RS256",
        "n": b64(&components.n), "e": b64(&components.e),
    })
}

fn rsa_pair() -> (RsaKeyPair, EncodingKey) {
    let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
    let der: Pkcs8V1Der = pair.as_der().unwrap();
    let key = EncodingKey::from_rsa_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap();
    (pair, key)
}

fn make_keys() -> Keys {
    let (rsa_pair, rsa) = rsa_pair();
    let rsa_public = rsa_pair.public_key().as_der().unwrap();
    let ec = |signing| {
        let pair = EcdsaKeyPair::generate(signing).unwrap();
        let der = pair.to_pkcs8v1().unwrap();
        let key = EncodingKey::from_ec_pem(pem("PRIVATE KEY", der.as_ref()).as_bytes()).unwrap();
        (pair, key)
    };
    let (p256_pair, p256) = ec(&aws_lc_rs::signature::ECDSA_P256_SHA256_FIXED_SIGNING);
    let p256_public = p256_pair.public_key().as_der().unwrap();
    let (p384_pair, p384) = ec(&aws_lc_rs::signature::ECDSA_P384_SHA384_FIXED_SIGNING);
    let ed_pair = Ed25519KeyPair::generate().unwrap();
    let ed_der = ed_pair.to_pkcs8v1().unwrap();
    let ed = EncodingKey::from_ed_pem(pem("PRIVATE KEY", ed_der.as_ref()).as_bytes()).unwrap();
    Keys {
        rsa,
        rsa_public_pem: pem("PUBLIC KEY", rsa_public.as_ref()),
        p256,
        p256_public_pem: pem("PUBLIC KEY", p256_public.as_ref()),
        p384,
        p384_jwk: ec_jwk(&p384_pair, "P-384", "p384"),
        ed,
        ed_jwk: json!({
            "kty": "OKP", "crv": "Ed25519", "kid": "ed",
            "x": b64(ed_pair.public_key().as_ref()),
        }),
    }
}

fn toml_string(text: &str) -> String {
    serde_json::to_string(text).unwrap()
}

#[tokio::test]
async fn jwt_public_key_algorithms_and_confusion() -> Result {
    let keys = make_keys();
    let app = Upstream::echo().await;
    let jwks = json!({ "keys": [keys.p384_jwk, keys.ed_jwk] }).to_string();
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n\n{}{}{}",
        app.addr,
        // HS256 is on this list by mistake: the host still refuses to use the
        // RSA key as an HMAC secret.
        route(
            "rsa",
            "/rsa",
            &format!(
                "algorithms = [\"RS256\", \"PS256\", \"HS256\"]\npublic_key_pem = {}",
                toml_string(&keys.rsa_public_pem)
            ),
            "",
        ),
        route(
            "p256",
            "/p256",
            &format!(
                "algorithms = [\"ES256\"]\npublic_key_pem = {}",
                toml_string(&keys.p256_public_pem)
            ),
            "",
        ),
        route(
            "set",
            "/set",
            &format!(
                "algorithms = [\"ES384\", \"EdDSA\"]\njwks = {}",
                toml_string(&jwks)
            ),
            "",
        ),
    );
    let node = Node::start(&config)?;
    use jsonwebtoken::Algorithm as Alg;
    let claims = claims(json!({}));

    for (path, alg, kid, key) in [
        ("/rsa", Alg::RS256, None, &keys.rsa),
        ("/rsa", Alg::PS256, None, &keys.rsa),
        ("/p256", Alg::ES256, None, &keys.p256),
        ("/set", Alg::ES384, Some("p384"), &keys.p384),
        ("/set", Alg::EdDSA, Some("ed"), &keys.ed),
        // Without a kid, the one key that fits the algorithm.
        ("/set", Alg::EdDSA, None, &keys.ed),
    ] {
        let got = get_bearer(&node, path, &sign(alg, kid, &claims, key)).await?;
        assert_eq!(got.status, 200, "{path} {alg:?}: {:?}", got.body);
        assert_eq!(app.last().headers["x-user-id"], "user-7");
    }
    let accepted = app.count();

    // Algorithm confusion: an HS256 token whose HMAC secret is the RSA
    // public key's PEM text.
    let confused = sign(
        Alg::HS256,
        None,
        &claims,
        &secret(keys.rsa_public_pem.as_bytes()),
    );
    assert_invalid(
        &get_bearer(&node, "/rsa", &confused).await?,
        "algorithm does not fit",
    );
    // An ES256 token on the RSA route, and one signed by another P-256 key.
    let es = sign(Alg::ES256, None, &claims, &keys.p256);
    assert_invalid(
        &get_bearer(&node, "/rsa", &es).await?,
        "\"ES256\" is not allowed",
    );
    let other = make_keys();
    let forged = sign(Alg::ES256, None, &claims, &other.p256);
    assert_invalid(
        &get_bearer(&node, "/p256", &forged).await?,
        "signature is invalid",
    );
    // A kid the set lacks, and a kid whose key has another type.
    let unknown = sign(Alg::EdDSA, Some("nope"), &claims, &keys.ed);
    assert_invalid(
        &get_bearer(&node, "/set", &unknown).await?,
        "no key matches",
    );
    let wrong_type = sign(Alg::EdDSA, Some("p384"), &claims, &keys.ed);
    assert_invalid(
        &get_bearer(&node, "/set", &wrong_type).await?,
        "no key matches",
    );
    assert_eq!(
        app.count(),
        accepted,
        "a rejected request reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn jwt_jwk_hmac_key_too_short_for_algorithm() -> Result {
    // Without `alg`, an `oct` key loads with 32 bytes or more. HS384 needs
    // 48 (RFC 7518, section 3.2).
    let short = [b's'; 40];
    let long = [b'l'; 48];
    let jwks = json!({ "keys": [
        { "kty": "oct", "kid": "short", "k": b64(&short) },
        { "kty": "oct", "kid": "long", "k": b64(&long) },
    ] })
    .to_string();
    let app = Upstream::echo().await;
    let config = format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n\n{}",
        app.addr,
        route(
            "set",
            "/",
            &format!(
                "algorithms = [\"HS256\", \"HS384\"]\njwks = {}",
                toml_string(&jwks)
            ),
            "",
        ),
    );
    let node = Node::start(&config)?;
    use jsonwebtoken::Algorithm as Alg;
    let claims = claims(json!({}));

    let got = get_bearer(
        &node,
        "/x",
        &sign(Alg::HS384, Some("short"), &claims, &secret(&short)),
    )
    .await?;
    assert_invalid_exactly(
        &got,
        "set",
        "the token cannot be checked with this route's key",
    );
    let body = String::from_utf8_lossy(&got.body).into_owned();
    assert!(
        !body.contains("40 bytes"),
        "the client learns nothing about the key: {body}"
    );
    assert!(
        node.log_contains("the HMAC key has 40 bytes, and HS384 needs at least 48"),
        "{}",
        node.log()
    );
    assert_eq!(
        app.count(),
        0,
        "a token checked with a too short key reached the upstream"
    );

    // The short key still works with HS256, and a 48-byte key with HS384.
    for (alg, kid, key) in [
        (Alg::HS256, "short", &short[..]),
        (Alg::HS384, "long", &long[..]),
    ] {
        let got = get_bearer(&node, "/x", &sign(alg, Some(kid), &claims, &secret(key))).await?;
        assert_eq!(got.status, 200, "{alg:?} {kid}: {:?}", got.body);
    }
    assert_eq!(app.count(), 2);
    Ok(())
}

/// A loopback key server whose JWK set the test replaces, and which counts
/// the fetches it serves.
struct KeyServer {
    upstream: Upstream,
    /// Time each fetch waits before the response is sent.
    delay: Arc<Mutex<Duration>>,
    jwks: Arc<Mutex<String>>,
    fetches: Arc<AtomicUsize>,
    down: Arc<AtomicBool>,
}

impl KeyServer {
    async fn start(jwks: String, max_age: u64) -> KeyServer {
        let jwks = Arc::new(Mutex::new(jwks));
        let fetches = Arc::new(AtomicUsize::new(0));
        let down = Arc::new(AtomicBool::new(false));
        let delay = Arc::new(Mutex::new(Duration::ZERO));
        let (served, counted, failing) = (jwks.clone(), fetches.clone(), down.clone());
        let waiting = delay.clone();
        let upstream = Upstream::start(move |request| {
            if request.target != "/.well-known/jwks.json" {
                return Reply::Status(404);
            }
            counted.fetch_add(1, Ordering::SeqCst);
            // 500, not 503: the upstream's retry policy would send a GET
            // that got a 503 again, and the count here would show both.
            if failing.load(Ordering::SeqCst) {
                return Reply::Status(500);
            }
            let body = served.lock().unwrap().clone();
            let headers = vec![
                ("content-type", "application/json".to_owned()),
                ("cache-control", format!("public, max-age={max_age}")),
            ];
            let delay = *waiting.lock().unwrap();
            Reply::Delayed(delay, Box::new(Reply::Body(headers, body)))
        })
        .await;
        KeyServer {
            upstream,
            delay,
            jwks,
            fetches,
            down,
        }
    }

    fn fetches(&self) -> usize {
        self.fetches.load(Ordering::SeqCst)
    }
}

fn upstream_jwks_config(app: &Upstream, idp: &KeyServer) -> String {
    format!(
        "[upstreams.app]\ntargets = [\"{}\"]\n[upstreams.idp]\ntargets = [\"{}\"]\n\n{}",
        app.addr,
        idp.upstream.addr,
        route(
            "api",
            "/",
            "algorithms = [\"RS256\"]\njwks_upstream = \"idp\"\njwks_refetch_interval = \"1s\"",
            "fetch = [\"idp\"]",
        ),
    )
}

#[tokio::test]
async fn jwt_jwks_rotation_and_bounded_refetches() -> Result {
    let (first, first_key) = rsa_pair();
    let (second, second_key) = rsa_pair();
    let app = Upstream::echo().await;
    let idp = KeyServer::start(json!({ "keys": [rsa_jwk(&first, "k1")] }).to_string(), 300).await;
    let node = Node::start(&upstream_jwks_config(&app, &idp))?;
    let claims = claims(json!({}));
    let token = |key: &EncodingKey, kid: &str| {
        sign(jsonwebtoken::Algorithm::RS256, Some(kid), &claims, key)
    };

    // The first token fetches the set; the next ones use the cached copy.
    for _ in 0..3 {
        assert_eq!(
            get_bearer(&node, "/a", &token(&first_key, "k1"))
                .await?
                .status,
            200
        );
    }
    assert_eq!(idp.fetches(), 1);

    // The key server rotates to k2; a token naming k2 refetches the set once
    // the refetch interval has passed since the last fetch.
    *idp.jwks.lock().unwrap() = json!({ "keys": [rsa_jwk(&second, "k2")] }).to_string();
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let got = get_bearer(&node, "/a", &token(&second_key, "k2")).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(idp.fetches(), 2);
    let accepted = app.count();

    // A flood of unknown key ids causes at most one fetch per refetch
    // interval (1s here), however many tokens it sends.
    let flood = std::time::Instant::now();
    for round in 0..40 {
        let kid = format!("unknown-{round}");
        let got = get_bearer(&node, "/a", &token(&second_key, &kid)).await?;
        assert_invalid(&got, "no key matches");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let intervals = flood.elapsed().as_secs_f64().floor() as usize;
    let flood_fetches = idp.fetches() - 2;
    assert!(
        flood_fetches <= intervals + 1,
        "{flood_fetches} fetches for 40 unknown key ids in {intervals} intervals"
    );
    assert!(
        flood_fetches < 10,
        "{flood_fetches} fetches for 40 unknown key ids"
    );
    // k1 has rotated out.
    assert_invalid(
        &get_bearer(&node, "/a", &token(&first_key, "k1")).await?,
        "no key matches",
    );
    assert_eq!(
        app.count(),
        accepted,
        "a rejected request reached the upstream"
    );
    Ok(())
}

#[tokio::test]
async fn jwt_jwks_server_down_keeps_last_good_keys() -> Result {
    let (pair, key) = rsa_pair();
    let app = Upstream::echo().await;
    // A max-age of 1s makes the copy stale quickly, so the node refetches.
    let idp = KeyServer::start(json!({ "keys": [rsa_jwk(&pair, "k1")] }).to_string(), 1).await;
    let node = Node::start(&upstream_jwks_config(&app, &idp))?;
    let token = sign(
        jsonwebtoken::Algorithm::RS256,
        Some("k1"),
        &claims(json!({})),
        &key,
    );
    assert_eq!(get_bearer(&node, "/a", &token).await?.status, 200);
    assert_eq!(idp.fetches(), 1);

    idp.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let started = std::time::Instant::now();
    for _ in 0..3 {
        let got = get_bearer(&node, "/a", &token).await?;
        assert_eq!(got.status, 200, "{:?}", got.body);
    }
    // One failed fetch, then at most one per refetch interval (1s).
    let intervals = started.elapsed().as_secs_f64().floor() as usize;
    assert!(idp.fetches() >= 2, "the stale set was not fetched again");
    assert!(idp.fetches() <= 2 + intervals, "{} fetches", idp.fetches());
    assert!(
        node.log_contains("failed to fetch key set"),
        "{}",
        node.log()
    );

    // A fresh node with the key server down has no keys to fall back on.
    let cold = Node::start(&upstream_jwks_config(&app, &idp))?;
    let before = app.count();
    assert_invalid(
        &get_bearer(&cold, "/a", &token).await?,
        "cannot be checked now",
    );
    assert_eq!(app.count(), before);
    Ok(())
}

#[tokio::test]
async fn jwt_jwks_fetch_wait_is_not_cpu_time() -> Result {
    let (pair, key) = rsa_pair();
    let app = Upstream::echo().await;
    let idp = KeyServer::start(json!({ "keys": [rsa_jwk(&pair, "k1")] }).to_string(), 300).await;
    *idp.delay.lock().unwrap() = Duration::from_millis(300);
    // The fetch takes 300 ms, six times the worker's CPU deadline.
    let config = upstream_jwks_config(&app, &idp).replace(
        "fetch = [\"idp\"]",
        "fetch = [\"idp\"]\ncpu_deadline = \"50ms\"",
    );
    assert!(config.contains("cpu_deadline"));
    let node = Node::start(&config)?;
    let token = sign(
        jsonwebtoken::Algorithm::RS256,
        Some("k1"),
        &claims(json!({})),
        &key,
    );
    let got = get_bearer(&node, "/a", &token).await?;
    assert_eq!(got.status, 200, "{:?}", got.body);
    assert_eq!(idp.fetches(), 1);
    Ok(())
}

#[tokio::test]
async fn jwt_user_limit_counts_per_subject() -> Result {
    let app = Upstream::echo().await;
    let limit = "[[routes.limits]]\nname = \"per-user\"\nkey = \"context:user\"\n\
                 algorithm = \"fixed_window\"\nrate = \"2/min\"\n";
    let node = start_hmac_node(&app, limit)?;
    let alice = hs256(&claims(json!({ "sub": "alice" })));
    let bob = hs256(&claims(json!({ "sub": "bob" })));

    assert_eq!(get_bearer(&node, "/a", &alice).await?.status, 200);
    assert_eq!(get_bearer(&node, "/a", &alice).await?.status, 200);
    let refused = get_bearer(&node, "/a", &alice).await?;
    assert_eq!(refused.status, 429);
    assert_eq!(refused.json()["limit"], "per-user");
    assert_eq!(app.count(), 2);
    // The same client address with another subject has its own count.
    assert_eq!(get_bearer(&node, "/a", &bob).await?.status, 200);
    assert_eq!(app.last().headers["x-user-id"], "bob");
    assert_eq!(app.count(), 3);
    Ok(())
}

#[tokio::test]
async fn jwt_config_errors_stop_node() -> Result {
    let app = Upstream::echo().await;
    // A 1024-bit key, which RS256 verification never accepts.
    let rsa_1024 = "-----BEGIN PUBLIC KEY-----\n\
        MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDs1I3pahulZXV+FkXHV0XSeyVh\n\
        vhT0MzW7W+UMI+h0Xf6BAkvpepxiZp1uXux6iE0WGMGtHTqFMiyqO5wQS5RtD4we\n\
        knx61YLQNFoh2jMdMGOHsdLbDFnEhN3Mmll66PhjVBU73TaBHdZHjWoesozlwHzw\n\
        T461xr0DXgrO/yqxmwIDAQAB\n\
        -----END PUBLIC KEY-----\n";
    let rsa_1024_config = format!(
        "algorithms = [\"RS256\"]\npublic_key_pem = {}",
        toml_string(rsa_1024)
    );
    let cases = [
        (
            "algorithms = [\"RS256\"]\njwks_upstream = \"idp\"",
            "fetch = [\"idp\"]",
            "no upstream named \"idp\"",
        ),
        (
            "algorithms = [\"none\"]\npublic_key_pem = \"x\"",
            "",
            "\"none\" is not supported",
        ),
        (
            "algorithms = [\"RS256\"]\npublic_key_pem = \"x\"",
            "",
            "invalid jwt-auth key",
        ),
        (
            "algorithms = [\"HS256\"]\nhmac_secret_name = \"missing\"",
            "",
            "no secret named \"missing\"",
        ),
        (
            "algorithms = [\"HS256\", \"HS384\"]\nhmac_secret_name = \"short\"\n\
             [routes.workers.secrets]\nshort = \"only-thirty-three-bytes-of-secret\"",
            "",
            "has 33 bytes, and HS384 needs at least 48",
        ),
        (
            &rsa_1024_config,
            "",
            "the RSA key has 1024 bits; use a key of 2048 to 8192 bits",
        ),
    ];
    for (config, extra, expected) in cases {
        let text = format!(
            "[upstreams.app]\ntargets = [\"{}\"]\n\n{}",
            app.addr,
            route("api", "/", config, extra)
        );
        let Err(error) = Node::start(&text) else {
            panic!("the node started with {config:?}");
        };
        let error = error.to_string();
        assert!(error.contains(expected), "{error}");
    }
    Ok(())
}
