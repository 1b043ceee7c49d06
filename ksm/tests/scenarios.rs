//! Scenario tests of the deduplicator, after Linux's KSM selftests
//! (tools/testing/selftests/mm/ksm_tests.c and ksm_functional_tests.c).
//!
//! Each test builds the whole stack: a frame pool, the primary MMU
//! ([`PrimaryMmu`]), a secondary MMU ([`SecondaryMmu`] over a [`RecordingView`])
//! registered on its notifier, and a [`Ksm`] over every guest page. The
//! "guest" reaches memory only through the secondary MMU, as a vCPU does: a
//! write goes through a present, writable EPT entry, and otherwise takes an
//! EPT violation ([`handle_ept_violation`]) and tries again. The EPT check
//! and the access happen under the secondary MMU's lock, which stands for
//! the atomicity of a hardware access against a TLB flush: a notifier
//! callback (taken under the same lock) either happens before the access or
//! after it.
//!
//! Statistics are asserted exactly, with the arithmetic explained where it
//! is not obvious; the Linux test each scenario mirrors is named above it.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ksm::{Ksm, KsmError, KsmKnobs, KsmStats, Ksmd, KSM_RMAP_ITEM_SIZE};
use shadow_mmu::{
    handle_ept_violation, Access, FramePool, Gfn, MmuNotifier, MmuNotifierRange, Pfn, Policy, PrimaryMmu, Pte,
    RecordingView, SecondaryMmu, PAGE_SHIFT, PAGE_SIZE,
};
use vm_memory::{Bytes, GuestAddress};

/// First guest page; the frames below it are the VMM's boot memory.
const FIRST_GFN: Gfn = 16;
const PAGE: usize = PAGE_SIZE as usize;
const POLICIES: [Policy; 3] = [Policy::ChangePte, Policy::RangeFlush, Policy::Legacy];
/// The fill byte of ksm_tests.c's `allocate_memory(..., '*', ...)`.
const STAR: u64 = 0x2a2a_2a2a_2a2a_2a2a;

type Mmu = SecondaryMmu<RecordingView>;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().expect("a thread panicked while holding this lock")
}

/// A page whose every 64-bit word is `word`.
fn pattern(word: u64) -> Vec<u8> {
    word.to_le_bytes().iter().copied().cycle().take(PAGE).collect()
}

/// What a vCPU reaches: guest memory through the secondary MMU.
#[derive(Clone)]
struct Guest {
    pool: Arc<FramePool>,
    host: Arc<Mutex<PrimaryMmu>>,
    mmu: Arc<Mutex<Mmu>>,
}

impl Guest {
    /// A guest write: through the EPT entry if present and writable, else
    /// an EPT violation (which breaks copy-on-write in the primary MMU) and
    /// again.
    fn write(&self, gfn: Gfn, offset: usize, data: &[u8]) {
        assert!(offset + data.len() <= PAGE, "a guest write stays in its page");
        loop {
            {
                let mmu = lock(&self.mmu);
                if let Some(e) = mmu.ept().lookup(gfn).filter(|e| e.writable()) {
                    let at = GuestAddress((e.pfn() << PAGE_SHIFT) + offset as u64);
                    self.pool.direct_map().write_slice(data, at).expect("guest write through the EPT");
                    return;
                }
            }
            handle_ept_violation(&self.host, &self.mmu, gfn, Access::Write).expect("EPT violation on a write");
        }
    }

    /// A guest read: through the EPT entry if present, else an EPT violation.
    fn read(&self, gfn: Gfn, offset: usize, buf: &mut [u8]) {
        assert!(offset + buf.len() <= PAGE, "a guest read stays in its page");
        loop {
            {
                let mmu = lock(&self.mmu);
                if let Some(e) = mmu.ept().lookup(gfn) {
                    let at = GuestAddress((e.pfn() << PAGE_SHIFT) + offset as u64);
                    self.pool.direct_map().read_slice(buf, at).expect("guest read through the EPT");
                    return;
                }
            }
            handle_ept_violation(&self.host, &self.mmu, gfn, Access::Read).expect("EPT violation on a read");
        }
    }

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

/// The stack under test.
struct Lab {
    guest: Guest,
    ksm: Arc<Mutex<Ksm>>,
    policy: Policy,
    end: Gfn,
}

impl Lab {
    /// `pages` guest pages from [`FIRST_GFN`], two spare frames (one for
    /// KSM's zero page, one so a copy-on-write break always finds a frame),
    /// a pre-faulted secondary MMU with `policy`, and a deduplicator.
    fn new(policy: Policy, pages: u64, knobs: KsmKnobs) -> Self {
        let end = FIRST_GFN + pages;
        let pool = Arc::new(FramePool::new((end + 2) * PAGE_SIZE).expect("frame pool"));
        let mut host = PrimaryMmu::new(pool.clone(), FIRST_GFN, end);
        // The view starts as the table does: every page mapped as the host maps it.
        let mut view = RecordingView::default();
        for gfn in FIRST_GFN..end {
            let pte = host.pte(gfn).expect("host pte of a guest page");
            view.pages.insert(gfn, (pte.pfn, pte.writable));
        }
        let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(policy, view, &host)));
        host.mmu_notifier_register(mmu.clone());
        let ksm = Ksm::new(&mut host, knobs).expect("deduplicator");
        assert_eq!(host.nr_free_frames(), 1, "one spare frame left after KSM took its zero page");
        Self {
            guest: Guest { pool, host: Arc::new(Mutex::new(host)), mmu },
            ksm: Arc::new(Mutex::new(ksm)),
            policy,
            end,
        }
    }

    fn gfns(&self) -> std::ops::Range<Gfn> {
        FIRST_GFN..self.end
    }

    fn pages(&self) -> u64 {
        self.end - FIRST_GFN
    }

    fn host(&self) -> MutexGuard<'_, PrimaryMmu> {
        lock(&self.guest.host)
    }

    fn stats(&self) -> KsmStats {
        let ksm = lock(&self.ksm);
        let host = self.host();
        ksm.stats(&host)
    }

    fn full_pass(&self) -> u32 {
        lock(&self.ksm).full_pass(&self.guest.host).expect("full pass")
    }

    /// `ksm_do_scan` of `pages` pages.
    fn scan(&self, pages: u64) {
        lock(&self.ksm).ksm_do_scan(&self.guest.host, pages).expect("ksm_do_scan");
    }

    /// One full scan (all guest pages), from the start of a scan.
    fn full_scan(&self) {
        self.scan(self.pages());
    }

    fn set_knobs(&self, f: impl FnOnce(&mut KsmKnobs)) {
        let mut ksm = lock(&self.ksm);
        let mut knobs = ksm.knobs();
        f(&mut knobs);
        ksm.set_knobs(knobs).expect("knobs in range");
    }

    fn unmerge_all(&self) {
        lock(&self.ksm).unmerge_all(&self.guest.host).expect("unmerge_all");
    }

    fn zero_pfn(&self) -> Pfn {
        lock(&self.ksm).zero_pfn()
    }

    fn resident(&self) -> u64 {
        self.guest.pool.resident_bytes().expect("memfd resident bytes")
    }

    /// The page as the primary MMU maps it now.
    fn page(&self, gfn: Gfn) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE];
        self.host().read_guest(gfn << PAGE_SHIFT, &mut buf).expect("read_guest");
        buf
    }

    /// Guest pages by the frame their host pte maps.
    fn by_frame(&self) -> BTreeMap<Pfn, Vec<Gfn>> {
        let host = self.host();
        let mut out: BTreeMap<Pfn, Vec<Gfn>> = BTreeMap::new();
        for gfn in self.gfns() {
            out.entry(host.pte(gfn).expect("pte").pfn).or_default().push(gfn);
        }
        out
    }

    fn assert_all_frames_distinct(&self) {
        let frames = self.by_frame();
        let shared: Vec<_> = frames.iter().filter(|(_, g)| g.len() > 1).collect();
        assert!(shared.is_empty(), "{:?}: guest pages still share frames: {shared:?}", self.policy);
    }

    /// The secondary MMU follows the primary: every present EPT entry maps
    /// the host pte's frame, is never writable where the host pte is
    /// read-only, and the view holds exactly what the table holds.
    fn check_coherent(&self) {
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
            assert_eq!(
                mmu.view().pages.get(&gfn).copied(),
                entry.map(|e| (e.pfn(), e.writable())),
                "{:?}: the view of gfn {gfn:#x} differs from the EPT",
                self.policy
            );
        }
    }
}

