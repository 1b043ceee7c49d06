//! `vmm bench model`: the cost model checked. Every workload runs under
//! `off` and each built-in policy (a `vmm compare` each, projected onto a
//! profile measured on this host); per workload and policy, the measured
//! whole-run wall time against the predicted one
//! (`off`'s wall + (events - off's events) x cost, see [`crate::cost`]).
//! `off` itself is predicted exactly by construction: it is listed (its
//! time is the base of every projection) but left out of the error figures.
//! Every run may be projected onto other profiles as well (`--project`).

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use crate::compare::summary::CompareReport;
use crate::compare::{compare, CompareConfig, CompareError};
use crate::cost::CostProfile;
use crate::progress::Progress;

/// The error the model must stay within (a fraction of the measured time).
pub const MODEL_LIMIT: f64 = 0.30;
/// The error the model aims at.
pub const MODEL_GOAL: f64 = 0.15;

/// The workloads checked by default: the built-in guests that exercise the
/// policies, none of which the profile was measured on (`unique` and
/// `converge` are its calibration guests; pagefill's reads give the fault
/// bench its faults, not its time).
pub const MODEL_WORKLOADS: &[&str] = &["pagefill", "cowstorm", "mixed", "volatile", "stress", "kvstore", "gcheap"];

/// One workload under one policy.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelPoint {
    /// The measured whole-run wall time (median over the repeats).
    pub measured_ns: f64,
    /// What the profile predicts.
    pub predicted_ns: f64,
    /// (predicted - measured) / measured; 0 for `off`, by construction.
    pub error: f64,
    /// The same run projected onto each other profile (`--project`), by name.
    pub projected_ns: BTreeMap<String, f64>,
}

/// The `vmm bench model` report.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ModelReport {
    /// What was measured.
    pub bench: &'static str,
    /// The profile's name.
    pub profile: String,
    /// The host it describes.
    pub profile_host: String,
    /// The view of the runs.
    pub view: String,
    /// Guest RAM.
    pub mem_bytes: u64,
    /// Runs per policy and workload.
    pub repeat: u32,
    /// [`MODEL_LIMIT`].
    pub limit: f64,
    /// [`MODEL_GOAL`].
    pub goal: f64,
    /// Per workload, per policy.
    pub workloads: BTreeMap<String, BTreeMap<String, ModelPoint>>,
    /// The largest |error| over every workload and policy.
    pub max_abs_error: f64,
    /// The median |error|.
    pub median_abs_error: f64,
    /// Points within [`MODEL_LIMIT`], and in all.
    pub within_limit: usize,
    /// Points within [`MODEL_GOAL`].
    pub within_goal: usize,
    /// Points in all.
    pub points: usize,
}

/// What to check.
#[derive(Debug, Clone)]
pub struct ModelConfig {
    /// The workloads.
    pub workloads: Vec<String>,
    /// Where each workload's comparison goes (a subdirectory each).
    pub out: PathBuf,
    /// Template of the comparisons: policies (`off` first), view, RAM, repeat.
    pub base: CompareConfig,
    /// The profile (normally this host's, from `vmm bench profile`).
    pub profile: CostProfile,
    /// Other hosts' profiles to project every run onto as well.
    pub others: Vec<CostProfile>,
}

/// Each policy's point from a comparison projected onto the profiles.
fn points(report: &CompareReport, config: &ModelConfig) -> Result<BTreeMap<String, ModelPoint>, CompareError> {
    let by_policy = report.projection.get(&config.profile.name).ok_or(CompareError::ProjectionWithoutOff)?;
    let other = |name: &str, policy: &str| report.projection.get(name).and_then(|by| by.get(policy));
    Ok(by_policy
        .iter()
        .map(|(policy, p)| {
            let (measured_ns, predicted_ns) = (p.total.measured_ns, p.total.total_ns);
            let projected_ns = config
                .others
                .iter()
                .filter_map(|o| other(&o.name, policy).map(|x| (o.name.clone(), x.total.total_ns)))
                .collect();
            let error = (predicted_ns - measured_ns) / measured_ns;
            (policy.clone(), ModelPoint { measured_ns, predicted_ns, error, projected_ns })
        })
        .collect())
}

