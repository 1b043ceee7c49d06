//! The guest-misbehaviour suite's images that need no deduplicator to
//! misbehave: port I/O of every width (`misbehave-ports`, `-port-end`), the
//! low megabyte (`-low-read`, `-low-write`), the ends of RAM and of the
//! identity map (`-beyond-map`) and SSE arithmetic on a merged page
//! (`-sse-merged`); what each reports and how its run ends. The ones that
//! lean on the deduplicator are in `misbehave_dedup.rs`.

use crate::images::IMAGE_BASE;

/// Guest RIP at which `misbehave-low-read`, `-low-write`, `-port-end`,
/// `-beyond-map` and `-sse-merged` fault: the first instruction of their
/// `.text`.
pub const MISBEHAVE_FAULT_RIP: u64 = IMAGE_BASE;

/// The names of `misbehave-ports`' phases 1 to 4.
pub const MISBEHAVE_PORTS_PHASE_NAMES: [&str; 4] = ["port reads", "port writes", "string port i/o", "uart registers"];

/// Reads `misbehave-ports` makes in phase 1: 8, 16 and 32 bits from 6 ABI
/// ports and 6 neighbours, and from 256 ports of the sweep, where port
/// 0xFFFF takes only the 8-bit read (a wider one reaches past the port
/// space). Each must read all-ones.
pub const MISBEHAVE_PORTS_READS: u64 = 3 * 12 + 3 * 255 + 1;

/// Io exits of `misbehave-ports`' phases 0, 1, 2 and 4 (phase 3 depends on
/// the host, see [`MISBEHAVE_PORTS_STRING_IO`]): the first marker; the
/// name, the reads, 2 reports and the 8-bit marker; the writes (18 to the
/// neighbours, 766 to the sweep, 3 barriers, 9 phase names, 2 reports, 2
/// dedup, the 16-bit marker); the name, 10 UART reads, 10 reports and the
/// 16-bit exit.
pub const MISBEHAVE_PORTS_PHASE_IO: [Option<u64>; 5] =
    [Some(1), Some(1 + MISBEHAVE_PORTS_READS + 2 + 1), Some(18 + 766 + 3 + 9 + 2 + 2 + 1), None, Some(1 + 10 + 10 + 1)];

/// The range of io exits of `misbehave-ports`' phase 3: its name, report
/// and marker, and three `rep ins` of 16 elements, a `rep outsb` of 18, a
/// `rep outsw` of 8 and a `rep outsd` of 4. A KVM may exit once per
/// element or once per instruction (up to a page): this host's (PVM) exits
/// once per `rep ins` and once per element of a `rep outs`, 36 in all.
pub const MISBEHAVE_PORTS_STRING_IO: std::ops::RangeInclusive<u64> = 3 + 6..=3 + 48 + 18 + 8 + 4;

/// The line `misbehave-ports` writes to COM1 with `rep outsb`.
pub const MISBEHAVE_PORTS_LINE: &str = "rep outsb to COM1\n";

/// The reports of `misbehave-ports`: `None` where the value is the UART's
/// (the VMM's 16550A registers: compare with another run instead).
///
/// Phase 1: all-ones reads, reads (both [`MISBEHAVE_PORTS_READS`]); phase
/// 2: an 8-bit and a 16-bit write to the report port (0xAB, 0xABCD: this
/// VMM appends a narrower write zero-extended; the ABI defines 32-bit
/// writes only); phase 3: the 0xFF bytes the three `rep ins` read (112 of
/// 16, 32 and 64), the four values `rep outsd` wrote to the report port
/// (each is a 32-bit write of its own, however the KVM batches them); phase
/// 4: COM1's 8 registers, a 16-bit read of LSR and a 32-bit read of MCR.
pub fn misbehave_ports_expected_reports() -> Vec<Option<u64>> {
    let known = [MISBEHAVE_PORTS_READS, MISBEHAVE_PORTS_READS, 0xAB, 0xABCD, 112]
        .into_iter()
        .chain([0x1111_1111, 0x2222_2222, 0x3333_3333, 0x4444_4444])
        .map(Some);
    known.chain(std::iter::repeat_n(None, 10)).collect()
}

/// The report `misbehave-low-read` makes before it faults: the word it
/// pushed on and popped off its stack (the one low page it may use).
pub const MISBEHAVE_LOW_READ_REPORT: u64 = 0x57AC;

/// The report of `misbehave-low-write` before it faults: the RAM size's
/// low 32 bits.
pub fn misbehave_low_write_reports(mem_bytes: u64) -> Vec<u64> {
    vec![mem_bytes & 0xFFFF_FFFF]
}

