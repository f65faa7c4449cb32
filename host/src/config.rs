//! The node's TOML config: listeners, the worker runtime, upstreams and routes.
//!
//! Parsing checks types and names field by field; [`Config::validate`] checks
//! what spans several fields (a route naming an unknown upstream, a bad path
//! pattern). Every error names the file, the line and the field.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytesize::ByteSize;
use ipnet::IpNet;
use serde::Deserialize;
use toml::Spanned;

use crate::route::PathMatch;

/// The config an `edge` node runs with.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default)]
    pub node: NodeConfig,
    /// Addresses that accept client connections. At least one is required.
    #[serde(default)]
    pub listeners: Vec<ListenerConfig>,
    #[serde(default)]
    pub runtime: RuntimeConfig,
    /// Upstream services by name.
    #[serde(default)]
    pub upstreams: BTreeMap<String, UpstreamConfig>,
    /// Routes, matched by host, method and path.
    #[serde(default)]
    pub routes: Vec<RouteConfig>,
    /// The Redis server or cluster that global rate limits count in.
    pub redis: Option<Spanned<RedisConfig>>,
    /// The admin listener. Default: none.
    pub admin: Option<AdminConfig>,
    /// Request metrics on the admin listener's `/metrics`.
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// One JSON line per request. Default: off.
    pub access_log: Option<AccessLogConfig>,
    /// Span export over OTLP. Default: off.
    #[serde(default)]
    pub tracing: TracingConfig,
    /// The file this config came from, for errors and relative paths.
    #[serde(skip)]
    pub source: ConfigSource,
}

/// The origin of a config: its name, folder and text.
#[derive(Debug, Clone, Default)]
pub struct ConfigSource {
    /// The file name shown in errors, such as `edge.toml` or `<built-in demo>`.
    pub name: String,
    /// The folder that relative paths in the config are resolved against.
    pub base_dir: PathBuf,
    /// The config text, to turn byte offsets into line numbers.
    pub text: String,
}

/// The admin listener: breaker states and target health as JSON, for
/// requests with `Authorization: Bearer <token>`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// The socket address. Default: `127.0.0.1:9901`.
    #[serde(default = "default_admin_addr", with = "socket_addr::spanned")]
    pub addr: Spanned<SocketAddr>,
    /// The bearer token, at least 16 characters. Set this or `token_file`.
    pub token: Option<Spanned<String>>,
    /// A file whose first line is the token, relative to the config file.
    pub token_file: Option<Spanned<PathBuf>>,
    /// How long a status-page session lasts after its log-in. Default: 12h.
    #[serde(with = "humantime_serde", default = "default_session_timeout")]
    pub session_timeout: Duration,
}

fn default_session_timeout() -> Duration {
    Duration::from_secs(12 * 3600)
}

fn default_admin_addr() -> Spanned<SocketAddr> {
    Spanned::new(0..0, SocketAddr::from(([127, 0, 0, 1], 9901)))
}

/// Request metrics: counters and histograms updated on every request.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct MetricsConfig {
    /// Counts requests and their durations. The node's state (breakers,
    /// limits, pools) is on `/metrics` either way. Default: true.
    pub enabled: bool,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self { enabled: true }
    }
}

/// The access log: one JSON line per request, written by a background
/// thread.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AccessLogConfig {
    /// The file lines are appended to, relative to the config file.
    /// Default: standard output.
    pub path: Option<Spanned<PathBuf>>,
    /// Lines that may wait for the writer; past that, lines are dropped and
    /// counted in `edge_access_log_dropped_total`. Default: 8192.
    #[serde(default = "default_access_log_buffer")]
    pub buffer: Spanned<usize>,
}

fn default_access_log_buffer() -> Spanned<usize> {
    Spanned::new(0..0, 8192)
}

/// Trace spans: one per request with a child per stage, exported over
/// OTLP/HTTP (protobuf) by a background thread. Needs a build with the
/// `otlp` cargo feature.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TracingConfig {
    /// The collector's OTLP/HTTP base URL, such as `http://127.0.0.1:4318`;
    /// spans are posted to its `/v1/traces` path unless the URL has a path
    /// of its own. Plain `http` only. Default: none (no export).
    pub otlp_endpoint: Option<Spanned<String>>,
    /// Requests whose spans may wait for the exporter; past that, their
    /// spans are dropped and counted in `edge_otlp_spans_dropped_total`.
    /// From 1 to 1000000. Default: 4096.
    pub otlp_queue: usize,
    /// How often the exporter sends what has queued up. From 10ms to 1m.
    /// Default: 1s.
    #[serde(with = "humantime_serde")]
    pub otlp_interval: Duration,
    /// The time allowed for one export request. From 10ms to 1m.
    /// Default: 10s.
    #[serde(with = "humantime_serde")]
    pub otlp_timeout: Duration,
}

impl Default for TracingConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_queue: 4096,
            otlp_interval: Duration::from_secs(1),
            otlp_timeout: Duration::from_secs(10),
        }
    }
}

/// Settings of the node as a whole.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// The node's name, sent in `Via` and `X-Gateway-Node` and written to
    /// the access log. Default: the host name, or `edge` when it is not a
    /// valid header value.
    pub name: String,
    /// Runtime threads that serve connections. Default: the number of cores.
    pub threads: Option<Spanned<usize>>,
    /// How long open connections may take to finish on shutdown. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub drain_timeout: Duration,
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            name: default_node_name(),
            threads: None,
            drain_timeout: Duration::from_secs(10),
        }
    }
}

/// Returns the machine's host name when it is a valid node name, else
/// `edge`.
fn default_node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|name| name.trim().to_owned())
        .filter(|name| is_node_name(name))
        .unwrap_or_else(|| "edge".to_owned())
}

/// Whether `name` can be sent in `Via` and `X-Gateway-Node`: non-empty
/// printable ASCII without spaces.
fn is_node_name(name: &str) -> bool {
    !name.is_empty() && name.bytes().all(|byte| byte.is_ascii_graphic())
}

/// One address the node accepts connections on: HTTPS when `tls` is set
/// (HTTP/1.1 and HTTP/2 chosen by ALPN), plain HTTP otherwise (HTTP/1.1 and
/// HTTP/2 with prior knowledge).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// The socket address, such as `0.0.0.0:8080`. Port 0 picks a free port.
    #[serde(with = "socket_addr::spanned")]
    pub addr: Spanned<SocketAddr>,
    /// Peers whose `X-Forwarded-For` is trusted and appended to; for every
    /// other peer the header is replaced. Default: none.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Time allowed for a client to finish the TLS handshake and to send a
    /// request's headers. Default: 30s.
    #[serde(default = "default_header_timeout", with = "humantime_serde")]
    pub header_timeout: Duration,
    /// Time a write to the client may wait for the client to read, before
    /// the node closes the connection. Default: 60s.
    #[serde(default = "default_send_timeout", with = "humantime_serde")]
    pub send_timeout: Duration,
    /// Terminates TLS on this listener. Default: plain HTTP.
    pub tls: Option<ListenerTlsConfig>,
    /// Redirects every request to HTTPS with a 308, except on the
    /// listed paths. Only on a plain-HTTP listener. Default: off.
    pub redirect_https: Option<RedirectConfig>,
    /// Keeps request headers whose names have an underscore. By default
    /// they are removed, as nginx does, because servers that turn header
    /// names into variables (CGI, WSGI, PHP) read `X_User_Id` as the
    /// `X-User-Id` that the node or a worker controls.
    #[serde(default)]
    pub underscores_in_headers: bool,
}

fn default_header_timeout() -> Duration {
    Duration::from_secs(30)
}

fn default_send_timeout() -> Duration {
    Duration::from_secs(60)
}

/// TLS settings of a listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerTlsConfig {
    /// Certificate chains with their keys, chosen by the client's SNI name
    /// against each certificate's DNS names (wildcards included). The first
    /// one is the default certificate.
    #[serde(default)]
    pub certificates: Vec<CertificateConfig>,
    /// Generates (or reuses) a self-signed development CA and a certificate
    /// for localhost, 127.0.0.1 and ::1 in `.edge-dev-tls/` beside the config
    /// file, instead of `certificates`. Default: false.
    #[serde(default)]
    pub dev_certificate: bool,
    /// The handling of a client that sends no SNI name, or one no certificate
    /// covers: `default` (the first certificate) or `reject` (the handshake
    /// fails, and rustls sends an `access_denied` alert). Default: `default`.
    #[serde(default)]
    pub sni_fallback: SniFallback,
    /// PEM file of the CAs that client certificates must chain to; setting it
    /// turns on client certificate (mutual TLS) checks. Default: none.
    pub client_ca: Option<Spanned<PathBuf>>,
    /// With `client_ca`: `required` rejects a handshake without a valid
    /// client certificate, `optional` accepts one without a certificate but
    /// still rejects an invalid one. Default: `required`. Setting it
    /// without `client_ca` is an error, because without a CA no client
    /// certificate is checked.
    pub client_auth: Option<Spanned<ClientAuth>>,
    /// The request header that carries the verified client certificate's
    /// subject (RFC 4514, such as `CN=client-1,O=Example`) to workers and
    /// upstreams. The node removes any value the client sent. Default:
    /// `x-client-cert-subject`.
    #[serde(default = "default_subject_header")]
    pub client_subject_header: Spanned<String>,
    /// How often the certificate, key and CA files are checked for changes;
    /// changed files are loaded for new connections. `0s` turns the checks
    /// off (SIGHUP still reloads). Default: 5s.
    #[serde(default = "default_reload_interval", with = "humantime_serde")]
    pub reload_interval: Duration,
    /// The `Strict-Transport-Security` value added to responses that do not
    /// have one, such as `max-age=31536000; includeSubDomains`. Default:
    /// none.
    pub hsts: Option<Spanned<String>>,
}

fn default_subject_header() -> Spanned<String> {
    Spanned::new(0..0, "x-client-cert-subject".to_owned())
}

fn default_reload_interval() -> Duration {
    Duration::from_secs(5)
}

