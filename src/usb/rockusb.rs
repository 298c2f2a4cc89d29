//! Rockchip maskrom download and rockusb loader-mode LBA access.
//!
//! The protocol logic is the `rockusb` crate's sans-IO operations (maskrom `write_area` with
//! its CRC-16 and 4094/4095-byte rules, CBW/CSW framing, LBA read/write, storage switch,
//! reset); this module only executes their steps on our [`Transport`] and adds what the crate
//! leaves to callers: loader mode probing, clear errors, an extent sink that skips unmapped
//! ranges, read-back verification. The crate's own libusb transport is not used because it
//! picks the first interface with a bulk pair instead of the rockusb class, and has fixed 5 s
//! timeouts.

use super::rkloader::Loader;
use super::{Error, Transport, TransportError};
use crate::exit::{Classify, Exit};
use crate::write::{Sink, WriteError};
use rockusb::operation::{self, OperationSteps, UsbOperationError, UsbStep};
pub use rockusb::protocol::StorageIndex;
use std::time::Duration;

pub(crate) const SECTOR: u64 = 512;
/// Default sectors per WRITE_LBA/READ_LBA (64 KiB, rkdeveloptool's DEFAULT_RW_LBA).
pub(crate) const DEFAULT_SECTORS_PER_COMMAND: u16 = 128;

/// Timeouts for one session. Erases and large LBA writes on slow eMMC need long ones.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub control: Duration,
    pub bulk: Duration,
    /// For the mode probe: short, because a maskrom ROM may simply never answer.
    pub probe: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            control: Duration::from_secs(5),
            bulk: Duration::from_secs(20),
            probe: Duration::from_secs(1),
        }
    }
}

/// Execute one `rockusb` operation on a transport.
pub(crate) fn run<T: std::fmt::Debug>(
    t: &mut dyn Transport,
    op: &mut dyn OperationSteps<T>,
    during: &str,
    timeout: Duration,
) -> Result<T, Error> {
    loop {
        match op.step() {
            UsbStep::WriteControl {
                request_type,
                request,
                value,
                index,
                data,
            } => {
                let n = t
                    .control_out(request_type, request, value, index, data, timeout)
                    .map_err(|e| Error::transport(during, e))?;
                if n != data.len() {
                    return Err(Error::Protocol(format!(
                        "short control write while {during}: {n} of {} bytes",
                        data.len()
                    )));
                }
            }
            UsbStep::WriteBulk { data } => {
                let n = t
                    .bulk_out(data, timeout)
                    .map_err(|e| Error::transport(during, e))?;
                if n != data.len() {
                    return Err(Error::Protocol(format!(
                        "short bulk write while {during}: {n} of {} bytes",
                        data.len()
                    )));
                }
            }
            UsbStep::ReadBulk { data } => {
                let want = data.len();
                let n = t
                    .bulk_in(data, timeout)
                    .map_err(|e| Error::transport(during, e))?;
                if n != want {
                    return Err(Error::Protocol(format!(
                        "short read while {during}: device sent {n} of {want} bytes"
                    )));
                }
            }
            UsbStep::Finished(r) => {
                return r.map_err(|e| match e {
                    UsbOperationError::FailedStatus => {
                        Error::DeviceFailed(format!("CSW status FAILED while {during}"))
                    }
                    other => Error::Protocol(format!("{other} while {during}")),
                });
            }
        }
    }
}

