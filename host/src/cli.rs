//! The `edge` command line.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::{bail, Context as _};
use clap::{Parser, Subcommand};

use crate::config::Config;
use crate::listener::Server;
use crate::node::Node;

/// Edge: an HTTP edge node that runs WebAssembly workers on each route
/// before it proxies requests to upstream services.
#[derive(Debug, Parser)]
#[command(name = "edge", version, propagate_version = true)]
pub struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve requests with the routes, workers and upstreams of a config file.
    Serve {
        /// The node's TOML config file.
        #[arg(long = "config", short = 'c', value_name = "CONFIG")]
        config_flag: Option<PathBuf>,
        /// The node's TOML config file, as `check` takes it.
        #[arg(
            value_name = "CONFIG",
            required_unless_present = "config_flag",
            conflicts_with = "config_flag"
        )]
        config: Option<PathBuf>,
    },
    /// Validate a config file and load its worker modules, without serving
    /// and without creating or changing any file.
    Check {
        /// The node's TOML config file.
        #[arg(
            required_unless_present = "config_flag",
            conflicts_with = "config_flag"
        )]
        config: Option<PathBuf>,
        /// The node's TOML config file, as `serve --config` takes it.
        #[arg(long = "config", short = 'c', value_name = "CONFIG")]
        config_flag: Option<PathBuf>,
    },
    /// Start a demo node with built-in demo upstreams and the example workers.
    Demo {
        /// Address the demo node serves HTTPS on, with a self-signed
        /// development certificate.
        #[arg(long, default_value = "127.0.0.1:8443")]
        listen: std::net::SocketAddr,
        /// Address the demo node serves plain HTTP on, redirecting every
        /// request to HTTPS.
        #[arg(long, default_value = "127.0.0.1:8080")]
        http_listen: std::net::SocketAddr,
        /// Folder with the example workers the demo runs: add-header.wasm,
        /// path-router.wasm and device-router.wasm.
        #[arg(long, default_value = "modules")]
        modules: PathBuf,
    },
    /// Inspect routes.
    #[command(subcommand)]
    Routes(RoutesCommand),
    /// Create and build workers.
    #[command(subcommand)]
    Worker(WorkerCommand),
    /// Show a running node's routes, upstreams and rate limits live in the
    /// terminal, from its admin listener.
    Top {
        /// The admin listener's address.
        #[arg(long, default_value = "127.0.0.1:9901")]
        admin: std::net::SocketAddr,
        /// The admin bearer token; or use --token-file or the
        /// EDGE_ADMIN_TOKEN environment variable.
        #[arg(long, conflicts_with = "token_file")]
        token: Option<String>,
        /// A file whose first line is the admin token.
        #[arg(long)]
        token_file: Option<PathBuf>,
        /// Time between two frames.
        #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Print one frame and exit, without clearing the screen. The frame's
        /// rates cover one interval, so it takes that long.
        #[arg(long)]
        once: bool,
    },
}

