//! What a run counts, per guest phase and in total, and the statistics schema
//! (version [`SCHEMA_VERSION`], documented in README.md) it is written in.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::exit_times::ExitTimes;
use crate::units::Units;

/// Version of the statistics JSON schema.
pub const SCHEMA_VERSION: u32 = 1;

/// Why the vCPU came back to the VMM, in the buckets the statistics report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitKind {
    /// Port I/O (KVM_EXIT_IO), any port.
    Io,
    /// An access to a guest-physical address that is not RAM.
    Mmio,
    /// HLT.
    Hlt,
    /// A secondary-MMU fault on RAM: read.
    EptRead,
    /// A secondary-MMU fault on RAM: write.
    EptWrite,
    /// A secondary-MMU fault on RAM: instruction fetch.
    EptFetch,
    /// Triple fault (KVM_EXIT_SHUTDOWN).
    Shutdown,
    /// KVM_EXIT_INTERNAL_ERROR that is not a secondary-MMU fault.
    InternalError,
    /// KVM_RUN interrupted by a signal (timeout, Ctrl-C).
    Intr,
    /// Anything else.
    Other,
}

/// Exits by reason. `total` is the sum of the others.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)] // the field names are the ExitKind buckets
pub struct ExitCounts {
    pub io: u64,
    pub mmio: u64,
    pub hlt: u64,
    pub ept_read: u64,
    pub ept_write: u64,
    pub ept_fetch: u64,
    pub shutdown: u64,
    pub internal_error: u64,
    pub intr: u64,
    pub other: u64,
    pub total: u64,
}

impl ExitCounts {
    /// Counts one exit.
    pub fn record(&mut self, kind: ExitKind) {
        self.record_n(kind, 1);
    }

    /// Counts `n` exits of one reason.
    pub fn record_n(&mut self, kind: ExitKind, n: u64) {
        let slot = match kind {
            ExitKind::Io => &mut self.io,
            ExitKind::Mmio => &mut self.mmio,
            ExitKind::Hlt => &mut self.hlt,
            ExitKind::EptRead => &mut self.ept_read,
            ExitKind::EptWrite => &mut self.ept_write,
            ExitKind::EptFetch => &mut self.ept_fetch,
            ExitKind::Shutdown => &mut self.shutdown,
            ExitKind::InternalError => &mut self.internal_error,
            ExitKind::Intr => &mut self.intr,
            ExitKind::Other => &mut self.other,
        };
        *slot += n;
        self.total += n;
    }

    /// Adds another set of counts to this one.
    pub fn add(&mut self, o: &Self) {
        self.io += o.io;
        self.mmio += o.mmio;
        self.hlt += o.hlt;
        self.ept_read += o.ept_read;
        self.ept_write += o.ept_write;
        self.ept_fetch += o.ept_fetch;
        self.shutdown += o.shutdown;
        self.internal_error += o.internal_error;
        self.intr += o.intr;
        self.other += o.other;
        self.total += o.total;
    }

    /// (column name, value) pairs in display order.
    pub fn columns(&self) -> [(&'static str, u64); 11] {
        [
            ("io", self.io),
            ("mmio", self.mmio),
            ("hlt", self.hlt),
            ("ept_read", self.ept_read),
            ("ept_write", self.ept_write),
            ("ept_fetch", self.ept_fetch),
            ("shutdown", self.shutdown),
            ("internal_error", self.internal_error),
            ("intr", self.intr),
            ("other", self.other),
            ("total", self.total),
        ]
    }
}

/// Named counters of a component (the secondary MMU, the deduplicator):
/// every name the component defines is present, zero or not.
pub type Counters = BTreeMap<String, u64>;

/// Named figures that may be negative.
pub type SignedCounters = BTreeMap<String, i64>;

/// Everything counted over one stretch of the run (a phase, or the whole run).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Figures {
    /// Exits the VMM saw, by reason.
    pub exits: ExitCounts,
    /// Secondary-MMU events (see the shadow_mmu crate for the names).
    pub shadow_mmu: Counters,
    /// Deduplicator figures, with the names of /sys/kernel/mm/ksm.
    pub ksm: Counters,
    /// The deduplicator's figures that Linux shows signed
    /// (`general_profit`, `ksm_process_profit`), with their sign, at the
    /// stretch's end (in `ksm` they are clamped at 0); left out when there
    /// is none.
    #[serde(default, skip_serializing_if = "SignedCounters::is_empty")]
    pub ksm_signed: SignedCounters,
    /// The host KVM's binary statistics that moved, by their own names.
    pub kvm: BTreeMap<String, u64>,
    /// Wall-clock time in nanoseconds.
    pub wall_ns: u64,
    /// What serving each exit event cost (`perf kvm stat`'s samples and
    /// times, see [`crate::exit_times`]); left out when no exit was served.
    #[serde(default, skip_serializing_if = "ExitTimes::is_empty")]
    pub exit_times: ExitTimes,
}

