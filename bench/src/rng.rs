//! The benchmarks' random numbers: a seeded xorshift64* generator, so every run (and every
//! engine of the bake-off) gets the same data.

// Indices and counts here are far below usize's range on the 64-bit hosts the bench runs on.
#![allow(clippy::cast_possible_truncation)]

/// xorshift64*: fast, never yields a zero word from a non-zero state.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// Uniform-enough value in `0..n` (n > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next_u64()) * u128::from(n)) >> 64) as u64
    }

    /// Fill with random bytes; every 8-byte word is non-zero with overwhelming probability,
    /// so no 4 KiB block is ever all zeros.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_exact_mut(8) {
            w.copy_from_slice(&(self.next_u64() | 1).to_le_bytes());
        }
    }

    /// `k` distinct values of `0..n`, sorted.
    pub fn sample(&mut self, n: u64, k: u64) -> Vec<u64> {
        let k = k.min(n);
        if k * 4 > n {
            // Partial Fisher-Yates over all indices.
            let mut all: Vec<u64> = (0..n).collect();
            for i in 0..k as usize {
                let j = i + self.below(n - i as u64) as usize;
                all.swap(i, j);
            }
            all.truncate(k as usize);
            all.sort_unstable();
            all
        } else {
            let mut set = std::collections::BTreeSet::new();
            while (set.len() as u64) < k {
                set.insert(self.below(n));
            }
            set.into_iter().collect()
        }
    }
}
