//! Building a VM from a [`RunConfig`], one named step at a time: the
//! configuration checks, KVM, guest RAM, the EPT view, both MMUs, the
//! deduplicator, the vCPU and, under the userfaultfd view, its fault thread.

use std::sync::{Arc, Mutex};

use ksm::Ksm;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use shadow_mmu::{FramePool, Gfn, GuestMmus, PAGE_SHIFT};

use crate::config::{DedupPolicy, RunConfig};
use crate::dedup::{BuiltinKsm, Dedup, DedupControl, HostKsm, HostKsmPaths};
use crate::guest_ram::GuestRam;
use crate::kvm;
use crate::kvm_stats::KvmStats;
use crate::memory::{check_mem_size, create_guest_ram};
use crate::vcpu_gate::{serving_vcpu_fault, VcpuGate};
use crate::view::memslot::MemslotView;
use crate::view::uffd::{UffdFaultSource, UffdFaultThread, UffdView};
use crate::view::{AnyView, ViewError, ViewFaults, ViewKind};
use crate::vm::{Vm, VmError};
use crate::x86::cpu::configure_vcpu;
use crate::x86::layout::GUEST_BASE;

/// The userfaultfd view's slot (slot 0 is the boot slot).
const UFFD_SLOT: u32 = 1;

/// Builds the VM `config` asks for. Nothing runs yet.
pub fn build_vm(config: &RunConfig) -> Result<Vm, VmError> {
    check_config(config)?;
    let kvm = kvm::open_checked(&config.kvm_device)?;
    let vm_fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Setup { what: "KVM_CREATE_VM", source })?);
    let (pool, image) = create_guest_ram(&vm_fd, config)?;
    let gate = Arc::new(VcpuGate::new());
    let view = create_view(&kvm, &vm_fd, &gate, &pool, config)?;
    let fault_source = match &view {
        AnyView::Uffd(v) => Some(v.fault_source()?),
        _ => None,
    };
    let (first, end) = guest_gfns(config.mem_bytes);
    let mmus = GuestMmus::new(pool.clone(), first, end, config.dedup.mmu_policy(), view);
    let dedup = DedupControl::new(create_dedup(config, &mmus)?, mmus.mm.clone());
    let vcpu = create_vcpu(&kvm, &vm_fd, image.entry, config.mem_bytes)?;
    let vm_stats = KvmStats::open(&*vm_fd)?;
    let vcpu_stats = KvmStats::open(&vcpu)?;
    let ram = GuestRam { mm: mmus.mm.clone(), mmu: mmus.mmu.clone(), mem_bytes: config.mem_bytes };
    let view_faults = Arc::new(ViewFaults::default());
    let fault_thread = fault_source.map(|s| spawn_fault_thread(s, ram, view_faults.clone())).transpose()?;
    Ok(Vm {
        vcpu,
        vm_stats,
        vcpu_stats,
        mm: mmus.mm,
        mmu: mmus.mmu,
        dedup: Arc::new(Mutex::new(dedup)),
        vm_fd,
        pool,
        gate,
        view_faults,
        fault_thread,
        mem_bytes: config.mem_bytes,
    })
}

/// The checks that need no KVM, so that a bad size or image is refused even
/// where KVM is unusable, and the `kernel` policy before anything is built.
fn check_config(config: &RunConfig) -> Result<(), VmError> {
    check_mem_size(config.mem_bytes)?;
    config.image.validate(config.mem_bytes)?;
    if config.dedup == DedupPolicy::Kernel {
        HostKsmPaths::default().check_available()?;
    }
    Ok(())
}

/// Guest pages [first, end): RAM above the VMM's low megabyte.
fn guest_gfns(mem_bytes: u64) -> (Gfn, Gfn) {
    (GUEST_BASE >> PAGE_SHIFT, mem_bytes >> PAGE_SHIFT)
}

/// The EPT view `config` asks for (the `kernel` policy always has one plain
/// memslot: the host KVM is its secondary MMU).
fn create_view(
    kvm: &Kvm,
    vm_fd: &Arc<VmFd>,
    gate: &Arc<VcpuGate>,
    pool: &Arc<FramePool>,
    config: &RunConfig,
) -> Result<AnyView, ViewError> {
    let (first, end) = guest_gfns(config.mem_bytes);
    Ok(match config.dedup.effective_view(config.view) {
        ViewKind::Memslot => {
            let kvm_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
            let limit = config.memslot_limit.map_or(kvm_slots, |l| l.clamp(2, kvm_slots));
            AnyView::Memslot(MemslotView::new(vm_fd.clone(), gate.clone(), pool.clone(), first, end, limit)?)
        }
        ViewKind::Uffd => {
            AnyView::Uffd(UffdView::new(vm_fd.clone(), gate.clone(), pool.clone(), UFFD_SLOT, first, end)?)
        }
    })
}

/// The deduplicator of the policy: none, the built-in one over the guest's
/// primary MMU, or the host's KSM over guest RAM.
fn create_dedup(config: &RunConfig, mmus: &GuestMmus<AnyView>) -> Result<Dedup, VmError> {
    let (first, end) = guest_gfns(config.mem_bytes);
    Ok(match config.dedup {
        DedupPolicy::Off => Dedup::Off,
        DedupPolicy::Kernel => {
            Dedup::Host(HostKsm::new(HostKsmPaths::default(), config.ksm, mmus.pool.clone(), first, end - first)?)
        }
        // An experiment whose memory hook is the deduplicator.
        _ if !config.builtin_ksm => Dedup::Off,
        _ => Dedup::Builtin(BuiltinKsm::new(Ksm::new(&mmus.mm, config.ksm)?)),
    })
}

/// The vCPU, at the guest's entry point.
fn create_vcpu(kvm: &Kvm, vm_fd: &VmFd, entry: u64, mem_bytes: u64) -> Result<VcpuFd, VmError> {
    let vcpu = vm_fd.create_vcpu(0).map_err(|source| VmError::Setup { what: "KVM_CREATE_VCPU", source })?;
    configure_vcpu(kvm, &vcpu, entry, mem_bytes)?;
    Ok(vcpu)
}

/// The thread that serves the userfaultfd view's faults while the vCPU
/// waits in KVM_RUN. A failure raises the view's flag: the watchdog sees it
/// and kicks the vCPU until the run loop has noticed.
fn spawn_fault_thread(
    source: UffdFaultSource,
    ram: GuestRam,
    faults: Arc<ViewFaults>,
) -> Result<UffdFaultThread, ViewError> {
    let failed = faults.clone();
    UffdFaultThread::spawn(
        source,
        Box::new(move |gfn, access| serving_vcpu_fault(|| ram.serve_view_fault(&faults, gfn, access))),
        Box::new(move || failed.set_failed()),
    )
}