#[derive(Debug, Subcommand)]
enum RoutesCommand {
    /// Show which route a request matches, the workers that run on it, and
    /// why every other route does not match.
    #[command(
        override_usage = "edge routes explain [OPTIONS] CONFIG METHOD TARGET\n       \
                          edge routes explain [OPTIONS] --config CONFIG METHOD TARGET",
        after_help = "Arguments:\n  \
                      CONFIG  The node's TOML config file, unless --config gives it\n  \
                      METHOD  The request method, such as GET\n  \
                      TARGET  A path such as /users/7 (normalised first), or an absolute URL \
                      such as\n          http://example.com/users/7, whose host then replaces \
                      --host"
    )]
    Explain {
        /// The node's TOML config file.
        #[arg(long = "config", short = 'c', value_name = "CONFIG")]
        config_flag: Option<PathBuf>,
        /// [CONFIG] METHOD TARGET. CONFIG is the config file, unless --config
        /// gives it. METHOD is the request method, such as GET. TARGET is a
        /// path such as /users/7 (normalised first), or an absolute URL such
        /// as http://example.com/users/7, whose host then replaces --host.
        #[arg(num_args = 0.., hide = true)]
        args: Vec<String>,
        /// The Host header of the request.
        #[arg(long)]
        host: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
enum WorkerCommand {
    /// Create a worker crate that builds with the guest SDK.
    New {
        /// The crate name, such as my-worker; also the new folder's name.
        name: String,
        /// Folder to create the crate in.
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// Path to the guest SDK crate. Default: the guest-sdk folder of the
        /// Edge source tree this binary was built from.
        #[arg(long, conflicts_with = "sdk_git")]
        sdk_path: Option<PathBuf>,
        /// Git URL of an Edge repository to take the guest SDK from.
        #[arg(long)]
        sdk_git: Option<String>,
    },
    /// Build a worker crate for wasm32-wasip2 and copy the component to the
    /// output folder as NAME.wasm.
    Build {
        /// The worker crate's folder.
        path: PathBuf,
        /// The folder the component is copied to.
        #[arg(long, default_value = "modules")]
        out: PathBuf,
        /// Build for wasm32-unknown-unknown instead: the component imports
        /// no WASI, which makes each call cheaper, but crates that need WASI
        /// (random numbers, the system clock) do not work.
        #[arg(long)]
        no_wasi: bool,
    },
}

/// Returns the config file given as an argument or with `--config`; clap
/// requires exactly one of the two.
fn config_file(argument: Option<PathBuf>, flag: Option<PathBuf>) -> PathBuf {
    argument
        .or(flag)
        .expect("clap requires the config file as an argument or with --config")
}

/// Runs the command line and returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    // Commands that print a result keep the log to warnings and errors.
    let serving = matches!(cli.command, Command::Serve { .. } | Command::Demo { .. });
    init_tracing(if serving { "info" } else { "warn" });
    if !serving {
        quiet_on_closed_stdout();
    }
    let result = match cli.command {
        Command::Serve {
            config,
            config_flag,
        } => serve(&config_file(config, config_flag)),
        Command::Check {
            config,
            config_flag,
        } => check(&config_file(config, config_flag)),
        Command::Demo {
            listen,
            http_listen,
            modules,
        } => crate::demo::run(listen, http_listen, &modules),
        Command::Routes(RoutesCommand::Explain {
            config_flag,
            args,
            host,
        }) => match (config_flag, args.as_slice()) {
            (Some(config), [method, path]) => explain(&config, method, path, host.as_deref()),
            (None, [config, method, path]) => {
                explain(Path::new(config), method, path, host.as_deref())
            }
            (Some(_), _) => Err(anyhow::anyhow!(
                "with --config, give the method and the target only, such as GET /users/7"
            )),
            (None, _) => Err(anyhow::anyhow!(
                "give the config file, the method and the target, such as \
                 edge routes explain edge.toml GET /users/7, or use --config"
            )),
        },
        Command::Worker(WorkerCommand::New {
            name,
            dir,
            sdk_path,
            sdk_git,
        }) => crate::scaffold::new_worker(&name, &dir, sdk_path.as_deref(), sdk_git.as_deref()),
        Command::Worker(WorkerCommand::Build { path, out, no_wasi }) => {
            let target = if no_wasi {
                crate::scaffold::WorkerTarget::NoWasi
            } else {
                crate::scaffold::WorkerTarget::Wasi
            };
            crate::scaffold::build_worker(&path, &out, target)
        }
        Command::Top {
            admin,
            token,
            token_file,
            interval,
            once,
        } => crate::top::run(&crate::top::TopOptions {
            admin,
            token: token.as_deref(),
            token_file: token_file.as_deref(),
            interval,
            once,
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

/// Logs to stderr at `default_level`, or at the level the `EDGE_LOG`
/// variable sets (for example `EDGE_LOG=debug`).
///
/// rustls logs only errors unless `EDGE_LOG` names it: it warns once per
/// handshake about clients that send an IP address as SNI, as wrk does, and
/// the node logs failed handshakes itself at debug.
/// Makes a command whose output goes to a pipe that closes early, as into
/// `head`, end quietly as other command-line tools do, instead of with
/// `println!`'s panic and a backtrace.
fn quiet_on_closed_stdout() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .unwrap_or_default();
        if message.starts_with("failed printing to stdout") && message.contains("Broken pipe") {
            std::process::exit(0);
        }
        default_hook(info);
    }));
}

