//! The scanner, after mm/ksm.c: `ksm_do_scan` walks guest pages in order,
//! `cmp_and_merge_page` looks each one up in the stable tree, then (if its
//! checksum held still since the last scan) in the unstable tree, and
//! merges through `try_to_merge_one_page`: `write_protect_page`, a full
//! comparison, `replace_page`. Every pte change goes through the primary
//! MMU's notifier, so the secondary MMU follows.
//!
//! Deliberate differences from mm/ksm.c:
//! * one "mm" and one "vma": rmap items sit in an array indexed by guest
//!   page, not on per-mm lists; an rmap item exists once its page has been
//!   seen holding memory (a never-touched page is a memfd hole, Linux's
//!   "no pte"), checked with one mincore per full scan;
//! * stable and unstable trees are treaps ([`crate::tree`]), not rbtrees;
//! * a stable node tags its KSM frame with its id (`ksm_owner`), the
//!   analog of `page->mapping`; `get_ksm_page` is that tag check;
//! * when the second half of `try_to_merge_two_pages` fails, the page that
//!   was to become the KSM page is left write-protected but not KSM (a
//!   later write reuses it in place) instead of going through `break_cow`;
//! * a page mapping the zero page keeps its rmap item (state ZERO) until the
//!   scanner finds it no longer does, where Linux frees that rmap item at
//!   the next scan (a zero-page pte maps no anonymous page): so `rmap_items`
//!   counts such pages, and `pages_volatile` also subtracts `ksm_zero_pages`
//!   from Linux's `rmap_items - pages_shared - pages_sharing -
//!   pages_unshared` (`ksm_zero_pages` itself is Linux's: the ptes mapping
//!   the zero page now, lowered at once by a copy-on-write break);
//! * `pages_to_scan` = 0 is refused ([`KsmKnobs::check`]); Linux accepts it.

use std::cell::Cell;
use std::cmp::Ordering;
use std::sync::Mutex;
use std::time::Instant;

use shadow_mmu::{lock, FramePoolError, Gfn, Pfn, PrimaryMmu, PrimaryMmuError, PAGE_SIZE};

