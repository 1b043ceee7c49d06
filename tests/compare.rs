//! `vmm compare`, the `kernel` policy (the host's own KSM) and `vmm ctl` on
//! real KVM.
//!
//! The kernel policy changes the host's /sys/kernel/mm/ksm, which only one
//! run may hold at a time: the tests that use it take `HOST_KSM` first.
//! They need root and a kernel with KSM; with `CI` set, missing either is a
//! failure (CI machines are root on a KSM kernel), elsewhere a skip.

mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use common::control::Background;
use common::guests::phase_reuse_guest;
use common::host_ksm::{host_knobs, require_host_ksm, HOST_KSM};
use common::processes::{alive, children_of, has_thread, signal};
use common::{poll_until, require_kvm, scratch, vmm};
use vmm_lab::compare::summary::CompareReport;

fn figure(r: &CompareReport, phase: u32, name: &str, policy: &str) -> f64 {
    let p = r.phases.iter().find(|p| p.phase == Some(phase)).unwrap_or_else(|| panic!("no phase {phase}"));
    p.figures.get(name).and_then(|by| by.get(policy)).map_or(0.0, |s| s.median)
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn compare_runs_each_policy_side_by_side_and_writes_its_documents() {
    require_kvm();
    let kernel = require_host_ksm();
    let _host = HOST_KSM.lock().unwrap_or_else(|e| e.into_inner());
    let out = scratch("compare-pagefill");
    let policies =
        if kernel { "off,change-pte,range-flush,legacy,kernel" } else { "off,change-pte,range-flush,legacy" };
    let output = vmm()
        .args(["compare", "pagefill", "--mem", "8M", "--repeat", "2", "--policies", policies, "--out"])
        .arg(&out)
        .output()
        .expect("spawn vmm compare");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");

    let report: CompareReport =
        serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).expect("compare.json"))
            .expect("compare.json parses");
    assert_eq!((report.schema.as_str(), report.version), ("vmm-compare", 1));
    let names: Vec<&str> = policies.split(',').collect();
    assert_eq!(report.policies, names);
    assert!(report.skipped.is_empty(), "{:?}", report.skipped);
    // Interleaved: repeat 0 of every policy, then repeat 1.
    let order: Vec<(String, u32)> = report.runs.iter().map(|r| (r.policy.clone(), r.repeat)).collect();
    let expected: Vec<(String, u32)> = (0..2).flat_map(|rep| names.iter().map(move |p| (p.to_string(), rep))).collect();
    assert_eq!(order, expected);
    assert!(report.reports_identical && report.failed_runs.is_empty());

    // pagefill phase 3 reads every merged page: a refault per page unless
    // change_pte kept the entries (guest-images/README.md).
    let n = guest_images::pagefill_pages(8 << 20) as f64;
    assert_eq!(figure(&report, 3, "exits.ept_read", "off"), 0.0);
    assert_eq!(figure(&report, 3, "exits.ept_read", "change-pte"), 0.0);
    assert_eq!(figure(&report, 3, "exits.ept_read", "range-flush"), n);
    let p3 = report.phases.iter().find(|p| p.phase == Some(3)).expect("phase 3");
    assert_eq!(p3.figures["exits.ept_read"]["range-flush"].diff_from_off, Some(n));
    // Every built-in policy merged every page in phase 2.
    for p in ["change-pte", "range-flush", "legacy"] {
        assert_eq!(figure(&report, 2, "ksm.merges", p), n, "{p}");
    }
    if kernel {
        // The host's KSM merged this guest's pages too (its own count).
        assert_eq!(figure(&report, 2, "ksm.ksm_merging_pages", "kernel"), n);
        // The host KVM took the refaults itself: pf_taken, not VMM exits.
        assert_eq!(figure(&report, 3, "exits.ept_read", "kernel"), 0.0);
        assert!(figure(&report, 3, "kvm.pf_taken", "kernel") >= n);
    }

    // The table: a column per policy, the phase sections, the verdict.
    let header = stdout.lines().find(|l| l.contains("off") && l.contains("legacy")).expect("header row");
    for p in &names {
        assert!(header.contains(p), "{header}");
    }
    assert!(stdout.contains("== phase 3") && stdout.contains("== whole run"));
    assert!(stdout.contains("identical in every run of every policy"));
    let svg = std::fs::read_to_string(out.join("compare.svg")).expect("compare.svg");
    assert!(svg.starts_with("<svg") && names.iter().all(|p| svg.contains(p)));
    assert_eq!(std::fs::read_dir(out.join("runs")).expect("runs/").count(), 2 * names.len());
}

