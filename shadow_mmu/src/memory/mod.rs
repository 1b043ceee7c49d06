//! The primary MMU: the host page table over guest RAM, after mm/memory.c.
//!
//! Each guest page has a host pte (frame, writable); each frame has a map
//! count (ptes that map it) and a reference count (maps plus pins). Every
//! change of a pte happens inside an mmu notifier range and, for a single
//! pte, through [`PrimaryMmu::set_pte_at_notify`], so every registered
//! secondary MMU hears of it. A frame whose last reference goes is returned
//! to the host (a hole punched in the frame pool's memfd).
//!
//! | module | job | in Linux |
//! | --- | --- | --- |
//! | this one | the page table, the notifier chain, `set_pte_at_notify` | mm/memory.c, mm/mmu_notifier.c |
//! | `frames` | the frame table of a pool ([`Frames`]), shared by every mm over it and by the deduplicator: references, maps, KSM marks, free frames given back to the host; the spare-frame rule | `struct page`, mm/page_alloc.c |
//! | `cow` | write faults: `get_user_page`, `do_wp_page`, `wp_page_copy` | mm/memory.c, mm/gup.c |
//! | `ksm_pte` | KSM's pte primitives `write_protect_page`, `replace_page` | mm/ksm.c |
//! | `protect` | batch protection: a soft-dirty round (`clear_refs_soft_dirty`), `mprotect`, the soft-dirty bits pagemap reports | fs/proc/task_mmu.c, mm/mprotect.c |
//! | `guest_access` | the VMM's reads and writes of guest memory as the ptes map it | - |
//!
//! Several primary MMUs (one per guest, as one `mm_struct` per process)
//! may share one pool: each maps its guest's pages onto frames of the one
//! frame table ([`PrimaryMmu::new_in`]), and a frame can then be mapped by
//! ptes of several of them (a KSM page merged across guests). Each has its
//! own notifier chain: a change in one mm reaches only its subscribers.
//!
//! Deliberate differences from Linux (the crate documentation lists them
//! all): one "vma", no swap or migration, one lock per mm and one for the
//! frame table, a fixed frame pool, freed frames given back to the host in
//! batches, protection at page granularity, a merge that keeps the
//! soft-dirty bit.

mod cow;
mod exit;
mod frames;
mod guest_access;
mod ksm_pte;
mod protect;
#[cfg(test)]
mod tests;

use std::sync::{Arc, Mutex, PoisonError};

use crate::frame_pool::{FramePool, FramePoolError, Pfn};
use crate::mmu_notifier::{
    check_change_pte, Gfn, IllegalChangePte, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, RangeFlags,
};

pub use frames::{FrameInfo, FrameStats, FrameTable, Frames};

/// A host pte of guest RAM (always present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// The frame it maps.
    pub pfn: Pfn,
    /// Whether writes are allowed.
    pub writable: bool,
    /// Written since the last soft-dirty round (`pte_soft_dirty`,
    /// /proc/PID/pagemap bit 55). Set by a write fault (as x86's
    /// `pte_mkdirty` sets it), cleared only by
    /// [`PrimaryMmu::clear_refs_soft_dirty`]; every pte starts with it set,
    /// as a new vma reports every page soft-dirty (VM_SOFTDIRTY) until the
    /// first round. A writable pte is always soft-dirty.
    pub soft_dirty: bool,
}

/// Counters of the primary MMU since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// Write faults on read-only ptes served by copying (`wp_page_copy`).
    pub cow_copies: u64,
    /// Write faults on read-only ptes served by reusing the frame (`wp_page_reuse`).
    pub cow_reuses: u64,
    /// Frames whose last reference this mm dropped (an unmap, a
    /// [`PrimaryMmu::put_page`]); the pool's total is [`Frames::stats`].
    pub frames_freed: u64,
    /// Frames this mm allocated from the pool's free list (its copies, a
    /// [`PrimaryMmu::alloc_page`]); the pool's total is [`Frames::stats`].
    pub frames_allocated: u64,
    /// Notifier ranges opened.
    pub notifier_ranges: u64,
    /// `change_pte` notifications sent.
    pub change_pte_calls: u64,
    /// Pages given their own read-only copy by an unshare fault
    /// ([`PrimaryMmu::unshare`], KSM's unmerge).
    pub unshare_copies: u64,
    /// Soft-dirty rounds ([`PrimaryMmu::clear_refs_soft_dirty`]).
    pub soft_dirty_rounds: u64,
    /// Pages soft-dirty when a round began (written since the round before,
    /// as /proc/PID/pagemap bit 55 shows; every page counts in the first
    /// round, a new mapping being soft-dirty).
    pub soft_dirty_pages: u64,
    /// Ptes made read-only by batch updates (soft-dirty rounds, mprotect to
    /// read-only), without `change_pte`.
    pub batch_wrprotected: u64,
}

