//! The exit models of the comparison workloads `cowstorm`, `mixed` and
//! `volatile` (guest-images/README.md): per phase, the exits, the
//! secondary- and primary-MMU events and the merges each policy must show,
//! derived from the number of pages the guest touches, and checked against a
//! run's statistics. Used by tests/workloads.rs.
//!
//! The model has three building blocks, all derived from shadow_mmu and
//! ksm (and verified on KVM by the tests):
//!
//! * a synchronous pass over groups of identical pages merges M of them into
//!   K KSM pages ([`pass_merges`]: all of them, one KSM page per group, when
//!   each group holds 2 to `max_page_sharing` pages): M write-protections
//!   (RW -> RO, same frame) and M - K replaces (RO -> RO, the KSM frame),
//!   each one notifier range with one `change_pte`; M - K frames freed;
//!   three full scans (checksums, merges, a quiet one).
//!   change-pte updates every entry in place; range-flush and legacy zap
//!   each page's entry at its write-protection (the replace then finds
//!   nothing to zap), and legacy's `change_pte` always finds no entry.
//! * a guest write to a merged page is one `ept_write` fault and one
//!   copy-on-write break (`wp_page_copy`: a frame allocated, one range, one
//!   `change_pte`); the break ends its range, so the fault handler's
//!   sequence check retries once, then installs the writable entry. A KSM
//!   frame is freed when its last page copies away. Under range-flush and
//!   legacy the break zaps the page's entry if one is there (a read
//!   installed it), and legacy's `change_pte` finds nothing.
//! * a guest read of a zapped page is one `ept_read` fault that installs a
//!   read-only entry.

use vmm::stats::{Figures, RunStats};
use vmm::view::ViewKind;
use vmm::vm::DedupPolicy;

/// What the model predicts for one phase (and what a run measured).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PhaseModel {
    /// Io exits.
    pub io: u64,
    /// Read faults (`ept_read`).
    pub ept_read: u64,
    /// Write faults (`ept_write`).
    pub ept_write: u64,
    /// Entries the fault handler installed.
    pub installed: u64,
    /// Entries range zaps removed.
    pub zapped: u64,
    /// Range zaps that removed something.
    pub flushes: u64,
    /// `change_pte` calls that updated an entry.
    pub change_pte_applied: u64,
    /// `change_pte` calls that found no entry.
    pub change_pte_missed: u64,
    /// `change_pte` notifications the primary MMU sent.
    pub change_pte_calls: u64,
    /// Notifier ranges the primary MMU opened.
    pub notifier_ranges: u64,
    /// Copy-on-write breaks by copying.
    pub cow_copies: u64,
    /// Faults retried because an invalidation ended meanwhile.
    pub fault_retries: u64,
    /// Frames returned to the host.
    pub frames_freed: u64,
    /// Frames taken from the free list.
    pub frames_allocated: u64,
    /// Successful merges.
    pub merges: u64,
    /// Full scans of the deduplicator.
    pub full_scans: u64,
}

impl PhaseModel {
    fn io(io: u64) -> Self {
        Self { io, ..Self::default() }
    }

    /// Adds a synchronous pass that merges `n` pages into `k` KSM pages,
    /// every page with an entry in the secondary MMU at its start.
    fn pass(mut self, policy: DedupPolicy, n: u64, k: u64) -> Self {
        let changes = 2 * n - k;
        self.change_pte_calls += changes;
        self.notifier_ranges += changes;
        match policy {
            DedupPolicy::ChangePte => self.change_pte_applied += changes,
            DedupPolicy::RangeFlush => {}
            DedupPolicy::Legacy => self.change_pte_missed += changes,
            other => panic!("the model is the built-in deduplicator's; no pass under {}", other.name()),
        }
        if policy != DedupPolicy::ChangePte {
            self.zapped += n;
            self.flushes += n;
        }
        self.frames_freed += n - k;
        self.merges += n;
        self.full_scans += 3;
        self
    }

