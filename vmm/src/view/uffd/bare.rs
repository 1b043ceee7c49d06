//! The bare mechanisms of the userfaultfd view's updates, timed outside the
//! view: what one remap and one zap of a page cost in system calls alone,
//! so that `vmm bench dedup` can set the view's merge cost beside them
//! (issue 12's goal: change-pte's merge cost at most range-flush's plus
//! 1.1x the difference between a bare remap and a bare zap).
//!
//! Both are timed as the view makes them inside a batch of merges: a remap
//! is one `mmap(MAP_FIXED)` of another frame over the page and one
//! UFFDIO_CONTINUE write-protected (a merged page is mapped read-only),
//! with one UFFDIO_REGISTER for the whole run of pages; a zap is the page's
//! share of one MADV_DONTNEED over the run.

use std::os::fd::AsRawFd;
use std::time::Instant;

use shadow_mmu::{FramePool, PAGE_SHIFT, PAGE_SIZE};

use super::abi::UFFDIO_CONTINUE_MODE_WP;
use super::view::{open_view_userfaultfd, register};
use super::window::Window;
use crate::view::ViewError;

/// What a bare remap and a bare zap of one page cost, in ns.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct BareViewCosts {
    /// `mmap(MAP_FIXED)` of another frame plus UFFDIO_CONTINUE with
    /// UFFDIO_CONTINUE_MODE_WP, and the page's share of one
    /// UFFDIO_REGISTER of the run.
    pub remap_ns: f64,
    /// The page's share of one MADV_DONTNEED of the run.
    pub zap_ns: f64,
}

/// Times `pages` bare remaps and a bare zap of as many pages over a memfd
/// of twice as many frames, all populated: page i of the window, which
/// maps frame i, is remapped onto frame `pages + i`, then the run is zapped.
pub fn bare_view_costs(pages: usize) -> Result<BareViewCosts, ViewError> {
    let pool = FramePool::new(2 * pages as u64 * PAGE_SIZE).map_err(ViewError::BarePool)?;
    let memfd = pool.memfd().ok_or(ViewError::AnonymousPool)?.as_raw_fd();
    let window = Window::map(memfd, 0, pages << PAGE_SHIFT)?;
    let uffd = open_view_userfaultfd()?;
    // Every frame in the page cache, as a merged page's KSM frame is.
    let all = Window::map(memfd, 0, (2 * pages) << PAGE_SHIFT)?;
    all.populate(0, 2 * pages)?;
    let t = Instant::now();
    for i in 0..pages {
        let offset = libc::off_t::try_from((pages + i) << PAGE_SHIFT).map_err(|_| ViewError::OutOfRange(i as u64))?;
        window.map_frame(i, memfd, offset, true)?;
    }
    register(&uffd, window.range(0, pages))?;
    for i in 0..pages {
        uffd.continue_(window.range(i, 1), UFFDIO_CONTINUE_MODE_WP)
            .map_err(|source| ViewError::Uffd { op: "UFFDIO_CONTINUE", source })?;
    }
    let remap_ns = t.elapsed().as_nanos() as f64 / pages as f64;
    let t = Instant::now();
    window.zap(0, pages)?;
    let zap_ns = t.elapsed().as_nanos() as f64 / pages as f64;
    Ok(BareViewCosts { remap_ns, zap_ns })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bare_remap_and_zap_are_timed_per_page() {
        // Needs userfaultfd with MINOR and WP on shmem (Linux 6.1+), as the
        // view does; no KVM.
        let costs = bare_view_costs(64).expect("userfaultfd with MINOR and WP on shmem");
        assert!(costs.remap_ns > 0.0 && costs.zap_ns > 0.0, "{costs:?}");
    }
}
