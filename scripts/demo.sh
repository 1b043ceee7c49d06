#!/usr/bin/env bash
# The main job: builds the VMM and runs the built-in `pagefill` guest once per
# deduplication policy (off, change-pte, range-flush, legacy), printing each
# run's per-phase table of VM exits, so the policies can be read side by
# side. Extra arguments go to every `vmm run` (e.g. --view uffd, --mem 64M).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm --quiet
for policy in off change-pte range-flush legacy; do
    echo "=================== pagefill, --dedup $policy ==================="
    target/release/vmm run pagefill --mem 16M --dedup "$policy" "$@"
done
