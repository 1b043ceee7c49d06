//! The guest-misbehaviour suite (issue 14): guests that misuse ports, the
//! low megabyte, the ends of RAM and of the identity map, merged code and
//! zero pages, and flood the deduplicator with requests. Each runs through
//! the `vmm` binary under every built-in policy (off, change-pte,
//! range-flush, legacy) and both views, and must end as its model says
//! (guest-images/src/misbehave.rs and misbehave_dedup.rs, summarised in
//! guest-images/README.md) with the same reports as its run with dedup
//! off, and no VMM error. 4 MiB guests: the suite takes about half a
//! minute of KVM time.

mod common;

use common::{require_kvm, run, Run};
use guest_images::*;

/// Dedup off first (the baseline), then every built-in policy.
const POLICIES: [&str; 4] = ["off", "change-pte", "range-flush", "legacy"];
const VIEWS: [&str; 2] = ["memslot", "uffd"];

const MEM: &str = "4M";
const MEM_BYTES: u64 = 4 << 20;

/// One run's policy and view, and what they mean to a merged page.
#[derive(Clone, Copy)]
struct Config {
    policy: &'static str,
    view: &'static str,
}

impl Config {
    fn all() -> impl Iterator<Item = Config> {
        VIEWS.into_iter().flat_map(|view| POLICIES.into_iter().map(move |policy| Config { policy, view }))
    }

    fn setting(self) -> DedupSetting {
        DedupSetting { dedup: self.policy != "off", zaps: self.policy != "change-pte", uffd: self.view == "uffd" }
    }

    fn run(self, image: &str, extra: &[&str]) -> Run {
        let mut args = vec!["--mem", MEM, "--dedup", self.policy, "--view", self.view, "--timeout", "120"];
        args.extend(extra);
        run(image, &args)
    }
}

impl std::fmt::Display for Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} / {}", self.policy, self.view)
    }
}

/// The run ended as `reason` (and at `rip`, if given), by the guest, not
/// by a VMM error or a timeout.
fn check_end(r: &Run, ctx: &str, reason: &str, rip: Option<u64>) {
    let end = &r.stats.guest.end;
    assert_eq!(end.reason, reason, "{ctx}: {}; stderr: {}", end.detail, r.stderr());
    if rip.is_some() {
        assert_eq!(end.rip, rip, "{ctx}: {}", end.detail);
    }
    assert!(!r.stderr().contains("panicked"), "{ctx}: {}", r.stderr());
}

/// A clean end by the guest's exit 0.
fn check_exit(r: &Run, ctx: &str) {
    check_end(r, ctx, "exit", None);
    assert_eq!((r.status(), r.stats.guest.exit_code), (0, Some(0)), "{ctx}: {}", r.stderr());
}

/// The io exits of every phase, 0 to the last, are `io`.
fn check_phase_io(r: &Run, ctx: &str, io: &[u64]) {
    let measured: Vec<(u32, u64)> = r.stats.phases.iter().map(|p| (p.phase, p.figures.exits.io)).collect();
    let model: Vec<(u32, u64)> = (0..).zip(io.iter().copied()).collect();
    assert_eq!(measured, model, "{ctx}: io exits per phase");
}

