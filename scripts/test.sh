#!/usr/bin/env bash
# Runs every test of the workspace: unit tests (no KVM), property tests, and
# the integration tests in tests/ that boot guests on /dev/kvm. With CI set,
# a missing /dev/kvm fails the KVM tests instead of skipping them.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo test --workspace "$@"
