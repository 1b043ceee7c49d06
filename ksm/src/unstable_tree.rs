//! The unstable tree, after mm/ksm.c's `root_unstable_tree`: pages of every
//! mm whose checksum held still for a scan, ordered by what they hold now;
//! rebuilt at every full scan (`scan_get_next_rmap_item` empties it). Its
//! one operation is `unstable_tree_search_insert`.

use std::cmp::Ordering;

use crate::ksm::Ksm;
use crate::mm_slot::{MmLock, RmapId};
use crate::page::cmp_with_frame;
use crate::rmap::RmapState;
use crate::tree::Search;

impl Ksm {
    /// `unstable_tree_search_insert`: an unstable page with the content in
    /// `self.buf` (its tree node and rmap item), or rmap item `id` goes into
    /// the tree. Each tree page is looked up, and compared, under its own
    /// mm's lock (`get_mergeable_page` takes that mm's mmap lock), so the
    /// search may move the lock from mm to mm; an mm that has exited orders
    /// before everything.
    pub(crate) fn unstable_tree_search_insert(&mut self, mms: &mut MmLock<'_>, id: RmapId) -> Option<(u32, RmapId)> {
        let (buf, pool) = (&self.buf, self.frames.pool());
        let search = self.unstable.search(|tree_id| {
            let (pos, gfn) = self.gfn_of(tree_id);
            match mms.mm(pos).pte(gfn) {
                Ok(pte) => cmp_with_frame(pool, buf, pte.pfn),
                Err(_) => Ordering::Less,
            }
        });
        match search {
            Search::Found(node) => {
                let tree_id = self.unstable.item(node);
                (tree_id != id).then_some((node, tree_id))
            }
            Search::Vacant(at) => {
                let node = self.unstable.insert(at, id);
                let seqnr = self.ksm_scan.seqnr;
                let (slot, idx) = self.slot_mut(id);
                let r = &mut slot.rmap[idx];
                r.state = RmapState::Unstable;
                r.node = node;
                r.seqnr = seqnr;
                None
            }
        }
    }
}
