//! Property tests of the secondary MMU against a plain reference model.
//!
//! Random sequences of guest accesses (made through the secondary MMU, as a
//! vCPU would: through the EPT entry's frame, faulting when the EPT does not
//! allow the access), KSM merges, lone write protections, unflagged batch
//! protections and host-side copy-on-write breaks run under every
//! [`Policy`]. After every step the EPT, its view, the host page table and
//! the frame accounting are checked against each other, and every guest
//! read against a reference of what each guest page holds (one word at
//! offset 0 of each page).
//!
//! The policy-specific proptests also compare counters before and after
//! each step: in-place updates under change-pte, zaps under range-flush and
//! legacy, missed `change_pte` calls under legacy. Deterministic tests pin
//! the exact counts of one merge, read and write on two pages per policy.

use std::collections::BTreeMap;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use shadow_mmu::ept::EptEntry;
use shadow_mmu::memory::HostStats;
use shadow_mmu::{
    handle_ept_violation, Access, FramePool, Gfn, MmuNotifierRange, MmuNotifyEvent, MmuStats, Pfn, Policy, PrimaryMmu,
    Pte, RangeFlags, RecordingView, SecondaryMmu, PAGE_SHIFT, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

/// First guest page of the deterministic tests; frames 0 and 1 are the
/// VMM's boot memory.
const FIRST_GFN: Gfn = 2;
/// First guest page of the generated cases: [`FIRST_GFN`], or a few pages
/// below 512 so that the guest range spans two EPT leaf tables.
const FIRST_GFNS: [Gfn; 2] = [FIRST_GFN, 505];
/// Every policy, for the tests that run under all of them.
const POLICIES: [Policy; 3] = [Policy::ChangePte, Policy::RangeFlush, Policy::Legacy];
/// Words the guest writes: a small alphabet, so that many pages are equal
/// and KSM merges happen often.
const WORDS: Range<u64> = 0..4;

type Mmu = SecondaryMmu<RecordingView>;
type Res<T = ()> = Result<T, TestCaseError>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("a lock was poisoned by an earlier panic")
}

/// Turns an error of the crate under test into a test failure.
trait OrFail<T> {
    fn or_fail(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Res<T> {
        self.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
    }
}

/// The reference: what the guest must read at offset 0 of each page.
#[derive(Debug, Clone)]
struct Model {
    first: Gfn,
    words: Vec<u64>,
}

impl Model {
    fn gfns(&self) -> Range<Gfn> {
        self.first..self.first + self.words.len() as u64
    }

    fn get(&self, gfn: Gfn) -> u64 {
        self.words[(gfn - self.first) as usize]
    }

    fn set(&mut self, gfn: Gfn, word: u64) {
        self.words[(gfn - self.first) as usize] = word;
    }

    /// The other pages holding the same word as `gfn`: candidates for a merge.
    fn equal_pages(&self, gfn: Gfn) -> Vec<Gfn> {
        self.gfns().filter(|&g| g != gfn && self.get(g) == self.get(gfn)).collect()
    }
}

/// One operation of a generated sequence.
#[derive(Debug, Clone)]
enum Op {
    GuestRead(Gfn),
    GuestWrite(Gfn, u64),
    GuestFetch(Gfn),
    /// Merges `a` with one of the pages equal to it (`pick` chooses which);
    /// `ksm` marks the surviving frame as a KSM page.
    KsmMerge {
        a: Gfn,
        pick: Index,
        ksm: bool,
    },
    WriteProtect(Gfn),
    /// A batch protection of [start, start + len) without USE_CHANGE_PTE.
    ProtectRange {
        start: Gfn,
        len: u64,
    },
    /// A write fault's copy-on-write break taken on the host side.
    ForceCow(Gfn),
}

/// What an [`Op`] turned into once resolved against the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Step {
    Guest { gfn: Gfn, access: Access },
    Merge { a: Gfn, b: Gfn, replaced: bool },
    MergeSkipped,
    WriteProtect(Gfn),
    ProtectRange { start: Gfn, end: Gfn },
    ForceCow(Gfn),
}

/// The state the policy checks compare across one step.
#[derive(Debug, Clone)]
struct Snapshot {
    mmu: MmuStats,
    host: HostStats,
    ept: BTreeMap<Gfn, (Pfn, bool)>,
    ptes: BTreeMap<Gfn, Pte>,
}

