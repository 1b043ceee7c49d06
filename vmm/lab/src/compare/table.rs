//! The side-by-side table `vmm compare` prints: per phase, one row per figure
//! that moved under some policy, one column per policy; each cell is the
//! median over the repeats, its spread (± half the min-max range, when there
//! was more than one repeat) and its difference from `off`. Phases are shown
//! by their position in the run, labelled with the guest's numbers.

use std::fmt::Write;

use super::summary::{CompareReport, PhaseSummary, Summary};
use crate::run_table::fmt_ns;

const NAME_WIDTH: usize = 30;

/// Display order of the sections (figure-name prefixes) and their titles.
const SECTIONS: [(&str, &str); 5] = [
    ("exits.", "VM exits seen by the VMM"),
    ("shadow_mmu.", "secondary MMU"),
    ("ksm.", "deduplicator (sysfs names)"),
    ("kvm.", "host KVM (binary stats that moved)"),
    ("wall_ns", "time"),
];

/// How a figure is shown: a count, a time, or a size.
#[derive(Clone, Copy)]
enum Unit {
    Count,
    Nanos,
    Bytes,
}

fn unit_of(name: &str) -> Unit {
    if name.ends_with("_ns") {
        Unit::Nanos
    } else if name.ends_with("_bytes") || name.ends_with("profit") || name.ends_with("bytes_returned") {
        Unit::Bytes
    } else {
        Unit::Count
    }
}

fn fmt_value(v: f64, unit: Unit) -> String {
    match unit {
        Unit::Count if v.fract() == 0.0 => format!("{v:.0}"),
        Unit::Count => format!("{v:.1}"),
        Unit::Nanos => fmt_ns(v.max(0.0) as u64),
        Unit::Bytes => match v {
            b if b < 10.0 * 1024.0 => format!("{b:.0} B"),
            b if b < 10.0 * 1024.0 * 1024.0 => format!("{:.1} KiB", b / 1024.0),
            b => format!("{:.1} MiB", b / (1024.0 * 1024.0)),
        },
    }
}

fn cell(s: &Summary, unit: Unit) -> String {
    let mut text = fmt_value(s.median, unit);
    if s.max > s.min {
        let half = (s.max - s.min) as f64 / 2.0;
        let _ = write!(text, " ±{}", fmt_value(half, unit));
    }
    if !s.absent.is_empty() {
        let _ = write!(text, " [{}/{}]", s.values.len(), s.values.len() + s.absent.len());
    }
    if let Some(d) = s.diff_from_off {
        let sign = if d > 0.0 {
            format!("+{}", fmt_value(d, unit))
        } else if d < 0.0 {
            format!("-{}", fmt_value(-d, unit))
        } else {
            "=".into()
        };
        let _ = write!(text, " ({sign})");
    }
    text
}

fn render_phase(out: &mut String, title: &str, p: &PhaseSummary, policies: &[String]) {
    // Rows first (section title, or figure name and cells), then widths.
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    for (prefix, section) in SECTIONS {
        let mut figures: Vec<(&String, _)> =
            p.figures.iter().filter(|(name, by)| name.starts_with(prefix) && by.values().any(|s| s.max != 0)).collect();
        if figures.is_empty() {
            continue;
        }
        if prefix == "exits." {
            // The per-run table's order, total last.
            let order = vmm::stats::ExitCounts::default().columns().map(|(n, _)| n);
            figures.sort_by_key(|(name, _)| order.iter().position(|o| name.strip_prefix(prefix) == Some(o)));
        }
        rows.push((format!("  {section}"), Vec::new()));
        for (name, by) in figures {
            let short = name.strip_prefix(prefix).filter(|s| !s.is_empty()).unwrap_or("wall");
            let unit = unit_of(name);
            let cells = policies.iter().map(|policy| by.get(policy).map_or_else(|| "-".into(), |s| cell(s, unit)));
            rows.push((format!("    {short}"), cells.collect()));
        }
    }
    let widths: Vec<usize> = policies
        .iter()
        .enumerate()
        .map(|(i, policy)| {
            rows.iter().filter_map(|(_, c)| c.get(i)).map(|c| c.chars().count()).fold(policy.len(), usize::max)
        })
        .collect();
    let _ = writeln!(out, "\n== {title}");
    let _ = write!(out, "{:<NAME_WIDTH$}", "");
    for (policy, w) in policies.iter().zip(&widths) {
        let _ = write!(out, "  {policy:>w$}");
    }
    let _ = writeln!(out);
    for (label, cells) in rows {
        if cells.is_empty() {
            let _ = writeln!(out, "{label}");
            continue;
        }
        let _ = write!(out, "{label:<NAME_WIDTH$}");
        for (c, w) in cells.iter().zip(&widths) {
            let _ = write!(out, "  {c:>w$}");
        }
        let _ = writeln!(out);
    }
}

