//! Rmap items, after mm/ksm.c's `struct ksm_rmap_item`: what the scanner
//! knows of one guest page (its last checksum, which tree it is in, smart
//! scan's counters); `remove_rmap_item_from_tree` and `free_rmap_item`.
//!
//! Each mm has one vma, so its rmap items sit in an array indexed by guest
//! page on its mm slot rather than on a list (see "Deliberate differences
//! from mm/ksm.c" in the crate docs): an entry in state `RmapState::Absent`
//! is a page without an rmap item. Trees name an rmap item by its id
//! (`RmapId`: its mm's first id plus the page's index).

use crate::ksm::Ksm;
use crate::mm_slot::RmapId;

/// No node: the `node` of an rmap item in no tree.
pub(crate) const NIL: u32 = u32::MAX;

/// Where a page's rmap item stands. Linux keeps this in the low bits of
/// `rmap_item->address` (`UNSTABLE_FLAG`, `STABLE_FLAG`); `Absent` is a
/// page that has no rmap item.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum RmapState {
    /// No rmap item: the page has not been seen holding memory since its
    /// item was last freed (a memfd hole is Linux's "no pte"; a page mapping
    /// the zero page has none either, as in Linux).
    Absent = 0,
    /// An rmap item in neither tree.
    NoTree = 1,
    /// In the unstable tree (`UNSTABLE_FLAG`); `node` is its tree node.
    Unstable = 2,
    /// Mapping a KSM page (`STABLE_FLAG`); `node` is its stable node.
    Stable = 3,
}

/// `struct ksm_rmap_item`, 12 bytes here: the mm and page are implied by
/// where it sits.
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

const _: () = assert!(std::mem::size_of::<RmapItem>() == 12, "an rmap item is 12 bytes here");

/// `struct ksm_rmap_item` as Linux (6.12) lays it out on x86-64, field for
/// field, kept only to take its size: `general_profit` charges each rmap
/// item `sizeof(struct ksm_rmap_item)`, and the figure is meant to compare
/// with the kernel's own.
#[allow(dead_code)] // never built: only its size is used
#[repr(C)]
struct LinuxKsmRmapItem {
    /// `struct ksm_rmap_item *rmap_list`.
    rmap_list: *const (),
    /// `union { struct anon_vma *anon_vma; int nid; }`: a pointer wide.
    anon_vma_or_nid: *const (),
    /// `struct mm_struct *mm`.
    mm: *const (),
    /// `unsigned long address` (flags in the low bits).
    address: u64,
    /// `unsigned int oldchecksum`.
    oldchecksum: u32,
    /// `rmap_age_t age` (u8).
    age: u8,
    /// `rmap_age_t remaining_skips` (u8), then 2 bytes of padding.
    remaining_skips: u8,
    /// `union { struct rb_node node; struct { struct ksm_stable_node *head;
    /// struct hlist_node hlist; }; }`: three words either way (an rb_node is
    /// a parent-and-colour word and two pointers; an hlist_node two).
    node_or_hlist: [*const (); 3],
}

/// `sizeof(struct ksm_rmap_item)` on x86-64: 64 bytes (8 + 8 + 8 + 8 + 4 +
/// 1 + 1 + 2 padding + 24), checked at compile time against the layout
/// above. The slab of a running kernel agrees:
/// /sys/kernel/slab/ksm_rmap_item/object_size reads 64 on the development
/// machines (Linux 6.18). This crate's own metadata is in
/// [`KsmStats::metadata_bytes`](crate::KsmStats::metadata_bytes).
pub const KSM_RMAP_ITEM_SIZE: u64 = 64;

const _: () = assert!(std::mem::size_of::<LinuxKsmRmapItem>() as u64 == KSM_RMAP_ITEM_SIZE);

impl Default for RmapItem {
    fn default() -> Self {
        Self { oldchecksum: 0, node: NIL, state: RmapState::Absent, seqnr: 0, age: 0, remaining_skips: 0 }
    }
}

impl Ksm {
    /// `remove_rmap_item_from_tree`: rmap item `id` leaves the tree it is
    /// in (a KSM page it no longer maps, or the unstable tree).
    pub(crate) fn remove_rmap_item_from_tree(&mut self, id: RmapId) {
        let item = *self.item(id);
        match item.state {
            // `ksm_get_folio` finds the node stale (its KSM page was freed):
            // `remove_node_from_stable_tree` lets go of every sharer.
            RmapState::Stable if !self.stable.node_valid(item.node, &self.frames) => {
                self.remove_node_from_stable_tree(item.node);
            }
            RmapState::Stable => {
                self.departures += 1;
                self.slot_mut(id).0.merging_pages -= 1;
                if self.stable.remove_sharer(item.node, id) {
                    self.stats.pages_shared -= 1;
                    self.stable.stable_node_dup_del(item.node, &self.frames);
                } else {
                    self.stats.pages_sharing -= 1;
                }
            }
            // An unstable node of an earlier scan went with that scan's tree.
            RmapState::Unstable if item.seqnr == self.ksm_scan.seqnr => self.unstable.erase(item.node),
            _ => {}
        }
        let (slot, idx) = self.slot_mut(id);
        let r = &mut slot.rmap[idx];
        if r.state != RmapState::Absent {
            r.state = RmapState::NoTree;
        }
        r.node = NIL;
    }

    /// `free_rmap_item` after `remove_rmap_item_from_tree`, as
    /// `get_next_rmap_item` and `remove_trailing_rmap_items` do for pages
    /// the scanner no longer finds: the page has no rmap item afterwards
    /// (its checksum and smart scan age are forgotten).
    pub(crate) fn free_rmap_item(&mut self, id: RmapId) {
        if self.item(id).state == RmapState::Absent {
            return;
        }
        self.remove_rmap_item_from_tree(id);
        let (slot, idx) = self.slot_mut(id);
        slot.rmap[idx] = RmapItem::default();
        slot.rmap_items -= 1;
        self.stats.rmap_items -= 1;
    }

    /// `alloc_rmap_item` for the page of `id` if it has none (`get_next_rmap_item`).
    pub(crate) fn get_next_rmap_item(&mut self, id: RmapId) {
        let (slot, idx) = self.slot_mut(id);
        if slot.rmap[idx].state == RmapState::Absent {
            slot.rmap[idx].state = RmapState::NoTree;
            slot.rmap_items += 1;
            self.stats.rmap_items += 1;
        }
    }
}
