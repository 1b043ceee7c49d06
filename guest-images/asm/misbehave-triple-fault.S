# misbehave-triple-fault: print "about to fault\n", then execute ud2. With no
# IDT the #UD becomes a triple fault; the VMM must report it with the guest
# RIP of the ud2, which is the first byte of .text: 0x100000 (link.ld puts
# .text first at 1 MiB, and the ud2 is the first instruction in this file).
# Exits: 15 io (one per byte), then one shutdown (triple fault) at RIP
# 0x100000.
        .include "abi.inc"

        .text
        .globl  fault_rip
fault_rip:
        ud2                     # at 0x100000: the triple fault's RIP

        .globl  _start
_start:
        puts    msg
        jmp     fault_rip

        .section .rodata
msg:    .asciz  "about to fault\n"
