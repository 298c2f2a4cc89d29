//! Sidecars that no longer describe their image: a stale `IMAGE.blake3`, a `.bmap` made before
//! the image changed in a mapped range, and a bmap that calls changed data unmapped. The bmaps
//! are made by the real `bmaptool create`, the targets are loop devices.

mod common;

use common::{make_nixos_like_image, require, sbcflash, text, LoopDev, Table};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn sbc(args: &[&std::ffi::OsStr]) -> Output {
    sbcflash()
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run sbcflash")
}

fn os<P: AsRef<std::ffi::OsStr> + ?Sized>(p: &P) -> &std::ffi::OsStr {
    p.as_ref()
}

/// A 48 MiB NixOS-like image and its bmap made by `bmaptool create`.
fn image_with_bmap(dir: &Path) -> (PathBuf, PathBuf) {
    let img = make_nixos_like_image(dir, "n.img", 48, Table::Mbr);
    let bmap = dir.join("n.img.bmap");
    common::run(
        Command::new("bmaptool")
            .arg("create")
            .arg(&img)
            .arg("-o")
            .arg(&bmap),
    );
    (img, bmap)
}

/// The bmap's mapped block ranges (inclusive), from its `<Range>` elements.
fn mapped_blocks(bmap: &Path) -> Vec<(u64, u64)> {
    let xml = std::fs::read_to_string(bmap).unwrap();
    xml.split("<Range")
        .skip(1)
        .filter_map(|r| {
            let body = r.split('>').nth(1)?.split('<').next()?.trim();
            let (a, b) = body.split_once('-').unwrap_or((body, body));
            Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
        })
        .collect()
}

/// Writes `bytes` into the image at `offset` (as a rebuild or an edit would), after its bmap.
fn change(img: &Path, offset: u64, bytes: &[u8]) {
    let f = std::fs::OpenOptions::new().write(true).open(img).unwrap();
    f.write_all_at(bytes, offset).unwrap();
}

#[test]
fn a_stale_blake3_sidecar_is_named_with_how_to_renew_it() {
    if !require(true, &[&["losetup"][..], common::IMAGE_TOOLS].concat()) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let img = make_nixos_like_image(d.path(), "n.img", 48, Table::Mbr);
    let side = d.path().join("n.img.blake3");
    std::fs::write(&side, format!("{}  n.img\n", "1".repeat(64))).unwrap();
    let lo = LoopDev::new_sparse(d.path(), "t.backing", 64 << 20);

    let o = sbc(&[os("write"), os(&img), os(lo.path()), os("--yes")]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        "expected 1111",
        &format!("from the sidecar {}", side.display()),
        "sbcflash hash --write-sidecar",
    ] {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
    // The renewal it offers makes the write good.
    let o = sbc(&[os("hash"), os("--write-sidecar"), os(&img)]);
    assert!(o.status.success(), "{}", text(&o));
    let o = sbc(&[os("write"), os(&img), os(lo.path()), os("--yes")]);
    assert!(o.status.success(), "{}", text(&o));

    // `verify` names it too.
    std::fs::write(&side, format!("{}  n.img\n", "2".repeat(64))).unwrap();
    let o = sbc(&[os("verify"), os(&img), os(lo.path())]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr)
            .contains(&format!("from the sidecar {}", side.display())),
        "{}",
        text(&o)
    );
}

#[test]
fn a_bmap_older_than_a_changed_image_is_called_stale_and_no_bmap_offered() {
    if !require(
        true,
        &[&["losetup", "bmaptool"][..], common::IMAGE_TOOLS].concat(),
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (img, bmap) = image_with_bmap(d.path());
    // The FAT boot sector at 8 MiB is mapped: change a byte of it.
    let block = (8u64 << 20) / 4096;
    assert!(
        mapped_blocks(&bmap)
            .iter()
            .any(|&(a, b)| a <= block && block <= b),
        "block {block} not mapped: {:?}",
        mapped_blocks(&bmap)
    );
    change(&img, (8 << 20) + 3, b"CHANGED!");
    let lo = LoopDev::new_sparse(d.path(), "t.backing", 64 << 20);

    let o = sbc(&[os("write"), os(&img), os(lo.path()), os("--yes")]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    for want in [
        &format!("the bmap {} does not match the image", bmap.display()),
        "--no-bmap",
        "was modified after its bmap",
    ] {
        assert!(err.contains(want), "missing {want:?}: {err}");
    }
    // Nothing claims to be a good card: the partition table was not written.
    let mut head = vec![0u8; 512];
    std::fs::File::open(lo.path())
        .unwrap()
        .read_exact_at(&mut head, 0)
        .unwrap();
    assert!(head.iter().all(|&b| b == 0), "partition table written");

    // The way out it offers works.
    let o = sbc(&[
        os("write"),
        os(&img),
        os(lo.path()),
        os("--yes"),
        os("--no-bmap"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same_prefix(&img, lo.path(), 48 << 20);
}

#[test]
fn hash_never_reports_a_digest_that_leaves_out_data_a_bmap_calls_unmapped() {
    if !require(
        false,
        &[&["bmaptool", "zstd"][..], common::IMAGE_TOOLS].concat(),
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let (img, bmap) = image_with_bmap(d.path());
    // Through the fresh bmap: a digest, equal to the blake3 of every byte.
    let full = blake3::hash(&std::fs::read(&img).unwrap())
        .to_hex()
        .to_string();
    let o = sbc(&[os("hash"), os(&img)]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stdout).starts_with(&full),
        "{}",
        text(&o)
    );

    // Data lands in a block the bmap calls unmapped (a hole when it was made).
    let mapped = mapped_blocks(&bmap);
    let block = (2048u64..48 * 256)
        .find(|b| !mapped.iter().any(|&(a, z)| a <= *b && *b <= z))
        .expect("an unmapped block");
    change(
        &img,
        block * 4096 + 100,
        b"data the bmap does not know about",
    );
    let full = blake3::hash(&std::fs::read(&img).unwrap())
        .to_hex()
        .to_string();
    common::run(Command::new("zstd").args(["-q", "-f", "-k"]).arg(&img));
    let zst = d.path().join("n.img.zst");
    for image in [&img, &zst] {
        let o = sbc(&[os("hash"), os(image)]);
        assert_eq!(
            o.status.code(),
            Some(3),
            "{}: {}",
            image.display(),
            text(&o)
        );
        assert!(o.stdout.is_empty(), "printed a digest: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        for want in [
            &format!("the bmap {} does not match the image", bmap.display()),
            "bytes that hold data",
            &format!("offset {}", block * 4096 + 100),
            "--no-bmap",
        ] {
            assert!(
                err.contains(want),
                "{}: missing {want:?}: {err}",
                image.display()
            );
        }
        // With every byte: the digest of the image as it is.
        let o = sbc(&[os("hash"), os("--no-bmap"), os(image)]);
        assert!(o.status.success(), "{}", text(&o));
        assert!(
            String::from_utf8_lossy(&o.stdout).starts_with(&full),
            "{}",
            text(&o)
        );
    }
}
