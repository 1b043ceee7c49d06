//! The end of a run: stop the VMM's helper threads, tell what really
//! happened (a HLT that surfaced as a triple fault, an emulation failure),
//! take the last readings, give the host's KSM back, and record it.

use std::sync::atomic::Ordering;
use std::sync::Mutex;

use crate::control::ControlState;
use crate::dedup::{DedupControl, DedupError};
use crate::phases::PhaseTracker;
use crate::soft_dirty::SoftDirtyThread;
use crate::stats::{EndRecord, Figures, PhaseStats, RunStats};
use crate::vcpu::RunEnd;
use crate::vm::{lock, Vm};
use crate::x86::layout::GUEST_BASE;
use crate::x86::MAX_INSN_LEN;

/// HLT's opcode, looked for at RIP when a CPL-3 guest's HLT surfaces as a
/// fault (HLT is privileged; with no IDT the #GP becomes a triple fault).
const HLT_OPCODE: u8 = 0xF4;
/// KVM_INTERNAL_ERROR_EMULATION: the suberror of an instruction KVM could
/// not emulate, which is how a fetch from a memslot hole comes back.
const KVM_INTERNAL_ERROR_EMULATION: u32 = 1;

/// A run whose end is settled.
pub(super) struct Settled {
    pub(super) end: RunEnd,
    pub(super) phases: Vec<PhaseStats>,
    pub(super) total: Figures,
    /// The guest's RIP when the run ended abnormally and it could be read.
    pub(super) rip: Option<u64>,
}

impl Settled {
    /// The guest's exit code, when it ended the run itself.
    pub(super) fn exit_code(&self) -> Option<u32> {
        match self.end {
            RunEnd::GuestExit(code) => Some(code),
            RunEnd::Hlt => Some(0),
            _ => None,
        }
    }
}

impl RunEnd {
    /// Whether the guest ended the run itself (a later VMM error then
    /// replaces the end; it never hides an earlier failure).
    fn by_guest(&self) -> bool {
        matches!(self, RunEnd::GuestExit(_) | RunEnd::Hlt)
    }
}

/// Settles the run of a guest alone, which the vCPU loop ended with
/// `end`: ksmd stops (no run-state change from outside after this), the
/// guest is settled ([`settle_guest`]), then the host's KSM is given back.
pub(super) fn settle(
    vm: Vm,
    end: RunEnd,
    phases: PhaseTracker,
    control: &ControlState,
    rounds: Option<SoftDirtyThread>,
) -> Settled {
    let dedup = vm.dedup.clone();
    let shut = shutdown_dedup(&dedup, control);
    let mut settled = settle_guest(vm, end, phases, rounds);
    settled.fail_if_by_guest(shut);
    settled.fail_if_by_guest(lock(&dedup).release());
    settled
}

/// Stops ksmd (the built-in one or the host's) at the end of a run; what
/// is merged stays merged, so the last readings see it. No run-state
/// change from outside after this (it would restart ksmd for the last
/// readings, or change the host's KSM after its release).
pub(super) fn shutdown_dedup(dedup: &Mutex<DedupControl>, control: &ControlState) -> Result<(), DedupError> {
    let mut dedup = lock(dedup);
    control.closed.store(true, Ordering::SeqCst);
    dedup.shutdown()
}

/// Settles one guest whose vCPU loop ended with `end`: its helper threads
/// stop, a HLT or an emulation failure is told for what it was, and its
/// last readings are taken. The deduplicator is the caller's.
pub(super) fn settle_guest(
    mut vm: Vm,
    mut end: RunEnd,
    mut phases: PhaseTracker,
    rounds: Option<SoftDirtyThread>,
) -> Settled {
    if let Some(Err(e)) = rounds.map(SoftDirtyThread::stop) {
        end = RunEnd::vmm_error(&e);
    }
    if let Some(thread) = vm.fault_thread.take() {
        if let Some(e) = thread.stop() {
            end = RunEnd::VmmError(format!("userfaultfd fault thread: {}", crate::error_chain(&e)));
        }
    }
    let rip = if end.by_guest() { None } else { vm.vcpu.get_regs().ok().map(|r| r.rip) };
    if end == RunEnd::TripleFault && halted_at(&vm, rip) {
        phases.recount_shutdown_as_hlt();
        end = RunEnd::Hlt;
    }
    if end == RunEnd::InternalError {
        end = explain_internal_error(&mut vm);
    }
    let (phases, total) = phases.finish(&vm);
    Settled { end, phases, total, rip }
}

