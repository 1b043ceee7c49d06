//! `vmm bench fault`: one secondary-MMU fault served end to end against the
//! bare mechanism of its view, measured side by side: under the memslot
//! view page by page in turn in one run, under the userfaultfd view in
//! alternating runs (its faults never leave KVM_RUN, so they cannot be told
//! apart one by one from the vCPU thread).

use std::time::Instant;

use serde::Serialize;

use vmm::serial::Console;
use vmm::stats::ExitCounts;
use vmm::vcpu::{handle_exit, Devices, Outcome};
use vmm::view::memslot::set_memslot;
use vmm::view::uffd::FaultWait;
use vmm::view::{AnyView, ViewKind};
use vmm::vm::{lock, RunConfig, Vm};

use super::{exit_floor, summarize, BenchError};

/// Runs of each kind the userfaultfd view's figures are the medians of, the
/// kinds alternating so that a drift of the machine hits all alike.
const ROUNDS: usize = 3;

/// The `vmm bench fault` report: one secondary-MMU fault served end to end
/// against the bare mechanism under the same view, measured in one run.
#[derive(Debug, Clone, Serialize)]
pub struct FaultReport {
    /// What was measured.
    pub bench: &'static str,
    /// The view backend.
    pub view: &'static str,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Faults the VMM served timed (one read per page of pagefill's region;
    /// under the memslot view every other page of its first 64 MiB, the
    /// others are the bare mechanism's).
    pub faults: u64,
    /// Cost of a secondary-MMU fault: exit or userfaultfd event,
    /// `handle_ept_violation` (host lookup, install), view update, resume.
    /// Memslot view: the median round trip; userfaultfd view: the mean over a
    /// run (the median of three runs), the fault thread waiting as a
    /// run's does ([`FaultWait::Adaptive`]).
    pub fault_ns: f64,
    /// Of which: time inside the view backend, per fault (a mean, so
    /// under the memslot view it may exceed the median `fault_ns` on a
    /// noisy machine).
    pub view_ns_per_fault: f64,
    /// Cost of the fastest bare mechanism (see `bare_what`), as `fault_ns`.
    pub bare_ns: f64,
    /// What the bare mechanism is for this view.
    pub bare_what: &'static str,
    /// fault_ns / bare_ns.
    pub ratio: f64,
    /// Memslot view only, for reference: the parts of the bare mechanism on
    /// their own: a port-I/O exit round trip through the VMM (median).
    pub port_io_exit_ns: Option<f64>,
    /// Memslot view only: creating a one-page memslot (mean, as many as
    /// `faults`, in a VM of their own).
    pub slot_create_ns: Option<f64>,
    /// Memslot view only: deleting one of them (mean).
    pub slot_delete_ns: Option<f64>,
    /// userfaultfd view only: the VMM's fault and the bare mechanism per way
    /// the fault thread waits.
    pub fault_wait: Option<FaultWaitFigures>,
}

/// A userfaultfd fault, end to end and bare, per way of waiting for it
/// (medians over three runs of the mean per fault).
#[derive(Debug, Clone, Serialize)]
pub struct FaultWaitFigures {
    /// The VMM's fault, the fault thread spinning for a while after each
    /// event, then blocking (a run's default, [`FaultWait::Adaptive`]).
    pub vmm_adaptive_ns: f64,
    /// The VMM's fault, the fault thread blocking in poll(2).
    pub vmm_block_ns: f64,
    /// The VMM's fault, the fault thread busy-polling.
    pub vmm_busy_ns: f64,
    /// One MINOR fault and UFFDIO_CONTINUE, the thread blocking in poll(2).
    pub bare_block_ns: f64,
    /// The same, the thread busy-polling.
    pub bare_busy_ns: f64,
    /// The same, the thread polling (and yielding) a while after each
    /// event, then blocking.
    pub bare_adaptive_ns: f64,
}

/// How a bench run invalidates the guest's pages at each dedup request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zap {
    /// Through the mmu notifier: the secondary MMU zaps its entries and the
    /// view (a real secondary-MMU fault follows).
    Notifier,
    /// The view alone: the entries stay, so the next access is the bare
    /// mechanism (userfaultfd view: the fault thread's bare CONTINUE).
    ViewOnly,
}

/// What one timed pagefill run measured in its phase 3.
#[derive(Debug, Clone, Copy)]
struct Refaults {
    faults: u64,
    wall_ns: u64,
    view_ns: u64,
}

impl Refaults {
    fn per_fault(&self) -> f64 {
        self.wall_ns as f64 / self.faults.max(1) as f64
    }
}

