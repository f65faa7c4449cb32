//! The on-disk cache of compiled components.
//!
//! An entry's name is the module's SHA-256 plus a hash of everything a
//! compiled artifact must match to load: the engine's settings and the
//! wasmtime version. A restart, or a second route using the same bytes, loads
//! the entry in well under a millisecond instead of compiling again.
//!
//! An entry is native code that the node runs outside the WebAssembly
//! sandbox, and wasmtime 48 checks only its layout and engine header, not
//! its code. So each entry ends with a SHA-256 of its compiled bytes and of
//! the module's hash. An entry that was damaged, cut short or copied from
//! another module's fails that check, and the module is compiled again.
//! Entries are read into memory, not mapped, so a file changed while the
//! node runs cannot fault it. The folder is created for the node's user
//! only. Anyone who can write to it can still write a valid entry of their
//! own, so it must be writable only by that user.
//!
//! Each module version, and each wasmtime version or engine setting, adds
//! entries. A starting node keeps the cache within its retention. An entry
//! read or written counts as used then: its modification time is set. Once
//! the node serves, it removes the entries no node used within the
//! retention's age, then the least recently used until the rest fit its
//! size. Entries the node itself loaded are never removed.

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::io::Write as _;
use std::os::unix::fs::{DirBuilderExt as _, MetadataExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime};

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
    /// The limits of [`ModuleCache::prune`].
    retention: Retention,
    /// The entries this node loaded or wrote, which pruning keeps.
    in_use: Mutex<HashSet<PathBuf>>,
}

/// How much of the cache a node keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// The total size of the entries; the least recently used go first.
    pub max_size: u64,
    /// Entries not used for longer than this are removed.
    pub max_age: Duration,
}

impl Default for Retention {
    /// 1 GiB, and 30 days.
    fn default() -> Self {
        Retention {
            max_size: 1 << 30,
            max_age: Duration::from_secs(30 * 86_400),
        }
    }
}

