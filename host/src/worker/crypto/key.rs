//! Parsed signature keys: reading HMAC secrets, PEM and JWKs, and signing and
//! verifying with aws-lc-rs. Each key has one type, and an algorithm of another
//! type is rejected before any signature is looked at.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    self, EcdsaKeyPair, EcdsaSigningAlgorithm, Ed25519KeyPair, KeyPair as _, ParsedPublicKey,
    RsaKeyPair, VerificationAlgorithm,
};
use aws_lc_rs::{hmac, signature::RsaSignatureEncoding};
use base64::Engine as _;
use serde::Deserialize;

/// A JWS signature algorithm (RFC 7518, section 3, and RFC 8037 for EdDSA).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Algorithm {
    Hs256,
    Hs384,
    Hs512,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    Ps384,
    Ps512,
    Es256,
    Es384,
    EdDsa,
}

impl Algorithm {
    /// Every algorithm, in the order of the WIT enum.
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

    /// Reads a JWS `alg` name, such as `RS256`.
    pub fn from_name(name: &str) -> Option<Algorithm> {
        Some(match name {
            "HS256" => Algorithm::Hs256,
            "HS384" => Algorithm::Hs384,
            "HS512" => Algorithm::Hs512,
            "RS256" => Algorithm::Rs256,
            "RS384" => Algorithm::Rs384,
            "RS512" => Algorithm::Rs512,
            "PS256" => Algorithm::Ps256,
            "PS384" => Algorithm::Ps384,
            "PS512" => Algorithm::Ps512,
            "ES256" => Algorithm::Es256,
            "ES384" => Algorithm::Es384,
            "EdDSA" => Algorithm::EdDsa,
            _ => return None,
        })
    }

    /// Returns the algorithm's JWS `alg` name, such as `RS256`.
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

    /// Returns the minimum HMAC secret length in bytes for an HMAC
    /// algorithm: the size of its hash output, as RFC 7518 (section 3.2)
    /// requires, so that the key is not open to guessing.
    fn min_hmac_secret_len(self) -> Option<usize> {
        match self {
            Algorithm::Hs256 => Some(32),
            Algorithm::Hs384 => Some(48),
            Algorithm::Hs512 => Some(64),
            _ => None,
        }
    }

    /// Returns the key type this algorithm works with.
    pub fn key_type(self) -> KeyType {
        match self {
            Algorithm::Hs256 | Algorithm::Hs384 | Algorithm::Hs512 => KeyType::Hmac,
            Algorithm::Rs256
            | Algorithm::Rs384
            | Algorithm::Rs512
            | Algorithm::Ps256
            | Algorithm::Ps384
            | Algorithm::Ps512 => KeyType::Rsa,
            Algorithm::Es256 => KeyType::EcP256,
            Algorithm::Es384 => KeyType::EcP384,
            Algorithm::EdDsa => KeyType::Ed25519,
        }
    }

    fn verification(self) -> Option<&'static dyn VerificationAlgorithm> {
        Some(match self {
            Algorithm::Rs256 => &signature::RSA_PKCS1_2048_8192_SHA256,
            Algorithm::Rs384 => &signature::RSA_PKCS1_2048_8192_SHA384,
            Algorithm::Rs512 => &signature::RSA_PKCS1_2048_8192_SHA512,
            Algorithm::Ps256 => &signature::RSA_PSS_2048_8192_SHA256,
            Algorithm::Ps384 => &signature::RSA_PSS_2048_8192_SHA384,
            Algorithm::Ps512 => &signature::RSA_PSS_2048_8192_SHA512,
            Algorithm::Es256 => &signature::ECDSA_P256_SHA256_FIXED,
            Algorithm::Es384 => &signature::ECDSA_P384_SHA384_FIXED,
            Algorithm::EdDsa => &signature::ED25519,
            Algorithm::Hs256 | Algorithm::Hs384 | Algorithm::Hs512 => return None,
        })
    }

    fn rsa_encoding(self) -> Option<&'static RsaSignatureEncoding> {
        Some(match self {
            Algorithm::Rs256 => &signature::RSA_PKCS1_SHA256,
            Algorithm::Rs384 => &signature::RSA_PKCS1_SHA384,
            Algorithm::Rs512 => &signature::RSA_PKCS1_SHA512,
            Algorithm::Ps256 => &signature::RSA_PSS_SHA256,
            Algorithm::Ps384 => &signature::RSA_PSS_SHA384,
            Algorithm::Ps512 => &signature::RSA_PSS_SHA512,
            _ => return None,
        })
    }
}