/// One guest phase (started by a write to port 0x500).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PhaseStats {
    /// The phase number the guest wrote (0 before the first marker).
    pub phase: u32,
    /// The name the guest gave it (port 0x504, ABI 1.1), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// What was counted in it.
    #[serde(flatten)]
    pub figures: Figures,
}

/// How the run was configured.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConfigRecord {
    /// Image name or path.
    pub image: String,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Deduplication policy.
    pub dedup: String,
    /// EPT view backend.
    pub view: String,
    /// --timeout in seconds, if any.
    pub timeout_secs: Option<f64>,
    /// Guests in the fleet (ABI 1.1); left out for a guest alone.
    #[serde(default = "one_guest", skip_serializing_if = "is_one_guest")]
    pub guests: u32,
}

fn one_guest() -> u32 {
    1
}

fn is_one_guest(guests: &u32) -> bool {
    *guests == 1
}

/// How the run ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndRecord {
    /// One of: exit, hlt, triple_fault, timeout, interrupted, internal_error,
    /// fail_entry, unexpected_exit, vmm_error.
    pub reason: String,
    /// Guest RIP when the run ended abnormally and it could be read.
    pub rip: Option<u64>,
    /// A sentence for people.
    pub detail: String,
}

/// What the guest told the VMM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestRecord {
    /// The value written to port 0xF4 (0 for HLT); None when the run ended otherwise.
    pub exit_code: Option<u32>,
    /// Values written to port 0x502, in order.
    pub reports: Vec<u64>,
    /// How the run ended.
    pub end: EndRecord,
}

/// A run's statistics: the document `--stats-json` writes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunStats {
    /// [`SCHEMA_VERSION`].
    pub schema: u32,
    /// The configuration.
    pub config: ConfigRecord,
    /// The guest's outcome.
    pub guest: GuestRecord,
    /// Per phase, in the order the guest ran them.
    pub phases: Vec<PhaseStats>,
    /// The whole run.
    pub total: Figures,
    /// Each figure's unit and kind, by flat name (`exits.io`, `kvm.pf_fixed`,
    /// `wall_ns`, ...; see [`crate::units`]); left out by documents written
    /// before it was added.
    #[serde(default, skip_serializing_if = "Units::is_empty")]
    pub units: Units,
    /// A fleet's guests, each in the shape of a run of its own (ABI 1.1);
    /// left out for a guest alone. The document's own `guest`, `phases`
    /// and `total` are then the fleet's (see `crate::fleet_stats`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub guests: Vec<GuestStats>,
}

/// One guest of a fleet: what a run of its own would report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GuestStats {
    /// Its index in the fleet (RSI at entry).
    pub index: u64,
    /// Its outcome.
    pub guest: GuestRecord,
    /// Its phases; the `ksm` figures are the fleet's at each phase's end.
    pub phases: Vec<PhaseStats>,
    /// Its whole run.
    pub total: Figures,
}

impl RunStats {
    /// What the guests reported on port 0x502: the guest's list, or each
    /// guest's of a fleet in guest order.
    pub fn reports_by_guest(&self) -> Vec<&[u64]> {
        if self.guests.is_empty() {
            return vec![&self.guest.reports];
        }
        self.guests.iter().map(|g| g.guest.reports.as_slice()).collect()
    }
}

impl PhaseStats {
    /// How tables and charts name the phase: `3 "read word 0"`, or `3`.
    pub fn label(&self) -> String {
        phase_label(self.phase, self.name.as_deref())
    }
}

/// A phase's label: its number, and its name in quotes when it has one.
pub fn phase_label(number: u32, name: Option<&str>) -> String {
    match name {
        Some(name) => format!("{number} \"{name}\""),
        None => number.to_string(),
    }
}

/// Names of figures that are levels (reported as their value at the end of
/// a phase) rather than event counts (reported as their increase).
pub const GAUGES: &[&str] = &[
    "view_slots",
    "view_slots_max",
    "ept_entries",
    "pages_shared",
    "pages_sharing",
    "pages_unshared",
    "pages_volatile",
    "ksm_zero_pages",
    "stable_node_chains",
    "stable_node_dups",
    "general_profit",
    "memfd_resident_bytes",
    "metadata_bytes",
    "rmap_items",
    "ksm_merging_pages",
    "ksm_process_profit",
];

