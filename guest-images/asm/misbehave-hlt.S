# misbehave-hlt: execute HLT at once. The ABI says a HLT with interrupts
# disabled ends the run with exit code 0. At CPL 3 the CPU raises #GP on HLT
# instead of halting, so the VMM must recognise the HLT opcode (0xf4) at the
# faulting RIP (the entry point) and end the run as a halt, not a crash.
# Exits: no io, no mmio; one exit that the VMM reports as hlt.
        .include "abi.inc"

        .text
        .globl  _start
_start:
        hlt                     # RIP = e_entry; the run must end here
        jmp     _start          # never reached if the VMM honours the ABI
