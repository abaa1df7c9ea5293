//! Export options, their validation, the virtio feature bits and the
//! virtio-blk configuration space.

use std::mem::offset_of;
use std::path::PathBuf;

use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use virtio_bindings::virtio_blk::{self as blk, virtio_blk_config};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};

use crate::block::Limits;

/// virtio-blk sectors are always 512 bytes, whatever the logical block size.
pub const SECTOR_SIZE: u64 = 512;
/// Largest discard / write-zeroes segment, in 512-byte sectors.
pub const MAX_DISCARD_SECTORS: u32 = 32768;
/// Length of the GET_ID answer.
pub const ID_BYTES: usize = blk::VIRTIO_BLK_ID_BYTES as usize;
/// Most queues one export offers (`queues_per_thread` masks are 64 bits wide).
pub const MAX_QUEUES: u16 = 64;
/// Largest `logical-block-size` (2 MiB).
pub const MAX_LOGICAL_BLOCK_SIZE: u32 = 2 << 20;
/// Largest `queue-size` a split virtqueue may have.
pub const MAX_QUEUE_SIZE: u16 = 32768;
/// Longest busy-poll interval accepted, in microseconds.
pub const MAX_POLL_US: u64 = 1_000_000;
/// Default `poll-max-ns`. QEMU's iothreads default to 32768; on a VM whose
/// idle vCPUs halt, a sleeping frontend's next request comes 35-60 µs after
/// the backend went idle, so with 32768 the window never opened there, and
/// with 65536 it catches them (`bench/README.md`, "Adaptive polling").
pub const DEFAULT_POLL_MAX_NS: u64 = 65_536;
/// Size of the configuration space we answer GET_CONFIG from.
pub const CONFIG_SPACE_SIZE: usize = std::mem::size_of::<virtio_blk_config>();
/// Offset of the write-cache-enable byte, the one field a driver may write.
pub const WCE_OFFSET: usize = offset_of!(virtio_blk_config, wce);

/// Options of one vhost-user-blk export, named after qemu-storage-daemon's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VhostBlkConfig {
    /// Export id (`id`).
    pub id: String,
    /// Socket path (`addr.path`).
    pub path: PathBuf,
    /// `writable=on|off`.
    pub writable: bool,
    /// `num-queues` (default 1).
    pub num_queues: u16,
    /// `logical-block-size` (default 512).
    pub logical_block_size: u32,
    /// `queue-size`: the largest virtqueue the frontend may set up (default 256).
    pub queue_size: u16,
    /// `serial`: the GET_ID answer (default: the export id, truncated to 20 bytes).
    pub serial: Option<String>,
    /// `poll-us`: busy-poll the rings for this long before sleeping (0 = never).
    pub poll_us: u64,
    /// `poll-max-ns`: the longest adaptive polling window (0 = no adaptive
    /// polling; `poll-us` takes precedence). See [`super::poll`].
    pub poll_max_ns: u64,
    /// `poll-grow`: factor the adaptive window grows by (0 = 2).
    pub poll_grow: u64,
    /// `poll-shrink`: divisor the adaptive window shrinks by (0 = back to 0).
    pub poll_shrink: u64,
    /// `cpu-affinity`: queue i's thread is pinned to CPU
    /// `cpu_affinity[i % len]`; empty: no pinning (the default).
    pub cpu_affinity: Vec<u16>,
}

impl Default for VhostBlkConfig {
    fn default() -> Self {
        VhostBlkConfig {
            id: String::new(),
            path: PathBuf::new(),
            writable: false,
            num_queues: 1,
            logical_block_size: 512,
            queue_size: 256,
            serial: None,
            poll_us: 0,
            poll_max_ns: DEFAULT_POLL_MAX_NS,
            poll_grow: 0,
            poll_shrink: 0,
            cpu_affinity: Vec::new(),
        }
    }
}

impl VhostBlkConfig {
    /// The CPU queue `q`'s thread is pinned to, if any.
    pub fn queue_cpu(&self, q: usize) -> Option<u16> {
        if self.cpu_affinity.is_empty() {
            None
        } else {
            self.cpu_affinity.get(q % self.cpu_affinity.len()).copied()
        }
    }