/// Renders the whole comparison.
pub fn render(report: &CompareReport) -> String {
    let mut out = String::new();
    let s = &report.setup;
    let fleet = if s.guests > 1 { format!(" x {} guests (the fleet's figures)", s.guests) } else { String::new() };
    let _ = writeln!(
        out,
        "vmm compare: {}{fleet} with {} of RAM, {} view, {} repeat(s) per policy, interleaved",
        s.image,
        vmm::size::format_size(s.mem_bytes),
        s.view,
        s.repeat
    );
    let _ = writeln!(
        out,
        "cells: median{} (difference from off's median); rows: figures that are not zero under some policy",
        if s.repeat > 1 { " ±half the min-max range over the repeats (left out when 0)" } else { "" }
    );
    for skipped in &report.skipped {
        let _ = writeln!(out, "skipped {}: {}", skipped.policy, skipped.reason);
    }
    if report.policies.iter().any(|p| p == "kernel") {
        let _ = writeln!(
            out,
            "kernel: the host KVM serves the faults of its own secondary MMU in the kernel; they show in the \
             host KVM rows (exits, pf_taken), not as VM exits seen by the VMM"
        );
    }
    if !report.phase_mismatches.is_empty() {
        let shown: Vec<String> = report.phase_sequence.iter().map(u32::to_string).collect();
        let _ = writeln!(
            out,
            "PHASE SEQUENCES DIFFER from the reference run's ({}) in: {}; per phase, only the first {} phase(s), \
             which every counted run shares, are compared (the whole run covers every counted run)",
            shown.join(" "),
            report.phase_mismatches.join(", "),
            report.phases.len()
        );
    }
    let absent = report
        .phases
        .iter()
        .chain(std::iter::once(&report.total))
        .any(|p| p.figures.values().flat_map(|by| by.values()).any(|s| !s.absent.is_empty()));
    if absent {
        let _ = writeln!(
            out,
            "[n/m]: a host KVM level that only n of m runs reported by then (KVM reports a level when it changes): \
             the others' values are unknown and left out; \"-\": no run of the policy reported it"
        );
    }
    let numbers: Vec<u32> = report.phases.iter().filter_map(|p| p.phase).collect();
    for (i, p) in report.phases.iter().enumerate() {
        let n = p.phase.unwrap_or(0);
        let mut title = format!("phase {}", vmm::stats::phase_label(n, p.name.as_deref()));
        if numbers.iter().filter(|&&m| m == n).count() > 1 {
            let time = numbers[..i].iter().filter(|&&m| m == n).count() + 1;
            let _ = write!(title, " (time {time}, position {} in the run)", i + 1);
        }
        render_phase(&mut out, &title, p, &report.policies);
    }
    render_phase(&mut out, "whole run", &report.total, &report.policies);
    render_guest_exits(&mut out, report);
    super::projection::render(&mut out, report, NAME_WIDTH);
    let _ = writeln!(out);
    if report.reports_identical {
        let _ = writeln!(out, "guest reports: identical in every run of every policy");
    } else {
        let _ = writeln!(
            out,
            "GUEST REPORTS DIFFER from the reference run in: {} (deduplication changed what the guest read)",
            report.report_mismatches.join(", ")
        );
    }
    for f in &report.failed_runs {
        let _ = writeln!(out, "run did not succeed: {f}");
    }
    out
}

/// A fleet's exits per guest and policy: the median over the repeats of
/// each guest's whole-run exits (the VMM's, secondary-MMU faults included).
fn render_guest_exits(out: &mut String, report: &CompareReport) {
    if report.guests.is_empty() {
        return;
    }
    let _ = write!(out, "\nexits per guest (the VMM's, median over the repeats)\n{:>8}", "guest");
    for p in &report.policies {
        let _ = write!(out, " {p:>14}");
    }
    for g in &report.guests {
        let _ = write!(out, "\n{:>8}", g.index);
        for p in &report.policies {
            let cell = g.exits.get(p).map_or("-".to_string(), |v| format!("{v}"));
            let _ = write!(out, " {cell:>14}");
        }
    }
    let _ = writeln!(out);
}

