//! A simulated Raspberry Pi in USB device boot: the ROM stage takes the boot message and the
//! second stage, then re-enumerates as the file server, asks for a scripted list of files, and
//! finally becomes a USB mass-storage gadget (the real `mass-storage-gadget64` end state).

use super::{Faults, SimDevice};
use crate::usb::discovery::{Descriptor, InterfaceClass};
use crate::usb::TransportError;
use std::collections::{BTreeMap, VecDeque};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    Rom,
    FileServer,
    MassStorage,
    Off,
}

/// What the second stage asks for: (command, name). 0 = size, 1 = read, 2 = done; -1 is not
/// a message: the second stage boots on and leaves the bus without one (rpiboot takes a device
/// gone from the file server as its end).
pub(crate) type Request = (i32, String);

pub struct RpiBoard {
    pub(crate) pid: u16,
    pub stage: Stage,
    pub(crate) bus: u8,
    pub address: u8,
    pub ports: Vec<u8>,
    generation: u32,
    faults: Faults,
    fail_next: bool,
    pub script: VecDeque<Request>,
    /// Announced second-stage length from the boot message.
    pub(crate) announced: Option<usize>,
    pub second_stage: Option<Vec<u8>>,
    /// Sizes answered to GetFileSize.
    pub sizes: Vec<(String, u32)>,
    /// Files received with ReadFile (None = host said it has no such file).
    pub files: BTreeMap<String, Option<Vec<u8>>>,
    /// Answer a file request with only `command` and the NUL-terminated name (rpiboot
    /// ignores the length of the reply), not all 260 bytes.
    pub short_requests: bool,
    awaiting: Option<Request>,
    bulk: Option<(usize, Vec<u8>)>,
    rom_messages: usize,
}

impl RpiBoard {
    /// A CM4 (BCM2711) asking for the files `mass-storage-gadget64` serves.
    pub fn cm4(files: &[&str]) -> Self {
        let mut script = VecDeque::new();
        for f in files {
            script.push_back((0, f.to_string()));
            script.push_back((1, f.to_string()));
        }
        script.push_back((2, String::new()));
        Self {
            pid: 0x2711,
            stage: Stage::Rom,
            bus: 1,
            address: 12,
            ports: vec![1, 3],
            generation: 0,
            faults: Faults::default(),
            fail_next: false,
            script,
            announced: None,
            second_stage: None,
            sizes: Vec::new(),
            files: BTreeMap::new(),
            short_requests: false,
            awaiting: None,
            bulk: None,
            rom_messages: 0,
        }
    }

    /// End the file server by booting on (off the bus into mass storage) instead of Done.
    pub fn boot_without_done(&mut self) {
        if let Some(last) = self.script.back_mut() {
            *last = (-1, String::new());
        }
    }

    fn reenumerate(&mut self, stage: Stage) {
        self.stage = stage;
        self.generation += 1;
        self.address = self.address.wrapping_add(1).max(1);
        self.bulk = None;
        self.awaiting = None;
    }

    fn message(&mut self, data: Vec<u8>) {
        match self.stage {
            Stage::Rom => {
                if self.rom_messages == 0 && data.len() == 24 {
                    self.announced =
                        Some(i32::from_le_bytes([data[0], data[1], data[2], data[3]]) as usize);
                } else {
                    self.second_stage = Some(data);
                }
                self.rom_messages += 1;
            }
            Stage::FileServer => {
                if let Some((1, name)) = self.awaiting.take() {
                    self.files.insert(name, Some(data));
                }
            }
            _ => {}
        }
    }
}

