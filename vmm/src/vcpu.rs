//! The vCPU's exits: one function maps each KVM exit to an outcome
//! ([`handle_exit`]) and counts it, delegating each kind's work; the run
//! loop (`crate::run`) acts on the outcomes.

use kvm_ioctls::VcpuExit;
use shadow_mmu::Access;

use crate::exit_times::{ExitEvent, PortClass};
use crate::guest_ram::{GuestRam, GuestRamError};
use crate::serial::Console;
use crate::signals::{StopRequest, Watchdog};
use crate::stats::{ExitCounts, ExitKind};

/// The ABI's ports (guest-abi.md), defined once in `guest_images::abi`:
/// the exit code, the phase marker, deduplication control, the guest
/// report, the fleet barrier (1.1) and the phase name (1.1, see
/// [`crate::phase_name`]).
pub use guest_images::abi::{PORT_BARRIER, PORT_DEDUP, PORT_EXIT, PORT_PHASE, PORT_PHASE_NAME, PORT_REPORT};

/// How a run ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunEnd {
    /// The guest wrote its exit code to port 0xF4.
    GuestExit(u32),
    /// HLT with interrupts disabled (exit code 0).
    Hlt,
    /// A triple fault; RIP filled in by the loop.
    TripleFault,
    /// --timeout expired.
    Timeout,
    /// One of the signals that end a run cleanly (`signals::ENDING_SIGNALS`).
    Interrupted(libc::c_int),
    /// KVM_EXIT_INTERNAL_ERROR; suberror filled in by the loop.
    InternalError,
    /// VM entry failed.
    FailEntry(u64),
    /// An exit reason the VMM does not serve.
    Unexpected(String),
    /// KVM_RUN itself failed.
    KvmRunFailed(String),
    /// The VMM could not serve the guest (a secondary-MMU fault failed, a
    /// memory hook failed, a view hit its limit): the error and its causes.
    VmmError(String),
    /// The guest went past a limit that keeps the VMM's memory bounded
    /// ([`MAX_PHASES`], [`MAX_REPORTS`]).
    GuestLimit(String),
}

impl RunEnd {
    /// The end of a run the VMM could not go on serving, with the error's
    /// chain of causes.
    pub fn vmm_error(e: &(dyn std::error::Error + 'static)) -> Self {
        RunEnd::VmmError(crate::error_chain(e))
    }
}

/// Phases a run may have: each keeps its own figures, so a guest writing
/// phase markers in a loop would otherwise grow the VMM without bound.
pub const MAX_PHASES: usize = 4096;

/// Reports a run may collect (8 MiB of them).
pub const MAX_REPORTS: usize = 1 << 20;

/// What the loop does after one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the guest again.
    Continue,
    /// The guest started phase n.
    NextPhase(u32),
    /// The guest wrote these bytes to the phase-name port: the name's
    /// address when it is a 32-bit write.
    PhaseName(Vec<u8>),
    /// The guest wrote this value to the dedup control port.
    Dedup(u32),
    /// The guest wrote this value to the fleet barrier (ABI 1.1).
    Barrier(u32),
    /// KVM could not emulate an instruction: an instruction fetch from an
    /// absent page under the memslot view, or a real failure. The loop
    /// decides with the vCPU's registers.
    EmulationFailure,
    /// A VMM thread serving the guest (ksmd, the userfaultfd fault thread)
    /// failed, or the view could not follow a change; the loop ends the run
    /// with that error.
    VmmThreadFailed,
    /// The run is over.
    End(RunEnd),
}

/// The devices and state the exit handler serves.
#[derive(Debug)]
pub struct Devices {
    /// COM1.
    pub console: Console,
    /// Values written to port 0x502.
    pub reports: Vec<u64>,
    /// Guest RAM and its MMUs.
    pub memory: GuestRam,
}

