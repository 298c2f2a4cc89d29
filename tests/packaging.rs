//! What the packages ship, checked from the outside: man pages and completions generated for
//! every subcommand, the `.deb` built by cargo-deb (its file list and maintainer scripts), and
//! the Nix flake evaluated by Debian's nix-bin as far as an offline machine allows.

mod common;

use common::{require, sbcflash};
use std::process::Command;

fn out_ok(cmd: &mut Command) -> std::process::Output {
    let o = cmd
        .output()
        .unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        o.status.success(),
        "{cmd:?}: {}\nstdout: {}\nstderr: {}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    o
}

/// Every subcommand path, from the same clap definitions the binary uses.
fn subcommand_paths() -> Vec<Vec<String>> {
    fn walk(cmd: &clap::Command, prefix: &[String], out: &mut Vec<Vec<String>>) {
        for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
            let mut p = prefix.to_vec();
            p.push(sub.get_name().to_string());
            out.push(p.clone());
            walk(sub, &p, out);
        }
    }
    let mut out = Vec::new();
    walk(&sbcflash::cli::meta::man_command(), &[], &mut out);
    out
}

#[test]
fn man_pages_exist_and_are_nonempty_for_every_subcommand() {
    let dir = tempfile::tempdir().unwrap();
    let o = out_ok(sbcflash().args(["man", "--out-dir"]).arg(dir.path()));
    let listed = String::from_utf8_lossy(&o.stdout);
    let paths = subcommand_paths();
    assert!(paths.len() >= 17, "only {} subcommands?", paths.len());
    let mut expected = vec!["sbcflash.1".to_string()];
    expected.extend(paths.iter().map(|p| format!("sbcflash-{}.1", p.join("-"))));
    for name in &expected {
        let f = dir.path().join(name);
        let text = std::fs::read_to_string(&f).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(text.contains(".TH"), "{name} is not roff");
        assert!(text.contains(".SH SYNOPSIS"), "{name} has no synopsis");
        assert!(listed.contains(name), "{name} not reported on stdout");
    }
    let count = std::fs::read_dir(dir.path()).unwrap().count();
    assert_eq!(count, expected.len(), "unexpected extra pages");

    // The top page documents the exit codes; one subcommand page printed on its own.
    let top = std::fs::read_to_string(dir.path().join("sbcflash.1")).unwrap();
    assert!(
        top.contains(".SH \"EXIT STATUS\"") && top.contains("\\fB130\\fR"),
        "exit codes missing from man page"
    );
    for name in &expected {
        let text = std::fs::read_to_string(dir.path().join(name)).unwrap();
        assert!(
            text.contains(".SH EXAMPLES\n.nf\n  sbcflash"),
            "{name}: no examples"
        );
        assert!(
            text.contains(".SH \"EXIT STATUS\""),
            "{name}: no exit status"
        );
        // The footer names the program and its version on every page, not the subcommand.
        let version = format!("\"sbcflash {}\"", env!("CARGO_PKG_VERSION"));
        let th = text
            .lines()
            .find(|l| l.starts_with(".TH"))
            .unwrap_or_default();
        assert!(th.contains(&version), "{name}: {th}");
    }
    let o = out_ok(sbcflash().args(["man", "config", "show"]));
    assert!(String::from_utf8_lossy(&o.stdout).contains("sbcflash\\-config\\-show"));
    let o = sbcflash().args(["man", "no-such"]).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no-such"));
}

#[test]
fn completions_for_every_shell_mention_every_subcommand() {
    let top: Vec<String> = subcommand_paths()
        .into_iter()
        .filter(|p| p.len() == 1)
        .map(|p| p[0].clone())
        .collect();
    for shell in ["bash", "zsh", "fish", "elvish", "powershell"] {
        let o = out_ok(sbcflash().args(["completions", shell]));
        let text = String::from_utf8_lossy(&o.stdout);
        assert!(text.len() > 1000, "{shell}: suspiciously short");
        for sub in &top {
            assert!(text.contains(sub.as_str()), "{shell}: no `{sub}`");
        }
    }
    let dir = tempfile::tempdir().unwrap();
    out_ok(
        sbcflash()
            .args(["completions", "zsh", "--out-dir"])
            .arg(dir.path()),
    );
    assert!(
        std::fs::metadata(dir.path().join("_sbcflash"))
            .unwrap()
            .len()
            > 1000
    );
}

