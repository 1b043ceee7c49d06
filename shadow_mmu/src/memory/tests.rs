//! Unit tests of the primary MMU: its start state, the notifier order of a
//! merge and a copy-on-write break, frame accounting, and what it refuses.

use std::sync::{Arc, Mutex};

use super::*;
use crate::frame_pool::{FramePool, PAGE_SHIFT, PAGE_SIZE};
use crate::mmu_notifier::{
    Gfn, IllegalChangePte, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, Protection, RangeFlags,
};

#[derive(Default)]
struct Log(Vec<String>);

impl MmuNotifier for Log {
    fn invalidate_range_start(&mut self, r: &MmuNotifierRange) {
        self.0.push(format!("start {}..{} {:?} cp={}", r.start, r.end, r.event, r.use_change_pte()));
    }
    fn invalidate_range_end(&mut self, r: &MmuNotifierRange) {
        self.0.push(format!("end {}..{}", r.start, r.end));
    }
    fn change_pte(&mut self, gfn: Gfn, pte: Pte) {
        self.0.push(format!("change_pte {gfn} -> {} {}", pte.pfn, if pte.writable { "rw" } else { "ro" }));
    }
}

fn mm(pages: u64) -> (PrimaryMmu, Arc<Mutex<Log>>) {
    mm_with_spare(pages, 0)
}

/// Guest pages 2..`end` over a pool with `spare` free frames past them.
fn mm_with_spare(end: u64, spare: u64) -> (PrimaryMmu, Arc<Mutex<Log>>) {
    let pool = Arc::new(FramePool::new((end + spare) * PAGE_SIZE).expect("pool"));
    let mut mm = PrimaryMmu::new(pool, 2, end);
    let log = Arc::new(Mutex::new(Log::default()));
    mm.mmu_notifier_register(log.clone());
    (mm, log)
}

fn taken(log: &Arc<Mutex<Log>>) -> Vec<String> {
    std::mem::take(&mut log.lock().expect("log").0)
}

#[test]
fn starts_identity_mapped_and_writable() {
    let (mm, _) = mm(8);
    assert_eq!(mm.guest_range(), (2, 8));
    assert_eq!(mm.pte(5).expect("pte"), Pte { pfn: 5, writable: true, soft_dirty: true });
    assert_eq!(mm.frame(5), FrameInfo { refcount: 1, mapcount: 1, ..FrameInfo::default() });
    assert_eq!(mm.frame(1), FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() });
    assert!(matches!(mm.pte(1), Err(PrimaryMmuError::NotGuestRam(1))));
}

#[test]
fn merge_then_cow_goes_through_the_notifier_in_linux_order() {
    let (mut mm, log) = mm(8);
    mm.write_guest(4 << PAGE_SHIFT, b"same").expect("write");
    mm.write_guest(5 << PAGE_SHIFT, b"same").expect("write");
    mm.write_protect_page(4).expect("wp");
    mm.write_protect_page(5).expect("wp");
    mm.replace_page(5, 4).expect("replace");
    assert_eq!(
        taken(&log),
        vec![
            "start 4..5 Clear cp=true",
            "change_pte 4 -> 4 ro",
            "end 4..5",
            "start 5..6 Clear cp=true",
            "change_pte 5 -> 5 ro",
            "end 5..6",
            "start 5..6 Clear cp=true",
            "change_pte 5 -> 4 ro",
            "end 5..6",
        ]
    );
    assert_eq!(mm.frame(4).mapcount, 2);
    assert_eq!(mm.frame(5).refcount, 0, "the replaced frame is freed");
    assert_eq!(mm.nr_free_frames(), 1);
    // A write to the shared frame copies it into the freed one.
    let pte = mm.get_user_page(5, true).expect("cow");
    assert_eq!(pte, Pte { pfn: 5, writable: true, soft_dirty: true });
    assert_eq!(taken(&log), vec!["start 5..6 Clear cp=true", "change_pte 5 -> 5 rw", "end 5..6"]);
    let mut buf = [0u8; 4];
    mm.read_guest(5 << PAGE_SHIFT, &mut buf).expect("read");
    assert_eq!(&buf, b"same");
    // Page 4 is now alone on its frame and not KSM: reused, no notifier.
    assert_eq!(mm.get_user_page(4, true).expect("reuse"), Pte { pfn: 4, writable: true, soft_dirty: true });
    assert!(taken(&log).is_empty());
    assert_eq!((mm.stats().cow_copies, mm.stats().cow_reuses), (1, 1));
}

