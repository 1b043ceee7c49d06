//! How the runs of a comparison fold into its document
//! ([`CompareReport`]): flat figure names, per phase and per policy the
//! median and spread over the repeats, the difference from `off`, and the
//! runs that read something else, took other phases or did not succeed.

use std::collections::{BTreeMap, BTreeSet};

use vmm::stats::{Figures, GuestStats, RunStats};

use super::summary::{
    CompareReport, FailedRun, GuestSummary, PhaseSummary, RunRecord, Setup, Skipped, Summary, COMPARE_SCHEMA,
    COMPARE_VERSION,
};

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

/// A counted run's figures, flattened: per phase by position, and for the
/// whole run.
///
/// A run reports a host KVM level only in a stretch where it changed; since
/// phases follow each other without gaps, a level it did not report in a
/// phase is the value it last reported (in the whole run: the last phase's
/// value). A level not reported up to then stays missing: it is unknown, not 0.
struct FlatRun<'a> {
    record: &'a RunRecord,
    phases: Vec<BTreeMap<String, u64>>,
    total: BTreeMap<String, u64>,
}

impl<'a> FlatRun<'a> {
    fn new(record: &'a RunRecord, kvm_levels: &BTreeSet<String>) -> Self {
        let mut known = BTreeMap::new();
        let mut phases = Vec::new();
        for p in &record.stats.phases {
            for (name, &v) in p.figures.kvm.iter().filter(|(name, _)| kvm_levels.contains(*name)) {
                known.insert(format!("kvm.{name}"), v);
            }
            let mut figures = flatten(&p.figures);
            for (name, &v) in &known {
                figures.entry(name.clone()).or_insert(v);
            }
            phases.push(figures);
        }
        let mut total = flatten(&record.stats.total);
        for (name, v) in known {
            total.entry(name).or_insert(v);
        }
        Self { record, phases, total }
    }
}

fn is_level(name: &str, kvm_levels: &BTreeSet<String>) -> bool {
    name.strip_prefix("kvm.").is_some_and(|n| kvm_levels.contains(n))
}

/// Summarises one stretch (a phase, or the whole run) across policies from
/// the counted runs' figures for it (`(policy, repeat, figures)`). A missing
/// figure is 0 (a counter that did not move), except a host KVM level,
/// which is left out and named in `absent`.
fn summarise(
    policies: &[String],
    stretch: &[(&str, u32, &BTreeMap<String, u64>)],
    phase: Option<u32>,
    kvm_levels: &BTreeSet<String>,
) -> PhaseSummary {
    let names: BTreeSet<&String> = stretch.iter().flat_map(|(_, _, m)| m.keys()).collect();
    let mut figures = BTreeMap::new();
    for name in names {
        let level = is_level(name, kvm_levels);
        let mut by_policy = BTreeMap::new();
        for p in policies {
            let (mut values, mut absent) = (Vec::new(), Vec::new());
            for (_, repeat, m) in stretch.iter().filter(|(policy, _, _)| policy == p) {
                match m.get(name) {
                    Some(&v) => values.push(v),
                    None if level => absent.push(*repeat),
                    None => values.push(0),
                }
            }
            if values.is_empty() {
                continue;
            }
            by_policy.insert(
                p.clone(),
                Summary {
                    median: median(&values),
                    min: values.iter().copied().min().unwrap_or(0),
                    max: values.iter().copied().max().unwrap_or(0),
                    values,
                    absent,
                    diff_from_off: None,
                },
            );
        }
        if let Some(off) = by_policy.get("off").filter(|s| s.absent.is_empty()).map(|s| s.median) {
            for (p, s) in by_policy.iter_mut() {
                if p != "off" && s.absent.is_empty() {
                    s.diff_from_off = Some(s.median - off);
                }
            }
        }
        figures.insert(name.clone(), by_policy);
    }
    PhaseSummary { phase, name: None, figures }
}

fn phase_numbers(stats: &RunStats) -> Vec<u32> {
    stats.phases.iter().map(|p| p.phase).collect()
}

fn run_name(r: &RunRecord) -> String {
    format!("{} #{}", r.policy, r.repeat)
}

