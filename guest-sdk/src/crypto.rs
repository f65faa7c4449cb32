//! Signature keys held by the host: HMAC secrets, PEM and JWK keys, and JWK
//! sets given inline or fetched from an upstream.
//!
//! The host parses each key once and caches it across requests, and signs
//! and verifies natively, so a worker pays for neither parsing a key nor
//! public-key arithmetic in WebAssembly. A key has one [`KeyType`], and the
//! host rejects every [`Algorithm`] of another type with
//! [`Error::AlgorithmMismatch`]: a token that claims `HS256` cannot be checked
//! against an RSA public key used as an HMAC secret.
//!
//! ```no_run
//! use edge_sdk::crypto::{Algorithm, Key};
//!
//! # fn check(signing_input: &[u8], signature: &[u8]) -> Result<bool, edge_sdk::crypto::Error> {
//! let key = Key::from_pem("-----BEGIN PUBLIC KEY-----\n...\n-----END PUBLIC KEY-----\n")?;
//! key.verify(Algorithm::Rs256, signing_input, signature)
//! # }
//! ```
//!
//! On targets other than `wasm32`, for native unit tests, there is no host:
//! every constructor returns [`Error::NoHost`].

use std::fmt;
use std::time::Duration;

#[cfg(target_arch = "wasm32")]
use crate::bindings::edge::worker::crypto as wit;

/// A JWS signature algorithm (RFC 7518, section 3, and RFC 8037).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    /// HMAC with SHA-256.
    Hs256,
    /// HMAC with SHA-384.
    Hs384,
    /// HMAC with SHA-512.
    Hs512,
    /// RSASSA-PKCS1-v1_5 with SHA-256.
    Rs256,
    /// RSASSA-PKCS1-v1_5 with SHA-384.
    Rs384,
    /// RSASSA-PKCS1-v1_5 with SHA-512.
    Rs512,
    /// RSASSA-PSS with SHA-256.
    Ps256,
    /// RSASSA-PSS with SHA-384.
    Ps384,
    /// RSASSA-PSS with SHA-512.
    Ps512,
    /// ECDSA on P-256 with SHA-256.
    Es256,
    /// ECDSA on P-384 with SHA-384.
    Es384,
    /// Ed25519.
    EdDsa,
}

impl Algorithm {
    /// Every algorithm.
    pub const ALL: [Algorithm; 12] = [
        Algorithm::Hs256,
        Algorithm::Hs384,
        Algorithm::Hs512,
        Algorithm::Rs256,
        Algorithm::Rs384,
        Algorithm::Rs512,
        Algorithm::Ps256,
        Algorithm::Ps384,
        Algorithm::Ps512,
        Algorithm::Es256,
        Algorithm::Es384,
        Algorithm::EdDsa,
    ];

    /// Reads a JWS `alg` name such as `RS256`; `none` and unknown names are
    /// `None`.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Algorithm::ALL.into_iter().find(|alg| alg.name() == name)
    }

    /// Returns the JWS `alg` name, such as `RS256`.
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Hs256 => "HS256",
            Algorithm::Hs384 => "HS384",
            Algorithm::Hs512 => "HS512",
            Algorithm::Rs256 => "RS256",
            Algorithm::Rs384 => "RS384",
            Algorithm::Rs512 => "RS512",
            Algorithm::Ps256 => "PS256",
            Algorithm::Ps384 => "PS384",
            Algorithm::Ps512 => "PS512",
            Algorithm::Es256 => "ES256",
            Algorithm::Es384 => "ES384",
            Algorithm::EdDsa => "EdDSA",
        }
    }
}

impl fmt::Display for Algorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// The type of a key, which fixes the algorithms it works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    /// A shared secret for HS256, HS384 and HS512.
    Hmac,
    /// An RSA key for RS256 to RS512 and PS256 to PS512.
    Rsa,
    /// An EC key on P-256 for ES256.
    EcP256,
    /// An EC key on P-384 for ES384.
    EcP384,
    /// An Ed25519 key for EdDSA.
    Ed25519,
}

/// The reason a key or key set could not be made, or a key could not be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The key material is not a key the host reads.
    InvalidKey(String),
    /// The algorithm does not belong to the key's type.
    AlgorithmMismatch,
    /// Signing needs a private key or a secret; this is a public key.
    NotASigningKey,
    /// The text is not a usable JWK set.
    InvalidKeySet(String),
    /// The upstream is not declared, or the worker's route entry does not
    /// list it in `upstreams`.
    UpstreamNotAllowed(String),
    /// The key set could not be fetched and no earlier copy exists.
    FetchFailed(String),
    /// There is no host: the code runs natively, as in a unit test.
    NoHost,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::InvalidKey(reason) => write!(f, "invalid key: {reason}"),
            Error::AlgorithmMismatch => f.write_str("the algorithm does not fit the key's type"),
            Error::NotASigningKey => f.write_str("the key is a public key and cannot sign"),
            Error::InvalidKeySet(reason) => write!(f, "invalid JWK set: {reason}"),
            Error::UpstreamNotAllowed(reason) => write!(f, "upstream not allowed: {reason}"),
            Error::FetchFailed(reason) => write!(f, "key set fetch failed: {reason}"),
            Error::NoHost => f.write_str("host cryptography is only available inside a node"),
        }
    }
}

