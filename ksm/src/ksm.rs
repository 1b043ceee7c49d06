//! The deduplicator, after mm/ksm.c's global state (`ksm_scan`,
//! `root_stable_tree`, `root_unstable_tree`, the zero page, the counters, the
//! mm list) and `ksm_init`; its error type. The work is in the sibling
//! modules: see the map in the crate docs.

use std::sync::{Arc, Mutex};

use shadow_mmu::{lock, FramePoolError, Frames, Pfn, PrimaryMmu, PrimaryMmuError, PAGE_SIZE};

use crate::mm_slot::{MmId, MmSlot};
use crate::page::{checksum, PageBuf};
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
    /// An mm over another frame table than the deduplicator's.
    #[error("the mm is over another frame pool than the deduplicator's")]
    OtherPool,
    /// An mm entered twice (Linux's MMF_VM_MERGEABLE is set once).
    #[error("the mm is on the deduplicator's list already")]
    AlreadyEntered,
    /// An mm that is not on the list.
    #[error("{0} is not on the deduplicator's list")]
    NoSuchMm(MmId),
    /// More pages on the list than rmap item ids (2^32).
    #[error("an mm of {0} pages does not fit in the deduplicator's rmap item ids")]
    TooManyPages(u64),
}

/// The deduplicator of every mm over one frame pool.
#[derive(Debug)]
pub struct Ksm {
    /// The knobs, checked.
    pub(crate) knobs: KsmKnobs,
    /// The frame table every mm on the list shares.
    pub(crate) frames: Arc<Frames>,
    /// The mm list (`ksm_mm_head`), in scan order; rmap item ids grow
    /// along it.
    pub(crate) slots: Vec<MmSlot>,
    /// The mms of `slots`, in the same order: what a scan locks, one at a
    /// time (`MmLock`).
    pub(crate) mms: Arc<[Arc<Mutex<PrimaryMmu>>]>,
    /// The id the next mm entered gets.
    pub(crate) next_mm_id: u32,
    /// The first rmap item id of the next mm entered.
    pub(crate) next_rmap_id: u32,
    /// The unstable tree: items are rmap item ids.
    pub(crate) unstable: ContentTree,
    /// The stable tree, its entries and stable nodes.
    pub(crate) stable: StableTree,
    /// `ZERO_PAGE(0)`: a frame of the pool, one for every mm.
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
    /// A deduplicator over one mm, every guest page of it (a single guest):
    /// [`Ksm::new_in`] over its frame table, then [`Ksm::ksm_enter`]. The
    /// zero page is taken through `mm` (counted in its `frames_allocated`).
    pub fn new(mm: &Arc<Mutex<PrimaryMmu>>, knobs: KsmKnobs) -> Result<Self, KsmError> {
        knobs.check()?;
        let (frames, zero_pfn) = {
            let mut h = lock(mm);
            let zero_pfn = h.alloc_page()?;
            (h.frames().clone(), zero_pfn)
        };
        let mut ksm = Self::with_zero_page(frames, zero_pfn, knobs);
        ksm.ksm_enter(mm.clone())?;
        Ok(ksm)
    }

    /// A deduplicator over the frame table `frames`, with no mm yet
    /// (`ksm_init`): mms join with [`Ksm::ksm_enter`]. Takes one free frame
    /// as the zero page (`ZERO_PAGE(0)`) for use_zero_pages, one for every
    /// mm (crate docs, "Deliberate differences from mm/ksm.c").
    pub fn new_in(frames: &Arc<Frames>, knobs: KsmKnobs) -> Result<Self, KsmError> {
        knobs.check()?;
        let zero_pfn = frames.alloc_page()?;
        Ok(Self::with_zero_page(frames.clone(), zero_pfn, knobs))
    }

    fn with_zero_page(frames: Arc<Frames>, zero_pfn: Pfn, knobs: KsmKnobs) -> Self {
        frames.set_ksm_owner(zero_pfn, true, ZERO_OWNER);
        let zero = Box::new([0u8; PAGE_SIZE as usize]);
        Self {
            knobs,
            frames,
            slots: Vec::new(),
            mms: Arc::new([]),
            next_mm_id: 0,
            next_rmap_id: 0,
            unstable: ContentTree::new(),
            stable: StableTree::default(),
            zero_pfn,
            zero_checksum: checksum(&zero),
            ksm_scan: KsmScan::default(),
            checksum_updates: 0,
            departures: 0,
            stats: KsmStats::default(),
            buf: zero,
        }
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

    /// The frame table every mm on the list shares.
    pub fn frames(&self) -> &Arc<Frames> {
        &self.frames
    }
}
