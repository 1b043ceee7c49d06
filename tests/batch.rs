//! Batched view updates on real KVM: a merge pass over `converge`'s pages,
//! driven by a host hook through the primary MMU as mm/ksm.c's
//! `try_to_merge_one_page` does, once inside one batch
//! (`PrimaryMmu::batch_start` / `batch_end`, as a synchronous pass would
//! bracket it) and once without, under each view and under range-flush
//! and change-pte.
//!
//! Asserted: the guest's checksums and every exit are the same with and
//! without the batch, so are the secondary MMU's table figures of the pass;
//! only the view calls differ, to exactly what the batch promises: under
//! range-flush one zap of the whole region, where each page was one; under
//! change-pte one write protection of the 64 KSM pages (the first page of
//! each group: `converge` puts page i in group i mod 64) and one map per
//! other page, where each of those took two.
//!
//! `pagefill` (which writes every page between its two passes) with both
//! passes batched takes exactly the exits of its model, as without batches:
//! a write to a page the batch remapped read-only still faults and breaks
//! copy-on-write, so every checksum holds.
//!
//! Each run's figures of the pass (`view_ns`, `view_updates`, the view's
//! own) are printed; timings are never asserted. `BATCH_MEM=257M` measures
//! at another size (the memslot view holds at most 32,764 one-page slots,
//! near 128 MiB of merged pages):
//! `BATCH_MEM=120M cargo test --release -p vmm-lab --test batch -- --ignored --nocapture`.

mod common;

use std::collections::HashMap;

use common::pagefill::{check_pagefill_exits, check_window_moves_ahead_of_faults};
use common::{require_kvm, run_in_process};
use shadow_mmu::{Gfn, Pfn, PrimaryMmu, PAGE_SHIFT, PAGE_SIZE};
use vmm::stats::{Counters, RunStats};
use vmm::view::ViewKind;
use vmm::vm::{DedupPolicy, HookPoint, MmHook, MmHookError};

/// Bytes of a page that tell converge's groups apart (word 0 differs).
const KEY_BYTES: usize = 64;

fn mem() -> String {
    std::env::var("BATCH_MEM").unwrap_or_else(|_| "32M".to_string())
}

/// Merges `gfn` into the KSM page `kgfn` (write-protected and marked the
/// first time): write-protect, compare, replace.
fn merge_into(host: &mut PrimaryMmu, kpages: &mut HashMap<Gfn, Pfn>, kgfn: Gfn, gfn: Gfn) -> Result<(), MmHookError> {
    let kpfn = match kpages.get(&kgfn) {
        Some(&pfn) => pfn,
        None => {
            let kpte = host.write_protect_page(kgfn)?;
            host.set_ksm(kpte.pfn, true);
            kpages.insert(kgfn, kpte.pfn);
            kpte.pfn
        }
    };
    host.write_protect_page(gfn)?;
    let (mut a, mut b) = (vec![0u8; PAGE_SIZE as usize], vec![0u8; PAGE_SIZE as usize]);
    host.read_guest(gfn << PAGE_SHIFT, &mut a)?;
    host.read_guest(kgfn << PAGE_SHIFT, &mut b)?;
    if a != b {
        return Err(format!("gfn {gfn:#x} differs from its KSM page {kgfn:#x}").into());
    }
    host.replace_page(gfn, kpfn)?;
    Ok(())
}

/// Every page of the workload region merged into the first page with the
/// same content, in gfn order.
fn merge_pass(host: &mut PrimaryMmu) -> Result<(), MmHookError> {
    let (_, end) = host.guest_range();
    let mut heads: HashMap<Vec<u8>, Gfn> = HashMap::new();
    let mut kpages: HashMap<Gfn, Pfn> = HashMap::new();
    let mut key = vec![0u8; KEY_BYTES];
    for gfn in (guest_images::PAGEFILL_START >> PAGE_SHIFT)..end {
        host.read_guest(gfn << PAGE_SHIFT, &mut key)?;
        match heads.get(&key) {
            Some(&kgfn) => merge_into(host, &mut kpages, kgfn, gfn)?,
            None => drop(heads.insert(key.clone(), gfn)),
        }
    }
    Ok(())
}

/// The merge pass at the guest's synchronous dedup request, inside one
/// batch if `batched`.
fn merge_pass_hook(batched: bool) -> MmHook {
    Box::new(move |point, host| {
        if point != HookPoint::DedupRequest(1) {
            return Ok(());
        }
        if batched {
            host.batch_start();
        }
        let result = merge_pass(host);
        if batched {
            host.batch_end();
        }
        result
    })
}

fn figure(c: &Counters, name: &str) -> u64 {
    c.get(name).copied().unwrap_or(0)
}

