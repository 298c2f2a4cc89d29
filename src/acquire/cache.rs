//! Content-addressed image cache: `blobs/<blake3>` holds exactly the bytes whose blake3 is the
//! name, `meta/<blake3>.json` says where they came from and when they were last used.
//!
//! Invariants, so that concurrent processes and a hostile directory cannot corrupt it:
//! - a file enters `blobs/` only by an atomic rename of a fsynced temporary file in `tmp/`
//!   whose digest was just checked, followed by a fsync of the directory;
//! - mutations (commit, prune, verify's removals) hold an exclusive `flock` on `lock`;
//! - every open uses `O_NOFOLLOW` and checks for a regular file, so a symlink planted in the
//!   cache is never followed (verify removes it, lookups treat it as absent).

use super::digest::{hash_reader, Digests};
use super::{AcquireError, Result};
use chrono::{DateTime, Utc};
use nix::fcntl::{Flock, FlockArg};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// What the cache knows about one entry.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CacheEntry {
    pub blake3: String,
    #[serde(default)]
    pub(crate) sha256: Option<String>,
    pub(crate) size: u64,
    /// File name as published (`nixos-sd-image-….img.zst`), for display only.
    #[serde(default)]
    pub(crate) name: Option<String>,
    /// Where it came from: a URL or a flake installable.
    #[serde(default)]
    pub(crate) origin: Option<String>,
    /// The published digest that was checked when it entered, if any (`sha256:…`).
    #[serde(default)]
    pub(crate) pinned: Option<String>,
    pub(crate) added: DateTime<Utc>,
    pub(crate) last_used: DateTime<Utc>,
    /// Absolute path of the blob; not stored.
    #[serde(skip)]
    pub path: PathBuf,
}

/// Where an entry came from, recorded when it is committed.
#[derive(Debug, Clone, Default)]
pub struct Origin {
    pub(crate) name: Option<String>,
    pub(crate) origin: Option<String>,
    pub(crate) pinned: Option<String>,
}

/// One problem `verify` found (and fixed by removing the entry).
#[derive(Debug, Clone, Serialize)]
pub struct Problem {
    pub(crate) entry: String,
    pub(crate) problem: String,
    pub(crate) removed: bool,
}

#[derive(Debug, Clone, Default, Serialize)]
pub(crate) struct PruneReport {
    pub(crate) removed: Vec<String>,
    pub(crate) freed_bytes: u64,
    pub(crate) kept: usize,
    pub(crate) kept_bytes: u64,
}

pub struct Cache {
    root: PathBuf,
}

/// An exclusive or shared hold on a lock file; released on drop.
pub(crate) struct LockGuard {
    _lock: Flock<File>,
}

impl LockGuard {
    /// The locked file (to check it is still the one at its path after a wait).
    pub(crate) fn file(&self) -> &File {
        &self._lock
    }
}

/// Where the station keeps images it decoded once for all slots (`station::decoded`):
/// derived data, listed, verified and pruned with the cache.
pub(crate) const DECODED_SUBDIR: &str = "decoded";

/// Paths used to resume one URL's download across runs.
pub(crate) struct Partial {
    pub(crate) data: PathBuf,
    pub(crate) meta: PathBuf,
    pub(crate) lock: PathBuf,
}

