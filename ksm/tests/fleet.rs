//! Many guests, one deduplicator (issue 11): mm/ksm.c's mm list. Each guest
//! is its own mm with its own secondary MMU, all over one frame pool, on
//! one [`ksm::Ksm`]'s list: identical pages of different guests merge into
//! one KSM page, a copy-on-write break notifies only the guest that wrote,
//! and a guest that leaves (`ksm_exit`) takes its pages out of the figures.

use ksm::KsmKnobs;
use shadow_mmu::{lock, Gfn, Policy, PAGE_SIZE};

mod common;

use common::fleet::Fleet;
use common::*;

/// A page whose every byte is `b`.
fn bytes(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// 8 guests × N pages of one value: one KSM page fleet-wide (pages_shared 1,
/// pages_sharing 8N - 1, as ksm_tests.c `check_ksm_merge` counts one
/// process's duplicates), every guest's pages on it, 8N - 1 frames back to
/// the host, and each guest's ksm_stat its own N pages.
///
/// The notifications follow the scan order, mm by mm: the second scan puts
/// guest 0's first page in the unstable tree, and its second page, finding
/// it, becomes the KSM page (write-protected) and the first is merged into
/// it (write-protected, then replaced); every other page is write-protected
/// and replaced. So under change-pte guest 0's secondary MMU updates 2N - 1
/// entries in place and every other guest's 2N: each hears only of its own
/// pages.
#[test]
fn eight_mms_of_one_value_converge_to_one_ksm_page() {
    const N: u64 = 16;
    for policy in POLICIES {
        let fleet = Fleet::new(policy, 8, N, KsmKnobs::default());
        for k in 0..8 {
            fleet.fill_all(k, STAR);
        }
        let free_before = fleet.host(0).nr_free_frames();
        assert_eq!(fleet.full_pass(), 3, "{policy:?}: checksums, merges, a quiet scan");
        let s = fleet.stats();
        let ctx = format!("{policy:?}: {s:?}");
        assert_eq!(
            (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile),
            (1, 8 * N - 1, 0, 0),
            "{ctx}"
        );
        assert_eq!((s.rmap_items, s.full_scans, s.pages_scanned, s.merges), (8 * N, 3, 3 * 8 * N, 8 * N), "{ctx}");
        assert_eq!(s.bytes_returned, (8 * N - 1) * PAGE_SIZE, "{ctx}");
        assert_eq!(fleet.host(0).nr_free_frames(), free_before + 8 * N - 1, "{ctx}: free frames");
        let kpfn = fleet.pfn(0, FIRST_GFN + 1);
        let star = pattern(STAR);
        for k in 0..8 {
            for gfn in fleet.gfns() {
                assert_eq!(fleet.pfn(k, gfn), kpfn, "{ctx}: guest {k} gfn {gfn:#x}");
                assert!(fleet.page(k, gfn) == star, "{ctx}: guest {k} gfn {gfn:#x} content");
            }
            let m = fleet.mm_stats(k);
            assert_eq!((m.ksm_rmap_items, m.ksm_merging_pages, m.ksm_zero_pages), (N, N, 0), "{ctx}: guest {k}");
            let profit = (N * PAGE_SIZE) as i64 - (N * ksm::KSM_RMAP_ITEM_SIZE) as i64;
            assert_eq!(m.ksm_process_profit, profit, "{ctx}: guest {k}");
            let ms = lock(&fleet.guests[k].mmu).stats();
            let own = if k == 0 { 2 * N - 1 } else { 2 * N };
            match policy {
                Policy::ChangePte | Policy::EventAware => {
                    assert_eq!((ms.change_pte_applied, ms.zapped), (own, 0), "{ctx}: guest {k}")
                }
                Policy::RangeFlush => assert_eq!((ms.change_pte_applied, ms.zapped), (0, N), "{ctx}: guest {k}"),
                Policy::Legacy => assert_eq!((ms.change_pte_missed, ms.zapped), (own, N), "{ctx}: guest {k}"),
            }
        }
        assert_eq!(fleet.host(0).frame(kpfn).mapcount as u64, 8 * N, "{ctx}: one frame for the fleet");
        fleet.check_coherent();
    }
}

/// The zero page and stable node chains across mms. With use_zero_pages,
/// zero-filled pages of every guest map the one zero page (ksm_zero_pages
/// fleet-wide, each guest's own in its ksm_stat). With max_page_sharing =
/// m, 3 guests × N identical pages form the groups of one process's 3N
/// pages (ksm_tests.c's arithmetic, `linux_expected`), since the scan goes
/// mm by mm: full KSM pages in one chain, whichever guests they span.
#[test]
fn zero_pages_and_chains_span_mms() {
    const N: u64 = 10;
    let fleet = Fleet::new(Policy::ChangePte, 3, N, knobs_with(|k| k.use_zero_pages = true));
    for k in 0..3 {
        fleet.fill_all(k, 0);
    }
    fleet.full_pass();
    let s = fleet.stats();
    assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.rmap_items), (3 * N, 0, 0, 0), "{s:?}");
    let zero = lock(&fleet.ksm).zero_pfn();
    for k in 0..3 {
        assert_eq!(fleet.mm_stats(k).ksm_zero_pages, N, "guest {k}");
        assert!(fleet.gfns().all(|gfn| fleet.pfn(k, gfn) == zero), "guest {k} maps the zero page");
    }
    fleet.guests[1].write(FIRST_GFN, 0, b"x");
    assert_eq!((fleet.stats().ksm_zero_pages, fleet.mm_stats(1).ksm_zero_pages), (3 * N - 1, N - 1));
    fleet.check_coherent();

    for m in [2u64, 4, 7, 30] {
        let fleet = Fleet::new(Policy::ChangePte, 3, N, knobs_with(|k| k.max_page_sharing = m as u32));
        for k in 0..3 {
            fleet.fill_all(k, STAR);
        }
        fleet.full_pass();
        let s = fleet.stats();
        let (shared, sharing) = linux_expected(3 * N, m);
        let chains = if shared > 1 { (1, shared) } else { (0, 0) };
        assert_eq!((s.pages_shared, s.pages_sharing), (shared, sharing), "max_page_sharing {m}: {s:?}");
        assert_eq!((s.stable_node_chains, s.stable_node_dups), chains, "max_page_sharing {m}: {s:?}");
        let (figures, _) = fleet.recount(&[0, 1, 2]);
        assert_eq!(figures, (shared, sharing), "max_page_sharing {m}: the page tables");
        fleet.check_coherent();
    }
}

