//! Measures the CPU time of one jwt-auth worker call in a fresh instance,
//! without the network, next to the add-header worker: HS256, RS256 with
//! the same token on every call (the host's cache of verified signatures
//! returns the result), and RS256 with a new token on every call (a full RSA
//! verification each time).
//!
//! Usage: cargo bench -p edge --bench jwt_auth
//! Needs modules/ from scripts/build-workers.

mod common;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_lc_rs::encoding::{AsDer, Pkcs8V1Der};
use aws_lc_rs::signature::{KeyPair as _, RsaKeyPair};
use edge::worker::{wit, Binding, Runtime, RuntimeSettings, Secret};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

use common::thread_cpu_time;

/// Calls per round, unless the `CALLS` environment variable sets another number.
const CALLS: usize = 5_000;
const ROUNDS: usize = 5;
const SECRET: &str = "bench-secret-of-at-least-thirty-two-bytes";

fn request(authorization: Option<&str>) -> wit::Request {
    common::request(authorization.map(|value| ("authorization".to_owned(), value.to_owned())))
}

fn token(alg: Algorithm, key: &EncodingKey, id: usize) -> String {
    let exp = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let claims = serde_json::json!({
        "sub": "user-7", "iss": "https://idp.bench", "aud": "api", "exp": exp,
        "jti": id.to_string(),
    });
    format!(
        "Bearer {}",
        encode(&Header::new(alg), &claims, key).unwrap()
    )
}

/// Runs `requests` in turn, `ROUNDS` times, and returns the best round's CPU
/// time per call in microseconds.
async fn measure(runtime: &Runtime, binding: &Binding, requests: &[wit::Request]) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..ROUNDS {
        let started = thread_cpu_time();
        for request in requests {
            match runtime
                .on_request(
                    binding,
                    request,
                    &mut Default::default(),
                    Default::default(),
                )
                .await
            {
                Ok(wit::Action::Continue(_)) => {}
                other => panic!("the worker did not let the request through: {other:?}"),
            }
        }
        let cpu = (thread_cpu_time() - started).as_secs_f64() * 1e6 / requests.len() as f64;
        best = best.min(cpu);
    }
    best
}

fn main() -> anyhow::Result<()> {
    let repo = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let calls = std::env::var("CALLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(CALLS);
    let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048)?;
    let private: Pkcs8V1Der = pair.as_der()?;
    let private_pem = pem::encode(&pem::Pem::new("PRIVATE KEY", private.as_ref().to_vec()));
    let public = pair.public_key().as_der()?;
    let public_pem = pem::encode(&pem::Pem::new("PUBLIC KEY", public.as_ref().to_vec()));
    let rsa = EncodingKey::from_rsa_pem(private_pem.as_bytes())?;
    let hmac = EncodingKey::from_secret(SECRET.as_bytes())?;

    let common = "issuer = \"https://idp.bench\"\naudience = \"api\"\n";
    let hs_config = format!("algorithms = [\"HS256\"]\nhmac_secret_name = \"key\"\n{common}");
    let rs_config = format!(
        "algorithms = [\"RS256\"]\npublic_key_pem = {}\n{common}",
        serde_json::to_string(&public_pem)?
    );

    let cache = tempfile::tempdir()?;
    let runtime = Runtime::new(&RuntimeSettings {
        cache_dir: cache.path().to_owned(),
        read_only_cache: false,
        cache_retention: Default::default(),
        max_instances: 2,
        queue_limit: 2,
        queue_timeout: Duration::from_millis(20),
        max_memory: 64 << 20,
        upstreams: Default::default(),
        instance_pool: true,
    })?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        let bind = async |module: &str, config: &str| -> anyhow::Result<Binding> {
            let loaded = runtime.load(&repo.join("modules").join(module))?;
            let config: toml::Table = config.parse()?;
            let secrets = [("key".to_owned(), Secret(SECRET.to_owned()))].into();
            Ok(runtime
                .bind(
                    loaded,
                    Arc::from("bench"),
                    &config,
                    secrets,
                    Duration::from_secs(10),
                    16 << 20,
                    None,
                    Default::default(),
                )
                .await?)
        };
        let only = std::env::var("ONLY").unwrap_or_default();
        let add_header = bind("add-header.wasm", "headers = { \"x-bench\" = \"1\" }").await?;
        let hs = bind("jwt-auth.wasm", &hs_config).await?;
        let rs = bind("jwt-auth.wasm", &rs_config).await?;

        // `ONLY=RS256` (any part of a row's name) measures only the rows that match.
        let wanted = |name: &str| only.is_empty() || name.contains(only.as_str());
        let report = |name: &str, cpu: f64| {
            println!("{name}: {cpu:.2} µs CPU per call (best of {ROUNDS} rounds of {calls})");
        };
        let name = "add-header";
        if wanted(name) {
            report(
                name,
                measure(&runtime, &add_header, &vec![request(None); calls]).await,
            );
        }
        let name = "jwt-auth HS256";
        if wanted(name) {
            let same = vec![request(Some(&token(Algorithm::HS256, &hmac, 0))); calls];
            report(name, measure(&runtime, &hs, &same).await);
        }
        let name = "jwt-auth RS256, same token";
        if wanted(name) {
            let same = vec![request(Some(&token(Algorithm::RS256, &rsa, 0))); calls];
            report(name, measure(&runtime, &rs, &same).await);
        }
        let name = "RSA-2048 verification alone, native (no worker)";
        if wanted(name) {
            // The floor under a first-seen RS256 token: the verification the
            // host runs for it, with the key already parsed.
            let message = b"eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJ1c2VyLTcifQ";
            let mut signature = vec![0; pair.public_modulus_len()];
            pair.sign(
                &aws_lc_rs::signature::RSA_PKCS1_SHA256,
                &aws_lc_rs::rand::SystemRandom::new(),
                message,
                &mut signature,
            )?;
            let key = aws_lc_rs::signature::ParsedPublicKey::new(
                &aws_lc_rs::signature::RSA_PKCS1_2048_8192_SHA256,
                public.as_ref(),
            )?;
            let mut best = f64::MAX;
            for _ in 0..ROUNDS {
                let started = thread_cpu_time();
                for _ in 0..calls {
                    key.verify_sig(message, &signature)
                        .map_err(|_| anyhow::anyhow!("the signature does not verify"))?;
                }
                let cpu = (thread_cpu_time() - started).as_secs_f64() * 1e6 / calls as f64;
                best = best.min(cpu);
            }
            report(name, best);
        }
        let name = "jwt-auth RS256, new token per call";
        if wanted(name) {
            // A new token (a new jti) per call, and new ones for every round.
            let distinct: Vec<wit::Request> = (0..calls * ROUNDS)
                .map(|id| request(Some(&token(Algorithm::RS256, &rsa, id + 1))))
                .collect();
            // Each round must see tokens it has not verified before.
            let mut best = f64::MAX;
            for round in distinct.chunks(calls) {
                let started = thread_cpu_time();
                for request in round {
                    runtime
                        .on_request(&rs, request, &mut Default::default(), Default::default())
                        .await?;
                }
                let cpu = (thread_cpu_time() - started).as_secs_f64() * 1e6 / calls as f64;
                best = best.min(cpu);
            }
            report(name, best);
        }
        anyhow::Ok(())
    })
}
