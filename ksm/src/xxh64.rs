//! XXH64 of one page read in place, through atomic loads.
//!
//! Written here because the xxhash-rust crate (used for page copies) hashes
//! only a `&[u8]`, which must not point at memory a guest may be writing;
//! viewed as `AtomicU64`s (relaxed loads, plain moves on x86-64) the page
//! may change under the hash soundly, as it may under Linux's
//! `calc_checksum`. The algorithm is XXH64 as specified by its authors
//! (github.com/Cyan4973/xxHash, doc/xxhash_spec.md), for an input that is a
//! whole number of 32-byte stripes; the tests check it against xxhash-rust.

use std::sync::atomic::{AtomicU64, Ordering};

const PRIME64_1: u64 = 0x9E37_79B1_85EB_CA87;
const PRIME64_2: u64 = 0xC2B2_AE3D_27D4_EB4F;
const PRIME64_3: u64 = 0x1656_67B1_9E37_79F9;
const PRIME64_4: u64 = 0x85EB_CA77_C2B2_AE63;

fn round(acc: u64, lane: u64) -> u64 {
    acc.wrapping_add(lane.wrapping_mul(PRIME64_2)).rotate_left(31).wrapping_mul(PRIME64_1)
}

fn merge_accumulator(acc: u64, lane_acc: u64) -> u64 {
    (acc ^ round(0, lane_acc)).wrapping_mul(PRIME64_1).wrapping_add(PRIME64_4)
}

/// XXH64 with `seed` of the little-endian bytes of `words`, whose length
/// is a non-zero multiple of 4 words (32 bytes); `None` otherwise.
pub fn xxh64_words(words: &[AtomicU64], seed: u64) -> Option<u64> {
    if words.is_empty() || words.len() % 4 != 0 {
        return None;
    }
    let mut acc = [
        seed.wrapping_add(PRIME64_1).wrapping_add(PRIME64_2),
        seed.wrapping_add(PRIME64_2),
        seed,
        seed.wrapping_sub(PRIME64_1),
    ];
    for stripe in words.chunks_exact(4) {
        for (a, lane) in acc.iter_mut().zip(stripe) {
            *a = round(*a, u64::from_le(lane.load(Ordering::Relaxed)));
        }
    }
    let mut h = acc[0]
        .rotate_left(1)
        .wrapping_add(acc[1].rotate_left(7))
        .wrapping_add(acc[2].rotate_left(12))
        .wrapping_add(acc[3].rotate_left(18));
    for a in acc {
        h = merge_accumulator(h, a);
    }
    h = h.wrapping_add(words.len() as u64 * 8);
    h ^= h >> 33;
    h = h.wrapping_mul(PRIME64_2);
    h ^= h >> 29;
    h = h.wrapping_mul(PRIME64_3);
    h ^= h >> 32;
    Some(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words_of(bytes: &[u8]) -> Vec<AtomicU64> {
        bytes.chunks_exact(8).map(|c| AtomicU64::new(u64::from_le_bytes(c.try_into().expect("8 bytes")))).collect()
    }

    #[test]
    fn agrees_with_xxhash_rust_on_pages_and_stripes() {
        let mut state = 0x2545_F491_4F6C_DD1Du64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for len in [32usize, 64, 96, 4096] {
            for seed in [0u64, 1, u64::MAX] {
                let bytes: Vec<u8> = (0..len).map(|_| next() as u8).collect();
                let ours = xxh64_words(&words_of(&bytes), seed);
                assert_eq!(ours, Some(xxhash_rust::xxh64::xxh64(&bytes, seed)), "{len} bytes, seed {seed}");
            }
        }
        let zero = [0u8; 4096];
        assert_eq!(xxh64_words(&words_of(&zero), 0), Some(xxhash_rust::xxh64::xxh64(&zero, 0)));
    }

    #[test]
    fn refuses_lengths_that_are_not_whole_stripes() {
        assert_eq!(xxh64_words(&words_of(&[0u8; 24]), 0), None);
        assert_eq!(xxh64_words(&[], 0), None);
    }
}