/// A write to a page merged across guests breaks copy-on-write in the
/// writer's mm only, and only the writer's secondary MMU (its view) hears
/// of it; the other guests keep mapping the KSM page, their views
/// untouched. Then the fleet figures drop by exactly that page.
#[test]
fn a_cow_break_notifies_only_the_writers_secondary_mmu() {
    const N: u64 = 4;
    for policy in POLICIES {
        for writer in 0..3 {
            let fleet = Fleet::new(policy, 3, N, KsmKnobs::default());
            for k in 0..3 {
                fleet.fill_all(k, STAR);
            }
            fleet.full_pass();
            assert_eq!((fleet.stats().pages_shared, fleet.stats().pages_sharing), (1, 3 * N - 1));
            let kpfn = fleet.pfn(0, FIRST_GFN);
            let before: Vec<_> = (0..3)
                .map(|k| {
                    let mmu = lock(&fleet.guests[k].mmu);
                    (mmu.stats(), mmu.view().calls, mmu.view().pages.clone())
                })
                .collect();
            let gfn: Gfn = FIRST_GFN + 2;
            fleet.guests[writer].write(gfn, 8, b"mine");
            let ctx = format!("{policy:?}, guest {writer} writes");
            for (k, (stats, calls, pages)) in before.into_iter().enumerate() {
                let mmu = lock(&fleet.guests[k].mmu);
                if k == writer {
                    assert_ne!(mmu.stats(), stats, "{ctx}: the writer's secondary MMU heard nothing");
                    let (pfn, writable) = mmu.view().pages[&gfn];
                    assert!(pfn != kpfn && writable, "{ctx}: the writer's view after the break");
                    assert_eq!(fleet.pfn(k, gfn), pfn, "{ctx}: the writer's own copy");
                } else {
                    assert_eq!((mmu.stats(), mmu.view().calls), (stats, calls), "{ctx}: guest {k} was notified");
                    assert_eq!(mmu.view().pages, pages, "{ctx}: guest {k}'s view changed");
                    drop(mmu);
                    assert_eq!(fleet.pfn(k, gfn), kpfn, "{ctx}: guest {k} left the KSM page");
                }
            }
            let mut want = pattern(STAR);
            want[8..12].copy_from_slice(b"mine");
            assert!(fleet.page(writer, gfn) == want, "{ctx}: the written page");
            // ksm_do_scan notices at the page's next visit (Linux's counters
            // too lag until then): one page fewer on the KSM page.
            fleet.full_pass();
            let s = fleet.stats();
            assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (1, 3 * N - 2, 1), "{ctx}: {s:?}");
            assert_eq!(fleet.mm_stats(writer).ksm_merging_pages, N - 1, "{ctx}");
            fleet.check_coherent();
        }
    }
}

