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
//! legacy, missed `change_pte` calls under legacy. Deterministic tests
//! (tests/counts.rs) pin the exact counts of one merge, read and write on
//! two pages per policy; tests/races.rs races guest faults with KSM.

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

/// The counters, the EPT and the host ptes of `lab` now.
fn snapshot(lab: &Lab) -> Snapshot {
    let host = lock(&lab.mmus.mm);
    let mmu = lock(&lab.mmus.mmu);
    Snapshot {
        mmu: mmu.stats(),
        host: host.stats(),
        ept: ept_pages(&mmu),
        ptes: lab.model.gfns().map(|gfn| (gfn, host.pte(gfn).expect("guest page"))).collect(),
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
        Op::GuestWrite(gfn, word) => {
            lab.guest_write(gfn, word)?;
            Step::Guest { gfn, access: Access::Write }
        }
        Op::KsmMerge { a, pick, ksm } => ksm_merge(lab, a, pick, ksm)?,
        Op::WriteProtect(gfn) => {
            lock(&lab.mmus.mm).write_protect_page(gfn).or_fail("write_protect_page")?;
            Step::WriteProtect(gfn)
        }
        Op::ProtectRange { start, len } => lab.protect_range(start, (start + len).min(lab.model.gfns().end))?,
        Op::ForceCow(gfn) => {
            lock(&lab.mmus.mm).get_user_page(gfn, true).or_fail("get_user_page(write)")?;
            Step::ForceCow(gfn)
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
