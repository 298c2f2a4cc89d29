//! The factory station against real peers: Debian's systemd-udevd (started here), loop devices
//! as cards in configured slots, a tiny tmpfs for real I/O errors, blkio throttling so "mid-write"
//! is a state the test can reach without timing guesses, mtools to read back identity files
//! (a different FAT implementation than the one that wrote them), and the ledger via
//! `station report`.
//!
//! Every test that starts udevd has `udevd` in its name (nextest runs those one at a time);
//! under plain `cargo test` a lock serialises them too.

mod common;

use common::station::{
    backing, is_msg, is_start, read_range, udevd_present, udevd_serial, write_loop_config, Station,
    Throttle,
};
use common::{make_nixos_like_image, require, run, sbcflash, LoopDev, Table, Udevd};
use serde_json::Value;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

const MIB: u64 = 1 << 20;
/// Layout of `make_nixos_like_image`: FAT "FIRMWARE" at 8 MiB, 16 MiB long; ext4 after.
const FAT_OFF: u64 = 8 * MIB;
const FAT_LEN: u64 = 16 * MIB;
const IMG_MIB: u64 = 48;
/// A watchdog against a hung peer, not a performance threshold.
const WATCHDOG: Duration = Duration::from_secs(300);

const TOOLS: &[&str] = &[
    "losetup",
    "udevadm",
    "sfdisk",
    "mkfs.vfat",
    "mkfs.ext4",
    "mcopy",
    "mtype",
    "mdir",
    "blockdev",
];

/// Root, the tools and `extra`, and udevd (else skipped); the udevd lock, held for the test.
fn udevd_lock(extra: &[&str]) -> Option<MutexGuard<'static, ()>> {
    if !require(true, TOOLS)
        || !require(true, extra)
        || !udevd_present() && !require(true, &["systemd-udevd"])
    {
        return None;
    }
    Some(udevd_serial())
}

/// The start of a test on real cards: [`udevd_lock`], a directory and the image in it.
fn udevd_setup() -> Option<(MutexGuard<'static, ()>, tempfile::TempDir, PathBuf)> {
    let serial = udevd_lock(&[])?;
    let tmp = tempfile::tempdir().unwrap();
    let img = make_nixos_like_image(tmp.path(), "nixos.img", IMG_MIB, Table::Mbr);
    Some((serial, tmp, img))
}

/// Cards into their readers: a loop device on each backing file, in order, once udev has
/// handled them all.
fn insert<const N: usize>(backing: [&Path; N]) -> [LoopDev; N] {
    let devs = backing.map(|b| LoopDev::attach(b, &[]));
    Udevd::settle();
    devs
}

/// A station whose writes to each `(device, bytes per second)` are throttled from its start.
fn throttled_station(
    dir: &Path,
    cfg: &Path,
    args: &[&str],
    slow: &[(&Path, u64)],
) -> (Throttle, Station) {
    let throttle = Throttle::new("sbcflash-test");
    for (dev, bytes_per_sec) in slow {
        throttle.limit_writes(dev, *bytes_per_sec);
    }
    let st = Station::spawn(dir, cfg, args);
    throttle.add(st.pid());
    (throttle, st)
}

/// A tmpfs of `size` mounted on a fresh directory; unmounted (by its path) on drop.
struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("size={size}"))
            .arg("sbcflash-test")
            .arg(dir));
        Tmpfs {
            dir: dir.to_path_buf(),
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        for _ in 0..20 {
            if Command::new("umount")
                .arg(&self.dir)
                .status()
                .map(|s| s.success())
                .unwrap_or(false)
            {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        let _ = Command::new("umount").arg("-l").arg(&self.dir).status();
    }
}

/// Writes a station config for `slots` (name, backing file) and returns its path.
fn write_config(dir: &Path, image: &Path, slots: &[(&str, &Path)], extra: &str) -> PathBuf {
    let head = format!(
        r#"board = "orangepi-5"
ledger = "ledger.sqlite"
log_dir = "logs"
image = "{}"
{extra}
[identity]
serial = "OPI5-{{date}}-{{seq:05}}"
hostname = "{{serial_lower}}"
[[identity.file]]
path = "sbcflash/identity.json"
template = '{{"serial": "{{serial}}", "hostname": "{{hostname}}", "slot": "{{slot}}"}}'
[[identity.file]]
path = "hostname"
template = "{{hostname}}\n"
"#,
        image.display()
    );
    write_loop_config(dir, &head, slots)
}

fn report(config: &Path) -> Vec<Value> {
    let o = run(sbcflash()
        .args(["station", "report", "--format", "json", "--config"])
        .arg(config));
    let v: Value = serde_json::from_slice(&o.stdout).expect("report is JSON");
    v.as_array().expect("report is an array").clone()
}

fn mtools(args: &[&str], image_at: &str) -> String {
    let o = run(Command::new(args[0])
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(image_at)
        .args(&args[1..]));
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// The sectors of the FAT partition that differ between image and device may only be the
/// FAT tables, the root directory, or clusters that are free in the image: injecting the
/// identity files must not disturb a byte of what the image holds.
fn check_fat_changes_only_free_space(img: &Path, dev: &Path) {
    let a = read_range(img, FAT_OFF, FAT_LEN);
    let b = read_range(dev, FAT_OFF, FAT_LEN);
    let le16 = |x: &[u8], o: usize| u16::from_le_bytes([x[o], x[o + 1]]) as u64;
    let bps = le16(&a, 11);
    let spc = a[13] as u64;
    let reserved = le16(&a, 14);
    let nfats = a[16] as u64;
    let root_entries = le16(&a, 17);
    let fatsz = le16(&a, 22);
    assert!(fatsz > 0, "test image is expected to be FAT12/16");
    let fat_end = reserved + nfats * fatsz;
    let data_start = fat_end + (root_entries * 32).div_ceil(bps);
    let total_sectors = FAT_LEN / bps;
    let clusters = (total_sectors - data_start) / spc;
    let fat16 = clusters >= 4085;
    let fat = &a[(reserved * bps) as usize..((reserved + fatsz) * bps) as usize];
    let entry = |c: u64| -> u64 {
        if fat16 {
            le16(fat, (c * 2) as usize)
        } else {
            let o = (c * 3 / 2) as usize;
            let v = le16(fat, o);
            if c % 2 == 0 {
                v & 0xfff
            } else {
                v >> 4
            }
        }
    };
    let mut changed_data = 0;
    for s in 0..total_sectors {
        let r = (s * bps) as usize..((s + 1) * bps) as usize;
        if a[r.clone()] == b[r] {
            continue;
        }
        if s < reserved {
            panic!("{}: FAT boot/reserved sector {s} changed", dev.display());
        }
        if s < data_start {
            continue; // FAT tables and root directory
        }
        let c = (s - data_start) / spc + 2;
        assert_eq!(
            entry(c),
            0,
            "{}: sector {s} (cluster {c}) changed, but that cluster holds image data",
            dev.display()
        );
        changed_data += 1;
    }
    assert!(
        changed_data > 0,
        "{}: no new data clusters written",
        dev.display()
    );
}

/// A flashed unit: byte for byte outside the FAT partition, only free space used inside it,
/// the image's own FAT file intact, and the identity files as expected (read by mtools).
fn check_unit(img: &Path, dev: &Path, serial: &str, slot: &str) {
    run(Command::new("blockdev").arg("--flushbufs").arg(dev));
    check_contents(img, dev, serial, slot);
}

/// [`check_unit`] on a file holding what the unit's storage holds.
fn check_contents(img: &Path, dev: &Path, serial: &str, slot: &str) {
    let len = std::fs::metadata(img).unwrap().len();
    common::assert_same_prefix(img, dev, FAT_OFF);
    let tail_a = read_range(img, FAT_OFF + FAT_LEN, len - FAT_OFF - FAT_LEN);
    let tail_b = read_range(dev, FAT_OFF + FAT_LEN, len - FAT_OFF - FAT_LEN);
    if tail_a != tail_b {
        let i = tail_a
            .iter()
            .zip(&tail_b)
            .position(|(x, y)| x != y)
            .unwrap();
        panic!(
            "{}: differs from the image at offset {}",
            dev.display(),
            FAT_OFF + FAT_LEN + i as u64
        );
    }
    check_fat_changes_only_free_space(img, dev);
    let at = |p: &Path| format!("{}@@{}", p.display(), FAT_OFF);
    assert_eq!(
        mtools(&["mtype", "::config.txt"], &at(img)),
        mtools(&["mtype", "::config.txt"], &at(dev)),
        "{}: the image's config.txt changed",
        dev.display()
    );
    let hostname = serial.to_ascii_lowercase();
    assert_eq!(
        mtools(&["mtype", "::sbcflash/identity.json"], &at(dev)),
        format!(r#"{{"serial": "{serial}", "hostname": "{hostname}", "slot": "{slot}"}}"#)
    );
    assert_eq!(
        mtools(&["mtype", "::hostname"], &at(dev)),
        format!("{hostname}\n")
    );
    let listing = mtools(&["mdir", "-/", "::"], &at(dev));
    assert!(
        listing.contains("identity") || listing.to_ascii_lowercase().contains("identity"),
        "{listing}"
    );
}

fn unit_row<'a>(rows: &'a [Value], slot: &str) -> &'a Value {
    let hits: Vec<&Value> = rows.iter().filter(|r| r["slot"] == slot).collect();
    assert_eq!(hits.len(), 1, "expected one row for slot {slot}: {rows:#?}");
    hits[0]
}

#[test]
fn station_udevd_flashes_four_slots_in_parallel_and_leaves_others_alone() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    // Compressed, as images are published: the station decodes it once for all four slots.
    if !require(true, &["zstd"]) {
        return;
    }
    let zst = dir.join("nixos.img.zst");
    run(Command::new("zstd")
        .args(["-q", "-3"])
        .arg(&img)
        .arg("-o")
        .arg(&zst));
    let names = ["s1", "s2", "s3", "s4"];
    let backs: Vec<PathBuf> = names
        .iter()
        .map(|n| backing(dir, &format!("{n}.card"), 64 * MIB))
        .collect();
    let slots: Vec<(&str, &Path)> = names
        .iter()
        .zip(&backs)
        .map(|(n, b)| (*n, b.as_path()))
        .collect();
    let cfg = write_config(dir, &zst, &slots, "");
    // A disk in no slot, with content the station must never touch.
    let outsider_file = dir.join("outsider.card");
    std::fs::write(&outsider_file, vec![0xa5u8; 8 * MIB as usize]).unwrap();

    let _udevd = Udevd::start();
    // s1 is in its reader when the station starts (flashed because of --flash-present) and is
    // a slow card (writes throttled); s2..s4 are plugged in while it runs.
    let d1 = LoopDev::attach(&backs[0], &[]);
    Udevd::settle();
    let (throttle, mut st) = throttled_station(
        dir,
        &cfg,
        &["--flash-present", "--exit-after", "4"],
        &[(d1.path(), MIB)],
    );
    st.wait_for("station ready", |v| is_msg(v, "station", "station ready"));
    st.wait_for("s1 writing", |v| is_start(v, "s1", "write"));
    let outsider = LoopDev::attach(&outsider_file, &[]);
    let mut devs = vec![d1];
    devs.extend(backs[1..].iter().map(|b| LoopDev::attach(b, &[])));
    let status = st.wait_exit();
    assert!(
        status.success(),
        "station: {status}\n{}\n{}",
        st.dump(),
        st.stderr()
    );
    drop(throttle);

    // Decoded once at start, into the cache; every job read that.
    let decodes: Vec<&Value> = st
        .seen
        .iter()
        .filter(|v| v["event"] == "start" && v["phase"] == "decode")
        .collect();
    assert_eq!(decodes.len(), 1, "{}", st.dump());
    assert_eq!(decodes[0]["job"], "station");
    let raws: Vec<PathBuf> = std::fs::read_dir(dir.join("cache/decoded"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "raw"))
        .collect();
    assert_eq!(raws.len(), 1, "{raws:?}");
    assert_eq!(
        std::fs::metadata(&raws[0]).unwrap().len(),
        IMG_MIB * MIB,
        "decoded file has the logical size"
    );

    // Parallel and independent: the three fast cards passed while the slow one was writing.
    let pass_at = |n: &str| {
        st.seen
            .iter()
            .position(|v| is_msg(v, n, "PASS"))
            .unwrap_or_else(|| panic!("no PASS for {n}:\n{}", st.dump()))
    };
    for n in &names[1..] {
        assert!(
            pass_at(n) < pass_at("s1"),
            "{n} waited for the slow card:\n{}",
            st.dump()
        );
    }

    let rows = report(&cfg);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let digest = blake3::hash(&std::fs::read(&img).unwrap())
        .to_hex()
        .to_string();
    let mut serials = Vec::new();
    for (n, d) in names.iter().zip(&devs) {
        let r = unit_row(&rows, n);
        assert_eq!(r["result"], "pass", "{r:#}");
        assert_eq!(r["devnode"], d.path().display().to_string());
        assert_eq!(r["image_blake3"], digest);
        assert_eq!(r["board"], "orangepi-5");
        assert_eq!(r["attempt"], 1);
        assert!(r["ended_at"].is_string() && r["throughput_bps"].as_f64().unwrap() > 0.0);
        assert!(r["bytes_written"].as_i64().unwrap() > 0);
        let serial = r["unit_serial"].as_str().unwrap().to_string();
        check_unit(&img, d.path(), &serial, n);
        let log = std::fs::read_to_string(dir.join("logs").join(format!("{n}.log"))).unwrap();
        assert!(log.contains(&format!("PASS: {serial}")), "{log}");
        serials.push(serial);
    }
    let mut seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3, 4]);
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 4);

    // The outsider was never touched.
    drop(outsider);
    assert!(std::fs::read(&outsider_file)
        .unwrap()
        .iter()
        .all(|b| *b == 0xa5));

    // CSV export: a header and four rows; none since a date to come.
    let csv_since = |since: &str| {
        let o = run(sbcflash()
            .args(["station", "report", "--format", "csv", "--since", since])
            .arg("--config")
            .arg(&cfg));
        String::from_utf8(o.stdout).unwrap()
    };
    let csv = csv_since("2000-01-01");
    assert!(csv.starts_with("id,unit_serial,attempt,slot,"), "{csv}");
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert_eq!(csv_since("2999-01-01").lines().count(), 1);
}