fn init_tracing(default_level: &str) {
    let mut directives = std::env::var("EDGE_LOG").unwrap_or_else(|_| default_level.to_owned());
    if !directives.contains("rustls") {
        directives.push_str(",rustls=error");
    }
    let filter = tracing_subscriber::EnvFilter::try_new(&directives)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// Loads a config and builds its node, loading every worker module.
pub fn load_node(path: &Path) -> anyhow::Result<(Config, Node)> {
    let config = Config::load(path)?;
    let node = Node::build(&config)?;
    Ok((config, node))
}

fn serve(path: &Path) -> anyhow::Result<()> {
    ignore_hangup_while_starting()?;
    let (config, node) = load_node(path)?;
    run_node(&config, node)
}

/// Raises the soft limit on open files to the hard limit. Each connection
/// takes a file descriptor, and the soft limit is often 1,024, which a few
/// hundred clients with their upstream connections reach. The hard limit
/// stays as the operator set it.
fn raise_open_files_limit() {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    // The kernel's default cap on a process's open files (`fs.nr_open`),
    // used when the hard limit is infinite.
    const NR_OPEN: u64 = 1 << 20;
    let limit = getrlimit(Resource::Nofile);
    let maximum = limit.maximum.unwrap_or(NR_OPEN);
    let Some(current) = limit.current else {
        return;
    };
    if current >= maximum {
        return;
    }
    let raised = Rlimit {
        current: Some(maximum),
        maximum: limit.maximum,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => tracing::debug!(from = current, to = maximum, "raised the open files limit"),
        Err(error) => tracing::warn!(
            %error,
            limit = current,
            "failed to raise the open files limit; raise it with `ulimit -n` if clients \
             get refused"
        ),
    }
}

/// Keeps SIGHUP from ending the process while the node starts. The node
/// handles SIGHUP once it serves, but loading its modules can take seconds,
/// and the default action of a SIGHUP sent then (by logrotate, say) is to
/// end the process. A tokio handler, once registered, stays for the
/// process's life, so SIGHUPs before the node's own handler are dropped.
pub fn ignore_hangup_while_starting() -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .build()?;
    let _entered = runtime.enter();
    let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .context("cannot install the SIGHUP handler")?;
    drop(hangup);
    Ok(())
}

/// Serves a built node until Ctrl-C or SIGTERM, printing its addresses.
pub fn run_node(config: &Config, node: Node) -> anyhow::Result<()> {
    raise_open_files_limit();
    let node = Arc::new(node);
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut side_threads = Vec::new();
    let mut admin_addr = None;
    if let Some(admin) = &config.admin {
        let admin = crate::admin::start(node.clone(), config, admin, stopped.clone())?;
        admin_addr = Some(admin.addr);
        side_threads.push(admin.thread);
    }
    side_threads.extend(
        crate::health::spawn_checker(node.clone(), stopped)
            .context("cannot start the health-check thread")?,
    );
    let server = Server::start(
        node.clone(),
        &config.listeners,
        config.threads(),
        config.node.drain_timeout,
    )?;
    // Every module is loaded and the listeners are bound, so the node will
    // serve, and the cache entries it needs are known.
    node.runtime.prune_cache();
    // Ready before the addresses are printed, which is when scripts and
    // tests start to send requests.
    // Listened for before the addresses are printed, so that a signal sent
    // as soon as they appear drains the node rather than killing it.
    let mut signals = StopSignals::listen()?;
    node.lifecycle.set(crate::node::Phase::Serving);
    // Printed only once the main listeners are bound too, so that a node
    // that fails to bind them does not seem to serve its admin listener.
    if let Some(addr) = admin_addr {
        println!("admin listening on http://{addr}");
    }
    for (addr, listener) in server.addrs.iter().zip(&node.listeners) {
        match &listener.tls {
            Some(tls) => {
                println!("listening on https://{addr}");
                if let Some(ca) = &tls.dev_ca {
                    print_dev_certificate_hint(ca, *addr);
                }
            }
            None => println!("listening on http://{addr}"),
        }
    }
    tracing::info!(node = %config.node.name, threads = config.threads(), "serving");
    signals.wait();
    let forced = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if let Err(error) =
        stop_on_second_signal(signals, node.clone(), server.stopper(), forced.clone())
    {
        tracing::warn!(error = %format!("{error:#}"), "a second signal will not cut the drain short");
    }
    tracing::info!(
        drain_timeout = ?config.node.drain_timeout,
        "shutting down; draining open connections (send SIGTERM or Ctrl-C again to stop at once)"
    );
    node.lifecycle.set(crate::node::Phase::Draining);
    server.shutdown();
    // Lines wait in the writer's batch for up to its flush interval.
    if let Some(access_log) = &node.access_log {
        access_log.flush();
    }
    let _ = stop.send(true);
    for thread in side_threads {
        let _ = thread.join();
    }
    tracing::info!("stopped");
    if forced.load(std::sync::atomic::Ordering::SeqCst) {
        std::process::exit(1);
    }
    Ok(())
}

