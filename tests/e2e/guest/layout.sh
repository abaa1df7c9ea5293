# tests/e2e/guest/layout.sh — the on-disk layout of every scenario.
# Sourced by the guest (busybox ash) and by the host (bash), so both sides
# agree on sizes and offsets. Pattern files (pat/*) are made by run.sh from
# /dev/urandom for each run and shipped in the initramfs.
KiB=1024
MiB=1048576

# pattern files: name and size in bytes
PAT_A_SIZE=$((1 * MiB))
PAT_B_SIZE=$((1 * MiB))
PAT_C_SIZE=$((512 * KiB))
PAT_D_SIZE=$((4 * KiB))      # the last 4 KiB of a disk
PAT_O_SIZE=$((8 * KiB))      # overwrite inside region A
PAT_H_SIZE=$((1 * MiB))      # header in front of a raw node's offset

# 1. data integrity (file node)
DATA_SIZE=$((64 * MiB))
DATA_A_OFF=0                          # pattern A, writer on vCPU 0
DATA_C_OFF=$((40 * MiB))              # pattern C, writer on vCPU 0
DATA_B_OFF=$((20 * MiB + 12 * KiB))   # pattern B, writer on vCPU 1 (not 64K aligned)
DATA_D_OFF=$((DATA_SIZE - 4 * KiB))   # pattern D, writer on vCPU 1: the last 4 KiB
DATA_O_OFF=$((260 * KiB))             # pattern O overwrites inside region A

# 2. filesystem (raw node with an offset over a file node)
FS_RAW_OFFSET=$((1 * MiB))            # image: [header H][ext4 of FS_SIZE]
FS_SIZE=$((48 * MiB))

# 3. flush / write cache (file node)
FLUSH_SIZE=$((16 * MiB))
FLUSH_A_OFF=$((1 * MiB))              # written while write-through
FLUSH_B_OFF=$((4 * MiB))              # O_DIRECT + fsync in write-back
FLUSH_C_OFF=$((8 * MiB))              # buffered + fsync in write-back

# 4. discard / write zeroes (file node, discard=unmap)
DISC_SIZE=$((32 * MiB))
DISC_DISCARD_OFF=$((4 * MiB))         # blkdiscard            -> zeroes, host hole
DISC_ZERO_OFF=$((8 * MiB))            # blkdiscard -z         -> zeroes
DISC_PUNCH_OFF=$((12 * MiB))          # fallocate --punch-hole -> zeroes
DISC_KEEP_OFF=$((16 * MiB))           # untouched control region
DISC_LEN=$((1 * MiB))                 # each region is pattern A before

# 5. read-only export (file node)
RO_SIZE=$((16 * MiB))
RO_B_OFF=0                            # pattern B, put there by the host
RO_D_OFF=$((RO_SIZE - 4 * KiB))       # pattern D, put there by the host

# 6. backend restart (file node)
RC_SIZE=$((16 * MiB))
RC_A_OFF=$((1 * MiB))                 # written before the restart
RC_D_OFF=$((RC_SIZE - 4 * KiB))       # written before the restart
RC_B_OFF=$((8 * MiB))                 # written after the restart

# 7. resize (file node): QMP block_resize to twice the size while the guest runs
RS_SIZE=$((16 * MiB))
RS_NEW_SIZE=$((2 * RS_SIZE))
RS_A_OFF=$((1 * MiB))                 # written before the resize
RS_B_OFF=$RS_SIZE                     # the first MiB past the old end
RS_D_OFF=$((RS_NEW_SIZE - 4 * KiB))   # the last 4 KiB of the new size
