//! The host KVM's own statistics, read from its binary stats file descriptor
//! (KVM_GET_STATS_FD, Documentation/virt/kvm/api.rst §4.133).
//!
//! kvm-ioctls has no wrapper for this ioctl, so it is issued here with
//! vmm-sys-util's macro. Only scalar statistics are kept (histograms are
//! skipped); each is reported under the name KVM gives it.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use std::os::unix::fs::FileExt;

use kvm_bindings::{
    KVMIO, KVM_STATS_BASE_MASK, KVM_STATS_BASE_POW10, KVM_STATS_TYPE_CUMULATIVE, KVM_STATS_TYPE_MASK,
    KVM_STATS_UNIT_BOOLEAN, KVM_STATS_UNIT_BYTES, KVM_STATS_UNIT_CYCLES, KVM_STATS_UNIT_MASK, KVM_STATS_UNIT_NONE,
    KVM_STATS_UNIT_SECONDS,
};
use vmm_sys_util::ioctl::ioctl;

mod nr {
    //! The ioctl number kvm-ioctls does not define.
    #![allow(missing_docs)] // the macro generates a pub fn without docs
    use super::KVMIO;
    vmm_sys_util::ioctl_io_nr!(KVM_GET_STATS_FD, KVMIO, 0xce);
}
use nr::KVM_GET_STATS_FD;

use crate::units::{FigureKind, FigureUnit};

