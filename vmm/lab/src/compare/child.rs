//! The child `vmm run` processes of a comparison: none outlives the process
//! that started it, and SIGINT or SIGTERM sent to `vmm compare` reaches the
//! running child, which then ends with its statistics.
//!
//! A child gets PR_SET_PDEATHSIG(SIGTERM) before it executes `vmm run`, so
//! it is ended however the parent dies (SIGKILL included). Linux sends the
//! signal when the *thread* that forked the child exits; [`run`] forks and
//! then waits on the same thread, so that thread outlives the child.
//! While [`Forwarding`] is installed, SIGINT and SIGTERM are passed on to the
//! running child and recorded; the comparison then stops after that run and
//! the signal is raised again once the handlers are restored.

use std::io::Read;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicI32, Ordering};

/// The running child's pid, 0 when none: where a signal is forwarded. It is
/// cleared before the child is reaped, so it never names a recycled pid.
static CHILD: AtomicI32 = AtomicI32::new(0);
/// The first SIGINT or SIGTERM received while forwarding, 0 when none.
static PENDING: AtomicI32 = AtomicI32::new(0);

/// The signals passed on to the child.
const FORWARDED: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

extern "C" fn forward(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; the handler
    // puts back what it found, as a handler must.
    let errno = unsafe { *libc::__errno_location() };
    let _ = PENDING.compare_exchange(0, sig, Ordering::SeqCst, Ordering::SeqCst);
    let pid = CHILD.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe; `pid` is our child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = errno };
}

