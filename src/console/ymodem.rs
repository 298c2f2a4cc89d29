//! XMODEM / YMODEM sender, sans-IO: give it the bytes the receiver sent, it says what to send.
//!
//! Checksums: both use CRC-16/XMODEM (poly 0x1021, init 0, no reflection, sent high byte
//! first) when the receiver starts with `C`; plain XMODEM falls back to an 8-bit sum of the
//! data when the receiver starts with NAK. YMODEM (U-Boot's `loady`) adds block 0 with the
//! file name and decimal size (so the receiver truncates the padding), uses 1024-byte STX
//! blocks, and ends the batch with an empty block 0. XMODEM (boot ROM recovery, e.g. the
//! VisionFive 2) uses 128-byte SOH blocks padded with 0x1A. U-Boot's `crc32` command, used
//! to check the result, is the ordinary CRC-32 (IEEE 802.3, as zlib).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const SOH: u8 = 0x01;
const STX: u8 = 0x02;
const EOT: u8 = 0x04;
const ACK: u8 = 0x06;
const NAK: u8 = 0x15;
const CAN: u8 = 0x18;
const PAD: u8 = 0x1a;

const CRC16: crc::Crc<u16> = crc::Crc::<u16>::new(&crc::CRC_16_XMODEM);

/// CRC-16/XMODEM of `data`.
pub(crate) fn crc16_xmodem(data: &[u8]) -> u16 {
    CRC16.checksum(data)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Xmodem,
    /// XMODEM with 1024-byte STX blocks (what `tio`/`sx -k` send; fewer round trips, which
    /// matters at 115200 baud). Needs CRC: a receiver that starts with NAK gets 128-byte blocks.
    Xmodem1k,
    Ymodem,
}

