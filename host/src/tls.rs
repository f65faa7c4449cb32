//! TLS with rustls (aws-lc-rs): server certificates chosen by SNI and
//! reloaded when their files change, client certificate checks, the
//! development certificate, and the client config for upstreams.
//!
//! Listeners accept TLS 1.2 and 1.3 only, with the provider's default cipher
//! suites (AEAD with ECDHE key exchange), and offer ALPN `h2` and `http/1.1`.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use http::HeaderValue;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ClientHello, ResolvesServerCert, StoresServerSessions, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{ClientAuth, SniFallback};

/// ALPN protocols a listener offers, in order of preference.
const SERVER_ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// The crypto provider every TLS config uses.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certificate, key or CA file that could not be used. Every message names
/// the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {error}")]
    Read {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{path} contains no PEM certificate (a `BEGIN CERTIFICATE` block)")]
    NoCertificate { path: PathBuf },
    #[error("{path} contains no PEM private key (PKCS#8, PKCS#1 or SEC1): {reason}")]
    NoKey { path: PathBuf, reason: String },
    #[error("{path}: the private key is invalid or of an unsupported type: {error}")]
    InvalidKey { path: PathBuf, error: rustls::Error },
    #[error("{path}: the certificate is invalid: {reason}")]
    InvalidCertificate { path: PathBuf, reason: String },
    #[error("the private key in {key} does not match the certificate in {cert}")]
    KeyMismatch { cert: PathBuf, key: PathBuf },
    #[error("the certificate in {path} expired on {not_after}")]
    Expired { path: PathBuf, not_after: String },
    #[error("the certificate in {path} is not valid before {not_before}")]
    NotYetValid { path: PathBuf, not_before: String },
    #[error("{path}: invalid CA certificates: {reason}")]
    InvalidCa { path: PathBuf, reason: String },
    #[error("cannot load the system's trusted root certificates: {0}")]
    SystemRoots(String),
    #[error("cannot create the development certificate in {dir}: {reason}")]
    DevCertificate { dir: PathBuf, reason: String },
    #[error("cannot build the TLS config: {0}")]
    Config(rustls::Error),
}

impl TlsError {
    /// The file the error is about; for a key that does not match its
    /// certificate, the certificate.
    pub fn path(&self) -> Option<&Path> {
        match self {
            TlsError::Read { path, .. }
            | TlsError::NoCertificate { path }
            | TlsError::NoKey { path, .. }
            | TlsError::InvalidKey { path, .. }
            | TlsError::InvalidCertificate { path, .. }
            | TlsError::Expired { path, .. }
            | TlsError::NotYetValid { path, .. }
            | TlsError::InvalidCa { path, .. } => Some(path),
            TlsError::KeyMismatch { cert, .. } => Some(cert),
            TlsError::SystemRoots(_) | TlsError::DevCertificate { .. } | TlsError::Config(_) => {
                None
            }
        }
    }
}

/// A certificate chain file and its key file.
#[derive(Debug, Clone)]
pub struct CertificateFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// The files and settings a listener's TLS config is built from.
#[derive(Debug, Clone)]
pub struct ServerSettings {
    pub certificates: Vec<CertificateFiles>,
    pub sni_fallback: SniFallback,
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
}

impl ServerSettings {
    /// Every file the config is built from, to watch for changes.
    fn files(&self) -> Vec<PathBuf> {
        let mut files: Vec<PathBuf> = self
            .certificates
            .iter()
            .flat_map(|c| [c.cert.clone(), c.key.clone()])
            .collect();
        files.extend(self.client_ca.clone());
        files
    }
}

/// The TLS side of one listener: its current server config, swapped whole
/// when the files change. Open connections keep the config they started
/// with; new ones get the current one.
pub struct ListenerTls {
    settings: ServerSettings,
    current: RwLock<Arc<ServerConfig>>,
    /// The files' stamps at the last load that succeeded, to spot changes.
    stamps: Mutex<Vec<Option<FileStamp>>>,
    /// The files' stamps at the last load that failed, if one failed since.
    /// The same files are tried again at each check without a new error
    /// line: a certificate that is not valid yet, or a key that becomes
    /// readable, loads later without a change to its file's stamp.
    failed: Mutex<Option<Vec<Option<FileStamp>>>>,
    /// Shared by every config of this listener, so that sessions resume
    /// across reloads.
    sessions: Arc<dyn StoresServerSessions>,
    ticketer: Arc<dyn rustls::server::ProducesTickets>,
    /// How often the files are checked; zero for never.
    pub reload_interval: Duration,
    /// The development CA's certificate, when the listener uses the
    /// development certificate.
    pub dev_ca: Option<PathBuf>,
}

