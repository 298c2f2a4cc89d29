//! Image inputs against real tools: images built with sfdisk/mkfs, compressed with the real
//! zstd/xz/gzip/bzip2, bmaps from `bmaptool create`, sparse images from `img2simg`. Every
//! source is expanded extent by extent and compared byte for byte with the raw image, and
//! its LogicalHasher digest with the blake3 of the raw file.

mod common;

use sbcflash::image::{
    self, digest::LogicalHasher, Bmap, ExtentKind, ExtentSource, ImageError, OpenOptions,
};
use std::path::{Path, PathBuf};

const TOOLS: &[&str] = &[
    "sfdisk",
    "mkfs.vfat",
    "mkfs.ext4",
    "mcopy",
    "zstd",
    "xz",
    "gzip",
    "bzip2",
    "bmaptool",
    "img2simg",
];

#[derive(Default, Debug)]
struct Expanded {
    bytes: Vec<u8>,
    digest: Option<blake3::Hash>,
    data: u64,
    zero: u64,
    skip: u64,
}

/// Pull every extent, checking order and contiguity; Zero/Skip become zero bytes.
fn expand(src: &mut dyn ExtentSource) -> Result<Expanded, ImageError> {
    let mut buf = vec![0u8; 8 << 20];
    let mut out = Expanded::default();
    let mut h = LogicalHasher::new();
    while let Some(e) = src.next_extent(&mut buf)? {
        assert_eq!(
            e.offset,
            out.bytes.len() as u64,
            "extents must be contiguous"
        );
        assert!(e.len > 0, "empty extent {e:?}");
        h.update_extent(&e, &buf);
        match e.kind {
            ExtentKind::Data => {
                out.bytes.extend_from_slice(&buf[..e.len as usize]);
                out.data += e.len;
            }
            ExtentKind::Zero => {
                out.bytes.resize(out.bytes.len() + e.len as usize, 0);
                out.zero += e.len;
            }
            ExtentKind::Skip => {
                out.bytes.resize(out.bytes.len() + e.len as usize, 0);
                out.skip += e.len;
            }
        }
    }
    out.digest = Some(h.finalize());
    Ok(out)
}

fn open(p: &Path, opts: &OpenOptions) -> Result<Expanded, ImageError> {
    let mut img = image::open_image(p, opts)?;
    let size = img.logical_size;
    let out = expand(img.source.as_mut())?;
    if let Some(s) = size {
        assert_eq!(s, out.bytes.len() as u64, "size hint vs content");
    }
    Ok(out)
}

fn no_bmap() -> OpenOptions {
    OpenOptions {
        no_bmap: true,
        ..Default::default()
    }
}

fn sh(dir: &Path, script: &str) {
    common::sh(&format!("cd '{}'\n{script}", dir.display()));
}

struct Fixture {
    _dir: tempfile::TempDir,
    dir: PathBuf,
    raw: PathBuf,
    bytes: Vec<u8>,
}

/// A 48 MiB NixOS-like image with its bmap (`x.bmap`, found through the `x.img` name).
fn fixture() -> Option<Fixture> {
    if !common::require(false, TOOLS) {
        return None;
    }
    let d = tempfile::tempdir().unwrap();
    let dir = d.path().to_path_buf();
    let raw = common::make_nixos_like_image(&dir, "x.img", 48, common::Table::Gpt);
    sh(&dir, "bmaptool -q create -o x.bmap x.img");
    let bytes = std::fs::read(&raw).unwrap();
    Some(Fixture {
        _dir: d,
        dir,
        raw,
        bytes,
    })
}

fn assert_same(f: &Fixture, e: &Expanded, what: &str) {
    assert_eq!(e.bytes.len(), f.bytes.len(), "{what}: length");
    if e.bytes != f.bytes {
        let i = e.bytes.iter().zip(&f.bytes).position(|(a, b)| a != b);
        panic!("{what}: differs from the raw image at offset {i:?}");
    }
    assert_eq!(e.digest, Some(blake3::hash(&f.bytes)), "{what}: digest");
}

