//! Property tests of the secondary MMU against a plain reference model.
//!
//! Random sequences of guest accesses (made through the secondary MMU, as a
//! vCPU would: through the EPT entry's frame, faulting when the EPT does not
//! allow the access), KSM merges, lone write protections, unflagged batch
//! protections, host-side copy-on-write breaks, soft-dirty rounds and
//! mprotects (to read-only and back) run under every [`Policy`]. After every
//! step the EPT, its view, the host page table and the frame accounting are
//! checked against each other, every guest read against a reference of what
//! each guest page holds (one word at offset 0 of each page), the host's
//! soft-dirty bits against the pages written since the last round, and a
//! write to a page mprotect'ed read-only must be refused.
//!
//! The policy-specific proptests also compare counters before and after
//! each step: in-place updates under change-pte and event-aware, zaps under
//! range-flush and legacy (and of batch ranges under change-pte), missed
//! `change_pte` calls under legacy, in-place downgrades of batch ranges under
//! event-aware. Deterministic tests (tests/counts.rs, tests/batch.rs) pin
//! exact counts per policy; tests/races.rs races guest faults with KSM and
//! soft-dirty rounds.

mod common;

use std::collections::BTreeMap;
use std::ops::Range;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::{FileFailurePersistence, TestCaseError};
use shadow_mmu::memory::HostStats;
use shadow_mmu::{lock, Access, Gfn, MmuStats, Pfn, Policy, Pte};

use common::invariants::ept_pages;
use common::{Lab, OrFail, Res, Step, FIRST_GFN, POLICIES};

/// First guest page of the generated cases: [`FIRST_GFN`], or a few pages
/// below 512 so that the guest range spans two EPT leaf tables.
const FIRST_GFNS: [Gfn; 2] = [FIRST_GFN, 505];
/// Words the guest writes: a small alphabet, so that many pages are equal
/// and KSM merges happen often.
const WORDS: Range<u64> = 0..4;

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
    /// A soft-dirty round over [start, start + len).
    SoftDirty {
        start: Gfn,
        len: u64,
    },
    /// mprotect of [start, start + len) to read-only or back.
    Mprotect {
        start: Gfn,
        len: u64,
        writable: bool,
    },
}

/// The state the policy checks compare across one step.
#[derive(Debug, Clone)]
struct Snapshot {
    mmu: MmuStats,
    host: HostStats,
    ept: BTreeMap<Gfn, (Pfn, bool)>,
    ptes: BTreeMap<Gfn, Pte>,
    /// The view's `write_protect` calls.
    view_write_protects: u64,
}

impl Snapshot {
    fn mapped(&self, gfn: Gfn) -> bool {
        self.ept.contains_key(&gfn)
    }
}

/// The counters, the EPT and the host ptes of `lab` now.
fn snapshot(lab: &Lab) -> Snapshot {
    let host = lock(&lab.mmus.mm);
    let mmu = lock(&lab.mmus.mmu);
    Snapshot {
        mmu: mmu.stats(),
        host: host.stats(),
        ept: ept_pages(&mmu),
        ptes: lab.model.gfns().map(|gfn| (gfn, host.pte(gfn).expect("guest page"))).collect(),
        view_write_protects: mmu.view().write_protect_calls,
    }
}

/// Merges `a` with the page `pick` chooses among those equal to it.
fn ksm_merge(lab: &Lab, a: Gfn, pick: Index, ksm: bool) -> Res<Step> {
    let candidates = lab.model.equal_pages(a);
    if candidates.is_empty() {
        return Ok(Step::MergeSkipped);
    }
    lab.merge_pages(a, *pick.get(&candidates), ksm)
}

