//! The frame table of one pool ([`Frames`]): what the host knows of each
//! frame (`struct page`: references, maps, the KSM mark), the free list, and
//! freed frames given back to the host. One table serves every primary MMU
//! over the pool (one per guest, as one `mm_struct` per process) and the
//! deduplicator, so a frame merged across guests is one frame with one
//! count of its maps and references.
//!
//! # Locking
//!
//! The table is behind its own lock, the innermost of all: it is taken
//! inside an mm's lock (or the deduplicator's, or none), held for a few
//! field updates (or one stable tree search, or one punch of holes), and
//! nothing else is locked or called while it is held: no notifier, no mm,
//! no view. A leaf lock cannot take part in a deadlock. Linux makes the
//! same fields atomic in `struct page` and keeps the free lists under
//! `zone->lock`; one lock is simpler here, and uncontended costs about 5 ns.
//!
//! # The spare-frame rule
//!
//! The pool is fixed (crate docs). A copy-on-write break allocates its copy
//! before it lets go of the old frame, so it needs a free frame at a moment
//! when every guest page may map a frame of its own. Each mm copies one page
//! at a time (under its lock), so a pool holds, besides every guest's boot
//! frames and pages, **one spare frame per mm** (and one for the
//! deduplicator's zero page): then a copy always finds a free frame, however
//! many guests copy at once. The deduplicator pins at most one frame that no
//! pte maps, and only while it holds the lock of an mm, which is then not
//! copying.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use vm_memory::{Bytes, GuestAddress};

use super::{PrimaryMmu, PrimaryMmuError};
use crate::frame_pool::{FramePool, Pfn, PAGE_SHIFT, PAGE_SIZE};

/// What the host knows of one frame (`struct page`, the parts used here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameInfo {
    /// References: maps plus pins. Zero means free.
    pub refcount: u32,
    /// Host ptes that map the frame, in every mm over the pool.
    pub mapcount: u32,
    /// Whether the frame is a KSM page (never reused on a write fault).
    pub ksm: bool,
    /// Which stable node owns the KSM page (the deduplicator's tag, as
    /// `page->mapping` points at the stable node in Linux); 0 when none.
    /// Freeing the frame clears it, so a stale stable node never matches a
    /// frame that was freed and reused.
    pub ksm_owner: u32,
}

/// Counters of a pool's frames since its table was made, over every mm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameStats {
    /// Frames taken from the free list.
    pub frames_allocated: u64,
    /// Frames whose last reference went.
    pub frames_freed: u64,
}

/// The frame table under its lock ([`Frames::table`]).
#[derive(Debug)]
pub struct FrameTable {
    frames: Vec<FrameInfo>,
    free_frames: Vec<Pfn>,
    /// Freed frames whose holes are not punched yet (see [`Frames::flush_holes`]).
    pending_holes: Vec<Pfn>,
    stats: FrameStats,
}

impl FrameTable {
    /// What the host knows of frame `pfn` (nothing, for a frame outside the pool).
    pub fn frame(&self, pfn: Pfn) -> FrameInfo {
        self.frames.get(pfn as usize).copied().unwrap_or_default()
    }

    /// Number of free frames (returned to the host, or about to be).
    pub fn nr_free_frames(&self) -> u64 {
        (self.free_frames.len() + self.pending_holes.len()) as u64
    }

    /// Takes free frames [first, end) out of the free list, each referenced
    /// once and, if `mapped`, mapped once.
    fn claim(&mut self, pool: &FramePool, first: Pfn, end: Pfn, mapped: bool) -> Result<(), PrimaryMmuError> {
        if first >= end {
            return Ok(());
        }
        // Pending frames join the free list first, so every frame with no
        // reference is on it.
        self.flush_holes(pool)?;
        let not_free = PrimaryMmuError::FramesNotFree { first, end };
        let range = self.frames.get_mut(first as usize..end as usize).ok_or(not_free)?;
        if range.iter().any(|f| f.refcount > 0) {
            return Err(PrimaryMmuError::FramesNotFree { first, end });
        }
        range.fill(FrameInfo { refcount: 1, mapcount: u32::from(mapped), ..FrameInfo::default() });
        self.free_frames.retain(|pfn| !(first..end).contains(pfn));
        Ok(())
    }

