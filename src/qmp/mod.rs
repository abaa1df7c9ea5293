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
