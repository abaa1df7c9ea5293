#!/usr/bin/env bash
# Benchmark blkstack against qemu-storage-daemon and cloud-hypervisor's
# vhost_user_block; writes bench/report.md and bench/report.svg.
#   bash bench/compare.sh            full run (3 rounds, ~25 min on 2 cores)
#   bash bench/compare.sh --quick    1 round, 2 s per run, main workloads
# Any other option goes to `blkstack bench compare` (see --help).
#
# GUEST_HALT_POLL_NS=N (root, a KVM guest with the haltpoll cpuidle driver)
# sets haltpoll's guest_halt_poll_ns to N for the comparison and puts the old
# value back afterwards, however the comparison ends: how long an idle vCPU
# polls before it halts decides what every cross-CPU wake-up costs (the report
# names the setting it ran under and the CPU the idle loops spent polling).
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ " $* " != *" --from "* ]]; then
    cargo build --release --locked --bin blkstack >&2
fi
if [[ -n "${GUEST_HALT_POLL_NS:-}" ]]; then
    knob=/sys/module/haltpoll/parameters/guest_halt_poll_ns
    if [[ ! "$GUEST_HALT_POLL_NS" =~ ^[0-9]+$ ]]; then
        echo "compare.sh: GUEST_HALT_POLL_NS must be a number of nanoseconds, not '$GUEST_HALT_POLL_NS'" >&2
        exit 2
    fi
    if [[ ! -w "$knob" ]]; then
        echo "compare.sh: GUEST_HALT_POLL_NS needs $knob writable (root, haltpoll cpuidle driver)" >&2
        exit 2
    fi
    old=$(cat "$knob")
    trap 'echo "$old" > "$knob"; echo "compare.sh: guest_halt_poll_ns back to $old" >&2' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    echo "$GUEST_HALT_POLL_NS" > "$knob"
    export BLKSTACK_HALT_POLL_WAS="$old"
    echo "compare.sh: guest_halt_poll_ns $old -> $GUEST_HALT_POLL_NS for this comparison" >&2
    target/release/blkstack bench compare "$@"
    exit
fi
exec target/release/blkstack bench compare "$@"
