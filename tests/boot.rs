//! Every built-in guest on real KVM: console output, exit status, guest
//! reports and the exact exit counts ABI v1 and the images' README promise.

mod common;

use std::time::Duration;

use common::{require_kvm, run, vmm};

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn hello_prints_its_line_and_takes_exactly_25_io_exits() {
    require_kvm();
    let r = run("hello", &[]);
    assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
    assert!(r.stdout().starts_with(guest_images::HELLO_MESSAGE), "stdout: {}", r.stdout());
    assert_eq!(r.stats.schema, 1);
    assert_eq!(r.stats.config.dedup, "off");
    assert_eq!(r.stats.guest.exit_code, Some(0));
    assert_eq!(r.stats.phases.len(), 1);
    let e = &r.stats.total.exits;
    assert_eq!((e.io, e.mmio, e.hlt, e.shutdown, e.other, e.total), (25, 0, 0, 0, 0, 25));
    // The table is printed after the console output.
    assert!(r.stdout().contains("VM exits by reason"));
    // The host KVM's own statistics moved under the guest, by KVM's names.
    assert!(r.stats.total.kvm.get("exits").is_some_and(|&n| n >= 25), "{:?}", r.stats.total.kvm);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_phase_reports_the_figures_guest_abi_promises_with_or_without_dedup() {
    require_kvm();
    for dedup in ["off", "change-pte"] {
        let r = run("pagefill", &["--mem", "4M", "--dedup", dedup, "--no-table"]);
        assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
        let figures = r.stats.phases.iter().map(|p| &p.figures).chain([&r.stats.total]);
        for f in figures {
            for key in ["installed", "zapped", "change_pte_applied", "change_pte_missed", "flushes"] {
                assert!(f.shadow_mmu.contains_key(key), "{dedup}: shadow_mmu.{key} in {:?}", f.shadow_mmu);
            }
            for key in ["pages_shared", "pages_sharing", "full_scans"] {
                assert!(f.ksm.contains_key(key), "{dedup}: ksm.{key} in {:?}", f.ksm);
            }
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn pagefill_reports_the_model_checksums_and_its_fixed_exits_per_phase() {
    require_kvm();
    for mem in ["8M", "64M"] {
        let r = run("pagefill", &["--mem", mem]);
        assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
        let bytes = vmm::size::parse_size(mem).expect("size");
        assert_eq!(r.stats.guest.reports, guest_images::pagefill_expected_reports(bytes), "--mem {mem}");
        // One io exit per port write; each marker's exit counts in the phase it ends.
        let phases: Vec<(u32, u64)> = r.stats.phases.iter().map(|p| (p.phase, p.figures.exits.io)).collect();
        let model: Vec<(u32, u64)> = (0..).zip(guest_images::PAGEFILL_PHASE_IO).collect();
        assert_eq!(phases, model, "--mem {mem}");
        assert_eq!(r.stats.total.exits.total, guest_images::PAGEFILL_IO_EXITS);
        assert_eq!(r.stats.total.exits.io, guest_images::PAGEFILL_IO_EXITS);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn beyond_ram_accesses_are_mmio_exits_answered_with_all_ones() {
    require_kvm();
    let r = run("misbehave-beyond-ram", &["--mem", "16M"]);
    assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
    assert_eq!(r.stats.guest.reports, vec![0xFFFF_FFFF; 3]);
    let e = &r.stats.total.exits;
    assert_eq!((e.mmio, e.io, e.total), (2, 5, 7));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_nonzero_guest_exit_code_makes_the_vmm_fail() {
    require_kvm();
    let r = run("misbehave-exit-code", &[]);
    assert_eq!(r.status(), 1);
    assert_eq!(r.stats.guest.exit_code, Some(guest_images::MISBEHAVE_EXIT_CODE));
    assert_eq!(r.stats.total.exits.io, 1);
    assert!(r.stderr().contains("wrote 3"), "stderr: {}", r.stderr());
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn hlt_ends_the_run_with_exit_code_zero() {
    require_kvm();
    let r = run("misbehave-hlt", &[]);
    assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
    assert_eq!(r.stats.guest.end.reason, "hlt");
    assert_eq!(r.stats.guest.exit_code, Some(0));
    let e = &r.stats.total.exits;
    assert_eq!((e.hlt, e.shutdown, e.io, e.total), (1, 0, 0, 1));
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_triple_fault_ends_cleanly_with_statistics_and_the_rip() {
    require_kvm();
    let r = run("misbehave-triple-fault", &[]);
    assert_eq!(r.status(), 3);
    assert!(r.stdout().starts_with(guest_images::TRIPLE_FAULT_MESSAGE));
    assert_eq!(r.stats.guest.end.reason, "triple_fault");
    assert_eq!(r.stats.guest.end.rip, Some(guest_images::TRIPLE_FAULT_RIP));
    assert_eq!(r.stats.guest.exit_code, None);
    let e = &r.stats.total.exits;
    assert_eq!((e.io, e.shutdown, e.total), (guest_images::TRIPLE_FAULT_MESSAGE.len() as u64, 1, 16));
    assert!(r.stderr().contains("triple-faulted"), "stderr: {}", r.stderr());
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_port_flood_is_counted_exit_by_exit() {
    require_kvm();
    let r = run("misbehave-port-flood", &["--no-table"]);
    assert_eq!(r.status(), 0, "stderr: {}", r.stderr());
    assert_eq!(r.stats.total.exits.io, guest_images::PORT_FLOOD_WRITES + 1);
    assert_eq!(r.stats.total.exits.total, guest_images::PORT_FLOOD_WRITES + 1);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_phase_marker_flood_ends_the_run_at_the_phase_limit_with_statistics() {
    require_kvm();
    let r = run("misbehave-phase-flood", &["--no-table", "--timeout", "120"]);
    assert_eq!(r.status(), 3, "stderr: {}", r.stderr());
    assert_eq!(r.stats.guest.end.reason, "guest_limit", "{}", r.stats.guest.end.detail);
    assert_eq!(r.stats.phases.len(), vmm::vcpu::MAX_PHASES);
    // Phase 0, then 1, 2, ... as the guest numbered them, one io exit each.
    assert!(r.stats.phases.iter().enumerate().all(|(i, p)| p.phase as usize == i && p.figures.exits.io == 1));
    assert_eq!(r.stderr().lines().count(), 1, "{}", r.stderr());
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_spinning_guest_is_stopped_by_the_timeout_with_statistics() {
    require_kvm();
    let r = run("misbehave-spin", &["--timeout", "0.5"]);
    assert_eq!(r.status(), 3);
    assert_eq!(r.stats.guest.end.reason, "timeout");
    // On a loaded machine the timeout may come before the whole message:
    // the console holds a prefix of it, one io exit a byte.
    let message = guest_images::SPIN_MESSAGE;
    let io = usize::try_from(r.stats.total.exits.io).expect("io exits");
    assert!(io <= message.len(), "{io} io exits");
    assert!(r.stdout().starts_with(&message[..io]), "{}", r.stdout());
    assert!(r.stats.total.exits.intr >= 1);
    assert!(r.stats.total.wall_ns >= 500_000_000);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn sigint_ends_the_run_cleanly_with_statistics() {
    require_kvm();
    let json = common::scratch("sigint.json");
    let child = vmm()
        .args(["run", "misbehave-spin", "--stats-json"])
        .arg(&json)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    std::thread::sleep(Duration::from_millis(700));
    // SAFETY: sending a signal to our own child process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(3), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let stats: vmm::stats::RunStats =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("stats written")).expect("parse");
    assert_eq!(stats.guest.end.reason, "interrupted");
    // One Ctrl-C, one interruption of KVM_RUN, whichever thread took it.
    assert_eq!(stats.total.exits.intr, 1);
}

#[test]
fn images_lists_every_built_in_guest_one_per_line() {
    let out = vmm().arg("images").output().expect("spawn");
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let names: Vec<&str> = text.lines().map(|l| l.split_whitespace().next().unwrap_or("")).collect();
    let expected: Vec<&str> = guest_images::IMAGES.iter().map(|i| i.name).collect();
    assert_eq!(names, expected);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn bench_prints_the_exit_floor_as_json() {
    require_kvm();
    let out = vmm().args(["bench", "--exits", "2000", "--warmup", "100"]).output().expect("spawn");
    assert!(out.status.success(), "stderr: {}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["bench"], "exit_floor");
    assert_eq!(v["port_io_exit"]["samples"], 2000);
    let median = v["port_io_exit"]["median_ns"].as_f64().expect("median");
    let (p10, p90) = (v["port_io_exit"]["p10_ns"].as_f64(), v["port_io_exit"]["p90_ns"].as_f64());
    assert!(median > 0.0 && p10 <= Some(median) && Some(median) <= p90);
    // The bare loop, sampled as often, and the ratio of the two medians.
    assert_eq!(v["bare_exit"]["samples"], 2000);
    let bare = v["bare_exit"]["median_ns"].as_f64().expect("bare median");
    assert_eq!(v["ratio"].as_f64(), Some(median / bare));
}

/// `vmm bench fault` on both views: the secondary-MMU fault and its bare
/// mechanism, one per page of pagefill's region at 8 MiB (the pages the
/// guest reads in phase 3), each a positive time. A guest that names its
/// phases (ABI 1.1) must not end the bench early.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn bench_fault_measures_every_page_under_both_views() {
    require_kvm();
    for view in ["memslot", "uffd"] {
        let out = vmm().args(["bench", "fault", "--view", view, "--mem", "8M"]).output().expect("spawn");
        assert!(out.status.success(), "{view}: stderr: {}", String::from_utf8_lossy(&out.stderr));
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
        assert_eq!(v["bench"], "secondary_mmu_fault", "{view}");
        assert!(v["faults"].as_u64().is_some_and(|f| f > 0), "{view}: {v}");
        for key in ["fault_ns", "bare_ns", "ratio"] {
            assert!(v[key].as_f64().is_some_and(|x| x > 0.0), "{view}: {key}: {v}");
        }
    }
}
