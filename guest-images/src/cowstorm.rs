//! `cowstorm`: a copy-on-write storm (write-heavy), four rounds of a pass
//! and a write to every page; its phases, io exits and exact reports.

use crate::abi::WORKLOAD_REGION_START;
use crate::model::{pattern_page_sum_with, residue_count, split_reports};
use crate::pagefill::{pagefill_pages, pagefill_pattern};

/// First guest-physical address `cowstorm` fills (2 MiB).
pub const COWSTORM_START: u64 = WORKLOAD_REGION_START;

/// Groups of identical pages `cowstorm` fills (page `i` is in group `i % 8`).
/// At most 256 pages per group (Linux's default `max_page_sharing`) fit one
/// KSM page: up to 10 MiB of RAM every pass makes exactly 8 KSM pages.
pub const COWSTORM_GROUPS: u64 = 8;

/// Rounds of `cowstorm`: each a synchronous pass, then a write to every page.
pub const COWSTORM_ROUNDS: u64 = 4;

/// The last phase `cowstorm` marks (the checksum phase): phase 1 fills,
/// round `r` is phases `2r` (pass) and `2r + 1` (storm), then the checksum.
pub const COWSTORM_PHASES: u32 = 2 * COWSTORM_ROUNDS as u32 + 2;

/// The names of `cowstorm`'s phases 1 to 10 (port 0x504).
pub const COWSTORM_PHASE_NAMES: [&str; COWSTORM_PHASES as usize] = [
    "fill 8 groups",
    "merge pass",
    "write every page",
    "merge pass",
    "write every page",
    "merge pass",
    "write every page",
    "merge pass",
    "write every page",
    "checksum",
];

/// Io exits `cowstorm` takes in each phase, phases 0 to [`COWSTORM_PHASES`]
/// (a phase marker counts in the phase it ends, a name in the phase it
/// names): the first marker; fill (name + marker); then per round a pass
/// (name + dedup request + marker) and a storm (name + marker); the
/// checksum phase (name + 2 reports + exit).
pub const COWSTORM_PHASE_IO: [u64; COWSTORM_PHASES as usize + 1] = [1, 2, 3, 2, 3, 2, 3, 2, 3, 2, 4];

/// Io exits `cowstorm` takes whatever the RAM size and policy: 10 phase
/// markers + 10 names + 4 dedup requests + 2 reports + 1 exit.
pub const COWSTORM_IO_EXITS: u64 = 10 + 10 + 4 + 2 + 1;

/// Number of pages `cowstorm` fills and writes (its region is pagefill's).
/// With deduplication on, each storm phase takes one copy-on-write fault
/// (`ept_write`) per page: this many.
pub fn cowstorm_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Whether phase `phase` of `cowstorm` is a storm phase (a write to every
/// page that the pass just before merged): phases 3, 5, 7 and 9.
pub fn cowstorm_is_storm_phase(phase: u32) -> bool {
    (3..COWSTORM_PHASES).contains(&phase) && phase % 2 == 1
}

/// Whether phase `phase` of `cowstorm` is a synchronous pass: 2, 4, 6, 8.
pub fn cowstorm_is_pass_phase(phase: u32) -> bool {
    (2..COWSTORM_PHASES).contains(&phase) && phase % 2 == 0
}

/// The value the storm of round `round` (1 to 4) stores into word 1 of
/// every page of group `group`: `pagefill_pattern(group, 1) + round`,
/// wrapping.
pub fn cowstorm_word1(group: u64, round: u64) -> u64 {
    pagefill_pattern(group, 1).wrapping_add(round)
}

/// The exact report list `cowstorm` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word of every page after the last storm (word 1
/// of group `g` holds [`cowstorm_word1`]`(g, 4)`), low 32 bits then high.
/// Deduplication must not change it.
pub fn cowstorm_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = cowstorm_pages(mem_bytes);
    let sum = (0..COWSTORM_GROUPS).fold(0u64, |acc, g| {
        let page = pattern_page_sum_with(g, 1, cowstorm_word1(g, COWSTORM_ROUNDS));
        acc.wrapping_add(residue_count(pages, COWSTORM_GROUPS, g).wrapping_mul(page))
    });
    split_reports(&[sum])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagefill::{PAGEFILL_START, PAGEFILL_WORDS_PER_PAGE};
    use crate::sim::{filled, reports_of, to_usize, SIM_SIZES};

    /// Runs cowstorm's algorithm on a simulated RAM, word by word.
    fn simulate_cowstorm(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let mut ram = filled(to_usize(cowstorm_pages(mem_bytes)), COWSTORM_GROUPS);
        for round in 1..=COWSTORM_ROUNDS {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                page[1] = pagefill_pattern(i as u64 % COWSTORM_GROUPS, 1).wrapping_add(round);
            }
        }
        reports_of(&[ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn cowstorm_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(cowstorm_expected_reports(mem), simulate_cowstorm(mem), "mem {mem:#x}");
        }
        assert_eq!(cowstorm_expected_reports(PAGEFILL_START), vec![0, 0]);
        assert_ne!(cowstorm_expected_reports(16 << 30), cowstorm_expected_reports(8 << 30));
    }

    #[test]
    fn cowstorm_phases_and_io_add_up() {
        assert_eq!(COWSTORM_PHASE_IO.iter().sum::<u64>(), COWSTORM_IO_EXITS);
        let storms: Vec<u32> = (0..=COWSTORM_PHASES).filter(|&p| cowstorm_is_storm_phase(p)).collect();
        let passes: Vec<u32> = (0..=COWSTORM_PHASES).filter(|&p| cowstorm_is_pass_phase(p)).collect();
        assert_eq!(storms, [3, 5, 7, 9]);
        assert_eq!(passes, [2, 4, 6, 8]);
        for p in 0..=COWSTORM_PHASES {
            // A pass phase has the dedup request on top of its marker and name.
            assert_eq!(COWSTORM_PHASE_IO[p as usize] == 3, cowstorm_is_pass_phase(p), "phase {p}");
        }
        // Every storm changes every group (so the next pass sees new content)
        // and keeps the groups apart.
        for g in 0..COWSTORM_GROUPS {
            for r in 1..=COWSTORM_ROUNDS {
                assert_ne!(cowstorm_word1(g, r), cowstorm_word1(g, r - 1));
                for h in 0..g {
                    assert_ne!(cowstorm_word1(g, r), cowstorm_word1(h, r));
                }
            }
        }
        // Up to 10 MiB every group fits one KSM page (max_page_sharing 256).
        assert!(cowstorm_pages(10 << 20).div_ceil(COWSTORM_GROUPS) <= 256);
    }
}