/// Builds the document from the runs (policies in the order given), the
/// runs that ended without statistics, and the host KVM's level statistics.
///
/// Only runs whose guest exited with code 0 are counted in the figures.
/// Phases are matched by position: phase i of every counted run is compared
/// with phase i of the others, labelled with the reference run's number.
pub fn build_report(
    setup: Setup,
    policies: Vec<String>,
    skipped: Vec<Skipped>,
    runs: Vec<RunRecord>,
    failures: Vec<FailedRun>,
    kvm_levels: &BTreeSet<String>,
) -> CompareReport {
    let reference_policy = reference_policy(&policies);
    let report_mismatches = report_mismatches(&runs, reference_policy);
    let failed_runs = failed_runs(&policies, &runs, &failures);
    // A run that did not end well (timeout, interrupt, error) is listed in
    // `failed_runs`, not counted.
    let counted: Vec<FlatRun<'_>> =
        runs.iter().filter(|r| r.stats.guest.exit_code == Some(0)).map(|r| FlatRun::new(r, kvm_levels)).collect();
    let sequences = PhaseSequences::of(&counted, reference_policy);
    let mut phases = phase_summaries(&policies, &counted, &sequences.reference[..sequences.shared], kvm_levels);
    for (p, name) in phases.iter_mut().zip(&sequences.names) {
        p.name = name.clone();
    }
    let stretch: Vec<_> = counted.iter().map(|r| (r.record.policy.as_str(), r.record.repeat, &r.total)).collect();
    let total = summarise(&policies, &stretch, None, kvm_levels);
    let guests = guest_summaries(&policies, &runs);
    CompareReport {
        schema: COMPARE_SCHEMA.into(),
        version: COMPARE_VERSION,
        setup,
        policies,
        skipped,
        reports_identical: report_mismatches.is_empty(),
        report_mismatches,
        failed_runs,
        phase_sequence: sequences.reference,
        phase_mismatches: sequences.mismatches,
        kvm_levels: kvm_levels.iter().cloned().collect(),
        phases,
        total,
        guests,
        projection: Default::default(),
        runs,
    }
}

/// A fleet's guests across the policies, from the runs the fleet ended
/// well (none for runs of one guest).
fn guest_summaries(policies: &[String], runs: &[RunRecord]) -> Vec<GuestSummary> {
    let counted: Vec<&RunRecord> = runs.iter().filter(|r| r.stats.guest.exit_code == Some(0)).collect();
    let guests = counted.iter().map(|r| r.stats.guests.len()).max().unwrap_or(0);
    (0..guests)
        .map(|i| {
            let by_policy = |figure: fn(&GuestStats) -> u64| -> BTreeMap<String, f64> {
                policies
                    .iter()
                    .filter_map(|p| {
                        let values: Vec<u64> = counted
                            .iter()
                            .filter(|r| &r.policy == p)
                            .filter_map(|r| r.stats.guests.get(i).map(figure))
                            .collect();
                        (!values.is_empty()).then(|| (p.clone(), median(&values)))
                    })
                    .collect()
            };
            GuestSummary {
                index: i as u64,
                exits: by_policy(|g| g.total.exits.total),
                faults: by_policy(|g| g.total.exits.ept_read + g.total.exits.ept_write + g.total.exits.ept_fetch),
                wall_ns: by_policy(|g| g.total.wall_ns),
            }
        })
        .collect()
}

/// The policy every other is compared with: `off` when it ran, else the first.
fn reference_policy(policies: &[String]) -> &str {
    if policies.iter().any(|p| p == "off") {
        "off"
    } else {
        policies.first().map_or("", |p| p)
    }
}

/// The runs whose reports differ from the reference run's (the first run of
/// the reference policy that the guest ended itself).
fn report_mismatches(runs: &[RunRecord], reference_policy: &str) -> Vec<String> {
    // Reports are compared between runs the guest ended itself (through
    // port 0xF4 or HLT, whatever its code): a run cut short by a timeout, a
    // signal or a VMM error has reported only part of its list, and is in
    // `failed_runs` already.
    let guest_ended = |r: &&RunRecord| r.stats.guest.exit_code.is_some();
    let reference = runs.iter().filter(guest_ended).find(|r| r.policy == reference_policy);
    let Some(reference) = reference.or_else(|| runs.iter().find(guest_ended)) else {
        return Vec::new();
    };
    runs.iter()
        .filter(guest_ended)
        .filter(|r| r.stats.reports_by_guest() != reference.stats.reports_by_guest())
        .map(run_name)
        .collect()
}

/// Runs whose guest did not exit with code 0, and runs that ended without
/// statistics, as "policy #repeat: detail", in the order they were run.
fn failed_runs(policies: &[String], runs: &[RunRecord], failures: &[FailedRun]) -> Vec<String> {
    let mut failed: Vec<(u32, usize, String)> = runs
        .iter()
        .filter(|r| r.stats.guest.exit_code != Some(0))
        .map(|r| (r.repeat, &r.policy, r.stats.guest.end.detail.clone()))
        .chain(failures.iter().map(|f| (f.repeat, &f.policy, f.detail.clone())))
        .map(|(repeat, policy, detail)| {
            let order = policies.iter().position(|p| p == policy).unwrap_or(usize::MAX);
            (repeat, order, format!("{policy} #{repeat}: {detail}"))
        })
        .collect();
    failed.sort();
    failed.into_iter().map(|(_, _, f)| f).collect()
}

