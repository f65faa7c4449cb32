//! Route matching: path normalisation, then host, method and path rules.
//!
//! The raw path is percent-decoded and its dot segments removed before any
//! rule sees it, so `/admin/../users` and `/%75sers` both reach `/users`
//! routes, and the normalised path is what workers see and upstreams receive.

use std::borrow::Cow;
use std::fmt::Write as _;

use http::Method;
use percent_encoding::{percent_encode, AsciiSet, CONTROLS};

/// The reason a request path was rejected before routing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    #[error("malformed percent-encoding in the path")]
    BadEscape,
    #[error("the path decodes to bytes that are not UTF-8")]
    NotUtf8,
    #[error("the path contains an encoded slash, backslash or control character")]
    ForbiddenByte,
    #[error("the path does not start with '/'")]
    NotAbsolute,
    #[error(
        "the path contains ';', which servers such as Tomcat read as the start of path \
         parameters, so that the upstream could see another path than the route matched"
    )]
    Semicolon,
}

/// Returns the normalised form of a raw request path: percent-decoded, with
/// `.` and `..` segments resolved (never above the root) and repeated slashes
/// merged. A trailing slash is kept. Borrows when the path is already normal.
pub fn normalize_path(raw: &str) -> Result<Cow<'_, str>, PathError> {
    if !raw.starts_with('/') {
        return Err(PathError::NotAbsolute);
    }
    if raw.as_bytes().contains(&b';') {
        return Err(PathError::Semicolon);
    }
    if is_normal(raw) {
        return Ok(Cow::Borrowed(raw));
    }
    let decoded = raw[1..]
        .split('/')
        .map(decode_segment)
        .collect::<Result<Vec<String>, PathError>>()?;
    Ok(Cow::Owned(resolve_segments(&decoded, raw.len())))
}

/// Resolves `.` and `..` segments and merges repeated slashes in a path that
/// is already decoded, such as one a worker set. Never goes above the root.
pub fn resolve_dot_segments(path: &str) -> String {
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    resolve_segments(&segments, path.len())
}

fn resolve_segments<S: AsRef<str>>(segments: &[S], capacity: usize) -> String {
    let mut kept: Vec<&str> = Vec::with_capacity(segments.len());
    let mut trailing_slash = false;
    for (index, segment) in segments.iter().enumerate() {
        let last = index + 1 == segments.len();
        match segment.as_ref() {
            "" | "." => trailing_slash = last,
            ".." => {
                kept.pop();
                trailing_slash = last;
            }
            other => {
                kept.push(other);
                trailing_slash = false;
            }
        }
    }
    let mut path = String::with_capacity(capacity);
    for segment in kept {
        path.push('/');
        path.push_str(segment);
    }
    if path.is_empty() || trailing_slash {
        path.push('/');
    }
    path
}

/// True when normalising would change nothing: no escapes, dot segments or
/// empty segments.
fn is_normal(raw: &str) -> bool {
    let bytes = raw.as_bytes();
    // Raw non-ASCII text is checked for control characters on the way.
    if bytes.contains(&b'%') || bytes.contains(&b'\\') || !raw.is_ascii() {
        return false;
    }
    let mut segments = raw[1..].split('/').peekable();
    while let Some(segment) = segments.next() {
        let last = segments.peek().is_none();
        if segment == "." || segment == ".." || (segment.is_empty() && !last) {
            return false;
        }
    }
    true
}

fn decode_segment(raw: &str) -> Result<String, PathError> {
    let bytes = raw.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let byte = bytes[i];
        if byte == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(PathError::BadEscape)?;
            let hex = std::str::from_utf8(hex).map_err(|_| PathError::BadEscape)?;
            let value = u8::from_str_radix(hex, 16).map_err(|_| PathError::BadEscape)?;
            decoded.push(value);
            i += 3;
        } else {
            decoded.push(byte);
            i += 1;
        }
    }
    if decoded
        .iter()
        .any(|&b| b == b'/' || b == b'\\' || b < 0x20 || b == 0x7f)
    {
        return Err(PathError::ForbiddenByte);
    }
    if decoded.contains(&b';') {
        return Err(PathError::Semicolon);
    }
    let decoded = String::from_utf8(decoded).map_err(|_| PathError::NotUtf8)?;
    // The C1 control characters, U+0080 to U+009F, are two bytes in UTF-8.
    if !decoded.is_ascii() && decoded.chars().any(char::is_control) {
        return Err(PathError::ForbiddenByte);
    }
    Ok(decoded)
}

