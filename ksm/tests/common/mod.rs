//! Shared harness of the deduplicator's scenario tests, after Linux's KSM
//! selftests (tools/testing/selftests/mm/ksm_tests.c and
//! ksm_functional_tests.c).
//!
//! Each test builds the whole stack ([`Lab`]): a frame pool, the primary MMU
//! ([`PrimaryMmu`]), a secondary MMU (`SecondaryMmu`) over a
//! [`RecordingView`] registered on its notifier (together a [`GuestMmus`]),
//! and a [`Ksm`] over every guest page. The "guest" reaches memory only
//! through the secondary MMU, as a vCPU does ([`GuestPages`]): a write goes
//! through a present, writable EPT entry, and otherwise takes an EPT
//! violation (`handle_ept_violation`) and tries again. The EPT check and the
//! access happen under the secondary MMU's lock, which stands for the
//! atomicity of a hardware access against a TLB flush: a notifier callback
//! (taken under the same lock) either happens before the access or after it.
//!
//! Statistics are asserted exactly, with the arithmetic explained where it
//! is not obvious; the Linux test each scenario mirrors is named above it.

#![allow(dead_code, unreachable_pub)] // each test binary uses a subset

pub mod fleet;
mod write_before_protect;

#[allow(unused_imports)] // each test binary uses a subset
pub use write_before_protect::WriteBeforeProtect;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};

use ksm::{Ksm, KsmKnobs, KsmStats, MmId, KSM_RMAP_ITEM_SIZE};
use proptest::prelude::*;
use shadow_mmu::{
    lock, Gfn, GuestMmus, MmuNotifierRange, MmuNotifyEvent, Pfn, Policy, PrimaryMmu, Pte, RangeFlags, RecordingView,
    PAGE_SHIFT, PAGE_SIZE,
};

/// First guest page; the frames below it are the VMM's boot memory.
pub const FIRST_GFN: Gfn = 16;
pub const PAGE: usize = PAGE_SIZE as usize;
pub const POLICIES: [Policy; 3] = [Policy::ChangePte, Policy::RangeFlush, Policy::Legacy];
/// The fill byte of ksm_tests.c's `allocate_memory(..., '*', ...)`.
pub const STAR: u64 = 0x2a2a_2a2a_2a2a_2a2a;

/// A page whose every 64-bit word is `word`.
pub fn pattern(word: u64) -> Vec<u8> {
    word.to_le_bytes().iter().copied().cycle().take(PAGE).collect()
}

/// What a vCPU reaches, addressed by guest page and offset: guest memory
/// through the secondary MMU ([`GuestMmus::guest_write`] and
/// [`GuestMmus::guest_read`], which take an EPT violation and try again
/// when the entry does not allow the access).
pub trait GuestPages {
    /// A guest write within page `gfn` (a write fault breaks copy-on-write
    /// in the primary MMU first).
    fn write(&self, gfn: Gfn, offset: usize, data: &[u8]);

    /// A guest read within page `gfn`.
    fn read(&self, gfn: Gfn, offset: usize, buf: &mut [u8]);

    fn read_u64(&self, gfn: Gfn, offset: usize) -> u64 {
        let mut b = [0u8; 8];
        self.read(gfn, offset, &mut b);
        u64::from_le_bytes(b)
    }

    /// Fills a whole page with `word` (which also makes its frame hold
    /// memory, so that KSM scans it).
    fn fill(&self, gfn: Gfn, word: u64) {
        self.write(gfn, 0, &pattern(word));
    }
}

impl GuestPages for GuestMmus<RecordingView> {
    fn write(&self, gfn: Gfn, offset: usize, data: &[u8]) {
        self.guest_write((gfn << PAGE_SHIFT) + offset as u64, data).expect("guest write through the EPT");
    }

    fn read(&self, gfn: Gfn, offset: usize, buf: &mut [u8]) {
        self.guest_read((gfn << PAGE_SHIFT) + offset as u64, buf).expect("guest read through the EPT");
    }
}

/// The stack under test.
pub struct Lab {
    /// The frame pool and both MMUs; guest accesses through [`GuestPages`].
    pub guest: GuestMmus<RecordingView>,
    pub ksm: Arc<Mutex<Ksm>>,
    pub policy: Policy,
    pub end: Gfn,
}

