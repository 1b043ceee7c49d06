//! `vmm ctl SOCKET watch`: the running guest's exits and the host KVM's
//! statistics, redrawn in the layout of `kvm_stat` (Event, Total, %Total,
//! CurAvg/s), until the run ends or Ctrl-C.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::{IsTerminal, Write};
use std::path::Path;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::CliError;

/// Polls the socket's status every `interval` and redraws; 0 when the run
/// ended or Ctrl-C came, an error when the socket was never reached.
pub(super) fn watch(socket: &Path, interval: Duration) -> Result<ExitCode, CliError> {
    vmm::signals::install(true).map_err(CliError::Signals)?;
    let clear = std::io::stdout().is_terminal();
    let mut previous: Option<(Instant, Value)> = None;
    loop {
        let status = match vmm::control::request(socket, "status") {
            Ok(status) if status["ok"] == true => status,
            // The run is ending or gone: the watch is over.
            Ok(_) | Err(_) if previous.is_some() => break,
            Ok(refused) => {
                eprintln!("vmm ctl: {}", refused["error"].as_str().unwrap_or("the run refused the request"));
                return Ok(ExitCode::from(1));
            }
            Err(e) => return Err(e.into()),
        };
        let now = Instant::now();
        let frame = render_frame(&status, previous.as_ref().map(|(at, prev)| (now.duration_since(*at), prev)));
        let mut out = std::io::stdout().lock();
        let shown = if clear { write!(out, "\x1b[H\x1b[2J{frame}") } else { writeln!(out, "{frame}") };
        if shown.and_then(|()| out.flush()).is_err() {
            return Ok(ExitCode::SUCCESS); // the reader went away
        }
        previous = Some((now, status));
        if !sleep_unless_interrupted(interval) {
            break;
        }
    }
    println!("vmm ctl: the run ended");
    Ok(ExitCode::SUCCESS)
}

/// Sleeps `d`; false when Ctrl-C (or another ending signal) came.
fn sleep_unless_interrupted(d: Duration) -> bool {
    let until = Instant::now() + d;
    while Instant::now() < until {
        if vmm::signals::interrupted_by().is_some() {
            return false;
        }
        std::thread::sleep((until - Instant::now()).min(Duration::from_millis(20)));
    }
    vmm::signals::interrupted_by().is_none()
}

/// Numbers of an object, by key.
fn numbers(v: &Value) -> BTreeMap<String, u64> {
    v.as_object().map(|m| m.iter().filter_map(|(k, x)| Some((k.clone(), x.as_u64()?))).collect()).unwrap_or_default()
}

/// One frame: a header line, the exits by event, the host KVM's statistics.
pub(super) fn render_frame(status: &Value, previous: Option<(Duration, &Value)>) -> String {
    let mut out = String::new();
    let name = status["phase_name"].as_str().map_or_else(String::new, |n| format!(" \"{n}\""));
    let _ = writeln!(
        out,
        "vmm statistics - {} policy, run {}, phase {}{name} ({} so far), {:.1} s",
        status["policy"].as_str().unwrap_or("?"),
        status["run"],
        status["phase"],
        status["phases"],
        status["elapsed_ns"].as_f64().unwrap_or(0.0) / 1e9
    );
    let levels: Vec<&str> = status["kvm_levels"].as_array().into_iter().flatten().filter_map(Value::as_str).collect();
    let blocks = [("exit_events", "VM exits served by the VMM"), ("kvm", "host KVM (binary stats)")];
    for (key, title) in blocks {
        let now = numbers(&status[key]);
        let before = previous.map(|(_, p)| numbers(&p[key])).unwrap_or_default();
        let secs = previous.map_or(0.0, |(d, _)| d.as_secs_f64());
        let _ = writeln!(out, "\n {title}");
        render_block(&mut out, &now, &before, secs, &levels);
    }
    out
}

/// A `kvm_stat` block: rows by total, the share of the counters' sum, the
/// rate since the last frame ("-" for levels, and before a second frame).
fn render_block(
    out: &mut String,
    now: &BTreeMap<String, u64>,
    before: &BTreeMap<String, u64>,
    secs: f64,
    levels: &[&str],
) {
    let counter = |name: &str| !levels.contains(&name);
    let sum: u64 = now.iter().filter(|(n, _)| counter(n)).map(|(_, v)| v).sum();
    let mut rows: Vec<(&String, &u64)> = now.iter().collect();
    rows.sort_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
    let _ = writeln!(out, " {:<40} {:>10}{:>7} {:>8}", "Event", "Total", "%Total", "CurAvg/s");
    let mut total_rate = 0.0;
    for (name, &v) in rows {
        let (share, rate) = if counter(name) && sum > 0 {
            let share = format!("{:.1}", 100.0 * v as f64 / sum as f64);
            let rate = (secs > 0.0).then(|| v.saturating_sub(before.get(name).copied().unwrap_or(0)) as f64 / secs);
            total_rate += rate.unwrap_or(0.0);
            (share, rate.map_or_else(|| "-".to_string(), |r| format!("{r:.0}")))
        } else {
            ("-".to_string(), "-".to_string())
        };
        let _ = writeln!(out, " {name:<40} {v:>10}{share:>7} {rate:>8}");
    }
    let rate = if secs > 0.0 { format!("{total_rate:.0}") } else { "-".into() };
    let _ = writeln!(out, " {:<40} {sum:>10}{:>7} {rate:>8}", "Total", "");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_frame_has_totals_shares_and_rates_as_kvm_stat() {
        let status = |io: u64, exits: u64| {
            serde_json::json!({
                "ok": true, "policy": "range-flush", "run": 0, "phase": 3, "phase_name": "read word 0",
                "phases": 4, "elapsed_ns": 2_500_000_000u64,
                "exit_events": {"io:console": io, "ept_read": 300},
                "kvm": {"exits": exits, "pages_4k": 40}, "kvm_levels": ["pages_4k"],
            })
        };
        let first = render_frame(&status(100, 1000), None);
        assert!(first.starts_with("vmm statistics - range-flush policy, run 0, phase 3 \"read word 0\""), "{first}");
        let header = first.lines().find(|l| l.contains("Event")).expect("header");
        assert!(header.contains("Total") && header.contains("%Total") && header.contains("CurAvg/s"));
        let before = status(100, 1000);
        let frame = render_frame(&status(150, 1500), Some((Duration::from_millis(500), &before)));
        let io = frame.lines().find(|l| l.trim_start().starts_with("io:console")).expect("io row");
        // 150 of 450: 33.3%; 50 more in 0.5 s: 100 per second.
        assert!(io.contains(" 150") && io.contains("33.3") && io.trim_end().ends_with(" 100"), "{io}");
        let level = frame.lines().find(|l| l.trim_start().starts_with("pages_4k")).expect("level");
        assert!(level.trim_end().ends_with('-'), "a level has no rate: {level}");
        let exits = frame.lines().find(|l| l.trim_start().starts_with("exits ")).expect("exits");
        assert!(exits.trim_end().ends_with(" 1000"), "{exits}");
    }
}
