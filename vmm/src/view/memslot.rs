//! The memslot view: each run of guest pages that map contiguous frames
//! with the same access becomes one KVM memslot pointing into the frame
//! pool's direct map; absent pages are holes (the guest's access comes back
//! as KVM_EXIT_MMIO with its gpa) and read-only runs are KVM_MEM_READONLY
//! slots (a write comes back as KVM_EXIT_MMIO, already retired).
//!
//! While nothing is deduplicated every guest page maps its own frame, so the
//! whole guest range is one writable slot.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use shadow_mmu::{FramePool, PAGE_SHIFT};

use super::{EptView, ViewError, ViewKind};
use crate::stats::Counters;

/// KVM memslot ids used by the VMM outside any view.
pub const BOOT_SLOT: u32 = 0;
const FIRST_VIEW_SLOT: u32 = 1;

/// The memslot backend.
#[derive(Debug)]
pub struct MemslotView {
    slots_in_use: u64,
    slot_changes: u64,
}

/// Installs a memslot `slot` for guest-physical [gpa, gpa + size) backed by
/// frames starting at `first_pfn`.
pub fn set_memslot(
    vm: &VmFd,
    pool: &FramePool,
    slot: u32,
    gpa: u64,
    size: u64,
    first_pfn: u64,
    read_only: bool,
) -> Result<(), ViewError> {
    let last_pfn = first_pfn + (size >> PAGE_SHIFT) - 1;
    if pool.frame_hva(last_pfn).is_none() {
        return Err(ViewError::NoSuchFrame(last_pfn));
    }
    let hva = pool.frame_hva(first_pfn).ok_or(ViewError::NoSuchFrame(first_pfn))?;
    let region = kvm_userspace_memory_region {
        slot,
        flags: if read_only { kvm_bindings::KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr: hva as u64,
    };
    // SAFETY: the host range [hva, hva + size) is inside the frame pool's
    // direct map (both ends checked above), which lives as long as the VM:
    // the VM struct owns the pool and drops the VM fd first.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| ViewError::SetMemslot { slot, gpa, size, source })
}

impl MemslotView {
    /// Maps guest pages [first_gfn, end_gfn) one to one onto the same frames,
    /// writable, in one slot.
    pub fn new(vm: &VmFd, pool: &FramePool, first_gfn: u64, end_gfn: u64) -> Result<Self, ViewError> {
        let size = (end_gfn - first_gfn) << PAGE_SHIFT;
        set_memslot(vm, pool, FIRST_VIEW_SLOT, first_gfn << PAGE_SHIFT, size, first_gfn, false)?;
        Ok(Self { slots_in_use: 1, slot_changes: 1 })
    }
}

impl EptView for MemslotView {
    fn kind(&self) -> ViewKind {
        ViewKind::Memslot
    }

    fn counters(&self) -> Counters {
        Counters::from([
            ("view_slots".to_string(), self.slots_in_use),
            ("view_slot_changes".to_string(), self.slot_changes),
        ])
    }
}