    /// Checks every option; the message names the option key.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("id: an export needs a non-empty id".into());
        }
        let path_len = self.path.as_os_str().len();
        if path_len == 0 {
            return Err("addr.path: a unix socket path is required".into());
        }
        // sun_path holds 108 bytes including the terminating NUL.
        if path_len > 107 {
            return Err(format!("addr.path: '{}' is {path_len} bytes, a unix socket path may have at most 107", self.path.display()));
        }
        if self.num_queues == 0 {
            return Err("num-queues: must be at least 1".into());
        }
        if self.num_queues > MAX_QUEUES {
            return Err(format!("num-queues: {} is more than the maximum of {MAX_QUEUES}", self.num_queues));
        }
        let lbs = self.logical_block_size;
        if !lbs.is_power_of_two() || !(512..=MAX_LOGICAL_BLOCK_SIZE).contains(&lbs) {
            return Err(format!("logical-block-size: {lbs} is not a power of two between 512 and {MAX_LOGICAL_BLOCK_SIZE}"));
        }
        let qs = self.queue_size;
        if !qs.is_power_of_two() || !(4..=MAX_QUEUE_SIZE).contains(&qs) {
            return Err(format!("queue-size: {qs} is not a power of two between 4 and {MAX_QUEUE_SIZE}"));
        }
        if let Some(serial) = &self.serial {
            if serial.len() > ID_BYTES {
                return Err(format!("serial: '{serial}' is {} bytes, at most {ID_BYTES} fit", serial.len()));
            }
        }
        if self.poll_us > MAX_POLL_US {
            return Err(format!("poll-us: {} is more than the maximum of {MAX_POLL_US}", self.poll_us));
        }
        if self.poll_max_ns > MAX_POLL_US * 1000 {
            return Err(format!("poll-max-ns: {} is more than the maximum of {}", self.poll_max_ns, MAX_POLL_US * 1000));
        }
        if !self.cpu_affinity.is_empty() {
            crate::runtime::affinity::check_available(&self.cpu_affinity).map_err(|e| format!("cpu-affinity: {e}"))?;
        }
        Ok(())
    }

    /// The 20-byte GET_ID answer: the serial (or the export id), NUL padded.
    pub fn id_bytes(&self) -> [u8; ID_BYTES] {
        let mut out = [0u8; ID_BYTES];
        let src = self.serial.as_deref().unwrap_or(&self.id).as_bytes();
        let n = src.len().min(ID_BYTES);
        out[..n].copy_from_slice(&src[..n]);
        out
    }
}

/// The virtio feature bits the export offers.
pub fn virtio_features(writable: bool) -> u64 {
    let bits = [
        VIRTIO_F_VERSION_1,
        VIRTIO_RING_F_EVENT_IDX,
        VIRTIO_RING_F_INDIRECT_DESC,
        blk::VIRTIO_BLK_F_SIZE_MAX,
        blk::VIRTIO_BLK_F_SEG_MAX,
        blk::VIRTIO_BLK_F_BLK_SIZE,
        blk::VIRTIO_BLK_F_TOPOLOGY,
        blk::VIRTIO_BLK_F_FLUSH,
        blk::VIRTIO_BLK_F_DISCARD,
        blk::VIRTIO_BLK_F_WRITE_ZEROES,
        blk::VIRTIO_BLK_F_MQ,
        blk::VIRTIO_BLK_F_CONFIG_WCE,
    ];
    let mut f = bits.iter().fold(0u64, |acc, b| acc | 1 << b);
    if !writable {
        f |= 1 << blk::VIRTIO_BLK_F_RO;
    }
    f | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits()
}

/// The vhost-user protocol features the export offers (see the module docs
/// of `vhost` for why INFLIGHT_SHMFD is not among them; BACKEND_REQ carries
/// the resize notification, see `notify`).
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
        | VhostUserProtocolFeatures::CONFIGURE_MEM_SLOTS
        | VhostUserProtocolFeatures::BACKEND_REQ
}

/// What the configuration space is built from.
#[derive(Debug, Clone, Copy)]
pub struct ConfigInput {
    /// Node length in bytes.
    pub capacity_bytes: u64,
    /// Logical block size.
    pub logical_block_size: u32,
    /// The node's request limits.
    pub limits: Limits,
    /// Negotiable virtqueue size.
    pub queue_size: u16,
    /// Number of queues.
    pub num_queues: u16,
    /// Write cache enabled (write-back).
    pub wce: bool,
}

