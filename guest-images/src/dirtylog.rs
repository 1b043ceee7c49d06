//! `dirtylog` (c/dirtylog.c): a live migration's pre-copy loop, soft-dirty
//! rounds (port 0x501 = 5, ABI 1.1) with reads of all memory and writes to
//! a shrinking working set; its phases, io exits, exact reports and the
//! faults each round must take.

use crate::abi::WORKLOAD_REGION_START;
use crate::guest_numbers::{DIRTYLOG_ROUNDS, DIRTYLOG_SEED, SPLITMIX_GAMMA};
use crate::model::{mix64, split_reports};
use crate::pagefill::{pagefill_pages, PAGEFILL_WORDS_PER_PAGE};

/// First guest-physical address of `dirtylog`'s region (2 MiB).
pub const DIRTYLOG_START: u64 = WORKLOAD_REGION_START;

/// The last phase `dirtylog` marks: the fill, three per round, the checksum.
pub const DIRTYLOG_PHASES: u32 = 1 + 3 * DIRTYLOG_ROUNDS as u32 + 1;

/// The names of `dirtylog`'s phases 1 to 14.
pub const DIRTYLOG_PHASE_NAMES: [&str; DIRTYLOG_PHASES as usize] = {
    let mut names = ["fill"; DIRTYLOG_PHASES as usize];
    let mut round = 0;
    while round < DIRTYLOG_ROUNDS as usize {
        names[1 + 3 * round] = "soft-dirty round";
        names[2 + 3 * round] = "read all memory";
        names[3 + 3 * round] = "write the working set";
        round += 1;
    }
    names[DIRTYLOG_PHASES as usize - 1] = "checksum";
    names
};

/// Io exits of each phase, 0 to 14: the first marker; the fill (name +
/// marker); per round the soft-dirty request (name + request + marker), the
/// reads (name + 2 reports + marker) and the writes (name + marker); the
/// checksum (name + 2 reports + exit).
pub const DIRTYLOG_PHASE_IO: [u64; DIRTYLOG_PHASES as usize + 1] = [1, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 3, 4, 2, 4];

/// Io exits of a `dirtylog` run: 14 markers, 14 names, 4 soft-dirty
/// requests, 10 reports, 1 exit.
pub const DIRTYLOG_IO_EXITS: u64 = 14 + 14 + 4 + 10 + 1;

/// What phase `phase` of `dirtylog` is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtylogPhase {
    /// Phase 0 (before the first marker), the fill or the checksum.
    Other,
    /// Round `r`'s soft-dirty request.
    SoftDirty(u64),
    /// Round `r`'s reads of all memory.
    ReadAll(u64),
    /// Round `r`'s writes to its working set.
    WriteSet(u64),
}

/// What phase `phase` of `dirtylog` does.
pub fn dirtylog_phase(phase: u32) -> DirtylogPhase {
    match phase {
        p if !(2..DIRTYLOG_PHASES).contains(&p) => DirtylogPhase::Other,
        p => {
            let round = u64::from(p - 2) / 3;
            match (p - 2) % 3 {
                0 => DirtylogPhase::SoftDirty(round),
                1 => DirtylogPhase::ReadAll(round),
                _ => DirtylogPhase::WriteSet(round),
            }
        }
    }
}

/// The guest's own pages a soft-dirty round zaps and the guest touches
/// again before its next phase: its code page.
pub const DIRTYLOG_CODE_PAGES: u64 = 1;

/// Number of pages of `dirtylog`'s region.
pub fn dirtylog_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// Pages round `round` writes: the first `pages >> round`.
pub fn dirtylog_working_set(mem_bytes: u64, round: u64) -> u64 {
    dirtylog_pages(mem_bytes) >> round
}

/// The `(ept_read, ept_write)` phase `phase` of `dirtylog` must take once
/// the VMM serves soft-dirty rounds (issue 10), dedup off or on with ksmd
/// off (no merge ever happens: every page differs from every other):
///
/// * after a round, the reads fault once on every page where the round's
///   batch range zapped the entries (`zaps`: range-flush, legacy and
///   change-pte zap a range that only removes write permission; event-aware
///   downgrades the entries in place and takes none);
/// * each page of the working set takes exactly one write fault under every
///   policy (read-only in the primary MMU since the round: the fault makes
///   it writable again, same frame);
/// * a round that zaps also zaps the guest's own code page (at 1 MiB, in
///   guest RAM): the next instruction refaults it, once per round
///   ([`DIRTYLOG_CODE_PAGES`]), counted as `ept_fetch` under the memslot
///   view and as `ept_read` under the userfaultfd view (which cannot tell a
///   fetch from a read): the first figure here counts reads and fetches;
/// * nothing else faults (the checksum reads pages already installed).
pub fn dirtylog_faults(mem_bytes: u64, phase: u32, zaps: bool) -> (u64, u64) {
    match dirtylog_phase(phase) {
        DirtylogPhase::SoftDirty(_) if zaps => (DIRTYLOG_CODE_PAGES, 0),
        DirtylogPhase::ReadAll(_) if zaps => (dirtylog_pages(mem_bytes), 0),
        DirtylogPhase::WriteSet(round) => (0, dirtylog_working_set(mem_bytes, round)),
        _ => (0, 0),
    }
}

