//! The README's Results section, in Markdown: the costs measured side by
//! side (`vmm bench`), then per workload a row per policy and view of the
//! whole run's figures (`vmm compare`), with its chart. A figure a
//! document lacks is written `-`.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::path::{Path, PathBuf};

use serde_json::Value;

use super::{views_in_order, Inputs, BEGIN, END};
use crate::compare::summary::{CompareReport, Summary};

/// What each known workload shows, for its heading.
const WORKLOADS: [(&str, &str); 7] = [
    ("pagefill", "read-mostly after merge"),
    ("cowstorm", "write-heavy: a copy-on-write storm"),
    ("mixed", "mixed reads and writes, many phases"),
    ("volatile", "volatile: pages that never settle, ksmd running"),
    ("dirtylog", "a pre-copy loop: soft-dirty rounds, reads of all memory, a shrinking working set"),
    ("kvstore-x4", "four key-value stores under YCSB B and A, their templates merged across guests"),
    ("template-x8", "eight guests of one image, then each diverges by its own writes"),
];

/// How links to the results' files are written: relative to `base` (the
/// README's directory) when they lie under it.
#[derive(Debug, Clone)]
pub struct Links {
    /// The directory links are relative to.
    pub base: PathBuf,
}

impl Links {
    fn to(&self, path: &Path) -> String {
        let (abs, base) = (path.canonicalize(), self.base.canonicalize());
        let rel = match (&abs, &base) {
            (Ok(a), Ok(b)) => a.strip_prefix(b).map(Path::to_path_buf).ok(),
            _ => None,
        };
        rel.unwrap_or_else(|| path.to_path_buf()).display().to_string()
    }
}

/// A whole number with thousands separators: `10,752`.
fn int(v: f64) -> String {
    let digits = format!("{:.0}", v.abs().round());
    let mut out = String::from(if v < -0.5 { "-" } else { "" });
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A JSON number at `path` (dotted) in `v`.
fn at<'a>(v: &'a Value, path: &str) -> Option<&'a Value> {
    path.split('.').try_fold(v, |v, k| v.get(k)).filter(|v| !v.is_null())
}

fn num(v: &Value, path: &str) -> Option<f64> {
    at(v, path).and_then(Value::as_f64)
}

/// `f` of a figure, or `-` when it is missing.
fn or_dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or_else(|| "-".to_string(), f)
}

/// The whole Results section, markers included.
pub fn render(inputs: &Inputs, charts: &BTreeMap<String, PathBuf>, links: &Links) -> String {
    let mut out = format!("{BEGIN}\n\n");
    let first = inputs.compares.values().flat_map(|v| v.values()).map(|(_, r)| r).next();
    let _ = writeln!(out, "{}\n", measured_line(first, inputs.floor.as_ref()));
    render_costs(&mut out, inputs);
    if !inputs.compares.is_empty() {
        let _ = writeln!(out, "### Exits per workload and policy\n");
    }
    let known = |w: &str| WORKLOADS.iter().position(|(n, _)| *n == w).unwrap_or(WORKLOADS.len());
    let mut workloads: Vec<&String> = inputs.compares.keys().collect();
    workloads.sort_by_key(|w| (known(w), (*w).clone()));
    for workload in workloads {
        render_workload(&mut out, workload, &inputs.compares[workload], charts.get(workload), links);
    }
    let _ = writeln!(out, "{END}");
    out
}

/// When, where and by what the figures were measured.
fn measured_line(first: Option<&CompareReport>, floor: Option<&Value>) -> String {
    let mut line = String::new();
    if let Some(r) = first {
        let s = &r.setup;
        let _ = write!(
            line,
            "Measured {} on `{}` (Linux {}, {} CPUs) by `scripts/results.sh`, which regenerates this section \
             (`vmm report`). ",
            utc_minute(s.started_unix),
            s.host,
            s.kernel,
            s.cpus
        );
    }
    if let Some(bare) = floor.and_then(|f| num(f, "bare_exit.median_ns")) {
        let _ = write!(
            line,
            "On this host a VM exit costs {:.1} us (a bare KVM_RUN round trip, `vmm bench floor`): every exit a \
             policy saves is worth that much guest time. ",
            bare / 1e3
        );
    }
    line.push_str("Machines like it are shared and noisy: read ratios measured side by side, not absolute times.");
    line
}

/// `YYYY-MM-DD HH:MM UTC` of a Unix time (the civil calendar from days,
/// H. Hinnant's algorithm).
pub fn utc_minute(unix: u64) -> String {
    let days = (unix / 86_400) as i64;
    let (hour, minute) = (unix % 86_400 / 3600, unix % 3600 / 60);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02} {hour:02}:{minute:02} UTC")
}

