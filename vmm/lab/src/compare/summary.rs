//! The comparison document DIR/compare.json: every run's statistics, and per
//! phase each figure's median and spread over the repeats, per policy, with
//! its difference from `off` (schema [`COMPARE_SCHEMA`] version
//! [`COMPARE_VERSION`], documented in README.md). How the runs fold into it
//! is [`super::fold`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use vmm::stats::RunStats;

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
    /// Every value, in repeat order (of the runs that have one).
    pub values: Vec<u64>,
    /// Repeats (0-based) of counted runs that have no value: a host KVM
    /// level statistic the run never reported up to the end of the stretch
    /// (KVM reports a level only when it changed), so its value is unknown.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub absent: Vec<u32>,
    /// `median` minus `off`'s median; None for `off` itself, without `off`,
    /// or when either has `absent` repeats.
    pub diff_from_off: Option<f64>,
}

/// One phase (or the whole run): figure name -> policy -> summary.
///
/// Figure names are `exits.<reason>`, `shadow_mmu.<name>`, `ksm.<name>`,
/// `kvm.<name>` and `wall_ns`. A policy without a value in any counted run
/// (a level it never reported) has no entry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseSummary {
    /// The guest's phase number (a label: phases are matched by their
    /// position in the run, and a number may repeat); None for the whole run.
    pub phase: Option<u32>,
    /// The name the reference run's guest gave the phase (ABI 1.1), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
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

/// A child run that ended without statistics (after the first repeat of its
/// policy: a first run that fails skips the policy).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRun {
    /// The policy.
    pub policy: String,
    /// The repeat (0-based).
    pub repeat: u32,
    /// How it ended: exit status or signal, and the last line of its standard error.
    pub detail: String,
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
    /// Guests per run: a fleet's figures are the fleet's, each guest's in
    /// its run's `guests`; left out for one guest.
    #[serde(default = "one_guest", skip_serializing_if = "is_one_guest")]
    pub guests: u32,
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

fn one_guest() -> u32 {
    1
}

fn is_one_guest(guests: &u32) -> bool {
    *guests == 1
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
    /// Runs that did not end with the guest's exit code 0, or ended without
    /// statistics, as "policy #repeat: detail".
    pub failed_runs: Vec<String>,
    /// The phase numbers of the reference run (the first counted run of the
    /// reference policy), in the order it took them.
    #[serde(default)]
    pub phase_sequence: Vec<u32>,
    /// Counted runs whose phase numbers differ from `phase_sequence`, as
    /// "policy #repeat: 0 1 2"; when there are any, `phases` covers only the
    /// leading phases that every counted run shares.
    #[serde(default)]
    pub phase_mismatches: Vec<String>,
    /// The host KVM statistics that are levels (instant or peak values, not
    /// cumulative counters), by their names in a run's `kvm` section.
    #[serde(default)]
    pub kvm_levels: Vec<String>,
    /// Per phase, by position in the run: the reference run's phases, or
    /// the leading ones every counted run shares (see `phase_mismatches`).
    pub phases: Vec<PhaseSummary>,
    /// The whole run.
    pub total: PhaseSummary,
    /// A fleet's guests (left out for one guest): each guest's own figures
    /// per policy, medians over the counted runs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<GuestSummary>,
    /// Per cost profile given with `--project`, per policy: the guest time
    /// projected onto that host, for the whole run and per phase (see
    /// [`super::projection`]).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub projection: super::projection::Projections,
    /// Every run, raw.
    pub runs: Vec<RunRecord>,
}

/// One guest of a fleet across the policies: medians over the counted runs
/// of its own whole-run figures, by policy.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestSummary {
    /// Its index in the fleet.
    pub index: u64,
    /// The VM exits the VMM served it (`exits.total`).
    pub exits: BTreeMap<String, f64>,
    /// Its secondary-MMU faults (`ept_read` + `ept_write` + `ept_fetch`).
    pub faults: BTreeMap<String, f64>,
    /// Its run's wall time in ns.
    pub wall_ns: BTreeMap<String, f64>,
}

#[cfg(test)]
mod tests {
    use super::super::fold::tests::{report, run};
    use super::*;

    #[test]
    fn the_document_round_trips_through_json() {
        let runs = vec![run("off", 0, 0, vec![7]), run("legacy", 0, 5, vec![7])];
        let r = report(&["off", "legacy"], runs);
        let json = serde_json::to_string(&r).expect("json");
        let back: CompareReport = serde_json::from_str(&json).expect("parse");
        assert_eq!(back, r);
        let v: serde_json::Value = serde_json::from_str(&json).expect("value");
        assert_eq!(v["schema"], COMPARE_SCHEMA);
        assert_eq!(v["version"], COMPARE_VERSION);
    }

    #[test]
    fn a_version_1_document_without_the_new_keys_still_reads() {
        let r = report(&["off"], vec![run("off", 0, 0, vec![7])]);
        let mut v = serde_json::to_value(&r).expect("value");
        for key in ["phase_sequence", "phase_mismatches", "kvm_levels"] {
            v.as_object_mut().expect("object").remove(key);
        }
        let back: CompareReport = serde_json::from_value(v).expect("parse");
        assert!(back.phase_mismatches.is_empty() && back.phases == r.phases);
    }
}
