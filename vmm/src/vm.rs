//! Building a VM per ABI v1: KVM objects, guest RAM, the boot structures in
//! the low megabyte, the image, and the vCPU's entry state.

use std::ffi::CString;
use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::{Arc, Mutex};

use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
use kvm_ioctls::{Cap, Kvm, VcpuFd};
use shadow_mmu::{
    handle_ept_violation, FramePool, FramePoolError, Policy, PrimaryMmu, SecondaryMmu, PAGE_SHIFT, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

use ksm::{Ksm, KsmError, KsmKnobs};

use crate::host_ksm::{HostKsm, HostKsmError, HostKsmPaths};
use crate::image::{GuestImage, ImageError};
use crate::kvm_stats::{KvmStats, KvmStatsError};
use crate::vcpu::GuestRam;
use crate::vcpu_gate::{serving_vcpu_fault, VcpuGate};
use crate::view::memslot::{set_memslot, MemslotView, BOOT_SLOT};
use crate::view::uffd::{UffdFaultThread, UffdView};
use crate::view::{AnyView, ViewError, ViewFaults, ViewKind};
use crate::x86::layout::{GDT_ADDR, GUEST_BASE, MAX_RAM, MIN_RAM, TSS_ADDR};
use crate::x86::{cpu, page_tables};

/// Deduplication policy of a run: off, or how the secondary MMU follows
/// the host while pages are deduplicated.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DedupPolicy {
    /// No deduplication: the baseline.
    Off,
    /// Honour MMU_NOTIFIER_USE_CHANGE_PTE: update entries in place.
    ChangePte,
    /// Zap on every invalidation; no change_pte (KVM since Linux 6.9).
    RangeFlush,
    /// Zap on every invalidation, then change_pte finds nothing (KVM 2012 until the flag).
    Legacy,
    /// The host's own KSM merges guest RAM (MADV_MERGEABLE) and the host
    /// KVM is the secondary MMU (see `host_ksm`); needs root.
    Kernel,
}

impl DedupPolicy {
    /// The name used on the command line and in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            DedupPolicy::Off => "off",
            DedupPolicy::ChangePte => "change-pte",
            DedupPolicy::RangeFlush => "range-flush",
            DedupPolicy::Legacy => "legacy",
            DedupPolicy::Kernel => "kernel",
        }
    }

    /// Every policy, in the order `vmm compare` runs them by default.
    pub const ALL: [DedupPolicy; 5] =
        [DedupPolicy::Off, DedupPolicy::ChangePte, DedupPolicy::RangeFlush, DedupPolicy::Legacy, DedupPolicy::Kernel];

    /// The view a run of this policy really uses: the `kernel` policy maps
    /// guest RAM with one plain memslot whatever `--view` says.
    pub fn effective_view(self, view: ViewKind) -> ViewKind {
        match self {
            DedupPolicy::Kernel => ViewKind::Memslot,
            _ => view,
        }
    }

    /// The secondary MMU's policy. With deduplication off nothing ever
    /// invalidates the secondary MMU; it is set up as today's KVM.
    pub fn mmu_policy(self) -> Policy {
        match self {
            DedupPolicy::Off | DedupPolicy::RangeFlush | DedupPolicy::Kernel => Policy::RangeFlush,
            DedupPolicy::ChangePte => Policy::ChangePte,
            DedupPolicy::Legacy => Policy::Legacy,
        }
    }
}

/// When a [`MmHook`] is called.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookPoint {
    /// The guest started phase n (after the previous phase was closed).
    PhaseStart(u32),
    /// The guest wrote this value to the dedup control port.
    DedupRequest(u32),
}

/// A host-side experiment run while the vCPU waits: it changes the primary
/// MMU through the same notifier paths the deduplicator uses
/// (`write_protect_page`, `replace_page`, ...). Returns an error to end the run.
pub type MmHook = Box<dyn FnMut(HookPoint, &mut PrimaryMmu) -> Result<(), String> + Send>;

/// The secondary MMU of this VMM, over the chosen view backend.
pub type VmSecondaryMmu = SecondaryMmu<AnyView>;