#[test]
fn ksm_frames_are_copied_even_when_mapped_once() {
    let pool = Arc::new(FramePool::new(9 * PAGE_SIZE).expect("pool"));
    let mut mm = PrimaryMmu::new(pool, 2, 8); // one spare frame: 8
    assert_eq!(mm.nr_free_frames(), 1);
    mm.write_protect_page(3).expect("wp");
    mm.set_ksm(3, true);
    mm.write_protect_page(4).expect("wp");
    mm.replace_page(4, 3).expect("replace"); // frees frame 4 (hole not punched yet)
    assert_eq!(mm.get_user_page(4, true).expect("cow").pfn, 8, "the spare frame is taken first");
    assert_eq!(mm.frame(3).mapcount, 1);
    // Every frame is mapped or pending; the copy flushes the pending
    // hole and takes that frame, so it still succeeds.
    assert_eq!(mm.get_user_page(3, true).expect("cow").pfn, 4, "a KSM page is never reused");
    assert_eq!(mm.frame(3).refcount, 0);
    assert_eq!(mm.nr_free_frames(), 1);
    mm.flush_holes().expect("flush");
    // Only the two copies hold memory: the freed KSM frame was punched.
    assert_eq!(mm.pool().resident_bytes().expect("stat"), 2 * PAGE_SIZE);
}

#[test]
fn illegal_use_change_pte_transitions_are_refused_and_nothing_changes() {
    let (mut mm, log) = mm(8);
    let flagged = MmuNotifierRange::page(4, MmuNotifyEvent::Clear, RangeFlags::USE_CHANGE_PTE);
    let cases = [
        (Pte { pfn: 5, writable: false, soft_dirty: true }, true), // RW -> RO other frame
        (Pte { pfn: 4, writable: true, soft_dirty: true }, true),  // RW -> RW same frame
        (Pte { pfn: 5, writable: true, soft_dirty: true }, true),  // RW -> RW other frame
    ];
    for (new, _) in cases {
        assert!(matches!(mm.set_pte_at_notify(&flagged, 4, new), Err(PrimaryMmuError::IllegalChangePte(_))), "{new:?}");
    }
    mm.write_protect_page(4).expect("wp");
    taken(&log);
    let ro_same = Pte { pfn: 4, writable: false, soft_dirty: true };
    assert!(matches!(mm.set_pte_at_notify(&flagged, 4, ro_same), Err(PrimaryMmuError::IllegalChangePte(_))));
    assert!(taken(&log).is_empty(), "a refused change notifies nobody");
    assert_eq!(mm.pte(4).expect("pte"), Pte { pfn: 4, writable: false, soft_dirty: true });
    // Without the flag the same change is allowed (a secondary MMU must zap).
    let plain = MmuNotifierRange::page(4, MmuNotifyEvent::ProtectionPage, RangeFlags::empty());
    assert!(mm.set_pte_at_notify(&plain, 4, Pte { pfn: 4, writable: true, soft_dirty: true }).is_ok());
    // And a change outside its range is refused.
    assert!(matches!(mm.set_pte_at_notify(&plain, 5, ro_same), Err(PrimaryMmuError::OutsideRange { .. })));
}

#[test]
fn the_vmm_cannot_write_through_a_read_only_pte() {
    let (mut mm, _) = mm(8);
    mm.write_protect_page(6).expect("wp");
    assert!(matches!(mm.write_guest((6 << PAGE_SHIFT) + 4094, b"xyz"), Err(PrimaryMmuError::ReadOnly(6))));
    // Boot memory below the guest range is written directly.
    assert!(mm.write_guest(0x1000, b"gdt").is_ok());
}

