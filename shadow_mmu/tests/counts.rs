//! Deterministic tests of the secondary MMU: the exact counts of one merge,
//! reads and one write on two pages under each policy, and an unflagged
//! batch protection under every policy.

mod common;

use shadow_mmu::memory::HostStats;
use shadow_mmu::{lock, Access, Policy, Pte};

use common::{Lab, Step, FIRST_GFN, POLICIES};

/// The counters of the secondary MMU a test pins (all but `view_ns`, a time).
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    installed: u64,
    zapped: u64,
    change_pte_applied: u64,
    change_pte_missed: u64,
    flushes: u64,
    fault_retries: u64,
    view_updates: u64,
    /// The view's (zaps, maps).
    view_calls: (u64, u64),
}

/// Pages 2 and 3 hold the same word; KSM merges 3 into 2's frame (a KSM
/// page), the guest reads both, then writes page 3 (copy-on-write). Frames:
/// 0-1 boot, 2-3 guest, 4 spare.
fn merge_read_write(policy: Policy) -> (Counts, HostStats, Lab) {
    let mut lab = Lab::new(policy, FIRST_GFN, &[0x5a, 0x5a]);
    let merged = lab.merge_pages(2, 3, true).expect("merge");
    assert_eq!(merged, Step::Merge { a: 2, b: 3, replaced: true });
    lab.check().expect("invariants after the merge");
    lab.guest_read(3, Access::Read).expect("read 3");
    lab.guest_read(2, Access::Read).expect("read 2");
    lab.guest_write(3, 0x77).expect("write 3");
    lab.check().expect("invariants after the write");
    // Both pages read back through the secondary MMU without another fault.
    let installed = lock(&lab.mmus.mmu).stats().installed;
    lab.sweep().expect("sweep");
    assert_eq!(lock(&lab.mmus.mmu).stats().installed, installed, "the sweep faulted");
    assert_eq!(lab.model.words, [0x5a, 0x77]);

    let host = lock(&lab.mmus.mm);
    // The frame freed by the merge (3) is the first one reused: the free list is LIFO.
    assert_eq!(host.pte(3).expect("pte"), Pte { pfn: 3, writable: true, soft_dirty: true });
    assert_eq!(host.pte(2).expect("pte"), Pte { pfn: 2, writable: false, soft_dirty: true });
    assert!(host.frame(2).ksm);
    let host_stats = host.stats();
    drop(host);
    let mmu = lock(&lab.mmus.mmu);
    let s = mmu.stats();
    let counts = Counts {
        installed: s.installed,
        zapped: s.zapped,
        change_pte_applied: s.change_pte_applied,
        change_pte_missed: s.change_pte_missed,
        flushes: s.flushes,
        fault_retries: s.fault_retries,
        view_updates: s.view_updates,
        view_calls: mmu.view().calls,
    };
    drop(mmu);
    (counts, host_stats, lab)
}

/// The host side is the same under every policy.
fn expected_host_stats() -> HostStats {
    HostStats {
        // Page 3's write fault on the KSM frame 2 (mapped twice) copies it.
        cow_copies: 1,
        cow_reuses: 0,
        // replace_page drops frame 3's last reference.
        frames_freed: 1,
        // The copy takes frame 3 back.
        frames_allocated: 1,
        // write_protect_page(2), write_protect_page(3), replace_page(3), wp_page_copy(3).
        notifier_ranges: 4,
        // One set_pte_at_notify in each of those ranges.
        change_pte_calls: 4,
        // No batch update.
        unshare_copies: 0,
        soft_dirty_rounds: 0,
        soft_dirty_pages: 0,
        batch_wrprotected: 0,
    }
}

#[test]
fn change_pte_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::ChangePte);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // Only the write fault installs (the merge kept both pages mapped,
            // so the reads hit the EPT).
            installed: 1,
            // Every range carries USE_CHANGE_PTE: nothing is ever zapped.
            zapped: 0,
            // wp(2): 2 rw->ro; wp(3): 3 rw->ro; replace: 3 -> frame 2 ro;
            // the copy-on-write: 3 -> frame 3 rw.
            change_pte_applied: 4,
            change_pte_missed: 0,
            // Each in-place update of a present entry is a TLB flush, as
            // KVM's change_pte handler flushed.
            flushes: 4,
            // The copy-on-write inside the fault moves the invalidation
            // sequence, so the handler retries once (and finds the pte writable).
            fault_retries: 1,
            // 4 in-place updates + 1 install, all maps.
            view_updates: 5,
            view_calls: (0, 5),
        }
    );
}

#[test]
fn range_flush_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::RangeFlush);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // Read faults on 3 and 2 (zapped by the merge), then the write fault on 3.
            installed: 3,
            // wp(2) zaps 2; wp(3) zaps 3; replace finds 3 already gone; the
            // copy-on-write zaps 3 (mapped read-only by the read fault).
            zapped: 3,
            // change_pte is ignored, not even counted.
            change_pte_applied: 0,
            change_pte_missed: 0,
            // One per zap that removed something.
            flushes: 3,
            // As under change-pte: the copy-on-write moved the sequence.
            fault_retries: 1,
            // 3 zaps + 3 installs.
            view_updates: 6,
            view_calls: (3, 3),
        }
    );
}

#[test]
fn legacy_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::Legacy);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // The same faults as range-flush.
            installed: 3,
            zapped: 3,
            // Each of the 4 change_pte calls comes after its range's zap and
            // finds no entry.
            change_pte_applied: 0,
            change_pte_missed: 4,
            flushes: 3,
            fault_retries: 1,
            view_updates: 6,
            view_calls: (3, 3),
        }
    );
}

/// A batch protection without USE_CHANGE_PTE zaps under every policy, and a
/// later write reuses the frame (mapped once, not KSM) with no notifier.
#[test]
fn unflagged_protection_zaps_under_every_policy() {
    for policy in POLICIES {
        let mut lab = Lab::new(policy, FIRST_GFN, &[1, 2, 3, 4]);
        assert_eq!(lab.protect_range(3, 5).expect("protect"), Step::ProtectRange { start: 3, end: 5 });
        lab.check().expect("invariants");
        let s = lock(&lab.mmus.mmu).stats();
        assert_eq!((s.zapped, s.flushes, s.change_pte_applied), (2, 1, 0), "{}", policy.name());
        // range-flush does not count change_pte at all; the others miss both.
        let missed = if policy == Policy::RangeFlush { 0 } else { 2 };
        assert_eq!(s.change_pte_missed, missed, "{}", policy.name());
        lab.guest_write(4, 9).expect("write");
        let host = lock(&lab.mmus.mm).stats();
        assert_eq!((host.cow_reuses, host.cow_copies, host.notifier_ranges), (1, 0, 1), "{}", policy.name());
        lab.sweep().expect("sweep");
        lab.check().expect("invariants");
    }
}
