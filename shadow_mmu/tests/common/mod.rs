//! What the property, count and race tests of the secondary MMU share: one
//! guest's MMUs ([`GuestMmus`]: a frame pool, the primary MMU, a pre-faulted
//! secondary MMU behind a [`RecordingView`]) next to a plain reference of
//! what each guest page holds (one word at offset 0 of each page), whether
//! it was written since the last soft-dirty round and whether the host
//! mprotect'ed it read-only; the guest accesses, KSM steps and batch
//! protections the tests make, and the invariants checked after each.

#![allow(dead_code)] // each test binary uses a subset

pub(crate) mod invariants;

use std::ops::Range;

use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use shadow_mmu::{
    lock, Access, FaultError, Gfn, GuestMmus, MmuNotifierRange, MmuNotifyEvent, Pfn, Policy, PrimaryMmuError, Pte,
    RangeFlags, RecordingView, SecondaryMmu, PAGE_SHIFT,
};
use vm_memory::{Bytes, GuestAddress};

use invariants::{check_invariants, check_soft_dirty, check_tables};

/// First guest page of the deterministic tests; frames 0 and 1 are the
/// VMM's boot memory.
pub(crate) const FIRST_GFN: Gfn = 2;
/// Every policy, for the tests that run under all of them.
pub(crate) const POLICIES: [Policy; 4] = [Policy::ChangePte, Policy::RangeFlush, Policy::Legacy, Policy::EventAware];
/// The policies that zap a batch range (as their KVMs do).
pub(crate) const ZAPPING_POLICIES: [Policy; 3] = [Policy::ChangePte, Policy::RangeFlush, Policy::Legacy];

pub(crate) type Mmu = SecondaryMmu<RecordingView>;
pub(crate) type Res<T = ()> = Result<T, TestCaseError>;

/// Turns an error of the crate under test into a test failure.
pub(crate) trait OrFail<T> {
    fn or_fail(self, what: &str) -> Res<T>;
}

impl<T, E: std::fmt::Display> OrFail<T> for Result<T, E> {
    fn or_fail(self, what: &str) -> Res<T> {
        self.map_err(|e| TestCaseError::fail(format!("{what}: {e}")))
    }
}

/// The reference: what the guest must read at offset 0 of each page, which
/// pages were written since the last soft-dirty round (every page before
/// the first), and which the host mprotect'ed read-only.
#[derive(Debug, Clone)]
pub(crate) struct Model {
    pub(crate) first: Gfn,
    pub(crate) words: Vec<u64>,
    pub(crate) soft_dirty: Vec<bool>,
    pub(crate) read_only: Vec<bool>,
}

impl Model {
    fn new(first: Gfn, words: &[u64]) -> Self {
        let n = words.len();
        Self { first, words: words.to_vec(), soft_dirty: vec![true; n], read_only: vec![false; n] }
    }

    fn index(&self, gfn: Gfn) -> usize {
        (gfn - self.first) as usize
    }

    /// Whether a write to `gfn` must be refused (its vma is read-only).
    pub(crate) fn is_read_only(&self, gfn: Gfn) -> bool {
        self.read_only[self.index(gfn)]
    }

    /// Whether `gfn` was written since the last round.
    pub(crate) fn is_soft_dirty(&self, gfn: Gfn) -> bool {
        self.soft_dirty[self.index(gfn)]
    }

    pub(crate) fn gfns(&self) -> Range<Gfn> {
        self.first..self.first + self.words.len() as u64
    }

    pub(crate) fn get(&self, gfn: Gfn) -> u64 {
        self.words[(gfn - self.first) as usize]
    }

    fn set(&mut self, gfn: Gfn, word: u64) {
        let i = self.index(gfn);
        self.words[i] = word;
        self.soft_dirty[i] = true;
    }

    /// The other pages holding the same word as `gfn`: candidates for a merge.
    pub(crate) fn equal_pages(&self, gfn: Gfn) -> Vec<Gfn> {
        self.gfns().filter(|&g| g != gfn && self.get(g) == self.get(gfn)).collect()
    }
}

/// What an operation turned into once resolved against the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Step {
    Guest {
        gfn: Gfn,
        access: Access,
    },
    Merge {
        a: Gfn,
        b: Gfn,
        replaced: bool,
    },
    MergeSkipped,
    WriteProtect(Gfn),
    ProtectRange {
        start: Gfn,
        end: Gfn,
    },
    ForceCow(Gfn),
    /// A write (by the guest or a host-side fault) the host refused: the
    /// page's vma is read-only.
    WriteRefused(Gfn),
    SoftDirty {
        start: Gfn,
        end: Gfn,
    },
    Mprotect {
        start: Gfn,
        end: Gfn,
        writable: bool,
    },
}

