//! The deduplicator: a KSM-like scanner over guest pages, after Linux
//! mm/ksm.c, that merges identical pages through the mmu notifier so the
//! secondary MMU sees every change.
//!
//! # Map
//!
//! The modules follow mm/ksm.c; each one's counterparts:
//!
//! | module | mm/ksm.c |
//! | --- | --- |
//! | [`ksm`] | the global state ([`Ksm`]: `ksm_scan`, `root_stable_tree`, `root_unstable_tree`, the zero page, the counters), `ksm_init`; [`KsmError`] |
//! | [`rmap`] | `struct ksm_rmap_item` and its flags, `remove_rmap_item_from_tree`; [`KSM_RMAP_ITEM_SIZE`] |
//! | [`stable_tree`] | `struct ksm_stable_node`, `stable_node_chain` / `stable_node_dup`, `get_ksm_page`, `stable_tree_search`, `stable_tree_insert`, `stable_tree_append`, `stable_node_dup_del`, `remove_node_from_stable_tree` |
//! | [`unstable_tree`] | `unstable_tree_search_insert` |
//! | [`merge`] | `try_to_merge_one_page`, `try_to_merge_with_ksm_page`, `try_to_merge_with_zero_page`, `try_to_merge_two_pages` (their pte work, `write_protect_page` and `replace_page`, is the primary MMU's, in `shadow_mmu`) |
//! | [`scan`] | `struct ksm_scan`, `ksm_do_scan`, `scan_get_next_rmap_item`, `cmp_and_merge_page`, smart scan (`should_skip_rmap_item`, `skip_age`); and [`Ksm::full_pass`], the synchronous pass |
//! | [`unmerge`] | `unmerge_and_remove_all_rmap_items`, `break_cow` |
//! | [`sysfs`] | `ksm_attrs`: the knobs' `*_store` checks ([`KsmKnobs`]), the figures' `*_show` ([`KsmStats`], [`Ksm::counters`]), `general_profit_show` |
//! | [`ksmd`] | `ksm_scan_thread` ([`Ksmd`]) |
//! | [`page`] | `calc_checksum`, `memcmp_pages`, `pages_identical` |
//! | [`tree`] | the rbtrees the stable and unstable trees are made of |
//!
//! # Deliberate differences from mm/ksm.c
//!
//! Each is marked at the code with a comment pointing here.
//!
//! 1. **One mm, one vma.** Rmap items sit in an array indexed by guest page
//!    ([`rmap`]), not on per-mm_slot lists: one guest is one mm with one
//!    mergeable vma. An rmap item exists once its page has been seen holding
//!    memory (a never-touched page is a memfd hole, Linux's "no pte"),
//!    checked with one mincore per full scan rather than a page-table walk.
//! 2. **Treaps, not rbtrees** ([`tree`]): random priorities, so O(log n)
//!    depth is expected where an rbtree guarantees it, in an arena of u32
//!    ids. Parent links let a node be erased without searching for it
//!    again, which the unstable tree needs (its pages may have changed since
//!    they were inserted).
//! 3. **A frame tag instead of `page->mapping`.** A stable node tags its KSM
//!    frame with its id (`ksm_owner`, [`stable_tree`]), and `get_ksm_page`
//!    is that tag check: the primary MMU has frames, not `struct page`s.
//!    Node ids are reused, so a freed stable node that still owns its frame
//!    clears the tag at once (`stable_node_dup_del`) where Linux leaves it
//!    to the freeing of the page: no frame keeps the tag of a node id that
//!    may be handed out again.
//! 4. **The zero page is a frame of the guest's pool** ([`Ksm::new`]), taken
//!    once and tagged as no stable node's, since the primary MMU maps only
//!    pool frames; `ksm_zero_pages` is its mapcount (only merges map it, so
//!    that is Linux's counter, lowered at once by a copy-on-write break).
//! 5. **A page mapping the zero page keeps its rmap item** (state Zero) until
//!    the scanner finds it no longer does, where Linux frees that rmap item
//!    at the next scan (a zero-page pte maps no anonymous page): the array
//!    slot exists anyway, and its state lets the scanner pass such a page
//!    without reading it. So `rmap_items` counts such pages, and
//!    `pages_volatile` also subtracts `ksm_zero_pages` from Linux's
//!    `rmap_items - pages_shared - pages_sharing - pages_unshared`
//!    ([`Ksm::stats`]).
//! 6. **One copy of the page per visit.** The page being visited is read
//!    once into a buffer (`read_page`), and that copy is checksummed and
//!    compared in both trees, where Linux reads the live page each time; the
//!    checksum and every comparison of one visit judge the same bytes, and
//!    guest memory is only ever read through raw pointers ([`page`]). Since
//!    a failed merge means the page changed after the copy was read, a
//!    failed merge with the zero page ends the visit
//!    (`try_to_merge_with_zero_page`), where Linux goes on to the unstable
//!    tree with the live page (after a failed merge with a KSM page both
//!    end the visit).
//! 7. **No `break_cow` after half a pair.** When the second half of
//!    `try_to_merge_two_pages` fails, the page that was to become the KSM
//!    page is left write-protected but not KSM instead of going through
//!    `break_cow`: a later write reuses it in place, so nothing needs
//!    breaking.
//! 8. **No page pins.** `try_to_merge_one_page` does not refuse a page with
//!    extra references (pinned for I/O): nothing pins guest frames here.
//! 9. **`full_pass`** (port 0x501, value 1) is this prototype's: full scans
//!    to a fixpoint that the guest waits for. Smart scan skips nothing during
//!    it: a skipped page would change nothing, and the pass could end before
//!    it was compared at all. Skipping is a throughput heuristic for ksmd; a
//!    pass the guest waits for promises every page that held still its
//!    chance.
//! 10. **`pages_to_scan` = 0 is refused** ([`KsmKnobs::check`]). Linux
//!     accepts it: ksmd then wakes every `sleep_millisecs` and scans nothing.
//!     This check is also the command line's (`--pages-to-scan 0` is
//!     refused, tests/bad_input.rs), and a run = 1 that never scans is a
//!     mistake, not an experiment.
//! 11. **Knobs and figures.** Only the knobs in [`KsmKnobs`] exist (one NUMA
//!     node, no chain pruning interval, no advisor). [`KsmStats`] adds cost
//!     figures Linux does not have (`merges`, `bytes_returned`,
//!     `memfd_resident_bytes`, `metadata_bytes`, `rmap_items`, `scan_ns`,
//!     `cpu_ns`); frames freed by a batch go back to the host (the memfd is
//!     punched) at the end of each `ksm_do_scan`, which `bytes_returned`
//!     measures. [`Ksm::counters`] reports `general_profit` clamped at zero,
//!     as its figures are unsigned (the signed value is in [`KsmStats`]).

pub mod ksm;
pub mod ksmd;
pub mod merge;
pub mod page;
pub mod pass;
pub mod rmap;
pub mod scan;
pub mod stable_tree;
pub mod sysfs;
pub mod tree;
pub mod unmerge;
pub mod unstable_tree;

pub use ksm::{Ksm, KsmError};
pub use ksmd::Ksmd;
pub use rmap::KSM_RMAP_ITEM_SIZE;
pub use scan::KSM_SCAN_SLICE;
pub use sysfs::{KsmKnobs, KsmStats};