/// The contents of guest `k`'s page `i` in the `ksm_exit` scenario: classes
/// that span guests (one value everywhere, one per pair of guests) and
/// pages of their own.
fn exit_scenario_word(k: usize, i: u64) -> u64 {
    match i % 4 {
        0 => bytes(b'a'),
        1 => bytes(b'p' + (k / 2) as u8),
        2 => bytes(b'u') + (k as u64) * 0x100 + i,
        _ => bytes(b'k' + k as u8),
    }
}

/// Checks the fleet figures against a recount of guests `ks`' page tables,
/// and each guest's ksm_stat; `quiet` after a full pass (every page has
/// its rmap item, the unique ones in the unstable tree).
fn check_figures(fleet: &Fleet, ks: &[usize], quiet: bool, ctx: &str) {
    let s = fleet.stats();
    let (figures, merging) = fleet.recount(ks);
    assert_eq!((s.pages_shared, s.pages_sharing), figures, "{ctx}: {s:?}");
    let mut items = 0;
    for (&k, &mine) in ks.iter().zip(&merging) {
        let m = fleet.mm_stats(k);
        assert_eq!(m.ksm_merging_pages, mine, "{ctx}: guest {k}");
        items += m.ksm_rmap_items;
    }
    assert_eq!(s.rmap_items, items, "{ctx}: rmap items are those of the mms on the list: {s:?}");
    if quiet {
        let unique = ks.len() as u64 * fleet.pages() - merging.iter().sum::<u64>();
        assert_eq!((s.rmap_items, s.pages_unshared, s.pages_volatile), (items, unique, 0), "{ctx}: {s:?}");
        assert_eq!(items, ks.len() as u64 * fleet.pages(), "{ctx}");
    }
}

