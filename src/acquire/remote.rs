//! Opening a remote image (a URL, or a board's default source) for a one-pass write:
//! download → decompress → write, no temporary copy, verified end to end.
//!
//! The `write` command calls [`open_for_write`] instead of `image::open_image` and hands the
//! write pipeline's result to [`RemoteImage::finish`]. The downloaded bytes are hashed as they
//! pass; when a pin does not match, the stream fails at its end, before the write pipeline
//! writes its held-back first MiB, and the error says the target holds a bad image.

use super::source::{Acquirer, SourceSpec};
use super::stream::StreamCheck;
use crate::image::{self, OpenedImage};
use std::io::Read;
use std::path::PathBuf;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

/// Does this IMAGE argument name a remote source rather than a local file?
pub(crate) fn is_url(arg: &str) -> bool {
    arg.starts_with("https://") || arg.starts_with("http://")
}

/// What must be checked after writing a remote image.
pub(crate) struct RemoteCheck {
    pub(crate) spec: SourceSpec,
    check: StreamCheck,
    acq: Acquirer,
    head: Vec<u8>,
    job: String,
}

/// Opens `spec` as an extent source (from the cache when its pin is there, else streamed
/// from the network; with `keep`, a copy is committed to the cache once it verifies).
/// `job` is the write's job (the target), so progress and events of the download and the
/// write form one job. `member`: which member of a zip to write (`--member`).
pub(crate) fn open_for_write(
    acq: Acquirer,
    spec: SourceSpec,
    keep: bool,
    member: Option<&str>,
    job: String,
) -> anyhow::Result<(OpenedImage, RemoteCheck)> {
    let (reader, check) = acq.open_stream_as(&spec, keep, job.clone())?;
    let consumed = Arc::new(AtomicU64::new(0));
    let counting = image::detect::CountingReader::new(reader, consumed.clone());
    let reader: Box<dyn Read + Send> = Box::new(EndCheck {
        inner: counting,
        check: check.clone_handle(),
    });
    let name = spec.url.clone();
    // A transfer error at the very start reads as an image error: report the real cause.
    let real_cause = |e: image::ImageError| match check.take_failure() {
        Some(f) => anyhow::Error::new(f),
        None => anyhow::Error::new(e),
    };
    let source =
        image::from_reader_member(reader, &name, None, None, member).map_err(real_cause)?;
    // The board check needs the image's head before the first byte reaches the target.
    let (source, head) =
        image::HeadPeek::new(source, crate::board::check::HEAD_LEN).map_err(real_cause)?;
    let source: Box<dyn image::ExtentSource> = Box::new(source);
    let opened = OpenedImage {
        description: format!("{} (streamed)", source.describe()),
        logical_size: source.size_hint(),
        source,
        path: PathBuf::from(&spec.url),
        formats: Vec::new(),
        bmap: None,
        input_consumed: consumed,
    };
    Ok((
        opened,
        RemoteCheck {
            spec,
            check,
            acq,
            head,
            job,
        },
    ))
}

impl RemoteCheck {
    /// The first [`crate::board::check::HEAD_LEN`] bytes of the logical (decompressed) image,
    /// read before anything was written, for the image-vs-board check.
    pub(crate) fn head(&self) -> &[u8] {
        &self.head
    }

    /// Call with the write pipeline's result: a transfer failure or a digest mismatch replaces
    /// the pipeline's generic read error with the real cause; a successful write is only
    /// reported as such once the source digest checked out.
    pub(crate) fn finish<T, E>(self, write_result: Result<T, E>) -> anyhow::Result<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        match write_result {
            Err(e) => {
                // The image layer saw the transfer's failure only as a read error of the
                // decompressor ("zstd data is corrupt or truncated"): name the real cause alone.
                let image_side = is_image_error(&e);
                if let Some(f) = self.check.take_failure() {
                    return Err(if image_side {
                        anyhow::Error::new(f)
                    } else {
                        anyhow::Error::new(f).context(e.to_string())
                    });
                }
                // The image failed to decode: was it what the publisher hashed? Read the rest
                // of the download and check, so a tampered or truncated file is named as such.
                if self.check.has_pin() && image_side {
                    if let Err(f) = self.check.finish(true) {
                        return Err(anyhow::Error::new(f).context(e.to_string()));
                    }
                }
                Err(e.into())
            }
            Ok(v) => {
                let res = self.check.finish(true)?;
                self.acq.report_stream_as(&self.spec, &res, self.job);
                Ok(v)
            }
        }
    }
}

fn is_image_error(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    while let Some(c) = cur {
        if c.downcast_ref::<image::ImageError>().is_some()
            || matches!(
                c.downcast_ref::<crate::write::WriteError>()
                    .map(crate::write::WriteError::cause),
                Some(crate::write::WriteError::Image(_))
            )
        {
            return true;
        }
        cur = c.source();
    }
    false
}

/// Makes the digest check part of the stream: at the end of the download, a mismatch becomes
/// a read error, so the pipeline stops before it writes the partition table.
struct EndCheck<R> {
    inner: R,
    check: StreamCheck,
}

impl<R: Read> Read for EndCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            if let Err(e) = self.check.check_at_end() {
                let msg = e.to_string();
                self.check.set_failure(e);
                return Err(std::io::Error::new(std::io::ErrorKind::InvalidData, msg));
            }
        }
        Ok(n)
    }
}
