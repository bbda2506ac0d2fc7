//! The ingest routes' bodies (docs/api.md, "Ingest"): resize, the answer of an ingest stream,
//! and the binary digest lists both sides exchange. The stream itself is
//! [`crate::api::frames`]. Field order and leniency follow [`crate::api::volumes`].

use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::api::volumes::{with_field, IngestSummary, Size, Volume};

/// `POST /v1/sources/{name}/resize`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct ResizeRequest {
    /// The new size: not smaller than the current one.
    pub size: Size,
}

/// The answer of resize: the source, plus the size it had before (keys sorted, as in every
/// answer: see [`crate::api::volumes`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize, ToSchema)]
pub struct ResizeAnswer {
    /// The source after the resize.
    #[serde(flatten)]
    pub volume: Volume,
    /// Its size before, in bytes.
    #[serde(default)]
    pub previous_size_bytes: u64,
}

impl Serialize for ResizeAnswer {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        with_field(&self.volume, "previous_size_bytes", &self.previous_size_bytes, s)
    }
}

/// The answer of `POST /v1/sources/{name}/ingest`: the snapshot the stream became.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct IngestAnswer {
    /// `SOURCE@ID`.
    pub snapshot: String,
    /// What the ingest did.
    #[serde(default)]
    pub summary: IngestSummary,
}

/// Bytes per entry of a digest list or a block-range list.
pub const PAIR_BYTES: usize = 16;

/// Encode pairs of u64 as the API's binary lists: 16 bytes each, both little-endian. Digest
/// lists are (block index, xxh3-64 digest); block-range lists are (first block, count).
pub fn encode_pairs(pairs: &[(u64, u64)]) -> Vec<u8> {
    let mut out = Vec::with_capacity(pairs.len() * PAIR_BYTES);
    for (a, b) in pairs {
        out.extend_from_slice(&a.to_le_bytes());
        out.extend_from_slice(&b.to_le_bytes());
    }
    out
}

/// Decode a binary list of pairs; `None` when its length is not a multiple of 16.
pub fn decode_pairs(bytes: &[u8]) -> Option<Vec<(u64, u64)>> {
    if !bytes.len().is_multiple_of(PAIR_BYTES) {
        return None;
    }
    let word = |b: &[u8]| {
        let mut w = [0u8; 8];
        w.copy_from_slice(b);
        u64::from_le_bytes(w)
    };
    Some(bytes.chunks_exact(PAIR_BYTES).map(|c| (word(&c[..8]), word(&c[8..]))).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_round_trip() {
        let pairs = vec![(0, u64::MAX), (7, 1), (1 << 40, 3)];
        let bytes = encode_pairs(&pairs);
        assert_eq!(bytes.len(), 48);
        assert_eq!(&bytes[..8], &0u64.to_le_bytes());
        assert_eq!(decode_pairs(&bytes), Some(pairs));
        assert_eq!(decode_pairs(&bytes[..47]), None);
        assert_eq!(decode_pairs(&[]), Some(vec![]));
    }
}
