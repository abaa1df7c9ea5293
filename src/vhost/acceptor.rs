//! The acceptor thread: serves one frontend at a time on the export's
//! socket, with a fresh `VhostUserDaemon` per connection.
//!
//! vhost-user-backend's handler refuses a second SET_OWNER and keeps the
//! negotiated state of the first frontend, so a daemon cannot serve the
//! next connection after a disconnect. Each connection therefore gets a new
//! daemon, a new [`BlkBackend`] and new queue threads, over the same
//! [`Device`] (node, capacity, write-cache mode).
//!
//! States of the loop:
//!
//! - *idle*: wait until the socket is readable (or a stop is requested),
//!   then let a new daemon accept the connection;
//! - *connected*: a helper thread waits for the daemon's request thread to
//!   end; meanwhile every further connection on the socket is accepted and
//!   closed (logged), which never disturbs the connected frontend. A new
//!   connection first gets a grace period in which the current one may end
//!   (a frontend that reconnects at once can be faster than the daemon
//!   noticing the old connection's end); then it waits to be served;
//! - *draining*: the frontend is gone; every in-flight request of that
//!   connection runs to completion (see [`BlkBackend::teardown`]), then the
//!   daemon and its threads are dropped. New connections wait in the
//!   socket's backlog meanwhile and are served afterwards.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::thread;

use vhost::vhost_user::{Error as VuError, Listener};
use vhost_user_backend::{Error as DaemonError, VhostUserDaemon};
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::backend::BlkBackend;
use super::device::Device;

/// A callback run once the export is gone.
pub type DeletedHook = Box<dyn FnOnce() + Send>;

/// State shared between the export handle and its acceptor thread.
pub struct Shared {
    /// The device.
    pub dev: Arc<Device>,
    stop: EventFd,
    stopping: AtomicBool,
    connected: AtomicBool,
    deleted: Mutex<(bool, Option<DeletedHook>)>,
}

impl Shared {
    /// State for `dev`.
    pub fn new(dev: Arc<Device>) -> io::Result<Self> {
        Ok(Shared {
            dev,
            stop: EventFd::new(EFD_NONBLOCK)?,
            stopping: AtomicBool::new(false),
            connected: AtomicBool::new(false),
            deleted: Mutex::new((false, None)),
        })
    }

    /// Whether a frontend is connected.
    pub fn connected(&self) -> bool {
        self.connected.load(SeqCst)
    }

    /// Asks the acceptor to disconnect the client and stop.
    pub fn request_stop(&self) {
        self.stopping.store(true, SeqCst);
        let _ = self.stop.write(1);
    }

    fn stopping(&self) -> bool {
        self.stopping.load(SeqCst)
    }

    /// Runs `hook` once the export is gone (at once if it already is).
    pub fn set_on_deleted(&self, hook: DeletedHook) {
        let mut d = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
        if d.0 {
            drop(d);
            hook();
        } else {
            d.1 = Some(hook);
        }
    }

    /// Marks the export deleted and runs the hook.
    pub fn mark_deleted(&self) {
        let hook = {
            let mut d = self.deleted.lock().unwrap_or_else(|p| p.into_inner());
            d.0 = true;
            d.1.take()
        };
        if let Some(hook) = hook {
            hook();
        }
    }

    fn id(&self) -> &str {
        self.dev.id()
    }
}

/// How long a new connection waits for the current one to end before it is
/// refused: a frontend that reconnects at once may be faster than the
/// daemon's noticing of its previous connection's end.
const RECONNECT_GRACE_MS: i32 = 1000;

/// Waits until one of `fds` is readable (at most `timeout_ms`, -1: forever);
/// returns a readiness mask (bit i = fds[i]), 0 on timeout.
fn wait_readable(fds: &[RawFd], timeout_ms: i32) -> io::Result<u32> {
    let mut pfds: Vec<libc::pollfd> = fds.iter().map(|&fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 }).collect();
    loop {
        // SAFETY: `pfds` is a valid array of `pfds.len()` pollfd structs for the call.
        let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, timeout_ms) };
        if r >= 0 {
            break;
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
    Ok(pfds.iter().enumerate().filter(|(_, p)| p.revents != 0).fold(0, |m, (i, _)| m | 1 << i))
}

/// The acceptor loop; returns when a stop was requested.
pub fn run(listener: UnixListener, shared: Arc<Shared>) {
    let fds = [listener.as_raw_fd(), shared.stop.as_raw_fd()];
    while !shared.stopping() {
        match wait_readable(&fds, -1) {
            Ok(ready) if ready & 1 != 0 && !shared.stopping() => serve_connection(&listener, &shared),
            Ok(_) => {}
            Err(e) => {
                log::error!("vhost-user-blk export '{}': cannot wait for connections: {e}", shared.id());
                break;
            }
        }
    }
}

