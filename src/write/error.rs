//! The write pipeline's error type: every variant names the target (or image) and, where it
//! applies, the byte offset, so a user can tell a bad card from a bad image.

use crate::exit::{Classify, Exit};
use crate::image::ImageError;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    /// The OS refused an operation on the target.
    #[error("{target}: {op} failed at offset {offset} (length {len}): {source}")]
    Io {
        target: String,
        op: &'static str,
        offset: u64,
        len: u64,
        #[source]
        source: std::io::Error,
    },
    /// The image could not be read or is malformed (names the image file and offset).
    #[error(transparent)]
    Image(#[from] ImageError),
    /// Ctrl-C or a cancel request. The first MiB (partition table) was not written.
    #[error("{target}: interrupted after {done} bytes; {INCOMPLETE}")]
    Interrupted { target: String, done: u64 },
    /// Read-back found bytes on the target that differ from what was written.
    #[error("{target}: verification FAILED: range at offset {offset} (length {len}) differs from the image; the target is not good")]
    Mismatch {
        target: String,
        offset: u64,
        len: u64,
    },
    /// The logical image's blake3 differs from the expected digest.
    #[error("{image}: blake3 mismatch: expected {expected}, image has {actual}; {target} is not good{}", if *.head_written { "" } else { " (its partition table was not written)" })]
    Digest {
        image: String,
        target: String,
        /// The digest, and where it came from (`--blake3`, a sidecar file) when known.
        expected: String,
        actual: String,
        head_written: bool,
    },
    /// The image turned out larger than the target (found while streaming an image whose size
    /// was not known in advance).
    #[error("{target}: the image does not fit: it reaches offset {end} but the target holds {capacity} bytes")]
    TooLarge {
        target: String,
        end: u64,
        capacity: u64,
    },
    /// A source broke the extent contract (a bug in a source, reported rather than trusted).
    #[error("{image}: extent stream is inconsistent at offset {offset}: {msg}")]
    Stream {
        image: String,
        offset: u64,
        msg: String,
    },
    /// A worker thread panicked.
    #[error("internal error: {0}")]
    Internal(String),
    /// A failure whose own message does not say what it left on the target, with that state:
    /// every failed write says whether the target can be used.
    #[error("{source}; {state}")]
    Failed {
        #[source]
        source: Box<WriteError>,
        state: TargetState,
    },
}

/// What a failed write left on the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum TargetState {
    /// Nothing was written or discarded.
    Untouched,
    /// Written in part; the held-back first MiB (partition table) was not written.
    Incomplete,
    /// The failure came while the first MiB itself was being written.
    IncompleteHead,
    /// The whole image was written, but the write did not complete or verify.
    Unverified,
}

impl std::fmt::Display for TargetState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TargetState::Untouched => "the target was not changed",
            TargetState::Incomplete => INCOMPLETE,
            TargetState::IncompleteHead => {
                "the target is INCOMPLETE (its partition table may be partly written) and must be written again"
            }
            TargetState::Unverified => {
                "the image was written but not verified: do not trust the target; write it again"
            }
        })
    }
}

/// The one sentence for a target without its partition table.
pub(crate) const INCOMPLETE: &str =
    "the target is INCOMPLETE (no valid partition table was written) and must be written again";

impl Classify for WriteError {
    fn exit(&self) -> Exit {
        match self {
            WriteError::Io { source, .. } if source.kind() == std::io::ErrorKind::TimedOut => {
                Exit::Timeout
            }
            WriteError::Io { .. } => Exit::Io,
            WriteError::Image(e) => e.exit(),
            WriteError::Interrupted { .. } => Exit::Interrupted,
            WriteError::Mismatch { .. } | WriteError::Digest { .. } => Exit::Verify,
            WriteError::TooLarge { .. } => Exit::Refused,
            WriteError::Stream { .. } => Exit::BadInput,
            WriteError::Internal(_) => Exit::Failure,
            WriteError::Failed { source, .. } => source.exit(),
        }
    }
}

impl WriteError {
    /// The error under a [`WriteError::Failed`] note.
    pub(crate) fn cause(&self) -> &WriteError {
        match self {
            WriteError::Failed { source, .. } => source.cause(),
            e => e,
        }
    }

    /// Adds what the failure left on the target, unless the message already says it.
    pub(crate) fn with_state(self, state: TargetState) -> WriteError {
        match self {
            WriteError::Interrupted { .. }
            | WriteError::Mismatch { .. }
            | WriteError::Digest { .. }
            | WriteError::Failed { .. } => self,
            e => WriteError::Failed {
                source: Box::new(e),
                state,
            },
        }
    }

    pub(crate) fn io(
        target: &str,
        op: &'static str,
        offset: u64,
        len: u64,
        source: std::io::Error,
    ) -> Self {
        WriteError::Io {
            target: target.to_string(),
            op,
            offset,
            len,
            source,
        }
    }
}
