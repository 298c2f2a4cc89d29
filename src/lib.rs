//! sbcflash: from a blank single-board computer to a NixOS that `nixos-rebuild` can manage.
//!
//! Data flows source → image → extents → sink → verify → console handoff; see `ARCHITECTURE.md`.
//! `main.rs` is a thin shell over [`cli`].

pub mod acquire;
pub mod board;
pub mod capture;
pub mod cardcheck;
pub mod cli;
pub mod config;
pub mod console;
pub mod exit;
pub mod image;
pub mod job;
pub mod progress;
pub mod station;
pub mod target;
pub mod trust;
pub mod tryboot;
pub mod uevent;
pub mod usb;
pub mod write;