/// The comparison as CSV records `position,phase,name,figure,policy,median,
/// min,max,runs,absent,diff_from_off`: one per phase (position 0 is the
/// first; the whole run has them empty and the name `total`), figure and
/// policy with a value. `runs` counts the runs with a value, `absent` those
/// without (a host KVM level not reported); `diff_from_off` is empty when
/// there is none.
pub fn render_csv(report: &CompareReport) -> String {
    let header =
        ["position", "phase", "name", "figure", "policy", "median", "min", "max", "runs", "absent", "diff_from_off"];
    let mut out = crate::csv::record(&header);
    let phases = report.phases.iter().enumerate().map(|(i, p)| {
        (i.to_string(), p.phase.map_or_else(String::new, |n| n.to_string()), p.name.clone().unwrap_or_default(), p)
    });
    let total = std::iter::once((String::new(), String::new(), "total".to_string(), &report.total));
    for (position, phase, name, p) in phases.chain(total) {
        for (figure, by) in &p.figures {
            for policy in &report.policies {
                let Some(s) = by.get(policy) else { continue };
                let diff = s.diff_from_off.map(crate::csv::number).unwrap_or_default();
                out.push_str(&crate::csv::record(&[
                    position.as_str(),
                    &phase,
                    &name,
                    figure,
                    policy,
                    &crate::csv::number(s.median),
                    &s.min.to_string(),
                    &s.max.to_string(),
                    &s.values.len().to_string(),
                    &s.absent.len().to_string(),
                    &diff,
                ]));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeSet;

    use super::super::fold::build_report;
    use super::super::fold::tests::{phase, report, run, run_with, setup};
    use super::*;

    #[test]
    fn the_table_has_a_column_per_policy_and_the_difference_from_off() {
        let runs = vec![
            run("off", 0, 0, vec![1]),
            run("change-pte", 0, 4, vec![1]),
            run("off", 1, 0, vec![1]),
            run("change-pte", 1, 8, vec![1]),
        ];
        let mut s = setup();
        s.repeat = 2;
        let r =
            build_report(s, vec!["off".into(), "change-pte".into()], Vec::new(), runs, Vec::new(), &BTreeSet::new());
        let t = render(&r);
        assert!(t.contains("== phase 1") && t.contains("== whole run"), "{t}");
        let line = t.lines().find(|l| l.trim_start().starts_with("ept_write")).expect("ept_write row");
        assert!(line.contains("6 ±2 (+6)"), "{line}");
        let wall = t.lines().find(|l| l.trim_start().starts_with("wall")).expect("wall row");
        assert!(wall.contains("ms"), "{wall}");
        assert!(t.contains("pages_sharing"));
        assert!(!t.contains("ept_read"), "rows that never moved are left out");
        assert!(t.contains("identical in every run"));
        assert!(!t.contains("PHASE SEQUENCES DIFFER") && !t.contains("[n/m]"), "{t}");
    }

    #[test]
    fn csv_has_a_record_per_phase_figure_and_policy() {
        let runs = vec![run("off", 0, 0, vec![1]), run("change-pte", 0, 4, vec![1])];
        let csv = render_csv(&report(&["off", "change-pte"], runs));
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("position,phase,name,figure,policy,median,min,max,runs,absent,diff_from_off"));
        assert!(csv.contains("0,1,,exits.ept_write,change-pte,4,4,4,1,0,4\n"), "{csv}");
        assert!(csv.contains("0,1,,exits.ept_write,off,0,0,0,1,0,\n"), "{csv}");
        assert!(csv.contains(",,total,exits.ept_write,change-pte,4,"), "{csv}");
    }

    #[test]
    fn differing_reports_are_shouted() {
        let runs = vec![run("off", 0, 0, vec![1]), run("legacy", 0, 1, vec![2])];
        let r = report(&["off", "legacy"], runs);
        assert!(render(&r).contains("GUEST REPORTS DIFFER from the reference run in: legacy #0"));
    }

    #[test]
    fn a_reused_phase_number_gets_its_own_section() {
        let phases = vec![phase(0, 1), phase(1, 2), phase(2, 3), phase(1, 4)];
        let t = render(&report(&["off"], vec![run_with("off", 0, phases, vec![])]));
        let titles: Vec<&str> = t.lines().filter(|l| l.starts_with("== ")).collect();
        assert_eq!(
            titles,
            [
                "== phase 0",
                "== phase 1 (time 1, position 2 in the run)",
                "== phase 2",
                "== phase 1 (time 2, position 4 in the run)",
                "== whole run"
            ]
        );
    }

    #[test]
    fn differing_phase_sequences_are_said_in_one_line() {
        let runs = vec![
            run_with("off", 0, vec![phase(0, 1), phase(1, 1), phase(2, 1)], vec![]),
            run_with("legacy", 0, vec![phase(0, 1), phase(3, 1)], vec![]),
        ];
        let t = render(&report(&["off", "legacy"], runs));
        let notes: Vec<&str> = t.lines().filter(|l| l.contains("PHASE SEQUENCES DIFFER")).collect();
        assert_eq!(notes.len(), 1, "{t}");
        assert!(notes[0].contains("(0 1 2)") && notes[0].contains("legacy #0: 0 3") && notes[0].contains("first 1 "));
        assert!(!t.contains("== phase 1") && !t.contains("== phase 3"), "{t}");
    }

    #[test]
    fn a_level_some_runs_did_not_report_is_marked() {
        let mut reported = phase(0, 1);
        reported.figures.kvm.insert("pages_4k".into(), 5);
        let runs = vec![
            run_with("off", 0, vec![phase(0, 1)], vec![]),
            run_with("legacy", 0, vec![reported], vec![]),
            run_with("legacy", 1, vec![phase(0, 1)], vec![]),
        ];
        let levels = BTreeSet::from(["pages_4k".to_string()]);
        let r = build_report(setup(), vec!["off".into(), "legacy".into()], Vec::new(), runs, Vec::new(), &levels);
        let t = render(&r);
        let line = t.lines().find(|l| l.trim_start().starts_with("pages_4k")).expect("pages_4k row");
        let cells: Vec<&str> = line.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(cells, ["pages_4k", "-", "5 [1/2]"], "{line}");
        assert!(t.contains("[n/m]: a host KVM level"), "{t}");
    }
}
