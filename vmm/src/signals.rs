//! Stopping a running vCPU from outside: the --timeout watchdog and the
//! signals that end a run cleanly.
//!
//! A vCPU inside KVM_RUN leaves it only on an exit or a signal. The watchdog
//! thread, once the deadline has passed or an interrupt was requested, sends
//! the kick signal to the vCPU thread every few milliseconds until the run
//! loop has noticed: a single signal could land just before KVM_RUN is
//! entered and be lost, a repeated one cannot.
//!
//! [`ENDING_SIGNALS`] (INT, TERM, HUP, QUIT, PIPE) each end the run as
//! `interrupted`, with its statistics, and, under the `kernel` policy, with
//! the host's KSM knobs restored: a closed terminal (HUP) or a reader that
//! went away (PIPE) must not leave the host changed.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

/// The first ending signal received, 0 while none.
static INTERRUPTED_BY: AtomicI32 = AtomicI32::new(0);

/// The signals that end a run cleanly, with its statistics.
pub const ENDING_SIGNALS: [libc::c_int; 5] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP, libc::SIGQUIT, libc::SIGPIPE];

/// Why the run loop was asked to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopRequest {
    /// Nothing asked.
    None,
    /// --timeout expired.
    Timeout,
    /// One of [`ENDING_SIGNALS`], this one.
    Interrupted(libc::c_int),
    /// A VMM thread serving the guest failed (the vCPU may be blocked on it).
    VmmFailure,
}

/// The signal used to kick the vCPU thread out of KVM_RUN.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

extern "C" fn on_interrupt(sig: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    let _ = INTERRUPTED_BY.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
}

/// Installs the kick handler (needed for --timeout) and, when `catch_interrupts`,
/// turns each of [`ENDING_SIGNALS`] into a clean end of the run with statistics.
pub fn install(catch_interrupts: bool) -> std::io::Result<()> {
    let map = |e: vmm_sys_util::errno::Error| std::io::Error::from_raw_os_error(e.errno());
    register_signal_handler(kick_signal(), on_kick).map_err(map)?;
    if catch_interrupts {
        for sig in ENDING_SIGNALS {
            register_signal_handler(sig, on_interrupt).map_err(map)?;
        }
    }
    Ok(())
}

/// The first of [`ENDING_SIGNALS`] received, if any.
pub fn interrupted_by() -> Option<libc::c_int> {
    Some(INTERRUPTED_BY.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// A signal's name, `SIGHUP`-style.
pub fn name(sig: libc::c_int) -> String {
    let known = [
        (libc::SIGINT, "SIGINT"),
        (libc::SIGTERM, "SIGTERM"),
        (libc::SIGHUP, "SIGHUP"),
        (libc::SIGQUIT, "SIGQUIT"),
        (libc::SIGPIPE, "SIGPIPE"),
        (libc::SIGKILL, "SIGKILL"),
        (libc::SIGSEGV, "SIGSEGV"),
        (libc::SIGABRT, "SIGABRT"),
    ];
    known.iter().find(|(n, _)| *n == sig).map_or_else(|| format!("signal {sig}"), |(_, name)| name.to_string())
}

/// A thread that kicks the vCPU when the deadline passes or an interrupt arrives.
#[derive(Debug)]
pub struct Watchdog {
    stop: Arc<AtomicU8>,
    done: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

const NONE: u8 = 0;
const TIMEOUT: u8 = 1;
const INTERRUPT: u8 = 2;
const FAILURE: u8 = 3;
const KICK_PERIOD: Duration = Duration::from_millis(5);

impl Watchdog {
    /// Starts watching the calling thread (the vCPU thread). `failed` tells
    /// whether a VMM thread serving the guest has failed.
    pub fn start(timeout: Option<Duration>, failed: Box<dyn Fn() -> bool + Send>) -> Self {
        let stop = Arc::new(AtomicU8::new(NONE));
        let done = Arc::new(AtomicBool::new(false));
        // SAFETY: pthread_self has no preconditions.
        let vcpu_thread = unsafe { libc::pthread_self() };
        let deadline = timeout.map(|t| Instant::now() + t);
        let (stop2, done2) = (stop.clone(), done.clone());
        let thread = std::thread::Builder::new()
            .name("vmm-watchdog".into())
            .spawn(move || {
                while !done2.load(Ordering::SeqCst) {
                    if stop2.load(Ordering::SeqCst) == NONE {
                        if interrupted_by().is_some() {
                            stop2.store(INTERRUPT, Ordering::SeqCst);
                        } else if failed() {
                            stop2.store(FAILURE, Ordering::SeqCst);
                        } else if deadline.is_some_and(|d| Instant::now() >= d) {
                            stop2.store(TIMEOUT, Ordering::SeqCst);
                        }
                    }
                    if stop2.load(Ordering::SeqCst) != NONE {
                        // SAFETY: the vCPU thread outlives the watchdog (it joins
                        // it in Drop), so the pthread_t is valid; the kick
                        // signal has a handler installed by `install`.
                        unsafe { libc::pthread_kill(vcpu_thread, kick_signal()) };
                    }
                    std::thread::park_timeout(KICK_PERIOD);
                }
            })
            .ok();
        Self { stop, done, thread }
    }

    /// Whether the run loop should stop, and why.
    pub fn stop_request(&self) -> StopRequest {
        match self.stop.load(Ordering::SeqCst) {
            TIMEOUT => StopRequest::Timeout,
            INTERRUPT => StopRequest::Interrupted(interrupted_by().unwrap_or(libc::SIGINT)),
            FAILURE => StopRequest::VmmFailure,
            // The signal itself may have interrupted KVM_RUN before the
            // watchdog saw it: one Ctrl-C is then one `intr` exit, not two.
            _ => match interrupted_by() {
                Some(sig) => StopRequest::Interrupted(sig),
                None => StopRequest::None,
            },
        }
    }
}

impl Drop for Watchdog {
    fn drop(&mut self) {
        self.done.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.thread().unpark();
            let _ = t.join();
        }
    }
}