impl Lab {
    /// `pages` guest pages from [`FIRST_GFN`], two spare frames (one for
    /// KSM's zero page, one so a copy-on-write break always finds a frame),
    /// a pre-faulted secondary MMU with `policy`, and a deduplicator.
    pub fn new(policy: Policy, pages: u64, knobs: KsmKnobs) -> Self {
        let end = FIRST_GFN + pages;
        let guest = GuestMmus::new_recording(policy, FIRST_GFN, end, 2).expect("frame pool");
        let ksm = Ksm::new(&guest.mm, knobs).expect("deduplicator");
        assert_eq!(lock(&guest.mm).nr_free_frames(), 1, "one spare frame left after KSM took its zero page");
        Self { guest, ksm: Arc::new(Mutex::new(ksm)), policy, end }
    }

    pub fn gfns(&self) -> std::ops::Range<Gfn> {
        FIRST_GFN..self.end
    }

    pub fn pages(&self) -> u64 {
        self.end - FIRST_GFN
    }

    pub fn host(&self) -> MutexGuard<'_, PrimaryMmu> {
        lock(&self.guest.mm)
    }

    pub fn stats(&self) -> KsmStats {
        lock(&self.ksm).stats()
    }

    pub fn full_pass(&self) -> u32 {
        lock(&self.ksm).full_pass().expect("full pass")
    }

    /// `ksm_do_scan` of `pages` pages: returns the pages looked at.
    pub fn scan(&self, pages: u64) -> u64 {
        lock(&self.ksm).ksm_do_scan(pages).expect("ksm_do_scan")
    }

    /// Scans to the end of the full scan under way, or one whole scan if
    /// none is (a batch ends at the end of a full scan).
    pub fn full_scan(&self) {
        self.scan(u64::MAX);
    }

    pub fn set_knobs(&self, f: impl FnOnce(&mut KsmKnobs)) {
        let mut ksm = lock(&self.ksm);
        let mut knobs = ksm.knobs();
        f(&mut knobs);
        ksm.set_knobs(knobs).expect("knobs in range");
    }

    /// Stands for fork's `copy_present_pte`: page `gfn` comes to map frame
    /// `pfn` (mapped elsewhere, a KSM page or the zero page) read-only,
    /// without KSM's doing; its own frame goes. Inside a CLEAR range
    /// without USE_CHANGE_PTE, so every policy zaps the old entry.
    pub fn fork_map(&self, gfn: Gfn, pfn: Pfn) {
        let mut host = self.host();
        let range = MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::BLOCKABLE);
        host.invalidate_range_start(&range);
        host.set_pte_at_notify(&range, gfn, Pte { pfn, writable: false, soft_dirty: true }).expect("map the frame");
        host.invalidate_range_end(&range);
        host.flush_holes().expect("flush_holes");
    }

    /// Stands for MADV_DONTNEED on page `gfn`: its mapping goes (an UNMAP
    /// range), and the page is a never-touched one again: a fresh frame
    /// that is a hole in the memfd (reads zero, holds no memory), writable.
    pub fn discard(&self, gfn: Gfn) {
        let mut host = self.host();
        let fresh = host.alloc_page().expect("a free frame");
        let range = MmuNotifierRange::page(gfn, MmuNotifyEvent::Unmap, RangeFlags::BLOCKABLE);
        host.invalidate_range_start(&range);
        host.set_pte_at_notify(&range, gfn, Pte { pfn: fresh, writable: true, soft_dirty: true })
            .expect("map the fresh frame");
        host.invalidate_range_end(&range);
        host.put_page(fresh).expect("put_page");
        host.flush_holes().expect("flush_holes");
        assert!(!host.pool().resident(fresh, 1).expect("mincore")[0], "a free frame is a hole");
    }

    /// ksm_functional_tests.c `range_maps_duplicates`: whether two guest
    /// pages in `gfns` map the same frame (pages that hold no memory, as
    /// pagemap's non-present ones, are left out).
    pub fn range_maps_duplicates(&self, gfns: std::ops::Range<Gfn>) -> bool {
        let host = self.host();
        let mut seen = BTreeSet::new();
        for gfn in gfns {
            let pfn = host.pte(gfn).expect("pte").pfn;
            if host.pool().resident(pfn, 1).expect("mincore")[0] && !seen.insert(pfn) {
                return true;
            }
        }
        false
    }

    pub fn unmerge_all(&self) {
        lock(&self.ksm).unmerge_all().expect("unmerge_all");
    }

    /// The one mm on the deduplicator's list: the guest's.
    pub fn mm_id(&self) -> MmId {
        let ids = lock(&self.ksm).mm_ids();
        assert_eq!(ids.len(), 1, "one guest");
        ids[0]
    }

    pub fn zero_pfn(&self) -> Pfn {
        lock(&self.ksm).zero_pfn()
    }

    pub fn resident(&self) -> u64 {
        self.guest.pool.resident_bytes().expect("memfd resident bytes")
    }

    /// The page as the primary MMU maps it now.
    pub fn page(&self, gfn: Gfn) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE];
        self.host().read_guest(gfn << PAGE_SHIFT, &mut buf).expect("read_guest");
        buf
    }

    /// Guest pages by the frame their host pte maps.
    pub fn by_frame(&self) -> BTreeMap<Pfn, Vec<Gfn>> {
        let host = self.host();
        let mut out: BTreeMap<Pfn, Vec<Gfn>> = BTreeMap::new();
        for gfn in self.gfns() {
            out.entry(host.pte(gfn).expect("pte").pfn).or_default().push(gfn);
        }
        out
    }

    pub fn assert_all_frames_distinct(&self) {
        let frames = self.by_frame();
        let shared: Vec<_> = frames.iter().filter(|(_, g)| g.len() > 1).collect();
        assert!(shared.is_empty(), "{:?}: guest pages still share frames: {shared:?}", self.policy);
    }

    /// The secondary MMU follows the primary: every present EPT entry maps
    /// the host pte's frame, is never writable where the host pte is
    /// read-only, and the view holds exactly what the table holds (once
    /// ksmd's batch of view updates, if one is open, has ended).
    pub fn check_coherent(&self) {
        let host = self.host();
        let mmu = lock(&self.guest.mmu);
        for gfn in self.gfns() {
            let pte = host.pte(gfn).expect("pte");
            let entry = mmu.ept().lookup(gfn);
            if let Some(e) = entry {
                assert_eq!(e.pfn(), pte.pfn, "{:?}: EPT entry of gfn {gfn:#x} maps a stale frame", self.policy);
                assert!(
                    pte.writable || !e.writable(),
                    "{:?}: EPT entry of gfn {gfn:#x} writable over a read-only host pte",
                    self.policy
                );
            }
            // Inside ksmd's batch the view lags the table until its end.
            if !mmu.in_batch() {
                assert_eq!(
                    mmu.view().pages.get(&gfn).copied(),
                    entry.map(|e| (e.pfn(), e.writable())),
                    "{:?}: the view of gfn {gfn:#x} differs from the EPT",
                    self.policy
                );
            }
        }
    }
}

