//! Where the scanner follows mm/ksm.c (Linux 6.12) to the letter: what
//! pages_scanned counts, the order of the tests in cmp_and_merge_page, the
//! zero page, try_to_merge_one_page's `page == kpage`, which duplicate of a
//! stable_node_chain a page joins and when a chain collapses, the scan
//! budget and the end of a batch, and pages that come to hold memory during
//! a scan. Each test failed on the scanner before it followed Linux here.

use shadow_mmu::{lock, Policy};

mod common;

use common::*;

/// The figures that say where every page stands.
fn levels(lab: &Lab) -> (u64, u64, u64, u64) {
    let s = lab.stats();
    (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile)
}

#[test]
fn pages_scanned_counts_every_page_looked_at_ksm_pages_included() {
    // mm/ksm.c ksm_do_scan: ksm_pages_scanned++ for every rmap item
    // scan_get_next_rmap_item returns, whatever cmp_and_merge_page then
    // does with it; a KSM page is returned like any other.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    assert_eq!(lab.stats().pages_scanned, 3 * N);
    for _ in 0..4 {
        lab.full_scan();
    }
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_scanned), (1, N - 1, 7 * N), "{s:?}");
}

#[test]
fn the_checksum_test_comes_before_the_stable_tree_search() {
    // Linux 6.11 moved the checksum test in cmp_and_merge_page before
    // stable_tree_search: a page that just changed is not searched for in
    // either tree, even if it now equals a KSM page. Pages 0 and 1 hold '*'
    // and merge; page 2 then changes from a unique content to '*'.
    let lab = Lab::new(Policy::ChangePte, 3, knobs_with(|k| k.smart_scan = false));
    lab.guest.fill(FIRST_GFN, STAR);
    lab.guest.fill(FIRST_GFN + 1, STAR);
    lab.guest.fill(FIRST_GFN + 2, 0x1234);
    lab.full_pass();
    assert_eq!(levels(&lab), (1, 1, 1, 0));
    lab.guest.fill(FIRST_GFN + 2, STAR);
    lab.full_scan();
    assert_eq!(levels(&lab), (1, 1, 0, 1), "changed since its last scan: only its checksum is recorded");
    lab.full_scan();
    assert_eq!(levels(&lab), (1, 2, 0, 0), "held still for a scan: it joins the KSM page");
}

#[test]
fn a_failed_merge_with_the_zero_page_goes_on_to_the_stable_tree() {
    // mm/ksm.c cmp_and_merge_page: `if (!try_to_merge_with_zero_page(...))
    // return;`, so a zero-page merge that fails goes on to the stable
    // tree. Pages 0 and 1 hold '*'; page 2 is zero and its checksum held
    // since scan 1. In scan 2 pages 0 and 1 become a KSM page; page 2 is
    // written with '*' just before its write protection, so its merge with
    // the zero page fails and it joins the '*' KSM page instead.
    let lab = Lab::new(Policy::ChangePte, 3, knobs_with(|k| k.use_zero_pages = true));
    lab.guest.fill(FIRST_GFN, STAR);
    lab.guest.fill(FIRST_GFN + 1, STAR);
    lab.guest.fill(FIRST_GFN + 2, 0);
    lab.full_scan();
    WriteBeforeProtect::arm(&lab, FIRST_GFN + 2, pattern(STAR));
    lab.full_scan();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages, s.merges), (1, 2, 0, 3), "{s:?}");
    let host = lab.host();
    assert_eq!(host.pte(FIRST_GFN + 2).expect("pte").pfn, host.pte(FIRST_GFN).expect("pte").pfn);
    drop(host);
    assert!(lab.page(FIRST_GFN + 2) == pattern(STAR));
    lab.check_coherent();
}

