//! The primary MMU: the host page table over guest RAM, after mm/memory.c.
//!
//! Each guest page has a host pte (frame, writable); each frame has a map
//! count (ptes that map it) and a reference count (maps plus pins). Every
//! change of a pte happens inside an mmu notifier range and, for a single
//! pte, through [`PrimaryMmu::set_pte_at_notify`], so every registered secondary
//! MMU hears of it. A frame whose last reference goes is returned to the
//! host (a hole punched in the frame pool's memfd).
//!
//! Deliberate differences from Linux: there is one "vma", the guest range,
//! and no swap or migration, so guest ptes are always present; the pte lock
//! and mmap lock are the one `Mutex` the owner keeps this in.

use std::sync::{Arc, Mutex, PoisonError};

use vm_memory::{Bytes, GuestAddress};

use crate::frame_pool::{FramePool, FramePoolError, Pfn, PAGE_SHIFT, PAGE_SIZE};
use crate::mmu_notifier::{
    check_change_pte, Gfn, IllegalChangePte, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, RangeFlags,
};

/// A host pte of guest RAM (always present).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pte {
    /// The frame it maps.
    pub pfn: Pfn,
    /// Whether writes are allowed.
    pub writable: bool,
}

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

/// Counters of the primary MMU since it was created.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct HostStats {
    /// Write faults on read-only ptes served by copying (`wp_page_copy`).
    pub cow_copies: u64,
    /// Write faults on read-only ptes served by reusing the frame (`wp_page_reuse`).
    pub cow_reuses: u64,
    /// Frames returned to the host.
    pub frames_freed: u64,
    /// Frames allocated from the free list.
    pub frames_allocated: u64,
    /// Notifier ranges opened.
    pub notifier_ranges: u64,
    /// `change_pte` notifications sent.
    pub change_pte_calls: u64,
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
    /// The frame pool failed.
    #[error(transparent)]
    Pool(#[from] FramePoolError),
    /// A guest memory access through the direct map failed.
    #[error("guest memory access at {gpa:#x} failed: {reason}")]
    Access {
        /// Guest-physical address.
        gpa: u64,
        /// What failed.
        reason: String,
    },
    /// The VMM wrote to a page whose pte is read-only.
    #[error("write to gfn {0:#x} whose host pte is read-only")]
    ReadOnly(Gfn),
}

/// A registered secondary MMU.
pub type Subscriber = Arc<Mutex<dyn MmuNotifier>>;

/// The host page table of guest RAM and its notifier chain (`struct mm_struct`).
pub struct PrimaryMmu {
    pool: Arc<FramePool>,
    first_gfn: Gfn,
    ptes: Vec<Pte>,
    frames: Vec<FrameInfo>,
    free_frames: Vec<Pfn>,
    /// Freed frames whose holes are not punched yet (see [`PrimaryMmu::flush_holes`]).
    pending_holes: Vec<Pfn>,
    subscribers: Vec<Subscriber>,
    stats: HostStats,
}

impl std::fmt::Debug for PrimaryMmu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PrimaryMmu")
            .field("first_gfn", &self.first_gfn)
            .field("pages", &self.ptes.len())
            .field("free_frames", &self.free_frames.len())
            .field("subscribers", &self.subscribers.len())
            .field("stats", &self.stats)
            .finish()
    }
}