/// A card pulled from its reader makes the write fail (ENOSPC: the kernel has zeroed the
/// disk's capacity) before udev's event says the medium went. The unit must read "removed",
/// not "No space left on device". Here the capacity drops (`losetup -c` on an emptied backing
/// file) while udev holds the change event back (a rule's RUN waits for a flag file, set only
/// after the station has ended), so the ENOSPC always comes first.
#[test]
fn station_udevd_card_gone_before_its_event_reads_removed() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    let b = backing(dir, "gone.card", 64 * MIB);
    let cfg = write_config(dir, &img, &[("gone", &b)], "");
    let _udevd = Udevd::start();
    let [d] = insert([&b]);
    let flag = dir.join("release-events");
    let name = d.path().file_name().unwrap().to_string_lossy().to_string();
    let _rule = common::UdevRule::install(
        "hold-change",
        &format!(
            "ACTION==\"change\", KERNEL==\"{name}\", RUN+=\"/bin/sh -c 'while [ ! -e {} ]; do sleep 0.1; done'\"\n",
            flag.display()
        ),
    );
    // The held events go on however the test ends (udevd would otherwise keep a worker busy).
    struct Release(PathBuf);
    impl Drop for Release {
        fn drop(&mut self) {
            let _ = std::fs::write(&self.0, b"");
        }
    }
    let release = Release(flag);
    let (throttle, mut st) = throttled_station(
        dir,
        &cfg,
        &["--flash-present", "--exit-after", "1"],
        &[(d.path(), 2 * MIB)],
    );
    st.wait_for("gone starts writing", |v| is_start(v, "gone", "write"));
    // The card goes: no medium behind the disk, its capacity 0.
    std::fs::File::options()
        .write(true)
        .open(&b)
        .and_then(|f| f.set_len(0))
        .expect("empty the backing file");
    run(Command::new("losetup").arg("-c").arg(d.path()));
    let status = st.wait_exit();
    drop(release);
    assert_eq!(status.code(), Some(5), "{}\n{}", st.dump(), st.stderr());
    let rows = report(&cfg);
    let why = unit_row(&rows, "gone")["failure_reason"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let node = d.path().display().to_string();
    assert_eq!(
        why,
        format!("removed mid-write (medium removed: {node})"),
        "{}",
        st.dump()
    );
    drop(throttle);
}

#[test]
fn station_udevd_faults_mid_write_fail_alone() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    // ok1 and ok2 are healthy; "full" sits on a 2 MiB tmpfs, so writes past its capacity fail
    // with real I/O errors; "pulled" gets a udev remove event while it is writing.
    let tiny = Tmpfs::mount(&dir.join("tiny"), "2M");
    let b_ok1 = backing(dir, "ok1.card", 64 * MIB);
    let b_full = backing(&tiny.dir, "full.card", 64 * MIB);
    let b_pulled = backing(dir, "pulled.card", 64 * MIB);
    let b_ok2 = backing(dir, "ok2.card", 64 * MIB);
    let cfg = write_config(
        dir,
        &img,
        &[
            ("ok1", &b_ok1),
            ("full", &b_full),
            ("pulled", &b_pulled),
            ("ok2", &b_ok2),
        ],
        "",
    );
    let _udevd = Udevd::start();
    // Cards already inserted, flashed with --flash-present, so the throttle is in place before
    // the first byte: "pulled" writes slowly enough to be pulled mid-write.
    let [d_ok1, d_full, d_pulled, d_ok2] = insert([&b_ok1, &b_full, &b_pulled, &b_ok2]);
    let (throttle, mut st) = throttled_station(
        dir,
        &cfg,
        &["--flash-present", "--exit-after", "4"],
        &[(d_pulled.path(), 2 * MIB)],
    );
    st.wait_for("pulled starts writing", |v| is_start(v, "pulled", "write"));
    run(Command::new("udevadm")
        .args(["trigger", "--action=remove"])
        .arg(d_pulled.path()));
    let status = st.wait_exit();
    assert_eq!(
        status.code(),
        Some(5),
        "some units failed: exit 5\n{}\n{}",
        st.dump(),
        st.stderr()
    );
    let rows = report(&cfg);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    for (slot, d) in [("ok1", &d_ok1), ("ok2", &d_ok2)] {
        let r = unit_row(&rows, slot);
        assert_eq!(r["result"], "pass", "{r:#}");
        check_unit(&img, d.path(), r["unit_serial"].as_str().unwrap(), slot);
    }
    let full = unit_row(&rows, "full");
    assert_eq!(full["result"], "fail");
    let why = full["failure_reason"].as_str().unwrap();
    assert!(
        why.starts_with("write failed") && why.contains(&d_full.path().display().to_string()),
        "{why}"
    );
    assert!(
        why.contains("No space left") || why.contains("Input/output error"),
        "{why}"
    );
    let pulled = unit_row(&rows, "pulled");
    assert_eq!(pulled["result"], "fail");
    let why = pulled["failure_reason"].as_str().unwrap();
    assert!(why.starts_with("removed mid-write"), "{why}");
    assert!(
        why.contains(&d_pulled.path().display().to_string()),
        "{why}"
    );
    // Failures are visible per slot and in the count.
    assert!(st
        .seen
        .iter()
        .any(|v| is_msg(v, "pulled", "FAIL") && is_msg(v, "pulled", "removed mid-write")));
    assert!(st
        .seen
        .iter()
        .any(|v| is_msg(v, "station", "2 PASS, 2 FAIL")));
    // A pulled card never looks flashed: its partition table (written last) is absent.
    let head = read_range(d_pulled.path(), 0, 512);
    assert!(
        head[510] != 0x55 || head[511] != 0xaa,
        "pulled card got a partition table"
    );
    drop(throttle);
}

