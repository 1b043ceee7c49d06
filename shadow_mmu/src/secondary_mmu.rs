//! The secondary MMU, after arch/x86/kvm/mmu: an EPT table kept in step with
//! the primary MMU by the mmu notifier, filled by the EPT-violation handler.
//!
//! Four policies decide what a notification does ([`Policy`]). The
//! invalidation sequence protocol is KVM's: a fault reads
//! `mmu_invalidate_seq` before it looks up the host pte and installs only if
//! no invalidation started or ended since (`mmu_invalidate_retry`), so an
//! entry never maps a frame the primary MMU has already moved away from.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::thread::{self, ThreadId};
use std::time::Instant;

use crate::ept::{Ept, EptEntry};
use crate::frame_pool::Pfn;
use crate::lock;
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
    /// Calls made to the view that change it (`zap`, `map`,
    /// `write_protect`): one per table change outside a batch, one per
    /// contiguous run of like changes inside one.
    pub view_updates: u64,
    /// Batches whose view updates were deferred and applied together at
    /// their end (a batch that changed no entry is not counted).
    pub view_batches: u64,
    /// Pages a batch zapped whose host page the primary MMU moved before
    /// the batch ended (a merge), told to the view at the batch's end.
    pub host_pages_moved: u64,
    /// Time spent in the view, in nanoseconds (a batch's hold of the guest
    /// included).
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

/// A change of the table the view must follow.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ViewChange {
    /// [start, end) unmapped.
    Zap { start: Gfn, end: Gfn },
    /// The present entries of [start, end) made read-only, frames kept.
    WriteProtect { start: Gfn, end: Gfn },
    /// One page mapped.
    Map { gfn: Gfn, pfn: Pfn, writable: bool },
}

/// What the view maps at a page: (frame, writable), or nothing.
type ViewPage = Option<(Pfn, bool)>;

fn view_page(entry: Option<EptEntry>) -> ViewPage {
    entry.map(|e| (e.pfn(), e.writable()))
}

impl ViewChange {
    fn range(self) -> (Gfn, Gfn) {
        match self {
            ViewChange::Zap { start, end } | ViewChange::WriteProtect { start, end } => (start, end),
            ViewChange::Map { gfn, .. } => (gfn, gfn + 1),
        }
    }

    fn apply<V: EptView>(self, view: &mut V) -> Result<(), V::Error> {
        match self {
            ViewChange::Zap { start, end } => view.zap(start, end),
            ViewChange::WriteProtect { start, end } => view.write_protect(start, end),
            ViewChange::Map { gfn, pfn, writable } => view.map(gfn, pfn, writable),
        }
    }

    /// What a page of the range maps in the view once the change is made,
    /// given what it mapped before.
    fn effect(self, before: ViewPage) -> ViewPage {
        match self {
            ViewChange::Zap { .. } => None,
            ViewChange::WriteProtect { .. } => before.map(|(pfn, _)| (pfn, false)),
            ViewChange::Map { pfn, writable, .. } => Some((pfn, writable)),
        }
    }

    /// The change that takes a view page from `before` to the table's
    /// `after`, if any.
    fn between(gfn: Gfn, before: ViewPage, after: ViewPage) -> Option<Self> {
        match (before, after) {
            _ if before == after => None,
            (_, None) => Some(ViewChange::Zap { start: gfn, end: gfn + 1 }),
            (Some((old, true)), Some((pfn, false))) if old == pfn => {
                Some(ViewChange::WriteProtect { start: gfn, end: gfn + 1 })
            }
            (_, Some((pfn, writable))) => Some(ViewChange::Map { gfn, pfn, writable }),
        }
    }

    /// Extends `self` by `next` if both are zaps, or both write
    /// protections, of ranges that meet.
    fn coalesce(&mut self, next: Self) -> bool {
        match (self, next) {
            (ViewChange::Zap { end, .. }, ViewChange::Zap { start, end: e })
            | (ViewChange::WriteProtect { end, .. }, ViewChange::WriteProtect { start, end: e })
                if *end == start =>
            {
                *end = e;
                true
            }
            _ => false,
        }
    }
}

