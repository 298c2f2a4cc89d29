//! Getting images, against real peers: an HTTPS server on 127.0.0.1 with a CA made for the
//! test, the real cache on disk, concurrent `sbcflash` processes, and a real `nix build`.

mod acquire_server;
mod common;

use common::text;

use acquire_server::{pseudo_random, Behavior, TestServer};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

fn b3(data: &[u8]) -> String {
    blake3::hash(data).to_hex().to_string()
}

fn sha256(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// `sbcflash ARGS --cache-dir CACHE`, with the test CA trusted for `fetch`.
fn run(srv: &TestServer, cache: &Path, args: &[&str]) -> Output {
    let mut c = common::sbcflash();
    c.args(args).arg("--cache-dir").arg(cache);
    if args[0] != "cache" {
        c.arg("--ca-file").arg(&srv.ca_file);
    }
    c.env_remove("SBCFLASH_CACHE_DIR")
        .output()
        .expect("run sbcflash")
}

/// A test's directory, an HTTPS server on 127.0.0.1 (its CA in that directory), and the path
/// of the cache there.
fn server() -> (tempfile::TempDir, TestServer, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    let cache = d.path().join("cache");
    (d, srv, cache)
}

/// Serves `len` pseudo-random bytes (from `seed`) at `path` as `how` says; returns them.
fn serve(srv: &TestServer, path: &str, len: usize, seed: u64, how: Behavior) -> Arc<Vec<u8>> {
    let data = Arc::new(pseudo_random(len, seed));
    srv.add(path, data.clone(), how);
    data
}

/// `fetch URL --blake3 <digest of data> EXTRA` through [`run`].
fn fetch_pinned(srv: &TestServer, cache: &Path, url: &str, data: &[u8], extra: &[&str]) -> Output {
    let digest = b3(data);
    let mut args = vec!["fetch", url, "--blake3", &digest];
    args.extend_from_slice(extra);
    run(srv, cache, &args)
}

/// Ends `cmd` with the test CA trusted and `cache` as the cache directory; runs it.
fn over(srv: &TestServer, cache: &Path, cmd: &mut Command) -> Output {
    cmd.arg("--ca-file")
        .arg(&srv.ca_file)
        .arg("--cache-dir")
        .arg(cache)
        .output()
        .unwrap()
}

/// The cached path printed by `fetch` (`<blake3>  <path>`).
fn fetched(o: &Output) -> (String, PathBuf) {
    assert!(o.status.success(), "fetch failed: {}", text(o));
    let s = String::from_utf8_lossy(&o.stdout);
    let line = s.lines().last().expect("a line");
    let (h, p) = line.split_once("  ").expect("hash and path");
    (h.to_string(), PathBuf::from(p))
}

fn blobs(cache: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(cache.join("blobs"))
        .map(|r| r.flatten().map(|d| d.path()).collect())
        .unwrap_or_default()
}

fn tmp_files(cache: &Path) -> Vec<String> {
    std::fs::read_dir(cache.join("tmp"))
        .map(|r| {
            r.flatten()
                .map(|d| d.file_name().to_string_lossy().to_string())
                .filter(|n| !n.ends_with(".lock"))
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn fetch_pinned_over_https_with_private_ca() {
    let (d, srv, cache) = server();
    let data = serve(&srv, "/img.zst", 3 << 20, 1, Behavior::Normal);
    let url = srv.url("/img.zst");
    let o = fetch_pinned(&srv, &cache, &url, &data, &[]);
    let (h, p) = fetched(&o);
    assert_eq!(h, b3(&data));
    assert_eq!(std::fs::read(&p).unwrap(), *data);
    assert!(p.starts_with(&cache));
    // Second fetch: served from the cache, no new request.
    let before = srv.requests("/img.zst").len();
    let o = fetch_pinned(&srv, &cache, &url, &data, &[]);
    assert_eq!(fetched(&o).1, p);
    assert_eq!(srv.requests("/img.zst").len(), before);

    // Without the CA the server is not trusted: a clear TLS error, exit 5, nothing cached.
    let cache2 = d.path().join("cache2");
    let o = common::sbcflash()
        .args([
            "fetch",
            &url,
            "--blake3",
            &b3(&data),
            "--retries",
            "0",
            "--cache-dir",
        ])
        .arg(&cache2)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("TLS") && err.contains("--ca-file"), "{err}");
    assert!(blobs(&cache2).is_empty());
}

#[test]
fn fetch_sha256_pin_records_blake3_and_follows_redirect() {
    let (_d, srv, cache) = server();
    let data = serve(&srv, "/real.img", 1 << 20, 2, Behavior::Normal);
    srv.add(
        "/latest",
        data.clone(),
        Behavior::Redirect("/real.img".into()),
    );
    let o = run(
        &srv,
        &cache,
        &[
            "fetch",
            &srv.url("/latest"),
            "--sha256",
            &sha256(&data),
            "--json",
        ],
    );
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    common::json::assert_documented(&out);
    let fin = out
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finish" && v["phase"] == "fetch")
        .unwrap_or_else(|| panic!("no fetch finish event in {out}"));
    assert_eq!(fin["summary"]["blake3"], b3(&data));
    assert_eq!(fin["summary"]["sha256"], sha256(&data));
    assert_eq!(fin["summary"]["pinned"], true);
    assert_eq!(srv.requests("/real.img").len(), 1);
}

#[test]
fn fetch_resumes_after_dropped_connection() {
    let (_d, srv, cache) = server();
    let data = Arc::new(pseudo_random(6 << 20, 3));
    // The first two connections die after 1.5 MiB each.
    srv.add(
        "/img",
        data.clone(),
        Behavior::DropAfter {
            n: 3 << 19,
            times: 2,
        },
    );
    let o = fetch_pinned(&srv, &cache, &srv.url("/img"), &data, &[]);
    let (h, p) = fetched(&o);
    assert_eq!(h, b3(&data));
    assert_eq!(std::fs::read(&p).unwrap(), *data);
    let reqs = srv.requests("/img");
    assert_eq!(reqs.len(), 3, "{reqs:?}");
    assert_eq!(reqs[0].range, None);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=1572864-"));
    assert_eq!(reqs[2].range.as_deref(), Some("bytes=3145728-"));
    assert!(reqs[1].if_range.is_some(), "resume must be conditional");
    assert!(tmp_files(&cache).is_empty(), "{:?}", tmp_files(&cache));
}

#[test]
fn fetch_resumes_after_restart_of_the_tool() {
    let (_d, srv, cache) = server();
    let data = serve(
        &srv,
        "/img",
        4 << 20,
        4,
        Behavior::DropAfter {
            n: 1 << 20,
            times: 1,
        },
    );
    let url = srv.url("/img");
    // First run gives up at once (no retries): the partial stays in the cache's tmp dir.
    let o = fetch_pinned(&srv, &cache, &url, &data, &["--retries", "0"]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(blobs(&cache).is_empty());
    assert!(tmp_files(&cache).iter().any(|n| n.ends_with(".part")));
    // Second run resumes from byte 1 MiB.
    let o = fetch_pinned(&srv, &cache, &url, &data, &[]);
    let (_, p) = fetched(&o);
    assert_eq!(std::fs::read(&p).unwrap(), *data);
    let reqs = srv.requests("/img");
    assert_eq!(reqs.len(), 2);
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=1048576-"));
}

#[test]
fn fetch_restarts_when_server_ignores_range() {
    let (_d, srv, cache) = server();
    let data = serve(
        &srv,
        "/img",
        2 << 20,
        5,
        Behavior::DropAfter {
            n: 1 << 20,
            times: 1,
        },
    );
    let url = srv.url("/img");
    let o = fetch_pinned(&srv, &cache, &url, &data, &["--retries", "0"]);
    assert!(!o.status.success());
    // Now the server no longer honours Range: the partial is discarded and the file restarts.
    srv.add("/img", data.clone(), Behavior::NoRange);
    let o = fetch_pinned(&srv, &cache, &url, &data, &[]);
    let (_, p) = fetched(&o);
    assert_eq!(std::fs::read(&p).unwrap(), *data);
}

#[test]
fn fetch_wrong_bytes_refused_and_nothing_cached() {
    let (_d, srv, cache) = server();
    let data = serve(&srv, "/img", 2 << 20, 6, Behavior::WrongBytes);
    let o = run(
        &srv,
        &cache,
        &["fetch", &srv.url("/img"), "--sha256", &sha256(&data)],
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("sha256 mismatch") && err.contains(&sha256(&data)),
        "{err}"
    );
    assert!(blobs(&cache).is_empty());
    assert!(tmp_files(&cache).is_empty(), "{:?}", tmp_files(&cache));
    let o = run(&srv, &cache, &["cache", "list", "--json"]);
    assert!(o.status.success());
    assert!(o.stdout.is_empty(), "{}", text(&o));
}

#[test]
fn fetch_stalled_server_times_out() {
    let (_d, srv, cache) = server();
    let data = serve(&srv, "/img", 1 << 20, 7, Behavior::Stall);
    let o = fetch_pinned(
        &srv,
        &cache,
        &srv.url("/img"),
        &data,
        &["--timeout", "0.5", "--retries", "1"],
    );
    assert_eq!(o.status.code(), Some(7), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("timed out"), "{err}");
    assert_eq!(srv.requests("/img").len(), 2, "one retry");
    assert!(blobs(&cache).is_empty());
}

#[test]
fn fetch_http_errors_are_clear() {
    let (_d, srv, cache) = server();
    srv.add("/gone", Arc::new(Vec::new()), Behavior::Status(404));
    srv.add("/broken", Arc::new(Vec::new()), Behavior::Status(500));
    let o = run(&srv, &cache, &["fetch", &srv.url("/gone")]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("404") && err.contains("/gone"), "{err}");
    assert_eq!(srv.requests("/gone").len(), 1, "4xx is not retried");

    let o = run(
        &srv,
        &cache,
        &["fetch", &srv.url("/broken"), "--retries", "2"],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("500"));
    assert_eq!(srv.requests("/broken").len(), 3, "5xx is retried");

    // DNS failure: a name that cannot resolve.
    let o = run(
        &srv,
        &cache,
        &[
            "fetch",
            "https://does-not-exist.invalid/x.img",
            "--retries",
            "0",
        ],
    );
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("resolve"),
        "{}",
        text(&o)
    );
}

#[test]
fn fetch_policy_plain_http_and_unpinned() {
    let (_d, srv, cache) = server();
    let data = serve(&srv, "/img", 100_000, 8, Behavior::Normal);
    // Plain HTTP without a pin: refused before connecting.
    let o = run(&srv, &cache, &["fetch", "http://127.0.0.1:9/x.img"]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("plain HTTP"));
    // --require-pinned refuses an unpinned source.
    let o = run(
        &srv,
        &cache,
        &["fetch", &srv.url("/img"), "--require-pinned"],
    );
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(srv.requests("/img").is_empty());
    // Unpinned: downloaded, its blake3 shown, and the user told it was not pinned.
    let o = run(&srv, &cache, &["fetch", &srv.url("/img")]);
    let (h, _) = fetched(&o);
    assert_eq!(h, b3(&data));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("not pinned") && err.contains(&b3(&data)),
        "{err}"
    );
}

#[test]
fn concurrent_fetches_of_the_same_file() {
    let (_d, srv, cache) = server();
    let data = serve(&srv, "/img", 8 << 20, 9, Behavior::Normal);
    let url = srv.url("/img");
    let h = b3(&data);
    let spawn = || {
        common::sbcflash()
            .args(["fetch", &url, "--blake3", &h, "--cache-dir"])
            .arg(&cache)
            .arg("--ca-file")
            .arg(&srv.ca_file)
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap()
    };
    let kids: Vec<_> = (0..3).map(|_| spawn()).collect();
    let outs: Vec<Output> = kids
        .into_iter()
        .map(|k| k.wait_with_output().unwrap())
        .collect();
    let paths: Vec<PathBuf> = outs.iter().map(|o| fetched(o).1).collect();
    assert!(paths.windows(2).all(|w| w[0] == w[1]));
    assert_eq!(std::fs::read(&paths[0]).unwrap(), *data);
    assert_eq!(blobs(&cache).len(), 1);
    assert!(tmp_files(&cache).is_empty(), "{:?}", tmp_files(&cache));
    let o = run(&srv, &cache, &["cache", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
}

#[test]
fn cache_verify_removes_corrupted_entries_and_planted_symlinks() {
    let (d, srv, cache) = server();
    let a = Arc::new(pseudo_random(1 << 20, 10));
    let b = Arc::new(pseudo_random(1 << 20, 11));
    srv.add("/a", a.clone(), Behavior::Normal);
    srv.add("/b", b.clone(), Behavior::Normal);
    let (_, pa) = fetched(&fetch_pinned(&srv, &cache, &srv.url("/a"), &a, &[]));
    let (_, pb) = fetched(&fetch_pinned(&srv, &cache, &srv.url("/b"), &b, &[]));
    // Flip one byte of entry a.
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&pa).unwrap();
        f.write_at(&[a[1000] ^ 1], 1000).unwrap();
    }
    // Plant a symlink named like an entry, pointing at a file outside the cache.
    let victim = d.path().join("victim");
    std::fs::write(&victim, b"not yours").unwrap();
    let planted = cache.join("blobs").join(b3(b"not yours"));
    std::os::unix::fs::symlink(&victim, &planted).unwrap();
    // A lookup does not follow it: fetching that digest downloads instead of using the link.
    let o = run(&srv, &cache, &["cache", "verify"]);
    assert_eq!(o.status.code(), Some(6), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("corrupted") && err.contains("symlink"),
        "{}",
        text(&o)
    );
    assert!(!pa.exists());
    assert!(std::fs::symlink_metadata(&planted).is_err());
    assert_eq!(std::fs::read(&victim).unwrap(), b"not yours");
    assert_eq!(std::fs::read(&pb).unwrap(), *b);
    let o = run(&srv, &cache, &["cache", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(&srv, &cache, &["cache", "list"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&b3(&b)) && !out.contains(&b3(&a)), "{out}");
}

#[test]
fn cache_prune_by_size_keeps_recent() {
    let (_d, srv, cache) = server();
    let mut hs = Vec::new();
    for i in 0..3u64 {
        let data = Arc::new(pseudo_random(1 << 20, 20 + i));
        let p = format!("/i{i}");
        srv.add(&p, data.clone(), Behavior::Normal);
        fetched(&fetch_pinned(&srv, &cache, &srv.url(&p), &data, &[]));
        hs.push(b3(&data));
    }
    let o = run(&srv, &cache, &["cache", "prune", "--max-size", "2M"]);
    assert!(o.status.success(), "{}", text(&o));
    let list = String::from_utf8_lossy(&run(&srv, &cache, &["cache", "list"]).stdout).to_string();
    assert!(
        !list.contains(&hs[0]) && list.contains(&hs[1]) && list.contains(&hs[2]),
        "{list}"
    );
    let o = run(&srv, &cache, &["cache", "prune", "--older-than", "0s"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(blobs(&cache).is_empty());
}

/// A Nix environment confined to `dir`: its own store, state, logs, config and caches, so the
/// test needs neither a daemon nor /nix, and never touches the network.
fn nix_env(cmd: &mut std::process::Command, dir: &Path) {
    let conf = dir.join("nix-etc");
    std::fs::create_dir_all(&conf).unwrap();
    cmd.env("NIX_STORE_DIR", dir.join("store"))
        .env("NIX_STATE_DIR", dir.join("state"))
        .env("NIX_LOG_DIR", dir.join("log"))
        .env("NIX_CONF_DIR", &conf)
        .env("HOME", dir)
        .env("XDG_CACHE_HOME", dir.join("xdg-cache"))
        .env_remove("NIX_REMOTE")
        .env_remove("SBCFLASH_CACHE_DIR");
}

/// Nix options for a single-user build as root with nothing from the network.
const NIX_OFFLINE: &[&str] = &[
    "--option",
    "sandbox",
    "false",
    "--option",
    "substituters",
    "",
    "--option",
    "build-users-group",
    "",
];

/// A flake with no inputs whose sd image is built by /bin/sh with the host's coreutils,
/// mkfs.ext4 and zstd: a bare ext4 file system (no partition table).
fn write_test_flake(dir: &Path) {
    let script = r#"
set -eu
/usr/bin/mkdir -p "$out/sd-image" tree
/usr/bin/printf 'sbcflash nix test image\n' > tree/README
/usr/bin/head -c 3000000 /dev/urandom > tree/blob
/usr/sbin/mkfs.ext4 -q -d tree img 12M
/usr/bin/zstd -q img -o "$out/sd-image/nixos-sd-image-test.img.zst"
echo "built the test image"
"#;
    write_sh_flake(dir, script);
}

/// A flake with no inputs in `dir` whose `testhost` sd image is built by /bin/sh running
/// `script` (as `build.sh`).
fn write_sh_flake(dir: &Path, script: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("build.sh"), script).unwrap();
    let flake = r#"{
  description = "sbcflash test flake: no inputs, no downloads";
  outputs = { self }: {
    nixosConfigurations.testhost.config.system.build.sdImage = derivation {
      name = "nixos-sd-image-test";
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ ./build.sh ];
    };
  };
}
"#;
    std::fs::write(dir.join("flake.nix"), flake).unwrap();
}

#[test]
fn nix_build_real_flake_then_write_to_loop_device() {
    if !common::require(true, &["nix", "zstd", "losetup", "mkfs.ext4"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let flake = d.path().join("flake");
    write_test_flake(&flake);
    let cache = d.path().join("cache");
    let flake_ref = format!("path:{}#testhost", flake.display());
    let mut c = common::sbcflash();
    c.args(["-v", "build", "--flake", &flake_ref])
        .args(NIX_OFFLINE)
        .arg("--cache-dir")
        .arg(&cache);
    nix_env(&mut c, d.path());
    let o = c.output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    // Nix's log is streamed, indented.
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("    ") && err.contains("built the test image"),
        "{err}"
    );
    let (h, cached) = fetched(&o);
    // The cached file is exactly the build output.
    let store = d.path().join("store");
    let out = std::fs::read_dir(&store)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| p.join("sd-image/nixos-sd-image-test.img.zst").exists())
        .expect("out path in the test store");
    let zst = out.join("sd-image/nixos-sd-image-test.img.zst");
    let built = std::fs::read(&zst).unwrap();
    assert_eq!(std::fs::read(&cached).unwrap(), built);
    assert_eq!(h, b3(&built));

    // `build TARGET` writes what it built, with write's checks. The expected bytes:
    let raw = d.path().join("expected.img");
    common::run(
        std::process::Command::new("zstd")
            .args(["-q", "-d", "-f"])
            .arg(&zst)
            .arg("-o")
            .arg(&raw),
    );
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 32 << 20);
    let build_to = |extra: &[&str]| {
        let mut c = common::sbcflash();
        c.args(["build", "--flake", &flake_ref])
            .args(NIX_OFFLINE)
            .arg("--cache-dir")
            .arg(&cache)
            .args(extra)
            .arg(lo.path())
            .stdin(std::process::Stdio::null());
        nix_env(&mut c, d.path());
        c.output().unwrap()
    };
    let untouched = || std::fs::read(&lo.backing).unwrap().iter().all(|b| *b == 0);
    // No --yes and nobody to confirm: refused before anything is built or written.
    let o = build_to(&[]);
    assert_eq!(o.status.code(), Some(4), "{}", text(&o));
    assert!(text(&o).contains("--yes"), "{}", text(&o));
    assert!(untouched());
    // The board check runs on the built image: this one has no partition table.
    let board = [
        "--board",
        "qemu-aarch64",
        "--attr-template",
        "nixosConfigurations.<host>.config.system.build.sdImage",
    ];
    let o = build_to(&[&board[..], &["--strict", "--yes"]].concat());
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(text(&o).contains("no MBR or GPT"), "{}", text(&o));
    assert!(untouched(), "--strict refusal wrote to the target");
    // Without --strict: a warning, then written and read back.
    let o = build_to(&[&board[..], &["--yes"]].concat());
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("warning: no MBR or GPT"), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("read back") && !out.contains("NOT read back"),
        "{out}"
    );
    common::assert_same_prefix(&raw, lo.path(), 12 << 20);
}

#[test]
fn nix_build_errors_are_clear() {
    if !common::require(false, &["nix"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let flake = d.path().join("flake");
    write_test_flake(&flake);
    let cache = d.path().join("cache");
    // Attribute that does not exist: exit 3, Nix's own words in the message.
    let mut c = common::sbcflash();
    c.args([
        "build",
        "--flake",
        &format!("path:{}#nosuchhost", flake.display()),
    ])
    .args(NIX_OFFLINE)
    .arg("--cache-dir")
    .arg(&cache);
    nix_env(&mut c, d.path());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("nosuchhost"),
        "{}",
        text(&o)
    );
    // A failing builder: exit 1 with the last log lines.
    std::fs::write(
        flake.join("build.sh"),
        "echo about to fail; echo failing-on-purpose >&2; exit 3\n",
    )
    .unwrap();
    let mut c = common::sbcflash();
    c.args([
        "build",
        "--flake",
        &format!("path:{}#testhost", flake.display()),
    ])
    .args(NIX_OFFLINE)
    .arg("--cache-dir")
    .arg(&cache);
    nix_env(&mut c, d.path());
    let o = c.output().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("failed") && err.contains("failing-on-purpose"),
        "{err}"
    );
    // No nix at all: exit 8.
    let o = common::sbcflash()
        .args([
            "build",
            "--flake",
            ".#x",
            "--nix",
            "/nonexistent/nix",
            "--cache-dir",
        ])
        .arg(&cache)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(8), "{}", text(&o));
    assert!(String::from_utf8_lossy(&o.stderr).contains("nix-bin"));
    assert!(blobs(&cache).is_empty());
}

