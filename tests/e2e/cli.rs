//! The `edge` command line: config and module errors, `routes explain`, and
//! the worker scaffolding.

use crate::harness::{edge, modules_dir};

pub(crate) fn write_config(dir: &std::path::Path, text: &str) -> String {
    let path = dir.join("edge.toml");
    std::fs::write(
        &path,
        text.replace("{modules}", &modules_dir().display().to_string()),
    )
    .unwrap();
    path.display().to_string()
}

const VALID: &str = r#"[[listeners]]
addr = "127.0.0.1:0"

[upstreams.users]
targets = ["127.0.0.1:9"]

[[routes]]
name = "users"
prefix = "/users"
upstream = "users"

[[routes.workers]]
module = "{modules}/add-header.wasm"
[routes.workers.config]
headers = { "x-a" = "1" }

[[routes]]
name = "home"
pattern = "/{device}/home"
methods = ["GET"]
upstream = "users"
"#;

#[test]
fn check_accepts_a_valid_config() {
    let dir = tempfile::tempdir().unwrap();
    let output = edge(&["check", &write_config(dir.path(), VALID)]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains("ok (1 listener, 1 upstream, 2 routes, 1 worker)"),
        "{stdout}"
    );
}

/// Returns the names in `dir`, sorted.
fn folder_entries(dir: &std::path::Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// [`VALID`] with a second listener on a development certificate and an
/// access log at `log`: the parts that serving creates files for.
fn with_file_outputs(log: &std::path::Path) -> String {
    format!(
        "{VALID}\n[[listeners]]\naddr = \"127.0.0.1:0\"\n[listeners.tls]\n\
         dev_certificate = true\n\n[access_log]\npath = {:?}\n",
        log.display().to_string()
    )
}

#[test]
fn check_creates_and_changes_no_files() {
    let dir = tempfile::tempdir().unwrap();
    let logs = dir.path().join("logs");
    std::fs::create_dir(&logs).unwrap();
    let log = logs.join("access.log");
    let config = write_config(dir.path(), &with_file_outputs(&log));

    let output = edge(&["check", &config]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("ok (2 listeners,"), "{stdout}");
    assert!(!log.exists(), "edge check created the access log");
    // No module cache and no development certificate either.
    assert_eq!(folder_entries(dir.path()), ["edge.toml", "logs"]);
    assert!(folder_entries(&logs).is_empty());

    // An access log that exists keeps its content and modification time.
    std::fs::write(&log, "an earlier line\n").unwrap();
    let modified = std::fs::metadata(&log).unwrap().modified().unwrap();
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert!(edge(&["check", &config]).status.success());
    assert_eq!(std::fs::read_to_string(&log).unwrap(), "an earlier line\n");
    assert_eq!(
        std::fs::metadata(&log).unwrap().modified().unwrap(),
        modified
    );

    // `routes explain` creates no files either.
    let explained = edge(&["routes", "explain", "--config", &config, "GET", "/users/7"]);
    assert!(
        explained.status.success(),
        "{}",
        String::from_utf8_lossy(&explained.stderr)
    );
    assert_eq!(folder_entries(dir.path()), ["edge.toml", "logs"]);
}

#[test]
fn check_hints_at_list_tables() {
    let head =
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n[upstreams.a]\ntargets = [\"127.0.0.1:9\"]\n";
    let route = "name = \"r\"\nprefix = \"/\"\nupstream = \"a\"\n";
    let cases = [
        (
            format!("{head}[routes]\n{route}"),
            "hint: routes is a list of tables: write [[routes]], with two brackets",
        ),
        (
            format!("{head}[[routes.workers]]\nmodule = \"x.wasm\"\n[[routes]]\n{route}"),
            "hint: a table inside [[routes]] comes before the first [[routes]]; write \
             [[routes]] first",
        ),
    ];
    for (text, expected) in cases {
        let dir = tempfile::tempdir().unwrap();
        let output = edge(&["check", &write_config(dir.path(), &text)]);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{text}");
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn serve_raises_the_open_files_limit() {
    use std::io::BufRead;
    let dir = tempfile::tempdir().unwrap();
    let text = format!(
        "[[listeners]]\naddr = \"127.0.0.1:0\"\n\n[upstreams.app]\ntargets = [\"127.0.0.1:9\"]\n\n\
         [[routes]]\nname = \"all\"\nupstream = \"app\"\n\n[runtime]\ncache_dir = {:?}\n",
        crate::harness::shared_cache_dir().display().to_string()
    );
    let path = write_config(dir.path(), &text);

    // A soft limit of 256 open files, as some systems still set 1,024.
    let script = format!(
        "ulimit -Sn 256 && exec {} serve --config {path}",
        env!("CARGO_BIN_EXE_edge")
    );
    let mut child = std::process::Command::new("sh")
        .args(["-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = std::io::BufReader::new(child.stdout.take().unwrap());
    let listening = stdout
        .lines()
        .map_while(Result::ok)
        .any(|line| line.starts_with("listening on "));
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).unwrap();
    let _ = child.kill();
    let _ = child.wait();

    assert!(listening, "the node did not start");
    let open_files: Vec<&str> = limits
        .lines()
        .find(|line| line.starts_with("Max open files"))
        .unwrap()
        .split_whitespace()
        .collect();
    // `Max open files SOFT HARD files`.
    assert_eq!(open_files[3], open_files[4], "{limits}");
}

#[test]
fn serve_takes_the_config_as_an_argument() {
    let dir = tempfile::tempdir().unwrap();
    // A taken port stops the node once it has read the config.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let text = VALID.replace("127.0.0.1:0", &taken.local_addr().unwrap().to_string());
    let path = write_config(dir.path(), &text);
    for args in [
        vec!["serve", path.as_str()],
        vec!["serve", "--config", path.as_str()],
    ] {
        let output = edge(&args);
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!output.status.success(), "{args:?}");
        assert!(stderr.contains("cannot listen on"), "{args:?}: {stderr}");
    }
    let both = edge(&["serve", &path, "--config", &path]);
    assert!(!both.status.success());
}

#[test]
fn check_rejects_unusable_access_log_path() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().display().to_string();
    let file = dir.path().join("file");
    std::fs::write(&file, "").unwrap();
    let cases = [
        (
            dir.path().join("missing").join("access.log"),
            format!("the folder {folder}/missing does not exist"),
        ),
        (dir.path().to_owned(), "it is a folder".to_owned()),
        (
            file.join("access.log"),
            format!("{folder}/file is not a folder"),
        ),
    ];
    for (log, reason) in cases {
        let stderr = check_fails(&with_file_outputs(&log));
        let expected = format!(
            "access_log.path: cannot open access_log.path {}: {reason}",
            log.display()
        );
        assert!(stderr.contains(&expected), "{expected:?} not in {stderr}");
    }
    assert_eq!(folder_entries(dir.path()), ["file"]);
}

/// Runs `edge check` on `text` and returns its stderr, asserting failure.
pub(crate) fn check_fails(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let output = edge(&["check", &path]);
    assert!(
        !output.status.success(),
        "check passed on an invalid config"
    );
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        stderr.contains("edge.toml"),
        "the error names the file: {stderr}"
    );
    stderr
}

#[test]
fn check_reports_line_and_field() {
    let unknown_upstream = check_fails(&VALID.replace(
        "upstream = \"users\"\n\n[[routes.workers]]",
        "upstream = \"nope\"\n\n[[routes.workers]]",
    ));
    assert!(
        unknown_upstream.contains(":10: routes[0].upstream: no upstream named \"nope\""),
        "{unknown_upstream}"
    );
    assert!(
        unknown_upstream.contains("(declared: \"users\"); fix the name"),
        "{unknown_upstream}"
    );

    let bad_type = check_fails(&VALID.replace("prefix = \"/users\"", "prefix = 7"));
    assert!(
        bad_type.contains("line 9") && bad_type.contains("prefix"),
        "{bad_type}"
    );

    let no_unit = check_fails(&format!("{VALID}\n[node]\ndrain_timeout = \"20\"\n"));
    assert!(
        no_unit.contains(
            "hint: write a duration as a string with its unit, such as \"50ms\", \"2s\" or \"5min\"; it cannot be negative"
        ),
        "{no_unit}"
    );
    let negative = check_fails(&format!("{VALID}\n[runtime]\nmax_instances = -1\n"));
    assert!(
        negative
            .contains("hint: write a whole number, not negative and not a fraction, such as 10"),
        "{negative}"
    );
    assert!(
        negative.contains("expected a whole number") && !negative.contains("usize"),
        "{negative}"
    );
    let unknown_field = check_fails(&VALID.replace("prefix = \"/users\"", "prefx = \"/users\""));
    assert!(
        unknown_field.contains("unknown field `prefx`"),
        "{unknown_field}"
    );

    let two_paths =
        check_fails(&VALID.replace("prefix = \"/users\"", "prefix = \"/users\"\npath = \"/x\""));
    assert!(
        two_paths.contains("set only one of prefix, path and pattern"),
        "{two_paths}"
    );

    let bad_pattern = check_fails(&VALID.replace("/{device}/home", "/{dev ice}/home"));
    assert!(bad_pattern.contains("routes[1].pattern"), "{bad_pattern}");

    let bad_duration = check_fails(&VALID.replace(
        "add-header.wasm\"",
        "add-header.wasm\"\ncpu_deadline = \"fast\"",
    ));
    assert!(
        bad_duration.contains("line 14") && bad_duration.contains("fast"),
        "{bad_duration}"
    );

    let duplicate = check_fails(&VALID.replace("name = \"home\"", "name = \"users\""));
    assert!(duplicate.contains("already used on line 8"), "{duplicate}");

    let no_listener = check_fails(&VALID.replace("[[listeners]]\naddr = \"127.0.0.1:0\"\n", ""));
    assert!(no_listener.contains("listeners"), "{no_listener}");

    // Listener blocks whose addresses cannot all be bound, and the error.
    let clashes = [
        (
            "[[listeners]]\naddr = \"127.0.0.1:28099\"\n[[listeners]]\naddr = \"127.0.0.1:28099\"\n",
            "listeners[1].addr: 127.0.0.1:28099 clashes with 127.0.0.1:28099",
        ),
        (
            "[[listeners]]\naddr = \"0.0.0.0:28099\"\n[[listeners]]\naddr = \"127.0.0.1:28099\"\n",
            "listeners[1].addr: 127.0.0.1:28099 clashes with 0.0.0.0:28099",
        ),
        (
            "[admin]\naddr = \"127.0.0.1:28098\"\ntoken = \"0123456789abcdef0123\"\n\n\
             [[listeners]]\naddr = \"127.0.0.1:28098\"\n",
            "admin.addr: 127.0.0.1:28098 clashes with 127.0.0.1:28098",
        ),
        (
            "[admin]\naddr = \"[::ffff:127.0.0.1]:28098\"\ntoken = \"0123456789abcdef0123\"\n\n\
             [[listeners]]\naddr = \"127.0.0.1:28098\"\n",
            "admin.addr: [::ffff:127.0.0.1]:28098 clashes with 127.0.0.1:28098",
        ),
        // The default admin address: the error names the [admin] table.
        (
            "[[listeners]]\naddr = \"127.0.0.1:9901\"\n\n[admin]\ntoken = \"0123456789abcdef0123\"\n",
            ":4: admin.addr: 127.0.0.1:9901 clashes with 127.0.0.1:9901",
        ),
    ];
    for (listeners, expected) in clashes {
        let error =
            check_fails(&VALID.replace("[[listeners]]\naddr = \"127.0.0.1:0\"\n", listeners));
        assert!(error.contains(expected), "{error}");
    }
}

#[test]
fn check_rejects_bad_modules_with_reason() {
    let dir = tempfile::tempdir().unwrap();
    let cases: [(&str, &[u8], &str); 5] = [
        ("text.wasm", b"this is not wasm", "not a WebAssembly binary"),
        (
            "short.wasm",
            b"\0asm",
            "4 bytes is too short for its 8-byte header",
        ),
        (
            "core.wasm",
            b"\0asm\x01\0\0\0",
            "core WebAssembly module, not a component",
        ),
        // An empty component: valid, but it exports no handler.
        (
            "empty.wasm",
            b"\0asm\x0d\0\x01\0",
            "does not export the edge:worker@0.1.2 `handler` interface",
        ),
        (
            "broken.wasm",
            b"\0asm\x0d\0\x01\0\x07\x05garbage",
            "invalid component",
        ),
    ];
    for (name, bytes, expected) in cases {
        let module = dir.path().join(name);
        std::fs::write(&module, bytes).unwrap();
        let text = VALID.replace("{modules}/add-header.wasm", &module.display().to_string());
        let stderr = check_fails(&text);
        assert!(stderr.contains(expected), "{name}: {stderr}");
        assert!(
            stderr.contains("routes[0].workers[0]") && stderr.contains(name),
            "{name}: {stderr}"
        );
    }
    let missing = check_fails(&VALID.replace("add-header.wasm", "missing.wasm"));
    assert!(missing.contains("cannot read file"), "{missing}");
    assert!(
        missing.contains("build the worker with `edge worker build CRATE_FOLDER`"),
        "{missing}"
    );
}

#[test]
fn check_reports_worker_config_errors() {
    let text = VALID
        .replace("add-header.wasm", "path-router.wasm")
        .replace(
            "headers = { \"x-a\" = \"1\" }",
            "rules = [{ prefix = \"users\", upstream = \"users\" }]",
        );
    let stderr = check_fails(&text);
    assert!(stderr.contains("routes[0].workers[0]"), "{stderr}");
    assert!(
        stderr.contains("the worker rejected its config"),
        "{stderr}"
    );
    assert!(stderr.contains("rules[0]"), "{stderr}");
}

#[test]
fn check_rejects_invalid_values() {
    let cases = [
        (
            VALID.replace("[[listeners]]", "[node]\nthreads = 0\n\n[[listeners]]"),
            ":2: node.threads",
        ),
        (
            VALID.replace(
                "[[listeners]]",
                "[node]\nname = \"my node\"\n\n[[listeners]]",
            ),
            ":2: node.name",
        ),
        (
            format!("{VALID}\n[runtime]\nmax_memory = \"8GiB\"\n"),
            ":24: runtime.max_memory: 8.0 GiB must be from 64 KiB to 4 GiB",
        ),
        (
            format!("{VALID}\n[runtime]\nmax_instances = 4000000000\n"),
            ":24: runtime.max_instances: must be from 1 to 4096",
        ),
        (
            VALID.replace(
                "module = \"{modules}/add-header.wasm\"",
                "module = \"{modules}/add-header.wasm\"\ncpu_deadline = \"100us\"",
            ),
            ":14: routes[0].workers[0].cpu_deadline: 100us is too short: the deadline is checked \
             every 1ms, so it must be at least that",
        ),
        (
            VALID.replace(
                "headers = { \"x-a\" = \"1\" }",
                &format!("headers = {{ \"x-a\" = \"{}\" }}", "a".repeat(1 << 20)),
            ),
            ":13: routes[0].workers[0].config: 1048598 bytes as JSON is over the 1.0 MiB a \
             worker's config may take",
        ),
        (
            format!("{VALID}\n[runtime.fetch]\nmax_response_body = \"0\"\n"),
            ":24: runtime.fetch.max_response_body: must be more than zero",
        ),
        (
            format!("{VALID}\n[runtime.fetch]\ndefault_timeout = \"2s\"\nmax_timeout = \"1s\"\n"),
            ":25: runtime.fetch.max_timeout: 1s is shorter",
        ),
        (
            format!("{VALID}\n[runtime.fetch]\nmax_wait_per_hook = \"0s\"\n"),
            ":24: runtime.fetch.max_wait_per_hook: must be more than zero",
        ),
        (
            format!("{VALID}\n[runtime.fetch]\n\nmax_requests_per_hook = 0\n"),
            ":25: runtime.fetch.max_requests_per_hook: must be at least 1",
        ),
        (
            VALID.replace(
                "prefix = \"/users\"",
                "prefix = \"/users\"\nhost = \"*example.com\"",
            ),
            "routes[0].host",
        ),
        (
            VALID.replace(
                "prefix = \"/users\"",
                "prefix = \"/users\"\nhost = \"example.com:8080\"",
            ),
            "without a port",
        ),
        (
            VALID.replace(
                "methods = [\"GET\"]\nupstream = \"users\"",
                "methods = [\"GET\"]",
            ),
            "routes[1].upstream: the route has no upstream and no workers",
        ),
        (
            VALID.replace("targets = [\"127.0.0.1:9\"]", "targets = []"),
            ":5: upstreams.users.targets",
        ),
        (
            VALID.replace(
                "targets = [\"127.0.0.1:9\"]",
                "targets = [\"127.0.0.1:9\"]\nconnect_timeout = \"0s\"",
            ),
            ":6: upstreams.users.connect_timeout: must be more than zero",
        ),
        (
            VALID.replace(
                "targets = [\"127.0.0.1:9\"]",
                "targets = [\"127.0.0.1:9\"]\n\nfailure_statuses = [500, 99]",
            ),
            ":7: upstreams.users.failure_statuses: 99 is not an HTTP status",
        ),
        (
            VALID.replace(
                "prefix = \"/users\"",
                "prefix = \"/users\"\ntimeout = \"0s\"",
            ),
            "routes[0].timeout: must be more than zero",
        ),
        (
            VALID.replace(
                "add-header.wasm\"",
                "add-header.wasm\"\nmax_memory = \"0B\"",
            ),
            "routes[0].workers[0].max_memory: 0 bytes is under 64 KiB",
        ),
        (
            format!(
                "{}\n[runtime]\nmax_instances = 4\n",
                VALID.replace(
                    "prefix = \"/users\"",
                    "prefix = \"/users\"\nmax_instances = 5"
                )
            ),
            "routes[0].max_instances: must be from 1 to runtime.max_instances (4)",
        ),
        (
            format!(
                "{VALID}\n[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"0123456789abcdef\"\n\
                 session_timeout = \"0s\"\n"
            ),
            ":26: admin.session_timeout: must be more than zero",
        ),
        (
            VALID.replace("[[listeners]]", "[[listeners]]\nheader_timeout = \"0s\""),
            "listeners[0].header_timeout: must be more than zero",
        ),
        (
            VALID.replace("[[listeners]]", "[[listeners]]\nsend_timeout = \"0s\""),
            "listeners[0].send_timeout: must be more than zero",
        ),
        (
            format!(
                "{VALID}\n[redis]\nurl = \"redis://127.0.0.1:6379\"\nconnect_timeout = \"0s\"\n"
            ),
            ":25: redis.connect_timeout: must be more than zero",
        ),
        (
            VALID.replace("prefix = \"/users\"", "prefix = \"/users\"\nmax_body = -5"),
            "invalid size -5: a size cannot be negative",
        ),
        (
            VALID.replace(
                "prefix = \"/users\"",
                "prefix = \"/users\"\nmax_body = \"-5MiB\"",
            ),
            "invalid size \"-5MiB\": a size cannot be negative",
        ),
        (
            VALID.replace(
                "add-header.wasm\"",
                "add-header.wasm\"\nmax_memory = \"5 potatoes\"",
            ),
            "invalid size \"5 potatoes\": expected a size: a number of bytes, \
             or a string such as \"512KiB\" or \"10MiB\"",
        ),
        (
            format!("{VALID}\n[runtime]\nmax_memory = \"20000PiB\"\n"),
            "invalid size \"20000PiB\": the largest size is 18446744073709551615 bytes",
        ),
        (
            format!("{VALID}\n[runtime]\nmax_memory = \"99999999999999999999\"\n"),
            "invalid size \"99999999999999999999\": the largest size is 18446744073709551615 bytes",
        ),
        (
            format!("{VALID}\n[runtime]\ncache_max_size = \"0.4B\"\n"),
            "invalid size \"0.4B\": 0.4B is not a whole number of bytes",
        ),
        (
            VALID.replace("127.0.0.1:9", "[::1]:99999"),
            "invalid address \"[::1]:99999\": the port must be at most 65535",
        ),
        (
            VALID.replace(
                "addr = \"127.0.0.1:0\"",
                "addr = \"127.0.0.1:0\"\nredirect_https = { port = 0 }",
            ),
            "invalid port 0: the port must be from 1 to 65535",
        ),
        (
            VALID.replace(
                "addr = \"127.0.0.1:0\"",
                "addr = \"127.0.0.1:0\"\nredirect_https = { port = 70000 }",
            ),
            "invalid port 70000: the port must be from 1 to 65535",
        ),
        (
            format!("{VALID}\n[redis]\nurl = \"redis://127.0.0.1:70000\"\n"),
            "redis.url: \"redis://127.0.0.1:70000\" has port 70000; the port must be at most 65535",
        ),
        (
            format!("{VALID}\n[redis]\nurl = \"redis://127.0.0.1:0/0\"\n"),
            "redis.url: \"redis://127.0.0.1:0/0\" has port 0",
        ),
        (
            VALID.replace("127.0.0.1:9", "127.0.0.1:99999"),
            "invalid address \"127.0.0.1:99999\": the port must be at most 65535",
        ),
        (
            format!("{VALID}\n[runtime]\nmax_memory = 1.5\n"),
            "invalid type: floating point `1.5`, expected a size",
        ),
        (
            VALID.replace(
                "targets = [\"127.0.0.1:9\"]",
                "targets = [\"127.0.0.1:9\"]\n\nbreaker = { cool_down = \"1s\", window = \"0s\" }",
            ),
            ":7: upstreams.users.breaker.window: must be more than zero",
        ),
        (
            VALID.replace(
                "targets = [\"127.0.0.1:9\"]",
                "targets = [\"127.0.0.1:9\"]\nretry.budget_percent = 101",
            ),
            ":6: upstreams.users.retry.budget_percent: must be from 0 to 100",
        ),
        (
            VALID.replace("127.0.0.1:9", "localhost:9"),
            "invalid address \"localhost:9\": expected an IP address and a port, \
             such as 127.0.0.1:9000 or [::1]:9000 (host names are not resolved)",
        ),
        (
            VALID.replace("addr = \"127.0.0.1:0\"", "addr = \"127.0.0.1\""),
            "invalid address \"127.0.0.1\": it has no port",
        ),
        (
            VALID.replace("addr = \"127.0.0.1:0\"", "addr = \"[::1]\""),
            "invalid address \"[::1]\": it has no port",
        ),
        (
            VALID.replace("127.0.0.1:9\"", "127.0.0.1:0\""),
            ":5: upstreams.users.targets: 127.0.0.1:0 has port 0, on which no server listens",
        ),
        (
            VALID.replace("add-header.wasm\"", "add-header.wasm\"\nmax_memory = 65535"),
            "routes[0].workers[0].max_memory: 65535 bytes is under 64 KiB",
        ),
    ];
    for (text, expected) in cases {
        let stderr = check_fails(&text);
        assert!(
            stderr.contains(expected),
            "expected {expected:?} in: {stderr}"
        );
    }
}

#[test]
fn check_names_the_pool_under_an_address_limit() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), VALID);
    // 4 GB of address space: less than the instance pool's reservation.
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4000000 && exec {:?} check {path:?}",
            env!("CARGO_BIN_EXE_edge")
        ))
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("runtime.max_instances = 128"), "{stderr}");
    assert!(stderr.contains("ulimit -v"), "{stderr}");

    // A node without workers reserves no instance pool.
    let no_workers = VALID.replace(
        "\n[[routes.workers]]\nmodule = \"{modules}/add-header.wasm\"\n\
         [routes.workers.config]\nheaders = { \"x-a\" = \"1\" }\n",
        "\n",
    );
    assert!(!no_workers.contains("[[routes.workers]]"), "{no_workers}");
    let path = write_config(dir.path(), &no_workers);
    let output = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!(
            "ulimit -v 4000000 && exec {:?} check {path:?}",
            env!("CARGO_BIN_EXE_edge")
        ))
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
}

