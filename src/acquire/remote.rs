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
pub fn is_url(arg: &str) -> bool {
    arg.starts_with("https://") || arg.starts_with("http://")
}

/// What must be checked after writing a remote image.
pub struct RemoteCheck {
    pub spec: SourceSpec,
    check: StreamCheck,
    acq: Acquirer,
    head: Vec<u8>,
    job: String,
}

/// Opens `spec` as an extent source (from the cache when its pin is there, else streamed
/// from the network; with `keep`, a copy is committed to the cache once it verifies).
/// `job` is the write's job (the target), so progress and events of the download and the
/// write form one job.
pub fn open_for_write(
    acq: Acquirer,
    spec: SourceSpec,
    keep: bool,
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
    let source = image::from_reader(reader, &name, None, None).map_err(real_cause)?;
    // The board check needs the image's head before the first byte reaches the target.
    let (source, head) =
        HeadPeek::new(source, crate::board::check::HEAD_LEN).map_err(real_cause)?;
    let source: Box<dyn image::ExtentSource> = Box::new(source);
    let opened = OpenedImage {
        description: format!("{} (streamed)", source.describe()),
        logical_size: source.size_hint(),
        source,
        path: PathBuf::from(&spec.url),
        formats: Vec::new(),
        bmap: None,
        mapped_size: None,
        input_size: 0,
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
    pub fn head(&self) -> &[u8] {
        &self.head
    }

    /// Call with the write pipeline's result: a transfer failure or a digest mismatch replaces
    /// the pipeline's generic read error with the real cause; a successful write is only
    /// reported as such once the source digest checked out.
    pub fn finish<T, E>(self, write_result: Result<T, E>) -> anyhow::Result<T>
    where
        E: std::error::Error + Send + Sync + 'static,
    {
        match write_result {
            Err(e) => {
                if let Some(f) = self.check.take_failure() {
                    return Err(anyhow::Error::new(f).context(e.to_string()));
                }
                // The image failed to decode: was it what the publisher hashed? Read the rest
                // of the download and check, so a tampered or truncated file is named as such.
                if self.check.has_pin() && is_image_error(&e) {
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
                c.downcast_ref::<crate::write::WriteError>(),
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

/// Reads the first `want` logical bytes of a streamed image (for the board check) and then
/// replays what it read, so the writer sees the whole stream. Nothing is read twice and the
/// network stream is not restarted: the extents are kept (at most `want` plus one buffer).
struct HeadPeek {
    inner: Box<dyn image::ExtentSource>,
    /// Extents already pulled from `inner`, with their data for `Data` ones.
    queue: std::collections::VecDeque<(image::Extent, Vec<u8>)>,
}

impl HeadPeek {
    fn new(
        mut inner: Box<dyn image::ExtentSource>,
        want: usize,
    ) -> Result<(HeadPeek, Vec<u8>), image::ImageError> {
        let mut head = Vec::with_capacity(want);
        let mut queue = std::collections::VecDeque::new();
        let mut buf = vec![0u8; 1 << 20];
        while head.len() < want {
            let Some(e) = inner.next_extent(&mut buf)? else {
                break;
            };
            let take = (want - head.len()).min(usize::try_from(e.len).unwrap_or(usize::MAX));
            match e.kind {
                image::ExtentKind::Data => {
                    head.extend_from_slice(&buf[..take]);
                    queue.push_back((e, buf[..e.len as usize].to_vec()));
                }
                // Unmapped ranges read as zeroes on a fresh target too: check them as such.
                _ => {
                    head.resize(head.len() + take, 0);
                    queue.push_back((e, Vec::new()));
                }
            }
        }
        Ok((HeadPeek { inner, queue }, head))
    }
}

impl image::ExtentSource for HeadPeek {
    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }

    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<image::Extent>, image::ImageError> {
        let Some((e, data)) = self.queue.front_mut() else {
            return self.inner.next_extent(buf);
        };
        if e.kind != image::ExtentKind::Data {
            let e = *e;
            self.queue.pop_front();
            return Ok(Some(e));
        }
        // The caller's buffer may be smaller than the one the head was read with: split.
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        let out = image::Extent {
            offset: e.offset,
            len: n as u64,
            kind: image::ExtentKind::Data,
        };
        if n == data.len() {
            self.queue.pop_front();
        } else {
            data.drain(..n);
            e.offset += n as u64;
            e.len -= n as u64;
        }
        Ok(Some(out))
    }

    fn describe(&self) -> String {
        self.inner.describe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Extents of a fixed script, data filled with the offset's low byte.
    struct Script(std::collections::VecDeque<image::Extent>);

    impl image::ExtentSource for Script {
        fn size_hint(&self) -> Option<u64> {
            None
        }
        fn next_extent(
            &mut self,
            buf: &mut [u8],
        ) -> Result<Option<image::Extent>, image::ImageError> {
            let Some(e) = self.0.pop_front() else {
                return Ok(None);
            };
            if e.kind == image::ExtentKind::Data {
                for (i, b) in buf[..e.len as usize].iter_mut().enumerate() {
                    *b = (e.offset + i as u64) as u8;
                }
            }
            Ok(Some(e))
        }
        fn describe(&self) -> String {
            "script".into()
        }
    }

    fn logical(src: &mut dyn image::ExtentSource, bufsize: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; bufsize];
        while let Some(e) = src.next_extent(&mut buf).unwrap() {
            assert_eq!(e.offset, out.len() as u64, "extents are contiguous");
            match e.kind {
                image::ExtentKind::Data => out.extend_from_slice(&buf[..e.len as usize]),
                _ => out.resize(out.len() + e.len as usize, 0),
            }
        }
        out
    }

    #[test]
    fn head_peek_replays_the_whole_stream() {
        use image::ExtentKind::*;
        let ext = |offset, len, kind| image::Extent { offset, len, kind };
        let script = || {
            Script(
                [
                    ext(0, 700_000, Data),
                    ext(700_000, 3_000_000, Zero),
                    ext(3_700_000, 1_000_000, Data),
                    ext(4_700_000, 9_000_000, Skip),
                    ext(13_700_000, 5, Data),
                ]
                .into(),
            )
        };
        let want = logical(&mut script(), 1 << 20);
        for bufsize in [4096, 1 << 20] {
            let (mut p, head) = HeadPeek::new(Box::new(script()), 4 << 20).unwrap();
            assert_eq!(head, want[..4 << 20]);
            assert_eq!(logical(&mut p, bufsize), want, "buffer {bufsize}");
        }
        // A stream shorter than the head: all of it, once.
        let (mut p, head) = HeadPeek::new(Box::new(script()), 64 << 20).unwrap();
        assert_eq!(head, want);
        assert_eq!(logical(&mut p, 1 << 20), want);
    }
}
