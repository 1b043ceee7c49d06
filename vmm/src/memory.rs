//! Guest RAM: its size checks, the frame pool behind it, the VMM's low
//! megabyte (boot slot, GDT, TSS, page tables) and the loaded image.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use shadow_mmu::{FleetLayout, FramePool, FramePoolError, PAGE_SHIFT, PAGE_SIZE};
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
    /// No guest at all.
    #[error("a fleet needs at least one guest: give --guests 1 or more")]
    NoGuests,
    /// More guests than the VMM runs.
    #[error("{0} guests are more than the VMM runs ({MAX_GUESTS}): give --guests {MAX_GUESTS} or fewer")]
    TooManyGuests(u32),
    /// A fleet whose RAM together is more than this host has.
    #[error(
        "{guests} guests of {each} bytes need {bytes} bytes, more than this host's {total} bytes of memory: give \
         fewer --guests or a smaller --mem"
    )]
    FleetMoreThanHost {
        /// Guests asked.
        guests: u32,
        /// RAM of each.
        each: u64,
        /// Their RAM together.
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

/// The most guests a fleet may have: one vCPU thread, watchdog and (under
/// the userfaultfd view) fault thread each, on a host of a few CPUs.
pub const MAX_GUESTS: u32 = 64;

/// Checks a fleet of `guests` guests of `bytes` each against the VMM's
/// limit and the host's memory (each guest's size is checked alone by
/// [`check_mem_size`]).
pub fn check_fleet_size(guests: u32, bytes: u64) -> Result<(), MemoryError> {
    match guests {
        0 => return Err(MemoryError::NoGuests),
        g if g > MAX_GUESTS => return Err(MemoryError::TooManyGuests(g)),
        _ => {}
    }
    let total_bytes = bytes.saturating_mul(u64::from(guests));
    match host_mem_total() {
        Some(total) if guests > 1 && total_bytes > total => {
            Err(MemoryError::FleetMoreThanHost { guests, each: bytes, bytes: total_bytes, total })
        }
        _ => Ok(()),
    }
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

/// Where a run's guests lie in its frame pool: one guest alone, or a
/// fleet of `config.guests` ([`FleetLayout`]: guest i's physical memory is
/// frames [i * end_gfn, (i + 1) * end_gfn)).
pub fn fleet_layout(config: &RunConfig) -> FleetLayout {
    FleetLayout {
        guests: u64::from(config.guests.max(1)),
        first_gfn: GUEST_BASE >> PAGE_SHIFT,
        end_gfn: config.mem_bytes >> PAGE_SHIFT,
    }
}

/// Creates the frame pool of a run: one frame per guest page of every
/// guest, one spare per guest so that a copy-on-write break always finds a
/// free frame (see `PrimaryMmu::new_in`), and one for the deduplicator's
/// zero page; anonymous memory under the `kernel` policy, so the host's KSM
/// can merge it. Guest 0's memory then holds the image and the boot
/// structures, and every other guest's a copy of them (the same image in
/// every guest, as VMs booted from one disk image).
pub fn create_pool(config: &RunConfig) -> Result<(Arc<FramePool>, ElfInfo), MemoryError> {
    let layout = fleet_layout(config);
    let pool_bytes = layout.nr_frames(1) * PAGE_SIZE;
    let pool = Arc::new(match config.dedup {
        DedupPolicy::Kernel => FramePool::new_anonymous(pool_bytes)?,
        _ => FramePool::new(pool_bytes)?,
    });
    // Loaded before any view exists (it maps what holds memory). Nothing is
    // deduplicated yet: guest 0's page n is frame n, so the direct map
    // doubles as its guest-physical memory.
    let mem = pool.direct_map();
    let info = config.image.load(mem, config.mem_bytes)?;
    write_boot_structures(mem, config.mem_bytes)?;
    let extent = info.segments.iter().map(|s| s.paddr + s.memsz).max().unwrap_or(0).max(GUEST_BASE);
    for guest in 1..layout.guests {
        copy_written_pages(mem, extent.next_multiple_of(PAGE_SIZE), layout.base_pfn(guest) * PAGE_SIZE)?;
    }
    Ok((pool, info))
}

/// Copies the pages of [0, extent) that hold anything but zeroes to
/// `to` + the same offset: pages of zeroes stay memfd holes, as they are
/// in guest 0.
fn copy_written_pages(mem: &vm_memory::GuestMemoryMmap, extent: u64, to: u64) -> Result<(), MemoryError> {
    let mut page = [0u8; PAGE_SIZE as usize];
    for offset in (0..extent).step_by(PAGE_SIZE as usize) {
        mem.read_slice(&mut page, GuestAddress(offset)).map_err(MemoryError::Boot)?;
        if page.iter().any(|&b| b != 0) {
            mem.write_slice(&page, GuestAddress(to + offset)).map_err(MemoryError::Boot)?;
        }
    }
    Ok(())
}

/// The boot slot of guest `guest` over its low megabyte: always mapped,
/// never part of a view.
pub fn install_boot_slot(vm_fd: &VmFd, pool: &FramePool, layout: &FleetLayout, guest: u64) -> Result<(), MemoryError> {
    Ok(set_memslot(vm_fd, pool, BOOT_SLOT, 0, GUEST_BASE, layout.base_pfn(guest), false)?)
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
