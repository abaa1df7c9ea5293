//! The control socket: QMP wire protocol, commands and events.
