# converge: the convergence workload of host-facts.md: every page of
# [2 MiB, RDI) in 64 groups of identical, non-zero content; one synchronous
# deduplication pass; a checksum. Size it with --mem (257M gives 256 MiB of
# pages: 65,536 pages, 1,024 per group).
#
#   phase 1: page i, word w = pattern(i % 64, w) (pagefill's pattern)
#   phase 2: dedup 1 (one synchronous full pass); in a fleet (1.1) the
#            pass is the fleet's: every guest at a barrier, guest 0 asks
#            for it, every guest at a second barrier
#   phase 3: sum word 0 of every page; report it (low 32, high 32); exit 0
#
# Exits with dedup off: 3 phase + 3 name + 1 dedup + 2 report + 1 exit = 10 io (in
# a fleet, 2 barriers more for guest 0, 2 barriers and no dedup for the others); after
# the pass the reads of phase 3 cost what the policy makes them cost.
        .include "abi.inc"
        .include "workload.inc"

        .set    GROUPS,         64              # a power of two

        .text
        .globl  _start
_start:
        fleet_seat
        workload_region

        phase   1, "fill 64 groups"
        fill_groups GROUPS

        phase   2, "merge pass"
        fleet_pass

        phase   3, "read word 0"
        report_checksum PAGE_SIZE
        exit    0
