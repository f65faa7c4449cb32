//! Formats access-log records as JSON lines by hand, into the writer's
//! reused buffer: no intermediate strings, no serializer, and the time's
//! date and second formatted once per second.

use std::io::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use http::Version;

use super::{Names, Record, REDACTED};

/// Turns records into JSON lines, keeping the text of the last second seen.
pub struct LineFormatter {
    /// The Unix second `second_text` was made for.
    second: Option<u64>,
    /// `YYYY-MM-DDTHH:MM:SS` of `second`.
    second_text: [u8; 19],
}

impl Default for LineFormatter {
    fn default() -> Self {
        LineFormatter {
            second: None,
            second_text: [b'0'; 19],
        }
    }
}

impl LineFormatter {
    /// Appends the line of `record`, newline included, to `out`.
    pub fn write(&mut self, record: &Record, names: &Names, out: &mut Vec<u8>) {
        out.extend_from_slice(b"{\"time\":\"");
        self.write_time(record.time, out);
        out.extend_from_slice(b"\",\"node\":");
        write_str(out, &names.node);
        out.extend_from_slice(b",\"request_id\":");
        match record.request_id.as_ref().and_then(|id| id.to_str().ok()) {
            Some(id) => write_str(out, id),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"trace_id\":");
        write_hex_or_null(out, record.trace_id.as_ref().map(|id| &id[..]));
        out.extend_from_slice(b",\"span_id\":");
        write_hex_or_null(out, record.span_id.as_ref().map(|id| &id[..]));
        out.extend_from_slice(b",\"client\":\"");
        write_ip(out, record.client);
        out.extend_from_slice(b"\",\"method\":");
        write_str(out, record.method.as_str());
        out.extend_from_slice(b",\"path\":\"");
        write_redacted_path(out, record.uri.path());
        out.push(b'"');
        out.extend_from_slice(b",\"query\":");
        match record.uri.query() {
            Some(query) => {
                out.push(b'"');
                write_redacted_query(out, query);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"protocol\":\"");
        out.extend_from_slice(protocol(record.version).as_bytes());
        out.extend_from_slice(b"\",\"route\":");
        write_name_or_null(out, record.route.and_then(|i| names.routes.get(i)));
        out.extend_from_slice(b",\"upstream\":");
        write_name_or_null(out, record.upstream.and_then(|i| names.upstreams.get(i)));
        out.extend_from_slice(b",\"target\":");
        match record.target {
            Some(target) => {
                out.push(b'"');
                write_socket_addr(out, target);
                out.push(b'"');
            }
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"status\":");
        write_u64(out, u64::from(record.status));
        out.extend_from_slice(b",\"reason\":\"");
        out.extend_from_slice(record.reason.name().as_bytes());
        out.extend_from_slice(b"\",\"bytes_in\":");
        match record.bytes_in {
            Some(bytes) => write_u64(out, bytes),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b",\"bytes_out\":");
        write_u64(out, record.bytes_out);
        out.extend_from_slice(b",\"completed\":");
        out.extend_from_slice(if record.completed { b"true" } else { b"false" });
        out.extend_from_slice(b",\"durations_ms\":{\"total\":");
        write_millis(out, record.total);
        out.extend_from_slice(b",\"head\":");
        write_millis(out, record.head);
        out.extend_from_slice(b",\"gateway\":");
        write_millis(out, record.head.saturating_sub(record.upstream_time));
        out.extend_from_slice(b",\"ratelimit\":");
        write_millis(out, record.ratelimit);
        out.extend_from_slice(b",\"workers\":");
        write_millis(out, record.workers);
        out.extend_from_slice(b",\"upstream\":");
        write_millis(out, record.upstream_time);
        out.extend_from_slice(b"},\"user\":");
        match &record.user {
            Some(user) => write_str(out, user),
            None => out.extend_from_slice(b"null"),
        }
        out.extend_from_slice(b"}\n");
    }

    /// Appends `time` in RFC 3339 UTC with milliseconds, such as
    /// `2026-12-05T00:46:13.123Z`. A time before 1970 is written as 1970.
    fn write_time(&mut self, time: SystemTime, out: &mut Vec<u8>) {
        let since_epoch = time.duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO);
        let second = since_epoch.as_secs();
        if self.second != Some(second) {
            self.second_text = format_second(second);
            self.second = Some(second);
        }
        out.extend_from_slice(&self.second_text);
        let millis = since_epoch.subsec_millis();
        out.extend_from_slice(&[
            b'.',
            b'0' + (millis / 100) as u8,
            b'0' + (millis / 10 % 10) as u8,
            b'0' + (millis % 10) as u8,
            b'Z',
        ]);
    }
}