#[test]
fn bash_completion_script_is_valid_bash() {
    if !require(false, &["bash"]) {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let f = dir.path().join("sbcflash.bash");
    let o = out_ok(sbcflash().args(["completions", "bash"]));
    std::fs::write(&f, &o.stdout).unwrap();
    out_ok(Command::new("bash").arg("-n").arg(&f));
    // Source it and ask for completions of `sbcflash con`: must offer console and config.
    let script = format!(
        "source {}; COMP_WORDS=(sbcflash con); COMP_CWORD=1; COMP_LINE='sbcflash con'; COMP_POINT=12; \
         _sbcflash sbcflash con sbcflash; printf '%s\\n' \"${{COMPREPLY[@]}}\"",
        f.display()
    );
    let o = out_ok(Command::new("bash").arg("-c").arg(script));
    let words = String::from_utf8_lossy(&o.stdout);
    assert!(
        words.lines().any(|l| l == "console") && words.lines().any(|l| l == "config"),
        "{words}"
    );
}

/// Root of the crate (tests run from anywhere).
fn root() -> &'static std::path::Path {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
}

#[test]
fn shipped_example_config_matches_the_built_in_one() {
    let shipped = std::fs::read_to_string(root().join("packaging/config.example.toml")).unwrap();
    assert_eq!(
        shipped,
        sbcflash::config::EXAMPLE,
        "regenerate with: sbcflash config example > packaging/config.example.toml"
    );
}

/// Builds the .deb from the binary this test run already built (dev profile: no second
/// release build in CI), then inspects it as a user's dpkg would see it.
#[test]
fn deb_package_contents_and_maintainer_scripts() {
    if !require(false, &["cargo-deb", "dpkg-deb"]) {
        return;
    }
    let out = tempfile::tempdir().unwrap();
    out_ok(
        Command::new("bash")
            .arg(root().join("packaging/debian/build-deb.sh"))
            .args(["--profile", "dev", "--output"])
            .arg(out.path()),
    );
    let deb = std::fs::read_dir(out.path())
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .expect("no .deb produced");

    let list =
        String::from_utf8(out_ok(Command::new("dpkg-deb").arg("-c").arg(&deb)).stdout).unwrap();
    let files: Vec<&str> = list
        .lines()
        .filter_map(|l| l.split_whitespace().last())
        .collect();
    let has = |p: &str| files.contains(&p);
    assert!(has("./usr/bin/sbcflash"), "{list}");
    assert!(has("./usr/share/man/man1/sbcflash.1.gz"), "{list}");
    for sub in subcommand_paths() {
        let page = format!("./usr/share/man/man1/sbcflash-{}.1.gz", sub.join("-"));
        assert!(has(&page), "missing {page}");
    }
    assert!(has("./usr/share/bash-completion/completions/sbcflash"));
    assert!(has("./usr/share/zsh/vendor-completions/_sbcflash"));
    assert!(has("./usr/share/fish/vendor_completions.d/sbcflash.fish"));
    assert!(has("./usr/share/doc/sbcflash/examples/config.toml"));
    assert!(has("./usr/share/doc/sbcflash/json.md"), "the --json schema");
    // udev rules and the station's unit ship once their parts exist in the tree.
    for dir in ["udev-rules"] {
        if let Ok(rd) = std::fs::read_dir(root().join(dir)) {
            for e in rd.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.ends_with(".rules") {
                    let p = format!("./usr/lib/udev/rules.d/{name}");
                    assert!(has(&p), "{p} not in the package:\n{list}");
                }
            }
        }
    }
    assert!(
        has("./usr/lib/systemd/system/sbcflash-station.service"),
        "systemd unit missing:\n{list}"
    );
    assert!(has("./usr/lib/udev/rules.d/70-sbcflash.rules"), "{list}");

    // Maintainer scripts: present, valid sh, and they reload udev.
    let ctl = tempfile::tempdir().unwrap();
    out_ok(Command::new("dpkg-deb").arg("-e").arg(&deb).arg(ctl.path()));
    for script in ["postinst", "postrm"] {
        let p = ctl.path().join(script);
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{script}: {e}"));
        assert!(text.contains("udevadm control --reload-rules"), "{script}");
        assert!(text.contains("daemon-reload"), "{script}");
        assert!(
            !text.contains("#DEBHELPER#"),
            "{script}: token not substituted"
        );
        out_ok(Command::new("sh").arg("-n").arg(&p));
    }
    let postinst = std::fs::read_to_string(ctl.path().join("postinst")).unwrap();
    assert!(postinst.contains("addgroup --system --quiet sbcflash"));
    let control = std::fs::read_to_string(ctl.path().join("control")).unwrap();
    assert!(control.contains("Package: sbcflash"), "{control}");
    assert!(control.contains("adduser"), "{control}");

    // Stopping the station goes through the debhelper-style guard, never a bare systemctl.
    let prerm = std::fs::read_to_string(ctl.path().join("prerm")).unwrap();
    assert!(
        prerm.contains("deb-systemd-invoke stop 'sbcflash-station.service'"),
        "{prerm}"
    );

    lintian_is_clean(&deb);

    // The packaged binary runs and knows its version.
    let x = tempfile::tempdir().unwrap();
    out_ok(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(x.path()));
    let o = out_ok(Command::new(x.path().join("usr/bin/sbcflash")).arg("--version"));
    assert!(String::from_utf8_lossy(&o.stdout).contains(env!("CARGO_PKG_VERSION")));
}

