//! Fleets (`--guests N`, ABI 1.1) on real KVM, through the `vmm` binary:
//! each guest gets its seat (RSI, RDX) and waits at the barriers, reports
//! what it reports alone, and a deduplicator merges across guests so that
//! every guest's figures follow the fleet models of guest-images/src
//! (`template_faults`, `ltp_ksm01_fleet_figures`); a fleet ends non-zero
//! when one guest fails. The limits are refused in tests/bad_input.rs.

mod common;

use common::host_ksm::{require_host_ksm, HOST_KSM};
use common::{require_kvm, run, vmm, Run};
use guest_images::*;
use vmm::stats::GuestStats;

const BUILTIN: [&str; 4] = ["change-pte", "range-flush", "legacy", "event-aware"];
const VIEWS: [&str; 2] = ["memslot", "uffd"];

/// Runs `guests` guests of `image` with `mem` of RAM each.
fn run_fleet(image: &str, guests: u32, mem: &str, policy: &str, view: &str, extra: &[&str]) -> Run {
    let n = guests.to_string();
    let mut args = vec!["--guests", &n, "--mem", mem, "--dedup", policy, "--view", view];
    if !extra.contains(&"--timeout") {
        args.extend(["--timeout", "300"]);
    }
    args.extend(extra);
    run(image, &args)
}

/// Every guest and the fleet ended with exit 0.
fn check_ended(r: &Run, ctx: &str, guests: usize) {
    assert_eq!(r.stats.guests.len(), guests, "{ctx}: one entry per guest; stderr: {}", r.stderr());
    for g in &r.stats.guests {
        assert_eq!(g.guest.exit_code, Some(0), "{ctx}: guest {}: {}", g.index, g.guest.end.detail);
    }
    assert_eq!((r.status(), r.stats.guest.exit_code), (0, Some(0)), "{ctx}: {}", r.stats.guest.end.detail);
    assert_eq!(r.stats.config.guests as usize, guests, "{ctx}");
}

/// `(ept_read, ept_write)` of every phase of one guest.
fn faults(g: &GuestStats) -> Vec<(u64, u64)> {
    g.phases.iter().map(|p| (p.figures.exits.ept_read, p.figures.exits.ept_write)).collect()
}

fn io_per_phase(g: &GuestStats) -> Vec<u64> {
    g.phases.iter().map(|p| p.figures.exits.io).collect()
}