/// Formats a Unix second as `YYYY-MM-DDTHH:MM:SS` (UTC, proleptic
/// Gregorian calendar, years up to 9999).
fn format_second(second: u64) -> [u8; 19] {
    let days = second / 86_400;
    let of_day = second % 86_400;
    let (year, month, day) = civil_from_days(days);
    let mut text = *b"0000-00-00T00:00:00";
    let mut put = |at: usize, value: u64, width: usize| {
        let mut value = value;
        for index in (at..at + width).rev() {
            text[index] = b'0' + (value % 10) as u8;
            value /= 10;
        }
    };
    put(0, year.min(9999), 4);
    put(5, month, 2);
    put(8, day, 2);
    put(11, of_day / 3600, 2);
    put(14, of_day / 60 % 60, 2);
    put(17, of_day % 60, 2);
    text
}

/// Converts days since 1970-01-01 to (year, month, day), with Howard
/// Hinnant's `civil_from_days` algorithm for the proleptic Gregorian
/// calendar.
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let day_of_era = z - era * 146_097;
    let year_of_era =
        (day_of_era - day_of_era / 1460 + day_of_era / 36_524 - day_of_era / 146_096) / 365;
    let day_of_year = day_of_era - (365 * year_of_era + year_of_era / 4 - year_of_era / 100);
    let shifted_month = (5 * day_of_year + 2) / 153;
    let day = day_of_year - (153 * shifted_month + 2) / 5 + 1;
    let month = if shifted_month < 10 {
        shifted_month + 3
    } else {
        shifted_month - 9
    };
    let year = year_of_era + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

fn protocol(version: Version) -> &'static str {
    match version {
        Version::HTTP_09 => "HTTP/0.9",
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2.0",
        Version::HTTP_3 => "HTTP/3.0",
        _ => "unknown",
    }
}

/// Appends `text` as a JSON string, quotes included. `"`, `\` and control
/// characters are escaped (RFC 8259, section 7). The C1 control characters
/// and U+2028 and U+2029 are escaped too, because many readers take them as
/// line breaks. Everything else, non-ASCII included, is copied as UTF-8.
pub fn write_str(out: &mut Vec<u8>, text: &str) {
    out.push(b'"');
    write_escaped(out, text);
    out.push(b'"');
}

