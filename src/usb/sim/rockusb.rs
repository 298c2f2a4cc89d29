//! A simulated Rockchip board: boot ROM (maskrom) download, then a rockusb loader with flash.
//!
//! Decodes what arrives on the wire itself (0x471/0x472 chunking and CRC-16, CBW layout with
//! big-endian LBA/length, CSW echoing the tag) rather than reusing the host-side crate, so a
//! layout mistake on either side shows up as a test failure.

use super::{Faults, SimDevice};
use crate::usb::discovery::{Descriptor, InterfaceClass};
use crate::usb::rkloader::CRC16;
use crate::usb::TransportError;
use std::collections::{BTreeMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RkMode {
    Maskrom,
    Loader,
    Off,
}

/// What the ROM received on one area: the payload without its CRC, and whether the CRC held.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Download {
    pub area: u16,
    pub payload: Vec<u8>,
    pub crc_ok: bool,
    /// Sizes of the control transfers that carried it, in order.
    pub transfers: Vec<usize>,
}

pub struct RockchipBoard {
    pub(crate) pid: u16,
    pub mode: RkMode,
    pub(crate) bus: u8,
    pub address: u8,
    pub ports: Vec<u8>,
    generation: u32,
    faults: Faults,
    fail_status: bool,
    /// Board re-enumerates in loader mode after a good 0x472 download.
    pub comes_back: bool,
    /// bcdUSB the loader shows; 0x0200 emulates loaders that never set the loader bit.
    pub loader_bcd: u16,
    /// Mainline U-Boot rockusb: READ_FLASH_INFO / READ_CAPABILITY fail.
    pub no_flash_info: bool,
    /// A lying flash: a WRITE_LBA starting at this LBA reports success but changes nothing.
    pub drop_write_at_lba: Option<u32>,
    /// Completed maskrom downloads in arrival order.
    pub downloads: Vec<Download>,
    partial: BTreeMap<u16, (Vec<u8>, Vec<usize>)>,
    /// Storages by rockusb index; `current` selects one.
    pub storages: BTreeMap<u8, Vec<u8>>,
    pub(crate) current: u8,
    pub resets: Vec<u8>,
    pub commands: Vec<u8>,
    state: BulkState,
    replies: VecDeque<Vec<u8>>,
}

enum BulkState {
    Idle,
    DataOut { cbw: Cbw, buf: Vec<u8> },
}

/// A CBW as the device decodes it.
#[derive(Debug, Clone, Copy)]
struct Cbw {
    tag: [u8; 4],
    len: u32,
    dir_in: bool,
    op: u8,
    sub: u8,
    addr: u32,
    count: u16,
}

impl Cbw {
    fn parse(b: &[u8]) -> Option<Cbw> {
        if b.len() != 31 || &b[0..4] != b"USBC" {
            return None;
        }
        Some(Cbw {
            tag: [b[4], b[5], b[6], b[7]],
            len: u32::from_le_bytes([b[8], b[9], b[10], b[11]]),
            dir_in: b[12] & 0x80 != 0,
            op: b[15],
            sub: b[16],
            addr: u32::from_be_bytes([b[17], b[18], b[19], b[20]]),
            count: u16::from_be_bytes([b[22], b[23]]),
        })
    }
}

/// rockusb storage indices used by the simulation.
pub const EMMC: u8 = 1;
pub const SPI_NOR: u8 = 9;

impl RockchipBoard {
    /// An RK3588 board (2207:350b) in maskrom with an eMMC of `emmc_bytes` holding garbage.
    pub fn rk3588(emmc_bytes: usize) -> Self {
        let mut storages = BTreeMap::new();
        storages.insert(EMMC, super::garbage(emmc_bytes, 0x3588));
        Self {
            pid: 0x350b,
            mode: RkMode::Maskrom,
            bus: 1,
            address: 5,
            ports: vec![2, 1],
            generation: 0,
            faults: Faults::default(),
            fail_status: false,
            comes_back: true,
            loader_bcd: 0x0201,
            no_flash_info: false,
            drop_write_at_lba: None,
            downloads: Vec::new(),
            partial: BTreeMap::new(),
            storages,
            current: EMMC,
            resets: Vec::new(),
            commands: Vec::new(),
            state: BulkState::Idle,
            replies: VecDeque::new(),
        }
    }

    pub fn add_storage(&mut self, index: u8, bytes: usize) {
        self.storages
            .insert(index, super::garbage(bytes, 0x900d + index as u32));
    }

    pub(crate) fn flash(&self) -> &[u8] {
        self.storages.get(&self.current).map_or(&[], |v| v)
    }

