# tests/e2e/guest/scenarios.sh — the guest side of each e2e scenario (busybox ash).
#
# Sourced by /init, which calls e2e_main NAME in a subshell. A scenario
# returns 0 for success or calls fail "reason" (which records the reason and
# exits the subshell). It may print "E2E-FILE path sha256" lines and sync
# points (E2E-SYNC) that run.sh acts on. What the host checks after the guest
# has finished (the image file, the daemon's statistics) is in run.sh.
#
# The disk is /dev/vda: a vhost-user-blk-pci device served by the backend
# under test with num-queues=2. All I/O that must reach the backend uses
# O_DIRECT with a block size >= 4096 (busybox dd silently drops O_DIRECT for
# smaller blocks) and /sys/block/vda/stat is checked to prove it did.
. /e2e/layout.sh

DEV=/dev/vda
SYSB=/sys/block/vda
PAT=/e2e/pat
SYNC_TIMEOUT=${SYNC_TIMEOUT:-100}

say()  { echo "e2e: $*"; }
fail() {
    echo "$*" > /tmp/e2e-reason
    echo "e2e: FAIL: $*"
    exit 1
}

# must WHAT CMD... — run CMD, fail with its last stderr lines if it fails
must() {
    _what="$1"; shift
    if ! "$@" > /tmp/must.out 2>&1; then
        fail "$_what failed: $(tail -n 3 /tmp/must.out | tr '\n' ' ')"
    fi
}

# dstat N — field N of /sys/block/vda/stat (Documentation/block/stat.rst):
#   3 sectors read, 7 sectors written, 12 discard I/Os, 16 flush I/Os
dstat() { awk -v f="$1" '{ print $f }' "$SYSB/stat"; }

# vq_irqs — "N0 N1": interrupts so far on vda's request virtqueues 0 and 1
vq_irqs() {
    _v="$(basename "$(readlink -f "$SYSB/device")")"
    awk -v v="$_v" '
        { n = 0; for (i = 2; i <= NF && $i ~ /^[0-9]+$/; i++) n += $i
          if ($NF == v "-req.0") q0 = n; if ($NF == v "-req.1") q1 = n }
        END { print q0 + 0, q1 + 0 }' /proc/interrupts
}

fsize() { wc -c < "$1" | tr -d ' '; }

sha() { sha256sum "$1" | cut -d' ' -f1; }

wait_disk() {
    i=0
    while [ ! -b "$DEV" ]; do
        i=$((i + 1))
        [ "$i" -gt 200 ] && fail "no $DEV after 20 s (virtio-blk device missing or backend not answering)"
        sleep 0.1
    done
}

expect_disk() {  # expect_disk BYTES
    wait_disk
    _sz="$(blockdev --getsize64 "$DEV")"
    [ "$_sz" = "$1" ] || fail "$DEV is $_sz bytes, expected $1"
}

expect_queues() {  # expect_queues N
    _n="$(ls -d "$SYSB"/mq/* 2>/dev/null | wc -l)"
    [ "$_n" = "$1" ] || fail "guest sees $_n virtqueues for $DEV, expected $1"
}

# write_pat FILE OFFSET BS — O_DIRECT write of FILE at byte OFFSET
write_pat() {
    dd if="$1" of="$DEV" bs="$3" seek="$2" oflag=direct,seek_bytes conv=notrunc \
        2>/tmp/dd.err.$$ || fail "O_DIRECT write of $1 at $2 failed: $(tail -n 2 /tmp/dd.err.$$ | tr '\n' ' ')"
}

# read_to OFFSET LEN BS OUT — O_DIRECT read of LEN bytes at OFFSET into OUT
read_to() {
    dd if="$DEV" of="$4" bs="$3" skip="$1" count=$(($2 / $3)) iflag=direct,skip_bytes \
        2>/tmp/dd.err.$$ || fail "O_DIRECT read of $2 bytes at $1 failed: $(tail -n 2 /tmp/dd.err.$$ | tr '\n' ' ')"
    _got="$(fsize "$4")"
    [ "$_got" = "$2" ] || fail "O_DIRECT read at $1: got $_got bytes, expected $2"
}

