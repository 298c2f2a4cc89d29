//! The `.bmap` sidecar: which blocks of a raw image are mapped, and their checksums.
//!
//! Why not `bmap-parser` (0.2.3): it only knows format 2.x with sha256, so 1.3 files (sha1
//! range checksums, `BmapFileSHA1`) and 1.0–1.2 files (no checksums) are rejected; it
//! panics (`unwrap()`, `unimplemented!`, integer underflow) on a malformed range or a range
//! past `ImageSize`, which a tool reading untrusted downloads must not do; it does not verify
//! the bmap file's own checksum; and its errors name no line. This parser follows bmaptool 3.6
//! (`BmapCopy.py`): 1.0–1.2 no checksums, 1.3 `sha1` attributes + `BmapFileSHA1`, 1.4/2.x
//! `ChecksumType` + `chksum` attributes + `BmapFileChecksum`; the file checksum is computed over
//! the file with the checksum text replaced by as many `0` characters.

use super::ImageError;
use quick_xml::events::Event;
use sha1::Digest as _;
use std::path::{Path, PathBuf};

/// The range checksum algorithm of a bmap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksumKind {
    /// Format 1.0–1.2: ranges carry no checksum.
    None,
    Sha1,
    Sha256,
}

impl ChecksumKind {
    fn hex_len(self) -> usize {
        match self {
            ChecksumKind::None => 0,
            ChecksumKind::Sha1 => 40,
            ChecksumKind::Sha256 => 64,
        }
    }

    pub(crate) fn name(self) -> &'static str {
        match self {
            ChecksumKind::None => "none",
            ChecksumKind::Sha1 => "sha1",
            ChecksumKind::Sha256 => "sha256",
        }
    }
}

/// A mapped range, in bytes of the logical image: `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BmapRange {
    pub(crate) first_block: u64,
    pub(crate) last_block: u64,
    pub start: u64,
    pub end: u64,
    /// Lower-case hex, `None` if the bmap carries no checksum for this range.
    pub checksum: Option<String>,
}

#[derive(Debug, Clone)]
pub struct Bmap {
    /// Where it came from, for messages.
    pub(crate) path: PathBuf,
    pub(crate) version: String,
    pub image_size: u64,
    pub checksum: ChecksumKind,
    pub ranges: Vec<BmapRange>,
}

/// An incremental range checksum.
pub(crate) enum RangeHasher {
    None,
    Sha1(sha1::Sha1),
    Sha256(sha2::Sha256),
}

impl RangeHasher {
    pub(crate) fn new(kind: ChecksumKind) -> Self {
        match kind {
            ChecksumKind::None => RangeHasher::None,
            ChecksumKind::Sha1 => RangeHasher::Sha1(sha1::Sha1::new()),
            ChecksumKind::Sha256 => RangeHasher::Sha256(sha2::Sha256::new()),
        }
    }

    pub(crate) fn update(&mut self, b: &[u8]) {
        match self {
            RangeHasher::None => {}
            RangeHasher::Sha1(h) => h.update(b),
            RangeHasher::Sha256(h) => h.update(b),
        }
    }

    /// Lower-case hex of the digest; empty for `None`.
    pub(crate) fn finish_hex(self) -> String {
        match self {
            RangeHasher::None => String::new(),
            RangeHasher::Sha1(h) => hex::encode(h.finalize()),
            RangeHasher::Sha256(h) => hex::encode(h.finalize()),
        }
    }
}

/// Checks a bmap's range checksums over the logical extent stream, away from the thread that
/// produces it: the write pipeline feeds it the same in-order extents as its blake3 hasher, on
/// a thread of its own, so sha256 never sits on the decompress/scan critical path. Obtained
/// from [`super::ExtentSource::take_range_checker`]; the source then no longer checks itself.
pub struct RangeChecker {
    image: String,
    bmap: String,
    kind: ChecksumKind,
    ranges: Vec<BmapRange>,
    /// Index of the first range not yet finished.
    next: usize,
    /// Logical offset reached.
    pos: u64,
    open: Option<RangeHasher>,
}

impl RangeChecker {
    pub(crate) fn new(image: &str, bmap: &Bmap) -> Self {
        RangeChecker {
            image: image.to_string(),
            bmap: bmap.path.display().to_string(),
            kind: bmap.checksum,
            ranges: bmap.ranges.clone(),
            next: 0,
            pos: 0,
            open: None,
        }
    }