/// Errors of the stats reader.
#[derive(Debug, thiserror::Error)]
pub enum KvmStatsError {
    /// The ioctl failed.
    #[error("KVM_GET_STATS_FD failed")]
    Ioctl(#[source] std::io::Error),
    /// Reading the stats file failed or it was malformed.
    #[error("cannot read KVM binary statistics")]
    Read(#[source] std::io::Error),
}

/// One scalar statistic's descriptor.
#[derive(Debug, Clone)]
struct Descriptor {
    name: String,
    cumulative: bool,
    offset: u64,
    /// KVM's unit, with its base and exponent applied (`ns`, `bytes`, ...).
    unit: String,
}

/// A reader of one KVM object's (VM or vCPU) binary statistics.
#[derive(Debug)]
pub struct KvmStats {
    file: File,
    data_offset: u64,
    descriptors: Vec<Descriptor>,
}

/// A snapshot of the values, by KVM's names.
pub type Snapshot = BTreeMap<String, u64>;

impl KvmStats {
    /// Opens the stats fd of a VM or vCPU fd.
    pub fn open(fd: &impl AsRawFd) -> Result<Self, KvmStatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd; it
        // reads or writes no memory of ours.
        let raw = unsafe { ioctl(fd, KVM_GET_STATS_FD()) };
        if raw < 0 {
            return Err(KvmStatsError::Ioctl(std::io::Error::last_os_error()));
        }
        // SAFETY: `raw` is a fresh fd returned by the kernel and owned by no one else.
        let file = unsafe { File::from_raw_fd(raw) };
        Self::from_file(file)
    }

    fn from_file(file: File) -> Result<Self, KvmStatsError> {
        let read = |offset: u64, len: usize| -> Result<Vec<u8>, KvmStatsError> {
            let mut buf = vec![0u8; len];
            file.read_exact_at(&mut buf, offset).map_err(KvmStatsError::Read)?;
            Ok(buf)
        };
        let header = read(0, 24)?;
        let u32_at = |b: &[u8], o: usize| u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let name_size = u32_at(&header, 4) as usize;
        let num_desc = u32_at(&header, 8) as usize;
        let desc_offset = u64::from(u32_at(&header, 16));
        let data_offset = u64::from(u32_at(&header, 20));
        // struct kvm_stats_desc: flags u32, exponent i16, size u16, offset u32,
        // bucket_size u32, then the name.
        let desc_size = 16 + name_size;
        let table = read(desc_offset, desc_size * num_desc)?;
        let mut descriptors = Vec::new();
        for chunk in table.chunks_exact(desc_size) {
            let flags = u32_at(chunk, 0);
            let exponent = i16::from_le_bytes([chunk[4], chunk[5]]);
            let size = u16::from_le_bytes([chunk[6], chunk[7]]);
            let offset = u64::from(u32_at(chunk, 8));
            let name_bytes = &chunk[16..];
            let end = name_bytes.iter().position(|&b| b == 0).unwrap_or(name_bytes.len());
            let name = String::from_utf8_lossy(&name_bytes[..end]).into_owned();
            let kind = flags & KVM_STATS_TYPE_MASK;
            if size != 1 || kind > 2 {
                continue; // histograms and arrays: not reported
            }
            let cumulative = kind == KVM_STATS_TYPE_CUMULATIVE;
            descriptors.push(Descriptor { name, cumulative, offset, unit: unit_name(flags, exponent) });
        }
        Ok(Self { file, data_offset, descriptors })
    }

    /// Reads every scalar statistic now.
    pub fn snapshot(&self) -> Result<Snapshot, KvmStatsError> {
        let mut snap = Snapshot::new();
        for d in &self.descriptors {
            let mut buf = [0u8; 8];
            self.file.read_exact_at(&mut buf, self.data_offset + d.offset).map_err(KvmStatsError::Read)?;
            snap.insert(d.name.clone(), u64::from_le_bytes(buf));
        }
        Ok(snap)
    }

    /// The names of the statistics that are levels (instant or peak values,
    /// reported by their value), not cumulative counters.
    pub fn level_names(&self) -> impl Iterator<Item = &str> {
        self.descriptors.iter().filter(|d| !d.cumulative).map(|d| d.name.as_str())
    }

    /// Every scalar statistic's unit and kind, by KVM's name: a cumulative
    /// counter in seconds is a time, any other cumulative one a count, an
    /// instant or peak value a level.
    pub fn units(&self) -> impl Iterator<Item = (&str, FigureUnit)> {
        self.descriptors.iter().map(|d| {
            let seconds = matches!(d.unit.as_str(), "s" | "ms" | "us" | "ns") || d.unit.starts_with("s*");
            let kind = match (d.cumulative, seconds) {
                (false, _) => FigureKind::Level,
                (true, true) => FigureKind::Time,
                (true, false) => FigureKind::Count,
            };
            (d.name.as_str(), FigureUnit::new(&d.unit, kind))
        })
    }

    /// The statistics that moved between two snapshots: cumulative counters
    /// as their increase, instant and peak values as their value in `after`.
    pub fn moved(&self, before: &Snapshot, after: &Snapshot) -> BTreeMap<String, u64> {
        moved(&self.descriptors, before, after)
    }
}

/// A descriptor's unit as people write it: KVM_STATS_UNIT_* with the
/// base and exponent applied (`ns` for seconds × 10^-9, `KiB` for bytes ×
/// 2^10); `none` for a plain number.
fn unit_name(flags: u32, exponent: i16) -> String {
    let pow10 = flags & KVM_STATS_BASE_MASK == KVM_STATS_BASE_POW10;
    match (flags & KVM_STATS_UNIT_MASK, pow10, exponent) {
        (KVM_STATS_UNIT_NONE, _, _) => "none".into(),
        (KVM_STATS_UNIT_SECONDS, true, 0) => "s".into(),
        (KVM_STATS_UNIT_SECONDS, true, -3) => "ms".into(),
        (KVM_STATS_UNIT_SECONDS, true, -6) => "us".into(),
        (KVM_STATS_UNIT_SECONDS, true, -9) => "ns".into(),
        (KVM_STATS_UNIT_BYTES, false, 0) => "bytes".into(),
        (KVM_STATS_UNIT_BYTES, false, 10) => "KiB".into(),
        (KVM_STATS_UNIT_BYTES, false, 20) => "MiB".into(),
        (KVM_STATS_UNIT_CYCLES, _, 0) => "cycles".into(),
        (KVM_STATS_UNIT_BOOLEAN, _, _) => "boolean".into(),
        (unit, pow10, e) => {
            let what = match unit {
                KVM_STATS_UNIT_SECONDS => "s",
                KVM_STATS_UNIT_BYTES => "bytes",
                KVM_STATS_UNIT_CYCLES => "cycles",
                _ => "unknown-unit",
            };
            format!("{what}*{}^{e}", if pow10 { 10 } else { 2 })
        }
    }
}

fn moved(descriptors: &[Descriptor], before: &Snapshot, after: &Snapshot) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for d in descriptors {
        let (Some(&b), Some(&a)) = (before.get(&d.name), after.get(&d.name)) else { continue };
        if a == b {
            continue;
        }
        out.insert(d.name.clone(), if d.cumulative { a.wrapping_sub(b) } else { a });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_reports_counter_deltas_and_gauge_values() {
        let descriptors = vec![
            Descriptor { name: "exits".into(), cumulative: true, offset: 0, unit: "none".into() },
            Descriptor { name: "pages_4k".into(), cumulative: false, offset: 1, unit: "none".into() },
            Descriptor { name: "halt_exits".into(), cumulative: true, offset: 2, unit: "none".into() },
        ];
        let before = Snapshot::from([("exits".into(), 10), ("pages_4k".into(), 5), ("halt_exits".into(), 3)]);
        let after = Snapshot::from([("exits".into(), 17), ("pages_4k".into(), 9), ("halt_exits".into(), 3)]);
        let m = moved(&descriptors, &before, &after);
        assert_eq!(m, BTreeMap::from([("exits".into(), 7), ("pages_4k".into(), 9)]));
    }

    #[test]
    fn parses_a_stats_file_in_kvms_layout() {
        // Header, two descriptors (one histogram to be skipped), data.
        let name_size = 48usize;
        let desc_offset = 24u32;
        let desc_size = 16 + name_size;
        let data_offset = desc_offset + 2 * desc_size as u32;
        let mut f = Vec::new();
        for v in [0u32, name_size as u32, 2, 0, desc_offset, data_offset] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        let mut desc = |name: &str, flags: u32, size: u16, offset: u32| {
            f.extend_from_slice(&flags.to_le_bytes());
            f.extend_from_slice(&0i16.to_le_bytes());
            f.extend_from_slice(&size.to_le_bytes());
            f.extend_from_slice(&offset.to_le_bytes());
            f.extend_from_slice(&0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            f.extend_from_slice(&n);
        };
        // Offsets are in bytes from the start of the data block.
        desc("halt_wait_hist", 4, 4, 0);
        desc("pf_fixed", KVM_STATS_TYPE_CUMULATIVE, 1, 32);
        for v in [1u64, 2, 3, 4, 42] {
            f.extend_from_slice(&v.to_le_bytes());
        }
        let path = std::env::temp_dir().join(format!("kvm-stats-test-{}", std::process::id()));
        std::fs::write(&path, &f).expect("write");
        let stats = KvmStats::from_file(File::open(&path).expect("open")).expect("parse");
        std::fs::remove_file(&path).ok();
        assert_eq!(stats.snapshot().expect("snap"), Snapshot::from([("pf_fixed".into(), 42)]));
        let units: Vec<_> = stats.units().collect();
        assert_eq!(units, [("pf_fixed", FigureUnit::new("none", FigureKind::Count))]);
    }

    #[test]
    fn units_carry_kvms_unit_base_and_exponent() {
        let ns = KVM_STATS_TYPE_CUMULATIVE | KVM_STATS_UNIT_SECONDS | KVM_STATS_BASE_POW10;
        assert_eq!(unit_name(ns, -9), "ns");
        assert_eq!(unit_name(KVM_STATS_UNIT_BYTES | kvm_bindings::KVM_STATS_BASE_POW2, 12), "bytes*2^12");
        assert_eq!(unit_name(KVM_STATS_UNIT_BOOLEAN, 0), "boolean");
        let d = |unit: &str, cumulative| Descriptor { name: "x".into(), cumulative, offset: 0, unit: unit.into() };
        let stats = |d| KvmStats { file: File::open("/dev/null").expect("null"), data_offset: 0, descriptors: vec![d] };
        let kind = |d| stats(d).units().next().map(|(_, u)| u.kind);
        assert_eq!(kind(d("ns", true)), Some(FigureKind::Time));
        assert_eq!(kind(d("ns", false)), Some(FigureKind::Level));
        assert_eq!(kind(d("bytes", true)), Some(FigureKind::Count));
        assert_eq!(kind(d("cycles", true)), Some(FigureKind::Count));
    }
}
