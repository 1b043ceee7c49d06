# pagefill: fill guest RAM with pages in 16 groups of identical content,
# deduplicate, rewrite one word per page, deduplicate again, and report
# checksums at each step. The Rust model is guest_images::pagefill_expected_reports.
#
# Region: [2 MiB, RDI rounded down to a page); N = its size / 4096 pages
# (N = 0 if RAM <= 2 MiB). Page i (counting from 2 MiB) is in group
# g = i % 16, and its 8-byte word w (0..511) holds
#     pattern(g, w) = ((g + 1) * 0x9E3779B97F4A7C15) ^ (w * 0x100000001B3)
# (wrapping 64-bit arithmetic; no word is ever zero).
#
#   phase 1: fill every word of the N pages with pattern(g, w)
#   phase 2: dedup 1 (one synchronous full pass)
#   phase 3: sum word 0 of every page; report it (low 32, high 32)
#   phase 4: store pattern(g, 1) + 1 into word 1 of every page (all pages of
#            a group get the same value, so groups stay identical)
#   phase 5: dedup 1
#   phase 6: sum word 1 of every page, report it; sum every word of every
#            page, report it; exit 0
#
# Each phase is named (phase_name): one io exit more per phase.
# Exits with dedup off: 6 phase + 6 name + 2 dedup + 6 report + 1 exit = 21 io.
        .include "abi.inc"
        .include "workload.inc"

        .set    PAGEFILL_GROUPS, 16             # a power of two

# Registers kept across the whole program: r15 = region start, r14 = region
# end (the macros clobber rax, rdx and their own scratch registers).

        .text
        .globl  _start
_start:
        workload_region

# ---- phase 1: fill every word of every page with pattern(g, w)
        phase   1, "fill 16 groups"
        fill_groups PAGEFILL_GROUPS

# ---- phase 2: one synchronous dedup pass
        phase   2, "merge pass"
        dedup   DEDUP_PASS

# ---- phase 3: checksum of word 0 of every page
        phase   3, "read word 0"
        report_checksum PAGE_SIZE       # 2 io

# ---- phase 4: word 1 of every page := pattern(g, 1) + 1
        phase   4, "rewrite word 1"
        rewrite_word1 PAGEFILL_GROUPS, 1

# ---- phase 5: dedup again
        phase   5, "merge pass"
        dedup   DEDUP_PASS

# ---- phase 6: checksum of word 1 of every page, then of every word
        phase   6, "checksums"
        report_checksum PAGE_SIZE, 8    # 2 io
        report_checksum 8               # 2 io

        exit    0
