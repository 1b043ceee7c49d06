//! The mm list, after mm/ksm.c's `ksm_mm_slot`s on `ksm_mm_head`: every mm
//! (guest) the deduplicator scans, with its rmap items and its figures of
//! /proc/PID/ksm_stat; `__ksm_enter` ([`Ksm::ksm_enter`]) and `ksm_exit`
//! ([`Ksm::ksm_exit`]); and `MmLock`, the one mm the deduplicator holds
//! locked at a time.
//!
//! Every mm shares one frame table with the others ([`shadow_mmu::Frames`]):
//! the stable and unstable trees hold pages of every mm, so identical pages
//! of different guests merge into one KSM page, while each pte change goes
//! through the notifier of the mm it belongs to.

use std::sync::{Arc, Mutex, MutexGuard};

use shadow_mmu::{lock, Gfn, PrimaryMmu, PAGE_SIZE};

use crate::ksm::{Ksm, KsmError};
use crate::rmap::{RmapItem, KSM_RMAP_ITEM_SIZE};

/// Which mm: the id [`Ksm::ksm_enter`] gave it, never given to another.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct MmId(u32);

impl std::fmt::Display for MmId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "mm {}", self.0)
    }
}

/// An rmap item's id, unique across the mm list: its mm's first id plus its
/// page's index. The trees hold these (Linux's hold `ksm_rmap_item`
/// pointers, which name the mm and the address).
pub(crate) type RmapId = u32;

/// `struct ksm_mm_slot`: one mm on the list.
#[derive(Debug)]
pub(crate) struct MmSlot {
    pub(crate) id: MmId,
    /// The guest page of rmap item `base`.
    pub(crate) first_gfn: Gfn,
    /// The id of the rmap item of the mm's first page.
    pub(crate) base: RmapId,
    /// One rmap item per guest page (`rmap_list`, indexed by page: see the
    /// crate docs, "Deliberate differences from mm/ksm.c").
    pub(crate) rmap: Vec<RmapItem>,
    /// `mm->ksm_rmap_items`.
    pub(crate) rmap_items: u64,
    /// `mm->ksm_merging_pages`: its pages listed on a stable node.
    pub(crate) merging_pages: u64,
    /// Entered while a full scan was under way: scanned from the next one,
    /// as Linux's `__ksm_enter` puts it behind the scanning cursor.
    pub(crate) waits_for_next_scan: bool,
}

/// The figures of /proc/PID/ksm_stat for one mm (Linux 6.12's
/// `proc_pid_ksm_stat`): how much deduplication saves that guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct KsmMmStats {
    /// `ksm_rmap_items`: the mm's pages with an rmap item.
    pub ksm_rmap_items: u64,
    /// `ksm_zero_pages`: its pages mapping the zero page now.
    pub ksm_zero_pages: u64,
    /// `ksm_merging_pages`: its pages mapping a KSM page (listed on a
    /// stable node), whichever guest's page became that KSM page.
    pub ksm_merging_pages: u64,
    /// `ksm_process_profit`: `(ksm_merging_pages + ksm_zero_pages) *
    /// PAGE_SIZE - ksm_rmap_items * KSM_RMAP_ITEM_SIZE`.
    pub ksm_process_profit: i64,
}

/// The mm the deduplicator holds locked, at most one at a time: asking for
/// another lets go of the one held first, as mm/ksm.c takes one mm's mmap
/// lock at a time (`try_to_merge_two_pages` works on one page of one mm,
/// then on the other). Lock order: the deduplicator, then this mm, then
/// inside it the mm's secondary MMUs or the frame table, never two mms.
pub(crate) struct MmLock<'a> {
    mms: &'a [Arc<Mutex<PrimaryMmu>>],
    held: Option<(usize, MutexGuard<'a, PrimaryMmu>)>,
}

impl<'a> MmLock<'a> {
    /// Nothing locked yet over the mms of the list, in list order.
    pub(crate) fn new(mms: &'a [Arc<Mutex<PrimaryMmu>>]) -> Self {
        Self { mms, held: None }
    }

    /// The mm at list position `pos`, locked; the one held before, if
    /// another, is unlocked first.
    pub(crate) fn mm(&mut self, pos: usize) -> &mut PrimaryMmu {
        if self.held.as_ref().is_some_and(|(held, _)| *held != pos) {
            self.held = None;
        }
        let mms = self.mms;
        let (_, guard) = self.held.get_or_insert_with(|| (pos, lock(&mms[pos])));
        guard
    }
}

