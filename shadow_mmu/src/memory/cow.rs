//! Write faults of the primary MMU: `get_user_page` for the secondary MMU's
//! fault, and the copy-on-write break of mm/memory.c (`do_wp_page`,
//! `wp_page_reuse`, `wp_page_copy`).

use super::{change_pte_range, PrimaryMmu, PrimaryMmuError, Pte};
use crate::mmu_notifier::Gfn;

impl PrimaryMmu {
    /// `get_user_pages` of one page for the secondary MMU's fault (the
    /// "gup"): a write breaks copy-on-write first (FOLL_WRITE).
    pub fn get_user_page(&mut self, gfn: Gfn, write: bool) -> Result<Pte, PrimaryMmuError> {
        if write {
            self.do_wp_page(gfn)
        } else {
            self.pte(gfn)
        }
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

    /// `wp_page_copy`: a write to a read-only pte whose frame is shared.
    /// Copies the frame and maps the copy writable, inside a range that
    /// carries USE_CHANGE_PTE (read-only -> read-write, new frame).
    pub fn wp_page_copy(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let old = self.pte(gfn)?;
        let new_pfn = self.alloc_page()?;
        self.copy_frame(old.pfn, new_pfn)?;
        let new = Pte { pfn: new_pfn, writable: true };
        let range = change_pte_range(gfn);
        let result = self.within_range(&range, |mm| mm.set_pte_at_notify(&range, gfn, new));
        // The allocation's own reference: the pte holds one now.
        self.put_page(new_pfn)?;
        result?;
        self.stats.cow_copies += 1;
        Ok(new)
    }
}