/// The type of a key, which fixes the algorithms it works with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyType {
    Hmac,
    Rsa,
    EcP256,
    EcP384,
    Ed25519,
}

impl KeyType {
    fn algorithms(self) -> &'static [Algorithm] {
        match self {
            KeyType::Hmac => &[Algorithm::Hs256, Algorithm::Hs384, Algorithm::Hs512],
            KeyType::Rsa => &[
                Algorithm::Rs256,
                Algorithm::Rs384,
                Algorithm::Rs512,
                Algorithm::Ps256,
                Algorithm::Ps384,
                Algorithm::Ps512,
            ],
            KeyType::EcP256 => &[Algorithm::Es256],
            KeyType::EcP384 => &[Algorithm::Es384],
            KeyType::Ed25519 => &[Algorithm::EdDsa],
        }
    }
}

/// The reason a key could not be read or used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("invalid key: {0}")]
    Invalid(String),
    #[error("the algorithm does not belong to the key's type")]
    AlgorithmMismatch,
    #[error("the key is a public key and cannot sign")]
    NotASigningKey,
}

fn invalid(message: impl Into<String>) -> KeyError {
    KeyError::Invalid(message.into())
}

/// A parsed key, shared by every call that uses the same key material.
pub struct Key {
    key_type: KeyType,
    /// The SHA-256 the key cache files it under; it names the key in the
    /// cache of verified signatures.
    pub(super) id: [u8; 32],
    /// The one algorithm a JWK's `alg` member allows, when it names one.
    only: Option<Algorithm>,
    /// The secret's length in bytes for a JWK `oct` key, whose length is
    /// checked against each HMAC algorithm it is used with. A secret given
    /// directly is not checked here, so the worker that supplies it must
    /// check it.
    jwk_secret_len: Option<usize>,
    material: Material,
}

enum Material {
    /// One HMAC key per hash function, boxed so that a key of another type
    /// is not as large as three HMAC states (about 3.7 KB on x86-64).
    Hmac(Box<[hmac::Key; 3]>),
    Asymmetric {
        /// One parsed public key per algorithm of the key's type, in the
        /// order of [`KeyType::algorithms`].
        verifiers: Vec<ParsedPublicKey>,
        signer: Option<Signer>,
    },
}

enum Signer {
    Rsa(RsaKeyPair),
    Ecdsa(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

impl std::fmt::Debug for Key {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key material.
        f.debug_struct("Key")
            .field("key_type", &self.key_type)
            .field("only", &self.only)
            .field("jwk_secret_len", &self.jwk_secret_len)
            .finish_non_exhaustive()
    }
}

impl Key {
    /// Makes an HMAC key from a shared secret.
    pub fn from_hmac_secret(secret: &[u8], id: [u8; 32]) -> Result<Key, KeyError> {
        if secret.is_empty() {
            return Err(invalid("the HMAC secret is empty"));
        }
        let keys = [
            hmac::Key::new(hmac::HMAC_SHA256, secret),
            hmac::Key::new(hmac::HMAC_SHA384, secret),
            hmac::Key::new(hmac::HMAC_SHA512, secret),
        ];
        Ok(Key {
            key_type: KeyType::Hmac,
            id,
            only: None,
            jwk_secret_len: None,
            material: Material::Hmac(Box::new(keys)),
        })
    }

    /// Reads the first key of PEM text: a public key, a certificate's public
    /// key, or a private key.
    pub fn from_pem(text: &str, id: [u8; 32]) -> Result<Key, KeyError> {
        let block = pem::parse(text).map_err(|e| invalid(format!("not PEM text: {e}")))?;
        let der = block.contents();
        match block.tag() {
            "PUBLIC KEY" => Key::from_spki(der, id),
            "RSA PUBLIC KEY" => Key::public(KeyType::Rsa, der, id, None),
            "CERTIFICATE" => {
                let (_, certificate) = x509_parser::parse_x509_certificate(der)
                    .map_err(|e| invalid(format!("invalid certificate: {e}")))?;
                Key::from_spki(certificate.public_key().raw, id)
            }
            "PRIVATE KEY" => Key::from_pkcs8(der, id),
            "RSA PRIVATE KEY" => {
                let pair = RsaKeyPair::from_der(der)
                    .map_err(|e| invalid(format!("invalid RSA private key: {e}")))?;
                Key::private(KeyType::Rsa, Signer::Rsa(pair), id)
            }
            "EC PRIVATE KEY" => {
                for (key_type, signing) in EC_SIGNING {
                    if let Ok(pair) = EcdsaKeyPair::from_private_key_der(signing, der) {
                        return Key::private(key_type, Signer::Ecdsa(pair), id);
                    }
                }
                Err(invalid(
                    "invalid EC private key, or a curve other than P-256 and P-384",
                ))
            }
            other => Err(invalid(format!(
                "unsupported PEM block {other:?}; use PUBLIC KEY, RSA PUBLIC KEY, \
                 CERTIFICATE, PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY"
            ))),
        }
    }

