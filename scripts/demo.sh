#!/usr/bin/env bash
# The main job: builds the VMM and compares the built-in `pagefill` guest
# across every deduplication policy (off, change-pte, range-flush, legacy,
# and kernel: the host's own KSM, which needs root and is skipped with the
# reason otherwise), three interleaved runs each. Prints the per-phase
# side-by-side table and writes demo-out/compare.json and demo-out/compare.svg.
# Extra arguments go to `vmm compare` (e.g. --view uffd, --mem 64M, --repeat 5).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm-lab --quiet
exec target/release/vmm compare pagefill --mem 16M --repeat 3 --out demo-out "$@"
