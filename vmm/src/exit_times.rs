//! What serving each exit cost the VMM, in the terms of `perf kvm stat
//! report`: per exit event, the samples and the time from KVM_RUN's return
//! to the next KVM_RUN entry (min, max, mean and spread).
//!
//! An exit event is the exit's reason ([`ExitKind`]), with port I/O split
//! by the ABI's port classes ([`PortClass`]): `io:console`, `io:phase`, ...
//! Secondary-MMU faults the userfaultfd view serves on its fault thread are
//! no exit: they are listed as `ept_read:uffd` and `ept_write:uffd`, timed
//! from the fault thread's taking the fault to its handler's return (the
//! vCPU's wake follows), [`UffdFaultTimer`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::serial::Console;
use crate::stats::ExitKind;
use crate::vcpu::{PORT_BARRIER, PORT_DEDUP, PORT_EXIT, PORT_PHASE, PORT_PHASE_NAME, PORT_REPORT};

/// Which of the tiny-guest ABI's ports a port-I/O exit went to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PortClass {
    /// COM1, 0x3F8-0x3FF.
    Console,
    /// 0xF4, the exit code.
    Exit,
    /// 0x500, the phase marker.
    Phase,
    /// 0x504, the phase name (ABI 1.1).
    PhaseName,
    /// 0x501, deduplication control.
    Dedup,
    /// 0x502, the guest report.
    Report,
    /// 0x503, the fleet barrier (ABI 1.1).
    Barrier,
    /// Any other port.
    Other,
}

impl PortClass {
    /// The class of `port`.
    pub fn of(port: u16) -> Self {
        match port {
            p if Console::claims(p) => PortClass::Console,
            PORT_EXIT => PortClass::Exit,
            PORT_PHASE => PortClass::Phase,
            PORT_PHASE_NAME => PortClass::PhaseName,
            PORT_DEDUP => PortClass::Dedup,
            PORT_REPORT => PortClass::Report,
            PORT_BARRIER => PortClass::Barrier,
            _ => PortClass::Other,
        }
    }
}

/// One exit as the tables count it: its reason, and for port I/O the
/// port's class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitEvent {
    kind: ExitKind,
    port: PortClass,
}

impl ExitEvent {
    /// Every event, in display order (the index of each is [`Self::index`]).
    pub const ALL: [ExitEvent; 17] = [
        ExitEvent::io(PortClass::Console),
        ExitEvent::io(PortClass::Exit),
        ExitEvent::io(PortClass::Phase),
        ExitEvent::io(PortClass::PhaseName),
        ExitEvent::io(PortClass::Dedup),
        ExitEvent::io(PortClass::Report),
        ExitEvent::io(PortClass::Barrier),
        ExitEvent::io(PortClass::Other),
        ExitEvent::reason(ExitKind::Mmio),
        ExitEvent::reason(ExitKind::Hlt),
        ExitEvent::reason(ExitKind::EptRead),
        ExitEvent::reason(ExitKind::EptWrite),
        ExitEvent::reason(ExitKind::EptFetch),
        ExitEvent::reason(ExitKind::Shutdown),
        ExitEvent::reason(ExitKind::InternalError),
        ExitEvent::reason(ExitKind::Intr),
        ExitEvent::reason(ExitKind::Other),
    ];

    /// A port-I/O exit of this class.
    pub const fn io(port: PortClass) -> Self {
        Self { kind: ExitKind::Io, port }
    }

    /// An exit of this reason (port I/O of an unknown port for `Io`).
    pub const fn reason(kind: ExitKind) -> Self {
        Self { kind, port: PortClass::Other }
    }

    /// The exit's reason.
    pub fn kind(self) -> ExitKind {
        self.kind
    }

    /// Its position in [`Self::ALL`].
    pub fn index(self) -> usize {
        Self::ALL.iter().position(|e| *e == self).unwrap_or(Self::ALL.len() - 1)
    }