    /// Reads one JWK (RFC 7517). Private members are ignored, so only `oct`
    /// keys can sign.
    pub fn from_jwk(text: &str, id: [u8; 32]) -> Result<Key, KeyError> {
        let jwk: Jwk =
            serde_json::from_str(text).map_err(|e| invalid(format!("invalid JWK JSON: {e}")))?;
        Key::from_parsed_jwk(&jwk, id)
    }

    /// Builds a key from a JWK object.
    pub(super) fn from_parsed_jwk(jwk: &Jwk, id: [u8; 32]) -> Result<Key, KeyError> {
        let only = match &jwk.alg {
            Some(name) => Some(
                Algorithm::from_name(name)
                    .ok_or_else(|| invalid(format!("unsupported JWK alg {name:?}")))?,
            ),
            None => None,
        };
        let mut key = match jwk.kty.as_str() {
            "oct" => {
                let secret = member(&jwk.k, "k")?;
                // Without an `alg`, require the least any HMAC algorithm
                // needs. Each use checks the length its algorithm needs.
                let needed = only.and_then(Algorithm::min_hmac_secret_len).unwrap_or(32);
                if secret.len() < needed {
                    return Err(invalid(format!(
                        "the HMAC key has {} bytes, and HMAC keys need at least {needed}",
                        secret.len()
                    )));
                }
                let mut key = Key::from_hmac_secret(&secret, id)?;
                key.jwk_secret_len = Some(secret.len());
                key
            }
            "RSA" => {
                let n = member(&jwk.n, "n")?;
                let e = member(&jwk.e, "e")?;
                Key::public(KeyType::Rsa, &rsa_public_key_der(&n, &e), id, None)?
            }
            "EC" => {
                let (key_type, size) = match jwk.crv.as_deref() {
                    Some("P-256") => (KeyType::EcP256, 32),
                    Some("P-384") => (KeyType::EcP384, 48),
                    other => return Err(invalid(format!("unsupported EC curve {other:?}"))),
                };
                let x = member(&jwk.x, "x")?;
                let y = member(&jwk.y, "y")?;
                if x.len() != size || y.len() != size {
                    return Err(invalid(format!("EC coordinates must be {size} bytes each")));
                }
                // The uncompressed SEC1 point.
                let mut point = Vec::with_capacity(1 + 2 * size);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                Key::public(key_type, &point, id, None)?
            }
            "OKP" => match jwk.crv.as_deref() {
                Some("Ed25519") => Key::public(KeyType::Ed25519, &member(&jwk.x, "x")?, id, None)?,
                other => return Err(invalid(format!("unsupported OKP curve {other:?}"))),
            },
            other => return Err(invalid(format!("unsupported kty {other:?}"))),
        };
        if let Some(alg) = only {
            if alg.key_type() != key.key_type {
                return Err(invalid(format!(
                    "the JWK's alg {alg:?} does not fit its kty {:?}",
                    jwk.kty
                )));
            }
        }
        key.only = only;
        Ok(key)
    }

    /// Reads a DER SubjectPublicKeyInfo of an RSA, P-256, P-384 or Ed25519
    /// key.
    fn from_spki(der: &[u8], id: [u8; 32]) -> Result<Key, KeyError> {
        if aws_lc_rs::rsa::PublicKey::from_der(der).is_ok() {
            return Key::public(KeyType::Rsa, der, id, None);
        }
        for key_type in [
            KeyType::Rsa,
            KeyType::EcP256,
            KeyType::EcP384,
            KeyType::Ed25519,
        ] {
            if let Ok(key) = Key::public(key_type, der, id, None) {
                return Ok(key);
            }
        }
        Err(invalid(
            "the public key is not RSA (2048 to 8192 bits), EC P-256, EC P-384 or Ed25519",
        ))
    }