impl SimDevice for RpiBoard {
    fn descriptor(&self) -> Option<Descriptor> {
        let (vid, pid, serial, class) = match self.stage {
            Stage::Rom => (0x0a5c, self.pid, 0, (0xff, 0, 0)),
            Stage::FileServer => (0x0a5c, self.pid, 1, (0xff, 0, 0)),
            // Linux's g_mass_storage defaults (Netchip 0525:a4a5).
            Stage::MassStorage => (0x0525, 0xa4a5, 3, (0x08, 0x06, 0x50)),
            Stage::Off => return None,
        };
        Some(Descriptor {
            bus: self.bus,
            address: self.address,
            ports: self.ports.clone(),
            vid,
            pid,
            bcd_usb: 0x0200,
            serial_index: serial,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: class.0,
                subclass: class.1,
                protocol: class.2,
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
        self.stage = Stage::Off;
    }
    fn fail_next_status(&mut self) {
        self.fail_next = true;
    }

    fn control_out(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        data: &[u8],
    ) -> Result<usize, TransportError> {
        if rt != 0x40 || req != 0 || !data.is_empty() || self.bulk.is_some() {
            return Err(TransportError::Stall);
        }
        let len = value as usize | (index as usize) << 16;
        if self.stage == Stage::FileServer {
            match self.awaiting.clone() {
                Some((_, name)) if name.is_empty() || name.starts_with('*') => {
                    // metadata ack / end-of-list ack
                    self.awaiting = None;
                    if name.is_empty() {
                        self.reenumerate(Stage::MassStorage);
                    }
                    return Ok(0);
                }
                Some((0, name)) => {
                    self.sizes.push((name, len as u32));
                    self.awaiting = None;
                    return Ok(0);
                }
                Some((1, name)) if len == 0 => {
                    self.files.insert(name, None);
                    self.awaiting = None;
                    return Ok(0);
                }
                Some((1, _)) => {}
                Some(_) => return Err(TransportError::Stall),
                None => return Err(TransportError::Stall),
            }
        }
        if len == 0 {
            return Ok(0);
        }
        self.bulk = Some((len, Vec::with_capacity(len)));
        Ok(0)
    }

    fn control_in(
        &mut self,
        rt: u8,
        req: u8,
        value: u16,
        index: u16,
        buf: &mut [u8],
    ) -> Result<usize, TransportError> {
        let len = value as usize | (index as usize) << 16;
        if rt != 0xc0 || req != 0 || len != buf.len() {
            return Err(TransportError::Stall);
        }
        match self.stage {
            Stage::Rom if len == 4 => {
                let ok = !std::mem::take(&mut self.fail_next)
                    && matches!((&self.second_stage, self.announced), (Some(s), Some(n)) if s.len() == n && n > 0);
                let rc: i32 = if ok { 0 } else { -1 };
                buf.copy_from_slice(&rc.to_le_bytes());
                if ok {
                    self.reenumerate(Stage::FileServer);
                }
                Ok(4)
            }
            Stage::FileServer if len == 260 => {
                let Some((cmd, name)) = self.script.pop_front() else {
                    return Err(TransportError::Timeout);
                };
                if cmd == -1 {
                    self.reenumerate(Stage::MassStorage);
                    return Err(TransportError::Gone);
                }
                buf.fill(0);
                buf[..4].copy_from_slice(&cmd.to_le_bytes());
                let n = name.len().min(255);
                buf[4..4 + n].copy_from_slice(&name.as_bytes()[..n]);
                let sent = if self.short_requests { 4 + n + 1 } else { 260 };
                if cmd == 2 && !name.is_empty() {
                    // "Done" with a name: the host stops without answering.
                    self.reenumerate(Stage::MassStorage);
                } else {
                    // An empty name also means done, but rpiboot acknowledges it first.
                    self.awaiting = Some((cmd, name));
                }
                Ok(sent)
            }
            _ => Err(TransportError::Stall),
        }
    }

    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        let Some((want, mut buf)) = self.bulk.take() else {
            return Err(TransportError::Stall);
        };
        if data.len() > 16 * 1024 || buf.len() + data.len() > want {
            return Err(TransportError::Stall);
        }
        buf.extend_from_slice(data);
        if buf.len() == want {
            self.message(buf);
        } else {
            self.bulk = Some((want, buf));
        }
        Ok(data.len())
    }

    fn wire_out_len(&self) -> usize {
        self.bulk
            .as_ref()
            .map_or(0, |(want, buf)| (want - buf.len()).min(16 * 1024))
    }

    fn bulk_due(&self) -> bool {
        self.bulk.is_some()
    }

    fn bulk_in(&mut self, _buf: &mut [u8]) -> Result<usize, TransportError> {
        Err(TransportError::Stall)
    }
}
