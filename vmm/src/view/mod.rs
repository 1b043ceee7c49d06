//! The EPT view: what makes the secondary MMU's table real for KVM.
//!
//! On hardware the CPU walks EPT; here the host KVM walks its own tables,
//! built from our memslots and host mappings. A backend turns the state of
//! each guest page (absent, read-only or writable, and which frame) into
//! something the host KVM enforces, so that a guest access the secondary
//! table does not allow comes back to the VMM as a fault with its address
//! (host-facts.md). The secondary MMU drives a backend through
//! [`shadow_mmu::EptView`]; [`AnyView`] is the one picked with `--view`.
//!
//! The VMM's own low megabyte is not part of any view: it is one fixed slot
//! ([`memslot::BOOT_SLOT`]) the VMM installs itself.

pub mod memslot;
pub mod uffd;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use shadow_mmu::{EptView, Gfn, Pfn};

use crate::exit_times::{ExitTimes, UffdFaultTimer};

/// Errors of view backends.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// KVM refused a memslot change.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ([{gpa:#x}, +{size:#x})) failed")]
    SetMemslot {
        /// Slot id.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The memslot view needs more slots than KVM offers.
    #[error(
        "the memslot view needs more than the {limit} memslots KVM offers (guest RAM is too fragmented by \
         deduplication): use --view uffd, or less guest RAM"
    )]
    SlotLimit {
        /// KVM's limit for this view.
        limit: u32,
    },
    /// A frame the view was asked to map does not exist in the pool.
    #[error("frame {0} is outside the frame pool")]
    NoSuchFrame(Pfn),
    /// The userfaultfd view maps frames of a memfd; this pool has none.
    #[error("the userfaultfd view needs a memfd-backed frame pool; this guest RAM is anonymous memory")]
    AnonymousPool,
    /// A gfn outside the view's range.
    #[error("gfn {0:#x} is outside the guest range the view covers")]
    OutOfRange(Gfn),
    /// A system call of the userfaultfd view failed.
    #[error("userfaultfd view: {op} failed")]
    Uffd {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel lacks userfaultfd features the userfaultfd view needs.
    #[error(
        "the kernel offers userfaultfd features {offered:#x} but the view needs MINOR_SHMEM and \
         WP_HUGETLBFS_SHMEM ({required:#x}, Linux 6.1 or later)"
    )]
    UffdFeatures {
        /// What UFFDIO_API offered.
        offered: u64,
        /// What the view needs.
        required: u64,
    },
    /// The kernel does not offer CONTINUE and WRITEPROTECT on the window.
    #[error("the kernel offers ioctls {offered:#x} on the window, without CONTINUE and WRITEPROTECT")]
    UffdRangeIoctls {
        /// What UFFDIO_REGISTER offered (`uffdio_register.ioctls`).
        offered: u64,
    },
    /// Which frames hold memory could not be read (mincore).
    #[error("userfaultfd view: cannot tell which frames hold memory")]
    Residency(#[source] shadow_mmu::FramePoolError),
    /// A frame pool for a bare measurement could not be created.
    #[error("cannot create a frame pool for the bare measurement")]
    BarePool(#[source] shadow_mmu::FramePoolError),
    /// The userfaultfd view needs more mappings than vm.max_map_count allows.
    #[error(
        "the userfaultfd view needs more memory mappings than vm.max_map_count ({limit}) allows: raise it \
         (sysctl vm.max_map_count=262144) or give less guest RAM"
    )]
    MapLimit {
        /// The current vm.max_map_count.
        limit: u64,
    },
}

/// Which backend materialises the secondary table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewKind {
    /// Memslots: holes and read-only slots; faults are KVM_EXIT_MMIO exits.
    Memslot,
    /// userfaultfd: one memslot over remappable pages; faults are served on a
    /// VMM thread while the vCPU waits in KVM_RUN (no exit).
    Uffd,
}

impl ViewKind {
    /// The name used on the command line and in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            ViewKind::Memslot => "memslot",
            ViewKind::Uffd => "uffd",
        }
    }
}