/// A certificate chain and its private key, both PEM files.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateConfig {
    /// The PEM certificate chain, the server's certificate first.
    pub cert: Spanned<PathBuf>,
    /// The PEM private key: PKCS#8, PKCS#1 (RSA) or SEC1 (ECDSA); RSA, ECDSA
    /// and Ed25519 keys are accepted.
    pub key: Spanned<PathBuf>,
}

/// The handling by a TLS listener of a client whose SNI name matches no
/// certificate.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SniFallback {
    /// Serve the first certificate.
    #[default]
    Default,
    /// Fail the handshake.
    Reject,
}

/// Whether a client certificate is required when `client_ca` is set.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientAuth {
    #[default]
    Required,
    Optional,
}

/// Reads a redirect's port, from 1 to 65535, with an error that names the
/// range instead of serde's "expected u16".
fn redirect_port<'de, D: serde::Deserializer<'de>>(
    deserializer: D,
) -> Result<Option<u16>, D::Error> {
    let port = i64::deserialize(deserializer)?;
    match u16::try_from(port) {
        Ok(port) if port > 0 => Ok(Some(port)),
        _ => Err(serde::de::Error::custom(format!(
            "invalid port {port}: the port must be from 1 to 65535"
        ))),
    }
}

/// The HTTP-to-HTTPS redirect of a plain-HTTP listener.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedirectConfig {
    /// The port in the redirect's `https://` URL. Default: the port of the
    /// config's first TLS listener.
    #[serde(default, deserialize_with = "redirect_port")]
    pub port: Option<u16>,
    /// Path prefixes, on whole segments, that are served as usual instead of
    /// redirected, such as `/.well-known/acme-challenge`. Default: none.
    #[serde(default)]
    pub except: Vec<Spanned<String>>,
}

/// TLS to an upstream's targets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsConfig {
    /// PEM file of the CAs the targets' certificates must chain to. Default:
    /// the system's trusted roots.
    pub ca: Option<Spanned<PathBuf>>,
    /// The name sent as SNI and checked against the targets' certificates.
    /// Default: each target's IP address.
    pub server_name: Option<Spanned<String>>,
    /// A client certificate to present to the targets (mutual TLS).
    pub client_certificate: Option<CertificateConfig>,
}

/// Returns whether two listening addresses cannot both be bound: the same
/// port (not 0, which picks a free one) on the same address, or on any
/// address when either is unspecified (`0.0.0.0` or `::`).
fn addresses_clash(a: &SocketAddr, b: &SocketAddr) -> bool {
    // An IPv4-mapped IPv6 address (`[::ffff:127.0.0.1]`) binds the IPv4 one.
    let (ip_a, ip_b) = (a.ip().to_canonical(), b.ip().to_canonical());
    a.port() == b.port()
        && a.port() != 0
        && (ip_a == ip_b || ip_a.is_unspecified() || ip_b.is_unspecified())
}

/// Settings of the worker runtime shared by every route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// The folder of the compiled-module cache, relative to the config file.
    /// Default: `.edge-cache` beside the config file.
    pub cache_dir: Option<PathBuf>,
    /// The total size of the cache's entries that a starting node keeps; the
    /// least recently used go first, never those of the node's own modules.
    /// Default: 1 GiB.
    #[serde(with = "size")]
    pub cache_max_size: ByteSize,
    /// Entries no node has used for longer than this are removed at start.
    /// Default: 30 days.
    #[serde(with = "humantime_serde")]
    pub cache_max_age: Duration,
    /// Worker instances that may exist at once across the node; this sizes the
    /// instance pool. Default: 128.
    pub max_instances: u32,
    /// Requests that may wait for a free instance at once. Default: 1024.
    pub queue_limit: usize,
    /// How long a request waits for a free instance before 503 `worker_busy`.
    /// Default: 20ms.
    #[serde(with = "humantime_serde")]
    pub queue_timeout: Duration,
    /// The largest memory cap a worker may be given; the size of each pool
    /// slot. Default: 64 MiB.
    #[serde(with = "size")]
    pub max_memory: ByteSize,
    /// Limits on the requests workers send to upstreams with `fetch`.
    pub fetch: FetchConfig,
}

/// Limits on the requests workers send to upstreams through their `fetch`
/// import; which upstreams a worker may reach is set per route entry.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FetchConfig {
    /// Time allowed for a request that sets no timeout of its own, from
    /// sending it to the last byte of the response body. Default: 1s.
    #[serde(with = "humantime_serde")]
    pub default_timeout: Duration,
    /// The maximum timeout a request may set; a longer one is cut to this.
    /// It also bounds how long one `send` call can wait. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub max_timeout: Duration,
    /// The largest response body a worker receives; a larger one fails with
    /// `response-too-large`. Default: 1 MiB.
    #[serde(with = "size")]
    pub max_response_body: ByteSize,
    /// Requests in one `send` call; the rest fail with `invalid-request`.
    /// Default: 16.
    pub max_requests_per_call: usize,
    /// Requests one hook call may send over all its `send` calls; the rest
    /// fail with `invalid-request`. Default: 64.
    pub max_requests_per_hook: usize,
    /// The total time one hook call may wait in its `send` calls. A request
    /// sent with less left has its timeout cut to what is left. Default: 30s.
    #[serde(with = "humantime_serde")]
    pub max_wait_per_hook: Duration,
}

impl Default for FetchConfig {
    fn default() -> Self {
        Self {
            default_timeout: Duration::from_secs(1),
            max_timeout: Duration::from_secs(10),
            max_response_body: ByteSize::mib(1),
            max_requests_per_call: 16,
            max_requests_per_hook: 64,
            max_wait_per_hook: Duration::from_secs(30),
        }
    }
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            cache_dir: None,
            cache_max_size: ByteSize::b(crate::worker::Retention::default().max_size),
            cache_max_age: crate::worker::Retention::default().max_age,
            max_instances: 128,
            queue_limit: 1024,
            queue_timeout: Duration::from_millis(20),
            max_memory: ByteSize::mib(64),
            fetch: FetchConfig::default(),
        }
    }
}

/// An upstream service: one or more targets that receive proxied requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpstreamConfig {
    /// Target addresses, such as `127.0.0.1:9000`; requests go to them in
    /// turn.
    #[serde(deserialize_with = "socket_addr::deserialize_list")]
    pub targets: Spanned<Vec<SocketAddr>>,
    /// Time allowed to open a TCP connection to a target. Default: 2s.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Time allowed from sending the request until the response headers
    /// arrive. Default: 30s.
    #[serde(default = "default_response_timeout", with = "humantime_serde")]
    pub response_timeout: Duration,
    /// Idle keep-alive connections kept per target and runtime thread.
    /// Default: 64.
    #[serde(default = "default_max_idle")]
    pub max_idle_per_target: usize,
    /// How long a connection may wait idle in the pool before a request
    /// takes it; older ones are closed instead. Keep it below the
    /// upstream's own keep-alive timeout. Default: 60s.
    #[serde(default = "default_keepalive_timeout", with = "humantime_serde")]
    pub keepalive_timeout: Duration,
    /// Requests in flight to one target at a time, across the node's
    /// threads: each keeps an upstream connection until its response body
    /// ends. Default: no limit.
    pub max_requests_per_target: Option<usize>,
    /// How long a request waits for one of a full target's request slots
    /// before 503 `upstream_busy`; only with `max_requests_per_target`.
    /// Default: 1s.
    #[serde(default, with = "humantime_serde")]
    pub queue_timeout: Option<Duration>,
    /// Speaks HTTPS to the targets. Default: plain HTTP.
    pub tls: Option<UpstreamTlsConfig>,
    /// Time a response body may go without data before it is cut off; `0s`
    /// for no limit. Default: 60s.
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// The load-balancing policy across the targets: `round_robin`,
    /// `least_outstanding` or `consistent_hash`. Default: `round_robin`.
    #[serde(default)]
    pub balance: BalanceName,
    /// With `consistent_hash`: `header:NAME`, `cookie:NAME` or `client_ip`.
    /// A request without the key goes round robin.
    pub hash_key: Option<Spanned<String>>,
    /// Response statuses that count as failures for the breakers and
    /// passive health. Default: 502, 503, 504.
    #[serde(default = "default_failure_statuses")]
    pub failure_statuses: Vec<u16>,
    #[serde(default)]
    pub breaker: BreakerConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub health: HealthConfig,
}

/// An upstream's load-balancing policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BalanceName {
    #[default]
    RoundRobin,
    LeastOutstanding,
    ConsistentHash,
}

/// The circuit breaker of each target of an upstream.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Turns the breakers on. Default: true.
    pub enabled: bool,
    /// Consecutive failures (connect errors, timeouts, failure statuses)
    /// that open a target's breaker; 0 turns this trigger off. Default: 5.
    pub consecutive_failures: u32,
    /// The percentage of failed requests over `window` that opens the
    /// breaker, from 1 to 100; 0 turns this trigger off. Default: 50.
    pub error_rate_percent: u32,
    /// The rolling window of the error rate. Default: 10s.
    #[serde(with = "humantime_serde")]
    pub window: Duration,
    /// Requests the window must hold before the error rate counts.
    /// Default: 20.
    pub min_requests: u32,
    /// Time an open breaker refuses requests before it lets probes
    /// through. Default: 5s.
    #[serde(with = "humantime_serde")]
    pub cool_down: Duration,
    /// The cool-down doubles after each failed probe up to this. Default:
    /// 60s.
    #[serde(with = "humantime_serde")]
    pub max_cool_down: Duration,
    /// Probe requests let through at once while half-open; that many
    /// successes close the breaker. Default: 1.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            consecutive_failures: 5,
            error_rate_percent: 50,
            window: Duration::from_secs(10),
            min_requests: 20,
            cool_down: Duration::from_secs(5),
            max_cool_down: Duration::from_secs(60),
            half_open_probes: 1,
        }
    }
}

