# misbehave-beyond-ram: touch guest-physical memory just past RAM and an
# unknown port; the VMM must count each access and answer reads with all-ones.
#
#   1. read the 64-bit word at gpa RDI (RAM size: the first byte past RAM)
#      and report it, low half then high half (expected 0xffffffff twice);
#   2. write the 64-bit value 0x1234 to gpa RDI + 8 (counted and dropped);
#   3. read 32 bits from the unknown port 0x80 and report it (0xffffffff);
#   4. exit with code 0.
#
# Exits: 2 mmio (the read, the write) + 1 io (in from 0x80)
#        + 3 io (reports) + 1 io (exit) = 2 mmio + 5 io.
# Reports: [0xffffffff, 0xffffffff, 0xffffffff].
        .include "abi.inc"

        .text
        .globl  _start
_start:
        mov     rbx, rdi                # gpa just past RAM (identity map)
        mov     rcx, [rbx]              # mmio read, 8 bytes
        report64 rcx                    # 2 io
        mov     qword ptr [rbx + 8], 0x1234   # mmio write, 8 bytes
        mov     edx, 0x80
        in      eax, dx                 # io read, 4 bytes
        report  rax                     # 1 io
        exit    0