impl Devices {
    /// A port write: the console, or one of the ABI's ports.
    fn io_out(&mut self, port: u16, data: &[u8]) -> Outcome {
        match port {
            p if Console::claims(p) => {
                for &b in data {
                    self.console.write(p, b);
                }
                Outcome::Continue
            }
            PORT_EXIT => Outcome::End(RunEnd::GuestExit(le_value(data))),
            PORT_PHASE => Outcome::NextPhase(le_value(data)),
            PORT_PHASE_NAME => Outcome::PhaseName(data.to_vec()),
            PORT_DEDUP => Outcome::Dedup(le_value(data)),
            PORT_BARRIER => Outcome::Barrier(le_value(data)),
            PORT_REPORT => self.report(le_value(data)),
            _ => Outcome::Continue, // no device there: the write is dropped
        }
    }

    /// A port read: the console, or all-ones where no device is.
    fn io_in(&mut self, port: u16, data: &mut [u8]) {
        if Console::claims(port) {
            for b in data.iter_mut() {
                *b = self.console.read(port);
            }
        } else {
            data.fill(0xFF);
        }
    }

    /// A value on port 0x502, kept up to [`MAX_REPORTS`].
    fn report(&mut self, value: u32) -> Outcome {
        if self.reports.len() >= MAX_REPORTS {
            return Outcome::End(RunEnd::GuestLimit(format!(
                "the guest wrote more than {MAX_REPORTS} reports to port 0x502; the run was ended"
            )));
        }
        self.reports.push(u64::from(value));
        Outcome::Continue
    }
}

fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// Maps one KVM exit to its outcome, counting it under its reason.
pub fn handle_exit(dev: &mut Devices, exits: &mut ExitCounts, exit: VcpuExit<'_>) -> Outcome {
    let (outcome, event) = serve_exit(dev, exit);
    if let Some(event) = event {
        exits.record(event.kind());
    }
    outcome
}

/// Maps one KVM exit to its outcome, and says what the exit was (None for
/// an emulation failure, which the run loop tells apart): [`handle_exit`]
/// without the counting, for a caller that also times the exit.
pub fn serve_exit(dev: &mut Devices, exit: VcpuExit<'_>) -> (Outcome, Option<ExitEvent>) {
    let reason = |kind| Some(ExitEvent::reason(kind));
    match exit {
        VcpuExit::IoOut(port, data) => (dev.io_out(port, data), Some(ExitEvent::io(PortClass::of(port)))),
        VcpuExit::IoIn(port, data) => {
            dev.io_in(port, data);
            (Outcome::Continue, Some(ExitEvent::io(PortClass::of(port))))
        }
        VcpuExit::MmioRead(gpa, data) if dev.memory.is_guest_ram(gpa) => {
            // A hole in the memslot view: the secondary MMU has no entry.
            (served(dev.memory.complete_read(gpa, data)), reason(ExitKind::EptRead))
        }
        VcpuExit::MmioWrite(gpa, data) if dev.memory.is_guest_ram(gpa) => {
            // A hole or a read-only slot: KVM retired the write unperformed.
            (served(dev.memory.complete_write(gpa, data)), reason(ExitKind::EptWrite))
        }
        VcpuExit::MmioRead(_gpa, data) => {
            data.fill(0xFF);
            (Outcome::Continue, reason(ExitKind::Mmio))
        }
        VcpuExit::MmioWrite(_gpa, _data) => (Outcome::Continue, reason(ExitKind::Mmio)),
        VcpuExit::Hlt => ends(ExitKind::Hlt, RunEnd::Hlt),
        VcpuExit::Shutdown => ends(ExitKind::Shutdown, RunEnd::TripleFault),
        // Counted by the run loop, which tells a fetch fault from a failure.
        VcpuExit::InternalError => (Outcome::EmulationFailure, None),
        VcpuExit::FailEntry(reason, _cpu) => ends(ExitKind::Other, RunEnd::FailEntry(reason)),
        VcpuExit::Intr => (Outcome::Continue, reason(ExitKind::Intr)),
        VcpuExit::MemoryFault { gpa, .. } if dev.memory.is_guest_ram(gpa) => memory_fault(&dev.memory, gpa),
        VcpuExit::MemoryFault { flags, gpa, size } => {
            let what =
                format!("KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x} (size {size:#x}, flags {flags:#x}) outside guest RAM");
            ends(ExitKind::Other, RunEnd::Unexpected(what))
        }
        other => ends(ExitKind::Other, RunEnd::Unexpected(format!("{other:?}"))),
    }
}