fn knobs_with(f: impl FnOnce(&mut KsmKnobs)) -> KsmKnobs {
    let mut k = KsmKnobs::default();
    f(&mut k);
    k
}

/// ksm_tests.c `assert_ksm_pages_count(dupl_page_count)`: the expected
/// (pages_shared, pages_sharing) for `n` identical pages with
/// `max_page_sharing` = `m`.
fn linux_expected(n: u64, m: u64) -> (u64, u64) {
    if n % m == 1 || n % m == 0 {
        let shared = n / m;
        (shared, shared * (m - 1))
    } else {
        let shared = n / m + 1;
        (shared, n - shared)
    }
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
fn check_merge(policy: Policy, n: u64, m: u64) {
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
    // The quiet third scan passes merged pages without looking at them;
    // only a leftover page is looked at again.
    assert_eq!((s.full_scans, s.pages_scanned, s.pages_skipped, s.rmap_items), (3, 2 * n + leftover, 0, n), "{ctx}");
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
        Policy::ChangePte => {
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
                (Policy::ChangePte, false) => {
                    assert!(entry.is_some_and(|e| !e.writable() && e.pfn() == pte.pfn), "{ctx}: gfn {gfn:#x}")
                }
                (_, false) => assert!(entry.is_none(), "{ctx}: gfn {gfn:#x} should have been zapped"),
            }
        }
    }
    lab.check_coherent();
}

#[test]
fn identical_pages_merge_into_one_ksm_page() {
    for policy in POLICIES {
        check_merge(policy, 64, 256);
    }
}

#[test]
fn max_page_sharing_splits_into_stable_node_dups() {
    // n mod m = 0, 1, 2, 3, and a bigger one with Linux's default limit.
    for (n, m) in [(10, 5), (11, 5), (12, 5), (13, 5), (2, 2), (3, 2), (600, 256)] {
        for policy in POLICIES {
            check_merge(policy, n, m);
        }
    }
}

// ---------------------------------------------------------------------------
// 2. ksm_tests.c check_ksm_unmerge (-U), ksm_functional_tests.c test_unmerge:
//    writes break the sharing, and KSM notices at its next scan.
// ---------------------------------------------------------------------------

#[test]
fn writes_unmerge() {
    const N: u64 = 32;
    for policy in POLICIES {
        let lab = Lab::new(policy, N, KsmKnobs::default());
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, STAR);
        }
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{policy:?}: {s:?}");

        // One word per page, a different one in each (ksm_tests.c changes
        // one byte in each page).
        let word = |gfn: Gfn| 0xdead_0000_0000_0000 | gfn;
        let offset = |gfn: Gfn| ((gfn * 8) as usize) % PAGE;
        for gfn in lab.gfns() {
            lab.guest.write(gfn, offset(gfn), &word(gfn).to_le_bytes());
        }
        // KSM learns of it only when it scans (as in Linux).
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{policy:?}: before the scan: {s:?}");
        // Every write faulted and copied: a KSM page is never reused, even
        // by its last mapper.
        assert_eq!(lab.host().stats().cow_copies, N, "{policy:?}");
        assert_eq!(lab.host().nr_free_frames(), 1, "{policy:?}: the KSM frame was freed by the last copy");

        // ksm_tests.c: "get at least 1 scan, so KSM can detect that the
        // pages were modified".
        lab.full_scan();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, 0), "{policy:?}: {s:?}");
        assert_eq!((s.pages_volatile, s.stable_node_chains, s.stable_node_dups), (N, 0, 0), "{policy:?}: {s:?}");
        // And at the next pass they are unshared pages in the unstable tree.
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, N), "{policy:?}: {s:?}");

        for gfn in lab.gfns() {
            let mut expected = pattern(STAR);
            expected[offset(gfn)..offset(gfn) + 8].copy_from_slice(&word(gfn).to_le_bytes());
            assert!(lab.page(gfn) == expected, "{policy:?}: content of gfn {gfn:#x}");
            assert_eq!(lab.guest.read_u64(gfn, offset(gfn)), word(gfn), "{policy:?}: guest view of {gfn:#x}");
        }
        lab.assert_all_frames_distinct();
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// 3. ksm_tests.c check_ksm_zero_page_merge (-Z, -z 0 / -z 1) and
//    ksm_functional_tests.c test_unmerge_zero_pages.
// ---------------------------------------------------------------------------

