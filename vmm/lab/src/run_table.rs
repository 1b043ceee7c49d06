//! What `vmm run` prints at the end of a run, per phase and for the whole
//! run, in the layouts KVM people know:
//!
//! * the exits the VMM served, as `perf kvm stat report` prints VM exits:
//!   one row per event (port I/O split by the ABI's port classes) with
//!   Samples, Samples%, Time%, Min Time, Max Time and Avg time (± the
//!   relative standard error of the mean), the time being the VMM's, from
//!   KVM_RUN's return to the next KVM_RUN entry; rows by samples;
//! * the host KVM's binary statistics that moved, as `kvm_stat` prints
//!   them: Event, Total, %Total (the share of the counters' sum), and the
//!   average rate over the phase;
//!
//! then the secondary MMU's and the deduplicator's figures that moved, a
//! column per phase, and how the run ended. [`render_csv`] writes every
//! figure as one CSV record.

use std::collections::BTreeMap;
use std::fmt::Write;

use vmm::exit_times::{ExitTimes, ServiceTime, UFFD_READ, UFFD_WRITE};
use vmm::stats::{Figures, GuestStats, RunStats};
use vmm::units::{own_unit, FigureKind, FigureUnit, Units};

use crate::compare::fold::flatten;

/// A duration for people: `850 ns`, `12.5 us`, `3.2 ms`, `1.25 s`.
pub fn fmt_ns(ns: u64) -> String {
    match ns {
        0..=999 => format!("{ns} ns"),
        1_000..=999_999 => format!("{:.1} us", ns as f64 / 1e3),
        1_000_000..=999_999_999 => format!("{:.1} ms", ns as f64 / 1e6),
        _ => format!("{:.2} s", ns as f64 / 1e9),
    }
}

/// One stretch of the run: its title and figures.
type Stretch<'a> = (String, &'a Figures);

fn stretches(stats: &RunStats) -> Vec<Stretch<'_>> {
    stats
        .phases
        .iter()
        .map(|p| (format!("phase {}", p.label()), &p.figures))
        .chain(std::iter::once(("the whole run".to_string(), &stats.total)))
        .collect()
}

/// Renders the run's report: per phase and for the whole run, the exits
/// and the host KVM's statistics; then the other layers' figures, and how
/// the run ended.
pub fn render_table(stats: &RunStats) -> String {
    let mut out = String::new();
    let c = &stats.config;
    let fleet = if c.guests > 1 { format!(" x {} guests", c.guests) } else { String::new() };
    let _ = writeln!(
        out,
        "VM exits by reason ({} policy, {} view): {}{fleet}, {} of RAM",
        c.dedup,
        c.view,
        c.image,
        vmm::size::format_size(c.mem_bytes)
    );
    let mut untimed = false;
    for (title, f) in stretches(stats) {
        let _ = writeln!(out, "\nAnalyze events for {title} (wall {}):", fmt_ns(f.wall_ns));
        untimed |= render_exit_times(&mut out, &f.exit_times);
        render_kvm_stat(&mut out, &f.kvm, f.wall_ns, &stats.units);
    }
    let _ = writeln!(
        out,
        "\nTime: what serving the exit cost the VMM, from KVM_RUN's return to the next KVM_RUN entry (a phase \
         marker's includes reading every layer's counters; a dedup request's, the pass the vCPU waited for); for \
         {UFFD_READ} and {UFFD_WRITE}, the secondary-MMU faults the userfaultfd view served on its fault thread \
         while the vCPU waited inside KVM_RUN (no exit), from the fault thread's taking the fault to its handler's \
         return."
    );
    if untimed {
        let _ = writeln!(
            out,
            "\"-\": a time that was not measured (statistics written before the userfaultfd view's faults were \
             timed)."
        );
    }
    let _ = writeln!(
        out,
        "%Total: the share of the sum of the host KVM's counters that moved (levels and times are not summed: \
         \"-\"); Avg/s: over the stretch's wall time."
    );
    let rows = stretches(stats);
    render_counters(&mut out, "secondary MMU", &rows, |f| &f.shadow_mmu, |_| true);
    let linux_title = "deduplicator (the names of /sys/kernel/mm/ksm and /proc/PID/ksm_stat)";
    if rows.iter().any(|(_, f)| !f.ksm_signed.is_empty()) {
        // The signed figures with their sign, in place of their clamped copies.
        render_counters(&mut out, linux_title, &rows, |f| &f.ksm, |n| is_linux_name(n) && !is_signed_name(n));
        render_counters(&mut out, "deduplicator (the figures Linux shows signed)", &rows, |f| &f.ksm_signed, |_| true);
    } else {
        render_counters(&mut out, linux_title, &rows, |f| &f.ksm, is_linux_name);
    }
    render_counters(&mut out, "deduplicator (the lab's own figures)", &rows, |f| &f.ksm, |n| !is_linux_name(n));
    render_guests(&mut out, &stats.guests);
    let end = &stats.guest.end;
    let _ = writeln!(out, "\nrun ended: {} ({})", end.reason, end.detail);
    out
}