/// The entries one [`ModuleCache::prune`] removed and kept, and their sizes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub removed: usize,
    pub removed_bytes: u64,
    pub kept: usize,
    pub kept_bytes: u64,
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
    pub fn new(dir: PathBuf, engine: &Engine, retention: Retention) -> anyhow::Result<ModuleCache> {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&dir)
            .with_context(|| format!("cannot create module cache folder {}", dir.display()))?;
        warn_if_shared(&dir);
        Ok(ModuleCache {
            dir,
            engine_key: engine_key(engine),
            read_only: false,
            retention,
            in_use: Mutex::default(),
        })
    }

    /// Opens the cache folder for `engine` to read entries only: the folder
    /// is not created, and compiled modules are not stored.
    pub fn read_only(dir: PathBuf, engine: &Engine) -> ModuleCache {
        warn_if_shared(&dir);
        ModuleCache {
            dir,
            engine_key: engine_key(engine),
            read_only: true,
            retention: Retention {
                max_size: u64::MAX,
                max_age: Duration::MAX,
            },
            in_use: Mutex::default(),
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
        match read_entry(&entry, hash, bytes.len()) {
            Ok(Some(compiled)) => {
                // SAFETY: `read_entry` checked the entry's digest, so these
                // are the bytes that `store` wrote from `Component::serialize`
                // of this module, for this engine configuration (the file
                // name includes its compatibility hash). The folder must be
                // writable only by the node's user (see the module docs).
                #[allow(unsafe_code)]
                let loaded = unsafe { Component::deserialize(engine, compiled) };
                match loaded {
                    Ok(component) => {
                        self.note_use(&entry, true);
                        return Ok((component, CacheOutcome::Hit));
                    }
                    Err(error) => tracing::warn!(
                        entry = %entry.display(),
                        error = %format!("{error:#}"),
                        "ignoring unreadable module cache entry"
                    ),
                }
            }
            Ok(None) => {}
            Err(error) => tracing::warn!(
                entry = %entry.display(),
                error = %format!("{error:#}"),
                "ignoring unreadable module cache entry"
            ),
        }
        let component = Component::new(engine, bytes)?;
        if self.read_only {
            return Ok((component, CacheOutcome::Compiled));
        }
        match self.store(&component, &entry, hash) {
            Ok(()) => self.note_use(&entry, false),
            Err(error) => tracing::warn!(
                entry = %entry.display(),
                error = %format!("{error:#}"),
                "failed to write module cache entry"
            ),
        }
        Ok((component, CacheOutcome::Compiled))
    }

    /// Records that this node uses `entry`, and when `touch` is set, sets its
    /// modification time to now: pruning takes it as the time of last use.
    fn note_use(&self, entry: &Path, touch: bool) {
        if self.read_only {
            return;
        }
        if touch {
            let touched = std::fs::File::options()
                .write(true)
                .open(entry)
                .and_then(|file| file.set_modified(SystemTime::now()));
            if let Err(error) = touched {
                tracing::warn!(
                    entry = %entry.display(),
                    %error,
                    "cannot record the use of a module cache entry; pruning may remove it early"
                );
            }
        }
        self.in_use
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(entry.to_owned());
    }

    /// Removes the entries not used within the retention's age, then the
    /// least recently used of the rest until all fit its size. Keeps the
    /// entries this node loaded or wrote, and every file that is not an
    /// entry. Does nothing to a read-only cache.
    pub fn prune(&self) -> Pruned {
        let mut pruned = Pruned::default();
        if self.read_only {
            return pruned;
        }
        remove_stale_temporaries(&self.dir);
        let Ok(files) = std::fs::read_dir(&self.dir) else {
            return pruned;
        };

        let in_use = self
            .in_use
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let now = SystemTime::now();
        let user = rustix::process::geteuid().as_raw();
        let mut own_bytes = 0;
        // Entries that may go: path, size, time of last use.
        let mut candidates = Vec::new();
        for file in files.flatten() {
            if !file.file_name().to_str().is_some_and(is_entry_name) {
                continue;
            }
            let Ok(metadata) = std::fs::symlink_metadata(file.path()) else {
                continue;
            };
            // Files of other users are not this node's to remove, and loading
            // never trusts them anyway.
            if !metadata.is_file() || metadata.uid() != user {
                continue;
            }
            let path = file.path();
            if in_use.contains(&path) {
                pruned.kept += 1;
                own_bytes += metadata.len();
                continue;
            }
            let modified = metadata.modified().ok();
            candidates.push((path, metadata.len(), last_use(modified, now), modified));
        }

        // Oldest last use first.
        candidates.sort_by_key(|&(_, _, used, _)| used);
        pruned.kept_bytes = own_bytes;
        let mut total = own_bytes + candidates.iter().map(|&(_, len, _, _)| len).sum::<u64>();
        for (path, len, used, modified) in candidates {
            let age = now.duration_since(used).unwrap_or(Duration::ZERO);
            if age <= self.retention.max_age && total <= self.retention.max_size {
                pruned.kept += 1;
                pruned.kept_bytes += len;
                continue;
            }
            match std::fs::remove_file(&path) {
                Ok(()) => {
                    if pruned.removed < NAMED_REMOVALS {
                        // Unknown for a time ahead of the clock.
                        let unused_secs = modified
                            .and_then(|modified| now.duration_since(modified).ok())
                            .map_or_else(|| "unknown".to_owned(), |age| age.as_secs().to_string());
                        tracing::info!(
                            entry = %path.display(),
                            unused_secs = %unused_secs,
                            bytes = len,
                            "removed a module cache entry"
                        );
                    }
                    pruned.removed += 1;
                    pruned.removed_bytes += len;
                    total -= len;
                }
                Err(error) => {
                    tracing::warn!(entry = %path.display(), %error, "cannot remove a module cache entry");
                    pruned.kept += 1;
                    pruned.kept_bytes += len;
                }
            }
        }

        if pruned.removed > 0 {
            tracing::info!(
                folder = %self.dir.display(),
                removed = pruned.removed,
                removed_bytes = pruned.removed_bytes,
                kept = pruned.kept,
                kept_bytes = pruned.kept_bytes,
                "pruned the module cache"
            );
        }
        if own_bytes > self.retention.max_size {
            tracing::warn!(
                folder = %self.dir.display(),
                own_bytes,
                max_size = self.retention.max_size,
                "the module cache's entries of this node's own modules exceed \
                 runtime.cache_max_size; raise it"
            );
        }
        pruned
    }

    fn entry_path(&self, hash: &str) -> PathBuf {
        self.dir.join(format!("{hash}-{}.cwasm", self.engine_key))
    }

    fn store(&self, component: &Component, entry: &Path, hash: &str) -> anyhow::Result<()> {
        let mut bytes = component.serialize()?;
        let digest = entry_digest(&bytes, hash);
        bytes.extend_from_slice(&digest);
        bytes.extend_from_slice(ENTRY_MAGIC);
        // A random part keeps two nodes in separate PID namespaces, which
        // share a cache folder, from writing the same temporary file.
        let temporary = entry.with_extension(format!(
            "tmp{}-{:016x}",
            std::process::id(),
            fastrand::u64(..)
        ));
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&temporary)
            .and_then(|mut file| file.write_all(&bytes))
            .and_then(|()| std::fs::rename(&temporary, entry));
        if written.is_err() {
            let _ = std::fs::remove_file(&temporary);
        }
        Ok(written?)
    }
}

