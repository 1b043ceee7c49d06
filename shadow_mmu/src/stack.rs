//! Guest memory with both MMUs wired together: a frame pool, the primary MMU
//! over the guest's pages, and a pre-faulted secondary MMU registered with
//! it. The VMM builds one per VM; the tests build one per scenario. A fleet
//! of guests shares one pool ([`FleetLayout`], [`GuestMmus::new_in`]): each
//! guest has its own primary and secondary MMU, and its notifier reaches
//! only its own secondary MMU.
//!
//! ```
//! use shadow_mmu::{Access, GuestMmus, Policy, RecordingView};
//!
//! // Guest pages 16..64 over a pool with one spare frame.
//! let mmus = GuestMmus::new_recording(Policy::ChangePte, 16, 64, 1).unwrap();
//! mmus.guest_write(20 << 12, b"hello").unwrap();
//! let mut buf = [0u8; 5];
//! mmus.guest_read(20 << 12, &mut buf).unwrap();
//! assert_eq!(&buf, b"hello");
//! assert_eq!(mmus.guest_frame(20, Access::Read).unwrap(), 20);
//! ```

use std::sync::{Arc, Mutex};

use vm_memory::{Bytes, GuestAddress};

use crate::frame_pool::{FramePool, FramePoolError, Pfn, PAGE_SHIFT, PAGE_SIZE};
use crate::memory::{Frames, PrimaryMmu, PrimaryMmuError};
use crate::mmu_notifier::Gfn;
use crate::secondary_mmu::{handle_ept_violation, Access, FaultError, Policy, SecondaryMmu};
use crate::view::{EptView, RecordingView};
use crate::{lock, Pte};

/// Errors of a guest access made through the secondary MMU.
#[derive(Debug, thiserror::Error)]
pub enum GuestAccessError<E: std::error::Error + 'static> {
    /// The access crosses a page boundary (each page may map another frame).
    #[error("a guest access of {len} bytes at gpa {gpa:#x} crosses a page boundary")]
    CrossesPage {
        /// Where the access starts.
        gpa: u64,
        /// Its length.
        len: usize,
    },
    /// The EPT-violation handler failed.
    #[error("EPT violation at gfn {gfn:#x}")]
    Fault {
        /// The page.
        gfn: Gfn,
        /// What failed.
        #[source]
        source: FaultError<E>,
    },
    /// The frame could not be read or written through the direct map.
    #[error("frame {pfn:#x} through the direct map")]
    DirectMap {
        /// The frame.
        pfn: Pfn,
        /// What failed.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
}

/// The frame pool and the two MMUs of one guest.
#[derive(Debug)]
pub struct GuestMmus<V: EptView> {
    /// Host physical memory.
    pub pool: Arc<FramePool>,
    /// The primary MMU (the host page table of guest RAM).
    pub mm: Arc<Mutex<PrimaryMmu>>,
    /// The secondary MMU, registered with the primary.
    pub mmu: Arc<Mutex<SecondaryMmu<V>>>,
}

impl<V: EptView> Clone for GuestMmus<V> {
    fn clone(&self) -> Self {
        Self { pool: self.pool.clone(), mm: self.mm.clone(), mmu: self.mmu.clone() }
    }
}

impl<V: EptView + 'static> GuestMmus<V> {
    /// The primary MMU over guest pages [first_gfn, end_gfn) of `pool`
    /// (page n on frame n, see [`PrimaryMmu::new`]) and a secondary MMU
    /// pre-faulted from it over `view`, which the caller built with the
    /// same mapping. The secondary MMU hears of every later change.
    pub fn new(pool: Arc<FramePool>, first_gfn: Gfn, end_gfn: Gfn, policy: Policy, view: V) -> Self {
        Self::wire(pool.clone(), PrimaryMmu::new(pool, first_gfn, end_gfn), policy, view)
    }

    /// One guest of a fleet over `frames`: the primary MMU of
    /// [`PrimaryMmu::new_in`] (guest-physical page n on frame `base_pfn +
    /// n`) and a secondary MMU pre-faulted from it over `view`, which the
    /// caller built with that mapping. The secondary MMU hears of every
    /// later change of this guest's primary MMU, and of no other guest's.
    pub fn new_in(
        frames: &Arc<Frames>,
        first_gfn: Gfn,
        end_gfn: Gfn,
        base_pfn: Pfn,
        policy: Policy,
        view: V,
    ) -> Result<Self, PrimaryMmuError> {
        let mm = PrimaryMmu::new_in(frames.clone(), first_gfn, end_gfn, base_pfn)?;
        Ok(Self::wire(frames.pool().clone(), mm, policy, view))
    }

    /// A secondary MMU pre-faulted from `mm` over `view`, registered with it.
    fn wire(pool: Arc<FramePool>, mut mm: PrimaryMmu, policy: Policy, view: V) -> Self {
        let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(policy, view, &mm)));
        mm.mmu_notifier_register(mmu.clone());
        Self { pool, mm: Arc::new(Mutex::new(mm)), mmu }
    }

    /// The frame a guest `access` to `gfn` reaches: the EPT entry's if it
    /// allows the access, else the one the EPT-violation handler installs.
    pub fn guest_frame(&self, gfn: Gfn, access: Access) -> Result<Pfn, FaultError<V::Error>> {
        let allows = |writable: bool| access != Access::Write || writable;
        if let Some(e) = lock(&self.mmu).ept().lookup(gfn).filter(|e| allows(e.writable())) {
            return Ok(e.pfn());
        }
        handle_ept_violation(&self.mm, &self.mmu, gfn, access).map(|pte: Pte| pte.pfn)
    }

    /// A guest read of `buf.len()` bytes at `gpa`, within one page, as a
    /// vCPU performs it: through the EPT entry, faulting it in first if
    /// needed. The entry is looked up again under the secondary MMU's lock,
    /// so a change racing with the fault is never read through.
    pub fn guest_read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), GuestAccessError<V::Error>> {
        self.guest_access(gpa, buf.len(), Access::Read, |pool, at| pool.direct_map().read_slice(buf, at))
    }

    /// A guest write within one page, as a vCPU performs it (a write fault
    /// breaks copy-on-write first).
    pub fn guest_write(&self, gpa: u64, data: &[u8]) -> Result<(), GuestAccessError<V::Error>> {
        self.guest_access(gpa, data.len(), Access::Write, |pool, at| pool.direct_map().write_slice(data, at))
    }

    /// A guest `access` of `len` bytes at `gpa`, within one page, as a vCPU
    /// performs it: `through` runs on the frame's address in the direct map
    /// under the secondary MMU's lock, once the EPT entry allows the access
    /// (faulting it in first if needed), so no invalidation overlaps it. A
    /// read and a write done together (what [`GuestMmus::guest_read`] and
    /// [`GuestMmus::guest_write`] do alone) see the same frame.
    pub fn guest_access(
        &self,
        gpa: u64,
        len: usize,
        access: Access,
        mut through: impl FnMut(&FramePool, GuestAddress) -> Result<(), vm_memory::GuestMemoryError>,
    ) -> Result<(), GuestAccessError<V::Error>> {
        let offset = gpa & (PAGE_SIZE - 1);
        if offset + len as u64 > PAGE_SIZE {
            return Err(GuestAccessError::CrossesPage { gpa, len });
        }
        let gfn = gpa >> PAGE_SHIFT;
        loop {
            {
                let mmu = lock(&self.mmu);
                if let Some(e) = mmu.ept().lookup(gfn).filter(|e| access != Access::Write || e.writable()) {
                    let at = GuestAddress((e.pfn() << PAGE_SHIFT) + offset);
                    return through(&self.pool, at)
                        .map_err(|source| GuestAccessError::DirectMap { pfn: e.pfn(), source });
                }
            }
            handle_ept_violation(&self.mm, &self.mmu, gfn, access)
                .map_err(|source| GuestAccessError::Fault { gfn, source })?;
        }
    }
}