/// The pass's phase (2) figures of the secondary MMU.
fn pass(s: &RunStats) -> &Counters {
    &s.phases.iter().find(|p| p.phase == 2).expect("phase 2: merge pass").figures.shadow_mmu
}

fn print_pass(view: ViewKind, policy: DedupPolicy, batched: bool, s: &RunStats) {
    let c = pass(s);
    let own: Vec<String> = c
        .iter()
        .filter(|(n, v)| n.starts_with("view_") && !matches!(n.as_str(), "view_ns" | "view_updates") && **v > 0)
        .map(|(n, v)| format!("{n}={v}"))
        .collect();
    eprintln!(
        "batch {} {} {:<11} {:<9} view_ns {:>12} view_updates {:>7} pass wall_ns {:>12} {}",
        mem(),
        view.name(),
        policy.name(),
        if batched { "batched" } else { "unbatched" },
        figure(c, "view_ns"),
        figure(c, "view_updates"),
        s.phases.iter().find(|p| p.phase == 2).map_or(0, |p| p.figures.wall_ns),
        own.join(" "),
    );
}

/// The pass's view calls (unbatched, batched) under `policy` for `pages`
/// merged pages (`converge`'s whole region).
fn expected_view_updates(policy: DedupPolicy, pages: u64) -> (u64, u64) {
    let groups = guest_images::CONVERGE_GROUPS;
    match policy {
        DedupPolicy::ChangePte => (groups + 2 * (pages - groups), 1 + (pages - groups)),
        _ => (pages, 1),
    }
}

fn check_batched_pass(view: ViewKind, policy: DedupPolicy) {
    require_kvm();
    let mem = mem();
    let mem_bytes = vmm::size::parse_size(&mem).expect("BATCH_MEM");
    let runs: Vec<RunStats> = [false, true]
        .into_iter()
        .map(|batched| {
            let s = run_in_process("converge", &mem, policy, view, Some(merge_pass_hook(batched)));
            print_pass(view, policy, batched, &s);
            s
        })
        .collect();
    let ctx = format!("{} {} {mem}", view.name(), policy.name());
    for s in &runs {
        assert_eq!(s.guest.exit_code, Some(0), "{ctx}: {}", s.guest.end.detail);
        assert_eq!(s.guest.reports, guest_images::converge_expected_reports(mem_bytes), "{ctx}");
    }
    let (plain, batched) = (&runs[0], &runs[1]);
    assert_eq!(plain.total.exits, batched.total.exits, "{ctx}: the batch changed the exits");
    for name in ["installed", "zapped", "change_pte_applied", "change_pte_missed", "flushes", "ept_entries"] {
        assert_eq!(figure(pass(plain), name), figure(pass(batched), name), "{ctx}: {name}");
    }
    let pages = (mem_bytes - guest_images::PAGEFILL_START) >> PAGE_SHIFT;
    let updates = (figure(pass(plain), "view_updates"), figure(pass(batched), "view_updates"));
    assert_eq!(updates, expected_view_updates(policy, pages), "{ctx}: view_updates (unbatched, batched)");
    let batches = (figure(pass(plain), "view_batches"), figure(pass(batched), "view_batches"));
    assert_eq!(batches, (0, 1), "{ctx}: view_batches");
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn memslot_view_range_flush_pass_in_a_batch_is_one_zap() {
    check_batched_pass(ViewKind::Memslot, DedupPolicy::RangeFlush);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn memslot_view_change_pte_pass_in_a_batch_maps_each_page_once() {
    check_batched_pass(ViewKind::Memslot, DedupPolicy::ChangePte);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn uffd_view_range_flush_pass_in_a_batch_is_one_zap() {
    check_batched_pass(ViewKind::Uffd, DedupPolicy::RangeFlush);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn uffd_view_change_pte_pass_in_a_batch_maps_each_page_once() {
    check_batched_pass(ViewKind::Uffd, DedupPolicy::ChangePte);
}

#[test]
#[ignore = "needs /dev/kvm: scripts/test.sh runs it"]
fn pagefill_with_batched_passes_takes_the_exits_of_its_model_under_both_views() {
    require_kvm();
    for view in [ViewKind::Memslot, ViewKind::Uffd] {
        for policy in [DedupPolicy::RangeFlush, DedupPolicy::ChangePte, DedupPolicy::Legacy] {
            let s = run_in_process("pagefill", "8M", policy, view, Some(merge_pass_hook(true)));
            check_pagefill_exits(&s, policy, view);
            check_window_moves_ahead_of_faults(&s, policy, view);
            let batches: u64 = s.phases.iter().map(|p| figure(&p.figures.shadow_mmu, "view_batches")).sum();
            assert_eq!(batches, 2, "{} {}: one batch per pass", view.name(), policy.name());
        }
    }
}