impl fmt::Debug for ListenerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ListenerTls")
            .field("settings", &self.settings)
            .field("reload_interval", &self.reload_interval)
            .finish_non_exhaustive()
    }
}

impl ListenerTls {
    /// Loads every certificate, key and CA file of a listener.
    pub fn load(
        settings: ServerSettings,
        reload_interval: Duration,
        dev_ca: Option<PathBuf>,
    ) -> Result<ListenerTls, TlsError> {
        let stamps = stamp_files(&settings.files());
        let sessions: Arc<dyn StoresServerSessions> =
            rustls::server::ServerSessionMemoryCache::new(4096);
        let ticketer = rustls::crypto::aws_lc_rs::Ticketer::new().map_err(TlsError::Config)?;
        let config = build_server_config(&settings, &sessions, &ticketer)?;
        Ok(ListenerTls {
            settings,
            current: RwLock::new(Arc::new(config)),
            stamps: Mutex::new(stamps),
            failed: Mutex::new(None),
            sessions,
            ticketer,
            reload_interval,
            dev_ca,
        })
    }

    /// Returns an acceptor with the current config.
    pub fn acceptor(&self) -> TlsAcceptor {
        let config = self
            .current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        TlsAcceptor::from(config)
    }

    /// Loads the files again if any changed since the last load that
    /// succeeded, or always when `force` is set. Returns whether a new config is in use;
    /// on error the old one stays.
    pub fn reload(&self, force: bool) -> Result<bool, TlsError> {
        let stamps = stamp_files(&self.settings.files());
        let mut last = self.stamps.lock().unwrap_or_else(|e| e.into_inner());
        if !force && *last == stamps {
            return Ok(false);
        }
        let mut failed = self.failed.lock().unwrap_or_else(|e| e.into_inner());
        match build_server_config(&self.settings, &self.sessions, &self.ticketer) {
            Ok(config) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
                *last = stamps;
                *failed = None;
                Ok(true)
            }
            // Logged once for these files; they are tried again at each check.
            Err(_) if !force && failed.as_ref() == Some(&stamps) => Ok(false),
            Err(error) => {
                *failed = Some(stamps);
                Err(error)
            }
        }
    }

    /// The certificate files, for log lines.
    pub fn certificate_paths(&self) -> impl Iterator<Item = &Path> {
        self.settings.certificates.iter().map(|c| c.cert.as_path())
    }
}

/// What identifies a file's version: modification time, size and inode, so
/// that a rename over the file counts as a change even within one second.
#[derive(Debug, Clone, PartialEq, Eq)]
struct FileStamp {
    modified: Option<SystemTime>,
    len: u64,
    inode: u64,
}

fn stamp_files(files: &[PathBuf]) -> Vec<Option<FileStamp>> {
    use std::os::unix::fs::MetadataExt;
    files
        .iter()
        .map(|path| {
            let meta = std::fs::metadata(path).ok()?;
            Some(FileStamp {
                modified: meta.modified().ok(),
                len: meta.len(),
                inode: meta.ino(),
            })
        })
        .collect()
}

