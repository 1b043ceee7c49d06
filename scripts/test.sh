#!/usr/bin/env bash
# Runs every test of the workspace: unit tests (no KVM), property tests, and
# the integration tests in tests/ that boot guests on /dev/kvm.
#
# The tests that need /dev/kvm are #[ignore]d, so that a plain `cargo test`
# lists them as not run where KVM may be missing. This script runs them in a
# second pass, limited to the ignored tests, where /dev/kvm is usable, and
# always with CI set: there a missing /dev/kvm fails them instead of skipping.
#
# Arguments go to both passes: cargo's before a `--`, the test binaries'
# after it (scripts/test.sh -- compare runs the tests whose names hold
# "compare").
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

cargo_args=()
test_args=()
while (($#)); do
    if [ "$1" = -- ]; then
        shift
        test_args=("$@")
        break
    fi
    cargo_args+=("$1")
    shift
done

cargo test --workspace "${cargo_args[@]}" -- "${test_args[@]}"

if [ -r /dev/kvm ] && [ -w /dev/kvm ]; then
    cargo test --workspace --tests "${cargo_args[@]}" -- --ignored "${test_args[@]}"
elif [ -n "${CI:-}" ]; then
    echo "test.sh: CI is set but /dev/kvm is missing or not read-writable: the KVM tests run, and fail" >&2
    cargo test --workspace --tests "${cargo_args[@]}" -- --ignored "${test_args[@]}"
else
    echo "test.sh: the KVM tests were not run: /dev/kvm is missing or not read-writable for $(id -un) (they run where it is usable, and always with CI set)"
fi