/// The phase numbers of the counted runs against the reference run's.
struct PhaseSequences {
    /// The reference run's phase numbers (the first counted run of the
    /// reference policy, else the first counted run).
    reference: Vec<u32>,
    /// Its phase names.
    names: Vec<Option<String>>,
    /// The runs that took other phases, as "policy #repeat: 0 1 2".
    mismatches: Vec<String>,
    /// How many leading phases every counted run shares with the reference.
    shared: usize,
}

impl PhaseSequences {
    fn of(counted: &[FlatRun<'_>], reference_policy: &str) -> Self {
        let reference = counted.iter().find(|r| r.record.policy == reference_policy).or(counted.first());
        let names = reference.map(|r| r.record.stats.phases.iter().map(|p| p.name.clone()).collect());
        let reference = reference.map(|r| phase_numbers(&r.record.stats)).unwrap_or_default();
        let mut mismatches = Vec::new();
        let mut shared = reference.len();
        for r in counted {
            let numbers = phase_numbers(&r.record.stats);
            if numbers != reference {
                let common = numbers.iter().zip(&reference).take_while(|(a, b)| a == b).count();
                shared = shared.min(common);
                let shown: Vec<String> = numbers.iter().map(u32::to_string).collect();
                mismatches.push(format!("{}: {}", run_name(r.record), shown.join(" ")));
            }
        }
        Self { reference, names: names.unwrap_or_default(), mismatches, shared }
    }
}

/// One summary per phase position, labelled with the numbers in `sequence`.
fn phase_summaries(
    policies: &[String],
    counted: &[FlatRun<'_>],
    sequence: &[u32],
    kvm_levels: &BTreeSet<String>,
) -> Vec<PhaseSummary> {
    sequence
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let stretch: Vec<_> = counted
                .iter()
                .filter_map(|r| r.phases.get(i).map(|m| (r.record.policy.as_str(), r.record.repeat, m)))
                .collect();
            summarise(policies, &stretch, Some(n), kvm_levels)
        })
        .collect()
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use vmm::stats::{ConfigRecord, EndRecord, ExitKind, GuestRecord, PhaseStats, SCHEMA_VERSION};

    /// A successful run with these phases; the whole run is their sum (a
    /// test stand-in: levels are not summed by a real run).
    pub(crate) fn run_with(policy: &str, repeat: u32, phases: Vec<PhaseStats>, reports: Vec<u64>) -> RunRecord {
        let mut total = Figures::default();
        for p in &phases {
            total.exits.add(&p.figures.exits);
            total.wall_ns += p.figures.wall_ns;
        }
        let stats = RunStats {
            schema: SCHEMA_VERSION,
            config: ConfigRecord {
                image: "pagefill".into(),
                mem_bytes: 8 << 20,
                dedup: policy.into(),
                view: "memslot".into(),
                timeout_secs: None,
                guests: 1,
            },
            guest: GuestRecord {
                exit_code: Some(0),
                reports,
                end: EndRecord { reason: "exit".into(), rip: None, detail: "ok".into() },
            },
            phases,
            total,
            units: Default::default(),
            guests: Vec::new(),
        };
        RunRecord { policy: policy.into(), repeat, status: 0, stats }
    }

    /// A run with `io` io exits and `faults` write faults in phase 1.
    pub(crate) fn run(policy: &str, repeat: u32, faults: u64, reports: Vec<u64>) -> RunRecord {
        let mut f = Figures { wall_ns: 1_000_000 * (faults + 1), ..Figures::default() };
        f.exits.record(ExitKind::Io);
        for _ in 0..faults {
            f.exits.record(ExitKind::EptWrite);
        }
        f.ksm.insert("pages_sharing".into(), faults);
        let mut r = run_with(policy, repeat, vec![PhaseStats { phase: 1, name: None, figures: f.clone() }], reports);
        r.stats.total = f;
        r
    }

    /// A phase numbered `n` with `io` io exits.
    pub(crate) fn phase(n: u32, io: u64) -> PhaseStats {
        let mut figures = Figures { wall_ns: 1000, ..Figures::default() };
        for _ in 0..io {
            figures.exits.record(ExitKind::Io);
        }
        PhaseStats { phase: n, name: None, figures }
    }

