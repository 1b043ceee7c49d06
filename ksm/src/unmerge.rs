//! Unmerging, after mm/ksm.c: `unmerge_ksm_pages` gives every page of a
//! range that maps a KSM page or the zero page its own copy (`break_ksm`,
//! an unshare fault), and `unmerge_and_remove_all_rmap_items` (run = 2)
//! does that to every page, then frees every rmap item and stable node and
//! starts the scan over.

use std::ops::Range;
use std::sync::Mutex;

use shadow_mmu::{lock, Gfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
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
    /// `unmerge_ksm_pages` over guest pages `gfns` (MADV_UNMERGEABLE): every
    /// page there that maps a KSM page or the zero page gets its own copy,
    /// mapped read-only (`break_ksm`). Rmap items stay: the scanner notices
    /// at its next visit, as in Linux. `cancelled` is asked every
    /// `UNMERGE_CHUNK` pages (Linux stops on a pending signal); on yes,
    /// [`KsmError::Cancelled`], with the pages before unmerged.
    pub fn unmerge_ksm_pages(
        &mut self,
        host: &Mutex<PrimaryMmu>,
        gfns: Range<Gfn>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), KsmError> {
        let mut gfn = gfns.start;
        while gfn < gfns.end {
            if cancelled() {
                return Err(KsmError::Cancelled);
            }
            let end = gfns.end.min(gfn + UNMERGE_CHUNK);
            let mut h = lock(host);
            for g in gfn..end {
                break_ksm(&mut h, g)?;
            }
            h.flush_holes()?;
            gfn = end;
        }
        Ok(())
    }

    /// Unmerges everything (run = 2, port 0x501 value 4), as
    /// `unmerge_and_remove_all_rmap_items` does: every page mapping a KSM
    /// page or the zero page gets its own copy, read-only
    /// ([`Ksm::unmerge_ksm_pages`]); then every rmap item is freed (so
    /// `rmap_items`, `pages_shared`, `pages_sharing`, `pages_unshared` and
    /// `pages_volatile` read 0, and checksums and smart scan ages are
    /// forgotten), every stable node goes (`remove_all_stable_nodes`), and
    /// the scan starts again from its first page with a fresh `ksm_scan`.
    pub fn unmerge_all(&mut self, host: &Mutex<PrimaryMmu>) -> Result<(), KsmError> {
        self.unmerge_all_cancellable(host, &|| false)
    }

    /// [`Ksm::unmerge_all`] that asks `cancelled` as
    /// [`Ksm::unmerge_ksm_pages`] does. Cancelled, it leaves the rmap items
    /// and the trees as they are (the scanner notices the pages unmerged so
    /// far), as Linux does when a signal interrupts it.
    pub fn unmerge_all_cancellable(
        &mut self,
        host: &Mutex<PrimaryMmu>,
        cancelled: &dyn Fn() -> bool,
    ) -> Result<(), KsmError> {
        let (first, end) = (self.first_gfn, self.gfn(self.rmap.len()));
        self.unmerge_ksm_pages(host, first..end, cancelled)?;
        let mut h = lock(host);
        // remove_trailing_rmap_items over the whole list.
        for idx in 0..self.rmap.len() {
            self.free_rmap_item(idx, &mut h);
        }
        let listed = self.stable.remove_all_stable_nodes(&mut h);
        debug_assert_eq!(listed, 0, "every rmap item left its stable node");
        debug_assert_eq!((self.stats.pages_shared, self.stats.pages_sharing, self.stats.rmap_items), (0, 0, 0));
        self.unstable.clear();
        // A fresh ksm_scan: the head of the list, seqnr 0. `full_scans`
        // keeps counting (crate docs, "Deliberate differences from mm/ksm.c").
        self.ksm_scan = KsmScan::default();
        h.flush_holes()?;
        Ok(())
    }
}
