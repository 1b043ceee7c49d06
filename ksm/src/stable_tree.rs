//! The stable tree, after mm/ksm.c's `root_stable_tree`: KSM pages ordered
//! by content, each a `struct ksm_stable_node` with the rmap items mapping
//! it. Once `max_page_sharing` pages map one KSM page, the next page of that
//! content starts a duplicate in the same entry, which becomes a
//! `stable_node_chain` of `stable_node_dup`s.
//!
//! `stable_tree_search` (with `stable_node_dup` / `__stable_node_chain` /
//! `chain_prune`), `stable_tree_insert`, `stable_tree_append`,
//! `stable_node_dup_del`, `remove_node_from_stable_tree`,
//! `remove_all_stable_nodes`, `page_stable_node`, and `ksm_get_folio`'s
//! test (`StableTree::node_valid`). A stable node tags its KSM frame with
//! its id instead of `page->mapping` (see the crate docs).

use std::cell::{Cell, RefCell};
use std::cmp::Ordering;

use shadow_mmu::{FrameInfo, Frames, Pfn};

use crate::ksm::{Ksm, ZERO_OWNER};
use crate::mm_slot::RmapId;
use crate::page::{cmp_with_frame, read_page};
use crate::rmap::{RmapState, NIL};
use crate::tree::{ContentTree, Search};

/// `struct ksm_stable_node` (a plain node or a `stable_node_dup`): one KSM
/// page and the pages mapping it.
#[derive(Debug, Clone)]
struct StableNode {
    kpfn: Pfn,
    /// The entry it belongs to.
    entry: u32,
    /// The rmap items of the pages mapping it, in any mm (`hlist`).
    sharers: Vec<RmapId>,
}

impl StableNode {
    const FREE: Self = Self { kpfn: 0, entry: NIL, sharers: Vec::new() };
}

/// A stable tree entry: one KSM page, or a `stable_node_chain` of
/// duplicates of the same content.
#[derive(Debug, Clone, Default)]
struct StableEntry {
    tree_node: u32,
    /// Its stable nodes, oldest first (Linux's chain lists the newest first).
    dups: Vec<u32>,
    /// A `stable_node_chain`: it held two KSM pages once, and stays a chain
    /// until `stable_node_dup` finds only one left and collapses it.
    chain: bool,
}

/// The tag stable node `id` puts on its KSM frame (`ksm_owner`, the analog
/// of `page->mapping`); 0 is no owner.
pub(crate) fn owner_tag(id: u32) -> u32 {
    id + 1
}

/// `ksm_get_folio`'s test: whether stable node `id` still owns the frame
/// the table describes as `f` (its KSM page was neither freed nor reused by
/// another node).
fn owns_frame(f: FrameInfo, id: u32) -> bool {
    f.refcount > 0 && f.ksm && f.ksm_owner == owner_tag(id)
}

/// The stable tree with its entries and stable nodes, in arenas whose free
/// slots are reused.
#[derive(Debug, Default)]
pub(crate) struct StableTree {
    tree: ContentTree,
    entries: Vec<StableEntry>,
    free_entries: Vec<u32>,
    nodes: Vec<StableNode>,
    free_nodes: Vec<u32>,
}

impl StableTree {
    /// The KSM page of stable node `id`.
    pub(crate) fn kpfn(&self, id: u32) -> Pfn {
        self.nodes[id as usize].kpfn
    }

    /// How many pages map stable node `id` (`rmap_hlist_len`).
    pub(crate) fn sharers(&self, id: u32) -> usize {
        self.nodes[id as usize].sharers.len()
    }

    /// `ksm_get_folio`: whether stable node `id` still owns its KSM frame.
    pub(crate) fn node_valid(&self, id: u32, frames: &Frames) -> bool {
        owns_frame(frames.frame(self.kpfn(id)), id)
    }

    /// `page_stable_node`: the stable node whose KSM page frame `pfn` is, if
    /// any (not the zero page, which belongs to no node); `f` is what the
    /// frame table says of `pfn`.
    pub(crate) fn page_stable_node(&self, f: FrameInfo, pfn: Pfn) -> Option<u32> {
        if !f.ksm || f.ksm_owner == 0 || f.ksm_owner == ZERO_OWNER {
            return None;
        }
        let id = f.ksm_owner - 1;
        let node = self.nodes.get(id as usize)?;
        (node.entry != NIL && node.kpfn == pfn && owns_frame(f, id)).then_some(id)
    }

    /// (`stable_node_chains`, `stable_node_dups`): the chains, and the KSM
    /// pages in them.
    pub(crate) fn chains(&self) -> (u64, u64) {
        let chains = self.entries.iter().filter(|e| e.chain && !e.dups.is_empty());
        (chains.clone().count() as u64, chains.map(|e| e.dups.len() as u64).sum())
    }

