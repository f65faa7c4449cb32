//! JWK sets: parsed from inline JSON, or fetched from an upstream the
//! worker's route entry allows and cached across requests, with refetches
//! spaced so that a flood of unknown key ids cannot hammer the key server.

use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{header, HeaderValue, Request};
use http_body_util::{BodyExt, Limited};

use super::key::{Algorithm, Jwk, Key};
use super::KeyCache;
use crate::proxy::{RequestBody, Upstream};
use crate::worker::LogThrottle;

/// The largest JWK set body the host reads.
const MAX_KEY_SET_BYTES: usize = 1 << 20;
/// Maximum time a fetch of a key set may take, whatever the upstream's
/// response timeout.
pub const MAX_FETCH_TIME: Duration = Duration::from_secs(5);
/// Minimum time between two fetches of one key set.
const MIN_REFETCH_INTERVAL: Duration = Duration::from_secs(1);
/// Maximum time a fetched key set counts as fresh.
const MAX_AGE_CAP: Duration = Duration::from_secs(24 * 60 * 60);

/// The keys of a JWK set, each with its `kid`.
#[derive(Debug, Default)]
pub struct KeySet {
    entries: Vec<(Option<String>, Arc<Key>)>,
}

impl KeySet {
    /// Parses a JWK set. Keys this host cannot use are skipped; a set with
    /// none it can use is an error.
    pub fn parse(text: &str, keys: &KeyCache) -> Result<KeySet, String> {
        #[derive(serde::Deserialize)]
        struct Jwks {
            keys: Vec<serde_json::Value>,
        }
        let jwks: Jwks =
            serde_json::from_str(text).map_err(|e| format!("invalid JWK set JSON: {e}"))?;
        let mut entries = Vec::new();
        let mut skipped = Vec::new();
        for (index, value) in jwks.keys.into_iter().enumerate() {
            let jwk: Jwk = match serde_json::from_value(value.clone()) {
                Ok(jwk) => jwk,
                Err(error) => {
                    skipped.push(format!("keys[{index}]: {error}"));
                    continue;
                }
            };
            if jwk.use_.as_deref().is_some_and(|use_| use_ != "sig") {
                continue;
            }
            let material = value.to_string();
            match keys.get_or_parse(b"jwk", material.as_bytes(), |id| {
                Key::from_parsed_jwk(&jwk, id)
            }) {
                Ok(key) => entries.push((jwk.kid, key)),
                Err(error) => skipped.push(format!("keys[{index}]: {error}")),
            }
        }
        if entries.is_empty() {
            let reason = if skipped.is_empty() {
                "it has no signature keys".to_owned()
            } else {
                skipped.join("; ")
            };
            return Err(format!("no usable key in the JWK set: {reason}"));
        }
        Ok(KeySet { entries })
    }

    /// Finds the key with `kid` that accepts `alg`; without a `kid`, the one
    /// key that accepts `alg`, when exactly one does.
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Arc<Key>> {
        let mut fitting = self.entries.iter().filter(|(_, key)| key.accepts(alg));
        match kid {
            Some(kid) => fitting
                .find(|(entry_kid, _)| entry_kid.as_deref() == Some(kid))
                .map(|(_, key)| key.clone()),
            None => match (fitting.next(), fitting.next()) {
                (Some((_, key)), None) => Some(key.clone()),
                _ => None,
            },
        }
    }
}

/// The cache and refetch settings a worker gave for a remote key set.
#[derive(Debug, Clone, Copy)]
pub struct FetchOptions {
    pub min_refetch_interval: Duration,
    pub default_max_age: Duration,
}

impl FetchOptions {
    /// Holds the worker's values to the host's bounds.
    pub fn new(min_refetch_interval_ms: u32, default_max_age_ms: u32) -> FetchOptions {
        let min_refetch_interval = Duration::from_millis(min_refetch_interval_ms.into())
            .clamp(MIN_REFETCH_INTERVAL, MAX_AGE_CAP);
        FetchOptions {
            min_refetch_interval,
            default_max_age: Duration::from_millis(default_max_age_ms.into()),
        }
    }
}

/// A key set served by an upstream, shared by every call that names the
/// same upstream and path.
pub struct RemoteKeySet {
    upstreams: Arc<[Upstream]>,
    /// Index of the upstream in `upstreams`.
    index: usize,
    path: String,
    state: Mutex<RemoteState>,
    /// Held while a fetch runs, so that calls wanting the same key set wait
    /// for one fetch instead of each sending their own.
    fetching: tokio::sync::Mutex<()>,
    failures: LogThrottle,
}

