//! Batches of view updates ([`PrimaryMmu::batch_start`] /
//! [`PrimaryMmu::batch_end`]): the secondary MMU's table changes at once at
//! every step, as outside a batch, while its view hears of the batch's
//! changes at its end, one call per run of like changes of neighbouring
//! pages, behind one hold of the guest.
//!
//! Deterministic tests pin the view calls of a merge pass made in one batch
//! under each policy, with and without guest accesses inside it, and what a
//! fault served on another thread does meanwhile. A property test runs the
//! same random sequence on two labs, one with batch brackets and one
//! without: after every step both tables, every counter but the view's and
//! every guest read agree; outside a batch the view is the table.

mod common;

use std::ops::Range;

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;
use proptest::test_runner::TestCaseError;
use shadow_mmu::memory::HostStats;
use shadow_mmu::{lock, Access, Gfn, MmuStats, Policy, PrimaryMmu};

use common::invariants::ept_pages;
use common::{Lab, OrFail, Res, FIRST_GFN, POLICIES};

/// Guest pages of the deterministic tests.
const PAGES: u64 = 64;
/// Groups of equal pages: page i holds word `0x100 + i % GROUPS`, so the
/// first page of each group lies in [FIRST_GFN, FIRST_GFN + GROUPS).
const GROUPS: u64 = 8;

fn merge_pass_lab(policy: Policy) -> Lab {
    let words: Vec<u64> = (0..PAGES).map(|i| 0x100 + i % GROUPS).collect();
    Lab::new(policy, FIRST_GFN, &words)
}

/// KSM's pass over the lab in gfn order: every page merged into the first
/// page of its group, which becomes the KSM page.
fn merge_pass(lab: &Lab) -> Res {
    for gfn in FIRST_GFN + GROUPS..FIRST_GFN + PAGES {
        let kpage = FIRST_GFN + (gfn - FIRST_GFN) % GROUPS;
        lab.merge_pages(kpage, gfn, true)?;
    }
    Ok(())
}

/// The view's calls: (zaps, maps, write_protects), and its batches.
fn view_calls(lab: &Lab) -> ((u64, u64, u64), u64) {
    let mmu = lock(&lab.mmus.mmu);
    let v = mmu.view();
    ((v.calls.0, v.calls.1, v.write_protect_calls), v.batches)
}

/// Every counter of the secondary MMU but the view's own (what it told
/// the view of moved host pages included).
fn table_stats(s: MmuStats) -> MmuStats {
    MmuStats { view_updates: 0, view_batches: 0, host_pages_moved: 0, view_ns: 0, ..s }
}

/// The view calls one merge pass makes outside a batch, and inside one,
/// under `policy`: zapping policies zap every page (the KSM pages by their
/// write protection), once a page outside, once in all inside; in-place
/// policies map each page (twice for a replaced one) outside, and inside
/// write-protect the KSM pages in one call and map each replaced page once.
fn expected_calls(policy: Policy) -> ((u64, u64, u64), (u64, u64, u64)) {
    match policy {
        Policy::RangeFlush | Policy::Legacy => ((PAGES, 0, 0), (1, 0, 0)),
        Policy::ChangePte | Policy::EventAware => ((0, GROUPS + 2 * (PAGES - GROUPS), 0), (0, PAGES - GROUPS, 1)),
    }
}