# check_region WHAT OFFSET EXPECTED_FILE [BS] — read back and compare
check_region() {
    _len="$(fsize "$3")"
    _bs="${4:-4096}"
    read_to "$2" "$_len" "$_bs" /tmp/readback
    if ! cmp -s /tmp/readback "$3"; then
        _d="$(cmp /tmp/readback "$3" 2>&1 | head -n1)"
        fail "$1: data read back at offset $2 ($_len bytes) differs from what was written: $_d"
    fi
    say "$1: $_len bytes at $2 read back ok"
}

# zeroes LEN -> file of LEN zero bytes
zero_file() {
    dd if=/dev/zero of="$2" bs=4096 count=$(($1 / 4096)) 2>/dev/null
}

# sync_point NAME — tell the host, wait for "GO NAME" on ttyS1
sync_point() {
    if [ -z "$E2E_CTL_OPEN" ]; then
        [ -c /dev/ttyS1 ] || fail "no /dev/ttyS1 for the host handshake"
        stty -F /dev/ttyS1 raw -echo 2>/dev/null
        exec 3< /dev/ttyS1
        E2E_CTL_OPEN=1
    fi
    echo "E2E-SYNC $1 $E2E_TOKEN"
    while :; do
        _line=""
        if ! read -t "$SYNC_TIMEOUT" -r _line <&3; then
            fail "sync point $1: no answer from the host within $SYNC_TIMEOUT s"
        fi
        _line="$(echo "$_line" | tr -d '\r')"
        case "$_line" in
            "GO $1") say "sync point $1: host says go"; return 0 ;;
            "ABORT $1"*) fail "host aborted at sync point $1: ${_line#ABORT $1}" ;;
        esac
    done
}

# ---------------------------------------------------------------- scenarios

# 1. data integrity: two O_DIRECT writers pinned to vCPU 0 and 1 (so both
#    virtqueues carry I/O), several offsets including the last 4 KiB, an
#    overwrite inside a written region, everything read back with O_DIRECT.
scenario_data() {
    expect_disk "$DATA_SIZE"
    expect_queues 2
    [ "$(nproc)" -ge 2 ] || fail "need 2 vCPUs, have $(nproc)"
    w0="$(dstat 7)"; r0="$(dstat 3)"; i0="$(vq_irqs)"

    taskset -c 0 sh -c ". /e2e/scenarios.sh
        write_pat $PAT/A $DATA_A_OFF 65536
        write_pat $PAT/C $DATA_C_OFF 65536
        write_pat $PAT/A $DATA_A_OFF 4096" &
    pid0=$!
    taskset -c 1 sh -c ". /e2e/scenarios.sh
        write_pat $PAT/B $DATA_B_OFF 65536
        write_pat $PAT/D $DATA_D_OFF 4096
        write_pat $PAT/B $DATA_B_OFF 4096" &
    pid1=$!
    rc0=0; rc1=0
    wait "$pid0" || rc0=$?
    wait "$pid1" || rc1=$?
    [ -f /tmp/e2e-reason ] && fail "$(cat /tmp/e2e-reason)"
    [ "$rc0" = 0 ] || fail "writer on vCPU 0 failed (status $rc0)"
    [ "$rc1" = 0 ] || fail "writer on vCPU 1 failed (status $rc1)"
    say "two pinned writers done"
    i1="$(vq_irqs)"

    write_pat "$PAT/O" "$DATA_O_OFF" 4096
    cp "$PAT/A" /tmp/expA
    dd if="$PAT/O" of=/tmp/expA bs=4096 seek=$((DATA_O_OFF / 4096)) conv=notrunc 2>/dev/null

    check_region "region A (with overwrite)" "$DATA_A_OFF" /tmp/expA 65536
    check_region "region B" "$DATA_B_OFF" "$PAT/B" 65536
    check_region "region C" "$DATA_C_OFF" "$PAT/C" 4096
    check_region "last 4 KiB" "$DATA_D_OFF" "$PAT/D" 4096
    # untouched space in between reads as zeroes
    zero_file $((64 * KiB)) /tmp/z64k
    check_region "unwritten gap" $((30 * MiB)) /tmp/z64k 4096

    w1="$(dstat 7)"; r1="$(dstat 3)"
    wrote=$(( (2 * PAT_A_SIZE + PAT_C_SIZE + 2 * PAT_B_SIZE + PAT_D_SIZE + PAT_O_SIZE) / 512 ))
    read=$(( (PAT_A_SIZE + PAT_B_SIZE + PAT_C_SIZE + PAT_D_SIZE + 64 * KiB) / 512 ))
    [ $((w1 - w0)) -ge "$wrote" ] || fail "only $((w1 - w0)) sectors written reached the device, expected >= $wrote (O_DIRECT dropped?)"
    [ $((r1 - r0)) -ge "$read" ] || fail "only $((r1 - r0)) sectors read reached the device, expected >= $read"
    say "device stat: $((w1 - w0)) sectors written, $((r1 - r0)) read"

    # both virtqueues carried requests: each has its own MSI-X vector, and
    # completions arrive on the vector of the queue the request went to
    say "completion interrupts per virtqueue before: $i0, after: $i1"
    for q in 0 1; do
        b="$(echo "$i0" | awk -v q=$q '{ print $(q + 1) }')"
        a="$(echo "$i1" | awk -v q=$q '{ print $(q + 1) }')"
        [ -n "$a" ] || fail "no interrupt line for virtqueue req.$q in /proc/interrupts"
        [ "$a" -gt "$b" ] || fail "virtqueue req.$q carried no I/O during the pinned writers"
    done
}

