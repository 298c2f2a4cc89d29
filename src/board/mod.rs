//! Board descriptors: what sbcflash knows about each single-board computer.
//!
//! - [`schema`]: the TOML schema (`boards/*.toml` boards, `boards/soc/*.toml` SoCs), version 1.
//! - [`registry`]: shipped descriptors embedded in the binary, user directories layered on top
//!   (a user file with the same id wins), lookup by id or alias with suggestions.
//! - [`parttable`]: a small MBR/GPT reader for the image checks.
//! - [`check`]: "will this image boot on this board from this medium?" from the image head.
//! - [`place`]: writing bootloader files outside the image at the SoC's offsets.
//!
//! Typical use by other modules:
//! ```no_run
//! # fn f() -> Result<(), sbcflash::board::BoardError> {
//! let reg = sbcflash::board::Registry::load(&[])?;
//! let b = reg.get("opi5")?;
//! let baud = b.console().baud;                      // console
//! let usb = b.usb_recovery();                       // usb: protocol, VID/PID, rc4
//! let prompts = b.uboot().map(|u| &u.prompts);      // console: U-Boot driver
//! let attr = b.handoff().flake_attr_for("myhost");  // acquire/handoff
//! # let _ = (baud, usb, prompts, attr); Ok(()) }
//! ```

pub mod check;
pub mod error;
pub mod parttable;
pub mod place;
pub mod registry;
pub(crate) mod schema;
mod spans;

pub use check::{check_image, Finding, ImageReport, Severity};
pub use error::{BoardError, Location};
pub use place::PlacedFile;
pub use registry::{Board, Origin, Registry, Soc};
pub use schema::*;