/// The view changes that take every page of `before` to what `ept` maps
/// now, in gfn order, like changes of neighbouring pages in one range.
fn coalesced_changes(before: &BTreeMap<Gfn, ViewPage>, ept: &Ept) -> Vec<ViewChange> {
    let mut out: Vec<ViewChange> = Vec::new();
    for (&gfn, &page) in before {
        let Some(change) = ViewChange::between(gfn, page, view_page(ept.lookup(gfn))) else { continue };
        if !out.last_mut().is_some_and(|last| last.coalesce(change)) {
            out.push(change);
        }
    }
    out
}

/// A batch in progress ([`MmuNotifier::batch_start`]). Only the changes
/// its owner makes are deferred: a fault served on another thread (the
/// VMM's userfaultfd fault thread, or its vCPU thread completing an exit)
/// changes the view at once, as outside a batch.
#[derive(Debug)]
struct ViewBatch {
    /// The thread that began it.
    owner: ThreadId,
    /// Its nested `batch_start`s not ended yet.
    depth: u32,
    /// The view holds the guest out ([`EptView::batch_start`] was called).
    holding: bool,
    /// What the view maps for each page whose change is deferred: the
    /// page's table entry when the batch first changed it, as later
    /// changes of the view made at once left it.
    before: BTreeMap<Gfn, ViewPage>,
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
    batch: Option<ViewBatch>,
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
            batch: None,
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
            ("view_batches", s.view_batches),
            ("host_pages_moved", s.host_pages_moved),
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

    /// Runs `op` on the view, timed; keeps its error for
    /// [`SecondaryMmu::take_view_error`].
    fn in_view(&mut self, op: impl FnOnce(&mut V) -> Result<(), V::Error>) {
        let t = Instant::now();
        let result = op(&mut self.view);
        self.stats.view_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        if let Err(e) = result {
            self.view_error.get_or_insert(e);
        }
    }

    /// Makes `change` real in the view now.
    fn view_op(&mut self, change: ViewChange) {
        self.stats.view_updates += 1;
        self.in_view(|v| change.apply(v));
    }

    /// Before the table makes `change`: inside a batch the calling thread
    /// owns, remembers what the view maps for every page of the change's
    /// range that `changes` selects (by its entry now) and has the view
    /// hold the guest out, then returns true: the view update is deferred.
    fn defer(&mut self, change: ViewChange, changes: impl Fn(Option<EptEntry>) -> bool) -> bool {
        let Some(batch) = self.batch.as_mut().filter(|b| b.owner == thread::current().id()) else {
            return false;
        };
        let (start, end) = change.range();
        for gfn in start..end {
            let entry = self.ept.lookup(gfn);
            if changes(entry) {
                batch.before.entry(gfn).or_insert(view_page(entry));
            }
        }
        if !batch.holding && !batch.before.is_empty() {
            batch.holding = true;
            self.stats.view_batches += 1;
            self.in_view(V::batch_start);
        }
        true
    }

    /// After the table made `change`: makes it real in the view, unless
    /// [`SecondaryMmu::defer`] deferred it. A change made at once inside
    /// another thread's batch is applied to the batch's record of the view.
    fn follow(&mut self, change: ViewChange, deferred: bool) {
        if deferred {
            return;
        }
        if let Some(batch) = self.batch.as_mut() {
            let (start, end) = change.range();
            for (_, page) in batch.before.range_mut(start..end) {
                *page = change.effect(*page);
            }
        }
        self.view_op(change);
    }

