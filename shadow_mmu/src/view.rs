//! The interface between the secondary MMU and whatever makes its table real
//! for a vCPU (the VMM's EPT view backends: KVM memslots, userfaultfd).
//!
//! The secondary MMU calls it for every change of its table, inside the
//! notifier callback or fault that makes the change, so the view is never
//! behind the table once that callback returns; except inside a batch
//! ([`crate::MmuNotifier::batch_start`]), where the secondary MMU holds the
//! guest out through the view ([`EptView::batch_start`]) and makes the
//! batch's changes real at its end, coalesced into ranges.

use crate::frame_pool::Pfn;
use crate::mmu_notifier::Gfn;

/// A backend that materialises the secondary table.
pub trait EptView: Send {
    /// The backend's error.
    type Error: std::error::Error + Send + Sync + 'static;

    /// Guest pages [start, end) become unreachable: the next access faults.
    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), Self::Error>;

    /// Guest page `gfn` reaches frame `pfn`, read-only or writable.
    fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), Self::Error>;

    /// Guest pages [start, end) become read-only: the next write to any of
    /// them faults; reads keep reaching the same frames without a fault.
    /// Pages not mapped stay unmapped. The event-aware policy's in-place
    /// downgrade of a whole range, in one call.
    ///
    /// The default zaps the range: correct for any backend (every access
    /// faults and the handler maps the page again from the secondary
    /// table; until then the view is stricter than the table, never
    /// looser), but not in place, so a backend overrides it; the VMM's will
    /// with a read-only memslot over the range (memslot view) and
    /// UFFDIO_WRITEPROTECT over it (userfaultfd view). A backend that wraps
    /// others must forward it, or the default zaps on their behalf.
    fn write_protect(&mut self, start: Gfn, end: Gfn) -> Result<(), Self::Error> {
        self.zap(start, end)
    }

    /// Each absent page `gfn` of `moved` has its host page at frame `pfn`
    /// now: the primary MMU moved it (a merge into a KSM page) while the
    /// secondary MMU had the page zapped. Called once at the end of a batch
    /// that zapped such pages, before [`EptView::batch_end`]; the pages stay
    /// absent and their next access still faults. A backend whose fault
    /// must first find the host page in a mapping of its own (the
    /// userfaultfd view's window, which a remap during the fault would make
    /// the host KVM retry) may move that mapping now, out of any fault. The
    /// default does nothing: the fault finds the frame then.
    fn host_pages_moved(&mut self, _moved: &[(Gfn, Pfn)]) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The secondary MMU is about to defer view updates: until
    /// [`EptView::batch_end`] the view lags the table, so the backend must
    /// keep the guest from running (the VMM's views hold the vCPU out of
    /// KVM_RUN). Called on the thread that will call `batch_end`, never
    /// inside a fault the guest waits on. The default does nothing: right
    /// for a backend no guest runs on.
    fn batch_start(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The deferred updates have been made: the guest may run again.
    fn batch_end(&mut self) -> Result<(), Self::Error> {
        Ok(())
    }

    /// The backend's own figures, by name (levels and counts).
    fn counters(&self) -> Vec<(&'static str, u64)>;
}

/// A view that only remembers what it was told: the reference for tests.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecordingView {
    /// What each mapped page reaches: gfn -> (pfn, writable).
    pub pages: std::collections::BTreeMap<Gfn, (Pfn, bool)>,
    /// Calls received: (zaps, maps).
    pub calls: (u64, u64),
    /// `write_protect` calls received.
    pub write_protect_calls: u64,
    /// `batch_start` calls received.
    pub batches: u64,
    /// Between `batch_start` and `batch_end`: a guest would be held out.
    pub holding: bool,
    /// What `host_pages_moved` told: gfn -> the frame its host page moved
    /// to (the last one told).
    pub host_pages_moved: std::collections::BTreeMap<Gfn, Pfn>,
}

impl EptView for RecordingView {
    type Error = std::convert::Infallible;

    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), Self::Error> {
        self.calls.0 += 1;
        let doomed: Vec<Gfn> = self.pages.range(start..end).map(|(g, _)| *g).collect();
        for g in doomed {
            self.pages.remove(&g);
        }
        Ok(())
    }

    fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), Self::Error> {
        self.calls.1 += 1;
        self.pages.insert(gfn, (pfn, writable));
        Ok(())
    }

    fn write_protect(&mut self, start: Gfn, end: Gfn) -> Result<(), Self::Error> {
        self.write_protect_calls += 1;
        for (_, (_, writable)) in self.pages.range_mut(start..end) {
            *writable = false;
        }
        Ok(())
    }

    fn host_pages_moved(&mut self, moved: &[(Gfn, Pfn)]) -> Result<(), Self::Error> {
        assert!(self.holding, "host_pages_moved outside a batch");
        for &(gfn, pfn) in moved {
            assert!(!self.pages.contains_key(&gfn), "host_pages_moved of mapped gfn {gfn}");
            self.host_pages_moved.insert(gfn, pfn);
        }
        Ok(())
    }

    fn batch_start(&mut self) -> Result<(), Self::Error> {
        assert!(!self.holding, "batch_start while holding: the secondary MMU nested its view brackets");
        self.batches += 1;
        self.holding = true;
        Ok(())
    }

    fn batch_end(&mut self) -> Result<(), Self::Error> {
        assert!(self.holding, "batch_end without batch_start");
        self.holding = false;
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_zaps", self.calls.0),
            ("view_maps", self.calls.1),
            ("view_write_protects", self.write_protect_calls),
        ]
    }
}
