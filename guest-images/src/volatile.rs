//! `volatile`: pages that never settle while ksmd scans; its phases, io
//! exits and exact reports, in closed form.

use crate::abi::{PAGE_SIZE, WORKLOAD_REGION_START};
use crate::model::split_reports;
use crate::pagefill::pagefill_pages;

/// First guest-physical address `volatile` writes (2 MiB).
pub const VOLATILE_START: u64 = WORKLOAD_REGION_START;

/// Sweeps of `volatile` while ksmd runs (sweeps 1 to 4096; sweep 0, before
/// ksmd starts, comes on top).
pub const VOLATILE_SWEEPS: u64 = 4096;

/// Multiplier of [`volatile_key`].
pub const VOLATILE_KEY_MUL: u64 = 0x9E37_79B9_7F4A_7C15;

/// The last phase `volatile` marks (reports and exit).
pub const VOLATILE_PHASES: u32 = 3;

/// The names of `volatile`'s phases 1 to 3 (port 0x504).
pub const VOLATILE_PHASE_NAMES: [&str; VOLATILE_PHASES as usize] =
    ["first sweep, start ksmd", "4096 sweeps under ksmd", "checksum"];

/// Io exits `volatile` takes in each phase, phases 0 to 3: the first marker;
/// the name, sweep 0, dedup 2 and the marker; the name, the sweeps, dedup 3
/// and the marker; the name, 2 reports + exit.
pub const VOLATILE_PHASE_IO: [u64; VOLATILE_PHASES as usize + 1] = [1, 3, 3, 4];

/// Io exits `volatile` takes whatever the RAM size, policy, view and ksmd's
/// timing: 3 phase markers + 3 names + 2 dedup requests + 2 reports + 1
/// exit. These are all its exits.
pub const VOLATILE_IO_EXITS: u64 = 3 + 3 + 2 + 2 + 1;

/// Number of pages `volatile` rewrites (its region is pagefill's).
pub fn volatile_pages(mem_bytes: u64) -> u64 {
    pagefill_pages(mem_bytes)
}

/// The key of sweep `sweep`: `(sweep + 1) * 0x9E3779B97F4A7C15`, wrapping.
/// Sweep `s` stores `address ^ volatile_key(s)` into words 1 to 511 of
/// every page (word 0 holds the page's own address).
pub fn volatile_key(sweep: u64) -> u64 {
    (sweep + 1).wrapping_mul(VOLATILE_KEY_MUL)
}

/// Wrapping sum of `x ^ key` over every multiple `x` of `step` (a power of
/// two) in `[start, end)` (both multiples of `step`), in O(64): bit by bit,
/// counting the `x` that have the bit set.
fn xor_sum_of_multiples(start: u64, end: u64, step: u64, key: u64) -> u64 {
    let shift = step.trailing_zeros();
    let (t0, t1) = (start >> shift, end >> shift);
    let count = t1 - t0;
    // Numbers t in [0, n) whose bit c is set.
    let ones_below = |n: u64, c: u32| {
        let period = 1u128 << (c + 1);
        let half = 1u128 << c;
        let n = u128::from(n);
        (n / period * half + (n % period).saturating_sub(half)) as u64
    };
    (0..64u32).fold(0u64, |acc, bit| {
        let set = if bit < shift { 0 } else { ones_below(t1, bit - shift) - ones_below(t0, bit - shift) };
        let differ = if key >> bit & 1 == 1 { count - set } else { set };
        acc.wrapping_add(differ.wrapping_mul(1u64.wrapping_shl(bit)))
    })
}