#[test]
fn a_merge_pass_in_one_batch_reaches_the_view_as_ranges() -> Res {
    for policy in POLICIES {
        let (outside, inside) = expected_calls(policy);
        let plain = merge_pass_lab(policy);
        merge_pass(&plain)?;
        plain.check()?;
        prop_assert_eq!(view_calls(&plain), (outside, 0), "{} outside a batch", policy.name());

        let lab = merge_pass_lab(policy);
        let start = ept_pages(&lock(&lab.mmus.mmu));
        lock(&lab.mmus.mm).batch_start();
        merge_pass(&lab)?;
        lab.check_in_batch()?;
        {
            let mmu = lock(&lab.mmus.mmu);
            prop_assert_eq!(&mmu.view().pages, &start, "{}: the view moved inside the batch", policy.name());
            prop_assert!(mmu.view().holding, "{}: the guest was not held out", policy.name());
            prop_assert_eq!(ept_pages(&mmu), ept_pages(&lock(&plain.mmus.mmu)), "{}: table", policy.name());
        }
        lock(&lab.mmus.mm).batch_end();
        lab.check()?;
        prop_assert_eq!(view_calls(&lab), (inside, 1), "{} inside a batch", policy.name());
        let (batched, unbatched) = (lock(&lab.mmus.mmu).stats(), lock(&plain.mmus.mmu).stats());
        prop_assert_eq!(table_stats(batched), table_stats(unbatched), "{}", policy.name());
        prop_assert_eq!((batched.view_updates, batched.view_batches), (inside.0 + inside.1 + inside.2, 1));
        lab.sweep()?;
    }
    Ok(())
}

/// What the view heard of moved host pages, and what the table maps.
fn moved_pages(lab: &Lab) -> std::collections::BTreeMap<Gfn, shadow_mmu::Pfn> {
    lock(&lab.mmus.mmu).view().host_pages_moved.clone()
}

#[test]
fn a_batch_tells_the_view_where_the_host_pages_it_zapped_moved() -> Res {
    for policy in POLICIES {
        let lab = merge_pass_lab(policy);
        let kpfn = |gfn: Gfn| lock(&lab.mmus.mm).pte(FIRST_GFN + (gfn - FIRST_GFN) % GROUPS).map(|p| p.pfn);
        lock(&lab.mmus.mm).batch_start();
        merge_pass(&lab)?;
        lock(&lab.mmus.mm).batch_end();
        lab.check()?;
        // Zapping policies zapped every page: each replaced page's host page
        // is now its group's KSM page; a KSM page kept its frame (only
        // write-protected), so nothing is said of it. In-place policies
        // zapped nothing.
        let expected = match policy {
            Policy::RangeFlush | Policy::Legacy => (FIRST_GFN + GROUPS..FIRST_GFN + PAGES)
                .map(|gfn| Ok((gfn, kpfn(gfn).or_fail("pte")?)))
                .collect::<Res<_>>()?,
            Policy::ChangePte | Policy::EventAware => Default::default(),
        };
        prop_assert_eq!(moved_pages(&lab), expected, "{}", policy.name());
        prop_assert_eq!(
            lock(&lab.mmus.mmu).stats().host_pages_moved,
            (PAGES - GROUPS) * u64::from(policy_zaps(policy))
        );
    }
    // Outside a batch the view is told nothing: a fault finds the frame.
    let plain = merge_pass_lab(Policy::RangeFlush);
    merge_pass(&plain)?;
    prop_assert!(moved_pages(&plain).is_empty());
    Ok(())
}

#[test]
fn a_zap_that_keeps_the_frames_tells_the_view_no_move() -> Res {
    let mut lab = merge_pass_lab(Policy::RangeFlush);
    lock(&lab.mmus.mm).batch_start();
    lab.soft_dirty_round(FIRST_GFN, FIRST_GFN + PAGES)?;
    lock(&lab.mmus.mm).batch_end();
    lab.check()?;
    prop_assert_eq!(view_calls(&lab), ((1, 0, 0), 1));
    prop_assert!(moved_pages(&lab).is_empty());
    Ok(())
}

fn policy_zaps(policy: Policy) -> bool {
    matches!(policy, Policy::RangeFlush | Policy::Legacy)
}

#[test]
fn pages_zapped_and_faulted_back_in_one_batch_reach_the_view_once() -> Res {
    for policy in [Policy::RangeFlush, Policy::Legacy] {
        let lab = merge_pass_lab(policy);
        lock(&lab.mmus.mm).batch_start();
        merge_pass(&lab)?;
        // The guest reads every page inside the batch (a synchronous pass's
        // vCPU thread would not, but a fault on the owner's thread defers
        // like any change): each is zapped, then mapped read-only again.
        lab.sweep()?;
        lab.check_in_batch()?;
        prop_assert_eq!(view_calls(&lab), ((0, 0, 0), 1), "{}", policy.name());
        lock(&lab.mmus.mm).batch_end();
        lab.check()?;
        // The KSM pages are their own frames, read-only now: one write
        // protection of the run; every other page one map of its KSM page.
        prop_assert_eq!(view_calls(&lab), ((0, PAGES - GROUPS, 1), 1), "{}", policy.name());
    }
    Ok(())
}

