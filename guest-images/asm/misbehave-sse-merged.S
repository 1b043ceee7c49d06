# misbehave-sse-merged: SSE arithmetic with a memory operand on a merged
# page (what a compiler's vectorized loop does: paddq xmm, m128).
#
# Under the memslot view a page the secondary MMU zapped (range-flush and
# legacy zap every page a pass merges) is a hole, and the guest's first
# access to it is performed by KVM's instruction emulator, which has the
# SSE moves (movdqu: see `access`) but not SSE arithmetic on memory: the
# run ends with a KVM internal error (emulation failure) at the paddq. Under
# change-pte the pass keeps the entry (read-only, in place) and the CPU
# performs the load; under the uffd view no instruction is emulated. Dedup
# off: nothing is merged.
#
#   phase 1 "fill two identical pages": pages A (2 MiB) and B (A + 4 KiB),
#       word w = w + 1;
#   phase 2 "merge pass": dedup 1 (A and B merge);
#   phase 3 "sse arithmetic on a merged page": xmm0 := 0; paddq xmm0, [A +
#       16] (words 2 and 3: 3 and 4), at RIP 0x100000 (the first instruction
#       of .text); report both halves (3, 4); exit 0.
#
# Exits: 1 + 2 + 3 + 5 = 11 io, and where the emulator meets the paddq, one
# internal error at its RIP instead of the last 3.
        .include "abi.inc"

        .set    PAGE_A, WORKLOAD_REGION_START
        .set    PAGE_B, PAGE_A + PAGE_SIZE

        .text
        .globl  paddq_rip
paddq_rip:
        paddq   xmm0, [rbx + 16]        # at 0x100000: the first access to A since the pass
        jmp     .Lreport

        .globl  _start
_start:
        phase   1, "fill two identical pages"
        mov     rbx, PAGE_A
        xor     ecx, ecx
.Lfill:
        lea     rax, [rcx + 1]
        mov     [rbx + rcx * 8], rax
        mov     [rbx + rcx * 8 + PAGE_SIZE], rax
        inc     ecx
        cmp     ecx, PAGE_SIZE / 8
        jb      .Lfill

        phase   2, "merge pass"
        dedup   DEDUP_PASS

        phase   3, "sse arithmetic on a merged page"
        mov     rbx, PAGE_A
        pxor    xmm0, xmm0
        jmp     paddq_rip
.Lreport:
        movq    rcx, xmm0
        report  rcx
        psrldq  xmm0, 8
        movq    rcx, xmm0
        report  rcx
        exit    0
