//! What the guests of a fleet share besides the frame pool and the
//! deduplicator: the barrier of port 0x503 (ABI 1.1).
//!
//! A fleet is `--guests N` guests of one image, each its own KVM VM, vCPU
//! thread and mm (see `crate::builder::build_fleet` and `crate::run`). The
//! barrier lets their phases line up: a vCPU that writes a value to port
//! 0x503 waits until every guest still running has written that value; a
//! guest that ends is no longer waited for. A single guest never waits.

use std::sync::{Condvar, Mutex, PoisonError};
use std::time::Duration;

/// How long a waiting vCPU sleeps before it looks at its stop request again
/// (a timeout or a signal ends the wait).
const STOP_POLL: Duration = Duration::from_millis(5);

/// Why a guest could not pass the barrier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BarrierError {
    /// Another value than the one the guests already waiting wrote.
    #[error(
        "guest {guest} wrote {value} to the fleet barrier (port 0x503) while the guests waiting there wrote \
         {waiting}: every guest must write the same value"
    )]
    Mismatch {
        /// The guest.
        guest: u64,
        /// Its value.
        value: u32,
        /// The value the others wait at.
        waiting: u32,
    },
    /// The run is being stopped (a timeout, a signal, a VMM failure).
    #[error("the wait at the fleet barrier was stopped")]
    Stopped,
}

#[derive(Debug, Default)]
struct State {
    /// Guests still running.
    running: u64,
    /// Guests waiting now, and at which value.
    waiting: u64,
    value: Option<u32>,
    /// Barriers passed so far: a waiter leaves when this moves.
    generation: u64,
}

impl State {
    /// Everyone still running is waiting: the barrier opens.
    fn open_if_complete(&mut self) -> bool {
        if self.waiting > 0 && self.waiting >= self.running {
            self.waiting = 0;
            self.value = None;
            self.generation += 1;
            return true;
        }
        false
    }
}

/// The barrier of one fleet.
#[derive(Debug)]
pub struct FleetBarrier {
    state: Mutex<State>,
    opened: Condvar,
}

impl FleetBarrier {
    /// A barrier for `guests` running guests.
    pub fn new(guests: u64) -> Self {
        Self { state: Mutex::new(State { running: guests, ..State::default() }), opened: Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Guest `guest` waits at `value` until every guest still running has
    /// written it; `stopped` is polled meanwhile and ends the wait.
    pub fn wait(&self, guest: u64, value: u32, stopped: &dyn Fn() -> bool) -> Result<(), BarrierError> {
        let mut state = self.lock();
        match state.value {
            Some(waiting) if waiting != value => return Err(BarrierError::Mismatch { guest, value, waiting }),
            _ => state.value = Some(value),
        }
        state.waiting += 1;
        let generation = state.generation;
        if state.open_if_complete() {
            self.opened.notify_all();
            return Ok(());
        }
        while state.generation == generation {
            if stopped() {
                state.waiting -= 1;
                if state.waiting == 0 {
                    state.value = None;
                }
                return Err(BarrierError::Stopped);
            }
            state = self.opened.wait_timeout(state, STOP_POLL).unwrap_or_else(PoisonError::into_inner).0;
        }
        Ok(())
    }

    /// A guest ended: it is no longer waited for (the others may pass now).
    pub fn leave(&self) {
        let mut state = self.lock();
        state.running = state.running.saturating_sub(1);
        if state.open_if_complete() {
            self.opened.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use super::*;

    #[test]
    fn a_guest_alone_never_waits() {
        let b = FleetBarrier::new(1);
        for v in [1, 7, 7, 2] {
            b.wait(0, v, &|| panic!("polled")).expect("passes");
        }
    }

    #[test]
    fn no_guest_passes_before_all_have_arrived() {
        let b = Arc::new(FleetBarrier::new(4));
        let passed = Arc::new(AtomicU64::new(0));
        let threads: Vec<_> = (0..3)
            .map(|g| {
                let (b, passed) = (b.clone(), passed.clone());
                std::thread::spawn(move || {
                    b.wait(g, 9, &|| false).expect("passes");
                    passed.fetch_add(1, Ordering::SeqCst);
                })
            })
            .collect();
        while b.lock().waiting < 3 {
            std::thread::yield_now();
        }
        assert_eq!(passed.load(Ordering::SeqCst), 0, "three of four arrived: nobody passes");
        b.wait(3, 9, &|| false).expect("the last one opens it");
        threads.into_iter().for_each(|t| t.join().expect("joined"));
        assert_eq!(passed.load(Ordering::SeqCst), 3);
        b.wait(0, 10, &|| true).expect_err("a new barrier: guest 0 alone waits, and is stopped");
    }

    #[test]
    fn a_guest_that_ends_is_no_longer_waited_for() {
        let b = Arc::new(FleetBarrier::new(2));
        let b2 = b.clone();
        let waiter = std::thread::spawn(move || b2.wait(0, 1, &|| false));
        while b.lock().waiting < 1 {
            std::thread::yield_now();
        }
        b.leave();
        assert_eq!(waiter.join().expect("joined"), Ok(()));
        b.wait(0, 2, &|| panic!("alone now")).expect("passes alone");
    }

    #[test]
    fn another_value_is_refused_and_a_stop_ends_the_wait() {
        let b = FleetBarrier::new(3);
        let err = b.wait(0, 5, &|| true).expect_err("stopped");
        assert_eq!(err, BarrierError::Stopped);
        assert_eq!(b.lock().waiting, 0, "a stopped waiter is gone");
        let b = Arc::new(b);
        let b2 = b.clone();
        let first = std::thread::spawn(move || b2.wait(0, 5, &|| false));
        while b.lock().waiting < 1 {
            std::thread::yield_now();
        }
        assert_eq!(b.wait(1, 6, &|| false), Err(BarrierError::Mismatch { guest: 1, value: 6, waiting: 5 }));
        b.leave();
        b.leave();
        assert_eq!(first.join().expect("joined"), Ok(()));
    }
}