/// A fleet's guests, one line each: how each ended, its exits by reason,
/// the secondary-MMU entries it zapped and installed, its wall time (the
/// tables above are the fleet's: each guest's own figures summed, the
/// deduplicator's fleet-wide).
fn render_guests(out: &mut String, guests: &[GuestStats]) {
    if guests.is_empty() {
        return;
    }
    let _ = writeln!(
        out,
        "\nguests (the tables above are the fleet's: each guest's own figures summed, the deduplicator's \
         fleet-wide)\n{:>5}  {:<12} {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
        "guest", "end", "code", "exits", "io", "ept_read", "ept_write", "ept_fetch", "zapped", "installed", "wall"
    );
    for g in guests {
        let (e, mmu) = (&g.total.exits, &g.total.shadow_mmu);
        let count = |name: &str| mmu.get(name).copied().unwrap_or(0);
        let code = g.guest.exit_code.map_or("-".to_string(), |c| c.to_string());
        let _ = writeln!(
            out,
            "{:>5}  {:<12} {:>5} {:>9} {:>7} {:>9} {:>9} {:>9} {:>9} {:>9} {:>10}",
            g.index,
            g.guest.end.reason,
            code,
            e.total,
            e.io,
            e.ept_read,
            e.ept_write,
            e.ept_fetch,
            count("zapped"),
            count("installed"),
            fmt_ns(g.total.wall_ns)
        );
    }
}

/// The `perf kvm stat report` block of one stretch; true when it has
/// untimed rows.
fn render_exit_times(out: &mut String, times: &ExitTimes) -> bool {
    let mut rows: Vec<(&String, &ServiceTime)> = times.iter().collect();
    rows.sort_by(|a, b| b.1.samples.cmp(&a.1.samples).then(a.0.cmp(b.0)));
    let samples: u64 = rows.iter().map(|(_, t)| t.samples).sum();
    let time: u64 = rows.iter().filter_map(|(_, t)| t.total_ns).sum();
    let w = rows.iter().map(|(n, _)| n.len()).max().unwrap_or(0).max(20);
    let _ = writeln!(
        out,
        "\n{:>w$} {:>10} {:>9} {:>9} {:>11} {:>11} {:>16}\n",
        "VM-EXIT", "Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time"
    );
    let pct = |part: f64, whole: f64| if whole > 0.0 { 100.0 * part / whole } else { 0.0 };
    let us = |ns: u64| format!("{:.2}us", ns as f64 / 1e3);
    for (name, t) in &rows {
        let _ = write!(out, "{name:>w$} {:>10} {:>8.2}% ", t.samples, pct(t.samples as f64, samples as f64));
        match (t.total_ns, t.min_ns, t.max_ns, t.mean_ns()) {
            (Some(total), Some(min), Some(max), Some(mean)) => {
                let rel = t.rel_stddev_pct().unwrap_or(0.0);
                let _ = writeln!(
                    out,
                    "{:>8.2}% {:>11} {:>11} {:>9.2}us ( +-{rel:>7.2}% )",
                    pct(total as f64, time as f64),
                    us(min),
                    us(max),
                    mean / 1e3
                );
            }
            _ => {
                let _ = writeln!(out, "{:>9} {:>11} {:>11} {:>11}", "-", "-", "-", "-");
            }
        }
    }
    let _ = writeln!(out, "\nTotal Samples:{samples}, Total events handled time:{:.2}us.", time as f64 / 1e3);
    rows.iter().any(|(_, t)| t.total_ns.is_none())
}

