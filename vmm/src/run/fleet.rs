//! A fleet's run: every guest's vCPU loop on a thread of its own, one
//! deduplicator started before the first and stopped after the last, and
//! one document with each guest's figures and the fleet's
//! ([`crate::fleet_stats`]).
//!
//! Guest 0 has the control socket (its live exits; the deduplicator it
//! controls is the fleet's) and the memory hook. A guest that ends keeps
//! its memory, as a stopped VM does, until the fleet ends: the others'
//! figures go on counting its pages.

use std::io::Write;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use super::{end, guest_record, start_dedup, start_soft_dirty, vcpu_loop};
use crate::config::{MmHook, RunConfig};
use crate::control::{ControlServer, ControlState};
use crate::fleet_stats::{fleet_guest_record, fleet_phases, fleet_total, GuestRun};
use crate::phases::PhaseTracker;
use crate::serial::Console;
use crate::stats::{ConfigRecord, GuestStats, RunStats, SCHEMA_VERSION};
use crate::units::Units;
use crate::vcpu::Devices;
use crate::vm::{lock, Vm};

/// Runs the guests of `vms` (two or more) to their end.
pub(super) fn run_fleet(vms: Vec<Vm>, config: &mut RunConfig, record: ConfigRecord, units: Units) -> RunStats {
    let dedup = vms[0].dedup().clone();
    let mms = vms.iter().map(|vm| vm.mm().clone()).collect();
    let control = Arc::new(ControlState::for_vm(&vms[0], config.dedup.name()).with_mms(mms));
    let server = config.control.as_deref().map(|p| ControlServer::start(p, control.clone()));
    if let Some(Err(e)) = &server {
        eprintln!("vmm: the control socket could not be opened ({}); the fleet runs without it", crate::error_chain(e));
    }
    let sink = Arc::new(Mutex::new(std::mem::replace(&mut config.console, Box::new(std::io::sink()))));
    let mut hook = config.mm_hook.take();
    let started = start_dedup(&vms[0], config);
    let fleet_start = Instant::now();
    let runs: Vec<GuestRun> = std::thread::scope(|scope| {
        let threads: Vec<_> = vms
            .into_iter()
            .map(|vm| {
                let (sink, started) = (sink.clone(), started.clone());
                let is_first = vm.seat().index == 0;
                let control = if is_first { control.clone() } else { Arc::new(ControlState::quiet(&vm)) };
                let hook = if is_first { hook.take() } else { None };
                let times = GuestTimes { timeout: config.timeout, soft_dirty: config.soft_dirty_interval, fleet_start };
                scope.spawn(move || run_guest(vm, sink, hook, &control, times, started))
            })
            .collect();
        threads.into_iter().filter_map(|t| t.join().ok()).collect()
    });
    let shut = end::shutdown_dedup(&dedup, &control);
    let released = lock(&dedup).release();
    drop(server);
    let mut guests: Vec<GuestStats> = runs.iter().map(|r| r.stats.clone()).collect();
    for result in [shut, released] {
        if let Err(e) = result {
            fail_guests(&mut guests, &e);
        }
    }
    RunStats {
        schema: SCHEMA_VERSION,
        config: record,
        guest: fleet_guest_record(&guests),
        phases: fleet_phases(&runs),
        total: fleet_total(&runs),
        units,
        guests,
    }
}

/// A failure of the deduplicator at the fleet's end replaces the end of
/// every guest that ended by itself.
fn fail_guests(guests: &mut [GuestStats], e: &crate::dedup::DedupError) {
    for g in guests.iter_mut().filter(|g| g.guest.exit_code.is_some()) {
        g.guest.exit_code = None;
        g.guest.end.reason = "vmm_error".into();
        g.guest.end.detail = crate::error_chain(e);
    }
}

/// One guest's run on its own thread: its console lines prefixed with its
/// index, its soft-dirty thread if asked, its vCPU loop, its settling.
fn run_guest(
    mut vm: Vm,
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
    hook: Option<MmHook>,
    control: &ControlState,
    times: GuestTimes,
    started: Result<(), super::RunEnd>,
) -> GuestRun {
    let index = vm.seat().index;
    let start_ns = u64::try_from(times.fleet_start.elapsed().as_nanos()).unwrap_or(u64::MAX);
    let console = Console::new(Box::new(GuestLines::new(sink, index)));
    let mut devices = Devices { console, reports: Vec::new(), memory: vm.guest_ram() };
    let settled = match started.and_then(|()| start_soft_dirty(&vm, times.soft_dirty)) {
        Ok(rounds) => {
            let (end, phases) = vcpu_loop::VcpuLoop::start(&mut vm, &mut devices, hook, control, times.timeout).run();
            end::settle_guest(vm, end, phases, rounds)
        }
        Err(end) => {
            vm.barrier.leave();
            end::never_started(&vm, end, PhaseTracker::start(&vm))
        }
    };
    let guest = guest_record(&settled, devices);
    GuestRun { stats: GuestStats { index, guest, phases: settled.phases, total: settled.total }, start_ns }
}

/// The times a guest's thread needs from the configuration (which stays
/// on the fleet's thread: its console and hook are not shareable).
#[derive(Clone, Copy)]
struct GuestTimes {
    timeout: Option<Duration>,
    soft_dirty: Option<Duration>,
    fleet_start: Instant,
}

/// A guest's console output into the fleet's: whole lines, each prefixed
/// with `[guest N] `, so that the guests' lines never mix.
struct GuestLines {
    sink: Arc<Mutex<Box<dyn Write + Send>>>,
    prefix: String,
    line: Vec<u8>,
}

impl GuestLines {
    fn new(sink: Arc<Mutex<Box<dyn Write + Send>>>, index: u64) -> Self {
        Self { sink, prefix: format!("[guest {index}] "), line: Vec::new() }
    }

    fn write_line(&mut self) -> std::io::Result<()> {
        let mut sink = self.sink.lock().unwrap_or_else(PoisonError::into_inner);
        sink.write_all(self.prefix.as_bytes())?;
        sink.write_all(&self.line)?;
        self.line.clear();
        Ok(())
    }
}

impl Write for GuestLines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        for &b in buf {
            self.line.push(b);
            if b == b'\n' {
                self.write_line()?;
            }
        }
        Ok(buf.len())
    }

    /// Flushes the lines written so far; a partial line waits for its end
    /// (the UART flushes after every byte), or for the guest's end.
    fn flush(&mut self) -> std::io::Result<()> {
        self.sink.lock().unwrap_or_else(PoisonError::into_inner).flush()
    }
}

impl Drop for GuestLines {
    /// The guest's last, unended line, ended.
    fn drop(&mut self) {
        if !self.line.is_empty() {
            self.line.push(b'\n');
            let _ = self.write_line().and_then(|()| self.flush());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A writer the test reads back.
    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);

    impl Write for Shared {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn guests_lines_never_mix_and_a_last_partial_line_is_ended() {
        let out = Shared::default();
        let sink: Arc<Mutex<Box<dyn Write + Send>>> = Arc::new(Mutex::new(Box::new(out.clone())));
        let (mut a, mut b) = (GuestLines::new(sink.clone(), 0), GuestLines::new(sink, 1));
        a.write_all(b"hel").expect("write");
        b.write_all(b"one\ntw").expect("write");
        a.write_all(b"lo\n").expect("write");
        b.flush().expect("flush");
        assert!(!String::from_utf8_lossy(&out.0.lock().expect("lock")).contains("tw"), "a flush keeps a partial line");
        drop(b);
        let text = String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        assert_eq!(text, "[guest 1] one\n[guest 0] hello\n[guest 1] tw\n");
    }
}
