//! Rmap items, after mm/ksm.c's `struct ksm_rmap_item`: what the scanner
//! knows of one guest page (its last checksum, which tree it is in, smart
//! scan's counters), and `remove_rmap_item_from_tree`.
//!
//! There is one mm and one vma, so rmap items sit in an array indexed by
//! guest page rather than on an mm_slot's list (see "Deliberate differences
//! from mm/ksm.c" in the crate docs).

use shadow_mmu::PrimaryMmu;

use crate::ksm::Ksm;

/// No node: the `node` of an rmap item in no tree.
pub(crate) const NIL: u32 = u32::MAX;

/// Where a page's rmap item stands. Linux keeps this in the low bits of
/// `rmap_item->address` (`UNSTABLE_FLAG`, `STABLE_FLAG`); the absent and
/// zero-page states are this prototype's (see the crate docs).
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RmapState {
    /// No rmap item yet: the page was never seen holding memory (a memfd
    /// hole, Linux's "no pte").
    Absent = 0,
    /// An rmap item in neither tree.
    NoTree = 1,
    /// In the unstable tree (`UNSTABLE_FLAG`); `node` is its tree node.
    Unstable = 2,
    /// Mapping a KSM page (`STABLE_FLAG`); `node` is its stable node.
    Stable = 3,
    /// Mapping the zero page (use_zero_pages); Linux frees such an rmap
    /// item (crate docs, "Deliberate differences from mm/ksm.c").
    Zero = 4,
}

/// `struct ksm_rmap_item`, 12 bytes: the page is implied by the index.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RmapItem {
    /// `oldchecksum`: the page's checksum at its last visit.
    pub(crate) oldchecksum: u32,
    /// Unstable: its unstable tree node; Stable: its stable node; else NIL.
    pub(crate) node: u32,
    /// Which tree it is in.
    pub(crate) state: RmapState,
    /// Low bits of the scan that put it in the unstable tree.
    pub(crate) seqnr: u8,
    /// Smart scan: scans that looked at the page while it was not a KSM
    /// page, since the rmap item was created (saturating). As in Linux, a
    /// merge does not reset it.
    pub(crate) age: u8,
    /// Smart scan: scans still to skip.
    pub(crate) remaining_skips: u8,
}

const _: () = assert!(std::mem::size_of::<RmapItem>() == 12, "an rmap item is 12 bytes (KSM_RMAP_ITEM_SIZE)");

/// `sizeof(struct ksm_rmap_item)` here, in bytes: what one rmap item costs
/// in `general_profit`.
pub const KSM_RMAP_ITEM_SIZE: u64 = std::mem::size_of::<RmapItem>() as u64;

impl Default for RmapItem {
    fn default() -> Self {
        Self { oldchecksum: 0, node: NIL, state: RmapState::Absent, seqnr: 0, age: 0, remaining_skips: 0 }
    }
}

impl Ksm {
    /// `remove_rmap_item_from_tree`: page `idx` leaves the tree its rmap
    /// item is in (a KSM page it no longer maps, or the unstable tree).
    pub(crate) fn remove_rmap_item_from_tree(&mut self, idx: usize, host: &mut PrimaryMmu) {
        let item = self.rmap[idx];
        match item.state {
            RmapState::Stable => {
                self.departures += 1;
                if self.stable.remove_sharer(item.node, idx) {
                    self.stats.pages_shared -= 1;
                    self.stable.stable_node_dup_del(item.node, host);
                } else {
                    self.stats.pages_sharing -= 1;
                }
            }
            // An unstable node of an earlier scan went with that scan's tree.
            RmapState::Unstable if item.seqnr == self.ksm_scan.seqnr => self.unstable.erase(item.node),
            _ => {}
        }
        let r = &mut self.rmap[idx];
        if r.state != RmapState::Absent {
            r.state = RmapState::NoTree;
        }
        r.node = NIL;
    }
}
