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
use crate::image::{ExtentKind, ExtentSource};
use rockusb::operation::{self, OperationSteps, UsbOperationError, UsbStep};
pub use rockusb::protocol::StorageIndex;
use std::time::Duration;

pub const SECTOR: u64 = 512;
/// Default sectors per WRITE_LBA/READ_LBA (64 KiB, rkdeveloptool's DEFAULT_RW_LBA).
pub const DEFAULT_SECTORS_PER_COMMAND: u16 = 128;

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
pub fn run<T: std::fmt::Debug>(
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
pub fn probe_loader(t: &mut dyn Transport, timeouts: &Timeouts) -> bool {
    let mut op = operation::chip_info();
    run(t, &mut op, "probing for a loader", timeouts.probe).is_ok()
}

/// A board running a rockusb loader.
pub struct LoaderSession<'t> {
    t: &'t mut dyn Transport,
    pub timeouts: Timeouts,
    pub sectors_per_command: u16,
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
            sectors_per_command: DEFAULT_SECTORS_PER_COMMAND,
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
    pub fn select_storage(&mut self, want: StorageIndex) -> Result<(), Error> {
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

    pub fn read_lba(&mut self, lba: u32, buf: &mut [u8]) -> Result<(), Error> {
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
    pub fn reset(&mut self) -> Result<(), Error> {
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

/// What to do with `Zero` extents. The medium's previous contents are unknown over rockusb
/// (eMMC erase may read back 0x00 or 0xFF), so the safe default writes them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ZeroPolicy {
    Write,
    Skip,
}

/// A range that was written, with the hash of what was sent, for read-back.
#[derive(Debug, Clone)]
pub struct Written {
    pub lba: u32,
    pub sectors: u32,
    pub hash: blake3::Hash,
}

/// Outcome of streaming an image to the board.
#[derive(Debug, Clone, Default)]
pub struct WriteReport {
    pub image_size: u64,
    pub bytes_written: u64,
    pub bytes_skipped: u64,
    pub ranges: Vec<Written>,
}

/// Receives one sector-aligned write: (byte offset, data).
type Emit<'a> = dyn FnMut(u64, &[u8]) -> Result<(), Error> + 'a;

/// Turns the extent stream into sector-aligned LBA writes. `Skip` ranges are not sent; partial
/// sectors at the edges of data are padded with zeroes (the neighbouring range is Zero or Skip,
/// so zero is right or harmless).
struct SectorPacker {
    start: u64,
    buf: Vec<u8>,
    max: usize,
}

impl SectorPacker {
    fn new(max: usize) -> Self {
        Self {
            start: 0,
            buf: Vec::with_capacity(max + SECTOR as usize),
            max,
        }
    }

    /// Append bytes at `offset`; emits full commands through `emit`.
    fn push(&mut self, offset: u64, mut data: &[u8], emit: &mut Emit<'_>) -> Result<(), Error> {
        if self.buf.is_empty() || self.start + self.buf.len() as u64 != offset {
            self.flush(emit)?;
            self.start = offset / SECTOR * SECTOR;
            self.buf.resize((offset - self.start) as usize, 0);
        }
        while !data.is_empty() {
            let room = self.max - self.buf.len();
            let n = room.min(data.len());
            self.buf.extend_from_slice(&data[..n]);
            data = &data[n..];
            if self.buf.len() == self.max {
                emit(self.start, &self.buf)?;
                self.start += self.max as u64;
                self.buf.clear();
            }
        }
        Ok(())
    }

    fn flush(&mut self, emit: &mut Emit<'_>) -> Result<(), Error> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let padded = self.buf.len().div_ceil(SECTOR as usize) * SECTOR as usize;
        self.buf.resize(padded, 0);
        emit(self.start, &self.buf)?;
        self.start += padded as u64;
        self.buf.clear();
        Ok(())
    }
}

/// Stream an image to the selected storage with WRITE_LBA. A failure part-way (cable pulled,
/// CSW failure) returns [`Error::Interrupted`] saying how far it got; it never reports success.
pub fn write_image(
    s: &mut LoaderSession<'_>,
    src: &mut dyn ExtentSource,
    zeroes: ZeroPolicy,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<WriteReport, Error> {
    let hint = src.size_hint();
    if let (Some(size), Some(cap)) = (hint, s.capacity) {
        if size > cap {
            return Err(Error::TooLarge(format!(
                "the image is {size} bytes but the board's storage holds {cap} bytes: refusing to \
                 write past the end of the storage"
            )));
        }
    }
    let max = s.sectors_per_command.max(1) as usize * SECTOR as usize;
    let mut packer = SectorPacker::new(max);
    let mut report = WriteReport::default();
    let mut buf = vec![0u8; 1 << 20];
    let zero = vec![0u8; max];
    let cap = s.capacity;
    let total = hint;
    let mut pos = 0u64;
    let mut emit = |lba_byte: u64, data: &[u8]| -> Result<(), Error> {
        let end = lba_byte + data.len() as u64;
        if let Some(cap) = cap {
            if end > cap {
                return Err(Error::TooLarge(format!(
                    "write of bytes {lba_byte}..{end} is past the end of the storage ({cap} bytes)"
                )));
            }
        }
        let lba = u32::try_from(lba_byte / SECTOR)
            .map_err(|_| Error::TooLarge("offset beyond rockusb's 2 TiB LBA range".into()))?;
        s.write_lba(lba, data)?;
        report.ranges.push(Written {
            lba,
            sectors: (data.len() as u64 / SECTOR) as u32,
            hash: blake3::hash(data),
        });
        Ok(())
    };
    let wrap = |e: Error, done: u64| match e {
        e @ (Error::TooLarge(_) | Error::Image(_)) => e,
        e => Error::Interrupted {
            what: "writing the image over rockusb".into(),
            done,
            total: total.unwrap_or(done),
            source: Box::new(e),
        },
    };
    loop {
        let ext = match src.next_extent(&mut buf) {
            Ok(Some(x)) => x,
            Ok(None) => break,
            Err(e) => return Err(wrap(Error::Image(e), pos)),
        };
        match ext.kind {
            ExtentKind::Data => {
                let data = buf
                    .get(..ext.len as usize)
                    .ok_or_else(|| Error::Protocol("extent longer than its buffer".into()))?;
                packer
                    .push(ext.offset, data, &mut emit)
                    .map_err(|e| wrap(e, pos))?;
                report.bytes_written += ext.len;
            }
            ExtentKind::Zero if zeroes == ZeroPolicy::Write => {
                let mut off = ext.offset;
                while off < ext.end() {
                    let n = (ext.end() - off).min(zero.len() as u64) as usize;
                    packer
                        .push(off, &zero[..n], &mut emit)
                        .map_err(|e| wrap(e, off))?;
                    off += n as u64;
                }
                report.bytes_written += ext.len;
            }
            ExtentKind::Zero | ExtentKind::Skip => {
                packer.flush(&mut emit).map_err(|e| wrap(e, pos))?;
                report.bytes_skipped += ext.len;
            }
        }
        pos = ext.end();
        progress(pos, total);
    }
    packer.flush(&mut emit).map_err(|e| wrap(e, pos))?;
    report.image_size = pos;
    Ok(report)
}

/// Read back every written range and compare with what was sent.
pub fn verify(
    s: &mut LoaderSession<'_>,
    report: &WriteReport,
    progress: &mut dyn FnMut(u64, Option<u64>),
) -> Result<(), Error> {
    let total: u64 = report
        .ranges
        .iter()
        .map(|r| r.sectors as u64 * SECTOR)
        .sum();
    let mut done = 0u64;
    let mut buf = Vec::new();
    for r in &report.ranges {
        buf.resize(r.sectors as usize * SECTOR as usize, 0);
        s.read_lba(r.lba, &mut buf)
            .map_err(|e| Error::Interrupted {
                what: "reading back".into(),
                done,
                total,
                source: Box::new(e),
            })?;
        if blake3::hash(&buf) != r.hash {
            return Err(Error::Verify(format!(
                "sectors {}..{} (bytes {}..{}) read back differ from what was written",
                r.lba,
                r.lba as u64 + r.sectors as u64,
                r.lba as u64 * SECTOR,
                (r.lba as u64 + r.sectors as u64) * SECTOR
            )));
        }
        done += buf.len() as u64;
        progress(done, Some(total));
    }
    Ok(())
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

    #[test]
    fn packer_pads_partial_sectors_and_splits_commands() {
        let mut p = SectorPacker::new(1024);
        let mut got: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut emit = |o: u64, d: &[u8]| {
            got.push((o, d.to_vec()));
            Ok(())
        };
        p.push(100, &[1u8; 1000], &mut emit).unwrap();
        p.push(1100, &[2u8; 100], &mut emit).unwrap();
        p.flush(&mut emit).unwrap();
        p.push(4096 + 10, &[3u8; 5], &mut emit).unwrap();
        p.flush(&mut emit).unwrap();
        assert_eq!(got[0].0, 0);
        assert_eq!(got[0].1.len(), 1024);
        assert_eq!(&got[0].1[..100], &[0u8; 100][..]);
        assert_eq!(got[0].1[100], 1);
        assert_eq!(got[1].0, 1024);
        assert_eq!(got[1].1.len(), 512);
        assert_eq!(got[1].1[1099 - 1024], 1);
        assert_eq!(got[1].1[1100 - 1024], 2);
        assert_eq!(got[1].1[1200 - 1024], 0);
        assert_eq!(got[2].0, 4096);
        assert_eq!(&got[2].1[10..15], &[3u8; 5]);
        assert_eq!(got[2].1.len(), 512);
    }
}
