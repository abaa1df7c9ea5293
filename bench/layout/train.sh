#!/bin/bash
# Regenerate bench/layout/blkstack.order: the functions of the release
# daemon that run when it serves, in the order they first run.
#
# build.rs hands that list to the linker (lld --symbol-ordering-file), which
# puts those functions together at the start of the code, and everything
# that a serving daemon never runs (help text, error paths, QMP commands it
# is not sent, backtrace symbolisation) after them. The kernel maps a
# program's code in 64 KiB windows around each page it runs, so with the
# functions spread over the whole text nearly all of it became resident;
# grouped, only the windows of the code that runs do.
#
# Each scenario starts `target/release/blkstack` under gdb (trace.py: one
# breakpoint per function, disabled at its first hit, so the daemon runs
# at full speed once warm), drives it with a real client and stops it with
# SIGTERM. The scenarios the benchmark measures come first, then QMP, then
# NBD, so a daemon that only serves vhost-user-blk touches the fewest
# windows.
#
# Needs gdb (installed here when missing), qemu-io (qemu-utils) and
# python3. Run after a change that renames many functions (a dependency
# update, a new rustc) or adds code to the serving path: `make test`
# (bench/layout/check.py) says when the list no longer matches the binary.
#   make layout     (or bash bench/layout/train.sh; about 30 s, then `make build`)
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
cd "$repo"
if ! command -v gdb >/dev/null; then
    # The one tool here that `make deps` does not install.
    SUDO=""
    if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi
    echo "train.sh: installing gdb"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends gdb
fi
for tool in gdb qemu-io python3 nm; do
    command -v "$tool" >/dev/null || { echo "train.sh: needs $tool (make deps installs it)" >&2; exit 1; }
done
cargo build --release --locked --bins
bin="$repo/target/release/blkstack"
bench="$repo/target/release/blkstack-bench"
work="$(mktemp -d)"
trap 'pkill -TERM -f "$work/" 2>/dev/null || true; rm -rf "$work"' EXIT
truncate -s 256M "$work/img"
export TRACE_OUT="$work/hits"
: >"$TRACE_OUT"

# serve ARGS...: start the daemon under gdb; sets $gdb_pid.
serve() {
    rm -f "$work/vhost.sock" "$work/qmp.sock" "$work/nbd.sock"
    gdb -q -batch -x "$repo/bench/layout/trace.py" --args "$bin" serve "$@" \
        >>"$work/gdb.log" 2>&1 &
    gdb_pid=$!
}
# wait_for PATH: until the daemon listens there (breakpoints make start-up slow).
wait_for() {
    for _ in $(seq 1200); do [ -S "$1" ] && return 0; sleep 0.1; done
    echo "train.sh: the daemon never created $1 (see $work/gdb.log)" >&2
    cat "$work/gdb.log" >&2
    exit 1
}
# stop: SIGTERM the daemon (the drain and flush paths run too), wait for gdb.
stop() {
    pkill -TERM -f "^$bin serve" || true
    wait "$gdb_pid" || true
}
file="driver=file,node-name=f0,filename=$work/img"
vhost="type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=$work/vhost.sock,writable=on"
# run_bench EXPORT_EXTRA BLOCKDEV_EXTRA BENCH_ARGS...: one daemon, one client run.
run_bench() {
    local export_extra=$1 node=$2
    shift 2
    serve --blockdev "$node" --export "$vhost$export_extra"
    wait_for "$work/vhost.sock"
    "$bench" --socket "$work/vhost.sock" --seconds 2 "$@" >/dev/null
    stop
}

# The benchmark's rows (bench/compare): every run is a fresh daemon.
run_bench ",num-queues=1" "$file" --rw randread --bs 4k --iodepth 32
run_bench ",num-queues=1" "$file" --rw randwrite --bs 4k --iodepth 32
run_bench ",num-queues=1" "$file" --rw randread --bs 4k --iodepth 1
run_bench ",num-queues=1" "$file" --rw read --bs 1M --iodepth 8
run_bench ",num-queues=1,poll-us=50" "$file" --rw randrw --bs 4k --iodepth 32
run_bench ",num-queues=1" "$file,cache.direct=on" --rw randread --bs 4k --iodepth 32
run_bench ",num-queues=1" "driver=null-co,node-name=f0,size=256M,read-zeroes=off" --rw randread --bs 4k --iodepth 32
run_bench ",num-queues=4" "$file" --rw randread --bs 4k --iodepth 32 --queues 4

# The control socket: the commands a management layer sends routinely.
serve --blockdev "$file" --export "$vhost,num-queues=1" \
    --chardev "socket,id=m0,path=$work/qmp.sock,server=on,wait=off" --monitor chardev=m0
wait_for "$work/qmp.sock"
python3 - "$work/qmp.sock" <<'PY'
import json, socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
f = s.makefile("rw")
f.readline()  # greeting
for cmd in [
    {"execute": "qmp_capabilities"},
    {"execute": "query-version"},
    {"execute": "query-commands"},
    {"execute": "query-block-exports"},
    {"execute": "query-named-block-nodes"},
    {"execute": "query-blockstats"},
    {"execute": "blockdev-add", "arguments": {"driver": "null-co", "node-name": "n1", "size": 1048576}},
    {"execute": "block-export-add", "arguments": {"type": "vhost-user-blk", "id": "e1", "node-name": "n1",
        "addr": {"type": "unix", "path": sys.argv[1] + ".e1"}}},
    {"execute": "block-export-del", "arguments": {"id": "e1"}},
    {"execute": "blockdev-del", "arguments": {"node-name": "n1"}},
    {"execute": "query-nonexistent"},
]:
    f.write(json.dumps(cmd) + "\n")
    f.flush()
    while True:
        reply = json.loads(f.readline())
        if "event" not in reply:
            break
PY
stop

# NBD: qemu-io reads and writes through blkstack's NBD server.
serve --blockdev "$file" --nbd-server "addr.type=unix,addr.path=$work/nbd.sock" \
    --export type=nbd,id=n0,node-name=f0,name=disk,writable=on
wait_for "$work/nbd.sock"
qemu-io -f raw -c "write -P 0x5a 0 1M" -c "read -P 0x5a 0 1M" -c "aio_write 1M 64k" -c "aio_flush" \
    -c "discard 2M 1M" "nbd+unix:///disk?socket=$work/nbd.sock" >/dev/null
stop

# First appearance of each function, in order.
out="$repo/bench/layout/blkstack.order"
{
    echo "# Generated by bench/layout/train.sh from $(git -C "$repo" rev-parse --short HEAD) with $(rustc --version)."
    echo "# The daemon's functions in the order they first ran; lld --symbol-ordering-file (see build.rs)."
    awk '!seen[$0]++' "$TRACE_OUT"
} >"$out"
echo "train.sh: $(grep -vc '^#' "$out") functions in $out"
