//! `sbcflash read` on real loop devices: write an image, change its files, capture it, write
//! the capture to a second device with sbcflash and with the real `bmaptool`, then `fsck` and
//! compare the files. And `check-card` on a good loop device (the card's data survives).

mod common;

use common::{make_nixos_like_image, run, sbcflash, sh, LoopDev, Table, IMAGE_TOOLS};
use std::path::{Path, PathBuf};
use std::process::Command;

fn work_dir(name: &str) -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).expect("work dir");
    d
}

/// A mount of a window of a device (its own loop device, cleared on umount); unmounted on
/// drop, even on panic.
struct Mount(PathBuf);

impl Mount {
    fn new(dev: &Path, offset: u64, size: u64, dir: &Path, ro: bool) -> Mount {
        std::fs::create_dir_all(dir).expect("mount point");
        let mode = if ro { "ro" } else { "rw" };
        // A window goes through its own loop device; size 0 mounts the device itself.
        let opts = match size {
            0 => mode.to_string(),
            _ => format!("{mode},offset={offset},sizelimit={size}"),
        };
        run(Command::new("mount").arg("-o").arg(opts).arg(dev).arg(dir));
        Mount(dir.to_path_buf())
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).output();
    }
}

const MIB: u64 = 1 << 20;
const FW: (u64, u64) = (8 * MIB, 16 * MIB);
const ROOT: (u64, u64) = (24 * MIB, 72 * MIB);

fn json_result(out: &std::process::Output) -> serde_json::Value {
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "result")
        .unwrap_or_else(|| panic!("no result line in {text}"))
}

/// A second loop device of `size` bytes full of garbage (no zero bytes), with `w/cap.img.zst`
/// written onto it by sbcflash (which takes the bmap beside it); the write reports the
/// capture's digest from `rep`.
fn write_capture_to_a_dirty_device(w: &Path, size: u64, rep: &serde_json::Value) -> LoopDev {
    let b = LoopDev::new_sparse(w, "b.bin", size);
    sh(&format!(
        "head -c {} /dev/urandom | tr '\\000' x > {}",
        size,
        b.path().display()
    ));
    let o = run(sbcflash()
        .args(["write", "--yes"])
        .arg(w.join("cap.img.zst"))
        .arg(b.path()));
    assert!(String::from_utf8_lossy(&o.stdout).contains(rep["blake3"].as_str().unwrap()));
    b
}

fn fsck_both(dev: &Path) {
    let root = LoopDev::attach(
        dev,
        &[
            "-o",
            &ROOT.0.to_string(),
            "--sizelimit",
            &ROOT.1.to_string(),
        ],
    );
    run(Command::new("e2fsck").args(["-fn"]).arg(root.path()));
    let fw = LoopDev::attach(
        dev,
        &["-o", &FW.0.to_string(), "--sizelimit", &FW.1.to_string()],
    );
    run(Command::new("fsck.vfat").arg("-n").arg(fw.path()));
}

