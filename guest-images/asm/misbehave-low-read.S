# misbehave-low-read: the guest's stack is the only page of the low megabyte
# it can reach (guest-abi.md); a read anywhere else there is a page fault
# (the VMM's page tables map the low megabyte supervisor-only), and with no
# IDT a triple fault. That is by design: the low megabyte holds the VMM's
# GDT, TSS and page tables.
#
#   1. write a word to the stack and read it back: report it (0x57AC);
#   2. read the qword at guest-physical 0x3000 (the PML4): #PF, triple
#      fault at RIP 0x100000 (the read is the first instruction of .text).
#
# Exits: 1 io (the report), then one shutdown (triple fault) at 0x100000.
        .include "abi.inc"

        .text
        .globl  fault_rip
fault_rip:
        mov     rax, [0x3000]           # at 0x100000: #PF, a triple fault
        report  rax                     # never reached

        .globl  _start
_start:
        push    0x57AC                  # the stack, in the low megabyte, is the guest's
        pop     rbx
        report  rbx                     # 1 io
        jmp     fault_rip