/// Everything a run needs to know.
pub struct RunConfig {
    /// The guest image.
    pub image: GuestImage,
    /// Guest RAM in bytes (checked by [`check_mem_size`]).
    pub mem_bytes: u64,
    /// The deduplication policy.
    pub dedup: DedupPolicy,
    /// The EPT view backend.
    pub view: ViewKind,
    /// End the run after this long.
    pub timeout: Option<Duration>,
    /// Where the guest's console output goes.
    pub console: Box<dyn Write + Send>,
    /// The KVM device node.
    pub kvm_device: PathBuf,
    /// Host-side changes driven at phase starts and dedup requests (tests, experiments).
    pub mm_hook: Option<MmHook>,
    /// The deduplicator's knobs (ignored when `dedup` is off).
    pub ksm: KsmKnobs,
    /// Whether the built-in deduplicator runs (when `dedup` is not off).
    /// Experiments whose host hook is the deduplicator turn it off.
    pub builtin_ksm: bool,
    /// A lower memslot budget for the memslot view than KVM's (to reach its
    /// limit in tests); None: KVM_CAP_NR_MEMSLOTS.
    pub memslot_limit: Option<u32>,
    /// Listen for run-state changes on this Unix socket (see `control`).
    pub control: Option<PathBuf>,
}

