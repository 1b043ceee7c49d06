//! The memslot view: each run of guest pages that map contiguous frames with
//! the same access is one KVM memslot pointing into the frame pool's direct
//! map. An absent page is a hole (the guest's access comes back as
//! KVM_EXIT_MMIO with its gpa; an instruction fetch as an emulation
//! failure); a read-only run is a KVM_MEM_READONLY slot (a write comes back
//! as KVM_EXIT_MMIO, already retired, memory unchanged).
//!
//! KVM cannot resize or move a slot, so every change deletes the slots it
//! touches and creates their replacements. Mapping a page creates one
//! one-page slot and touches no neighbour: that is the bare cost of making a
//! page reachable, and what a fault should cost. Neighbouring runs that
//! continue each other are merged back into one slot only once the view
//! holds more than half of KVM's slots (merging deletes a slot, which costs
//! the host KVM its whole shadow MMU). Deleting a slot makes the
//! host KVM drop its whole shadow MMU (host-facts.md), so the guest refaults
//! its working set inside the host kernel afterwards: the host KVM's
//! `pf_fixed` shows that cost.

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use shadow_mmu::{EptView, FramePool, Gfn, Pfn, PAGE_SHIFT};

use super::ViewError;
use crate::vcpu_gate::VcpuGate;

/// KVM memslot id of the VMM's low megabyte, outside any view.
pub const BOOT_SLOT: u32 = 0;
const FIRST_VIEW_SLOT: u32 = 1;

/// Installs (or, with `size` 0, deletes) memslot `slot` for guest-physical
/// [gpa, gpa + size) backed by frames from `first_pfn` on.
pub fn set_memslot(
    vm: &VmFd,
    pool: &FramePool,
    slot: u32,
    gpa: u64,
    size: u64,
    first_pfn: Pfn,
    read_only: bool,
) -> Result<(), ViewError> {
    let userspace_addr = if size == 0 {
        0
    } else {
        let last_pfn = first_pfn + (size >> PAGE_SHIFT) - 1;
        pool.frame_hva(last_pfn).ok_or(ViewError::NoSuchFrame(last_pfn))?;
        pool.frame_hva(first_pfn).ok_or(ViewError::NoSuchFrame(first_pfn))? as u64
    };
    let region = kvm_userspace_memory_region {
        slot,
        flags: if read_only { kvm_bindings::KVM_MEM_READONLY } else { 0 },
        guest_phys_addr: gpa,
        memory_size: size,
        userspace_addr,
    };
    // SAFETY: the host range [userspace_addr, + size) lies inside the frame
    // pool's direct map (both ends checked above), and the pool outlives the
    // VM: the view and the VM hold it in an Arc, and the VM fd closes first.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| ViewError::SetMemslot { slot, gpa, size, source })
}

/// A run of guest pages mapping contiguous frames with one access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Run {
    pages: u64,
    pfn: Pfn,
    writable: bool,
    slot: u32,
}

impl Run {
    fn pfn_at(&self, start: Gfn, gfn: Gfn) -> Pfn {
        self.pfn + (gfn - start)
    }
}

/// The memslot backend.
#[derive(Debug)]
pub struct MemslotView {
    vm: Arc<VmFd>,
    gate: Arc<VcpuGate>,
    pool: Arc<FramePool>,
    first_gfn: Gfn,
    end_gfn: Gfn,
    /// Runs by first gfn.
    runs: BTreeMap<Gfn, Run>,
    free_slots: Vec<u32>,
    next_slot: u32,
    slot_limit: u32,
    slot_creates: u64,
    slot_deletes: u64,
    max_slots: u64,
}

impl MemslotView {
    /// Maps guest pages [first_gfn, end_gfn) one to one onto the same frames,
    /// writable, in one slot. `slot_limit` is KVM's memslot count.
    pub fn new(
        vm: Arc<VmFd>,
        gate: Arc<VcpuGate>,
        pool: Arc<FramePool>,
        first_gfn: Gfn,
        end_gfn: Gfn,
        slot_limit: u32,
    ) -> Result<Self, ViewError> {
        let mut view = Self {
            vm,
            gate,
            pool,
            first_gfn,
            end_gfn,
            runs: BTreeMap::new(),
            free_slots: Vec::new(),
            next_slot: FIRST_VIEW_SLOT,
            slot_limit,
            slot_creates: 0,
            slot_deletes: 0,
            max_slots: 0,
        };
        view.create(first_gfn, end_gfn - first_gfn, first_gfn, true)?;
        Ok(view)
    }

    /// Number of slots the view holds now.
    pub fn slots(&self) -> u64 {
        self.runs.len() as u64
    }

