//! One udev monitor socket: listen on some subsystems, wait with a timeout, drain the events.
//! The station's hotplug and the `--flash-via ums` disk watch both read device events this way.

use std::os::fd::AsRawFd;
use std::time::Duration;

/// Why a monitor could not be opened or waited on.
#[derive(Debug, thiserror::Error)]
pub(crate) enum MonitorError {
    #[error("systemd-udevd is not running (/run/udev/control missing)")]
    NoUdevd,
    #[error("udev monitor: {0}")]
    Io(#[from] std::io::Error),
}

/// A listening udev monitor socket.
pub(crate) struct Monitor {
    socket: udev::MonitorSocket,
}

impl Monitor {
    /// Listens on `subsystems`. Open before enumerating what is present, so nothing plugged
    /// in between is missed.
    pub(crate) fn open(subsystems: &[&str]) -> Result<Monitor, MonitorError> {
        if !std::path::Path::new("/run/udev/control").exists() {
            return Err(MonitorError::NoUdevd);
        }
        let mut b = udev::MonitorBuilder::new()?;
        for s in subsystems {
            b = b.match_subsystem(s)?;
        }
        Ok(Monitor {
            socket: b.listen()?,
        })
    }

    /// Waits up to `timeout` for events: `Ok(true)` when some are queued; a signal counts as
    /// a timeout (`Ok(false)`).
    pub(crate) fn wait(&self, timeout: Duration) -> std::io::Result<bool> {
        let mut pfd = libc::pollfd {
            fd: self.socket.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: one valid pollfd for the duration of the call.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(e);
        }
        Ok(n > 0)
    }

    /// The events queued now (never blocks).
    pub(crate) fn events(&self) -> impl Iterator<Item = udev::Event> + '_ {
        self.socket.iter()
    }
}
