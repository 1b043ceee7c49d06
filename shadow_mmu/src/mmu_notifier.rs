//! The mmu notifier API of include/linux/mmu_notifier.h, as secondary MMUs
//! see it: a range with start, end, event and flags;
//! `invalidate_range_start` / `invalidate_range_end` around every change of
//! the primary MMU; and `change_pte` for one pte changed in between by
//! `set_pte_at_notify`.
//!
//! Deliberate difference (crate docs): ranges are given in guest frame
//! numbers, end exclusive, not in host virtual addresses of the VMM's
//! mapping, since guest RAM is one linear mapping here.

use crate::memory::{PrimaryMmu, Pte};

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

/// The protection a protection-only update leaves on the present ptes of
/// its range (mprotect's `newprot`, as far as a secondary MMU cares).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protection {
    /// No access (`PROT_NONE`).
    None,
    /// Read and execute, no write.
    ReadOnly,
    /// Read, write and execute.
    ReadWrite,
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
    /// For an update that changes only the protection of the range's ptes
    /// (frames unchanged): the protection they have at most afterwards.
    /// `None` for updates that move or drop frames, or do not say. Linux
    /// 5.2 to 6.2 passed the `vma` instead, whose new `vm_flags` told the
    /// same (see [`MmuNotifierRange::update_to_read_only`]).
    pub new_prot: Option<Protection>,
}

impl MmuNotifierRange {
    /// `mmu_notifier_range_init` for [start, end), saying nothing of the
    /// new protection.
    pub fn new(start: Gfn, end: Gfn, event: MmuNotifyEvent, flags: RangeFlags) -> Self {
        Self { start, end, event, flags, new_prot: None }
    }

    /// A blockable range over [start, end) whose update changes only
    /// protection, to `new_prot`: mprotect (PROTECTION_VMA), a soft-dirty
    /// round (SOFT_DIRTY, read-only).
    pub fn protection(start: Gfn, end: Gfn, event: MmuNotifyEvent, new_prot: Protection) -> Self {
        Self { start, end, event, flags: RangeFlags::BLOCKABLE, new_prot: Some(new_prot) }
    }

    /// A one-page range.
    pub fn page(gfn: Gfn, event: MmuNotifyEvent, flags: RangeFlags) -> Self {
        Self::new(gfn, gfn + 1, event, flags)
    }

    /// Whether `gfn` lies in the range.
    pub fn contains(&self, gfn: Gfn) -> bool {
        (self.start..self.end).contains(&gfn)
    }

    /// Whether `change_pte` may be relied on for this range: the flag is
    /// set and legal. On a batch update that only removes write permission
    /// the flag is illegal ([`check_change_pte`] refuses it), so a
    /// subscriber ignores it there and does what the event says.
    pub fn use_change_pte(&self) -> bool {
        self.flags.contains(RangeFlags::USE_CHANGE_PTE) && !self.update_to_read_only()
    }

    /// Whether the update only removes write permission: every frame stays
    /// where it is and stays readable, so a secondary MMU may downgrade its
    /// entries to read-only in place instead of zapping them. True for a
    /// SOFT_DIRTY range (`clear_refs` 4: "still same page and same access
    /// flags", write-protected) and a PROTECTION_VMA range to read-only.
    ///
    /// After `mmu_notifier_range_update_to_read_only` of the 2019 series
    /// (mm/mmu_notifier.c, Linux 5.2 to 6.2; removed unused in 6.3 by
    /// 7d4a8be0c4b2), which was true for a PROTECTION_VMA range whose vma
    /// kept VM_READ. Deliberately narrower and wider: it does not hold for
    /// an mprotect that adds write (Linux's helper did, as the vma stays
    /// readable; see [`MmuNotifierRange::update_adds_write`]), and it holds
    /// for SOFT_DIRTY, which Linux's helper never covered.
    pub fn update_to_read_only(&self) -> bool {
        match self.event {
            MmuNotifyEvent::SoftDirty => true,
            MmuNotifyEvent::ProtectionVma => self.new_prot == Some(Protection::ReadOnly),
            _ => false,
        }
    }

    /// Whether the update only grants write permission (mprotect back to
    /// read-write): frames stay, nothing a secondary MMU maps loses a
    /// permission, so it has nothing to invalidate; its read-only entries
    /// fault on the next write and take the new pte then.
    pub fn update_adds_write(&self) -> bool {
        self.event == MmuNotifyEvent::ProtectionVma && self.new_prot == Some(Protection::ReadWrite)
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

    /// The calling thread begins a batch of ranges (one ksmd slice, one
    /// synchronous pass): until its [`MmuNotifier::batch_end`] the
    /// subscriber may defer the costly part of its updates and apply them
    /// together, as long as nothing it serves can observe the deferral.
    /// Batches nest; the default does nothing.
    ///
    /// Deliberate difference (crate docs): Linux has no such callback. KVM
    /// batches within one range only: `kvm_mmu_notifier_invalidate_range_start`
    /// zaps every spte of the range and flushes remote TLBs once for it
    /// (`kvm_handle_hva_range`), and `invalidate_range_end` lets faults in
    /// again; each range of a KSM merge is bracketed and flushed on its own.
    /// Here making a table change real costs a system call (the VMM's EPT
    /// views), not a TLB flush, so a subscriber may batch across ranges.
    fn batch_start(&mut self) {}

    /// The batch the calling thread began ends: deferred updates are
    /// applied before this returns. `mm` is the primary MMU, its ptes as
    /// the batch left them (Linux passes the mm to every callback of
    /// `mmu_notifier_ops`). The default does nothing.
    fn batch_end(&mut self, _mm: &PrimaryMmu) {}
}

/// A `change_pte` notification the range's USE_CHANGE_PTE flag does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum IllegalChangePte {
    /// The pte change is not one of the three legal transitions.
    #[error(
        "USE_CHANGE_PTE on an illegal transition at gfn {gfn:#x}: {old:?} -> {new:?} \
         (legal: RW->RO same frame, RO->RW any frame, RO->RO other frame)"
    )]
    Transition {
        /// The page.
        gfn: Gfn,
        /// The pte before.
        old: Pte,
        /// The pte after.
        new: Pte,
    },
    /// The range is a batch update that only removes write permission: it
    /// is inferred from the range's event, never through `change_pte`.
    #[error(
        "USE_CHANGE_PTE on a {event:?} range [{start:#x}, {end:#x}) that only removes write \
         permission (a batch update: the event says what happens, not change_pte)"
    )]
    BatchRange {
        /// Range start.
        start: Gfn,
        /// Range end.
        end: Gfn,
        /// The range's event.
        event: MmuNotifyEvent,
    },
}

