//! A fleet under concurrency: every guest's "vCPU" thread writes its own
//! guest's memory (locking only its own mm and secondary MMU, never the
//! deduplicator) while one ksmd merges pages across all of them, locking
//! one mm at a time. No write is lost, no guest ever reads a page that
//! differs from what it wrote, each secondary MMU stays coherent with its
//! own primary MMU, and once quiet the fleet figures match the page
//! tables.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ksm::Ksmd;
use shadow_mmu::Policy;

mod common;

use common::fleet::Fleet;
use common::*;

/// Pages hold one of `VALUES` values in each of `SLOTS` words, zeros
/// elsewhere: VALUES^SLOTS distinct pages over the whole fleet, so pages of
/// different guests keep merging and breaking apart.
const SLOTS: usize = 2;
const VALUES: u64 = 4;
const SLOT_STRIDE: usize = PAGE / SLOTS;
const GUESTS: usize = 3;
const N: u64 = 48;

fn model_page(words: &[u64; SLOTS]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    for (slot, w) in words.iter().enumerate() {
        page[slot * SLOT_STRIDE..slot * SLOT_STRIDE + 8].copy_from_slice(&w.to_le_bytes());
    }
    page
}

/// One guest's vCPU: random writes to its own pages until `stop`, each read
/// back, and a random page read whole against the model. Returns the model.
fn vcpu(
    fleet_guest: shadow_mmu::GuestMmus<shadow_mmu::RecordingView>,
    seed: u64,
    stop: &AtomicBool,
) -> Vec<[u64; SLOTS]> {
    let mut rng = seed | 1;
    let mut next = move |n: u64| {
        rng ^= rng >> 12;
        rng ^= rng << 25;
        rng ^= rng >> 27;
        rng.wrapping_mul(0x2545_f491_4f6c_dd1d) % n
    };
    let mut model = vec![[0u64; SLOTS]; N as usize];
    while !stop.load(Ordering::Relaxed) {
        let i = next(N) as usize;
        let gfn = FIRST_GFN + i as u64;
        let slot = next(SLOTS as u64) as usize;
        let value = next(VALUES);
        fleet_guest.write(gfn, slot * SLOT_STRIDE, &value.to_le_bytes());
        model[i][slot] = value;
        assert_eq!(fleet_guest.read_u64(gfn, slot * SLOT_STRIDE), value, "write to {gfn:#x} lost");
        let j = next(N) as usize;
        let mut page = vec![0u8; PAGE];
        fleet_guest.read(FIRST_GFN + j as u64, 0, &mut page);
        assert!(page == model_page(&model[j]), "gfn {:#x} differs from the model", FIRST_GFN + j as u64);
        if next(4) == 0 {
            std::thread::sleep(Duration::from_micros(50));
        }
    }
    model
}

fn fleet_concurrency(policy: Policy) {
    const RUN: Duration = Duration::from_millis(1500);
    let knobs = knobs_with(|k| {
        k.run = 1;
        k.pages_to_scan = 64;
        k.sleep_millisecs = 0;
    });
    let fleet = Fleet::new(policy, GUESTS as u64, N, knobs);
    for k in 0..GUESTS {
        fleet.fill_all(k, 0);
    }
    let ksmd = Ksmd::start(fleet.ksm.clone(), Arc::default()).expect("start ksmd");
    let stop = Arc::new(AtomicBool::new(false));
    let vcpus: Vec<_> = (0..GUESTS)
        .map(|k| {
            let (guest, stop) = (fleet.guests[k].clone(), stop.clone());
            let seed = 0x9e37_79b9_7f4a_7c15u64.wrapping_mul(k as u64 + 1);
            std::thread::Builder::new()
                .name(format!("vcpu{k}"))
                .spawn(move || vcpu(guest, seed, &stop))
                .expect("spawn a vCPU")
        })
        .collect();
    let deadline = Instant::now() + RUN;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ksmd.is_finished(), "{policy:?}: ksmd ended (an error)");
        fleet.check_coherent();
    }
    stop.store(true, Ordering::Relaxed);
    let models: Vec<_> = vcpus.into_iter().map(|v| v.join().expect("a vCPU panicked")).collect();
    ksmd.stop().expect("ksmd failed");
    let during = fleet.stats();
    assert!(during.merges > 0 && during.full_scans > 0, "{policy:?}: ksmd did work: {during:?}");

    fleet.full_pass();
    let s = fleet.stats();
    let mut classes: BTreeMap<&[u64; SLOTS], u64> = BTreeMap::new();
    for (k, model) in models.iter().enumerate() {
        for (i, words) in model.iter().enumerate() {
            let gfn = FIRST_GFN + i as u64;
            assert!(fleet.page(k, gfn) == model_page(words), "{policy:?}: guest {k} gfn {gfn:#x}");
            *classes.entry(words).or_default() += 1;
        }
    }
    fleet.check_coherent();
    let ((shared, sharing), _) = fleet.recount(&(0..GUESTS).collect::<Vec<_>>());
    assert_eq!((s.pages_shared, s.pages_sharing), (shared, sharing), "{policy:?}: the page tables: {s:?}");
    // max_page_sharing (256) is above the fleet's pages: each class one KSM
    // page, and the pages saved are exactly the duplicates.
    let saved: u64 = classes.values().filter(|&&c| c > 1).map(|c| c - 1).sum();
    assert_eq!(s.pages_sharing, saved, "{policy:?}: {s:?}");
    eprintln!(
        "{policy:?}: at the stop {} merges, {} full scans; after a quiet pass {s:?}",
        during.merges, during.full_scans
    );
}

#[test]
fn fleet_vcpus_and_ksmd_change_pte() {
    fleet_concurrency(Policy::ChangePte);
}

#[test]
fn fleet_vcpus_and_ksmd_range_flush() {
    fleet_concurrency(Policy::RangeFlush);
}
