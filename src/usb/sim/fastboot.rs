//! A simulated fastboot device (U-Boot's gadget, or the TH1520 boot ROM): ASCII commands,
//! INFO/OKAY/FAIL/DATA replies, a download buffer limited to `max-download-size`, and
//! partitions that `flash` writes raw or by decoding Android sparse files with its own parser.

use super::{Faults, SimDevice};
use crate::usb::discovery::{Descriptor, InterfaceClass};
use crate::usb::TransportError;
use std::collections::{BTreeMap, VecDeque};

/// What the device becomes after `reboot`.
pub(crate) type Reboot = Box<dyn FnMut(&mut FastbootDevice) + Send>;

pub struct FastbootDevice {
    pub(crate) vid: u16,
    pub(crate) pid: u16,
    pub(crate) bus: u8,
    pub(crate) address: u8,
    pub(crate) ports: Vec<u8>,
    generation: u32,
    faults: Faults,
    fail_next: bool,
    pub present: bool,
    pub max_download: u32,
    pub partitions: BTreeMap<String, Vec<u8>>,
    /// Report `partition-size:<p>`; U-Boot does, some ROMs do not.
    pub report_sizes: bool,
    /// After `reboot`, come back as this (e.g. the ROM runs the U-Boot flashed to `ram`).
    pub reboots_into: Option<Reboot>,
    pub commands: Vec<String>,
    /// Sizes of every download received.
    pub downloads: Vec<usize>,
    download: Option<(usize, Vec<u8>)>,
    buffer: Vec<u8>,
    replies: VecDeque<Vec<u8>>,
    rebooting: bool,
}

impl FastbootDevice {
    /// U-Boot fastboot with the given partitions (filled with garbage).
    pub fn uboot(max_download: u32, parts: &[(&str, usize)]) -> Self {
        let partitions = parts
            .iter()
            .enumerate()
            .map(|(i, (n, size))| (n.to_string(), super::garbage(*size, 0xfb00 + i as u32)))
            .collect();
        Self {
            vid: 0x2345,
            pid: 0x7654,
            bus: 2,
            address: 7,
            ports: vec![1],
            generation: 0,
            faults: Faults::default(),
            fail_next: false,
            present: true,
            max_download,
            partitions,
            report_sizes: true,
            reboots_into: None,
            commands: Vec::new(),
            downloads: Vec::new(),
            download: None,
            buffer: Vec::new(),
            replies: VecDeque::new(),
            rebooting: false,
        }
    }

    fn reply(&mut self, kind: &str, text: &str) {
        let (kind, text) = if kind == "OKAY" && std::mem::take(&mut self.fail_next) {
            ("FAIL", "injected failure")
        } else {
            (kind, text)
        };
        let mut r = kind.as_bytes().to_vec();
        r.extend_from_slice(text.as_bytes());
        r.truncate(256);
        self.replies.push_back(r);
    }

    fn command(&mut self, cmd: &str) {
        self.commands.push(cmd.to_string());
        if let Some(var) = cmd.strip_prefix("getvar:") {
            let v = match var {
                "max-download-size" => Some(format!("0x{:08x}", self.max_download)),
                "version" => Some("0.4".into()),
                "product" => Some("sim".into()),
                v => v
                    .strip_prefix("partition-size:")
                    .filter(|_| self.report_sizes)
                    .and_then(|p| self.partitions.get(p))
                    .map(|p| format!("0x{:016x}", p.len())),
            };
            match v {
                Some(v) => self.reply("OKAY", &v),
                None => self.reply("FAIL", "Variable not implemented"),
            }
        } else if let Some(n) = cmd.strip_prefix("download:") {
            match usize::from_str_radix(n, 16) {
                Ok(n) if n <= self.max_download as usize && n > 0 => {
                    self.download = Some((n, Vec::with_capacity(n)));
                    self.reply("DATA", &format!("{n:08x}"));
                }
                Ok(_) => self.reply("FAIL", "data too large"),
                Err(_) => self.reply("FAIL", "bad download size"),
            }
        } else if let Some(p) = cmd.strip_prefix("flash:") {
            self.reply("INFO", &format!("writing '{p}'"));
            match self.flash(p) {
                Ok(()) => self.reply("OKAY", ""),
                Err(e) => self.reply("FAIL", &e),
            }
        } else if let Some(p) = cmd.strip_prefix("erase:") {
            match self.partitions.get_mut(p) {
                Some(d) => {
                    d.fill(0);
                    self.reply("OKAY", "")
                }
                None => self.reply("FAIL", "partition does not exist"),
            }
        } else if cmd == "reboot" {
            self.reply("OKAY", "");
            self.rebooting = true;
        } else {
            self.reply("FAIL", "unknown command");
        }
    }

