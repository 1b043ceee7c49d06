//! The userfaultfd view: one KVM memslot over a window W of host virtual
//! memory whose pages are mapped, one by one, to frames of the frame pool,
//! and a userfaultfd that turns the guest's accesses to pages the secondary
//! table does not allow into events served by a thread of the VMM.
//!
//! Guest page `gfn` lives at `W + (gfn - first_gfn) * 4096`, a `MAP_SHARED`
//! mapping of the pool's memfd at the offset of the frame it reaches now.
//! At the start W is one mapping of the frames `[first_gfn, end_gfn)`
//! (identity), pre-populated and registered with
//! `UFFDIO_REGISTER_MODE_MISSING | MINOR | WP`:
//!
//! * `zap` is `MADV_DONTNEED` on W: the memfd keeps the data, the ptes go,
//!   and the next access raises a MINOR fault (MISSING when the frame has
//!   been punched meanwhile: see below). The vCPU waits inside KVM_RUN
//!   until the fault is resolved.
//! * `map` of the frame W's page already maps is `UFFDIO_CONTINUE` (with
//!   `UFFDIO_CONTINUE_MODE_WP` when read-only: a plain CONTINUE silently
//!   drops write protection) if the page was zapped, else
//!   `UFFDIO_WRITEPROTECT` to set or clear the protection. Both wake the
//!   vCPU blocked on the page (setting write protection does not, nor is it
//!   needed).
//! * `map` of another frame replaces W's page with
//!   `mmap(MAP_FIXED | MAP_SHARED, memfd, pfn * 4096)`, registers the fresh
//!   (unregistered) mapping again, and CONTINUEs it so it is present at
//!   once. Neighbouring pages whose offsets are contiguous again merge back
//!   into one VMA; the others count against `vm.max_map_count`.
//! * A read-only remap is created `PROT_READ` and made `PROT_READ |
//!   PROT_WRITE` only once it is registered and write-protected by
//!   userfaultfd: until it is registered the fresh mapping is invisible to
//!   userfaultfd, and a vCPU touching it in that window must not get a
//!   writable pte to a frame that may be shared (a write then fails KVM_RUN
//!   with EFAULT instead of silently changing a KSM page).
//!
//! MISSING is registered as well as MINOR: MINOR fires only when the memfd
//! page exists, so without MISSING a zapped page whose frame was then
//! returned to the host (hole punched) would be silently refilled with a
//! fresh zero page on the guest's next touch, with no event at all.
//!
//! Invariant: nobody but KVM (a vCPU) touches W. The VMM, the loader and the
//! deduplicator read and write frames through the pool's direct map, which
//! is not registered, so no VMM thread can block on its own userfaultfd (in
//! particular not the fault thread, which would deadlock).
//!
//! The fault thread ([`UffdFaultThread`]) reads the events and calls the
//! VMM's EPT-violation handler, which updates the secondary MMU, which calls
//! [`UffdView::map`] on the same view. While the thread serves a page, view
//! operations on that page do not wake its waiters (CONTINUE and
//! unprotection with DONTWAKE, no UFFDIO_WAKE): the thread wakes the vCPU
//! with `UFFDIO_WAKE` once the handler has returned, so the vCPU never runs
//! ahead of the handler's accounting (a copy-on-write break's `change_pte`
//! maps the page writable before the handler's retry and install, and a
//! vCPU woken then would be counted in a phase that has already ended). A
//! fault whose handler resolved nothing (the entry was already right) is
//! woken the same way, and the vCPU retries its access.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use shadow_mmu::{Access, EptView, FramePool, Gfn, Pfn, PAGE_SHIFT, PAGE_SIZE};

use super::ViewError;
use crate::vcpu_gate::VcpuGate;

// ---------------------------------------------------------------------------
// The userfaultfd ABI. The libc crate defines none of it and the installed
// /usr/include/linux/userfaultfd.h lacks the newer bits, so everything is
// written out here from include/uapi/linux/userfaultfd.h (Linux 6.18).
// ---------------------------------------------------------------------------

/// `UFFD_API`.
const UFFD_API: u64 = 0xAA;
/// The ioctl type of userfaultfd (`UFFDIO`, also `USERFAULTFD_IOC`).
const UFFDIO: u64 = 0xAA;

/// `_IOC(dir, UFFDIO, nr, size)` of include/uapi/asm-generic/ioctl.h.
const fn uffd_ioc(dir: u64, nr: u64, size: usize) -> u64 {
    (dir << 30) | ((size as u64) << 16) | (UFFDIO << 8) | nr
}
const IOC_NONE: u64 = 0;
const IOC_WRITE: u64 = 1;
const IOC_READ: u64 = 2;

