//! Arithmetic the workloads' report models share.

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
