//! Reading page contents for the scanner: checksums (`calc_checksum`, of a
//! copy or in place),
//! comparisons (`memcmp_pages`, `pages_identical`). Which frames hold
//! memory at all is `FramePool::resident`.
//!
//! Guest pages are read through the frame pool's direct map while the vCPU
//! may be writing them, exactly as ksmd reads pages a process is writing:
//! a result can be stale the moment it is computed, which is why a merge
//! compares again after write-protecting (mm/ksm.c does the same). Reads go
//! through raw pointers and libc's memcmp so that no Rust reference ever
//! points at memory another agent writes.

use std::cmp::Ordering;
use std::sync::atomic::AtomicU64;

use shadow_mmu::{FramePool, Pfn, PAGE_SIZE};

/// One page of bytes.
pub type PageBuf = [u8; PAGE_SIZE as usize];

/// Copies frame `pfn` into `buf`; false if the frame does not exist.
pub fn read_page(pool: &FramePool, pfn: Pfn, buf: &mut PageBuf) -> bool {
    let Some(frame) = pool.frame_hva(pfn) else { return false };
    // SAFETY: `frame` points at a whole page of the direct map (checked by
    // frame_hva), which lives as long as `pool`; `buf` is our own page. A
    // plain memcpy through raw pointers (no Rust reference to guest memory):
    // a concurrent guest write may tear the copy, which the merge path
    // tolerates (it compares again after write protection).
    unsafe { libc::memcpy(buf.as_mut_ptr().cast(), frame.cast_const().cast(), PAGE_SIZE as usize) };
    true
}

/// `calc_checksum`: xxHash of the page, truncated to 32 bits as in Linux.
pub fn checksum(page: &PageBuf) -> u32 {
    xxhash_rust::xxh64::xxh64(page, 0) as u32
}

/// [`checksum`] of frame `pfn` as it is now, read in place (no copy, as
/// Linux's `calc_checksum` reads the live page); `None` if the frame does
/// not exist.
pub fn frame_checksum(pool: &FramePool, pfn: Pfn) -> Option<u32> {
    let frame = pool.frame_hva(pfn)?;
    // SAFETY: `frame` points at a whole page of the direct map (checked by
    // frame_hva), page-aligned and alive as long as `pool`. Viewed as
    // atomics, a concurrent guest write is a race every load tolerates
    // (it sees the old word or the new one), never a Rust reference to
    // memory that changes.
    let words = unsafe { std::slice::from_raw_parts(frame.cast::<AtomicU64>(), PAGE_SIZE as usize / 8) };
    crate::xxh64::xxh64_words(words, 0).map(|h| h as u32)
}

/// Orders a copied page against frame `pfn` as it is now (`memcmp_pages`).
pub fn cmp_with_frame(pool: &FramePool, page: &PageBuf, pfn: Pfn) -> Ordering {
    let Some(frame) = pool.frame_hva(pfn) else { return Ordering::Less };
    // SAFETY: `frame` points at a whole page inside the direct map (checked
    // by frame_hva), which lives as long as `pool`; `page` is our own
    // buffer. memcmp only reads; a concurrent guest write can change the
    // answer, never memory safety.
    let r = unsafe { libc::memcmp(page.as_ptr().cast(), frame.cast(), PAGE_SIZE as usize) };
    r.cmp(&0)
}

/// `pages_identical` for two frames.
pub fn frames_identical(pool: &FramePool, a: Pfn, b: Pfn) -> bool {
    match (pool.frame_hva(a), pool.frame_hva(b)) {
        // SAFETY: both point at whole pages of the direct map, as above.
        (Some(a), Some(b)) => unsafe { libc::memcmp(a.cast(), b.cast(), PAGE_SIZE as usize) == 0 },
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn compare_checksum_and_residency() {
        let pool = FramePool::new(4 * PAGE_SIZE).expect("pool");
        let mem = pool.direct_map();
        mem.write_obj(7u64, GuestAddress(PAGE_SIZE)).expect("write");
        mem.write_obj(7u64, GuestAddress(2 * PAGE_SIZE)).expect("write");
        mem.write_obj(9u64, GuestAddress(3 * PAGE_SIZE)).expect("write");
        let mut buf = [0u8; PAGE_SIZE as usize];
        assert!(read_page(&pool, 1, &mut buf));
        assert_eq!(cmp_with_frame(&pool, &buf, 2), Ordering::Equal);
        assert_eq!(cmp_with_frame(&pool, &buf, 3), Ordering::Less);
        assert!(frames_identical(&pool, 1, 2) && !frames_identical(&pool, 1, 3));
        let mut other = buf;
        other[0] = 9;
        assert_ne!(checksum(&buf), checksum(&other));
        // In place, the same checksum as of the copy.
        assert_eq!(frame_checksum(&pool, 1), Some(checksum(&buf)));
        assert_eq!(frame_checksum(&pool, 4), None);
    }
}