/// The kind of a host KVM statistic (a count when the document does not say).
fn kvm_kind(name: &str, units: &Units) -> FigureKind {
    units.get(&format!("kvm.{name}")).map_or(FigureKind::Count, |u| u.kind)
}

/// The `kvm_stat` block of one stretch: the host KVM's statistics that
/// moved, largest first.
fn render_kvm_stat(out: &mut String, kvm: &BTreeMap<String, u64>, wall_ns: u64, units: &Units) {
    if kvm.is_empty() {
        let _ = writeln!(out, "\n host KVM: no statistic moved");
        return;
    }
    let counters: u64 = kvm.iter().filter(|(n, _)| kvm_kind(n, units) == FigureKind::Count).map(|(_, v)| v).sum();
    let mut rows: Vec<(&String, &u64)> = kvm.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(out, "\n {:<40} {:>10}{:>7} {:>8}", "Event", "Total", "%Total", "Avg/s");
    let secs = wall_ns as f64 / 1e9;
    for (name, &v) in rows {
        let (share, rate) = match kvm_kind(name, units) {
            FigureKind::Count if counters > 0 && secs > 0.0 => {
                (format!("{:.1}", 100.0 * v as f64 / counters as f64), format!("{:.0}", v as f64 / secs))
            }
            _ => ("-".to_string(), "-".to_string()),
        };
        let _ = writeln!(out, " {name:<40} {v:>10}{share:>7} {rate:>8}");
    }
    let _ = writeln!(out, " {:<40} {counters:>10}", "Total");
}

/// One section of named counters, a row per counter that is non-zero in
/// some stretch, a column per stretch; nothing when none is.
/// The deduplicator's figures Linux shows under these names: the files of
/// /sys/kernel/mm/ksm (Documentation/admin-guide/mm/ksm.rst) and the lines
/// of /proc/PID/ksm_stat; the others are the lab's own.
const LINUX_KSM_NAMES: [&str; 14] = [
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "pages_scanned",
    "pages_skipped",
    "full_scans",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
    "general_profit",
    "ksm_rmap_items",
    "ksm_merging_pages",
    "ksm_process_profit",
];

fn is_linux_name(name: &str) -> bool {
    LINUX_KSM_NAMES.contains(&name)
}

/// The figures Linux shows signed (`ksm_signed` holds them with their sign).
fn is_signed_name(name: &str) -> bool {
    matches!(name, "general_profit" | "ksm_process_profit")
}

