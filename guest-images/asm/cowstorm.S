# cowstorm: a copy-on-write storm, the write-heavy workload. Every page is
# merged by a synchronous pass, then written, so every write breaks a merged
# page; four rounds of that. The Rust model of its reports is
# guest_images::cowstorm_expected_reports.
#
# Region: [2 MiB, RDI rounded down to a page); N = its size / 4096 pages
# (N = 0 if RAM <= 2 MiB). Page i (counting from 2 MiB) is in group
# g = i % 8 and starts with pagefill's pattern(g, w) in its word w.
#
#   phase 1:       fill every page with pattern(g, w) (fill_groups 8)
#   for round r = 1 .. 4:
#     phase 2r:    dedup 1 (one synchronous full pass: every page merges
#                  into its group's KSM page)
#     phase 2r+1:  store pattern(g, 1) + r into word 1 of every page: one
#                  write per page and no read, the same value for every page
#                  of a group (the groups stay groups of identical pages, and
#                  differ from what the last pass merged)
#   phase 10:      sum every word of every page; report it (low 32, high 32);
#                  exit 0
#
# Exits: 10 phase + 10 name + 4 dedup + 2 report + 1 exit = 27 io, whatever N is and
# whatever the policy. With deduplication on, every store of phase 2r+1 hits
# a page the pass just merged (read-only in the primary MMU): one
# copy-on-write fault (ept_write) per page and round, N per storm phase,
# under every policy and view (the stores read nothing, so a zapped entry
# costs no extra read fault). No other phase faults: the final reads find
# the private, writable copies the last storm installed.
        .include "abi.inc"
        .include "workload.inc"

        .set    COWSTORM_GROUPS, 8              # a power of two
        .set    COWSTORM_ROUNDS, 4

# Registers kept across the program (the macros clobber rax, rdx and
# their own scratch registers): r15 = region start, r14 = region end,
# esi = round.

        .text
        .globl  _start
_start:
        workload_region

# ---- phase 1: pagefill's pattern in 8 groups
        phase   1, "fill 8 groups"
        fill_groups COWSTORM_GROUPS

        mov     esi, 1                  # round r
.Lround:
# ---- phase 2r: every page merges
        lea     ecx, [rsi + rsi]
        phase   ecx, "merge pass"
        dedup   DEDUP_PASS

# ---- phase 2r+1: word 1 of every page := pattern(g, 1) + r (stores only)
        lea     ecx, [rsi + rsi + 1]
        phase   ecx, "write every page"
        rewrite_word1 COWSTORM_GROUPS, rsi
        inc     esi
        cmp     esi, COWSTORM_ROUNDS
        jbe     .Lround

# ---- phase 10: checksum of every word
        phase   2*COWSTORM_ROUNDS+2, "checksum"
        report_checksum 8               # 2 io
        exit    0