/// Prints an upstream's timeouts, balancing, breaker, retry and health
/// settings for `routes explain`.
fn print_upstream(upstream: &crate::proxy::Upstream) {
    let settings = &upstream.settings;
    let targets: Vec<String> = upstream
        .targets
        .iter()
        .map(|t| t.addr.to_string())
        .collect();
    println!(
        "    targets: {} ({})",
        targets.join(", "),
        settings.policy.name()
    );
    let idle = settings
        .idle_timeout
        .map_or("none".to_owned(), |idle| format!("{idle:?}"));
    println!(
        "    timeouts: connect {:?}, response headers {:?}, idle body {idle}",
        settings.connect_timeout, settings.response_timeout
    );
    if let Some(max) = settings.max_in_flight {
        println!(
            "    requests in flight: at most {max} per target, then a wait of up to {:?} (and no \
             longer than the route's timeout) for a slot before 503 upstream_busy",
            settings.queue_timeout
        );
    }
    match &settings.breaker {
        Some(b) => println!(
            "    breaker: opens after {} consecutive failures{}; cool-down {:?} up to {:?}; \
             {} half-open probe(s); failure statuses {:?}",
            b.consecutive_failures,
            b.error_rate.map_or(String::new(), |rate| format!(
                " or over {:.0}% failed in {:?} (at least {} requests)",
                rate * 100.0,
                b.window,
                b.min_requests
            )),
            b.cool_down,
            b.max_cool_down,
            b.half_open_probes,
            settings.failure_statuses,
        ),
        None => println!("    breaker: off"),
    }
    let retry = &settings.retry;
    if retry.max_retries == 0 {
        println!("    retries: off");
    } else {
        println!(
            "    retries: up to {} (idempotent methods without a body, or never sent), \
             backoff {:?} up to {:?}, budget {:.0}% of requests + {}/s, on statuses {:?}",
            retry.max_retries,
            retry.backoff,
            retry.max_backoff,
            retry.budget_ratio * 100.0,
            retry.min_retries_per_second,
            retry.on_statuses,
        );
    }
    match &settings.active_health {
        Some(active) => println!(
            "    active health: GET {} every {:?} (timeout {:?}; {} to mark healthy, {} unhealthy)",
            active.path,
            active.interval,
            active.timeout,
            active.healthy_threshold,
            active.unhealthy_threshold
        ),
        None => println!("    active health: off"),
    }
    match &settings.passive_health {
        Some(passive) => println!(
            "    passive health: eject after {} failures in a row for {:?} up to {:?}",
            passive.consecutive_failures, passive.ejection_time, passive.max_ejection_time
        ),
        None => println!("    passive health: off"),
    }
}

/// Prints how to trust the development CA, or skip verification, in curl.
fn print_dev_certificate_hint(ca: &Path, addr: std::net::SocketAddr) {
    let port = addr.port();
    println!(
        "  this listener uses a self-signed development certificate for localhost, \
         127.0.0.1 and ::1"
    );
    println!(
        "  trust its CA per request: curl --cacert {} https://localhost:{port}/",
        ca.display()
    );
    println!("  or skip verification:     curl -k https://localhost:{port}/");
    println!(
        "  or trust it system-wide:  sudo cp {} /usr/local/share/ca-certificates/edge-dev.crt \
         && sudo update-ca-certificates",
        ca.display()
    );
}

/// How long a second signal waits for the serving threads to drop their
/// requests before the process ends without them.
const FORCED_STOP_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

/// Ends the drain at once when a second SIGTERM or Ctrl-C comes during it,
/// so that an operator need not wait out `drain_timeout` or send SIGKILL.
/// The open connections close, their requests write their access-log lines,
/// and the main thread exits with status 1 (`forced`).
fn stop_on_second_signal(
    mut signals: StopSignals,
    node: Arc<Node>,
    stopper: crate::listener::Stopper,
    forced: Arc<std::sync::atomic::AtomicBool>,
) -> anyhow::Result<()> {
    std::thread::Builder::new()
        .name("edge-stop".to_owned())
        .spawn(move || {
            signals.wait();
            tracing::warn!("second signal: stopping without waiting for open connections");
            // The serving threads drop their requests, which writes their
            // access-log lines, and the main thread then exits with status 1.
            forced.store(true, std::sync::atomic::Ordering::SeqCst);
            stopper.stop_now();
            std::thread::sleep(FORCED_STOP_GRACE);
            tracing::warn!(
                grace = ?FORCED_STOP_GRACE,
                "serving threads did not stop in time; exiting without them"
            );
            if let Some(access_log) = &node.access_log {
                access_log.flush();
            }
            std::process::exit(1);
        })
        .context("cannot start the thread that listens for a second signal")?;
    Ok(())
}

