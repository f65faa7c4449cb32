//! `edge demo`: a node on a built-in config with three small demo upstreams
//! (users, payments, web) that echo what they receive as JSON.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context as _;
use bytes::Bytes;
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

use crate::config::{Config, ConfigSource};
use crate::node::Node;

/// The demo's config, with placeholders for addresses and the modules folder.
const DEMO_CONFIG: &str = include_str!("../demo/demo.toml");

/// A phone's `User-Agent`, for the device-router example.
const IPHONE: &str = "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) Mobile/15E148";

/// Starts the demo upstreams and a node in front of them, and serves until
/// Ctrl-C.
pub fn run(listen: SocketAddr, http_listen: SocketAddr, modules: &Path) -> anyhow::Result<()> {
    crate::cli::ignore_hangup_while_starting()?;
    for module in ["add-header.wasm", "path-router.wasm", "device-router.wasm"] {
        let path = modules.join(module);
        if !path.exists() {
            anyhow::bail!(
                "{} is missing; build the example workers first with scripts/build-workers, \
                 or run the demo from the checkout or with --modules CHECKOUT/modules",
                path.display()
            );
        }
    }
    // Checked before the banner, so that a taken port is the last thing
    // printed, with the flag that moves the demo off it.
    for (addr, flag) in [(listen, "--listen"), (http_listen, "--http-listen")] {
        if let Err(error) = std::net::TcpListener::bind(addr) {
            anyhow::bail!(
                "cannot listen on {addr}: {error}; stop the process that listens there, or pass \
                 {flag} with a free address"
            );
        }
    }
    let services = start_demo_upstreams(&["users", "payments", "web"])?;
    let modules = std::fs::canonicalize(modules)
        .with_context(|| format!("cannot resolve {}", modules.display()))?;
    let mut text = DEMO_CONFIG
        .replace("{listen}", &listen.to_string())
        .replace("{http_listen}", &http_listen.to_string())
        .replace("{modules}", &modules.display().to_string());
    for (name, addr) in &services {
        text = text.replace(&format!("{{{name}}}"), &addr.to_string());
    }
    let source = ConfigSource {
        name: "<built-in demo config>".to_owned(),
        base_dir: std::env::current_dir()?,
        text,
    };
    let config = Config::parse(source)?;
    let node = Node::build(&config)?;
    let base = format!("https://localhost:{}", listen.port());
    let ca = config.source.base_dir.join(".edge-dev-tls/ca.pem");
    let curl = format!("curl -i --cacert {}", ca.display());
    println!("Edge demo node: routes /api/* through the path-router and add-header workers,");
    println!("and the rest through device-router and add-header.");
    println!("It serves HTTPS on {listen} with a self-signed development certificate, and");
    println!("redirects plain HTTP on {http_listen} to it. Try, in another terminal:");
    println!("  {curl} {base}/api/users/7          # routed to the users upstream");
    println!("  {curl} -X POST {base}/api/checkout # routed to the payments upstream");
    println!(
        "  {curl} {base}/api/unknown          # answered 404 no_rule by the path-router worker"
    );
    println!(
        "  {curl} {base}/                     # the web upstream: x-powered-by, x-device-class"
    );
    println!("  {curl} -A '{IPHONE}' {base}/home   # device-router: /mobile/home, x-device-class");
    println!("  {curl} --path-as-is '{base}/api/../api/users/7'  # normalised before routing");
    println!("  curl -i http://{http_listen}/api/users/7   # 308 redirect to HTTPS");
    println!("  curl -ik {base}/api/users/7         # -k skips certificate verification");
    println!("Press Ctrl-C to stop.");
    crate::cli::run_node(&config, node)
}

/// Starts echo upstreams on free loopback ports, each on its own thread.
fn start_demo_upstreams(
    names: &[&'static str],
) -> anyhow::Result<BTreeMap<&'static str, SocketAddr>> {
    let mut addrs = BTreeMap::new();
    for &name in names {
        let listener =
            std::net::TcpListener::bind("127.0.0.1:0").context("cannot bind a demo upstream")?;
        listener.set_nonblocking(true)?;
        addrs.insert(name, listener.local_addr()?);
        std::thread::Builder::new()
            .name(format!("demo-{name}"))
            .spawn(move || serve_echo(name, listener))?;
    }
    Ok(addrs)
}

fn serve_echo(name: &'static str, listener: std::net::TcpListener) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("cannot build a tokio runtime");
    runtime.block_on(async move {
        let listener = tokio::net::TcpListener::from_std(listener).expect("register demo listener");
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let service = service_fn(move |request| echo(name, request));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn echo(name: &str, request: Request<Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    let headers: BTreeMap<&str, String> = request
        .headers()
        .iter()
        .map(|(k, v)| {
            (
                k.as_str(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect();
    let body = serde_json::json!({
        "upstream": name,
        "method": request.method().as_str(),
        "path": request.uri().path(),
        "query": request.uri().query(),
        "headers": headers,
    });
    let mut text = serde_json::to_string_pretty(&body).unwrap_or_default();
    text.push('\n');
    let response = Response::builder()
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(text)))
        .expect("a static response is valid");
    Ok(response)
}
