# stress: writes pseudo-random pages without pause while ksmd merges them,
# then reports a checksum of all of them. The writes are deterministic (a
# fixed LCG, a fixed count), so the checksum is the same under every
# deduplication policy, and equal to guest_images::stress_expected_reports.
#
# Region: [2 MiB, RDI rounded down to a page), N pages. Page i starts as
# group g = i % 4 of pagefill's pattern (pattern(g, w)). Then:
#
#   phase 1: fill the pages
#            dedup 1 (a synchronous pass: the groups start merged)
#            dedup 2 (start the background scanner)
#   phase 2: STRESS_ITERATIONS times: x = x * 6364136223846793005 +
#            1442695040888963407; page = (x >> 33) % N; store x >> 62
#            (0..3) into word 0 of that page; spin STRESS_DELAY loop
#            iterations (so that ksmd runs while the guest writes)
#            dedup 3 (stop the background scanner)
#   phase 3: sum every word of every page; report it (low 32, high 32); exit 0
#
# Pages stay in at most 16 content classes (4 groups x 4 word-0 values),
# so ksmd keeps merging pages that the guest keeps writing: every write to a
# merged page is a copy-on-write fault. Exits: 3 phase + 3 name + 3 dedup + 2 report
# + 1 exit = 12 io, plus whatever the policy causes (not deterministic: it
# depends on ksmd's timing).
        .include "abi.inc"
        .include "workload.inc"

        .set    STRESS_GROUPS,     4            # a power of two
        .set    STRESS_ITERATIONS, 100000
        .set    STRESS_DELAY,      1024

        .text
        .globl  _start
_start:
        workload_region
        mov     r13, r14
        sub     r13, r15
        shr     r13, 12                 # r13 = N

# ---- phase 1: pagefill's pattern in 4 groups
        phase   1, "fill 4 groups, merge pass, ksmd on"
        fill_groups STRESS_GROUPS
        dedup   DEDUP_PASS
        dedup   DEDUP_START

# ---- phase 2: pseudo-random writes, with ksmd running
        phase   2, "random writes under ksmd"
        test    r13, r13
        jz      .Lwrites_done
        movabs  rbx, 0x2545F4914F6CDD1D # x
        mov     ecx, STRESS_ITERATIONS
.Lwrite:
        movabs  rax, 6364136223846793005
        imul    rbx, rax
        movabs  rax, 1442695040888963407
        add     rbx, rax
        mov     rax, rbx
        shr     rax, 33
        xor     edx, edx
        div     r13                     # rdx = page index
        mov     r8, rbx
        shr     r8, 62                  # value 0..3
        shl     rdx, 12
        add     rdx, r15
        mov     [rdx], r8
        mov     r9d, STRESS_DELAY
.Ldelay:
        dec     r9d
        jnz     .Ldelay
        dec     ecx
        jnz     .Lwrite
.Lwrites_done:
        dedup   DEDUP_STOP

# ---- phase 3: checksum of every word
        phase   3, "checksum"
        report_checksum 8
        exit    0