#[test]
fn module_error_is_reported_once() {
    let stderr = check_fails(&VALID.replace("add-header.wasm", "missing.wasm"));
    assert_eq!(stderr.matches("cannot read file").count(), 1, "{stderr}");
}

#[test]
fn serve_refuses_an_invalid_config() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(
        dir.path(),
        &VALID.replace("targets = [\"127.0.0.1:9\"]", "targets = []"),
    );
    let output = edge(&["serve", "--config", &path]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("upstreams.users.targets: at least one target is required"),
        "{stderr}"
    );
}

#[test]
fn routes_explain_shows_match_and_misses() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), VALID);
    let output = edge(&[
        "routes",
        "explain",
        "--config",
        &path,
        "GET",
        "/x/../users/7",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("normalised to \"/users/7\""), "{stdout}");
    assert!(stdout.contains("matches route \"users\""), "{stdout}");
    assert!(stdout.contains("add-header.wasm"), "{stdout}");
    assert!(
        stdout.contains("pattern /{device}/home does not match /users/7"),
        "{stdout}"
    );

    let output = edge(&[
        "routes",
        "explain",
        "--config",
        &path,
        "POST",
        "/mobile/home",
    ]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("no route matches"), "{stdout}");
    assert!(stdout.contains("method POST is not one of GET"), "{stdout}");
}

