#!/usr/bin/env bash
# tests/e2e/setup.sh — install everything the guest (e2e) tests need.
#
# Idempotent; meant for a fresh Debian 12 (bookworm) machine, run as root.
#  * adds a bookworm-backports apt source on the machine's existing Debian mirror
#  * installs qemu-system-x86 (QEMU 10, from backports: the same version as the
#    qemu-utils / qemu-storage-daemon already on these machines), e2fsprogs,
#    util-linux, python3 and the qemu-storage-daemon used as reference backend
#  * downloads (apt-get download, no install) the backports guest kernel
#    (linux-image-6.12.*-amd64: virtio built in, ublk_drv as a module) and
#    busybox-static, and unpacks both into tests/e2e/cache/ (git-ignored)
#
# Re-running it when everything is present does no network access at all.
# Set E2E_SETUP_FORCE=1 to re-download the kernel and busybox.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CACHE="$HERE/cache"
mkdir -p "$CACHE"

log() { printf 'e2e-setup: %s\n' "$*" >&2; }
die() { printf 'e2e-setup: ERROR: %s\n' "$*" >&2; exit 1; }

SUDO=""
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo"; else SUDO="__need_root__"; fi
fi
as_root() {
    [ "$SUDO" = "__need_root__" ] && die "must run as root (or have sudo) to run: $*"
    $SUDO "$@"
}
export DEBIAN_FRONTEND=noninteractive

# ---------------------------------------------------------------- apt sources
BPO_LIST=/etc/apt/sources.list.d/blkstack-e2e-bookworm-backports.list

have_backports_source() {
    grep -rqsE '(^|[[:space:]])bookworm-backports([[:space:]]|$)' \
        /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null
}