#[test]
fn zero_pages_without_use_zero_pages_merge_like_any_page() {
    const N: u64 = 32;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    assert_eq!(lab.resident(), N * PAGE_SIZE, "writing zeros allocates the frames");
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.ksm_zero_pages), (1, N - 1, 0), "{s:?}");
    let frames = lab.by_frame();
    assert_eq!(frames.len(), 1, "one KSM page: {frames:?}");
    let (&kpfn, _) = frames.iter().next().expect("one frame");
    assert_ne!(kpfn, lab.zero_pfn(), "an ordinary KSM page, not the zero page");
    assert!(lab.host().frame(kpfn).ksm);
    assert_eq!(s.general_profit, linux_general_profit(&s));
    assert_eq!(s.general_profit, ((N - 1) * PAGE_SIZE) as i64 - (N * KSM_RMAP_ITEM_SIZE) as i64);
    lab.check_coherent();
}

#[test]
fn zero_pages_with_use_zero_pages_map_the_zero_page_and_cow() {
    const N: u64 = 64;
    for policy in POLICIES {
        let lab = Lab::new(policy, N, knobs_with(|k| k.use_zero_pages = true));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0);
        }
        assert_eq!(lab.full_pass(), 3, "{policy:?}");
        let s = lab.stats();
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared), (N, 0, 0, 0), "{s:?}");
        assert_eq!(s.merges, N, "{policy:?}");
        assert_eq!(s.general_profit, (N * PAGE_SIZE) as i64 - (N * KSM_RMAP_ITEM_SIZE) as i64, "{policy:?}");
        let zero = lab.zero_pfn();
        {
            let host = lab.host();
            for gfn in lab.gfns() {
                let pte = host.pte(gfn).expect("pte");
                assert!(pte.pfn == zero && !pte.writable, "{policy:?}: gfn {gfn:#x} maps {pte:?}");
            }
            assert_eq!(host.frame(zero).mapcount as u64, N, "{policy:?}");
            assert!(host.frame(zero).ksm, "{policy:?}: the zero page is never reused on a write");
            assert_eq!(host.nr_free_frames(), 1 + N, "{policy:?}: every guest frame returned");
        }
        // Only the zero page itself holds memory now (reading the zero
        // frame to compare against it allocated it in the memfd).
        assert!(lab.resident() <= PAGE_SIZE, "{policy:?}: resident {}", lab.resident());
        lab.check_coherent();

        // test_unmerge_zero_pages, case 1: writing (COW) half of the pages.
        let half = FIRST_GFN + N / 2;
        for gfn in FIRST_GFN..half {
            lab.guest.fill(gfn, 0xcfcf_cfcf_cfcf_cfcf);
        }
        assert_eq!(lab.host().stats().cow_copies, N / 2, "{policy:?}");
        lab.check_coherent();
        lab.full_pass();
        let s = lab.stats();
        // The written pages left the zero page, and being identical they
        // merged with each other into one KSM page.
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing), (N / 2, 1, N / 2 - 1), "{policy:?}: {s:?}");

        // Case 2/3: unmerging; the zero pages really are unmerged.
        lab.set_knobs(|k| k.run = 2);
        lab.unmerge_all();
        let s = lab.stats();
        assert_eq!((s.ksm_zero_pages, s.pages_shared, s.pages_sharing), (0, 0, 0), "{policy:?}: {s:?}");
        lab.assert_all_frames_distinct();
        for gfn in lab.gfns() {
            let expected = pattern(if gfn < half { 0xcfcf_cfcf_cfcf_cfcf } else { 0 });
            assert!(lab.page(gfn) == expected, "{policy:?}: content of gfn {gfn:#x}");
            assert_ne!(lab.host().pte(gfn).expect("pte").pfn, zero, "{policy:?}");
        }
        assert_eq!(lab.host().frame(zero).mapcount, 0, "{policy:?}");
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// 4. run = 2 (ksm_tests.c ksm_unmerge_time / ksm_functional_tests.c
//    range_maps_duplicates after ksm_unmerge).
// ---------------------------------------------------------------------------

/// The word of page `i` in the mixed layout: zero pages, six groups of
/// identical pages, unique pages.
fn mixed_word(i: u64) -> u64 {
    match i % 8 {
        0 => 0,
        7 => 0x5500_0000_0000_0000 | i,
        g => g * 0x0101_0101_0101_0101,
    }
}

#[test]
fn unmerge_all_leaves_no_shared_frame() {
    const N: u64 = 96; // 12 zero pages, 6 groups of 12, 12 unique pages
    for policy in POLICIES {
        let lab = Lab::new(policy, N, knobs_with(|k| k.use_zero_pages = true));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, mixed_word(gfn - FIRST_GFN));
        }
        lab.full_pass();
        let merged = lab.stats();
        let expect = (12, 6, 6 * 11, 12);
        let got = (merged.ksm_zero_pages, merged.pages_shared, merged.pages_sharing, merged.pages_unshared);
        assert_eq!(got, expect, "{policy:?}: {merged:?}");

        lab.set_knobs(|k| k.run = 2);
        lab.unmerge_all();
        let s = lab.stats();
        let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
        assert_eq!(got, (0, 0, 0, 0), "{policy:?}: {s:?}");
        assert_eq!((s.stable_node_chains, s.stable_node_dups), (0, 0), "{policy:?}");
        lab.assert_all_frames_distinct();
        {
            let host = lab.host();
            for gfn in lab.gfns() {
                let f = host.frame(host.pte(gfn).expect("pte").pfn);
                assert!(!f.ksm && f.mapcount == 1, "{policy:?}: gfn {gfn:#x} frame {f:?}");
            }
        }
        for gfn in lab.gfns() {
            assert!(lab.page(gfn) == pattern(mixed_word(gfn - FIRST_GFN)), "{policy:?}: content of {gfn:#x}");
        }
        lab.check_coherent();
        if policy == Policy::ChangePte {
            // The copy-on-write breaks updated the entries in place.
            let mmu = lock(&lab.guest.mmu);
            for gfn in lab.gfns() {
                assert!(mmu.ept().lookup(gfn).is_some_and(|e| e.writable()), "{policy:?}: gfn {gfn:#x}");
            }
        }

        // Back to run = 1: everything merges again, at the first scan
        // (the checksums held still); the second changes nothing.
        lab.set_knobs(|k| k.run = 1);
        assert_eq!(lab.full_pass(), 2, "{policy:?}");
        let s = lab.stats();
        let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
        assert_eq!(got, expect, "{policy:?}: remerge: {s:?}");
        lab.check_coherent();
    }
}

