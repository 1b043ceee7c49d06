//! `ltp-ksm01` and `ltp-ksm01-fleet` (c/ltp-ksm01*.c, c/ltp_ksm.h): LTP's
//! ksm01 (`create_same_memory`) as built-in guests; their phases, io exits,
//! reports, and the figures LTP's `check()` asserts at each stage, scaled to
//! the guests' memory, with what the guests' own pages add.
//!
//! The source is LTP's testcases/kernel/mem/ksm/ksm_test.h as of commit
//! 1efb4bb8eb4a (linux-test-project/ltp), lines cited below:
//!
//! * 205-213: the letters of children 0, 1 and 2 in four stages
//!   (`ksm_data0` 'c' 'c' 'd' 'd', `ksm_data1` 'a' 'b' 'd' 'd' with the
//!   last stage one byte short, `ksm_data2` 'a' 'a' 'd' 'd'); 218-226:
//!   children from 3 on take `ksm_data0`'s.
//! * 121-122 (`ksm_child_memset`): a child one byte short writes 'e' into
//!   the last byte of its last page.
//! * 254-261: `max_page_sharing` = `pages_to_scan` = size × pages × num (every
//!   page of every child), `sleep_millisecs` 0; ksm01.c's save_restore sets
//!   `smart_scan` 0 and `merge_across_nodes` 1.
//! * 265, 269, 273, 277 (`ksm_group_check`, after each stage): pages_shared
//!   2, 3, 1, 1; pages_sharing size × num × pages − 2, − 3, − 1, − 2;
//!   pages_volatile 0; pages_unshared 0, 0, 0, 1.
//! * 280-283: run = 2 (unmerge), then every figure 0; 286-287: run = 0,
//!   every figure 0.
//!
//! LTP's defaults (ksm_common.h line 20) are size 128 MB, num 3, unit 1:
//! `size × pages` = 32,768 pages per child. The guests scale that to the
//! memory they have: `pages` below (S) stands for `size × pages`.

use crate::abi::{GUEST_BASE, PAGE_SIZE};
use crate::images::find;

/// LTP's letters per child and stage (ksm_test.h lines 205-213):
/// `ksm_data0` (child 0, and every child from 3 on), `ksm_data1`,
/// `ksm_data2`.
pub const LTP_KSM01_DATA: [[u8; 4]; 3] = [*b"ccdd", *b"abdd", *b"aadd"];

/// LTP's stages of memsets before the unmerge.
pub const LTP_KSM01_STAGES: u32 = 4;

/// The last phase of both LTP guests: 4 stages, the unmerge, the stop.
pub const LTP_KSM01_PHASES: u32 = LTP_KSM01_STAGES + 2;

/// The names of `ltp-ksm01`'s phases 1 to 6 (LTP's messages).
pub const LTP_KSM01_PHASE_NAMES: [&str; LTP_KSM01_PHASES as usize] = [
    "children 0 1 2 allocate 'c' 'a' 'a'; KSM merging...",
    "children 0 1 2 allocate 'c' 'b' 'a'",
    "children 0 1 2 allocate 'd' 'd' 'd'",
    "children 0 1 2 allocate 'd' 'd' 'd' except one page with 'e'",
    "KSM unmerging...",
    "stop KSM.",
];

/// Io exits of each phase of `ltp-ksm01`, 0 to 6: the first marker; per
/// stage name, dedup pass, report and marker; the unmerge phase the same
/// with the unmerge request; the stop phase name, stop request and exit.
pub const LTP_KSM01_PHASE_IO: [u64; LTP_KSM01_PHASES as usize + 1] = [1, 4, 4, 4, 4, 4, 3];

/// Io exits of an `ltp-ksm01` run: 6 markers, 6 names, 6 dedup requests,
/// 5 reports, 1 exit.
pub const LTP_KSM01_IO_EXITS: u64 = 6 + 6 + 6 + 5 + 1;

