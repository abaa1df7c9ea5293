//! The fixed newstyle handshake and option haggling.
//!
//! Runs with blocking socket I/O under one deadline for the whole handshake
//! ([`HANDSHAKE_TIMEOUT`]); a client that stalls is dropped. Option data is
//! read only after its length was checked: options longer than
//! [`MAX_OPTION_LEN`] are read into a small scratch buffer and refused with
//! `NBD_REP_ERR_TOO_BIG` when no longer than [`MAX_OPTION_SKIP`], and end the
//! connection otherwise, so a client cannot make the server allocate what it
//! claims.
//!
//! Options served: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO`,
//! `STRUCTURED_REPLY`, `LIST_META_CONTEXT` and `SET_META_CONTEXT` (the one
//! context is `base:allocation`). `STARTTLS`, `EXTENDED_HEADERS` and unknown
//! options get `NBD_REP_ERR_UNSUP`.

use std::io::{self, Read, Write};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::proto::*;
use super::registry::{Conn, Export, Registry};
use super::socket::Socket;

/// The whole handshake must finish within this time.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest option whose data is kept (a `SET_META_CONTEXT` with many queries fits).
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Longer options up to this size are skipped and refused; beyond it the client is dropped.
pub const MAX_OPTION_SKIP: u32 = 1 << 20;
/// A client that sends more options than this is dropped.
pub const MAX_OPTIONS: u32 = 4096;

/// What the handshake agreed on, ready for the transmission phase.
pub struct Negotiated {
    /// The export the client attached to (already counted as its client).
    pub export: Arc<Export>,
    /// Structured replies are in use.
    pub structured: bool,
    /// `base:allocation` is selected for this export.
    pub base_allocation: bool,
}

/// Why the handshake ended without entering transmission.
#[derive(Debug)]
pub enum End {
    /// The client sent `NBD_OPT_ABORT`.
    Aborted,
    /// I/O failed or the peer closed (or the deadline passed).
    Io(io::Error),
    /// The client broke the protocol; the connection is dropped.
    Violation(String),
}

impl From<io::Error> for End {
    fn from(e: io::Error) -> Self {
        End::Io(e)
    }
}

/// Blocking I/O with a deadline.
struct Io<'a> {
    sock: &'a Socket,
    deadline: Instant,
}

impl Io<'_> {
    fn arm(&self) -> io::Result<()> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "handshake took too long"));
        }
        self.sock.set_timeouts(Some(left))
    }

    fn read_exact(&mut self, buf: &mut [u8]) -> io::Result<()> {
        self.arm()?;
        let mut s = self.sock;
        s.read_exact(buf)
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        self.arm()?;
        let mut s = self.sock;
        s.write_all(buf)
    }

    fn skip(&mut self, mut n: usize) -> io::Result<()> {
        let mut scratch = [0u8; 4096];
        while n > 0 {
            let k = n.min(scratch.len());
            self.read_exact(&mut scratch[..k])?;
            n -= k;
        }
        Ok(())
    }
}

/// The metadata context selection of the last `SET_META_CONTEXT`.
struct MetaSelection {
    export: Arc<Export>,
    base_allocation: bool,
}

struct Haggle<'a> {
    io: Io<'a>,
    reg: &'a Registry,
    conn: &'a Conn,
    no_zeroes: bool,
    structured: bool,
    meta: Option<MetaSelection>,
}

enum Step {
    Continue,
    Go(Negotiated),
}

/// Runs the handshake on `conn`. On success the connection is attached to
/// its export and the socket's blocking timeouts are cleared.
pub fn run(reg: &Registry, conn: &Conn) -> Result<Negotiated, End> {
    let mut io = Io { sock: &conn.socket, deadline: Instant::now() + HANDSHAKE_TIMEOUT };
    let mut greeting = Vec::with_capacity(18);
    greeting.extend_from_slice(&INIT_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&OPTS_MAGIC.to_be_bytes());
    greeting.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    io.write_all(&greeting)?;
    let mut cf = [0u8; 4];
    io.read_exact(&mut cf)?;
    let client_flags = u32::from_be_bytes(cf);
    if client_flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(End::Violation(format!("unknown client flags {client_flags:#x}")));
    }
    let mut h = Haggle {
        io,
        reg,
        conn,
        no_zeroes: client_flags & FLAG_C_NO_ZEROES != 0,
        structured: false,
        meta: None,
    };
    for _ in 0..MAX_OPTIONS {
        if let Step::Go(n) = h.option()? {
            conn.socket.set_timeouts(None)?;
            return Ok(n);
        }
    }
    Err(End::Violation(format!("more than {MAX_OPTIONS} options")))
}

