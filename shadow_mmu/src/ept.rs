//! A 4-level page table in Intel EPT entry format (SDM vol. 3, "EPT
//! Translation Mechanism"): bit 0 read, bit 1 write, bit 2 execute, bits
//! 5:3 memory type (leaves), bit 7 large page, bits 51:12 the frame.
//!
//! Deliberate difference (crate docs): a non-leaf entry's frame field holds
//! the index of the next table in this table's arena, where hardware holds
//! the physical address of the next table. Only 4 KiB leaves are used (as
//! KVM does for memory it may deduplicate).

use crate::frame_pool::Pfn;
use crate::mmu_notifier::Gfn;

const ENTRIES: usize = 512;
const LEVELS: u32 = 4;

/// One EPT entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct EptEntry(pub u64);

impl EptEntry {
    /// Read access.
    pub const READ: u64 = 1 << 0;
    /// Write access.
    pub const WRITE: u64 = 1 << 1;
    /// Execute access.
    pub const EXEC: u64 = 1 << 2;
    /// Memory type write-back (6) in bits 5:3.
    pub const MEMTYPE_WB: u64 = 6 << 3;
    /// Large page (bit 7); never set here.
    pub const LARGE: u64 = 1 << 7;
    /// The frame field, bits 51:12.
    pub const ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

    /// A leaf mapping `pfn`, readable and executable, writable if asked.
    pub fn leaf(pfn: Pfn, writable: bool) -> Self {
        let perms = Self::READ | Self::EXEC | if writable { Self::WRITE } else { 0 };
        Self(((pfn << 12) & Self::ADDR_MASK) | Self::MEMTYPE_WB | perms)
    }

    fn table(index: usize) -> Self {
        Self(((index as u64) << 12) | Self::READ | Self::WRITE | Self::EXEC)
    }

    /// Present: any of read, write, execute.
    pub fn present(self) -> bool {
        self.0 & (Self::READ | Self::WRITE | Self::EXEC) != 0
    }

    /// Writable.
    pub fn writable(self) -> bool {
        self.0 & Self::WRITE != 0
    }

    /// The frame (leaves) or table index (non-leaves).
    pub fn pfn(self) -> Pfn {
        (self.0 & Self::ADDR_MASK) >> 12
    }

    fn next_table(self) -> usize {
        self.pfn() as usize
    }
}

type Table = Box<[EptEntry; ENTRIES]>;

fn index_at(gfn: Gfn, level: u32) -> usize {
    ((gfn >> (9 * level)) & 0x1FF) as usize
}

/// The EPT: a root table (the EPT PML4) and the tables below it.
#[derive(Debug, Clone)]
pub struct Ept {
    tables: Vec<Table>,
    leaves: u64,
}

impl Default for Ept {
    fn default() -> Self {
        Self::new()
    }
}

impl Ept {
    /// An empty EPT (only the root table).
    pub fn new() -> Self {
        Self { tables: vec![Box::new([EptEntry::default(); ENTRIES])], leaves: 0 }
    }

    /// Number of present leaves.
    pub fn len(&self) -> u64 {
        self.leaves
    }

    /// Whether nothing is mapped.
    pub fn is_empty(&self) -> bool {
        self.leaves == 0
    }

    /// The leaf table covering `gfn`, if its path exists.
    fn leaf_table(&self, gfn: Gfn) -> Option<usize> {
        let mut table = 0;
        for level in (1..LEVELS).rev() {
            let e = self.tables[table][index_at(gfn, level)];
            if !e.present() {
                return None;
            }
            table = e.next_table();
        }
        Some(table)
    }

    fn leaf_table_alloc(&mut self, gfn: Gfn) -> usize {
        let mut table = 0;
        for level in (1..LEVELS).rev() {
            let i = index_at(gfn, level);
            let e = self.tables[table][i];
            table = if e.present() {
                e.next_table()
            } else {
                self.tables.push(Box::new([EptEntry::default(); ENTRIES]));
                let new = self.tables.len() - 1;
                self.tables[table][i] = EptEntry::table(new);
                new
            };
        }
        table
    }

    /// The leaf of `gfn`, if present.
    pub fn lookup(&self, gfn: Gfn) -> Option<EptEntry> {
        let table = self.leaf_table(gfn)?;
        Some(self.tables[table][index_at(gfn, 0)]).filter(|e| e.present())
    }

    /// Maps `gfn` to `pfn`; returns the leaf it replaced.
    pub fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Option<EptEntry> {
        let table = self.leaf_table_alloc(gfn);
        let slot = &mut self.tables[table][index_at(gfn, 0)];
        let old = std::mem::replace(slot, EptEntry::leaf(pfn, writable));
        if old.present() {
            Some(old)
        } else {
            self.leaves += 1;
            None
        }
    }

    /// Changes the write permission of a present leaf; false if absent.
    pub fn protect(&mut self, gfn: Gfn, writable: bool) -> bool {
        let Some(table) = self.leaf_table(gfn) else { return false };
        let slot = &mut self.tables[table][index_at(gfn, 0)];
        if !slot.present() {
            return false;
        }
        *slot = EptEntry::leaf(slot.pfn(), writable);
        true
    }