#[test]
fn every_format_expands_to_the_raw_image() {
    let Some(f) = fixture() else { return };
    sh(
        &f.dir,
        r#"
zstd -q -T0 -k x.img -o x.img.zst
xz -T0 -1 -k -c x.img > x.img.xz
gzip -1 -c x.img > x.img.gz
bzip2 -1 -c x.img > x.img.bz2
# multi-member gzip and multi-stream bzip2 (what pigz/pbzip2 and `cat a.gz b.gz` produce)
head -c 20M x.img > a.part; tail -c +$((20*1024*1024+1)) x.img > b.part
gzip -1 -c a.part > multi.gz; gzip -1 -c b.part >> multi.gz
bzip2 -1 -c a.part > multi.bz2; bzip2 -1 -c b.part >> multi.bz2
xz -1 -c a.part > multi.xz; xz -1 -c b.part >> multi.xz
zstd -q -c a.part > multi.zst; zstd -q -c b.part >> multi.zst
rm a.part b.part
img2simg x.img x.simg
zstd -q -k x.simg -o x.simg.zst
cp x.img renamed.data
"#,
    );
    // Raw without bmap: holes and zero blocks are found; most of the image is not Data.
    let e = open(&f.raw, &no_bmap()).unwrap();
    assert_same(&f, &e, "raw");
    assert!(e.zero > e.data, "raw: expected mostly zero extents: {e:?}");
    assert_eq!(e.skip, 0);

    // Raw with the sidecar bmap (found as x.bmap): unmapped ranges are Skip.
    let mut img = image::open_image(&f.raw, &OpenOptions::default()).unwrap();
    assert_eq!(img.bmap.as_deref(), Some(f.dir.join("x.bmap").as_path()));
    assert!(img.description.contains("bmap 2.0"), "{}", img.description);
    let e = expand(img.source.as_mut()).unwrap();
    assert_same(&f, &e, "raw+bmap");
    assert!(e.skip > 0);

    for (name, desc) in [
        ("x.img.zst", "zstd"),
        ("x.img.xz", "xz"),
        ("x.img.gz", "gzip"),
        ("x.img.bz2", "bzip2"),
        ("multi.gz", "gzip"),
        ("multi.bz2", "bzip2"),
        ("multi.xz", "xz"),
        ("multi.zst", "zstd"),
        ("x.simg", "android-sparse"),
        ("x.simg.zst", "zstd → android-sparse"),
        ("renamed.data", "raw"),
    ] {
        let p = f.dir.join(name);
        let mut img = image::open_image(&p, &no_bmap()).unwrap();
        assert!(
            img.description.starts_with(desc),
            "{name}: {}",
            img.description
        );
        let e = expand(img.source.as_mut()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_same(&f, &e, name);
        assert_eq!(
            img.input_consumed
                .load(std::sync::atomic::Ordering::Relaxed),
            std::fs::metadata(&p).unwrap().len(),
            "{name}: all input consumed"
        );
        if name.contains("simg") {
            // img2simg turns holes into DONT_CARE (Skip) or zero FILL (Zero) chunks.
            assert!(e.skip + e.zero > e.data, "{name}: mostly not Data: {e:?}");
        }
        // With the bmap found beside the compressed file (x.img.zst → x.img.bmap → x.bmap).
        if name.starts_with("x.img.") {
            let mut img = image::open_image(&p, &OpenOptions::default()).unwrap();
            assert!(img.bmap.is_some(), "{name}: sidecar bmap");
            let e = expand(img.source.as_mut()).unwrap();
            assert_same(&f, &e, &format!("{name}+bmap"));
            assert!(e.skip > 0);
        }
    }

    // from_reader: a plain stream (what the downloader hands over).
    let r = std::fs::File::open(f.dir.join("x.img.zst")).unwrap();
    let mut src = image::from_reader(
        Box::new(r),
        "http://x/x.img.zst",
        Some(f.bytes.len() as u64),
        None,
    )
    .unwrap();
    assert_same(&f, &expand(src.as_mut()).unwrap(), "from_reader zst");
    let r = std::fs::File::open(f.dir.join("x.img.gz")).unwrap();
    let bmap = Bmap::load(&f.dir.join("x.bmap")).unwrap();
    let mut src = image::from_reader(Box::new(r), "x.img.gz", None, Some(bmap)).unwrap();
    assert_same(&f, &expand(src.as_mut()).unwrap(), "from_reader gz+bmap");
    // A wrong logical size hint is an error, never a silently short or long image.
    let r = std::fs::File::open(f.dir.join("x.img.zst")).unwrap();
    let mut src =
        image::from_reader(Box::new(r), "s", Some(f.bytes.len() as u64 + 4096), None).unwrap();
    let err = expand(src.as_mut()).unwrap_err().to_string();
    assert!(err.contains("truncated"), "{err}");

    // Prefix helper for partition-table inspection.
    let p = image::read_logical_prefix(&f.dir.join("x.simg.zst"), &no_bmap(), 1 << 20).unwrap();
    assert_eq!(p, f.bytes[..1 << 20]);
}