#[test]
fn explain_into_a_closed_pipe_ends_quietly() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), VALID);
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["routes", "explain", "--config", &path, "GET", "/users/7"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run edge");
    // The reader goes away before the command writes, as `head` does.
    drop(child.stdout.take());
    let output = child.wait_with_output().expect("wait for edge");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{:?}: {stderr}", output.status);
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// Runs `edge check` on `text` and asserts that it passes.
fn check_passes(text: &str) {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), text);
    let output = edge(&["check", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "check failed: {stderr}");
}

#[test]
fn check_rejects_underscore_limit_header() {
    let limit = "\n[[routes.limits]]\nkey = \"header:x_api_key\"\nalgorithm = \"token_bucket\"\n\
                 rate = \"10/s\"\n";
    let stderr = check_fails(&format!("{VALID}{limit}"));
    assert!(
        stderr.contains("routes[1].limits[0].key: header x_api_key has an underscore"),
        "{stderr}"
    );

    // A listener that keeps such headers lets the limit see them.
    let keeping = VALID.replace(
        "addr = \"127.0.0.1:0\"\n",
        "addr = \"127.0.0.1:0\"\nunderscores_in_headers = true\n",
    );
    check_passes(&format!("{keeping}{limit}"));
}

#[test]
fn check_reads_the_admin_token_file() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("admin.token");
    let config = format!(
        "{VALID}\n[admin]\naddr = \"127.0.0.1:0\"\ntoken_file = \"{}\"\n",
        token_file.display()
    );
    for (contents, expected) in [
        (None, "admin.token_file: cannot read"),
        (Some("short\n"), "must be at least 16 characters"),
        (Some(""), "must be at least 16 characters"),
        (Some("                \n"), "must be at least 16 characters"),
        (
            Some("\u{feff}0123456789abcdef\n"),
            "may hold only visible ASCII characters",
        ),
        (Some("0123456789 abcdef\n"), "it has ' '"),
    ] {
        match contents {
            Some(text) => std::fs::write(&token_file, text).unwrap(),
            None => {
                let _ = std::fs::remove_file(&token_file);
            }
        }
        let stderr = check_fails(&config);
        assert!(stderr.contains(expected), "{contents:?}: {stderr}");
    }
    std::fs::write(&token_file, "0123456789abcdef0123\n").unwrap();
    check_passes(&config);
}

