//! The memslot view: each run of guest pages that map contiguous frames with
//! the same access is one KVM memslot pointing into the frame pool's direct
//! map. An absent page is a hole (the guest's access comes back as
//! KVM_EXIT_MMIO with its gpa; an instruction fetch as an emulation
//! failure); a read-only run is a KVM_MEM_READONLY slot (a write comes back
//! as KVM_EXIT_MMIO, already retired, memory unchanged).
//!
//! KVM cannot resize or move a slot, so every change deletes the slots it
//! touches and creates their replacements, and deleting a slot drops the
//! host KVM's mappings of guest memory. By default x86 KVM drops all of
//! them, its whole shadow MMU (`KVM_X86_QUIRK_SLOT_ZAP_ALL`, host-facts.md),
//! and the guest refaults its whole working set inside the host kernel
//! afterwards; the view disables that quirk where KVM lets it
//! (`KVM_CAP_DISABLE_QUIRKS2`, Linux 6.12), so that a deletion drops only
//! the deleted slot's pages, and counts the deletions made while it could
//! not (`view_zap_all_deletes`). The host KVM's `pf_fixed` shows the
//! refaults either way.
//!
//! To keep each deletion small the view starts with one slot per 2 MiB of
//! guest RAM rather than one for all of it. Mapping a page creates one
//! one-page slot and touches no neighbour: that is the bare cost of making
//! a page reachable, and what a fault should cost. Neighbouring runs that
//! continue each other are merged back into one slot only when KVM has no
//! slot left for a new one (merging deletes slots).

use std::collections::BTreeMap;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use shadow_mmu::{EptView, FramePool, Gfn, Pfn, PAGE_SHIFT};

use super::ViewError;
use crate::vcpu_gate::{GateHold, VcpuGate};

/// KVM memslot id of the VMM's low megabyte, outside any view.
pub const BOOT_SLOT: u32 = 0;
const FIRST_VIEW_SLOT: u32 = 1;
/// Pages per slot of the initial layout: 2 MiB of guest RAM, aligned.
const INITIAL_SLOT_PAGES: u64 = 512;
/// Free slots below which the view merges neighbouring runs before a
/// change: one change needs at most two more slots than it frees.
const SLOTS_RESERVE: u64 = 4;

/// Asks KVM to drop only a deleted slot's mappings when a slot is deleted,
/// rather than its whole shadow MMU: disables `KVM_X86_QUIRK_SLOT_ZAP_ALL`
/// (`KVM_CAP_DISABLE_QUIRKS2`, Linux 6.12). x86 KVM keeps the quirk on by
/// default because zapping only the deleted slot once upset an assigned GPU
/// (the 2019 revert the quirk's commit cites); the lab assigns no device.
/// Returns whether deletions still drop everything (KVM does not offer to
/// disable the quirk, or refused).
pub fn disable_slot_zap_all(vm: &VmFd) -> bool {
    let quirk = kvm_bindings::KVM_X86_QUIRK_SLOT_ZAP_ALL;
    let offered = vm.check_extension_raw(kvm_bindings::KVM_CAP_DISABLE_QUIRKS2.into());
    if offered <= 0 || offered as u32 & quirk == 0 {
        return true;
    }
    let cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_DISABLE_QUIRKS2,
        args: [u64::from(quirk), 0, 0, 0],
        ..Default::default()
    };
    vm.enable_cap(&cap).is_err()
}

/// The initial runs `(first gfn, pages)` of guest pages [first, end): one
/// per 2 MiB-aligned block, or larger blocks when that would take more than
/// a quarter of the view's `slots`.
fn initial_runs(first: Gfn, end: Gfn, slots: u64) -> Vec<(Gfn, u64)> {
    let quarter = (slots / 4).max(1);
    let mut block = INITIAL_SLOT_PAGES;
    while (end - 1) / block - first / block + 1 > quarter {
        block *= 2;
    }
    let mut runs = Vec::new();
    let mut start = first;
    while start < end {
        let next = ((start / block + 1) * block).min(end);
        runs.push((start, next - start));
        start = next;
    }
    runs
}

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
    /// Deleting a slot drops the host KVM's whole shadow MMU.
    zap_all_on_delete: bool,
    zap_all_deletes: u64,
    compactions: u64,
    /// `slot_creates` when a compaction last found nothing to merge: no
    /// other is tried until a slot has been created since.
    fruitless_compaction_at: Option<u64>,
    /// The vCPU held out for a batch of the secondary MMU's updates.
    batch_hold: Option<GateHold>,
}

