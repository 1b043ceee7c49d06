//! Keeping the vCPU out of KVM_RUN while another thread changes memslots.
//!
//! KVM cannot split or merge memslots atomically: a change deletes slots and
//! creates their replacements, and a vCPU running in between can find RAM
//! missing (an instruction fetch there fails to emulate; under PVM even the
//! emulation of a port I/O instruction fails, and the guest triple-faults).
//! QEMU meets the same problem with its memory transactions and blocks
//! vCPU ioctls around them; so does this gate. Changes made on the vCPU
//! thread itself need nothing: the vCPU is not in KVM_RUN then.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

thread_local! {
    /// Set while this thread serves a fault the vCPU is blocked on.
    static SERVING_VCPU_FAULT: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` on behalf of the vCPU, which is blocked inside KVM_RUN on a
/// fault `f` serves (the userfaultfd view's fault thread): the vCPU runs no
/// guest code meanwhile, so pauses inside `f` need not kick it.
pub fn serving_vcpu_fault<R>(f: impl FnOnce() -> R) -> R {
    SERVING_VCPU_FAULT.with(|s| s.set(true));
    let r = f();
    SERVING_VCPU_FAULT.with(|s| s.set(false));
    r
}

#[derive(Debug, Default)]
struct State {
    /// The vCPU thread is inside (or about to enter) KVM_RUN.
    in_run: bool,
    /// Nested pauses in progress.
    paused: u32,
    /// Pauses that had to kick the vCPU out of KVM_RUN.
    kicks: u64,
}

/// The gate between the vCPU thread and memslot changes from other threads.
#[derive(Debug)]
pub struct VcpuGate {
    state: Mutex<State>,
    changed: Condvar,
    vcpu_thread: Mutex<Option<libc::pthread_t>>,
}

impl Default for VcpuGate {
    fn default() -> Self {
        Self::new()
    }
}

impl VcpuGate {
    /// A gate with no vCPU thread registered yet.
    pub fn new() -> Self {
        Self { state: Mutex::new(State::default()), changed: Condvar::new(), vcpu_thread: Mutex::new(None) }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn vcpu_thread(&self) -> Option<libc::pthread_t> {
        *self.vcpu_thread.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers the calling thread as the vCPU thread.
    pub fn register_vcpu_thread(&self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        *self.vcpu_thread.lock().unwrap_or_else(PoisonError::into_inner) = Some(me);
    }

    fn on_vcpu_thread(&self) -> bool {
        if SERVING_VCPU_FAULT.with(Cell::get) {
            return true;
        }
        // SAFETY: pthread_self and pthread_equal have no preconditions.
        self.vcpu_thread().is_some_and(|t| unsafe { libc::pthread_equal(t, libc::pthread_self()) } != 0)
    }

    /// The vCPU thread, before KVM_RUN: waits while a pause is in progress.
    pub fn enter_run(&self) {
        let mut s = self.state();
        while s.paused > 0 {
            s = self.changed.wait(s).unwrap_or_else(PoisonError::into_inner);
        }
        s.in_run = true;
    }

    /// The vCPU thread, after KVM_RUN returned.
    pub fn exit_run(&self) {
        self.state().in_run = false;
        self.changed.notify_all();
    }

    /// Another thread, before changing memslots: returns once the vCPU is
    /// out of KVM_RUN and will stay out until [`VcpuGate::resume`]. A no-op
    /// on the vCPU thread.
    pub fn pause(&self) {
        if self.on_vcpu_thread() {
            return;
        }
        let mut s = self.state();
        s.paused += 1;
        let mut kicked = false;
        while s.in_run {
            if let Some(t) = self.vcpu_thread() {
                // SAFETY: the vCPU thread lives as long as the VM that owns
                // this gate; the kick signal has a no-op handler, so the
                // only effect is that KVM_RUN returns EINTR.
                unsafe { libc::pthread_kill(t, crate::signals::kick_signal()) };
                kicked = true;
            }
            s = self.changed.wait_timeout(s, Duration::from_millis(1)).unwrap_or_else(PoisonError::into_inner).0;
        }
        if kicked {
            s.kicks += 1;
        }
    }

    /// Ends a pause begun by [`VcpuGate::pause`].
    pub fn resume(&self) {
        if self.on_vcpu_thread() {
            return;
        }
        let mut s = self.state();
        s.paused = s.paused.saturating_sub(1);
        drop(s);
        self.changed.notify_all();
    }

    /// Pauses that had to kick the vCPU out of KVM_RUN.
    pub fn kicks(&self) -> u64 {
        self.state().kicks
    }

    /// Keeps the vCPU out of KVM_RUN until the returned guard is dropped (a
    /// [`VcpuGate::pause`] then, on drop, a [`VcpuGate::resume`]). Pauses
    /// nested inside, such as the views' own for each slot change or remap,
    /// then cost nothing and kick nobody: a batch of view updates costs one
    /// kick at most.
    /// The guard owns a reference to the gate, not a borrow of whoever
    /// handed it out, so that the holder may go on changing the view.
    pub fn hold(self: &Arc<Self>) -> GateHold {
        self.pause();
        GateHold { gate: self.clone() }
    }
}

/// The vCPU held out of KVM_RUN ([`VcpuGate::hold`]) until this is dropped.
#[derive(Debug)]
#[must_use = "the vCPU is let back in as soon as the hold is dropped"]
pub struct GateHold {
    gate: Arc<VcpuGate>,
}

impl Drop for GateHold {
    fn drop(&mut self) {
        self.gate.resume();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pause_waits_for_the_vcpu_to_leave_and_holds_it_out() {
        crate::signals::install(false).expect("kick handler");
        let gate = Arc::new(VcpuGate::new());
        let g = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let vcpu = std::thread::spawn(move || {
            g.register_vcpu_thread();
            g.enter_run();
            tx.send(()).expect("send");
            // "KVM_RUN": a sleep the kick signal interrupts early or not.
            std::thread::sleep(Duration::from_millis(20));
            g.exit_run();
            g.enter_run(); // must block while paused
            let entered_at = std::time::Instant::now();
            g.exit_run();
            entered_at
        });
        rx.recv().expect("vcpu in run");
        gate.pause();
        let paused_at = std::time::Instant::now();
        std::thread::sleep(Duration::from_millis(30));
        gate.resume();
        let entered_at = vcpu.join().expect("vcpu thread");
        assert!(entered_at >= paused_at + Duration::from_millis(30), "the vCPU re-entered during the pause");
        assert_eq!(gate.kicks(), 1);
    }

    #[test]
    fn pauses_inside_a_hold_kick_nobody_and_the_vcpu_waits_for_the_hold() {
        crate::signals::install(false).expect("kick handler");
        let gate = Arc::new(VcpuGate::new());
        let g = gate.clone();
        let (tx, rx) = std::sync::mpsc::channel();
        let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
        let vcpu = std::thread::spawn(move || {
            g.register_vcpu_thread();
            g.enter_run();
            tx.send(()).expect("send");
            std::thread::sleep(Duration::from_millis(20));
            g.exit_run();
            go_rx.recv().expect("the holder is done pausing");
            g.enter_run(); // must block until the hold is dropped
            let entered_at = std::time::Instant::now();
            g.exit_run();
            entered_at
        });
        rx.recv().expect("vcpu in run");
        let hold = gate.hold();
        for _ in 0..3 {
            gate.pause();
            gate.resume();
        }
        go_tx.send(()).expect("send");
        std::thread::sleep(Duration::from_millis(30));
        let released_at = std::time::Instant::now();
        drop(hold);
        let entered_at = vcpu.join().expect("vcpu thread");
        assert!(entered_at >= released_at, "the vCPU re-entered while held");
        assert_eq!(gate.kicks(), 1, "only the hold kicked");
    }
}