#[test]
fn routes_explain_checks_like_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), VALID);
    let explain = |args: &[&str]| {
        let mut all = vec!["routes", "explain", "--config", &path];
        all.extend_from_slice(args);
        edge(&all)
    };

    let output = explain(&["get", "/mobile/home"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("invalid method \"get\": methods are case-sensitive"),
        "{stderr}"
    );
    assert!(stderr.contains("400 invalid_method"), "{stderr}");

    let output = explain(&["GET", "/users/7", "--host", "a..example.com"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("the Host \"a..example.com\" has an empty label"),
        "{stderr}"
    );
    assert!(stderr.contains("400 invalid_host"), "{stderr}");

    // The config file may come first instead of with --config.
    let output = edge(&["routes", "explain", &path, "GET", "/users/7"]);
    assert!(output.status.success(), "{output:?}");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("matches route \"users\""), "{stdout}");
    let output = edge(&["routes", "explain", "GET", "/users/7"]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("give the config file, the method and the target"),
        "{stderr}"
    );

    // Neither a path nor an absolute URI: hyper rejects such a target.
    for target in ["users/7", "http://exa mple.com/users"] {
        let output = explain(&["GET", target]);
        assert!(!output.status.success(), "{target}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("is not a request target"), "{stderr}");
    }

    // The query is not part of the path a route matches.
    let output = explain(&["GET", "/mobile/home?next=/users"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("matches route \"home\""), "{stdout}");
    assert!(
        stdout.contains("the query \"next=/users\" plays no part in routing"),
        "{stdout}"
    );

    // hyper drops a fragment before the node routes the request.
    let output = explain(&["GET", "/users/7#top"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(stdout.contains("request: GET /users/7\n"), "{stdout}");
    assert!(stdout.contains("matches route \"users\""), "{stdout}");

    // An absolute-form target names its host, as the node reads it.
    let output = explain(&["GET", "http://api.example.com/users/7"]);
    assert!(output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        stdout.contains("request: GET /users/7 (host api.example.com)"),
        "{stdout}"
    );
    assert!(stdout.contains("matches route \"users\""), "{stdout}");

    // With no path, the target is `/`, as the node sends it.
    let output = explain(&["GET", "http://api.example.com?next=1#top"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(output.status.success(), "{stdout}");
    assert!(
        stdout.contains("request: GET / (host api.example.com)"),
        "{stdout}"
    );
}

#[test]
fn worker_new_rejects_names_cargo_rejects() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let cases = [
        ("fn", "it is a Rust keyword"),
        ("self", "it is a Rust keyword"),
        ("test", "conflicts with Rust's built-in test library"),
        ("std", "it is the name of a Rust library"),
        ("edge-sdk", "the name of the guest SDK"),
    ];
    for (name, reason) in cases {
        let output = edge(&["worker", "new", name, "--dir", &root]);
        assert!(!output.status.success(), "{name} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(reason), "{name}: {stderr}");
        assert!(!dir.path().join(name).exists(), "{name} was created");
    }
}

#[test]
fn worker_new_checks_its_sdk_source() {
    use std::os::unix::ffi::OsStrExt as _;

    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let output = edge(&["worker", "new", "a", "--dir", &root, "--sdk-path", &root]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not the guest SDK"), "{stderr}");

    let output = edge(&["worker", "new", "c", "--dir", &root, "--sdk-git", ""]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--sdk-git is empty"), "{stderr}");

    // An SDK folder whose path is not UTF-8 cannot go into Cargo.toml.
    let odd = dir.path().join(std::ffi::OsStr::from_bytes(b"sdk-\xff"));
    std::fs::create_dir(&odd).unwrap();
    std::fs::write(odd.join("Cargo.toml"), "[package]\nname = \"edge-sdk\"\n").unwrap();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_edge"))
        .args(["worker", "new", "d", "--dir", &root, "--sdk-path"])
        .arg(&odd)
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("is not UTF-8"), "{stderr}");
    assert!(!dir.path().join("d").exists(), "the crate was created");

    // A URL with characters TOML escapes still gives a manifest cargo reads.
    let url = "https://example.com/x\u{7f}y\"z";
    let output = edge(&["worker", "new", "b", "--dir", &root, "--sdk-git", url]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let manifest = std::fs::read_to_string(dir.path().join("b/Cargo.toml")).unwrap();
    let manifest: toml::Table = manifest.parse().unwrap();
    assert_eq!(
        manifest["dependencies"]["edge-sdk"]["git"].as_str(),
        Some(url)
    );
}

#[test]
fn worker_new_outside_checkout_absolute_sdk() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let created = edge(&["worker", "new", "far-worker", "--dir", &root]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let manifest = std::fs::read_to_string(dir.path().join("far-worker/Cargo.toml")).unwrap();
    let manifest: toml::Table = manifest.parse().unwrap();
    let path = manifest["dependencies"]["edge-sdk"]["path"]
        .as_str()
        .unwrap();
    assert_eq!(
        std::path::Path::new(path),
        crate::harness::repo_root()
            .join("guest-sdk")
            .canonicalize()
            .unwrap()
    );
}

#[test]
fn worker_build_names_a_missing_folder() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope").display().to_string();
    let output = edge(&["worker", "build", &missing]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("nope not found"), "{stderr}");
}

#[test]
fn demo_names_its_flag_for_a_taken_port() {
    let occupant = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = occupant.local_addr().unwrap().to_string();
    let modules = modules_dir().display().to_string();
    let cases = [
        (
            ["--listen", &addr, "--http-listen", "127.0.0.1:0"],
            "--listen",
        ),
        (
            ["--listen", "127.0.0.1:0", "--http-listen", &addr],
            "--http-listen",
        ),
    ];
    for (flags, flag) in cases {
        let mut args = vec!["demo", "--modules", &modules];
        args.extend(flags);
        let output = edge(&args);
        assert!(!output.status.success());
        // The error comes before the banner of curl lines, not after it.
        let stdout = String::from_utf8_lossy(&output.stdout);
        assert!(!stdout.contains("Try, in another terminal"), "{stdout}");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains(&format!("cannot listen on {addr}")),
            "{stderr}"
        );
        assert!(
            stderr.contains(&format!("or pass {flag} with a free address")),
            "{stderr}"
        );
    }
}

#[test]
fn serve_says_why_it_cannot_listen() {
    let occupant = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = occupant.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    // With an admin listener, which binds first: it must not be announced
    // when the main listener then fails.
    let config = format!(
        "[admin]\naddr = \"127.0.0.1:0\"\ntoken = \"0123456789abcdef0123\"\n\n{}",
        VALID.replace("127.0.0.1:0", &addr)
    );
    let path = write_config(dir.path(), &config);
    let output = edge(&["serve", "--config", &path]);
    assert!(!output.status.success());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(!stdout.contains("listening"), "{stdout}");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr}: Address already in use")),
        "{stderr}"
    );
    assert!(
        stderr.contains("stop it, or change listeners[].addr"),
        "{stderr}"
    );

    // A taken admin address names its own field.
    let config = format!("[admin]\naddr = \"{addr}\"\ntoken = \"0123456789abcdef0123\"\n\n{VALID}");
    let path = write_config(dir.path(), &config);
    let output = edge(&["serve", "--config", &path]);
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains(&format!("cannot listen on {addr} for the admin listener")),
        "{stderr}"
    );
    assert!(stderr.contains("stop it, or change admin.addr"), "{stderr}");
}

#[test]
fn worker_new_relative_sdk_path() {
    let dir = tempfile::tempdir_in(crate::harness::repo_root()).unwrap();
    let root = dir.path().display().to_string();
    let created = edge(&["worker", "new", "near-worker", "--dir", &root]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let crate_dir = dir.path().join("near-worker");
    let manifest = std::fs::read_to_string(crate_dir.join("Cargo.toml")).unwrap();
    let path = manifest
        .lines()
        .find_map(|line| line.strip_prefix("edge-sdk = { path = \""))
        .and_then(|rest| rest.strip_suffix("\" }"))
        .unwrap_or_else(|| panic!("no edge-sdk path dependency in {manifest}"));
    assert!(path.starts_with("../"), "{path}");
    assert_eq!(
        crate_dir.join(path).canonicalize().unwrap(),
        crate::harness::repo_root()
            .join("guest-sdk")
            .canonicalize()
            .unwrap()
    );
}

#[test]
fn worker_new_scaffolds_a_crate_that_builds() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().display().to_string();
    let created = edge(&["worker", "new", "hello-worker", "--dir", &root]);
    assert!(
        created.status.success(),
        "{}",
        String::from_utf8_lossy(&created.stderr)
    );
    let crate_dir = dir.path().join("hello-worker").display().to_string();
    let out = dir.path().join("out").display().to_string();
    let built = edge(&["worker", "build", &crate_dir, "--out", &out]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let module = dir.path().join("out/hello-worker.wasm");
    let bytes = std::fs::read(&module).unwrap();
    assert_eq!(
        &bytes[..8],
        b"\0asm\x0d\0\x01\0",
        "the build output is a component"
    );

    // The new module loads into a node config.
    let text = VALID.replace("{modules}/add-header.wasm", &module.display().to_string());
    let path = write_config(dir.path(), &text);
    let checked = edge(&["check", &path]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    // Without WASI: a component that loads the same way.
    let no_wasi_out = dir.path().join("no-wasi").display().to_string();
    let built = edge(&[
        "worker",
        "build",
        "--no-wasi",
        &crate_dir,
        "--out",
        &no_wasi_out,
    ]);
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );
    let module = dir.path().join("no-wasi/hello-worker.wasm");
    let bytes = std::fs::read(&module).unwrap();
    assert_eq!(&bytes[..8], b"\0asm\x0d\0\x01\0", "a component");
    let text = VALID.replace("{modules}/add-header.wasm", &module.display().to_string());
    let path = write_config(dir.path(), &text);
    let checked = edge(&["check", &path]);
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stderr)
    );

    let again = edge(&["worker", "new", "hello-worker", "--dir", &root]);
    assert!(!again.status.success());
    let stderr = String::from_utf8_lossy(&again.stderr);
    assert!(
        stderr.contains("already exists: choose another name"),
        "{stderr}"
    );
}

#[test]
fn check_rejects_config_without_routes() {
    let listeners_only = VALID.split("[upstreams.users]").next().unwrap_or_default();
    let error = check_fails(listeners_only);
    assert!(
        error.contains("routes: at least one [[routes]] is required"),
        "{error}"
    );
}

#[test]
fn check_rejects_client_auth_without_ca() {
    let config = VALID.replace(
        "addr = \"127.0.0.1:0\"\n",
        "addr = \"127.0.0.1:0\"\n[listeners.tls]\ndev_certificate = true\n\
         client_auth = \"optional\"\n",
    );
    let error = check_fails(&config);
    assert!(
        error.contains(
            ":5: listeners[0].tls.client_auth: client_auth has no effect without client_ca"
        ),
        "{error}"
    );
}

#[test]
fn check_rejects_an_unusable_cache_dir() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("file"), "").unwrap();
    std::os::unix::fs::symlink("missing", dir.path().join("dangling")).unwrap();
    let cases = [
        ("file", "file is not a folder"),
        (
            "dangling",
            "is a symbolic link to a path that does not exist",
        ),
        ("file/below", "file is not a folder"),
        ("/dev/null", "/dev/null is not a folder"),
        ("/", "must name a folder of its own"),
        ("", "must name a folder of its own"),
    ];
    for (cache_dir, expected) in cases {
        let path = if cache_dir.is_empty() || cache_dir.starts_with('/') {
            cache_dir.to_owned()
        } else {
            dir.path().join(cache_dir).display().to_string()
        };
        let config = format!("{VALID}\n[runtime]\ncache_dir = {path:?}\n");
        let stderr = check_fails(&config);
        assert!(stderr.contains(":24: runtime.cache_dir: "), "{stderr}");
        assert!(stderr.contains(expected), "{cache_dir}: {stderr}");
    }
}