/// Validator and size remembered next to a partial download (for If-Range).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct PartialMeta {
    pub(crate) url: String,
    pub(crate) etag: Option<String>,
    pub(crate) last_modified: Option<String>,
    pub(crate) total: Option<u64>,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: &Path) -> Result<Cache> {
        std::fs::create_dir_all(root).map_err(|e| AcquireError::io(root, e))?;
        for sub in ["blobs", "meta", "tmp"] {
            let p = root.join(sub);
            match std::fs::symlink_metadata(&p) {
                Ok(m) if m.file_type().is_dir() => {}
                Ok(_) => {
                    return Err(AcquireError::Cache {
                        path: p.display().to_string(),
                        msg: "is not a directory (a symlink or file was planted here); refusing to use it".into(),
                    })
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    std::fs::DirBuilder::new()
                        .mode(0o755)
                        .create(&p)
                        .or_else(|e| {
                            if e.kind() == std::io::ErrorKind::AlreadyExists {
                                Ok(())
                            } else {
                                Err(e)
                            }
                        })
                        .map_err(|e| AcquireError::io(&p, e))?;
                }
                Err(e) => return Err(AcquireError::io(&p, e)),
            }
        }
        Ok(Cache {
            root: root.to_path_buf(),
        })
    }

    pub(crate) fn tmp_dir(&self) -> PathBuf {
        self.root.join("tmp")
    }

    fn blob_path(&self, b3: &str) -> PathBuf {
        self.root.join("blobs").join(b3)
    }

    fn meta_path(&self, b3: &str) -> PathBuf {
        self.root.join("meta").join(format!("{b3}.json"))
    }

    /// Exclusive lock for mutations of `blobs/` and `meta/`.
    pub(crate) fn lock(&self) -> Result<LockGuard> {
        lock_file(&self.root.join("lock"), true)
    }

    fn lock_shared(&self) -> Result<LockGuard> {
        lock_file(&self.root.join("lock"), false)
    }

    /// The entry with this blake3, if present and sane (regular file of the recorded size).
    /// Contents are trusted here (they were checked on entry); `verify` re-checks them, and
    /// consumers hash what they read anyway.
    pub fn get(&self, b3: &str) -> Result<Option<CacheEntry>> {
        let b3 = b3.to_ascii_lowercase();
        if !is_hex64(&b3) {
            return Ok(None);
        }
        let _l = self.lock_shared()?;
        self.get_locked(&b3)
    }

    fn get_locked(&self, b3: &str) -> Result<Option<CacheEntry>> {
        let blob = self.blob_path(b3);
        let f = match open_nofollow(&blob) {
            Ok(f) => f,
            Err(_) => return Ok(None),
        };
        let Some(size) = regular_size(&f) else {
            return Ok(None);
        };
        let Some(mut meta) = self.read_meta(b3) else {
            return Ok(None);
        };
        if meta.size != size || meta.blake3 != b3 {
            return Ok(None);
        }
        meta.path = blob;
        Ok(Some(meta))
    }

    /// The entry whose recorded sha256 is `sha` (sources that publish only sha256).
    pub(crate) fn find_sha256(&self, sha: &str) -> Result<Option<CacheEntry>> {
        let sha = sha.to_ascii_lowercase();
        let _l = self.lock_shared()?;
        for e in self.list_locked()? {
            if e.sha256.as_deref() == Some(sha.as_str()) {
                return self.get_locked(&e.blake3);
            }
        }
        Ok(None)
    }

    /// Opens an entry's blob for reading, never following a symlink.
    pub fn open_entry(&self, e: &CacheEntry) -> Result<File> {
        let f = open_nofollow(&e.path).map_err(|err| AcquireError::io(&e.path, err))?;
        match regular_size(&f) {
            Some(s) if s == e.size => Ok(f),
            _ => Err(AcquireError::Cache {
                path: e.path.display().to_string(),
                msg: "entry changed under us (run `sbcflash cache verify`)".into(),
            }),
        }
    }

    /// Records that an entry was used now (for `prune --max-size`, least recently used first).
    pub(crate) fn touch(&self, b3: &str) -> Result<()> {
        let _l = self.lock()?;
        if let Some(mut m) = self.read_meta(b3) {
            m.last_used = Utc::now();
            self.write_meta(&m)?;
        }
        Ok(())
    }

    /// A new exclusive temporary file under `tmp/`, for a download or a copy on its way in.
    pub(crate) fn new_tmp(&self, prefix: &str) -> Result<(PathBuf, File)> {
        for i in 0..100u32 {
            let p = self.tmp_dir().join(format!(
                "{prefix}-{}-{}-{i}",
                std::process::id(),
                Utc::now().timestamp_nanos_opt().unwrap_or_default()
            ));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&p)
            {
                Ok(f) => return Ok((p, f)),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(AcquireError::io(&p, e)),
            }
        }
        Err(AcquireError::Cache {
            path: self.tmp_dir().display().to_string(),
            msg: "cannot create a temporary file".into(),
        })
    }

    /// Moves a temporary file whose digests were computed by the caller into the cache.
    /// The caller must have checked the pin; this re-hashes nothing but does fsync + rename.
    pub(crate) fn commit(&self, tmp: &Path, d: &Digests, origin: Origin) -> Result<CacheEntry> {
        let b3 = d.blake3_hex();
        let f = open_nofollow(tmp).map_err(|e| AcquireError::io(tmp, e))?;
        let size = regular_size(&f).ok_or_else(|| AcquireError::Cache {
            path: tmp.display().to_string(),
            msg: "temporary file is not a regular file".into(),
        })?;
        if size != d.len {
            let _ = std::fs::remove_file(tmp);
            return Err(AcquireError::Cache {
                path: tmp.display().to_string(),
                msg: format!("size {size} does not match the {} bytes hashed", d.len),
            });
        }
        f.sync_all().map_err(|e| AcquireError::io(tmp, e))?;
        drop(f);
        let _l = self.lock()?;
        if let Some(mut existing) = self.get_locked(&b3)? {
            // Another process committed the same bytes first: keep theirs.
            let _ = std::fs::remove_file(tmp);
            existing.last_used = Utc::now();
            if existing.sha256.is_none() {
                existing.sha256 = d.sha256.map(hex::encode);
            }
            self.write_meta(&existing)?;
            return Ok(existing);
        }
        let blob = self.blob_path(&b3);
        // rename() replaces a planted symlink itself; it never writes through it.
        std::fs::rename(tmp, &blob).map_err(|e| AcquireError::io(&blob, e))?;
        fsync_dir(&self.root.join("blobs"))?;
        let now = Utc::now();
        let entry = CacheEntry {
            blake3: b3,
            sha256: d.sha256.map(hex::encode),
            size,
            name: origin.name,
            origin: origin.origin,
            pinned: origin.pinned,
            added: now,
            last_used: now,
            path: blob,
        };
        self.write_meta(&entry)?;
        Ok(entry)
    }

    /// Copies `r` into the cache, hashing on the way; `check` sees the digests before the
    /// entry is committed and may refuse it (then nothing is cached).
    pub fn ingest(
        &self,
        r: &mut dyn Read,
        with_sha256: bool,
        origin: Origin,
        check: &dyn Fn(&Digests) -> Result<()>,
    ) -> Result<CacheEntry> {
        let (tmp, f) = self.new_tmp("ingest")?;
        let res = (|| {
            let mut w = HashingWriter {
                inner: std::io::BufWriter::with_capacity(1 << 20, f),
                h: super::digest::Hasher::new(with_sha256),
            };
            std::io::copy(r, &mut w).map_err(|e| AcquireError::io(&tmp, e))?;
            w.inner.flush().map_err(|e| AcquireError::io(&tmp, e))?;
            let d = w.h.finish();
            check(&d)?;
            self.commit(&tmp, &d, origin)
        })();
        if res.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        res
    }

    fn read_meta(&self, b3: &str) -> Option<CacheEntry> {
        let p = self.meta_path(b3);
        let mut f = open_nofollow(&p).ok()?;
        regular_size(&f)?;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        serde_json::from_str(&s).ok()
    }

    fn write_meta(&self, e: &CacheEntry) -> Result<()> {
        let p = self.meta_path(&e.blake3);
        let (tmp, mut f) = self.new_tmp("meta")?;
        let body = serde_json::to_vec_pretty(e).map_err(|err| AcquireError::Cache {
            path: p.display().to_string(),
            msg: err.to_string(),
        })?;
        let r = f
            .write_all(&body)
            .and_then(|_| f.sync_all())
            .and_then(|_| std::fs::rename(&tmp, &p));
        if let Err(err) = r {
            let _ = std::fs::remove_file(&tmp);
            return Err(AcquireError::io(&p, err));
        }
        fsync_dir(&self.root.join("meta"))
    }

    /// All entries with their metadata, most recently used first.
    pub(crate) fn list(&self) -> Result<Vec<CacheEntry>> {
        let _l = self.lock_shared()?;
        self.list_locked()
    }

    fn list_locked(&self) -> Result<Vec<CacheEntry>> {
        let dir = self.root.join("meta");
        let mut out = Vec::new();
        for de in std::fs::read_dir(&dir).map_err(|e| AcquireError::io(&dir, e))? {
            let de = de.map_err(|e| AcquireError::io(&dir, e))?;
            let name = de.file_name().to_string_lossy().to_string();
            let Some(b3) = name.strip_suffix(".json") else {
                continue;
            };
            if !is_hex64(b3) {
                continue;
            }
            if let Some(mut m) = self.read_meta(b3) {
                m.path = self.blob_path(b3);
                out.push(m);
            }
        }
        out.sort_by_key(|e| std::cmp::Reverse(e.last_used));
        Ok(out)
    }

    /// Re-hashes every entry; removes any whose bytes do not match their name, that are not
    /// regular files (planted symlinks), or whose metadata is missing or inconsistent.
    pub fn verify(&self, progress: &mut dyn FnMut(&str, u64)) -> Result<(usize, Vec<Problem>)> {
        let _l = self.lock()?;
        let mut problems = Vec::new();
        let mut ok = 0usize;
        let blobs = self.root.join("blobs");
        let mut names: Vec<String> = std::fs::read_dir(&blobs)
            .map_err(|e| AcquireError::io(&blobs, e))?
            .filter_map(|d| d.ok())
            .map(|d| d.file_name().to_string_lossy().to_string())
            .collect();
        names.sort();
        for name in &names {
            let p = blobs.join(name);
            let problem = self.check_blob(name, &p, progress);
            match problem {
                None => ok += 1,
                Some(problem) => {
                    let removed = remove_quiet(&p) && {
                        if is_hex64(name) {
                            remove_quiet(&self.meta_path(name));
                        }
                        true
                    };
                    problems.push(Problem {
                        entry: name.clone(),
                        problem,
                        removed,
                    });
                }
            }
        }
        // Metadata without a blob: drop it so `list` does not show ghosts.
        let meta = self.root.join("meta");
        for de in std::fs::read_dir(&meta)
            .map_err(|e| AcquireError::io(&meta, e))?
            .flatten()
        {
            let name = de.file_name().to_string_lossy().to_string();
            let stem = name.strip_suffix(".json").unwrap_or(&name).to_string();
            if !names.contains(&stem) {
                let removed = remove_quiet(&de.path());
                problems.push(Problem {
                    entry: name,
                    problem: "metadata without an image".into(),
                    removed,
                });
            }
        }
        if !problems.is_empty() {
            fsync_dir(&blobs)?;
            fsync_dir(&meta)?;
        }
        Ok((ok, problems))
    }

    fn check_blob(
        &self,
        name: &str,
        p: &Path,
        progress: &mut dyn FnMut(&str, u64),
    ) -> Option<String> {
        if !is_hex64(name) {
            return Some("not a cache entry name".into());
        }
        let md = match std::fs::symlink_metadata(p) {
            Ok(m) => m,
            Err(e) => return Some(format!("cannot stat: {e}")),
        };
        if !md.file_type().is_file() {
            return Some(if md.file_type().is_symlink() {
                "is a symlink (not followed)".into()
            } else {
                "is not a regular file".into()
            });
        }
        let mut f = match open_nofollow(p) {
            Ok(f) => f,
            Err(e) => return Some(format!("cannot open: {e}")),
        };
        let Some(meta) = self.read_meta(name) else {
            return Some("metadata missing or unreadable".into());
        };
        progress(name, md.len());
        let want_sha = meta.sha256.is_some();
        let d = match hash_reader(&mut f, want_sha) {
            Ok(d) => d,
            Err(e) => return Some(format!("read error: {e}")),
        };
        if d.blake3_hex() != name {
            return Some(format!(
                "contents hash to blake3 {} (corrupted)",
                d.blake3_hex()
            ));
        }
        if let (Some(want), Some(got)) = (&meta.sha256, d.sha256) {
            if *want != hex::encode(got) {
                return Some("recorded sha256 does not match the contents".into());
            }
        }
        if meta.size != d.len {
            return Some(format!("size {} but metadata says {}", d.len, meta.size));
        }
        None
    }

    /// Removes entries not used within `older_than`, then least recently used ones until the
    /// total is at most `max_size`; also abandoned partial downloads older than `older_than`.
    pub(crate) fn prune(
        &self,
        older_than: Option<Duration>,
        max_size: Option<u64>,
    ) -> Result<PruneReport> {
        let _l = self.lock()?;
        let now = Utc::now();
        let mut entries = self.list_locked()?;
        entries.sort_by_key(|e| e.last_used); // oldest first
        let mut rep = PruneReport::default();
        let mut keep = Vec::new();
        for e in entries {
            let age = (now - e.last_used).to_std().unwrap_or_default();
            if older_than.is_some_and(|o| age > o) {
                self.remove_entry(&e, &mut rep);
            } else {
                keep.push(e);
            }
        }
        let mut total: u64 = keep.iter().map(|e| e.size).sum();
        let mut kept = Vec::new();
        for e in keep {
            if max_size.is_some_and(|m| total > m) {
                total -= e.size;
                self.remove_entry(&e, &mut rep);
            } else {
                kept.push(e);
            }
        }
        rep.kept = kept.len();
        rep.kept_bytes = kept.iter().map(|e| e.size).sum();
        if let Some(o) = older_than {
            self.prune_tmp(o, &mut rep);
        }
        fsync_dir(&self.root.join("blobs"))?;
        fsync_dir(&self.root.join("meta"))?;
        Ok(rep)
    }

    fn remove_entry(&self, e: &CacheEntry, rep: &mut PruneReport) {
        remove_quiet(&self.blob_path(&e.blake3));
        remove_quiet(&self.meta_path(&e.blake3));
        rep.removed.push(e.blake3.clone());
        rep.freed_bytes += e.size;
    }

    fn prune_tmp(&self, older_than: Duration, rep: &mut PruneReport) {
        let Ok(rd) = std::fs::read_dir(self.tmp_dir()) else {
            return;
        };
        for de in rd.flatten() {
            let p = de.path();
            let Ok(md) = std::fs::symlink_metadata(&p) else {
                continue;
            };
            let age = md.modified().ok().and_then(|m| m.elapsed().ok());
            if age.is_none_or(|a| a <= older_than) {
                continue;
            }
            let name = de.file_name().to_string_lossy().to_string();
            // A partial in use is held by its download lock: leave it alone.
            if let Some(stem) = name.strip_suffix(".part") {
                let lock = self.tmp_dir().join(format!("{stem}.lock"));
                if try_lock_file(&lock).is_none() {
                    continue;
                }
            }
            if remove_quiet(&p) {
                rep.removed.push(format!("tmp/{name}"));
                rep.freed_bytes += md.len();
            }
        }
    }

    /// Where a download of `url` keeps its partial data between attempts and runs.
    pub(crate) fn partial(&self, url: &str) -> Partial {
        let key = &blake3::hash(url.as_bytes()).to_hex()[..32];
        let t = self.tmp_dir();
        Partial {
            data: t.join(format!("dl-{key}.part")),
            meta: t.join(format!("dl-{key}.json")),
            lock: t.join(format!("dl-{key}.lock")),
        }
    }
}

