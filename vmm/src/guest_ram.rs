//! Guest RAM as the exit handlers serve it: secondary-MMU faults, and the
//! guest accesses KVM retired without performing them (an MMIO exit at a
//! RAM address under the memslot view), completed by the VMM.

use std::sync::{Arc, Mutex};

use shadow_mmu::{handle_ept_violation, lock, Access, EptView, FaultError, Gfn, PrimaryMmu, PrimaryMmuError};
use shadow_mmu::{SecondaryMmu, PAGE_SHIFT};

use crate::view::{AnyView, ViewError, ViewFaults};
use crate::x86::layout::GUEST_BASE;

/// The secondary MMU of a VM, over its view.
pub type VmSecondaryMmu = SecondaryMmu<AnyView>;

/// Errors of serving guest RAM.
#[derive(Debug, thiserror::Error)]
pub enum GuestRamError {
    /// The EPT-violation handler failed.
    #[error("secondary-MMU fault at gpa {gpa:#x} ({access:?}) failed")]
    Fault {
        /// The faulting address.
        gpa: u64,
        /// What the guest did.
        access: Access,
        /// What failed.
        #[source]
        source: FaultError<ViewError>,
    },
    /// The access could not be completed in the frame.
    #[error("guest RAM access at gpa {gpa:#x} failed")]
    Access {
        /// The address.
        gpa: u64,
        /// What failed.
        #[source]
        source: PrimaryMmuError,
    },
    /// The view could not map a page the secondary MMU maps.
    #[error("the view could not map gfn {gfn:#x} again")]
    Remap {
        /// The page.
        gfn: Gfn,
        /// What failed.
        #[source]
        source: ViewError,
    },
}

/// The guest's memory as the exit handlers serve it: the primary and the
/// secondary MMU.
#[derive(Debug, Clone)]
pub struct GuestRam {
    /// The primary MMU.
    pub mm: Arc<Mutex<PrimaryMmu>>,
    /// The secondary MMU.
    pub mmu: Arc<Mutex<VmSecondaryMmu>>,
    /// Guest RAM size: accesses below it are RAM, above it MMIO.
    pub mem_bytes: u64,
}

impl GuestRam {
    /// Whether `gpa` is guest RAM that the secondary MMU manages.
    pub fn is_guest_ram(&self, gpa: u64) -> bool {
        (GUEST_BASE..self.mem_bytes).contains(&gpa)
    }

    /// Serves a secondary-MMU fault at `gpa`.
    pub fn fault(&self, gpa: u64, access: Access) -> Result<(), GuestRamError> {
        handle_ept_violation(&self.mm, &self.mmu, gpa >> PAGE_SHIFT, access)
            .map(|_| ())
            .map_err(|source| GuestRamError::Fault { gpa, access, source })
    }

    /// Whether the secondary MMU maps `gpa`'s page now.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        lock(&self.mmu).ept().lookup(gpa >> PAGE_SHIFT).is_some()
    }

    /// A fault the userfaultfd view delivered for `gfn`. One on a page the
    /// secondary MMU already maps with this access is the host's own (a
    /// first touch of a frame that was a hole, or a race with a view
    /// update): the view maps it again and it is no secondary-MMU fault.
    pub fn serve_view_fault(&self, faults: &ViewFaults, gfn: Gfn, access: Access) -> Result<(), GuestRamError> {
        let taken = std::time::Instant::now();
        {
            let mut mmu = lock(&self.mmu);
            if let Some(e) = mmu.ept().lookup(gfn) {
                if access != Access::Write || e.writable() {
                    faults.record_host_fault();
                    let (pfn, writable) = (e.pfn(), e.writable());
                    return EptView::map(mmu.view_mut(), gfn, pfn, writable)
                        .map_err(|source| GuestRamError::Remap { gfn, source });
                }
            }
        }
        faults.record(access);
        let served = self.fault(gfn << PAGE_SHIFT, access);
        faults.record_served(access, u64::try_from(taken.elapsed().as_nanos()).unwrap_or(u64::MAX));
        served
    }

    /// A guest read the VMM completes (an MMIO exit on RAM): fault the page
    /// in, then read what the guest would have read.
    pub fn complete_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), GuestRamError> {
        self.fault(gpa, Access::Read)?;
        lock(&self.mm).read_guest(gpa, data).map_err(|source| GuestRamError::Access { gpa, source })
    }

    /// A guest write the VMM completes (KVM retired it without writing):
    /// fault every page it touches in for write (breaking copy-on-write),
    /// then store the bytes in the frames now mapped. The store happens
    /// under the primary MMU's lock with every pte writable; if ksmd
    /// write-protected a page again in between, the faults are redone.
    pub fn complete_write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestRamError> {
        let last = gpa + data.len().max(1) as u64 - 1;
        let pages: Vec<u64> = ((gpa >> PAGE_SHIFT)..=(last >> PAGE_SHIFT))
            .map(|p| (p << PAGE_SHIFT).max(gpa))
            .filter(|&at| self.is_guest_ram(at))
            .collect();
        loop {
            for &at in &pages {
                self.fault(at, Access::Write)?;
            }
            let mut mm = lock(&self.mm);
            if pages.iter().all(|&at| mm.pte(at >> PAGE_SHIFT).is_ok_and(|p| p.writable)) {
                return mm.write_guest(gpa, data).map_err(|source| GuestRamError::Access { gpa, source });
            }
        }
    }
}