fn build_server_config(
    settings: &ServerSettings,
    sessions: &Arc<dyn StoresServerSessions>,
    ticketer: &Arc<dyn rustls::server::ProducesTickets>,
) -> Result<ServerConfig, TlsError> {
    let provider = provider();
    let mut resolver = SniResolver::default();
    for files in &settings.certificates {
        let (key, names) = load_certified_key(files, &provider)?;
        resolver.add(Arc::new(key), names);
    }
    if settings.sni_fallback == SniFallback::Reject {
        resolver.fallback = None;
    }
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(TlsError::Config)?;
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let roots = load_roots(path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier.build(),
                ClientAuth::Optional => verifier.allow_unauthenticated().build(),
            };
            let verifier = verifier.map_err(|e| TlsError::InvalidCa {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(resolver));
    config.alpn_protocols = SERVER_ALPN.iter().map(|p| p.to_vec()).collect();
    config.ignore_client_order = true;
    config.session_storage = sessions.clone();
    config.ticketer = ticketer.clone();
    Ok(config)
}

/// Loads a certificate chain and its key, checks that they match and that
/// the certificate is valid now, and returns the key with the certificate's
/// DNS names.
fn load_certified_key(
    files: &CertificateFiles,
    provider: &CryptoProvider,
) -> Result<(CertifiedKey, Vec<String>), TlsError> {
    let chain = read_certificates(&files.cert)?;
    let names = check_certificate(&files.cert, &chain[0])?;
    let key_pem = read_file(&files.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::NoKey {
        path: files.key.clone(),
        reason: e.to_string(),
    })?;
    let signing_key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|error| TlsError::InvalidKey {
            path: files.key.clone(),
            error,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        Ok(()) => {}
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {}
        Err(_) => {
            return Err(TlsError::KeyMismatch {
                cert: files.cert.clone(),
                key: files.key.clone(),
            })
        }
    }
    Ok((certified, names))
}

fn read_file(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|error| TlsError::Read {
        path: path.to_owned(),
        error,
    })
}

/// Reads every certificate of a PEM file; at least one is required.
fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read_file(path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::InvalidCertificate {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_owned(),
        });
    }
    Ok(chain)
}

/// Checks that a server certificate parses and is valid now, and returns
/// its DNS names in lower case.
fn check_certificate(path: &Path, der: &CertificateDer<'_>) -> Result<Vec<String>, TlsError> {
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| TlsError::InvalidCertificate {
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now > validity.not_after {
        return Err(TlsError::Expired {
            path: path.to_owned(),
            not_after: validity.not_after.to_string(),
        });
    }
    if now < validity.not_before {
        return Err(TlsError::NotYetValid {
            path: path.to_owned(),
            not_before: validity.not_before.to_string(),
        });
    }
    let mut names = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for name in &san.value.general_names {
            if let x509_parser::extensions::GeneralName::DNSName(dns) = name {
                names.push(dns.to_ascii_lowercase());
            }
        }
    }
    Ok(names)
}

