//! `blkstack serve`: set everything up from the configuration, serve until
//! SIGTERM / SIGINT / QMP `quit`, then drain, flush and exit 0.
//!
//! Start-up is all-or-nothing: the configuration is parsed and checked first;
//! then nodes, the NBD server, exports and monitors are created in that
//! order, and if any fails, everything created so far is shut down again
//! (sockets removed, files closed) and `serve` returns the error. With
//! `--daemonize` the parent process waits for the child to report success or
//! the error, so it exits 0 only once every export is up.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::Daemon;
use crate::config::serve::{ServeArgs, ServeConfig};
use crate::qmp::commands::DaemonBackend;
use crate::qmp::Server as Monitor;

/// Runs `blkstack serve`. Returns when the daemon has shut down.
pub fn serve(args: ServeArgs) -> Result<(), String> {
    let cfg = ServeConfig::from_args(&args)?;
    raise_nofile();
    let report = if cfg.daemonize { Some(daemonize()?) } else { None };
    let signals = block_signals().map_err(|e| format!("cannot set up signal handling: {e}"));
    let started = signals.and_then(|sfd| start(&cfg).map(|s| (sfd, s)));
    let (sfd, (daemon, monitors)) = match started {
        Ok(v) => v,
        Err(e) => {
            if let Some(mut pipe) = report {
                let _ = pipe.write_all(e.as_bytes());
            }
            return Err(e);
        }
    };
    let pidfile = cfg.pidfile.as_deref().map(write_pidfile).transpose();
    let pidfile = match pidfile {
        Ok(p) => p,
        Err(e) => {
            stop(&daemon, monitors);
            if let Some(mut pipe) = report {
                let _ = pipe.write_all(e.as_bytes());
            }
            return Err(e);
        }
    };
    if let Some(pipe) = report {
        drop(pipe); // EOF without a message: the parent exits 0.
    }
    sd_notify("READY=1");
    log::info!("serving ({} node(s), {} export(s))", daemon.graph().nodes().len(), daemon.query_exports().len());
    wait_for_quit(&sfd, daemon.quit_fd());
    log::info!("shutting down");
    sd_notify("STOPPING=1");
    stop(&daemon, monitors);
    if let Some(p) = pidfile {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

fn start(cfg: &ServeConfig) -> Result<(Arc<Daemon>, Vec<Monitor>), String> {
    let daemon = Daemon::new().map_err(|e| format!("cannot create the daemon: {e}"))?;
    let mut monitors = Vec::new();
    let r = (|| {
        for (i, b) in cfg.blockdevs.iter().enumerate() {
            daemon.blockdev_add(b.clone()).map_err(|e| format!("--blockdev #{}: {e}", i + 1))?;
        }
        if let Some(n) = &cfg.nbd_server {
            daemon.nbd_server_start(n).map_err(|e| format!("--nbd-server: {e}"))?;
        }
        for e in &cfg.exports {
            daemon.export_add(e.clone()).map_err(|err| format!("--export id={}: {err}", e.id()))?;
        }
        for m in &cfg.monitors {
            let Some(c) = cfg.chardevs.iter().find(|c| c.id == m.chardev) else {
                return Err(format!("--monitor: chardev '{}' not found", m.chardev));
            };
            monitors.push(Monitor::start(&c.path, m.pretty, Arc::new(DaemonBackend(daemon.clone()))).map_err(|e| format!("--monitor chardev={}: {e}", m.chardev))?);
        }
        Ok(())
    })();
    match r {
        Ok(()) => Ok((daemon, monitors)),
        Err(e) => {
            stop(&daemon, monitors);
            Err(e)
        }
    }
}

fn stop(daemon: &Arc<Daemon>, monitors: Vec<Monitor>) {
    for m in monitors {
        m.stop();
    }
    daemon.shutdown();
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and every thread it
/// starts later) and returns a signalfd that reads them.
fn block_signals() -> std::io::Result<File> {
    // SAFETY: plain libc signal-set manipulation on a local sigset_t.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let fd = libc::signalfd(-1, &set, libc::SFD_CLOEXEC);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(File::from_raw_fd(fd))
    }
}

/// Waits for SIGTERM/SIGINT or a quit request; SIGHUP is ignored.
fn wait_for_quit(sfd: &File, quit_fd: i32) {
    loop {
        let mut fds = [
            libc::pollfd { fd: sfd.as_raw_fd(), events: libc::POLLIN, revents: 0 },
            libc::pollfd { fd: quit_fd, events: libc::POLLIN, revents: 0 },
        ];
        // SAFETY: `fds` is a valid array of two pollfds.
        let r = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
        if r < 0 {
            continue;
        }
        if fds[1].revents != 0 {
            log::info!("quit requested");
            return;
        }
        if fds[0].revents != 0 {
            let mut info = [0u8; 128];
            let mut f = sfd;
            if f.read(&mut info).is_ok() {
                let signo = u32::from_ne_bytes([info[0], info[1], info[2], info[3]]) as i32;
                if signo == libc::SIGHUP {
                    log::info!("SIGHUP ignored");
                    continue;
                }
                log::info!("signal {signo} received");
                return;
            }
        }
    }
}

/// Forks; the parent waits for the child's verdict and exits; the child
/// returns the write end of the verdict pipe.
fn daemonize() -> Result<File, String> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills the two-element array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(format!("cannot daemonize: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: both fds were just created and are owned here.
    let (mut rd, wr) = unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) };
    // SAFETY: fork before any thread exists (serve calls this first).
    match unsafe { libc::fork() } {
        -1 => Err(format!("cannot daemonize: {}", std::io::Error::last_os_error())),
        0 => {
            drop(rd);
            // SAFETY: setsid and dup2 on standard fds in the new child.
            unsafe {
                libc::setsid();
                let null = libc::open(c"/dev/null".as_ptr(), libc::O_RDWR);
                if null >= 0 {
                    libc::dup2(null, 0);
                    libc::dup2(null, 1);
                    libc::close(null);
                }
            }
            Ok(wr)
        }
        _ => {
            drop(wr);
            let mut msg = String::new();
            let _ = rd.read_to_string(&mut msg);
            if msg.is_empty() {
                std::process::exit(0);
            }
            eprintln!("blkstack: {msg}");
            std::process::exit(1);
        }
    }
}

fn write_pidfile(path: &Path) -> Result<PathBuf, String> {
    std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| format!("cannot write pidfile '{}': {e}", path.display()))?;
    Ok(path.to_path_buf())
}