// ---------------------------------------------------------------------------
// 5. Volatile pages (mm/ksm.c's checksum gate) and smart scan
//    (mm/ksm.c should_skip_rmap_item).
// ---------------------------------------------------------------------------

#[test]
fn volatile_pages_never_merge() {
    const N: u64 = 16;
    for smart_scan in [false, true] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for round in 0..12u64 {
            // All pages identical to each other, but different from what
            // they were at the last scan.
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 0x7700 + round);
            }
            lab.full_scan();
            let s = lab.stats();
            let got = (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile);
            assert_eq!(got, (0, 0, 0, N), "smart_scan={smart_scan} round {round}: {s:?}");
            assert_eq!(s.merges, 0, "smart_scan={smart_scan}");
        }
        lab.check_coherent();
        lab.assert_all_frames_distinct();
    }
}

#[test]
fn pages_that_stop_changing_merge_after_being_volatile() {
    const N: u64 = 16;
    for smart_scan in [false, true] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for round in 0..3u64 {
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 0x7700 + round);
            }
            lab.full_scan();
        }
        lab.full_pass();
        let s = lab.stats();
        assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "smart_scan={smart_scan}: {s:?}");
    }
}

#[test]
fn full_pass_merges_every_page_that_held_still_even_with_smart_scan() {
    // Pages that were volatile for a while have a high smart-scan age, so
    // should_skip_rmap_item would skip them in some scans. full_pass stops
    // at the first scan without a checksum update, and a skipped page
    // updates no checksum: so a pass skips nothing.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = true));
    for round in 0..12u64 {
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0x7700 + round);
        }
        lab.full_scan();
    }
    let scans = lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "after {scans} scans: {s:?}");
}

#[test]
fn full_pass_started_mid_scan_looks_at_every_page() {
    // ksmd (or any ksm_do_scan) stopped in the middle of a scan; the guest
    // then rewrote pages before the cursor and asks for a synchronous pass.
    // Had full_pass counted the rest of the scan in progress (pages 8..24,
    // all unchanged KSM pages: no checksum update) as its quiet scan, pages
    // 0 and 1 would never be looked at: unmerged although identical,
    // and pages_sharing still counts them on the KSM page they left.
    const N: u64 = 24;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    assert_eq!(lab.full_pass(), 3);
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), (1, N - 1), "{s:?}");
    lab.scan(8); // part of a scan: the cursor is at page 8
    lab.guest.fill(FIRST_GFN, 0x1111);
    lab.guest.fill(FIRST_GFN + 1, 0x1111);
    let scans = lab.full_pass();
    let s = lab.stats();
    // Expected: the '*' KSM page keeps 22 pages (1 shared + 21 sharing),
    // pages 0 and 1 form a second KSM page (1 + 1).
    assert_eq!((s.pages_shared, s.pages_sharing), (2, N - 2), "after {scans} scans: {s:?}");
    let host = lab.host();
    assert_eq!(
        host.pte(FIRST_GFN).expect("pte").pfn,
        host.pte(FIRST_GFN + 1).expect("pte").pfn,
        "pages 0 and 1 are identical and held still for the whole pass"
    );
}

#[test]
fn full_pass_leaves_no_page_unmerged_next_to_a_ksm_page_with_room() {
    // max_page_sharing 3. Pages 0, 1, 3 hold A, page 2 a unique U, pages 4
    // and 5 hold B: a pass makes KSM pages {0, 1, 3} (full) and {4, 5}.
    // Page 2 becomes A: no room on A's KSM page, so it stays alone in the
    // unstable tree (a legitimate leftover). Then page 3 becomes B. In the
    // next pass page 2 is compared first, while page 3 still counts on A's
    // KSM page (full: page 2 stays unmerged); then page 3 leaves it and
    // joins B's KSM page straight from the stable tree, which updates no
    // checksum. Had full_pass stopped at a scan without checksum updates,
    // page 2 would stay unmerged next to A's KSM page with room for it: a
    // pass must run to a fixpoint (a scan that changes nothing).
    let lab = Lab::new(Policy::ChangePte, 6, knobs_with(|k| k.max_page_sharing = 3));
    let (a, b, u) = (0xaaaa, 0xbbbb, 0x1234);
    for (i, w) in [a, a, u, a, b, b].into_iter().enumerate() {
        lab.guest.fill(FIRST_GFN + i as u64, w);
    }
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 3, 1), "{s:?}");
    lab.guest.fill(FIRST_GFN + 2, a);
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 3, 1), "A's KSM page is full: {s:?}");
    lab.guest.fill(FIRST_GFN + 3, b);
    let scans = lab.full_pass();
    let s = lab.stats();
    // Expected: {0, 1, 2} on A's KSM page, {3, 4, 5} on B's.
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (2, 4, 0), "after {scans} scans: {s:?}");
}