/// Retries of an upstream's failed requests.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Attempts after the first; 0 turns retries off. Default: 1.
    pub max_retries: u32,
    /// The backoff before the first retry, doubled for each later one,
    /// with full jitter. Default: 25ms.
    #[serde(with = "humantime_serde")]
    pub backoff: Duration,
    /// The maximum backoff. Default: 250ms.
    #[serde(with = "humantime_serde")]
    pub max_backoff: Duration,
    /// Retries allowed as a percentage of requests, from 0 to 100.
    /// Default: 20.
    pub budget_percent: u32,
    /// Retries allowed each second on top of the percentage, so that a
    /// quiet upstream can retry too. Default: 10.
    pub min_retries_per_second: u32,
    /// Response statuses retried, for requests that may be sent again.
    /// Default: 502, 503, 504.
    pub on_statuses: Vec<u16>,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 1,
            backoff: Duration::from_millis(25),
            max_backoff: Duration::from_millis(250),
            budget_percent: 20,
            min_retries_per_second: 10,
            on_statuses: default_failure_statuses(),
        }
    }
}

/// Health checking of an upstream's targets.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthConfig {
    /// Active checks: a GET of `path` on each target every `interval`.
    /// Default: off.
    pub active: Option<ActiveHealthConfig>,
    /// Passive ejection of targets that fail real requests. Default: off.
    pub passive: Option<PassiveHealthConfig>,
}

/// Active health checks.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthConfig {
    /// The path requested; a 2xx or 3xx status passes.
    pub path: Spanned<String>,
    /// Time between checks of a target. Default: 5s.
    #[serde(default = "default_check_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// Time a check may take. Default: 1s.
    #[serde(default = "default_check_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Passed checks in a row that mark an unhealthy target healthy.
    /// Default: 2.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Failed checks in a row that mark a healthy target unhealthy.
    /// Default: 3.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
}

/// Passive outlier ejection.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PassiveHealthConfig {
    /// Failed requests in a row that eject a target. Default: 5.
    #[serde(default = "default_passive_failures")]
    pub consecutive_failures: u32,
    /// The first ejection's length, doubled for each ejection in a row.
    /// Default: 30s.
    #[serde(default = "default_ejection_time", with = "humantime_serde")]
    pub ejection_time: Duration,
    /// The maximum ejection time. Default: 300s.
    #[serde(default = "default_max_ejection_time", with = "humantime_serde")]
    pub max_ejection_time: Duration,
}

fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_failure_statuses() -> Vec<u16> {
    vec![502, 503, 504]
}

fn default_check_interval() -> Duration {
    Duration::from_secs(5)
}

fn default_check_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_healthy_threshold() -> u32 {
    2
}

fn default_unhealthy_threshold() -> u32 {
    3
}

fn default_passive_failures() -> u32 {
    5
}

fn default_ejection_time() -> Duration {
    Duration::from_secs(30)
}

fn default_max_ejection_time() -> Duration {
    Duration::from_secs(300)
}

fn default_connect_timeout() -> Duration {
    Duration::from_secs(2)
}

fn default_response_timeout() -> Duration {
    Duration::from_secs(30)
}

/// How long a request waits for a full target's slot by default.
pub const DEFAULT_UPSTREAM_QUEUE_TIMEOUT: Duration = Duration::from_secs(1);

fn default_max_idle() -> usize {
    64
}

fn default_keepalive_timeout() -> Duration {
    Duration::from_secs(60)
}

fn default_case_sensitive() -> bool {
    true
}

/// A route: which requests it matches, the workers that run on them and the
/// upstream they go to.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// A unique name, used in logs, errors and worker requests.
    pub name: Spanned<String>,
    /// The `Host` to match: an exact name, or `*.example.com` for any
    /// subdomain. Default: any host.
    pub host: Option<String>,
    /// Methods to match. Default: any method.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Matches this path and everything below it, on whole segments.
    pub prefix: Option<Spanned<String>>,
    /// Matches exactly this path.
    pub path: Option<Spanned<String>>,
    /// Matches a path with named segments, such as `/{device}/home`.
    pub pattern: Option<Spanned<String>>,
    /// Whether the path rule's letters match only in the same case. With
    /// `false`, `/ADMIN/x` matches the prefix `/admin`. Default: true.
    #[serde(default = "default_case_sensitive")]
    pub case_sensitive: bool,
    /// Request headers removed once the route matches, before its limits,
    /// workers and upstream see the request, such as
    /// `x-http-method-override`. Default: none.
    #[serde(default)]
    pub remove_request_headers: Vec<Spanned<String>>,
    /// The upstream requests go to unless a worker routes them elsewhere.
    pub upstream: Option<Spanned<String>>,
    /// The largest request body accepted. Default: 10 MiB.
    #[serde(default = "default_max_body", with = "size")]
    pub max_body: ByteSize,
    /// Time allowed for the upstream exchange as a whole: every attempt,
    /// the backoffs between them and the response body. Default: none.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
    /// Workers that run on each request, in order.
    #[serde(default)]
    pub workers: Vec<WorkerConfig>,
    /// The maximum number of worker instances this route's calls may hold
    /// at once, so that a route whose workers run long cannot take every
    /// slot of `runtime.max_instances`. Default: no share of its own.
    pub max_instances: Option<Spanned<u32>>,
    /// Rate limits, checked in order. The first that rejects a request
    /// gets a 429.
    #[serde(default)]
    pub limits: Vec<LimitConfig>,
    /// The observability headers of the route's responses and requests.
    #[serde(default)]
    pub observability: RouteObservabilityConfig,
    /// Headers added to every response of the route, such as
    /// `vary = "User-Agent"` behind a worker that routes by device.
    #[serde(default)]
    pub response_headers: BTreeMap<String, Spanned<String>>,
    /// Proxies WebSocket handshakes from HTTP/1.1 clients (`GET` with
    /// `Connection: upgrade` and `Upgrade: websocket`) and, after the
    /// upstream's 101, the connection's bytes both ways. Without it, such
    /// a handshake gets 501 `unsupported_upgrade`. Default: false.
    #[serde(default)]
    pub websocket: bool,
    /// With `websocket`: how long a tunnel may carry no bytes either way
    /// before the node closes both sides; `0s` for no limit. Default: the
    /// upstream's `idle_timeout`.
    #[serde(default, with = "humantime_serde")]
    pub websocket_idle_timeout: Option<Duration>,
}

/// Switches for the headers the node adds to a route's traffic; each is on
/// unless turned off.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteObservabilityConfig {
    /// `X-Request-Id` on the response and the upstream request: the
    /// client's when valid, else a new one. Default: true.
    pub request_id: bool,
    /// `X-Request-Duration` on the response: the time spent in the node,
    /// without the upstream's. Default: true.
    pub request_duration: bool,
    /// `X-Gateway-Node` on the response: the node's name. Default: true.
    pub gateway_node: bool,
    /// W3C `traceparent` and `tracestate` on the upstream request: the
    /// client's trace continued, or a new one. Default: true.
    pub trace_context: bool,
}

impl Default for RouteObservabilityConfig {
    fn default() -> Self {
        Self {
            request_id: true,
            request_duration: true,
            gateway_node: true,
            trace_context: true,
        }
    }
}

/// One rate limit of a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitConfig {
    /// The name shown in 429 bodies, logs and `routes explain`, unique in
    /// the route. Default: the key and the rate, such as `ip 10/s`.
    pub name: Option<Spanned<String>>,
    /// The key requests are counted by: `ip` (the client address, after
    /// trusted proxies), `route` (all requests of the route together) or
    /// `header:NAME` (a header's value, such as an API key). Requests
    /// without the header are counted by client address.
    pub key: Spanned<String>,
    /// `token_bucket`, `leaky_bucket`, `fixed_window` or `sliding_window`.
    pub algorithm: Spanned<crate::ratelimit::Algorithm>,
    /// Requests per period, such as `10/s`, `100/min`, `1000/h` or `5/10s`.
    pub rate: Spanned<String>,
    /// Buckets only: requests admitted at once. Default: the rate's count
    /// for a token bucket, 1 for a leaky bucket.
    pub burst: Option<Spanned<u64>>,
    /// `local` (counted on this node) or `global` (counted in Redis, across
    /// every node that shares it). Default: local.
    #[serde(default)]
    pub scope: crate::ratelimit::Scope,
    /// Global limits only: `fail_open` (count on this node while Redis is
    /// unreachable) or `fail_closed` (respond 503). Default: fail_open.
    pub on_redis_error: Option<Spanned<crate::ratelimit::FailMode>>,
    /// Leaky bucket only: `reject` (refuse a request that comes too soon)
    /// or `queue` (hold it until its turn). Default: reject.
    pub mode: Option<Spanned<crate::ratelimit::LeakyMode>>,
    /// Leaky bucket in queue mode: the most requests that may wait.
    pub queue: Option<Spanned<u64>>,
    /// Client keys the node keeps counts for (for a global limit, while it
    /// falls back to local counting, and the keys it holds leases for).
    /// Default: 100000.
    pub max_keys: Option<Spanned<usize>>,
    /// Global token buckets only: the requests a node takes from Redis at
    /// once, for one client key, and then admits without calling Redis, so
    /// Redis gets about one call per `lease` requests. Default: 1 (a call
    /// per request).
    pub lease: Option<Spanned<u64>>,
}

/// The Redis that global rate limits count in: one server or a Redis Cluster.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedisConfig {
    /// One server, such as `redis://127.0.0.1:6379/0`.
    pub url: Option<Spanned<String>>,
    /// Seed nodes of a Redis Cluster, such as
    /// `["redis://10.0.0.1:6379", "redis://10.0.0.2:6379"]`.
    pub cluster: Option<Spanned<Vec<String>>>,
    /// The maximum time a rate-limit decision waits for Redis before the
    /// limit fails open or closed. Default: 20ms.
    #[serde(default = "default_redis_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// Time allowed to connect (and load the script) in the background.
    /// Default: 1s.
    #[serde(default = "default_redis_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// The prefix of every key. Default: `edge`.
    #[serde(default = "default_key_prefix")]
    pub key_prefix: String,
}

fn default_redis_timeout() -> Duration {
    Duration::from_millis(20)
}

fn default_redis_connect_timeout() -> Duration {
    Duration::from_secs(1)
}

fn default_key_prefix() -> String {
    "edge".to_owned()
}

fn default_max_body() -> ByteSize {
    ByteSize::mib(10)
}