#[test]
fn check_takes_the_config_as_serve_does() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), VALID);
    let output = edge(&["check", "--config", &path]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let output = edge(&["check"]);
    assert!(!output.status.success());
}

#[test]
fn check_rejects_a_short_secret() {
    let config = VALID.replace(
        "headers = { \"x-a\" = \"1\" }",
        "headers = { \"x-a\" = \"1\" }\n[routes.workers.secrets]\nsigning = \"e\"",
    );
    let error = check_fails(&config);
    assert!(
        error.contains(
            ":17: routes[0].workers[0].secrets.signing: the value is 1 bytes long; \
             a secret must be at least 8 bytes"
        ),
        "{error}"
    );
}

#[test]
fn check_reports_unset_secret_variable() {
    let config = VALID.replace(
        "headers = { \"x-a\" = \"1\" }",
        "headers = { \"x-a\" = \"1\" }\n[routes.workers.secrets]\n\
         signing = { env = \"EDGE_TEST_UNSET_VARIABLE\" }",
    );
    let error = check_fails(&config);
    assert!(
        error.contains(
            ":17: routes[0].workers[0].secrets.signing: environment variable \
             EDGE_TEST_UNSET_VARIABLE is not set"
        ),
        "{error}"
    );
}

/// VALID with two rate limits on the `home` route (lines 23 to 35).
fn limited(extra: &str) -> String {
    format!(
        "{VALID}\n[[routes.limits]]\nname = \"per-ip\"\nkey = \"ip\"\n\
         algorithm = \"token_bucket\"\nrate = \"10/s\"\nburst = 20\n\n\
         [[routes.limits]]\nkey = \"header:x-api-key\"\nalgorithm = \"sliding_window\"\n\
         rate = \"1000/h\"\nscope = \"global\"\non_redis_error = \"fail_closed\"\n{extra}"
    )
}

