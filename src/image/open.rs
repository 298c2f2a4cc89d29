//! Opening an image: detect its layers by magic bytes, find its bmap, build the source.

use super::bmap::{self, Bmap};
use super::detect::{self, decoder, read_full, CountingReader, Format, MAGIC_LEN};
use super::scan::ScanSource;
use super::sparse::SparseSource;
use super::{ExtentKind, ExtentSource, ImageError};
use std::fs::File;
use std::io::{self, Cursor, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// An explicit bmap (`--bmap`); otherwise a sidecar is looked for beside the image.
    pub bmap: Option<PathBuf>,
    /// Ignore any bmap (`--no-bmap`).
    pub no_bmap: bool,
}

/// An opened image: the extent stream plus what the UI and the safety checks need.
pub struct OpenedImage {
    pub source: Box<dyn ExtentSource>,
    pub path: PathBuf,
    /// Layers from the outside in, e.g. `[Zstd, AndroidSparse]` or `[Raw]`.
    pub formats: Vec<Format>,
    /// "zstd → raw, bmap 2.0 (sha256)".
    pub description: String,
    /// Logical size if known before reading (raw file, bmap, sparse header).
    pub logical_size: Option<u64>,
    /// The bmap in use, and how many bytes it maps.
    pub bmap: Option<PathBuf>,
    pub mapped_size: Option<u64>,
    /// Size of the file on disk, and a live count of its bytes consumed so far (compressed
    /// bytes for compressed input): progress while the logical size is unknown.
    pub input_size: u64,
    pub input_consumed: Arc<AtomicU64>,
}

impl OpenedImage {
    /// Fraction of the input file consumed, 0.0..=1.0.
    pub fn input_fraction(&self) -> f64 {
        if self.input_size == 0 {
            return 1.0;
        }
        (self.input_consumed.load(Ordering::Relaxed) as f64 / self.input_size as f64).min(1.0)
    }
}

fn io_err(path: &Path, source: io::Error) -> ImageError {
    ImageError::Io {
        path: path.display().to_string(),
        source,
    }
}

/// Resolve the bmap for an image: explicit path, sidecar, or none.
fn resolve_bmap(path: &Path, opts: &OpenOptions) -> Result<Option<Bmap>, ImageError> {
    if opts.no_bmap {
        return Ok(None);
    }
    let b = match (&opts.bmap, bmap::find_sidecar(path)) {
        (Some(b), _) => b.clone(),
        (None, Some(b)) => {
            tracing::info!("using bmap {}", b.display());
            b
        }
        (None, None) => return Ok(None),
    };
    warn_if_newer(path, &b);
    Bmap::load(&b).map(Some)
}

/// An image modified after its bmap was made may no longer be what the bmap describes: data
/// written into ranges the bmap calls unmapped would be left out, changed mapped ranges fail
/// their checksums. Said before anything is written.
fn warn_if_newer(image: &Path, bmap: &Path) {
    let mtime = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if let (Some(i), Some(b)) = (mtime(image), mtime(bmap)) {
        if i > b {
            tracing::warn!(
                "{} was modified after its bmap {} was made: if the image changed, the bmap no longer describes it (recreate it with bmaptool create, or pass --no-bmap)",
                image.display(),
                bmap.display()
            );
        }
    }
}

