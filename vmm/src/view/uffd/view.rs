//! [`UffdView`]: the window's pages, what each maps, and the userfaultfd
//! operations that make a secondary-table change real (module
//! documentation of [`super`]).

use std::io;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use shadow_mmu::{EptView, FramePool, Gfn, Pfn, PAGE_SHIFT, PAGE_SIZE};

use super::abi::{
    UffdioRange, UFFDIO_CONTINUE_MODE_DONTWAKE, UFFDIO_CONTINUE_MODE_WP, UFFDIO_REGISTER_MODE_MINOR,
    UFFDIO_REGISTER_MODE_MISSING, UFFDIO_REGISTER_MODE_WP, UFFDIO_WRITEPROTECT_MODE_DONTWAKE,
    UFFDIO_WRITEPROTECT_MODE_WP, UFFD_FEATURE_MINOR_SHMEM, UFFD_FEATURE_MISSING_SHMEM, UFFD_FEATURE_WP_HUGETLBFS_SHMEM,
    UFFD_FEATURE_WP_UNPOPULATED, UFFD_RANGE_IOCTLS_NEEDED,
};
use super::chunks::{Chunks, CHUNK_PAGES};
use super::fault_thread::UffdFaultSource;
use super::held::{held_runs, HeldRemap, HeldRemaps};
use super::shared::{FaultWait, Shared, HINT_ABSENT, HINT_WP};
use super::userfaultfd::Userfaultfd;
use super::window::{vma_err, Window};
use crate::vcpu_gate::{GateHold, VcpuGate};
use crate::view::ViewError;

/// Features the view cannot work without.
const FEATURES_REQUIRED: u64 = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
/// Features requested when the kernel offers them (MISSING_SHMEM is a probe
/// bit only: MISSING faults on shmem need no enabling).
const FEATURES_OPTIONAL: u64 = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;
/// What a CONTINUE that keeps write protection needs when it fails with
/// EINVAL (older kernels reject the mode bit).
const CONTINUE_WP: &str = "UFFDIO_CONTINUE with UFFDIO_CONTINUE_MODE_WP (needs Linux 6.6 or later)";
/// How every page of W is registered.
const REGISTER_MODE: u64 = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;

fn uffd_err(op: &'static str) -> impl FnOnce(io::Error) -> ViewError {
    move |source| ViewError::Uffd { op, source }
}

/// Opens a userfaultfd and enables the features the view needs.
///
/// UFFDIO_API can be issued once per descriptor and fails as a whole if one
/// requested feature is missing, so a first descriptor only asks what the
/// kernel offers.
pub(super) fn open_view_userfaultfd() -> Result<Userfaultfd, ViewError> {
    let offered = Userfaultfd::open()?.api(0).map_err(uffd_err("UFFDIO_API (probe)"))?.features;
    if offered & FEATURES_REQUIRED != FEATURES_REQUIRED {
        return Err(ViewError::UffdFeatures { offered, required: FEATURES_REQUIRED });
    }
    let uffd = Userfaultfd::open()?;
    uffd.api(FEATURES_REQUIRED | (offered & FEATURES_OPTIONAL)).map_err(uffd_err("UFFDIO_API"))?;
    Ok(uffd)
}

/// Registers `range` of W with `uffd` (MISSING | MINOR | WP), checking that
/// the kernel offers CONTINUE and WRITEPROTECT on it.
pub(super) fn register(uffd: &Userfaultfd, range: UffdioRange) -> Result<(), ViewError> {
    let offered = uffd.register(range, REGISTER_MODE).map_err(vma_err("UFFDIO_REGISTER (MISSING | MINOR | WP)"))?;
    if offered & UFFD_RANGE_IOCTLS_NEEDED != UFFD_RANGE_IOCTLS_NEEDED {
        return Err(ViewError::UffdRangeIoctls { offered });
    }
    Ok(())
}

/// Registers and unregisters the first chunk of W, so that a kernel that
/// does not offer CONTINUE and WRITEPROTECT on it fails the build of the
/// view rather than its first update.
fn probe_registration(uffd: &Userfaultfd, window: &Window, nr_pages: usize) -> Result<(), ViewError> {
    let range = window.range(0, nr_pages.min(CHUNK_PAGES));
    register(uffd, range)?;
    uffd.unregister(range).map_err(uffd_err("UFFDIO_UNREGISTER (probe)"))
}

