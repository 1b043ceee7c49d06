//! What `hello` and the `misbehave-*` images do that a test can check: the
//! text they print, where they fault, the ports and counts they use.

use crate::images::IMAGE_BASE;

/// What `hello` prints on COM1, one io exit per byte.
pub const HELLO_MESSAGE: &str = "Hello from a tiny guest\n";

/// What `misbehave-spin` prints on COM1 before it loops forever.
pub const SPIN_MESSAGE: &str = "spinning\n";

/// What `misbehave-triple-fault` prints on COM1 before it faults.
pub const TRIPLE_FAULT_MESSAGE: &str = "about to fault\n";

/// Guest RIP of the `ud2` in `misbehave-triple-fault`: the first byte of its
/// `.text`, so the triple fault the VMM reports is at this address.
pub const TRIPLE_FAULT_RIP: u64 = IMAGE_BASE;

/// Exit code `misbehave-exit-code` ends its run with.
pub const MISBEHAVE_EXIT_CODE: u32 = 3;

/// The unknown port `misbehave-port-flood` writes (and
/// `misbehave-beyond-ram` reads).
pub const UNKNOWN_PORT: u16 = 0x80;

/// How many times `misbehave-port-flood` writes [`UNKNOWN_PORT`].
pub const PORT_FLOOD_WRITES: u64 = 100_000;