    pub(crate) fn setup() -> Setup {
        Setup {
            image: "pagefill".into(),
            mem_bytes: 8 << 20,
            view: "memslot".into(),
            repeat: 3,
            guests: 1,
            knobs: BTreeMap::new(),
            kernel: "test".into(),
            host: "test".into(),
            cpus: 1,
            started_unix: 0,
        }
    }

    /// `build_report` with no failed-outright runs and no KVM levels.
    pub(crate) fn report(policies: &[&str], runs: Vec<RunRecord>) -> CompareReport {
        let policies = policies.iter().map(|p| p.to_string()).collect();
        build_report(setup(), policies, Vec::new(), runs, Vec::new(), &BTreeSet::new())
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
        let r = report(&["off", "range-flush"], runs);
        assert!(r.reports_identical && r.failed_runs.is_empty() && r.phase_mismatches.is_empty());
        assert_eq!(r.phases.len(), 1);
        let w = &r.phases[0].figures["exits.ept_write"];
        assert_eq!((w["range-flush"].median, w["range-flush"].min, w["range-flush"].max), (20.0, 10, 30));
        assert_eq!(w["range-flush"].values, vec![10, 30, 20]);
        assert_eq!(w["range-flush"].diff_from_off, Some(20.0));
        assert_eq!(w["off"].diff_from_off, None);
        assert_eq!(r.total.figures["exits.total"]["range-flush"].median, 21.0);
    }

    #[test]
    fn a_phase_number_the_guest_reuses_is_compared_by_position() {
        // Phases 0, 1, 2, 1: the second phase 1 has its own figures.
        let numbers = [0, 1, 2, 1];
        let phases = |base: u64| numbers.iter().zip(1..).map(|(&n, i)| phase(n, base * i)).collect::<Vec<_>>();
        let runs = vec![run_with("off", 0, phases(1), vec![7]), run_with("legacy", 0, phases(2), vec![7])];
        let r = report(&["off", "legacy"], runs.clone());
        assert_eq!(r.phase_sequence, numbers);
        assert!(r.phase_mismatches.is_empty());
        assert_eq!(r.phases.iter().map(|p| p.phase).collect::<Vec<_>>(), numbers.map(Some));
        for (i, p) in r.phases.iter().enumerate() {
            for run in &runs {
                let io = run.stats.phases[i].figures.exits.io;
                assert_eq!(p.figures["exits.io"][&run.policy].values, vec![io], "phase at position {i}");
            }
        }
        assert_ne!(r.phases[1].figures["exits.io"], r.phases[3].figures["exits.io"]);
    }

    #[test]
    fn runs_that_took_other_phases_are_named_and_only_shared_phases_compared() {
        let runs = vec![
            run_with("off", 0, vec![phase(0, 1), phase(1, 2), phase(2, 3), phase(3, 4)], vec![7]),
            run_with("legacy", 0, vec![phase(0, 1), phase(1, 2), phase(2, 3), phase(3, 4)], vec![7]),
            run_with("legacy", 1, vec![phase(0, 1), phase(1, 2), phase(5, 3)], vec![7]),
        ];
        let r = report(&["off", "legacy"], runs);
        assert_eq!(r.phase_sequence, vec![0, 1, 2, 3]);
        assert_eq!(r.phase_mismatches, vec!["legacy #1: 0 1 5".to_string()]);
        assert_eq!(r.phases.iter().map(|p| p.phase).collect::<Vec<_>>(), vec![Some(0), Some(1)]);
        // The whole run still counts every counted run.
        assert_eq!(r.total.figures["exits.io"]["legacy"].values.len(), 2);
    }

