//! The userfaultfd view: one KVM memslot over a window W of host virtual
//! memory whose pages are mapped, one by one, to frames of the frame pool,
//! and a userfaultfd that turns the guest's accesses to pages the secondary
//! table does not allow into events served by a thread of the VMM. The
//! vCPU never leaves KVM_RUN for them: it waits inside the kernel's fault
//! path (get_user_pages on the vCPU thread) until the VMM resolves the
//! fault, as a postcopy-migrating guest does under QEMU or a snapshot-
//! restored one under Firecracker's userfaultfd page server.
//!
//! # The mechanism
//!
//! Guest page `gfn` lives at `W + (gfn - first_gfn) * 4096`, a `MAP_SHARED`
//! mapping of the pool's memfd at the offset of the frame it reaches now.
//! At the start W is one mapping of the frames `[first_gfn, end_gfn)`
//! (identity), its resident frames populated, and not registered: the
//! secondary MMU maps every page writable to that frame, so nothing needs
//! to reach the VMM, and the guest's first touch of a frame that is still a
//! memfd hole faults inside the host kernel, which allocates it (as KVM's
//! own first touch does on hardware). W is registered with
//! `UFFDIO_REGISTER_MODE_MISSING | MINOR | WP` (UFFDIO_API features
//! MINOR_SHMEM and WP_HUGETLBFS_SHMEM; WP_UNPOPULATED where offered) lazily,
//! a 2 MiB chunk at a time, before the view first restricts a page of the
//! chunk (zaps it, write-protects it or maps another frame there): a page of
//! an unregistered chunk is always what the secondary MMU maps. The
//! secondary MMU drives W through [`shadow_mmu::EptView`]:
//!
//! * `zap` is `MADV_DONTNEED` on W: the memfd keeps the data, the ptes go,
//!   and the next access raises a MINOR fault (MISSING when the frame has
//!   been punched meanwhile: see below).
//! * `map` of the frame W's page already maps is `UFFDIO_CONTINUE` if the
//!   page was zapped (with `UFFDIO_CONTINUE_MODE_WP` when read-only), else
//!   `UFFDIO_WRITEPROTECT` to set or clear the protection. Both wake the
//!   vCPU blocked on the page (setting write protection does not, nor is it
//!   needed).
//! * `map` of another frame replaces W's page with
//!   `mmap(MAP_FIXED | MAP_SHARED, memfd, pfn * 4096)`, registers the fresh
//!   (unregistered) mapping again, and CONTINUEs it so it is present at
//!   once. Neighbouring pages whose offsets are contiguous again merge back
//!   into one VMA; the others count against `vm.max_map_count`. The vCPU is
//!   kept out of KVM_RUN meanwhile ([`crate::vcpu_gate`]).
//!
//! Inside a batch of the secondary MMU's updates (`EptView::batch_start`)
//! the vCPU is held out of KVM_RUN throughout, and the batch's remaps wait
//! for its end: one mmap per run of neighbouring pages onto neighbouring
//! frames, readable and writable at once (the read-only step below guards a
//! running vCPU), one UFFDIO_REGISTER per run of neighbouring pages, one
//! UFFDIO_CONTINUE per run of one mapping and access. A merge pass maps a
//! run of pages onto a run of KSM pages wherever the pages it merges with
//! lie in the same order (a guest's duplicated buffers; a fleet's guests
//! sharing an image), and then costs a fraction of a remap per page.
//!
//! A batch also tells the view where the host pages it zapped now lie
//! (`EptView::host_pages_moved`: a merge moved them onto KSM pages). W's
//! page is pointed there at the batch's end and left absent, as in Linux
//! the host mapping under a memslot already maps the KSM page when KVM
//! next faults; the fault then only CONTINUEs it. A remap during the fault
//! instead would make the host KVM retry it: its mmu notifier sees W
//! change under the fault in flight, and the guest takes one more exit.
//!
//! The fault thread ([`UffdFaultThread`]) reads the events and calls the
//! VMM's EPT-violation handler, which updates the secondary MMU, which calls
//! [`map`](shadow_mmu::EptView::map) on the same view. Between events it
//! polls for [`FAULT_SPIN`], yielding its CPU to anything runnable, then
//! blocks in poll(2) ([`FaultWait::Adaptive`]): waking a blocked thread costs
//! a fault about a third of its time on the development machines (74 us
//! against 48 us), and faults come in bursts.
//!
//! # The deferred wake
//!
//! While the thread serves a page, view operations on that page do not
//! wake its waiters (CONTINUE and unprotection with DONTWAKE, no
//! UFFDIO_WAKE): the thread wakes the vCPU with `UFFDIO_WAKE` once the
//! handler has returned, so the vCPU never runs ahead of the handler's
//! accounting (a copy-on-write break's `change_pte` maps the page writable
//! before the handler's retry and install, and a vCPU woken then would be
//! counted in a phase that has already ended). A fault whose handler
//! resolved nothing (the entry was already right) is woken the same way,
//! and the vCPU retries its access.
//!
//! # Pitfalls (../shared/host-facts.md)
//!
//! * A plain CONTINUE silently drops write protection: a page both
//!   write-protected and zapped raises MINOR on the next read, and is
//!   CONTINUEd with `UFFDIO_CONTINUE_MODE_WP` (Linux 6.6) when read-only.
//! * CONTINUE of a page already present fails with EEXIST: the view then
//!   sets the protection explicitly and wakes.
//! * MISSING is registered as well as MINOR: MINOR fires only when the
//!   memfd page exists, so without MISSING a zapped page whose frame was
//!   then returned to the host (hole punched) would be silently refilled
//!   with a fresh zero page on the guest's next touch, with no event at all.
//!   CONTINUE of a hole fails with EFAULT: the view allocates the frame
//!   through the direct map and CONTINUEs again.
//! * A read-only remap is created `PROT_READ` and made `PROT_READ |
//!   PROT_WRITE` only once it is registered and write-protected by
//!   userfaultfd: until it is registered the fresh mapping is invisible to
//!   userfaultfd, and a vCPU touching it in that window must not get a
//!   writable pte to a frame that may be shared (a write then fails
//!   KVM_RUN with EFAULT instead of silently changing a KSM page).
//! * W's resident frames are populated before it is registered, and
//!   nobody but KVM (a vCPU) ever touches W: the VMM, the loader and the
//!   deduplicator read and write frames through the pool's direct map,
//!   which is not registered, so no VMM thread can block on its own userfaultfd (in particular not the
//!   fault thread, which would deadlock).
//! * The userfaultfd must catch kernel-mode faults (KVM's get_user_pages):
//!   it is opened without `UFFD_USER_MODE_ONLY`, through /dev/userfaultfd
//!   when the system call refuses that.
//! * Every page remapped away from its neighbours is a VMA of its own:
//!   ENOMEM there is [`crate::view::ViewError::MapLimit`]. Registration
//!   by chunks adds at most one VMA per chunk (2 MiB).
//! * A hole in a registered chunk is a MISSING fault on the guest's first
//!   touch, served in userspace as the host's own fault
//!   (`view_host_faults`); in an unregistered chunk the kernel serves it.
//!
//! # Files
//!
//! `abi.rs` the kernel ABI, `userfaultfd.rs` the descriptor and its safe
//! ioctls, `window.rs` W's mappings, `chunks.rs` which chunks of W are
//! registered, `view.rs` [`UffdView`], `shared.rs`
//! the per-page state view and thread share, `fault_thread.rs`
//! [`UffdFaultThread`].

mod abi;
mod bare;
mod chunks;
mod fault_thread;
mod held;
mod shared;
mod userfaultfd;
mod view;
mod window;

pub use bare::{bare_view_costs, BareViewCosts};
pub use fault_thread::{FaultHandlerError, FaultThreadError, UffdFaultHandler, UffdFaultSource, UffdFaultThread};
pub use shared::{FaultWait, FAULT_SPIN};
pub use view::UffdView;