/// Errors of the primary MMU.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryMmuError {
    /// The gfn is not guest RAM managed by this page table.
    #[error("gfn {0:#x} is not guest RAM")]
    NotGuestRam(Gfn),
    /// A pte was changed outside the range announced for it.
    #[error("set_pte_at_notify for gfn {gfn:#x} outside its notifier range [{start:#x}, {end:#x})")]
    OutsideRange {
        /// The page.
        gfn: Gfn,
        /// Range start.
        start: Gfn,
        /// Range end.
        end: Gfn,
    },
    /// USE_CHANGE_PTE on a transition it does not cover.
    #[error(transparent)]
    IllegalChangePte(#[from] IllegalChangePte),
    /// A pte would map a frame that is free or outside the pool.
    #[error("frame {0} is not allocated")]
    BadFrame(Pfn),
    /// No free frame for a copy-on-write break.
    #[error("no free frame left for a copy-on-write break")]
    OutOfFrames,
    /// Frames asked for a new mm or reserved that are not all free frames
    /// of the pool.
    #[error("frames [{first:#x}, {end:#x}) are not all free frames of the pool")]
    FramesNotFree {
        /// First frame.
        first: Pfn,
        /// One past the last.
        end: Pfn,
    },
    /// The frame pool failed.
    #[error(transparent)]
    Pool(#[from] FramePoolError),
    /// A guest memory access through the direct map failed.
    #[error("guest memory access at {gpa:#x} failed")]
    Access {
        /// Guest-physical address.
        gpa: u64,
        /// What failed.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// A frame could not be copied through the direct map.
    #[error("copying frame {from:#x} to frame {to:#x} through the direct map failed")]
    CopyFrame {
        /// The frame copied.
        from: Pfn,
        /// The frame written.
        to: Pfn,
        /// What failed.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The VMM wrote to a page whose pte is read-only.
    #[error("write to gfn {0:#x} whose host pte is read-only")]
    ReadOnly(Gfn),
    /// A write fault on a page the host mprotect'ed read-only: gup refuses
    /// FOLL_WRITE on a vma without VM_WRITE, so KVM gets no writable pfn
    /// and KVM_RUN fails with EFAULT.
    #[error("write fault on gfn {0:#x}, which the host mprotect'ed read-only")]
    WriteToReadOnlyVma(Gfn),
    /// A range that is not inside guest RAM.
    #[error("[{start:#x}, {end:#x}) is not a range of guest RAM")]
    BadRange {
        /// Range start.
        start: Gfn,
        /// Range end.
        end: Gfn,
    },
}

/// A registered secondary MMU.
pub type Subscriber = Arc<Mutex<dyn MmuNotifier>>;

/// The host page table of guest RAM and its notifier chain (`struct mm_struct`).
pub struct PrimaryMmu {
    frames: Arc<Frames>,
    first_gfn: Gfn,
    /// The frame of guest-physical page 0: boot memory (below `first_gfn`)
    /// is frame `base_pfn + gfn`, and so is each guest page at creation.
    base_pfn: Pfn,
    ptes: Vec<Pte>,
    /// VM_WRITE of the vma each page lies in: mprotect splits the one vma
    /// at page granularity (see `protect`).
    vm_write: Vec<bool>,
    subscribers: Vec<Subscriber>,
    stats: HostStats,
    /// [`PrimaryMmu::exit_mmap`] ran: no guest page is left.
    exited: bool,
}

impl std::fmt::Debug for PrimaryMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryMmu")
            .field("first_gfn", &self.first_gfn)
            .field("base_pfn", &self.base_pfn)
            .field("pages", &self.ptes.len())
            .field("subscribers", &self.subscribers.len())
            .field("exited", &self.exited)
            .field("stats", &self.stats)
            .finish()
    }
}

/// A batch of ranges on an mm ([`PrimaryMmu::batch`]), ended when dropped.
#[derive(Debug)]
#[must_use = "the batch ends as soon as the guard is dropped"]
pub struct MmBatch<'a> {
    mm: &'a Mutex<PrimaryMmu>,
}

