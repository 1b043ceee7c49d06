//! The built-in deduplicator (crate `ksm`, after mm/ksm.c) and its
//! background thread, as one backend of [`super::Dedup`].

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ksm::{Ksm, KsmStats, Ksmd};
use shadow_mmu::lock;

use super::{DedupError, RunState};

/// The built-in deduplicator and, while `run` is 1, its ksmd.
#[derive(Debug)]
pub struct BuiltinKsm {
    ksm: Arc<Mutex<Ksm>>,
    ksmd: Option<Ksmd>,
    /// Set when a ksmd of this run ends by itself (an error or a panic).
    failed: Arc<AtomicBool>,
}

impl BuiltinKsm {
    /// The backend over `ksm`; ksmd is not started.
    pub fn new(ksm: Ksm) -> Self {
        Self { ksm: Arc::new(Mutex::new(ksm)), ksmd: None, failed: Arc::default() }
    }

    /// The deduplicator.
    pub fn ksm(&self) -> &Arc<Mutex<Ksm>> {
        &self.ksm
    }

    /// The flag a failing ksmd raises.
    pub fn failure_flag(&self) -> Arc<AtomicBool> {
        self.failed.clone()
    }

    /// Stop, Run or Unmerge (which stops ksmd first), over every mm on the
    /// deduplicator's list; `cancelled` is polled while unmerging.
    pub fn set_run(&mut self, state: RunState, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        match state {
            RunState::Stop => self.stop_ksmd(),
            RunState::Run if self.ksmd.is_some() => Ok(()),
            RunState::Run => {
                let ksmd = Ksmd::start(self.ksm.clone(), self.failed.clone());
                self.ksmd = Some(ksmd.map_err(DedupError::StartKsmd)?);
                Ok(())
            }
            RunState::Unmerge => {
                self.stop_ksmd()?;
                lock(&self.ksm).unmerge_all_cancellable(cancelled).map_err(DedupError::Unmerge)
            }
        }
    }

    /// One synchronous full pass (the vCPU waits); `cancelled` is polled
    /// at least every `ksm::KSM_SCAN_SLICE`.
    pub fn pass(&self, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        lock(&self.ksm).full_pass_cancellable(cancelled).map(|_| ()).map_err(DedupError::Pass)
    }

    /// Stops ksmd if it runs, with its error if it failed.
    pub fn stop_ksmd(&mut self) -> Result<(), DedupError> {
        match self.ksmd.take() {
            Some(k) => k.stop().map_err(DedupError::Ksmd),
            None => Ok(()),
        }
    }

    /// Whether ksmd stopped by itself with an error or a panic, and which.
    pub fn ksmd_failed(&mut self) -> Option<DedupError> {
        if self.ksmd.as_ref().is_some_and(Ksmd::is_finished) {
            return self.stop_ksmd().err();
        }
        None
    }

    /// The statistics now, over every mm on the list.
    pub fn stats(&self) -> KsmStats {
        lock(&self.ksm).stats()
    }
}
