//! Look at an image's head before writing it, when the image cannot be read twice.
//!
//! Bmap range checks stay with the inner source (inline): the checker must see every extent
//! from the first, and the head has already been pulled when the pipeline would take it.

use super::{Extent, ExtentKind, ExtentSource, ImageError};

/// Reads the first `want` logical bytes of a stream (a download, a pipe) for the board check,
/// then replays what it read, so the writer sees the whole stream. Nothing is read twice and the
/// stream is not restarted: the extents are kept (at most `want` plus one buffer).
pub struct HeadPeek {
    inner: Box<dyn ExtentSource>,
    /// Extents already pulled from `inner`, with their data for `Data` ones.
    queue: std::collections::VecDeque<(Extent, Vec<u8>)>,
}

impl HeadPeek {
    pub fn new(
        mut inner: Box<dyn ExtentSource>,
        want: usize,
    ) -> Result<(HeadPeek, Vec<u8>), ImageError> {
        let mut head = Vec::with_capacity(want);
        let mut queue = std::collections::VecDeque::new();
        let mut buf = vec![0u8; 1 << 20];
        while head.len() < want {
            let Some(e) = inner.next_extent(&mut buf)? else {
                break;
            };
            let take = (want - head.len()).min(usize::try_from(e.len).unwrap_or(usize::MAX));
            match e.kind {
                ExtentKind::Data => {
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

impl ExtentSource for HeadPeek {
    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }

    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        let Some((e, data)) = self.queue.front_mut() else {
            return self.inner.next_extent(buf);
        };
        if e.kind != ExtentKind::Data {
            let e = *e;
            self.queue.pop_front();
            return Ok(Some(e));
        }
        // The caller's buffer may be smaller than the one the head was read with: split.
        let n = data.len().min(buf.len());
        buf[..n].copy_from_slice(&data[..n]);
        let out = Extent {
            offset: e.offset,
            len: n as u64,
            kind: ExtentKind::Data,
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
    struct Script(std::collections::VecDeque<Extent>);

    impl ExtentSource for Script {
        fn size_hint(&self) -> Option<u64> {
            None
        }
        fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
            let Some(e) = self.0.pop_front() else {
                return Ok(None);
            };
            if e.kind == ExtentKind::Data {
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

    fn logical(src: &mut dyn ExtentSource, bufsize: usize) -> Vec<u8> {
        let mut out = Vec::new();
        let mut buf = vec![0u8; bufsize];
        while let Some(e) = src.next_extent(&mut buf).unwrap() {
            assert_eq!(e.offset, out.len() as u64, "extents are contiguous");
            match e.kind {
                ExtentKind::Data => out.extend_from_slice(&buf[..e.len as usize]),
                _ => out.resize(out.len() + e.len as usize, 0),
            }
        }
        out
    }

    #[test]
    fn head_peek_replays_the_whole_stream() {
        use ExtentKind::*;
        let ext = |offset, len, kind| Extent { offset, len, kind };
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