# 2. filesystem: mkfs.ext4, files, sync, e2fsck, remount and verify. The
#    disk is a raw node with an offset; run.sh checks the image afterwards.
scenario_fs() {
    expect_disk "$FS_SIZE"
    must "mkfs.ext4" /ubin/mkfs.ext4 -q -F -L e2e "$DEV"
    must "mount ext4" mount -t ext4 "$DEV" /mnt
    mkdir -p /mnt/dir/sub /mnt/many
    cp "$PAT/A" /mnt/a.bin
    cp "$PAT/B" /mnt/dir/b.bin
    cp "$PAT/C" /mnt/dir/sub/c.bin
    dd if=/dev/urandom of=/mnt/dir/random.bin bs=4096 count=75 2>/dev/null
    echo "hello from the e2e guest" > /mnt/hello.txt
    i=0
    while [ "$i" -lt 40 ]; do
        echo "small file $i $(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')" > /mnt/many/f$i
        i=$((i + 1))
    done
    # a file that is written, synced and then partly rewritten
    dd if="$PAT/A" of=/mnt/rewrite.bin bs=65536 2>/dev/null
    sync
    dd if="$PAT/D" of=/mnt/rewrite.bin bs=4096 seek=7 conv=notrunc 2>/dev/null
    sync
    (cd /mnt && find . -type f | sort | while read -r f; do
        echo "E2E-FILE ${f#.} $(sha256sum "$f" | cut -d' ' -f1)"
    done) > /tmp/files
    cat /tmp/files
    [ "$(wc -l < /tmp/files)" -ge 45 ] || fail "expected >= 45 files, listed $(wc -l < /tmp/files)"
    must "umount" umount /mnt
    echo 3 > /proc/sys/vm/drop_caches
    must "e2fsck -fn in the guest" /ubin/e2fsck -fn "$DEV"
    say "e2fsck -fn clean"
    must "mount ext4 read-only" mount -t ext4 -o ro "$DEV" /mnt
    while read -r tag path sum; do
        got="$(sha256sum "/mnt$path" | cut -d' ' -f1)"
        [ "$got" = "$sum" ] || fail "after remount $path has sha256 $got, expected $sum"
    done < /tmp/files
    say "all files verified after remount"
    must "umount" umount /mnt
}