#[test]
fn station_udevd_kill9_loses_no_unit_and_never_reuses_a_serial() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    let b1 = backing(dir, "k1.card", 64 * MIB);
    let b2 = backing(dir, "k2.card", 64 * MIB);
    let cfg = write_config(dir, &img, &[("k1", &b1), ("k2", &b2)], "");
    let _udevd = Udevd::start();
    let [d1, d2] = insert([&b1, &b2]);
    let (throttle, mut st) = throttled_station(
        dir,
        &cfg,
        &["--flash-present"],
        &[(d1.path(), 2 * MIB), (d2.path(), 2 * MIB)],
    );
    st.wait_for("k1 writing", |v| is_start(v, "k1", "write"));
    st.wait_for("k2 writing", |v| is_start(v, "k2", "write"));

    // A second station on the same ledger refuses to start.
    let o = sbcflash()
        .args(["station", "--flash-present", "--config"])
        .arg(&cfg)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(4), "{o:?}");
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("in use by another station"),
        "{o:?}"
    );

    st.kill9();
    drop(throttle);
    let rows = report(&cfg);
    assert_eq!(
        rows.len(),
        2,
        "every started unit is in the ledger: {rows:#?}"
    );
    for r in &rows {
        assert_eq!(r["result"], "started", "{r:#}");
        assert!(r["ended_at"].is_null());
    }
    let first: Vec<String> = rows
        .iter()
        .map(|r| r["unit_serial"].as_str().unwrap().to_string())
        .collect();

    // Restart: the interrupted units are marked so (never done), the cards are flashed again
    // under new serials.
    let mut st = Station::spawn(dir, &cfg, &["--flash-present", "--exit-after", "2"]);
    let status = st.wait_exit();
    assert!(status.success(), "{}\n{}", st.dump(), st.stderr());
    assert!(st.seen.iter().any(|v| is_msg(
        v,
        "station",
        "2 unit(s) from an earlier run never finished"
    )));
    let rows = report(&cfg);
    assert_eq!(rows.len(), 4, "{rows:#?}");
    let mut serials = Vec::new();
    for r in &rows {
        let s = r["unit_serial"].as_str().unwrap().to_string();
        if first.contains(&s) {
            assert_eq!(r["result"], "interrupted", "{r:#}");
            assert!(r["ended_at"].is_null(), "{r:#}");
            assert!(r["failure_reason"]
                .as_str()
                .unwrap()
                .contains("the unit is not done"));
        } else {
            assert_eq!(r["result"], "pass", "{r:#}");
        }
        serials.push(s);
    }
    serials.sort();
    serials.dedup();
    assert_eq!(serials.len(), 4, "a serial was handed out twice");
    let mut seqs: Vec<i64> = rows.iter().map(|r| r["seq"].as_i64().unwrap()).collect();
    seqs.sort();
    assert_eq!(seqs, [1, 2, 3, 4]);
    for (slot, d) in [("k1", &d1), ("k2", &d2)] {
        let r = rows
            .iter()
            .find(|r| r["slot"] == slot && r["result"] == "pass")
            .unwrap();
        check_unit(&img, d.path(), r["unit_serial"].as_str().unwrap(), slot);
    }
}

/// Marks the decoded image `key` in `dir` as last used `days` ago.
fn age_decoded(dir: &Path, key: &str, days: u64) {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.join(format!("{key}.map.json")))
        .unwrap();
    f.set_modified(std::time::SystemTime::now() - Duration::from_secs(days * 86_400))
        .unwrap();
}

fn decoded_keys(dir: &Path) -> std::collections::BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter_map(|d| {
            d.file_name()
                .to_string_lossy()
                .strip_suffix(".raw")
                .filter(|k| !k.starts_with('.'))
                .map(str::to_string)
        })
        .collect()
}

fn cache_cli(cache: &Path, args: &[&str]) -> std::process::Output {
    sbcflash()
        .arg("--json")
        .args(["cache", "--cache-dir"])
        .arg(cache)
        .args(args)
        .output()
        .unwrap()
}

/// Decoded images are derived data in the cache: `cache list` shows them (and which one a
/// station holds), `cache prune --older-than` removes old ones and dead decodes' temporaries
/// but never one in use, `cache verify` re-hashes them through their map and removes a
/// corrupted one, a station start removes older decoded images of other sources (not one
/// another station holds), and `--max-size 0` removes everything no station holds.
#[test]
fn station_decoded_images_are_listed_verified_and_pruned_with_the_cache() {
    use sbcflash::station::{decoded, job};
    use sbcflash::usb::flash::MemSource;
    if !require(false, &["zstd"]) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let cache = tmp.path().join("cache");
    let dir = cache.join("decoded");
    let rec = sbcflash::progress::Recorder::default();
    let key = |s: &str| blake3::hash(s.as_bytes()).to_hex().to_string();
    let image = |seed: u8| {
        let mut v = vec![0u8; 3 << 20];
        v[4096..300_000].fill(seed);
        v
    };
    let make = |k: &str, seed: u8| {
        decoded::materialise(&mut MemSource::new(k, image(seed)), k, &dir, &rec, "t").unwrap()
    };
    let (old, held_key, new) = (key("old"), key("held"), key("new"));
    drop(make(&old, 1));
    let held = make(&held_key, 2); // a running station holds this one
    drop(make(&new, 3));
    age_decoded(&dir, &old, 40);
    age_decoded(&dir, &held_key, 40);
    let dead_tmp = dir.join(format!(".{}.raw.99999", key("dead")));
    std::fs::write(&dead_tmp, b"half a decode").unwrap();
    std::fs::File::options()
        .write(true)
        .open(&dead_tmp)
        .unwrap()
        .set_modified(std::time::SystemTime::now() - Duration::from_secs(40 * 86_400))
        .unwrap();

    let out = cache_cli(&cache, &["list"]);
    assert!(out.status.success(), "{out:?}");
    let listed: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .filter(|v: &Value| v["event"] == "cache-decoded")
        .collect();
    assert_eq!(listed.len(), 3, "{listed:#?}");
    for v in &listed {
        let k = v["source_blake3"].as_str().unwrap();
        assert_eq!(v["in_use"], k == held_key, "{v}");
        assert_eq!(v["size"], 3 << 20, "{v}");
    }

    let out = cache_cli(&cache, &["prune", "--older-than", "30d"]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        decoded_keys(&dir),
        [held_key.clone(), new.clone()].into(),
        "{out:?}"
    );
    assert!(!dead_tmp.exists(), "a dead decode's temporary was kept");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(said.contains(&format!("decoded/{old}")), "{said}");

    // Damage one byte of data in `new`: verify finds it and removes it; the held one is fine.
    let raw = dir.join(format!("{new}.raw"));
    let f = std::fs::OpenOptions::new().write(true).open(&raw).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &[0xee], 5000).unwrap();
    drop(f);
    let out = cache_cli(&cache, &["verify"]);
    assert_eq!(out.status.code(), Some(6), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout);
    assert!(
        said.contains(&format!("decoded/{new}")) && said.contains("(corrupted)"),
        "{said}"
    );
    assert_eq!(decoded_keys(&dir), [held_key.clone()].into());

    // A station start with a compressed image: its decoded image stays, an older idle one of
    // another source goes, the one another station holds stays.
    let stale = key("stale");
    drop(make(&stale, 4));
    age_decoded(&dir, &stale, 1);
    let raw_img = tmp.path().join("img.raw");
    std::fs::write(&raw_img, image(5)).unwrap();
    run(std::process::Command::new("zstd")
        .arg("-q")
        .arg(&raw_img)
        .arg("-o")
        .arg(tmp.path().join("img.raw.zst")));
    let zst = tmp.path().join("img.raw.zst");
    let plan = job::ImagePlan::prepare(&zst, Some(&cache), &rec).unwrap();
    let current = blake3::hash(&std::fs::read(&zst).unwrap())
        .to_hex()
        .to_string();
    assert_eq!(plan.blake3, blake3::hash(&image(5)).to_hex().to_string());
    assert_eq!(
        decoded_keys(&dir),
        [held_key.clone(), current.clone()].into()
    );
    let msgs = format!("{:?}", rec.0.lock().unwrap());
    assert!(msgs.contains(&format!("older source ({stale})")), "{msgs}");

    // Nobody holds anything any more: a size budget of 0 leaves no decoded image.
    drop(held);
    drop(plan);
    let out = cache_cli(&cache, &["prune", "--max-size", "0"]);
    assert!(out.status.success(), "{out:?}");
    assert!(decoded_keys(&dir).is_empty(), "{out:?}");
}

