//! The built-in guest images of the VMM lab.
//!
//! Each image is a tiny static ELF64 x86-64 executable written in assembly
//! against the tiny-guest ABI, version 1.1 (`guest-abi.md`, summarised in
//! this crate's `README.md`). The ABI's numbers are defined once, in
//! [`abi`]: build.rs writes them into the include the assembly uses, and the
//! VMM reads them from there. The build script assembles `asm/<name>.S` with
//! GNU `as` and links it with `ld -T link.ld` at 1 MiB; this crate embeds the
//! results, so the VMM and its tests can run a guest by name without any
//! file on disk. [`IMAGES`] lists them, [`find`] looks one up.
//!
//! The constants and model functions here document what each image does, so
//! that tests can check a run's exits and reports exactly: in particular
//! [`pagefill_expected_reports`] computes the checksums `pagefill` reports
//! for a given RAM size, and the comparison workloads `cowstorm`, `mixed`
//! and `volatile` have theirs ([`cowstorm_expected_reports`],
//! [`mixed_expected_reports`], [`volatile_expected_reports`]) and their
//! io exits per phase. Every name is at the crate root; the modules only
//! sort them by image.

pub mod abi;
mod access;
mod converge;
mod cowstorm;
mod dirtylog;
mod gcheap;
/// The numbers the built-in C guests share with their Rust models, defined
/// once in `src/guest_numbers.rs` (build.rs writes them into the guests'
/// generated `guest-numbers.h`): the workloads' own choices, no promise of
/// the VMM.
pub mod guest_numbers;
mod images;
mod kvstore;
mod ltp;
mod misbehave;
mod misbehave_dedup;
mod mixed;
mod model;
mod pagefill;
mod phases;
#[cfg(test)]
mod sim;
mod simple;
mod stress;
mod template;
mod unique;
mod volatile;

pub use abi::PAGE_SIZE;
pub use access::*;
pub use converge::*;
pub use cowstorm::*;
pub use dirtylog::*;
pub use gcheap::*;
pub use images::*;
pub use kvstore::*;
pub use ltp::*;
pub use misbehave::*;
pub use misbehave_dedup::*;
pub use mixed::*;
pub use pagefill::*;
pub use phases::*;
pub use simple::*;
pub use stress::*;
pub use template::*;
pub use unique::*;
pub use volatile::*;
