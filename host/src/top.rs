//! `edge top`: the status page's live view in a terminal. It polls the admin
//! listener's `/status.json` with the bearer token and redraws a plain-text
//! frame: routes with their request, error and refusal rates, upstream
//! targets with breaker state and health, rate-limit fill levels and worker
//! instances.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context as _};
use bytes::Bytes;
use http_body_util::{BodyExt as _, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;

/// The escape sequence that clears the terminal and moves the cursor home,
/// sent before each frame.
const CLEAR: &str = "\x1b[2J\x1b[H";

/// The options of `edge top`: the admin listener, its token and the refresh
/// interval.
pub struct TopOptions<'a> {
    pub admin: SocketAddr,
    pub token: Option<&'a str>,
    pub token_file: Option<&'a Path>,
    pub interval: Duration,
    /// Whether to print one frame, without clearing the screen, and return.
    /// The frame's rates cover one interval, so it takes that long.
    pub once: bool,
}

/// Runs `edge top` until Ctrl-C, or for one frame with `once`.
pub fn run(options: &TopOptions<'_>) -> anyhow::Result<()> {
    let token = match (options.token, options.token_file) {
        (Some(token), _) => token.to_owned(),
        (None, Some(path)) => std::fs::read_to_string(path)
            .with_context(|| format!("cannot read the token file {}", path.display()))?
            .lines()
            .next()
            .unwrap_or_default()
            .trim()
            .to_owned(),
        (None, None) => std::env::var("EDGE_ADMIN_TOKEN")
            .ok()
            .context("no admin token: pass --token or --token-file, or set EDGE_ADMIN_TOKEN")?,
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the runtime")?;
    runtime.block_on(async {
        let mut previous: Option<(Instant, Value)> = None;
        loop {
            let status = fetch_status(options.admin, &token).await?;
            let now = Instant::now();
            // Rates need two samples: the single frame of `once` waits one
            // interval for its second.
            if options.once && previous.is_none() {
                previous = Some((now, status));
                tokio::time::sleep(options.interval).await;
                continue;
            }
            let frame = render(&status, previous.as_ref().map(|(at, old)| (now - *at, old)));
            if options.once {
                print!("{frame}");
                return Ok(());
            }
            print!("{CLEAR}{}", fit(&frame, terminal_size()));
            // The last row has no line break, so it waits in the buffer.
            std::io::stdout()
                .flush()
                .context("cannot write to the terminal")?;
            previous = Some((now, status));
            tokio::time::sleep(options.interval).await;
        }
    })
}

/// The size of a terminal in character cells.
#[derive(Debug, Clone, Copy)]
struct TerminalSize {
    rows: usize,
    columns: usize,
}

/// Returns the size of the terminal on standard output, or `None` when it
/// is not a terminal.
fn terminal_size() -> Option<TerminalSize> {
    let size = rustix::termios::tcgetwinsize(std::io::stdout()).ok()?;
    (size.ws_row > 0 && size.ws_col > 0).then_some(TerminalSize {
        rows: usize::from(size.ws_row),
        columns: usize::from(size.ws_col),
    })
}

/// Cuts `frame` to the rows of a terminal of `size`, so that a node with
/// more routes, targets or limits than the terminal shows does not scroll
/// the frame's top away. A line wider than the terminal wraps over several
/// rows. The last row then counts the lines left out.
fn fit(frame: &str, size: Option<TerminalSize>) -> std::borrow::Cow<'_, str> {
    let Some(size) = size else {
        return frame.into();
    };
    let rows_of = |line: &str| line.chars().count().div_ceil(size.columns).max(1);
    let needed: usize = frame.lines().map(rows_of).sum();
    if needed <= size.rows {
        return frame.into();
    }
    // One row is left for the notice.
    let mut rows_left = size.rows.saturating_sub(1);
    let mut out = String::new();
    let mut kept = 0;
    for line in frame.lines() {
        let rows = rows_of(line);
        if rows > rows_left {
            break;
        }
        rows_left -= rows;
        out.push_str(line);
        out.push('\n');
        kept += 1;
    }
    let left_out = frame.lines().count() - kept;
    let _ = write!(out, "({left_out} more lines; a larger terminal shows them)");
    out.into()
}

