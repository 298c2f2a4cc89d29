//! Hostile input: images that lie about their size, sparse chunks that overflow 64-bit
//! arithmetic, bmaps with ranges outside the image or overlapping, descriptors that try path
//! traversal, targets that are symlinks to mounted disks or change between the check and the
//! open, cache entries replaced by symlinks. Every case must end in a clear error (naming the
//! file and where), never a panic, a wrap-around or a half-claimed success, and must leave the
//! target without a partition table when the write did not complete.

mod common;

use common::{require, LoopDev};
use sbcflash::image::open::{open_image, OpenOptions};
use sbcflash::image::{ExtentKind, ExtentSource, ImageError};
use std::io::Write;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// helpers

/// Drain a source, checking the stream is gap-free; returns the logical size or the error.
fn drain(src: &mut dyn ExtentSource) -> Result<u64, ImageError> {
    let mut buf = vec![0u8; 1 << 20];
    let mut pos = 0u64;
    while let Some(e) = src.next_extent(&mut buf)? {
        assert_eq!(e.offset, pos, "gap or overlap in the extent stream");
        pos = e
            .offset
            .checked_add(e.len)
            .expect("an extent's end overflowed u64 instead of being refused");
        if e.kind == ExtentKind::Data {
            assert!(e.len as usize <= buf.len());
        }
    }
    Ok(pos)
}

fn open_and_drain(p: &Path, opts: &OpenOptions) -> Result<u64, ImageError> {
    let mut img = open_image(p, opts)?;
    drain(img.source.as_mut())
}

fn no_bmap() -> OpenOptions {
    OpenOptions {
        no_bmap: true,
        ..Default::default()
    }
}

