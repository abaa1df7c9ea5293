//! NBD server export (fixed newstyle handshake, structured replies).
//!
//! [`NbdServer::start`] listens on a Unix or TCP socket; exports are added
//! and removed at run time ([`NbdServer::add_export`],
//! [`NbdServer::remove_export`]), each serving one
//! [`BlockNode`](crate::block::BlockNode) under a
//! name. The daemon's `--nbd-server` / `--export type=nbd` options and the
//! QMP commands `nbd-server-start`, `block-export-add` / `-del` call this
//! interface.
//!
//! # Protocol
//!
//! Fixed newstyle negotiation with `NO_ZEROES`; options `GO`, `INFO`,
//! `EXPORT_NAME`, `LIST`, `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`
//! and `SET_META_CONTEXT` (`base:allocation`). No TLS, no extended headers.
//! Commands `READ` (one data chunk with structured replies), `WRITE` (with
//! `FUA`), `FLUSH`, `TRIM`, `WRITE_ZEROES` (`NO_HOLE`, `FAST_ZERO`),
//! `BLOCK_STATUS` (`REQ_ONE`), `CACHE` (accepted, no effect) and `DISC`.
//! Block sizes advertised: minimum = the node's request alignment,
//! preferred = max(4 KiB, minimum), maximum payload 32 MiB. Every export
//! advertises `CAN_MULTI_CONN`: all connections share the node and a flush
//! reaches the same driver whichever connection sends it.
//!
//! Decisions where the protocol leaves a choice:
//! - The empty export name selects the export named "" if there is one,
//!   else the only export when exactly one exists.
//! - Unaligned requests are served (the block layer pads them).
//! - When `max_connections` clients are connected, a new client is accepted
//!   and closed at once (it sees end-of-file before the greeting).
//! - A writable export of a read-only node is refused when added.
//!
//! # Threads
//!
//! One acceptor thread polls the listening socket and a stop eventfd. Each
//! connection gets its own thread: a blocking handshake (under a 30 s
//! deadline), then a [`Runtime`](crate::runtime::Runtime) on which the
//! request reader and one task per request run, with socket and block I/O
//! through the thread's io_uring. See `transmission.rs` for pipelining,
//! memory bounds and what happens when a connection is closed.
//!
//! # Hostile clients
//!
//! A client that sends garbage (bad magic, unknown client flags, option
//! data longer than 1 MiB, a `WRITE` payload over 32 MiB), stalls in the
//! handshake, or disconnects mid-request is dropped; nothing it sends is
//! allocated before its length has been checked, and no other connection
//! is affected. Other bad requests get the protocol's error values.

mod handshake;
mod proto;
mod registry;
mod request;
mod server;
mod socket;
mod transmission;

#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use server::NbdServer;

/// Where the server listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdAddr {
    /// A Unix socket path (created; a stale socket there is replaced).
    Unix(PathBuf),
    /// A TCP address; port 0 picks a free port ([`NbdServer::inet_port`]).
    Inet { host: String, port: u16 },
    /// An inherited listening stream socket, Unix or TCP (systemd socket
    /// activation, `addr.type=fd`). The server uses a duplicate of it and
    /// leaves the original descriptor (and any socket file) alone.
    Fd(std::os::fd::RawFd),
}

/// `--nbd-server` / `nbd-server-start` arguments.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdServerConfig {
    /// The listening address.
    pub addr: NbdAddr,
    /// Most simultaneous client connections; 0 means unlimited.
    pub max_connections: u32,
}

/// One NBD export (`--export type=nbd,...`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdExportConfig {
    /// The block export id (unique among exports).
    pub id: String,
    /// The name clients ask for (QEMU's default is the node-name).
    pub name: String,
    /// Shown by `NBD_OPT_LIST` and `NBD_INFO_DESCRIPTION`.
    pub description: Option<String>,
    /// Accept writes.
    pub writable: bool,
}

/// Warnings about misbehaving clients: at most this many per window.
const WARNINGS_PER_WINDOW: u32 = 10;
const WARNING_WINDOW: Duration = Duration::from_secs(10);

/// Logs a warning about a misbehaving client, rate-limited so that a flood
/// of bad clients cannot flood the log (the excess goes to debug level and
/// is counted).
pub(crate) fn warn_client(args: std::fmt::Arguments<'_>) {
    static STATE: Mutex<(Option<Instant>, u32, u64)> = Mutex::new((None, 0, 0));
    let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
    let now = Instant::now();
    if st.0.is_none_or(|start| now.duration_since(start) >= WARNING_WINDOW) {
        if st.2 > 0 {
            log::warn!("nbd: {} more client warnings were not logged", st.2);
        }
        *st = (Some(now), 0, 0);
    }
    if st.1 < WARNINGS_PER_WINDOW {
        st.1 += 1;
        log::warn!("{args}");
    } else {
        st.2 += 1;
        log::debug!("{args}");
    }
}