/// Characters that must be escaped in a path segment sent upstream.
const SEGMENT: &AsciiSet = &CONTROLS
    .add(b' ')
    .add(b'"')
    .add(b'#')
    .add(b'<')
    .add(b'>')
    .add(b'?')
    .add(b'`')
    .add(b'{')
    .add(b'}')
    .add(b'%')
    .add(b'^')
    .add(b'|')
    .add(b'[')
    .add(b']');

/// Returns the normalised path in the form sent on the wire: every segment
/// percent-encoded where needed. Borrows when nothing needs encoding.
pub fn encode_path(path: &str) -> Cow<'_, str> {
    if !path.split('/').any(needs_encoding) {
        return Cow::Borrowed(path);
    }
    let mut out = String::with_capacity(path.len() + 8);
    for (index, segment) in path.split('/').enumerate() {
        if index > 0 {
            out.push('/');
        }
        let _ = write!(out, "{}", percent_encode(segment.as_bytes(), SEGMENT));
    }
    Cow::Owned(out)
}

/// Returns the query in the form sent on the wire: bytes outside ASCII
/// percent-encoded, everything else, escapes included, as it came.
pub fn encode_query(query: &str) -> Cow<'_, str> {
    if query.is_ascii() {
        return Cow::Borrowed(query);
    }
    Cow::Owned(percent_encode(query.as_bytes(), CONTROLS).to_string())
}

/// Returns whether `segment` changes when percent-encoded. The encoder
/// yields the input itself as its one chunk exactly when nothing needs
/// escaping. A segment of one escaped character, such as `?`, is a single
/// chunk too, but a new string (`%3F`), so the check compares addresses.
fn needs_encoding(segment: &str) -> bool {
    let mut chunks = percent_encode(segment.as_bytes(), SEGMENT);
    match chunks.next() {
        None => false,
        Some(first) => !std::ptr::eq(first, segment) || chunks.next().is_some(),
    }
}

/// The path rule of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    /// This path and everything below it, on whole segments.
    Prefix(String),
    /// Exactly this path.
    Exact(String),
    /// Segments that are literal or named parameters, such as `/{device}/home`.
    Pattern(Vec<PatternSegment>),
}

/// One segment of a path pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternSegment {
    Literal(String),
    Param(String),
}

impl PathMatch {
    /// Parses a prefix from the config; a trailing slash is ignored.
    pub fn prefix(value: &str) -> Result<PathMatch, String> {
        let normal = config_path(value)?;
        let trimmed = normal.trim_end_matches('/');
        Ok(PathMatch::Prefix(
            if trimmed.is_empty() { "/" } else { trimmed }.to_owned(),
        ))
    }

    /// Parses an exact path from the config.
    pub fn exact(value: &str) -> Result<PathMatch, String> {
        Ok(PathMatch::Exact(config_path(value)?))
    }