fn load_roots(path: &Path) -> Result<RootCertStore, TlsError> {
    let mut roots = RootCertStore::empty();
    for cert in read_certificates(path)? {
        roots.add(cert).map_err(|e| TlsError::InvalidCa {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
    }
    Ok(roots)
}

/// Chooses a listener's certificate by the client's SNI name: an exact DNS
/// name first, then a wildcard one level up, then the fallback.
#[derive(Debug, Default)]
struct SniResolver {
    exact: HashMap<String, Arc<CertifiedKey>>,
    /// Wildcard certificates by the name under the `*.`: `*.example.com` is
    /// stored as `example.com`.
    wildcard: HashMap<String, Arc<CertifiedKey>>,
    /// The first certificate, unless the listener rejects unknown names.
    fallback: Option<Arc<CertifiedKey>>,
}

impl SniResolver {
    /// Adds a certificate for its names; for a name on several certificates
    /// the first one added wins.
    fn add(&mut self, key: Arc<CertifiedKey>, names: Vec<String>) {
        if self.fallback.is_none() {
            self.fallback = Some(key.clone());
        }
        for name in names {
            match name.strip_prefix("*.") {
                Some(parent) => self.wildcard.entry(parent.to_owned()),
                None => self.exact.entry(name),
            }
            .or_insert_with(|| key.clone());
        }
    }

    fn find(&self, name: &str) -> Option<&Arc<CertifiedKey>> {
        if let Some(key) = self.exact.get(name) {
            return Some(key);
        }
        let (_, parent) = name.split_once('.')?;
        self.wildcard.get(parent)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, client_hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        // rustls passes the SNI name in lower case without a trailing dot.
        let found = client_hello.server_name().and_then(|name| self.find(name));
        found.or(self.fallback.as_ref()).cloned()
    }
}

/// The subject of a verified client certificate in RFC 4514 form, such as
/// `CN=client-1,O=Example`, as a header value; `None` when the certificate
/// cannot be parsed or the subject has characters a header cannot carry.
pub fn client_subject(cert: &CertificateDer<'_>) -> Option<HeaderValue> {
    let (_, cert) = X509Certificate::from_der(cert).ok()?;
    let mut text = String::new();
    // RFC 4514 writes the most specific RDN first, the reverse of the
    // encoded order.
    let rdns: Vec<_> = cert.subject().iter().collect();
    for rdn in rdns.into_iter().rev() {
        if !text.is_empty() {
            text.push(',');
        }
        for (index, attribute) in rdn.iter().enumerate() {
            if index > 0 {
                text.push('+');
            }
            let oid = attribute.attr_type();
            match attribute_short_name(&oid.to_id_string()) {
                Some(name) => text.push_str(name),
                None => text.push_str(&oid.to_id_string()),
            }
            text.push('=');
            match attribute.as_str() {
                Ok(value) => escape_rdn_value(value, &mut text),
                Err(_) => {
                    text.push('#');
                    text.push_str(&hex::encode(attribute.attr_value().as_bytes()));
                }
            }
        }
    }
    HeaderValue::from_str(&text).ok()
}

/// The short names RFC 4514, section 3 lists.
fn attribute_short_name(oid: &str) -> Option<&'static str> {
    Some(match oid {
        "2.5.4.3" => "CN",
        "2.5.4.7" => "L",
        "2.5.4.8" => "ST",
        "2.5.4.10" => "O",
        "2.5.4.11" => "OU",
        "2.5.4.6" => "C",
        "2.5.4.9" => "STREET",
        "0.9.2342.19200300.100.1.25" => "DC",
        "0.9.2342.19200300.100.1.1" => "UID",
        _ => return None,
    })
}

/// Escapes an attribute value as RFC 4514, section 2.4 requires.
fn escape_rdn_value(value: &str, out: &mut String) {
    let last = value.chars().count().saturating_sub(1);
    for (index, c) in value.chars().enumerate() {
        let special = matches!(c, '"' | '+' | ',' | ';' | '<' | '>' | '\\')
            || (index == 0 && matches!(c, '#' | ' '))
            || (index == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
}

/// The client side of TLS to an upstream's targets.
#[derive(Clone)]
pub struct UpstreamTls {
    pub connector: TlsConnector,
    /// The name sent as SNI and checked; `None` for each target's IP.
    pub server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

impl UpstreamTls {
    /// Builds the client config: roots from `ca` or the system, an optional
    /// client certificate, and ALPN `http/1.1`.
    pub fn new(
        ca: Option<&Path>,
        server_name: Option<&str>,
        client_certificate: Option<&CertificateFiles>,
    ) -> Result<UpstreamTls, TlsError> {
        let provider = provider();
        let roots = match ca {
            Some(path) => load_roots(path)?,
            None => system_roots()?,
        };
        let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(TlsError::Config)?
            .with_root_certificates(roots);
        let mut config = match client_certificate {
            None => builder.with_no_client_auth(),
            Some(files) => {
                // Checks the pair first, for the same errors as a listener's.
                let (checked, _) = load_certified_key(files, &provider)?;
                let key = PrivateKeyDer::from_pem_slice(&read_file(&files.key)?).map_err(|e| {
                    TlsError::NoKey {
                        path: files.key.clone(),
                        reason: e.to_string(),
                    }
                })?;
                builder
                    .with_client_auth_cert(checked.cert, key)
                    .map_err(TlsError::Config)?
            }
        };
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let server_name = server_name
            .map(|name| ServerName::try_from(name.to_owned()))
            .transpose()
            .map_err(|e| TlsError::Config(rustls::Error::General(e.to_string())))?;
        Ok(UpstreamTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
        })
    }
}

fn system_roots() -> Result<RootCertStore, TlsError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let reasons: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(TlsError::SystemRoots(if reasons.is_empty() {
            "none found; install the ca-certificates package or set `ca`".to_owned()
        } else {
            reasons.join("; ")
        }));
    }
    Ok(roots)
}

/// Where the development certificate's files are.
#[derive(Debug, Clone)]
pub struct DevCertificate {
    pub files: CertificateFiles,
    /// The self-signed CA that issued the certificate, to trust in clients.
    pub ca: PathBuf,
}

/// Days the development CA and certificate are valid for.
const DEV_VALID_DAYS: i64 = 365;

/// Returns the development certificate in `dir`, creating it when it is
/// missing, unreadable or expires within a day. The CA's private key is
/// never written, so trusting the CA lets no one else issue certificates
/// with it.
pub fn dev_certificate(dir: &Path) -> Result<DevCertificate, TlsError> {
    let dev = DevCertificate {
        files: CertificateFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        ca: dir.join("ca.pem"),
    };
    if dev_certificate_usable(&dev) {
        return Ok(dev);
    }
    let fail = |reason: String| TlsError::DevCertificate {
        dir: dir.to_owned(),
        reason,
    };
    let generated = generate_dev_certificate().map_err(|e| fail(e.to_string()))?;
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    write_private(&dev.files.key, &generated.key).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&dev.files.cert, &generated.cert).map_err(|e| fail(e.to_string()))?;
    std::fs::write(&dev.ca, &generated.ca).map_err(|e| fail(e.to_string()))?;
    tracing::info!(dir = %dir.display(), "created a development certificate");
    Ok(dev)
}