/// Where the guests of a fleet lie in one frame pool: guest i's physical
/// memory (its boot frames, then its RAM) is frames [i * end_gfn, (i + 1) *
/// end_gfn), so its base frame ([`PrimaryMmu::new_in`]) is `i * end_gfn`;
/// after the last guest come one spare frame per guest (the spare-frame
/// rule: a copy-on-write break always finds a free frame) and whatever
/// extra frames the caller asks for (the deduplicator's zero page). A fleet
/// of one is the single guest's layout: guest page n on frame n.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FleetLayout {
    /// Number of guests.
    pub guests: u64,
    /// First guest page of each guest (below it: boot memory).
    pub first_gfn: Gfn,
    /// One past the last guest page of each guest.
    pub end_gfn: Gfn,
}

impl FleetLayout {
    /// The frame of guest `guest`'s guest-physical page 0.
    pub fn base_pfn(&self, guest: u64) -> Pfn {
        guest * self.end_gfn
    }

    /// The frames the pool needs: every guest's, one spare per guest, and
    /// `extra` more.
    pub fn nr_frames(&self, extra: u64) -> u64 {
        self.guests * (self.end_gfn + 1) + extra
    }

    /// The view a guest's secondary MMU starts with, for a
    /// [`RecordingView`]: each guest page on its frame, writable.
    pub fn recording_view(&self, guest: u64) -> RecordingView {
        let base = self.base_pfn(guest);
        RecordingView {
            pages: (self.first_gfn..self.end_gfn).map(|gfn| (gfn, (base + gfn, true))).collect(),
            ..RecordingView::default()
        }
    }
}

impl GuestMmus<RecordingView> {
    /// `layout.guests` guests over one fresh memfd pool of
    /// `layout.nr_frames(extra)` frames, each behind a [`RecordingView`]
    /// that starts with what its pre-faulted table maps: the fleet the
    /// tests build.
    pub fn new_fleet_recording(policy: Policy, layout: FleetLayout, extra: u64) -> Result<Vec<Self>, PrimaryMmuError> {
        let pool = Arc::new(FramePool::new(layout.nr_frames(extra) * PAGE_SIZE)?);
        let frames = Frames::new(pool);
        (0..layout.guests)
            .map(|i| {
                let view = layout.recording_view(i);
                Self::new_in(&frames, layout.first_gfn, layout.end_gfn, layout.base_pfn(i), policy, view)
            })
            .collect()
    }

    /// Guest pages [first_gfn, end_gfn) over a fresh memfd pool with
    /// `spare_frames` more frames past them, behind a [`RecordingView`]
    /// that starts with what the pre-faulted table maps: the stack the
    /// tests build.
    pub fn new_recording(
        policy: Policy,
        first_gfn: Gfn,
        end_gfn: Gfn,
        spare_frames: u64,
    ) -> Result<Self, FramePoolError> {
        let pool = Arc::new(FramePool::new((end_gfn + spare_frames) * PAGE_SIZE)?);
        let view = RecordingView {
            pages: (first_gfn..end_gfn).map(|gfn| (gfn, (gfn, true))).collect(),
            ..RecordingView::default()
        };
        Ok(Self::new(pool, first_gfn, end_gfn, policy, view))
    }
}
