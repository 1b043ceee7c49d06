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

use common::pagefill::check_pagefill_exits;

use common::{require_kvm, run_in_process};
use shadow_mmu::{Gfn, PrimaryMmu, PAGE_SHIFT, PAGE_SIZE};
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, HookPoint, MmHook};

const MEM: &str = "8M";
use common::pagefill::MEM_BYTES;

fn pagefill_gfns() -> Vec<Gfn> {
    let first = guest_images::PAGEFILL_START >> PAGE_SHIFT;
    (first..first + guest_images::pagefill_pages(MEM_BYTES)).collect()
}

/// Merges page `gfn` into frame `kpfn` the way mm/ksm.c does: write-protect,
/// compare the contents, replace.
fn merge_into(host: &mut PrimaryMmu, gfn: Gfn, kpfn: u64) -> Result<(), String> {
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
fn merge_groups_hook() -> MmHook {
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

/// Runs pagefill under `policy` and `view` with the merging hook and checks
/// its exits against the model.
fn check_policy(policy: DedupPolicy, view: ViewKind) {
    require_kvm();
    let s = run_in_process("pagefill", MEM, policy, view, Some(merge_groups_hook()));
    check_pagefill_exits(&s, policy, view);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn memslot_view_change_pte_takes_no_read_exit_after_in_place_updates() {
    check_policy(DedupPolicy::ChangePte, ViewKind::Memslot);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn memslot_view_range_flush_takes_one_read_exit_per_zapped_page() {
    check_policy(DedupPolicy::RangeFlush, ViewKind::Memslot);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn memslot_view_legacy_takes_the_same_exits_and_misses_every_change_pte() {
    check_policy(DedupPolicy::Legacy, ViewKind::Memslot);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn dedup_off_reports_the_same_checksums_with_no_faults() {
    require_kvm();
    let s = run_in_process("pagefill", MEM, DedupPolicy::Off, ViewKind::Memslot, None);
    assert_eq!(s.guest.reports, guest_images::pagefill_expected_reports(MEM_BYTES));
    let e = &s.total.exits;
    assert_eq!((e.ept_read, e.ept_write, e.ept_fetch, e.total), (0, 0, 0, guest_images::PAGEFILL_IO_EXITS));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn uffd_view_change_pte_takes_no_read_fault_after_in_place_updates() {
    check_policy(DedupPolicy::ChangePte, ViewKind::Uffd);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn uffd_view_range_flush_takes_one_read_fault_per_zapped_page() {
    check_policy(DedupPolicy::RangeFlush, ViewKind::Uffd);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn uffd_view_legacy_takes_the_same_faults_and_misses_every_change_pte() {
    check_policy(DedupPolicy::Legacy, ViewKind::Uffd);
}

/// Zaps the access guest's pages through the notifier at its dedup request.
fn zap_access_pages() -> MmHook {
    Box::new(|point, host| {
        if point == HookPoint::DedupRequest(1) {
            let first = guest_images::ACCESS_START >> PAGE_SHIFT;
            let range = shadow_mmu::MmuNotifierRange::new(
                first,
                first + guest_images::ACCESS_PAGES,
                shadow_mmu::MmuNotifyEvent::Clear,
                shadow_mmu::RangeFlags::BLOCKABLE,
            );
            host.invalidate_range_start(&range);
            host.invalidate_range_end(&range);
        }
        Ok(())
    })
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_access_size_page_crossings_and_fetches_see_the_right_bytes_through_faults() {
    require_kvm();
    let off = run_in_process("access", MEM, DedupPolicy::Off, ViewKind::Memslot, None);
    assert_eq!(off.guest.reports, guest_images::ACCESS_EXPECTED_REPORTS);
    for view in [ViewKind::Memslot, ViewKind::Uffd] {
        let s = run_in_process("access", MEM, DedupPolicy::RangeFlush, view, Some(zap_access_pages()));
        let ctx = view.name();
        assert_eq!(s.guest.exit_code, Some(0), "{ctx}: {}", s.guest.end.detail);
        assert_eq!(s.guest.reports, guest_images::ACCESS_EXPECTED_REPORTS, "{ctx}");
        let e = &s.phases.iter().find(|p| p.phase == 3).expect("phase 3").figures.exits;
        match view {
            // Page A faults on the first read, page B on the first access
            // that reaches it, page C on the call: KVM cannot emulate a
            // fetch from a hole, and the VMM serves it as a fetch fault.
            // D faults on the SSE load and E on the SSE store, which KVM's
            // emulator performs (it may split them into several exits).
            ViewKind::Memslot => {
                assert_eq!(e.ept_fetch, 1, "{ctx}: {e:?}");
                assert!(e.ept_read >= 3 && e.ept_write >= 1, "{ctx}: {e:?}");
            }
            // userfaultfd cannot tell a fetch from a read.
            ViewKind::Uffd => assert_eq!((e.ept_read, e.ept_write, e.ept_fetch), (4, 1, 0), "{ctx}: {e:?}"),
        }
        assert_eq!(e.mmio, 0, "{ctx}: {e:?}");
    }
}
