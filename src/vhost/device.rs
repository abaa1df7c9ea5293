//! The export-wide device state shared by every connection and queue
//! thread: the node, the configuration, the current capacity and write-cache
//! mode, and the log limiter. Everything that changes is an atomic.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};

use super::config::{config_space, wce_from_write, ConfigInput, VhostBlkConfig, CONFIG_SPACE_SIZE, ID_BYTES};
use super::notify::ConfigNotifier;
use super::ratelimit::RateLimiter;
use super::request::Geometry;
use crate::block::BlockNode;

/// State of one vhost-user-blk device (one export).
pub struct Device {
    /// The export's options.
    pub cfg: VhostBlkConfig,
    /// The node served.
    pub node: Arc<BlockNode>,
    /// The GET_ID answer.
    pub id_bytes: [u8; ID_BYTES],
    /// Rate limiter for guest-triggered log lines.
    pub log: RateLimiter,
    capacity: AtomicU64,
    /// The configuration space's write-cache-enable byte.
    wce: AtomicBool,
    /// The driver accepted VIRTIO_BLK_F_FLUSH (in its latest SET_FEATURES).
    flush_acked: AtomicBool,
    refused: AtomicU64,
    /// The connected frontend's backend request channel, if we have one.
    notifier: Mutex<Option<Arc<ConfigNotifier>>>,
}

impl Device {
    /// A device for `node` with write-back caching (as qemu-storage-daemon starts).
    pub fn new(cfg: VhostBlkConfig, node: Arc<BlockNode>) -> Self {
        let capacity = AtomicU64::new(node.length());
        Device {
            id_bytes: cfg.id_bytes(),
            cfg,
            node,
            log: RateLimiter::default(),
            capacity,
            wce: AtomicBool::new(true),
            flush_acked: AtomicBool::new(true),
            refused: AtomicU64::new(0),
            notifier: Mutex::new(None),
        }
    }

    /// Export id.
    pub fn id(&self) -> &str {
        &self.cfg.id
    }

    /// Whether guests may write.
    pub fn writable(&self) -> bool {
        self.cfg.writable
    }

    /// What the request parser checks against.
    pub fn geometry(&self) -> Geometry {
        Geometry { capacity: self.capacity.load(Relaxed), lbs: self.cfg.logical_block_size, read_only: !self.cfg.writable }
    }

    /// Records a new node length (resize hook).
    pub fn set_capacity(&self, bytes: u64) {
        self.capacity.store(bytes, Relaxed);
    }

    fn notifier_slot(&self) -> std::sync::MutexGuard<'_, Option<Arc<ConfigNotifier>>> {
        self.notifier.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Installs the current connection's config-change channel.
    pub fn set_notifier(&self, n: Arc<ConfigNotifier>) {
        *self.notifier_slot() = Some(n);
    }

    /// Removes `n` if it is still the installed channel (its connection ended).
    pub fn clear_notifier(&self, n: &Arc<ConfigNotifier>) {
        let mut slot = self.notifier_slot();
        if slot.as_ref().is_some_and(|cur| Arc::ptr_eq(cur, n)) {
            *slot = None;
        }
    }

    /// Tells the connected frontend that the configuration space changed
    /// (VHOST_USER_BACKEND_CONFIG_CHANGE_MSG). Never blocks; returns whether
    /// a notification was sent.
    pub fn notify_config_change(&self) -> bool {
        let n = self.notifier_slot().clone();
        let Some(n) = n else {
            log::info!(
                "vhost-user-blk export '{}': no frontend channel for config-change notifications; the guest sees the new capacity when it next reads the configuration",
                self.id()
            );
            return false;
        };
        match n.notify() {
            Ok(()) => {
                log::info!("vhost-user-blk export '{}': config change announced to the frontend", self.id());
                true
            }
            Err(e) => {
                log::warn!("vhost-user-blk export '{}': cannot announce the config change to the frontend: {e}", self.id());
                false
            }
        }
    }

    /// Whether writes must be durable on completion: the guest turned the
    /// cache off (WCE = 0), or it cannot flush (no FLUSH negotiated; virtio
    /// 1.x 5.2.6.2 asks for a write-through device then).
    pub fn write_through(&self) -> bool {
        !(self.wce.load(Relaxed) && self.flush_acked.load(Relaxed))
    }

    /// The configuration space's WCE byte (write-back when set).
    pub fn wce(&self) -> bool {
        self.wce.load(Relaxed)
    }

    /// A new connection is a reset device: write-back, FLUSH assumed until
    /// the driver's features say otherwise.
    pub fn reset_cache(&self) {
        self.wce.store(true, Relaxed);
        self.flush_acked.store(true, Relaxed);
    }

    /// Records whether the driver accepted FLUSH. QEMU sends an early
    /// SET_FEATURES without it before the guest's own, so this follows the
    /// latest one.
    pub fn set_flush_acked(&self, acked: bool) {
        if self.flush_acked.swap(acked, Relaxed) != acked {
            log::debug!("vhost-user-blk export '{}': FLUSH negotiated: {acked}", self.id());
        }
    }

    /// Counts a refused (malformed) request.
    pub fn count_refused(&self) {
        self.refused.fetch_add(1, Relaxed);
    }

    /// Number of malformed requests refused so far.
    pub fn refused(&self) -> u64 {
        self.refused.load(Relaxed)
    }

    /// The virtio-blk configuration space as it is now.
    pub fn config_space(&self) -> [u8; CONFIG_SPACE_SIZE] {
        config_space(&ConfigInput {
            capacity_bytes: self.capacity.load(Relaxed),
            logical_block_size: self.cfg.logical_block_size,
            limits: self.node.limits(),
            queue_size: self.cfg.queue_size,
            num_queues: self.cfg.num_queues,
            wce: self.wce(),
        })
    }

    /// Sets the WCE byte (`true`: write-back).
    fn set_wce(&self, wce: bool) {
        if self.wce.swap(wce, Relaxed) != wce {
            let mode = if wce { "write-back" } else { "write-through" };
            log::info!("vhost-user-blk export '{}': the guest set the cache to {mode}", self.id());
        }
    }

    /// Applies a SET_CONFIG write: only the WCE byte is writable.
    pub fn set_config(&self, offset: u32, buf: &[u8]) {
        match wce_from_write(offset, buf) {
            Some(wce) => self.set_wce(wce),
            None => log::debug!(
                "vhost-user-blk export '{}': ignoring a write of {} bytes at {offset} to read-only config fields",
                self.id(),
                buf.len()
            ),
        }
    }
}
