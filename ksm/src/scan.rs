//! The scanner, after mm/ksm.c (6.12): `ksm_do_scan` looks at up to a
//! budget of pages from where the last call stopped (the cursor and
//! sequence number are `struct ksm_scan`'s) and ends early at the end of a
//! full scan; `scan_get_next_rmap_item` decides which page is looked at
//! next; `cmp_and_merge_page` lets a page that changed since its last visit
//! go (the checksum test), then tries the zero page, the stable tree, and
//! the unstable tree. Smart scan (`should_skip_rmap_item`) skips pages that
//! keep not merging.
//!
//! The scanner works in stretches of at most [`KSM_SCAN_SLICE`], so that
//! ksmd ([`crate::Ksmd`]) can let go of the deduplicator between them and a
//! synchronous pass ([`crate::pass`]) can be cancelled.

use std::time::{Duration, Instant};

use shadow_mmu::{MmBatch, Pfn, PrimaryMmu, Pte};

use crate::ksm::{Ksm, KsmError};
use crate::mm_slot::{MmLock, RmapId};
use crate::page::{frame_checksum, read_page};
use crate::rmap::{RmapState, NIL};

/// The longest the scanner works in one go: ksmd holds the deduplicator's
/// lock for about this long at most (the clock is read every
/// `PAGES_PER_CLOCK_READ` pages) before it lets go and
/// looks at its stop flag, and a cancellable pass
/// ([`Ksm::full_pass_cancellable`]) asks its caller this often whether to go
/// on. So a stop takes effect within about this long whatever
/// `pages_to_scan` and `sleep_millisecs` are. Linux's ksmd reschedules
/// (`cond_resched`) and checks for freezing between any two pages.
pub const KSM_SCAN_SLICE: Duration = Duration::from_millis(10);

/// Pages looked at between two looks at the clock for [`KSM_SCAN_SLICE`]:
/// reading it costs about 60 ns here, 6% of scanning a page; a stretch
/// overruns its slice by at most this many pages.
const PAGES_PER_CLOCK_READ: u64 = 16;

/// Frames whose residency one mincore reads when a frame looks like a hole.
const RESIDENT_WINDOW: u64 = 256;

/// Why [`Ksm::scan_pages`] stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum ScanStop {
    /// It looked at as many pages as it was asked to.
    Budget,
    /// A full scan ended (`scan_get_next_rmap_item` returned NULL).
    ScanEnd,
    /// Its time ran out ([`KSM_SCAN_SLICE`]).
    Slice,
}

/// Frames read again by one mincore since the scan began: [start, end),
/// while the pool's frame table had allocated `allocated` frames.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Recheck {
    start: Pfn,
    end: Pfn,
    allocated: u64,
}

/// `struct ksm_scan`: where the scanner is.
#[derive(Debug, Default)]
pub(crate) struct KsmScan {
    /// A full scan is under way (Linux: `ksm_scan.mm_slot` is not
    /// `&ksm_mm_head`); otherwise the next page looked at starts one.
    pub(crate) in_scan: bool,
    /// The list position of the mm being scanned (`mm_slot`).
    pub(crate) slot: usize,
    /// The page of that mm to look at next, as an index into its rmap
    /// items (`address`).
    pub(crate) cursor: usize,
    /// Low bits of the full scans started (`seqnr`).
    pub(crate) seqnr: u8,
    /// Which frames are known to hold memory: one mincore of the whole pool
    /// at the start of a full scan (see the crate docs), and frames found
    /// since. A frame that holds memory keeps it while mapped (the primary
    /// MMU maps only frames it wrote: a copy).
    pub(crate) resident: Vec<bool>,
    /// The frames last found to be holes since then.
    pub(crate) recheck: Option<Recheck>,
    /// A synchronous pass is running: smart scan skips nothing.
    pub(crate) in_full_pass: bool,
}

/// The CPU time of the calling thread, in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

/// Smart scan's `skip_age`: how many scans a page of this age skips.
fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => 8,
    }
}

impl Ksm {
    /// `ksm_do_scan`: looks at up to `pages` pages from where the last call
    /// stopped, fewer if a full scan ends first (the call that finds the end
    /// of a scan counts it in `full_scans`; the next call starts a new one).
    /// Pages passed without a look (never touched, mapping the zero page,
    /// skipped by smart scan) do not count against `pages`. Returns the pages
    /// looked at (`pages_scanned` grows by as many).
    pub fn ksm_do_scan(&mut self, pages: u64) -> Result<u64, KsmError> {
        self.scan_pages(pages, None).map(|(looked, _)| looked)
    }