impl std::fmt::Debug for RunConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RunConfig")
            .field("image", &self.image.name)
            .field("mem_bytes", &self.mem_bytes)
            .field("dedup", &self.dedup)
            .field("view", &self.view)
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// Errors while building the VM (nothing has run yet).
#[derive(Debug, thiserror::Error)]
pub enum VmError {
    /// A RAM size ABI v1 or the host cannot honour.
    #[error("{0}")]
    MemSize(String),
    /// /dev/kvm could not be opened or is not KVM.
    #[error("{0}")]
    Kvm(String),
    /// A KVM capability the VMM needs is missing.
    #[error("the host KVM lacks {0}, which the VMM needs")]
    MissingCap(&'static str),
    /// A KVM ioctl failed during setup.
    #[error("{what} failed: {source}")]
    Setup {
        /// The step.
        what: &'static str,
        /// The KVM error.
        source: kvm_ioctls::Error,
    },
    /// Guest RAM could not be created.
    #[error(transparent)]
    Memory(#[from] FramePoolError),
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
    Ksm(#[from] KsmError),
    /// The control socket could not be set up.
    #[error(transparent)]
    Control(#[from] crate::control::ControlError),
    /// The host's KSM could not be taken (the `kernel` policy).
    #[error(transparent)]
    HostKsm(#[from] HostKsmError),
    /// Writing the boot structures into guest RAM failed.
    #[error("cannot write boot structures into guest RAM: {0}")]
    Boot(String),
}

fn host_mem_total() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Checks a guest RAM size against ABI v1 and the host.
pub fn check_mem_size(bytes: u64) -> Result<(), VmError> {
    let fail = |why: String| Err(VmError::MemSize(why));
    if bytes == 0 {
        return fail("guest RAM size is zero: give at least 2M with --mem".into());
    }
    if bytes % PAGE_SIZE != 0 {
        return fail(format!("guest RAM size {bytes} is not a multiple of 4 KiB (4096): round it, e.g. --mem 64M"));
    }
    if bytes < MIN_RAM {
        return fail(format!(
            "guest RAM size {bytes} is below the 2 MiB minimum (the low megabyte is the VMM's): give --mem 2M or more"
        ));
    }
    if bytes > MAX_RAM {
        return fail(format!("guest RAM size {bytes} is above the VMM's 64 GiB limit: give --mem 64G or less"));
    }
    if let Some(total) = host_mem_total() {
        if bytes > total {
            return fail(format!(
                "guest RAM size {bytes} is more than this host's {total} bytes of memory: give a smaller --mem"
            ));
        }
    }
    Ok(())
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
    /// The deduplicator, unless deduplication is off.
    pub(crate) ksm: Option<Arc<Mutex<Ksm>>>,
    /// The host's KSM, under the `kernel` policy.
    pub(crate) host_ksm: Option<Arc<Mutex<HostKsm>>>,
    /// The VM (shared with the view).
    pub(crate) vm_fd: Arc<kvm_ioctls::VmFd>,
    /// The frame pool (shared with the primary MMU and the view).
    pub(crate) pool: Arc<FramePool>,
    /// Keeps the vCPU out of KVM_RUN while other threads change memslots.
    pub(crate) gate: Arc<VcpuGate>,
    /// Faults served off the vCPU thread (userfaultfd view).
    pub(crate) view_faults: Arc<ViewFaults>,
    /// The userfaultfd view's fault thread.
    pub(crate) fault_thread: Option<UffdFaultThread>,
    pub(crate) mem_bytes: u64,
}

pub use shadow_mmu::lock;

/// Opens the KVM device with a message that says what to do when it fails.
pub fn open_kvm(path: &std::path::Path) -> Result<Kvm, VmError> {
    let shown = path.display();
    let c_path = CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| VmError::Kvm(format!("{shown}: the path contains a NUL byte")))?;
    match Kvm::new_with_path(&c_path) {
        Ok(kvm) => Ok(kvm),
        Err(e) => Err(VmError::Kvm(match e.errno() {
            libc::ENOENT => format!("{shown} does not exist: this machine offers no KVM (load the kvm module or use a host with virtualisation)"),
            libc::EACCES | libc::EPERM => {
                format!("cannot open {shown}: permission denied (run as root or add your user to the kvm group)")
            }
            libc::ENOTTY | libc::EINVAL => format!("{shown} is not a KVM device"),
            _ => format!("cannot open {shown}: {e}"),
        })),
    }
}

impl Vm {
    /// Creates the VM, its RAM and view, loads the image and sets the vCPU
    /// at the entry point. Nothing runs yet.
    pub fn new(config: &RunConfig) -> Result<Self, VmError> {
        check_mem_size(config.mem_bytes)?;
        // Validate before touching KVM so a bad image is refused even where
        // KVM is unusable.
        config.image.validate(config.mem_bytes)?;
        if config.dedup == DedupPolicy::Kernel {
            // Refused before anything is built, with what to do about it.
            HostKsmPaths::default().check_available()?;
        }
        let kvm = open_kvm(&config.kvm_device)?;
        match kvm.get_api_version() {
            12 => {}
            v if v < 0 => {
                return Err(VmError::Kvm(format!(
                    "{} is not a KVM device (KVM_GET_API_VERSION failed)",
                    config.kvm_device.display()
                )))
            }
            v => return Err(VmError::Kvm(format!("{} speaks KVM API {v}, not 12", config.kvm_device.display()))),
        }
        for (cap, name) in [(Cap::UserMemory, "KVM_CAP_USER_MEMORY"), (Cap::SyncMmu, "KVM_CAP_SYNC_MMU")] {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(name));
            }
        }
        let vm_fd = kvm.create_vm().map_err(|source| VmError::Setup { what: "KVM_CREATE_VM", source })?;

        let vm_fd = Arc::new(vm_fd);
        // One frame per guest page, plus one spare so that a copy-on-write
        // break always finds a free frame (see PrimaryMmu::new), plus the zero
        // page of the deduplicator.
        // The kernel policy's RAM is anonymous: what the host's KSM merges.
        let pool_bytes = config.mem_bytes + 2 * PAGE_SIZE;
        let pool = Arc::new(match config.dedup {
            DedupPolicy::Kernel => FramePool::new_anonymous(pool_bytes)?,
            _ => FramePool::new(pool_bytes)?,
        });
        // The VMM's low megabyte: always mapped, never part of a view.
        set_memslot(&vm_fd, &pool, BOOT_SLOT, 0, GUEST_BASE, 0, false)?;
        // Load before the view exists (it maps what holds memory). Nothing is
        // deduplicated yet: guest page n is frame n (PrimaryMmu::new), so the
        // direct map doubles as guest-physical memory for loading.
        let mem = pool.direct_map();
        let info = config.image.load(mem, config.mem_bytes)?;
        write_boot_structures(mem, config.mem_bytes)?;
        let (first_gfn, end_gfn) = (GUEST_BASE >> PAGE_SHIFT, config.mem_bytes >> PAGE_SHIFT);
        let kvm_slots = u32::try_from(kvm.get_nr_memslots()).unwrap_or(u32::MAX);
        let slot_limit = config.memslot_limit.map_or(kvm_slots, |l| l.clamp(2, kvm_slots));
        let gate = Arc::new(VcpuGate::new());
        let view = match config.dedup.effective_view(config.view) {
            ViewKind::Memslot => AnyView::Memslot(MemslotView::new(
                vm_fd.clone(),
                gate.clone(),
                pool.clone(),
                first_gfn,
                end_gfn,
                slot_limit,
            )?),
            ViewKind::Uffd => {
                AnyView::Uffd(UffdView::new(vm_fd.clone(), gate.clone(), pool.clone(), 1, first_gfn, end_gfn)?)
            }
        };
        let fault_source = match &view {
            AnyView::Uffd(v) => Some(v.fault_source()?),
            _ => None,
        };
        let mut host = PrimaryMmu::new(pool.clone(), first_gfn, end_gfn);
        let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(config.dedup.mmu_policy(), view, &host)));
        host.mmu_notifier_register(mmu.clone());
        let ksm = match config.dedup {
            DedupPolicy::Off | DedupPolicy::Kernel => None,
            _ if !config.builtin_ksm => None,
            _ => Some(Arc::new(Mutex::new(Ksm::new(&mut host, config.ksm)?))),
        };
        let host_ksm = match config.dedup {
            DedupPolicy::Kernel => Some(Arc::new(Mutex::new(HostKsm::new(
                HostKsmPaths::default(),
                config.ksm,
                pool.clone(),
                first_gfn,
                end_gfn - first_gfn,
            )?))),
            _ => None,
        };

        let vcpu = vm_fd.create_vcpu(0).map_err(|source| VmError::Setup { what: "KVM_CREATE_VCPU", source })?;
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Setup { what: "KVM_GET_SUPPORTED_CPUID", source })?;
        vcpu.set_cpuid2(&cpuid).map_err(|source| VmError::Setup { what: "KVM_SET_CPUID2", source })?;
        vcpu.set_regs(&cpu::entry_regs(info.entry, config.mem_bytes))
            .map_err(|source| VmError::Setup { what: "KVM_SET_REGS", source })?;
        let mut sregs = vcpu.get_sregs().map_err(|source| VmError::Setup { what: "KVM_GET_SREGS", source })?;
        cpu::set_long_mode_cpl3(&mut sregs);
        vcpu.set_sregs(&sregs).map_err(|source| VmError::Setup { what: "KVM_SET_SREGS", source })?;
        vcpu.set_fpu(&cpu::entry_fpu()).map_err(|source| VmError::Setup { what: "KVM_SET_FPU", source })?;