/// Returns the development certificate in `dir` when it exists and is
/// usable, without creating or changing any file.
pub fn existing_dev_certificate(dir: &Path) -> Option<DevCertificate> {
    let dev = DevCertificate {
        files: CertificateFiles {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
        },
        ca: dir.join("ca.pem"),
    };
    dev_certificate_usable(&dev).then_some(dev)
}

fn dev_certificate_usable(dev: &DevCertificate) -> bool {
    if !dev.ca.exists() {
        return false;
    }
    let Ok((key, _)) = load_certified_key(&dev.files, &provider()) else {
        return false;
    };
    let Ok((_, cert)) = X509Certificate::from_der(&key.cert[0]) else {
        return false;
    };
    let tomorrow = time::OffsetDateTime::now_utc() + time::Duration::days(1);
    tomorrow < cert.validity().not_after.to_datetime()
}

struct GeneratedCertificate {
    cert: String,
    key: String,
    ca: String,
}

fn generate_dev_certificate() -> Result<GeneratedCertificate, rcgen::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair, KeyUsagePurpose};
    let now = time::OffsetDateTime::now_utc();
    let valid_until = now + time::Duration::days(DEV_VALID_DAYS);

    let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "Edge development CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    ca_params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    ca_params.not_before = now - time::Duration::hours(1);
    ca_params.not_after = valid_until;
    let ca_key = KeyPair::generate()?;
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key)?;

    let names = vec![
        "localhost".to_owned(),
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
    ];
    let mut params = CertificateParams::new(names)?;
    params
        .distinguished_name
        .push(DnType::CommonName, "Edge development certificate");
    params.not_before = now - time::Duration::hours(1);
    params.not_after = valid_until;
    let key = KeyPair::generate()?;
    let cert = params.signed_by(&key, &ca)?;
    Ok(GeneratedCertificate {
        cert: format!("{}{}", cert.pem(), ca.pem()),
        key: key.serialize_pem(),
        ca: ca.pem(),
    })
}

/// Writes a file that only its owner can read.
fn write_private(path: &Path, contents: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    file.write_all(contents.as_bytes())
}

/// Starts the thread that handles SIGHUP and reloads listeners'
/// certificates: each listener when its files change (checked every
/// `reload_interval`), and all of them on SIGHUP, which also runs
/// `on_hangup` (the access log reopens its file there). A failed reload is
/// logged and the old certificates stay. The node always runs this thread,
/// so that SIGHUP, as logrotate sends it, never ends the process.
pub fn spawn_reloader(
    listeners: Vec<(usize, Arc<ListenerTls>)>,
    on_hangup: impl Fn() + Send + 'static,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut hangup = {
        let _entered = runtime.enter();
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())?
    };
    let tick = listeners
        .iter()
        .map(|(_, tls)| tls.reload_interval)
        .filter(|interval| !interval.is_zero())
        .min();
    std::thread::Builder::new()
        .name("edge-reload".to_owned())
        .spawn(move || {
            runtime.block_on(async move {
                let mut last_check = vec![tokio::time::Instant::now(); listeners.len()];
                loop {
                    let sleep = async {
                        match tick {
                            Some(tick) => tokio::time::sleep(tick).await,
                            None => std::future::pending().await,
                        }
                    };
                    tokio::select! {
                        _ = sleep => {
                            let now = tokio::time::Instant::now();
                            for (slot, (index, tls)) in listeners.iter().enumerate() {
                                let due = !tls.reload_interval.is_zero()
                                    && now - last_check[slot] >= tls.reload_interval;
                                if due {
                                    last_check[slot] = now;
                                    reload_listener(*index, tls, false);
                                }
                            }
                        }
                        _ = hangup.recv() => {
                            if listeners.is_empty() {
                                tracing::info!(
                                    "SIGHUP received: no TLS listener to reload; the config \
                                     and worker modules load only at start"
                                );
                            } else {
                                tracing::info!(
                                    "SIGHUP: reloading TLS certificates; the config and worker \
                                     modules load only at start"
                                );
                            }
                            for (index, tls) in &listeners {
                                reload_listener(*index, tls, true);
                            }
                            on_hangup();
                        }
                        _ = shutdown.wait_for(|stop| *stop) => break,
                    }
                }
            });
        })
}

