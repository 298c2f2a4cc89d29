//! The image decoded once for all slots.
//!
//! A compressed or sparse image (`.zst`, `.xz`, Android sparse, …) would otherwise be
//! decompressed by every job, on every unit: N slots cost N decoders' CPU while the cards
//! wait. At station start the image is decoded once into a hole-preserving raw file in the
//! cache, keyed by the blake3 of the source file, next to its extent map (data / zero /
//! unmapped ranges as the decoder found them) and the logical blake3. Every job then reads
//! that file through the map ([`MapSource`]): plain `pread`s served by the page cache shared
//! by all slots, with only the job's own buffers in memory. A raw image needs none of this:
//! jobs read it directly. A later start with the same source file reuses the decoded file;
//! each unit's write is still checked against the logical blake3, so a damaged cache file
//! fails units loudly instead of flashing something else.
//!
//! Lifetime: decoded images are derived data, safe to delete. A station holds a shared flock
//! on `<key>.lock` while it uses one ([`Decoded::hold`]); decoding holds it exclusively.
//! `sbcflash cache list|verify|prune` cover these entries ([`list`], [`verify`], [`prune`]),
//! and never delete one whose lock they cannot take. At start a station keeps one decoded
//! image: it removes those of other sources last used before its own ([`remove_older`]),
//! unless another running station holds them.

use crate::progress::Phase;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::acquire::cache::{lock_file, try_lock_file, LockGuard, Problem, PruneReport};
use crate::image::digest::LogicalHasher;
use crate::image::{Extent, ExtentKind, ExtentSource, ImageError};
use crate::progress::{Event, Reporter};

/// A decoded image in the cache.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The raw file (holes where the image has zeroes or unmapped ranges).
    pub(crate) raw: PathBuf,
    pub(crate) extents: Arc<Vec<Extent>>,
    pub(crate) blake3: String,
    pub(crate) size: u64,
    /// True when this start decoded it (false: found in the cache).
    pub(crate) fresh: bool,
    /// The shared lock that keeps `cache prune` and other stations from deleting it while
    /// this one is alive.
    pub(crate) hold: Option<Arc<Hold>>,
}

/// A shared flock on a decoded image's `<key>.lock`: the image is in use.
pub(crate) struct Hold(#[allow(dead_code)] LockGuard);

impl std::fmt::Debug for Hold {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Hold")
    }
}

fn lock_path(dir: &Path, key: &str) -> PathBuf {
    dir.join(format!("{key}.lock"))
}

/// True when `g` still locks the file at `p` (pruning may have removed the lock file while
/// we waited; a lock on an unlinked file protects nothing).
fn still_there(g: &LockGuard, p: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (g.file().metadata(), std::fs::symlink_metadata(p)) {
        (Ok(a), Ok(b)) => a.dev() == b.dev() && a.ino() == b.ino(),
        _ => false,
    }
}

/// Waits for the lock on the decoded image `key` (shared: using it; exclusive: creating it).
fn hold(dir: &Path, key: &str, exclusive: bool) -> Result<LockGuard, ImageError> {
    let p = lock_path(dir, key);
    loop {
        let g = lock_file(&p, exclusive).map_err(|e| ImageError::Invalid {
            path: p.display().to_string(),
            msg: format!("lock the decoded image: {e}"),
        })?;
        if still_there(&g, &p) {
            return Ok(g);
        }
    }
}

/// The exclusive lock on `key` if no station uses it now.
fn try_hold(dir: &Path, key: &str) -> Option<LockGuard> {
    let p = lock_path(dir, key);
    try_lock_file(&p).filter(|g| still_there(g, &p))
}

#[derive(serde::Serialize, serde::Deserialize)]
struct MapFile {
    source_blake3: String,
    blake3: String,
    size: u64,
    /// `[offset, len, kind]` with kind `d`ata, `z`ero, `s`kip.
    extents: Vec<(u64, u64, char)>,
}

fn kind_char(k: ExtentKind) -> char {
    match k {
        ExtentKind::Data => 'd',
        ExtentKind::Zero => 'z',
        ExtentKind::Skip => 's',
    }
}

fn io_err(p: &Path, what: &str) -> impl Fn(std::io::Error) -> ImageError {
    let path = p.display().to_string();
    let what = what.to_string();
    move |e| ImageError::Invalid {
        path: path.clone(),
        msg: format!("{what}: {e}"),
    }
}