/// What the sender wants.
#[derive(Debug, PartialEq, Eq)]
pub enum XStep {
    Send(Vec<u8>),
    Wait(Instant),
    /// Bytes of the file acknowledged so far (for progress); ask again right away.
    Progress(u64),
    Done,
    Fail(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum St {
    /// Waiting for the receiver's `C` (or NAK for checksum XMODEM).
    Start,
    /// Block 0 sent, waiting for its ACK.
    HeaderAck,
    /// Header acknowledged; waiting for the `C` that starts the data.
    DataStart,
    /// A data block sent, waiting for ACK.
    BlockAck,
    /// EOT sent.
    EotAck,
    /// YMODEM: waiting for `C` to send the closing empty block 0.
    FinalStart,
    /// Closing block sent.
    FinalAck,
    Done,
}

pub struct Sender {
    proto: Protocol,
    name: String,
    data: Vec<u8>,
    crc: bool,
    st: St,
    inbox: VecDeque<u8>,
    /// Next data block number (1-based), offset of the block in flight.
    block: u32,
    offset: usize,
    in_flight: Vec<u8>,
    in_flight_len: usize,
    retries: u32,
    deadline: Option<Instant>,
    cans: u32,
    pending_send: Option<XStep>,
    pub(crate) block_timeout: Duration,
    pub(crate) start_timeout: Duration,
    pub(crate) max_retries: u32,
}

impl Sender {
    pub fn new(proto: Protocol, name: &str, data: Vec<u8>) -> Sender {
        Sender {
            proto,
            name: name.to_string(),
            data,
            crc: true,
            st: St::Start,
            inbox: VecDeque::new(),
            block: 1,
            offset: 0,
            in_flight: Vec::new(),
            in_flight_len: 0,
            retries: 0,
            deadline: None,
            cans: 0,
            pending_send: None,
            block_timeout: Duration::from_secs(10),
            start_timeout: Duration::from_secs(60),
            max_retries: 10,
        }
    }

    fn frame(&self, num: u8, payload: &[u8], size: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(size + 5);
        v.push(if size == 1024 { STX } else { SOH });
        v.push(num);
        v.push(255 - num);
        let start = v.len();
        v.extend_from_slice(payload);
        let fill = if num == 0 && self.proto == Protocol::Ymodem {
            0
        } else {
            PAD
        };
        v.resize(start + size, fill);
        if self.crc {
            let c = crc16_xmodem(&v[start..]);
            v.extend_from_slice(&c.to_be_bytes());
        } else {
            let s = v[start..].iter().fold(0u8, |a, b| a.wrapping_add(*b));
            v.push(s);
        }
        v
    }

    fn header(&self) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(self.name.as_bytes());
        p.push(0);
        p.extend_from_slice(self.data.len().to_string().as_bytes());
        p.push(0);
        self.frame(0, &p, 128)
    }

    fn data_block(&mut self) -> Vec<u8> {
        let one_k = match self.proto {
            Protocol::Xmodem => false,
            Protocol::Xmodem1k => self.crc,
            Protocol::Ymodem => true,
        };
        // A tail of 128 bytes or less goes in a short block rather than a mostly padded 1K one.
        let size = if one_k && self.data.len() - self.offset > 128 {
            1024
        } else {
            128
        };
        let end = (self.offset + size).min(self.data.len());
        self.in_flight_len = end - self.offset;
        let b = self.frame(
            (self.block & 0xff) as u8,
            &self.data[self.offset..end],
            size,
        );
        self.in_flight = b.clone();
        b
    }

    fn send(&mut self, st: St, bytes: Vec<u8>, now: Instant, timeout: Duration) -> XStep {
        self.st = st;
        self.deadline = Some(now + timeout);
        XStep::Send(bytes)
    }

    fn next_data(&mut self, now: Instant) -> XStep {
        self.retries = 0;
        if self.offset >= self.data.len() {
            return self.send(St::EotAck, vec![EOT], now, self.block_timeout);
        }
        let b = self.data_block();
        self.send(St::BlockAck, b, now, self.block_timeout)
    }

    /// Feed what the receiver sent since the last call (may be empty) and get the next step.
    pub fn step(&mut self, input: &[u8], now: Instant) -> XStep {
        self.inbox.extend(input.iter().copied());
        if let Some(s) = self.pending_send.take() {
            return s;
        }
        if self.deadline.is_none() {
            self.deadline = Some(now + self.start_timeout);
        }
        while let Some(b) = self.inbox.pop_front() {
            if b == CAN {
                self.cans += 1;
                if self.cans >= 2 {
                    self.st = St::Done;
                    return XStep::Fail("the receiver cancelled the transfer (CAN CAN)".into());
                }
                continue;
            }
            self.cans = 0;
            match (self.st, b) {
                (St::Start, b'C') | (St::Start, NAK) => {
                    self.crc = b == b'C';
                    if self.proto == Protocol::Ymodem && !self.crc {
                        continue; // YMODEM needs CRC; wait for a `C`
                    }
                    self.inbox.clear();
                    return match self.proto {
                        Protocol::Ymodem => {
                            let h = self.header();
                            self.send(St::HeaderAck, h, now, self.block_timeout)
                        }
                        Protocol::Xmodem | Protocol::Xmodem1k => self.next_data(now),
                    };
                }
                (St::HeaderAck, ACK) => {
                    self.st = St::DataStart;
                    // Standard receivers send `C` after this ACK; U-Boot's xyzModem does not
                    // (it waits 2 s for the block, then flushes and NAKs with `C`). Send the
                    // first block after 1 s without a `C`, well inside U-Boot's window.
                    self.deadline = Some(now + Duration::from_secs(1));
                }
                (St::HeaderAck, NAK) => {
                    let h = self.header();
                    return self.retry(h, now);
                }
                (St::DataStart, b'C') => {
                    self.inbox.clear();
                    return self.next_data(now);
                }
                (St::BlockAck, ACK) => {
                    self.offset += self.in_flight_len;
                    self.block += 1;
                    self.st = St::DataStart; // transient
                    let s = self.next_data(now);
                    self.pending_send = Some(s);
                    return XStep::Progress(self.offset as u64);
                }
                // In CRC mode a receiver NAKs with `C` (U-Boot does).
                (St::BlockAck, NAK) | (St::BlockAck, b'C') => {
                    let b = self.in_flight.clone();
                    return self.retry(b, now);
                }
                (St::EotAck, NAK) => return self.retry(vec![EOT], now),
                (St::EotAck, ACK) => {
                    if self.proto != Protocol::Ymodem {
                        self.st = St::Done;
                        return XStep::Done;
                    }
                    self.st = St::FinalStart;
                    self.deadline = Some(now + Duration::from_secs(3));
                }
                (St::FinalStart, b'C') => {
                    let f = self.frame(0, &[], 128);
                    return self.send(St::FinalAck, f, now, Duration::from_secs(3));
                }
                (St::FinalAck, ACK) => {
                    self.st = St::Done;
                    return XStep::Done;
                }
                _ => {} // text, repeated `C`s: ignore
            }
        }
        let dl = self.deadline.unwrap_or(now);
        if now >= dl {
            return match self.st {
                St::Start => {
                    self.st = St::Done;
                    XStep::Fail(format!(
                        "the receiver never asked for data (no 'C'/NAK in {}s)",
                        self.start_timeout.as_secs()
                    ))
                }
                St::HeaderAck => {
                    let h = self.header();
                    self.retry(h, now)
                }
                St::DataStart => self.next_data(now),
                St::BlockAck => {
                    let b = self.in_flight.clone();
                    self.retry(b, now)
                }
                St::EotAck => self.retry(vec![EOT], now),
                // The closing handshake is a courtesy; the data is complete.
                St::FinalStart | St::FinalAck | St::Done => {
                    self.st = St::Done;
                    XStep::Done
                }
            };
        }
        XStep::Wait(dl)
    }

    fn retry(&mut self, bytes: Vec<u8>, now: Instant) -> XStep {
        self.retries += 1;
        if self.retries > self.max_retries {
            self.st = St::Done;
            let what = match self.st {
                St::HeaderAck => "the YMODEM header (block 0)".to_string(),
                St::EotAck => {
                    "the end of transmission (EOT, after all data blocks were acknowledged)"
                        .to_string()
                }
                _ => format!("block {}", self.block),
            };
            return XStep::Fail(format!(
                "{what} not acknowledged after {} tries",
                self.max_retries
            ));
        }
        let st = self.st;
        self.send(st, bytes, now, self.block_timeout)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sends(s: XStep) -> Vec<u8> {
        match s {
            XStep::Send(b) => b,
            other => panic!("expected a send, got {other:?}"),
        }
    }

    #[test]
    fn crc16_xmodem_check_value() {
        // The catalogue check value of CRC-16/XMODEM.
        assert_eq!(crc16_xmodem(b"123456789"), 0x31c3);
    }

    #[test]
    fn ymodem_session_with_a_nak_and_c_as_nak() {
        let data: Vec<u8> = (0..1500u32).map(|i| i as u8).collect();
        let mut s = Sender::new(Protocol::Ymodem, "f.bin", data.clone());
        let t = Instant::now();
        let h = sends(s.step(b"C", t));
        assert_eq!(&h[..3], &[SOH, 0, 255]);
        assert_eq!(&h[3..3 + 11], b"f.bin\x001500\x00");
        assert_eq!(h.len(), 3 + 128 + 2);
        assert_eq!(
            u16::from_be_bytes([h[131], h[132]]),
            crc16_xmodem(&h[3..131])
        );
        // ACK without a `C` (U-Boot): block 1 goes out after a second anyway.
        assert!(matches!(s.step(&[ACK], t), XStep::Wait(_)));
        let b1 = sends(s.step(&[], t + Duration::from_secs(1)));
        assert_eq!(&b1[..3], &[STX, 1, 254]);
        assert_eq!(&b1[3..1027], &data[..1024]);
        // `C` is a NAK in CRC mode: the same block again.
        assert_eq!(sends(s.step(b"C", t)), b1);
        assert!(matches!(s.step(&[ACK], t), XStep::Progress(1024)));
        let b2 = sends(s.step(&[], t));
        // 476 bytes left: a 1K block would waste most of it, but more than 128 need STX.
        assert_eq!(&b2[..3], &[STX, 2, 253]);
        assert_eq!(&b2[3..3 + 476], &data[1024..]);
        assert!(b2[3 + 476..1027].iter().all(|&b| b == PAD));
        assert_eq!(sends(s.step(&[NAK], t)), b2);
        assert!(matches!(s.step(&[ACK], t), XStep::Progress(1500)));
        assert_eq!(sends(s.step(&[], t)), vec![EOT]);
        assert_eq!(sends(s.step(&[NAK], t)), vec![EOT]);
        assert!(matches!(s.step(&[ACK], t), XStep::Wait(_)));
        let fin = sends(s.step(b"C", t));
        assert_eq!(&fin[..3], &[SOH, 0, 255]);
        assert!(fin[3..131].iter().all(|&b| b == 0));
        assert_eq!(s.step(&[ACK], t), XStep::Done);
    }

    #[test]
    fn xmodem_checksum_mode_and_cancel() {
        let mut s = Sender::new(Protocol::Xmodem, "x", vec![1, 2, 3]);
        let t = Instant::now();
        let b = sends(s.step(&[NAK], t));
        assert_eq!(&b[..3], &[SOH, 1, 254]);
        assert_eq!(
            b.len(),
            3 + 128 + 1,
            "8-bit sum when the receiver starts with NAK"
        );
        assert_eq!(b[131], (1u32 + 2 + 3 + 125 * PAD as u32) as u8);
        let mut s = Sender::new(Protocol::Xmodem, "x", vec![1, 2, 3]);
        sends(s.step(b"C", t));
        assert!(matches!(s.step(&[CAN, CAN], t), XStep::Fail(_)));
        let mut s = Sender::new(Protocol::Ymodem, "x", vec![1]);
        s.step(&[], t);
        assert!(matches!(
            s.step(&[], t + Duration::from_secs(61)),
            XStep::Fail(_)
        ));
    }

    #[test]
    fn xmodem_1k_uses_stx_blocks_with_crc_and_128_with_checksum() {
        let t = Instant::now();
        let data: Vec<u8> = (0..2100u32).map(|i| (i % 251) as u8).collect();
        let mut s = Sender::new(Protocol::Xmodem1k, "f", data.clone());
        let XStep::Send(b1) = s.step(b"C", t) else {
            panic!("no first block")
        };
        assert_eq!(&b1[..3], &[STX, 1, 254]);
        assert_eq!(b1.len(), 3 + 1024 + 2);
        assert!(matches!(s.step(&[ACK], t), XStep::Progress(1024)));
        let XStep::Send(b2) = s.step(&[], t) else {
            panic!("no second block")
        };
        assert_eq!(&b2[..3], &[STX, 2, 253]);
        assert!(matches!(s.step(&[ACK], t), XStep::Progress(2048)));
        // 52 bytes left: a 128-byte SOH block, padded with SUB.
        let XStep::Send(b3) = s.step(&[], t) else {
            panic!("no third block")
        };
        assert_eq!(&b3[..3], &[SOH, 3, 252]);
        assert_eq!(&b3[3..55], &data[2048..]);
        assert!(b3[55..131].iter().all(|&b| b == PAD));
        assert!(matches!(s.step(&[ACK], t), XStep::Progress(2100)));
        assert_eq!(s.step(&[], t), XStep::Send(vec![EOT]));
        assert_eq!(s.step(&[ACK], t), XStep::Done);

        // A checksum receiver (NAK) gets plain 128-byte blocks.
        let mut s = Sender::new(Protocol::Xmodem1k, "f", data);
        let XStep::Send(b) = s.step(&[NAK], t) else {
            panic!("no first block")
        };
        assert_eq!(&b[..3], &[SOH, 1, 254]);
        assert_eq!(b.len(), 3 + 128 + 1);
    }
}
