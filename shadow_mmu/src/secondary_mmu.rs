//! The secondary MMU, after arch/x86/kvm/mmu: an EPT table kept in step with
//! the primary MMU by the mmu notifier, filled by the EPT-violation handler.
//!
//! Four policies decide what a notification does ([`Policy`]). The
//! invalidation sequence protocol is KVM's: a fault reads
//! `mmu_invalidate_seq` before it looks up the host pte and installs only if
//! no invalidation started or ended since (`mmu_invalidate_retry`), so an
//! entry never maps a frame the primary MMU has already moved away from.

use std::sync::Mutex;

use crate::lock;
use std::time::Instant;

use crate::ept::Ept;
use crate::memory::{PrimaryMmu, PrimaryMmuError, Pte};
use crate::mmu_notifier::{Gfn, MmuNotifier, MmuNotifierRange};
use crate::view::EptView;

/// How the secondary MMU reacts to notifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// The seed series' proposal ("mm/mmu_notifier: set
    /// MMU_NOTIFIER_USE_CHANGE_PTE flag where appropriate", v5, 2019; the
    /// flag never reached mainline): no zap in `invalidate_range_start` for
    /// a flagged range; `change_pte` updates the entry in place. Where it
    /// differs from what KVM's own `change_pte` handler did: KVM never
    /// mapped a writable spte there (for the read-only -> read-write of a
    /// copy-on-write break it zapped), while this policy makes the entry
    /// writable on the new frame (crate docs, deliberate differences).
    ChangePte,
    /// KVM since Linux 6.9 (`change_pte` ignored, and removed in 6.10):
    /// zaps in `invalidate_range_start`; the next guest access refaults.
    RangeFlush,
    /// KVM from Linux 3.7 (2012, commit 6bdb913f0a70 moved `change_pte`
    /// inside the invalidate bracket) to 6.8: `write_protect_page` and
    /// `replace_page` called `change_pte` on ranges without the flag, KVM
    /// zapped in `invalidate_range_start`, so the later `change_pte` found
    /// no entry (counted as missed, no effect).
    Legacy,
    /// The seed's whole proposal: `ChangePte`, and a batch update inferred
    /// from the range instead of zapped. A range that only removes write
    /// permission ([`MmuNotifierRange::update_to_read_only`]: a soft-dirty
    /// round, mprotect to read-only) downgrades the range's present entries
    /// to read-only in place, with one view call
    /// ([`EptView::write_protect`]) and one flush; a range that only grants
    /// write ([`MmuNotifierRange::update_adds_write`]) needs nothing. Every
    /// other range (CLEAR, UNMAP, a protection that removes read or does
    /// not say) zaps.
    EventAware,
}

impl Policy {
    /// The name used on the command line and in the statistics.
    pub fn name(self) -> &'static str {
        match self {
            Policy::ChangePte => "change-pte",
            Policy::RangeFlush => "range-flush",
            Policy::Legacy => "legacy",
            Policy::EventAware => "event-aware",
        }
    }

    /// Whether `change_pte` updates entries in place (else it is ignored
    /// or finds the entry zapped).
    fn honours_change_pte(self) -> bool {
        matches!(self, Policy::ChangePte | Policy::EventAware)
    }
}

/// What `invalidate_range_start` does to the range's entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Invalidation {
    /// Nothing: `change_pte` will update each entry, or nothing the
    /// secondary MMU maps loses a permission.
    Keep,
    /// Downgrade present entries to read-only in place.
    WriteProtect,
    /// Remove every entry.
    Zap,
}

/// What a guest access needs from the secondary MMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Counters of the secondary MMU since creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct MmuStats {
    /// Entries installed by the fault handler.
    pub installed: u64,
    /// Entries removed by range zaps.
    pub zapped: u64,
    /// Entries updated in place by `change_pte`.
    pub change_pte_applied: u64,
    /// `change_pte` calls that found no entry to update.
    pub change_pte_missed: u64,
    /// TLB flushes, as KVM counts them: one per range update that changed
    /// something (a zap that removed an entry, an in-place downgrade that
    /// changed one) and one per `change_pte` that updated a present entry.
    pub flushes: u64,
    /// Ranges downgraded in place that changed an entry (event-aware).
    pub wrprot_ranges: u64,
    /// Entries downgraded to read-only in place by those ranges.
    pub wrprot_entries: u64,
    /// Faults retried because an invalidation raced with them.
    pub fault_retries: u64,
    /// Calls made to the view.
    pub view_updates: u64,
    /// Time spent in the view, in nanoseconds.
    pub view_ns: u64,
}

