# misbehave-spin: print "spinning\n", then loop forever without an exit.
# Used to test the VMM's --timeout. Exits: 9 io (one per byte), then none.
        .include "abi.inc"

        .text
        .globl  _start
_start:
        puts    msg
1:      jmp     1b              # no port access, no memory access

        .section .rodata
msg:    .asciz  "spinning\n"
