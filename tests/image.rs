//! Image inputs against real tools: images built with sfdisk/mkfs, compressed with the real
//! zstd/xz/gzip/bzip2, bmaps from `bmaptool create`, sparse images from `img2simg`. Every
//! source is expanded extent by extent and compared byte for byte with the raw image, and
//! its LogicalHasher digest with the blake3 of the raw file.

mod common;

use sbcflash::image::{
    self, digest::LogicalHasher, Bmap, ExtentKind, ExtentSource, ImageError, OpenOptions,
};
use std::path::{Path, PathBuf};

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
    if !common::require(false, &[common::IMAGE_TOOLS, common::FORMAT_TOOLS].concat()) {
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
        if name.starts_with("x.") {
            // Known before reading: from zstd frame headers, the sparse header, the file.
            let known = !name.ends_with(".xz") && !name.ends_with(".gz") && !name.ends_with(".bz2");
            assert_eq!(
                img.logical_size.is_some(),
                known,
                "{name}: {:?}",
                img.logical_size
            );
        }
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

/// Run `f` on a copy of `src` named `name` in the fixture dir after `edit` changed its bytes.
fn edited(f: &Fixture, src: &str, name: &str, edit: impl FnOnce(&mut Vec<u8>)) -> PathBuf {
    let mut b = std::fs::read(f.dir.join(src)).unwrap();
    edit(&mut b);
    let p = f.dir.join(name);
    std::fs::write(&p, b).unwrap();
    p
}

fn assert_err(r: Result<Expanded, ImageError>, file: &str, needles: &[&str]) -> String {
    let e = match r {
        Ok(e) => panic!(
            "{file}: expected an error, got Ok ({} bytes)",
            e.bytes.len()
        ),
        Err(e) => e.to_string(),
    };
    eprintln!("expected error: {e}");
    assert!(e.contains(file), "error does not name {file}: {e}");
    for n in needles {
        assert!(e.contains(n), "error lacks {n:?}: {e}");
    }
    e
}

#[test]
fn truncated_or_corrupt_compressed_input_is_an_error() {
    let Some(f) = fixture() else { return };
    sh(
        &f.dir,
        "zstd -q -k x.img -o x.zst; xz -1 -k -c x.img > x.xz; gzip -1 -c x.img > x.gz; bzip2 -1 -c x.img > x.bz2",
    );
    for ext in ["zst", "xz", "gz", "bz2"] {
        let src = format!("x.{ext}");
        // Truncated at 60%, and cut to its first half-kilobyte.
        for (tag, keep) in [("t60", 0.6), ("tiny", 0.0)] {
            let name = format!("{tag}.{ext}");
            let p = edited(&f, &src, &name, |b| {
                let n = if keep == 0.0 {
                    512
                } else {
                    (b.len() as f64 * keep) as usize
                };
                b.truncate(n);
            });
            let e = assert_err(open(&p, &no_bmap()), &name, &["offset"]);
            assert!(e.contains("truncated") || e.contains("corrupt"), "{e}");
        }
        // Bytes flipped in the middle of the stream.
        let name = format!("bad.{ext}");
        let p = edited(&f, &src, &name, |b| {
            let m = b.len() / 2;
            for x in &mut b[m..m + 64] {
                *x ^= 0x5a;
            }
        });
        assert_err(open(&p, &no_bmap()), &name, &["offset"]);
        // Garbage appended after a valid stream is not silently ignored.
        let name = format!("tail.{ext}");
        let p = edited(&f, &src, &name, |b| b.extend_from_slice(&[0x42; 4096]));
        assert_err(open(&p, &no_bmap()), &name, &["offset"]);
    }
    // The same truncated zstd, with a bmap: the stream ends before ImageSize.
    let p = edited(&f, "x.zst", "t.img.zst", |b| b.truncate(b.len() * 6 / 10));
    let opts = OpenOptions {
        bmap: Some(f.dir.join("x.bmap")),
        ..Default::default()
    };
    assert_err(open(&p, &opts), "t.img.zst", &["offset"]);
}

/// Rewrite a bmap's XML with `edit`, then recompute its file checksum (sha256, format 2.0,
/// or sha1 for 1.3 once the edit has renamed the tags) the way bmaptool defines it.
fn rewrite_bmap(xml: &str, edit: impl FnOnce(&str) -> String) -> String {
    use sha2::Digest as _;
    let x = edit(xml);
    let (tag, len) = if x.contains("<BmapFileSHA1>") {
        ("BmapFileSHA1", 40)
    } else if x.contains("<BmapFileChecksum>") {
        ("BmapFileChecksum", 64)
    } else {
        return x;
    };
    let open_t = format!("<{tag}>");
    let a = x.find(&open_t).unwrap() + open_t.len();
    let b = a + x[a..].find(&format!("</{tag}>")).unwrap();
    let zeroed = format!("{} {} {}", &x[..a], "0".repeat(len), &x[b..]);
    let sum = if len == 40 {
        hex::encode(sha1::Sha1::digest(zeroed.as_bytes()))
    } else {
        hex::encode(sha2::Sha256::digest(zeroed.as_bytes()))
    };
    zeroed.replacen(&"0".repeat(len), &sum, 1)
}

#[test]
fn bmap_versions_and_checksum_failures() {
    let Some(f) = fixture() else { return };
    sh(
        &f.dir,
        "zstd -q -k x.img -o x.img.zst; gzip -1 -c x.img > x.img.gz",
    );
    let xml = std::fs::read_to_string(f.dir.join("x.bmap")).unwrap();
    assert!(
        xml.contains("version=\"2.0\"") && xml.contains("sha256"),
        "{xml}"
    );
    let with = |p: PathBuf| OpenOptions {
        bmap: Some(p),
        ..Default::default()
    };
    let bmap = Bmap::load(&f.dir.join("x.bmap")).unwrap();

    // Format 1.3: sha1 range checksums and BmapFileSHA1. bmaptool 3.6 only writes 2.0, so the
    // test converts its output: tags renamed as in bmaptool's history, sha1 of each range
    // computed from the image, file checksum recomputed.
    let v13 = rewrite_bmap(&xml, |x| {
        use sha1::Digest as _;
        let mut out = x
            .replace("version=\"2.0\"", "version=\"1.3\"")
            .replace("BmapFileChecksum", "BmapFileSHA1");
        let a = out.find("<ChecksumType>").unwrap();
        let b = out.find("</ChecksumType>").unwrap() + "</ChecksumType>".len();
        out.replace_range(a..b, "");
        for r in &bmap.ranges {
            let sha256 = r.checksum.clone().unwrap();
            let sha1 = hex::encode(sha1::Sha1::digest(
                &f.bytes[r.start as usize..r.end as usize],
            ));
            out = out.replace(&format!("chksum=\"{sha256}\""), &format!("sha1=\"{sha1}\""));
        }
        out.replace(&"0".repeat(64), &"0".repeat(40))
    });
    assert!(!v13.contains("chksum="));
    std::fs::write(f.dir.join("v13.bmap"), &v13).unwrap();
    let b13 = Bmap::load(&f.dir.join("v13.bmap")).unwrap();
    assert_eq!(b13.checksum, image::bmap::ChecksumKind::Sha1);
    for img in ["x.img", "x.img.zst"] {
        let e = open(&f.dir.join(img), &with(f.dir.join("v13.bmap"))).unwrap();
        assert_same(&f, &e, &format!("{img} with bmap 1.3"));
        assert!(e.skip > 0);
    }
    // Format 1.2: no checksums at all (still maps ranges).
    let v12 = v13
        .replace("version=\"1.3\"", "version=\"1.2\"")
        .split('\n')
        .filter(|l| !l.contains("BmapFileSHA1"))
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(f.dir.join("v12.bmap"), &v12).unwrap();
    let e = open(&f.raw, &with(f.dir.join("v12.bmap"))).unwrap();
    assert_same(&f, &e, "bmap 1.2");

    // A wrong range checksum (file checksum recomputed so only the range is wrong): the error
    // names the range, on raw and on compressed input, in 2.0 and in 1.3.
    let r = &bmap.ranges[bmap.ranges.len() / 2];
    let want = r.checksum.clone().unwrap();
    let bad = rewrite_bmap(&xml, |x| x.replace(&want, &"0f".repeat(32)));
    std::fs::write(f.dir.join("bad.bmap"), &bad).unwrap();
    let range = format!("range {}..{}", r.start, r.end);
    for img in ["x.img", "x.img.zst"] {
        assert_err(
            open(&f.dir.join(img), &with(f.dir.join("bad.bmap"))),
            img,
            &[&range, "checksum mismatch"],
        );
    }
    let r13 = &b13.ranges[0];
    let bad13 = rewrite_bmap(&v13, |x| {
        x.replace(r13.checksum.as_deref().unwrap(), &"e".repeat(40))
    });
    std::fs::write(f.dir.join("bad13.bmap"), &bad13).unwrap();
    let range = format!("range {}..{}", r13.start, r13.end);
    assert_err(
        open(&f.raw, &with(f.dir.join("bad13.bmap"))),
        "x.img",
        &[&range],
    );

    // The image changed after the bmap was made: a mapped byte differs.
    let p = edited(&f, "x.img", "changed.img", |b| {
        let r = &bmap.ranges[1];
        b[r.start as usize + 100] ^= 1;
    });
    let range = format!("range {}..{}", bmap.ranges[1].start, bmap.ranges[1].end);
    assert_err(
        open(&p, &with(f.dir.join("x.bmap"))),
        "changed.img",
        &[&range],
    );

    // Edited bmap without recomputing its own checksum.
    std::fs::write(
        f.dir.join("edited.bmap"),
        xml.replace(&want, &"0f".repeat(32)),
    )
    .unwrap();
    let e = image::open_image(&f.raw, &with(f.dir.join("edited.bmap")))
        .err()
        .expect("edited bmap must be refused")
        .to_string();
    assert!(
        e.contains("edited.bmap") && e.contains("bmap file checksum mismatch"),
        "{e}"
    );

    // ImageSize mismatch: a bmap made for a bigger image.
    sh(
        &f.dir,
        "cp x.img big.img && truncate -s +1M big.img && bmaptool -q create -o big.bmap big.img",
    );
    let e = image::open_image(&f.raw, &with(f.dir.join("big.bmap")))
        .err()
        .expect("size mismatch must be refused")
        .to_string();
    assert!(e.contains("x.img") && e.contains("big.bmap"), "{e}");
    // zstd records the content size: refused at open too.
    let e = image::open_image(&f.dir.join("x.img.zst"), &with(f.dir.join("big.bmap")))
        .err()
        .expect("size mismatch must be refused")
        .to_string();
    assert!(e.contains("x.img.zst") && e.contains("big.bmap"), "{e}");
    // ...and over a gzip stream, where the size is only known at the end.
    let e = open(&f.dir.join("x.img.gz"), &with(f.dir.join("big.bmap")));
    assert_err(e, "x.img.gz", &["offset", "truncated"]);
    // A bmap for a smaller image than the stream holds.
    sh(
        &f.dir,
        "head -c 40M x.img > small.img && bmaptool -q create -o small.bmap small.img",
    );
    let e = open(&f.dir.join("x.img.gz"), &with(f.dir.join("small.bmap")));
    assert_err(e, "x.img.gz", &["larger than"]);

    // An explicit bmap that does not exist is an error, not a silent full write.
    assert!(image::open_image(&f.raw, &with(f.dir.join("nope.bmap"))).is_err());
}

#[test]
fn broken_android_sparse_images_are_errors_with_offsets() {
    let Some(f) = fixture() else { return };
    sh(&f.dir, "img2simg x.img x.simg");
    let good = std::fs::read(f.dir.join("x.simg")).unwrap();
    // Walk chunk headers to find the first RAW chunk.
    let mut off = 28usize;
    let raw_off = loop {
        let t = u16::from_le_bytes([good[off], good[off + 1]]);
        if t == 0xcac1 {
            break off;
        }
        off += u32::from_le_bytes(good[off + 8..off + 12].try_into().unwrap()) as usize;
    };
    let at = format!("offset {raw_off}");

    // RAW chunk whose total_sz lies.
    let p = edited(&f, "x.simg", "lie.simg", |b| {
        let v = u32::from_le_bytes(b[raw_off + 8..raw_off + 12].try_into().unwrap());
        b[raw_off + 8..raw_off + 12].copy_from_slice(&(v + 4096).to_le_bytes());
    });
    assert_err(open(&p, &no_bmap()), "lie.simg", &[&at, "total_sz"]);
    // RAW chunk claiming more blocks than the image has (u32 max: 64-bit products).
    let p = edited(&f, "x.simg", "over.simg", |b| {
        b[raw_off + 4..raw_off + 8].copy_from_slice(&u32::MAX.to_le_bytes());
    });
    assert_err(
        open(&p, &no_bmap()),
        "over.simg",
        &[&at, "past the image end"],
    );
    // Header block count smaller than what the chunks cover.
    let p = edited(&f, "x.simg", "blocks.simg", |b| {
        let v = u32::from_le_bytes(b[16..20].try_into().unwrap());
        b[16..20].copy_from_slice(&(v - 1).to_le_bytes());
    });
    assert_err(open(&p, &no_bmap()), "blocks.simg", &["past the image end"]);
    // Header block count larger than what the chunks cover.
    let p = edited(&f, "x.simg", "short.simg", |b| {
        let v = u32::from_le_bytes(b[16..20].try_into().unwrap());
        b[16..20].copy_from_slice(&(v + 1).to_le_bytes());
    });
    assert_err(open(&p, &no_bmap()), "short.simg", &["chunks cover"]);
    // Unknown chunk type.
    let p = edited(&f, "x.simg", "type.simg", |b| {
        b[raw_off..raw_off + 2].copy_from_slice(&0xcac9u16.to_le_bytes());
    });
    assert_err(open(&p, &no_bmap()), "type.simg", &[&at, "0xcac9"]);
    // Block size not a multiple of 4.
    let p = edited(&f, "x.simg", "bs.simg", |b| {
        b[12..16].copy_from_slice(&4094u32.to_le_bytes())
    });
    assert_err(
        open(&p, &no_bmap()),
        "bs.simg",
        &["offset 12", "multiple of 4"],
    );
    // Bad version after a valid magic.
    let p = edited(&f, "x.simg", "ver.simg", |b| b[4] = 9);
    assert_err(open(&p, &no_bmap()), "ver.simg", &["offset 0"]);
    // Truncated in RAW data, and compressed-then-truncated.
    let p = edited(&f, "x.simg", "trunc.simg", |b| b.truncate(raw_off + 5000));
    assert_err(open(&p, &no_bmap()), "trunc.simg", &["truncated"]);
    sh(&f.dir, "zstd -q -c trunc.simg > trunc.simg.zst");
    assert_err(
        open(&f.dir.join("trunc.simg.zst"), &no_bmap()),
        "trunc.simg.zst",
        &["truncated"],
    );
    // A bad magic is not sparse at all: it is read as a raw image (detection by magic), so
    // it must not expand to the sparse content.
    let p = edited(&f, "x.simg", "magic.simg", |b| b[0] = 0);
    let e = open(&p, &no_bmap()).unwrap();
    assert_eq!(e.bytes.len(), good.len());
    // An explicit bmap with a sparse image is refused.
    let opts = OpenOptions {
        bmap: Some(f.dir.join("x.bmap")),
        ..Default::default()
    };
    let e = image::open_image(&f.dir.join("x.simg"), &opts)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("Android sparse"), "{e}");
}
