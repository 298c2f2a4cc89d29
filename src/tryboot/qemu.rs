//! One QEMU `virt` machine for `try`: the distribution's U-Boot (and OpenSBI on riscv64) as
//! firmware, the image behind a qcow2 copy-on-write overlay (the image file is only ever
//! opened read-only as the overlay's backing file), the serial console on a pty that the
//! console engine opens like a USB-serial adapter. Started paused; [`Qemu::resume`] lets the
//! CPUs run once the console is open, so not one byte of the boot is lost.
//!
//! The process is ours: it is stopped by its PID (the child handle) when the value drops.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use crate::board::schema::Arch;

use super::TryError;

/// Firmware files from Debian's `u-boot-qemu` and `opensbi` packages.
pub(crate) const UBOOT_AARCH64: &str = "/usr/lib/u-boot/qemu_arm64/u-boot.bin";
pub(crate) const UBOOT_RISCV64: &str = "/usr/lib/u-boot/qemu-riscv64_smode/u-boot.bin";
pub(crate) const OPENSBI_RISCV64: &str =
    "/usr/lib/riscv64-linux-gnu/opensbi/generic/fw_dynamic.bin";

/// How to start the machine.
#[derive(Debug, Clone)]
pub(crate) struct MachineSpec {
    pub(crate) arch: Arch,
    /// The raw image (read-only backing file of the overlay).
    pub(crate) image: PathBuf,
    pub(crate) mem_mib: u32,
    /// Extra QEMU arguments (`--qemu-arg`), appended as given.
    pub(crate) extra: Vec<String>,
}

/// A running (or paused) machine.
pub(crate) struct Qemu {
    child: Option<Child>,
    pub(crate) pty: PathBuf,
    qmp: PathBuf,
}

fn tool_err(tool: &str, e: impl std::fmt::Display) -> TryError {
    TryError::Tool {
        tool: tool.to_string(),
        msg: e.to_string(),
    }
}

/// The QEMU binary and firmware arguments for `arch`, each file checked to exist.
fn machine_args(arch: Arch) -> Result<(String, Vec<String>), TryError> {
    let need = |p: &str, pkg: &str| -> Result<String, TryError> {
        if Path::new(p).exists() {
            Ok(p.to_string())
        } else {
            Err(TryError::Tool {
                tool: p.to_string(),
                msg: format!("missing (apt-get install {pkg})"),
            })
        }
    };
    match arch {
        Arch::Aarch64 => Ok((
            "qemu-system-aarch64".into(),
            vec![
                "-M".into(),
                "virt".into(),
                "-cpu".into(),
                "cortex-a57".into(),
                "-bios".into(),
                need(UBOOT_AARCH64, "u-boot-qemu")?,
            ],
        )),
        Arch::Riscv64 => Ok((
            "qemu-system-riscv64".into(),
            vec![
                "-M".into(),
                "virt".into(),
                "-bios".into(),
                need(OPENSBI_RISCV64, "opensbi")?,
                "-kernel".into(),
                need(UBOOT_RISCV64, "u-boot-qemu")?,
            ],
        )),
        other => Err(TryError::Unsupported(format!(
            "no QEMU virt machine for {other} here (aarch64 and riscv64 only)"
        ))),
    }
}

