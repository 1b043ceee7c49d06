//! The synchronous full pass (port 0x501, value 1): every page that held
//! still gets its chance to merge, whatever came before; and its timing
//! (ksm_tests.c ksm_merge_time).

use std::time::Instant;

use ksm::KsmKnobs;
use shadow_mmu::Policy;

mod common;

use common::*;

// ---------------------------------------------------------------------------
// Passes after volatile pages, after part of a scan, and with full KSM pages.
// ---------------------------------------------------------------------------

#[test]
fn full_pass_merges_every_page_that_held_still_even_with_smart_scan() {
    // Pages that were volatile for a while have a high smart-scan age, so
    // should_skip_rmap_item would skip them in some scans. full_pass stops
    // at the first scan without a checksum update, and a skipped page
    // updates no checksum: so a pass skips nothing.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = true));
    for round in 0..12u64 {
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0x7700 + round);
        }
        lab.full_scan();
    }
    let scans = lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "after {scans} scans: {s:?}");
}

#[test]
fn full_pass_started_mid_scan_looks_at_every_page() {
    // ksmd (or any ksm_do_scan) stopped in the middle of a scan; the guest
    // then rewrote pages before the cursor and asks for a synchronous pass.
    // Had full_pass counted the rest of the scan in progress (pages 8..24,
    // all unchanged KSM pages: no checksum update) as its quiet scan, pages
    // 0 and 1 would never be looked at: unmerged although identical,
    // and pages_sharing still counts them on the KSM page they left.
    const N: u64 = 24;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    assert_eq!(lab.full_pass(), 3);
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{s:?}");
    lab.scan(8); // part of a scan: the cursor is at page 8
    lab.guest.fill(FIRST_GFN, 0x1111);
    lab.guest.fill(FIRST_GFN + 1, 0x1111);
    let scans = lab.full_pass();
    let s = lab.stats();
    // Expected: the '*' KSM page keeps 22 pages (1 shared + 21 sharing),
    // pages 0 and 1 form a second KSM page (1 + 1).
    assert_eq!((s.pages_shared, s.pages_sharing), (2, N - 2), "after {scans} scans: {s:?}");
    let host = lab.host();
    assert_eq!(
        host.pte(FIRST_GFN).expect("pte").pfn,
        host.pte(FIRST_GFN + 1).expect("pte").pfn,
        "pages 0 and 1 are identical and held still for the whole pass"
    );
}

#[test]
fn full_pass_leaves_no_page_unmerged_next_to_a_ksm_page_with_room() {
    // max_page_sharing 3. Pages 0, 1, 3 hold A, page 2 a unique U, pages 4
    // and 5 hold B: a pass makes KSM pages {0, 1, 3} (full) and {4, 5}.
    // Page 2 becomes A: no room on A's KSM page, so it stays alone in the
    // unstable tree (a legitimate leftover). Then page 3 becomes B. In the
    // next pass page 2 is compared first, while page 3 still counts on A's
    // KSM page (full: page 2 stays unmerged); then page 3 leaves it and
    // joins B's KSM page straight from the stable tree, which updates no
    // checksum. Had full_pass stopped at a scan without checksum updates,
    // page 2 would stay unmerged next to A's KSM page with room for it: a
    // pass must run to a fixpoint (a scan that changes nothing).
    let lab = Lab::new(Policy::ChangePte, 6, knobs_with(|k| k.max_page_sharing = 3));
    let (a, b, u) = (0xaaaa, 0xbbbb, 0x1234);
    for (i, w) in [a, a, u, a, b, b].into_iter().enumerate() {
        lab.guest.fill(FIRST_GFN + i as u64, w);
    }
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 3, 1), "{s:?}");
    lab.guest.fill(FIRST_GFN + 2, a);
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 3, 1), "A's KSM page is full: {s:?}");
    lab.guest.fill(FIRST_GFN + 3, b);
    let scans = lab.full_pass();
    let s = lab.stats();
    // Expected: {0, 1, 2} on A's KSM page, {3, 4, 5} on B's.
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 4, 0), "after {scans} scans: {s:?}");
}

// ---------------------------------------------------------------------------
// Property: whatever the history of writes and partial scans, once the
// guest holds still a pass leaves KSM's bookkeeping equal to what the host
// maps, and every content class merged (mm/ksm.c's promise: identical pages
// that hold still end up sharing).
// ---------------------------------------------------------------------------

mod quiescent {
    use super::*;
    use proptest::prelude::*;

    const PAGES: u64 = 24;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn a_quiet_pass_merges_every_class(
            batches in prop::collection::vec(
                (prop::collection::vec((0..PAGES, 0u64..5), 1..12), 0u64..60),
                1..8,
            ),
            policy in prop::sample::select(POLICIES.to_vec()),
            smart_scan in any::<bool>(),
            max in prop::sample::select(vec![2u32, 3, 5, 256]),
        ) {
            let knobs = knobs_with(|k| {
                k.smart_scan = smart_scan;
                k.max_page_sharing = max;
            });
            let lab = Lab::new(policy, PAGES, knobs);
            let mut model = vec![1u64; PAGES as usize];
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 1);
            }
            for (writes, scan) in &batches {
                for &(i, v) in writes {
                    lab.guest.fill(FIRST_GFN + i, v * 0x0101_0101_0101_0101);
                    model[i as usize] = v * 0x0101_0101_0101_0101;
                }
                lab.scan(*scan);
            }
            // One pass, started wherever the partial scans left the cursor.
            lab.full_pass();
            check_quiet_state(&lab, |gfn| pattern(model[(gfn - FIRST_GFN) as usize]), u64::from(max))?;
        }
    }
}

// ---------------------------------------------------------------------------
// Timing (ksm_tests.c ksm_merge_time, -P): printed, not asserted.
// ---------------------------------------------------------------------------

#[test]
fn timing_full_pass_16384_pages_in_64_groups() {
    const N: u64 = 16384;
    const GROUPS: u64 = 64;
    let lab = Lab::new(Policy::ChangePte, N, KsmKnobs::default());
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0x1000 + (gfn - FIRST_GFN) % GROUPS);
    }
    let t = Instant::now();
    let scans = lab.full_pass();
    let wall = t.elapsed();
    let s = lab.stats();
    // 256 pages per group = max_page_sharing: one full KSM page each.
    assert_eq!((s.pages_shared, s.pages_sharing), (GROUPS, N - GROUPS), "{s:?}");
    let per_page = |ns: u64| ns as f64 / s.pages_scanned as f64;
    eprintln!(
        "timing ({} build): full_pass of {N} pages in {GROUPS} groups: {scans} scans, {} pages scanned, wall {:.1} ms \
         (scan_ns {:.1} ms, cpu_ns {:.1} ms), {:.0} ns wall / {:.0} ns cpu per page scanned; {} MiB returned",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        s.pages_scanned,
        wall.as_secs_f64() * 1e3,
        s.scan_ns as f64 / 1e6,
        s.cpu_ns as f64 / 1e6,
        per_page(s.scan_ns),
        per_page(s.cpu_ns),
        s.bytes_returned >> 20
    );
}