fn reload_listener(index: usize, tls: &ListenerTls, force: bool) {
    match tls.reload(force) {
        Ok(true) => tracing::info!(listener = index, "reloaded TLS certificates"),
        Ok(false) => {}
        Err(error) => tracing::error!(
            listener = index,
            %error,
            "failed to reload TLS certificates; the previous ones stay in use"
        ),
    }
}

/// Returns whether a failed handshake was the client's certificate being
/// missing or rejected on a listener that checks client certificates.
pub fn is_client_certificate_error(error: &std::io::Error) -> bool {
    matches!(
        error
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>()),
        Some(rustls::Error::InvalidCertificate(_) | rustls::Error::NoCertificatesPresented)
    )
}

/// Sends a `protocol_version` alert and returns true when the client's
/// first bytes are a ClientHello that offers only TLS 1.1 or older.
///
/// rustls answers such a hello with `handshake_failure`, because it checks
/// for the `signature_algorithms` extension, which TLS 1.0 and 1.1 clients do
/// not send, before the version. RFC 8446, appendix D.2 and RFC 5246,
/// appendix E.1 expect `protocol_version`, which tells the client why.
pub async fn reject_old_protocol(stream: &mut tokio::net::TcpStream) -> bool {
    use tokio::io::AsyncWriteExt;
    let mut buffer = [0u8; 2048];
    let Ok(read) = stream.peek(&mut buffer).await else {
        return false;
    };
    let Some(record_version) = old_protocol_hello(&buffer[..read]) else {
        return false;
    };
    // A fatal (2) protocol_version (70) alert record.
    let [major, minor] = record_version.to_be_bytes();
    let alert = [0x15, major, minor, 0x00, 0x02, 0x02, 70];
    let _ = stream.write_all(&alert).await;
    let _ = stream.shutdown().await;
    true
}

/// Returns the record version of a ClientHello whose highest offered version
/// is below TLS 1.2: `legacy_version` under 0x0303 and no
/// `supported_versions` extension. Returns `None` for anything else,
/// including a hello cut short, which rustls then handles.
fn old_protocol_hello(bytes: &[u8]) -> Option<u16> {
    let mut reader = Reader(bytes);
    // Record header: handshake (22), version, length.
    if reader.u8()? != 22 {
        return None;
    }
    let record_version = reader.u16()?;
    let record_length = usize::from(reader.u16()?);
    let record = reader.take(record_length)?;
    let mut hello = Reader(record);
    // Handshake header: client_hello (1), 24-bit length.
    if hello.u8()? != 1 {
        return None;
    }
    let length = hello.take(3)?;
    let length =
        usize::from(length[0]) << 16 | usize::from(length[1]) << 8 | usize::from(length[2]);
    let mut body = Reader(hello.take(length)?);
    if body.u16()? >= 0x0303 {
        return None;
    }
    body.take(32)?; // random
    let session_id = usize::from(body.u8()?);
    body.take(session_id)?;
    let suites = usize::from(body.u16()?);
    body.take(suites)?;
    let compression = usize::from(body.u8()?);
    body.take(compression)?;
    if body.0.is_empty() {
        return Some(record_version);
    }
    let extensions_length = usize::from(body.u16()?);
    let mut extensions = Reader(body.take(extensions_length)?);
    while !extensions.0.is_empty() {
        let kind = extensions.u16()?;
        let size = usize::from(extensions.u16()?);
        extensions.take(size)?;
        // supported_versions: the client may offer TLS 1.2 or 1.3 there.
        if kind == 43 {
            return None;
        }
    }
    Some(record_version)
}