    pub fn storage(&self, index: u8) -> &[u8] {
        self.storages.get(&index).map_or(&[], |v| v)
    }

    fn reenumerate(&mut self, mode: RkMode) {
        self.mode = mode;
        self.generation += 1;
        self.address = self.address.wrapping_add(1).max(1);
        self.state = BulkState::Idle;
        self.replies.clear();
    }

    fn finish_download(&mut self, area: u16) {
        let Some((blob, transfers)) = self.partial.remove(&area) else {
            return;
        };
        let (payload, crc_ok) = if blob.len() >= 2 {
            let (p, c) = blob.split_at(blob.len() - 2);
            (
                p.to_vec(),
                CRC16.checksum(p) == u16::from_be_bytes([c[0], c[1]]),
            )
        } else {
            (blob, false)
        };
        self.downloads.push(Download {
            area,
            payload,
            crc_ok,
            transfers,
        });
        if area == 0x472 && crc_ok {
            // The usbplug runs: the ROM drops off the bus and the loader enumerates.
            if self.comes_back {
                self.reenumerate(RkMode::Loader);
            } else {
                self.reenumerate(RkMode::Off);
            }
        }
    }

    fn csw(&mut self, tag: [u8; 4], residue: u32, ok: bool) {
        let ok = ok && !std::mem::take(&mut self.fail_status);
        let mut c = Vec::with_capacity(13);
        c.extend_from_slice(b"USBS");
        c.extend_from_slice(&tag);
        c.extend_from_slice(&residue.to_le_bytes());
        c.push(if ok { 0 } else { 1 });
        self.replies.push_back(c);
    }

    fn range(&self, lba: u32, count: u16) -> Option<std::ops::Range<usize>> {
        let start = lba as usize * 512;
        let end = start + count as usize * 512;
        (end <= self.flash().len()).then_some(start..end)
    }

    /// Execute a command whose data phase (if OUT) is complete.
    fn execute(&mut self, c: Cbw, out: &[u8]) {
        self.commands.push(c.op);
        let len = c.len as usize;
        let data_in = |v: &[u8]| {
            let mut d = v.to_vec();
            d.resize(len, 0);
            d
        };
        match c.op {
            0x00 => self.csw(c.tag, 0, true),
            0x01 => {
                self.replies.push_back(data_in(b"EMMC "));
                self.csw(c.tag, 0, true)
            }
            0x1a if !self.no_flash_info => {
                let mut info = Vec::new();
                info.extend_from_slice(&((self.flash().len() / 512) as u32).to_le_bytes());
                info.extend_from_slice(&1024u16.to_le_bytes());
                info.extend_from_slice(&[4, 40, 0x28, 0x15, 1]);
                self.replies.push_back(data_in(&info));
                self.csw(c.tag, 0, true)
            }
            0x1b => {
                // The ROM version string with each 32-bit word byte-reversed ("3588" → "8853").
                let name = crate::usb::ids::rockchip_soc(self.pid).map_or("RKxxxx", |s| s.name);
                let chip: Vec<u8> = name.bytes().skip(2).take(4).rev().collect();
                self.replies.push_back(data_in(&chip));
                self.csw(c.tag, 0, true)
            }
            0xaa if !self.no_flash_info => {
                self.replies.push_back(data_in(&[0x09, 0x02]));
                self.csw(c.tag, 0, true)
            }
            0x14 => match self.range(c.addr, c.count) {
                Some(r) if r.len() == len => {
                    let d = self.flash()[r].to_vec();
                    self.replies.push_back(d);
                    self.csw(c.tag, 0, true)
                }
                _ => {
                    self.replies.push_back(vec![0; len]);
                    self.csw(c.tag, c.len, false)
                }
            },
            0x15 => match self.range(c.addr, c.count) {
                Some(_) if self.drop_write_at_lba == Some(c.addr) => self.csw(c.tag, 0, true),
                Some(r) if r.len() == out.len() => {
                    let cur = self.current;
                    if let Some(f) = self.storages.get_mut(&cur) {
                        f[r].copy_from_slice(out);
                    }
                    self.csw(c.tag, 0, true)
                }
                _ => self.csw(c.tag, c.len, false),
            },
            0x25 => match self.range(c.addr, c.count) {
                Some(r) => {
                    let cur = self.current;
                    if let Some(f) = self.storages.get_mut(&cur) {
                        f[r].fill(0xff);
                    }
                    self.csw(c.tag, 0, true)
                }
                None => self.csw(c.tag, 0, false),
            },
            0x2a => {
                // Real loaders report success even when the medium is absent.
                if self.storages.contains_key(&c.sub) {
                    self.current = c.sub;
                }
                self.csw(c.tag, 0, true)
            }
            0x2b => {
                let bits = 1u32 << self.current;
                self.replies.push_back(data_in(&bits.to_le_bytes()));
                self.csw(c.tag, 0, true)
            }
            0xff => {
                self.resets.push(c.sub);
                self.csw(c.tag, 0, true)
            }
            _ => {
                if c.len > 0 && c.dir_in {
                    self.replies.push_back(vec![0; len]);
                }
                self.csw(c.tag, c.len, false)
            }
        }
    }
}

