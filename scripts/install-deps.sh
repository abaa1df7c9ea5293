#!/bin/bash
# Installs what building and testing blkstack needs on a Debian 12 machine
# (idempotent; only missing packages are installed). Run as root, or with sudo
# available. The guest-test tools (qemu-system-x86 from bookworm-backports,
# busybox-static, the guest kernel) are installed by tests/e2e/setup.sh.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO="sudo"; fi

# libclang-dev: libublk's bindgen; qemu-utils: qemu-img, qemu-io,
# qemu-storage-daemon (tests, benchmark peer); python3-venv: the QMP tests;
# binutils: nm and readelf for the code-layout check (bench/layout/check.py).
PKGS="libclang-dev qemu-utils python3-venv binutils e2fsprogs util-linux pkg-config"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    echo "installing:$missing"
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing
fi

# Python packages for the QMP tests, in a project-local venv.
if [ ! -x tests/.venv/bin/python ] || ! tests/.venv/bin/python -c 'import qemu.qmp, pytest' 2>/dev/null; then
    python3 -m venv tests/.venv
    tests/.venv/bin/pip install -q --disable-pip-version-check qemu.qmp pytest
fi
