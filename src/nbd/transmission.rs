//! The transmission phase: a reader that parses requests in order and one
//! task per request, replying in whatever order requests complete.
//!
//! All of a connection runs on its own thread's [`Runtime`]. The reader
//! reads a header, validates it ([`request::validate`]), reads a `WRITE`'s
//! payload into a buffer it owns, and spawns the request; then it goes on to
//! the next header, so a client can pipeline many requests. Replies are
//! serialised by an asynchronous send lock, one whole reply at a time, and
//! carry the request's cookie.
//!
//! Memory stays bounded: at most [`MAX_IN_FLIGHT`] requests and
//! [`MAX_IN_FLIGHT_BYTES`] of payload are in flight per connection; beyond
//! that the reader waits before reading further payload.
//!
//! The reader stops on `NBD_CMD_DISC`, end-of-file, a protocol violation,
//! or when the connection is asked to close (`Conn::close` shuts down the
//! read side, so a waiting `recv` sees end-of-file). Requests already read
//! still complete and are answered. If replies cannot be delivered for
//! [`DRAIN_GRACE`] after that (a client that stopped reading), the socket is
//! shut down in both directions so the pending sends fail; the block I/O of
//! those requests still runs to completion before the thread ends.

use std::cell::{Cell, RefCell};
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use event_listener::Event;

use super::handshake::Negotiated;
use super::proto::*;
use super::registry::{Conn, Export};
use super::request::{validate, Command, Ctx, Verdict};
use super::socket::{discard_exact, recv_exact, send_all, Recv};
use crate::block::{AlignedBuf, BlockError, WriteFlags};
use crate::runtime::Runtime;

/// Most requests in flight on one connection.
pub const MAX_IN_FLIGHT: usize = 64;
/// Most payload bytes (read and write buffers) in flight on one connection.
pub const MAX_IN_FLIGHT_BYTES: usize = 128 << 20;
/// How long draining requests may wait for a client that does not read.
#[cfg(not(test))]
pub const DRAIN_GRACE: Duration = Duration::from_secs(10);
#[cfg(test)]
pub const DRAIN_GRACE: Duration = Duration::from_millis(500);
/// Most extents in one block-status reply.
const MAX_EXTENTS: usize = 1024;

/// A single-threaded asynchronous counter of requests and bytes in flight.
#[derive(Default)]
struct Budget {
    count: Cell<usize>,
    bytes: Cell<usize>,
    changed: Event,
}

impl Budget {
    fn fits(&self, bytes: usize) -> bool {
        self.count.get() == 0
            || (self.count.get() < MAX_IN_FLIGHT && self.bytes.get().saturating_add(bytes) <= MAX_IN_FLIGHT_BYTES)
    }

    async fn acquire(&self, bytes: usize) {
        while !self.fits(bytes) {
            let l = self.changed.listen();
            if self.fits(bytes) {
                break;
            }
            l.await;
        }
        self.count.set(self.count.get() + 1);
        self.bytes.set(self.bytes.get() + bytes);
    }

    fn release(&self, bytes: usize) {
        self.count.set(self.count.get().saturating_sub(1));
        self.bytes.set(self.bytes.get().saturating_sub(bytes));
        self.changed.notify(usize::MAX);
    }

    async fn drained(&self) {
        while self.count.get() != 0 {
            let l = self.changed.listen();
            if self.count.get() == 0 {
                break;
            }
            l.await;
        }
    }
}

/// Free payload buffers kept for reuse.
const POOL_BYTES: usize = 16 << 20;

/// The payload buffers of one connection, reused from request to request.
///
/// Allocating a fresh aligned buffer per request cost a `memset` of the whole
/// buffer and, for large ones, left glibc's allocator unable to reuse what
/// was freed (an aligned request needs more than the freed chunk): with
/// `qemu-img bench` reading 1 MiB at QD8 the server's resident memory peaked
/// at 136 MiB. Buffers stay with the connection that used them (never
/// another client's data), and at most [`POOL_BYTES`] are kept while free.
#[derive(Default)]
struct BufPool {
    free: RefCell<Vec<AlignedBuf>>,
    kept: Cell<usize>,
}

impl BufPool {
    /// A buffer of at least `len` bytes (within 4× of it) aligned to
    /// `align`: the smallest free one that fits, or a new, zeroed one.
    fn take(&self, len: usize, align: usize) -> Option<AlignedBuf> {
        let len = len.max(1);
        let mut free = self.free.borrow_mut();
        let best = free
            .iter()
            .enumerate()
            .filter(|(_, b)| b.len() >= len && b.len() / 4 <= len && b.align() >= align)
            .min_by_key(|(_, b)| b.len())
            .map(|(i, _)| i);
        match best {
            Some(i) => {
                let b = free.swap_remove(i);
                self.kept.set(self.kept.get() - b.len());
                Some(b)
            }
            None => AlignedBuf::new(len, align),
        }
    }

