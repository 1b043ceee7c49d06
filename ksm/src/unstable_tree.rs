//! The unstable tree, after mm/ksm.c's `root_unstable_tree`: pages whose
//! checksum held still for a scan, ordered by what they hold now; rebuilt
//! at every full scan (`scan_get_next_rmap_item` empties it). Its one
//! operation is `unstable_tree_search_insert`.

use std::cmp::Ordering;

use shadow_mmu::PrimaryMmu;

use crate::ksm::Ksm;
use crate::page::cmp_with_frame;
use crate::rmap::RmapState;
use crate::tree::Search;

impl Ksm {
    /// `unstable_tree_search_insert`: an unstable page with the content in
    /// `self.buf` (its tree node and guest page), or `idx` goes into the
    /// tree.
    pub(crate) fn unstable_tree_search_insert(&mut self, idx: usize, host: &PrimaryMmu) -> Option<(u32, usize)> {
        let first = self.first_gfn;
        let search = self.unstable.search(|tree_idx| match host.pte(first + u64::from(tree_idx)) {
            Ok(pte) => cmp_with_frame(host.pool(), &self.buf, pte.pfn),
            Err(_) => Ordering::Less,
        });
        match search {
            Search::Found(node) => {
                let tree_idx = self.unstable.item(node) as usize;
                (tree_idx != idx).then_some((node, tree_idx))
            }
            Search::Vacant(at) => {
                let node = self.unstable.insert(at, idx as u32);
                let seqnr = self.ksm_scan.seqnr;
                let r = &mut self.rmap[idx];
                r.state = RmapState::Unstable;
                r.node = node;
                r.seqnr = seqnr;
                None
            }
        }
    }
}