#[test]
fn a_soft_dirty_round_is_one_range_without_change_pte_and_a_write_reuses_the_frame() {
    let (mut mm, log) = mm(8);
    mm.write_protect_page(3).expect("wp");
    taken(&log);
    let before = mm.stats();
    assert_eq!(mm.nr_soft_dirty(2, 8).expect("range"), 6, "every page is soft-dirty before the first round");
    assert_eq!(mm.clear_refs_soft_dirty(2, 8).expect("round"), 5, "page 3 was read-only already");
    assert_eq!(taken(&log), vec!["start 2..8 SoftDirty cp=false", "end 2..8"]);
    for gfn in 2..8 {
        assert_eq!(mm.pte(gfn).expect("pte"), Pte { pfn: gfn, writable: false, soft_dirty: false }, "gfn {gfn}");
    }
    let after = mm.stats();
    assert_eq!((after.soft_dirty_rounds, after.batch_wrprotected), (1, 5));
    assert_eq!(after.notifier_ranges - before.notifier_ranges, 1);
    assert_eq!(after.change_pte_calls, before.change_pte_calls, "no set_pte_at_notify");
    assert_eq!(mm.nr_soft_dirty(2, 8).expect("range"), 0);

    // The write fault: same frame, writable and soft-dirty again, no notifier.
    assert_eq!(mm.get_user_page(4, true).expect("fault"), Pte { pfn: 4, writable: true, soft_dirty: true });
    assert!(taken(&log).is_empty());
    assert_eq!((mm.stats().cow_reuses, mm.stats().cow_copies), (1, 0));
    // A read fault changes nothing.
    assert_eq!(mm.get_user_page(5, false).expect("read"), Pte { pfn: 5, writable: false, soft_dirty: false });
    assert_eq!(mm.soft_dirty_pages(2, 8).expect("range"), vec![4]);
    assert_eq!(mm.soft_dirty_pages(5, 8).expect("range"), Vec::<Gfn>::new());
}

#[test]
fn after_a_round_a_shared_or_ksm_frame_is_still_copied_on_write() {
    let (mut mm, log) = mm_with_spare(9, 1);
    mm.clear_refs_soft_dirty(2, 9).expect("round");
    // Pages 5 and 6 merged onto KSM frame 5; page 7 alone on KSM frame 7.
    mm.replace_page(6, 5).expect("replace");
    mm.set_ksm(5, true);
    mm.set_ksm(7, true);
    taken(&log);
    let shared = mm.get_user_page(6, true).expect("cow");
    assert!(shared.writable && shared.soft_dirty && shared.pfn != 5, "{shared:?}");
    let ksm = mm.get_user_page(7, true).expect("cow");
    assert!(ksm.writable && ksm.soft_dirty && ksm.pfn != 7, "a KSM page is never reused: {ksm:?}");
    assert_eq!(mm.stats().cow_copies, 2);
    assert_eq!(mm.soft_dirty_pages(2, 9).expect("range"), vec![6, 7]);
    let log = taken(&log);
    assert_eq!(log.len(), 6, "two copies, each in its own flagged CLEAR range: {log:?}");
}

#[test]
fn a_merge_keeps_the_soft_dirty_bit() {
    let (mut mm, _) = mm(8);
    mm.clear_refs_soft_dirty(2, 8).expect("round");
    mm.get_user_page(4, true).expect("write");
    mm.write_protect_page(4).expect("wp");
    mm.replace_page(4, 5).expect("replace");
    // Deliberate difference: Linux's replace_page builds a pte without it.
    assert_eq!(mm.pte(4).expect("pte"), Pte { pfn: 5, writable: false, soft_dirty: true });
    mm.replace_page(6, 5).expect("replace");
    assert_eq!(mm.soft_dirty_pages(2, 8).expect("range"), vec![4]);
}

