//! The listening socket, the acceptor thread and one thread per connection.

use std::io;
use std::net::{Shutdown, TcpListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::handshake::{self, End};
use super::registry::{Conn, Registry};
use super::socket::Socket;
use super::transmission::Session;
use super::{NbdAddr, NbdExportConfig, NbdServerConfig};
use crate::block::BlockNode;
use crate::runtime::Runtime;

enum Listener {
    Unix(UnixListener),
    Tcp(TcpListener),
}

impl Listener {
    fn raw_fd(&self) -> RawFd {
        match self {
            Listener::Unix(l) => l.as_raw_fd(),
            Listener::Tcp(l) => l.as_raw_fd(),
        }
    }

    fn accept(&self) -> io::Result<Socket> {
        match self {
            Listener::Unix(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                Ok(Socket::Unix(s))
            }
            Listener::Tcp(l) => {
                let (s, _) = l.accept()?;
                s.set_nonblocking(false)?;
                s.set_nodelay(true)?;
                Ok(Socket::Tcp(s))
            }
        }
    }
}

/// The Unix socket file we created, identified so we never remove another one.
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

struct Inner {
    max_connections: u32,
    registry: Arc<Registry>,
    stop_event: EventFd,
    stopped: AtomicBool,
    acceptor: Mutex<Option<JoinHandle<()>>>,
    socket_file: Option<SocketFile>,
    port: Option<u16>,
}

/// A running NBD server. Cheap to clone; every clone controls the same server.
#[derive(Clone)]
pub struct NbdServer {
    inner: Arc<Inner>,
}

fn bind_unix(path: &Path) -> Result<(UnixListener, SocketFile), String> {
    if let Ok(md) = std::fs::symlink_metadata(path) {
        if !md.file_type().is_socket() {
            return Err(format!("Cannot listen on '{}': the path exists and is not a socket", path.display()));
        }
        if UnixStream::connect(path).is_ok() {
            return Err(format!("Cannot listen on '{}': another server is listening there", path.display()));
        }
        std::fs::remove_file(path).map_err(|e| format!("Cannot remove stale socket '{}': {e}", path.display()))?;
    }
    let l = UnixListener::bind(path).map_err(|e| format!("Failed to bind socket to {}: {e}", path.display()))?;
    let md = std::fs::symlink_metadata(path).map_err(|e| format!("Cannot stat '{}': {e}", path.display()))?;
    Ok((l, SocketFile { path: path.to_path_buf(), dev: md.dev(), ino: md.ino() }))
}

fn bind_tcp(host: &str, port: u16) -> Result<TcpListener, String> {
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    TcpListener::bind((host, port)).map_err(|e| format!("Failed to bind socket to {host}:{port}: {e}"))
}

fn sockopt(fd: RawFd, opt: libc::c_int) -> io::Result<libc::c_int> {
    let mut v: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: `v` and `len` are live locals of the sizes getsockopt(2) is told.
    let r = unsafe { libc::getsockopt(fd, libc::SOL_SOCKET, opt, (&mut v as *mut libc::c_int).cast(), &mut len) };
    if r == 0 {
        Ok(v)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Wraps a duplicate of an inherited listening socket.
fn listener_from_fd(fd: RawFd) -> Result<Listener, String> {
    let bad = |why: String| format!("Cannot listen on fd {fd}: {why}");
    // SAFETY: fcntl(F_DUPFD_CLOEXEC) only creates a new descriptor; an
    // invalid `fd` makes it fail with EBADF.
    let dup = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if dup < 0 {
        return Err(bad(io::Error::last_os_error().to_string()));
    }
    // SAFETY: `dup` was just created above and is owned by nothing else.
    let owned = unsafe { OwnedFd::from_raw_fd(dup) };
    let stream = sockopt(dup, libc::SO_TYPE).map_err(|e| bad(e.to_string()))? == libc::SOCK_STREAM;
    let listening = sockopt(dup, libc::SO_ACCEPTCONN).map_err(|e| bad(e.to_string()))? != 0;
    if !stream || !listening {
        return Err(bad("not a listening stream socket".into()));
    }
    let domain = sockopt(dup, libc::SO_DOMAIN).map_err(|e| bad(e.to_string()))?;
    match domain {
        libc::AF_UNIX => Ok(Listener::Unix(UnixListener::from(owned))),
        libc::AF_INET | libc::AF_INET6 => Ok(Listener::Tcp(TcpListener::from(owned))),
        other => Err(bad(format!("unsupported address family {other}"))),
    }
}

impl NbdServer {
    /// Binds the address and starts accepting; returns once listening.
    pub fn start(cfg: NbdServerConfig) -> Result<NbdServer, String> {
        let (listener, socket_file, port) = match &cfg.addr {
            NbdAddr::Unix(path) => {
                let (l, f) = bind_unix(path)?;
                (Listener::Unix(l), Some(f), None)
            }
            NbdAddr::Inet { host, port } => {
                let l = bind_tcp(host, *port)?;
                let port = l.local_addr().map(|a| a.port()).ok();
                (Listener::Tcp(l), None, port)
            }
            NbdAddr::Fd(fd) => {
                let l = listener_from_fd(*fd)?;
                let port = match &l {
                    Listener::Tcp(t) => t.local_addr().map(|a| a.port()).ok(),
                    Listener::Unix(_) => None,
                };
                (l, None, port)
            }
        };
        let nonblocking = match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        };
        let stop_event = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("Cannot create an eventfd: {e}"))?;
        nonblocking.map_err(|e| format!("Cannot configure the listening socket: {e}"))?;
        let inner = Arc::new(Inner {
            max_connections: cfg.max_connections,
            registry: Arc::new(Registry::default()),
            stop_event,
            stopped: AtomicBool::new(false),
            acceptor: Mutex::new(None),
            socket_file,
            port,
        });
        let acc = inner.clone();
        let handle = std::thread::Builder::new()
            .name("nbd-accept".into())
            .spawn(move || acc.accept_loop(listener))
            .map_err(|e| format!("Cannot start the NBD acceptor thread: {e}"))?;
        *inner.acceptor.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
        Ok(NbdServer { inner })
    }

    /// Exports `node` as `exp.name`; the name and id must be unused.
    pub fn add_export(&self, exp: NbdExportConfig, node: Arc<BlockNode>) -> Result<(), String> {
        self.inner.registry.add_export(exp, node)
    }

    /// Stops exporting `name`: no new clients, existing clients are closed
    /// after their in-flight requests; `on_gone` runs once the last client is
    /// gone (at once if there is none), after the node was detached.
    pub fn remove_export(&self, name: &str, on_gone: Box<dyn FnOnce() + Send>) -> Result<(), String> {
        self.inner.registry.remove_export(name, on_gone)
    }

    /// The names of the current exports.
    pub fn export_names(&self) -> Vec<String> {
        self.inner.registry.names()
    }

    /// Whether a client is connected to an export called `name` (also one
    /// removed but still draining).
    pub fn has_clients(&self, name: &str) -> bool {
        self.inner.registry.has_clients(name)
    }

    /// Number of open client connections (in handshake or transmission).
    pub fn connections(&self) -> usize {
        self.inner.registry.connections()
    }

    /// The TCP port listened on (useful with port 0); `None` for Unix sockets.
    pub fn inet_port(&self) -> Option<u16> {
        self.inner.port
    }

    /// Stops accepting, removes the Unix socket file, removes every export
    /// (as [`Self::remove_export`] without a callback; call that first to be
    /// told when an export is gone) and closes every connection after its
    /// in-flight requests. Returns without waiting for the connections; see
    /// [`Self::wait_idle`]. Calling it again does nothing.
    pub fn stop(&self) {
        if self.inner.stopped.swap(true, Ordering::SeqCst) {
            return;
        }
        let _ = self.inner.stop_event.write(1);
        let handle = self.inner.acceptor.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            if h.join().is_err() {
                log::error!("nbd: the acceptor thread panicked");
            }
        }
        if let Some(f) = &self.inner.socket_file {
            let ours = std::fs::symlink_metadata(&f.path).is_ok_and(|m| m.dev() == f.dev && m.ino() == f.ino);
            if ours {
                let _ = std::fs::remove_file(&f.path);
            }
        }
        self.inner.registry.shut_down();
    }

    /// Waits until every connection has finished, at most `timeout`; true if all did.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        self.inner.registry.wait_idle(timeout)
    }
}

