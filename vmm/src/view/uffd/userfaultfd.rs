//! A userfaultfd descriptor with one safe method per ioctl the view issues,
//! each bound to its request number and argument type (as kvm-ioctls does
//! for KVM), so safe code cannot pair a request with the wrong structure.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::raw::c_ulong;
use std::os::unix::fs::OpenOptionsExt;

use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use super::abi::{
    UffdMsg, UffdioApi, UffdioContinue, UffdioRange, UffdioRegister, UffdioWriteprotect, UFFDIO_API, UFFDIO_CONTINUE,
    UFFDIO_REGISTER, UFFDIO_UNREGISTER, UFFDIO_WAKE, UFFDIO_WRITEPROTECT, UFFD_API, USERFAULTFD_IOC_NEW,
};
use crate::view::ViewError;

/// An open userfaultfd.
#[derive(Debug)]
pub(super) struct Userfaultfd(OwnedFd);

/// The result of an ioctl or system call that returns -1 and sets errno on
/// failure.
fn check(rc: libc::c_int) -> io::Result<libc::c_int> {
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(rc)
}

impl Userfaultfd {
    /// Opens a userfaultfd, non-blocking and close-on-exec, able to catch
    /// kernel-mode faults: KVM faults guest memory in with get_user_pages
    /// from the vCPU thread, so `UFFD_USER_MODE_ONLY` must not be used.
    /// Without CAP_SYS_PTRACE and with vm.unprivileged_userfaultfd = 0 the
    /// system call refuses that (EPERM); /dev/userfaultfd, where its
    /// permissions allow, hands out the same kind of descriptor. The API is
    /// not negotiated yet ([`Userfaultfd::api`]).
    pub(super) fn open() -> Result<Self, ViewError> {
        let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
        // SAFETY: userfaultfd(2) takes one integer argument and returns a
        // new fd or -1; no memory is passed.
        let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
        if fd >= 0 {
            let fd = RawFd::try_from(fd).map_err(|_| ViewError::Uffd {
                op: "userfaultfd()",
                source: io::Error::from_raw_os_error(libc::EOVERFLOW),
            })?;
            // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
            return Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }));
        }
        let err = io::Error::last_os_error();
        if !matches!(err.raw_os_error(), Some(libc::EPERM) | Some(libc::ENOSYS)) {
            return Err(ViewError::Uffd { op: "userfaultfd()", source: err });
        }
        let dev =
            OpenOptions::new().read(true).write(true).custom_flags(libc::O_CLOEXEC).open("/dev/userfaultfd").map_err(
                |source| ViewError::Uffd {
                    op: "open /dev/userfaultfd (the userfaultfd() system call was refused)",
                    source,
                },
            )?;
        // SAFETY: USERFAULTFD_IOC_NEW takes the new fd's flags as an integer
        // argument and returns a new fd or -1; no memory is passed.
        let fd = check(unsafe { ioctl_with_val(&dev, USERFAULTFD_IOC_NEW, flags as c_ulong) })
            .map_err(|source| ViewError::Uffd { op: "USERFAULTFD_IOC_NEW", source })?;
        // SAFETY: `fd` was just returned by the kernel and nobody else owns it.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// A second descriptor of the same userfaultfd (dup).
    pub(super) fn try_clone(&self) -> io::Result<Self> {
        self.0.try_clone().map(Self)
    }

    /// UFFDIO_API: negotiates the API and enables `features`; returns what
    /// the kernel filled in (with `features` 0: every feature it offers).
    /// It can be issued once per descriptor.
    pub(super) fn api(&self, features: u64) -> io::Result<UffdioApi> {
        let mut arg = UffdioApi { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: UFFDIO_API reads and writes a `struct uffdio_api`, which
        // `arg` is, exclusively borrowed for the call.
        check(unsafe { ioctl_with_mut_ref(self, UFFDIO_API, &mut arg) })?;
        Ok(arg)
    }

    /// UFFDIO_REGISTER of `range` in `mode`; returns the ioctls the kernel
    /// offers on it (`uffdio_register.ioctls`).
    pub(super) fn register(&self, range: UffdioRange, mode: u64) -> io::Result<u64> {
        let mut arg = UffdioRegister { range, mode, ioctls: 0 };
        // SAFETY: UFFDIO_REGISTER reads and writes a `struct
        // uffdio_register`, which `arg` is, exclusively borrowed for the
        // call. It changes no memory of ours (only how faults are handled).
        check(unsafe { ioctl_with_mut_ref(self, UFFDIO_REGISTER, &mut arg) })?;
        Ok(arg.ioctls)
    }

    /// UFFDIO_UNREGISTER of `range` (wakes any thread still blocked on it).
    pub(super) fn unregister(&self, range: UffdioRange) -> io::Result<()> {
        // SAFETY: UFFDIO_UNREGISTER reads a `struct uffdio_range`, which
        // `range` is, borrowed for the call.
        check(unsafe { ioctl_with_ref(self, UFFDIO_UNREGISTER, &range) }).map(drop)
    }

    /// UFFDIO_WAKE: wakes the threads blocked on faults in `range`.
    pub(super) fn wake(&self, range: UffdioRange) -> io::Result<()> {
        // SAFETY: UFFDIO_WAKE reads a `struct uffdio_range`, which `range`
        // is, borrowed for the call.
        check(unsafe { ioctl_with_ref(self, UFFDIO_WAKE, &range) }).map(drop)
    }

    /// UFFDIO_WRITEPROTECT of `range` (`UFFDIO_WRITEPROTECT_MODE_*`).
    pub(super) fn writeprotect(&self, range: UffdioRange, mode: u64) -> io::Result<()> {
        let mut arg = UffdioWriteprotect { range, mode };
        // SAFETY: UFFDIO_WRITEPROTECT reads and writes a `struct
        // uffdio_writeprotect`, which `arg` is, exclusively borrowed for the
        // call. It changes the protection of registered pages only, which
        // no Rust object points into (the window is accessed only by KVM).
        check(unsafe { ioctl_with_mut_ref(self, UFFDIO_WRITEPROTECT, &mut arg) }).map(drop)
    }

    /// UFFDIO_CONTINUE of `range` (`UFFDIO_CONTINUE_MODE_*`): maps the
    /// pages already in the page cache. Fails with EEXIST when a pte is
    /// already there, EFAULT when the page cache has no page.
    pub(super) fn continue_(&self, range: UffdioRange, mode: u64) -> io::Result<()> {
        let mut arg = UffdioContinue { range, mode, mapped: 0 };
        // SAFETY: UFFDIO_CONTINUE reads and writes a `struct
        // uffdio_continue`, which `arg` is, exclusively borrowed for the
        // call. It maps existing page-cache pages into registered pages,
        // which no Rust object points into.
        check(unsafe { ioctl_with_mut_ref(self, UFFDIO_CONTINUE, &mut arg) }).map(drop)
    }

    /// Reads pending messages into `msgs`; returns how many were read.
    /// Non-blocking: EAGAIN when there is none.
    pub(super) fn read_msgs(&self, msgs: &mut [UffdMsg]) -> io::Result<usize> {
        // SAFETY: reads at most the byte size of `msgs`, which we own
        // exclusively; UffdMsg is repr(C) plain integers, valid for any bytes.
        let n = unsafe { libc::read(self.0.as_raw_fd(), msgs.as_mut_ptr().cast(), size_of_val(msgs)) };
        let n = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        // The kernel writes whole messages only.
        Ok(n / size_of::<UffdMsg>())
    }
}

impl AsRawFd for Userfaultfd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl AsFd for Userfaultfd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}
