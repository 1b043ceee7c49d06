//! `vmm bench`: the exit floor, the cost of one port-I/O exit round trip as
//! this VMM sees it (KVM_RUN returns, the exit is mapped and counted, KVM_RUN
//! is entered again). Every later performance figure is a ratio to it.

use std::time::Instant;

use serde::Serialize;

use crate::serial::Console;
use crate::stats::ExitCounts;
use crate::vcpu::{handle_exit, Devices, GuestMemory, Outcome};
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
    /// One port-I/O exit round trip.
    pub port_io_exit: Summary,
}

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

/// Times `exits` consecutive port-I/O exits of a guest that does nothing
/// but port I/O (the built-in `misbehave-port-flood`), after `warmup` exits.
pub fn exit_floor(config: RunConfig, warmup: usize, exits: usize) -> Result<ExitFloorReport, BenchError> {
    let image = config.image.name.clone();
    let mut vm = Vm::new(&config)?;
    let memory = GuestMemory { host: vm.host.clone(), mmu: vm.mmu.clone(), mem_bytes: vm.mem_bytes };
    let mut devices = Devices { console: Console::new(config.console), reports: Vec::new(), memory };
    let mut counts = ExitCounts::default();
    let mut samples = Vec::with_capacity(exits);
    let mut last = Instant::now();
    for i in 0..warmup + exits {
        let outcome = match vm.vcpu.run() {
            Ok(exit) => handle_exit(&mut devices, &mut counts, exit),
            Err(_) => return Err(BenchError::GuestEnded(i)),
        };
        let now = Instant::now();
        if outcome != Outcome::Continue {
            return Err(BenchError::GuestEnded(i));
        }
        if i >= warmup {
            samples.push(u64::try_from(now.duration_since(last).as_nanos()).unwrap_or(u64::MAX));
        }
        last = now;
    }
    let port_io_exit = summarize(samples).ok_or(BenchError::GuestEnded(0))?;
    Ok(ExitFloorReport { bench: "exit_floor", image, port_io_exit })
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
}
