//! The state a [`super::UffdView`] and its fault thread share, page by page.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// Set by the fault thread before it calls the handler: the kernel reported
/// this page absent (MINOR or MISSING fault).
pub(super) const HINT_ABSENT: u8 = 1;
/// Set by the fault thread: the kernel reported a write-protect fault.
pub(super) const HINT_WP: u8 = 2;

/// Per-page state shared between the view and the fault thread.
#[derive(Debug, Default)]
pub(super) struct PageSync {
    /// Bumped by every view operation on the page that wakes its waiters, so
    /// the fault thread can tell whether the handler resolved the fault.
    pub(super) wakes: AtomicU32,
    /// What the latest fault on the page said (HINT_*), consumed by the next
    /// `map` of the page. It keeps the view right if its bookkeeping ever
    /// disagrees with the kernel: a MINOR fault on a page the view believes
    /// present is resolved by CONTINUE (EEXIST then) rather than by a wake
    /// that would make the vCPU fault again forever.
    pub(super) hint: AtomicU8,
    /// The fault thread is serving a fault on the page: view operations on
    /// it leave the waking to the thread.
    pub(super) serving: AtomicBool,
}

/// State shared by the view and its fault thread.
#[derive(Debug)]
pub(super) struct Shared {
    pub(super) pages: Box<[PageSync]>,
    /// Faults served by the thread.
    pub(super) faults: AtomicU64,
    /// Faults the handler left unresolved, woken by the thread with UFFDIO_WAKE.
    pub(super) fault_wakes: AtomicU64,
}

impl Shared {
    /// The state of a window of `nr_pages` pages, none served yet.
    pub(super) fn new(nr_pages: usize) -> Self {
        Self {
            pages: (0..nr_pages).map(|_| PageSync::default()).collect(),
            faults: AtomicU64::new(0),
            fault_wakes: AtomicU64::new(0),
        }
    }

    /// Records a view operation that woke the waiters of page `i`.
    pub(super) fn woke(&self, i: usize) {
        self.pages[i].wakes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the fault thread is serving page `i` (and will wake it).
    pub(super) fn serving(&self, i: usize) -> bool {
        self.pages[i].serving.load(Ordering::Acquire)
    }
}