    /// Its name in the tables and the JSON: the reason as `exits` names it,
    /// `io:<class>` for port I/O.
    pub fn name(self) -> &'static str {
        match (self.kind, self.port) {
            (ExitKind::Io, PortClass::Console) => "io:console",
            (ExitKind::Io, PortClass::Exit) => "io:exit",
            (ExitKind::Io, PortClass::Phase) => "io:phase",
            (ExitKind::Io, PortClass::PhaseName) => "io:phase_name",
            (ExitKind::Io, PortClass::Barrier) => "io:barrier",
            (ExitKind::Io, PortClass::Dedup) => "io:dedup",
            (ExitKind::Io, PortClass::Report) => "io:report",
            (ExitKind::Io, PortClass::Other) => "io:other",
            (ExitKind::Mmio, _) => "mmio",
            (ExitKind::Hlt, _) => "hlt",
            (ExitKind::EptRead, _) => "ept_read",
            (ExitKind::EptWrite, _) => "ept_write",
            (ExitKind::EptFetch, _) => "ept_fetch",
            (ExitKind::Shutdown, _) => "shutdown",
            (ExitKind::InternalError, _) => "internal_error",
            (ExitKind::Intr, _) => "intr",
            (ExitKind::Other, _) => "other",
        }
    }
}

/// Key of the read faults the userfaultfd view served without an exit.
pub const UFFD_READ: &str = "ept_read:uffd";
/// Key of the write faults the userfaultfd view served without an exit.
pub const UFFD_WRITE: &str = "ept_write:uffd";

/// Samples of one event and, when they were timed, their service time.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ServiceTime {
    /// How many.
    pub samples: u64,
    /// Their time in all, in nanoseconds; absent when not measured.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total_ns: Option<u64>,
    /// The shortest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min_ns: Option<u64>,
    /// The longest.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_ns: Option<u64>,
    /// Their standard deviation (n - 1 in the denominator).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stddev_ns: Option<f64>,
}

impl ServiceTime {
    /// Samples with no time.
    pub fn untimed(samples: u64) -> Self {
        Self { samples, ..Self::default() }
    }

    /// The mean time, when timed.
    pub fn mean_ns(&self) -> Option<f64> {
        self.total_ns.filter(|_| self.samples > 0).map(|t| t as f64 / self.samples as f64)
    }

    /// The relative standard error of the mean, in percent, as `perf kvm
    /// stat` prints it after the average: stddev / sqrt(n) / mean.
    pub fn rel_stddev_pct(&self) -> Option<f64> {
        let (mean, sd) = (self.mean_ns()?, self.stddev_ns?);
        (mean > 0.0).then(|| 100.0 * sd / (self.samples as f64).sqrt() / mean)
    }

    /// Adds another stretch's samples (Chan et al.'s pairwise update of
    /// the variance). Untimed samples make the sum untimed.
    pub fn merge(&mut self, o: &ServiceTime) {
        let timed = |s: &ServiceTime| s.samples == 0 || s.total_ns.is_some();
        if !timed(self) || !timed(o) {
            *self = ServiceTime::untimed(self.samples + o.samples);
            return;
        }
        let a = Welford::from_summary(self);
        let b = Welford::from_summary(o);
        *self = a.merged(&b).summary();
    }
}

/// Service time per event, by [`ExitEvent::name`] (and the two uffd keys).
pub type ExitTimes = BTreeMap<String, ServiceTime>;

/// Adds `from` into `into`, event by event.
pub fn merge_times(into: &mut ExitTimes, from: &ExitTimes) {
    for (name, t) in from {
        into.entry(name.clone()).or_default().merge(t);
    }
}

/// A running mean and variance (Welford's method) with min, max and sum.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Welford {
    n: u64,
    total: u64,
    min: u64,
    max: u64,
    mean: f64,
    m2: f64,
}