/// `ksm_exit` of one guest mid-scan (its vCPU stopped, then its mm torn
/// down by `exit_mmap`, or the other way round): the others' figures are
/// exactly what their page tables say at once, and after the next pass;
/// the guest's rmap items and stable-node links are gone, and it is no
/// longer on the list. Without `ksm_exit`, a scanner that meets the exited
/// mm frees its rmap items itself (`ksm_test_exit`).
#[test]
fn ksm_exit_mid_scan_leaves_the_others_figures_exact() {
    const N: u64 = 16;
    for (leaving, scanned, exit_first) in [(1, 20, false), (1, 20, true), (0, 40, false), (3, 70, true), (2, 0, false)]
    {
        let fleet = Fleet::new(Policy::ChangePte, 4, N, KsmKnobs::default());
        for k in 0..4 {
            for (i, gfn) in fleet.gfns().enumerate() {
                fleet.guests[k].fill(gfn, exit_scenario_word(k, i as u64));
            }
        }
        fleet.full_pass();
        let ctx = format!("guest {leaving} leaves after {scanned} pages, exit_mmap first: {exit_first}");
        check_figures(&fleet, &[0, 1, 2, 3], true, &ctx);
        // Mid-scan: every guest's own pages (i % 4 == 2) come to hold one
        // value, a scan records their checksums, and part of the next merges
        // some of them; the leaving guest also breaks copy-on-write on a
        // merged page, which leaves its rmap item on the stable node until
        // the scanner comes by. (The staying guests write no merged page: a
        // page written away from its KSM page stays counted until its next
        // visit, in Linux too, which a recount from page tables would see.)
        for k in 0..4 {
            for i in (2..N).step_by(4) {
                fleet.guests[k].fill(FIRST_GFN + i, bytes(b'z'));
            }
        }
        fleet.guests[leaving].fill(FIRST_GFN, bytes(b'y'));
        fleet.scan(u64::MAX);
        fleet.scan(scanned);
        let id = fleet.ids[leaving];
        if exit_first {
            fleet.host(leaving).exit_mmap().expect("exit_mmap");
        }
        lock(&fleet.ksm).ksm_exit(id).expect("ksm_exit");
        if !exit_first {
            fleet.host(leaving).exit_mmap().expect("exit_mmap");
        }
        let staying: Vec<usize> = (0..4).filter(|&k| k != leaving).collect();
        check_figures(&fleet, &staying, false, &ctx);
        let ids = lock(&fleet.ksm).mm_ids();
        assert_eq!(ids, staying.iter().map(|&k| fleet.ids[k]).collect::<Vec<_>>(), "{ctx}");
        assert!(lock(&fleet.ksm).mm_stats(id).is_err(), "{ctx}: the guest that left has no ksm_stat");
        fleet.full_pass();
        check_figures(&fleet, &staying, true, &ctx);
        fleet.check_coherent();
    }
    // exit_mmap alone: the scanner drops the mm's rmap items when it meets it.
    let fleet = Fleet::new(Policy::ChangePte, 3, N, KsmKnobs::default());
    for k in 0..3 {
        fleet.fill_all(k, STAR);
    }
    fleet.full_pass();
    fleet.host(1).exit_mmap().expect("exit_mmap");
    fleet.full_pass();
    let s = fleet.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.rmap_items), (1, 2 * N - 1, 2 * N), "{s:?}");
    assert_eq!(fleet.mm_stats(1).ksm_rmap_items, 0, "the exited mm's rmap items went");
    lock(&fleet.ksm).ksm_exit(fleet.ids[1]).expect("ksm_exit after exit_mmap");
    check_figures(&fleet, &[0, 2], true, "exit_mmap, a pass, then ksm_exit");
}

/// An mm entered while a full scan is under way waits for the next scan,
/// as `__ksm_enter` puts it behind the scanning cursor; then it merges
/// with the pages already merged.
#[test]
fn an_mm_entered_mid_scan_is_scanned_from_the_next_scan() {
    const N: u64 = 8;
    let fleet = Fleet::new(Policy::ChangePte, 2, N, KsmKnobs::default());
    for k in 0..2 {
        fleet.fill_all(k, STAR);
    }
    let ksm = &fleet.ksm;
    let last = lock(ksm).mm_ids()[1];
    lock(ksm).ksm_exit(last).expect("ksm_exit");
    fleet.full_pass();
    assert_eq!((fleet.stats().pages_shared, fleet.stats().pages_sharing), (1, N - 1));
    fleet.scan(N / 2);
    let id = lock(ksm).ksm_enter(fleet.guests[1].mm.clone()).expect("ksm_enter again");
    let scanned = fleet.scan(u64::MAX);
    assert_eq!(scanned, N / 2, "the rest of the scan is guest 0's");
    assert_eq!(lock(ksm).mm_stats(id).expect("on the list").ksm_rmap_items, 0);
    fleet.full_pass();
    let s = fleet.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.rmap_items), (1, 2 * N - 1, 2 * N), "{s:?}");
}

mod property {
    use std::collections::BTreeMap;