impl PrimaryMmu {
    /// Maps guest pages [first_gfn, end_gfn) one to one onto the same
    /// frames, writable. Frames below `first_gfn` are the VMM's own (boot
    /// memory): referenced once, never mapped here, never freed. Frames from
    /// `end_gfn` to the end of the pool start free.
    ///
    /// Deliberate difference: Linux allocates a page for every copy-on-write
    /// break; this pool is fixed. Guest pages map at most as many distinct
    /// frames as there are guest pages, so one spare frame past `end_gfn`
    /// guarantees that a copy always finds a free frame, even when every
    /// other frame is mapped (a KSM page mapped once is copied, not reused).
    pub fn new(pool: Arc<FramePool>, first_gfn: Gfn, end_gfn: Gfn) -> Self {
        let nr_frames = pool.nr_frames();
        let end_gfn = end_gfn.min(nr_frames);
        let ptes = (first_gfn..end_gfn).map(|gfn| Pte { pfn: gfn, writable: true }).collect();
        let frames = (0..nr_frames)
            .map(|pfn| match pfn {
                p if p < first_gfn => FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() },
                p if p < end_gfn => FrameInfo { refcount: 1, mapcount: 1, ..FrameInfo::default() },
                _ => FrameInfo::default(),
            })
            .collect();
        let free_frames = (end_gfn..nr_frames).rev().collect();
        Self {
            pool,
            first_gfn,
            ptes,
            frames,
            free_frames,
            pending_holes: Vec::new(),
            subscribers: Vec::new(),
            stats: HostStats::default(),
        }
    }

    /// `mmu_notifier_register`: `sub` hears of every later change.
    pub fn mmu_notifier_register(&mut self, sub: Subscriber) {
        self.subscribers.push(sub);
    }

    /// The frame pool.
    pub fn pool(&self) -> &Arc<FramePool> {
        &self.pool
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

    /// What the host knows of frame `pfn`.
    pub fn frame(&self, pfn: Pfn) -> FrameInfo {
        self.frames.get(pfn as usize).copied().unwrap_or_default()
    }

    /// Counters since creation.
    pub fn stats(&self) -> HostStats {
        self.stats
    }

    /// Number of free frames (returned to the host, or about to be).
    pub fn nr_free_frames(&self) -> u64 {
        (self.free_frames.len() + self.pending_holes.len()) as u64
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

    /// Returns every freed frame to the host: one fallocate(PUNCH_HOLE) per
    /// run of contiguous frames (one per frame costs about 5 us here), then
    /// the frames join the free list. Deliberate difference: Linux frees
    /// into its page allocator at once; here "free" means "given back to the
    /// host", which is worth batching.
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

    /// `set_pte_at_notify`: inside `range`, tells every secondary MMU that
    /// `gfn`'s pte becomes `new` (`change_pte`), then sets it and moves the
    /// frame references. With USE_CHANGE_PTE on the range, only the three
    /// legal transitions are accepted, in every build.
    pub fn set_pte_at_notify(&mut self, range: &MmuNotifierRange, gfn: Gfn, new: Pte) -> Result<Pte, PrimaryMmuError> {
        let i = self.index(gfn)?;
        if !range.contains(gfn) {
            return Err(PrimaryMmuError::OutsideRange { gfn, start: range.start, end: range.end });
        }
        let old = self.ptes[i];
        if range.use_change_pte() {
            check_change_pte(gfn, old, new)?;
        }
        if self.frame(new.pfn).refcount == 0 {
            return Err(PrimaryMmuError::BadFrame(new.pfn));
        }
        self.stats.change_pte_calls += 1;
        self.notify(|s| s.change_pte(gfn, new));
        self.ptes[i] = new;
        if new.pfn != old.pfn {
            let f = &mut self.frames[new.pfn as usize];
            f.refcount += 1;
            f.mapcount += 1;
            self.frames[old.pfn as usize].mapcount -= 1;
            self.put_page(old.pfn)?;
        }
        Ok(old)
    }

    /// Copies frame `from` into frame `to` through the direct map.
    pub fn copy_frame(&self, from: Pfn, to: Pfn) -> Result<(), PrimaryMmuError> {
        let mut buf = [0u8; PAGE_SIZE as usize];
        let mem = self.pool.direct_map();
        let access =
            |e: vm_memory::GuestMemoryError| PrimaryMmuError::Access { gpa: from << PAGE_SHIFT, reason: e.to_string() };
        mem.read_slice(&mut buf, GuestAddress(from << PAGE_SHIFT)).map_err(access)?;
        mem.write_slice(&buf, GuestAddress(to << PAGE_SHIFT)).map_err(access)?;
        Ok(())
    }

    /// `wp_page_copy`: a write to a read-only pte whose frame is shared.
    /// Copies the frame and maps the copy writable, inside a range that
    /// carries USE_CHANGE_PTE (read-only -> read-write, new frame).
    pub fn wp_page_copy(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let old = self.pte(gfn)?;
        let new_pfn = self.alloc_page()?;
        self.copy_frame(old.pfn, new_pfn)?;
        let new = Pte { pfn: new_pfn, writable: true };
        let range =
            MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE | RangeFlags::USE_CHANGE_PTE);
        self.invalidate_range_start(&range);
        let result = self.set_pte_at_notify(&range, gfn, new);
        self.invalidate_range_end(&range);
        // The allocation's own reference: the pte holds one now.
        self.put_page(new_pfn)?;
        result?;
        self.stats.cow_copies += 1;
        Ok(new)
    }

    /// `do_wp_page`: a write fault on a read-only pte. A frame mapped only
    /// here and not a KSM page is reused (made writable in place, as
    /// `wp_page_reuse`; no notifier, since secondary MMUs map it read-only
    /// at most and refault on write); anything else is copied.
    pub fn do_wp_page(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let i = self.index(gfn)?;
        let pte = self.ptes[i];
        if pte.writable {
            return Ok(pte);
        }
        let f = self.frame(pte.pfn);
        if !f.ksm && f.mapcount == 1 && f.refcount == 1 {
            self.ptes[i].writable = true;
            self.stats.cow_reuses += 1;
            return Ok(self.ptes[i]);
        }
        self.wp_page_copy(gfn)
    }

    /// `get_user_pages` of one page for the secondary MMU's fault (the
    /// "gup"): a write breaks copy-on-write first (FOLL_WRITE).
    pub fn get_user_page(&mut self, gfn: Gfn, write: bool) -> Result<Pte, PrimaryMmuError> {
        if write {
            self.do_wp_page(gfn)
        } else {
            self.pte(gfn)
        }
    }

    /// KSM's `write_protect_page`: inside a CLEAR range with USE_CHANGE_PTE,
    /// makes `gfn`'s pte read-only on the same frame (read-write ->
    /// read-only). A pte already read-only is left alone, but the range is
    /// still announced, as in mm/ksm.c.
    pub fn write_protect_page(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let pte = self.pte(gfn)?;
        let range =
            MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE | RangeFlags::USE_CHANGE_PTE);
        self.invalidate_range_start(&range);
        let result = if pte.writable {
            self.set_pte_at_notify(&range, gfn, Pte { pfn: pte.pfn, writable: false })
        } else {
            Ok(pte)
        };
        self.invalidate_range_end(&range);
        result.map(|_| Pte { pfn: pte.pfn, writable: false })
    }

    /// KSM's `replace_page`: inside a CLEAR range with USE_CHANGE_PTE, maps
    /// `gfn` read-only onto `kpfn` instead of its own (read-only) frame,
    /// which loses a reference and is freed if that was the last.
    pub fn replace_page(&mut self, gfn: Gfn, kpfn: Pfn) -> Result<(), PrimaryMmuError> {
        let range =
            MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE | RangeFlags::USE_CHANGE_PTE);
        self.invalidate_range_start(&range);
        let result = self.set_pte_at_notify(&range, gfn, Pte { pfn: kpfn, writable: false });
        self.invalidate_range_end(&range);
        result.map(|_| ())
    }

    fn frame_of(&self, gpa: u64) -> Result<(Pfn, bool), PrimaryMmuError> {
        let gfn = gpa >> PAGE_SHIFT;
        if gfn < self.first_gfn {
            return Ok((gfn, true)); // the VMM's boot memory is identity-mapped
        }
        let pte = self.pte(gfn)?;
        Ok((pte.pfn, pte.writable))
    }

    /// Reads guest-physical memory as the guest would see it now.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> Result<(), PrimaryMmuError> {
        self.access_guest(
            gpa,
            buf.len(),
            |mem, host, at, len| mem.read_slice(&mut buf[at..at + len], host).map_err(|e| e.to_string()),
            false,
        )
    }

    /// Writes guest-physical memory; every page written must have a writable
    /// pte (break copy-on-write first with [`PrimaryMmu::get_user_page`]).
    pub fn write_guest(&mut self, gpa: u64, data: &[u8]) -> Result<(), PrimaryMmuError> {
        self.access_guest(
            gpa,
            data.len(),
            |mem, host, at, len| mem.write_slice(&data[at..at + len], host).map_err(|e| e.to_string()),
            true,
        )
    }

    fn access_guest(
        &self,
        gpa: u64,
        len: usize,
        mut op: impl FnMut(&vm_memory::GuestMemoryMmap, GuestAddress, usize, usize) -> Result<(), String>,
        write: bool,
    ) -> Result<(), PrimaryMmuError> {
        let mut done = 0usize;
        while done < len {
            let at = gpa + done as u64;
            let in_page = ((PAGE_SIZE - (at & (PAGE_SIZE - 1))) as usize).min(len - done);
            let (pfn, writable) = self.frame_of(at)?;
            if write && !writable {
                return Err(PrimaryMmuError::ReadOnly(at >> PAGE_SHIFT));
            }
            let host = GuestAddress((pfn << PAGE_SHIFT) | (at & (PAGE_SIZE - 1)));
            op(self.pool.direct_map(), host, done, in_page)
                .map_err(|reason| PrimaryMmuError::Access { gpa: at, reason })?;
            done += in_page;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mmu_notifier::MmuNotifier;

    #[derive(Default)]
    struct Log(Vec<String>);

    impl MmuNotifier for Log {
        fn invalidate_range_start(&mut self, r: &MmuNotifierRange) {
            self.0.push(format!("start {}..{} {:?} cp={}", r.start, r.end, r.event, r.use_change_pte()));
        }
        fn invalidate_range_end(&mut self, r: &MmuNotifierRange) {
            self.0.push(format!("end {}..{}", r.start, r.end));
        }
        fn change_pte(&mut self, gfn: Gfn, pte: Pte) {
            self.0.push(format!("change_pte {gfn} -> {} {}", pte.pfn, if pte.writable { "rw" } else { "ro" }));
        }
    }

    fn mm(pages: u64) -> (PrimaryMmu, Arc<Mutex<Log>>) {
        let pool = Arc::new(FramePool::new(pages * PAGE_SIZE).expect("pool"));
        let mut mm = PrimaryMmu::new(pool, 2, pages);
        let log = Arc::new(Mutex::new(Log::default()));
        mm.mmu_notifier_register(log.clone());
        (mm, log)
    }

    fn taken(log: &Arc<Mutex<Log>>) -> Vec<String> {
        std::mem::take(&mut log.lock().expect("log").0)
    }

    #[test]
    fn starts_identity_mapped_and_writable() {
        let (mm, _) = mm(8);
        assert_eq!(mm.guest_range(), (2, 8));
        assert_eq!(mm.pte(5).expect("pte"), Pte { pfn: 5, writable: true });
        assert_eq!(mm.frame(5), FrameInfo { refcount: 1, mapcount: 1, ..FrameInfo::default() });
        assert_eq!(mm.frame(1), FrameInfo { refcount: 1, mapcount: 0, ..FrameInfo::default() });
        assert!(matches!(mm.pte(1), Err(PrimaryMmuError::NotGuestRam(1))));
    }

    #[test]
    fn merge_then_cow_goes_through_the_notifier_in_linux_order() {
        let (mut mm, log) = mm(8);
        mm.write_guest(4 << PAGE_SHIFT, b"same").expect("write");
        mm.write_guest(5 << PAGE_SHIFT, b"same").expect("write");
        mm.write_protect_page(4).expect("wp");
        mm.write_protect_page(5).expect("wp");
        mm.replace_page(5, 4).expect("replace");
        assert_eq!(
            taken(&log),
            vec![
                "start 4..5 Clear cp=true",
                "change_pte 4 -> 4 ro",
                "end 4..5",
                "start 5..6 Clear cp=true",
                "change_pte 5 -> 5 ro",
                "end 5..6",
                "start 5..6 Clear cp=true",
                "change_pte 5 -> 4 ro",
                "end 5..6",
            ]
        );
        assert_eq!(mm.frame(4).mapcount, 2);
        assert_eq!(mm.frame(5).refcount, 0, "the replaced frame is freed");
        assert_eq!(mm.nr_free_frames(), 1);
        // A write to the shared frame copies it into the freed one.
        let pte = mm.get_user_page(5, true).expect("cow");
        assert_eq!(pte, Pte { pfn: 5, writable: true });
        assert_eq!(taken(&log), vec!["start 5..6 Clear cp=true", "change_pte 5 -> 5 rw", "end 5..6"]);
        let mut buf = [0u8; 4];
        mm.read_guest(5 << PAGE_SHIFT, &mut buf).expect("read");
        assert_eq!(&buf, b"same");
        // Page 4 is now alone on its frame and not KSM: reused, no notifier.
        assert_eq!(mm.get_user_page(4, true).expect("reuse"), Pte { pfn: 4, writable: true });
        assert!(taken(&log).is_empty());
        assert_eq!((mm.stats().cow_copies, mm.stats().cow_reuses), (1, 1));
    }

    #[test]
    fn ksm_frames_are_copied_even_when_mapped_once() {
        let pool = Arc::new(FramePool::new(9 * PAGE_SIZE).expect("pool"));
        let mut mm = PrimaryMmu::new(pool, 2, 8); // one spare frame: 8
        assert_eq!(mm.nr_free_frames(), 1);
        mm.write_protect_page(3).expect("wp");
        mm.set_ksm(3, true);
        mm.write_protect_page(4).expect("wp");
        mm.replace_page(4, 3).expect("replace"); // frees frame 4 (hole not punched yet)
        assert_eq!(mm.get_user_page(4, true).expect("cow").pfn, 8, "the spare frame is taken first");
        assert_eq!(mm.frame(3).mapcount, 1);
        // Every frame is mapped or pending; the copy flushes the pending
        // hole and takes that frame, so it still succeeds.
        assert_eq!(mm.get_user_page(3, true).expect("cow").pfn, 4, "a KSM page is never reused");
        assert_eq!(mm.frame(3).refcount, 0);
        assert_eq!(mm.nr_free_frames(), 1);
        mm.flush_holes().expect("flush");
        // Only the two copies hold memory: the freed KSM frame was punched.
        assert_eq!(mm.pool().resident_bytes().expect("stat"), 2 * PAGE_SIZE);
    }

    #[test]
    fn illegal_use_change_pte_transitions_are_refused_and_nothing_changes() {
        let (mut mm, log) = mm(8);
        let flagged = MmuNotifierRange::page(4, MmuNotifyEvent::Clear, RangeFlags::USE_CHANGE_PTE);
        let cases = [
            (Pte { pfn: 5, writable: false }, true), // RW -> RO other frame
            (Pte { pfn: 4, writable: true }, true),  // RW -> RW same frame
            (Pte { pfn: 5, writable: true }, true),  // RW -> RW other frame
        ];
        for (new, _) in cases {
            assert!(
                matches!(mm.set_pte_at_notify(&flagged, 4, new), Err(PrimaryMmuError::IllegalChangePte(_))),
                "{new:?}"
            );
        }
        mm.write_protect_page(4).expect("wp");
        taken(&log);
        let ro_same = Pte { pfn: 4, writable: false };
        assert!(matches!(mm.set_pte_at_notify(&flagged, 4, ro_same), Err(PrimaryMmuError::IllegalChangePte(_))));
        assert!(taken(&log).is_empty(), "a refused change notifies nobody");
        assert_eq!(mm.pte(4).expect("pte"), Pte { pfn: 4, writable: false });
        // Without the flag the same change is allowed (a secondary MMU must zap).
        let plain = MmuNotifierRange::page(4, MmuNotifyEvent::ProtectionPage, RangeFlags::empty());
        assert!(mm.set_pte_at_notify(&plain, 4, Pte { pfn: 4, writable: true }).is_ok());
        // And a change outside its range is refused.
        assert!(matches!(mm.set_pte_at_notify(&plain, 5, ro_same), Err(PrimaryMmuError::OutsideRange { .. })));
    }

    #[test]
    fn the_vmm_cannot_write_through_a_read_only_pte() {
        let (mut mm, _) = mm(8);
        mm.write_protect_page(6).expect("wp");
        assert!(matches!(mm.write_guest((6 << PAGE_SHIFT) + 4094, b"xyz"), Err(PrimaryMmuError::ReadOnly(6))));
        // Boot memory below the guest range is written directly.
        assert!(mm.write_guest(0x1000, b"gdt").is_ok());
    }
}
