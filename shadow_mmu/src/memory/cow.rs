//! Write faults of the primary MMU: `get_user_page` for the secondary MMU's
//! fault, and the copy-on-write break of mm/memory.c (`do_wp_page`,
//! `wp_page_reuse`, `wp_page_copy`).

use super::{change_pte_range, FrameInfo, PrimaryMmu, PrimaryMmuError, Pte};
use crate::mmu_notifier::Gfn;

impl PrimaryMmu {
    /// `get_user_pages` of one page for the secondary MMU's fault (the
    /// "gup"): a write breaks copy-on-write first (FOLL_WRITE), and is
    /// refused on a page mprotect'ed read-only.
    pub fn get_user_page(&mut self, gfn: Gfn, write: bool) -> Result<Pte, PrimaryMmuError> {
        if write {
            self.do_wp_page(gfn)
        } else {
            self.pte(gfn)
        }
    }

    /// `do_wp_page`: a write fault on a read-only pte. A page whose vma is
    /// read-only is refused (the vma check of gup's `check_vma_flags` and
    /// the CPU fault's `access_error`, made here since every write fault
    /// comes through). A frame mapped only here and not a KSM page is
    /// reused (made writable in place, as `wp_page_reuse`; no notifier,
    /// since secondary MMUs map it read-only at most and refault on write):
    /// the write fault after a soft-dirty round. Anything else is copied.
    /// Either way the pte becomes soft-dirty (`pte_mkdirty`).
    pub fn do_wp_page(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let i = self.index(gfn)?;
        let pte = self.ptes[i];
        if pte.writable {
            return Ok(pte);
        }
        if !self.vm_write[i] {
            return Err(PrimaryMmuError::WriteToReadOnlyVma(gfn));
        }
        if self.page_exclusive(pte.pfn) {
            self.ptes[i] = Pte { writable: true, soft_dirty: true, ..pte };
            self.stats.cow_reuses += 1;
            return Ok(self.ptes[i]);
        }
        self.wp_page_copy(gfn)
    }

    /// Whether a write may reuse frame `pfn` in place ([`frame_exclusive`]).
    fn page_exclusive(&self, pfn: crate::frame_pool::Pfn) -> bool {
        frame_exclusive(self.frame(pfn))
    }

    /// `wp_page_copy`: a write to a read-only pte whose frame is shared.
    /// Copies the frame and maps the copy writable and soft-dirty, inside a
    /// range that carries USE_CHANGE_PTE (read-only -> read-write, new
    /// frame).
    pub fn wp_page_copy(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let old = self.pte(gfn)?;
        let new_pfn = self.alloc_page()?;
        self.copy_frame(old.pfn, new_pfn)?;
        let new = Pte { pfn: new_pfn, writable: true, soft_dirty: true };
        let range = change_pte_range(gfn);
        let result = self.within_range(&range, |mm| mm.set_pte_at_notify(&range, gfn, new));
        // The allocation's own reference: the pte holds one now.
        self.put_page(new_pfn)?;
        result?;
        self.stats.cow_copies += 1;
        Ok(new)
    }

    /// The unshare fault (`do_wp_page` with FAULT_FLAG_UNSHARE, as KSM's
    /// `break_ksm` raises it): `gfn` gets its own copy of the frame it maps,
    /// mapped read-only (an unshare is not a write: no `maybe_mkwrite`),
    /// inside a range carrying USE_CHANGE_PTE (read-only -> read-only, new
    /// frame, as `replace_page`). The soft-dirty bit is kept. A later write
    /// finds the copy mapped once and reuses it in place.
    pub fn unshare(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let old = self.pte(gfn)?;
        let new_pfn = self.alloc_page()?;
        self.copy_frame(old.pfn, new_pfn)?;
        let new = Pte { pfn: new_pfn, writable: false, soft_dirty: old.soft_dirty };
        let range = change_pte_range(gfn);
        let result = self.within_range(&range, |mm| mm.set_pte_at_notify(&range, gfn, new));
        self.put_page(new_pfn)?;
        result?;
        self.stats.unshare_copies += 1;
        Ok(new)
    }
}

/// Whether a write may reuse a frame in place: mapped by one pte (in any
/// mm), with no other reference (a pin, such as the deduplicator's while it
/// merges), and not a KSM page (`PageAnonExclusive`, which a KSM page never
/// is).
pub(super) fn frame_exclusive(f: FrameInfo) -> bool {
    !f.ksm && f.mapcount == 1 && f.refcount == 1
}