    /// Parses a pattern such as `/{device}/home` from the config.
    pub fn pattern(value: &str) -> Result<PathMatch, String> {
        if !value.starts_with('/') {
            return Err(format!("pattern {value:?} must start with '/'"));
        }
        let mut segments = Vec::new();
        let mut names = Vec::new();
        for segment in value[1..].split('/') {
            if let Some(name) = segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
                let valid = !name.is_empty()
                    && name
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !valid {
                    return Err(format!(
                        "{segment:?} in pattern {value:?} is not a valid parameter name"
                    ));
                }
                if names.contains(&name) {
                    return Err(format!(
                        "parameter {name:?} appears twice in pattern {value:?}"
                    ));
                }
                names.push(name);
                segments.push(PatternSegment::Param(name.to_owned()));
            } else if segment.contains(['{', '}']) {
                return Err(format!(
                    "segment {segment:?} in pattern {value:?} must be a whole {{name}} \
                     or plain text"
                ));
            } else {
                segments.push(PatternSegment::Literal(
                    config_path(&format!("/{segment}"))?[1..].to_owned(),
                ));
            }
        }
        Ok(PathMatch::Pattern(segments))
    }

    /// Matches a normalised path, returning named parameter values.
    pub fn matches(&self, path: &str) -> Option<Vec<(String, String)>> {
        self.matches_case(path, true)
    }

    /// Matches a normalised path as [`PathMatch::matches`] does, comparing
    /// the rule's text with ASCII case ignored unless `case_sensitive`.
    pub fn matches_case(&self, path: &str, case_sensitive: bool) -> Option<Vec<(String, String)>> {
        let same = |rule: &str, text: &str| {
            if case_sensitive {
                rule == text
            } else {
                rule.eq_ignore_ascii_case(text)
            }
        };
        match self {
            PathMatch::Prefix(prefix) => {
                let hit = prefix == "/"
                    || path.get(..prefix.len()).is_some_and(|head| {
                        let rest = &path[prefix.len()..];
                        same(prefix, head) && (rest.is_empty() || rest.starts_with('/'))
                    });
                hit.then(Vec::new)
            }
            PathMatch::Exact(exact) => same(exact, path).then(Vec::new),
            PathMatch::Pattern(segments) => {
                let mut params = Vec::new();
                let mut parts = path[1..].split('/');
                for segment in segments {
                    let part = parts.next()?;
                    match segment {
                        PatternSegment::Literal(literal) if same(literal, part) => {}
                        PatternSegment::Param(name) if !part.is_empty() => {
                            params.push((name.clone(), part.to_owned()));
                        }
                        _ => return None,
                    }
                }
                parts.next().is_none().then_some(params)
            }
        }
    }

    /// Orders path rules from most to least specific.
    fn specificity(&self) -> (u8, usize) {
        match self {
            PathMatch::Exact(path) => (3, path.len()),
            PathMatch::Pattern(segments) => {
                let literals = segments
                    .iter()
                    .filter(|s| matches!(s, PatternSegment::Literal(_)))
                    .count();
                (2, segments.len() * 64 + literals)
            }
            PathMatch::Prefix(prefix) => (1, prefix.len()),
        }
    }
}

impl std::fmt::Display for PathMatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PathMatch::Prefix(prefix) => write!(f, "prefix {prefix}"),
            PathMatch::Exact(path) => write!(f, "path {path}"),
            PathMatch::Pattern(segments) => {
                f.write_str("pattern ")?;
                for segment in segments {
                    match segment {
                        PatternSegment::Literal(literal) => write!(f, "/{literal}")?,
                        PatternSegment::Param(name) => write!(f, "/{{{name}}}")?,
                    }
                }
                Ok(())
            }
        }
    }
}

fn config_path(value: &str) -> Result<String, String> {
    normalize_path(value)
        .map(Cow::into_owned)
        .map_err(|e| format!("path {value:?} is invalid: {e}"))
}

/// The `Host` rule of a route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostMatch {
    Any,
    Exact(String),
    /// Any subdomain of this suffix, given with its leading dot: `.example.com`.
    Wildcard(String),
}

impl HostMatch {
    /// Parses the `host` field of a route.
    pub fn parse(value: Option<&str>) -> HostMatch {
        match value {
            None => HostMatch::Any,
            Some(host) => match host.strip_prefix('*') {
                Some(suffix) => HostMatch::Wildcard(suffix.to_ascii_lowercase()),
                None => HostMatch::Exact(host.to_ascii_lowercase()),
            },
        }
    }

    /// Matches a lower-case host name without its port.
    pub fn matches(&self, host: Option<&str>) -> bool {
        match self {
            HostMatch::Any => true,
            HostMatch::Exact(exact) => host == Some(exact.as_str()),
            HostMatch::Wildcard(suffix) => {
                host.is_some_and(|h| h.len() > suffix.len() && h.ends_with(suffix.as_str()))
            }
        }
    }