/// Loads the decoded image for the source file with blake3 `source_blake3` from `dir`, if a
/// complete one is there.
fn load(dir: &Path, source_blake3: &str) -> Option<Decoded> {
    let raw = dir.join(format!("{source_blake3}.raw"));
    let text = std::fs::read_to_string(dir.join(format!("{source_blake3}.map.json"))).ok()?;
    let m: MapFile = serde_json::from_str(&text).ok()?;
    let len = std::fs::metadata(&raw).ok()?.len();
    if m.source_blake3 != source_blake3 || len != m.size {
        return None;
    }
    let mut extents = Vec::with_capacity(m.extents.len());
    let mut at = 0;
    for (offset, len, k) in m.extents {
        let kind = match k {
            'd' => ExtentKind::Data,
            'z' => ExtentKind::Zero,
            's' => ExtentKind::Skip,
            _ => return None,
        };
        if offset != at {
            return None;
        }
        at = offset + len;
        extents.push(Extent { offset, len, kind });
    }
    (at == m.size).then(|| Decoded {
        raw,
        extents: Arc::new(extents),
        blake3: m.blake3,
        size: m.size,
        fresh: false,
        hold: None,
    })
}

/// Decodes `src` (the opened image whose source file has blake3 `source_blake3`) into `dir`
/// once, or finds it there from an earlier start (or another station). Reports a `decode`
/// phase as `job`. The result holds the image's shared lock, and its last use is now.
pub fn materialise(
    src: &mut dyn ExtentSource,
    source_blake3: &str,
    dir: &Path,
    rep: &dyn Reporter,
    job: &str,
) -> Result<Decoded, ImageError> {
    std::fs::create_dir_all(dir).map_err(io_err(dir, "create the decoded-image cache"))?;
    let mut fresh = false;
    // Pruning may remove it between our decode and our shared lock: a few tries.
    for _ in 0..3 {
        let shared = hold(dir, source_blake3, false)?;
        if let Some(mut d) = load(dir, source_blake3) {
            touch(&dir.join(format!("{source_blake3}.map.json")));
            d.fresh = fresh;
            d.hold = Some(Arc::new(Hold(shared)));
            return Ok(d);
        }
        drop(shared);
        // Exclusive while decoding: a second station on the same image waits, then finds it.
        let _excl = hold(dir, source_blake3, true)?;
        if load(dir, source_blake3).is_none() {
            decode_into(src, source_blake3, dir, rep, job)?;
            fresh = true;
        }
    }
    Err(ImageError::Invalid {
        path: dir
            .join(format!("{source_blake3}.raw"))
            .display()
            .to_string(),
        msg: "the decoded image keeps disappearing (pruned while this station started?)".into(),
    })
}

/// Marks a decoded image as used now (its map's mtime is its last use).
fn touch(map: &Path) {
    let now = std::time::SystemTime::now();
    if let Ok(f) = std::fs::OpenOptions::new().write(true).open(map) {
        let _ = f.set_modified(now);
    }
}

/// Decodes `src` into `dir` as `<source_blake3>.raw` + `.map.json` (published by renames;
/// the caller holds the exclusive lock).
fn decode_into(
    src: &mut dyn ExtentSource,
    source_blake3: &str,
    dir: &Path,
    rep: &dyn Reporter,
    job: &str,
) -> Result<(), ImageError> {
    let raw = dir.join(format!("{source_blake3}.raw"));
    let tmp = dir.join(format!(".{source_blake3}.raw.{}", std::process::id()));
    let file = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    let total = src.size_hint();
    rep.report(Event::Start {
        job: job.into(),
        phase: Phase::Decode,
        total,
        detail: Some(format!(
            "{} → {} (once for all slots)",
            src.describe(),
            raw.display()
        )),
    });
    let result = (|| {
        let mut buf = crate::write::buffer::AlignedBuf::new(4 << 20);
        let mut h = LogicalHasher::new();
        let mut extents: Vec<Extent> = Vec::new();
        let mut end = 0u64;
        while let Some(e) = src.next_extent(&mut buf)? {
            if e.offset != end {
                return Err(ImageError::Invalid {
                    path: src.describe(),
                    msg: format!(
                        "decoder produced a gap or overlap at offset {} (expected {end})",
                        e.offset
                    ),
                });
            }
            h.update_extent(&e, &buf);
            if e.kind == ExtentKind::Data {
                file.write_all_at(&buf[..e.len as usize], e.offset)
                    .map_err(io_err(&tmp, &format!("write at offset {}", e.offset)))?;
            }
            match extents.last_mut() {
                Some(l) if l.kind == e.kind => l.len += e.len,
                _ => extents.push(e),
            }
            end = e.end();
            rep.report(Event::Progress {
                job: job.into(),
                phase: Phase::Decode,
                done: end,
                total,
            });
        }
        // The holes at the end count: the file has the image's full logical length.
        file.set_len(end).map_err(io_err(&tmp, "set length"))?;
        file.sync_all().map_err(io_err(&tmp, "sync"))?;
        Ok((h.finalize().to_hex().to_string(), end, extents))
    })();
    let (blake3, size, extents) = match result {
        Ok(v) => v,
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            return Err(e);
        }
    };
    let map = MapFile {
        source_blake3: source_blake3.to_string(),
        blake3: blake3.clone(),
        size,
        extents: extents
            .iter()
            .map(|e| (e.offset, e.len, kind_char(e.kind)))
            .collect(),
    };
    let map_path = dir.join(format!("{source_blake3}.map.json"));
    let map_tmp = dir.join(format!(".{source_blake3}.map.json.{}", std::process::id()));
    let text = serde_json::to_string(&map).unwrap_or_default();
    let publish = std::fs::write(&map_tmp, text)
        .and_then(|_| std::fs::rename(&tmp, &raw))
        .and_then(|_| std::fs::rename(&map_tmp, &map_path));
    if let Err(e) = publish {
        let _ = std::fs::remove_file(&tmp);
        let _ = std::fs::remove_file(&map_tmp);
        return Err(io_err(&map_path, "publish the decoded image")(e));
    }
    rep.report(Event::Finish {
        job: job.into(),
        phase: Phase::Decode,
        summary: serde_json::json!({ "blake3": blake3, "bytes": size, "extents": extents.len() }),
    });
    Ok(())
}