/// Applies `op` to `lab`.
fn apply(lab: &mut Lab, op: &Op) -> Res<Step> {
    Ok(match *op {
        Op::GuestRead(gfn) => {
            lab.guest_read(gfn, Access::Read)?;
            Step::Guest { gfn, access: Access::Read }
        }
        Op::GuestFetch(gfn) => {
            lab.guest_read(gfn, Access::Fetch)?;
            Step::Guest { gfn, access: Access::Fetch }
        }
        Op::GuestWrite(gfn, word) => lab.guest_write_or_refused(gfn, word)?,
        Op::KsmMerge { a, pick, ksm } => ksm_merge(lab, a, pick, ksm)?,
        Op::WriteProtect(gfn) => {
            lock(&lab.mmus.mm).write_protect_page(gfn).or_fail("write_protect_page")?;
            Step::WriteProtect(gfn)
        }
        Op::ProtectRange { start, len } => lab.protect_range(start, (start + len).min(lab.model.gfns().end))?,
        Op::ForceCow(gfn) => lab.force_cow(gfn)?,
        Op::SoftDirty { start, len } => lab.soft_dirty_round(start, (start + len).min(lab.model.gfns().end))?,
        Op::Mprotect { start, len, writable } => {
            lab.mprotect(start, (start + len).min(lab.model.gfns().end), writable)?
        }
    })
}

/// Per-step counter deltas.
struct Delta {
    applied: u64,
    missed: u64,
    zapped: u64,
    change_pte_calls: u64,
    ranges: u64,
    flushes: u64,
    wrprot_ranges: u64,
    wrprot_entries: u64,
    view_write_protects: u64,
}

impl Delta {
    fn new(before: &Snapshot, after: &Snapshot) -> Self {
        Self {
            applied: after.mmu.change_pte_applied - before.mmu.change_pte_applied,
            missed: after.mmu.change_pte_missed - before.mmu.change_pte_missed,
            zapped: after.mmu.zapped - before.mmu.zapped,
            change_pte_calls: after.host.change_pte_calls - before.host.change_pte_calls,
            ranges: after.host.notifier_ranges - before.host.notifier_ranges,
            flushes: after.mmu.flushes - before.mmu.flushes,
            wrprot_ranges: after.mmu.wrprot_ranges - before.mmu.wrprot_ranges,
            wrprot_entries: after.mmu.wrprot_entries - before.mmu.wrprot_entries,
            view_write_protects: after.view_write_protects - before.view_write_protects,
        }
    }
}

/// The gfns of a batch step's range, if it is one.
fn batch_range(step: &Step) -> Option<Range<Gfn>> {
    match *step {
        Step::ProtectRange { start, end } | Step::SoftDirty { start, end } | Step::Mprotect { start, end, .. } => {
            Some(start..end)
        }
        _ => None,
    }
}

/// change-pte: flagged ranges never zap; each `change_pte` updates a mapped
/// entry in place or misses an unmapped one; a merge of two mapped pages
/// leaves both mapped.
fn check_change_pte_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    let d = Delta::new(before, after);
    prop_assert_eq!(d.applied + d.missed, d.change_pte_calls, "every change_pte is applied or missed ({:?})", step);
    match *step {
        Step::ProtectRange { .. } | Step::SoftDirty { .. } | Step::Mprotect { .. } => {
            prop_assert_eq!(d.applied, 0, "an unflagged range zaps before change_pte");
        }
        _ => prop_assert_eq!(d.zapped, 0, "a flagged range zapped under change-pte ({:?})", step),
    }
    if matches!(
        step,
        Step::Merge { .. } | Step::MergeSkipped | Step::WriteProtect(_) | Step::ForceCow(_) | Step::WriteRefused(_)
    ) {
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
        Step::ProtectRange { start, end } | Step::SoftDirty { start, end } | Step::Mprotect { start, end, .. } => {
            let gfns: Vec<Gfn> = (start..end).collect();
            prop_assert_eq!(d.zapped, mapped_before(&gfns), "zaps of {:?}", step);
            prop_assert!(gfns.iter().all(|&g| !after.mapped(g)), "{:?} left a page mapped", step);
        }
        // A refused write opens no range.
        Step::WriteRefused(_) => prop_assert_eq!((d.zapped, d.ranges), (0, 0), "{:?}", step),
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
    prop_assert_eq!((d.wrprot_ranges, d.wrprot_entries, d.view_write_protects), (0, 0, 0), "{:?}", step);
    Ok(())
}

