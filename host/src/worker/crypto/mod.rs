//! The host side of the `crypto` import: key handles a worker makes from key
//! material, and native signing and verification with aws-lc-rs.
//!
//! Parsed keys are cached node-wide by the SHA-256 of their material, so a
//! fresh instance per request does not parse a key again. Signatures that
//! verified with a public key are remembered too, so a client that sends the
//! same token again costs a hash instead of an RSA or ECDSA operation. Key sets
//! fetched from upstreams are shared by every call that names the same
//! upstream and path. Every cache is bounded and drops its oldest entry when
//! full.

mod key;
mod key_set;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use sha2::{Digest, Sha256};
use wasmtime::component::Resource;

use super::bindings::edge::worker::crypto as wit;
use super::host_api::StoreState;
use crate::proxy::Upstream;
pub use key::{Algorithm, Key, KeyError, KeyType};
pub use key_set::{FetchOptions, KeySet, Reason, RemoteKeySet};

/// Parsed keys kept across requests.
const KEY_CACHE_ENTRIES: usize = 4096;
/// Verified public-key signatures kept across requests.
const VERIFIED_CACHE_ENTRIES: usize = 16384;
/// Distinct upstream key sets (upstream and path) kept across requests.
const REMOTE_KEY_SETS: usize = 256;

/// The crypto state a node shares between all calls.
#[derive(Debug)]
pub struct HostCrypto {
    keys: KeyCache,
    verified: BoundedSet,
    remote: Mutex<BoundedMap<(usize, String), Arc<RemoteKeySet>>>,
}

impl Default for HostCrypto {
    fn default() -> Self {
        HostCrypto {
            keys: KeyCache::new(KEY_CACHE_ENTRIES),
            verified: BoundedSet::new(VERIFIED_CACHE_ENTRIES),
            remote: Mutex::new(BoundedMap::new(REMOTE_KEY_SETS)),
        }
    }
}

/// The upstreams one worker binding may fetch key sets from: those named in
/// its route entry's `upstreams`.
#[derive(Debug, Clone, Default)]
pub struct AllowedUpstreams {
    upstreams: Option<Arc<[Upstream]>>,
    names: Vec<String>,
}

impl AllowedUpstreams {
    /// Allows the upstreams in `names`, out of the node's `upstreams`.
    pub fn new(upstreams: Arc<[Upstream]>, names: Vec<String>) -> AllowedUpstreams {
        AllowedUpstreams {
            upstreams: Some(upstreams),
            names,
        }
    }

    /// Finds an allowed upstream by name, returning the list and its index.
    fn find(&self, name: &str) -> Option<(Arc<[Upstream]>, usize)> {
        if !self.names.iter().any(|allowed| allowed == name) {
            return None;
        }
        let upstreams = self.upstreams.as_ref()?;
        let index = upstreams.iter().position(|u| u.name == name)?;
        Some((upstreams.clone(), index))
    }
}

/// A key in a store's resource table.
pub struct KeyHandle(Arc<Key>);

/// A key set in a store's resource table.
pub struct KeySetHandle {
    set: Arc<KeySet>,
    /// The remote key set and its fetch options, for a set from an upstream.
    remote: Option<(Arc<RemoteKeySet>, FetchOptions)>,
}

/// Parsed keys by the SHA-256 of their kind and material.
#[derive(Debug)]
pub struct KeyCache {
    entries: Mutex<BoundedMap<[u8; 32], Arc<Key>>>,
}

impl KeyCache {
    /// Creates a cache of at most `capacity` keys.
    pub fn new(capacity: usize) -> KeyCache {
        KeyCache {
            entries: Mutex::new(BoundedMap::new(capacity)),
        }
    }

    /// Returns the cached key for `material`, or parses it with `parse`
    /// (given the cache id) and caches it. Failures are not cached.
    pub fn get_or_parse(
        &self,
        kind: &[u8],
        material: &[u8],
        parse: impl FnOnce([u8; 32]) -> Result<Key, KeyError>,
    ) -> Result<Arc<Key>, KeyError> {
        let mut hasher = Sha256::new();
        hasher.update(kind);
        hasher.update([0]);
        hasher.update(material);
        let id: [u8; 32] = hasher.finalize().into();
        if let Some(key) = self.entries.lock().expect("key cache poisoned").get(&id) {
            return Ok(key.clone());
        }
        // Parse outside the lock: an RSA key takes tens of microseconds.
        let key = Arc::new(parse(id)?);
        self.entries
            .lock()
            .expect("key cache poisoned")
            .insert(id, key.clone());
        Ok(key)
    }
}

/// A map that drops its oldest entry when full.
#[derive(Debug)]
struct BoundedMap<K, V> {
    capacity: usize,
    map: HashMap<K, V>,
    order: VecDeque<K>,
}

