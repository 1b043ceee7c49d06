//! The comparison document: every run's statistics, and per phase each
//! figure's median and spread over the repeats, per policy, with its
//! difference from `off` (schema [`COMPARE_SCHEMA`] version
//! [`COMPARE_VERSION`], documented in README.md).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::stats::{Figures, RunStats};

/// Name of the comparison schema.
pub const COMPARE_SCHEMA: &str = "vmm-compare";
/// Version of the comparison schema.
pub const COMPARE_VERSION: u32 = 1;

/// A figure over the repeats of one policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    /// Median (the mean of the middle two for an even count).
    pub median: f64,
    /// Smallest value.
    pub min: u64,
    /// Largest value.
    pub max: u64,
    /// Every value, in repeat order.
    pub values: Vec<u64>,
    /// `median` minus `off`'s median; None for `off` itself or without `off`.
    pub diff_from_off: Option<f64>,
}

/// One phase (or the whole run): figure name -> policy -> summary.
///
/// Figure names are `exits.<reason>`, `shadow_mmu.<name>`, `ksm.<name>`,
/// `kvm.<name>` and `wall_ns`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSummary {
    /// The guest's phase number; None for the whole run.
    pub phase: Option<u32>,
    /// The figures.
    pub figures: BTreeMap<String, BTreeMap<String, Summary>>,
}

/// A policy that did not run, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// The policy.
    pub policy: String,
    /// Why (one line).
    pub reason: String,
}

/// One run of the comparison.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunRecord {
    /// The policy.
    pub policy: String,
    /// The repeat (0-based); runs were made repeat by repeat, policies interleaved.
    pub repeat: u32,
    /// `vmm run`'s exit status.
    pub status: i32,
    /// Its statistics (schema 1).
    pub stats: RunStats,
}

/// Where and how the comparison ran.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Setup {
    /// Image name or path.
    pub image: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// The view of the built-in policies (`kernel` always uses one memslot).
    pub view: String,
    /// Runs per policy.
    pub repeat: u32,
    /// The deduplicator knobs, by their sysfs names.
    pub knobs: BTreeMap<String, u64>,
    /// `uname -r` of the host.
    pub kernel: String,
    /// The host's name.
    pub host: String,
    /// Logical CPUs online.
    pub cpus: usize,
    /// When the comparison started (seconds since the Unix epoch, UTC).
    pub started_unix: u64,
}

/// The document `vmm compare` writes to DIR/compare.json.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CompareReport {
    /// [`COMPARE_SCHEMA`].
    pub schema: String,
    /// [`COMPARE_VERSION`].
    pub version: u32,
    /// How it ran.
    pub setup: Setup,
    /// The policies that ran, in the order given.
    pub policies: Vec<String>,
    /// Policies that could not run.
    pub skipped: Vec<Skipped>,
    /// Whether every run of every policy reported what the first run of
    /// the reference policy (`off` if it ran) reported.
    pub reports_identical: bool,
    /// Runs whose reports differ from the reference, as "policy #repeat".
    pub report_mismatches: Vec<String>,
    /// Runs that did not end with the guest's exit code 0, as "policy #repeat: detail".
    pub failed_runs: Vec<String>,
    /// Per phase, in the order the reference run took them.
    pub phases: Vec<PhaseSummary>,
    /// The whole run.
    pub total: PhaseSummary,
    /// Every run, raw.
    pub runs: Vec<RunRecord>,
}

/// Every figure of `f` under its flat name.
pub fn flatten(f: &Figures) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for (name, v) in f.exits.columns() {
        out.insert(format!("exits.{name}"), v);
    }
    for (section, map) in [("shadow_mmu", &f.shadow_mmu), ("ksm", &f.ksm), ("kvm", &f.kvm)] {
        for (name, v) in map {
            out.insert(format!("{section}.{name}"), *v);
        }
    }
    out.insert("wall_ns".into(), f.wall_ns);
    out
}

/// Median of a non-empty list (mean of the middle two for an even count).
pub fn median(values: &[u64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_unstable();
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2] as f64,
        n => (v[n / 2 - 1] as f64 + v[n / 2] as f64) / 2.0,
    }
}

/// Summarises one stretch (a phase, or the whole run) across policies:
/// `pick` gives a run's figures for it (None: the run has no such phase,
/// which counts as zero).
fn summarise(
    policies: &[String],
    runs: &[RunRecord],
    phase: Option<u32>,
    pick: impl Fn(&RunStats) -> Option<&Figures>,
) -> PhaseSummary {
    let mut per_policy: BTreeMap<&str, Vec<BTreeMap<String, u64>>> = BTreeMap::new();
    // A run that did not end well (timeout, interrupt, error) is listed in
    // `failed_runs`, not averaged in.
    for r in runs.iter().filter(|r| r.stats.guest.exit_code == Some(0)) {
        per_policy.entry(&r.policy).or_default().push(pick(&r.stats).map(flatten).unwrap_or_default());
    }
    let names: std::collections::BTreeSet<&String> =
        per_policy.values().flat_map(|runs| runs.iter().flat_map(|m| m.keys())).collect();
    let mut figures = BTreeMap::new();
    for name in names {
        let mut by_policy = BTreeMap::new();
        for p in policies {
            let Some(list) = per_policy.get(p.as_str()) else { continue };
            let values: Vec<u64> = list.iter().map(|m| m.get(name).copied().unwrap_or(0)).collect();
            by_policy.insert(
                p.clone(),
                Summary {
                    median: median(&values),
                    min: values.iter().copied().min().unwrap_or(0),
                    max: values.iter().copied().max().unwrap_or(0),
                    values,
                    diff_from_off: None,
                },
            );
        }
        if let Some(off) = by_policy.get("off").map(|s| s.median) {
            for (p, s) in by_policy.iter_mut() {
                if p != "off" {
                    s.diff_from_off = Some(s.median - off);
                }
            }
        }
        figures.insert(name.clone(), by_policy);
    }
    PhaseSummary { phase, figures }
}