/// One decoded image in the cache, as `sbcflash cache list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub(crate) struct Entry {
    /// blake3 of the source file it was decoded from (its name in `decoded/`).
    pub(crate) source_blake3: String,
    pub(crate) raw: PathBuf,
    /// Logical size and blake3 (None: incomplete or damaged map).
    pub(crate) size: Option<u64>,
    pub(crate) blake3: Option<String>,
    /// Bytes it takes on disk (the raw file is sparse): what pruning frees.
    pub(crate) disk_bytes: u64,
    pub(crate) last_used: chrono::DateTime<chrono::Utc>,
    /// A running station holds it.
    pub(crate) in_use: bool,
}

/// What is in `dir` besides complete entries: temporaries of a decode (`.<key>.raw.<pid>`)
/// and lock files.
struct Scan {
    keys: std::collections::BTreeSet<String>,
    temps: Vec<(PathBuf, String)>,
    locks: Vec<String>,
}

fn scan(dir: &Path) -> Result<Scan, ImageError> {
    let mut out = Scan {
        keys: Default::default(),
        temps: Vec::new(),
        locks: Vec::new(),
    };
    let rd = match std::fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(io_err(dir, "list the decoded-image cache")(e)),
    };
    let hex = crate::acquire::cache::is_hex64;
    for de in rd.flatten() {
        let name = de.file_name().to_string_lossy().to_string();
        if let Some(rest) = name.strip_prefix('.') {
            let key = rest.split('.').next().unwrap_or("");
            if hex(key) {
                out.temps.push((de.path(), key.to_string()));
            }
            continue;
        }
        let Some((stem, ext)) = name.split_once('.') else {
            continue;
        };
        if !hex(stem) {
            continue;
        }
        match ext {
            "raw" | "map.json" => {
                out.keys.insert(stem.to_string());
            }
            "lock" => out.locks.push(stem.to_string()),
            _ => {}
        }
    }
    Ok(out)
}

fn disk_bytes(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::symlink_metadata(p).map_or(0, |m| m.blocks() * 512)
}

fn entry(dir: &Path, key: &str) -> Entry {
    let raw = dir.join(format!("{key}.raw"));
    let map = dir.join(format!("{key}.map.json"));
    let loaded = load(dir, key);
    let last_used = [&map, &raw]
        .iter()
        .find_map(|p| std::fs::symlink_metadata(p).and_then(|m| m.modified()).ok())
        .map_or_else(chrono::Utc::now, chrono::DateTime::<chrono::Utc>::from);
    Entry {
        source_blake3: key.to_string(),
        size: loaded.as_ref().map(|d| d.size),
        blake3: loaded.map(|d| d.blake3),
        disk_bytes: disk_bytes(&raw) + disk_bytes(&map),
        raw,
        last_used,
        in_use: try_hold(dir, key).is_none(),
    }
}

/// The decoded images in `dir`, most recently used first.
pub(crate) fn list(dir: &Path) -> Result<Vec<Entry>, ImageError> {
    let mut v: Vec<Entry> = scan(dir)?.keys.iter().map(|k| entry(dir, k)).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.last_used));
    Ok(v)
}

