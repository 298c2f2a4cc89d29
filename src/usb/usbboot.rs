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
pub(crate) fn ep_write(t: &mut dyn Transport, data: &[u8]) -> Result<(), Error> {
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
pub(crate) fn ep_read(t: &mut dyn Transport, buf: &mut [u8]) -> Result<(), Error> {
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

/// rpiboot's per-SoC subdirectory (and `bootfiles.bin` prefix): "2712", "2711", and "2710" for
/// every older ROM (2763/2764), as rpiboot's `check_file` names them.
pub(crate) fn soc_prefix(pid: u16) -> &'static str {
    match pid {
        0x2712 => "2712",
        0x2711 => "2711",
        _ => "2710",
    }
}

/// rpiboot's lookup: `<dir>/<soc>/<name>`, then `<soc>/<name>` inside `<dir>/bootfiles.bin`
/// (the tar archive usbboot's `mass-storage-gadget64` ships instead of loose files), then
/// `<dir>/<name>`.
pub(crate) struct DirProvider {
    pub(crate) dir: PathBuf,
    /// "2710", "2711" or "2712" ([`soc_prefix`]).
    pub(crate) soc_dir: Option<String>,
}

impl FileProvider for DirProvider {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        if let Some(s) = &self.soc_dir {
            if let Ok(b) = std::fs::read(self.dir.join(s).join(name)) {
                return Some(b);
            }
            let archive = self.dir.join("bootfiles.bin");
            if let Ok(tar) = std::fs::read(&archive) {
                match tar_member(&tar, &format!("{s}/{name}")) {
                    Ok(Some(b)) => return Some(b.to_vec()),
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{}: {e}", archive.display()),
                }
            }
        }
        std::fs::read(self.dir.join(name)).ok()
    }
}

/// A member of a ustar archive by name (case-insensitive, as rpiboot matches it).
fn tar_member<'a>(tar: &'a [u8], want: &str) -> Result<Option<&'a [u8]>, String> {
    let mut at = 0usize;
    while at + 512 <= tar.len() {
        let h = &tar[at..at + 512];
        if h.iter().all(|&b| b == 0) {
            break;
        }
        let name_end = h[..100].iter().position(|&b| b == 0).unwrap_or(100);
        let name = String::from_utf8_lossy(&h[..name_end]);
        let size_field = String::from_utf8_lossy(&h[124..136]);
        let size_text = size_field.trim_matches(|c: char| c == '\0' || c == ' ');
        let size = usize::from_str_radix(size_text, 8)
            .map_err(|_| format!("bad tar header at offset {at}: size {size_text:?}"))?;
        let data = at + 512;
        let end = data
            .checked_add(size)
            .filter(|&e| e <= tar.len())
            .ok_or(format!(
                "tar member {name} at offset {at} runs past the end ({size} bytes)"
            ))?;
        if name.eq_ignore_ascii_case(want) {
            return Ok(Some(&tar[data..end]));
        }
        at = data + size.div_ceil(512) * 512;
    }
    Ok(None)
}

/// What the second stage asked for.
#[derive(Debug, Default, Clone)]
pub struct Served {
    /// (name, bytes sent or None when missing)
    pub(crate) files: Vec<(String, Option<usize>)>,
    /// `*KEY*VALUE` metadata from recovery.bin.
    pub(crate) metadata: Vec<(String, String)>,
}

/// File names must stay inside the serving directory.
fn safe_name(name: &str) -> bool {
    !name.contains("..") && !Path::new(name).is_absolute()
}

