//! Building the VMs of a run from a [`RunConfig`], one named step at a
//! time: the configuration checks, KVM, the frame pool with the image, then
//! per guest its VM, boot slot, EPT view, both MMUs, vCPU and, under the
//! userfaultfd view, fault thread; last the deduplicator over every guest.

use std::sync::{Arc, Mutex};

use ksm::Ksm;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use shadow_mmu::{FleetLayout, FramePool, Frames, Gfn, GuestMmus, Pfn, PrimaryMmu, PAGE_SHIFT};

use crate::config::{DedupPolicy, RunConfig};
use crate::dedup::{BuiltinKsm, Dedup, DedupControl, HostKsm, HostKsmPaths};
use crate::fleet::FleetBarrier;
use crate::guest_ram::GuestRam;
use crate::kvm;
use crate::kvm_stats::KvmStats;
use crate::memory::{check_fleet_size, check_mem_size, create_pool, fleet_layout, install_boot_slot};
use crate::vcpu_gate::{serving_vcpu_fault, VcpuGate};
use crate::view::memslot::MemslotView;
use crate::view::uffd::{UffdFaultSource, UffdFaultThread, UffdView};
use crate::view::{AnyView, ViewError, ViewFaults, ViewKind};
use crate::vm::{Vm, VmError};
use crate::x86::cpu::{configure_vcpu, FleetSeat};
use crate::x86::layout::GUEST_BASE;

/// The userfaultfd view's slot (slot 0 is the boot slot).
const UFFD_SLOT: u32 = 1;

/// Builds the VM `config` asks for (a guest alone: `config.guests` is 1).
/// Nothing runs yet.
pub fn build_vm(config: &RunConfig) -> Result<Vm, VmError> {
    let mut fleet = build_fleet(config)?;
    match (fleet.pop(), fleet.is_empty()) {
        (Some(vm), true) => Ok(vm),
        _ => Err(VmError::NotAlone(config.guests)),
    }
}

/// Builds the `config.guests` guests of a run, each its own KVM VM, view,
/// primary and secondary MMU and vCPU, over one frame pool and one
/// deduplicator, in guest order. Nothing runs yet.
pub fn build_fleet(config: &RunConfig) -> Result<Vec<Vm>, VmError> {
    check_config(config)?;
    let kvm = kvm::open_checked(&config.kvm_device)?;
    let (pool, image) = create_pool(config)?;
    let layout = fleet_layout(config);
    let frames = Frames::new(pool.clone());
    let guests = (0..layout.guests)
        .map(|i| build_guest(&kvm, &frames, &layout, i, image.entry, config))
        .collect::<Result<Vec<_>, _>>()?;
    let mms: Vec<_> = guests.iter().map(|g| g.mmus.mm.clone()).collect();
    let dedup = Arc::new(Mutex::new(DedupControl::new(create_dedup(config, &frames, &layout, &mms)?)));
    let barrier = Arc::new(FleetBarrier::new(layout.guests));
    Ok(guests.into_iter().map(|g| g.into_vm(&dedup, &barrier, config.mem_bytes)).collect())
}

/// One guest of a run, built; the deduplicator joins it in [`Vm`].
struct GuestParts {
    vm_fd: Arc<VmFd>,
    vcpu: VcpuFd,
    vm_stats: KvmStats,
    vcpu_stats: KvmStats,
    mmus: GuestMmus<AnyView>,
    gate: Arc<VcpuGate>,
    view_faults: Arc<ViewFaults>,
    fault_thread: Option<UffdFaultThread>,
    seat: FleetSeat,
}

impl GuestParts {
    fn into_vm(self, dedup: &Arc<Mutex<DedupControl>>, barrier: &Arc<FleetBarrier>, mem_bytes: u64) -> Vm {
        Vm {
            vcpu: self.vcpu,
            vm_stats: self.vm_stats,
            vcpu_stats: self.vcpu_stats,
            mm: self.mmus.mm,
            mmu: self.mmus.mmu,
            dedup: dedup.clone(),
            vm_fd: self.vm_fd,
            pool: self.mmus.pool,
            gate: self.gate,
            view_faults: self.view_faults,
            fault_thread: self.fault_thread,
            mem_bytes,
            seat: self.seat,
            barrier: barrier.clone(),
        }
    }
}

