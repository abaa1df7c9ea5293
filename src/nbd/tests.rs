//! Connection-level tests: a blocking test client drives `server::serve`
//! over a `UnixStream::pair()`, against an in-memory driver.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_listener::Event;

use super::proto::*;
use super::registry::{Conn, Registry};
use super::request::MAX_PAYLOAD;
use super::socket::Socket;
use super::{server, NbdAddr, NbdExportConfig, NbdServer, NbdServerConfig};
use crate::block::driver::boxed;
use crate::block::{BlockDriver, BlockError, BlockNode, BlockStatus, Caps, ErrorKind, IoFuture, IoVecs, NodeOptions};

const PAGE: u64 = 4096;
const SIZE: u64 = 1 << 20;
/// A read here fails with EIO.
const BAD_OFFSET: u64 = 8 * PAGE;
/// A read here waits until a write lands at `OPEN_OFFSET`.
const GATE_OFFSET: u64 = 16 * PAGE;
const OPEN_OFFSET: u64 = 17 * PAGE;

/// Holds reads at `GATE_OFFSET` until a write at `OPEN_OFFSET`.
#[derive(Default)]
struct Gate {
    entered: Mutex<bool>,
    entered_cv: std::sync::Condvar,
    open: AtomicBool,
    opened: Event,
}

impl Gate {
    /// Blocks the test thread until a read waits at the gate.
    fn wait_entered(&self) {
        let mut e = self.entered.lock().unwrap();
        while !*e {
            e = self.entered_cv.wait_timeout(e, Duration::from_secs(20)).unwrap().0;
        }
    }
}

/// An in-memory disk that tracks allocation per 4 KiB page.
struct MemDriver {
    data: Mutex<Vec<u8>>,
    alloc: Mutex<Vec<bool>>,
    gate: Arc<Gate>,
}

impl MemDriver {
    fn new(gate: Arc<Gate>) -> Self {
        MemDriver {
            data: Mutex::new(vec![0; SIZE as usize]),
            alloc: Mutex::new(vec![false; (SIZE / PAGE) as usize]),
            gate,
        }
    }

    fn mark(&self, offset: u64, len: u64, allocated: bool) {
        let mut a = self.alloc.lock().unwrap();
        let (first, last) = if allocated {
            (offset / PAGE, (offset + len).div_ceil(PAGE))
        } else {
            (offset.div_ceil(PAGE), (offset + len) / PAGE)
        };
        for p in first..last {
            a[p as usize] = allocated;
        }
    }

    fn zero(&self, offset: u64, len: u64) {
        self.data.lock().unwrap()[offset as usize..(offset + len) as usize].fill(0);
    }

    async fn wait_open(&self) {
        let g = &self.gate;
        *g.entered.lock().unwrap() = true;
        g.entered_cv.notify_all();
        while !g.open.load(Ordering::SeqCst) {
            let l = g.opened.listen();
            if g.open.load(Ordering::SeqCst) {
                break;
            }
            l.await;
        }
    }
}

