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
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Debug, Clone, Default)]
pub struct OpenOptions {
    /// An explicit bmap (`--bmap`); otherwise a sidecar is looked for beside the image.
    pub bmap: Option<PathBuf>,
    /// Ignore any bmap (`--no-bmap`).
    pub no_bmap: bool,
    /// The member of a `.zip` image to write (`--member`); needed when it has several.
    pub member: Option<String>,
}

/// An opened image: the extent stream plus what the UI and the safety checks need.
pub struct OpenedImage {
    pub source: Box<dyn ExtentSource>,
    pub(crate) path: PathBuf,
    /// Layers from the outside in, e.g. `[Zstd, AndroidSparse]` or `[Raw]`.
    pub(crate) formats: Vec<Format>,
    /// "zstd → raw, bmap 2.0 (sha256)".
    pub description: String,
    /// Logical size if known before reading (raw file, bmap, sparse header).
    pub logical_size: Option<u64>,
    /// The bmap in use, and how many bytes it maps.
    pub bmap: Option<PathBuf>,
    pub input_consumed: Arc<AtomicU64>,
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
    let name = path.display().to_string();
    let consumed = Arc::new(AtomicU64::new(0));
    let mut head = [0u8; MAGIC_LEN];
    let n = read_head_at(&file, &mut head).map_err(|e| io_err(path, e))?;
    let outer = detect::detect(&head[..n]);
    let bmap = resolve_bmap(path, opts)?;
    let bmap_path = bmap.as_ref().map(|b| b.path.clone());

    if opts.member.is_some() && outer != Format::Zip {
        return Err(ImageError::Invalid {
            path: name,
            msg: format!(
                "--member applies to .zip images, and this is {} data",
                outer.name()
            ),
        });
    }
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
            input_consumed: consumed,
        });
    }
    let decompressed_size = match outer {
        Format::Zstd => detect::zstd_content_size(&file),
        _ => None,
    };
    // A zip file is read through its central directory: the member is chosen up front.
    let (reader, zip_member): (Box<dyn Read + Send>, _) = if outer == Format::Zip && meta.is_file()
    {
        let (r, size) =
            super::zip::file_member(file, &name, opts.member.as_deref(), consumed.clone())?;
        (r, Some(size))
    } else {
        (Box::new(CountingReader::new(file, consumed.clone())), None)
    };
    let (source, formats) = open_stream(
        reader,
        Layers {
            name: &name,
            size_hint: None,
            decompressed_size,
            bmap,
            explicit_bmap: opts.bmap.is_some(),
            consumed: Some(consumed.clone()),
            member: opts.member.as_deref(),
            zip_member,
        },
    )?;
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
    from_reader_member(reader, name, size_hint, bmap, None)
}

/// [`from_reader`] taking the member of a zip stream to write (`--member`).
pub fn from_reader_member(
    reader: Box<dyn Read + Send>,
    name: &str,
    size_hint: Option<u64>,
    bmap: Option<Bmap>,
    member: Option<&str>,
) -> Result<Box<dyn ExtentSource>, ImageError> {
    let explicit_bmap = bmap.is_some();
    let layers = Layers {
        name,
        size_hint,
        decompressed_size: None,
        bmap,
        explicit_bmap,
        consumed: None,
        member,
        zip_member: None,
    };
    open_stream(reader, layers).map(|(s, _)| s)
}

fn peek(
    mut r: Box<dyn Read + Send>,
    name: &str,
    layer: Option<Format>,
) -> Result<(Box<dyn Read + Send>, Format), ImageError> {
    let mut head = vec![0u8; MAGIC_LEN];
    let n = read_full(r.as_mut(), &mut head).map_err(|e| match super::zip::image_error(e) {
        Ok(ie) => ie,
        Err(e) => match layer {
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
        },
    })?;
    head.truncate(n);
    let f = detect::detect(&head);
    Ok((Box::new(Cursor::new(head).chain(r)), f))
}

/// What [`open_stream`] knows about a stream besides its bytes.
struct Layers<'a> {
    name: &'a str,
    /// The LOGICAL size, if the caller knows it (checked at the end).
    size_hint: Option<u64>,
    /// What a compressed file records as its content size (zstd frame headers).
    decompressed_size: Option<u64>,
    bmap: Option<Bmap>,
    explicit_bmap: bool,
    /// The caller's count of input bytes (else one is made here).
    consumed: Option<Arc<AtomicU64>>,
    /// `--member`: which member of a zip to write.
    member: Option<&'a str>,
    /// The stream already is a zip member (chosen by [`super::zip::file_member`]): its size.
    zip_member: Option<u64>,
}

fn open_stream(
    reader: Box<dyn Read + Send>,
    l: Layers<'_>,
) -> Result<(Box<dyn ExtentSource>, Vec<Format>), ImageError> {
    let Layers {
        name,
        size_hint,
        decompressed_size,
        bmap,
        explicit_bmap,
        consumed,
        member,
        zip_member,
    } = l;
    // Count the input's bytes unless the caller already does (open_image counts the file).
    let (reader, consumed): (Box<dyn Read + Send>, _) = match consumed {
        Some(c) => (reader, c),
        None => {
            let c = Arc::new(AtomicU64::new(0));
            (Box::new(CountingReader::new(reader, c.clone())), c)
        }
    };
    let (mut r, mut outer) = peek(reader, name, None)?;
    let mut formats = Vec::new();
    // A zip is a container, not a compression: the member inside has its own layers (an
    // `.img.xz` member is decoded too). One zip layer only: a zip inside is written as is.
    let mut member_size = zip_member;
    if zip_member.is_none() && outer == Format::Zip {
        let (zr, size) = super::zip::stream_member(r, name, member)?;
        member_size = size;
        (r, outer) = peek(zr, name, Some(Format::Zip))?;
        formats.push(Format::Zip);
    } else if zip_member.is_some() {
        formats.push(Format::Zip);
    } else if member.is_some() {
        return Err(ImageError::Invalid {
            path: name.to_string(),
            msg: format!(
                "--member applies to .zip images, and this is {} data",
                outer.name()
            ),
        });
    }
    if outer == Format::Zip {
        outer = Format::Raw;
    }
    formats.push(outer);
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
    } else if formats.contains(&Format::Zip) {
        compressed = Some((Format::Zip, consumed));
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
        let outer_desc = layer_names(&formats).join(" → ");
        let src = SparseSource::new(r, name, &outer_desc)?;
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
    // A raw zip member's size is the image's (from the central directory or local header).
    let raw_member_size = member_size.filter(|_| !outer.is_compression());
    let expected = size_hint.or(decompressed_size).or(raw_member_size);
    let src = ScanSource::stream(r, name, expected, bmap, compressed)?;
    Ok((Box::new(Described::new(src, &formats)), formats))
}

/// The container and compression layers, outside in ("zip", "xz").
fn layer_names(formats: &[Format]) -> Vec<&'static str> {
    formats
        .iter()
        .filter(|f| f.is_compression() || **f == Format::Zip)
        .map(|f| f.name())
        .collect()
}

/// Prefixes a source's description with its compression layers.
struct Described {
    inner: ScanSource,
    desc: String,
}

impl Described {
    fn new(inner: ScanSource, formats: &[Format]) -> Self {
        let layers = layer_names(formats);
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
