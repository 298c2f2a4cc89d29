//! Flashing boards over their USB recovery protocols.
//!
//! Layout: [`transport`] is the one seam to hardware (rusb, or a simulated device);
//! [`discovery`] finds devices by interface class and ID tables ([`ids`]). [`rockusb`] (Rockchip
//! maskrom + loader, loader files in [`rkloader`]) drives the `rockusb` crate's sans-IO
//! operations over the transport; [`usbboot`] (Raspberry Pi; it also reads the boot files),
//! [`fastboot`] and [`fel`] (Allwinner) are drivers that call the transport directly. All are
//! tested against the simulated devices through the same trait.
//! [`flash`] runs a whole `write --via` session; [`udev`] renders the shipped rules from the
//! same ID tables; `sim` holds the simulated devices the tests drive (only with the `sim`
//! feature, which the crate's own tests and examples turn on: not part of the library's API).

pub mod discovery;
pub mod fastboot;
pub mod fel;
pub mod flash;
pub(crate) mod ids;
pub mod rkloader;
pub mod rockusb;
#[cfg(feature = "sim")]
pub mod sim;
pub(crate) mod transport;
pub mod udev;
pub mod usbboot;

use crate::exit::{Classify, Exit};
pub use transport::{Transport, TransportError};

/// The install hint shown whenever a device exists but cannot be opened.
pub(crate) const UDEV_HINT: &str = "the udev rules are missing or not applied: install them with \
`sudo install -m 0644 udev-rules/70-sbcflash.rules /etc/udev/rules.d/ && sudo udevadm control \
--reload && sudo udevadm trigger`, then unplug and replug the board (or run as root)";

/// Errors of the USB layer. Each says what the user can do about it.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("USB transfer failed while {during}: {source}")]
    Transport {
        during: String,
        #[source]
        source: TransportError,
    },
    /// The cable dropped or the device failed in the middle of a transfer: say how far it got.
    #[error(
        "{what} failed after {done} of {total} bytes ({pct:.1}%): {source}; the target is incomplete and must not be booted",
        pct = if *total == 0 { 0.0 } else { *done as f64 * 100.0 / *total as f64 }
    )]
    Interrupted {
        what: String,
        done: u64,
        total: u64,
        #[source]
        source: Box<Error>,
    },
    #[error("device {device} exists but cannot be opened (permission denied): {hint}", hint = UDEV_HINT)]
    Permission { device: String },
    #[error("no USB device found: {0}")]
    NotFound(String),
    #[error("{0}")]
    WrongMode(String),
    #[error("{path}: {msg}")]
    BadLoader { path: String, msg: String },
    #[error("{0}")]
    Protocol(String),
    /// The device answered with an explicit failure (CSW status 1, fastboot FAIL, FEL status).
    #[error("device reported failure: {0}")]
    DeviceFailed(String),
    #[error("timed out after {secs} s waiting for {what}")]
    Timeout { what: String, secs: u64 },
    /// A wait was stopped by its caller (the station cancelled the unit).
    #[error("cancelled")]
    Cancelled,
    #[error("{0}")]
    TooLarge(String),
    #[error("read-back mismatch: {0}")]
    Verify(String),
    #[error("{0}")]
    Input(String),
    #[error(transparent)]
    Image(#[from] crate::image::ImageError),
    /// The writer pipeline failed (names the target and offset).
    #[error(transparent)]
    Write(#[from] crate::write::WriteError),
}

impl Error {
    pub(crate) fn transport(during: impl Into<String>, source: TransportError) -> Self {
        Error::Transport {
            during: during.into(),
            source,
        }
    }
}

impl Classify for Error {
    fn exit(&self) -> Exit {
        match self {
            Error::Transport { source, .. } => source.exit(),
            Error::DeviceFailed(_) | Error::Protocol(_) => Exit::Io,
            Error::Interrupted { source, .. } => match source.exit() {
                Exit::Timeout => Exit::Timeout,
                _ => Exit::Io,
            },
            Error::Permission { .. } => Exit::Environment,
            Error::NotFound(_) => Exit::Environment,
            Error::WrongMode(_) => Exit::Refused,
            Error::BadLoader { .. } | Error::Input(_) => Exit::BadInput,
            Error::Timeout { .. } => Exit::Timeout,
            Error::Cancelled => Exit::Interrupted,
            Error::TooLarge(_) => Exit::Refused,
            Error::Verify(_) => Exit::Verify,
            Error::Image(e) => e.exit(),
            Error::Write(e) => e.exit(),
        }
    }
}
