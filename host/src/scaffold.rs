//! `edge worker new` and `edge worker build`: create a worker crate and
//! build it into a component a config can point at.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context as _};

/// The target a worker crate is built for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerTarget {
    /// `wasm32-wasip2`, which produces components directly. The component
    /// imports the WASI functions that Rust's standard library links.
    Wasi,
    /// `wasm32-unknown-unknown`, linked into a component by rustc's
    /// `wasm-component-ld`: the component imports only the edge interfaces
    /// the worker calls, so a fresh instance costs less, but crates that
    /// need WASI (random numbers, the system clock) do not work.
    NoWasi,
}

impl WorkerTarget {
    /// Returns the rustc target triple.
    pub fn triple(self) -> &'static str {
        match self {
            WorkerTarget::Wasi => "wasm32-wasip2",
            WorkerTarget::NoWasi => "wasm32-unknown-unknown",
        }
    }

    /// Returns the environment that makes `cargo build` produce a component
    /// for this target, as the repository's `.cargo/config.toml` does for its
    /// own workers. wasm-component-ld links it, with a 2 MiB initial memory
    /// that leaves the SDK's allocator free pages after the 1 MiB stack.
    fn build_env(self) -> &'static [(&'static str, &'static str)] {
        match self {
            WorkerTarget::Wasi => &[],
            WorkerTarget::NoWasi => &[
                (
                    "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_LINKER",
                    "wasm-component-ld",
                ),
                (
                    "CARGO_TARGET_WASM32_UNKNOWN_UNKNOWN_RUSTFLAGS",
                    "-C link-arg=--initial-memory=2097152",
                ),
            ],
        }
    }
}

/// The guest SDK in the source tree this binary was built from.
fn default_sdk_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../guest-sdk")
}

/// The source of the guest SDK for a new worker crate.
enum SdkSource<'a> {
    Git(&'a str),
    Path(PathBuf),
}

/// Returns `target` relative to `base` when both absolute paths share a
/// folder below the file system's root, and `None` otherwise.
fn relative_within_tree(target: &Path, base: &Path) -> Option<PathBuf> {
    let target: Vec<_> = target.components().collect();
    let base: Vec<_> = base.components().collect();
    let common = target.iter().zip(&base).take_while(|(a, b)| a == b).count();
    // The first component is the root itself.
    if common < 2 {
        return None;
    }
    let mut relative: PathBuf = base[common..].iter().map(|_| "..").collect();
    relative.extend(&target[common..]);
    Some(relative)
}

/// Returns why cargo rejects `name` as a package name, or why it would not
/// build as a worker, for names that pass the character check.
fn reserved_crate_name(name: &str) -> Option<&'static str> {
    const KEYWORDS: &[&str] = &[
        "abstract", "as", "async", "await", "become", "box", "break", "const", "continue", "crate",
        "do", "dyn", "else", "enum", "extern", "false", "final", "fn", "for", "gen", "if", "impl",
        "in", "let", "loop", "macro", "match", "mod", "move", "mut", "override", "priv", "pub",
        "ref", "return", "self", "static", "struct", "super", "trait", "true", "try", "type",
        "typeof", "unsafe", "unsized", "use", "virtual", "where", "while", "yield",
    ];
    // Cargo treats '-' and '_' in package names as the same character.
    let name = name.replace('-', "_");
    if KEYWORDS.contains(&name.as_str()) {
        return Some("it is a Rust keyword");
    }
    match name.as_str() {
        "test" => Some("it conflicts with Rust's built-in test library"),
        "std" | "core" | "alloc" | "proc_macro" => Some("it is the name of a Rust library"),
        "edge_sdk" => Some("it is the name of the guest SDK the worker depends on"),
        _ => None,
    }
}

/// Returns whether `dir` contains the guest SDK's crate.
fn is_guest_sdk(dir: &Path) -> bool {
    let Ok(manifest) = std::fs::read_to_string(dir.join("Cargo.toml")) else {
        return false;
    };
    let Ok(manifest) = manifest.parse::<toml::Table>() else {
        return false;
    };
    manifest
        .get("package")
        .and_then(|package| package.get("name"))
        .and_then(toml::Value::as_str)
        == Some("edge-sdk")
}

/// Formats `text` as a TOML string.
fn toml_string(text: &str) -> String {
    toml::Value::String(text.to_owned()).to_string()
}