impl BlockDriver for MemDriver {
    fn format_name(&self) -> &'static str {
        "mem"
    }

    fn caps(&self) -> Caps {
        Caps { fua: false, discard: true, write_zeroes: true, block_status: true, truncate: false }
    }

    fn length(&self) -> u64 {
        SIZE
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(async move {
            if offset == GATE_OFFSET {
                self.wait_open().await;
            }
            if offset == BAD_OFFSET {
                return Err(BlockError::from_errno(libc::EIO, "injected read error"));
            }
            let d = self.data.lock().unwrap();
            buf.copy_from(0, &d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, _fua: bool) -> IoFuture<'a, ()> {
        boxed(async move {
            {
                let mut d = self.data.lock().unwrap();
                buf.copy_to(0, &mut d[offset as usize..offset as usize + buf.len()]);
            }
            self.mark(offset, buf.len() as u64, true);
            if offset == OPEN_OFFSET {
                self.gate.open.store(true, Ordering::SeqCst);
                self.gate.opened.notify(usize::MAX);
            }
            Ok(())
        })
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        boxed(async { Ok(()) })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        boxed(async move {
            self.zero(offset, len);
            self.mark(offset, len, false);
            Ok(())
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(async move {
            self.zero(offset, len);
            self.mark(offset, len, !may_unmap);
            Ok(())
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        boxed(async move {
            let a = self.alloc.lock().unwrap();
            let first = a[(offset / PAGE) as usize];
            let mut end = (offset / PAGE + 1) * PAGE;
            while end < offset + len && a[(end / PAGE) as usize] == first {
                end += PAGE;
            }
            Ok(BlockStatus { allocated: first, zero: !first, data: first, len: end.min(offset + len) - offset })
        })
    }
}

fn gated_node(name: &str, read_only: bool) -> (Arc<BlockNode>, Arc<Gate>) {
    let opts = NodeOptions { read_only, discard_unmap: true, ..NodeOptions::default() };
    let gate = Arc::new(Gate::default());
    (BlockNode::new(name.to_string(), false, Box::new(MemDriver::new(gate.clone())), opts), gate)
}

fn mem_node(name: &str, read_only: bool) -> Arc<BlockNode> {
    gated_node(name, read_only).0
}

fn export_cfg(name: &str, writable: bool) -> NbdExportConfig {
    NbdExportConfig { id: format!("id-{name}"), name: name.to_string(), description: Some(format!("{name} disk")), writable }
}

/// A registry with a writable export "disk" and a read-only export "ro".
fn registry() -> Arc<Registry> {
    let reg = Arc::new(Registry::default());
    reg.add_export(export_cfg("disk", true), mem_node("n-disk", false)).unwrap();
    reg.add_export(export_cfg("ro", false), mem_node("n-ro", true)).unwrap();
    reg
}

/// Starts serving one connection on a thread; returns the client end.
fn connect(reg: &Arc<Registry>, id: u64) -> (UnixStream, std::thread::JoinHandle<()>) {
    let (client, server_end) = UnixStream::pair().unwrap();
    client.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let conn = Conn::new(id, Socket::Unix(server_end));
    assert!(reg.register(&conn, 0));
    let reg = reg.clone();
    let t = std::thread::spawn(move || server::serve(&reg, &conn));
    (client, t)
}

// ---- a minimal blocking client -------------------------------------------

fn read_n(s: &mut UnixStream, n: usize) -> Vec<u8> {
    let mut v = vec![0u8; n];
    s.read_exact(&mut v).unwrap();
    v
}

/// True if the server closed the connection (EOF, or a reset).
fn closed(s: &mut UnixStream) -> bool {
    let mut b = [0u8; 1];
    matches!(s.read(&mut b), Ok(0) | Err(_))
}

fn greet(s: &mut UnixStream, client_flags: u32) {
    let g = read_n(s, 18);
    assert_eq!(be64(&g[0..8]), INIT_MAGIC);
    assert_eq!(be64(&g[8..16]), OPTS_MAGIC);
    assert_eq!(be16(&g[16..18]), FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES);
    s.write_all(&client_flags.to_be_bytes()).unwrap();
}

fn send_opt(s: &mut UnixStream, option: u32, data: &[u8]) {
    let mut v = OPTS_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&(data.len() as u32).to_be_bytes());
    v.extend_from_slice(data);
    s.write_all(&v).unwrap();
}

/// Reads one option reply: (reply type, data).
fn opt_reply(s: &mut UnixStream, option: u32) -> (u32, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be64(&h[0..8]), REP_MAGIC);
    assert_eq!(be32(&h[8..12]), option);
    let len = be32(&h[16..20]) as usize;
    (be32(&h[12..16]), read_n(s, len))
}

/// Reads replies until a final one (ACK or error); returns them all.
fn opt_replies(s: &mut UnixStream, option: u32) -> Vec<(u32, Vec<u8>)> {
    let mut out = Vec::new();
    loop {
        let r = opt_reply(s, option);
        let fin = r.0 == REP_ACK || r.0 & (1 << 31) != 0;
        out.push(r);
        if fin {
            return out;
        }
    }
}

fn info_data(name: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

fn meta_data(name: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = (name.len() as u32).to_be_bytes().to_vec();
    v.extend_from_slice(name.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// Handshake up to transmission: optional structured replies and
/// base:allocation, then GO. Returns the transmission flags.
fn open(s: &mut UnixStream, name: &str, structured: bool) -> u16 {
    greet(s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    if structured {
        send_opt(s, OPT_STRUCTURED_REPLY, &[]);
        assert_eq!(opt_reply(s, OPT_STRUCTURED_REPLY).0, REP_ACK);
        send_opt(s, OPT_SET_META_CONTEXT, &meta_data(name, &[BASE_ALLOCATION]));
        let r = opt_replies(s, OPT_SET_META_CONTEXT);
        assert_eq!(r.len(), 2);
    }
    send_opt(s, OPT_GO, &info_data(name, &[]));
    let r = opt_replies(s, OPT_GO);
    assert_eq!(r.last().unwrap().0, REP_ACK, "GO failed: {r:?}");
    let exp = r.iter().find(|(k, d)| *k == REP_INFO && be16(d) == INFO_EXPORT).unwrap();
    be16(&exp.1[10..12])
}

fn request(s: &mut UnixStream, kind: u16, flags: u16, cookie: u64, offset: u64, length: u32, payload: &[u8]) {
    let h = RequestHeader { magic: REQUEST_MAGIC, flags, kind, cookie, offset, length };
    let mut v = h.encode().to_vec();
    v.extend_from_slice(payload);
    s.write_all(&v).unwrap();
}

/// Reads a simple reply: (error, cookie).
fn simple(s: &mut UnixStream) -> (u32, u64) {
    let h = read_n(s, 16);
    assert_eq!(be32(&h[0..4]), SIMPLE_REPLY_MAGIC);
    (be32(&h[4..8]), be64(&h[8..16]))
}

/// Reads a structured chunk: (flags, type, cookie, payload).
fn chunk(s: &mut UnixStream) -> (u16, u16, u64, Vec<u8>) {
    let h = read_n(s, 20);
    assert_eq!(be32(&h[0..4]), STRUCTURED_REPLY_MAGIC);
    let len = be32(&h[16..20]) as usize;
    (be16(&h[4..6]), be16(&h[6..8]), be64(&h[8..16]), read_n(s, len))
}

fn disconnect(mut s: UnixStream, t: std::thread::JoinHandle<()>) {
    request(&mut s, CMD_DISC, 0, 0, 0, 0, &[]);
    assert!(closed(&mut s));
    t.join().unwrap();
}

/// A misbehaving client's actions.
type Hostile = Box<dyn Fn(&mut UnixStream)>;

// ---- handshake ------------------------------------------------------------

#[test]
fn go_reports_size_flags_name_and_block_sizes() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_INFO, &info_data("disk", &[INFO_NAME, INFO_DESCRIPTION, INFO_BLOCK_SIZE]));
    let r = opt_replies(&mut s, OPT_INFO);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    let info = |t: u16| r.iter().find(|(k, d)| *k == REP_INFO && be16(d) == t).map(|(_, d)| d[2..].to_vec()).unwrap();
    let e = info(INFO_EXPORT);
    assert_eq!(be64(&e[0..8]), SIZE);
    let flags = be16(&e[8..10]);
    for f in [FLAG_HAS_FLAGS, FLAG_SEND_FLUSH, FLAG_SEND_FUA, FLAG_SEND_TRIM, FLAG_SEND_WRITE_ZEROES, FLAG_CAN_MULTI_CONN] {
        assert_ne!(flags & f, 0, "flag {f:#x} missing from {flags:#x}");
    }
    assert_eq!(flags & (FLAG_READ_ONLY | FLAG_SEND_DF), 0, "writable, no structured replies yet");
    assert_eq!(info(INFO_NAME), b"disk");
    assert_eq!(info(INFO_DESCRIPTION), b"disk disk");
    let b = info(INFO_BLOCK_SIZE);
    assert_eq!((be32(&b[0..4]), be32(&b[4..8]), be32(&b[8..12])), (1, 4096, MAX_PAYLOAD));
    assert!(!reg.has_clients("disk"), "INFO does not attach");
    send_opt(&mut s, OPT_GO, &info_data("ro", &[]));
    let r = opt_replies(&mut s, OPT_GO);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    assert_ne!(be16(&r[0].1[10..12]) & FLAG_READ_ONLY, 0);
    assert!(reg.has_clients("ro"));
    disconnect(s, t);
    assert!(!reg.has_clients("ro"));
}

#[test]
fn list_unknown_export_and_abort() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE);
    send_opt(&mut s, OPT_GO, &info_data("nope", &[]));
    assert_eq!(opt_replies(&mut s, OPT_GO).last().unwrap().0, REP_ERR_UNKNOWN);
    send_opt(&mut s, OPT_LIST, &[]);
    let r = opt_replies(&mut s, OPT_LIST);
    let names: Vec<_> = r.iter().filter(|(k, _)| *k == REP_SERVER).map(|(_, d)| d[4..4 + be32(d) as usize].to_vec()).collect();
    assert_eq!(names, vec![b"disk".to_vec(), b"ro".to_vec()]);
    assert_eq!(r.last().unwrap().0, REP_ACK);
    send_opt(&mut s, OPT_ABORT, &[]);
    assert_eq!(opt_reply(&mut s, OPT_ABORT).0, REP_ACK);
    assert!(closed(&mut s));
    t.join().unwrap();
    assert_eq!(reg.connections(), 0);
}

#[test]
fn malformed_options_get_errors_and_the_handshake_goes_on() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    let cases: Vec<(u32, Vec<u8>, u32)> = vec![
        (OPT_LIST, vec![1], REP_ERR_INVALID),
        (OPT_STRUCTURED_REPLY, vec![1, 2], REP_ERR_INVALID),
        (OPT_SET_META_CONTEXT, meta_data("disk", &[BASE_ALLOCATION]), REP_ERR_INVALID),
        (OPT_STARTTLS, vec![], REP_ERR_UNSUP),
        (11, vec![], REP_ERR_UNSUP),
        (0xdead, vec![0; 10], REP_ERR_UNSUP),
        // Name length larger than the option data.
        (OPT_GO, vec![0, 0, 0, 200, b'd', 0, 0], REP_ERR_INVALID),
        // Info count larger than what follows.
        (OPT_INFO, { let mut d = info_data("disk", &[]); d[9] = 5; d }, REP_ERR_INVALID),
        // Trailing garbage.
        (OPT_GO, { let mut d = info_data("disk", &[]); d.push(0); d }, REP_ERR_INVALID),
        // Option data over 64 KiB is skipped and refused.
        (OPT_GO, vec![0; 100 * 1024], REP_ERR_TOO_BIG),
    ];
    for (opt, data, want) in cases {
        send_opt(&mut s, opt, &data);
        let r = opt_replies(&mut s, opt);
        assert_eq!(r.len(), 1, "option {opt}");
        assert_eq!(r[0].0, want, "option {opt}");
    }
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(opt_reply(&mut s, OPT_STRUCTURED_REPLY).0, REP_ACK);
    // A malformed meta query (count larger than the data) is INVALID.
    let mut bad = meta_data("disk", &[]);
    bad[8..12].copy_from_slice(&1000u32.to_be_bytes());
    send_opt(&mut s, OPT_LIST_META_CONTEXT, &bad);
    assert_eq!(opt_replies(&mut s, OPT_LIST_META_CONTEXT)[0].0, REP_ERR_INVALID);
    send_opt(&mut s, OPT_SET_META_CONTEXT, &meta_data("nope", &[BASE_ALLOCATION]));
    assert_eq!(opt_replies(&mut s, OPT_SET_META_CONTEXT)[0].0, REP_ERR_UNKNOWN);
    send_opt(&mut s, OPT_GO, &info_data("disk", &[]));
    assert_eq!(opt_replies(&mut s, OPT_GO).last().unwrap().0, REP_ACK);
    // No context was selected: BLOCK_STATUS is refused.
    request(&mut s, CMD_BLOCK_STATUS, 0, 5, 0, 4096, &[]);
    let (flags, kind, cookie, p) = chunk(&mut s);
    assert_eq!((flags, kind, cookie, be32(&p)), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 5, EINVAL));
    disconnect(s, t);
}

#[test]
fn hostile_handshakes_are_dropped_without_affecting_others() {
    let reg = registry();
    let (mut good, tg) = connect(&reg, 100);
    open(&mut good, "disk", false);
    let hostile: Vec<Hostile> = vec![
        Box::new(|s| s.write_all(&0xffff_ffffu32.to_be_bytes()).unwrap()),
        Box::new(|s| {
            s.write_all(&1u32.to_be_bytes()).unwrap();
            s.write_all(b"NOTMAGIC\0\0\0\x07\0\0\0\0").unwrap();
        }),
        Box::new(|s| {
            s.write_all(&1u32.to_be_bytes()).unwrap();
            let mut h = OPTS_MAGIC.to_be_bytes().to_vec();
            h.extend_from_slice(&OPT_GO.to_be_bytes());
            h.extend_from_slice(&u32::MAX.to_be_bytes());
            s.write_all(&h).unwrap();
        }),
        Box::new(|s| {
            s.write_all(&1u32.to_be_bytes()).unwrap();
            send_opt(s, OPT_EXPORT_NAME, b"nope");
        }),
        Box::new(|s| {
            s.write_all(&1u32.to_be_bytes()).unwrap();
            s.write_all(&OPTS_MAGIC.to_be_bytes()[..5]).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }),
    ];
    for (i, f) in hostile.iter().enumerate() {
        let (mut s, t) = connect(&reg, i as u64 + 1);
        let _ = read_n(&mut s, 18);
        f(&mut s);
        assert!(closed(&mut s), "case {i}");
        t.join().unwrap();
    }
    request(&mut good, CMD_WRITE, 0, 1, 0, 4, b"good");
    assert_eq!(simple(&mut good), (0, 1));
    disconnect(good, tg);
}

#[test]
fn export_name_enters_transmission_with_or_without_zeroes() {
    let reg = registry();
    for (cflags, tail) in [(FLAG_C_FIXED_NEWSTYLE, 124usize), (FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES, 0)] {
        let (mut s, t) = connect(&reg, 1);
        greet(&mut s, cflags);
        send_opt(&mut s, OPT_EXPORT_NAME, b"ro");
        let r = read_n(&mut s, 10 + tail);
        assert_eq!(be64(&r[0..8]), SIZE);
        assert_ne!(be16(&r[8..10]) & FLAG_READ_ONLY, 0);
        assert!(r[10..].iter().all(|&b| b == 0));
        request(&mut s, CMD_READ, 0, 3, 0, 8, &[]);
        assert_eq!(simple(&mut s), (0, 3));
        assert_eq!(read_n(&mut s, 8), vec![0; 8]);
        disconnect(s, t);
    }
}

#[test]
fn empty_name_selects_the_only_export() {
    let reg = Arc::new(Registry::default());
    reg.add_export(export_cfg("only", true), mem_node("n", false)).unwrap();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "", false);
    assert!(reg.has_clients("only"));
    disconnect(s, t);
}