/// The costs table: each a ratio measured side by side.
fn render_costs(out: &mut String, inputs: &Inputs) {
    let _ = writeln!(out, "### Costs, each a ratio measured side by side in one run\n");
    let _ = writeln!(out, "| benchmark | ours | baseline | ratio | command |\n| --- | ---: | ---: | ---: | --- |");
    let us = |v: Option<f64>, digits: usize| or_dash(v, |ns| format!("{:.digits$} us", ns / 1e3));
    if let Some(f) = &inputs.floor {
        let _ = writeln!(
            out,
            "| exit floor: one port-I/O exit through the VMM vs a bare KVM_RUN loop | {} | {} | {} | `vmm bench floor` |",
            us(num(f, "port_io_exit.median_ns"), 1),
            us(num(f, "bare_exit.median_ns"), 1),
            or_dash(num(f, "ratio"), |r| format!("{r:.3}"))
        );
    }
    for (view, f) in &inputs.faults {
        let _ = writeln!(
            out,
            "| secondary-MMU fault ({view} view) vs its bare mechanism | {} | {} | {} | `vmm bench fault --view {view}` |",
            us(num(f, "fault_ns"), 1),
            us(num(f, "bare_ns"), 1),
            or_dash(num(f, "ratio"), |r| format!("{r:.2}"))
        );
    }
    if let Some(d) = &inputs.dedup {
        render_dedup_rows(out, d);
    }
    let missing: Vec<&str> = [("floor.json", inputs.floor.is_none()), ("dedup.json", inputs.dedup.is_none())]
        .iter()
        .filter(|(_, m)| *m)
        .map(|(n, _)| *n)
        .chain(inputs.faults.is_empty().then_some("fault-<view>.json"))
        .collect();
    if !missing.is_empty() {
        let _ = writeln!(out, "\nNot measured (no {}).", missing.join(", no "));
    }
    out.push('\n');
}

/// The deduplicator's rows of the costs table, and its note.
fn render_dedup_rows(out: &mut String, d: &Value) {
    let mib = num(d, "mem_bytes").map_or_else(|| "-".into(), |b| format!("{:.0}", b / f64::from(1 << 20)));
    let kernel = at(d, "policies.kernel");
    let us = |v: Option<f64>| or_dash(v, |ns| format!("{:.2} us", ns / 1e3));
    let s = |v: Option<f64>| or_dash(v, |ns| format!("{:.2} s", ns / 1e9));
    for name in ["range-flush", "change-pte"] {
        let Some(r) = at(d, &format!("policies.{name}")) else { continue };
        let k = |f: &str| kernel.and_then(|k| num(k, f));
        let ratio = |f: &str| or_dash(num(r, &format!("ratio_to_kernel.{f}")), |x| format!("{x:.2}"));
        let rows = [
            (
                format!("scan cost per page, {name} vs Linux KSM (`unique`, {mib} MiB)"),
                us(num(r, "scan_ns_per_page")),
                us(k("scan_ns_per_page")),
                ratio("scan_ns_per_page"),
            ),
            (
                format!("merge cost per page, {name} vs Linux KSM (`converge`)"),
                us(num(r, "merge_ns_per_page")),
                us(k("merge_ns_per_page")),
                ratio("merge_ns_per_page"),
            ),
            (
                format!("time to converge, {name} vs Linux KSM (`converge`, {mib} MiB, 64 groups)"),
                s(num(r, "converge.wall_ns")),
                s(k("converge.wall_ns")),
                ratio("converge_wall"),
            ),
            (
                format!("CPU to converge, {name} vs Linux KSM"),
                s(num(r, "converge.cpu_ns")),
                s(k("converge.cpu_ns")),
                ratio("converge_cpu"),
            ),
        ];
        for (what, ours, theirs, ratio) in rows {
            let _ = writeln!(out, "| {what} | {ours} | {theirs} | {ratio} | `vmm bench dedup` |");
        }
    }
    let change_pte = num(d, "policies.change-pte.merge_ns_per_page");
    let limit = num(d, "change_pte_merge_limit_ns");
    if limit.is_some() {
        let ratio = match (change_pte, limit) {
            (Some(c), Some(l)) if l > 0.0 => format!("{:.2}", c / l),
            _ => "-".into(),
        };
        let what = format!(
            "merge cost per page, change-pte vs range-flush's + 1.1x (bare remap {} - bare zap {})",
            us(num(d, "bare_remap_ns")),
            us(num(d, "bare_zap_ns"))
        );
        let _ = writeln!(out, "| {what} | {} | {} | {ratio} | `vmm bench dedup` |", us(change_pte), us(limit));
    }
    if let Some(why) = at(d, "kernel_skipped").and_then(Value::as_str) {
        let _ = writeln!(out, "\nThe kernel policy did not run: {why}");
    }
    let repeat = num(d, "repeat").map_or_else(|| "-".into(), |r| format!("{r:.0}"));
    let view = at(d, "view").and_then(Value::as_str).unwrap_or("-");
    let _ = writeln!(
        out,
        "\nMedians of {repeat} runs per policy ({view} view for ours). Linux KSM's CPU is ksmd's, from \
         /proc/PID/schedstat; a pass drives it at 4,096 pages per batch with no sleep and smart_scan off, like ours."
    );
}