impl Welford {
    fn add(&mut self, ns: u64) {
        self.n += 1;
        self.total = self.total.saturating_add(ns);
        self.min = if self.n == 1 { ns } else { self.min.min(ns) };
        self.max = self.max.max(ns);
        let delta = ns as f64 - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (ns as f64 - self.mean);
    }

    fn from_summary(s: &ServiceTime) -> Self {
        let n = s.samples;
        if n == 0 {
            return Self::default();
        }
        let total = s.total_ns.unwrap_or(0);
        let sd = s.stddev_ns.unwrap_or(0.0);
        Self {
            n,
            total,
            min: s.min_ns.unwrap_or(0),
            max: s.max_ns.unwrap_or(0),
            mean: total as f64 / n as f64,
            m2: sd * sd * (n - 1) as f64,
        }
    }

    fn merged(&self, o: &Self) -> Self {
        if self.n == 0 || o.n == 0 {
            return if self.n == 0 { *o } else { *self };
        }
        let n = self.n + o.n;
        let delta = o.mean - self.mean;
        Self {
            n,
            total: self.total.saturating_add(o.total),
            min: self.min.min(o.min),
            max: self.max.max(o.max),
            mean: self.mean + delta * o.n as f64 / n as f64,
            m2: self.m2 + o.m2 + delta * delta * (self.n as f64 * o.n as f64) / n as f64,
        }
    }

    fn summary(&self) -> ServiceTime {
        if self.n == 0 {
            return ServiceTime::default();
        }
        let stddev = if self.n > 1 { (self.m2 / (self.n - 1) as f64).max(0.0).sqrt() } else { 0.0 };
        ServiceTime {
            samples: self.n,
            total_ns: Some(self.total),
            min_ns: Some(self.min),
            max_ns: Some(self.max),
            stddev_ns: Some(stddev),
        }
    }
}

/// Times the exits of one stretch of the run, event by event.
#[derive(Debug, Clone, Default)]
pub struct ExitTimer {
    by_event: [Welford; ExitEvent::ALL.len()],
}

impl ExitTimer {
    /// One exit of `event`, served in `ns`.
    pub fn record(&mut self, event: ExitEvent, ns: u64) {
        self.by_event[event.index()].add(ns);
    }

    /// Moves every sample of `from` to `to` (a triple fault that was a HLT).
    pub fn reclassify(&mut self, from: ExitEvent, to: ExitEvent) {
        let moved = std::mem::take(&mut self.by_event[from.index()]);
        let into = &mut self.by_event[to.index()];
        *into = into.merged(&moved);
    }

    /// The events that were served, with their times.
    pub fn times(&self) -> ExitTimes {
        ExitEvent::ALL
            .iter()
            .zip(&self.by_event)
            .filter(|(_, w)| w.n > 0)
            .map(|(e, w)| (e.name().to_string(), w.summary()))
            .collect()
    }
}

/// Times the secondary-MMU faults the userfaultfd view's fault thread
/// serves without an exit ([`UFFD_READ`], [`UFFD_WRITE`]), for one stretch.
#[derive(Debug, Clone, Default)]
pub struct UffdFaultTimer {
    reads: Welford,
    writes: Welford,
}

impl UffdFaultTimer {
    /// One fault, a write or not, served in `ns`.
    pub fn record(&mut self, write: bool, ns: u64) {
        if write { &mut self.writes } else { &mut self.reads }.add(ns);
    }

