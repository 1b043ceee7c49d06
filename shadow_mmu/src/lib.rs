//! The two MMUs of a KVM host and the notifier between them, in userspace.
//!
//! * [`frame_pool`]: host physical memory, a memfd of page frames.
//! * [`memory`]: the primary MMU, the host page table over guest RAM, after
//!   mm/memory.c (`set_pte_at_notify`, `wp_page_copy`, and the pte
//!   primitives of mm/ksm.c: `write_protect_page`, `replace_page`).
//! * [`mmu_notifier`]: include/linux/mmu_notifier.h, with
//!   `MMU_NOTIFIER_USE_CHANGE_PTE` and its three legal transitions.
//! * [`ept`]: a 4-level table in Intel EPT entry format.
//! * [`secondary_mmu`]: the secondary MMU after arch/x86/kvm/mmu, its policies and
//!   the EPT-violation handler.
//! * [`stack`]: a frame pool with both MMUs wired together, as the VMM
//!   and the tests build them.
//! * [`view`]: the interface to what makes the secondary table real for a
//!   vCPU (the `vmm` crate's memslot and userfaultfd backends).
//!
//! Nothing here opens `/dev/kvm`.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use shadow_mmu::{FramePool, PrimaryMmu, SecondaryMmu, Policy, RecordingView, Access, handle_ept_violation};
//!
//! let pool = Arc::new(FramePool::new(65 * 4096).unwrap());
//! let mut host = PrimaryMmu::new(pool, 16, 64); // guest pages 16..64, one spare frame
//! let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(Policy::ChangePte, RecordingView::default(), &host)));
//! host.mmu_notifier_register(mmu.clone());
//! let host = Mutex::new(host);
//!
//! // KSM merges page 21 into page 20's frame: in place under change-pte.
//! host.lock().unwrap().write_protect_page(20).unwrap();
//! host.lock().unwrap().write_protect_page(21).unwrap();
//! host.lock().unwrap().replace_page(21, 20).unwrap();
//! assert_eq!(mmu.lock().unwrap().stats().change_pte_applied, 3);
//! assert_eq!(mmu.lock().unwrap().ept().lookup(21).unwrap().pfn(), 20);
//!
//! // A guest write to page 21 breaks copy-on-write through the handler.
//! let pte = handle_ept_violation(&host, &mmu, 21, Access::Write).unwrap();
//! assert!(pte.writable && pte.pfn != 20);
//! ```

pub mod ept;
pub mod frame_pool;
pub mod memory;
pub mod mmu_notifier;
pub mod secondary_mmu;
pub mod stack;
pub mod view;

/// Locks a mutex, ignoring poisoning, so that a run can still end and report
/// after a thread panicked while holding it. The data may then be half
/// updated: the threads that hold these locks while serving a guest (ksmd,
/// the VMM's userfaultfd fault thread) catch their panics and end the run,
/// so the guest does not go on reading through it.
pub fn lock<T: ?Sized>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub use frame_pool::{FramePool, FramePoolError, Pfn, PAGE_SHIFT, PAGE_SIZE};
pub use memory::{PrimaryMmu, PrimaryMmuError, Pte};
pub use mmu_notifier::{Gfn, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, RangeFlags};
pub use secondary_mmu::{handle_ept_violation, Access, FaultError, MmuStats, Policy, SecondaryMmu};
pub use stack::{GuestAccessError, GuestMmus};
pub use view::{EptView, RecordingView};