    fn create(&mut self, start: Gfn, pages: u64, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None if self.next_slot < self.slot_limit => {
                self.next_slot += 1;
                self.next_slot - 1
            }
            None => return Err(ViewError::SlotLimit { limit: self.slot_limit - FIRST_VIEW_SLOT }),
        };
        if let Err(e) =
            set_memslot(&self.vm, &self.pool, slot, start << PAGE_SHIFT, pages << PAGE_SHIFT, pfn, !writable)
        {
            self.free_slots.push(slot);
            return Err(e);
        }
        self.slot_creates += 1;
        self.runs.insert(start, Run { pages, pfn, writable, slot });
        self.max_slots = self.max_slots.max(self.runs.len() as u64);
        Ok(())
    }

    fn delete(&mut self, start: Gfn) -> Result<Run, ViewError> {
        let run = self.runs.remove(&start).ok_or(ViewError::OutOfRange(start))?;
        set_memslot(&self.vm, &self.pool, run.slot, start << PAGE_SHIFT, 0, 0, false)?;
        self.free_slots.push(run.slot);
        self.slot_deletes += 1;
        Ok(run)
    }

    /// Removes [start, end) from every run, keeping the parts outside.
    fn carve(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        let overlapping: Vec<(Gfn, Run)> =
            self.runs.range(..end).rev().take_while(|(s, r)| **s + r.pages > start).map(|(s, r)| (*s, *r)).collect();
        for (s, run) in overlapping {
            self.delete(s)?;
            let run_end = s + run.pages;
            if s < start {
                self.create(s, start - s, run.pfn, run.writable)?;
            }
            if run_end > end {
                self.create(end, run_end - end, run.pfn_at(s, end), run.writable)?;
            }
        }
        Ok(())
    }

    fn check_range(&self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        if start < self.first_gfn || end > self.end_gfn || start >= end {
            return Err(ViewError::OutOfRange(start));
        }
        Ok(())
    }

    fn lookup(&self, gfn: Gfn) -> Option<(Pfn, bool)> {
        let (s, r) = self.runs.range(..=gfn).next_back()?;
        (gfn < s + r.pages).then(|| (r.pfn_at(*s, gfn), r.writable))
    }
}

impl EptView for MemslotView {
    type Error = ViewError;

    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        self.check_range(start, end)?;
        self.gate.pause();
        let result = self.carve(start, end);
        self.gate.resume();
        result
    }

    fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        self.check_range(gfn, gfn + 1)?;
        if self.lookup(gfn) == Some((pfn, writable)) {
            return Ok(());
        }
        self.gate.pause();
        let result = self.remap(gfn, pfn, writable);
        self.gate.resume();
        result
    }

    /// The writable runs of [start, end) become KVM_MEM_READONLY slots over
    /// the same frames, in one pause of the vCPU: reads go on without a
    /// fault, the next write exits.
    fn write_protect(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        self.check_range(start, end)?;
        let writable: Vec<(Gfn, Run)> = self
            .runs
            .range(..end)
            .rev()
            .take_while(|(s, r)| **s + r.pages > start)
            .filter(|(_, r)| r.writable)
            .map(|(s, r)| (*s, *r))
            .collect();
        if writable.is_empty() {
            return Ok(());
        }
        self.gate.pause();
        let result = writable.into_iter().try_for_each(|(s, run)| {
            let (a, b) = (s.max(start), (s + run.pages).min(end));
            self.carve(a, b)?;
            self.create(a, b - a, run.pfn_at(s, a), false)
        });
        self.gate.resume();
        result
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_slots", self.slots()),
            ("view_slots_max", self.max_slots),
            ("view_slot_creates", self.slot_creates),
            ("view_slot_deletes", self.slot_deletes),
            ("view_vcpu_kicks", self.gate.kicks()),
        ]
    }
}

impl MemslotView {
    /// Replaces `gfn`'s mapping, merging with neighbours that continue the
    /// same frames with the same access. The vCPU is out of KVM_RUN.
    fn remap(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        self.carve(gfn, gfn + 1)?;
        if self.slots() < u64::from(self.slot_limit / 2) {
            return self.create(gfn, 1, pfn, writable);
        }
        let (mut start, mut pages, mut first_pfn) = (gfn, 1, pfn);
        if let Some((&s, &r)) = self.runs.range(..gfn).next_back() {
            if s + r.pages == gfn && r.pfn + r.pages == pfn && r.writable == writable {
                self.delete(s)?;
                (start, pages, first_pfn) = (s, r.pages + 1, r.pfn);
            }
        }
        if let Some(&r) = self.runs.get(&(gfn + 1)) {
            if r.pfn == pfn + 1 && r.writable == writable {
                self.delete(gfn + 1)?;
                pages += r.pages;
            }
        }
        self.create(start, pages, first_pfn, writable)
    }
}
