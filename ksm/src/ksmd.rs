//! ksmd (`ksm_scan_thread`): the thread that scans a batch of
//! `pages_to_scan` pages, sleeps `sleep_millisecs`, and again, while the
//! guest runs. A batch ends early at the end of a full scan, as
//! `ksm_do_scan` does, and is worked in stretches of at most
//! [`KSM_SCAN_SLICE`] with the deduplicator's lock let go between them, so
//! that a stop takes effect within about one stretch whatever the knobs.

use std::any::Any;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use shadow_mmu::lock;

use crate::ksm::{Ksm, KsmError};
use crate::scan::{ScanStop, KSM_SCAN_SLICE};

/// A running ksmd.
#[derive(Debug)]
pub struct Ksmd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), KsmError>>>,
}

impl Ksmd {
    /// Starts scanning every mm on `ksm`'s list. Lock order: the
    /// deduplicator, then one mm at a time (then, inside notifier calls,
    /// that mm's secondary MMU).
    ///
    /// `failed` is set when the thread ends by itself, on an error or a
    /// panic, so that whoever runs the guest can stop at once: a scan that
    /// panicked may have left the primary or secondary MMU half-updated, and
    /// the guest must not go on reading through them.
    pub fn start(ksm: Arc<Mutex<Ksm>>, failed: Arc<AtomicBool>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("ksmd".into()).spawn(move || {
            let scan = || -> Result<(), KsmError> {
                let mut pacer = Pacer::default();
                while !flag.load(Ordering::Relaxed) {
                    let sleep = ksm_do_scan_batch(&ksm, &flag, &mut pacer)?;
                    if sleep == 0 {
                        pacer.breathe();
                    } else {
                        std::thread::park_timeout(Duration::from_millis(u64::from(sleep)));
                    }
                }
                Ok(())
            };
            let result = std::panic::catch_unwind(AssertUnwindSafe(scan))
                .unwrap_or_else(|payload| Err(KsmError::Panicked(panic_message(payload.as_ref()))));
            if result.is_err() {
                failed.store(true, Ordering::SeqCst);
            }
            result
        })?;
        Ok(Self { stop, thread: Some(thread) })
    }

    /// Stops the thread and waits for it; returns its error, if it failed.
    pub fn stop(mut self) -> Result<(), KsmError> {
        self.halt()
    }

    fn halt(&mut self) -> Result<(), KsmError> {
        self.stop.store(true, Ordering::Relaxed);
        match self.thread.take() {
            Some(t) => {
                t.thread().unpark();
                // The thread catches its own panics; a join error is one
                // that escaped (in the failure path itself).
                t.join().unwrap_or_else(|payload| Err(KsmError::Panicked(panic_message(payload.as_ref()))))
            }
            None => Ok(()),
        }
    }

    /// Whether the thread has ended by itself (an error).
    pub fn is_finished(&self) -> bool {
        self.thread.as_ref().is_none_or(|t| t.is_finished())
    }
}

impl Drop for Ksmd {
    fn drop(&mut self) {
        let _ = self.halt();
    }
}

/// How long ksmd stays off the deduplicator's lock once it has worked for
/// [`KSM_SCAN_SLICE`] without a pause: long enough for a thread waiting for
/// the lock (the VMM reading the figures at a phase marker, or asking for a
/// pass) to be woken and take it, since a `std::sync::Mutex` lets the
/// thread that just unlocked take it straight back. At most 1% of ksmd's
/// time.
const KSMD_PAUSE: Duration = Duration::from_micros(100);

/// Where ksmd gives way between stretches of scanning (`cond_resched`).
#[derive(Debug)]
struct Pacer {
    last_pause: Instant,
}

impl Default for Pacer {
    fn default() -> Self {
        Self { last_pause: Instant::now() }
    }
}

impl Pacer {
    /// Between two stretches: a pause of [`KSMD_PAUSE`] once a slice has
    /// gone by since the last one, a yield otherwise.
    fn breathe(&mut self) {
        if self.last_pause.elapsed() >= KSM_SCAN_SLICE {
            std::thread::sleep(KSMD_PAUSE);
            self.last_pause = Instant::now();
        } else {
            std::thread::yield_now();
        }
    }
}

/// One batch of ksmd: `ksm_do_scan(pages_to_scan)` in stretches of at most
/// [`KSM_SCAN_SLICE`], each under the deduplicator's lock, which is let go
/// between them; the batch ends when its pages are looked at, a full scan
/// ends, or `stop` is raised. Returns the `sleep_millisecs` to sleep before
/// the next batch.
fn ksm_do_scan_batch(ksm: &Mutex<Ksm>, stop: &AtomicBool, pacer: &mut Pacer) -> Result<u32, KsmError> {
    let mut left = None;
    loop {
        let (sleep, stopped_by) = {
            let mut k = lock(ksm);
            let knobs = k.knobs();
            let budget = *left.get_or_insert(u64::from(knobs.pages_to_scan));
            let (looked, why) = k.scan_pages(budget, Some(Instant::now() + KSM_SCAN_SLICE))?;
            left = Some(budget - looked);
            (knobs.sleep_millisecs, why)
        };
        if stopped_by != ScanStop::Slice || stop.load(Ordering::Relaxed) {
            return Ok(sleep);
        }
        pacer.breathe();
    }
}

/// The message a panic was raised with, if it was a string.
fn panic_message(payload: &(dyn Any + Send)) -> String {
    match (payload.downcast_ref::<&str>(), payload.downcast_ref::<String>()) {
        (Some(s), _) => (*s).to_string(),
        (_, Some(s)) => s.clone(),
        _ => "(no message)".to_string(),
    }
}
