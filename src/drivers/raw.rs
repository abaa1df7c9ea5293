//! The `raw` format: the bytes of its `file` child, optionally a window of
//! them (`offset`, `size`). Every request passes on to the child's generic
//! layer, which owns alignment and splitting for the protocol below.

use std::sync::Arc;

use serde::Deserialize;

use crate::block::{boxed, BlockDriver, BlockError, BlockNode, BlockResult, BlockStatus, Caps, ChildRole, ErrorKind, IoFuture, IoVecs, WriteFlags};
use crate::config::types::Size;

/// Options of `raw` (besides its `file` child, which the graph builder resolves).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct RawOptions {
    /// Start of the window in the child, in bytes.
    #[serde(default)]
    pub offset: Option<Size>,
    /// Length of the window (default: to the end of the child).
    #[serde(default)]
    pub size: Option<Size>,
}

/// The `raw` driver.
pub struct RawDriver {
    file: Arc<BlockNode>,
    offset: u64,
    size: Option<u64>,
}

impl RawDriver {
    /// Wraps `file` with the window `opts` describes.
    pub fn new(file: Arc<BlockNode>, opts: &RawOptions) -> Result<Self, String> {
        let offset = opts.offset.map_or(0, |s| s.0);
        let child_len = file.length();
        if offset > child_len {
            return Err(format!("The sum of offset ({offset}) and size (0) has to be smaller or equal to the actual size of the containing file ({child_len})"));
        }
        if let Some(size) = opts.size.map(|s| s.0) {
            if offset.checked_add(size).is_none_or(|end| end > child_len) {
                return Err(format!(
                    "The sum of offset ({offset}) and size ({size}) has to be smaller or equal to the actual size of the containing file ({child_len})"
                ));
            }
        }
        Ok(RawDriver { file, offset, size: opts.size.map(|s| s.0) })
    }
}

impl BlockDriver for RawDriver {
    fn format_name(&self) -> &'static str {
        "raw"
    }

    fn caps(&self) -> Caps {
        let c = self.file.caps();
        Caps { fua: true, discard: true, write_zeroes: true, block_status: c.block_status, truncate: self.size.is_none() && c.truncate }
    }

    fn length(&self) -> u64 {
        self.size.unwrap_or_else(|| self.file.length().saturating_sub(self.offset))
    }

    fn children(&self) -> Vec<(ChildRole, Arc<BlockNode>)> {
        vec![(ChildRole::File, self.file.clone())]
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(self.file.read(self.offset + offset, buf))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, fua: bool) -> IoFuture<'a, ()> {
        boxed(self.file.write(self.offset + offset, buf, WriteFlags { fua }))
    }

    fn read_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        self.file.read_now(self.offset + offset, buf)
    }

    fn write_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        self.file.write_now(self.offset + offset, buf, WriteFlags::default())
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        boxed(self.file.flush())
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        boxed(self.file.discard(self.offset + offset, len))
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(self.file.write_zeroes(self.offset + offset, len, may_unmap, WriteFlags::default()))
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        boxed(self.file.block_status(self.offset + offset, len))
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        boxed(async move {
            if self.size.is_some() {
                return Err(BlockError::new(ErrorKind::Unsupported, "Cannot resize fixed-size raw disks"));
            }
            let end = self.offset.checked_add(len).ok_or_else(|| BlockError::new(ErrorKind::Invalid, "size too large"))?;
            self.file.truncate(end).await
        })
    }

    fn filename(&self) -> Option<String> {
        self.file.filename()
    }
}