impl Haggle<'_> {
    fn reply(&mut self, option: u32, kind: u32, payload: &[u8]) -> io::Result<()> {
        self.io.write_all(&option_reply(option, kind, payload))
    }

    fn error(&mut self, option: u32, kind: u32, msg: &str) -> Result<Step, End> {
        self.reply(option, kind, truncate_utf8(msg, MAX_STRING).as_bytes())?;
        Ok(Step::Continue)
    }

    /// Reads one option and answers it.
    fn option(&mut self) -> Result<Step, End> {
        let mut hb = [0u8; OPTION_HEADER_LEN];
        self.io.read_exact(&mut hb)?;
        let hdr = OptionHeader::decode(&hb);
        if hdr.magic != OPTS_MAGIC {
            return Err(End::Violation(format!("bad option magic {:#x}", hdr.magic)));
        }
        if hdr.length > MAX_OPTION_LEN {
            if hdr.length > MAX_OPTION_SKIP || hdr.option == OPT_EXPORT_NAME {
                return Err(End::Violation(format!("option {} with {} bytes of data", hdr.option, hdr.length)));
            }
            self.io.skip(hdr.length as usize)?;
            return self.error(hdr.option, REP_ERR_TOO_BIG, "option data too long");
        }
        let mut data = vec![0u8; hdr.length as usize];
        self.io.read_exact(&mut data)?;
        self.dispatch(hdr.option, &data)
    }

    fn dispatch(&mut self, option: u32, data: &[u8]) -> Result<Step, End> {
        match option {
            OPT_EXPORT_NAME => self.export_name(data),
            OPT_ABORT => {
                // The client may already have closed; a failed ACK does not matter.
                let _ = self.reply(option, REP_ACK, &[]);
                Err(End::Aborted)
            }
            OPT_LIST => self.list(data),
            OPT_INFO | OPT_GO => self.info(option, data),
            OPT_STRUCTURED_REPLY if !data.is_empty() => self.error(option, REP_ERR_INVALID, "unexpected option data"),
            OPT_STRUCTURED_REPLY => {
                self.structured = true;
                self.reply(option, REP_ACK, &[])?;
                Ok(Step::Continue)
            }
            OPT_LIST_META_CONTEXT | OPT_SET_META_CONTEXT => self.meta_context(option, data),
            OPT_STARTTLS => self.error(option, REP_ERR_UNSUP, "TLS is not supported by this server"),
            _ => self.error(option, REP_ERR_UNSUP, "unsupported option"),
        }
    }

    fn export_name(&mut self, data: &[u8]) -> Result<Step, End> {
        let name = std::str::from_utf8(data).map_err(|_| End::Violation("export name is not UTF-8".into()))?;
        let exp = self.reg.lookup(name).filter(|e| self.reg.attach(self.conn, e));
        let Some(exp) = exp else {
            return Err(End::Violation(format!("unknown export '{name}' requested with NBD_OPT_EXPORT_NAME")));
        };
        let mut v = Vec::with_capacity(134);
        v.extend_from_slice(&exp.size().to_be_bytes());
        v.extend_from_slice(&exp.transmission_flags(self.structured).to_be_bytes());
        if !self.no_zeroes {
            v.extend_from_slice(&[0u8; 124]);
        }
        self.io.write_all(&v)?;
        Ok(Step::Go(self.negotiated(exp)))
    }

    fn negotiated(&self, export: Arc<Export>) -> Negotiated {
        let base_allocation =
            self.meta.as_ref().is_some_and(|m| m.base_allocation && Arc::ptr_eq(&m.export, &export));
        Negotiated { export, structured: self.structured, base_allocation }
    }

    fn list(&mut self, data: &[u8]) -> Result<Step, End> {
        if !data.is_empty() {
            return self.error(OPT_LIST, REP_ERR_INVALID, "unexpected option data");
        }
        for exp in self.reg.list() {
            let mut p = Vec::new();
            p.extend_from_slice(&(exp.cfg.name.len() as u32).to_be_bytes());
            p.extend_from_slice(exp.cfg.name.as_bytes());
            if let Some(d) = &exp.cfg.description {
                p.extend_from_slice(d.as_bytes());
            }
            self.reply(OPT_LIST, REP_SERVER, &p)?;
        }
        self.reply(OPT_LIST, REP_ACK, &[])?;
        Ok(Step::Continue)
    }

    fn info(&mut self, option: u32, data: &[u8]) -> Result<Step, End> {
        let Some((name, infos)) = parse_info_request(data) else {
            return self.error(option, REP_ERR_INVALID, "malformed NBD_OPT_INFO/GO request");
        };
        let Some(exp) = self.reg.lookup(name) else {
            return self.error(option, REP_ERR_UNKNOWN, &format!("export '{name}' not found"));
        };
        if option == OPT_GO && !self.reg.attach(self.conn, &exp) {
            return self.error(option, REP_ERR_UNKNOWN, &format!("export '{name}' not found"));
        }
        for payload in info_replies(&exp, &infos, self.structured) {
            self.reply(option, REP_INFO, &payload)?;
        }
        self.reply(option, REP_ACK, &[])?;
        if option == OPT_GO {
            return Ok(Step::Go(self.negotiated(exp)));
        }
        Ok(Step::Continue)
    }

    fn meta_context(&mut self, option: u32, data: &[u8]) -> Result<Step, End> {
        if option == OPT_SET_META_CONTEXT {
            self.meta = None;
        }
        if !self.structured {
            return self.error(option, REP_ERR_INVALID, "structured replies must be negotiated first");
        }
        let Some((name, queries)) = parse_meta_request(data) else {
            return self.error(option, REP_ERR_INVALID, "malformed metadata context request");
        };
        let Some(exp) = self.reg.lookup(name) else {
            return self.error(option, REP_ERR_UNKNOWN, &format!("export '{name}' not found"));
        };
        let (selected, id) = if option == OPT_LIST_META_CONTEXT {
            let any = queries.is_empty() || queries.iter().any(|q| *q == "base:" || *q == BASE_ALLOCATION);
            (any, 0)
        } else {
            let sel = queries.contains(&BASE_ALLOCATION);
            self.meta = Some(MetaSelection { export: exp, base_allocation: sel });
            (sel, BASE_ALLOCATION_ID)
        };
        if selected {
            let mut p = id.to_be_bytes().to_vec();
            p.extend_from_slice(BASE_ALLOCATION.as_bytes());
            self.reply(option, REP_META_CONTEXT, &p)?;
        }
        self.reply(option, REP_ACK, &[])?;
        Ok(Step::Continue)
    }
}

