//! Page-aligned, pooled I/O buffers. O_DIRECT needs buffer addresses aligned to the device's
//! logical block size; a fixed pool bounds memory whatever the image size.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Condvar, Mutex};

/// Alignment of every buffer: a page, which satisfies every logical block size Linux supports.
pub(crate) const ALIGN: usize = 4096;

/// A heap buffer whose start is [`ALIGN`]-aligned and whose length is a multiple of it.
pub(crate) struct AlignedBuf {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

// The buffer is plain owned memory.
unsafe impl Send for AlignedBuf {}
unsafe impl Sync for AlignedBuf {}

impl AlignedBuf {
    /// A zero-filled buffer of `len` bytes rounded up to [`ALIGN`].
    pub(crate) fn new(len: usize) -> Self {
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

/// A fixed number of buffers handed out and returned; `get` waits when all are in flight,
/// which is what bounds the pipeline's memory. Buffers are allocated on first need (the
/// allocator zero-fills aligned memory, touching every page), and reused last in, first out:
/// a consumer that returns each buffer before taking the next keeps reusing one warm buffer
/// and never pays for the others.
#[derive(Clone)]
pub(crate) struct Pool {
    free: Home,
}

type Home = Arc<(Mutex<Free>, Condvar)>;

struct Free {
    bufs: Vec<AlignedBuf>,
    /// Buffers that may still be allocated.
    unborn: usize,
    size: usize,
}

impl Pool {
    pub(crate) fn new(count: usize, size: usize) -> Self {
        let free = Free {
            bufs: Vec::new(),
            unborn: count,
            size,
        };
        Self {
            free: Arc::new((Mutex::new(free), Condvar::new())),
        }
    }

    /// Wait up to `timeout` for a free buffer (callers poll a cancel flag in between).
    pub(crate) fn get_timeout(&self, timeout: std::time::Duration) -> Option<Pooled> {
        let (lock, cv) = &*self.free;
        let guard = lock.lock().unwrap_or_else(|p| p.into_inner());
        let (mut guard, _) = cv
            .wait_timeout_while(guard, timeout, |f| f.bufs.is_empty() && f.unborn == 0)
            .unwrap_or_else(|p| p.into_inner());
        let buf = match guard.bufs.pop() {
            Some(b) => b,
            None if guard.unborn > 0 => {
                guard.unborn -= 1;
                let size = guard.size;
                drop(guard);
                AlignedBuf::new(size)
            }
            None => return None,
        };
        Some(Pooled {
            buf: Some(buf),
            home: Some(self.free.clone()),
        })
    }
}

/// A buffer on loan from a [`Pool`]; goes back to the pool when dropped.
pub(crate) struct Pooled {
    buf: Option<AlignedBuf>,
    home: Option<Home>,
}

impl Pooled {
    /// A placeholder that holds no buffer (length 0).
    pub(crate) fn empty() -> Self {
        Self {
            buf: None,
            home: None,
        }
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
        if let (Some(b), Some(home)) = (self.buf.take(), self.home.take()) {
            let (lock, cv) = &*home;
            lock.lock().unwrap_or_else(|p| p.into_inner()).bufs.push(b);
            cv.notify_one();
        }
    }
}

/// A filled buffer shared by the writer and the hasher; returns to the pool when both are done.
pub(crate) type Shared = Arc<Pooled>;

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
