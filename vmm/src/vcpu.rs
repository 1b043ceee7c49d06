//! The run loop: one function maps each KVM exit to an outcome
//! ([`handle_exit`]), and the loop acts on outcomes (next phase, dedup
//! request, end of run) until the run ends, always with its statistics.

use kvm_ioctls::VcpuExit;

use crate::serial::Console;
use crate::signals::{StopRequest, Watchdog};
use crate::stats::{ExitCounts, ExitKind};

/// Port whose value ends the run with that exit code.
pub const PORT_EXIT: u16 = 0xF4;
/// Port whose value starts the phase of that number.
pub const PORT_PHASE: u16 = 0x500;
/// Port of deduplication control.
pub const PORT_DEDUP: u16 = 0x501;
/// Port whose value is appended to the guest report.
pub const PORT_REPORT: u16 = 0x502;

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
    /// SIGINT or SIGTERM.
    Interrupted,
    /// KVM_EXIT_INTERNAL_ERROR; suberror filled in by the loop.
    InternalError,
    /// VM entry failed.
    FailEntry(u64),
    /// An exit reason the VMM does not serve.
    Unexpected(String),
    /// KVM_RUN itself failed.
    KvmRunFailed(String),
}

/// What the loop does after one exit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Enter the guest again.
    Continue,
    /// The guest started phase n.
    NextPhase(u32),
    /// The guest wrote this value to the dedup control port.
    Dedup(u32),
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
    /// Guest RAM size: accesses below it are RAM, above it MMIO.
    pub mem_bytes: u64,
}

fn le_value(data: &[u8]) -> u32 {
    let mut bytes = [0u8; 4];
    let n = data.len().min(4);
    bytes[..n].copy_from_slice(&data[..n]);
    u32::from_le_bytes(bytes)
}

/// Maps one KVM exit to its outcome, counting it under its reason.
pub fn handle_exit(dev: &mut Devices, exits: &mut ExitCounts, exit: VcpuExit<'_>) -> Outcome {
    match exit {
        VcpuExit::IoOut(port, data) => {
            exits.record(ExitKind::Io);
            match port {
                p if Console::claims(p) => {
                    for &b in data {
                        dev.console.write(p, b);
                    }
                    Outcome::Continue
                }
                PORT_EXIT => Outcome::End(RunEnd::GuestExit(le_value(data))),
                PORT_PHASE => Outcome::NextPhase(le_value(data)),
                PORT_DEDUP => Outcome::Dedup(le_value(data)),
                PORT_REPORT => {
                    dev.reports.push(u64::from(le_value(data)));
                    Outcome::Continue
                }
                _ => Outcome::Continue, // no device there: the write is dropped
            }
        }
        VcpuExit::IoIn(port, data) => {
            exits.record(ExitKind::Io);
            if Console::claims(port) {
                for b in data.iter_mut() {
                    *b = dev.console.read(port);
                }
            } else {
                data.fill(0xFF);
            }
            Outcome::Continue
        }
        VcpuExit::MmioRead(_gpa, data) => {
            exits.record(ExitKind::Mmio);
            data.fill(0xFF);
            Outcome::Continue
        }
        VcpuExit::MmioWrite(_gpa, _data) => {
            exits.record(ExitKind::Mmio);
            Outcome::Continue
        }
        VcpuExit::Hlt => {
            exits.record(ExitKind::Hlt);
            Outcome::End(RunEnd::Hlt)
        }
        VcpuExit::Shutdown => {
            exits.record(ExitKind::Shutdown);
            Outcome::End(RunEnd::TripleFault)
        }
        VcpuExit::InternalError => {
            exits.record(ExitKind::InternalError);
            Outcome::End(RunEnd::InternalError)
        }
        VcpuExit::FailEntry(reason, _cpu) => {
            exits.record(ExitKind::Other);
            Outcome::End(RunEnd::FailEntry(reason))
        }
        VcpuExit::Intr => {
            exits.record(ExitKind::Intr);
            Outcome::Continue
        }
        VcpuExit::MemoryFault { flags, gpa, size } => {
            exits.record(ExitKind::Other);
            Outcome::End(RunEnd::Unexpected(format!(
                "KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x} (size {size:#x}, flags {flags:#x}) outside the secondary MMU"
            )))
        }
        other => {
            exits.record(ExitKind::Other);
            Outcome::End(RunEnd::Unexpected(format!("{other:?}")))
        }
    }
}

/// Maps a failed KVM_RUN to an outcome: a signal (EINTR) is a kick from the
/// watchdog, anything else ends the run.
pub fn handle_run_error(err: &kvm_ioctls::Error, exits: &mut ExitCounts, watchdog: &Watchdog) -> Outcome {
    match err.errno() {
        libc::EINTR => {
            exits.record(ExitKind::Intr);
            match watchdog.stop_request() {
                StopRequest::Timeout => Outcome::End(RunEnd::Timeout),
                StopRequest::Interrupted => Outcome::End(RunEnd::Interrupted),
                StopRequest::None => Outcome::Continue,
            }
        }
        libc::EAGAIN => Outcome::Continue,
        _ => Outcome::End(RunEnd::KvmRunFailed(err.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn devices() -> Devices {
        Devices { console: Console::new(Box::new(std::io::sink())), reports: Vec::new(), mem_bytes: 64 << 20 }
    }

    #[test]
    fn abi_ports_map_to_outcomes() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x500, &[7, 0, 0, 0])), Outcome::NextPhase(7));
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x501, &[1, 0, 0, 0])), Outcome::Dedup(1));
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0x502, &[0xff, 0xff, 0xff, 0xff])), Outcome::Continue);
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoOut(0xF4, &[3])), Outcome::End(RunEnd::GuestExit(3)));
        assert_eq!(d.reports, vec![0xFFFF_FFFF]);
        assert_eq!((e.io, e.total), (4, 4));
    }

    #[test]
    fn unknown_ports_and_addresses_read_as_all_ones() {
        let mut d = devices();
        let mut e = ExitCounts::default();
        let mut buf = [0u8; 4];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::IoIn(0x80, &mut buf)), Outcome::Continue);
        assert_eq!(buf, [0xFF; 4]);
        let mut buf = [0u8; 8];
        assert_eq!(handle_exit(&mut d, &mut e, VcpuExit::MmioRead(1 << 32, &mut buf)), Outcome::Continue);
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
