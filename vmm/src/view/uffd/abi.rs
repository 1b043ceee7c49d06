//! The userfaultfd ABI the view uses, from include/uapi/linux/userfaultfd.h
//! (Linux 6.18), with the names the header gives them.
//!
//! Written out here because no maintained crate has all of it: the libc
//! crate defines none of it, linux-raw-sys has the structures and request
//! numbers but drops the `UFFDIO_*_MODE_*` flags (the header defines them
//! with casts bindgen skips) and `USERFAULTFD_IOC_NEW`, and userfaultfd-sys
//! runs bindgen on the build machine's headers, which here lack
//! `UFFDIO_CONTINUE_MODE_WP` and `UFFD_FEATURE_WP_UNPOPULATED`.
//!
//! The request numbers are built by vmm-sys-util's `ioctl_expr`, the `const
//! fn` its `ioctl_io*_nr!` macros expand to (the macros themselves declare a
//! non-const `fn`, which a `const` assertion cannot call), and each is
//! checked at compile time against the number the header's `_IO*` macro
//! gives on x86-64, as are the structures' sizes.

use std::mem::{offset_of, size_of};
use std::os::raw::{c_uint, c_ulong};

use vmm_sys_util::ioctl::{ioctl_expr, _IOC_NONE, _IOC_READ, _IOC_WRITE};

/// `UFFD_API`: the API version UFFDIO_API negotiates.
pub(super) const UFFD_API: u64 = 0xAA;
/// `UFFDIO`, the ioctl type of a userfaultfd (and `USERFAULTFD_IOC`, that of
/// /dev/userfaultfd).
const UFFDIO: c_uint = 0xAA;

/// `_UFFDIO_REGISTER` and the other ioctl numbers within the type.
const _UFFDIO_REGISTER: c_uint = 0x00;
const _UFFDIO_UNREGISTER: c_uint = 0x01;
const _UFFDIO_WAKE: c_uint = 0x02;
const _UFFDIO_WRITEPROTECT: c_uint = 0x06;
const _UFFDIO_CONTINUE: c_uint = 0x07;
const _UFFDIO_API: c_uint = 0x3F;

/// `_IOWR(UFFDIO, nr, T)`.
const fn iowr<T>(nr: c_uint) -> c_ulong {
    ioctl_expr(_IOC_READ | _IOC_WRITE, UFFDIO, nr, size_of::<T>() as c_uint)
}

/// `_IOR(UFFDIO, nr, T)`. (The header notes that UNREGISTER and WAKE, which
/// the kernel only reads, should have been `_IOW`; the number is `_IOR`.)
const fn ior<T>(nr: c_uint) -> c_ulong {
    ioctl_expr(_IOC_READ, UFFDIO, nr, size_of::<T>() as c_uint)
}

/// `USERFAULTFD_IOC_NEW`: `_IO(USERFAULTFD_IOC, 0x00)` on /dev/userfaultfd;
/// its argument is the new descriptor's flags.
pub(super) const USERFAULTFD_IOC_NEW: c_ulong = ioctl_expr(_IOC_NONE, UFFDIO, 0x00, 0);
/// `UFFDIO_API`: `_IOWR(UFFDIO, _UFFDIO_API, struct uffdio_api)`.
pub(super) const UFFDIO_API: c_ulong = iowr::<UffdioApi>(_UFFDIO_API);
/// `UFFDIO_REGISTER`: `_IOWR(UFFDIO, _UFFDIO_REGISTER, struct uffdio_register)`.
pub(super) const UFFDIO_REGISTER: c_ulong = iowr::<UffdioRegister>(_UFFDIO_REGISTER);
/// `UFFDIO_UNREGISTER`: `_IOR(UFFDIO, _UFFDIO_UNREGISTER, struct uffdio_range)`.
pub(super) const UFFDIO_UNREGISTER: c_ulong = ior::<UffdioRange>(_UFFDIO_UNREGISTER);
/// `UFFDIO_WAKE`: `_IOR(UFFDIO, _UFFDIO_WAKE, struct uffdio_range)`.
pub(super) const UFFDIO_WAKE: c_ulong = ior::<UffdioRange>(_UFFDIO_WAKE);
/// `UFFDIO_WRITEPROTECT`: `_IOWR(UFFDIO, _UFFDIO_WRITEPROTECT, struct uffdio_writeprotect)`.
pub(super) const UFFDIO_WRITEPROTECT: c_ulong = iowr::<UffdioWriteprotect>(_UFFDIO_WRITEPROTECT);
/// `UFFDIO_CONTINUE`: `_IOWR(UFFDIO, _UFFDIO_CONTINUE, struct uffdio_continue)`.
pub(super) const UFFDIO_CONTINUE: c_ulong = iowr::<UffdioContinue>(_UFFDIO_CONTINUE);

const _: () = assert!(USERFAULTFD_IOC_NEW == 0xAA00);
const _: () = assert!(UFFDIO_API == 0xC018_AA3F);
const _: () = assert!(UFFDIO_REGISTER == 0xC020_AA00);
const _: () = assert!(UFFDIO_UNREGISTER == 0x8010_AA01);
const _: () = assert!(UFFDIO_WAKE == 0x8010_AA02);
const _: () = assert!(UFFDIO_WRITEPROTECT == 0xC018_AA06);
const _: () = assert!(UFFDIO_CONTINUE == 0xC020_AA07);