impl<K: std::hash::Hash + Eq + Clone, V> BoundedMap<K, V> {
    fn new(capacity: usize) -> Self {
        BoundedMap {
            capacity,
            map: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    fn get(&self, key: &K) -> Option<&V> {
        self.map.get(key)
    }

    fn insert(&mut self, key: K, value: V) {
        if self.map.insert(key.clone(), value).is_some() {
            return;
        }
        self.order.push_back(key);
        while self.order.len() > self.capacity {
            if let Some(oldest) = self.order.pop_front() {
                self.map.remove(&oldest);
            }
        }
    }
}

/// The hashes of a [`BoundedSet`], and the order they were added in.
#[derive(Debug, Default)]
struct SetAndOrder {
    set: HashSet<[u8; 32]>,
    order: VecDeque<[u8; 32]>,
}

/// A set of hashes that drops its oldest entry when full.
#[derive(Debug)]
struct BoundedSet {
    capacity: usize,
    inner: Mutex<SetAndOrder>,
}

impl BoundedSet {
    fn new(capacity: usize) -> BoundedSet {
        BoundedSet {
            capacity,
            inner: Mutex::new(SetAndOrder::default()),
        }
    }

    fn contains(&self, hash: &[u8; 32]) -> bool {
        self.inner.lock().expect("set poisoned").set.contains(hash)
    }

    fn insert(&self, hash: [u8; 32]) {
        let mut inner = self.inner.lock().expect("set poisoned");
        let SetAndOrder { set, order } = &mut *inner;
        if set.insert(hash) {
            order.push_back(hash);
            if order.len() > self.capacity {
                if let Some(oldest) = order.pop_front() {
                    set.remove(&oldest);
                }
            }
        }
    }
}

impl HostCrypto {
    /// Verifies with `key`, using the cache of verified signatures for
    /// public keys.
    fn verify(
        &self,
        key: &Key,
        alg: Algorithm,
        message: &[u8],
        signature: &[u8],
    ) -> Result<bool, KeyError> {
        if key.key_type() == KeyType::Hmac || !key.accepts(alg) {
            // An HMAC costs about as much as the hash that would look it up.
            return key.verify(alg, message, signature);
        }
        let mut hasher = Sha256::new();
        hasher.update(key.id);
        hasher.update([alg as u8]);
        hasher.update((message.len() as u64).to_be_bytes());
        hasher.update(message);
        hasher.update(signature);
        let hash: [u8; 32] = hasher.finalize().into();
        if self.verified.contains(&hash) {
            return Ok(true);
        }
        let valid = key.verify(alg, message, signature)?;
        if valid {
            self.verified.insert(hash);
        }
        Ok(valid)
    }

    fn remote_key_set(
        &self,
        upstreams: Arc<[Upstream]>,
        index: usize,
        path: String,
    ) -> Arc<RemoteKeySet> {
        let mut remote = self.remote.lock().expect("key set map poisoned");
        let id = (index, path);
        if let Some(set) = remote.get(&id) {
            return set.clone();
        }
        let set = Arc::new(RemoteKeySet::new(upstreams, index, id.1.clone()));
        remote.insert(id, set.clone());
        set
    }
}

fn algorithm(alg: wit::Algorithm) -> Algorithm {
    match alg {
        wit::Algorithm::Hs256 => Algorithm::Hs256,
        wit::Algorithm::Hs384 => Algorithm::Hs384,
        wit::Algorithm::Hs512 => Algorithm::Hs512,
        wit::Algorithm::Rs256 => Algorithm::Rs256,
        wit::Algorithm::Rs384 => Algorithm::Rs384,
        wit::Algorithm::Rs512 => Algorithm::Rs512,
        wit::Algorithm::Ps256 => Algorithm::Ps256,
        wit::Algorithm::Ps384 => Algorithm::Ps384,
        wit::Algorithm::Ps512 => Algorithm::Ps512,
        wit::Algorithm::Es256 => Algorithm::Es256,
        wit::Algorithm::Es384 => Algorithm::Es384,
        wit::Algorithm::EdDsa => Algorithm::EdDsa,
    }
}

fn key_error(error: KeyError) -> wit::Error {
    match error {
        KeyError::Invalid(message) => wit::Error::InvalidKey(message),
        KeyError::AlgorithmMismatch => wit::Error::AlgorithmMismatch,
        KeyError::NotASigningKey => wit::Error::NotASigningKey,
    }
}

type WitResult<T> = wasmtime::Result<Result<T, wit::Error>>;

impl StoreState {
    fn push_key(&mut self, key: Result<Arc<Key>, KeyError>) -> WitResult<Resource<KeyHandle>> {
        match key {
            Ok(key) => Ok(Ok(self.table.push(KeyHandle(key))?)),
            Err(error) => Ok(Err(key_error(error))),
        }
    }

    fn key(&self, handle: &Resource<KeyHandle>) -> wasmtime::Result<Arc<Key>> {
        Ok(self.table.get(handle)?.0.clone())
    }
}

impl wit::Host for StoreState {}

impl wit::HostKey for StoreState {
    fn from_hmac_secret(&mut self, secret: Vec<u8>) -> WitResult<Resource<KeyHandle>> {
        let key = self
            .crypto
            .keys
            .get_or_parse(b"hmac", &secret, |id| Key::from_hmac_secret(&secret, id));
        self.push_key(key)
    }

    fn from_pem(&mut self, pem: String) -> WitResult<Resource<KeyHandle>> {
        let key = self
            .crypto
            .keys
            .get_or_parse(b"pem", pem.as_bytes(), |id| Key::from_pem(&pem, id));
        self.push_key(key)
    }

    fn from_jwk(&mut self, jwk: String) -> WitResult<Resource<KeyHandle>> {
        let key = self
            .crypto
            .keys
            .get_or_parse(b"jwk", jwk.as_bytes(), |id| Key::from_jwk(&jwk, id));
        self.push_key(key)
    }

    fn key_type(&mut self, handle: Resource<KeyHandle>) -> wasmtime::Result<wit::KeyType> {
        Ok(match self.key(&handle)?.key_type() {
            KeyType::Hmac => wit::KeyType::Hmac,
            KeyType::Rsa => wit::KeyType::Rsa,
            KeyType::EcP256 => wit::KeyType::EcP256,
            KeyType::EcP384 => wit::KeyType::EcP384,
            KeyType::Ed25519 => wit::KeyType::Ed25519,
        })
    }

    fn verify(
        &mut self,
        handle: Resource<KeyHandle>,
        alg: wit::Algorithm,
        message: Vec<u8>,
        signature: Vec<u8>,
    ) -> WitResult<bool> {
        let key = self.key(&handle)?;
        Ok(self
            .crypto
            .verify(&key, algorithm(alg), &message, &signature)
            .map_err(key_error))
    }

    fn sign(
        &mut self,
        handle: Resource<KeyHandle>,
        alg: wit::Algorithm,
        message: Vec<u8>,
    ) -> WitResult<Vec<u8>> {
        let key = self.key(&handle)?;
        Ok(key.sign(algorithm(alg), &message).map_err(key_error))
    }

    fn drop(&mut self, handle: Resource<KeyHandle>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}

impl wit::HostKeySet for StoreState {
    fn from_jwks(&mut self, jwks: String) -> WitResult<Resource<KeySetHandle>> {
        // Each key of the set is cached by its own material, so parsing the
        // set again finds its keys parsed already.
        // TODO: cache whole sets by their text too, to skip the JSON parse.
        match KeySet::parse(&jwks, &self.crypto.keys) {
            Ok(set) => {
                let handle = KeySetHandle {
                    set: Arc::new(set),
                    remote: None,
                };
                Ok(Ok(self.table.push(handle)?))
            }
            Err(message) => Ok(Err(wit::Error::InvalidKeySet(message))),
        }
    }

    async fn from_upstream(
        &mut self,
        upstream: String,
        path: String,
        options: wit::FetchOptions,
    ) -> WitResult<Resource<KeySetHandle>> {
        let Some((upstreams, index)) = self.settings.key_set_upstreams.find(&upstream) else {
            return Ok(Err(wit::Error::UpstreamNotAllowed(format!(
                "upstream {upstream:?} is not in the worker's `upstreams` list"
            ))));
        };
        if !path.starts_with('/') {
            return Ok(Err(wit::Error::FetchFailed(format!(
                "the path {path:?} does not start with '/'"
            ))));
        }
        let options =
            FetchOptions::new(options.min_refetch_interval_ms, options.default_max_age_ms);
        let remote = self.crypto.remote_key_set(upstreams, index, path);
        let waiting = Instant::now();
        let fetched = remote
            .get(options, Reason::Refresh, &self.crypto.keys)
            .await;
        self.host_wait += waiting.elapsed();
        match fetched {
            Ok(set) => {
                let handle = KeySetHandle {
                    set,
                    remote: Some((remote, options)),
                };
                Ok(Ok(self.table.push(handle)?))
            }
            Err(failed) => Ok(Err(wit::Error::FetchFailed(failed.0))),
        }
    }

    async fn find(
        &mut self,
        handle: Resource<KeySetHandle>,
        kid: Option<String>,
        alg: wit::Algorithm,
    ) -> wasmtime::Result<Option<Resource<KeyHandle>>> {
        let alg = algorithm(alg);
        let entry = self.table.get(&handle)?;
        let mut found = entry.set.find(kid.as_deref(), alg);
        if found.is_none() && kid.is_some() {
            if let Some((remote, options)) = entry.remote.clone() {
                // A key id the set lacks: the keys may have rotated.
                let waiting = Instant::now();
                let fetched = remote
                    .get(options, Reason::UnknownKid, &self.crypto.keys)
                    .await;
                self.host_wait += waiting.elapsed();
                if let Ok(set) = fetched {
                    found = set.find(kid.as_deref(), alg);
                    self.table.get_mut(&handle)?.set = set;
                }
            }
        }
        match found {
            Some(key) => Ok(Some(self.table.push(KeyHandle(key))?)),
            None => Ok(None),
        }
    }

    fn drop(&mut self, handle: Resource<KeySetHandle>) -> wasmtime::Result<()> {
        self.table.delete(handle)?;
        Ok(())
    }
}