    /// Reads a PKCS#8 private key of any supported type.
    fn from_pkcs8(der: &[u8], id: [u8; 32]) -> Result<Key, KeyError> {
        if let Ok(pair) = RsaKeyPair::from_pkcs8(der) {
            return Key::private(KeyType::Rsa, Signer::Rsa(pair), id);
        }
        for (key_type, signing) in EC_SIGNING {
            if let Ok(pair) = EcdsaKeyPair::from_pkcs8(signing, der) {
                return Key::private(key_type, Signer::Ecdsa(pair), id);
            }
        }
        if let Ok(pair) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der) {
            return Key::private(KeyType::Ed25519, Signer::Ed25519(pair), id);
        }
        Err(invalid(
            "the private key is not RSA (2048 to 8192 bits), EC P-256, EC P-384 or Ed25519",
        ))
    }

    /// Builds a public key of `key_type` from bytes aws-lc-rs reads for it:
    /// SubjectPublicKeyInfo, PKCS#1 for RSA, an uncompressed point for EC,
    /// 32 raw bytes for Ed25519.
    fn public(
        key_type: KeyType,
        bytes: &[u8],
        id: [u8; 32],
        signer: Option<Signer>,
    ) -> Result<Key, KeyError> {
        if key_type == KeyType::Rsa {
            check_rsa_size(bytes)?;
        }
        let verifiers = key_type
            .algorithms()
            .iter()
            .map(|alg| {
                let algorithm = alg.verification().expect("an asymmetric algorithm");
                ParsedPublicKey::new(algorithm, bytes)
            })
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| invalid(format!("invalid {key_type:?} public key: {e}")))?;
        Ok(Key {
            key_type,
            id,
            only: None,
            jwk_secret_len: None,
            material: Material::Asymmetric { verifiers, signer },
        })
    }

    fn private(key_type: KeyType, signer: Signer, id: [u8; 32]) -> Result<Key, KeyError> {
        let public = match &signer {
            Signer::Rsa(pair) => pair.public_key().as_ref().to_vec(),
            Signer::Ecdsa(pair) => pair.public_key().as_ref().to_vec(),
            Signer::Ed25519(pair) => pair.public_key().as_ref().to_vec(),
        };
        Key::public(key_type, &public, id, Some(signer))
    }

    /// Returns the key's type.
    pub fn key_type(&self) -> KeyType {
        self.key_type
    }

    /// Returns whether `alg` may be used with this key.
    pub fn accepts(&self, alg: Algorithm) -> bool {
        alg.key_type() == self.key_type && self.only.is_none_or(|only| only == alg)
    }

    /// Checks `signature` over `message` with `alg`: `Ok(false)` for a
    /// signature that does not match. A JWK `oct` key shorter than `alg`
    /// needs is a [`KeyError::Invalid`] error.
    pub fn verify(&self, alg: Algorithm, message: &[u8], sig: &[u8]) -> Result<bool, KeyError> {
        if !self.accepts(alg) {
            return Err(KeyError::AlgorithmMismatch);
        }
        self.check_secret_len(alg)?;
        let valid = match &self.material {
            Material::Hmac(keys) => hmac::verify(&keys[hmac_index(alg)], message, sig).is_ok(),
            Material::Asymmetric { verifiers, .. } => {
                let index = self.algorithm_index(alg);
                verifiers[index].verify_sig(message, sig).is_ok()
            }
        };
        Ok(valid)
    }

    /// Signs `message` with `alg`.
    pub fn sign(&self, alg: Algorithm, message: &[u8]) -> Result<Vec<u8>, KeyError> {
        if !self.accepts(alg) {
            return Err(KeyError::AlgorithmMismatch);
        }
        self.check_secret_len(alg)?;
        let signer = match &self.material {
            Material::Hmac(keys) => {
                return Ok(hmac::sign(&keys[hmac_index(alg)], message)
                    .as_ref()
                    .to_vec());
            }
            Material::Asymmetric { signer: None, .. } => return Err(KeyError::NotASigningKey),
            Material::Asymmetric {
                signer: Some(signer),
                ..
            } => signer,
        };
        let failed = |_| invalid("signing failed");
        match signer {
            Signer::Rsa(pair) => {
                let encoding = alg.rsa_encoding().expect("an RSA algorithm");
                let mut signature = vec![0; pair.public_modulus_len()];
                pair.sign(encoding, &SystemRandom::new(), message, &mut signature)
                    .map_err(failed)?;
                Ok(signature)
            }
            Signer::Ecdsa(pair) => Ok(pair
                .sign(&SystemRandom::new(), message)
                .map_err(failed)?
                .as_ref()
                .to_vec()),
            Signer::Ed25519(pair) => Ok(pair.sign(message).as_ref().to_vec()),
        }
    }

    /// Checks that a JWK `oct` key's secret is as long as `alg` needs. A
    /// JWK without `alg` is read when its secret has 32 bytes, enough for
    /// HS256 only, so HS384 and HS512 are checked here, on use.
    fn check_secret_len(&self, alg: Algorithm) -> Result<(), KeyError> {
        let (Some(length), Some(needed)) = (self.jwk_secret_len, alg.min_hmac_secret_len()) else {
            return Ok(());
        };
        if length < needed {
            return Err(invalid(format!(
                "the HMAC key has {length} bytes, and {} needs at least {needed}",
                alg.name()
            )));
        }
        Ok(())
    }

    fn algorithm_index(&self, alg: Algorithm) -> usize {
        self.key_type
            .algorithms()
            .iter()
            .position(|&candidate| candidate == alg)
            .expect("an algorithm the key accepts")
    }
}