#[test]
fn station_dry_run_shows_plan_and_writes_nothing() {
    if !require(true, TOOLS) {
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let img = make_nixos_like_image(dir, "nixos.img", IMG_MIB, Table::Mbr);
    let b1 = backing(dir, "d1.card", 64 * MIB);
    let b2 = backing(dir, "d2.card", 64 * MIB);
    let small = backing(dir, "small.card", 8 * MIB);
    let cfg = write_config(dir, &img, &[("d1", &b1), ("d2", &b2), ("tiny", &small)], "");
    let d1 = LoopDev::attach(&b1, &[]);
    let ds = LoopDev::attach(&small, &[]);
    let o = run(sbcflash()
        .args(["station", "--dry-run", "--flash-present", "--config"])
        .arg(&cfg));
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("next unit: OPI5-"), "{text}");
    assert!(
        text.contains(&format!("{}: would be flashed now", d1.path().display())),
        "{text}"
    );
    assert!(text.contains("empty: waiting for a card"), "{text}");
    assert!(
        text.contains(&format!("{}: would be REFUSED", ds.path().display())),
        "{text}"
    );
    assert!(text.contains("larger than the target"), "{text}");
    assert!(text.contains("dry run: nothing was written"), "{text}");
    // Nothing written, no ledger created.
    assert!(std::fs::read(&b1).unwrap().iter().all(|b| *b == 0));
    assert!(!dir.join("ledger.sqlite").exists());
    let o = run(sbcflash()
        .args(["--json", "station", "--dry-run", "--config"])
        .arg(&cfg));
    common::json::assert_documented(&String::from_utf8_lossy(&o.stdout));
    let v: Value = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str::<Value>(l).unwrap())
        .find(|v| v["event"] == "dry-run")
        .expect("a dry-run line");
    assert_eq!(v["slots"].as_array().unwrap().len(), 3);
    assert_eq!(v["next_seq"], 1);
    assert!(
        v["example_identity"]["serial"]
            .as_str()
            .is_some_and(|s| s.starts_with("OPI5-")),
        "{v}"
    );
}

#[test]
fn station_bad_config_names_the_file_and_touches_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = tmp.path().join("station.toml");
    let mut f = std::fs::File::create(&p).unwrap();
    writeln!(
        f,
        "image = \"/nonexistent.img\"\n[[slot]]\nname = \"a\"\nmatch = {{ ID_PATH = \"*\" }}"
    )
    .unwrap();
    let o = sbcflash()
        .args(["station", "--config"])
        .arg(&p)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(3), "{o:?}");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("station.toml") && err.contains("matches anything"),
        "{err}"
    );
    // A missing ledger for report is an error naming it.
    let o = sbcflash()
        .args(["station", "report", "--ledger"])
        .arg(tmp.path().join("none.sqlite"))
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("none.sqlite"));
}

// ------------------------------------------------------------------ USB slots (simulated)
//
// There is no USB bus here: boards are the simulated devices of `usb::sim` behind the same
// Transport trait as libusb, and the station gets the udev `usb_device` events a kernel would
// send for them (`usbslot::udev_event_for`) through `run_with`'s event source, the one seam.
// Everything else is real: the writer pipeline, fatfs over rockusb, the SQLite ledger, mtools.

mod usb_slots {
    use super::*;
    use sbcflash::progress::{Event, Recorder};
    use sbcflash::station::hotplug::{Action, ChannelEvents};
    use sbcflash::station::slots::DeviceInfo;
    use sbcflash::station::{self as st, config, job, ledger, ui, usbslot};
    use sbcflash::usb::discovery::Descriptor;
    use sbcflash::usb::sim::rockusb::{RkMode, RockchipBoard, EMMC};
    use sbcflash::usb::sim::{lock, Faults, SimBus, SimDevice};
    use sbcflash::usb::TransportError;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    type Events = crossbeam_channel::Sender<(Action, DeviceInfo)>;

    /// A hang guard for joining the station thread, not a performance threshold: a bug that
    /// keeps the station waiting (a job thread that never reports) fails the test with this
    /// message instead of hanging until nextest terminates it.
    const HANG_GUARD: Duration = Duration::from_secs(120);

