//! Signed images against real signers: `minisign`, `ssh-keygen -Y sign` and `gpg` make the keys
//! and signatures, `bmaptool` the bmap, a TLS server on 127.0.0.1 serves a streamed image. Every
//! refusal must leave the target's bytes as they were.

mod acquire_server;
mod common;

use common::text;

use acquire_server::{Behavior, TestServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

const TOOLS: &[&str] = &[
    "minisign",
    "ssh-keygen",
    "gpg",
    "gpgconf",
    "bmaptool",
    "zstd",
    "sfdisk",
    "mkfs.ext4",
    "mkfs.vfat",
    "mcopy",
];

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// A work directory with a NixOS-like image and a target file holding known bytes.
struct Fx {
    d: tempfile::TempDir,
    img: PathBuf,
    target: PathBuf,
}

const TARGET_LEN: u64 = 48 << 20;

impl Fx {
    fn new() -> Fx {
        let d = tempfile::tempdir().unwrap();
        let img = common::make_nixos_like_image(d.path(), "nixos.img", 40, common::Table::Mbr);
        let target = d.path().join("target.bin");
        let fx = Fx { d, img, target };
        fx.reset_target();
        fx
    }

    fn p(&self, name: &str) -> PathBuf {
        self.d.path().join(name)
    }

    /// The target: a file of TARGET_LEN bytes, its first MiB a known pattern (not an image).
    fn reset_target(&self) {
        let pattern: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8 ^ 0x5a).collect();
        std::fs::write(&self.target, &pattern).unwrap();
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&self.target)
            .unwrap();
        f.set_len(TARGET_LEN).unwrap();
    }

    fn target_digest(&self) -> blake3::Hash {
        blake3::hash(&std::fs::read(&self.target).unwrap())
    }

    /// `sbcflash write --yes ARGS... IMAGE TARGET` with an empty config home.
    fn write(&self, image: &Path, args: &[&str]) -> Output {
        let cfg = self.p("xdg");
        std::fs::create_dir_all(&cfg).unwrap();
        common::sbcflash()
            .arg("write")
            .arg("--yes")
            .args(args)
            .arg(image)
            .arg(&self.target)
            .env("XDG_CONFIG_HOME", &cfg)
            .env_remove("SBCFLASH_CONFIG")
            .env("XDG_CACHE_HOME", self.p("cache"))
            .output()
            .unwrap()
    }

    /// Runs a refused write: its exit code and stderr are checked, and the target is unchanged.
    fn refused(&self, image: &Path, args: &[&str], code: i32, says: &[&str]) -> String {
        let before = self.target_digest();
        let o = self.write(image, args);
        assert_eq!(o.status.code(), Some(code), "{}", text(&o));
        let err = stderr(&o);
        for s in says {
            assert!(err.contains(s), "expected {s:?} in:\n{err}");
        }
        assert!(err.contains("nothing was written"), "{err}");
        assert_eq!(self.target_digest(), before, "the target was changed");
        eprintln!("REFUSED (exit {code}): {}", err.trim());
        err
    }

    /// Runs a write that must succeed; returns its JSON result line.
    fn written(&self, image: &Path, args: &[&str]) -> serde_json::Value {
        self.reset_target();
        let mut a = vec!["--json"];
        a.extend_from_slice(args);
        let o = self.write(image, &a);
        assert!(o.status.success(), "{}", text(&o));
        let out = String::from_utf8_lossy(&o.stdout).into_owned();
        common::json::assert_documented(&out);
        common::assert_same_prefix(&self.img, &self.target, 40 << 20);
        let result = out
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|v| v["event"] == "result")
            .expect("a result line");
        self.reset_target();
        result
    }
}

fn tamper(p: &Path, offset: u64) {
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(p)
        .unwrap();
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.read_exact(&mut b).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    f.write_all(&[b[0] ^ 0xff]).unwrap();
}

fn truncate_half(p: &Path) {
    let t = std::fs::read(p).unwrap();
    std::fs::write(p, &t[..t.len() / 2]).unwrap();
}

