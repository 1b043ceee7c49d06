//! Merging, after ksm_tests.c check_ksm_merge (-M): identical pages become
//! one KSM page; and mm/ksm.c's details of a failed merge and of the merges
//! figure.

use shadow_mmu::Policy;

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 1. ksm_tests.c check_ksm_merge (-M) and its max_page_sharing arithmetic.
// ---------------------------------------------------------------------------

#[test]
fn identical_pages_merge_into_one_ksm_page() {
    for policy in POLICIES {
        check_merge(policy, 64, 256);
    }
}

// ---------------------------------------------------------------------------
// mm/ksm.c details: a failed merge, the merges figure.
// ---------------------------------------------------------------------------

#[test]
fn a_failed_merge_with_a_ksm_page_ends_the_visit() {
    // Pages 0, 1, 2 hold '*'. Scan 1 records checksums. In scan 2 pages 0
    // and 1 become a KSM page; page 2 finds it in the stable tree but is
    // written just before its write protection, so the merge fails.
    // mm/ksm.c's cmp_and_merge_page returns then. Going on to the unstable
    // tree with the copy read before the write ('*', whose checksum held
    // since scan 1) would put page 2 there under content it no longer holds.
    let lab = Lab::new(Policy::ChangePte, 3, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    WriteBeforeProtect::arm(&lab, FIRST_GFN + 2, pattern(0xb0b0));
    lab.full_scan();
    let s = lab.stats();
    let got = (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile);
    assert_eq!(got, (1, 1, 0, 1), "page 2 is in no tree after its failed merge: {s:?}");
    assert_eq!(s.merges, 2, "{s:?}");
    assert!(lab.page(FIRST_GFN + 2) == pattern(0xb0b0));
    // Page 2 now holds still: it is an unshared page after the next pass.
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (1, 1, 1), "{s:?}");
    lab.check_coherent();
}

#[test]
fn merges_counts_no_pair_whose_second_half_failed() {
    // Pages 0 and 1 hold '*'. In scan 2 page 0 enters the unstable tree and
    // page 1 finds it: page 1 is write-protected to become the KSM page,
    // then page 0 is written just before its own write protection, so the
    // pair does not merge. Nothing is shared: no merge is counted.
    let lab = Lab::new(Policy::ChangePte, 2, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    WriteBeforeProtect::arm(&lab, FIRST_GFN, pattern(0xb0b0));
    lab.full_scan();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.merges), (0, 0, 0), "{s:?}");
    assert!(!lab.host().pte(FIRST_GFN + 1).expect("pte").writable, "page 1 stays write-protected");
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.merges), (0, 0, 0), "two different pages: {s:?}");
    lab.check_coherent();
}