/// Accepts and closes a connection nobody will serve.
fn refuse(listener: &UnixListener, shared: &Shared, why: &str) {
    if let Ok((stream, _)) = listener.accept() {
        drop(stream);
        shared.dev.log.warn(shared.id(), format_args!("refused a frontend connection: {why}"));
    }
}

fn serve_connection(listener: &UnixListener, shared: &Arc<Shared>) {
    let id = shared.id().to_string();
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = match BlkBackend::new(shared.dev.clone(), mem.clone()) {
        Ok(b) => Arc::new(b),
        Err(e) => return fail_setup(listener, shared, &format!("cannot create the backend: {e}")),
    };
    let mut daemon = match VhostUserDaemon::new(format!("vhost-{id}"), backend.clone(), mem) {
        Ok(d) => d,
        Err(e) => return fail_setup(listener, shared, &format!("cannot create the daemon: {e}")),
    };
    backend.set_handlers(&daemon.get_epoll_handlers());
    let started = listener.try_clone().map_err(|e| e.to_string()).and_then(|l| {
        let mut l = Listener::from(l);
        daemon.start(&mut l).map_err(|e| e.to_string())
    });
    if let Err(e) = started {
        log::error!("vhost-user-blk export '{id}': cannot accept a frontend: {e}");
        backend.teardown();
        return;
    }
    shared.connected.store(true, SeqCst);
    log::info!("vhost-user-blk export '{id}': frontend connected");
    let result = supervise(listener, shared, daemon);
    backend.teardown();
    match result {
        // Dropping the daemon stops and joins its queue threads.
        Ok((daemon, err)) => {
            drop(daemon);
            match err {
                None => log::info!("vhost-user-blk export '{id}': frontend disconnected"),
                Some(e) => log::warn!("vhost-user-blk export '{id}': connection ended: {e}"),
            }
        }
        Err(e) => log::error!("vhost-user-blk export '{id}': {e}"),
    }
    shared.connected.store(false, SeqCst);
}

fn fail_setup(listener: &UnixListener, shared: &Shared, msg: &str) {
    log::error!("vhost-user-blk export '{}': {msg}", shared.id());
    refuse(listener, shared, msg);
}

/// Whether a daemon error is just the frontend going away.
fn is_disconnect(e: &DaemonError) -> bool {
    matches!(e, DaemonError::HandleRequest(VuError::Disconnected | VuError::PartialMessage | VuError::SocketBroken(_)))
}

type Daemon = VhostUserDaemon<Arc<BlkBackend>>;

/// Waits for the connection to end while refusing other frontends.
/// Returns the daemon and the connection's error, if it was more than a
/// disconnect.
fn supervise(listener: &UnixListener, shared: &Arc<Shared>, mut daemon: Daemon) -> Result<(Daemon, Option<String>), String> {
    let handle = daemon.shutdown_handle();
    let done = EventFd::new(EFD_NONBLOCK).map_err(|e| format!("cannot create an eventfd: {e}"))?;
    let done_w = done.try_clone().map_err(|e| format!("cannot clone an eventfd: {e}"))?;
    let waiter = thread::Builder::new()
        .name(format!("vhost-{}-conn", shared.id()))
        .spawn(move || {
            let r = daemon.wait();
            let _ = done_w.write(1);
            (daemon, r.err().filter(|e| !is_disconnect(e)).map(|e| e.to_string()))
        })
        .map_err(|e| format!("cannot start the connection thread: {e}"))?;
    let mut shut = false;
    loop {
        let fds = [listener.as_raw_fd(), done.as_raw_fd(), shared.stop.as_raw_fd()];
        let n = if shut { 2 } else { 3 };
        let ready = match wait_readable(&fds[..n], -1) {
            Ok(r) => r,
            Err(e) => {
                // Cannot supervise: end the connection and wait for it below.
                log::error!("vhost-user-blk export '{}': cannot wait for the connection: {e}", shared.id());
                if let Some(h) = &handle {
                    h.shutdown();
                }
                break;
            }
        };
        if ready & 2 != 0 {
            break;
        }
        if ready & 4 != 0 && shared.stopping() {
            shut = true;
            if let Some(h) = &handle {
                h.shutdown();
            }
        }
        if ready & 1 != 0 {
            // Serve it next if the current connection is just ending.
            if wait_readable(&fds[1..2], RECONNECT_GRACE_MS).unwrap_or(0) != 0 {
                break;
            }
            refuse(listener, shared, "another frontend is already connected");
        }
    }
    waiter.join().map_err(|_| "the connection thread panicked".to_string())
}
