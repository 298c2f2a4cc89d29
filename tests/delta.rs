//! `sbcflash write --delta` on real loop devices and regular files: only the units that
//! differ are written (counted by the kernel: the loop device's written sectors in
//! /sys/block/loopN/stat), the result is the new image byte for byte, nothing is written when
//! nothing differs, and a failed delta write leaves no partition table (or nothing changed).
//! Loop devices are detached by name on drop.

mod common;

use common::{make_nixos_like_image, sbcflash, LoopDev, Table};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Output, Stdio};

const IMG_MIB: u64 = 96;
const MIB: u64 = 1 << 20;
/// Where the changed image differs from the first: two 64 KiB spans in free space of the ext4
/// partition (zeroes in the first image, data in the second).
const CHANGES: [u64; 2] = [40 * MIB + 4096, 60 * MIB + 333 * 4096];
const CHANGE_LEN: usize = 64 << 10;

fn tools() -> bool {
    common::require(true, &[&["losetup"], common::IMAGE_TOOLS].concat())
}

/// `a.img` (NixOS-like) and `b.img`, the same with [`CHANGES`] filled with pseudo-random bytes.
fn two_images(dir: &Path) -> (PathBuf, PathBuf) {
    let a = make_nixos_like_image(dir, "a.img", IMG_MIB, Table::Mbr);
    let b = dir.join("b.img");
    std::fs::copy(&a, &b).expect("copy image");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&b)
        .expect("open b.img");
    let mut x = 0x9e37_79b9u32;
    for (i, off) in CHANGES.iter().enumerate() {
        let old = std::fs::read(&a).expect("read a.img")[*off as usize..*off as usize + CHANGE_LEN]
            .to_vec();
        assert!(
            old.iter().all(|&b| b == 0),
            "change {i} is not in free space"
        );
        let bytes: Vec<u8> = (0..CHANGE_LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                (x >> 24) as u8 | 1
            })
            .collect();
        f.write_all_at(&bytes, *off).expect("change b.img");
    }
    (a, b)
}

fn write(image: &Path, target: &Path, extra: &[&str]) -> Output {
    sbcflash()
        .arg("--json")
        .arg("write")
        .arg(image)
        .arg(target)
        .arg("--yes")
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run sbcflash")
}

