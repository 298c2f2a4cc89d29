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
    pub(crate) fn end(&self) -> u64 {
        self.offset + self.len
    }
}

/// The bytes of a `Data` extent handed out without copying: `buf[start..start + len]` of a
/// pooled, aligned buffer the source filled (decompressed or read) directly.
pub struct SharedData {
    pub(crate) buf: super::buffer::Shared,
    pub(crate) start: usize,
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

    /// Hand the source's content checks (bmap range checksums) to the caller, before the
    /// first extent: the caller then feeds every extent, in order, to the checker and must
    /// fail when it does. Lets a pipeline verify them on another thread. `None`: the source
    /// has nothing to hand over (it keeps checking inline, if it checks at all).
    fn take_range_checker(&mut self) -> Option<super::bmap::RangeChecker> {
        None
    }

    /// True when [`ExtentSource::next_shared`] works: the source reads into pooled aligned
    /// buffers and can lend them out instead of copying into the caller's.
    fn shares_buffers(&self) -> bool {
        false
    }

    /// Like `next_extent`, but a `Data` extent's bytes come as a [`SharedData`] slice of the
    /// source's own buffer (no copy; the buffer returns to the source's pool when every
    /// holder has dropped it). Only when [`ExtentSource::shares_buffers`] says so.
    #[allow(clippy::type_complexity)]
    fn next_shared(&mut self) -> Result<Option<(Extent, Option<SharedData>)>, super::ImageError> {
        Err(super::ImageError::Invalid {
            path: self.describe(),
            msg: "this source does not lend its buffers".into(),
        })
    }
}