impl Snapshot {
    fn mapped(&self, gfn: Gfn) -> bool {
        self.ept.contains_key(&gfn)
    }
}

fn ept_pages(mmu: &Mmu) -> BTreeMap<Gfn, (Pfn, bool)> {
    mmu.ept().iter().map(|(gfn, e)| (gfn, (e.pfn(), e.writable()))).collect()
}

/// A host, its secondary MMU and the reference.
struct Lab {
    host: Mutex<PrimaryMmu>,
    mmu: Arc<Mutex<Mmu>>,
    pool: Arc<FramePool>,
    model: Model,
}

impl Lab {
    /// Guest pages [first, first + words.len()) holding `words`, pre-faulted
    /// in the EPT, with one spare frame in the pool.
    fn new(policy: Policy, first: Gfn, words: &[u64]) -> Self {
        let end = first + words.len() as u64;
        let pool = Arc::new(FramePool::new((end + 1) * PAGE_SIZE).expect("frame pool (memfd)"));
        let mut host = PrimaryMmu::new(pool.clone(), first, end);
        for (gfn, word) in (first..).zip(words) {
            host.write_guest(gfn << PAGE_SHIFT, &word.to_ne_bytes()).expect("initial contents");
        }
        // The view starts with what the pre-faulted table maps.
        let view = RecordingView {
            pages: (first..end)
                .map(|gfn| {
                    let pte = host.pte(gfn).expect("guest page");
                    (gfn, (pte.pfn, pte.writable))
                })
                .collect(),
            calls: (0, 0),
        };
        let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(policy, view, &host)));
        host.mmu_notifier_register(mmu.clone());
        Self { host: Mutex::new(host), mmu, pool, model: Model { first, words: words.to_vec() } }
    }

    fn snapshot(&self) -> Snapshot {
        let host = lock(&self.host);
        let mmu = lock(&self.mmu);
        Snapshot {
            mmu: mmu.stats(),
            host: host.stats(),
            ept: ept_pages(&mmu),
            ptes: self.model.gfns().map(|gfn| (gfn, host.pte(gfn).expect("guest page"))).collect(),
        }
    }

    fn frame_word(&self, pfn: Pfn) -> Res<u64> {
        self.pool.direct_map().read_obj::<u64>(GuestAddress(pfn << PAGE_SHIFT)).or_fail("read through the direct map")
    }

    /// The frame a guest `access` to `gfn` reaches: the EPT entry's if it
    /// allows the access, else the one the EPT-violation handler installs.
    fn guest_frame(&self, gfn: Gfn, access: Access) -> Res<Pfn> {
        let allows = |e: &EptEntry| access != Access::Write || e.writable();
        let entry = lock(&self.mmu).ept().lookup(gfn);
        if let Some(e) = entry.filter(allows) {
            return Ok(e.pfn());
        }
        let pte = handle_ept_violation(&self.host, &self.mmu, gfn, access).or_fail("EPT violation")?;
        let entry = lock(&self.mmu).ept().lookup(gfn);
        prop_assert!(
            entry.is_some_and(|e| allows(&e) && e.pfn() == pte.pfn),
            "after a {access:?} fault on gfn {gfn}, the EPT holds {entry:?}, the handler returned {pte:?}"
        );
        Ok(pte.pfn)
    }

    fn guest_read(&self, gfn: Gfn, access: Access) -> Res {
        let pfn = self.guest_frame(gfn, access)?;
        let word = self.frame_word(pfn)?;
        prop_assert_eq!(word, self.model.get(gfn), "guest {:?} of gfn {} (frame {})", access, gfn, pfn);
        Ok(())
    }

    fn guest_write(&mut self, gfn: Gfn, word: u64) -> Res {
        let pfn = self.guest_frame(gfn, Access::Write)?;
        self.pool
            .direct_map()
            .write_obj(word, GuestAddress(pfn << PAGE_SHIFT))
            .or_fail("write through the direct map")?;
        self.model.set(gfn, word);
        Ok(())
    }

    /// Merges `a` with the page `pick` chooses among those equal to it.
    fn ksm_merge(&self, a: Gfn, pick: Index, ksm: bool) -> Res<Step> {
        let candidates = self.model.equal_pages(a);
        if candidates.is_empty() {
            return Ok(Step::MergeSkipped);
        }
        self.merge_pages(a, *pick.get(&candidates), ksm)
    }

    /// mm/ksm.c's `try_to_merge_one_page` for two pages: write-protect both,
    /// compare them, then map `b` onto `a`'s frame.
    fn merge_pages(&self, a: Gfn, b: Gfn, ksm: bool) -> Res<Step> {
        let mut host = lock(&self.host);
        host.write_protect_page(a).or_fail("write_protect_page(a)")?;
        host.write_protect_page(b).or_fail("write_protect_page(b)")?;
        let (mut wa, mut wb) = ([0u8; 8], [0u8; 8]);
        host.read_guest(a << PAGE_SHIFT, &mut wa).or_fail("read a")?;
        host.read_guest(b << PAGE_SHIFT, &mut wb).or_fail("read b")?;
        prop_assert_eq!(wa, wb, "pages {} and {} differ once write-protected", a, b);
        let kpfn = host.pte(a).or_fail("pte a")?.pfn;
        // Already on the same frame (merged before): nothing to replace, and
        // RO -> RO on the same frame is not a legal USE_CHANGE_PTE transition.
        let replaced = host.pte(b).or_fail("pte b")?.pfn != kpfn;
        if replaced {
            host.replace_page(b, kpfn).or_fail("replace_page")?;
        }
        if ksm {
            host.set_ksm(kpfn, true);
        }
        Ok(Step::Merge { a, b, replaced })
    }

    /// A protection change over [start, end) without USE_CHANGE_PTE: every
    /// policy must zap in `invalidate_range_start`.
    fn protect_range(&self, start: Gfn, end: Gfn) -> Res<Step> {
        let range = MmuNotifierRange::new(start, end, MmuNotifyEvent::ProtectionVma, RangeFlags::BLOCKABLE);
        let mut host = lock(&self.host);
        host.invalidate_range_start(&range);
        {
            let mmu = lock(&self.mmu);
            for gfn in start..end {
                prop_assert!(mmu.ept().lookup(gfn).is_none(), "gfn {} still mapped inside an unflagged range", gfn);
            }
        }
        for gfn in start..end {
            let pte = host.pte(gfn).or_fail("pte")?;
            if pte.writable {
                host.set_pte_at_notify(&range, gfn, Pte { pfn: pte.pfn, writable: false })
                    .or_fail("set_pte_at_notify")?;
            }
        }
        host.invalidate_range_end(&range);
        Ok(Step::ProtectRange { start, end })
    }

    fn apply(&mut self, op: &Op) -> Res<Step> {
        Ok(match *op {
            Op::GuestRead(gfn) => {
                self.guest_read(gfn, Access::Read)?;
                Step::Guest { gfn, access: Access::Read }
            }
            Op::GuestFetch(gfn) => {
                self.guest_read(gfn, Access::Fetch)?;
                Step::Guest { gfn, access: Access::Fetch }
            }
            Op::GuestWrite(gfn, word) => {
                self.guest_write(gfn, word)?;
                Step::Guest { gfn, access: Access::Write }
            }
            Op::KsmMerge { a, pick, ksm } => self.ksm_merge(a, pick, ksm)?,
            Op::WriteProtect(gfn) => {
                lock(&self.host).write_protect_page(gfn).or_fail("write_protect_page")?;
                Step::WriteProtect(gfn)
            }
            Op::ProtectRange { start, len } => self.protect_range(start, (start + len).min(self.model.gfns().end))?,
            Op::ForceCow(gfn) => {
                lock(&self.host).get_user_page(gfn, true).or_fail("get_user_page(write)")?;
                Step::ForceCow(gfn)
            }
        })
    }

    fn check(&self) -> Res {
        // Freed frames go back to the host in batches: flush, then every
        // free frame must be a punched hole.
        let mut host = lock(&self.host);
        host.flush_holes().or_fail("flush_holes")?;
        check_invariants(&host, &lock(&self.mmu), &self.pool, &self.model)
    }

    /// Every page read by the guest, through the secondary MMU.
    fn sweep(&self) -> Res {
        for gfn in self.model.gfns() {
            self.guest_read(gfn, Access::Read)?;
        }
        Ok(())
    }
}