    /// Keeps `b` for reuse, unless the pool holds enough already.
    fn give(&self, b: AlignedBuf) {
        let kept = self.kept.get() + b.len();
        if kept <= POOL_BYTES {
            self.kept.set(kept);
            self.free.borrow_mut().push(b);
        }
    }
}

/// A single-threaded asynchronous mutex for the socket's send side.
#[derive(Default)]
struct SendLock {
    busy: Cell<bool>,
    released: Event,
}

struct SendGuard<'a>(&'a SendLock);

impl SendLock {
    async fn lock(&self) -> SendGuard<'_> {
        while self.busy.get() {
            let l = self.released.listen();
            if !self.busy.get() {
                break;
            }
            l.await;
        }
        self.busy.set(true);
        SendGuard(self)
    }
}

impl Drop for SendGuard<'_> {
    fn drop(&mut self) {
        self.0.busy.set(false);
        self.0.released.notify(1);
    }
}

/// One connection in the transmission phase.
pub struct Session {
    conn: Arc<Conn>,
    export: Arc<Export>,
    structured: bool,
    base_allocation: bool,
    budget: Budget,
    bufs: BufPool,
    send: SendLock,
    dead: Cell<bool>,
    draining_since: Cell<Option<Instant>>,
}

/// What a request produced.
enum Outcome {
    Done,
    Data(AlignedBuf, u64, usize),
    Extents(Vec<(u32, u32)>),
    Failed(u32, String),
}

impl Session {
    /// A session for a negotiated connection.
    pub fn new(conn: Arc<Conn>, n: Negotiated) -> Rc<Session> {
        Rc::new(Session {
            conn,
            export: n.export,
            structured: n.structured,
            base_allocation: n.base_allocation,
            budget: Budget::default(),
            bufs: BufPool::default(),
            send: SendLock::default(),
            dead: Cell::new(false),
            draining_since: Cell::new(None),
        })
    }

    fn fd(&self) -> i32 {
        self.conn.socket.raw_fd()
    }

    fn ctx(&self) -> Ctx {
        Ctx {
            structured: self.structured,
            base_allocation: self.base_allocation,
            writable: self.export.cfg.writable,
            fast_zero: self.export.node.caps().write_zeroes,
            size: self.export.size(),
        }
    }

    /// Drives the connection on `rt` until it is finished, escalating to a
    /// full socket shutdown if draining takes longer than [`DRAIN_GRACE`].
    pub fn drive(self: &Rc<Self>, rt: &Rc<Runtime>) {
        let finished = Rc::new(Cell::new(false));
        {
            let (s, rt2, finished) = (self.clone(), rt.clone(), finished.clone());
            rt.spawn(async move {
                s.read_loop(&rt2).await;
                s.start_draining();
                s.budget.drained().await;
                finished.set(true);
            });
        }
        self.conn.set_waker(Some(rt.wake_fd()));
        let mut escalated = false;
        loop {
            rt.turn();
            if finished.get() {
                break;
            }
            if self.conn.is_closing() {
                // The reader may be waiting for budget rather than in `recv`.
                self.start_draining();
            }
            if !escalated && self.draining_since.get().is_some_and(|t| t.elapsed() >= DRAIN_GRACE) {
                super::warn_client(format_args!(
                    "nbd: connection {} did not drain in time; closing its socket",
                    self.conn.id
                ));
                self.conn.socket.shutdown(std::net::Shutdown::Both);
                escalated = true;
            }
            // Poll with a timeout only while draining, to notice the grace period end.
            let timeout = if self.draining_since.get().is_some() && !escalated { 100 } else { -1 };
            wait_readable(rt.wake_fd(), timeout);
        }
        self.conn.set_waker(None);
    }

    fn start_draining(&self) {
        if self.draining_since.get().is_none() {
            self.draining_since.set(Some(Instant::now()));
        }
    }