/// Debian's own check of the package: no error and no warning. Overrides are only those in
/// `packaging/debian/sbcflash.lintian-overrides`, each with the reason beside it.
fn lintian_is_clean(deb: &std::path::Path) {
    if !require(false, &["lintian"]) {
        return;
    }
    let o = Command::new("lintian")
        .args(["--allow-root", "--tag-display-limit", "0", "--display-info"])
        .arg(deb)
        .output()
        .expect("run lintian");
    let report = String::from_utf8_lossy(&o.stdout);
    let bad: Vec<&str> = report
        .lines()
        .filter(|l| l.starts_with("E: ") || l.starts_with("W: "))
        .collect();
    assert!(
        bad.is_empty(),
        "lintian {}:\n{}\nfull report:\n{report}{}",
        deb.display(),
        bad.join("\n"),
        String::from_utf8_lossy(&o.stderr)
    );
    // lintian exits non-zero on errors it could not report as tags (a broken package).
    assert!(
        o.status.success(),
        "lintian failed: {report}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// A scratch copy of what the flake needs (a `path:` flake of the checkout would copy the
/// whole target directory into the Nix store).
fn flake_copy() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    for f in [
        "flake.nix",
        "flake.lock",
        "Cargo.toml",
        "Cargo.lock",
        "README.md",
    ] {
        std::fs::copy(root().join(f), d.path().join(f)).unwrap();
    }
    out_ok(
        Command::new("cp")
            .arg("-r")
            .arg(root().join("packaging"))
            .arg(root().join("docs"))
            .arg(root().join("src"))
            .arg(d.path()),
    );
    d
}

fn nix() -> Command {
    let mut c = Command::new("nix");
    c.args([
        "--extra-experimental-features",
        "nix-command flakes",
        "--option",
        "substituters",
        "",
    ]);
    c
}

#[test]
fn nix_files_parse() {
    if !require(false, &["nix-instantiate"]) {
        return;
    }
    let mut files = vec![root().join("flake.nix")];
    for e in std::fs::read_dir(root().join("packaging/nix"))
        .unwrap()
        .flatten()
    {
        if e.path().extension().is_some_and(|x| x == "nix") {
            files.push(e.path());
        }
    }
    assert!(files.len() >= 3);
    for f in files {
        out_ok(Command::new("nix-instantiate").arg("--parse").arg(&f));
    }
}

/// Offline, Nix can read the flake and its lock (the lock matches flake.nix's inputs, or
/// Nix would try to re-lock and fail without network).
#[test]
fn nix_flake_metadata_offline() {
    if !require(false, &["nix"]) {
        return;
    }
    let d = flake_copy();
    let lock_before = std::fs::read(d.path().join("flake.lock")).unwrap();
    let o = out_ok(
        nix()
            .args(["flake", "metadata", "--json", "--no-write-lock-file"])
            .arg(format!("path:{}", d.path().display())),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let locked = &v["locks"]["nodes"]["nixpkgs"]["locked"];
    assert_eq!(locked["type"], "github", "{v}");
    assert_eq!(locked["rev"].as_str().map(str::len), Some(40), "{v}");
    assert!(v["description"].as_str().unwrap().contains("sbcflash"));
    assert_eq!(
        std::fs::read(d.path().join("flake.lock")).unwrap(),
        lock_before
    );
}

/// Evaluates our own Nix code with nixpkgs unavailable (touching it throws): the flake's
/// outputs exist, the NixOS module and the overlay do not need nixpkgs at the flake level,
/// and the package and module take the arguments nixpkgs passes them.
#[test]
fn nix_flake_outputs_evaluate_offline() {
    if !require(false, &["nix-instantiate"]) {
        return;
    }
    let d = flake_copy();
    let expr = r#"
      let
        flake = import ./flake.nix;
        outs = flake.outputs { self = outs; nixpkgs = throw "nixpkgs is not available offline"; };
        version = (builtins.fromTOML (builtins.readFile ./Cargo.toml)).package.version;
      in {
        inputs = builtins.attrNames flake.inputs;
        outputArgs = builtins.attrNames (builtins.functionArgs flake.outputs);
        outputs = builtins.attrNames outs;
        modules = builtins.attrNames outs.nixosModules;
        stationIsModule = builtins.isFunction outs.nixosModules.station;
        overlayIsFunction = builtins.isFunction outs.overlays.default;
        moduleArgs = builtins.attrNames (builtins.functionArgs (import ./packaging/nix/station-module.nix));
        packageArgs = builtins.attrNames (builtins.functionArgs (import ./packaging/nix/package.nix));
        inherit version;
      }
    "#;
    let o = out_ok(
        Command::new("nix-instantiate")
            .current_dir(d.path())
            .args(["--eval", "--strict", "--json", "--expr", expr]),
    );
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    let names = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("{k}: {v}"))
            .iter()
            .map(|x| x.as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(names("inputs"), ["nixpkgs"]);
    for o in [
        "packages",
        "apps",
        "devShells",
        "nixosModules",
        "overlays",
        "checks",
    ] {
        assert!(
            names("outputs").iter().any(|x| x == o),
            "no output {o}: {v}"
        );
    }
    assert_eq!(names("modules"), ["default", "station"]);
    assert_eq!(v["stationIsModule"], true);
    assert_eq!(v["overlayIsFunction"], true);
    for a in ["config", "lib", "pkgs"] {
        assert!(names("moduleArgs").iter().any(|x| x == a), "{v}");
    }
    for a in [
        "rustPlatform",
        "pkg-config",
        "udev",
        "libusb1",
        "installShellFiles",
    ] {
        assert!(names("packageArgs").iter().any(|x| x == a), "{v}");
    }
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
}

/// `cargoLock.lockFile` builds offline in the Nix sandbox only when every dependency comes from
/// the crates.io registry (git dependencies would need `outputHashes`).
#[test]
fn cargo_lock_has_only_registry_sources_for_nix() {
    let lock: toml::Value =
        toml::from_str(&std::fs::read_to_string(root().join("Cargo.lock")).unwrap()).unwrap();
    let pkgs = lock["package"].as_array().unwrap();
    assert!(pkgs.len() > 50);
    for p in pkgs {
        if let Some(src) = p.get("source").and_then(|s| s.as_str()) {
            assert!(
                src.starts_with("registry+https://github.com/rust-lang/crates.io-index"),
                "{} comes from {src}: add cargoLock.outputHashes in packaging/nix/package.nix",
                p["name"]
            );
        }
    }
}

/// The README's boards table, rendered from the shipped descriptors.
fn boards_table() -> String {
    let reg = sbcflash::board::Registry::builtin().expect("shipped descriptors load");
    let mut s = String::from(
        "| id | board | SoC | arch | default medium | USB recovery |\n|---|---|---|---|---|---|\n",
    );
    for b in reg.boards() {
        let usb = b
            .usb_recovery()
            .map(|u| u.protocol.to_string())
            .unwrap_or_else(|| "-".into());
        s.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} |\n",
            b.id(),
            b.name(),
            b.soc.names.join(", "),
            b.soc.arch,
            b.default_medium().kind,
            usb
        ));
    }
    s
}