/// `minisign -G` without a password; returns (public key file, secret key file, key ID as
/// minisign prints it in the public key's comment).
fn minisign_key(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let (p, s) = (
        dir.join(format!("{name}.pub")),
        dir.join(format!("{name}.key")),
    );
    common::run(
        Command::new("minisign")
            .args(["-G", "-W", "-p"])
            .arg(&p)
            .arg("-s")
            .arg(&s),
    );
    let text = std::fs::read_to_string(&p).unwrap();
    let id = text
        .lines()
        .next()
        .and_then(|l| l.rsplit(' ').next())
        .unwrap()
        .to_string();
    (p, s, id)
}

fn minisign_sign(key: &Path, file: &Path) -> PathBuf {
    common::run(
        Command::new("minisign")
            .args(["-S", "-s"])
            .arg(key)
            .arg("-m")
            .arg(file),
    );
    PathBuf::from(format!("{}.minisig", file.display()))
}

/// `ssh-keygen -t ed25519`; returns (public key file, private key file, SHA256 fingerprint as
/// `ssh-keygen -l` prints it).
fn ssh_key(dir: &Path, name: &str) -> (PathBuf, PathBuf, String) {
    let k = dir.join(name);
    common::run(
        Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "", "-C", name, "-f"])
            .arg(&k),
    );
    let pubk = PathBuf::from(format!("{}.pub", k.display()));
    let o = common::run(Command::new("ssh-keygen").arg("-lf").arg(&pubk));
    let fp = String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .nth(1)
        .unwrap()
        .to_string();
    (pubk, k, fp)
}

fn ssh_sign(key: &Path, file: &Path) -> PathBuf {
    common::run(
        Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", "file", "-f"])
            .arg(key)
            .arg(file),
    );
    PathBuf::from(format!("{}.sig", file.display()))
}

/// A GnuPG home with one ed25519 signing key; its agent is stopped on drop (by this home only).
struct Gpg {
    home: PathBuf,
}

impl Gpg {
    fn new(dir: &Path, name: &str) -> Gpg {
        let home = dir.join(name);
        std::fs::create_dir_all(&home).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&home, std::fs::Permissions::from_mode(0o700)).unwrap();
        let g = Gpg { home };
        g.run(&[
            "--quick-gen-key",
            &format!("{name} <{name}@example.org>"),
            "ed25519",
            "sign",
            "never",
        ]);
        g
    }

    fn run(&self, args: &[&str]) -> Output {
        common::run(
            Command::new("gpg")
                .arg("--homedir")
                .arg(&self.home)
                .args(["--batch", "--pinentry-mode", "loopback", "--passphrase", ""])
                .args(args),
        )
    }

    /// The armored public key, as a file to trust.
    fn export(&self, to: &Path) -> String {
        let o = self.run(&["--armor", "--export"]);
        std::fs::write(to, &o.stdout).unwrap();
        let o = self.run(&["--with-colons", "--fingerprint"]);
        String::from_utf8_lossy(&o.stdout)
            .lines()
            .find(|l| l.starts_with("fpr:"))
            .and_then(|l| l.split(':').nth(9))
            .unwrap()
            .to_string()
    }

    fn detach_sign_armored(&self, file: &Path) -> PathBuf {
        let out = PathBuf::from(format!("{}.asc", file.display()));
        let (o, f) = (out.display().to_string(), file.display().to_string());
        self.run(&["--armor", "--detach-sign", "-o", &o, &f]);
        out
    }
}

impl Drop for Gpg {
    fn drop(&mut self) {
        let _ = Command::new("gpgconf")
            .arg("--homedir")
            .arg(&self.home)
            .args(["--kill", "gpg-agent"])
            .output();
    }
}