# The machine's Debian mirror: first URI serving the "bookworm" suite.
debian_mirror() {
    local f uri
    # deb822 .sources files
    for f in /etc/apt/sources.list.d/*.sources; do
        [ -f "$f" ] || continue
        uri="$(awk '
            BEGIN { RS=""; FS="\n" }
            {
              u=""; s=0
              for (i = 1; i <= NF; i++) {
                if ($i ~ /^URIs:/)   { sub(/^URIs:[ \t]*/, "", $i); split($i, a, /[ \t]+/); u=a[1] }
                if ($i ~ /^Suites:/ && $i ~ /(^|[ \t])bookworm([ \t]|$)/) s=1
              }
              if (s && u != "" && u !~ /security/) { print u; exit }
            }' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    # one-line format
    for f in /etc/apt/sources.list /etc/apt/sources.list.d/*.list; do
        [ -f "$f" ] || continue
        uri="$(awk '$1=="deb" { for (i=2;i<=NF;i++) if ($i !~ /^\[/ && $i ~ /:\/\//) { if ($(i+1)=="bookworm") { print $i; exit } ; break } }' "$f")"
        [ -n "$uri" ] && { echo "$uri"; return; }
    done
    echo "http://deb.debian.org/debian"
}

APT_UPDATED=0
apt_update() {
    if [ "$APT_UPDATED" = 0 ]; then
        log "apt-get update"
        as_root apt-get update -qq
        APT_UPDATED=1
    fi
}

ensure_backports() {
    if have_backports_source; then return; fi
    local mirror
    mirror="$(debian_mirror)"
    log "adding bookworm-backports from $mirror ($BPO_LIST)"
    echo "deb $mirror bookworm-backports main" | as_root tee "$BPO_LIST" >/dev/null
    APT_UPDATED=0
}

backports_known() {
    apt-cache policy 2>/dev/null | grep 'bookworm-backports' >/dev/null
}

# --------------------------------------------------------------- host packages
# QEMU 10 from backports; pin to backports explicitly so that plain bookworm's
# QEMU 7.2 never replaces the installed qemu-utils 10.
need_qemu=0
if ! command -v qemu-system-x86_64 >/dev/null 2>&1; then
    need_qemu=1
else
    qv="$(qemu-system-x86_64 --version | awk 'NR==1 { print $4 }')"
    case "$qv" in [1-9][0-9].*) ;; *) need_qemu=1 ;; esac
fi
command -v qemu-storage-daemon >/dev/null 2>&1 || need_qemu=1

pkgs=()
command -v mkfs.ext4 >/dev/null 2>&1 && command -v debugfs >/dev/null 2>&1 \
    && command -v e2fsck >/dev/null 2>&1 || pkgs+=(e2fsprogs)
command -v blkdiscard >/dev/null 2>&1 && command -v fallocate >/dev/null 2>&1 || pkgs+=(util-linux)
[ -x /usr/bin/python3 ] || command -v python3 >/dev/null 2>&1 || pkgs+=(python3)
command -v xz >/dev/null 2>&1 || pkgs+=(xz-utils)
command -v cpio >/dev/null 2>&1 || pkgs+=(cpio)
command -v depmod >/dev/null 2>&1 || pkgs+=(kmod)
command -v gzip >/dev/null 2>&1 || pkgs+=(gzip)
command -v sha256sum >/dev/null 2>&1 && command -v timeout >/dev/null 2>&1 || pkgs+=(coreutils)
command -v ldd >/dev/null 2>&1 || pkgs+=(libc-bin)
command -v strace >/dev/null 2>&1 || pkgs+=(strace)   # flush probe for qemu-storage-daemon

KVER_FILE="$CACHE/kernel/KVER"
need_kernel=1
[ -f "$KVER_FILE" ] && [ -f "$CACHE/kernel/vmlinuz" ] && need_kernel=0
need_busybox=1
[ -x "$CACHE/busybox/bin/busybox" ] && need_busybox=0
if [ "${E2E_SETUP_FORCE:-0}" = 1 ]; then need_kernel=1; need_busybox=1; fi

if [ "$need_qemu" = 1 ] || [ "$need_kernel" = 1 ]; then
    ensure_backports
    if [ "$APT_UPDATED" = 0 ] && ! backports_known; then apt_update; fi
    backports_known || apt_update
fi

if [ "${#pkgs[@]}" -gt 0 ]; then
    apt_update
    log "installing ${pkgs[*]}"
    as_root apt-get install -y -qq --no-install-recommends "${pkgs[@]}"
fi

if [ "$need_qemu" = 1 ]; then
    apt_update
    log "installing qemu-system-x86 qemu-utils (QEMU 10) from bookworm-backports"
    # qemu-utils ships qemu-storage-daemon (the reference backend).
    as_root apt-get install -y -qq -t bookworm-backports --no-install-recommends \
        qemu-system-x86 qemu-utils
fi
# (no "| head" here: under pipefail a SIGPIPE would fail the script)
v="$(qemu-system-x86_64 --version)" || die "qemu-system-x86_64 does not run"; log "${v%%$'\n'*}"
v="$(qemu-storage-daemon --version)" || die "qemu-storage-daemon does not run"; log "${v%%$'\n'*}"

# ------------------------------------------------------- guest kernel + busybox
# Download into a scratch directory as the _apt user can't always write into
# the work tree; apt-get download keeps the .deb in the current directory.
dl_pkg() {  # dl_pkg NAME DESTDIR [apt options...]
    local name="$1" dest="$2"; shift 2
    local tmp; tmp="$(mktemp -d)"
    chmod 0777 "$tmp"
    (cd "$tmp" && apt-get download -qq "$@" "$name") >&2 || { rm -rf "$tmp"; return 1; }
    rm -rf "$dest.new"; mkdir -p "$dest.new"
    dpkg-deb -x "$tmp"/*.deb "$dest.new"
    rm -rf "$tmp" "$dest"; mv "$dest.new" "$dest"
}

if [ "$need_kernel" = 1 ]; then
    apt_update
    # The backports meta package names the current 6.12 image package.
    kpkg="$(apt-cache depends -t bookworm-backports linux-image-amd64 2>/dev/null \
            | awk '/Depends: linux-image-[0-9]/ && !n++ { print $2 }')"
    [ -n "$kpkg" ] || kpkg="$(apt-cache search --names-only '^linux-image-6\.12\..*-amd64$' \
            | awk '{ print $1 }' | grep -v -- '-dbg' | grep -v unsigned | sort -V | tail -n1)"
    [ -n "$kpkg" ] || die "no linux-image-6.12.*-amd64 found in bookworm-backports"
    log "downloading guest kernel $kpkg"
    rm -rf "$CACHE/kernel"
    dl_pkg "$kpkg" "$CACHE/kernel.pkg" -t bookworm-backports
    kdir="$(set -- "$CACHE"/kernel.pkg/lib/modules/*/; echo "$1")"
    kver="$(basename "$kdir")"
    mkdir -p "$CACHE/kernel.tmp"
    cp "$CACHE/kernel.pkg/boot/vmlinuz-$kver" "$CACHE/kernel.tmp/vmlinuz"
    cp "$CACHE/kernel.pkg/boot/config-$kver" "$CACHE/kernel.tmp/config" 2>/dev/null || true
    # The package has no modules.dep: run depmod, so that run.sh can resolve
    # dependencies with modprobe --show-depends. Its modules are
    # xz-compressed, which busybox's insmod cannot read: run.sh decompresses
    # the few the guest needs into the initramfs.
    mkdir -p "$CACHE/kernel.tmp/lib/modules"
    mv "$CACHE/kernel.pkg/lib/modules/$kver" "$CACHE/kernel.tmp/lib/modules/$kver"
    depmod -b "$CACHE/kernel.tmp" "$kver"
    echo "$kver" > "$CACHE/kernel.tmp/KVER"
    echo "$kpkg" > "$CACHE/kernel.tmp/PACKAGE"
    rm -rf "$CACHE/kernel.pkg"
    mv "$CACHE/kernel.tmp" "$CACHE/kernel"
fi
log "guest kernel: $(cat "$CACHE/kernel/PACKAGE" 2>/dev/null) ($(cat "$KVER_FILE"))"

if [ "$need_busybox" = 1 ]; then
    apt_update
    log "downloading busybox-static"
    dl_pkg busybox-static "$CACHE/busybox.pkg"
    rm -rf "$CACHE/busybox"; mkdir -p "$CACHE/busybox/bin"
    cp "$CACHE/busybox.pkg/bin/busybox" "$CACHE/busybox/bin/busybox"
    rm -rf "$CACHE/busybox.pkg"
fi
[ -n "$("$CACHE/busybox/bin/busybox" --list 2>/dev/null)" ] || die "$CACHE/busybox/bin/busybox does not run"
log "busybox: $("$CACHE/busybox/bin/busybox" --help 2>&1 | sed -n 1p || true)"

log "ok"
