//! Guest faults racing with KSM: vCPU threads access guest pages through
//! the secondary MMU while a KSM thread merges and breaks them, under every
//! policy.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use proptest::prelude::*;
use shadow_mmu::{lock, Access, Gfn, PAGE_SHIFT};
use vm_memory::Bytes;

use common::{Lab, OrFail, Res, FIRST_GFN, POLICIES};

/// A tiny deterministic generator for the racing threads.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// A guest access that may race with notifications: the EPT walk and the
/// access happen under the secondary MMU's lock, as hardware's walk cannot
/// overlap an invalidation (its TLB flush waits for the access), and the
/// access faults and retries until the EPT allows it. A write stores the
/// word the page already holds, so the reference never changes. Returns the
/// word read.
fn racing_guest_access(lab: &Lab, gfn: Gfn, write: bool) -> Res<u64> {
    let access = if write { Access::Write } else { Access::Read };
    let mut word = 0;
    lab.mmus
        .guest_access(gfn << PAGE_SHIFT, 8, access, |pool, at| {
            word = pool.direct_map().read_obj::<u64>(at)?;
            if write {
                pool.direct_map().write_obj(lab.model.get(gfn), at)?;
            }
            Ok(())
        })
        .or_fail("guest access")?;
    Ok(word)
}

/// vCPU threads fault on pages while a KSM thread merges pairs of equal
/// pages and breaks them again: a fault whose host lookup raced with a merge
/// must retry (the invalidation sequence protocol) instead of installing a
/// frame the merge freed or a writable entry the merge write-protected. The
/// KSM thread checks every invariant between its steps, holding both locks,
/// so no range is open and no access in flight; it takes a step only once a
/// vCPU has made an access since its last one, so that they interleave.
/// Three vCPUs contend for the secondary MMU's lock, which widens the window
/// between a fault's host lookup and its install: without the retry this
/// test fails in practically every run.
#[test]
fn faults_racing_with_ksm_never_install_a_stale_frame() {
    const PAGES: u64 = 8;
    const VCPUS: u64 = 3;
    const KSM_STEPS: u64 = 1500;
    for policy in POLICIES {
        // Pages 2k and 2k + 1 are equal; no word is 0, so a freed frame shows.
        let words: Vec<u64> = (0..PAGES).map(|i| 0x100 + i / 2).collect();
        let lab = Lab::new(policy, FIRST_GFN, &words);
        let ksm_done = AtomicBool::new(false);
        let vcpus_running = AtomicU64::new(VCPUS);
        let guest_accesses = AtomicU64::new(0);
        let vcpu = |seed: u64| -> Res {
            let mut rng = XorShift(seed);
            let result = (|| {
                while !ksm_done.load(Ordering::Acquire) {
                    let gfn = FIRST_GFN + rng.below(PAGES);
                    let word = racing_guest_access(&lab, gfn, rng.below(4) == 0)?;
                    prop_assert_eq!(word, lab.model.get(gfn), "gfn {} read through a stale frame", gfn);
                    guest_accesses.fetch_add(1, Ordering::Release);
                }
                Ok(())
            })();
            vcpus_running.fetch_sub(1, Ordering::Release);
            result
        };
        let ksm = || -> Res {
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
            let mut seen = 0;
            for _ in 0..KSM_STEPS {
                while guest_accesses.load(Ordering::Acquire) == seen && vcpus_running.load(Ordering::Acquire) > 0 {
                    std::thread::yield_now();
                }
                seen = guest_accesses.load(Ordering::Acquire);
                lab.check()?;
                let a = FIRST_GFN + 2 * rng.below(PAGES / 2);
                if rng.below(3) == 0 {
                    lock(&lab.mmus.mm).get_user_page(a + rng.below(2), true).or_fail("unmerge")?;
                } else {
                    lab.merge_pages(a, a + 1, rng.below(2) == 0)?;
                }
            }
            Ok(())
        };
        let result = std::thread::scope(|s| {
            let vcpus: Vec<_> = (0..VCPUS).map(|v| s.spawn(move || vcpu(0x9e37_79b9_7f4a_7c15 ^ (v + 1)))).collect();
            let mut result = ksm();
            ksm_done.store(true, Ordering::Release);
            for v in vcpus {
                result = result.and(v.join().expect("a vCPU thread panicked"));
            }
            result
        });
        if let Err(e) = result {
            panic!("{}: {e}", policy.name());
        }
        lab.check().expect("invariants at the end");
        lab.sweep().expect("sweep at the end");
    }
}