#[test]
fn minisign_signed_image() {
    if !common::require(false, TOOLS) {
        return;
    }
    let fx = Fx::new();
    let (pubk, seck, id) = minisign_key(fx.d.path(), "release");
    let (other_pub, _, other_id) = minisign_key(fx.d.path(), "other");
    let sig = minisign_sign(&seck, &fx.img);
    let k = pubk.display().to_string();
    // Good: written, and the result names the key as minisign does.
    let r = fx.written(&fx.img, &["--trusted-key", &k, "--require-signature"]);
    assert_eq!(r["signature"]["key_id"], format!("minisign:{id}"), "{r}");
    assert_eq!(r["signature"]["scheme"], "minisign");
    // The key given inline (the base64 line) works the same.
    let inline = std::fs::read_to_string(&pubk).unwrap();
    let inline = inline.lines().nth(1).unwrap();
    fx.written(&fx.img, &["--trusted-key", inline, "--require-signature"]);
    // Wrong key: the signer and the trusted keys are named.
    fx.refused(
        &fx.img,
        &["--trusted-key", &other_pub.display().to_string()],
        6,
        &[&format!(
            "is signed by minisign:{id}, which is not a trusted key (trusted: minisign:{other_id})"
        )],
    );
    // Truncated signature.
    let good = std::fs::read(&sig).unwrap();
    truncate_half(&sig);
    fx.refused(
        &fx.img,
        &["--trusted-key", &k],
        6,
        &["BAD signature for", "not a readable minisign signature"],
    );
    std::fs::write(&sig, &good).unwrap();
    // Tampered image: one byte flipped in the ext4 file system after signing.
    tamper(&fx.img, 30 << 20);
    fx.refused(
        &fx.img,
        &["--trusted-key", &k],
        6,
        &["BAD signature for", "minisign: "],
    );
    // Unsigned with --require-signature: refused before the target is touched.
    std::fs::remove_file(&sig).unwrap();
    fx.refused(
        &fx.img,
        &["--trusted-key", &k, "--require-signature"],
        4,
        &["a signature is required", "nixos.img.minisig"],
    );
}

#[test]
fn ssh_signed_image() {
    if !common::require(false, TOOLS) {
        return;
    }
    let fx = Fx::new();
    let (pubk, key, fp) = ssh_key(fx.d.path(), "release");
    let (other, _, other_fp) = ssh_key(fx.d.path(), "other");
    let sig = ssh_sign(&key, &fx.img);
    // ssh-keygen itself accepts it (the same file we check in-process).
    let signers = fx.p("allowed_signers");
    let line = std::fs::read_to_string(&pubk).unwrap();
    std::fs::write(&signers, format!("release@example.org {line}")).unwrap();
    common::sh(&format!(
        "ssh-keygen -Y verify -f {} -I release@example.org -n file -s {} < {}",
        signers.display(),
        sig.display(),
        fx.img.display()
    ));
    let k = pubk.display().to_string();
    let r = fx.written(&fx.img, &["--trusted-key", &k, "--require-signature"]);
    assert_eq!(r["signature"]["key_id"], format!("ssh:{fp}"), "{r}");
    // The public key line itself as --trusted-key.
    fx.written(
        &fx.img,
        &["--trusted-key", line.trim(), "--require-signature"],
    );
    fx.refused(
        &fx.img,
        &["--trusted-key", &other.display().to_string()],
        6,
        &[&format!(
            "is signed by ssh:{fp}, which is not a trusted key (trusted: ssh:{other_fp})"
        )],
    );
    let good = std::fs::read(&sig).unwrap();
    truncate_half(&sig);
    fx.refused(
        &fx.img,
        &["--trusted-key", &k],
        6,
        &["BAD signature for", "not a readable SSH signature"],
    );
    std::fs::write(&sig, &good).unwrap();
    tamper(&fx.img, 30 << 20);
    fx.refused(
        &fx.img,
        &["--trusted-key", &k, "--require-signature"],
        6,
        &["BAD signature for", "SSH signature: "],
    );
    // A signature made for another namespace is not an image signature.
    std::fs::remove_file(&sig).unwrap();
    tamper(&fx.img, 30 << 20);
    common::run(
        Command::new("ssh-keygen")
            .args(["-Y", "sign", "-n", "git", "-f"])
            .arg(&key)
            .arg(&fx.img),
    );
    fx.refused(
        &fx.img,
        &["--trusted-key", &k],
        6,
        &["namespace is \"git\", not \"file\""],
    );
}

