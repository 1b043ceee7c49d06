//! `vmm bench`: each figure a ratio of two things measured side by side in
//! one run. `floor`: one port-I/O exit round trip through this VMM (KVM_RUN
//! returns, the exit is mapped and counted, KVM_RUN is entered again) against
//! a bare KVM_RUN loop. `fault`: one secondary-MMU fault against the bare
//! mechanism of its view. `dedup` ([`dedup`]): the deduplicator's scan and
//! merge costs and its convergence, against the host's own KSM.

pub mod dedup;

use std::time::Instant;

use serde::Serialize;

use crate::serial::Console;
use crate::stats::ExitCounts;
use crate::vcpu::{handle_exit, Devices, Outcome};
use crate::vm::{RunConfig, Vm, VmError};

/// Summary statistics of a set of samples, in nanoseconds.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Summary {
    /// Number of samples.
    pub samples: usize,
    /// Median.
    pub median_ns: f64,
    /// 10th percentile.
    pub p10_ns: f64,
    /// 90th percentile.
    pub p90_ns: f64,
    /// Mean.
    pub mean_ns: f64,
}

/// Summarises samples (nanoseconds); None when there are none.
pub fn summarize(mut samples: Vec<u64>) -> Option<Summary> {
    if samples.is_empty() {
        return None;
    }
    samples.sort_unstable();
    let pick = |q: f64| samples[((samples.len() - 1) as f64 * q).round() as usize] as f64;
    let mean = samples.iter().map(|&s| s as f64).sum::<f64>() / samples.len() as f64;
    Some(Summary { samples: samples.len(), median_ns: pick(0.5), p10_ns: pick(0.1), p90_ns: pick(0.9), mean_ns: mean })
}

/// The `vmm bench` report.
#[derive(Debug, Clone, Serialize)]
pub struct ExitFloorReport {
    /// What was measured.
    pub bench: &'static str,
    /// The guest image used.
    pub image: String,
    /// One port-I/O exit round trip through this VMM's exit path (the exit
    /// mapped to an outcome, the device served, the exit counted).
    pub port_io_exit: Summary,
    /// The same round trip with nothing done but KVM_RUN again: the bare
    /// KVM cost, timed in alternating blocks with `port_io_exit`.
    pub bare_exit: Summary,
    /// port_io_exit median / bare_exit median.
    pub ratio: f64,
}

/// Exits per block when the VMM path and the bare loop alternate.
const FLOOR_BLOCK: usize = 1_000;

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// The VM could not be built.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The guest stopped taking port-I/O exits before enough were sampled.
    #[error("the bench guest ended after {0} exits, before the samples were complete")]
    GuestEnded(usize),
}

/// Times `exits` port-I/O exits through the VMM's exit path and `exits` with
/// a bare KVM_RUN loop, in alternating blocks of FLOOR_BLOCK (so that a drift
/// of the machine hits both alike), after `warmup` exits, with a guest that
/// does nothing but port I/O (the built-in `misbehave-port-flood`).
pub fn exit_floor(config: RunConfig, warmup: usize, exits: usize) -> Result<ExitFloorReport, BenchError> {
    let image = config.image.name.clone();
    let mut vm = Vm::new(&config)?;
    let memory = vm.guest_ram();
    let mut devices = Devices { console: Console::new(config.console), reports: Vec::new(), memory };
    let mut counts = ExitCounts::default();
    let (mut vmm_samples, mut bare_samples) = (Vec::with_capacity(exits), Vec::with_capacity(exits));
    let mut last = Instant::now();
    let mut i = 0;
    while vmm_samples.len() < exits || bare_samples.len() < exits {
        let bare = i >= warmup && ((i - warmup) / FLOOR_BLOCK) % 2 == 1;
        let ok = match vm.vcpu.run() {
            // Bare: the exit is not even looked at.
            Ok(_) if bare => true,
            Ok(exit) => handle_exit(&mut devices, &mut counts, exit) == Outcome::Continue,
            Err(_) => false,
        };
        let now = Instant::now();
        if !ok {
            return Err(BenchError::GuestEnded(i));
        }
        let ns = u64::try_from(now.duration_since(last).as_nanos()).unwrap_or(u64::MAX);
        match (i >= warmup, bare) {
            (false, _) => {}
            (true, true) if bare_samples.len() < exits => bare_samples.push(ns),
            (true, false) if vmm_samples.len() < exits => vmm_samples.push(ns),
            _ => {}
        }
        last = now;
        i += 1;
    }
    let port_io_exit = summarize(vmm_samples).ok_or(BenchError::GuestEnded(0))?;
    let bare_exit = summarize(bare_samples).ok_or(BenchError::GuestEnded(0))?;
    let ratio = port_io_exit.median_ns / bare_exit.median_ns;
    Ok(ExitFloorReport { bench: "exit_floor", image, port_io_exit, bare_exit, ratio })
}