/// Open an image file, whatever its format.
pub fn open_image(path: &Path, opts: &OpenOptions) -> Result<OpenedImage, ImageError> {
    let file = File::open(path).map_err(|e| io_err(path, e))?;
    let meta = file.metadata().map_err(|e| io_err(path, e))?;
    if meta.is_dir() {
        return Err(ImageError::Invalid {
            path: path.display().to_string(),
            msg: "is a directory, not an image".into(),
        });
    }
    let input_size = meta.len();
    let name = path.display().to_string();
    let consumed = Arc::new(AtomicU64::new(0));
    let mut head = [0u8; MAGIC_LEN];
    let n = read_head_at(&file, &mut head).map_err(|e| io_err(path, e))?;
    let outer = detect::detect(&head[..n]);
    let bmap = resolve_bmap(path, opts)?;
    let bmap_path = bmap.as_ref().map(|b| b.path.clone());
    let mapped_size = bmap.as_ref().map(|b| b.mapped_bytes());

    if outer == Format::Raw && meta.is_file() {
        let src = ScanSource::raw_file(file, &name, bmap, consumed.clone())?;
        let description = src.describe();
        let logical_size = src.size_hint();
        return Ok(OpenedImage {
            source: Box::new(src),
            path: path.to_path_buf(),
            formats: vec![Format::Raw],
            description,
            logical_size,
            bmap: bmap_path,
            mapped_size,
            input_size,
            input_consumed: consumed,
        });
    }
    let decompressed_size = match outer {
        Format::Zstd => detect::zstd_content_size(&file),
        _ => None,
    };
    let reader: Box<dyn Read + Send> = Box::new(CountingReader::new(file, consumed.clone()));
    let explicit_bmap = opts.bmap.is_some();
    let (source, formats) = open_stream(
        reader,
        &name,
        None,
        decompressed_size,
        bmap,
        explicit_bmap,
        Some(consumed.clone()),
    )?;
    let mapped_size = if formats.contains(&Format::AndroidSparse) {
        None
    } else {
        mapped_size
    };
    let bmap_path = if formats.contains(&Format::AndroidSparse) {
        None
    } else {
        bmap_path
    };
    Ok(OpenedImage {
        description: source.describe(),
        logical_size: source.size_hint(),
        source,
        path: path.to_path_buf(),
        formats,
        bmap: bmap_path,
        mapped_size,
        input_size,
        input_consumed: consumed,
    })
}

