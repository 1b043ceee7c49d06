# hello: print a greeting on COM1 and exit with code 0.
# Exits: 24 io (one per byte) + 1 io (exit port) = 25 io, nothing else.
        .include "abi.inc"

        .text
        .globl  _start
_start:
        puts    msg             # 24 x `out 0x3f8, al`
        exit    0               # `out 0xf4, eax` with eax = 0

        .section .rodata
msg:    .asciz  "Hello from a tiny guest\n"