    fn flash(&mut self, part: &str) -> Result<(), String> {
        let buf = std::mem::take(&mut self.buffer);
        let target = self
            .partitions
            .get_mut(part)
            .ok_or_else(|| format!("partition '{part}' does not exist"))?;
        if buf.len() >= 28 && buf[..4] == 0xed26ff3au32.to_le_bytes() {
            return unsparse(&buf, target);
        }
        if buf.len() > target.len() {
            return Err("image too large for partition".into());
        }
        target[..buf.len()].copy_from_slice(&buf);
        Ok(())
    }
}

fn le16(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Decode an Android sparse file onto `target` (what U-Boot's `write_sparse_image` does).
fn unsparse(s: &[u8], target: &mut [u8]) -> Result<(), String> {
    if le16(s, 4) != 1 || le16(s, 8) != 28 || le16(s, 10) != 12 {
        return Err("unsupported sparse header".into());
    }
    let bs = le32(s, 12) as usize;
    let chunks = le32(s, 20);
    let mut off = 28usize;
    let mut out = 0usize;
    for _ in 0..chunks {
        let h = s.get(off..off + 12).ok_or("truncated chunk header")?;
        let (ty, blocks, total) = (le16(h, 0), le32(h, 4) as usize, le32(h, 8) as usize);
        let body = s.get(off + 12..off + total).ok_or("truncated chunk")?;
        let len = blocks * bs;
        if out + len > target.len() && ty != 0xcac3 {
            return Err("sparse image too large for partition".into());
        }
        match ty {
            0xcac1 => {
                if body.len() != len {
                    return Err("raw chunk size mismatch".into());
                }
                target[out..out + len].copy_from_slice(body);
            }
            0xcac2 => {
                let pat = body.get(..4).ok_or("fill chunk without pattern")?;
                for (i, b) in target[out..out + len].iter_mut().enumerate() {
                    *b = pat[i % 4];
                }
            }
            0xcac3 | 0xcac4 => {}
            _ => return Err(format!("unknown chunk type {ty:#x}")),
        }
        out += len;
        off += total;
    }
    Ok(())
}

impl SimDevice for FastbootDevice {
    fn descriptor(&self) -> Option<Descriptor> {
        self.present.then(|| Descriptor {
            bus: self.bus,
            address: self.address,
            ports: self.ports.clone(),
            vid: self.vid,
            pid: self.pid,
            bcd_usb: 0x0200,
            serial_index: 3,
            interfaces: vec![InterfaceClass {
                number: 0,
                class: 0xff,
                subclass: 0x42,
                protocol: 0x03,
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
        self.present = false;
    }
    fn fail_next_status(&mut self) {
        self.fail_next = true;
    }
    fn bulk_out(&mut self, data: &[u8]) -> Result<usize, TransportError> {
        if let Some((want, mut buf)) = self.download.take() {
            if buf.len() + data.len() > want {
                return Err(TransportError::Stall);
            }
            buf.extend_from_slice(data);
            if buf.len() == want {
                self.downloads.push(want);
                self.buffer = buf;
                self.reply("OKAY", "");
            } else {
                self.download = Some((want, buf));
            }
            return Ok(data.len());
        }
        if data.len() > 4096 {
            return Err(TransportError::Stall);
        }
        let cmd = String::from_utf8_lossy(data).to_string();
        self.command(&cmd);
        Ok(data.len())
    }
    fn wire_out_len(&self) -> usize {
        match &self.download {
            _ if !self.present || !self.replies.is_empty() => 0,
            Some((want, buf)) => (want - buf.len()).min(1 << 20),
            None => 4096,
        }
    }
    fn wire_in_len(&self) -> Option<usize> {
        self.replies.front().map(Vec::len)
    }
    fn bulk_in(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        let Some(r) = self.replies.pop_front() else {
            return Err(TransportError::Timeout);
        };
        if r.len() > buf.len() {
            return Err(TransportError::Overflow);
        }
        buf[..r.len()].copy_from_slice(&r);
        if self.replies.is_empty() && std::mem::take(&mut self.rebooting) {
            self.generation += 1;
            self.address = self.address.wrapping_add(1).max(1);
            match self.reboots_into.take() {
                Some(mut f) => f(self),
                None => self.present = false,
            }
        }
        Ok(r.len())
    }
}