/// A NixOS-like image (real partitions and filesystems), compressed with zstd like upstream's.
fn zstd_image(dir: &Path, mib: u64) -> (PathBuf, Arc<Vec<u8>>) {
    let raw = common::make_nixos_like_image(dir, "nixos.img", mib, common::Table::Mbr);
    let zst = dir.join("nixos.img.zst");
    common::run(
        std::process::Command::new("zstd")
            .args(["-q", "-f", "-T0"])
            .arg(&raw)
            .arg("-o")
            .arg(&zst),
    );
    (raw, Arc::new(std::fs::read(&zst).unwrap()))
}

const IMAGE_TOOLS: &[&str] = &[
    "losetup",
    "zstd",
    "sfdisk",
    "mkfs.ext4",
    "mkfs.vfat",
    "mcopy",
];

#[test]
fn stream_https_to_loop_device_with_resume_and_keep() {
    if !common::require(true, IMAGE_TOOLS) {
        return;
    }
    let (d, srv, cache) = server();
    let (raw, zst) = zstd_image(d.path(), 64);
    // The first connection dies after 1 MiB: the stream resumes with a Range request.
    srv.add(
        "/nixos.img.zst",
        zst.clone(),
        Behavior::DropAfter {
            n: 1 << 20,
            times: 1,
        },
    );
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 96 << 20);
    let o = over(
        &srv,
        &cache,
        common::sbcflash()
            .arg("write")
            .arg(srv.url("/nixos.img.zst"))
            .arg(lo.path())
            .args(["--json", "--yes", "--keep", "--source-blake3", &b3(&zst)]),
    );
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same_prefix(&raw, lo.path(), 64 << 20);
    common::json::assert_documented(&String::from_utf8_lossy(&o.stdout));
    // One job (the target) with its phases: the download is not a separate job.
    let events: Vec<serde_json::Value> = String::from_utf8_lossy(&o.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let target = lo.path().canonicalize().unwrap().display().to_string();
    let mut phases = std::collections::BTreeSet::new();
    for e in events.iter().filter(|e| e["phase"].is_string()) {
        assert_eq!(e["job"], target.as_str(), "{e}");
        if e["event"] == "start" {
            phases.insert(e["phase"].as_str().unwrap().to_string());
        }
    }
    for p in ["download", "write", "verify"] {
        assert!(phases.contains(p), "no {p} phase in {phases:?}");
    }
    assert!(
        events
            .iter()
            .any(|e| e["event"] == "finish" && e["phase"] == "source-verify"),
        "{events:?}"
    );
    let reqs = srv.requests("/nixos.img.zst");
    assert_eq!(reqs.len(), 2, "{reqs:?}");
    assert_eq!(reqs[1].range.as_deref(), Some("bytes=1048576-"));
    // --keep: the verified download is in the cache; no temporary copy is left anywhere.
    assert_eq!(
        std::fs::read(cache.join("blobs").join(b3(&zst))).unwrap(),
        *zst
    );
    assert!(tmp_files(&cache).is_empty(), "{:?}", tmp_files(&cache));
}

