//! The guest-misbehaviour suite's images that lean on the deduplicator:
//! code run from merged pages and modified there (`misbehave-merged-code`),
//! zero pages (`misbehave-zero-pages`), floods of dedup requests
//! (`misbehave-dedup-flood`) and unmerges while ksmd runs
//! (`misbehave-unmerge-ksmd`); their io exits, reports and, where certain,
//! faults.

use crate::abi::{PAGE_SIZE, WORKLOAD_REGION_START};
use crate::guest_numbers::*;
use crate::model::{mix64, split_reports};
use crate::pagefill::{pagefill_pages, PAGEFILL_WORDS_PER_PAGE};

/// The faults of one phase: `(ept_read, ept_write, ept_fetch)`.
pub type PhaseFaults = (u64, u64, u64);

/// How the run's secondary MMU meets a merged page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DedupSetting {
    /// A deduplicator runs (any policy but `off`).
    pub dedup: bool,
    /// The pass zaps the entries of the pages it merges (range-flush,
    /// legacy); change-pte keeps them, read-only, in place.
    pub zaps: bool,
    /// The uffd view: a fault arrives as a userfaultfd event, which cannot
    /// tell an instruction fetch from a read (a fetch counts as `ept_read`);
    /// the memslot view sees fetches apart (`ept_fetch`).
    pub uffd: bool,
}

/// The names of `misbehave-merged-code`'s phases 1 to 5.
pub const MISBEHAVE_MERGED_CODE_PHASE_NAMES: [&str; 5] =
    ["copy code into data", "merge pass", "run merged code", "modify merged code", "patch own code"];

/// Io exits of `misbehave-merged-code`'s phases 0 to 5.
pub const MISBEHAVE_MERGED_CODE_PHASE_IO: [u64; 6] = [1, 2, 3, 4, 4, 3];

/// The reports of `misbehave-merged-code`: P and Q run (42, 42), Q after
/// its patch and P untouched (43, 42), the guest's own patched function (8).
pub const MISBEHAVE_MERGED_CODE_REPORTS: [u64; 5] = [42, 42, 43, 42, 8];

/// The faults of each phase of `misbehave-merged-code` (its image is one
/// page, code and names): with a deduplicator the pass merges P with Q and
/// the image's page with its copy. Where the pass zaps, the first
/// instruction after it is a fetch from the guest's own merged page (phase
/// 2) and the calls to P and Q are fetches (phase 3); the memslot view
/// counts them `ept_fetch`, the uffd view `ept_read`. Under every policy
/// the patch of Q (phase 4) and of the guest's own code (phase 5) are one
/// copy-on-write fault each.
pub fn misbehave_merged_code_faults(s: DedupSetting) -> [PhaseFaults; 6] {
    if !s.dedup {
        return [(0, 0, 0); 6];
    }
    let fetches = |n: u64| match (s.zaps, s.uffd) {
        (false, _) => (0, 0, 0),
        (true, false) => (0, 0, n),
        (true, true) => (n, 0, 0),
    };
    [(0, 0, 0), (0, 0, 0), fetches(1), fetches(2), (0, 1, 0), (0, 1, 0)]
}

/// The names of `misbehave-zero-pages`' phases 1 to 6.
pub const MISBEHAVE_ZERO_PAGES_PHASE_NAMES: [&str; 6] =
    ["fill", "merge pass", "read every page", "write zero pages", "merge pass", "checksum"];

/// Io exits of `misbehave-zero-pages`' phases 0 to 6.
pub const MISBEHAVE_ZERO_PAGES_PHASE_IO: [u64; 7] = [1, 2, 3, 4, 2, 3, 4];

/// Pages `p` of `misbehave-zero-pages`' region with `p % 4 == residue`.
fn pages_mod4(mem_bytes: u64, residue: u64) -> u64 {
    pagefill_pages(mem_bytes).saturating_sub(residue).div_ceil(4)
}

/// The zero pages `misbehave-zero-pages`' first pass merges (pages 1 and 2
/// mod 4: written with zeros), and its second (those still zero, 2 mod 4,
/// and the pages 3 mod 4, present since phase 3 read them).
pub fn misbehave_zero_pages_merged(mem_bytes: u64) -> (u64, u64) {
    let (one, two, three) = (pages_mod4(mem_bytes, 1), pages_mod4(mem_bytes, 2), pages_mod4(mem_bytes, 3));
    (one + two, two + three)
}

