# misbehave-low-write: a write into the VMM's low megabyte, here to the PML4
# the guest runs on (guest-physical 0x3000): it must not land. The page
# tables map the low megabyte supervisor-only except the stack, so the write
# is a page fault, and with no IDT a triple fault, before anything changes.
#
#   1. report the RAM size (RDI, low 32 bits): 1 io;
#   2. write 0 to the qword at 0x3000: #PF, triple fault at RIP 0x100000.
#
# Exits: 1 io, then one shutdown (triple fault) at 0x100000.
        .include "abi.inc"

        .text
        .globl  fault_rip
fault_rip:
        mov     qword ptr [0x3000], 0   # at 0x100000: #PF, a triple fault
        report  rdi                     # never reached

        .globl  _start
_start:
        report  rdi                     # 1 io
        jmp     fault_rip