/// The listeners for SIGTERM and Ctrl-C (SIGINT), from before the node
/// serves until it exits. The wait for the signal that starts the drain and
/// the wait for the one that cuts it short read the same listeners, so a
/// second signal sent right after the first is not lost between them.
struct StopSignals {
    runtime: tokio::runtime::Runtime,
    terminate: tokio::signal::unix::Signal,
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};

        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("cannot build the signal runtime")?;
        let entered = runtime.enter();
        let terminate = signal(SignalKind::terminate()).context("cannot listen for SIGTERM")?;
        let interrupt = signal(SignalKind::interrupt()).context("cannot listen for Ctrl-C")?;
        drop(entered);
        Ok(StopSignals {
            runtime,
            terminate,
            interrupt,
        })
    }

    /// Waits for the next SIGTERM or Ctrl-C, or returns at once for one
    /// that came since the last wait.
    fn wait(&mut self) {
        let (terminate, interrupt) = (&mut self.terminate, &mut self.interrupt);
        self.runtime.block_on(async {
            tokio::select! {
                _ = terminate.recv() => {}
                _ = interrupt.recv() => {}
            }
        });
    }
}

fn check(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let node = Node::build_read_only(&config)?;
    // `serve` reads a token file only when it starts the admin listener.
    if let Some(admin) = &config.admin {
        crate::admin::read_token(&config, admin)?;
    }
    let workers: usize = node.routes.iter().map(|r| r.workers.len()).sum();
    println!(
        "{}: ok ({}, {}, {}, {})",
        config.source.name,
        counted(config.listeners.len(), "listener"),
        counted(config.upstreams.len(), "upstream"),
        counted(config.routes.len(), "route"),
        counted(workers, "worker"),
    );
    Ok(())
}

/// Formats `count` with `noun`, plural unless the count is one.
fn counted(count: usize, noun: &str) -> String {
    match count {
        1 => format!("1 {noun}"),
        _ => format!("{count} {noun}s"),
    }
}

