//! Unmerging: guest writes break the sharing (ksm_tests.c check_ksm_unmerge),
//! and run = 2 unmerges everything.

use ksm::KsmKnobs;
use shadow_mmu::{lock, Gfn, Policy};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 2. ksm_tests.c check_ksm_unmerge (-U), ksm_functional_tests.c test_unmerge:
//    writes break the sharing, and KSM notices at its next scan.
// ---------------------------------------------------------------------------

#[test]
fn writes_unmerge() {
    const N: u64 = 32;
    for policy in POLICIES {
        let lab = Lab::new(policy, N, KsmKnobs::default());
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, STAR);
        }
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{policy:?}: {s:?}");

        // One word per page, a different one in each (ksm_tests.c changes
        // one byte in each page).
        let word = |gfn: Gfn| 0xdead_0000_0000_0000 | gfn;
        let offset = |gfn: Gfn| ((gfn * 8) as usize) % PAGE;
        for gfn in lab.gfns() {
            lab.guest.write(gfn, offset(gfn), &word(gfn).to_le_bytes());
        }
        // KSM learns of it only when it scans (as in Linux).
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{policy:?}: before the scan: {s:?}");
        // Every write faulted and copied: a KSM page is never reused, even
        // by its last mapper.
        assert_eq!(lab.host().stats().cow_copies, N, "{policy:?}");
        assert_eq!(lab.host().nr_free_frames(), 1, "{policy:?}: the KSM frame was freed by the last copy");

        // ksm_tests.c: "get at least 1 scan, so KSM can detect that the
        // pages were modified".
        lab.full_scan();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, 0), "{policy:?}: {s:?}");
        assert_eq!((s.pages_volatile, s.stable_node_chains, s.stable_node_dups), (N, 0, 0), "{policy:?}: {s:?}");
        // And at the next pass they are unshared pages in the unstable tree.
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, N), "{policy:?}: {s:?}");

        for gfn in lab.gfns() {
            let mut expected = pattern(STAR);
            expected[offset(gfn)..offset(gfn) + 8].copy_from_slice(&word(gfn).to_le_bytes());
            assert!(lab.page(gfn) == expected, "{policy:?}: content of gfn {gfn:#x}");
            assert_eq!(lab.guest.read_u64(gfn, offset(gfn)), word(gfn), "{policy:?}: guest view of {gfn:#x}");
        }
        lab.assert_all_frames_distinct();
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// 4. run = 2 (ksm_tests.c ksm_unmerge_time / ksm_functional_tests.c
//    range_maps_duplicates after ksm_unmerge).
// ---------------------------------------------------------------------------

/// The word of page `i` in the mixed layout: zero pages, six groups of
/// identical pages, unique pages.
fn mixed_word(i: u64) -> u64 {
    match i % 8 {
        0 => 0,
        7 => 0x5500_0000_0000_0000 | i,
        g => g * 0x0101_0101_0101_0101,
    }
}