#[test]
fn a_page_already_on_its_ksm_page_joins_it_without_a_write_protection() {
    // mm/ksm.c try_to_merge_one_page: `if (page == kpage) return 0;` before
    // write_protect_page ("ksm page forked"). Pages 0-2 hold '*' and merge;
    // page 3 was never touched. Then page 3 comes to map the KSM page the
    // way fork's copy does (ksm_functional_tests.c
    // test_fork_ksm_merging_page_count: a copied mapping is not counted
    // until ksmd scans it) and the guest reads it, which installs its EPT
    // entry. The scan that finds it adds it to its stable node without a
    // notifier range, so range-flush zaps nothing.
    let lab = Lab::new(Policy::RangeFlush, 4, knobs_with(|k| k.smart_scan = false));
    for gfn in FIRST_GFN..FIRST_GFN + 3 {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    assert_eq!(levels(&lab), (1, 2, 0, 0));
    let kpfn = lab.host().pte(FIRST_GFN).expect("pte").pfn;
    lab.fork_map(FIRST_GFN + 3, kpfn);
    assert_eq!(lab.guest.read_u64(FIRST_GFN + 3, 0), STAR);
    assert_eq!(levels(&lab), (1, 2, 0, 0), "a mapping KSM did not make is not counted before a scan");
    let (mmu_before, ranges_before) = (lock(&lab.guest.mmu).stats(), lab.host().stats().notifier_ranges);
    lab.full_scan();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.merges), (1, 3, 3), "joined, no merge: {s:?}");
    let mmu = lock(&lab.guest.mmu).stats();
    assert_eq!(mmu.zapped, mmu_before.zapped, "a zap for nothing");
    assert_eq!(lab.host().stats().notifier_ranges, ranges_before, "a notifier range for nothing");
    lab.check_coherent();
}

#[test]
fn a_page_joins_the_fullest_duplicate_that_has_room() {
    // mm/ksm.c stable_node_dup (through chain_prune): the dup chosen is the
    // one with the most sharers still below max_page_sharing. With
    // max_page_sharing 4, eight '*' pages make a chain of two KSM pages, A
    // (pages 0-3) and B (pages 4-7). Pages 0, 1 and 4 are rewritten: A keeps
    // 2 sharers, B 3. Page 8 then becomes '*': it joins B, the fuller.
    let lab = Lab::new(Policy::ChangePte, 9, knobs_with(|k| k.max_page_sharing = 4));
    for gfn in FIRST_GFN..FIRST_GFN + 8 {
        lab.guest.fill(gfn, STAR);
    }
    lab.guest.fill(FIRST_GFN + 8, 0x0808);
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.stable_node_chains, s.stable_node_dups), (2, 6, 1, 2), "{s:?}");
    let b = lab.host().pte(FIRST_GFN + 5).expect("pte").pfn;
    assert_ne!(b, lab.host().pte(FIRST_GFN + 2).expect("pte").pfn, "two KSM pages");
    for (i, gfn) in [FIRST_GFN, FIRST_GFN + 1, FIRST_GFN + 4].into_iter().enumerate() {
        lab.guest.fill(gfn, 0x7000 + i as u64);
    }
    lab.guest.fill(FIRST_GFN + 8, STAR);
    lab.full_scan();
    lab.full_scan();
    let host = lab.host();
    assert_eq!(host.pte(FIRST_GFN + 8).expect("pte").pfn, b, "page 8 joined A, which had more room");
    assert_eq!(host.frame(b).mapcount, 4);
}

