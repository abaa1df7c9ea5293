//! The server's exports and connections, and their life cycle.
//!
//! One mutex guards both maps, so that "a client attaches to an export" and
//! "the export is removed" are ordered: either the client finds the export
//! and is then closed by the removal, or it does not find it.
//!
//! Removing an export takes it out of the name map at once (no new client
//! can reach it), asks each of its connections to close (they finish the
//! requests already read, then hang up), and keeps the removal callback
//! until the last of those connections is gone. Then the node is detached
//! (`BlockNode::detach(export id)`) and the callback runs, outside any lock.

use std::collections::BTreeMap;
use std::net::Shutdown;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use super::proto::*;
use super::request::MAX_PAYLOAD;
use super::socket::Socket;
use super::NbdExportConfig;
use crate::block::BlockNode;

type OnGone = Box<dyn FnOnce() + Send>;

#[derive(Default)]
struct Clients {
    count: usize,
    removed: bool,
    on_gone: Option<OnGone>,
}

/// An exported node and how it is exported.
pub struct Export {
    /// The configuration it was added with.
    pub cfg: NbdExportConfig,
    /// The node served.
    pub node: Arc<BlockNode>,
    clients: Mutex<Clients>,
}

impl Export {
    fn clients(&self) -> MutexGuard<'_, Clients> {
        self.clients.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The export's size in bytes.
    pub fn size(&self) -> u64 {
        self.node.length()
    }

    /// The transmission flags for a client; `SEND_DF` only with structured replies.
    pub fn transmission_flags(&self, structured: bool) -> u16 {
        let mut f = FLAG_HAS_FLAGS | FLAG_SEND_FLUSH | FLAG_SEND_FUA | FLAG_CAN_MULTI_CONN | FLAG_SEND_CACHE;
        if self.cfg.writable {
            f |= FLAG_SEND_TRIM | FLAG_SEND_WRITE_ZEROES | FLAG_SEND_FAST_ZERO;
        } else {
            f |= FLAG_READ_ONLY;
        }
        if structured {
            f |= FLAG_SEND_DF;
        }
        f
    }

    /// (minimum, preferred, maximum) for `NBD_INFO_BLOCK_SIZE`: the minimum
    /// is the node's request alignment, the preferred size at least 4 KiB.
    pub fn block_sizes(&self) -> (u32, u32, u32) {
        let align = self.node.limits().request_alignment.max(1);
        let min = align.checked_next_power_of_two().unwrap_or(1 << 16).min(1 << 16);
        (min, min.max(4096), MAX_PAYLOAD)
    }
}

/// One client connection as the registry sees it.
pub struct Conn {
    /// Unique per server.
    pub id: u64,
    /// The socket (kept open until the connection thread finishes).
    pub socket: Socket,
    closing: AtomicBool,
    export: Mutex<Option<Arc<Export>>>,
    /// The eventfd of the runtime serving the connection, while it runs.
    waker: Mutex<Option<RawFd>>,
}

impl Conn {
    /// Wraps an accepted socket.
    pub fn new(id: u64, socket: Socket) -> Arc<Conn> {
        Arc::new(Conn {
            id,
            socket,
            closing: AtomicBool::new(false),
            export: Mutex::new(None),
            waker: Mutex::new(None),
        })
    }

    /// Asks the connection to finish: the reader sees end-of-file, requests
    /// already read complete, then the connection closes. The connection's
    /// runtime is woken so it can start the drain grace period.
    pub fn close(&self) {
        self.closing.store(true, Ordering::SeqCst);
        self.socket.shutdown(Shutdown::Read);
        let waker = self.waker.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(fd) = *waker {
            let one = 1u64.to_ne_bytes();
            // SAFETY: `fd` is the serving runtime's eventfd, open while it is
            // registered here (the runtime unregisters it under this lock
            // before closing it); we write 8 bytes from a live array.
            unsafe { libc::write(fd, one.as_ptr().cast(), one.len()) };
        }
    }

    /// Registers (or with `None`, removes) the eventfd that [`Self::close`] signals.
    pub fn set_waker(&self, fd: Option<RawFd>) {
        *self.waker.lock().unwrap_or_else(|p| p.into_inner()) = fd;
    }