/// The smart-scan schedule for a page that never merges: ages 0..=2 are
/// scanned; age 3 is scanned and earns 1 skip (skip_age(3) = 1); age 4 is
/// skipped; age 5 is scanned and earns 2 (skip_age(5) = 2); ages 6 and 7
/// are skipped. Over 8 full scans: 5 scanned, 3 skipped.
#[test]
fn smart_scan_skips_pages_that_never_merge() {
    const N: u64 = 32;
    for smart_scan in [true, false] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = smart_scan));
        for gfn in lab.gfns() {
            lab.guest.fill(gfn, 0x3300_0000 + gfn); // all different
        }
        let mut skipped = Vec::new();
        for _ in 0..8 {
            lab.full_scan();
            skipped.push(lab.stats().pages_skipped);
        }
        let s = lab.stats();
        if smart_scan {
            assert_eq!(skipped, [0, 0, 0, 0, N, N, 2 * N, 3 * N], "{s:?}");
            assert_eq!(s.pages_scanned, 5 * N, "{s:?}");
        } else {
            assert_eq!(skipped, [0; 8], "{s:?}");
            assert_eq!(s.pages_scanned, 8 * N, "{s:?}");
        }
        assert_eq!((s.pages_shared, s.pages_sharing, s.full_scans), (0, 0, 8), "{s:?}");
    }
}

#[test]
fn smart_scan_never_skips_ksm_pages() {
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.smart_scan = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    for _ in 0..12 {
        lab.full_scan();
    }
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_skipped), (1, N - 1, 0), "{s:?}");
    // Scanned in the first two scans, then recognised as mapping their
    // KSM page without being looked at again.
    assert_eq!(s.pages_scanned, 2 * N, "{s:?}");
}

// ---------------------------------------------------------------------------
// 6. Correctness under concurrency: ksmd against a writing guest.
//    (ksm_functional_tests.c checks merge/unmerge races one at a time; here
//    they happen continuously.)
// ---------------------------------------------------------------------------

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// The guest writes one of `VALUES` values into one of `SLOTS` words of a
/// random page; every page holds zeros elsewhere, so there are only
/// VALUES^SLOTS distinct pages and merges keep happening.
const SLOTS: usize = 2;
const VALUES: u64 = 4;
const SLOT_STRIDE: usize = PAGE / SLOTS;

fn model_page(words: &[u64; SLOTS]) -> Vec<u8> {
    let mut page = vec![0u8; PAGE];
    for (slot, w) in words.iter().enumerate() {
        page[slot * SLOT_STRIDE..slot * SLOT_STRIDE + 8].copy_from_slice(&w.to_le_bytes());
    }
    page
}

fn concurrency(policy: Policy, seed: u64) {
    const N: u64 = 128;
    const RUN: Duration = Duration::from_millis(1500);
    const PACE: Duration = Duration::from_micros(50);
    let knobs = knobs_with(|k| {
        k.run = 1;
        k.pages_to_scan = 64;
        k.sleep_millisecs = 0;
    });
    let lab = Lab::new(policy, N, knobs);
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    let ksmd = Ksmd::start(lab.ksm.clone(), lab.guest.host.clone(), Arc::default()).expect("start ksmd");

    let guest = lab.guest.clone();
    let stop = Arc::new(AtomicBool::new(false));
    let stop_writer = stop.clone();
    let writer = std::thread::Builder::new()
        .name("vcpu".into())
        .spawn(move || {
            let mut rng = Rng(seed);
            let mut model = vec![[0u64; SLOTS]; N as usize];
            let mut writes = 0u64;
            let started = Instant::now();
            while !stop_writer.load(Ordering::Relaxed) {
                let i = rng.below(N) as usize;
                let gfn = FIRST_GFN + i as u64;
                let slot = rng.below(SLOTS as u64) as usize;
                let value = rng.below(VALUES);
                guest.write(gfn, slot * SLOT_STRIDE, &value.to_le_bytes());
                model[i][slot] = value;
                writes += 1;
                // Read back through the EPT: never a lost write.
                assert_eq!(guest.read_u64(gfn, slot * SLOT_STRIDE), value, "{policy:?}: write to {gfn:#x} lost");
                // And another page, whole: never a merge of pages that differ.
                let j = rng.below(N) as usize;
                let mut page = vec![0u8; PAGE];
                guest.read(FIRST_GFN + j as u64, 0, &mut page);
                assert!(
                    page == model_page(&model[j]),
                    "{policy:?}: gfn {:#x} differs from the model",
                    FIRST_GFN + j as u64
                );
                // Alternate storms (pages change faster than ksmd scans:
                // volatile, merges abort) and paced bursts (pages hold still
                // for a scan or two, so merges and COW breaks keep happening).
                let storm = (started.elapsed().as_millis() / 150) % 2 == 0;
                if !storm && rng.below(4) == 0 {
                    std::thread::sleep(PACE);
                }
            }
            (model, writes)
        })
        .expect("spawn the writer");

    let deadline = Instant::now() + RUN;
    let mut samples = Vec::new();
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(100));
        assert!(!ksmd.is_finished(), "{policy:?}: ksmd ended (an error)");
        let s = lab.stats();
        samples.push(s.pages_sharing);
        lab.check_coherent();
    }
    stop.store(true, Ordering::Relaxed);
    let (model, writes) = writer.join().expect("the writer panicked");
    ksmd.stop().expect("ksmd failed");

    let during = lab.stats();
    for gfn in lab.gfns() {
        let want = model_page(&model[(gfn - FIRST_GFN) as usize]);
        assert!(lab.page(gfn) == want, "{policy:?}: final content of gfn {gfn:#x}");
    }
    lab.check_coherent();

    // Quiesced: after one pass (started wherever ksmd stopped, smart scan
    // still on) KSM's bookkeeping matches what the host maps, and every
    // content class is merged.
    lab.full_pass();
    let s = lab.stats();
    quiescent::check_quiet_state(&lab, |gfn| model_page(&model[(gfn - FIRST_GFN) as usize]), 256)
        .unwrap_or_else(|e| panic!("{policy:?}: after the quiet pass: {e}"));
    let classes: BTreeSet<&[u64; SLOTS]> = model.iter().collect();
    eprintln!(
        "{policy:?}: {writes} guest writes in {RUN:?}; pages_sharing sampled {samples:?}; at the stop {} merges, \
         {} full scans; after a quiet pass: {} distinct pages, pages_shared {}, pages_sharing {}, unshared {}, \
         chains {}; mmu {:?}",
        during.merges,
        during.full_scans,
        classes.len(),
        s.pages_shared,
        s.pages_sharing,
        s.pages_unshared,
        s.stable_node_chains,
        lock(&lab.guest.mmu).stats()
    );
    assert!(during.merges > 0 && during.full_scans > 0, "{policy:?}: ksmd did work: {during:?}");
}