impl std::fmt::Debug for RemoteKeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RemoteKeySet")
            .field("upstream", &self.upstreams[self.index].name)
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct RemoteState {
    /// The last key set fetched successfully.
    current: Option<Arc<KeySet>>,
    fresh_until: Option<Instant>,
    /// When the last fetch started, successful or not.
    last_attempt: Option<Instant>,
    last_error: Option<String>,
    /// Fetches sent, for logs.
    fetches: u64,
}

/// The reason [`RemoteKeySet::get`] has no key set to return.
#[derive(Debug)]
pub struct FetchFailed(pub String);

/// The cause of a key set fetch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// There is no copy yet, or the copy has expired.
    Refresh,
    /// A token names a key id that the current copy lacks.
    UnknownKid,
}

impl RemoteKeySet {
    /// Describes the key set at `path` on `upstreams[index]`; nothing is
    /// fetched until the first [`RemoteKeySet::get`].
    pub fn new(upstreams: Arc<[Upstream]>, index: usize, path: String) -> RemoteKeySet {
        RemoteKeySet {
            upstreams,
            index,
            path,
            state: Mutex::new(RemoteState::default()),
            fetching: tokio::sync::Mutex::new(()),
            failures: LogThrottle::default(),
        }
    }

    /// Returns the cached key set while it is fresh, otherwise fetches it
    /// (at most once per `min_refetch_interval`), falling back to the last
    /// good copy when the fetch fails.
    pub async fn get(
        &self,
        options: FetchOptions,
        reason: Reason,
        keys: &KeyCache,
    ) -> Result<Arc<KeySet>, FetchFailed> {
        let now = Instant::now();
        let copy = {
            let state = self.state.lock().expect("key set state poisoned");
            let fresh = state.fresh_until.is_some_and(|until| now < until);
            if fresh && reason == Reason::Refresh {
                return state
                    .current
                    .clone()
                    .ok_or_else(|| FetchFailed("no copy".into()));
            }
            if !self.may_fetch(&state, options, now) {
                return state.current.clone().ok_or_else(|| {
                    FetchFailed(format!(
                        "the last fetch failed: {}",
                        state.last_error.as_deref().unwrap_or("unknown error")
                    ))
                });
            }
            state.current.clone()
        };
        // With a copy in hand, do not wait behind another call's fetch.
        let _fetching = match (&copy, self.fetching.try_lock()) {
            (_, Ok(guard)) => guard,
            (Some(copy), Err(_)) => return Ok(copy.clone()),
            (None, Err(_)) => {
                let waited = tokio::time::timeout(MAX_FETCH_TIME, self.fetching.lock()).await;
                let guard = waited.map_err(|_| FetchFailed("timed out waiting".into()))?;
                // The other call's fetch may have done the work.
                let state = self.state.lock().expect("key set state poisoned");
                if let Some(current) = &state.current {
                    return Ok(current.clone());
                }
                if !self.may_fetch(&state, options, Instant::now()) {
                    let error = state.last_error.clone().unwrap_or_default();
                    return Err(FetchFailed(format!("the last fetch failed: {error}")));
                }
                drop(state);
                guard
            }
        };
        {
            let mut state = self.state.lock().expect("key set state poisoned");
            // Another call may have fetched between the check and the lock.
            if state.last_attempt.is_some_and(|at| at > now) {
                return state
                    .current
                    .clone()
                    .ok_or_else(|| FetchFailed(state.last_error.clone().unwrap_or_default()));
            }
            state.last_attempt = Some(Instant::now());
            state.fetches += 1;
        }
        let fetched = self.fetch(keys).await;
        let mut state = self.state.lock().expect("key set state poisoned");
        match fetched {
            Ok((set, max_age)) => {
                let max_age = max_age
                    .unwrap_or(options.default_max_age)
                    .clamp(options.min_refetch_interval, MAX_AGE_CAP);
                let set = Arc::new(set);
                state.current = Some(set.clone());
                state.fresh_until = Some(Instant::now() + max_age);
                state.last_error = None;
                tracing::debug!(
                    upstream = %self.upstreams[self.index].name,
                    path = %self.path,
                    ?reason,
                    fetches = state.fetches,
                    "fetched key set"
                );
                Ok(set)
            }
            Err(error) => {
                if let Some(suppressed) = self.failures.admit() {
                    tracing::warn!(
                        upstream = %self.upstreams[self.index].name,
                        path = %self.path,
                        %error,
                        kept_last_good = state.current.is_some(),
                        suppressed,
                        "failed to fetch key set"
                    );
                }
                state.last_error = Some(error.clone());
                state.current.clone().ok_or(FetchFailed(error))
            }
        }
    }

    fn may_fetch(&self, state: &RemoteState, options: FetchOptions, now: Instant) -> bool {
        state
            .last_attempt
            .is_none_or(|at| now.duration_since(at) >= options.min_refetch_interval)
    }

