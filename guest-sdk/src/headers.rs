//! An ordered list of HTTP headers, as the host passes them.

/// HTTP headers in order, where a name may occur more than once.
///
/// Names from the host are lower-case, and [`Headers::append`] lower-cases the
/// names it stores. Lookups ignore ASCII case.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    entries: Vec<(String, String)>,
}

impl Headers {
    /// Creates an empty list.
    pub fn new() -> Self {
        Self::default()
    }

    /// Returns the first value of the header `name`, ignoring ASCII case.
    pub fn get(&self, name: &str) -> Option<&str> {
        self.get_all(name).next()
    }

    /// Returns every value of the header `name` in order, ignoring ASCII case.
    pub fn get_all<'a, 'n>(&'a self, name: &'n str) -> impl Iterator<Item = &'a str> + use<'a, 'n> {
        self.entries
            .iter()
            .filter(move |(entry_name, _)| entry_name.eq_ignore_ascii_case(name))
            .map(|(_, value)| value.as_str())
    }

    /// Returns `(name, value)` pairs in order.
    pub fn iter(&self) -> HeaderIter<'_> {
        HeaderIter {
            entries: self.entries.iter(),
        }
    }

    /// Adds a header after the existing ones, keeping earlier values of the
    /// same name. The name is stored lower-case.
    pub fn append(&mut self, name: impl Into<String>, value: impl Into<String>) {
        let mut name = name.into();
        name.make_ascii_lowercase();
        self.entries.push((name, value.into()));
    }

    /// Returns the number of entries, counting each value of a repeated name.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Returns `true` when there are no headers.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Wraps pairs that are already in the host's form, without lower-casing.
    pub(crate) fn from_pairs(entries: Vec<(String, String)>) -> Self {
        Self { entries }
    }

    pub(crate) fn into_pairs(self) -> Vec<(String, String)> {
        self.entries
    }
}

impl<N, V> FromIterator<(N, V)> for Headers
where
    N: Into<String>,
    V: Into<String>,
{
    fn from_iter<I: IntoIterator<Item = (N, V)>>(iter: I) -> Self {
        let mut headers = Headers::new();
        for (name, value) in iter {
            headers.append(name, value);
        }
        headers
    }
}

/// An iterator over the `(name, value)` pairs of [`Headers`], in order.
#[derive(Debug, Clone)]
pub struct HeaderIter<'a> {
    entries: std::slice::Iter<'a, (String, String)>,
}

impl<'a> Iterator for HeaderIter<'a> {
    type Item = (&'a str, &'a str);

    fn next(&mut self) -> Option<Self::Item> {
        let (name, value) = self.entries.next()?;
        Some((name.as_str(), value.as_str()))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.entries.size_hint()
    }
}

impl<'a> IntoIterator for &'a Headers {
    type Item = (&'a str, &'a str);
    type IntoIter = HeaderIter<'a>;

    fn into_iter(self) -> Self::IntoIter {
        self.iter()
    }
}

/// Records a header to set in a list of changes. Names are lower-cased, and
/// the last call for a name wins over an earlier set or removal of it, so the
/// order in which the host applies the two lists does not matter.
pub(crate) fn record_set(
    set_headers: &mut Vec<(String, String)>,
    remove_headers: &mut Vec<String>,
    name: String,
    value: String,
) {
    let name = name.to_ascii_lowercase();
    remove_headers.retain(|removed| *removed != name);
    set_headers.retain(|(set_name, _)| *set_name != name);
    set_headers.push((name, value));
}

/// Records one more value of a header in a list of changes, keeping values
/// set for the same name earlier and cancelling an earlier removal of it.
pub(crate) fn record_append(
    set_headers: &mut Vec<(String, String)>,
    remove_headers: &mut Vec<String>,
    name: String,
    value: String,
) {
    let name = name.to_ascii_lowercase();
    remove_headers.retain(|removed| *removed != name);
    set_headers.push((name, value));
}

/// Records a header to remove in a list of changes, cancelling an earlier set
/// of the same name.
pub(crate) fn record_remove(
    set_headers: &mut Vec<(String, String)>,
    remove_headers: &mut Vec<String>,
    name: String,
) {
    let name = name.to_ascii_lowercase();
    set_headers.retain(|(set_name, _)| *set_name != name);
    if !remove_headers.contains(&name) {
        remove_headers.push(name);
    }
}

/// Request headers that the node sets, removes or checks on every request it
/// sends upstream. A worker that sets one fails the request, or the node
/// overwrites the value.
const SET_BY_NODE: [&str; 16] = [
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "upgrade",
    "te",
    "trailer",
    "proxy-connection",
    "http2-settings",
    "expect",
    "via",
    "forwarded",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// Returns why a worker cannot set the request header `name`: the name is
/// invalid, or the node sets that header itself. Workers check their
/// config's header names with it, so that a mistake stops the node at load.
pub fn settable_header_problem(name: &str) -> Option<&'static str> {
    if !is_token(name) {
        return Some("is not a valid header name");
    }
    if is_set_by_node(name) {
        return Some("is a header the node sets itself, so a worker cannot set it");
    }
    None
}

/// Returns whether the node sets, removes or checks the request header
/// `name`, ignoring ASCII case: `Host`, framing, hop-by-hop and forwarding
/// headers.
pub fn is_set_by_node(name: &str) -> bool {
    SET_BY_NODE.iter().any(|set| set.eq_ignore_ascii_case(name))
}

/// Returns whether `text` is an HTTP token (RFC 9110, section 5.6.2), the
/// form of a header or cookie name.
pub fn is_token(text: &str) -> bool {
    const SYMBOLS: &[u8] = b"!#$%&'*+-.^_`|~";
    !text.is_empty()
        && text
            .bytes()
            .all(|byte| byte.is_ascii_alphanumeric() || SYMBOLS.contains(&byte))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_ignores_case() {
        let headers: Headers = [("X-Api-Key", "k1")].into_iter().collect();
        assert_eq!(headers.get("x-api-key"), Some("k1"));
        assert_eq!(headers.get("X-API-KEY"), Some("k1"));
        assert_eq!(headers.get("x-other"), None);
    }

    #[test]
    fn append_lowercases_name() {
        let mut headers = Headers::new();
        headers.append("Content-Type", "text/plain");
        assert_eq!(headers.iter().next(), Some(("content-type", "text/plain")));
    }

    #[test]
    fn get_all_keeps_order() {
        let headers: Headers = [("accept", "a"), ("x", "1"), ("accept", "b")]
            .into_iter()
            .collect();
        assert_eq!(headers.get("accept"), Some("a"));
        assert_eq!(headers.get_all("accept").collect::<Vec<_>>(), ["a", "b"]);
        assert_eq!(headers.len(), 3);
        assert!(!headers.is_empty());
    }

    #[test]
    fn is_token_cases() {
        assert!(is_token("ab_checkout.v2"));
        assert!(!is_token(""));
        assert!(!is_token("a b"));
        assert!(!is_token("a=b"));
    }

    #[test]
    fn settable_header_problem_cases() {
        assert_eq!(settable_header_problem("x-variant"), None);
        assert_eq!(
            settable_header_problem("x y"),
            Some("is not a valid header name")
        );
        assert_eq!(
            settable_header_problem("X-Forwarded-For"),
            Some("is a header the node sets itself, so a worker cannot set it")
        );
    }
}
