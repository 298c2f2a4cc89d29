//! One block-write job: a target claimed under the safety policy ([`crate::target::open`]:
//! O_EXCL, O_DIRECT on a device), the image written and read back through the pipeline, then
//! the post-write steps (bootloader placement, the station's identity files) on the same
//! claimed descriptor. Nothing else can claim the target between the steps, and every
//! read-back comes from the medium, not the page cache. `write`, `bootstrap --flash-via ums`
//! and the station's block slots all run this one job.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::board::{BoardError, PlacedFile};
use crate::image::{ExtentSource, OpenedImage};
use crate::progress::Reporter;
use crate::target::{OpenTarget, Policy, TargetError};
use crate::write::{self, Sink, WriteError, WriteOptions, WriteReport};

/// A claimed target: the sink the image goes to and a second descriptor on the same open
/// file (same O_EXCL claim, same O_DIRECT flag) for steps that need a [`File`].
pub struct BlockJob {
    /// The resolved target path (the job name in progress events).
    pub(crate) path: PathBuf,
    /// The target was opened with O_DIRECT.
    pub(crate) direct: bool,
    /// What was opened (its size: the station's card check probes up to it).
    pub(crate) info: crate::target::TargetInfo,
    file: File,
    sink: Box<dyn Sink>,
}

/// The safety policy for writing `opened` (opened from `image`): its logical size must fit
/// the target, and neither the image nor its bmap may be the target.
pub(crate) fn policy_for(image: &Path, opened: &OpenedImage, force: bool) -> Policy {
    let mut image_paths = vec![image.to_path_buf()];
    image_paths.extend(opened.bmap.clone());
    Policy {
        image_size: opened.logical_size,
        force,
        image_paths,
    }
}

impl BlockJob {
    /// Claim `target` under `policy` ([`crate::target::open`]: every safety rule, O_EXCL);
    /// `discard: false` keeps a device from being discarded before the write.
    pub fn claim(target: &Path, policy: &Policy, discard: bool) -> Result<BlockJob, TargetError> {
        BlockJob::from_open(crate::target::open(target, policy)?, discard)
    }

    /// [`BlockJob::claim`] on a target the caller already opened.
    pub(crate) fn from_open(t: OpenTarget, discard: bool) -> Result<BlockJob, TargetError> {
        let io = |source| TargetError::Io {
            path: t.path.display().to_string(),
            op: "duplicate descriptor",
            source,
        };
        let file = t.file.try_clone().map_err(io)?;
        let (path, info, direct) = (t.path.clone(), t.info.clone(), t.direct);
        // Setting up the sink only asks the descriptor its size and type: an open error.
        let path_text = t.path.display().to_string();
        let sink = t.into_sink_with(discard).map_err(|e| match e {
            WriteError::Io { op, source, .. } => TargetError::Io {
                path: path_text.clone(),
                op,
                source,
            },
            e => TargetError::Io {
                path: path_text.clone(),
                op: "open",
                source: std::io::Error::other(e.to_string()),
            },
        })?;
        Ok(BlockJob {
            path,
            direct,
            info,
            file,
            sink,
        })
    }

    /// The target's name in progress events and messages.
    pub(crate) fn name(&self) -> String {
        self.path.display().to_string()
    }

    /// Write `source` with the pipeline (and read it back when `opts.verify`).
    pub(crate) fn write(
        &mut self,
        source: Box<dyn ExtentSource>,
        opts: &WriteOptions,
        reporter: &dyn Reporter,
    ) -> Result<WriteReport, WriteError> {
        write::run(source, self.sink.as_mut(), opts, reporter)
    }

    /// Post-write: the `--bootloader` files at their offsets, through the claimed sink, read
    /// back from the medium ([`crate::board::place::write_placed`]).
    pub(crate) fn place(&mut self, files: &[PlacedFile]) -> Result<(), BoardError> {
        if files.is_empty() {
            return Ok(());
        }
        crate::board::place::write_placed(self.sink.as_mut(), files)
    }

    /// The claimed descriptor, for post-write steps that work on a [`File`] (FAT identity).
    pub(crate) fn file(&self) -> &File {
        &self.file
    }
}
