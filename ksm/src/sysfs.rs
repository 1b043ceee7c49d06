//! The knobs and figures of /sys/kernel/mm/ksm, with their sysfs names
//! (mm/ksm.c's `ksm_attrs`: the `*_store` checks of the knobs, the `*_show`
//! of the figures, `general_profit_show`), plus this prototype's cost
//! figures.

use shadow_mmu::PAGE_SIZE;

use crate::ksm::{Ksm, KsmError};
use crate::rmap::{RmapItem, RmapState, KSM_RMAP_ITEM_SIZE};

/// The knobs of /sys/kernel/mm/ksm that this deduplicator has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KsmKnobs {
    /// 0 stop, 1 run the background scanner, 2 stop and unmerge everything.
    pub run: u32,
    /// Pages scanned per ksmd batch (at least 1).
    pub pages_to_scan: u32,
    /// Sleep between ksmd batches.
    pub sleep_millisecs: u32,
    /// Most pages sharing one KSM page before a duplicate KSM page starts.
    /// At least 2; changes only while there are no KSM pages.
    pub max_page_sharing: u32,
    /// Merge zero-filled pages with the zero page instead of a KSM page.
    pub use_zero_pages: bool,
    /// Skip pages that keep failing to merge, for more scans the longer they do.
    pub smart_scan: bool,
}

impl Default for KsmKnobs {
    /// Linux's defaults.
    fn default() -> Self {
        Self {
            run: 0,
            pages_to_scan: 100,
            sleep_millisecs: 20,
            max_page_sharing: 256,
            use_zero_pages: false,
            smart_scan: true,
        }
    }
}

impl KsmKnobs {
    /// Checks every knob's range, as writing sysfs would.
    pub fn check(&self) -> Result<(), KsmError> {
        let k = self;
        let bad = |name, value: u32, why| Err(KsmError::BadKnob { name, value: value.into(), why });
        if k.run > 2 {
            return bad("run", k.run, "0 stop, 1 run, 2 unmerge all");
        }
        // Linux accepts 0; refused on purpose (crate docs, "Deliberate
        // differences from mm/ksm.c").
        if k.pages_to_scan == 0 {
            return bad("pages_to_scan", k.pages_to_scan, "at least 1");
        }
        if k.max_page_sharing < 2 {
            return bad("max_page_sharing", k.max_page_sharing, "at least 2");
        }
        Ok(())
    }
}

/// The figures of /sys/kernel/mm/ksm, plus cost figures.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KsmStats {
    /// KSM pages in use.
    pub pages_shared: u64,
    /// Further pages mapping them (the pages saved).
    pub pages_sharing: u64,
    /// Pages in the unstable tree.
    pub pages_unshared: u64,
    /// Pages with an rmap item in neither tree: changing too fast to be in
    /// one (`rmap_items - pages_shared - pages_sharing - pages_unshared`).
    pub pages_volatile: u64,
    /// Completed full scans. Linux shows `ksm_scan.seqnr`, which an unmerge
    /// (run = 2) sets back to 0; this keeps counting (crate docs,
    /// "Deliberate differences from mm/ksm.c").
    pub full_scans: u64,
    /// Pages looked at (`ksm_pages_scanned`): every page the scanner
    /// returns, KSM pages included; never-touched pages, pages mapping the
    /// zero page and pages smart scan skips are not.
    pub pages_scanned: u64,
    /// Pages smart scan skipped.
    pub pages_skipped: u64,
    /// Pages mapping the zero page now (use_zero_pages); a copy-on-write
    /// break lowers it at once, as in Linux.
    pub ksm_zero_pages: u64,
    /// Stable node chains: entries that came to hold more than one KSM page
    /// of one content (max_page_sharing), until a search finds one left.
    pub stable_node_chains: u64,
    /// KSM pages inside such chains.
    pub stable_node_dups: u64,
    /// As Linux computes it (`general_profit_show`): the bytes saved,
    /// `(pages_sharing + ksm_zero_pages) * PAGE_SIZE`, minus
    /// `rmap_items * KSM_RMAP_ITEM_SIZE`, Linux's rmap item size (64 bytes
    /// on x86-64); negative while the rmap items cost more than the merges
    /// save. This crate's own metadata is `metadata_bytes`.
    pub general_profit: i64,
    /// Bytes the frame pool's memfd shrank by while the scanner ran (measured).
    pub bytes_returned: u64,
    /// The memfd's allocated bytes now.
    pub memfd_resident_bytes: u64,
    /// Bytes of the deduplicator's own metadata.
    pub metadata_bytes: u64,
    /// Rmap items: pages the scanner found holding memory and not mapping
    /// the zero page at its last visit.
    pub rmap_items: u64,
    /// Pages merged: each page that came to map a KSM page or the zero page.
    /// A pair made into a new KSM page counts two; a pair whose second half
    /// failed (nothing shared) counts none.
    pub merges: u64,
    /// Wall time spent scanning, in nanoseconds.
    pub scan_ns: u64,
    /// CPU time of the scanning thread(s), in nanoseconds.
    pub cpu_ns: u64,
}