/// One worker bound to a route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerConfig {
    /// The component file, relative to the config file.
    pub module: Spanned<PathBuf>,
    /// CPU time allowed per call before 503 `worker_timeout`. Default: 50ms.
    /// A call runs on a serving thread, so keep this short.
    #[serde(default = "default_cpu_deadline", with = "duration_spanned")]
    pub cpu_deadline: Spanned<Duration>,
    /// Linear memory the instance may grow to; must not exceed
    /// `runtime.max_memory`. Default: 16 MiB.
    #[serde(default = "default_worker_memory", with = "size::spanned")]
    pub max_memory: Spanned<ByteSize>,
    /// The worker's own settings, readable through its `config` import.
    #[serde(default)]
    pub config: toml::Table,
    /// Upstreams the worker may send requests to: with its `fetch` import,
    /// and for key sets its `crypto` import fetches (such as from an
    /// identity provider). Default: none.
    #[serde(default)]
    pub fetch: Vec<Spanned<String>>,
    /// Secrets the worker reads by name through its `secrets` import.
    #[serde(default)]
    pub secrets: BTreeMap<String, Spanned<SecretSource>>,
}

/// Where a secret's value comes from.
#[derive(Clone, Deserialize)]
#[serde(untagged)]
pub enum SecretSource {
    /// The value itself, written in the config.
    Inline(String),
    /// An environment variable of the node, read when the node loads.
    Env {
        /// The variable's name.
        env: String,
    },
}

impl std::fmt::Debug for SecretSource {
    /// Shows where a secret comes from, never an inline value.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSource::Inline(_) => f.write_str("Inline(..)"),
            SecretSource::Env { env } => f.debug_struct("Env").field("env", env).finish(),
        }
    }
}

impl SecretSource {
    /// Returns the secret's value, reading the environment variable it names.
    ///
    /// # Errors
    ///
    /// Returns a message naming the variable when it is unset or not UTF-8.
    pub fn resolve(&self) -> Result<String, String> {
        match self {
            SecretSource::Inline(value) => Ok(value.clone()),
            SecretSource::Env { env } => std::env::var(env).map_err(|error| match error {
                std::env::VarError::NotPresent => {
                    format!(
                        "environment variable {env} is not set; set it before starting the node"
                    )
                }
                std::env::VarError::NotUnicode(_) => {
                    format!("environment variable {env} is not valid UTF-8")
                }
            }),
        }
    }
}

fn default_cpu_deadline() -> Spanned<Duration> {
    Spanned::new(0..0, Duration::from_millis(50))
}

fn default_worker_memory() -> Spanned<ByteSize> {
    Spanned::new(0..0, ByteSize::mib(16))
}

/// The largest `runtime.max_instances`: each instance slot reserves virtual
/// address space for its memories (about 8 GiB), and x86-64 Linux gives a
/// process 128 TiB.
pub const MAX_INSTANCES: u32 = 4096;

/// Formats a size in binary units, as the config writes them.
pub fn binary(size: ByteSize) -> String {
    size.to_string_as(true)
}

/// Returns `value` with its inner value converted by `convert`, keeping its
/// place in the file.
fn map_spanned<T, U>(value: Spanned<T>, convert: impl FnOnce(T) -> U) -> Spanned<U> {
    let span = value.span();
    Spanned::new(span, convert(value.into_inner()))
}

/// Reads a duration in humantime's form (`"50ms"`) and keeps its place in
/// the file.
mod duration_spanned {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};
    use toml::Spanned;

    struct Human(Duration);

    impl<'de> Deserialize<'de> for Human {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Human, D::Error> {
            humantime_serde::deserialize(deserializer).map(Human)
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Spanned<Duration>, D::Error> {
        let duration = Spanned::<Human>::deserialize(deserializer)?;
        Ok(super::map_spanned(duration, |duration| duration.0))
    }
}

/// Reads socket addresses, with an error that names the expected form. The
/// standard library's parser fails with "invalid socket address syntax".
mod socket_addr {
    use std::net::{IpAddr, SocketAddr};

    use serde::de::{self, Deserialize, Deserializer};
    use toml::Spanned;

    /// A socket address as the config writes it: an IP address and a port.
    pub struct Addr(SocketAddr);

    impl<'de> Deserialize<'de> for Addr {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Addr, D::Error> {
            let text = String::deserialize(deserializer)?;
            match text.parse::<SocketAddr>() {
                Ok(addr) => Ok(Addr(addr)),
                Err(_) if is_ip_without_port(&text) => Err(de::Error::custom(format!(
                    "invalid address {text:?}: it has no port; write it as 127.0.0.1:9000 \
                     or [::1]:9000"
                ))),
                Err(_) if has_port_out_of_range(&text) => Err(de::Error::custom(format!(
                    "invalid address {text:?}: the port must be at most 65535"
                ))),
                Err(_) => Err(de::Error::custom(format!(
                    "invalid address {text:?}: expected an IP address and a port, such as \
                     127.0.0.1:9000 or [::1]:9000 (host names are not resolved)"
                ))),
            }
        }
    }

    /// Returns whether `text` is an IP address alone, such as `127.0.0.1`,
    /// `::1` or `[::1]`.
    fn is_ip_without_port(text: &str) -> bool {
        let ip = match text.strip_prefix('[') {
            Some(rest) => rest.strip_suffix(']').unwrap_or(rest),
            None => text,
        };
        ip.parse::<IpAddr>().is_ok()
    }

    /// Returns whether `text` is an IP address, a colon and a number above
    /// 65535.
    fn has_port_out_of_range(text: &str) -> bool {
        text.rsplit_once(':').is_some_and(|(ip, port)| {
            // An IPv6 address needs brackets before its port.
            (ip.parse::<std::net::Ipv4Addr>().is_ok() || ip.starts_with('['))
                && is_ip_without_port(ip)
                && !port.is_empty()
                && port.bytes().all(|b| b.is_ascii_digit())
                && port.parse::<u16>().is_err()
        })
    }

    /// Reads one address and keeps its place in the file.
    pub mod spanned {
        use serde::{Deserialize, Deserializer};
        use std::net::SocketAddr;
        use toml::Spanned;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Spanned<SocketAddr>, D::Error> {
            let addr = Spanned::<super::Addr>::deserialize(deserializer)?;
            Ok(super::super::map_spanned(addr, |addr| addr.0))
        }
    }

    /// Reads a list of addresses and keeps its place in the file.
    pub fn deserialize_list<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Spanned<Vec<SocketAddr>>, D::Error> {
        let list = Spanned::<Vec<Addr>>::deserialize(deserializer)?;
        Ok(super::map_spanned(list, |list| {
            list.into_iter().map(|addr| addr.0).collect()
        }))
    }
}

/// Reads a size: a number of bytes, or a string of a number and a unit
/// (`"512KiB"`, `"10MiB"`, `"1GB"`). The deserializer of bytesize 1 names
/// neither the problem nor the expected form: a negative number reads
/// "expected integer overflow".
mod size {
    use std::fmt;

    use bytesize::ByteSize;
    use serde::de::{self, Deserializer, Visitor};

    const EXPECTED: &str =
        "a size: a number of bytes, or a string such as \"512KiB\" or \"10MiB\" \
                            (units B, KB to PB, KiB to PiB)";

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<ByteSize, D::Error> {
        deserializer.deserialize_any(SizeVisitor)
    }

    /// Reads a size and keeps its place in the file, for later checks.
    pub mod spanned {
        use bytesize::ByteSize;
        use serde::{Deserialize, Deserializer};
        use toml::Spanned;

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Spanned<ByteSize>, D::Error> {
            let size = Spanned::<super::Size>::deserialize(deserializer)?;
            Ok(super::super::map_spanned(size, |size| size.0))
        }
    }

    pub struct Size(ByteSize);

    impl<'de> serde::Deserialize<'de> for Size {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Size, D::Error> {
            deserializer.deserialize_any(SizeVisitor).map(Size)
        }
    }

    struct SizeVisitor;

    impl Visitor<'_> for SizeVisitor {
        type Value = ByteSize;

        fn expecting(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
            formatter.write_str(EXPECTED)
        }

        fn visit_u64<E: de::Error>(self, bytes: u64) -> Result<ByteSize, E> {
            Ok(ByteSize::b(bytes))
        }

        fn visit_i64<E: de::Error>(self, bytes: i64) -> Result<ByteSize, E> {
            u64::try_from(bytes)
                .map(ByteSize::b)
                .map_err(|_| E::custom(format!("invalid size {bytes}: a size cannot be negative")))
        }

        fn visit_str<E: de::Error>(self, text: &str) -> Result<ByteSize, E> {
            parse(text).map_err(|reason| E::custom(format!("invalid size {text:?}: {reason}")))
        }
    }

    /// Reads a number and an optional bytesize unit exactly. The parser of
    /// bytesize 1 saturates past 2^64 - 1 bytes and rounds a fraction of a
    /// byte down.
    fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        if text.starts_with('-') {
            return Err("a size cannot be negative".to_owned());
        }
        let unit_start = text
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(unit_start);
        let unit = unit.trim_start();
        let expected = || format!("expected {EXPECTED}");

        let factor = if unit.is_empty() {
            1
        } else {
            format!("1{unit}")
                .parse::<ByteSize>()
                .map_err(|_| expected())?
                .as_u64()
        };
        let too_large = || format!("the largest size is {} bytes", u64::MAX);

        // The number as an integer and a power of ten to divide it by, so
        // that `1.001KB` is exactly 1001 bytes.
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        let digits_only = |text: &str| text.bytes().all(|b| b.is_ascii_digit());
        if whole.is_empty() && fraction.is_empty() || !digits_only(whole) || !digits_only(fraction)
        {
            return Err(expected());
        }
        let fraction = fraction.trim_end_matches('0');
        let scale = u32::try_from(fraction.len())
            .ok()
            .and_then(|places| 10u128.checked_pow(places))
            .ok_or_else(|| format!("{number} has too many decimal places"))?;
        let scaled: u128 = format!("{whole}{fraction}")
            .trim_start_matches('0')
            .parse()
            .or_else(|error: std::num::ParseIntError| match error.kind() {
                std::num::IntErrorKind::Empty => Ok(0),
                _ => Err(too_large()),
            })?;

        let total = scaled
            .checked_mul(u128::from(factor))
            .ok_or_else(too_large)?;
        if total % scale != 0 {
            return Err(format!("{number}{unit} is not a whole number of bytes"));
        }
        let bytes = u64::try_from(total / scale).map_err(|_| too_large())?;
        Ok(ByteSize::b(bytes))
    }

    #[cfg(test)]
    mod tests {
        use super::parse;

        #[test]
        fn sizes_parse_exactly() {
            let bytes = |text: &str| parse(text).map(|size| size.as_u64());
            assert_eq!(bytes("1.001KB"), Ok(1001));
            assert_eq!(bytes("1.5KiB"), Ok(1536));
            assert_eq!(bytes("1.1PB"), Ok(1_100_000_000_000_000));
            assert_eq!(bytes("10 MiB"), Ok(10 << 20));
            assert_eq!(bytes("18446744073709551615.0B"), Ok(u64::MAX));
            assert_eq!(bytes("18446744073709551614B"), Ok(u64::MAX - 1));
            assert!(bytes("18446744073709551616").is_err());
            assert!(bytes("20000PiB").is_err());
            assert!(bytes("0.4B").is_err());
            assert!(bytes("1.0000000000000000000001KiB").is_err());
            assert!(bytes("1.2.3KB").is_err());
            assert!(bytes(".").is_err());
            assert!(bytes("17EiB").is_err());
        }
    }
}