impl Partial {
    /// Blocks until no other process downloads the same URL.
    pub(crate) fn lock(&self) -> Result<LockGuard> {
        lock_file(&self.lock, true)
    }

    /// The remembered validator, if it belongs to `url`.
    pub(crate) fn read_meta(&self, url: &str) -> Option<PartialMeta> {
        let mut f = open_nofollow(&self.meta).ok()?;
        regular_size(&f)?;
        let mut s = String::new();
        f.read_to_string(&mut s).ok()?;
        let m: PartialMeta = serde_json::from_str(&s).ok()?;
        (m.url == url).then_some(m)
    }

    pub(crate) fn write_meta(&self, m: &PartialMeta) -> Result<()> {
        let tmp = self.meta.with_extension("json.new");
        let _ = std::fs::remove_file(&tmp);
        let body = serde_json::to_vec(m).unwrap_or_default();
        let r = OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(&tmp)
            .and_then(|mut f| f.write_all(&body))
            .and_then(|_| std::fs::rename(&tmp, &self.meta));
        r.map_err(|e| AcquireError::io(&self.meta, e))
    }

    /// Opens the partial data for appending (created if absent), never through a symlink.
    pub(crate) fn open_data(&self) -> Result<File> {
        let f = open_rw_nofollow(&self.data)?;
        if regular_size(&f).is_none() {
            return Err(AcquireError::Cache {
                path: self.data.display().to_string(),
                msg: "partial download is not a regular file".into(),
            });
        }
        Ok(f)
    }