    fn get_page(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        match self.frames.get_mut(pfn as usize) {
            Some(f) if f.refcount > 0 => {
                f.refcount += 1;
                Ok(())
            }
            _ => Err(PrimaryMmuError::BadFrame(pfn)),
        }
    }

    /// Drops a reference; returns whether it was the last (the frame is
    /// then free, its hole pending).
    fn put_page(&mut self, pfn: Pfn) -> Result<bool, PrimaryMmuError> {
        let f = self.frames.get_mut(pfn as usize).filter(|f| f.refcount > 0).ok_or(PrimaryMmuError::BadFrame(pfn))?;
        f.refcount -= 1;
        if f.refcount > 0 {
            return Ok(false);
        }
        *f = FrameInfo::default();
        self.pending_holes.push(pfn);
        self.stats.frames_freed += 1;
        Ok(true)
    }

    /// A pte now maps `new` instead of `old` (None: it mapped nothing):
    /// one map and reference more on `new`, which must be allocated, one
    /// fewer on `old`. Returns whether `old` was freed.
    fn remap(&mut self, new: Pfn, old: Option<Pfn>) -> Result<bool, PrimaryMmuError> {
        let f = self.frames.get_mut(new as usize).filter(|f| f.refcount > 0).ok_or(PrimaryMmuError::BadFrame(new))?;
        f.refcount += 1;
        f.mapcount += 1;
        match old {
            Some(old) => self.unmap(old),
            None => Ok(false),
        }
    }

    /// A pte no longer maps `pfn`; returns whether the frame was freed.
    fn unmap(&mut self, pfn: Pfn) -> Result<bool, PrimaryMmuError> {
        let f = self.frames.get_mut(pfn as usize).filter(|f| f.mapcount > 0).ok_or(PrimaryMmuError::BadFrame(pfn))?;
        f.mapcount -= 1;
        self.put_page(pfn)
    }

    fn alloc_page(&mut self, pool: &FramePool) -> Result<Pfn, PrimaryMmuError> {
        if self.free_frames.is_empty() {
            self.flush_holes(pool)?;
        }
        let pfn = self.free_frames.pop().ok_or(PrimaryMmuError::OutOfFrames)?;
        self.frames[pfn as usize] = FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() };
        self.stats.frames_allocated += 1;
        Ok(pfn)
    }

    fn flush_holes(&mut self, pool: &FramePool) -> Result<(), PrimaryMmuError> {
        if self.pending_holes.is_empty() {
            return Ok(());
        }
        let mut pending = std::mem::take(&mut self.pending_holes);
        pending.sort_unstable();
        let mut i = 0;
        while i < pending.len() {
            let start = pending[i];
            let mut n = 1;
            while i + (n as usize) < pending.len() && pending[i + n as usize] == start + n {
                n += 1;
            }
            if let Err(e) = pool.punch_holes(start, n) {
                // The frames not punched yet stay pending.
                self.pending_holes = pending.split_off(i);
                self.free_frames.extend(pending);
                return Err(e.into());
            }
            i += n as usize;
        }
        self.free_frames.extend(pending);
        Ok(())
    }

    fn set_ksm_owner(&mut self, pfn: Pfn, ksm: bool, owner: u32) {
        if let Some(f) = self.frames.get_mut(pfn as usize) {
            f.ksm = ksm;
            f.ksm_owner = if ksm { owner } else { 0 };
        }
    }
}

/// The frames of one pool and their table, shared by every primary MMU over
/// the pool and by the deduplicator (see the module docs for its lock).
#[derive(Debug)]
pub struct Frames {
    pool: Arc<FramePool>,
    table: Mutex<FrameTable>,
}

