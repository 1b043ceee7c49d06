# misbehave-port-end: port accesses at the end of the 64 KiB port space.
#
#   1. 8-bit `in` from port 0xFFFF: answered all-ones; report it (0xFF);
#   2. 16-bit `in` from port 0xFFFF, which reaches past the port space (to
#      port 0x10000), at RIP 0x100000. On the development machines' KVM
#      (PVM) it raises #GP although the guest runs with IOPL 3, and with no
#      IDT the run ends as a triple fault at 0x100000; where the CPU performs
#      it (IOPL 3 skips the I/O permission bitmap), it is one io exit
#      answered all-ones, reported (0xFFFF), and the guest exits with 0.
#
# Exits: 2 io, then a triple fault at 0x100000; or 4 io and exit 0.
        .include "abi.inc"

        .text
        .globl  fault_rip
fault_rip:
        in      ax, dx                  # at 0x100000: port 0xFFFF, 16 bits
        movzx   eax, ax
        report  rax
        exit    0

        .globl  _start
_start:
        mov     edx, 0xFFFF
        in      al, dx                  # 1 io: all-ones
        movzx   ebx, al
        report  rbx                     # 1 io
        mov     edx, 0xFFFF
        jmp     fault_rip