fn manifest(fx: &Fx, blake3: &str, extra: &str) -> PathBuf {
    let m = fx.p("nixos.manifest.toml");
    std::fs::write(
        &m,
        format!("format = \"sbcflash-manifest-1\"\nimage = \"nixos.img.zst\"\nblake3 = \"{blake3}\"\n{extra}"),
    )
    .unwrap();
    m
}

#[test]
fn signed_manifest_local_and_streamed() {
    if !common::require(false, TOOLS) {
        return;
    }
    let fx = Fx::new();
    let (pubk, key, fp) = ssh_key(fx.d.path(), "release");
    let (mpub, mkey, mid) = minisign_key(fx.d.path(), "mini");
    let raw = std::fs::read(&fx.img).unwrap();
    let b3 = blake3::hash(&raw).to_hex().to_string();
    let zst = fx.p("nixos.img.zst");
    common::run(
        Command::new("zstd")
            .args(["-q", "-f"])
            .arg(&fx.img)
            .arg("-o")
            .arg(&zst),
    );
    let k = pubk.display().to_string();
    let m = manifest(&fx, &b3, "boards = [\"rpi4\", \"cm4\"]\n");
    let msig = ssh_sign(&key, &m);
    let ms = m.display().to_string();
    let args = [
        "--trusted-key",
        &k,
        "--manifest",
        &ms,
        "--require-signature",
    ];
    let r = fx.written(&zst, &args);
    assert_eq!(r["signature"]["key_id"], format!("ssh:{fp}"), "{r}");
    assert_eq!(r["report"]["digest_checked"], true, "{r}");
    // The manifest says which boards: another board is refused.
    let mut b = args.to_vec();
    b.extend(["--board", "opi5"]);
    fx.refused(
        &zst,
        &b,
        3,
        &["the image is for the boards rpi4, cm4, not opi5"],
    );
    // Streamed over HTTPS: the signed manifest's digest is checked while writing.
    let srv = TestServer::start(fx.d.path());
    let body = Arc::new(std::fs::read(&zst).unwrap());
    srv.add("/nixos.img.zst", body, Behavior::Normal);
    // Uncompressed, so the changed byte decodes fine and only the digest can catch it.
    srv.add("/evil.img", Arc::new(raw.clone()), Behavior::WrongBytes);
    let url = srv.url("/nixos.img.zst");
    let ca = srv.ca_file.display().to_string();
    let mut s = args.to_vec();
    s.extend(["--ca-file", &ca]);
    fx.written(Path::new(&url), &s);
    // Bytes changed on the way: the digest the signed manifest gives does not match; the
    // partition table (written last) never reaches the target.
    fx.reset_target();
    let before = std::fs::read(&fx.target).unwrap()[..1 << 20].to_vec();
    let o = fx.write(Path::new(&srv.url("/evil.img")), &s);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let err = stderr(&o);
    assert!(
        err.contains("blake3 mismatch")
            && err.contains(&format!("the manifest {ms} signed by ssh:{fp}")),
        "{err}"
    );
    assert_eq!(std::fs::read(&fx.target).unwrap()[..1 << 20], before[..]);
    eprintln!("REFUSED (exit 6): {}", err.trim());
    fx.reset_target();
    // A streamed image with only --require-signature and no manifest is refused up front.
    fx.refused(
        Path::new(&url),
        &["--trusted-key", &k, "--require-signature", "--ca-file", &ca],
        4,
        &["a streamed image can be trusted only through a signed manifest"],
    );
    // Tampered manifest (a digest edited after signing).
    let text0 = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, text0.replace(&b3, &"0".repeat(64))).unwrap();
    fx.refused(
        &zst,
        &args,
        6,
        &["BAD signature for", "nixos.manifest.toml"],
    );
    // A tampered image under a good manifest: found while writing, head not written.
    std::fs::write(&m, &text0).unwrap();
    let other = blake3::hash(b"another image").to_hex().to_string();
    manifest(&fx, &other, "");
    std::fs::remove_file(&msig).unwrap();
    ssh_sign(&key, &m);
    let o = fx.write(&zst, &args);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(
        stderr(&o).contains("its partition table was not written"),
        "{}",
        text(&o)
    );
    assert_eq!(std::fs::read(&fx.target).unwrap()[..1 << 20], before[..]);
    eprintln!("REFUSED (exit 6): {}", stderr(&o).trim());
    fx.reset_target();
    // Unsigned manifest with --require-signature.
    std::fs::remove_file(&msig).unwrap();
    fx.refused(
        &zst,
        &args,
        4,
        &["the manifest", "has no signature beside it"],
    );
    // Signed by minisign instead, with a truncated signature; then a key nobody trusts.
    manifest(&fx, &b3, "");
    let msig = minisign_sign(&mkey, &m);
    let mp = mpub.display().to_string();
    let margs = [
        "--trusted-key",
        &mp,
        "--manifest",
        &ms,
        "--require-signature",
    ];
    let r = fx.written(&zst, &margs);
    assert_eq!(r["signature"]["key_id"], format!("minisign:{mid}"), "{r}");
    fx.refused(
        &zst,
        &["--trusted-key", &k, "--manifest", &ms],
        6,
        &[&format!(
            "is signed by minisign:{mid}, which is not a trusted key"
        )],
    );
    truncate_half(&msig);
    fx.refused(&zst, &margs, 6, &["not a readable minisign signature"]);
}