#[test]
fn stream_wrong_bytes_fails_and_says_target_is_bad() {
    if !common::require(true, IMAGE_TOOLS) {
        return;
    }
    let (d, srv, cache) = server();
    let (raw, zst) = zstd_image(d.path(), 48);
    // Uncompressed too, so the flipped byte decodes fine and only the digest can catch it.
    let raw_bytes = Arc::new(std::fs::read(&raw).unwrap());
    srv.add("/bad.img.zst", zst.clone(), Behavior::WrongBytes);
    srv.add("/bad.img", raw_bytes.clone(), Behavior::WrongBytes);
    for (path, good) in [("/bad.img.zst", &zst), ("/bad.img", &raw_bytes)] {
        let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 << 20);
        let o = over(
            &srv,
            &cache,
            common::sbcflash()
                .arg("write")
                .arg(srv.url(path))
                .arg(lo.path())
                .args(["--yes", "--keep", "--source-sha256", &sha256(good)]),
        );
        assert_eq!(o.status.code(), Some(6), "{path}: {}", text(&o));
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(
            err.contains("sha256 mismatch") && err.contains("bad image"),
            "{path}: {err}"
        );
        // Bytes that decode fine but do not match the pin: the digest alone is the cause, not
        // a "corrupt" image seen by the reader the mismatch stopped.
        if path == "/bad.img" {
            assert!(!err.contains("corrupt"), "{err}");
        }
        // The partition table (first MiB, written last) never reached the target.
        let head = std::fs::read(&lo.backing).unwrap();
        assert!(
            head[..512].iter().all(|b| *b == 0),
            "{path}: MBR was written"
        );
        assert!(
            blobs(&cache).is_empty(),
            "{path}: a bad download was cached"
        );
    }
}