impl Inner {
    fn accept_loop(self: Arc<Self>, listener: Listener) {
        let mut next_id: u64 = 1;
        loop {
            let mut fds = [
                libc::pollfd { fd: listener.raw_fd(), events: libc::POLLIN, revents: 0 },
                libc::pollfd { fd: self.stop_event.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            ];
            // SAFETY: `fds` is a valid array of two pollfds for the duration of the call.
            let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if fds[1].revents != 0 || self.stopped.load(Ordering::SeqCst) {
                return;
            }
            if r <= 0 {
                continue;
            }
            match listener.accept() {
                Ok(sock) => self.start_connection(next_id, sock),
                Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted) => continue,
                Err(e) if e.raw_os_error() == Some(libc::ECONNABORTED) => continue,
                Err(e) => {
                    // Out of file descriptors or memory: back off instead of spinning.
                    log::error!("nbd: accept failed: {e}");
                    std::thread::sleep(Duration::from_millis(100));
                    continue;
                }
            }
            next_id += 1;
        }
    }

    fn start_connection(&self, id: u64, sock: Socket) {
        let conn = Conn::new(id, sock);
        if !self.registry.register(&conn, self.max_connections) {
            super::warn_client(format_args!(
                "nbd: refusing a client: {} connections are open (max-connections)",
                self.max_connections
            ));
            conn.socket.shutdown(Shutdown::Both);
            return;
        }
        let (reg, c) = (self.registry.clone(), conn.clone());
        let spawned = std::thread::Builder::new().name(format!("nbd-conn-{id}")).spawn(move || serve(&reg, &c));
        if let Err(e) = spawned {
            log::error!("nbd: cannot start a connection thread: {e}");
            conn.socket.shutdown(Shutdown::Both);
            self.registry.unregister(&conn);
        }
    }
}

/// Serves one connection from handshake to close, on the calling thread.
pub(crate) fn serve(reg: &Registry, conn: &Arc<Conn>) {
    let id = conn.id;
    match handshake::run(reg, conn) {
        Ok(neg) => {
            log::debug!("nbd: connection {id} uses export '{}'", neg.export.cfg.name);
            match Runtime::new() {
                Ok(rt) => {
                    let rt = Rc::new(rt);
                    Session::new(conn.clone(), neg).drive(&rt);
                }
                Err(e) => log::error!("nbd: connection {id}: cannot create a runtime: {e}"),
            }
        }
        Err(End::Aborted) => log::debug!("nbd: connection {id}: client aborted the handshake"),
        Err(End::Io(e)) => log::debug!("nbd: connection {id}: handshake ended: {e}"),
        Err(End::Violation(why)) => super::warn_client(format_args!("nbd: connection {id}: {why}; dropping the client")),
    }
    // Free the slot (max-connections) before the client sees the close, so a
    // client that reconnects after end-of-file is not turned away.
    reg.unregister(conn);
    conn.socket.shutdown(Shutdown::Both);
}
