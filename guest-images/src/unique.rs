//! `unique`: pages all different, one pass that merges nothing (the scan
//! half of `vmm bench dedup`).

use crate::abi::PAGE_SIZE;
use crate::model::split_reports;
use crate::pagefill::{pagefill_pages, PAGEFILL_START};

/// The report list `unique` produces for `mem_bytes` of RAM: the wrapping
/// sum of word 0 of every page (each page's own address), low 32 bits then high.
pub fn unique_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let sum = (0..pages).fold(0u64, |acc, i| acc.wrapping_add(PAGEFILL_START + i * PAGE_SIZE));
    split_reports(&[sum])
}

/// The last phase `unique` marks.
pub const UNIQUE_PHASES: u32 = 3;

/// The names of `unique`'s phases 1 to 3 (port 0x504).
pub const UNIQUE_PHASE_NAMES: [&str; UNIQUE_PHASES as usize] = ["fill unique pages", "merge pass", "read word 0"];

/// Io exits `unique` takes in each phase, 0 to 3: the first marker; name
/// and marker; name, pass and marker; name, 2 reports and exit.
pub const UNIQUE_PHASE_IO: [u64; UNIQUE_PHASES as usize + 1] = [1, 2, 3, 4];

/// Io exits `unique` takes under every policy: 3 markers, 3 names, 1 dedup
/// request, 2 reports, 1 exit.
pub const UNIQUE_IO_EXITS: u64 = 3 + 3 + 1 + 2 + 1;