    /// Joins the station thread within [`HANG_GUARD`]; a panic in it is re-raised here.
    fn join_station<T: Send + 'static>(h: std::thread::JoinHandle<T>) -> T {
        let (tx, rx) = crossbeam_channel::bounded(1);
        std::thread::spawn(move || {
            let _ = tx.send(h.join());
        });
        match rx.recv_timeout(HANG_GUARD) {
            Ok(Ok(v)) => v,
            Ok(Err(panic)) => std::panic::resume_unwind(panic),
            Err(_) => panic!(
                "the station thread did not finish within {HANG_GUARD:?} (hang guard): a job \
                 never reported its end"
            ),
        }
    }

    /// Waits (with a watchdog, not a threshold) until the station said `needle`.
    fn wait_said(rec: &Recorder, needle: &str) {
        let t0 = std::time::Instant::now();
        loop {
            let said = rec
                .0
                .lock()
                .unwrap()
                .iter()
                .any(|e| matches!(e, Event::Message { text, .. } if text.contains(needle)));
            if said {
                return;
            }
            assert!(t0.elapsed() < WATCHDOG, "station never said {needle:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Holds one bulk OUT transfer once `at` bytes were written, until the test lets go.
    struct Gate {
        at: u64,
        reached: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
        pulled: Arc<AtomicBool>,
    }

    /// A simulated Rockchip board wired to "udev": whenever it leaves or joins the bus (loader
    /// start, reset, unplug) the matching udev events go to the station, as the kernel's
    /// would; after an arrival it waits until the station has seen it.
    struct Wired<B: SimDevice = RockchipBoard> {
        board: B,
        events: Events,
        rec: Arc<Recorder>,
        last: Option<Descriptor>,
        now: Arc<Mutex<Option<Descriptor>>>,
        out: u64,
        gate: Option<Gate>,
        /// Unplugged at its first re-enumeration: it leaves the bus and never comes back.
        unplug_on_change: bool,
        /// Panics in a bulk OUT transfer once this many bytes were written (a transport bug).
        panic_at: Option<u64>,
        /// The largest bulk OUT data phase seen (CBWs of 31 bytes left out).
        max_out: usize,
    }

    impl<B: SimDevice> Wired<B> {
        fn new(board: B, events: Events, rec: Arc<Recorder>) -> Wired<B> {
            let last = board.descriptor();
            Wired {
                board,
                events,
                rec,
                now: Arc::new(Mutex::new(last.clone())),
                last,
                out: 0,
                gate: None,
                unplug_on_change: false,
                panic_at: None,
                max_out: 0,
            }
        }
        fn sync(&mut self) {
            let mut d = self.board.descriptor();
            if d == self.last {
                return;
            }
            if self.unplug_on_change && d.is_some() {
                self.board.vanish();
                d = None;
            }
            if let Some(old) = self.last.take() {
                let _ = self
                    .events
                    .send((Action::Remove, usbslot::udev_event_for(&old, "")));
            }
            *self.now.lock().unwrap() = d.clone();
            if let Some(new) = &d {
                let ev = usbslot::udev_event_for(new, "");
                let node = ev.devnode.clone().unwrap();
                let _ = self.events.send((Action::Add, ev));
                wait_said(&self.rec, &format!("re-enumerated as {node}"));
            }
            self.last = d;
        }
    }

    impl<B: SimDevice> SimDevice for Wired<B> {
        fn descriptor(&self) -> Option<Descriptor> {
            self.board.descriptor()
        }
        fn generation(&self) -> u32 {
            self.board.generation()
        }
        fn faults(&mut self) -> &mut Faults {
            self.board.faults()
        }
        fn vanish(&mut self) {
            self.board.vanish()
        }
        fn fail_next_status(&mut self) {
            self.board.fail_next_status()
        }
        fn control_out(
            &mut self,
            rt: u8,
            req: u8,
            v: u16,
            i: u16,
            d: &[u8],
        ) -> Result<usize, TransportError> {
            let r = self.board.control_out(rt, req, v, i, d);
            self.sync();
            r
        }
        fn control_in(
            &mut self,
            rt: u8,
            req: u8,
            v: u16,
            i: u16,
            b: &mut [u8],
        ) -> Result<usize, TransportError> {
            let r = self.board.control_in(rt, req, v, i, b);
            self.sync();
            r
        }
        fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError> {
            if let Some(at) = self.panic_at.filter(|at| self.out >= *at) {
                panic!("simulated transport bug after {at} bytes");
            }
            if let Some(g) = self.gate.as_ref().filter(|g| self.out >= g.at) {
                let _ = g.reached.send(());
                let _ = g.release.recv();
                if g.pulled.load(Ordering::SeqCst) {
                    self.gate = None;
                    self.board.vanish();
                    self.last = None;
                    return Err(TransportError::Gone);
                }
            }
            if data.len() != 31 {
                self.max_out = self.max_out.max(data.len());
            }
            let r = self.board.bulk_out(data);
            if let Ok(n) = r {
                self.out += n as u64;
            }
            self.sync();
            r
        }
        fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
            let r = self.board.bulk_in(buf);
            self.sync();
            r
        }
    }

    fn board(mode: RkMode, port: u8, address: u8) -> RockchipBoard {
        let mut b = RockchipBoard::rk3588(64 << 20);
        b.mode = mode;
        b.ports = vec![2, port];
        b.address = address;
        b
    }

    fn pattern(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    fn image_plan(img: &Path) -> job::ImagePlan {
        let bytes = std::fs::read(img).unwrap();
        job::ImagePlan {
            path: img.to_path_buf(),
            blake3: blake3::hash(&bytes).to_hex().to_string(),
            size: bytes.len() as u64,
            format: "raw".into(),
            decoded: None,
            signed_by: None,
        }
    }

    /// The station config for `img` with a `[usb]` section and USB slots `(name, port)`
    /// matched by DEVPATH under `usb1/<hub>` (`port` like `2.1` under hub `1-2`).
    fn usb_station(
        dir: &Path,
        img: &Path,
        usb: &str,
        hub: &str,
        slots: &[(&str, &str)],
    ) -> config::Station {
        let cfg_path = write_config(dir, img, &[], "");
        let mut text = std::fs::read_to_string(&cfg_path).unwrap();
        text = text.replace("[identity]", &format!("[usb]\n{usb}\n[identity]"));
        for (name, port) in slots {
            text.push_str(&format!(
                "[[slot]]\nname = \"{name}\"\nkind = \"usb\"\nmatch = {{ DEVPATH = \"*/usb1/{hub}/1-{port}\" }}\n"
            ));
        }
        std::fs::write(&cfg_path, &text).unwrap();
        config::Station::load(&cfg_path).unwrap()
    }

    /// What every USB-slot test wires up: a directory with the image, the recorder the
    /// station reports to, the "udev" event channel, and the ledger's path.
    struct Rig {
        dir: tempfile::TempDir,
        img: PathBuf,
        rec: Arc<Recorder>,
        tx: Events,
        rx: crossbeam_channel::Receiver<(Action, DeviceInfo)>,
        ledger: PathBuf,
    }

    impl Rig {
        /// The image tools (with `loop_devices`: root and losetup too), else skipped; the
        /// image is made as `image` in a new directory.
        fn new(image: &str, loop_devices: bool) -> Option<Rig> {
            let mut tools = vec!["sfdisk", "mkfs.vfat", "mkfs.ext4", "mcopy", "mtype", "mdir"];
            if loop_devices {
                tools.insert(0, "losetup");
            }
            if !require(loop_devices, &tools) {
                return None;
            }
            let dir = tempfile::tempdir().unwrap();
            let img = make_nixos_like_image(dir.path(), image, IMG_MIB, Table::Mbr);
            let (tx, rx) = crossbeam_channel::unbounded();
            let ledger = dir.path().join("ledger.sqlite");
            Some(Rig {
                dir,
                img,
                rec: Arc::default(),
                tx,
                rx,
                ledger,
            })
        }

        /// [`usb_station`] in this rig's directory, for its image.
        fn station(&self, usb: &str, hub: &str, slots: &[(&str, &str)]) -> config::Station {
            usb_station(self.dir.path(), &self.img, usb, hub, slots)
        }

        /// `board` wired to this rig's udev events and recorder.
        fn wired<B: SimDevice>(&self, board: B) -> Arc<Mutex<Wired<B>>> {
            Arc::new(Mutex::new(Wired::new(
                board,
                self.tx.clone(),
                self.rec.clone(),
            )))
        }

        /// Runs the station loop on its own thread over `bus`, reporting to `reporter`, with
        /// `present` as the devices found at start and later udev events from this rig, until
        /// `exit_after` units ended.
        fn start(
            &self,
            station: config::Station,
            reporter: Arc<dyn sbcflash::progress::Reporter>,
            bus: SimBus,
            present: Vec<DeviceInfo>,
            exit_after: u64,
        ) -> std::thread::JoinHandle<Result<st::Totals, st::StationError>> {
            let (led, _) = ledger::Ledger::open(&self.ledger).unwrap();
            let uiv = Arc::new(ui::Ui::new(reporter, ui::Style::Stream, false, false));
            let plan = Arc::new(image_plan(&self.img));
            let stop = Arc::new(AtomicBool::new(false));
            let bus: Arc<dyn sbcflash::usb::discovery::Bus + Send + Sync> = Arc::new(bus);
            let opts = st::RunOptions {
                flash_present: !present.is_empty(),
                exit_after: Some(exit_after),
            };
            let rx = self.rx.clone();
            std::thread::spawn(move || {
                let mut events = ChannelEvents { present, rx };
                st::run_with(
                    &station,
                    plan,
                    led,
                    uiv,
                    &opts,
                    &mut events,
                    Some(bus),
                    stop,
                )
            })
        }

        /// Joins the station, checks it ended `(pass, fail)` units, each with one ledger row;
        /// returns the rows by slot and what the station said (for failure messages).
        fn finish(
            &self,
            h: std::thread::JoinHandle<Result<st::Totals, st::StationError>>,
            (pass, fail): (u64, u64),
        ) -> (std::collections::BTreeMap<String, ledger::Row>, String) {
            let totals = join_station(h).unwrap();
            let said = format!("{:#?}", self.rec.0.lock().unwrap());
            assert_eq!((totals.pass, totals.fail), (pass, fail), "{said}");
            let rows = ledger::report(&self.ledger, None).unwrap();
            assert_eq!(rows.len() as u64, pass + fail, "{rows:#?}");
            let by_slot = rows.into_iter().map(|r| (r.slot.clone(), r)).collect();
            (by_slot, said)
        }
    }

    /// Two boards on configured USB ports (one in maskrom, so it gets the loader and
    /// re-enumerates; one already running a loader) and one on a port in no slot. The maskrom
    /// board is flashed, read back, given its identity in its FAT partition and reset; the
    /// other is unplugged mid-write (udev remove event, then the bus loses it) and is FAIL;
    /// an Allwinner board in FEL on a third slot is recognised and FAIL with a clear reason
    /// (the station flashes Rockchip and Raspberry Pi boards only); the board outside the slots
    /// is never touched.
    #[test]
    fn station_usb_slots_flash_a_maskrom_board_and_fail_an_unplugged_one() {
        let Some(rig) = Rig::new("usb.img", false) else {
            return;
        };
        let loader = rig.dir.path().join("rk3588_spl_loader.bin");
        std::fs::write(
            &loader,
            sbcflash::usb::rkloader::build_merged(
                "RK3588",
                &pattern(9000, 1),
                &pattern(70_000, 2),
                &[&pattern(3000, 3)],
            ),
        )
        .unwrap();
        let station = rig.station(
            &format!("loader = [\"{}\"]\nstorage = \"emmc\"", loader.display()),
            "1-2",
            &[("u1", "2.1"), ("u2", "2.2"), ("u3", "2.3")],
        );

        let b1 = rig.wired(board(RkMode::Maskrom, 1, 5));
        let b2 = rig.wired(board(RkMode::Loader, 2, 9));
        let (reached_tx, reached) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::unbounded();
        let pulled = Arc::new(AtomicBool::new(false));
        let b2_now = lock(&b2).now.clone();
        lock(&b2).gate = Some(Gate {
            at: 8 * MIB,
            reached: reached_tx,
            release: release_rx,
            pulled: pulled.clone(),
        });
        let mut outside = board(RkMode::Loader, 3, 12);
        outside.ports = vec![3];
        let outside = rig.wired(outside);
        let outside_before = lock(&outside).board.storage(EMMC).to_vec();
        // An Allwinner board in FEL on u3: recognised, but not something the station flashes.
        let mut fel = sbcflash::usb::sim::fel::FelDevice::d1(1 << 20);
        fel.ports = vec![2, 3];
        fel.address = 20;
        let fel = Arc::new(Mutex::new(fel));
        let mut bus = SimBus::new();
        bus.attach(b1.clone());
        bus.attach(b2.clone());
        bus.attach(outside.clone());
        bus.attach(fel.clone());

        let mut present: Vec<DeviceInfo> = [&b1, &b2, &outside]
            .iter()
            .map(|b| usbslot::udev_event_for(&lock(b).descriptor().unwrap(), "SIMBOARD"))
            .collect();
        present.push(usbslot::udev_event_for(
            &lock(&fel).descriptor().unwrap(),
            "",
        ));
        let station_thread = rig.start(station, rig.rec.clone(), bus, present, 3);

        // b2 is mid-write: the cable is pulled. udev reports the removal first...
        reached
            .recv_timeout(WATCHDOG)
            .expect("b2 never reached mid-write");
        let now = b2_now.lock().unwrap().clone().unwrap();
        rig.tx
            .send((Action::Remove, usbslot::udev_event_for(&now, "")))
            .unwrap();
        wait_said(
            &rig.rec,
            "u2: /dev/bus/usb/001/009 device removed; cancelling its job",
        );
        // ...and the board is gone from the bus.
        pulled.store(true, Ordering::SeqCst);
        release.send(()).unwrap();

        let (rows, _) = rig.finish(station_thread, (1, 2));
        let r3 = &rows["u3"];
        assert_eq!(r3.result, "fail", "{r3:#?}");
        let why3 = r3.failure_reason.as_deref().unwrap_or("");
        assert!(
            why3.contains("1f3a:efe8")
                && why3.contains("Rockchip boards (maskrom/loader) and Raspberry Pi boards"),
            "{why3}"
        );
        let r1 = &rows["u1"];
        let r2 = &rows["u2"];
        assert_eq!(r1.result, "pass", "{r1:#?}");
        assert_eq!(r1.devnode.as_deref(), Some("usb:1-2.1"));
        assert_eq!(r1.id_path.as_deref(), Some("pci-0000:00:14.0-usb-0:2.1"));
        assert_eq!(r2.result, "fail", "{r2:#?}");
        let why = r2.failure_reason.as_deref().unwrap_or("");
        assert!(why.contains("removed mid-write"), "{why}");

        // The maskrom board got the loader, was written, read back, identity-injected, reset.
        let b = lock(&b1);
        assert_eq!(b.board.downloads.len(), 2, "0x471 and 0x472 downloads");
        assert!(!b.board.resets.is_empty(), "board was not reset after PASS");
        let flash = rig.dir.path().join("u1.emmc");
        std::fs::write(&flash, b.board.storage(EMMC)).unwrap();
        check_contents(&rig.img, &flash, &r1.unit_serial, "u1");
        drop(b);
        // The board outside every slot: no loader, no write, no reset.
        let o = lock(&outside);
        assert!(o.board.downloads.is_empty() && o.board.resets.is_empty());
        assert!(
            o.board.storage(EMMC) == &outside_before[..],
            "outside board was written"
        );
    }

    /// A job thread that panics (here: a transport bug in the simulated board, mid-write)
    /// ends as that unit's FAIL with the panic message, and its ledger row is finished; the
    /// board on the other slot is flashed and PASS; the station ends instead of waiting for
    /// the dead job.
    #[test]
    fn station_usb_slots_a_panicking_job_is_fail_with_its_message() {
        let Some(rig) = Rig::new("usb.img", false) else {
            return;
        };
        let station = rig.station("storage = \"emmc\"", "1-2", &[("p1", "2.1"), ("p2", "2.2")]);
        let bad = rig.wired(board(RkMode::Loader, 1, 5));
        lock(&bad).panic_at = Some(4 * MIB);
        let good = rig.wired(board(RkMode::Loader, 2, 6));
        let mut bus = SimBus::new();
        bus.attach(bad.clone());
        bus.attach(good.clone());
        let present = [&bad, &good]
            .iter()
            .map(|b| usbslot::udev_event_for(&lock(b).descriptor().unwrap(), ""))
            .collect();
        let station_thread = rig.start(station, rig.rec.clone(), bus, present, 2);
        let (rows, said) = rig.finish(station_thread, (1, 1));
        let p1 = &rows["p1"];
        assert_eq!(p1.result, "fail", "{p1:#?}");
        assert!(
            p1.ended_at.is_some(),
            "the panicked unit's row was not finished: {p1:#?}"
        );
        let why = p1.failure_reason.as_deref().unwrap_or("");
        assert!(
            why.starts_with(
                "write failed: job thread panicked: simulated transport bug after 4194304 bytes"
            ),
            "{why}"
        );
        let p2 = &rows["p2"];
        assert_eq!(p2.result, "pass", "{p2:#?}\n{said}");
        let flash = rig.dir.path().join("p2.emmc");
        std::fs::write(&flash, lock(&good).board.storage(EMMC)).unwrap();
        check_contents(&rig.img, &flash, &p2.unit_serial, "p2");
    }

    /// `[usb] sectors-per-command` reaches the rockusb writer as it does for `write --via`:
    /// no WRITE_LBA data phase is larger than 32 sectors (the station used to keep the
    /// default 128 whatever was configured), and the unit still passes with its image.
    #[test]
    fn station_usb_slots_write_with_the_configured_sectors_per_command() {
        let Some(rig) = Rig::new("usb.img", false) else {
            return;
        };
        let station = rig.station(
            "storage = \"emmc\"\nsectors-per-command = 32",
            "1-2",
            &[("c1", "2.1")],
        );
        let b = rig.wired(board(RkMode::Loader, 1, 5));
        let mut bus = SimBus::new();
        bus.attach(b.clone());
        let present = vec![usbslot::udev_event_for(&lock(&b).descriptor().unwrap(), "")];
        let station_thread = rig.start(station, rig.rec.clone(), bus, present, 1);
        let (rows, said) = rig.finish(station_thread, (1, 0));
        let c1 = &rows["c1"];
        assert_eq!(c1.result, "pass", "{c1:#?}\n{said}");
        let w = lock(&b);
        assert_eq!(w.max_out, 32 * 512, "largest WRITE_LBA data phase");
        let flash = rig.dir.path().join("c1.emmc");
        std::fs::write(&flash, w.board.storage(EMMC)).unwrap();
        check_contents(&rig.img, &flash, &c1.unit_serial, "c1");
    }

    type Cm4 = Arc<Mutex<Wired<sbcflash::usb::sim::usbboot::RpiBoard>>>;

    /// A simulated CM4 in `stage` on port 1-1.`port`, wired to the station's udev events.
    fn cm4_on(rig: &Rig, port: u8, address: u8, stage: sbcflash::usb::sim::usbboot::Stage) -> Cm4 {
        let mut b = sbcflash::usb::sim::usbboot::RpiBoard::cm4(&["bootmain"]);
        b.stage = stage;
        b.ports = vec![1, port];
        b.address = address;
        rig.wired(b)
    }

    /// The boards are plugged in while the station runs: their udev `add` events.
    fn plug(tx: &Events, boards: &[&Cm4]) {
        for b in boards {
            let d = lock(b).descriptor().unwrap();
            tx.send((Action::Add, usbslot::udev_event_for(&d, "")))
                .unwrap();
        }
    }

    /// Passes events to a [`Recorder`], but holds the job thread of `slot` when its writer
    /// starts the `write` phase, until the test lets go (so a removal lands mid-write).
    struct WriteGate {
        rec: Arc<Recorder>,
        slot: &'static str,
        reached: crossbeam_channel::Sender<()>,
        release: crossbeam_channel::Receiver<()>,
    }

    impl sbcflash::progress::Reporter for WriteGate {
        fn report(&self, ev: Event) {
            if matches!(&ev, Event::Start { job, phase, .. } if job == self.slot && *phase == "write")
            {
                let _ = self.reached.send(());
                let _ = self.release.recv();
            }
            self.rec.report(ev);
        }
    }

    /// The CM4 factory case: two Raspberry Pi CM4s arrive in usbboot on configured ports. The
    /// station serves them the boot files (rpiboot: ROM stage, then the second stage's file
    /// requests), each re-enumerates as the mass-storage gadget, and the first one's eMMC
    /// appears as a block device on its port (a real loop device here): it is written through
    /// the block job (`target::open`, read-back, identity files) and PASS. The second one's
    /// storage never appears: FAIL naming the port, with its ledger row recorded. The third is
    /// unplugged mid-write (udev removal of the gadget): FAIL as removed, never PASS. The
    /// fourth is unplugged right after the ROM stage: FAIL saying it left its port.
    #[test]
    fn station_usb_slots_rpiboot_a_cm4_then_write_its_emmc_block_device() {
        use sbcflash::usb::sim::usbboot::Stage;
        let Some(rig) = Rig::new("cm4.img", true) else {
            return;
        };
        let boot = rig.dir.path().join("msg64");
        std::fs::create_dir_all(boot.join("2711")).unwrap();
        std::fs::write(boot.join("2711/bootcode4.bin"), pattern(52_000, 1)).unwrap();
        std::fs::write(boot.join("bootmain"), pattern(40_000, 2)).unwrap();
        let emmc = LoopDev::new_sparse(rig.dir.path(), "cm4-emmc.bin", 64 * MIB);
        let emmc3 = LoopDev::new_sparse(rig.dir.path(), "cm4-emmc3.bin", 64 * MIB);
        // Stale bytes a correct write must replace (zero ranges included).
        std::fs::write(&emmc.backing, pattern(64 << 20, 0x5a)).unwrap();

        let station = rig.station(
            "usbboot-dir = \"msg64\"\nreenumerate_timeout_secs = 2",
            "1-1",
            &[("r1", "1.3"), ("r2", "1.4"), ("r3", "1.5"), ("r4", "1.6")],
        );
        assert_eq!(station.usb.usbboot_dir.as_deref(), Some(boot.as_path()));

        let (reached_tx, reached) = crossbeam_channel::unbounded();
        let (release, release_rx) = crossbeam_channel::unbounded();
        let gate = Arc::new(WriteGate {
            rec: rig.rec.clone(),
            slot: "r3",
            reached: reached_tx,
            release: release_rx,
        });
        let cm4 = |port, address| cm4_on(&rig, port, address, Stage::Rom);
        let (b1, b2, b3, b4) = (cm4(3, 12), cm4(4, 30), cm4(5, 40), cm4(6, 50));
        lock(&b4).unplug_on_change = true;
        let mut bus = SimBus::new();
        bus.attach(b4.clone());
        bus.attach(b1.clone());
        bus.attach(b2.clone());
        bus.attach(b3.clone());
        bus.map_block("1-1.5", emmc3.path().to_path_buf());
        // Only r1's gadget shows a disk; r2's eMMC never appears.
        bus.map_block("1-1.3", emmc.path().to_path_buf());
        let station_thread = rig.start(station, gate.clone(), bus, Vec::new(), 4);
        // The boards are plugged in while the station runs.
        plug(&rig.tx, &[&b1, &b2, &b3, &b4]);
        // r3 is through rpiboot and its writer is starting: the cable is pulled (udev
        // reports the gadget's removal).
        reached
            .recv_timeout(WATCHDOG)
            .expect("r3 never reached its write");
        let gadget = lock(&b3).descriptor().unwrap();
        let ev = usbslot::udev_event_for(&gadget, "");
        let node = ev.devnode.clone().unwrap();
        rig.tx.send((Action::Remove, ev)).unwrap();
        wait_said(
            &rig.rec,
            &format!("r3: {node} device removed; cancelling its job"),
        );
        release.send(()).unwrap();
        let (rows, said) = rig.finish(station_thread, (1, 3));
        let r4 = &rows["r4"];
        assert_eq!(r4.result, "fail", "{r4:#?}");
        let why4 = r4.failure_reason.as_deref().unwrap_or("");
        assert!(
            why4.starts_with("usbboot failed: the board left port 1-1.6 during rpiboot"),
            "{why4}"
        );
        assert_eq!(lock(&b4).board.stage, Stage::Off);
        let r3 = &rows["r3"];
        assert_eq!(r3.result, "fail", "{r3:#?}");
        let why3 = r3.failure_reason.as_deref().unwrap_or("");
        assert!(
            why3.contains("removed mid-write") && why3.contains(&node),
            "{why3}"
        );
        let r1 = &rows["r1"];
        let r2 = &rows["r2"];
        assert_eq!(r1.result, "pass", "{r1:#?}\n{said}");
        assert_eq!(r1.devnode.as_deref(), Some("usb:1-1.3"));
        assert_eq!(r1.id_path.as_deref(), Some("pci-0000:00:14.0-usb-0:1.3"));
        assert_eq!(r2.result, "fail", "{r2:#?}");
        let why = r2.failure_reason.as_deref().unwrap_or("");
        assert!(
            why.starts_with("usbboot failed:") && why.contains("mass-storage gadget on port 1-1.4"),
            "{why}"
        );
        assert!(r2.unit_serial.starts_with("OPI5-"), "{r2:#?}");

        // Both boards went through rpiboot: second stage from the SoC directory, then the
        // files the second stage asked for, byte for byte.
        for b in [&b1, &b2, &b3] {
            let b = lock(b);
            assert_eq!(b.board.stage, Stage::MassStorage);
            assert_eq!(
                b.board.second_stage.as_deref(),
                Some(&pattern(52_000, 1)[..])
            );
            assert_eq!(
                b.board.files.get("bootmain"),
                Some(&Some(pattern(40_000, 2)))
            );
        }
        // r1's eMMC (the loop device) holds the image and its identity files.
        check_contents(&rig.img, emmc.path(), &r1.unit_serial, "r1");
    }

    /// CM4s that reach their slots already in mass-storage mode (rpiboot ran before they were
    /// plugged here): no rpiboot, the disk on the port (a real loop device) is the unit. m1
    /// arrives while the station runs and is written, read back and given its identity: PASS.
    /// m2's gadget never shows a disk: FAIL naming the port. m3 was there at start and its
    /// disk is smaller than the image: the writer's safety rules refuse it, nothing written.
    #[test]
    fn station_usb_slots_a_cm4_already_in_mass_storage_mode_is_written_as_its_disk() {
        use sbcflash::usb::sim::usbboot::Stage;
        let Some(rig) = Rig::new("cm4.img", true) else {
            return;
        };
        let emmc = LoopDev::new_sparse(rig.dir.path(), "m1-emmc.bin", 64 * MIB);
        std::fs::write(&emmc.backing, pattern(64 << 20, 0x3c)).unwrap();
        let small = LoopDev::new_sparse(rig.dir.path(), "m3-emmc.bin", 16 * MIB);
        std::fs::write(&small.backing, pattern(16 << 20, 0x11)).unwrap();
        // No usbboot-dir: boards in mass-storage mode need no boot files.
        let station = rig.station(
            "reenumerate_timeout_secs = 2",
            "1-1",
            &[("m1", "1.3"), ("m2", "1.4"), ("m3", "1.5")],
        );
        let gadget = |port, address| cm4_on(&rig, port, address, Stage::MassStorage);
        let (b1, b2, b3) = (gadget(3, 12), gadget(4, 30), gadget(5, 40));
        let mut bus = SimBus::new();
        bus.attach(b1.clone());
        bus.attach(b2.clone());
        bus.attach(b3.clone());
        bus.map_block("1-1.3", emmc.path().to_path_buf());
        bus.map_block("1-1.5", small.path().to_path_buf());
        let present = vec![usbslot::udev_event_for(
            &lock(&b3).descriptor().unwrap(),
            "",
        )];
        let station_thread = rig.start(station, rig.rec.clone(), bus, present, 3);
        plug(&rig.tx, &[&b1, &b2]);
        let (rows, said) = rig.finish(station_thread, (1, 2));
        let (m1, m2, m3) = (&rows["m1"], &rows["m2"], &rows["m3"]);
        assert_eq!(m1.result, "pass", "{m1:#?}\n{said}");
        assert_eq!(m1.devnode.as_deref(), Some("usb:1-1.3"));
        assert_eq!(m1.id_path.as_deref(), Some("pci-0000:00:14.0-usb-0:1.3"));
        assert!(m1.ended_at.is_some());
        assert_eq!(m2.result, "fail", "{m2:#?}");
        let why2 = m2.failure_reason.as_deref().unwrap_or("");
        assert!(
            why2.contains("mass-storage mode on port 1-1.4: no disk appeared"),
            "{why2}"
        );
        assert_eq!(m3.result, "fail", "{m3:#?}");
        let why3 = m3.failure_reason.as_deref().unwrap_or("");
        assert!(
            why3.starts_with("open failed:") && why3.contains("is larger than the target"),
            "{why3}"
        );
        // No board was booted: nothing was sent to any of them, and they stay gadgets.
        for b in [&b1, &b2, &b3] {
            let b = lock(b);
            assert_eq!(b.board.stage, Stage::MassStorage);
            assert!(b.board.second_stage.is_none() && b.board.files.is_empty());
        }
        check_contents(&rig.img, emmc.path(), &m1.unit_serial, "m1");
        assert!(
            std::fs::read(&small.backing).unwrap() == pattern(16 << 20, 0x11),
            "the refused disk was written"
        );
    }
}

/// Runs the station with a pseudo-terminal as its terminal (stdin, stdout and stderr, as an
/// operator's console) and returns everything it drew there, and its exit status.
fn station_on_pty(dir: &Path, config: &Path, args: &[&str]) -> (Vec<u8>, ExitStatus) {
    use std::os::fd::{AsRawFd, OwnedFd};
    let ws = nix::pty::Winsize {
        ws_row: 40,
        ws_col: 120,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    let pty = nix::pty::openpty(Some(&ws), None).expect("openpty");
    let slave: OwnedFd = pty.slave;
    let mut child = sbcflash()
        .env("SBCFLASH_CACHE_DIR", dir.join("cache"))
        .env("TERM", "xterm-256color")
        .env_remove("NO_COLOR")
        .args(["station", "--config"])
        .arg(config)
        .args(args)
        .stdin(Stdio::from(slave.try_clone().unwrap()))
        .stdout(Stdio::from(slave.try_clone().unwrap()))
        .stderr(Stdio::from(slave))
        .spawn()
        .expect("spawn station on a pty");
    let master = std::fs::File::from(pty.master);
    let fd = master.as_raw_fd();
    let reader = std::thread::spawn(move || {
        let mut master = master;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // EIO once the last slave descriptor (the station's) is closed.
        while let Ok(n) = master.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
        }
        out
    });
    let pid = nix::unistd::Pid::from_raw(child.id() as i32);
    let (tx, rx) = crossbeam_channel::bounded::<()>(1);
    std::thread::spawn(move || {
        if rx.recv_timeout(WATCHDOG).is_err() {
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
        }
    });
    let status = child.wait().expect("wait station");
    let _ = tx.send(());
    let out = reader.join().unwrap();
    let _ = fd;
    (out, status)
}

fn count(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).filter(|w| *w == needle).count()
}

/// The operator's alert on FAIL: with `[ui] bell`/`flash` the terminal gets one BEL and one
/// reverse-video flash (DECSCNM on, then off) per failed unit, none for a PASS; without them
/// it gets neither. One slot holds a card too small for the image (refused: FAIL), the other
/// a good one (PASS).
#[test]
fn station_udevd_bell_and_flash_on_fail_reach_the_terminal() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    let b_small = backing(dir, "small.card", 16 * MIB);
    let b_good = backing(dir, "good.card", 64 * MIB);
    let _udevd = Udevd::start();
    let _cards = insert([&b_small, &b_good]);
    let slots: [(&str, &Path); 2] = [("small", &b_small), ("good", &b_good)];
    for (ui, bell, flash) in [
        ("[ui]\nbell = true\nflash = true\n", 1, 1),
        ("[ui]\nbell = false\nflash = false\n", 0, 0),
    ] {
        let _ = std::fs::remove_file(dir.join("ledger.sqlite"));
        let cfg = write_config(dir, &img, &slots, "");
        let mut text = std::fs::read_to_string(&cfg).unwrap();
        text = text.replace("[identity]", &format!("{ui}[identity]"));
        std::fs::write(&cfg, text).unwrap();
        let (out, status) = station_on_pty(dir, &cfg, &["--flash-present", "--exit-after", "2"]);
        let shown = String::from_utf8_lossy(&out);
        assert_eq!(status.code(), Some(5), "one unit failed: exit 5\n{shown}");
        assert!(
            shown.contains("small FAIL") && shown.contains("good PASS"),
            "both results on the terminal:\n{shown}"
        );
        // Each slot has one line, cut to the terminal: no counters on result lines, no
        // wrapped reasons (the whole reason scrolls above the bars).
        assert!(
            !shown.contains("0 B/s OPI5"),
            "result line with counters:\n{shown}"
        );
        assert!(
            shown.contains("small FAIL: OPI5-") && shown.contains("larger than the target"),
            "the whole FAIL reason is printed:\n{shown}"
        );
        assert!(shown.contains("small idle") && shown.contains("good idle"));
        assert_eq!(count(&out, b"\x07"), bell, "BEL with {ui:?}:\n{shown:?}");
        assert_eq!(count(&out, b"\x1b[?5h"), flash, "flash on with {ui:?}");
        assert_eq!(count(&out, b"\x1b[?5l"), flash, "flash off with {ui:?}");
        if flash == 1 {
            let on = shown.find("\x1b[?5h").unwrap();
            assert!(shown[on..].contains("\x1b[?5l"), "flash never turned off");
        }
        let rows = report(&cfg);
        assert_eq!(unit_row(&rows, "small")["result"], "fail");
        assert_eq!(unit_row(&rows, "good")["result"], "pass");
    }
}

