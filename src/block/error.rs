//! Block-layer errors: a stable kind, context, and the errno every export
//! turns into its wire status (virtio status byte, ublk result, NBD error).

use std::fmt;
use std::io;

/// What went wrong, independent of where.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    /// The request reaches past the end of the node.
    OutOfRange,
    /// A write-type request on a read-only node.
    ReadOnly,
    /// The driver cannot do this operation (and the generic layer cannot emulate it).
    Unsupported,
    /// The request itself is malformed (bad alignment, bad flags).
    Invalid,
    /// The device or file returned an I/O error.
    Io,
    /// No space left on the backing store.
    NoSpace,
}

/// An error from the block layer: the kind, a short context and the OS errno.
#[derive(Debug, Clone)]
pub struct BlockError {
    kind: ErrorKind,
    errno: i32,
    context: String,
}

impl BlockError {
    /// Creates an error of `kind` with a context message; the errno is the kind's default.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        let errno = match kind {
            ErrorKind::OutOfRange | ErrorKind::Invalid => libc::EINVAL,
            ErrorKind::ReadOnly => libc::EROFS,
            ErrorKind::Unsupported => libc::ENOTSUP,
            ErrorKind::Io => libc::EIO,
            ErrorKind::NoSpace => libc::ENOSPC,
        };
        BlockError { kind, errno, context: context.into() }
    }

    /// Wraps an OS error (`errno`) that happened while doing `context`.
    pub fn from_errno(errno: i32, context: impl Into<String>) -> Self {
        let kind = match errno {
            libc::ENOSPC | libc::EDQUOT => ErrorKind::NoSpace,
            libc::EOPNOTSUPP => ErrorKind::Unsupported,
            libc::EINVAL => ErrorKind::Invalid,
            libc::EROFS | libc::EPERM | libc::EACCES => ErrorKind::ReadOnly,
            _ => ErrorKind::Io,
        };
        BlockError { kind, errno, context: context.into() }
    }

    /// Wraps a `std::io::Error`.
    pub fn from_io(e: &io::Error, context: impl Into<String>) -> Self {
        Self::from_errno(e.raw_os_error().unwrap_or(libc::EIO), context)
    }

    /// The error's kind.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The positive errno that describes this error.
    pub fn errno(&self) -> i32 {
        self.errno
    }

    /// Shorthand for an unsupported operation.
    pub fn unsupported(what: &str) -> Self {
        Self::new(ErrorKind::Unsupported, format!("{what} is not supported"))
    }
}

impl fmt::Display for BlockError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.context, io::Error::from_raw_os_error(self.errno))
    }
}

impl std::error::Error for BlockError {}

/// The result type of block-layer operations.
pub type BlockResult<T> = Result<T, BlockError>;
