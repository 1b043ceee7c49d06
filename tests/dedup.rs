//! The built-in deduplicator on real KVM: pagefill's exits as the model
//! predicts them from the number of merged pages, under every policy and
//! view; and deduplication never changes what a guest reads (every built-in
//! guest reports the same checksums under every policy as with dedup off).

mod common;

use common::{require_kvm, run_with};
use ksm::KsmKnobs;
use vmm::stats::RunStats;
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

const POLICIES: [DedupPolicy; 4] =
    [DedupPolicy::ChangePte, DedupPolicy::RangeFlush, DedupPolicy::Legacy, DedupPolicy::EventAware];
const VIEWS: [ViewKind; 2] = [ViewKind::Memslot, ViewKind::Uffd];

fn run(image: &str, mem: &str, dedup: DedupPolicy, view: ViewKind, knobs: KsmKnobs) -> RunStats {
    run_with(image, mem, dedup, view, None, true, knobs)
}

fn ksm(s: &RunStats, phase: u32, name: &str) -> u64 {
    let p = s.phases.iter().find(|p| p.phase == phase).unwrap_or_else(|| panic!("no phase {phase}"));
    p.figures.ksm.get(name).copied().unwrap_or_else(|| panic!("no ksm figure {name}"))
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn pagefill_takes_the_exits_the_model_predicts_from_the_merged_pages() {
    require_kvm();
    let mem = 8 << 20;
    let n = guest_images::pagefill_pages(mem);
    let k = guest_images::PAGEFILL_GROUPS;
    for view in VIEWS {
        for policy in POLICIES {
            let s = run("pagefill", "8M", policy, view, KsmKnobs::default());
            let ctx = format!("{} / {}", policy.name(), view.name());
            // Each synchronous pass merged every group into one KSM page:
            // K shared, N - K sharing; the image's own page stays unshared.
            for phase in [2, 5] {
                assert_eq!(ksm(&s, phase, "pages_shared"), k, "{ctx}: phase {phase}");
                assert_eq!(ksm(&s, phase, "pages_sharing"), n - k, "{ctx}: phase {phase}");
                assert_eq!(ksm(&s, phase, "merges"), n, "{ctx}: phase {phase}");
                // A page is compared in the unstable tree once its checksum
                // held for a scan: checksums, merges, then a scan that
                // changes nothing ends the pass.
                assert_eq!(ksm(&s, phase, "full_scans"), 3, "{ctx}: phase {phase}");
                assert_eq!(ksm(&s, phase, "bytes_returned"), (n - k) * 4096, "{ctx}: phase {phase}");
            }
            common::pagefill::check_pagefill_exits(&s, policy, view);
            common::pagefill::check_window_moves_ahead_of_faults(&s, policy, view);
        }
    }
}

/// Every built-in guest that ends by itself, with its reports and exit code.
const GUESTS: [&str; 6] =
    ["hello", "pagefill", "stress", "misbehave-beyond-ram", "misbehave-exit-code", "misbehave-hlt"];

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_guest_reports_the_same_checksums_under_every_policy_as_with_dedup_off() {
    require_kvm();
    // ksmd at Linux's defaults (100 pages every 20 ms) while stress writes.
    let knobs = KsmKnobs::default();
    for image in GUESTS {
        let off = run(image, "8M", DedupPolicy::Off, ViewKind::Memslot, knobs);
        if image == "pagefill" {
            assert_eq!(off.guest.reports, guest_images::pagefill_expected_reports(8 << 20));
        }
        if image == "stress" {
            assert_eq!(off.guest.reports, guest_images::stress_expected_reports(8 << 20));
        }
        if image == "converge" {
            assert_eq!(off.guest.reports, guest_images::converge_expected_reports(8 << 20));
        }
        if image == "access" {
            assert_eq!(off.guest.reports, guest_images::ACCESS_EXPECTED_REPORTS);
        }
        for view in VIEWS {
            for policy in POLICIES {
                let s = run(image, "8M", policy, view, knobs);
                let ctx = format!("{image}: {} / {}", policy.name(), view.name());
                assert_eq!(s.guest.end.reason, off.guest.end.reason, "{ctx}: {}", s.guest.end.detail);
                assert_eq!(s.guest.exit_code, off.guest.exit_code, "{ctx}");
                assert_eq!(s.guest.reports, off.guest.reports, "{ctx}");
            }
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn stress_under_an_aggressive_ksmd_keeps_every_guest_write() {
    require_kvm();
    // ksmd scanning all of a small guest (256 pages) every 5 ms: merges race
    // with the guest's writes all the time.
    let knobs = KsmKnobs { pages_to_scan: 256, sleep_millisecs: 5, ..KsmKnobs::default() };
    let expected = guest_images::stress_expected_reports(3 << 20);
    // Whether ksmd merges before the guest's writes are over is up to the
    // host's scheduler (on a loaded machine ksmd may not run at all in a
    // short phase 2). A run without a merge during the writes tests
    // nothing about the race, so it is run again; what the guest read is
    // checked on every run, and some run must have merged.
    const ATTEMPTS: usize = 5;
    for view in VIEWS {
        for policy in POLICIES {
            let ctx = format!("{} / {}", policy.name(), view.name());
            let raced = (0..ATTEMPTS).any(|_| {
                let s = run("stress", "3M", policy, view, knobs);
                assert_eq!(s.guest.exit_code, Some(0), "{ctx}: {}", s.guest.end.detail);
                assert_eq!(s.guest.reports, expected, "{ctx}");
                // ksmd merged while the guest wrote (phase 2), and the guest
                // then wrote to merged pages (copy-on-write faults).
                ksm(&s, 2, "merges") > 0 && s.phases[2].figures.exits.ept_write > 0
            });
            assert!(raced, "{ctx}: no merge during the writes in {ATTEMPTS} runs");
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_memslot_view_ends_the_run_cleanly_at_its_slot_limit() {
    require_kvm();
    vmm::signals::install(false).expect("kick handler");
    // Merged pages map scattered frames: far more runs than 64 slots.
    let config = vmm::vm::RunConfig {
        image: vmm::image::GuestImage::resolve("pagefill", 64 << 30).expect("image"),
        mem_bytes: 8 << 20,
        dedup: DedupPolicy::ChangePte,
        view: ViewKind::Memslot,
        timeout: Some(std::time::Duration::from_secs(60)),
        console: Box::new(std::io::sink()),
        kvm_device: "/dev/kvm".into(),
        mm_hook: None,
        ksm: KsmKnobs::default(),
        builtin_ksm: true,
        memslot_limit: Some(64),
        control: None,
        soft_dirty_interval: None,
        guests: 1,
    };
    let s = vmm::run::run(config).expect("the VM builds");
    assert_eq!(s.guest.end.reason, "vmm_error", "{}", s.guest.end.detail);
    assert!(
        s.guest.end.detail.contains("memslots") && s.guest.end.detail.contains("--view uffd"),
        "{}",
        s.guest.end.detail
    );
    assert_eq!(s.guest.exit_code, None);
    assert_eq!(vmm::run::exit_status(&s), 3);
    // The statistics of the phases that ran are all there.
    assert!(s.phases.len() >= 3);
}

/// Merges and soft-dirty rounds together: ksmd scanning the whole guest
/// every 5 ms while a thread write-protects all of guest RAM every few tens
/// of milliseconds (`--soft-dirty-ms`; a memslot view's write faults are
/// dear, so its rounds are rarer), and the guest writes. What the guest reads is
/// checked on every run; some round and some merge must have happened.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn merges_and_soft_dirty_rounds_together_keep_every_guest_write() {
    require_kvm();
    let expected = guest_images::stress_expected_reports(3 << 20);
    let args = ["--mem", "3M", "--pages-to-scan", "256", "--sleep-millisecs", "5"];
    for view in VIEWS {
        let interval = if view == ViewKind::Memslot { "50" } else { "25" };
        for policy in POLICIES {
            let ctx = format!("{} / {}", policy.name(), view.name());
            let mut all = args.to_vec();
            all.extend(["--soft-dirty-ms", interval, "--dedup", policy.name(), "--view", view.name()]);
            let r = common::run("stress", &all);
            assert_eq!(r.stats.guest.exit_code, Some(0), "{ctx}: {}", r.stats.guest.end.detail);
            assert_eq!(r.stats.guest.reports, expected, "{ctx}");
            let total = |name: &str| r.stats.total.shadow_mmu.get(name).copied().unwrap_or(0);
            assert!(total("soft_dirty_rounds") > 0, "{ctx}: no round ran");
            assert!(r.stats.total.ksm.get("merges").copied().unwrap_or(0) > 0, "{ctx}: nothing merged");
        }
    }
}
