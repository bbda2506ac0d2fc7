//! What the fuzz targets share: cutting one input into arbitrary pieces, as a socket may
//! deliver it.

/// Cuts `data` into pieces whose lengths follow a small generator seeded by `seed`: mostly
/// short pieces (1 to 16 bytes), sometimes up to 512, never empty unless `data` is.
pub fn pieces(seed: u8, data: &[u8]) -> Vec<&[u8]> {
    let mut state = u32::from(seed).wrapping_mul(0x9e37_79b9) | 1;
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        let len = if state & 0x700 == 0 { 1 + (state >> 16) % 512 } else { 1 + (state >> 16) % 16 };
        let len = usize::try_from(len).unwrap_or(1).min(rest.len());
        let (piece, later) = rest.split_at(len);
        out.push(piece);
        rest = later;
    }
    out
}

use std::cell::RefCell;
use std::collections::BTreeMap;

use iscsi::scsi::{Backend, BackendError};

/// Bytes of a SCSI logical block.
const BS: usize = 512;

/// A small in-memory volume for the SCSI model: written blocks in a map, the rest zeros. It
/// checks what the model promises backends: every range within the capacity, whole blocks.
#[derive(Debug)]
pub struct MemDisk {
    blocks: RefCell<BTreeMap<u64, Vec<u8>>>,
    capacity: u64,
    read_only: bool,
}

impl MemDisk {
    /// A volume of `capacity` blocks.
    pub fn new(capacity: u64, read_only: bool) -> MemDisk {
        MemDisk { blocks: RefCell::new(BTreeMap::new()), capacity, read_only }
    }

    fn in_range(&self, lba: u64, blocks: u64, what: &str) {
        assert!(lba.checked_add(blocks).is_some_and(|end| end <= self.capacity), "model passed an out-of-range {what}");
    }
}

impl Backend for MemDisk {
    fn read(&self, lba: u64, blocks: u32, buf: &mut [u8]) -> Result<(), BackendError> {
        self.in_range(lba, u64::from(blocks), "read");
        assert_eq!(buf.len(), usize::try_from(blocks).expect("u32 fits") * BS, "read buffer length");
        let map = self.blocks.borrow();
        for (i, chunk) in buf.chunks_mut(BS).enumerate() {
            match map.get(&(lba + i as u64)) {
                Some(b) => chunk.copy_from_slice(b),
                None => chunk.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, lba: u64, data: &[u8]) -> Result<(), BackendError> {
        assert_eq!(data.len() % BS, 0, "whole blocks");
        self.in_range(lba, (data.len() / BS) as u64, "write");
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let mut map = self.blocks.borrow_mut();
        for (i, chunk) in data.chunks(BS).enumerate() {
            map.insert(lba + i as u64, chunk.to_vec());
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }

    fn unmap(&self, ranges: &[(u64, u32)]) -> Result<(), BackendError> {
        let mut map = self.blocks.borrow_mut();
        for &(lba, n) in ranges {
            self.in_range(lba, u64::from(n), "unmap");
            let end = lba + u64::from(n);
            let gone: Vec<u64> = map.range(lba..end).map(|(k, _)| *k).collect();
            for k in gone {
                map.remove(&k);
            }
        }
        Ok(())
    }

    fn block_status(&self, lba: u64) -> Result<(bool, u64), BackendError> {
        self.in_range(lba, 1, "block status");
        let map = self.blocks.borrow();
        let mapped = map.contains_key(&lba);
        let mut run = 1;
        while lba + run < self.capacity && map.contains_key(&(lba + run)) == mapped && run < 4096 {
            run += 1;
        }
        Ok((mapped, run))
    }

    fn capacity_blocks(&self) -> u64 {
        self.capacity
    }

    fn read_only(&self) -> bool {
        self.read_only
    }
}
