//! `vmm bench`: each figure a ratio of two things measured side by side in
//! one run. `floor`: one port-I/O exit round trip through this VMM (KVM_RUN
//! returns, the exit is mapped and counted, KVM_RUN is entered again) against
//! a bare KVM_RUN loop. `fault`: one secondary-MMU fault against the bare
//! mechanism of its view. `dedup` ([`dedup`]): the deduplicator's scan and
//! merge costs and its convergence, against the host's own KSM. `profile`
//! ([`profile`]): this host's cost profile, each event's cost from a
//! microbenchmark. `model` ([`model`]): the profile's predictions against
//! measured runs of the workloads.

pub mod dedup;
mod fault;
pub mod model;
pub mod profile;

use std::time::Instant;

use serde::Serialize;

use vmm::serial::Console;
use vmm::stats::ExitCounts;
use vmm::vcpu::{handle_exit, Devices, Outcome};
use vmm::view::ViewError;
use vmm::vm::{RunConfig, Vm, VmError};

pub use fault::{fault_cost, FaultReport};

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
    /// The view could not change a memslot or zap the guest's pages.
    #[error(transparent)]
    View(#[from] ViewError),
    /// The bench could not read guest memory to complete an access itself.
    #[error("reading guest memory for a bare fault")]
    Memory(#[source] shadow_mmu::PrimaryMmuError),
    /// This host's cost profile could not be measured.
    #[error(transparent)]
    Profile(#[from] profile::ProfileBenchError),
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
        let ok = match vm.vcpu_mut().run() {
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