/// change-pte: besides the in-place updates, batch ranges zap as under
/// range-flush (a KVM that honours the flag has no other way).
fn check_change_pte_policy_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    check_change_pte_step(step, before, after)?;
    if let Some(gfns) = batch_range(step) {
        let d = Delta::new(before, after);
        let mapped = gfns.clone().filter(|&g| before.mapped(g)).count() as u64;
        prop_assert_eq!(d.zapped, mapped, "zaps of {:?}", step);
        prop_assert!(gfns.clone().all(|g| !after.mapped(g)), "{:?} left a page mapped", step);
    }
    prop_assert_eq!(after.mmu.wrprot_entries, 0, "in-place downgrade under change-pte ({:?})", step);
    Ok(())
}

/// event-aware: change-pte's in-place updates for flagged ranges; a range
/// that only removes write (a soft-dirty round, mprotect to read-only)
/// downgrades its writable entries in place, one view call and one flush
/// if any changed, and keeps every entry mapped on its frame; mprotect back
/// to read-write changes nothing; an unflagged protection that does not say
/// what it does zaps.
fn check_event_aware_step(step: &Step, before: &Snapshot, after: &Snapshot) -> Res {
    check_change_pte_step(step, before, after)?;
    let d = Delta::new(before, after);
    let (gfns, removes_write) = match *step {
        Step::SoftDirty { start, end } | Step::Mprotect { start, end, writable: false } => (start..end, true),
        Step::Mprotect { writable: true, .. } => {
            prop_assert_eq!(&before.ept, &after.ept, "mprotect back to read-write changed the EPT");
            prop_assert_eq!((d.zapped, d.flushes, d.wrprot_entries), (0, 0, 0), "{:?}", step);
            return Ok(());
        }
        Step::ProtectRange { start, end } => (start..end, false),
        _ => {
            prop_assert_eq!((d.wrprot_ranges, d.wrprot_entries, d.view_write_protects), (0, 0, 0), "{:?}", step);
            return Ok(());
        }
    };
    if !removes_write {
        let mapped = gfns.clone().filter(|&g| before.mapped(g)).count() as u64;
        prop_assert_eq!(d.zapped, mapped, "an unflagged range that does not say what it does zaps ({:?})", step);
        return Ok(());
    }
    let writable = gfns.clone().filter(|g| before.ept.get(g).is_some_and(|&(_, w)| w)).count() as u64;
    prop_assert_eq!(d.zapped, 0, "{:?} zapped under event-aware", step);
    prop_assert_eq!(d.wrprot_entries, writable, "entries downgraded by {:?}", step);
    let changed = u64::from(writable > 0);
    prop_assert_eq!((d.wrprot_ranges, d.flushes, d.view_write_protects), (changed, changed, changed), "{:?}", step);
    for (gfn, &(pfn, w)) in &before.ept {
        let expected = if gfns.contains(gfn) { (pfn, false) } else { (pfn, w) };
        prop_assert_eq!(after.ept.get(gfn), Some(&expected), "gfn {} after {:?}", gfn, step);
    }
    prop_assert_eq!(before.ept.len(), after.ept.len(), "{:?} mapped or unmapped a page", step);
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
        let before = snapshot(&lab);
        let step = apply(&mut lab, op).map_err(at)?;
        let after = snapshot(&lab);
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
        2 => gfns.clone().prop_map(Op::ForceCow),
        2 => (gfns.clone(), 1u64..=24).prop_map(|(start, len)| Op::SoftDirty { start, len }),
        2 => (gfns, 1u64..=4, any::<bool>()).prop_map(|(start, len, writable)| Op::Mprotect { start, len, writable }),
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
        run(Policy::ChangePte, &case, check_change_pte_policy_step)?;
    }

    #[test]
    fn event_aware_updates_in_place_and_downgrades_batch_ranges(case in case_strategy()) {
        run(Policy::EventAware, &case, check_event_aware_step)?;
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