/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on /dev/userfaultfd.
const USERFAULTFD_IOC_NEW: u64 = uffd_ioc(IOC_NONE, 0x00, 0);
/// `UFFDIO_API`: `_IOWR(UFFDIO, 0x3F, struct uffdio_api)`.
const UFFDIO_API: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x3F, size_of::<UffdioApi>());
/// `UFFDIO_REGISTER`: `_IOWR(UFFDIO, 0x00, struct uffdio_register)`.
const UFFDIO_REGISTER: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x00, size_of::<UffdioRegister>());
/// `UFFDIO_UNREGISTER`: `_IOR(UFFDIO, 0x01, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = uffd_ioc(IOC_READ, 0x01, size_of::<UffdioRange>());
/// `UFFDIO_WAKE`: `_IOR(UFFDIO, 0x02, struct uffdio_range)`.
const UFFDIO_WAKE: u64 = uffd_ioc(IOC_READ, 0x02, size_of::<UffdioRange>());
/// `UFFDIO_WRITEPROTECT`: `_IOWR(UFFDIO, 0x06, struct uffdio_writeprotect)`.
const UFFDIO_WRITEPROTECT: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x06, size_of::<UffdioWriteprotect>());
/// `UFFDIO_CONTINUE`: `_IOWR(UFFDIO, 0x07, struct uffdio_continue)`.
const UFFDIO_CONTINUE: u64 = uffd_ioc(IOC_READ | IOC_WRITE, 0x07, size_of::<UffdioContinue>());

/// Bits of `uffdio_register.ioctls`: `1 << _UFFDIO_WRITEPROTECT`, `1 << _UFFDIO_CONTINUE`.
const UFFD_RANGE_IOCTLS_NEEDED: u64 = (1 << 0x06) | (1 << 0x07);

/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING faults on shmem (a probe bit only).
const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: MINOR faults on shmem.
const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write protection on shmem.
const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4; not in the installed headers):
/// UFFDIO_WRITEPROTECT also protects ptes that are not populated yet.
const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;
/// Features the view cannot work without.
const FEATURES_REQUIRED: u64 = UFFD_FEATURE_MINOR_SHMEM | UFFD_FEATURE_WP_HUGETLBFS_SHMEM;
/// Features requested when the kernel offers them.
const FEATURES_OPTIONAL: u64 = UFFD_FEATURE_MISSING_SHMEM | UFFD_FEATURE_WP_UNPOPULATED;

/// `UFFDIO_REGISTER_MODE_MISSING`.
const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;
/// How every page of W is registered.
const REGISTER_MODE: u64 = UFFDIO_REGISTER_MODE_MISSING | UFFDIO_REGISTER_MODE_MINOR | UFFDIO_REGISTER_MODE_WP;

/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect and wake).
const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`.
const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP` (not in the installed headers): install the pte
/// write-protected.
const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`.
const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`.
const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;
/// `sizeof(struct uffd_msg)` (packed): event u8, 7 reserved bytes, then the
/// `pagefault` arm of the union: flags u64 at 8, address u64 at 16, ptid u32
/// at 24, padding to 32.
const UFFD_MSG_SIZE: usize = 32;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioApi {
    api: u64,
    features: u64,
    ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct UffdioRange {
    start: u64,
    len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioRegister {
    range: UffdioRange,
    mode: u64,
    ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioWriteprotect {
    range: UffdioRange,
    mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default)]
struct UffdioContinue {
    range: UffdioRange,
    mode: u64,
    mapped: i64,
}

/// Issues a userfaultfd ioctl whose argument is a `#[repr(C)]` structure of
/// the ABI above (`T` must be one of them and `req` its request number).
fn uffd_ioctl<T>(fd: RawFd, req: u64, arg: &mut T) -> io::Result<()> {
    // SAFETY: `arg` is a live, exclusively borrowed structure of exactly the
    // size the request number encodes; the kernel reads and writes only
    // inside it. A bad fd or request is reported as an error, not UB.
    let rc = unsafe { libc::ioctl(fd, req as libc::Ioctl, arg as *mut T) };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn uffd_err(op: &'static str) -> impl FnOnce(io::Error) -> ViewError {
    move |source| ViewError::Uffd { op, source }
}

/// Opens a userfaultfd, non-blocking and close-on-exec, able to catch
/// kernel-mode faults: KVM faults guest memory in with get_user_pages from
/// the vCPU thread, so `UFFD_USER_MODE_ONLY` must not be used. Without
/// CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd = 0 the system call
/// refuses that (EPERM); /dev/userfaultfd, where its permissions allow,
/// hands out the same kind of descriptor.
fn open_userfaultfd() -> Result<OwnedFd, ViewError> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes one integer argument and returns a new fd
    // or -1; no memory is passed.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd >= 0 {
        let fd = RawFd::try_from(fd).map_err(|_| ViewError::Uffd {
            op: "userfaultfd()",
            source: io::Error::other("the kernel returned an fd out of range"),
        })?;
        // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
        return Ok(unsafe { OwnedFd::from_raw_fd(fd) });
    }
    let err = io::Error::last_os_error();
    if !matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS)) {
        return Err(ViewError::Uffd { op: "userfaultfd()", source: err });
    }
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/userfaultfd")
        .map_err(uffd_err("open /dev/userfaultfd (the userfaultfd() system call was refused)"))?;
    // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as an integer
    // argument and returns a new fd or -1; no memory is passed.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW as libc::Ioctl, flags) };
    if fd < 0 {
        return Err(ViewError::Uffd { op: "USERFAULTFD_IOC_NEW", source: io::Error::last_os_error() });
    }
    // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Opens a userfaultfd and enables the features the view needs.
