//! Merging, after mm/ksm.c: `try_to_merge_one_page` write-protects a page
//! (`write_protect_page`), compares it again and maps the KSM page instead
//! (`replace_page`); `try_to_merge_with_ksm_page`,
//! `try_to_merge_with_zero_page` and `try_to_merge_two_pages` are its three
//! uses. Every pte change goes through the primary MMU's notifier, so the
//! secondary MMU follows.

use shadow_mmu::{Gfn, Pfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::page::frames_identical;
use crate::rmap::RmapState;

impl Ksm {
    /// `try_to_merge_one_page`: write-protects `gfn`, then either it becomes
    /// a KSM page itself (`kpfn` None) or, if it still equals `kpfn`, its pte
    /// is replaced by one mapping `kpfn`. Returns whether it merged.
    pub(crate) fn try_to_merge_one_page(
        &self,
        host: &mut PrimaryMmu,
        gfn: Gfn,
        kpfn: Option<Pfn>,
    ) -> Result<bool, KsmError> {
        // mm/ksm.c also refuses a page with extra references (pinned for
        // I/O); nothing pins guest frames here (crate docs, "Deliberate
        // differences from mm/ksm.c").
        let pte = host.write_protect_page(gfn)?;
        let merged = match kpfn {
            None => true,
            Some(k) if k == pte.pfn => true,
            // Compare again: the page may have changed before it was
            // write-protected; from now on it cannot.
            Some(k) if frames_identical(host.pool(), pte.pfn, k) => {
                host.replace_page(gfn, k)?;
                true
            }
            Some(_) => false,
        };
        Ok(merged)
    }

    /// `try_to_merge_with_ksm_page`: page `idx` is merged with stable node
    /// `node`'s KSM page. Returns whether it merged (counted in `merges`);
    /// the caller then appends it to the node (`stable_tree_append`).
    pub(crate) fn try_to_merge_with_ksm_page(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        node: u32,
    ) -> Result<bool, KsmError> {
        let merged = self.try_to_merge_one_page(host, self.gfn(idx), Some(self.stable.kpfn(node)))?;
        if merged {
            self.stats.merges += 1;
        }
        Ok(merged)
    }

    /// `try_to_merge_with_zero_page`: with use_zero_pages, page `idx`, whose
    /// copy in `self.buf` has checksum `sum`, is merged with the zero page
    /// if that copy is all zeros. Returns whether a merge was tried: the
    /// visit of a page that was ends here, merged or not (crate docs,
    /// "Deliberate differences from mm/ksm.c").
    pub(crate) fn try_to_merge_with_zero_page(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        sum: u32,
    ) -> Result<bool, KsmError> {
        if !(self.knobs.use_zero_pages && sum == self.zero_checksum && self.buf.iter().all(|&b| b == 0)) {
            return Ok(false);
        }
        if self.try_to_merge_one_page(host, self.gfn(idx), Some(self.zero_pfn))? {
            self.stats.merges += 1;
            self.rmap[idx].state = RmapState::Zero;
        }
        Ok(true)
    }

    /// `try_to_merge_two_pages`: page `idx` becomes the KSM page and the
    /// unstable tree's page `tree_idx` is merged into it. Returns the KSM
    /// page if both halves merged. If the second half fails, page `idx` is
    /// left write-protected but not KSM (crate docs, "Deliberate differences
    /// from mm/ksm.c").
    pub(crate) fn try_to_merge_two_pages(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        tree_idx: usize,
    ) -> Result<Option<Pfn>, KsmError> {
        let gfn = self.gfn(idx);
        if !self.try_to_merge_one_page(host, gfn, None)? {
            return Ok(None);
        }
        let kpfn = host.pte(gfn)?.pfn;
        let merged = self.try_to_merge_one_page(host, self.gfn(tree_idx), Some(kpfn))?;
        Ok(merged.then_some(kpfn))
    }
}