fn put(buf: &mut [u8], off: usize, bytes: &[u8]) {
    buf[off..off + bytes.len()].copy_from_slice(bytes);
}

/// `size_max` (largest data segment) and `seg_max` (most data segments).
///
/// Frontends compute their largest request as `size_max * seg_max` in an
/// `int` (libblkio does), so the product stays at most `i32::MAX`. The node's
/// generic layer splits at its `max_transfer` anyway, so segments may be as
/// large as that product allows; they are a multiple of the page size and of
/// the logical block size.
fn segment_limits(c: &ConfigInput, lbs: u32) -> (u32, u32) {
    const LIMIT: u64 = i32::MAX as u64;
    // The header and status take two descriptors of a chain.
    let seg_max = (c.limits.max_iov.min(usize::from(c.queue_size).saturating_sub(2))).max(1) as u64;
    let align = u64::from(lbs.max(4096));
    let size_max = c.limits.max_transfer.min(LIMIT / seg_max) / align * align;
    let size_max = size_max.max(u64::from(lbs));
    let seg_max = seg_max.min(LIMIT / size_max).max(1);
    (size_max as u32, seg_max as u32)
}

/// The virtio-blk configuration space, little endian, as a guest reads it.
pub fn config_space(c: &ConfigInput) -> [u8; CONFIG_SPACE_SIZE] {
    let lbs = c.logical_block_size.max(512);
    let mut b = [0u8; CONFIG_SPACE_SIZE];
    let (size_max, seg_max) = segment_limits(c, lbs);
    // Tell the guest about a physical block larger than the logical one
    // (a 4 KiB O_DIRECT file behind a 512-byte export) so it aligns its I/O.
    let phys = c.limits.request_alignment.max(lbs);
    let phys_exp = (phys / lbs).trailing_zeros().min(15) as u8;
    let min_io = 1u16 << phys_exp;
    let align_sectors = lbs / SECTOR_SIZE as u32;
    put(&mut b, offset_of!(virtio_blk_config, capacity), &(c.capacity_bytes / SECTOR_SIZE).to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, size_max), &size_max.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, seg_max), &seg_max.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, blk_size), &lbs.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, physical_block_exp), &[phys_exp]);
    put(&mut b, offset_of!(virtio_blk_config, min_io_size), &min_io.to_le_bytes());
    put(&mut b, WCE_OFFSET, &[u8::from(c.wce)]);
    put(&mut b, offset_of!(virtio_blk_config, num_queues), &c.num_queues.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, max_discard_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, max_discard_seg), &1u32.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, discard_sector_alignment), &align_sectors.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, max_write_zeroes_sectors), &MAX_DISCARD_SECTORS.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, max_write_zeroes_seg), &1u32.to_le_bytes());
    put(&mut b, offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    b
}

/// The bytes `[offset, offset+size)` of `space`, zero-filled past its end
/// (vhost-user requires an answer of exactly `size` bytes).
pub fn config_slice(space: &[u8], offset: u32, size: u32) -> Vec<u8> {
    let mut out = vec![0u8; size as usize];
    let start = (offset as usize).min(space.len());
    let end = (offset as usize).saturating_add(size as usize).min(space.len());
    if start < end {
        out[..end - start].copy_from_slice(&space[start..end]);
    }
    out
}

