#!/usr/bin/env bash
# The QMP tests: blkstack's monitor driven by qemu.qmp, qemu-io and libblkio.
# Uses tests/.venv (created by `make deps` / `make test`, or here if missing).
# BLKSTACK overrides the binary (default: target/release/blkstack).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
repo="$(cd "$here/../.." && pwd)"
venv="$repo/tests/.venv"
if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install --quiet qemu.qmp pytest
fi
export BLKSTACK="${BLKSTACK:-$repo/target/release/blkstack}"
if [ ! -x "$BLKSTACK" ]; then
    echo "tests/qmp: $BLKSTACK not found; run 'cargo build --release' first" >&2
    exit 1
fi
command -v qemu-io >/dev/null || { echo "tests/qmp: qemu-io not found (Debian: qemu-utils)" >&2; exit 1; }
cd "$here"
exec "$venv/bin/python" -m pytest -q -p no:cacheprovider "$@" test_qmp.py