use crate::page::{checksum, cmp_with_frame, frames_identical, read_page, PageBuf};
use crate::tree::{ContentTree, Search};

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
        // Linux accepts 0: ksmd then wakes every sleep_millisecs and scans
        // nothing. Refused here on purpose: this check is also the command
        // line's (`--pages-to-scan 0` is refused, tests/bad_input.rs), and a
        // run = 1 that never scans is a mistake, not an experiment.
        if k.pages_to_scan == 0 {
            return bad("pages_to_scan", k.pages_to_scan, "at least 1");
        }
        if k.max_page_sharing < 2 {
            return bad("max_page_sharing", k.max_page_sharing, "at least 2");
        }
        Ok(())
    }
}

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
    #[error("cannot inspect guest memory: {0}")]
    Pool(#[from] FramePoolError),
    /// ksmd panicked (a bug); what it was changing may be half done.
    #[error("ksmd panicked: {0}")]
    Panicked(String),
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
    /// Pages changing too fast to be in a tree.
    pub pages_volatile: u64,
    /// Completed full scans.
    pub full_scans: u64,
    /// Pages looked at.
    pub pages_scanned: u64,
    /// Pages smart scan skipped.
    pub pages_skipped: u64,
    /// Pages mapping the zero page now (use_zero_pages); a copy-on-write
    /// break lowers it at once, as in Linux.
    pub ksm_zero_pages: u64,
    /// Stable entries that hold more than one KSM page.
    pub stable_node_chains: u64,
    /// KSM pages inside such chains.
    pub stable_node_dups: u64,
    /// As Linux computes it: the bytes saved,
    /// `(pages_sharing + ksm_zero_pages) * PAGE_SIZE`, minus
    /// `rmap_items * KSM_RMAP_ITEM_SIZE` (may be negative). The rest of the
    /// metadata is in `metadata_bytes` only.
    pub general_profit: i64,
    /// Bytes the frame pool's memfd shrank by while the scanner ran (measured).
    pub bytes_returned: u64,
    /// The memfd's allocated bytes now.
    pub memfd_resident_bytes: u64,
    /// Bytes of the deduplicator's own metadata.
    pub metadata_bytes: u64,
    /// Rmap items (pages seen holding memory).
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

const ABSENT: u8 = 0;
const NONE: u8 = 1;
const UNSTABLE: u8 = 2;
const STABLE: u8 = 3;
const ZERO: u8 = 4;
const NIL: u32 = u32::MAX;
const ZERO_OWNER: u32 = u32::MAX;
const MAX_PASS_SCANS: u32 = 8;

/// `sizeof(struct ksm_rmap_item)` here, in bytes: what one rmap item costs
/// in `general_profit`.
pub const KSM_RMAP_ITEM_SIZE: u64 = std::mem::size_of::<RmapItem>() as u64;

/// `struct ksm_rmap_item`, 12 bytes: the page is implied by the index.
#[derive(Debug, Clone, Copy)]
struct RmapItem {
    oldchecksum: u32,
    /// UNSTABLE: unstable tree node; STABLE: stable node.
    node: u32,
    state: u8,
    /// Low bits of the scan that put it in the unstable tree.
    seqnr: u8,
    /// Smart scan: scans that looked at the page while it was not a KSM
    /// page, since the rmap item was created (saturating). As in Linux, a
    /// merge does not reset it.
    age: u8,
    /// Smart scan: scans still to skip.
    remaining_skips: u8,
}

impl Default for RmapItem {
    fn default() -> Self {
        Self { oldchecksum: 0, node: NIL, state: ABSENT, seqnr: 0, age: 0, remaining_skips: 0 }
    }
}

/// `struct ksm_stable_node`: one KSM page and the pages mapping it.
#[derive(Debug, Clone)]
struct StableNode {
    kpfn: Pfn,
    entry: u32,
    sharers: Vec<u32>,
}

/// A stable tree entry: one KSM page, or a chain of duplicates of the same
/// content once `max_page_sharing` was reached (`stable_node_chain`).
#[derive(Debug, Clone, Default)]
struct StableEntry {
    tree_node: u32,
    dups: Vec<u32>,
}

fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: clock_gettime writes one timespec we own.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64)
}

fn skip_age(age: u8) -> u8 {
    match age {
        0..=3 => 1,
        4..=5 => 2,
        6..=8 => 4,
        _ => 8,
    }
}

/// The deduplicator of one guest.
#[derive(Debug)]
pub struct Ksm {
    knobs: KsmKnobs,
    first_gfn: Gfn,
    rmap: Vec<RmapItem>,
    unstable: ContentTree,
    stable: ContentTree,
    entries: Vec<StableEntry>,
    free_entries: Vec<u32>,
    nodes: Vec<StableNode>,
    free_nodes: Vec<u32>,
    zero_pfn: Pfn,
    zero_checksum: u32,
    cursor: usize,
    seqnr: u8,
    resident: Vec<bool>,
    checksum_updates: u64,
    /// A synchronous pass is running: smart scan skips nothing.
    in_full_pass: bool,
    /// Rmap items that left a KSM page (copy-on-write or a stale node).
    departures: u64,
    stats: KsmStats,
    buf: Box<PageBuf>,
}

impl Ksm {
    /// A deduplicator over every guest page of `host`. Takes one free frame
    /// as the zero page (`ZERO_PAGE(0)`) for use_zero_pages.
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
            stable: ContentTree::new(),
            entries: Vec::new(),
            free_entries: Vec::new(),
            nodes: Vec::new(),
            free_nodes: Vec::new(),
            zero_pfn,
            zero_checksum: checksum(&zero),
            cursor: 0,
            seqnr: 0,
            resident: Vec::new(),
            checksum_updates: 0,
            in_full_pass: false,
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