    /// Removes every leaf in [start, end); returns how many were present.
    /// Absent subtrees are skipped whole.
    pub fn unmap_range(&mut self, start: Gfn, end: Gfn) -> u64 {
        let zapped = self.update_leaves(start, end, |_| Some(EptEntry::default()));
        self.leaves -= zapped;
        zapped
    }

    /// Clears the write bit of every writable leaf in [start, end), frames
    /// and other bits kept; returns how many changed. Absent subtrees are
    /// skipped whole.
    pub fn write_protect_range(&mut self, start: Gfn, end: Gfn) -> u64 {
        self.update_leaves(start, end, |e| e.writable().then_some(EptEntry(e.0 & !EptEntry::WRITE)))
    }

    /// Replaces each present leaf in [start, end) by what `update` returns
    /// for it, if anything; returns how many were replaced.
    fn update_leaves(&mut self, start: Gfn, end: Gfn, mut update: impl FnMut(EptEntry) -> Option<EptEntry>) -> u64 {
        let mut changed = 0;
        let mut gfn = start;
        while gfn < end {
            let stop = end.min((gfn | 0x1FF) + 1);
            // An absent leaf table covers the whole stretch.
            if let Some(table) = self.leaf_table(gfn) {
                for g in gfn..stop {
                    let slot = &mut self.tables[table][index_at(g, 0)];
                    if !slot.present() {
                        continue;
                    }
                    if let Some(new) = update(*slot) {
                        *slot = new;
                        changed += 1;
                    }
                }
            }
            gfn = stop;
        }
        changed
    }

    /// Every present leaf in gfn order.
    pub fn iter(&self) -> impl Iterator<Item = (Gfn, EptEntry)> + '_ {
        let mut out = Vec::with_capacity(self.leaves as usize);
        self.collect(0, LEVELS - 1, 0, &mut out);
        out.into_iter()
    }

    fn collect(&self, table: usize, level: u32, base: Gfn, out: &mut Vec<(Gfn, EptEntry)>) {
        for (i, e) in self.tables[table].iter().enumerate() {
            if !e.present() {
                continue;
            }
            let gfn = base | ((i as u64) << (9 * level));
            if level == 0 {
                out.push((gfn, *e));
            } else {
                self.collect(e.next_table(), level - 1, gfn, out);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leaves_use_the_sdm_bit_layout() {
        let e = EptEntry::leaf(0x1234, true);
        assert_eq!(e.0, 0x0123_4000 | 0x30 | 0b111);
        assert_eq!(EptEntry::leaf(0x1234, false).0 & 0b111, 0b101);
        assert_eq!(e.pfn(), 0x1234);
        assert!(e.present() && e.writable());
        assert_eq!(e.0 & EptEntry::LARGE, 0);
    }

    #[test]
    fn map_lookup_protect_unmap() {
        let mut ept = Ept::new();
        assert_eq!(ept.map(0x100, 7, true), None);
        assert_eq!(ept.map(0x40000, 8, false), None); // another PDPT entry
        assert_eq!(ept.len(), 2);
        assert_eq!(ept.lookup(0x100), Some(EptEntry::leaf(7, true)));
        assert_eq!(ept.lookup(0x101), None);
        assert!(ept.protect(0x100, false));
        assert!(!ept.lookup(0x100).expect("mapped").writable());
        assert!(!ept.protect(0x999, true));
        assert_eq!(ept.map(0x100, 9, true), Some(EptEntry::leaf(7, false)));
        assert_eq!(ept.len(), 2);
        assert_eq!(ept.iter().map(|(g, e)| (g, e.pfn())).collect::<Vec<_>>(), vec![(0x100, 9), (0x40000, 8)]);
        assert_eq!(ept.unmap_range(0, 0x40000), 1);
        assert_eq!(ept.unmap_range(0, 1 << 30), 1);
        assert!(ept.is_empty());
    }

    #[test]
    fn write_protect_range_clears_only_the_write_bit_of_present_leaves() {
        let mut ept = Ept::new();
        ept.map(0x1FE, 7, true);
        ept.map(0x1FF, 8, false);
        ept.map(0x200, 9, true); // the next leaf table
        ept.map(0x40000, 10, true); // outside the range
        assert_eq!(ept.write_protect_range(0x100, 0x30000), 2, "the read-only leaf does not count");
        assert_eq!(ept.lookup(0x1FE), Some(EptEntry::leaf(7, false)));
        assert_eq!(ept.lookup(0x1FF), Some(EptEntry::leaf(8, false)));
        assert_eq!(ept.lookup(0x200), Some(EptEntry::leaf(9, false)));
        assert_eq!(ept.lookup(0x40000), Some(EptEntry::leaf(10, true)));
        assert_eq!(ept.lookup(0x1FD), None, "absent leaves stay absent");
        assert_eq!(ept.len(), 4);
        assert_eq!(ept.write_protect_range(0, 1 << 30), 1);
        assert_eq!(ept.write_protect_range(0, 1 << 30), 0);
    }
}
