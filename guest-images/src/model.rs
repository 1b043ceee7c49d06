//! Arithmetic the workloads' report models share.

use crate::guest_numbers::{FNV_OFFSET_BASIS_64, FNV_PRIME_64, SPLITMIX_GAMMA, SPLITMIX_MUL1, SPLITMIX_MUL2};
use crate::pagefill::{pagefill_pattern, PAGEFILL_WORDS_PER_PAGE};

/// Splits 64-bit checksums into the report list a guest produces for them:
/// each as two port writes, low 32 bits first, then high 32 bits.
pub(crate) fn split_reports(sums: &[u64]) -> Vec<u64> {
    sums.iter().flat_map(|&sum| [sum & 0xFFFF_FFFF, sum >> 32]).collect()
}

/// How many of `pages` pages (counted from 0) have index `i % period == residue`.
pub(crate) fn residue_count(pages: u64, period: u64, residue: u64) -> u64 {
    pages / period + u64::from(residue < pages % period)
}

/// Wrapping sum of the 512 words of a page of group `group` holding
/// `pagefill_pattern(group, w)` in every word except word `word`, which
/// holds `value`.
pub(crate) fn pattern_page_sum_with(group: u64, word: u64, value: u64) -> u64 {
    (0..PAGEFILL_WORDS_PER_PAGE)
        .map(|w| if w == word { value } else { pagefill_pattern(group, w) })
        .fold(0u64, u64::wrapping_add)
}

/// SplitMix64 (`splitmix64` in c/guest.h): the next value of the generator
/// whose state is `state`.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(SPLITMIX_GAMMA);
    let z = *state;
    let z = (z ^ (z >> 30)).wrapping_mul(SPLITMIX_MUL1);
    let z = (z ^ (z >> 27)).wrapping_mul(SPLITMIX_MUL2);
    z ^ (z >> 31)
}

/// SplitMix64's output for state `x` (`mix64` in c/guest.h).
pub(crate) fn mix64(x: u64) -> u64 {
    splitmix64(&mut { x })
}

/// YCSB's `Utils.fnvhash64` (`ycsb_hash` in c/guest.h): FNV-1a over the 8
/// bytes of `v`, low byte first, made non-negative as Java's `Math.abs`
/// does (wrapping, on the signed value).
pub(crate) fn ycsb_hash(v: u64) -> u64 {
    let h = v.to_le_bytes().iter().fold(FNV_OFFSET_BASIS_64, |h, &b| (h ^ u64::from(b)).wrapping_mul(FNV_PRIME_64));
    (h as i64).wrapping_abs() as u64
}