/// What one page of W maps now, as far as the view has made it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct PageState {
    /// The frame at the page's memfd offset; [`UNKNOWN_PFN`] after a remap
    /// failed half-way, so that the next `map` starts it again.
    pfn: Pfn,
    /// Whether the pte is populated (not zapped).
    present: bool,
    /// Whether the present pte is write-protected by userfaultfd.
    wp: bool,
}

const UNKNOWN_PFN: Pfn = Pfn::MAX;

/// The userfaultfd backend of the EPT view (see the module documentation).
#[derive(Debug)]
pub struct UffdView {
    // Drop order: the slot is deleted in `drop`, then the userfaultfd closes,
    // then W is unmapped.
    vm: Arc<VmFd>,
    /// Keeps the vCPU out of KVM_RUN while a page of W is replaced.
    gate: Arc<VcpuGate>,
    pool: Arc<FramePool>,
    slot: u32,
    first_gfn: Gfn,
    uffd: Userfaultfd,
    window: Window,
    pages: Vec<PageState>,
    /// Which chunks of W are registered (lazily: module documentation).
    chunks: Chunks,
    shared: Arc<Shared>,
    remaps: u64,
    /// The mmaps the remaps took (fewer than the remaps when a batch
    /// remaps neighbouring pages onto neighbouring frames).
    remap_runs: u64,
    /// Remaps of absent pages onto their moved host page, ahead of a fault.
    absent_remaps: u64,
    /// Remaps made one at a time, outside a batch: in a fault whose frame
    /// changed (a copy-on-write break), which the host KVM then retries.
    unbatched_remaps: u64,
    continues: u64,
    wp_changes: u64,
    zaps: u64,
    /// The vCPU held out for a batch of the secondary MMU's updates.
    batch_hold: Option<GateHold>,
    /// Pages remapped inside the batch, not made real in W yet
    /// ([`UffdView::remap_held`]).
    held_remaps: HeldRemaps,
}

impl UffdView {
    /// Builds W for guest pages [first_gfn, end_gfn), mapped writable onto
    /// frames [base_pfn + first_gfn, base_pfn + end_gfn) (`base_pfn` is 0
    /// for a guest alone; a fleet's guest i lies further in the pool), and
    /// installs memslot `slot` over it at gpa `first_gfn << 12`. W is not registered yet: a chunk of it is, the
    /// first time the secondary MMU restricts one of its pages.
    ///
    /// The frames that hold memory already (the image, anything loaded)
    /// are populated in W, so they never fault. Frames that are still memfd
    /// holes stay holes (guest RAM is not allocated up front): the guest's
    /// first touch of one faults in the host kernel, which allocates the
    /// frame as it would for KVM on hardware; in a chunk registered since,
    /// it is a MISSING fault, which the VMM serves as the host's own
    /// first-touch fault (the secondary MMU already maps the page), not as a
    /// secondary-MMU fault. The slot must not overlap another.
    pub fn new(
        vm: Arc<VmFd>,
        gate: Arc<VcpuGate>,
        pool: Arc<FramePool>,
        slot: u32,
        first_gfn: Gfn,
        end_gfn: Gfn,
        base_pfn: Pfn,
    ) -> Result<Self, ViewError> {
        if first_gfn >= end_gfn {
            return Err(ViewError::OutOfRange(first_gfn));
        }
        let first_pfn = base_pfn + first_gfn;
        if base_pfn + end_gfn > pool.nr_frames() {
            return Err(ViewError::NoSuchFrame(base_pfn + end_gfn - 1));
        }
        let nr_pages = usize::try_from(end_gfn - first_gfn).map_err(|_| ViewError::OutOfRange(end_gfn))?;
        let offset = libc::off_t::try_from(first_pfn << PAGE_SHIFT).map_err(|_| ViewError::NoSuchFrame(first_pfn))?;
        let memfd = pool.memfd().ok_or(ViewError::AnonymousPool)?.as_raw_fd();
        let uffd = open_view_userfaultfd()?;
        let window = Window::map(memfd, offset, nr_pages << PAGE_SHIFT)?;
        let resident = pool.resident(first_pfn, nr_pages as u64).map_err(ViewError::Residency)?;
        populate_runs(&window, &resident)?;
        probe_registration(&uffd, &window, nr_pages)?;
        install_slot(&vm, slot, first_gfn, &window, nr_pages)?;
        let pages = (first_pfn..).zip(&resident).map(|(pfn, &present)| PageState { pfn, present, wp: false }).collect();
        Ok(Self {
            vm,
            gate,
            pool,
            slot,
            first_gfn,
            uffd,
            window,
            pages,
            chunks: Chunks::new(nr_pages),
            shared: Arc::new(Shared::new(nr_pages)),
            remaps: 0,
            remap_runs: 0,
            absent_remaps: 0,
            unbatched_remaps: 0,
            continues: 0,
            wp_changes: 0,
            zaps: 0,
            batch_hold: None,
            held_remaps: HeldRemaps::new(nr_pages),
        })
    }