// ---- transmission -----------------------------------------------------------

#[test]
fn simple_replies_for_every_command() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    let flags = open(&mut s, "disk", false);
    assert_eq!(flags & FLAG_SEND_DF, 0);
    let data: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
    request(&mut s, CMD_WRITE, CMD_FLAG_FUA, 1, 4096, 8192, &data);
    assert_eq!(simple(&mut s), (0, 1));
    request(&mut s, CMD_READ, 0, 2, 4096, 8192, &[]);
    assert_eq!(simple(&mut s), (0, 2));
    assert_eq!(read_n(&mut s, 8192), data);
    // Unaligned write and read (the block layer pads them).
    request(&mut s, CMD_WRITE, 0, 3, 4097, 3, b"xyz");
    assert_eq!(simple(&mut s), (0, 3));
    request(&mut s, CMD_READ, 0, 4, 4096, 5, &[]);
    assert_eq!(simple(&mut s), (0, 4));
    assert_eq!(read_n(&mut s, 5), vec![data[0], b'x', b'y', b'z', data[4]]);
    request(&mut s, CMD_FLUSH, 0, 5, 0, 0, &[]);
    assert_eq!(simple(&mut s), (0, 5));
    request(&mut s, CMD_TRIM, 0, 6, 4096, 4096, &[]);
    assert_eq!(simple(&mut s), (0, 6));
    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_NO_HOLE, 7, 8192, 100, &[]);
    assert_eq!(simple(&mut s), (0, 7));
    request(&mut s, CMD_READ, 0, 8, 4096, 8192, &[]);
    assert_eq!(simple(&mut s), (0, 8));
    let got = read_n(&mut s, 8192);
    assert!(got[..4096].iter().all(|&b| b == 0), "trimmed");
    assert!(got[4096..4196].iter().all(|&b| b == 0), "zeroed");
    assert_eq!(got[4196..], data[4196..]);
    request(&mut s, CMD_CACHE, 0, 9, 0, 4096, &[]);
    assert_eq!(simple(&mut s), (0, 9));
    // Errors: past the end, bad flags (the payload is skipped), unknown command, read error.
    request(&mut s, CMD_WRITE, 0, 10, SIZE - 2, 4, b"abcd");
    assert_eq!(simple(&mut s), (ENOSPC, 10));
    request(&mut s, CMD_WRITE, CMD_FLAG_REQ_ONE, 11, 0, 4, b"abcd");
    assert_eq!(simple(&mut s), (EINVAL, 11));
    request(&mut s, 42, 0, 12, 0, 0, &[]);
    assert_eq!(simple(&mut s), (EINVAL, 12));
    request(&mut s, CMD_READ, 0, 13, BAD_OFFSET, 512, &[]);
    assert_eq!(simple(&mut s), (EIO, 13));
    request(&mut s, CMD_READ, 0, 14, SIZE, 1, &[]);
    assert_eq!(simple(&mut s), (EINVAL, 14));
    request(&mut s, CMD_WRITE_ZEROES, CMD_FLAG_FAST_ZERO, 15, 0, 4096, &[]);
    assert_eq!(simple(&mut s), (0, 15), "the memory driver zeroes natively");
    // Still in step after all of that.
    request(&mut s, CMD_READ, 0, 16, 4097, 3, &[]);
    assert_eq!(simple(&mut s), (0, 16));
    assert_eq!(read_n(&mut s, 3), vec![0, 0, 0], "zeroed by the fast zero");
    disconnect(s, t);
}