/// Builds the document from the runs (policies in the order given).
pub fn build_report(setup: Setup, policies: Vec<String>, skipped: Vec<Skipped>, runs: Vec<RunRecord>) -> CompareReport {
    let reference_policy = if policies.iter().any(|p| p == "off") { "off" } else { policies.first().map_or("", |p| p) };
    let reference = runs.iter().find(|r| r.policy == reference_policy);
    let report_mismatches: Vec<String> = match reference {
        Some(reference) => runs
            .iter()
            .filter(|r| r.stats.guest.reports != reference.stats.guest.reports)
            .map(|r| format!("{} #{}", r.policy, r.repeat))
            .collect(),
        None => Vec::new(),
    };
    let failed_runs = runs
        .iter()
        .filter(|r| r.stats.guest.exit_code != Some(0))
        .map(|r| format!("{} #{}: {}", r.policy, r.repeat, r.stats.guest.end.detail))
        .collect();
    let phase_numbers: Vec<u32> = match reference {
        Some(r) => r.stats.phases.iter().map(|p| p.phase).collect(),
        None => Vec::new(),
    };
    let phases = phase_numbers
        .iter()
        .map(|&n| summarise(&policies, &runs, Some(n), |s| s.phases.iter().find(|p| p.phase == n).map(|p| &p.figures)))
        .collect();
    let total = summarise(&policies, &runs, None, |s| Some(&s.total));
    CompareReport {
        schema: COMPARE_SCHEMA.into(),
        version: COMPARE_VERSION,
        setup,
        policies,
        skipped,
        reports_identical: report_mismatches.is_empty(),
        report_mismatches,
        failed_runs,
        phases,
        total,
        runs,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::stats::{ConfigRecord, EndRecord, ExitKind, GuestRecord, PhaseStats, SCHEMA_VERSION};

    /// A run with `io` io exits and `faults` write faults in phase 1.
    pub(crate) fn run(policy: &str, repeat: u32, faults: u64, reports: Vec<u64>) -> RunRecord {
        let mut f = Figures { wall_ns: 1_000_000 * (faults + 1), ..Figures::default() };
        f.exits.record(ExitKind::Io);
        for _ in 0..faults {
            f.exits.record(ExitKind::EptWrite);
        }
        f.ksm.insert("pages_sharing".into(), faults);
        let stats = RunStats {
            schema: SCHEMA_VERSION,
            config: ConfigRecord {
                image: "pagefill".into(),
                mem_bytes: 8 << 20,
                dedup: policy.into(),
                view: "memslot".into(),
                timeout_secs: None,
            },
            guest: GuestRecord {
                exit_code: Some(0),
                reports,
                end: EndRecord { reason: "exit".into(), rip: None, detail: "ok".into() },
            },
            phases: vec![PhaseStats { phase: 1, figures: f.clone() }],
            total: f,
        };
        RunRecord { policy: policy.into(), repeat, status: 0, stats }
    }

    pub(crate) fn setup() -> Setup {
        Setup {
            image: "pagefill".into(),
            mem_bytes: 8 << 20,
            view: "memslot".into(),
            repeat: 3,
            knobs: BTreeMap::new(),
            kernel: "test".into(),
            host: "test".into(),
            cpus: 1,
            started_unix: 0,
        }
    }

    #[test]
    fn medians_spreads_and_differences_from_off() {
        assert_eq!(median(&[3, 1, 2]), 2.0);
        assert_eq!(median(&[4, 1, 2, 3]), 2.5);
        let runs = vec![
            run("off", 0, 0, vec![7]),
            run("range-flush", 0, 10, vec![7]),
            run("off", 1, 0, vec![7]),
            run("range-flush", 1, 30, vec![7]),
            run("off", 2, 0, vec![7]),
            run("range-flush", 2, 20, vec![7]),
        ];
        let r = build_report(setup(), vec!["off".into(), "range-flush".into()], Vec::new(), runs);
        assert!(r.reports_identical && r.failed_runs.is_empty());
        assert_eq!(r.phases.len(), 1);
        let w = &r.phases[0].figures["exits.ept_write"];
        assert_eq!((w["range-flush"].median, w["range-flush"].min, w["range-flush"].max), (20.0, 10, 30));
        assert_eq!(w["range-flush"].values, vec![10, 30, 20]);
        assert_eq!(w["range-flush"].diff_from_off, Some(20.0));
        assert_eq!(w["off"].diff_from_off, None);
        assert_eq!(r.total.figures["exits.total"]["range-flush"].median, 21.0);
    }

    #[test]
    fn a_run_that_read_something_else_is_named() {
        let runs = vec![run("off", 0, 0, vec![7]), run("change-pte", 0, 5, vec![8])];
        let r = build_report(setup(), vec!["off".into(), "change-pte".into()], Vec::new(), runs);
        assert!(!r.reports_identical);
        assert_eq!(r.report_mismatches, vec!["change-pte #0".to_string()]);
    }

    #[test]
    fn the_document_round_trips_through_json() {
        let runs = vec![run("off", 0, 0, vec![7]), run("legacy", 0, 5, vec![7])];
        let r = build_report(setup(), vec!["off".into(), "legacy".into()], Vec::new(), runs);
        let json = serde_json::to_string(&r).expect("json");
        let back: CompareReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&json).expect("value");
        assert_eq!(v["schema"], COMPARE_SCHEMA);
        assert_eq!(v["version"], COMPARE_VERSION);
    }
}