/// A guest's MMUs and the reference.
pub(crate) struct Lab {
    pub(crate) mmus: GuestMmus<RecordingView>,
    pub(crate) model: Model,
}

impl Lab {
    /// Guest pages [first, first + words.len()) holding `words`, pre-faulted
    /// in the EPT, with one spare frame in the pool.
    pub(crate) fn new(policy: Policy, first: Gfn, words: &[u64]) -> Self {
        let end = first + words.len() as u64;
        let mmus = GuestMmus::new_recording(policy, first, end, 1).expect("frame pool (memfd)");
        {
            let mut host = lock(&mmus.mm);
            for (gfn, word) in (first..).zip(words) {
                host.write_guest(gfn << PAGE_SHIFT, &word.to_ne_bytes()).expect("initial contents");
            }
        }
        Self { mmus, model: Model::new(first, words) }
    }

    fn frame_word(&self, pfn: Pfn) -> Res<u64> {
        let at = GuestAddress(pfn << PAGE_SHIFT);
        self.mmus.pool.direct_map().read_obj::<u64>(at).or_fail("read through the direct map")
    }

    /// The frame a guest `access` to `gfn` reaches: the EPT entry's if it
    /// allows the access, else the one the EPT-violation handler installs.
    /// Either way the EPT must then hold an entry that allows the access
    /// and maps that frame.
    fn guest_frame(&self, gfn: Gfn, access: Access) -> Res<Pfn> {
        let pfn = self.mmus.guest_frame(gfn, access).or_fail("EPT violation")?;
        let entry = lock(&self.mmus.mmu).ept().lookup(gfn);
        prop_assert!(
            entry.is_some_and(|e| (access != Access::Write || e.writable()) && e.pfn() == pfn),
            "after a {access:?} access to gfn {gfn}, the EPT holds {entry:?}, the access reached frame {pfn}"
        );
        Ok(pfn)
    }

    pub(crate) fn guest_read(&self, gfn: Gfn, access: Access) -> Res {
        let pfn = self.guest_frame(gfn, access)?;
        let word = self.frame_word(pfn)?;
        prop_assert_eq!(word, self.model.get(gfn), "guest {:?} of gfn {} (frame {})", access, gfn, pfn);
        Ok(())
    }

    /// A guest write the host must refuse (the vma is read-only): the
    /// fault fails with that reason and nothing changes.
    pub(crate) fn guest_write_refused(&self, gfn: Gfn) -> Res<Step> {
        let refused = self.mmus.guest_frame(gfn, Access::Write);
        prop_assert!(
            matches!(refused, Err(FaultError::Host(PrimaryMmuError::WriteToReadOnlyVma(g))) if g == gfn),
            "a write to read-only gfn {} gave {:?}",
            gfn,
            refused
        );
        Ok(Step::WriteRefused(gfn))
    }

    /// A guest write, or its refusal if the page's vma is read-only.
    pub(crate) fn guest_write_or_refused(&mut self, gfn: Gfn, word: u64) -> Res<Step> {
        if self.model.is_read_only(gfn) {
            return self.guest_write_refused(gfn);
        }
        self.guest_write(gfn, word)?;
        Ok(Step::Guest { gfn, access: Access::Write })
    }

    /// A write fault's copy-on-write break taken on the host side, or its
    /// refusal if the page's vma is read-only.
    pub(crate) fn force_cow(&mut self, gfn: Gfn) -> Res<Step> {
        let result = lock(&self.mmus.mm).get_user_page(gfn, true);
        if self.model.is_read_only(gfn) {
            prop_assert!(
                matches!(result, Err(PrimaryMmuError::WriteToReadOnlyVma(g)) if g == gfn),
                "a host write fault on read-only gfn {} gave {:?}",
                gfn,
                result
            );
            return Ok(Step::WriteRefused(gfn));
        }
        result.or_fail("get_user_page(write)")?;
        let i = self.model.index(gfn);
        self.model.soft_dirty[i] = true;
        Ok(Step::ForceCow(gfn))
    }

    /// A soft-dirty round over [start, end).
    pub(crate) fn soft_dirty_round(&mut self, start: Gfn, end: Gfn) -> Res<Step> {
        lock(&self.mmus.mm).clear_refs_soft_dirty(start, end).or_fail("clear_refs_soft_dirty")?;
        for gfn in start..end {
            let i = self.model.index(gfn);
            self.model.soft_dirty[i] = false;
        }
        Ok(Step::SoftDirty { start, end })
    }