/// Parses `NBD_OPT_INFO`/`GO` data: the export name and the info types asked for.
pub fn parse_info_request(data: &[u8]) -> Option<(&str, Vec<u16>)> {
    let mut c = Cursor::new(data);
    let name = c.string32()?;
    let n = c.u16()? as usize;
    let infos = (0..n).map(|_| c.u16()).collect::<Option<Vec<u16>>>()?;
    (c.remaining() == 0).then_some((name, infos))
}

/// Parses `LIST_META_CONTEXT`/`SET_META_CONTEXT` data: the export name and the queries.
pub fn parse_meta_request(data: &[u8]) -> Option<(&str, Vec<&str>)> {
    let mut c = Cursor::new(data);
    let name = c.string32()?;
    let n = c.u32()? as usize;
    // Each query takes at least its 4-byte length: bound `n` before looping.
    if n > c.remaining() / 4 {
        return None;
    }
    let queries = (0..n).map(|_| c.string32()).collect::<Option<Vec<&str>>>()?;
    (c.remaining() == 0).then_some((name, queries))
}

/// The `NBD_REP_INFO` payloads for an export: always `EXPORT` and
/// `BLOCK_SIZE`; `NAME` and `DESCRIPTION` when asked for.
fn info_replies(exp: &Export, infos: &[u16], structured: bool) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut p = INFO_EXPORT.to_be_bytes().to_vec();
    p.extend_from_slice(&exp.size().to_be_bytes());
    p.extend_from_slice(&exp.transmission_flags(structured).to_be_bytes());
    out.push(p);
    if infos.contains(&INFO_NAME) {
        let mut p = INFO_NAME.to_be_bytes().to_vec();
        p.extend_from_slice(exp.cfg.name.as_bytes());
        out.push(p);
    }
    if let (true, Some(d)) = (infos.contains(&INFO_DESCRIPTION), &exp.cfg.description) {
        let mut p = INFO_DESCRIPTION.to_be_bytes().to_vec();
        p.extend_from_slice(d.as_bytes());
        out.push(p);
    }
    let (min, pref, max) = exp.block_sizes();
    let mut p = INFO_BLOCK_SIZE.to_be_bytes().to_vec();
    for v in [min, pref, max] {
        p.extend_from_slice(&v.to_be_bytes());
    }
    out.push(p);
    out
}
