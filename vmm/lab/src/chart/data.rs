//! What the charts show, taken from comparisons ([`ChartData::of`]): per
//! view, per phase group and per policy, the secondary-MMU faults the VMM
//! served by kind, and the host KVM's exits and the wall time as ratios to
//! `off`. Repeated phases are one group, whose figures are the median over
//! its occurrences: phases with the same name (the guest names each
//! repetition alike), or unnamed ones with the same number, that took the
//! same secondary-MMU faults under every policy.

use std::collections::BTreeMap;

use crate::compare::fold::median;
use crate::compare::summary::{CompareReport, PhaseSummary};

/// A median and the smallest and largest value around it.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Spread {
    /// The median.
    pub median: f64,
    /// The smallest value.
    pub min: f64,
    /// The largest value.
    pub max: f64,
}

/// One policy's figures in one phase group.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Cell {
    /// Secondary-MMU faults the VMM served: read, write, fetch (medians).
    pub faults: [f64; 3],
    /// The VM exits the host KVM counted (median), when the runs had it.
    pub exits: Option<f64>,
    /// The host KVM's exits over `off`'s (None without `off`, or when
    /// either has no value).
    pub exits_ratio: Option<Spread>,
    /// The wall time over `off`'s.
    pub wall_ratio: Option<Spread>,
}

/// Phases drawn as one group of bars.
#[derive(Debug, Clone, PartialEq)]
pub struct Group {
    /// The phase's number and name (`3 read word 0`), or `whole run`.
    pub label: String,
    /// How many phases of the run it stands for.
    pub times: usize,
    /// One cell per policy, in the view's policy order.
    pub cells: Vec<Cell>,
}

/// One comparison (one view): its policies and groups.
#[derive(Debug, Clone, PartialEq)]
pub struct ViewData {
    /// The view's name (`memslot`, `uffd`).
    pub view: String,
    /// The policies, in the comparison's order.
    pub policies: Vec<String>,
    /// The phase groups, then the whole run.
    pub groups: Vec<Group>,
}

/// Everything one chart file shows.
#[derive(Debug, Clone, PartialEq)]
pub struct ChartData {
    /// The headline.
    pub title: String,
    /// The setup, under the headline.
    pub subtitle: String,
    /// One column of panels per view.
    pub views: Vec<ViewData>,
}

/// The secondary-MMU fault figures, by kind.
const FAULTS: [&str; 3] = ["exits.ept_read", "exits.ept_write", "exits.ept_fetch"];

impl ChartData {
    /// The chart of one or more comparisons of the same guest (one per
    /// view, side by side).
    pub fn of(reports: &[&CompareReport]) -> Self {
        let Some(first) = reports.first() else {
            return Self { title: "no comparison".into(), subtitle: String::new(), views: Vec::new() };
        };
        let s = &first.setup;
        let title = format!("{}: what deduplication costs the guest, per phase and policy", s.image);
        let subtitle = format!(
            "{} of RAM, median of {} run(s) per policy; host {} (Linux {}, {} CPUs)",
            vmm::size::format_size(s.mem_bytes),
            s.repeat,
            s.host,
            s.kernel,
            s.cpus
        );
        Self { title, subtitle, views: reports.iter().map(|r| view_data(r)).collect() }
    }
}

/// What makes phases one group: their name (or their number when unnamed)
/// and the same secondary-MMU faults under every policy, so that a
/// repetition that differs (the first reads after a merge pass) keeps a
/// group of its own instead of vanishing in the others' median.
fn group_key(p: &PhaseSummary, policies: &[String]) -> String {
    let faults: Vec<String> =
        policies.iter().map(|policy| format!("{:?}", FAULTS.map(|f| value(p, f, policy)))).collect();
    let faults = faults.join(" ");
    match &p.name {
        Some(name) => format!("name {name} faults {faults}"),
        None => format!("number {} faults {faults}", p.phase.unwrap_or(0)),
    }
}

/// A group's label: its phases' numbers (first and last when several) and
/// their name.
fn group_label(phases: &[&PhaseSummary]) -> String {
    let numbers: Vec<u32> = phases.iter().filter_map(|p| p.phase).collect();
    let number = match (numbers.first(), numbers.last()) {
        (Some(a), Some(b)) if a != b => format!("{a}-{b}"),
        (Some(a), _) => a.to_string(),
        _ => String::new(),
    };
    match phases.first().and_then(|p| p.name.as_deref()) {
        Some(name) => format!("{number} {name}"),
        None => format!("phase {number}"),
    }
}

fn view_data(report: &CompareReport) -> ViewData {
    // Occurrences of each group, in run order.
    let mut order: Vec<String> = Vec::new();
    let mut occurrences: BTreeMap<String, Vec<&PhaseSummary>> = BTreeMap::new();
    for p in &report.phases {
        let key = group_key(p, &report.policies);
        if !occurrences.contains_key(&key) {
            order.push(key.clone());
        }
        occurrences.entry(key).or_default().push(p);
    }
    let policies = report.policies.clone();
    let mut groups: Vec<Group> = order
        .into_iter()
        .map(|key| {
            let phases = &occurrences[&key];
            let cells = policies.iter().map(|p| cell(phases, p)).collect();
            Group { label: group_label(phases), times: phases.len(), cells }
        })
        .collect();
    groups.push(Group {
        label: "whole run".into(),
        times: 1,
        cells: policies.iter().map(|p| cell(&[&report.total], p)).collect(),
    });
    ViewData { view: report.setup.view.clone(), policies, groups }
}

