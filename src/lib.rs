//! blkstack: a userspace block-storage daemon.
//!
//! The crate is the library behind the `blkstack` binary. See
//! `docs/architecture.md` for the map of modules.

pub mod bench;
pub mod block;
pub mod config;
pub mod daemon;
pub mod drivers;
pub mod nbd;
pub mod qmp;
pub mod replication;
pub mod runtime;
pub mod vhost;