    /// `ksm_do_scan` that also stops once `until` has passed; returns the
    /// pages looked at and why it stopped. Frames freed meanwhile go back
    /// to the host at the end (`bytes_returned`). Each page is looked at
    /// under its mm's lock, let go before the next page.
    pub(crate) fn scan_pages(&mut self, pages: u64, until: Option<Instant>) -> Result<(u64, ScanStop), KsmError> {
        let t = Instant::now();
        let cpu = thread_cpu_ns();
        let before = self.frames.pool().resident_bytes().unwrap_or(0);
        let mms = self.mms.clone();
        // One batch of view updates per mm for the whole stretch: each
        // guest's secondary MMU defers its view's changes to the end, one
        // call per run of like changes (`PrimaryMmu::batch`; not in Linux,
        // see shadow_mmu's list of differences).
        let batches: Vec<MmBatch<'_>> = mms.iter().map(|mm| PrimaryMmu::batch(mm)).collect();
        let mut looked = 0;
        let mut result = Ok(ScanStop::Budget);
        while looked < pages {
            let step = {
                let mut mm = MmLock::new(&mms);
                match self.scan_get_next_rmap_item(&mut mm) {
                    Ok(Some((id, pte))) => self.cmp_and_merge_page(&mut mm, id, pte).map(|()| true),
                    Ok(None) => Ok(false),
                    Err(e) => Err(e),
                }
            };
            match step {
                Ok(true) => {}
                Ok(false) => {
                    result = Ok(ScanStop::ScanEnd);
                    break;
                }
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
            looked += 1;
            self.stats.pages_scanned += 1;
            if until.is_some_and(|u| looked % PAGES_PER_CLOCK_READ == 0 && Instant::now() >= u) {
                result = Ok(ScanStop::Slice);
                break;
            }
        }
        // The views follow before freed frames go back to the host.
        drop(batches);
        if let Err(e) = self.frames.flush_holes() {
            result = result.and(Err(e.into()));
        }
        let after = self.frames.pool().resident_bytes().unwrap_or(before);
        self.stats.bytes_returned += before.saturating_sub(after);
        self.stats.scan_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.cpu_ns += thread_cpu_ns().saturating_sub(cpu);
        result.map(|stop| (looked, stop))
    }

    /// The start of a full scan, as `scan_get_next_rmap_item` does it at
    /// the head of the mm list: a new unstable tree, which frames hold
    /// memory now, and every mm entered during the last scan joins this one.
    fn start_full_scan(&mut self) -> Result<(), KsmError> {
        // The unstable tree is rebuilt every scan: its pages may have changed.
        self.unstable.clear();
        self.ksm_scan.seqnr = self.ksm_scan.seqnr.wrapping_add(1);
        let pool = self.frames.pool();
        self.ksm_scan.resident = pool.resident(0, pool.nr_frames())?;
        self.ksm_scan.recheck = None;
        self.ksm_scan.slot = 0;
        self.ksm_scan.cursor = 0;
        self.ksm_scan.in_scan = true;
        for slot in &mut self.slots {
            slot.waits_for_next_scan = false;
        }
        Ok(())
    }

    /// Whether frame `pfn` holds memory (is not a memfd hole). A frame the
    /// scan began with as a hole is looked at again (one mincore for it and
    /// the frames after it), so a page copied into a freed frame, or touched
    /// for the first time, since the scan began is not taken for untouched;
    /// that answer is reused for the frames after it until some mm over the
    /// pool allocates a frame.
    fn frame_holds_memory(&mut self, pfn: Pfn) -> Result<bool, KsmError> {
        if self.ksm_scan.resident.get(pfn as usize).copied().unwrap_or(false) {
            return Ok(true);
        }
        let allocated = self.frames.stats().frames_allocated;
        if let Some(r) = self.ksm_scan.recheck {
            if r.allocated == allocated && (r.start..r.end).contains(&pfn) {
                return Ok(false);
            }
        }
        let pool = self.frames.pool();
        let end = (pfn + RESIDENT_WINDOW).min(pool.nr_frames());
        let now = pool.resident(pfn, end - pfn)?;
        for (i, &r) in now.iter().enumerate() {
            if let Some(known) = self.ksm_scan.resident.get_mut(pfn as usize + i) {
                *known |= r;
            }
        }
        self.ksm_scan.recheck = Some(Recheck { start: pfn, end, allocated });
        Ok(now.first().copied().unwrap_or(false))
    }

    /// `scan_get_next_rmap_item`: the next page to look at in this scan, mm
    /// by mm along the list (`ksm_mm_head`), and its pte, a full scan
    /// starting first if none is under way; None at the end of the scan,
    /// which it counts (`full_scans`). A page with no anonymous page
    /// (`folio_walk_start` finds none: never touched, a memfd hole; or
    /// mapping the zero page) is passed and loses its rmap item, as
    /// `get_next_rmap_item` frees those it passes. An mm that has exited
    /// (`ksm_test_exit`) loses every rmap item and is passed (it stays on
    /// the list until [`Ksm::ksm_exit`]); one entered during this scan is
    /// passed too. Smart scan may skip a page. None of these count as
    /// looked at. Leaves `mms` holding the returned page's mm.
    fn scan_get_next_rmap_item(&mut self, mms: &mut MmLock<'_>) -> Result<Option<(RmapId, Pte)>, KsmError> {
        if self.slots.is_empty() {
            return Ok(None);
        }
        if !self.ksm_scan.in_scan {
            self.start_full_scan()?;
        }
        while let Some(slot) = self.slots.get(self.ksm_scan.slot) {
            let (pos, cursor) = (self.ksm_scan.slot, self.ksm_scan.cursor);
            let (id, gfn) = (slot.base + cursor as u32, slot.first_gfn + cursor as u64);
            let passed = slot.waits_for_next_scan || cursor >= slot.rmap.len();
            let h = mms.mm(pos);
            if passed || h.is_exited() {
                if h.is_exited() {
                    self.free_slot_rmap_items(pos);
                }
                self.ksm_scan.slot += 1;
                self.ksm_scan.cursor = 0;
                continue;
            }
            self.ksm_scan.cursor += 1;
            let pte = h.pte(gfn)?;
            if pte.pfn == self.zero_pfn || !self.frame_holds_memory(pte.pfn)? {
                self.free_rmap_item(id);
                continue;
            }
            self.get_next_rmap_item(id);
            if self.should_skip_rmap_item(id, self.frames.frame(pte.pfn).ksm) {
                self.remove_rmap_item_from_tree(id);
                continue;
            }
            return Ok(Some((id, pte)));
        }
        self.ksm_scan.in_scan = false;
        self.ksm_scan.slot = 0;
        self.ksm_scan.cursor = 0;
        self.stats.full_scans += 1;
        Ok(None)
    }

    /// `cmp_and_merge_page` for the page of rmap item `id`, which maps
    /// `pte.pfn`; `mms` holds its mm.
    fn cmp_and_merge_page(&mut self, mms: &mut MmLock<'_>, id: RmapId, pte: Pte) -> Result<(), KsmError> {
        if let Some(node) = self.stable.page_stable_node(self.frames.frame(pte.pfn), pte.pfn) {
            let item = *self.item(id);
            if item.state == RmapState::Stable && item.node == node {
                return Ok(()); // still maps the KSM page it merged with
            }
            // A KSM page this rmap item is not listed on ("ksm page
            // forked"): `stable_tree_search` finds the page's own KSM page
            // at once, and the page joins it without a write protection,
            // past max_page_sharing if need be (max_page_sharing_bypass).
            self.remove_rmap_item_from_tree(id);
            if self.try_to_merge_with_ksm_page(mms, id, node)? {
                self.stable_tree_append(id, node);
            }
            return Ok(());
        }
        self.remove_rmap_item_from_tree(id);
        // A page whose content changed since the last scan is changing too
        // fast to be worth a search in either tree (Linux 6.11 moved this
        // test before the stable tree search).
        let Some(sum) = frame_checksum(self.frames.pool(), pte.pfn) else { return Ok(()) };
        let (slot, idx) = self.slot_mut(id);
        if slot.rmap[idx].oldchecksum != sum {
            slot.rmap[idx].oldchecksum = sum;
            self.checksum_updates += 1;
            return Ok(());
        }
        if self.try_to_merge_with_zero_page(mms, id, sum)? {
            return Ok(());
        }
        // The trees judge one copy of the page (crate docs), taken now: after
        // a failed zero-page merge, what the page (write-protected on the
        // same frame) holds from then on.
        if !read_page(self.frames.pool(), pte.pfn, &mut self.buf) {
            return Ok(());
        }
        // Is there a KSM page with this content already, in any mm? The
        // visit ends here whether or not the merge succeeded: if it failed,
        // the page changed after it was read.
        if let Some(node) = self.stable_tree_search() {
            if self.try_to_merge_with_ksm_page(mms, id, node)? {
                self.stable_tree_append(id, node);
            }
            return Ok(());
        }
        // A pair merged from the unstable tree becomes a new KSM page.
        if let Some((tree_node, tree_id)) = self.unstable_tree_search_insert(mms, id) {
            if let Some(kpfn) = self.try_to_merge_two_pages(mms, id, tree_id)? {
                self.stats.merges += 2;
                self.unstable.erase(tree_node);
                let (slot, idx) = self.slot_mut(tree_id);
                slot.rmap[idx].state = RmapState::NoTree;
                slot.rmap[idx].node = NIL;
                let node = self.stable_tree_insert(kpfn);
                // The pin `try_to_merge_two_pages` took: the frame is a
                // tagged KSM page now, which no write reuses in place.
                self.frames.put_page(kpfn)?;
                self.stable_tree_append(tree_id, node);
                self.stable_tree_append(id, node);
            }
        }
        Ok(())
    }

    /// Smart scan (`should_skip_rmap_item`): pages that keep not merging are
    /// skipped for 1, 2, 4, then 8 scans. The caller removes a skipped page
    /// from its tree, as Linux does.
    fn should_skip_rmap_item(&mut self, id: RmapId, is_ksm: bool) -> bool {
        if !self.knobs.smart_scan || is_ksm || self.ksm_scan.in_full_pass {
            return false;
        }
        let (slot, idx) = self.slot_mut(id);
        let item = &mut slot.rmap[idx];
        let age = item.age;
        item.age = item.age.saturating_add(1);
        if age < 3 {
            return false;
        }
        if item.remaining_skips == 0 {
            item.remaining_skips = skip_age(age);
            return false;
        }
        item.remaining_skips -= 1;
        self.stats.pages_skipped += 1;
        true
    }
}
