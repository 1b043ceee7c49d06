#!/usr/bin/env bash
# Checks (and where it can, installs) what building and running the lab needs:
# a Rust toolchain, GNU binutils for the guest images, and a usable /dev/kvm.
set -euo pipefail

if ! command -v cargo >/dev/null 2>&1; then
    echo "setup: cargo is missing: install a Rust toolchain (https://rustup.rs), then run this again" >&2
    exit 1
fi
if ! command -v as >/dev/null 2>&1 || ! command -v ld >/dev/null 2>&1; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
        echo "setup: installing binutils (as, ld) for the guest images" >&2
        apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq binutils >/dev/null
    else
        echo "setup: GNU binutils (as, ld) are missing: install the binutils package, then run this again" >&2
        exit 1
    fi
fi
if [ ! -r /dev/kvm ] || [ ! -w /dev/kvm ]; then
    echo "setup: warning: /dev/kvm is missing or not read-writable for $(id -un): guests cannot run" >&2
    echo "setup: (run as root, or add the user to the kvm group); scripts/test.sh will not run the KVM tests outside CI" >&2
fi