/// A figure's median over the whole run under `policy`, if the comparison has it.
fn total(r: &CompareReport, figure: &str, policy: &str) -> Option<f64> {
    r.total.figures.get(figure).and_then(|by| by.get(policy)).map(|s: &Summary| s.median)
}

/// The secondary-MMU faults the VMM served: the sum of the kinds it has.
fn faults(r: &CompareReport, policy: &str) -> Option<f64> {
    let kinds: Vec<f64> =
        ["exits.ept_read", "exits.ept_write", "exits.ept_fetch"].iter().filter_map(|f| total(r, f, policy)).collect();
    (!kinds.is_empty()).then(|| kinds.iter().sum())
}

/// A fleet's exits per guest and policy, and the guest time each policy
/// lost to deduplication per page it saved: the sum over the guests of
/// their wall time less the same under `off`, over `pages_sharing` at its
/// highest median in any phase (a page saved is a page mapping a KSM page
/// less one per KSM page, as Linux counts it).
fn render_fleet(out: &mut String, by_view: &BTreeMap<String, (PathBuf, CompareReport)>) {
    for (view, (_, r)) in views_in_order(by_view).filter(|(_, (_, r))| !r.guests.is_empty()) {
        let _ = writeln!(
            out,
            "Each guest ({view}): the VM exits the VMM served it, and the guests' time lost to deduplication per \
             page saved.\n\n| policy | exits per guest (guest 0, 1, ...) | guest time lost per page saved |\n| --- | \
             --- | ---: |"
        );
        let wall = |p: &str| r.guests.iter().map(|g| g.wall_ns.get(p).copied()).sum::<Option<f64>>();
        for p in &r.policies {
            let exits: Vec<String> = r.guests.iter().map(|g| or_dash(g.exits.get(p).copied(), int)).collect();
            let saved = r
                .phases
                .iter()
                .filter_map(|ph| ph.figures.get("ksm.pages_sharing").and_then(|by| by.get(p)))
                .map(|s| s.median)
                .fold(0.0, f64::max);
            let lost = match (wall(p), wall("off")) {
                (Some(w), Some(off)) if p != "off" && saved > 0.0 => Some((w - off) / saved),
                _ => None,
            };
            let shown_view = if p == "kernel" { "host KVM" } else { view.as_str() };
            let _ = writeln!(
                out,
                "| {p} ({shown_view}) | {} | {} |",
                exits.join(", "),
                or_dash(lost, |ns| format!("{:.2} us", ns / 1e3))
            );
        }
        out.push('\n');
    }
}

/// A workload's notes: the policies skipped, the guests' checksums, the
/// runs that failed.
fn notes(by_view: &BTreeMap<String, (PathBuf, CompareReport)>) -> Vec<String> {
    let mut notes = Vec::new();
    for (view, (_, r)) in views_in_order(by_view) {
        for sk in &r.skipped {
            notes.push(format!("Skipped {} ({view}): {}", sk.policy, sk.reason));
        }
        let verdict = if r.reports_identical {
            "identical under every policy".to_string()
        } else {
            format!("NOT identical: {}", r.report_mismatches.join(", "))
        };
        notes.push(format!("Guest checksums ({view}): {verdict}."));
        if !r.failed_runs.is_empty() {
            notes.push(format!("Failed runs ({view}): {}.", r.failed_runs.join("; ")));
        }
    }
    notes
}

/// How a workload's comparison was made, with the command that makes it.
fn setup_line(workload: &str, r: &CompareReport) -> String {
    let s = &r.setup;
    let mib = s.mem_bytes >> 20;
    let (image, fleet) = match s.guests {
        n if n > 1 => (s.image.as_str(), format!(" --guests {n}")),
        _ => (workload, String::new()),
    };
    format!(
        "{mib} MiB of RAM{}, median of {} interleaved runs per policy (`vmm compare {image}{fleet} --mem {mib}M \
         --repeat {} --view VIEW`). VM exits as the host KVM counts them (its binary stat `exits`, which also sees the \
         faults it serves itself); secondary-MMU faults as the VMM serves them (`ept_read` + `ept_write` + \
         `ept_fetch`); `-`: not in the results.\n",
        if s.guests > 1 { format!(" for each of {} guests (the fleet's figures)", s.guests) } else { String::new() },
        s.repeat,
        s.repeat
    )
}

