//! `sbcflash write` / `verify` / `hash` against real loop devices and regular files, with
//! images made by real tools (sfdisk, mkfs, zstd, xz, gzip, bzip2, bmaptool, img2simg).
//! Every loop device is detached by name on drop; every mount is unmounted by path on drop.

mod common;

use common::{make_nixos_like_image, run, sbcflash, sh, text, LoopDev, Table};
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

const IMG_MIB: u64 = 64;

fn blake3_of(path: &Path, len: u64) -> String {
    let mut f = std::fs::File::open(path).expect("open for hashing");
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut left = len;
    while left > 0 {
        let n = (left as usize).min(buf.len());
        f.read_exact(&mut buf[..n]).expect("read for hashing");
        h.update(&buf[..n]);
        left -= n as u64;
    }
    h.finalize().to_hex().to_string()
}

fn size_of(p: &Path) -> u64 {
    std::fs::metadata(p).expect("stat").len()
}

fn code(o: &Output) -> i32 {
    o.status.code().unwrap_or(-1)
}

/// Fails the test with everything sbcflash printed unless it exited with `want`.
fn assert_exit(out: &Output, want: i32) {
    assert_eq!(code(out), want, "{}", text(out));
}

/// Fails the test unless `out`'s stdout mentions `what` exactly when `said`.
fn assert_stdout_says(out: &Output, what: &str, said: bool) {
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).contains(what),
        said,
        "stdout {} {what:?}\n{}",
        if said { "lacks" } else { "has" },
        text(out)
    );
}

/// The first MiB of `dev` (the partition tables) is still all zero: the write failed before
/// writing its held-back head.
fn assert_head_unwritten(dev: &Path, why: &str) {
    let mut head = vec![0u8; 1 << 20];
    std::fs::File::open(dev)
        .expect("open")
        .read_exact_at(&mut head, 0)
        .expect("read");
    assert!(head.iter().all(|&b| b == 0), "{why}");
}

/// Needs root, losetup and the tools that make the test image, plus `extra`.
fn loop_tools(extra: &[&str]) -> bool {
    common::require(true, &[&["losetup"], common::IMAGE_TOOLS, extra].concat())
}

/// For tests on loop devices: skips (`None`) without root, losetup, the image tools or
/// `extra`; else a temp dir holding a NixOS-like `n.img` of `mib` MiB.
fn image_for_loop_tests(
    extra: &[&str],
    mib: u64,
    table: Table,
) -> Option<(tempfile::TempDir, PathBuf)> {
    if !loop_tools(extra) {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_nixos_like_image(dir.path(), "n.img", mib, table);
    Some((dir, img))
}

fn verify_cmd(image: &Path, target: &Path) -> Output {
    sbcflash()
        .arg("verify")
        .arg(image)
        .arg(target)
        .output()
        .expect("run sbcflash verify")
}

fn write_cmd(image: &Path, target: &Path, extra: &[&str]) -> Output {
    sbcflash()
        .arg("write")
        .arg(image)
        .arg(target)
        .arg("--yes")
        .args(extra)
        .stdin(Stdio::null())
        .output()
        .expect("run sbcflash")
}

/// A backing file of `mib` MiB filled with 0xA5 (not sparse: a target with old contents).
fn garbage_backing(dir: &Path, name: &str, mib: u64) -> PathBuf {
    let p = dir.join(name);
    let mut f = std::fs::File::create(&p).expect("create backing");
    let chunk = vec![0xA5u8; 1 << 20];
    for _ in 0..mib {
        f.write_all(&chunk).expect("fill backing");
    }
    p
}

/// A tmpfs mounted on a temp directory; unmounted (by its path) on drop.
struct TmpfsMount {
    dir: PathBuf,
}

impl TmpfsMount {
    fn new(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).expect("mkdir");
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}")])
            .arg("tmpfs")
            .arg(dir));
        Self {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for TmpfsMount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

/// A filesystem mount of a device; unmounted on drop.
struct Mounted {
    dir: PathBuf,
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.dir).output();
    }
}

fn image_tools() -> bool {
    loop_tools(common::FORMAT_TOOLS)
}