/// Whether the named figure is a level rather than a count.
pub fn is_gauge(name: &str) -> bool {
    GAUGES.contains(&name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn phase(n: u32, io: u64, wall: u64) -> PhaseStats {
        let mut f = Figures { wall_ns: wall, ..Figures::default() };
        for _ in 0..io {
            f.exits.record(ExitKind::Io);
        }
        f.exits.record(ExitKind::Mmio);
        f.shadow_mmu.insert("installed".into(), n.into());
        PhaseStats { phase: n, name: None, figures: f }
    }

    fn sample() -> RunStats {
        let phases = vec![phase(0, 2, 1000), phase(7, 3, 2000)];
        let mut total = Figures { kvm: BTreeMap::from([("pf_fixed".into(), 5)]), wall_ns: 3000, ..Figures::default() };
        for p in &phases {
            total.exits.add(&p.figures.exits);
        }
        total.shadow_mmu.insert("installed".into(), 7);
        RunStats {
            schema: SCHEMA_VERSION,
            config: ConfigRecord {
                image: "hello".into(),
                mem_bytes: 64 << 20,
                dedup: "off".into(),
                view: "memslot".into(),
                timeout_secs: None,
                guests: 1,
            },
            guest: GuestRecord {
                exit_code: Some(0),
                reports: vec![1, 2],
                end: EndRecord { reason: "exit".into(), rip: None, detail: "guest wrote 0 to port 0xf4".into() },
            },
            phases,
            total,
            units: crate::units::own_units(),
            guests: Vec::new(),
        }
    }

    #[test]
    fn record_counts_each_bucket_and_the_total() {
        let mut c = ExitCounts::default();
        for k in [ExitKind::Io, ExitKind::Io, ExitKind::EptWrite, ExitKind::Shutdown] {
            c.record(k);
        }
        assert_eq!((c.io, c.ept_write, c.shutdown, c.total), (2, 1, 1, 4));
    }

    #[test]
    fn exit_counts_add_up() {
        let s = sample();
        assert_eq!(s.total.exits.io, 5);
        assert_eq!(s.total.exits.mmio, 2);
        assert_eq!(s.total.exits.total, 7);
        assert!(is_gauge("pages_sharing") && !is_gauge("full_scans"));
    }

    #[test]
    fn json_has_the_abi_v1_keys() {
        let v: serde_json::Value = serde_json::to_value(sample()).expect("json");
        assert_eq!(v["schema"], 1);
        assert_eq!(v["config"]["dedup"], "off");
        assert_eq!(v["guest"]["exit_code"], 0);
        assert_eq!(v["guest"]["reports"], serde_json::json!([1, 2]));
        let p = &v["phases"][1];
        assert_eq!(p["phase"], 7);
        for key in ["io", "mmio", "hlt", "ept_read", "ept_write", "ept_fetch", "shutdown", "other", "total"] {
            assert!(p["exits"][key].is_u64(), "exits.{key}");
        }
        for key in ["shadow_mmu", "ksm", "kvm", "wall_ns"] {
            assert!(!p[key].is_null(), "{key}");
            assert!(!v["total"][key].is_null(), "total.{key}");
        }
        assert!(v["total"]["phase"].is_null());
        assert!(p.get("name").is_none() && p.get("exit_times").is_none(), "absent when there is none");
        assert_eq!(v["units"]["exits.io"]["kind"], "count");
        let back: RunStats = serde_json::from_value(v).expect("round trip");
        assert_eq!(back, sample());
    }

    #[test]
    fn names_and_exit_times_are_additions_a_reader_of_the_old_keys_ignores() {
        let mut s = sample();
        s.phases[1].name = Some("merge pass".into());
        s.phases[1].figures.exit_times.insert("io:phase".into(), crate::exit_times::ServiceTime::untimed(1));
        let v = serde_json::to_value(&s).expect("json");
        assert_eq!(v["phases"][1]["name"], "merge pass");
        assert_eq!(s.phases[1].label(), "7 \"merge pass\"");
        // A document without the additions still reads.
        let mut old = v.clone();
        old.as_object_mut().expect("object").remove("units");
        let back: RunStats = serde_json::from_value(old).expect("old document");
        assert!(back.units.is_empty() && back.phases[0].name.is_none());
    }
}
