//! Batch protection of the primary MMU: a soft-dirty round (`clear_refs`
//! 4, fs/proc/task_mmu.c) and `mprotect` (mm/mprotect.c). Each changes the
//! ptes of a whole range inside one notifier range whose event and new
//! protection say what happens, without `set_pte_at_notify` and without
//! USE_CHANGE_PTE: a secondary MMU infers the update from the range
//! ([`MmuNotifierRange::update_to_read_only`]). Frames never move here.
//!
//! Deliberate differences (crate docs): protection is kept per page (the
//! one vma splits at page granularity), only read-only and read-write
//! exist, a range is one notifier range (Linux opens one per populated
//! PUD-sized chunk for mprotect, and one over the whole mm for
//! `clear_refs`), and no pte is skipped as DMA-pinned (nothing pins a
//! guest frame across a round here).

use std::ops::Range;

use super::cow::frame_exclusive;
use super::{FrameInfo, PrimaryMmu, PrimaryMmuError, Pte};
use crate::mmu_notifier::{Gfn, MmuNotifierRange, MmuNotifyEvent, Protection};

impl PrimaryMmu {
    /// `clear_refs_write` with CLEAR_REFS_SOFT_DIRTY (4) over guest pages
    /// [start, end): inside one SOFT_DIRTY range, every pte becomes
    /// read-only on the same frame and loses its soft-dirty bit
    /// (`clear_soft_dirty`: `pte_wrprotect`, `pte_clear_soft_dirty`).
    /// Returns how many ptes it write-protected (those that were writable).
    ///
    /// The next write to a page faults ([`PrimaryMmu::get_user_page`] with
    /// `write`): a frame the page alone maps is made writable again in
    /// place and soft-dirty (`wp_page_reuse`); a KSM or shared frame is
    /// copied, as any copy-on-write break.
    pub fn clear_refs_soft_dirty(&mut self, start: Gfn, end: Gfn) -> Result<u64, PrimaryMmuError> {
        let written = self.nr_soft_dirty(start, end)?;
        let pages = self.page_indices(start, end)?;
        let range = MmuNotifierRange::protection(start, end, MmuNotifyEvent::SoftDirty, Protection::ReadOnly);
        let write_protected =
            if pages.is_empty() { 0 } else { self.within_range(&range, |mm| Ok(mm.clear_soft_dirty(pages)))? };
        self.stats.soft_dirty_rounds += 1;
        self.stats.soft_dirty_pages += written;
        Ok(write_protected)
    }

    /// `mprotect` of guest pages [start, end) to read-only or read-write,
    /// inside one PROTECTION_VMA range carrying the new protection. Returns
    /// how many ptes changed.
    ///
    /// To read-only: every writable pte becomes read-only on its frame
    /// (soft-dirty kept, as `pte_modify` keeps it), and a later write fault
    /// on the range is refused ([`PrimaryMmuError::WriteToReadOnlyVma`]).
    ///
    /// Back to read-write, as `change_pte_range` with
    /// MM_CP_TRY_CHANGE_WRITABLE does for a private writable mapping: the
    /// vma allows writes again, but a pte is made writable only where
    /// `can_change_pte_writable` allows it (Linux 6.2 and later, "allow
    /// clean exclusive anon pages to be writable"): the page is exclusive
    /// anonymous memory (mapped once, not a KSM page) and soft-dirty
    /// tracking needs no write fault for it (`pte_needs_soft_dirty_wp`: the
    /// pte is soft-dirty, or no round ever ran, which here means the same,
    /// every pte starting soft-dirty). Every other pte stays read-only and
    /// its next write faults as usual.
    pub fn mprotect(&mut self, start: Gfn, end: Gfn, writable: bool) -> Result<u64, PrimaryMmuError> {
        let pages = self.page_indices(start, end)?;
        if pages.is_empty() {
            return Ok(0);
        }
        let prot = if writable { Protection::ReadWrite } else { Protection::ReadOnly };
        let range = MmuNotifierRange::protection(start, end, MmuNotifyEvent::ProtectionVma, prot);
        self.within_range(&range, |mm| Ok(mm.change_protection(pages, writable)))
    }

    /// Whether a write fault on `gfn` may be served: the vma it lies in
    /// allows writes (VM_WRITE).
    pub fn vma_writable(&self, gfn: Gfn) -> Result<bool, PrimaryMmuError> {
        Ok(self.vm_write[self.index(gfn)?])
    }

    /// The pages of [start, end) whose pte is soft-dirty, in order: those
    /// /proc/PID/pagemap would report with bit 55 (PM_SOFT_DIRTY) set, the
    /// pages written since the last round (every page before the first).
    pub fn soft_dirty_pages(&self, start: Gfn, end: Gfn) -> Result<Vec<Gfn>, PrimaryMmuError> {
        let pages = self.page_indices(start, end)?;
        Ok((start..).zip(&self.ptes[pages]).filter(|(_, pte)| pte.soft_dirty).map(|(gfn, _)| gfn).collect())
    }

    /// How many pages of [start, end) were written since the last round
    /// (are soft-dirty).
    pub fn nr_soft_dirty(&self, start: Gfn, end: Gfn) -> Result<u64, PrimaryMmuError> {
        let pages = self.page_indices(start, end)?;
        Ok(self.ptes[pages].iter().filter(|pte| pte.soft_dirty).count() as u64)
    }

    /// The page-table indices of guest pages [start, end), which must lie in
    /// guest RAM (an empty range anywhere in it is fine).
    fn page_indices(&self, start: Gfn, end: Gfn) -> Result<Range<usize>, PrimaryMmuError> {
        let (first, last) = self.guest_range();
        if start > end || start < first || end > last {
            return Err(PrimaryMmuError::BadRange { start, end });
        }
        Ok((start - first) as usize..(end - first) as usize)
    }

    /// `clear_soft_dirty` on each pte of `pages`; returns how many were
    /// writable.
    fn clear_soft_dirty(&mut self, pages: Range<usize>) -> u64 {
        let mut write_protected = 0;
        for pte in &mut self.ptes[pages] {
            write_protected += u64::from(pte.writable);
            *pte = Pte { writable: false, soft_dirty: false, ..*pte };
        }
        self.stats.batch_wrprotected += write_protected;
        write_protected
    }

    /// `change_protection` over `pages`: the vma's write permission, then
    /// each pte's; returns how many ptes changed.
    fn change_protection(&mut self, pages: Range<usize>, writable: bool) -> u64 {
        let mut changed = 0;
        // One look at the frame table for the whole range.
        let frames = self.frames.clone();
        let table = frames.table();
        for i in pages {
            self.vm_write[i] = writable;
            let pte = self.ptes[i];
            let change = if writable {
                !pte.writable && can_change_pte_writable(pte, table.frame(pte.pfn))
            } else {
                pte.writable
            };
            if change {
                self.ptes[i].writable = writable;
                changed += 1;
            }
        }
        if !writable {
            self.stats.batch_wrprotected += changed;
        }
        changed
    }
}

/// `can_change_pte_writable` for a private anonymous mapping whose vma
/// allows writes: soft-dirty tracking needs no write fault for the pte, and
/// the page (`frame`, what the table knows of `pte.pfn`) is exclusive (the
/// write fault would reuse it anyway).
fn can_change_pte_writable(pte: Pte, frame: FrameInfo) -> bool {
    pte.soft_dirty && frame_exclusive(frame)
}
