//! Correctness under concurrency: ksmd against a writing guest, and a ksmd
//! that panics.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ksm::{KsmError, Ksmd};
use shadow_mmu::{lock, Gfn, MmuNotifier, MmuNotifierRange, Policy, Pte};

mod common;

use common::*;

// ---------------------------------------------------------------------------
// 6. Correctness under concurrency: ksmd against a writing guest.
//    (ksm_functional_tests.c checks merge/unmerge races one at a time; here
//    they happen continuously.)
// ---------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The guest writes one of `VALUES` values into one of `SLOTS` words of a
/// random page; every page holds zeros elsewhere, so there are only
/// VALUES^SLOTS distinct pages and merges keep happening.
const SLOTS: usize = 2;
const VALUES: u64 = 4;
const SLOT_STRIDE: usize = PAGE / SLOTS;

fn model_page(words: &[u64; SLOTS]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    for (slot, w) in words.iter().enumerate() {
        page[slot * SLOT_STRIDE..slot * SLOT_STRIDE + 8].copy_from_slice(&w.to_le_bytes());
    }
    page
}

fn concurrency(policy: Policy, seed: u64) {
    const N: u64 = 128;
    const RUN: Duration = Duration::from_millis(1500);
    const PACE: Duration = Duration::from_micros(50);
    let knobs = knobs_with(|k| {
        k.run = 1;
        k.pages_to_scan = 64;
        k.sleep_millisecs = 0;
    });
    let lab = Lab::new(policy, N, knobs);
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    let ksmd = Ksmd::start(lab.ksm.clone(), Arc::default()).expect("start ksmd");

    let guest = lab.guest.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writer = std::thread::Builder::new()
        .name("vcpu".into())
        .spawn(move || {
            let mut rng = Rng(seed);
            let mut model = vec![[0u64; SLOTS]; N as usize];
            let mut writes = 0u64;
            let started = Instant::now();
            while !stop_writer.load(Ordering::Relaxed) {
                let i = rng.below(N) as usize;
                let gfn = FIRST_GFN + i as u64;
                let slot = rng.below(SLOTS as u64) as usize;
                let value = rng.below(VALUES);
                guest.write(gfn, slot * SLOT_STRIDE, &value.to_le_bytes());
                model[i][slot] = value;
                writes += 1;
                // Read back through the EPT: never a lost write.
                assert_eq!(guest.read_u64(gfn, slot * SLOT_STRIDE), value, "{policy:?}: write to {gfn:#x} lost");
                // And another page, whole: never a merge of pages that differ.
                let j = rng.below(N) as usize;
                let mut page = vec![0u8; PAGE];
                guest.read(FIRST_GFN + j as u64, 0, &mut page);
                assert!(
                    page == model_page(&model[j]),
                    "{policy:?}: gfn {:#x} differs from the model",
                    FIRST_GFN + j as u64
                );
                // Alternate storms (pages change faster than ksmd scans:
                // volatile, merges abort) and paced bursts (pages hold still
                // for a scan or two, so merges and COW breaks keep happening).
                let storm = (started.elapsed().as_millis() / 150) % 2 == 0;
                if !storm && rng.below(4) == 0 {
                    std::thread::sleep(PACE);
                }
            }
            (model, writes)
        })
        .expect("spawn the writer");

    let deadline = Instant::now() + RUN;
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ksmd.is_finished(), "{policy:?}: ksmd ended (an error)");
        let s = lab.stats();
        samples.push(s.pages_sharing);
        lab.check_coherent();
    }
    stop.store(true, Ordering::Relaxed);
    let (model, writes) = writer.join().expect("the writer panicked");
    ksmd.stop().expect("ksmd failed");

    let during = lab.stats();
    for gfn in lab.gfns() {
        let want = model_page(&model[(gfn - FIRST_GFN) as usize]);
        assert!(lab.page(gfn) == want, "{policy:?}: final content of gfn {gfn:#x}");
    }
    lab.check_coherent();

    // Quiesced: after one pass (started wherever ksmd stopped, smart scan
    // still on) KSM's bookkeeping matches what the host maps, and every
    // content class is merged.
    lab.full_pass();
    let s = lab.stats();
    check_quiet_state(&lab, |gfn| model_page(&model[(gfn - FIRST_GFN) as usize]), 256)
        .unwrap_or_else(|e| panic!("{policy:?}: after the quiet pass: {e}"));
    let classes: BTreeSet<&[u64; SLOTS]> = model.iter().collect();
    eprintln!(
        "{policy:?}: {writes} guest writes in {RUN:?}; pages_sharing sampled {samples:?}; at the stop {} merges, \
         {} full scans; after a quiet pass: {} distinct pages, pages_shared {}, pages_sharing {}, unshared {}, \
         chains {}; mmu {:?}",
        during.merges,
        during.full_scans,
        classes.len(),
        s.pages_shared,
        s.pages_sharing,
        s.pages_unshared,
        s.stable_node_chains,
        lock(&lab.guest.mmu).stats()
    );
    assert!(during.merges > 0 && during.full_scans > 0, "{policy:?}: ksmd did work: {during:?}");
}

#[test]
fn concurrent_guest_writes_and_ksmd_change_pte() {
    concurrency(Policy::ChangePte, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn concurrent_guest_writes_and_ksmd_range_flush() {
    concurrency(Policy::RangeFlush, 0xd1b5_4a32_d192_ed03);
}

#[test]
fn concurrent_guest_writes_and_ksmd_legacy() {
    concurrency(Policy::Legacy, 0x8cb9_2ba7_2f3d_8dd7);
}

/// A notifier subscriber with a bug: it panics when told of a change.
struct PanickingSubscriber;

impl MmuNotifier for PanickingSubscriber {
    fn invalidate_range_start(&mut self, _: &MmuNotifierRange) {
        panic!("subscriber bug");
    }
    fn invalidate_range_end(&mut self, _: &MmuNotifierRange) {}
    fn change_pte(&mut self, _: Gfn, _: Pte) {}
}

#[test]
fn a_panicking_ksmd_raises_its_failure_flag_and_reports_the_panic() {
    let lab = Lab::new(Policy::RangeFlush, 8, knobs_with(|k| k.sleep_millisecs = 0));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 7);
    }
    lock(&lab.guest.mm).mmu_notifier_register(Arc::new(Mutex::new(PanickingSubscriber)));
    let failed = Arc::new(AtomicBool::new(false));
    let ksmd = Ksmd::start(lab.ksm.clone(), failed.clone()).expect("start ksmd");
    // The first merge notifies the subscriber, which panics inside ksmd.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !failed.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "ksmd never raised its failure flag");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ksmd.is_finished());
    match ksmd.stop() {
        Err(KsmError::Panicked(message)) => assert_eq!(message, "subscriber bug"),
        other => panic!("expected the panic to be reported, got {other:?}"),
    }
}
