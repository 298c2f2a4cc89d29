//! Allwinner FEL: the boot ROM's memory read / write / execute protocol.
//!
//! Framing from sunxi-tools `fel_lib.c` (same in xfel): every USB-level transfer is wrapped in
//! a 32-byte `AWUC` request and acknowledged by a 13-byte `AWUS` response; every FEL request
//! (16 bytes: code, address, length, pad) ends with an 8-byte status read. Loading a full U-Boot
//! on the RISC-V D1 needs a DRAM-init payload and is out of scope; version, read, write and exec
//! are what the ROM itself offers.

use super::{Error, Transport};
use std::time::Duration;

const T: Duration = Duration::from_secs(10);
/// sunxi-tools#162: 512 KiB bulk transfers time out on some hosts; 64 KiB is what xfel uses.
pub(crate) const CHUNK: usize = 64 * 1024;

pub(crate) const FEL_VERSION: u32 = 0x001;
pub(crate) const FEL_WRITE: u32 = 0x101;
pub(crate) const FEL_EXEC: u32 = 0x102;
pub(crate) const FEL_READ: u32 = 0x103;
const USB_READ: u16 = 0x11;
const USB_WRITE: u16 = 0x12;

/// The 32-byte AWUC request.
pub(crate) fn awuc(request: u16, len: u32) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..4].copy_from_slice(b"AWUC");
    b[8..12].copy_from_slice(&len.to_le_bytes());
    b[12..16].copy_from_slice(&0x0c00_0000u32.to_le_bytes());
    b[16..18].copy_from_slice(&request.to_le_bytes());
    b[18..22].copy_from_slice(&len.to_le_bytes());
    b
}

fn xfer(e: super::TransportError, what: &str) -> Error {
    Error::transport(what, e)
}

fn awus(t: &mut dyn Transport) -> Result<(), Error> {
    let mut r = [0u8; 13];
    let n = t
        .bulk_in(&mut r, T)
        .map_err(|e| xfer(e, "reading the FEL AWUS ack"))?;
    if n != 13 || &r[..4] != b"AWUS" {
        return Err(Error::Protocol(format!(
            "bad FEL acknowledgement: {:02x?}",
            &r[..n]
        )));
    }
    if r[12] != 0 {
        return Err(Error::DeviceFailed(format!("FEL AWUS status {}", r[12])));
    }
    Ok(())
}

fn usb_write(t: &mut dyn Transport, data: &[u8]) -> Result<(), Error> {
    let req = awuc(USB_WRITE, data.len() as u32);
    t.bulk_out(&req, T)
        .map_err(|e| xfer(e, "sending an AWUC request"))?;
    let n = t
        .bulk_out(data, T)
        .map_err(|e| xfer(e, "sending FEL data"))?;
    if n != data.len() {
        return Err(Error::Protocol(format!(
            "short FEL write: {n} of {} bytes",
            data.len()
        )));
    }
    awus(t)
}

fn usb_read(t: &mut dyn Transport, buf: &mut [u8]) -> Result<(), Error> {
    let req = awuc(USB_READ, buf.len() as u32);
    t.bulk_out(&req, T)
        .map_err(|e| xfer(e, "sending an AWUC request"))?;
    let n = t.bulk_in(buf, T).map_err(|e| xfer(e, "reading FEL data"))?;
    if n != buf.len() {
        return Err(Error::Protocol(format!(
            "short FEL read: device sent {n} of {} bytes",
            buf.len()
        )));
    }
    awus(t)
}

fn request(t: &mut dyn Transport, code: u32, addr: u32, len: u32) -> Result<(), Error> {
    let mut r = [0u8; 16];
    r[..4].copy_from_slice(&code.to_le_bytes());
    r[4..8].copy_from_slice(&addr.to_le_bytes());
    r[8..12].copy_from_slice(&len.to_le_bytes());
    usb_write(t, &r)
}

fn status(t: &mut dyn Transport) -> Result<(), Error> {
    let mut s = [0u8; 8];
    usb_read(t, &mut s)
}

/// The VERSION reply.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Version {
    pub soc_id: u16,
    pub(crate) soc: Option<&'static str>,
    pub(crate) firmware: u32,
    pub(crate) protocol: u16,
    pub scratchpad: u32,
}

