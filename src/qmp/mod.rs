//! The control socket: QMP wire protocol, commands and events.

pub mod args;
pub mod error;
pub mod framing;
pub mod server;
pub mod session;

pub use error::{ErrorClass, QmpError};
pub use server::Server;
pub use session::Backend;