/// Payload buffers are reused on a connection (`BufPool`): a read into a
/// buffer that held other data returns only what it read, whatever its size.
#[test]
fn reused_buffers_carry_only_the_new_data() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", true);
    let a = vec![0xaau8; 16384];
    request(&mut s, CMD_WRITE, 0, 1, 0, 16384, &a);
    assert_eq!(chunk(&mut s).1, REPLY_TYPE_NONE);
    request(&mut s, CMD_READ, 0, 2, 0, 16384, &[]);
    let (_, ty, cookie, data) = chunk(&mut s);
    assert_eq!((ty, cookie), (REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(data[8..], a[..]);
    // Smaller reads of never-written space, likely into the 16 KiB buffer.
    for (cookie, len) in [(3u64, 5000u32), (4, 4096), (5, 16384)] {
        request(&mut s, CMD_READ, 0, cookie, 40 * PAGE, len, &[]);
        let (_, ty, c, data) = chunk(&mut s);
        assert_eq!((ty, c), (REPLY_TYPE_OFFSET_DATA, cookie));
        assert_eq!(data.len(), 8 + len as usize);
        assert!(data[8..].iter().all(|&b| b == 0), "stale bytes in read {cookie}");
    }
    // A failed read sends no data, and the next read is clean.
    request(&mut s, CMD_READ, 0, 6, BAD_OFFSET, 4096, &[]);
    assert_eq!(chunk(&mut s).1, REPLY_TYPE_ERROR);
    request(&mut s, CMD_READ, 0, 7, 40 * PAGE, 8192, &[]);
    let data = chunk(&mut s).3;
    assert!(data[8..].iter().all(|&b| b == 0));
    disconnect(s, t);
}

#[test]
fn read_only_export_refuses_writes_with_eperm() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "ro", false);
    request(&mut s, CMD_WRITE, 0, 1, 0, 4, b"abcd");
    assert_eq!(simple(&mut s), (EPERM, 1));
    request(&mut s, CMD_TRIM, 0, 2, 0, 4096, &[]);
    assert_eq!(simple(&mut s), (EPERM, 2));
    request(&mut s, CMD_WRITE_ZEROES, 0, 3, 0, 4096, &[]);
    assert_eq!(simple(&mut s), (EPERM, 3));
    request(&mut s, CMD_FLUSH, 0, 4, 0, 0, &[]);
    assert_eq!(simple(&mut s), (0, 4));
    disconnect(s, t);
}

