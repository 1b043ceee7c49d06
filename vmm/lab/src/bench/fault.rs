//! `vmm bench fault`: one secondary-MMU fault served end to end against the
//! bare mechanism of its view, measured in the same run.

use std::time::Instant;

use serde::Serialize;

use vmm::serial::Console;
use vmm::stats::ExitCounts;
use vmm::vcpu::{handle_exit, Devices, Outcome};
use vmm::view::memslot::set_memslot;
use vmm::view::ViewKind;
use vmm::vm::{lock, RunConfig, Vm};

use super::{exit_floor, BenchError};

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
    pub fault_ns: f64,
    /// Of which: time inside the view backend, per fault.
    pub view_ns_per_fault: f64,
    /// Mean cost of the bare mechanism (see `bare_what`).
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
}

/// How a bench run invalidates the guest's pages at each dedup request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Zap {
    /// Through the mmu notifier: the secondary MMU zaps its entries and the
    /// view (a real secondary-MMU fault follows).
    Notifier,
    /// The view alone: the entries stay, so the next access is served as
    /// the host's own fault by the view (userfaultfd fault + CONTINUE).
    ViewOnly,
}

/// Runs pagefill with no deduplicator, zapping its region at each dedup
/// request, and returns (faults in phase 3, phase 3 wall ns, view ns in phase 3).
fn timed_refaults(config: &RunConfig, zap: Zap) -> Result<(u64, u64, u64), BenchError> {
    use shadow_mmu::{EptView, MmuNotifierRange, MmuNotifyEvent, RangeFlags, PAGE_SHIFT};
    let vm = Vm::new(config)?;
    let memory = vm.guest_ram();
    let mut devices = Devices { console: Console::new(Box::new(std::io::sink())), reports: Vec::new(), memory };
    let first = guest_images::PAGEFILL_START >> PAGE_SHIFT;
    let end = first + guest_images::pagefill_pages(config.mem_bytes);
    let mut vm = vm;
    vm.gate().register_vcpu_thread();
    let mut counts = ExitCounts::default();
    let (mut start, mut view_start) = (None, 0);
    let faults_before =
        |c: &ExitCounts, v: &Vm| c.ept_read + c.ept_write + v.view_faults().counts().0 + v.view_faults().host_faults();
    let mut f0 = 0;
    loop {
        let outcome = match vm.vcpu_mut().run() {
            Ok(exit) => handle_exit(&mut devices, &mut counts, exit),
            Err(_) => return Err(BenchError::GuestEnded(0)),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Dedup(1) => match zap {
                Zap::Notifier => {
                    let r = MmuNotifierRange::new(first, end, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE);
                    let mut h = lock(vm.mm());
                    h.invalidate_range_start(&r);
                    h.invalidate_range_end(&r);
                }
                Zap::ViewOnly => {
                    let mut m = lock(vm.mmu());
                    m.view_mut().zap(first, end)?;
                }
            },
            Outcome::Dedup(_) => {}
            Outcome::NextPhase(3) => {
                start = Some(Instant::now());
                view_start = lock(vm.mmu()).stats().view_ns;
                f0 = faults_before(&counts, &vm);
            }
            Outcome::NextPhase(4) => {
                let wall = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
                let view = lock(vm.mmu()).stats().view_ns - view_start;
                let faults = faults_before(&counts, &vm) - f0;
                return Ok((faults, wall, view));
            }
            Outcome::NextPhase(_) => {}
            _ => return Err(BenchError::GuestEnded(2)),
        }
    }
}

/// Mean cost of creating, then of deleting, `n` one-page memslots in a VM of
/// their own: the same slot population a run of `n` faults builds up under
/// the memslot view (KVM's cost per slot change grows with the slot count).
fn slot_change_ns(config: &RunConfig, n: u64) -> Result<(f64, f64), BenchError> {
    let vm = Vm::new(config)?;
    let base = vmm::x86::layout::mapped_bytes(config.mem_bytes) + (1 << 30);
    let slot = |i: u64| 2 + i as u32; // slots 0 and 1 are the VM's own
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

/// `vmm bench fault`: a secondary-MMU fault served end to end under
/// `config.view`, next to the bare mechanism, measured in the same run.
pub fn fault_cost(make_config: impl Fn(&'static str) -> RunConfig) -> Result<FaultReport, BenchError> {
    let config = make_config("pagefill");
    let view = config.view;
    let (faults, wall, view_ns) = timed_refaults(&config, Zap::Notifier)?;
    let fault_ns = wall as f64 / faults.max(1) as f64;
    let (bare_ns, bare_what, io, create, delete) = match view {
        ViewKind::Memslot => {
            let floor = exit_floor(make_config("misbehave-port-flood"), 1_000, 10_000)?.port_io_exit.median_ns;
            let (create, delete) = slot_change_ns(&make_config("hello"), faults)?;
            let what = "one port-I/O exit round trip + creating one memslot (mean over as many slots as faults)";
            (floor + create, what, Some(floor), Some(create), Some(delete))
        }
        ViewKind::Uffd => {
            let (bare_faults, bare_wall, _) = timed_refaults(&config, Zap::ViewOnly)?;
            (bare_wall as f64 / bare_faults.max(1) as f64, "one userfaultfd fault + UFFDIO_CONTINUE", None, None, None)
        }
    };
    Ok(FaultReport {
        bench: "secondary_mmu_fault",
        view: view.name(),
        mem_bytes: config.mem_bytes,
        faults,
        fault_ns,
        view_ns_per_fault: view_ns as f64 / faults.max(1) as f64,
        bare_ns,
        bare_what,
        ratio: fault_ns / bare_ns,
        port_io_exit_ns: io,
        slot_create_ns: create,
        slot_delete_ns: delete,
    })
}
