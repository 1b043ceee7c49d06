//! The invariants that hold under every policy between two steps: no stale
//! or over-permissive EPT entry, the view is the EPT, the host's memory
//! holds the reference, no writable pte where the vma is read-only or the
//! page is not soft-dirty, every frame is accounted for; and the host's
//! soft-dirty bits are the reference's.

use std::collections::BTreeMap;

use proptest::prelude::*;
use shadow_mmu::{FramePool, Gfn, Pfn, PrimaryMmu, Pte, PAGE_SHIFT, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress};

use super::{Mmu, Model, OrFail, Res};

/// What the EPT maps: gfn -> (frame, writable).
pub(crate) fn ept_pages(mmu: &Mmu) -> BTreeMap<Gfn, (Pfn, bool)> {
    mmu.ept().iter().map(|(gfn, e)| (gfn, (e.pfn(), e.writable()))).collect()
}

/// The invariants that hold under every policy whenever no notifier range
/// and no batch is open.
pub(crate) fn check_invariants(host: &PrimaryMmu, mmu: &Mmu, pool: &FramePool, model: &Model) -> Res {
    check_tables(host, mmu, pool, model)?;
    // 3. The view is the EPT.
    prop_assert_eq!(&mmu.view().pages, &ept_pages(mmu), "the view differs from the EPT");
    Ok(())
}

/// The invariants that hold whenever no notifier range is open, inside a
/// batch too (where the view lags the EPT): every one but the view's.
pub(crate) fn check_tables(host: &PrimaryMmu, mmu: &Mmu, pool: &FramePool, model: &Model) -> Res {
    let ept = ept_pages(mmu);
    prop_assert_eq!(ept.len() as u64, mmu.ept().len(), "EPT leaf count");
    for (&gfn, &(pfn, writable)) in &ept {
        let pte = host.pte(gfn).or_fail("an EPT leaf outside guest RAM")?;
        // 1. No stale frame.
        prop_assert_eq!(pfn, pte.pfn, "EPT maps gfn {} to frame {}, the host to {:?}", gfn, pfn, pte);
        // 2. Never writable where the host is read-only.
        prop_assert!(!writable || pte.writable, "EPT maps gfn {} writable, the host pte is {:?}", gfn, pte);
    }

    // The host's memory holds the reference, and a writable pte maps a
    // frame of its own (else a write would show through another page).
    let ptes: Vec<(Gfn, Pte)> =
        model.gfns().map(|gfn| host.pte(gfn).map(|pte| (gfn, pte))).collect::<Result<_, _>>().or_fail("pte")?;
    for &(gfn, pte) in &ptes {
        let mut word = [0u8; 8];
        host.read_guest(gfn << PAGE_SHIFT, &mut word).or_fail("read_guest")?;
        prop_assert_eq!(u64::from_ne_bytes(word), model.get(gfn), "host view of gfn {}", gfn);
        let frame = host.frame(pte.pfn);
        prop_assert!(
            !pte.writable || (frame.mapcount == 1 && !frame.ksm),
            "gfn {} is writable on frame {} ({:?})",
            gfn,
            pte.pfn,
            frame
        );
        // 4. The vma's protection and soft-dirty tracking hold: a writable
        // pte lies in a writable vma and is soft-dirty (its write reached
        // the host, or will without another fault).
        let vma_writable = host.vma_writable(gfn).or_fail("vma_writable")?;
        prop_assert_eq!(vma_writable, !model.is_read_only(gfn), "VM_WRITE of gfn {}", gfn);
        prop_assert!(!pte.writable || (vma_writable && pte.soft_dirty), "gfn {}: {:?}", gfn, pte);
    }

    // 5. Frame accounting.
    let mut mappers: BTreeMap<Pfn, u32> = BTreeMap::new();
    for (_, pte) in &ptes {
        *mappers.entry(pte.pfn).or_default() += 1;
    }
    let mut free = 0;
    for pfn in 0..pool.nr_frames() {
        let frame = host.frame(pfn);
        let mappers = mappers.get(&pfn).copied().unwrap_or(0);
        prop_assert_eq!(frame.mapcount, mappers, "mapcount of frame {}", pfn);
        prop_assert!(frame.refcount >= frame.mapcount, "frame {}: {:?}", pfn, frame);
        if pfn >= model.first {
            // Nothing here pins guest frames: every reference is a map.
            prop_assert_eq!(frame.refcount, frame.mapcount, "leaked reference on frame {}", pfn);
        }
        if frame.refcount == 0 {
            free += 1;
            let mut page = [0u8; PAGE_SIZE as usize];
            pool.direct_map().read_slice(&mut page, GuestAddress(pfn << PAGE_SHIFT)).or_fail("direct map")?;
            prop_assert!(page.iter().all(|&b| b == 0), "free frame {} is not a punched hole", pfn);
        }
    }
    prop_assert_eq!(host.nr_free_frames(), free, "free list length");
    Ok(())
}

/// The host's soft-dirty bits (what pagemap reports) are the reference's:
/// exactly the pages written since the last round.
pub(crate) fn check_soft_dirty(host: &PrimaryMmu, model: &Model) -> Res {
    let (start, end) = (model.gfns().start, model.gfns().end);
    let expected: Vec<Gfn> = model.gfns().filter(|&gfn| model.is_soft_dirty(gfn)).collect();
    prop_assert_eq!(
        host.soft_dirty_pages(start, end).or_fail("soft_dirty_pages")?,
        expected.clone(),
        "soft-dirty pages"
    );
    prop_assert_eq!(host.nr_soft_dirty(start, end).or_fail("nr_soft_dirty")?, expected.len() as u64);
    Ok(())
}