///
/// UFFDIO_API can be issued once per descriptor and fails as a whole if one
/// requested feature is missing, so a first descriptor only asks what the
/// kernel offers.
fn open_view_userfaultfd() -> Result<OwnedFd, ViewError> {
    let probe = open_userfaultfd()?;
    let mut api = UffdioApi { api: UFFD_API, ..Default::default() };
    uffd_ioctl(probe.as_raw_fd(), UFFDIO_API, &mut api).map_err(uffd_err("UFFDIO_API (probe)"))?;
    let offered = api.features;
    if offered & FEATURES_REQUIRED != FEATURES_REQUIRED {
        return Err(ViewError::Uffd {
            op: "UFFDIO_API",
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                format!(
                    "the kernel offers userfaultfd features {offered:#x} but the view needs MINOR_SHMEM and \
                     WP_HUGETLBFS_SHMEM ({FEATURES_REQUIRED:#x}, Linux 6.1 or later)"
                ),
            ),
        });
    }
    drop(probe);
    let uffd = open_userfaultfd()?;
    let mut api = UffdioApi { api: UFFD_API, features: FEATURES_REQUIRED | (offered & FEATURES_OPTIONAL), ioctls: 0 };
    uffd_ioctl(uffd.as_raw_fd(), UFFDIO_API, &mut api).map_err(uffd_err("UFFDIO_API"))?;
    Ok(uffd)
}

/// vm.max_map_count, or the kernel's default (DEFAULT_MAX_MAP_COUNT) if it
/// cannot be read.
fn max_map_count() -> u64 {
    std::fs::read_to_string("/proc/sys/vm/max_map_count").ok().and_then(|s| s.trim().parse().ok()).unwrap_or(65530)
}

/// Maps an error of a call that may create VMAs: ENOMEM there means
/// vm.max_map_count was reached.
fn vma_err(op: &'static str) -> impl FnOnce(io::Error) -> ViewError {
    move |source| match source.raw_os_error() {
        Some(libc::ENOMEM) => ViewError::MapLimit { limit: max_map_count() },
        _ => ViewError::Uffd { op, source },
    }
}

// ---------------------------------------------------------------------------
// The window
// ---------------------------------------------------------------------------

/// The virtual range W, unmapped on drop unless it must be leaked because
/// KVM may still point at it.
#[derive(Debug)]
struct Window {
    base: usize,
    len: usize,
    leak: bool,
}

impl Window {
    fn page_addr(&self, index: usize) -> usize {
        self.base + (index << PAGE_SHIFT)
    }