#[test]
fn stream_board_default_source_to_loop_device() {
    if !common::require(true, IMAGE_TOOLS) {
        return;
    }
    let (d, srv, cache) = server();
    let (raw, zst) = zstd_image(d.path(), 48);
    srv.add("/board.img.zst", zst.clone(), Behavior::Normal);
    // A user descriptor overriding the built-in QEMU board with a pinned image source.
    let boards = d.path().join("boards");
    std::fs::create_dir_all(&boards).unwrap();
    let base = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("boards/qemu-aarch64.toml"),
    )
    .unwrap();
    let desc = format!(
        "{base}\n[[image]]\nname = \"test-mirror\"\nurl = \"{}\"\nblake3 = \"{}\"\n",
        srv.url("/board.img.zst"),
        b3(&zst)
    );
    std::fs::write(boards.join("qemu-aarch64.toml"), desc).unwrap();
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 64 << 20);
    let o = over(
        &srv,
        &cache,
        common::sbcflash()
            .args(["write", "--board", "qemu-aarch64", "--boards-dir"])
            .arg(&boards)
            .arg(lo.path())
            .args(["--yes"]),
    );
    assert!(o.status.success(), "{}", text(&o));
    common::assert_same_prefix(&raw, lo.path(), 48 << 20);
    // `fetch --board` uses the same source and pin, with the board directory named by the
    // config file (`boards-dirs`) instead of --boards-dir: the same registry everywhere.
    let xdg = d.path().join("xdg-config");
    std::fs::create_dir_all(xdg.join("sbcflash")).unwrap();
    std::fs::write(
        xdg.join("sbcflash/config.toml"),
        format!(
            "boards-dirs = [{:?}]\ncache-dir = {:?}\n",
            boards.display().to_string(),
            d.path().join("cache2").display().to_string()
        ),
    )
    .unwrap();
    // No --cache-dir either: the config's cache-dir is used.
    let fetch_board = |xdg: &Path| {
        common::sbcflash()
            .args(["fetch", "--board", "qemu-aarch64", "--ca-file"])
            .arg(&srv.ca_file)
            .env("XDG_CONFIG_HOME", xdg)
            .env("XDG_CACHE_HOME", d.path().join("xdg-cache"))
            .env_remove("SBCFLASH_CONFIG")
            .env_remove("SBCFLASH_CACHE_DIR")
            .output()
            .unwrap()
    };
    let (h, path) = fetched(&fetch_board(&xdg));
    assert_eq!(h, b3(&zst));
    assert!(path.starts_with(d.path().join("cache2")), "{path:?}");
    // Without that config the shipped descriptor has no such source: a clear refusal.
    let o = fetch_board(&d.path().join("no-config"));
    assert!(!o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("qemu-aarch64"), "{}", text(&o));
}

#[test]
fn stream_is_checked_against_the_board_before_writing() {
    if !common::require(true, IMAGE_TOOLS) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    // First partition at 8 MiB: inside the Rockchip bootloader area of the opi5.
    let (raw, zst) = zstd_image(d.path(), 40);
    srv.add("/other-board.img.zst", zst.clone(), Behavior::Normal);
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 48 << 20);
    let write = |extra: &[&str]| {
        over(
            &srv,
            &d.path().join("cache"),
            common::sbcflash()
                .arg("write")
                .arg(srv.url("/other-board.img.zst"))
                .arg(lo.path())
                .args(["--yes", "--board", "opi5", "--source-blake3", &b3(&zst)])
                .args(extra),
        )
    };
    // --strict: refused (exit 3) from the stream's head; not one byte reached the target.
    let o = write(&["--strict"]);
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("inside the Rockchip bootloader area"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read(&lo.backing).unwrap().iter().all(|b| *b == 0),
        "a refused stream wrote to the target"
    );
    // Without --strict: the same findings as warnings, then the image is written.
    let o = write(&[]);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: first partition starts at 8 MiB"),
        "{err}"
    );
    assert!(!err.contains("not a regular file"), "{err}");
    common::assert_same_prefix(&raw, lo.path(), 40 << 20);
}

