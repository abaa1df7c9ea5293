//! vhost-user-blk export: backend, virtio-blk request parsing, queue workers.
//!
//! An export serves one [`BlockNode`] to one vhost-user frontend at a time
//! (QEMU `vhost-user-blk-pci`, cloud-hypervisor, libblkio) on a unix socket,
//! with the options of qemu-storage-daemon's `--export type=vhost-user-blk`.
//!
//! # Pieces
//!
//! - [`config`]: options, validation, feature bits, the configuration space;
//! - [`request`]: one function that turns a descriptor chain into a typed
//!   request (or a refusal), and the request's execution;
//! - [`queue`]: the per-queue pipeline: pop a batch, spawn one task per
//!   request, put completions in the used ring in one go, signal once;
//! - [`backend`]: the `VhostUserBackend` and the glue between the queue
//!   threads' epoll loops and their async runtimes;
//! - [`acceptor`]: the connection loop, a new daemon per connection;
//! - [`notify`]: config-change (resize) notifications on the backend
//!   request channel.
//!
//! # Threads and the fast path
//!
//! Each queue has its own thread (vhost-user-backend's epoll loop) with its
//! own [`Runtime`](crate::runtime::Runtime). A kick pops every available
//! chain (with EVENT_IDX, until the ring stays empty after re-enabling
//! notifications), starts one task per request, runs the runtime once so all
//! the batch's I/O goes to io_uring in one submission, and interrupts the
//! guest at most once for everything that completed. Requests complete out of
//! order; a request that waits never blocks its queue. Data moves between the
//! node and guest memory directly: the I/O vectors point into the guest's
//! mapping, kept alive by the request until it completes. With `poll-us`, the
//! thread keeps polling the ring and the completions for that long after the
//! last activity before it sleeps in epoll again.
//!
//! # Malformed requests
//!
//! Every malformed chain gets `IOERR` or `UNSUPP` (see [`request`]) and a
//! rate-limited log line, and the queue serves on. A chain with no usable
//! status byte goes back to the used ring with length 0 — never leaked, never
//! left pending.
//!
//! # Disconnect and reconnect
//!
//! When the frontend disconnects the export keeps its socket: requests still
//! in flight run to completion against the node (nothing is half-written),
//! but their completions are not put in the used ring any more (the frontend
//! re-submits everything past the used index when it reconnects); then the
//! connection's daemon and threads are dropped and the next connection is
//! served by a new daemon (vhost-user-backend's handler cannot be reused
//! after a disconnect: it remembers its owner and negotiated state). While a
//! frontend is connected, any other connection is accepted and closed
//! (after a one-second grace in which the current connection may turn out to
//! be ending), without disturbing the first. A clean stop (GET_VRING_BASE) waits
//! for the queue's in-flight requests before answering, as the spec asks.
//!
//! # Protocol features not offered
//!
//! - INFLIGHT_SHMFD: vhost-user-backend 0.24's handler answers
//!   GET_INFLIGHT_FD / SET_INFLIGHT_FD with "not supported" and gives the
//!   backend no hook, so the in-flight region cannot be implemented on it.
//!
//! BACKEND_REQ *is* offered, although vhost 0.18's backend channel
//! (`Backend`) cannot send CONFIG_CHANGE_MSG, the one message a block device
//! needs, and hides its fd. [`notify`] takes the channel over: in
//! `set_backend_req_fd` it dups every unclaimed unix stream socket of the
//! process, drops the `Backend` (its only owner is us, so exactly its fd
//! closes) and keeps the one candidate whose fd number went away; anything
//! ambiguous (another thread closing a socket in that window of
//! microseconds) or a failed scan leaves the connection without
//! notifications, with a warning. On `block_resize` the resize hook updates
//! the capacity, then sends the 12-byte header of CONFIG_CHANGE_MSG (flags:
//! version 1, no NEED_REPLY) with a non-blocking send; QEMU then re-reads
//! the configuration space (GET_CONFIG) and interrupts the guest, which sees
//! the new size. Without a channel (a frontend that does not negotiate
//! BACKEND_REQ, or a refused one) the capacity is still updated and the
//! guest sees it at its next configuration read (a reconnect or reboot).
//!
//! # Write cache
//!
//! Each connection starts in write-back mode (WCE = 1, as QEMU's own
//! virtio-blk): writes are plain writes and the guest flushes. When the guest
//! writes WCE = 0 through SET_CONFIG, or its latest SET_FEATURES lacks FLUSH
//! (a driver that cannot flush), every write and write-zeroes is done with
//! FUA, durable when it completes.

mod acceptor;
mod backend;
pub mod config;
mod device;
mod notify;
pub mod poll;
mod queue;
mod ratelimit;
pub mod request;
mod ring;

#[cfg(test)]
mod frontend_tests;
#[cfg(test)]
mod tests;

use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

pub use config::VhostBlkConfig;

use crate::block::BlockNode;
use crate::runtime::Runtime;
use acceptor::Shared;
use device::Device;