/// Gets `/status.json` from the admin listener at `admin`.
async fn fetch_status(admin: SocketAddr, token: &str) -> anyhow::Result<Value> {
    let stream = tokio::net::TcpStream::connect(admin)
        .await
        .with_context(|| {
            format!(
                "cannot connect to the admin listener at {admin}: start the node with an \
                 [admin] table, or pass --admin with the address it listens on"
            )
        })?;
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .context("cannot talk HTTP to the admin listener")?;
    tokio::spawn(connection);
    let request = http::Request::get("/status.json")
        .header(http::header::HOST, admin.to_string())
        .header(http::header::AUTHORIZATION, format!("Bearer {token}"))
        .body(Empty::<Bytes>::new())
        .context("cannot build the status request")?;
    let response = sender
        .send_request(request)
        .await
        .context("the admin listener closed the connection")?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .context("cannot read the status response")?
        .to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        bail!(
            "the admin listener returned {status}: {}; check the token given by --token, \
             --token-file or EDGE_ADMIN_TOKEN against the node's admin.token",
            String::from_utf8_lossy(&body).trim()
        );
    }
    if !status.is_success() {
        bail!(
            "the admin listener returned {status}: {}",
            String::from_utf8_lossy(&body).trim()
        );
    }
    let status: Value = serde_json::from_slice(&body).context("the status response is not JSON")?;
    // Any server may return JSON on that path; an edge node's has these.
    if !status["node"].is_string() || !status["routes"].is_array() {
        bail!(
            "{admin} did not respond as an edge admin listener: its /status.json has no node \
             name and routes"
        );
    }
    Ok(status)
}

