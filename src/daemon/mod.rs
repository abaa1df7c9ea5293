//! The running daemon: the block graph, the exports, the NBD server and the
//! event bus, with the operations `blkstack serve` and QMP perform on them.
//!
//! Every operation validates everything before it changes anything, so a
//! failed call leaves the daemon as it was. Operations run on the thread that
//! calls them (the main thread at start-up, a monitor thread later); the data
//! path runs on the exports' own threads and never takes these locks.

mod serve;

use std::sync::mpsc::{Receiver, Sender};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::block::BlockGraph;
use crate::config::export::{ExportOptions, NbdServerOptions, SocketAddr};
use crate::nbd::{NbdAddr, NbdExportConfig, NbdServer, NbdServerConfig};
use crate::vhost::{VhostBlkConfig, VhostBlkExport};

pub use serve::serve;

enum Running {
    Vhost(VhostBlkExport),
    Nbd { name: String },
}

struct Export {
    opts: ExportOptions,
    running: Running,
}

/// How `block-export-del` treats connected clients.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum DeleteMode {
    /// Refuse while a client is connected.
    #[default]
    Safe,
    /// Disconnect clients.
    Hard,
}

/// What `query-block-exports` reports for one export.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ExportInfo {
    /// Export id.
    pub id: String,
    /// `vhost-user-blk` or `nbd`.
    #[serde(rename = "type")]
    pub kind: String,
    /// The exported node.
    #[serde(rename = "node-name")]
    pub node_name: String,
    /// Whether the export is being shut down.
    #[serde(rename = "shutting-down")]
    pub shutting_down: bool,
}

/// The daemon's state.
pub struct Daemon {
    graph: BlockGraph,
    exports: Mutex<Vec<Export>>,
    nbd: Mutex<Option<Arc<NbdServer>>>,
    subscribers: Mutex<Vec<Sender<Value>>>,
    quit: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Daemon {
    /// An empty daemon.
    pub fn new() -> std::io::Result<Arc<Daemon>> {
        Ok(Arc::new(Daemon {
            graph: BlockGraph::new(),
            exports: Mutex::new(Vec::new()),
            nbd: Mutex::new(None),
            subscribers: Mutex::new(Vec::new()),
            quit: EventFd::new(EFD_NONBLOCK)?,
        }))
    }

    /// The block graph.
    pub fn graph(&self) -> &BlockGraph {
        &self.graph
    }

    /// `blockdev-add`.
    pub fn blockdev_add(&self, v: Value) -> Result<(), String> {
        crate::config::blockdev::add(&self.graph, v).map(|_| ())
    }

    /// `blockdev-del`: refused while an export or a parent uses the node.
    pub fn blockdev_del(&self, name: &str) -> Result<(), String> {
        let node = self.graph.remove(name).map_err(|e| e.to_string())?;
        if let Err(e) = crate::runtime::block_on(async move { node.flush().await }).map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
            log::warn!("flush of deleted node '{name}' failed: {e}");
        }
        Ok(())
    }

    /// `nbd-server-start`.
    pub fn nbd_server_start(&self, opts: &NbdServerOptions) -> Result<(), String> {
        let mut nbd = lock(&self.nbd);
        if nbd.is_some() {
            return Err("NBD server already running".into());
        }
        let addr = match &opts.addr {
            SocketAddr::Unix(p) => NbdAddr::Unix(p.clone()),
            SocketAddr::Inet { host, port } => NbdAddr::Inet { host: host.clone(), port: *port },
            SocketAddr::Fd(fd) => NbdAddr::Fd(*fd),
        };
        let server = NbdServer::start(NbdServerConfig { addr, max_connections: opts.max_connections })?;
        *nbd = Some(Arc::new(server));
        Ok(())
    }

    /// `nbd-server-stop`: as in qemu-storage-daemon, the NBD exports go with
    /// the server (their clients are disconnected) and each one's
    /// `BLOCK_EXPORT_DELETED` follows.
    pub fn nbd_server_stop(&self) -> Result<(), String> {
        let mut nbd = lock(&self.nbd);
        let Some(server) = nbd.take() else { return Err("NBD server not running".into()) };
        let removed: Vec<String> = {
            let mut exports = lock(&self.exports);
            let ids = exports.iter().filter(|e| matches!(e.running, Running::Nbd { .. })).map(|e| e.opts.id().to_string()).collect();
            exports.retain(|e| !matches!(e.running, Running::Nbd { .. }));
            ids
        };
        server.stop();
        for id in removed {
            self.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
        }
        Ok(())
    }

