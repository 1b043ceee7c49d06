# unique: every page of [2 MiB, RDI) different from every other (each word
# holds its own guest-physical address), so a deduplication pass scans every
# page and merges none: the scan cost of a deduplicator with nothing to gain
# (`vmm bench dedup` divides its CPU time by the pages scanned).
#
#   phase 1: word at address a = a, for every word of the region
#   phase 2: dedup 1 (one synchronous full pass: nothing merges)
#   phase 3: sum word 0 of every page; report it (low 32, high 32); exit 0
#
# Exits under every policy: 3 phase + 3 name + 1 dedup + 2 report + 1 exit = 10 io,
# and no secondary-MMU fault (nothing is merged, so nothing is zapped or
# write-protected).
        .include "abi.inc"
        .include "workload.inc"

        .text
        .globl  _start
_start:
        workload_region

        phase   1, "fill unique pages"
        mov     rbx, r15
.Lfill:
        cmp     rbx, r14
        jae     .Lfill_done
        mov     [rbx], rbx
        add     rbx, 8
        jmp     .Lfill
.Lfill_done:

        phase   2, "merge pass"
        dedup   DEDUP_PASS

        phase   3, "read word 0"
        report_checksum PAGE_SIZE
        exit    0