/// The faults of every phase are `faults` ((read, write, fetch) each).
fn check_faults(r: &Run, ctx: &str, faults: &[PhaseFaults]) {
    let measured: Vec<PhaseFaults> = r
        .stats
        .phases
        .iter()
        .map(|p| (p.figures.exits.ept_read, p.figures.exits.ept_write, p.figures.exits.ept_fetch))
        .collect();
    assert_eq!(measured, faults, "{ctx}: (ept_read, ept_write, ept_fetch) per phase");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn ports_of_every_width_read_all_ones_and_never_crash_the_vmm() {
    require_kvm();
    let model = misbehave_ports_expected_reports();
    let mut uart = None;
    for config in Config::all() {
        let ctx = format!("misbehave-ports: {config}");
        let r = config.run("misbehave-ports", &[]);
        check_exit(&r, &ctx);
        let reports = &r.stats.guest.reports;
        assert_eq!(reports.len(), model.len(), "{ctx}: {reports:?}");
        for (i, (&got, want)) in reports.iter().zip(&model).enumerate() {
            assert!(want.is_none_or(|w| w == got), "{ctx}: report {i} is {got:#x}, the model says {want:x?}");
        }
        // COM1's registers read the same in every run.
        let registers: Vec<u64> = reports.iter().zip(&model).filter(|(_, w)| w.is_none()).map(|(&g, _)| g).collect();
        assert_eq!(*uart.get_or_insert_with(|| registers.clone()), registers, "{ctx}: COM1's registers");
        assert!(r.stdout().contains(MISBEHAVE_PORTS_LINE), "{ctx}: {}", r.stdout());
        for (p, io) in r.stats.phases.iter().zip(MISBEHAVE_PORTS_PHASE_IO) {
            let measured = p.figures.exits.io;
            match io {
                Some(io) => assert_eq!(measured, io, "{ctx}: phase {}", p.phase),
                None => assert!(MISBEHAVE_PORTS_STRING_IO.contains(&measured), "{ctx}: phase {}: {measured}", p.phase),
            }
        }
        let numbers: Vec<u32> = r.stats.phases.iter().map(|p| p.phase).collect();
        assert_eq!(numbers, [0, 1, 2, 3, 4], "{ctx}: an 8-bit and a 16-bit marker start phases 2 and 3");
        assert_eq!(r.stats.total.exits.total, r.stats.total.exits.io, "{ctx}: {:?}", r.stats.total.exits);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_low_megabyte_is_out_of_reach_but_for_the_stack() {
    require_kvm();
    for config in Config::all() {
        for (image, reports) in [
            ("misbehave-low-read", vec![MISBEHAVE_LOW_READ_REPORT]),
            ("misbehave-low-write", misbehave_low_write_reports(MEM_BYTES)),
        ] {
            let ctx = format!("{image}: {config}");
            let r = config.run(image, &[]);
            check_end(&r, &ctx, "triple_fault", Some(MISBEHAVE_FAULT_RIP));
            assert_eq!(r.stats.guest.reports, reports, "{ctx}");
            let e = &r.stats.total.exits;
            assert_eq!((e.io, e.shutdown, e.total), (1, 1, 2), "{ctx}: {e:?}");
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_port_access_past_0xffff_faults_or_reads_all_ones_the_same_way_every_run() {
    require_kvm();
    let mut outcome = None;
    for config in Config::all() {
        let ctx = format!("misbehave-port-end: {config}");
        let r = config.run("misbehave-port-end", &[]);
        let seen = if r.stats.guest.end.reason == "triple_fault" {
            check_end(&r, &ctx, "triple_fault", Some(MISBEHAVE_FAULT_RIP));
            PortEndOutcome::TripleFault
        } else {
            check_exit(&r, &ctx);
            PortEndOutcome::Performed
        };
        assert_eq!(r.stats.guest.reports, seen.reports(), "{ctx}");
        assert_eq!(r.stats.total.exits.io, seen.io_exits(), "{ctx}");
        assert_eq!(*outcome.get_or_insert(seen.clone()), seen, "{ctx}: not the outcome of the run before");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn accesses_across_the_end_of_ram_and_of_the_identity_map_are_mmio_then_a_fault() {
    require_kvm();
    for config in Config::all() {
        let ctx = format!("misbehave-beyond-map: {config}");
        let r = config.run("misbehave-beyond-map", &[]);
        check_end(&r, &ctx, "triple_fault", Some(MISBEHAVE_FAULT_RIP));
        assert_eq!(r.stats.guest.reports, MISBEHAVE_BEYOND_MAP_REPORTS, "{ctx}");
        check_phase_io(&r, &ctx, &MISBEHAVE_BEYOND_MAP_PHASE_IO);
        let mmio: Vec<u64> = r.stats.phases.iter().map(|p| p.figures.exits.mmio).collect();
        assert_eq!(mmio, MISBEHAVE_BEYOND_MAP_PHASE_MMIO, "{ctx}");
        assert_eq!(r.stats.total.exits.shutdown, 1, "{ctx}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn code_runs_from_merged_pages_and_patches_them_with_the_right_bytes() {
    require_kvm();
    for config in Config::all() {
        let ctx = format!("misbehave-merged-code: {config}");
        let r = config.run("misbehave-merged-code", &[]);
        check_exit(&r, &ctx);
        assert_eq!(r.stats.guest.reports, MISBEHAVE_MERGED_CODE_REPORTS, "{ctx}");
        check_phase_io(&r, &ctx, &MISBEHAVE_MERGED_CODE_PHASE_IO);
        check_faults(&r, &ctx, &misbehave_merged_code_faults(config.setting()));
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn zero_pages_merge_with_and_without_use_zero_pages_and_fault_once_each() {
    require_kvm();
    let reports = misbehave_zero_pages_expected_reports(MEM_BYTES);
    let (first, second) = misbehave_zero_pages_merged(MEM_BYTES);
    for config in Config::all() {
        for knob in ["0", "1"] {
            let ctx = format!("misbehave-zero-pages: {config}, use_zero_pages {knob}");
            let r = config.run("misbehave-zero-pages", &["--use-zero-pages", knob, "--max-page-sharing", "1024"]);
            check_exit(&r, &ctx);
            assert_eq!(r.stats.guest.reports, reports, "{ctx}");
            check_phase_io(&r, &ctx, &MISBEHAVE_ZERO_PAGES_PHASE_IO);
            check_faults(&r, &ctx, &misbehave_zero_pages_faults(MEM_BYTES, config.setting()));
            if config.policy == "off" {
                continue;
            }
            // After each pass: every zero page in the zero page, or in one KSM page.
            for (phase, merged) in [(2, first), (5, second)] {
                let ksm = &r.phase(phase).ksm;
                let figures = (ksm["ksm_zero_pages"], ksm["pages_shared"], ksm["pages_sharing"]);
                let expected = if knob == "1" { (merged, 0, 0) } else { (0, 1, merged - 1) };
                assert_eq!(figures, expected, "{ctx}: phase {phase}: (ksm_zero_pages, pages_shared, pages_sharing)");
            }
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn thousands_of_dedup_requests_keep_every_guest_write() {
    require_kvm();
    let reports = misbehave_dedup_flood_expected_reports(MEM_BYTES);
    for config in Config::all() {
        let ctx = format!("misbehave-dedup-flood: {config}");
        let r = config.run("misbehave-dedup-flood", &[]);
        check_exit(&r, &ctx);
        assert_eq!(r.stats.guest.reports, reports, "{ctx}");
        check_phase_io(&r, &ctx, &MISBEHAVE_DEDUP_FLOOD_PHASE_IO);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn unmerges_while_ksmd_merges_keep_every_guest_write() {
    require_kvm();
    let reports = misbehave_unmerge_ksmd_expected_reports(MEM_BYTES);
    for config in Config::all() {
        let ctx = format!("misbehave-unmerge-ksmd: {config}");
        // ksmd scanning everything without a pause, so that it merges while the guest spins.
        let r = config.run("misbehave-unmerge-ksmd", &["--pages-to-scan", "5000", "--sleep-millisecs", "0"]);
        check_exit(&r, &ctx);
        assert_eq!(r.stats.guest.reports, reports, "{ctx}: the first report counts words that changed");
        check_phase_io(&r, &ctx, &MISBEHAVE_UNMERGE_KSMD_PHASE_IO);
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn sse_arithmetic_on_a_merged_page_fails_only_where_kvm_must_emulate_it() {
    require_kvm();
    for config in Config::all() {
        let ctx = format!("misbehave-sse-merged: {config}");
        let r = config.run("misbehave-sse-merged", &[]);
        let s = config.setting();
        if misbehave_sse_merged_fails(s.dedup, s.zaps, !s.uffd) {
            check_end(&r, &ctx, "unexpected_exit", Some(MISBEHAVE_FAULT_RIP));
            assert!(r.stats.guest.end.detail.contains("emulation failed"), "{ctx}: {}", r.stats.guest.end.detail);
            assert_eq!(r.stats.guest.reports, Vec::<u64>::new(), "{ctx}");
            check_phase_io(&r, &ctx, &[1, 2, 3, 1]);
        } else {
            check_exit(&r, &ctx);
            assert_eq!(r.stats.guest.reports, MISBEHAVE_SSE_MERGED_REPORTS, "{ctx}");
            check_phase_io(&r, &ctx, &MISBEHAVE_SSE_MERGED_PHASE_IO);
        }
    }
}