    fn specificity(&self) -> (u8, usize) {
        match self {
            HostMatch::Exact(host) => (2, host.len()),
            HostMatch::Wildcard(suffix) => (1, suffix.len()),
            HostMatch::Any => (0, 0),
        }
    }
}

/// The matching rules of one route.
#[derive(Debug, Clone)]
pub struct RouteRule {
    /// The route's index in the config.
    pub index: usize,
    pub name: String,
    pub host: HostMatch,
    /// Empty for any method.
    pub methods: Vec<Method>,
    pub path: PathMatch,
    /// Whether the path rule's letters must match in case.
    pub case_sensitive: bool,
}

/// A route that matched, with its parameter values.
#[derive(Debug)]
pub struct RouteMatch {
    /// The route's index in the config.
    pub index: usize,
    pub params: Vec<(String, String)>,
}

/// The outcome of matching one route, for `edge routes explain`.
#[derive(Debug)]
pub struct Verdict<'a> {
    pub rule: &'a RouteRule,
    /// `None` when the route matches, else the first rule that failed.
    pub mismatch: Option<String>,
}

/// All routes, most specific first: exact host before wildcard before any,
/// exact path before pattern before the longest prefix, a method list before
/// any method, and config order among equals.
#[derive(Debug, Clone, Default)]
pub struct Router {
    rules: Vec<RouteRule>,
}

impl Router {
    /// Builds a router, ordering rules by specificity.
    pub fn new(mut rules: Vec<RouteRule>) -> Router {
        rules.sort_by(|a, b| {
            let key = |r: &RouteRule| {
                (
                    r.host.specificity(),
                    r.path.specificity(),
                    !r.methods.is_empty(),
                )
            };
            key(b).cmp(&key(a)).then(a.index.cmp(&b.index))
        });
        Router { rules }
    }

    /// Finds the route for a request; `host` is lower-case without its port.
    pub fn find(&self, host: Option<&str>, method: &Method, path: &str) -> Option<RouteMatch> {
        self.rules.iter().find_map(|rule| {
            if !rule.host.matches(host) {
                return None;
            }
            if !rule.methods.is_empty() && !rule.methods.contains(method) {
                return None;
            }
            let params = rule.path.matches_case(path, rule.case_sensitive)?;
            Some(RouteMatch {
                index: rule.index,
                params,
            })
        })
    }

    /// Returns every route in the order they are tried, each with why it
    /// does or does not match.
    pub fn explain(&self, host: Option<&str>, method: &Method, path: &str) -> Vec<Verdict<'_>> {
        self.rules
            .iter()
            .map(|rule| {
                let mismatch = if !rule.host.matches(host) {
                    let rule_host = describe_host(&rule.host);
                    Some(match host {
                        Some(host) => format!("host {rule_host} does not match {host:?}"),
                        None => format!("host {rule_host}, and the request has none (pass --host)"),
                    })
                } else if !rule.methods.is_empty() && !rule.methods.contains(method) {
                    let list: Vec<&str> = rule.methods.iter().map(Method::as_str).collect();
                    Some(format!("method {method} is not one of {}", list.join(", ")))
                } else if rule.path.matches_case(path, rule.case_sensitive).is_none() {
                    let case = if rule.case_sensitive {
                        ""
                    } else {
                        " (any case)"
                    };
                    Some(format!("{}{case} does not match {path}", rule.path))
                } else {
                    None
                };
                Verdict { rule, mismatch }
            })
            .collect()
    }
}

fn describe_host(host: &HostMatch) -> String {
    match host {
        HostMatch::Any => "any".to_owned(),
        HostMatch::Exact(host) => host.clone(),
        HostMatch::Wildcard(suffix) => format!("*{suffix}"),
    }
}