/// The ECDSA signing algorithms (fixed-size r || s, as JWS uses) by curve.
const EC_SIGNING: [(KeyType, &EcdsaSigningAlgorithm); 2] = [
    (KeyType::EcP256, &signature::ECDSA_P256_SHA256_FIXED_SIGNING),
    (KeyType::EcP384, &signature::ECDSA_P384_SHA384_FIXED_SIGNING),
];

fn hmac_index(alg: Algorithm) -> usize {
    match alg {
        Algorithm::Hs256 => 0,
        Algorithm::Hs384 => 1,
        _ => 2,
    }
}

/// The members of a JWK that this host reads.
#[derive(Debug, Deserialize)]
pub(super) struct Jwk {
    pub kty: String,
    #[serde(default)]
    pub kid: Option<String>,
    #[serde(default)]
    pub alg: Option<String>,
    #[serde(default, rename = "use")]
    pub use_: Option<String>,
    #[serde(default)]
    n: Option<String>,
    #[serde(default)]
    e: Option<String>,
    #[serde(default)]
    crv: Option<String>,
    #[serde(default)]
    x: Option<String>,
    #[serde(default)]
    y: Option<String>,
    #[serde(default)]
    k: Option<String>,
}

/// Decodes a base64url JWK member, with or without padding.
fn member(value: &Option<String>, name: &str) -> Result<Vec<u8>, KeyError> {
    let text = value
        .as_deref()
        .ok_or_else(|| invalid(format!("the JWK has no {name:?} member")))?;
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::URL_SAFE,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent),
    );
    engine
        .decode(text)
        .map_err(|e| invalid(format!("the JWK member {name:?} is not base64url: {e}")))
}

/// Encodes an RSA public key as a PKCS#1 `RSAPublicKey` (RFC 8017,
/// appendix A.1.1): a DER sequence of the modulus and the exponent.
/// Checks that the RSA public key in `der` (PKCS#1 or SubjectPublicKeyInfo)
/// has 2048 to 8192 bits, the sizes the verification algorithms accept, so
/// that a smaller key fails at load instead of on every token.
fn check_rsa_size(der: &[u8]) -> Result<(), KeyError> {
    let key = aws_lc_rs::rsa::PublicKey::from_der(der)
        .map_err(|e| invalid(format!("invalid RSA public key: {e}")))?;
    let bits = key.modulus_len() * 8;
    if !(2048..=8192).contains(&bits) {
        return Err(invalid(format!(
            "the RSA key has {bits} bits; use a key of 2048 to 8192 bits"
        )));
    }
    Ok(())
}

fn rsa_public_key_der(modulus: &[u8], exponent: &[u8]) -> Vec<u8> {
    let mut body = der_integer(modulus);
    body.extend(der_integer(exponent));
    let mut der = vec![0x30];
    der.extend(der_length(body.len()));
    der.extend(body);
    der
}

