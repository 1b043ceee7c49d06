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
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::{require_kvm, scratch, vmm};
use vmm::compare::summary::CompareReport;
use vmm::host_ksm::HostKsmPaths;

/// Serialises the tests that take the host's KSM.
static HOST_KSM: Mutex<()> = Mutex::new(());

/// Whether the host's KSM can be used; fails under CI when it cannot.
fn require_host_ksm() -> bool {
    match HostKsmPaths::default().check_available() {
        Ok(()) => true,
        Err(e) if std::env::var_os("CI").is_some() => panic!("CI is set but the kernel policy cannot run: {e}"),
        Err(e) => {
            eprintln!("skipping: {e}");
            false
        }
    }
}

const KNOBS: [&str; 6] =
    ["run", "pages_to_scan", "sleep_millisecs", "max_page_sharing", "use_zero_pages", "smart_scan"];

fn host_knobs() -> Vec<String> {
    let paths = HostKsmPaths::default();
    KNOBS.iter().map(|k| format!("{k}={}", paths.read(k).unwrap_or_default())).collect()
}

fn figure(r: &CompareReport, phase: u32, name: &str, policy: &str) -> f64 {
    let p = r.phases.iter().find(|p| p.phase == Some(phase)).unwrap_or_else(|| panic!("no phase {phase}"));
    p.figures.get(name).and_then(|by| by.get(policy)).map_or(0.0, |s| s.median)
}

#[test]
fn compare_runs_each_policy_side_by_side_and_writes_its_documents() {
    if !require_kvm() {
        return;
    }
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
fn the_kernel_policy_restores_every_knob_of_the_hosts_ksm() {
    if !require_kvm() || !require_host_ksm() {
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

/// A `vmm run --control` in the background, ended by SIGINT.
struct Background {
    child: std::process::Child,
    socket: std::path::PathBuf,
    stats: std::path::PathBuf,
}

impl Background {
    fn start(image: &str, extra: &[&str]) -> Self {
        let socket = scratch(&format!("{image}.sock"));
        let stats = scratch(&format!("{image}-ctl.json"));
        let child = vmm()
            .args(["run", image, "--timeout", "120", "--no-table", "--control"])
            .arg(&socket)
            .arg("--stats-json")
            .arg(&stats)
            .args(extra)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn vmm run");
        let deadline = Instant::now() + Duration::from_secs(30);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "the control socket never appeared");
            std::thread::sleep(Duration::from_millis(10));
        }
        Self { child, socket, stats }
    }

    /// `vmm ctl SOCKET words...`: (status, stdout, stderr).
    fn ctl(&self, words: &[&str]) -> (i32, String, String) {
        let out = vmm().arg("ctl").arg(&self.socket).args(words).output().expect("spawn vmm ctl");
        let text = |b: &[u8]| String::from_utf8_lossy(b).trim().to_string();
        (out.status.code().expect("exited"), text(&out.stdout), text(&out.stderr))
    }

    fn status(&self) -> serde_json::Value {
        let (code, out, err) = self.ctl(&["status"]);
        assert_eq!(code, 0, "{err}");
        serde_json::from_str(&out).expect("status is JSON")
    }

    fn interrupt(mut self) -> vmm::stats::RunStats {
        let pid = libc::pid_t::try_from(self.child.id()).expect("pid");
        // SAFETY: kill with a pid of our own child and a standard signal.
        unsafe { libc::kill(pid, libc::SIGINT) };
        let status = self.child.wait().expect("wait");
        assert_eq!(status.code(), Some(3), "an interrupted run ends with status 3");
        assert!(!self.socket.exists(), "the socket is removed at the end of the run");
        serde_json::from_str(&std::fs::read_to_string(&self.stats).expect("stats")).expect("stats parse")
    }
}

#[test]
fn vmm_ctl_switches_ksmd_while_the_guest_runs() {
    if !require_kvm() {
        return;
    }
    let bg = Background::start(
        "misbehave-spin",
        &["--mem", "8M", "--dedup", "range-flush", "--pages-to-scan", "1000", "--sleep-millisecs", "1"],
    );
    let s = bg.status();
    assert_eq!((s["run"].as_u64(), s["policy"].as_str()), (Some(0), Some("range-flush")));
    assert_eq!(s["ksm"]["full_scans"], 0);
    assert_eq!(bg.ctl(&["run", "1"]), (0, "ok run=1".to_string(), String::new()));
    // ksmd scans now: its full scans show in the status within seconds.
    let deadline = Instant::now() + Duration::from_secs(30);
    while bg.status()["ksm"]["full_scans"].as_u64().unwrap_or(0) < 2 {
        assert!(Instant::now() < deadline, "ksmd never scanned after `run 1`");
        std::thread::sleep(Duration::from_millis(10));
    }
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

#[test]
fn vmm_ctl_without_a_run_says_so_in_one_line() {
    let out = vmm().args(["ctl", "/nonexistent/vmm.sock", "status"]).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1);
    assert!(stderr.contains("cannot reach the control socket"), "{stderr}");
}

#[test]
fn a_control_path_that_is_not_a_socket_is_refused_and_left_alone() {
    if !require_kvm() {
        return;
    }
    let path = scratch("precious.txt");
    std::fs::write(&path, "precious").expect("write");
    let out = vmm().args(["run", "hello", "--control"]).arg(&path).output().expect("spawn");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is not a socket") && stderr.lines().count() == 1, "{stderr}");
    assert_eq!(std::fs::read_to_string(&path).expect("still there"), "precious");
}

#[test]
fn bench_dedup_reports_scan_and_merge_costs_against_the_kernel_as_json() {
    if !require_kvm() {
        return;
    }
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
}