/// The invariants that hold under every policy whenever no notifier range
/// is open.
fn check_invariants(host: &PrimaryMmu, mmu: &Mmu, pool: &FramePool, model: &Model) -> Res {
    let ept = ept_pages(mmu);
    prop_assert_eq!(ept.len() as u64, mmu.ept().len(), "EPT leaf count");
    for (&gfn, &(pfn, writable)) in &ept {
        let pte = host.pte(gfn).or_fail("an EPT leaf outside guest RAM")?;
        // 1. No stale frame.
        prop_assert_eq!(pfn, pte.pfn, "EPT maps gfn {} to frame {}, the host to {:?}", gfn, pfn, pte);
        // 2. Never writable where the host is read-only.
        prop_assert!(!writable || pte.writable, "EPT maps gfn {} writable, the host pte is {:?}", gfn, pte);
    }
    // 3. The view is the EPT.
    prop_assert_eq!(&mmu.view().pages, &ept, "the view differs from the EPT");

    // The host's memory holds the reference, and a writable pte maps a
    // frame of its own (else a write would show through another page).
    let ptes: Vec<(Gfn, Pte)> =
        model.gfns().map(|gfn| host.pte(gfn).map(|pte| (gfn, pte))).collect::<Result<_, _>>().or_fail("pte")?;
    for &(gfn, pte) in &ptes {
        let mut word = [0u8; 8];
        host.read_guest(gfn << PAGE_SHIFT, &mut word).or_fail("read_guest")?;
        prop_assert_eq!(u64::from_ne_bytes(word), model.get(gfn), "host view of gfn {}", gfn);
        let frame = host.frame(pte.pfn);
        prop_assert!(
            !pte.writable || (frame.mapcount == 1 && !frame.ksm),
            "gfn {} is writable on frame {} ({:?})",
            gfn,
            pte.pfn,
            frame
        );
    }

    // 5. Frame accounting.
    let mut mappers: BTreeMap<Pfn, u32> = BTreeMap::new();
    for (_, pte) in &ptes {
        *mappers.entry(pte.pfn).or_default() += 1;
    }
    let mut free = 0;
    for pfn in 0..pool.nr_frames() {
        let frame = host.frame(pfn);
        let mappers = mappers.get(&pfn).copied().unwrap_or(0);
        prop_assert_eq!(frame.mapcount, mappers, "mapcount of frame {}", pfn);
        prop_assert!(frame.refcount >= frame.mapcount, "frame {}: {:?}", pfn, frame);
        if pfn >= model.first {
            // Nothing here pins guest frames: every reference is a map.
            prop_assert_eq!(frame.refcount, frame.mapcount, "leaked reference on frame {}", pfn);
        }
        if frame.refcount == 0 {
            free += 1;
            let mut page = [0u8; PAGE_SIZE as usize];
            pool.direct_map().read_slice(&mut page, GuestAddress(pfn << PAGE_SHIFT)).or_fail("direct map")?;
            prop_assert!(page.iter().all(|&b| b == 0), "free frame {} is not a punched hole", pfn);
        }
    }
    prop_assert_eq!(host.nr_free_frames(), free, "free list length");
    Ok(())
}