#[test]
fn a_fault_served_on_another_thread_reaches_the_view_at_once() -> Res {
    let lab = merge_pass_lab(Policy::RangeFlush);
    let (a, b) = (FIRST_GFN, FIRST_GFN + GROUPS);
    lock(&lab.mmus.mm).batch_start();
    lab.merge_pages(a, b, true)?;
    prop_assert_eq!(view_calls(&lab), ((0, 0, 0), 1));
    // The userfaultfd view's fault thread serving a fault on b.
    let mmus = lab.mmus.clone();
    let pfn = std::thread::spawn(move || mmus.guest_frame(b, Access::Read)).join().expect("fault thread");
    let pfn = pfn.or_fail("fault on b")?;
    prop_assert_eq!(view_calls(&lab), ((0, 1, 0), 1), "the fault waited for the batch");
    let mapped = lock(&lab.mmus.mmu).view().pages.get(&b).copied();
    prop_assert_eq!(mapped, Some((pfn, false)));
    // A batch_end from a thread that owns no batch ends nothing.
    let mm = lab.mmus.mm.clone();
    std::thread::spawn(move || lock(&mm).batch_end()).join().expect("other thread");
    prop_assert!(lock(&lab.mmus.mmu).view().holding);
    lock(&lab.mmus.mm).batch_end();
    lab.check()?;
    // Only a's zap was left: b's entry is what its fault made it.
    prop_assert_eq!(view_calls(&lab), ((1, 1, 0), 1));
    Ok(())
}

#[test]
fn batches_nest_and_a_batch_that_changes_nothing_holds_nobody() -> Res {
    let lab = merge_pass_lab(Policy::ChangePte);
    {
        let _outer = PrimaryMmu::batch(&lab.mmus.mm);
        lock(&lab.mmus.mm).batch_start();
        lab.sweep()?; // every page mapped already: no change
        lock(&lab.mmus.mm).batch_end();
        prop_assert_eq!(view_calls(&lab), ((0, 0, 0), 0), "an empty batch held the guest");
        lab.merge_pages(FIRST_GFN, FIRST_GFN + GROUPS, true)?;
        {
            let mut mm = lock(&lab.mmus.mm);
            mm.batch_start();
            mm.batch_end();
        }
        prop_assert_eq!(view_calls(&lab), ((0, 0, 0), 1), "the inner end applied the outer batch");
    }
    lab.check()?;
    // The KSM page write-protected, the other page mapped onto it.
    prop_assert_eq!(view_calls(&lab), ((0, 1, 1), 1));
    prop_assert_eq!(lock(&lab.mmus.mmu).stats().view_batches, 1);
    Ok(())
}

/// One operation of a generated sequence.
#[derive(Debug, Clone)]
enum Op {
    Read(Gfn),
    Write(Gfn, u64),
    Merge { a: Gfn, pick: Index },
    ForceCow(Gfn),
    SoftDirty { start: Gfn, len: u64 },
    Mprotect { start: Gfn, len: u64, writable: bool },
    BatchStart,
    BatchEnd,
}