#[test]
fn structured_reads_errors_and_block_status() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    let flags = open(&mut s, "disk", true);
    assert_ne!(flags & FLAG_SEND_DF, 0);
    request(&mut s, CMD_WRITE, 0, 1, 2 * PAGE, 2 * PAGE as u32, &vec![7u8; 2 * PAGE as usize]);
    let (f, k, c, _) = chunk(&mut s);
    assert_eq!((f, k, c), (REPLY_FLAG_DONE, REPLY_TYPE_NONE, 1));
    request(&mut s, CMD_READ, CMD_FLAG_DF, 2, 2 * PAGE + 10, 20, &[]);
    let (f, k, c, p) = chunk(&mut s);
    assert_eq!((f, k, c), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 2));
    assert_eq!(be64(&p[0..8]), 2 * PAGE + 10);
    assert_eq!(&p[8..], &[7u8; 20]);
    request(&mut s, CMD_READ, 0, 3, BAD_OFFSET, 512, &[]);
    let (f, k, c, p) = chunk(&mut s);
    assert_eq!((f, k, c, be32(&p)), (REPLY_FLAG_DONE, REPLY_TYPE_ERROR, 3, EIO));
    let msg_len = be16(&p[4..6]) as usize;
    assert_eq!(p.len(), 6 + msg_len);
    assert!(String::from_utf8_lossy(&p[6..]).contains("injected"));
    request(&mut s, CMD_READ, 0, 4, 0, 0, &[]);
    assert_eq!(chunk(&mut s).1, REPLY_TYPE_NONE);
    // Block status: hole, data (2 pages), hole to the end.
    request(&mut s, CMD_BLOCK_STATUS, 0, 5, 0, SIZE as u32, &[]);
    let (f, k, c, p) = chunk(&mut s);
    assert_eq!((f, k, c), (REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, 5));
    assert_eq!(be32(&p[0..4]), BASE_ALLOCATION_ID);
    let ext: Vec<(u32, u32)> = p[4..].chunks(8).map(|e| (be32(&e[0..4]), be32(&e[4..8]))).collect();
    let hz = STATE_HOLE | STATE_ZERO;
    assert_eq!(ext, vec![(2 * PAGE as u32, hz), (2 * PAGE as u32, 0), ((SIZE - 4 * PAGE) as u32, hz)]);
    request(&mut s, CMD_BLOCK_STATUS, CMD_FLAG_REQ_ONE, 6, PAGE, 4 * PAGE as u32, &[]);
    let p = chunk(&mut s).3;
    assert_eq!(p.len(), 12, "one extent");
    assert_eq!((be32(&p[4..8]), be32(&p[8..12])), (PAGE as u32, hz));
    request(&mut s, CMD_BLOCK_STATUS, 0, 7, SIZE - 1, 2, &[]);
    let (_, k, _, p) = chunk(&mut s);
    assert_eq!((k, be32(&p)), (REPLY_TYPE_ERROR, EINVAL));
    disconnect(s, t);
}