/// Errors of the fault handler.
#[derive(Debug, thiserror::Error)]
pub enum FaultError<E: std::error::Error + 'static> {
    /// The primary MMU could not provide the page.
    #[error(transparent)]
    Host(#[from] PrimaryMmuError),
    /// The view could not be updated.
    #[error(transparent)]
    View(E),
}

/// The secondary MMU of one VM.
#[derive(Debug)]
pub struct SecondaryMmu<V: EptView> {
    ept: Ept,
    policy: Policy,
    view: V,
    stats: MmuStats,
    mmu_invalidate_seq: u64,
    mmu_invalidate_in_progress: u32,
    view_error: Option<V::Error>,
}

impl<V: EptView> SecondaryMmu<V> {
    /// A secondary MMU whose table already maps every guest page as the host
    /// does now (pre-faulted, as KVM_PRE_FAULT_MEMORY would), on top of a
    /// view that the caller built with the same mapping.
    pub fn new_prefaulted(policy: Policy, view: V, host: &PrimaryMmu) -> Self {
        let mut ept = Ept::new();
        let (first, end) = host.guest_range();
        for gfn in first..end {
            if let Ok(pte) = host.pte(gfn) {
                ept.map(gfn, pte.pfn, pte.writable);
            }
        }
        Self {
            ept,
            policy,
            view,
            stats: MmuStats::default(),
            mmu_invalidate_seq: 0,
            mmu_invalidate_in_progress: 0,
            view_error: None,
        }
    }

    /// The policy.
    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// The EPT table.
    pub fn ept(&self) -> &Ept {
        &self.ept
    }

    /// The view.
    pub fn view(&self) -> &V {
        &self.view
    }

    /// The view, for its owner's own operations.
    pub fn view_mut(&mut self) -> &mut V {
        &mut self.view
    }

    /// Counters since creation.
    pub fn stats(&self) -> MmuStats {
        self.stats
    }

    /// Every counter of the MMU and its view, by name.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self.stats;
        let mut out = vec![
            ("installed", s.installed),
            ("zapped", s.zapped),
            ("change_pte_applied", s.change_pte_applied),
            ("change_pte_missed", s.change_pte_missed),
            ("flushes", s.flushes),
            ("wrprot_ranges", s.wrprot_ranges),
            ("wrprot_entries", s.wrprot_entries),
            ("fault_retries", s.fault_retries),
            ("view_updates", s.view_updates),
            ("view_ns", s.view_ns),
            ("ept_entries", self.ept.len()),
        ];
        out.extend(self.view.counters());
        out
    }

    /// The first view error since the last call: notifier callbacks cannot
    /// fail, so a view that could not follow is reported here.
    pub fn take_view_error(&mut self) -> Option<V::Error> {
        self.view_error.take()
    }

    /// Whether a view error waits to be taken.
    pub fn has_view_error(&self) -> bool {
        self.view_error.is_some()
    }

    fn view_op(&mut self, op: impl FnOnce(&mut V) -> Result<(), V::Error>) {
        let t = Instant::now();
        let result = op(&mut self.view);
        self.stats.view_updates += 1;
        self.stats.view_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Err(e) = result {
            self.view_error.get_or_insert(e);
        }
    }

    fn zap(&mut self, start: Gfn, end: Gfn) {
        let n = self.ept.unmap_range(start, end);
        if n > 0 {
            self.stats.zapped += n;
            self.stats.flushes += 1;
            self.view_op(|v| v.zap(start, end));
        }
    }

    /// Downgrades the present writable entries of [start, end) to read-only
    /// in place: one view call and one flush for the range, if anything
    /// changed (KVM's own in-place write protection for dirty logging,
    /// `kvm_tdp_mmu_wrprot_slot`, clears the writable bit of each leaf the
    /// same way and asks for one flush). The next guest write faults into
    /// the handler and the primary MMU, which marks the page soft-dirty or
    /// breaks copy-on-write; no entry keeps a way to become writable again
    /// without that fault (KVM's fast path would, through its MMU-writable
    /// bit: it must be cleared too there).
    fn write_protect(&mut self, start: Gfn, end: Gfn) {
        let n = self.ept.write_protect_range(start, end);
        if n > 0 {
            self.stats.wrprot_entries += n;
            self.stats.wrprot_ranges += 1;
            self.stats.flushes += 1;
            self.view_op(|v| v.write_protect(start, end));
        }
    }

    /// What `invalidate_range_start` of `range` does under the policy.
    fn invalidation(&self, range: &MmuNotifierRange) -> Invalidation {
        if self.policy.honours_change_pte() && range.use_change_pte() {
            return Invalidation::Keep; // change_pte will update each entry in place
        }
        match self.policy {
            Policy::EventAware if range.update_to_read_only() => Invalidation::WriteProtect,
            Policy::EventAware if range.update_adds_write() => Invalidation::Keep,
            _ => Invalidation::Zap,
        }
    }

    /// `mmu_invalidate_retry`: whether a fault that read `seq` before its
    /// host lookup must start again. Any invalidation in progress counts,
    /// whatever its range (a deliberate difference: crate docs).
    pub fn mmu_invalidate_retry(&self, seq: u64) -> bool {
        self.mmu_invalidate_in_progress > 0 || self.mmu_invalidate_seq != seq
    }

    /// The invalidation sequence number.
    pub fn mmu_invalidate_seq(&self) -> u64 {
        self.mmu_invalidate_seq
    }

    /// Installs `gfn -> pte` in the table and the view.
    fn install(&mut self, gfn: Gfn, pte: Pte) {
        self.ept.map(gfn, pte.pfn, pte.writable);
        self.stats.installed += 1;
        self.view_op(|v| v.map(gfn, pte.pfn, pte.writable));
    }
}

