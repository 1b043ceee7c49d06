# misbehave-beyond-map: accesses that straddle the end of RAM, and the end
# of the identity map.
#
# The VMM maps guest-physical memory one to one from 0 to at least 4 GiB
# (and 1 GiB past RAM; vmm's x86 layout), so that the guest reaches
# addresses past RAM as MMIO, answered with all-ones (guest-abi.md). With
# RAM of 3 GiB or less the map ends at 4 GiB: an address there is a page
# fault, and with no IDT a triple fault.
#
#   phase 1 "straddle the end of RAM": write the qword 0x1122334455667788
#       at RAM - 4 (its low half lands in RAM, the high half past RAM is
#       dropped: 1 mmio), read it back (the low half from RAM, the high
#       half all-ones: 1 mmio) and report it (0x55667788, 0xffffffff);
#   phase 2 "end of the identity map": read the qword at 4 GiB - 8 (1 mmio,
#       all-ones), report it; read the qword at 4 GiB: #PF, triple fault at
#       RIP 0x100000.
#
# Exits: phase 0: 1 io (the marker); phase 1: 4 io (name, 2 reports,
# marker) and 2 mmio; phase 2: 3 io (name, 2 reports) and 1 mmio; then one
# shutdown (triple fault) at 0x100000.
        .include "abi.inc"

        .set    FOUR_GIB, 0x100000000

        .text
        .globl  fault_rip
fault_rip:
        mov     rcx, [rbx]              # at 0x100000: 4 GiB, unmapped: #PF
        report64 rcx                    # never reached
        exit    0

        .globl  _start
_start:
        phase   1, "straddle the end of RAM"
        movabs  rax, 0x1122334455667788
        mov     [rdi - 4], rax          # half RAM, half MMIO
        mov     rcx, [rdi - 4]
        report64 rcx

        phase   2, "end of the identity map"
        movabs  rbx, FOUR_GIB - 8
        mov     rcx, [rbx]              # MMIO: all-ones
        report64 rcx
        movabs  rbx, FOUR_GIB
        jmp     fault_rip
