//! sbcflash: from a blank single-board computer to a NixOS that `nixos-rebuild` can manage.
//!
//! Data flows source → image → extents → sink → verify → console handoff; see `ARCHITECTURE.md`.
//! `main.rs` is a thin shell over [`cli`].

pub mod acquire;
pub mod board;
pub(crate) mod capture;
pub(crate) mod cardcheck;
pub mod cli;
pub mod config;
pub mod console;
pub mod exit;
pub mod image;
pub mod job;
pub mod progress;
pub mod station;
pub mod target;
pub(crate) mod trust;
pub(crate) mod tryboot;
pub(crate) mod uevent;
pub mod usb;
pub mod write;
