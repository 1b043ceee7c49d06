//! [`UffdFaultThread`]: the VMM thread that reads the view's userfaultfd
//! events, calls the EPT-violation handler for each, and wakes the faulting
//! vCPU once the handler has returned.

use std::io;
use std::os::fd::AsRawFd;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use shadow_mmu::{Access, Gfn, PAGE_SHIFT, PAGE_SIZE};
use vmm_sys_util::eventfd::EventFd;

use super::abi::{UffdMsg, UffdioRange, UFFD_EVENT_PAGEFAULT, UFFD_PAGEFAULT_FLAG_WP, UFFD_PAGEFAULT_FLAG_WRITE};
use super::shared::{FaultWait, Shared, FAULT_SPIN, HINT_ABSENT, HINT_WP};
use super::userfaultfd::Userfaultfd;
use crate::view::ViewError;

/// Why a fault handler could not resolve a fault: any error, with its causes.
pub type FaultHandlerError = Box<dyn std::error::Error + Send + Sync>;

/// The handler of guest faults: resolves `gfn` for `access` by updating
/// the secondary MMU (which calls the view's
/// [`map`](shadow_mmu::EptView::map)), or says why it cannot. `E` is
/// anything that converts into a [`FaultHandlerError`]: the VMM's own error
/// types (the cause is kept), or a message.
pub type UffdFaultHandler<E = FaultHandlerError> = Box<dyn FnMut(Gfn, Access) -> Result<(), E> + Send>;