# 3. flush and write cache: write-through first, then switch to write back
#    (the guest sends VHOST_USER_SET_CONFIG with CONFIG_WCE) and fsync; the
#    host reads flush_operations over QMP at both sync points.
scenario_flush() {
    expect_disk "$FLUSH_SIZE"
    wc0="$(cat "$SYSB/queue/write_cache")"
    say "write_cache at start: $wc0 (cache_type $(cat "$SYSB/cache_type" 2>/dev/null))"
    write_pat "$PAT/A" "$FLUSH_A_OFF" 65536
    sync_point before-writeback
    # virtio_blk's cache_type attribute writes the config space's wce field
    # (VIRTIO_BLK_F_CONFIG_WCE: QEMU sends VHOST_USER_SET_CONFIG) and reads
    # it back from the device. (queue/write_cache alone would only flip a
    # block-layer flag and never tell the device.)
    [ -f "$SYSB/cache_type" ] || fail "no $SYSB/cache_type: device did not offer VIRTIO_BLK_F_CONFIG_WCE or FLUSH"
    echo "write back" > "$SYSB/cache_type" || fail "cannot write 'write back' to $SYSB/cache_type (no VIRTIO_BLK_F_CONFIG_WCE?)"
    ct="$(cat "$SYSB/cache_type")"
    [ "$ct" = "write back" ] || fail "cache_type reads '$ct' after writing 'write back': the device did not take the CONFIG_WCE write"
    wc1="$(cat "$SYSB/queue/write_cache")"
    [ "$wc1" = "write back" ] || fail "queue/write_cache is '$wc1' after switching the device to write back"
    say "cache_type and write_cache now: $wc1"
    f0="$(dstat 16)"
    dd if="$PAT/B" of="$DEV" bs=65536 seek="$FLUSH_B_OFF" oflag=direct,seek_bytes conv=notrunc,fsync \
        2>/tmp/dd.err || fail "O_DIRECT write + fsync failed: $(cat /tmp/dd.err)"
    dd if="$PAT/C" of="$DEV" bs=65536 seek="$FLUSH_C_OFF" oflag=seek_bytes conv=notrunc,fsync \
        2>/tmp/dd.err || fail "buffered write + fsync failed: $(cat /tmp/dd.err)"
    f1="$(dstat 16)"
    say "guest flush requests: $((f1 - f0))"
    [ "$f1" -gt "$f0" ] || fail "the guest sent no flush after fsync in write-back mode"
    sync_point after-fsync
    check_region "region A" "$FLUSH_A_OFF" "$PAT/A" 65536
    check_region "region B" "$FLUSH_B_OFF" "$PAT/B" 65536
    check_region "region C" "$FLUSH_C_OFF" "$PAT/C" 65536
}

# 4. discard and write zeroes
scenario_discard() {
    expect_disk "$DISC_SIZE"
    dmax="$(cat "$SYSB/queue/discard_max_bytes")"
    zmax="$(cat "$SYSB/queue/write_zeroes_max_bytes")"
    say "discard_max_bytes=$dmax write_zeroes_max_bytes=$zmax discard_granularity=$(cat "$SYSB/queue/discard_granularity")"
    [ "$dmax" -gt 0 ] || fail "device does not offer discard (VIRTIO_BLK_F_DISCARD)"
    [ "$zmax" -gt 0 ] || fail "device does not offer write zeroes (VIRTIO_BLK_F_WRITE_ZEROES)"
    for off in "$DISC_DISCARD_OFF" "$DISC_ZERO_OFF" "$DISC_PUNCH_OFF" "$DISC_KEEP_OFF"; do
        write_pat "$PAT/A" "$off" 65536
    done
    check_region "region before discard" "$DISC_DISCARD_OFF" "$PAT/A" 65536
    d0="$(dstat 12)"
    must "blkdiscard" /ubin/blkdiscard -o "$DISC_DISCARD_OFF" -l "$DISC_LEN" "$DEV"
    d1="$(dstat 12)"
    [ "$d1" -gt "$d0" ] || fail "blkdiscard sent no discard request to the device"
    must "blkdiscard -z" /ubin/blkdiscard -z -o "$DISC_ZERO_OFF" -l "$DISC_LEN" "$DEV"
    must "fallocate --punch-hole" /ubin/fallocate -p -o "$DISC_PUNCH_OFF" -l "$DISC_LEN" "$DEV"
    zero_file "$DISC_LEN" /tmp/z
    check_region "discarded region" "$DISC_DISCARD_OFF" /tmp/z 65536
    check_region "write-zeroes region" "$DISC_ZERO_OFF" /tmp/z 65536
    check_region "punched region" "$DISC_PUNCH_OFF" /tmp/z 65536
    check_region "untouched region" "$DISC_KEEP_OFF" "$PAT/A" 65536
    say "discard requests: $((d1 - d0))"
}