/// How `misbehave-port-end`'s 16-bit access to port 0xFFFF (reaching port
/// 0x10000) may end, both without any VMM error.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortEndOutcome {
    /// The CPU raised #GP (this host, PVM, although the guest runs with
    /// IOPL 3): a triple fault at [`MISBEHAVE_FAULT_RIP`] after 2 io exits
    /// and the report `[0xFF]`.
    TripleFault,
    /// The CPU performed it (IOPL 3 skips the I/O permission bitmap): one
    /// more io exit answered all-ones, reports `[0xFF, 0xFFFF]`, exit 0
    /// after 4 io exits.
    Performed,
}

impl PortEndOutcome {
    /// The reports of the run.
    pub fn reports(&self) -> Vec<u64> {
        match self {
            PortEndOutcome::TripleFault => vec![0xFF],
            PortEndOutcome::Performed => vec![0xFF, 0xFFFF],
        }
    }

    /// The io exits of the run.
    pub fn io_exits(&self) -> u64 {
        match self {
            PortEndOutcome::TripleFault => 2,
            PortEndOutcome::Performed => 4,
        }
    }
}

/// The names of `misbehave-beyond-map`'s phases 1 and 2.
pub const MISBEHAVE_BEYOND_MAP_PHASE_NAMES: [&str; 2] = ["straddle the end of RAM", "end of the identity map"];

/// Io exits of `misbehave-beyond-map`'s phases 0 to 2 (the run ends in
/// phase 2 with a triple fault at [`MISBEHAVE_FAULT_RIP`]).
pub const MISBEHAVE_BEYOND_MAP_PHASE_IO: [u64; 3] = [1, 4, 3];

/// Mmio exits of `misbehave-beyond-map`'s phases 0 to 2: the write and the
/// read that straddle the end of RAM, the read at 4 GiB - 8.
pub const MISBEHAVE_BEYOND_MAP_PHASE_MMIO: [u64; 3] = [0, 2, 1];

/// The reports of `misbehave-beyond-map` (RAM of 3 GiB or less): the qword
/// read back across the end of RAM (its low half from RAM as written,
/// 0x55667788; its high half past RAM, all-ones), then the qword at 4 GiB
/// - 8 (all-ones).
pub const MISBEHAVE_BEYOND_MAP_REPORTS: [u64; 4] = [0x5566_7788, 0xFFFF_FFFF, 0xFFFF_FFFF, 0xFFFF_FFFF];

/// The names of `misbehave-sse-merged`'s phases 1 to 3.
pub const MISBEHAVE_SSE_MERGED_PHASE_NAMES: [&str; 3] =
    ["fill two identical pages", "merge pass", "sse arithmetic on a merged page"];

/// Io exits of `misbehave-sse-merged`'s phases 0 to 3 when the paddq runs.
pub const MISBEHAVE_SSE_MERGED_PHASE_IO: [u64; 4] = [1, 2, 3, 4];

/// The reports of `misbehave-sse-merged` when the paddq runs: words 2 and 3
/// of page A (3 and 4) added to zero.
pub const MISBEHAVE_SSE_MERGED_REPORTS: [u64; 2] = [3, 4];

/// Whether `misbehave-sse-merged`'s paddq, the first access to page A
/// after the pass merged it, fails: under the memslot view (`memslot`) a
/// zapped page (`zaps`: range-flush and legacy) is a hole, and KVM's
/// emulator cannot perform SSE arithmetic on memory, so the run ends with a
/// KVM internal error (emulation failure) at [`MISBEHAVE_FAULT_RIP`] after
/// the phase-3 name (io exits 1, 2, 3, 1) and no report. Otherwise it runs.
pub fn misbehave_sse_merged_fails(dedup: bool, zaps: bool, memslot: bool) -> bool {
    dedup && zaps && memslot
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn io_and_reports_add_up() {
        assert_eq!(MISBEHAVE_PORTS_READS, 802);
        assert_eq!(misbehave_ports_expected_reports().len(), 19);
        assert!(MISBEHAVE_PORTS_STRING_IO.contains(&36));
        assert_eq!(MISBEHAVE_BEYOND_MAP_PHASE_IO.len(), MISBEHAVE_BEYOND_MAP_PHASE_NAMES.len() + 1);
        assert!(misbehave_sse_merged_fails(true, true, true));
        assert!(!misbehave_sse_merged_fails(true, false, true) && !misbehave_sse_merged_fails(false, true, true));
    }
}