/// Adds a hint to errors of the toml crate whose message names no cause or
/// no form: a negative or fractional count, a duration without its unit or
/// quotes, a `[name]` table where a
/// list of tables is expected, and a
/// "duplicate key" for an array of tables whose first `[[name]]` comes after
/// a table inside it, such as `[[routes.workers]]` before `[[routes]]`.
fn with_table_order_hint(message: &str) -> String {
    // serde names the Rust type of a count, which a config's author need
    // not know.
    let unsigned = [
        "expected usize",
        "expected u64",
        "expected u32",
        "expected u16",
    ];
    if let Some(expected) = unsigned
        .iter()
        .find(|expected| message.contains(**expected))
    {
        let message = message.replace(expected, "expected a whole number");
        return format!(
            "{message}\nhint: write a whole number, not negative and not a fraction, such as 10"
        );
    }
    if message.contains("expected a duration") {
        return format!(
            "{message}\nhint: write a duration as a string with its unit, such as \"50ms\", \
             \"2s\" or \"5min\"; it cannot be negative"
        );
    }
    if let Some(name) = single_bracket_list(message) {
        return format!(
            "{message}\nhint: {name} is a list of tables: write [[{name}]], with two brackets, \
             for each entry"
        );
    }
    let Some(name) = message
        .split("duplicate key `")
        .nth(1)
        .and_then(|rest| rest.split_once('`'))
        .map(|(name, _)| name)
    else {
        return message.to_owned();
    };
    if !message.contains(&format!("[[{name}]]")) {
        return message.to_owned();
    }
    format!(
        "{message}\nhint: a table inside [[{name}]] comes before the first [[{name}]]; write \
         [[{name}]] first"
    )
}

/// Returns `name` when the toml crate's error is for a `[name]` table where
/// the config expects a list of tables, such as `[routes]`.
fn single_bracket_list(message: &str) -> Option<&str> {
    if !message.contains("invalid type: map, expected a sequence") {
        return None;
    }
    message.lines().find_map(|line| {
        let (_, code) = line.split_once(" | ")?;
        let name = code.trim().strip_prefix('[')?.strip_suffix(']')?;
        (!name.starts_with('[') && !name.is_empty()).then_some(name)
    })
}

/// Returns why `token` cannot serve as the admin bearer token. A client
/// sends it in an `Authorization` header, which carries visible ASCII and no
/// space around the token.
pub fn token_problem(token: &str) -> Option<String> {
    if let Some(bad) = token.chars().find(|c| !c.is_ascii_graphic()) {
        return Some(format!(
            "may hold only visible ASCII characters, which an Authorization header carries; \
             it has {bad:?}"
        ));
    }
    (token.len() < 16).then(|| "must be at least 16 characters".to_owned())
}

/// Checks a route's `host`: a DNS name, or `*.` and a DNS name.
fn is_host_rule(host: &str) -> bool {
    let name = host.strip_prefix("*.").unwrap_or(host);
    !name.is_empty()
        && name.split('.').all(|label| {
            !label.is_empty() && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
        })
}

/// True for headers that the node or hyper set for each message or
/// connection, which a configured header name must not be.
fn is_hop_or_framing(name: &http::HeaderName) -> bool {
    use http::header;
    [
        header::HOST,
        header::CONTENT_LENGTH,
        header::TRANSFER_ENCODING,
        header::CONNECTION,
        header::UPGRADE,
        header::TE,
        header::TRAILER,
    ]
    .contains(name)
}

/// A config that could not be read or is invalid.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{file}: {message}")]
    Parse { file: String, message: String },
    #[error("{file}:{line}: {field}: {message}")]
    Invalid {
        file: String,
        line: usize,
        field: String,
        message: String,
    },
}