/// Appends the inside of a JSON string for `text`, without quotes.
fn write_escaped(out: &mut Vec<u8>, text: &str) {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let bytes = text.as_bytes();
    let mut start = 0;
    let mut index = 0;
    while index < bytes.len() {
        let byte = bytes[index];
        // The escaped character as a code point, and its length in UTF-8.
        let (code, length) = match (byte, bytes.get(index + 1), bytes.get(index + 2)) {
            (b'"', ..) => (0x22, 1),
            (b'\\', ..) => (0x5c, 1),
            (0x00..=0x1f, ..) => (u32::from(byte), 1),
            (0xc2, Some(&next @ 0x80..=0x9f), _) => (u32::from(next), 2),
            (0xe2, Some(&0x80), Some(&last @ (0xa8 | 0xa9))) => {
                (0x2000 | u32::from(last & 0x3f), 3)
            }
            _ => {
                index += 1;
                continue;
            }
        };
        out.extend_from_slice(&bytes[start..index]);
        match code {
            0x22 => out.extend_from_slice(b"\\\""),
            0x5c => out.extend_from_slice(b"\\\\"),
            0x0a => out.extend_from_slice(b"\\n"),
            0x0d => out.extend_from_slice(b"\\r"),
            0x09 => out.extend_from_slice(b"\\t"),
            0x08 => out.extend_from_slice(b"\\b"),
            0x0c => out.extend_from_slice(b"\\f"),
            _ => {
                out.extend_from_slice(b"\\u");
                for shift in [12, 8, 4, 0] {
                    out.push(HEX[((code >> shift) & 0x0f) as usize]);
                }
            }
        }
        index += length;
        start = index;
    }
    out.extend_from_slice(&bytes[start..]);
}

fn write_name_or_null(out: &mut Vec<u8>, name: Option<&std::sync::Arc<str>>) {
    match name {
        Some(name) => write_str(out, name),
        None => out.extend_from_slice(b"null"),
    }
}

fn write_hex_or_null(out: &mut Vec<u8>, bytes: Option<&[u8]>) {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let Some(bytes) = bytes else {
        out.extend_from_slice(b"null");
        return;
    };
    out.push(b'"');
    for byte in bytes {
        out.push(DIGITS[usize::from(byte >> 4)]);
        out.push(DIGITS[usize::from(byte & 0x0f)]);
    }
    out.push(b'"');
}

fn write_u64(out: &mut Vec<u8>, value: u64) {
    out.extend_from_slice(itoa::Buffer::new().format(value).as_bytes());
}

/// Appends a duration as a JSON number of milliseconds with three decimals
/// (microsecond resolution), such as `0.412`.
fn write_millis(out: &mut Vec<u8>, duration: Duration) {
    let micros = duration.as_micros().min(u128::from(u64::MAX)) as u64;
    write_u64(out, micros / 1000);
    let fraction = micros % 1000;
    out.extend_from_slice(&[
        b'.',
        b'0' + (fraction / 100) as u8,
        b'0' + (fraction / 10 % 10) as u8,
        b'0' + (fraction % 10) as u8,
    ]);
}

fn write_ip(out: &mut Vec<u8>, ip: IpAddr) {
    match ip {
        IpAddr::V4(v4) => {
            for (index, octet) in v4.octets().iter().enumerate() {
                if index > 0 {
                    out.push(b'.');
                }
                write_u64(out, u64::from(*octet));
            }
        }
        // IPv6 text (compressed zeros, mapped forms) is left to the
        // standard library; it is rarer on a node's listeners.
        IpAddr::V6(v6) => {
            let _ = write!(out, "{v6}");
        }
    }
}

fn write_socket_addr(out: &mut Vec<u8>, addr: SocketAddr) {
    match addr {
        SocketAddr::V4(v4) => write_ip(out, IpAddr::V4(*v4.ip())),
        SocketAddr::V6(_) => {
            let _ = write!(out, "{addr}");
            return;
        }
    }
    out.push(b':');
    write_u64(out, u64::from(addr.port()));
}

/// Returns whether a query parameter's name looks like it carries a
/// credential: it contains `token`, `secret`, `passw`, `passphrase`, `key`,
/// `auth`, `session`, `signature`, `credential`, `bearer`, `refresh`,
/// `assertion` or `verifier`, or is `sig`, `pwd`, `pass`, `code`, `jwt`,
/// `otp`, `pin`, `sid`, `ticket`, `hmac` or `samlresponse`
/// (case-insensitive). A whole name may carry the brackets of an array or
/// map parameter, as in `jwt[]` or `code[0]`, and spaces (`+`) around it.
fn is_sensitive(name: &str) -> bool {
    const PARTS: [&str; 13] = [
        "token",
        "secret",
        "passw",
        "passphrase",
        "verifier",
        "key",
        "auth",
        "session",
        "signature",
        "credential",
        "bearer",
        "refresh",
        "assertion",
    ];
    const WHOLE: [&str; 11] = [
        "sig",
        "pwd",
        "pass",
        "code",
        "jwt",
        "otp",
        "pin",
        "sid",
        "ticket",
        "hmac",
        "samlresponse",
    ];
    let name = name.to_ascii_lowercase().replace('+', " ");
    let base = name.split(['[', ']']).next().unwrap_or_default().trim();
    PARTS.iter().any(|part| name.contains(part)) || WHOLE.contains(&base)
}