/// Per-step counter deltas.
struct Delta {
    applied: u64,
    missed: u64,
    zapped: u64,
    change_pte_calls: u64,
    ranges: u64,
}

impl Delta {
    fn new(before: &Snapshot, after: &Snapshot) -> Self {
        Self {
            applied: after.mmu.change_pte_applied - before.mmu.change_pte_applied,
            missed: after.mmu.change_pte_missed - before.mmu.change_pte_missed,
            zapped: after.mmu.zapped - before.mmu.zapped,
            change_pte_calls: after.host.change_pte_calls - before.host.change_pte_calls,
            ranges: after.host.notifier_ranges - before.host.notifier_ranges,
        }
    }
}

/// change-pte: flagged ranges never zap; each `change_pte` updates a mapped
/// entry in place or misses an unmapped one; a merge of two mapped pages
/// leaves both mapped.
fn check_change_pte_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    let d = Delta::new(before, after);
    prop_assert_eq!(d.applied + d.missed, d.change_pte_calls, "every change_pte is applied or missed ({:?})", step);
    match *step {
        Step::ProtectRange { .. } => {
            prop_assert_eq!(d.applied, 0, "an unflagged range zaps before change_pte");
        }
        _ => prop_assert_eq!(d.zapped, 0, "a flagged range zapped under change-pte ({:?})", step),
    }
    if matches!(step, Step::Merge { .. } | Step::MergeSkipped | Step::WriteProtect(_) | Step::ForceCow(_)) {
        prop_assert!(before.ept.keys().eq(after.ept.keys()), "{:?} changed which pages are mapped", step);
    }
    if let Step::Merge { a, b, replaced } = *step {
        if before.mapped(a) && before.mapped(b) {
            let expected =
                u64::from(before.ptes[&a].writable) + u64::from(before.ptes[&b].writable) + u64::from(replaced);
            prop_assert_eq!(d.change_pte_calls, expected, "change_pte calls of {:?}", step);
            prop_assert_eq!(d.applied, expected, "in-place updates of {:?}", step);
            prop_assert_eq!(d.missed, 0);
            prop_assert!(after.mapped(a) && after.mapped(b), "{:?} unmapped a page", step);
        }
    }
    Ok(())
}