/// Runs every workload and compares the measured times with the predicted.
pub fn bench_model(config: &ModelConfig, progress: &mut dyn Progress) -> Result<ModelReport, CompareError> {
    let mut workloads = BTreeMap::new();
    for image in &config.workloads {
        progress.note(&format!("checking the model on {image}"));
        let run = CompareConfig {
            image: image.clone(),
            out: config.out.join(image),
            profiles: std::iter::once(&config.profile).chain(&config.others).cloned().collect(),
            ..config.base.clone()
        };
        let report = compare(&run, progress)?;
        workloads.insert(image.clone(), points(&report, config)?);
    }
    let mut errors: Vec<f64> = workloads
        .values()
        .flat_map(|m| m.iter().filter(|(policy, _)| policy.as_str() != "off").map(|(_, p)| p.error.abs()))
        .collect();
    errors.sort_by(f64::total_cmp);
    let count = |bound: f64| errors.iter().filter(|&&e| e <= bound).count();
    Ok(ModelReport {
        bench: "model",
        profile: config.profile.name.clone(),
        profile_host: config.profile.host.clone(),
        view: config.base.view.name().to_string(),
        mem_bytes: config.base.mem_bytes,
        repeat: config.base.repeat,
        limit: MODEL_LIMIT,
        goal: MODEL_GOAL,
        max_abs_error: errors.last().copied().unwrap_or(f64::NAN),
        median_abs_error: errors.get(errors.len() / 2).copied().unwrap_or(f64::NAN),
        within_limit: count(MODEL_LIMIT),
        within_goal: count(MODEL_GOAL),
        points: errors.len(),
        workloads,
    })
}

/// The report as a table: one line per workload and policy (`off` first),
/// measured, predicted and the error, then each other profile's
/// projection with its ratio to off's.
pub fn render_model(report: &ModelReport) -> String {
    let others: Vec<&String> =
        report.workloads.values().flat_map(|m| m.values()).flat_map(|p| p.projected_ns.keys()).collect();
    let others: std::collections::BTreeSet<&String> = others.into_iter().collect();
    let mut out = format!(
        "vmm bench model: profile {} ({}), {} view, {} MiB, {} run(s) each\n{:<10} {:<12} {:>12} {:>12} {:>8}",
        report.profile,
        report.profile_host,
        report.view,
        report.mem_bytes >> 20,
        report.repeat,
        "workload",
        "policy",
        "measured",
        "predicted",
        "error"
    );
    for name in &others {
        out.push_str(&format!(" {name:>22}"));
    }
    out.push('\n');
    let ms = |ns: f64| format!("{:.1} ms", ns / 1e6);
    for (workload, by_policy) in &report.workloads {
        let off_first = by_policy.get_key_value("off").into_iter().chain(by_policy.iter().filter(|(p, _)| *p != "off"));
        for (policy, p) in off_first {
            let error = if policy == "off" { "base".to_string() } else { format!("{:+.1}%", p.error * 100.0) };
            out.push_str(&format!(
                "{workload:<10} {policy:<12} {:>12} {:>12} {error:>8}",
                ms(p.measured_ns),
                ms(p.predicted_ns)
            ));
            for name in &others {
                let off = by_policy.get("off").and_then(|o| o.projected_ns.get(*name)).copied().unwrap_or(f64::NAN);
                let cell = p.projected_ns.get(*name).map_or("-".into(), |&ns| format!("{} ({:.2}x)", ms(ns), ns / off));
                out.push_str(&format!(" {cell:>22}"));
            }
            out.push('\n');
        }
    }
    out.push_str(&format!(
        "|error| over the policies but off: median {:.1}%, max {:.1}%; {}/{} within {:.0}%, {}/{} within the goal of \
         {:.0}%\n",
        report.median_abs_error * 100.0,
        report.max_abs_error * 100.0,
        report.within_limit,
        report.points,
        report.limit * 100.0,
        report.within_goal,
        report.points,
        report.goal * 100.0
    ));
    out
}
