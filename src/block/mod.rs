//! The block layer core: drivers, nodes, the graph and the generic request layer.

pub mod driver;
pub mod error;
pub mod graph;
pub mod iovec;
pub mod node;
pub mod request;
pub mod shard;
pub mod stats;

pub use driver::{boxed, BlockDriver, BlockStatus, Caps, ChildRole, IoFuture, Limits};
pub use error::{BlockError, BlockResult, ErrorKind};
pub use graph::{BlockGraph, GraphError};
pub use iovec::{AlignedBuf, IoVecs};
pub use node::{BlockNode, DetectZeroes, NodeOptions};
pub use request::WriteFlags;
pub use stats::{IoKind, StatsSnapshot};

#[cfg(test)]
mod tests;