impl std::error::Error for Error {}

/// The cache and refetch settings of a key set from an upstream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FetchOptions {
    /// The minimum time between two fetches of the set, whatever causes them
    /// (an expired copy or an unknown key id). The host uses at least one
    /// second. Default: 10 seconds.
    pub min_refetch_interval: Duration,
    /// How long a fetched set stays fresh when the response has no
    /// `Cache-Control: max-age`. Default: 5 minutes.
    pub default_max_age: Duration,
}

impl Default for FetchOptions {
    fn default() -> Self {
        FetchOptions {
            min_refetch_interval: Duration::from_secs(10),
            default_max_age: Duration::from_secs(300),
        }
    }
}

/// A key held by the host, valid until the end of the call.
#[derive(Debug)]
pub struct Key(Inner<KeyHandle>);

/// A JWK set held by the host, valid until the end of the call.
#[derive(Debug)]
pub struct KeySet(Inner<KeySetHandle>);

#[cfg(target_arch = "wasm32")]
type KeyHandle = wit::Key;
#[cfg(target_arch = "wasm32")]
type KeySetHandle = wit::KeySet;
#[cfg(target_arch = "wasm32")]
type Inner<T> = T;

/// Natively there is no host, so no handle can exist.
#[cfg(not(target_arch = "wasm32"))]
#[derive(Debug)]
enum Inner<T> {
    #[allow(dead_code)]
    Never(std::convert::Infallible, std::marker::PhantomData<T>),
}
#[cfg(not(target_arch = "wasm32"))]
type KeyHandle = ();
#[cfg(not(target_arch = "wasm32"))]
type KeySetHandle = ();

impl Key {
    /// Makes an HMAC key from a shared secret, which must not be empty.
    pub fn from_hmac_secret(secret: &[u8]) -> Result<Key, Error> {
        #[cfg(target_arch = "wasm32")]
        return wit::Key::from_hmac_secret(secret)
            .map(Key)
            .map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        return {
            let _ = secret;
            Err(Error::NoHost)
        };
    }

    /// Reads the first key of PEM text: `PUBLIC KEY`, `RSA PUBLIC KEY`,
    /// `CERTIFICATE` (its public key), or for signing `PRIVATE KEY` (PKCS#8),
    /// `RSA PRIVATE KEY` or `EC PRIVATE KEY`.
    pub fn from_pem(pem: &str) -> Result<Key, Error> {
        #[cfg(target_arch = "wasm32")]
        return wit::Key::from_pem(pem).map(Key).map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        return {
            let _ = pem;
            Err(Error::NoHost)
        };
    }

    /// Reads one JWK given as JSON text (`kty` `oct`, `RSA`, `EC` or `OKP`).
    /// A JWK with an `alg` member works with that algorithm only.
    pub fn from_jwk(jwk: &str) -> Result<Key, Error> {
        #[cfg(target_arch = "wasm32")]
        return wit::Key::from_jwk(jwk).map(Key).map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        return {
            let _ = jwk;
            Err(Error::NoHost)
        };
    }

    /// Returns the key's type.
    pub fn key_type(&self) -> KeyType {
        #[cfg(target_arch = "wasm32")]
        return match self.0.key_type() {
            wit::KeyType::Hmac => KeyType::Hmac,
            wit::KeyType::Rsa => KeyType::Rsa,
            wit::KeyType::EcP256 => KeyType::EcP256,
            wit::KeyType::EcP384 => KeyType::EcP384,
            wit::KeyType::Ed25519 => KeyType::Ed25519,
        };
        #[cfg(not(target_arch = "wasm32"))]
        match self.0 {
            Inner::Never(never, _) => match never {},
        }
    }

    /// Returns whether `signature` is a valid signature of `message` with
    /// `alg`. A signature that does not match is `Ok(false)`.
    ///
    /// # Errors
    ///
    /// [`Error::AlgorithmMismatch`] when `alg` does not belong to the key's
    /// type.
    pub fn verify(&self, alg: Algorithm, message: &[u8], signature: &[u8]) -> Result<bool, Error> {
        #[cfg(target_arch = "wasm32")]
        return self
            .0
            .verify(alg.into(), message, signature)
            .map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (alg, message, signature);
            match self.0 {
                Inner::Never(never, _) => match never {},
            }
        }
    }

    /// Signs `message` with `alg`. ECDSA signatures come as r || s.
    ///
    /// # Errors
    ///
    /// [`Error::AlgorithmMismatch`] when `alg` does not belong to the key's
    /// type, [`Error::NotASigningKey`] for a public key.
    pub fn sign(&self, alg: Algorithm, message: &[u8]) -> Result<Vec<u8>, Error> {
        #[cfg(target_arch = "wasm32")]
        return self.0.sign(alg.into(), message).map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (alg, message);
            match self.0 {
                Inner::Never(never, _) => match never {},
            }
        }
    }
}