    /// Whether [`Self::close`] was called.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    fn export(&self) -> Option<Arc<Export>> {
        self.export.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

#[derive(Default)]
struct State {
    exports: BTreeMap<String, Arc<Export>>,
    conns: BTreeMap<u64, Arc<Conn>>,
    shut_down: bool,
}

/// Exports by name and live connections.
#[derive(Default)]
pub struct Registry {
    state: Mutex<State>,
    idle: Condvar,
}

impl Registry {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Adds an export; refuses duplicate names and ids, bad names, and a
    /// writable export of a read-only node. Attaches the node on success.
    pub fn add_export(&self, cfg: NbdExportConfig, node: Arc<BlockNode>) -> Result<(), String> {
        if cfg.name.len() > MAX_STRING || cfg.name.contains('\0') {
            return Err(format!("NBD export name must be at most {MAX_STRING} bytes without NUL characters"));
        }
        if cfg.description.as_ref().is_some_and(|d| d.len() > MAX_STRING) {
            return Err(format!("NBD export description must be at most {MAX_STRING} bytes"));
        }
        if cfg.writable && node.is_read_only() {
            return Err(format!("Cannot export node '{}' writable: the node is read-only", node.name()));
        }
        let mut st = self.lock();
        if st.shut_down {
            return Err("The NBD server is not running".to_string());
        }
        if st.exports.contains_key(&cfg.name) {
            return Err(format!("NBD server already has an export named '{}'", cfg.name));
        }
        if st.exports.values().any(|e| e.cfg.id == cfg.id) {
            return Err(format!("Block export id '{}' is already in use", cfg.id));
        }
        node.attach(&cfg.id);
        let name = cfg.name.clone();
        st.exports.insert(name, Arc::new(Export { cfg, node, clients: Mutex::default() }));
        Ok(())
    }

    /// Removes an export by name (see the module documentation).
    pub fn remove_export(&self, name: &str, on_gone: OnGone) -> Result<(), String> {
        let mut st = self.lock();
        let exp = st.exports.remove(name).ok_or_else(|| format!("Export '{name}' is not found"))?;
        let conns: Vec<Arc<Conn>> =
            st.conns.values().filter(|c| c.export().is_some_and(|e| Arc::ptr_eq(&e, &exp))).cloned().collect();
        drop(st);
        let mut cl = exp.clients();
        cl.removed = true;
        if cl.count > 0 {
            cl.on_gone = Some(on_gone);
            drop(cl);
            conns.iter().for_each(|c| c.close());
            return Ok(());
        }
        drop(cl);
        exp.node.detach(&exp.cfg.id);
        on_gone();
        Ok(())
    }

    /// Finds an export for a client. The empty name selects the export named
    /// "" if there is one, else the only export if there is exactly one.
    pub fn lookup(&self, name: &str) -> Option<Arc<Export>> {
        let st = self.lock();
        if let Some(e) = st.exports.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && st.exports.len() == 1 {
            return st.exports.values().next().cloned();
        }
        None
    }

    /// Every export, in name order.
    pub fn list(&self) -> Vec<Arc<Export>> {
        self.lock().exports.values().cloned().collect()
    }

    /// The export names, in order.
    pub fn names(&self) -> Vec<String> {
        self.lock().exports.keys().cloned().collect()
    }

    /// Makes `conn` a client of `exp`, if `exp` is still exported.
    pub fn attach(&self, conn: &Conn, exp: &Arc<Export>) -> bool {
        let st = self.lock();
        let live = st.exports.get(&exp.cfg.name).is_some_and(|e| Arc::ptr_eq(e, exp));
        if !live || conn.is_closing() {
            return false;
        }
        exp.clients().count += 1;
        *conn.export.lock().unwrap_or_else(|p| p.into_inner()) = Some(exp.clone());
        true
    }

    /// Registers a new connection; refused once the server shut down or when
    /// `max` (if nonzero) connections are live.
    pub fn register(&self, conn: &Arc<Conn>, max: u32) -> bool {
        let mut st = self.lock();
        if st.shut_down || (max != 0 && st.conns.len() >= max as usize) {
            return false;
        }
        st.conns.insert(conn.id, conn.clone());
        true
    }

    /// Forgets a finished connection; runs a pending removal callback if it
    /// was the last client of a removed export.
    pub fn unregister(&self, conn: &Conn) {
        let exp = conn.export.lock().unwrap_or_else(|p| p.into_inner()).take();
        {
            let mut st = self.lock();
            st.conns.remove(&conn.id);
            if st.conns.is_empty() {
                self.idle.notify_all();
            }
        }
        let Some(exp) = exp else { return };
        let on_gone = {
            let mut cl = exp.clients();
            cl.count = cl.count.saturating_sub(1);
            if cl.count == 0 && cl.removed {
                cl.on_gone.take()
            } else {
                None
            }
        };
        if let Some(f) = on_gone {
            exp.node.detach(&exp.cfg.id);
            f();
        }
    }

    /// Number of live connections.
    pub fn connections(&self) -> usize {
        self.lock().conns.len()
    }

    /// Whether any connection (also one still draining after its export was
    /// removed) is a client of an export called `name`.
    pub fn has_clients(&self, name: &str) -> bool {
        self.lock().conns.values().any(|c| c.export().is_some_and(|e| e.cfg.name == name))
    }

    /// Refuses new connections and exports, removes every export and closes
    /// every connection.
    pub fn shut_down(&self) {
        let (names, conns) = {
            let mut st = self.lock();
            st.shut_down = true;
            (st.exports.keys().cloned().collect::<Vec<_>>(), st.conns.values().cloned().collect::<Vec<_>>())
        };
        for name in names {
            let _ = self.remove_export(&name, Box::new(|| {}));
        }
        conns.iter().for_each(|c| c.close());
    }

    /// Waits until no connection is live, at most `timeout`; true if none is.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut st = self.lock();
        while !st.conns.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            st = self.idle.wait_timeout(st, left).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        true
    }
}
