//! The stable tree: max_page_sharing and its stable_node_chains (ksm_tests.c
//! check_ksm_merge's arithmetic, mm/ksm.c max_page_sharing_store), and stale
//! stable nodes.

use ksm::{KsmError, KsmKnobs};
use shadow_mmu::{lock, Policy};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 1. ksm_tests.c check_ksm_merge (-M) and its max_page_sharing arithmetic.
// ---------------------------------------------------------------------------

#[test]
fn max_page_sharing_splits_into_stable_node_dups() {
    // n mod m = 0, 1, 2, 3, and a bigger one with Linux's default limit.
    for (n, m) in [(10, 5), (11, 5), (12, 5), (13, 5), (2, 2), (3, 2), (600, 256)] {
        for policy in POLICIES {
            check_merge(policy, n, m);
        }
    }
}

// ---------------------------------------------------------------------------
// mm/ksm.c details: max_page_sharing while pages are shared, stale nodes.
// ---------------------------------------------------------------------------

#[test]
fn max_page_sharing_cannot_change_while_pages_are_shared() {
    // mm/ksm.c max_page_sharing_store: -EBUSY while ksm_pages_shared != 0.
    const N: u64 = 8;
    let lab = Lab::new(Policy::ChangePte, N, KsmKnobs::default());
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    assert_eq!((lab.stats().pages_shared, lab.stats().pages_sharing), (1, N - 1));
    let knobs = lock(&lab.ksm).knobs();
    let e = lock(&lab.ksm).set_knobs(KsmKnobs { max_page_sharing: 3, ..knobs }).expect_err("busy");
    assert!(matches!(e, KsmError::Busy { name: "max_page_sharing", pages_shared: 1 }), "{e:?}");
    assert!(e.to_string().contains("max_page_sharing"), "{e}");
    assert_eq!(lock(&lab.ksm).knobs(), knobs, "a refused write changes nothing");
    // The same value, with other knobs changed, is accepted.
    lab.set_knobs(|k| k.pages_to_scan = 7);
    // Once unmerged it can change, and the next pass groups by it.
    lab.unmerge_all();
    lab.set_knobs(|k| k.max_page_sharing = 3);
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), linux_expected(N, 3), "{s:?}");
}

#[test]
fn pruning_stale_stable_nodes_never_brings_their_freed_frames_back() {
    // 64 pages of one content and 32 pairs, merged: 33 KSM pages.
    let lab = Lab::new(Policy::ChangePte, 128, KsmKnobs::default());
    for (i, gfn) in lab.gfns().enumerate() {
        lab.guest.fill(gfn, if i < 64 { 7 } else { 1000 + i as u64 / 2 });
    }
    lab.full_pass();
    assert_eq!((lab.stats().pages_shared, lab.stats().pages_sharing), (33, 95));
    // Both sharers of every pair are rewritten: 32 stable nodes go stale and
    // their frames go back to the host.
    for (i, gfn) in lab.gfns().enumerate().skip(64) {
        lab.guest.fill(gfn, 5000 + i as u64);
    }
    lab.host().flush_holes().expect("flush_holes");
    let before = lab.resident();
    // The scan meets the stale nodes while it searches the stable tree: it
    // prunes them without reading their (punched) frames.
    lab.full_scan();
    assert_eq!(lab.resident(), before, "the scan made freed frames resident again");
    assert_eq!(lab.stats().pages_shared, 1);
}