/// Port-I/O exits `exit_floor` takes for `exits` samples of each kind, or
/// None when that does not fit a usize.
pub fn exit_floor_exits_needed(warmup: usize, exits: usize) -> Option<usize> {
    // Whole blocks of each kind, alternating.
    exits.div_ceil(FLOOR_BLOCK).checked_mul(2 * FLOOR_BLOCK)?.checked_add(warmup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn summary_percentiles() {
        let s = summarize((1..=101).collect()).expect("samples");
        assert_eq!((s.samples, s.median_ns, s.p10_ns, s.p90_ns, s.mean_ns), (101, 51.0, 11.0, 91.0, 51.0));
        assert!(summarize(Vec::new()).is_none());
    }

    #[test]
    fn a_ratio_reads_back_from_json_exactly() {
        // CI once read this ratio back one ULP off (serde_json without
        // float_roundtrip); readers of the JSON must get the figure written.
        let ratio = 0.987_870_151_536_215_7_f64;
        let text = serde_json::to_string(&ratio).expect("serialize");
        assert_eq!(serde_json::from_str::<f64>(&text).expect("parse").to_bits(), ratio.to_bits());
    }
}

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
    vm.gate.register_vcpu_thread();
    let mut counts = ExitCounts::default();
    let (mut start, mut view_start) = (None, 0);
    let faults_before =
        |c: &ExitCounts, v: &Vm| c.ept_read + c.ept_write + v.view_faults.counts().0 + v.view_faults.host_faults();
    let mut f0 = 0;
    loop {
        let outcome = match vm.vcpu.run() {
            Ok(exit) => handle_exit(&mut devices, &mut counts, exit),
            Err(_) => return Err(BenchError::GuestEnded(0)),
        };
        match outcome {
            Outcome::Continue => {}
            Outcome::Dedup(1) => match zap {
                Zap::Notifier => {
                    let r = MmuNotifierRange::new(first, end, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE);
                    let mut h = crate::vm::lock(&vm.mm);
                    h.invalidate_range_start(&r);
                    h.invalidate_range_end(&r);
                }
                Zap::ViewOnly => {
                    let mut m = crate::vm::lock(&vm.mmu);
                    m.view_mut().zap(first, end).map_err(|_| BenchError::GuestEnded(1))?;
                }
            },
            Outcome::Dedup(_) => {}
            Outcome::NextPhase(3) => {
                start = Some(Instant::now());
                view_start = crate::vm::lock(&vm.mmu).stats().view_ns;
                f0 = faults_before(&counts, &vm);
            }
            Outcome::NextPhase(4) => {
                let wall = start.map_or(0, |s| s.elapsed().as_nanos() as u64);
                let view = crate::vm::lock(&vm.mmu).stats().view_ns - view_start;
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
    let base = crate::x86::layout::mapped_bytes(config.mem_bytes) + (1 << 30);
    let slot = |i: u64| 2 + i as u32; // slots 0 and 1 are the VM's own
    let err = |e| BenchError::Vm(VmError::View(e));
    let t = Instant::now();
    for i in 0..n {
        crate::view::memslot::set_memslot(&vm.vm_fd, &vm.pool, slot(i), base + i * 4096, 4096, 0, false)
            .map_err(err)?;
    }
    let create = t.elapsed().as_nanos() as f64 / n.max(1) as f64;
    let t = Instant::now();
    for i in 0..n {
        crate::view::memslot::set_memslot(&vm.vm_fd, &vm.pool, slot(i), base + i * 4096, 0, 0, false).map_err(err)?;
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
        crate::view::ViewKind::Memslot => {
            let floor = exit_floor(make_config("misbehave-port-flood"), 1_000, 10_000)?.port_io_exit.median_ns;
            let (create, delete) = slot_change_ns(&make_config("hello"), faults)?;
            let what = "one port-I/O exit round trip + creating one memslot (mean over as many slots as faults)";
            (floor + create, what, Some(floor), Some(create), Some(delete))
        }
        crate::view::ViewKind::Uffd => {
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
