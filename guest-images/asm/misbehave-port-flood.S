# misbehave-port-flood: write a byte to the unknown port 0x80 100,000 times,
# then exit with code 0. The VMM must count and drop every write.
# Exits: 100,000 io (port 0x80) + 1 io (exit port) = 100,001 io.
        .include "abi.inc"

        .set    FLOOD_PORT,  0x80
        .set    FLOOD_COUNT, 100000

        .text
        .globl  _start
_start:
        mov     ecx, FLOOD_COUNT
        xor     eax, eax
1:      out     FLOOD_PORT, al  # one io exit
        dec     ecx
        jnz     1b
        exit    0
