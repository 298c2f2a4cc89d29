//! `.zip` images, made by real tools (Info-ZIP `zip`, python3's `zipfile`), written to loop
//! devices from a local file, a pipe and an HTTPS server on 127.0.0.1.

mod acquire_server;
mod common;

use common::text;

use acquire_server::{Behavior, TestServer};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

const MIB: u64 = 1 << 20;
const IMG_MIB: u64 = 48;

fn tools() -> Vec<&'static str> {
    let mut t = vec!["losetup", "zip", "python3", "xz"];
    t.extend(common::IMAGE_TOOLS);
    t
}

/// python3's zipfile: one member `arc` from `src`, zip64 headers forced. `out` "-" writes to
/// stdout (a pipe: sizes go to a data descriptor after the data).
const PY_ZIP: &str = r#"
import shutil, sys, zipfile
out, method, src, arc = sys.argv[1:5]
m = zipfile.ZIP_STORED if method == "stored" else zipfile.ZIP_DEFLATED
dst = sys.stdout.buffer if out == "-" else open(out, "wb")
with zipfile.ZipFile(dst, "w", m) as z:
    with open(src, "rb") as f, z.open(arc, "w", force_zip64=True) as w:
        shutil.copyfileobj(f, w, 1 << 20)
"#;

fn py_zip(dir: &Path, out: &str, method: &str, src: &str, arc: &str) {
    let target = if out.starts_with("pipe-") { "-" } else { out };
    let o = common::run(
        Command::new("python3")
            .current_dir(dir)
            .args(["-c", PY_ZIP, target, method, src, arc]),
    );
    if target == "-" {
        std::fs::write(dir.join(out), &o.stdout).unwrap();
    }
}

/// The raw image and zips of it made every way a vendor or a pipe makes them.
struct Zips {
    raw: PathBuf,
}

fn make_zips(dir: &Path) -> Zips {
    let raw = common::make_nixos_like_image(dir, "nixos.img", IMG_MIB, common::Table::Mbr);
    let d = dir.display();
    common::sh(&format!(
        r#"cd "{d}"
zip -q -j deflate.zip nixos.img
zip -q -j -0 stored.zip nixos.img
zip -q - - < nixos.img > pipe.zip
xz -k -T0 -1 nixos.img
zip -q -j -0 xz-inside.zip nixos.img.xz
printf 'release notes\n' > notes.txt
zip -q -j several.zip nixos.img notes.txt
# As macOS's Archive Utility makes it: a folder entry and resource forks beside the image.
mkdir -p dist __MACOSX/dist && ln nixos.img dist/nixos.img && printf 'fork' > __MACOSX/dist/._nixos.img
zip -q -r macos.zip dist __MACOSX
rm -r dist __MACOSX
"#
    ));
    py_zip(dir, "py64-stored.zip", "stored", "nixos.img", "nixos.img");
    py_zip(
        dir,
        "pipe-py64-deflate.zip",
        "deflate",
        "nixos.img",
        "nixos.img",
    );
    py_zip(
        dir,
        "pipe-py-stored.zip",
        "stored",
        "nixos.img",
        "nixos.img",
    );
    Zips { raw }
}

fn write(img: &str, target: &Path, extra: &[&str]) -> Output {
    common::sbcflash()
        .args(["write", "--yes"])
        .args(extra)
        .arg(img)
        .arg(target)
        .output()
        .unwrap()
}

fn all_zero(p: &Path) -> bool {
    std::fs::read(p).unwrap().iter().all(|b| *b == 0)
}

fn b3sum(p: &Path) -> String {
    blake3::hash(&std::fs::read(p).unwrap())
        .to_hex()
        .to_string()
}