/// Faults so far: exits under the memslot view; under the userfaultfd view
/// every event its fault thread served (bare ones included).
fn faults_so_far(counts: &ExitCounts, vm: &Vm) -> u64 {
    use shadow_mmu::EptView;
    let events = lock(vm.mmu()).view().counters().into_iter().find(|(n, _)| *n == "view_faults").map(|(_, v)| v);
    counts.ept_read + counts.ept_write + events.unwrap_or(0)
}

/// Sets how the userfaultfd view's fault thread waits and whether it serves
/// bare; nothing under another view.
fn set_fault_thread(vm: &Vm, wait: FaultWait, bare: bool) {
    if let AnyView::Uffd(v) = lock(vm.mmu()).view() {
        v.set_fault_wait(wait);
        v.set_bare_faults(bare);
    }
}

/// Zaps pagefill's region [first, end) as `zap` says.
fn zap_region(vm: &Vm, zap: Zap, first: u64, end: u64) -> Result<(), BenchError> {
    use shadow_mmu::{EptView, MmuNotifierRange, MmuNotifyEvent, RangeFlags};
    match zap {
        Zap::Notifier => {
            let r = MmuNotifierRange::new(first, end, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE);
            let mut h = lock(vm.mm());
            h.invalidate_range_start(&r);
            h.invalidate_range_end(&r);
        }
        Zap::ViewOnly => lock(vm.mmu()).view_mut().zap(first, end)?,
    }
    Ok(())
}

/// Runs pagefill with no deduplicator, zapping its region at each dedup
/// request, and times its phase 3 (one read per page).
fn timed_refaults(config: &RunConfig, zap: Zap, wait: FaultWait) -> Result<Refaults, BenchError> {
    use shadow_mmu::PAGE_SHIFT;
    let mut vm = Vm::new(config)?;
    let memory = vm.guest_ram();
    let mut devices = Devices { console: Console::new(Box::new(std::io::sink())), reports: Vec::new(), memory };
    let first = guest_images::PAGEFILL_START >> PAGE_SHIFT;
    let end = first + guest_images::pagefill_pages(config.mem_bytes);
    vm.gate().register_vcpu_thread();
    set_fault_thread(&vm, wait, zap == Zap::ViewOnly);
    let mut counts = ExitCounts::default();
    let (mut start, mut view_start, mut f0) = (None, 0, 0);
    loop {
        let outcome = match vm.vcpu_mut().run() {
            Ok(exit) => handle_exit(&mut devices, &mut counts, exit),
            Err(_) => return Err(BenchError::GuestEnded(0)),
        };
        match outcome {
            Outcome::Dedup(1) => zap_region(&vm, zap, first, end)?,
            Outcome::NextPhase(3) => {
                start = Some(Instant::now());
                view_start = lock(vm.mmu()).stats().view_ns;
                f0 = faults_so_far(&counts, &vm);
            }
            Outcome::NextPhase(4) => {
                let wall_ns = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
                let view_ns = lock(vm.mmu()).stats().view_ns - view_start;
                let faults = faults_so_far(&counts, &vm) - f0;
                set_fault_thread(&vm, FaultWait::default(), false);
                return Ok(Refaults { faults, wall_ns, view_ns });
            }
            Outcome::Continue | Outcome::Dedup(_) | Outcome::NextPhase(_) | Outcome::PhaseName(_) => {}
            _ => return Err(BenchError::GuestEnded(2)),
        }
    }
}

/// Mean cost of creating, then of deleting, `n` one-page memslots in a VM of
/// their own: the same slot population a run of `n` faults builds up under
/// the memslot view (KVM's cost per slot change grows with the slot count).
/// The slots are the highest ids KVM offers, clear of the VM's own.
fn slot_change_ns(config: &RunConfig, n: u64) -> Result<(f64, f64), BenchError> {
    let vm = Vm::new(config)?;
    let base = vmm::x86::layout::mapped_bytes(config.mem_bytes) + (1 << 30);
    let top = u64::try_from(vm.vm_fd().check_extension_int(kvm_ioctls::Cap::NrMemslots)).unwrap_or(0);
    let slot = |i: u64| top.saturating_sub(1 + i) as u32;
    let t = Instant::now();
    for i in 0..n {
        set_memslot(vm.vm_fd(), vm.pool(), slot(i), base + i * 4096, 4096, 0, false)?;
    }
    let create = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    let t = Instant::now();
    for i in 0..n {
        set_memslot(vm.vm_fd(), vm.pool(), slot(i), base + i * 4096, 0, 0, false)?;
    }
    let delete = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    Ok((create, delete))
}