/// The faults of each phase of `misbehave-zero-pages` with a deduplicator,
/// when each pass merges every zero page it finds (with `use_zero_pages` 1,
/// each into the zero page; with 0, into KSM pages: exact while they fit
/// one, `max_page_sharing` at least [`misbehave_zero_pages_merged`]'s
/// counts): phase 3's reads fault on the pages the first pass zapped (1 and
/// 2 mod 4), phase 4's writes break copy-on-write on the pages 1 mod 4
/// under every policy, phase 6's reads fault on the pages the second pass
/// merged for the first time (3 mod 4: the others were merged already, and
/// not zapped again).
pub fn misbehave_zero_pages_faults(mem_bytes: u64, s: DedupSetting) -> [PhaseFaults; 7] {
    let mut faults = [(0, 0, 0); 7];
    if !s.dedup {
        return faults;
    }
    if s.zaps {
        faults[3].0 = misbehave_zero_pages_merged(mem_bytes).0;
        faults[6].0 = pages_mod4(mem_bytes, 3);
    }
    faults[4].1 = pages_mod4(mem_bytes, 1);
    faults
}

/// The reports of `misbehave-zero-pages`: the sum of every word after the
/// fill (the addresses of the pages 0 mod 4), then after phase 4 wrote the
/// index of each page 1 mod 4 into its word 1.
pub fn misbehave_zero_pages_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let stamps = (0..pages).step_by(4).fold(0u64, |s, p| s.wrapping_add(WORKLOAD_REGION_START + p * PAGE_SIZE));
    let written = (1..pages).step_by(4).fold(0u64, u64::wrapping_add);
    split_reports(&[stamps, stamps.wrapping_add(written)])
}

/// The names of `misbehave-dedup-flood`'s phases 1 to 6.
pub const MISBEHAVE_DEDUP_FLOOD_PHASE_NAMES: [&str; 6] =
    ["fill", "ksmd start/stop pairs", "passes", "unmerges", "not requests", "checksum"];

/// Io exits of `misbehave-dedup-flood`'s phases 0 to 6: the first marker;
/// then each phase's name, its requests and the marker (the checksum: 2
/// reports and the exit). Dedup requests in all: 2 × pairs + passes +
/// unmerges (with a pass before every tenth) + junk values.
pub const MISBEHAVE_DEDUP_FLOOD_PHASE_IO: [u64; 7] = [
    1,
    2,
    2 + 2 * MISBEHAVE_FLOOD_PAIRS,
    2 + MISBEHAVE_FLOOD_PASSES,
    2 + MISBEHAVE_FLOOD_UNMERGES + MISBEHAVE_FLOOD_UNMERGES.div_ceil(10),
    2 + MISBEHAVE_FLOOD_JUNK,
    4,
];

/// Word `w` of a page of group `g` as the flood guests fill it.
fn flood_word(group: u64, w: u64) -> u64 {
    mix64(group * PAGEFILL_WORDS_PER_PAGE + w)
}

/// The wrapping sum of every word of `pages` pages in the flood groups,
/// word 0 of group `g` replaced by `word0(g)` where it is `Some`.
fn flood_sum(pages: u64, word0: impl Fn(u64) -> Option<u64>) -> u64 {
    (0..MISBEHAVE_FLOOD_GROUPS).fold(0u64, |sum, g| {
        let count = pages.saturating_sub(g).div_ceil(MISBEHAVE_FLOOD_GROUPS);
        let page = (0..PAGEFILL_WORDS_PER_PAGE)
            .map(|w| if w == 0 { word0(g).unwrap_or(flood_word(g, 0)) } else { flood_word(g, w) })
            .fold(0u64, u64::wrapping_add);
        sum.wrapping_add(count.wrapping_mul(page))
    })
}

/// The report of `misbehave-dedup-flood`: the sum of every word after all
/// its rewrites (rewrite `r` stores `mix64(r)` into word 0 of group `r %
/// 8`), whatever ksmd did.
pub fn misbehave_dedup_flood_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let rewrites = MISBEHAVE_FLOOD_PAIRS + MISBEHAVE_FLOOD_PASSES + MISBEHAVE_FLOOD_UNMERGES;
    let last = |g: u64| {
        (g < rewrites).then(|| mix64((rewrites - 1 - g) / MISBEHAVE_FLOOD_GROUPS * MISBEHAVE_FLOOD_GROUPS + g))
    };
    split_reports(&[flood_sum(pagefill_pages(mem_bytes), last)])
}

/// The names of `misbehave-unmerge-ksmd`'s phases 1 to 3.
pub const MISBEHAVE_UNMERGE_KSMD_PHASE_NAMES: [&str; 3] = ["fill", "unmerge while ksmd merges", "checksum"];