/// The age after which pruning removes a temporary file of `store`: older
/// than any write that may still be under way.
const STALE_TEMPORARY_AGE: std::time::Duration = std::time::Duration::from_secs(3600);

/// Removes the temporary files that writes which failed or were cut short
/// (a full disk, a killed node) left in the cache folder.
fn remove_stale_temporaries(dir: &Path) {
    let Ok(files) = std::fs::read_dir(dir) else {
        return;
    };
    let user = rustix::process::geteuid().as_raw();
    for file in files.flatten() {
        let name = file.file_name();
        if !name.to_str().is_some_and(is_temporary_name) {
            continue;
        }
        let Ok(metadata) = std::fs::symlink_metadata(file.path()) else {
            continue;
        };
        // Another user's file is not this node's to remove.
        if !metadata.is_file() || metadata.uid() != user {
            continue;
        }
        let age = metadata
            .modified()
            .ok()
            .and_then(|modified| modified.elapsed().ok());
        if age.is_none_or(|age| age < STALE_TEMPORARY_AGE) {
            continue;
        }
        match std::fs::remove_file(file.path()) {
            Ok(()) => {
                tracing::info!(file = %file.path().display(), "removed a stale module cache temporary file")
            }
            Err(error) => tracing::warn!(
                file = %file.path().display(),
                %error,
                "cannot remove a stale module cache temporary file"
            ),
        }
    }
}

