//! The two MMUs of a KVM host and the notifier between them, in userspace.
//!
//! | module | job | in Linux |
//! | --- | --- | --- |
//! | [`frame_pool`] | host physical memory: a memfd of page frames, its direct map, holes punched for freed frames | the page allocator, the direct map |
//! | [`memory`] | the primary MMU ([`PrimaryMmu`]): the host page table over guest RAM, frame accounting, the notifier chain, `set_pte_at_notify`, the copy-on-write break (`do_wp_page`, `wp_page_copy`), `get_user_page`, and KSM's pte primitives `write_protect_page`, `replace_page` | mm/memory.c, mm/gup.c, the pte half of mm/ksm.c, `struct mm_struct`, `struct page` |
//! | [`mmu_notifier`] | ranges (start, end, event, flags), the [`MmuNotifier`] trait, `MMU_NOTIFIER_USE_CHANGE_PTE` and its three legal transitions | include/linux/mmu_notifier.h, with the 2019 series' flag |
//! | [`ept`] | a 4-level table in Intel EPT entry format | the EPT paging structures (Intel SDM vol. 3) |
//! | [`secondary_mmu`] | the secondary MMU ([`SecondaryMmu`]): its policies, the invalidation sequence protocol, [`handle_ept_violation`] | arch/x86/kvm/mmu, virt/kvm/kvm_main.c's notifier callbacks |
//! | [`view`] | [`EptView`], what makes the secondary table real for a vCPU (the `vmm` crate's memslot and userfaultfd backends); [`RecordingView`] for tests | the CPU walking the EPT |
//! | [`stack`] | [`GuestMmus`]: a frame pool with both MMUs wired together, and guest accesses through the secondary MMU, as the VMM and the tests build them | a VM's memory under KVM |
//!
//! # Deliberate differences from Linux
//!
//! * **A fixed frame pool.** Linux allocates a page for every copy-on-write
//!   break; here the frames are a memfd sized once, with one spare frame past
//!   guest RAM ([`PrimaryMmu::new`]). Guest pages map at most as many distinct
//!   frames as there are guest pages, so one spare guarantees that a copy
//!   always finds a free frame; and a fixed memfd is what makes the memory a
//!   merge saves measurable (its allocated blocks).
//! * **Freeing a frame gives it back to the host, in batches.** Linux frees
//!   into its page allocator at once; here a freed frame waits until
//!   [`PrimaryMmu::flush_holes`] punches one hole per run of contiguous
//!   frames (a hole costs about 5 us here), so that saved memory is really
//!   returned to the host without a system call per frame.
//! * **One "vma", always present.** The primary MMU covers one range, guest
//!   RAM, and has no swap or migration, so its ptes are always present: the
//!   prototype is about the pte transitions of KSM and copy-on-write, which
//!   need nothing more.
//! * **One lock.** The pte lock and the mmap lock are the one `Mutex` the
//!   primary MMU lives in, and the secondary MMU's `mmu_lock` is its own
//!   `Mutex`: the lock order (primary, then secondary) is simpler to keep
//!   than Linux's finer locking, and the tests race faults against merges
//!   through exactly these locks.
//! * **Ranges in guest frame numbers.** Linux's notifier ranges are host
//!   virtual addresses of the VMM's mapping, which KVM turns into gfns
//!   through its memslots. Guest RAM is one linear mapping here, so ranges
//!   are given in gfns directly, end exclusive.
//! * **`change_pte` may make an entry writable.** KVM's `change_pte`
//!   handler never maps a writable pte (it zaps instead). For the RO -> RW
//!   transition of a copy-on-write break the USE_CHANGE_PTE flag allows the
//!   in-place update, so under the `change-pte` policy the entry becomes
//!   writable on the new frame: the transition the 2019 series made legal.
//! * **A fault retries while any invalidation is in progress.** The
//!   sequence check is `mmu_invalidate_retry` of include/linux/kvm_host.h,
//!   not x86's finer `mmu_invalidate_retry_gfn`, which lets a fault outside
//!   the invalidated range through: the secondary MMU keeps no record of
//!   which ranges are being invalidated, an invalidation lasts one call
//!   under the primary MMU's lock, and every retry is counted
//!   (`fault_retries`), so its cost shows.
//! * **The secondary MMU starts pre-faulted.** It maps every guest page as
//!   the host does at creation ([`SecondaryMmu::new_prefaulted`], as
//!   KVM_PRE_FAULT_MEMORY would), where KVM fills its table lazily: the
//!   secondary-MMU faults a run counts are then those the policies cause,
//!   not a first touch of every page.
//! * **EPT tables in an arena.** A non-leaf EPT entry's frame field holds
//!   the index of the next table in the table's own arena, where hardware
//!   holds the physical address of the next table; only 4 KiB leaves are
//!   used (as KVM does for memory it may deduplicate). No CPU walks this
//!   table: the view makes it real.
//! * **A modelled guest access holds the secondary MMU's lock.**
//!   [`GuestMmus::guest_read`] and [`GuestMmus::guest_write`] walk the EPT
//!   and touch the frame under the secondary MMU's lock, as hardware's walk
//!   cannot overlap an invalidation (the TLB flush waits for the access in
//!   flight); on KVM the view gives the vCPU's accesses the same guarantee.
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