/// Calls `emit` with each piece of `query`: parameters with the values of
/// credential-like names replaced by [`REDACTED`], and the `&` or `;`
/// separators between them, in order.
fn redact_pieces<'a>(query: &'a str, mut emit: impl FnMut(&'a str)) {
    for (index, pair) in query.split(['&', ';']).enumerate() {
        if index > 0 {
            // The separator just before this pair, as sent.
            let at = pair.as_ptr() as usize - query.as_ptr() as usize - 1;
            emit(&query[at..at + 1]);
        }
        let Some((name, value)) = pair.split_once('=') else {
            emit(pair);
            continue;
        };
        // A value without a name is redacted too, because its meaning is unknown.
        let nameless = !value.is_empty() && is_nameless(name);
        if nameless || is_sensitive(&decode(name)) || carries_credential(value) {
            emit(name);
            emit("=");
            emit(REDACTED);
        } else {
            emit(pair);
        }
    }
}

/// Returns whether a parameter's value is itself a URL or query with a
/// credential-like parameter or a password, as in
/// `redirect=https://app/?token=...` or `https://user:pass@host/`, also when
/// percent-encoded twice.
fn carries_credential(value: &str) -> bool {
    if !value.contains(['=', '%', '@']) {
        return false;
    }
    let once = decode(value);
    let twice = decode(&once);
    let found = [value, &*once, &*twice].into_iter().any(|text| {
        let userinfo = text
            .split_once("://")
            .and_then(|(_, rest)| rest.split(['/', '?', '#']).next())
            .is_some_and(|authority| authority.contains('@'));
        userinfo
            || text
                .split(['?', '&', ';'])
                .filter_map(|pair| pair.split_once('='))
                .any(|(name, value)| !value.is_empty() && (is_nameless(name) || is_sensitive(name)))
    });
    found
}

/// Returns whether a parameter's name is empty once percent-decoded, its
/// spaces (`+`) and equals signs trimmed and its array brackets dropped, as
/// in `=...`, `%20=...`, `%3D=...` or `[]=...`.
fn is_nameless(name: &str) -> bool {
    let name = decode(name).replace('+', " ");
    name.split(['[', ']']).all(|part| {
        part.trim_matches(|c: char| c.is_whitespace() || c == '=')
            .is_empty()
    })
}

