//! Block drivers: protocols (`file`, `null-co`/`null-aio`) and formats (`raw`).
//! Each driver has a serde options struct named after QEMU's keys (unknown
//! keys are refused) and implements [`crate::block::BlockDriver`].

pub mod file;
pub mod null;
pub mod raw;