/// range-flush and legacy: every range zaps its pages in
/// `invalidate_range_start`, so a page a range covered is unmapped after it
/// unless a fault mapped it again.
fn check_zaps_every_range(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    let d = Delta::new(before, after);
    let mapped_before = |gfns: &[Gfn]| gfns.iter().filter(|&&g| before.mapped(g)).count() as u64;
    match *step {
        Step::Merge { a, b, .. } => {
            prop_assert_eq!(d.zapped, mapped_before(&[a, b]), "zaps of {:?}", step);
            prop_assert!(!after.mapped(a) && !after.mapped(b), "{:?} left a page mapped", step);
        }
        Step::WriteProtect(gfn) => {
            prop_assert_eq!(d.zapped, mapped_before(&[gfn]), "zaps of {:?}", step);
            prop_assert!(!after.mapped(gfn), "{:?} left the page mapped", step);
        }
        Step::ProtectRange { start, end } => {
            let gfns: Vec<Gfn> = (start..end).collect();
            prop_assert_eq!(d.zapped, mapped_before(&gfns), "zaps of {:?}", step);
            prop_assert!(gfns.iter().all(|&g| !after.mapped(g)), "{:?} left a page mapped", step);
        }
        // A range is opened only when the host copies the page.
        Step::ForceCow(gfn) => {
            if d.ranges > 0 {
                prop_assert_eq!(d.zapped, mapped_before(&[gfn]), "zaps of {:?}", step);
                prop_assert!(!after.mapped(gfn), "{:?} left the page mapped", step);
            } else {
                prop_assert_eq!(d.zapped, 0, "{:?} without a range zapped", step);
            }
        }
        // The handler's copy-on-write zaps, then the fault maps the page again.
        Step::Guest { gfn, .. } => {
            let expected = if d.ranges > 0 { mapped_before(&[gfn]) } else { 0 };
            prop_assert_eq!(d.zapped, expected, "zaps of {:?}", step);
        }
        Step::MergeSkipped => prop_assert_eq!(d.zapped, 0),
    }
    Ok(())
}

/// range-flush: `change_pte` is ignored outright, never counted.
fn check_range_flush_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    prop_assert_eq!(after.mmu.change_pte_applied, 0, "change_pte applied under range-flush ({:?})", step);
    prop_assert_eq!(after.mmu.change_pte_missed, 0, "change_pte counted under range-flush ({:?})", step);
    check_zaps_every_range(step, before, after)
}

/// legacy: the zap came first, so every `change_pte` finds nothing.
fn check_legacy_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    let d = Delta::new(before, after);
    prop_assert_eq!(after.mmu.change_pte_applied, 0, "change_pte applied under legacy ({:?})", step);
    prop_assert_eq!(d.missed, d.change_pte_calls, "every change_pte misses under legacy ({:?})", step);
    check_zaps_every_range(step, before, after)
}

type StepCheck = fn(&Step, &Snapshot, &Snapshot) -> Res;

fn no_policy_check(_: &Step, _: &Snapshot, _: &Snapshot) -> Res {
    Ok(())
}

/// A generated case: initial words of the guest pages and the operations.
#[derive(Debug, Clone)]
struct Case {
    first: Gfn,
    words: Vec<u64>,
    ops: Vec<Op>,
}

/// Runs `case` under `policy`, checking the invariants after every step,
/// `step_check` on every step, and a full guest sweep at the end.
fn run(policy: Policy, case: &Case, step_check: StepCheck) -> Res {
    let mut lab = Lab::new(policy, case.first, &case.words);
    lab.check()?;
    for (i, op) in case.ops.iter().enumerate() {
        let at = |e: TestCaseError| TestCaseError::fail(format!("{} at op #{i} {op:?}: {e}", policy.name()));
        let before = lab.snapshot();
        let step = lab.apply(op).map_err(at)?;
        let after = lab.snapshot();
        lab.check().map_err(at)?;
        step_check(&step, &before, &after).map_err(at)?;
    }
    lab.sweep()?;
    lab.check()
}