/// `check_card = true`: each card is checked before it is written. A card that claims 64 MiB
/// but holds 1 MiB (its loop device's backing file sits on a 1 MiB tmpfs, so probe writes past
/// that fail with real I/O errors) is FAIL with the check's reason in the ledger and never
/// written; a good card in the other slot is checked, then written as usual.
#[test]
fn station_udevd_check_card_fails_a_card_that_cannot_hold_its_size() {
    let Some((_serial, tmp, img)) = udevd_setup() else {
        return;
    };
    let dir = tmp.path();
    let tiny = Tmpfs::mount(&dir.join("tiny"), "1M");
    let b_good = backing(dir, "good.card", 64 * MIB);
    let b_small = backing(&tiny.dir, "small.card", 64 * MIB);
    let cfg = write_config(
        dir,
        &img,
        &[("good", &b_good), ("small", &b_small)],
        "check_card = true",
    );
    let _udevd = Udevd::start();
    let [d_good, d_small] = insert([&b_good, &b_small]);
    let mut st = Station::spawn(dir, &cfg, &["--flash-present", "--exit-after", "2"]);
    let status = st.wait_exit();
    assert_eq!(status.code(), Some(5), "{}\n{}", st.dump(), st.stderr());
    let rows = report(&cfg);
    assert_eq!(rows.len(), 2, "{rows:#?}");
    let good = unit_row(&rows, "good");
    assert_eq!(good["result"], "pass", "{good:#}");
    check_unit(
        &img,
        d_good.path(),
        good["unit_serial"].as_str().unwrap(),
        "good",
    );
    let small = unit_row(&rows, "small");
    assert_eq!(small["result"], "fail", "{small:#}");
    let why = small["failure_reason"].as_str().unwrap();
    assert!(
        why.starts_with("card-check failed")
            && why.contains("card failed the check: usable")
            && why.contains("writing byte"),
        "{why}"
    );
    assert_eq!(small["bytes_written"], 0, "{small:#}");
    let head = read_range(d_small.path(), 0, 512);
    assert!(
        head[510] != 0x55 || head[511] != 0xaa,
        "the failed card was written anyway"
    );
    assert!(
        st.dump().contains("card check: ") && st.dump().contains("read back as written"),
        "the good card's check is reported: {}",
        st.dump()
    );
}

