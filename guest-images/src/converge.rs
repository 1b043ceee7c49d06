//! `converge`: the convergence workload (the merge half of `vmm bench
//! dedup`), 64 groups of identical pages and one pass.

use crate::model::split_reports;
use crate::pagefill::{pagefill_pages, pagefill_pattern};

/// The last phase `converge` marks.
pub const CONVERGE_PHASES: u32 = 3;

/// The names of `converge`'s phases 1 to 3 (port 0x504).
pub const CONVERGE_PHASE_NAMES: [&str; CONVERGE_PHASES as usize] = ["fill 64 groups", "merge pass", "read word 0"];

/// Io exits `converge` takes in each phase, 0 to 3: the first marker; name
/// and marker; name, pass and marker; name, 2 reports and exit.
pub const CONVERGE_PHASE_IO: [u64; CONVERGE_PHASES as usize + 1] = [1, 2, 3, 4];

/// Io exits `converge` takes (all its exits with dedup off): 3 markers, 3
/// names, 1 dedup request, 2 reports, 1 exit.
pub const CONVERGE_IO_EXITS: u64 = 3 + 3 + 1 + 2 + 1;

/// Io exits of a fleet's guest `index` of `guests` (ABI 1.1) in each phase,
/// 0 to 3: in a fleet, phase 2's pass is the fleet's (two barriers; only
/// guest 0 asks for the pass); a guest alone takes [`CONVERGE_PHASE_IO`].
pub fn converge_phase_io(index: u64, guests: u64) -> [u64; CONVERGE_PHASES as usize + 1] {
    let mut io = CONVERGE_PHASE_IO;
    if guests > 1 {
        io[2] += if index == 0 { 2 } else { 1 };
    }
    io
}

/// Groups of identical pages `converge` fills.
pub const CONVERGE_GROUPS: u64 = 64;

/// The report list `converge` produces for `mem_bytes` of RAM: the wrapping
/// sum of word 0 of every page, low 32 bits then high.
pub fn converge_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let sum = (0..pages).fold(0u64, |acc, i| acc.wrapping_add(pagefill_pattern(i % CONVERGE_GROUPS, 0)));
    split_reports(&[sum])
}