/// The median of `values` (NaN when there are none).
fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(f64::NAN)
}

/// The run of median cost per fault (`runs` not empty).
fn median_run(mut runs: Vec<Refaults>) -> Refaults {
    runs.sort_by(|a, b| a.per_fault().total_cmp(&b.per_fault()));
    runs[runs.len() / 2]
}

/// Pages of pagefill's region the memslot bench faults on at most: half
/// take the VMM's path and keep a slot of the view's, half the bare one and
/// keep a slot of the bench's, all from KVM's 32,764.
const MEMSLOT_BENCH_PAGES: u64 = 16_384;

/// Which path served a fault exit in [`memslot_interleaved`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    /// The VMM's: `handle_exit`, `handle_ept_violation`, the view's slot.
    Vmm = 0,
    /// The bare mechanism: a one-page slot over the frame and the read
    /// completed from it, nothing else.
    Bare = 1,
}

/// What [`memslot_interleaved`] measured: per-fault round trips (from one
/// KVM_RUN return to the next) of each path.
#[derive(Debug)]
struct Interleaved {
    vmm: Vec<u64>,
    bare: Vec<u64>,
    /// Time inside the view over the VMM's faults.
    view_ns: u64,
}

/// Zaps the memslot bench's pages: the whole range from the view alone
/// (the secondary MMU keeps its entries), then the VMM's pages (even
/// offsets) through the notifier as well, which takes their entries away.
fn zap_interleaved(vm: &Vm, first: u64, end: u64) -> Result<(), BenchError> {
    zap_region(vm, Zap::ViewOnly, first, end)?;
    (first..end).step_by(2).try_for_each(|p| zap_region(vm, Zap::Notifier, p, p + 1))
}

/// The memslot view's fault and its bare mechanism in one pagefill run,
/// page by page in turn, so that a drift of the machine (and the growing
/// slot count, which KVM's slot changes slow down with) hits both alike:
/// after the first dedup request every other page of the region faults
/// through the VMM, the rest is served bare by the bench itself.
fn memslot_interleaved(config: &RunConfig) -> Result<Interleaved, BenchError> {
    use kvm_ioctls::VcpuExit;
    use shadow_mmu::PAGE_SHIFT;
    let mut vm = Vm::new(config)?;
    let memory = vm.guest_ram();
    let mm = memory.mm.clone();
    let mut devices = Devices { console: Console::new(Box::new(std::io::sink())), reports: Vec::new(), memory };
    let first = guest_images::PAGEFILL_START >> PAGE_SHIFT;
    let end = first + guest_images::pagefill_pages(config.mem_bytes).min(MEMSLOT_BENCH_PAGES);
    vm.gate().register_vcpu_thread();
    let (vm_fd, pool) = (vm.vm_fd().clone(), vm.pool().clone());
    let mut bare_slot = u32::try_from(vm_fd.check_extension_int(kvm_ioctls::Cap::NrMemslots)).unwrap_or(0);
    let mut out = Interleaved { vmm: Vec::new(), bare: Vec::new(), view_ns: 0 };
    let (mut pending, mut timing) = (None::<(Path, Instant)>, false);
    let mut counts = ExitCounts::default();
    loop {
        let exit = vm.vcpu_mut().run().map_err(|_| BenchError::GuestEnded(0))?;
        let now = Instant::now();
        if let Some((path, since)) = pending.take() {
            let ns = u64::try_from(now.duration_since(since).as_nanos()).unwrap_or(u64::MAX);
            [&mut out.vmm, &mut out.bare][path as usize].push(ns);
        }
        let gfn = |gpa: u64| gpa >> PAGE_SHIFT;
        let fault = |gpa: u64| timing && (first..end).contains(&gfn(gpa));
        let bare_page = |gpa: u64| fault(gpa) && (gfn(gpa) - first) % 2 == 1;
        match exit {
            VcpuExit::MmioRead(gpa, data) if bare_page(gpa) => {
                bare_slot -= 1;
                set_memslot(&vm_fd, &pool, bare_slot, gfn(gpa) << PAGE_SHIFT, 1 << PAGE_SHIFT, gfn(gpa), false)?;
                lock(&mm).read_guest(gpa, data).map_err(BenchError::Memory)?;
                pending = Some((Path::Bare, now));
            }
            exit => {
                let vmm_fault = matches!(exit, VcpuExit::MmioRead(gpa, _) if fault(gpa));
                match handle_exit(&mut devices, &mut counts, exit) {
                    Outcome::Dedup(1) => zap_interleaved(&vm, first, end)?,
                    Outcome::NextPhase(3) => {
                        timing = true;
                        out.view_ns = lock(vm.mmu()).stats().view_ns;
                    }
                    Outcome::NextPhase(4) => {
                        out.view_ns = lock(vm.mmu()).stats().view_ns - out.view_ns;
                        return Ok(out);
                    }
                    Outcome::Continue | Outcome::Dedup(_) | Outcome::NextPhase(_) | Outcome::PhaseName(_) => {}
                    _ => return Err(BenchError::GuestEnded(2)),
                }
                pending = vmm_fault.then_some((Path::Vmm, now));
            }
        }
    }
}

