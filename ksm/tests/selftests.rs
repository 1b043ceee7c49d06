//! Ports of Linux's KSM selftests (tools/testing/selftests/mm/ksm_tests.c
//! and ksm_functional_tests.c) where their concept exists at the level of
//! this crate, with the figures they assert. The crate docs' table says
//! where each of the others went (timing to `vmm bench`, no NUMA here,
//! prctl / fork / PROT_NONE / uffd-wp at the VMM's level).
//!
//! MADV_UNMERGEABLE of a range is [`ksm::Ksm::unmerge_ksm_pages`]; `run =
//! 2` (the selftests' `ksm_stop`) is [`ksm::Ksm::unmerge_all`]; MADV_DONTNEED
//! is [`Lab::discard`]; fork's copied mapping is [`Lab::fork_map`];
//! `range_maps_duplicates` is [`Lab::range_maps_duplicates`].

use ksm::KsmKnobs;
use shadow_mmu::{lock, Gfn, Policy, PAGE_SIZE};

mod common;

use common::*;

/// 2 MiB, the functional tests' region.
const TWO_MIB_PAGES: u64 = (2 << 20) / PAGE_SIZE;

/// ksm_functional_tests.c `mmap_and_merge_range(val, 2 MiB)`: every page
/// filled with byte `val`, merged by a pass (the selftest waits for two
/// full scans of ksmd; a pass runs to its fixpoint).
fn mmap_and_merge_range(policy: Policy, val: u8, knobs: KsmKnobs) -> Lab {
    let lab = Lab::new(policy, TWO_MIB_PAGES, knobs);
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, u64::from_ne_bytes([val; 8]));
    }
    lab.full_pass();
    lab
}

fn unmerge_range(lab: &Lab, gfns: std::ops::Range<Gfn>) {
    let id = lab.mm_id();
    lock(&lab.ksm).unmerge_ksm_pages(id, gfns, &|| false).expect("unmerge_ksm_pages");
}

/// ksm_tests.c check_ksm_merge, as run_vmtests.sh runs it (`-M -p 10`):
/// ten pages of '*', default max_page_sharing, merged;
/// assert_ksm_pages_count(10) wants pages_shared 1, pages_sharing 9.
#[test]
fn ksm_tests_check_ksm_merge() {
    for policy in POLICIES {
        check_merge(policy, 10, 256);
        assert_eq!(linux_expected(10, 256), (1, 9));
    }
}

/// ksm_tests.c check_ksm_unmerge (`-U`): two pages of '*' merged; one byte
/// changed in each ('-' and '+'); after one more full scan
/// assert_ksm_pages_count(0): pages_shared 0, pages_sharing 0.
#[test]
fn ksm_tests_check_ksm_unmerge() {
    for policy in POLICIES {
        let lab = Lab::new(policy, 2, KsmKnobs::default());
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, STAR);
        }
        lab.full_pass();
        assert_eq!((lab.stats().pages_shared, lab.stats().pages_sharing), (1, 1), "{policy:?}");
        lab.guest.write(FIRST_GFN, 0, b"-");
        lab.guest.write(FIRST_GFN + 1, 0, b"+");
        lab.full_scan();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), linux_expected(0, 256), "{policy:?}: {s:?}");
        assert_eq!((s.pages_shared, s.pages_sharing), (0, 0));
        lab.check_coherent();
    }
}

/// ksm_tests.c check_ksm_zero_page_merge (`-Z -p 10 -z 0` and `-z 1`): ten
/// zero-filled pages. With use_zero_pages they map the zero page and
/// assert_ksm_pages_count(0) holds; without, they merge like any page:
/// assert_ksm_pages_count(10), pages_shared 1, pages_sharing 9.
#[test]
fn ksm_tests_check_ksm_zero_page_merge() {
    for policy in POLICIES {
        for use_zero_pages in [false, true] {
            let lab = Lab::new(policy, 10, knobs_with(|k| k.use_zero_pages = use_zero_pages));
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 0);
            }
            lab.full_pass();
            let s = lab.stats();
            let (want, zero) = if use_zero_pages { ((0, 0), 10) } else { ((1, 9), 0) };
            assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (want.0, want.1, zero), "{s:?}");
            lab.check_coherent();
        }
    }
}

/// ksm_functional_tests.c test_unmerge: 2 MiB of 0xcf merged, then
/// MADV_UNMERGEABLE over it: no two pages map the same frame.
#[test]
fn ksm_functional_tests_test_unmerge() {
    for policy in POLICIES {
        let lab = mmap_and_merge_range(policy, 0xcf, KsmKnobs::default());
        assert!(lab.range_maps_duplicates(lab.gfns()), "{policy:?}: merged");
        unmerge_range(&lab, lab.gfns());
        assert!(!lab.range_maps_duplicates(lab.gfns()), "{policy:?}: pages were unmerged");
        lab.check_coherent();
    }
}