#[test]
fn gpg_signed_bmap() {
    if !common::require(false, TOOLS) {
        return;
    }
    let fx = Fx::new();
    let bmap = fx.p("nixos.img.bmap");
    common::run(
        Command::new("bmaptool")
            .args(["create", "-o"])
            .arg(&bmap)
            .arg(&fx.img),
    );
    let signer = Gpg::new(fx.d.path(), "signer");
    let stranger = Gpg::new(fx.d.path(), "stranger");
    let keyring = fx.p("signer.asc");
    let fpr = signer.export(&keyring);
    let other = fx.p("stranger.asc");
    let other_fpr = stranger.export(&other);
    let asc = signer.detach_sign_armored(&bmap);
    // gpg itself agrees.
    signer.run(&[
        "--verify",
        &asc.display().to_string(),
        &bmap.display().to_string(),
    ]);
    let k = keyring.display().to_string();
    let r = fx.written(&fx.img, &["--trusted-key", &k, "--require-signature"]);
    assert_eq!(r["signature"]["key_id"], format!("openpgp:{fpr}"), "{r}");
    assert_eq!(r["signature"]["scheme"], "openpgp");
    // Without an OpenPGP key the signature is only noted; --require-signature refuses.
    fx.refused(
        &fx.img,
        &["--require-signature"],
        4,
        &["a signature is required", "nixos.img.bmap.asc"],
    );
    fx.refused(
        &fx.img,
        &["--trusted-key", &other.display().to_string()],
        6,
        &[&format!(
            "is signed by openpgp:{fpr}, which is not a trusted key (trusted: openpgp:{other_fpr})"
        )],
    );
    // Tampered bmap: one range's checksum changed after signing, and the bmap's own
    // checksum recomputed as an attacker would (else that alone catches it, exit 3).
    let t = std::fs::read_to_string(&bmap).unwrap();
    let at = t.find("chksum=\"").unwrap() + 8;
    let mut changed = t.clone();
    let c = if &t[at..at + 1] == "0" { "1" } else { "0" };
    changed.replace_range(at..at + 1, c);
    let tag = "<BmapFileChecksum>";
    let f = changed.find(tag).unwrap() + tag.len();
    let f = f + changed[f..].len() - changed[f..].trim_start().len();
    changed.replace_range(f..f + 64, &"0".repeat(64));
    let sum = {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(changed.as_bytes()))
    };
    changed.replace_range(f..f + 64, &sum);
    std::fs::write(&bmap, &changed).unwrap();
    fx.refused(
        &fx.img,
        &["--trusted-key", &k],
        6,
        &["BAD signature for", "OpenPGP signature does not verify"],
    );
    std::fs::write(&bmap, &t).unwrap();
    // A binary signature (.sig) beside it, truncated.
    std::fs::remove_file(&asc).unwrap();
    let sig = fx.p("nixos.img.bmap.sig");
    signer.run(&[
        "--detach-sign",
        "-o",
        &sig.display().to_string(),
        &bmap.display().to_string(),
    ]);
    fx.written(&fx.img, &["--trusted-key", &k, "--require-signature"]);
    truncate_half(&sig);
    fx.refused(&fx.img, &["--trusted-key", &k], 6, &["BAD signature for"]);
    // An OpenPGP signature on the image file itself, checked as it streams past.
    std::fs::remove_file(&sig).unwrap();
    let isig = fx.p("nixos.img.sig");
    signer.run(&[
        "--detach-sign",
        "-o",
        &isig.display().to_string(),
        &fx.img.display().to_string(),
    ]);
    let r = fx.written(
        &fx.img,
        &["--trusted-key", &k, "--require-signature", "--no-bmap"],
    );
    assert_eq!(r["signature"]["file"], fx.img.display().to_string(), "{r}");
    assert_eq!(r["signature"]["key_id"], format!("openpgp:{fpr}"), "{r}");
    tamper(&fx.img, 30 << 20);
    fx.refused(
        &fx.img,
        &["--trusted-key", &k, "--no-bmap"],
        6,
        &["BAD signature for", "OpenPGP signature does not verify"],
    );
}