impl<V: EptView> MmuNotifier for SecondaryMmu<V> {
    fn invalidate_range_start(&mut self, range: &MmuNotifierRange) {
        self.mmu_invalidate_in_progress += 1;
        match self.invalidation(range) {
            Invalidation::Keep => {}
            Invalidation::WriteProtect => self.write_protect(range.start, range.end),
            Invalidation::Zap => self.zap(range.start, range.end),
        }
    }

    fn invalidate_range_end(&mut self, _range: &MmuNotifierRange) {
        self.mmu_invalidate_seq += 1;
        self.mmu_invalidate_in_progress = self.mmu_invalidate_in_progress.saturating_sub(1);
    }

    fn change_pte(&mut self, gfn: Gfn, pte: Pte) {
        if self.policy == Policy::RangeFlush {
            return;
        }
        if self.ept.lookup(gfn).is_none() {
            self.stats.change_pte_missed += 1;
            return;
        }
        // Deliberate difference (crate docs): KVM's change_pte handler never
        // maps a writable pte (it zaps instead); for the RO -> RW transition
        // of a copy-on-write break the flag allows the in-place update, so the
        // entry becomes writable on the new frame here.
        self.ept.map(gfn, pte.pfn, pte.writable);
        self.stats.change_pte_applied += 1;
        // A present entry changed: KVM flushed the TLBs for each such
        // update (`kvm_set_spte_gfn` returning true).
        self.stats.flushes += 1;
        self.view_op(|v| v.map(gfn, pte.pfn, pte.writable));
    }
}

/// The EPT-violation handler (`kvm_mmu_page_fault`): looks the page up in
/// the primary MMU, breaking copy-on-write there for a write, and installs
/// the entry unless an invalidation raced with the lookup, in which case it
/// starts again. Returns the host pte installed.
///
/// Lock order: the primary MMU, then the secondary; the secondary's lock is
/// never held while the primary's is taken.
pub fn handle_ept_violation<V: EptView>(
    host: &Mutex<PrimaryMmu>,
    mmu: &Mutex<SecondaryMmu<V>>,
    gfn: Gfn,
    access: Access,
) -> Result<Pte, FaultError<V::Error>> {
    loop {
        let seq = lock(mmu).mmu_invalidate_seq();
        let pte = lock(host).get_user_page(gfn, access == Access::Write)?;
        let mut m = lock(mmu);
        if m.mmu_invalidate_retry(seq) {
            m.stats.fault_retries += 1;
            continue;
        }
        m.install(gfn, pte);
        return match m.take_view_error() {
            Some(e) => Err(FaultError::View(e)),
            None => Ok(pte),
        };
    }
}