#[test]
fn list_and_set_meta_context() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    greet(&mut s, FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES);
    send_opt(&mut s, OPT_STRUCTURED_REPLY, &[]);
    assert_eq!(opt_reply(&mut s, OPT_STRUCTURED_REPLY).0, REP_ACK);
    for queries in [vec![], vec!["base:"], vec!["x-foo:bar", "base:allocation"]] {
        send_opt(&mut s, OPT_LIST_META_CONTEXT, &meta_data("disk", &queries));
        let r = opt_replies(&mut s, OPT_LIST_META_CONTEXT);
        assert_eq!(r.len(), 2, "{queries:?}");
        assert_eq!(r[0].0, REP_META_CONTEXT);
        assert_eq!(&r[0].1[4..], BASE_ALLOCATION.as_bytes());
    }
    send_opt(&mut s, OPT_LIST_META_CONTEXT, &meta_data("disk", &["qemu:dirty-bitmap:a"]));
    assert_eq!(opt_replies(&mut s, OPT_LIST_META_CONTEXT).len(), 1, "unknown namespaces are ignored");
    // Selecting for one export and going to another leaves no context active.
    send_opt(&mut s, OPT_SET_META_CONTEXT, &meta_data("ro", &["base:", "base:allocation"]));
    let r = opt_replies(&mut s, OPT_SET_META_CONTEXT);
    assert_eq!(r.len(), 2);
    assert_eq!(be32(&r[0].1), BASE_ALLOCATION_ID);
    send_opt(&mut s, OPT_GO, &info_data("disk", &[]));
    assert_eq!(opt_replies(&mut s, OPT_GO).last().unwrap().0, REP_ACK);
    request(&mut s, CMD_BLOCK_STATUS, 0, 1, 0, 4096, &[]);
    let (_, k, _, p) = chunk(&mut s);
    assert_eq!((k, be32(&p)), (REPLY_TYPE_ERROR, EINVAL));
    disconnect(s, t);
}

#[test]
fn pipelined_requests_complete_out_of_order() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", false);
    // The read waits inside the driver until the later write lands, so its
    // reply must come second: both are in flight at once.
    request(&mut s, CMD_READ, 0, 1, GATE_OFFSET, 512, &[]);
    request(&mut s, CMD_WRITE, 0, 2, OPEN_OFFSET, 4, b"open");
    for i in 0..50u64 {
        request(&mut s, CMD_FLUSH, 0, 100 + i, 0, 0, &[]);
    }
    let first = simple(&mut s);
    assert_eq!(first, (0, 2), "the write is answered before the blocked read");
    let mut seen = Vec::new();
    for _ in 0..51 {
        let (err, cookie) = simple(&mut s);
        assert_eq!(err, 0);
        if cookie == 1 {
            read_n(&mut s, 512);
        }
        seen.push(cookie);
    }
    seen.sort();
    assert_eq!(seen[0], 1);
    assert_eq!(seen[1..], (100..150).collect::<Vec<_>>());
    disconnect(s, t);
}

/// Writes through the node to `OPEN_OFFSET`, releasing reads held at the gate.
fn open_gate(node: &Arc<BlockNode>) {
    let n = node.clone();
    crate::runtime::block_on(async move {
        let mut b = crate::block::AlignedBuf::new(512, 512).unwrap();
        n.write(OPEN_OFFSET, &b.iovecs(), Default::default()).await.unwrap();
    })
    .unwrap();
}

#[test]
fn disconnect_answers_in_flight_requests_first() {
    let reg = Arc::new(Registry::default());
    let (node, gate) = gated_node("n-disk", false);
    reg.add_export(export_cfg("disk", true), node.clone()).unwrap();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", true);
    request(&mut s, CMD_READ, 0, 1, GATE_OFFSET, 512, &[]);
    gate.wait_entered();
    request(&mut s, CMD_DISC, 0, 2, 0, 0, &[]);
    open_gate(&node);
    let (f, k, c, p) = chunk(&mut s);
    assert_eq!((f, k, c, p.len()), (REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, 1, 8 + 512));
    assert!(closed(&mut s));
    t.join().unwrap();
}

#[test]
fn hostile_requests_drop_only_that_client() {
    let reg = registry();
    let (mut good, tg) = connect(&reg, 100);
    open(&mut good, "disk", false);
    let cases: Vec<Hostile> = vec![
        Box::new(|s| s.write_all(&[0xaa; 28]).unwrap()),
        Box::new(|s| request(s, CMD_WRITE, 0, 1, 0, MAX_PAYLOAD + 1, &[])),
        Box::new(|s| request(s, CMD_WRITE, 0, 1, 0, u32::MAX, &[])),
        // Disconnects in the middle of a write payload.
        Box::new(|s| {
            request(s, CMD_WRITE, 0, 1, 0, 4096, &[1; 100]);
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }),
        // Disconnects in the middle of a header.
        Box::new(|s| {
            s.write_all(&REQUEST_MAGIC.to_be_bytes()).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
        }),
    ];
    for (i, f) in cases.iter().enumerate() {
        let (mut s, t) = connect(&reg, i as u64 + 1);
        open(&mut s, "disk", false);
        f(&mut s);
        assert!(closed(&mut s), "case {i}");
        t.join().unwrap();
    }
    request(&mut good, CMD_READ, 0, 7, 0, 4, &[]);
    assert_eq!(simple(&mut good), (0, 7));
    read_n(&mut good, 4);
    disconnect(good, tg);
    assert_eq!(reg.connections(), 0);
}

