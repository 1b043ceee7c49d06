//! Guest RAM: its size checks, the frame pool behind it, the VMM's low
//! megabyte (boot slot, GDT, TSS, page tables) and the loaded image.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use shadow_mmu::{FramePool, FramePoolError, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryError};

use crate::config::{DedupPolicy, RunConfig};
use crate::image::{ElfInfo, ImageError};
use crate::view::memslot::{set_memslot, BOOT_SLOT};
use crate::view::ViewError;
use crate::x86::layout::{GDT_ADDR, GUEST_BASE, MAX_RAM, MIN_RAM, TSS_ADDR};
use crate::x86::{cpu, page_tables};

/// Errors of setting up guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// A size of zero.
    #[error("guest RAM size is zero: give at least 2M with --mem")]
    Zero,
    /// A size that is not whole pages.
    #[error("guest RAM size {0} is not a multiple of 4 KiB (4096): round it, e.g. --mem 64M")]
    Unaligned(u64),
    /// Less than the low megabyte and one more.
    #[error("guest RAM size {0} is below the 2 MiB minimum (the low megabyte is the VMM's): give --mem 2M or more")]
    TooSmall(u64),
    /// More than the VMM maps.
    #[error("guest RAM size {0} is above the VMM's 64 GiB limit: give --mem 64G or less")]
    TooLarge(u64),
    /// More than this host has.
    #[error("guest RAM size {bytes} is more than this host's {total} bytes of memory: give a smaller --mem")]
    MoreThanHost {
        /// What was asked.
        bytes: u64,
        /// MemTotal.
        total: u64,
    },
    /// The frame pool could not be created.
    #[error(transparent)]
    Pool(#[from] FramePoolError),
    /// The boot slot could not be installed.
    #[error(transparent)]
    BootSlot(#[from] ViewError),
    /// The image could not be loaded.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The boot structures could not be written.
    #[error("cannot write boot structures into guest RAM")]
    Boot(#[source] GuestMemoryError),
}

fn host_mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks a guest RAM size against ABI v1 and the host.
pub fn check_mem_size(bytes: u64) -> Result<(), MemoryError> {
    match bytes {
        0 => Err(MemoryError::Zero),
        b if b % PAGE_SIZE != 0 => Err(MemoryError::Unaligned(b)),
        b if b < MIN_RAM => Err(MemoryError::TooSmall(b)),
        b if b > MAX_RAM => Err(MemoryError::TooLarge(b)),
        b => match host_mem_total() {
            Some(total) if b > total => Err(MemoryError::MoreThanHost { bytes: b, total }),
            _ => Ok(()),
        },
    }
}

/// Creates guest RAM for `config` on `vm_fd`: the frame pool (one frame per
/// guest page, one spare so that a copy-on-write break always finds a free
/// frame (see `PrimaryMmu::new`), one for the deduplicator's zero page;
/// anonymous memory under the `kernel` policy, so the host's KSM can merge
/// it), the boot slot over the low megabyte, the image and the boot
/// structures. Returns the pool and where the image starts.
pub fn create_guest_ram(vm_fd: &VmFd, config: &RunConfig) -> Result<(Arc<FramePool>, ElfInfo), MemoryError> {
    let pool_bytes = config.mem_bytes + 2 * PAGE_SIZE;
    let pool = Arc::new(match config.dedup {
        DedupPolicy::Kernel => FramePool::new_anonymous(pool_bytes)?,
        _ => FramePool::new(pool_bytes)?,
    });
    // The VMM's low megabyte: always mapped, never part of a view.
    set_memslot(vm_fd, &pool, BOOT_SLOT, 0, GUEST_BASE, 0, false)?;
    // Loaded before the view exists (it maps what holds memory). Nothing is
    // deduplicated yet: guest page n is frame n, so the direct map doubles
    // as guest-physical memory.
    let mem = pool.direct_map();
    let info = config.image.load(mem, config.mem_bytes)?;
    write_boot_structures(mem, config.mem_bytes)?;
    Ok((pool, info))
}

fn write_boot_structures(mem: &vm_memory::GuestMemoryMmap, ram: u64) -> Result<(), MemoryError> {
    mem.write_slice(&cpu::gdt_bytes(), GuestAddress(GDT_ADDR)).map_err(MemoryError::Boot)?;
    mem.write_slice(&cpu::tss_bytes(), GuestAddress(TSS_ADDR)).map_err(MemoryError::Boot)?;
    for (addr, table) in page_tables::build_identity_map(ram).tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(MemoryError::Boot)?;
    }
    Ok(())
}
