//! The building blocks of the comparison workloads' exit models
//! (tests/common/workloads.rs): what a phase must show, in exits,
//! secondary- and primary-MMU events and merges, and how a run's figures
//! read in those terms.
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

use vmm::stats::Figures;
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
    pub fn io(io: u64) -> Self {
        Self { io, ..Self::default() }
    }

    /// Adds a synchronous pass that merges `n` pages into `k` KSM pages,
    /// every page with an entry in the secondary MMU at its start.
    pub fn pass(self, policy: DedupPolicy, n: u64, k: u64) -> Self {
        let mut phase = self.pte_changes(policy, 2 * n - k, n);
        phase.frames_freed += n - k;
        phase.merges += n;
        phase.full_scans += 3;
        phase
    }

    /// Adds `w` guest writes to merged pages, `present` of which have an
    /// entry in the secondary MMU (under change-pte all of them do),
    /// freeing `ksm_freed` KSM frames.
    pub fn cow(self, policy: DedupPolicy, w: u64, present: u64, ksm_freed: u64) -> Self {
        let mut phase = self.pte_changes(policy, w, present);
        phase.ept_write += w;
        phase.installed += w;
        phase.fault_retries += w;
        phase.cow_copies += w;
        phase.frames_allocated += w;
        phase.frames_freed += ksm_freed;
        phase
    }

    /// Adds `changes` pte changes, each in its own notifier range with one
    /// `change_pte`, over pages `present` of which have an entry in the
    /// secondary MMU: change-pte updates each in place, range-flush and
    /// legacy zap the entries there (one flush each), and legacy's
    /// `change_pte` then finds nothing.
    fn pte_changes(mut self, policy: DedupPolicy, changes: u64, present: u64) -> Self {
        self.change_pte_calls += changes;
        self.notifier_ranges += changes;
        match policy {
            DedupPolicy::ChangePte | DedupPolicy::EventAware => {
                self.change_pte_applied += changes;
                // Each in-place update of a present entry is a TLB flush.
                self.flushes += changes;
            }
            DedupPolicy::RangeFlush => {}
            DedupPolicy::Legacy => self.change_pte_missed += changes,
            other => panic!("the model is the built-in deduplicator's; nothing changes ptes under {}", other.name()),
        }
        if !super::updates_in_place(policy) {
            self.zapped += present;
            self.flushes += present;
        }
        self
    }

    /// Adds `r` guest reads of zapped pages.
    pub fn refault(mut self, r: u64) -> Self {
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
pub fn groups_merged(pages: u64, groups: u64, max_sharing: u32) -> Vec<(u64, u64)> {
    (0..groups).map(|g| pass_merges(pages / groups + u64::from(g < pages % groups), u64::from(max_sharing))).collect()
}
