//! `vmm compare`: one guest under several deduplication policies, side by
//! side.
//!
//! Each run is a child `vmm run --stats-json` (a fresh process per run: no
//! state carries over, and the `kernel` policy's /proc/self/ksm_stat is the
//! run's own). Runs are interleaved, repeat by repeat (off, change-pte, ...,
//! off, change-pte, ...), so that a drift of the machine spreads over every
//! policy. The result is a table on standard output ([`table`]),
//! DIR/compare.json ([`summary::CompareReport`], folded from the runs by
//! [`fold`]) and DIR/compare.svg ([`crate::chart`]).
//!
//! A child never outlives `vmm compare`, and SIGINT or SIGTERM sent to it is
//! passed on to the running child (see `child`).
//!
//! DIR is the comparison's own: a directory that is not empty is refused
//! unless an earlier comparison marked it ([`OUT_MARKER`]), and then
//! emptied first, so its files are always those of one comparison.

mod child;
mod child_run;
pub mod fold;
mod levels;
pub mod projection;
pub mod summary;
pub mod table;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{SystemTime, UNIX_EPOCH};

use vmm::dedup::HostKsmPaths;
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

use crate::progress::Progress;
pub use child_run::{run_once, RunError};
use fold::build_report;
pub use levels::{kvm_level_stats, LevelsError};
use summary::{CompareReport, FailedRun, RunRecord, Setup, Skipped};
use vmm::error_chain;

/// One comparison at a time per process: the signal forwarding is global.
static ACTIVE: Mutex<()> = Mutex::new(());

/// The file that marks a directory as a comparison's output.
pub const OUT_MARKER: &str = ".vmm-compare";