/// SoC IDs as `(raw >> 8) & 0xffff` (sunxi-tools `soc_info.c`).
pub(crate) const SOCS: &[(u16, &str)] = &[
    (0x1623, "A10"),
    (0x1625, "A10s/A13/R8"),
    (0x1633, "A31"),
    (0x1650, "A23"),
    (0x1651, "A20"),
    (0x1667, "A33/R16"),
    (0x1673, "A83T"),
    (0x1680, "H2+/H3"),
    (0x1689, "A64"),
    (0x1701, "R40"),
    (0x1718, "H5"),
    (0x1728, "H6"),
    (0x1817, "V831"),
    (0x1823, "H616"),
    (0x1859, "D1/D1s/R528/T113"),
];

/// First word of the RISC-V (D1/D1s) boot ROM; the ARM R528/T113 share SoC ID 0x1859.
pub(crate) const D1_ROM_WORD: u32 = 0x4301_4281;

pub fn version(t: &mut dyn Transport) -> Result<Version, Error> {
    request(t, FEL_VERSION, 0, 0)?;
    let mut v = [0u8; 32];
    usb_read(t, &mut v)?;
    status(t)?;
    if &v[..8] != b"AWUSBFEX" {
        return Err(Error::Protocol(format!(
            "not a FEL version reply: {:02x?}",
            &v[..8]
        )));
    }
    let raw = u32::from_le_bytes([v[8], v[9], v[10], v[11]]);
    let soc_id = ((raw >> 8) & 0xffff) as u16;
    Ok(Version {
        soc_id,
        soc: SOCS.iter().find(|(i, _)| *i == soc_id).map(|(_, n)| *n),
        firmware: u32::from_le_bytes([v[12], v[13], v[14], v[15]]),
        protocol: u16::from_le_bytes([v[16], v[17]]),
        scratchpad: u32::from_le_bytes([v[20], v[21], v[22], v[23]]),
    })
}

/// Name the SoC, telling D1 (RISC-V) from R528/T113 (ARM) by the ROM's first word.
pub fn soc_name(t: &mut dyn Transport, v: &Version) -> Result<String, Error> {
    if v.soc_id == 0x1859 {
        let mut w = [0u8; 4];
        read(t, 0, &mut w, &mut |_| {})?;
        return Ok(if u32::from_le_bytes(w) == D1_ROM_WORD {
            "D1/D1s (RISC-V)".into()
        } else {
            "R528/T113 (ARM)".into()
        });
    }
    Ok(v.soc
        .map(str::to_string)
        .unwrap_or_else(|| format!("unknown ({:#06x})", v.soc_id)))
}

pub fn write(
    t: &mut dyn Transport,
    addr: u32,
    data: &[u8],
    progress: &mut dyn FnMut(u64),
) -> Result<(), Error> {
    let mut done = 0usize;
    for chunk in data.chunks(CHUNK) {
        let a = addr.wrapping_add(done as u32);
        let r = request(t, FEL_WRITE, a, chunk.len() as u32)
            .and_then(|_| usb_write(t, chunk))
            .and_then(|_| status(t));
        if let Err(e) = r {
            return Err(Error::Interrupted {
                what: format!("FEL write to {addr:#010x}"),
                done: done as u64,
                total: data.len() as u64,
                source: Box::new(e),
            });
        }
        done += chunk.len();
        progress(done as u64);
    }
    Ok(())
}

pub fn read(
    t: &mut dyn Transport,
    addr: u32,
    buf: &mut [u8],
    progress: &mut dyn FnMut(u64),
) -> Result<(), Error> {
    let total = buf.len();
    let mut done = 0usize;
    for chunk in buf.chunks_mut(CHUNK) {
        let a = addr.wrapping_add(done as u32);
        let n = chunk.len();
        let r = request(t, FEL_READ, a, n as u32)
            .and_then(|_| usb_read(t, chunk))
            .and_then(|_| status(t));
        if let Err(e) = r {
            return Err(Error::Interrupted {
                what: format!("FEL read from {addr:#010x}"),
                done: done as u64,
                total: total as u64,
                source: Box::new(e),
            });
        }
        done += n;
        progress(done as u64);
    }
    Ok(())
}

pub fn exec(t: &mut dyn Transport, addr: u32) -> Result<(), Error> {
    request(t, FEL_EXEC, addr, 0)?;
    status(t)
}
