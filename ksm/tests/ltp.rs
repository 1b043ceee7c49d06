//! LTP's KSM tests (testcases/kernel/mem/ksm, ksm_test.h
//! `create_same_memory`, as ksm01 runs it) at the level of this crate: the
//! exact pages_shared / pages_sharing / pages_volatile / pages_unshared that
//! LTP's `ksm_group_check` asserts after each stage, and after `run = 2`.

use shadow_mmu::{lock, Gfn, Policy};

mod common;

use common::*;

/// Pages per region: LTP's `size` in MB times its pages per MB, scaled down.
const P: u64 = 32;
/// Regions: LTP's three children (`num` = 3).
const REGIONS: u64 = 3;

/// A page filled with byte `b`, as LTP's children memset their memory.
fn bytes(b: u8) -> u64 {
    u64::from_ne_bytes([b; 8])
}

/// Writes stage `stage` (0-3) of create_same_memory: child 0 writes c, c,
/// d, d; child 1 a, b, d, d-with-'e' (the last byte of its last page);
/// child 2 a, a, d, d.
fn write_stage(lab: &Lab, stage: usize) {
    let data = [[b'c', b'c', b'd', b'd'], [b'a', b'b', b'd', b'd'], [b'a', b'a', b'd', b'd']];
    for region in 0..REGIONS {
        for i in 0..P {
            let gfn: Gfn = FIRST_GFN + region * P + i;
            lab.guest.fill(gfn, bytes(data[region as usize][stage]));
        }
    }
    if stage == 3 {
        lab.guest.write(FIRST_GFN + 2 * P - 1, PAGE - 1, b"e");
    }
}

#[test]
fn ltp_ksm01_create_same_memory_stages() {
    let n = REGIONS * P;
    // LTP: max_page_sharing = size * pages * num, run = 1, sleep 0.
    let expected = [(2, n - 2, 0, 0), (3, n - 3, 0, 0), (1, n - 1, 0, 0), (1, n - 2, 0, 1)];
    for policy in POLICIES {
        let lab = Lab::new(policy, n, knobs_with(|k| k.max_page_sharing = n as u32));
        for (stage, &want) in expected.iter().enumerate() {
            write_stage(&lab, stage);
            lab.full_pass();
            let s = lab.stats();
            let got = (s.pages_shared, s.pages_sharing, s.pages_volatile, s.pages_unshared);
            assert_eq!(got, want, "{policy:?}: stage {stage} (shared, sharing, volatile, unshared): {s:?}");
            lab.check_coherent();
        }
        // "KSM unmerging...": run = 2, then run = 0: all four read 0.
        lab.set_knobs(|k| k.run = 2);
        lab.unmerge_all();
        let s = lab.stats();
        let got = (s.pages_shared, s.pages_sharing, s.pages_volatile, s.pages_unshared);
        assert_eq!(got, (0, 0, 0, 0), "{policy:?}: after run = 2: {s:?}");
        lab.set_knobs(|k| k.run = 0);
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.pages_volatile, s.pages_unshared), (0, 0, 0, 0));
        // The children verify their memory: unchanged by the unmerge.
        for gfn in FIRST_GFN..FIRST_GFN + n {
            assert_eq!(lab.guest.read_u64(gfn, 0), bytes(b'd'), "{policy:?}: gfn {gfn:#x}");
        }
        assert_eq!(lab.guest.read_u64(FIRST_GFN + 2 * P - 1, PAGE - 8), u64::from_ne_bytes(*b"ddddddde"));
        lab.check_coherent();
    }
}

