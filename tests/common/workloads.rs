//! The exit models of the comparison workloads `cowstorm`, `mixed` and
//! `volatile` (guest-images/README.md): per phase, the exits, the
//! secondary- and primary-MMU events and the merges each policy must show,
//! derived from the number of pages the guest touches with the building
//! blocks of tests/common/phase_model.rs, and checked against a run's
//! statistics. Used by tests/workloads.rs.

use vmm::stats::RunStats;
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

use super::phase_model::{groups_merged, PhaseModel};

fn ctx(image: &str, policy: DedupPolicy, view: ViewKind) -> String {
    format!("{image}: {} / {}", policy.name(), view.name())
}

/// The run ended by the guest's exit 0, with `reports`, and its phases are
/// 0 to `last`.
fn check_end(s: &RunStats, ctx: &str, reports: &[u64], last: u32) {
    assert_eq!(s.guest.end.reason, "exit", "{ctx}: {}", s.guest.end.detail);
    assert_eq!(s.guest.exit_code, Some(0), "{ctx}");
    assert_eq!(s.guest.reports, reports, "{ctx}: reports");
    let numbers: Vec<u32> = s.phases.iter().map(|p| p.phase).collect();
    assert_eq!(numbers, (0..=last).collect::<Vec<_>>(), "{ctx}: phases");
}

/// Checks the exits of every phase against the model (io, read and write
/// faults; nothing else exits) and returns every phase whose other figures
/// are not exactly the model's.
fn deviations(s: &RunStats, ctx: &str, policy: DedupPolicy, model: &[PhaseModel]) -> Vec<String> {
    let mut off = Vec::new();
    for (p, expected) in s.phases.iter().zip(model) {
        let measured = PhaseModel::measured(&p.figures, policy);
        let n = p.phase;
        assert_eq!(
            (measured.io, measured.ept_read, measured.ept_write),
            (expected.io, expected.ept_read, expected.ept_write),
            "{ctx}: phase {n}"
        );
        if measured != *expected {
            off.push(format!("phase {n}: measured {measured:?}\n     model says {expected:?}"));
        }
    }
    check_no_other_exits(s, ctx);
    off
}

/// No phase has an exit other than io and secondary-MMU read or write faults.
fn check_no_other_exits(s: &RunStats, ctx: &str) {
    for p in &s.phases {
        let e = &p.figures.exits;
        assert_eq!((e.mmio, e.ept_fetch, e.hlt, e.shutdown, e.other), (0, 0, 0, 0, 0), "{ctx}: phase {}", p.phase);
        assert_eq!(e.total, e.io + e.ept_read + e.ept_write, "{ctx}: phase {}", p.phase);
    }
}

/// The model of a `cowstorm` run of `mem_bytes` with `max_page_sharing`
/// `max_sharing`: phases 0 to 10.
pub fn cowstorm_model(mem_bytes: u64, policy: DedupPolicy, max_sharing: u32) -> Vec<PhaseModel> {
    let groups = groups_merged(guest_images::cowstorm_pages(mem_bytes), guest_images::COWSTORM_GROUPS, max_sharing);
    let merged: u64 = groups.iter().map(|g| g.0).sum();
    let ksm_pages: u64 = groups.iter().map(|g| g.1).sum();
    (0..=guest_images::COWSTORM_PHASES)
        .map(|p| {
            let phase = PhaseModel::io(guest_images::COWSTORM_PHASE_IO[p as usize]);
            if policy == DedupPolicy::Off {
                phase
            } else if guest_images::cowstorm_is_pass_phase(p) {
                // Every entry is there: pre-faulted (round 1) or installed
                // writable by the storm before.
                phase.pass(policy, merged, ksm_pages)
            } else if guest_images::cowstorm_is_storm_phase(p) {
                // Every merged page faults once (an unmerged one is private
                // and writable already). The pass zapped their entries unless
                // the policy is change-pte; the last page of each KSM page
                // frees it.
                let present = if super::updates_in_place(policy) { merged } else { 0 };
                phase.cow(policy, merged, present, ksm_pages)
            } else {
                phase
            }
        })
        .collect()
}

/// Checks a `cowstorm` run of `mem_bytes` with `max_page_sharing`
/// `max_sharing`: asserts its end, reports and what is certain phase by
/// phase, and returns the phases whose figures are off the model (none
/// when the model holds).
pub fn cowstorm_deviations(
    s: &RunStats,
    mem_bytes: u64,
    policy: DedupPolicy,
    view: ViewKind,
    max_sharing: u32,
) -> Vec<String> {
    let ctx = ctx("cowstorm", policy, view);
    check_end(s, &ctx, &guest_images::cowstorm_expected_reports(mem_bytes), guest_images::COWSTORM_PHASES);
    assert_eq!(s.total.exits.io, guest_images::COWSTORM_IO_EXITS, "{ctx}");
    deviations(s, &ctx, policy, &cowstorm_model(mem_bytes, policy, max_sharing))
}

