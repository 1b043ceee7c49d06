//! A built VM: its KVM objects, guest RAM with both MMUs, the view, the
//! deduplicator and the vCPU at the guest's entry point ([`Vm`]). How one is
//! made, step by step, is in [`crate::builder`].

use std::sync::{Arc, Mutex};

use kvm_ioctls::{VcpuFd, VmFd};
use shadow_mmu::{FramePool, PrimaryMmu};

pub use crate::config::{DedupPolicy, HookPoint, MmHook, MmHookError, RunConfig};
pub use crate::guest_ram::VmSecondaryMmu;
pub use crate::kvm::open_kvm;
pub use shadow_mmu::lock;

use crate::control::ControlError;
use crate::dedup::{DedupControl, HostKsmError};
use crate::fleet::FleetBarrier;
use crate::guest_ram::GuestRam;
use crate::image::ImageError;
use crate::kvm::KvmError;
use crate::kvm_stats::{KvmStats, KvmStatsError};
use crate::memory::MemoryError;
use crate::vcpu_gate::VcpuGate;
use crate::view::uffd::UffdFaultThread;
use crate::view::{ViewError, ViewFaults};
use crate::x86::cpu::{CpuSetupError, FleetSeat};

/// Errors while building the VM (nothing has run yet).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// Guest RAM could not be set up (a bad size, no memory, the image).
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// /dev/kvm could not be opened or is not a KVM this VMM can use.
    #[error(transparent)]
    Kvm(#[from] KvmError),
    /// A KVM ioctl failed during setup.
    #[error("{what} failed")]
    Setup {
        /// The ioctl.
        what: &'static str,
        /// The KVM error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// The vCPU could not be put at the entry point.
    #[error(transparent)]
    Cpu(#[from] CpuSetupError),
    /// The image is unusable.
    #[error(transparent)]
    Image(#[from] ImageError),
    /// The EPT view could not be built.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The host KVM's statistics could not be opened.
    #[error(transparent)]
    Stats(#[from] KvmStatsError),
    /// The deduplicator could not be set up.
    #[error(transparent)]
    Ksm(#[from] ksm::KsmError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] ControlError),
    /// The host's KSM could not be taken (the `kernel` policy).
    #[error(transparent)]
    HostKsm(#[from] HostKsmError),
    /// A guest's primary MMU could not be placed in the frame pool.
    #[error(transparent)]
    PrimaryMmu(#[from] shadow_mmu::PrimaryMmuError),
    /// One VM was asked of a configuration of several guests.
    #[error("{0} guests were asked where one VM is built: run them as a fleet (vmm::run::run)")]
    NotAlone(u32),
}

/// A built VM, ready to run its guest.
#[derive(Debug)]
pub struct Vm {
    // Field order is drop order: the vCPU goes first; the VM fd is shared
    // with the view and closes when the last of them goes; the frame pool
    // their slots point into outlives both (it is an Arc held by each).
    pub(crate) vcpu: VcpuFd,
    pub(crate) vm_stats: KvmStats,
    pub(crate) vcpu_stats: KvmStats,
    /// The primary MMU (host page table of guest RAM) and its notifier chain.
    pub(crate) mm: Arc<Mutex<PrimaryMmu>>,
    /// The secondary MMU, registered with the primary.
    pub(crate) mmu: Arc<Mutex<VmSecondaryMmu>>,
    /// The deduplicator and its run state.
    pub(crate) dedup: Arc<Mutex<DedupControl>>,
    /// The VM (shared with the view).
    pub(crate) vm_fd: Arc<VmFd>,
    /// The frame pool (shared with the primary MMU and the view).
    pub(crate) pool: Arc<FramePool>,
    /// Keeps the vCPU out of KVM_RUN while other threads change memslots.
    pub(crate) gate: Arc<VcpuGate>,
    /// Faults served off the vCPU thread (userfaultfd view).
    pub(crate) view_faults: Arc<ViewFaults>,
    /// The userfaultfd view's fault thread.
    pub(crate) fault_thread: Option<UffdFaultThread>,
    pub(crate) mem_bytes: u64,
    /// Where the guest sits in its fleet (index 0 of 1 for a guest alone).
    pub(crate) seat: FleetSeat,
    /// The fleet's barrier (port 0x503).
    pub(crate) barrier: Arc<FleetBarrier>,
}

impl Vm {
    /// Creates the VM of a guest alone, its RAM and view, loads the image
    /// and sets the vCPU at the entry point. Nothing runs yet. A fleet's
    /// VMs come from [`crate::builder::build_fleet`].
    pub fn new(config: &RunConfig) -> Result<Self, VmError> {
        crate::builder::build_vm(config)
    }

    /// The vCPU.
    pub fn vcpu(&self) -> &VcpuFd {
        &self.vcpu
    }

    /// The vCPU, to run it.
    pub fn vcpu_mut(&mut self) -> &mut VcpuFd {
        &mut self.vcpu
    }

    /// The KVM VM.
    pub fn vm_fd(&self) -> &Arc<VmFd> {
        &self.vm_fd
    }

    /// Host physical memory behind guest RAM.
    pub fn pool(&self) -> &Arc<FramePool> {
        &self.pool
    }

    /// The primary MMU (the host page table of guest RAM).
    pub fn mm(&self) -> &Arc<Mutex<PrimaryMmu>> {
        &self.mm
    }

    /// The secondary MMU over the view.
    pub fn mmu(&self) -> &Arc<Mutex<VmSecondaryMmu>> {
        &self.mmu
    }

    /// The deduplicator and its run state.
    pub fn dedup(&self) -> &Arc<Mutex<DedupControl>> {
        &self.dedup
    }

    /// The gate that keeps the vCPU out of KVM_RUN while memslots change.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
    }

    /// Secondary-MMU faults served off the vCPU thread (userfaultfd view).
    pub fn view_faults(&self) -> &Arc<ViewFaults> {
        &self.view_faults
    }

    /// Where the guest sits in its fleet.
    pub fn seat(&self) -> FleetSeat {
        self.seat
    }

    /// Guest RAM size in bytes.
    pub fn mem_bytes(&self) -> u64 {
        self.mem_bytes
    }

    /// Guest RAM as the exit handler serves it.
    pub fn guest_ram(&self) -> GuestRam {
        GuestRam { mm: self.mm.clone(), mmu: self.mmu.clone(), mem_bytes: self.mem_bytes }
    }

    /// Reads guest-physical memory (RAM only) as the guest sees it now.
    pub fn read_guest(&self, gpa: u64, buf: &mut [u8]) -> bool {
        let end = gpa.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.mem_bytes) {
            return false;
        }
        lock(&self.mm).read_guest(gpa, buf).is_ok()
    }
}