/// QEMU "boards" of the boot acceptance test, stopped by the PID in each state dir on drop.
struct Boards(Vec<PathBuf>);

impl Drop for Boards {
    fn drop(&mut self) {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/uboot-target.sh");
        for s in &self.0 {
            let _ = Command::new(&script)
                .arg("stop")
                .arg("--state")
                .arg(s)
                .stdout(Stdio::null())
                .status();
        }
    }
}

/// Boot acceptance, concurrently on three slots: each slot's reset command starts a QEMU
/// board (Debian's U-Boot) on the slot's freshly written loop device, its console is the
/// board's pty. Two boards are aarch64 and boot to the login and the check; the third is a
/// riscv64 board, on which the aarch64 image cannot boot: that unit FAILs naming U-Boot's
/// stage while the others PASS, and the ledger has each boot result, time to login and the
/// blake3 of each transcript.
#[test]
fn station_udevd_qemu_boot_acceptance_fails_the_unit_that_does_not_boot() {
    let tools = common::try_tools("riscv64");
    let mut need: Vec<&str> = tools.iter().map(String::as_str).collect();
    need.extend(["qemu-system-aarch64", "socat"]);
    let Some(_serial) = udevd_lock(&need) else {
        return;
    };
    let img = common::harness_image(Path::new(env!("CARGO_TARGET_TMPDIR")), &[]);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/harness/uboot-target.sh");
    let names = ["b1", "b2", "b3"];
    let backs: Vec<PathBuf> = names
        .iter()
        .map(|n| backing(dir, &format!("{n}.card"), 128 * MIB))
        .collect();
    let states: Vec<PathBuf> = names
        .iter()
        .map(|n| dir.join(format!("qemu-{n}")))
        .collect();
    let _boards = Boards(states.clone());
    let mut t = format!(
        "ledger = \"ledger.sqlite\"\nlog_dir = \"logs\"\nimage = \"{}\"\n[identity]\nserial = \"T-{{seq:03}}\"\nhostname = \"{{serial_lower}}\"\n",
        img.display()
    );
    for ((n, b), s) in names.iter().zip(&backs).zip(&states) {
        let arch = if *n == "b3" { "riscv64" } else { "aarch64" };
        // b1's console is noisy: kernel messages from early userspace on, a burst on the
        // login prompt's line.
        let noise = if *n == "b1" {
            " --noise 'rate=5 login-burst=60'"
        } else {
            ""
        };
        let sc = script.display();
        let sd = s.display();
        t.push_str(&format!(
            r#"[[slot]]
name = "{n}"
match = {{ "attr:loop/backing_file" = "{}" }}
[slot.boot]
reset = "{sc} start --state {sd} --arch {arch}{noise} --disk $SBCFLASH_DEVICE --paused >/dev/null && ({sc} cont --state {sd} >/dev/null 2>&1 &)"
console = "{sd}/tty"
check = "uname -m"
timeout = 240
off = "{sc} stop --state {sd}"
"#,
            b.display()
        ));
    }
    let cfg = dir.join("station.toml");
    std::fs::write(&cfg, t).unwrap();

    let _udevd = Udevd::start();
    let devs: Vec<LoopDev> = backs.iter().map(|b| LoopDev::attach(b, &[])).collect();
    Udevd::settle();
    let mut st = Station::spawn(dir, &cfg, &["--flash-present", "--exit-after", "3"]);
    let status = st.wait_exit();
    let ctx = format!("{}\n{}", st.dump(), st.stderr());
    assert_eq!(status.code(), Some(5), "one unit failed: exit 5\n{ctx}");
    // Concurrently: every board was reset before any unit ended.
    let last_reset = names
        .iter()
        .map(|n| {
            st.seen
                .iter()
                .position(|v| is_msg(v, n, "resetting the unit"))
                .unwrap_or_else(|| panic!("{n} was not reset\n{ctx}"))
        })
        .max()
        .unwrap();
    let first_end = st
        .seen
        .iter()
        .position(|v| {
            names
                .iter()
                .any(|n| is_msg(v, n, "PASS") || is_msg(v, n, "FAIL"))
        })
        .unwrap_or_else(|| panic!("no unit ended\n{ctx}"));
    assert!(
        last_reset < first_end,
        "boards ran one after another\n{ctx}"
    );

    let rows = report(&cfg);
    for n in ["b1", "b2"] {
        let r = unit_row(&rows, n);
        assert_eq!(r["result"], "pass", "{r:#}\n{ctx}");
        assert_eq!(r["boot_result"], "pass", "{r:#}");
        assert_eq!(r["boot_stage"], "check", "{r:#}");
        assert!(r["boot_login_seconds"].as_f64().unwrap() > 0.0, "{r:#}");
        let tr = PathBuf::from(r["boot_transcript"].as_str().unwrap());
        let text = std::fs::read(&tr).unwrap();
        assert_eq!(
            r["boot_transcript_blake3"],
            blake3::hash(&text).to_hex().to_string()
        );
        let text = String::from_utf8_lossy(&text);
        assert!(
            text.contains("sbcflash-test login:") && text.contains("aarch64"),
            "{text}"
        );
    }
    let r = unit_row(&rows, "b3");
    assert_eq!(r["result"], "fail", "{r:#}");
    assert_eq!(r["boot_result"], "fail", "{r:#}");
    assert_eq!(r["boot_stage"], "U-Boot", "{r:#}");
    assert_eq!(r["boot_login_seconds"], Value::Null);
    let reason = r["failure_reason"].as_str().unwrap();
    assert!(
        reason.contains("boot failed in stage \"U-Boot\"")
            && reason.contains("Bad Linux RISCV Image magic"),
        "{reason}"
    );
    assert!(r["boot_transcript_blake3"].is_string());
    // The boards were powered off by each slot's `off` command.
    for s in &states {
        assert!(
            !s.join("qemu.pid").exists(),
            "{} still running",
            s.display()
        );
    }
    drop(devs);
}
