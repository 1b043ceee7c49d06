//! A binary search tree ordered by page content, the shape of mm/ksm.c's
//! rbtrees: nodes hold an item (an rmap item or a stable node), and every
//! search compares the probe page with a node's page as it walks down
//! (`memcmp_pages`), so the order is whatever the pages hold now.
//!
//! A treap (random priorities, expected O(log n) depth) in an arena, with
//! parent links, instead of the kernel's red-black tree: see "Deliberate
//! differences from mm/ksm.c" in the crate docs.

use std::cmp::Ordering;

const NIL: u32 = u32::MAX;

#[derive(Debug, Clone, Copy)]
struct Node {
    left: u32,
    right: u32,
    parent: u32,
    item: u32,
}

/// Where a failed search would insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Vacant {
    parent: u32,
    go_left: bool,
}

/// The result of a search.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Search {
    /// A node compares equal; its id.
    Found(u32),
    /// No node compares equal; where to insert.
    Vacant(Vacant),
}

/// The tree: an arena of nodes, free slots reused.
#[derive(Debug, Clone)]
pub struct ContentTree {
    nodes: Vec<Node>,
    free: Vec<u32>,
    root: u32,
    len: usize,
}

/// The priority of a node: a fixed hash of its id (a treap needs random,
/// independent priorities; storing none saves four bytes per node).
fn priority(id: u32) -> u32 {
    let mut x = id.wrapping_add(0x9E37_79B9);
    x = (x ^ (x >> 16)).wrapping_mul(0x85EB_CA6B);
    x = (x ^ (x >> 13)).wrapping_mul(0xC2B2_AE35);
    x ^ (x >> 16)
}

impl Default for ContentTree {
    /// An empty tree (the root is NIL, not node 0).
    fn default() -> Self {
        Self::new()
    }
}

impl ContentTree {
    /// An empty tree.
    pub fn new() -> Self {
        Self { nodes: Vec::new(), free: Vec::new(), root: NIL, len: 0 }
    }

    /// Number of nodes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the tree is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Forgets every node (the unstable tree at the start of a full scan).
    pub fn clear(&mut self) {
        self.nodes.clear();
        self.free.clear();
        self.root = NIL;
        self.len = 0;
    }

    /// Bytes of memory the tree holds.
    pub fn metadata_bytes(&self) -> usize {
        self.nodes.capacity() * std::mem::size_of::<Node>() + self.free.capacity() * 4
    }

    /// The item of node `id`.
    pub fn item(&self, id: u32) -> u32 {
        self.nodes[id as usize].item
    }

    /// Replaces the item of node `id` (same content, another holder).
    pub fn set_item(&mut self, id: u32, item: u32) {
        self.nodes[id as usize].item = item;
    }

    /// Walks down from the root; `cmp(item)` orders the probe against a
    /// node's item (Less: the probe goes left).
    pub fn search(&self, mut cmp: impl FnMut(u32) -> Ordering) -> Search {
        let mut parent = NIL;
        let mut go_left = false;
        let mut at = self.root;
        while at != NIL {
            let n = self.nodes[at as usize];
            match cmp(n.item) {
                Ordering::Equal => return Search::Found(at),
                Ordering::Less => {
                    parent = at;
                    go_left = true;
                    at = n.left;
                }
                Ordering::Greater => {
                    parent = at;
                    go_left = false;
                    at = n.right;
                }
            }
        }
        Search::Vacant(Vacant { parent, go_left })
    }

    /// Inserts `item` where a search left off; returns the new node's id.
    /// The tree must not have changed since that search.
    pub fn insert(&mut self, at: Vacant, item: u32) -> u32 {
        let node = Node { left: NIL, right: NIL, parent: at.parent, item };
        let id = match self.free.pop() {
            Some(id) => {
                self.nodes[id as usize] = node;
                id
            }
            None => {
                self.nodes.push(node);
                (self.nodes.len() - 1) as u32
            }
        };
        if at.parent == NIL {
            self.root = id;
        } else if at.go_left {
            self.nodes[at.parent as usize].left = id;
        } else {
            self.nodes[at.parent as usize].right = id;
        }
        self.len += 1;
        // Restore the heap order on priorities.
        while self.nodes[id as usize].parent != NIL && priority(id) > priority(self.nodes[id as usize].parent) {
            self.rotate_up(id);
        }
        id
    }