/// Returns whether `name` is that of a temporary file of `store`: a module
/// hash, a dash, the engine key, `.tmp`, the writer's process id, a dash and
/// 16 hex digits.
fn is_temporary_name(name: &str) -> bool {
    let Some((stem, writer)) = name.split_once(".tmp") else {
        return false;
    };
    let Some((pid, random)) = writer.split_once('-') else {
        return false;
    };
    is_entry_stem(stem)
        && !pid.is_empty()
        && pid.bytes().all(|b| b.is_ascii_digit())
        && random.len() == 16
        && random
            .bytes()
            .all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// Returns whether `name` is that of an entry: a module hash, a dash, the
/// engine key and `.cwasm`.
fn is_entry_name(name: &str) -> bool {
    name.strip_suffix(".cwasm").is_some_and(is_entry_stem)
}

/// Returns whether `stem` is a module hash, a dash and an engine key, in
/// lower-case hex as the node writes them.
fn is_entry_stem(stem: &str) -> bool {
    let Some((hash, key)) = stem.split_once('-') else {
        return false;
    };
    let hex = |text: &str, len: usize| {
        text.len() == len && text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    };
    hex(hash, 64) && hex(key, 16)
}

/// The removals that one prune logs by name; the summary counts the rest.
const NAMED_REMOVALS: usize = 16;

/// How far ahead of the clock a modification time may be and still count as
/// a time of use: nodes that share a folder over a network disagree a little.
const CLOCK_SLACK: Duration = Duration::from_secs(3600);

/// Returns an entry's time of last use from its modification time. A time
/// further ahead than [`CLOCK_SLACK`] (a clock that was wrong, a copy from
/// such a host) is unknown and counts as the oldest, so that such an entry
/// goes first instead of never.
fn last_use(modified: Option<SystemTime>, now: SystemTime) -> SystemTime {
    match modified {
        Some(time) if time <= now + CLOCK_SLACK => time.min(now),
        _ => SystemTime::UNIX_EPOCH,
    }
}

/// Warns when another user could replace the cache folder's entries: when
/// the folder, or a folder above it, is writable by others without the
/// sticky bit, or the folder belongs to another user.
fn warn_if_shared(dir: &Path) {
    let Ok(dir) = std::fs::canonicalize(dir) else {
        return;
    };
    let user = rustix::process::geteuid().as_raw();
    let Ok(metadata) = std::fs::metadata(&dir) else {
        return;
    };
    let problem = if metadata.uid() != user {
        Some(dir.clone())
    } else {
        // The sticky bit (as on /tmp) keeps others from renaming what they
        // do not own.
        dir.ancestors().find_map(|folder| {
            let metadata = std::fs::metadata(folder).ok()?;
            let mode = metadata.mode();
            (mode & 0o022 != 0 && mode & 0o1000 == 0).then(|| folder.to_owned())
        })
    };
    if let Some(folder) = problem {
        tracing::warn!(
            folder = %folder.display(),
            cache = %dir.display(),
            "another user can replace the module cache's entries, and so make the node run \
             code of their own; keep the cache folder and the folders above it writable only \
             by the node's user"
        );
    }
}

/// Returns the largest entry that the cache reads for a module of
/// `module_len` bytes. Compiled code is a few times the size of its module at
/// most; the bound keeps a huge file from being read whole into memory.
fn max_entry_len(module_len: usize) -> u64 {
    (module_len as u64)
        .saturating_mul(16)
        .saturating_add(64 << 20)
}

/// The end of every entry, after its digest.
const ENTRY_MAGIC: &[u8; 16] = b"edge-cwasm-v1\0\0\0";

/// Returns the SHA-256 that binds an entry's compiled bytes to the module
/// whose hash is `hash`.
fn entry_digest(compiled: &[u8], hash: &str) -> [u8; 32] {
    let mut digest = Sha256::new();
    digest.update(compiled);
    digest.update(hash.as_bytes());
    digest.finalize().into()
}

/// Reads the cache entry at `path` of the module whose hash is `hash`.
/// Returns its compiled bytes when it is intact, `None` when there is no
/// entry, and an error saying why an entry cannot be used.
fn read_entry(path: &Path, hash: &str, module_len: usize) -> anyhow::Result<Option<Vec<u8>>> {
    let metadata = match std::fs::metadata(path) {
        Ok(metadata) => metadata,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(error) => return Err(error.into()),
    };
    // A FIFO or a device would block the read or never end.
    anyhow::ensure!(metadata.is_file(), "not a regular file");
    // The digest has no key, so an entry that another user could have
    // written is not trusted, whatever it contains.
    anyhow::ensure!(
        metadata.uid() == rustix::process::geteuid().as_raw(),
        "it belongs to another user"
    );
    anyhow::ensure!(metadata.mode() & 0o022 == 0, "other users can write to it");
    anyhow::ensure!(
        metadata.len() <= max_entry_len(module_len),
        "it is {} bytes, far more than its module's {module_len} bytes compile to",
        metadata.len()
    );
    let mut bytes = std::fs::read(path)?;
    let trailer = 32 + ENTRY_MAGIC.len();
    anyhow::ensure!(
        bytes.len() > trailer && bytes.ends_with(ENTRY_MAGIC),
        "it lacks the end marker: it was cut short, or written by another edge version"
    );
    let compiled_len = bytes.len() - trailer;
    let digest = entry_digest(&bytes[..compiled_len], hash);
    anyhow::ensure!(
        bytes[compiled_len..compiled_len + 32] == digest,
        "its digest does not match: the entry is damaged or belongs to another module"
    );
    bytes.truncate(compiled_len);
    Ok(Some(bytes))
}

/// Checks that `dir` is a folder, or that it can be created, without
/// creating or changing anything. Returns the reason when the node could not
/// use it.
pub fn check_dir(dir: &Path) -> Result<(), String> {
    use rustix::fs::{accessat, Access, AtFlags, CWD};

    match std::fs::metadata(dir) {
        Ok(metadata) if metadata.is_dir() => return Ok(()),
        Ok(_) => return Err(format!("{} is not a folder", dir.display())),
        // NotADirectory: a part of the path is a file, reported below.
        Err(error)
            if !matches!(
                error.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(format!("cannot read {}: {error}", dir.display()));
        }
        Err(_) => {}
    }
    if std::fs::symlink_metadata(dir).is_ok() {
        return Err(format!(
            "{} is a symbolic link to a path that does not exist",
            dir.display()
        ));
    }
    // The node creates the missing folders below the nearest one that exists.
    let existing = dir
        .ancestors()
        .skip(1)
        .map(|folder| {
            if folder.as_os_str().is_empty() {
                Path::new(".")
            } else {
                folder
            }
        })
        .find(|folder| std::fs::symlink_metadata(folder).is_ok())
        .unwrap_or(Path::new("/"));
    if !existing.is_dir() {
        return Err(format!(
            "cannot create {}: {} is not a folder",
            dir.display(),
            existing.display()
        ));
    }
    accessat(
        CWD,
        existing,
        Access::WRITE_OK | Access::EXEC_OK,
        AtFlags::EACCESS,
    )
    .map_err(|error| {
        format!(
            "cannot create {}: the folder {} does not allow it ({})",
            dir.display(),
            existing.display(),
            std::io::Error::from(error)
        )
    })
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

#[cfg(test)]
mod tests {
    use super::*;

    const HASH: &str = "b974e40ce42045c7c5a442d790b895bba4612a18a133febfcbef99772d06cfb3";

    const KEEP_ALL: Retention = Retention {
        max_size: u64::MAX,
        max_age: Duration::MAX,
    };

    /// Writes an entry of `len` bytes for the module hash that ends in
    /// `last`, last used `age` ago.
    fn entry(dir: &Path, last: char, len: usize, age: Duration) -> PathBuf {
        let hash = format!("{}{last}", &HASH[..63]);
        let path = dir.join(format!("{hash}-9251c85941f77eeb.cwasm"));
        std::fs::write(&path, vec![0; len]).unwrap();
        let file = std::fs::File::options().write(true).open(&path).unwrap();
        file.set_modified(SystemTime::now() - age).unwrap();
        path
    }

    #[test]
    fn prune_removes_stale_then_least_used() {
        let dir = tempfile::tempdir().unwrap();
        let day = Duration::from_secs(86_400);
        let retention = Retention {
            max_size: 2_500,
            max_age: 30 * day,
        };
        let cache = ModuleCache::new(dir.path().to_owned(), &Engine::default(), retention).unwrap();
        let own = entry(dir.path(), '0', 1_000, 60 * day);
        cache.note_use(&own, true);
        let stale = entry(dir.path(), '1', 10, 31 * day);
        let least_recent = entry(dir.path(), '2', 1_000, 3 * day);
        let recent = entry(dir.path(), '3', 1_000, day);
        let other = dir.path().join("notes.cwasm");
        std::fs::write(&other, vec![0; 10_000]).unwrap();
        let upper = dir
            .path()
            .join(format!("{}-9251C85941F77EEB.cwasm", HASH.to_uppercase()));
        std::fs::write(&upper, vec![0; 10]).unwrap();

        let pruned = cache.prune();
        assert!(
            own.exists(),
            "an entry the node uses is kept, whatever its age"
        );
        assert!(
            !stale.exists(),
            "an entry unused for longer than the age goes"
        );
        assert!(
            !least_recent.exists(),
            "the least recently used goes to fit the size"
        );
        assert!(recent.exists());
        assert!(other.exists(), "files that are not entries are kept");
        assert!(upper.exists(), "names the node does not write are kept");
        assert_eq!(
            pruned,
            Pruned {
                removed: 2,
                removed_bytes: 1_010,
                kept: 2,
                kept_bytes: 2_000
            }
        );
        let used = std::fs::metadata(&own).unwrap().modified().unwrap();
        assert!(
            used.elapsed().unwrap() < day,
            "a loaded entry counts as used now"
        );
    }

    #[test]
    fn modification_times_ahead_count_as_oldest() {
        let now = SystemTime::now();
        let hour = Duration::from_secs(3600);
        assert_eq!(last_use(Some(now - hour), now), now - hour);
        // A little ahead, as a node with a clock a few minutes fast writes.
        assert_eq!(last_use(Some(now + hour / 2), now), now);
        assert_eq!(last_use(Some(now + 48 * hour), now), SystemTime::UNIX_EPOCH);
        assert_eq!(last_use(None, now), SystemTime::UNIX_EPOCH);
    }

    #[test]
    fn prune_skips_read_only_cache() {
        let dir = tempfile::tempdir().unwrap();
        let stale = entry(dir.path(), '1', 10, Duration::from_secs(86_400 * 400));
        let cache = ModuleCache::read_only(dir.path().to_owned(), &Engine::default());
        cache.note_use(&stale, true);
        assert_eq!(cache.prune(), Pruned::default());
        assert!(stale.exists());
        let used = std::fs::metadata(&stale).unwrap().modified().unwrap();
        assert!(used.elapsed().unwrap() > Duration::from_secs(86_400));
    }

    #[test]
    fn prune_removes_stale_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let old = dir
            .path()
            .join(format!("{HASH}-9251c85941f77eeb.tmp7211-00000000000000ff"));
        let fresh = dir
            .path()
            .join(format!("{HASH}-9251c85941f77eeb.tmp7212-00000000000000fe"));
        let entry = dir.path().join(format!("{HASH}-9251c85941f77eeb.cwasm"));
        let other = dir.path().join("notes.tmp1");
        for path in [&old, &fresh, &entry, &other] {
            std::fs::write(path, b"x").unwrap();
        }
        let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
        for path in [&old, &entry, &other] {
            let file = std::fs::File::options().write(true).open(path).unwrap();
            file.set_modified(two_hours_ago).unwrap();
        }

        let cache = ModuleCache::new(dir.path().to_owned(), &Engine::default(), KEEP_ALL).unwrap();
        assert!(old.exists(), "opening the cache removes nothing");
        cache.prune();
        assert!(!old.exists(), "a stale temporary file is removed");
        assert!(fresh.exists(), "a write that may be under way is kept");
        assert!(entry.exists(), "entries are kept");
        assert!(other.exists(), "files of other programs are kept");
    }
}
