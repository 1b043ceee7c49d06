//! `mixed`: read-mostly with some writes, in 16 paced phases after one
//! pass; its phases, io exits, pages written and exact reports.

use crate::abi::WORKLOAD_REGION_START;
use crate::model::{pattern_page_sum_with, residue_count, split_reports};
use crate::pagefill::{pagefill_pages, pagefill_pattern};

/// First guest-physical address `mixed` fills (2 MiB).
pub const MIXED_START: u64 = WORKLOAD_REGION_START;

/// Groups of identical pages `mixed` fills (page `i` is in group `i % 8`).
pub const MIXED_GROUPS: u64 = 8;

/// `mixed` writes every `MIXED_STRIDE`-th page per phase: in its read/write
/// phase `j` (0-based), the pages `i` with `i % 8 == j % 8`.
pub const MIXED_STRIDE: u64 = 8;

/// Read/write phases of `mixed` (guest phases 3 to 18).
pub const MIXED_RW_PHASES: u32 = 16;

/// The guest phase number of `mixed`'s first read/write phase (`j = 0`).
pub const MIXED_FIRST_RW_PHASE: u32 = 3;

/// The last phase `mixed` marks (reports and exit): 19.
pub const MIXED_PHASES: u32 = MIXED_FIRST_RW_PHASE + MIXED_RW_PHASES;

/// Iterations of the spin loop that ends every read/write phase of `mixed`
/// (2^28: about 64 ms at the 4 G iterations per second of the development
/// machines), so that the run lasts long enough to switch ksmd from outside.
pub const MIXED_SPIN: u64 = 1 << 28;

/// The name of `mixed`'s read/write phases 3 to 18 (port 0x504).
pub const MIXED_RW_PHASE_NAME: &str = "read every page, write every 8th";

/// The names of `mixed`'s phases 1 to 19 (port 0x504).
pub const MIXED_PHASE_NAMES: [&str; MIXED_PHASES as usize] = {
    let mut names = [MIXED_RW_PHASE_NAME; MIXED_PHASES as usize];
    names[0] = "fill 8 groups";
    names[1] = "merge pass";
    names[MIXED_PHASES as usize - 1] = "checksums";
    names
};

/// Io exits `mixed` takes in each phase, phases 0 to [`MIXED_PHASES`]: the
/// first marker, then a name and a marker each, plus the dedup request in
/// phase 2 and 4 reports + exit (instead of a marker) in phase 19.
pub const MIXED_PHASE_IO: [u64; MIXED_PHASES as usize + 1] =
    [1, 2, 3, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2, 6];

/// Io exits `mixed` takes whatever the RAM size and policy: 19 phase
/// markers + 19 names + 1 dedup request + 4 reports + 1 exit.
pub const MIXED_IO_EXITS: u64 = 19 + 19 + 1 + 4 + 1;

/// Number of pages `mixed` fills (its region is pagefill's).
pub fn mixed_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Number of pages `mixed` writes in guest phase `phase` (0 outside the
/// read/write phases 3 to 18): every 8th page, `i % 8 == (phase - 3) % 8`.
/// In phases 3 to 10 each is a write to a merged page (a copy-on-write
/// fault with deduplication on); from phase 11 on, to a private one.
pub fn mixed_pages_written(mem_bytes: u64, phase: u32) -> u64 {
    if !(MIXED_FIRST_RW_PHASE..MIXED_PHASES).contains(&phase) {
        return 0;
    }
    let class = u64::from(phase - MIXED_FIRST_RW_PHASE) % MIXED_STRIDE;
    residue_count(mixed_pages(mem_bytes), MIXED_STRIDE, class)
}

/// The exact report list `mixed` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word-0 load of the 16 read/write phases (each
/// before that phase's store), then the wrapping sum of every word of every
/// page at the end; each low 32 bits then high. Page `i`'s word 0 starts
/// at `pagefill_pattern(i % 8, 0)` and grows by one at every store.
pub fn mixed_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = mixed_pages(mem_bytes);
    let period = MIXED_GROUPS.max(MIXED_STRIDE); // both powers of two
    let (mut reads, mut all) = (0u64, 0u64);
    for class in 0..period {
        let count = residue_count(pages, period, class);
        let group = class % MIXED_GROUPS;
        let mut word0 = pagefill_pattern(group, 0);
        for j in 0..u64::from(MIXED_RW_PHASES) {
            reads = reads.wrapping_add(count.wrapping_mul(word0));
            if class % MIXED_STRIDE == j % MIXED_STRIDE {
                word0 = word0.wrapping_add(1);
            }
        }
        all = all.wrapping_add(count.wrapping_mul(pattern_page_sum_with(group, 0, word0)));
    }
    split_reports(&[reads, all])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagefill::{PAGEFILL_START, PAGEFILL_WORDS_PER_PAGE};
    use crate::sim::{filled, reports_of, to_usize, SIM_SIZES};

    /// Runs mixed's algorithm on a simulated RAM, word by word.
    fn simulate_mixed(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let mut ram = filled(to_usize(mixed_pages(mem_bytes)), MIXED_GROUPS);
        let mut reads = 0u64;
        for j in 0..u64::from(MIXED_RW_PHASES) {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                let word0 = page[0];
                reads = reads.wrapping_add(word0);
                if i as u64 % MIXED_STRIDE == j % MIXED_STRIDE {
                    page[0] = word0.wrapping_add(1);
                }
            }
        }
        reports_of(&[reads, ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn mixed_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(mixed_expected_reports(mem), simulate_mixed(mem), "mem {mem:#x}");
        }
        assert_eq!(mixed_expected_reports(PAGEFILL_START), vec![0; 4]);
        assert_ne!(mixed_expected_reports(16 << 30), mixed_expected_reports(8 << 30));
    }

    #[test]
    fn mixed_phases_and_io_add_up() {
        assert_eq!(MIXED_PHASE_IO.iter().sum::<u64>(), MIXED_IO_EXITS);
        assert_eq!(MIXED_PHASES, 19);
        for mem in SIM_SIZES {
            let n = mixed_pages(mem);
            // The phases 3 to 10 write each page once, so do 11 to 18; no
            // other phase writes.
            let first: u64 = (3..11).map(|p| mixed_pages_written(mem, p)).sum();
            let second: u64 = (11..19).map(|p| mixed_pages_written(mem, p)).sum();
            assert_eq!((first, second), (n, n), "mem {mem:#x}");
            for p in [0, 1, 2, 19, 20] {
                assert_eq!(mixed_pages_written(mem, p), 0);
            }
        }
        // 8 MiB: 1,536 pages, 192 written per phase.
        assert_eq!(mixed_pages_written(8 << 20, 3), 192);
        // Groups and classes coincide, so a phase writes whole groups.
        assert_eq!(MIXED_GROUPS, MIXED_STRIDE);
    }
}