        let vm_stats = KvmStats::open(&*vm_fd)?;
        let vcpu_stats = KvmStats::open(&vcpu)?;
        let host = Arc::new(Mutex::new(host));
        let view_faults = Arc::new(ViewFaults::default());
        let fault_thread = match fault_source {
            None => None,
            Some(source) => {
                let (h, m, counts) = (host.clone(), mmu.clone(), view_faults.clone());
                let failed = view_faults.clone();
                Some(UffdFaultThread::spawn(
                    source,
                    Box::new(move |gfn, access| {
                        serving_vcpu_fault(|| {
                            // A fault on a page the secondary MMU already maps with
                            // this access is the host's own (a first touch of a
                            // frame that was a hole, or a race with a view update):
                            // the view maps it again; no secondary-MMU fault.
                            {
                                let mut mmu = lock(&m);
                                if let Some(e) = mmu.ept().lookup(gfn) {
                                    if access != shadow_mmu::Access::Write || e.writable() {
                                        counts.record_host_fault();
                                        return shadow_mmu::EptView::map(mmu.view_mut(), gfn, e.pfn(), e.writable())
                                            .map_err(|e| e.to_string());
                                    }
                                }
                            }
                            counts.record(access);
                            handle_ept_violation(&h, &m, gfn, access).map(|_| ()).map_err(|e| e.to_string())
                        })
                    }),
                    // The watchdog sees the flag and kicks the vCPU until the
                    // run loop has noticed (it is blocked on the fault).
                    Box::new(move || failed.set_failed()),
                )?)
            }
        };
        Ok(Self {
            vcpu,
            vm_stats,
            vcpu_stats,
            mm: host,
            mmu,
            ksm,
            host_ksm,
            vm_fd,
            pool,
            gate,
            view_faults,
            fault_thread,
            mem_bytes: config.mem_bytes,
        })
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
    pub fn vm_fd(&self) -> &Arc<kvm_ioctls::VmFd> {
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

    /// The gate that keeps the vCPU out of KVM_RUN while memslots change.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
    }

    /// Secondary-MMU faults served off the vCPU thread (userfaultfd view).
    pub fn view_faults(&self) -> &Arc<ViewFaults> {
        &self.view_faults
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

fn write_boot_structures(mem: &vm_memory::GuestMemoryMmap, ram: u64) -> Result<(), VmError> {
    let boot = |e: vm_memory::GuestMemoryError| VmError::Boot(e.to_string());
    mem.write_slice(&cpu::gdt_bytes(), GuestAddress(GDT_ADDR)).map_err(boot)?;
    mem.write_slice(&cpu::tss_bytes(), GuestAddress(TSS_ADDR)).map_err(boot)?;
    for (addr, table) in page_tables::build_identity_map(ram).tables() {
        let bytes: Vec<u8> = table.iter().flat_map(|e| e.to_le_bytes()).collect();
        mem.write_slice(&bytes, GuestAddress(addr)).map_err(boot)?;
    }
    Ok(())
}
