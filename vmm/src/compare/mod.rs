//! `vmm compare`: one guest under several deduplication policies, side by
//! side.
//!
//! Each run is a child `vmm run --stats-json` (a fresh process per run: no
//! state carries over, and the `kernel` policy's /proc/self/ksm_stat is the
//! run's own). Runs are interleaved, repeat by repeat (off, change-pte, ...,
//! off, change-pte, ...), so that a drift of the machine spreads over every
//! policy. The result is a table on standard output, DIR/compare.json
//! ([`summary::CompareReport`]) and DIR/compare.svg ([`crate::chart`]).
//!
//! A child never outlives `vmm compare`, and SIGINT or SIGTERM sent to it is
//! passed on to the running child (see `child`).

mod child;
pub mod summary;
pub mod table;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use crate::chart::{ChartData, PolicySeries, Spread};
use crate::dedup::HostKsmPaths;
use crate::kvm_stats::KvmStats;
use crate::stats::RunStats;
use crate::view::ViewKind;
use crate::vm::DedupPolicy;
use summary::{build_report, CompareReport, FailedRun, RunRecord, Setup, Skipped};

/// One comparison at a time per process: the signal forwarding is global.
static ACTIVE: Mutex<()> = Mutex::new(());

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
    /// SIGINT or SIGTERM ended the comparison early (the running child was
    /// passed the signal and ended first).
    #[error("interrupted by {signal} after {done} of {total} runs; no compare.json written")]
    Interrupted {
        /// The signal's name.
        signal: String,
        /// Runs made (the interrupted one included).
        done: u32,
        /// Runs planned.
        total: u32,
    },
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
/// statistics: (exit status, statistics), or why there are none (exit status
/// or signal, and the last line of the child's standard error).
///
/// The child ends when this process dies (PR_SET_PDEATHSIG), and gets the
/// SIGINT or SIGTERM this process receives while [`compare`] runs.
pub fn run_once(config: &CompareConfig, policy: DedupPolicy, stats_path: &Path) -> Result<(i32, RunStats), String> {
    let k = &config.knobs;
    let mut cmd = Command::new(&config.vmm);
    cmd.arg("--kvm")
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
        .arg(stats_path);
    // A file an earlier comparison left there is not this run's statistics.
    let _ = std::fs::remove_file(stats_path);
    let ended = child::run(cmd).map_err(|e| format!("cannot start {}: {e}", config.vmm.display()))?;
    let last = ended.last_line();
    let said = if last.is_empty() { String::new() } else { format!(": {last}") };
    // 0 and 1: the guest ran and ended; 3: it ended abnormally, with statistics.
    let status = match ended.status.code() {
        Some(s @ (0 | 1 | 3)) => s,
        _ => return Err(format!("{}{said}", child::describe(ended.status))),
    };
    let text = std::fs::read_to_string(stats_path)
        .map_err(|e| format!("exit status {status} but no statistics ({e}){said}"))?;
    let stats: RunStats = serde_json::from_str(&text).map_err(|e| format!("unreadable statistics: {e}"))?;
    Ok((status, stats))
}

/// The host KVM's scalar statistics that are levels (KVM_STATS_TYPE_INSTANT
/// or _PEAK: a run reports their value, and only when they changed) rather
/// than cumulative counters, under the names a run's `kvm` section uses
/// (a vCPU statistic also as `vcpu.<name>`, the name a run gives it when a
/// VM statistic has the same name). Read from a throwaway VM and vCPU.
pub fn kvm_level_stats(kvm_device: &Path) -> Result<BTreeSet<String>, String> {
    let what = |e: &dyn std::fmt::Display| format!("cannot read the host KVM's statistics descriptors: {e}");
    let kvm = crate::vm::open_kvm(kvm_device).map_err(|e| e.to_string())?;
    let vm = kvm.create_vm().map_err(|e| what(&format!("KVM_CREATE_VM: {e}")))?;
    let vcpu = vm.create_vcpu(0).map_err(|e| what(&format!("KVM_CREATE_VCPU: {e}")))?;
    let levels_of = |stats: KvmStats| -> Vec<String> { stats.level_names().map(str::to_string).collect() };
    let mut levels: BTreeSet<String> = levels_of(KvmStats::open(&vm).map_err(|e| what(&e))?).into_iter().collect();
    for name in levels_of(KvmStats::open(&vcpu).map_err(|e| what(&e))?) {
        levels.insert(format!("vcpu.{name}"));
        levels.insert(name);
    }
    Ok(levels)
}

