//! Deduplication control: the guest's requests on port 0x501 and the run
//! state of ksmd (the sysfs `run` knob: 0 stop, 1 run, 2 unmerge all), for
//! the built-in deduplicator or the host's own KSM (the `kernel` policy).

use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use ksm::{Ksm, Ksmd};
use shadow_mmu::PrimaryMmu;

use crate::host_ksm::HostKsm;
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
    mm: Arc<Mutex<PrimaryMmu>>,
    ksmd: Option<Ksmd>,
    /// Set when a ksmd of this run ends by itself (an error or a panic).
    ksmd_failed: Arc<AtomicBool>,
    /// The host's KSM (the `kernel` policy), instead of the built-in one.
    host_ksm: Option<Arc<Mutex<HostKsm>>>,
    run: u32,
    /// Values on port 0x501 that were not requests.
    ignored_requests: u64,
}

/// Ignored port 0x501 values printed before the VMM stops saying so (a
/// guest writing them in a loop must not flood standard error).
const WARN_IGNORED_REQUESTS: u64 = 3;

impl DedupControl {
    /// Control over `ksm` (None when deduplication is off or the host's KSM
    /// is used), and over the host's KSM when `host_ksm` is given.
    pub fn new(
        ksm: Option<Arc<Mutex<Ksm>>>,
        mm: Arc<Mutex<PrimaryMmu>>,
        host_ksm: Option<Arc<Mutex<HostKsm>>>,
    ) -> Self {
        Self { ksm, mm, ksmd: None, ksmd_failed: Arc::default(), host_ksm, run: 0, ignored_requests: 0 }
    }

    /// Whether a deduplicator (built-in or the host's) is there to control.
    pub fn is_active(&self) -> bool {
        self.ksm.is_some() || self.host_ksm.is_some()
    }

    /// The run state last set (0, 1 or 2).
    pub fn run_state(&self) -> u32 {
        self.run
    }

    /// Sets the run state: 0 stops ksmd, 1 starts it, 2 stops it and
    /// unmerges everything. A no-op with deduplication off.
    pub fn set_run(&mut self, run: u32) -> Result<(), String> {
        if run > 2 {
            return Err(format!("ksm run state {run} is not 0, 1 or 2"));
        }
        if let Some(h) = &self.host_ksm {
            lock(h).set_run(run).map_err(|e| e.to_string())?;
            self.run = run;
            return Ok(());
        }
        let Some(ksm) = self.ksm.clone() else { return Ok(()) };
        self.run = run;
        match run {
            0 => self.stop_ksmd(),
            1 => {
                if self.ksmd.is_none() {
                    let ksmd = Ksmd::start(ksm, self.mm.clone(), self.ksmd_failed.clone());
                    self.ksmd = Some(ksmd.map_err(|e| format!("cannot start ksmd: {e}"))?);
                }
                Ok(())
            }
            2 => {
                self.stop_ksmd()?;
                lock(&ksm).unmerge_all(&self.mm).map_err(|e| format!("unmerge failed: {e}"))
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
    /// with a message; they do not end the run. `cancelled` is polled while
    /// a pass waits for the host's ksmd.
    pub fn request(&mut self, value: u32, cancelled: &dyn Fn() -> bool) -> Result<(), String> {
        if value == DEDUP_PASS {
            if let Some(h) = &self.host_ksm {
                return lock(h).full_pass(cancelled).map_err(|e| format!("dedup pass failed: {e}"));
            }
        }
        if !self.is_active() {
            return Ok(());
        }
        match value {
            DEDUP_PASS => match &self.ksm {
                Some(ksm) => lock(ksm).full_pass(&self.mm).map(|_| ()).map_err(|e| format!("dedup pass failed: {e}")),
                None => Ok(()),
            },
            DEDUP_START => self.set_run(1),
            DEDUP_STOP => self.set_run(0),
            DEDUP_UNMERGE => self.set_run(2),
            other => {
                self.ignored_requests += 1;
                match self.ignored_requests {
                    n if n <= WARN_IGNORED_REQUESTS => eprintln!(
                        "vmm: guest wrote {other} to the dedup control port 0x501: not a request (1-4); ignored"
                    ),
                    n if n == WARN_IGNORED_REQUESTS + 1 => {
                        eprintln!("vmm: more values that are not dedup requests; ignored, and no longer printed")
                    }
                    _ => {}
                }
                Ok(())
            }
        }
    }

    /// The flag a failing ksmd sets, for the watchdog to stop the vCPU at
    /// once (the run then ends with [`Self::ksmd_failed`]'s error).
    pub fn ksmd_failure_flag(&self) -> Arc<AtomicBool> {
        self.ksmd_failed.clone()
    }

    /// Whether ksmd stopped by itself with an error or a panic, and which
    /// (checked by the run loop).
    pub fn ksmd_failed(&mut self) -> Option<String> {
        if self.ksmd.as_ref().is_some_and(Ksmd::is_finished) {
            return self.stop_ksmd().err();
        }
        None
    }

    /// Stops ksmd (the built-in one, or the host's) at the end of the run;
    /// what is merged stays merged, so the last readings see it.
    pub fn shutdown(&mut self) -> Result<(), String> {
        let builtin = self.stop_ksmd();
        let host = match &self.host_ksm {
            Some(h) => lock(h).set_run(0).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        builtin.and(host)
    }

    /// Gives the host's KSM back (unmerged, knobs restored), after the last
    /// readings. A no-op for the built-in deduplicator.
    pub fn release(&mut self) -> Result<(), String> {
        match &self.host_ksm {
            Some(h) => lock(h).release().map_err(|e| e.to_string()),
            None => Ok(()),
        }
    }
}