/// One block of named figures, a column per stretch: the figures `keep`
/// keeps that are not zero in some stretch.
fn render_counters<T: Copy + Default + PartialEq + std::fmt::Display>(
    out: &mut String,
    title: &str,
    rows: &[Stretch<'_>],
    get: fn(&Figures) -> &BTreeMap<String, T>,
    keep: fn(&str) -> bool,
) {
    let mut names: Vec<&String> = rows
        .iter()
        .flat_map(|(_, f)| get(f).iter().filter(|(n, v)| **v != T::default() && keep(n)).map(|(n, _)| n))
        .collect();
    names.sort();
    names.dedup();
    if names.is_empty() {
        return;
    }
    let _ = writeln!(out, "\n{title}");
    let _ = write!(out, "{:<28}", "");
    for i in 0..rows.len() {
        let label = if i + 1 == rows.len() { "total".to_string() } else { format!("#{i}") };
        let _ = write!(out, "{label:>12}");
    }
    let _ = writeln!(out);
    for name in names {
        let _ = write!(out, "{name:<28}");
        for (_, f) in rows {
            let _ = write!(out, "{:>12}", get(f).get(name).copied().unwrap_or_default());
        }
        let _ = writeln!(out);
    }
    let _ = writeln!(out, "(#i: the phase at position i in the run, as listed above)");
}

/// The unit of a figure of `stats`: the document's, else the VMM's table.
fn unit_of(stats: &RunStats, figure: &str) -> Option<FigureUnit> {
    stats.units.get(figure).cloned().or_else(|| own_unit(figure))
}

/// Every figure of the run as CSV records `position,phase,name,figure,
/// value,unit,kind`: a record per figure of each phase (position 0 is the
/// first), then of the whole run (position and phase empty, name `total`).
/// Exit times are the figures `exit_times.<event>.samples`, `.total_ns`,
/// `.min_ns`, `.max_ns` and `.stddev_ns`.
pub fn render_csv(stats: &RunStats) -> String {
    let mut out = crate::csv::record(&["position", "phase", "name", "figure", "value", "unit", "kind"]);
    let phases = stats
        .phases
        .iter()
        .enumerate()
        .map(|(i, p)| (i.to_string(), p.phase.to_string(), p.name.clone().unwrap_or_default(), &p.figures));
    let total = std::iter::once((String::new(), String::new(), "total".to_string(), &stats.total));
    for (position, phase, name, f) in phases.chain(total) {
        let mut figures: Vec<(String, String, Option<FigureUnit>)> = flatten(f)
            .into_iter()
            .map(|(figure, v)| {
                let unit = unit_of(stats, &figure);
                (figure, v.to_string(), unit)
            })
            .collect();
        for (event, t) in &f.exit_times {
            let samples = FigureUnit::new("exits", FigureKind::Count);
            figures.push((format!("exit_times.{event}.samples"), t.samples.to_string(), Some(samples)));
            let time = |v: Option<f64>| v.map(crate::csv::number);
            let timed = [
                ("total_ns", time(t.total_ns.map(|v| v as f64))),
                ("min_ns", time(t.min_ns.map(|v| v as f64))),
                ("max_ns", time(t.max_ns.map(|v| v as f64))),
                ("stddev_ns", time(t.stddev_ns)),
            ];
            for (key, v) in timed {
                if let Some(v) = v {
                    figures.push((
                        format!("exit_times.{event}.{key}"),
                        v,
                        Some(FigureUnit::new("ns", FigureKind::Time)),
                    ));
                }
            }
        }
        for (figure, value, unit) in figures {
            let (unit, kind) = unit.map_or((String::new(), String::new()), |u| (u.unit, kind_name(u.kind).into()));
            out.push_str(&crate::csv::record(&[&position, &phase, &name, &figure, &value, &unit, &kind]));
        }
    }
    out
}

/// A kind as the JSON writes it.
pub fn kind_name(kind: FigureKind) -> &'static str {
    match kind {
        FigureKind::Count => "count",
        FigureKind::Level => "level",
        FigureKind::Time => "time",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fold::tests::{phase, run_with};
    use vmm::exit_times::{ExitEvent, ExitTimer, PortClass};
    use vmm::stats::ExitKind;

    fn sample() -> RunStats {
        let mut phases = vec![phase(0, 2), phase(7, 3)];
        for p in &mut phases {
            p.figures.shadow_mmu.insert("installed".into(), p.phase.into());
        }
        phases[1].name = Some("merge pass".into());
        let mut timer = ExitTimer::default();
        for ns in [2_000, 4_000] {
            timer.record(ExitEvent::io(PortClass::Phase), ns);
        }
        timer.record(ExitEvent::reason(ExitKind::EptRead), 90_000);
        phases[1].figures.exit_times = timer.times();
        phases[1].figures.exit_times.insert(UFFD_READ.into(), ServiceTime::untimed(5));
        let mut stats = run_with("off", 0, phases, vec![1, 2]).stats;
        stats.total.kvm.insert("pf_fixed".into(), 5);
        stats.total.kvm.insert("exits".into(), 15);
        stats.total.kvm.insert("pages_4k".into(), 300);
        stats.units.insert("kvm.pages_4k".into(), FigureUnit::new("none", FigureKind::Level));
        stats.total.wall_ns = 1_000_000_000;
        stats
    }

    #[test]
    fn the_exit_block_is_laid_out_as_perf_kvm_stat_report() {
        let t = render_table(&sample());
        assert!(t.starts_with("VM exits by reason"), "{t}");
        assert!(t.contains("Analyze events for phase 7 \"merge pass\""), "{t}");
        let header = t.lines().find(|l| l.contains("VM-EXIT")).expect("header");
        let columns: Vec<&str> = header.split("  ").map(str::trim).filter(|c| !c.is_empty()).collect();
        assert_eq!(columns, ["VM-EXIT", "Samples", "Samples%", "Time%", "Min Time", "Max Time", "Avg time"]);
        let phase_row = t.lines().find(|l| l.trim_start().starts_with("io:phase ")).expect("io:phase row");
        // 2 of 8 samples; 6 us of 96 us; 2, 4 and 3 us.
        assert!(phase_row.contains("25.00%") && phase_row.contains("6.25%"), "{phase_row}");
        assert!(phase_row.contains("2.00us") && phase_row.contains("4.00us") && phase_row.contains("3.00us ( +-"));
        let uffd = t.lines().find(|l| l.contains(UFFD_READ) && l.contains('5')).expect("uffd row");
        assert!(uffd.trim_end().ends_with('-'), "untimed: {uffd}");
        assert!(t.contains("Total Samples:8, Total events handled time:96.00us."), "{t}");
        assert!(t.contains("a time that was not measured"), "the footnote says why: {t}");
    }

    #[test]
    fn the_host_kvm_block_is_laid_out_as_kvm_stat() {
        let t = render_table(&sample());
        let header = t.lines().find(|l| l.trim_start().starts_with("Event")).expect("kvm_stat header");
        assert!(header.contains("Total") && header.contains("%Total"), "{header}");
        let exits = t.lines().find(|l| l.trim_start().starts_with("exits ")).expect("exits row");
        // 15 of the counters' 20: 75.0%, 15 per second over 1 s.
        assert!(exits.contains(" 75.0") && exits.trim_end().ends_with(" 15"), "{exits}");
        let level = t.lines().find(|l| l.trim_start().starts_with("pages_4k")).expect("level row");
        assert!(level.contains(" 300") && level.trim_end().ends_with('-'), "a level is not summed: {level}");
        assert!(t.contains("secondary MMU") && t.contains("installed"));
    }

    #[test]
    fn csv_has_a_record_per_figure_with_its_unit() {
        let csv = render_csv(&sample());
        let mut lines = csv.lines();
        assert_eq!(lines.next(), Some("position,phase,name,figure,value,unit,kind"));
        assert!(csv.contains("1,7,merge pass,exits.io,3,exits,count"), "{csv}");
        assert!(csv.contains("1,7,merge pass,exit_times.io:phase.total_ns,6000,ns,time"), "{csv}");
        assert!(csv.contains(",,total,kvm.pages_4k,300,none,level"), "{csv}");
        assert!(csv.contains(",,total,wall_ns,1000000000,ns,time"), "{csv}");
    }

    #[test]
    fn durations_read_in_their_unit() {
        assert_eq!(fmt_ns(850), "850 ns");
        assert_eq!(fmt_ns(12_500), "12.5 us");
        assert_eq!(fmt_ns(3_200_000), "3.2 ms");
        assert_eq!(fmt_ns(1_250_000_000), "1.25 s");
    }
}
