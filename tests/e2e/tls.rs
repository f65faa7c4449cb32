//! TLS termination: certificates by SNI, ALPN, old protocol versions,
//! reloads, start-up errors, redirects, client certificates and TLS to
//! upstreams, checked with rustls, curl and openssl clients.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::harness::{
    edge, get, raw_request, tls_upstream, KeyKind, Node, Result, TestCa, TlsClient, Upstream,
};

const BOTH: &[&[u8]] = &[b"h2", b"http/1.1"];

/// Three certificates of three key types from one CA, written to a folder.
struct Pki {
    dir: tempfile::TempDir,
    ca: TestCa,
    ca_file: PathBuf,
    /// `a.test`, ECDSA P-256.
    a: (PathBuf, PathBuf, Vec<u8>),
    /// `*.b.test`, RSA 2048.
    b: (PathBuf, PathBuf, Vec<u8>),
    /// `c.test`, Ed25519.
    c: (PathBuf, PathBuf, Vec<u8>),
}

impl Pki {
    fn new() -> Pki {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("Edge test CA");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).unwrap();
        let write = |names: &[&str], kind, file| {
            let issued = ca.issue(names, kind);
            let (cert, key) = issued.write(dir.path(), file);
            (cert, key, issued.der)
        };
        let a = write(&["a.test"], KeyKind::EcdsaP256, "a");
        let b = write(&["*.b.test"], KeyKind::Rsa2048, "b");
        let c = write(&["c.test"], KeyKind::Ed25519, "c");
        Pki {
            dir,
            ca,
            ca_file,
            a,
            b,
            c,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A config with one TLS listener serving the three certificates, extra
/// TLS settings and one route to `upstream`.
fn tls_config(pki: &Pki, tls_extra: &str, upstream: &Upstream) -> String {
    format!(
        r#"[[listeners]]
addr = "127.0.0.1:0"
[listeners.tls]
{tls_extra}
[[listeners.tls.certificates]]
cert = {a_cert:?}
key = {a_key:?}
[[listeners.tls.certificates]]
cert = {b_cert:?}
key = {b_key:?}
[[listeners.tls.certificates]]
cert = {c_cert:?}
key = {c_key:?}

[upstreams.app]
targets = ["{upstream}"]

[[routes]]
name = "app"
upstream = "app"
"#,
        a_cert = pki.a.0.display().to_string(),
        a_key = pki.a.1.display().to_string(),
        b_cert = pki.b.0.display().to_string(),
        b_key = pki.b.1.display().to_string(),
        c_cert = pki.c.0.display().to_string(),
        c_key = pki.c.1.display().to_string(),
        upstream = upstream.addr,
    )
}

/// Runs a command and returns its stdout and stderr together.
fn run(program: &str, args: &[&str], stdin: &str) -> String {
    use std::io::Write;
    let mut child = Command::new(program)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {program} (scripts/test installs it): {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let output = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_picks_certificate_by_name() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let node = Node::start(&tls_config(&pki, "", &upstream))?;
    let client = TlsClient::new(&pki.ca_file, BOTH);
    let cases = [
        ("a.test", &pki.a.2, "ECDSA"),
        ("x.b.test", &pki.b.2, "RSA wildcard"),
        (
            "deep.x.b.test",
            &pki.a.2,
            "the default: a wildcard covers one label",
        ),
        ("c.test", &pki.c.2, "Ed25519"),
    ];
    for (name, expected, what) in cases {
        if name == "deep.x.b.test" {
            // The default certificate is not valid for this name, so the
            // client's verification fails; openssl below checks which one
            // was sent.
            assert!(client.get(node.addr, name, "/", &[]).await.is_err());
            continue;
        }
        let got = client.get(node.addr, name, "/", &[]).await?;
        assert_eq!(&got.peer_cert, expected, "{name}: {what}");
        assert_eq!(got.got.status, 200, "{name}");
    }
    // Without SNI, and with a name no certificate covers, the first
    // certificate is served.
    let addr = node.addr.to_string();
    for extra in [
        &["-noservername"][..],
        &["-servername", "deep.x.b.test"][..],
    ] {
        let mut args = vec!["s_client", "-connect", &addr];
        args.extend_from_slice(extra);
        let output = run("openssl", &args, "");
        assert!(
            output.contains("subject=O = Example, CN = a.test"),
            "{extra:?}: {output}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sni_fallback_reject_fails_unknown_names() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let node = Node::start(&tls_config(&pki, "sni_fallback = \"reject\"", &upstream))?;
    let addr = node.addr.to_string();
    let known = run(
        "openssl",
        &["s_client", "-connect", &addr, "-servername", "c.test"],
        "",
    );
    assert!(
        known.contains("subject=O = Example, CN = c.test"),
        "{known}"
    );
    for extra in [&["-noservername"][..], &["-servername", "other.test"][..]] {
        let mut args = vec!["s_client", "-connect", &addr];
        args.extend_from_slice(extra);
        let output = run("openssl", &args, "");
        assert!(output.contains("alert"), "{extra:?}: {output}");
        assert!(!output.contains("subject="), "{extra:?}: {output}");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alpn_negotiates_h2_or_http1() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let hsts = "hsts = \"max-age=31536000; includeSubDomains\"";
    let node = Node::start(&tls_config(&pki, hsts, &upstream))?;

    let h2 = TlsClient::new(&pki.ca_file, BOTH)
        .get(node.addr, "a.test", "/h2", &[])
        .await?;
    assert_eq!(h2.alpn.as_deref(), Some(&b"h2"[..]));
    assert_eq!(h2.got.status, 200);
    assert_eq!(h2.got.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(
        h2.got.json()["headers"]["host"],
        format!("a.test:{}", node.addr.port())
    );

    let h1 = TlsClient::new(&pki.ca_file, &[b"http/1.1"])
        .get(node.addr, "a.test", "/h1", &[])
        .await?;
    assert_eq!(h1.alpn.as_deref(), Some(&b"http/1.1"[..]));
    assert_eq!(h1.got.status, 200);
    assert_eq!(h1.got.json()["headers"]["x-forwarded-proto"], "https");
    assert_eq!(upstream.count(), 2);
    for got in [&h2.got, &h1.got] {
        assert_eq!(
            got.header("strict-transport-security"),
            Some("max-age=31536000; includeSubDomains")
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_and_openssl_complete_handshakes() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let node = Node::start(&tls_config(&pki, "", &upstream))?;
    let port = node.addr.port();
    let ca = pki.ca_file.display().to_string();
    for name in ["a.test", "x.b.test", "c.test"] {
        let resolve = format!("{name}:{port}:127.0.0.1");
        let url = format!("https://{name}:{port}/curl");
        let output = run(
            "curl",
            &[
                "-sS",
                "--http2",
                "--cacert",
                &ca,
                "--resolve",
                &resolve,
                "-o",
                "/dev/null",
                "-w",
                "%{http_code} %{http_version}",
                &url,
            ],
            "",
        );
        assert_eq!(output.trim(), "200 2", "{name}");
    }
    let addr = node.addr.to_string();
    let output = run(
        "openssl",
        &[
            "s_client",
            "-connect",
            &addr,
            "-servername",
            "x.b.test",
            "-alpn",
            "h2",
            "-CAfile",
            &ca,
            "-verify_return_error",
        ],
        "",
    );
    assert!(output.contains("ALPN protocol: h2"), "{output}");
    assert!(
        output.contains("subject=O = Example, CN = *.b.test"),
        "{output}"
    );
    assert!(output.contains("Verify return code: 0 (ok)"), "{output}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_tls_versions_get_protocol_version_alert() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let node = Node::start(&tls_config(&pki, "", &upstream))?;
    let addr = node.addr.to_string();
    for version in ["-tls1", "-tls1_1"] {
        let output = run(
            "openssl",
            &[
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "a.test",
                version,
                "-cipher",
                "DEFAULT@SECLEVEL=0",
            ],
            "",
        );
        assert!(
            output.contains("alert protocol version"),
            "{version}: {output}"
        );
        assert!(
            output.contains("SSL alert number 70"),
            "{version}: {output}"
        );
    }
    for version in ["-tls1_2", "-tls1_3"] {
        let output = run(
            "openssl",
            &[
                "s_client",
                "-connect",
                &addr,
                "-servername",
                "a.test",
                version,
            ],
            "",
        );
        assert!(
            output.contains("subject=O = Example, CN = a.test"),
            "{version}: {output}"
        );
    }
    assert_eq!(upstream.count(), 0);
    Ok(())
}

/// Writes a new certificate and key for `a.test` over the files in `pki` by
/// renaming, key first, and returns the new certificate.
fn replace_a(pki: &Pki) -> Vec<u8> {
    let issued = pki.ca.issue(&["a.test"], KeyKind::EcdsaP256);
    let (cert, key) = issued.write(&pki.path("next"), "a");
    std::fs::rename(key, &pki.a.1).unwrap();
    std::fs::rename(cert, &pki.a.0).unwrap();
    issued.der
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_swaps_certificate_under_load() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    std::fs::create_dir(pki.path("next"))?;
    let node = Node::start(&tls_config(&pki, "reload_interval = \"100ms\"", &upstream))?;
    let client = TlsClient::new(&pki.ca_file, &[b"http/1.1"]);

    // A keep-alive connection opened before the swap.
    let stream = client.connect(node.addr, "a.test").await?;
    let (mut open, connection) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);

    // Clients that open a new connection for every request.
    let stop = Arc::new(AtomicBool::new(false));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut loops = Vec::new();
    for _ in 0..4 {
        let (client, stop, ok, failed) = (client.clone(), stop.clone(), ok.clone(), failed.clone());
        let addr = node.addr;
        loops.push(tokio::spawn(async move {
            while !stop.load(Ordering::SeqCst) {
                match client.get(addr, "a.test", "/loop", &[]).await {
                    Ok(got) if got.got.status == 200 => ok.fetch_add(1, Ordering::SeqCst),
                    Ok(got) => panic!("status {}", got.got.status),
                    Err(error) => {
                        eprintln!("request failed: {error}");
                        failed.fetch_add(1, Ordering::SeqCst)
                    }
                };
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let new_cert = replace_a(&pki);

    // New connections get the new certificate once the change is seen.
    let mut seen_new = false;
    for _ in 0..100 {
        let got = client.get(node.addr, "a.test", "/probe", &[]).await?;
        if got.peer_cert == new_cert {
            seen_new = true;
            break;
        }
        assert_eq!(
            got.peer_cert, pki.a.2,
            "neither the old nor the new certificate"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(seen_new, "no new connection got the new certificate");

    // The connection opened before the swap still serves requests.
    let request = http::Request::builder()
        .uri("/open")
        .header("host", "a.test")
        .body(http_body_util::Full::new(bytes::Bytes::new()))?;
    let response = open.send_request(request).await?;
    assert_eq!(response.status(), 200);

    tokio::time::sleep(Duration::from_millis(200)).await;
    stop.store(true, Ordering::SeqCst);
    for task in loops {
        task.await?;
    }
    assert_eq!(failed.load(Ordering::SeqCst), 0, "{}", node.log());
    assert!(ok.load(Ordering::SeqCst) > 0);
    assert!(
        node.log_contains("reloaded TLS certificates"),
        "{}",
        node.log()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sighup_reloads_certificates() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    std::fs::create_dir(pki.path("next"))?;
    let node = Node::start(&tls_config(&pki, "reload_interval = \"0s\"", &upstream))?;
    let client = TlsClient::new(&pki.ca_file, BOTH);
    let new_cert = replace_a(&pki);
    // With the file checks off, nothing changes until the signal.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let before = client.get(node.addr, "a.test", "/", &[]).await?;
    assert_eq!(before.peer_cert, pki.a.2);
    node.signal("HUP");
    assert!(
        node.log_contains("reloaded TLS certificates"),
        "{}",
        node.log()
    );
    let after = client.get(node.addr, "a.test", "/", &[]).await?;
    assert_eq!(after.peer_cert, new_cert);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_reload_keeps_old_certificate() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let node = Node::start(&tls_config(&pki, "reload_interval = \"100ms\"", &upstream))?;
    // The key of another certificate does not match.
    std::fs::copy(&pki.b.1, &pki.a.1)?;
    assert!(node.log_contains("does not match"), "{}", node.log());
    let got = TlsClient::new(&pki.ca_file, BOTH)
        .get(node.addr, "a.test", "/", &[])
        .await?;
    assert_eq!(got.peer_cert, pki.a.2);
    assert_eq!(got.got.status, 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_retries_certificate_not_yet_valid() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    std::fs::create_dir(pki.path("next"))?;
    let node = Node::start(&tls_config(&pki, "reload_interval = \"100ms\"", &upstream))?;
    let client = TlsClient::new(&pki.ca_file, BOTH);
    // Valid from three seconds on, whole seconds being the certificate's
    // resolution.
    let now = time::OffsetDateTime::now_utc();
    let issued = pki.ca.issue_valid(
        &["a.test"],
        KeyKind::EcdsaP256,
        now + time::Duration::seconds(3),
        now + time::Duration::days(30),
    );
    let (cert, key) = issued.write(&pki.path("next"), "a");
    std::fs::rename(key, &pki.a.1)?;
    std::fs::rename(cert, &pki.a.0)?;
    let failure = "failed to reload TLS certificates";
    assert!(node.log_contains(failure), "{}", node.log());
    let before = client.get(node.addr, "a.test", "/", &[]).await?;
    assert_eq!(before.peer_cert, pki.a.2, "the old certificate stays");

    // The same files are tried again without changing, and load once valid.
    let mut reloaded = false;
    for _ in 0..100 {
        if node.log().contains("reloaded TLS certificates") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(reloaded, "{}", node.log());
    assert_eq!(node.log().matches(failure).count(), 1, "{}", node.log());
    let after = client.get(node.addr, "a.test", "/", &[]).await?;
    assert_eq!(after.peer_cert, issued.der);
    Ok(())
}

/// A route and its upstream, appended to configs that test listener errors,
/// because a config needs a route.
const ROUTE: &str = "\n[upstreams.route-upstream]\ntargets = [\"127.0.0.1:9\"]\n\n\
                     [[routes]]\nname = \"any\"\nupstream = \"route-upstream\"\n";

/// Runs `edge check` on a config with one TLS listener using `cert` and
/// `key`, and returns its stderr, asserting failure.
fn check_fails(dir: &Path, cert: &Path, key: &Path) -> String {
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.tls]\n\
         [[listeners.tls.certificates]]\ncert = {:?}\nkey = {:?}\n{ROUTE}",
        cert.display().to_string(),
        key.display().to_string()
    );
    let path = dir.join("edge.toml");
    std::fs::write(&path, config).unwrap();
    let output = edge(&["check", &path.display().to_string()]);
    assert!(!output.status.success(), "check passed");
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn bad_certificates_fail_start_naming_file() {
    let pki = Pki::new();
    let dir = pki.dir.path();
    let (a_cert, a_key) = (pki.a.0.display().to_string(), pki.a.1.display().to_string());
    let b_key = pki.b.1.display().to_string();

    let mismatch = check_fails(dir, &pki.a.0, &pki.b.1);
    assert!(
        mismatch.contains(&format!(
            "the private key in {b_key} does not match the certificate in {a_cert}"
        )),
        "{mismatch}"
    );
    assert!(
        mismatch.contains("edge.toml:5: listeners[0].tls.certificates[0].cert"),
        "{mismatch}"
    );

    let now = time::OffsetDateTime::now_utc();
    let expired = pki.ca.issue_valid(
        &["old.test"],
        KeyKind::EcdsaP256,
        now - time::Duration::days(30),
        now - time::Duration::days(1),
    );
    let (old_cert, old_key) = expired.write(dir, "old");
    let message = check_fails(dir, &old_cert, &old_key);
    assert!(
        message.contains(&format!(
            "the certificate in {} expired on",
            old_cert.display()
        )),
        "{message}"
    );

    let future = pki.ca.issue_valid(
        &["new.test"],
        KeyKind::EcdsaP256,
        now + time::Duration::days(1),
        now + time::Duration::days(30),
    );
    let (new_cert, new_key) = future.write(dir, "future");
    let message = check_fails(dir, &new_cert, &new_key);
    assert!(message.contains("is not valid before"), "{message}");

    let missing = dir.join("missing.pem");
    let message = check_fails(dir, &missing, &pki.a.1);
    assert!(
        message.contains(&format!("cannot read {}", missing.display())),
        "{message}"
    );

    let empty = dir.join("empty.pem");
    std::fs::write(&empty, "not a certificate\n").unwrap();
    let message = check_fails(dir, &empty, &pki.a.1);
    assert!(
        message.contains(&format!("{} contains no PEM certificate", empty.display())),
        "{message}"
    );
    let message = check_fails(dir, &pki.a.0, &empty);
    assert!(
        message.contains(&format!("{} contains no PEM private key", empty.display())),
        "{message}"
    );
    assert!(message.contains("certificates[0].key"), "{message}");

    // A certificate file given as the key.
    let message = check_fails(dir, &pki.a.0, &pki.a.0);
    assert!(
        message.contains(&format!("{a_cert} contains no PEM private key")),
        "{message}"
    );

    // The valid pair passes.
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.tls]\n\
         [[listeners.tls.certificates]]\ncert = {a_cert:?}\nkey = {a_key:?}\n{ROUTE}"
    );
    std::fs::write(dir.join("edge.toml"), config).unwrap();
    let output = edge(&["check", &dir.join("edge.toml").display().to_string()]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_listener_redirects_to_https() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let config = tls_config(&pki, "", &upstream).replacen(
        "[upstreams.app]",
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.redirect_https]\n\
         except = [\"/.well-known/acme-challenge\"]\n\n[upstreams.app]",
        1,
    );
    let node = Node::start(&config)?;
    let https_port = node.listener_addr(0).port();
    let http = node.listener_addr(1);

    let response = raw_request(
        http,
        "POST /a/b?x=1 HTTP/1.1\r\nHost: Shop.Example:80\r\nContent-Length: 2\r\n\
         Connection: close\r\n\r\nhi",
    )
    .await?;
    assert!(
        response.starts_with("HTTP/1.1 308 Permanent Redirect\r\n"),
        "{response}"
    );
    let location = format!("location: https://shop.example:{https_port}/a/b?x=1\r\n");
    assert!(response.contains(&location), "{response}");

    let response = raw_request(http, "GET / HTTP/1.0\r\n\r\n").await?;
    assert!(response.starts_with("HTTP/1.0 400"), "{response}");
    assert!(
        response.contains("\"error\":\"invalid_host\""),
        "{response}"
    );
    assert_eq!(
        upstream.count(),
        0,
        "a redirected request reached the upstream"
    );

    let challenge = get(&format!("http://{http}/.well-known/acme-challenge/token")).await?;
    assert_eq!(challenge.status, 200);
    assert_eq!(challenge.json()["headers"]["x-forwarded-proto"], "http");
    assert_eq!(upstream.count(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redirect_port_443_is_left_out() -> Result {
    let upstream = Upstream::echo().await;
    let config = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.redirect_https]\nport = 443\n\n\
         [upstreams.app]\ntargets = [\"{}\"]\n\n[[routes]]\nname = \"app\"\nupstream = \"app\"\n",
        upstream.addr
    );
    let node = Node::start(&config)?;
    let response = raw_request(
        node.addr,
        "GET /x HTTP/1.1\r\nHost: example.test\r\nConnection: close\r\n\r\n",
    )
    .await?;
    assert!(
        response.contains("location: https://example.test/x\r\n"),
        "{response}"
    );
    Ok(())
}

/// A config whose TLS listener checks client certificates from `client_ca`
/// with `client_auth` set to `auth`.
fn mtls_config(pki: &Pki, client_ca: &Path, auth: &str, upstream: &Upstream) -> String {
    let extra = format!(
        "client_ca = {:?}\nclient_auth = \"{auth}\"",
        client_ca.display().to_string()
    );
    tls_config(pki, &extra, upstream)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_passes_verified_subject() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let client_ca = TestCa::new("Client CA");
    let client_ca_file = pki.path("client-ca.pem");
    std::fs::write(&client_ca_file, client_ca.pem())?;
    let (client_cert, client_key) = client_ca
        .issue(&["client-1"], KeyKind::EcdsaP256)
        .write(pki.dir.path(), "client");
    let config = mtls_config(&pki, &client_ca_file, "required", &upstream).replacen(
        "[upstreams.app]",
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[upstreams.app]",
        1,
    );
    let node = Node::start(&config)?;

    let with_cert = TlsClient::with_client_cert(&pki.ca_file, BOTH, &client_cert, &client_key);
    let got = with_cert
        .get(
            node.addr,
            "a.test",
            "/",
            &[("x-client-cert-subject", "CN=forged")],
        )
        .await?;
    assert_eq!(got.got.status, 200);
    assert_eq!(
        got.got.json()["headers"]["x-client-cert-subject"],
        "CN=client-1,O=Example"
    );

    // Without a certificate, or with one from another CA, the handshake fails.
    let without = TlsClient::new(&pki.ca_file, BOTH);
    assert!(without.get(node.addr, "a.test", "/", &[]).await.is_err());
    let stranger = TestCa::new("Other CA")
        .issue(&["stranger"], KeyKind::EcdsaP256)
        .write(pki.dir.path(), "stranger");
    let other = TlsClient::with_client_cert(&pki.ca_file, BOTH, &stranger.0, &stranger.1);
    assert!(other.get(node.addr, "a.test", "/", &[]).await.is_err());
    assert_eq!(upstream.count(), 1);
    // Each rejection leaves a line for the operator; the log is read on
    // another thread, so wait for both.
    let rejections = || node.log().matches("rejected a client certificate").count();
    for _ in 0..100 {
        if rejections() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(rejections(), 2, "{}", node.log());

    // Any client can cause a rejection, so their lines are limited to ten a
    // second.
    let started = std::time::Instant::now();
    for _ in 0..60 {
        assert!(without.get(node.addr, "a.test", "/", &[]).await.is_err());
    }
    let seconds = started.elapsed().as_secs() + 2;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let lines = rejections();
    assert!(
        lines <= 2 + 10 * seconds as usize,
        "{lines} lines in {seconds} s"
    );
    assert!(lines < 62, "{}", node.log());
    // The first line of the next second counts the lines left out.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert!(without.get(node.addr, "a.test", "/", &[]).await.is_err());
    tokio::time::sleep(Duration::from_millis(300)).await;
    let log = node.log();
    let counted = log
        .lines()
        .filter(|line| line.contains("rejected a client certificate"))
        .filter_map(|line| line.split("suppressed=").nth(1))
        .any(|rest| !rest.starts_with('0'));
    assert!(counted, "{log}");

    // A plain listener of the same node removes the header too.
    let plain = node.listener_addr(1);
    let forged = crate::harness::send(
        "GET",
        &format!("http://{plain}/"),
        &[("x-client-cert-subject", "CN=forged")],
        b"",
    )
    .await?;
    assert_eq!(forged.status, 200);
    assert!(forged.json()["headers"]
        .get("x-client-cert-subject")
        .is_none());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mtls_optional_strips_forged_subject() -> Result {
    let upstream = Upstream::echo().await;
    let pki = Pki::new();
    let client_ca = TestCa::new("Client CA");
    let client_ca_file = pki.path("client-ca.pem");
    std::fs::write(&client_ca_file, client_ca.pem())?;
    let (client_cert, client_key) = client_ca
        .issue(&["client-2"], KeyKind::Ed25519)
        .write(pki.dir.path(), "client");
    // The fixture worker echoes the request as the worker sees it.
    let config = mtls_config(&pki, &client_ca_file, "optional", &upstream).replace(
        "upstream = \"app\"\n",
        "upstream = \"app\"\n\n[[routes.workers]]\nmodule = \"{modules}/fixture-worker.wasm\"\n\
         [routes.workers.config]\nmode = \"echo\"\n",
    );
    let node = Node::start(&config)?;

    let anonymous = TlsClient::new(&pki.ca_file, BOTH)
        .get(
            node.addr,
            "a.test",
            "/",
            &[("x-client-cert-subject", "CN=forged")],
        )
        .await?;
    assert_eq!(anonymous.got.status, 200);
    assert!(anonymous.got.json()["headers"]
        .get("x-client-cert-subject")
        .is_none());

    let verified = TlsClient::with_client_cert(&pki.ca_file, BOTH, &client_cert, &client_key)
        .get(node.addr, "a.test", "/", &[])
        .await?;
    assert_eq!(
        verified.got.json()["headers"]["x-client-cert-subject"],
        "CN=client-2,O=Example"
    );
    assert_eq!(upstream.count(), 0, "the echo worker answers itself");
    Ok(())
}

/// A node config with one plain listener whose route goes to a TLS
/// upstream at `addr` with the `tls` table given.
fn upstream_tls_config(addr: std::net::SocketAddr, tls: &str) -> String {
    format!(
        "[upstreams.secure]\ntargets = [\"{addr}\"]\n[upstreams.secure.tls]\n{tls}\n\n\
         [[routes]]\nname = \"secure\"\nupstream = \"secure\"\n"
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_checks_configured_ca() -> Result {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("Upstream CA");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let (addr, count, _task) = tls_upstream(&ca, None).await;
    let ca_path = ca_file.display().to_string();

    let node = Node::start(&upstream_tls_config(
        addr,
        &format!("ca = {ca_path:?}\nserver_name = \"upstream.test\""),
    ))?;
    for _ in 0..3 {
        let got = get(&node.url("/over-tls")).await?;
        assert_eq!(got.status, 200);
        assert_eq!(got.json()["tls_upstream"], true);
        assert_eq!(got.json()["proto"], "http");
    }
    assert_eq!(count.load(Ordering::SeqCst), 3);

    // A name the upstream's certificate does not carry fails verification.
    let wrong_name = Node::start(&upstream_tls_config(
        addr,
        &format!("ca = {ca_path:?}\nserver_name = \"other.test\""),
    ))?;
    let got = get(&wrong_name.url("/")).await?;
    assert_eq!(got.status, 502);
    assert_eq!(got.json()["error"], "upstream_unavailable");

    // Another CA fails verification too.
    let other = TestCa::new("Other CA");
    let other_file = dir.path().join("other-ca.pem");
    std::fs::write(&other_file, other.pem())?;
    let wrong_ca = Node::start(&upstream_tls_config(
        addr,
        &format!(
            "ca = {:?}\nserver_name = \"upstream.test\"",
            other_file.display().to_string()
        ),
    ))?;
    let got = get(&wrong_ca.url("/")).await?;
    assert_eq!(got.status, 502);
    assert_eq!(
        count.load(Ordering::SeqCst),
        3,
        "a request passed a failed check"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn upstream_tls_presents_client_certificate() -> Result {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new("Upstream CA");
    let client_ca = TestCa::new("Edge client CA");
    let ca_file = dir.path().join("upstream-ca.pem");
    std::fs::write(&ca_file, ca.pem())?;
    let (cert, key) = client_ca
        .issue(&["edge-node"], KeyKind::EcdsaP256)
        .write(dir.path(), "edge-node");
    let (addr, count, _task) = tls_upstream(&ca, Some(&client_ca)).await;
    let base = format!(
        "ca = {:?}\nserver_name = \"upstream.test\"",
        ca_file.display().to_string()
    );

    let without = Node::start(&upstream_tls_config(addr, &base))?;
    assert_eq!(get(&without.url("/")).await?.status, 502);

    let with = Node::start(&upstream_tls_config(
        addr,
        &format!(
            "{base}\n[upstreams.secure.tls.client_certificate]\ncert = {:?}\nkey = {:?}",
            cert.display().to_string(),
            key.display().to_string()
        ),
    ))?;
    assert_eq!(get(&with.url("/")).await?.status, 200);
    assert_eq!(count.load(Ordering::SeqCst), 1);
    Ok(())
}

#[test]
fn tls_config_errors_name_line_and_field() {
    let dir = tempfile::tempdir().unwrap();
    let check = |text: &str| {
        let path = dir.path().join("edge.toml");
        std::fs::write(&path, text).unwrap();
        let output = edge(&["check", &path.display().to_string()]);
        assert!(!output.status.success(), "check passed on {text}");
        String::from_utf8_lossy(&output.stderr).into_owned()
    };
    let listener = "[[listeners]]\naddr = \"127.0.0.1:0\"\n";
    let upstream = "[upstreams.a]\ntargets = [\"127.0.0.1:9\"]\n[upstreams.a.tls]\n";
    // The config after the listener, and what the error must contain.
    let cases = [
        (
            "[listeners.tls]\n".to_owned(),
            "edge.toml:2: listeners[0].tls.certificates: add a",
        ),
        (
            "[listeners.tls]\ndev_certificate = true\n\
             [[listeners.tls.certificates]]\ncert = \"a.pem\"\nkey = \"a.key\"\n"
                .to_owned(),
            "listeners[0].tls.dev_certificate: set either",
        ),
        (
            "[listeners.tls]\ndev_certificate = true\nclient_subject_header = \"Host\"\n"
                .to_owned(),
            "edge.toml:5: listeners[0].tls.client_subject_header",
        ),
        (
            "[listeners.tls]\ndev_certificate = true\nhsts = \"forever\"\n".to_owned(),
            "edge.toml:5: listeners[0].tls.hsts: \"forever\" is not",
        ),
        (
            "[listeners.tls]\ndev_certificate = true\n[listeners.redirect_https]\n".to_owned(),
            "listeners[0].redirect_https: a TLS listener cannot redirect",
        ),
        (
            "[listeners.redirect_https]\n".to_owned(),
            "listeners[0].redirect_https.port: set `port`",
        ),
        (
            "[listeners.redirect_https]\nport = 443\nexcept = [\"acme\"]\n".to_owned(),
            "edge.toml:5: listeners[0].redirect_https.except: \"acme\" must start",
        ),
        (
            format!("{upstream}server_name = \"not a name\"\n"),
            "edge.toml:6: upstreams.a.tls.server_name",
        ),
        (
            format!("{upstream}ca = \"missing-ca.pem\"\n"),
            "upstreams.a.tls: cannot read",
        ),
    ];
    for (rest, expected) in cases {
        let message = check(&format!("{listener}{rest}{ROUTE}"));
        assert!(message.contains(expected), "{rest}: {message}");
    }
}