#[test]
fn mprotect_read_only_refuses_write_faults_and_back_to_read_write_follows_can_change_pte_writable() {
    let (mut mm, log) = mm_with_spare(8, 1);
    mm.write_protect_page(4).expect("wp");
    mm.set_ksm(4, true);
    taken(&log);
    assert_eq!(mm.mprotect(3, 6, false).expect("mprotect"), 2, "3 and 5; 4 was read-only");
    assert_eq!(taken(&log), vec!["start 3..6 ProtectionVma cp=false", "end 3..6"]);
    assert!(!mm.vma_writable(3).expect("gfn") && mm.vma_writable(2).expect("gfn"));
    assert!(matches!(mm.get_user_page(3, true), Err(PrimaryMmuError::WriteToReadOnlyVma(3))));
    assert!(matches!(mm.get_user_page(4, true), Err(PrimaryMmuError::WriteToReadOnlyVma(4))));
    assert_eq!(mm.get_user_page(3, false).expect("read"), Pte { pfn: 3, writable: false, soft_dirty: true });
    assert!(mm.get_user_page(2, true).expect("outside").writable);
    assert_eq!(mm.stats().batch_wrprotected, 2);

    // Back to read-write: the exclusive pages are writable again at once;
    // the KSM page stays read-only and its next write copies.
    assert_eq!(mm.mprotect(3, 6, true).expect("mprotect"), 2);
    assert_eq!(taken(&log), vec!["start 3..6 ProtectionVma cp=false", "end 3..6"]);
    assert!(mm.pte(3).expect("pte").writable && mm.pte(5).expect("pte").writable);
    assert!(!mm.pte(4).expect("pte").writable);
    assert_ne!(mm.get_user_page(4, true).expect("cow").pfn, 4);
}

#[test]
fn after_a_round_mprotect_back_to_read_write_leaves_unwritten_pages_read_only() {
    let (mut mm, _) = mm(8);
    mm.clear_refs_soft_dirty(2, 8).expect("round");
    mm.get_user_page(3, true).expect("write");
    assert_eq!(mm.mprotect(2, 8, false).expect("mprotect"), 1);
    assert_eq!(mm.mprotect(2, 8, true).expect("mprotect"), 1, "only the page written since the round");
    assert!(mm.pte(3).expect("pte").writable);
    for gfn in [2, 4, 5, 6, 7] {
        assert!(!mm.pte(gfn).expect("pte").writable, "gfn {gfn}: soft-dirty tracking needs its write fault");
    }
    // Which that write fault then takes, on the same frame.
    assert_eq!(mm.get_user_page(5, true).expect("write"), Pte { pfn: 5, writable: true, soft_dirty: true });
}

#[test]
fn batch_updates_refuse_ranges_outside_guest_ram_and_announce_nothing_for_empty_ones() {
    let (mut mm, log) = mm(8);
    assert!(matches!(mm.clear_refs_soft_dirty(1, 5), Err(PrimaryMmuError::BadRange { start: 1, end: 5 })));
    assert!(matches!(mm.mprotect(5, 4, false), Err(PrimaryMmuError::BadRange { .. })));
    assert!(matches!(mm.mprotect(2, 9, false), Err(PrimaryMmuError::BadRange { .. })));
    assert!(matches!(mm.soft_dirty_pages(0, 3), Err(PrimaryMmuError::BadRange { .. })));
    assert_eq!(mm.mprotect(4, 4, false).expect("empty"), 0);
    assert_eq!(mm.clear_refs_soft_dirty(4, 4).expect("empty"), 0);
    assert!(taken(&log).is_empty());
    assert!(mm.pte(4).expect("pte").writable);
}

#[test]
fn use_change_pte_on_a_range_that_only_removes_write_is_refused() {
    let (mut mm, log) = mm(8);
    for event in [MmuNotifyEvent::SoftDirty, MmuNotifyEvent::ProtectionVma] {
        let mut range = MmuNotifierRange::protection(2, 8, event, Protection::ReadOnly);
        range.flags = range.flags | RangeFlags::USE_CHANGE_PTE;
        // RW -> RO on the same frame: legal on a KSM step's range, not here.
        let ro = Pte { pfn: 4, writable: false, soft_dirty: true };
        let refused = mm.set_pte_at_notify(&range, 4, ro);
        assert!(
            matches!(
                refused,
                Err(PrimaryMmuError::IllegalChangePte(IllegalChangePte::BatchRange { start: 2, end: 8, .. }))
            ),
            "{event:?}: {refused:?}"
        );
        assert!(taken(&log).is_empty(), "a refused change notifies nobody");
        assert!(mm.pte(4).expect("pte").writable);
    }
}
