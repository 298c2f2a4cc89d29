//! A verifying byte stream for one-pass writes: download (or cache file) → hash → consumer.
//!
//! The consumer (decompressor, writer) sees a plain `Read`. Every byte it reads is hashed; at
//! the end [`StreamCheck::finish`] drains whatever the consumer left unread, compares the
//! digest with the pin and, when asked, moves the tee'd copy into the cache. A mismatch there
//! means the target already holds the bad bytes: the error says so (exit code "verify").

use super::cache::{Cache, Origin};
use super::digest::{Digests, Hasher, Pin};
use super::{AcquireError, Result};
use std::io::{Read, Write};
use std::sync::{Arc, Mutex};

/// Where the bytes come from.
enum Upstream {
    /// Chunks from a download thread, which also hashes them (its result is the digests).
    Http {
        rx: super::download::ChunkRx,
        thread: Option<std::thread::JoinHandle<Result<Digests>>>,
        cur: bytes::Bytes,
    },
    /// A local file or a cache entry.
    Reader(Box<dyn Read + Send>),
}

struct Inner {
    what: String,
    up: Upstream,
    hasher: Option<Hasher>,
    digests: Option<Digests>,
    /// The error that ended the transfer (kept so the CLI can classify it properly).
    failed: Option<AcquireError>,
    tee: Option<Tee>,
}

struct Tee {
    cache: Arc<Cache>,
    path: std::path::PathBuf,
    file: std::io::BufWriter<std::fs::File>,
    origin: Origin,
    ok: bool,
}

/// The `Read` half handed to the image layer.
pub(crate) struct VerifyingReader {
    inner: Arc<Mutex<Inner>>,
}

/// The checking half kept by the caller.
pub(crate) struct StreamCheck {
    inner: Arc<Mutex<Inner>>,
    pin: Option<Pin>,
}

/// Result of a completed stream.
#[derive(Debug, Clone)]
pub(crate) struct StreamResult {
    pub(crate) digests: Digests,
    pub(crate) pinned: Option<Pin>,
    /// The cache entry made from the tee, if teeing was on.
    pub(crate) cached: Option<super::CacheEntry>,
}

impl VerifyingReader {
    pub(crate) fn from_http(
        what: String,
        rx: super::download::ChunkRx,
        thread: std::thread::JoinHandle<Result<Digests>>,
        pin: Option<Pin>,
    ) -> (VerifyingReader, StreamCheck) {
        let (r, c) = Self::make(
            what,
            Upstream::Http {
                rx,
                thread: Some(thread),
                cur: bytes::Bytes::new(),
            },
            pin,
        );
        // The download thread hashes; the reader only hands bytes on.
        lock(&r.inner).hasher = None;
        (r, c)
    }

    pub(crate) fn from_reader(
        what: String,
        r: Box<dyn Read + Send>,
        pin: Option<Pin>,
    ) -> (VerifyingReader, StreamCheck) {
        Self::make(what, Upstream::Reader(r), pin)
    }

    fn make(what: String, up: Upstream, pin: Option<Pin>) -> (VerifyingReader, StreamCheck) {
        let inner = Arc::new(Mutex::new(Inner {
            what,
            up,
            hasher: Some(Hasher::for_pin(pin.as_ref())),
            digests: None,
            failed: None,
            tee: None,
        }));
        (
            VerifyingReader {
                inner: inner.clone(),
            },
            StreamCheck { inner, pin },
        )
    }
}

impl StreamCheck {
    /// A second handle on the same stream (for a reader wrapper that checks at the end).
    pub(crate) fn clone_handle(&self) -> StreamCheck {
        StreamCheck {
            inner: self.inner.clone(),
            pin: self.pin.clone(),
        }
    }

    pub(crate) fn has_pin(&self) -> bool {
        self.pin.is_some()
    }

    pub(crate) fn set_failure(&self, e: AcquireError) {
        lock(&self.inner).failed = Some(e);
    }

    /// At the end of the stream: does what arrived match the pin? (No-op before the end or
    /// without a pin.) A mismatch is reported as a bad target: the consumer has written it.
    pub(crate) fn check_at_end(&self) -> Result<()> {
        let g = lock(&self.inner);
        let (Some(d), Some(pin)) = (g.digests, &self.pin) else {
            return Ok(());
        };
        if pin.matches(&d) {
            return Ok(());
        }
        Err(AcquireError::BadImageWritten {
            what: g.what.clone(),
            algo: pin.algo(),
            expected: pin.hex(),
            actual: pin.actual_hex(&d),
        })
    }

    /// Also keep a copy in the cache (committed only if the digest checks out).
    pub(crate) fn tee_into(&self, cache: Arc<Cache>, origin: Origin) -> Result<()> {
        let (path, f) = cache.new_tmp("stream")?;
        let mut g = lock(&self.inner);
        g.tee = Some(Tee {
            cache,
            path,
            file: std::io::BufWriter::with_capacity(1 << 20, f),
            origin,
            ok: true,
        });
        Ok(())
    }

    /// The transfer error, if the stream ended because of one (for a failed write).
    pub(crate) fn take_failure(&self) -> Option<AcquireError> {
        lock(&self.inner).failed.take()
    }