    /// The statistics now (levels computed, counters since creation).
    pub fn stats(&self, host: &PrimaryMmu) -> KsmStats {
        let mut s = self.stats;
        s.pages_unshared = self.unstable_items();
        // Only merges map the zero page, so its mapcount is Linux's
        // ksm_zero_pages: a copy-on-write break lowers it at once.
        s.ksm_zero_pages = u64::from(host.frame(self.zero_pfn).mapcount);
        // Pages mapping the zero page keep their rmap item here (see the
        // module docs), so they are not volatile either.
        let in_trees = s.pages_shared + s.pages_sharing + s.pages_unshared + s.ksm_zero_pages;
        s.pages_volatile = s.rmap_items.saturating_sub(in_trees);
        let chains = self.entries.iter().filter(|e| e.dups.len() > 1);
        s.stable_node_chains = chains.clone().count() as u64;
        s.stable_node_dups = chains.map(|e| e.dups.len() as u64).sum();
        s.metadata_bytes = self.metadata_bytes() as u64;
        let saved = (s.pages_sharing + s.ksm_zero_pages) * PAGE_SIZE;
        s.general_profit = saved as i64 - (s.rmap_items * KSM_RMAP_ITEM_SIZE) as i64;
        s.memfd_resident_bytes = host.pool().resident_bytes().unwrap_or(0);
        s
    }