/// Returns the lower-case host name of a `Host` header or URI authority,
/// without its port.
pub fn host_name(authority: &str) -> Cow<'_, str> {
    let host = if authority.starts_with('[') {
        authority.split_inclusive(']').next().unwrap_or(authority)
    } else {
        authority
            .rsplit_once(':')
            .map_or(authority, |(host, _)| host)
    };
    // `example.com.` is the same name as `example.com`.
    let host = host.strip_suffix('.').unwrap_or(host);
    if host.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(host.to_ascii_lowercase())
    } else {
        Cow::Borrowed(host)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_resolves_dots_escapes_and_slashes() {
        let cases = [
            ("/", "/"),
            ("/users", "/users"),
            ("/users/", "/users/"),
            ("/a/../users", "/users"),
            ("/../../etc", "/etc"),
            ("/a/./b", "/a/b"),
            ("/a//b", "/a/b"),
            ("/%75sers", "/users"),
            ("/a/%2e%2e/b", "/b"),
            ("/caf%C3%A9", "/café"),
            ("/a/b/..", "/a/"),
            ("/a%20b", "/a b"),
        ];
        for (raw, normal) in cases {
            assert_eq!(normalize_path(raw).unwrap(), normal, "normalising {raw}");
        }
    }

    #[test]
    fn resolve_dot_segments_of_decoded_paths() {
        assert_eq!(resolve_dot_segments("/a b/../c"), "/c");
        assert_eq!(resolve_dot_segments("/../../x/"), "/x/");
        assert_eq!(resolve_dot_segments("//a//b"), "/a/b");
        assert_eq!(resolve_dot_segments("/100%"), "/100%");
    }

    #[test]
    fn normalize_borrows_normal_paths() {
        assert!(matches!(
            normalize_path("/users/7").unwrap(),
            Cow::Borrowed(_)
        ));
        assert!(matches!(
            normalize_path("/users/").unwrap(),
            Cow::Borrowed(_)
        ));
    }

    #[test]
    fn normalize_rejects_bad_paths() {
        assert_eq!(normalize_path("/a%2Fb"), Err(PathError::ForbiddenByte));
        for raw in ["/x/..;/hs/x", "/hs;a/x", "/x/..%3B/hs/x", "/a/b%3bc"] {
            assert_eq!(normalize_path(raw), Err(PathError::Semicolon), "{raw}");
        }
        assert_eq!(normalize_path("/a%5cb"), Err(PathError::ForbiddenByte));
        assert_eq!(normalize_path("/a%00"), Err(PathError::ForbiddenByte));
        // C1 control characters, encoded or raw.
        assert_eq!(normalize_path("/a%C2%85"), Err(PathError::ForbiddenByte));
        assert_eq!(normalize_path("/a\u{85}b"), Err(PathError::ForbiddenByte));
        assert_eq!(normalize_path("/a\u{9f}"), Err(PathError::ForbiddenByte));
        assert_eq!(normalize_path("/caf%C3%A9").as_deref(), Ok("/café"));
        assert_eq!(normalize_path("/café").as_deref(), Ok("/café"));
        assert_eq!(normalize_path("/a%zz"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/a%4"), Err(PathError::BadEscape));
        assert_eq!(normalize_path("/%ff"), Err(PathError::NotUtf8));
        assert_eq!(normalize_path("a"), Err(PathError::NotAbsolute));
    }

    #[test]
    fn encode_path_escapes_what_the_wire_needs() {
        assert_eq!(encode_path("/a b/café"), "/a%20b/caf%C3%A9");
        assert_eq!(encode_path("/100%"), "/100%25");
        assert_eq!(encode_path("/ ab"), "/%20ab");
        assert!(matches!(encode_path("/users/7"), Cow::Borrowed(_)));
        // Segments of one character that needs escaping.
        assert_eq!(encode_path("/?/home"), "/%3F/home");
        assert_eq!(encode_path("/#/x"), "/%23/x");
        assert_eq!(encode_path("/a/%/b"), "/a/%25/b");
        assert_eq!(encode_path("/a/ /b"), "/a/%20/b");
        assert_eq!(encode_path("/admin/?"), "/admin/%3F");
    }

    #[test]
    fn prefix_matches_whole_segments() {
        let prefix = PathMatch::prefix("/users/").unwrap();
        assert!(prefix.matches("/users").is_some());
        assert!(prefix.matches("/users/7").is_some());
        assert!(prefix.matches("/usersx").is_none());
        assert!(PathMatch::prefix("/")
            .unwrap()
            .matches("/anything")
            .is_some());
    }

    #[test]
    fn case_insensitive_rules_ignore_ascii_case() {
        let prefix = PathMatch::prefix("/users").unwrap();
        assert!(prefix.matches("/USERS/7").is_none());
        assert!(prefix.matches_case("/USERS/7", false).is_some());
        assert!(prefix.matches_case("/UsersX", false).is_none());
        // A multi-byte character where the prefix ends is no match.
        assert!(prefix.matches_case("/user\u{e9}/7", false).is_none());
        let exact = PathMatch::exact("/Me").unwrap();
        assert!(exact.matches_case("/mE", false).is_some());
        let pattern = PathMatch::pattern("/{device}/home").unwrap();
        assert_eq!(
            pattern.matches_case("/TV/HOME", false),
            Some(vec![("device".to_owned(), "TV".to_owned())])
        );
    }

    #[test]
    fn pattern_captures_named_segments() {
        let pattern = PathMatch::pattern("/{device}/home").unwrap();
        let params = pattern.matches("/mobile/home").unwrap();
        assert_eq!(params, vec![("device".to_owned(), "mobile".to_owned())]);
        assert!(pattern.matches("/mobile/home/x").is_none());
        assert!(pattern.matches("/mobile").is_none());
        assert!(PathMatch::pattern("/{a}/{a}").is_err());
        assert!(PathMatch::pattern("/x{a}").is_err());
    }

    fn rule(index: usize, host: Option<&str>, methods: &[&str], path: PathMatch) -> RouteRule {
        RouteRule {
            index,
            name: format!("r{index}"),
            host: HostMatch::parse(host),
            methods: methods.iter().map(|m| m.parse().unwrap()).collect(),
            path,
            case_sensitive: true,
        }
    }

    #[test]
    fn router_prefers_specific_routes() {
        let router = Router::new(vec![
            rule(0, None, &[], PathMatch::prefix("/").unwrap()),
            rule(1, None, &[], PathMatch::prefix("/users").unwrap()),
            rule(2, None, &["POST"], PathMatch::prefix("/users").unwrap()),
            rule(
                3,
                Some("api.example.com"),
                &[],
                PathMatch::prefix("/").unwrap(),
            ),
            rule(
                4,
                Some("*.example.com"),
                &[],
                PathMatch::prefix("/").unwrap(),
            ),
            rule(5, None, &[], PathMatch::exact("/users/me").unwrap()),
        ]);
        let find = |host, method: &str, path| {
            router
                .find(host, &method.parse().unwrap(), path)
                .map(|m| m.index)
        };
        assert_eq!(find(None, "GET", "/other"), Some(0));
        assert_eq!(find(None, "GET", "/users/7"), Some(1));
        assert_eq!(find(None, "POST", "/users/7"), Some(2));
        assert_eq!(find(Some("api.example.com"), "GET", "/users"), Some(3));
        assert_eq!(find(Some("www.example.com"), "GET", "/users"), Some(4));
        assert_eq!(find(Some("example.com"), "GET", "/users"), Some(1));
        assert_eq!(find(None, "GET", "/users/me"), Some(5));
    }

    #[test]
    fn explain_names_a_missing_host() {
        let router = Router::new(vec![rule(
            0,
            Some("api.example.com"),
            &[],
            PathMatch::prefix("/").unwrap(),
        )]);
        let method = Method::GET;
        let missing = router.explain(None, &method, "/");
        let reason = missing[0].mismatch.as_deref().unwrap();
        assert!(
            reason.ends_with("the request has none (pass --host)"),
            "{reason}"
        );
        let other = router.explain(Some("other.example.com"), &method, "/");
        let reason = other[0].mismatch.as_deref().unwrap();
        assert!(
            reason.ends_with("does not match \"other.example.com\""),
            "{reason}"
        );
    }

    #[test]
    fn host_name_strips_port_and_case() {
        assert_eq!(host_name("API.example.com:8080"), "api.example.com");
        assert_eq!(host_name("[::1]:8080"), "[::1]");
        assert_eq!(host_name("localhost"), "localhost");
        assert_eq!(host_name("example.com.:80"), "example.com");
    }
}
