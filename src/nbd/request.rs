//! Validation of transmission requests: one function turns a request header
//! into a typed [`Command`] or a verdict on what to do instead.
//!
//! Everything the client controls is checked here, once, with checked
//! arithmetic; execution (`transmission.rs`) never re-checks. The rules:
//!
//! - A bad magic, or a `WRITE` whose payload is larger than [`MAX_PAYLOAD`],
//!   leaves the stream in an unknown state: the connection is dropped
//!   ([`Verdict::Drop`]) without allocating anything.
//! - Any other bad request gets an error reply ([`Verdict::Reject`]); a
//!   `WRITE`'s payload is read and thrown away first so the stream stays in
//!   step. Unknown commands and flags not valid for the command are
//!   `EINVAL`; writes to a read-only export `EPERM`; a `WRITE` or
//!   `WRITE_ZEROES` past the end `ENOSPC` and any other request past the end
//!   `EINVAL` (as the protocol document recommends); a `FAST_ZERO` the node
//!   cannot do quickly `ENOTSUP`.
//! - Requests need not be aligned to the advertised minimum block size: the
//!   block layer pads unaligned requests itself, so accepting them is safe
//!   and more useful than refusing them.

use super::proto::*;

/// Largest `READ`/`WRITE` payload (and the maximum advertised in
/// `NBD_INFO_BLOCK_SIZE`): 32 MiB.
pub const MAX_PAYLOAD: u32 = 32 << 20;

/// What the connection negotiated, as far as validation cares.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Structured replies are in use.
    pub structured: bool,
    /// `base:allocation` was selected for this export.
    pub base_allocation: bool,
    /// The export accepts writes.
    pub writable: bool,
    /// The node can zero without writing data (so `FAST_ZERO` may proceed).
    pub fast_zero: bool,
    /// The export's current size in bytes.
    pub size: u64,
}

/// A validated request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read { offset: u64, len: u32 },
    Write { offset: u64, len: u32, fua: bool },
    Flush,
    Trim { offset: u64, len: u32, fua: bool },
    Cache { offset: u64, len: u32 },
    WriteZeroes { offset: u64, len: u32, fua: bool, may_unmap: bool },
    BlockStatus { offset: u64, len: u32, req_one: bool },
}

/// What to do with a received request header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Execute it (a `WRITE`'s payload follows on the socket).
    Run(Command),
    /// Skip `payload` bytes, then reply with `errno`.
    Reject { errno: u32, msg: String, payload: u32 },
    /// `NBD_CMD_DISC`: finish in-flight requests and close.
    Disconnect,
    /// Protocol violation: close without replying.
    Drop(String),
}

fn allowed_flags(kind: u16, structured: bool) -> Option<u16> {
    let df = if structured { CMD_FLAG_DF } else { 0 };
    let extra = match kind {
        CMD_READ => df,
        CMD_WRITE | CMD_DISC | CMD_FLUSH | CMD_TRIM | CMD_CACHE => 0,
        CMD_WRITE_ZEROES => CMD_FLAG_NO_HOLE | CMD_FLAG_FAST_ZERO,
        CMD_BLOCK_STATUS => CMD_FLAG_REQ_ONE,
        _ => return None,
    };
    // FUA is valid on every command once SEND_FUA is advertised (always).
    Some(CMD_FLAG_FUA | extra)
}

fn reject(errno: u32, payload: u32, msg: impl Into<String>) -> Verdict {
    Verdict::Reject { errno, msg: msg.into(), payload }
}

fn in_range(offset: u64, len: u32, size: u64) -> bool {
    offset.checked_add(len as u64).is_some_and(|end| end <= size)
}