    /// Removes node `id` (found by an earlier search or kept by its holder).
    pub fn erase(&mut self, id: u32) {
        // Rotate the node down below its higher-priority child until it is a leaf.
        loop {
            let n = self.nodes[id as usize];
            let child = match (n.left, n.right) {
                (NIL, NIL) => break,
                (l, NIL) => l,
                (NIL, r) => r,
                (l, r) => {
                    if priority(l) > priority(r) {
                        l
                    } else {
                        r
                    }
                }
            };
            self.rotate_up(child);
        }
        let parent = self.nodes[id as usize].parent;
        self.replace_child(parent, id, NIL);
        self.free.push(id);
        self.len -= 1;
    }

    fn replace_child(&mut self, parent: u32, old: u32, new: u32) {
        if parent == NIL {
            self.root = new;
        } else if self.nodes[parent as usize].left == old {
            self.nodes[parent as usize].left = new;
        } else {
            self.nodes[parent as usize].right = new;
        }
        if new != NIL {
            self.nodes[new as usize].parent = parent;
        }
    }

    /// Rotates `x` above its parent, keeping the in-order sequence.
    fn rotate_up(&mut self, x: u32) {
        let p = self.nodes[x as usize].parent;
        let g = self.nodes[p as usize].parent;
        if self.nodes[p as usize].left == x {
            let b = self.nodes[x as usize].right;
            self.nodes[p as usize].left = b;
            if b != NIL {
                self.nodes[b as usize].parent = p;
            }
            self.nodes[x as usize].right = p;
        } else {
            let b = self.nodes[x as usize].left;
            self.nodes[p as usize].right = b;
            if b != NIL {
                self.nodes[b as usize].parent = p;
            }
            self.nodes[x as usize].left = p;
        }
        self.nodes[p as usize].parent = x;
        self.replace_child(g, p, x);
    }

    /// Items in order (for tests and statistics).
    pub fn in_order(&self) -> Vec<u32> {
        let mut out = Vec::with_capacity(self.len);
        let mut stack = Vec::new();
        let mut at = self.root;
        while at != NIL || !stack.is_empty() {
            while at != NIL {
                stack.push(at);
                at = self.nodes[at as usize].left;
            }
            if let Some(n) = stack.pop() {
                out.push(self.nodes[n as usize].item);
                at = self.nodes[n as usize].right;
            }
        }
        out
    }

    /// The depth of the deepest node (for tests: expected O(log n)).
    pub fn depth(&self) -> usize {
        fn depth(t: &ContentTree, at: u32) -> usize {
            if at == NIL {
                0
            } else {
                let n = t.nodes[at as usize];
                1 + depth(t, n.left).max(depth(t, n.right))
            }
        }
        depth(self, self.root)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    fn insert(t: &mut ContentTree, key: u32) -> Option<u32> {
        match t.search(|item| key.cmp(&item)) {
            Search::Found(_) => None,
            Search::Vacant(v) => Some(t.insert(v, key)),
        }
    }

    proptest! {
        #[test]
        fn behaves_like_an_ordered_set(ops in prop::collection::vec((any::<bool>(), 0u32..200), 0..400)) {
            let mut t = ContentTree::new();
            let mut reference: BTreeMap<u32, u32> = BTreeMap::new(); // key -> node id
            for (add, key) in ops {
                if add {
                    let id = insert(&mut t, key);
                    prop_assert_eq!(id.is_some(), !reference.contains_key(&key));
                    if let Some(id) = id { reference.insert(key, id); }
                } else if let Some(id) = reference.remove(&key) {
                    t.erase(id);
                }
                prop_assert_eq!(t.len(), reference.len());
                prop_assert_eq!(t.in_order(), reference.keys().copied().collect::<Vec<_>>());
                for (&key, &id) in &reference {
                    prop_assert_eq!(t.search(|item| key.cmp(&item)), Search::Found(id));
                }
            }
        }
    }

    #[test]
    fn stays_shallow_on_sorted_input() {
        let mut t = ContentTree::new();
        for k in 0..65_536 {
            insert(&mut t, k);
        }
        assert!(t.depth() < 64, "depth {}", t.depth());
        t.clear();
        assert!(t.is_empty() && t.in_order().is_empty());
    }
}
