//! One soft-dirty range through the secondary MMU on a [`RecordingView`]:
//! the event-aware policy's in-place downgrade of every entry against
//! range-flush's zap of the same range, and the zap followed by the read
//! fault of every page it costs (the handler's work only: on KVM each of
//! those faults is also a VM exit); and the EPT table's own part of each
//! (no view). The VMM's views are measured by the VMM.
//!
//! `cargo bench -p shadow_mmu --bench wrprot`

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion};
use shadow_mmu::{
    handle_ept_violation, Access, FramePool, MmuNotifier, MmuNotifierRange, MmuNotifyEvent, Policy, PrimaryMmu,
    Protection, RecordingView, SecondaryMmu, PAGE_SIZE,
};

/// First guest page (the VMM's low megabyte below it).
const FIRST_GFN: u64 = 256;
/// Guest RAM sizes, in pages: 2 MiB and 64 MiB.
const SIZES: [u64; 2] = [512, 16384];

/// A primary MMU over `pages` guest pages and a view that maps them all
/// writable, as the secondary MMU starts.
fn host_and_view(pages: u64) -> (PrimaryMmu, RecordingView) {
    let end = FIRST_GFN + pages;
    let pool = Arc::new(FramePool::new((end + 1) * PAGE_SIZE).expect("frame pool (memfd)"));
    let host = PrimaryMmu::new(pool, FIRST_GFN, end);
    let view = RecordingView { pages: (FIRST_GFN..end).map(|g| (g, (g, true))).collect(), ..RecordingView::default() };
    (host, view)
}

fn soft_dirty_range(pages: u64) -> MmuNotifierRange {
    MmuNotifierRange::protection(FIRST_GFN, FIRST_GFN + pages, MmuNotifyEvent::SoftDirty, Protection::ReadOnly)
}

/// The notifier's two calls for `range`, as the primary MMU makes them.
fn invalidate(mmu: &mut SecondaryMmu<RecordingView>, range: &MmuNotifierRange) {
    mmu.invalidate_range_start(range);
    mmu.invalidate_range_end(range);
}

fn bench_range(c: &mut Criterion) {
    let mut group = c.benchmark_group("soft_dirty_range");
    for pages in SIZES {
        let (host, view) = host_and_view(pages);
        let range = soft_dirty_range(pages);
        let fresh = |policy| SecondaryMmu::new_prefaulted(policy, view.clone(), &host);
        group.bench_function(BenchmarkId::new("event_aware_in_place", pages), |b| {
            b.iter_batched(
                || fresh(Policy::EventAware),
                |mut mmu| {
                    invalidate(&mut mmu, black_box(&range));
                    mmu
                },
                BatchSize::LargeInput,
            )
        });
        group.bench_function(BenchmarkId::new("range_flush_zap", pages), |b| {
            b.iter_batched(
                || fresh(Policy::RangeFlush),
                |mut mmu| {
                    invalidate(&mut mmu, black_box(&range));
                    mmu
                },
                BatchSize::LargeInput,
            )
        });
        let host = Mutex::new(host);
        group.bench_function(BenchmarkId::new("range_flush_zap_then_read_faults", pages), |b| {
            b.iter_batched(
                || {
                    Mutex::new(SecondaryMmu::new_prefaulted(
                        Policy::RangeFlush,
                        view.clone(),
                        &host.lock().expect("host"),
                    ))
                },
                |mmu| {
                    invalidate(&mut mmu.lock().expect("mmu"), black_box(&range));
                    for gfn in range.start..range.end {
                        handle_ept_violation(&host, &mmu, gfn, Access::Read).expect("read fault");
                    }
                    mmu
                },
                BatchSize::LargeInput,
            )
        });
    }
    group.finish();
}

/// The EPT table alone: clearing the write bit of every leaf against
/// removing every leaf.
fn bench_ept(c: &mut Criterion) {
    let mut group = c.benchmark_group("ept_range");
    for pages in SIZES {
        let (host, view) = host_and_view(pages);
        let ept = SecondaryMmu::new_prefaulted(Policy::RangeFlush, view, &host).ept().clone();
        let (start, end) = (FIRST_GFN, FIRST_GFN + pages);
        group.bench_function(BenchmarkId::new("write_protect_range", pages), |b| {
            b.iter_batched_ref(|| ept.clone(), |e| e.write_protect_range(start, end), BatchSize::LargeInput)
        });
        group.bench_function(BenchmarkId::new("unmap_range", pages), |b| {
            b.iter_batched_ref(|| ept.clone(), |e| e.unmap_range(start, end), BatchSize::LargeInput)
        });
    }
    group.finish();
}

criterion_group!(benches, bench_range, bench_ept);
criterion_main!(benches);
