//! A fleet under test: N guests over one frame pool
//! ([`GuestMmus::new_fleet_recording`]), each its own primary MMU (one mm)
//! and secondary MMU behind a [`RecordingView`], and one deduplicator
//! ([`Ksm::new_in`]) with every mm entered ([`Ksm::ksm_enter`]), in guest
//! order: the mm list of mm/ksm.c over several processes.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use ksm::{Ksm, KsmKnobs, KsmMmStats, KsmStats, MmId};
use shadow_mmu::{lock, FleetLayout, Gfn, GuestMmus, Pfn, Policy, PrimaryMmu, RecordingView, PAGE_SHIFT};

use super::{GuestPages, FIRST_GFN, PAGE};

/// The fleet.
pub struct Fleet {
    /// Guest k's MMUs; guest accesses through [`GuestPages`].
    pub guests: Vec<GuestMmus<RecordingView>>,
    /// Guest k's mm on the deduplicator's list.
    pub ids: Vec<MmId>,
    pub ksm: Arc<Mutex<Ksm>>,
    pub policy: Policy,
    pub end: Gfn,
}

impl Fleet {
    /// `guests` guests of `pages` guest pages each from [`FIRST_GFN`], one
    /// spare frame per guest and one for KSM's zero page.
    pub fn new(policy: Policy, guests: u64, pages: u64, knobs: KsmKnobs) -> Self {
        let end = FIRST_GFN + pages;
        let layout = FleetLayout { guests, first_gfn: FIRST_GFN, end_gfn: end };
        let mmus = GuestMmus::new_fleet_recording(policy, layout, 1).expect("fleet over one pool");
        let frames = lock(&mmus[0].mm).frames().clone();
        let mut ksm = Ksm::new_in(&frames, knobs).expect("deduplicator");
        assert_eq!(frames.nr_free_frames(), guests, "one spare frame per guest after KSM took its zero page");
        let ids = mmus.iter().map(|g| ksm.ksm_enter(g.mm.clone()).expect("ksm_enter")).collect();
        Self { guests: mmus, ids, ksm: Arc::new(Mutex::new(ksm)), policy, end }
    }

    pub fn gfns(&self) -> std::ops::Range<Gfn> {
        FIRST_GFN..self.end
    }

    pub fn pages(&self) -> u64 {
        self.end - FIRST_GFN
    }

    pub fn host(&self, k: usize) -> MutexGuard<'_, PrimaryMmu> {
        lock(&self.guests[k].mm)
    }

    /// Fills every page of guest `k` with `word`.
    pub fn fill_all(&self, k: usize, word: u64) {
        for gfn in self.gfns() {
            self.guests[k].fill(gfn, word);
        }
    }

    pub fn stats(&self) -> KsmStats {
        lock(&self.ksm).stats()
    }

    pub fn mm_stats(&self, k: usize) -> KsmMmStats {
        lock(&self.ksm).mm_stats(self.ids[k]).expect("an mm on the list")
    }

    pub fn full_pass(&self) -> u32 {
        lock(&self.ksm).full_pass().expect("full pass")
    }

    /// `ksm_do_scan` of `pages` pages: returns the pages looked at.
    pub fn scan(&self, pages: u64) -> u64 {
        lock(&self.ksm).ksm_do_scan(pages).expect("ksm_do_scan")
    }

    /// The frame guest `k`'s page `gfn` maps in its primary MMU.
    pub fn pfn(&self, k: usize, gfn: Gfn) -> Pfn {
        self.host(k).pte(gfn).expect("pte").pfn
    }

    /// Guest `k`'s page `gfn` as its primary MMU maps it.
    pub fn page(&self, k: usize, gfn: Gfn) -> Vec<u8> {
        let mut buf = vec![0u8; PAGE];
        self.host(k).read_guest(gfn << PAGE_SHIFT, &mut buf).expect("read_guest");
        buf
    }

    /// Recounts, from the page tables of guests `ks`, what the sysfs
    /// figures must say: for each KSM frame those guests map (the zero page
    /// aside), one pages_shared and a pages_sharing per further page.
    /// Returns (pages_shared, pages_sharing) and, per guest, its pages that
    /// map a KSM frame (ksm_merging_pages).
    pub fn recount(&self, ks: &[usize]) -> ((u64, u64), Vec<u64>) {
        let zero = lock(&self.ksm).zero_pfn();
        let mut mappers: BTreeMap<Pfn, u64> = BTreeMap::new();
        let mut merging = Vec::new();
        for &k in ks {
            let host = self.host(k);
            let mut mine = 0;
            for gfn in self.gfns() {
                let pfn = host.pte(gfn).expect("pte").pfn;
                if pfn != zero && host.frame(pfn).ksm {
                    *mappers.entry(pfn).or_default() += 1;
                    mine += 1;
                }
            }
            merging.push(mine);
        }
        let shared = mappers.len() as u64;
        ((shared, mappers.values().sum::<u64>() - shared), merging)
    }

    /// Every guest's secondary MMU follows its own primary MMU: each
    /// present EPT entry maps the host pte's frame and is never writable
    /// over a read-only pte, and the view holds what the table holds (once
    /// ksmd's batch of view updates, if one is open, has ended).
    pub fn check_coherent(&self) {
        for (k, guest) in self.guests.iter().enumerate() {
            let host = lock(&guest.mm);
            if host.is_exited() {
                continue;
            }
            let mmu = lock(&guest.mmu);
            for gfn in self.gfns() {
                let pte = host.pte(gfn).expect("pte");
                let entry = mmu.ept().lookup(gfn);
                if let Some(e) = entry {
                    assert_eq!(e.pfn(), pte.pfn, "{:?}: guest {k} gfn {gfn:#x}: a stale frame", self.policy);
                    assert!(pte.writable || !e.writable(), "{:?}: guest {k} gfn {gfn:#x} writable", self.policy);
                }
                // Inside ksmd's batch the view lags the table until its end.
                if !mmu.in_batch() {
                    let view = mmu.view().pages.get(&gfn).copied();
                    let table = entry.map(|e| (e.pfn(), e.writable()));
                    assert_eq!(view, table, "{:?}: guest {k} gfn {gfn:#x}", self.policy);
                }
            }
        }
    }
}