#[test]
fn config_and_board_descriptor_trust() {
    if !common::require(false, TOOLS) {
        return;
    }
    let fx = Fx::new();
    let (pubk, seck, id) = minisign_key(fx.d.path(), "release");
    // The config: the key as a file relative to it, and require-signature.
    let cfg_dir = fx.p("xdg").join("sbcflash");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    std::fs::copy(&pubk, cfg_dir.join("release.pub")).unwrap();
    std::fs::write(
        cfg_dir.join("config.toml"),
        "[image]\nrequire-signature = true\n\n[[image.trust]]\nname = \"release\"\nkey-file = \"release.pub\"\n",
    )
    .unwrap();
    fx.refused(
        &fx.img,
        &[],
        4,
        &["a signature is required (--require-signature / require_signature)"],
    );
    minisign_sign(&seck, &fx.img);
    let r = fx.written(&fx.img, &[]);
    assert_eq!(r["signature"]["key_id"], format!("minisign:{id}"));
    // A board descriptor's image source names the key; the config only requires.
    std::fs::write(
        cfg_dir.join("config.toml"),
        "[image]\nrequire-signature = true\n",
    )
    .unwrap();
    fx.refused(&fx.img, &[], 4, &["a signature is required"]);
    let boards = fx.p("boards");
    std::fs::create_dir_all(&boards).unwrap();
    let key_line = std::fs::read_to_string(&pubk).unwrap();
    let key_line = key_line.lines().nth(1).unwrap();
    std::fs::write(
        boards.join("signed-board.toml"),
        format!(
            "{}\n[[image]]\nname = \"release\"\nurl = \"https://example.org/nixos.img.zst\"\n[[image.trust]]\nkey = \"{key_line}\"\n",
            std::fs::read_to_string("boards/qemu-aarch64.toml")
                .unwrap()
                .replace("id = \"qemu-aarch64\"", "id = \"signed-board\"")
                .replace("aliases = [\"qemu-arm64\", \"virt-aarch64\"]", "")
        ),
    )
    .unwrap();
    let b = boards.display().to_string();
    let r = fx.written(&fx.img, &["--boards-dir", &b, "--board", "signed-board"]);
    assert_eq!(r["signature"]["key_id"], format!("minisign:{id}"));
}

