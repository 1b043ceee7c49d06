//! The vCPU loop: enter the guest, map the exit to an outcome
//! ([`serve_exit`]), act on the outcome, until the run ends. Each exit is
//! counted under its event and timed from KVM_RUN's return to the next
//! KVM_RUN entry: what serving it cost.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use shadow_mmu::Access;

use super::RunError;
use crate::config::{HookPoint, MmHook};
use crate::control::ControlState;
use crate::dedup::{DedupError, DedupRequest};
use crate::exit_times::ExitEvent;
use crate::fleet::BarrierError;
use crate::guest_ram::{GuestRam, GuestRamError};
use crate::phase_name::{read_phase_name, refusal_note};
use crate::phases::PhaseTracker;
use crate::signals::{StopRequest, Watchdog};
use crate::soft_dirty::soft_dirty_round;
use crate::stats::ExitKind;
use crate::vcpu::{serve_exit, serve_run_error, Devices, Outcome, RunEnd, MAX_PHASES};
use crate::vm::{lock, Vm};
use crate::x86::MAX_INSN_LEN;

/// The state of a running vCPU loop.
pub(super) struct VcpuLoop<'a> {
    vm: &'a mut Vm,
    devices: &'a mut Devices,
    hook: Option<MmHook>,
    control: &'a ControlState,
    watchdog: Watchdog,
    phases: PhaseTracker,
    /// What the exit being served is, when the run loop decides it (an
    /// emulation failure).
    decided: Option<ExitEvent>,
    /// Phase names refused so far.
    refused_names: u64,
}

/// An exit being served: what it was, the phase it counts in, and when
/// KVM_RUN returned it.
struct Serving {
    event: ExitEvent,
    position: usize,
    returned: Instant,
}

impl<'a> VcpuLoop<'a> {
    /// Starts phase 0 and the watchdog on the calling thread, which becomes
    /// the vCPU thread.
    pub(super) fn start(
        vm: &'a mut Vm,
        devices: &'a mut Devices,
        hook: Option<MmHook>,
        control: &'a ControlState,
        timeout: Option<Duration>,
    ) -> Self {
        // Phase 0 starts before the deadline is set: a run ended by its
        // timeout always spans at least the timeout.
        let phases = PhaseTracker::start(vm);
        let faults = vm.view_faults.clone();
        let ksmd_failed = lock(&vm.dedup).ksmd_failure_flag();
        // A view that could not follow a change made off the vCPU thread (by
        // ksmd) ends the run at once, not at the guest's next exit.
        let mmu = vm.mmu.clone();
        let failed = move || faults.failed() || ksmd_failed.load(Ordering::SeqCst) || lock(&mmu).has_view_error();
        let watchdog = Watchdog::start(timeout, Box::new(failed));
        vm.gate.register_vcpu_thread();
        Self { vm, devices, hook, control, watchdog, phases, decided: None, refused_names: 0 }
    }

    /// Runs the guest until the run ends; returns how, and the phases so
    /// far. The watchdog stops here.
    pub(super) fn run(mut self) -> (RunEnd, PhaseTracker) {
        let mut serving: Option<Serving> = None;
        let end = loop {
            self.vm.gate.enter_run();
            self.served(serving.take());
            let result = self.vm.vcpu.run();
            let returned = Instant::now();
            self.vm.gate.exit_run();
            let (outcome, event) = match result {
                Ok(exit) => serve_exit(self.devices, exit),
                Err(e) => serve_run_error(&e, &self.watchdog),
            };
            if let Some(event) = event {
                self.count(event);
            }
            let position = self.phases.position();
            let acted = self.act(outcome);
            let event = event.or(self.decided.take());
            serving = event.map(|event| Serving { event, position, returned });
            match acted {
                Ok(None) => {}
                Ok(Some(end)) => break end,
                Err(e) => break RunEnd::vmm_error(&e),
            }
        };
        self.served(serving);
        // The fleet no longer waits for this guest at its barrier.
        self.vm.barrier.leave();
        (end, self.phases)
    }

    /// Counts one exit in the running phase and in the live figures.
    fn count(&mut self, event: ExitEvent) {
        self.phases.exits().record(event.kind());
        self.control.exits.record(event);
    }

