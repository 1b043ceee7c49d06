//! `vmm bench dedup`: the built-in deduplicator against the host's own KSM
//! (the `kernel` policy), on the same guests, in the same invocation, runs
//! interleaved.
//!
//! * Scan cost per page: the `unique` guest (every page different, nothing
//!   can merge) through one synchronous pass; deduplicator CPU time divided
//!   by pages scanned.
//! * Merge cost per page: the `converge` guest (every page in one of 64
//!   groups) through one pass; its CPU time divided by the pages merged.
//!   It includes the scans that lead to the merge (checksum, tree search,
//!   comparison), because they cannot be told apart: rescanning a page that
//!   is already merged costs far less than scanning one that is not (the
//!   kernel's pass over `converge` costs less CPU than its pass over
//!   `unique`), so subtracting a scan cost per page would be wrong.
//! * Convergence: the same pass's wall time and CPU time.
//!
//! The kernel's CPU time is ksmd's (/proc/PID/schedstat), its pages scanned
//! the sysfs counter; ours are the deduplicator thread's CPU time and its own
//! counter. Each figure is the median over the repeats; ratios are ours
//! divided by the kernel's.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use vmm::dedup::HostKsmPaths;
use vmm::stats::RunStats;
use vmm::vm::DedupPolicy;

use vmm::view::uffd::bare_view_costs;

use crate::compare::fold::median;
use crate::compare::{run_once, CompareConfig, RunError};
use crate::progress::Progress;

/// Pages of each bare remap and zap measurement.
const BARE_PAGES: usize = 4096;

/// The guest phase in which `unique` and `converge` make their pass.
const PASS_PHASE: u32 = 2;

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum DedupBenchError {
    /// The bare view mechanisms could not be timed.
    #[error("cannot time a bare view remap and zap")]
    Bare(#[source] vmm::view::ViewError),
    /// The directory for the runs' statistics could not be created.
    #[error("cannot create {path}")]
    CreateDir {
        /// The directory.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A child run gave no statistics.
    #[error(transparent)]
    Run(#[from] RunError),
    /// A guest did not succeed.
    #[error("{image} under {policy}: {detail}")]
    Guest {
        /// The guest.
        image: &'static str,
        /// The policy.
        policy: &'static str,
        /// How the run ended.
        detail: String,
    },
    /// A run has no phase in which the pass was made.
    #[error("{image}: no phase {PASS_PHASE} (the pass)")]
    NoPass {
        /// The image the run names.
        image: String,
    },
    /// The pass scanned nothing, or merged nothing where everything merges.
    #[error(
        "{image} under {policy}: the deduplicator reported {scanned} pages scanned and {merged} merged: no \
         per-page cost can be computed (does this kernel expose pages_scanned and /proc/self/ksm_stat?)"
    )]
    NothingCounted {
        /// The guest.
        image: &'static str,
        /// The policy.
        policy: &'static str,
        /// Pages scanned in the pass.
        scanned: u64,
        /// Pages merged in the pass.
        merged: u64,
    },
}

/// One pass, as measured.
#[derive(Debug, Clone, Copy, PartialEq, Default, Serialize)]
pub struct Pass {
    /// Wall time of the pass.
    pub wall_ns: u64,
    /// Deduplicator CPU time during it.
    pub cpu_ns: u64,
    /// Pages scanned.
    pub pages_scanned: u64,
    /// Pages merged into KSM pages.
    pub pages_merged: u64,
    /// Pages the view remapped onto another frame (0 for the kernel).
    pub view_remaps: u64,
    /// The mmaps those remaps took: a batch maps neighbouring pages onto
    /// neighbouring frames with one.
    pub view_remap_runs: u64,
}

fn pass_of(stats: &RunStats) -> Result<Pass, DedupBenchError> {
    let phase = stats
        .phases
        .iter()
        .find(|p| p.phase == PASS_PHASE)
        .ok_or_else(|| DedupBenchError::NoPass { image: stats.config.image.clone() })?;
    let k = &phase.figures.ksm;
    let get = |n: &str| k.get(n).copied().unwrap_or(0);
    // The built-in deduplicator counts merges; the kernel reports the pages
    // of this process that map a KSM page.
    let merged = if stats.config.dedup == "kernel" { get("ksm_merging_pages") } else { get("merges") };
    let view = |n: &str| phase.figures.shadow_mmu.get(n).copied().unwrap_or(0);
    Ok(Pass {
        wall_ns: phase.figures.wall_ns,
        cpu_ns: get("cpu_ns"),
        pages_scanned: get("pages_scanned"),
        pages_merged: merged,
        view_remaps: view("view_remaps"),
        view_remap_runs: view("view_remap_runs"),
    })
}

/// Medians over the repeats of one policy on one guest.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyFigures {
    /// Every pass, in repeat order.
    pub passes: Vec<Pass>,
    /// Median pass wall time.
    pub wall_ns: f64,
    /// Median pass CPU time.
    pub cpu_ns: f64,
    /// Median CPU time per scanned page.
    pub cpu_ns_per_scanned_page: f64,
    /// Median pages merged.
    pub pages_merged: f64,
}

