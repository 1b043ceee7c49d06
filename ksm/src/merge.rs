//! Merging, after mm/ksm.c: `try_to_merge_one_page` write-protects a page
//! (`write_protect_page`), compares it again and maps the KSM page instead
//! (`replace_page`); `try_to_merge_with_ksm_page`,
//! `try_to_merge_with_zero_page` and `try_to_merge_two_pages` are its three
//! uses. Every pte change goes through the primary MMU's notifier, so the
//! secondary MMU follows.

use shadow_mmu::{Gfn, Pfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::page::{frames_identical, read_page};

/// What `try_to_merge_one_page` did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeOne {
    /// The page now maps the KSM page (or became it).
    Merged,
    /// The page already mapped the KSM page (`page == kpage`, "ksm page
    /// forked"): nothing was touched.
    Already,
    /// The page changed before it was write-protected; it stays as it is,
    /// write-protected.
    Failed,
}

impl Ksm {
    /// `try_to_merge_one_page`: unless `gfn` already maps `kpfn` (checked
    /// first, as `page == kpage`, so no notifier range is opened for
    /// nothing), write-protects `gfn`, then either it becomes a KSM page
    /// itself (`kpfn` None) or, if it still equals `kpfn`, its pte is
    /// replaced by one mapping `kpfn`.
    pub(crate) fn try_to_merge_one_page(
        &self,
        host: &mut PrimaryMmu,
        gfn: Gfn,
        kpfn: Option<Pfn>,
    ) -> Result<MergeOne, KsmError> {
        if kpfn == Some(host.pte(gfn)?.pfn) {
            return Ok(MergeOne::Already);
        }
        // mm/ksm.c also refuses a page with extra references (pinned for
        // I/O); nothing pins guest frames here (crate docs, "Deliberate
        // differences from mm/ksm.c").
        let pte = host.write_protect_page(gfn)?;
        let merged = match kpfn {
            None => MergeOne::Merged,
            // Compare again: the page may have changed before it was
            // write-protected; from now on it cannot.
            Some(k) if frames_identical(host.pool(), pte.pfn, k) => {
                host.replace_page(gfn, k)?;
                MergeOne::Merged
            }
            Some(_) => MergeOne::Failed,
        };
        Ok(merged)
    }

    /// `try_to_merge_with_ksm_page`: page `idx` is merged with stable node
    /// `node`'s KSM page. Returns whether it maps it now (a merge is counted
    /// in `merges`; a page that already mapped it is not); the caller then
    /// appends it to the node (`stable_tree_append`).
    pub(crate) fn try_to_merge_with_ksm_page(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        node: u32,
    ) -> Result<bool, KsmError> {
        let result = self.try_to_merge_one_page(host, self.gfn(idx), Some(self.stable.kpfn(node)))?;
        if result == MergeOne::Merged {
            self.stats.merges += 1;
        }
        Ok(result != MergeOne::Failed)
    }

    /// `try_to_merge_with_zero_page`: with use_zero_pages, page `idx`, whose
    /// checksum `sum` held since the last scan, is merged with the zero page
    /// if the checksum is the zero page's (`try_to_merge_one_page` then
    /// compares the whole page). Returns whether it merged; if not, the
    /// visit goes on to the stable tree. A merge that failed left the page
    /// write-protected, so its copy in `self.buf` is read again: the trees
    /// are searched with what the page holds from now on, as Linux searches
    /// them with the live page.
    pub(crate) fn try_to_merge_with_zero_page(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        sum: u32,
    ) -> Result<bool, KsmError> {
        if !(self.knobs.use_zero_pages && sum == self.zero_checksum) {
            return Ok(false);
        }
        match self.try_to_merge_one_page(host, self.gfn(idx), Some(self.zero_pfn))? {
            MergeOne::Failed => {
                let pfn = host.pte(self.gfn(idx))?.pfn;
                read_page(host.pool(), pfn, &mut self.buf);
                Ok(false)
            }
            _ => {
                self.stats.merges += 1;
                Ok(true)
            }
        }
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
        if self.try_to_merge_one_page(host, gfn, None)? != MergeOne::Merged {
            return Ok(None);
        }
        let kpfn = host.pte(gfn)?.pfn;
        let merged = self.try_to_merge_one_page(host, self.gfn(tree_idx), Some(kpfn))?;
        Ok((merged == MergeOne::Merged).then_some(kpfn))
    }
}