/// Encodes an unsigned big-endian number as a DER INTEGER.
fn der_integer(bytes: &[u8]) -> Vec<u8> {
    let start = bytes.iter().position(|&b| b != 0).unwrap_or(bytes.len());
    let digits = &bytes[start..];
    let mut content = Vec::with_capacity(digits.len() + 1);
    // A leading 0 keeps a number whose top bit is set positive.
    if digits.first().is_none_or(|&b| b & 0x80 != 0) {
        content.push(0);
    }
    content.extend_from_slice(digits);
    let mut der = vec![0x02];
    der.extend(der_length(content.len()));
    der.extend(content);
    der
}

fn der_length(length: usize) -> Vec<u8> {
    if length < 0x80 {
        return vec![length as u8];
    }
    let bytes = length.to_be_bytes();
    let start = bytes
        .iter()
        .position(|&b| b != 0)
        .unwrap_or(bytes.len() - 1);
    let mut der = vec![0x80 | (bytes.len() - start) as u8];
    der.extend_from_slice(&bytes[start..]);
    der
}

#[cfg(test)]
mod tests {
    use super::*;
    use aws_lc_rs::encoding::AsDer;

    const ID: [u8; 32] = [0; 32];

    fn pem(tag: &str, der: &[u8]) -> String {
        pem::encode(&pem::Pem::new(tag, der.to_vec()))
    }

    #[test]
    fn rsa_private_key_signs_and_public_key_verifies() {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let private = pem("PRIVATE KEY", pair.as_der().unwrap().as_ref());
        let public = pem("RSA PUBLIC KEY", pair.public_key().as_ref());
        let signer = Key::from_pem(&private, ID).unwrap();
        let verifier = Key::from_pem(&public, ID).unwrap();
        for alg in [Algorithm::Rs256, Algorithm::Ps384, Algorithm::Rs512] {
            let signature = signer.sign(alg, b"message").unwrap();
            assert_eq!(verifier.verify(alg, b"message", &signature), Ok(true));
            assert_eq!(verifier.verify(alg, b"messagE", &signature), Ok(false));
        }
        assert_eq!(
            verifier.sign(Algorithm::Rs256, b"m"),
            Err(KeyError::NotASigningKey)
        );
    }

    #[test]
    fn algorithm_of_another_key_type_is_rejected() {
        let hmac = Key::from_hmac_secret(b"secret", ID).unwrap();
        assert_eq!(
            hmac.verify(Algorithm::Rs256, b"m", b"s"),
            Err(KeyError::AlgorithmMismatch)
        );
        let pair = Ed25519KeyPair::generate().unwrap();
        let ed = Key::public(KeyType::Ed25519, pair.public_key().as_ref(), ID, None).unwrap();
        for alg in [Algorithm::Hs256, Algorithm::Rs256, Algorithm::Es256] {
            assert_eq!(ed.verify(alg, b"m", b"s"), Err(KeyError::AlgorithmMismatch));
        }
    }

    #[test]
    fn hmac_sign_and_verify() {
        let key = Key::from_hmac_secret(b"secret", ID).unwrap();
        let tag = key.sign(Algorithm::Hs384, b"m").unwrap();
        assert_eq!(tag.len(), 48);
        assert_eq!(key.verify(Algorithm::Hs384, b"m", &tag), Ok(true));
        assert_eq!(key.verify(Algorithm::Hs256, b"m", &tag), Ok(false));
        assert!(Key::from_hmac_secret(b"", ID).is_err());
    }

    #[test]
    fn hmac_jwk_length_checked_per_algorithm() {
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = |length: usize| {
            serde_json::json!({ "kty": "oct", "k": b64(&vec![7; length]) }).to_string()
        };
        let short = Key::from_jwk(&jwk(40), ID).unwrap();
        let tag = short.sign(Algorithm::Hs256, b"m").unwrap();
        assert_eq!(short.verify(Algorithm::Hs256, b"m", &tag), Ok(true));
        for (alg, needed) in [(Algorithm::Hs384, 48), (Algorithm::Hs512, 64)] {
            let error = invalid(format!(
                "the HMAC key has 40 bytes, and {} needs at least {needed}",
                alg.name()
            ));
            assert_eq!(short.verify(alg, b"m", &[0; 64]), Err(error.clone()));
            assert_eq!(short.sign(alg, b"m"), Err(error));
        }
        // At exactly the hash output's length, each algorithm works.
        for (alg, length) in [(Algorithm::Hs384, 48), (Algorithm::Hs512, 64)] {
            let key = Key::from_jwk(&jwk(length), ID).unwrap();
            let tag = key.sign(alg, b"m").unwrap();
            assert_eq!(key.verify(alg, b"m", &tag), Ok(true), "{alg:?}");
        }
        let error = Key::from_jwk(&jwk(31), ID).unwrap_err();
        assert_eq!(
            error,
            invalid("the HMAC key has 31 bytes, and HMAC keys need at least 32")
        );
        // A secret given directly is not held to the JWK rule.
        let direct = Key::from_hmac_secret(&[7; 40], ID).unwrap();
        assert!(direct.sign(Algorithm::Hs512, b"m").is_ok());
    }

