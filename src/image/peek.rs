//! Look at an image's head before writing it, when the image cannot be read twice.
//!
//! Bmap range checks stay with the inner source (inline): the checker must see every extent
//! from the first, and the head has already been pulled when the pipeline would take it.

use super::{Extent, ExtentKind, ExtentSource, ImageError, SharedData};

/// The bytes of a pulled `Data` extent: copied out, or still the inner source's lent buffer.
enum Held {
    Copied(Vec<u8>),
    /// Kept on loan (the head is a few MiB: at most a couple of the source's pooled buffers),
    /// so a lending source keeps lending: the writer takes every byte without a copy.
    Lent(SharedData),
    None,
}

impl Held {
    fn bytes(&self, len: usize) -> &[u8] {
        match self {
            Held::Copied(v) => &v[..len],
            Held::Lent(s) => &s.buf[s.start..s.start + len],
            Held::None => &[],
        }
    }
}

/// Reads the first `want` logical bytes of a stream (a download, a pipe) for the board check,
/// then replays what it read, so the writer sees the whole stream. Nothing is read twice and the
/// stream is not restarted: the extents are kept (at most `want` plus one buffer).
pub(crate) struct HeadPeek {
    inner: Box<dyn ExtentSource>,
    /// Extents already pulled from `inner`, with their data for `Data` ones.
    queue: std::collections::VecDeque<(Extent, Held)>,
}

impl HeadPeek {
    pub(crate) fn new(
        mut inner: Box<dyn ExtentSource>,
        want: usize,
    ) -> Result<(HeadPeek, Vec<u8>), ImageError> {
        let lends = inner.shares_buffers();
        let mut head = Vec::with_capacity(want);
        let mut queue = std::collections::VecDeque::new();
        let mut buf = if lends {
            Vec::new()
        } else {
            vec![0u8; 1 << 20]
        };
        while head.len() < want {
            let (e, held) = if lends {
                match inner.next_shared()? {
                    None => break,
                    Some((e, Some(s))) => (e, Held::Lent(s)),
                    Some((e, None)) => (e, Held::None),
                }
            } else {
                match inner.next_extent(&mut buf)? {
                    None => break,
                    Some(e) if e.kind == ExtentKind::Data => {
                        (e, Held::Copied(buf[..e.len as usize].to_vec()))
                    }
                    Some(e) => (e, Held::None),
                }
            };
            let take = (want - head.len()).min(usize::try_from(e.len).unwrap_or(usize::MAX));
            match (&held, e.kind) {
                (Held::None, ExtentKind::Data) => {
                    return Err(ImageError::Invalid {
                        path: inner.describe(),
                        msg: "a lent data extent came without its buffer".into(),
                    })
                }
                (_, ExtentKind::Data) => {
                    head.extend_from_slice(&held.bytes(e.len as usize)[..take])
                }
                // Unmapped ranges read as zeroes on a fresh target too: check them as such.
                _ => head.resize(head.len() + take, 0),
            }
            queue.push_back((e, held));
        }
        Ok((HeadPeek { inner, queue }, head))
    }
}

impl ExtentSource for HeadPeek {
    fn size_hint(&self) -> Option<u64> {
        self.inner.size_hint()
    }

    fn next_extent(&mut self, buf: &mut [u8]) -> Result<Option<Extent>, ImageError> {
        let Some((e, held)) = self.queue.front_mut() else {
            return self.inner.next_extent(buf);
        };
        if e.kind != ExtentKind::Data {
            let e = *e;
            self.queue.pop_front();
            return Ok(Some(e));
        }
        // The caller's buffer may be smaller than the one the head was read with: split.
        let n = usize::try_from(e.len).unwrap_or(usize::MAX).min(buf.len());
        buf[..n].copy_from_slice(held.bytes(n));
        let out = Extent {
            offset: e.offset,
            len: n as u64,
            kind: ExtentKind::Data,
        };
        if n as u64 == e.len {
            self.queue.pop_front();
        } else {
            match held {
                Held::Copied(v) => {
                    v.drain(..n);
                }
                Held::Lent(s) => s.start += n,
                Held::None => {}
            }
            e.offset += n as u64;
            e.len -= n as u64;
        }
        Ok(Some(out))
    }

    fn shares_buffers(&self) -> bool {
        self.inner.shares_buffers()
    }

    fn next_shared(&mut self) -> Result<Option<(Extent, Option<SharedData>)>, ImageError> {
        match self.queue.pop_front() {
            None => self.inner.next_shared(),
            Some((e, Held::Lent(s))) => Ok(Some((e, Some(s)))),
            Some((e, Held::None)) => Ok(Some((e, None))),
            Some((_, Held::Copied(_))) => Err(ImageError::Invalid {
                path: self.inner.describe(),
                msg: "copied head extents cannot be lent".into(),
            }),
        }
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

    /// A lending source (a decompressed stream) stays lending through the peek: the head and
    /// then the whole image come as the source's own buffers, byte for byte.
    #[test]
    fn head_peek_keeps_a_lending_source_lending() {
        let mut raw = vec![0u8; 9 << 20];
        let mut x = 7u32;
        let (a, rest) = raw.split_at_mut(3 << 20);
        for b in a.iter_mut().chain(rest[3 << 20..].iter_mut()) {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            *b = x as u8;
        }
        let z = zstd::encode_all(&raw[..], 1).unwrap();
        let src = super::super::from_reader(Box::new(std::io::Cursor::new(z)), "t.zst", None, None)
            .unwrap();
        assert!(src.shares_buffers());
        let (mut p, head) = HeadPeek::new(src, 4 << 20).unwrap();
        assert_eq!(head, raw[..4 << 20]);
        assert!(p.shares_buffers());
        let mut out = Vec::new();
        while let Some((e, d)) = p.next_shared().unwrap() {
            assert_eq!(e.offset, out.len() as u64, "extents are contiguous");
            match (e.kind, d) {
                (ExtentKind::Data, Some(d)) => {
                    out.extend_from_slice(&d.buf[d.start..d.start + e.len as usize])
                }
                (ExtentKind::Data, None) => panic!("data extent without its buffer"),
                (_, _) => out.resize(out.len() + e.len as usize, 0),
            }
        }
        assert_eq!(out.len(), raw.len());
        assert!(out == raw, "replayed image differs");
    }
}