/// Secondary-MMU faults a view served off the vCPU thread (the userfaultfd
/// view): counted here, added to the exits of the phase they happened in.
#[derive(Debug, Default)]
pub struct ViewFaults {
    reads: AtomicU64,
    writes: AtomicU64,
    host_faults: AtomicU64,
    failed: AtomicBool,
    /// What serving them took, since the last reading.
    served: Mutex<UffdFaultTimer>,
}

impl ViewFaults {
    /// Counts one fault.
    pub fn record(&self, access: shadow_mmu::Access) {
        let counter = if access == shadow_mmu::Access::Write { &self.writes } else { &self.reads };
        counter.fetch_add(1, Ordering::Relaxed);
    }

    /// A secondary-MMU fault counted by [`Self::record`] was served in `ns`.
    pub fn record_served(&self, access: shadow_mmu::Access, ns: u64) {
        crate::vm::lock(&self.served).record(access == shadow_mmu::Access::Write, ns);
    }

    /// The faults served since the last call, with their times.
    pub fn take_served(&self) -> ExitTimes {
        crate::vm::lock(&self.served).take()
    }

    /// Counts a fault that was the host's, not the secondary MMU's.
    pub fn record_host_fault(&self) {
        self.host_faults.fetch_add(1, Ordering::Relaxed);
    }

    /// Host faults so far (first touches, races with view updates).
    pub fn host_faults(&self) -> u64 {
        self.host_faults.load(Ordering::Relaxed)
    }

    /// (reads, writes) so far.
    pub fn counts(&self) -> (u64, u64) {
        (self.reads.load(Ordering::Relaxed), self.writes.load(Ordering::Relaxed))
    }

    /// Marks the fault thread as failed: the run must end.
    pub fn set_failed(&self) {
        self.failed.store(true, Ordering::SeqCst);
    }

    /// Whether the fault thread failed.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::SeqCst)
    }
}

/// The backend chosen for a run.
#[derive(Debug)]
pub enum AnyView {
    /// KVM memslots.
    Memslot(memslot::MemslotView),
    /// userfaultfd.
    Uffd(uffd::UffdView),
    /// Unit tests only: remembers the table instead of telling KVM.
    #[cfg(test)]
    Recording(shadow_mmu::RecordingView),
}

impl EptView for AnyView {
    type Error = ViewError;

    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.zap(start, end),
            AnyView::Uffd(v) => v.zap(start, end),
            #[cfg(test)]
            AnyView::Recording(v) => v.zap(start, end).map_err(|never| match never {}),
        }
    }

    fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.map(gfn, pfn, writable),
            AnyView::Uffd(v) => v.map(gfn, pfn, writable),
            #[cfg(test)]
            AnyView::Recording(v) => v.map(gfn, pfn, writable).map_err(|never| match never {}),
        }
    }

    fn write_protect(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.write_protect(start, end),
            AnyView::Uffd(v) => v.write_protect(start, end),
            #[cfg(test)]
            AnyView::Recording(v) => v.write_protect(start, end).map_err(|never| match never {}),
        }
    }

    fn host_pages_moved(&mut self, moved: &[(Gfn, Pfn)]) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.host_pages_moved(moved),
            AnyView::Uffd(v) => v.host_pages_moved(moved),
            #[cfg(test)]
            AnyView::Recording(v) => v.host_pages_moved(moved).map_err(|never| match never {}),
        }
    }

    fn batch_start(&mut self) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.batch_start(),
            AnyView::Uffd(v) => v.batch_start(),
            #[cfg(test)]
            AnyView::Recording(v) => v.batch_start().map_err(|never| match never {}),
        }
    }

    fn batch_end(&mut self) -> Result<(), ViewError> {
        match self {
            AnyView::Memslot(v) => v.batch_end(),
            AnyView::Uffd(v) => v.batch_end(),
            #[cfg(test)]
            AnyView::Recording(v) => v.batch_end().map_err(|never| match never {}),
        }
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        match self {
            AnyView::Memslot(v) => v.counters(),
            AnyView::Uffd(v) => v.counters(),
            #[cfg(test)]
            AnyView::Recording(v) => v.counters(),
        }
    }
}