/// The reports of both LTP guests: the bytes that differ from LTP's
/// expectation after each stage's pass and after the unmerge (LTP's
/// `verify`), all 0.
pub const LTP_KSM01_EXPECTED_REPORTS: [u64; 5] = [0; 5];

/// The name `ltp-ksm01-fleet` guest `child` gives stage phase `phase` (1 to
/// 4): LTP's message for a child's memset without its numbers.
pub fn ltp_ksm01_fleet_phase_name(child: u64, phase: u32) -> &'static str {
    let stage = phase as usize - 1;
    let letter = LTP_KSM01_DATA[if child < 3 { child as usize } else { 0 }][stage];
    match (letter, child == 1 && stage == 3) {
        (b'a', _) => "allocates memory filled with 'a'",
        (b'b', _) => "allocates memory filled with 'b'",
        (b'c', _) => "allocates memory filled with 'c'",
        (_, false) => "allocates memory filled with 'd'",
        (_, true) => "allocates memory filled with 'd' except one page with 'e'",
    }
}

/// The names of `ltp-ksm01-fleet` guest 0's phases 1 to 6 (LTP's child 0).
pub const LTP_KSM01_FLEET_GUEST0_PHASE_NAMES: [&str; LTP_KSM01_PHASES as usize] = [
    "allocates memory filled with 'c'",
    "allocates memory filled with 'c'",
    "allocates memory filled with 'd'",
    "allocates memory filled with 'd'",
    "KSM unmerging...",
    "stop KSM.",
];

/// Io exits of each phase of `ltp-ksm01-fleet` guest 0 (and of a single
/// guest of it): [`ltp_ksm01_fleet_phase_io`]`(0)`.
pub const LTP_KSM01_FLEET_GUEST0_PHASE_IO: [u64; LTP_KSM01_PHASES as usize + 1] = [1, 7, 7, 7, 7, 6, 4];

/// Io exits of each phase of `ltp-ksm01-fleet` guest `guest_index`, 0 to
/// 6: per stage name, 3 barriers, report and marker, and guest 0's pass;
/// the unmerge phase name, 2 barriers, report, marker and guest 0's
/// request; the stop phase name, barrier, exit and guest 0's request.
pub fn ltp_ksm01_fleet_phase_io(guest_index: u64) -> [u64; LTP_KSM01_PHASES as usize + 1] {
    let requests = u64::from(guest_index == 0);
    let mut io = [1, 6, 6, 6, 6, 5, 3];
    io[1..].iter_mut().for_each(|n| *n += requests);
    io
}

/// The four figures LTP's `check()` reads from /sys/kernel/mm/ksm.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct KsmFigures {
    /// KSM pages in use.
    pub pages_shared: u64,
    /// Pages mapping a KSM page, less one per KSM page.
    pub pages_sharing: u64,
    /// Pages whose content changed too fast to be put in a tree.
    pub pages_volatile: u64,
    /// Pages in the unstable tree: scanned, stable, matching nothing.
    pub pages_unshared: u64,
}

impl KsmFigures {
    fn plus(self, other: KsmFigures) -> KsmFigures {
        KsmFigures {
            pages_shared: self.pages_shared + other.pages_shared,
            pages_sharing: self.pages_sharing + other.pages_sharing,
            pages_volatile: self.pages_volatile + other.pages_volatile,
            pages_unshared: self.pages_unshared + other.pages_unshared,
        }
    }
}