    /// What the fault thread needs (a dup of the uffd, W's base, first_gfn,
    /// page count, and the state shared with the view).
    pub fn fault_source(&self) -> Result<UffdFaultSource, ViewError> {
        let uffd = self.uffd.try_clone().map_err(uffd_err("dup of the userfaultfd"))?;
        Ok(UffdFaultSource {
            uffd,
            base: self.window.base,
            first_gfn: self.first_gfn,
            nr_pages: self.pages.len(),
            shared: self.shared.clone(),
        })
    }

    /// The memslot the view installed.
    pub fn slot(&self) -> u32 {
        self.slot
    }

    /// The gate that keeps the vCPU out of KVM_RUN while a page of W is
    /// replaced.
    pub fn gate(&self) -> &Arc<VcpuGate> {
        &self.gate
    }

    /// How the fault thread waits for events from now on
    /// ([`FaultWait::Adaptive`] unless set).
    pub fn set_fault_wait(&self, wait: FaultWait) {
        self.shared.set_wait(wait);
    }

    /// For `vmm bench fault` only: while `bare`, the fault thread resolves
    /// a MINOR fault with one UFFDIO_CONTINUE (which wakes the vCPU) and
    /// nothing else: no handler, no accounting, no deferred wake; the bare
    /// mechanism a fault of this view costs. That is right only while the
    /// secondary MMU maps each faulting page to the frame W maps there, as
    /// after a [`zap`](EptView::zap) of the view alone; the view's own
    /// record of those pages goes stale (the next `map` of one CONTINUEs it,
    /// meets EEXIST and sets its protection explicitly). Other faults still
    /// go to the handler.
    pub fn set_bare_faults(&self, bare: bool) {
        self.shared.bare.store(bare, Ordering::Release);
    }

    fn index(&self, start: Gfn, end: Gfn) -> Result<usize, ViewError> {
        let end_gfn = self.first_gfn + self.pages.len() as u64;
        if start < self.first_gfn || end > end_gfn || start >= end {
            return Err(ViewError::OutOfRange(start));
        }
        usize::try_from(start - self.first_gfn).map_err(|_| ViewError::OutOfRange(start))
    }

    /// Registers the chunks of pages `[i, i + n)` that are not registered
    /// yet, before the view restricts one of those pages. Until then every
    /// page of a chunk maps its own frame writable, as the secondary MMU
    /// does, and the kernel may have populated any of them on a guest
    /// touch: each is taken as present from now on (a page believed present
    /// that is not costs one host fault later; the converse would leave a
    /// write-protection undone).
    fn register_chunks(&mut self, i: usize, n: usize) -> Result<(), ViewError> {
        for (first, pages) in self.chunks.unregistered(i, n) {
            register(&self.uffd, self.window.range(first, pages))?;
            self.chunks.mark(first, pages);
            for page in &mut self.pages[first..first + pages] {
                page.present = true;
            }
        }
        Ok(())
    }

    /// Wakes the waiters of page `i`, unless the fault thread is serving it
    /// (it wakes the page itself once the handler has returned).
    fn wake(&self, i: usize) -> Result<(), ViewError> {
        if !self.shared.serving(i) {
            self.uffd.wake(self.window.range(i, 1)).map_err(uffd_err("UFFDIO_WAKE"))?;
        }
        self.shared.woke(i);
        Ok(())
    }