impl Settled {
    /// A failure of the deduplicator at the end of the run replaces an end
    /// by the guest (it never hides an earlier failure).
    pub(super) fn fail_if_by_guest(&mut self, result: Result<(), DedupError>) {
        if let Err(e) = result {
            if self.end.by_guest() {
                self.end = RunEnd::vmm_error(&e);
            }
        }
    }
}

/// Settles a run whose guest never ran (the deduplicator could not start):
/// phase 0 is reported, empty, with every figure.
pub(super) fn never_started(vm: &Vm, end: RunEnd, phases: PhaseTracker) -> Settled {
    let (phases, total) = phases.finish(vm);
    Settled { end, phases, total, rip: None }
}

/// Whether the instruction at `rip` is HLT.
fn halted_at(vm: &Vm, rip: Option<u64>) -> bool {
    let mut op = [0u8; 1];
    rip.is_some_and(|rip| vm.read_guest(rip, &mut op) && op[0] == HLT_OPCODE)
}

/// KVM_EXIT_INTERNAL_ERROR, with its suberror and what it means here.
fn explain_internal_error(vm: &mut Vm) -> RunEnd {
    // SAFETY: reading the `internal` member of the kvm_run union is what
    // KVM_EXIT_INTERNAL_ERROR documents; it is plain data.
    let suberror = unsafe { vm.vcpu.get_kvm_run().__bindgen_anon_1.internal.suberror };
    let what = if suberror != KVM_INTERNAL_ERROR_EMULATION {
        String::new()
    } else if let Some(rip) = fetch_outside_ram(vm) {
        format!(
            " (instruction emulation failed: the instruction at RIP {rip:#x} lies, at least partly, outside guest RAM)"
        )
    } else if lock(&vm.dedup).is_active() {
        // Under the memslot view the emulator performs every access to a
        // page the secondary MMU unmapped or write-protected; SSE arithmetic
        // on a memory operand and AVX are the known cases it cannot do
        // (guest-images/README.md).
        " (instruction emulation failed: KVM's emulator cannot perform this access to a page the secondary MMU \
         unmapped or write-protected; SSE arithmetic with a memory operand and AVX are such accesses, --view uffd \
         needs no emulation)"
            .to_string()
    } else {
        " (instruction emulation failed)".to_string()
    };
    RunEnd::Unexpected(format!("KVM internal error, suberror {suberror}{what}"))
}

/// RIP, when the longest instruction that starts there would reach past
/// guest RAM (the guest's page tables are the identity map).
fn fetch_outside_ram(vm: &Vm) -> Option<u64> {
    let rip = vm.vcpu.get_regs().ok()?.rip;
    let last = rip.checked_add(MAX_INSN_LEN - 1);
    (rip < GUEST_BASE || last.is_none_or(|l| l >= vm.mem_bytes)).then_some(rip)
}

/// The record of how a run ended.
pub(super) fn end_record(end: &RunEnd, rip: Option<u64>) -> EndRecord {
    let (reason, detail) = match end {
        RunEnd::GuestExit(code) => ("exit", format!("the guest wrote {code} to port 0xf4")),
        RunEnd::Hlt => ("hlt", "the guest halted with interrupts disabled".to_string()),
        RunEnd::TripleFault => ("triple_fault", "the guest triple-faulted (an exception with no IDT)".to_string()),
        RunEnd::Timeout => ("timeout", "the guest was still running when --timeout expired".to_string()),
        RunEnd::Interrupted(sig) => {
            ("interrupted", format!("the run was interrupted by {}", crate::signals::name(*sig)))
        }
        RunEnd::InternalError => ("internal_error", "KVM reported an internal error".to_string()),
        RunEnd::FailEntry(r) => ("fail_entry", format!("VM entry failed, hardware reason {r:#x}")),
        RunEnd::Unexpected(what) => ("unexpected_exit", what.clone()),
        RunEnd::KvmRunFailed(what) => ("vmm_error", format!("KVM_RUN failed: {what}")),
        RunEnd::VmmError(what) => ("vmm_error", what.clone()),
        RunEnd::GuestLimit(what) => ("guest_limit", what.clone()),
    };
    let detail = match rip {
        Some(rip) => format!("{detail}, RIP {rip:#x}"),
        None => detail,
    };
    EndRecord { reason: reason.to_string(), rip, detail }
}

/// The VMM's exit status for a run: 0 when the guest succeeded, 1 when it
/// reported a non-zero exit code, 3 when it ended abnormally.
pub fn exit_status(stats: &RunStats) -> u8 {
    match stats.guest.exit_code {
        Some(0) => 0,
        Some(_) => 1,
        None => 3,
    }
}