/// Errors of a comparison.
#[derive(Debug, thiserror::Error)]
pub enum CompareError {
    /// The output directory or a file in it could not be written.
    #[error("cannot write {path}")]
    Write {
        /// The file or directory.
        path: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The host KVM's level statistics could not be read.
    #[error(transparent)]
    Levels(#[from] LevelsError),
    /// The handlers that pass SIGINT and SIGTERM on to the child could not
    /// be installed.
    #[error("cannot install the signal handlers")]
    Signals(#[source] std::io::Error),
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
    /// compare.json could not be encoded.
    #[error("cannot encode compare.json")]
    Json(#[source] serde_json::Error),
    /// The charts could not be drawn.
    #[error(transparent)]
    Chart(#[from] crate::chart::ChartError),
    /// A cost profile could not be loaded.
    #[error(transparent)]
    Profile(#[from] crate::cost::ProfileError),
    /// --project was given without the `off` policy.
    #[error("--project needs the off policy: its runs are the guest's own time")]
    ProjectionWithoutOff,
    /// --out names a directory with files that are not a comparison's.
    #[error("--out {0} is not empty and holds no earlier comparison ({OUT_MARKER}): give an empty or new directory")]
    NotOurs(String),
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
    /// Guests per run (a fleet when more than 1).
    pub guests: u32,
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
    /// Cost profiles to project every policy onto (`--project`).
    pub profiles: Vec<crate::cost::CostProfile>,
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
        guests: config.guests,
        knobs: knob_map(&config.knobs),
        kernel: read("/proc/sys/kernel/osrelease"),
        host: read("/proc/sys/kernel/hostname"),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get()),
        started_unix: SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()),
    }
}

/// Makes `dir` this comparison's: created, or emptied when an earlier
/// comparison marked it; refused when it holds anything else.
pub fn prepare_out(dir: &Path) -> Result<(), CompareError> {
    let write = |source| CompareError::Write { path: dir.display().to_string(), source };
    match std::fs::read_dir(dir) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => create_dir(dir)?,
        Err(e) => return Err(write(e)),
        Ok(entries) => {
            let entries: Vec<_> = entries.collect::<Result<_, _>>().map_err(write)?;
            let ours = entries.iter().any(|e| e.file_name() == OUT_MARKER);
            if !entries.is_empty() && !ours {
                return Err(CompareError::NotOurs(dir.display().to_string()));
            }
            for e in entries {
                let path = e.path();
                let removed = if e.file_type().map_err(write)?.is_dir() {
                    std::fs::remove_dir_all(&path)
                } else {
                    std::fs::remove_file(&path)
                };
                removed.map_err(|source| CompareError::Write { path: path.display().to_string(), source })?;
            }
        }
    }
    std::fs::write(dir.join(OUT_MARKER), "vmm compare output: the next comparison into it replaces it whole\n")
        .map_err(write)
}

/// Runs the comparison; `progress` hears of each run and of every run or
/// policy that could not be counted.
///
/// A run that fails after the first repeat of its policy (even without
/// statistics: a setup error, a signal) is recorded in `failed_runs` and the
/// comparison goes on; a policy whose first run fails is skipped. SIGINT or
/// SIGTERM is passed on to the running child; once it has ended, the
/// comparison stops and the signal is raised again.
pub fn compare(config: &CompareConfig, progress: &mut dyn Progress) -> Result<CompareReport, CompareError> {
    prepare_out(&config.out)?;
    let kvm_levels = kvm_level_stats(&config.kvm_device)?;
    compare_with(config, &kvm_levels, progress)
}

/// [`compare`] with the host KVM's level statistics already known.
fn compare_with(
    config: &CompareConfig,
    kvm_levels: &BTreeSet<String>,
    progress: &mut dyn Progress,
) -> Result<CompareReport, CompareError> {
    let _one = ACTIVE.lock().unwrap_or_else(PoisonError::into_inner);
    let forwarding = child::Forwarding::install().map_err(CompareError::Signals)?;
    let result = run_all(config, kvm_levels, progress);
    if let Some(sig) = forwarding.finish() {
        child::raise(sig);
    }
    result
}

/// Creates `dir` and its parents.
fn create_dir(dir: &Path) -> Result<(), CompareError> {
    std::fs::create_dir_all(dir).map_err(|source| CompareError::Write { path: dir.display().to_string(), source })
}

/// Runs every policy `config.repeat` times, repeat by repeat, and writes
/// the document and the charts.
fn run_all(
    config: &CompareConfig,
    kvm_levels: &BTreeSet<String>,
    progress: &mut dyn Progress,
) -> Result<CompareReport, CompareError> {
    create_dir(&config.out)?;
    let setup = host_setup(config);
    let (policies, skipped) = runnable_policies(&config.policies, progress);
    let mut tally = Tally::new(config, policies.len() as u32 * config.repeat, skipped);
    create_dir(&tally.runs_dir)?;
    for repeat in 0..config.repeat {
        for &policy in &policies {
            if tally.is_skipped(policy) {
                continue;
            }
            tally.check_interrupted(progress)?;
            tally.run(config, policy, repeat, progress);
        }
    }
    tally.check_interrupted(progress)?;
    let ran: Vec<String> = policies.iter().filter(|&&p| !tally.is_skipped(p)).map(|p| p.name().to_string()).collect();
    if ran.is_empty() {
        let why: Vec<String> = tally.skipped.iter().map(|s| format!("{}: {}", s.policy, s.reason)).collect();
        return Err(CompareError::Nothing(why.join("; ")));
    }
    let mut report = build_report(setup, ran, tally.skipped, tally.runs, tally.failures, kvm_levels);
    report.projection = projection::project_report(&report, &config.profiles);
    write_outputs(&config.out, &report)?;
    Ok(report)
}

/// The policies to run, in order, and those skipped up front: `kernel`
/// when the host's KSM is not available.
fn runnable_policies(policies: &[DedupPolicy], progress: &mut dyn Progress) -> (Vec<DedupPolicy>, Vec<Skipped>) {
    let mut skipped = Vec::new();
    let mut runnable = Vec::new();
    for &p in policies {
        if p == DedupPolicy::Kernel {
            if let Err(e) = HostKsmPaths::default().check_available() {
                progress.note(&format!("kernel policy skipped: {e}"));
                skipped.push(Skipped { policy: p.name().into(), reason: e.to_string() });
                continue;
            }
        }
        runnable.push(p);
    }
    (runnable, skipped)
}

/// DIR/compare.json, DIR/summary.json (the same without its runs: what
/// reports are made from, small enough to keep) and DIR/compare.svg.
fn write_outputs(out: &Path, report: &CompareReport) -> Result<(), CompareError> {
    for (name, doc) in [("compare.json", report), ("summary.json", &crate::report::summary_of(report))] {
        let path = out.join(name);
        let json = serde_json::to_vec_pretty(doc).map_err(CompareError::Json)?;
        std::fs::write(&path, json)
            .map_err(|source| CompareError::Write { path: path.display().to_string(), source })?;
    }
    crate::chart::write_svg(&out.join("compare.svg"), &crate::chart::ChartData::of(&[report]))?;
    Ok(())
}

/// The runs of a comparison so far: what each gave, and which policies
/// were skipped and why.
struct Tally {
    /// Where each run's statistics go.
    runs_dir: PathBuf,
    runs: Vec<RunRecord>,
    failures: Vec<FailedRun>,
    skipped: Vec<Skipped>,
    /// Runs made, and runs planned.
    done: u32,
    total: u32,
}

impl Tally {
    fn new(config: &CompareConfig, total: u32, skipped: Vec<Skipped>) -> Self {
        let runs_dir = config.out.join("runs");
        Self { runs_dir, runs: Vec::new(), failures: Vec::new(), skipped, done: 0, total }
    }

    fn is_skipped(&self, policy: DedupPolicy) -> bool {
        self.skipped.iter().any(|s| s.policy == policy.name())
    }

    /// An error once SIGINT or SIGTERM came (the running child got it too).
    fn check_interrupted(&self, progress: &mut dyn Progress) -> Result<(), CompareError> {
        let Some(sig) = child::pending() else {
            return Ok(());
        };
        let (signal, done, total) = (child::name_of(sig), self.done, self.total);
        progress.note(&format!(
            "interrupted by {signal} after {done} of {total} runs; their statistics are in {}",
            self.runs_dir.display()
        ));
        Err(CompareError::Interrupted { signal, done, total })
    }

    /// Makes one run and records what it gave.
    fn run(&mut self, config: &CompareConfig, policy: DedupPolicy, repeat: u32, progress: &mut dyn Progress) {
        let path = self.runs_dir.join(format!("{}-{repeat}.json", policy.name()));
        let name = policy.name();
        let line = format!("{name} repeat {}/{}", repeat + 1, config.repeat);
        progress.step(self.done, self.total, &format!("running {line}"));
        self.done += 1;
        match run_once(config, policy, &path) {
            Ok((status, stats)) => {
                if stats.guest.exit_code != Some(0) {
                    progress.note(&format!("{line}: {}", stats.guest.end.detail));
                }
                self.runs.push(RunRecord { policy: name.into(), repeat, status, stats });
            }
            Err(e) if repeat == 0 => {
                // A policy that cannot run at all is skipped, the others go on.
                let reason = error_chain(&e);
                progress.note(&format!("{name} skipped: {reason}"));
                self.skipped.push(Skipped { policy: name.into(), reason });
            }
            Err(e) => {
                // It ran before: a failure of this run, listed and not counted.
                let detail = error_chain(&e);
                progress.note(&format!("{line}: failed: {detail}"));
                self.failures.push(FailedRun { policy: name.into(), repeat, detail });
            }
        }
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
        let canned = fold::tests::run("off", 0, 1, vec![7]).stats;
        let canned = serde_json::to_string(&canned).expect("json");
        std::fs::write(dir.join("stats.json"), &canned).expect("write");
        // What an earlier comparison left: not the statistics of this one's run.
        std::fs::write(dir.join("out/runs/off-2.json"), &canned).expect("write");
        std::fs::write(dir.join("out").join(OUT_MARKER), "").expect("mark");
        prepare_out(&dir.join("out")).expect("an earlier comparison's directory is taken back");
        assert!(!dir.join("out/runs").exists(), "emptied");
        let config = CompareConfig {
            image: "pagefill".into(),
            mem_bytes: 8 << 20,
            policies: vec![DedupPolicy::Off, DedupPolicy::ChangePte, DedupPolicy::Legacy],
            repeat: 3,
            guests: 1,
            out: dir.join("out"),
            view: ViewKind::Memslot,
            timeout_secs: 10.0,
            knobs: ksm::KsmKnobs::default(),
            kvm_device: "/nonexistent/kvm".into(),
            vmm: fake_vmm(&dir),
            profiles: Vec::new(),
        };
        let r = compare_with(&config, &BTreeSet::new(), &mut |_: &str| {}).expect("the comparison goes on");
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

    #[test]
    fn an_out_directory_that_is_not_a_comparisons_is_refused_and_left_alone() {
        let dir = std::env::temp_dir().join(format!("vmm-compare-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mkdir");
        std::fs::write(dir.join("thesis.tex"), "precious").expect("write");
        let err = prepare_out(&dir).expect_err("not ours");
        assert!(matches!(err, CompareError::NotOurs(_)), "{err}");
        assert_eq!(std::fs::read_to_string(dir.join("thesis.tex")).expect("kept"), "precious");
        std::fs::remove_file(dir.join("thesis.tex")).expect("rm");
        prepare_out(&dir).expect("an empty directory is taken");
        assert!(dir.join(OUT_MARKER).exists());
        std::fs::write(dir.join("compare.json"), "{}").expect("write");
        std::fs::create_dir_all(dir.join("runs")).expect("mkdir");
        prepare_out(&dir).expect("ours again");
        let left: Vec<_> = std::fs::read_dir(&dir).expect("dir").flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, [std::ffi::OsString::from(OUT_MARKER)], "the earlier output is replaced whole");
        std::fs::remove_dir_all(&dir).ok();
    }
}
