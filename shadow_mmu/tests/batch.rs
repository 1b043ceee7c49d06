//! Deterministic tests of batch updates: the exact counts of a soft-dirty
//! round and of mprotect (to read-only and back) over mapped pages, then
//! guest reads and writes, under each policy. range-flush, legacy and
//! change-pte zap a batch range, as their KVMs do, so every page refaults;
//! event-aware downgrades it in place, so reads never fault; a written page
//! takes exactly one write fault under every policy.

mod common;

use shadow_mmu::memory::HostStats;
use shadow_mmu::{lock, Access, Gfn, MmuStats, Policy, Pte};

use common::{Lab, Step, FIRST_GFN, POLICIES, ZAPPING_POLICIES};

/// Guest pages, all mapped writable in the EPT at the start.
const PAGES: u64 = 8;
/// The pages the guest writes after the batch update.
const WRITTEN: [Gfn; 3] = [3, 5, 8];

fn words() -> Vec<u64> {
    (0..PAGES).map(|i| 0x100 + i).collect()
}

fn end() -> Gfn {
    FIRST_GFN + PAGES
}

/// The secondary MMU's counters, the view's (zaps, maps, write_protects)
/// and the host's counters now.
fn counts(lab: &Lab) -> (MmuStats, (u64, u64, u64), HostStats) {
    let host = lock(&lab.mmus.mm).stats();
    let mmu = lock(&lab.mmus.mmu);
    let view = mmu.view();
    (mmu.stats(), (view.calls.0, view.calls.1, view.write_protect_calls), host)
}

/// Faults taken by `access` (each serves one fault: one install).
fn faults_of(lab: &mut Lab, access: impl FnOnce(&mut Lab)) -> u64 {
    let before = lock(&lab.mmus.mmu).stats().installed;
    access(lab);
    lock(&lab.mmus.mmu).stats().installed - before
}

fn read_all(lab: &mut Lab) {
    lab.sweep().expect("guest reads the reference");
}

fn write_some(lab: &mut Lab) {
    for gfn in WRITTEN {
        lab.guest_write(gfn, 0x7700 + gfn).expect("guest write");
    }
}

/// A soft-dirty round over every page: how the secondary MMU takes it.
fn round(policy: Policy) -> Lab {
    let mut lab = Lab::new(policy, FIRST_GFN, &words());
    let (mmu0, view0, host0) = counts(&lab);
    assert_eq!(
        lab.soft_dirty_round(FIRST_GFN, end()).expect("round"),
        Step::SoftDirty { start: FIRST_GFN, end: end() }
    );
    lab.check().expect("invariants after the round");
    let (mmu, view, host) = counts(&lab);
    let name = policy.name();
    // One range, without change_pte, that write-protected every pte.
    assert_eq!(host.notifier_ranges - host0.notifier_ranges, 1, "{name}");
    assert_eq!((host.change_pte_calls, host.soft_dirty_rounds, host.batch_wrprotected), (0, 1, PAGES), "{name}");
    let delta = |a: u64, b: u64| a - b;
    let mmu_delta = (
        delta(mmu.zapped, mmu0.zapped),
        delta(mmu.wrprot_ranges, mmu0.wrprot_ranges),
        delta(mmu.wrprot_entries, mmu0.wrprot_entries),
        delta(mmu.flushes, mmu0.flushes),
    );
    let view_delta = (view.0 - view0.0, view.1 - view0.1, view.2 - view0.2);
    if policy == Policy::EventAware {
        // One in-place downgrade of the whole range: one view call, one flush.
        assert_eq!(mmu_delta, (0, 1, PAGES, 1), "{name}: (zapped, wrprot_ranges, wrprot_entries, flushes)");
        assert_eq!(view_delta, (0, 0, 1), "{name}: view (zaps, maps, write_protects)");
        assert_eq!(lock(&lab.mmus.mmu).ept().len(), PAGES, "{name}: every page stays mapped");
    } else {
        // One zap of the whole range.
        assert_eq!(mmu_delta, (PAGES, 0, 0, 1), "{name}: (zapped, wrprot_ranges, wrprot_entries, flushes)");
        assert_eq!(view_delta, (1, 0, 0), "{name}: view (zaps, maps, write_protects)");
        assert!(lock(&lab.mmus.mmu).ept().is_empty(), "{name}");
    }
    lab
}