/// A fleet's exits are its guests' summed, phase by phase and in total.
fn check_fleet_sums(r: &Run, ctx: &str) {
    let total: u64 = r.stats.guests.iter().map(|g| g.total.exits.total).sum();
    assert_eq!(r.stats.total.exits.total, total, "{ctx}: the fleet's exits");
    for (pos, p) in r.stats.phases.iter().enumerate() {
        let io: u64 = r.stats.guests.iter().filter_map(|g| g.phases.get(pos)).map(|q| q.figures.exits.io).sum();
        assert_eq!(p.figures.exits.io, io, "{ctx}: the fleet's io exits at position {pos}");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn every_guest_of_a_fleet_gets_its_seat_waits_at_the_barriers_and_reports_as_alone() {
    require_kvm();
    const MEM: u64 = 4 << 20;
    for view in VIEWS {
        let ctx = format!("template x 4: off / {view}");
        let r = run_fleet("template", 4, "4M", "off", view, &[]);
        check_ended(&r, &ctx, 4);
        for g in &r.stats.guests {
            // The guest's reports hold its own index (it diverges by it).
            assert_eq!(g.guest.reports, template_expected_reports(MEM, g.index), "{ctx}: guest {}", g.index);
            assert_eq!(io_per_phase(g), template_phase_io(g.index).to_vec(), "{ctx}: guest {} io", g.index);
            assert_eq!(faults(g), vec![(0, 0); 7], "{ctx}: nothing merges with dedup off");
        }
        check_fleet_sums(&r, &ctx);
        assert!(r.stats.guest.reports.is_empty(), "{ctx}: the fleet's own list is empty (each guest has its own)");
    }
}

/// Every guest holds the same image; a pass merges it across the fleet
/// (`template_pages` KSM pages and one per page of the guest's own image,
/// each shared by every guest), and each
/// guest's faults are `template_faults`' for its index: a read fault per
/// zapped page after the pass, a copy-on-write fault per page it rewrites.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_template_fleet_merges_its_image_across_guests_under_every_builtin_policy() {
    require_kvm();
    const MEM: u64 = 4 << 20;
    const N: u64 = 4;
    // The image's own pages (code and names) are the same in every guest
    // and merge too, as `ltp_ksm01_fleet_figures` counts them.
    let image = find("template").expect("built in").load_end().saturating_sub(abi::GUEST_BASE).div_ceil(4096);
    let pages = template_pages(MEM) + image;
    for view in VIEWS {
        for policy in BUILTIN {
            let ctx = format!("template x {N}: {policy} / {view}");
            let r = run_fleet("template", N as u32, "4M", policy, view, &[]);
            check_ended(&r, &ctx, N as usize);
            let merged = r.stats.phases.iter().find(|p| p.phase == 2).expect("phase 2");
            assert_eq!(merged.figures.ksm["pages_shared"], pages, "{ctx}: one KSM page per page of the image");
            assert_eq!(merged.figures.ksm["pages_sharing"], (N - 1) * pages, "{ctx}: shared by every guest");
            let zaps = !matches!(policy, "change-pte" | "event-aware");
            for g in &r.stats.guests {
                assert_eq!(g.guest.reports, template_expected_reports(MEM, g.index), "{ctx}: guest {}", g.index);
                let [read, write] = template_faults(MEM, g.index, N, zaps);
                assert_eq!(&faults(g)[3..5], &[read, write], "{ctx}: guest {} faults in phases 3 and 4", g.index);
            }
            check_fleet_sums(&r, &ctx);
        }
    }
}

/// LTP ksm01 (`create_same_memory`, ksm_test.h) with its three children as
/// three guests: after each stage's pass, after `run = 2` and after `run =
/// 0`, the fleet-wide pages_shared, pages_sharing, pages_volatile and
/// pages_unshared are LTP's for three children, plus what the guests'
/// identical image pages add (one KSM page each, shared three ways:
/// `ltp_ksm01_fleet_figures`), with LTP's settings.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn ltp_ksm01_as_three_guests_gives_ltps_figures_at_every_stage() {
    require_kvm();
    const MEM: u64 = 8 << 20;
    let all = (3 * (MEM >> 12)).to_string();
    let settings = ["--max-page-sharing", &all, "--smart-scan", "0", "--pages-to-scan", &all, "--sleep-millisecs", "0"];
    for view in VIEWS {
        for policy in BUILTIN {
            let ctx = format!("ltp-ksm01-fleet x 3: {policy} / {view}");
            let r = run_fleet("ltp-ksm01-fleet", 3, "8M", policy, view, &settings);
            check_ended(&r, &ctx, 3);
            for g in &r.stats.guests {
                assert_eq!(g.guest.reports, LTP_KSM01_EXPECTED_REPORTS, "{ctx}: guest {} verified", g.index);
                assert_eq!(io_per_phase(g), ltp_ksm01_fleet_phase_io(g.index).to_vec(), "{ctx}: guest {}", g.index);
            }
            // Guest 0 asks for the passes: its phase ends see their figures.
            for p in &r.stats.guests[0].phases[1..] {
                let figure = |name: &str| p.figures.ksm.get(name).copied().unwrap_or(0);
                let measured = KsmFigures {
                    pages_shared: figure("pages_shared"),
                    pages_sharing: figure("pages_sharing"),
                    pages_volatile: figure("pages_volatile"),
                    pages_unshared: figure("pages_unshared"),
                };
                assert_eq!(measured, ltp_ksm01_fleet_figures(p.phase, 3, MEM), "{ctx}: phase {}", p.phase);
            }
        }
    }
}