/// Download a loader to a board in maskrom: every 0x471 entry, then every 0x472 entry, each
/// followed by the delay its file asks for. After the last 0x472 the board leaves the bus and
/// comes back in loader mode (the caller waits for that).
pub fn download_loader(
    t: &mut dyn Transport,
    loader: &Loader,
    timeouts: &Timeouts,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<(), Error> {
    let total: u64 = loader.entries.iter().map(|e| e.data.len() as u64).sum();
    let mut done = 0u64;
    for (i, e) in loader.entries.iter().enumerate() {
        let during = format!(
            "downloading loader entry {} '{}' to area {:#x}",
            i, e.name, e.area as u16
        );
        let mut op = operation::write_area(e.area as u16, &e.data);
        match run(&mut *t, &mut op, &during, timeouts.control) {
            Ok(()) => {}
            Err(Error::Transport {
                source: TransportError::Stall,
                ..
            }) if i == 0 => return Err(Error::WrongMode(
                "the board rejected the maskrom download (control request stalled): it is most \
                     likely already in loader mode, where 0x471/0x472 downloads are refused; use \
                     `--via usb` to write with the running loader, or reset the board into maskrom \
                     (hold the maskrom/recovery key while powering on)"
                    .into(),
            )),
            Err(err) if done > 0 => {
                return Err(Error::Interrupted {
                    what: "loader download".into(),
                    done,
                    total,
                    source: Box::new(err),
                })
            }
            Err(err) => return Err(err),
        }
        done += e.data.len() as u64;
        progress(done, total);
        if e.delay_ms > 0 {
            std::thread::sleep(Duration::from_millis(e.delay_ms.min(10_000) as u64));
        }
    }
    Ok(())
}

/// Is a rockusb device really running a loader? A harmless READ_CHIP_INFO answers that: the
/// maskrom ROM stalls or ignores bulk commands (rkdeveloptool#69), whatever bcdUSB claims.
pub(crate) fn probe_loader(t: &mut dyn Transport, timeouts: &Timeouts) -> bool {
    let mut op = operation::chip_info();
    run(t, &mut op, "probing for a loader", timeouts.probe).is_ok()
}

/// A board running a rockusb loader.
pub struct LoaderSession<'t> {
    t: &'t mut dyn Transport,
    pub(crate) timeouts: Timeouts,
    /// Storage size in bytes, when the loader reports it (mainline U-Boot's rockusb does not).
    pub capacity: Option<u64>,
    pub chip: Option<String>,
}

impl<'t> LoaderSession<'t> {
    /// Confirm loader mode and read what the loader tells about itself.
    pub fn open(t: &'t mut dyn Transport, timeouts: Timeouts) -> Result<Self, Error> {
        let mut op = operation::chip_info();
        let chip = match run(&mut *t, &mut op, "reading chip info", timeouts.probe) {
            Ok(c) => chip_name(c.inner()),
            Err(Error::Transport {
                source: TransportError::Stall | TransportError::Timeout,
                ..
            }) => {
                return Err(Error::WrongMode(
                    "the board does not answer rockusb commands: it is in maskrom, which only \
                     accepts a loader download; use `--via maskrom` (with the board's loader or \
                     --loader FILE) so sbcflash downloads one first"
                        .into(),
                ))
            }
            Err(e) => return Err(e),
        };
        let mut s = Self {
            t,
            timeouts,
            capacity: None,
            chip,
        };
        s.refresh_capacity()?;
        Ok(s)
    }

    fn refresh_capacity(&mut self) -> Result<(), Error> {
        let mut op = operation::flash_info();
        self.capacity = match run(
            &mut *self.t,
            &mut op,
            "reading flash info",
            self.timeouts.bulk,
        ) {
            Ok(info) => Some(info.size()),
            // Mainline U-Boot's rockusb answers FAIL: size unknown, not fatal.
            Err(Error::DeviceFailed(_)) => None,
            Err(e) => return Err(e),
        };
        Ok(())
    }

    /// Select the storage the LBA commands address, and check that the loader really switched
    /// (it reports no error when the medium is absent).
    pub(crate) fn select_storage(&mut self, want: StorageIndex) -> Result<(), Error> {
        let mut op = operation::switch_storage(want);
        run(
            &mut *self.t,
            &mut op,
            "switching storage",
            self.timeouts.bulk,
        )?;
        let mut op = operation::storage();
        let now = run(
            &mut *self.t,
            &mut op,
            "reading current storage",
            self.timeouts.bulk,
        )?;
        if now != want {
            return Err(Error::DeviceFailed(format!(
                "the loader did not switch to storage '{want}' (it reports '{now}'): the medium is \
                 absent or this loader does not support it"
            )));
        }
        self.refresh_capacity()
    }

    pub fn write_lba(&mut self, lba: u32, data: &[u8]) -> Result<(), Error> {
        let mut op = operation::write_lba(lba, data);
        let done: u32 = run(
            &mut *self.t,
            &mut op,
            &format!("writing LBA {lba}"),
            self.timeouts.bulk,
        )?
        .into();
        if done as usize != data.len() {
            return Err(Error::Protocol(format!(
                "WRITE_LBA at {lba}: device took {done} of {} bytes",
                data.len()
            )));
        }
        Ok(())
    }