/// `uffdio_register.ioctls` bits the view needs on its window:
/// `1 << _UFFDIO_WRITEPROTECT | 1 << _UFFDIO_CONTINUE`.
pub(super) const UFFD_RANGE_IOCTLS_NEEDED: u64 = (1 << _UFFDIO_WRITEPROTECT) | (1 << _UFFDIO_CONTINUE);

/// `UFFD_FEATURE_MISSING_SHMEM`: MISSING faults on shmem (Linux 4.11).
pub(super) const UFFD_FEATURE_MISSING_SHMEM: u64 = 1 << 5;
/// `UFFD_FEATURE_MINOR_SHMEM`: MINOR faults on shmem (Linux 5.14).
pub(super) const UFFD_FEATURE_MINOR_SHMEM: u64 = 1 << 10;
/// `UFFD_FEATURE_WP_HUGETLBFS_SHMEM`: write protection on shmem (Linux 5.19).
pub(super) const UFFD_FEATURE_WP_HUGETLBFS_SHMEM: u64 = 1 << 12;
/// `UFFD_FEATURE_WP_UNPOPULATED` (Linux 6.4): UFFDIO_WRITEPROTECT also
/// protects ptes that are not populated yet.
pub(super) const UFFD_FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

/// `UFFDIO_REGISTER_MODE_MISSING`.
pub(super) const UFFDIO_REGISTER_MODE_MISSING: u64 = 1 << 0;
/// `UFFDIO_REGISTER_MODE_WP`.
pub(super) const UFFDIO_REGISTER_MODE_WP: u64 = 1 << 1;
/// `UFFDIO_REGISTER_MODE_MINOR`.
pub(super) const UFFDIO_REGISTER_MODE_MINOR: u64 = 1 << 2;

/// `UFFDIO_WRITEPROTECT_MODE_WP`: protect (without it: unprotect and wake).
pub(super) const UFFDIO_WRITEPROTECT_MODE_WP: u64 = 1 << 0;
/// `UFFDIO_WRITEPROTECT_MODE_DONTWAKE`: unprotect without waking.
pub(super) const UFFDIO_WRITEPROTECT_MODE_DONTWAKE: u64 = 1 << 1;
/// `UFFDIO_CONTINUE_MODE_DONTWAKE`.
pub(super) const UFFDIO_CONTINUE_MODE_DONTWAKE: u64 = 1 << 0;
/// `UFFDIO_CONTINUE_MODE_WP` (Linux 6.6): install the pte write-protected.
pub(super) const UFFDIO_CONTINUE_MODE_WP: u64 = 1 << 1;

/// `UFFD_EVENT_PAGEFAULT`.
pub(super) const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// `UFFD_PAGEFAULT_FLAG_WRITE`: the fault was a write.
pub(super) const UFFD_PAGEFAULT_FLAG_WRITE: u64 = 1 << 0;
/// `UFFD_PAGEFAULT_FLAG_WP`: a write-protect fault (else MISSING or MINOR).
pub(super) const UFFD_PAGEFAULT_FLAG_WP: u64 = 1 << 1;

/// `struct uffdio_api`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdioApi {
    pub(super) api: u64,
    pub(super) features: u64,
    pub(super) ioctls: u64,
}

/// `struct uffdio_range`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(super) struct UffdioRange {
    pub(super) start: u64,
    pub(super) len: u64,
}

/// `struct uffdio_register`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdioRegister {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) ioctls: u64,
}

/// `struct uffdio_writeprotect`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdioWriteprotect {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
}

/// `struct uffdio_continue`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdioContinue {
    pub(super) range: UffdioRange,
    pub(super) mode: u64,
    pub(super) mapped: i64,
}

/// `struct uffd_msg` (`__packed` in the header, but every field is at its
/// natural alignment, so `repr(C)` has the same layout). Only the
/// `pagefault` arm of the `arg` union is spelled out: the view asks for no
/// other event, and the bytes of any other arm are plain integers here too.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdMsg {
    pub(super) event: u8,
    reserved1: u8,
    reserved2: u16,
    reserved3: u32,
    pub(super) pagefault: UffdPagefault,
}

/// `uffd_msg.arg.pagefault`.
#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
pub(super) struct UffdPagefault {
    pub(super) flags: u64,
    pub(super) address: u64,
    /// `feat.ptid`, the faulting thread (only with UFFD_FEATURE_THREAD_ID).
    ptid: u32,
    /// The padding to the union's size (its `reserved` arm is 3 × u64).
    pad: u32,
}

const _: () = assert!(size_of::<UffdioApi>() == 24);
const _: () = assert!(size_of::<UffdioRange>() == 16);
const _: () = assert!(size_of::<UffdioRegister>() == 32);
const _: () = assert!(size_of::<UffdioWriteprotect>() == 24);
const _: () = assert!(size_of::<UffdioContinue>() == 32);
const _: () = assert!(size_of::<UffdMsg>() == 32);
const _: () = assert!(offset_of!(UffdMsg, pagefault) == 8);
const _: () = assert!(offset_of!(UffdMsg, pagefault) + offset_of!(UffdPagefault, address) == 16);
const _: () = assert!(offset_of!(UffdMsg, pagefault) + offset_of!(UffdPagefault, ptid) == 24);