/// What a SET_CONFIG write means for the write cache: `Some(wce)` when it
/// covers the WCE byte. Other fields are read-only and writes to them are
/// ignored, as a real device would.
pub fn wce_from_write(offset: u32, buf: &[u8]) -> Option<bool> {
    let rel = WCE_OFFSET.checked_sub(offset as usize)?;
    buf.get(rel).map(|&v| v != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn valid() -> VhostBlkConfig {
        VhostBlkConfig { id: "e0".into(), path: "/tmp/x.sock".into(), ..Default::default() }
    }

    fn err_of(f: impl FnOnce(&mut VhostBlkConfig)) -> String {
        let mut c = valid();
        f(&mut c);
        match c.validate() {
            Err(e) => e,
            Ok(()) => format!("accepted {c:?}"),
        }
    }

    #[test]
    fn validate_names_the_key() {
        assert_eq!(valid().validate(), Ok(()));
        assert!(err_of(|c| c.num_queues = 0).starts_with("num-queues:"));
        assert!(err_of(|c| c.num_queues = 65).starts_with("num-queues:"));
        for lbs in [0, 256, 513, 1000, 4 << 20] {
            assert!(err_of(|c| c.logical_block_size = lbs).starts_with("logical-block-size:"), "{lbs}");
        }
        for lbs in [512, 4096, 2 << 20] {
            let mut c = valid();
            c.logical_block_size = lbs;
            assert_eq!(c.validate(), Ok(()));
        }
        for qs in [0, 2, 100] {
            assert!(err_of(|c| c.queue_size = qs).starts_with("queue-size:"), "{qs}");
        }
        assert!(err_of(|c| c.serial = Some("x".repeat(21))).starts_with("serial:"));
        assert!(err_of(|c| c.id.clear()).starts_with("id:"));
        assert!(err_of(|c| c.path = PathBuf::new()).starts_with("addr.path:"));
        assert!(err_of(|c| c.path = PathBuf::from("/".repeat(200))).starts_with("addr.path:"));
        assert!(err_of(|c| c.poll_us = MAX_POLL_US + 1).starts_with("poll-us:"));
        assert!(err_of(|c| c.poll_max_ns = MAX_POLL_US * 1000 + 1).starts_with("poll-max-ns:"));
        assert!(err_of(|c| c.cpu_affinity = vec![1023]).starts_with("cpu-affinity: CPU 1023 is not one this process may run on"));
        let c = VhostBlkConfig { cpu_affinity: vec![3, 1], ..VhostBlkConfig::default() };
        assert_eq!([0, 1, 2, 3].map(|q| c.queue_cpu(q)), [Some(3), Some(1), Some(3), Some(1)], "round robin over the list");
        assert_eq!(VhostBlkConfig::default().queue_cpu(0), None);
    }

    #[test]
    fn id_bytes_pad_and_default_to_the_id() {
        let mut c = valid();
        assert_eq!(&c.id_bytes()[..3], b"e0\0");
        c.serial = Some("ABCDEFGHIJKLMNOPQRST".into());
        assert_eq!(&c.id_bytes(), b"ABCDEFGHIJKLMNOPQRST");
    }

    #[test]
    fn features_have_ro_only_when_read_only() {
        assert_eq!(virtio_features(true) & 1 << blk::VIRTIO_BLK_F_RO, 0);
        assert_ne!(virtio_features(false) & 1 << blk::VIRTIO_BLK_F_RO, 0);
        assert_ne!(virtio_features(true) & 1 << VIRTIO_F_VERSION_1, 0);
        assert_ne!(virtio_features(true) & VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits(), 0);
    }

    #[test]
    fn wce_write_must_cover_the_byte() {
        assert_eq!(wce_from_write(WCE_OFFSET as u32, &[0]), Some(false));
        assert_eq!(wce_from_write(0, &[1u8; CONFIG_SPACE_SIZE]), Some(true));
        assert_eq!(wce_from_write(0, &[1u8; 8]), None);
        assert_eq!(wce_from_write(WCE_OFFSET as u32 + 1, &[1]), None);
    }

    #[test]
    fn segment_limits_keep_their_product_in_an_int() {
        let mut c = ConfigInput {
            capacity_bytes: 1 << 30,
            logical_block_size: 512,
            limits: Limits::default(),
            queue_size: 256,
            num_queues: 1,
            wce: true,
        };
        for (qs, lbs, max_transfer, max_iov) in
            [(256, 512, 1 << 30, 1024), (32768, 2 << 20, 1 << 30, 1024), (4, 512, 4096, 1), (1024, 4096, 128 << 10, 16)]
        {
            c.queue_size = qs;
            c.limits.max_transfer = max_transfer;
            c.limits.max_iov = max_iov;
            let (size, segs) = segment_limits(&c, lbs);
            assert!(u64::from(size) * u64::from(segs) <= i32::MAX as u64, "{qs} {lbs}");
            assert!(size % lbs == 0 && size >= lbs && segs >= 1 && segs <= u32::from(qs).max(3) - 2);
            assert!(u64::from(size) <= max_transfer.max(u64::from(lbs)));
        }
    }

    #[test]
    fn config_slice_pads_with_zeroes() {
        let space = [7u8; 4];
        assert_eq!(config_slice(&space, 2, 4), vec![7, 7, 0, 0]);
        assert_eq!(config_slice(&space, 10, 2), vec![0, 0]);
    }
}
