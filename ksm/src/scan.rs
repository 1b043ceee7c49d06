//! The scanner, after mm/ksm.c: `ksm_do_scan` walks guest pages in order
//! (the cursor and sequence number are `struct ksm_scan`'s),
//! `scan_get_next_rmap_item` decides which page is looked at, and
//! `cmp_and_merge_page` looks it up in the stable tree, then (if its
//! checksum held still since the last scan) in the unstable tree, and
//! merges. Smart scan (`should_skip_rmap_item`) skips pages that keep not
//! merging. `full_pass`, the synchronous pass the guest asks for, is this
//! prototype's own.

use std::sync::Mutex;
use std::time::Instant;

use shadow_mmu::{lock, Pfn, PrimaryMmu};

use crate::ksm::{Ksm, KsmError};
use crate::page::{checksum, read_page};
use crate::rmap::{RmapState, NIL};

/// The most full scans one `full_pass` does.
const MAX_PASS_SCANS: u32 = 8;

/// `struct ksm_scan`: where the scanner is.
#[derive(Debug, Default)]
pub(crate) struct KsmScan {
    /// The next guest page to look at (`address`); 0 starts a full scan.
    pub(crate) cursor: usize,
    /// Low bits of the full scans started (`seqnr`).
    pub(crate) seqnr: u8,
    /// Which frames held memory at the start of this full scan (one
    /// mincore per full scan, see the crate docs).
    pub(crate) resident: Vec<bool>,
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
    /// `ksm_do_scan`: scans `pages` pages from where the last call stopped.
    pub fn ksm_do_scan(&mut self, host: &Mutex<PrimaryMmu>, pages: u64) -> Result<(), KsmError> {
        let t = Instant::now();
        let cpu = thread_cpu_ns();
        let before = lock(host).pool().resident_bytes().unwrap_or(0);
        let mut result = Ok(());
        for _ in 0..pages {
            if self.rmap.is_empty() {
                break;
            }
            if self.ksm_scan.cursor == 0 {
                self.start_full_scan(host)?;
            }
            if let Err(e) = self.cmp_and_merge_page(host, self.ksm_scan.cursor) {
                result = Err(e);
                break;
            }
            self.ksm_scan.cursor += 1;
            if self.ksm_scan.cursor == self.rmap.len() {
                self.ksm_scan.cursor = 0;
                self.stats.full_scans += 1;
            }
        }
        let after = {
            let mut h = lock(host);
            if let Err(e) = h.flush_holes() {
                result = result.and(Err(e.into()));
            }
            h.pool().resident_bytes().unwrap_or(before)
        };
        self.stats.bytes_returned += before.saturating_sub(after);
        self.stats.scan_ns += u64::try_from(t.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.stats.cpu_ns += thread_cpu_ns().saturating_sub(cpu);
        result
    }

    /// One synchronous full deduplication pass (port 0x501, value 1): full
    /// scans until one of them changed nothing (no checksum recorded, no
    /// merge, no page leaving a KSM page), a fixpoint: every page that held
    /// still has had its chance to merge with everything it can merge with
    /// (a page is compared in the unstable tree only once its checksum held
    /// for a scan, and room on a full KSM page can appear late in a scan).
    /// A quiet guest takes three scans: checksums, merges, the quiet one.
    /// At most eight scans. Returns the scans done.
    ///
    /// Smart scan skips nothing during a pass (crate docs, "Deliberate
    /// differences from mm/ksm.c").
    pub fn full_pass(&mut self, host: &Mutex<PrimaryMmu>) -> Result<u32, KsmError> {
        self.ksm_scan.in_full_pass = true;
        let result = self.full_pass_scans(host);
        self.ksm_scan.in_full_pass = false;
        result
    }

    /// Events that change what a later scan would find.
    fn changes(&self) -> u64 {
        self.checksum_updates + self.stats.merges + self.departures
    }

    fn full_pass_scans(&mut self, host: &Mutex<PrimaryMmu>) -> Result<u32, KsmError> {
        let mut scans = 0;
        // A scan ksmd left half done is finished first; it does not count as
        // the quiet scan that ends the pass, which must see every page.
        if self.ksm_scan.cursor != 0 {
            let left = (self.rmap.len() - self.ksm_scan.cursor) as u64;
            self.ksm_do_scan(host, left)?;
            scans += 1;
        }
        loop {
            let before = self.changes();
            self.ksm_do_scan(host, self.rmap.len() as u64)?;
            scans += 1;
            if self.changes() == before || scans >= MAX_PASS_SCANS {
                return Ok(scans);
            }
        }
    }

    /// The start of a full scan, as `scan_get_next_rmap_item` does it at
    /// the head of the mm list: a new unstable tree, and which frames hold
    /// memory now.
    fn start_full_scan(&mut self, host: &Mutex<PrimaryMmu>) -> Result<(), KsmError> {
        // The unstable tree is rebuilt every scan: its pages may have changed.
        self.unstable.clear();
        self.ksm_scan.seqnr = self.ksm_scan.seqnr.wrapping_add(1);
        let h = lock(host);
        self.ksm_scan.resident = h.pool().resident(0, h.pool().nr_frames())?;
        Ok(())
    }

    /// `scan_get_next_rmap_item` for guest page `idx`, and the top of
    /// `cmp_and_merge_page`: the frame to compare, or None when the page is
    /// passed. A page still mapping its KSM page or the zero page is passed
    /// without a look; one that left it, or is in the unstable tree, leaves
    /// its tree. A page that never held memory has no rmap item (Linux: no
    /// pte). Smart scan may skip it.
    fn scan_get_next_rmap_item(&mut self, h: &mut PrimaryMmu, idx: usize) -> Result<Option<Pfn>, KsmError> {
        let pte = h.pte(self.gfn(idx))?;
        let item = self.rmap[idx];
        let still_merged = match item.state {
            RmapState::Stable => self.stable.node_valid(item.node, h) && self.stable.kpfn(item.node) == pte.pfn,
            RmapState::Zero => pte.pfn == self.zero_pfn,
            RmapState::Absent | RmapState::NoTree | RmapState::Unstable => false,
        };
        if still_merged {
            return Ok(None);
        }
        if matches!(item.state, RmapState::Stable | RmapState::Zero | RmapState::Unstable) {
            self.remove_rmap_item_from_tree(idx, h);
        }
        if !self.ksm_scan.resident.get(pte.pfn as usize).copied().unwrap_or(false) {
            return Ok(None); // never touched: Linux has no pte here
        }
        if self.rmap[idx].state == RmapState::Absent {
            self.rmap[idx].state = RmapState::NoTree;
            self.stats.rmap_items += 1;
        }
        if self.should_skip_rmap_item(idx, h.frame(pte.pfn).ksm) {
            return Ok(None);
        }
        Ok(Some(pte.pfn))
    }

    /// `cmp_and_merge_page` for guest page `idx`.
    fn cmp_and_merge_page(&mut self, host: &Mutex<PrimaryMmu>, idx: usize) -> Result<(), KsmError> {
        let mut h = lock(host);
        let Some(pfn) = self.scan_get_next_rmap_item(&mut h, idx)? else { return Ok(()) };
        self.stats.pages_scanned += 1;
        if !read_page(h.pool(), pfn, &mut self.buf) {
            return Ok(());
        }

        // Is there a KSM page with this content already? As in mm/ksm.c the
        // visit ends here whether or not the merge succeeded: if it failed,
        // the page changed after `self.buf` was read, so neither its
        // checksum nor the unstable tree may be judged by that copy.
        if let Some(node) = self.stable_tree_search(&mut h) {
            if self.try_to_merge_with_ksm_page(&mut h, idx, node)? {
                self.stable_tree_append(idx, node);
            }
            return Ok(());
        }

        // A page whose content changed since the last scan is too volatile
        // to be worth a place in the unstable tree this time.
        let sum = checksum(&self.buf);
        if self.rmap[idx].oldchecksum != sum {
            self.rmap[idx].oldchecksum = sum;
            self.checksum_updates += 1;
            return Ok(());
        }

        if self.try_to_merge_with_zero_page(&mut h, idx, sum)? {
            return Ok(());
        }

        // A pair merged from the unstable tree becomes a new KSM page.
        if let Some((tree_node, tree_idx)) = self.unstable_tree_search_insert(idx, &h) {
            if let Some(kpfn) = self.try_to_merge_two_pages(&mut h, idx, tree_idx)? {
                self.stats.merges += 2;
                self.unstable.erase(tree_node);
                self.rmap[tree_idx].state = RmapState::NoTree;
                self.rmap[tree_idx].node = NIL;
                let node = self.stable_tree_insert(&mut h, kpfn);
                self.stable_tree_append(tree_idx, node);
                self.stable_tree_append(idx, node);
            }
        }
        Ok(())
    }

    /// Smart scan (`should_skip_rmap_item`): pages that keep not merging are
    /// skipped for 1, 2, 4, then 8 scans.
    fn should_skip_rmap_item(&mut self, idx: usize, is_ksm: bool) -> bool {
        if !self.knobs.smart_scan || is_ksm || self.ksm_scan.in_full_pass {
            return false;
        }
        let item = &mut self.rmap[idx];
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