const REDIS: &str = "\n[redis]\nurl = \"redis://127.0.0.1:6379\"\n";

#[test]
fn rate_limit_config_errors_name_line_and_field() {
    let no_redis = check_fails(&limited(""));
    assert!(
        no_redis.contains(":31: routes[1].limits[1].scope: a global limit counts in Redis"),
        "{no_redis}"
    );
    let bad_rate = check_fails(&limited(REDIS).replace("\"10/s\"", "\"10 a second\""));
    assert!(
        bad_rate.contains(":27: routes[1].limits[0].rate: \"10 a second\" is not a rate"),
        "{bad_rate}"
    );
    let burst_on_window = check_fails(&limited(&format!("burst = 5\n{REDIS}")));
    assert!(
        burst_on_window.contains("routes[1].limits[1].burst: `burst` applies to token_bucket"),
        "{burst_on_window}"
    );
    let bad_key = check_fails(&limited(REDIS).replace("\"header:x-api-key\"", "\"cookie\""));
    assert!(
        bad_key.contains(":31: routes[1].limits[1].key: \"cookie\" is not a key"),
        "{bad_key}"
    );
    let no_worker =
        check_fails(&limited(REDIS).replace("\"header:x-api-key\"", "\"context:user\""));
    assert!(
        no_worker.contains(
            ":31: routes[1].limits[1].key: no worker on this route can set context value \"user\""
        ),
        "{no_worker}"
    );
    let bad_context_name =
        check_fails(&limited(REDIS).replace("\"header:x-api-key\"", "\"context:User\""));
    assert!(
        bad_context_name.contains("routes[1].limits[1].key: context name \"User\" may contain"),
        "{bad_context_name}"
    );
    let queue_without_mode =
        check_fails(&limited(REDIS).replace("\"token_bucket\"", "\"leaky_bucket\"\nqueue = 5"));
    assert!(
        queue_without_mode.contains("routes[1].limits[0].queue: `queue` needs mode = \"queue\""),
        "{queue_without_mode}"
    );
    let local_lease = check_fails(&limited(REDIS).replace("burst = 20", "burst = 20\nlease = 5"));
    assert!(
        local_lease.contains("routes[1].limits[0].lease: `lease` applies to global limits only"),
        "{local_lease}"
    );
    let window_lease = check_fails(&limited(&format!("lease = 5\n{REDIS}")));
    assert!(
        window_lease.contains("routes[1].limits[1].lease: `lease` applies to token_bucket only"),
        "{window_lease}"
    );
    let big_lease = check_fails(
        &limited(REDIS).replace("burst = 20", "burst = 20\nscope = \"global\"\nlease = 30"),
    );
    assert!(
        big_lease.contains("routes[1].limits[0].lease: must be from 1 to 20, the bucket's burst"),
        "{big_lease}"
    );
    let unknown_algorithm =
        check_fails(&limited(REDIS).replace("\"sliding_window\"", "\"sliding_log\""));
    assert!(
        unknown_algorithm.contains("sliding_log"),
        "{unknown_algorithm}"
    );
    let duplicate = check_fails(&limited(REDIS).replace(
        "key = \"header:x-api-key\"",
        "name = \"per-ip\"\nkey = \"header:x-api-key\"",
    ));
    assert!(
        duplicate.contains("limit name \"per-ip\" is already used on line 25"),
        "{duplicate}"
    );
    let bad_url = check_fails(&limited(
        &REDIS.replace("redis://127.0.0.1:6379", "http://x"),
    ));
    assert!(
        bad_url.contains("redis.url: \"http://x\" is not a Redis URL"),
        "{bad_url}"
    );
    let dir = tempfile::tempdir().unwrap();
    let output = edge(&["check", &write_config(dir.path(), &limited(REDIS))]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn routes_explain_lists_rate_limits() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_config(dir.path(), &limited(REDIS));
    let output = edge(&["routes", "explain", "--config", &path, "GET", "/phone/home"]);
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        stdout.contains(
            "rate limit 1: \"per-ip\", token bucket 10/s, burst 20, per client address, \
             local to this node (up to 100000 keys) (before the workers)"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains(
            "rate limit 2: \"header:x-api-key 1000/h\", sliding window 1000/h (weighted \
             counters), per value of header x-api-key (else per client address), global in \
             Redis; 503 while Redis is unreachable"
        ),
        "{stdout}"
    );
    assert!(
        stdout.contains("redis: redis://127.0.0.1:6379, 20ms timeout"),
        "{stdout}"
    );
    let output = edge(&["routes", "explain", "--config", &path, "GET", "/users/1"]);
    assert!(String::from_utf8_lossy(&output.stdout).contains("rate limits: none"));
}

#[test]
fn check_rejects_worker_config_without_json_form() {
    let cases = [
        (
            "required = { n = nan }",
            "workers[0].config.required.n",
            "NaN",
        ),
        ("limit = inf", "workers[0].config.limit", "infinite"),
        ("days = [1979-05-27]", "workers[0].config.days[0]", "date"),
        (
            "since = 1979-05-27T07:32:00Z",
            "workers[0].config.since",
            "date",
        ),
    ];
    for (value, field, reason) in cases {
        let config = VALID.replace("headers = { \"x-a\" = \"1\" }", value);
        let error = check_fails(&config);
        assert!(error.contains(field), "{value}: {error}");
        assert!(error.contains(reason), "{value}: {error}");
        assert!(error.contains("JSON"), "{value}: {error}");
    }
}

#[test]
fn check_rejects_route_name_with_control_character() {
    let config = VALID.replace("name = \"home\"", "name = \"ho\\u001bme\"");
    let error = check_fails(&config);
    assert!(error.contains("routes[1].name"), "{error}");
    assert!(error.contains("control character"), "{error}");
}
