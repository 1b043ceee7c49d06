//! Merging, after mm/ksm.c: `try_to_merge_one_page` write-protects a page
//! (`write_protect_page`), compares it again and maps the KSM page instead
//! (`replace_page`); `try_to_merge_with_ksm_page`,
//! `try_to_merge_with_zero_page` and `try_to_merge_two_pages` are its three
//! uses. Every pte change goes through the notifier of the mm the page
//! belongs to, so that guest's secondary MMU follows, and only its. Each
//! works on one page of one mm at a time, under that mm's lock; a KSM page
//! that another mm's lock is not held for is pinned meanwhile (Linux holds
//! a reference on it), so it stays the same frame, and no write reuses it.

use shadow_mmu::{Gfn, Pfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::mm_slot::{MmLock, RmapId};
use crate::page::frames_identical;
use crate::stable_tree::owner_tag;

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
    /// nothing), write-protects `gfn` in `host`, then either it becomes a
    /// KSM page itself (`kpfn` None) or, if it still equals `kpfn`, its pte
    /// is replaced by one mapping `kpfn`.
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

    /// `try_to_merge_with_ksm_page`: the page of rmap item `id` is merged
    /// with stable node `node`'s KSM page, which is pinned for the merge if
    /// the node still owns it (`ksm_get_folio`: another guest may be letting
    /// go of it); a node gone stale meanwhile fails the merge. Returns
    /// whether the page maps it now (a merge is counted in `merges`; a page
    /// that already mapped it is not); the caller then appends it to the
    /// node (`stable_tree_append`).
    pub(crate) fn try_to_merge_with_ksm_page(
        &mut self,
        mms: &mut MmLock<'_>,
        id: RmapId,
        node: u32,
    ) -> Result<bool, KsmError> {
        let kpfn = self.stable.kpfn(node);
        if !self.frames.get_ksm_page(kpfn, owner_tag(node)) {
            return Ok(false);
        }
        let (pos, gfn) = self.gfn_of(id);
        let result = self.try_to_merge_one_page(mms.mm(pos), gfn, Some(kpfn));
        self.frames.put_page(kpfn)?;
        let result = result?;
        if result == MergeOne::Merged {
            self.stats.merges += 1;
        }
        Ok(result != MergeOne::Failed)
    }

    /// `try_to_merge_with_zero_page`: with use_zero_pages, the page of rmap
    /// item `id`, whose checksum `sum` held since the last scan, is merged
    /// with the zero page if the checksum is the zero page's
    /// (`try_to_merge_one_page` then compares the whole page). Returns
    /// whether it merged; if not, the visit goes on to the stable tree (a
    /// merge that failed left the page write-protected: the copy the trees
    /// judge is taken after this, so it is what the page holds from now on,
    /// as Linux searches them with the live page).
    pub(crate) fn try_to_merge_with_zero_page(
        &mut self,
        mms: &mut MmLock<'_>,
        id: RmapId,
        sum: u32,
    ) -> Result<bool, KsmError> {
        if !(self.knobs.use_zero_pages && sum == self.zero_checksum) {
            return Ok(false);
        }
        let (pos, gfn) = self.gfn_of(id);
        let host = mms.mm(pos);
        match self.try_to_merge_one_page(host, gfn, Some(self.zero_pfn))? {
            MergeOne::Failed => Ok(false),
            _ => {
                self.stats.merges += 1;
                Ok(true)
            }
        }
    }

    /// `try_to_merge_two_pages`: the page of rmap item `id` becomes the KSM
    /// page (under its mm's lock) and the unstable tree's page `tree_id` is
    /// merged into it (under its own mm's lock: never both at once). Returns
    /// the KSM page if both halves merged, pinned: the caller inserts it in
    /// the stable tree and then lets go of the pin. The pin, taken while the
    /// first page's mm is locked, keeps the frame from being reused in place
    /// by a write to that page while the other mm is locked (such a write
    /// copies it instead). If the second half fails, the first page is left
    /// write-protected but not KSM (crate docs, "Deliberate differences from
    /// mm/ksm.c").
    pub(crate) fn try_to_merge_two_pages(
        &mut self,
        mms: &mut MmLock<'_>,
        id: RmapId,
        tree_id: RmapId,
    ) -> Result<Option<Pfn>, KsmError> {
        let (pos, gfn) = self.gfn_of(id);
        let host = mms.mm(pos);
        if self.try_to_merge_one_page(host, gfn, None)? != MergeOne::Merged {
            return Ok(None);
        }
        let kpfn = host.pte(gfn)?.pfn;
        self.frames.get_page(kpfn)?;
        let (tree_pos, tree_gfn) = self.gfn_of(tree_id);
        let merged = self.try_to_merge_one_page(mms.mm(tree_pos), tree_gfn, Some(kpfn));
        if !matches!(merged, Ok(MergeOne::Merged)) {
            self.frames.put_page(kpfn)?;
        }
        Ok((merged? == MergeOne::Merged).then_some(kpfn))
    }
}