/// Random requests (any command, flag bits, offset up to u64::MAX, length
/// up to u32::MAX; writes carry their payload when the server takes one
/// that size) each get a simple reply with their cookie and a defined
/// error, a successful read its data, and the connection stays in step.
#[test]
fn random_requests_each_get_a_defined_reply() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x6e62_6472);
    let reg = Arc::new(Registry::default());
    let (node, _gate) = gated_node("n-rand", false);
    open_gate(&node);
    reg.add_export(export_cfg("disk", true), node).unwrap();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", false);
    let kinds = [CMD_READ, CMD_WRITE, CMD_FLUSH, CMD_TRIM, CMD_CACHE, CMD_WRITE_ZEROES, CMD_BLOCK_STATUS, 8, 42, u16::MAX];
    let (mut ok, mut failed) = (0, 0);
    for cookie in 0..1500u64 {
        let kind = kinds[rng.gen_range(0..kinds.len())];
        let flags: u16 = if rng.gen_bool(0.6) { 0 } else { rng.gen() };
        let offset = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..SIZE),
            1 => SIZE - rng.gen_range(0..8192),
            2 => rng.gen(),
            _ => u64::MAX - rng.gen_range(0..8192),
        };
        let length: u32 = match rng.gen_range(0..4) {
            0 => 0,
            1 => rng.gen_range(1..70_000),
            2 => rng.gen_range(0..SIZE as u32 + 8192),
            _ => rng.gen(),
        };
        if kind == CMD_WRITE && length > MAX_PAYLOAD {
            continue; // the server drops such a client: hostile_requests_drop_only_that_client
        }
        let payload = if kind == CMD_WRITE { vec![cookie as u8; length as usize] } else { Vec::new() };
        request(&mut s, kind, flags, cookie, offset, length, &payload);
        let (err, got) = simple(&mut s);
        assert_eq!(got, cookie, "request {cookie}: kind {kind} flags {flags:#x} offset {offset} length {length}");
        assert!(
            [0, EPERM, EIO, ENOMEM, EINVAL, ENOSPC, EOVERFLOW, ENOTSUP].contains(&err),
            "request {cookie}: error {err} for kind {kind} flags {flags:#x} offset {offset} length {length}"
        );
        if err == 0 {
            ok += 1;
            if kind == CMD_READ {
                read_n(&mut s, length as usize);
            }
        } else {
            failed += 1;
        }
    }
    assert!(ok > 100 && failed > 100, "{ok} served, {failed} refused");
    request(&mut s, CMD_READ, 0, 7, 0, 4, &[]);
    assert_eq!(simple(&mut s), (0, 7));
    read_n(&mut s, 4);
    disconnect(s, t);
}

// ---- export life cycle ---------------------------------------------------------

#[test]
fn add_export_refuses_duplicates_and_writable_read_only_nodes() {
    let reg = registry();
    assert!(reg.add_export(export_cfg("disk", true), mem_node("x", false)).unwrap_err().contains("already"));
    let mut same_id = export_cfg("other", false);
    same_id.id = "id-disk".into();
    assert!(reg.add_export(same_id, mem_node("x", false)).unwrap_err().contains("id-disk"));
    assert!(reg.add_export(export_cfg("w", true), mem_node("x", true)).unwrap_err().contains("read-only"));
    assert!(reg.add_export(export_cfg(&"n".repeat(5000), false), mem_node("x", false)).is_err());
    assert_eq!(reg.names(), vec!["disk", "ro"]);
}

#[test]
fn remove_export_closes_clients_after_in_flight_requests_then_calls_back() {
    let reg = Arc::new(Registry::default());
    let (node, gate) = gated_node("n-disk", false);
    reg.add_export(export_cfg("disk", true), node.clone()).unwrap();
    reg.add_export(export_cfg("ro", false), mem_node("n-ro", true)).unwrap();
    assert_eq!(node.users(), vec!["id-disk"]);
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", false);
    // A read blocked in the driver is in flight while the export goes away.
    request(&mut s, CMD_READ, 0, 1, GATE_OFFSET, 512, &[]);
    gate.wait_entered();
    let (tx, rx) = std::sync::mpsc::channel();
    reg.remove_export("disk", Box::new(move || tx.send(()).unwrap())).unwrap();
    assert!(reg.lookup("disk").is_none());
    assert!(reg.has_clients("disk"), "still draining");
    assert!(rx.try_recv().is_err(), "a client is still connected");
    // Let the read go on by writing through the node itself.
    open_gate(&node);
    assert_eq!(simple(&mut s), (0, 1), "the in-flight read is answered");
    read_n(&mut s, 512);
    assert!(closed(&mut s));
    rx.recv_timeout(Duration::from_secs(20)).unwrap();
    t.join().unwrap();
    assert!(node.users().is_empty(), "detached");
    assert!(!reg.has_clients("disk"));
    // Without clients the callback runs at once.
    let (tx, rx) = std::sync::mpsc::channel();
    reg.remove_export("ro", Box::new(move || tx.send(()).unwrap())).unwrap();
    rx.try_recv().unwrap();
    assert!(reg.remove_export("ro", Box::new(|| {})).is_err());
}