    /// Bytes of memory held: the tree, entries, stable nodes.
    pub(crate) fn metadata_bytes(&self) -> usize {
        let nodes: usize = self.nodes.iter().map(|n| n.sharers.capacity() * 4).sum::<usize>()
            + self.nodes.capacity() * std::mem::size_of::<StableNode>();
        let entries: usize = self.entries.iter().map(|e| e.dups.capacity() * 4).sum::<usize>()
            + self.entries.capacity() * std::mem::size_of::<StableEntry>();
        nodes + entries + self.tree.metadata_bytes()
    }

    /// Rmap item `item` no longer maps stable node `id` (the `hlist_del` of
    /// `remove_rmap_item_from_tree`). Returns whether no page maps it now.
    pub(crate) fn remove_sharer(&mut self, id: u32, item: RmapId) -> bool {
        let node = &mut self.nodes[id as usize];
        if let Some(pos) = node.sharers.iter().position(|&s| s == item) {
            node.sharers.swap_remove(pos);
        }
        node.sharers.is_empty()
    }

    /// `stable_node_dup_del` then `free_stable_node`, for stable node `id`
    /// with no sharers left (its last one left, or it went stale). Beyond
    /// those two: when `id` was its entry's last KSM page, the entry leaves
    /// the tree too (`free_stable_node_chain`, or the rb_erase of a plain
    /// node); and if `id` still owns its frame, the frame's KSM tag is
    /// cleared (`folio_set_stable_node(folio, NULL)`, as `remove_stable_node`
    /// does; Linux otherwise leaves that to the freeing of the page: crate
    /// docs, "Deliberate differences from mm/ksm.c").
    pub(crate) fn stable_node_dup_del(&mut self, id: u32, frames: &Frames) {
        if self.node_valid(id, frames) {
            frames.set_ksm_owner(self.kpfn(id), false, 0);
        }
        let entry = self.nodes[id as usize].entry;
        let e = &mut self.entries[entry as usize];
        e.dups.retain(|&d| d != id);
        if e.dups.is_empty() {
            let tree_node = e.tree_node;
            self.tree.erase(tree_node);
            self.entries[entry as usize] = StableEntry::default();
            self.free_entries.push(entry);
        }
        self.nodes[id as usize] = StableNode::FREE;
        self.free_nodes.push(id);
    }

    /// `remove_all_stable_nodes`, once no page maps a KSM page: every stable
    /// node goes (a KSM frame still alive loses its tag) and the tree is
    /// empty. Returns the sharers that were still listed (none when every
    /// rmap item was removed first).
    pub(crate) fn remove_all_stable_nodes(&mut self, frames: &Frames) -> usize {
        let mut listed = 0;
        for id in 0..self.nodes.len() as u32 {
            if self.nodes[id as usize].entry == NIL {
                continue;
            }
            listed += self.nodes[id as usize].sharers.len();
            if self.node_valid(id, frames) {
                frames.set_ksm_owner(self.kpfn(id), false, 0);
            }
        }
        *self = Self::default();
        listed
    }

    /// `alloc_stable_node`: a free stable node's id.
    fn alloc_stable_node(&mut self) -> u32 {
        self.free_nodes.pop().unwrap_or_else(|| {
            self.nodes.push(StableNode::FREE);
            (self.nodes.len() - 1) as u32
        })
    }

    /// A free entry's id.
    fn alloc_entry(&mut self) -> u32 {
        self.free_entries.pop().unwrap_or_else(|| {
            self.entries.push(StableEntry::default());
            (self.entries.len() - 1) as u32
        })
    }
}

/// `is_page_sharing_candidate`: a KSM page mapped at least once and by fewer
/// than `max_page_sharing` pages.
fn is_page_sharing_candidate(sharers: usize, max: usize) -> bool {
    sharers > 0 && sharers < max
}

impl Ksm {
    /// `remove_node_from_stable_tree`: a stale node (its KSM frame was freed)
    /// lets go of every rmap item still pointing at it.
    pub(crate) fn remove_node_from_stable_tree(&mut self, id: u32) {
        let sharers = std::mem::take(&mut self.stable.nodes[id as usize].sharers);
        if !sharers.is_empty() {
            self.stats.pages_shared -= 1;
            self.stats.pages_sharing -= sharers.len() as u64 - 1;
            self.departures += sharers.len() as u64;
        }
        for s in sharers {
            let (slot, idx) = self.slot_mut(s);
            slot.merging_pages -= 1;
            slot.rmap[idx].state = RmapState::NoTree;
            slot.rmap[idx].node = NIL;
        }
        self.stable.stable_node_dup_del(id, &self.frames);
    }