impl MemslotView {
    /// Maps guest pages [first_gfn, end_gfn) one to one onto frames
    /// [base_pfn + first_gfn, base_pfn + end_gfn) (0 for a guest alone; a
    /// fleet's guest i lies further in the pool, `shadow_mmu::FleetLayout`),
    /// writable, one slot per 2 MiB. `slot_limit` is KVM's memslot count.
    pub fn new(
        vm: Arc<VmFd>,
        gate: Arc<VcpuGate>,
        pool: Arc<FramePool>,
        first_gfn: Gfn,
        end_gfn: Gfn,
        base_pfn: Pfn,
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
            zap_all_on_delete: true,
            zap_all_deletes: 0,
            compactions: 0,
            fruitless_compaction_at: None,
            batch_hold: None,
        };
        view.zap_all_on_delete = disable_slot_zap_all(&view.vm);
        for (start, pages) in initial_runs(first_gfn, end_gfn, view.free_slots()) {
            view.create(start, pages, base_pfn + start, true)?;
        }
        Ok(view)
    }

    /// Slots KVM can still give the view.
    fn free_slots(&self) -> u64 {
        u64::from(self.slot_limit.saturating_sub(self.next_slot)) + self.free_slots.len() as u64
    }

    /// The gate that keeps the vCPU out of KVM_RUN while slots change.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
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
        if self.zap_all_on_delete {
            self.zap_all_deletes += 1;
        }
        Ok(run)
    }

    /// Before a change, with the vCPU out: when KVM is short of slots for
    /// it, merges every group of neighbouring runs that continue each other
    /// into one slot. Never during a change (a merge there could bring back
    /// a page the change is taking away).
    fn make_room(&mut self) -> Result<(), ViewError> {
        if self.free_slots() >= SLOTS_RESERVE || self.fruitless_compaction_at == Some(self.slot_creates) {
            return Ok(());
        }
        self.compactions += 1;
        let groups = mergeable_groups(&self.runs);
        if groups.is_empty() {
            self.fruitless_compaction_at = Some(self.slot_creates);
        }
        for group in groups {
            let Some(&first) = group.first() else { continue };
            let mut pages = 0;
            let mut head = None;
            for start in group {
                let run = self.delete(start)?;
                head.get_or_insert(run);
                pages += run.pages;
            }
            if let Some(run) = head {
                self.create(first, pages, run.pfn, run.writable)?;
            }
        }
        Ok(())
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

    /// The writable runs overlapping [start, end).
    fn writable_runs(&self, start: Gfn, end: Gfn) -> Vec<(Gfn, Run)> {
        let overlapping = self.runs.range(..end).rev().take_while(|(s, r)| **s + r.pages > start);
        overlapping.filter(|(_, r)| r.writable).map(|(s, r)| (*s, *r)).collect()
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
        let result = self.make_room().and_then(|()| self.carve(start, end));
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
        if self.writable_runs(start, end).is_empty() {
            return Ok(());
        }
        self.gate.pause();
        let result = self.make_room().and_then(|()| {
            // Listed again: making room may have merged runs.
            self.writable_runs(start, end).into_iter().try_for_each(|(s, run)| {
                let (a, b) = (s.max(start), (s + run.pages).min(end));
                self.carve(a, b)?;
                self.create(a, b - a, run.pfn_at(s, a), false)
            })
        });
        self.gate.resume();
        result
    }

    /// Holds the vCPU out of KVM_RUN until `batch_end`: the batch's slot
    /// changes (one per run of neighbouring pages) kick it once at most.
    fn batch_start(&mut self) -> Result<(), ViewError> {
        if self.batch_hold.is_none() {
            self.batch_hold = Some(self.gate.hold());
        }
        Ok(())
    }

    fn batch_end(&mut self) -> Result<(), ViewError> {
        self.batch_hold = None;
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_slots", self.slots()),
            ("view_slots_max", self.max_slots),
            ("view_slot_creates", self.slot_creates),
            ("view_slot_deletes", self.slot_deletes),
            ("view_vcpu_kicks", self.gate.kicks()),
            ("view_zap_all_deletes", self.zap_all_deletes),
            ("view_compactions", self.compactions),
        ]
    }
}

impl MemslotView {
    /// Replaces `gfn`'s mapping with a one-page slot, leaving its
    /// neighbours alone. The vCPU is out of KVM_RUN.
    fn remap(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        self.make_room()?;
        self.carve(gfn, gfn + 1)?;
        self.create(gfn, 1, pfn, writable)
    }
}

/// The groups of neighbouring runs that continue each other (contiguous
/// gfns and frames, one access), two runs or more each, as their runs'
/// first gfns in order.
fn mergeable_groups(runs: &BTreeMap<Gfn, Run>) -> Vec<Vec<Gfn>> {
    let mut groups: Vec<Vec<Gfn>> = Vec::new();
    let mut current: Vec<Gfn> = Vec::new();
    let mut prev: Option<(Gfn, Run)> = None;
    for (&start, &run) in runs {
        let continues =
            prev.is_some_and(|(s, p)| s + p.pages == start && p.pfn + p.pages == run.pfn && p.writable == run.writable);
        if !continues && current.len() > 1 {
            groups.push(std::mem::take(&mut current));
        }
        if !continues {
            current.clear();
        }
        current.push(start);
        prev = Some((start, run));
    }
    if current.len() > 1 {
        groups.push(current);
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_initial_layout_is_one_run_per_aligned_2mib_unless_slots_are_few() {
        // Guest RAM [1 MiB, 6 MiB + 4 KiB): a first half block, two whole
        // ones, one page.
        let (first, end) = (256, 1537);
        assert_eq!(initial_runs(first, end, 32_764), vec![(256, 256), (512, 512), (1024, 512), (1536, 1)]);
        // Four runs need 16 slots; with 8, blocks double until two do.
        assert_eq!(initial_runs(first, end, 8), vec![(256, 768), (1024, 513)]);
        assert_eq!(initial_runs(first, end, 1), vec![(256, 1281)]);
    }

    #[test]
    fn only_runs_that_continue_each_other_are_grouped() {
        let run = |pages, pfn, writable| Run { pages, pfn, writable, slot: 0 };
        let runs = BTreeMap::from([
            (10, run(2, 100, true)),
            (12, run(1, 102, true)),  // continues 10
            (13, run(1, 103, false)), // other access
            (14, run(1, 104, false)), // continues 13
            (15, run(1, 200, false)), // other frames
            (17, run(1, 202, false)), // a hole before it
            (18, run(3, 203, false)), // continues 17
            (21, run(1, 206, false)), // continues 18
        ]);
        assert_eq!(mergeable_groups(&runs), vec![vec![10, 12], vec![13, 14], vec![17, 18, 21]]);
        assert!(mergeable_groups(&BTreeMap::new()).is_empty());
    }
}
