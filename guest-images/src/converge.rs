//! `converge`: the convergence workload (the merge half of `vmm bench
//! dedup`), 64 groups of identical pages and one pass.

use crate::model::split_reports;
use crate::pagefill::{pagefill_pages, pagefill_pattern};

/// Groups of identical pages `converge` fills.
pub const CONVERGE_GROUPS: u64 = 64;

/// The report list `converge` produces for `mem_bytes` of RAM: the wrapping
/// sum of word 0 of every page, low 32 bits then high.
pub fn converge_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes);
    let sum = (0..pages).fold(0u64, |acc, i| acc.wrapping_add(pagefill_pattern(i % CONVERGE_GROUPS, 0)));
    split_reports(&[sum])
}