#[test]
fn unmerge_all_leaves_no_shared_frame() {
    const N: u64 = 96; // 12 zero pages, 6 groups of 12, 12 unique pages
    for policy in POLICIES {
        let lab = Lab::new(policy, N, knobs_with(|k| k.use_zero_pages = true));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, mixed_word(gfn - FIRST_GFN));
        }
        lab.full_pass();
        let merged = lab.stats();
        let expect = (12, 6, 6 * 11, 12);
        let got = (merged.ksm_zero_pages, merged.pages_shared, merged.pages_sharing, merged.pages_unshared);
        assert_eq!(got, expect, "{policy:?}: {merged:?}");

        lab.set_knobs(|k| k.run = 2);
        lab.unmerge_all();
        let s = lab.stats();
        let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
        assert_eq!(got, (0, 0, 0, 0), "{policy:?}: {s:?}");
        assert_eq!((s.stable_node_chains, s.stable_node_dups), (0, 0), "{policy:?}");
        lab.assert_all_frames_distinct();
        {
            let host = lab.host();
            for gfn in lab.gfns() {
                let f = host.frame(host.pte(gfn).expect("pte").pfn);
                assert!(!f.ksm && f.mapcount == 1, "{policy:?}: gfn {gfn:#x} frame {f:?}");
            }
        }
        for gfn in lab.gfns() {
            assert!(lab.page(gfn) == pattern(mixed_word(gfn - FIRST_GFN)), "{policy:?}: content of {gfn:#x}");
        }
        lab.check_coherent();
        // mm/ksm.c's break_ksm is an unshare fault (FAULT_FLAG_UNSHARE): each
        // page that was merged (all but the 12 unique ones) has its own copy
        // now, mapped read-only, not writable.
        let merged = |gfn: Gfn| mixed_word(gfn - FIRST_GFN) >> 56 != 0x55;
        {
            let host = lab.host();
            for gfn in lab.gfns() {
                assert_eq!(host.pte(gfn).expect("pte").writable, !merged(gfn), "{policy:?}: gfn {gfn:#x}");
            }
        }
        if policy == Policy::ChangePte {
            // The unshares updated the entries in place, read-only.
            let mmu = lock(&lab.guest.mmu);
            for gfn in lab.gfns() {
                let e = mmu.ept().lookup(gfn);
                assert!(e.is_some_and(|e| e.writable() != merged(gfn)), "{policy:?}: gfn {gfn:#x}: {e:?}");
            }
        }

        // Every rmap item was freed.
        assert_eq!((s.rmap_items, s.pages_volatile, s.general_profit), (0, 0, 0), "{s:?}");

        // Back to run = 1: everything merges again; the checksums went with
        // the rmap items, so it takes checksums, merges, a quiet scan.
        lab.set_knobs(|k| k.run = 1);
        assert_eq!(lab.full_pass(), 3, "{policy:?}");
        let s = lab.stats();
        let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
        assert_eq!(got, expect, "{policy:?}: remerge: {s:?}");
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// run = 2 is mm/ksm.c's unmerge_and_remove_all_rmap_items.
// ---------------------------------------------------------------------------

#[test]
fn unmerge_all_frees_every_rmap_item_and_starts_the_scan_over() {
    // LTP ksm01 (create_same_memory) expects pages_shared, pages_sharing,
    // pages_unshared and pages_volatile all 0 after run = 2: mm/ksm.c frees
    // every rmap item (remove_trailing_rmap_items), every stable node
    // (remove_all_stable_nodes), and sets ksm_scan back to the head of the
    // list with seqnr 0. Its break_ksm is an unshare fault:
    // each page gets its own copy, read-only; a later write reuses it.
    const N: u64 = 96;
    for policy in POLICIES {
        let lab = Lab::new(policy, N, knobs_with(|k| k.use_zero_pages = true));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, mixed_word(gfn - FIRST_GFN));
        }
        lab.full_pass();
        lab.scan(40); // ksmd stopped in the middle of a scan
        let s = lab.stats();
        assert!(s.rmap_items > 0 && s.pages_unshared > 0 && s.full_scans > 0, "{s:?}");
        lab.unmerge_all();
        let s = lab.stats();
        let levels = (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile, s.ksm_zero_pages);
        assert_eq!(levels, (0, 0, 0, 0, 0), "{policy:?}: {s:?}");
        assert_eq!((s.rmap_items, s.general_profit), (0, 0), "{policy:?}: {s:?}");
        let full_scans = s.full_scans;
        assert_eq!((s.stable_node_chains, s.stable_node_dups), (0, 0), "{policy:?}");
        assert!(!lab.range_maps_duplicates(lab.gfns()), "{policy:?}");
        let merged = FIRST_GFN + 1; // a page of group 1
        {
            let host = lab.host();
            let pte = host.pte(merged).expect("pte");
            let f = host.frame(pte.pfn);
            assert!(!pte.writable && !f.ksm && f.mapcount == 1, "{policy:?}: {pte:?} {f:?}");
        }
        lab.check_coherent();
        // The unshared copy is the page's own: a write reuses it in place.
        let before = lab.host().stats();
        lab.guest.write(merged, 8, &[7]);
        let after = lab.host().stats();
        assert_eq!((after.cow_copies, after.cow_reuses), (before.cow_copies, before.cow_reuses + 1), "{policy:?}");
        lab.check_coherent();
        // The scan starts over at its first page (a fresh ksm_scan): the
        // scan ksmd left in the middle is dropped, and the next one looks at
        // every page.
        assert_eq!(lab.scan(u64::MAX), N, "{policy:?}");
        let s = lab.stats();
        assert_eq!((s.rmap_items, s.pages_volatile, s.full_scans), (N, N, full_scans + 1), "{policy:?}: {s:?}");
    }
}