/// An exit of reason `kind` that ends the run.
fn ends(kind: ExitKind, end: RunEnd) -> (Outcome, Option<ExitEvent>) {
    (Outcome::End(end), Some(ExitEvent::reason(kind)))
}

/// The outcome of serving guest RAM: on, or the end of the run.
fn served(result: Result<(), GuestRamError>) -> Outcome {
    match result {
        Ok(()) => Outcome::Continue,
        Err(e) => Outcome::End(RunEnd::vmm_error(&e)),
    }
}

/// KVM_EXIT_MEMORY_FAULT on RAM: other KVMs report some secondary-MMU
/// faults this way, without the access type. An absent page is faulted in
/// for read; a page that is mapped yet faults again must want write.
fn memory_fault(memory: &GuestRam, gpa: u64) -> (Outcome, Option<ExitEvent>) {
    let access = if memory.is_mapped(gpa) { Access::Write } else { Access::Read };
    let kind = if access == Access::Write { ExitKind::EptWrite } else { ExitKind::EptRead };
    (served(memory.fault(gpa, access)), Some(ExitEvent::reason(kind)))
}

/// Maps a failed KVM_RUN to an outcome: a signal (EINTR) is a kick from the
/// watchdog, anything else ends the run.
pub fn handle_run_error(err: &kvm_ioctls::Error, exits: &mut ExitCounts, watchdog: &Watchdog) -> Outcome {
    let (outcome, event) = serve_run_error(err, watchdog);
    if let Some(event) = event {
        exits.record(event.kind());
    }
    outcome
}

