//! Images as one stream of extents, whatever their format.
//!
//! Every input (raw file, compressed stream, bmap-described raw, Android sparse) becomes an
//! [`ExtentSource`]: the logical (decompressed, unsparsed) image as an ordered, gap-free
//! sequence of [`Extent`]s. Sinks (block device, file, rockusb, fastboot) consume that one
//! stream, so sparse handling, hashing, progress and verification are written once.
//!
//! Hashing rule: the blake3 of an image is the blake3 of its logical bytes, with `Zero` and
//! `Skip` ranges hashed as zero bytes. For a raw image with a bmap that is `b3sum image.img`
//! (unmapped bmap ranges are holes, which read as zeroes).
//!
//! Layout: [`detect`] (magic bytes, decompressors), [`scan`] (raw files and streams, zero
//! blocks, bmap checks), [`bmap`] (the sidecar), [`sparse`] (Android sparse), [`digest`]
//! (blake3 and b3sum sidecars), [`zip`] (one member of a `.zip` as a stream), [`open`] (putting
//! it together: [`open_image`]), [`sniff`] (does the logical image look like a disk image at
//! all?), [`unmapped`] (data a stale bmap would leave out).

pub mod bmap;
pub(crate) mod buffer;
pub(crate) mod detect;
pub mod digest;
mod extent;
pub mod open;
pub(crate) mod peek;
pub(crate) mod scan;
pub(crate) mod sniff;
pub mod sparse;
pub(crate) mod unmapped;
pub(crate) mod zero;
pub(crate) mod zip;

pub use bmap::Bmap;
pub(crate) use detect::Format;
pub use digest::LogicalHasher;
pub use extent::{Extent, ExtentKind, ExtentSource, SharedData};
pub use open::{
    from_reader, from_reader_member, open_image, read_logical_prefix, read_prefix, OpenOptions,
    OpenedImage,
};
pub(crate) use peek::HeadPeek;

/// Errors about the input image. Each names the file and, where it applies, the offset.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: at offset {offset}: {msg}")]
    Corrupt {
        path: String,
        offset: u64,
        msg: String,
    },
    #[error("{path}: {msg}")]
    Invalid { path: String, msg: String },
    /// The image's bytes in a mapped range are not what the bmap says: the image changed after
    /// the bmap was made (or the bmap belongs to another image).
    #[error(
        "{path}: the bmap {bmap} does not match the image: checksum mismatch for range {start}..{end}: the bmap says {expected}, the image has {actual}; the image changed after its bmap was made: recreate the bmap (bmaptool create) or write without it (--no-bmap)"
    )]
    RangeChecksum {
        path: String,
        bmap: String,
        start: u64,
        end: u64,
        expected: String,
        actual: String,
    },
    #[error("{path}: blake3 mismatch: expected {expected}, got {actual}")]
    Digest {
        path: String,
        expected: String,
        actual: String,
    },
}

impl crate::exit::Classify for ImageError {
    fn exit(&self) -> crate::exit::Exit {
        use crate::exit::Exit;
        match self {
            ImageError::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted => {
                Exit::Interrupted
            }
            ImageError::Io { .. } => Exit::Io,
            _ => Exit::BadInput,
        }
    }
}