    pub(crate) fn discard(&self) {
        remove_quiet(&self.data);
        remove_quiet(&self.meta);
    }
}

struct HashingWriter<W: Write> {
    inner: W,
    h: super::digest::Hasher,
}

impl<W: Write> Write for HashingWriter<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.h.update(&buf[..n]);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

pub(crate) fn is_hex64(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// Opens read-only without following a final symlink (ELOOP instead).
pub(crate) fn open_nofollow(p: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
}

fn regular_size(f: &File) -> Option<u64> {
    let m = f.metadata().ok()?;
    (m.file_type().is_file() && m.nlink() >= 1).then_some(m.len())
}

fn remove_quiet(p: &Path) -> bool {
    match std::fs::remove_file(p) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    }
}

fn fsync_dir(p: &Path) -> Result<()> {
    let d = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECTORY | libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| AcquireError::io(p, e))?;
    d.sync_all().map_err(|e| AcquireError::io(p, e))
}

/// Opens `p` read-write, created if absent (mode 0644, not truncated), never through a
/// symlink: partial downloads and lock files.
fn open_rw_nofollow(p: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| AcquireError::io(p, e))
}

/// Blocks until `p` (created if absent) is flocked, shared or exclusive.
pub(crate) fn lock_file(p: &Path, exclusive: bool) -> Result<LockGuard> {
    let f = open_rw_nofollow(p)?;
    let arg = if exclusive {
        FlockArg::LockExclusive
    } else {
        FlockArg::LockShared
    };
    let l = Flock::lock(f, arg).map_err(|(_, e)| AcquireError::io(p, e.into()))?;
    Ok(LockGuard { _lock: l })
}

