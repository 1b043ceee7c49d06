//! The EPT view: what makes the secondary MMU's table real for KVM.
//!
//! On real hardware the CPU walks EPT; here the host KVM walks its own
//! tables, built from our memslots. A view backend turns the state of guest
//! pages (absent, read-only or writable, and which frame) into something the
//! host KVM enforces, so that a guest access the secondary table does not
//! allow comes back to the VMM as a fault with its address (host-facts.md).
//!
//! Backends: [`memslot::MemslotView`] (memslot holes and KVM_MEM_READONLY
//! slots; faults arrive as KVM_EXIT_MMIO). The VMM's own low megabyte is not
//! part of any view: it is one fixed slot the VMM installs itself.

pub mod memslot;

use crate::stats::Counters;

/// Errors of view backends.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// KVM refused a memslot change.
    #[error("KVM_SET_USER_MEMORY_REGION for slot {slot} ([{gpa:#x}, +{size:#x})) failed: {source}")]
    SetMemslot {
        /// Slot id.
        slot: u32,
        /// Guest-physical start.
        gpa: u64,
        /// Size in bytes.
        size: u64,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// A frame the view was asked to map does not exist in the pool.
    #[error("frame {0} is outside the frame pool")]
    NoSuchFrame(u64),
}

/// Which backend materialises the secondary table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ViewKind {
    /// Memslots: holes and read-only slots; faults are KVM_EXIT_MMIO exits.
    Memslot,
}

impl ViewKind {
    /// The name used on the command line and in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            ViewKind::Memslot => "memslot",
        }
    }
}

/// A backend of the EPT view.
pub trait EptView: std::fmt::Debug {
    /// Which backend this is.
    fn kind(&self) -> ViewKind;
    /// The backend's counters (named, all present), since the start of the run.
    fn counters(&self) -> Counters;
}