    /// Feed the next extent (`data` = its bytes for `Data`, ignored otherwise: `Zero` and
    /// `Skip` count as zero bytes). Fails at the end of the first range whose checksum differs.
    pub(crate) fn update_extent(
        &mut self,
        ext: &super::Extent,
        data: &[u8],
    ) -> Result<(), ImageError> {
        use super::zero::{ZEROS, ZEROS_LEN};
        if ext.offset != self.pos {
            return Err(ImageError::Invalid {
                path: self.image.clone(),
                msg: format!(
                    "range checker got an extent at {}, expected {}",
                    ext.offset, self.pos
                ),
            });
        }
        let end = ext.end();
        while self.pos < end {
            let Some(r) = self.ranges.get(self.next) else {
                self.pos = end;
                break;
            };
            if r.checksum.is_none() || self.kind == ChecksumKind::None {
                self.next += 1;
                continue;
            }
            if self.pos < r.start {
                self.pos = r.start.min(end);
                continue;
            }
            let stop = r.end.min(end);
            let h = self.open.get_or_insert_with(|| RangeHasher::new(self.kind));
            match ext.kind {
                super::ExtentKind::Data => {
                    let a = (self.pos - ext.offset) as usize;
                    let b = (stop - ext.offset) as usize;
                    h.update(&data[a..b]);
                }
                _ => {
                    let mut n = stop - self.pos;
                    while n > 0 {
                        let k = n.min(ZEROS_LEN as u64) as usize;
                        h.update(&ZEROS[..k]);
                        n -= k as u64;
                    }
                }
            }
            self.pos = stop;
            if stop == r.end {
                let got = self
                    .open
                    .take()
                    .map(RangeHasher::finish_hex)
                    .unwrap_or_default();
                if let Some(want) = &r.checksum {
                    if *want != got {
                        return Err(ImageError::RangeChecksum {
                            path: self.image.clone(),
                            bmap: self.bmap.clone(),
                            start: r.start,
                            end: r.end,
                            expected: format!("{want} (blocks {}-{})", r.first_block, r.last_block),
                            actual: got,
                        });
                    }
                }
                self.next += 1;
            }
        }
        Ok(())
    }

    /// After the last extent: every checksummed range must have been seen whole.
    pub(crate) fn finish(&self) -> Result<(), ImageError> {
        match self.ranges[self.next.min(self.ranges.len())..]
            .iter()
            .find(|r| r.checksum.is_some() && self.kind != ChecksumKind::None)
        {
            Some(r) => Err(ImageError::Corrupt {
                path: self.image.clone(),
                offset: self.pos,
                msg: format!(
                    "image ended at {} before bmap range {}..{} was complete",
                    self.pos, r.start, r.end
                ),
            }),
            None => Ok(()),
        }
    }
}

/// A `<Range>` as read: attributes, text, line.
type RawRange = (Vec<(String, String)>, String, usize);