    #[test]
    fn a_kvm_level_is_never_read_as_zero() {
        const LEVEL: u64 = 3585; // the level both runs reached in phase 0
        const ZAPPED: u64 = 1; // range-flush's level after its zap
        const COUNTER: u64 = 9;
        let with_kvm = |n: u32, kvm: &[(&str, u64)]| {
            let mut p = phase(n, 1);
            p.figures.kvm = kvm.iter().map(|&(k, v)| (k.to_string(), v)).collect();
            p
        };
        let levels = BTreeSet::from(["pages_4k".to_string(), "blocking".to_string()]);
        let runs = vec![
            // off: the level moved in phase 0 only; `blocking` never moved.
            run_with("off", 0, vec![with_kvm(0, &[("pages_4k", LEVEL), ("exits", COUNTER)]), with_kvm(1, &[])], vec![]),
            run_with(
                "range-flush",
                0,
                vec![with_kvm(0, &[("pages_4k", LEVEL)]), with_kvm(1, &[("pages_4k", ZAPPED)])],
                vec![],
            ),
            run_with(
                "range-flush",
                1,
                vec![with_kvm(0, &[("pages_4k", LEVEL), ("blocking", 1)]), with_kvm(1, &[])],
                vec![],
            ),
        ];
        let policies = vec!["off".to_string(), "range-flush".to_string()];
        let r = build_report(setup(), policies, Vec::new(), runs, Vec::new(), &levels);
        assert_eq!(r.kvm_levels, vec!["blocking".to_string(), "pages_4k".to_string()]);
        let p1 = &r.phases[1].figures;
        // Unreported in phase 1: still the level of phase 0.
        assert_eq!(p1["kvm.pages_4k"]["off"].values, vec![LEVEL]);
        assert_eq!(p1["kvm.pages_4k"]["range-flush"].values, vec![ZAPPED, LEVEL]);
        let diff = median(&[ZAPPED, LEVEL]) - LEVEL as f64;
        assert_eq!(p1["kvm.pages_4k"]["range-flush"].diff_from_off, Some(diff));
        // A counter that did not move did not count anything: 0.
        assert_eq!(r.phases[0].figures["kvm.exits"]["off"].values, vec![COUNTER]);
        assert_eq!(r.phases[0].figures["kvm.exits"]["range-flush"].values, vec![0, 0]);
        // A level a run never reported is unknown: left out, named, no difference.
        let blocking = &r.phases[0].figures["kvm.blocking"];
        assert!(!blocking.contains_key("off"), "{blocking:?}");
        assert_eq!(
            (blocking["range-flush"].values.clone(), blocking["range-flush"].absent.clone()),
            (vec![1], vec![0])
        );
        assert_eq!(blocking["range-flush"].diff_from_off, None);
        // The whole run: the last value each run had.
        assert_eq!(r.total.figures["kvm.pages_4k"]["off"].values, vec![LEVEL]);
    }

    #[test]
    fn runs_that_ended_without_statistics_are_listed_in_run_order() {
        let mut timed_out = run("legacy", 0, 1, vec![7]);
        timed_out.stats.guest.exit_code = None;
        timed_out.stats.guest.end.detail = "timed out".into();
        let runs = vec![run("off", 0, 0, vec![7]), timed_out, run("off", 1, 0, vec![7])];
        let failures = vec![
            FailedRun { policy: "legacy".into(), repeat: 1, detail: "killed by SIGKILL (signal 9)".into() },
            FailedRun { policy: "off".into(), repeat: 2, detail: "exit status 2: no memory".into() },
        ];
        let policies = vec!["off".to_string(), "legacy".to_string()];
        let r = build_report(setup(), policies, Vec::new(), runs, failures, &BTreeSet::new());
        assert_eq!(
            r.failed_runs,
            ["legacy #0: timed out", "legacy #1: killed by SIGKILL (signal 9)", "off #2: exit status 2: no memory"]
        );
        assert_eq!(r.phases[0].figures["exits.io"]["off"].values.len(), 2);
        assert!(!r.phases[0].figures["exits.io"].contains_key("legacy"));
    }

    #[test]
    fn a_run_that_read_something_else_is_named() {
        let runs = vec![run("off", 0, 0, vec![7]), run("change-pte", 0, 5, vec![8])];
        let r = report(&["off", "change-pte"], runs);
        assert!(!r.reports_identical);
        assert_eq!(r.report_mismatches, vec!["change-pte #0".to_string()]);
    }

    #[test]
    fn reports_are_checked_between_runs_the_guest_ended_itself() {
        // The first off run was cut short (a timeout: part of its reports);
        // the reference is the next off run, and the cut run is not flagged.
        let mut cut = run("off", 0, 0, vec![7]);
        cut.stats.guest.exit_code = None;
        let runs = vec![cut, run("change-pte", 0, 0, vec![7, 8]), run("off", 1, 0, vec![7, 8])];
        let r = report(&["off", "change-pte"], runs);
        assert!(r.reports_identical, "{:?}", r.report_mismatches);
        // A guest that exits with a non-zero code still has its reports checked.
        let mut wrong = run("change-pte", 1, 0, vec![7, 9]);
        wrong.stats.guest.exit_code = Some(1);
        let runs = vec![run("off", 0, 0, vec![7, 8]), wrong];
        assert_eq!(report(&["off", "change-pte"], runs).report_mismatches, vec!["change-pte #1".to_string()]);
    }
}