/// Applies `op` to `lab`; batch brackets only where `batched`.
fn apply(lab: &mut Lab, op: &Op, batched: bool) -> Res {
    let end = |start: Gfn, len: u64| (start + len).min(lab.model.gfns().end);
    match *op {
        Op::Read(gfn) => lab.guest_read(gfn, Access::Read)?,
        Op::Write(gfn, word) => drop(lab.guest_write_or_refused(gfn, word)?),
        Op::Merge { a, pick } => {
            let candidates = lab.model.equal_pages(a);
            if !candidates.is_empty() {
                lab.merge_pages(a, *pick.get(&candidates), true)?;
            }
        }
        Op::ForceCow(gfn) => drop(lab.force_cow(gfn)?),
        Op::SoftDirty { start, len } => drop(lab.soft_dirty_round(start, end(start, len))?),
        Op::Mprotect { start, len, writable } => drop(lab.mprotect(start, end(start, len), writable)?),
        Op::BatchStart if batched => lock(&lab.mmus.mm).batch_start(),
        Op::BatchEnd if batched => lock(&lab.mmus.mm).batch_end(),
        Op::BatchStart | Op::BatchEnd => {}
    }
    Ok(())
}

/// The figures both labs must agree on after every step.
fn figures(lab: &Lab) -> (MmuStats, HostStats, std::collections::BTreeMap<Gfn, (u64, bool)>) {
    let mmu = lock(&lab.mmus.mmu);
    (table_stats(mmu.stats()), lock(&lab.mmus.mm).stats(), ept_pages(&mmu))
}

fn run(policy: Policy, words: &[u64], ops: &[Op]) -> Res {
    let mut batched = Lab::new(policy, FIRST_GFN, words);
    let mut plain = Lab::new(policy, FIRST_GFN, words);
    let mut depth = 0u32;
    for (i, op) in ops.iter().enumerate() {
        let at = |e: TestCaseError| TestCaseError::fail(format!("{} at op #{i} {op:?}: {e}", policy.name()));
        let op = match op {
            Op::BatchEnd if depth == 0 => continue,
            _ => op,
        };
        depth = match op {
            Op::BatchStart => depth + 1,
            Op::BatchEnd => depth - 1,
            _ => depth,
        };
        apply(&mut batched, op, true).map_err(at)?;
        apply(&mut plain, op, false).map_err(at)?;
        prop_assert_eq!(figures(&batched), figures(&plain), "{} at op #{} {:?}", policy.name(), i, op);
        plain.check().map_err(at)?;
        if depth > 0 {
            batched.check_in_batch().map_err(at)?;
        } else {
            batched.check().map_err(at)?;
            prop_assert!(!lock(&batched.mmus.mmu).view().holding, "the guest is still held out");
        }
    }
    for _ in 0..depth {
        lock(&batched.mmus.mm).batch_end();
    }
    batched.check()?;
    batched.sweep()?;
    plain.sweep()?;
    prop_assert_eq!(figures(&batched), figures(&plain), "{} after the sweep", policy.name());
    Ok(())
}

fn op_strategy(gfns: Range<Gfn>) -> impl Strategy<Value = Op> {
    prop_oneof![
        3 => gfns.clone().prop_map(Op::Read),
        3 => (gfns.clone(), 0u64..4).prop_map(|(gfn, word)| Op::Write(gfn, word)),
        5 => (gfns.clone(), any::<Index>()).prop_map(|(a, pick)| Op::Merge { a, pick }),
        1 => gfns.clone().prop_map(Op::ForceCow),
        1 => (gfns.clone(), 1u64..=24).prop_map(|(start, len)| Op::SoftDirty { start, len }),
        1 => (gfns, 1u64..=4, any::<bool>()).prop_map(|(start, len, writable)| Op::Mprotect { start, len, writable }),
        2 => Just(Op::BatchStart),
        2 => Just(Op::BatchEnd),
    ]
}

fn case_strategy() -> impl Strategy<Value = (Vec<u64>, Vec<Op>)> {
    (4u64..24)
        .prop_flat_map(|pages| (vec(0u64..4, pages as usize), vec(op_strategy(FIRST_GFN..FIRST_GFN + pages), 1..64)))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    /// Batching changes only when the view hears of the table's changes:
    /// the table, every other counter and every guest read are those of
    /// the same sequence without batches, and the view is the table again
    /// at each batch's end.
    #[test]
    fn a_batch_changes_only_when_the_view_follows((words, ops) in case_strategy()) {
        for policy in POLICIES {
            run(policy, &words, &ops)?;
        }
    }
}