/// The exact report list `volatile` produces for `mem_bytes` of RAM: the
/// wrapping sum of every word of every page after the last sweep, low 32
/// bits then high. Page at address `A` holds `A` in word 0 and
/// `(A + 8w) ^ volatile_key(4096)` in word `w` (1 to 511). Computed in
/// closed form, so any RAM size is modelled at once.
pub fn volatile_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let end = VOLATILE_START + volatile_pages(mem_bytes) * PAGE_SIZE;
    let key = volatile_key(VOLATILE_SWEEPS);
    // Every word but word 0: the 8-byte words of the region minus the page starts.
    let words = xor_sum_of_multiples(VOLATILE_START, end, 8, key);
    let page_starts_xored = xor_sum_of_multiples(VOLATILE_START, end, PAGE_SIZE, key);
    let page_starts = xor_sum_of_multiples(VOLATILE_START, end, PAGE_SIZE, 0);
    split_reports(&[words.wrapping_sub(page_starts_xored).wrapping_add(page_starts)])
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pagefill::{PAGEFILL_START, PAGEFILL_WORDS_PER_PAGE};
    use crate::sim::{reports_of, to_usize, SIM_SIZES};

    /// Runs volatile's algorithm on a simulated RAM; with `every_sweep`,
    /// sweep by sweep (slow), else only sweep 0 and the last one (every
    /// sweep rewrites the same words). Also checks, after every simulated
    /// sweep, that no two pages are identical.
    fn simulate_volatile(mem_bytes: u64, every_sweep: bool) -> Vec<u64> {
        let words = to_usize(PAGEFILL_WORDS_PER_PAGE);
        let pages = to_usize(volatile_pages(mem_bytes));
        let mut ram = vec![0u64; pages * words];
        for (i, page) in ram.chunks_mut(words).enumerate() {
            page[0] = VOLATILE_START + i as u64 * PAGE_SIZE;
        }
        let sweeps: Vec<u64> = if every_sweep { (0..=VOLATILE_SWEEPS).collect() } else { vec![0, VOLATILE_SWEEPS] };
        for s in sweeps {
            for (i, page) in ram.chunks_mut(words).enumerate() {
                let base = VOLATILE_START + i as u64 * PAGE_SIZE;
                for (w, word) in page.iter_mut().enumerate().skip(1) {
                    *word = (base + 8 * w as u64) ^ volatile_key(s);
                }
            }
            let distinct: std::collections::HashSet<&[u64]> = ram.chunks(words).collect();
            assert_eq!(distinct.len(), pages, "sweep {s}: two pages are identical");
        }
        reports_of(&[ram.iter().fold(0u64, |s, &w| s.wrapping_add(w))])
    }

    #[test]
    fn volatile_model_matches_a_simulation() {
        for mem in SIM_SIZES {
            assert_eq!(volatile_expected_reports(mem), simulate_volatile(mem, false), "mem {mem:#x}");
        }
        for mem in [PAGEFILL_START + 4096, PAGEFILL_START + 3 * 4096] {
            assert_eq!(volatile_expected_reports(mem), simulate_volatile(mem, true), "mem {mem:#x}");
        }
        assert_eq!(volatile_expected_reports(PAGEFILL_START), vec![0, 0]);
        assert_ne!(volatile_expected_reports(16 << 30), volatile_expected_reports(8 << 30));
    }

    #[test]
    fn volatile_xor_sums_match_brute_force() {
        let keys = [0, 1, 0xFFF8, volatile_key(0), volatile_key(VOLATILE_SWEEPS), u64::MAX];
        let ranges = [(0, 0), (0, 4096), (8, 4096), (0x20_0000, 0x20_0000 + 37 * 4096), (0x1F_F000, 0x40_1000)];
        for key in keys {
            for (start, end) in ranges {
                for step in [8, PAGE_SIZE] {
                    let (start, end) = (start / step * step, end / step * step);
                    let brute = (start..end).step_by(step as usize).fold(0u64, |a, x| a.wrapping_add(x ^ key));
                    assert_eq!(xor_sum_of_multiples(start, end, step, key), brute, "{start:#x}..{end:#x} /{step}");
                }
            }
        }
    }

    #[test]
    fn volatile_sweeps_change_every_word_and_io_adds_up() {
        assert_eq!(VOLATILE_PHASE_IO.iter().sum::<u64>(), VOLATILE_IO_EXITS);
        // Consecutive keys differ, so every sweep changes every rewritten word
        // (and the page's checksum): no page holds still while ksmd runs.
        for s in 1..=VOLATILE_SWEEPS {
            assert_ne!(volatile_key(s), volatile_key(s - 1));
        }
    }
}