impl Config {
    /// Reads, parses and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|error| ConfigError::Read {
            path: path.to_owned(),
            error,
        })?;
        let base_dir = path.parent().map(Path::to_owned).unwrap_or_default();
        let source = ConfigSource {
            name: path.display().to_string(),
            base_dir,
            text,
        };
        Config::parse(source)
    }

    /// Parses and validates config text.
    pub fn parse(source: ConfigSource) -> Result<Config, ConfigError> {
        let mut config: Config = toml::from_str(&source.text).map_err(|e| ConfigError::Parse {
            file: source.name.clone(),
            message: with_table_order_hint(e.to_string().trim_end()),
        })?;
        config.source = source;
        config.validate()?;
        Ok(config)
    }

    /// Checks what spans several fields.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.listeners.is_empty() {
            return Err(self.invalid(0, "listeners", "at least one [[listeners]] is required"));
        }
        for (index, listener) in self.listeners.iter().enumerate() {
            self.validate_listener(index, listener)?;
            let addr = listener.addr.get_ref();
            let earlier = self.listeners[..index]
                .iter()
                .find(|other| addresses_clash(other.addr.get_ref(), addr));
            if let Some(earlier) = earlier {
                let message = format!(
                    "{addr} clashes with {}, the address of the listener on line {}; give \
                     each listener its own port",
                    earlier.addr.get_ref(),
                    self.line_of(earlier.addr.span().start)
                );
                let line = self.line_of(listener.addr.span().start);
                return Err(self.invalid(line, &format!("listeners[{index}].addr"), &message));
            }
        }
        self.validate_admin()?;
        if let Some(threads) = &self.node.threads {
            if !(1..=1024).contains(threads.get_ref()) {
                let line = self.line_of(threads.span().start);
                return Err(self.invalid(line, "node.threads", "must be from 1 to 1024"));
            }
        }
        if !is_node_name(&self.node.name) {
            let message = format!(
                "{:?} must be non-empty printable ASCII without spaces",
                self.node.name
            );
            let line = self.line_of_key("node", "name");
            return Err(self.invalid(line, "node.name", &message));
        }
        if !(1..=MAX_INSTANCES).contains(&self.runtime.max_instances) {
            let message = format!("must be from 1 to {MAX_INSTANCES}");
            let line = self.line_of_key("runtime", "max_instances");
            return Err(self.invalid(line, "runtime.max_instances", &message));
        }
        let memory = self.runtime.max_memory;
        if memory < ByteSize::kib(64) || memory > ByteSize::gib(4) {
            let message = format!("{} must be from 64 KiB to 4 GiB", binary(memory));
            let line = self.line_of_key("runtime", "max_memory");
            return Err(self.invalid(line, "runtime.max_memory", &message));
        }
        self.validate_fetch_limits()?;
        self.validate_redis()?;
        self.validate_tracing()?;
        if let Some(access_log) = &self.access_log {
            let buffer = &access_log.buffer;
            if !(1..=1_000_000).contains(buffer.get_ref()) {
                let line = self.line_of(buffer.span().start);
                return Err(self.invalid(line, "access_log.buffer", "must be from 1 to 1000000"));
            }
        }
        for (name, upstream) in &self.upstreams {
            let line = self.line_of(upstream.targets.span().start);
            // As with route names: the name goes into logs, metrics labels
            // and `edge top`.
            if name.chars().any(char::is_control) {
                let line = self.line_of_table(&format!("upstreams.{name}")).max(line);
                let message = format!("upstream name {name:?} contains a control character");
                return Err(self.invalid(line, "upstreams", &message));
            }
            if upstream.targets.get_ref().is_empty() {
                let field = format!("upstreams.{name}.targets");
                return Err(self.invalid(line, &field, "at least one target is required"));
            }
            if let Some(target) = upstream.targets.get_ref().iter().find(|t| t.port() == 0) {
                let field = format!("upstreams.{name}.targets");
                let message = format!("{target} has port 0, on which no server listens");
                return Err(self.invalid(line, &field, &message));
            }
            self.validate_resilience(name, upstream, line)?;
            let server_name = upstream.tls.as_ref().and_then(|t| t.server_name.as_ref());
            if let Some(server_name) = server_name {
                if rustls::pki_types::ServerName::try_from(server_name.get_ref().as_str()).is_err()
                {
                    let field = format!("upstreams.{name}.tls.server_name");
                    let line = self.line_of(server_name.span().start);
                    let message = format!(
                        "{:?} is not a DNS name or IP address",
                        server_name.get_ref()
                    );
                    return Err(self.invalid(line, &field, &message));
                }
            }
        }
        let mut names = BTreeMap::new();
        for (index, route) in self.routes.iter().enumerate() {
            let field = |name: &str| format!("routes[{index}].{name}");
            let line = self.line_of(route.name.span().start);
            // The name goes into log lines, metrics labels and `edge top`,
            // where a control character would break the output.
            if route.name.get_ref().chars().any(char::is_control) {
                let message = format!(
                    "route name {:?} contains a control character",
                    route.name.get_ref()
                );
                return Err(self.invalid(line, &field("name"), &message));
            }
            if let Some(first) = names.insert(route.name.get_ref().as_str(), line) {
                let message = format!(
                    "route name {:?} is already used on line {first}",
                    route.name.get_ref()
                );
                return Err(self.invalid(line, &field("name"), &message));
            }
            self.path_match(route)
                .map_err(|(span, field_name, message)| {
                    self.invalid(self.line_of(span), &field(field_name), &message)
                })?;
            if route.timeout.is_some_and(|timeout| timeout.is_zero()) {
                // Zero would refuse every request of the route with 504.
                return Err(self.invalid(line, &field("timeout"), "must be more than zero"));
            }
            if route.websocket_idle_timeout.is_some() && !route.websocket {
                let message = "applies only to a route with `websocket = true`";
                return Err(self.invalid(line, &field("websocket_idle_timeout"), message));
            }
            if let Some(max) = &route.max_instances {
                let pool = self.runtime.max_instances;
                if !(1..=pool).contains(max.get_ref()) {
                    let message = format!("must be from 1 to runtime.max_instances ({pool})");
                    let line = self.line_of(max.span().start);
                    return Err(self.invalid(line, &field("max_instances"), &message));
                }
            }
            for method in &route.methods {
                if http::Method::from_bytes(method.as_bytes()).is_err() {
                    let message = format!("{method:?} is not a valid HTTP method");
                    return Err(self.invalid(line, &field("methods"), &message));
                }
            }
            if let Some(host) = &route.host {
                if !is_host_rule(host) {
                    let message = format!(
                        "{host:?} is not a host name; use a name such as api.example.com, \
                         or *.example.com for any subdomain, without a port"
                    );
                    return Err(self.invalid(line, &field("host"), &message));
                }
            }
            if route.upstream.is_none() && route.workers.is_empty() {
                let message = "the route has no upstream and no workers; set `upstream` \
                               or add a worker that responds or routes";
                return Err(self.invalid(line, &field("upstream"), message));
            }
            if let Some(upstream) = &route.upstream {
                if !self.upstreams.contains_key(upstream.get_ref()) {
                    let message = format!(
                        "no upstream named {:?}{}; fix the name, or declare it as \
                         [upstreams.{}]",
                        upstream.get_ref(),
                        self.declared_upstreams(),
                        upstream.get_ref()
                    );
                    let line = self.line_of(upstream.span().start);
                    return Err(self.invalid(line, &field("upstream"), &message));
                }
            }
            self.validate_limits(route, index)?;
            for (worker_index, worker) in route.workers.iter().enumerate() {
                let cap = *worker.max_memory.get_ref();
                if cap < ByteSize::kib(64) {
                    // One WebAssembly page; below it no module can run.
                    let message = format!(
                        "{} bytes is under 64 KiB, one WebAssembly page; raise it to at least that",
                        cap.as_u64()
                    );
                    let line = self.line_of(worker.max_memory.span().start).max(line);
                    let field = field(&format!("workers[{worker_index}].max_memory"));
                    return Err(self.invalid(line, &field, &message));
                }
                if cap > self.runtime.max_memory {
                    let message = format!(
                        "{} is over runtime.max_memory ({})",
                        binary(cap),
                        binary(self.runtime.max_memory)
                    );
                    let line = self.line_of(worker.max_memory.span().start).max(line);
                    let field = field(&format!("workers[{worker_index}].max_memory"));
                    return Err(self.invalid(line, &field, &message));
                }
                let cpu_deadline = *worker.cpu_deadline.get_ref();
                if cpu_deadline < crate::worker::EPOCH_TICK {
                    let field = field(&format!("workers[{worker_index}].cpu_deadline"));
                    let line = self.line_of(worker.cpu_deadline.span().start).max(line);
                    let message = format!(
                        "{} is too short: the deadline is checked every {}, so it must be \
                         at least that",
                        humantime::format_duration(cpu_deadline),
                        humantime::format_duration(crate::worker::EPOCH_TICK)
                    );
                    return Err(self.invalid(line, &field, &message));
                }
                self.validate_fetch(worker, &field(&format!("workers[{worker_index}].fetch")))?;
                let without_json_form = worker
                    .config
                    .iter()
                    .find_map(|(key, value)| value_without_json_form(value, format!(".{key}")));
                if let Some((path, message)) = without_json_form {
                    let field = field(&format!("workers[{worker_index}].config{path}"));
                    let line = self.line_of(worker.module.span().start);
                    return Err(self.invalid(line, &field, message));
                }
                // Every call copies the config into the worker's memory, in
                // one host call that the deadline cannot cut short.
                let json_len = serde_json::to_string(&worker.config).map_or(0, |json| json.len());
                if json_len > MAX_WORKER_CONFIG {
                    let field = field(&format!("workers[{worker_index}].config"));
                    let line = self.line_of(worker.module.span().start);
                    let message = format!(
                        "{json_len} bytes as JSON is over the {} a worker's config may take: \
                         every call copies it into the worker's memory; put large data in \
                         an upstream the worker fetches",
                        binary(ByteSize::b(MAX_WORKER_CONFIG as u64))
                    );
                    return Err(self.invalid(line, &field, &message));
                }
            }
        }
        // Last, so that a config under construction gets its other errors
        // first.
        if self.routes.is_empty() {
            let message = "at least one [[routes]] is required; without one every request \
                           gets 404 no_route";
            return Err(self.invalid(0, "routes", message));
        }
        Ok(())
    }

    /// Checks an upstream's balancing, breaker, retry and health settings.
    fn validate_resilience(
        &self,
        name: &str,
        upstream: &UpstreamConfig,
        line: usize,
    ) -> Result<(), ConfigError> {
        let field = |path: &str| format!("upstreams.{name}.{path}");
        match (&upstream.balance, &upstream.hash_key) {
            (BalanceName::ConsistentHash, None) => {
                let message = "consistent_hash needs a hash_key: header:NAME, cookie:NAME \
                               or client_ip";
                return Err(self.invalid(line, &field("hash_key"), message));
            }
            (BalanceName::ConsistentHash, Some(key)) => {
                if let Err(message) = crate::balance::HashKey::parse(key.get_ref()) {
                    let line = self.line_of(key.span().start);
                    return Err(self.invalid(line, &field("hash_key"), &message));
                }
            }
            (_, Some(key)) => {
                let line = self.line_of(key.span().start);
                let message = "hash_key applies only with balance = \"consistent_hash\"";
                return Err(self.invalid(line, &field("hash_key"), message));
            }
            (_, None) => {}
        }
        let statuses = upstream
            .failure_statuses
            .iter()
            .map(|s| ("failure_statuses", s))
            .chain(
                upstream
                    .retry
                    .on_statuses
                    .iter()
                    .map(|s| ("retry.on_statuses", s)),
            );
        // The line of a field written as `key = ...` in its own table, else
        // the upstream's.
        let field_line = |path: &str| {
            let (table, key) = match path.rsplit_once('.') {
                Some((inner, key)) => (format!("upstreams.{name}.{inner}"), key),
                None => (format!("upstreams.{name}"), path),
            };
            self.line_of_key_or(&table, key, line)
        };
        for (name, status) in statuses {
            if !(100..=599).contains(status) {
                let message = format!("{status} is not an HTTP status");
                return Err(self.invalid(field_line(name), &field(name), &message));
            }
        }
        let breaker = &upstream.breaker;
        let checks: [(&str, bool, &str); 12] = [
            (
                "breaker.error_rate_percent",
                breaker.error_rate_percent > 100,
                "must be from 0 to 100",
            ),
            (
                "breaker.half_open_probes",
                breaker.half_open_probes == 0,
                "must be at least 1",
            ),
            (
                "breaker.window",
                breaker.window.is_zero(),
                "must be more than zero",
            ),
            (
                "breaker.cool_down",
                breaker.cool_down.is_zero(),
                "must be more than zero",
            ),
            (
                "breaker.max_cool_down",
                breaker.max_cool_down < breaker.cool_down,
                "must be at least cool_down",
            ),
            (
                "retry.budget_percent",
                upstream.retry.budget_percent > 100,
                "must be from 0 to 100",
            ),
            (
                "retry.max_backoff",
                upstream.retry.max_backoff < upstream.retry.backoff,
                "must be at least backoff",
            ),
            (
                "response_timeout",
                upstream.response_timeout.is_zero(),
                "must be more than zero",
            ),
            (
                "connect_timeout",
                upstream.connect_timeout.is_zero(),
                "must be more than zero",
            ),
            (
                "max_requests_per_target",
                upstream.max_requests_per_target == Some(0),
                "must be at least 1; leave it out for no limit",
            ),
            (
                "queue_timeout",
                upstream.queue_timeout.is_some() && upstream.max_requests_per_target.is_none(),
                "applies only with max_requests_per_target; set that too, or remove it",
            ),
            (
                "queue_timeout",
                upstream
                    .queue_timeout
                    .is_some_and(|timeout| timeout.is_zero()),
                "must be more than zero",
            ),
        ];
        for (name, failed, message) in checks {
            if failed {
                return Err(self.invalid(field_line(name), &field(name), message));
            }
        }
        if let Some(active) = &upstream.health.active {
            let line = self.line_of(active.path.span().start);
            if !active.path.get_ref().starts_with('/')
                || http::uri::PathAndQuery::try_from(active.path.get_ref().as_str()).is_err()
            {
                let message = format!(
                    "{:?} is not a path starting with '/'",
                    active.path.get_ref()
                );
                return Err(self.invalid(line, &field("health.active.path"), &message));
            }
            let checks = [
                ("interval", active.interval.is_zero()),
                ("timeout", active.timeout.is_zero()),
                ("healthy_threshold", active.healthy_threshold == 0),
                ("unhealthy_threshold", active.unhealthy_threshold == 0),
            ];
            for (name, failed) in checks {
                if failed {
                    let field = field(&format!("health.active.{name}"));
                    return Err(self.invalid(line, &field, "must be more than zero"));
                }
            }
        }
        if let Some(passive) = &upstream.health.passive {
            let checks = [
                (
                    "consecutive_failures",
                    passive.consecutive_failures == 0,
                    "must be at least 1",
                ),
                (
                    "ejection_time",
                    passive.ejection_time.is_zero(),
                    "must be more than zero",
                ),
                (
                    "max_ejection_time",
                    passive.max_ejection_time < passive.ejection_time,
                    "must be at least ejection_time",
                ),
            ];
            for (name, failed, message) in checks {
                if failed {
                    let field = field(&format!("health.passive.{name}"));
                    return Err(self.invalid(line, &field, message));
                }
            }
        }
        Ok(())
    }

    /// Checks the admin listener's token.
    fn validate_admin(&self) -> Result<(), ConfigError> {
        let Some(admin) = &self.admin else {
            return Ok(());
        };
        // A defaulted addr has no place in the file, so the error names the
        // [admin] table's line instead.
        let line = if admin.addr.span().is_empty() {
            self.line_of_table("admin")
        } else {
            self.line_of(admin.addr.span().start)
        };
        let addr = admin.addr.get_ref();
        if let Some(listener) = self
            .listeners
            .iter()
            .find(|listener| addresses_clash(listener.addr.get_ref(), addr))
        {
            let message = format!(
                "{addr} clashes with {}, the address of the listener on line {}; give the \
                 admin listener its own port",
                listener.addr.get_ref(),
                self.line_of(listener.addr.span().start)
            );
            return Err(self.invalid(line, "admin.addr", &message));
        }
        if admin.session_timeout.is_zero() {
            // Zero would end every status-page session as it starts.
            let line = self.line_of_key_or("admin", "session_timeout", line);
            return Err(self.invalid(line, "admin.session_timeout", "must be more than zero"));
        }
        match (&admin.token, &admin.token_file) {
            (Some(_), Some(_)) => {
                Err(self.invalid(line, "admin.token", "set token or token_file, not both"))
            }
            (None, None) => Err(self.invalid(
                line,
                "admin.token",
                "the admin listener needs a bearer token; set token or token_file",
            )),
            (Some(token), None) => match token_problem(token.get_ref()) {
                Some(problem) => {
                    let line = self.line_of(token.span().start);
                    Err(self.invalid(line, "admin.token", &problem))
                }
                None => Ok(()),
            },
            _ => Ok(()),
        }
    }

    /// Checks a listener's TLS and redirect settings.
    fn validate_listener(
        &self,
        index: usize,
        listener: &ListenerConfig,
    ) -> Result<(), ConfigError> {
        let field = |name: &str| format!("listeners[{index}].{name}");
        let line = self.line_of(listener.addr.span().start);
        if listener.header_timeout.is_zero() {
            // Zero would close every connection whose head arrives in more
            // than one read.
            return Err(self.invalid(line, &field("header_timeout"), "must be more than zero"));
        }
        if listener.send_timeout.is_zero() {
            return Err(self.invalid(line, &field("send_timeout"), "must be more than zero"));
        }
        if let Some(tls) = &listener.tls {
            if tls.certificates.is_empty() && !tls.dev_certificate {
                let message = "add a [[listeners.tls.certificates]] with `cert` and `key`, \
                               or set dev_certificate = true for a self-signed one";
                return Err(self.invalid(line, &field("tls.certificates"), message));
            }
            if !tls.certificates.is_empty() && tls.dev_certificate {
                let message = "set either certificates or dev_certificate = true, not both";
                return Err(self.invalid(line, &field("tls.dev_certificate"), message));
            }
            if let (Some(client_auth), None) = (&tls.client_auth, &tls.client_ca) {
                let message = "client_auth has no effect without client_ca; set client_ca to \
                               the PEM file of the CAs that client certificates must chain to";
                let line = self.line_of(client_auth.span().start).max(line);
                return Err(self.invalid(line, &field("tls.client_auth"), message));
            }
            let header = tls.client_subject_header.get_ref();
            let valid_name = http::HeaderName::from_bytes(header.as_bytes())
                .is_ok_and(|name| name.as_str() == header && !is_hop_or_framing(&name));
            if !valid_name {
                let message = format!(
                    "{header:?} is not a lower-case header name the node may set; \
                     use a name such as x-client-cert-subject"
                );
                let line = self
                    .line_of(tls.client_subject_header.span().start)
                    .max(line);
                return Err(self.invalid(line, &field("tls.client_subject_header"), &message));
            }
        }
        let hsts = listener.tls.as_ref().and_then(|tls| tls.hsts.as_ref());
        if let Some(hsts) = hsts {
            let valid = http::HeaderValue::from_str(hsts.get_ref()).is_ok()
                && hsts.get_ref().to_ascii_lowercase().contains("max-age=");
            if !valid {
                let message = format!(
                    "{:?} is not a Strict-Transport-Security value; \
                     use a value such as \"max-age=31536000\"",
                    hsts.get_ref()
                );
                let line = self.line_of(hsts.span().start);
                return Err(self.invalid(line, &field("tls.hsts"), &message));
            }
        }
        if let Some(redirect) = &listener.redirect_https {
            if listener.tls.is_some() {
                let message = "a TLS listener cannot redirect to HTTPS; \
                               set redirect_https on a plain-HTTP listener";
                return Err(self.invalid(line, &field("redirect_https"), message));
            }
            if redirect.port.is_none() && !self.listeners.iter().any(|l| l.tls.is_some()) {
                let message = "set `port`: the config has no TLS listener to take it from";
                return Err(self.invalid(line, &field("redirect_https.port"), message));
            }
            for path in &redirect.except {
                if !path.get_ref().starts_with('/') {
                    let message = format!("{:?} must start with '/'", path.get_ref());
                    let line = self.line_of(path.span().start);
                    return Err(self.invalid(line, &field("redirect_https.except"), &message));
                }
            }
        }
        Ok(())
    }

    /// Checks the `[redis]` table: exactly one of `url` and `cluster`, each
    /// a valid Redis URL.
    fn validate_redis(&self) -> Result<(), ConfigError> {
        let Some(redis) = &self.redis else {
            return Ok(());
        };
        let line = self.line_of(redis.span().start);
        let redis = redis.get_ref();
        let check_url = |url: &str, field: &str, line: usize| {
            crate::ratelimit::check_redis_url(url)
                .map_err(|message| self.invalid(line, field, &message))
        };
        match (&redis.url, &redis.cluster) {
            (Some(url), None) => {
                check_url(url.get_ref(), "redis.url", self.line_of(url.span().start))?
            }
            (None, Some(nodes)) => {
                let line = self.line_of(nodes.span().start);
                if nodes.get_ref().is_empty() {
                    return Err(self.invalid(
                        line,
                        "redis.cluster",
                        "at least one node is required",
                    ));
                }
                for url in nodes.get_ref() {
                    check_url(url, "redis.cluster", line)?;
                }
            }
            (Some(_), Some(_)) => {
                return Err(self.invalid(
                    line,
                    "redis",
                    "set either `url` (one server) or `cluster` (seed nodes), not both",
                ))
            }
            (None, None) => {
                return Err(self.invalid(
                    line,
                    "redis",
                    "set `url` (one server) or `cluster` (seed nodes of a cluster)",
                ))
            }
        }
        for (key, value) in [
            ("timeout", redis.timeout),
            ("connect_timeout", redis.connect_timeout),
        ] {
            if value.is_zero() {
                let key_line = self.line_of_key_or("redis", key, line);
                let field = format!("redis.{key}");
                return Err(self.invalid(key_line, &field, "must be more than zero"));
            }
        }
        if redis.key_prefix.contains(['{', '}']) {
            return Err(self.invalid(line, "redis.key_prefix", "must not contain `{` or `}`"));
        }
        Ok(())
    }

    /// Checks the `[tracing]` table: an endpoint needs a build with the
    /// `otlp` feature and must be an `http://` URL with a host.
    fn validate_tracing(&self) -> Result<(), ConfigError> {
        let tracing = &self.tracing;
        let Some(endpoint) = &tracing.otlp_endpoint else {
            return Ok(());
        };
        let line = self.line_of(endpoint.span().start);
        let field = "tracing.otlp_endpoint";
        if !cfg!(feature = "otlp") {
            return Err(self.invalid(
                line,
                field,
                "this edge binary was built without OTLP export; build it with \
                 `cargo build --release --features otlp` or remove the setting",
            ));
        }
        let uri: http::Uri = endpoint.get_ref().parse().map_err(|_| {
            let message = format!("{:?} is not a valid URL", endpoint.get_ref());
            self.invalid(line, field, &message)
        })?;
        if uri.scheme_str() != Some("http") || uri.host().is_none() {
            let message = format!(
                "{:?} must be an http:// URL with a host, such as http://127.0.0.1:4318",
                endpoint.get_ref()
            );
            return Err(self.invalid(line, field, &message));
        }
        if uri.query().is_some() {
            let message = format!("{:?} must not have a query", endpoint.get_ref());
            return Err(self.invalid(line, field, &message));
        }
        if !(1..=1_000_000).contains(&tracing.otlp_queue) {
            let line = self.line_of_key("tracing", "otlp_queue");
            return Err(self.invalid(line, "tracing.otlp_queue", "must be from 1 to 1000000"));
        }
        let bounds = Duration::from_millis(10)..=Duration::from_secs(60);
        for (key, value) in [
            ("otlp_interval", tracing.otlp_interval),
            ("otlp_timeout", tracing.otlp_timeout),
        ] {
            if !bounds.contains(&value) {
                let line = self.line_of_key("tracing", key);
                let message = format!(
                    "{} must be from 10ms to 1m",
                    humantime::format_duration(value)
                );
                return Err(self.invalid(line, &format!("tracing.{key}"), &message));
            }
        }
        Ok(())
    }

    /// Checks the node-wide limits of workers' fetches.
    fn validate_fetch_limits(&self) -> Result<(), ConfigError> {
        let fetch = &self.runtime.fetch;
        let invalid = |key: &str, message: &str| {
            let line = self.line_of_key("runtime.fetch", key);
            self.invalid(line, &format!("runtime.fetch.{key}"), message)
        };
        if fetch.default_timeout.is_zero() {
            return Err(invalid("default_timeout", "must be more than zero"));
        }
        if fetch.max_timeout < fetch.default_timeout {
            let message = format!(
                "{} is shorter than runtime.fetch.default_timeout ({})",
                humantime::format_duration(fetch.max_timeout),
                humantime::format_duration(fetch.default_timeout)
            );
            return Err(invalid("max_timeout", &message));
        }
        if fetch.max_response_body.as_u64() == 0 {
            return Err(invalid("max_response_body", "must be more than zero"));
        }
        if fetch.max_wait_per_hook.is_zero() {
            return Err(invalid("max_wait_per_hook", "must be more than zero"));
        }
        // A response is copied into the worker's memory whole.
        if fetch.max_response_body > self.runtime.max_memory {
            let message = format!(
                "{} is over runtime.max_memory ({})",
                binary(fetch.max_response_body),
                binary(self.runtime.max_memory)
            );
            return Err(invalid("max_response_body", &message));
        }
        for (name, value) in [
            ("max_requests_per_call", fetch.max_requests_per_call),
            ("max_requests_per_hook", fetch.max_requests_per_hook),
        ] {
            if value == 0 {
                return Err(invalid(name, "must be at least 1"));
            }
        }
        Ok(())
    }

    /// Lists the declared upstreams for a message about an unknown one:
    /// ` (declared: "a", "b")`, or nothing when there are none.
    fn declared_upstreams(&self) -> String {
        if self.upstreams.is_empty() {
            return String::new();
        }
        let names: Vec<String> = self
            .upstreams
            .keys()
            .map(|name| format!("{name:?}"))
            .collect();
        format!(" (declared: {})", names.join(", "))
    }

    /// Checks that a worker's `fetch` list names declared upstreams.
    fn validate_fetch(&self, worker: &WorkerConfig, field: &str) -> Result<(), ConfigError> {
        for name in &worker.fetch {
            if !self.upstreams.contains_key(name.get_ref()) {
                let message = format!(
                    "no upstream named {:?}{}; fix the name, declare it as [upstreams.{}], \
                     or remove it from the list",
                    name.get_ref(),
                    self.declared_upstreams(),
                    name.get_ref()
                );
                return Err(self.invalid(self.line_of(name.span().start), field, &message));
            }
        }
        Ok(())
    }

    /// Checks a route's rate limits.
    fn validate_limits(&self, route: &RouteConfig, index: usize) -> Result<(), ConfigError> {
        let mut names = BTreeMap::new();
        for (limit_index, limit) in route.limits.iter().enumerate() {
            let spec =
                crate::ratelimit::LimitSpec::parse(limit).map_err(|(span, field, message)| {
                    let line = self.line_of(span.unwrap_or(limit.key.span().start));
                    self.invalid(
                        line,
                        &format!("routes[{index}].limits[{limit_index}].{field}"),
                        &message,
                    )
                })?;
            let line = self.line_of(limit.key.span().start);
            let field = format!("routes[{index}].limits[{limit_index}]");
            if spec.scope == crate::ratelimit::Scope::Global && self.redis.is_none() {
                return Err(self.invalid(
                    line,
                    &format!("{field}.scope"),
                    "a global limit counts in Redis; add a [redis] table with its `url`",
                ));
            }
            if let Some(first) = names.insert(spec.name.to_string(), line) {
                let message = format!(
                    "limit name {:?} is already used on line {first}; give each limit of the \
                     route its own `name`",
                    spec.name
                );
                return Err(self.invalid(line, &format!("{field}.name"), &message));
            }
            // Such a header never reaches the limit on a listener that
            // removes it, so the limit would count every request as unkeyed.
            if let crate::ratelimit::KeySource::Header(name) = &spec.key {
                let removing = self.listeners.iter().any(|l| !l.underscores_in_headers);
                if name.as_str().contains('_') && removing {
                    let message = format!(
                        "header {name} has an underscore, and listeners remove such headers \
                         unless they set `underscores_in_headers = true`"
                    );
                    return Err(self.invalid(line, &format!("{field}.key"), &message));
                }
            }
        }
        Ok(())
    }

    /// Builds the path matcher of a route from its `prefix`, `path` or
    /// `pattern`; on error returns the span, field and message.
    pub fn path_match(
        &self,
        route: &RouteConfig,
    ) -> Result<PathMatch, (usize, &'static str, String)> {
        let given = [
            ("prefix", &route.prefix),
            ("path", &route.path),
            ("pattern", &route.pattern),
        ];
        let mut set = given
            .iter()
            .filter_map(|(name, value)| Some((*name, (*value).as_ref()?)));
        let Some((field, value)) = set.next() else {
            return Ok(PathMatch::Prefix("/".to_owned()));
        };
        if let Some((other, _)) = set.next() {
            let message =
                format!("set only one of prefix, path and pattern, not {field} and {other}");
            return Err((value.span().start, field, message));
        }
        let parsed = match field {
            "prefix" => PathMatch::prefix(value.get_ref()),
            "path" => PathMatch::exact(value.get_ref()),
            _ => PathMatch::pattern(value.get_ref()),
        };
        parsed.map_err(|message| (value.span().start, field, message))
    }

    /// Resolves a path from the config against the config file's folder.
    pub fn resolve(&self, path: &Path) -> PathBuf {
        if path.is_absolute() {
            path.to_owned()
        } else {
            self.source.base_dir.join(path)
        }
    }

    /// Returns the folder of the compiled-module cache.
    pub fn cache_dir(&self) -> PathBuf {
        match &self.runtime.cache_dir {
            Some(dir) => self.resolve(dir),
            None => self.source.base_dir.join(".edge-cache"),
        }
    }

    /// Runtime threads to serve with.
    pub fn threads(&self) -> usize {
        match &self.node.threads {
            Some(threads) => *threads.get_ref(),
            None => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }

    /// Returns the 1-based line of a byte offset in the config text.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.source.text.len());
        self.source.text[..end].matches('\n').count() + 1
    }

    /// Returns the line of `key` in `table` (a dotted path such as
    /// `upstreams.origin.breaker`), however the file writes them: as
    /// `[table]` sections, dotted keys or inline tables. Returns 0 when the
    /// key is not in the file. For fields that serde does not record a span
    /// for.
    pub fn line_of_key(&self, table: &str, key: &str) -> usize {
        let text = self.source.text.as_str();
        let Ok(document) = toml_edit::ImDocument::parse(text) else {
            return 0;
        };
        let mut item = document.as_item();
        for segment in table.split('.') {
            match item.get(segment) {
                Some(inner) => item = inner,
                None => return 0,
            }
        }
        let span = item
            .as_table_like()
            .and_then(|table| table.get_key_value(key))
            .and_then(|(key, _)| key.span());
        match span {
            Some(span) => text[..span.start].matches('\n').count() + 1,
            None => 0,
        }
    }

    /// Returns the line of the `[table]` header, or 0 when the file has none.
    pub fn line_of_table(&self, table: &str) -> usize {
        let header = format!("[{table}]");
        self.source
            .text
            .lines()
            .position(|line| line.trim() == header)
            .map_or(0, |index| index + 1)
    }

    /// Returns [`Config::line_of_key`], or `fallback` when the key is written
    /// another way.
    fn line_of_key_or(&self, table: &str, key: &str, fallback: usize) -> usize {
        match self.line_of_key(table, key) {
            0 => fallback,
            line => line,
        }
    }

    /// Builds an error that points at a line and field of this config.
    pub fn invalid(&self, line: usize, field: &str, message: &str) -> ConfigError {
        ConfigError::Invalid {
            file: self.source.name.clone(),
            line: line.max(1),
            field: field.to_owned(),
            message: message.to_owned(),
        }
    }
}