pub fn knobs_with(f: impl FnOnce(&mut KsmKnobs)) -> KsmKnobs {
    let mut k = KsmKnobs::default();
    f(&mut k);
    k
}

/// ksm_tests.c `assert_ksm_pages_count(dupl_page_count)`: the expected
/// (pages_shared, pages_sharing) for `n` identical pages with
/// `max_page_sharing` = `m`.
pub fn linux_expected(n: u64, m: u64) -> (u64, u64) {
    if n % m == 1 || n % m == 0 {
        let shared = n / m;
        (shared, shared * (m - 1))
    } else {
        let shared = n / m + 1;
        (shared, n - shared)
    }
}

/// general_profit as mm/ksm.c computes it from the other figures.
pub fn linux_general_profit(s: &KsmStats) -> i64 {
    ((s.pages_sharing + s.ksm_zero_pages) * PAGE_SIZE) as i64 - (s.rmap_items * KSM_RMAP_ITEM_SIZE) as i64
}

/// Checks the state after a quiet pass; `max` is max_page_sharing.
///
/// * Every page holds what the guest wrote, and the secondary MMU is
///   coherent with the primary.
/// * pages_shared / pages_sharing are what the host maps: KSM frames,
///   and the pages beyond the first on each.
/// * Per content class: at most one page is left unmerged (two would
///   have met in the unstable tree), and one only if every KSM page of
///   its content is full (max_page_sharing); if no class can ever have
///   needed a second KSM page (`max` at least the number of pages), each
///   class of two or more pages is exactly one KSM page. (With a smaller
///   `max`, pages that leave a stable_node_chain can leave its dups
///   partly filled; as in mm/ksm.c, nothing moves pages between dups.)
pub fn check_quiet_state(lab: &Lab, want: impl Fn(Gfn) -> Vec<u8>, max: u64) -> Result<(), TestCaseError> {
    let s = lab.stats();
    let mut contents = BTreeMap::new();
    for gfn in lab.gfns() {
        let page = lab.page(gfn);
        prop_assert!(page == want(gfn), "content of gfn {:#x}", gfn);
        contents.insert(gfn, page);
    }
    lab.check_coherent();
    let frames = lab.by_frame();
    let zero = lab.zero_pfn();
    let host = lab.host();
    let ksm_frames: BTreeMap<Pfn, &Vec<Gfn>> =
        frames.iter().filter(|(&pfn, _)| pfn != zero && host.frame(pfn).ksm).map(|(&p, g)| (p, g)).collect();
    let mappers: u64 = ksm_frames.values().map(|g| g.len() as u64).sum();
    prop_assert_eq!(s.pages_shared, ksm_frames.len() as u64, "{:?}", s);
    prop_assert_eq!(s.pages_sharing, mappers - ksm_frames.len() as u64, "{:?}", s);
    // Per content class: how many pages, how many unmerged, which KSM frames.
    let mut classes: BTreeMap<&[u8], (u64, u64, BTreeSet<Pfn>)> = BTreeMap::new();
    for (&gfn, page) in &contents {
        let pte = host.pte(gfn).expect("pte");
        let c = classes.entry(page).or_default();
        c.0 += 1;
        if host.frame(pte.pfn).ksm {
            prop_assert!(!pte.writable, "gfn {:#x} writable on a KSM frame", gfn);
            c.2.insert(pte.pfn);
        } else {
            c.1 += 1;
        }
    }
    let pages = lab.pages();
    for (page, (size, unmerged, kframes)) in &classes {
        let word = &page[..16];
        let sizes: Vec<usize> = kframes.iter().map(|pfn| ksm_frames[pfn].len()).collect();
        let ctx = format!("class {word:x?}.. of {size} pages: {unmerged} unmerged, KSM pages of {sizes:?}; {s:?}");
        prop_assert!(*unmerged <= 1, "{}", ctx);
        if *unmerged == 1 {
            prop_assert!(sizes.iter().all(|&n| n as u64 == max), "an unmerged page with room left: {}", ctx);
        }
        if max >= pages && *size >= 2 {
            prop_assert!(*unmerged == 0 && kframes.len() == 1, "{}", ctx);
        }
    }
    Ok(())
}