fn figures(passes: Vec<Pass>) -> PolicyFigures {
    let m = |f: fn(&Pass) -> u64| median(&passes.iter().map(f).collect::<Vec<_>>());
    let per_page: Vec<u64> =
        passes.iter().map(|p| (p.cpu_ns as f64 / p.pages_scanned.max(1) as f64).round() as u64).collect();
    PolicyFigures {
        wall_ns: m(|p| p.wall_ns),
        cpu_ns: m(|p| p.cpu_ns),
        cpu_ns_per_scanned_page: median(&per_page),
        pages_merged: m(|p| p.pages_merged),
        passes,
    }
}

/// One policy's results and its ratios to the kernel's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PolicyResult {
    /// On `unique`: nothing merges.
    pub unique: PolicyFigures,
    /// On `converge`: everything merges.
    pub converge: PolicyFigures,
    /// CPU per scanned page on `unique`.
    pub scan_ns_per_page: f64,
    /// CPU per merged page on `converge` (scans included).
    pub merge_ns_per_page: f64,
    /// Ours / kernel's, when the kernel ran: scan cost, merge cost, time
    /// to converge, CPU to converge.
    pub ratio_to_kernel: Option<BTreeMap<&'static str, f64>>,
}

/// The `vmm bench dedup` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DedupBenchReport {
    /// What was measured.
    pub bench: &'static str,
    /// Guest RAM of both guests (of each guest of a fleet).
    pub mem_bytes: u64,
    /// Guests of `converge` per run.
    pub guests: u32,
    /// The built-in policies' view.
    pub view: String,
    /// Runs per policy and guest.
    pub repeat: u32,
    /// Why the kernel policy did not run, if it did not.
    pub kernel_skipped: Option<String>,
    /// A bare view remap of one page (mmap of another frame and
    /// UFFDIO_CONTINUE, a share of one UFFDIO_REGISTER), median over the
    /// repeats, in ns (`vmm::view::uffd::bare_view_costs`).
    pub bare_remap_ns: f64,
    /// A bare view zap of one page (a share of one MADV_DONTNEED), median.
    pub bare_zap_ns: f64,
    /// What change-pte's merge may cost by issue 12's goal: range-flush's
    /// plus 1.1x (bare remap - bare zap), when both ran.
    pub change_pte_merge_limit_ns: Option<f64>,
    /// Per policy (the built-in ones, then `kernel`).
    pub policies: BTreeMap<String, PolicyResult>,
}

impl DedupBenchReport {
    /// Fills in [`Self::change_pte_merge_limit_ns`].
    fn with_merge_limit(mut self) -> Self {
        self.change_pte_merge_limit_ns = self
            .policies
            .get("range-flush")
            .filter(|_| self.policies.contains_key("change-pte"))
            .map(|rf| rf.merge_ns_per_page + 1.1 * (self.bare_remap_ns - self.bare_zap_ns));
        self
    }
}

/// What to run.
#[derive(Debug, Clone)]
pub struct DedupBenchConfig {
    /// Guest RAM.
    pub mem_bytes: u64,
    /// The built-in policies to measure.
    pub policies: Vec<DedupPolicy>,
    /// Runs per policy and guest.
    pub repeat: u32,
    /// Guests of `converge` per run (a fleet converging together when more
    /// than 1; `unique` always runs alone: its pages are the same in every
    /// guest, so a fleet of it would merge).
    pub guests: u32,
    /// Where each run's statistics go.
    pub out: PathBuf,
    /// Template for the child runs (image, policy and RAM are set per run).
    pub base: CompareConfig,
}

fn result(unique: Vec<Pass>, converge: Vec<Pass>) -> PolicyResult {
    let unique = figures(unique);
    let converge = figures(converge);
    let scan = unique.cpu_ns_per_scanned_page;
    // Per pass, then the median.
    let merge: Vec<u64> =
        converge.passes.iter().map(|p| (p.cpu_ns as f64 / p.pages_merged.max(1) as f64).round() as u64).collect();
    PolicyResult { scan_ns_per_page: scan, merge_ns_per_page: median(&merge), unique, converge, ratio_to_kernel: None }
}