/// Deletes the decoded image `key` unless a station holds it; true if it is gone.
fn remove(dir: &Path, key: &str) -> bool {
    let Some(_g) = try_hold(dir, key) else {
        return false;
    };
    let gone = |p: PathBuf| match std::fs::remove_file(p) {
        Ok(()) => true,
        Err(e) => e.kind() == std::io::ErrorKind::NotFound,
    };
    // The lock file last, while we still hold it: a waiter then sees it was replaced.
    gone(dir.join(format!("{key}.map.json")))
        && gone(dir.join(format!("{key}.raw")))
        && gone(lock_path(dir, key))
}

/// `cache prune` for decoded images: removes those not used within `older_than`, then the
/// least recently used until they take at most `max_bytes` on disk; never one in use. With
/// `older_than`, also temporaries of decodes that died and unused lock files.
pub(crate) fn prune(
    dir: &Path,
    older_than: Option<std::time::Duration>,
    max_bytes: Option<u64>,
) -> Result<PruneReport, ImageError> {
    let now = chrono::Utc::now();
    let mut entries = list(dir)?;
    entries.sort_by_key(|e| e.last_used); // oldest first
    let mut rep = PruneReport::default();
    let mut keep = Vec::new();
    for e in entries {
        let age = (now - e.last_used).to_std().unwrap_or_default();
        if older_than.is_some_and(|o| age > o) && remove(dir, &e.source_blake3) {
            rep.removed.push(format!("decoded/{}", e.source_blake3));
            rep.freed_bytes += e.disk_bytes;
        } else {
            keep.push(e);
        }
    }
    let mut total: u64 = keep.iter().map(|e| e.disk_bytes).sum();
    for e in keep {
        if max_bytes.is_some_and(|m| total > m) && remove(dir, &e.source_blake3) {
            total -= e.disk_bytes;
            rep.removed.push(format!("decoded/{}", e.source_blake3));
            rep.freed_bytes += e.disk_bytes;
        } else {
            rep.kept += 1;
            rep.kept_bytes += e.disk_bytes;
        }
    }
    if let Some(o) = older_than {
        let s = scan(dir)?;
        for (p, key) in s.temps {
            let age = std::fs::symlink_metadata(&p)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|m| m.elapsed().ok());
            // A decode in progress holds the exclusive lock.
            if age.is_some_and(|a| a > o) && try_hold(dir, &key).is_some() {
                let bytes = disk_bytes(&p);
                if std::fs::remove_file(&p).is_ok() {
                    let name = p.file_name().map(|n| n.to_string_lossy().to_string());
                    rep.removed
                        .push(format!("decoded/{}", name.unwrap_or_default()));
                    rep.freed_bytes += bytes;
                }
            }
        }
        for key in s.locks.iter().filter(|k| !s.keys.contains(*k)) {
            remove(dir, key);
        }
    }
    Ok(rep)
}

/// At station start, with `current` (just used) in hand: removes the decoded images of other
/// sources last used before it, except those another running station holds. Returns their
/// source digests.
pub(crate) fn remove_older(dir: &Path, current: &str) -> Result<Vec<String>, ImageError> {
    let entries = list(dir)?;
    let Some(now) = entries.iter().find(|e| e.source_blake3 == current) else {
        return Ok(Vec::new());
    };
    let cutoff = now.last_used;
    Ok(entries
        .iter()
        .filter(|e| e.source_blake3 != current && e.last_used < cutoff && !e.in_use)
        .filter(|e| remove(dir, &e.source_blake3))
        .map(|e| e.source_blake3.clone())
        .collect())
}

/// `cache verify` for decoded images: re-hashes each through its map against the recorded
/// logical blake3; removes damaged or incomplete ones unless a station holds them.
pub(crate) fn verify(
    dir: &Path,
    progress: &mut dyn FnMut(&str, u64),
) -> Result<(usize, Vec<Problem>), ImageError> {
    let mut ok = 0;
    let mut problems = Vec::new();
    for key in scan(dir)?.keys {
        let name = format!("decoded/{key}");
        let problem = match load(dir, &key) {
            None => Some(
                "incomplete or damaged (map missing or unreadable, or the size differs)"
                    .to_string(),
            ),
            Some(d) => {
                progress(&name, d.size);
                let mut buf = crate::write::buffer::AlignedBuf::new(4 << 20);
                match MapSource::open(&d, &name)
                    .and_then(|mut s| crate::image::digest::hash_source(&mut s, &mut buf))
                {
                    Ok((h, _)) if h.to_hex().as_str() == d.blake3 => None,
                    Ok((h, _)) => Some(format!(
                        "contents hash to blake3 {} but the map says {} (corrupted)",
                        h.to_hex(),
                        d.blake3
                    )),
                    Err(e) => Some(format!("read error: {e}")),
                }
            }
        };
        match problem {
            None => ok += 1,
            Some(p) => {
                let removed = remove(dir, &key);
                problems.push(Problem {
                    entry: name,
                    problem: if removed {
                        p
                    } else {
                        format!("{p}; in use by a running station")
                    },
                    removed,
                });
            }
        }
    }
    Ok((ok, problems))
}

