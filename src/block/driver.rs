//! The `BlockDriver` trait: what a protocol, format or filter driver implements.
//!
//! Drivers see only requests the generic layer (`node.rs`) has already
//! checked: in bounds, aligned to [`Limits::request_alignment`], no larger than
//! [`Limits::max_transfer`], and never a write on a read-only node. Optional
//! operations default to "unsupported"; the generic layer emulates what it can
//! (write-zeroes with a zero buffer, FUA with write + flush) and reports the
//! rest cleanly.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use super::error::{BlockError, BlockResult};
use super::iovec::IoVecs;
use super::node::BlockNode;

/// The future every driver operation returns. Not `Send`: a request runs on
/// the worker thread that received it.
pub type IoFuture<'a, T> = Pin<Box<dyn Future<Output = BlockResult<T>> + 'a>>;

/// Wraps an async block as an [`IoFuture`].
pub fn boxed<'a, T>(f: impl Future<Output = BlockResult<T>> + 'a) -> IoFuture<'a, T> {
    Box::pin(f)
}

/// Request limits a driver declares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Offsets and lengths must be multiples of this (a power of two, ≥ 1).
    pub request_alignment: u32,
    /// Buffer addresses and segment lengths must be multiples of this.
    pub mem_alignment: u32,
    /// Largest request passed down, in bytes (a multiple of the alignment).
    pub max_transfer: u64,
    /// Largest number of segments in one request.
    pub max_iov: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { request_alignment: 1, mem_alignment: 1, max_transfer: 1 << 30, max_iov: 1024 }
    }
}

/// What a driver can do natively.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    /// Writes honour FUA themselves.
    pub fua: bool,
    /// `discard` is implemented.
    pub discard: bool,
    /// `write_zeroes` is implemented.
    pub write_zeroes: bool,
    /// `block_status` reports real allocation (not just "all data").
    pub block_status: bool,
    /// `truncate` is implemented.
    pub truncate: bool,
}

/// The allocation state of a range, as `block_status` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockStatus {
    /// The range is allocated in this node (or below it, for filters).
    pub allocated: bool,
    /// The range reads as zeroes.
    pub zero: bool,
    /// The range holds data (as opposed to a hole).
    pub data: bool,
    /// How many bytes from the start share this state (≥ 1, ≤ the asked length).
    pub len: u64,
}

/// The role a child plays for its parent, as in QEMU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChildRole {
    /// The protocol node under a format (or a filter's filtered child).
    File,
    /// The backing image of a format.
    Backing,
    /// External data file.
    Data,
    /// One child of a quorum or blkverify.
    Child,
}

impl ChildRole {
    /// QEMU's name for the role.
    pub fn name(self) -> &'static str {
        match self {
            ChildRole::File => "file",
            ChildRole::Backing => "backing",
            ChildRole::Data => "data-file",
            ChildRole::Child => "child",
        }
    }
}

/// A block driver. Implementations are shared by all worker threads.
pub trait BlockDriver: Send + Sync {
    /// The driver's QEMU name (`file`, `raw`, `null-co`, ...).
    fn format_name(&self) -> &'static str;

    /// The driver's request limits.
    fn limits(&self) -> Limits {
        Limits::default()
    }

    /// What the driver implements natively.
    fn caps(&self) -> Caps {
        Caps::default()
    }

    /// Current length in bytes.
    fn length(&self) -> u64;

    /// The children this driver uses, with their roles.
    fn children(&self) -> Vec<(ChildRole, Arc<BlockNode>)> {
        Vec::new()
    }

    /// Reads `buf.len()` bytes at `offset`.
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()>;

    /// Writes `buf` at `offset`; with `fua`, durable on return (only if `caps().fua`).
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, fua: bool) -> IoFuture<'a, ()>;

    /// Serves a read on the calling thread, at once, where that involves no
    /// waiting (a page-cache hit, a null device); `None` sends the request
    /// the asynchronous way ([`Self::read`]), which must then do it whole
    /// (part of it may have been done here: reading it again is harmless).
    /// This is the fast path that spares a request its task and its boxed
    /// futures. A driver that may wait — throttling, breakpoints, the
    /// network, a metadata lookup that is not cached — keeps the default.
    /// Same contract as `read` otherwise.
    fn read_now(&self, _offset: u64, _buf: &IoVecs) -> Option<BlockResult<()>> {
        None
    }

    /// [`Self::read_now`] for a write without FUA. `None` may follow a
    /// partial write; [`Self::write`] then writes the whole buffer again
    /// (the same bytes to the same place).
    fn write_now(&self, _offset: u64, _buf: &IoVecs) -> Option<BlockResult<()>> {
        None
    }

    /// Makes completed writes durable.
    fn flush(&self) -> IoFuture<'_, ()>;

    /// Drops the data in a range (advisory; reads may return old data or zeroes).
    fn discard(&self, _offset: u64, _len: u64) -> IoFuture<'_, ()> {
        boxed(async { Err(BlockError::unsupported("discard")) })
    }

    /// Makes a range read as zeroes; `may_unmap` allows deallocating it.
    fn write_zeroes(&self, _offset: u64, _len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(async { Err(BlockError::unsupported("write-zeroes")) })
    }

    /// The allocation state at `offset` (for at most `len` bytes).
    fn block_status(&self, _offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        boxed(async move { Ok(BlockStatus { allocated: true, zero: false, data: true, len }) })
    }

    /// Makes the image read as empty (all zeroes / unallocated), as block
    /// jobs' commit does to an overlay; formats implement it.
    fn make_empty(&self) -> IoFuture<'_, ()> {
        boxed(async { Err(BlockError::unsupported("make-empty")) })
    }

    /// Changes the length.
    fn truncate(&self, _len: u64) -> IoFuture<'_, ()> {
        boxed(async { Err(BlockError::unsupported("resize")) })
    }

    /// The file name shown by `query-named-block-nodes`, if any.
    fn filename(&self) -> Option<String> {
        None
    }
}
