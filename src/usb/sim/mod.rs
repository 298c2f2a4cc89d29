//! Simulated recovery-mode devices: the DEVICE side of each protocol, byte for byte, behind the
//! same [`Transport`] trait the real rusb code uses.
//!
//! There is no USB bus in CI, so these are how every protocol is exercised end to end. Each
//! device parses what the host sends with its own decoder (not the host's encoder), keeps the
//! state a real board would (maskrom areas, flash contents, served files, FEL memory), leaves
//! and re-joins the bus the way boards do between stages, and can be told to misbehave:
//! stall, time out, vanish mid-transfer, fail a CSW, or return a short read.

pub mod fastboot;
pub mod fel;
pub mod rockusb;
pub mod usbboot;

use super::discovery::{classify, Bus, Descriptor, Found};
use super::{Error, Transport, TransportError};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// What goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultKind {
    /// The endpoint halts: this transfer fails with a stall.
    Stall,
    /// The device does not answer this transfer.
    Timeout,
    /// The device leaves the bus for good (cable pulled, power lost).
    Vanish,
    /// The next command status reports failure (rockusb CSW status 1, fastboot FAIL, FEL
    /// status error).
    FailStatus,
    /// The device sends half of what was asked for.
    ShortRead,
}

/// When it goes wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Trigger {
    /// On the n-th transfer (0-based) this device sees.
    Transfer(usize),
    /// On the first bulk OUT after this many bulk OUT bytes were accepted.
    AfterBulkOut(u64),
    /// On the first bulk IN after this many bulk IN bytes were sent.
    AfterBulkIn(u64),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    pub at: Trigger,
    pub kind: FaultKind,
}

/// Transfer kinds, for trigger matching.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Xfer {
    ControlOut,
    ControlIn,
    BulkOut,
    BulkIn,
}

/// Per-device fault schedule and transfer counters.
#[derive(Debug, Default)]
pub struct Faults {
    pending: Vec<Fault>,
    transfers: usize,
    bulk_out: u64,
    bulk_in: u64,
    /// Faults that fired, in order (tests assert on them).
    pub fired: Vec<FaultKind>,
}

impl Faults {
    pub fn add(&mut self, f: Fault) {
        self.pending.push(f);
    }

    /// Called at the start of every transfer; returns the fault to apply, if one is due.
    pub fn check(&mut self, x: Xfer) -> Option<FaultKind> {
        let n = self.transfers;
        self.transfers += 1;
        let due = self.pending.iter().position(|f| match f.at {
            Trigger::Transfer(k) => k == n,
            Trigger::AfterBulkOut(b) => x == Xfer::BulkOut && self.bulk_out >= b,
            Trigger::AfterBulkIn(b) => x == Xfer::BulkIn && self.bulk_in >= b,
        })?;
        let f = self.pending.remove(due);
        self.fired.push(f.kind);
        Some(f.kind)
    }

    /// Account `n` bytes moved by transfer kind `x` (for the byte-count triggers).
    pub fn count(&mut self, x: Xfer, n: usize) {
        match x {
            Xfer::BulkOut => self.bulk_out += n as u64,
            Xfer::BulkIn => self.bulk_in += n as u64,
            _ => {}
        }
    }
}

/// The device side of one simulated board. Transfers come in already past fault handling.
pub trait SimDevice: Send {
    /// The descriptor the board shows now; `None` while it is off the bus.
    fn descriptor(&self) -> Option<Descriptor>;
    /// Bumped on every re-enumeration; handles opened before it see the device as gone.
    fn generation(&self) -> u32;
    fn faults(&mut self) -> &mut Faults;
    /// Take the board off the bus for good.
    fn vanish(&mut self);
    /// Make the next status report a failure.
    fn fail_next_status(&mut self);
    /// Bulk-only protocols (fastboot, FEL) stall every control request, as real devices do.
    fn control_out(
        &mut self,
        _rt: u8,
        _req: u8,
        _value: u16,
        _index: u16,
        _data: &[u8],
    ) -> Result<usize, TransportError> {
        Err(TransportError::Stall)
    }
    fn control_in(
        &mut self,
        _rt: u8,
        _req: u8,
        _value: u16,
        _index: u16,
        _buf: &mut [u8],
    ) -> Result<usize, TransportError> {
        Err(TransportError::Stall)
    }
    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError>;
    fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransportError>;

    // On a real bus (the usb-lab device program, FunctionFS) the device cannot wait to be
    // asked: it must size each bulk OUT read so it never waits for bytes the host will not
    // send, and push each IN reply when it has one. These two say what the protocol state
    // expects now; in-process tests never need them.

    /// The most bytes the next bulk OUT may carry; 0 while the device expects none.
    fn wire_out_len(&self) -> usize {
        0
    }
    /// The length of the bulk IN reply the device has ready, if any.
    fn wire_in_len(&self) -> Option<usize> {
        None
    }
    /// A message's bulk OUT data is still due. A control request arriving now comes from a host
    /// that has sent it (its transfers are sequential) before the program handed it over: the
    /// program lets the bulk data in first.
    fn bulk_due(&self) -> bool {
        false
    }
}