#[test]
fn a_chain_left_with_one_duplicate_collapses_when_a_search_meets_it() {
    // mm/ksm.c stable_node_dup: a chain found with a single dup is replaced
    // by that dup (stable_node_chains and stable_node_dups drop by one); a
    // stale dup is pruned on the way (ksm_get_folio). Four '*' pages with
    // max_page_sharing 2 make a chain of A (pages 0, 1) and B (pages 2, 3).
    // Pages 2 and 3 are rewritten: B's KSM page is freed. The scan that
    // notices removes B (as remove_rmap_item_from_tree does, finding it
    // stale), but searches nothing: pages 2 and 3 changed, pages 0 and 1
    // still map A. The chain is still a chain. The next scan searches the
    // stable tree for pages 2 and 3, meets the chain and collapses it.
    let lab = Lab::new(Policy::ChangePte, 4, knobs_with(|k| k.max_page_sharing = 2));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    let chains = |lab: &Lab| {
        let s = lab.stats();
        (s.pages_shared, s.pages_sharing, s.stable_node_chains, s.stable_node_dups)
    };
    assert_eq!(chains(&lab), (2, 2, 1, 2));
    lab.guest.fill(FIRST_GFN + 2, 0x2222);
    lab.guest.fill(FIRST_GFN + 3, 0x3333);
    lab.full_scan();
    assert_eq!(chains(&lab), (1, 1, 1, 1), "B removed, the chain not met by any search yet");
    lab.full_scan();
    assert_eq!(chains(&lab), (1, 1, 0, 0), "collapsed into a plain stable node");
    // A plain node again: a second KSM page of '*' makes a new chain.
    lab.guest.fill(FIRST_GFN + 2, STAR);
    lab.guest.fill(FIRST_GFN + 3, STAR);
    lab.full_pass();
    assert_eq!(chains(&lab), (2, 2, 1, 2));
}

#[test]
fn the_scan_budget_counts_only_pages_looked_at() {
    // mm/ksm.c ksm_do_scan decrements its budget once per rmap item
    // scan_get_next_rmap_item returns; pages without an anonymous page
    // (never touched: memfd holes here) are passed inside that call. Only
    // the even pages of 32 were ever written.
    let lab = Lab::new(Policy::ChangePte, 32, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns().step_by(2) {
        lab.guest.fill(gfn, 0x4400 + gfn);
    }
    assert_eq!(lab.scan(8), 8);
    let s = lab.stats();
    assert_eq!((s.pages_scanned, s.rmap_items, s.full_scans), (8, 8, 0), "{s:?}");
    assert_eq!(lab.scan(8), 8);
    // The 16 written pages were all looked at; the next call finds the end
    // of the scan and looks at nothing.
    assert_eq!(lab.scan(8), 0);
    let s = lab.stats();
    assert_eq!((s.pages_scanned, s.rmap_items, s.full_scans), (16, 16, 1), "{s:?}");
}

#[test]
fn a_batch_ends_at_the_end_of_a_full_scan() {
    // mm/ksm.c: scan_get_next_rmap_item returns NULL at the end of a full
    // scan, and ksm_do_scan returns then, whatever is left of its budget.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0x5500 + gfn);
    }
    assert_eq!(lab.scan(10 * N), N);
    let s = lab.stats();
    assert_eq!((s.full_scans, s.pages_scanned), (1, N), "{s:?}");
    // The next batch starts the next scan.
    assert_eq!(lab.scan(3), 3);
    assert_eq!(lab.stats().full_scans, 1);
}

#[test]
fn a_page_copied_into_a_freed_frame_mid_scan_is_scanned() {
    // Eight '*' pages merge into one KSM page; the seven frames freed are
    // memfd holes when the next scan begins. A copy-on-write break then
    // copies page 5 into one of them. mm/ksm.c walks the page tables as it
    // goes, so the same scan finds page 5's new page and records its
    // checksum; in the scan after, it holds still and enters the unstable
    // tree.
    const N: u64 = 8;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    assert_eq!(levels(&lab), (1, N - 1, 0, 0));
    assert_eq!(lab.scan(1), 1); // a new scan: its residency snapshot
    lab.guest.write(FIRST_GFN + 5, 0, &[0x55]);
    lab.full_scan(); // the rest of that scan
    assert_eq!(levels(&lab), (1, N - 2, 0, 1), "page 5 looked at: its checksum recorded");
    lab.full_scan();
    assert_eq!(levels(&lab), (1, N - 2, 1, 0), "page 5 held still: in the unstable tree");
}
