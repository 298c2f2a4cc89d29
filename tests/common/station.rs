//! The factory station as a child process, for `tests/station.rs` and `tests/station_pg.rs`:
//! `sbcflash station --json` with its events on a channel (each line checked against
//! docs/json.md), a blkio throttle to hold a job mid-write, and the small predicates both use.

use serde_json::Value;
use std::io::{BufRead, Read, Seek, SeekFrom};
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// Serialises the tests of one binary that start udevd (the udev event stream is machine-wide);
/// nextest runs them one at a time anyway.
static UDEVD_TESTS: Mutex<()> = Mutex::new(());

/// Holds [`UDEVD_TESTS`] for the life of a test; a test that panicked does not poison it.
pub fn udevd_serial() -> MutexGuard<'static, ()> {
    UDEVD_TESTS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Debian's udevd is not on PATH: it is looked for where the package puts it.
pub fn udevd_present() -> bool {
    Path::new("/lib/systemd/systemd-udevd").exists()
}

/// A name no other test of this run (or another process) uses, for files and cgroups.
pub fn unique(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// How to start a [`Station`]: its cache lives in `dir`, its stderr goes to a file there.
pub struct StationCmd<'a> {
    dir: &'a Path,
    config: &'a Path,
    name: String,
    env: Vec<(&'a str, &'a str)>,
    watchdog: Duration,
}

impl<'a> StationCmd<'a> {
    pub fn new(dir: &'a Path, config: &'a Path) -> StationCmd<'a> {
        StationCmd {
            dir,
            config,
            name: String::new(),
            env: Vec::new(),
            watchdog: Duration::from_secs(300),
        }
    }

    /// Named in failure messages, for tests that run several stations.
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    pub fn env(mut self, key: &'a str, value: &'a str) -> Self {
        self.env.push((key, value));
        self
    }

    /// A watchdog against a hung station, not a performance threshold.
    pub fn watchdog(mut self, watchdog: Duration) -> Self {
        self.watchdog = watchdog;
        self
    }

    pub fn spawn(self, args: &[&str]) -> Station {
        let stderr = self.dir.join(format!("{}.stderr", unique("station")));
        let mut child = super::sbcflash()
            .env("SBCFLASH_CACHE_DIR", self.dir.join("cache"))
            .envs(self.env.iter().copied())
            .args(["station", "--json", "--config"])
            .arg(self.config)
            .args(args)
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("spawn station");
        let out = child.stdout.take().unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let off_schema = Arc::new(Mutex::new(Vec::new()));
        let off = off_schema.clone();
        std::thread::spawn(move || {
            let rows = super::json::schema_rows();
            for line in std::io::BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if let Err(e) = super::json::match_row(&rows, &line) {
                    off.lock().unwrap().push(e);
                }
                match serde_json::from_str::<Value>(&line) {
                    Ok(v) => {
                        if tx.send(v).is_err() {
                            break;
                        }
                    }
                    Err(e) => panic!("station printed a non-JSON line {line:?}: {e}"),
                }
            }
        });
        Station {
            name: self.name,
            child,
            events: rx,
            seen: Vec::new(),
            stderr,
            off_schema,
            watchdog: self.watchdog,
        }
    }
}

/// A running `sbcflash station --json`; its events arrive on a channel. Killed by PID on drop.
pub struct Station {
    name: String,
    child: Child,
    events: crossbeam_channel::Receiver<Value>,
    /// Every event received so far, in order.
    pub seen: Vec<Value>,
    stderr: PathBuf,
    /// Lines off the documented --json schema (checked when the station is dropped).
    off_schema: Arc<Mutex<Vec<String>>>,
    watchdog: Duration,
}