    /// The exit under way has been served: its time goes to the phase it
    /// was counted in.
    fn served(&mut self, serving: Option<Serving>) {
        if let Some(s) = serving {
            let ns = u64::try_from(s.returned.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.phases.record_service(s.position, s.event, ns);
        }
    }

    /// Acts on one outcome: Some(end) when the run is over.
    fn act(&mut self, outcome: Outcome) -> Result<Option<RunEnd>, RunError> {
        match outcome {
            Outcome::Continue => Ok(None),
            Outcome::NextPhase(n) => self.next_phase(n),
            Outcome::PhaseName(data) => {
                self.name_phase(&data);
                Ok(None)
            }
            // The vCPU waits while the deduplicator serves the request.
            Outcome::Dedup(value) => self.dedup_request(value),
            Outcome::Barrier(value) => Ok(self.barrier(value)),
            Outcome::EmulationFailure => self.emulation_failure(),
            Outcome::VmmThreadFailed => Ok(Some(self.thread_failure())),
            Outcome::End(end) => Ok(Some(end)),
        }
    }

    fn next_phase(&mut self, n: u32) -> Result<Option<RunEnd>, RunError> {
        if self.phases.count() >= MAX_PHASES {
            return Ok(Some(RunEnd::GuestLimit(format!(
                "the guest started more than {MAX_PHASES} phases (port 0x500); the run was ended"
            ))));
        }
        self.phases.next(self.vm, n);
        self.control.start_phase(n);
        let failed = lock(&self.vm.dedup).ksmd_failed();
        if let Some(e) = failed {
            return Err(e.into());
        }
        self.call_hook(HookPoint::PhaseStart(n)).map(|()| None)
    }

    /// A write to port 0x504: the running phase's name, read from guest
    /// memory; a bad one is refused with a note (see `phase_name`).
    fn name_phase(&mut self, data: &[u8]) {
        let vm = &*self.vm;
        match read_phase_name(data, vm.mem_bytes, |gpa, buf| vm.read_guest(gpa, buf)) {
            Ok(name) => {
                self.control.name_phase(&name);
                self.phases.name_current(name);
            }
            Err(e) => {
                self.refused_names += 1;
                if let Some(note) = refusal_note(self.refused_names, data, &e) {
                    eprintln!("{note}");
                }
            }
        }
    }

    /// A request on port 0x501. A pass of the host's ksmd polls the
    /// watchdog: cancelled by a timeout or a signal, the run ends as that.
    /// A soft-dirty round is this guest's own (as `clear_refs` is one
    /// process's); the deduplicator's requests act on the whole fleet.
    fn dedup_request(&mut self, value: u32) -> Result<Option<RunEnd>, RunError> {
        let watchdog = &self.watchdog;
        let served = if DedupRequest::from_port(value) == Some(DedupRequest::SoftDirty) {
            soft_dirty_round(&self.vm.mm).map(|_| ()).map_err(DedupError::SoftDirty)
        } else {
            lock(&self.vm.dedup).request(value, &|| watchdog.stop_request() != StopRequest::None)
        };
        match served {
            Err(e) if e.is_cancelled() => return Ok(Some(self.stopped())),
            other => other?,
        }
        view_error(self.vm)?;
        self.call_hook(HookPoint::DedupRequest(value)).map(|()| None)
    }

    /// A write to port 0x503: wait until every guest of the fleet still
    /// running has written `value` (a guest alone passes at once). A
    /// timeout or a signal ends the wait and the run; another value than
    /// the one the others wait at ends this guest's run as a guest limit.
    fn barrier(&mut self, value: u32) -> Option<RunEnd> {
        let watchdog = &self.watchdog;
        match self.vm.barrier.wait(self.vm.seat.index, value, &|| watchdog.stop_request() != StopRequest::None) {
            Ok(()) => None,
            Err(BarrierError::Stopped) => Some(self.stopped()),
            Err(e @ BarrierError::Mismatch { .. }) => Some(RunEnd::GuestLimit(e.to_string())),
        }
    }

    /// How the run ends when the watchdog stopped the work under way.
    fn stopped(&mut self) -> RunEnd {
        match self.watchdog.stop_request() {
            StopRequest::Timeout => RunEnd::Timeout,
            StopRequest::Interrupted(sig) => RunEnd::Interrupted(sig),
            StopRequest::VmmFailure | StopRequest::None => self.thread_failure(),
        }
    }

    /// KVM could not emulate an instruction: a fetch from a page the
    /// secondary MMU does not map (counted `ept_fetch`, served, and the
    /// guest goes on), or a real failure (`internal_error`).
    fn emulation_failure(&mut self) -> Result<Option<RunEnd>, RunError> {
        let fetch = serve_fetch(self.vm, &self.devices.memory);
        let kind = if matches!(fetch, Ok(false)) { ExitKind::InternalError } else { ExitKind::EptFetch };
        let event = ExitEvent::reason(kind);
        self.count(event);
        self.decided = Some(event);
        match fetch? {
            true => Ok(None),
            false => Ok(Some(RunEnd::InternalError)),
        }
    }

    /// A VMM thread serving the guest failed: the end carries its error.
    fn thread_failure(&mut self) -> RunEnd {
        if let Some(e) = lock(&self.vm.dedup).ksmd_failed() {
            return RunEnd::vmm_error(&e);
        }
        match view_error(self.vm) {
            Err(e) => RunEnd::vmm_error(&e),
            // The fault thread's own error replaces this one when it stops.
            Ok(()) => RunEnd::VmmError("a VMM thread serving the guest failed".into()),
        }
    }

    /// Calls the memory hook, then reports a view that could not follow.
    fn call_hook(&mut self, point: HookPoint) -> Result<(), RunError> {
        if let Some(hook) = self.hook.as_mut() {
            hook(point, &mut lock(&self.vm.mm)).map_err(|source| RunError::Hook { point, source })?;
        }
        view_error(self.vm)
    }
}

/// A view that could not follow its secondary MMU ends the run.
fn view_error(vm: &Vm) -> Result<(), RunError> {
    match lock(&vm.mmu).take_view_error() {
        Some(e) => Err(RunError::View(e)),
        None => Ok(()),
    }
}

/// An emulation failure at RIP: if the instruction's bytes are guest RAM
/// the secondary MMU does not map (a fetch from a memslot hole), serve the
/// fetch fault and return true.
fn serve_fetch(vm: &Vm, memory: &GuestRam) -> Result<bool, GuestRamError> {
    let Ok(regs) = vm.vcpu.get_regs() else { return Ok(false) };
    // The guest's page tables are the identity map: gpa = RIP.
    for gpa in [regs.rip, regs.rip + MAX_INSN_LEN - 1] {
        if memory.is_guest_ram(gpa) && !memory.is_mapped(gpa) {
            memory.fault(gpa, Access::Fetch)?;
            return Ok(true);
        }
    }
    Ok(false)
}