    /// `block-export-add`.
    pub fn export_add(&self, opts: ExportOptions) -> Result<(), String> {
        let mut exports = lock(&self.exports);
        if exports.iter().any(|e| e.opts.id() == opts.id()) {
            return Err(format!("Block export id '{}' is already in use", opts.id()));
        }
        let node = self.graph.get(opts.node_name()).map_err(|e| e.to_string())?;
        let running = match &opts {
            ExportOptions::VhostUserBlk(o) => {
                if o.writable && node.is_read_only() {
                    return Err(format!("Cannot export read-only node '{}' as writable", o.node_name));
                }
                let path = match &o.addr {
                    SocketAddr::Unix(p) => p.clone(),
                    _ => return Err("Parameter 'addr.type': vhost-user-blk listens on a unix socket path".into()),
                };
                let narrow = |v: u64, key: &str, max: u64| if v <= max { Ok(v) } else { Err(format!("Parameter '{key}' is too large: {v} (at most {max})")) };
                let cfg = VhostBlkConfig {
                    id: o.id.clone(),
                    path,
                    writable: o.writable,
                    num_queues: narrow(o.num_queues, "num-queues", u16::MAX.into())? as u16,
                    logical_block_size: narrow(o.logical_block_size, "logical-block-size", u32::MAX.into())? as u32,
                    queue_size: narrow(o.queue_size, "queue-size", u16::MAX.into())? as u16,
                    serial: o.serial.clone(),
                    poll_us: o.poll_us,
                    poll_max_ns: o.poll_max_ns,
                    poll_grow: o.poll_grow,
                    poll_shrink: o.poll_shrink,
                    cpu_affinity: o.cpu_affinity.clone(),
                };
                cfg.validate()?;
                Running::Vhost(VhostBlkExport::start(cfg, node)?)
            }
            ExportOptions::Nbd(o) => {
                if o.writable && node.is_read_only() {
                    return Err(format!("Cannot export read-only node '{}' as writable", o.node_name));
                }
                let nbd = lock(&self.nbd);
                let server = nbd.as_ref().ok_or("NBD server not running (use --nbd-server or nbd-server-start)")?;
                let cfg = NbdExportConfig { id: o.id.clone(), name: o.name.clone(), description: o.description.clone(), writable: o.writable };
                server.add_export(cfg, node)?;
                Running::Nbd { name: o.name.clone() }
            }
        };
        exports.push(Export { opts, running });
        Ok(())
    }

    /// `block-export-del`; `BLOCK_EXPORT_DELETED` follows once the export is gone.
    pub fn export_del(self: &Arc<Self>, id: &str, mode: DeleteMode) -> Result<(), String> {
        let mut exports = lock(&self.exports);
        let idx = exports.iter().position(|e| e.opts.id() == id).ok_or_else(|| format!("Export '{id}' is not found"))?;
        let in_use = match &exports[idx].running {
            Running::Vhost(v) => v.has_client(),
            Running::Nbd { name } => lock(&self.nbd).as_ref().is_some_and(|s| s.has_clients(name)),
        };
        if in_use && mode == DeleteMode::Safe {
            return Err(format!("export '{id}' still in use (use mode=hard to disconnect its clients)"));
        }
        let export = exports.remove(idx);
        drop(exports);
        let me = self.clone();
        let id = id.to_string();
        match export.running {
            Running::Vhost(v) => {
                std::thread::Builder::new()
                    .name(format!("del-{id}"))
                    .spawn(move || {
                        v.shutdown();
                        me.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }));
                    })
                    .map_err(|e| format!("cannot start the export shutdown: {e}"))?;
            }
            Running::Nbd { name } => {
                let server = lock(&self.nbd).clone();
                match server {
                    Some(s) => s.remove_export(&name, Box::new(move || me.emit("BLOCK_EXPORT_DELETED", json!({ "id": id }))))?,
                    None => self.emit("BLOCK_EXPORT_DELETED", json!({ "id": id })),
                }
            }
        }
        Ok(())
    }

    /// `query-block-exports`.
    pub fn query_exports(&self) -> Vec<ExportInfo> {
        lock(&self.exports)
            .iter()
            .map(|e| ExportInfo {
                id: e.opts.id().to_string(),
                kind: match e.opts {
                    ExportOptions::VhostUserBlk(_) => "vhost-user-blk".into(),
                    ExportOptions::Nbd(_) => "nbd".into(),
                },
                node_name: e.opts.node_name().to_string(),
                shutting_down: false,
            })
            .collect()
    }

    /// Sends a QMP event to every subscriber.
    pub fn emit(&self, name: &str, data: Value) {
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default();
        let ev = json!({ "event": name, "data": data, "timestamp": { "seconds": now.as_secs(), "microseconds": now.subsec_micros() } });
        lock(&self.subscribers).retain(|s| s.send(ev.clone()).is_ok());
    }

    /// Receives every event emitted from now on.
    pub fn subscribe(&self) -> Receiver<Value> {
        let (tx, rx) = std::sync::mpsc::channel();
        lock(&self.subscribers).push(tx);
        rx
    }

    /// Asks the main loop to shut down (QMP `quit`).
    pub fn request_quit(&self) {
        let _ = self.quit.write(1);
    }

    /// The fd that becomes readable when quit was requested.
    pub fn quit_fd(&self) -> i32 {
        use std::os::fd::AsRawFd;
        self.quit.as_raw_fd()
    }

    /// Stops every export and the NBD server, waits for in-flight requests,
    /// and flushes every node.
    pub fn shutdown(&self) {
        let exports: Vec<Export> = std::mem::take(&mut *lock(&self.exports));
        for e in exports {
            if let Running::Vhost(v) = e.running {
                v.shutdown();
            }
        }
        if let Some(server) = lock(&self.nbd).take() {
            server.stop();
        }
        let nodes = self.graph.nodes();
        let flushed = crate::runtime::block_on(async move {
            for n in nodes {
                if let Err(e) = n.flush().await {
                    log::error!("flush of node '{}' failed: {e}", n.name());
                }
            }
        });
        if let Err(e) = flushed {
            log::error!("cannot flush at shutdown: {e}");
        }
    }
}