/// One job's extent stream over a decoded image: the shared map, `pread`s into the job's
/// own buffer.
pub(crate) struct MapSource {
    file: File,
    name: String,
    extents: Arc<Vec<Extent>>,
    size: u64,
    idx: usize,
    /// Offset reached inside `extents[idx]`.
    at: u64,
}

impl MapSource {
    pub(crate) fn open(d: &Decoded, name: &str) -> Result<Self, ImageError> {
        Ok(MapSource {
            file: File::open(&d.raw).map_err(io_err(&d.raw, "open the decoded image"))?,
            name: format!("{name} (decoded once: {})", d.raw.display()),
            extents: d.extents.clone(),
            size: d.size,
            idx: 0,
            at: 0,
        })
    }
}

impl ExtentSource for MapSource {
    fn size_hint(&self) -> Option<u64> {
        Some(self.size)
    }
    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        let Some(e) = self.extents.get(self.idx).copied() else {
            return Ok(None);
        };
        let offset = e.offset + self.at;
        let left = e.len - self.at;
        let len = match e.kind {
            ExtentKind::Data => left.min(buf.len() as u64),
            _ => left,
        };
        if e.kind == ExtentKind::Data {
            self.file
                .read_exact_at(&mut buf[..len as usize], offset)
                .map_err(|err| ImageError::Invalid {
                    path: self.name.clone(),
                    msg: format!("read at offset {offset}: {err}"),
                })?;
        }
        self.at += len;
        if self.at == e.len {
            self.idx += 1;
            self.at = 0;
        }
        Ok(Some(Extent {
            offset,
            len,
            kind: e.kind,
        }))
    }
    fn describe(&self) -> String {
        self.name.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::usb::flash::MemSource;

    #[test]
    fn decode_once_then_every_job_streams_the_same_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let mut data = vec![0u8; 3 << 20];
        data[100..5000].fill(7);
        data[(2 << 20) + 1..(2 << 20) + 4097].fill(9);
        let want = blake3::hash(&data).to_hex().to_string();
        let rec = crate::progress::Recorder::default();
        let d = materialise(
            &mut MemSource::new("x", data.clone()),
            "abc",
            dir.path(),
            &rec,
            "station",
        )
        .unwrap();
        assert!(d.fresh);
        assert_eq!(d.blake3, want);
        assert_eq!(d.size, data.len() as u64);
        // Holes stay holes: far fewer blocks than the logical size.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(&d.raw).unwrap().blocks() * 512;
        assert!(blocks < data.len() as u64 / 2, "{blocks}");
        // A second start finds it.
        let again = materialise(
            &mut MemSource::new("x", Vec::new()),
            "abc",
            dir.path(),
            &rec,
            "station",
        )
        .unwrap();
        assert!(!again.fresh);
        assert_eq!(again.blake3, want);
        // A job's stream, with a small buffer, rebuilds the image exactly.
        let mut s = MapSource::open(&again, "x").unwrap();
        let mut buf = vec![0u8; 1000];
        let mut out = vec![0xffu8; data.len()];
        let mut end = 0;
        while let Some(e) = s.next_extent(&mut buf).unwrap() {
            assert_eq!(e.offset, end);
            let r = e.offset as usize..e.end() as usize;
            match e.kind {
                ExtentKind::Data => out[r].copy_from_slice(&buf[..e.len as usize]),
                _ => out[r].fill(0),
            }
            end = e.end();
        }
        assert_eq!(end, data.len() as u64);
        assert!(out == data);
    }

    #[test]
    fn damaged_map_is_decoded_again() {
        let dir = tempfile::tempdir().unwrap();
        let rec = crate::progress::Recorder::default();
        let data = vec![5u8; 70_000];
        materialise(
            &mut MemSource::new("x", data.clone()),
            "k",
            dir.path(),
            &rec,
            "s",
        )
        .unwrap();
        std::fs::write(dir.path().join("k.map.json"), "{").unwrap();
        let d = materialise(&mut MemSource::new("x", data), "k", dir.path(), &rec, "s").unwrap();
        assert!(d.fresh);
    }
}
