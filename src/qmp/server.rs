//! The listening socket, its clients and event delivery.
//!
//! Threads: one accepts connections; each client has a reader (reads,
//! splits, runs commands, queues replies) and a writer (writes what is
//! queued, in order); one event pump per server copies every daemon event
//! into the queue of each client that has finished capabilities negotiation.
//!
//! Bounds, so that no client can hurt the daemon or the other clients:
//! - a message larger than [`MAX_MESSAGE`] closes that client (after an
//!   error reply), since the stream cannot be resynchronised;
//! - each client's output queue holds [`QUEUE_LEN`] messages; a client that
//!   lets it fill up by not reading is disconnected by the event pump rather
//!   than slowing delivery to the others (replies to its own commands just
//!   wait: that only slows the client that is not reading);
//! - at most [`MAX_CLIENTS`] clients per socket; more are closed at once.
//!
//! Commands of all clients (of every monitor) run one at a time, like QEMU
//! commands under its big lock. [`Server::stop`] waits for a command in
//! flight, then disconnects everyone, so none runs after it returns.
//!
//! The socket is created with mode 0600 without a window in which it is
//! reachable with wider permissions: it is bound inside a fresh 0700
//! directory next to the target, chmod-ed, then renamed into place. A stale
//! socket at the path is replaced; any other kind of file is left alone and
//! `start` fails. `stop` removes the socket only if it is still ours.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, FileTypeExt, MetadataExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::Value;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::error::QmpError;
use super::framing::{Splitter, TooLarge};
use super::session::{encode, greeting, After, Backend, Response, Session};

/// Largest accepted message.
pub const MAX_MESSAGE: usize = 4 << 20;
/// Messages queued for one client before the event pump gives up on it.
pub const QUEUE_LEN: usize = 1024;
/// Clients served at once on one socket.
pub const MAX_CLIENTS: usize = 64;
/// How often the event pump checks whether the server stopped.
const PUMP_TICK: Duration = Duration::from_millis(500);
/// How long a reply that must be written before acting (to `quit`, to an
/// oversized message) may wait for a client that does not read.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Serialises command execution across every client of every monitor.
static DISPATCH: Mutex<()> = Mutex::new(());

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// One queued output message; `done` is signalled once it was written.
struct Out {
    bytes: Vec<u8>,
    done: Option<mpsc::Sender<()>>,
}

struct ClientHandle {
    id: u64,
    stream: UnixStream,
    /// `None` once the client is closing (its writer flushes what is queued).
    tx: Option<SyncSender<Out>>,
    negotiated: Arc<AtomicBool>,
}

struct Shared {
    backend: Arc<dyn Backend>,
    pretty: bool,
    clients: Mutex<Vec<ClientHandle>>,
    readers: Mutex<Vec<JoinHandle<()>>>,
    stopping: AtomicBool,
    next_id: AtomicU64,
}

/// A QMP server on one unix socket.
pub struct Server {
    shared: Arc<Shared>,
    stop_fd: Arc<EventFd>,
    accept: Option<JoinHandle<()>>,
    path: PathBuf,
    ident: (u64, u64),
}