impl KeySet {
    /// Reads a JWK set from JSON text. Keys of unknown types and keys whose
    /// `use` is not `sig` are skipped.
    pub fn from_jwks(jwks: &str) -> Result<KeySet, Error> {
        #[cfg(target_arch = "wasm32")]
        return wit::KeySet::from_jwks(jwks)
            .map(KeySet)
            .map_err(Error::from);
        #[cfg(not(target_arch = "wasm32"))]
        return {
            let _ = jwks;
            Err(Error::NoHost)
        };
    }

    /// Returns the JWK set at `path` on the upstream named `upstream`, which
    /// the worker's route entry must list in `upstreams`. The host caches it
    /// across requests and keeps the last good copy when a fetch fails.
    pub fn from_upstream(
        upstream: &str,
        path: &str,
        options: FetchOptions,
    ) -> Result<KeySet, Error> {
        #[cfg(target_arch = "wasm32")]
        return {
            let millis = |d: Duration| u32::try_from(d.as_millis()).unwrap_or(u32::MAX);
            let options = wit::FetchOptions {
                min_refetch_interval_ms: millis(options.min_refetch_interval),
                default_max_age_ms: millis(options.default_max_age),
            };
            wit::KeySet::from_upstream(upstream, path, options)
                .map(KeySet)
                .map_err(Error::from)
        };
        #[cfg(not(target_arch = "wasm32"))]
        return {
            let _ = (upstream, path, options);
            Err(Error::NoHost)
        };
    }

    /// Finds the key for a token's `kid` and `alg`: the key with that `kid`
    /// whose type fits `alg`; without a `kid`, the one key that fits `alg`
    /// when exactly one does. For a set from an upstream, an unknown `kid`
    /// makes the host fetch the set again, at most once per
    /// [`FetchOptions::min_refetch_interval`].
    pub fn find(&self, kid: Option<&str>, alg: Algorithm) -> Option<Key> {
        #[cfg(target_arch = "wasm32")]
        return self.0.find(kid, alg.into()).map(Key);
        #[cfg(not(target_arch = "wasm32"))]
        {
            let _ = (kid, alg);
            match self.0 {
                Inner::Never(never, _) => match never {},
            }
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl From<Algorithm> for wit::Algorithm {
    fn from(alg: Algorithm) -> Self {
        match alg {
            Algorithm::Hs256 => wit::Algorithm::Hs256,
            Algorithm::Hs384 => wit::Algorithm::Hs384,
            Algorithm::Hs512 => wit::Algorithm::Hs512,
            Algorithm::Rs256 => wit::Algorithm::Rs256,
            Algorithm::Rs384 => wit::Algorithm::Rs384,
            Algorithm::Rs512 => wit::Algorithm::Rs512,
            Algorithm::Ps256 => wit::Algorithm::Ps256,
            Algorithm::Ps384 => wit::Algorithm::Ps384,
            Algorithm::Ps512 => wit::Algorithm::Ps512,
            Algorithm::Es256 => wit::Algorithm::Es256,
            Algorithm::Es384 => wit::Algorithm::Es384,
            Algorithm::EdDsa => wit::Algorithm::EdDsa,
        }
    }
}

#[cfg(target_arch = "wasm32")]
impl From<wit::Error> for Error {
    fn from(error: wit::Error) -> Self {
        match error {
            wit::Error::InvalidKey(reason) => Error::InvalidKey(reason),
            wit::Error::AlgorithmMismatch => Error::AlgorithmMismatch,
            wit::Error::NotASigningKey => Error::NotASigningKey,
            wit::Error::InvalidKeySet(reason) => Error::InvalidKeySet(reason),
            wit::Error::UpstreamNotAllowed(reason) => Error::UpstreamNotAllowed(reason),
            wit::Error::FetchFailed(reason) => Error::FetchFailed(reason),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn algorithm_names_round_trip() {
        for alg in Algorithm::ALL {
            assert_eq!(Algorithm::from_name(alg.name()), Some(alg));
        }
        assert_eq!(Algorithm::from_name("none"), None);
        assert_eq!(Algorithm::from_name("rs256"), None);
    }

    #[test]
    fn native_build_has_no_host() {
        assert_eq!(Key::from_pem("x").unwrap_err(), Error::NoHost);
        assert_eq!(KeySet::from_jwks("{}").unwrap_err(), Error::NoHost);
    }
}
