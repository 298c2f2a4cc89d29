//! Board descriptors: what sbcflash knows about each single-board computer.
//!
//! - [`schema`]: the TOML schema (`boards/*.toml` boards, `boards/soc/*.toml` SoCs), version 1.
//! - [`registry`]: shipped descriptors embedded in the binary, user directories layered on top
//!   (a user file with the same id wins), lookup by id or alias with suggestions.
//! - [`parttable`]: a small MBR/GPT reader for the image checks.
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

pub mod error;
pub mod parttable;
pub mod registry;
pub mod schema;
mod spans;

pub use error::{BoardError, Location};
pub use registry::{Board, Origin, Registry, Soc};
pub use schema::*;