/// The figures LTP asserts at check `phase` (1 to 4: after each stage; 5:
/// after run = 2; 6: after run = 0) for `children` children of `pages`
/// pages each, derived from the stage's letters: each letter held by 2 or
/// more pages is one KSM page shared by them all (LTP sets
/// `max_page_sharing` to every page), a page alone is unshared, and child
/// 1's 'e' page in stage 4 matches nothing. For 3 or more children this is
/// LTP's lines 265-287 (a unit test checks it).
pub fn ltp_ksm01_expected(phase: u32, children: u64, pages: u64) -> KsmFigures {
    if !(1..=LTP_KSM01_STAGES).contains(&phase) || pages == 0 {
        return KsmFigures::default();
    }
    let stage = phase as usize - 1;
    let mut holders = [0u64; 256];
    for child in 0..children {
        let letter = LTP_KSM01_DATA[if child < 3 { child as usize } else { 0 }][stage];
        holders[usize::from(letter)] += pages - u64::from(child == 1 && stage == 3);
    }
    let e_pages = u64::from(children > 1 && stage == 3);
    let groups = holders.iter().filter(|&&n| n >= 2);
    KsmFigures {
        pages_shared: groups.clone().count() as u64,
        pages_sharing: groups.map(|&n| n - 1).sum(),
        pages_volatile: 0,
        pages_unshared: holders.iter().filter(|&&n| n == 1).count() as u64 + e_pages,
    }
}

/// Where `ltp-ksm01` puts its three children in `mem_bytes` of RAM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LtpLayout {
    /// Pages of the image from `GUEST_BASE` (its code and names: no page of
    /// it matches another, and none changes).
    pub image_pages: u64,
    /// Pages of each child (LTP's size × pages): a third of the pages from
    /// the first after the image to the end of RAM.
    pub child_pages: u64,
    /// The 0 to 2 pages left over after the children, each holding its
    /// words' own addresses (matching no other page, never changing).
    pub leftover_pages: u64,
}

/// The pages of built-in image `name` from `GUEST_BASE` to its end.
fn image_pages(name: &str) -> u64 {
    let image = find(name).expect("a built-in LTP image");
    (image.load_end() - GUEST_BASE).div_ceil(PAGE_SIZE)
}