/// Decides what to do with request `h` on a connection in state `ctx`.
pub fn validate(h: &RequestHeader, ctx: &Ctx) -> Verdict {
    if h.magic != REQUEST_MAGIC {
        return Verdict::Drop(format!("bad request magic {:#x}", h.magic));
    }
    let payload = if h.kind == CMD_WRITE { h.length } else { 0 };
    if payload > MAX_PAYLOAD {
        return Verdict::Drop(format!("write payload of {payload} bytes exceeds the {MAX_PAYLOAD}-byte maximum"));
    }
    let Some(allowed) = allowed_flags(h.kind, ctx.structured) else {
        return reject(EINVAL, 0, format!("unknown command {}", h.kind));
    };
    if h.flags & !allowed != 0 {
        return reject(EINVAL, payload, format!("flags {:#x} are not valid for command {}", h.flags, h.kind));
    }
    let fua = h.flags & CMD_FLAG_FUA != 0;
    let (offset, len) = (h.offset, h.length);
    let past_end = |errno| reject(errno, payload, format!("request {offset}+{len} is past the end ({} bytes)", ctx.size));
    match h.kind {
        CMD_DISC => Verdict::Disconnect,
        CMD_FLUSH if offset != 0 || len != 0 => reject(EINVAL, 0, "flush with nonzero offset or length"),
        CMD_FLUSH => Verdict::Run(Command::Flush),
        CMD_READ if len > MAX_PAYLOAD => reject(EINVAL, 0, format!("read of {len} bytes exceeds the {MAX_PAYLOAD}-byte maximum")),
        CMD_READ if !in_range(offset, len, ctx.size) => past_end(EINVAL),
        CMD_READ => Verdict::Run(Command::Read { offset, len }),
        CMD_CACHE if !in_range(offset, len, ctx.size) => past_end(EINVAL),
        CMD_CACHE => Verdict::Run(Command::Cache { offset, len }),
        CMD_BLOCK_STATUS if !ctx.base_allocation => reject(EINVAL, 0, "no metadata context was negotiated"),
        CMD_BLOCK_STATUS if len == 0 => reject(EINVAL, 0, "block status of zero length"),
        CMD_BLOCK_STATUS if !in_range(offset, len, ctx.size) => past_end(EINVAL),
        CMD_BLOCK_STATUS => {
            Verdict::Run(Command::BlockStatus { offset, len, req_one: h.flags & CMD_FLAG_REQ_ONE != 0 })
        }
        _ if !ctx.writable => reject(EPERM, payload, "the export is read-only"),
        CMD_WRITE if !in_range(offset, len, ctx.size) => past_end(ENOSPC),
        CMD_WRITE => Verdict::Run(Command::Write { offset, len, fua }),
        CMD_TRIM if !in_range(offset, len, ctx.size) => past_end(EINVAL),
        CMD_TRIM => Verdict::Run(Command::Trim { offset, len, fua }),
        CMD_WRITE_ZEROES if !in_range(offset, len, ctx.size) => past_end(ENOSPC),
        CMD_WRITE_ZEROES if h.flags & CMD_FLAG_FAST_ZERO != 0 && !ctx.fast_zero => {
            reject(ENOTSUP, 0, "this node cannot write zeroes faster than data")
        }
        CMD_WRITE_ZEROES => {
            Verdict::Run(Command::WriteZeroes { offset, len, fua, may_unmap: h.flags & CMD_FLAG_NO_HOLE == 0 })
        }
        other => reject(EINVAL, payload, format!("unknown command {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CTX: Ctx = Ctx { structured: true, base_allocation: true, writable: true, fast_zero: false, size: 1 << 20 };

    fn req(kind: u16, flags: u16, offset: u64, length: u32) -> RequestHeader {
        RequestHeader { magic: REQUEST_MAGIC, flags, kind, cookie: 9, offset, length }
    }

    fn errno_of(v: Verdict) -> (u32, u32) {
        match v {
            Verdict::Reject { errno, payload, .. } => (errno, payload),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn valid_requests_become_commands() {
        assert_eq!(validate(&req(CMD_READ, 0, 4096, 512), &CTX), Verdict::Run(Command::Read { offset: 4096, len: 512 }));
        assert_eq!(
            validate(&req(CMD_WRITE, CMD_FLAG_FUA, 0, 1 << 20), &CTX),
            Verdict::Run(Command::Write { offset: 0, len: 1 << 20, fua: true })
        );
        assert_eq!(
            validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 0, 4096), &CTX),
            Verdict::Run(Command::WriteZeroes { offset: 0, len: 4096, fua: false, may_unmap: false })
        );
        assert_eq!(
            validate(&req(CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 0, 100), &CTX),
            Verdict::Run(Command::BlockStatus { offset: 0, len: 100, req_one: true })
        );
        assert_eq!(validate(&req(CMD_FLUSH, CMD_FLAG_FUA, 0, 0), &CTX), Verdict::Run(Command::Flush));
        assert_eq!(validate(&req(CMD_DISC, 0, 0, 0), &CTX), Verdict::Disconnect);
        assert_eq!(validate(&req(CMD_READ, 0, 1 << 20, 0), &CTX), Verdict::Run(Command::Read { offset: 1 << 20, len: 0 }));
    }

    #[test]
    fn stream_breaking_requests_drop_the_connection() {
        let mut h = req(CMD_READ, 0, 0, 512);
        h.magic = 0xdead_beef;
        assert!(matches!(validate(&h, &CTX), Verdict::Drop(_)));
        assert!(matches!(validate(&req(CMD_WRITE, 0, 0, MAX_PAYLOAD + 1), &CTX), Verdict::Drop(_)));
        assert!(matches!(validate(&req(CMD_WRITE, 0, 0, u32::MAX), &CTX), Verdict::Drop(_)));
    }

    #[test]
    fn out_of_range_requests_get_the_documented_errors() {
        assert_eq!(errno_of(validate(&req(CMD_READ, 0, 1 << 20, 1), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_READ, 0, u64::MAX, 2), &CTX)), (EINVAL, 0), "offset overflow");
        assert_eq!(errno_of(validate(&req(CMD_WRITE, 0, u64::MAX - 1, 512), &CTX)), (ENOSPC, 512));
        assert_eq!(errno_of(validate(&req(CMD_WRITE_ZEROES, 0, 1 << 20, 1), &CTX)), (ENOSPC, 0));
        assert_eq!(errno_of(validate(&req(CMD_TRIM, 0, 0, (1 << 20) + 1), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_BLOCK_STATUS, 0, 1 << 20, 1), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_CACHE, 0, 1 << 19, 1 << 20), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_READ, 0, 0, MAX_PAYLOAD + 1), &CTX)), (EINVAL, 0));
    }

    #[test]
    fn bad_flags_and_commands_are_einval_and_keep_the_payload_in_step() {
        assert_eq!(errno_of(validate(&req(CMD_WRITE, CMD_FLAG_REQ_ONE, 0, 512), &CTX)), (EINVAL, 512));
        assert_eq!(errno_of(validate(&req(CMD_READ, CMD_FLAG_NO_HOLE, 0, 512), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_READ, 1 << 15, 0, 512), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(99, 0, 0, 512), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_FLUSH, 0, 1, 0), &CTX)), (EINVAL, 0));
        let simple = Ctx { structured: false, ..CTX };
        assert_eq!(errno_of(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &simple)), (EINVAL, 0), "DF needs structured replies");
        assert!(matches!(validate(&req(CMD_READ, CMD_FLAG_DF, 0, 512), &CTX), Verdict::Run(_)));
    }

    #[test]
    fn read_only_export_refuses_every_write_type_with_eperm() {
        let ro = Ctx { writable: false, ..CTX };
        assert_eq!(errno_of(validate(&req(CMD_WRITE, 0, 0, 512), &ro)), (EPERM, 512));
        assert_eq!(errno_of(validate(&req(CMD_TRIM, 0, 0, 512), &ro)), (EPERM, 0));
        assert_eq!(errno_of(validate(&req(CMD_WRITE_ZEROES, 0, 0, 512), &ro)), (EPERM, 0));
        assert!(matches!(validate(&req(CMD_READ, 0, 0, 512), &ro), Verdict::Run(_)));
        assert!(matches!(validate(&req(CMD_FLUSH, 0, 0, 0), &ro), Verdict::Run(_)));
    }

    #[test]
    fn block_status_needs_a_context_and_fast_zero_a_fast_node() {
        let no_meta = Ctx { base_allocation: false, ..CTX };
        assert_eq!(errno_of(validate(&req(CMD_BLOCK_STATUS, 0, 0, 512), &no_meta)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_BLOCK_STATUS, 0, 0, 0), &CTX)), (EINVAL, 0));
        assert_eq!(errno_of(validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &CTX)), (ENOTSUP, 0));
        let fast = Ctx { fast_zero: true, ..CTX };
        assert!(matches!(validate(&req(CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 0, 512), &fast), Verdict::Run(_)));
    }
}