/// After the round every written page took one write fault that reused its
/// frame, and pagemap reports exactly those pages soft-dirty.
fn check_writes_reused_their_frames(lab: &Lab, host_before: HostStats) {
    let name = lab.mmus.mmu.lock().expect("mmu").policy().name();
    let host = lock(&lab.mmus.mm);
    let stats = host.stats();
    assert_eq!(stats.cow_reuses - host_before.cow_reuses, WRITTEN.len() as u64, "{name}: reuses");
    assert_eq!(stats.cow_copies, host_before.cow_copies, "{name}: no copy");
    for gfn in WRITTEN {
        assert_eq!(host.pte(gfn).expect("pte"), Pte { pfn: gfn, writable: true, soft_dirty: true }, "{name}");
    }
    assert_eq!(host.soft_dirty_pages(FIRST_GFN, end()).expect("range"), WRITTEN, "{name}: pagemap");
    assert_eq!(host.nr_soft_dirty(FIRST_GFN, end()).expect("range"), WRITTEN.len() as u64, "{name}");
}

#[test]
fn after_a_round_reads_fault_on_every_page_except_under_event_aware() {
    for policy in POLICIES {
        let mut lab = round(policy);
        let read_faults = faults_of(&mut lab, read_all);
        let expected = if policy == Policy::EventAware { 0 } else { PAGES };
        assert_eq!(read_faults, expected, "{}: read faults after the round", policy.name());
        let host_before = counts(&lab).2;
        let retries = lock(&lab.mmus.mmu).stats().fault_retries;
        assert_eq!(faults_of(&mut lab, write_some), WRITTEN.len() as u64, "{}: one write fault each", policy.name());
        // Reusing a frame opens no range, so no fault had to retry.
        assert_eq!(lock(&lab.mmus.mmu).stats().fault_retries, retries, "{}", policy.name());
        check_writes_reused_their_frames(&lab, host_before);
        assert_eq!(faults_of(&mut lab, read_all), 0, "{}: everything is mapped now", policy.name());
        lab.check().expect("invariants");
    }
}

#[test]
fn after_a_round_each_written_page_takes_exactly_one_write_fault() {
    for policy in POLICIES {
        let mut lab = round(policy);
        let host_before = counts(&lab).2;
        assert_eq!(faults_of(&mut lab, write_some), WRITTEN.len() as u64, "{}: one write fault each", policy.name());
        check_writes_reused_their_frames(&lab, host_before);
        // The pages not written: mapped read-only in place, or zapped.
        let unwritten = PAGES - WRITTEN.len() as u64;
        let expected = if policy == Policy::EventAware { 0 } else { unwritten };
        assert_eq!(faults_of(&mut lab, read_all), expected, "{}: read faults", policy.name());
        lab.check().expect("invariants");
    }
}

/// A KSM page (two guest pages on one frame) is not reused after a round:
/// its write breaks copy-on-write into a new frame, one fault, as before.
#[test]
fn after_a_round_a_merged_page_still_breaks_copy_on_write_in_one_fault() {
    for policy in POLICIES {
        let mut lab = Lab::new(policy, FIRST_GFN, &[0x5a, 0x5a, 0x33]);
        lab.merge_pages(2, 3, true).expect("merge");
        lab.soft_dirty_round(2, 5).expect("round");
        let copies = lock(&lab.mmus.mm).stats().cow_copies;
        let faults = faults_of(&mut lab, |lab| lab.guest_write(3, 0x77).expect("write"));
        assert_eq!(faults, 1, "{}", policy.name());
        let host = lock(&lab.mmus.mm);
        assert_eq!(host.stats().cow_copies, copies + 1, "{}", policy.name());
        let pte = host.pte(3).expect("pte");
        assert!(pte.writable && pte.soft_dirty && pte.pfn != 2, "{}: {pte:?}", policy.name());
        assert_eq!(host.soft_dirty_pages(2, 5).expect("range"), vec![3], "{}", policy.name());
        drop(host);
        lab.sweep().expect("sweep");
        lab.check().expect("invariants");
    }
}