    /// GETs the key set from the upstream and parses it, returning its
    /// `Cache-Control` max-age when it has one.
    async fn fetch(&self, keys: &KeyCache) -> Result<(KeySet, Option<Duration>), String> {
        let upstream = &self.upstreams[self.index];
        let timeout = upstream.settings.response_timeout.min(MAX_FETCH_TIME);
        let mut request = Request::new(RequestBody::empty());
        *request.uri_mut() = self
            .path
            .parse()
            .map_err(|e| format!("invalid path {:?}: {e}", self.path))?;
        let headers = request.headers_mut();
        if let Ok(host) = HeaderValue::from_str(&upstream.name) {
            headers.insert(header::HOST, host);
        }
        headers.insert(
            header::ACCEPT,
            HeaderValue::from_static("application/jwk-set+json, application/json"),
        );
        let client = IpAddr::V4(Ipv4Addr::LOCALHOST);
        let exchange = async {
            let response = upstream
                .send(request, client, Some(timeout))
                .await
                .map_err(|refusal| format!("upstream request failed: {}", refusal.code()))?;
            let status = response.status();
            let max_age = max_age(response.headers().get_all(header::CACHE_CONTROL).iter());
            let body: Bytes = Limited::new(response.into_body(), MAX_KEY_SET_BYTES)
                .collect()
                .await
                .map_err(|e| format!("reading the key set failed: {e}"))?
                .to_bytes();
            if status != http::StatusCode::OK {
                return Err(format!("the upstream answered {status}"));
            }
            let text = std::str::from_utf8(&body).map_err(|_| "the key set is not UTF-8")?;
            Ok((KeySet::parse(text, keys)?, max_age))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("timed out after {timeout:?}"))?
    }
}

/// Reads `max-age` from `Cache-Control` values; `no-store` and `no-cache`
/// count as 0.
fn max_age<'a>(values: impl Iterator<Item = &'a HeaderValue>) -> Option<Duration> {
    let mut found = None;
    for value in values.filter_map(|value| value.to_str().ok()) {
        for directive in value.split(',').map(str::trim) {
            let lower = directive.to_ascii_lowercase();
            if lower == "no-store" || lower == "no-cache" {
                return Some(Duration::ZERO);
            }
            if let Some(seconds) = lower.strip_prefix("max-age=") {
                if let Ok(seconds) = seconds.trim_matches('"').parse::<u64>() {
                    found = Some(Duration::from_secs(seconds));
                }
            }
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_age_reads_cache_control() {
        let values = [HeaderValue::from_static("public, max-age=600")];
        assert_eq!(max_age(values.iter()), Some(Duration::from_secs(600)));
        let values = [HeaderValue::from_static("max-age=60, no-cache")];
        assert_eq!(max_age(values.iter()), Some(Duration::ZERO));
        let values = [HeaderValue::from_static("public")];
        assert_eq!(max_age(values.iter()), None);
    }

    #[test]
    fn find_by_kid_and_alone() {
        let keys = KeyCache::new(16);
        let jwks = r#"{"keys":[
            {"kty":"oct","kid":"a","k":"c2VjcmV0LWEteHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4"},
            {"kty":"oct","kid":"b","k":"c2VjcmV0LWIteHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4","use":"sig"},
            {"kty":"oct","kid":"c","k":"c2VjcmV0LWMteHh4eHh4eHh4eHh4eHh4eHh4eHh4eHh4","use":"enc"}
        ]}"#;
        let set = KeySet::parse(jwks, &keys).unwrap();
        assert!(set.find(Some("a"), Algorithm::Hs256).is_some());
        assert!(set.find(Some("b"), Algorithm::Hs512).is_some());
        assert!(set.find(Some("c"), Algorithm::Hs256).is_none());
        assert!(set.find(Some("a"), Algorithm::Rs256).is_none());
        // Two keys fit HS256, so a token without a kid matches neither.
        assert!(set.find(None, Algorithm::Hs256).is_none());
    }

    #[test]
    fn set_without_usable_keys_is_an_error() {
        let keys = KeyCache::new(16);
        let error = KeySet::parse(r#"{"keys":[{"kty":"XYZ"}]}"#, &keys).unwrap_err();
        assert!(error.contains("unsupported kty"), "{error}");
        // An HMAC key shorter than HS256's 32 bytes is open to guessing.
        let error = KeySet::parse(r#"{"keys":[{"kty":"oct","k":"c2VjcmV0"}]}"#, &keys).unwrap_err();
        assert!(error.contains("the HMAC key has 6 bytes"), "{error}");
        assert!(KeySet::parse("[]", &keys).is_err());
    }
}
