//! The state a [`super::UffdView`] and its fault thread share, page by page.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};

/// How the fault thread waits for the next userfaultfd event.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FaultWait {
    /// poll(2) until an event (or the stop signal) arrives: the thread
    /// sleeps between faults, and each fault wakes it.
    Block,
    /// Non-blocking reads in a loop: no sleep and no wake-up between a fault
    /// and the thread, at the price of one CPU kept busy while it serves.
    Busy,
    /// Polling for [`FAULT_SPIN`] after each event, then blocking, as KVM's
    /// halt polling does: faults that come in bursts (the refaults after a
    /// merge pass) meet a thread that is awake, and an idle guest costs no
    /// CPU. While it polls the thread yields to anything else runnable on
    /// its CPU.
    #[default]
    Adaptive,
}

/// How long an [`FaultWait::Adaptive`] thread spins after an event: a few
/// faults' worth on the development machines (a fault there takes 50 to
/// 85 us), as KVM's default halt_poll_ns is 200 us.
pub const FAULT_SPIN: std::time::Duration = std::time::Duration::from_micros(200);

impl FaultWait {
    fn to_u8(self) -> u8 {
        match self {
            FaultWait::Block => 0,
            FaultWait::Busy => 1,
            FaultWait::Adaptive => 2,
        }
    }

    fn from_u8(v: u8) -> Self {
        match v {
            0 => FaultWait::Block,
            1 => FaultWait::Busy,
            _ => FaultWait::Adaptive,
        }
    }
}

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
    /// How the thread waits ([`FaultWait`] as a number).
    wait: AtomicU8,
    /// The thread resolves MINOR faults with a bare CONTINUE, without the
    /// handler ([`super::UffdView::set_bare_faults`]).
    pub(super) bare: AtomicBool,
}

impl Shared {
    /// The state of a window of `nr_pages` pages, none served yet.
    pub(super) fn new(nr_pages: usize) -> Self {
        Self {
            pages: (0..nr_pages).map(|_| PageSync::default()).collect(),
            faults: AtomicU64::new(0),
            fault_wakes: AtomicU64::new(0),
            wait: AtomicU8::new(FaultWait::default().to_u8()),
            bare: AtomicBool::new(false),
        }
    }

    /// How the fault thread waits.
    pub(super) fn wait(&self) -> FaultWait {
        FaultWait::from_u8(self.wait.load(Ordering::Acquire))
    }

    /// Sets how the fault thread waits from its next event on.
    pub(super) fn set_wait(&self, wait: FaultWait) {
        self.wait.store(wait.to_u8(), Ordering::Release);
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
