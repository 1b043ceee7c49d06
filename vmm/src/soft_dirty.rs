//! Soft-dirty rounds: `clear_refs` 4 over guest RAM above 1 MiB, as a live
//! migration's pre-copy loop makes them to learn which pages were written
//! since the round before. The guest asks for one (port 0x501 = 5, guest
//! ABI 1.1) and waits for it; `vmm run --soft-dirty-ms N` makes one every N
//! ms from a thread of its own. The secondary MMU follows each round under
//! the run's policy: event-aware write-protects its entries in place, the
//! others zap them. With deduplication off, a round still runs (under
//! range-flush, as today's KVM).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use shadow_mmu::{lock, PrimaryMmu, PrimaryMmuError};

/// Errors of the rounds thread.
#[derive(Debug, thiserror::Error)]
pub enum SoftDirtyError {
    /// A round failed in the primary MMU.
    #[error("soft-dirty round failed")]
    Round(#[source] PrimaryMmuError),
    /// The thread panicked.
    #[error("the soft-dirty thread panicked")]
    Panicked,
}

/// One round over every guest page of `mm`; returns the pages that were
/// soft-dirty (written since the round before) when it began.
pub fn soft_dirty_round(mm: &Mutex<PrimaryMmu>) -> Result<u64, PrimaryMmuError> {
    let mut mm = lock(mm);
    let (first, end) = mm.guest_range();
    let written = mm.nr_soft_dirty(first, end)?;
    mm.clear_refs_soft_dirty(first, end)?;
    Ok(written)
}

/// The thread of `--soft-dirty-ms`: a round every interval until stopped.
/// A round that fails stops the thread and raises the failure flag (the
/// watchdog then ends the run).
#[derive(Debug)]
pub struct SoftDirtyThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), SoftDirtyError>>>,
}

impl SoftDirtyThread {
    /// Starts making rounds on `mm` every `interval`.
    pub fn start(mm: Arc<Mutex<PrimaryMmu>>, interval: Duration, failed: Arc<AtomicBool>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("vmm-soft-dirty".into()).spawn(move || {
            let rounds = std::panic::AssertUnwindSafe(|| -> Result<(), SoftDirtyError> {
                while !flag.load(Ordering::SeqCst) {
                    std::thread::park_timeout(interval);
                    if flag.load(Ordering::SeqCst) {
                        break;
                    }
                    soft_dirty_round(&mm).map_err(SoftDirtyError::Round)?;
                }
                Ok(())
            });
            let ended = std::panic::catch_unwind(rounds).unwrap_or(Err(SoftDirtyError::Panicked));
            if ended.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            ended
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops the thread; the error of a round that failed, if one did.
    pub fn stop(mut self) -> Result<(), SoftDirtyError> {
        self.halt()
    }

    /// Whether the thread ended by itself (a round failed).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_some_and(JoinHandle::is_finished)
    }

    fn halt(&mut self) -> Result<(), SoftDirtyError> {
        self.stop.store(true, Ordering::SeqCst);
        let Some(thread) = self.thread.take() else { return Ok(()) };
        thread.thread().unpark();
        thread.join().unwrap_or(Err(SoftDirtyError::Panicked))
    }
}

impl Drop for SoftDirtyThread {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}