#[test]
fn readme_boards_table_matches_the_shipped_descriptors() {
    let path = root().join("README.md");
    let readme = std::fs::read_to_string(&path).unwrap();
    let (begin, end) = ("<!-- boards:begin -->\n", "<!-- boards:end -->");
    let a = readme.find(begin).expect("boards:begin marker") + begin.len();
    let b = readme.find(end).expect("boards:end marker");
    let want = boards_table();
    if readme[a..b] != want {
        if std::env::var_os("UPDATE_README").is_some() {
            let new = format!("{}{}{}", &readme[..a], want, &readme[b..]);
            std::fs::write(&path, new).unwrap();
        } else {
            panic!(
                "README boards table is stale; run UPDATE_README=1 cargo test --test packaging readme\n{want}"
            );
        }
    }
}

#[test]
fn readme_documents_every_exit_code() {
    let readme = std::fs::read_to_string(root().join("README.md")).unwrap();
    for (code, what) in sbcflash::exit::Exit::TABLE {
        assert!(
            readme.contains(&format!("| {} | {what} |", code.code())),
            "README lacks exit code {code}"
        );
    }
}

/// No file in the repository names a path of the machine it was built on (the shared reference
/// folder, a home or work directory): users do not have those; cite public sources instead.
#[test]
fn no_build_machine_paths_in_the_repository() {
    if !require(false, &["git"]) {
        return;
    }
    // Spelled in pieces so this file does not match itself.
    let before = "(^|[^[:alnum:]_$.}-])";
    let patterns = [
        format!("{before}/{}/", "work"),
        format!("{before}/{}/", "root"),
        format!("{before}/home/[^/[:space:]]+/(src|work|build|[.]cargo)/"),
        format!("{}/(reference|bench|harness)", "shared"),
    ];
    let mut cmd = Command::new("git");
    cmd.current_dir(root()).args(["grep", "-n", "-I", "-E"]);
    for p in &patterns {
        cmd.arg("-e").arg(p);
    }
    let o = cmd.output().expect("git grep");
    let hits = String::from_utf8_lossy(&o.stdout);
    // git grep: 0 = matches, 1 = none, anything else = it could not search.
    assert_eq!(
        o.status.code(),
        Some(1),
        "paths of a build machine in the repository (cite public sources instead):\n{hits}{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

/// The host key module, evaluated with a minimal `lib`/`pkgs` (nixpkgs is not available
/// offline, so NixOS itself never runs it here): it orders a oneshot before sshd that mounts
/// the FAT partition and runs `sbcflash-host-key.sh` with the configured path into /etc/ssh.
#[test]
fn nix_host_key_module_evaluates_to_a_oneshot_before_sshd() {
    if !require(false, &["nix-instantiate"]) {
        return;
    }
    let module = root().join("packaging/nix/sbcflash-host-key.nix");
    let expr = format!(
        r#"
      let
        lib = {{
          mkEnableOption = d: {{ type = "bool"; description = d; }};
          mkOption = o: o;
          mkIf = c: v: if c then v else {{ }};
          types.str = "str";
          escapeShellArg = s: "'" + s + "'";
        }};
        pkgs = {{ openssh = "openssh"; util-linux = "util-linux"; coreutils = "coreutils"; runtimeShell = "/bin/sh"; }};
        m = enable: import {} {{
          inherit lib pkgs;
          config.services.sbcflash-host-key = {{ inherit enable; device = "/dev/vda1"; path = "sbcflash/k"; }};
        }};
      in {{
        options = builtins.attrNames (m true).options.services.sbcflash-host-key;
        svc = (m true).config.systemd.services.sbcflash-host-key;
        off = (m false).config;
      }}
    "#,
        module.display()
    );
    let o = out_ok(Command::new("nix-instantiate").args([
        "--eval",
        "--strict",
        "--json",
        "--readonly-mode",
        "--expr",
        &expr,
    ]));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(
        v["options"],
        serde_json::json!(["device", "enable", "path"])
    );
    assert_eq!(v["off"], serde_json::json!({}));
    let svc = &v["svc"];
    assert_eq!(svc["serviceConfig"]["Type"], "oneshot", "{v}");
    assert!(svc["before"]
        .as_array()
        .unwrap()
        .contains(&serde_json::json!("sshd.service")));
    let script = svc["script"].as_str().unwrap();
    assert!(
        script.contains("mount -t vfat '/dev/vda1' \"$mnt\""),
        "{script}"
    );
    assert!(
        script.contains("-sbcflash-host-key.sh \"$mnt\" 'sbcflash/k' /etc/ssh"),
        "{script}"
    );
}

/// The module's script, run by a real shell on a key the station's code made: the key lands
/// in the ssh directory (0600, a .pub that OpenSSH derives from it) and leaves the FAT copy;
/// a second run has nothing to do; an existing key is never replaced.
#[test]
fn host_key_script_moves_the_station_key_once() {
    if !require(false, &["ssh-keygen"]) {
        return;
    }
    use std::os::unix::fs::PermissionsExt;
    let d = tempfile::tempdir().unwrap();
    let fat = d.path().join("fat");
    let ssh = d.path().join("etc-ssh");
    std::fs::create_dir_all(fat.join("sbcflash")).unwrap();
    let (k, private, public) = sbcflash::station::identity::make_host_key("root@unit-1").unwrap();
    let src = fat.join("sbcflash/ssh_host_ed25519_key");
    std::fs::write(&src, &private).unwrap();
    std::fs::write(fat.join("sbcflash/ssh_host_ed25519_key.pub"), &public).unwrap();
    let script = root().join("packaging/nix/sbcflash-host-key.sh");
    let run = || {
        out_ok(
            Command::new("sh")
                .arg(&script)
                .arg(&fat)
                .arg("sbcflash/ssh_host_ed25519_key")
                .arg(&ssh),
        )
    };
    let o = run();
    assert!(
        String::from_utf8_lossy(&o.stdout).contains(&k.fingerprint),
        "{o:?}"
    );
    let dst = ssh.join("ssh_host_ed25519_key");
    assert_eq!(std::fs::read(&dst).unwrap(), private);
    assert_eq!(
        std::fs::metadata(&dst).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let pubtext = std::fs::read_to_string(ssh.join("ssh_host_ed25519_key.pub")).unwrap();
    assert!(pubtext.starts_with(&k.public), "{pubtext}");
    assert!(std::fs::read_dir(fat.join("sbcflash"))
        .unwrap()
        .next()
        .is_none());
    run();
    assert_eq!(std::fs::read(&dst).unwrap(), private);
    // another station key arriving later never replaces the installed one
    let (_, other, _) = sbcflash::station::identity::make_host_key("root@unit-2").unwrap();
    std::fs::write(&src, &other).unwrap();
    let o = run();
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("exists"),
        "{o:?}"
    );
    assert_eq!(std::fs::read(&dst).unwrap(), private);
    assert!(!src.exists());
}