/// Creates a worker crate named `name` in `dir`.
pub fn new_worker(
    name: &str,
    dir: &Path,
    sdk_path: Option<&Path>,
    sdk_git: Option<&str>,
) -> anyhow::Result<()> {
    let valid = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_')
        && name.starts_with(|c: char| c.is_ascii_lowercase());
    if !valid {
        bail!(
            "{name:?} is not a valid crate name; use lower-case letters, digits, '-' and \
             '_', starting with a letter"
        );
    }
    if let Some(reason) = reserved_crate_name(name) {
        bail!("{name:?} cannot name a worker crate: {reason}; choose another name");
    }
    let root = dir.join(name);
    if root.exists() {
        bail!(
            "{} already exists: choose another name, or remove that folder to start over",
            root.display()
        );
    }
    let sdk = match (sdk_path, sdk_git) {
        (_, Some(url)) if url.trim().is_empty() => {
            bail!("--sdk-git is empty; pass the URL of a git repository of Edge")
        }
        (_, Some(url)) => SdkSource::Git(url),
        (path, None) => {
            let path = path.map_or_else(default_sdk_path, Path::to_owned);
            let resolved = std::fs::canonicalize(&path).with_context(|| {
                format!(
                    "guest SDK not found at {}; pass --sdk-path or --sdk-git",
                    path.display()
                )
            })?;
            if !is_guest_sdk(&resolved) {
                bail!(
                    "{} is not the guest SDK: its Cargo.toml does not name the package \
                     edge-sdk; pass the guest-sdk folder of an Edge checkout",
                    path.display()
                );
            }
            if resolved.to_str().is_none() {
                bail!(
                    "the guest SDK's path {} is not UTF-8, which Cargo.toml cannot hold",
                    resolved.display()
                );
            }
            SdkSource::Path(resolved)
        }
    };
    std::fs::create_dir_all(root.join("src"))
        .with_context(|| format!("cannot create {}", root.display()))?;
    let dependency = match sdk {
        SdkSource::Git(url) => format!("edge-sdk = {{ git = {} }}", toml_string(url)),
        SdkSource::Path(path) => {
            let root = std::fs::canonicalize(&root)
                .with_context(|| format!("cannot resolve {}", root.display()))?;
            // A crate inside the SDK's checkout (say, its workers/) gets a
            // relative path, which still works after the checkout moves or
            // is cloned elsewhere. Any other crate gets an absolute path,
            // which still works after the crate moves.
            let inside = path
                .parent()
                .is_some_and(|checkout| root.starts_with(checkout));
            let path = if inside {
                relative_within_tree(&path, &root).unwrap_or(path)
            } else {
                path
            };
            // UTF-8, as checked above, so `display` loses nothing.
            let path = toml_string(&path.display().to_string());
            format!("edge-sdk = {{ path = {path} }}")
        }
    };
    let manifest = format!(
        r#"[package]
name = "{name}"
version = "0.1.0"
edition = "2021"

# Build with `edge worker build PATH-TO-THIS-FOLDER`, run from the folder of
# your edge.toml: it writes modules/{name}.wasm there, a wasm32-wasip2
# component. `--out DIR` writes it elsewhere, and `--no-wasi` builds one that
# imports no WASI.
[lib]
crate-type = ["cdylib"]

[dependencies]
{dependency}

# Speed over size, as the repository's own workers: each request gets a
# fresh instance, and a larger module costs nothing more to instantiate.
[profile.release]
opt-level = 3

# A worker is its own workspace, even inside another project's folder.
[workspace]
"#
    );
    let source = r#"//! A worker: it runs on each request of the routes it is bound to.

use edge_sdk::{export_worker, Action, Request, RequestChanges, Worker};

struct MyWorker;

impl Worker for MyWorker {
    fn on_request(request: Request) -> Action {
        // Respond to requests whose path ends in /hello, such as /users/hello
        // on a route with the prefix /users (a worker sees the whole path),
        // and send the rest on with a header.
        if request.path.ends_with("/hello") {
            return Action::respond(edge_sdk::Response::new(200).body("hello from a worker\n"));
        }
        Action::Continue(RequestChanges::new().set_header("x-my-worker", "seen"))
    }
}

export_worker!(MyWorker);
"#;
    std::fs::write(root.join("Cargo.toml"), manifest)?;
    std::fs::write(root.join("src/lib.rs"), source)?;
    println!("created worker crate {}", root.display());
    println!("build it with: edge worker build {}", root.display());
    Ok(())
}

