//! Volatile pages (mm/ksm.c's checksum gate) and smart scan (mm/ksm.c
//! should_skip_rmap_item).

use shadow_mmu::Policy;

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 5. Volatile pages (mm/ksm.c's checksum gate) and smart scan
//    (mm/ksm.c should_skip_rmap_item).
// ---------------------------------------------------------------------------

#[test]
fn volatile_pages_never_merge() {
    const N: u64 = 16;
    for smart_scan in [false, true] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for round in 0..12u64 {
            // All pages identical to each other, but different from what
            // they were at the last scan.
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 0x7700 + round);
            }
            lab.full_scan();
            let s = lab.stats();
            let got = (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile);
            assert_eq!(got, (0, 0, 0, N), "smart_scan={smart_scan} round {round}: {s:?}");
            assert_eq!(s.merges, 0, "smart_scan={smart_scan}");
        }
        lab.check_coherent();
        lab.assert_all_frames_distinct();
    }
}

#[test]
fn pages_that_stop_changing_merge_after_being_volatile() {
    const N: u64 = 16;
    for smart_scan in [false, true] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for round in 0..3u64 {
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 0x7700 + round);
            }
            lab.full_scan();
        }
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "smart_scan={smart_scan}: {s:?}");
    }
}

/// The smart-scan schedule for a page that never merges: ages 0..=2 are
/// scanned; age 3 is scanned and earns 1 skip (skip_age(3) = 1); age 4 is
/// skipped; age 5 is scanned and earns 2 (skip_age(5) = 2); ages 6 and 7
/// are skipped. Over 8 full scans: 5 scanned, 3 skipped.
#[test]
fn smart_scan_skips_pages_that_never_merge() {
    const N: u64 = 32;
    for smart_scan in [true, false] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0x3300_0000 + gfn); // all different
        }
        let mut skipped = Vec::new();
        for _ in 0..8 {
            lab.full_scan();
            skipped.push(lab.stats().pages_skipped);
        }
        let s = lab.stats();
        if smart_scan {
            assert_eq!(skipped, [0, 0, 0, 0, N, N, 2 * N, 3 * N], "{s:?}");
            assert_eq!(s.pages_scanned, 5 * N, "{s:?}");
        } else {
            assert_eq!(skipped, [0; 8], "{s:?}");
            assert_eq!(s.pages_scanned, 8 * N, "{s:?}");
        }
        assert_eq!((s.pages_shared, s.pages_sharing, s.full_scans), (0, 0, 8), "{s:?}");
    }
}

#[test]
fn smart_scan_never_skips_ksm_pages() {
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    for _ in 0..12 {
        lab.full_scan();
    }
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_skipped), (1, N - 1, 0), "{s:?}");
    // Looked at in every scan (mm/ksm.c's ksm_do_scan counts KSM pages
    // too), never skipped: from the third scan on, cmp_and_merge_page finds
    // each still maps its KSM page and passes it.
    assert_eq!(s.pages_scanned, 12 * N, "{s:?}");
}

// ---------------------------------------------------------------------------
// mm/ksm.c details: smart scan's age.
// ---------------------------------------------------------------------------

#[test]
fn smart_scan_age_is_not_reset_by_a_merge() {
    // mm/ksm.c: rmap_item->age counts the scans since the rmap item was
    // created (of a page that was not KSM then); a merge does not reset it.
    // Two '*' pages are looked at in scans 1 and 2 (ages 0 and 1, then 2)
    // and merge in scan 2; while KSM their age stays 2. Then both are
    // rewritten with unique contents (copy-on-write). Scan a: age 2,
    // scanned. Scan b: age 3, scanned, earns 1 skip. Scan c: age 4,
    // skipped. Had the merge reset the age, nothing would be skipped before
    // a fourth scan.
    let lab = Lab::new(Policy::ChangePte, 2, knobs_with(|k| k.smart_scan = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    lab.full_scan();
    for _ in 0..4 {
        lab.full_scan(); // KSM pages: neither aged nor skipped
    }
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_skipped), (1, 1, 0), "{s:?}");
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0x5151_0000 + gfn);
    }
    let mut skipped = Vec::new();
    for _ in 0..3 {
        lab.full_scan();
        skipped.push(lab.stats().pages_skipped);
    }
    assert_eq!(skipped, [0, 0, 2], "{:?}", lab.stats());
}
