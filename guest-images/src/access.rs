//! `access`: reads and writes of every size, across pages, into code and
//! with SSE, after a dedup pass; its pages and its exact reports.

use crate::abi::WORKLOAD_REGION_START;

/// First page `access` uses (A; B, C, D and E follow).
pub const ACCESS_START: u64 = WORKLOAD_REGION_START;

/// The last phase `access` marks.
pub const ACCESS_PHASES: u32 = 3;

/// The names of `access`'s phases 1 to 3 (port 0x504).
pub const ACCESS_PHASE_NAMES: [&str; ACCESS_PHASES as usize] =
    ["fill pages A to E", "merge pass", "accesses of every kind"];

/// Io exits `access` takes in each phase, 0 to 3: the first marker; name
/// and marker; name, pass and marker; name, 16 reports and exit.
pub const ACCESS_PHASE_IO: [u64; ACCESS_PHASES as usize + 1] = [1, 2, 3, 18];

/// Io exits `access` takes (all its exits with dedup off): 3 markers, 3
/// names, 1 dedup request, 16 reports, 1 exit.
pub const ACCESS_IO_EXITS: u64 = 3 + 3 + 1 + 16 + 1;

/// Pages `access` uses from [`ACCESS_START`]: A, B, C, D and E.
pub const ACCESS_PAGES: u64 = 5;

/// The reports of `access`: byte [A+5], word [A+0x101], dword [A+0x203],
/// the page-crossing qword [A+0xFFC] (low, high), the qword written across
/// A|B and read back (low, high), 42 from the code on page C, the 16-byte
/// SSE load [D+0x10] (four halves, low first) and the 16-byte SSE store to
/// [E+0x28] read back (four halves).
pub const ACCESS_EXPECTED_REPORTS: [u64; 16] = [
    0x05,
    0x0201,
    0x0605_0403,
    0xFFFE_FDFC,
    0x0302_0100,
    0x5566_7788,
    0x1122_3344,
    42,
    0x1312_1110,
    0x1716_1514,
    0x1B1A_1918,
    0x1F1E_1D1C,
    0x89AB_CDEF,
    0x0123_4567,
    0x7654_3210,
    0xFEDC_BA98,
];
