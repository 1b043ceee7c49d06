#!/usr/bin/env bash
# Convergence of the built-in deduplicator on the `converge` guest (all
# pages in 64 groups of identical content, one synchronous pass), for each
# view, policy and guest RAM size given; prints one line per run.
#   scripts/converge.sh [SIZES...]        default: 17M 65M 129M 257M
# The memslot view stops at 129M (KVM's memslot limit with every page its
# own slot is near 128 MiB); 257M = 255 MiB of pages, 65,280 pages.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-lab --quiet
sizes=("${@:-17M 65M 129M 257M}")
# shellcheck disable=SC2206
sizes=(${sizes[*]})
tmp=$(mktemp)
trap 'rm -f "$tmp"' EXIT
printf '%-8s %-8s %-12s %9s %9s %9s %8s %11s %9s %10s %12s\n' view mem policy pages pass_s cpu_s us/page view_s meta_B/pg MiB_back read_us/pg
for view in uffd memslot; do
    for mem in "${sizes[@]}"; do
        if [ "$view" = memslot ] && [ "${mem%M}" -gt 129 ] 2>/dev/null; then continue; fi
        for policy in change-pte range-flush; do
            target/release/vmm run converge --mem "$mem" --view "$view" --dedup "$policy" --no-table \
                --stats-json "$tmp" >/dev/null
            python3 - "$tmp" "$view" "$mem" "$policy" <<'PY'
import json, sys
d = json.load(open(sys.argv[1])); view, mem, policy = sys.argv[2:5]
p2, p3 = d["phases"][2], d["phases"][3]
k, s = p2["ksm"], p2["shadow_mmu"]
pages = k["rmap_items"]
reads = p3["exits"]["ept_read"]
print("%-8s %-8s %-12s %9d %9.3f %9.3f %8.2f %11.3f %9.1f %10d %12.1f" % (
    view, mem, policy, pages, p2["wall_ns"] / 1e9, k["cpu_ns"] / 1e9,
    k["cpu_ns"] / max(1, k["pages_scanned"]) / 1e3, s.get("view_ns", 0) / 1e9,
    k["metadata_bytes"] / max(1, pages), k["bytes_returned"] >> 20,
    p3["wall_ns"] / max(1, pages) / 1e3))
PY
        done
    done
done