/// A running vhost-user-blk export.
pub struct VhostBlkExport {
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl VhostBlkExport {
    /// Validates, binds the unix socket (removing a stale socket file),
    /// spawns the acceptor thread; returns once the socket is listening.
    pub fn start(cfg: VhostBlkConfig, node: Arc<BlockNode>) -> Result<VhostBlkExport, String> {
        cfg.validate()?;
        if cfg.writable && node.is_read_only() {
            return Err(format!("writable: node '{}' is read-only and cannot be exported writable", node.name()));
        }
        let listener = bind(&cfg.path)?;
        let ino = std::fs::metadata(&cfg.path).map(|m| (m.dev(), m.ino())).ok();
        let id = cfg.id.clone();
        let dev = Arc::new(Device::new(cfg, node.clone()));
        let shared = Arc::new(Shared::new(dev.clone()).map_err(|e| format!("cannot create an eventfd: {e}"))?);
        node.attach(&id);
        let weak = Arc::downgrade(&dev);
        node.on_resize(
            &id,
            Box::new(move |len| {
                if let Some(d) = weak.upgrade() {
                    d.set_capacity(len);
                    log::info!("vhost-user-blk export '{}': capacity is now {len} bytes", d.id());
                    d.notify_config_change();
                }
            }),
        );
        let s = shared.clone();
        let spawned = std::thread::Builder::new().name(format!("vhost-{id}")).spawn(move || {
            acceptor::run(listener, s.clone());
            finish(&s, ino);
        });
        match spawned {
            Ok(t) => {
                log::info!("vhost-user-blk export '{id}' of node '{}' listening on {}", node.name(), dev.cfg.path.display());
                Ok(VhostBlkExport { shared, thread: Mutex::new(Some(t)) })
            }
            Err(e) => {
                node.remove_resize_hooks(&id);
                node.detach(&id);
                remove_socket(&dev.cfg.path, ino);
                Err(format!("cannot start the acceptor thread of export '{id}': {e}"))
            }
        }
    }

    /// The export id.
    pub fn id(&self) -> &str {
        self.shared.dev.id()
    }

    /// The node-name of the exported node.
    pub fn node_name(&self) -> String {
        self.shared.dev.node.name().to_string()
    }

    /// Whether a frontend is connected.
    pub fn has_client(&self) -> bool {
        self.shared.connected()
    }

    /// Number of malformed requests refused since the export started.
    pub fn refused_requests(&self) -> u64 {
        self.shared.dev.refused()
    }

    /// Asks the export to stop without waiting: the client is disconnected,
    /// in-flight requests finish, the node is flushed and detached, the
    /// socket file removed, then the deleted hook runs.
    pub fn request_shutdown(&self) {
        self.shared.request_stop();
    }

    /// Stops accepting, disconnects the client, waits for in-flight requests
    /// to finish, flushes the node, detaches from it, removes the socket
    /// file. Returns when all that is done. Idempotent.
    pub fn shutdown(&self) {
        self.shared.request_stop();
        let mut slot = self.thread.lock().unwrap_or_else(|p| p.into_inner());
        // The deleted hook runs on the acceptor thread; if it drops the
        // export there, the thread is already finishing: do not join itself.
        if slot.as_ref().is_some_and(|t| t.thread().id() == std::thread::current().id()) {
            return;
        }
        let t = slot.take();
        drop(slot);
        if let Some(t) = t {
            if t.join().is_err() {
                log::error!("vhost-user-blk export '{}': the acceptor thread panicked", self.id());
            }
        }
    }

    /// Runs `hook` once the export is gone after a shutdown (for QMP's
    /// BLOCK_EXPORT_DELETED); at once if it is already gone.
    pub fn set_on_deleted(&self, hook: Box<dyn FnOnce() + Send>) {
        self.shared.set_on_deleted(hook);
    }
}

impl Drop for VhostBlkExport {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Binds the socket, removing a stale socket file (one nobody listens on).
fn bind(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(format!("addr.path: '{shown}' exists and is not a socket"));
        }
        Ok(_) => {
            if UnixStream::connect(path).is_ok() {
                return Err(format!("addr.path: '{shown}' is in use by another process"));
            }
            std::fs::remove_file(path).map_err(|e| format!("addr.path: cannot remove the stale socket '{shown}': {e}"))?;
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("addr.path: cannot inspect '{shown}': {e}")),
    }
    UnixListener::bind(path).map_err(|e| format!("addr.path: cannot listen on '{shown}': {e}"))
}

/// Removes the socket file if it is still the one we bound.
fn remove_socket(path: &Path, ino: Option<(u64, u64)>) {
    let same = std::fs::symlink_metadata(path).map(|m| Some((m.dev(), m.ino())) == ino).unwrap_or(false);
    if same {
        let _ = std::fs::remove_file(path);
    }
}

/// Last steps of an export, on its acceptor thread.
fn finish(shared: &Shared, ino: Option<(u64, u64)>) {
    let dev = &shared.dev;
    let node = dev.node.clone();
    node.remove_resize_hooks(dev.id());
    if dev.writable() {
        match Runtime::new() {
            Ok(rt) => {
                let n = node.clone();
                if let Err(e) = rt.block_on(async move { n.flush().await }) {
                    log::error!("vhost-user-blk export '{}': final flush failed: {e}", dev.id());
                }
            }
            Err(e) => log::error!("vhost-user-blk export '{}': cannot flush, no I/O runtime: {e}", dev.id()),
        }
    }
    node.detach(dev.id());
    remove_socket(&dev.cfg.path, ino);
    log::info!("vhost-user-blk export '{}' deleted", dev.id());
    shared.mark_deleted();
}