impl Frames {
    /// A table over `pool` in which every frame is free.
    pub fn new(pool: Arc<FramePool>) -> Arc<Self> {
        let nr_frames = pool.nr_frames();
        let table = FrameTable {
            frames: vec![FrameInfo::default(); nr_frames as usize],
            // Popped from the end: the lowest frame is allocated first.
            free_frames: (0..nr_frames).rev().collect(),
            pending_holes: Vec::new(),
            stats: FrameStats::default(),
        };
        Arc::new(Self { pool, table: Mutex::new(table) })
    }

    /// The frame pool.
    pub fn pool(&self) -> &Arc<FramePool> {
        &self.pool
    }

    /// The table, locked: for reading many frames in one go (a stable tree
    /// search). The innermost lock (module docs): take no other lock, and
    /// call into no mm, while holding it.
    pub fn table(&self) -> MutexGuard<'_, FrameTable> {
        // Poisoning ignored as in `crate::lock`: a panic ends the run.
        self.table.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What the host knows of frame `pfn`.
    pub fn frame(&self, pfn: Pfn) -> FrameInfo {
        self.table().frame(pfn)
    }

    /// Number of free frames in the pool (returned to the host, or about to be).
    pub fn nr_free_frames(&self) -> u64 {
        self.table().nr_free_frames()
    }

    /// Counters since the table was made.
    pub fn stats(&self) -> FrameStats {
        self.table().stats
    }

    /// Reserves free frames [first, end) for the VMM's own use (a guest's
    /// boot memory, as `memblock_reserve`): referenced once, never mapped
    /// by a pte, never freed.
    pub fn reserve(&self, first: Pfn, end: Pfn) -> Result<(), PrimaryMmuError> {
        self.table().claim(&self.pool, first, end, false)
    }

    /// Takes free frames [first, end) as the frames a new mm maps, one pte each.
    pub(super) fn claim_mapped(&self, first: Pfn, end: Pfn) -> Result<(), PrimaryMmuError> {
        self.table().claim(&self.pool, first, end, true)
    }

    /// `get_page`: one more reference (a pin) on an allocated frame.
    pub fn get_page(&self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        self.table().get_page(pfn)
    }

    /// `ksm_get_folio` with a reference: pins `pfn` if it is still the KSM
    /// page that `owner` tags, in one step, so that it cannot be freed (and
    /// reused) while its pin is held; false if it is not (the stable node
    /// went stale).
    pub fn get_ksm_page(&self, pfn: Pfn, owner: u32) -> bool {
        let mut table = self.table();
        let f = table.frame(pfn);
        f.refcount > 0 && f.ksm && f.ksm_owner == owner && table.get_page(pfn).is_ok()
    }

    /// `put_page`: drops a reference; the last one frees the frame, which
    /// goes back to the host at the next [`Frames::flush_holes`] (a caller
    /// freeing many frames flushes once; allocation flushes first). Returns
    /// whether it was the last.
    pub fn put_page(&self, pfn: Pfn) -> Result<bool, PrimaryMmuError> {
        self.table().put_page(pfn)
    }

    /// A pte now maps `new` instead of `old`: see [`FrameTable`]'s `remap`.
    pub(super) fn remap(&self, new: Pfn, old: Option<Pfn>) -> Result<bool, PrimaryMmuError> {
        self.table().remap(new, old)
    }

    /// A pte no longer maps `pfn`; returns whether the frame was freed.
    pub(super) fn unmap(&self, pfn: Pfn) -> Result<bool, PrimaryMmuError> {
        self.table().unmap(pfn)
    }

    /// Takes a free frame (zero-filled), with one reference held by the caller.
    pub fn alloc_page(&self) -> Result<Pfn, PrimaryMmuError> {
        self.table().alloc_page(&self.pool)
    }

    /// Returns every freed frame of the pool to the host: one
    /// fallocate(PUNCH_HOLE) per run of contiguous frames (one per frame
    /// costs about 5 us here), then the frames join the free list. Holds the
    /// table's lock meanwhile, so that a frame is never both free and still
    /// holding memory. Deliberate difference (crate docs): Linux frees into
    /// its page allocator at once; here "free" means "given back to the
    /// host", which is worth batching.
    pub fn flush_holes(&self) -> Result<(), PrimaryMmuError> {
        self.table().flush_holes(&self.pool)
    }

