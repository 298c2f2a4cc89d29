//! A real PostgreSQL server for a test, from Debian's `postgresql` package: a fresh cluster in
//! a temp dir (initdb), TLS with a certificate made here for 127.0.0.1, password (SCRAM)
//! authentication over TCP, trust over its private Unix socket for the test's own `psql`.
//! Runs as `nobody` when the test runs as root (PostgreSQL refuses root). Stopped by its own
//! PID on drop, even on panic.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A watchdog against a server that never comes up, not a performance threshold.
const WATCHDOG: Duration = Duration::from_secs(120);
const NOBODY: u32 = 65534;

/// The newest PostgreSQL server binaries installed (`/usr/lib/postgresql/<v>/bin`).
pub fn bin_dir() -> Option<PathBuf> {
    let mut v: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let n: u32 = e.file_name().to_str()?.parse().ok()?;
            let b = e.path().join("bin");
            b.join("postgres").exists().then_some((n, b))
        })
        .collect();
    v.sort();
    v.pop().map(|(_, b)| b)
}

/// The server, its cluster and the TLS certificate it presents.
pub struct Postgres {
    pub dir: PathBuf,
    pub port: u16,
    /// The server's self-signed certificate (PEM), to trust as `ledger_ca_file`.
    pub cert: PathBuf,
    bin: PathBuf,
    child: Option<Child>,
}

fn server_command(bin: &Path, tool: &str) -> Command {
    if nix::unistd::geteuid().is_root() {
        let mut c = Command::new("setpriv");
        c.args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
        ])
        .arg(bin.join(tool));
        c
    } else {
        Command::new(bin.join(tool))
    }
}

fn chown_to_server(p: &Path) {
    if nix::unistd::geteuid().is_root() {
        std::os::unix::fs::chown(p, Some(NOBODY), Some(NOBODY)).unwrap();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl Postgres {
    /// A new cluster in `dir` (created), with role `postgres` (superuser), started.
    pub fn start_new(dir: &Path) -> Postgres {
        let bin = bin_dir().expect("PostgreSQL server binaries (Debian package postgresql)");
        std::fs::create_dir_all(dir).unwrap();
        // The server user must reach its files through the test's temp dirs.
        let mut p = dir.to_path_buf();
        while let Some(parent) = p.parent() {
            if parent == Path::new("/tmp") || parent == Path::new("/") {
                break;
            }
            let mode = std::fs::metadata(parent).unwrap().permissions().mode();
            if mode & 0o001 == 0 {
                let _ =
                    std::fs::set_permissions(parent, std::fs::Permissions::from_mode(mode | 0o711));
            }
            p = parent.to_path_buf();
        }
        chown_to_server(dir);
        let key = rcgen::KeyPair::generate().unwrap();
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        params
            .subject_alt_names
            .push(rcgen::SanType::IpAddress("127.0.0.1".parse().unwrap()));
        let cert = params.self_signed(&key).unwrap();
        let cert_path = dir.join("server.crt");
        let key_path = dir.join("server.key");
        std::fs::write(&cert_path, cert.pem()).unwrap();
        std::fs::write(&key_path, key.serialize_pem()).unwrap();
        std::fs::set_permissions(&key_path, std::fs::Permissions::from_mode(0o600)).unwrap();
        chown_to_server(&cert_path);
        chown_to_server(&key_path);
        let out = server_command(&bin, "initdb")
            .arg("-D")
            .arg(dir.join("data"))
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "--auth-host=scram-sha-256",
                "--locale=C",
                "-E",
                "UTF8",
                "--no-sync",
            ])
            .output()
            .expect("run initdb");
        assert!(
            out.status.success(),
            "initdb: {}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let mut pg = Postgres {
            dir: dir.to_path_buf(),
            port: free_port(),
            cert: cert_path,
            bin,
            child: None,
        };
        pg.start();
        pg
    }

    /// Starts the server (again) on the same port and waits until it answers.
    pub fn start(&mut self) {
        assert!(self.child.is_none(), "already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("server.log"))
            .unwrap();
        let child = server_command(&self.bin, "postgres")
            .arg("-D")
            .arg(self.dir.join("data"))
            .arg("-k")
            .arg(&self.dir)
            .arg("-p")
            .arg(self.port.to_string())
            .args(["-c", "listen_addresses=127.0.0.1", "-c", "ssl=on"])
            .arg("-c")
            .arg(format!("ssl_cert_file={}", self.cert.display()))
            .arg("-c")
            .arg(format!(
                "ssl_key_file={}",
                self.dir.join("server.key").display()
            ))
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let t0 = Instant::now();
        loop {
            let ok = Command::new(self.bin.join("pg_isready"))
                .arg("-h")
                .arg(&self.dir)
                .args(["-p", &self.port.to_string(), "-U", "postgres", "-q"])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                return;
            }
            if let Some(c) = &mut self.child {
                if let Ok(Some(st)) = c.try_wait() {
                    panic!("postgres exited: {st}\n{}", self.log());
                }
            }
            assert!(
                t0.elapsed() < WATCHDOG,
                "postgres never answered\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Fast shutdown (SIGINT to the postmaster, by its PID): clients are disconnected.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGINT,
            );
            let _ = c.wait();
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default()
    }

    /// Runs SQL as the superuser over the private socket; the rows, `|`-separated.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new("psql")
            .arg("-h")
            .arg(&self.dir)
            .args(["-p", &self.port.to_string(), "-U", "postgres", "-d", db])
            .args(["-v", "ON_ERROR_STOP=1", "-X", "-q", "-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "psql {sql}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// A database `db` owned by a new login role `user` with `password`.
    pub fn create_db(&self, db: &str, user: &str, password: &str) {
        self.psql(
            "postgres",
            &format!("CREATE ROLE {user} LOGIN PASSWORD '{password}'"),
        );
        self.psql("postgres", &format!("CREATE DATABASE {db} OWNER {user}"));
    }

    /// The URL a station uses: TCP, TLS required, no password.
    pub fn url(&self, user: &str, db: &str) -> String {
        format!(
            "postgresql://{user}@127.0.0.1:{}/{db}?sslmode=require",
            self.port
        )
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            // Immediate shutdown by PID; backends follow their postmaster.
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(c.id() as i32),
                nix::sys::signal::Signal::SIGQUIT,
            );
            let t0 = Instant::now();
            while !matches!(c.try_wait(), Ok(Some(_))) {
                if t0.elapsed() > Duration::from_secs(30) {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }
}