// ---------------------------------------------------------------------------
// 1. ksm_tests.c check_ksm_merge (-M) and its max_page_sharing arithmetic.
// ---------------------------------------------------------------------------

/// `n` identical pages, `max_page_sharing` = `m`, one full pass.
///
/// How the groups form (the same as mm/ksm.c): the first scan only records
/// checksums. In the second, page 0 goes into the unstable tree, page 1
/// finds it there and the two become a KSM page (a stable node with 2
/// sharers); pages 2.. find that KSM page in the stable tree and join it
/// until it has `m` sharers. Page `m` then finds no KSM page with room and
/// an empty unstable tree, so it goes there; page `m + 1` finds it and the
/// pair becomes a second KSM page, a duplicate in the same stable entry (a
/// `stable_node_chain`). So with r = n mod m: ⌊n/m⌋ full KSM pages, plus one
/// of r pages if r ≥ 2; if r = 1 the last page is alone in the unstable tree
/// (pages_unshared 1). That is ksm_tests.c's formula: pages_shared
/// = ⌊n/m⌋ + (r ≥ 2), pages_sharing = n - pages_shared - (r = 1).
pub fn check_merge(policy: Policy, n: u64, m: u64) {
    let lab = Lab::new(policy, n, knobs_with(|k| k.max_page_sharing = m as u32));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    let free_before = lab.host().nr_free_frames();
    let resident_before = lab.resident();
    assert_eq!(resident_before, n * PAGE_SIZE, "only the guest pages hold memory");

    assert_eq!(lab.full_pass(), 3, "one scan to record checksums, one to merge, one that changes nothing");
    let s = lab.stats();
    let (shared, sharing) = linux_expected(n, m);
    let leftover = u64::from(n % m == 1);
    let ctx = format!("{policy:?} n={n} max_page_sharing={m}: {s:?}");
    assert_eq!((s.pages_shared, s.pages_sharing), (shared, sharing), "{ctx}");
    assert_eq!((s.pages_unshared, s.pages_volatile, s.ksm_zero_pages), (leftover, 0, 0), "{ctx}");
    let (chains, dups) = if shared > 1 { (1, shared) } else { (0, 0) };
    assert_eq!((s.stable_node_chains, s.stable_node_dups), (chains, dups), "{ctx}");
    // Every page is looked at in each of the three scans, KSM pages
    // included: mm/ksm.c's ksm_do_scan counts every page
    // scan_get_next_rmap_item returns (cmp_and_merge_page then passes a
    // page that still maps its KSM page).
    assert_eq!((s.full_scans, s.pages_scanned, s.pages_skipped, s.rmap_items), (3, 3 * n, 0, n), "{ctx}");
    // Every page of a KSM group took part in one successful
    // try_to_merge_one_page (the first of a pair by becoming the KSM page).
    assert_eq!(s.merges, shared + sharing, "{ctx}");

    // Every page maps its group's frame, read-only; the groups have the
    // sizes derived above.
    let frames = lab.by_frame();
    let mut sizes: Vec<u64> = Vec::new();
    {
        let host = lab.host();
        for (&pfn, members) in &frames {
            let f = host.frame(pfn);
            if members.len() > 1 {
                sizes.push(members.len() as u64);
                assert!(f.ksm, "{ctx}: frame {pfn} shared by {members:?} is not a KSM page");
                assert_eq!(f.mapcount as usize, members.len(), "{ctx}: mapcount of KSM frame {pfn}");
                for &gfn in members {
                    assert!(!host.pte(gfn).expect("pte").writable, "{ctx}: merged gfn {gfn:#x} is writable");
                }
            } else {
                assert_eq!(leftover, 1, "{ctx}: gfn {:#x} was left unmerged", members[0]);
                assert!(!f.ksm && host.pte(members[0]).expect("pte").writable, "{ctx}: the leftover page");
            }
        }
    }
    sizes.sort_unstable();
    let mut expected_sizes = vec![m; (n / m) as usize];
    if n % m >= 2 {
        expected_sizes.insert(0, n % m);
    }
    assert_eq!(sizes, expected_sizes, "{ctx}: KSM group sizes");

    // The frames really went back to the host.
    assert_eq!(lab.host().nr_free_frames(), free_before + sharing, "{ctx}: free frames");
    assert_eq!(lab.resident(), resident_before - sharing * PAGE_SIZE, "{ctx}: memfd resident bytes");
    assert_eq!(s.bytes_returned, sharing * PAGE_SIZE, "{ctx}: bytes_returned");
    assert_eq!(s.memfd_resident_bytes, lab.resident(), "{ctx}");

    // The contents did not change.
    let star = pattern(STAR);
    for gfn in lab.gfns() {
        assert!(lab.page(gfn) == star, "{ctx}: content of gfn {gfn:#x}");
    }

    // The secondary MMU heard of every change: each merged page was
    // write-protected once (RW -> RO, same frame) and each sharing page
    // also had its frame replaced (RO -> RO, KSM frame).
    let merged = shared + sharing;
    let ms = lock(&lab.guest.mmu).stats();
    match policy {
        Policy::ChangePte | Policy::EventAware => {
            assert_eq!((ms.change_pte_applied, ms.change_pte_missed, ms.zapped), (merged + sharing, 0, 0), "{ctx}")
        }
        Policy::RangeFlush => assert_eq!((ms.change_pte_applied, ms.change_pte_missed, ms.zapped), (0, 0, merged)),
        Policy::Legacy => {
            assert_eq!((ms.change_pte_applied, ms.change_pte_missed, ms.zapped), (0, merged + sharing, merged), "{ctx}")
        }
    }
    assert_eq!(ms.installed, 0, "{ctx}: no fault happened");
    {
        let mmu = lock(&lab.guest.mmu);
        let host = lab.host();
        for gfn in lab.gfns() {
            let pte = host.pte(gfn).expect("pte");
            let entry = mmu.ept().lookup(gfn);
            match (policy, pte.writable) {
                (_, true) => assert!(entry.is_some_and(|e| e.writable()), "{ctx}: leftover gfn {gfn:#x}"),
                (Policy::ChangePte | Policy::EventAware, false) => {
                    assert!(entry.is_some_and(|e| !e.writable() && e.pfn() == pte.pfn), "{ctx}: gfn {gfn:#x}")
                }
                (_, false) => assert!(entry.is_none(), "{ctx}: gfn {gfn:#x} should have been zapped"),
            }
        }
    }
    lab.check_coherent();
}
