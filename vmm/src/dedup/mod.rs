//! Deduplication in a run: which deduplicator works on guest RAM
//! ([`Dedup`]: none, the built-in one of the `ksm` crate, or the host's own
//! KSM), its run state (the sysfs `run` knob, [`RunState`]), and the
//! guest's requests on port 0x501 ([`DedupRequest`]), served by
//! [`DedupControl`].

pub mod builtin;
pub mod host;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use ksm::KsmError;

pub use builtin::BuiltinKsm;
pub use host::{HostKsm, HostKsmError, HostKsmPaths};

use crate::stats::{Counters, SignedCounters};

/// Port 0x501 values (guest-abi.md), defined once in `guest_images::abi`.
pub use guest_images::abi::{DEDUP_PASS, DEDUP_SOFT_DIRTY, DEDUP_START, DEDUP_STOP, DEDUP_UNMERGE};

/// The sysfs figures guest-abi.md promises in every phase's `ksm` map; a
/// run without deduplication reports them as 0.
pub const KSM_FIGURES_ALWAYS_REPORTED: [&str; 5] =
    ["pages_shared", "pages_sharing", "pages_unshared", "pages_volatile", "full_scans"];

/// Errors of deduplication control.
#[derive(Debug, thiserror::Error)]
pub enum DedupError {
    /// A run state that is not 0, 1 or 2.
    #[error("ksm run state {0} is not 0, 1 or 2")]
    BadRunState(u32),
    /// The background scanner could not be started.
    #[error("cannot start ksmd")]
    StartKsmd(#[source] std::io::Error),
    /// The background scanner ended with an error or a panic.
    #[error("ksmd failed")]
    Ksmd(#[source] KsmError),
    /// A synchronous pass of the built-in deduplicator failed.
    #[error("dedup pass failed")]
    Pass(#[source] KsmError),
    /// Unmerging failed.
    #[error("unmerge failed")]
    Unmerge(#[source] KsmError),
    /// A soft-dirty round failed in the primary MMU.
    #[error("soft-dirty round failed")]
    SoftDirty(#[source] shadow_mmu::PrimaryMmuError),
    /// A synchronous pass of the host's KSM failed.
    #[error("dedup pass failed")]
    HostPass(#[source] HostKsmError),
    /// The host's KSM refused a change.
    #[error(transparent)]
    Host(#[from] HostKsmError),
}

impl DedupError {
    /// Whether the work was cancelled (a timeout or a signal) rather than
    /// failed: the run then ends as that.
    pub fn is_cancelled(&self) -> bool {
        matches!(
            self,
            DedupError::Pass(KsmError::Cancelled)
                | DedupError::Unmerge(KsmError::Cancelled)
                | DedupError::HostPass(HostKsmError::Cancelled)
        )
    }
}

/// The sysfs `run` knob of a deduplicator.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RunState {
    /// 0: ksmd does not run; merged pages stay merged.
    #[default]
    Stop,
    /// 1: ksmd runs.
    Run,
    /// 2: ksmd stops and every merged page is unmerged.
    Unmerge,
}

impl RunState {
    /// The value sysfs shows.
    pub fn sysfs(self) -> u32 {
        match self {
            RunState::Stop => 0,
            RunState::Run => 1,
            RunState::Unmerge => 2,
        }
    }
}

impl TryFrom<u32> for RunState {
    type Error = DedupError;

    fn try_from(value: u32) -> Result<Self, DedupError> {
        match value {
            0 => Ok(RunState::Stop),
            1 => Ok(RunState::Run),
            2 => Ok(RunState::Unmerge),
            other => Err(DedupError::BadRunState(other)),
        }
    }
}

/// A guest's request on port 0x501 (guest-abi.md).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DedupRequest {
    /// One synchronous full pass; the vCPU waits.
    Pass,
    /// Start the background scanner (`run` 1).
    Start,
    /// Stop the background scanner (`run` 0).
    Stop,
    /// Unmerge every merged page (`run` 2).
    Unmerge,
    /// One soft-dirty round over guest RAM (ABI 1.1; not a deduplicator
    /// request, but on the same port: it works with deduplication off).
    SoftDirty,
}

impl DedupRequest {
    /// The request a port value stands for, if any.
    pub fn from_port(value: u32) -> Option<Self> {
        match value {
            DEDUP_PASS => Some(DedupRequest::Pass),
            DEDUP_START => Some(DedupRequest::Start),
            DEDUP_STOP => Some(DedupRequest::Stop),
            DEDUP_UNMERGE => Some(DedupRequest::Unmerge),
            DEDUP_SOFT_DIRTY => Some(DedupRequest::SoftDirty),
            _ => None,
        }
    }
}

/// The deduplicator of a run.
#[derive(Debug)]
pub enum Dedup {
    /// No deduplication (the `off` policy, or an experiment whose memory
    /// hook is the deduplicator).
    Off,
    /// The built-in deduplicator (crate `ksm`) and its ksmd.
    Builtin(BuiltinKsm),
    /// The host's own KSM (the `kernel` policy).
    Host(HostKsm),
}

impl Dedup {
    /// Whether a deduplicator is there to control.
    pub fn is_active(&self) -> bool {
        !matches!(self, Dedup::Off)
    }

    /// Sets the run state (a no-op when off).
    fn set_run(&mut self, state: RunState, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        match self {
            Dedup::Off => Ok(()),
            Dedup::Builtin(b) => b.set_run(state, cancelled),
            Dedup::Host(h) => Ok(h.set_run(state.sysfs())?),
        }
    }

    /// One synchronous full pass; `cancelled` is polled while the host's
    /// ksmd works.
    fn pass(&mut self, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        match self {
            Dedup::Off => Ok(()),
            Dedup::Builtin(b) => b.pass(cancelled),
            Dedup::Host(h) => h.full_pass(cancelled).map_err(DedupError::HostPass),
        }
    }

    /// The deduplicator's figures now, with the sysfs names
    /// ([`KSM_FIGURES_ALWAYS_REPORTED`], all 0, when off), and those Linux
    /// shows signed (`general_profit`, `ksm_process_profit`) with their
    /// sign (none when off), from one reading.
    pub fn figures(&self) -> (Counters, SignedCounters) {
        fn named<T>(v: Vec<(&'static str, T)>) -> BTreeMap<String, T> {
            v.into_iter().map(|(n, v)| (n.to_string(), v)).collect()
        }
        match self {
            Dedup::Off => {
                (KSM_FIGURES_ALWAYS_REPORTED.iter().map(|n| (n.to_string(), 0)).collect(), SignedCounters::new())
            }
            Dedup::Builtin(b) => {
                let stats = b.stats();
                (named(stats.counters()), named(stats.signed_counters()))
            }
            Dedup::Host(h) => (named(h.counters()), named(h.signed_counters())),
        }
    }
}

/// Values on port 0x501 that are not requests printed before the VMM stops
/// saying so (a guest writing them in a loop must not flood standard error).
const WARN_IGNORED_REQUESTS: u64 = 3;

/// The deduplicator of a run, its run state, and the guest's requests.
#[derive(Debug)]
pub struct DedupControl {
    dedup: Dedup,
    run: RunState,
    /// Set when the built-in ksmd ends by itself; never set otherwise.
    ksmd_failed: Arc<AtomicBool>,
    /// Values on port 0x501 that were not requests.
    ignored_requests: u64,
}

impl DedupControl {
    /// Control over `dedup` (which works on every guest of the run).
    pub fn new(dedup: Dedup) -> Self {
        let ksmd_failed = match &dedup {
            Dedup::Builtin(b) => b.failure_flag(),
            _ => Arc::default(),
        };
        Self { dedup, run: RunState::Stop, ksmd_failed, ignored_requests: 0 }
    }

    /// Whether a deduplicator (built-in or the host's) is there to control.
    pub fn is_active(&self) -> bool {
        self.dedup.is_active()
    }

    /// The run state last set.
    pub fn run_state(&self) -> RunState {
        self.run
    }

    /// Sets the run state: Stop stops ksmd, Run starts it, Unmerge stops it
    /// and unmerges everything. A no-op with deduplication off.
    pub fn set_run(&mut self, state: RunState) -> Result<(), DedupError> {
        self.set_run_cancellable(state, &|| false)
    }

    /// [`Self::set_run`], with `cancelled` polled while unmerging.
    pub fn set_run_cancellable(&mut self, state: RunState, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        if !self.is_active() {
            return Ok(());
        }
        if matches!(self.dedup, Dedup::Builtin(_)) {
            // The built-in deduplicator records the state asked even when
            // acting on it fails.
            self.run = state;
            return self.dedup.set_run(state, cancelled);
        }
        self.dedup.set_run(state, cancelled)?;
        self.run = state;
        Ok(())
    }

    /// Serves a guest request on port 0x501 (a soft-dirty round, value 5,
    /// is the guest's own: the vCPU loop serves it). Values that are not
    /// requests are refused with a message; they do not end the run. `cancelled` is
    /// polled while a pass waits for the host's ksmd.
    pub fn request(&mut self, value: u32, cancelled: &dyn Fn() -> bool) -> Result<(), DedupError> {
        let request = DedupRequest::from_port(value);
        if !self.is_active() {
            return Ok(());
        }
        match request {
            Some(DedupRequest::Pass) => self.dedup.pass(cancelled),
            Some(DedupRequest::Start) => self.set_run(RunState::Run),
            Some(DedupRequest::Stop) => self.set_run(RunState::Stop),
            Some(DedupRequest::Unmerge) => self.set_run_cancellable(RunState::Unmerge, cancelled),
            Some(DedupRequest::SoftDirty) | None => {
                self.ignore_request(value);
                Ok(())
            }
        }
    }

    fn ignore_request(&mut self, value: u32) {
        self.ignored_requests += 1;
        match self.ignored_requests {
            n if n <= WARN_IGNORED_REQUESTS => {
                eprintln!("vmm: guest wrote {value} to the dedup control port 0x501: not a request (1-5); ignored")
            }
            n if n == WARN_IGNORED_REQUESTS + 1 => {
                eprintln!("vmm: more values that are not dedup requests; ignored, and no longer printed")
            }
            _ => {}
        }
    }

    /// The deduplicator's figures now ([`Dedup::figures`]).
    pub fn figures(&self) -> (Counters, SignedCounters) {
        self.dedup.figures()
    }

    /// The flag a failing ksmd sets, for the watchdog to stop the vCPU at
    /// once (the run then ends with [`Self::ksmd_failed`]'s error).
    pub fn ksmd_failure_flag(&self) -> Arc<AtomicBool> {
        self.ksmd_failed.clone()
    }

    /// Whether ksmd stopped by itself with an error or a panic, and which.
    pub fn ksmd_failed(&mut self) -> Option<DedupError> {
        match &mut self.dedup {
            Dedup::Builtin(b) => b.ksmd_failed(),
            _ => None,
        }
    }

    /// Stops ksmd (the built-in one, or the host's) at the end of the run;
    /// what is merged stays merged, so the last readings see it.
    pub fn shutdown(&mut self) -> Result<(), DedupError> {
        match &mut self.dedup {
            Dedup::Off => Ok(()),
            Dedup::Builtin(b) => b.stop_ksmd(),
            Dedup::Host(h) => Ok(h.set_run(0)?),
        }
    }

    /// Gives the host's KSM back (unmerged, knobs restored), after the last
    /// readings. A no-op for the built-in deduplicator.
    pub fn release(&mut self) -> Result<(), DedupError> {
        match &mut self.dedup {
            Dedup::Host(h) => Ok(h.release()?),
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn run_states_are_the_sysfs_values() {
        for v in 0..3 {
            assert_eq!(RunState::try_from(v).expect("a run state").sysfs(), v);
        }
        assert!(matches!(RunState::try_from(3), Err(DedupError::BadRunState(3))));
    }

    #[test]
    fn port_values_map_to_requests() {
        assert_eq!(DedupRequest::from_port(1), Some(DedupRequest::Pass));
        assert_eq!(DedupRequest::from_port(4), Some(DedupRequest::Unmerge));
        assert_eq!(DedupRequest::from_port(5), Some(DedupRequest::SoftDirty));
        assert_eq!(DedupRequest::from_port(0), None);
        assert_eq!(DedupRequest::from_port(9), None);
    }
}
