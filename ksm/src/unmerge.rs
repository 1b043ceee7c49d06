//! Unmerging, after mm/ksm.c: `unmerge_ksm_pages` gives every page of a
//! range that maps a KSM page or the zero page its own copy (`break_ksm`,
//! an unshare fault), and `unmerge_and_remove_all_rmap_items` (run = 2)
//! does that to every page, then frees every rmap item and stable node and
//! starts the scan over.

use std::ops::Range;

use shadow_mmu::{lock, Gfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::mm_slot::MmId;
use crate::scan::KsmScan;

/// Pages unmerged between two looks at the caller's `cancelled`.
const UNMERGE_CHUNK: u64 = 256;

/// `break_ksm`: if `gfn` maps a KSM page or the zero page
/// (`folio_test_ksm || is_ksm_zero_pte`), the fault Linux raises with
/// FAULT_FLAG_UNSHARE ([`PrimaryMmu::unshare`]): the page gets its own
/// copy, mapped read-only; a later guest write reuses it in place.
fn break_ksm(h: &mut PrimaryMmu, gfn: Gfn) -> Result<(), KsmError> {
    let pte = h.pte(gfn)?;
    if h.frame(pte.pfn).ksm {
        h.unshare(gfn)?;
    }
    Ok(())
}

impl Ksm {
    /// `unmerge_ksm_pages` over guest pages `gfns` of mm `id`
    /// (MADV_UNMERGEABLE): every page there that maps a KSM page or the zero
    /// page gets its own copy, mapped read-only (`break_ksm`); only that
    /// mm's secondary MMUs hear of it. Rmap items stay: the scanner notices
    /// at its next visit, as in Linux. `cancelled` is asked every
    /// `UNMERGE_CHUNK` pages (Linux stops on a pending signal); on yes,
    /// [`KsmError::Cancelled`], with the pages before unmerged.
    pub fn unmerge_ksm_pages(
        &mut self,
        id: MmId,
        gfns: Range<Gfn>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), KsmError> {
        let mm = self.mm(id)?.clone();
        let mut gfn = gfns.start;
        while gfn < gfns.end {
            if cancelled() {
                return Err(KsmError::Cancelled);
            }
            let end = gfns.end.min(gfn + UNMERGE_CHUNK);
            let mut h = lock(&mm);
            for g in gfn..end {
                break_ksm(&mut h, g)?;
            }
            h.flush_holes()?;
            gfn = end;
        }
        Ok(())
    }

    /// Unmerges everything (run = 2, port 0x501 value 4), as
    /// `unmerge_and_remove_all_rmap_items` does: every page of every mm on
    /// the list mapping a KSM page or the zero page gets its own copy,
    /// read-only ([`Ksm::unmerge_ksm_pages`], mm by mm); then every rmap
    /// item is freed (so `rmap_items`, `pages_shared`, `pages_sharing`,
    /// `pages_unshared` and `pages_volatile` read 0, and checksums and smart
    /// scan ages are forgotten), every stable node goes
    /// (`remove_all_stable_nodes`), and the scan starts again from the first
    /// page of the first mm with a fresh `ksm_scan`.
    pub fn unmerge_all(&mut self) -> Result<(), KsmError> {
        self.unmerge_all_cancellable(&|| false)
    }

    /// [`Ksm::unmerge_all`] that asks `cancelled` as
    /// [`Ksm::unmerge_ksm_pages`] does. Cancelled, it leaves the rmap items
    /// and the trees as they are (the scanner notices the pages unmerged so
    /// far), as Linux does when a signal interrupts it.
    pub fn unmerge_all_cancellable(&mut self, cancelled: &dyn Fn() -> bool) -> Result<(), KsmError> {
        for id in self.mm_ids() {
            // An exited mm has an empty range: nothing to unmerge.
            let (first, end) = lock(self.mm(id)?).guest_range();
            self.unmerge_ksm_pages(id, first..end, cancelled)?;
        }
        // remove_trailing_rmap_items over the whole list.
        for pos in 0..self.slots.len() {
            self.free_slot_rmap_items(pos);
        }
        let listed = self.stable.remove_all_stable_nodes(&self.frames);
        debug_assert_eq!(listed, 0, "every rmap item left its stable node");
        debug_assert_eq!((self.stats.pages_shared, self.stats.pages_sharing, self.stats.rmap_items), (0, 0, 0));
        self.unstable.clear();
        // A fresh ksm_scan: the head of the list, seqnr 0. `full_scans`
        // keeps counting (crate docs, "Deliberate differences from mm/ksm.c").
        self.ksm_scan = KsmScan::default();
        self.frames.flush_holes()?;
        Ok(())
    }
}
