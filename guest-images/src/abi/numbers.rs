// The numbers of the tiny-guest ABI, defined once. Two files `include!` this
// one: src/abi.rs, which makes them the crate's `abi` module, and build.rs,
// which writes them as `.set` lines into `$OUT_DIR/abi-numbers.inc` for the
// assembly (and GUEST_BASE into `$OUT_DIR/abi-numbers.ld` for link.ld). So
// this file holds items only: no `use`, no inner attribute, nothing that
// needs the rest of the crate.

/// One number of the ABI as the assembly sees it: `.set name, value`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AbiNumber {
    /// The constant's name, the same in Rust and in the assembly.
    pub name: &'static str,
    /// Its value, widened to `u64`.
    pub value: u64,
    /// Its doc comment, one line per line of the comment.
    pub doc: &'static str,
}

/// Defines each number as a `pub const` with its doc comment, and [`NUMBERS`]
/// listing them all, so that no number can be left out of the assembly.
macro_rules! abi_numbers {
    ($($(#[doc = $doc:literal])+ $name:ident: $ty:ty = $value:expr;)+) => {
        $($(#[doc = $doc])+ pub const $name: $ty = $value;)+

        /// Every number of this module, in order: what build.rs writes into
        /// `$OUT_DIR/abi-numbers.inc` as `.set` lines.
        pub const NUMBERS: &[AbiNumber] =
            &[$(AbiNumber { name: stringify!($name), value: $name as u64, doc: concat!($($doc, "\n"),+) }),+];
    };
}

abi_numbers! {
    /// Major version of the ABI: a guest written for version 1 runs on any
    /// VMM of version 1.
    ABI_VERSION_MAJOR: u32 = 1;
    /// Minor version of the ABI: 1.1 added the fleet registers (RSI, RDX),
    /// `DEDUP_SOFT_DIRTY`, `PORT_BARRIER` and `PORT_PHASE_NAME`. Additions
    /// only: a guest written for 1.0 runs unchanged.
    ABI_VERSION_MINOR: u32 = 1;

    /// First guest-physical byte of the guest's own memory (1 MiB): every
    /// PT_LOAD of an image lies at or above it (the built-in images are
    /// linked here), and `[GUEST_BASE, RAM size)` is eligible for
    /// deduplication. `[0, GUEST_BASE)` belongs to the VMM (page tables,
    /// GDT, the guest's stack).
    GUEST_BASE: u64 = 0x10_0000;
    /// Size of a guest page in bytes: the unit of deduplication.
    PAGE_SIZE: u64 = 4096;
    /// Least size in bytes of the stack whose top RSP points at on entry
    /// (inside the VMM's low megabyte).
    MIN_STACK_BYTES: u64 = 16 << 10;
    /// First guest-physical address of the region the built-in workloads
    /// fill and check (2 MiB): `[WORKLOAD_REGION_START, RAM size rounded
    /// down to a page)`. A convention of these images, not a promise of the
    /// VMM: their code and data stay below it.
    WORKLOAD_REGION_START: u64 = 0x20_0000;

    /// First port of COM1, a 16550A UART (its transmit register: one
    /// console byte per 8-bit `out`); the console goes to the VMM's
    /// standard output.
    COM1_BASE: u16 = 0x3F8;
    /// Number of COM1's ports, `COM1_BASE` to `COM1_BASE + 7`.
    COM1_PORTS: u16 = 8;
    /// Port whose 32-bit value ends the run with that exit code (0 =
    /// success).
    PORT_EXIT: u16 = 0xF4;
    /// Port whose 32-bit value ends the current phase and starts the phase
    /// of that number; the VMM keeps every counter per phase.
    PORT_PHASE: u16 = 0x500;
    /// Port of deduplication control: the 32-bit value is one of the
    /// `DEDUP_*` requests. In a fleet it acts on the whole fleet.
    PORT_DEDUP: u16 = 0x501;
    /// Port whose 32-bit value is appended to the run's guest report (a
    /// 64-bit value takes two writes, low half first).
    PORT_REPORT: u16 = 0x502;
    /// 1.1: fleet barrier port: the vCPU waits until every guest of the
    /// fleet still running has written the same 32-bit value (a single
    /// guest never waits).
    PORT_BARRIER: u16 = 0x503;
    /// 1.1: phase name port: the 32-bit value is the guest-physical address
    /// of a NUL-terminated name (printable ASCII, at most
    /// `PHASE_NAME_MAX_LEN` bytes) for the current phase; a bad address or
    /// name is refused and the run goes on.
    PORT_PHASE_NAME: u16 = 0x504;
    /// 1.1: longest phase name in bytes, the NUL not counted.
    PHASE_NAME_MAX_LEN: usize = 63;

    /// `PORT_DEDUP` request: one full deduplication pass now; the vCPU waits
    /// until it is done, so phases are deterministic.
    DEDUP_PASS: u32 = 1;
    /// `PORT_DEDUP` request: start the background scanner (ksmd).
    DEDUP_START: u32 = 2;
    /// `PORT_DEDUP` request: stop the background scanner.
    DEDUP_STOP: u32 = 3;
    /// `PORT_DEDUP` request: unmerge every merged page.
    DEDUP_UNMERGE: u32 = 4;
    /// 1.1: `PORT_DEDUP` request: one soft-dirty round now (as `clear_refs`
    /// 4): all guest RAM above `GUEST_BASE` becomes read-only in one batch
    /// range, same frames; a later write faults once and makes its page
    /// writable again. The vCPU waits until the round is done.
    DEDUP_SOFT_DIRTY: u32 = 5;
}
