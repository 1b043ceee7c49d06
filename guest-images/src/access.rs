//! `access`: reads and writes of every size, across pages, into code and
//! with SSE, after a dedup pass; its pages and its exact reports.

use crate::abi::WORKLOAD_REGION_START;

/// First page `access` uses (A; B, C, D and E follow).
pub const ACCESS_START: u64 = WORKLOAD_REGION_START;

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