impl Server {
    /// Listens on `path` and serves `backend`; returns once listening.
    pub fn start(path: &Path, pretty: bool, backend: Arc<dyn Backend>) -> Result<Server, String> {
        let listener = bind_private(path)?;
        let meta = std::fs::symlink_metadata(path).map_err(|e| format!("cannot stat '{}': {e}", path.display()))?;
        let ident = (meta.dev(), meta.ino());
        let fail = |e: String| {
            remove_if_ours(path, ident);
            e
        };
        listener.set_nonblocking(true).map_err(|e| fail(format!("cannot set up '{}': {e}", path.display())))?;
        let stop_fd = Arc::new(EventFd::new(EFD_NONBLOCK).map_err(|e| fail(format!("cannot create an eventfd: {e}")))?);
        let shared = Arc::new(Shared {
            backend,
            pretty,
            clients: Mutex::new(Vec::new()),
            readers: Mutex::new(Vec::new()),
            stopping: AtomicBool::new(false),
            next_id: AtomicU64::new(1),
        });
        let events = shared.backend.subscribe();
        let pump_shared = shared.clone();
        std::thread::Builder::new()
            .name("qmp-events".into())
            .spawn(move || pump(&pump_shared, events))
            .map_err(|e| fail(format!("cannot start the QMP event thread: {e}")))?;
        let (acc_shared, acc_stop) = (shared.clone(), stop_fd.clone());
        let accept = std::thread::Builder::new().name("qmp-accept".into()).spawn(move || accept_loop(&acc_shared, &listener, &acc_stop));
        let accept = match accept {
            Ok(h) => h,
            Err(e) => {
                shared.stopping.store(true, Ordering::SeqCst);
                return Err(fail(format!("cannot start the QMP accept thread: {e}")));
            }
        };
        log::info!("QMP monitor listening on {}", path.display());
        Ok(Server { shared, stop_fd, accept: Some(accept), path: path.to_path_buf(), ident })
    }

    /// Stops accepting, waits for a command in flight, closes every client
    /// connection and removes the socket file.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let Some(accept) = self.accept.take() else { return };
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.stop_fd.write(1) {
            log::error!("cannot wake the QMP accept thread: {e}");
        }
        let _ = accept.join();
        drop(lock(&DISPATCH)); // a command in flight finishes; no new one starts
        for c in std::mem::take(&mut *lock(&self.shared.clients)) {
            let _ = c.stream.shutdown(std::net::Shutdown::Both);
        }
        for r in std::mem::take(&mut *lock(&self.shared.readers)) {
            let _ = r.join();
        }
        remove_if_ours(&self.path, self.ident);
        log::info!("QMP monitor on {} stopped", self.path.display());
    }

    /// Number of connected clients.
    pub fn clients(&self) -> usize {
        lock(&self.shared.clients).len()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn remove_if_ours(path: &Path, ident: (u64, u64)) {
    match std::fs::symlink_metadata(path) {
        Ok(m) if (m.dev(), m.ino()) == ident => {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("cannot remove '{}': {e}", path.display());
            }
        }
        _ => {}
    }
}

/// Binds a 0600 listening socket at `path` (see the module docs).
fn bind_private(path: &Path) -> Result<UnixListener, String> {
    let shown = path.display();
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => std::fs::remove_file(path).map_err(|e| format!("cannot replace the stale socket '{shown}': {e}"))?,
        Ok(_) => return Err(format!("'{shown}' exists and is not a socket; not replacing it")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot stat '{shown}': {e}")),
    }
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let dir = private_dir(&parent).map_err(|e| format!("cannot create a private directory in '{}': {e}", parent.display()))?;
    let tmp = dir.join("s");
    let r = (|| {
        let l = UnixListener::bind(&tmp).map_err(|e| format!("cannot bind '{shown}': {e}"))?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600)).map_err(|e| format!("cannot chmod '{shown}': {e}"))?;
        std::fs::rename(&tmp, path).map_err(|e| format!("cannot create '{shown}': {e}"))?;
        Ok(l)
    })();
    let _ = std::fs::remove_file(&tmp);
    let _ = std::fs::remove_dir(&dir);
    r
}