/// `ltp-ksm01`'s layout for `mem_bytes` of RAM.
pub fn ltp_ksm01_layout(mem_bytes: u64) -> LtpLayout {
    let image_pages = image_pages("ltp-ksm01");
    let start = GUEST_BASE + image_pages * PAGE_SIZE;
    let available = (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(start) / PAGE_SIZE;
    LtpLayout { image_pages, child_pages: available / 3, leftover_pages: available % 3 }
}

/// The figures at the end of phase `phase` of a single `ltp-ksm01` guest
/// with `mem_bytes` of RAM, under the built-in deduplicator with LTP's
/// settings (`max_page_sharing` at least 3 × `child_pages`, `smart_scan`
/// 0): LTP's for 3 children of `child_pages` pages, plus the guest's own
/// pages after each stage's pass: its image pages and leftover pages, each
/// unlike any other page, are `pages_unshared`. After the unmerge and the
/// stop every figure is 0, as in LTP. Dedup off: no deduplicator, every
/// figure absent (0).
pub fn ltp_ksm01_guest_figures(phase: u32, mem_bytes: u64) -> KsmFigures {
    let layout = ltp_ksm01_layout(mem_bytes);
    let ltp = ltp_ksm01_expected(phase, 3, layout.child_pages);
    if !(1..=LTP_KSM01_STAGES).contains(&phase) {
        return ltp;
    }
    ltp.plus(KsmFigures { pages_unshared: layout.image_pages + layout.leftover_pages, ..KsmFigures::default() })
}

/// The `(ept_read, ept_write)` of each phase, 0 to 6, of a single
/// `ltp-ksm01` guest with `mem_bytes` of RAM under the built-in
/// deduplicator with LTP's settings (every group one KSM page), where
/// `zaps` says the policy zaps what a pass merges (range-flush, legacy;
/// change-pte keeps the entries in place, read-only):
///
/// * each stage's memset writes every page of the three children once: a
///   copy-on-write fault per page the pass before merged (none in stage 1,
///   3 S in stages 2 to 4);
/// * each stage's verify, after its pass, reads every page: a fault per
///   page the pass zapped (3 S, less the 'e' page in stage 4, which merges
///   with nothing);
/// * the verify after the unmerge reads every page again: a fault per page
///   the unmerge zapped (the 3 S − 1 merged in stage 4);
/// * the leftover pages and the image never fault (nothing merges them).
pub fn ltp_ksm01_faults(mem_bytes: u64, zaps: bool) -> [(u64, u64); LTP_KSM01_PHASES as usize + 1] {
    let all = 3 * ltp_ksm01_layout(mem_bytes).child_pages;
    let reads = |n: u64| if zaps { n } else { 0 };
    [(0, 0), (reads(all), 0), (reads(all), all), (reads(all), all), (reads(all - 1), all), (reads(all - 1), 0), (0, 0)]
}

/// Pages of each `ltp-ksm01-fleet` guest's memory (LTP's size × pages): from
/// the first page after the image to the end of its RAM.
pub fn ltp_ksm01_fleet_child_pages(mem_bytes: u64) -> u64 {
    let start = GUEST_BASE + image_pages("ltp-ksm01-fleet") * PAGE_SIZE;
    (mem_bytes & !(PAGE_SIZE - 1)).saturating_sub(start) / PAGE_SIZE
}

/// The fleet-wide figures at the end of phase `phase` of an
/// `ltp-ksm01-fleet` of `guests` guests of `mem_bytes` each (LTP's settings
/// as for [`ltp_ksm01_guest_figures`]): LTP's for `guests` children, plus
/// the guests' own image pages, the same bytes in every guest: each is one
/// KSM page shared `guests` ways after a stage's pass (one guest alone:
/// `pages_unshared`).
pub fn ltp_ksm01_fleet_figures(phase: u32, guests: u64, mem_bytes: u64) -> KsmFigures {
    let ltp = ltp_ksm01_expected(phase, guests, ltp_ksm01_fleet_child_pages(mem_bytes));
    if !(1..=LTP_KSM01_STAGES).contains(&phase) {
        return ltp;
    }
    let image = image_pages("ltp-ksm01-fleet");
    let own = match guests {
        0 => KsmFigures::default(),
        1 => KsmFigures { pages_unshared: image, ..KsmFigures::default() },
        n => KsmFigures { pages_shared: image, pages_sharing: (n - 1) * image, ..KsmFigures::default() },
    };
    ltp.plus(own)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sim::contains;

    /// LTP's literal assertions (ksm_test.h lines 265-287) for `num`
    /// children of `pages` pages (size × pages).
    fn ltp_lines(phase: u32, num: u64, pages: u64) -> KsmFigures {
        let f = |pages_shared, pages_sharing, pages_unshared| KsmFigures {
            pages_shared,
            pages_sharing,
            pages_volatile: 0,
            pages_unshared,
        };
        match phase {
            1 => f(2, pages * num - 2, 0),
            2 => f(3, pages * num - 3, 0),
            3 => f(1, pages * num - 1, 0),
            4 => f(1, pages * num - 2, 1),
            _ => f(0, 0, 0),
        }
    }

    #[test]
    fn the_derived_figures_are_ltps_for_three_children_or_more() {
        for num in [3, 4, 7] {
            for pages in [2, 3, 512, 32_768] {
                for phase in 1..=LTP_KSM01_PHASES {
                    assert_eq!(ltp_ksm01_expected(phase, num, pages), ltp_lines(phase, num, pages), "{num} x {pages}");
                }
            }
        }
        // Fewer children than LTP allows (num >= 3): one child alone merges
        // its own pages.
        assert_eq!(
            ltp_ksm01_expected(1, 1, 10),
            KsmFigures { pages_shared: 1, pages_sharing: 9, ..Default::default() }
        );
        assert_eq!(
            ltp_ksm01_expected(4, 1, 10),
            KsmFigures { pages_shared: 1, pages_sharing: 9, ..Default::default() }
        );
    }

    #[test]
    fn the_guests_hold_ltps_letters_and_names() {
        let letters: Vec<u8> = LTP_KSM01_DATA.iter().flatten().copied().collect();
        for image in ["ltp-ksm01", "ltp-ksm01-fleet"] {
            assert!(contains(find(image).expect("image").elf, &letters), "{image}: LTP's letters");
        }
        for child in 0..4 {
            for phase in 1..=LTP_KSM01_STAGES {
                let name = [ltp_ksm01_fleet_phase_name(child, phase).as_bytes(), b"\0"].concat();
                assert!(contains(find("ltp-ksm01-fleet").expect("image").elf, &name));
            }
        }
        assert_eq!(ltp_ksm01_fleet_phase_name(1, 4), "allocates memory filled with 'd' except one page with 'e'");
        assert_eq!(ltp_ksm01_fleet_phase_name(5, 2), "allocates memory filled with 'c'");
    }

    #[test]
    fn the_guests_own_pages_add_to_the_unshared_or_shared_figures() {
        // 8 MiB: the image is one page, 1,791 pages follow: 597 per child.
        let layout = ltp_ksm01_layout(8 << 20);
        assert_eq!(layout, LtpLayout { image_pages: 1, child_pages: 597, leftover_pages: 0 });
        let f = |shared, sharing, unshared| KsmFigures {
            pages_shared: shared,
            pages_sharing: sharing,
            pages_volatile: 0,
            pages_unshared: unshared,
        };
        let single: Vec<KsmFigures> = (1..=6).map(|p| ltp_ksm01_guest_figures(p, 8 << 20)).collect();
        assert_eq!(single, [f(2, 1789, 1), f(3, 1788, 1), f(1, 1790, 1), f(1, 1789, 2), f(0, 0, 0), f(0, 0, 0)]);
        assert_eq!(ltp_ksm01_layout((8 << 20) + 2 * 4096).leftover_pages, 2);
        assert_eq!(ltp_ksm01_guest_figures(1, (8 << 20) + 2 * 4096).pages_unshared, 3);
        // Three guests of 8 MiB: 1,791 pages each, the image page shared 3 ways.
        let fleet: Vec<KsmFigures> = (1..=6).map(|p| ltp_ksm01_fleet_figures(p, 3, 8 << 20)).collect();
        assert_eq!(
            fleet,
            [f(3, 5373, 0), f(4, 5372, 0), f(2, 5374, 0), f(2, 5373, 1), f(0, 0, 0), f(0, 0, 0)],
            "LTP's for 3 x 1,791 pages, plus the image page: 1 shared, 2 sharing"
        );
    }

    #[test]
    fn faults_follow_the_merged_pages() {
        // 8 MiB: 1,791 pages, as measured under range-flush and change-pte.
        let zapped = ltp_ksm01_faults(8 << 20, true);
        assert_eq!(zapped, [(0, 0), (1791, 0), (1791, 1791), (1791, 1791), (1790, 1791), (1790, 0), (0, 0)]);
        let in_place = ltp_ksm01_faults(8 << 20, false);
        assert_eq!(in_place, [(0, 0), (0, 0), (0, 1791), (0, 1791), (0, 1791), (0, 0), (0, 0)]);
    }

    #[test]
    fn io_adds_up() {
        assert_eq!(LTP_KSM01_PHASE_IO.iter().sum::<u64>(), LTP_KSM01_IO_EXITS);
        assert_eq!(ltp_ksm01_fleet_phase_io(0), LTP_KSM01_FLEET_GUEST0_PHASE_IO);
        for phase in 1..=LTP_KSM01_STAGES {
            assert_eq!(LTP_KSM01_FLEET_GUEST0_PHASE_NAMES[phase as usize - 1], ltp_ksm01_fleet_phase_name(0, phase));
        }
        assert_eq!(ltp_ksm01_fleet_phase_io(2).iter().sum::<u64>(), 33);
    }
}