    fn range(&self, index: usize, pages: usize) -> UffdioRange {
        UffdioRange { start: self.page_addr(index) as u64, len: (pages as u64) << PAGE_SHIFT }
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

/// Set by the fault thread before it calls the handler: the kernel reported
/// this page absent (MINOR or MISSING fault).
const HINT_ABSENT: u8 = 1;
/// Set by the fault thread: the kernel reported a write-protect fault.
const HINT_WP: u8 = 2;

/// Per-page state shared between the view and the fault thread.
#[derive(Debug, Default)]
struct PageSync {
    /// Bumped by every view operation on the page that wakes its waiters, so
    /// the fault thread can tell whether the handler resolved the fault.
    wakes: AtomicU32,
    /// What the latest fault on the page said (HINT_*), consumed by the next
    /// `map` of the page. It keeps the view right if its bookkeeping ever
    /// disagrees with the kernel: a MINOR fault on a page the view believes
    /// present is resolved by CONTINUE (EEXIST then) rather than by a wake
    /// that would make the vCPU fault again forever.
    hint: AtomicU8,
    /// The fault thread is serving a fault on the page: view operations on
    /// it leave the waking to the thread.
    serving: AtomicBool,
}

/// State shared by the view and its fault thread.
#[derive(Debug)]
struct Shared {
    pages: Box<[PageSync]>,
    /// Faults served by the thread.
    faults: AtomicU64,
    /// Faults the handler left unresolved, woken by the thread with UFFDIO_WAKE.
    fault_wakes: AtomicU64,
}

// ---------------------------------------------------------------------------
// The view
// ---------------------------------------------------------------------------

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
    uffd: OwnedFd,
    window: Window,
    pages: Vec<PageState>,
    shared: Arc<Shared>,
    remaps: u64,
    continues: u64,
    wp_changes: u64,
    zaps: u64,
}

impl UffdView {
    /// Builds W for guest pages [first_gfn, end_gfn), identity-mapped and
    /// writable, registers it, and installs memslot `slot` over it at gpa
    /// `first_gfn << 12`.
    ///
    /// W is populated before it is registered, which allocates every frame
    /// of the range in the memfd (the guest would otherwise take a
    /// userfaultfd fault on its first touch of each page). The slot must not
    /// overlap another.
    pub fn new(
        vm: Arc<VmFd>,
        gate: Arc<VcpuGate>,
        pool: Arc<FramePool>,
        slot: u32,
        first_gfn: Gfn,
        end_gfn: Gfn,
    ) -> Result<Self, ViewError> {
        if first_gfn >= end_gfn {
            return Err(ViewError::OutOfRange(first_gfn));
        }
        if end_gfn > pool.nr_frames() {
            return Err(ViewError::NoSuchFrame(end_gfn - 1));
        }
        let nr_pages = usize::try_from(end_gfn - first_gfn).map_err(|_| ViewError::OutOfRange(end_gfn))?;
        let len = nr_pages << PAGE_SHIFT;
        let offset = libc::off_t::try_from(first_gfn << PAGE_SHIFT).map_err(|_| ViewError::NoSuchFrame(first_gfn))?;
        let memfd = pool.memfd().ok_or(ViewError::AnonymousPool)?.as_raw_fd();
        let uffd = open_view_userfaultfd()?;

        // SAFETY: a fresh shared mapping of our memfd at a kernel-chosen
        // address; it aliases no Rust object (W is accessed only by KVM).
        let base = unsafe {
            libc::mmap(std::ptr::null_mut(), len, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_SHARED, memfd, offset)
        };
        if base == libc::MAP_FAILED {
            return Err(vma_err("mmap of the view's window")(io::Error::last_os_error()));
        }
        let window = Window { base: base as usize, len, leak: false };

        // Populate the ptes of the frames that hold memory already (the
        // image, anything loaded) before registering, so they never fault.
        // Frames that are still memfd holes stay holes: the guest's first
        // touch of one is a MISSING fault, which the VMM serves as the host's
        // own first-touch fault (the secondary MMU already maps the page),
        // not as a secondary-MMU fault; guest RAM is not allocated up front.
        let resident = pool
            .resident(first_gfn, nr_pages as u64)
            .map_err(|e| ViewError::Uffd { op: "mincore of the frame pool", source: io::Error::other(e) })?;
        let mut i = 0;
        while i < nr_pages {
            if !resident[i] {
                i += 1;
                continue;
            }
            let run = resident[i..].iter().take_while(|&&r| r).count();
            let range = window.range(i, run);
            // SAFETY: madvise on pages of the mapping just created; their
            // frames hold memory, so POPULATE_WRITE maps them and allocates
            // nothing.
            if unsafe { libc::madvise(range.start as *mut libc::c_void, range.len as usize, libc::MADV_POPULATE_WRITE) }
                != 0
            {
                return Err(ViewError::Uffd {
                    op: "madvise(MADV_POPULATE_WRITE) of the window",
                    source: io::Error::last_os_error(),
                });
            }
            i += run;
        }
        register(uffd.as_raw_fd(), window.range(0, nr_pages))?;

        let shared = Arc::new(Shared {
            pages: (0..nr_pages).map(|_| PageSync::default()).collect(),
            faults: AtomicU64::new(0),
            fault_wakes: AtomicU64::new(0),
        });
        let pages =
            (first_gfn..end_gfn).zip(&resident).map(|(pfn, &present)| PageState { pfn, present, wp: false }).collect();
        let region = kvm_userspace_memory_region {
            slot,
            flags: 0,
            guest_phys_addr: first_gfn << PAGE_SHIFT,
            memory_size: len as u64,
            userspace_addr: window.base as u64,
        };
        // SAFETY: [userspace_addr, + memory_size) is W, owned by the view
        // being built; the view deletes the slot in its Drop before W is
        // unmapped (and leaks W if the deletion fails), so KVM never points
        // at memory that is gone or reused.
        unsafe { vm.set_user_memory_region(region) }.map_err(|source| ViewError::SetMemslot {
            slot,
            gpa: region.guest_phys_addr,
            size: region.memory_size,
            source,
        })?;
        Ok(Self {
            vm,
            gate,
            pool,
            slot,
            first_gfn,
            uffd,
            window,
            pages,
            shared,
            remaps: 0,
            continues: 0,
            wp_changes: 0,
            zaps: 0,
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

    fn index(&self, start: Gfn, end: Gfn) -> Result<usize, ViewError> {
        let end_gfn = self.first_gfn + self.pages.len() as u64;
        if start < self.first_gfn || end > end_gfn || start >= end {
            return Err(ViewError::OutOfRange(start));
        }
        usize::try_from(start - self.first_gfn).map_err(|_| ViewError::OutOfRange(start))
    }

    /// Records a view operation that woke the waiters of page `i`.
    fn woke(&self, i: usize) {
        self.shared.pages[i].wakes.fetch_add(1, Ordering::AcqRel);
    }

    /// Whether the fault thread is serving page `i` (and will wake it).
    fn deferring(&self, i: usize) -> bool {
        self.shared.pages[i].serving.load(Ordering::Acquire)
    }

    fn wake(&self, i: usize) -> Result<(), ViewError> {
        if !self.deferring(i) {
            let mut range = self.window.range(i, 1);
            uffd_ioctl(self.uffd.as_raw_fd(), UFFDIO_WAKE, &mut range).map_err(uffd_err("UFFDIO_WAKE"))?;
        }
        self.woke(i);
        Ok(())
    }

    /// Sets (`wp`) or clears the write protection of present page `i`;
    /// clearing wakes a vCPU blocked on a write to it.
    fn write_protect(&mut self, i: usize, wp: bool) -> Result<(), ViewError> {
        let dontwake = if self.deferring(i) { UFFDIO_WRITEPROTECT_MODE_DONTWAKE } else { 0 };
        let mut arg = UffdioWriteprotect {
            range: self.window.range(i, 1),
            mode: if wp { UFFDIO_WRITEPROTECT_MODE_WP } else { dontwake },
        };
        uffd_ioctl(self.uffd.as_raw_fd(), UFFDIO_WRITEPROTECT, &mut arg).map_err(uffd_err("UFFDIO_WRITEPROTECT"))?;
        self.wp_changes += 1;
        self.pages[i].wp = wp;
        if !wp {
            self.woke(i);
        }
        Ok(())
    }

    /// Populates the pte of page `i` from the page cache (UFFDIO_CONTINUE),
    /// write-protected if `wp`, and wakes its waiters unless `dontwake`.
    fn continue_page(&mut self, i: usize, wp: bool, dontwake: bool) -> Result<(), ViewError> {
        let mut mode = if wp { UFFDIO_CONTINUE_MODE_WP } else { 0 };
        if dontwake || self.deferring(i) {
            mode |= UFFDIO_CONTINUE_MODE_DONTWAKE;
        }
        let mut populated = false;
        let mut again = 0;
        loop {
            let mut arg = UffdioContinue { range: self.window.range(i, 1), mode, mapped: 0 };
            match uffd_ioctl(self.uffd.as_raw_fd(), UFFDIO_CONTINUE, &mut arg) {
                Ok(()) => {
                    self.continues += 1;
                    self.pages[i].present = true;
                    self.pages[i].wp = wp;
                    if !dontwake {
                        self.woke(i);
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                    // Already populated (a vCPU touched a fresh mapping before
                    // it was registered, or the bookkeeping was stale): the
                    // protection is unknown, so set it explicitly, then wake
                    // (CONTINUE did not).
                    self.pages[i].present = true;
                    self.write_protect(i, wp)?;
                    if !dontwake && wp {
                        self.wake(i)?;
                    }
                    return Ok(());
                }
                Err(e) if e.raw_os_error() == Some(libc::EFAULT) && !populated => {
                    // The frame is a hole in the memfd (never written, or
                    // returned to the host): CONTINUE maps only pages in the
                    // page cache. Allocate it (as zeroes) through the
                    // unregistered direct map and try again.
                    self.populate_frame(self.pages[i].pfn)?;
                    populated = true;
                }
                Err(e) if e.raw_os_error() == Some(libc::EAGAIN) && again < 16 => {
                    // The mm is changing under a non-cooperative event: retry.
                    again += 1;
                }
                Err(e) if e.raw_os_error() == Some(libc::EINVAL) && wp => {
                    return Err(ViewError::Uffd {
                        op: "UFFDIO_CONTINUE with UFFDIO_CONTINUE_MODE_WP (needs Linux 6.6 or later)",
                        source: e,
                    })
                }
                Err(source) => return Err(ViewError::Uffd { op: "UFFDIO_CONTINUE", source }),
            }
        }
    }

    /// Allocates frame `pfn` in the memfd if it is a hole, through the direct map.
    fn populate_frame(&self, pfn: Pfn) -> Result<(), ViewError> {
        let hva = self.pool.frame_hva(pfn).ok_or(ViewError::NoSuchFrame(pfn))?;
        // SAFETY: one page of the pool's direct map, which the pool keeps
        // mapped; POPULATE_WRITE faults it in without changing its data.
        if unsafe { libc::madvise(hva.cast(), PAGE_SIZE as usize, libc::MADV_POPULATE_WRITE) } != 0 {
            return Err(ViewError::Uffd {
                op: "madvise(MADV_POPULATE_WRITE) of a frame",
                source: io::Error::last_os_error(),
            });
        }
        Ok(())
    }

    /// Points page `i` of W at frame `pfn`: a fresh mapping, registered,
    /// populated, with the access asked for; wakes the page's waiters.
    fn remap(&mut self, i: usize, pfn: Pfn, writable: bool) -> Result<(), ViewError> {
        let addr = self.window.page_addr(i);
        let offset = libc::off_t::try_from(pfn << PAGE_SHIFT).map_err(|_| ViewError::NoSuchFrame(pfn))?;
        let memfd = self.pool.memfd().ok_or(ViewError::AnonymousPool)?.as_raw_fd();
        // A read-only frame is mapped PROT_READ until userfaultfd protects
        // it (module documentation).
        let prot = if writable { libc::PROT_READ | libc::PROT_WRITE } else { libc::PROT_READ };
        // SAFETY: MAP_FIXED over one page of W, which the view owns and no
        // Rust object points into (W is accessed only by KVM).
        let rc = unsafe {
            libc::mmap(
                addr as *mut libc::c_void,
                PAGE_SIZE as usize,
                prot,
                libc::MAP_SHARED | libc::MAP_FIXED,
                memfd,
                offset,
            )
        };
        if rc == libc::MAP_FAILED {
            // The kernel checks the map count before it unmaps anything, so
            // the old mapping is still there: the state is unchanged.
            return Err(vma_err("mmap(MAP_FIXED) of a frame into the window")(io::Error::last_os_error()));
        }
        self.remaps += 1;
        // Until the sequence completes, the next map() must start it again.
        self.pages[i] = PageState { pfn: UNKNOWN_PFN, present: false, wp: false };
        register(self.uffd.as_raw_fd(), self.window.range(i, 1))?;
        self.pages[i].pfn = pfn;
        if writable {
            return self.continue_page(i, false, false);
        }
        // Read-only: populate write-protected without waking (a woken
        // vCPU's write would still meet PROT_READ and fail KVM_RUN), lift
        // PROT_READ (the uffd-wp bit keeps the pte read-only), then wake.
        self.continue_page(i, true, true)?;
        // SAFETY: mprotect of one page of W, owned by the view.
        if unsafe { libc::mprotect(addr as *mut libc::c_void, PAGE_SIZE as usize, libc::PROT_READ | libc::PROT_WRITE) }
            != 0
        {
            self.pages[i].pfn = UNKNOWN_PFN;
            return Err(vma_err("mprotect of a remapped page of the window")(io::Error::last_os_error()));
        }
        self.wake(i)
    }
}

/// Registers `range` of W with the view's userfaultfd, checking that the
/// kernel offers CONTINUE and WRITEPROTECT on it.
fn register(uffd: RawFd, range: UffdioRange) -> Result<(), ViewError> {
    let mut arg = UffdioRegister { range, mode: REGISTER_MODE, ioctls: 0 };
    uffd_ioctl(uffd, UFFDIO_REGISTER, &mut arg).map_err(vma_err("UFFDIO_REGISTER (MISSING | MINOR | WP)"))?;
    if arg.ioctls & UFFD_RANGE_IOCTLS_NEEDED != UFFD_RANGE_IOCTLS_NEEDED {
        return Err(ViewError::Uffd {
            op: "UFFDIO_REGISTER",
            source: io::Error::new(
                io::ErrorKind::Unsupported,
                format!("the kernel offers ioctls {:#x} on the window, without CONTINUE and WRITEPROTECT", arg.ioctls),
            ),
        });
    }
    Ok(())
}

impl EptView for UffdView {
    type Error = ViewError;

    /// `MADV_DONTNEED` on the pages' part of W: the memfd keeps the data and
    /// the next guest access raises a MINOR (or, for a punched frame,
    /// MISSING) fault.
    fn zap(&mut self, start: Gfn, end: Gfn) -> Result<(), ViewError> {
        let i = self.index(start, end)?;
        let n = (end - start) as usize;
        let range = self.window.range(i, n);
        // SAFETY: MADV_DONTNEED on pages of W, which only KVM accesses; the
        // shared memfd pages stay in the page cache.
        if unsafe { libc::madvise(range.start as *mut libc::c_void, range.len as usize, libc::MADV_DONTNEED) } != 0 {
            return Err(ViewError::Uffd {
                op: "madvise(MADV_DONTNEED) of the window",
                source: io::Error::last_os_error(),
            });
        }
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
        let hint = self.shared.pages[i].hint.swap(0, Ordering::AcqRel);
        let page = self.pages[i];
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
            return self.write_protect(i, !writable);
        }
        Ok(())
    }

    fn counters(&self) -> Vec<(&'static str, u64)> {
        vec![
            ("view_remaps", self.remaps),
            ("view_continues", self.continues),
            ("view_wp_changes", self.wp_changes),
            ("view_zaps", self.zaps),
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
            self.window.leak = true;
            return;
        }
        // Unregistering wakes any thread still blocked on W (there should be
        // none: the vCPUs are gone); errors do not matter, munmap follows.
        let mut range = self.window.range(0, self.pages.len());
        let _ = uffd_ioctl(self.uffd.as_raw_fd(), UFFDIO_UNREGISTER, &mut range);
    }
}

// ---------------------------------------------------------------------------
// The fault thread
// ---------------------------------------------------------------------------

/// What the fault thread needs from a [`UffdView`]: its own descriptor of
/// the userfaultfd, where W is, and the state shared with the view.
#[derive(Debug)]
pub struct UffdFaultSource {
    uffd: OwnedFd,
    base: usize,
    first_gfn: Gfn,
    nr_pages: usize,
    shared: Arc<Shared>,
}

/// The handler of guest faults: resolves `gfn` for `access` by updating the
/// secondary MMU (which calls [`UffdView::map`]), or says why it cannot.
pub type UffdFaultHandler = Box<dyn FnMut(Gfn, Access) -> Result<(), String> + Send>;

/// The thread that serves the view's userfaultfd events.
#[derive(Debug)]
pub struct UffdFaultThread {
    stop: Arc<OwnedFd>,
    thread: Option<JoinHandle<Option<String>>>,
}

impl UffdFaultThread {
    /// Spawns a thread that poll()s the uffd; for each UFFD_EVENT_PAGEFAULT
    /// at an address in W it calls `handler(gfn, access)` where `access` is
    /// [`Access::Write`] for write-protect faults and faults with
    /// UFFD_PAGEFAULT_FLAG_WRITE, else [`Access::Read`]: userfaultfd cannot
    /// tell an instruction fetch from a read, so [`Access::Fetch`] never
    /// comes from this view.
    ///
    /// The handler resolves the fault by updating the secondary MMU, which
    /// calls [`UffdView::map`] on the same view: its CONTINUE or
    /// unprotection wakes the faulting vCPU. If the handler returns Ok and
    /// nothing woke the page (the entry was already right), the thread
    /// issues UFFDIO_WAKE and the vCPU retries its access. If the handler
    /// returns Err, the thread keeps the first error, calls `on_error` (the
    /// VMM kicks its vCPU out of KVM_RUN with it: the vCPU stays blocked on
    /// the fault otherwise) and stops serving. An event outside W, or a
    /// failing poll or read, is handled the same way.
    ///
    /// The handler must never touch W itself (module documentation).
    pub fn spawn(
        source: UffdFaultSource,
        handler: UffdFaultHandler,
        on_error: Box<dyn Fn() + Send>,
    ) -> Result<Self, ViewError> {
        // SAFETY: eventfd(2) takes two integers and returns a new fd or -1.
        let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) };
        if fd < 0 {
            return Err(ViewError::Uffd { op: "eventfd for the fault thread", source: io::Error::last_os_error() });
        }
        // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
        let stop = Arc::new(unsafe { OwnedFd::from_raw_fd(fd) });
        let thread_stop = stop.clone();
        let thread = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                // A panic is caught so that the vCPU, blocked on the fault,
                // is kicked out and the run ends with statistics.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| serve(&source, &thread_stop, handler)))
                    .unwrap_or_else(|_| Some("the userfaultfd fault thread panicked".into()));
                if result.is_some() {
                    on_error();
                }
                result
            })
            .map_err(uffd_err("spawning the fault thread"))?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops the thread and joins it; returns the first handler error.
    pub fn stop(mut self) -> Option<String> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<String> {
        let thread = self.thread.take()?;
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        unsafe { libc::write(self.stop.as_raw_fd(), (&one as *const u64).cast(), size_of::<u64>()) };
        thread.join().unwrap_or_else(|_| Some("the userfaultfd fault thread panicked".into()))
    }
}

impl Drop for UffdFaultThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// The fault thread's loop; returns the error that stopped it, if any.
fn serve(source: &UffdFaultSource, stop: &OwnedFd, mut handler: UffdFaultHandler) -> Option<String> {
    let uffd = source.uffd.as_raw_fd();
    let mut buf = [0u8; UFFD_MSG_SIZE * 16];
    loop {
        let mut fds = [
            libc::pollfd { fd: uffd, events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfd, its length passed.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Some(format!("userfaultfd fault thread: poll failed: {err}"));
        }
        if fds[1].revents != 0 {
            return None;
        }
        if fds[0].revents & libc::POLLIN == 0 {
            if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
                return Some(format!("userfaultfd fault thread: the userfaultfd reports {:#x}", fds[0].revents));
            }
            continue;
        }
        // SAFETY: reads at most `buf.len()` bytes into `buf`, which we own.
        let n = unsafe { libc::read(uffd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if matches!(err.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) {
                continue; // another reader took it, or a signal
            }
            return Some(format!("userfaultfd fault thread: read failed: {err}"));
        }
        let n = n as usize; // n >= 0 here
        for msg in buf[..n].chunks_exact(UFFD_MSG_SIZE) {
            if let Err(e) = serve_one(source, msg, &mut handler) {
                return Some(e);
            }
        }
    }
}

/// Serves one `struct uffd_msg`.
fn serve_one(source: &UffdFaultSource, msg: &[u8], handler: &mut UffdFaultHandler) -> Result<(), String> {
    if msg[0] != UFFD_EVENT_PAGEFAULT {
        return Ok(()); // no other event was asked for (UFFDIO_API features)
    }
    let word = |at: usize| msg.get(at..at + 8).and_then(|b| <[u8; 8]>::try_from(b).ok()).map(u64::from_ne_bytes);
    let (Some(flags), Some(address)) = (word(8), word(16)) else {
        return Err("userfaultfd fault thread: short message".into());
    };
    let offset = address.wrapping_sub(source.base as u64);
    let index = offset >> PAGE_SHIFT;
    if address < source.base as u64 || index >= source.nr_pages as u64 {
        return Err(format!("userfaultfd fault at {address:#x}, outside the view's window"));
    }
    let i = index as usize;
    let gfn = source.first_gfn + index;
    let access =
        if flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP) != 0 { Access::Write } else { Access::Read };
    let page = &source.shared.pages[i];
    page.hint.fetch_or(if flags & UFFD_PAGEFAULT_FLAG_WP != 0 { HINT_WP } else { HINT_ABSENT }, Ordering::AcqRel);
    let wakes = page.wakes.load(Ordering::Acquire);
    source.shared.faults.fetch_add(1, Ordering::Relaxed);
    page.serving.store(true, Ordering::Release);
    let handled = handler(gfn, access);
    page.serving.store(false, Ordering::Release);
    if page.wakes.load(Ordering::Acquire) == wakes {
        // Nothing the handler did resolved the page: the vCPU retries its access.
        source.shared.fault_wakes.fetch_add(1, Ordering::Relaxed);
    }
    // The handler has returned (its accounting is done): wake the vCPU now.
    let mut range = UffdioRange { start: address & !(PAGE_SIZE - 1), len: PAGE_SIZE };
    uffd_ioctl(source.uffd.as_raw_fd(), UFFDIO_WAKE, &mut range)
        .map_err(|e| format!("userfaultfd fault thread: UFFDIO_WAKE of gfn {gfn:#x} failed: {e}"))?;
    handled
}