#[test]
fn zips_of_every_kind_from_a_file_and_a_pipe_write_byte_exact() {
    if !common::require(true, &tools()) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let z = make_zips(d.path());
    let want = b3sum(&z.raw);
    for name in [
        "deflate.zip",
        "stored.zip",
        "pipe.zip",
        "xz-inside.zip",
        "py64-stored.zip",
        "pipe-py64-deflate.zip",
        "pipe-py-stored.zip",
        "macos.zip",
    ] {
        let zip = d.path().join(name);
        let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
        let o = write(zip.to_str().unwrap(), lo.path(), &[]);
        assert!(o.status.success(), "{name}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(err.contains("zip → "), "{name}: layers not shown: {err}");
        common::assert_same_prefix(&z.raw, lo.path(), IMG_MIB * MIB);
        // `hash` and `verify` take a zip like any image.
        let h = common::run(common::sbcflash().arg("hash").arg(&zip));
        let line = String::from_utf8_lossy(&h.stdout);
        assert!(line.starts_with(&want), "{name}: hash {line} != {want}");
        drop(lo);
    }
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
    common::run(
        common::sbcflash()
            .args(["write", "--yes", "--no-verify"])
            .arg(&z.raw)
            .arg(lo.path()),
    );
    let v = common::run(
        common::sbcflash()
            .arg("verify")
            .arg(d.path().join("deflate.zip"))
            .arg(lo.path()),
    );
    assert!(
        String::from_utf8_lossy(&v.stdout).contains(&format!("blake3 {want}")),
        "{}",
        text(&v)
    );
    drop(lo);
    // A zip arriving through a pipe is read from its local headers (no central directory
    // until its end), including members whose sizes follow their data.
    for name in ["pipe.zip", "pipe-py64-deflate.zip", "deflate.zip"] {
        let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
        let mut c = common::sbcflash()
            .args(["write", "--yes", "/dev/stdin"])
            .arg(lo.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let bytes = std::fs::read(d.path().join(name)).unwrap();
        let mut stdin = c.stdin.take().unwrap();
        let feeder = std::thread::spawn(move || {
            let _ = stdin.write_all(&bytes);
        });
        let o = c.wait_with_output().unwrap();
        feeder.join().unwrap();
        assert!(o.status.success(), "{name} through a pipe: {}", text(&o));
        common::assert_same_prefix(&z.raw, lo.path(), IMG_MIB * MIB);
    }
}

#[test]
fn zip_with_several_members_lists_them_and_takes_member() {
    if !common::require(true, &tools()) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let z = make_zips(d.path());
    let several = d.path().join("several.zip");
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
    let o = write(several.to_str().unwrap(), lo.path(), &[]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("several.zip")
            && err.contains("2 members (nixos.img, notes.txt)")
            && err.contains("--member NAME"),
        "{err}"
    );
    assert!(all_zero(&lo.backing), "the target was written");
    let o = write(
        several.to_str().unwrap(),
        lo.path(),
        &["--member", "nope.img"],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("no member nope.img; its members: nixos.img, notes.txt"),
        "{err}"
    );
    assert!(all_zero(&lo.backing), "the target was written");
    let o = write(
        several.to_str().unwrap(),
        lo.path(),
        &["--member", "nixos.img"],
    );
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same_prefix(&z.raw, lo.path(), IMG_MIB * MIB);
    let h = common::run(
        common::sbcflash()
            .args(["hash", "--member", "nixos.img"])
            .arg(&several),
    );
    assert!(String::from_utf8_lossy(&h.stdout).starts_with(&b3sum(&z.raw)));
    // --member on an image that is no zip is a mistake, not ignored.
    let o = write(z.raw.to_str().unwrap(), lo.path(), &["--member", "x"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("--member applies to .zip images"));
}

#[test]
fn zip_over_https() {
    if !common::require(true, &tools()) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    let z = make_zips(d.path());
    let body = |n: &str| Arc::new(std::fs::read(d.path().join(n)).unwrap());
    for n in [
        "pipe.zip",
        "py64-stored.zip",
        "pipe-py64-deflate.zip",
        "xz-inside.zip",
        "several.zip",
        "pipe-py-stored.zip",
        "macos.zip",
    ] {
        srv.add(&format!("/{n}"), body(n), Behavior::Normal);
    }
    let cache = d.path().join("cache");
    let get = |n: &str, extra: &[&str], lo: &common::LoopDev| {
        common::sbcflash()
            .args(["write", "--yes"])
            .args(extra)
            .arg(srv.url(&format!("/{n}")))
            .arg(lo.path())
            .arg("--ca-file")
            .arg(&srv.ca_file)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap()
    };
    for n in [
        "pipe.zip",
        "py64-stored.zip",
        "pipe-py64-deflate.zip",
        "xz-inside.zip",
        "macos.zip",
    ] {
        let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
        let pin = blake3::hash(&body(n)).to_hex().to_string();
        let o = get(n, &["--source-blake3", &pin], &lo);
        assert!(o.status.success(), "{n}: {}", text(&o));
        common::assert_same_prefix(&z.raw, lo.path(), IMG_MIB * MIB);
    }
    // Several members: known only after the first one; the write stops before the first MiB.
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
    let o = get("several.zip", &[], &lo);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("2 members (nixos.img, notes.txt)") && err.contains("--member NAME"),
        "{err}"
    );
    let disk = std::fs::read(&lo.backing).unwrap();
    assert!(disk[..MIB as usize].iter().all(|b| *b == 0), "head written");
    drop(lo);
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
    let o = get("several.zip", &["--member", "nixos.img"], &lo);
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same_prefix(&z.raw, lo.path(), IMG_MIB * MIB);
    drop(lo);
    // A stored member whose size follows its data has no findable end in a stream.
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
    let o = get("pipe-py-stored.zip", &[], &lo);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("is stored with its size after the data"),
        "{}",
        text(&o)
    );
    assert!(all_zero(&lo.backing), "the target was written");
}

#[test]
fn corrupt_or_truncated_zip_names_file_and_offset_and_keeps_the_head_unwritten() {
    if !common::require(true, &tools()) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    make_zips(d.path());
    let good = std::fs::read(d.path().join("deflate.zip")).unwrap();
    // Damage the deflate data in its middle: the decoder or the CRC-32 catches it.
    let mut bad = good.clone();
    let mid = bad.len() / 2;
    for b in &mut bad[mid..mid + 64] {
        *b ^= 0x5A;
    }
    let bad_path = d.path().join("bad.zip");
    std::fs::write(&bad_path, &bad).unwrap();
    // Damage near its start, in the deflate blocks of the image's first bytes.
    let mut bad_start = good.clone();
    for b in &mut bad_start[200..264] {
        *b ^= 0x5A;
    }
    let bad_start_path = d.path().join("bad-start.zip");
    std::fs::write(&bad_start_path, &bad_start).unwrap();
    // Cut in half: no central directory.
    let cut_path = d.path().join("cut.zip");
    std::fs::write(&cut_path, &good[..good.len() / 2]).unwrap();
    srv.add("/bad.zip", Arc::new(bad), Behavior::Normal);
    srv.add(
        "/cut.zip",
        Arc::new(good[..good.len() / 2].to_vec()),
        Behavior::Normal,
    );
    let cache = d.path().join("cache");
    let cases: [(String, &str); 5] = [
        (bad_path.display().to_string(), "is corrupt"),
        (bad_start_path.display().to_string(), "is corrupt"),
        (cut_path.display().to_string(), "not a readable zip file"),
        (srv.url("/bad.zip"), "is corrupt"),
        (srv.url("/cut.zip"), "truncated download?"),
    ];
    for (img, why) in cases {
        let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 * MIB);
        let o = common::sbcflash()
            .args(["write", "--yes", &img])
            .arg(lo.path())
            .arg("--ca-file")
            .arg(&srv.ca_file)
            .arg("--cache-dir")
            .arg(&cache)
            .output()
            .unwrap();
        assert_eq!(o.status.code(), Some(3), "{img}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        eprintln!("{err}");
        let file = img.rsplit('/').next().unwrap();
        assert!(
            err.contains(&format!("{file}: at offset ")) && err.contains(why),
            "{img}: {err}"
        );
        let disk = std::fs::read(&lo.backing).unwrap();
        assert!(
            disk[..MIB as usize].iter().all(|b| *b == 0),
            "{img}: the head (partition table) was written"
        );
    }
}
