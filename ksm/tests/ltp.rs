//! LTP's KSM tests (testcases/kernel/mem/ksm, ksm_test.h
//! `create_same_memory`, as ksm01 runs it) at the level of this crate: the
//! exact pages_shared / pages_sharing / pages_volatile / pages_unshared that
//! LTP's `ksm_group_check` asserts after each stage, and after `run = 2`.

use shadow_mmu::Gfn;

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