    async fn read_loop(self: &Rc<Self>, rt: &Rc<Runtime>) {
        let id = self.conn.id;
        loop {
            let mut hb = [0u8; REQUEST_LEN];
            match recv_exact(self.fd(), &mut hb).await {
                Ok(Recv::Full) => {}
                Ok(Recv::Eof) => return,
                Err(e) => {
                    log::info!("nbd: connection {id}: {e}");
                    return;
                }
            }
            if self.conn.is_closing() || self.dead.get() {
                return;
            }
            let h = RequestHeader::decode(&hb);
            match validate(&h, &self.ctx()) {
                Verdict::Run(cmd) => {
                    if !self.start(rt, h.cookie, cmd).await {
                        return;
                    }
                }
                Verdict::Reject { errno, msg, payload } => {
                    log::debug!("nbd: connection {id}: request {:#x} refused: {msg}", h.cookie);
                    if discard_exact(self.fd(), payload as usize).await.is_err() {
                        return;
                    }
                    self.budget.acquire(0).await;
                    self.spawn(rt, h.cookie, 0, async move { Outcome::Failed(errno, msg) });
                }
                Verdict::Disconnect => return,
                Verdict::Drop(why) => {
                    super::warn_client(format_args!("nbd: connection {id}: {why}; dropping the client"));
                    self.conn.socket.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
        }
    }

    /// Reads a write's payload if any and spawns the request; false if the
    /// connection broke while reading the payload.
    async fn start(self: &Rc<Self>, rt: &Rc<Runtime>, cookie: u64, cmd: Command) -> bool {
        let bytes = match cmd {
            Command::Read { len, .. } | Command::Write { len, .. } => len as usize,
            _ => 0,
        };
        self.budget.acquire(bytes).await;
        let s = self.clone();
        let Command::Write { offset, len, fua } = cmd else {
            self.spawn(rt, cookie, bytes, async move { s.execute(cmd).await });
            return true;
        };
        let mut buf = if len == 0 { None } else { self.bufs.take(len as usize, self.mem_align()) };
        let received = match buf.as_mut() {
            Some(b) => recv_exact(self.fd(), &mut b.as_mut_slice()[..len as usize]).await.map(|r| r == Recv::Full),
            None => discard_exact(self.fd(), len as usize).await.map(|_| true),
        };
        if !matches!(received, Ok(true)) {
            log::info!("nbd: connection {}: client went away in the middle of a write", self.conn.id);
            self.budget.release(bytes);
            return false;
        }
        self.spawn(rt, cookie, bytes, async move {
            match (buf, len) {
                (_, 0) => Outcome::Done,
                (None, _) => Outcome::Failed(ENOMEM, "cannot allocate the write buffer".into()),
                (Some(mut b), _) => {
                    let r = s.export.node.write(offset, &b.prefix_iovecs(len as usize), WriteFlags { fua }).await;
                    s.bufs.give(b);
                    done_or_failed(r)
                }
            }
        });
        true
    }

    fn mem_align(&self) -> usize {
        (self.export.node.limits().mem_alignment as usize).max(512)
    }

    fn spawn(self: &Rc<Self>, rt: &Runtime, cookie: u64, bytes: usize, work: impl std::future::Future<Output = Outcome> + 'static) {
        let s = self.clone();
        rt.spawn(async move {
            let outcome = work.await;
            s.reply(cookie, outcome).await;
            s.budget.release(bytes);
        });
    }

    async fn execute(&self, cmd: Command) -> Outcome {
        let node = &self.export.node;
        match cmd {
            Command::Read { offset, len } => {
                let Some(mut buf) = self.bufs.take(len as usize, self.mem_align()) else {
                    return Outcome::Failed(ENOMEM, "cannot allocate the read buffer".into());
                };
                if len == 0 {
                    return Outcome::Data(buf, offset, 0);
                }
                // A read that succeeds fills all `len` bytes (a file read
                // past its end is zero-filled), so a reused buffer's old
                // contents never reach the client.
                match node.read(offset, &buf.prefix_iovecs(len as usize)).await {
                    Ok(()) => Outcome::Data(buf, offset, len as usize),
                    Err(e) => {
                        self.bufs.give(buf);
                        failed(&e)
                    }
                }
            }
            Command::Write { .. } => Outcome::Failed(EIO, "write without payload".into()),
            Command::Flush => done_or_failed(node.flush().await),
            Command::Trim { offset, len, fua } => {
                let r = node.discard(offset, len as u64).await;
                match r {
                    Ok(()) if fua => done_or_failed(node.flush().await),
                    r => done_or_failed(r),
                }
            }
            Command::Cache { .. } => Outcome::Done,
            Command::WriteZeroes { offset, len, fua, may_unmap } => {
                done_or_failed(node.write_zeroes(offset, len as u64, may_unmap, WriteFlags { fua }).await)
            }
            Command::BlockStatus { offset, len, req_one } => self.block_status(offset, len, req_one).await,
        }
    }

    async fn block_status(&self, offset: u64, len: u32, req_one: bool) -> Outcome {
        let mut extents: Vec<(u32, u32)> = Vec::new();
        let end = offset + len as u64;
        let mut pos = offset;
        while pos < end && extents.len() < MAX_EXTENTS {
            let st = match self.export.node.block_status(pos, end - pos).await {
                Ok(st) => st,
                Err(e) if extents.is_empty() => return failed(&e),
                Err(_) => break,
            };
            let flags = if st.data { 0 } else { STATE_HOLE } | if st.zero { STATE_ZERO } else { 0 };
            let n = st.len.clamp(1, end - pos) as u32;
            match extents.last_mut() {
                Some(last) if last.1 == flags => last.0 += n,
                _ => extents.push((n, flags)),
            }
            pos += n as u64;
            if req_one {
                break;
            }
        }
        Outcome::Extents(extents)
    }

    async fn reply(&self, cookie: u64, outcome: Outcome) {
        if self.dead.get() {
            return;
        }
        let (head, data): (Vec<u8>, Option<(AlignedBuf, usize)>) = match outcome {
            Outcome::Done if self.structured => (chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0), None),
            Outcome::Done => (simple_reply(0, cookie), None),
            Outcome::Failed(errno, msg) if self.structured => (error_chunk(errno, cookie, &msg), None),
            Outcome::Failed(errno, _) => (simple_reply(errno, cookie), None),
            Outcome::Data(_, _, 0) if self.structured => (chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_NONE, cookie, 0), None),
            Outcome::Data(buf, offset, len) if self.structured => {
                let mut h = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_OFFSET_DATA, cookie, 8 + len as u32);
                h.extend_from_slice(&offset.to_be_bytes());
                (h, Some((buf, len)))
            }
            Outcome::Data(buf, _, len) => (simple_reply(0, cookie), Some((buf, len))),
            Outcome::Extents(ext) => (self.extents_chunk(cookie, &ext), None),
        };
        let payload: &[u8] = match &data {
            Some((buf, len)) => &buf.as_slice()[..*len],
            None => &[],
        };
        self.send_reply(&head, payload).await;
        if let Some((buf, _)) = data {
            self.bufs.give(buf);
        }
    }

    /// Sends one whole reply under the send lock, unless the connection died.
    async fn send_reply(&self, head: &[u8], payload: &[u8]) {
        let _guard = self.send.lock().await;
        if self.dead.get() {
            return;
        }
        if let Err(e) = send_all(self.fd(), &[head, payload]).await {
            log::info!("nbd: connection {}: cannot send a reply: {e}", self.conn.id);
            self.dead.set(true);
            self.conn.socket.shutdown(std::net::Shutdown::Both);
        }
    }

    fn extents_chunk(&self, cookie: u64, ext: &[(u32, u32)]) -> Vec<u8> {
        let len = 4 + 8 * ext.len() as u32;
        let mut v = chunk_header(REPLY_FLAG_DONE, REPLY_TYPE_BLOCK_STATUS, cookie, len);
        v.extend_from_slice(&BASE_ALLOCATION_ID.to_be_bytes());
        for (n, flags) in ext {
            v.extend_from_slice(&n.to_be_bytes());
            v.extend_from_slice(&flags.to_be_bytes());
        }
        v
    }
}