/// Calls `emit` with each piece of `path`, with the values of credential-like
/// path parameters (`;jsessionid=...`) replaced by [`REDACTED`]. A piece that
/// follows `;`, `&`, or a percent-encoded `;` or `?` is read as a parameter,
/// as servers that take parameters in paths do. This hides more than a
/// server would read as a parameter, never less.
fn redact_path_pieces<'a>(path: &'a str, mut emit: impl FnMut(&'a str)) {
    let bytes = path.as_bytes();
    let separator_len = |at: usize| match bytes[at] {
        b'/' | b';' | b'&' => 1,
        b'%' if bytes.len() >= at + 3
            && matches!(
                &bytes[at + 1..at + 3],
                b"3B" | b"3b" | b"3F" | b"3f" | b"26"
            ) =>
        {
            3
        }
        _ => 0,
    };
    // The `=` may be percent-encoded too, as in `;token%3D...`.
    let split = |piece: &'a str| {
        let plain = piece.find('=').map(|at| (at, 1));
        let encoded = piece
            .find("%3D")
            .or_else(|| piece.find("%3d"))
            .map(|at| (at, 3));
        match (plain, encoded) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (found, None) | (None, found) => found,
        }
        .map(|(at, length)| (&piece[..at], &piece[at..at + length]))
    };
    let mut emit_piece = |piece: &'a str, parameter: bool| match split(piece) {
        Some((name, equals)) if parameter && is_sensitive(&decode(name)) => {
            emit(name);
            emit(equals);
            emit(REDACTED);
        }
        _ => emit(piece),
    };
    let (mut start, mut at, mut parameter) = (0, 0, false);
    while at < bytes.len() {
        let length = separator_len(at);
        if length == 0 {
            at += 1;
            continue;
        }
        emit_piece(&path[start..at], parameter);
        emit_piece(&path[at..at + length], false);
        parameter = bytes[at] != b'/';
        at += length;
        start = at;
    }
    emit_piece(&path[start..], parameter);
}

fn decode(name: &str) -> std::borrow::Cow<'_, str> {
    percent_encoding::percent_decode_str(name).decode_utf8_lossy()
}

/// Appends the redacted `path`, escaped for a JSON string.
fn write_redacted_path(out: &mut Vec<u8>, path: &str) {
    if !path.bytes().any(|byte| matches!(byte, b';' | b'&' | b'%')) {
        write_escaped(out, path);
        return;
    }
    redact_path_pieces(path, |piece| write_escaped(out, piece));
}

/// Returns `path` with the values of credential-like path parameters
/// replaced by [`REDACTED`].
#[cfg(test)]
fn redact_path(path: &str) -> String {
    let mut out = String::with_capacity(path.len());
    redact_path_pieces(path, |piece| out.push_str(piece));
    out
}

/// Replaces the values of credential-like parameters in a query string with
/// [`REDACTED`]. Parameters are separated by `&` or `;`; the names, order,
/// separators and other values stay as sent.
pub fn redact_query(query: &str) -> String {
    let mut out = String::with_capacity(query.len());
    redact_pieces(query, |piece| out.push_str(piece));
    out
}

