//! The deduplicator: a KSM-like scanner over guest pages, after Linux
//! mm/ksm.c, that merges identical pages through the mmu notifier so the
//! secondary MMU sees every change.
//!
//! * [`ksm`]: the scanner (`ksm_do_scan`, `cmp_and_merge_page`, the stable
//!   and unstable trees, `try_to_merge_one_page`, `unmerge`), its knobs and
//!   its statistics with the names of /sys/kernel/mm/ksm.
//! * [`ksmd`]: the background thread that scans while the guest runs.
//! * [`tree`]: the content-ordered trees.
//! * [`page`]: checksums and comparisons of page contents.

pub mod ksm;
pub mod ksmd;
pub mod page;
pub mod tree;

pub use ksm::{Ksm, KsmError, KsmKnobs, KsmStats, KSM_RMAP_ITEM_SIZE};
pub use ksmd::Ksmd;
