//! The deduplicator of one guest, after mm/ksm.c's global state (`ksm_scan`,
//! `root_stable_tree`, `root_unstable_tree`, the zero page, the counters)
//! and `ksm_init`; its error type. The work is in the sibling modules: see
//! the map in the crate docs.

use shadow_mmu::{FramePoolError, Gfn, Pfn, PrimaryMmu, PrimaryMmuError, PAGE_SIZE};

use crate::page::{checksum, PageBuf};
use crate::rmap::RmapItem;
use crate::scan::KsmScan;
use crate::stable_tree::StableTree;
use crate::sysfs::{KsmKnobs, KsmStats};
use crate::tree::ContentTree;

/// The KSM tag of the zero page's frame: no stable node's.
pub(crate) const ZERO_OWNER: u32 = u32::MAX;

/// Errors of the deduplicator.
#[derive(Debug, thiserror::Error)]
pub enum KsmError {
    /// The primary MMU refused an operation.
    #[error(transparent)]
    Host(#[from] PrimaryMmuError),
    /// A knob value out of range.
    #[error("ksm knob {name} = {value} is out of range: {why}")]
    BadKnob {
        /// The knob.
        name: &'static str,
        /// The value given.
        value: u64,
        /// What is allowed.
        why: &'static str,
    },
    /// A knob that cannot change while KSM pages exist (Linux's -EBUSY).
    #[error("ksm knob {name} cannot change while there are KSM pages (pages_shared {pages_shared}); unmerge first")]
    Busy {
        /// The knob.
        name: &'static str,
        /// KSM pages in use.
        pages_shared: u64,
    },
    /// mincore or fstat of guest memory failed.
    #[error("cannot inspect guest memory")]
    Pool(#[from] FramePoolError),
    /// ksmd panicked (a bug); what it was changing may be half done. The
    /// panic's message.
    #[error("ksmd panicked: {0}")]
    Panicked(String),
    /// A pass or an unmerge was cancelled by its caller before it was done
    /// (as Linux's unmerge returns -ERESTARTSYS on a pending signal); what
    /// was done so far is consistent.
    #[error("the deduplication work was cancelled before it was done")]
    Cancelled,
}

/// The deduplicator of one guest.
#[derive(Debug)]
pub struct Ksm {
    /// The knobs, checked.
    pub(crate) knobs: KsmKnobs,
    /// The guest page of rmap item 0.
    pub(crate) first_gfn: Gfn,
    /// One rmap item per guest page.
    pub(crate) rmap: Vec<RmapItem>,
    /// The unstable tree: items are guest page indices.
    pub(crate) unstable: ContentTree,
    /// The stable tree, its entries and stable nodes.
    pub(crate) stable: StableTree,
    /// `ZERO_PAGE(0)`: a frame of the pool.
    pub(crate) zero_pfn: Pfn,
    /// `zero_checksum`.
    pub(crate) zero_checksum: u32,
    /// Where the scanner is.
    pub(crate) ksm_scan: KsmScan,
    /// Checksums recorded (pages found changed since their last visit).
    pub(crate) checksum_updates: u64,
    /// Rmap items that left a KSM page (copy-on-write or a stale node).
    pub(crate) departures: u64,
    /// The counters; [`Ksm::stats`] adds the levels.
    pub(crate) stats: KsmStats,
    /// The page being compared: a copy read once per visit.
    pub(crate) buf: Box<PageBuf>,
}

impl Ksm {
    /// A deduplicator over every guest page of `host`. Takes one free frame
    /// as the zero page (`ZERO_PAGE(0)`) for use_zero_pages (crate docs,
    /// "Deliberate differences from mm/ksm.c").
    pub fn new(host: &mut PrimaryMmu, knobs: KsmKnobs) -> Result<Self, KsmError> {
        knobs.check()?;
        let (first, end) = host.guest_range();
        let zero_pfn = host.alloc_page()?;
        host.set_ksm_owner(zero_pfn, true, ZERO_OWNER);
        let zero = Box::new([0u8; PAGE_SIZE as usize]);
        Ok(Self {
            knobs,
            first_gfn: first,
            rmap: vec![RmapItem::default(); (end - first) as usize],
            unstable: ContentTree::new(),
            stable: StableTree::default(),
            zero_pfn,
            zero_checksum: checksum(&zero),
            ksm_scan: KsmScan::default(),
            checksum_updates: 0,
            departures: 0,
            stats: KsmStats::default(),
            buf: zero,
        })
    }

    /// The knobs.
    pub fn knobs(&self) -> KsmKnobs {
        self.knobs
    }

    /// Changes the knobs (as writing sysfs does). As `max_page_sharing_store`
    /// does, a new `max_page_sharing` is refused ([`KsmError::Busy`]) while
    /// KSM pages exist; unmerge first (run = 2).
    pub fn set_knobs(&mut self, knobs: KsmKnobs) -> Result<(), KsmError> {
        knobs.check()?;
        let pages_shared = self.stats.pages_shared;
        if knobs.max_page_sharing != self.knobs.max_page_sharing && pages_shared > 0 {
            return Err(KsmError::Busy { name: "max_page_sharing", pages_shared });
        }
        self.knobs = knobs;
        Ok(())
    }

    /// The frame used as the zero page.
    pub fn zero_pfn(&self) -> Pfn {
        self.zero_pfn
    }

    /// The guest page of rmap item `idx`.
    pub(crate) fn gfn(&self, idx: usize) -> Gfn {
        self.first_gfn + idx as u64
    }
}