    use super::*;
    use proptest::prelude::*;

    const PAGES: u64 = 6;

    /// Pages whose content no other page of the fleet holds but which map
    /// a KSM frame (left there when their partners were written).
    fn lone_ksm_pages(fleet: &Fleet, model: &[Vec<u64>], counts: &BTreeMap<u64, u64>) -> u64 {
        let mut lone = 0;
        for (k, pages) in model.iter().enumerate() {
            let host = fleet.host(k);
            for (page, v) in pages.iter().enumerate() {
                let pfn = host.pte(FIRST_GFN + page as u64).expect("pte").pfn;
                lone += u64::from(counts[v] == 1 && host.frame(pfn).ksm);
            }
        }
        lone
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, failure_persistence: None, ..ProptestConfig::default() })]
        /// Random writes across 2-4 guests, partial scans and full passes,
        /// with the knobs' defaults. After every step each guest reads
        /// what it wrote; after every full pass (a fixpoint), pages_shared
        /// + pages_sharing is the number of pages whose content occurs more
        /// than once fleet-wide, plus the lone KSM pages: a page whose
        /// every partner was written away keeps its KSM page (Linux keeps
        /// a stable node with one rmap item too, counted in pages_shared,
        /// until unmerged), which the oracle reads off the page tables.
        /// So pages_sharing is exactly the pages saved, the sum of (size -
        /// 1) over the content classes. What the oracle assumes:
        /// max_page_sharing (256) is above the fleet's pages (at most 24),
        /// so a class is one KSM page, never a chain; use_zero_pages is
        /// off, so a zero-filled page (value 0) is a content like any
        /// other; every page is written before the first scan, so none is
        /// a memfd hole (which KSM does not scan).
        #[test]
        fn every_guest_reads_the_model_and_duplicates_merge_fleet_wide(
            guests in 2usize..=4,
            batches in prop::collection::vec(
                (prop::collection::vec((0usize..4, 0..PAGES, 0u64..4), 1..10), 0u64..30, any::<bool>()),
                1..6,
            ),
            policy in prop::sample::select(POLICIES.to_vec()),
        ) {
            let fleet = Fleet::new(policy, guests as u64, PAGES, KsmKnobs::default());
            let word = |v: u64| v * 0x0101_0101_0101_0101;
            let mut model = vec![vec![1u64; PAGES as usize]; guests];
            for k in 0..guests {
                fleet.fill_all(k, word(1));
            }
            for (i, (writes, scan, pass)) in batches.iter().enumerate() {
                for &(k, page, v) in writes {
                    let k = k % guests;
                    fleet.guests[k].fill(FIRST_GFN + page, word(v));
                    model[k][page as usize] = v;
                }
                fleet.scan(*scan);
                if *pass || i + 1 == batches.len() {
                    fleet.full_pass();
                    let mut counts = BTreeMap::new();
                    for v in model.iter().flatten() {
                        *counts.entry(*v).or_insert(0u64) += 1;
                    }
                    let duplicated: u64 = counts.values().filter(|&&c| c > 1).sum();
                    let classes = counts.values().filter(|&&c| c > 1).count() as u64;
                    let lone = lone_ksm_pages(&fleet, &model, &counts);
                    let s = fleet.stats();
                    prop_assert_eq!(s.pages_shared + s.pages_sharing, duplicated + lone, "{:?}", s);
                    prop_assert_eq!((s.pages_shared, s.pages_sharing), (classes + lone, duplicated - classes));
                    prop_assert_eq!((s.pages_unshared, s.pages_volatile), (counts.len() as u64 - classes - lone, 0));
                    fleet.check_coherent();
                }
                for (k, pages) in model.iter().enumerate() {
                    for (page, &v) in pages.iter().enumerate() {
                        let gfn = FIRST_GFN + page as u64;
                        prop_assert!(fleet.page(k, gfn) == pattern(word(v)), "guest {} gfn {:#x}", k, gfn);
                        prop_assert_eq!(fleet.guests[k].read_u64(gfn, 64), word(v));
                    }
                }
            }
        }
    }
}