/// A figure's median under `policy` in one phase.
fn value(p: &PhaseSummary, figure: &str, policy: &str) -> Option<f64> {
    p.figures.get(figure).and_then(|by| by.get(policy)).map(|s| s.median)
}

/// One policy's cell over the occurrences of a phase: medians over them.
fn cell(phases: &[&PhaseSummary], policy: &str) -> Cell {
    let faults = FAULTS.map(|f| median_f(phases.iter().map(|p| value(p, f, policy).unwrap_or(0.0))));
    let exits = if phases.iter().all(|p| p.figures.contains_key("kvm.exits")) { "kvm.exits" } else { "exits.total" };
    let counted: Vec<f64> = phases.iter().filter_map(|p| value(p, exits, policy)).collect();
    let exits_count = (counted.len() == phases.len()).then(|| median_f(counted.into_iter()));
    Cell {
        faults,
        exits: exits_count,
        exits_ratio: ratio(phases, exits, policy),
        wall_ratio: ratio(phases, "wall_ns", policy),
    }
}

/// `figure` under `policy` over `off`'s median, per occurrence, and the
/// spread of the policy's runs over `off`'s median.
fn ratio(phases: &[&PhaseSummary], figure: &str, policy: &str) -> Option<Spread> {
    let mut medians = Vec::new();
    let (mut lo, mut hi) = (f64::INFINITY, 0.0_f64);
    for p in phases {
        let off = value(p, figure, "off").filter(|v| *v > 0.0)?;
        let s = p.figures.get(figure)?.get(policy)?;
        medians.push(s.median / off);
        lo = lo.min(s.min as f64 / off);
        hi = hi.max(s.max as f64 / off);
    }
    let median = median_f(medians.into_iter());
    (median.is_finite() && !phases.is_empty()).then_some(Spread { median, min: lo.min(median), max: hi.max(median) })
}

/// The median of some f64s (0 for none).
fn median_f(values: impl Iterator<Item = f64>) -> f64 {
    // Scaled to integers for the shared median: figures are counts, times
    // in ns and ratios, all far from 1e-6.
    let scaled: Vec<u64> = values.map(|v| (v.max(0.0) * 1e6).round() as u64).collect();
    median(&scaled) / 1e6
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fold::tests::{phase, report, run_with};

    fn named(n: u32, io: u64, name: &str) -> vmm::stats::PhaseStats {
        let mut p = phase(n, io);
        p.name = Some(name.into());
        p.figures.kvm.insert("exits".into(), io * 10);
        p
    }

    #[test]
    fn repeated_phases_are_one_group_and_ratios_are_to_off() {
        let phases = |k: u64| {
            vec![
                named(1, k, "fill"),
                named(2, 2 * k, "read, write every 8th"),
                named(3, k, "merge pass"),
                named(4, 4 * k, "read, write every 8th"),
            ]
        };
        let runs = vec![run_with("off", 0, phases(1), vec![]), run_with("legacy", 0, phases(3), vec![])];
        let r = report(&["off", "legacy"], runs);
        let d = ChartData::of(&[&r]);
        let labels: Vec<(&str, usize)> = d.views[0].groups.iter().map(|g| (g.label.as_str(), g.times)).collect();
        assert_eq!(labels, [("1 fill", 1), ("2-4 read, write every 8th", 2), ("3 merge pass", 1), ("whole run", 1)]);
        let legacy = &d.views[0].groups[1].cells[1];
        let ratio = legacy.exits_ratio.expect("off ran");
        assert!((ratio.median - 3.0).abs() < 1e-9, "{ratio:?}");
        assert_eq!(d.views[0].groups[1].cells[0].exits_ratio.map(|s| s.median), Some(1.0));
    }

    #[test]
    fn a_repetition_with_other_faults_keeps_a_group_of_its_own() {
        // legacy's first reads after the pass refault; later repetitions
        // do not: the first must not vanish in the others' median.
        let phases = |first_faults: u64| {
            let mut v: Vec<_> = (2..6).map(|n| named(n, 1, "read every page")).collect();
            v[0].figures.exits.record_n(vmm::stats::ExitKind::EptRead, first_faults);
            v
        };
        let runs = vec![run_with("off", 0, phases(0), vec![]), run_with("legacy", 0, phases(512), vec![])];
        let r = report(&["off", "legacy"], runs);
        let d = ChartData::of(&[&r]);
        let labels: Vec<(&str, usize)> = d.views[0].groups.iter().map(|g| (g.label.as_str(), g.times)).collect();
        assert_eq!(labels, [("2 read every page", 1), ("3-5 read every page", 3), ("whole run", 1)]);
        assert_eq!(d.views[0].groups[0].cells[1].faults[0], 512.0);
    }
}
