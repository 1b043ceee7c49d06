# misbehave-exit-code: end the run at once with exit code 3.
# Exits: 1 io (the exit port). The VMM's own exit status must be non-zero.
        .include "abi.inc"

        .text
        .globl  _start
_start:
        exit    3
