#!/usr/bin/env bash
# Regenerates the README's results section (tables and charts) from scratch on
# this machine: the benchmarks (exit floor, secondary-MMU fault, scan and merge
# cost and convergence against Linux KSM) and `vmm compare` on each workload.
# Every figure is JSON in docs/results/ (bench reports, and per workload and
# view the comparison's summary.json with its table.txt and compare.svg);
# `vmm report` then renders the README section between its results markers
# and one chart per workload with both views (docs/results/WORKLOAD.svg).
#   scripts/results.sh            (about 25 minutes; the kernel policy needs root)
#   REPEAT=5 MEM=32M scripts/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-lab --quiet
vmm=target/release/vmm
out=docs/results
repeat=${REPEAT:-3}
mem=${MEM:-16M}
rm -rf "$out"
mkdir -p "$out"

echo "== exit floor" >&2
"$vmm" bench floor > "$out/floor.json"
for view in memslot uffd; do
    echo "== secondary-MMU fault, $view view" >&2
    "$vmm" bench fault --view "$view" --mem 64M > "$out/fault-$view.json"
done
echo "== scan, merge and convergence against Linux KSM" >&2
"$vmm" bench dedup --mem 257M --view uffd --repeat "$repeat" > "$out/dedup.json"

for workload in pagefill cowstorm mixed volatile dirtylog; do
    for view in memslot uffd; do
        # The kernel policy has no view of ours: it runs with the memslot set.
        policies=off,change-pte,range-flush,legacy,event-aware
        [ "$view" = memslot ] && policies=$policies,kernel
        echo "== compare $workload, $view view" >&2
        dir="$out/$workload-$view"
        # Status 1 (a run failed or checksums differ) is reported in the section.
        # The table goes in after the comparison: --out must be new or its own.
        "$vmm" compare "$workload" --mem "$mem" --repeat "$repeat" --view "$view" --policies "$policies" \
            --out "$dir" > "$out/table.txt" || [ $? -eq 1 ]
        mv "$out/table.txt" "$dir/table.txt"
        # compare.json and runs/ (every run, raw) stay local; summary.json,
        # table.txt and compare.svg are committed.
        rm -rf "$dir/runs"
    done
done

# Fleets (--guests N): every guest of one image, one deduplicator, the
# kernel policy over the same fleet.
for fleet in "kvstore 4" "template 8"; do
    set -- $fleet
    echo "== compare $1 x $2 guests, uffd view" >&2
    dir="$out/$1-x$2-uffd"
    "$vmm" compare "$1" --guests "$2" --mem "$mem" --repeat "$repeat" --view uffd \
        --policies off,change-pte,range-flush,legacy,event-aware,kernel --out "$dir" > "$out/table.txt" || [ $? -eq 1 ]
    mv "$out/table.txt" "$dir/table.txt"
    rm -rf "$dir/runs"
done

"$vmm" report "$out" --readme README.md
echo "results.sh: README.md's results section and $out/ are up to date" >&2
