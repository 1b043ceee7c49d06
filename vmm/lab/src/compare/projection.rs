//! compare.json's `projection`: the guest time each policy would cost on
//! the hosts of the `--project` profiles, per phase and for the whole run,
//! by the rule of [`crate::cost`], from the medians of the document's own
//! figures (so that a reader can redo every sum from compare.json), and
//! its rows in the table.

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::{Deserialize, Serialize};

use super::summary::{CompareReport, PhaseSummary};
use crate::cost::{project, CostProfile, StretchProjection};
use crate::run_table::fmt_ns;

/// One phase, projected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseProjection {
    /// The guest's phase number, as in `phases`.
    pub phase: Option<u32>,
    /// Its name, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// The projection.
    #[serde(flatten)]
    pub projection: StretchProjection,
}

/// One policy on one profile: the whole run, and each phase by position
/// (as `phases`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PolicyProjection {
    /// The whole run.
    #[serde(flatten)]
    pub total: StretchProjection,
    /// Per phase.
    pub phases: Vec<PhaseProjection>,
}

/// Profile name -> policy -> projection.
pub type Projections = BTreeMap<String, BTreeMap<String, PolicyProjection>>;

/// The medians of `policy`'s figures in a stretch, by flat name.
fn medians(stretch: &PhaseSummary, policy: &str) -> BTreeMap<String, f64> {
    stretch.figures.iter().filter_map(|(name, by)| by.get(policy).map(|s| (name.clone(), s.median))).collect()
}

/// Every policy of `report` projected onto each profile; empty when `off`
/// did not run (its runs are the guest's own time).
pub fn project_report(report: &CompareReport, profiles: &[CostProfile]) -> Projections {
    if !report.policies.iter().any(|p| p == "off") {
        return Projections::new();
    }
    let stretch = |s: &PhaseSummary, policy: &str, profile| project(&medians(s, policy), &medians(s, "off"), profile);
    profiles
        .iter()
        .map(|profile| {
            let by_policy = report
                .policies
                .iter()
                .map(|policy| {
                    let phases = report
                        .phases
                        .iter()
                        .map(|p| PhaseProjection {
                            phase: p.phase,
                            name: p.name.clone(),
                            projection: stretch(p, policy, profile),
                        })
                        .collect();
                    (policy.clone(), PolicyProjection { total: stretch(&report.total, policy, profile), phases })
                })
                .collect();
            (profile.name.clone(), by_policy)
        })
        .collect()
}

/// The table's rows: per profile, each policy's projected whole-run time
/// and its ratio to off's, under the measured times.
pub fn render(out: &mut String, report: &CompareReport, name_width: usize) {
    if report.projection.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n== projected guest time, whole run: off's wall + (events - off's events) x cost");
    let _ = write!(out, "{:<name_width$}", "");
    for policy in &report.policies {
        let _ = write!(out, "  {policy:>20}");
    }
    let _ = writeln!(out);
    let first = report.projection.values().next();
    let measured = first.map(|by| by.iter().map(|(p, x)| (p.clone(), x.total.measured_ns)).collect());
    let rows = std::iter::once(("measured here".to_string(), measured.unwrap_or_default())).chain(
        report
            .projection
            .iter()
            .map(|(name, by)| (name.clone(), by.iter().map(|(p, x)| (p.clone(), x.total.total_ns)).collect())),
    );
    for (label, by) in rows {
        let by: BTreeMap<String, f64> = by;
        let off = by.get("off").copied().unwrap_or(f64::NAN);
        let _ = write!(out, "  {:<w$}", label, w = name_width.saturating_sub(2));
        for policy in &report.policies {
            let cell = by
                .get(policy)
                .map_or_else(|| "-".to_string(), |&ns| format!("{} ({:.2}x)", fmt_ns(ns.max(0.0) as u64), ns / off));
            let _ = write!(out, "  {cell:>20}");
        }
        let _ = writeln!(out);
    }
}

#[cfg(test)]
mod tests {
    use super::super::fold::tests::{report, run};
    use super::*;
    use crate::cost::{Cost, CostKind, EVENTS, PROFILE_SCHEMA, PROFILE_VERSION};

    fn profile(fault_ns: f64) -> CostProfile {
        let costs = EVENTS
            .iter()
            .map(|e| {
                let ns = if e.key == "secondary_mmu_fault" { fault_ns } else { 0.0 };
                (e.key.to_string(), Cost { ns, kind: CostKind::Estimate, source: "a test".into() })
            })
            .collect();
        CostProfile {
            schema: PROFILE_SCHEMA.into(),
            version: PROFILE_VERSION,
            name: format!("faults at {fault_ns}"),
            host: "none".into(),
            costs,
            not_found: Vec::new(),
        }
    }

    #[test]
    fn each_policy_costs_offs_time_plus_its_extra_events_per_phase_and_in_all() {
        // run(): 1 ms of wall per fault + 1 ms; off has no fault.
        let mut r = report(&["off", "legacy"], vec![run("off", 0, 0, vec![7]), run("legacy", 0, 5, vec![7])]);
        r.projection = project_report(&r, &[profile(10.0)]);
        let legacy = &r.projection["faults at 10"]["legacy"];
        assert_eq!((legacy.total.guest_ns, legacy.total.total_ns, legacy.total.measured_ns), (1e6, 1e6 + 50.0, 6e6));
        assert_eq!(legacy.phases.len(), 1);
        assert_eq!(legacy.phases[0].projection.total_ns, 1e6 + 50.0);
        assert_eq!(r.projection["faults at 10"]["off"].total.total_ns, 1e6);
        let mut table = String::new();
        render(&mut table, &r, 30);
        assert!(table.contains("faults at 10") && table.contains("measured here"), "{table}");
        let json = serde_json::to_string(&r).expect("json");
        let back: CompareReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back.projection, r.projection);
    }

    #[test]
    fn without_off_there_is_no_projection() {
        let r = report(&["legacy"], vec![run("legacy", 0, 5, vec![7])]);
        assert!(project_report(&r, &[profile(10.0)]).is_empty());
    }
}