fn read_head_at(f: &File, head: &mut [u8]) -> io::Result<usize> {
    let mut n = 0;
    while n < head.len() {
        match f.read_at(&mut head[n..], n as u64) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// Build a source from any byte stream (a file, an HTTP body): detects compression and
/// Android sparse by magic bytes. `size_hint` is the LOGICAL size if the caller knows it
/// (checked at the end); `name` is used in messages.
pub fn from_reader(
    reader: Box<dyn Read + Send>,
    name: &str,
    size_hint: Option<u64>,
    bmap: Option<Bmap>,
) -> Result<Box<dyn ExtentSource>, ImageError> {
    let explicit = bmap.is_some();
    open_stream(reader, name, size_hint, None, bmap, explicit, None).map(|(s, _)| s)
}

fn peek(
    mut r: Box<dyn Read + Send>,
    name: &str,
    layer: Option<Format>,
) -> Result<(Box<dyn Read + Send>, Format), ImageError> {
    let mut head = vec![0u8; MAGIC_LEN];
    let n = read_full(r.as_mut(), &mut head).map_err(|e| match layer {
        Some(f) if e.raw_os_error().is_none() => ImageError::Corrupt {
            path: name.to_string(),
            offset: 0,
            msg: format!(
                "{} data is corrupt or truncated at its start: {e}",
                f.name()
            ),
        },
        _ => ImageError::Io {
            path: name.to_string(),
            source: e,
        },
    })?;
    head.truncate(n);
    let f = detect::detect(&head);
    Ok((Box::new(Cursor::new(head).chain(r)), f))
}

fn open_stream(
    reader: Box<dyn Read + Send>,
    name: &str,
    size_hint: Option<u64>,
    decompressed_size: Option<u64>,
    bmap: Option<Bmap>,
    explicit_bmap: bool,
    consumed: Option<Arc<AtomicU64>>,
) -> Result<(Box<dyn ExtentSource>, Vec<Format>), ImageError> {
    // Count the input's bytes unless the caller already does (open_image counts the file).
    let (reader, consumed): (Box<dyn Read + Send>, _) = match consumed {
        Some(c) => (reader, c),
        None => {
            let c = Arc::new(AtomicU64::new(0));
            (Box::new(CountingReader::new(reader, c.clone())), c)
        }
    };
    let (mut r, outer) = peek(reader, name, None)?;
    let mut formats = vec![outer];
    let mut compressed = None;
    let mut inner = outer;
    if outer.is_compression() {
        r = decoder(outer, r).map_err(|e| ImageError::Corrupt {
            path: name.to_string(),
            offset: 0,
            msg: format!("cannot start {} decoder: {e}", outer.name()),
        })?;
        let (r2, f) = peek(r, name, Some(outer))?;
        r = r2;
        // Only Android sparse is looked for inside a compression; anything else is the
        // raw image (which may well start with bytes that look like some other magic).
        inner = if f == Format::AndroidSparse {
            f
        } else {
            Format::Raw
        };
        formats.push(inner);
        compressed = Some((outer, consumed));
    }
    if inner == Format::AndroidSparse {
        if let Some(b) = &bmap {
            if explicit_bmap {
                return Err(ImageError::Invalid {
                    path: name.to_string(),
                    msg: format!(
                        "is an Android sparse image; the bmap {} describes raw images only",
                        b.path.display()
                    ),
                });
            }
            tracing::warn!(
                "ignoring {}: {name} is an Android sparse image",
                b.path.display()
            );
        }
        let outer_desc = if outer.is_compression() {
            outer.name()
        } else {
            ""
        };
        let src = SparseSource::new(r, name, outer_desc)?;
        if let Some(h) = size_hint {
            if src.size_hint() != Some(h) {
                return Err(ImageError::Invalid {
                    path: name.to_string(),
                    msg: format!(
                        "sparse header says {} bytes, expected {h}",
                        src.size_hint().unwrap_or(0)
                    ),
                });
            }
        }
        return Ok((Box::new(src), formats));
    }
    // What the compressed file claims its content size is (zstd frame headers) is the raw
    // image's size; it is checked at the end of the stream like a caller's hint.
    let src = ScanSource::stream(r, name, size_hint.or(decompressed_size), bmap, compressed)?;
    Ok((Box::new(Described::new(src, &formats)), formats))
}

/// Prefixes a source's description with its compression layers.
struct Described {
    inner: ScanSource,
    desc: String,
}

impl Described {
    fn new(inner: ScanSource, formats: &[Format]) -> Self {
        let layers: Vec<&str> = formats
            .iter()
            .filter(|f| f.is_compression())
            .map(|f| f.name())
            .collect();
        let d = inner.describe();
        let desc = if layers.is_empty() {
            d
        } else {
            format!("{} → {}", layers.join(" → "), d.trim_end_matches(" stream"))
        };
        Described { inner, desc }
    }
}

impl ExtentSource for Described {
    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }
    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<super::Extent>, ImageError> {
        self.inner.next_extent(buf)
    }
    fn describe(&self) -> String {
        self.desc.clone()
    }
    fn take_range_checker(&mut self) -> Option<super::bmap::RangeChecker> {
        self.inner.take_range_checker()
    }
    fn shares_buffers(&self) -> bool {
        self.inner.shares_buffers()
    }
    fn next_shared(
        &mut self,
    ) -> Result<Option<(super::Extent, Option<super::SharedData>)>, ImageError> {
        self.inner.next_shared()
    }
}

/// The first `n` bytes of the logical image (less if it is shorter), with Zero and Skip
/// ranges as zeroes: for partition-table inspection.
pub fn read_logical_prefix(
    path: &Path,
    opts: &OpenOptions,
    n: usize,
) -> Result<Vec<u8>, ImageError> {
    let mut img = open_image(path, opts)?;
    read_prefix(img.source.as_mut(), n)
}

/// Read the first `n` logical bytes from a fresh source (consumes it).
pub fn read_prefix(src: &mut dyn ExtentSource, n: usize) -> Result<Vec<u8>, ImageError> {
    let mut out = Vec::with_capacity(n);
    let mut buf = vec![0u8; (1 << 20).min(n.max(4096))];
    while out.len() < n {
        let Some(e) = src.next_extent(&mut buf)? else {
            break;
        };
        let take = (e.len as usize).min(n - out.len());
        match e.kind {
            ExtentKind::Data => out.extend_from_slice(&buf[..take]),
            ExtentKind::Zero | ExtentKind::Skip => out.resize(out.len() + take, 0),
        }
    }
    Ok(out)
}