#[test]
fn concurrent_guest_writes_and_ksmd_change_pte() {
    concurrency(Policy::ChangePte, 0x9e37_79b9_7f4a_7c15);
}

#[test]
fn concurrent_guest_writes_and_ksmd_range_flush() {
    concurrency(Policy::RangeFlush, 0xd1b5_4a32_d192_ed03);
}

#[test]
fn concurrent_guest_writes_and_ksmd_legacy() {
    concurrency(Policy::Legacy, 0x8cb9_2ba7_2f3d_8dd7);
}

#[test]
fn pruning_stale_stable_nodes_never_brings_their_freed_frames_back() {
    // 64 pages of one content and 32 pairs, merged: 33 KSM pages.
    let lab = Lab::new(Policy::ChangePte, 128, KsmKnobs::default());
    for (i, gfn) in lab.gfns().enumerate() {
        lab.guest.fill(gfn, if i < 64 { 7 } else { 1000 + i as u64 / 2 });
    }
    lab.full_pass();
    assert_eq!((lab.stats().pages_shared, lab.stats().pages_sharing), (33, 95));
    // Both sharers of every pair are rewritten: 32 stable nodes go stale and
    // their frames go back to the host.
    for (i, gfn) in lab.gfns().enumerate().skip(64) {
        lab.guest.fill(gfn, 5000 + i as u64);
    }
    lab.host().flush_holes().expect("flush_holes");
    let before = lab.resident();
    // The scan meets the stale nodes while it searches the stable tree: it
    // prunes them without reading their (punched) frames.
    lab.full_scan();
    assert_eq!(lab.resident(), before, "the scan made freed frames resident again");
    assert_eq!(lab.stats().pages_shared, 1);
}

/// A notifier subscriber with a bug: it panics when told of a change.
struct PanickingSubscriber;

impl MmuNotifier for PanickingSubscriber {
    fn invalidate_range_start(&mut self, _: &MmuNotifierRange) {
        panic!("subscriber bug");
    }
    fn invalidate_range_end(&mut self, _: &MmuNotifierRange) {}
    fn change_pte(&mut self, _: Gfn, _: Pte) {}
}

#[test]
fn a_panicking_ksmd_raises_its_failure_flag_and_reports_the_panic() {
    let lab = Lab::new(Policy::RangeFlush, 8, knobs_with(|k| k.sleep_millisecs = 0));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 7);
    }
    lock(&lab.guest.host).mmu_notifier_register(Arc::new(Mutex::new(PanickingSubscriber)));
    let failed = Arc::new(AtomicBool::new(false));
    let ksmd = Ksmd::start(lab.ksm.clone(), lab.guest.host.clone(), failed.clone()).expect("start ksmd");
    // The first merge notifies the subscriber, which panics inside ksmd.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !failed.load(Ordering::SeqCst) {
        assert!(Instant::now() < deadline, "ksmd never raised its failure flag");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(ksmd.is_finished());
    match ksmd.stop() {
        Err(KsmError::Panicked(message)) => assert_eq!(message, "subscriber bug"),
        other => panic!("expected the panic to be reported, got {other:?}"),
    }
}

// ---------------------------------------------------------------------------
// 7. general_profit (Documentation/admin-guide/mm/ksm.rst, mm/ksm.c
//    general_profit_show): (pages_sharing + ksm_zero_pages) * PAGE_SIZE
//    - rmap_items * sizeof(struct ksm_rmap_item). The deduplicator's other
//    metadata (trees, stable nodes, the rmap array's unused slots) is in
//    metadata_bytes, not in general_profit.
// ---------------------------------------------------------------------------

/// general_profit as mm/ksm.c computes it from the other figures.
fn linux_general_profit(s: &KsmStats) -> i64 {
    ((s.pages_sharing + s.ksm_zero_pages) * PAGE_SIZE) as i64 - (s.rmap_items * KSM_RMAP_ITEM_SIZE) as i64
}

#[test]
fn general_profit_of_a_fresh_guest_is_zero() {
    // No page ever touched: no rmap item, nothing saved, so Linux reports 0
    // (the metadata held anyway is metadata_bytes, not general_profit).
    let lab = Lab::new(Policy::ChangePte, 64, KsmKnobs::default());
    for scanned in [false, true] {
        if scanned {
            lab.full_scan();
        }
        let s = lab.stats();
        assert_eq!((s.rmap_items, s.general_profit), (0, 0), "scanned {scanned}: {s:?}");
        assert!(s.metadata_bytes > 0, "{s:?}");
    }
    // 16 unique pages: 16 rmap items and nothing saved.
    for gfn in FIRST_GFN..FIRST_GFN + 16 {
        lab.guest.fill(gfn, 0x6600 + gfn);
    }
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.rmap_items, s.pages_sharing), (16, 0), "{s:?}");
    assert_eq!(s.general_profit, -16 * KSM_RMAP_ITEM_SIZE as i64, "{s:?}");
    assert_eq!(KSM_RMAP_ITEM_SIZE, 12, "the rmap item's documented size");
}

