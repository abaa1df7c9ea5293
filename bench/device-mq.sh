#!/usr/bin/env bash
# Multi-queue scaling (issue 12's last target: 4k randread QD32 with 8 queues
# >= 90 % of 8x one queue) on a machine with 16 or more CPUs, such as the
# 16-core machine the `device` tool lends to some sessions. Build here first
# (`cargo build --release`), then run it there with the binaries carried:
#
#   run(command="bash bench/device-mq.sh",
#       carry=["target/release/blkstack", "target/release/blkstack-bench"],
#       timeout_s=480)
#
# It runs blkstack alone (the target compares blkstack with itself) on a
# 4 GiB page-cached image: rr32 (one queue), mq2, mq4 and mq8, alternating,
# and writes the report (with the machine named in it) and the raw results
# under $OUT (the device tool brings that folder back), or bench/out/mq.
# ROUNDS and SECS override the rounds (default 2) and seconds per run
# (default 5). On fewer than 16 CPUs the runs still happen (a 2-CPU check
# took 2 minutes), but client and backend threads then share CPUs and the
# figures say nothing about scaling.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-bench/out/mq}"
mkdir -p "$out"
for b in target/release/blkstack target/release/blkstack-bench; do
    [ -x "$b" ] || { echo "device-mq: $b missing: build with 'cargo build --release' (and carry it)" >&2; exit 2; }
done
echo "device-mq: $(nproc) CPUs, $(uname -r), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2- | sed 's/^ *//')"
# The 4 GiB image stays out of $OUT: the device tool copies back what is there.
img="${TMPDIR:-/tmp}/blkstack-mq.img"
trap 'rm -f "$img"' EXIT
target/release/blkstack bench compare --only rr32,mq2,mq4,mq8 --backends blkstack \
    --rounds "${ROUNDS:-2}" --seconds "${SECS:-5}" --no-profile \
    --image "$img" --out "$out" --report "$out/report-mq.md" --svg "$out/report-mq.svg"
