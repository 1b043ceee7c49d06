//! `pagefill` and its pattern, which most workloads fill their pages with
//! (the `fill_groups` macro of `asm/workload.inc`): the region, the
//! pattern, and the exact reports.

use crate::abi::{PAGE_SIZE, WORKLOAD_REGION_START};
use crate::model::{pattern_page_sum_with, residue_count, split_reports};

/// First guest-physical address `pagefill` fills (2 MiB): its region is
/// `[PAGEFILL_START, RAM size rounded down to a page)`.
pub const PAGEFILL_START: u64 = WORKLOAD_REGION_START;

/// Number of groups of identical pages `pagefill` writes: page `i` of the
/// region belongs to group `i % PAGEFILL_GROUPS`.
pub const PAGEFILL_GROUPS: u64 = 16;

/// Multiplier of the group term of [`pagefill_pattern`].
pub const PAGEFILL_GROUP_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// Multiplier of the word term of [`pagefill_pattern`].
pub const PAGEFILL_WORD_MUL: u64 = 0x100_0000_01B3;

/// Number of 8-byte words in a page.
pub const PAGEFILL_WORDS_PER_PAGE: u64 = PAGE_SIZE / 8;

/// Number of phases `pagefill` marks (phases 1 to 6; phase 0 is the part of
/// the run before the first marker).
pub const PAGEFILL_PHASES: u32 = 6;

/// The names of `pagefill`'s phases 1 to 6 (port 0x504).
pub const PAGEFILL_PHASE_NAMES: [&str; PAGEFILL_PHASES as usize] =
    ["fill 16 groups", "merge pass", "read word 0", "rewrite word 1", "merge pass", "checksums"];

/// Io exits `pagefill` takes in each phase, 0 to 6 (a marker counts in the
/// phase it ends, a name in the phase it names): the first marker; then
/// name + marker, with a dedup request in phases 2 and 5, 2 reports in
/// phase 3; phase 6: name + 4 reports + exit.
pub const PAGEFILL_PHASE_IO: [u64; PAGEFILL_PHASES as usize + 1] = [1, 2, 3, 4, 2, 3, 6];

/// Io exits `pagefill` takes whatever the RAM size: 6 phase markers + 6
/// names + 2 dedup requests + 6 reports + 1 exit. With dedup off these are
/// all its exits.
pub const PAGEFILL_IO_EXITS: u64 = 6 + 6 + 2 + 6 + 1;