impl Station {
    /// `sbcflash station --json --config CONFIG ARGS`, cache in `dir`, default watchdog.
    pub fn spawn(dir: &Path, config: &Path, args: &[&str]) -> Station {
        StationCmd::new(dir, config).spawn(args)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// Waits for an event matching `pred` (or one already seen).
    pub fn wait_for(&mut self, what: &str, pred: impl Fn(&Value) -> bool) -> Value {
        if let Some(v) = self.seen.iter().find(|v| pred(v)) {
            return v.clone();
        }
        loop {
            match self.events.recv_timeout(self.watchdog) {
                Ok(v) => {
                    self.seen.push(v.clone());
                    if pred(&v) {
                        return v;
                    }
                }
                Err(_) => panic!(
                    "station {}: no event {what}; events so far:\n{}\nstderr:\n{}",
                    self.name,
                    self.dump(),
                    self.stderr()
                ),
            }
        }
    }

    /// The events seen so far but progress, one a line (for failure messages).
    pub fn dump(&self) -> String {
        self.seen
            .iter()
            .filter(|v| v["event"] != "progress")
            .map(|v| v.to_string())
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.child.id() as i32), sig);
    }

    /// Waits for the station to end (SIGKILL after the watchdog) and drains what it printed.
    pub fn wait_exit(&mut self) -> ExitStatus {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let (tx, rx) = crossbeam_channel::bounded(1);
        let watchdog = self.watchdog;
        std::thread::spawn(move || {
            if rx.recv_timeout(watchdog).is_err() {
                let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGKILL);
            }
        });
        let st = self.child.wait().expect("wait station");
        let _ = tx.send(());
        while let Ok(v) = self.events.recv_timeout(Duration::from_secs(5)) {
            self.seen.push(v);
        }
        st
    }

    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Station {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        let off = std::mem::take(&mut *self.off_schema.lock().unwrap());
        if !std::thread::panicking() {
            assert!(
                off.is_empty(),
                "station --json off its schema:\n{}",
                off.join("\n")
            );
        }
    }
}

/// A `message` event of `job` whose text contains `needle`.
pub fn is_msg(v: &Value, job: &str, needle: &str) -> bool {
    v["event"] == "message"
        && v["job"] == job
        && v["text"].as_str().is_some_and(|t| t.contains(needle))
}

/// A `start` event of `job` for `phase`.
pub fn is_start(v: &Value, job: &str, phase: &str) -> bool {
    v["event"] == "start" && v["job"] == job && v["phase"] == phase
}

/// Writes `dir/station.toml`: `head` (the settings and `[identity]`), then one slot per
/// `(name, backing file)` matching the loop device of that file; returns its path.
pub fn write_loop_config(dir: &Path, head: &str, slots: &[(&str, &Path)]) -> PathBuf {
    let mut t = head.to_string();
    for (name, backing) in slots {
        t.push_str(&format!(
            "[[slot]]\nname = \"{name}\"\nmatch = {{ \"attr:loop/backing_file\" = \"{}\" }}\n",
            backing.display()
        ));
    }
    let p = dir.join("station.toml");
    std::fs::write(&p, t).unwrap();
    p
}

/// A sparse file of `size` in `dir`: the backing file of a card's loop device.
pub fn backing(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).unwrap();
    f.set_len(size).unwrap();
    p
}

pub fn read_range(p: &Path, off: u64, len: u64) -> Vec<u8> {
    let mut f = std::fs::File::open(p).unwrap();
    f.seek(SeekFrom::Start(off)).unwrap();
    let mut v = vec![0u8; len as usize];
    f.read_exact(&mut v).unwrap();
    v
}

/// A blkio cgroup that throttles writes to chosen devices for the processes put in it, so a
/// job is reliably still writing when the test acts (cgroup v1 blkio, or v2 io.max).
/// Removed (by its path) on drop.
pub struct Throttle {
    dir: PathBuf,
    v2: bool,
}

impl Throttle {
    /// A new cgroup named `prefix` and a suffix unique to this test.
    pub fn new(prefix: &str) -> Throttle {
        let name = unique(prefix);
        let v1 = Path::new("/sys/fs/cgroup/blkio");
        if v1.join("blkio.throttle.write_bps_device").exists() {
            let dir = v1.join(name);
            std::fs::create_dir_all(&dir).expect("create blkio cgroup");
            return Throttle { dir, v2: false };
        }
        let root = Path::new("/sys/fs/cgroup");
        let ctl = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
        assert!(
            ctl.split_whitespace().any(|c| c == "io"),
            "neither cgroup v1 blkio nor the v2 io controller is available for throttling"
        );
        let _ = std::fs::write(root.join("cgroup.subtree_control"), "+io");
        let dir = root.join(name);
        std::fs::create_dir_all(&dir).expect("create io cgroup");
        Throttle { dir, v2: true }
    }

    pub fn limit_writes(&self, dev: &Path, bytes_per_sec: u64) {
        let rdev = std::fs::metadata(dev).unwrap().rdev();
        let (maj, min) = (libc::major(rdev), libc::minor(rdev));
        let (file, line) = if self.v2 {
            ("io.max", format!("{maj}:{min} wbps={bytes_per_sec}"))
        } else {
            (
                "blkio.throttle.write_bps_device",
                format!("{maj}:{min} {bytes_per_sec}"),
            )
        };
        std::fs::write(self.dir.join(file), line).unwrap();
    }

    pub fn add(&self, pid: u32) {
        std::fs::write(self.dir.join("cgroup.procs"), pid.to_string()).unwrap();
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        eprintln!("warning: could not remove cgroup {}", self.dir.display());
    }
}
