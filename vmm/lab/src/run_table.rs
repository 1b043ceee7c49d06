//! The table `vmm run` prints at the end of a run (in the spirit of
//! `perf kvm stat report`): exits by reason per phase, then every other
//! figure that is non-zero in some phase.

use std::collections::BTreeMap;
use std::fmt::Write;

use vmm::stats::{Figures, RunStats};

/// A duration for people: `850 ns`, `12.5 us`, `3.2 ms`, `1.25 s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// One row per phase, then the whole run.
type Rows<'a> = Vec<(String, &'a Figures)>;

/// Renders the per-phase report of a run: the exits table, a table per
/// section of named counters (secondary MMU, deduplicator, host KVM) with
/// the counters that moved, and how the run ended.
pub fn render_table(stats: &RunStats) -> String {
    let mut out = String::new();
    let rows: Rows<'_> = stats
        .phases
        .iter()
        .map(|p| (format!("phase {}", p.phase), &p.figures))
        .chain(std::iter::once(("total".to_string(), &stats.total)))
        .collect();
    let _ = writeln!(out, "VM exits by reason ({} policy, {} view)", stats.config.dedup, stats.config.view);
    render_exits(&mut out, &rows, &stats.total);
    type Section = (&'static str, fn(&Figures) -> &BTreeMap<String, u64>);
    let sections: [Section; 3] =
        [("secondary MMU", |f| &f.shadow_mmu), ("ksm", |f| &f.ksm), ("host KVM (binary stats)", |f| &f.kvm)];
    for (title, get) in sections {
        render_counters(&mut out, title, &rows, get);
    }
    let end = &stats.guest.end;
    let _ = writeln!(out, "\nrun ended: {} ({})", end.reason, end.detail);
    out
}

/// Exits by reason, a column per reason that moved in the run (io, mmio,
/// ept_read, ept_write and total always), and the wall time.
fn render_exits(out: &mut String, rows: &Rows<'_>, total: &Figures) {
    let columns: Vec<&str> = total
        .exits
        .columns()
        .iter()
        .filter(|(name, v)| *v != 0 || matches!(*name, "io" | "mmio" | "ept_read" | "ept_write" | "total"))
        .map(|(name, _)| *name)
        .collect();
    let _ = write!(out, "{:<12}", "");
    for c in &columns {
        let _ = write!(out, "{c:>10}");
    }
    let _ = writeln!(out, "{:>12}", "wall");
    for (label, f) in rows {
        let _ = write!(out, "{label:<12}");
        for c in &columns {
            let v = f.exits.columns().iter().find(|(n, _)| n == c).map_or(0, |(_, v)| *v);
            let _ = write!(out, "{v:>10}");
        }
        let _ = writeln!(out, "{:>12}", fmt_ns(f.wall_ns));
    }
}

/// One section of named counters, a row per counter that is non-zero in
/// some phase, a column per phase; nothing when none is.
fn render_counters(out: &mut String, title: &str, rows: &Rows<'_>, get: fn(&Figures) -> &BTreeMap<String, u64>) {
    let mut names: Vec<&String> =
        rows.iter().flat_map(|(_, f)| get(f).iter().filter(|(_, v)| **v != 0).map(|(n, _)| n)).collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    let _ = write!(out, "{:<28}", "");
    for (label, _) in rows {
        let _ = write!(out, "{label:>12}");
    }
    let _ = writeln!(out);
    for name in names {
        let _ = write!(out, "{name:<28}");
        for (_, f) in rows {
            let _ = write!(out, "{:>12}", get(f).get(name).copied().unwrap_or(0));
        }
        let _ = writeln!(out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fold::tests::{phase, run_with};

    #[test]
    fn table_shows_phases_total_and_moved_stats() {
        let mut phases = vec![phase(0, 2), phase(7, 3)];
        for p in &mut phases {
            p.figures.shadow_mmu.insert("installed".into(), p.phase.into());
        }
        let mut stats = run_with("off", 0, phases, vec![1, 2]).stats;
        stats.total.kvm.insert("pf_fixed".into(), 5);
        let t = render_table(&stats);
        assert!(t.contains("phase 0") && t.contains("phase 7") && t.contains("total"));
        assert!(t.contains("pf_fixed"));
        assert!(t.contains("installed"));
        assert!(!t.contains("\nksm\n"), "an all-zero section is left out");
        let io = t.lines().find(|l| l.starts_with("total")).expect("total row");
        assert!(io.split_whitespace().nth(1) == Some("5"), "{io}");
    }

    #[test]
    fn durations_read_in_their_unit() {
        assert_eq!(fmt_ns(850), "850 ns");
        assert_eq!(fmt_ns(12_500), "12.5 us");
        assert_eq!(fmt_ns(3_200_000), "3.2 ms");
        assert_eq!(fmt_ns(1_250_000_000), "1.25 s");
    }
}
