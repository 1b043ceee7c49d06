//! The exits a pagefill run takes when each of its two dedup requests merged
//! every group into one KSM page, predicted from N pages in K groups; shared
//! by tests/secondary_mmu.rs (a host hook merges) and tests/dedup.rs (the
//! built-in deduplicator does).

use vmm::stats::{Figures, RunStats};
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

/// Guest RAM of these runs.
pub const MEM_BYTES: u64 = 8 << 20;

fn phase(stats: &RunStats, n: u32) -> &Figures {
    &stats.phases.iter().find(|p| p.phase == n).unwrap_or_else(|| panic!("no phase {n}")).figures
}

fn shadow(f: &Figures, name: &str) -> u64 {
    f.shadow_mmu.get(name).copied().unwrap_or_else(|| panic!("no shadow_mmu figure {name}: {:?}", f.shadow_mmu))
}

/// The exits, secondary-MMU events and frames of a pagefill run whose two
/// dedup requests each merged every group into one KSM page, as the model
/// predicts them from N pages in K groups. Shared with tests/dedup.rs,
/// where the built-in deduplicator does the merging.
pub fn check_pagefill_exits(s: &RunStats, policy: DedupPolicy, view: ViewKind) {
    let ctx = format!("{} / {}", policy.name(), view.name());
    assert_eq!(s.guest.end.reason, "exit", "{ctx}: {}", s.guest.end.detail);
    assert_eq!(s.guest.exit_code, Some(0), "{ctx}");
    // Deduplication never changes what the guest reads.
    assert_eq!(s.guest.reports, guest_images::pagefill_expected_reports(MEM_BYTES), "{ctx}");

    let n = guest_images::pagefill_pages(MEM_BYTES);
    let k = guest_images::PAGEFILL_GROUPS;
    // Faults of each phase: (ept_read, ept_write).
    let zapped_reads = if super::updates_in_place(policy) { 0 } else { n };
    let expected = [(0, 0), (0, 0), (0, 0), (zapped_reads, 0), (0, n), (0, 0), (zapped_reads, 0)];
    for (p, &(reads, writes)) in expected.iter().enumerate() {
        let f = phase(s, p as u32);
        assert_eq!((f.exits.ept_read, f.exits.ept_write, f.exits.ept_fetch), (reads, writes, 0), "{ctx}: phase {p}");
        assert_eq!(f.exits.mmio, 0, "{ctx}: phase {p}");
    }
    // A merge pass: N write-protections that change a pte, N - K replaces.
    let pass_changes = 2 * n - k;
    let t = &s.total;
    let cow = n;
    match policy {
        DedupPolicy::ChangePte | DedupPolicy::EventAware => {
            assert_eq!(shadow(t, "change_pte_applied"), 2 * pass_changes + cow, "{ctx}");
            assert_eq!(shadow(t, "change_pte_missed"), 0, "{ctx}");
            assert_eq!(shadow(t, "zapped"), 0, "{ctx}");
        }
        DedupPolicy::RangeFlush => {
            assert_eq!(shadow(t, "change_pte_applied") + shadow(t, "change_pte_missed"), 0, "{ctx}");
        }
        DedupPolicy::Legacy => {
            assert_eq!(shadow(t, "change_pte_applied"), 0, "{ctx}");
            assert_eq!(shadow(t, "change_pte_missed"), shadow(t, "change_pte_calls"), "{ctx}");
            assert_eq!(shadow(t, "change_pte_missed"), 2 * pass_changes + cow, "{ctx}");
        }
        DedupPolicy::Off | DedupPolicy::Kernel => unreachable!("not a built-in deduplication policy"),
    }
    if !super::updates_in_place(policy) {
        // Every page is zapped by its first write-protection in each pass (and
        // again by its replace); each phase-4 copy-on-write zaps its entry too.
        assert_eq!(shadow(t, "zapped"), 2 * n + cow, "{ctx}");
        assert_eq!(shadow(t, "installed"), 2 * zapped_reads + n, "{ctx}");
    }
    // Each merge pass returns every duplicate frame to the host; in phase 4
    // each KSM frame goes too when the last page mapping it copies away.
    assert_eq!(shadow(t, "frames_freed"), 2 * (n - k) + k, "{ctx}");
}

/// For a run whose merge passes were batches: under the userfaultfd view
/// and a zapping policy, each pass points the window's zapped pages at
/// their KSM pages ahead of any fault, so that the reads after it fault
/// without making the host KVM retry: in phases 3 and 6 the host takes no
/// more faults than it fixes, but for a few of its own (a remap during each
/// read fault took one retry per page). Nothing to check otherwise.
pub fn check_window_moves_ahead_of_faults(s: &RunStats, policy: DedupPolicy, view: ViewKind) {
    if view != ViewKind::Uffd || super::updates_in_place(policy) {
        return;
    }
    let ctx = format!("{} / {}", policy.name(), view.name());
    let n = guest_images::pagefill_pages(MEM_BYTES);
    let k = guest_images::PAGEFILL_GROUPS;
    for p in [2, 5] {
        let f = phase(s, p);
        assert_eq!(shadow(f, "host_pages_moved"), n - k, "{ctx}: phase {p}");
        assert_eq!(shadow(f, "view_absent_remaps"), n - k, "{ctx}: phase {p}");
    }
    for p in [3, 6] {
        let kvm = |name: &str| phase(s, p).kvm.get(name).copied().unwrap_or(0);
        assert!(kvm("pf_fixed") >= n, "{ctx}: phase {p}: the host KVM fixed {} faults", kvm("pf_fixed"));
        let retried = kvm("pf_taken").saturating_sub(kvm("pf_fixed"));
        assert!(retried < n / 8, "{ctx}: phase {p}: {retried} host faults retried for {n} reads");
    }
}