impl Drop for MmBatch<'_> {
    fn drop(&mut self) {
        crate::lock(self.mm).batch_end();
    }
}

/// A one-page CLEAR range whose pte change goes through `change_pte` and is
/// one of the three legal USE_CHANGE_PTE transitions: the range KSM's merge
/// steps and the copy-on-write break open.
fn change_pte_range(gfn: Gfn) -> MmuNotifierRange {
    MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE | RangeFlags::USE_CHANGE_PTE)
}

impl PrimaryMmu {
    /// The primary MMU of a guest alone on `pool`: a fresh frame table
    /// ([`Frames::new`]) and [`PrimaryMmu::new_in`] with guest page n on
    /// frame n. Frames below `first_gfn` are the VMM's own (boot memory):
    /// referenced once, never mapped here, never freed. Frames from
    /// `end_gfn` (clamped to the pool) to the end of the pool start free.
    ///
    /// Deliberate difference (crate docs): the pool is fixed, where Linux
    /// allocates a page for every copy-on-write break. One spare frame past
    /// `end_gfn` guarantees that a copy always finds a free frame (the
    /// spare-frame rule of the `frames` module: one per mm).
    pub fn new(pool: Arc<FramePool>, first_gfn: Gfn, end_gfn: Gfn) -> Self {
        let end_gfn = end_gfn.min(pool.nr_frames());
        let first_gfn = first_gfn.min(end_gfn);
        Self::new_in(Frames::new(pool), first_gfn, end_gfn, 0)
            .expect("a fresh frame table has every frame of [0, end_gfn) free")
    }

    /// The primary MMU of one guest of several sharing `frames` (a fleet):
    /// guest-physical page n is frame `base_pfn + n`. Frames [base_pfn,
    /// base_pfn + first_gfn) become the guest's boot memory (reserved:
    /// referenced once, never mapped, never freed; the VMM reads and writes
    /// it directly, [`PrimaryMmu::read_guest`]); guest pages [first_gfn,
    /// end_gfn) are mapped writable onto frames [base_pfn + first_gfn,
    /// base_pfn + end_gfn). Every one of those frames must be free.
    ///
    /// The pool needs one spare frame per mm besides (the spare-frame rule
    /// of the `frames` module); [`crate::FleetLayout`] places the guests and
    /// sizes the pool.
    pub fn new_in(frames: Arc<Frames>, first_gfn: Gfn, end_gfn: Gfn, base_pfn: Pfn) -> Result<Self, PrimaryMmuError> {
        if first_gfn > end_gfn {
            return Err(PrimaryMmuError::BadRange { start: first_gfn, end: end_gfn });
        }
        let first_pfn = base_pfn + first_gfn;
        let end_pfn = base_pfn + end_gfn;
        frames.reserve(base_pfn, first_pfn)?;
        frames.claim_mapped(first_pfn, end_pfn)?;
        let ptes: Vec<Pte> = (first_pfn..end_pfn).map(|pfn| Pte { pfn, writable: true, soft_dirty: true }).collect();
        Ok(Self {
            frames,
            first_gfn,
            base_pfn,
            vm_write: vec![true; ptes.len()],
            ptes,
            subscribers: Vec::new(),
            stats: HostStats::default(),
            exited: false,
        })
    }

    /// `mmu_notifier_register`: `sub` hears of every later change.
    pub fn mmu_notifier_register(&mut self, sub: Subscriber) {
        self.subscribers.push(sub);
    }

    /// The frame pool.
    pub fn pool(&self) -> &Arc<FramePool> {
        self.frames.pool()
    }

    /// The frame table, shared with every other mm over the pool.
    pub fn frames(&self) -> &Arc<Frames> {
        &self.frames
    }

    /// The frame of guest-physical page 0 (see [`PrimaryMmu::new_in`]).
    pub fn base_pfn(&self) -> Pfn {
        self.base_pfn
    }

    /// Guest RAM managed here: [first, end) in gfns.
    pub fn guest_range(&self) -> (Gfn, Gfn) {
        (self.first_gfn, self.first_gfn + self.ptes.len() as u64)
    }

