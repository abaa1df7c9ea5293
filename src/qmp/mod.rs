//! The control socket: QMP wire protocol, commands and events.
//!
//! Layers, from the wire up:
//! - [`framing`] splits the byte stream into JSON messages (bounded);
//! - [`session`] checks requests, negotiates capabilities and runs the
//!   built-in commands, in QEMU's words;
//! - [`server`] owns the socket, one reader and one writer thread per
//!   client, and the event fan-out;
//! - [`commands`] and [`info`] are the daemon's commands and result shapes;
//!   [`args`] parses every command's arguments before it acts.
//!
//! [`Monitor`] is what `blkstack serve` starts for each `--monitor`.
//!
//! An example session (`socat - UNIX-CONNECT:/run/blkstack/qmp.sock`;
//! replies end in CRLF, as QEMU's):
//!
//! ```text
//! <- {"QMP": {"version": {"qemu": {"major": 10, "minor": 0, "micro": 0}, "package": "blkstack 0.1.0"}, "capabilities": []}}
//! -> {"execute": "qmp_capabilities"}
//! <- {"return": {}}
//! -> {"execute": "blockdev-add", "arguments": {"driver": "raw", "node-name": "disk0",
//!        "file": {"driver": "file", "filename": "/var/lib/vm.img"}}}
//! <- {"return": {}}
//! -> {"execute": "nbd-server-start", "arguments": {"addr": {"type": "unix", "data": {"path": "/run/nbd.sock"}}}}
//! <- {"return": {}}
//! -> {"execute": "block-export-add", "arguments": {"type": "nbd", "id": "e0", "node-name": "disk0", "writable": true}}
//! <- {"return": {}}
//! -> {"execute": "block_resize", "arguments": {"node-name": "disk0", "size": 21474836480}, "id": 7}
//! <- {"return": {}, "id": 7}
//! -> {"execute": "blockdev-del", "arguments": {"node-name": "disk0"}}
//! <- {"error": {"class": "GenericError", "desc": "Node 'disk0' is busy: in use by e0"}}
//! -> {"execute": "block-export-del", "arguments": {"id": "e0"}}
//! <- {"return": {}}
//! <- {"event": "BLOCK_EXPORT_DELETED", "data": {"id": "e0"}, "timestamp": {"seconds": 1764620000, "microseconds": 5120}}
//! ```
//!
//! Commands: `qmp_capabilities`, `query-version`, `query-commands`, `quit`,
//! `blockdev-add`, `blockdev-del`, `query-named-block-nodes`, `block_resize`,
//! `query-blockstats`, `block-export-add`, `block-export-del`,
//! `query-block-exports`, `nbd-server-start`, `nbd-server-stop`. Errors use
//! QEMU's classes (`GenericError`, `CommandNotFound`) and, where known, its
//! wording. QEMU's `qemu.qmp` library and `qmp-shell` work against it.

pub mod args;
pub mod commands;
pub mod error;
pub mod framing;
pub mod info;
pub mod server;
pub mod session;

use std::path::Path;
use std::sync::Arc;

pub use error::{ErrorClass, QmpError};
pub use server::Server;
pub use session::Backend;

/// A QMP monitor serving the daemon on a unix socket.
pub struct Monitor {
    server: Server,
}

impl Monitor {
    /// Binds a unix socket at `path` (mode 0600, a stale socket replaced),
    /// starts accepting clients; returns once listening.
    pub fn start(path: &Path, pretty: bool, daemon: Arc<crate::daemon::Daemon>) -> Result<Monitor, String> {
        let backend = Arc::new(commands::DaemonBackend(daemon));
        Ok(Monitor { server: Server::start(path, pretty, backend)? })
    }

    /// Stops accepting, closes client connections, removes the socket file.
    pub fn stop(self) {
        self.server.stop();
    }
}
