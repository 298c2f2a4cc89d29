//! Handing the booted board to `nixos-rebuild`: wait until SSH really answers (TCP connect
//! plus the `SSH-2.0` banner), fetch and show the host key so that the user can pin it,
//! print the exact command, run it and pass its exit status through.

use std::io::Read;
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::process::Command;
use std::time::{Duration, Instant};

use super::ConsoleError;

/// Waits until `host:port` accepts a TCP connection and sends an `SSH-2.0` banner.
/// Returns the banner line.
pub(crate) fn wait_for_ssh(
    host: &str,
    port: u16,
    timeout: Duration,
) -> Result<String, ConsoleError> {
    let end = Instant::now() + timeout;
    let mut last = String::from("no attempt");
    while Instant::now() < end {
        match try_banner(host, port) {
            Ok(b) if b.starts_with("SSH-2.0") => return Ok(b),
            Ok(b) => last = format!("unexpected banner {b:?}"),
            Err(e) => last = e.to_string(),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    Err(ConsoleError::Handoff(format!(
        "SSH on {host}:{port} did not answer with an SSH-2.0 banner within {}s (last: {last})",
        timeout.as_secs()
    )))
}

fn try_banner(host: &str, port: u16) -> std::io::Result<String> {
    let addrs: Vec<SocketAddr> = (host, port).to_socket_addrs()?.collect();
    let addr = addrs
        .first()
        .ok_or_else(|| std::io::Error::other(format!("{host} does not resolve")))?;
    let mut s = TcpStream::connect_timeout(addr, Duration::from_secs(3))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut buf = Vec::new();
    let mut b = [0u8; 256];
    // The server may send other lines before the banner (RFC 4253 4.2); read to the first
    // line that starts with "SSH-".
    while buf.len() < 4096 {
        let n = s.read(&mut b)?;
        if n == 0 {
            break;
        }
        buf.extend_from_slice(&b[..n]);
        let text = String::from_utf8_lossy(&buf);
        if let Some(l) = text.lines().find(|l| l.starts_with("SSH-")) {
            if text.contains('\n') {
                return Ok(l.trim_end().to_string());
            }
        }
    }
    Ok(String::from_utf8_lossy(&buf).trim().to_string())
}

/// Host keys as `ssh-keyscan` prints them (fingerprints come from `console::hostkeys`).
#[derive(Debug, Clone, Default)]
pub(crate) struct HostKeys {
    pub(crate) lines: Vec<String>,
}

/// Runs `ssh-keyscan -p PORT HOST`.
pub(crate) fn keyscan(host: &str, port: u16) -> Result<HostKeys, ConsoleError> {
    let out = Command::new("ssh-keyscan")
        .args(["-T", "10", "-p", &port.to_string(), host])
        .output()
        .map_err(|e| ConsoleError::Handoff(format!("cannot run ssh-keyscan: {e}")))?;
    let lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect();
    if lines.is_empty() {
        return Err(ConsoleError::Handoff(format!(
            "ssh-keyscan got no host key from {host}:{port}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )));
    }
    Ok(HostKeys { lines })
}

/// The deployer invocation, built so that it can be printed exactly as it will run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Rebuild {
    pub(crate) program: String,
    pub(crate) args: Vec<String>,
    /// `NIX_SSHOPTS` to set (None: leave the environment alone).
    pub(crate) nix_sshopts: Option<String>,
}

/// Inputs for [`Rebuild::plan`].
#[derive(Debug, Clone)]
pub(crate) struct RebuildPlan<'a> {
    /// `--rebuild-cmd`, split on whitespace: the program and leading arguments.
    pub(crate) rebuild_cmd: &'a str,
    /// `REF#HOST` or `REF` (then `host` is needed).
    pub(crate) flake: &'a str,
    pub(crate) host: Option<&'a str>,
    pub(crate) ssh_user: &'a str,
    /// Address SSH goes to (the board's IP, or `--ssh-host`).
    pub(crate) ssh_host: &'a str,
    pub(crate) ssh_port: u16,
    /// The user's own `NIX_SSHOPTS`, kept (after the host key options, so that ssh, which
    /// takes the first value of an option, checks the proven keys whatever the user set).
    pub(crate) env_sshopts: Option<&'a str>,
    /// The known_hosts file of the keys proven over the console: strict checking against it
    /// (and nothing else).
    pub(crate) known_hosts: Option<&'a std::path::Path>,
}

impl Rebuild {
    pub(crate) fn plan(p: &RebuildPlan) -> Result<Rebuild, ConsoleError> {
        let mut words = p.rebuild_cmd.split_whitespace().map(str::to_string);
        let program = words
            .next()
            .ok_or_else(|| ConsoleError::Handoff("--rebuild-cmd is empty".into()))?;
        let flake = match (p.flake.split_once('#'), p.host) {
            (Some((r, _)), Some(h)) => format!("{r}#{h}"),
            (Some((_, h)), None) if !h.is_empty() => p.flake.to_string(),
            (None, Some(h)) => format!("{}#{h}", p.flake),
            _ => {
                return Err(ConsoleError::Handoff(format!(
                    "--flake {:?} names no host: use REF#HOST or --host (nixos-rebuild would otherwise pick this machine's hostname)",
                    p.flake
                )))
            }
        };
        let mut args: Vec<String> = words.collect();
        args.extend([
            "switch".to_string(),
            "--flake".into(),
            flake,
            "--target-host".into(),
            format!("{}@{}", p.ssh_user, p.ssh_host),
        ]);
        if p.ssh_user != "root" {
            args.push("--use-remote-sudo".into());
        }
        let mut opts: Vec<String> = Vec::new();
        if let Some(k) = p.known_hosts {
            let k = k.to_str().filter(|k| !k.contains(char::is_whitespace)).ok_or_else(|| {
                ConsoleError::Handoff(format!(
                    "the known_hosts file {} has a space or non-UTF-8 in its path, which NIX_SSHOPTS cannot carry; pass --transcript with a plain path (the file is written next to it)",
                    k.display()
                ))
            })?;
            opts.extend([
                "-o StrictHostKeyChecking=yes".to_string(),
                format!("-o UserKnownHostsFile={k}"),
                "-o GlobalKnownHostsFile=/dev/null".to_string(),
            ]);
        }
        if let Some(e) = p.env_sshopts.map(str::trim).filter(|e| !e.is_empty()) {
            if !opts.is_empty() || p.ssh_port != 22 {
                opts.push(e.to_string());
            }
        }
        if p.ssh_port != 22 {
            opts.push(format!("-p {}", p.ssh_port));
        }
        let nix_sshopts = (!opts.is_empty()).then(|| opts.join(" "));
        Ok(Rebuild {
            program,
            args,
            nix_sshopts,
        })
    }

    /// The command line as a user would type it (shell-quoted).
    pub(crate) fn display(&self) -> String {
        let mut s = String::new();
        if let Some(o) = &self.nix_sshopts {
            s.push_str(&format!("NIX_SSHOPTS={} ", shell_quote(o)));
        }
        s.push_str(&shell_quote(&self.program));
        for a in &self.args {
            s.push(' ');
            s.push_str(&shell_quote(a));
        }
        s
    }

    /// Runs it with inherited stdio; returns its exit code (signals map to 128+N).
    pub(crate) fn run(&self) -> Result<i32, ConsoleError> {
        let mut c = Command::new(&self.program);
        c.args(&self.args);
        if let Some(o) = &self.nix_sshopts {
            c.env("NIX_SSHOPTS", o);
        }
        let st = c
            .status()
            .map_err(|e| ConsoleError::Handoff(format!("cannot run {}: {e}", self.program)))?;
        use std::os::unix::process::ExitStatusExt;
        Ok(st.code().unwrap_or_else(|| 128 + st.signal().unwrap_or(0)))
    }
}

/// Writes the known_hosts file of this run (only the proven keys).
pub(crate) fn write_known_hosts(
    path: &std::path::Path,
    lines: &[String],
) -> Result<(), ConsoleError> {
    let mut text = lines.join("\n");
    text.push('\n');
    std::fs::write(path, text).map_err(|e| {
        ConsoleError::Handoff(format!("cannot write known_hosts {}: {e}", path.display()))
    })
}

/// Appends the lines `path` does not hold yet (`--known-hosts`); creates the file if needed.
pub(crate) fn append_known_hosts(
    path: &std::path::Path,
    lines: &[String],
) -> Result<usize, ConsoleError> {
    let err = |e: std::io::Error| {
        ConsoleError::Handoff(format!(
            "cannot append to known_hosts {}: {e}",
            path.display()
        ))
    };
    let old = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(err(e)),
    };
    let have: std::collections::HashSet<&str> = old.lines().map(str::trim).collect();
    let new: Vec<&String> = lines
        .iter()
        .filter(|l| !have.contains(l.as_str()))
        .collect();
    if new.is_empty() {
        return Ok(0);
    }
    let mut text = String::new();
    if !old.is_empty() && !old.ends_with('\n') {
        text.push('\n');
    }
    for l in &new {
        text.push_str(l);
        text.push('\n');
    }
    use std::io::Write;
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .and_then(|mut f| f.write_all(text.as_bytes()))
        .map_err(err)?;
    Ok(new.len())
}

/// Quotes a word for a POSIX shell if it needs it.
pub(crate) fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./:@#=+,%".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', "'\\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plan(
        user: &str,
        port: u16,
        flake: &str,
        host: Option<&str>,
    ) -> Result<Rebuild, ConsoleError> {
        Rebuild::plan(&RebuildPlan {
            rebuild_cmd: "nixos-rebuild",
            flake,
            host,
            ssh_user: user,
            ssh_host: "10.0.0.5",
            ssh_port: port,
            env_sshopts: Some("-i key"),
            known_hosts: None,
        })
    }

    #[test]
    fn rebuild_commands() {
        let r = plan("root", 22, ".#opi5-lab", None).unwrap();
        assert_eq!(
            r.display(),
            "nixos-rebuild switch --flake .#opi5-lab --target-host root@10.0.0.5"
        );
        let r = plan("nixos", 2222, ".", Some("b1")).unwrap();
        assert_eq!(
            r.display(),
            "NIX_SSHOPTS='-i key -p 2222' nixos-rebuild switch --flake .#b1 --target-host nixos@10.0.0.5 --use-remote-sudo"
        );
        assert!(plan("root", 22, ".", None).is_err());
    }

    #[test]
    fn known_hosts_appends_only_new_lines_and_keeps_the_old_ones() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("kh");
        std::fs::write(&f, "old ssh-ed25519 AAAAold").unwrap(); // no final newline
        let lines = vec!["[b]:2222 ssh-ed25519 AAAAb".to_string()];
        assert_eq!(append_known_hosts(&f, &lines).unwrap(), 1);
        assert_eq!(append_known_hosts(&f, &lines).unwrap(), 0);
        assert_eq!(
            std::fs::read_to_string(&f).unwrap(),
            "old ssh-ed25519 AAAAold\n[b]:2222 ssh-ed25519 AAAAb\n"
        );
        let new = d.path().join("new");
        assert_eq!(append_known_hosts(&new, &lines).unwrap(), 1);
        assert!(append_known_hosts(&d.path().join("no/such/dir"), &lines).is_err());
    }

    #[test]
    fn proven_keys_come_first_in_nix_sshopts() {
        let kh = std::path::Path::new("/run/b/known_hosts");
        let p = |port, env| RebuildPlan {
            rebuild_cmd: "nixos-rebuild",
            flake: ".#b1",
            host: None,
            ssh_user: "root",
            ssh_host: "10.0.0.5",
            ssh_port: port,
            env_sshopts: env,
            known_hosts: Some(kh),
        };
        let r = Rebuild::plan(&p(2222, Some("-o StrictHostKeyChecking=no -i key"))).unwrap();
        assert_eq!(
            r.nix_sshopts.as_deref(),
            Some("-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/run/b/known_hosts -o GlobalKnownHostsFile=/dev/null -o StrictHostKeyChecking=no -i key -p 2222")
        );
        let r = Rebuild::plan(&p(22, None)).unwrap();
        assert_eq!(
            r.nix_sshopts.as_deref(),
            Some("-o StrictHostKeyChecking=yes -o UserKnownHostsFile=/run/b/known_hosts -o GlobalKnownHostsFile=/dev/null")
        );
        let spaced = std::path::Path::new("/tmp/a b/known_hosts");
        let mut q = p(22, None);
        q.known_hosts = Some(spaced);
        assert!(Rebuild::plan(&q).is_err());
    }
}
