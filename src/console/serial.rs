//! The serial port: opened exclusively (TIOCEXCL + flock, serialport's default), 8N1, no flow
//! control; reopened with retries when a USB-serial adapter disappears and comes back (the
//! device node vanishes on unplug, and reads fail with EIO or return 0 bytes).

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_serial::{DataBits, FlowControl, Parity, SerialPortBuilderExt, StopBits};

use super::ConsoleError;

/// Anything byte-stream shaped the session can run over (a serial port, a pty in tests).
pub trait Duplex: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Duplex for T {}

/// Opens `path` at `baud`, 8N1, no flow control, exclusively.
pub(crate) fn open(path: &Path, baud: u32) -> Result<tokio_serial::SerialStream, ConsoleError> {
    tokio_serial::new(path.to_string_lossy(), baud)
        .data_bits(DataBits::Eight)
        .parity(Parity::None)
        .stop_bits(StopBits::One)
        .flow_control(FlowControl::None)
        .timeout(Duration::from_millis(100))
        .open_native_async()
        .map_err(|e| ConsoleError::Open {
            port: path.display().to_string(),
            source: std::io::Error::from(e),
        })
}

/// A link that survives the adapter being unplugged and replugged for up to `reopen_for`.
pub struct Link {
    inner: Option<Box<dyn Duplex>>,
    path: Option<PathBuf>,
    baud: u32,
    reopen_for: Duration,
    /// Human-readable notes (reopen attempts) for the executor to show.
    pub(crate) notes: Vec<String>,
}

impl Link {
    /// A real serial port.
    pub fn serial(path: &Path, baud: u32) -> Result<Link, ConsoleError> {
        let s = open(path, baud)?;
        Ok(Link {
            inner: Some(Box::new(s)),
            path: Some(path.to_path_buf()),
            baud,
            reopen_for: Duration::from_secs(10),
            notes: Vec::new(),
        })
    }

    /// Any stream (tests, sockets); never reopened.
    pub fn stream(s: Box<dyn Duplex>, baud: u32) -> Link {
        Link {
            inner: Some(s),
            path: None,
            baud,
            reopen_for: Duration::ZERO,
            notes: Vec::new(),
        }
    }

    pub(crate) fn set_reopen_for(&mut self, d: Duration) {
        self.reopen_for = d;
    }

    pub(crate) fn baud(&self) -> u32 {
        self.baud
    }

    pub(crate) fn name(&self) -> String {
        self.path
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "(stream)".into())
    }

    /// Reads what is available; on EOF/EIO tries to reopen the port.
    pub(crate) async fn read(&mut self, buf: &mut [u8]) -> Result<usize, ConsoleError> {
        loop {
            let r = match self.inner.as_mut() {
                Some(s) => s.read(buf).await,
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            };
            match r {
                Ok(n) if n > 0 => return Ok(n),
                Ok(_) => self.reopen("end of stream").await?,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::TimedOut => {}
                Err(e) => self.reopen(&e.to_string()).await?,
            }
        }
    }

    pub(crate) async fn write_all(&mut self, bytes: &[u8]) -> Result<(), ConsoleError> {
        loop {
            let r = match self.inner.as_mut() {
                Some(s) => match s.write_all(bytes).await {
                    Ok(()) => s.flush().await,
                    Err(e) => Err(e),
                },
                None => Err(std::io::Error::from(std::io::ErrorKind::NotConnected)),
            };
            match r {
                Ok(()) => return Ok(()),
                Err(e) => self.reopen(&e.to_string()).await?,
            }
        }
    }

    async fn reopen(&mut self, why: &str) -> Result<(), ConsoleError> {
        self.inner = None;
        let Some(path) = self.path.clone() else {
            return Err(ConsoleError::PortVanished {
                port: self.name(),
                waited: Duration::ZERO,
            });
        };
        self.notes.push(format!(
            "serial port {} lost ({why}); waiting up to {}s for it to come back",
            path.display(),
            self.reopen_for.as_secs()
        ));
        let start = tokio::time::Instant::now();
        while start.elapsed() < self.reopen_for {
            tokio::time::sleep(Duration::from_millis(250)).await;
            if !path.exists() {
                continue;
            }
            if let Ok(s) = open(&path, self.baud) {
                self.notes
                    .push(format!("serial port {} reopened", path.display()));
                self.inner = Some(Box::new(s));
                return Ok(());
            }
        }
        Err(ConsoleError::PortVanished {
            port: path.display().to_string(),
            waited: self.reopen_for,
        })
    }
}

/// A USB serial adapter as udev describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PortInfo {
    pub(crate) path: PathBuf,
    /// What the user recognises it by: the adapter's model/serial and USB port path.
    pub(crate) what: String,
}

impl std::fmt::Display for PortInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.what.is_empty() {
            write!(f, "{}", self.path.display())
        } else {
            write!(f, "{} ({})", self.path.display(), self.what)
        }
    }
}

/// USB serial adapters present now (udev: subsystem tty, `ID_BUS=usb`), sorted by node.
pub(crate) fn usb_port_list() -> Result<Vec<PortInfo>, ConsoleError> {
    let mut en = udev::Enumerator::new()?;
    en.match_subsystem("tty")?;
    en.match_property("ID_BUS", "usb")?;
    let mut v: Vec<PortInfo> = en
        .scan_devices()?
        .filter_map(|d| {
            let path = d.devnode()?.to_path_buf();
            let prop = |k: &str| {
                d.property_value(k)
                    .map(|x| x.to_string_lossy().replace('_', " "))
                    .filter(|x| !x.is_empty())
            };
            let mut what: Vec<String> = Vec::new();
            if let Some(s) = prop("ID_SERIAL").or_else(|| prop("ID_MODEL")) {
                what.push(s);
            }
            if let Some(p) = prop("ID_PATH") {
                what.push(format!("at {p}"));
            }
            Some(PortInfo {
                path,
                what: what.join(" "),
            })
        })
        .collect();
    v.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(v)
}

/// `--port` if given, else the single USB serial adapter present; several are an error
/// listing them (the CLI asks instead when it has a terminal).
pub(crate) fn pick_port(port: Option<&Path>) -> Result<PathBuf, ConsoleError> {
    if let Some(p) = port {
        return Ok(p.to_path_buf());
    }
    let ports = usb_port_list()?;
    match ports.len() {
        0 => Err(ConsoleError::NoPort),
        1 => Ok(ports[0].path.clone()),
        _ => Err(ConsoleError::SeveralPorts(
            ports.iter().map(|p| p.to_string()).collect(),
        )),
    }
}