#[test]
fn general_profit_and_metadata_per_rmap_item() {
    const N: u64 = 4096;
    // 1024 zero pages, 2048 pages in 32 groups of 64, 1024 unique pages.
    let word = |i: u64| match i % 4 {
        0 => 0,
        3 => 0x6600_0000_0000_0000 | i,
        k => 0x4400 + k * 16 + (i / 4) % 16,
    };
    for (what, use_zero_pages) in [("all unique", None), ("mixed", Some(true)), ("mixed", Some(false))] {
        let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = use_zero_pages.unwrap_or(false)));
        for gfn in lab.gfns() {
            let i = gfn - FIRST_GFN;
            lab.guest.fill(gfn, if use_zero_pages.is_some() { word(i) } else { 0x6600_0000_0000_0000 | i });
        }
        lab.full_pass();
        let s = lab.stats();
        let metadata = lock(&lab.ksm).metadata_bytes() as u64;
        assert_eq!(s.metadata_bytes, metadata, "{what}");
        assert_eq!(s.general_profit, linux_general_profit(&s), "{what}: {s:?}");
        assert_eq!(s.rmap_items, N, "{what}");
        match use_zero_pages {
            None => assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (0, 0, N), "{s:?}"),
            // The 32 groups of 64 (and, without use_zero_pages, the 1024
            // zero pages as 4 KSM pages of 256, the max_page_sharing).
            Some(true) => {
                let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
                assert_eq!(got, (1024, 32, 32 * 63, 1024), "{s:?}")
            }
            Some(false) => {
                let got = (s.ksm_zero_pages, s.pages_shared, s.pages_sharing, s.pages_unshared);
                assert_eq!(got, (0, 32 + 4, 32 * 63 + 4 * 255, 1024), "{s:?}");
                assert_eq!((s.stable_node_chains, s.stable_node_dups), (1, 4), "{s:?}");
            }
        }
        let per_item = metadata as f64 / s.rmap_items as f64;
        eprintln!(
            "general_profit, {what} (use_zero_pages {use_zero_pages:?}): {} rmap items, metadata {metadata} bytes \
             = {per_item:.2} bytes per rmap item; general_profit {} bytes",
            s.rmap_items, s.general_profit
        );
        assert!(per_item <= 32.0, "{what}: {per_item:.2} bytes of metadata per rmap item");
    }
}

// ---------------------------------------------------------------------------
// Timing (ksm_tests.c ksm_merge_time, -P): printed, not asserted.
// ---------------------------------------------------------------------------

#[test]
fn timing_full_pass_16384_pages_in_64_groups() {
    const N: u64 = 16384;
    const GROUPS: u64 = 64;
    let lab = Lab::new(Policy::ChangePte, N, KsmKnobs::default());
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0x1000 + (gfn - FIRST_GFN) % GROUPS);
    }
    let t = Instant::now();
    let scans = lab.full_pass();
    let wall = t.elapsed();
    let s = lab.stats();
    // 256 pages per group = max_page_sharing: one full KSM page each.
    assert_eq!((s.pages_shared, s.pages_sharing), (GROUPS, N - GROUPS), "{s:?}");
    let per_page = |ns: u64| ns as f64 / s.pages_scanned as f64;
    eprintln!(
        "timing ({} build): full_pass of {N} pages in {GROUPS} groups: {scans} scans, {} pages scanned, wall {:.1} ms \
         (scan_ns {:.1} ms, cpu_ns {:.1} ms), {:.0} ns wall / {:.0} ns cpu per page scanned; {} MiB returned",
        if cfg!(debug_assertions) { "debug" } else { "release" },
        s.pages_scanned,
        wall.as_secs_f64() * 1e3,
        s.scan_ns as f64 / 1e6,
        s.cpu_ns as f64 / 1e6,
        per_page(s.scan_ns),
        per_page(s.cpu_ns),
        s.bytes_returned >> 20
    );
}

// ---------------------------------------------------------------------------
// Property: whatever the history of writes and partial scans, once the
// guest holds still a pass leaves KSM's bookkeeping equal to what the host
// maps, and every content class merged (mm/ksm.c's promise: identical pages
// that hold still end up sharing).
// ---------------------------------------------------------------------------

mod quiescent {
    use super::*;
    use proptest::prelude::*;

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
    pub(super) fn check_quiet_state(lab: &Lab, want: impl Fn(Gfn) -> Vec<u8>, max: u64) -> Result<(), TestCaseError> {
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

    const PAGES: u64 = 24;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 96, failure_persistence: None, ..ProptestConfig::default() })]
        #[test]
        fn a_quiet_pass_merges_every_class(
            batches in prop::collection::vec(
                (prop::collection::vec((0..PAGES, 0u64..5), 1..12), 0u64..60),
                1..8,
            ),
            policy in prop::sample::select(POLICIES.to_vec()),
            smart_scan in any::<bool>(),
            max in prop::sample::select(vec![2u32, 3, 5, 256]),
        ) {
            let knobs = knobs_with(|k| {
                k.smart_scan = smart_scan;
                k.max_page_sharing = max;
            });
            let lab = Lab::new(policy, PAGES, knobs);
            let mut model = vec![1u64; PAGES as usize];
            for gfn in lab.gfns() {
                lab.guest.fill(gfn, 1);
            }
            for (writes, scan) in &batches {
                for &(i, v) in writes {
                    lab.guest.fill(FIRST_GFN + i, v * 0x0101_0101_0101_0101);
                    model[i as usize] = v * 0x0101_0101_0101_0101;
                }
                lab.scan(*scan);
            }
            // One pass, started wherever the partial scans left the cursor.
            lab.full_pass();
            check_quiet_state(&lab, |gfn| pattern(model[(gfn - FIRST_GFN) as usize]), u64::from(max))?;
        }
    }
}

// ---------------------------------------------------------------------------
// mm/ksm.c details: a failed merge, the merges figure, max_page_sharing
// while pages are shared, smart scan's age, ksm_zero_pages.
// ---------------------------------------------------------------------------

/// A notifier subscriber standing for a vCPU write that lands just before
/// KSM write-protects `gfn`: at the first range opened on `gfn` it writes
/// `data` into frame `pfn` (the page's frame, still writable then).
struct WriteBeforeProtect {
    pool: Arc<FramePool>,
    gfn: Gfn,
    pfn: Pfn,
    data: Vec<u8>,
    done: bool,
}

impl WriteBeforeProtect {
    /// Arms the write on `gfn` (its frame now) in `lab`'s primary MMU.
    fn arm(lab: &Lab, gfn: Gfn, data: Vec<u8>) {
        let pfn = lab.host().pte(gfn).expect("pte").pfn;
        let hook = Self { pool: lab.guest.pool.clone(), gfn, pfn, data, done: false };
        lab.host().mmu_notifier_register(Arc::new(Mutex::new(hook)));
    }
}

impl MmuNotifier for WriteBeforeProtect {
    fn invalidate_range_start(&mut self, range: &MmuNotifierRange) {
        if !self.done && range.contains(self.gfn) {
            self.done = true;
            let at = GuestAddress(self.pfn << PAGE_SHIFT);
            self.pool.direct_map().write_slice(&self.data, at).expect("write the frame");
        }
    }
    fn invalidate_range_end(&mut self, _: &MmuNotifierRange) {}
    fn change_pte(&mut self, _: Gfn, _: Pte) {}
}

