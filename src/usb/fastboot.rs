//! Fastboot over our transport, and Android-sparse re-encoding under `max-download-size`.
//!
//! Command strings and reply parsing come from `fastboot-protocol` (its client is nusb-only, so
//! the ~100-line command loop lives here on [`Transport`]). Images are sent raw when they fit in
//! one download (boot ROMs such as the TH1520's `flash ram` want raw bytes), otherwise as a
//! series of complete Android sparse files, each under the device's limit, built from the extent
//! stream with `android-sparse-image`'s header types: data → RAW, known zeroes → FILL, unmapped →
//! DONT_CARE. An input that is already an Android sparse file can instead be cut with the crate's
//! `split_image` without decoding it ([`split_sparse_file`]).

use super::{Error, Transport, TransportError};
use crate::image::{ExtentKind, ExtentSource};
use android_sparse_image::{
    ChunkHeader, ChunkType, FileHeader, CHUNK_HEADER_BYTES_LEN, FILE_HEADER_BYTES_LEN,
};
use fastboot_protocol::protocol::{parse_u32, FastBootCommand, FastBootResponse};
use std::time::Duration;

pub(crate) const BLOCK: u32 = 4096;
/// Bulk OUT transfer size during a download.
const DOWNLOAD_CHUNK: usize = 1 << 20;
/// Smallest useful limit: a file header, leading and trailing DONT_CARE, one RAW chunk of one
/// block.
pub(crate) const MIN_DOWNLOAD: u32 =
    FILE_HEADER_BYTES_LEN as u32 + 3 * CHUNK_HEADER_BYTES_LEN as u32 + BLOCK;

/// A fastboot device on an open transport.
pub struct Fastboot<'t> {
    t: &'t mut dyn Transport,
    /// For commands that answer at once (getvar, download).
    pub(crate) timeout: Duration,
    /// For `flash`/`erase`, which may take minutes before OKAY on large partitions.
    pub(crate) long_timeout: Duration,
    /// INFO/TEXT lines the device sent, in order (shown to the user).
    pub messages: Vec<String>,
}

impl<'t> Fastboot<'t> {
    pub fn new(t: &'t mut dyn Transport) -> Self {
        Self {
            t,
            timeout: Duration::from_secs(5),
            long_timeout: Duration::from_secs(300),
            messages: Vec::new(),
        }
    }

    fn send(&mut self, cmd: &str) -> Result<(), Error> {
        let n = self
            .t
            .bulk_out(cmd.as_bytes(), self.timeout)
            .map_err(|e| Error::transport(format!("sending fastboot command '{cmd}'"), e))?;
        if n != cmd.len() {
            return Err(Error::Protocol(format!(
                "short write of fastboot command '{cmd}'"
            )));
        }
        Ok(())
    }

    /// Read replies until OKAY, FAIL or DATA; INFO/TEXT are collected on the way.
    fn reply(&mut self, cmd: &str, timeout: Duration) -> Result<FastBootResponse, Error> {
        loop {
            let mut buf = [0u8; 256];
            let n = self
                .t
                .bulk_in(&mut buf, timeout)
                .map_err(|e| Error::transport(format!("waiting for the reply to '{cmd}'"), e))?;
            let r = FastBootResponse::from_bytes(&buf[..n]).map_err(|e| {
                Error::Protocol(format!(
                    "unreadable fastboot reply to '{cmd}' ({e}): {:?}",
                    String::from_utf8_lossy(&buf[..n])
                ))
            })?;
            match r {
                FastBootResponse::Info(s) | FastBootResponse::Text(s) => {
                    tracing::info!("fastboot: {s}");
                    self.messages.push(s);
                }
                FastBootResponse::Fail(s) => {
                    return Err(Error::DeviceFailed(format!("'{cmd}' failed: {s}")))
                }
                other => return Ok(other),
            }
        }
    }

    fn command(&mut self, cmd: &str, timeout: Duration) -> Result<FastBootResponse, Error> {
        self.send(cmd)?;
        self.reply(cmd, timeout)
    }

    fn okay(&mut self, cmd: &str, timeout: Duration) -> Result<String, Error> {
        match self.command(cmd, timeout)? {
            FastBootResponse::Okay(v) => Ok(v),
            other => Err(Error::Protocol(format!(
                "unexpected reply to '{cmd}': {other:?}"
            ))),
        }
    }

    pub fn getvar(&mut self, var: &str) -> Result<String, Error> {
        let cmd = FastBootCommand::GetVar(var).to_string();
        self.okay(&cmd, self.timeout)
    }