/// The model of a `mixed` run of `mem_bytes` with `max_page_sharing`
/// `max_sharing`, ksmd never switched on: phases 0 to 19.
pub fn mixed_model(mem_bytes: u64, policy: DedupPolicy, max_sharing: u32) -> Vec<PhaseModel> {
    let stride = guest_images::MIXED_STRIDE;
    // Groups and the eighths written per phase coincide (8 groups, every 8th
    // page), so phase 3 + j writes exactly group j % 8.
    assert_eq!(guest_images::MIXED_GROUPS, stride);
    let groups = groups_merged(guest_images::mixed_pages(mem_bytes), guest_images::MIXED_GROUPS, max_sharing);
    let merged: u64 = groups.iter().map(|g| g.0).sum();
    let ksm_pages: u64 = groups.iter().map(|g| g.1).sum();
    let zaps = !super::updates_in_place(policy);
    (0..=guest_images::MIXED_PHASES)
        .map(|p| {
            let mut phase = PhaseModel::io(guest_images::MIXED_PHASE_IO[p as usize]);
            if policy == DedupPolicy::Off {
                return phase;
            }
            if p == 2 {
                return phase.pass(policy, merged, ksm_pages);
            }
            let first = guest_images::MIXED_FIRST_RW_PHASE;
            if !(first..first + stride as u32).contains(&p) {
                // Phases 11 to 18 write pages that are private already.
                return phase;
            }
            if p == first && zaps {
                // The pass zapped every merged page's entry: each load of one
                // refaults once, installing a read-only entry the store then
                // finds.
                phase = phase.refault(merged);
            }
            // The stores break every merged page of one group (an unmerged one
            // is private already), and free its KSM pages. Every one of them
            // has an entry: change-pte kept it, the others installed it on
            // the phase-3 load.
            let (w, k) = groups[(p - first) as usize % stride as usize];
            phase.cow(policy, w, w, k)
        })
        .collect()
}

/// Checks a `mixed` run of `mem_bytes` with `max_page_sharing`
/// `max_sharing` (ksmd never switched on): asserts its end, reports and
/// what is certain phase by phase, and returns the phases whose figures are
/// off the model (none when the model holds).
pub fn mixed_deviations(
    s: &RunStats,
    mem_bytes: u64,
    policy: DedupPolicy,
    view: ViewKind,
    max_sharing: u32,
) -> Vec<String> {
    let ctx = ctx("mixed", policy, view);
    check_end(s, &ctx, &guest_images::mixed_expected_reports(mem_bytes), guest_images::MIXED_PHASES);
    assert_eq!(s.total.exits.io, guest_images::MIXED_IO_EXITS, "{ctx}");
    deviations(s, &ctx, policy, &mixed_model(mem_bytes, policy, max_sharing))
}

/// Checks what is certain in a `volatile` run of `mem_bytes`, whatever
/// ksmd's timing: the reports, io exits only (exactly those of the model),
/// and not a single merge, notification, zap or install in any phase.
/// Returns the full scans ksmd completed in phase 2 (timing-dependent).
pub fn check_volatile(s: &RunStats, mem_bytes: u64, policy: DedupPolicy, view: ViewKind) -> u64 {
    let ctx = ctx("volatile", policy, view);
    check_end(s, &ctx, &guest_images::volatile_expected_reports(mem_bytes), guest_images::VOLATILE_PHASES);
    let model: Vec<PhaseModel> = guest_images::VOLATILE_PHASE_IO.iter().map(|&io| PhaseModel::io(io)).collect();
    for (p, expected) in s.phases.iter().zip(&model) {
        let measured = PhaseModel::measured(&p.figures, policy);
        // full_scans is ksmd's timing; everything else is certain.
        assert_eq!(PhaseModel { full_scans: 0, ..measured }, *expected, "{ctx}: phase {}", p.phase);
    }
    check_no_other_exits(s, &ctx);
    let e = &s.total.exits;
    assert_eq!((e.io, e.total), (guest_images::VOLATILE_IO_EXITS, guest_images::VOLATILE_IO_EXITS), "{ctx}: {e:?}");
    if policy == DedupPolicy::Off {
        return 0;
    }
    for p in &s.phases {
        let ksm =
            |name: &str| p.figures.ksm.get(name).copied().unwrap_or_else(|| panic!("{ctx}: no ksm figure {name}"));
        assert_eq!((ksm("pages_shared"), ksm("pages_sharing")), (0, 0), "{ctx}: phase {}", p.phase);
    }
    s.phases[2].figures.ksm.get("full_scans").copied().unwrap_or(0)
}