#[test]
fn every_format_lands_byte_for_byte_on_loop_devices_and_files() {
    if !image_tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = make_nixos_like_image(d, "nixos.img", IMG_MIB, Table::Gpt);
    let size = size_of(&img);
    // Compressed and sparse forms live in their own directory: no bmap sidecar beside them.
    let z = d.join("z");
    std::fs::create_dir(&z).expect("mkdir");
    sh(&format!(
        "cd '{z}' && cp --sparse=always '{img}' n.img && zstd -q -3 n.img -o n.img.zst && xz -T1 -k -1 n.img \
         && gzip -k -1 n.img && bzip2 -k -1 n.img && img2simg n.img n.simg && rm n.img",
        z = z.display(),
        img = img.display()
    ));
    // raw + bmap beside its image.
    let bm = d.join("bm");
    std::fs::create_dir(&bm).expect("mkdir");
    sh(&format!(
        "cp --sparse=always '{img}' '{bm}/n.img' && bmaptool create -o '{bm}/n.img.bmap' '{bm}/n.img'",
        img = img.display(),
        bm = bm.display()
    ));
    let cases: Vec<(&str, PathBuf)> = vec![
        ("raw", img.clone()),
        ("zst", z.join("n.img.zst")),
        ("xz", z.join("n.img.xz")),
        ("gz", z.join("n.img.gz")),
        ("bz2", z.join("n.img.bz2")),
        ("bmap", bm.join("n.img")),
        ("simg", z.join("n.simg")),
    ];
    let want = blake3_of(&img, size);
    for (name, src) in &cases {
        // Loop device with old contents and room beyond the image.
        let backing = garbage_backing(d, &format!("{name}.backing"), IMG_MIB + 16);
        let lo = LoopDev::attach(&backing, &[]);
        let out = write_cmd(src, lo.path(), &[]);
        assert_eq!(code(&out), 0, "{name}: {}", text(&out));
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(stdout.contains("read back"), "{name}: summary: {stdout}");
        assert!(
            stdout.contains(&want),
            "{name}: digest in summary: {stdout}"
        );
        common::assert_same_prefix(&img, lo.path(), size);
        drop(lo);
        // Regular file target: identical and sparse.
        let out_file = d.join(format!("{name}.out"));
        let out = write_cmd(src, &out_file, &[]);
        assert_eq!(code(&out), 0, "{name} (file): {}", text(&out));
        assert_eq!(size_of(&out_file), size, "{name}: file length");
        common::assert_same_prefix(&img, &out_file, size);
        let allocated =
            std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&out_file).expect("stat"))
                * 512;
        assert!(
            allocated < size / 2,
            "{name}: file target not sparse: {allocated} of {size} bytes allocated"
        );
        std::fs::remove_file(&out_file).expect("rm");
        std::fs::remove_file(&backing).expect("rm");
    }
}

#[test]
fn stale_target_is_cleaned_without_discard_and_backup_gpt_is_cleared() {
    if !image_tools() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = make_nixos_like_image(d, "n.img", IMG_MIB, Table::Gpt);
    run(Command::new("bmaptool")
        .args(["create", "-o"])
        .arg(d.join("n.img.bmap"))
        .arg(&img));
    let size = size_of(&img);
    // An old, larger GPT disk full of garbage: its backup GPT sits in the last sectors.
    let backing = garbage_backing(d, "old.backing", 128);
    sh(&format!(
        "printf 'label: gpt\\nstart=2048, size=100MiB\\n' | sfdisk -q '{}'",
        backing.display()
    ));
    let lo = LoopDev::attach(&backing, &[]);
    let dev_size = 128u64 << 20;
    let mut tail = vec![0u8; 512];
    std::fs::File::open(lo.path())
        .expect("open")
        .read_exact_at(&mut tail, dev_size - 512)
        .expect("read");
    assert_eq!(&tail[..8], b"EFI PART", "test setup: backup GPT present");

    // --no-discard: old data stays in unmapped ranges, so only what the image maps is equal.
    let out = write_cmd(&img, lo.path(), &["--no-discard"]);
    assert_exit(&out, 0);
    std::fs::File::open(lo.path())
        .expect("open")
        .read_exact_at(&mut tail, dev_size - 512)
        .expect("read");
    assert!(
        tail.iter().all(|&b| b == 0),
        "stale backup GPT left at the end"
    );
    // Mapped ranges equal: `sbcflash verify` compares every mapped range.
    let out = verify_cmd(&img, lo.path());
    assert_exit(&out, 0);
    // The partition table is the image's (sfdisk reads the primary GPT).
    let dump = run(Command::new("sfdisk").arg("-d").arg(lo.path()));
    assert!(
        String::from_utf8_lossy(&dump.stdout).contains("name=\"NIXOS_SD\""),
        "{}",
        String::from_utf8_lossy(&dump.stdout)
    );
    // With discard (the default) the loop device punches holes: the whole image is equal.
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 0);
    common::assert_same_prefix(&img, lo.path(), size);
}

