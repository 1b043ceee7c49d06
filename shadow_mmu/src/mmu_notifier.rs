//! The mmu notifier API of include/linux/mmu_notifier.h, as secondary MMUs
//! see it: a range with start, end, event and flags;
//! `invalidate_range_start` / `invalidate_range_end` around every change of
//! the primary MMU; and `change_pte` for one pte changed in between by
//! `set_pte_at_notify`.
//!
//! Deliberate difference (crate docs): ranges are given in guest frame
//! numbers, end exclusive, not in host virtual addresses of the VMM's
//! mapping, since guest RAM is one linear mapping here.

use crate::memory::Pte;

/// A guest frame number (guest-physical address >> 12).
pub type Gfn = u64;

/// Why the primary MMU changes (`enum mmu_notifier_event`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MmuNotifyEvent {
    /// The ptes are cleared or replaced (KSM merge, copy-on-write break).
    Clear,
    /// The range is unmapped (munmap, MADV_DONTNEED).
    Unmap,
    /// The protection of a whole vma changes (mprotect).
    ProtectionVma,
    /// The protection of one page changes.
    ProtectionPage,
    /// Soft-dirty tracking clears the write bit.
    SoftDirty,
    /// The whole address space goes away (the mm is torn down).
    Release,
}

/// Range flags (`MMU_NOTIFIER_RANGE_BLOCKABLE`, `MMU_NOTIFIER_USE_CHANGE_PTE`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RangeFlags(u32);

impl RangeFlags {
    /// The callee may sleep.
    pub const BLOCKABLE: Self = Self(1 << 0);
    /// Every pte change in the range goes through `change_pte`, and is one
    /// of the legal transitions of [`check_change_pte`]: a secondary MMU may
    /// skip the zap in `invalidate_range_start` and update in place.
    pub const USE_CHANGE_PTE: Self = Self(1 << 1);

    /// No flag.
    pub const fn empty() -> Self {
        Self(0)
    }

    /// Whether every flag of `other` is set.
    pub const fn contains(self, other: Self) -> bool {
        self.0 & other.0 == other.0
    }
}

impl std::ops::BitOr for RangeFlags {
    type Output = Self;
    fn bitor(self, rhs: Self) -> Self {
        Self(self.0 | rhs.0)
    }
}

/// `struct mmu_notifier_range`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmuNotifierRange {
    /// First gfn of the range.
    pub start: Gfn,
    /// One past the last gfn.
    pub end: Gfn,
    /// Why.
    pub event: MmuNotifyEvent,
    /// How.
    pub flags: RangeFlags,
}

impl MmuNotifierRange {
    /// `mmu_notifier_range_init` for [start, end).
    pub fn new(start: Gfn, end: Gfn, event: MmuNotifyEvent, flags: RangeFlags) -> Self {
        Self { start, end, event, flags }
    }

    /// A one-page range.
    pub fn page(gfn: Gfn, event: MmuNotifyEvent, flags: RangeFlags) -> Self {
        Self::new(gfn, gfn + 1, event, flags)
    }

    /// Whether `gfn` lies in the range.
    pub fn contains(&self, gfn: Gfn) -> bool {
        (self.start..self.end).contains(&gfn)
    }

    /// Whether `change_pte` may be relied on for this range.
    pub fn use_change_pte(&self) -> bool {
        self.flags.contains(RangeFlags::USE_CHANGE_PTE)
    }
}

/// A subscriber of the notifier chain (`struct mmu_notifier_ops`).
pub trait MmuNotifier: Send {
    /// Before the primary MMU changes any pte in `range`. When this returns
    /// the subscriber no longer uses the range's current frames (KVM zaps
    /// its sptes here): the primary may free them before the range ends.
    fn invalidate_range_start(&mut self, range: &MmuNotifierRange);
    /// After the change: the subscriber may map the range again, from the
    /// primary's new ptes (KVM lets faults in the range proceed).
    fn invalidate_range_end(&mut self, range: &MmuNotifierRange);
    /// One pte of the range is about to become `pte` (`set_pte_at_notify`).
    fn change_pte(&mut self, gfn: Gfn, pte: Pte);
}

/// A `change_pte` notification the range's USE_CHANGE_PTE flag does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "USE_CHANGE_PTE on an illegal transition at gfn {gfn:#x}: {old:?} -> {new:?} \
     (legal: RW->RO same frame, RO->RW any frame, RO->RO other frame)"
)]
pub struct IllegalChangePte {
    /// The page.
    pub gfn: Gfn,
    /// The pte before.
    pub old: Pte,
    /// The pte after.
    pub new: Pte,
}

/// Checks that `old -> new` is one of the three transitions for which
/// `MMU_NOTIFIER_USE_CHANGE_PTE` may be set (the seed patch):
///
/// * read-write -> read-only, same frame (KSM `write_protect_page`);
/// * read-only -> read-write, frame may change (copy-on-write break);
/// * read-only -> read-only, another frame (KSM `replace_page`).
pub fn check_change_pte(gfn: Gfn, old: Pte, new: Pte) -> Result<(), IllegalChangePte> {
    let legal = match (old.writable, new.writable) {
        (true, false) => old.pfn == new.pfn,
        (false, true) => true,
        (false, false) => old.pfn != new.pfn,
        (true, true) => false,
    };
    if legal {
        Ok(())
    } else {
        Err(IllegalChangePte { gfn, old, new })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pte(pfn: u64, writable: bool) -> Pte {
        Pte { pfn, writable }
    }

    #[test]
    fn the_three_legal_transitions_pass() {
        assert!(check_change_pte(1, pte(5, true), pte(5, false)).is_ok());
        assert!(check_change_pte(1, pte(5, false), pte(6, true)).is_ok());
        assert!(check_change_pte(1, pte(5, false), pte(5, true)).is_ok());
        assert!(check_change_pte(1, pte(5, false), pte(6, false)).is_ok());
    }

    #[test]
    fn every_illegal_transition_is_refused() {
        // RW -> RO onto another frame.
        assert!(check_change_pte(1, pte(5, true), pte(6, false)).is_err());
        // RW -> RW, same frame or another.
        assert!(check_change_pte(1, pte(5, true), pte(5, true)).is_err());
        assert!(check_change_pte(1, pte(5, true), pte(6, true)).is_err());
        // RO -> RO, same frame (no change at all).
        assert!(check_change_pte(1, pte(5, false), pte(5, false)).is_err());
    }

    #[test]
    fn flags_combine() {
        let f = RangeFlags::BLOCKABLE | RangeFlags::USE_CHANGE_PTE;
        assert!(f.contains(RangeFlags::USE_CHANGE_PTE) && f.contains(RangeFlags::BLOCKABLE));
        assert!(!RangeFlags::BLOCKABLE.contains(RangeFlags::USE_CHANGE_PTE));
        let r = MmuNotifierRange::page(7, MmuNotifyEvent::Clear, f);
        assert!(r.use_change_pte() && r.contains(7) && !r.contains(8));
    }
}