/// Guest `index` of `layout`: its VM, boot slot, view, both MMUs over its
/// frames, its vCPU at the entry point and, under the userfaultfd view,
/// its fault thread.
fn build_guest(
    kvm: &Kvm,
    frames: &Arc<Frames>,
    layout: &FleetLayout,
    index: u64,
    entry: u64,
    config: &RunConfig,
) -> Result<GuestParts, VmError> {
    let pool = frames.pool();
    let vm_fd = Arc::new(kvm.create_vm().map_err(|source| VmError::Setup { what: "KVM_CREATE_VM", source })?);
    install_boot_slot(&vm_fd, pool, layout, index)?;
    let gate = Arc::new(VcpuGate::new());
    let base_pfn = layout.base_pfn(index);
    let view = create_view(kvm, &vm_fd, &gate, pool, base_pfn, config)?;
    let fault_source = match &view {
        AnyView::Uffd(v) => Some(v.fault_source()?),
        _ => None,
    };
    let mmus = GuestMmus::new_in(frames, layout.first_gfn, layout.end_gfn, base_pfn, config.dedup.mmu_policy(), view)?;
    let seat = FleetSeat { index, count: layout.guests };
    let vcpu = create_vcpu(kvm, &vm_fd, entry, config.mem_bytes, seat)?;
    let vm_stats = KvmStats::open(&*vm_fd)?;
    let vcpu_stats = KvmStats::open(&vcpu)?;
    let ram = GuestRam { mm: mmus.mm.clone(), mmu: mmus.mmu.clone(), mem_bytes: config.mem_bytes };
    let view_faults = Arc::new(ViewFaults::default());
    let fault_thread = fault_source.map(|s| spawn_fault_thread(s, ram, view_faults.clone())).transpose()?;
    Ok(GuestParts { vm_fd, vcpu, vm_stats, vcpu_stats, mmus, gate, view_faults, fault_thread, seat })
}

/// The checks that need no KVM, so that a bad size or image is refused even
/// where KVM is unusable, and the `kernel` policy before anything is built.
fn check_config(config: &RunConfig) -> Result<(), VmError> {
    check_mem_size(config.mem_bytes)?;
    check_fleet_size(config.guests, config.mem_bytes)?;
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

/// The EPT view `config` asks for (the `kernel` policy always has the memslot
/// view: the host KVM is its secondary MMU).
fn create_view(
    kvm: &Kvm,
    vm_fd: &Arc<VmFd>,
    gate: &Arc<VcpuGate>,
    pool: &Arc<FramePool>,
    base_pfn: Pfn,
    config: &RunConfig,
) -> Result<AnyView, ViewError> {
    let (first, end) = guest_gfns(config.mem_bytes);
    Ok(match config.dedup.effective_view(config.view) {
        ViewKind::Memslot => {
            let kvm_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
            let limit = config.memslot_limit.map_or(kvm_slots, |l| l.clamp(2, kvm_slots));
            let view = MemslotView::new(vm_fd.clone(), gate.clone(), pool.clone(), first, end, base_pfn, limit)?;
            AnyView::Memslot(view)
        }
        ViewKind::Uffd => {
            AnyView::Uffd(UffdView::new(vm_fd.clone(), gate.clone(), pool.clone(), UFFD_SLOT, first, end, base_pfn)?)
        }
    })
}

/// The deduplicator of the policy: none, the built-in one over every
/// guest's primary MMU (`mms`), or the host's KSM over every guest's RAM.
fn create_dedup(
    config: &RunConfig,
    frames: &Arc<Frames>,
    layout: &FleetLayout,
    mms: &[Arc<Mutex<PrimaryMmu>>],
) -> Result<Dedup, VmError> {
    Ok(match config.dedup {
        DedupPolicy::Off => Dedup::Off,
        DedupPolicy::Kernel => {
            let pages = layout.end_gfn - layout.first_gfn;
            let ranges = (0..layout.guests).map(|i| (layout.base_pfn(i) + layout.first_gfn, pages)).collect();
            Dedup::Host(HostKsm::new(HostKsmPaths::default(), config.ksm, frames.pool().clone(), ranges)?)
        }
        // An experiment whose memory hook is the deduplicator.
        _ if !config.builtin_ksm => Dedup::Off,
        _ => Dedup::Builtin(BuiltinKsm::new(builtin_ksm(config, frames, mms)?)),
    })
}

/// The built-in deduplicator with every guest's mm on its list, in guest
/// order (a guest alone: `Ksm::new`, its zero page counted in that mm).
fn builtin_ksm(config: &RunConfig, frames: &Arc<Frames>, mms: &[Arc<Mutex<PrimaryMmu>>]) -> Result<Ksm, VmError> {
    if let [mm] = mms {
        return Ok(Ksm::new(mm, config.ksm)?);
    }
    let mut ksm = Ksm::new_in(frames, config.ksm)?;
    for mm in mms {
        ksm.ksm_enter(mm.clone())?;
    }
    Ok(ksm)
}

/// The vCPU, at the guest's entry point.
fn create_vcpu(kvm: &Kvm, vm_fd: &VmFd, entry: u64, mem_bytes: u64, seat: FleetSeat) -> Result<VcpuFd, VmError> {
    let vcpu = vm_fd.create_vcpu(0).map_err(|source| VmError::Setup { what: "KVM_CREATE_VCPU", source })?;
    configure_vcpu(kvm, &vcpu, entry, mem_bytes, seat)?;
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