impl Ksm {
    /// `__ksm_enter`: `mm` joins the list (at its end; if a full scan is
    /// under way, it is scanned from the next one: crate docs, "Deliberate
    /// differences from mm/ksm.c"). Its pages get rmap items as the scanner
    /// finds them. `mm` must be over the deduplicator's
    /// frame table ([`KsmError::OtherPool`]) and not on the list already.
    /// Lock order: the caller holds the deduplicator; `mm` is locked here.
    pub fn ksm_enter(&mut self, mm: Arc<Mutex<PrimaryMmu>>) -> Result<MmId, KsmError> {
        let (first, end) = {
            let h = lock(&mm);
            if !Arc::ptr_eq(h.frames(), &self.frames) {
                return Err(KsmError::OtherPool);
            }
            h.guest_range()
        };
        if self.mms.iter().any(|m| Arc::ptr_eq(m, &mm)) {
            return Err(KsmError::AlreadyEntered);
        }
        let pages = end - first;
        let base = self.next_rmap_id;
        self.next_rmap_id =
            u32::try_from(pages).ok().and_then(|p| base.checked_add(p)).ok_or(KsmError::TooManyPages(pages))?;
        let id = MmId(self.next_mm_id);
        self.next_mm_id += 1;
        self.slots.push(MmSlot {
            id,
            first_gfn: first,
            base,
            rmap: vec![RmapItem::default(); pages as usize],
            rmap_items: 0,
            merging_pages: 0,
            waits_for_next_scan: self.ksm_scan.in_scan,
        });
        self.mms = self.mms.iter().cloned().chain([mm]).collect();
        Ok(id)
    }

    /// `__ksm_exit` (with what ksmd does when it finds the mm gone, done at
    /// once: crate docs, "Deliberate differences from mm/ksm.c"): every
    /// rmap item of mm `id` leaves its tree and is freed (a stable node
    /// left with no rmap item goes, and its frame is no longer a KSM page),
    /// the scan moves past the mm if it was there, and the mm leaves the
    /// list. Nothing is unmerged: what the mm maps stays mapped, and a
    /// guest that ends also runs `PrimaryMmu::exit_mmap`, before or after
    /// this. The other mms' figures no longer count its pages.
    pub fn ksm_exit(&mut self, id: MmId) -> Result<(), KsmError> {
        let pos = self.slot_pos(id)?;
        self.free_slot_rmap_items(pos);
        let scan = &mut self.ksm_scan;
        if scan.in_scan && scan.slot > pos {
            scan.slot -= 1;
        } else if scan.in_scan && scan.slot == pos {
            scan.cursor = 0; // the next mm takes its place
        }
        self.slots.remove(pos);
        self.mms = self.mms.iter().enumerate().filter(|&(i, _)| i != pos).map(|(_, m)| m.clone()).collect();
        if self.slots.is_empty() {
            self.next_rmap_id = 0;
        }
        Ok(())
    }

    /// The mms on the list, in scan order.
    pub fn mm_ids(&self) -> Vec<MmId> {
        self.slots.iter().map(|s| s.id).collect()
    }

    /// The mm with id `id`, as entered.
    pub fn mm(&self, id: MmId) -> Result<&Arc<Mutex<PrimaryMmu>>, KsmError> {
        Ok(&self.mms[self.slot_pos(id)?])
    }

    /// /proc/PID/ksm_stat of mm `id`. Counting its zero pages locks the mm
    /// (lock order: the deduplicator, then the mm).
    pub fn mm_stats(&self, id: MmId) -> Result<KsmMmStats, KsmError> {
        let pos = self.slot_pos(id)?;
        let slot = &self.slots[pos];
        let ksm_zero_pages = {
            let h = lock(&self.mms[pos]);
            let (first, end) = h.guest_range();
            let zero = |gfn| h.pte(gfn).is_ok_and(|pte| pte.pfn == self.zero_pfn);
            (first..end).filter(|&gfn| zero(gfn)).count() as u64
        };
        let saved = (slot.merging_pages + ksm_zero_pages) * PAGE_SIZE;
        Ok(KsmMmStats {
            ksm_rmap_items: slot.rmap_items,
            ksm_zero_pages,
            ksm_merging_pages: slot.merging_pages,
            ksm_process_profit: saved as i64 - (slot.rmap_items * KSM_RMAP_ITEM_SIZE) as i64,
        })
    }

    /// The list position of mm `id`.
    fn slot_pos(&self, id: MmId) -> Result<usize, KsmError> {
        self.slots.iter().position(|s| s.id == id).ok_or(KsmError::NoSuchMm(id))
    }

    /// `remove_trailing_rmap_items` over a whole mm: each of its rmap items
    /// leaves its tree and is freed.
    pub(crate) fn free_slot_rmap_items(&mut self, pos: usize) {
        let (base, n) = (self.slots[pos].base, self.slots[pos].rmap.len() as u32);
        for id in base..base + n {
            self.free_rmap_item(id);
        }
    }

    /// The list position and page index of rmap item `id`.
    pub(crate) fn locate(&self, id: RmapId) -> (usize, usize) {
        let pos = self.slots.partition_point(|s| s.base <= id) - 1;
        (pos, (id - self.slots[pos].base) as usize)
    }

    /// The list position of rmap item `id`'s mm, and its guest page.
    pub(crate) fn gfn_of(&self, id: RmapId) -> (usize, Gfn) {
        let (pos, idx) = self.locate(id);
        (pos, self.slots[pos].first_gfn + idx as u64)
    }

    /// Rmap item `id`.
    pub(crate) fn item(&self, id: RmapId) -> &RmapItem {
        let (pos, idx) = self.locate(id);
        &self.slots[pos].rmap[idx]
    }

    /// The slot of rmap item `id`'s mm, and the item's index in it.
    pub(crate) fn slot_mut(&mut self, id: RmapId) -> (&mut MmSlot, usize) {
        let (pos, idx) = self.locate(id);
        (&mut self.slots[pos], idx)
    }
}
