//! What a device in USB recovery mode answers (it may be broken, counterfeit or hostile):
//! fastboot replies, Allwinner FEL status/version blocks, rpiboot file requests. A transport
//! that answers every IN transfer from the fuzz input; every host-side flow must end in Ok or
//! an error, never a panic, a hang or a read outside the served directory.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sbcflash::usb::{fastboot::Fastboot, fel, usbboot, Transport, TransportError};
use std::time::Duration;

/// Replies come from the input: each IN transfer takes a length byte and that many bytes;
/// when the input runs out the device "times out".
struct Replay<'a> {
    data: &'a [u8],
    ins: usize,
}

impl Replay<'_> {
    fn reply(&mut self, buf: &mut [u8]) -> Result<usize, TransportError> {
        self.ins += 1;
        if self.ins > 10_000 {
            return Err(TransportError::Gone);
        }
        let (&n, rest) = self.data.split_first().ok_or(TransportError::Timeout)?;
        let n = (n as usize).min(rest.len()).min(buf.len());
        buf[..n].copy_from_slice(&rest[..n]);
        self.data = &rest[n..];
        Ok(n)
    }
}

impl Transport for Replay<'_> {
    fn control_out(
        &mut self,
        _: u8,
        _: u8,
        _: u16,
        _: u16,
        data: &[u8],
        _: Duration,
    ) -> Result<usize, TransportError> {
        Ok(data.len())
    }
    fn control_in(
        &mut self,
        _: u8,
        _: u8,
        _: u16,
        _: u16,
        buf: &mut [u8],
        _: Duration,
    ) -> Result<usize, TransportError> {
        self.reply(buf)
    }
    fn bulk_out(&mut self, data: &[u8], _: Duration) -> Result<usize, TransportError> {
        Ok(data.len())
    }
    fn bulk_in(&mut self, buf: &mut [u8], _: Duration) -> Result<usize, TransportError> {
        self.reply(buf)
    }
}

struct Files;
impl usbboot::FileProvider for Files {
    fn get(&self, name: &str) -> Option<Vec<u8>> {
        assert!(
            !name.contains("..") && !name.starts_with('/'),
            "asked to serve {name:?}"
        );
        (name == "start4.elf").then(|| vec![0x5a; 300])
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&which, data)) = data.split_first() else {
        return;
    };
    let mut t = Replay { data, ins: 0 };
    match which % 4 {
        0 => {
            let mut fb = Fastboot::new(&mut t);
            let _ = fb.getvar("product");
            let _ = fb.max_download_size();
            let _ = fb.partition_size("rootfs");
            let _ = fb.download(&[1u8; 600], &mut |_| {});
            let _ = fb.flash("rootfs");
        }
        1 => {
            if let Ok(v) = fel::version(&mut t) {
                let _ = fel::soc_name(&mut t, &v);
                let mut buf = vec![0u8; 256];
                let _ = fel::read(&mut t, 0x2_0000, &mut buf, &mut |_| {});
            }
        }
        2 => {
            let _ = usbboot::file_server(&mut t, &Files, |_, _| {});
        }
        _ => {
            let _ = usbboot::boot_rom(&mut t, &[7u8; 1000]);
        }
    }
});