    /// Reads whatever is left, then checks the digest. `written` says whether a target was
    /// written from the stream (a mismatch is then reported as a bad target).
    pub(crate) fn finish(self, written: bool) -> Result<StreamResult> {
        let mut g = lock(&self.inner);
        let mut buf = vec![0u8; 1 << 20];
        while g.digests.is_none() {
            match g.read_some(&mut buf) {
                Ok(_) => {}
                Err(e) => {
                    return Err(g
                        .failed
                        .take()
                        .unwrap_or_else(|| AcquireError::io(&g.what, e)));
                }
            }
        }
        let d = g.digests.expect("set at end of stream");
        let what = g.what.clone();
        let tee = g.tee.take();
        drop(g);
        if let Some(pin) = &self.pin {
            if !pin.matches(&d) {
                if let Some(t) = tee {
                    let _ = std::fs::remove_file(&t.path);
                }
                let (algo, expected, actual) = (pin.algo(), pin.hex(), pin.actual_hex(&d));
                return Err(if written {
                    AcquireError::BadImageWritten {
                        what,
                        algo,
                        expected,
                        actual,
                    }
                } else {
                    AcquireError::Digest {
                        what,
                        algo,
                        expected,
                        actual,
                    }
                });
            }
        }
        let mut cached = None;
        if let Some(mut t) = tee {
            let flushed = t.file.flush().is_ok();
            if t.ok && flushed {
                let mut origin = t.origin.clone();
                origin.pinned = self.pin.as_ref().map(|p| p.to_string());
                // A failed tee never fails the write: the cache is an optimisation.
                match t.cache.commit(&t.path, &d, origin) {
                    Ok(e) => cached = Some(e),
                    Err(e) => tracing::warn!("could not keep a cache copy: {e}"),
                }
            } else {
                let _ = std::fs::remove_file(&t.path);
            }
        }
        Ok(StreamResult {
            digests: d,
            pinned: self.pin,
            cached,
        })
    }
}

fn lock(m: &Mutex<Inner>) -> std::sync::MutexGuard<'_, Inner> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Inner {
    /// One read from upstream, hashed and tee'd; sets `digests` at the end of the stream.
    fn read_some(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        if self.digests.is_some() || out.is_empty() {
            return Ok(0);
        }
        let n = match &mut self.up {
            Upstream::Reader(r) => loop {
                match r.read(out) {
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    other => break other?,
                }
            },
            Upstream::Http { rx, thread, cur } => {
                if cur.is_empty() {
                    match rx.recv() {
                        Some(c) => *cur = c,
                        None => {
                            // Sender gone: the thread ended; its result says how.
                            let res = match thread.take().map(|h| h.join()) {
                                Some(Ok(r)) => r.map(Some),
                                Some(Err(_)) => Err(AcquireError::Network {
                                    url: self.what.clone(),
                                    msg: "download thread panicked".into(),
                                }),
                                None => Ok(None),
                            };
                            match res {
                                Ok(Some(d)) => self.digests = Some(d),
                                // Joined before: the transfer already failed.
                                Ok(None) => {
                                    return Err(std::io::Error::other(
                                        "the download already ended with an error",
                                    ))
                                }
                                Err(e) => {
                                    let msg = e.to_string();
                                    self.failed = Some(e);
                                    return Err(std::io::Error::other(msg));
                                }
                            }
                        }
                    }
                }
                let n = cur.len().min(out.len());
                out[..n].copy_from_slice(&cur[..n]);
                bytes::Buf::advance(cur, n);
                n
            }
        };
        if n == 0 {
            if let Some(h) = self.hasher.take() {
                self.digests = Some(h.finish());
            }
            return Ok(0);
        }
        if let Some(h) = &mut self.hasher {
            h.update(&out[..n]);
        }
        if let Some(t) = &mut self.tee {
            if t.ok && t.file.write_all(&out[..n]).is_err() {
                t.ok = false;
            }
        }
        Ok(n)
    }
}

impl Read for VerifyingReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        lock(&self.inner).read_some(buf)
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        if let Some(t) = self.tee.take() {
            let _ = std::fs::remove_file(&t.path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_and_bad_pins() {
        let data = vec![7u8; 3 << 20];
        let pin = Pin::Blake3(*blake3::hash(&data).as_bytes());
        let (mut r, c) = VerifyingReader::from_reader(
            "mem".into(),
            Box::new(std::io::Cursor::new(data.clone())),
            Some(pin),
        );
        let mut head = vec![0u8; 1000];
        r.read_exact(&mut head).unwrap();
        // The consumer stops early; finish drains the rest and checks.
        let res = c.finish(true).unwrap();
        assert_eq!(res.digests.len, data.len() as u64);

        let wrong = Pin::Blake3(*blake3::hash(b"other").as_bytes());
        let (mut r, c) = VerifyingReader::from_reader(
            "mem".into(),
            Box::new(std::io::Cursor::new(data)),
            Some(wrong),
        );
        std::io::copy(&mut r, &mut std::io::sink()).unwrap();
        let e = c.finish(true).unwrap_err();
        assert!(matches!(e, AcquireError::BadImageWritten { .. }));
        assert_eq!(crate::exit::Classify::exit(&e), crate::exit::Exit::Verify);
    }
}