    /// The stretch's faults by key, with their times, and a fresh start.
    pub fn take(&mut self) -> ExitTimes {
        let taken = std::mem::take(self);
        [(UFFD_READ, taken.reads), (UFFD_WRITE, taken.writes)]
            .into_iter()
            .filter(|(_, w)| w.n > 0)
            .map(|(key, w)| (key.to_string(), w.summary()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uffd_faults_are_timed_per_stretch() {
        let mut t = UffdFaultTimer::default();
        for ns in [10, 30] {
            t.record(false, ns);
        }
        t.record(true, 7);
        let times = t.take();
        assert_eq!(
            (times[UFFD_READ].samples, times[UFFD_READ].total_ns, times[UFFD_READ].max_ns),
            (2, Some(40), Some(30))
        );
        assert_eq!(times[UFFD_WRITE].min_ns, Some(7));
        assert!(t.take().is_empty(), "taking starts a new stretch");
    }

    #[test]
    fn ports_fall_in_their_abi_classes() {
        assert_eq!(PortClass::of(0x3F8), PortClass::Console);
        assert_eq!(PortClass::of(0x3FD), PortClass::Console);
        assert_eq!(PortClass::of(0xF4), PortClass::Exit);
        assert_eq!(PortClass::of(0x500), PortClass::Phase);
        assert_eq!(PortClass::of(0x501), PortClass::Dedup);
        assert_eq!(PortClass::of(0x502), PortClass::Report);
        assert_eq!(PortClass::of(0x504), PortClass::PhaseName);
        assert_eq!(PortClass::of(0x503), PortClass::Barrier);
        assert_eq!(PortClass::of(0x80), PortClass::Other);
        for (i, e) in ExitEvent::ALL.iter().enumerate() {
            assert_eq!(e.index(), i, "{}", e.name());
        }
        assert_eq!(ExitEvent::io(PortClass::PhaseName).name(), "io:phase_name");
    }

    #[test]
    fn times_summarise_like_perf_kvm_stat() {
        let mut t = ExitTimer::default();
        for ns in [1000, 2000, 3000, 6000] {
            t.record(ExitEvent::reason(ExitKind::EptRead), ns);
        }
        let times = t.times();
        let s = &times["ept_read"];
        assert_eq!((s.samples, s.total_ns, s.min_ns, s.max_ns), (4, Some(12_000), Some(1000), Some(6000)));
        // Sample stddev of 1,2,3,6 (thousands): sqrt(14/3).
        let sd = s.stddev_ns.expect("timed");
        assert!((sd - 1000.0 * (14.0f64 / 3.0).sqrt()).abs() < 1e-6, "{sd}");
        let rel = s.rel_stddev_pct().expect("timed");
        assert!((rel - 100.0 * sd / 2.0 / 3000.0).abs() < 1e-9);
        assert_eq!(times.len(), 1, "events never served are left out");
    }

    #[test]
    fn merging_stretches_gives_the_figures_of_the_whole() {
        let (mut a, mut b, mut whole) = (ExitTimer::default(), ExitTimer::default(), ExitTimer::default());
        let e = ExitEvent::io(PortClass::Console);
        for (i, ns) in [5u64, 70, 9, 1300, 44, 2].into_iter().enumerate() {
            let stretch = if i < 2 { &mut a } else { &mut b };
            stretch.record(e, ns);
            whole.record(e, ns);
        }
        let mut merged = a.times();
        merge_times(&mut merged, &b.times());
        let (m, w) = (&merged["io:console"], &whole.times()["io:console"]);
        assert_eq!((m.samples, m.total_ns, m.min_ns, m.max_ns), (w.samples, w.total_ns, w.min_ns, w.max_ns));
        assert!((m.stddev_ns.expect("m") - w.stddev_ns.expect("w")).abs() < 1e-6);
        // Untimed samples make the sum untimed, never a wrong time.
        let mut u = ExitTimes::from([(UFFD_READ.to_string(), ServiceTime::untimed(3))]);
        merge_times(&mut u, &ExitTimes::from([(UFFD_READ.to_string(), ServiceTime::untimed(4))]));
        assert_eq!(u[UFFD_READ], ServiceTime::untimed(7));
    }

    #[test]
    fn untimed_entries_serialise_with_their_samples_only() {
        let v = serde_json::to_value(ServiceTime::untimed(9)).expect("json");
        assert_eq!(v, serde_json::json!({"samples": 9}));
        let back: ServiceTime = serde_json::from_value(v).expect("parse");
        assert_eq!(back.total_ns, None);
    }
}