    /// The statistics with the sysfs names, for reports.
    pub fn counters(&self, host: &PrimaryMmu) -> Vec<(&'static str, u64)> {
        let s = self.stats(host);
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
            // A level; clamped at zero for the unsigned report (the signed
            // value is in KsmStats).
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

    fn unstable_items(&self) -> u64 {
        self.rmap.iter().filter(|r| r.state == UNSTABLE).count() as u64
    }

    /// Bytes of metadata held: rmap items, trees, stable nodes.
    pub fn metadata_bytes(&self) -> usize {
        let rmap = self.rmap.capacity() * std::mem::size_of::<RmapItem>();
        let nodes: usize = self.nodes.iter().map(|n| n.sharers.capacity() * 4).sum::<usize>()
            + self.nodes.capacity() * std::mem::size_of::<StableNode>();
        let entries: usize = self.entries.iter().map(|e| e.dups.capacity() * 4).sum::<usize>()
            + self.entries.capacity() * std::mem::size_of::<StableEntry>();
        rmap + nodes + entries + self.unstable.metadata_bytes() + self.stable.metadata_bytes()
    }

    fn gfn(&self, idx: usize) -> Gfn {
        self.first_gfn + idx as u64
    }

    /// `get_ksm_page`: whether stable node `id` still owns its KSM frame.
    fn node_valid(&self, id: u32, host: &PrimaryMmu) -> bool {
        let f = host.frame(self.nodes[id as usize].kpfn);
        f.refcount > 0 && f.ksm && f.ksm_owner == id + 1
    }

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
            if self.cursor == 0 {
                self.start_full_scan(host)?;
            }
            if let Err(e) = self.cmp_and_merge_page(host, self.cursor) {
                result = Err(e);
                break;
            }
            self.cursor += 1;
            if self.cursor == self.rmap.len() {
                self.cursor = 0;
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
    /// Smart scan skips nothing during a pass: a skipped page would change
    /// nothing, and the pass could end before it was compared at all.
    /// Skipping is a throughput heuristic for ksmd; a pass the guest waits
    /// for promises every page that held still its chance.
    pub fn full_pass(&mut self, host: &Mutex<PrimaryMmu>) -> Result<u32, KsmError> {
        self.in_full_pass = true;
        let result = self.full_pass_scans(host);
        self.in_full_pass = false;
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
        if self.cursor != 0 {
            let left = (self.rmap.len() - self.cursor) as u64;
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

    fn start_full_scan(&mut self, host: &Mutex<PrimaryMmu>) -> Result<(), KsmError> {
        // The unstable tree is rebuilt every scan: its pages may have changed.
        self.unstable.clear();
        self.seqnr = self.seqnr.wrapping_add(1);
        let h = lock(host);
        self.resident = h.pool().resident(0, h.pool().nr_frames())?;
        Ok(())
    }

    /// `cmp_and_merge_page` for guest page `idx`.
    fn cmp_and_merge_page(&mut self, host: &Mutex<PrimaryMmu>, idx: usize) -> Result<(), KsmError> {
        let gfn = self.gfn(idx);
        let mut h = lock(host);
        let pte = h.pte(gfn)?;
        let item = self.rmap[idx];
        match item.state {
            STABLE if self.node_valid(item.node, &h) && self.nodes[item.node as usize].kpfn == pte.pfn => return Ok(()),
            ZERO if pte.pfn == self.zero_pfn => return Ok(()),
            STABLE | ZERO | UNSTABLE => self.remove_rmap_item_from_tree(idx, &mut h),
            _ => {}
        }
        if !self.resident.get(pte.pfn as usize).copied().unwrap_or(false) {
            return Ok(()); // never touched: Linux has no pte here
        }
        if self.rmap[idx].state == ABSENT {
            self.rmap[idx].state = NONE;
            self.stats.rmap_items += 1;
        }
        if self.should_skip_rmap_item(idx, h.frame(pte.pfn).ksm) {
            return Ok(());
        }
        self.stats.pages_scanned += 1;
        if !read_page(h.pool(), pte.pfn, &mut self.buf) {
            return Ok(());
        }

        // Is there a KSM page with this content already? As in mm/ksm.c the
        // visit ends here whether or not the merge succeeded: if it failed,
        // the page changed after `self.buf` was read, so neither its
        // checksum nor the unstable tree may be judged by that copy.
        if let Some(node) = self.stable_tree_search(&mut h) {
            let kpfn = self.nodes[node as usize].kpfn;
            if self.try_to_merge_one_page(&mut h, gfn, Some(kpfn))? {
                self.stats.merges += 1;
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

        if self.knobs.use_zero_pages && sum == self.zero_checksum && self.buf.iter().all(|&b| b == 0) {
            if self.try_to_merge_one_page(&mut h, gfn, Some(self.zero_pfn))? {
                self.stats.merges += 1;
                self.rmap[idx].state = ZERO;
            }
            return Ok(());
        }

        if let Some((tree_node, tree_idx)) = self.unstable_tree_search_insert(idx, &h) {
            if let Some(kpfn) = self.try_to_merge_two_pages(&mut h, idx, tree_idx)? {
                self.stats.merges += 2;
                self.unstable.erase(tree_node);
                self.rmap[tree_idx].state = NONE;
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
        if !self.knobs.smart_scan || is_ksm || self.in_full_pass {
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

    /// `remove_rmap_item_from_tree`.
    fn remove_rmap_item_from_tree(&mut self, idx: usize, host: &mut PrimaryMmu) {
        let item = self.rmap[idx];
        match item.state {
            STABLE => {
                self.departures += 1;
                let node = &mut self.nodes[item.node as usize];
                if let Some(pos) = node.sharers.iter().position(|&s| s as usize == idx) {
                    node.sharers.swap_remove(pos);
                }
                if node.sharers.is_empty() {
                    self.stats.pages_shared -= 1;
                    self.stable_node_dup_del(item.node, host);
                } else {
                    self.stats.pages_sharing -= 1;
                }
            }
            UNSTABLE if item.seqnr == self.seqnr => self.unstable.erase(item.node),
            _ => {}
        }
        let r = &mut self.rmap[idx];
        r.state = if r.state == ABSENT { ABSENT } else { NONE };
        r.node = NIL;
    }

    /// `stable_node_dup_del` then `free_stable_node`, for stable node `id`
    /// with no sharers left (its last one left, or it went stale). Beyond
    /// those two: when `id` was its entry's last KSM page, the entry leaves
    /// the tree too (`free_stable_node_chain`, or the rb_erase of a plain
    /// node); and if `id` still owns its frame, the frame's KSM tag is
    /// cleared (`folio_set_stable_node(folio, NULL)`, as `remove_stable_node`
    /// does; Linux otherwise leaves that to the freeing of the page).
    fn stable_node_dup_del(&mut self, id: u32, host: &mut PrimaryMmu) {
        if self.node_valid(id, host) {
            let kpfn = self.nodes[id as usize].kpfn;
            host.set_ksm_owner(kpfn, false, 0);
        }
        let entry = self.nodes[id as usize].entry;
        let e = &mut self.entries[entry as usize];
        e.dups.retain(|&d| d != id);
        if e.dups.is_empty() {
            let tree_node = e.tree_node;
            self.stable.erase(tree_node);
            self.free_entries.push(entry);
        }
        self.nodes[id as usize] = StableNode { kpfn: 0, entry: NIL, sharers: Vec::new() };
        self.free_nodes.push(id);
    }

    /// `remove_node_from_stable_tree`: a stale node (its KSM frame was freed)
    /// lets go of every rmap item still pointing at it.
    fn remove_node_from_stable_tree(&mut self, id: u32, host: &mut PrimaryMmu) {
        let sharers = std::mem::take(&mut self.nodes[id as usize].sharers);
        if !sharers.is_empty() {
            self.stats.pages_shared -= 1;
            self.stats.pages_sharing -= sharers.len() as u64 - 1;
        }
        for s in sharers {
            self.rmap[s as usize].state = NONE;
            self.rmap[s as usize].node = NIL;
        }
        self.stable_node_dup_del(id, host);
    }

    /// Searches the stable tree for the content in `self.buf`. Stale nodes
    /// met on the way (their KSM frame was freed, maybe reused with other
    /// content: `get_ksm_page` fails) are removed and the search starts
    /// again, so a search never orders by a frame that left the tree.
    fn stable_search_pruned(&mut self, host: &mut PrimaryMmu) -> Search {
        loop {
            let stale = Cell::new(None);
            let search = {
                let (nodes, entries, buf) = (&self.nodes, &self.entries, &self.buf);
                let h: &PrimaryMmu = host;
                self.stable.search(|entry| {
                    // Once a stale node is met the search is thrown away, so
                    // the rest of it reads no frame. A stale node's frame is
                    // never read: it may be free and punched, and reading a
                    // hole would make the host allocate it again.
                    if stale.get().is_some() {
                        return Ordering::Less;
                    }
                    let e = &entries[entry as usize];
                    let Some(&first) = e.dups.first() else { return Ordering::Less };
                    let node = &nodes[first as usize];
                    let f = h.frame(node.kpfn);
                    if !(f.refcount > 0 && f.ksm && f.ksm_owner == first + 1) {
                        stale.set(Some(first));
                        return Ordering::Less;
                    }
                    cmp_with_frame(h.pool(), buf, node.kpfn)
                })
            };
            match stale.get() {
                Some(id) => self.remove_node_from_stable_tree(id, host),
                None => return search,
            }
        }
    }

    /// `stable_tree_search`: a KSM page with the content in `self.buf` that
    /// has room for one more sharer.
    fn stable_tree_search(&mut self, host: &mut PrimaryMmu) -> Option<u32> {
        let Search::Found(tree_node) = self.stable_search_pruned(host) else { return None };
        let entry = self.stable.item(tree_node);
        let max = self.knobs.max_page_sharing as usize;
        let dups = self.entries[entry as usize].dups.clone();
        for id in dups {
            if !self.node_valid(id, host) {
                self.remove_node_from_stable_tree(id, host);
                continue;
            }
            if self.nodes[id as usize].sharers.len() < max {
                return Some(id);
            }
        }
        None
    }

    /// `stable_tree_insert`: makes frame `kpfn` a KSM page: a new entry, or
    /// one more duplicate in the entry of that content.
    fn stable_tree_insert(&mut self, host: &mut PrimaryMmu, kpfn: Pfn) -> u32 {
        // The frame is write-protected now: key the tree by what it holds,
        // not by the copy read before write protection (the guest may have
        // written in between).
        read_page(host.pool(), kpfn, &mut self.buf);
        let id = match self.free_nodes.pop() {
            Some(id) => id,
            None => {
                self.nodes.push(StableNode { kpfn: 0, entry: NIL, sharers: Vec::new() });
                (self.nodes.len() - 1) as u32
            }
        };
        // Search (pruning stale nodes) before the new node is tagged, so the
        // node id taken is not mistaken for a stale one.
        let search = self.stable_search_pruned(host);
        host.set_ksm_owner(kpfn, true, id + 1);
        let entry = match search {
            Search::Found(tree_node) => self.stable.item(tree_node),
            Search::Vacant(at) => {
                let entry = match self.free_entries.pop() {
                    Some(e) => e,
                    None => {
                        self.entries.push(StableEntry::default());
                        (self.entries.len() - 1) as u32
                    }
                };
                let tree_node = self.stable.insert(at, entry);
                self.entries[entry as usize] = StableEntry { tree_node, dups: Vec::new() };
                entry
            }
        };
        self.entries[entry as usize].dups.push(id);
        self.nodes[id as usize] = StableNode { kpfn, entry, sharers: Vec::new() };
        id
    }

    /// `stable_tree_append`: page `idx` now maps stable node `id`'s KSM page.
    fn stable_tree_append(&mut self, idx: usize, id: u32) {
        let node = &mut self.nodes[id as usize];
        if node.sharers.is_empty() {
            self.stats.pages_shared += 1;
        } else {
            self.stats.pages_sharing += 1;
        }
        node.sharers.push(idx as u32);
        let r = &mut self.rmap[idx];
        r.state = STABLE;
        r.node = id;
    }

    /// `unstable_tree_search_insert`: an unstable page with the content in
    /// `self.buf`, or `idx` goes into the tree.
    fn unstable_tree_search_insert(&mut self, idx: usize, host: &PrimaryMmu) -> Option<(u32, usize)> {
        let first = self.first_gfn;
        let search = self.unstable.search(|tree_idx| match host.pte(first + u64::from(tree_idx)) {
            Ok(pte) => cmp_with_frame(host.pool(), &self.buf, pte.pfn),
            Err(_) => Ordering::Less,
        });
        match search {
            Search::Found(node) => {
                let tree_idx = self.unstable.item(node) as usize;
                (tree_idx != idx).then_some((node, tree_idx))
            }
            Search::Vacant(at) => {
                let node = self.unstable.insert(at, idx as u32);
                let seqnr = self.seqnr;
                let r = &mut self.rmap[idx];
                r.state = UNSTABLE;
                r.node = node;
                r.seqnr = seqnr;
                None
            }
        }
    }

    /// `try_to_merge_one_page`: write-protects `gfn`, then either it becomes
    /// a KSM page itself (`kpfn` None) or, if it still equals `kpfn`, its pte
    /// is replaced by one mapping `kpfn`. Returns whether it merged.
    fn try_to_merge_one_page(&self, host: &mut PrimaryMmu, gfn: Gfn, kpfn: Option<Pfn>) -> Result<bool, KsmError> {
        // mm/ksm.c also refuses a page with extra references (pinned for
        // I/O); nothing pins guest frames here.
        let pte = host.write_protect_page(gfn)?;
        let merged = match kpfn {
            None => true,
            Some(k) if k == pte.pfn => true,
            // Compare again: the page may have changed before it was
            // write-protected; from now on it cannot.
            Some(k) if frames_identical(host.pool(), pte.pfn, k) => {
                host.replace_page(gfn, k)?;
                true
            }
            Some(_) => false,
        };
        Ok(merged)
    }

    /// `try_to_merge_two_pages`: page `idx` becomes the KSM page and the
    /// unstable tree's page `tree_idx` is merged into it.
    fn try_to_merge_two_pages(
        &mut self,
        host: &mut PrimaryMmu,
        idx: usize,
        tree_idx: usize,
    ) -> Result<Option<Pfn>, KsmError> {
        let gfn = self.gfn(idx);
        if !self.try_to_merge_one_page(host, gfn, None)? {
            return Ok(None);
        }
        let kpfn = host.pte(gfn)?.pfn;
        let merged = self.try_to_merge_one_page(host, self.gfn(tree_idx), Some(kpfn))?;
        Ok(merged.then_some(kpfn))
    }

    /// Unmerges everything (run = 2, port 0x501 value 4): every page mapping
    /// a KSM page or the zero page gets a private copy (`break_cow`), and
    /// both trees are emptied. Afterwards no two guest pages share a frame.
    pub fn unmerge_all(&mut self, host: &Mutex<PrimaryMmu>) -> Result<(), KsmError> {
        let mut h = lock(host);
        for idx in 0..self.rmap.len() {
            let state = self.rmap[idx].state;
            if state == STABLE || state == ZERO {
                // break_cow: a write fault without the write.
                h.get_user_page(self.gfn(idx), true)?;
            }
            self.remove_rmap_item_from_tree(idx, &mut h);
        }
        self.unstable.clear();
        self.cursor = 0;
        h.flush_holes()?;
        Ok(())
    }
}