impl Bmap {
    /// Read, parse and check a bmap file (including its own checksum when it has one).
    pub fn load(path: &Path) -> Result<Bmap, ImageError> {
        let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&bytes, path)
    }

    /// Parse bmap XML; `path` is only used in messages.
    // Longer than 150 lines on purpose: one pass over the XML events with the element
    // being read as local state, then the checks of what was read; the format versions
    // differ only in a few branches of that pass.
    pub fn parse(bytes: &[u8], path: &Path) -> Result<Bmap, ImageError> {
        let name = path.display().to_string();
        let text = std::str::from_utf8(bytes).map_err(|e| ImageError::Corrupt {
            path: name.clone(),
            offset: e.valid_up_to() as u64,
            msg: "bmap file is not UTF-8 text".into(),
        })?;
        let line_of = |pos: u64| -> usize {
            let p = (pos as usize).min(text.len());
            text.as_bytes()[..p].iter().filter(|&&c| c == b'\n').count() + 1
        };
        let invalid = |line: Option<usize>, msg: String| ImageError::Invalid {
            path: name.clone(),
            msg: match line {
                Some(l) => format!("line {l}: {msg}"),
                None => msg,
            },
        };

        let mut r = quick_xml::Reader::from_str(text);
        let mut stack: Vec<String> = Vec::new();
        let mut version: Option<String> = None;
        let mut fields: Vec<(String, String, usize)> = Vec::new(); // (tag, text, line)
                                                                   // Range being read: (attributes, text, line)
        let mut range: Option<RawRange> = None;
        let mut raw_ranges: Vec<RawRange> = Vec::new();
        loop {
            let pos = r.buffer_position();
            let ev = r
                .read_event()
                .map_err(|e| invalid(Some(line_of(r.error_position())), format!("bad XML: {e}")))?;
            match ev {
                Event::Start(e) | Event::Empty(e) if stack.is_empty() => {
                    if e.name().as_ref() != b"bmap" {
                        return Err(invalid(
                            Some(line_of(pos)),
                            "root element is not <bmap>".into(),
                        ));
                    }
                    for a in e.attributes() {
                        let a = a.map_err(|e| invalid(Some(line_of(pos)), e.to_string()))?;
                        if a.key.as_ref() == b"version" {
                            let v = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .map_err(|e| invalid(Some(line_of(pos)), e.to_string()))?;
                            version = Some(v.trim().to_string());
                        }
                    }
                    stack.push("bmap".into());
                }
                Event::Start(e) => {
                    let tag = String::from_utf8_lossy(e.name().as_ref()).to_string();
                    if tag == "Range" && stack.last().map(String::as_str) == Some("BlockMap") {
                        let mut attrs = Vec::new();
                        for a in e.attributes() {
                            let a = a.map_err(|e| invalid(Some(line_of(pos)), e.to_string()))?;
                            let v = a
                                .normalized_value(quick_xml::XmlVersion::Implicit1_0)
                                .map_err(|e| invalid(Some(line_of(pos)), e.to_string()))?;
                            attrs.push((
                                String::from_utf8_lossy(a.key.as_ref()).to_string(),
                                v.trim().to_string(),
                            ));
                        }
                        range = Some((attrs, String::new(), line_of(pos)));
                    } else if stack.len() == 1 {
                        fields.push((tag.clone(), String::new(), line_of(pos)));
                    }
                    stack.push(tag);
                }
                Event::Text(t) => {
                    let s = t
                        .decode()
                        .map_err(|e| invalid(Some(line_of(pos)), e.to_string()))?;
                    if let Some((_, txt, _)) = range.as_mut() {
                        txt.push_str(&s);
                    } else if stack.len() == 2 {
                        if let Some((_, txt, _)) = fields.last_mut() {
                            txt.push_str(&s);
                        }
                    }
                }
                Event::End(_) => {
                    if let Some(tag) = stack.pop() {
                        if tag == "Range" {
                            if let Some(rg) = range.take() {
                                raw_ranges.push(rg);
                            }
                        }
                    }
                }
                Event::Eof => break,
                _ => {}
            }
        }

        let version = version.ok_or_else(|| invalid(None, "no <bmap version=...>".into()))?;
        let (major, minor) = version
            .split_once('.')
            .and_then(|(a, b)| Some((a.parse::<u32>().ok()?, b.parse::<u32>().ok()?)))
            .ok_or_else(|| invalid(None, format!("bad bmap version {version:?}")))?;
        if major > 2 {
            return Err(invalid(
                None,
                format!("bmap format version {version} is not supported (up to 2.x)"),
            ));
        }
        let field = |tag: &str| fields.iter().find(|(t, _, _)| t == tag);
        let num = |tag: &str| -> Result<u64, ImageError> {
            let (_, txt, line) =
                field(tag).ok_or_else(|| invalid(None, format!("missing <{tag}>")))?;
            txt.trim()
                .parse::<u64>()
                .map_err(|_| invalid(Some(*line), format!("<{tag}> is not a number: {txt:?}")))
        };
        let image_size = num("ImageSize")?;
        let block_size = num("BlockSize")?;
        let blocks_count = num("BlocksCount")?;
        let mapped_blocks = num("MappedBlocksCount")?;
        if block_size == 0 {
            return Err(invalid(None, "<BlockSize> is 0".into()));
        }
        if image_size.div_ceil(block_size) != blocks_count {
            return Err(invalid(
                None,
                format!(
                    "inconsistent bmap: ImageSize {image_size} is not BlocksCount {blocks_count} \
                     blocks of {block_size} bytes"
                ),
            ));
        }

        let (kind, attr, file_tag) = if major >= 2 || (major == 1 && minor == 4) {
            let (_, t, line) = field("ChecksumType")
                .ok_or_else(|| invalid(None, "missing <ChecksumType>".into()))?;
            let kind = match t.trim() {
                "sha256" => ChecksumKind::Sha256,
                "sha1" => ChecksumKind::Sha1,
                other => {
                    return Err(invalid(
                        Some(*line),
                        format!("unsupported checksum type {other:?}"),
                    ))
                }
            };
            (kind, "chksum", Some("BmapFileChecksum"))
        } else if minor == 3 {
            (ChecksumKind::Sha1, "sha1", Some("BmapFileSHA1"))
        } else {
            (ChecksumKind::None, "", None)
        };

        if let Some(tag) = file_tag {
            let (_, t, line) =
                field(tag).ok_or_else(|| invalid(None, format!("missing <{tag}>")))?;
            let want = t.trim().to_ascii_lowercase();
            check_hex(&want, kind).map_err(|m| invalid(Some(*line), format!("<{tag}>: {m}")))?;
            let got = file_checksum(bytes, t.trim(), kind);
            if got != want {
                return Err(invalid(
                    Some(*line),
                    format!("bmap file checksum mismatch: <{tag}> says {want}, the file hashes to {got} (edited or damaged bmap)"),
                ));
            }
        }

        let mut ranges = Vec::with_capacity(raw_ranges.len());
        let mut mapped = 0u64;
        let mut next_free = 0u64; // first block not yet covered
        for (attrs, txt, line) in raw_ranges {
            let bad = |m: String| invalid(Some(line), m);
            let t = txt.trim();
            let (a, b) = match t.split_once('-') {
                Some((a, b)) => (a.trim(), b.trim()),
                None => (t, t),
            };
            let first: u64 = a
                .parse()
                .map_err(|_| bad(format!("bad block range {t:?}")))?;
            let last: u64 = b
                .parse()
                .map_err(|_| bad(format!("bad block range {t:?}")))?;
            if first > last {
                return Err(bad(format!("bad block range {t:?}: first > last")));
            }
            if last >= blocks_count {
                return Err(bad(format!(
                    "block range {t:?} lies past the image end ({blocks_count} blocks)"
                )));
            }
            if first < next_free {
                return Err(bad(format!(
                    "block range {t:?} overlaps or is out of order"
                )));
            }
            next_free = last + 1;
            mapped += last - first + 1;
            let checksum = match attrs.iter().find(|(k, _)| k == attr) {
                Some((_, v)) if kind != ChecksumKind::None => {
                    let v = v.to_ascii_lowercase();
                    check_hex(&v, kind).map_err(|m| bad(format!("range {t:?}: {m}")))?;
                    Some(v)
                }
                _ => None,
            };
            // first < blocks_count = ceil(image_size / block_size), so `start` < image_size; the
            // end of the last block can pass u64::MAX (ImageSize near 2^64, huge BlockSize):
            // it is clamped to ImageSize either way.
            let start = first * block_size;
            let end = (last + 1)
                .checked_mul(block_size)
                .map_or(image_size, |e| e.min(image_size));
            ranges.push(BmapRange {
                first_block: first,
                last_block: last,
                start,
                end,
                checksum,
            });
        }
        if mapped != mapped_blocks {
            return Err(invalid(
                None,
                format!(
                    "inconsistent bmap: MappedBlocksCount is {mapped_blocks} but the ranges map {mapped} blocks"
                ),
            ));
        }
        Ok(Bmap {
            path: path.to_path_buf(),
            version,
            image_size,
            checksum: kind,
            ranges,
        })
    }

    /// Bytes the bmap maps.
    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| r.end - r.start).sum()
    }

    pub fn describe(&self) -> String {
        format!("bmap {} ({})", self.version, self.checksum.name())
    }
}

