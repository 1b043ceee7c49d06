# misbehave-phase-flood: writes phase markers 1, 2, 3, ... to port 0x500 and
# never stops. Each phase keeps its own figures in the VMM, so the VMM ends
# the run once the guest starts more phases than it keeps (vmm::vcpu::
# MAX_PHASES, 4,096): the run ends as `guest_limit` with that many phases,
# one io exit each.
        .include "abi.inc"

        .text
        .globl  _start
_start:
        mov     ecx, 1
1:      mov     eax, ecx
        mov     edx, PORT_PHASE
        out     dx, eax         # one io exit
        inc     ecx
        jmp     1b