/// Raises the soft limit on open files to the hard limit (at most 2^20).
///
/// Every export holds several descriptors per queue (kick and call
/// eventfds, the queue thread's epoll, io_uring and wake fds) and every
/// `file` node one more per thread that reads it, so a daemon serving a few
/// dozen multi-queue exports passes the soft limit of 1024 that systemd and
/// most shells set; nothing here uses `select(2)`, which is why that limit
/// exists. A limit that cannot be raised is left as it is (logged).
fn raise_nofile() {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } != 0 {
        return;
    }
    let want = lim.rlim_max.min(1 << 20);
    if lim.rlim_cur >= want {
        return;
    }
    let new = libc::rlimit { rlim_cur: want, rlim_max: lim.rlim_max };
    // SAFETY: setrlimit reads the struct we pass.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &new) } != 0 {
        log::warn!("cannot raise the open-file limit from {} to {want}: {}", lim.rlim_cur, std::io::Error::last_os_error());
    }
}

/// Tells systemd (Type=notify) about our state, if it asked.
fn sd_notify(state: &str) {
    let Some(path) = std::env::var_os("NOTIFY_SOCKET") else { return };
    let Ok(sock) = std::os::unix::net::UnixDatagram::unbound() else { return };
    let bytes = std::os::unix::ffi::OsStrExt::as_bytes(path.as_os_str()).to_vec();
    let r = if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(name).and_then(|a| sock.send_to_addr(state.as_bytes(), &a))
    } else {
        sock.send_to(state.as_bytes(), std::path::Path::new(&path))
    };
    if let Err(e) = r {
        log::warn!("sd_notify: {e}");
    }
}