fn check_hex(s: &str, kind: ChecksumKind) -> Result<(), String> {
    if s.len() != kind.hex_len() || !s.bytes().all(|c| c.is_ascii_hexdigit()) {
        return Err(format!(
            "{s:?} is not a {} checksum ({} hex digits)",
            kind.name(),
            kind.hex_len()
        ));
    }
    Ok(())
}

/// bmaptool's rule: hash the file with the first occurrence of the checksum text replaced by
/// `0`s of the same length.
fn file_checksum(bytes: &[u8], stored: &str, kind: ChecksumKind) -> String {
    let mut copy = bytes.to_vec();
    let needle = stored.as_bytes();
    if let Some(i) = copy.windows(needle.len()).position(|w| w == needle) {
        copy[i..i + needle.len()].fill(b'0');
    }
    let mut h = RangeHasher::new(kind);
    h.update(&copy);
    h.finish_hex()
}

/// Where to look for a bmap next to `image`: `IMAGE.bmap`, then the name with a compression
/// suffix stripped (`x.img.zst` → `x.img.bmap`), then with the image suffix stripped too
/// (`x.bmap`). Returns the first that exists.
pub(crate) fn find_sidecar(image: &Path) -> Option<PathBuf> {
    candidates(image).into_iter().find(|p| p.is_file())
}

