//! Load balancing across an upstream's targets: round robin, least
//! outstanding requests with the power of two random choices, and
//! consistent (rendezvous) hashing on a request key.

use std::hash::{Hash, Hasher};
use std::net::IpAddr;

use http::HeaderMap;

/// The policy that picks an upstream's target for each request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    /// Each target in turn.
    RoundRobin,
    /// The target with fewer requests in flight, of two picked at random.
    LeastOutstanding,
    /// The same target for the same key, by rendezvous hashing: when a
    /// target leaves, only the keys it had move.
    ConsistentHash(HashKey),
}

impl Policy {
    /// The name used in the config and on the admin listener.
    pub fn name(&self) -> &'static str {
        match self {
            Policy::RoundRobin => "round_robin",
            Policy::LeastOutstanding => "least_outstanding",
            Policy::ConsistentHash(_) => "consistent_hash",
        }
    }
}

/// The request value consistent hashing keys on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HashKey {
    /// A request header, such as the `x-user-id` an auth worker sets.
    Header(http::HeaderName),
    /// A cookie by name.
    Cookie(String),
    /// The client's IP address (after trusted proxies).
    ClientIp,
}

impl HashKey {
    /// Parses `header:NAME`, `cookie:NAME` or `client_ip`.
    pub fn parse(text: &str) -> Result<HashKey, String> {
        if text == "client_ip" {
            return Ok(HashKey::ClientIp);
        }
        if let Some(name) = text.strip_prefix("header:") {
            let name = http::HeaderName::from_bytes(name.as_bytes())
                .map_err(|_| format!("{name:?} is not a valid header name"))?;
            return Ok(HashKey::Header(name));
        }
        if let Some(name) = text.strip_prefix("cookie:") {
            if name.is_empty() || name.contains(['=', ';', ' ']) {
                return Err(format!("{name:?} is not a valid cookie name"));
            }
            return Ok(HashKey::Cookie(name.to_owned()));
        }
        Err(format!(
            "{text:?} is not a hash key; use header:NAME, cookie:NAME or client_ip"
        ))
    }

    /// Hashes the request's key; `None` when the request lacks it, and
    /// then any target will do.
    pub fn hash(&self, headers: &HeaderMap, client_ip: IpAddr) -> Option<u64> {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        match self {
            HashKey::Header(name) => headers.get(name)?.as_bytes().hash(&mut hasher),
            HashKey::Cookie(name) => cookie(headers, name)?.hash(&mut hasher),
            HashKey::ClientIp => client_ip.hash(&mut hasher),
        }
        Some(hasher.finish())
    }
}

/// Finds a cookie's value in the `Cookie` headers.
fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(http::header::COOKIE)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(key, _)| *key == name)
        .map(|(_, value)| value)
}

/// Hashes a target's address into the identity its rendezvous scores
/// derive from. It depends on the address only, not on the target's place
/// in the list, so removing one target leaves the others' scores as they
/// were.
pub fn target_identity(addr: &std::net::SocketAddr) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    addr.hash(&mut hasher);
    hasher.finish()
}

/// Returns the rendezvous score of a target for a key: the target with the
/// highest score among those available gets the request.
pub fn score(key: u64, target: u64) -> u64 {
    // SplitMix64 finaliser over the key and the target's identity: cheap and
    // well mixed, so every target wins an equal share of keys.
    let mut z = key ^ target.wrapping_mul(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(key: u64, targets: &[u64]) -> u64 {
        *targets.iter().max_by_key(|&&t| score(key, t)).unwrap()
    }

    #[test]
    fn removing_a_target_moves_only_its_keys() {
        let all = [0, 1, 2, 3, 4];
        let without_two = [0, 1, 3, 4];
        let mut moved = 0;
        let mut owned_by_two = 0;
        for key in 0..10_000u64 {
            let before = owner(key.wrapping_mul(0x2545_F491_4F6C_DD1D), &all);
            let after = owner(key.wrapping_mul(0x2545_F491_4F6C_DD1D), &without_two);
            owned_by_two += usize::from(before == 2);
            if before != after {
                moved += 1;
                assert_eq!(before, 2, "only keys of the removed target move");
            }
        }
        assert_eq!(moved, owned_by_two);
        assert!(
            (1500..2500).contains(&moved),
            "about 1/5 of keys moved: {moved}"
        );
    }

    #[test]
    fn hash_key_reads_header_cookie_and_ip() {
        let mut headers = HeaderMap::new();
        headers.insert("x-user-id", "u-7".parse().unwrap());
        headers.insert("cookie", "a=1; session=abc".parse().unwrap());
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let header = HashKey::parse("header:x-user-id").unwrap();
        let session = HashKey::parse("cookie:session").unwrap();
        assert!(header.hash(&headers, ip).is_some());
        assert!(session.hash(&headers, ip).is_some());
        assert!(HashKey::parse("cookie:missing")
            .unwrap()
            .hash(&headers, ip)
            .is_none());
        assert!(HashKey::parse("client_ip")
            .unwrap()
            .hash(&headers, ip)
            .is_some());
        assert!(HashKey::parse("query:x").is_err());
    }
}
