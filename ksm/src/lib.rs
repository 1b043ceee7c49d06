//! The deduplicator: a KSM-like scanner over guest pages, after Linux
//! mm/ksm.c, that merges identical pages through the mmu notifier so the
//! secondary MMU sees every change.
//!
//! Not built yet: the foundation runs with deduplication off. The plan, in
//! mm/ksm.c's terms, is one rmap item per scanned page, the unstable and
//! stable trees, `try_to_merge_one_page` with `write_protect_page` and
//! `replace_page`, `break_cow`, and ksmd.
