//! A simulated Allwinner FEL boot ROM (D1 by default): AWUC/AWUS framing, VERSION, READ,
//! WRITE, EXEC, with SRAM holding the RISC-V ROM signature word at 0 and a DRAM window.

use super::{Faults, SimDevice};
use crate::usb::discovery::{Descriptor, InterfaceClass};
use crate::usb::TransportError;
use std::collections::VecDeque;

pub(crate) const SRAM_SIZE: usize = 0x20000;
pub const DRAM_BASE: u32 = 0x4000_0000;

enum Fel {
    /// Next USB write is a 16-byte FEL request.
    Request,
    /// Next USB write is data for FEL_WRITE.
    WriteData(u32, usize),
    /// Next USB read returns this.
    Reply(Vec<u8>),
    /// Next USB read is the 8-byte status.
    Status,
}

enum Usb {
    Awuc,
    Out(usize),
    In(usize),
}

pub struct FelDevice {
    pub(crate) soc_raw: u32,
    pub(crate) present: bool,
    pub(crate) bus: u8,
    pub address: u8,
    pub ports: Vec<u8>,
    faults: Faults,
    fail_next: bool,
    pub(crate) sram: Vec<u8>,
    pub dram: Vec<u8>,
    pub executed: Vec<u32>,
    fel: Fel,
    usb: Usb,
    acks: VecDeque<Vec<u8>>,
}

impl FelDevice {
    /// Allwinner D1 (SoC ID 0x1859, RISC-V ROM) with `dram` bytes of DRAM.
    pub fn d1(dram: usize) -> Self {
        let mut sram = super::garbage(SRAM_SIZE, 0xd1);
        sram[..4].copy_from_slice(&crate::usb::fel::D1_ROM_WORD.to_le_bytes());
        Self {
            soc_raw: 0x0018_5900,
            present: true,
            bus: 1,
            address: 20,
            ports: vec![4],
            faults: Faults::default(),
            fail_next: false,
            sram,
            dram: super::garbage(dram, 0xd2),
            executed: Vec::new(),
            fel: Fel::Request,
            usb: Usb::Awuc,
            acks: VecDeque::new(),
        }
    }

    fn mem(&mut self, addr: u32, len: usize) -> Option<&mut [u8]> {
        let a = addr as usize;
        if a + len <= self.sram.len() {
            return Some(&mut self.sram[a..a + len]);
        }
        let d = addr.checked_sub(DRAM_BASE)? as usize;
        self.dram.get_mut(d..d + len)
    }

    fn ack(&mut self) {
        let mut a = vec![0u8; 13];
        a[..4].copy_from_slice(b"AWUS");
        if std::mem::take(&mut self.fail_next) {
            a[12] = 1;
        }
        self.acks.push_back(a);
    }

    fn fel_write(&mut self, data: &[u8]) -> Result<(), TransportError> {
        match std::mem::replace(&mut self.fel, Fel::Request) {
            Fel::Request => {
                if data.len() != 16 {
                    return Err(TransportError::Stall);
                }
                let w =
                    |o: usize| u32::from_le_bytes([data[o], data[o + 1], data[o + 2], data[o + 3]]);
                let (code, addr, len) = (w(0), w(4), w(8) as usize);
                self.fel = match code {
                    0x001 => {
                        let mut v = vec![0u8; 32];
                        v[..8].copy_from_slice(b"AWUSBFEX");
                        v[8..12].copy_from_slice(&self.soc_raw.to_le_bytes());
                        v[12..16].copy_from_slice(&1u32.to_le_bytes());
                        v[16..18].copy_from_slice(&1u16.to_le_bytes());
                        v[18] = 0x44;
                        v[19] = 0x08;
                        v[20..24].copy_from_slice(&0x7e00u32.to_le_bytes());
                        Fel::Reply(v)
                    }
                    0x101 => Fel::WriteData(addr, len),
                    0x102 => {
                        self.executed.push(addr);
                        Fel::Status
                    }
                    0x103 => match self.mem(addr, len) {
                        Some(m) => Fel::Reply(m.to_vec()),
                        None => return Err(TransportError::Stall),
                    },
                    _ => return Err(TransportError::Stall),
                };
            }
            Fel::WriteData(addr, len) => {
                if data.len() != len {
                    return Err(TransportError::Stall);
                }
                match self.mem(addr, len) {
                    Some(m) => m.copy_from_slice(data),
                    None => return Err(TransportError::Stall),
                }
                self.fel = Fel::Status;
            }
            other => {
                self.fel = other;
                return Err(TransportError::Stall);
            }
        }
        Ok(())
    }
}

impl SimDevice for FelDevice {
    fn descriptor(&self) -> Option<Descriptor> {
        self.present.then(|| Descriptor {
            bus: self.bus,
            address: self.address,
            ports: self.ports.clone(),
            vid: 0x1f3a,
            pid: 0xefe8,
            bcd_usb: 0x0200,
            serial_index: 0,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: 0xff,
                subclass: 0xff,
                protocol: 0xff,
            }],
        })
    }
    fn generation(&self) -> u32 {
        0
    }
    fn faults(&mut self) -> &mut Faults {
        &mut self.faults
    }
    fn vanish(&mut self) {
        self.present = false;
    }
    fn fail_next_status(&mut self) {
        self.fail_next = true;
    }

    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        match self.usb {
            Usb::Awuc => {
                if data.len() != 32 || &data[..4] != b"AWUC" {
                    return Err(TransportError::Stall);
                }
                let len = u32::from_le_bytes([data[8], data[9], data[10], data[11]]) as usize;
                let req = u16::from_le_bytes([data[16], data[17]]);
                let len2 = u32::from_le_bytes([data[18], data[19], data[20], data[21]]) as usize;
                if len != len2 || data[12..16] != 0x0c00_0000u32.to_le_bytes() {
                    return Err(TransportError::Stall);
                }
                self.usb = match req {
                    0x12 => Usb::Out(len),
                    0x11 => Usb::In(len),
                    _ => return Err(TransportError::Stall),
                };
                Ok(32)
            }
            Usb::Out(len) => {
                if data.len() != len {
                    return Err(TransportError::Stall);
                }
                self.fel_write(data)?;
                self.usb = Usb::Awuc;
                self.ack();
                Ok(len)
            }
            Usb::In(_) => Err(TransportError::Stall),
        }
    }

    fn wire_out_len(&self) -> usize {
        match self.usb {
            _ if !self.acks.is_empty() => 0,
            Usb::Awuc => 32,
            Usb::Out(len) => len,
            Usb::In(_) => 0,
        }
    }
    fn wire_in_len(&self) -> Option<usize> {
        match self.usb {
            Usb::In(len) => Some(len),
            _ => self.acks.front().map(Vec::len),
        }
    }

    fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        if let Usb::In(len) = self.usb {
            if buf.len() != len {
                return Err(TransportError::Stall);
            }
            let data = match std::mem::replace(&mut self.fel, Fel::Request) {
                Fel::Reply(v) if v.len() == len => {
                    self.fel = Fel::Status;
                    v
                }
                Fel::Status if len == 8 => vec![0u8; 8],
                other => {
                    self.fel = other;
                    return Err(TransportError::Stall);
                }
            };
            buf.copy_from_slice(&data);
            self.usb = Usb::Awuc;
            self.ack();
            return Ok(len);
        }
        let Some(a) = self.acks.pop_front() else {
            return Err(TransportError::Timeout);
        };
        let n = a.len().min(buf.len());
        buf[..n].copy_from_slice(&a[..n]);
        Ok(n)
    }
}
