//! `vmm compare`: one guest under several deduplication policies, side by
//! side.
//!
//! Each run is a child `vmm run --stats-json` (a fresh process per run: no
//! state carries over, and the `kernel` policy's /proc/self/ksm_stat is the
//! run's own). Runs are interleaved, repeat by repeat (off, change-pte, ...,
//! off, change-pte, ...), so that a drift of the machine spreads over every
//! policy. The result is a table on standard output, DIR/compare.json
//! ([`summary::CompareReport`]) and DIR/compare.svg ([`crate::chart`]).

pub mod summary;
pub mod table;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::chart::{ChartData, PolicySeries, Spread};
use crate::host_ksm::HostKsmPaths;
use crate::stats::RunStats;
use crate::view::ViewKind;
use crate::vm::DedupPolicy;
use summary::{build_report, CompareReport, RunRecord, Setup, Skipped};

/// Errors of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The output directory or a file in it could not be written.
    #[error("cannot write {path}: {source}")]
    Write {
        /// The file or directory.
        path: String,
        /// The OS error.
        source: std::io::Error,
    },
    /// A child `vmm run` could not be started or its statistics read.
    #[error("{0}")]
    Run(String),
    /// No policy could run.
    #[error("no policy could run: {0}")]
    Nothing(String),
    /// The charts could not be drawn.
    #[error(transparent)]
    Chart(#[from] crate::chart::ChartError),
}

/// What to compare.
#[derive(Debug, Clone)]
pub struct CompareConfig {
    /// Image name or path (as `vmm run` takes it).
    pub image: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The policies, in order.
    pub policies: Vec<DedupPolicy>,
    /// Runs per policy.
    pub repeat: u32,
    /// Output directory.
    pub out: PathBuf,
    /// The view of the built-in policies.
    pub view: ViewKind,
    /// Per-run timeout in seconds.
    pub timeout_secs: f64,
    /// The deduplicator's knobs.
    pub knobs: ksm::KsmKnobs,
    /// The KVM device.
    pub kvm_device: PathBuf,
    /// The `vmm` executable to run (normally this one).
    pub vmm: PathBuf,
}

fn knob_map(k: &ksm::KsmKnobs) -> std::collections::BTreeMap<String, u64> {
    [
        ("run", u64::from(k.run)),
        ("pages_to_scan", u64::from(k.pages_to_scan)),
        ("sleep_millisecs", u64::from(k.sleep_millisecs)),
        ("max_page_sharing", u64::from(k.max_page_sharing)),
        ("use_zero_pages", u64::from(k.use_zero_pages)),
        ("smart_scan", u64::from(k.smart_scan)),
    ]
    .into_iter()
    .map(|(n, v)| (n.to_string(), v))
    .collect()
}