fn expect_err(r: Result<u64, ImageError>, file: &str, needles: &[&str]) -> String {
    let e = match r {
        Ok(n) => panic!("{file}: accepted ({n} bytes), expected an error"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains(file), "error does not name {file}: {e}");
    for n in needles {
        assert!(e.contains(n), "error lacks {n:?}: {e}");
    }
    e
}

/// An Android sparse file header.
fn sparse_header(blk_sz: u32, total_blks: u32, chunks: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(28);
    h.extend_from_slice(&0xed26_ff3au32.to_le_bytes());
    h.extend_from_slice(&1u16.to_le_bytes());
    h.extend_from_slice(&0u16.to_le_bytes());
    h.extend_from_slice(&28u16.to_le_bytes());
    h.extend_from_slice(&12u16.to_le_bytes());
    h.extend_from_slice(&blk_sz.to_le_bytes());
    h.extend_from_slice(&total_blks.to_le_bytes());
    h.extend_from_slice(&chunks.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h
}

fn sparse_chunk(kind: u16, blocks: u32, total_sz: u32) -> Vec<u8> {
    let mut c = Vec::with_capacity(12);
    c.extend_from_slice(&kind.to_le_bytes());
    c.extend_from_slice(&0u16.to_le_bytes());
    c.extend_from_slice(&blocks.to_le_bytes());
    c.extend_from_slice(&total_sz.to_le_bytes());
    c
}

const RAW: u16 = 0xcac1;
const FILL: u16 = 0xcac2;
const DONT_CARE: u16 = 0xcac3;

/// A minimal bmap in format 1.2 (no checksums, so edits don't trip the file checksum first).
fn bmap_v12(image_size: u64, block_size: u64, blocks: u64, mapped: u64, ranges: &[&str]) -> String {
    let mut s = format!(
        "<?xml version=\"1.0\" ?>\n<bmap version=\"1.2\">\n    <ImageSize> {image_size} </ImageSize>\n    \
         <BlockSize> {block_size} </BlockSize>\n    <BlocksCount> {blocks} </BlocksCount>\n    \
         <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    <BlockMap>\n"
    );
    for r in ranges {
        s.push_str(&format!("        <Range> {r} </Range>\n"));
    }
    s.push_str("    </BlockMap>\n</bmap>\n");
    s
}

/// Write through the real pipeline (target vetting, sink, write) into a regular-file target
/// that starts out as 0xAA bytes; returns the error text.
fn write_to_file(image: &Path, opts: &OpenOptions, target: &Path) -> Result<(), String> {
    std::fs::write(target, vec![0xAAu8; 4 << 20]).unwrap();
    let img = open_image(image, opts).map_err(|e| e.to_string())?;
    let policy = sbcflash::target::Policy {
        image_size: img.logical_size,
        image_paths: vec![image.to_path_buf()],
        ..Default::default()
    };
    let t = sbcflash::target::open(target, &policy).map_err(|e| e.to_string())?;
    let mut sink = t.into_sink().map_err(|e| e.to_string())?;
    let wopts = sbcflash::write::WriteOptions {
        image_name: image.display().to_string(),
        ..Default::default()
    };
    sbcflash::write::run(
        img.source,
        sink.as_mut(),
        &wopts,
        &sbcflash::progress::Silent,
    )
    .map(|_| ())
    .map_err(|e| format!("{e:#}"))
}

/// The first MiB of the target was not written (held back until the end).
fn assert_head_untouched(target: &Path) {
    let b = std::fs::read(target).unwrap();
    let head = &b[..(1 << 20).min(b.len())];
    assert!(
        head.iter().all(|&x| x == 0xAA),
        "{}: the first MiB (partition table) was written although the write failed",
        target.display()
    );
}

// ---------------------------------------------------------------------------------------------
// images that claim more than they hold

#[test]
fn sparse_image_claiming_more_blocks_than_its_chunks_hold_fails_and_leaves_no_partition_table() {
    let d = tempfile::tempdir().unwrap();
    // Header: 1024 blocks of 4 KiB; chunks: one RAW block and one DONT_CARE of 10 blocks.
    let mut b = sparse_header(4096, 1024, 2);
    b.extend(sparse_chunk(RAW, 1, 12 + 4096));
    let mut block = vec![0u8; 4096];
    block[510] = 0x55;
    block[511] = 0xaa;
    b.extend(&block);
    b.extend(sparse_chunk(DONT_CARE, 10, 12));
    let p = d.path().join("short.simg");
    std::fs::write(&p, &b).unwrap();
    expect_err(
        open_and_drain(&p, &no_bmap()),
        "short.simg",
        &["chunks cover"],
    );
    let t = d.path().join("target.img");
    let e = write_to_file(&p, &no_bmap(), &t).expect_err("write must fail");
    assert!(e.contains("short.simg"), "{e}");
    assert_head_untouched(&t);
}

#[test]
fn sparse_raw_chunk_whose_data_is_missing_is_truncation_not_zeros() {
    let d = tempfile::tempdir().unwrap();
    // A RAW chunk of 8 blocks with only 1 block of payload present in the file.
    let mut b = sparse_header(4096, 8, 1);
    b.extend(sparse_chunk(RAW, 8, 12 + 8 * 4096));
    b.extend(vec![7u8; 4096]);
    let p = d.path().join("cut.simg");
    std::fs::write(&p, &b).unwrap();
    expect_err(open_and_drain(&p, &no_bmap()), "cut.simg", &["truncated"]);
    let t = d.path().join("target.img");
    write_to_file(&p, &no_bmap(), &t).expect_err("write must fail");
    assert_head_untouched(&t);
}

#[test]
fn raw_image_shorter_than_its_bmap_claims_fails_and_leaves_no_partition_table() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("short.img");
    // 64 KiB on disk; the bmap claims 1 MiB with a mapped range at the end.
    let mut data = vec![0u8; 64 << 10];
    data[510] = 0x55;
    data[511] = 0xaa;
    std::fs::write(&p, &data).unwrap();
    let bmap = d.path().join("short.img.bmap");
    std::fs::write(&bmap, bmap_v12(1 << 20, 4096, 256, 2, &["0", "255"])).unwrap();
    let opts = OpenOptions {
        bmap: Some(bmap),
        ..Default::default()
    };
    let e = open_and_drain(&p, &opts).expect_err("a bmap bigger than the image");
    let s = e.to_string();
    assert!(s.contains("short.img"), "{s}");
    let t = d.path().join("target.img");
    write_to_file(&p, &opts, &t).expect_err("write must fail");
    assert_head_untouched(&t);
}

#[test]
fn zstd_frame_cut_short_is_an_error_not_a_shorter_image() {
    if !require(false, &["zstd"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let raw = d.path().join("x.img");
    // Incompressible data, so cutting the compressed file cuts the image.
    common::sh(&format!(
        "head -c 2097152 /dev/urandom > {raw}; zstd -q -c {raw} > {raw}.zst; \
         head -c 1000000 {raw}.zst > {dir}/cut.img.zst",
        raw = raw.display(),
        dir = d.path().display()
    ));
    let p = d.path().join("cut.img.zst");
    assert!(
        std::fs::metadata(raw.with_extension("img.zst"))
            .unwrap()
            .len()
            > 1_500_000
    );
    let e = open_and_drain(&p, &no_bmap()).expect_err("truncated zstd accepted");
    assert!(e.to_string().contains("cut.img.zst"), "{e}");
    let t = d.path().join("target.img");
    write_to_file(&p, &no_bmap(), &t).expect_err("write must fail");
    assert_head_untouched(&t);
}

// ---------------------------------------------------------------------------------------------
// sparse chunks that overflow 64-bit arithmetic

#[test]
fn sparse_chunks_whose_sizes_add_past_u64_max_are_refused() {
    let d = tempfile::tempdir().unwrap();
    // blk_sz × total_blks ≈ 2^64 − 5·2^32: representable; two chunks of that size are not.
    let bs = 0xffff_fffc_u32;
    let mut b = sparse_header(bs, u32::MAX, 3);
    b.extend(sparse_chunk(DONT_CARE, u32::MAX, 12));
    b.extend(sparse_chunk(DONT_CARE, u32::MAX, 12));
    b.extend(sparse_chunk(FILL, u32::MAX, 16));
    b.extend(0xdead_beefu32.to_le_bytes());
    let p = d.path().join("overflow.simg");
    std::fs::write(&p, &b).unwrap();
    expect_err(
        open_and_drain(&p, &no_bmap()),
        "overflow.simg",
        &["past the image end"],
    );
}

#[test]
fn sparse_fill_chunk_of_exabytes_into_a_small_target_is_refused_not_attempted() {
    let d = tempfile::tempdir().unwrap();
    // A consistent header and FILL chunk describing ~16 EiB of 0x01 bytes.
    let bs = 0xffff_fffc_u32;
    let mut b = sparse_header(bs, u32::MAX, 1);
    b.extend(sparse_chunk(FILL, u32::MAX, 16));
    b.extend(0x0101_0101u32.to_le_bytes());
    let p = d.path().join("huge.simg");
    std::fs::write(&p, &b).unwrap();
    let img = open_image(&p, &no_bmap()).expect("header is consistent");
    assert_eq!(
        img.logical_size,
        Some(u64::from(bs) * u64::from(u32::MAX)),
        "logical size computed in 64 bits"
    );
    let t = d.path().join("target.img");
    let e = write_to_file(&p, &no_bmap(), &t).expect_err("16 EiB into a file must fail");
    assert!(e.contains("more than the whole filesystem"), "{e}");
    assert_head_untouched(&t);
}

#[test]
fn sparse_chunk_total_size_that_wraps_u32_is_refused() {
    let d = tempfile::tempdir().unwrap();
    // RAW chunk: 2^20 blocks of 4 KiB = 4 GiB payload, whose 12 + 4 GiB total_sz wraps u32 to 12.
    let mut b = sparse_header(4096, 1 << 20, 1);
    b.extend(sparse_chunk(RAW, 1 << 20, 12));
    b.extend(vec![0u8; 4096]);
    let p = d.path().join("wrap.simg");
    std::fs::write(&p, &b).unwrap();
    expect_err(open_and_drain(&p, &no_bmap()), "wrap.simg", &["total_sz"]);
}

// ---------------------------------------------------------------------------------------------
// bmap ranges outside the image or overlapping

#[test]
fn bmap_ranges_outside_the_image_overlapping_or_reversed_are_refused_with_their_line() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let cases: &[(&str, Vec<&str>, u64, &str)] = &[
        ("past-end", vec!["0", "256"], 2, "past the image end"),
        (
            "far-past-end",
            vec!["0-18446744073709551615"],
            0,
            "past the image end",
        ),
        ("overlap", vec!["0-10", "5-20"], 27, "overlaps"),
        ("out-of-order", vec!["20-30", "0-1"], 13, "out of order"),
        ("reversed", vec!["10-5"], 6, "first > last"),
        ("negative", vec!["-1"], 1, "bad block range"),
        ("garbage", vec!["1-x"], 1, "bad block range"),
    ];
    for (name, ranges, mapped, needle) in cases {
        let bm = d.path().join(format!("{name}.bmap"));
        std::fs::write(&bm, bmap_v12(1 << 20, 4096, 256, *mapped, ranges)).unwrap();
        let opts = OpenOptions {
            bmap: Some(bm.clone()),
            ..Default::default()
        };
        let e = open_and_drain(&p, &opts).expect_err(name);
        let s = e.to_string();
        assert!(s.contains(&format!("{name}.bmap")), "{name}: {s}");
        assert!(s.contains(needle), "{name}: {s}");
        // Line 6 holds <BlockMap>; ranges start on line 7.
        assert!(s.contains("line "), "{name}: no line number: {s}");
    }
}

#[test]
fn bmap_block_arithmetic_near_u64_max_does_not_wrap() {
    // ImageSize u64::MAX with 2^63-byte blocks: BlocksCount 2; block 1 ends at 2^64.
    let xml = bmap_v12(u64::MAX, 1 << 63, 2, 1, &["1"]);
    match sbcflash::image::bmap::Bmap::parse(xml.as_bytes(), Path::new("edge.bmap")) {
        Err(e) => assert!(e.to_string().contains("edge.bmap"), "{e}"),
        Ok(b) => {
            for r in &b.ranges {
                assert!(r.start <= r.end, "range wrapped: {r:?}");
                assert!(r.end <= b.image_size);
            }
        }
    }
    // A block size so large that BlocksCount × BlockSize overflows.
    let xml = bmap_v12(1 << 20, u64::MAX, 1, 1, &["0"]);
    if let Ok(b) = sbcflash::image::bmap::Bmap::parse(xml.as_bytes(), Path::new("big.bmap")) {
        for r in &b.ranges {
            assert!(r.start <= r.end && r.end <= b.image_size, "{r:?}");
        }
    }
}

#[test]
fn bmap_mapped_count_that_lies_is_refused() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("x.img");
    std::fs::write(&p, vec![0u8; 1 << 20]).unwrap();
    let bm = d.path().join("lies.bmap");
    std::fs::write(&bm, bmap_v12(1 << 20, 4096, 256, 200, &["0-9"])).unwrap();
    let opts = OpenOptions {
        bmap: Some(bm),
        ..Default::default()
    };
    expect_err(
        open_and_drain(&p, &opts),
        "lies.bmap",
        &["MappedBlocksCount"],
    );
}

// ---------------------------------------------------------------------------------------------
// descriptors that try path traversal

#[test]
fn board_descriptor_file_names_with_path_traversal_are_refused() {
    use sbcflash::board::registry::{embedded_files, parse_board, parse_soc};
    use sbcflash::board::Origin;
    // Take a real shipped SoC descriptor and a real board, and point a file name elsewhere.
    let files = embedded_files();
    let soc = files
        .iter()
        .find(|(p, t)| p.contains("soc/") && t.contains("file = \""))
        .expect("a shipped SoC descriptor with a file name");
    let board = files
        .iter()
        .find(|(p, t)| !p.contains("soc/") && !p.contains("_template") && t.contains("file = \""));
    for evil in [
        "../../../../etc/shadow",
        "/etc/shadow",
        "sub/../../x.bin",
        "..",
        "a\0b",
    ] {
        let origin = Origin::File(PathBuf::from("evil.toml"));
        let text = replace_first_file(soc.1, evil);
        let e = parse_soc(&origin, &text).expect_err(&format!("SoC file name {evil:?} accepted"));
        let s = e.to_string();
        assert!(s.contains("evil.toml"), "{s}");
        assert!(s.contains(':'), "no location: {s}");
        if let Some((_, t)) = board {
            let text = replace_first_file(t, evil);
            let e = parse_board(&origin, &text)
                .expect_err(&format!("board file name {evil:?} accepted"));
            assert!(e.to_string().contains("evil.toml"), "{e}");
        }
    }
}

/// Replace the value of the first `file = "..."` in a descriptor.
fn replace_first_file(text: &str, evil: &str) -> String {
    let i = text.find("file = \"").expect("file key") + "file = \"".len();
    let j = i + text[i..].find('"').expect("closing quote");
    let escaped = evil.replace('\0', "\\u0000");
    format!("{}{}{}", &text[..i], escaped, &text[j..])
}

// ---------------------------------------------------------------------------------------------
// targets: symlinks to mounted disks, and a target that changes between check and open

/// Format and mount a loop device; unmounts on drop (by path, before the LoopDev detaches).
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.dir).status();
    }
}