impl Ksm {
    /// The statistics now (levels computed, counters since creation),
    /// fleet-wide as sysfs is host-wide: over every mm on the list.
    pub fn stats(&self) -> KsmStats {
        let mut s = self.stats;
        s.pages_unshared = self.unstable_items();
        // Only merges map the zero page, so its mapcount is Linux's
        // ksm_zero_pages: a copy-on-write break lowers it at once.
        s.ksm_zero_pages = u64::from(self.frames.frame(self.zero_pfn).mapcount);
        // pages_volatile_show: clamped at 0, as Linux conceals a negative.
        s.pages_volatile = s.rmap_items.saturating_sub(s.pages_shared + s.pages_sharing + s.pages_unshared);
        (s.stable_node_chains, s.stable_node_dups) = self.stable.chains();
        s.metadata_bytes = self.metadata_bytes() as u64;
        let saved = (s.pages_sharing + s.ksm_zero_pages) * PAGE_SIZE;
        s.general_profit = saved as i64 - (s.rmap_items * KSM_RMAP_ITEM_SIZE) as i64;
        s.memfd_resident_bytes = self.frames.pool().resident_bytes().unwrap_or(0);
        s
    }

    /// The statistics with the sysfs names, for reports.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        self.stats().counters()
    }

    /// The figures that are signed in Linux, with their sysfs names
    /// ([`KsmStats::signed_counters`]).
    pub fn signed_counters(&self) -> Vec<(&'static str, i64)> {
        self.stats().signed_counters()
    }

    fn unstable_items(&self) -> u64 {
        let items = self.slots.iter().flat_map(|slot| &slot.rmap);
        items.filter(|r| r.state == RmapState::Unstable).count() as u64
    }

    /// Bytes of metadata held: rmap items, trees, stable nodes.
    pub fn metadata_bytes(&self) -> usize {
        let items: usize = self.slots.iter().map(|slot| slot.rmap.capacity()).sum();
        let rmap = items * std::mem::size_of::<RmapItem>();
        rmap + self.stable.metadata_bytes() + self.unstable.metadata_bytes()
    }
}

impl KsmStats {
    /// The figures with the sysfs names, for reports.
    pub fn counters(&self) -> Vec<(&'static str, u64)> {
        let s = self;
        vec![
            ("pages_shared", s.pages_shared),
            ("pages_sharing", s.pages_sharing),
            ("pages_unshared", s.pages_unshared),
            ("pages_volatile", s.pages_volatile),
            ("full_scans", s.full_scans),
            ("pages_scanned", s.pages_scanned),
            ("pages_skipped", s.pages_skipped),
            ("ksm_zero_pages", s.ksm_zero_pages),
            ("stable_node_chains", s.stable_node_chains),
            ("stable_node_dups", s.stable_node_dups),
            // Signed in Linux; clamped at zero here because these figures
            // are unsigned. The signed value: `signed_counters`.
            ("general_profit", s.general_profit.max(0) as u64),
            ("bytes_returned", s.bytes_returned),
            ("memfd_resident_bytes", s.memfd_resident_bytes),
            ("metadata_bytes", s.metadata_bytes),
            ("rmap_items", s.rmap_items),
            ("merges", s.merges),
            ("scan_ns", s.scan_ns),
            ("cpu_ns", s.cpu_ns),
        ]
    }

    /// The figures that are signed in Linux, with their sysfs names:
    /// `general_profit` (negative while the rmap items cost more than the
    /// merges save).
    pub fn signed_counters(&self) -> Vec<(&'static str, i64)> {
        vec![("general_profit", self.general_profit)]
    }
}