/// The value round `round` stores into word 1 of page `page`.
fn written_word(round: u64, page: u64) -> u64 {
    (round + 1).wrapping_mul(SPLITMIX_GAMMA).wrapping_add(page)
}

/// The exact report list of `dirtylog` with `mem_bytes` of RAM: the sum of
/// every word at each round's reads (4 sums), then at the end; each low
/// half first. Soft-dirty rounds and deduplication must not change it.
pub fn dirtylog_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = dirtylog_pages(mem_bytes);
    let mut word1: Vec<u64> = (0..pages).map(|p| mix64(DIRTYLOG_SEED + p * PAGEFILL_WORDS_PER_PAGE + 1)).collect();
    let mut sum = (0..pages * PAGEFILL_WORDS_PER_PAGE).fold(0u64, |s, i| s.wrapping_add(mix64(DIRTYLOG_SEED + i)));
    let mut sums = Vec::new();
    for round in 0..DIRTYLOG_ROUNDS {
        sums.push(sum);
        for (p, word) in word1.iter_mut().enumerate().take((pages >> round) as usize) {
            let new = written_word(round, p as u64);
            sum = sum.wrapping_sub(*word).wrapping_add(new);
            *word = new;
        }
    }
    sums.push(sum);
    split_reports(&sums)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{reports_of, to_usize};

    fn simulate(mem_bytes: u64) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(dirtylog_pages(mem_bytes));
        let mut ram: Vec<u64> = (0..(pages * words) as u64).map(|i| mix64(DIRTYLOG_SEED + i)).collect();
        let sum = |ram: &[u64]| ram.iter().fold(0u64, |s, &w| s.wrapping_add(w));
        let mut sums = Vec::new();
        for round in 0..DIRTYLOG_ROUNDS {
            sums.push(sum(&ram));
            for (p, page) in ram.chunks_mut(words).take(pages >> round).enumerate() {
                page[1] = written_word(round, p as u64);
            }
        }
        sums.push(sum(&ram));
        reports_of(&sums)
    }

    #[test]
    fn dirtylog_model_matches_a_simulation() {
        for mem in [0, 2 << 20, (2 << 20) + 4096, (2 << 20) + 13 * 4096, 4 << 20] {
            assert_eq!(dirtylog_expected_reports(mem), simulate(mem), "{mem:#x}");
        }
    }

    #[test]
    fn phases_rounds_and_faults() {
        assert_eq!(DIRTYLOG_PHASE_IO.iter().sum::<u64>(), DIRTYLOG_IO_EXITS);
        assert_eq!(dirtylog_phase(2), DirtylogPhase::SoftDirty(0));
        assert_eq!(dirtylog_phase(3), DirtylogPhase::ReadAll(0));
        assert_eq!(dirtylog_phase(13), DirtylogPhase::WriteSet(3));
        for p in [0, 1, 14, 15] {
            assert_eq!(dirtylog_phase(p), DirtylogPhase::Other);
        }
        let mem = 4 << 20; // 512 pages
        let faults: Vec<(u64, u64)> = (0..=DIRTYLOG_PHASES).map(|p| dirtylog_faults(mem, p, true)).collect();
        let round = |r: u64| [(DIRTYLOG_CODE_PAGES, 0), (512, 0), (0, 512 >> r)];
        let expected: Vec<(u64, u64)> =
            [(0, 0), (0, 0)].into_iter().chain((0..4).flat_map(round)).chain([(0, 0)]).collect();
        assert_eq!(faults, expected);
        let total = |zaps| {
            (0..=DIRTYLOG_PHASES).map(|p| dirtylog_faults(mem, p, zaps)).fold((0, 0), |a, f| (a.0 + f.0, a.1 + f.1))
        };
        assert_eq!(total(true), (4 * (512 + DIRTYLOG_CODE_PAGES), 512 + 256 + 128 + 64));
        assert_eq!(total(false), (0, 512 + 256 + 128 + 64));
    }
}
