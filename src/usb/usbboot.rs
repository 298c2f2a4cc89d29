//! Raspberry Pi USB device boot (rpiboot): the boot ROM stage and the second-stage file server.
//!
//! Framing, from raspberrypi/usbboot `main.c`: a host→device message is a vendor control OUT
//! carrying the length in wValue/wIndex (no data stage) followed by bulk OUT in ≤16 KiB
//! transfers; a device→host message is a vendor control IN of the announced length. The ROM
//! takes a 24-byte boot message and the second-stage blob and answers a 4-byte status; the
//! second stage then asks for files by name until it is done and becomes a mass-storage gadget,
//! which the normal block writer then writes with all its safety checks.

use super::{Error, Transport};
use std::path::{Path, PathBuf};
use std::time::Duration;

const BULK_CHUNK: usize = 16 * 1024;
const T_CONTROL: Duration = Duration::from_secs(1);
const T_BULK: Duration = Duration::from_secs(5);
const T_READ: Duration = Duration::from_secs(20);

/// A length in a vendor control request (low half in wValue, high half in wIndex): what
/// comes next in a transfer, or the size of a requested file.
fn send_len(t: &mut dyn Transport, len: u32) -> Result<usize, crate::usb::TransportError> {
    t.control_out(
        0x40,
        0,
        (len & 0xffff) as u16,
        (len >> 16) as u16,
        &[],
        T_CONTROL,
    )
}

/// Host → device message.
pub fn ep_write(t: &mut dyn Transport, data: &[u8]) -> Result<(), Error> {
    let len = u32::try_from(data.len())
        .map_err(|_| Error::TooLarge("file over 4 GiB for rpiboot".into()))?;
    send_len(t, len).map_err(|e| Error::transport("announcing a transfer to the boot ROM", e))?;
    let mut sent = 0usize;
    for chunk in data.chunks(BULK_CHUNK) {
        let n = t.bulk_out(chunk, T_BULK).map_err(|e| Error::Interrupted {
            what: "sending a file to the Raspberry Pi".into(),
            done: sent as u64,
            total: data.len() as u64,
            source: Box::new(Error::transport("bulk write", e)),
        })?;
        if n != chunk.len() {
            return Err(Error::Protocol(format!(
                "short write to the Raspberry Pi: {} of {} bytes",
                sent + n,
                data.len()
            )));
        }
        sent += n;
    }
    Ok(())
}

/// Device → host message of exactly `buf.len()` bytes.
pub fn ep_read(t: &mut dyn Transport, buf: &mut [u8]) -> Result<(), Error> {
    let len = buf.len() as u32;
    let n = t
        .control_in(
            0xc0,
            0,
            (len & 0xffff) as u16,
            (len >> 16) as u16,
            buf,
            T_READ,
        )
        .map_err(|e| Error::transport("reading from the Raspberry Pi", e))?;
    if n != buf.len() {
        return Err(Error::Protocol(format!(
            "short read from the Raspberry Pi: {n} of {} bytes",
            buf.len()
        )));
    }
    Ok(())
}

/// ROM stage: send the second-stage blob (`bootcode4.bin`, …) and check the ROM's verdict.
pub fn boot_rom(t: &mut dyn Transport, second_stage: &[u8]) -> Result<(), Error> {
    let mut msg = [0u8; 24];
    let len = i32::try_from(second_stage.len())
        .map_err(|_| Error::TooLarge("second stage too large".into()))?;
    msg[..4].copy_from_slice(&len.to_le_bytes());
    ep_write(t, &msg)?;
    ep_write(t, second_stage)?;
    let mut rc = [0u8; 4];
    ep_read(t, &mut rc)?;
    let rc = i32::from_le_bytes(rc);
    if rc != 0 {
        return Err(Error::DeviceFailed(format!(
            "the boot ROM rejected the second stage (return code {rc})"
        )));
    }
    Ok(())
}

/// Where requested files come from.
pub trait FileProvider {
    fn get(&self, name: &str) -> Option<Vec<u8>>;
}

/// rpiboot's lookup: `<dir>/<soc>/<name>`, then `<dir>/<name>`.
pub struct DirProvider {
    pub dir: PathBuf,
    /// "2711" or "2712": the per-SoC subdirectory of a bootfiles tree.
    pub soc_dir: Option<String>,
}

impl FileProvider for DirProvider {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        let mut tries = Vec::new();
        if let Some(s) = &self.soc_dir {
            tries.push(self.dir.join(s).join(name));
        }
        tries.push(self.dir.join(name));
        tries.into_iter().find_map(|p| std::fs::read(p).ok())
    }
}

/// What the second stage asked for.
#[derive(Debug, Default, Clone)]
pub struct Served {
    /// (name, bytes sent or None when missing)
    pub files: Vec<(String, Option<usize>)>,
    /// `*KEY*VALUE` metadata from recovery.bin.
    pub metadata: Vec<(String, String)>,
}

/// File names must stay inside the serving directory.
fn safe_name(name: &str) -> bool {
    !name.contains("..") && !Path::new(name).is_absolute()
}

/// Second stage: answer file requests until the device says it is done.
pub fn file_server(
    t: &mut dyn Transport,
    files: &dyn FileProvider,
    mut on_file: impl FnMut(&str, Option<usize>),
) -> Result<Served, Error> {
    let mut served = Served::default();
    loop {
        let mut req = [0u8; 260];
        // rpiboot retries a request read that fails for any reason but a lost device.
        let mut tries = 0;
        loop {
            match ep_read(t, &mut req) {
                Err(Error::Transport {
                    source: super::TransportError::Timeout,
                    ..
                }) if tries < 3 => tries += 1,
                r => break r?,
            }
        }
        let cmd = i32::from_le_bytes([req[0], req[1], req[2], req[3]]);
        let raw = &req[4..];
        let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
        let name = String::from_utf8_lossy(&raw[..end]).to_string();
        if name.is_empty() {
            ep_write(t, &[])?;
            break;
        }
        if cmd != 2 {
            if let Some(meta) = name.strip_prefix('*') {
                let (k, v) = meta.split_once('*').unwrap_or((meta, ""));
                served.metadata.push((k.to_string(), v.to_string()));
                ep_write(t, &[])?;
                continue;
            }
        }
        let content = if safe_name(&name) {
            files.get(&name)
        } else {
            tracing::warn!("refusing file request with a path outside the directory: {name}");
            None
        };
        match cmd {
            0 => {
                let size = content.as_ref().map_or(0, |c| c.len()) as u32;
                send_len(t, size)
                    .map_err(|e| Error::transport(format!("answering the size of {name}"), e))?;
            }
            1 => {
                let sent = content.as_ref().map(|c| c.len());
                ep_write(t, content.as_deref().unwrap_or(&[]))?;
                on_file(&name, sent);
                served.files.push((name, sent));
            }
            2 => break,
            other => {
                return Err(Error::Protocol(format!(
                    "unknown rpiboot file-server command {other} for {name:?}"
                )))
            }
        }
    }
    Ok(served)
}
