//! The secondary MMU on real KVM: host-side changes are driven through the
//! same notifier paths the deduplicator uses (`write_protect_page`,
//! `replace_page`), and the exits each policy takes are asserted exactly,
//! under every EPT view backend.
//!
//! The guest is `pagefill` (guest-images/README.md): N pages in 16 groups of
//! identical content; it asks for a dedup pass in phases 2 and 5, reads one
//! word per page in phase 3, writes one in phase 4, reads in phase 6. The
//! hook below answers each dedup request by merging every group into its
//! first page, as KSM's try_to_merge_one_page would.

mod common;

use common::{require_kvm, run_in_process};
use shadow_mmu::{Gfn, HostMm, PAGE_SHIFT, PAGE_SIZE};
use vmm::stats::{Figures, RunStats};
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, HookPoint, HostHook};

const MEM: &str = "8M";
const MEM_BYTES: u64 = 8 << 20;

fn pagefill_gfns() -> Vec<Gfn> {
    let first = guest_images::PAGEFILL_START >> PAGE_SHIFT;
    (first..first + guest_images::pagefill_pages(MEM_BYTES)).collect()
}

/// Merges page `gfn` into frame `kpfn` the way mm/ksm.c does: write-protect,
/// compare the contents, replace.
fn merge_into(host: &mut HostMm, gfn: Gfn, kpfn: u64) -> Result<(), String> {
    host.write_protect_page(gfn).map_err(|e| e.to_string())?;
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
    host.read_guest(gfn << PAGE_SHIFT, &mut a).map_err(|e| e.to_string())?;
    let kgpa = host.pool().direct_map();
    vm_memory::Bytes::read_slice(kgpa, &mut b, vm_memory::GuestAddress(kpfn << PAGE_SHIFT))
        .map_err(|e| e.to_string())?;
    if a != b {
        return Err(format!("gfn {gfn:#x} differs from its group's KSM page"));
    }
    host.replace_page(gfn, kpfn).map_err(|e| e.to_string())
}

/// A hook that merges each pagefill group into its first page at every
/// synchronous dedup request.
fn merge_groups_hook() -> HostHook {
    Box::new(|point, host| {
        if point != HookPoint::DedupRequest(1) {
            return Ok(());
        }
        let gfns = pagefill_gfns();
        let groups = guest_images::PAGEFILL_GROUPS as usize;
        for g in 0..groups {
            let members: Vec<Gfn> = gfns.iter().copied().skip(g).step_by(groups).collect();
            let Some((&first, rest)) = members.split_first() else { continue };
            let kpte = host.write_protect_page(first).map_err(|e| e.to_string())?;
            host.set_ksm(kpte.pfn, true);
            for &gfn in rest {
                merge_into(host, gfn, kpte.pfn)?;
            }
        }
        Ok(())
    })
}

fn phase(stats: &RunStats, n: u32) -> &Figures {
    &stats.phases.iter().find(|p| p.phase == n).unwrap_or_else(|| panic!("no phase {n}")).figures
}

fn shadow(f: &Figures, name: &str) -> u64 {
    f.shadow_mmu.get(name).copied().unwrap_or_else(|| panic!("no shadow_mmu figure {name}: {:?}", f.shadow_mmu))
}

fn check_policy(policy: DedupPolicy, view: ViewKind) {
    let s = run_in_process("pagefill", MEM, policy, view, Some(merge_groups_hook()));
    let ctx = format!("{} / {}", policy.name(), view.name());
    assert_eq!(s.guest.end.reason, "exit", "{ctx}: {}", s.guest.end.detail);
    assert_eq!(s.guest.exit_code, Some(0), "{ctx}");
    // Deduplication never changes what the guest reads.
    assert_eq!(s.guest.reports, guest_images::pagefill_expected_reports(MEM_BYTES), "{ctx}");

    let n = guest_images::pagefill_pages(MEM_BYTES);
    let k = guest_images::PAGEFILL_GROUPS;
    // Faults of each phase: (ept_read, ept_write).
    let zapped_reads = if policy == DedupPolicy::ChangePte { 0 } else { n };
    let expected = [(0, 0), (0, 0), (0, 0), (zapped_reads, 0), (0, n), (0, 0), (zapped_reads, 0)];
    for (p, &(reads, writes)) in expected.iter().enumerate() {
        let f = phase(&s, p as u32);
        assert_eq!((f.exits.ept_read, f.exits.ept_write, f.exits.ept_fetch), (reads, writes, 0), "{ctx}: phase {p}");
        assert_eq!(f.exits.mmio, 0, "{ctx}: phase {p}");
    }
    // A merge pass: N write-protections that change a pte, N - K replaces.
    let pass_changes = 2 * n - k;
    let t = &s.total;
    let cow = n;
    match policy {
        DedupPolicy::ChangePte => {
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
        DedupPolicy::Off => unreachable!(),
    }
    if policy != DedupPolicy::ChangePte {
        // Every page is zapped by its first write-protection in each pass (and
        // again by its replace); each phase-4 copy-on-write zaps its entry too.
        assert_eq!(shadow(t, "zapped"), 2 * n + cow, "{ctx}");
        assert_eq!(shadow(t, "installed"), 2 * zapped_reads + n, "{ctx}");
    }
    // Each merge pass returns every duplicate frame to the host; in phase 4
    // each KSM frame goes too when the last page mapping it copies away.
    assert_eq!(shadow(t, "frames_freed"), 2 * (n - k) + k, "{ctx}");
}

#[test]
fn memslot_view_change_pte_takes_no_read_exit_after_in_place_updates() {
    if require_kvm() {
        check_policy(DedupPolicy::ChangePte, ViewKind::Memslot);
    }
}

#[test]
fn memslot_view_range_flush_takes_one_read_exit_per_zapped_page() {
    if require_kvm() {
        check_policy(DedupPolicy::RangeFlush, ViewKind::Memslot);
    }
}

#[test]
fn memslot_view_legacy_takes_the_same_exits_and_misses_every_change_pte() {
    if require_kvm() {
        check_policy(DedupPolicy::Legacy, ViewKind::Memslot);
    }
}

#[test]
fn dedup_off_reports_the_same_checksums_with_no_faults() {
    if !require_kvm() {
        return;
    }
    let s = run_in_process("pagefill", MEM, DedupPolicy::Off, ViewKind::Memslot, None);
    assert_eq!(s.guest.reports, guest_images::pagefill_expected_reports(MEM_BYTES));
    let e = &s.total.exits;
    assert_eq!((e.ept_read, e.ept_write, e.ept_fetch, e.total), (0, 0, 0, guest_images::PAGEFILL_IO_EXITS));
}

#[test]
fn uffd_view_change_pte_takes_no_read_fault_after_in_place_updates() {
    if require_kvm() {
        check_policy(DedupPolicy::ChangePte, ViewKind::Uffd);
    }
}

#[test]
fn uffd_view_range_flush_takes_one_read_fault_per_zapped_page() {
    if require_kvm() {
        check_policy(DedupPolicy::RangeFlush, ViewKind::Uffd);
    }
}

#[test]
fn uffd_view_legacy_takes_the_same_faults_and_misses_every_change_pte() {
    if require_kvm() {
        check_policy(DedupPolicy::Legacy, ViewKind::Uffd);
    }
}
