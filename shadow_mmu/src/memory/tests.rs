//! Unit tests of the primary MMU: its start state, the notifier order of a
//! merge and a copy-on-write break, frame accounting, and what it refuses.

use std::sync::{Arc, Mutex};

use super::*;
use crate::frame_pool::{FramePool, PAGE_SHIFT, PAGE_SIZE};
use crate::mmu_notifier::{Gfn, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, RangeFlags};

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
    let pool = Arc::new(FramePool::new(pages * PAGE_SIZE).expect("pool"));
    let mut mm = PrimaryMmu::new(pool, 2, pages);
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
    assert_eq!(mm.pte(5).expect("pte"), Pte { pfn: 5, writable: true });
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
    assert_eq!(pte, Pte { pfn: 5, writable: true });
    assert_eq!(taken(&log), vec!["start 5..6 Clear cp=true", "change_pte 5 -> 5 rw", "end 5..6"]);
    let mut buf = [0u8; 4];
    mm.read_guest(5 << PAGE_SHIFT, &mut buf).expect("read");
    assert_eq!(&buf, b"same");
    // Page 4 is now alone on its frame and not KSM: reused, no notifier.
    assert_eq!(mm.get_user_page(4, true).expect("reuse"), Pte { pfn: 4, writable: true });
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
        (Pte { pfn: 5, writable: false }, true), // RW -> RO other frame
        (Pte { pfn: 4, writable: true }, true),  // RW -> RW same frame
        (Pte { pfn: 5, writable: true }, true),  // RW -> RW other frame
    ];
    for (new, _) in cases {
        assert!(matches!(mm.set_pte_at_notify(&flagged, 4, new), Err(PrimaryMmuError::IllegalChangePte(_))), "{new:?}");
    }
    mm.write_protect_page(4).expect("wp");
    taken(&log);
    let ro_same = Pte { pfn: 4, writable: false };
    assert!(matches!(mm.set_pte_at_notify(&flagged, 4, ro_same), Err(PrimaryMmuError::IllegalChangePte(_))));
    assert!(taken(&log).is_empty(), "a refused change notifies nobody");
    assert_eq!(mm.pte(4).expect("pte"), Pte { pfn: 4, writable: false });
    // Without the flag the same change is allowed (a secondary MMU must zap).
    let plain = MmuNotifierRange::page(4, MmuNotifyEvent::ProtectionPage, RangeFlags::empty());
    assert!(mm.set_pte_at_notify(&plain, 4, Pte { pfn: 4, writable: true }).is_ok());
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