    /// Adds `w` guest writes to merged pages, `present` of which have an
    /// entry in the secondary MMU (under change-pte all of them do),
    /// freeing `ksm_freed` KSM frames.
    fn cow(mut self, policy: DedupPolicy, w: u64, present: u64, ksm_freed: u64) -> Self {
        self.ept_write += w;
        self.installed += w;
        self.fault_retries += w;
        self.cow_copies += w;
        self.frames_allocated += w;
        self.notifier_ranges += w;
        self.change_pte_calls += w;
        match policy {
            DedupPolicy::ChangePte => self.change_pte_applied += w,
            DedupPolicy::RangeFlush => {}
            DedupPolicy::Legacy => self.change_pte_missed += w,
            other => panic!("the model is the built-in deduplicator's; no merge under {}", other.name()),
        }
        if policy != DedupPolicy::ChangePte {
            self.zapped += present;
            self.flushes += present;
        }
        self.frames_freed += ksm_freed;
        self
    }

    /// Adds `r` guest reads of zapped pages.
    fn refault(mut self, r: u64) -> Self {
        self.ept_read += r;
        self.installed += r;
        self
    }

    /// What a phase of a run measured, in the model's terms. With dedup
    /// off there is no deduplicator and its figures are absent (zero).
    pub fn measured(f: &Figures, policy: DedupPolicy) -> Self {
        let shadow = |name: &str| {
            f.shadow_mmu.get(name).copied().unwrap_or_else(|| panic!("no shadow_mmu figure {name}: {:?}", f.shadow_mmu))
        };
        let ksm = |name: &str| match policy {
            DedupPolicy::Off => f.ksm.get(name).copied().unwrap_or(0),
            _ => f.ksm.get(name).copied().unwrap_or_else(|| panic!("no ksm figure {name}: {:?}", f.ksm)),
        };
        Self {
            io: f.exits.io,
            ept_read: f.exits.ept_read,
            ept_write: f.exits.ept_write,
            installed: shadow("installed"),
            zapped: shadow("zapped"),
            flushes: shadow("flushes"),
            change_pte_applied: shadow("change_pte_applied"),
            change_pte_missed: shadow("change_pte_missed"),
            change_pte_calls: shadow("change_pte_calls"),
            notifier_ranges: shadow("notifier_ranges"),
            cow_copies: shadow("cow_copies"),
            fault_retries: shadow("fault_retries"),
            frames_freed: shadow("frames_freed"),
            frames_allocated: shadow("frames_allocated"),
            merges: ksm("merges"),
            full_scans: ksm("full_scans"),
        }
    }
}

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

/// What one synchronous pass makes of a group of `n` identical pages when
/// a KSM page takes at most `max_sharing` pages (`max_page_sharing`):
/// `(merged pages, KSM pages)`. Scanning in order, the first page of each
/// run of `max_sharing` waits in the unstable tree, the second merges with
/// it into a new KSM page (a duplicate in the stable entry's chain once the
/// first is full), the rest are appended; a last run of a single page finds
/// no partner and stays unmerged, as does a group of one page.
pub fn pass_merges(n: u64, max_sharing: u64) -> (u64, u64) {
    let rest = n % max_sharing;
    (n - u64::from(rest == 1), n / max_sharing + u64::from(rest >= 2))
}

/// [`pass_merges`] of every group of `pages` pages in `groups` groups
/// (page `i` in group `i % groups`), by group.
fn groups_merged(pages: u64, groups: u64, max_sharing: u32) -> Vec<(u64, u64)> {
    (0..groups).map(|g| pass_merges(pages / groups + u64::from(g < pages % groups), u64::from(max_sharing))).collect()
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
                let present = if policy == DedupPolicy::ChangePte { merged } else { 0 };
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
    let zaps = policy != DedupPolicy::ChangePte;
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