/// Why the fault thread stopped serving.
#[derive(Debug, thiserror::Error)]
pub enum FaultThreadError {
    /// The handler failed on a fault.
    #[error("serving a {} fault on gfn {gfn:#x}", access_name(.access))]
    Handler {
        /// The faulting page.
        gfn: Gfn,
        /// What the guest did.
        access: Access,
        /// The handler's error.
        #[source]
        source: FaultHandlerError,
    },
    /// Waking the vCPU once its fault was served failed.
    #[error("UFFDIO_WAKE of gfn {gfn:#x}")]
    Wake {
        /// The faulting page.
        gfn: Gfn,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// poll() of the userfaultfd failed.
    #[error("poll of the userfaultfd")]
    Poll(#[source] io::Error),
    /// The userfaultfd reported an error or hang-up instead of events.
    #[error("the userfaultfd reports poll events {0:#x}")]
    Revents(libc::c_short),
    /// read() of the userfaultfd failed.
    #[error("read of the userfaultfd")]
    Read(#[source] io::Error),
    /// A bare UFFDIO_CONTINUE (or the UFFDIO_WAKE after it) failed.
    #[error("bare UFFDIO_CONTINUE of gfn {gfn:#x}")]
    Bare {
        /// The faulting page.
        gfn: Gfn,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A fault at an address the view does not cover.
    #[error("a fault at {0:#x}, outside the view's window")]
    OutsideWindow(u64),
    /// The thread panicked (in the handler or in the thread itself).
    #[error("the thread panicked")]
    Panicked,
}

/// How a fault's access reads in a message.
fn access_name(access: &Access) -> &'static str {
    match access {
        Access::Read => "read",
        Access::Write => "write",
        Access::Fetch => "fetch",
    }
}

/// What the fault thread needs from a [`super::UffdView`]: its own
/// descriptor of the userfaultfd, where W is, and the state shared with the
/// view.
#[derive(Debug)]
pub struct UffdFaultSource {
    pub(super) uffd: Userfaultfd,
    pub(super) base: usize,
    pub(super) first_gfn: Gfn,
    pub(super) nr_pages: usize,
    pub(super) shared: Arc<Shared>,
}

impl UffdFaultSource {
    /// The window page and gfn of a fault at `address`.
    fn page_of(&self, address: u64) -> Result<(usize, Gfn), FaultThreadError> {
        let index = address.wrapping_sub(self.base as u64) >> PAGE_SHIFT;
        if address < self.base as u64 || index >= self.nr_pages as u64 {
            return Err(FaultThreadError::OutsideWindow(address));
        }
        Ok((index as usize, self.first_gfn + index))
    }
}

/// The thread that serves the view's userfaultfd events.
#[derive(Debug)]
pub struct UffdFaultThread {
    stop: Arc<EventFd>,
    /// The stop signal as a busy-waiting thread reads it.
    stopping: Arc<AtomicBool>,
    thread: Option<JoinHandle<Option<FaultThreadError>>>,
}

impl UffdFaultThread {
    /// Spawns a thread that waits for the uffd's events as the view's
    /// [`FaultWait`] says (spinning a while after each, then poll(2)); for
    /// each UFFD_EVENT_PAGEFAULT
    /// at an address in W it calls `handler(gfn, access)` where `access` is
    /// [`Access::Write`] for write-protect faults and faults with
    /// UFFD_PAGEFAULT_FLAG_WRITE, else [`Access::Read`]: userfaultfd cannot
    /// tell an instruction fetch from a read, so [`Access::Fetch`] never
    /// comes from this view.
    ///
    /// The handler resolves the fault by updating the secondary MMU, which
    /// calls [`map`](shadow_mmu::EptView::map) on the same view; while the
    /// thread serves the page, the view's CONTINUE or unprotection does not
    /// wake the faulting vCPU: the thread does, with UFFDIO_WAKE, once the
    /// handler has returned (also when it resolved nothing because the entry
    /// was already right: the vCPU then retries its access). If the handler
    /// returns Err, the thread keeps the error, calls `on_error` (the VMM
    /// kicks its vCPU out of KVM_RUN with it: the vCPU stays blocked on the
    /// fault otherwise) and stops serving. An event outside W, a failing
    /// poll or read, or a panic is handled the same way.
    ///
    /// The handler must never touch W itself (module documentation).
    pub fn spawn<E>(
        source: UffdFaultSource,
        mut handler: UffdFaultHandler<E>,
        on_error: Box<dyn Fn() + Send>,
    ) -> Result<Self, ViewError>
    where
        E: Into<FaultHandlerError> + 'static,
    {
        let stop = EventFd::new(libc::EFD_CLOEXEC | libc::EFD_NONBLOCK)
            .map_err(|source| ViewError::Uffd { op: "eventfd for the fault thread", source })?;
        let stop = Arc::new(stop);
        let stopping = Arc::new(AtomicBool::new(false));
        let signals = (stop.clone(), stopping.clone());
        let mut handler = move |gfn, access| handler(gfn, access).map_err(Into::into);
        let thread = std::thread::Builder::new()
            .name("uffd-faults".into())
            .spawn(move || {
                // A panic is caught so that the vCPU, blocked on the fault,
                // is kicked out and the run ends with statistics.
                let result = std::panic::catch_unwind(AssertUnwindSafe(|| serve(&source, &signals, &mut handler)))
                    .unwrap_or(Some(FaultThreadError::Panicked));
                if result.is_some() {
                    on_error();
                }
                result
            })
            .map_err(|source| ViewError::Uffd { op: "spawning the fault thread", source })?;
        Ok(Self { stop, stopping, thread: Some(thread) })
    }

    /// Stops the thread and joins it; returns the error that stopped it
    /// earlier, if one did.
    pub fn stop(mut self) -> Option<FaultThreadError> {
        self.stop_and_join()
    }

    fn stop_and_join(&mut self) -> Option<FaultThreadError> {
        let thread = self.thread.take()?;
        self.stopping.store(true, Ordering::Release);
        // A failed write leaves the eventfd's counter non-zero anyway (it
        // fails only on overflow), so the thread sees the stop.
        let _ = self.stop.write(1);
        thread.join().unwrap_or(Some(FaultThreadError::Panicked))
    }
}

impl Drop for UffdFaultThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// What the thread calls for each fault.
type Handler<'a> = &'a mut dyn FnMut(Gfn, Access) -> Result<(), FaultHandlerError>;

/// Waits until the uffd has events (true) or `stop` is signalled (false).
fn wait_for_events(uffd: &Userfaultfd, stop: &EventFd) -> Result<bool, FaultThreadError> {
    loop {
        let mut fds = [
            libc::pollfd { fd: uffd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a live array of two pollfd, its length passed.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
        if rc < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(FaultThreadError::Poll(err));
        }
        if fds[1].revents != 0 {
            return Ok(false);
        }
        if fds[0].revents & libc::POLLIN != 0 {
            return Ok(true);
        }
        if fds[0].revents & (libc::POLLERR | libc::POLLHUP | libc::POLLNVAL) != 0 {
            return Err(FaultThreadError::Revents(fds[0].revents));
        }
    }
}

/// The stop signal: the eventfd a blocked thread polls, and the flag a
/// busy one reads.
type StopSignals = (Arc<EventFd>, Arc<AtomicBool>);

/// The fault thread's loop; returns the error that stopped it, if any.
fn serve(source: &UffdFaultSource, stop: &StopSignals, handler: Handler<'_>) -> Option<FaultThreadError> {
    let mut msgs = [UffdMsg::default(); 16];
    let mut last_event = Instant::now();
    loop {
        let n = match next_events(source, stop, &last_event, &mut msgs) {
            Ok(Some(n)) => n,
            Ok(None) => return None,
            Err(e) => return Some(e),
        };
        for msg in &msgs[..n] {
            if let Err(e) = serve_one(source, msg, handler) {
                return Some(e);
            }
        }
        last_event = Instant::now();
    }
}

/// Waits for the next events as [`FaultWait`] says and reads them into
/// `msgs`; returns how many, or None once the thread is asked to stop.
fn next_events(
    source: &UffdFaultSource,
    (stop, stopping): &StopSignals,
    last_event: &Instant,
    msgs: &mut [UffdMsg],
) -> Result<Option<usize>, FaultThreadError> {
    loop {
        let wait = source.shared.wait();
        let spin = match wait {
            FaultWait::Block => false,
            FaultWait::Busy => true,
            FaultWait::Adaptive => last_event.elapsed() < FAULT_SPIN,
        };
        if spin {
            if stopping.load(Ordering::Acquire) {
                return Ok(None);
            }
        } else if !wait_for_events(&source.uffd, stop)? {
            return Ok(None);
        }
        match source.uffd.read_msgs(msgs) {
            Ok(n) if n > 0 => return Ok(Some(n)),
            Ok(_) => {}
            // Nothing yet (spinning), another reader took it, or a signal.
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EINTR)) => match (spin, wait) {
                (false, _) => {}
                (true, FaultWait::Busy) => std::hint::spin_loop(),
                // Anything else runnable on this CPU (the vCPU thread just
                // woken, first) runs before the next look: the thread polls
                // only while the CPU would idle, as KVM's halt polling stops
                // once another task is runnable.
                // SAFETY: sched_yield has no preconditions.
                (true, _) => drop(unsafe { libc::sched_yield() }),
            },
            Err(e) => return Err(FaultThreadError::Read(e)),
        }
    }
}

/// Serves one `struct uffd_msg`: marks the page as being served, runs the
/// handler, then wakes the vCPU (the handler's accounting is done).
fn serve_one(source: &UffdFaultSource, msg: &UffdMsg, handler: Handler<'_>) -> Result<(), FaultThreadError> {
    if msg.event != UFFD_EVENT_PAGEFAULT {
        return Ok(()); // no other event was asked for (UFFDIO_API features)
    }
    let (flags, address) = (msg.pagefault.flags, msg.pagefault.address);
    let (i, gfn) = source.page_of(address)?;
    source.shared.faults.fetch_add(1, Ordering::Relaxed);
    if flags & UFFD_PAGEFAULT_FLAG_WP == 0
        && source.shared.bare.load(Ordering::Acquire)
        && serve_bare(source, address, gfn)?
    {
        return Ok(());
    }
    let access =
        if flags & (UFFD_PAGEFAULT_FLAG_WRITE | UFFD_PAGEFAULT_FLAG_WP) != 0 { Access::Write } else { Access::Read };
    let page = &source.shared.pages[i];
    page.hint.fetch_or(if flags & UFFD_PAGEFAULT_FLAG_WP != 0 { HINT_WP } else { HINT_ABSENT }, Ordering::AcqRel);
    let wakes = page.wakes.load(Ordering::Acquire);
    page.serving.store(true, Ordering::Release);
    let handled = handler(gfn, access);
    page.serving.store(false, Ordering::Release);
    if page.wakes.load(Ordering::Acquire) == wakes {
        // Nothing the handler did resolved the page: the vCPU retries its access.
        source.shared.fault_wakes.fetch_add(1, Ordering::Relaxed);
    }
    // The handler has returned (its accounting is done): wake the vCPU now.
    let range = UffdioRange { start: address & !(PAGE_SIZE - 1), len: PAGE_SIZE };
    source.uffd.wake(range).map_err(|source| FaultThreadError::Wake { gfn, source })?;
    handled.map_err(|source| FaultThreadError::Handler { gfn, access, source })
}

/// The bare mechanism ([`super::UffdView::set_bare_faults`]): one
/// UFFDIO_CONTINUE of the page, which wakes the vCPU; EEXIST (present
/// already) is woken with UFFDIO_WAKE. Returns false, having done nothing,
/// when the page is a memfd hole (CONTINUE fails with EFAULT): the handler
/// serves that one.
fn serve_bare(source: &UffdFaultSource, address: u64, gfn: Gfn) -> Result<bool, FaultThreadError> {
    let range = UffdioRange { start: address & !(PAGE_SIZE - 1), len: PAGE_SIZE };
    let err = match source.uffd.continue_(range, 0) {
        Ok(()) => return Ok(true),
        Err(e) => e,
    };
    match err.raw_os_error() {
        Some(libc::EFAULT) => Ok(false),
        Some(libc::EEXIST) => {
            source.uffd.wake(range).map(|()| true).map_err(|source| FaultThreadError::Bare { gfn, source })
        }
        _ => Err(FaultThreadError::Bare { gfn, source: err }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_handler_error_keeps_the_vmm_error_as_its_cause() {
        let mut handler: UffdFaultHandler<ViewError> = Box::new(|gfn, _| Err(ViewError::OutOfRange(gfn)));
        let source = handler(0x123, Access::Write).map_err(Into::into).expect_err("the handler fails");
        let err = FaultThreadError::Handler { gfn: 0x123, access: Access::Write, source };
        assert_eq!(err.to_string(), "serving a write fault on gfn 0x123");
        let cause = std::error::Error::source(&err).expect("a cause");
        assert!(matches!(cause.downcast_ref::<ViewError>(), Some(ViewError::OutOfRange(0x123))));
    }
}
