//! Write-behind: data pieces for a block device are written by two threads, so the device
//! has a second request queued while the first completes (a loop device or a card reader
//! otherwise idles between requests, as under `dd`). The writer thread keeps the order of a
//! write's safety: it hands pieces over, zeroes ranges itself, and waits for both threads
//! ([`WriteBehind::finish`]) before it syncs and writes the head.

use super::sink::MediumWriter;
use super::{Piece, WriteError};
use crossbeam_channel::Sender;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Requests in flight: two threads, each writing one piece.
const THREADS: usize = 2;

/// A piece's bytes from `skip` on, to be written at `offset`.
type Job = (u64, Piece, usize);

pub(super) struct WriteBehind {
    writer: Arc<MediumWriter>,
    tx: Option<Sender<Job>>,
    threads: Vec<JoinHandle<Result<(), WriteError>>>,
    failed: Arc<AtomicBool>,
}

impl WriteBehind {
    pub(super) fn spawn(writer: MediumWriter) -> Result<WriteBehind, WriteError> {
        let writer = Arc::new(writer);
        let failed = Arc::new(AtomicBool::new(false));
        // No queue beyond the pieces being written: the pool's buffers stay with the reader.
        let (tx, rx) = crossbeam_channel::bounded::<Job>(0);
        let mut threads = Vec::new();
        for i in 0..THREADS {
            let (rx, w, failed) = (rx.clone(), writer.clone(), failed.clone());
            let t = std::thread::Builder::new()
                .name(format!("sbcflash-write{i}"))
                .spawn(move || {
                    for (offset, piece, skip) in rx {
                        if let (_, Some(bytes)) = piece.parts() {
                            if let Err(e) = w.write_at(offset, &bytes[skip..]) {
                                failed.store(true, Ordering::Relaxed);
                                return Err(e);
                            }
                        }
                    }
                    Ok(())
                })
                .map_err(|e| WriteError::Internal(format!("spawn writer thread: {e}")))?;
            threads.push(t);
        }
        Ok(WriteBehind {
            writer,
            tx: Some(tx),
            threads,
            failed,
        })
    }

    /// Hand `piece`'s bytes from `skip` on to a writer thread; `false` when it cannot take
    /// them (unaligned: the caller writes them through the sink).
    pub(super) fn send(
        &mut self,
        offset: u64,
        piece: &Piece,
        skip: usize,
    ) -> Result<bool, WriteError> {
        let takes = match piece.parts() {
            (_, Some(bytes)) => self.writer.takes(offset, &bytes[skip..]),
            _ => false,
        };
        if !takes {
            return Ok(false);
        }
        if self.failed.load(Ordering::Relaxed) {
            return self.finish().map(|()| false);
        }
        let sent = self
            .tx
            .as_ref()
            .is_some_and(|tx| tx.send((offset, piece.clone(), skip)).is_ok());
        if !sent {
            // Every thread stopped: at an error, which `finish` returns.
            self.finish()?;
            return Err(WriteError::Internal("writer threads stopped".into()));
        }
        Ok(true)
    }

    /// Wait for every piece handed over; the first write error, if any.
    pub(super) fn finish(&mut self) -> Result<(), WriteError> {
        self.tx = None;
        let mut first = Ok(());
        for t in self.threads.drain(..) {
            let r = t
                .join()
                .unwrap_or_else(|_| Err(WriteError::Internal("writer thread panicked".into())));
            if first.is_ok() {
                first = r;
            }
        }
        first
    }
}

impl Drop for WriteBehind {
    /// Never leave a thread writing after the write returned (an error path, a cancel).
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