    fn zap(&mut self, start: Gfn, end: Gfn) {
        let change = ViewChange::Zap { start, end };
        let deferred = self.defer(change, |e| e.is_some());
        let n = self.ept.unmap_range(start, end);
        if n > 0 {
            self.stats.zapped += n;
            self.stats.flushes += 1;
            self.follow(change, deferred);
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
        let change = ViewChange::WriteProtect { start, end };
        let deferred = self.defer(change, |e| e.is_some_and(EptEntry::writable));
        let n = self.ept.write_protect_range(start, end);
        if n > 0 {
            self.stats.wrprot_entries += n;
            self.stats.wrprot_ranges += 1;
            self.stats.flushes += 1;
            self.follow(change, deferred);
        }
    }

    /// Maps `gfn` in the table, and in the view now or at the batch's end.
    fn map(&mut self, gfn: Gfn, pte: Pte) {
        let change = ViewChange::Map { gfn, pfn: pte.pfn, writable: pte.writable };
        let deferred = self.defer(change, |_| true);
        self.ept.map(gfn, pte.pfn, pte.writable);
        self.follow(change, deferred);
    }

    /// `batch_start` of [`MmuNotifier`] (see there): the calling thread
    /// begins a batch, or nests one in its own. Inside, the table changes at
    /// once as outside, and so does everything a fault handler reads; the
    /// view's updates wait for the batch's end, behind a hold of the guest
    /// the view takes at the first deferred change. A batch begun while
    /// another thread's is open changes nothing: that thread's changes reach
    /// the view at once.
    pub fn batch_start(&mut self) {
        let me = thread::current().id();
        match self.batch.as_mut() {
            Some(batch) if batch.owner == me => batch.depth += 1,
            Some(_) => {}
            None => self.batch = Some(ViewBatch { owner: me, depth: 1, holding: false, before: BTreeMap::new() }),
        }
    }

    /// Whether a batch is open: the view then lags the table until its end.
    pub fn in_batch(&self) -> bool {
        self.batch.is_some()
    }

    /// `batch_end` of [`MmuNotifier`]: ends the calling thread's innermost
    /// batch; the outermost makes every deferred change real, one view
    /// call per run of like changes of neighbouring pages (zaps,
    /// write protections; a page zapped then mapped again in the batch is
    /// one `map`, or nothing if it maps what it mapped before), then lets
    /// the guest go. Does nothing on a thread that owns no batch.
    pub fn batch_end(&mut self, mm: &PrimaryMmu) {
        let me = thread::current().id();
        let Some(batch) = self.batch.as_mut().filter(|b| b.owner == me) else { return };
        batch.depth -= 1;
        if batch.depth > 0 {
            return;
        }
        let Some(batch) = self.batch.take() else { return };
        let changes = coalesced_changes(&batch.before, &self.ept);
        for &change in &changes {
            self.view_op(change);
        }
        if batch.holding {
            self.tell_moved_host_pages(&changes, &batch.before, mm);
            self.in_view(V::batch_end);
        }
    }

    /// Tells the view, in one call, of each page the batch zapped whose host
    /// page moved meanwhile, and where `mm` maps it now
    /// ([`EptView::host_pages_moved`]).
    fn tell_moved_host_pages(&mut self, changes: &[ViewChange], before: &BTreeMap<Gfn, ViewPage>, mm: &PrimaryMmu) {
        let mut moved = Vec::new();
        for &change in changes {
            let ViewChange::Zap { start, end } = change else { continue };
            for (&gfn, &page) in before.range(start..end) {
                let (Some((old, _)), Ok(pte)) = (page, mm.pte(gfn)) else { continue };
                if old != pte.pfn {
                    moved.push((gfn, pte.pfn));
                }
            }
        }
        if !moved.is_empty() {
            self.stats.host_pages_moved += moved.len() as u64;
            self.in_view(|v| v.host_pages_moved(&moved));
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
        self.map(gfn, pte);
        self.stats.installed += 1;
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
        self.map(gfn, pte);
        self.stats.change_pte_applied += 1;
        // A present entry changed: KVM flushed the TLBs for each such
        // update (`kvm_set_spte_gfn` returning true).
        self.stats.flushes += 1;
    }

    fn batch_start(&mut self) {
        SecondaryMmu::batch_start(self);
    }

    fn batch_end(&mut self, mm: &PrimaryMmu) {
        SecondaryMmu::batch_end(self, mm);
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