    pub(crate) fn read_lba(&mut self, lba: u32, buf: &mut [u8]) -> Result<(), Error> {
        let want = buf.len();
        let mut op = operation::read_lba(lba, buf);
        let done: u32 = run(
            &mut *self.t,
            &mut op,
            &format!("reading LBA {lba}"),
            self.timeouts.bulk,
        )?
        .into();
        if done as usize != want {
            return Err(Error::Protocol(format!(
                "READ_LBA at {lba}: device returned {done} of {want} bytes"
            )));
        }
        Ok(())
    }

    /// Reset the board so it boots what was written.
    pub(crate) fn reset(&mut self) -> Result<(), Error> {
        let mut op = operation::reset_device(rockusb::protocol::ResetOpcode::Reset);
        run(
            &mut *self.t,
            &mut op,
            "resetting the board",
            self.timeouts.bulk,
        )
    }
}

/// READ_CHIP_INFO holds 32-bit words byte-reversed ("8853" → "3588").
fn chip_name(raw: &[u8]) -> Option<String> {
    let fixed: Vec<u8> = raw
        .chunks(4)
        .flat_map(|w| w.iter().rev().copied())
        .collect();
    let s: String = fixed
        .iter()
        .take_while(|b| b.is_ascii_graphic())
        .map(|&b| b as char)
        .collect();
    (!s.is_empty()).then_some(s)
}

/// The writer pipeline's [`Sink`] over a rockusb loader: the same extent stream, hashing,
/// held-back partition table and read-back verification as a block device, with WRITE_LBA and
/// READ_LBA underneath. Unaligned edges are read-modify-written a sector at a time. `Zero`
/// ranges are written as zeroes: over rockusb nothing says what an erased medium reads back.
pub(crate) struct RockusbSink {
    t: Box<dyn Transport>,
    name: String,
    pub(crate) timeouts: Timeouts,
    pub(crate) sectors_per_command: u16,
    capacity: Option<u64>,
    zero: Vec<u8>,
}

impl RockusbSink {
    /// Open a loader session on `t` (confirming loader mode), select `storage` if given.
    pub(crate) fn open(
        mut t: Box<dyn Transport>,
        name: impl Into<String>,
        timeouts: Timeouts,
        storage: Option<StorageIndex>,
    ) -> Result<Self, Error> {
        let capacity = {
            let mut s = LoaderSession::open(&mut *t, timeouts)?;
            if let Some(st) = storage {
                s.select_storage(st)?;
            }
            s.capacity
        };
        Ok(Self {
            t,
            name: name.into(),
            timeouts,
            sectors_per_command: DEFAULT_SECTORS_PER_COMMAND,
            capacity,
            zero: Vec::new(),
        })
    }

