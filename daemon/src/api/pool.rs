//! Reusable, aligned buffers for the ingest stream, on both sides: the agent reads the image
//! into them and sends slices of them as frame payloads; the daemon gathers frame payloads in
//! them and hands slices of them to the store. Either way the data is never copied again after
//! it lands in one, and a buffer goes back to its pool when the last [`Bytes`] cut from it is
//! dropped, so a long stream touches the same few buffers instead of fresh pages.
//!
//! Invariants: a buffer's allocation never changes size (its `Vec` is allocated zeroed once at
//! its full length and never grows), so the aligned start found when it was made stays valid;
//! a [`Filling`] only hands out the part not yet filled. No unsafe code.

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A pool of buffers of one size and alignment. Cheap to clone (all clones share the spares).
#[derive(Debug, Clone)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// Usable bytes per buffer.
    size: usize,
    /// Alignment of each buffer's first usable byte (a power of two).
    align: usize,
    /// Spare buffers kept at most; more are freed.
    keep: usize,
    spare: Mutex<Vec<Vec<u8>>>,
}

impl BufferPool {
    /// Buffers of `size` usable bytes starting at a multiple of `align` (a power of two), keeping
    /// up to `keep` spares.
    pub fn new(size: usize, align: usize, keep: usize) -> BufferPool {
        let align = align.max(1).next_power_of_two();
        BufferPool { inner: Arc::new(Inner { size, align, keep, spare: Mutex::new(Vec::new()) }) }
    }

    /// Usable bytes per buffer.
    pub fn size(&self) -> usize {
        self.inner.size
    }

    /// An empty buffer: a spare one, or a new one (zeroed lazily by the kernel).
    pub fn take(&self) -> Filling {
        let spare = self.inner.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let vec = spare.unwrap_or_else(|| vec![0u8; self.inner.size + self.inner.align - 1]);
        // `align_offset` may only fail (usize::MAX) for exotic pointers; then start at 0, which
        // only costs the alignment, never correctness.
        let start = vec.as_ptr().align_offset(self.inner.align);
        let start = if start < self.inner.align { start } else { 0 };
        Filling { vec, start, filled: 0, pool: self.inner.clone() }
    }
}

impl Inner {
    fn give_back(&self, vec: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(|e| e.into_inner());
        if spare.len() < self.keep {
            spare.push(vec);
        }
    }
}

/// A buffer being filled front to back; [`Filling::freeze`] turns what was filled into
/// [`Bytes`] that return the buffer to its pool when the last of them is dropped.
#[derive(Debug)]
pub struct Filling {
    vec: Vec<u8>,
    /// Index of the first usable (aligned) byte in `vec`.
    start: usize,
    /// Bytes filled after `start`.
    filled: usize,
    pool: Arc<Inner>,
}

impl Filling {
    /// Bytes filled so far.
    pub fn len(&self) -> usize {
        self.filled
    }

    /// Whether nothing was filled yet.
    pub fn is_empty(&self) -> bool {
        self.filled == 0
    }

    /// Bytes that still fit.
    pub fn room(&self) -> usize {
        self.pool.size - self.filled
    }

    /// The next `n` bytes to fill (at most [`Filling::room`]), to be kept with
    /// [`Filling::advance`]. They hold whatever an earlier use left there.
    pub fn unfilled(&mut self, n: usize) -> &mut [u8] {
        let at = self.start + self.filled;
        let n = n.min(self.room());
        &mut self.vec[at..at + n]
    }

    /// Keep `n` more bytes (written through [`Filling::unfilled`]).
    pub fn advance(&mut self, n: usize) {
        self.filled += n.min(self.room());
    }

    /// Append `data`; false (and nothing appended) when it does not fit.
    pub fn extend(&mut self, data: &[u8]) -> bool {
        if data.len() > self.room() {
            return false;
        }
        self.unfilled(data.len()).copy_from_slice(data);
        self.filled += data.len();
        true
    }

    /// What was filled, as `Bytes` (starting at the aligned start); the buffer goes back to
    /// the pool once these and every slice of them are dropped.
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(Frozen(self))
    }
}

impl Drop for Filling {
    fn drop(&mut self) {
        self.pool.give_back(std::mem::take(&mut self.vec));
    }
}

/// A filled buffer owned by [`Bytes`] (dropping it drops the [`Filling`], which gives the
/// buffer back).
#[derive(Debug)]
struct Frozen(Filling);

impl AsRef<[u8]> for Frozen {
    fn as_ref(&self) -> &[u8] {
        &self.0.vec[self.0.start..self.0.start + self.0.filled]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_aligned_bounded_and_come_back() {
        let pool = BufferPool::new(8192, 4096, 1);
        let mut f = pool.take();
        assert!(f.extend(&[1u8; 5000]));
        assert!(!f.extend(&[2u8; 4000]), "8192 bytes fit, not 9000");
        assert_eq!(f.room(), 3192);
        f.unfilled(3192).fill(3);
        f.advance(3192);
        let b = f.freeze();
        assert_eq!(b.len(), 8192);
        assert_eq!(b.as_ptr() as usize % 4096, 0);
        assert!(b[..5000].iter().all(|&x| x == 1) && b[5000..].iter().all(|&x| x == 3));
        let ptr = b.as_ptr();
        let tail = b.slice(4096..);
        drop(b);
        assert!(pool.inner.spare.lock().unwrap().is_empty(), "a slice still holds the buffer");
        drop(tail);
        let again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.vec[again.start..].as_ptr(), ptr, "the same buffer, reused");
    }
}