/// Io exits of `misbehave-unmerge-ksmd`'s phases 0 to 3: the first marker;
/// name and marker; the name, a start and an unmerge per round, the report
/// and the marker; the name, the stop, 2 reports and the exit.
pub const MISBEHAVE_UNMERGE_KSMD_PHASE_IO: [u64; 4] = [1, 2, 2 * MISBEHAVE_UNMERGE_ROUNDS + 3, 5];

/// The reports of `misbehave-unmerge-ksmd`: the words that differed from
/// what the guest wrote (0), then the sum of every word at the end (word 0
/// of group `g` is `mix64(r) | 1` for the last round `r` that wrote it).
pub fn misbehave_unmerge_ksmd_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let rounds = MISBEHAVE_UNMERGE_ROUNDS;
    let last = |g: u64| {
        (g < rounds).then(|| mix64((rounds - 1 - g) / MISBEHAVE_FLOOD_GROUPS * MISBEHAVE_FLOOD_GROUPS + g) | 1)
    };
    let mut reports = vec![0];
    reports.extend(split_reports(&[flood_sum(pagefill_pages(mem_bytes), last)]));
    reports
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::{reports_of, to_usize};

    fn filled(pages: usize) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        (0..pages * words)
            .map(|i| flood_word((i / words) as u64 % MISBEHAVE_FLOOD_GROUPS, (i % words) as u64))
            .collect()
    }

    fn stamp(ram: &mut [u64], group: u64, value: u64) {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        for (p, page) in ram.chunks_mut(words).enumerate() {
            if p as u64 % MISBEHAVE_FLOOD_GROUPS == group {
                page[0] = value;
            }
        }
    }

    fn sum(ram: &[u64]) -> u64 {
        ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))
    }

    #[test]
    fn flood_models_match_simulations() {
        for mem in [2 << 20, (2 << 20) + 3 * 4096, 4 << 20] {
            let pages = to_usize(pagefill_pages(mem));
            let mut ram = filled(pages);
            let rewrites = MISBEHAVE_FLOOD_PAIRS + MISBEHAVE_FLOOD_PASSES + MISBEHAVE_FLOOD_UNMERGES;
            for r in 0..rewrites {
                stamp(&mut ram, r % MISBEHAVE_FLOOD_GROUPS, mix64(r));
            }
            assert_eq!(misbehave_dedup_flood_expected_reports(mem), reports_of(&[sum(&ram)]), "{mem:#x}");
            let mut ram = filled(pages);
            for r in 0..MISBEHAVE_UNMERGE_ROUNDS {
                stamp(&mut ram, r % MISBEHAVE_FLOOD_GROUPS, mix64(r) | 1);
            }
            let mut expected = vec![0];
            expected.extend(reports_of(&[sum(&ram)]));
            assert_eq!(misbehave_unmerge_ksmd_expected_reports(mem), expected, "{mem:#x}");
        }
    }

    #[test]
    fn zero_page_model() {
        // 4 MiB: 512 pages, 128 of each residue.
        assert_eq!(misbehave_zero_pages_merged(4 << 20), (256, 256));
        let zaps = DedupSetting { dedup: true, zaps: true, uffd: false };
        let f = misbehave_zero_pages_faults(4 << 20, zaps);
        assert_eq!((f[3], f[4], f[6]), ((256, 0, 0), (0, 128, 0), (128, 0, 0)));
        let in_place = misbehave_zero_pages_faults(4 << 20, DedupSetting { zaps: false, ..zaps });
        assert_eq!(in_place.iter().map(|f| f.0).sum::<u64>(), 0);
        let mem = (2 << 20) + 6 * 4096; // pages 0-5: residues 0 1 2 3 0 1
        assert_eq!((pages_mod4(mem, 0), pages_mod4(mem, 1), pages_mod4(mem, 2), pages_mod4(mem, 3)), (2, 2, 1, 1));
        let stamps = 2 * WORKLOAD_REGION_START + 4 * PAGE_SIZE;
        assert_eq!(misbehave_zero_pages_expected_reports(mem), reports_of(&[stamps, stamps + 1 + 5]));
    }

    #[test]
    fn phases_add_up() {
        assert_eq!(MISBEHAVE_MERGED_CODE_PHASE_IO.len(), MISBEHAVE_MERGED_CODE_PHASE_NAMES.len() + 1);
        // 6 markers and 6 names; 4,000 + 10 + 110 + 1,000 requests; 2
        // reports and the exit.
        assert_eq!(MISBEHAVE_DEDUP_FLOOD_PHASE_IO.iter().sum::<u64>(), 12 + 5120 + 3);
        let code = misbehave_merged_code_faults(DedupSetting { dedup: true, zaps: true, uffd: true });
        assert_eq!(code.iter().map(|f| f.0 + f.1 + f.2).sum::<u64>(), 5);
    }
}
