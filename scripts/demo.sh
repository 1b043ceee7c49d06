#!/usr/bin/env bash
# The main job: builds the VMM and runs the built-in `pagefill` guest, which
# prints its per-phase table of VM exits. Extra arguments go to `vmm run`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --release -p vmm --quiet
exec target/release/vmm run pagefill --mem 64M "$@"