#[test]
fn mprotect_to_read_only_refuses_writes_keeps_reads_and_back_to_read_write_needs_one_write_fault() {
    for policy in POLICIES {
        let name = policy.name();
        let mut lab = Lab::new(policy, FIRST_GFN, &words());
        lab.mprotect(FIRST_GFN, end(), false).expect("mprotect ro");
        lab.check().expect("invariants");
        let s = lock(&lab.mmus.mmu).stats();
        let in_place = policy == Policy::EventAware;
        let (zapped, downgraded) = if in_place { (0, PAGES) } else { (PAGES, 0) };
        assert_eq!((s.zapped, s.wrprot_entries, s.flushes), (zapped, downgraded, 1), "{name}");
        // Reads: no fault in place, one per page after a zap.
        assert_eq!(faults_of(&mut lab, read_all), if in_place { 0 } else { PAGES }, "{name}");
        // Writes: refused, under every policy, and nothing changes.
        for gfn in WRITTEN {
            assert_eq!(lab.guest_write_refused(gfn).expect("refused"), Step::WriteRefused(gfn), "{name}");
        }
        lab.check().expect("invariants");

        // Back to read-write: every pte is writable again at once (no round
        // ran, each page is exclusive), no fault on the host side; the
        // secondary MMU still maps them read-only, so each written page
        // takes one write fault to learn it.
        let host_before = counts(&lab).2;
        lab.mprotect(FIRST_GFN, end(), true).expect("mprotect rw");
        let s = lock(&lab.mmus.mmu).stats();
        let zapped_twice = if in_place { 0 } else { 2 * PAGES };
        assert_eq!(s.zapped, zapped_twice, "{name}: event-aware has nothing to invalidate");
        assert_eq!(faults_of(&mut lab, write_some), WRITTEN.len() as u64, "{name}");
        let host = counts(&lab).2;
        assert_eq!((host.cow_reuses, host.cow_copies), (host_before.cow_reuses, host_before.cow_copies), "{name}");
        let unwritten = PAGES - WRITTEN.len() as u64;
        assert_eq!(faults_of(&mut lab, read_all), if in_place { 0 } else { unwritten }, "{name}");
        lab.check().expect("invariants");
    }
}

/// The guest reads its data unchanged through a round under every policy,
/// and the zapping policies never downgrade in place.
#[test]
fn a_round_changes_no_data_and_only_event_aware_downgrades_in_place() {
    for policy in ZAPPING_POLICIES {
        let mut lab = round(policy);
        read_all(&mut lab);
        let s = lock(&lab.mmus.mmu).stats();
        assert_eq!((s.wrprot_ranges, s.wrprot_entries), (0, 0), "{}", policy.name());
    }
    let mut lab = round(Policy::EventAware);
    read_all(&mut lab);
    for gfn in FIRST_GFN..end() {
        let entry = lock(&lab.mmus.mmu).ept().lookup(gfn).expect("mapped");
        assert!(!entry.writable() && entry.pfn() == gfn, "gfn {gfn}: {entry:?}");
    }
    let mut word = [0u8; 8];
    lab.mmus.guest_read(5 << 12, &mut word).expect("read");
    assert_eq!(u64::from_ne_bytes(word), 0x103);
    assert_eq!(lab.mmus.guest_frame(5, Access::Read).expect("frame"), 5);
}

/// `soft_dirty_pages` counts the pages soft-dirty when a round begins (as
/// pagemap bit 55 shows them): every page at the first round (a new
/// mapping is soft-dirty), then the pages written since.
#[test]
fn a_round_counts_the_pages_written_since_the_round_before() {
    for policy in POLICIES {
        let mut lab = Lab::new(policy, FIRST_GFN, &words());
        lab.soft_dirty_round(FIRST_GFN, end()).expect("round 1");
        assert_eq!(lock(&lab.mmus.mm).stats().soft_dirty_pages, PAGES, "{policy:?}");
        write_some(&mut lab);
        lab.soft_dirty_round(FIRST_GFN, end()).expect("round 2");
        let stats = lock(&lab.mmus.mm).stats();
        assert_eq!((stats.soft_dirty_rounds, stats.soft_dirty_pages), (2, PAGES + WRITTEN.len() as u64), "{policy:?}");
    }
}