/// SIGINT and SIGTERM handlers that forward to the running child; dropping
/// it restores the previous dispositions. A signal that was ignored when it
/// was installed stays ignored.
#[derive(Debug)]
pub(crate) struct Forwarding {
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

impl Forwarding {
    /// Installs the handlers and clears any signal recorded before.
    pub(crate) fn install() -> std::io::Result<Self> {
        PENDING.store(0, Ordering::SeqCst);
        CHILD.store(0, Ordering::SeqCst);
        let mut this = Self { previous: Vec::new() };
        for sig in FORWARDED {
            // SAFETY: sigaction is plain data; all-zero is a valid value.
            let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
            // SAFETY: a null new action only reads the current one into `old`.
            if unsafe { libc::sigaction(sig, std::ptr::null(), &mut old) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if old.sa_sigaction == libc::SIG_IGN {
                continue;
            }
            // SAFETY: as above.
            let mut new: libc::sigaction = unsafe { std::mem::zeroed() };
            new.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
            new.sa_flags = libc::SA_RESTART;
            // SAFETY: `new.sa_mask` is a valid sigset_t to initialise.
            unsafe { libc::sigemptyset(&mut new.sa_mask) };
            // SAFETY: `new` is a complete action whose handler is
            // async-signal-safe; the old one is kept to be restored.
            if unsafe { libc::sigaction(sig, &new, std::ptr::null_mut()) } != 0 {
                return Err(std::io::Error::last_os_error());
            }
            this.previous.push((sig, old));
        }
        Ok(this)
    }

    /// Restores the previous handlers; the signal received meanwhile, if any.
    pub(crate) fn finish(self) -> Option<libc::c_int> {
        drop(self);
        Some(PENDING.swap(0, Ordering::SeqCst)).filter(|&s| s != 0)
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        for (sig, old) in &self.previous {
            // SAFETY: `old` is the action sigaction returned for this signal.
            unsafe { libc::sigaction(*sig, old, std::ptr::null_mut()) };
        }
    }
}

/// The SIGINT or SIGTERM received while forwarding, if any.
pub(crate) fn pending() -> Option<libc::c_int> {
    Some(PENDING.load(Ordering::SeqCst)).filter(|&s| s != 0)
}

/// Raises `sig` again, for the disposition that was there before compare's
/// (by default it ends the process, as if compare had never caught it).
pub(crate) fn raise(sig: libc::c_int) {
    // SAFETY: raise has no memory-safety preconditions.
    unsafe { libc::raise(sig) };
}

/// How a child ended: its exit status and standard error.
#[derive(Debug)]
pub(crate) struct Ended {
    /// The exit status.
    pub(crate) status: ExitStatus,
    /// Its standard error (lossily decoded).
    pub(crate) stderr: String,
}

impl Ended {
    /// The last non-empty line of standard error, or "".
    pub(crate) fn last_line(&self) -> &str {
        self.stderr.lines().map(str::trim).rfind(|l| !l.is_empty()).unwrap_or("")
    }
}

/// Runs `cmd` (standard input and output discarded, standard error kept)
/// until it ends; the child never outlives this thread's process.
pub(crate) fn run(mut cmd: Command) -> std::io::Result<Ended> {
    // Captured before the fork: the child compares it with its parent after
    // PR_SET_PDEATHSIG, in case the parent died before the prctl.
    let parent = std::process::id() as libc::pid_t;
    // SAFETY: the closure runs in the child between fork and exec. It calls
    // only async-signal-safe functions (prctl, getppid), allocates nothing
    // and touches no lock; an error it returns makes the child exit without
    // running `vmm run`.
    unsafe {
        cmd.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            if libc::getppid() != parent {
                // The parent is already gone: nothing would end this child.
                return Err(std::io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        })
    };
    cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let pid = child.id() as libc::pid_t;
    CHILD.store(pid, Ordering::SeqCst);
    if let Some(sig) = pending() {
        // The signal came before the pid was known to the handler.
        // SAFETY: `pid` is our child, not yet reaped.
        unsafe { libc::kill(pid, sig) };
    }
    let mut stderr = Vec::new();
    if let Some(mut pipe) = child.stderr.take() {
        let _ = pipe.read_to_end(&mut stderr);
    }
    wait_without_reaping(pid);
    CHILD.store(0, Ordering::SeqCst);
    let status = child.wait()?;
    Ok(Ended { status, stderr: String::from_utf8_lossy(&stderr).into_owned() })
}

/// Waits until child `pid` has ended but leaves it a zombie, so that its pid
/// cannot be reused while the signal handler may still send to it.
fn wait_without_reaping(pid: libc::pid_t) {
    loop {
        // SAFETY: siginfo_t is plain data; all-zero is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: waits on our own child with WNOWAIT (it stays reapable);
        // `info` is a valid siginfo_t to write.
        let r = unsafe { libc::waitid(libc::P_PID, pid as libc::id_t, &mut info, libc::WEXITED | libc::WNOWAIT) };
        if r == 0 || std::io::Error::last_os_error().kind() != std::io::ErrorKind::Interrupted {
            return;
        }
    }
}

/// A signal's name, for the few that end a process in practice.
fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGILL => "SIGILL",
        libc::SIGABRT => "SIGABRT",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        _ => return None,
    })
}

/// "exit status N" or "killed by SIGX (signal N)".
pub(crate) fn describe(status: ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exit status {code}"),
        (None, Some(sig)) => match signal_name(sig) {
            Some(name) => format!("killed by {name} (signal {sig})"),
            None => format!("killed by signal {sig}"),
        },
        (None, None) => format!("ended with wait status {}", status.into_raw()),
    }
}

/// A signal's name for messages: "SIGINT", or "signal N".
pub(crate) fn name_of(sig: libc::c_int) -> String {
    signal_name(sig).map_or_else(|| format!("signal {sig}"), str::to_string)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exit_status_and_a_signal_are_described() {
        let exited = ExitStatus::from_raw(2 << 8);
        assert_eq!(describe(exited), "exit status 2");
        let killed = ExitStatus::from_raw(libc::SIGKILL);
        assert_eq!(describe(killed), format!("killed by SIGKILL (signal {})", libc::SIGKILL));
    }

    #[test]
    fn the_last_line_of_stderr_is_the_last_non_empty_one() {
        let ended = Ended { status: ExitStatus::from_raw(0), stderr: "first\nvmm: error: no memory\n\n".into() };
        assert_eq!(ended.last_line(), "vmm: error: no memory");
    }
}
