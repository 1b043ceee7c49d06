//! The deduplicator: a KSM-like scanner over guest pages, after Linux
//! mm/ksm.c, that merges identical pages through the mmu notifier so the
//! secondary MMU sees every change.
//!
//! # Map
//!
//! The modules follow mm/ksm.c (Linux 6.12); each one's counterparts:
//!
//! | module | mm/ksm.c |
//! | --- | --- |
//! | [`ksm`] | the global state ([`Ksm`]: `ksm_scan`, `root_stable_tree`, `root_unstable_tree`, the zero page, the counters, the mm list), `ksm_init` ([`Ksm::new_in`]); [`KsmError`] |
//! | [`mm_slot`] | `struct ksm_mm_slot` and the mm list (`ksm_mm_head`): `__ksm_enter` ([`Ksm::ksm_enter`]), `__ksm_exit` ([`Ksm::ksm_exit`]), `proc_pid_ksm_stat` ([`Ksm::mm_stats`], [`KsmMmStats`]); [`MmId`]; the one mm held locked at a time (the mmap lock `get_mergeable_page` takes) |
//! | [`rmap`] | `struct ksm_rmap_item` and its flags, `alloc_rmap_item` / `get_next_rmap_item`, `free_rmap_item`, `remove_rmap_item_from_tree`; [`KSM_RMAP_ITEM_SIZE`] |
//! | [`stable_tree`] | `struct ksm_stable_node`, `stable_node_chain` / `stable_node_dup` / `chain_prune`, `ksm_get_folio`, `page_stable_node`, `stable_tree_search`, `stable_tree_insert`, `stable_tree_append`, `stable_node_dup_del`, `remove_node_from_stable_tree`, `remove_all_stable_nodes` |
//! | [`unstable_tree`] | `unstable_tree_search_insert` |
//! | [`merge`] | `try_to_merge_one_page`, `try_to_merge_with_ksm_page`, `try_to_merge_with_zero_page`, `try_to_merge_two_pages` (their pte work, `write_protect_page` and `replace_page`, is the primary MMU's, in `shadow_mmu`) |
//! | [`scan`] | `struct ksm_scan`, `ksm_do_scan`, `scan_get_next_rmap_item` (mm by mm along the list), `cmp_and_merge_page`, smart scan (`should_skip_rmap_item`, `skip_age`); [`KSM_SCAN_SLICE`] |
//! | [`pass`] | none: [`Ksm::full_pass`], the synchronous pass, and its cancellable form |
//! | [`unmerge`] | `unmerge_ksm_pages`, `break_ksm`, `unmerge_and_remove_all_rmap_items` |
//! | [`sysfs`] | `ksm_attrs`: the knobs' `*_store` checks ([`KsmKnobs`]), the figures' `*_show` ([`KsmStats`], [`Ksm::counters`], [`Ksm::signed_counters`]), `general_profit_show` |
//! | [`ksmd`] | `ksm_scan_thread` ([`Ksmd`]) |
//! | [`page`] | `calc_checksum`, `memcmp_pages`, `pages_identical` |
//! | [`tree`] | the rbtrees the stable and unstable trees are made of |
//!
//! # Deliberate differences from mm/ksm.c
//!
//! Each is marked at the code with a comment pointing here. NUMA
//! (`merge_across_nodes`, the migrate_nodes list), huge pages (THP
//! splitting), swap, migration, memory hotplug and the advisor
//! (`advisor_mode`) have no counterpart: one node, 4 KiB frames, no swap.
//!
//! 1. **One vma per mm, rmap items indexed by page, named by ids.** Each mm
//!    on the list ([`mm_slot`]) is one guest with one mergeable vma, and
//!    its rmap items sit in an array indexed by guest page on its slot,
//!    not on an `rmap_list` ([`rmap`]); there is no per-range
//!    VM_MERGEABLE ([`Ksm::unmerge_ksm_pages`] unmerges a range but does
//!    not take it out of the scan). The trees and stable nodes hold rmap
//!    item ids (the slot's first id plus the page's index, growing along
//!    the list) where Linux holds `ksm_rmap_item` pointers, which name the
//!    mm and address. Linux's "no anonymous page here" (`folio_walk_start`
//!    finds none) is a memfd hole (a never-touched page) or the zero page:
//!    such a page has no rmap item. Holes are known from one mincore of the
//!    whole pool when a full scan begins; a frame that was a hole then is
//!    looked at again (one mincore for it and the frames after it) when the
//!    scanner reaches it, so a page copied into a freed frame, or touched
//!    for the first time, during the scan is scanned. A guest read of a
//!    never-touched page allocates it in the memfd, where Linux maps the
//!    zero page.
//! 2. **The mm list.** An mm entered while a full scan is under way goes to
//!    the end of the list and is passed until the next scan; Linux puts it
//!    just behind the scanning cursor, so it too is first scanned by the
//!    next scan, but from another place in the order (rmap ids grow along
//!    the list, which therefore only grows at its end).
//!    [`Ksm::ksm_exit`] frees the mm's rmap items and its slot at once (its
//!    pages leave their stable nodes; it unmerges nothing), where Linux's
//!    `__ksm_exit` leaves an mm that has rmap items to ksmd, which frees
//!    them when it next reaches it. An mm torn down (`exit_mmap`) but not
//!    yet `ksm_exit`ed is met by the scanner as Linux's `ksm_test_exit`
//!    meets it: its rmap items go, but its slot stays on the list until
//!    [`Ksm::ksm_exit`], so that [`MmId`]s change only when the VMM says
//!    so. The scanner locks one mm at a time (its page's, then the
//!    unstable tree's pages' in turn), never two; where a merge spans two
//!    mms (`try_to_merge_two_pages`, a stable tree page of another guest)
//!    the KSM frame is pinned while the other mm is unlocked, as Linux
//!    holds a page reference, so that no write reuses it in place.
//! 3. **Treaps, not rbtrees** ([`tree`]): random priorities, so O(log n)
//!    depth is expected where an rbtree guarantees it, in an arena of u32
//!    ids. Parent links let a node be erased without searching for it
//!    again, which the unstable tree needs (its pages may have changed since
//!    they were inserted).
//! 4. **A frame tag instead of `page->mapping`.** A stable node tags its KSM
//!    frame with its id (`ksm_owner`, [`stable_tree`]), and `ksm_get_folio`
//!    is that tag check: the primary MMU has frames, not `struct page`s.
//!    Node ids are reused, so a stable node whose last rmap item leaves is
//!    freed at once, and clears the tag if it still owns its frame
//!    (`stable_node_dup_del`); Linux keeps such a node until a search finds
//!    its page freed. The two differ only while the KSM page outlives its
//!    rmap items (a page mapping it that KSM did not merge, as after a
//!    fork): here that page is then an ordinary read-only page.
//! 5. **The zero page is a frame of the pool** ([`Ksm::new_in`]), one for
//!    every mm on the list, taken once and tagged as no stable node's,
//!    since the primary MMUs map only pool frames; `ksm_zero_pages` is its
//!    mapcount over every mm (only merges and copied mappings map it, so
//!    that is Linux's counter, lowered at once by a copy-on-write break),
//!    and an mm's own ([`KsmMmStats`]) counts its ptes that map it.
//! 6. **One copy of the page per tree search.** The checksum is computed on
//!    the live page, as Linux's is (in place, through atomic loads:
//!    [`xxh64`]); a page whose checksum held is then read once into a
//!    buffer (`read_page`), after the attempt to merge it with the zero
//!    page, and that copy is compared in both trees, where Linux reads the
//!    live page each time: every comparison of one visit judges the same
//!    bytes, those the page holds once a failed zero-page merge
//!    write-protected it. Guest memory is only ever read through raw
//!    pointers or atomics ([`page`]).
//! 7. **No `break_cow` after half a pair.** When the second half of
//!    `try_to_merge_two_pages` fails, the page that was to become the KSM
//!    page is left write-protected but not KSM instead of going through
//!    `break_cow`: a later write reuses it in place, so nothing needs
//!    breaking.
//! 8. **No page pins.** `try_to_merge_one_page` does not refuse a page with
//!    extra references (pinned for I/O): nothing pins guest frames here.
//! 9. **Chains are pruned at every search.** There is no
//!    `stable_node_chains_prune_millisecs`: every `stable_tree_search` walks
//!    whole chains, prunes their stale duplicates and picks the fullest
//!    duplicate with room (`stable_node_dup` as `chain_prune` runs it), which
//!    is Linux with that knob at 0. Linux's default, 2000 ms, prunes a chain
//!    at most that often and in between takes the first duplicate with room,
//!    moving it to the head of the chain.
//! 10. **`full_pass`** (port 0x501, value 1) is this prototype's: full
//!     scans over every mm to a fixpoint that the guest waits for. Smart
//!     scan skips nothing during it: a skipped page would change nothing,
//!     and the pass could end before it was compared at all. Skipping is a
//!     throughput heuristic for ksmd; a pass the guest waits for promises
//!     every page that held still its chance.
//! 11. **ksmd lets go between slices.** Linux's ksmd holds
//!     `ksm_thread_mutex` for a whole batch (rescheduling inside it), so a
//!     sysfs write waits for the batch. Here a batch is worked in stretches
//!     of at most [`KSM_SCAN_SLICE`] with the deduplicator's lock let go
//!     (and, once per slice, a 100 us pause so that a waiting thread gets
//!     it) and the stop flag checked between them: a stop takes effect
//!     within about a slice whatever `pages_to_scan` is. A pass and an
//!     unmerge take a cancellation check polled as often
//!     ([`Ksm::full_pass_cancellable`], [`Ksm::unmerge_all_cancellable`]).
//! 12. **`pages_to_scan` = 0 is refused** ([`KsmKnobs::check`]). Linux
//!     accepts it: ksmd then wakes every `sleep_millisecs` and scans nothing.
//!     This check is also the command line's (`--pages-to-scan 0` is
//!     refused, tests/bad_input.rs), and a run = 1 that never scans is a
//!     mistake, not an experiment.
//! 13. **Knobs and figures.** Only the knobs in [`KsmKnobs`] exist.
//!     `full_scans` counts every full scan since the deduplicator was made:
//!     Linux shows `ksm_scan.seqnr`, which run = 2 sets back to 0, but the
//!     VMM reports this figure per phase as a count.
//!     [`KsmStats`] adds cost figures Linux does not have (`merges`,
//!     `bytes_returned`, `memfd_resident_bytes`, `metadata_bytes`,
//!     `scan_ns`, `cpu_ns`); frames freed by the scanner go back to the host
//!     (the memfd is punched) at the end of each stretch of scanning, which
//!     `bytes_returned` measures. `general_profit` uses Linux's rmap item
//!     size ([`KSM_RMAP_ITEM_SIZE`], 64 bytes), not this crate's (12 bytes,
//!     in `metadata_bytes`), so that it compares with the kernel's.
//!     [`Ksm::counters`] reports it clamped at zero, as its figures are
//!     unsigned; the signed value is in [`KsmStats`] and
//!     [`Ksm::signed_counters`].
//!
//! # Linux's KSM selftests here
//!
//! Every test function of tools/testing/selftests/mm/ksm_tests.c and
//! ksm_functional_tests.c, and where it is ported or why it is not. Ports
//! are in `tests/selftests.rs` unless named otherwise, with the selftest's
//! figures; a test outside this crate is named with its file in the
//! workspace. Of the 19: 11 ported or mapped onto the lab's concepts, 3
//! timings sent to `vmm bench` or `vmm compare`, 5 without meaning here
//! (NUMA, huge pages, PROT_NONE, fork, fork and exec), each with the
//! reason.
//!
//! | selftest | here |
//! | --- | --- |
//! | ksm_tests.c `check_ksm_merge` (`-M`) | `ksm_tests_check_ksm_merge` (10 pages: 1 shared, 9 sharing); its max_page_sharing arithmetic in `tests/stable_tree.rs` |
//! | ksm_tests.c `check_ksm_unmerge` (`-U`) | `ksm_tests_check_ksm_unmerge` (0, 0 after one scan); `tests/unmerge.rs` `writes_unmerge` |
//! | ksm_tests.c `check_ksm_zero_page_merge` (`-Z`) | `ksm_tests_check_ksm_zero_page_merge` (`-z 0`: 1, 9; `-z 1`: 0, 0); `tests/zero_pages.rs` |
//! | ksm_tests.c `check_ksm_numa_merge` (`-N`) | no meaning: one NUMA node, no `merge_across_nodes` |
//! | ksm_tests.c `ksm_merge_time` (`-P`) | timing: `vmm bench dedup` (the `converge` pass); printed, not asserted, by `tests/full_pass.rs` |
//! | ksm_tests.c `ksm_merge_hugepages_time` (`-H`) | no meaning: no huge pages (guest RAM is 4 KiB frames); timing goes to `vmm bench` |
//! | ksm_tests.c `ksm_unmerge_time` (`-D`) | timing: not measured by `vmm bench` yet; what an unmerge costs the guest shows in the exits and times of the phase after a `DEDUP_UNMERGE` (`vmm compare ltp-ksm01`, phase 5) |
//! | ksm_tests.c `ksm_cow_time` (`-C`) | timing: `vmm compare cowstorm` (one copy-on-write write fault per merged page per round; the run table's `ept_write` row times each as the VMM served it) |
//! | ksm_functional_tests.c `test_unmerge` | `ksm_functional_tests_test_unmerge` |
//! | ksm_functional_tests.c `test_unmerge_zero_pages` | `ksm_functional_tests_test_unmerge_zero_pages` |
//! | ksm_functional_tests.c `test_unmerge_discarded` | `ksm_functional_tests_test_unmerge_discarded` (MADV_DONTNEED: the page's frame becomes a hole) |
//! | ksm_functional_tests.c `test_unmerge_uffd_wp` | the VMM's uffd view holds merged pages write-protected with UFFDIO_WRITEPROTECT; unmerging them (port 0x501 = 4) is `tests/guests_c.rs` `ltp_ksm01_gives_ltps_figures_at_every_stage` under `--view uffd` (every figure 0 after the unmerge, every byte verified) |
//! | ksm_functional_tests.c `test_prot_none` | no meaning: guest RAM has no PROT_NONE range (the primary MMU's `mprotect` removes write only); the VMM writes guest memory through the direct map, as ptrace writes /proc/PID/mem, which the merge tests already do |
//! | ksm_functional_tests.c `test_prctl` | always on: every guest's mm is entered whole when it is built (`ksm_enter`, as PR_SET_MEMORY_MERGE's MMF_VM_MERGE_ANY does), so there is no switch to test |
//! | ksm_functional_tests.c `test_prctl_fork` | no meaning: guests are not forked; a fleet's guests are each entered (`tests/fleet.rs` in the workspace, `ksm/tests/fleet.rs` here) |
//! | ksm_functional_tests.c `test_prctl_fork_exec` | no meaning: no fork, no exec |
//! | ksm_functional_tests.c `test_prctl_unmerge` | the switch turned off is `ksm_exit`: `tests/fleet.rs` `ksm_exit_mid_scan_leaves_the_others_figures_exact`; the unmerge itself is `test_unmerge`'s port |
//! | ksm_functional_tests.c `test_fork_ksm_merging_page_count` | the crate's part in `tests/scanner.rs` `a_page_already_on_its_ksm_page_joins_it_without_a_write_protection` (a copied mapping of a KSM page is not counted until scanned); each process's own count, `ksm_merging_pages` of /proc/PID/ksm_stat (`Ksm::mm_stats`), in `tests/ltp.rs` `ltp_ksm01_create_same_memory_across_processes` |
//! | ksm_functional_tests.c `test_fork_global_ksm_zero_pages_count` | `ksm_functional_tests_test_fork_global_ksm_zero_pages_count` (the global count); a second process's zero pages: `tests/fleet.rs` `zero_pages_and_chains_span_mms` |
//!
//! LTP's testcases/kernel/mem/ksm `create_same_memory` (ksm01) is
//! `tests/ltp.rs`.

pub mod ksm;
pub mod ksmd;
pub mod merge;
pub mod mm_slot;
pub mod page;
pub mod pass;
pub mod rmap;
pub mod scan;
pub mod stable_tree;
pub mod sysfs;
pub mod tree;
pub mod unmerge;
pub mod unstable_tree;
pub mod xxh64;

pub use ksm::{Ksm, KsmError};
pub use ksmd::Ksmd;
pub use mm_slot::{KsmMmStats, MmId};
pub use rmap::KSM_RMAP_ITEM_SIZE;
pub use scan::KSM_SCAN_SLICE;
pub use sysfs::{KsmKnobs, KsmStats};
