//! The end of an mm (`exit_mmap`, mm/mmap.c): a guest that ends gives its
//! frames back to the pool it shares with other guests.

use super::{PrimaryMmu, PrimaryMmuError};
use crate::mmu_notifier::{MmuNotifierRange, MmuNotifyEvent, RangeFlags};

impl PrimaryMmu {
    /// `exit_mmap`: inside one RELEASE range over guest RAM, which every
    /// secondary MMU zaps whatever its policy (Linux calls the subscribers'
    /// `release` first, where KVM zaps everything; the range does that
    /// here), every pte goes and its frame loses a map and a reference: a
    /// frame only this mm mapped is freed and punched, a KSM page other
    /// guests still map stays theirs. Afterwards the mm has no guest page
    /// (every gfn is [`PrimaryMmuError::NotGuestRam`], the guest range is
    /// empty); its boot frames stay reserved, as the VMM may still have
    /// them in a memslot. A second call does nothing.
    ///
    /// The guest's vCPU must be stopped first, and the deduplicator told
    /// (the `ksm` crate's `ksm_exit`; a scanner that meets an exited mm
    /// frees its rmap items itself, as mm/ksm.c's `ksm_test_exit` does).
    pub fn exit_mmap(&mut self) -> Result<(), PrimaryMmuError> {
        if self.exited {
            return Ok(());
        }
        let (first, end) = self.guest_range();
        let range = MmuNotifierRange::new(first, end, MmuNotifyEvent::Release, RangeFlags::BLOCKABLE);
        self.exited = true;
        self.vm_write.clear();
        let result = self.within_range(&range, |mm| {
            for pte in std::mem::take(&mut mm.ptes) {
                mm.unmap_frame(pte.pfn)?;
            }
            Ok(())
        });
        result.and_then(|()| self.flush_holes())
    }

    /// Whether [`PrimaryMmu::exit_mmap`] ran (`ksm_test_exit`).
    pub fn is_exited(&self) -> bool {
        self.exited
    }
}