fn op_strategy(gfns: Range<Gfn>) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => gfns.clone().prop_map(Op::GuestRead),
        3 => (gfns.clone(), WORDS).prop_map(|(gfn, word)| Op::GuestWrite(gfn, word)),
        1 => gfns.clone().prop_map(Op::GuestFetch),
        4 => (gfns.clone(), any::<Index>(), any::<bool>()).prop_map(|(a, pick, ksm)| Op::KsmMerge { a, pick, ksm }),
        1 => gfns.clone().prop_map(Op::WriteProtect),
        1 => (gfns.clone(), 1u64..=4).prop_map(|(start, len)| Op::ProtectRange { start, len }),
        2 => gfns.prop_map(Op::ForceCow),
    ]
}

fn case_strategy() -> impl Strategy<Value = Case> {
    (4u64..24)
        .prop_flat_map(|pages| {
            proptest::sample::select(FIRST_GFNS.as_slice()).prop_flat_map(move |first| {
                (Just(first), vec(WORDS, pages as usize), vec(op_strategy(first..first + pages), 1..64))
            })
        })
        .prop_map(|(first, words, ops)| Case { first, words, ops })
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 200,
        // Next to this file, as tests/model.regressions.
        failure_persistence: Some(Box::new(FileFailurePersistence::WithSource("regressions"))),
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config())]

    /// The same sequence under each policy: no stale or over-permissive
    /// entry, the view follows the table, frames are accounted for, and the
    /// guest always reads what it wrote.
    #[test]
    fn invariants_hold_under_every_policy(case in case_strategy()) {
        for policy in POLICIES {
            run(policy, &case, no_policy_check)?;
        }
    }

    #[test]
    fn change_pte_updates_in_place(case in case_strategy()) {
        run(Policy::ChangePte, &case, check_change_pte_step)?;
    }

    #[test]
    fn range_flush_zaps_and_ignores_change_pte(case in case_strategy()) {
        run(Policy::RangeFlush, &case, check_range_flush_step)?;
    }

    #[test]
    fn legacy_zaps_and_misses_every_change_pte(case in case_strategy()) {
        run(Policy::Legacy, &case, check_legacy_step)?;
    }
}

// ---- Deterministic: one merge, reads, one write on two pages ----

/// The counters of the secondary MMU a test pins (all but `view_ns`, a time).
#[derive(Debug, PartialEq, Eq)]
struct Counts {
    installed: u64,
    zapped: u64,
    change_pte_applied: u64,
    change_pte_missed: u64,
    flushes: u64,
    fault_retries: u64,
    view_updates: u64,
    /// The view's (zaps, maps).
    view_calls: (u64, u64),
}

/// Pages 2 and 3 hold the same word; KSM merges 3 into 2's frame (a KSM
/// page), the guest reads both, then writes page 3 (copy-on-write). Frames:
/// 0-1 boot, 2-3 guest, 4 spare.
fn merge_read_write(policy: Policy) -> (Counts, HostStats, Lab) {
    let mut lab = Lab::new(policy, FIRST_GFN, &[0x5a, 0x5a]);
    let merged = lab.merge_pages(2, 3, true).expect("merge");
    assert_eq!(merged, Step::Merge { a: 2, b: 3, replaced: true });
    lab.check().expect("invariants after the merge");
    lab.guest_read(3, Access::Read).expect("read 3");
    lab.guest_read(2, Access::Read).expect("read 2");
    lab.guest_write(3, 0x77).expect("write 3");
    lab.check().expect("invariants after the write");
    // Both pages read back through the secondary MMU without another fault.
    let installed = lock(&lab.mmu).stats().installed;
    lab.sweep().expect("sweep");
    assert_eq!(lock(&lab.mmu).stats().installed, installed, "the sweep faulted");
    assert_eq!(lab.model.words, [0x5a, 0x77]);

    let host = lock(&lab.host);
    // The frame freed by the merge (3) is the first one reused: the free list is LIFO.
    assert_eq!(host.pte(3).expect("pte"), Pte { pfn: 3, writable: true });
    assert_eq!(host.pte(2).expect("pte"), Pte { pfn: 2, writable: false });
    assert!(host.frame(2).ksm);
    let host_stats = host.stats();
    drop(host);
    let mmu = lock(&lab.mmu);
    let s = mmu.stats();
    let counts = Counts {
        installed: s.installed,
        zapped: s.zapped,
        change_pte_applied: s.change_pte_applied,
        change_pte_missed: s.change_pte_missed,
        flushes: s.flushes,
        fault_retries: s.fault_retries,
        view_updates: s.view_updates,
        view_calls: mmu.view().calls,
    };
    drop(mmu);
    (counts, host_stats, lab)
}

