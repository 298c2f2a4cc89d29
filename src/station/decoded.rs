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

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::image::digest::LogicalHasher;
use crate::image::{Extent, ExtentKind, ExtentSource, ImageError};
use crate::progress::{Event, Reporter};

/// A decoded image in the cache.
#[derive(Debug, Clone)]
pub struct Decoded {
    /// The raw file (holes where the image has zeroes or unmapped ranges).
    pub raw: PathBuf,
    pub extents: Arc<Vec<Extent>>,
    pub blake3: String,
    pub size: u64,
    /// True when this start decoded it (false: found in the cache).
    pub fresh: bool,
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
    })
}

/// Decodes `src` (the opened image whose source file has blake3 `source_blake3`) into `dir`
/// once, or finds it there from an earlier start. Reports a `decode` phase as `job`.
pub fn materialise(
    src: &mut dyn ExtentSource,
    source_blake3: &str,
    dir: &Path,
    rep: &dyn Reporter,
    job: &str,
) -> Result<Decoded, ImageError> {
    if let Some(d) = load(dir, source_blake3) {
        return Ok(d);
    }
    std::fs::create_dir_all(dir).map_err(io_err(dir, "create the decoded-image cache"))?;
    let raw = dir.join(format!("{source_blake3}.raw"));
    let tmp = dir.join(format!(".{source_blake3}.raw.{}", std::process::id()));
    let file = File::create(&tmp).map_err(io_err(&tmp, "create"))?;
    let total = src.size_hint();
    rep.report(Event::Start {
        job: job.into(),
        phase: "decode".into(),
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
                phase: "decode".into(),
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
        phase: "decode".into(),
        summary: serde_json::json!({ "blake3": blake3, "bytes": size, "extents": extents.len() }),
    });
    Ok(Decoded {
        raw,
        extents: Arc::new(extents),
        blake3,
        size,
        fresh: true,
    })
}

/// One job's extent stream over a decoded image: the shared map, `pread`s into the job's
/// own buffer.
pub struct MapSource {
    file: File,
    name: String,
    extents: Arc<Vec<Extent>>,
    size: u64,
    idx: usize,
    /// Offset reached inside `extents[idx]`.
    at: u64,
}

impl MapSource {
    pub fn open(d: &Decoded, name: &str) -> Result<Self, ImageError> {
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
