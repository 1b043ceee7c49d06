# access: reads of every size, a read and a write that cross a page
# boundary, and a call into code on another page, for a VMM that zapped
# those pages before phase 3 (a test hook, or a range-flush merge): every
# access then goes through a secondary-MMU fault and must see the right
# bytes. Reports (guest_images::ACCESS_EXPECTED_REPORTS):
#   byte [A+5], word [A+0x101], dword [A+0x203], qword [A+0xFFC] (two
#   reports), the qword written across A|B and read back (two reports),
#   the value the code on page C returns (42).
#
# Pages: A = 2 MiB, B = A + 4 KiB, C = A + 8 KiB. Byte at address X of A
# and B holds (X - A) & 0xFF. C holds `mov eax, 42; ret`.
        .include "abi.inc"

        .set    PAGE_A, WORKLOAD_REGION_START
        .set    PAGE_B, PAGE_A + PAGE_SIZE
        .set    PAGE_C, PAGE_A + 2 * PAGE_SIZE
        .set    PAGE_D, PAGE_A + 3 * PAGE_SIZE
        .set    PAGE_E, PAGE_A + 4 * PAGE_SIZE

        .text
        .globl  _start
_start:
        phase   1, "fill pages A to E"
        # A and B: the byte at X is (X - A) & 0xFF
        mov     rbx, PAGE_A
        xor     ecx, ecx
.Lfill:
        mov     [rbx + rcx], cl
        inc     rcx
        cmp     rcx, 2 * PAGE_SIZE
        jb      .Lfill
        # D and E: the byte at Y is Y & 0xFF
        mov     rbx, PAGE_D
        xor     ecx, ecx
.Lfill_de:
        mov     [rbx + rcx], cl
        mov     [rbx + rcx + PAGE_SIZE], cl
        inc     rcx
        cmp     rcx, PAGE_SIZE
        jb      .Lfill_de
        # C: mov eax, 42 (b8 2a 00 00 00); ret (c3)
        mov     rbx, PAGE_C
        mov     dword ptr [rbx], 0x00002ab8
        mov     word ptr [rbx + 4], 0xc300

        phase   2, "merge pass"
        dedup   DEDUP_PASS

        phase   3, "accesses of every kind"
        mov     rbx, PAGE_A
        movzx   ecx, byte ptr [rbx + 5]
        report  rcx
        movzx   ecx, word ptr [rbx + 0x101]
        report  rcx
        mov     ecx, dword ptr [rbx + 0x203]
        report  rcx
        mov     rcx, qword ptr [rbx + 0xffc]
        report64 rcx
        movabs  rcx, 0x1122334455667788
        mov     qword ptr [rbx + 0xffe], rcx
        mov     rcx, qword ptr [rbx + 0xffe]
        report64 rcx
        mov     rcx, PAGE_C
        call    rcx
        report  rax
        # SSE, each the first access to its page: KVM's emulator performs
        # it when the page is a hole or read-only (CR4.OSFXSR is set).
        mov     rbx, PAGE_D
        movdqu  xmm0, [rbx + 0x10]
        movq    rcx, xmm0
        report64 rcx
        psrldq  xmm0, 8
        movq    rcx, xmm0
        report64 rcx
        movabs  rcx, 0x0123456789abcdef
        movq    xmm1, rcx
        movabs  rcx, 0xfedcba9876543210
        movq    xmm2, rcx
        punpcklqdq xmm1, xmm2
        mov     rbx, PAGE_E
        movdqu  [rbx + 0x28], xmm1
        mov     rcx, qword ptr [rbx + 0x28]
        report64 rcx
        mov     rcx, qword ptr [rbx + 0x30]
        report64 rcx
        exit    0