impl SimDevice for RockchipBoard {
    fn descriptor(&self) -> Option<Descriptor> {
        let bcd = match self.mode {
            RkMode::Maskrom => 0x0200,
            RkMode::Loader => self.loader_bcd,
            RkMode::Off => return None,
        };
        Some(Descriptor {
            bus: self.bus,
            address: self.address,
            ports: self.ports.clone(),
            vid: 0x2207,
            pid: self.pid,
            bcd_usb: bcd,
            serial_index: 0,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: 0xff,
                subclass: 0x06,
                protocol: 0x05,
            }],
        })
    }
    fn generation(&self) -> u32 {
        self.generation
    }
    fn faults(&mut self) -> &mut Faults {
        &mut self.faults
    }
    fn vanish(&mut self) {
        self.mode = RkMode::Off;
    }
    fn fail_next_status(&mut self) {
        self.fail_status = true;
    }

    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, TransportError> {
        // Only the ROM takes these; a loader rejects them (rkdeveloptool#13: "does not support").
        if self.mode != RkMode::Maskrom
            || rt != 0x40
            || req != 0x0c
            || value != 0
            || !(index == 0x471 || index == 0x472)
            || data.len() > 4096
            || data.is_empty()
        {
            return Err(TransportError::Stall);
        }
        let entry = self.partial.entry(index).or_default();
        // A lone 1-byte transfer after a full 4096-byte one is the terminator of the 4094 case.
        let terminator = data.len() == 1 && !entry.0.is_empty() && entry.0.len() % 4096 == 0;
        entry.1.push(data.len());
        if !terminator {
            entry.0.extend_from_slice(data);
        }
        if data.len() < 4096 {
            self.finish_download(index);
        }
        Ok(data.len())
    }

    // control IN: the SimDevice default (stall), as on the ROM and the loader.

    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        if self.mode != RkMode::Loader {
            // The ROM has no rockusb command set.
            return Err(TransportError::Stall);
        }
        match std::mem::replace(&mut self.state, BulkState::Idle) {
            BulkState::Idle => {
                let Some(c) = Cbw::parse(data) else {
                    return Err(TransportError::Stall);
                };
                if c.len > 0 && !c.dir_in {
                    self.state = BulkState::DataOut {
                        cbw: c,
                        buf: Vec::with_capacity(c.len as usize),
                    };
                } else {
                    self.execute(c, &[]);
                }
            }
            BulkState::DataOut { cbw, mut buf } => {
                buf.extend_from_slice(data);
                if buf.len() >= cbw.len as usize {
                    buf.truncate(cbw.len as usize);
                    self.execute(cbw, &buf);
                } else {
                    self.state = BulkState::DataOut { cbw, buf };
                }
            }
        }
        Ok(data.len())
    }

    fn wire_out_len(&self) -> usize {
        match (&self.state, self.mode) {
            (_, RkMode::Maskrom | RkMode::Off) => 0,
            (_, RkMode::Loader) if !self.replies.is_empty() => 0,
            (BulkState::Idle, RkMode::Loader) => 31,
            (BulkState::DataOut { cbw, buf }, RkMode::Loader) => {
                (cbw.len as usize - buf.len()).min(1 << 20)
            }
        }
    }
    fn wire_in_len(&self) -> Option<usize> {
        (self.mode == RkMode::Loader)
            .then(|| self.replies.front().map(Vec::len))
            .flatten()
    }

    fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if self.mode != RkMode::Loader {
            return Err(TransportError::Stall);
        }
        let Some(r) = self.replies.pop_front() else {
            return Err(TransportError::Timeout);
        };
        if r.len() > buf.len() {
            return Err(TransportError::Overflow);
        }
        buf[..r.len()].copy_from_slice(&r);
        // A reset takes effect once its status was read: the board reboots off the bus.
        if self.replies.is_empty() && self.commands.last() == Some(&0xff) {
            self.reenumerate(RkMode::Off);
        }
        Ok(r.len())
    }
}
