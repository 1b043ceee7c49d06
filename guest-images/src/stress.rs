//! `stress`: pseudo-random writes while ksmd merges; its deterministic
//! checksum.

use crate::abi::WORKLOAD_REGION_START;
use crate::model::split_reports;
use crate::pagefill::{pagefill_pages, pagefill_pattern, PAGEFILL_WORDS_PER_PAGE};

/// First guest-physical address `stress` writes.
pub const STRESS_START: u64 = WORKLOAD_REGION_START;
/// Number of page contents `stress` starts from (page i is group i % 4).
pub const STRESS_GROUPS: u64 = 4;
/// Number of pseudo-random writes `stress` makes.
pub const STRESS_ITERATIONS: u64 = 100_000;
/// The last phase `stress` marks.
pub const STRESS_PHASES: u32 = 3;

/// The names of `stress`'s phases 1 to 3 (port 0x504).
pub const STRESS_PHASE_NAMES: [&str; STRESS_PHASES as usize] =
    ["fill 4 groups, merge pass, ksmd on", "random writes under ksmd", "checksum"];

/// Io exits `stress` takes in each phase, 0 to 3: the first marker; name,
/// pass, ksmd start and marker; name, ksmd stop and marker; name, 2
/// reports and exit.
pub const STRESS_PHASE_IO: [u64; STRESS_PHASES as usize + 1] = [1, 4, 3, 4];

/// Io exits `stress` takes whatever the policy: 3 phase markers, 3 names,
/// 3 dedup requests, 2 reports, 1 exit.
pub const STRESS_IO_EXITS: u64 = 3 + 3 + 3 + 2 + 1;

/// The report list `stress` produces for `mem_bytes` of RAM: the wrapping
/// sum of every word of every page after its writes, low 32 bits then high.
pub fn stress_expected_reports(mem_bytes: u64) -> Vec<u64> {
    let pages = pagefill_pages(mem_bytes); // its region is pagefill's
    let mut word0: Vec<u64> = (0..pages).map(|i| pagefill_pattern(i % STRESS_GROUPS, 0)).collect();
    if pages > 0 {
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        for _ in 0..STRESS_ITERATIONS {
            x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            word0[((x >> 33) % pages) as usize] = x >> 62;
        }
    }
    let rest_of_page =
        |g: u64| (1..PAGEFILL_WORDS_PER_PAGE).map(|w| pagefill_pattern(g, w)).fold(0u64, u64::wrapping_add);
    let sum = (0..pages)
        .fold(0u64, |acc, i| acc.wrapping_add(word0[i as usize]).wrapping_add(rest_of_page(i % STRESS_GROUPS)));
    split_reports(&[sum])
}