    /// mprotect of [start, end) to read-only or back to read-write.
    pub(crate) fn mprotect(&mut self, start: Gfn, end: Gfn, writable: bool) -> Res<Step> {
        lock(&self.mmus.mm).mprotect(start, end, writable).or_fail("mprotect")?;
        for gfn in start..end {
            let i = self.model.index(gfn);
            self.model.read_only[i] = !writable;
        }
        Ok(Step::Mprotect { start, end, writable })
    }

    pub(crate) fn guest_write(&mut self, gfn: Gfn, word: u64) -> Res {
        let pfn = self.guest_frame(gfn, Access::Write)?;
        self.mmus
            .pool
            .direct_map()
            .write_obj(word, GuestAddress(pfn << PAGE_SHIFT))
            .or_fail("write through the direct map")?;
        self.model.set(gfn, word);
        Ok(())
    }

    /// mm/ksm.c's `try_to_merge_one_page` for two pages: write-protect both,
    /// compare them, then map `b` onto `a`'s frame.
    pub(crate) fn merge_pages(&self, a: Gfn, b: Gfn, ksm: bool) -> Res<Step> {
        let mut host = lock(&self.mmus.mm);
        host.write_protect_page(a).or_fail("write_protect_page(a)")?;
        host.write_protect_page(b).or_fail("write_protect_page(b)")?;
        let (mut wa, mut wb) = ([0u8; 8], [0u8; 8]);
        host.read_guest(a << PAGE_SHIFT, &mut wa).or_fail("read a")?;
        host.read_guest(b << PAGE_SHIFT, &mut wb).or_fail("read b")?;
        prop_assert_eq!(wa, wb, "pages {} and {} differ once write-protected", a, b);
        let kpfn = host.pte(a).or_fail("pte a")?.pfn;
        // Already on the same frame (merged before): nothing to replace, and
        // RO -> RO on the same frame is not a legal USE_CHANGE_PTE transition.
        let replaced = host.pte(b).or_fail("pte b")?.pfn != kpfn;
        if replaced {
            host.replace_page(b, kpfn).or_fail("replace_page")?;
        }
        if ksm {
            host.set_ksm(kpfn, true);
        }
        Ok(Step::Merge { a, b, replaced })
    }

    /// A protection change over [start, end) without USE_CHANGE_PTE: every
    /// policy must zap in `invalidate_range_start`.
    pub(crate) fn protect_range(&self, start: Gfn, end: Gfn) -> Res<Step> {
        let range = MmuNotifierRange::new(start, end, MmuNotifyEvent::ProtectionVma, RangeFlags::BLOCKABLE);
        let mut host = lock(&self.mmus.mm);
        host.invalidate_range_start(&range);
        {
            let mmu = lock(&self.mmus.mmu);
            for gfn in start..end {
                prop_assert!(mmu.ept().lookup(gfn).is_none(), "gfn {} still mapped inside an unflagged range", gfn);
            }
        }
        for gfn in start..end {
            let pte = host.pte(gfn).or_fail("pte")?;
            if pte.writable {
                host.set_pte_at_notify(&range, gfn, Pte { writable: false, ..pte }).or_fail("set_pte_at_notify")?;
            }
        }
        host.invalidate_range_end(&range);
        Ok(Step::ProtectRange { start, end })
    }

    /// Checks every invariant (after punching the holes of freed frames),
    /// the soft-dirty reference included.
    pub(crate) fn check(&self) -> Res {
        self.check_mmus()?;
        check_soft_dirty(&lock(&self.mmus.mm), &self.model)
    }

    /// Checks every invariant but the soft-dirty reference, which guest
    /// writes made behind the model's back (the race tests') do not keep.
    pub(crate) fn check_mmus(&self) -> Res {
        // Freed frames go back to the host in batches: flush, then every
        // free frame must be a punched hole.
        let mut host = lock(&self.mmus.mm);
        host.flush_holes().or_fail("flush_holes")?;
        check_invariants(&host, &lock(&self.mmus.mmu), &self.mmus.pool, &self.model)
    }

    /// [`Lab::check`] inside a batch, where the view lags the EPT: every
    /// invariant but the view's.
    pub(crate) fn check_in_batch(&self) -> Res {
        let mut host = lock(&self.mmus.mm);
        host.flush_holes().or_fail("flush_holes")?;
        check_tables(&host, &lock(&self.mmus.mmu), &self.mmus.pool, &self.model)?;
        check_soft_dirty(&host, &self.model)
    }

    /// Every page read by the guest, through the secondary MMU.
    pub(crate) fn sweep(&self) -> Res {
        for gfn in self.model.gfns() {
            self.guest_read(gfn, Access::Read)?;
        }
        Ok(())
    }
}
