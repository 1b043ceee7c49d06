//! Deduplication control: the guest's requests on port 0x501 and the run
//! state of ksmd (the sysfs `run` knob: 0 stop, 1 run, 2 unmerge all).

use std::sync::{Arc, Mutex};

use ksm::{Ksm, Ksmd};
use shadow_mmu::HostMm;

use crate::vm::lock;

/// Port 0x501 value: one synchronous full pass.
pub const DEDUP_PASS: u32 = 1;
/// Port 0x501 value: start the background scanner.
pub const DEDUP_START: u32 = 2;
/// Port 0x501 value: stop the background scanner.
pub const DEDUP_STOP: u32 = 3;
/// Port 0x501 value: unmerge every merged page.
pub const DEDUP_UNMERGE: u32 = 4;

/// The deduplicator of a run and its background thread.
#[derive(Debug)]
pub struct DedupControl {
    ksm: Option<Arc<Mutex<Ksm>>>,
    host: Arc<Mutex<HostMm>>,
    ksmd: Option<Ksmd>,
}

impl DedupControl {
    /// Control over `ksm` (None when deduplication is off).
    pub fn new(ksm: Option<Arc<Mutex<Ksm>>>, host: Arc<Mutex<HostMm>>) -> Self {
        Self { ksm, host, ksmd: None }
    }

    /// Sets the run state: 0 stops ksmd, 1 starts it, 2 stops it and
    /// unmerges everything. A no-op with deduplication off.
    pub fn set_run(&mut self, run: u32) -> Result<(), String> {
        let Some(ksm) = self.ksm.clone() else { return Ok(()) };
        match run {
            0 => self.stop_ksmd(),
            1 => {
                if self.ksmd.is_none() {
                    self.ksmd =
                        Some(Ksmd::start(ksm, self.host.clone()).map_err(|e| format!("cannot start ksmd: {e}"))?);
                }
                Ok(())
            }
            2 => {
                self.stop_ksmd()?;
                lock(&ksm).unmerge_all(&self.host).map_err(|e| format!("unmerge failed: {e}"))
            }
            _ => Err(format!("ksm run state {run} is not 0, 1 or 2")),
        }
    }

    fn stop_ksmd(&mut self) -> Result<(), String> {
        match self.ksmd.take() {
            Some(k) => k.stop().map_err(|e| format!("ksmd failed: {e}")),
            None => Ok(()),
        }
    }

    /// Serves a guest request on port 0x501. Unknown values are refused
    /// with a message; they do not end the run.
    pub fn request(&mut self, value: u32) -> Result<(), String> {
        let Some(ksm) = self.ksm.clone() else { return Ok(()) };
        match value {
            DEDUP_PASS => lock(&ksm).full_pass(&self.host).map(|_| ()).map_err(|e| format!("dedup pass failed: {e}")),
            DEDUP_START => self.set_run(1),
            DEDUP_STOP => self.set_run(0),
            DEDUP_UNMERGE => self.set_run(2),
            other => {
                eprintln!("vmm: guest wrote {other} to the dedup control port 0x501: not a request (1-4); ignored");
                Ok(())
            }
        }
    }

    /// Whether ksmd stopped by itself with an error (checked by the run loop).
    pub fn ksmd_failed(&mut self) -> Option<String> {
        if self.ksmd.as_ref().is_some_and(Ksmd::is_finished) {
            return self.stop_ksmd().err();
        }
        None
    }

    /// Stops ksmd at the end of the run.
    pub fn shutdown(&mut self) -> Result<(), String> {
        self.stop_ksmd()
    }
}