pub(crate) fn candidates(image: &Path) -> Vec<PathBuf> {
    let Some(name) = image.file_name().map(|n| n.to_string_lossy().to_string()) else {
        return Vec::new();
    };
    let dir = image.parent().unwrap_or(Path::new(""));
    let mut out = vec![dir.join(format!("{name}.bmap"))];
    let mut stem = name.as_str();
    for suf in [
        ".zst", ".zstd", ".xz", ".gz", ".bz2", ".gzip", ".bzip2", ".zip",
    ] {
        if let Some(s) = stem.strip_suffix(suf) {
            stem = s;
            out.push(dir.join(format!("{stem}.bmap")));
            break;
        }
    }
    for suf in [".img", ".raw", ".simg", ".sparse", ".iso"] {
        if let Some(s) = stem.strip_suffix(suf) {
            out.push(dir.join(format!("{s}.bmap")));
            break;
        }
    }
    out.dedup();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v2(ranges: &str, mapped: u64, size: u64) -> String {
        let body = format!(
            "<?xml version=\"1.0\" ?>\n<!-- comment -->\n<bmap version=\"2.0\">\n    <ImageSize> {size} </ImageSize>\n    <BlockSize> 4096 </BlockSize>\n    <BlocksCount> {} </BlocksCount>\n    <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    <ChecksumType> sha256 </ChecksumType>\n    <BmapFileChecksum> {} </BmapFileChecksum>\n    <BlockMap>\n{ranges}    </BlockMap>\n</bmap>\n",
            size.div_ceil(4096),
            "0".repeat(64)
        );
        let sum = file_checksum(body.as_bytes(), &"0".repeat(64), ChecksumKind::Sha256);
        body.replacen(&"0".repeat(64), &sum, 1)
    }

    fn range(a: u64, b: u64) -> String {
        format!(
            "        <Range chksum=\"{}\"> {a}-{b} </Range>\n",
            "ab".repeat(32)
        )
    }

    #[test]
    fn parses_v2_and_last_partial_block() {
        let x = v2(&(range(0, 1) + &range(5, 9)), 7, 40000);
        let b = Bmap::parse(x.as_bytes(), Path::new("t.bmap")).unwrap();
        assert_eq!(b.checksum, ChecksumKind::Sha256);
        assert_eq!(b.ranges.len(), 2);
        assert_eq!((b.ranges[1].start, b.ranges[1].end), (5 * 4096, 40000));
        assert_eq!(b.mapped_bytes(), 8192 + 40000 - 5 * 4096);
    }

    #[test]
    fn rejects_bad_bmaps_with_line_numbers() {
        let p = Path::new("t.bmap");
        // Edited after creation: file checksum no longer matches.
        let x = v2(&range(0, 1), 2, 40000).replace("0-1", "0-2");
        let e = Bmap::parse(x.as_bytes(), p).unwrap_err().to_string();
        assert!(
            e.contains("t.bmap") && e.contains("checksum mismatch"),
            "{e}"
        );
        for (r, mapped, what) in [
            (range(3, 1), 0, "first > last"),
            (range(0, 10), 11, "past the image end"),
            (range(2, 3) + &range(0, 1), 4, "out of order"),
            (
                "<Range chksum=\"ab\"> x </Range>\n".to_string(),
                1,
                "bad block range",
            ),
            (range(0, 1), 3, "MappedBlocksCount"),
        ] {
            let x = v2(&r, mapped, 40000);
            let e = Bmap::parse(x.as_bytes(), p).unwrap_err().to_string();
            assert!(e.contains(what), "{what}: {e}");
        }
        let e = Bmap::parse(b"<bmap version=\"2.0\"><ImageSize>", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("t.bmap"), "{e}");
        let e = Bmap::parse(b"<bmap version=\"3.0\"></bmap>", p)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not supported"), "{e}");
    }

    #[test]
    fn sidecar_candidates() {
        let c = candidates(Path::new("/d/x.img.zst"));
        assert_eq!(
            c,
            vec![
                PathBuf::from("/d/x.img.zst.bmap"),
                PathBuf::from("/d/x.img.bmap"),
                PathBuf::from("/d/x.bmap")
            ]
        );
        let c = candidates(Path::new("x.img"));
        assert_eq!(
            c,
            vec![PathBuf::from("x.img.bmap"), PathBuf::from("x.bmap")]
        );
    }
}