#[test]
fn read_captures_used_blocks_and_round_trips_through_a_second_device() {
    let mut tools = IMAGE_TOOLS.to_vec();
    tools.extend(["e2fsck", "fsck.vfat", "bmaptool", "zstd", "mdir"]);
    if !common::require(true, &tools) {
        return;
    }
    let w = work_dir("capture-round-trip");
    let img = make_nixos_like_image(&w, "sd.img", 96, Table::Mbr);
    // The card is larger than the image: the capture must end after the last partition.
    let a = LoopDev::new_sparse(&w, "a.bin", 160 * MIB);
    let o = run(sbcflash().args(["write", "--yes"]).arg(&img).arg(a.path()));
    assert!(o.status.success());

    // Change files on both file systems; leave 24 MiB of random junk in freed ext4 blocks.
    {
        let m = Mount::new(a.path(), ROOT.0, ROOT.1, &w.join("a"), false);
        sh(&format!(
            "cd {d} && head -c 24000000 /dev/urandom > junk && sync && rm junk && \
             head -c 5000000 /dev/urandom > new-file && rm nix/store/abc-hello/README && \
             echo changed >> boot/extlinux/extlinux.conf && sync",
            d = m.0.display()
        ));
    }
    sh(&format!(
        "head -c 700000 /dev/urandom > {d}/fw-new && mcopy -i {a}@@{off} {d}/fw-new ::fw-new",
        d = w.display(),
        a = a.path().display(),
        off = FW.0
    ));

    let o = run(sbcflash()
        .args(["--json", "read"])
        .arg(a.path())
        .arg(w.join("cap")));
    let r = json_result(&o);
    let rep = &r["report"];
    assert_eq!(
        rep["image_size"],
        96 * MIB,
        "trimmed after partition 2: {rep}"
    );
    let parts = rep["plan"]["partitions"].as_array().unwrap();
    assert_eq!(parts.len(), 2, "{rep}");
    assert!(parts[0]["fs"].as_str().unwrap().starts_with("FAT"), "{rep}");
    assert_eq!(parts[1]["fs"], "ext2/3/4", "{rep}");
    assert!(parts.iter().all(|p| p["whole_because"].is_null()), "{rep}");
    // Used data: ~3 MB hello + 5 MB new file + fs metadata + FAT + 8 MiB before partition 1;
    // the 24 MB of deleted junk is not captured.
    let mapped = rep["mapped_bytes"].as_u64().unwrap();
    assert!(
        mapped < 40 * MIB,
        "{mapped} bytes mapped: free blocks were read"
    );
    assert!(mapped > 16 * MIB, "{mapped}");
    for f in ["cap.img.zst", "cap.img.bmap", "cap.img.blake3"] {
        assert!(w.join(f).exists(), "{f}");
    }
    let b3 = std::fs::read_to_string(w.join("cap.img.blake3")).unwrap();
    assert!(b3.starts_with(rep["blake3"].as_str().unwrap()), "{b3}");

    // Outputs are never overwritten without --force.
    let o = sbcflash()
        .args(["read"])
        .arg(a.path())
        .arg(w.join("cap"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");

    // --raw: a sparse file with the same logical bytes.
    run(sbcflash()
        .args(["-q", "read", "--raw"])
        .arg(a.path())
        .arg(w.join("raw")));
    sh(&format!(
        "cd {} && zstd -dcq cap.img.zst | cmp - raw.img && test $(du -k raw.img | cut -f1) -lt 45000",
        w.display()
    ));

    // Onto a second, dirty device with sbcflash (which takes the bmap next to the .zst).
    let b = write_capture_to_a_dirty_device(&w, 128 * MIB, rep);
    fsck_both(b.path());
    {
        let ma = Mount::new(a.path(), ROOT.0, ROOT.1, &w.join("ma"), true);
        let mb = Mount::new(b.path(), ROOT.0, ROOT.1, &w.join("mb"), true);
        run(Command::new("diff").arg("-r").arg(&ma.0).arg(&mb.0));
        assert!(mb.0.join("new-file").exists());
    }
    sh(&format!(
        "cd {d} && mcopy -n -i {b}@@{off} ::fw-new fw-back && cmp fw-new fw-back && \
         mcopy -n -i {b}@@{off} ::config.txt cfg-b && mcopy -n -i {a}@@{off} ::config.txt cfg-a && cmp cfg-a cfg-b",
        d = w.display(),
        a = a.path().display(),
        b = b.path().display(),
        off = FW.0
    ));

    // The real bmaptool accepts the capture (bmap file checksum, per-range sha256).
    let c = LoopDev::new_sparse(&w, "c.bin", 128 * MIB);
    run(Command::new("bmaptool")
        .arg("copy")
        .arg(w.join("cap.img.zst"))
        .arg(c.path()));
    fsck_both(c.path());
    drop((a, b, c));
    let _ = std::fs::remove_dir_all(&w);
}

/// A disk with no partition table holding one ext4 file system, and a partition with
/// unknown contents: the first is mapped by its bitmaps, the second copied whole (warned).
#[test]
fn read_maps_a_bare_file_system_and_copies_unknown_partitions_whole() {
    if !common::require(false, &["mkfs.ext4", "sfdisk"]) {
        return;
    }
    let w = work_dir("capture-bare");
    sh(&format!(
        "cd {} && truncate -s 64M bare.img && mkfs.ext4 -q bare.img && \
         truncate -s 32M unk.img && printf 'label: dos\\nstart=1MiB, size=8MiB, type=83\\n' | sfdisk -q unk.img && \
         head -c 8M /dev/urandom | dd of=unk.img bs=1M seek=1 conv=notrunc status=none",
        w.display()
    ));
    let o = run(sbcflash()
        .args(["--json", "read", "--raw"])
        .arg(w.join("bare.img"))
        .arg(w.join("bare-cap")));
    let rep = &json_result(&o)["report"];
    assert_eq!(rep["plan"]["table"], "none", "{rep}");
    assert_eq!(rep["image_size"], 64 * MIB);
    assert!(rep["mapped_bytes"].as_u64().unwrap() < 16 * MIB, "{rep}");
    run(Command::new("e2fsck")
        .arg("-fn")
        .arg(w.join("bare-cap.img")));

    let o = run(sbcflash()
        .args(["--json", "read"])
        .arg(w.join("unk.img"))
        .arg(w.join("unk-cap")));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(
        text.contains("copied whole (unknown)"),
        "a warning names the partition copied whole: {text}"
    );
    let rep = &json_result(&o)["report"];
    assert_eq!(rep["image_size"], 9 * MIB, "{rep}");
    assert_eq!(rep["mapped_bytes"], 9 * MIB, "{rep}");
    sh(&format!(
        "cd {} && zstd -dcq unk-cap.img.zst | cmp - <(head -c {} unk.img)",
        w.display(),
        9 * MIB
    ));

    // A partition table that points past the end of the disk: exit 3, named, nothing written.
    sh(&format!("truncate -s 5M {}", w.join("unk.img").display()));
    let o = sbcflash()
        .args(["read"])
        .arg(w.join("unk.img"))
        .arg(w.join("cut"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(
            "unk.img: partition 1 ends at byte 9437184, beyond the end of the disk (5242880 bytes)"
        ),
        "{err}"
    );
    assert!(std::fs::read_dir(&w).unwrap().all(|e| !e
        .unwrap()
        .file_name()
        .to_string_lossy()
        .starts_with("cut")));
    let _ = std::fs::remove_dir_all(&w);
}

/// A FAT32 file system on a whole disk ("superfloppy", no partition table: its boot sector
/// also ends in 0x55AA) is mapped by its FAT, and the capture passes `fsck.vfat`. Its boot code
/// (in the boot sector and its backup) holds bytes that read as a partition entry beyond the
/// disk, as other formatters' boot code can: they are not taken for a partition table.
#[test]
fn read_maps_a_superfloppy_fat32() {
    if !common::require(false, &["mkfs.vfat", "mcopy", "fsck.vfat"]) {
        return;
    }
    let w = work_dir("capture-fat32");
    sh(&format!(
        "cd {} && truncate -s 128M fat.img && mkfs.vfat -F 32 fat.img >/dev/null && \
         for at in 446 3518; do printf '\\x80\\x01\\x01\\x00\\x83\\xfe\\xff\\xff\\x00\\x08\\x00\\x00\\x00\\x00\\x80\\x00' | \
           dd of=fat.img bs=1 seek=$at conv=notrunc status=none; done && \
         head -c 3000000 /dev/urandom > a && mcopy -i fat.img a ::a && \
         head -c 20000000 /dev/urandom > junk && mcopy -i fat.img junk ::junk && mdel -i fat.img ::junk",
        w.display()
    ));
    let o = run(sbcflash()
        .args(["--json", "read", "--raw"])
        .arg(w.join("fat.img"))
        .arg(w.join("cap")));
    let rep = &json_result(&o)["report"];
    assert_eq!(rep["plan"]["table"], "none", "{rep}");
    assert_eq!(rep["plan"]["partitions"][0]["fs"], "FAT32", "{rep}");
    let mapped = rep["mapped_bytes"].as_u64().unwrap();
    assert!((3 * MIB..8 * MIB).contains(&mapped), "{rep}");
    run(Command::new("fsck.vfat").arg("-n").arg(w.join("cap.img")));
    sh(&format!(
        "cd {} && mcopy -n -i cap.img ::a a.back && cmp a a.back",
        w.display()
    ));
    let _ = std::fs::remove_dir_all(&w);
}

/// A GPT disk larger than its image (the image written to a bigger card): the capture ends
/// after the last partition with a rebuilt backup table, so it is a valid GPT disk of its own
/// (`sfdisk --verify` finds no error, while the source has its backup in the middle), its file
/// system is clean, and `bmaptool copy` reproduces it.
#[test]
fn read_trims_a_gpt_disk_and_rebuilds_its_backup_table() {
    let mut tools = IMAGE_TOOLS.to_vec();
    tools.extend(["e2fsck", "bmaptool"]);
    if !common::require(false, &tools) {
        return;
    }
    let w = work_dir("capture-gpt");
    // (make_nixos_like_image's GPT file system is 1 MiB larger than its partition.)
    let img = w.join("gpt.img");
    sh(&format!(
        "cd {} && truncate -s 96M gpt.img && printf 'label: gpt\\nstart=8MiB, size=16MiB, \
         type=EBD0A0A2-B9E5-4433-87C0-68B6B72699C7\\nstart=24MiB, size=71MiB, \
         type=0FC63DAF-8483-4772-8E79-3D69D8477DE4\\n' | sfdisk -q gpt.img && \
         mkfs.ext4 -q -E offset=$((24*1024*1024)) gpt.img 71M && truncate -s 160M gpt.img",
        w.display()
    ));
    let o = run(sbcflash()
        .args(["--json", "read", "--raw"])
        .arg(&img)
        .arg(w.join("cap")));
    let rep = &json_result(&o)["report"];
    assert_eq!(rep["plan"]["table"], "GPT", "{rep}");
    // Partition 2 ends at 95 MiB; then 32 sectors of entries and the backup header.
    assert_eq!(rep["image_size"], 95 * MIB + 33 * 512, "{rep}");
    assert_eq!(rep["plan"]["partitions"][1]["fs"], "ext2/3/4", "{rep}");
    assert!(
        rep["plan"]["partitions"][1]["whole_because"].is_null(),
        "{rep}"
    );
    let v = sh(&format!("cd {} && sfdisk --verify cap.img", w.display()));
    assert!(
        String::from_utf8_lossy(&v.stdout).contains("No errors detected"),
        "{v:?}"
    );
    sh(&format!(
        "cd {} && dd if=cap.img of=root.img bs=1M skip=24 count=71 status=none && e2fsck -fn root.img && \
         bmaptool copy cap.img copy.img && cmp cap.img copy.img",
        w.display()
    ));
    let _ = std::fs::remove_dir_all(&w);
}

/// A mounted disk is not read (exit 4, nothing written); `--force` reads it anyway.
#[test]
fn read_refuses_a_mounted_disk() {
    if !common::require(true, &["mkfs.ext4"]) {
        return;
    }
    let w = work_dir("capture-mounted");
    let a = LoopDev::new_sparse(&w, "fs.bin", 32 * MIB);
    run(Command::new("mkfs.ext4").arg("-q").arg(a.path()));
    let m = Mount::new(a.path(), 0, 0, &w.join("m"), false);
    let o = sbcflash()
        .args(["read"])
        .arg(a.path())
        .arg(w.join("cap"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("mounted at"),
        "{o:?}"
    );
    assert!(!w.join("cap.img.zst").exists() && !w.join("cap.img.zst.part").exists());
    run(sbcflash()
        .args(["-q", "read", "--force"])
        .arg(a.path())
        .arg(w.join("cap")));
    assert!(w.join("cap.img.zst").exists());
    drop(m);
    drop(a);
    let _ = std::fs::remove_dir_all(&w);
}

/// A good card passes, and the probed blocks keep their contents.
#[test]
fn check_card_passes_a_good_loop_device_and_keeps_its_data() {
    if !common::require(true, &["losetup"]) {
        return;
    }
    let w = work_dir("check-good");
    let a = LoopDev::new_sparse(&w, "card.bin", 64 * MIB);
    sh(&format!(
        "head -c {} /dev/urandom > {}",
        64 * MIB,
        a.path().display()
    ));
    let before = blake3::hash(&std::fs::read(&a.backing).unwrap());
    // Without --yes and without a terminal: refused, nothing written.
    let o = sbcflash()
        .args(["check-card"])
        .arg(a.path())
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    let o = run(sbcflash()
        .args(["--json", "check-card", "--yes", "--probes", "200"])
        .arg(a.path()));
    let r = json_result(&o);
    assert_eq!(r["ok"], true, "{r}");
    assert_eq!(r["report"]["usable_size"], 64 * MIB);
    assert_eq!(r["report"]["restored"], true);
    assert!(r["report"]["probes"].as_u64().unwrap() > 100, "{r}");
    drop(a);
    let after = blake3::hash(&std::fs::read(w.join("card.bin")).unwrap());
    assert_eq!(before, after, "the card's data changed");
    let _ = std::fs::remove_dir_all(&w);
}

/// A btrfs partition (DUP metadata, the mkfs default) with files written, a zstd-compressed
/// subvolume and a snapshot sharing its extents, one large file deleted: the capture takes the extents btrfs's extent tree marks in use, not its free space
/// nor its whole chunks; written to a second dirty device it passes `btrfs check`, and every
/// file reads back identical.
#[test]
fn read_maps_btrfs_by_its_extent_tree_and_round_trips() {
    if !common::require(true, &["mkfs.btrfs", "btrfs", "sfdisk", "sha256sum"]) {
        return;
    }
    let w = work_dir("capture-btrfs");
    const PART: (u64, u64) = (MIB, 320 * MIB);
    let a = LoopDev::new_sparse(&w, "a.bin", 400 * MIB);
    sh(&format!(
        "printf 'label: dos\\nstart=2048, size={}, type=83\\n' | sfdisk -q {}",
        PART.1 / 512,
        a.path().display()
    ));
    {
        let p = LoopDev::attach(
            a.path(),
            &[
                "-o",
                &PART.0.to_string(),
                "--sizelimit",
                &PART.1.to_string(),
            ],
        );
        run(Command::new("mkfs.btrfs").args(["-q", "-f"]).arg(p.path()));
        let m = Mount::new(p.path(), 0, 0, &w.join("a"), false);
        sh(&format!(
            "cd {d} && head -c 60000000 /dev/urandom > freed && sync && \
             head -c 40000000 /dev/urandom > big && mkdir -p etc/sub && echo hello > etc/small && \
             for i in $(seq 1 200); do echo file $i > etc/sub/f$i; done && \
             head -c 3000000 /dev/urandom > etc/sub/mid && \
             btrfs -q subvolume create sv && btrfs property set sv compression zstd && \
             awk 'BEGIN {{ for (i = 0; i < 1000000; i++) print \"compressible line\", i }}' > sv/text && head -c 2000000 /dev/urandom > sv/bin && \
             btrfs -q subvolume snapshot sv snap && echo after >> sv/text && \
             sync && rm freed && sync && \
             find . -type f | sort | xargs sha256sum > {w}/sums",
            d = m.0.display(),
            w = w.display()
        ));
    }

    let o = run(sbcflash()
        .args(["--json", "read"])
        .arg(a.path())
        .arg(w.join("cap")));
    let rep = &json_result(&o)["report"];
    let part = &rep["plan"]["partitions"][0];
    assert_eq!(part["fs"], "btrfs", "{rep}");
    assert!(part["whole_because"].is_null(), "{rep}");
    // ~43 MB of files, metadata and the first MiB: not the 60 MB deleted, not 320 MiB.
    let mapped = rep["mapped_bytes"].as_u64().unwrap();
    assert!(
        (40 * MIB..72 * MIB).contains(&mapped),
        "{mapped} bytes mapped: {rep}"
    );

    let b = write_capture_to_a_dirty_device(&w, 400 * MIB, rep);
    drop(a);
    let p = LoopDev::attach(
        b.path(),
        &[
            "-o",
            &PART.0.to_string(),
            "--sizelimit",
            &PART.1.to_string(),
        ],
    );
    run(Command::new("btrfs")
        .args(["check", "--readonly"])
        .arg(p.path()));
    {
        let m = Mount::new(p.path(), 0, 0, &w.join("b"), true);
        sh(&format!(
            "cd {} && sha256sum --quiet -c {}/sums && test ! -e freed && \
             test $(find . -type f | wc -l) = $(wc -l < {}/sums)",
            m.0.display(),
            w.display(),
            w.display()
        ));
    }
    drop((p, b));
    let _ = std::fs::remove_dir_all(&w);
}
