#!/usr/bin/env bash
# The checks every change must pass besides the tests: formatting, clippy
# with warnings as errors, and documentation that builds without warnings.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
RUSTDOCFLAGS="-D warnings" cargo doc --workspace --no-deps --quiet