/// ksm_functional_tests.c test_unmerge_zero_pages: with use_zero_pages, 2
/// MiB of zeros merged: ksm_zero_pages is the page count; MADV_UNMERGEABLE
/// of the first half halves it; writing a word into each page of the other
/// half brings it to 0; no two pages map the same frame.
#[test]
fn ksm_functional_tests_test_unmerge_zero_pages() {
    for policy in POLICIES {
        let lab = mmap_and_merge_range(policy, 0, knobs_with(|k| k.use_zero_pages = true));
        let n = TWO_MIB_PAGES;
        assert_eq!(lab.stats().ksm_zero_pages, n, "{policy:?}: 'ksm_zero_pages' updated after merging");
        let half = FIRST_GFN + n / 2;
        unmerge_range(&lab, FIRST_GFN..half);
        assert_eq!(lab.stats().ksm_zero_pages, n / 2, "{policy:?}: 'ksm_zero_pages' updated after unmerging");
        for gfn in half..lab.end {
            let offs = ((gfn - FIRST_GFN) * PAGE_SIZE) as u32;
            lab.guest.write(gfn, 0, &offs.to_ne_bytes());
        }
        assert_eq!(lab.stats().ksm_zero_pages, 0, "{policy:?}: 'ksm_zero_pages' updated after write fault");
        assert!(!lab.range_maps_duplicates(lab.gfns()), "{policy:?}: KSM zero pages were unmerged");
        lab.check_coherent();
    }
}

/// ksm_functional_tests.c test_unmerge_discarded: 2 MiB of 0xcf merged;
/// MADV_DONTNEED on the first half (no page there any more); then
/// MADV_UNMERGEABLE over all of it must work, and no two pages map the
/// same frame. The scanner then finds no page in the discarded half and
/// frees its rmap items (get_next_rmap_item). (MADV_UNMERGEABLE also
/// clears VM_MERGEABLE in Linux; this crate has no per-range mergeable
/// flag, so the other half may merge again at that scan.)
#[test]
fn ksm_functional_tests_test_unmerge_discarded() {
    for policy in POLICIES {
        let lab = mmap_and_merge_range(policy, 0xcf, KsmKnobs::default());
        let half = FIRST_GFN + TWO_MIB_PAGES / 2;
        for gfn in FIRST_GFN..half {
            lab.discard(gfn);
        }
        unmerge_range(&lab, lab.gfns());
        assert!(!lab.range_maps_duplicates(lab.gfns()), "{policy:?}: pages were unmerged");
        lab.full_scan();
        let s = lab.stats();
        assert_eq!(s.rmap_items, TWO_MIB_PAGES / 2, "{policy:?}: only the other half has rmap items: {s:?}");
        assert_eq!(lab.guest.read_u64(FIRST_GFN, 0), 0, "{policy:?}: a discarded page reads zero");
        lab.check_coherent();
    }
}

/// ksm_functional_tests.c test_fork_global_ksm_zero_pages_count, the part
/// this crate holds: zero pages merged with use_zero_pages; a fork copies
/// their zero-page mappings, which count in the global ksm_zero_pages too
/// (here: more pages come to map the zero page without KSM's doing); then
/// `ksm_stop` (run = 2) brings the global count back to what it was
/// before, 0. The per-process counter of the child needs a second guest
/// (crate docs, selftest table).
#[test]
fn ksm_functional_tests_test_fork_global_ksm_zero_pages_count() {
    const N: u64 = 64;
    for policy in POLICIES {
        let lab = Lab::new(policy, 2 * N, knobs_with(|k| k.use_zero_pages = true));
        let before = lab.stats().ksm_zero_pages;
        for gfn in FIRST_GFN..FIRST_GFN + N {
            lab.guest.fill(gfn, 0);
        }
        lab.full_pass();
        assert_eq!(lab.stats().ksm_zero_pages, N, "{policy:?}");
        let zero = lab.zero_pfn();
        for gfn in FIRST_GFN + N..lab.end {
            lab.fork_map(gfn, zero);
        }
        assert_eq!(lab.stats().ksm_zero_pages, 2 * N, "{policy:?}: the copies count");
        lab.unmerge_all();
        assert_eq!(lab.stats().ksm_zero_pages, before, "{policy:?}: incorrect global ksm zero page count");
        assert!(!lab.range_maps_duplicates(lab.gfns()), "{policy:?}");
        lab.check_coherent();
    }
}