/// The largest JSON form of a worker's config. Copying 1 MiB into a worker
/// takes about 0.4 ms here, well inside the shortest useful deadline.
const MAX_WORKER_CONFIG: usize = 1 << 20;

/// Finds the first value under `value` that has no JSON form, which is how a
/// worker reads its config, and returns its path below `path` with the
/// reason.
fn value_without_json_form(value: &toml::Value, path: String) -> Option<(String, &'static str)> {
    match value {
        toml::Value::Float(number) if !number.is_finite() => Some((
            path,
            "NaN and infinite numbers have no JSON form, and a worker reads its config as JSON",
        )),
        toml::Value::Datetime(_) => Some((
            path,
            "a TOML date or time has no JSON form, and a worker reads its config as JSON; \
             write it as a string",
        )),
        toml::Value::Array(items) => items
            .iter()
            .enumerate()
            .find_map(|(index, item)| value_without_json_form(item, format!("{path}[{index}]"))),
        toml::Value::Table(table) => table
            .iter()
            .find_map(|(key, item)| value_without_json_form(item, format!("{path}.{key}"))),
        _ => None,
    }
}

impl fmt::Display for ConfigSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(ConfigSource {
            name: "edge.toml".to_owned(),
            base_dir: PathBuf::from("."),
            text: text.to_owned(),
        })
    }

    const WITH_ENDPOINT: &str = "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n\
                                 [upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
                                 [[routes]]\nname = \"api\"\nprefix = \"/\"\nupstream = \"app\"\n\n\
                                 [tracing]\notlp_endpoint = \"http://127.0.0.1:4318\"\n";

    #[cfg(not(feature = "otlp"))]
    #[test]
    fn otlp_endpoint_needs_the_otlp_feature() {
        let error = parse(WITH_ENDPOINT).unwrap_err().to_string();
        assert!(error.contains("edge.toml:13"), "{error}");
        assert!(error.contains("tracing.otlp_endpoint"), "{error}");
        assert!(error.contains("--features otlp"), "{error}");
    }

    #[cfg(feature = "otlp")]
    #[test]
    fn otlp_endpoint_parses_with_the_otlp_feature() {
        let config = parse(WITH_ENDPOINT).unwrap();
        assert_eq!(config.tracing.otlp_queue, 4096);
        assert_eq!(config.tracing.otlp_interval, Duration::from_secs(1));
    }
}
