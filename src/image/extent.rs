//! The extent stream: the one representation of an image that every sink consumes.

/// What a range of the logical image holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExtentKind {
    /// Bytes that must be written; the source copied them into the caller's buffer.
    Data,
    /// Known zero bytes (a FILL-zero chunk, a hole in a raw file, a zero run found while
    /// streaming): a sink may discard or zero-out instead of writing when the target reads
    /// back zeroes.
    Zero,
    /// Unmapped: contents do not matter (bmap gap, sparse DONT_CARE). Hashed as zeroes.
    Skip,
}

/// A range of the logical image. Extents from one source are ordered and contiguous.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
    pub kind: ExtentKind,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// A pull-based stream of extents. The caller owns the buffers (aligned, pooled), so sources
/// never allocate per extent and sinks can write them with O_DIRECT.
pub trait ExtentSource: Send {
    /// Logical size of the image if known before the end (raw files, bmap, sparse headers).
    fn size_hint(&self) -> Option<u64>;

    /// Produce the next extent. For `Data`, the bytes are copied into `buf[..len]` and
    /// `len <= buf.len()`; `Zero`/`Skip` extents may be of any length and leave `buf` alone.
    /// Returns `Ok(None)` at the end of the image.
    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, super::ImageError>;

    /// A short description for messages ("zstd-compressed raw, bmap 2.0").
    fn describe(&self) -> String;
}