/// A simulated board shared between the bus and the handles opened on it.
pub(crate) type Shared<D> = Arc<Mutex<D>>;

pub fn lock<D: ?Sized>(d: &Mutex<D>) -> MutexGuard<'_, D> {
    d.lock().unwrap_or_else(|p| p.into_inner())
}

/// An open handle: applies faults, then hands the transfer to the device.
pub struct SimHandle {
    dev: Arc<Mutex<dyn SimDevice>>,
    generation: u32,
}

impl SimHandle {
    pub fn new(dev: Arc<Mutex<dyn SimDevice>>) -> Self {
        let generation = lock(&dev).generation();
        Self { dev, generation }
    }

    fn with(
        &mut self,
        x: Xfer,
        f: impl FnOnce(&mut dyn SimDevice) -> Result<usize, TransportError>,
    ) -> Result<usize, TransportError> {
        let mut d = lock(&self.dev);
        if d.descriptor().is_none() || d.generation() != self.generation {
            return Err(TransportError::Gone);
        }
        let mut short = false;
        match d.faults().check(x) {
            Some(FaultKind::Stall) => return Err(TransportError::Stall),
            Some(FaultKind::Timeout) => return Err(TransportError::Timeout),
            Some(FaultKind::Vanish) => {
                d.vanish();
                return Err(TransportError::Gone);
            }
            Some(FaultKind::FailStatus) => d.fail_next_status(),
            Some(FaultKind::ShortRead) => short = true,
            None => {}
        }
        let mut n = f(&mut *d)?;
        if short && matches!(x, Xfer::BulkIn | Xfer::ControlIn) {
            n /= 2;
        }
        d.faults().count(x, n);
        Ok(n)
    }
}

impl Transport for SimHandle {
    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
        _timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.with(Xfer::ControlOut, |d| {
            d.control_out(rt, req, value, index, data)
        })
    }
    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
        _timeout: Duration,
    ) -> Result<usize, TransportError> {
        self.with(Xfer::ControlIn, |d| {
            d.control_in(rt, req, value, index, buf)
        })
    }
    fn bulk_out(&mut self, data: &[u8], _timeout: Duration) -> Result<usize, TransportError> {
        self.with(Xfer::BulkOut, |d| d.bulk_out(data))
    }
    fn bulk_in(&mut self, buf: &mut [u8], _timeout: Duration) -> Result<usize, TransportError> {
        self.with(Xfer::BulkIn, |d| d.bulk_in(buf))
    }
}

/// A bus holding simulated boards.
#[derive(Default, Clone)]
pub struct SimBus {
    devices: Vec<Arc<Mutex<dyn SimDevice>>>,
    /// Block devices that appear when a board on a port path becomes mass storage.
    blocks: Vec<(String, PathBuf)>,
}

impl SimBus {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn attach<D: SimDevice + 'static>(&mut self, d: Shared<D>) {
        self.devices.push(d);
    }
    /// Declare that the mass-storage gadget on `port_path` shows up as `dev` (a loop device in
    /// tests).
    pub fn map_block(&mut self, port_path: &str, dev: PathBuf) {
        self.blocks.push((port_path.to_string(), dev));
    }
}

impl Bus for SimBus {
    fn list(&self) -> Result<Vec<Found>, Error> {
        let mut v: Vec<Found> = self
            .devices
            .iter()
            .filter_map(|d| lock(d).descriptor())
            .filter_map(|d| classify(&d))
            .collect();
        v.sort_by(|a, b| a.port_path.cmp(&b.port_path));
        Ok(v)
    }

    fn open(&self, f: &Found) -> Result<Box<dyn Transport>, Error> {
        for d in &self.devices {
            let desc = lock(d).descriptor();
            if let Some(desc) = desc {
                if desc.bus == f.bus && desc.address == f.address {
                    return Ok(Box::new(SimHandle::new(d.clone())));
                }
            }
        }
        Err(Error::NotFound(format!("{} at {}", f.id(), f.port_path)))
    }

    fn block_device(&self, port_path: &str) -> Option<PathBuf> {
        let on_bus = self.list().ok()?.into_iter().any(|f| {
            f.port_path == port_path && f.protocol == super::discovery::Protocol::MassStorage
        });
        if !on_bus {
            return None;
        }
        self.blocks
            .iter()
            .find(|(p, _)| p == port_path)
            .map(|(_, d)| d.clone())
    }
}

/// Deterministic non-zero filler for simulated flash, so a test notices ranges that were never
/// written (an all-zero initial flash would hide skipped zero ranges).
pub fn garbage(len: usize, seed: u32) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            (x >> 24) as u8 | 1
        })
        .collect()
}