    #[test]
    fn jwk_rsa_matches_pem_key() {
        let pair = RsaKeyPair::generate(aws_lc_rs::rsa::KeySize::Rsa2048).unwrap();
        let components: aws_lc_rs::rsa::PublicKeyComponents<Vec<u8>> = pair.public_key().into();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = serde_json::json!({
            "kty": "RSA", "alg": "RS256",
            "n": b64(&components.n), "e": b64(&components.e),
        });
        let key = Key::from_jwk(&jwk.to_string(), ID).unwrap();
        let signer = Key::private(KeyType::Rsa, Signer::Rsa(pair), ID).unwrap();
        let signature = signer.sign(Algorithm::Rs256, b"m").unwrap();
        assert_eq!(key.verify(Algorithm::Rs256, b"m", &signature), Ok(true));
        // The JWK's alg pins it to RS256.
        assert_eq!(
            key.verify(Algorithm::Ps256, b"m", &signature),
            Err(KeyError::AlgorithmMismatch)
        );
    }

    #[test]
    fn jwk_ec_key_verifies() {
        let pair = EcdsaKeyPair::generate(&signature::ECDSA_P256_SHA256_FIXED_SIGNING).unwrap();
        let point = pair.public_key().as_ref();
        let b64 = |bytes: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let jwk = serde_json::json!({
            "kty": "EC", "crv": "P-256", "x": b64(&point[1..33]), "y": b64(&point[33..]),
        });
        let key = Key::from_jwk(&jwk.to_string(), ID).unwrap();
        let signature = pair.sign(&SystemRandom::new(), b"m").unwrap();
        assert_eq!(
            key.verify(Algorithm::Es256, b"m", signature.as_ref()),
            Ok(true)
        );
        assert_eq!(
            key.verify(Algorithm::Es384, b"m", signature.as_ref()),
            Err(KeyError::AlgorithmMismatch)
        );
    }

    #[test]
    fn small_rsa_key_rejected() {
        let pem = "-----BEGIN PUBLIC KEY-----\n\
            MIGfMA0GCSqGSIb3DQEBAQUAA4GNADCBiQKBgQDs1I3pahulZXV+FkXHV0XSeyVh\n\
            vhT0MzW7W+UMI+h0Xf6BAkvpepxiZp1uXux6iE0WGMGtHTqFMiyqO5wQS5RtD4we\n\
            knx61YLQNFoh2jMdMGOHsdLbDFnEhN3Mmll66PhjVBU73TaBHdZHjWoesozlwHzw\n\
            T461xr0DXgrO/yqxmwIDAQAB\n\
            -----END PUBLIC KEY-----\n";
        let error = Key::from_pem(pem, ID).unwrap_err().to_string();
        assert!(error.contains("has 1024 bits"), "{error}");
        let jwk = r#"{"kty":"RSA","n":"7NSN6WobpWV1fhZFx1dF0nslYb4U9DM1u1vlDCPodF3-gQJL6XqcYmadbl7seohNFhjBrR06hTIsqjucEEuUbQ-MHpJ8etWC0DRaIdozHTBjh7HS2wxZxITdzJpZeuj4Y1QVO902gR3WR41qHrKM5cB88E-Otca9A14Kzv8qsZs","e":"AQAB"}"#;
        let error = Key::from_jwk(jwk, ID).unwrap_err().to_string();
        assert!(error.contains("has 1024 bits"), "{error}");
    }

    #[test]
    fn der_integer_keeps_numbers_positive() {
        assert_eq!(
            der_integer(&[0x01, 0x00, 0x01]),
            [0x02, 0x03, 0x01, 0x00, 0x01]
        );
        assert_eq!(der_integer(&[0x00, 0x80]), [0x02, 0x02, 0x00, 0x80]);
        assert_eq!(der_length(0x1234), [0x82, 0x12, 0x34]);
    }
}