#[test]
fn a_client_that_stops_reading_cannot_hold_a_removed_export() {
    let reg = registry();
    let (mut s, t) = connect(&reg, 1);
    open(&mut s, "disk", false);
    // Far more reply data than the socket buffers hold; the client reads none.
    for i in 0..200u64 {
        request(&mut s, CMD_READ, 0, i, 0, 1 << 20, &[]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    reg.remove_export("disk", Box::new(move || tx.send(()).unwrap())).unwrap();
    rx.recv_timeout(Duration::from_secs(30)).expect("the export is gone after the drain grace period");
    t.join().unwrap();
    assert_eq!(reg.connections(), 0);
}

// ---- the listening server --------------------------------------------------------

fn temp_sock(tag: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{tag}.sock"));
    (dir, path)
}

#[test]
fn server_limits_connections_and_stop_cleans_up() {
    let (_dir, path) = temp_sock("max");
    let srv = NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(path.clone()), max_connections: 1 }).unwrap();
    srv.add_export(export_cfg("disk", true), mem_node("n", false)).unwrap();
    let mut a = UnixStream::connect(&path).unwrap();
    a.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    open(&mut a, "disk", false);
    let mut b = UnixStream::connect(&path).unwrap();
    b.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    assert!(closed(&mut b), "over max-connections");
    request(&mut a, CMD_WRITE, 0, 1, 0, 2, b"ok");
    assert_eq!(simple(&mut a), (0, 1));
    assert!(srv.has_clients("disk"));
    srv.stop();
    assert!(!path.exists());
    assert!(closed(&mut a));
    assert!(srv.wait_idle(Duration::from_secs(20)));
    assert!(srv.export_names().is_empty());
    assert!(srv.add_export(export_cfg("x", false), mem_node("n", false)).is_err());
    srv.stop();
}

#[test]
fn server_over_tcp_and_stale_socket_files() {
    let srv = NbdServer::start(NbdServerConfig {
        addr: NbdAddr::Inet { host: "127.0.0.1".into(), port: 0 },
        max_connections: 0,
    })
    .unwrap();
    srv.add_export(export_cfg("disk", true), mem_node("n", false)).unwrap();
    let port = srv.inet_port().unwrap();
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut g = [0u8; 18];
    c.read_exact(&mut g).unwrap();
    assert_eq!(be64(&g[0..8]), INIT_MAGIC);
    srv.stop();
    let mut b = [0u8; 1];
    assert!(matches!(c.read(&mut b), Ok(0) | Err(_)));
    assert!(srv.wait_idle(Duration::from_secs(20)));

    // A stale socket file is replaced; a regular file is not.
    let (_dir, path) = temp_sock("stale");
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let srv = NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(path.clone()), max_connections: 0 }).unwrap();
    assert!(NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(path.clone()), max_connections: 0 }).is_err());
    srv.stop();
    std::fs::write(&path, b"not a socket").unwrap();
    let e = NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(path.clone()), max_connections: 0 }).err().unwrap();
    assert!(e.contains("not a socket"), "{e}");
}

#[test]
fn errors_from_the_node_keep_their_kind() {
    // A sanity check of the mapping the replies use.
    let e = BlockError::new(ErrorKind::NoSpace, "full");
    assert_eq!(nbd_errno(e.errno()), ENOSPC);
    let e = BlockError::new(ErrorKind::ReadOnly, "ro");
    assert_eq!(nbd_errno(e.errno()), EPERM);
}

#[test]
fn server_on_an_inherited_listening_fd() {
    use std::os::fd::AsRawFd;
    let (_dir, path) = temp_sock("fd");
    let l = std::os::unix::net::UnixListener::bind(&path).unwrap();
    let srv = NbdServer::start(NbdServerConfig { addr: NbdAddr::Fd(l.as_raw_fd()), max_connections: 0 }).unwrap();
    srv.add_export(export_cfg("disk", true), mem_node("n", false)).unwrap();
    let mut c = UnixStream::connect(&path).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    open(&mut c, "disk", false);
    request(&mut c, CMD_FLUSH, 0, 1, 0, 0, &[]);
    assert_eq!(simple(&mut c), (0, 1));
    srv.stop();
    assert!(path.exists(), "a socket file the server did not create is left alone");
    let t = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let srv = NbdServer::start(NbdServerConfig { addr: NbdAddr::Fd(t.as_raw_fd()), max_connections: 0 }).unwrap();
    assert_eq!(srv.inet_port(), Some(t.local_addr().unwrap().port()));
    srv.stop();
    let f = std::fs::File::open("/dev/null").unwrap();
    let e = NbdServer::start(NbdServerConfig { addr: NbdAddr::Fd(f.as_raw_fd()), max_connections: 0 }).err().unwrap();
    assert!(e.contains("fd"), "{e}");
    let connected = UnixStream::pair().unwrap().0;
    let e = NbdServer::start(NbdServerConfig { addr: NbdAddr::Fd(connected.as_raw_fd()), max_connections: 0 }).err().unwrap();
    assert!(e.contains("not a listening"), "{e}");
    assert!(NbdServer::start(NbdServerConfig { addr: NbdAddr::Fd(-1), max_connections: 0 }).is_err());
}