/// The scale: 8 guests of 64 MiB of `converge` under the uffd view,
/// every identical page merged fleet-wide: the 64 groups of every guest
/// into 64 KSM pages, and the fleet's figures are one guest's fleet-wide
/// (each page that is unique in a guest is the same in every guest, so it
/// is shared too).
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn eight_guests_of_64m_converge_merge_every_identical_page_fleet_wide() {
    require_kvm();
    const N: u64 = 8;
    let knobs = ["--max-page-sharing", "1048576"];
    let alone = run_fleet("converge", 1, "64M", "range-flush", "uffd", &knobs);
    let ksm = &alone.phase(2).ksm;
    let (shared, sharing, unshared) = (ksm["pages_shared"], ksm["pages_sharing"], ksm["pages_unshared"]);
    assert!(shared >= CONVERGE_GROUPS, "alone: the 64 groups merge ({shared})");
    for policy in ["change-pte", "range-flush"] {
        let ctx = format!("converge x {N}: {policy} / uffd");
        let r = run_fleet("converge", N as u32, "64M", policy, "uffd", &knobs);
        check_ended(&r, &ctx, N as usize);
        for g in &r.stats.guests {
            assert_eq!(g.guest.reports, converge_expected_reports(64 << 20), "{ctx}: guest {}", g.index);
            assert_eq!(io_per_phase(g), converge_phase_io(g.index, N).to_vec(), "{ctx}: guest {}", g.index);
        }
        let fleet = &r.stats.phases[2].figures.ksm;
        let pages = shared + sharing + unshared;
        assert_eq!(fleet["pages_shared"], shared + unshared, "{ctx}: every content one KSM page fleet-wide");
        assert_eq!(fleet["pages_sharing"], N * pages - (shared + unshared), "{ctx}: every other page shares it");
        assert_eq!(fleet["pages_unshared"], 0, "{ctx}: nothing is unique in a fleet of one image");
    }
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn sixteen_guests_of_64m_run_to_the_end() {
    require_kvm();
    let r = run_fleet("converge", 16, "64M", "range-flush", "memslot", &[]);
    check_ended(&r, "converge x 16: range-flush / memslot", 16);
    for g in &r.stats.guests {
        assert_eq!(g.guest.reports, converge_expected_reports(64 << 20), "guest {}", g.index);
    }
    assert!(r.stats.total.ksm["pages_sharing"] > 0, "the fleet merged");
}

/// The kernel policy over a fleet: the host's KSM merges across the VMs
/// (every guest's RAM is mergeable); the guests read what they read alone.
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn the_hosts_ksm_merges_a_template_fleet_across_vms() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _one_at_a_time = HOST_KSM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    const MEM: u64 = 4 << 20;
    let r = run_fleet("template", 3, "4M", "kernel", "memslot", &[]);
    check_ended(&r, "template x 3: kernel", 3);
    for g in &r.stats.guests {
        assert_eq!(g.guest.reports, template_expected_reports(MEM, g.index), "guest {}", g.index);
    }
    let merged = &r.stats.phases.iter().find(|p| p.phase == 2).expect("phase 2").figures.ksm;
    // Host-wide figures: other processes may add, never take away.
    assert!(merged["pages_sharing"] >= 2 * template_pages(MEM), "{merged:?}");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn a_fleet_fails_when_a_guest_fails_and_ends_together_on_a_timeout() {
    require_kvm();
    let r = run_fleet("misbehave-exit-code", 3, "4M", "off", "uffd", &[]);
    assert_eq!(r.status(), 1, "a guest's non-zero code is the fleet's; stderr: {}", r.stderr());
    assert!(r.stats.guests.iter().all(|g| g.guest.exit_code == Some(3)));
    let r = run_fleet("misbehave-spin", 2, "4M", "off", "uffd", &["--timeout", "1"]);
    assert_eq!(r.status(), 3, "{}", r.stats.guest.end.detail);
    assert!(r.stats.guests.iter().all(|g| g.guest.end.reason == "timeout"), "{:?}", r.stats.guest.end);
    assert_eq!(r.stats.guest.end.reason, "timeout");
    // Each guest's console lines carry its index.
    assert!(r.stdout().contains("[guest 1] spinning"), "{}", r.stdout());
}

/// SIGINT ends every guest of a running fleet, with statistics, and the
/// host's KSM as it was (the kernel policy over the fleet, ksmd running).
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn an_interrupt_ends_every_guest_with_statistics_and_gives_the_hosts_ksm_back() {
    require_kvm();
    if !require_host_ksm() {
        return;
    }
    let _one_at_a_time = HOST_KSM.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    let before = common::host_ksm::host_knobs();
    let json = common::scratch("fleet-sigint.json");
    let mut child = vmm()
        .args(["run", "misbehave-spin", "--guests", "3", "--mem", "4M", "--dedup", "kernel", "--ksm-run", "1"])
        .arg("--stats-json")
        .arg(&json)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("spawn");
    std::thread::sleep(std::time::Duration::from_millis(800));
    // SAFETY: a standard signal to our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGINT) };
    assert_eq!(child.wait().expect("wait").code(), Some(3), "ended by the signal instead of cleanly");
    let stats: vmm::stats::RunStats =
        serde_json::from_str(&std::fs::read_to_string(&json).expect("stats")).expect("schema 1");
    assert_eq!(stats.guests.len(), 3);
    assert!(stats.guests.iter().all(|g| g.guest.end.reason == "interrupted"), "{}", stats.guest.end.detail);
    assert_eq!(common::host_ksm::host_knobs(), before, "the fleet left the host's KSM changed");
}

/// `kvstore` x 3: every store serves its own requests (its reports are
/// those of its index alone) and the pass between the barriers merges
/// across the fleet: the fleet shares more pages than its three stores
/// would alone (the templates, and what the loads wrote alike).
#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn kvstore_guests_merge_their_templates_across_the_fleet() {
    require_kvm();
    const MEM: u64 = 8 << 20;
    let alone = kvstore_dedup_model(MEM);
    for view in VIEWS {
        for policy in ["off", "change-pte", "range-flush"] {
            let ctx = format!("kvstore x 3: {policy} / {view}");
            let r = run_fleet("kvstore", 3, "8M", policy, view, &["--max-page-sharing", "4096"]);
            check_ended(&r, &ctx, 3);
            for g in &r.stats.guests {
                assert_eq!(g.guest.reports, kvstore_expected_reports(MEM, g.index), "{ctx}: guest {}", g.index);
                assert_eq!(io_per_phase(g), kvstore_phase_io(g.index, 3).to_vec(), "{ctx}: guest {}", g.index);
            }
            let ksm = &r.stats.phases[3].figures.ksm;
            if policy == "off" {
                assert_eq!(ksm["pages_sharing"], 0, "{ctx}");
                continue;
            }
            // Each store alone shares its templates' pages; together they
            // share more (the templates, and the pages the loads wrote alike).
            let alone_sharing = alone.merged - alone.ksm_pages;
            assert!(ksm["pages_sharing"] > 3 * alone_sharing, "{ctx}: {ksm:?} against {alone_sharing} alone");
        }
    }
}