/// The host side is the same under every policy.
fn expected_host_stats() -> HostStats {
    HostStats {
        // Page 3's write fault on the KSM frame 2 (mapped twice) copies it.
        cow_copies: 1,
        cow_reuses: 0,
        // replace_page drops frame 3's last reference.
        frames_freed: 1,
        // The copy takes frame 3 back.
        frames_allocated: 1,
        // write_protect_page(2), write_protect_page(3), replace_page(3), wp_page_copy(3).
        notifier_ranges: 4,
        // One set_pte_at_notify in each of those ranges.
        change_pte_calls: 4,
    }
}

#[test]
fn change_pte_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::ChangePte);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // Only the write fault installs (the merge kept both pages mapped,
            // so the reads hit the EPT).
            installed: 1,
            // Every range carries USE_CHANGE_PTE: nothing is ever zapped.
            zapped: 0,
            // wp(2): 2 rw->ro; wp(3): 3 rw->ro; replace: 3 -> frame 2 ro;
            // the copy-on-write: 3 -> frame 3 rw.
            change_pte_applied: 4,
            change_pte_missed: 0,
            flushes: 0,
            // The copy-on-write inside the fault moves the invalidation
            // sequence, so the handler retries once (and finds the pte writable).
            fault_retries: 1,
            // 4 in-place updates + 1 install, all maps.
            view_updates: 5,
            view_calls: (0, 5),
        }
    );
}

#[test]
fn range_flush_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::RangeFlush);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // Read faults on 3 and 2 (zapped by the merge), then the write fault on 3.
            installed: 3,
            // wp(2) zaps 2; wp(3) zaps 3; replace finds 3 already gone; the
            // copy-on-write zaps 3 (mapped read-only by the read fault).
            zapped: 3,
            // change_pte is ignored, not even counted.
            change_pte_applied: 0,
            change_pte_missed: 0,
            // One per zap that removed something.
            flushes: 3,
            // As under change-pte: the copy-on-write moved the sequence.
            fault_retries: 1,
            // 3 zaps + 3 installs.
            view_updates: 6,
            view_calls: (3, 3),
        }
    );
}

#[test]
fn legacy_merge_read_write_counts() {
    let (counts, host, _lab) = merge_read_write(Policy::Legacy);
    assert_eq!(host, expected_host_stats());
    assert_eq!(
        counts,
        Counts {
            // The same faults as range-flush.
            installed: 3,
            zapped: 3,
            // Each of the 4 change_pte calls comes after its range's zap and
            // finds no entry.
            change_pte_applied: 0,
            change_pte_missed: 4,
            flushes: 3,
            fault_retries: 1,
            view_updates: 6,
            view_calls: (3, 3),
        }
    );
}

/// A batch protection without USE_CHANGE_PTE zaps under every policy, and a
/// later write reuses the frame (mapped once, not KSM) with no notifier.
#[test]
fn unflagged_protection_zaps_under_every_policy() {
    for policy in POLICIES {
        let mut lab = Lab::new(policy, FIRST_GFN, &[1, 2, 3, 4]);
        assert_eq!(lab.protect_range(3, 5).expect("protect"), Step::ProtectRange { start: 3, end: 5 });
        lab.check().expect("invariants");
        let s = lock(&lab.mmu).stats();
        assert_eq!((s.zapped, s.flushes, s.change_pte_applied), (2, 1, 0), "{}", policy.name());
        // range-flush does not count change_pte at all; the others miss both.
        let missed = if policy == Policy::RangeFlush { 0 } else { 2 };
        assert_eq!(s.change_pte_missed, missed, "{}", policy.name());
        lab.guest_write(4, 9).expect("write");
        let host = lock(&lab.host).stats();
        assert_eq!((host.cow_reuses, host.cow_copies, host.notifier_ranges), (1, 0, 1), "{}", policy.name());
        lab.sweep().expect("sweep");
        lab.check().expect("invariants");
    }
}

// ---- Concurrency: guest faults racing with KSM ----

