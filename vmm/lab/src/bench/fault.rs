//! `vmm bench fault`: one secondary-MMU fault served end to end against the
//! bare mechanism of its view, measured in the same run.

use std::time::Instant;

use serde::Serialize;

use vmm::serial::Console;
use vmm::stats::ExitCounts;
use vmm::vcpu::{handle_exit, Devices, Outcome};
use vmm::view::memslot::set_memslot;
use vmm::view::uffd::FaultWait;
use vmm::view::{AnyView, ViewKind};
use vmm::vm::{lock, RunConfig, Vm};

use super::{exit_floor, BenchError};

/// Runs of each kind the figures are the medians of, the kinds alternating
/// so that a drift of the machine hits all alike.
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
    /// Faults timed (one read per page of pagefill's region).
    pub faults: u64,
    /// Mean cost of a secondary-MMU fault: exit or userfaultfd event,
    /// `handle_ept_violation` (host lookup, install), view update, resume.
    /// Under the userfaultfd view, with the fault thread waiting as a run's
    /// does ([`FaultWait::Adaptive`]).
    pub fault_ns: f64,
    /// Of which: time inside the view backend, per fault.
    pub view_ns_per_fault: f64,
    /// Mean cost of the fastest bare mechanism (see `bare_what`).
    pub bare_ns: f64,
    /// What the bare mechanism is for this view.
    pub bare_what: &'static str,
    /// fault_ns / bare_ns.
    pub ratio: f64,
    /// Memslot view only: the parts of the bare mechanism.
    pub port_io_exit_ns: Option<f64>,
    /// Memslot view only: creating a one-page memslot (mean, as many as faults).
    pub slot_create_ns: Option<f64>,
    /// Memslot view only: deleting one of them (mean).
    pub slot_delete_ns: Option<f64>,
    /// userfaultfd view only: the VMM's fault and the bare mechanism per way
    /// the fault thread waits.
    pub fault_wait: Option<FaultWaitFigures>,
}

/// A userfaultfd fault, end to end and bare, per way of waiting for it
/// (medians over [`ROUNDS`] runs of the mean per fault).
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
            Outcome::Continue | Outcome::Dedup(_) | Outcome::NextPhase(_) => {}
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

/// The memslot view's runs, alternating: the VMM's fault, then the parts of
/// the bare mechanism (a port-I/O exit round trip; creating and deleting as
/// many one-page slots as there were faults). Returns the VMM's run of
/// median cost and the medians of the parts.
fn memslot_rounds(make_config: impl Fn(&'static str) -> RunConfig) -> Result<(Refaults, [f64; 3]), BenchError> {
    let config = make_config("pagefill");
    let (mut runs, mut exits, mut creates, mut deletes) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for _ in 0..ROUNDS {
        let run = timed_refaults(&config, Zap::Notifier, FaultWait::default())?;
        exits.push(exit_floor(make_config("misbehave-port-flood"), 1_000, 10_000)?.port_io_exit.median_ns);
        let (create, delete) = slot_change_ns(&make_config("hello"), run.faults)?;
        creates.push(create);
        deletes.push(delete);
        runs.push(run);
    }
    Ok((median_run(runs), [median(exits), median(creates), median(deletes)]))
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
    let vmm_run = match view {
        ViewKind::Memslot => {
            let (run, [floor, create, delete]) = memslot_rounds(&make_config)?;
            report.bare_what =
                "one port-I/O exit round trip + creating one memslot (mean over as many slots as faults)";
            report.bare_ns = floor + create;
            (report.port_io_exit_ns, report.slot_create_ns, report.slot_delete_ns) =
                (Some(floor), Some(create), Some(delete));
            run
        }
        ViewKind::Uffd => {
            let (run, figures) = uffd_rounds(&config)?;
            report.bare_what = "one userfaultfd MINOR fault + UFFDIO_CONTINUE, the thread blocking, busy-polling or \
                                polling a while, whichever is fastest";
            report.bare_ns = figures.bare_block_ns.min(figures.bare_busy_ns).min(figures.bare_adaptive_ns);
            report.fault_wait = Some(figures);
            run
        }
    };
    report.faults = vmm_run.faults;
    report.fault_ns = vmm_run.per_fault();
    report.view_ns_per_fault = vmm_run.view_ns as f64 / vmm_run.faults.max(1) as f64;
    report.ratio = report.fault_ns / report.bare_ns;
    Ok(report)
}