/// The userfaultfd view's runs: the VMM's fault and the bare mechanism
/// with each way of waiting, alternating. Returns
/// the VMM's run of median cost in a run's default way, and the medians.
fn uffd_rounds(config: &RunConfig) -> Result<(Refaults, FaultWaitFigures), BenchError> {
    let kinds = [
        (Zap::Notifier, FaultWait::Adaptive),
        (Zap::Notifier, FaultWait::Block),
        (Zap::Notifier, FaultWait::Busy),
        (Zap::ViewOnly, FaultWait::Block),
        (Zap::ViewOnly, FaultWait::Busy),
        (Zap::ViewOnly, FaultWait::Adaptive),
    ];
    let mut runs: [Vec<Refaults>; 6] = Default::default();
    for _ in 0..ROUNDS {
        for (k, &(zap, wait)) in kinds.iter().enumerate() {
            runs[k].push(timed_refaults(config, zap, wait)?);
        }
    }
    let m: Vec<f64> = runs.iter().map(|r| median(r.iter().map(Refaults::per_fault).collect())).collect();
    let typical = median_run(runs[0].clone());
    let figures = FaultWaitFigures {
        vmm_adaptive_ns: m[0],
        vmm_block_ns: m[1],
        vmm_busy_ns: m[2],
        bare_block_ns: m[3],
        bare_busy_ns: m[4],
        bare_adaptive_ns: m[5],
    };
    Ok((typical, figures))
}

/// `vmm bench fault`: a secondary-MMU fault served end to end under
/// `config.view`, next to the bare mechanism, measured in the same run.
pub fn fault_cost(make_config: impl Fn(&'static str) -> RunConfig) -> Result<FaultReport, BenchError> {
    let config = make_config("pagefill");
    let view = config.view;
    // Filled in below.
    let mut report = FaultReport {
        bench: "secondary_mmu_fault",
        view: view.name(),
        mem_bytes: config.mem_bytes,
        faults: 0,
        fault_ns: 0.0,
        view_ns_per_fault: 0.0,
        bare_ns: 0.0,
        bare_what: "",
        ratio: 0.0,
        port_io_exit_ns: None,
        slot_create_ns: None,
        slot_delete_ns: None,
        fault_wait: None,
    };
    match view {
        ViewKind::Memslot => {
            let run = memslot_interleaved(&config)?;
            let summary = |samples: Vec<u64>| summarize(samples).map_or(f64::NAN, |s| s.median_ns);
            report.faults = run.vmm.len() as u64;
            report.view_ns_per_fault = run.view_ns as f64 / report.faults.max(1) as f64;
            report.fault_ns = summary(run.vmm);
            report.bare_ns = summary(run.bare);
            report.bare_what = "one MMIO exit round trip, a one-page memslot created over the frame and the read \
                                completed from it, page by page in turn with the VMM's faults (medians)";
            // The parts of the bare mechanism, each on its own.
            let exit = exit_floor(make_config("misbehave-port-flood"), 1_000, 10_000)?.port_io_exit.median_ns;
            let (create, delete) = slot_change_ns(&make_config("hello"), report.faults)?;
            (report.port_io_exit_ns, report.slot_create_ns, report.slot_delete_ns) =
                (Some(exit), Some(create), Some(delete));
        }
        ViewKind::Uffd => {
            let (run, figures) = uffd_rounds(&config)?;
            report.bare_what = "one userfaultfd MINOR fault + UFFDIO_CONTINUE, the thread blocking, busy-polling or \
                                polling a while, whichever is fastest";
            report.bare_ns = figures.bare_block_ns.min(figures.bare_busy_ns).min(figures.bare_adaptive_ns);
            report.fault_wait = Some(figures);
            report.faults = run.faults;
            report.fault_ns = run.per_fault();
            report.view_ns_per_fault = run.view_ns as f64 / run.faults.max(1) as f64;
        }
    }
    report.ratio = report.fault_ns / report.bare_ns;
    Ok(report)
}