fn host_setup(config: &CompareConfig) -> Setup {
    let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
    Setup {
        image: config.image.clone(),
        mem_bytes: config.mem_bytes,
        view: config.view.name().to_string(),
        repeat: config.repeat,
        knobs: knob_map(&config.knobs),
        kernel: read("/proc/sys/kernel/osrelease"),
        host: read("/proc/sys/kernel/hostname"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    }
}

/// Runs one child `vmm run` of `config.image` under `policy` and reads its
/// statistics: (exit status, statistics), or why there are none.
pub fn run_once(config: &CompareConfig, policy: DedupPolicy, stats_path: &Path) -> Result<(i32, RunStats), String> {
    let k = &config.knobs;
    let output = Command::new(&config.vmm)
        .arg("--kvm")
        .arg(&config.kvm_device)
        .arg("run")
        .arg(&config.image)
        .args(["--mem", &config.mem_bytes.to_string()])
        .args(["--dedup", policy.name(), "--view", config.view.name()])
        .args(["--timeout", &config.timeout_secs.to_string()])
        .args(["--ksm-run", &k.run.to_string(), "--pages-to-scan", &k.pages_to_scan.to_string()])
        .args(["--sleep-millisecs", &k.sleep_millisecs.to_string()])
        .args(["--max-page-sharing", &k.max_page_sharing.to_string()])
        .args(["--use-zero-pages", &u8::from(k.use_zero_pages).to_string()])
        .args(["--smart-scan", &u8::from(k.smart_scan).to_string()])
        .arg("--no-table")
        .arg("--stats-json")
        .arg(stats_path)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .map_err(|e| format!("cannot start {}: {e}", config.vmm.display()))?;
    let status = output.status.code().unwrap_or(-1);
    let stderr = String::from_utf8_lossy(&output.stderr);
    let last = stderr.lines().last().unwrap_or("").trim();
    // 0 and 1: the guest ran and ended; 3: it ended abnormally, with statistics.
    if !matches!(status, 0 | 1 | 3) {
        return Err(format!("{} (exit status {status})", if last.is_empty() { "vmm run failed" } else { last }));
    }
    let text = std::fs::read_to_string(stats_path)
        .map_err(|e| format!("no statistics from the run ({e}); it said: {last}"))?;
    let stats: RunStats = serde_json::from_str(&text).map_err(|e| format!("unreadable statistics: {e}"))?;
    Ok((status, stats))
}

/// Runs the comparison; `progress` gets one line per run.
pub fn compare(config: &CompareConfig, progress: &mut dyn FnMut(&str)) -> Result<CompareReport, CompareError> {
    let write_err = |path: &Path| {
        let path = path.display().to_string();
        move |source| CompareError::Write { path, source }
    };
    std::fs::create_dir_all(&config.out).map_err(write_err(&config.out))?;
    let setup = host_setup(config);
    let mut skipped = Vec::new();
    let mut policies = Vec::new();
    for &p in &config.policies {
        if p == DedupPolicy::Kernel {
            if let Err(e) = HostKsmPaths::default().check_available() {
                progress(&format!("kernel policy skipped: {e}"));
                skipped.push(Skipped { policy: p.name().into(), reason: e.to_string() });
                continue;
            }
        }
        policies.push(p);
    }
    let runs_dir = config.out.join("runs");
    std::fs::create_dir_all(&runs_dir).map_err(write_err(&runs_dir))?;
    let mut runs = Vec::new();
    let total = policies.len() as u32 * config.repeat;
    let mut n = 0;
    for repeat in 0..config.repeat {
        for &policy in &policies {
            if skipped.iter().any(|s| s.policy == policy.name()) {
                continue;
            }
            n += 1;
            let path = runs_dir.join(format!("{}-{repeat}.json", policy.name()));
            let start = Instant::now();
            match run_once(config, policy, &path) {
                Ok((status, stats)) => {
                    progress(&format!(
                        "run {n}/{total}: {:<11} repeat {}/{}: {} in {:.2} s",
                        policy.name(),
                        repeat + 1,
                        config.repeat,
                        stats.guest.end.reason,
                        start.elapsed().as_secs_f64()
                    ));
                    runs.push(RunRecord { policy: policy.name().into(), repeat, status, stats });
                }
                Err(e) if repeat == 0 => {
                    // A policy that cannot run at all is skipped, the others go on.
                    progress(&format!("{} skipped: {e}", policy.name()));
                    skipped.push(Skipped { policy: policy.name().into(), reason: e });
                }
                Err(e) => return Err(CompareError::Run(format!("{} repeat {}: {e}", policy.name(), repeat + 1))),
            }
        }
    }
    let ran: Vec<String> =
        policies.iter().map(|p| p.name().to_string()).filter(|p| !skipped.iter().any(|s| &s.policy == p)).collect();
    if ran.is_empty() {
        let why = skipped.iter().map(|s| format!("{}: {}", s.policy, s.reason)).collect::<Vec<_>>().join("; ");
        return Err(CompareError::Nothing(why));
    }
    let report = build_report(setup, ran, skipped, runs);
    let json_path = config.out.join("compare.json");
    let json = serde_json::to_vec_pretty(&report).map_err(|e| CompareError::Run(e.to_string()))?;
    std::fs::write(&json_path, json).map_err(write_err(&json_path))?;
    crate::chart::write_svg(&config.out.join("compare.svg"), &chart_data(&report))?;
    Ok(report)
}

/// The charts' figures: exits and wall time per phase per policy.
pub fn chart_data(report: &CompareReport) -> ChartData {
    let spread = |p: &summary::PhaseSummary, name: &str, policy: &str, scale: f64| {
        p.figures.get(name).and_then(|by| by.get(policy)).map_or(Spread::default(), |s| Spread {
            median: s.median / scale,
            min: s.min as f64 / scale,
            max: s.max as f64 / scale,
        })
    };
    let s = &report.setup;
    ChartData {
        title: format!(
            "{}, {} RAM, {} view, median of {} run(s) per policy; exits as the host KVM counts them",
            s.image,
            crate::size::format_size(s.mem_bytes),
            s.view,
            s.repeat
        ),
        phases: report.phases.iter().map(|p| p.phase.unwrap_or(0)).collect(),
        series: report
            .policies
            .iter()
            .map(|policy| PolicySeries {
                policy: policy.clone(),
                exits: report
                    .phases
                    .iter()
                    .map(|p| {
                        // The host KVM counts every exit, also those it serves
                        // itself (all of the kernel policy's faults).
                        let name = if p.figures.contains_key("kvm.exits") { "kvm.exits" } else { "exits.total" };
                        spread(p, name, policy, 1.0)
                    })
                    .collect(),
                wall_ms: report.phases.iter().map(|p| spread(p, "wall_ns", policy, 1e6)).collect(),
            })
            .collect(),
    }
}