/// The exclusive flock on `p` if nobody holds it now (never waits).
pub(crate) fn try_lock_file(p: &Path) -> Option<LockGuard> {
    let f = open_rw_nofollow(p).ok()?;
    try_flock(f).ok()?.map(|l| LockGuard { _lock: l })
}

/// The exclusive flock on an open file, if nobody holds it now (never waits): `Ok(None)` when
/// another process does. The one non-blocking flock of the crate (cache entries, the ledger).
pub(crate) fn try_flock(f: File) -> std::io::Result<Option<Flock<File>>> {
    match Flock::lock(f, FlockArg::LockExclusiveNonblock) {
        Ok(l) => Ok(Some(l)),
        Err((_, nix::errno::Errno::EWOULDBLOCK)) => Ok(None),
        Err((_, e)) => Err(e.into()),
    }
}

/// Parses `20G`, `512M`, `1.5T`, `300K`, `123` (bytes; binary multiples, `GiB` also accepted).
pub(crate) fn parse_size(s: &str) -> Result<u64> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: f64 = num
        .parse()
        .map_err(|_| AcquireError::Usage(format!("size {s:?}: expected a number like 20G")))?;
    let mult: u64 = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 1,
        "K" | "KB" | "KIB" => 1 << 10,
        "M" | "MB" | "MIB" => 1 << 20,
        "G" | "GB" | "GIB" => 1 << 30,
        "T" | "TB" | "TIB" => 1 << 40,
        u => {
            return Err(AcquireError::Usage(format!(
                "size {s:?}: unknown unit {u:?} (use K, M, G or T)"
            )))
        }
    };
    Ok((n * mult as f64) as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn put(c: &Cache, bytes: &[u8]) -> CacheEntry {
        c.ingest(&mut &bytes[..], true, Origin::default(), &|_| Ok(()))
            .unwrap()
    }

    #[test]
    fn commit_lookup_verify_prune() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let e = put(&c, b"hello image");
        assert_eq!(e.blake3, blake3::hash(b"hello image").to_hex().as_str());
        assert_eq!(std::fs::read(&e.path).unwrap(), b"hello image");
        assert!(c.get(&e.blake3).unwrap().is_some());
        assert!(c
            .find_sha256(e.sha256.as_deref().unwrap())
            .unwrap()
            .is_some());
        // Same bytes again: one entry.
        put(&c, b"hello image");
        assert_eq!(c.list().unwrap().len(), 1);
        // Corrupt it: verify finds and removes it.
        std::fs::write(&e.path, b"hellO image").unwrap();
        let (ok, probs) = c.verify(&mut |_, _| {}).unwrap();
        assert_eq!(ok, 0);
        assert_eq!(probs.len(), 1);
        assert!(!e.path.exists());
        assert!(c.list().unwrap().is_empty());
        // Prune by size.
        let a = put(&c, &[1u8; 1000]);
        let _b = put(&c, &[2u8; 1000]);
        c.touch(&a.blake3).unwrap();
        let rep = c.prune(None, Some(1500)).unwrap();
        assert_eq!(rep.removed.len(), 1);
        assert!(
            c.get(&a.blake3).unwrap().is_some(),
            "most recently used kept"
        );
        let rep = c.prune(Some(Duration::from_secs(0)), None).unwrap();
        assert_eq!(rep.kept, 0);
    }

    #[test]
    fn planted_symlink_is_not_followed() {
        let d = tempfile::tempdir().unwrap();
        let c = Cache::open(d.path()).unwrap();
        let victim = d.path().join("victim");
        std::fs::write(&victim, b"secret").unwrap();
        let b3 = blake3::hash(b"secret").to_hex().to_string();
        std::os::unix::fs::symlink(&victim, d.path().join("blobs").join(&b3)).unwrap();
        assert!(c.get(&b3).unwrap().is_none());
        let (_, probs) = c.verify(&mut |_, _| {}).unwrap();
        assert!(probs[0].problem.contains("symlink"));
        assert_eq!(std::fs::read(&victim).unwrap(), b"secret");
        assert!(std::fs::symlink_metadata(d.path().join("blobs").join(&b3)).is_err());
        // A symlinked subdirectory is refused outright.
        let d2 = tempfile::tempdir().unwrap();
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(d2.path().join("elsewhere"))
            .unwrap();
        std::os::unix::fs::symlink(d2.path().join("elsewhere"), d2.path().join("blobs")).unwrap();
        assert!(Cache::open(d2.path()).is_err());
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("20G").unwrap(), 20 << 30);
        assert_eq!(parse_size("512MiB").unwrap(), 512 << 20);
        assert_eq!(parse_size("100").unwrap(), 100);
        assert!(parse_size("3X").is_err());
    }
}