/// Formats one frame of `status`. With the previous status and the time
/// since it, route counters become rates per second.
fn render(status: &Value, previous: Option<(Duration, &Value)>) -> String {
    let mut out = String::new();
    let text = |value: &Value| value.as_str().unwrap_or("-").to_owned();
    let _ = writeln!(
        out,
        "edge top: node {}, {}; worker instances {} of {}, {} waiting",
        text(&status["node"]),
        text(&status["phase"]),
        status["workers"]["running"],
        status["workers"]["max"],
        status["workers"]["queue"],
    );

    let mut table = Table::new(&[
        ("ROUTE", Align::Left, 24),
        ("UPSTREAM", Align::Left, 16),
        ("REQ/S", Align::Right, 10),
        ("5XX/S", Align::Right, 10),
        ("REFUSED/S", Align::Right, 10),
        ("MEAN MS", Align::Right, 10),
    ]);
    let routes = status["routes"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    for (index, route) in routes.iter().enumerate() {
        let count = |value: &Value, field: &str| value[field].as_u64().unwrap_or(0);
        let old = previous.and_then(|(elapsed, old)| Some((elapsed, old["routes"].get(index)?)));
        let rate = |field: &str| match old {
            Some((elapsed, old)) if !elapsed.is_zero() => format!(
                "{:.1}",
                count(route, field).saturating_sub(count(old, field)) as f64
                    / elapsed.as_secs_f64()
            ),
            _ => "-".to_owned(),
        };
        let mean = match old {
            Some((_, old)) => {
                let requests =
                    count(route, "duration_count").saturating_sub(count(old, "duration_count"));
                let sum = route["duration_sum"].as_f64().unwrap_or(0.0)
                    - old["duration_sum"].as_f64().unwrap_or(0.0);
                if requests == 0 {
                    "-".to_owned()
                } else {
                    format!("{:.2}", sum * 1000.0 / requests as f64)
                }
            }
            None => "-".to_owned(),
        };
        table.row(vec![
            text(&route["name"]),
            text(&route["upstream"]),
            rate("requests"),
            rate("errors"),
            rate("refused"),
            mean,
        ]);
    }
    out.push('\n');
    table.write(&mut out);

    let mut table = Table::new(&[
        ("UPSTREAM", Align::Left, 16),
        ("TARGET", Align::Left, 24),
        ("BREAKER", Align::Left, 10),
        ("HEALTH", Align::Left, 6),
        ("CONNECTIONS", Align::Right, 12),
    ]);
    for upstream in status["upstreams"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default()
    {
        for target in upstream["targets"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or_default()
        {
            let health = if target["up"].as_bool().unwrap_or(false) {
                "up"
            } else {
                "down"
            };
            table.row(vec![
                text(&upstream["name"]),
                text(&target["target"]),
                text(&target["breaker"]),
                health.to_owned(),
                count_text(&target["connections"]),
            ]);
        }
    }
    out.push('\n');
    table.write(&mut out);

    let limits = status["limits"]
        .as_array()
        .map(Vec::as_slice)
        .unwrap_or_default();
    if !limits.is_empty() {
        let mut table = Table::new(&[
            ("ROUTE", Align::Left, 24),
            ("LIMIT", Align::Left, 16),
            ("SCOPE", Align::Left, 7),
            ("AVAILABLE", Align::Right, 16),
            ("ALLOWED", Align::Right, 10),
            ("REJECTED", Align::Right, 10),
        ]);
        for limit in limits {
            let available = match (limit["available"].as_f64(), limit["size"].as_f64()) {
                (Some(available), Some(size)) => format!("{available:.0} of {size:.0}"),
                _ => "-".to_owned(),
            };
            table.row(vec![
                text(&limit["route"]),
                text(&limit["limit"]),
                text(&limit["scope"]),
                available,
                count_text(&limit["allowed"]),
                count_text(&limit["rejected"]),
            ]);
        }
        out.push('\n');
        table.write(&mut out);
    }
    out
}

/// Formats a counter from the status JSON, or `-` when it is missing.
fn count_text(value: &Value) -> String {
    match value.as_u64() {
        Some(count) => count.to_string(),
        None => "-".to_owned(),
    }
}

/// The alignment of a column's cells.
#[derive(Debug, Clone, Copy)]
enum Align {
    Left,
    Right,
}

/// A plain-text table. Each column is as wide as its widest cell (and at
/// least its minimum width), and columns are two spaces apart, so a long
/// name or number never runs into the next column.
struct Table {
    /// Header, alignment and minimum width in characters of each column.
    columns: Vec<(&'static str, Align, usize)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    /// The space between two columns.
    const GAP: &'static str = "  ";

    fn new(columns: &[(&'static str, Align, usize)]) -> Table {
        Table {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    /// Adds a row with one cell per column.
    fn row(&mut self, cells: Vec<String>) {
        debug_assert_eq!(cells.len(), self.columns.len());
        self.rows.push(cells);
    }

    /// Writes the header line and the rows, each line without trailing
    /// blanks.
    fn write(&self, out: &mut String) {
        let widths: Vec<usize> = self
            .columns
            .iter()
            .enumerate()
            .map(|(index, (header, _, min_width))| {
                self.rows
                    .iter()
                    .map(|row| row[index].chars().count())
                    .chain([header.len(), *min_width])
                    .max()
                    .unwrap_or_default()
            })
            .collect();
        let headers: Vec<String> = self
            .columns
            .iter()
            .map(|(header, _, _)| (*header).to_owned())
            .collect();
        for cells in std::iter::once(&headers).chain(&self.rows) {
            let mut line = String::new();
            for (index, cell) in cells.iter().enumerate() {
                if index > 0 {
                    line.push_str(Table::GAP);
                }
                let width = widths[index];
                let _ = match self.columns[index].1 {
                    Align::Left => write!(line, "{cell:<width$}"),
                    Align::Right => write!(line, "{cell:>width$}"),
                };
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn frame_fits_the_terminal() {
        let size = |rows, columns| Some(TerminalSize { rows, columns });
        let frame = "a\nb\nc\nd\n";
        assert_eq!(fit(frame, None), frame);
        assert_eq!(fit(frame, size(4, 80)), frame);
        assert_eq!(
            fit(frame, size(3, 80)),
            "a\nb\n(2 more lines; a larger terminal shows them)"
        );
        assert_eq!(
            fit(frame, size(1, 80)),
            "(4 more lines; a larger terminal shows them)"
        );
        // A line twice the width takes two rows.
        let wide = "0123456789\nb\nc\n";
        assert_eq!(fit(wide, size(4, 5)), wide);
        assert_eq!(
            fit(wide, size(3, 5)),
            "0123456789\n(2 more lines; a larger terminal shows them)"
        );
    }

    #[test]
    fn frame_turns_counters_into_rates() {
        let old = json!({
            "node": "edge-1", "phase": "serving",
            "workers": { "running": 0, "max": 8, "queue": 0 },
            "routes": [{ "name": "api", "upstream": "app", "requests": 100, "errors": 0,
                         "refused": 0, "duration_sum": 1.0, "duration_count": 100 }],
            "upstreams": [{ "name": "app", "targets": [{ "target": "127.0.0.1:9001",
                "breaker": "closed", "up": true, "connections": 2 }] }],
            "limits": [{ "route": "api", "limit": "per-ip", "scope": "local",
                         "available": 7.0, "size": 10.0, "allowed": 3, "rejected": 1 }],
        });
        let mut new = old.clone();
        new["routes"][0]["requests"] = json!(300);
        new["routes"][0]["errors"] = json!(20);
        new["routes"][0]["duration_sum"] = json!(1.4);
        new["routes"][0]["duration_count"] = json!(300);
        let frame = render(&new, Some((Duration::from_secs(2), &old)));
        assert!(frame.contains("node edge-1, serving"), "{frame}");
        // 200 requests and 20 errors in 2 s, 0.4 s over 200 requests.
        let route = frame.lines().find(|line| line.starts_with("api ")).unwrap();
        let columns: Vec<&str> = route.split_whitespace().collect();
        assert_eq!(columns, ["api", "app", "100.0", "10.0", "0.0", "2.00"]);
        assert!(frame.contains("127.0.0.1:9001"), "{frame}");
        assert!(frame.contains("7 of 10"), "{frame}");

        // The first frame has no rates yet.
        let first = render(&old, None);
        let route = first.lines().find(|line| line.starts_with("api ")).unwrap();
        assert!(route.contains(" - "), "{first}");
    }

    #[test]
    fn frame_keeps_limit_columns_apart() {
        let status = json!({
            "node": "edge-1", "phase": "serving",
            "workers": { "running": 0, "max": 8, "queue": 0 },
            "routes": [], "upstreams": [],
            "limits": [
                { "route": "api", "limit": "per-ip", "scope": "local",
                  "available": 7.0, "size": 10.0, "allowed": 3, "rejected": 1 },
                { "route": "checkout-payments-internal", "limit": "per-user-per-minute-global",
                  "scope": "global", "available": 123456789.0, "size": 1000000000.0,
                  "allowed": 98765432101_u64, "rejected": 12345678901_u64 },
                { "route": "api", "limit": "per-key", "scope": "global",
                  "available": null, "size": null, "allowed": 0, "rejected": null },
            ],
        });
        let frame = render(&status, None);
        let table: Vec<&str> = frame
            .lines()
            .skip_while(|line| !line.starts_with("ROUTE  ") || !line.contains("LIMIT"))
            .collect();
        // Every column is as wide as its widest cell, two spaces apart.
        let expected = [
            "ROUTE                       LIMIT                       SCOPE                  AVAILABLE      ALLOWED     REJECTED",
            "api                         per-ip                      local                    7 of 10            3            1",
            "checkout-payments-internal  per-user-per-minute-global  global   123456789 of 1000000000  98765432101  12345678901",
            "api                         per-key                     global                         -            0            -",
        ];
        assert_eq!(table, expected, "{frame}");
    }
}
