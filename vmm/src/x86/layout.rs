//! Where the VMM puts its boot structures in guest-physical [0, 1 MiB).
//!
//! ```text
//! 0x0000_1000  GDT (null, user data, user code, TSS)
//! 0x0000_3000  PML4
//! 0x0000_4000  PDPT
//! 0x0000_5000  page table for [0, 2 MiB) in 4 KiB pages
//! 0x0000_6000  TSS with an I/O permission bitmap that allows every port (to 0x8069)
//! 0x0001_0000  page directories, one per GiB mapped (2 MiB pages)
//! 0x0007_0000  guest stack, 64 KiB, the only low page the guest (CPL 3) can reach
//! 0x0008_0000  initial RSP
//! 0x0010_0000  first byte of the guest's own memory
//! ```

/// Size of a page.
pub const PAGE_SIZE: u64 = 4096;
/// Guest-physical address of the GDT.
pub const GDT_ADDR: u64 = 0x1000;
/// Guest-physical address of the TSS.
pub const TSS_ADDR: u64 = 0x6000;
/// Offset of the I/O permission bitmap inside the TSS (right after the 104-byte TSS).
pub const TSS_IOMAP_OFFSET: u64 = 0x68;
/// Bytes of I/O permission bitmap: one bit per port, 65,536 ports.
pub const TSS_IOMAP_BYTES: u64 = 65536 / 8;
/// The TSS segment limit: TSS, bitmap, and the all-ones byte that must follow it.
pub const TSS_LIMIT: u32 = (TSS_IOMAP_OFFSET + TSS_IOMAP_BYTES) as u32;
/// Guest-physical address of the PML4.
pub const PML4_ADDR: u64 = 0x3000;
/// Guest-physical address of the single PDPT.
pub const PDPT_ADDR: u64 = 0x4000;
/// Guest-physical address of the 4 KiB page table for the first 2 MiB.
pub const LOW_PT_ADDR: u64 = 0x5000;
/// Guest-physical address of the first page directory.
pub const PD_BASE_ADDR: u64 = 0x1_0000;
/// Lowest address of the guest stack.
pub const STACK_BOTTOM: u64 = 0x7_0000;
/// Initial RSP: the top of the guest stack.
pub const STACK_TOP: u64 = 0x8_0000;
/// First guest-physical address that belongs to the guest (ABI v1).
pub const GUEST_BASE: u64 = guest_images::abi::GUEST_BASE;
/// Smallest guest RAM the VMM accepts: the low megabyte plus one for the guest.
pub const MIN_RAM: u64 = 2 << 20;
/// Largest guest RAM the identity map is built for.
pub const MAX_RAM: u64 = 64 << 30;
/// One GiB.
pub const GIB: u64 = 1 << 30;

// The layout above, checked when the crate is built.
const _: () = {
    assert!(TSS_ADDR >= LOW_PT_ADDR + PAGE_SIZE, "TSS overlaps the low page table");
    assert!(TSS_ADDR + (TSS_LIMIT as u64) < PD_BASE_ADDR, "TSS and its bitmap run into the page directories");
    assert!(
        STACK_TOP - STACK_BOTTOM >= guest_images::abi::MIN_STACK_BYTES,
        "ABI v1 promises a stack of at least 16 KiB"
    );
    assert!(STACK_TOP <= GUEST_BASE, "the stack must stay in the low megabyte");
};

/// How much guest-physical address space the identity map covers for `ram`
/// bytes of RAM: all RAM, then at least one GiB beyond it and never less than
/// 4 GiB, so that a guest touching addresses past RAM takes an MMIO exit (as
/// ABI v1 promises) rather than a page fault.
pub fn mapped_bytes(ram: u64) -> u64 {
    (ram.div_ceil(GIB) * GIB + GIB).max(4 * GIB)
}

/// Number of page directories the identity map needs for `ram` bytes of RAM.
pub fn nr_page_directories(ram: u64) -> u64 {
    mapped_bytes(ram) / GIB
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn page_directories_fit_below_the_stack() {
        let last_pd_end = PD_BASE_ADDR + nr_page_directories(MAX_RAM) * PAGE_SIZE;
        assert!(last_pd_end <= STACK_BOTTOM, "page directories run into the stack");
    }

    #[test]
    fn identity_map_reaches_past_ram() {
        assert_eq!(mapped_bytes(MIN_RAM), 4 * GIB);
        assert_eq!(mapped_bytes(4 * GIB), 5 * GIB);
        assert_eq!(mapped_bytes(5 * GIB + 4096), 7 * GIB);
        assert!(mapped_bytes(MAX_RAM) > MAX_RAM);
    }
}