/// Runs the comparison; `progress` gets one line per run.
///
/// A run that fails after the first repeat of its policy (even without
/// statistics: a setup error, a signal) is recorded in `failed_runs` and the
/// comparison goes on; a policy whose first run fails is skipped. SIGINT or
/// SIGTERM is passed on to the running child; once it has ended, the
/// comparison stops and the signal is raised again.
pub fn compare(config: &CompareConfig, progress: &mut dyn FnMut(&str)) -> Result<CompareReport, CompareError> {
    let kvm_levels = kvm_level_stats(&config.kvm_device).map_err(CompareError::Run)?;
    compare_with(config, &kvm_levels, progress)
}

/// [`compare`] with the host KVM's level statistics already known.
fn compare_with(
    config: &CompareConfig,
    kvm_levels: &BTreeSet<String>,
    progress: &mut dyn FnMut(&str),
) -> Result<CompareReport, CompareError> {
    let _one = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner);
    let forwarding = child::Forwarding::install()
        .map_err(|e| CompareError::Run(format!("cannot install the signal handlers: {e}")))?;
    let result = run_all(config, kvm_levels, progress);
    if let Some(sig) = forwarding.finish() {
        child::raise(sig);
    }
    result
}

fn run_all(
    config: &CompareConfig,
    kvm_levels: &BTreeSet<String>,
    progress: &mut dyn FnMut(&str),
) -> Result<CompareReport, CompareError> {
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
    let mut failures = Vec::new();
    let total = policies.len() as u32 * config.repeat;
    let mut n = 0;
    let interrupted = |done: u32, progress: &mut dyn FnMut(&str)| {
        let signal = child::name_of(child::pending()?);
        progress(&format!(
            "interrupted by {signal} after {done} of {total} runs; their statistics are in {}",
            runs_dir.display()
        ));
        Some(CompareError::Interrupted { signal, done, total })
    };
    for repeat in 0..config.repeat {
        for &policy in &policies {
            if skipped.iter().any(|s| s.policy == policy.name()) {
                continue;
            }
            if let Some(e) = interrupted(n, progress) {
                return Err(e);
            }
            n += 1;
            let path = runs_dir.join(format!("{}-{repeat}.json", policy.name()));
            let start = Instant::now();
            let line = format!("run {n}/{total}: {:<11} repeat {}/{}", policy.name(), repeat + 1, config.repeat);
            match run_once(config, policy, &path) {
                Ok((status, stats)) => {
                    let took = start.elapsed().as_secs_f64();
                    progress(&format!("{line}: {} in {took:.2} s", stats.guest.end.reason));
                    runs.push(RunRecord { policy: policy.name().into(), repeat, status, stats });
                }
                Err(e) if repeat == 0 => {
                    // A policy that cannot run at all is skipped, the others go on.
                    progress(&format!("{} skipped: {e}", policy.name()));
                    skipped.push(Skipped { policy: policy.name().into(), reason: e });
                }
                Err(detail) => {
                    // It ran before: a failure of this run, listed and not counted.
                    progress(&format!("{line}: failed: {detail}"));
                    failures.push(FailedRun { policy: policy.name().into(), repeat, detail });
                }
            }
        }
    }
    if let Some(e) = interrupted(n, progress) {
        return Err(e);
    }
    let ran: Vec<String> =
        policies.iter().map(|p| p.name().to_string()).filter(|p| !skipped.iter().any(|s| &s.policy == p)).collect();
    if ran.is_empty() {
        let why = skipped.iter().map(|s| format!("{}: {}", s.policy, s.reason)).collect::<Vec<_>>().join("; ");
        return Err(CompareError::Nothing(why));
    }
    let report = build_report(setup, ran, skipped, runs, failures, kvm_levels);
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    const SETUP_ERROR: &str = "vmm: error: cannot map guest RAM: out of memory";

    /// A stand-in for `vmm run` (no KVM): it copies canned statistics to
    /// --stats-json, except that its second `legacy` run fails at setup
    /// (status 2), its second `change-pte` run is killed by SIGKILL and its
    /// third `off` run ends with status 3 and writes nothing.
    fn fake_vmm(dir: &Path) -> PathBuf {
        let d = dir.display();
        let script = format!(
            r#"#!/bin/sh
while [ $# -gt 0 ]; do
  case "$1" in --dedup) policy=$2 ;; --stats-json) out=$2 ;; esac
  shift
done
count="{d}/count-$policy"
n=$(( $(cat "$count" 2>/dev/null || echo 0) + 1 ))
echo $n > "$count"
if [ $n -eq 2 ] && [ "$policy" = legacy ]; then echo starting >&2; echo "{SETUP_ERROR}" >&2; exit 2; fi
if [ $n -eq 2 ] && [ "$policy" = change-pte ]; then kill -KILL $$; fi
if [ $n -eq 3 ] && [ "$policy" = off ]; then exit 3; fi
cp "{d}/stats.json" "$out"
"#
        );
        let path = dir.join("fake-vmm");
        std::fs::write(&path, script).expect("write the fake vmm");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    }

    #[test]
    fn a_child_that_fails_after_its_first_run_is_a_failed_run_and_the_comparison_goes_on() {
        let dir = std::env::temp_dir().join(format!("vmm-compare-unit-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("out/runs")).expect("mkdir");
        let canned = summary::tests::run("off", 0, 1, vec![7]).stats;
        let canned = serde_json::to_string(&canned).expect("json");
        std::fs::write(dir.join("stats.json"), &canned).expect("write");
        // What an earlier comparison left: not the statistics of this one's run.
        std::fs::write(dir.join("out/runs/off-2.json"), &canned).expect("write");
        let config = CompareConfig {
            image: "pagefill".into(),
            mem_bytes: 8 << 20,
            policies: vec![DedupPolicy::Off, DedupPolicy::ChangePte, DedupPolicy::Legacy],
            repeat: 3,
            out: dir.join("out"),
            view: ViewKind::Memslot,
            timeout_secs: 10.0,
            knobs: ksm::KsmKnobs::default(),
            kvm_device: "/nonexistent/kvm".into(),
            vmm: fake_vmm(&dir),
        };
        let r = compare_with(&config, &BTreeSet::new(), &mut |_| {}).expect("the comparison goes on");
        assert_eq!(r.policies, ["off", "change-pte", "legacy"]);
        assert!(r.skipped.is_empty(), "{:?}", r.skipped);
        let killed = format!("change-pte #1: killed by SIGKILL (signal {})", libc::SIGKILL);
        assert_eq!(r.failed_runs.len(), 3, "{:?}", r.failed_runs);
        assert_eq!(r.failed_runs[0], killed);
        assert_eq!(r.failed_runs[1], format!("legacy #1: exit status 2: {SETUP_ERROR}"));
        assert!(r.failed_runs[2].starts_with("off #2: exit status 3 but no statistics"), "{:?}", r.failed_runs);
        assert_eq!(r.runs.len(), 3 * 3 - 3);
        // Failed runs are not counted.
        let counted = |p: &str| r.total.figures["exits.io"][p].values.len();
        assert_eq!((counted("off"), counted("change-pte"), counted("legacy")), (2, 2, 2));
        let written: CompareReport =
            serde_json::from_str(&std::fs::read_to_string(dir.join("out/compare.json")).expect("compare.json"))
                .expect("parse");
        assert_eq!(written, r);
        std::fs::remove_dir_all(&dir).ok();
    }
}
