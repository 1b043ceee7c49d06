//! The window W: the virtual range the view's memslot points at, and the
//! memory-management calls that change what its pages map. Nothing in the
//! VMM reads or writes through W (only KVM does), so these calls alias no
//! Rust object.

use std::io;
use std::os::fd::RawFd;

use shadow_mmu::{PAGE_SHIFT, PAGE_SIZE};

use super::abi::UffdioRange;
use crate::view::ViewError;

/// vm.max_map_count, or the kernel's default (DEFAULT_MAX_MAP_COUNT) if it
/// cannot be read.
fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// Maps an error of a call that may create VMAs: ENOMEM there means
/// vm.max_map_count was reached.
pub(super) fn vma_err(op: &'static str) -> impl FnOnce(io::Error) -> ViewError {
    move |source| match source.raw_os_error() {
        Some(libc::ENOMEM) => ViewError::MapLimit { limit: max_map_count() },
        _ => ViewError::Uffd { op, source },
    }
}

/// The last OS error as a [`ViewError::Uffd`] of `op`.
fn os_err(op: &'static str) -> ViewError {
    ViewError::Uffd { op, source: io::Error::last_os_error() }
}

/// The virtual range W, unmapped on drop unless it must be leaked because
/// KVM may still point at it.
#[derive(Debug)]
pub(super) struct Window {
    pub(super) base: usize,
    len: usize,
    leak: bool,
}

impl Window {
    /// A fresh `MAP_SHARED` mapping of `len` bytes of `memfd` from `offset`,
    /// readable and writable, at an address the kernel picks.
    pub(super) fn map(memfd: RawFd, offset: libc::off_t, len: usize) -> Result<Self, ViewError> {
        // SAFETY: a fresh shared mapping at a kernel-chosen address; it
        // aliases no Rust object (W is accessed only by KVM).
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd, offset)
        };
        if base == libc::MAP_FAILED {
            return Err(vma_err("mmap of the view's window")(io::Error::last_os_error()));
        }
        Ok(Self { base: base as usize, len, leak: false })
    }

    /// Keeps W mapped for good (KVM may still point at it).
    pub(super) fn leak(&mut self) {
        self.leak = true;
    }

    /// The address of page `index`.
    pub(super) fn page_addr(&self, index: usize) -> usize {
        self.base + (index << PAGE_SHIFT)
    }

    /// Pages `[index, index + pages)` as a userfaultfd range.
    pub(super) fn range(&self, index: usize, pages: usize) -> UffdioRange {
        UffdioRange { start: self.page_addr(index) as u64, len: (pages as u64) << PAGE_SHIFT }
    }

    /// MADV_POPULATE_WRITE of pages `[index, index + pages)`: maps the
    /// frames behind them writable (allocating any that are memfd holes).
    pub(super) fn populate(&self, index: usize, pages: usize) -> Result<(), ViewError> {
        // SAFETY: madvise on pages of W, which the view owns; POPULATE_WRITE
        // faults them in without changing their data.
        let rc = unsafe {
            libc::madvise(self.page_addr(index) as *mut libc::c_void, pages << PAGE_SHIFT, libc::MADV_POPULATE_WRITE)
        };
        if rc != 0 {
            return Err(os_err("madvise(MADV_POPULATE_WRITE) of the window"));
        }
        Ok(())
    }

    /// MADV_DONTNEED of pages `[index, index + pages)`: the ptes go, the
    /// memfd keeps the data.
    pub(super) fn zap(&self, index: usize, pages: usize) -> Result<(), ViewError> {
        // SAFETY: MADV_DONTNEED on pages of W, which only KVM accesses; the
        // shared memfd pages stay in the page cache.
        let rc = unsafe {
            libc::madvise(self.page_addr(index) as *mut libc::c_void, pages << PAGE_SHIFT, libc::MADV_DONTNEED)
        };
        if rc != 0 {
            return Err(os_err("madvise(MADV_DONTNEED) of the window"));
        }
        Ok(())
    }

    /// Replaces page `index` with a fresh `MAP_SHARED` mapping of `memfd` at
    /// `offset`, `PROT_READ | PROT_WRITE` if `writable`, else `PROT_READ`.
    /// On failure the old mapping is still there (the kernel checks the map
    /// count before it unmaps anything).
    pub(super) fn map_frame(
        &self,
        index: usize,
        memfd: RawFd,
        offset: libc::off_t,
        writable: bool,
    ) -> Result<(), ViewError> {
        self.map_frames(index, 1, memfd, offset, writable)
    }

    /// [`Window::map_frame`] for pages `[index, index + pages)` onto as
    /// many consecutive frames from `offset`: one mmap.
    pub(super) fn map_frames(
        &self,
        index: usize,
        pages: usize,
        memfd: RawFd,
        offset: libc::off_t,
        writable: bool,
    ) -> Result<(), ViewError> {
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: MAP_FIXED over pages of W, which the view owns and no Rust
        // object points into (W is accessed only by KVM).
        let rc = unsafe {
            libc::mmap(
                self.page_addr(index) as *mut libc::c_void,
                pages << PAGE_SHIFT,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd,
                offset,
            )
        };
        if rc == libc::MAP_FAILED {
            return Err(vma_err("mmap(MAP_FIXED) of frames into the window")(io::Error::last_os_error()));
        }
        Ok(())
    }

    /// Makes page `index` `PROT_READ | PROT_WRITE`.
    pub(super) fn make_writable(&self, index: usize) -> Result<(), ViewError> {
        // SAFETY: mprotect of one page of W, owned by the view.
        let rc = unsafe {
            libc::mprotect(
                self.page_addr(index) as *mut libc::c_void,
                PAGE_SIZE as usize,
                libc::PROT_READ | libc::PROT_WRITE,
            )
        };
        if rc != 0 {
            return Err(vma_err("mprotect of a remapped page of the window")(io::Error::last_os_error()));
        }
        Ok(())
    }
}

impl Drop for Window {
    fn drop(&mut self) {
        if self.leak {
            return;
        }
        // SAFETY: [base, base + len) is the mapping this Window created and
        // owns; nothing in the VMM holds a reference into it (W is only
        // accessed by KVM, whose slot is gone when leak is false).
        unsafe { libc::munmap(self.base as *mut libc::c_void, self.len) };
    }
}
