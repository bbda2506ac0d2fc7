//! Reusable, aligned buffers for the ingest stream, on both sides: the agent reads the image
//! into them and sends slices of them as frame payloads; the daemon gathers frame payloads in
//! them and hands slices of them to the store. Either way the data is never copied again after
//! it lands in one, and a buffer goes back to its pool when the last [`Bytes`] cut from it is
//! dropped, so a long stream touches the same few buffers instead of fresh pages.
//!
//! Invariants: a buffer's allocation never changes (its `Vec` is made with its full capacity
//! and never grows past it), so the aligned start found when it was made stays valid. The
//! `Vec`'s length is how much of it was ever initialized: bytes are zeroed only the first time
//! [`Filling::unfilled`] hands them out, and [`Filling::extend`] zeroes nothing, so a buffer
//! costs no `memset` per use (a fresh 16 MiB one from the heap would otherwise). A [`Filling`]
//! only hands out the part not yet filled. No unsafe code.

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

    /// An empty buffer: a spare one, or a new one.
    pub fn take(&self) -> Filling {
        let spare = self.inner.spare.lock().unwrap_or_else(|e| e.into_inner()).pop();
        let vec = spare.unwrap_or_else(|| Vec::with_capacity(self.inner.size + self.inner.align - 1));
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
    /// [`Filling::advance`]. They hold whatever an earlier use left there (zeros at first).
    pub fn unfilled(&mut self, n: usize) -> &mut [u8] {
        let at = self.start + self.filled;
        let n = n.min(self.room());
        if self.vec.len() < at + n {
            self.vec.resize(at + n, 0);
        }
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
        let at = self.start + self.filled;
        if self.vec.len() < at {
            self.vec.resize(at, 0); // the alignment padding, once
        }
        // Overwrite what was initialized before, append the rest (never past the capacity).
        let (over, rest) = data.split_at(data.len().min(self.vec.len() - at));
        self.vec[at..at + over.len()].copy_from_slice(over);
        self.vec.extend_from_slice(rest);
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
        // Every filled byte was written, so it lies within the initialized length.
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
        let mut again = pool.take();
        assert!(again.is_empty());
        assert_eq!(again.vec.as_ptr().wrapping_add(again.start), ptr, "the same buffer, reused");
        // Reused: a shorter fill then a longer one see exactly what they wrote.
        assert!(again.extend(&[9u8; 100]));
        again.unfilled(50).fill(8);
        again.advance(50);
        assert!(again.extend(&[7u8; 8000]));
        let b = again.freeze();
        assert_eq!(b.len(), 8150);
        assert!(b[..100].iter().all(|&x| x == 9) && b[100..150].iter().all(|&x| x == 8));
        assert!(b[150..].iter().all(|&x| x == 7));
    }

    #[test]
    fn a_new_buffer_is_not_zeroed_up_front() {
        let pool = BufferPool::new(16 << 20, 4096, 1);
        let mut f = pool.take();
        assert!(f.vec.len() <= 4095, "nothing initialized but the padding");
        assert!(f.extend(&[1u8; 4096]));
        assert_eq!(f.vec.len(), f.start + 4096);
        assert_eq!(f.freeze().as_ptr() as usize % 4096, 0);
    }
}