#[test]
fn compare_refuses_bad_input_in_one_line() {
    for (args, says) in [
        (&["compare", "pagefill", "--repeat", "0"][..], "--repeat"),
        (&["compare", "pagefill", "--policies", "off,off"][..], "twice"),
        (&["compare", "pagefill", "--policies", "fast"][..], "fast"),
        (&["compare", "no-such-guest"][..], "no-such-guest"),
        (&["compare", "pagefill", "--mem", "1M"][..], "2 MiB"),
    ] {
        let out = vmm().args(args).output().expect("spawn");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
        assert_eq!(stderr.lines().count(), 1, "{args:?}: {stderr}");
        assert!(stderr.contains(says), "{args:?}: {stderr}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_kernel_policy_restores_every_knob_of_the_hosts_ksm() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _host = HOST_KSM.lock().unwrap_or_else(|e| e.into_inner());
    let before = host_knobs();
    let off = common::run("pagefill", &["--mem", "8M"]);
    let r = common::run(
        "pagefill",
        &[
            "--mem",
            "8M",
            "--dedup",
            "kernel",
            "--pages-to-scan",
            "321",
            "--sleep-millisecs",
            "7",
            "--use-zero-pages",
            "1",
        ],
    );
    assert_eq!(r.status(), 0, "{}", r.stderr());
    assert_eq!(r.stats.guest.reports, off.stats.guest.reports);
    assert_eq!(r.stats.config.dedup, "kernel");
    let n = guest_images::pagefill_pages(8 << 20);
    assert_eq!(r.phase(2).ksm.get("ksm_merging_pages"), Some(&n));
    assert_eq!(host_knobs(), before);
    assert!(!Path::new("/run/vmm/host-ksm.saved").exists());
}

#[test]
fn the_kernel_policy_is_refused_without_root_and_names_the_fix() {
    if !Path::new("/usr/bin/setpriv").exists() || !require_host_ksm() {
        eprintln!("skipping: needs setpriv and root");
        return;
    }
    // As nobody: the knobs cannot be written, and nothing is built.
    let out = std::process::Command::new("/usr/bin/setpriv")
        .args(["--reuid", "65534", "--regid", "65534", "--clear-groups"])
        .arg(env!("CARGO_BIN_EXE_vmm"))
        .args(["run", "hello", "--dedup", "kernel"])
        .output()
        .expect("spawn setpriv");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("run as root"), "{stderr}");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn vmm_ctl_switches_ksmd_while_the_guest_runs() {
    require_kvm();
    let bg = Background::start(
        "misbehave-spin",
        &["--mem", "8M", "--dedup", "range-flush", "--pages-to-scan", "1000", "--sleep-millisecs", "1"],
    );
    let s = bg.status();
    assert_eq!((s["run"].as_u64(), s["policy"].as_str()), (Some(0), Some("range-flush")));
    assert_eq!(s["ksm"]["full_scans"], 0);
    assert_eq!(bg.ctl(&["run", "1"]), (0, "ok run=1".to_string(), String::new()));
    // ksmd scans now: its full scans show in the status within seconds.
    let scanned = || bg.status()["ksm"]["full_scans"].as_u64().unwrap_or(0) >= 2;
    assert!(poll_until(Duration::from_secs(30), scanned), "ksmd never scanned after `run 1`");
    assert_eq!(bg.ctl(&["run", "0"]).0, 0);
    let stopped = bg.status()["ksm"]["full_scans"].as_u64();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(bg.status()["ksm"]["full_scans"].as_u64(), stopped, "ksmd still scanned after `run 0`");
    assert_eq!(bg.ctl(&["run", "2"]).0, 0);
    assert_eq!(bg.status()["run"], 2);
    // Bad requests: refused in one line, status 1; the run goes on.
    for (words, says) in [(&["run", "7"][..], "0, 1 or 2"), (&["frob"][..], "unknown request")] {
        let (code, out, err) = bg.ctl(words);
        assert_eq!((code, out.as_str()), (1, ""), "{words:?}");
        assert!(err.contains(says) && err.lines().count() == 1, "{words:?}: {err}");
    }
    let stats = bg.interrupt();
    assert_eq!(stats.guest.end.reason, "interrupted");
    assert!(stats.total.ksm["full_scans"] >= 2);
}

/// `vmm ctl SOCKET soft-dirty` makes a round over every guest's RAM while
/// they run (here a fleet of two): the reply counts the pages written since
/// the round before, and the run's statistics count the rounds of each
/// guest under event-aware as write protections, not zaps.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn vmm_ctl_makes_a_soft_dirty_round_over_every_guest() {
    require_kvm();
    let bg = Background::start("misbehave-spin", &["--mem", "8M", "--guests", "2", "--dedup", "event-aware"]);
    let (code, out, err) = bg.ctl(&["soft-dirty"]);
    assert_eq!(code, 0, "{err}");
    let reply: serde_json::Value = serde_json::from_str(&out).expect("a JSON reply");
    // The first round finds every page of both guests soft-dirty (a new
    // mapping is), 8 MiB less the low megabyte each.
    assert_eq!(reply["soft_dirty_pages"], 2 * ((8 << 20) - (1 << 20)) / 4096, "{reply}");
    assert_eq!(bg.ctl(&["soft-dirty"]).0, 0);
    let stats = bg.interrupt();
    for g in &stats.guests {
        let mmu = &g.total.shadow_mmu;
        assert_eq!(mmu["soft_dirty_rounds"], 2, "guest {}", g.index);
        assert!(mmu["wrprot_entries"] > 0 && mmu["zapped"] == 0, "guest {}: {mmu:?}", g.index);
    }
}

#[test]
fn vmm_ctl_without_a_run_says_so_in_one_line() {
    let out = vmm().args(["ctl", "/nonexistent/vmm.sock", "status"]).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    assert!(stderr.contains("cannot reach the control socket"), "{stderr}");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_control_path_that_is_not_a_socket_is_refused_and_left_alone() {
    require_kvm();
    let path = scratch("precious.txt");
    std::fs::write(&path, "precious").expect("write");
    let out = vmm().args(["run", "hello", "--control"]).arg(&path).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a socket") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).expect("still there"), "precious");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn bench_dedup_reports_scan_and_merge_costs_against_the_kernel_as_json() {
    require_kvm();
    let kernel = require_host_ksm();
    let _host = HOST_KSM.lock().unwrap_or_else(|e| e.into_inner());
    let out = vmm().args(["bench", "dedup", "--mem", "8M", "--repeat", "1"]).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["bench"], "dedup");
    let n = guest_images::pagefill_pages(8 << 20);
    let mut names = vec!["change-pte", "range-flush"];
    if kernel {
        names.push("kernel");
    }
    for name in &names {
        let p = &v["policies"][name];
        // converge merges every page; unique none; the costs are positive.
        assert_eq!(p["converge"]["pages_merged"].as_f64(), Some(n as f64), "{name}");
        assert_eq!(p["unique"]["pages_merged"].as_f64(), Some(0.0), "{name}");
        assert!(p["scan_ns_per_page"].as_f64().is_some_and(|x| x > 0.0), "{name}");
        assert!(p["merge_ns_per_page"].as_f64().is_some_and(|x| x > 0.0), "{name}");
        let ratios = &p["ratio_to_kernel"];
        if kernel && *name != "kernel" {
            // Each ratio is ours over the kernel's, from the same run.
            let ours = p["scan_ns_per_page"].as_f64().expect("scan");
            let theirs = v["policies"]["kernel"]["scan_ns_per_page"].as_f64().expect("kernel scan");
            assert_eq!(ratios["scan_ns_per_page"].as_f64(), Some(ours / theirs), "{name}");
        } else {
            assert!(ratios.is_null(), "{name}");
        }
    }
    assert_eq!(v["kernel_skipped"].is_null(), kernel);
    // The bare view mechanisms, timed in the same invocation, and the limit
    // issue 12 sets change-pte's merge cost from them.
    let (remap, zap) = (v["bare_remap_ns"].as_f64().expect("remap"), v["bare_zap_ns"].as_f64().expect("zap"));
    assert!(remap > 0.0 && zap > 0.0, "{v}");
    let range_flush = v["policies"]["range-flush"]["merge_ns_per_page"].as_f64().expect("range-flush merge");
    assert_eq!(v["change_pte_merge_limit_ns"].as_f64(), Some(range_flush + 1.1 * (remap - zap)));
}

/// Runs `vmm compare ARGS --out OUT` to the end and reads its compare.json.
fn compare_json(args: &[&str], out: &Path) -> CompareReport {
    let output = vmm().arg("compare").args(args).arg("--out").arg(out).output().expect("spawn vmm compare");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{}\n{stderr}", String::from_utf8_lossy(&output.stdout));
    serde_json::from_str(&std::fs::read_to_string(out.join("compare.json")).expect("compare.json")).expect("parses")
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn compare_matches_phases_by_position_when_the_guest_reuses_a_number() {
    require_kvm();
    let image = scratch("phase-reuse.elf");
    std::fs::write(&image, phase_reuse_guest()).expect("write the guest");
    let image = image.to_str().expect("utf-8 path");
    let report = compare_json(
        &[image, "--mem", "2M", "--repeat", "1", "--policies", "off,range-flush"],
        &scratch("compare-reuse"),
    );
    let run = &report.runs[0].stats;
    let numbers: Vec<u32> = run.phases.iter().map(|p| p.phase).collect();
    assert_eq!(numbers, [0, 1, 2, 1], "the guest's phases");
    assert_eq!(report.phase_sequence, numbers);
    assert!(report.phase_mismatches.is_empty(), "{:?}", report.phase_mismatches);
    assert_eq!(
        report.phases.iter().map(|p| p.phase).collect::<Vec<_>>(),
        numbers.iter().map(|&n| Some(n)).collect::<Vec<_>>()
    );
    // Each position shows that position's figures, in every run.
    for r in &report.runs {
        for (i, p) in report.phases.iter().enumerate() {
            let io = r.stats.phases[i].figures.exits.io;
            assert_eq!(p.figures["exits.io"][&r.policy].values, vec![io], "{} at position {i}", r.policy);
        }
    }
    assert_ne!(run.phases[1].figures.exits.io, run.phases[3].figures.exits.io, "the two phase 1s differ");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn compare_never_reads_an_unreported_kvm_level_as_zero() {
    require_kvm();
    let report = compare_json(
        &["pagefill", "--mem", "8M", "--repeat", "1", "--policies", "off,range-flush"],
        &scratch("compare-lvl"),
    );
    assert!(report.kvm_levels.iter().any(|l| l == "pages_4k"), "{:?}", report.kvm_levels);
    let mut carried = 0;
    for r in &report.runs {
        // The level at the end of each phase: the value last reported.
        let mut level = None;
        for (i, phase) in r.stats.phases.iter().enumerate() {
            let reported = phase.figures.kvm.get("pages_4k").copied();
            if reported.is_none() && level.is_some() {
                carried += 1;
            }
            level = reported.or(level);
            let shown = report.phases[i].figures.get("kvm.pages_4k").and_then(|by| by.get(&r.policy));
            assert_eq!(shown.map(|s| s.values.clone()), level.map(|l| vec![l]), "{} phase position {i}", r.policy);
        }
    }
    assert!(carried > 0, "no phase left pages_4k unreported: the test shows nothing");
}

/// A `vmm compare` of the spinning guest, and its child `vmm run` once the
/// guest runs (its signal handlers are in place by then).
fn compare_with_a_running_child(out: &Path) -> (std::process::Child, u32) {
    let mut compare = vmm()
        .args(["compare", "misbehave-spin", "--mem", "8M", "--repeat", "1", "--policies", "off", "--timeout", "60"])
        .arg("--out")
        .arg(out)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm compare");
    let mut child = None;
    poll_until(Duration::from_secs(30), || {
        child = children_of(compare.id()).into_iter().find(|&c| has_thread(c, "vmm-watchdog"));
        child.is_some()
    });
    let Some(child) = child else {
        // Its child ends with it (that is what the callers test).
        let _ = compare.kill();
        let _ = compare.wait();
        panic!("the child vmm run never started its guest");
    };
    (compare, child)
}

fn interrupted_stats(out: &Path) -> vmm::stats::RunStats {
    let text = std::fs::read_to_string(out.join("runs/off-0.json")).expect("the child wrote its statistics");
    serde_json::from_str(&text).expect("statistics parse")
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_killed_compare_takes_its_child_with_it() {
    require_kvm();
    let out = scratch("compare-killed");
    let (mut compare, child) = compare_with_a_running_child(&out);
    signal(compare.id(), libc::SIGKILL);
    compare.wait().expect("wait");
    if !poll_until(Duration::from_secs(20), || !alive(child)) {
        signal(child, libc::SIGKILL);
        panic!("the child vmm run outlived vmm compare");
    }
    // SIGTERM, not SIGKILL: the run ended cleanly, with its statistics.
    assert_eq!(interrupted_stats(&out).guest.end.reason, "interrupted");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn sigint_and_sigterm_to_compare_reach_its_child_before_compare_ends() {
    require_kvm();
    for (sig, name) in [(libc::SIGINT, "SIGINT"), (libc::SIGTERM, "SIGTERM")] {
        let out = scratch(&format!("compare-{name}"));
        let (compare, child) = compare_with_a_running_child(&out);
        signal(compare.id(), sig);
        let output = compare.wait_with_output().expect("wait");
        let stderr = String::from_utf8_lossy(&output.stderr);
        // Ended by the signal, as the caller (a shell, `timeout`) expects,
        // and only after its child: no child left, its statistics written.
        use std::os::unix::process::ExitStatusExt;
        assert_eq!(output.status.signal(), Some(sig), "{name}: {stderr}");
        if alive(child) {
            signal(child, libc::SIGKILL);
            panic!("{name}: the child vmm run outlived vmm compare");
        }
        assert_eq!(interrupted_stats(&out).guest.end.reason, "interrupted", "{name}");
        assert!(stderr.contains(&format!("interrupted by {name}")), "{name}: {stderr}");
        assert!(!out.join("compare.json").exists(), "{name}: no comparison from an interrupted run");
    }
}
