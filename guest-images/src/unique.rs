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

/// Io exits `unique` takes under every policy.
pub const UNIQUE_IO_EXITS: u64 = 7;
