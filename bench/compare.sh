#!/usr/bin/env bash
# Benchmark blkstack against qemu-storage-daemon and cloud-hypervisor's
# vhost_user_block; writes bench/report.md and bench/report.svg.
#   bash bench/compare.sh            full run (3 rounds, ~25 min on 2 cores)
#   bash bench/compare.sh --quick    1 round, 2 s per run, main workloads
# Any other option goes to `blkstack bench compare` (see --help).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --from "* ]]; then
    cargo build --release --locked --bin blkstack >&2
fi
exec target/release/blkstack bench compare "$@"