/// Appends the redacted `query`, escaped for a JSON string.
fn write_redacted_query(out: &mut Vec<u8>, query: &str) {
    redact_pieces(query, |piece| write_escaped(out, piece));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    use http::{HeaderValue, Method, Uri};
    use proptest::prelude::*;

    use crate::metrics::Reason;

    #[test]
    fn redact_query_hides_credentials_only() {
        let cases = [
            ("a=1&b=2", "a=1&b=2"),
            ("token=abc&page=2", "token=REDACTED&page=2"),
            ("access_token=x", "access_token=REDACTED"),
            ("API_KEY=x&q=key", "API_KEY=REDACTED&q=key"),
            (
                "key=1&secret=2&password=3",
                "key=REDACTED&secret=REDACTED&password=REDACTED",
            ),
            ("client%5Fsecret=z", "client%5Fsecret=REDACTED"),
            (
                "sig=1&code=2&jwt=3",
                "sig=REDACTED&code=REDACTED&jwt=REDACTED",
            ),
            ("flag&token", "flag&token"),
            ("x-session-id=9", "x-session-id=REDACTED"),
            ("", ""),
            ("&&", "&&"),
            ("token=", "token=REDACTED"),
            ("q=a=b&token=x=y", "q=a=b&token=REDACTED"),
        ];
        for (query, expected) in cases {
            assert_eq!(redact_query(query), expected, "{query}");
        }
    }

    #[test]
    fn redact_query_covers_token_names() {
        for name in [
            "bearer",
            "refresh",
            "refresh_token",
            "id_token",
            "password",
            "secret",
            "api_key",
            "apikey",
            "sig",
            "signature",
            "X-Amz-Signature",
            "Bearer",
            "REFRESH_TOKEN",
            "ApiKey",
            "SIG",
            "Id_Token",
        ] {
            let query = format!("page=1&{name}=hidden&q=x");
            assert_eq!(
                redact_query(&query),
                format!("page=1&{name}=REDACTED&q=x"),
                "{name}"
            );
        }
    }

    #[test]
    fn redact_query_covers_array_parameters() {
        for name in ["jwt[]", "jwt%5B%5D", "code[0]", "SIG[a]", "pwd[]"] {
            let query = format!("page=1&{name}=hidden");
            assert_eq!(
                redact_query(&query),
                format!("page=1&{name}=REDACTED"),
                "{name}"
            );
        }
        // A longer name that only starts with one of the whole names stays.
        assert_eq!(redact_query("codes[]=a&signal=b"), "codes[]=a&signal=b");
    }

    #[test]
    fn redact_query_covers_more_credential_names() {
        for name in [
            "pass",
            "OTP",
            "pin",
            "sid",
            "ticket",
            "hmac",
            "SAMLResponse",
            "client_assertion",
            "code+",
            "code%20",
            "code]",
        ] {
            let query = format!("page=1&{name}=hidden");
            assert_eq!(
                redact_query(&query),
                format!("page=1&{name}=REDACTED"),
                "{name}"
            );
        }
        for query in [
            "passphrase=hidden",
            "code_verifier=hidden",
            "=hidden",
            "redirect=https://app.test/?token=hidden",
            "next=%2Fcb%3Fcode%3Dhidden",
            "redirect=https://app/?token=hidden?",
            "next=/cb?code=hidden?",
            "redirect=https%3A%2F%2Fapp%2F%3Ftoken%3Dhidden%26next%3D%2Fhome%3Fp%3D1",
            "r=https%253A%252F%252Fx%252F%253Ftoken%253Dhidden",
            "r=https://user:hidden@host/",
            "%20=hidden",
            "+=hidden",
            "[]=hidden",
            "%3D=hidden",
        ] {
            let name = query.split_once('=').unwrap().0;
            assert_eq!(redact_query(query), format!("{name}=REDACTED"), "{query}");
        }
        assert_eq!(
            redact_query("next=%2Fhome%3Fpage%3D2"),
            "next=%2Fhome%3Fpage%3D2",
            "an inner query without credentials stays"
        );
        for name in ["passport", "compass", "pinned", "side"] {
            let query = format!("{name}=shown");
            assert_eq!(redact_query(&query), query, "{name}");
        }
    }

    #[test]
    fn redact_path_hides_credential_parameters() {
        for (path, expected) in [
            ("/plain", "/plain"),
            ("/a%20b/c", "/a%20b/c"),
            ("/plain;jsessionid=SECRET", "/plain;jsessionid=REDACTED"),
            ("/x;JSESSIONID=SECRET/y", "/x;JSESSIONID=REDACTED/y"),
            ("/x%3Bjsessionid=SECRET", "/x%3Bjsessionid=REDACTED"),
            ("/x%3ftoken=SECRET&page=2", "/x%3ftoken=REDACTED&page=2"),
            ("/x;v=1;sid_token=SECRET", "/x;v=1;sid_token=REDACTED"),
            ("/p8%3Ftoken%3DSECRET", "/p8%3Ftoken%3DREDACTED"),
            ("/p9%3Fa=1%26token=SECRET", "/p9%3Fa=1%26token=REDACTED"),
            ("/p4%3Bjsessionid%3dSECRET", "/p4%3Bjsessionid%3dREDACTED"),
            // A segment that is only a name and a value is not a parameter.
            ("/token=visible", "/token=visible"),
        ] {
            assert_eq!(redact_path(path), expected, "{path}");
        }
    }

    #[test]
    fn redact_query_splits_on_semicolons() {
        let cases = [
            ("a=1;token=x", "a=1;token=REDACTED"),
            ("bearer=x;page=2", "bearer=REDACTED;page=2"),
            (
                "q=1;sig=2&apikey=3;x=4",
                "q=1;sig=REDACTED&apikey=REDACTED;x=4",
            ),
            (";password=p;", ";password=REDACTED;"),
        ];
        for (query, expected) in cases {
            assert_eq!(redact_query(query), expected, "{query}");
        }
    }

    #[test]
    fn format_second_matches_known_dates() {
        assert_eq!(&format_second(0), b"1970-01-01T00:00:00");
        assert_eq!(&format_second(951_782_400), b"2000-02-29T00:00:00");
        assert_eq!(&format_second(1_796_431_573), b"2026-12-05T00:46:13");
        assert_eq!(&format_second(4_102_444_799), b"2099-12-31T23:59:59");
    }

    #[test]
    fn write_time_adds_milliseconds() {
        let mut formatter = LineFormatter::default();
        let mut out = Vec::new();
        let time = UNIX_EPOCH + Duration::from_millis(1_796_431_573_007);
        formatter.write_time(time, &mut out);
        assert_eq!(out, b"2026-12-05T00:46:13.007Z");
    }

    fn escaped(text: &str) -> String {
        let mut out = Vec::new();
        write_str(&mut out, text);
        String::from_utf8(out).expect("escaping keeps UTF-8")
    }

    #[test]
    fn write_str_escapes_quotes_and_controls() {
        assert_eq!(escaped("plain"), "\"plain\"");
        assert_eq!(escaped("a\"b\\c"), "\"a\\\"b\\\\c\"");
        assert_eq!(escaped("\n\r\t\u{8}\u{c}"), "\"\\n\\r\\t\\b\\f\"");
        assert_eq!(escaped("\u{0}\u{1f}\u{7f}"), "\"\\u0000\\u001f\u{7f}\"");
        assert_eq!(escaped("é✓😀"), "\"é✓😀\"");
        // C1 controls and the Unicode line and paragraph separators, which
        // many readers split lines at; U+00A0 and U+2027 stay raw.
        assert_eq!(
            escaped("a\u{85}b\u{2028}c\u{2029}\u{9f}\u{a0}\u{2027}"),
            "\"a\\u0085b\\u2028c\\u2029\\u009f\u{a0}\u{2027}\""
        );
    }

    proptest! {
        #[test]
        fn write_str_round_trips_through_serde_json(text in any::<String>()) {
            let json = escaped(&text);
            let parsed: String = serde_json::from_str(&json).expect("valid JSON string");
            prop_assert_eq!(parsed, text);
        }

        #[test]
        fn redacted_query_round_trips_through_serde_json(
            query in "[a-zA-Z_%;&=\"\\\\\u{0}-\u{1f} é]{0,40}",
        ) {
            let mut out = vec![b'"'];
            write_redacted_query(&mut out, &query);
            out.push(b'"');
            let parsed: String = serde_json::from_slice(&out).expect("valid JSON string");
            prop_assert_eq!(parsed, redact_query(&query));
        }

        #[test]
        fn write_millis_matches_float_milliseconds(micros in 0u64..10_000_000_000) {
            let mut out = Vec::new();
            write_millis(&mut out, Duration::from_micros(micros));
            let parsed: f64 = serde_json::from_slice(&out).expect("valid JSON number");
            prop_assert!((parsed - micros as f64 / 1000.0).abs() < 1e-6);
        }

        #[test]
        fn format_second_matches_time_crate(second in 0u64..253_402_300_800) {
            let expected = time::OffsetDateTime::from_unix_timestamp(second as i64)
                .expect("in range");
            let text = format!(
                "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
                expected.year(),
                u8::from(expected.month()),
                expected.day(),
                expected.hour(),
                expected.minute(),
                expected.second()
            );
            prop_assert_eq!(String::from_utf8(format_second(second).to_vec()).unwrap(), text);
        }

        #[test]
        fn lines_parse_as_json_with_every_field(
            user in proptest::option::of(any::<String>()),
            node in "[!-~]{1,20}",
            route in any::<String>(),
            request_id in "[A-Za-z0-9._:+/=-]{1,128}",
            path in "/[a-zA-Z0-9._~%!$'()*+,;=:@/-]{0,60}",
            query in proptest::option::of("[a-zA-Z0-9._~%!$'()*+,;=:@/?&-]{0,60}"),
            micros in 0u64..100_000_000,
            bytes_in in proptest::option::of(any::<u64>()),
            status in 100u16..1000,
        ) {
            let target = match &query {
                Some(query) => format!("{path}?{query}"),
                None => path.clone(),
            };
            let uri: Uri = target.parse().expect("generated a valid target");
            let record = Record {
                time: UNIX_EPOCH + Duration::from_micros(1_796_431_573_007_123),
                started: std::time::Instant::now(),
                request_id: Some(HeaderValue::from_str(&request_id).expect("valid id")),
                trace_id: Some([0xab; 16]),
                span_id: None,
                client: IpAddr::from([10, 0, 0, 1]),
                method: Method::PATCH,
                uri,
                version: Version::HTTP_2,
                route: Some(0),
                upstream: None,
                target: Some(SocketAddr::from(([127, 0, 0, 1], 8080))),
                status,
                reason: Reason::Proxied,
                bytes_in,
                bytes_out: 42,
                head: Duration::from_micros(micros),
                total: Duration::from_micros(micros + 5),
                ratelimit: Duration::ZERO,
                workers: Duration::from_micros(7),
                upstream_time: Duration::from_micros(micros / 2),
                completed: true,
                user: user.clone(),
            };
            let names = Names {
                node: node.clone(),
                routes: vec![Arc::from(route.as_str())],
                upstreams: vec![],
            };
            let mut out = Vec::new();
            LineFormatter::default().write(&record, &names, &mut out);
            prop_assert_eq!(out.last(), Some(&b'\n'));
            let line: serde_json::Value = serde_json::from_slice(&out).expect("valid JSON");
            prop_assert_eq!(&line["time"], "2026-12-05T00:46:13.007Z");
            prop_assert_eq!(&line["node"], node.as_str());
            prop_assert_eq!(&line["request_id"], request_id.as_str());
            let trace_id = "ab".repeat(16);
            prop_assert_eq!(&line["trace_id"], trace_id.as_str());
            prop_assert!(line["span_id"].is_null());
            prop_assert_eq!(&line["client"], "10.0.0.1");
            prop_assert_eq!(&line["method"], "PATCH");
            prop_assert_eq!(&line["path"], path.as_str());
            match &query {
                Some(query) => {
                    let redacted = redact_query(query);
                    prop_assert_eq!(&line["query"], redacted.as_str());
                }
                None => prop_assert!(line["query"].is_null()),
            }
            prop_assert_eq!(&line["protocol"], "HTTP/2.0");
            prop_assert_eq!(&line["route"], route.as_str());
            prop_assert!(line["upstream"].is_null());
            prop_assert_eq!(&line["target"], "127.0.0.1:8080");
            prop_assert_eq!(&line["status"], u64::from(status));
            prop_assert_eq!(&line["reason"], "proxied");
            match bytes_in {
                Some(bytes) => prop_assert_eq!(&line["bytes_in"], bytes),
                None => prop_assert!(line["bytes_in"].is_null()),
            }
            prop_assert_eq!(&line["bytes_out"], 42);
            prop_assert_eq!(&line["completed"], true);
            let head = line["durations_ms"]["head"].as_f64().expect("a number");
            prop_assert!((head - micros as f64 / 1000.0).abs() < 1e-6);
            prop_assert_eq!(&line["durations_ms"]["workers"], 0.007);
            match &user {
                Some(user) => prop_assert_eq!(&line["user"], user.as_str()),
                None => prop_assert!(line["user"].is_null()),
            }
        }
    }
}