#[test]
fn a_failed_merge_with_a_ksm_page_ends_the_visit() {
    // Pages 0, 1, 2 hold '*'. Scan 1 records checksums. In scan 2 pages 0
    // and 1 become a KSM page; page 2 finds it in the stable tree but is
    // written just before its write protection, so the merge fails.
    // mm/ksm.c's cmp_and_merge_page returns then. Going on to the unstable
    // tree with the copy read before the write ('*', whose checksum held
    // since scan 1) would put page 2 there under content it no longer holds.
    let lab = Lab::new(Policy::ChangePte, 3, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    WriteBeforeProtect::arm(&lab, FIRST_GFN + 2, pattern(0xb0b0));
    lab.full_scan();
    let s = lab.stats();
    let got = (s.pages_shared, s.pages_sharing, s.pages_unshared, s.pages_volatile);
    assert_eq!(got, (1, 1, 0, 1), "page 2 is in no tree after its failed merge: {s:?}");
    assert_eq!(s.merges, 2, "{s:?}");
    assert!(lab.page(FIRST_GFN + 2) == pattern(0xb0b0));
    // Page 2 now holds still: it is an unshared page after the next pass.
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_unshared), (1, 1, 1), "{s:?}");
    lab.check_coherent();
}

#[test]
fn merges_counts_no_pair_whose_second_half_failed() {
    // Pages 0 and 1 hold '*'. In scan 2 page 0 enters the unstable tree and
    // page 1 finds it: page 1 is write-protected to become the KSM page,
    // then page 0 is written just before its own write protection, so the
    // pair does not merge. Nothing is shared: no merge is counted.
    let lab = Lab::new(Policy::ChangePte, 2, knobs_with(|k| k.smart_scan = false));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    WriteBeforeProtect::arm(&lab, FIRST_GFN, pattern(0xb0b0));
    lab.full_scan();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.merges), (0, 0, 0), "{s:?}");
    assert!(!lab.host().pte(FIRST_GFN + 1).expect("pte").writable, "page 1 stays write-protected");
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.merges), (0, 0, 0), "two different pages: {s:?}");
    lab.check_coherent();
}

#[test]
fn max_page_sharing_cannot_change_while_pages_are_shared() {
    // mm/ksm.c max_page_sharing_store: -EBUSY while ksm_pages_shared != 0.
    const N: u64 = 8;
    let lab = Lab::new(Policy::ChangePte, N, KsmKnobs::default());
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_pass();
    assert_eq!((lab.stats().pages_shared, lab.stats().pages_sharing), (1, N - 1));
    let knobs = lock(&lab.ksm).knobs();
    let e = lock(&lab.ksm).set_knobs(KsmKnobs { max_page_sharing: 3, ..knobs }).expect_err("busy");
    assert!(matches!(e, KsmError::Busy { name: "max_page_sharing", pages_shared: 1 }), "{e:?}");
    assert!(e.to_string().contains("max_page_sharing"), "{e}");
    assert_eq!(lock(&lab.ksm).knobs(), knobs, "a refused write changes nothing");
    // The same value, with other knobs changed, is accepted.
    lab.set_knobs(|k| k.pages_to_scan = 7);
    // Once unmerged it can change, and the next pass groups by it.
    lab.unmerge_all();
    lab.set_knobs(|k| k.max_page_sharing = 3);
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing), linux_expected(N, 3), "{s:?}");
}

#[test]
fn smart_scan_age_is_not_reset_by_a_merge() {
    // mm/ksm.c: rmap_item->age counts the scans since the rmap item was
    // created (of a page that was not KSM then); a merge does not reset it.
    // Two '*' pages are looked at in scans 1 and 2 (ages 0 and 1, then 2)
    // and merge in scan 2; while KSM their age stays 2. Then both are
    // rewritten with unique contents (copy-on-write). Scan a: age 2,
    // scanned. Scan b: age 3, scanned, earns 1 skip. Scan c: age 4,
    // skipped. Had the merge reset the age, nothing would be skipped before
    // a fourth scan.
    let lab = Lab::new(Policy::ChangePte, 2, knobs_with(|k| k.smart_scan = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, STAR);
    }
    lab.full_scan();
    lab.full_scan();
    for _ in 0..4 {
        lab.full_scan(); // KSM pages: neither aged nor skipped
    }
    let s = lab.stats();
    assert_eq!((s.pages_shared, s.pages_sharing, s.pages_skipped), (1, 1, 0), "{s:?}");
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0x5151_0000 + gfn);
    }
    let mut skipped = Vec::new();
    for _ in 0..3 {
        lab.full_scan();
        skipped.push(lab.stats().pages_skipped);
    }
    assert_eq!(skipped, [0, 0, 2], "{:?}", lab.stats());
}

#[test]
fn ksm_zero_pages_drops_when_a_write_breaks_the_zero_page_mapping() {
    // Linux lowers ksm_zero_pages when a zero-page pte is unmapped or
    // broken by copy-on-write, not when ksmd next comes by.
    const N: u64 = 16;
    let lab = Lab::new(Policy::ChangePte, N, knobs_with(|k| k.use_zero_pages = true));
    for gfn in lab.gfns() {
        lab.guest.fill(gfn, 0);
    }
    lab.full_pass();
    let s = lab.stats();
    assert_eq!((s.ksm_zero_pages, s.rmap_items, s.pages_volatile), (N, N, 0), "{s:?}");
    for gfn in FIRST_GFN..FIRST_GFN + 4 {
        lab.guest.write(gfn, 0, &[1]);
    }
    let s = lab.stats();
    // The four written pages are in no tree and map no zero page: volatile.
    assert_eq!((s.ksm_zero_pages, s.rmap_items, s.pages_volatile), (N - 4, N, 4), "before a scan: {s:?}");
    assert_eq!(s.general_profit, linux_general_profit(&s), "{s:?}");
    lab.full_scan();
    assert_eq!(lab.stats().ksm_zero_pages, N - 4);
}
