# mixed: the read-mostly workload. After one synchronous pass has merged
# every page, 16 phases each read word 0 of every page and write back to
# every 8th page (word 0 + 1), a different eighth each phase; every phase
# then spins a fixed number of iterations, so the run lasts long enough for
# ksmd to be switched on or off from outside while it runs (`vmm ctl`). The
# Rust model of its reports is guest_images::mixed_expected_reports.
#
# Region: [2 MiB, RDI rounded down to a page); N = its size / 4096 pages
# (N = 0 if RAM <= 2 MiB). Page i (counting from 2 MiB) is in group
# g = i % 8 and starts with pagefill's pattern(g, w) in its word w.
#
#   phase 1:         fill every page with pattern(g, w) (fill_groups 8)
#   phase 2:         dedup 1 (one synchronous full pass: 8 KSM pages)
#   phase 3 + j,     j = 0 .. 15: for every page i in order: load word 0,
#                    add it to the read sum; if i % 8 == j % 8, store the
#                    loaded value + 1 back into word 0 (a load, then a
#                    store, to the same word). Then spin MIXED_SPIN
#                    iterations (no memory access, no exit).
#   phase 19:        report the read sum (low 32, high 32); sum every word
#                    of every page, report it (2 reports); exit 0
#
# The pages written in phase 3 + j are exactly group j % 8 (8 groups, every
# 8th page), and every page of it gets the same value, so groups stay
# groups of identical pages: ksmd, if switched on from outside, merges them
# again. Each page is written twice: in phases 3 + j and 11 + j.
#
# Exits: 19 phase + 19 name + 1 dedup + 4 report + 1 exit = 44 io, whatever N is and
# whatever the policy. With deduplication on (and ksmd left off), after the
# pass every page maps a KSM page read-only:
#   phase 3:         change-pte: the entries are read-only in place, so the
#                    loads do not fault; the N/8 stores do (copy-on-write,
#                    ept_write). range-flush, legacy: the pass zapped every
#                    entry, so each of the N loads faults (ept_read) and
#                    installs a read-only entry, then each of the N/8 stores
#                    faults again (ept_write).
#   phases 4 .. 10:  the N/8 stores of group j (still merged) fault
#                    (ept_write), every policy; the loads find entries.
#   phases 11 .. 19: no fault: every page is private and writable.
# If ksmd runs meanwhile (switched on from outside), it merges pages again
# and later phases fault again: how many depends on its timing.
        .include "abi.inc"
        .include "workload.inc"

        .set    MIXED_GROUPS, 8                 # a power of two
        .set    MIXED_STRIDE, 8                 # a power of two
        .set    MIXED_PHASES, 16
        .set    MIXED_SPIN,   0x10000000        # spin iterations per phase (2^28)

# Registers kept across the program (the macros clobber rax, rdx):
#   r15 = region start, r14 = region end, rbp = read sum, esi = j;
#   loops use rbx (pointer), rcx (page index), edi (class written), r8, r9.

        .text
        .globl  _start
_start:
        workload_region

# ---- phase 1: pagefill's pattern in 8 groups
        phase   1, "fill 8 groups"
        fill_groups MIXED_GROUPS

# ---- phase 2: every page merges
        phase   2, "merge pass"
        dedup   DEDUP_PASS

        xor     ebp, ebp                # read sum
        xor     esi, esi                # j
.Lphase:
# ---- phase 3 + j: read every page, write every 8th
        lea     ecx, [rsi + 3]
        phase   ecx, "read every page, write every 8th"
        mov     edi, esi
        and     edi, MIXED_STRIDE - 1   # the class written in this phase
        mov     rbx, r15
        xor     ecx, ecx
.Lpage:
        cmp     rbx, r14
        jae     .Lpages_done
        mov     rax, [rbx]              # load word 0
        add     rbp, rax
        mov     r8, rcx
        and     r8, MIXED_STRIDE - 1
        cmp     r8, rdi
        jne     .Lnext
        inc     rax
        mov     [rbx], rax              # store word 0 + 1
.Lnext:
        add     rbx, PAGE_SIZE
        inc     rcx
        jmp     .Lpage
.Lpages_done:
        mov     r9d, MIXED_SPIN
.Lspin:
        dec     r9d
        jnz     .Lspin
        inc     esi
        cmp     esi, MIXED_PHASES
        jb      .Lphase

# ---- phase 19: the read sum, then a checksum of every word
        phase   MIXED_PHASES+3, "checksums"
        report64 rbp                    # 2 io
        report_checksum 8               # 2 io
        exit    0