/// Builds the worker crate at `path` for `target` and copies the component
/// to `out/<crate name>.wasm`.
pub fn build_worker(path: &Path, out: &Path, target: WorkerTarget) -> anyhow::Result<()> {
    let manifest = path.join("Cargo.toml");
    if !path.exists() {
        bail!(
            "{} not found; pass the worker crate's folder",
            path.display()
        );
    }
    if !manifest.exists() {
        bail!(
            "{} has no Cargo.toml; pass the worker crate's folder",
            path.display()
        );
    }
    ensure_target(target.triple())?;
    let metadata = Command::new("cargo")
        .args([
            "metadata",
            "--format-version",
            "1",
            "--no-deps",
            "--manifest-path",
        ])
        .arg(&manifest)
        .output()
        .context("cannot run cargo metadata")?;
    if !metadata.status.success() {
        bail!(
            "cargo metadata failed: {}",
            String::from_utf8_lossy(&metadata.stderr).trim()
        );
    }
    let metadata: serde_json::Value = serde_json::from_slice(&metadata.stdout)?;
    let target_dir = metadata["target_directory"]
        .as_str()
        .context("cargo metadata has no target_directory")?;
    let manifest_path = std::fs::canonicalize(&manifest)?;
    let package = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["manifest_path"].as_str().map(Path::new) == Some(manifest_path.as_path()))
        .context("cargo metadata does not list this crate")?;
    let name = package["name"].as_str().context("package without a name")?;

    let status = Command::new("cargo")
        .args([
            "build",
            "--release",
            "--target",
            target.triple(),
            "--manifest-path",
        ])
        .arg(&manifest)
        .envs(target.build_env().iter().copied())
        .status()
        .context("cannot run cargo build")?;
    if !status.success() {
        bail!("cargo build failed for {}", path.display());
    }
    let artifact = Path::new(target_dir)
        .join(target.triple())
        .join("release")
        .join(format!("{}.wasm", name.replace('-', "_")));
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let destination = out.join(format!("{name}.wasm"));
    std::fs::copy(&artifact, &destination).with_context(|| {
        format!(
            "cannot copy {} to {}; is the crate a cdylib?",
            artifact.display(),
            destination.display()
        )
    })?;
    let size = std::fs::metadata(&destination)?.len();
    println!("built {} ({size} bytes)", destination.display());
    // A config resolves a relative module path from its own folder, which
    // need not be this one.
    let relative_to = match std::env::current_dir() {
        Ok(dir) if destination.is_relative() => format!(" (relative to {})", dir.display()),
        _ => String::new(),
    };
    println!(
        "bind it to a route with: module = {:?}{relative_to}",
        destination.display().to_string()
    );
    Ok(())
}

/// Adds the rustup target `triple` when it is missing.
fn ensure_target(triple: &str) -> anyhow::Result<()> {
    let installed = Command::new("rustup")
        .args(["target", "list", "--installed"])
        .output()
        .with_context(|| {
            format!(
                "cannot run rustup; install Rust with rustup so the {triple} target can be added"
            )
        })?;
    let listed = String::from_utf8_lossy(&installed.stdout);
    if listed.lines().any(|line| line.trim() == triple) {
        return Ok(());
    }
    let status = Command::new("rustup")
        .args(["target", "add", triple])
        .status()
        .context("cannot run rustup")?;
    if !status.success() {
        bail!("rustup target add {triple} failed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sdk_path_is_relative_only_within_one_tree() {
        let relative = |target: &str, base: &str| {
            relative_within_tree(Path::new(target), Path::new(base))
                .map(|path| path.display().to_string())
        };
        assert_eq!(
            relative("/work/edge/guest-sdk", "/work/edge/workers/hello").as_deref(),
            Some("../../guest-sdk")
        );
        assert_eq!(
            relative("/work/edge/guest-sdk", "/work/other/hello").as_deref(),
            Some("../../edge/guest-sdk")
        );
        assert_eq!(relative("/work/edge/guest-sdk", "/tmp/hello"), None);
    }
}