/// The station: a signed manifest checked at start, one card written through udev, and the
/// ledger row carrying the chain (signing key, image blake3, blake3 read back from the unit).
/// Unsigned with `require_signature = true`: refused at start, the card untouched.
#[test]
fn station_ledger_carries_the_digest_chain() {
    let mut tools = TOOLS.to_vec();
    tools.extend(["losetup", "udevadm"]);
    if !common::require(true, &tools) {
        return;
    }
    let fx = Fx::new();
    let dir = fx.d.path();
    let (pubk, key, fp) = ssh_key(dir, "release");
    let raw = std::fs::read(&fx.img).unwrap();
    let b3 = blake3::hash(&raw).to_hex().to_string();
    let m = manifest(&fx, &b3, "boards = [\"opi5\"]\n");
    ssh_sign(&key, &m);
    let card = dir.join("s1.card");
    std::fs::write(&card, vec![0x3cu8; 1 << 20]).unwrap();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&card)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    let config = |extra_image: &str| {
        let p = dir.join("station.toml");
        std::fs::write(
            &p,
            format!(
                "board = \"opi5\"\nledger = \"ledger.sqlite\"\nrequire_signature = true\n\n[image]\npath = \"{}\"\n{extra_image}\n[identity]\nserial = \"U-{{seq:03}}\"\n\n[[slot]]\nname = \"s1\"\nmatch = {{ \"attr:loop/backing_file\" = \"{}\" }}\n",
                fx.img.display(),
                card.display()
            ),
        )
        .unwrap();
        p
    };
    let station = |cfg: &Path| {
        common::sbcflash()
            .env("SBCFLASH_CACHE_DIR", dir.join("cache"))
            .env("XDG_CONFIG_HOME", dir.join("xdg"))
            .env_remove("SBCFLASH_CONFIG")
            .args([
                "station",
                "--json",
                "--flash-present",
                "--exit-after",
                "1",
                "--config",
            ])
            .arg(cfg)
            .output()
            .unwrap()
    };
    let _udevd = common::Udevd::start();
    let lo = common::LoopDev::attach(&card, &[]);
    common::run(Command::new("udevadm").args(["settle", "--timeout=30"]));
    let card_before = blake3::hash(&std::fs::read(&card).unwrap());

    // Unsigned (no manifest, no signature beside the image): refused before any unit.
    let cfg = config("");
    let o = station(&cfg);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(
        stderr(&o).contains("a signature is required"),
        "{}",
        text(&o)
    );
    eprintln!("STATION REFUSED (exit 4): {}", stderr(&o).trim());
    // A tampered manifest: refused before any unit.
    let mtext = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, mtext.replace("opi5", "rpi4")).unwrap();
    let manifest_lines = format!(
        "manifest = \"{}\"\n[[image.trust]]\nkey_file = \"{}\"\n",
        m.display(),
        pubk.display()
    );
    let cfg = config(&manifest_lines);
    let o = station(&cfg);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    assert!(stderr(&o).contains("BAD signature for"), "{}", text(&o));
    eprintln!("STATION REFUSED (exit 6): {}", stderr(&o).trim());
    assert_eq!(blake3::hash(&std::fs::read(&card).unwrap()), card_before);
    assert!(
        !dir.join("ledger.sqlite").exists() || {
            let o = common::run(
                common::sbcflash()
                    .args(["station", "report", "--format", "json", "--config"])
                    .arg(&cfg),
            );
            String::from_utf8_lossy(&o.stdout).trim() == "[]"
        }
    );

    // Signed: one unit, and its row is the chain.
    std::fs::write(&m, &mtext).unwrap();
    let o = station(&cfg);
    assert!(o.status.success(), "{}", text(&o));
    common::json::assert_documented(&String::from_utf8_lossy(&o.stdout));
    let o = common::run(
        common::sbcflash()
            .args(["station", "report", "--format", "json", "--config"])
            .arg(&cfg),
    );
    let rows: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let r = &rows[0];
    assert_eq!(r["result"], "pass", "{rows:#}");
    assert_eq!(r["signature_key_id"], format!("ssh:{fp}"), "{r:#}");
    assert_eq!(r["image_blake3"], b3, "{r:#}");
    assert_eq!(r["readback_blake3"], b3, "{r:#}");
    eprintln!("LEDGER ROW: {r}");
    drop(lo);
}