#[test]
fn mounted_loop_device_is_refused_and_untouched() {
    let Some((dir, img)) = image_for_loop_tests(&[], 40, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let lo = LoopDev::new_sparse(d, "m.backing", 80 << 20);
    // No lazy init: ext4lazyinit would write inode tables after mount and change the device
    // under the test's feet.
    run(Command::new("mkfs.ext4")
        .args(["-q", "-E", "lazy_itable_init=0,lazy_journal_init=0"])
        .arg(lo.path()));
    let mnt = d.join("mnt");
    std::fs::create_dir(&mnt).expect("mkdir");
    run(Command::new("mount").arg(lo.path()).arg(&mnt));
    let _m = Mounted { dir: mnt.clone() };
    std::fs::write(mnt.join("keep"), b"precious").expect("write file");
    run(&mut Command::new("sync"));
    let before = blake3_of(lo.path(), 80 << 20);
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 4);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("mounted at") && err.contains(&*mnt.to_string_lossy()),
        "{err}"
    );
    // --force does not override the mount rule.
    let out = write_cmd(&img, lo.path(), &["--force"]);
    assert_exit(&out, 4);
    assert_eq!(blake3_of(lo.path(), 80 << 20), before, "device changed");
}

#[test]
fn too_small_loop_device_is_refused_and_untouched() {
    let Some((dir, img)) = image_for_loop_tests(&[], IMG_MIB, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let backing = garbage_backing(d, "small.backing", 32);
    let lo = LoopDev::attach(&backing, &[]);
    let before = blake3_of(lo.path(), 32 << 20);
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 4);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("larger than the target"),
        "{}",
        text(&out)
    );
    assert_eq!(blake3_of(lo.path(), 32 << 20), before, "device changed");
}

#[test]
fn wrong_blake3_fails_verification_and_leaves_no_partition_table() {
    let Some((dir, img)) = image_for_loop_tests(&[], IMG_MIB, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let lo = LoopDev::new_sparse(d, "t.backing", IMG_MIB << 20);
    let wrong = "00".repeat(32);
    let out = write_cmd(&img, lo.path(), &["--blake3", &wrong]);
    assert_exit(&out, 6);
    assert_stdout_says(&out, "wrote", false);
    assert_head_unwritten(lo.path(), "partition table written despite mismatch");
    // A right digest, from a sidecar written by `sbcflash hash --write-sidecar`, passes.
    let out = sbcflash()
        .args(["hash", "--write-sidecar"])
        .arg(&img)
        .output()
        .expect("hash");
    assert_exit(&out, 0);
    let want = blake3_of(&img, size_of(&img));
    assert!(
        String::from_utf8_lossy(&out.stdout).starts_with(&want),
        "{}",
        text(&out)
    );
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 0);
    assert_stdout_says(&out, "digest verified", true);
}