    /// Sets (`wp`) or clears the write protection of present page `i`;
    /// clearing wakes a vCPU blocked on a write to it.
    fn set_wp(&mut self, i: usize, wp: bool) -> Result<(), ViewError> {
        let dontwake = if self.shared.serving(i) { UFFDIO_WRITEPROTECT_MODE_DONTWAKE } else { 0 };
        let mode = if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { dontwake };
        self.uffd.writeprotect(self.window.range(i, 1), mode).map_err(uffd_err("UFFDIO_WRITEPROTECT"))?;
        self.wp_changes += 1;
        self.pages[i].wp = wp;
        if !wp {
            self.shared.woke(i);
        }
        Ok(())
    }

    /// Populates the pte of page `i` from the page cache (UFFDIO_CONTINUE),
    /// write-protected if `wp`, and wakes its waiters unless `dontwake`.
    fn continue_page(&mut self, i: usize, wp: bool, dontwake: bool) -> Result<(), ViewError> {
        let mut mode = if wp { UFFDIO_CONTINUE_MODE_WP } else { 0 };
        if dontwake || self.shared.serving(i) {
            mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        let mut populated = false;
        let mut again = 0;
        loop {
            let Err(err) = self.uffd.continue_(self.window.range(i, 1), mode) else {
                self.continues += 1;
                self.pages[i].present = true;
                self.pages[i].wp = wp;
                if !dontwake {
                    self.shared.woke(i);
                }
                return Ok(());
            };
            match err.raw_os_error() {
                Some(libc::EEXIST) => {
                    // Already populated (a vCPU touched a fresh mapping before
                    // it was registered, or the bookkeeping was stale): the
                    // protection is unknown, so set it explicitly, then wake
                    // (CONTINUE did not).
                    self.pages[i].present = true;
                    self.set_wp(i, wp)?;
                    if !dontwake && wp {
                        self.wake(i)?;
                    }
                    return Ok(());
                }
                Some(libc::EFAULT) if !populated => {
                    // The frame is a hole in the memfd (never written, or
                    // returned to the host): CONTINUE maps only pages in the
                    // page cache. Allocate it (as zeroes) through the
                    // unregistered direct map and try again.
                    self.populate_frame(self.pages[i].pfn)?;
                    populated = true;
                }
                // The mm is changing under a non-cooperative event: retry.
                Some(libc::EAGAIN) if again < 16 => again += 1,
                Some(libc::EINVAL) if wp => return Err(uffd_err(CONTINUE_WP)(err)),
                _ => return Err(uffd_err("UFFDIO_CONTINUE")(err)),
            }
        }
    }

    /// Allocates frame `pfn` in the memfd if it is a hole, through the direct map.
    fn populate_frame(&self, pfn: Pfn) -> Result<(), ViewError> {
        let hva = self.pool.frame_hva(pfn).ok_or(ViewError::NoSuchFrame(pfn))?;
        // SAFETY: one page of the pool's direct map, which the pool keeps
        // mapped; POPULATE_WRITE faults it in without changing its data.
        if unsafe { libc::madvise(hva.cast(), PAGE_SIZE as usize, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(uffd_err("madvise(MADV_POPULATE_WRITE) of a frame")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Inside a batch, with the vCPU held out: page `i` is to map frame
    /// `pfn`. Nothing changes in W until [`UffdView::flush_held_remaps`]
    /// at the batch's end, which maps neighbouring pages onto neighbouring
    /// frames with one mmap.
    fn remap_held(&mut self, i: usize, pfn: Pfn, writable: bool) {
        self.remaps += 1;
        self.pages[i] = PageState { pfn, present: false, wp: false };
        self.held_remaps.push(i, HeldRemap { pfn, populate: Some(writable) });
    }

    /// Makes the batch's remaps real, with the vCPU still held out: one
    /// mmap per run of pages onto consecutive frames (readable and
    /// writable at once: no vCPU can touch the fresh mapping before the
    /// batch ends, so the read-only window [`UffdView::remap`] keeps is not
    /// needed), one UFFDIO_REGISTER per run of neighbouring pages, one
    /// UFFDIO_CONTINUE per run of one mapping with one access (none for
    /// pages left absent). A page whose step failed is left for its next
    /// `map` to redo.
    fn flush_held_remaps(&mut self) -> Result<(), ViewError> {
        let mut held = self.held_remaps.take();
        let mut first_error = None;
        for (first, n, remap) in held_runs(&held, |a, b| b.pfn == a.pfn + 1) {
            let result = self.map_run(first, n, remap.pfn);
            self.settle_run(first, n, result, &mut first_error);
        }
        held.retain(|&(i, _)| self.pages[i].pfn != UNKNOWN_PFN);
        for (first, n, _) in held_runs(&held, |_, _| true) {
            let result = register(&self.uffd, self.window.range(first, n));
            self.settle_run(first, n, result, &mut first_error);
        }
        held.retain(|&(i, _)| self.pages[i].pfn != UNKNOWN_PFN);
        for (first, n, remap) in held_runs(&held, |a, b| b.pfn == a.pfn + 1 && a.populate == b.populate) {
            let Some(writable) = remap.populate else { continue };
            let result = self.continue_run(first, n, !writable);
            self.settle_run(first, n, result, &mut first_error);
        }
        first_error.map_or(Ok(()), Err)
    }

    /// Maps pages `[first, first + n)` of W onto the frames from `pfn`.
    fn map_run(&mut self, first: usize, n: usize, pfn: Pfn) -> Result<(), ViewError> {
        let (memfd, offset) = self.frame_offset(pfn)?;
        self.window.map_frames(first, n, memfd, offset, true)?;
        self.remap_runs += 1;
        Ok(())
    }

    /// After a step of [`UffdView::flush_held_remaps`] on pages `[first,
    /// first + n)`: if it failed, the pages' frame becomes unknown, so that
    /// the flush's later steps leave them out and their next `map` starts
    /// over, and the first error is kept.
    fn settle_run(
        &mut self,
        first: usize,
        n: usize,
        result: Result<(), ViewError>,
        first_error: &mut Option<ViewError>,
    ) {
        if let Err(e) = result {
            for page in &mut self.pages[first..first + n] {
                page.pfn = UNKNOWN_PFN;
            }
            first_error.get_or_insert(e);
        }
    }

    /// Populates pages `[first, first + n)` of one mapping of W, absent and
    /// registered, write-protected if `wp`: one UFFDIO_CONTINUE, or page by
    /// page (which handles every error one page can meet) when the fault
    /// thread is serving one of them or the range call fails.
    fn continue_run(&mut self, first: usize, n: usize, wp: bool) -> Result<(), ViewError> {
        let served = (first..first + n).any(|i| self.shared.serving(i));
        if n > 1 && !served {
            let mode = if wp { UFFDIO_CONTINUE_MODE_WP } else { 0 };
            if self.uffd.continue_(self.window.range(first, n), mode).is_ok() {
                self.continues += 1;
                for i in first..first + n {
                    self.pages[i].present = true;
                    self.pages[i].wp = wp;
                    self.shared.woke(i);
                }
                return Ok(());
            }
        }
        (first..first + n).try_for_each(|i| self.continue_page(i, wp, false))
    }

    /// The pool's memfd and the offset of frame `pfn` in it.
    fn frame_offset(&self, pfn: Pfn) -> Result<(std::os::fd::RawFd, libc::off_t), ViewError> {
        let offset = libc::off_t::try_from(pfn << PAGE_SHIFT).map_err(|_| ViewError::NoSuchFrame(pfn))?;
        Ok((self.pool.memfd().ok_or(ViewError::AnonymousPool)?.as_raw_fd(), offset))
    }

    /// Points page `i` of W at frame `pfn`: a fresh mapping, registered,
    /// populated, with the access asked for; wakes the page's waiters.
    fn remap(&mut self, i: usize, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        let (memfd, offset) = self.frame_offset(pfn)?;
        // A read-only frame is mapped PROT_READ until userfaultfd protects
        // it (module documentation). On failure the state is unchanged.
        self.window.map_frame(i, memfd, offset, writable)?;
        self.remaps += 1;
        self.remap_runs += 1;
        self.unbatched_remaps += 1;
        // Until the sequence completes, the next map() must start it again.
        self.pages[i] = PageState { pfn: UNKNOWN_PFN, present: false, wp: false };
        register(&self.uffd, self.window.range(i, 1))?;
        self.pages[i].pfn = pfn;
        if writable {
            return self.continue_page(i, false, false);
        }
        // Read-only: populate write-protected without waking (a woken
        // vCPU's write would still meet PROT_READ and fail KVM_RUN), lift
        // PROT_READ (the uffd-wp bit keeps the pte read-only), then wake.
        self.continue_page(i, true, true)?;
        if let Err(e) = self.window.make_writable(i) {
            self.pages[i].pfn = UNKNOWN_PFN;
            return Err(e);
        }
        self.wake(i)
    }
}

/// Populates the runs of `resident` pages of `window` (before it is
/// registered: this faults nothing to userspace and allocates nothing).
fn populate_runs(window: &Window, resident: &[bool]) -> Result<(), ViewError> {
    let mut i = 0;
    while i < resident.len() {
        let run = resident[i..].iter().take_while(|&&r| r).count();
        if run == 0 {
            i += 1;
            continue;
        }
        window.populate(i, run)?;
        i += run;
    }
    Ok(())
}

/// Installs memslot `slot` over the `nr_pages` pages of `window` at gpa
/// `first_gfn << 12`.
fn install_slot(vm: &VmFd, slot: u32, first_gfn: Gfn, window: &Window, nr_pages: usize) -> Result<(), ViewError> {
    let region = kvm_userspace_memory_region {
        slot,
        flags: 0,
        guest_phys_addr: first_gfn << PAGE_SHIFT,
        memory_size: (nr_pages as u64) << PAGE_SHIFT,
        userspace_addr: window.base as u64,
    };
    // SAFETY: [userspace_addr, + memory_size) is W, owned by the view being
    // built; the view deletes the slot in its Drop before W is unmapped (and
    // leaks W if the deletion fails), so KVM never points at memory that is
    // gone or reused.
    unsafe { vm.set_user_memory_region(region) }.map_err(|source| ViewError::SetMemslot {
        slot,
        gpa: region.guest_phys_addr,
        size: region.memory_size,
        source,
    })
}

impl EptView for UffdView {
    type Error = ViewError;

    /// `MADV_DONTNEED` on the pages' part of W: the memfd keeps the data and
    /// the next guest access raises a MINOR (or, for a punched frame,
    /// MISSING) fault. Their chunks are registered first, so that no guest
    /// access in between can fault a zapped page back in inside the kernel.
    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        let i = self.index(start, end)?;
        self.flush_held_remaps()?;
        let n = (end - start) as usize;
        self.register_chunks(i, n)?;
        self.window.zap(i, n)?;
        for page in &mut self.pages[i..i + n] {
            // A uffd-wp pte leaves a marker behind, but the next map()
            // CONTINUEs with the protection it wants anyway.
            page.present = false;
            page.wp = false;
        }
        self.zaps += 1;
        Ok(())
    }

    fn map(&mut self, gfn: Gfn, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        let i = self.index(gfn, gfn.checked_add(1).ok_or(ViewError::OutOfRange(gfn))?)?;
        if pfn >= self.pool.nr_frames() {
            return Err(ViewError::NoSuchFrame(pfn));
        }
        if self.held_remaps.contains(i) {
            self.flush_held_remaps()?;
        }
        if !self.chunks.is_registered(i) {
            if self.pages[i].pfn == pfn && writable {
                // Unrestricted already: the kernel populates it on a touch.
                return Ok(());
            }
            self.register_chunks(i, 1)?;
        }
        let hint = self.shared.pages[i].hint.swap(0, Ordering::AcqRel);
        let page = self.pages[i];
        if page.pfn != pfn && self.batch_hold.is_some() {
            self.remap_held(i, pfn, writable);
            return Ok(());
        }
        if page.pfn != pfn {
            // Replacing a mapping of W is not atomic for a running vCPU (a
            // write in the window fails KVM_RUN with EFAULT): keep it out.
            self.gate.pause();
            let result = self.remap(i, pfn, writable);
            self.gate.resume();
            return result;
        }
        if !page.present || hint & HINT_ABSENT != 0 {
            return self.continue_page(i, !writable, false);
        }
        if page.wp == writable || (writable && hint & HINT_WP != 0) {
            return self.set_wp(i, !writable);
        }
        Ok(())
    }

    /// The present, writable pages of [start, end) become write-protected
    /// (UFFDIO_WRITEPROTECT, one call per contiguous run): reads go on, the
    /// next write raises a WP fault. Zapped pages stay absent.
    fn write_protect(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        let first = self.index(start, end)?;
        self.flush_held_remaps()?;
        let n = (end - start) as usize;
        self.register_chunks(first, n)?;
        let mut i = first;
        while i < first + n {
            let protectable = |p: &PageState| p.present && !p.wp;
            if !protectable(&self.pages[i]) {
                i += 1;
                continue;
            }
            let run = self.pages[i..first + n].iter().take_while(|p| protectable(p)).count();
            self.uffd
                .writeprotect(self.window.range(i, run), UFFDIO_WRITEPROTECT_MODE_WP)
                .map_err(uffd_err("UFFDIO_WRITEPROTECT"))?;
            self.wp_changes += 1;
            for page in &mut self.pages[i..i + run] {
                page.wp = true;
            }
            i += run;
        }
        Ok(())
    }

    /// Inside a batch: points each absent page `gfn` at frame `pfn` at the
    /// batch's end, not populated (one mmap per run onto neighbouring
    /// frames, with the batch's other remaps). W then maps what the primary
    /// MMU maps, as the host mapping under a memslot does in Linux, and the
    /// page's next fault only populates it: a remap during that fault would
    /// make the host KVM retry it (one more exit). Outside a batch nothing
    /// is done, nor for a page W maps or already points at `pfn`.
    fn host_pages_moved(&mut self, moved: &[(Gfn, Pfn)]) -> Result<(), ViewError> {
        if self.batch_hold.is_none() {
            return Ok(());
        }
        for &(gfn, pfn) in moved {
            let i = self.index(gfn, gfn.checked_add(1).ok_or(ViewError::OutOfRange(gfn))?)?;
            let page = self.pages[i];
            let unchanged = page.present || page.pfn == pfn || self.held_remaps.contains(i);
            if unchanged || !self.chunks.is_registered(i) || pfn >= self.pool.nr_frames() {
                continue;
            }
            self.remaps += 1;
            self.absent_remaps += 1;
            self.pages[i] = PageState { pfn, present: false, wp: false };
            self.held_remaps.push(i, HeldRemap { pfn, populate: None });
        }
        Ok(())
    }

    /// Holds the vCPU out of KVM_RUN until `batch_end` (a vCPU blocked on
    /// a fault of W is kicked out of it too): the pages of W lag the
    /// secondary table meanwhile, and the batch's remaps kick nobody and
    /// are registered together at its end.
    fn batch_start(&mut self) -> Result<(), ViewError> {
        if self.batch_hold.is_none() {
            self.batch_hold = Some(self.gate.hold());
        }
        Ok(())
    }

    /// Registers and populates the batch's remaps, then lets the vCPU in.
    fn batch_end(&mut self) -> Result<(), ViewError> {
        let result = self.flush_held_remaps();
        self.batch_hold = None;
        result
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_remaps", self.remaps),
            ("view_remap_runs", self.remap_runs),
            ("view_absent_remaps", self.absent_remaps),
            ("view_unbatched_remaps", self.unbatched_remaps),
            ("view_continues", self.continues),
            ("view_wp_changes", self.wp_changes),
            ("view_zaps", self.zaps),
            ("view_vcpu_kicks", self.gate.kicks()),
            ("view_chunks_registered", self.chunks.count()),
            ("view_faults", self.shared.faults.load(Ordering::Relaxed)),
            ("view_fault_wakes", self.shared.fault_wakes.load(Ordering::Relaxed)),
            ("view_slots", 1),
        ]
    }
}

impl Drop for UffdView {
    fn drop(&mut self) {
        let region = kvm_userspace_memory_region {
            slot: self.slot,
            flags: 0,
            guest_phys_addr: self.first_gfn << PAGE_SHIFT,
            memory_size: 0,
            userspace_addr: 0,
        };
        // SAFETY: deleting the view's own slot (size 0) passes no memory.
        if unsafe { self.vm.set_user_memory_region(region) }.is_err() {
            // KVM may still point at W: keep it mapped rather than let the
            // range be reused under the guest.
            self.window.leak();
            return;
        }
        // Unregistering wakes any thread still blocked on W (there should be
        // none: the vCPUs are gone); errors do not matter, munmap follows.
        let _ = self.uffd.unregister(self.window.range(0, self.pages.len()));
    }
}