/// Issue 14, item 2, streamed: a `.tar.gz` served over HTTPS is decoded (gzip) and refused on
/// the peeked head of the stream as a tar archive, before a byte reaches the target.
#[test]
fn stream_of_a_tar_gz_is_refused_before_the_target_is_touched() {
    if !common::require(true, &["losetup", "tar", "gzip"]) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    common::sh(&format!(
        "cd '{}' && mkdir -p rootfs/etc && printf 'nixos\\n' > rootfs/etc/hostname && \
         head -c 300000 /dev/urandom > rootfs/blob && tar czf rootfs.tar.gz rootfs",
        d.path().display()
    ));
    let tgz = Arc::new(std::fs::read(d.path().join("rootfs.tar.gz")).unwrap());
    srv.add("/rootfs.tar.gz", tgz.clone(), Behavior::Normal);
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", 16 << 20);
    let o = over(
        &srv,
        &d.path().join("cache"),
        common::sbcflash()
            .arg("write")
            .arg(srv.url("/rootfs.tar.gz"))
            .arg(lo.path())
            .args(["--yes", "--source-blake3", &b3(&tgz)]),
    );
    assert_eq!(o.status.code(), Some(3), "{}", text(&o));
    assert!(
        text(&o).contains("does not look like a disk image: it is a tar archive"),
        "{}",
        text(&o)
    );
    assert!(
        std::fs::read(&lo.backing).unwrap().iter().all(|b| *b == 0),
        "a refused stream wrote to the target"
    );
}

/// Benchmark for BENCHMARKS.md (not part of CI): the same zstd image written to a loop device
/// by streaming from the loopback HTTPS server, by `curl | zstd -dc | dd`, and from a local
/// file. Run: `cargo test --release --test acquire bench_stream -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark for BENCHMARKS.md, not a test: run by hand with --ignored --nocapture"]
fn bench_stream_vs_curl_vs_local_file() {
    if !common::require(true, &["losetup", "zstd", "curl", "dd"]) {
        return;
    }
    let mib: usize = std::env::var("BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(512);
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    // BENCH_IMAGE=path/x.img.zst benchmarks a real image (its raw sibling x.img is the
    // reference for the byte checks), e.g. the writer benchmark's NixOS-like image.
    // The synthetic image below has no partition table: the writes pass --raw.
    let (rawp, zstp) = match std::env::var_os("BENCH_IMAGE") {
        Some(z) => {
            // Copied, so that the local write does not pick up a bmap beside it: the stream
            // has none either.
            let z = std::path::PathBuf::from(z);
            let local = d.path().join("bench.img.zst");
            std::fs::copy(&z, &local).unwrap();
            (z.with_extension(""), local)
        }
        None => {
            // Half incompressible data, half zeroes: the worst case for streaming (every
            // written data byte crosses the network once, uncompressed).
            let mut raw = pseudo_random((mib / 2) << 20, 99);
            raw.resize(mib << 20, 0);
            let rawp = d.path().join("bench.img");
            std::fs::write(&rawp, &raw).unwrap();
            common::run(
                std::process::Command::new("zstd")
                    .args(["-q", "-f", "-T0", "-3"])
                    .arg(&rawp),
            );
            (rawp.clone(), d.path().join("bench.img.zst"))
        }
    };
    let logical = std::fs::metadata(&rawp).unwrap().len();
    let zst = Arc::new(std::fs::read(&zstp).unwrap());
    srv.add("/bench.img.zst", zst.clone(), Behavior::Normal);
    let url = srv.url("/bench.img.zst");
    let lo = common::LoopDev::new_sparse(d.path(), "disk.img", logical + (16 << 20));
    let dev = lo.path().to_path_buf();
    // BENCH_WRITE_MIBS=90: the timed runs' writes to the loop device are throttled to that many
    // MiB/s by the block cgroup, like an SD card; the untimed settling writes are not.
    let throttle = std::env::var("BENCH_WRITE_MIBS")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .map(|mibs| WriteThrottle::new(&dev, mibs << 20));
    let sbc = || match &throttle {
        None => common::sbcflash(),
        Some(t) => {
            let mut c = std::process::Command::new("sh");
            c.arg("-c")
                .arg("echo $$ > \"$0\" && exec \"$@\"")
                .arg(&t.procs)
                .arg(env!("CARGO_BIN_EXE_sbcflash"));
            c
        }
    };
    let join = throttle
        .as_ref()
        .map(|t| format!("echo $$ > {}; ", t.procs.display()))
        .unwrap_or_default();
    // Wall time and the CPU time (user + system) of the child processes: on a shared machine
    // the CPU column is the steadier one.
    let cpu_of = |who: i32| {
        let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage only writes the struct it is given.
        unsafe { libc::getrusage(who, &mut ru) };
        let tv = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
        tv(ru.ru_utime) + tv(ru.ru_stime)
    };
    // (wall, CPU of the client processes, CPU of this process: the HTTPS server's threads).
    let time = |f: &dyn Fn()| {
        let (t, c, s) = (
            std::time::Instant::now(),
            cpu_of(libc::RUSAGE_CHILDREN),
            cpu_of(libc::RUSAGE_SELF),
        );
        f();
        (
            t.elapsed().as_secs_f64(),
            cpu_of(libc::RUSAGE_CHILDREN) - c,
            cpu_of(libc::RUSAGE_SELF) - s,
        )
    };
    let reps: usize = std::env::var("BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2);
    // Outside the timed runs: the digest the stream is pinned to.
    let pin = b3(&zst);
    let mut rows = Vec::new();
    // Every timed run starts with the backing file in the same state: an untimed sbcflash
    // write first (the sparse backing file allocates its blocks on the first write, which
    // would slow whichever run came first) and again after dd, which writes the zeroes too:
    // the next run's discard would otherwise free 4 times the blocks.
    let settle = || {
        common::run(common::sbcflash().arg("write").arg(&zstp).arg(&dev).args([
            "--yes",
            "--raw",
            "--no-verify",
        ]));
        common::sh("sync");
    };
    settle();
    for rep in 0..reps {
        let stream = |verify: bool| {
            time(&|| {
                let o = sbc()
                    .arg("write")
                    .arg(&url)
                    .arg(&dev)
                    .args(["--yes", "--raw", "--source-blake3", &pin, "--ca-file"])
                    .arg(&srv.ca_file)
                    .arg("--cache-dir")
                    .arg(d.path().join("cache"))
                    .args((!verify).then_some("--no-verify"))
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", text(&o));
            })
        };
        let local = |verify: bool| {
            time(&|| {
                let o = sbc()
                    .arg("write")
                    .arg(&zstp)
                    .arg(&dev)
                    .args(["--yes", "--raw"])
                    .args((!verify).then_some("--no-verify"))
                    .output()
                    .unwrap();
                assert!(o.status.success(), "{}", text(&o));
            })
        };
        let s = stream(false);
        common::assert_same_prefix(&rawp, &dev, logical);
        let c = time(&|| {
            common::sh(&format!(
                "{join}curl -sf --cacert {} {url} | zstd -dc | dd of={} bs=4M oflag=direct conv=fsync status=none",
                srv.ca_file.display(),
                dev.display()
            ));
        });
        common::assert_same_prefix(&rawp, &dev, logical);
        settle();
        let l = local(false);
        common::assert_same_prefix(&rawp, &dev, logical);
        // The default (with the read-back verify) both ways: what a user sees.
        let sv = stream(true);
        common::assert_same_prefix(&rawp, &dev, logical);
        let lv = local(true);
        common::assert_same_prefix(&rawp, &dev, logical);
        rows.push((rep, s, c, l, sv, lv));
    }
    println!("| rep | sbcflash write https://… (stream) | curl \\| zstd -dc \\| dd | sbcflash write local .zst | stream / local (wall) | with read-back: stream | local | stream / local |");
    println!("|---|---|---|---|---|---|---|---|");
    for (rep, s, c, l, sv, lv) in rows {
        println!(
            "| {rep} | {:.2} s ({:.2} s CPU + server {:.2} s) | {:.2} s ({:.2} s CPU + server {:.2} s) | {:.2} s ({:.2} s CPU) | {:.2} | {:.2} s | {:.2} s | {:.2} |",
            s.0,
            s.1,
            s.2,
            c.0,
            c.1,
            c.2,
            l.0,
            l.1,
            s.0 / l.0,
            sv.0,
            lv.0,
            sv.0 / lv.0
        );
    }
    println!("(CPU: user + system time of the client processes; server: of the test process, whose HTTPS server shares the machine's cores)");
    if let Some(t) = &throttle {
        println!("target writes throttled to {} MiB/s", t.bps >> 20);
    }
    println!(
        "image: {} ({:.1} MiB logical, {:.1} MiB zstd)",
        zstp.display(),
        logical as f64 / (1 << 20) as f64,
        zst.len() as f64 / (1 << 20) as f64
    );
}

/// A block cgroup that limits writes to one device (cgroup v2 `io.max`, else v1 blkio
/// throttle), for benchmarking at the speed of a real card. Removed on drop.
struct WriteThrottle {
    dir: PathBuf,
    procs: PathBuf,
    bps: u64,
}

impl WriteThrottle {
    fn new(dev: &Path, bps: u64) -> WriteThrottle {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(dev).unwrap().rdev();
        let (maj, min) = (libc::major(rdev), libc::minor(rdev));
        let name = format!("sbcflash-bench-{}", std::process::id());
        let dir = if Path::new("/sys/fs/cgroup/cgroup.controllers").exists() {
            // Best effort: the io controller may already be enabled for children.
            let _ = std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+io");
            let dir = Path::new("/sys/fs/cgroup").join(&name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(dir.join("io.max"), format!("{maj}:{min} wbps={bps}")).unwrap();
            dir
        } else {
            let dir = Path::new("/sys/fs/cgroup/blkio").join(&name);
            std::fs::create_dir(&dir).unwrap();
            std::fs::write(
                dir.join("blkio.throttle.write_bps_device"),
                format!("{maj}:{min} {bps}"),
            )
            .unwrap();
            dir
        };
        WriteThrottle {
            procs: dir.join("cgroup.procs"),
            dir,
            bps,
        }
    }
}

impl Drop for WriteThrottle {
    fn drop(&mut self) {
        // Its processes have exited: the (empty) cgroup can go.
        let _ = std::fs::remove_dir(&self.dir);
    }
}

/// The config file's `[[mirrors]]`: a matching mirror is tried first; when it serves, the
/// upstream is never asked; when it fails, the download falls back to the upstream URL.
#[test]
fn fetch_tries_config_mirrors_then_the_original() {
    let d = tempfile::tempdir().unwrap();
    let srv = TestServer::start(d.path());
    let data = Arc::new(pseudo_random(2 << 20, 9));
    srv.add("/up/a.zst", Arc::new(Vec::new()), Behavior::Status(404));
    srv.add("/mirror/a.zst", data.clone(), Behavior::Normal);
    srv.add("/up/b.zst", data.clone(), Behavior::Normal);
    srv.add("/mirror/b.zst", Arc::new(Vec::new()), Behavior::Status(503));
    let xdg = d.path().join("xdg");
    std::fs::create_dir_all(xdg.join("sbcflash")).unwrap();
    std::fs::write(
        xdg.join("sbcflash/config.toml"),
        format!(
            "[[mirrors]]\nprefix = {:?}\nreplace = {:?}\n",
            srv.url("/up/"),
            srv.url("/mirror/")
        ),
    )
    .unwrap();
    let fetch = |path: &str, cache: &str| {
        let mut c = common::sbcflash();
        c.args([
            "fetch",
            &srv.url(path),
            "--blake3",
            &b3(&data),
            "--retries",
            "0",
        ])
        .arg("--ca-file")
        .arg(&srv.ca_file)
        .arg("--cache-dir")
        .arg(d.path().join(cache))
        .env("XDG_CONFIG_HOME", &xdg)
        .env_remove("SBCFLASH_CONFIG")
        .env_remove("SBCFLASH_CACHE_DIR");
        c.output().unwrap()
    };
    // Upstream is gone (404), the mirror serves it.
    let o = fetch("/up/a.zst", "c1");
    let (h, p) = fetched(&o);
    assert_eq!(h, b3(&data));
    assert_eq!(std::fs::read(&p).unwrap(), *data);
    assert_eq!(srv.requests("/mirror/a.zst").len(), 1);
    assert_eq!(srv.requests("/up/a.zst").len(), 0, "upstream not asked");
    // The mirror fails (503): a warning naming it, then the upstream serves.
    let o = fetch("/up/b.zst", "c2");
    let (h, _) = fetched(&o);
    assert_eq!(h, b3(&data));
    assert!(!srv.requests("/mirror/b.zst").is_empty());
    assert_eq!(srv.requests("/up/b.zst").len(), 1);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains(&srv.url("/mirror/b.zst")) && err.contains("503"),
        "{err}"
    );
}

/// A self-signed certificate made by `openssl req -x509` (CA:TRUE, as openssl's defaults
/// make it) with `san` as its subjectAltName: (certificate PEM, key PEM).
fn openssl_self_signed(dir: &Path, name: &str, san: &str) -> (Vec<u8>, Vec<u8>) {
    let (cert, key) = (
        dir.join(format!("{name}.pem")),
        dir.join(format!("{name}.key")),
    );
    common::run(
        std::process::Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "30"])
            .arg("-subj")
            .arg(format!("/CN=sbcflash test mirror {name}"))
            .arg("-addext")
            .arg(format!("subjectAltName={san}"))
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert),
    );
    (std::fs::read(cert).unwrap(), std::fs::read(key).unwrap())
}