fn private_dir(parent: &Path) -> std::io::Result<PathBuf> {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let mut last = None;
    for _ in 0..16 {
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.subsec_nanos());
        let dir = parent.join(format!(".qmp{}.{n}{nanos:x}", std::process::id()));
        match std::fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => return Ok(dir),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => last = Some(e),
            Err(e) => return Err(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no free name")))
}

/// Waits until the listener or the stop eventfd is readable; true: stop.
fn wait_readable(listener: &UnixListener, stop: &EventFd) -> bool {
    let mut fds = [
        libc::pollfd { fd: listener.as_raw_fd(), events: libc::POLLIN, revents: 0 },
        libc::pollfd { fd: stop.as_raw_fd(), events: libc::POLLIN, revents: 0 },
    ];
    // SAFETY: `fds` is a valid array of two pollfds that outlives the call.
    let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
    r > 0 && fds[1].revents != 0
}

fn accept_loop(shared: &Arc<Shared>, listener: &UnixListener, stop: &EventFd) {
    loop {
        if wait_readable(listener, stop) || shared.stopping.load(Ordering::SeqCst) {
            return;
        }
        match listener.accept() {
            Ok((stream, _)) => add_client(shared, stream),
            Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::Interrupted) => {}
            Err(e) => {
                // Out of fds or memory: back off instead of spinning.
                log::warn!("QMP accept failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn add_client(shared: &Arc<Shared>, stream: UnixStream) {
    let mut clients = lock(&shared.clients);
    if clients.len() >= MAX_CLIENTS {
        log::warn!("QMP: {MAX_CLIENTS} clients connected already; refusing another");
        return;
    }
    let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
    let handles = (stream.set_nonblocking(false), stream.try_clone(), stream.try_clone());
    let (Ok(()), Ok(writer_stream), Ok(registry_stream)) = handles else {
        log::warn!("QMP client {id}: cannot set up the connection");
        return;
    };
    let (tx, rx) = mpsc::sync_channel(QUEUE_LEN);
    let negotiated = Arc::new(AtomicBool::new(false));
    let writer = std::thread::Builder::new().name(format!("qmp-out-{id}")).spawn(move || write_loop(writer_stream, &rx));
    let Ok(writer) = writer else {
        log::warn!("QMP client {id}: cannot start its writer thread");
        return;
    };
    let client = Client { id, shared: shared.clone(), stream, tx: tx.clone(), negotiated: negotiated.clone() };
    let reader = std::thread::Builder::new().name(format!("qmp-in-{id}")).spawn(move || {
        client.serve();
        client.finish(writer);
    });
    match reader {
        Ok(h) => {
            clients.push(ClientHandle { id, stream: registry_stream, tx: Some(tx), negotiated });
            let mut readers = lock(&shared.readers);
            readers.retain(|r| !r.is_finished());
            readers.push(h);
            log::debug!("QMP client {id} connected");
        }
        Err(e) => {
            log::warn!("QMP client {id}: cannot start its reader thread: {e}");
            let _ = registry_stream.shutdown(std::net::Shutdown::Both);
        }
    }
}

fn write_loop(mut stream: UnixStream, rx: &Receiver<Out>) {
    for out in rx {
        if stream.write_all(&out.bytes).is_err() {
            let _ = stream.shutdown(std::net::Shutdown::Both);
            return;
        }
        if let Some(done) = out.done {
            let _ = done.send(());
        }
    }
}

/// Copies every event to every negotiated client.
fn pump(shared: &Shared, events: Receiver<Value>) {
    loop {
        match events.recv_timeout(PUMP_TICK) {
            Ok(ev) => fan_out(shared, &ev),
            Err(RecvTimeoutError::Timeout) => {
                if shared.stopping.load(Ordering::SeqCst) {
                    return;
                }
            }
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

fn fan_out(shared: &Shared, ev: &Value) {
    let bytes = encode(ev, shared.pretty);
    lock(&shared.clients).retain(|c| {
        let Some(tx) = c.tx.as_ref().filter(|_| c.negotiated.load(Ordering::SeqCst)) else { return true };
        match tx.try_send(Out { bytes: bytes.clone(), done: None }) {
            Ok(()) => true,
            Err(TrySendError::Full(_)) => {
                log::warn!("QMP client {}: {QUEUE_LEN} messages unread; disconnecting it", c.id);
                let _ = c.stream.shutdown(std::net::Shutdown::Both);
                false
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    });
}

/// The reader side of one connection.
struct Client {
    id: u64,
    shared: Arc<Shared>,
    stream: UnixStream,
    tx: SyncSender<Out>,
    negotiated: Arc<AtomicBool>,
}

impl Client {
    fn send(&self, v: &impl serde::Serialize) -> bool {
        self.tx.send(Out { bytes: encode(v, self.shared.pretty), done: None }).is_ok()
    }

    /// Queues the reply to `qmp_capabilities` and turns event delivery on,
    /// atomically with respect to the event pump (which holds the registry
    /// lock while it copies an event): every event comes either before the
    /// client's negotiation (not sent) or after this reply (sent).
    fn send_negotiated(&self, resp: &Response) -> bool {
        let out = Out { bytes: encode(resp, self.shared.pretty), done: None };
        let registry = lock(&self.shared.clients);
        match self.tx.try_send(out) {
            Ok(()) => {
                self.negotiated.store(true, Ordering::SeqCst);
                true
            }
            Err(TrySendError::Full(out)) => {
                // A client that pipelined a full queue of requests without
                // reading: wait for room without blocking the pump.
                drop(registry);
                let ok = self.tx.send(out).is_ok();
                self.negotiated.store(true, Ordering::SeqCst);
                ok
            }
            Err(TrySendError::Disconnected(_)) => false,
        }
    }

    /// Queues `v` and waits until it has been written (or the writer died).
    fn send_flushed(&self, v: &impl serde::Serialize) {
        let (done, written) = mpsc::channel();
        if self.tx.send(Out { bytes: encode(v, self.shared.pretty), done: Some(done) }).is_ok() && written.recv_timeout(FLUSH_WAIT).is_err() {
            log::warn!("QMP client {}: reply not written within {FLUSH_WAIT:?}", self.id);
        }
    }

    fn serve(&self) {
        if !self.send(&greeting()) {
            return;
        }
        let mut splitter = Splitter::new(MAX_MESSAGE);
        let mut session = Session::new();
        let mut buf = vec![0u8; 64 * 1024];
        let mut frames = Vec::new();
        let mut stream = &self.stream;
        loop {
            let n = match stream.read(&mut buf) {
                Ok(0) => return,
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return,
            };
            let fed = splitter.feed(&buf[..n], &mut frames);
            for frame in frames.drain(..) {
                if !self.answer(&mut session, frame) {
                    return;
                }
            }
            if let Err(TooLarge(max)) = fed {
                log::warn!("QMP client {}: message larger than {max} bytes; closing the connection", self.id);
                let desc = format!("JSON message larger than {max} bytes; closing the connection");
                self.send_flushed(&Response { result: Err(QmpError::generic(desc)), id: None });
                return;
            }
        }
    }

    /// Runs one frame; false: stop serving this client.
    fn answer(&self, session: &mut Session, frame: super::framing::Frame) -> bool {
        let (resp, after) = {
            let _serial = lock(&DISPATCH);
            if self.shared.stopping.load(Ordering::SeqCst) {
                return false;
            }
            session.handle(frame, &*self.shared.backend)
        };
        match after {
            After::Nothing => self.send(&resp),
            After::Negotiated => self.send_negotiated(&resp),
            After::Quit => {
                self.send_flushed(&resp);
                log::info!("QMP client {}: quit", self.id);
                self.shared.backend.request_quit();
                true
            }
        }
    }

    /// Lets the writer flush what is queued, then closes and unregisters.
    /// The registry keeps the stream meanwhile, so that `stop` can still cut
    /// a writer stuck on a client that does not read.
    fn finish(self, writer: JoinHandle<()>) {
        let Client { id, shared, stream, tx, .. } = self;
        if let Some(c) = lock(&shared.clients).iter_mut().find(|c| c.id == id) {
            c.tx = None;
        }
        drop(tx);
        let _ = writer.join();
        lock(&shared.clients).retain(|c| c.id != id);
        let _ = stream.shutdown(std::net::Shutdown::Both);
        log::debug!("QMP client {id} disconnected");
    }
}

#[cfg(test)]
mod tests;