    fn session(&mut self) -> LoaderSession<'_> {
        LoaderSession {
            t: &mut *self.t,
            timeouts: self.timeouts,
            capacity: self.capacity,
            chip: None,
        }
    }

    /// Reset the board (after verification) so it boots what was written.
    pub(crate) fn reset(&mut self) -> Result<(), Error> {
        self.session().reset()
    }

    fn err(&self, op: &'static str, offset: u64, len: u64, e: Error) -> WriteError {
        // The pipeline only carries io::Error; keep a USB timeout's class in its kind so the
        // CLI still exits with the timeout code, not the generic I/O one.
        let kind = match e.exit() {
            Exit::Timeout => std::io::ErrorKind::TimedOut,
            _ => std::io::ErrorKind::Other,
        };
        WriteError::Io {
            target: self.name.clone(),
            op,
            offset,
            len,
            source: std::io::Error::new(kind, e),
        }
    }

    fn check_end(&self, offset: u64, len: u64) -> Result<(), WriteError> {
        match self.capacity {
            Some(cap) if offset + len > cap => Err(WriteError::TooLarge {
                target: self.name.clone(),
                end: offset + len,
                capacity: cap,
            }),
            _ => Ok(()),
        }
    }

    fn lba(&self, offset: u64) -> Result<u32, WriteError> {
        u32::try_from(offset / SECTOR).map_err(|_| WriteError::TooLarge {
            target: self.name.clone(),
            end: offset,
            capacity: u32::MAX as u64 * SECTOR,
        })
    }

    /// Write sector-aligned `data` at sector-aligned `offset`, in command-sized pieces.
    fn write_aligned(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        let max = self.sectors_per_command.max(1) as usize * SECTOR as usize;
        let mut off = offset;
        for chunk in data.chunks(max) {
            let lba = self.lba(off)?;
            self.session()
                .write_lba(lba, chunk)
                .map_err(|e| self.err("WRITE_LBA", off, chunk.len() as u64, e))?;
            off += chunk.len() as u64;
        }
        Ok(())
    }

    fn read_aligned(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        let max = self.sectors_per_command.max(1) as usize * SECTOR as usize;
        let mut off = offset;
        for chunk in buf.chunks_mut(max) {
            let lba = self.lba(off)?;
            let n = chunk.len() as u64;
            self.session()
                .read_lba(lba, chunk)
                .map_err(|e| self.err("READ_LBA", off, n, e))?;
            off += n;
        }
        Ok(())
    }

    /// Any `(offset, data)`: whole sectors directly, partial edge sectors read-modify-write.
    fn write_any(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.check_end(offset, data.len() as u64)?;
        let mut off = offset;
        let mut rest = data;
        while !rest.is_empty() {
            let in_sector = (off % SECTOR) as usize;
            if in_sector != 0 || rest.len() < SECTOR as usize {
                let n = (SECTOR as usize - in_sector).min(rest.len());
                let base = off - in_sector as u64;
                let mut sector = [0u8; SECTOR as usize];
                self.read_aligned(base, &mut sector)?;
                sector[in_sector..in_sector + n].copy_from_slice(&rest[..n]);
                self.write_aligned(base, &sector)?;
                off += n as u64;
                rest = &rest[n..];
            } else {
                let n = rest.len() / SECTOR as usize * SECTOR as usize;
                self.write_aligned(off, &rest[..n])?;
                off += n as u64;
                rest = &rest[n..];
            }
        }
        Ok(())
    }
}

impl Sink for RockusbSink {
    fn name(&self) -> &str {
        &self.name
    }
    fn capacity(&self) -> Option<u64> {
        self.capacity
    }
    fn prepare(&mut self, image_size: Option<u64>) -> Result<(), WriteError> {
        if let Some(sz) = image_size {
            self.check_end(0, sz)?;
        }
        Ok(())
    }
    fn write_at(&mut self, offset: u64, data: &[u8]) -> Result<(), WriteError> {
        self.write_any(offset, data)
    }
    fn zero_range(&mut self, offset: u64, len: u64) -> Result<(), WriteError> {
        let max = self.sectors_per_command.max(1) as usize * SECTOR as usize;
        let mut zero = std::mem::take(&mut self.zero);
        zero.resize(max, 0);
        let mut off = offset;
        let end = offset + len;
        let r = (|| {
            while off < end {
                let n = ((end - off) as usize).min(max);
                self.write_any(off, &zero[..n])?;
                off += n as u64;
            }
            Ok(())
        })();
        self.zero = zero;
        r
    }
    fn reads_back_zeroes(&self) -> bool {
        false
    }
    fn sync(&mut self) -> Result<(), WriteError> {
        // Each WRITE_LBA is complete when its CSW arrives; there is no cache to flush.
        Ok(())
    }
    fn finalize(&mut self, _image_size: u64) -> Result<(), WriteError> {
        Ok(())
    }
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<(), WriteError> {
        let start = offset / SECTOR * SECTOR;
        let end = (offset + buf.len() as u64).div_ceil(SECTOR) * SECTOR;
        if start == offset && end == offset + buf.len() as u64 {
            return self.read_aligned(offset, buf);
        }
        let mut tmp = vec![0u8; (end - start) as usize];
        self.read_aligned(start, &mut tmp)?;
        let skip = (offset - start) as usize;
        buf.copy_from_slice(&tmp[skip..skip + buf.len()]);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chip_info_words_are_reversed() {
        assert_eq!(
            chip_name(b"A02341023180002V"),
            Some("320A20140813V200".to_string())
        );
    }
}