/// A self-signed end-entity certificate (no CA flag) made by rcgen for 127.0.0.1, valid over
/// `validity` (`None`: the default, valid now).
fn rcgen_self_signed(validity: Option<(i32, i32)>) -> (Vec<u8>, Vec<u8>) {
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    p.subject_alt_names
        .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
    if let Some((from, to)) = validity {
        p.not_before = rcgen::date_time_ymd(from, 1, 1);
        p.not_after = rcgen::date_time_ymd(to, 1, 1);
    }
    let cert = p.self_signed(&key).unwrap();
    (cert.pem().into_bytes(), key.serialize_pem().into_bytes())
}

/// `fetch URL --ca-file CA` against `srv`: (exit code, stderr).
fn fetch_trusting(srv: &TestServer, ca: &Path, cache: &Path, data: &[u8]) -> (Option<i32>, String) {
    let o = common::sbcflash()
        .args(["fetch", &srv.url("/img"), "--sha256", &sha256(data)])
        .args(["--retries", "0", "--ca-file"])
        .arg(ca)
        .arg("--cache-dir")
        .arg(cache)
        .env_remove("SBCFLASH_CACHE_DIR")
        .output()
        .unwrap();
    (o.status.code(), text(&o))
}

/// `--ca-file` holding the server's own self-signed certificate pins it, as `curl --cacert`
/// does: accepted whether openssl made it a CA (`CaUsedAsEndEntity` to rustls) or not; its
/// host name and dates are still checked, and every refusal says what is wrong in plain words.
#[test]
fn ca_file_with_the_servers_own_self_signed_certificate_pins_it() {
    if !require_openssl() {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let data = pseudo_random(256 << 10, 9);
    let serve = |cert: &(Vec<u8>, Vec<u8>), name: &str| {
        let sub = d.path().join(name);
        std::fs::create_dir_all(&sub).unwrap();
        let srv = TestServer::start_with_cert(&sub, &cert.0, &cert.1);
        srv.add("/img", Arc::new(data.clone()), Behavior::Normal);
        srv
    };

    // Pinned, openssl req -x509 (CA:TRUE) and rcgen (end entity): fetched.
    let openssl = openssl_self_signed(d.path(), "openssl", "IP:127.0.0.1,DNS:localhost");
    for (name, cert) in [("openssl", &openssl), ("rcgen", &rcgen_self_signed(None))] {
        let srv = serve(cert, name);
        let cache = d.path().join(format!("cache-{name}"));
        let (code, out) = fetch_trusting(&srv, &srv.ca_file, &cache, &data);
        assert_eq!(code, Some(0), "{name}: {out}");
        assert_eq!(blobs(&cache).len(), 1, "{name}: {out}");
        if common::have_tool("curl") {
            // The behaviour users compare against.
            let o = std::process::Command::new("curl")
                .args(["-sS", "-o", "/dev/null", "--cacert"])
                .arg(&srv.ca_file)
                .arg(srv.url("/img"))
                .output()
                .unwrap();
            assert!(o.status.success(), "curl --cacert: {}", text(&o));
        }
    }

    // Refusals: exit 5, nothing cached, the reason and the fix in words.
    let wrong_name = openssl_self_signed(d.path(), "wrong-name", "DNS:mirror.example");
    let expired = rcgen_self_signed(Some((2020, 2021)));
    let other = openssl_self_signed(d.path(), "other", "IP:127.0.0.1");
    let other_file = d.path().join("other-cert.pem");
    std::fs::write(&other_file, &other.0).unwrap();
    // (name, the server's certificate and key, --ca-file is that certificate, words wanted)
    type Case<'a> = (&'a str, &'a (Vec<u8>, Vec<u8>), bool, &'a [&'a str]);
    let leaf = rcgen_self_signed(None);
    let cases: [Case; 4] = [
        (
            "wrong-name",
            &wrong_name,
            true,
            &["not valid for the name 127.0.0.1", "mirror.example"],
        ),
        (
            "expired",
            &expired,
            true,
            &["expired on 2021-01-01", "renew it on the server"],
        ),
        (
            "unrelated",
            &leaf,
            false,
            &[
                "issued by no authority this machine trusts",
                "not the certificate in",
                "other-cert.pem",
                "--ca-file",
            ],
        ),
        (
            "unrelated-ca",
            &openssl,
            false,
            &[
                "presents a CA certificate as its own",
                "not the one in",
                "other-cert.pem",
                "pass exactly that certificate with --ca-file",
            ],
        ),
    ];
    for (name, cert, own_cert, want) in cases {
        let srv = serve(cert, name);
        let cache = d.path().join(format!("cache-{name}"));
        let ca = if own_cert {
            srv.ca_file.clone()
        } else {
            other_file.clone()
        };
        let (code, out) = fetch_trusting(&srv, &ca, &cache, &data);
        assert_eq!(code, Some(5), "{name}: {out}");
        for w in want {
            assert!(out.contains(w), "{name}: missing {w:?} in {out}");
        }
        for rust in ["OtherError", "InvalidCertificate", "CaUsedAsEndEntity"] {
            assert!(!out.contains(rust), "{name}: Rust error names in {out}");
        }
        assert!(blobs(&cache).is_empty(), "{name}");
    }
}

fn require_openssl() -> bool {
    common::require(false, &["openssl"])
}

/// An OpenSSH server on 127.0.0.1 acting as a Nix remote builder with its OWN store: its forced
/// command runs the requested `nix-store --serve` in a private mount namespace where the test
/// store's path is a bind mount of the builder's directory, with the builder's own state, so
/// what it builds lands there and must be copied back. Killed by PID on drop.
struct SshBuilder {
    child: Option<std::process::Child>,
    port: u16,
    /// The builder's physical store directory.
    store: PathBuf,
    /// One line per ssh command the builder ran.
    commands: PathBuf,
    user_key: PathBuf,
    known_hosts: PathBuf,
}

impl SshBuilder {
    fn start(dir: &Path, local_store: &Path) -> SshBuilder {
        let b = dir.join("builder");
        let store = b.join("builder-store");
        std::fs::create_dir_all(&store).unwrap();
        std::fs::create_dir_all(b.join("etc")).unwrap();
        std::fs::create_dir_all(local_store).unwrap();
        std::fs::write(
            b.join("etc/nix.conf"),
            "sandbox = false\nbuild-users-group =\nsubstituters =\n",
        )
        .unwrap();
        for k in ["host_key", "user_key"] {
            common::run(
                std::process::Command::new("ssh-keygen")
                    .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                    .arg(b.join(k)),
            );
        }
        let commands = b.join("commands.log");
        let forced = b.join("forced.sh");
        let inner = format!(
            "mount --bind {store} {local} && NIX_STORE_DIR={local} NIX_STATE_DIR={b}/state \
             NIX_LOG_DIR={b}/log NIX_CONF_DIR={b}/etc HOME={b} exec $SSH_ORIGINAL_COMMAND",
            store = store.display(),
            local = local_store.display(),
            b = b.display()
        );
        std::fs::write(
            &forced,
            format!(
                "#!/bin/sh\necho \"$SSH_ORIGINAL_COMMAND\" >> {}\nexec unshare -m sh -c '{inner}'\n",
                commands.display()
            ),
        )
        .unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&forced, std::fs::Permissions::from_mode(0o755)).unwrap();
        let user_pub = std::fs::read_to_string(b.join("user_key.pub")).unwrap();
        std::fs::write(
            b.join("authorized_keys"),
            format!("command=\"{}\",restrict {user_pub}", forced.display()),
        )
        .unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        std::fs::write(
            b.join("sshd_config"),
            format!(
                "Port {port}\nListenAddress 127.0.0.1\nHostKey {b}/host_key\n\
                 AuthorizedKeysFile {b}/authorized_keys\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nPermitRootLogin prohibit-password\n\
                 StrictModes no\nUsePAM no\nPidFile none\n",
                b = b.display()
            ),
        )
        .unwrap();
        let host_pub = std::fs::read_to_string(b.join("host_key.pub")).unwrap();
        let host_pub = host_pub.split_whitespace().take(2).collect::<Vec<_>>();
        let known_hosts = b.join("known_hosts");
        std::fs::write(
            &known_hosts,
            format!("[127.0.0.1]:{port} {} {}\n", host_pub[0], host_pub[1]),
        )
        .unwrap();
        // Its privilege-separation directory, made by the service unit on a booted system but
        // missing in a fresh container.
        std::fs::create_dir_all("/run/sshd").unwrap();
        // sshd re-executes itself, so it must be started by its absolute path.
        let sshd = common::sh("command -v sshd");
        let sshd = String::from_utf8_lossy(&sshd.stdout).trim().to_string();
        let child = std::process::Command::new(&sshd)
            .args(["-D", "-e", "-f"])
            .arg(b.join("sshd_config"))
            .stderr(std::fs::File::create(b.join("sshd.log")).unwrap())
            .spawn()
            .unwrap();
        let mut me = SshBuilder {
            child: Some(child),
            port,
            store,
            commands,
            user_key: b.join("user_key"),
            known_hosts,
        };
        // Ready when it accepts a connection (it listens before serving; bounded wait).
        for _ in 0..200 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return me;
            }
            if let Some(Ok(Some(_))) = me.child.as_mut().map(|c| c.try_wait()) {
                break;
            }
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        panic!(
            "sshd did not listen on 127.0.0.1:{port}: {}",
            std::fs::read_to_string(b.join("sshd.log")).unwrap_or_default()
        );
    }

    /// NIX_SSHOPTS for reaching it: the port and its host key (user-facing, see README).
    fn sshopts(&self) -> String {
        format!(
            "-p {} -o UserKnownHostsFile={} -o BatchMode=yes",
            self.port,
            self.known_hosts.display()
        )
    }

    /// The `--builders` spec: URI, system, identity file, max jobs.
    fn spec(&self) -> String {
        format!(
            "ssh://root@127.0.0.1 x86_64-linux {} 1",
            self.user_key.display()
        )
    }

    fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for SshBuilder {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A flake whose derivation records where it ran: the mount table line of a store that is the
/// builder's bind mount exists only in the builder's namespace.
fn write_builder_flake(dir: &Path, salt: &str) {
    let script = format!(
        r#"
set -eu
/usr/bin/mkdir -p "$out/sd-image"
/usr/bin/printf 'sbcflash remote build {salt}\n' > "$out/sd-image/nixos-sd-image-test.img"
/usr/bin/grep -F builder-store /proc/self/mountinfo > "$out/where" || echo local > "$out/where"
echo "built the test image"
"#
    );
    write_sh_flake(dir, &script);
}

#[test]
fn nix_build_on_remote_ssh_builder() {
    if !common::require(
        true,
        &["nix", "nix-store", "sshd", "ssh", "ssh-keygen", "unshare"],
    ) {
        return;
    }
    let d = tempfile::tempdir().unwrap();
    let mut builder = SshBuilder::start(d.path(), &d.path().join("store"));
    let flake = d.path().join("flake");
    write_builder_flake(&flake, "one");
    let cache = d.path().join("cache");
    let flake_ref = format!("path:{}#testhost", flake.display());
    let build = |json: bool, jobs: &str, b: &SshBuilder| {
        let mut c = common::sbcflash();
        if json {
            c.arg("--json");
        }
        c.args(["build", "--flake", &flake_ref, "--max-jobs", jobs])
            .arg("--builders")
            .arg(b.spec())
            .args(NIX_OFFLINE)
            .arg("--cache-dir")
            .arg(&cache);
        nix_env(&mut c, d.path());
        c.env("NIX_SSHOPTS", b.sshopts());
        c.output().unwrap()
    };

    // No local build slots: it can only have been built on the builder, and sbcflash says so
    // (on stderr; the result line on stdout stays `<blake3>  <path>`).
    let o = build(false, "0", &builder);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("built nixos-sd-image-test on ssh://root@127.0.0.1"),
        "{err}"
    );
    fetched(&o);
    write_builder_flake(&flake, "json");
    let o = build(true, "0", &builder);
    assert!(o.status.success(), "{}", text(&o));
    let stdout = String::from_utf8_lossy(&o.stdout).to_string();
    common::json::assert_documented(&stdout);
    assert!(
        stdout.contains("built nixos-sd-image-test on ssh://root@127.0.0.1"),
        "{stdout}"
    );
    let finish: serde_json::Value = stdout
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["event"] == "finish" && v["phase"] == "build")
        .expect("build finish event");
    let on = &finish["summary"]["built_on"];
    assert_eq!(on.as_array().map(Vec::len), Some(1), "{finish}");
    assert_eq!(on[0]["machine"], "ssh://root@127.0.0.1", "{finish}");
    let drv = on[0]["drv"].as_str().unwrap();
    assert!(drv.ends_with("-nixos-sd-image-test.drv"), "{drv}");
    // The image came back into the local store from the builder's own store, where the build
    // saw the builder's bind mount: proof it ran there.
    let image = PathBuf::from(finish["summary"]["image"].as_str().unwrap());
    let out = image.parent().unwrap().parent().unwrap().to_path_buf();
    let where_ = std::fs::read_to_string(out.join("where")).unwrap();
    assert!(
        where_.contains("builder-store") && where_.contains(&*d.path().to_string_lossy()),
        "the derivation did not run on the builder: {where_}"
    );
    let remote_out = builder.store.join(out.file_name().unwrap());
    assert_eq!(
        std::fs::read(remote_out.join("sd-image/nixos-sd-image-test.img")).unwrap(),
        std::fs::read(&image).unwrap()
    );
    let commands = std::fs::read_to_string(&builder.commands).unwrap();
    assert!(commands.contains("nix-store --serve --write"), "{commands}");
    assert_eq!(blobs(&cache).len(), 2);

    // The builder is down: a new derivation cannot be built anywhere; the error names the
    // builder and why (exit 5), and nothing is cached.
    builder.stop();
    write_builder_flake(&flake, "two");
    let o = build(false, "0", &builder);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("remote builder ssh://root@127.0.0.1 could not be used")
            && err.contains("Connection refused"),
        "{err}"
    );
    assert_eq!(blobs(&cache).len(), 2);

    // With a local slot, Nix builds it here instead: it works, and the dead builder is a warning.
    let o = build(false, "1", &builder);
    assert!(o.status.success(), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("warning: remote builder ssh://root@127.0.0.1 could not be used")
            && !err.contains("built nixos-sd-image-test on"),
        "{err}"
    );
    let (_, cached) = fetched(&o);
    assert_eq!(
        std::fs::read_to_string(cached).unwrap(),
        "sbcflash remote build two\n"
    );
    assert_eq!(blobs(&cache).len(), 3);
}

