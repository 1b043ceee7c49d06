#!/usr/bin/env bash
# Regenerates the README's results section (tables and charts) from scratch on
# this machine: the benchmarks (exit floor, secondary-MMU fault, scan and merge
# cost and convergence against Linux KSM) and `vmm compare` on each workload.
# Charts and compare.json files go to docs/results/; the README section
# between its results markers is rewritten by scripts/results.py.
#   scripts/results.sh            (about 15 minutes; the kernel policy needs root)
#   REPEAT=5 MEM=32M scripts/results.sh
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
command -v python3 >/dev/null || { echo "results.sh: python3 is needed to write the README section" >&2; exit 2; }
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

for workload in pagefill cowstorm mixed volatile; do
    for view in memslot uffd; do
        # The kernel policy has no view of ours: it runs with the memslot set.
        policies=off,change-pte,range-flush,legacy
        [ "$view" = memslot ] && policies=$policies,kernel
        echo "== compare $workload, $view view" >&2
        dir="$out/$workload-$view"
        mkdir -p "$dir"
        # Status 1 (a run failed or checksums differ) is reported in the section.
        "$vmm" compare "$workload" --mem "$mem" --repeat "$repeat" --view "$view" --policies "$policies" \
            --out "$dir" > "$dir/table.txt" || [ $? -eq 1 ]
        # compare.json (every run, raw) stays local; table.txt and compare.svg are committed.
        rm -rf "$dir/runs"
    done
done

python3 scripts/results.py "$out" README.md
echo "results.sh: README.md's results section and $out/ are up to date" >&2