/// Number of pages `pagefill` fills for a guest of `mem_bytes` bytes of RAM:
/// `(mem_bytes rounded down to a page - 2 MiB) / 4096`, or 0 when RAM is not
/// larger than 2 MiB.
pub fn pagefill_pages(mem_bytes: u64) -> u64 {
    (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(PAGEFILL_START) / PAGE_SIZE
}

/// The value `pagefill` writes in phase 1 to 8-byte word `word` (0..512) of
/// every page of group `group` (0..16):
/// `((group + 1) * 0x9E3779B97F4A7C15) ^ (word * 0x100000001B3)`, wrapping.
/// No such value is zero, so no filled page is a zero page.
pub fn pagefill_pattern(group: u64, word: u64) -> u64 {
    (group + 1).wrapping_mul(PAGEFILL_GROUP_MUL) ^ word.wrapping_mul(PAGEFILL_WORD_MUL)
}

/// The value `pagefill` stores in phase 4 to word 1 of every page of group
/// `group`: `pagefill_pattern(group, 1) + 1`, wrapping. Every page of a group
/// gets the same value, so the groups stay groups of identical pages.
pub fn pagefill_rewritten_word1(group: u64) -> u64 {
    pagefill_pattern(group, 1).wrapping_add(1)
}

/// The exact report list `pagefill` produces for a guest of `mem_bytes`
/// bytes of RAM (the values it writes to port 0x502, in order, each a
/// 32-bit value widened to `u64`).
///
/// Three 64-bit checksums (wrapping sums), each reported as two port writes,
/// low 32 bits first, then high 32 bits:
///
/// 1. phase 3: the sum of word 0 of every page;
/// 2. phase 6: the sum of word 1 of every page (after the phase-4 rewrite);
/// 3. phase 6: the sum of every word of every page.
///
/// Deduplication must not change these: they are the same with dedup off.
pub fn pagefill_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let (mut word0, mut word1, mut all) = (0u64, 0u64, 0u64);
    for group in 0..PAGEFILL_GROUPS {
        let count = residue_count(pages, PAGEFILL_GROUPS, group);
        let new_word1 = pagefill_rewritten_word1(group);
        let page_sum = pattern_page_sum_with(group, 1, new_word1);
        word0 = word0.wrapping_add(count.wrapping_mul(pagefill_pattern(group, 0)));
        word1 = word1.wrapping_add(count.wrapping_mul(new_word1));
        all = all.wrapping_add(count.wrapping_mul(page_sum));
    }
    split_reports(&[word0, word1, all])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::to_usize;

    #[test]
    fn pagefill_pages_rounds_down_and_starts_at_2mib() {
        assert_eq!(pagefill_pages(0), 0);
        assert_eq!(pagefill_pages(1 << 20), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START + 4095), 0);
        assert_eq!(pagefill_pages(PAGEFILL_START + 4096), 1);
        assert_eq!(pagefill_pages(64 << 20), (62 << 20) / 4096);
        assert_eq!(pagefill_pages(u64::MAX), (u64::MAX - 4095 - PAGEFILL_START) / 4096);
    }

    #[test]
    fn pagefill_pattern_is_never_zero_and_groups_differ() {
        for g in 0..PAGEFILL_GROUPS {
            assert_ne!(pagefill_rewritten_word1(g), 0);
            assert_ne!(pagefill_rewritten_word1(g), pagefill_pattern(g, 1));
            for w in 0..PAGEFILL_WORDS_PER_PAGE {
                assert_ne!(pagefill_pattern(g, w), 0, "group {g} word {w}");
            }
            for h in 0..g {
                assert_ne!(pagefill_pattern(g, 0), pagefill_pattern(h, 0));
            }
        }
    }

    /// Runs pagefill's algorithm on a simulated RAM, word by word.
    fn simulate(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(pagefill_pages(mem_bytes));
        let group = |i: usize| i as u64 % PAGEFILL_GROUPS;
        let mut ram = vec![0u64; pages * words];
        for (i, page) in ram.chunks_mut(words).enumerate() {
            for (w, word) in page.iter_mut().enumerate() {
                *word = pagefill_pattern(group(i), w as u64);
            }
        }
        let sum0 = ram.chunks(words).fold(0u64, |s, p| s.wrapping_add(p[0]));
        for (i, page) in ram.chunks_mut(words).enumerate() {
            page[1] = pagefill_pattern(group(i), 1).wrapping_add(1);
        }
        let sum1 = ram.chunks(words).fold(0u64, |s, p| s.wrapping_add(p[1]));
        let all = ram.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        [sum0, sum1, all].iter().flat_map(|&s| [s as u32 as u64, s >> 32]).collect()
    }

    #[test]
    fn pagefill_model_matches_a_simulation() {
        for mem in [
            0,
            1 << 20,
            PAGEFILL_START,
            PAGEFILL_START + 4095,
            PAGEFILL_START + 4096,
            PAGEFILL_START + 15 * 4096,
            PAGEFILL_START + 16 * 4096 + 100,
            PAGEFILL_START + 37 * 4096,
            4 << 20,
            16 << 20,
        ] {
            assert_eq!(pagefill_expected_reports(mem), simulate(mem), "mem {mem:#x}");
        }
    }

    #[test]
    fn pagefill_model_gives_sane_values() {
        assert_eq!(pagefill_expected_reports(PAGEFILL_START), vec![0; 6]);
        for mem in [PAGEFILL_START + 4096, 64 << 20, 1 << 30, 16 << 30] {
            let reports = pagefill_expected_reports(mem);
            assert_eq!(reports.len(), 6);
            assert!(reports.iter().all(|&r| r <= u64::from(u32::MAX)));
            assert!(reports.iter().any(|&r| r != 0));
        }
        // One page of group 0: the checksums are that page's words.
        let one = pagefill_expected_reports(PAGEFILL_START + 4096);
        let join = |i: usize| one[i] | one[i + 1] << 32;
        assert_eq!(join(0), PAGEFILL_GROUP_MUL);
        assert_eq!(join(2), pagefill_rewritten_word1(0));
        // 16 GiB is modelled without walking 4 million pages.
        assert_ne!(pagefill_expected_reports(16 << 30), pagefill_expected_reports(8 << 30));
    }
}