fn ok(o: &Output) -> serde_json::Value {
    assert!(
        o.status.success(),
        "sbcflash failed: {:?}\n{}\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    result(o)
}

/// The `result` line's report.
fn result(o: &Output) -> serde_json::Value {
    String::from_utf8_lossy(&o.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .map(|v| v["report"].clone())
        .unwrap_or_else(|| panic!("no result line in {}", String::from_utf8_lossy(&o.stdout)))
}

/// Sectors the kernel has written to a loop device (field 7 of its stat), in bytes.
fn written_bytes(dev: &LoopDev) -> u64 {
    let name = dev
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let stat = std::fs::read_to_string(format!("/sys/block/{name}/stat")).expect("stat");
    let f: Vec<u64> = stat
        .split_whitespace()
        .map(|s| s.parse().expect("number"))
        .collect();
    f[6] * 512
}

#[test]
fn delta_writes_only_the_changed_units_of_a_loop_device() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_images(dir.path());
    let size = std::fs::metadata(&a).expect("stat").len();
    let dev = LoopDev::new_sparse(dir.path(), "target", size);

    let w0 = written_bytes(&dev);
    ok(&write(&a, dev.path(), &[]));
    let full = written_bytes(&dev) - w0;
    common::assert_same_prefix(&a, dev.path(), size);

    // The changed image: two 64 KiB spans differ, each inside one or two 4 MiB units; the
    // first MiB is cleared before the first differing unit and written again last.
    let w1 = written_bytes(&dev);
    let rep = ok(&write(&b, dev.path(), &["--delta"]));
    let delta = written_bytes(&dev) - w1;
    common::assert_same_prefix(&b, dev.path(), size);
    let d = &rep["delta"];
    eprintln!("full write {full} bytes, delta {delta} bytes; report {d}");
    assert!(
        delta >= 2 * CHANGE_LEN as u64,
        "the changes were not written: {delta}"
    );
    assert!(delta <= 4 * 4 * MIB + 2 * MIB, "delta wrote {delta} bytes");
    assert!(
        delta * 4 < full,
        "delta wrote {delta} bytes, a full write {full}"
    );
    assert_eq!(d["compared"].as_u64(), Some(size), "{d}");
    assert!(
        d["units_rewritten"]
            .as_u64()
            .is_some_and(|n| (2..=4).contains(&n)),
        "{d}"
    );
    assert_eq!(
        d["unchanged"].as_u64().unwrap_or(0) + d["rewritten"].as_u64().unwrap_or(0),
        size,
        "{d}"
    );
    assert!(
        rep["verified_bytes"].as_u64().is_some_and(|n| n > 0),
        "not read back: {rep}"
    );

    // The same image again: nothing differs, nothing is written (not even the head).
    let w2 = written_bytes(&dev);
    let rep = ok(&write(&b, dev.path(), &["--delta"]));
    assert_eq!(
        written_bytes(&dev) - w2,
        0,
        "an unchanged target was written: {rep}"
    );
    assert_eq!(rep["bytes_written"].as_u64(), Some(0), "{rep}");
    assert_eq!(rep["delta"]["unchanged"].as_u64(), Some(size), "{rep}");
    common::assert_same_prefix(&b, dev.path(), size);
}

#[test]
fn delta_to_a_regular_file_leaves_the_new_image() {
    if !common::require(false, common::IMAGE_TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_images(dir.path());
    let size = std::fs::metadata(&a).expect("stat").len();
    let out = dir.path().join("out.img");
    std::fs::copy(&a, &out).expect("copy");
    // An existing file that looks like an image needs --force (swapped arguments), as always.
    let rep = ok(&write(&b, &out, &["--delta", "--force"]));
    common::assert_same_prefix(&b, &out, size);
    assert_eq!(std::fs::metadata(&out).expect("stat").len(), size);
    let d = &rep["delta"];
    assert!(
        d["rewritten"]
            .as_u64()
            .is_some_and(|n| n > 0 && n <= 16 * MIB),
        "{d}"
    );
    // A shorter old file (the end is beyond its length): the rest is written.
    std::fs::copy(&a, &out).expect("copy");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&out)
        .and_then(|f| f.set_len(size / 2))
        .expect("truncate");
    let rep = ok(&write(&b, &out, &["--delta", "--force"]));
    common::assert_same_prefix(&b, &out, size);
    let d = &rep["delta"];
    let written =
        d["rewritten"].as_u64().unwrap_or(0) + d["written_uncompared"].as_u64().unwrap_or(0);
    assert!(written >= size / 2 - 4 * MIB, "{rep}");
}

#[test]
fn failed_delta_write_leaves_no_partition_table_or_nothing_changed() {
    if !tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let (a, b) = two_images(dir.path());
    let size = std::fs::metadata(&a).expect("stat").len();
    let dev = LoopDev::new_sparse(dir.path(), "target", size);
    ok(&write(&a, dev.path(), &[]));
    let wrong = "00".repeat(32);

    // Nothing differs but the digest is wrong: exit 6 and the target untouched (still `a`).
    let w = written_bytes(&dev);
    let o = write(&a, dev.path(), &["--delta", "--blake3", &wrong]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert_eq!(written_bytes(&dev), w, "a failed unchanged delta wrote");
    common::assert_same_prefix(&a, dev.path(), size);

    // Units differ and the digest is wrong: exit 6, the partition table was cleared before
    // the first differing unit and not written again.
    let o = write(&b, dev.path(), &["--delta", "--blake3", &wrong]);
    assert_eq!(
        o.status.code(),
        Some(6),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut head = vec![0u8; 512];
    std::fs::File::open(dev.path())
        .and_then(|f| f.read_exact_at(&mut head, 0))
        .expect("read head");
    assert!(
        head.iter().all(|&b| b == 0),
        "a partition table is left: {:x?}",
        &head[440..512]
    );
    let err = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(err.contains("partition table was not written"), "{err}");
}