    fn index(&self, gfn: Gfn) -> Result<usize, PrimaryMmuError> {
        gfn.checked_sub(self.first_gfn)
            .map(|i| i as usize)
            .filter(|&i| i < self.ptes.len())
            .ok_or(PrimaryMmuError::NotGuestRam(gfn))
    }

    /// The pte of `gfn`.
    pub fn pte(&self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        Ok(self.ptes[self.index(gfn)?])
    }

    /// Counters since creation.
    pub fn stats(&self) -> HostStats {
        self.stats
    }

    fn notify(&self, mut call: impl FnMut(&mut dyn MmuNotifier)) {
        for sub in &self.subscribers {
            // Poisoning ignored as in `crate::lock`: a panic ends the run.
            let mut guard = sub.lock().unwrap_or_else(PoisonError::into_inner);
            call(&mut *guard);
        }
    }

    /// `mmu_notifier_invalidate_range_start`.
    pub fn invalidate_range_start(&mut self, range: &MmuNotifierRange) {
        self.stats.notifier_ranges += 1;
        self.notify(|s| s.invalidate_range_start(range));
    }

    /// `mmu_notifier_invalidate_range_end`.
    pub fn invalidate_range_end(&mut self, range: &MmuNotifierRange) {
        self.notify(|s| s.invalidate_range_end(range));
    }

    /// Begins a batch of ranges on the calling thread (one ksmd slice, one
    /// synchronous pass), until [`PrimaryMmu::batch_end`] on the same
    /// thread: every subscriber may defer the costly part of its updates to
    /// the batch's end ([`MmuNotifier::batch_start`]). Batches nest. Between
    /// the two the mm's lock may be dropped and taken again, and faults
    /// served as usual. [`PrimaryMmu::batch`] ends the batch even on an
    /// early return.
    ///
    /// Deliberate difference (crate docs): Linux has no such bracket; KVM
    /// batches the zaps of one range into one TLB flush.
    pub fn batch_start(&mut self) {
        self.notify(|s| s.batch_start());
    }

    /// Ends the calling thread's innermost batch; the outermost makes every
    /// deferred update real before it returns.
    pub fn batch_end(&mut self) {
        self.notify(|s| s.batch_end(self));
    }

    /// [`PrimaryMmu::batch_start`] on `mm`, and [`PrimaryMmu::batch_end`]
    /// when the returned guard is dropped: the caller must not hold `mm`'s
    /// lock then.
    pub fn batch(mm: &Mutex<PrimaryMmu>) -> MmBatch<'_> {
        crate::lock(mm).batch_start();
        MmBatch { mm }
    }

    /// Runs `change` between `invalidate_range_start` and
    /// `invalidate_range_end` of `range`; the range ends whether the change
    /// succeeded or not.
    fn within_range<T>(
        &mut self,
        range: &MmuNotifierRange,
        change: impl FnOnce(&mut Self) -> Result<T, PrimaryMmuError>,
    ) -> Result<T, PrimaryMmuError> {
        self.invalidate_range_start(range);
        let result = change(self);
        self.invalidate_range_end(range);
        result
    }

    /// `set_pte_at_notify`: inside `range`, tells every secondary MMU that
    /// `gfn`'s pte becomes `new` (`change_pte`), then sets it and moves the
    /// frame references. With USE_CHANGE_PTE on the range, only the three
    /// legal transitions are accepted, and never on a range that only
    /// removes write permission, in every build.
    pub fn set_pte_at_notify(&mut self, range: &MmuNotifierRange, gfn: Gfn, new: Pte) -> Result<Pte, PrimaryMmuError> {
        let i = self.index(gfn)?;
        if !range.contains(gfn) {
            return Err(PrimaryMmuError::OutsideRange { gfn, start: range.start, end: range.end });
        }
        let old = self.ptes[i];
        if range.flags.contains(RangeFlags::USE_CHANGE_PTE) {
            check_change_pte(range, gfn, old, new)?;
        }
        // The caller holds a reference on `new.pfn` (a pte of some mm, or a
        // pin), so it stays allocated until it is mapped below.
        if self.frame(new.pfn).refcount == 0 {
            return Err(PrimaryMmuError::BadFrame(new.pfn));
        }
        self.stats.change_pte_calls += 1;
        self.notify(|s| s.change_pte(gfn, new));
        self.ptes[i] = new;
        if new.pfn != old.pfn {
            self.remap_frame(new.pfn, old.pfn)?;
        }
        Ok(old)
    }
}