/// Checks that USE_CHANGE_PTE may be set on `range` for its change of `gfn`
/// from `old` to `new` (the seed patch). The range must not be a batch
/// update that only removes write permission
/// ([`MmuNotifierRange::update_to_read_only`]: "set_pte_at_notify() should
/// not be used when updating a significant range"), and the change must be
/// one of the three legal transitions:
///
/// * read-write -> read-only, same frame (KSM `write_protect_page`);
/// * read-only -> read-write, frame may change (copy-on-write break);
/// * read-only -> read-only, another frame (KSM `replace_page`).
pub fn check_change_pte(range: &MmuNotifierRange, gfn: Gfn, old: Pte, new: Pte) -> Result<(), IllegalChangePte> {
    if range.update_to_read_only() {
        return Err(IllegalChangePte::BatchRange { start: range.start, end: range.end, event: range.event });
    }
    let legal = match (old.writable, new.writable) {
        (true, false) => old.pfn == new.pfn,
        (false, true) => true,
        (false, false) => old.pfn != new.pfn,
        (true, true) => false,
    };
    if legal {
        Ok(())
    } else {
        Err(IllegalChangePte::Transition { gfn, old, new })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pte(pfn: u64, writable: bool) -> Pte {
        Pte { pfn, writable, soft_dirty: false }
    }

    /// The transition check on the one-page range of a KSM step or a
    /// copy-on-write break, where the flag is set.
    fn check_change_pte(gfn: Gfn, old: Pte, new: Pte) -> Result<(), IllegalChangePte> {
        let range = MmuNotifierRange::page(gfn, MmuNotifyEvent::Clear, RangeFlags::USE_CHANGE_PTE);
        super::check_change_pte(&range, gfn, old, new)
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

    #[test]
    fn only_soft_dirty_and_mprotect_to_read_only_update_to_read_only() {
        use MmuNotifyEvent::*;
        let prot = |event, p| MmuNotifierRange::protection(0, 8, event, p);
        assert!(prot(SoftDirty, Protection::ReadOnly).update_to_read_only());
        assert!(MmuNotifierRange::new(0, 8, SoftDirty, RangeFlags::BLOCKABLE).update_to_read_only());
        assert!(prot(ProtectionVma, Protection::ReadOnly).update_to_read_only());
        assert!(!prot(ProtectionVma, Protection::ReadWrite).update_to_read_only());
        assert!(!prot(ProtectionVma, Protection::None).update_to_read_only(), "removing read is no downgrade");
        // A protection change that does not say what it does is no downgrade.
        assert!(!MmuNotifierRange::new(0, 8, ProtectionVma, RangeFlags::BLOCKABLE).update_to_read_only());
        for event in [Clear, Unmap, ProtectionPage, Release] {
            assert!(!MmuNotifierRange::new(0, 8, event, RangeFlags::BLOCKABLE).update_to_read_only(), "{event:?}");
        }
        assert!(prot(ProtectionVma, Protection::ReadWrite).update_adds_write());
        assert!(!prot(ProtectionVma, Protection::ReadOnly).update_adds_write());
        assert!(!prot(SoftDirty, Protection::ReadOnly).update_adds_write());
    }

    #[test]
    fn use_change_pte_is_refused_on_a_range_that_only_removes_write() {
        for event in [MmuNotifyEvent::SoftDirty, MmuNotifyEvent::ProtectionVma] {
            let mut range = MmuNotifierRange::protection(4, 12, event, Protection::ReadOnly);
            range.flags = range.flags | RangeFlags::USE_CHANGE_PTE;
            // Even the transition such a range makes (RW -> RO, same frame),
            // legal on a KSM step's range, is refused here.
            let err = super::check_change_pte(&range, 5, pte(5, true), pte(5, false));
            assert_eq!(err, Err(IllegalChangePte::BatchRange { start: 4, end: 12, event }));
            // And a subscriber does not rely on change_pte for it.
            assert!(!range.use_change_pte() && range.flags.contains(RangeFlags::USE_CHANGE_PTE));
        }
        // An mprotect back to read-write is no read-only update: the
        // transition check alone decides (RO -> RW, same frame, is legal).
        let mut up = MmuNotifierRange::protection(4, 12, MmuNotifyEvent::ProtectionVma, Protection::ReadWrite);
        up.flags = up.flags | RangeFlags::USE_CHANGE_PTE;
        assert!(super::check_change_pte(&up, 5, pte(5, false), pte(5, true)).is_ok());
    }
}
