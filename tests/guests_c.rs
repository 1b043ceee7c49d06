//! The guests written in C (guest-images/c/) on real KVM, through the `vmm`
//! binary: the C guest kit builds a user's guest in one command, and each
//! built-in C guest ends with the reports and the io exits per phase of its
//! model (guest-images/src/) and, where the model is exact with a
//! deduplicator, the faults it predicts. `ltp-ksm01`'s figures per stage
//! are asserted here only with dedup off (every figure 0); see
//! guest-images/README.md for the figures a Linux-faithful deduplicator
//! must show.

mod common;

use std::process::Command;

use common::{require_kvm, run, scratch, Run};
use guest_images::*;

const POLICIES: [&str; 4] = ["off", "change-pte", "range-flush", "legacy"];
const VIEWS: [&str; 2] = ["memslot", "uffd"];

/// Runs `image` with `mem` of RAM under `policy` and `view`.
fn run_c(image: &str, mem: &str, policy: &str, view: &str, extra: &[&str]) -> Run {
    let mut args = vec!["--mem", mem, "--dedup", policy, "--view", view, "--timeout", "120"];
    args.extend(extra);
    run(image, &args)
}

/// The run ended with the guest's exit 0, `reports`, and `io` exits per
/// phase, 0 to the last.
fn check_run(r: &Run, ctx: &str, reports: &[u64], io: &[u64]) {
    assert_eq!(r.stats.guest.end.reason, "exit", "{ctx}: {}; stderr: {}", r.stats.guest.end.detail, r.stderr());
    assert_eq!((r.status(), r.stats.guest.exit_code), (0, Some(0)), "{ctx}");
    assert_eq!(r.stats.guest.reports, reports, "{ctx}: reports");
    let measured: Vec<(u32, u64)> = r.stats.phases.iter().map(|p| (p.phase, p.figures.exits.io)).collect();
    let model: Vec<(u32, u64)> = (0..).zip(io.iter().copied()).collect();
    assert_eq!(measured, model, "{ctx}: io exits per phase");
}

