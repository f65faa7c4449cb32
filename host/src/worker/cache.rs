//! The on-disk cache of compiled components.
//!
//! An entry's name is the module's SHA-256 plus a hash of everything a
//! compiled artifact must match to load: the engine's settings and the
//! wasmtime version. A restart, or a second route using the same bytes, loads
//! the entry in well under a millisecond instead of compiling again.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use anyhow::Context as _;
use sha2::{Digest, Sha256};
use wasmtime::component::Component;
use wasmtime::Engine;

/// The folder of compiled components for one engine configuration.
#[derive(Debug)]
pub struct ModuleCache {
    dir: PathBuf,
    /// Identifies the engine settings and wasmtime version.
    engine_key: String,
    /// Whether entries are only read, never written.
    read_only: bool,
}

/// The source of a loaded component.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheOutcome {
    /// Loaded from a cache entry.
    Hit,
    /// Compiled, then written to the cache unless it is read-only.
    Compiled,
}

impl ModuleCache {
    /// Opens (and creates) the cache folder for `engine`.
    pub fn new(dir: PathBuf, engine: &Engine) -> anyhow::Result<ModuleCache> {
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create module cache folder {}", dir.display()))?;
        Ok(ModuleCache {
            dir,
            engine_key: engine_key(engine),
            read_only: false,
        })
    }

    /// Opens the cache folder for `engine` to read entries only: the folder
    /// is not created, and compiled modules are not stored.
    pub fn read_only(dir: PathBuf, engine: &Engine) -> ModuleCache {
        ModuleCache {
            dir,
            engine_key: engine_key(engine),
            read_only: true,
        }
    }

    /// Returns the compiled component for `bytes`, from the cache when an
    /// entry exists and loads, else by compiling and storing it.
    pub fn load(
        &self,
        engine: &Engine,
        bytes: &[u8],
        hash: &str,
    ) -> anyhow::Result<(Component, CacheOutcome)> {
        let entry = self.entry_path(hash);
        if entry.exists() {
            // SAFETY: entries are written only by `store` below from
            // `Component::serialize` of this same engine configuration (the
            // file name includes its compatibility hash), and are replaced
            // atomically by rename, so a reader never sees a partial file.
            #[allow(unsafe_code)]
            let loaded = unsafe { Component::deserialize_file(engine, &entry) };
            match loaded {
                Ok(component) => return Ok((component, CacheOutcome::Hit)),
                Err(error) => tracing::warn!(
                    entry = %entry.display(),
                    error = %format!("{error:#}"),
                    "ignoring unreadable module cache entry"
                ),
            }
        }
        let component = Component::new(engine, bytes)?;
        if self.read_only {
            return Ok((component, CacheOutcome::Compiled));
        }
        if let Err(error) = self.store(&component, &entry) {
            tracing::warn!(
                entry = %entry.display(),
                error = %format!("{error:#}"),
                "failed to write module cache entry"
            );
        }
        Ok((component, CacheOutcome::Compiled))
    }

    fn entry_path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.engine_key))
    }

    fn store(&self, component: &Component, entry: &Path) -> anyhow::Result<()> {
        let bytes = component.serialize()?;
        let temporary = entry.with_extension(format!("tmp{}", std::process::id()));
        std::fs::write(&temporary, bytes)?;
        std::fs::rename(&temporary, entry)?;
        Ok(())
    }
}

/// Returns the part of an entry's name that identifies the engine's
/// compilation settings and wasmtime's version.
fn engine_key(engine: &Engine) -> String {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    engine.precompile_compatibility_hash().hash(&mut hasher);
    format!("{:016x}", hasher.finish())
}

/// Returns the lower-case hex SHA-256 of a module's bytes.
pub fn content_hash(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}