    /// Marks a frame as a KSM page owned by `owner` (the deduplicator's
    /// stable node tag; 0 for none), or clears the mark.
    pub fn set_ksm_owner(&self, pfn: Pfn, ksm: bool, owner: u32) {
        self.table().set_ksm_owner(pfn, ksm, owner);
    }

    /// Copies frame `from` into frame `to` through the direct map.
    pub fn copy_frame(&self, from: Pfn, to: Pfn) -> Result<(), PrimaryMmuError> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        let mem = self.pool.direct_map();
        let failed = |source| PrimaryMmuError::CopyFrame { from, to, source };
        mem.read_slice(&mut buf, GuestAddress(from << PAGE_SHIFT)).map_err(failed)?;
        mem.write_slice(&buf, GuestAddress(to << PAGE_SHIFT)).map_err(failed)?;
        Ok(())
    }
}

/// The frame table as one mm uses it: each call locks the table briefly,
/// and this mm's own counters ([`super::HostStats`]) count the frames it
/// allocates and frees.
impl PrimaryMmu {
    /// What the host knows of frame `pfn`.
    pub fn frame(&self, pfn: Pfn) -> FrameInfo {
        self.frames.frame(pfn)
    }

    /// Number of free frames in the pool (returned to the host, or about to
    /// be), which every mm over it shares.
    pub fn nr_free_frames(&self) -> u64 {
        self.frames.nr_free_frames()
    }

    /// `get_page`: one more reference (a pin) on an allocated frame.
    pub fn get_page(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        self.frames.get_page(pfn)
    }

    /// `put_page`: drops a reference; the last one frees the frame, which
    /// goes back to the host at the next [`PrimaryMmu::flush_holes`] (a caller
    /// freeing many frames flushes once; allocation flushes first).
    pub fn put_page(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        let freed = self.frames.put_page(pfn)?;
        self.stats.frames_freed += u64::from(freed);
        Ok(())
    }

    /// A pte of this mm maps `new` instead of `old`.
    pub(super) fn remap_frame(&mut self, new: Pfn, old: Pfn) -> Result<(), PrimaryMmuError> {
        let freed = self.frames.remap(new, Some(old))?;
        self.stats.frames_freed += u64::from(freed);
        Ok(())
    }

    /// A pte of this mm no longer maps `pfn`.
    pub(super) fn unmap_frame(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        let freed = self.frames.unmap(pfn)?;
        self.stats.frames_freed += u64::from(freed);
        Ok(())
    }

    /// Returns every freed frame of the pool to the host
    /// ([`Frames::flush_holes`]).
    pub fn flush_holes(&mut self) -> Result<(), PrimaryMmuError> {
        self.frames.flush_holes()
    }

    /// Marks a frame as a KSM page (or not), without an owner.
    pub fn set_ksm(&mut self, pfn: Pfn, ksm: bool) {
        self.frames.set_ksm_owner(pfn, ksm, 0);
    }

    /// Marks a frame as a KSM page owned by `owner` (the deduplicator's
    /// stable node tag), or clears the mark.
    pub fn set_ksm_owner(&mut self, pfn: Pfn, ksm: bool, owner: u32) {
        self.frames.set_ksm_owner(pfn, ksm, owner);
    }

    /// Takes a free frame of the pool (zero-filled), with one reference held
    /// by the caller.
    pub fn alloc_page(&mut self) -> Result<Pfn, PrimaryMmuError> {
        let pfn = self.frames.alloc_page()?;
        self.stats.frames_allocated += 1;
        Ok(pfn)
    }

    /// Copies frame `from` into frame `to` through the direct map.
    pub fn copy_frame(&self, from: Pfn, to: Pfn) -> Result<(), PrimaryMmuError> {
        self.frames.copy_frame(from, to)
    }
}