/// Runs the benchmark; `progress` hears of each run.
pub fn bench_dedup(
    config: &DedupBenchConfig,
    progress: &mut dyn Progress,
) -> Result<DedupBenchReport, DedupBenchError> {
    std::fs::create_dir_all(&config.out)
        .map_err(|source| DedupBenchError::CreateDir { path: config.out.display().to_string(), source })?;
    let mut policies = config.policies.clone();
    let kernel_skipped = match HostKsmPaths::default().check_available() {
        Ok(()) => {
            policies.push(DedupPolicy::Kernel);
            None
        }
        Err(e) => {
            progress.note(&format!("kernel policy skipped: {e}"));
            Some(e.to_string())
        }
    };
    let mut passes: BTreeMap<(&str, &str), Vec<Pass>> = BTreeMap::new();
    let (mut remaps, mut zaps) = (Vec::new(), Vec::new());
    let total = config.repeat * 2 * policies.len() as u32;
    let mut done = 0;
    for repeat in 0..config.repeat {
        // The bare mechanisms of a view remap and zap, once per repeat,
        // interleaved with the runs they are set beside.
        let bare = bare_view_costs(BARE_PAGES).map_err(DedupBenchError::Bare)?;
        remaps.push(bare.remap_ns.round() as u64);
        zaps.push(bare.zap_ns.round() as u64);
        for image in ["unique", "converge"] {
            for &policy in &policies {
                let what = format!("running {image} under {} (repeat {}/{})", policy.name(), repeat + 1, config.repeat);
                progress.step(done, total, &what);
                done += 1;
                let pass = measure_pass(config, image, policy, repeat)?;
                passes.entry((policy.name(), image)).or_default().push(pass);
            }
        }
    }
    Ok(DedupBenchReport {
        bench: "dedup",
        mem_bytes: config.mem_bytes,
        guests: config.guests,
        view: config.base.view.name().to_string(),
        repeat: config.repeat,
        kernel_skipped,
        bare_remap_ns: median(&remaps),
        bare_zap_ns: median(&zaps),
        change_pte_merge_limit_ns: None,
        policies: results(&policies, &passes),
    }
    .with_merge_limit())
}

/// Runs `image` under `policy` once and returns its pass.
fn measure_pass(
    config: &DedupBenchConfig,
    image: &'static str,
    policy: DedupPolicy,
    repeat: u32,
) -> Result<Pass, DedupBenchError> {
    let run = CompareConfig {
        image: image.into(),
        mem_bytes: config.mem_bytes,
        policies: vec![policy],
        guests: if image == "converge" { config.guests } else { 1 },
        ..config.base.clone()
    };
    let path = config.out.join(format!("{image}-{}-{repeat}.json", policy.name()));
    let (status, stats) = run_once(&run, policy, &path)?;
    if status != 0 {
        return Err(DedupBenchError::Guest { image, policy: policy.name(), detail: stats.guest.end.detail });
    }
    let pass = pass_of(&stats)?;
    // A per-page cost over nothing would be a made-up figure.
    if pass.pages_scanned == 0 || (image == "converge" && pass.pages_merged == 0) {
        return Err(DedupBenchError::NothingCounted {
            image,
            policy: policy.name(),
            scanned: pass.pages_scanned,
            merged: pass.pages_merged,
        });
    }
    Ok(pass)
}

/// Each policy's figures from its passes, with its ratios to the kernel's
/// when the kernel ran.
fn results(policies: &[DedupPolicy], passes: &BTreeMap<(&str, &str), Vec<Pass>>) -> BTreeMap<String, PolicyResult> {
    let mut results: BTreeMap<String, PolicyResult> = policies
        .iter()
        .map(|p| {
            let take = |image| passes.get(&(p.name(), image)).cloned().unwrap_or_default();
            (p.name().to_string(), result(take("unique"), take("converge")))
        })
        .collect();
    if let Some(kernel) = results.get("kernel").cloned() {
        for (_, r) in results.iter_mut().filter(|(n, _)| n.as_str() != "kernel") {
            let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { f64::NAN };
            r.ratio_to_kernel = Some(BTreeMap::from([
                ("scan_ns_per_page", ratio(r.scan_ns_per_page, kernel.scan_ns_per_page)),
                ("merge_ns_per_page", ratio(r.merge_ns_per_page, kernel.merge_ns_per_page)),
                ("converge_wall", ratio(r.converge.wall_ns, kernel.converge.wall_ns)),
                ("converge_cpu", ratio(r.converge.cpu_ns, kernel.converge.cpu_ns)),
            ]));
        }
    }
    results
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pass(cpu: u64, scanned: u64, merged: u64) -> Pass {
        Pass { wall_ns: cpu, cpu_ns: cpu, pages_scanned: scanned, pages_merged: merged, ..Pass::default() }
    }

    #[test]
    fn scan_cost_comes_from_unique_and_merge_cost_from_converge() {
        // unique: 2 us per scanned page; converge: 11 ms for 1000 merges.
        let r = result(
            vec![pass(2_000_000, 1000, 0), pass(3_000_000, 1000, 0), pass(2_500_000, 1000, 0)],
            vec![pass(11_000_000, 3000, 1000)],
        );
        assert_eq!(r.scan_ns_per_page, 2500.0);
        assert_eq!(r.merge_ns_per_page, 11_000.0);
        assert_eq!(r.converge.pages_merged, 1000.0);
        assert_eq!(r.unique.passes.len(), 3);
    }
}
