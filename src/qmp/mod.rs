//! The control socket: QMP wire protocol, commands and events.

pub mod args;
pub mod error;
pub mod framing;

pub use error::{ErrorClass, QmpError};