    /// `max-download-size`, hex (`0x08000000`) or decimal.
    pub fn max_download_size(&mut self) -> Result<u32, Error> {
        let v = self.getvar("max-download-size")?;
        let v = v.trim();
        parse_u32(v)
            .or_else(|_| u32::from_str_radix(v, 16))
            .map_err(|_| {
                Error::Protocol(format!(
                    "device reported an unreadable max-download-size {v:?}"
                ))
            })
    }

    /// Partition size if the device tells (`partition-size:<p>`); `None` when it does not.
    pub fn partition_size(&mut self, part: &str) -> Result<Option<u64>, Error> {
        match self.getvar(&format!("partition-size:{part}")) {
            Ok(v) => {
                let v = v.trim();
                let parsed = match v.strip_prefix("0x") {
                    Some(h) => u64::from_str_radix(h, 16).ok(),
                    None => v.parse().ok(),
                };
                Ok(parsed)
            }
            Err(Error::DeviceFailed(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Send `data` (one download), reporting bytes sent.
    pub fn download(&mut self, data: &[u8], progress: &mut dyn FnMut(u64)) -> Result<(), Error> {
        let len = u32::try_from(data.len())
            .map_err(|_| Error::TooLarge("a single download must be under 4 GiB".into()))?;
        let cmd = FastBootCommand::<&str>::Download(len).to_string();
        match self.command(&cmd, self.timeout)? {
            FastBootResponse::Data(n) if n == len => {}
            other => {
                return Err(Error::Protocol(format!(
                    "device answered '{cmd}' with {other:?} instead of DATA{len:08x}"
                )))
            }
        }
        let mut sent = 0usize;
        for chunk in data.chunks(DOWNLOAD_CHUNK) {
            let n = self
                .t
                .bulk_out(chunk, self.timeout)
                .map_err(|e| Error::Interrupted {
                    what: "fastboot download".into(),
                    done: sent as u64,
                    total: data.len() as u64,
                    source: Box::new(Error::transport("sending download data", e)),
                })?;
            sent += n;
            progress(n as u64);
            if n != chunk.len() {
                return Err(Error::Protocol(format!(
                    "short bulk write during download: {sent} of {} bytes",
                    data.len()
                )));
            }
        }
        match self.reply(&cmd, self.timeout)? {
            FastBootResponse::Okay(_) => Ok(()),
            other => Err(Error::Protocol(format!(
                "unexpected reply after download: {other:?}"
            ))),
        }
    }

    pub fn flash(&mut self, part: &str) -> Result<(), Error> {
        let cmd = FastBootCommand::Flash(part).to_string();
        self.okay(&cmd, self.long_timeout).map(|_| ())
    }

    /// `reboot`; the device leaves the bus after OKAY (a missing OKAY is tolerated).
    pub(crate) fn reboot(&mut self) -> Result<(), Error> {
        let cmd = FastBootCommand::<&str>::Reboot.to_string();
        match self.okay(&cmd, self.timeout) {
            Ok(_)
            | Err(Error::Transport {
                source: TransportError::Gone,
                ..
            }) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

/// Builds complete sparse files of at most `max` bytes from an extent stream.
pub(crate) struct SparseEncoder {
    max: usize,
    /// Total output blocks, when the image size is known: each piece then ends with a
    /// DONT_CARE up to it, so every piece describes the whole partition.
    total_blocks: Option<u32>,
    /// Output block where the current piece starts (a leading DONT_CARE covers what precedes).
    piece_start: u32,
    /// Block the next chunk starts at.
    block: u32,
    chunks: Vec<(ChunkHeader, Vec<u8>)>,
    size: usize,
    /// A partially filled block awaiting more bytes.
    partial: Vec<u8>,
    partial_data: bool,
}

/// A finished piece, ready for `download` + `flash`.
pub(crate) struct Piece {
    pub(crate) bytes: Vec<u8>,
    /// Output byte range whose data the piece carries.
    pub(crate) covers: std::ops::Range<u64>,
    /// Image bytes sent in RAW chunks (what was written; headers, FILL and DONT_CARE are not).
    pub(crate) data_bytes: u64,
}

impl SparseEncoder {
    pub(crate) fn new(max: u32, image_size: Option<u64>) -> Result<Self, Error> {
        if max < MIN_DOWNLOAD {
            return Err(Error::TooLarge(format!(
                "the device's max-download-size is {max} bytes, too small for even one {BLOCK}-byte \
                 sparse block (needs at least {MIN_DOWNLOAD})"
            )));
        }
        let total_blocks = image_size
            .map(|s| u32::try_from(s.div_ceil(BLOCK as u64)))
            .transpose()
            .map_err(|_| Error::TooLarge("image too large for Android sparse format".into()))?;
        Ok(Self {
            max: max as usize,
            total_blocks,
            piece_start: 0,
            block: 0,
            chunks: Vec::new(),
            size: 0,
            partial: Vec::new(),
            partial_data: false,
        })
    }

    fn overhead(&self) -> usize {
        // file header + leading DONT_CARE + trailing DONT_CARE
        FILE_HEADER_BYTES_LEN + 2 * CHUNK_HEADER_BYTES_LEN
    }

    fn room(&self) -> usize {
        self.max.saturating_sub(self.overhead() + self.size)
    }

    /// Append a chunk, merging with the previous one of the same kind; emit full pieces.
    fn add(&mut self, kind: ChunkType, blocks: u32, data: &[u8], out: &mut Vec<Piece>) {
        let mut blocks = blocks;
        let mut data = data;
        while blocks > 0 {
            let need_hdr = !matches!(self.chunks.last(), Some((h, _)) if h.chunk_type == kind && kind != ChunkType::Fill);
            let hdr_cost = if need_hdr { CHUNK_HEADER_BYTES_LEN } else { 0 };
            let fits = match kind {
                ChunkType::Raw => (self.room().saturating_sub(hdr_cost) / BLOCK as usize) as u32,
                ChunkType::Fill => {
                    if self.room() >= CHUNK_HEADER_BYTES_LEN + 4 {
                        blocks
                    } else {
                        0
                    }
                }
                _ => {
                    if self.room() >= hdr_cost {
                        blocks
                    } else {
                        0
                    }
                }
            };
            if fits == 0 {
                if self.chunks.is_empty() {
                    // Cannot happen with max >= MIN_DOWNLOAD; never loop forever.
                    return;
                }
                out.push(self.finish_piece());
                continue;
            }
            let n = fits.min(blocks);
            let bytes = match kind {
                ChunkType::Raw => {
                    let (now, rest) = data.split_at(n as usize * BLOCK as usize);
                    data = rest;
                    now
                }
                ChunkType::Fill => data,
                _ => &[][..],
            };
            if need_hdr {
                let h = match kind {
                    ChunkType::Raw => ChunkHeader::new_raw(0, BLOCK),
                    ChunkType::Fill => ChunkHeader::new_fill(0),
                    _ => ChunkHeader::new_dontcare(0),
                };
                self.size += h.total_size as usize;
                self.chunks.push((h, Vec::new()));
            }
            if let Some((h, d)) = self.chunks.last_mut() {
                h.chunk_size += n;
                if kind == ChunkType::Raw {
                    h.total_size += n * BLOCK;
                    self.size += bytes.len();
                    d.extend_from_slice(bytes);
                } else if kind == ChunkType::Fill && d.is_empty() {
                    d.extend_from_slice(bytes);
                }
            }
            self.block += n;
            blocks -= n;
        }
    }

    fn finish_piece(&mut self) -> Piece {
        let mut chunks = std::mem::take(&mut self.chunks);
        if self.piece_start > 0 {
            chunks.insert(0, (ChunkHeader::new_dontcare(self.piece_start), Vec::new()));
        }
        if let Some(total) = self.total_blocks {
            if total > self.block {
                chunks.push((ChunkHeader::new_dontcare(total - self.block), Vec::new()));
            }
        }
        let header = FileHeader {
            block_size: BLOCK,
            blocks: chunks.iter().map(|(h, _)| h.chunk_size).sum(),
            chunks: chunks.len() as u32,
            checksum: 0,
        };
        let mut bytes = Vec::with_capacity(self.size + self.overhead());
        bytes.extend_from_slice(&header.to_bytes());
        for (h, d) in &chunks {
            bytes.extend_from_slice(&h.to_bytes());
            bytes.extend_from_slice(d);
        }
        let covers = self.piece_start as u64 * BLOCK as u64..self.block as u64 * BLOCK as u64;
        let data_bytes = chunks
            .iter()
            .filter(|(h, _)| h.chunk_type == ChunkType::Raw)
            .map(|(_, d)| d.len() as u64)
            .sum();
        self.piece_start = self.block;
        self.size = 0;
        Piece {
            bytes,
            covers,
            data_bytes,
        }
    }

    /// Feed bytes of one kind at the current position (extents arrive in order).
    fn feed(&mut self, kind: ExtentKind, data: &[u8], len: u64, out: &mut Vec<Piece>) {
        let mut len = len;
        let mut data = data;
        // Complete a pending partial block first.
        if !self.partial.is_empty() {
            let take = ((BLOCK as usize - self.partial.len()) as u64).min(len) as usize;
            match kind {
                ExtentKind::Data => {
                    self.partial.extend_from_slice(&data[..take]);
                    data = &data[take..];
                    self.partial_data = true;
                }
                _ => self.partial.resize(self.partial.len() + take, 0),
            }
            len -= take as u64;
            if self.partial.len() == BLOCK as usize {
                self.flush_partial(out);
            }
        }
        let whole = (len / BLOCK as u64) as u32;
        let whole_bytes = whole as usize * BLOCK as usize;
        if whole > 0 {
            match kind {
                ExtentKind::Data => {
                    self.add(ChunkType::Raw, whole, &data[..whole_bytes], out);
                    data = &data[whole_bytes..];
                }
                ExtentKind::Zero => self.add(ChunkType::Fill, whole, &[0; 4], out),
                ExtentKind::Skip => self.add(ChunkType::DontCare, whole, &[], out),
            }
        }
        let rest = (len - whole_bytes as u64) as usize;
        if rest > 0 {
            match kind {
                ExtentKind::Data => {
                    self.partial.extend_from_slice(&data[..rest]);
                    self.partial_data = true;
                }
                _ => self.partial.resize(rest, 0),
            }
        }
    }

    fn flush_partial(&mut self, out: &mut Vec<Piece>) {
        let mut block = std::mem::take(&mut self.partial);
        block.resize(BLOCK as usize, 0);
        if std::mem::take(&mut self.partial_data) {
            self.add(ChunkType::Raw, 1, &block, out);
        } else {
            // Only zero/unmapped bytes: zeroes are correct for both.
            self.add(ChunkType::Fill, 1, &[0; 4], out);
        }
    }

    /// Encode a whole extent stream, handing each piece to `sink` as soon as it is full (so
    /// memory stays at one piece).
    pub(crate) fn encode(
        mut self,
        src: &mut dyn ExtentSource,
        sink: &mut dyn FnMut(Piece) -> Result<(), Error>,
    ) -> Result<u64, Error> {
        let mut buf = vec![0u8; 1 << 20];
        let mut out = Vec::new();
        let mut end = 0u64;
        while let Some(ext) = src.next_extent(&mut buf)? {
            let data = match ext.kind {
                ExtentKind::Data => buf
                    .get(..ext.len as usize)
                    .ok_or_else(|| Error::Protocol("extent longer than its buffer".into()))?,
                _ => &[][..],
            };
            self.feed(ext.kind, data, ext.len, &mut out);
            end = ext.end();
            for p in out.drain(..) {
                sink(p)?;
            }
        }
        if !self.partial.is_empty() {
            self.flush_partial(&mut out);
        }
        if !self.chunks.is_empty() {
            out.push(self.finish_piece());
        }
        for p in out.drain(..) {
            sink(p)?;
        }
        Ok(end)
    }
}

/// Cut an existing Android sparse file (e.g. `img2simg` output) into pieces under `max` with
/// `android-sparse-image`'s splitter, without decoding it.
pub fn split_sparse_file(path: &str, bytes: &[u8], max: u32) -> Result<Vec<Vec<u8>>, Error> {
    let bad = |offset: usize, msg: &str| {
        Error::Image(crate::image::ImageError::Corrupt {
            path: path.into(),
            offset: offset as u64,
            msg: msg.into(),
        })
    };
    let hdr: &[u8; FILE_HEADER_BYTES_LEN] = bytes
        .get(..FILE_HEADER_BYTES_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad(0, "truncated sparse header"))?;
    let header = FileHeader::from_bytes(hdr).map_err(|e| bad(0, &e.to_string()))?;
    let mut chunks = Vec::new();
    let mut off = FILE_HEADER_BYTES_LEN;
    for _ in 0..header.chunks {
        let ch: &[u8; CHUNK_HEADER_BYTES_LEN] = bytes
            .get(off..off + CHUNK_HEADER_BYTES_LEN)
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| bad(off, "truncated chunk header"))?;
        let c = ChunkHeader::from_bytes(ch).map_err(|e| bad(off, &e.to_string()))?;
        if (c.total_size as usize) < CHUNK_HEADER_BYTES_LEN
            || off + c.total_size as usize > bytes.len()
        {
            return Err(bad(off, "chunk extends past the end of the file"));
        }
        off += c.total_size as usize;
        chunks.push(c);
    }
    let splits = android_sparse_image::split::split_image(&header, &chunks, max).map_err(|_| {
        Error::TooLarge(format!(
            "the device's max-download-size ({max} bytes) is too small to carry a chunk of {path}"
        ))
    })?;
    Ok(splits
        .iter()
        .map(|s| {
            let mut out = Vec::with_capacity(s.sparse_size());
            out.extend_from_slice(&s.header.to_bytes());
            for c in &s.chunks {
                out.extend_from_slice(&c.header.to_bytes());
                out.extend_from_slice(&bytes[c.offset..c.offset + c.size]);
            }
            out
        })
        .collect())
}

/// Is this an Android sparse file?
pub fn is_sparse(bytes: &[u8]) -> bool {
    bytes.len() >= 4
        && u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])
            == android_sparse_image::HEADER_MAGIC
}