# 5. read-only export: writes fail in the guest, reads work
scenario_readonly() {
    expect_disk "$RO_SIZE"
    ro="$(cat "$SYSB/ro")"
    [ "$ro" = 1 ] || fail "$DEV is not read-only in the guest (sys/block/vda/ro=$ro; VIRTIO_BLK_F_RO not offered?)"
    check_region "region B" "$RO_B_OFF" "$PAT/B" 65536
    check_region "last 4 KiB" "$RO_D_OFF" "$PAT/D" 4096
    if dd if="$PAT/A" of="$DEV" bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/dd.err; then
        fail "O_DIRECT write to the read-only disk succeeded"
    fi
    say "O_DIRECT write refused: $(head -n1 /tmp/dd.err)"
    if dd if="$PAT/A" of="$DEV" bs=65536 count=1 conv=notrunc,fsync 2>/tmp/dd.err; then
        fail "buffered write + fsync to the read-only disk succeeded"
    fi
    say "buffered write refused: $(head -n1 /tmp/dd.err)"
    # try to lift the read-only flag: the kernel must still refuse, or the
    # device must fail the write
    blockdev --setrw "$DEV" 2>/dev/null
    if dd if="$PAT/A" of="$DEV" bs=4096 count=1 oflag=direct conv=notrunc 2>/tmp/dd.err; then
        fail "write after 'blockdev --setrw' to the read-only export succeeded"
    fi
    say "write after --setrw refused: $(head -n1 /tmp/dd.err)"
    check_region "region B again" "$RO_B_OFF" "$PAT/B" 65536
}

# 6. backend restart: data written, host kills and restarts the daemon while
#    the guest is idle, then the next I/O succeeds and the data is intact.
scenario_reconnect() {
    expect_disk "$RC_SIZE"
    write_pat "$PAT/A" "$RC_A_OFF" 65536
    write_pat "$PAT/D" "$RC_D_OFF" 4096
    check_region "region A" "$RC_A_OFF" "$PAT/A" 65536
    sync_point restart
    check_region "region A after restart" "$RC_A_OFF" "$PAT/A" 65536
    check_region "last 4 KiB after restart" "$RC_D_OFF" "$PAT/D" 4096
    write_pat "$PAT/B" "$RC_B_OFF" 65536
    check_region "region B written after restart" "$RC_B_OFF" "$PAT/B" 65536
    # and once more, through both queues
    taskset -c 1 sh -c ". /e2e/scenarios.sh; check_region 'region A from vCPU 1' $RC_A_OFF $PAT/A 4096" \
        || fail "read from vCPU 1 after restart failed"
}

# 7. resize: the host grows the node with QMP block_resize while the disk is
#    in use; the backend must tell the frontend (vhost-user
#    BACKEND_CONFIG_CHANGE_MSG), so the guest sees the new capacity within
#    10 s without any action of its own, and can write at the new end.
scenario_resize() {
    expect_disk "$RS_SIZE"
    write_pat "$PAT/A" "$RS_A_OFF" 65536
    s0="$(cat "$SYSB/size")"
    [ "$s0" = $((RS_SIZE / 512)) ] || fail "$SYSB/size is $s0 sectors, expected $((RS_SIZE / 512))"
    sync_point resize
    i=0
    while [ "$(cat "$SYSB/size")" = "$s0" ]; do
        i=$((i + 1))
        [ "$i" -gt 100 ] && fail "$SYSB/size still $s0 sectors 10 s after block_resize to $RS_NEW_SIZE bytes (no config-change notification?)"
        sleep 0.1
    done
    s1="$(cat "$SYSB/size")"
    say "size changed from $s0 to $s1 sectors after ~$((i / 10)).$((i % 10)) s"
    [ "$s1" = $((RS_NEW_SIZE / 512)) ] || fail "$SYSB/size is $s1 sectors after the resize, expected $((RS_NEW_SIZE / 512))"
    _sz="$(blockdev --getsize64 "$DEV")"
    [ "$_sz" = "$RS_NEW_SIZE" ] || fail "$DEV is $_sz bytes after the resize, expected $RS_NEW_SIZE"
    write_pat "$PAT/B" "$RS_B_OFF" 65536
    write_pat "$PAT/D" "$RS_D_OFF" 4096
    check_region "region B past the old end" "$RS_B_OFF" "$PAT/B" 65536
    check_region "last 4 KiB of the new size" "$RS_D_OFF" "$PAT/D" 4096
    check_region "region A written before the resize" "$RS_A_OFF" "$PAT/A" 65536
}

e2e_main() {
    [ "$E2E_DEBUG" = 1 ] && set -x
    case "$1" in
        data|fs|flush|discard|readonly|reconnect|resize) "scenario_$1" ;;
        *) fail "unknown scenario '$1'" ;;
    esac
}
