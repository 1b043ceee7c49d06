//! Guest faults racing with KSM: vCPU threads access guest pages through
//! the secondary MMU while a KSM thread merges and breaks them (and, in the
//! second test, runs soft-dirty rounds), under every policy.

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

/// What the host thread does between two guest accesses.
type HostStep = fn(&Lab, &mut XorShift) -> Res;

/// A KSM step: merge a pair of equal pages, or break one (one in three).
fn ksm_step(lab: &Lab, rng: &mut XorShift) -> Res {
    let a = FIRST_GFN + 2 * rng.below(PAGES / 2);
    if rng.below(3) == 0 {
        lock(&lab.mmus.mm).get_user_page(a + rng.below(2), true).or_fail("unmerge")?;
        Ok(())
    } else {
        lab.merge_pages(a, a + 1, rng.below(2) == 0).map(|_| ())
    }
}

/// A KSM step, or (one in four) a soft-dirty round over every page, or
/// over a few.
fn ksm_or_round_step(lab: &Lab, rng: &mut XorShift) -> Res {
    if rng.below(4) != 0 {
        return ksm_step(lab, rng);
    }
    let start = FIRST_GFN + rng.below(PAGES);
    let end = if rng.below(2) == 0 { FIRST_GFN + PAGES } else { start + 1 + rng.below(FIRST_GFN + PAGES - start) };
    lock(&lab.mmus.mm).clear_refs_soft_dirty(start, end).or_fail("clear_refs_soft_dirty")?;
    Ok(())
}

const PAGES: u64 = 8;

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
    for policy in POLICIES {
        race(policy, ksm_step, Lab::check);
    }
}

/// The same with soft-dirty rounds among the KSM steps: a write fault
/// whose host lookup made the pte writable just before a round
/// write-protected it again must retry, not install a writable entry over
/// the read-only pte (with rounds alone and no retry, this fails at once).
/// The vCPUs' writes bypass the soft-dirty reference, so it is not checked.
#[test]
fn faults_racing_with_ksm_and_soft_dirty_rounds_never_install_a_stale_or_writable_frame() {
    for policy in POLICIES {
        race(policy, ksm_or_round_step, Lab::check_mmus);
    }
}

/// Three vCPUs access random pages while the host thread takes
/// `host_step`s, checking the invariants with `check` before each.
fn race(policy: shadow_mmu::Policy, host_step: HostStep, check: fn(&Lab) -> Res) {
    const VCPUS: u64 = 3;
    const HOST_STEPS: u64 = 1500;
    // Pages 2k and 2k + 1 are equal; no word is 0, so a freed frame shows.
    let words: Vec<u64> = (0..PAGES).map(|i| 0x100 + i / 2).collect();
    let lab = Lab::new(policy, FIRST_GFN, &words);
    let host_done = AtomicBool::new(false);
    let vcpus_running = AtomicU64::new(VCPUS);
    let guest_accesses = AtomicU64::new(0);
    let vcpu = |seed: u64| -> Res {
        let mut rng = XorShift(seed);
        let result = (|| {
            while !host_done.load(Ordering::Acquire) {
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
    let host = || -> Res {
        let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
        let mut seen = 0;
        for _ in 0..HOST_STEPS {
            while guest_accesses.load(Ordering::Acquire) == seen && vcpus_running.load(Ordering::Acquire) > 0 {
                std::thread::yield_now();
            }
            seen = guest_accesses.load(Ordering::Acquire);
            check(&lab)?;
            host_step(&lab, &mut rng)?;
        }
        Ok(())
    };
    let result = std::thread::scope(|s| {
        let vcpus: Vec<_> = (0..VCPUS).map(|v| s.spawn(move || vcpu(0x9e37_79b9_7f4a_7c15 ^ (v + 1)))).collect();
        let mut result = host();
        host_done.store(true, Ordering::Release);
        for v in vcpus {
            result = result.and(v.join().expect("a vCPU thread panicked"));
        }
        result
    });
    if let Err(e) = result {
        panic!("{}: {e}", policy.name());
    }
    check(&lab).expect("invariants at the end");
    lab.sweep().expect("sweep at the end");
}