#[test]
fn truncated_compressed_image_fails_without_success() {
    let Some((dir, img)) = image_for_loop_tests(&["zstd"], IMG_MIB, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    run(Command::new("zstd")
        .arg("-q")
        .arg(&img)
        .arg("-o")
        .arg(d.join("t.img.zst")));
    let zst = d.join("t.img.zst");
    let len = size_of(&zst);
    std::fs::OpenOptions::new()
        .write(true)
        .open(&zst)
        .expect("open")
        .set_len(len / 2)
        .expect("truncate");
    let lo = LoopDev::new_sparse(d, "t.backing", IMG_MIB << 20);
    let out = write_cmd(&zst, lo.path(), &[]);
    assert_exit(&out, 3);
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("t.img.zst"),
        "{}",
        text(&out)
    );
    assert_stdout_says(&out, "wrote", false);
    assert_head_unwritten(lo.path(), "partition table written from a broken image");
    // Every failed write says what it left on the target, in text and in both JSON errors.
    let incomplete = "the target is INCOMPLETE (no valid partition table was written)";
    assert!(
        String::from_utf8_lossy(&out.stderr).contains(incomplete),
        "{}",
        text(&out)
    );
    let out = write_cmd(&zst, lo.path(), &["--json"]);
    assert_exit(&out, 3);
    common::json::assert_documented(&String::from_utf8_lossy(&out.stdout));
    let errors: Vec<serde_json::Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v["event"] == "error")
        .collect();
    assert_eq!(errors.len(), 2, "{}", text(&out));
    for e in &errors {
        let m = e["message"].as_str().unwrap_or_default();
        assert!(m.contains(incomplete), "{e}");
    }
}

#[test]
fn sigint_mid_write_exits_130_and_leaves_no_partition_table() {
    let Some((dir, img)) = image_for_loop_tests(&[], IMG_MIB, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let fifo = d.join("image.fifo");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let lo = LoopDev::new_sparse(d, "t.backing", IMG_MIB << 20);
    let mut child = sbcflash()
        .arg("write")
        .arg(&fifo)
        .arg(lo.path())
        .args(["--yes", "--json"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn");
    // Feed the first 16 MiB, then stall with the FIFO still open: the source blocks.
    let mut w = std::fs::OpenOptions::new()
        .write(true)
        .open(&fifo)
        .expect("open fifo");
    let mut data = vec![0u8; 16 << 20];
    std::fs::File::open(&img)
        .expect("img")
        .read_exact(&mut data)
        .expect("read img");
    w.write_all(&data).expect("feed fifo");
    // Wait until sbcflash has started writing, then give it a moment to consume the data
    // (not a timing assertion: the outcome must be the same whenever the signal lands).
    let mut stdout = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    let mut line = String::new();
    loop {
        line.clear();
        let n = std::io::BufRead::read_line(&mut stdout, &mut line).expect("read events");
        assert!(n > 0, "sbcflash ended before writing");
        let v: serde_json::Value = serde_json::from_str(&line).expect("json event");
        if v["event"] == "start" {
            break;
        }
    }
    std::thread::sleep(std::time::Duration::from_millis(500));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(child.id() as i32),
        nix::sys::signal::Signal::SIGINT,
    )
    .expect("kill");
    let mut rest = String::new();
    let _ = stdout.read_to_string(&mut rest);
    common::json::assert_documented(&rest);
    let out = child.wait_with_output().expect("wait");
    drop(w);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(130),
        "stderr: {stderr}\nstdout: {rest}"
    );
    assert!(stderr.contains("INCOMPLETE"), "{stderr}");
    assert_head_unwritten(lo.path(), "partition table written on interrupt");
}

#[test]
fn loop_on_full_tmpfs_fails_with_offset_and_never_succeeds() {
    if !common::require(true, &["losetup", "mount", "sfdisk"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    // A dense 32 MiB disk image: random data everywhere, nothing to skip, a partition table.
    let img = d.join("dense.img");
    sh(&format!(
        "head -c $((32<<20)) /dev/urandom > '{0}' && printf 'label: dos\\nstart=1MiB, type=83\\n' | sfdisk -q '{0}'",
        img.display()
    ));
    let tm = TmpfsMount::new(&d.join("tiny"), "8M");
    let backing = tm.dir.join("b");
    std::fs::File::create(&backing)
        .expect("create")
        .set_len(64 << 20)
        .expect("size");
    let lo = LoopDev::attach(&backing, &[]);
    let out = write_cmd(&img, lo.path(), &[]);
    let all = text(&out);
    assert_eq!(code(&out), 5, "{all}");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("at offset"), "{all}");
    assert!(stderr.contains(&*lo.path().to_string_lossy()), "{all}");
    assert!(stderr.contains("the target is INCOMPLETE"), "{all}");
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("wrote"),
        "{all}"
    );
    drop(lo);
    drop(tm);
}

#[test]
fn verify_reports_the_offset_of_a_corrupted_range() {
    let Some((dir, img)) = image_for_loop_tests(&[], IMG_MIB, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let lo = LoopDev::new_sparse(d, "t.backing", IMG_MIB << 20);
    let out = write_cmd(&img, lo.path(), &["--no-verify"]);
    assert_exit(&out, 0);
    assert_stdout_says(&out, "NOT read back", true);
    let out = verify_cmd(&img, lo.path());
    assert_exit(&out, 0);
    // Corrupt the FAT boot sector (8 MiB) in the backing file behind the loop device.
    let bad_at = (8u64 << 20) + 3;
    std::fs::OpenOptions::new()
        .write(true)
        .open(&lo.backing)
        .expect("open backing")
        .write_all_at(b"XYZ", bad_at)
        .expect("corrupt");
    let out = verify_cmd(&img, lo.path());
    assert_exit(&out, 6);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!("offset {}", 8u64 << 20)),
        "{stderr}"
    );
}