/// `(ept_read, ept_write)` of every phase.
fn faults(r: &Run) -> Vec<(u64, u64)> {
    r.stats.phases.iter().map(|p| (p.figures.exits.ept_read, p.figures.exits.ept_write)).collect()
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_kit_builds_a_users_guest_in_one_command() {
    require_kvm();
    // The generated headers in a directory of their own, as KSMLAB_ABI_DIR
    // (what ksmlab-cc asks cargo for when it is not set).
    let abi = scratch("ksmlab-abi");
    std::fs::create_dir_all(&abi).expect("abi dir");
    std::fs::write(abi.join("ksmlab-abi.h"), abi::C_NUMBERS).expect("ksmlab-abi.h");
    std::fs::write(abi.join("abi-numbers.ld"), abi::LD_NUMBERS).expect("abi-numbers.ld");
    let source = scratch("hello-c.c");
    std::fs::write(
        &source,
        "#include \"ksmlab.h\"\n\
         int main(uint64_t ram_bytes, uint64_t guest_index, uint64_t guest_count)\n\
         {\n\
         \tksm_phase_named(1, \"hello\");\n\
         \tksm_puts(\"hello from C\\n\");\n\
         \tksm_report64(ram_bytes);\n\
         \tksm_report(guest_index);\n\
         \tksm_report(ksm_fleet_size(guest_count));\n\
         \treturn 7;\n\
         }\n",
    )
    .expect("guest source");
    let elf = scratch("hello-c.elf");
    let kit = concat!(env!("CARGO_MANIFEST_DIR"), "/../../guest-images/c/kit/ksmlab-cc");
    let cc =
        Command::new(kit).env("KSMLAB_ABI_DIR", &abi).arg("-o").arg(&elf).arg(&source).output().expect("ksmlab-cc");
    assert!(cc.status.success(), "ksmlab-cc: {}", String::from_utf8_lossy(&cc.stderr));
    let elf = elf.to_str().expect("UTF-8 path");
    let r = run(elf, &["--mem", "4M"]);
    assert_eq!(r.stdout().lines().next(), Some("hello from C"), "{}", r.stdout());
    assert_eq!(r.stats.guest.exit_code, Some(7), "main's return value is the exit code: {}", r.stderr());
    // RAM, low half then high; a single guest is guest 0 of 1.
    assert_eq!(r.stats.guest.reports, [4 << 20, 0, 0, 1]);
    // The first marker, then the name, 13 bytes, 4 reports and the exit.
    let io: Vec<u64> = r.stats.phases.iter().map(|p| p.figures.exits.io).collect();
    assert_eq!(io, [1, 1 + 13 + 4 + 1]);
    assert_eq!(r.status(), 1, "a non-zero exit code makes the VMM's status 1");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn kvstore_reports_its_model_and_faults_once_per_merged_value_it_touches() {
    require_kvm();
    const MEM: u64 = 8 << 20;
    let reports = kvstore_expected_reports(MEM, 0);
    let model = kvstore_dedup_model(MEM);
    assert!(model.largest_group <= 256, "every template fits one KSM page at the default max_page_sharing");
    for view in VIEWS {
        for policy in POLICIES {
            let ctx = format!("kvstore: {policy} / {view}");
            let r = run_c("kvstore", "8M", policy, view, &[]);
            check_run(&r, &ctx, &reports, &KVSTORE_PHASE_IO);
            let zaps = policy != "change-pte";
            let expected: Vec<(u64, u64)> = match policy {
                "off" => vec![(0, 0); 6],
                _ => vec![
                    (0, 0),
                    (0, 0),
                    (0, 0),
                    (0, 0),
                    (if zaps { model.run_a_read_faults } else { 0 }, model.run_a_write_faults),
                    (if zaps { model.checksum_read_faults } else { 0 }, 0),
                ],
            };
            assert_eq!(faults(&r), expected, "{ctx}: (ept_read, ept_write) per phase");
            if policy != "off" {
                let ksm = &r.phase(3).ksm;
                let merged = (ksm["pages_shared"], ksm["pages_sharing"]);
                assert_eq!(merged, (model.ksm_pages, model.merged - model.ksm_pages), "{ctx}: after the pass");
            }
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn gcheap_reports_its_live_heap_and_refaults_the_zeroed_semispaces() {
    require_kvm();
    const MEM: u64 = 8 << 20;
    let model = gcheap_run(MEM, 0);
    for view in VIEWS {
        for policy in POLICIES {
            let ctx = format!("gcheap: {policy} / {view}");
            // Every zero page in one KSM page (the model's condition).
            let r = run_c("gcheap", "8M", policy, view, &["--max-page-sharing", "4096"]);
            check_run(&r, &ctx, &model.reports, &GCHEAP_PHASE_IO);
            let writes: Vec<u64> = r.stats.phases.iter().map(|p| p.figures.exits.ept_write).collect();
            let expected = if policy == "off" { vec![0; model.write_faults.len()] } else { model.write_faults.clone() };
            assert_eq!(writes, expected, "{ctx}: ept_write per phase");
            assert_eq!(r.stats.total.exits.ept_read, 0, "{ctx}: the guest never reads a merged page");
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn template_alone_merges_nothing_of_its_image() {
    require_kvm();
    const MEM: u64 = 4 << 20;
    let reports = template_expected_reports(MEM, 0);
    for view in VIEWS {
        for policy in POLICIES {
            let ctx = format!("template: {policy} / {view}");
            let r = run_c("template", "4M", policy, view, &[]);
            check_run(&r, &ctx, &reports, &TEMPLATE_PHASE_IO);
            assert_eq!(faults(&r), vec![(0, 0); 7], "{ctx}: every page of the image is unlike every other");
            assert_eq!(template_faults(MEM, 0, 1, policy != "change-pte"), [(0, 0), (0, 0)]);
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn dirtylog_faults_once_per_written_page_and_once_per_read_only_where_rounds_zap() {
    require_kvm();
    const MEM: u64 = 4 << 20;
    let reports = dirtylog_expected_reports(MEM);
    for view in VIEWS {
        for policy in POLICIES.iter().copied().chain(["event-aware"]) {
            let ctx = format!("dirtylog: {policy} / {view}");
            let r = run_c("dirtylog", "4M", policy, view, &[]);
            check_run(&r, &ctx, &reports, &DIRTYLOG_PHASE_IO);
            // Exactly the model's: each written page once under every
            // policy and, where a round zaps (all but event-aware), each page
            // read once after it, and the code page once at the round.
            let measured: Vec<(u64, u64)> = r
                .stats
                .phases
                .iter()
                .map(|p| (p.figures.exits.ept_read + p.figures.exits.ept_fetch, p.figures.exits.ept_write))
                .collect();
            let zaps = policy != "event-aware";
            let model: Vec<(u64, u64)> = (0..=DIRTYLOG_PHASES).map(|p| dirtylog_faults(MEM, p, zaps)).collect();
            assert_eq!(measured, model, "{ctx}");
        }
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn ltp_ksm01_with_dedup_off_verifies_every_byte_and_every_figure_is_zero() {
    require_kvm();
    for (image, io) in [("ltp-ksm01", LTP_KSM01_PHASE_IO), ("ltp-ksm01-fleet", LTP_KSM01_FLEET_GUEST0_PHASE_IO)] {
        for view in VIEWS {
            let ctx = format!("{image}: off / {view}");
            let r = run_c(image, "8M", "off", view, &[]);
            check_run(&r, &ctx, &LTP_KSM01_EXPECTED_REPORTS, &io);
            for p in &r.stats.phases {
                for figure in ["pages_shared", "pages_sharing", "pages_volatile", "pages_unshared"] {
                    let value = p.figures.ksm.get(figure).copied().unwrap_or(0);
                    assert_eq!(value, 0, "{ctx}: phase {}: {figure}", p.phase);
                }
            }
            assert_eq!(r.stats.total.exits.total, r.stats.total.exits.io, "{ctx}: {:?}", r.stats.total.exits);
        }
    }
    // What the guest's own pages add under a deduplicator, for the lead's
    // per-stage test: at 8 MiB, three children of 597 pages and one image page.
    assert_eq!(ltp_ksm01_layout(8 << 20).child_pages, 597);
    assert_eq!(ltp_ksm01_guest_figures(4, 8 << 20).pages_unshared, 2);
}

/// LTP ksm01 (testcases/kernel/mem/ksm: `create_same_memory` in
/// ksm_test.h) in one guest, its three children as three regions: after
/// each stage's pass and after `run = 2` and `run = 0`, pages_shared,
/// pages_sharing, pages_volatile and pages_unshared are LTP's figures
/// (lines 265-287 of ksm_test.h), under every built-in policy and both
/// views, with LTP's settings (`max_page_sharing` at least the page count,
/// `smart_scan` 0, every page scanned in each batch, no sleep). The guest's
/// own pages add to one figure only: its image page and the 0-2 leftover
/// pages after the children are each unlike every other page, so
/// `pages_unshared` is LTP's plus their number (1 at 8 MiB: the image page,
/// no leftover) in stages 1-4; after the unmerge every figure is 0, as
/// LTP expects.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn ltp_ksm01_gives_ltps_figures_at_every_stage() {
    require_kvm();
    const MEM: u64 = 8 << 20;
    let layout = ltp_ksm01_layout(MEM);
    assert_eq!((layout.child_pages, layout.image_pages + layout.leftover_pages), (597, 1));
    let all = (3 * layout.child_pages + layout.image_pages + layout.leftover_pages).to_string();
    let settings = ["--max-page-sharing", &all, "--smart-scan", "0", "--pages-to-scan", &all, "--sleep-millisecs", "0"];
    for view in VIEWS {
        for policy in ["change-pte", "range-flush", "legacy", "event-aware"] {
            let ctx = format!("ltp-ksm01: {policy} / {view}");
            let r = run_c("ltp-ksm01", "8M", policy, view, &settings);
            check_run(&r, &ctx, &LTP_KSM01_EXPECTED_REPORTS, &LTP_KSM01_PHASE_IO);
            for p in &r.stats.phases[1..] {
                let figure = |name: &str| p.figures.ksm.get(name).copied().unwrap_or(0);
                let measured = KsmFigures {
                    pages_shared: figure("pages_shared"),
                    pages_sharing: figure("pages_sharing"),
                    pages_volatile: figure("pages_volatile"),
                    pages_unshared: figure("pages_unshared"),
                };
                assert_eq!(measured, ltp_ksm01_guest_figures(p.phase, MEM), "{ctx}: phase {}", p.phase);
            }
            let zaps = !matches!(policy, "change-pte" | "event-aware");
            assert_eq!(faults(&r), ltp_ksm01_faults(MEM, zaps).to_vec(), "{ctx}: faults per phase");
        }
    }
}
