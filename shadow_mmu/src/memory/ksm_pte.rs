//! KSM's pte primitives (mm/ksm.c): `write_protect_page` and `replace_page`,
//! each one page changed inside its own CLEAR range with USE_CHANGE_PTE.
//! The deduplicator (the `ksm` crate) compares the frames in between.

use super::{change_pte_range, PrimaryMmu, PrimaryMmuError, Pte};
use crate::frame_pool::Pfn;
use crate::mmu_notifier::Gfn;

impl PrimaryMmu {
    /// KSM's `write_protect_page`: inside a CLEAR range with USE_CHANGE_PTE,
    /// makes `gfn`'s pte read-only on the same frame (read-write ->
    /// read-only), soft-dirty bit kept (`pte_mkclean` clears only the dirty
    /// bit). A pte already read-only is left alone, but the range is still
    /// announced, as in mm/ksm.c.
    pub fn write_protect_page(&mut self, gfn: Gfn) -> Result<Pte, PrimaryMmuError> {
        let pte = self.pte(gfn)?;
        let read_only = Pte { writable: false, ..pte };
        let range = change_pte_range(gfn);
        self.within_range(
            &range,
            |mm| {
                if pte.writable {
                    mm.set_pte_at_notify(&range, gfn, read_only)
                } else {
                    Ok(pte)
                }
            },
        )?;
        Ok(read_only)
    }

    /// KSM's `replace_page`: inside a CLEAR range with USE_CHANGE_PTE, maps
    /// `gfn` read-only onto `kpfn` instead of its own (read-only) frame,
    /// which loses a reference and is freed if that was the last.
    ///
    /// Deliberate difference (crate docs): the new pte keeps the old one's
    /// soft-dirty bit. Linux builds it with `mk_pte(kpage,
    /// vma->vm_page_prot)`, which drops the bit, so a page written since the
    /// last round and then merged reads as unwritten in pagemap; the merge
    /// does not change what the page holds, so it keeps its record here.
    pub fn replace_page(&mut self, gfn: Gfn, kpfn: Pfn) -> Result<(), PrimaryMmuError> {
        let soft_dirty = self.pte(gfn)?.soft_dirty;
        let range = change_pte_range(gfn);
        let new = Pte { pfn: kpfn, writable: false, soft_dirty };
        self.within_range(&range, |mm| mm.set_pte_at_notify(&range, gfn, new))?;
        Ok(())
    }
}