fn explain(path: &Path, method: &str, raw_path: &str, host: Option<&str>) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    let node = Node::build_read_only(&config)?;
    // The same checks as the node's, so that a request the node rejects is
    // never shown as matching a route.
    let method: http::Method = method
        .parse()
        .with_context(|| format!("{method:?} is not an HTTP method"))?;
    crate::pipeline::check_method(&method).map_err(|refusal| {
        anyhow::anyhow!(
            "{} (the node responds {} {})",
            refusal.message(),
            refusal.status().as_u16(),
            refusal.code()
        )
    })?;
    // A fragment never reaches the node's routing: hyper drops it.
    let raw_path = raw_path
        .split_once('#')
        .map_or(raw_path, |(before, _)| before);
    // An absolute-form target (`http://host/path`) names the host itself,
    // which the node takes over any Host header.
    let absolute = raw_path
        .parse::<http::Uri>()
        .ok()
        .filter(|uri| uri.scheme().is_some());
    // `path()` is `/` for a target with no path, as the node sends it.
    let target = absolute.as_ref().map(|uri| match uri.query() {
        Some(query) => format!("{}?{query}", uri.path()),
        None => uri.path().to_owned(),
    });
    if absolute.is_none() && !raw_path.starts_with('/') {
        anyhow::bail!(
            "{raw_path:?} is not a request target: write a path that starts with '/', or an \
             absolute URI such as http://example.com/path (the node responds 400 to others)"
        );
    }
    let (host, raw_path) = match (&absolute, &target) {
        (Some(uri), Some(target)) => (
            uri.authority().map(http::uri::Authority::as_str),
            target.as_str(),
        ),
        _ => (host, raw_path),
    };
    if let Some(host) = host {
        crate::pipeline::check_host(host.as_bytes()).map_err(|reason| {
            anyhow::anyhow!("the Host {host:?} {reason} (the node responds 400 invalid_host)")
        })?;
    }
    // Routes match the path alone.
    let (raw_path, query) = match raw_path.split_once('?') {
        Some((path, query)) => (path, Some(query)),
        None => (raw_path, None),
    };
    let normal = crate::route::normalize_path(raw_path)
        .map_err(|e| anyhow::anyhow!("path {raw_path:?} is rejected with 400 invalid_path: {e}"))?;
    let host = host.map(|h| crate::route::host_name(h).into_owned());
    println!(
        "request: {method} {normal}{}",
        host.as_deref()
            .map(|h| format!(" (host {h})"))
            .unwrap_or_default()
    );
    if normal != raw_path {
        println!("  the path {raw_path:?} is normalised to {normal:?}");
    }
    if let Some(query) = query {
        println!("  the query {query:?} plays no part in routing");
    }
    let verdicts = node.router.explain(host.as_deref(), &method, &normal);
    let winner = verdicts.iter().find(|v| v.mismatch.is_none());
    match winner {
        Some(verdict) => {
            let route = &node.routes[verdict.rule.index];
            let config_route = &config.routes[verdict.rule.index];
            let case = if verdict.rule.case_sensitive {
                ""
            } else {
                ", any case"
            };
            println!(
                "matches route {:?} ({}{case})",
                route.name, verdict.rule.path
            );
            match &config_route.upstream {
                Some(upstream) => {
                    println!("  upstream: {}", upstream.get_ref());
                    if let Some(index) = node.upstream_index(upstream.get_ref()) {
                        print_upstream(&node.upstreams[index]);
                    }
                }
                None => println!("  upstream: none; a worker must route or respond"),
            }
            match route.timeout {
                Some(timeout) => println!("  route timeout: {timeout:?} for the whole exchange"),
                None => println!("  route timeout: none"),
            }
            println!(
                "  max body: {}",
                crate::config::binary(config_route.max_body)
            );
            if route.workers.is_empty() {
                println!("  workers: none");
            }
            for (index, (binding, worker)) in
                route.workers.iter().zip(&config_route.workers).enumerate()
            {
                println!(
                    "  worker {}: {} (sha256 {}, cpu deadline {:?}, memory cap {}{})",
                    index + 1,
                    config.resolve(worker.module.get_ref()).display(),
                    &binding.module.hash[..12],
                    worker.cpu_deadline.get_ref(),
                    crate::config::binary(*worker.max_memory.get_ref()),
                    if binding.response_hook {
                        ", response hook"
                    } else {
                        ""
                    },
                );
                if !worker.fetch.is_empty() {
                    let upstreams: Vec<&str> = worker
                        .fetch
                        .iter()
                        .map(|name| name.get_ref().as_str())
                        .collect();
                    println!("    fetch: {}", upstreams.join(", "));
                    let limits = &config.runtime.fetch;
                    println!(
                        "      timeout {} by default, at most {}; at most {} requests a send \
                         call and {} a hook call, waiting at most {} in all; responses up to {}",
                        humantime::format_duration(limits.default_timeout),
                        humantime::format_duration(limits.max_timeout),
                        limits.max_requests_per_call,
                        limits.max_requests_per_hook,
                        humantime::format_duration(limits.max_wait_per_hook),
                        crate::config::binary(limits.max_response_body),
                    );
                }
            }
            if route.limits.is_empty() {
                println!("  rate limits: none");
            }
            for (index, limit) in route.limits.iter().enumerate() {
                let when = match limit.spec.key.context_name() {
                    None => "before the workers",
                    Some(_) => "after the first worker that sets its context value",
                };
                println!(
                    "  rate limit {}: {:?}, {} ({when})",
                    index + 1,
                    limit.spec.name,
                    limit.spec.describe()
                );
            }
            if let Some(redis) = &config.redis {
                if route
                    .limits
                    .iter()
                    .any(|l| l.spec.scope == crate::ratelimit::Scope::Global)
                {
                    let redis = redis.get_ref();
                    println!(
                        "  redis: {}, {:?} timeout per decision",
                        node.ratelimit.backend().map_or("", |b| &*b.description),
                        redis.timeout
                    );
                }
            }
        }
        None => println!("no route matches: the node answers 404 no_route"),
    }
    println!("routes in the order they are tried:");
    for verdict in &verdicts {
        let outcome = match (&verdict.mismatch, winner) {
            (None, Some(w)) if std::ptr::eq(w.rule, verdict.rule) => "matches".to_owned(),
            (None, _) => "also matches, but a more specific route comes first".to_owned(),
            (Some(reason), _) => reason.clone(),
        };
        println!("  {:<20} {outcome}", verdict.rule.name);
    }
    if winner.is_none() && verdicts.is_empty() {
        bail!("the config has no routes");
    }
    Ok(())
}