/// A tiny deterministic generator for the racing threads.
struct XorShift(u64);

impl XorShift {
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

/// A guest access that may race with notifications: the EPT walk and the
/// access happen under the secondary MMU's lock, as hardware's walk cannot
/// overlap an invalidation (its TLB flush waits for the access), and the
/// access faults and retries until the EPT allows it. A write stores the
/// word the page already holds, so the reference never changes. Returns the
/// word read.
fn racing_guest_access(lab: &Lab, gfn: Gfn, write: bool) -> Res<u64> {
    let access = if write { Access::Write } else { Access::Read };
    loop {
        {
            let mmu = lock(&lab.mmu);
            let entry = mmu.ept().lookup(gfn).filter(|e| !write || e.writable());
            if let Some(e) = entry {
                let word = lab.frame_word(e.pfn())?;
                if write {
                    lab.pool
                        .direct_map()
                        .write_obj(lab.model.get(gfn), GuestAddress(e.pfn() << PAGE_SHIFT))
                        .or_fail("write through the direct map")?;
                }
                return Ok(word);
            }
        }
        handle_ept_violation(&lab.host, &lab.mmu, gfn, access).or_fail("EPT violation")?;
    }
}

/// vCPU threads fault on pages while a KSM thread merges pairs of equal
/// pages and breaks them again: a fault whose host lookup raced with a merge
/// must retry (the invalidation sequence protocol) instead of installing a
/// frame the merge freed or a writable entry the merge write-protected. The
/// KSM thread checks every invariant between its steps, holding both locks,
/// so no range is open and no access in flight; it takes a step only once a
/// vCPU has made an access since its last one, so that they interleave.
/// Three vCPUs contend for the secondary MMU's lock, which widens the window
/// between a fault's host lookup and its install: without the retry this
/// test fails in practically every run.
#[test]
fn faults_racing_with_ksm_never_install_a_stale_frame() {
    const PAGES: u64 = 8;
    const VCPUS: u64 = 3;
    const KSM_STEPS: u64 = 1500;
    for policy in POLICIES {
        // Pages 2k and 2k + 1 are equal; no word is 0, so a freed frame shows.
        let words: Vec<u64> = (0..PAGES).map(|i| 0x100 + i / 2).collect();
        let lab = Lab::new(policy, FIRST_GFN, &words);
        let ksm_done = AtomicBool::new(false);
        let vcpus_running = AtomicU64::new(VCPUS);
        let guest_accesses = AtomicU64::new(0);
        let vcpu = |seed: u64| -> Res {
            let mut rng = XorShift(seed);
            let result = (|| {
                while !ksm_done.load(Ordering::Acquire) {
                    let gfn = FIRST_GFN + rng.below(PAGES);
                    let word = racing_guest_access(&lab, gfn, rng.below(4) == 0)?;
                    prop_assert_eq!(word, lab.model.get(gfn), "gfn {} read through a stale frame", gfn);
                    guest_accesses.fetch_add(1, Ordering::Release);
                }
                Ok(())
            })();
            vcpus_running.fetch_sub(1, Ordering::Release);
            result
        };
        let ksm = || -> Res {
            let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
            let mut seen = 0;
            for _ in 0..KSM_STEPS {
                while guest_accesses.load(Ordering::Acquire) == seen && vcpus_running.load(Ordering::Acquire) > 0 {
                    std::thread::yield_now();
                }
                seen = guest_accesses.load(Ordering::Acquire);
                lab.check()?;
                let a = FIRST_GFN + 2 * rng.below(PAGES / 2);
                if rng.below(3) == 0 {
                    lock(&lab.host).get_user_page(a + rng.below(2), true).or_fail("unmerge")?;
                } else {
                    lab.merge_pages(a, a + 1, rng.below(2) == 0)?;
                }
            }
            Ok(())
        };
        let result = std::thread::scope(|s| {
            let vcpus: Vec<_> = (0..VCPUS).map(|v| s.spawn(move || vcpu(0x9e37_79b9_7f4a_7c15 ^ (v + 1)))).collect();
            let mut result = ksm();
            ksm_done.store(true, Ordering::Release);
            for v in vcpus {
                result = result.and(v.join().expect("a vCPU thread panicked"));
            }
            result
        });
        if let Err(e) = result {
            panic!("{}: {e}", policy.name());
        }
        lab.check().expect("invariants at the end");
        lab.sweep().expect("sweep at the end");
    }
}
