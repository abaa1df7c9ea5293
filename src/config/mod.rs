//! Parsing of `--blockdev` / `--export` / `--nbd-server` / `--config`
//! (dotted key=value and JSON) into typed options, and building block nodes
//! from them.

pub mod blockdev;
pub mod export;
pub mod keyval;
pub mod serve;
pub mod types;

pub use keyval::parse_arg;