#[test]
fn regular_file_image_written_to_itself_or_to_a_fifo_is_refused() {
    if !common::require(false, common::IMAGE_TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let img = make_nixos_like_image(dir.path(), "n.img", 40, Table::Mbr);
    let before = blake3_of(&img, size_of(&img));
    let out = write_cmd(&img, &img, &[]);
    assert_exit(&out, 4);
    assert_eq!(blake3_of(&img, size_of(&img)), before);
    let fifo = dir.path().join("f");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let out = write_cmd(&img, &fifo, &[]);
    assert_exit(&out, 4);
    assert!(String::from_utf8_lossy(&out.stderr).contains("neither a block device"));
}

#[test]
fn list_json_describes_disks() {
    if !common::require(true, &["losetup"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let lo = LoopDev::new_sparse(dir.path(), "l.backing", 8 << 20);
    let out = sbcflash()
        .args(["list", "--all", "--json"])
        .output()
        .expect("list");
    assert_exit(&out, 0);
    common::json::assert_documented(&String::from_utf8_lossy(&out.stdout));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let disks = v["disks"].as_array().expect("disks");
    let name = lo
        .path()
        .file_name()
        .expect("name")
        .to_string_lossy()
        .to_string();
    let me = disks
        .iter()
        .find(|d| d["name"] == name.as_str())
        .unwrap_or_else(|| panic!("{name} missing in {v}"));
    assert_eq!(me["bus"], "loop");
    assert_eq!(me["size"], 8u64 << 20);
    // The root disk is listed with --all and flagged as system.
    assert!(disks.iter().any(|d| d["system"] == true), "{v}");
}

/// Reads a whole file for before/after comparisons.
fn digest_of_file(p: &Path) -> String {
    blake3_of(p, size_of(p))
}

/// Issue 14, item 1: `sbcflash write /dev/loopN precious.img` (the arguments swapped) must not
/// replace the image with the device's contents, with or without --yes.
#[test]
fn swapped_arguments_leave_the_image_file_untouched() {
    let Some((dir, img)) = image_for_loop_tests(&[], 40, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let lo = LoopDev::new_sparse(d, "disk.backing", 48 << 20);
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 0);
    let precious = d.join("precious.img");
    std::fs::copy(&img, &precious).expect("copy");
    let before = digest_of_file(&precious);
    for extra in [&[][..], &["--yes"]] {
        let out = sbcflash()
            .arg("write")
            .arg(lo.path())
            .arg(&precious)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .expect("run");
        assert_exit(&out, 4);
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("did you swap IMAGE and TARGET?"),
            "{}",
            text(&out)
        );
        assert_eq!(
            digest_of_file(&precious),
            before,
            "{extra:?}: image changed"
        );
    }
    // An existing file that is itself an image (here: a compressed one) is refused the same way.
    run(Command::new("gzip").arg("-k").arg(&precious));
    let gz = d.join("precious.img.gz");
    let gz_before = digest_of_file(&gz);
    let out = write_cmd(&img, &gz, &[]);
    assert_exit(&out, 4);
    assert!(
        text(&out).contains("looks like an image (gzip-compressed"),
        "{}",
        text(&out)
    );
    assert_eq!(digest_of_file(&gz), gz_before);
    // --force is the override: then the file is written like any target.
    let out = write_cmd(&img, &precious, &["--force"]);
    assert_exit(&out, 0);
    assert_eq!(digest_of_file(&precious), before);
}

/// Issue 14, item 1: an existing non-empty file is destroyed like a disk: without a terminal
/// and without --yes it is refused; a new file needs no question.
#[test]
fn existing_file_target_needs_yes_and_a_new_one_does_not() {
    if !common::require(false, common::IMAGE_TOOLS) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let img = make_nixos_like_image(d, "n.img", 40, Table::Mbr);
    let notes = d.join("notes.bin");
    let noise: Vec<u8> = (0..100_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&notes, &noise).expect("write");
    let no_yes = |target: &Path| {
        sbcflash()
            .arg("write")
            .arg(&img)
            .arg(target)
            .stdin(Stdio::null())
            .output()
            .expect("run")
    };
    let out = no_yes(&notes);
    assert_exit(&out, 4);
    assert!(text(&out).contains("existing file"), "{}", text(&out));
    assert!(text(&out).contains("pass --yes"), "{}", text(&out));
    assert_eq!(std::fs::read(&notes).expect("read"), noise);
    let out = write_cmd(&img, &notes, &[]);
    assert_exit(&out, 0);
    common::assert_same_prefix(&img, &notes, size_of(&img));
    // A new file, and an empty one: no question.
    for name in ["new.img", "empty.img"] {
        let t = d.join(name);
        if name == "empty.img" {
            std::fs::write(&t, b"").expect("create");
        }
        let out = no_yes(&t);
        assert_exit(&out, 0);
        common::assert_same_prefix(&img, &t, size_of(&img));
    }
}

/// Issue 14, item 2: a tar.gz, a zip whose one member is not an image, a text file and an empty file are refused (exit 3, named)
/// before the target is touched, from a file and from a pipe; --raw writes a blob anyway.
#[test]
fn sources_that_are_not_disk_images_are_refused_before_the_target_is_touched() {
    if !loop_tools(&["tar", "gzip", "python3"]) {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    sh(&format!(
        r#"
cd "{d}"
mkdir -p tree && printf 'hello\n' > tree/a.txt && head -c 100000 /dev/urandom > tree/blob
tar czf rootfs.tar.gz tree
python3 -c 'import zipfile; z = zipfile.ZipFile("image.zip", "w"); z.write("tree/blob"); z.close()'
printf 'Flash this image with dd.\n' > README.txt
: > empty.img
"#,
        d = d.display()
    ));
    let backing = garbage_backing(d, "disk.backing", 8);
    let lo = LoopDev::attach(&backing, &[]);
    let untouched = || {
        std::fs::read(&backing)
            .expect("read backing")
            .iter()
            .all(|&b| b == 0xA5)
    };
    for (name, what) in [
        ("rootfs.tar.gz", "it is a tar archive"),
        // A zip is opened as an image container: its one member is what gets judged.
        ("image.zip", "it is unrecognised data"),
        ("README.txt", "it is text"),
        ("empty.img", "it is empty"),
    ] {
        let out = write_cmd(&d.join(name), lo.path(), &[]);
        assert_exit(&out, 3);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("does not look like a disk image") && err.contains(what),
            "{name}: {err}"
        );
        assert!(err.contains("--raw"), "{name}: {err}");
        assert!(untouched(), "{name}: the target was written");
        // Streamed: decided on the peeked head of the pipe.
        let f = std::fs::File::open(d.join(name)).expect("open");
        let out = sbcflash()
            .args(["write", "/dev/stdin"])
            .arg(lo.path())
            .arg("--yes")
            .stdin(f)
            .output()
            .expect("run");
        assert_exit(&out, 3);
        assert!(text(&out).contains(what), "{name} piped: {}", text(&out));
        assert!(untouched(), "{name} piped: the target was written");
    }
    // A board medium that holds only a bootloader (here the VisionFive 2's SPI flash) takes a
    // blob without --raw: a bootloader binary has none of a disk image's signatures.
    let blob = d.join("spl.bin");
    std::fs::copy(d.join("tree/blob"), &blob).expect("copy");
    let out = write_cmd(&blob, &d.join("spi.bin"), &["--board", "vf2", "--spi"]);
    assert_exit(&out, 0);
    let out = write_cmd(&blob, &d.join("sd.bin"), &["--board", "vf2"]);
    assert_exit(&out, 3);
    assert!(
        text(&out).contains("it is unrecognised data"),
        "{}",
        text(&out)
    );
    let out = write_cmd(&d.join("README.txt"), lo.path(), &["--raw"]);
    assert_exit(&out, 0);
    let mut head = [0u8; 26];
    std::fs::File::open(&backing)
        .expect("open")
        .read_exact_at(&mut head, 0)
        .expect("read");
    assert_eq!(&head, b"Flash this image with dd.\n");
}

/// Issue 14, item 4: a user who may not open the device gets exit 8 and the fix (root, or the
/// group that owns the device), not "Permission denied" and exit 5.
#[test]
fn permission_denied_on_the_target_exits_8_and_names_the_group() {
    let Some((dir, img)) = image_for_loop_tests(&["setpriv", "mknod"], 40, Table::Mbr) else {
        return;
    };
    let d = dir.path();
    let lo = LoopDev::new_sparse(d, "disk.backing", 48 << 20);
    // A private node for the loop device, owned by group `disk` like a udev-made /dev/sdX.
    let md = std::fs::metadata(lo.path()).expect("stat");
    let node = d.join("node");
    use std::os::unix::fs::MetadataExt;
    run(Command::new("mknod")
        .arg(&node)
        .arg("b")
        .arg(libc::major(md.rdev()).to_string())
        .arg(libc::minor(md.rdev()).to_string()));
    run(Command::new("chgrp").arg("disk").arg(&node));
    run(Command::new("chmod").arg("660").arg(&node));
    run(Command::new("chmod").arg("755").arg(d));
    run(Command::new("chmod").arg("644").arg(&img));
    let out = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_sbcflash"))
        .arg("write")
        .arg(&img)
        .arg(&node)
        .arg("--yes")
        .env("HOME", d)
        .env("XDG_CONFIG_HOME", d)
        .stdin(Stdio::null())
        .output()
        .expect("run as nobody");
    assert_exit(&out, 8);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("permission denied"), "{err}");
    assert!(err.contains("root"), "{err}");
    assert!(err.contains("group `disk`"), "{err}");
    assert_head_unwritten(lo.path(), "written although permission was denied");
}

/// Issue 14, item 13: `--eject` powers off USB disks only; on a loop device it is refused
/// before anything is written, with the reason.
#[test]
fn eject_of_a_loop_device_is_refused_before_writing() {
    let Some((dir, img)) = image_for_loop_tests(&[], 40, Table::Mbr) else {
        return;
    };
    let lo = LoopDev::new_sparse(dir.path(), "disk.backing", 48 << 20);
    let out = write_cmd(&img, lo.path(), &["--eject"]);
    assert_exit(&out, 4);
    assert!(
        text(&out).contains("--eject: it is a loop device, and only a USB disk can be powered off"),
        "{}",
        text(&out)
    );
    assert_head_unwritten(lo.path(), "written although --eject was refused");
    // Without --eject the same write works, and a loop device is not called removable.
    let out = write_cmd(&img, lo.path(), &[]);
    assert_exit(&out, 0);
    assert!(
        !text(&out).contains("can be removed safely"),
        "{}",
        text(&out)
    );
}
