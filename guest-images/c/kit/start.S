/* start.S - the entry point of a C guest (tiny-guest ABI 1.1).
 *
 * The VMM enters here at CPL 3 with RDI = guest RAM in bytes, RSI = the
 * guest's index in its fleet and RDX = the fleet's size (1.1), and RSP at
 * the top of its stack. Those are main's three arguments in the System V
 * calling convention already, so nothing is set up: RSP is only rounded
 * down to 16 bytes, as the convention wants it at a call (the VMM's is
 * aligned; the ABI does not promise it). main's return value is the exit
 * code. The .bss needs no clearing: the VMM zeroes every PT_LOAD past its
 * file size. ksmlab.ld puts this section first, at KSMLAB_GUEST_BASE.
 */
#include "ksmlab-abi.h"

        .section .text.start, "ax", @progbits
        .globl  _start
        .type   _start, @function
_start:
        andq    $-16, %rsp
        call    main
        movl    $KSMLAB_PORT_EXIT, %edx
        outl    %eax, %dx               /* exit(main's return value) */
1:      ud2                             /* never resumed: a triple fault if it were */
        jmp     1b
        .size   _start, . - _start

        .section .note.GNU-stack, "", @progbits
