//! general_profit and the deduplicator's metadata.

use ksm::{KsmKnobs, KSM_RMAP_ITEM_SIZE};
use shadow_mmu::{lock, Policy};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 7. general_profit (Documentation/admin-guide/mm/ksm.rst, mm/ksm.c
//    general_profit_show): (pages_sharing + ksm_zero_pages) * PAGE_SIZE
//    - rmap_items * sizeof(struct ksm_rmap_item). The deduplicator's other
//    metadata (trees, stable nodes, the rmap array's unused slots) is in
//    metadata_bytes, not in general_profit.
// ---------------------------------------------------------------------------

#[test]
fn general_profit_of_a_fresh_guest_is_zero() {
    // No page ever touched: no rmap item, nothing saved, so Linux reports 0
    // (the metadata held anyway is metadata_bytes, not general_profit).
    let lab = Lab::new(Policy::ChangePte, 64, KsmKnobs::default());
    for scanned in [false, true] {
        if scanned {
            lab.full_scan();
        }
        let s = lab.stats();
        assert_eq!((s.rmap_items, s.general_profit), (0, 0), "scanned {scanned}: {s:?}");
        assert!(s.metadata_bytes > 0, "{s:?}");
    }
    // 16 unique pages: 16 rmap items and nothing saved.
    for gfn in FIRST_GFN..FIRST_GFN + 16 {
        lab.guest.fill(gfn, 0x6600 + gfn);
    }
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.rmap_items, s.pages_sharing), (16, 0), "{s:?}");
    assert_eq!(s.general_profit, -16 * KSM_RMAP_ITEM_SIZE as i64, "{s:?}");
    assert_eq!(KSM_RMAP_ITEM_SIZE, 64, "sizeof(struct ksm_rmap_item) on x86-64");
}

#[test]
fn general_profit_and_metadata_per_rmap_item() {
    const N: u64 = 4096;
    // 1024 zero pages, 2048 pages in 32 groups of 64, 1024 unique pages.
    let word = |i: u64| match i % 4 {
        0 => 0,
        3 => 0x6600_0000_0000_0000 | i,
        k => 0x4400 + k * 16 + (i / 4) % 16,
    };
    for (what, use_zero_pages) in [("all unique", None), ("mixed", Some(true)), ("mixed", Some(false))] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = use_zero_pages.unwrap_or(false)));
        for gfn in lab.gfns() {
            let i = gfn - FIRST_GFN;
            lab.guest.fill(gfn, if use_zero_pages.is_some() { word(i) } else { 0x6600_0000_0000_0000 | i });
        }
        lab.full_pass();
        let s = lab.stats();
        let metadata = lock(&lab.ksm).metadata_bytes() as u64;
        assert_eq!(s.metadata_bytes, metadata, "{what}");
        assert_eq!(s.general_profit, linux_general_profit(&s), "{what}: {s:?}");
        // With use_zero_pages the 1024 zero pages have no rmap item once the
        // pass's last scan has passed them mapping the zero page (mm/ksm.c
        // frees it: folio_walk_start finds no anonymous page there).
        let zero_mapped = if use_zero_pages == Some(true) { 1024 } else { 0 };
        assert_eq!(s.rmap_items, N - zero_mapped, "{what}");
        match use_zero_pages {
            None => assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, N), "{s:?}"),
            // The 32 groups of 64 (and, without use_zero_pages, the 1024
            // zero pages as 4 KSM pages of 256, the max_page_sharing).
            Some(true) => {
                let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
                assert_eq!(got, (1024, 32, 32 * 63, 1024), "{s:?}")
            }
            Some(false) => {
                let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
                assert_eq!(got, (0, 32 + 4, 32 * 63 + 4 * 255, 1024), "{s:?}");
                assert_eq!((s.stable_node_chains, s.stable_node_dups), (1, 4), "{s:?}");
            }
        }
        let per_item = metadata as f64 / s.rmap_items as f64;
        eprintln!(
            "general_profit, {what} (use_zero_pages {use_zero_pages:?}): {} rmap items, metadata {metadata} bytes \
             = {per_item:.2} bytes per rmap item; general_profit {} bytes",
            s.rmap_items, s.general_profit
        );
        assert!(per_item <= 32.0, "{what}: {per_item:.2} bytes of metadata per rmap item");
    }
}