/// A cursor over bytes of a TLS message.
struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, count: usize) -> Option<&'a [u8]> {
        if self.0.len() < count {
            return None;
        }
        let (head, rest) = self.0.split_at(count);
        self.0 = rest;
        Some(head)
    }

    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }

    fn u16(&mut self) -> Option<u16> {
        let bytes = self.take(2)?;
        Some(u16::from_be_bytes([bytes[0], bytes[1]]))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds a ClientHello record with this legacy version and extensions.
    fn client_hello(version: u16, extensions: &[(u16, &[u8])]) -> Vec<u8> {
        let mut body = version.to_be_bytes().to_vec();
        body.extend_from_slice(&[7; 32]); // random
        body.push(0); // session id
        body.extend_from_slice(&[0, 2, 0x00, 0x2f]); // one cipher suite
        body.extend_from_slice(&[1, 0]); // null compression
        let mut encoded = Vec::new();
        for (kind, data) in extensions {
            encoded.extend_from_slice(&kind.to_be_bytes());
            encoded.extend_from_slice(&(data.len() as u16).to_be_bytes());
            encoded.extend_from_slice(data);
        }
        if !extensions.is_empty() {
            body.extend_from_slice(&(encoded.len() as u16).to_be_bytes());
            body.extend_from_slice(&encoded);
        }
        let mut handshake = vec![1];
        handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
        handshake.extend_from_slice(&body);
        let mut record = vec![22, 0x03, 0x01];
        record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
        record.extend_from_slice(&handshake);
        record
    }

    #[test]
    fn old_hello_detects_tls10_and_tls11() {
        assert_eq!(old_protocol_hello(&client_hello(0x0301, &[])), Some(0x0301));
        let sni: &[u8] = &[0, 0];
        assert_eq!(
            old_protocol_hello(&client_hello(0x0302, &[(0, sni)])),
            Some(0x0301)
        );
    }

    #[test]
    fn old_hello_leaves_modern_hellos_to_rustls() {
        assert_eq!(old_protocol_hello(&client_hello(0x0303, &[])), None);
        // A legacy version below TLS 1.2 with supported_versions offering
        // TLS 1.3 is for rustls to judge.
        let versions: &[u8] = &[2, 0x03, 0x04];
        assert_eq!(
            old_protocol_hello(&client_hello(0x0301, &[(43, versions)])),
            None
        );
        // Cut short, not a handshake, or not a ClientHello.
        let hello = client_hello(0x0301, &[]);
        assert_eq!(old_protocol_hello(&hello[..20]), None);
        assert_eq!(old_protocol_hello(b"GET / HTTP/1.1\r\n\r\n"), None);
        let mut server_hello = hello.clone();
        server_hello[5] = 2;
        assert_eq!(old_protocol_hello(&server_hello), None);
    }

    #[test]
    fn rdn_values_are_escaped() {
        let cases = [
            ("plain", "plain"),
            ("a,b", "a\\,b"),
            ("#lead", "\\#lead"),
            (" both ", "\\ both\\ "),
            ("q\"+;<>\\", "q\\\"\\+\\;\\<\\>\\\\"),
        ];
        for (value, expected) in cases {
            let mut out = String::new();
            escape_rdn_value(value, &mut out);
            assert_eq!(out, expected, "{value:?}");
        }
    }

    #[test]
    fn sni_lookup_prefers_exact_then_one_level_wildcard() {
        let provider = provider();
        let key = |name: &str| {
            let generated = rcgen::generate_simple_self_signed(vec![name.to_owned()]).unwrap();
            let der = PrivateKeyDer::try_from(generated.signing_key.serialize_der()).unwrap();
            let signing = provider.key_provider.load_private_key(der).unwrap();
            Arc::new(CertifiedKey::new(
                vec![generated.cert.der().clone()],
                signing,
            ))
        };
        let (exact, wildcard, first) = (key("a.example"), key("*.example"), key("x.test"));
        let mut resolver = SniResolver::default();
        resolver.add(first.clone(), vec!["x.test".to_owned()]);
        resolver.add(wildcard.clone(), vec!["*.example".to_owned()]);
        resolver.add(exact.clone(), vec!["a.example".to_owned()]);
        assert!(Arc::ptr_eq(resolver.find("a.example").unwrap(), &exact));
        assert!(Arc::ptr_eq(resolver.find("b.example").unwrap(), &wildcard));
        assert!(resolver.find("c.b.example").is_none());
        assert!(resolver.find("example").is_none());
        assert!(Arc::ptr_eq(resolver.fallback.as_ref().unwrap(), &first));
    }
}