/// [`handle_run_error`] without the counting: the outcome, and the exit
/// it was (an `intr` for EINTR; none otherwise).
pub fn serve_run_error(err: &kvm_ioctls::Error, watchdog: &Watchdog) -> (Outcome, Option<ExitEvent>) {
    match err.errno() {
        libc::EINTR => {
            let outcome = match watchdog.stop_request() {
                StopRequest::Timeout => Outcome::End(RunEnd::Timeout),
                StopRequest::Interrupted(sig) => Outcome::End(RunEnd::Interrupted(sig)),
                StopRequest::VmmFailure => Outcome::VmmThreadFailed,
                StopRequest::None => Outcome::Continue,
            };
            (outcome, Some(ExitEvent::reason(ExitKind::Intr)))
        }
        libc::EAGAIN => (Outcome::Continue, None),
        _ => (Outcome::End(RunEnd::KvmRunFailed(err.to_string())), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use shadow_mmu::{lock, PAGE_SHIFT};

    const RAM: u64 = 4 << 20;

    /// Guest memory with a recording view instead of KVM's.
    fn devices() -> Devices {
        use shadow_mmu::{FramePool, GuestMmus, Policy, RecordingView, PAGE_SHIFT, PAGE_SIZE};
        let pool = std::sync::Arc::new(FramePool::new(RAM + PAGE_SIZE).expect("pool"));
        let first = crate::x86::layout::GUEST_BASE >> PAGE_SHIFT;
        let view = crate::view::AnyView::Recording(RecordingView::default());
        let mmus = GuestMmus::new(pool, first, RAM >> PAGE_SHIFT, Policy::RangeFlush, view);
        let memory = GuestRam { mm: mmus.mm, mmu: mmus.mmu, mem_bytes: RAM };
        Devices { console: Console::new(Box::new(std::io::sink())), reports: Vec::new(), memory }
    }

    #[test]
    fn mmio_exits_on_ram_are_secondary_mmu_faults_completed_by_the_vmm() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        let gpa = 0x20_0000 + 8;
        lock(&d.memory.mm).write_guest(gpa, &0x1122_3344u32.to_le_bytes()).expect("write");
        // Write protection under range-flush: the page is zapped.
        lock(&d.memory.mm).write_protect_page(gpa >> PAGE_SHIFT).expect("wp");
        let mut buf = [0u8; 4];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::MmioRead(gpa, &mut buf)), Outcome::Continue);
        assert_eq!(u32::from_le_bytes(buf), 0x1122_3344);
        // A write to the read-only page breaks copy-on-write... in place here
        // (the frame is mapped once) and lands in guest memory.
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::MmioWrite(gpa, &[9, 9])), Outcome::Continue);
        lock(&d.memory.mm).read_guest(gpa, &mut buf).expect("read");
        assert_eq!(buf, [9, 9, 0x22, 0x11]);
        assert!(lock(&d.memory.mmu).ept().lookup(gpa >> PAGE_SHIFT).expect("mapped").writable());
        assert_eq!((e.ept_read, e.ept_write, e.mmio, e.total), (1, 1, 0, 2));
    }

    #[test]
    fn abi_ports_map_to_outcomes() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x500, &[7, 0, 0, 0])), Outcome::NextPhase(7));
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x501, &[1, 0, 0, 0])), Outcome::Dedup(1));
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x502, &[0xff, 0xff, 0xff, 0xff])), Outcome::Continue);
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0xF4, &[3])), Outcome::End(RunEnd::GuestExit(3)));
        let name = handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x504, &[0, 0, 0x20, 0]));
        assert_eq!(name, Outcome::PhaseName(vec![0, 0, 0x20, 0]));
        assert_eq!(d.reports, vec![0xFFFF_FFFF]);
        assert_eq!((e.io, e.total), (5, 5));
        let (_, event) = serve_exit(&mut d, VcpuExit::IoOut(0x3F8, b"x"));
        assert_eq!(event.map(ExitEvent::name), Some("io:console"));
    }

    #[test]
    fn a_report_flood_ends_the_run_at_the_report_limit() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        d.reports = vec![0; MAX_REPORTS - 1];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x502, &[1, 0, 0, 0])), Outcome::Continue);
        let end = handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x502, &[2, 0, 0, 0]));
        assert!(matches!(end, Outcome::End(RunEnd::GuestLimit(_))), "{end:?}");
        assert_eq!((d.reports.len(), d.reports.last()), (MAX_REPORTS, Some(&1)));
        assert_eq!(e.io, 2);
    }

    #[test]
    fn unknown_ports_and_addresses_read_as_all_ones() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        let mut buf = [0u8; 4];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoIn(0x80, &mut buf)), Outcome::Continue);
        assert_eq!(buf, [0xFF; 4]);
        let mut buf = [0u8; 8];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::MmioRead(RAM, &mut buf)), Outcome::Continue);
        assert_eq!(buf, [0xFF; 8]);
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::MmioWrite(1 << 32, &[1])), Outcome::Continue);
        assert_eq!((e.io, e.mmio), (1, 2));
    }

    #[test]
    fn fatal_exits_end_the_run_and_are_counted() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::Shutdown), Outcome::End(RunEnd::TripleFault));
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::Hlt), Outcome::End(RunEnd::Hlt));
        assert!(matches!(
            handle_exit(&mut d, &mut e, VcpuExit::Debug(Default::default())),
            Outcome::End(RunEnd::Unexpected(_))
        ));
        assert_eq!((e.shutdown, e.hlt, e.other), (1, 1, 1));
    }
}
