//! Test support: simulated guest RAM and the helpers the models' tests share.

use crate::pagefill::{pagefill_pattern, PAGEFILL_START, PAGEFILL_WORDS_PER_PAGE};

/// `v` as a `usize`, for indexing simulated RAM.
pub(crate) fn to_usize(v: u64) -> usize {
    usize::try_from(v).expect("fits in usize")
}

/// Whether `needle` occurs in `haystack`.
pub(crate) fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Simulated guest RAM: `pages` pages of 512 words, filled with
/// pagefill's pattern in `groups` groups (the `fill_groups` macro).
pub(crate) fn filled(pages: usize, groups: u64) -> Vec<u64> {
    let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
    let mut ram = vec![0u64; pages * words];
    for (i, page) in ram.chunks_mut(words).enumerate() {
        for (w, word) in page.iter_mut().enumerate() {
            *word = pagefill_pattern(i as u64 % groups, w as u64);
        }
    }
    ram
}

/// The report list of 64-bit checksums, written independently of the
/// models' own `split_reports`: low 32 bits, then high, each.
pub(crate) fn reports_of(sums: &[u64]) -> Vec<u64> {
    sums.iter().flat_map(|&s| [s as u32 as u64, s >> 32]).collect()
}

/// RAM sizes for the simulations: empty, partial pages, a few pages,
/// group counts that do not divide N, and a few MiB.
pub(crate) const SIM_SIZES: [u64; 10] = [
    0,
    1 << 20,
    PAGEFILL_START,
    PAGEFILL_START + 4095,
    PAGEFILL_START + 4096,
    PAGEFILL_START + 7 * 4096,
    PAGEFILL_START + 9 * 4096 + 100,
    PAGEFILL_START + 37 * 4096,
    4 << 20,
    8 << 20,
];
