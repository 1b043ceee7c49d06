//! The two MMUs of a KVM host and the notifier between them, in userspace.
//!
//! | module | job | in Linux |
//! | --- | --- | --- |
//! | [`frame_pool`] | host physical memory: a memfd of page frames, its direct map, holes punched for freed frames | the page allocator, the direct map |
//! | [`memory`] | the primary MMU ([`PrimaryMmu`]): the host page table over guest RAM, frame accounting, the notifier chain, `set_pte_at_notify`, the copy-on-write break (`do_wp_page`, `wp_page_reuse`, `wp_page_copy`), `get_user_page`, KSM's pte primitives `write_protect_page`, `replace_page`, and batch protection: a soft-dirty round ([`PrimaryMmu::clear_refs_soft_dirty`]), [`PrimaryMmu::mprotect`], the soft-dirty bits pagemap reports | mm/memory.c, mm/gup.c, the pte half of mm/ksm.c, fs/proc/task_mmu.c (`clear_refs_write`, `clear_soft_dirty`, pagemap), mm/mprotect.c (`change_protection`, `can_change_pte_writable`), `struct mm_struct`, `struct page` |
//! | [`mmu_notifier`] | ranges (start, end, event, flags, new protection), the [`MmuNotifier`] trait, `MMU_NOTIFIER_USE_CHANGE_PTE` and its three legal transitions, [`MmuNotifierRange::update_to_read_only`] | include/linux/mmu_notifier.h and mm/mmu_notifier.c, with the 2019 series' flag and its `mmu_notifier_range_update_to_read_only` (Linux 5.2 to 6.2) |
//! | [`ept`] | a 4-level table in Intel EPT entry format | the EPT paging structures (Intel SDM vol. 3) |
//! | [`secondary_mmu`] | the secondary MMU ([`SecondaryMmu`]): its policies (the event-aware one downgrades a range that only loses write permission in place), the invalidation sequence protocol, batches of view updates, [`handle_ept_violation`] | arch/x86/kvm/mmu (the in-place downgrade after `kvm_tdp_mmu_wrprot_slot`), virt/kvm/kvm_main.c's notifier callbacks |
//! | [`view`] | [`EptView`], what makes the secondary table real for a vCPU (the `vmm` crate's memslot and userfaultfd backends), with a whole-range `write_protect` and a batch's hold of the guest; [`RecordingView`] for tests | the CPU walking the EPT |
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
//!   in-place update, so under the `change-pte` and `event-aware` policies
//!   the entry becomes writable on the new frame: the transition the 2019
//!   series made legal.
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
//! * **Protection per page, read-only or read-write.** [`PrimaryMmu::mprotect`]
//!   keeps the protection of each page (the one vma splits at page
//!   granularity, where Linux splits and merges vmas), knows no PROT_NONE,
//!   and changes a range inside one PROTECTION_VMA range (Linux opens one
//!   per populated PUD-sized chunk). Back to read-write it follows Linux
//!   6.2's `can_change_pte_writable` for private anonymous memory: a pte is
//!   made writable again only if its page is exclusive and soft-dirty
//!   tracking needs no write fault for it; there is no dirty bit. A write
//!   fault on a page mprotect'ed read-only fails
//!   ([`PrimaryMmuError::WriteToReadOnlyVma`]), as gup refuses FOLL_WRITE
//!   there and KVM_RUN fails with EFAULT.
//! * **Soft-dirty rounds over a range, no VM_SOFTDIRTY.**
//!   [`PrimaryMmu::clear_refs_soft_dirty`] takes a gfn range where
//!   `clear_refs` 4 covers the whole mm, skips no pte as DMA-pinned (no guest
//!   frame is pinned across a round here), and every pte starts soft-dirty,
//!   which reports what a new vma's VM_SOFTDIRTY does until the first round.
//! * **A KSM merge keeps the soft-dirty bit.** Linux's `replace_page` builds
//!   the new pte with `mk_pte(kpage, vma->vm_page_prot)`, which drops it, so
//!   a page written since the last round and merged before the next reads
//!   as unwritten in pagemap; here [`PrimaryMmu::replace_page`] keeps it (the
//!   merge does not change what the page holds).
//! * **Which ranges "only remove write".** Linux's
//!   `mmu_notifier_range_update_to_read_only` (5.2 to 6.2, never used) was
//!   true for any PROTECTION_VMA range whose vma kept VM_READ, an mprotect
//!   back to read-write included, and never for SOFT_DIRTY;
//!   [`MmuNotifierRange::update_to_read_only`] is true for SOFT_DIRTY and for
//!   PROTECTION_VMA to read-only only, from the new protection the range
//!   carries (Linux passed the `vma`). The event-aware policy also leaves
//!   its entries alone on an mprotect back to read-write
//!   ([`MmuNotifierRange::update_adds_write`]), which no Linux secondary MMU
//!   does (KVM zaps every range, whatever its event).
//! * **Batches of ranges.** [`PrimaryMmu::batch_start`] and
//!   [`PrimaryMmu::batch_end`] bracket the ranges of one ksmd slice or one
//!   synchronous pass, and tell every subscriber
//!   ([`MmuNotifier::batch_start`]). Linux has no such callback: KVM
//!   batches only within a range (`kvm_mmu_notifier_invalidate_range_start`
//!   zaps every spte of the range and flushes remote TLBs once for it;
//!   `invalidate_range_end` lets faults in again). Here a view update is a
//!   system call, far dearer than a TLB flush, so the secondary MMU keeps
//!   its table exact at every step, as KVM does, but defers its view's
//!   updates to the batch's end and makes them one call per run of
//!   neighbouring pages, with the guest held out meanwhile
//!   ([`EptView::batch_start`]); only the batch owner's changes wait, a
//!   fault served on another thread updates the view at once.
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
//!
//! // A soft-dirty round: one SOFT_DIRTY range, no change_pte; change-pte
//! // zaps it, as KVM does (event-aware would downgrade in place).
//! assert_eq!(host.lock().unwrap().clear_refs_soft_dirty(16, 64).unwrap(), 47);
//! assert_eq!(mmu.lock().unwrap().stats().zapped, 48);
//! // Page 30's next write reuses its frame and marks it soft-dirty.
//! let pte = handle_ept_violation(&host, &mmu, 30, Access::Write).unwrap();
//! assert_eq!((pte.pfn, pte.soft_dirty), (30, true));
//! assert_eq!(host.lock().unwrap().soft_dirty_pages(16, 64).unwrap(), [30]);
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
pub use memory::{FrameInfo, FrameStats, FrameTable, Frames, MmBatch, PrimaryMmu, PrimaryMmuError, Pte};
pub use mmu_notifier::{Gfn, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, Protection, RangeFlags};
pub use secondary_mmu::{handle_ept_violation, Access, FaultError, MmuStats, Policy, SecondaryMmu};
pub use stack::{FleetLayout, GuestAccessError, GuestMmus};
pub use view::{EptView, RecordingView};
