//! Zero pages, with and without use_zero_pages (ksm_tests.c
//! check_ksm_zero_page_merge, ksm_functional_tests.c
//! test_unmerge_zero_pages), and ksm_zero_pages.

use ksm::KSM_RMAP_ITEM_SIZE;
use shadow_mmu::{Policy, PAGE_SIZE};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 3. ksm_tests.c check_ksm_zero_page_merge (-Z, -z 0 / -z 1) and
//    ksm_functional_tests.c test_unmerge_zero_pages.
// ---------------------------------------------------------------------------

#[test]
fn zero_pages_without_use_zero_pages_merge_like_any_page() {
    const N: u64 = 32;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    assert_eq!(lab.resident(), N * PAGE_SIZE, "writing zeros allocates the frames");
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (1, N - 1, 0), "{s:?}");
    let frames = lab.by_frame();
    assert_eq!(frames.len(), 1, "one KSM page: {frames:?}");
    let (&kpfn, _) = frames.iter().next().expect("one frame");
    assert_ne!(kpfn, lab.zero_pfn(), "an ordinary KSM page, not the zero page");
    assert!(lab.host().frame(kpfn).ksm);
    assert_eq!(s.general_profit, linux_general_profit(&s));
    assert_eq!(s.general_profit, ((N - 1) * PAGE_SIZE) as i64 - (N * KSM_RMAP_ITEM_SIZE) as i64);
    lab.check_coherent();
}

#[test]
fn zero_pages_with_use_zero_pages_map_the_zero_page_and_cow() {
    const N: u64 = 64;
    for policy in POLICIES {
        let lab = Lab::new(policy, N, knobs_with(|k| k.use_zero_pages = true));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0);
        }
        assert_eq!(lab.full_pass(), 3, "{policy:?}");
        let s = lab.stats();
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared), (N, 0, 0, 0), "{s:?}");
        assert_eq!(s.merges, N, "{policy:?}");
        // The pass's third scan freed the rmap items of the pages mapping
        // the zero page (mm/ksm.c: folio_walk_start finds no anonymous page
        // there, and get_next_rmap_item frees the rmap item it passes).
        assert_eq!(s.rmap_items, 0, "{policy:?}");
        assert_eq!(s.general_profit, (N * PAGE_SIZE) as i64, "{policy:?}");
        let zero = lab.zero_pfn();
        {
            let host = lab.host();
            for gfn in lab.gfns() {
                let pte = host.pte(gfn).expect("pte");
                assert!(pte.pfn == zero && !pte.writable, "{policy:?}: gfn {gfn:#x} maps {pte:?}");
            }
            assert_eq!(host.frame(zero).mapcount as u64, N, "{policy:?}");
            assert!(host.frame(zero).ksm, "{policy:?}: the zero page is never reused on a write");
            assert_eq!(host.nr_free_frames(), 1 + N, "{policy:?}: every guest frame returned");
        }
        // Only the zero page itself holds memory now (reading the zero
        // frame to compare against it allocated it in the memfd).
        assert!(lab.resident() <= PAGE_SIZE, "{policy:?}: resident {}", lab.resident());
        lab.check_coherent();

        // test_unmerge_zero_pages, case 1: writing (COW) half of the pages.
        let half = FIRST_GFN + N / 2;
        for gfn in FIRST_GFN..half {
            lab.guest.fill(gfn, 0xcfcf_cfcf_cfcf_cfcf);
        }
        assert_eq!(lab.host().stats().cow_copies, N / 2, "{policy:?}");
        lab.check_coherent();
        lab.full_pass();
        let s = lab.stats();
        // The written pages left the zero page, and being identical they
        // merged with each other into one KSM page.
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing), (N / 2, 1, N / 2 - 1), "{policy:?}: {s:?}");

        // Case 2/3: unmerging; the zero pages really are unmerged.
        lab.set_knobs(|k| k.run = 2);
        lab.unmerge_all();
        let s = lab.stats();
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing), (0, 0, 0), "{policy:?}: {s:?}");
        lab.assert_all_frames_distinct();
        for gfn in lab.gfns() {
            let expected = pattern(if gfn < half { 0xcfcf_cfcf_cfcf_cfcf } else { 0 });
            assert!(lab.page(gfn) == expected, "{policy:?}: content of gfn {gfn:#x}");
            assert_ne!(lab.host().pte(gfn).expect("pte").pfn, zero, "{policy:?}");
        }
        assert_eq!(lab.host().frame(zero).mapcount, 0, "{policy:?}");
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// mm/ksm.c details: ksm_zero_pages.
// ---------------------------------------------------------------------------

#[test]
fn ksm_zero_pages_drops_when_a_write_breaks_the_zero_page_mapping() {
    // Linux lowers ksm_zero_pages when a zero-page pte is unmapped or
    // broken by copy-on-write, not when ksmd next comes by.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    lab.full_pass();
    let s = lab.stats();
    // Pages mapping the zero page have no rmap item (the pass's last scan
    // freed them, as mm/ksm.c does).
    assert_eq!((s.ksm_zero_pages, s.rmap_items, s.pages_volatile), (N, 0, 0), "{s:?}");
    for gfn in FIRST_GFN..FIRST_GFN + 4 {
        lab.guest.write(gfn, 0, &[1]);
    }
    let s = lab.stats();
    assert_eq!((s.ksm_zero_pages, s.rmap_items, s.pages_volatile), (N - 4, 0, 0), "before a scan: {s:?}");
    assert_eq!(s.general_profit, linux_general_profit(&s), "{s:?}");
    lab.full_scan();
    // The four written pages have rmap items again, in no tree: volatile
    // (their checksum was recorded).
    let s = lab.stats();
    assert_eq!((s.ksm_zero_pages, s.rmap_items, s.pages_volatile), (N - 4, 4, 4), "after a scan: {s:?}");
}
