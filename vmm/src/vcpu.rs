//! The run loop: one function maps each KVM exit to an outcome
//! ([`handle_exit`]), and the loop acts on outcomes (next phase, dedup
//! request, end of run) until the run ends, always with its statistics.

use std::sync::{Arc, Mutex};

use kvm_ioctls::VcpuExit;
use shadow_mmu::{handle_ept_violation, Access, PrimaryMmu, PAGE_SHIFT};

use crate::serial::Console;
use crate::signals::{StopRequest, Watchdog};
use crate::stats::{ExitCounts, ExitKind};
use crate::vm::{lock, VmSecondaryMmu};
use crate::x86::layout::GUEST_BASE;

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
    /// The VMM could not serve the guest (a secondary-MMU fault failed, a
    /// host hook failed, a view hit its limit).
    VmmError(String),
    /// The guest went past a limit that keeps the VMM's memory bounded
    /// ([`MAX_PHASES`], [`MAX_REPORTS`]).
    GuestLimit(String),
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
    /// The guest wrote this value to the dedup control port.
    Dedup(u32),
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

/// The guest's memory as the exit handler serves it: the primary and the
/// secondary MMU.
#[derive(Debug, Clone)]
pub struct GuestRam {
    /// The primary MMU.
    pub mm: Arc<Mutex<PrimaryMmu>>,
    /// The secondary MMU.
    pub mmu: Arc<Mutex<VmSecondaryMmu>>,
    /// Guest RAM size: accesses below it are RAM, above it MMIO.
    pub mem_bytes: u64,
}

impl GuestRam {
    /// Whether `gpa` is guest RAM that the secondary MMU manages.
    pub fn is_guest_ram(&self, gpa: u64) -> bool {
        (GUEST_BASE..self.mem_bytes).contains(&gpa)
    }

    /// Serves a secondary-MMU fault at `gpa`.
    pub fn fault(&self, gpa: u64, access: Access) -> Result<(), String> {
        handle_ept_violation(&self.mm, &self.mmu, gpa >> PAGE_SHIFT, access)
            .map(|_| ())
            .map_err(|e| format!("secondary-MMU fault at gpa {gpa:#x} ({access:?}) failed: {e}"))
    }

    /// Whether the secondary MMU maps `gpa`'s page now.
    pub fn is_mapped(&self, gpa: u64) -> bool {
        lock(&self.mmu).ept().lookup(gpa >> PAGE_SHIFT).is_some()
    }

    /// A guest read the VMM completes (an MMIO exit on RAM): fault the page
    /// in, then read what the guest would have read.
    fn complete_read(&self, gpa: u64, data: &mut [u8]) -> Result<(), String> {
        self.fault(gpa, Access::Read)?;
        lock(&self.mm).read_guest(gpa, data).map_err(|e| e.to_string())
    }

    /// A guest write the VMM completes (KVM retired it without writing):
    /// fault every page it touches in for write (breaking copy-on-write),
    /// then store the bytes in the frames now mapped. The store happens
    /// under the primary MMU's lock with every pte writable; if ksmd
    /// write-protected a page again in between, the faults are redone.
    fn complete_write(&self, gpa: u64, data: &[u8]) -> Result<(), String> {
        let last = gpa + data.len().max(1) as u64 - 1;
        let pages: Vec<u64> = ((gpa >> PAGE_SHIFT)..=(last >> PAGE_SHIFT))
            .map(|p| (p << PAGE_SHIFT).max(gpa))
            .filter(|&at| self.is_guest_ram(at))
            .collect();
        loop {
            for &at in &pages {
                self.fault(at, Access::Write)?;
            }
            let mut host = lock(&self.mm);
            if pages.iter().all(|&at| host.pte(at >> PAGE_SHIFT).is_ok_and(|p| p.writable)) {
                return host.write_guest(gpa, data).map_err(|e| e.to_string());
            }
        }
    }
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
                PORT_REPORT if dev.reports.len() >= MAX_REPORTS => Outcome::End(RunEnd::GuestLimit(format!(
                    "the guest wrote more than {MAX_REPORTS} reports to port 0x502; the run was ended"
                ))),
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
        VcpuExit::MmioRead(gpa, data) if dev.memory.is_guest_ram(gpa) => {
            // A hole in the memslot view: the secondary MMU has no entry.
            exits.record(ExitKind::EptRead);
            match dev.memory.complete_read(gpa, data) {
                Ok(()) => Outcome::Continue,
                Err(e) => Outcome::End(RunEnd::VmmError(e)),
            }
        }
        VcpuExit::MmioWrite(gpa, data) if dev.memory.is_guest_ram(gpa) => {
            // A hole or a read-only slot: KVM retired the write unperformed.
            exits.record(ExitKind::EptWrite);
            match dev.memory.complete_write(gpa, data) {
                Ok(()) => Outcome::Continue,
                Err(e) => Outcome::End(RunEnd::VmmError(e)),
            }
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
        // Counted by the run loop, which tells a fetch fault from a failure.
        VcpuExit::InternalError => Outcome::EmulationFailure,
        VcpuExit::FailEntry(reason, _cpu) => {
            exits.record(ExitKind::Other);
            Outcome::End(RunEnd::FailEntry(reason))
        }
        VcpuExit::Intr => {
            exits.record(ExitKind::Intr);
            Outcome::Continue
        }
        VcpuExit::MemoryFault { gpa, .. } if dev.memory.is_guest_ram(gpa) => {
            // Other KVMs report some secondary-MMU faults this way, without
            // the access type: an absent page is faulted in for read; a page
            // that is mapped yet faults again must want write.
            let access = if dev.memory.is_mapped(gpa) { Access::Write } else { Access::Read };
            exits.record(if access == Access::Write { ExitKind::EptWrite } else { ExitKind::EptRead });
            match dev.memory.fault(gpa, access) {
                Ok(()) => Outcome::Continue,
                Err(e) => Outcome::End(RunEnd::VmmError(e)),
            }
        }
        VcpuExit::MemoryFault { flags, gpa, size } => {
            exits.record(ExitKind::Other);
            Outcome::End(RunEnd::Unexpected(format!(
                "KVM_EXIT_MEMORY_FAULT at gpa {gpa:#x} (size {size:#x}, flags {flags:#x}) outside guest RAM"
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
                StopRequest::VmmFailure => Outcome::VmmThreadFailed,
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

    const RAM: u64 = 4 << 20;

    /// Guest memory with a recording view instead of KVM's.
    fn devices() -> Devices {
        use shadow_mmu::{FramePool, Policy, RecordingView, SecondaryMmu, PAGE_SIZE};
        let pool = Arc::new(FramePool::new(RAM + PAGE_SIZE).expect("pool"));
        let mut host = PrimaryMmu::new(pool, GUEST_BASE >> PAGE_SHIFT, RAM >> PAGE_SHIFT);
        let view = crate::view::AnyView::Recording(RecordingView::default());
        let mmu = Arc::new(Mutex::new(SecondaryMmu::new_prefaulted(Policy::RangeFlush, view, &host)));
        host.mmu_notifier_register(mmu.clone());
        let memory = GuestRam { mm: Arc::new(Mutex::new(host)), mmu, mem_bytes: RAM };
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
        assert_eq!(d.reports, vec![0xFFFF_FFFF]);
        assert_eq!((e.io, e.total), (4, 4));
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