    /// Searches the stable tree for the content in `self.buf`, as
    /// `stable_tree_search` and `stable_tree_insert` walk it: at each entry
    /// on the way `chain_prune` / `chain` (`__stable_node_chain`) removes
    /// stale duplicates (their KSM frame was freed, maybe reused with other
    /// content: `ksm_get_folio` fails), after which the search starts again
    /// (the tree may have changed shape), and collapses a chain left with one
    /// duplicate. So a search never orders by a frame that left the tree.
    /// The frame table stays locked for the walk, so no KSM frame is freed
    /// (or reused) by another guest's copy-on-write break while it is
    /// compared.
    fn stable_search_pruned(&mut self) -> Search {
        loop {
            let stale = Cell::new(None);
            // Chains met with one duplicate left (rare: nothing is
            // allocated for an ordinary search).
            let collapse = RefCell::new(Vec::new());
            let search = {
                let (stable, buf, pool) = (&self.stable, &self.buf, self.frames.pool());
                let table = self.frames.table();
                stable.tree.search(|entry| {
                    // Once a stale node is met the search is thrown away, so
                    // the rest of it reads no frame. A stale node's frame is
                    // never read: it may be free and punched, and reading a
                    // hole would make the host allocate it again.
                    if stale.get().is_some() {
                        return Ordering::Less;
                    }
                    let dups = &stable.entries[entry as usize].dups;
                    if let Some(&id) = dups.iter().find(|&&d| !owns_frame(table.frame(stable.kpfn(d)), d)) {
                        stale.set(Some(id));
                        return Ordering::Less;
                    }
                    if dups.len() == 1 && stable.entries[entry as usize].chain {
                        collapse.borrow_mut().push(entry);
                    }
                    let Some(&first) = dups.first() else { return Ordering::Less };
                    cmp_with_frame(pool, buf, stable.kpfn(first))
                })
            };
            if let Some(id) = stale.get() {
                self.remove_node_from_stable_tree(id);
                continue;
            }
            for entry in collapse.into_inner() {
                self.stable.entries[entry as usize].chain = false;
            }
            return search;
        }
    }

    /// `stable_node_dup` for entry `entry`, which the search just pruned
    /// and collapsed (`stable_search_pruned`): the duplicate chosen is the
    /// fullest that still has room, the newest among equals (Linux lists a
    /// chain newest first). That is Linux's choice whenever
    /// `stable_node_chains_prune_millisecs` has passed since the chain was
    /// last pruned, and here every time (crate docs, "Deliberate differences
    /// from mm/ksm.c"). Returns None if every duplicate is full.
    fn stable_node_dup(&self, entry: u32) -> Option<u32> {
        let max = self.knobs.max_page_sharing as usize;
        let mut found: Option<(u32, usize)> = None;
        for &id in self.stable.entries[entry as usize].dups.iter().rev() {
            let len = self.stable.sharers(id);
            let better = match found {
                None => true,
                Some((_, f)) => is_page_sharing_candidate(len, max) && (!is_page_sharing_candidate(f, max) || len > f),
            };
            if better {
                found = Some((id, len));
            }
        }
        found.filter(|&(_, len)| is_page_sharing_candidate(len, max)).map(|(id, _)| id)
    }

    /// `stable_tree_search`: a KSM page with the content in `self.buf` that
    /// has room for one more sharer (`stable_node_dup`).
    pub(crate) fn stable_tree_search(&mut self) -> Option<u32> {
        let Search::Found(tree_node) = self.stable_search_pruned() else { return None };
        self.stable_node_dup(self.stable.tree.item(tree_node))
    }

    /// `stable_tree_insert`: makes frame `kpfn` a KSM page: a new entry, or
    /// one more duplicate in the entry of that content (which is then a
    /// chain).
    pub(crate) fn stable_tree_insert(&mut self, kpfn: Pfn) -> u32 {
        // The frame is write-protected now: key the tree by what it holds,
        // not by the copy read before write protection (the guest may have
        // written in between).
        read_page(self.frames.pool(), kpfn, &mut self.buf);
        let id = self.stable.alloc_stable_node();
        // Search (pruning stale nodes) before the new node is tagged, so the
        // node id taken is not mistaken for a stale one.
        let search = self.stable_search_pruned();
        self.frames.set_ksm_owner(kpfn, true, owner_tag(id));
        let stable = &mut self.stable;
        let entry = match search {
            Search::Found(tree_node) => stable.tree.item(tree_node),
            Search::Vacant(at) => {
                let entry = stable.alloc_entry();
                let tree_node = stable.tree.insert(at, entry);
                stable.entries[entry as usize] = StableEntry { tree_node, dups: Vec::new(), chain: false };
                entry
            }
        };
        let e = &mut stable.entries[entry as usize];
        e.dups.push(id);
        e.chain |= e.dups.len() > 1;
        stable.nodes[id as usize] = StableNode { kpfn, entry, sharers: Vec::new() };
        id
    }

    /// `stable_tree_append`: the page of rmap item `item` now maps stable
    /// node `id`'s KSM page (`mm->ksm_merging_pages` counts it).
    pub(crate) fn stable_tree_append(&mut self, item: RmapId, id: u32) {
        let node = &mut self.stable.nodes[id as usize];
        if node.sharers.is_empty() {
            self.stats.pages_shared += 1;
        } else {
            self.stats.pages_sharing += 1;
        }
        node.sharers.push(item);
        let (slot, idx) = self.slot_mut(item);
        slot.merging_pages += 1;
        let r = &mut slot.rmap[idx];
        r.state = RmapState::Stable;
        r.node = id;
    }
}
