//! Host physical memory: a memfd whose 4 KiB pages are the host's page frames.
//!
//! A pool can instead be backed by anonymous private memory
//! ([`FramePool::new_anonymous`]): what the host's own KSM can merge
//! (MADV_MERGEABLE applies to private anonymous memory only). Such a pool is
//! the guest RAM of the `kernel` policy, where nothing of this crate
//! deduplicates and frames are never remapped.
//!
//! Linux counterpart: the page allocator and the direct map. Frame number
//! `pfn` is the memfd page at byte offset `pfn * PAGE_SIZE`; one shared linear
//! mapping of the whole memfd is the direct map through which the VMM (and,
//! later, the deduplicator) reads and writes frames. Freeing a frame punches a
//! hole in the memfd, so memory saved by merging is really returned to the host
//! and can be measured from the memfd's allocated blocks.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap};

/// Size of a page (and of a frame) in bytes.
pub const PAGE_SIZE: u64 = 4096;
/// log2 of [`PAGE_SIZE`].
pub const PAGE_SHIFT: u32 = 12;

/// A host page frame number: the index of a page in the frame pool's memfd.
pub type Pfn = u64;

/// Errors of the frame pool.
#[derive(Debug, thiserror::Error)]
pub enum FramePoolError {
    /// The size is zero or not a whole number of pages.
    #[error("frame pool size {0} is not a positive multiple of 4 KiB")]
    BadSize(u64),
    /// memfd_create failed.
    #[error("cannot create the memfd for guest RAM")]
    MemfdCreate(#[source] std::io::Error),
    /// ftruncate of the memfd failed.
    #[error("cannot size the memfd for guest RAM to {bytes} bytes")]
    Truncate {
        /// Requested size.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// Mapping the memfd failed.
    #[error("cannot map guest RAM ({bytes} bytes)")]
    Map {
        /// Requested size.
        bytes: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
    /// fallocate(PUNCH_HOLE) failed.
    #[error("cannot return frame {pfn} to the host")]
    PunchHole {
        /// The frame.
        pfn: Pfn,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// fstat or mincore of the memfd failed.
    #[error("cannot inspect the guest RAM memfd")]
    Stat(#[source] std::io::Error),
    /// A madvise on the pool's memory failed.
    #[error("madvise({advice}) on guest RAM failed")]
    Madvise {
        /// The advice, by its Linux name.
        advice: &'static str,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// The host's page frames: a memfd (or anonymous memory) and its direct map.
#[derive(Debug)]
pub struct FramePool {
    /// None for an anonymous pool.
    memfd: Option<File>,
    direct_map: GuestMemoryMmap,
    nr_frames: u64,
}

impl FramePool {
    /// Creates a pool of `bytes / PAGE_SIZE` frames, all zero and unallocated.
    pub fn new(bytes: u64) -> Result<Self, FramePoolError> {
        if bytes == 0 || bytes % PAGE_SIZE != 0 {
            return Err(FramePoolError::BadSize(bytes));
        }
        // SAFETY: memfd_create takes a NUL-terminated name and flags; it does
        // not touch memory we own beyond reading the name.
        let fd = unsafe { libc::memfd_create(c"guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(FramePoolError::MemfdCreate(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just returned by memfd_create and is owned by nobody else.
        let memfd = unsafe { File::from_raw_fd(fd) };
        memfd.set_len(bytes).map_err(|source| FramePoolError::Truncate { bytes, source })?;
        let len = usize::try_from(bytes).map_err(|_| FramePoolError::BadSize(bytes))?;
        let file = memfd.try_clone().map_err(FramePoolError::MemfdCreate)?;
        let direct_map =
            GuestMemoryMmap::from_ranges_with_files([(GuestAddress(0), len, Some(FileOffset::new(file, 0)))])
                .map_err(|source| FramePoolError::Map { bytes, source })?;
        Ok(Self { memfd: Some(memfd), direct_map, nr_frames: bytes / PAGE_SIZE })
    }

    /// Creates a pool of `bytes / PAGE_SIZE` frames in anonymous private
    /// memory (MAP_PRIVATE | MAP_ANONYMOUS), all zero and unallocated. It has
    /// no memfd: its frames cannot be mapped elsewhere, only through the
    /// direct map (one memslot over it).
    pub fn new_anonymous(bytes: u64) -> Result<Self, FramePoolError> {
        if bytes == 0 || bytes % PAGE_SIZE != 0 {
            return Err(FramePoolError::BadSize(bytes));
        }
        let len = usize::try_from(bytes).map_err(|_| FramePoolError::BadSize(bytes))?;
        let direct_map = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), len)])
            .map_err(|source| FramePoolError::Map { bytes, source })?;
        let pool = Self { memfd: None, direct_map, nr_frames: bytes / PAGE_SIZE };
        // 4 KiB pages, like the memfd pool: with THP "always" the host would
        // back it with huge pages, which KVM maps as such and KSM splits.
        pool.madvise(0, pool.nr_frames, libc::MADV_NOHUGEPAGE, "MADV_NOHUGEPAGE")?;
        Ok(pool)
    }

    /// Whether the pool is anonymous memory rather than a memfd.
    pub fn is_anonymous(&self) -> bool {
        self.memfd.is_none()
    }

    /// madvise over frames [first, first + n) of the direct map, e.g.
    /// MADV_MERGEABLE to hand them to the host's KSM. `name` is the
    /// advice's Linux name, for the error.
    pub fn madvise(&self, first: Pfn, n: u64, advice: libc::c_int, name: &'static str) -> Result<(), FramePoolError> {
        if n == 0 {
            return Ok(());
        }
        let last = first.checked_add(n - 1).ok_or(FramePoolError::BadSize(n))?;
        self.frame_hva(last).ok_or(FramePoolError::BadSize(last))?;
        let start = self.frame_hva(first).ok_or(FramePoolError::BadSize(first))?;
        let len = usize::try_from(n << PAGE_SHIFT).map_err(|_| FramePoolError::BadSize(n))?;
        // SAFETY: [start, start + len) lies in the direct map (both ends
        // checked above), a mapping this pool owns and that no Rust object
        // borrows (frames are accessed through volatile copies). An advice
        // may drop the pages' content (MADV_DONTNEED: they read as zero
        // afterwards, which is what punching a hole means) but never makes
        // the range invalid.
        let rc = unsafe { libc::madvise(start.cast(), len, advice) };
        if rc != 0 {
            return Err(FramePoolError::Madvise { advice: name, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Number of frames in the pool.
    pub fn nr_frames(&self) -> u64 {
        self.nr_frames
    }

    /// The memfd backing the frames (for mapping frames elsewhere); None for
    /// an anonymous pool.
    pub fn memfd(&self) -> Option<&File> {
        self.memfd.as_ref()
    }

    /// The direct map: "guest address" `pfn << PAGE_SHIFT` of this memory is frame `pfn`.
    ///
    /// It implements vm-memory's `Bytes`, so frames are read and written
    /// with bounds-checked volatile accesses.
    pub fn direct_map(&self) -> &GuestMemoryMmap {
        &self.direct_map
    }

    /// Host virtual address of frame `pfn` in the direct map, if the frame exists.
    pub fn frame_hva(&self, pfn: Pfn) -> Option<*mut u8> {
        use vm_memory::GuestMemoryBackend;
        if pfn >= self.nr_frames {
            return None;
        }
        self.direct_map.get_host_address(GuestAddress(pfn << PAGE_SHIFT)).ok()
    }

    /// Returns frame `pfn` to the host by punching a hole in the memfd; its
    /// content reads as zero afterwards.
    pub fn punch_hole(&self, pfn: Pfn) -> Result<(), FramePoolError> {
        self.punch_holes(pfn, 1)
    }

    /// Returns frames [pfn, pfn + count) to the host with one fallocate
    /// (MADV_DONTNEED for an anonymous pool).
    pub fn punch_holes(&self, pfn: Pfn, count: u64) -> Result<(), FramePoolError> {
        let Some(memfd) = &self.memfd else {
            return self.madvise(pfn, count, libc::MADV_DONTNEED, "MADV_DONTNEED");
        };
        let offset = i64::try_from(pfn << PAGE_SHIFT).map_err(|_| FramePoolError::BadSize(pfn))?;
        let len = i64::try_from(count << PAGE_SHIFT).map_err(|_| FramePoolError::BadSize(count))?;
        // SAFETY: fallocate on our own memfd with a range inside it; no memory
        // of ours is passed to the kernel.
        let rc = unsafe {
            libc::fallocate(memfd.as_raw_fd(), libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
        };
        if rc != 0 {
            return Err(FramePoolError::PunchHole { pfn, source: std::io::Error::last_os_error() });
        }
        Ok(())
    }

    /// Which of the frames [first, first + n) hold memory (are not memfd
    /// holes), from one mincore over their part of the direct map. Reading
    /// a hole through the shared mapping would allocate it; this does not.
    pub fn resident(&self, first: Pfn, n: u64) -> Result<Vec<bool>, FramePoolError> {
        if n == 0 {
            return Ok(Vec::new());
        }
        let last = first.checked_add(n - 1).ok_or(FramePoolError::BadSize(n))?;
        self.frame_hva(last).ok_or(FramePoolError::BadSize(last))?;
        let start = self.frame_hva(first).ok_or(FramePoolError::BadSize(first))?;
        let len = usize::try_from(n << PAGE_SHIFT).map_err(|_| FramePoolError::BadSize(n))?;
        let mut vec = vec![0u8; len >> PAGE_SHIFT];
        // SAFETY: [start, start + len) lies in the direct map (both ends
        // checked above), one mapping; `vec` has one byte per page.
        let rc = unsafe { libc::mincore(start.cast(), len, vec.as_mut_ptr()) };
        if rc != 0 {
            return Err(FramePoolError::Stat(std::io::Error::last_os_error()));
        }
        Ok(vec.into_iter().map(|b| b & 1 != 0).collect())
    }

    /// Bytes of the memfd that the host has actually allocated (st_blocks ×
    /// 512); for an anonymous pool, its resident pages (mincore).
    pub fn resident_bytes(&self) -> Result<u64, FramePoolError> {
        use std::os::unix::fs::MetadataExt;
        let Some(memfd) = &self.memfd else {
            let resident = self.resident(0, self.nr_frames)?;
            return Ok(resident.iter().filter(|&&r| r).count() as u64 * PAGE_SIZE);
        };
        let meta = memfd.metadata().map_err(FramePoolError::Stat)?;
        Ok(meta.blocks() * 512)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn rejects_bad_sizes() {
        assert!(matches!(FramePool::new(0), Err(FramePoolError::BadSize(0))));
        assert!(matches!(FramePool::new(4097), Err(FramePoolError::BadSize(4097))));
    }

    #[test]
    fn frames_are_zero_and_writable_and_holes_return_memory() {
        let pool = FramePool::new(16 * PAGE_SIZE).expect("pool");
        assert_eq!(pool.nr_frames(), 16);
        assert_eq!(pool.resident_bytes().expect("stat"), 0);
        let addr = GuestAddress(3 << PAGE_SHIFT);
        assert_eq!(pool.direct_map().read_obj::<u64>(addr).expect("read"), 0);
        pool.direct_map().write_obj(0xdead_beef_u64, addr).expect("write");
        assert_eq!(pool.direct_map().read_obj::<u64>(addr).expect("read"), 0xdead_beef);
        assert_eq!(pool.resident_bytes().expect("stat"), PAGE_SIZE);
        pool.punch_hole(3).expect("punch");
        assert_eq!(pool.resident_bytes().expect("stat"), 0);
        assert_eq!(pool.direct_map().read_obj::<u64>(addr).expect("read"), 0);
        // Reading frame 3 through the shared mapping allocated it again.
        assert_eq!(pool.resident(2, 4).expect("mincore"), vec![false, true, false, false]);
        pool.direct_map().write_obj(1u8, GuestAddress(5 << PAGE_SHIFT)).expect("write");
        assert_eq!(pool.resident(4, 2).expect("mincore"), vec![false, true]);
        assert!(pool.resident(15, 2).is_err());
        assert!(pool.frame_hva(15).is_some());
        assert!(pool.frame_hva(16).is_none());
    }

    #[test]
    fn an_anonymous_pool_behaves_like_a_memfd_pool_and_has_no_memfd() {
        let pool = FramePool::new_anonymous(8 * PAGE_SIZE).expect("pool");
        assert!(pool.is_anonymous() && pool.memfd().is_none());
        assert_eq!(pool.resident_bytes().expect("mincore"), 0);
        pool.direct_map().write_obj(7u64, GuestAddress(2 << PAGE_SHIFT)).expect("write");
        assert_eq!(pool.resident(1, 3).expect("mincore"), vec![false, true, false]);
        assert_eq!(pool.resident_bytes().expect("mincore"), PAGE_SIZE);
        pool.madvise(0, 8, libc::MADV_NORMAL, "MADV_NORMAL").expect("madvise");
        assert!(pool.madvise(7, 2, libc::MADV_NORMAL, "MADV_NORMAL").is_err());
        pool.punch_hole(2).expect("MADV_DONTNEED");
        assert_eq!(pool.resident_bytes().expect("mincore"), 0);
        assert_eq!(pool.direct_map().read_obj::<u64>(GuestAddress(2 << PAGE_SHIFT)).expect("read"), 0);
    }
}