/// `build --image-variant sd-card --try TARGET`: a NixOS 25.05-style image output
/// (`system.build.images.sd-card`, `sd-image/nixos-image-sd-card-*.img.zst`) is built by the
/// real nix, boot-tested in QEMU, and written only if it booted. The image that does not
/// boot (its init cannot run) leaves the target uncreated.
#[test]
fn qemu_build_image_variant_try_then_write_only_if_it_boots() {
    let tools = common::try_tools("aarch64");
    let mut need: Vec<&str> = tools.iter().map(String::as_str).collect();
    need.extend(["nix", "zstd"]);
    if !common::require(false, &need) {
        return;
    }
    let tmpdir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    let good = common::harness_image(tmpdir, &[]);
    let bad = common::harness_image(tmpdir, &["--broken-init"]);
    let d = tempfile::tempdir().unwrap();
    let flake = d.path().join("flake");
    std::fs::create_dir_all(&flake).unwrap();
    for (name, img) in [("good", &good), ("bad", &bad)] {
        std::fs::write(
            flake.join(format!("{name}.sh")),
            format!(
                "set -eu\n/usr/bin/mkdir -p \"$out/sd-image\"\n/usr/bin/zstd -q {} -o \"$out/sd-image/nixos-image-sd-card-25.05.test-aarch64-linux.img.zst\"\n",
                img.display()
            ),
        )
        .unwrap();
    }
    std::fs::write(
        flake.join("flake.nix"),
        r#"{
  outputs = { self }: let
    image = name: derivation {
      inherit name;
      system = "x86_64-linux";
      builder = "/bin/sh";
      args = [ (./. + "/${name}.sh") ];
    };
  in {
    nixosConfigurations.good.config.system.build.images.sd-card = image "good";
    nixosConfigurations.bad.config.system.build.images.sd-card = image "bad";
  };
}
"#,
    )
    .unwrap();
    let run = |host: &str, target: &Path| {
        let mut c = common::sbcflash();
        c.args([
            "build",
            "--image-variant",
            "sd-card",
            "--try",
            "--flake",
            &format!("path:{}#{host}", flake.display()),
        ])
        .args(NIX_OFFLINE)
        .arg("--cache-dir")
        .arg(d.path().join("cache"))
        .arg(target)
        .arg("--yes")
        .stdin(std::process::Stdio::null());
        nix_env(&mut c, d.path());
        c.output().unwrap()
    };
    let card = d.path().join("card.img");
    let o = run("good", &card);
    assert!(o.status.success(), "{}", text(&o));
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        out.contains("PASS ") && out.contains("login"),
        "{}",
        text(&o)
    );
    common::assert_same_prefix(&good, &card, std::fs::metadata(&good).unwrap().len());

    let card2 = d.path().join("card2.img");
    let o = run("bad", &card2);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("did not pass `try`; the target was not changed")
            && err.contains("stage \"initrd\""),
        "{}",
        text(&o)
    );
    assert!(!card2.exists(), "nothing was written");
}
