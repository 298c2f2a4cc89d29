//! Page-aligned, pooled I/O buffers. O_DIRECT needs buffer addresses aligned to the device's
//! logical block size; a fixed pool bounds memory whatever the image size.

use crossbeam_channel::{Receiver, Sender};
use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::sync::Arc;

/// Alignment of every buffer: a page, which satisfies every logical block size Linux supports.
pub const ALIGN: usize = 4096;

/// A heap buffer whose start is [`ALIGN`]-aligned and whose length is a multiple of it.
pub struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// The buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes rounded up to [`ALIGN`].
    pub fn new(len: usize) -> Self {
        let len = len.max(ALIGN).div_ceil(ALIGN) * ALIGN;
        let layout = Layout::from_size_align(len, ALIGN).expect("buffer layout");
        // SAFETY: layout has a non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let ptr =
            std::ptr::NonNull::new(raw).unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        Self { ptr, len }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        let layout = Layout::from_size_align(self.len, ALIGN).expect("buffer layout");
        // SAFETY: allocated in `new` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), layout) }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for len bytes for the lifetime of self.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as above, and &mut self guarantees exclusivity.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

/// A fixed set of buffers handed out and returned through a channel; `get` blocks when all
/// are in flight, which is what bounds the pipeline's memory.
#[derive(Clone)]
pub struct Pool {
    tx: Sender<AlignedBuf>,
    rx: Receiver<AlignedBuf>,
}

impl Pool {
    pub fn new(count: usize, size: usize) -> Self {
        let (tx, rx) = crossbeam_channel::bounded(count);
        for _ in 0..count {
            let _ = tx.send(AlignedBuf::new(size));
        }
        Self { tx, rx }
    }

    /// Wait up to `timeout` for a free buffer (callers poll a cancel flag in between).
    pub fn get_timeout(&self, timeout: std::time::Duration) -> Option<Pooled> {
        self.rx.recv_timeout(timeout).ok().map(|b| Pooled {
            buf: Some(b),
            home: self.tx.clone(),
        })
    }
}

/// A buffer on loan from a [`Pool`]; goes back to the pool when dropped.
pub struct Pooled {
    buf: Option<AlignedBuf>,
    home: Sender<AlignedBuf>,
}

impl Pooled {
    /// A placeholder that holds no buffer (length 0).
    pub fn empty() -> Self {
        let (home, _) = crossbeam_channel::bounded(0);
        Self { buf: None, home }
    }
}

impl Deref for Pooled {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.buf.as_deref().unwrap_or(&[])
    }
}

impl DerefMut for Pooled {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.buf.as_deref_mut().unwrap_or(&mut [])
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        if let Some(b) = self.buf.take() {
            let _ = self.home.try_send(b);
        }
    }
}

/// A filled buffer shared by the writer and the hasher; returns to the pool when both are done.
pub type Shared = Arc<Pooled>;

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn buffers_are_aligned_and_recycled() {
        let pool = Pool::new(2, 10_000);
        let a = pool.get_timeout(Duration::from_millis(10)).expect("a");
        let b = pool.get_timeout(Duration::from_millis(10)).expect("b");
        assert_eq!(a.as_ptr() as usize % ALIGN, 0);
        assert_eq!(a.len(), 12288);
        assert!(pool.get_timeout(Duration::from_millis(10)).is_none());
        drop(b);
        assert!(pool.get_timeout(Duration::from_millis(10)).is_some());
        drop(a);
    }
}
