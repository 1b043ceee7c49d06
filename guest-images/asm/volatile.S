# volatile: pages that never settle, the scanner's cost when there is
# nothing to gain. ksmd scans while the guest rewrites every page again and
# again with content that changes every sweep; no two pages are ever
# identical, so nothing can merge. The Rust model of its reports is
# guest_images::volatile_expected_reports.
#
# Region: [2 MiB, RDI rounded down to a page); N = its size / 4096 pages
# (N = 0 if RAM <= 2 MiB). key(s) = (s + 1) * 0x9E3779B97F4A7C15 (wrapping).
# Sweep s writes, in every page at address A, word w = 1 .. 511 (at address
# A + 8w) := (A + 8w) ^ key(s); sweep 0 also writes word 0 := A.
#
#   phase 1: sweep 0 (every page gets its own address in word 0, which no
#            later sweep rewrites); dedup 2 (start the background scanner)
#   phase 2: sweeps 1 .. VOLATILE_SWEEPS, back to back; dedup 3 (stop it)
#   phase 3: sum every word of every page; report it (low 32, high 32);
#            exit 0
#
# Word 0 is the page's own address from before ksmd starts until the end,
# so any two pages differ at every instant, even a page ksmd reads while the
# guest is half-way through rewriting it: no stable or unstable tree search
# ever finds an equal page, no page is ever write-protected, so the
# secondary MMU is never notified and the guest never faults. Exits: 3
# phase + 3 name + 2 dedup + 2 report + 1 exit = 11 io and nothing else, under every
# policy and view, whatever ksmd's timing. What ksmd does meanwhile (pages
# scanned, checksums that changed, CPU time) depends on its timing.
        .include "abi.inc"
        .include "workload.inc"

        .set    VOLATILE_SWEEPS, 4096

# Registers kept across the program (the macros clobber rax, rdx):
#   r15 = region start, r14 = region end, r13 = key multiplier,
#   r12 = key(s), esi = sweeps left; sweeps use rbx (page), rdi (word
#   address), r8 (value), rbp (checksum).

        .text
        .globl  _start
_start:
        workload_region
        movabs  r13, 0x9E3779B97F4A7C15

# ---- phase 1: sweep 0 (word 0 := the page's address), then start ksmd
        phase   1, "first sweep, start ksmd"
        mov     rbx, r15
.Lstamp:
        cmp     rbx, r14
        jae     .Lstamp_done
        mov     [rbx], rbx
        add     rbx, PAGE_SIZE
        jmp     .Lstamp
.Lstamp_done:
        mov     r12, r13                # key(0)
        call    sweep
        dedup   DEDUP_START

# ---- phase 2: sweeps 1 .. VOLATILE_SWEEPS while ksmd scans
        phase   2, "4096 sweeps under ksmd"
        mov     esi, VOLATILE_SWEEPS
.Lsweeps:
        add     r12, r13                # key(s) = key(s - 1) + multiplier
        call    sweep
        dec     esi
        jnz     .Lsweeps
        dedup   DEDUP_STOP

# ---- phase 3: checksum of every word
        phase   3, "checksum"
        report_checksum 8               # 2 io
        exit    0

# sweep: words 1 .. 511 of every page of [r15, r14) := their address ^ r12.
# Clobbers rbx, rdi, r8.
sweep:
        mov     rbx, r15
.Lsweep_page:
        cmp     rbx, r14
        jae     .Lsweep_done
        lea     rdi, [rbx + 8]
        add     rbx, PAGE_SIZE
.Lsweep_word:
        mov     r8, rdi
        xor     r8, r12
        mov     [rdi], r8
        add     rdi, 8
        cmp     rdi, rbx
        jb      .Lsweep_word
        jmp     .Lsweep_page
.Lsweep_done:
        ret
