//! Frame accounting of the primary MMU: what the host knows of each frame
//! (`struct page`: references, maps, the KSM mark), the free list, and
//! freed frames given back to the host.

use vm_memory::{Bytes, GuestAddress};

use super::{PrimaryMmu, PrimaryMmuError};
use crate::frame_pool::{Pfn, PAGE_SHIFT, PAGE_SIZE};

/// What the host knows of one frame (`struct page`, the parts used here).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FrameInfo {
    /// References: maps plus pins. Zero means free.
    pub refcount: u32,
    /// Host ptes that map the frame.
    pub mapcount: u32,
    /// Whether the frame is a KSM page (never reused on a write fault).
    pub ksm: bool,
    /// Which stable node owns the KSM page (the deduplicator's tag, as
    /// `page->mapping` points at the stable node in Linux); 0 when none.
    /// Freeing the frame clears it, so a stale stable node never matches a
    /// frame that was freed and reused.
    pub ksm_owner: u32,
}

/// The frames of a new [`PrimaryMmu`]: below `first_gfn` the VMM's own
/// (referenced once, never mapped), up to `end_gfn` each mapped by its guest
/// page, the rest free.
pub(super) fn initial_frames(nr_frames: u64, first_gfn: u64, end_gfn: u64) -> Vec<FrameInfo> {
    (0..nr_frames)
        .map(|pfn| match pfn {
            p if p < first_gfn => FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() },
            p if p < end_gfn => FrameInfo { refcount: 1, mapcount: 1, ..FrameInfo::default() },
            _ => FrameInfo::default(),
        })
        .collect()
}

impl PrimaryMmu {
    /// What the host knows of frame `pfn`.
    pub fn frame(&self, pfn: Pfn) -> FrameInfo {
        self.frames.get(pfn as usize).copied().unwrap_or_default()
    }

    /// Number of free frames (returned to the host, or about to be).
    pub fn nr_free_frames(&self) -> u64 {
        (self.free_frames.len() + self.pending_holes.len()) as u64
    }

    /// `get_page`: one more reference (a pin) on an allocated frame.
    pub fn get_page(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        match self.frames.get_mut(pfn as usize) {
            Some(f) if f.refcount > 0 => {
                f.refcount += 1;
                Ok(())
            }
            _ => Err(PrimaryMmuError::BadFrame(pfn)),
        }
    }

    /// `put_page`: drops a reference; the last one frees the frame, which
    /// goes back to the host at the next [`PrimaryMmu::flush_holes`] (a caller
    /// freeing many frames flushes once; allocation flushes first).
    pub fn put_page(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        let f = self.frames.get_mut(pfn as usize).filter(|f| f.refcount > 0).ok_or(PrimaryMmuError::BadFrame(pfn))?;
        f.refcount -= 1;
        if f.refcount == 0 {
            *f = FrameInfo::default();
            self.pending_holes.push(pfn);
            self.stats.frames_freed += 1;
        }
        Ok(())
    }

    /// A pte now maps allocated frame `pfn`: one more map and reference.
    pub(super) fn map_frame(&mut self, pfn: Pfn) {
        let f = &mut self.frames[pfn as usize];
        f.refcount += 1;
        f.mapcount += 1;
    }

    /// A pte no longer maps frame `pfn`: one map and one reference fewer.
    pub(super) fn unmap_frame(&mut self, pfn: Pfn) -> Result<(), PrimaryMmuError> {
        self.frames[pfn as usize].mapcount -= 1;
        self.put_page(pfn)
    }

    /// Returns every freed frame to the host: one fallocate(PUNCH_HOLE) per
    /// run of contiguous frames (one per frame costs about 5 us here), then
    /// the frames join the free list. Deliberate difference (crate docs):
    /// Linux frees into its page allocator at once; here "free" means
    /// "given back to the host", which is worth batching.
    pub fn flush_holes(&mut self) -> Result<(), PrimaryMmuError> {
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
            self.pool.punch_holes(start, n)?;
            i += n as usize;
        }
        self.free_frames.extend(pending);
        Ok(())
    }

    /// Marks a frame as a KSM page (or not), without an owner.
    pub fn set_ksm(&mut self, pfn: Pfn, ksm: bool) {
        self.set_ksm_owner(pfn, ksm, 0);
    }

    /// Marks a frame as a KSM page owned by `owner` (the deduplicator's
    /// stable node tag), or clears the mark.
    pub fn set_ksm_owner(&mut self, pfn: Pfn, ksm: bool, owner: u32) {
        if let Some(f) = self.frames.get_mut(pfn as usize) {
            f.ksm = ksm;
            f.ksm_owner = if ksm { owner } else { 0 };
        }
    }

    /// Takes a free frame (zero-filled), with one reference held by the caller.
    pub fn alloc_page(&mut self) -> Result<Pfn, PrimaryMmuError> {
        if self.free_frames.is_empty() {
            self.flush_holes()?;
        }
        let pfn = self.free_frames.pop().ok_or(PrimaryMmuError::OutOfFrames)?;
        self.frames[pfn as usize] = FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() };
        self.stats.frames_allocated += 1;
        Ok(pfn)
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
