//! The x86-64 state the VMM builds before the guest's first instruction.
//!
//! ABI v1 entry state: 64-bit long mode, paging on, an identity map of guest
//! RAM, flat segments, CPL 3 with IOPL 3, interrupts disabled, no IDT. All of
//! it lives in the VMM's low megabyte ([`layout`]); nothing here opens KVM.

pub mod cpu;
pub mod gdt;
pub mod layout;
pub mod page_tables;

/// The longest x86 instruction, in bytes: how far a fetch may reach past RIP.
pub const MAX_INSN_LEN: u64 = 15;