/// One `{command, fname[256]}` request of the second stage. rpiboot takes any reply length
/// (it ignores the count libusb returns); the rest of the message reads as zeros here.
fn read_request(t: &mut dyn Transport) -> Result<Option<(i32, String)>, Error> {
    let mut req = [0u8; 260];
    let mut tries = 0;
    let n = loop {
        match t.control_in(0xc0, 0, req.len() as u16, 0, &mut req, T_READ) {
            Ok(n) => break n,
            // rpiboot ends the file server when the device goes (NO_DEVICE, IO): the second
            // stage may boot on without a Done message. A wrong boot ends in the wait for the
            // mass-storage disk, which says so.
            Err(super::TransportError::Gone) => return Ok(None),
            // Anything else rpiboot retries after a second.
            Err(e) if tries < 3 => {
                tracing::debug!("file-server request read failed ({e}); retrying");
                tries += 1;
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => {
                return Err(Error::transport(
                    "reading a file request from the Raspberry Pi",
                    e,
                ))
            }
        }
    };
    if n < 4 {
        return Err(Error::Protocol(format!(
            "file-server request of {n} bytes from the Raspberry Pi (want at least the 4-byte command)"
        )));
    }
    req[n..].fill(0);
    let cmd = i32::from_le_bytes([req[0], req[1], req[2], req[3]]);
    let raw = &req[4..];
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    Ok(Some((
        cmd,
        String::from_utf8_lossy(&raw[..end]).to_string(),
    )))
}

/// Second stage: answer file requests until the device says it is done (or leaves the bus).
/// As rpiboot: GetFileSize opens the file and ReadFile sends the file it opened (a ReadFile
/// with nothing open gets an empty answer); a missing file's size is answered as 0.
pub fn file_server(
    t: &mut dyn Transport,
    files: &dyn FileProvider,
    mut on_file: impl FnMut(&str, Option<usize>),
) -> Result<Served, Error> {
    let mut served = Served::default();
    let mut open: Option<(String, Vec<u8>)> = None;
    while let Some((cmd, name)) = read_request(t)? {
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
        match cmd {
            0 => {
                let content = if safe_name(&name) {
                    files.get(&name)
                } else {
                    tracing::warn!(
                        "refusing file request with a path outside the directory: {name}"
                    );
                    None
                };
                let size = match &content {
                    Some(c) => u32::try_from(c.len())
                        .map_err(|_| Error::TooLarge(format!("{name}: over 4 GiB for rpiboot")))?,
                    None => 0,
                };
                send_len(t, size)
                    .map_err(|e| Error::transport(format!("answering the size of {name}"), e))?;
                if content.is_none() {
                    on_file(&name, None);
                    served.files.push((name.clone(), None));
                }
                open = content.map(|c| (name, c));
            }
            1 => match open.take() {
                Some((opened, content)) => {
                    ep_write(t, &content)?;
                    on_file(&opened, Some(content.len()));
                    served.files.push((opened, Some(content.len())));
                }
                None => ep_write(t, &[])?,
            },
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

#[cfg(test)]
mod tests {
    use super::*;

    fn ustar(members: &[(&str, &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (name, data) in members {
            let mut h = [0u8; 512];
            h[..name.len()].copy_from_slice(name.as_bytes());
            let size = format!("{:011o}\0", data.len());
            h[124..136].copy_from_slice(size.as_bytes());
            out.extend_from_slice(&h);
            out.extend_from_slice(data);
            out.resize(out.len().div_ceil(512) * 512, 0);
        }
        out.resize(out.len() + 1024, 0);
        out
    }

    #[test]
    fn soc_prefix_is_rpiboots() {
        assert_eq!(soc_prefix(0x2763), "2710");
        assert_eq!(soc_prefix(0x2764), "2710");
        assert_eq!(soc_prefix(0x2711), "2711");
        assert_eq!(soc_prefix(0x2712), "2712");
    }

    #[test]
    fn bootfiles_bin_between_the_soc_dir_and_the_top_level() {
        let d = tempfile::tempdir().unwrap();
        let tar = ustar(&[
            ("2712/bootcode5.bin", b"five"),
            ("2711/BOOTCODE4.BIN", b"four from the archive"),
            ("2711/config.txt", b"archive config"),
        ]);
        std::fs::write(d.path().join("bootfiles.bin"), &tar).unwrap();
        std::fs::create_dir(d.path().join("2711")).unwrap();
        std::fs::write(d.path().join("2711/config.txt"), b"overlay config").unwrap();
        std::fs::write(d.path().join("boot.img"), b"top").unwrap();
        let p = DirProvider {
            dir: d.path().into(),
            soc_dir: Some("2711".into()),
        };
        assert_eq!(
            p.get("bootcode4.bin").as_deref(),
            Some(&b"four from the archive"[..])
        );
        assert_eq!(p.get("config.txt").as_deref(), Some(&b"overlay config"[..]));
        assert_eq!(p.get("boot.img").as_deref(), Some(&b"top"[..]));
        assert_eq!(p.get("bootcode5.bin"), None, "another SoC's member");
        let mut cut = tar.clone();
        cut.truncate(514);
        assert!(tar_member(&cut, "x")
            .unwrap_err()
            .contains("runs past the end"));
    }
}
