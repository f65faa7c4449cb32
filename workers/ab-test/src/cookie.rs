//! Reading request cookies and writing the sticky `Set-Cookie` value.

use edge_sdk::Headers;

/// Returns the value of the first cookie named `name` in the request's
/// `Cookie` headers (RFC 6265, section 5.4), without surrounding quotes.
/// An HTTP/2 client may send several `Cookie` headers, so all are read.
pub fn find<'a>(headers: &'a Headers, name: &str) -> Option<&'a str> {
    headers
        .get_all("cookie")
        .flat_map(|header| header.split(';'))
        .filter_map(|pair| pair.split_once('='))
        .find(|(pair_name, _)| pair_name.trim() == name)
        .map(|(_, value)| {
            let value = value.trim();
            value
                .strip_prefix('"')
                .and_then(|inner| inner.strip_suffix('"'))
                .unwrap_or(value)
        })
}

/// The attributes of the sticky cookie.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StickyCookie {
    pub name: String,
    pub path: String,
    pub domain: Option<String>,
    pub max_age_secs: u64,
    pub secure: bool,
}

impl StickyCookie {
    /// Returns the `Set-Cookie` value that stores `variant`.
    pub fn set_cookie(&self, variant: &str) -> String {
        let mut value = format!(
            "{}={variant}; Path={}; Max-Age={}",
            self.name, self.path, self.max_age_secs
        );
        if let Some(domain) = &self.domain {
            value.push_str("; Domain=");
            value.push_str(domain);
        }
        value.push_str("; HttpOnly; SameSite=Lax");
        if self.secure {
            value.push_str("; Secure");
        }
        value
    }
}

/// Returns whether `value` may appear in a cookie attribute such as `Path`
/// or `Domain`: printable ASCII other than `;`.
pub fn is_attribute_value(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|byte| (0x20..0x7f).contains(&byte) && byte != b';')
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(cookies: &[&str]) -> Headers {
        cookies.iter().map(|value| ("cookie", *value)).collect()
    }

    #[test]
    fn find_reads_named_cookie() {
        let headers = headers(&["a=1; ab_checkout=new;b=2"]);
        assert_eq!(find(&headers, "ab_checkout"), Some("new"));
        assert_eq!(find(&headers, "a"), Some("1"));
        assert_eq!(find(&headers, "b"), Some("2"));
        assert_eq!(find(&headers, "ab"), None);
    }

    #[test]
    fn find_reads_every_cookie_header() {
        let headers = headers(&["a=1", "ab_checkout=control"]);
        assert_eq!(find(&headers, "ab_checkout"), Some("control"));
    }

    #[test]
    fn find_strips_quotes_and_keeps_first() {
        let headers = headers(&["x=\"quoted\"; x=second"]);
        assert_eq!(find(&headers, "x"), Some("quoted"));
    }

    #[test]
    fn find_ignores_pairs_without_equals() {
        let headers = headers(&["flag; x=1"]);
        assert_eq!(find(&headers, "flag"), None);
        assert_eq!(find(&headers, "x"), Some("1"));
        assert_eq!(find(&Headers::new(), "x"), None);
    }

    #[test]
    fn set_cookie_has_attributes() {
        let mut cookie = StickyCookie {
            name: "ab_checkout".to_string(),
            path: "/".to_string(),
            domain: None,
            max_age_secs: 2_592_000,
            secure: false,
        };
        assert_eq!(
            cookie.set_cookie("new"),
            "ab_checkout=new; Path=/; Max-Age=2592000; HttpOnly; SameSite=Lax"
        );
        cookie.secure = true;
        cookie.domain = Some("example.com".to_string());
        assert_eq!(
            cookie.set_cookie("new"),
            "ab_checkout=new; Path=/; Max-Age=2592000; Domain=example.com; HttpOnly; \
             SameSite=Lax; Secure"
        );
    }

    #[test]
    fn attribute_value_checks() {
        assert!(is_attribute_value("/shop"));
        assert!(!is_attribute_value("/a;b"));
        assert!(!is_attribute_value("/a\nb"));
        assert!(!is_attribute_value(""));
    }
}