fn mount(dev: &Path, dir: &Path, mkfs: bool) -> Mounted {
    if mkfs {
        common::sh(&format!("mkfs.ext4 -q -F {}", dev.display()));
    }
    std::fs::create_dir_all(dir).unwrap();
    common::sh(&format!("mount {} {}", dev.display(), dir.display()));
    Mounted {
        dir: dir.to_path_buf(),
    }
}

#[test]
fn symlink_to_a_mounted_loop_disk_is_refused_and_the_disk_is_untouched() {
    if !require(true, &["losetup", "mkfs.ext4", "e2fsck", "mount"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let lo = LoopDev::new_sparse(d.path(), "disk.img", 32 << 20);
    let m = mount(lo.path(), &d.path().join("mnt"), true);
    std::fs::write(m.dir.join("precious"), b"keep me").unwrap();
    let link = d.path().join("sdcard");
    std::os::unix::fs::symlink(lo.path(), &link).unwrap();
    // A chain of symlinks as well.
    let link2 = d.path().join("sdcard2");
    std::os::unix::fs::symlink(&link, &link2).unwrap();

    for l in [&link, &link2] {
        let policy = sbcflash::target::Policy {
            image_size: Some(1 << 20),
            ..Default::default()
        };
        let e = match sbcflash::target::open(l, &policy) {
            Ok(_) => panic!("{}: a symlink to a mounted disk was opened", l.display()),
            Err(e) => e,
        };
        assert_eq!(
            sbcflash::exit::Classify::exit(&e),
            sbcflash::exit::Exit::Refused,
            "{e}"
        );
        let s = e.to_string();
        assert!(s.contains("mounted"), "{s}");
        assert!(
            s.contains(&lo.path().display().to_string()),
            "the refusal names the real device: {s}"
        );
    }
    // Nothing was written: after unmounting, the filesystem is clean and the file is there.
    drop(m);
    common::sh(&format!("e2fsck -fn {} >/dev/null", lo.path().display()));
    let m = mount(lo.path(), &d.path().join("mnt2"), false);
    assert_eq!(std::fs::read(m.dir.join("precious")).unwrap(), b"keep me");
}

#[test]
fn target_device_node_swapped_between_check_and_open_is_caught_through_the_fd() {
    if !require(true, &["losetup"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    // A: a good target (32 MiB). B: too small for the image (1 MiB): vetting B must refuse.
    let a = LoopDev::new_sparse(d.path(), "a.img", 32 << 20);
    let b = LoopDev::new_sparse(d.path(), "b.img", 1 << 20);
    let rdev = |p: &Path| std::fs::metadata(p).unwrap().rdev();
    let (ra, rb) = (rdev(a.path()), rdev(b.path()));
    let nodes = d.path().join("dev");
    std::fs::create_dir(&nodes).unwrap();
    let node = nodes.join("card");
    let mk = |at: &Path, r: u64| {
        nix::sys::stat::mknod(
            at,
            nix::sys::stat::SFlag::S_IFBLK,
            nix::sys::stat::Mode::from_bits_truncate(0o600),
            r,
        )
        .unwrap();
    };
    // Pre-made nodes renamed over `card` atomically by the attacker thread.
    let na = nodes.join(".a");
    let nb = nodes.join(".b");
    mk(&node, ra);

    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flipper = {
        let stop = stop.clone();
        let (node, na, nb) = (node.clone(), na.clone(), nb.clone());
        std::thread::spawn(move || {
            let mut i = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let (src, r) = if i % 2 == 0 { (&nb, rb) } else { (&na, ra) };
                let _ = std::fs::remove_file(src);
                mk(src, r);
                let _ = std::fs::rename(src, &node);
                i += 1;
            }
            i
        })
    };
    let policy = sbcflash::target::Policy {
        image_size: Some(8 << 20),
        ..Default::default()
    };
    let (mut opened, mut refused_small, mut refused_changed, mut other) = (0, 0, 0, 0);
    for _ in 0..3000 {
        match sbcflash::target::open(&node, &policy) {
            Ok(t) => {
                // Whatever the path says now, the fd we hold is the device that was vetted.
                let fd_rdev = t.file.metadata().unwrap().rdev();
                assert_eq!(fd_rdev, ra, "opened a device other than the vetted one");
                match &t.info {
                    sbcflash::target::TargetInfo::Device(disk) => {
                        assert_eq!(disk.devnum, fd_rdev, "info describes another device")
                    }
                    other => panic!("not a device: {other:?}"),
                }
                opened += 1;
            }
            Err(e) => {
                let s = e.to_string();
                if s.contains("larger than the target") {
                    refused_small += 1;
                } else if s.contains("changed between") {
                    refused_changed += 1;
                } else {
                    // ENOENT in the instant between rename steps, and similar.
                    other += 1;
                }
            }
        }
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    eprintln!(
        "flips {flips}: opened {opened}, refused small {refused_small}, \
         refused changed {refused_changed}, other {other}"
    );
    assert!(flips > 100, "the attacker thread barely ran");
    assert!(
        opened + refused_small > 0,
        "no attempt got through inspection"
    );
}

// ---------------------------------------------------------------------------------------------
// the cache: an entry replaced by a symlink

#[test]
fn cache_entry_replaced_by_a_symlink_is_never_followed_and_verify_removes_it() {
    use sbcflash::acquire::cache::{Cache, Origin};
    let d = tempfile::tempdir().unwrap();
    let cache = Cache::open(&d.path().join("cache")).unwrap();
    let data = b"a small image that entered the cache honestly".repeat(100);
    let entry = cache
        .ingest(&mut &data[..], false, Origin::default(), &|_| Ok(()))
        .unwrap();
    assert!(cache.get(&entry.blake3).unwrap().is_some());

    // The attacker replaces the blob by a symlink to a secret of the same size.
    let secret = d.path().join("secret");
    let mut f = std::fs::File::create(&secret).unwrap();
    f.write_all(&vec![b'S'; data.len()]).unwrap();
    drop(f);
    std::fs::remove_file(&entry.path).unwrap();
    std::os::unix::fs::symlink(&secret, &entry.path).unwrap();

    assert!(
        cache.get(&entry.blake3).unwrap().is_none(),
        "a symlinked blob must look absent"
    );
    assert!(
        cache.open_entry(&entry).is_err(),
        "open_entry followed a symlink"
    );
    let (ok, problems) = cache.verify(&mut |_, _| {}).unwrap();
    assert_eq!(ok, 0);
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(
        std::fs::symlink_metadata(&entry.path).is_err(),
        "verify must remove the planted symlink"
    );
    assert_eq!(std::fs::read(&secret).unwrap(), vec![b'S'; data.len()]);
}

#[test]
fn cache_directory_replaced_by_a_symlink_is_refused() {
    use sbcflash::acquire::cache::Cache;
    let d = tempfile::tempdir().unwrap();
    let root = d.path().join("cache");
    Cache::open(&root).unwrap();
    let elsewhere = d.path().join("elsewhere");
    std::fs::create_dir(&elsewhere).unwrap();
    std::fs::remove_dir_all(root.join("blobs")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("blobs")).unwrap();
    let e = match Cache::open(&root) {
        Ok(_) => panic!("a symlinked blobs/ directory was accepted"),
        Err(e) => e.to_string(),
    };
    assert!(e.contains("blobs"), "{e}");
}