/// One workload: its table (a row per policy and view), notes, chart.
fn render_workload(
    out: &mut String,
    workload: &str,
    by_view: &BTreeMap<String, (PathBuf, CompareReport)>,
    chart: Option<&PathBuf>,
    links: &Links,
) {
    let what = WORKLOADS.iter().find(|(n, _)| *n == workload).map_or("", |(_, w)| w);
    let _ = writeln!(out, "#### {workload}{}\n", if what.is_empty() { String::new() } else { format!(": {what}") });
    if let Some((_, (_, r))) = views_in_order(by_view).next() {
        let _ = writeln!(out, "{}", setup_line(workload, r));
    }
    let _ = writeln!(
        out,
        "| policy | view | VM exits (host KVM) | vs off | secondary-MMU faults (VMM) | deduplicator CPU | whole run \
         (wall) | pages_sharing at the end |\n| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"
    );
    let ms = |v: Option<f64>| {
        or_dash(v, |ns| {
            let tenths = (ns / 1e5).round().max(0.0) as u64;
            format!("{}.{} ms", int((tenths / 10) as f64), tenths % 10)
        })
    };
    for (view, (_, r)) in views_in_order(by_view) {
        let off = total(r, "kvm.exits", "off");
        for p in &r.policies {
            let exits = total(r, "kvm.exits", p);
            let ratio = match (exits, off) {
                (Some(e), Some(o)) if o > 0.0 => format!("{:.2}x", e / o),
                _ => "-".into(),
            };
            let shown_view = if p == "kernel" { "(host KVM)" } else { view.as_str() };
            let _ = writeln!(
                out,
                "| {p} | {shown_view} | {} | {ratio} | {} | {} | {} | {} |",
                or_dash(exits, int),
                or_dash(faults(r, p), int),
                ms(total(r, "ksm.cpu_ns", p)),
                ms(total(r, "wall_ns", p)),
                or_dash(total(r, "ksm.pages_sharing", p), int)
            );
        }
    }
    out.push('\n');
    render_fleet(out, by_view);
    for note in notes(by_view) {
        let _ = writeln!(out, "{note}");
    }
    let tables: Vec<String> = views_in_order(by_view)
        .filter(|(_, (dir, _))| dir.join("table.txt").is_file())
        .map(|(view, (dir, _))| format!("[{view}]({})", links.to(&dir.join("table.txt"))))
        .collect();
    if !tables.is_empty() {
        let _ = writeln!(out, "Every phase side by side: {}.", tables.join(", "));
    }
    if let Some(chart) = chart {
        let views: Vec<&str> = by_view.keys().map(String::as_str).collect();
        let _ = writeln!(
            out,
            "\n![{workload}: secondary-MMU faults, host KVM exits and wall time per phase and policy ({} view)]({})",
            views.join(" and "),
            links.to(chart)
        );
    }
    out.push('\n');
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compare::fold::tests::{report, run};

    #[test]
    fn dates_are_utc_minutes() {
        assert_eq!(utc_minute(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc_minute(1_795_993_200), "2026-11-29 23:00 UTC");
        assert_eq!(utc_minute(951_782_400), "2000-02-29 00:00 UTC");
    }

    #[test]
    fn a_missing_figure_is_a_dash_never_a_zero() {
        let mut inputs = Inputs::default();
        let r = report(&["off", "legacy"], vec![run("off", 0, 0, vec![7]), run("legacy", 0, 5, vec![7])]);
        inputs.compares.entry("pagefill".into()).or_default().insert("memslot".into(), (PathBuf::from("/x"), r));
        inputs.floor = Some(serde_json::json!({"port_io_exit": {"median_ns": 26800.0}, "ratio": 1.003}));
        let links = Links { base: PathBuf::from(".") };
        let md = render(&inputs, &BTreeMap::new(), &links);
        assert!(md.starts_with(BEGIN) && md.trim_end().ends_with(END), "{md}");
        let legacy = md.lines().find(|l| l.starts_with("| legacy |")).expect("legacy row");
        // No kvm.exits, ksm.cpu_ns in these runs: missing, not 0.
        assert_eq!(legacy, "| legacy | memslot | - | - | 5 | - | 6.0 ms | 5 |");
        let floor = md.lines().find(|l| l.starts_with("| exit floor")).expect("floor row");
        assert!(floor.contains("| 26.8 us | - | 1.003 |"), "{floor}");
        assert!(md.contains("Not measured (no dedup.json, no fault-<view>.json)."), "{md}");
        assert!(!md.contains("26 us") && !md.contains("VM exit costs"), "no cost is made up without floor's bare exit");
    }
}
