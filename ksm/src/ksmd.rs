//! ksmd: the thread that scans `pages_to_scan` pages, sleeps
//! `sleep_millisecs`, and again, while the guest runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use shadow_mmu::HostMm;

use crate::ksm::{Ksm, KsmError};

/// A running ksmd.
#[derive(Debug)]
pub struct Ksmd {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<Result<(), KsmError>>>,
}

impl Ksmd {
    /// Starts scanning. Lock order: the deduplicator, then the primary MMU
    /// (then, inside notifier calls, the secondary MMU).
    pub fn start(ksm: Arc<Mutex<Ksm>>, host: Arc<Mutex<HostMm>>) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::Builder::new().name("ksmd".into()).spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let sleep = {
                    let mut k = shadow_mmu::lock(&ksm);
                    let knobs = k.knobs();
                    k.ksm_do_scan(&host, u64::from(knobs.pages_to_scan))?;
                    knobs.sleep_millisecs
                };
                if sleep == 0 {
                    std::thread::yield_now();
                } else {
                    std::thread::park_timeout(Duration::from_millis(u64::from(sleep)));
                }
            }
            Ok(())
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
                t.join().unwrap_or(Ok(()))
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