fn failed(e: &BlockError) -> Outcome {
    Outcome::Failed(nbd_errno(e.errno()), e.to_string())
}

fn done_or_failed(r: Result<(), BlockError>) -> Outcome {
    match r {
        Ok(()) => Outcome::Done,
        Err(e) => failed(&e),
    }
}

/// Waits until `fd` is readable or `timeout_ms` passed.
fn wait_readable(fd: i32, timeout_ms: i32) {
    let mut pfd = libc::pollfd { fd, events: libc::POLLIN, revents: 0 };
    // SAFETY: `pfd` is a valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn buffers_are_reused_within_bounds() {
        let pool = BufPool::default();
        let a = pool.take(1 << 20, 4096).expect("alloc");
        let addr = a.as_slice().as_ptr();
        pool.give(a);
        assert_eq!(pool.kept.get(), 1 << 20);
        // A smaller request within 4x takes the same buffer back.
        let b = pool.take(300 << 10, 512).expect("reuse");
        assert_eq!((b.as_slice().as_ptr(), b.len()), (addr, 1 << 20));
        assert_eq!(pool.kept.get(), 0);
        pool.give(b);
        // Far smaller, larger, or more strictly aligned: a new buffer.
        for (len, align) in [(4096, 512), ((1 << 20) + 1, 512), (4096 * 64, 1 << 16)] {
            let c = pool.take(len, align).expect("alloc");
            assert_ne!(c.as_slice().as_ptr(), addr, "{len} {align}");
            assert_eq!(c.as_slice().as_ptr() as usize % align, 0);
            assert!(c.len() >= len);
        }
        assert_eq!(pool.kept.get(), 1 << 20, "the pooled buffer stayed");
        // No more than POOL_BYTES are kept while free.
        for _ in 0..(POOL_BYTES >> 20) + 4 {
            let big = AlignedBuf::new(1 << 20, 512).expect("alloc");
            pool.give(big);
        }
        assert!(pool.kept.get() <= POOL_BYTES);
        assert_eq!(pool.free.borrow().len(), POOL_BYTES >> 20);
        assert_eq!(pool.take(0, 512).map(|b| !b.is_empty()), Some(true));
    }
}
