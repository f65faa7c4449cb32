//! The status page in a real headless Chromium, driven over WebDriver by
//! chromedriver: it loads without console errors, shows a breaker open and
//! closed again as the upstream fails and recovers, and a token bucket's
//! fill level dropping after a burst and refilling.

use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use serde_json::json;

use crate::harness::{free_port, get, Node, Reply, Result, Upstream};

const TOKEN: &str = "status-page-admin-token";

/// Upstream modes of the status-page test.
const ANSWER: u8 = 0;
const FAIL: u8 = 1;
const SLOW: u8 = 2;

/// A chromedriver process on a free loopback port, killed on drop.
struct ChromeDriver {
    child: Child,
    url: String,
}

impl ChromeDriver {
    fn start() -> Result<ChromeDriver> {
        let port = free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                format!(
                    "cannot start chromedriver ({e}); scripts/test installs it, or run \
                     `apt-get install chromium chromium-driver`"
                )
            })?;
        Ok(ChromeDriver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        })
    }

    async fn session(&self) -> Result<Client> {
        let capabilities = json!({
            "goog:chromeOptions": {
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--no-first-run"],
            },
            "goog:loggingPrefs": { "browser": "ALL" },
        });
        let capabilities = capabilities.as_object().cloned().unwrap_or_default();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        for _ in 0..100 {
            let connected = ClientBuilder::new(connector.clone())
                .capabilities(capabilities.clone())
                .connect(&self.url)
                .await;
            match connected {
                Ok(client) => return Ok(client),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
        Err("chromedriver did not accept a session".into())
    }

    /// Fetches the browser's console messages since the last call, through
    /// chromedriver's log endpoint (a Chrome extension to WebDriver).
    async fn console(&self, client: &Client) -> Result<Vec<serde_json::Value>> {
        let session = client.session_id().await?.ok_or("no session id")?;
        let body = json!({ "type": "browser" }).to_string();
        let url = format!("{}/session/{session}/se/log", self.url);
        let got = crate::harness::send_owned("POST", &url, "application/json", body).await?;
        let entries = got.json()["value"].as_array().cloned().unwrap_or_default();
        Ok(entries)
    }
}

impl Drop for ChromeDriver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Reads the text of the element `selector`, or `None` when it is absent.
async fn text_of(client: &Client, selector: &str) -> Option<String> {
    let element = client.find(Locator::Css(selector)).await.ok()?;
    element.text().await.ok()
}

/// Polls the page until the text of `selector` satisfies `check`, for up to
/// `within`.
async fn wait_for(
    client: &Client,
    selector: &str,
    within: Duration,
    check: impl Fn(&str) -> bool,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + within;
    let mut last = None;
    while tokio::time::Instant::now() < deadline {
        last = text_of(client, selector).await;
        if last.as_deref().is_some_and(&check) {
            return Ok(last.unwrap_or_default());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Err(format!("{selector} never matched; last text {last:?}").into())
}

fn available(text: &str) -> Option<u64> {
    text.split('/').next()?.trim().parse().ok()
}

#[tokio::test]
async fn status_page_shows_breaker_cycle_and_refill() -> Result {
    // What the upstream does: respond, fail with 503, or respond slowly.
    let mode = Arc::new(AtomicU8::new(ANSWER));
    let switch = mode.clone();
    let upstream = Upstream::start(move |_| match switch.load(Ordering::SeqCst) {
        FAIL => Reply::Status(503),
        SLOW => Reply::Delay(Duration::from_millis(2_500)),
        _ => Reply::Echo,
    })
    .await;
    let config = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\
         [upstreams.app.retry]\nmax_retries = 0\n\
         [upstreams.app.breaker]\nconsecutive_failures = 2\ncool_down = \"2s\"\n\n\
         [[routes]]\nname = \"api\"\nprefix = \"/api\"\nupstream = \"app\"\n\n\
         [[routes]]\nname = \"burst\"\nprefix = \"/burst\"\nupstream = \"app\"\n\
         [[routes.limits]]\nname = \"bucket\"\nkey = \"route\"\n\
         algorithm = \"token_bucket\"\nrate = \"2/s\"\nburst = 5\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    let admin = node.admin_url.clone().expect("admin listener");
    let driver = ChromeDriver::start()?;
    let client = driver.session().await?;

    client
        .goto(&format!("{admin}/status?token={TOKEN}"))
        .await?;
    assert_eq!(client.current_url().await?.path(), "/status");
    let breaker = format!("span.breaker[data-key=\"app/{}\"]", upstream.addr);
    wait_for(&client, &breaker, Duration::from_secs(5), |t| t == "closed").await?;
    let text = client.source().await?;
    assert!(text.contains("Edge node"));

    // The upstream fails: the breaker opens. After its cool-down a slow
    // probe keeps it half-open, and the probe's success closes it.
    mode.store(FAIL, Ordering::SeqCst);
    for _ in 0..2 {
        assert_eq!(get(&node.url("/api")).await?.status, 503);
    }
    wait_for(&client, &breaker, Duration::from_secs(5), |t| t == "open").await?;
    mode.store(SLOW, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2_200)).await;
    let url = node.url("/api");
    let probe = tokio::spawn(async move { get(&url).await });
    wait_for(&client, &breaker, Duration::from_secs(3), |t| {
        t == "half-open"
    })
    .await?;
    assert_eq!(probe.await??.status, 200);
    mode.store(ANSWER, Ordering::SeqCst);
    wait_for(&client, &breaker, Duration::from_secs(5), |t| t == "closed").await?;

    // A burst empties the bucket, which then refills at 2/s.
    let fill = "td.fill[data-key=\"burst/bucket\"]";
    assert_eq!(get(&node.url("/burst")).await?.status, 200);
    wait_for(&client, fill, Duration::from_secs(5), |t| {
        available(t).is_some()
    })
    .await?;
    let burst: Vec<_> = (0..10)
        .map(|_| {
            let url = node.url("/burst");
            tokio::spawn(async move { get(&url).await })
        })
        .collect();
    for request in burst {
        request.await??;
    }
    let low = wait_for(&client, fill, Duration::from_secs(3), |t| {
        available(t).is_some_and(|n| n <= 2)
    })
    .await?;
    let refilled = wait_for(&client, fill, Duration::from_secs(5), |t| {
        available(t).is_some_and(|n| n >= 4)
    })
    .await?;
    assert_ne!(low, refilled);

    // The route table and its sparkline are drawn.
    assert!(client
        .find(Locator::Css("tr[data-route=\"api\"] svg polyline"))
        .await
        .is_ok());
    let console = driver.console(&client).await?;
    let errors: Vec<_> = console
        .iter()
        .filter(|entry| entry["level"] == "SEVERE")
        .collect();
    assert!(errors.is_empty(), "console errors: {errors:?}");
    client.close().await?;
    Ok(())
}
