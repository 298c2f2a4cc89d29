//! Errors of the board module. Descriptor errors always carry `file:line:col` so the user can
//! jump to the offending key.

use crate::exit::{Classify, Exit};
use std::fmt;

/// A position in a descriptor file (1-based line and column).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Location {
    pub(crate) file: String,
    pub(crate) line: usize,
    pub(crate) col: usize,
}

impl Location {
    /// Line/column of byte offset `at` in `text`.
    pub(crate) fn at(file: &str, text: &str, at: usize) -> Location {
        let at = at.min(text.len());
        let before = &text[..at];
        let line = before.matches('\n').count() + 1;
        let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
        let col = before[line_start..].chars().count() + 1;
        Location {
            file: file.to_string(),
            line,
            col,
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}:{}", self.file, self.line, self.col)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum BoardError {
    /// A descriptor does not parse or fails validation.
    #[error("{loc}: {msg}")]
    Descriptor { loc: Location, msg: String },
    /// Reading a descriptor directory or file failed.
    #[error("{path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// No board with this id or alias; `suggestions` are preformatted ("`opi5`").
    #[error("unknown board `{id}`{}", suggest(.suggestions))]
    UnknownBoard {
        id: String,
        suggestions: Vec<String>,
    },
    /// The board has no such medium.
    #[error("board `{board}` has no {medium} storage (it has: {available})")]
    UnknownMedium {
        board: String,
        medium: String,
        available: String,
    },
    /// The image check found problems and `--strict` was given.
    #[error("image does not fit board `{board}`:\n{findings}")]
    ImageMismatch { board: String, findings: String },
    /// A bootloader cannot be placed as asked.
    #[error("bootloader placement: {0}")]
    Placement(String),
    /// Writing or reading back a placed file on the target failed.
    #[error("bootloader placement: {0}")]
    Target(#[from] crate::write::WriteError),
}

fn suggest(s: &[String]) -> String {
    if s.is_empty() {
        "; run `sbcflash boards` for the list".to_string()
    } else {
        format!("; did you mean {}?", s.join(" or "))
    }
}

impl Classify for BoardError {
    fn exit(&self) -> Exit {
        match self {
            BoardError::Io { source, .. } if source.kind() == std::io::ErrorKind::Interrupted => {
                Exit::Interrupted
            }
            BoardError::Io { .. } => Exit::Io,
            BoardError::Descriptor { .. } => Exit::BadInput,
            BoardError::UnknownBoard { .. } | BoardError::UnknownMedium { .. } => Exit::Usage,
            // The image is inconsistent with the board (input), not a target rule (4).
            BoardError::ImageMismatch { .. } => Exit::BadInput,
            BoardError::Placement(_) => Exit::BadInput,
            BoardError::Target(e) => e.exit(),
        }
    }
}