impl Qemu {
    /// Creates the overlay in `dir` and starts QEMU paused.
    pub(crate) fn start(spec: &MachineSpec, dir: &Path) -> Result<Qemu, TryError> {
        let (bin, mut args) = machine_args(spec.arch)?;
        let image = std::fs::canonicalize(&spec.image).map_err(|e| TryError::Image {
            path: spec.image.display().to_string(),
            msg: e.to_string(),
        })?;
        let overlay = dir.join("overlay.qcow2");
        let out = Command::new("qemu-img")
            .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
            .arg(&image)
            .arg(&overlay)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| tool_err("qemu-img (qemu-utils)", e))?;
        if !out.status.success() {
            return Err(tool_err(
                "qemu-img create",
                String::from_utf8_lossy(&out.stderr).trim(),
            ));
        }
        let qmp = dir.join("qmp.sock");
        let serial_log = dir.join("serial.log");
        args.extend([
            "-m".into(),
            spec.mem_mib.to_string(),
            "-smp".into(),
            "1".into(),
            "-display".into(),
            "none".into(),
            "-monitor".into(),
            "none".into(),
            // No -no-reboot: QEMU would exit on a kernel's panic reboot and close the pty
            // before the panic line was read; a rebooting board is what the engine expects.
            "-S".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp.display()),
            "-chardev".into(),
            format!("pty,id=ser0,logfile={},logappend=off", serial_log.display()),
            "-serial".into(),
            "chardev:ser0".into(),
            "-drive".into(),
            format!("if=none,id=disk0,format=qcow2,file={}", overlay.display()),
            "-device".into(),
            "virtio-blk-pci,drive=disk0".into(),
            "-device".into(),
            "virtio-rng-pci".into(),
            // riscv64 U-Boot reads no serial input without a NIC (harness README, pitfall 16);
            // restrict=on: nothing leaves QEMU.
            "-netdev".into(),
            "user,id=net0,restrict=on".into(),
            "-device".into(),
            "virtio-net-pci,netdev=net0,romfile=".into(),
        ]);
        args.extend(spec.extra.iter().cloned());
        let mut cmd = Command::new(&bin);
        // QEMU must not outlive sbcflash (killed, Ctrl-C): the kernel kills it with us.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, || {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = cmd
            .args(&args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| {
                tool_err(
                    &bin,
                    format!("{e} (apt-get install qemu-system-arm / qemu-system-riscv)"),
                )
            })?;
        // QEMU names the pty on stdout (QEMU 10; stderr on older ones) before it runs.
        let (tx, rx) = std::sync::mpsc::channel::<String>();
        for r in [
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn Read + Send>),
        ]
        .into_iter()
        .flatten()
        {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for l in BufReader::new(r).lines().map_while(Result::ok) {
                    let _ = tx.send(l);
                }
            });
        }
        drop(tx);
        let mut q = Qemu {
            child: Some(child),
            pty: PathBuf::new(),
            qmp,
        };
        let mut said = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(l) => {
                    if let Some(p) = l
                        .split("char device redirected to ")
                        .nth(1)
                        .and_then(|r| r.split_whitespace().next())
                    {
                        q.pty = PathBuf::from(p);
                        break;
                    }
                    said.push(l);
                }
                Err(_) => {
                    return Err(tool_err(
                        &bin,
                        format!("did not start (no pty): {}", said.join(" / ")),
                    ))
                }
            }
        }
        Ok(q)
    }

    /// Lets the CPUs run. QEMU notices a pty's reader only about once a second and ignores
    /// input until then (harness README, pitfall 2): wait that long after the open first.
    pub(crate) fn resume(&self) -> Result<(), TryError> {
        std::thread::sleep(Duration::from_millis(1200));
        let mut s = UnixStream::connect(&self.qmp).map_err(|e| tool_err("QEMU QMP", e))?;
        s.set_read_timeout(Some(Duration::from_secs(10)))
            .map_err(|e| tool_err("QEMU QMP", e))?;
        let mut r = BufReader::new(s.try_clone().map_err(|e| tool_err("QEMU QMP", e))?);
        let mut line = String::new();
        r.read_line(&mut line)
            .map_err(|e| tool_err("QEMU QMP", e))?; // greeting
        for cmd in ["qmp_capabilities", "cont"] {
            writeln!(s, "{{\"execute\":\"{cmd}\"}}").map_err(|e| tool_err("QEMU QMP", e))?;
            loop {
                line.clear();
                r.read_line(&mut line)
                    .map_err(|e| tool_err("QEMU QMP", e))?;
                if line.is_empty() {
                    return Err(tool_err("QEMU QMP", "connection closed"));
                }
                if line.contains("\"error\"") {
                    return Err(tool_err("QEMU QMP", line.trim()));
                }
                if line.contains("\"return\"") {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Stops QEMU (by its PID) and waits for it.
    pub(crate) fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        self.stop();
    }
}