/// Writes stage `stage` of create_same_memory into a fleet, one child per
/// guest (mm): child 0 c, c, d, d; child 1 a, b, d, d-with-'e'; child 2 a,
/// a, d, d; every further child child 0's data (LTP's `ksm_data[i - 3]`).
fn write_fleet_stage(fleet: &fleet::Fleet, children: usize, stage: usize) {
    let data = [[b'c', b'c', b'd', b'd'], [b'a', b'b', b'd', b'd'], [b'a', b'a', b'd', b'd']];
    for child in 0..children {
        let row = if child < 3 { child } else { 0 };
        fleet.fill_all(child, bytes(data[row][stage]));
    }
    if stage == 3 {
        fleet.guests[1].write(FIRST_GFN + P - 1, PAGE - 1, b"e");
    }
}

/// ksm01 as LTP runs it: `num` children, each its own process (here its own
/// mm on the deduplicator's list), `size` MB each (here `P` pages). LTP's
/// create_same_memory (testcases/kernel/mem/ksm/ksm_test.h) sets
/// max_page_sharing and pages_to_scan to `size * pages * num` (every page of
/// every child) and asserts, after each stage, with n = `size * num *
/// pages`: (pages_shared, pages_sharing, pages_volatile, pages_unshared) =
/// (2, n - 2, 0, 0), (3, n - 3, 0, 0), (1, n - 1, 0, 0), (1, n - 2, 0, 1);
/// then 0, 0, 0, 0 after run = 2. ksm01 runs 3 children by default (`-n`
/// changes it; children past the third write the first one's data), so
/// identical pages merge across processes: 'c' lives in child 0 alone, 'a'
/// in children 1 and 2, 'd' everywhere. Each child's /proc/PID/ksm_stat
/// must agree with its page table.
#[test]
fn ltp_ksm01_create_same_memory_across_processes() {
    for (policy, children) in
        [(Policy::ChangePte, 3), (Policy::RangeFlush, 3), (Policy::Legacy, 3), (Policy::ChangePte, 4)]
    {
        let n = children as u64 * P;
        let knobs = knobs_with(|k| {
            k.max_page_sharing = n as u32;
            k.pages_to_scan = n as u32;
            k.sleep_millisecs = 0;
        });
        let fleet = fleet::Fleet::new(policy, children as u64, P, knobs);
        let expected = [(2, n - 2, 0, 0), (3, n - 3, 0, 0), (1, n - 1, 0, 0), (1, n - 2, 0, 1)];
        for (stage, &want) in expected.iter().enumerate() {
            write_fleet_stage(&fleet, children, stage);
            fleet.full_pass();
            let s = fleet.stats();
            let got = (s.pages_shared, s.pages_sharing, s.pages_volatile, s.pages_unshared);
            let ctx = format!("{policy:?}, {children} children, stage {stage}: {s:?}");
            assert_eq!(got, want, "{ctx}: (shared, sharing, volatile, unshared)");
            let (figures, merging) = fleet.recount(&(0..children).collect::<Vec<_>>());
            assert_eq!(figures, (s.pages_shared, s.pages_sharing), "{ctx}: the page tables");
            for (child, &pages) in merging.iter().enumerate() {
                let m = fleet.mm_stats(child);
                assert_eq!((m.ksm_merging_pages, m.ksm_rmap_items), (pages, P), "{ctx}: child {child} ksm_stat");
            }
            fleet.check_coherent();
        }
        lock(&fleet.ksm).unmerge_all().expect("run = 2");
        let s = fleet.stats();
        let got = (s.pages_shared, s.pages_sharing, s.pages_volatile, s.pages_unshared);
        assert_eq!(got, (0, 0, 0, 0), "{policy:?}: after run = 2: {s:?}");
        for child in 0..children {
            assert_eq!(fleet.mm_stats(child).ksm_merging_pages, 0, "{policy:?}: child {child}");
            for gfn in fleet.gfns() {
                let last = gfn == FIRST_GFN + P - 1 && child == 1;
                let want = if last { u64::from_ne_bytes(*b"ddddddde") } else { bytes(b'd') };
                assert_eq!(fleet.guests[child].read_u64(gfn, PAGE - 8), want, "{policy:?}: child {child} {gfn:#x}");
            }
        }
        fleet.check_coherent();
    }
}
