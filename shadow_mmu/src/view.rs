//! The interface between the secondary MMU and whatever makes its table real
//! for a vCPU (the VMM's EPT view backends: KVM memslots, userfaultfd).
//!
//! The secondary MMU calls it for every change of its table, inside the
//! notifier callback or fault that makes the change, so the view is never
//! behind the table once that callback returns.

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

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_zaps", self.calls.0),
            ("view_maps", self.calls.1),
            ("view_write_protects", self.write_protect_calls),
        ]
    }
}
