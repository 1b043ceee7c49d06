//! The guest's identity page tables (guest virtual == guest physical).
//!
//! Four-level x86-64 paging. The first 2 MiB use a 4 KiB page table so that
//! the low megabyte can be closed to CPL 3 except for the stack; everything
//! above uses 2 MiB pages up to [`layout::mapped_bytes`]. Leaves are built with
//! their Accessed and Dirty bits already set so the CPU never has to write them
//! back (on a shadow-paging host such a write is itself a fault).

use std::collections::BTreeMap;

use super::layout::{self, GUEST_BASE, LOW_PT_ADDR, PAGE_SIZE, PDPT_ADDR, PD_BASE_ADDR, PML4_ADDR};

/// Present.
pub const PTE_P: u64 = 1 << 0;
/// Writable.
pub const PTE_RW: u64 = 1 << 1;
/// User (CPL 3) accessible.
pub const PTE_US: u64 = 1 << 2;
/// Accessed.
pub const PTE_A: u64 = 1 << 5;
/// Dirty (leaves only).
pub const PTE_D: u64 = 1 << 6;
/// Page size: the PDE maps a 2 MiB page.
pub const PTE_PS: u64 = 1 << 7;
/// Physical-address field of an entry.
pub const PTE_ADDR_MASK: u64 = 0x000F_FFFF_FFFF_F000;

const TABLE: u64 = PTE_P | PTE_RW | PTE_US | PTE_A;
const USER_LEAF: u64 = PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D;
const SUPERVISOR_LEAF: u64 = PTE_P | PTE_RW | PTE_A | PTE_D;
const ENTRIES: usize = 512;
const TWO_MIB: u64 = 2 << 20;

/// One 4 KiB table of 512 entries.
pub type Table = [u64; ENTRIES];

/// The identity map: every table page, keyed by its guest-physical address.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageTables {
    tables: BTreeMap<u64, Table>,
}

/// Where a virtual address leads and with which rights.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// The physical address.
    pub paddr: u64,
    /// Writable.
    pub writable: bool,
    /// Reachable from CPL 3.
    pub user: bool,
}

/// Builds the identity map for `ram` bytes of guest RAM (see the module docs).
pub fn build_identity_map(ram: u64) -> PageTables {
    let mut tables = BTreeMap::new();
    let nr_pds = layout::nr_page_directories(ram);

    let mut pml4 = [0; ENTRIES];
    pml4[0] = PDPT_ADDR | TABLE;
    tables.insert(PML4_ADDR, pml4);

    let mut pdpt = [0; ENTRIES];
    for gib in 0..nr_pds {
        pdpt[gib as usize] = (PD_BASE_ADDR + gib * PAGE_SIZE) | TABLE;
    }
    tables.insert(PDPT_ADDR, pdpt);

    for gib in 0..nr_pds {
        let mut pd = [0; ENTRIES];
        for (i, pde) in pd.iter_mut().enumerate() {
            let addr = gib * layout::GIB + i as u64 * TWO_MIB;
            *pde = if addr == 0 { LOW_PT_ADDR | TABLE } else { addr | USER_LEAF | PTE_PS };
        }
        tables.insert(PD_BASE_ADDR + gib * PAGE_SIZE, pd);
    }

    let mut low_pt = [0; ENTRIES];
    for (i, pte) in low_pt.iter_mut().enumerate() {
        let addr = i as u64 * PAGE_SIZE;
        let guest_reachable = addr >= GUEST_BASE || (layout::STACK_BOTTOM..layout::STACK_TOP).contains(&addr);
        *pte = addr | if guest_reachable { USER_LEAF } else { SUPERVISOR_LEAF };
    }
    tables.insert(LOW_PT_ADDR, low_pt);

    PageTables { tables }
}

impl PageTables {
    /// Every table page as (guest-physical address, entries).
    pub fn tables(&self) -> impl Iterator<Item = (u64, &Table)> {
        self.tables.iter().map(|(addr, t)| (*addr, t))
    }

    /// Walks the tables as the CPU would from CR3 = [`PML4_ADDR`].
    pub fn translate(&self, vaddr: u64) -> Option<Translation> {
        let mut table_addr = PML4_ADDR;
        let mut writable = true;
        let mut user = true;
        for level in (0..4).rev() {
            let shift = 12 + 9 * level;
            let index = ((vaddr >> shift) & 0x1FF) as usize;
            let entry = self.tables.get(&table_addr)?[index];
            if entry & PTE_P == 0 {
                return None;
            }
            writable &= entry & PTE_RW != 0;
            user &= entry & PTE_US != 0;
            let leaf = level == 0 || (level == 1 && entry & PTE_PS != 0);
            if leaf {
                let page_mask = (1u64 << shift) - 1;
                let paddr = (entry & PTE_ADDR_MASK & !page_mask) | (vaddr & page_mask);
                return Some(Translation { paddr, writable, user });
            }
            table_addr = entry & PTE_ADDR_MASK;
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::x86::layout::{mapped_bytes, GDT_ADDR, GIB, STACK_BOTTOM, STACK_TOP};

    #[test]
    fn maps_all_ram_one_to_one_for_cpl3() {
        for ram in [2 << 20, 64 << 20, 5 * GIB] {
            let pt = build_identity_map(ram);
            for addr in [GUEST_BASE, GUEST_BASE + 0x1234, 2 << 20, ram - 8, ram / 2 + 4095] {
                let t = pt.translate(addr).expect("mapped");
                assert_eq!(t, Translation { paddr: addr, writable: true, user: true }, "{addr:#x}");
            }
        }
    }

    #[test]
    fn low_megabyte_is_closed_to_the_guest_except_its_stack() {
        let pt = build_identity_map(64 << 20);
        for addr in [0, GDT_ADDR, PML4_ADDR, STACK_BOTTOM - 1, STACK_TOP, GUEST_BASE - 1] {
            let t = pt.translate(addr).expect("mapped for the CPU");
            assert!(!t.user, "{addr:#x} must not be reachable from CPL 3");
        }
        for addr in [STACK_BOTTOM, STACK_TOP - 8] {
            assert!(pt.translate(addr).expect("stack").user);
        }
    }

    #[test]
    fn addresses_past_ram_are_mapped_so_they_reach_the_vmm_as_mmio() {
        let ram = 64 << 20;
        let pt = build_identity_map(ram);
        assert_eq!(pt.translate(ram).map(|t| t.paddr), Some(ram));
        assert_eq!(pt.translate(0xFEE0_0000).map(|t| t.paddr), Some(0xFEE0_0000));
        assert_eq!(pt.translate(mapped_bytes(ram)), None);
        assert_eq!(pt.translate(1 << 40), None);
    }

    #[test]
    fn tables_live_in_the_low_megabyte() {
        let pt = build_identity_map(layout::MAX_RAM);
        for (addr, _) in pt.tables() {
            assert!(addr + PAGE_SIZE <= STACK_BOTTOM, "{addr:#x}");
        }
        assert_eq!(pt.tables().count() as u64, 3 + layout::nr_page_directories(layout::MAX_RAM));
    }
}
