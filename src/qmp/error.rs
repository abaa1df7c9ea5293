//! QMP errors: a QEMU error class and a human-readable description.

use serde::Serialize;

/// QEMU's `QapiErrorClass` values that blkstack uses.
///
/// QEMU keeps a few legacy classes besides `GenericError`; the ones here are
/// those a client can see from blkstack's commands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorClass {
    /// Anything that is not one of the classes below.
    GenericError,
    /// Unknown command, or a command before / after capabilities negotiation.
    CommandNotFound,
    /// A named device (block backend) does not exist. QEMU's commands that
    /// blkstack implements report missing nodes and exports as
    /// `GenericError`; this class is kept for commands that take a device id.
    DeviceNotFound,
}

/// The `error` member of a QMP reply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct QmpError {
    /// Machine-readable class.
    pub class: ErrorClass,
    /// Human-readable description.
    pub desc: String,
}

impl QmpError {
    /// A `GenericError`.
    pub fn generic(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::GenericError, desc: desc.into() }
    }

    /// A `CommandNotFound` error.
    pub fn command_not_found(desc: impl Into<String>) -> Self {
        QmpError { class: ErrorClass::CommandNotFound, desc: desc.into() }
    }

    /// QEMU's "Parameter 'x' is missing".
    pub fn missing(key: &str) -> Self {
        Self::generic(format!("Parameter '{key}' is missing"))
    }

    /// QEMU's "Invalid parameter type for 'x', expected: T".
    pub fn wrong_type(key: &str, expected: &str) -> Self {
        Self::generic(format!("Invalid parameter type for '{key}', expected: {expected}"))
    }

    /// QEMU's "Parameter 'x' expects W".
    pub fn expects(key: &str, what: &str) -> Self {
        Self::generic(format!("Parameter '{key}' expects {what}"))
    }
}

impl From<String> for QmpError {
    fn from(desc: String) -> Self {
        QmpError::generic(desc)
    }
}

impl std::fmt::Display for QmpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.class, self.desc)
    }
}
