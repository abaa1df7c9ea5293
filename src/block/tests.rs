//! Tests of the generic layer (`BlockNode`) and the graph, over an in-memory
//! driver that declares limits and records what reaches it.

use std::cell::Cell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use super::*;
use crate::runtime::Runtime;

/// Yields to the executor once (lets other tasks interleave).
struct YieldOnce(bool);

impl Future for YieldOnce {
    type Output = ();
    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        if self.0 {
            return Poll::Ready(());
        }
        self.0 = true;
        cx.waker().wake_by_ref();
        Poll::Pending
    }
}

#[derive(Default)]
struct Calls {
    reads: AtomicUsize,
    writes: AtomicUsize,
    flushes: AtomicUsize,
    zeroes: AtomicUsize,
    max_len: AtomicUsize,
    max_segs: AtomicUsize,
    misaligned: AtomicUsize,
}

struct MemDriver {
    data: Mutex<Vec<u8>>,
    limits: Limits,
    caps: Caps,
    calls: Arc<Calls>,
    fail_writes: bool,
    /// Serves `read_now`/`write_now` (otherwise the default "not now").
    now: bool,
}

impl MemDriver {
    fn check(&self, offset: u64, buf: &IoVecs) {
        let a = self.limits.request_alignment as u64;
        if offset % a != 0 || buf.len() as u64 % a != 0 || !buf.is_aligned(self.limits.mem_alignment as usize) {
            self.calls.misaligned.fetch_add(1, Ordering::SeqCst);
        }
        self.calls.max_len.fetch_max(buf.len(), Ordering::SeqCst);
        self.calls.max_segs.fetch_max(buf.segments(), Ordering::SeqCst);
    }
}

impl BlockDriver for MemDriver {
    fn format_name(&self) -> &'static str {
        "mem"
    }
    fn limits(&self) -> Limits {
        self.limits
    }
    fn caps(&self) -> Caps {
        self.caps
    }
    fn length(&self) -> u64 {
        self.data.lock().unwrap().len() as u64
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(async move {
            self.check(offset, buf);
            self.calls.reads.fetch_add(1, Ordering::SeqCst);
            YieldOnce(false).await;
            let d = self.data.lock().unwrap();
            buf.copy_from(0, &d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, _fua: bool) -> IoFuture<'a, ()> {
        boxed(async move {
            self.check(offset, buf);
            self.calls.writes.fetch_add(1, Ordering::SeqCst);
            YieldOnce(false).await;
            if self.fail_writes {
                return Err(BlockError::new(ErrorKind::Io, "injected"));
            }
            let mut d = self.data.lock().unwrap();
            buf.copy_to(0, &mut d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }
    fn read_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if !self.now {
            return None;
        }
        self.check(offset, buf);
        self.calls.reads.fetch_add(1, Ordering::SeqCst);
        let d = self.data.lock().unwrap();
        buf.copy_from(0, &d[offset as usize..offset as usize + buf.len()]);
        Some(Ok(()))
    }
    fn write_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if !self.now {
            return None;
        }
        self.check(offset, buf);
        self.calls.writes.fetch_add(1, Ordering::SeqCst);
        if self.fail_writes {
            return Some(Err(BlockError::new(ErrorKind::Io, "injected")));
        }
        let mut d = self.data.lock().unwrap();
        buf.copy_to(0, &mut d[offset as usize..offset as usize + buf.len()]);
        Some(Ok(()))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.calls.flushes.fetch_add(1, Ordering::SeqCst);
        boxed(async { Ok(()) })
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        self.calls.zeroes.fetch_add(1, Ordering::SeqCst);
        boxed(async move {
            let mut d = self.data.lock().unwrap();
            d[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        })
    }
}

fn mem_node(len: usize, limits: Limits, caps: Caps, opts: NodeOptions) -> (Arc<BlockNode>, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let d = MemDriver { data: Mutex::new(vec![0; len]), limits, caps, calls: calls.clone(), fail_writes: false, now: false };
    (BlockNode::new("m".into(), false, Box::new(d), opts), calls)
}

fn aligned(a: u32, max_transfer: u64, max_iov: usize) -> Limits {
    Limits { request_alignment: a, mem_alignment: a, max_transfer, max_iov }
}

/// An owned buffer with an IoVecs over it (kept alive together).
struct Buf {
    data: Vec<u8>,
    iov: IoVecs,
}

impl Buf {
    /// `len` bytes of `fill`, cut into segments of `seg` bytes, starting at
    /// byte 1 of the allocation so it is misaligned in memory.
    fn new(len: usize, fill: u8, seg: usize) -> Buf {
        let mut data = vec![fill; len + 1];
        let mut iov = IoVecs::new();
        let base = data.as_mut_ptr();
        let mut off = 0;
        while off < len {
            let n = seg.min(len - off);
            // SAFETY: `data` lives in the same struct as `iov` and is never
            // reallocated; the range is inside it.
            unsafe { iov.push_raw(base.add(1 + off), n) };
            off += n;
        }
        Buf { data, iov }
    }
    fn bytes(&self) -> &[u8] {
        &self.data[1..]
    }
}

fn run<F: Future + 'static>(f: F) -> F::Output
where
    F::Output: 'static,
{
    crate::runtime::block_on(f).unwrap()
}

#[test]
fn unaligned_read_and_write_go_through_bounce_and_rmw() {
    let (node, calls) = mem_node(64 << 10, aligned(4096, 1 << 20, 1024), Caps::default(), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let w = Buf::new(1000, 0xab, 300);
        n.write(5000, &w.iov, WriteFlags::default()).await.unwrap();
        let r = Buf::new(3000, 0, 7);
        n.read(4000, &r.iov).await.unwrap();
        assert!(r.bytes()[..1000].iter().all(|&b| b == 0));
        assert!(r.bytes()[1000..2000].iter().all(|&b| b == 0xab));
        assert!(r.bytes()[2000..].iter().all(|&b| b == 0));
    });
    assert_eq!(calls.misaligned.load(Ordering::SeqCst), 0, "the driver saw an unaligned request");
}

#[test]
fn overlapping_rmw_writers_do_not_tear_each_other() {
    let (node, calls) = mem_node(16 << 10, aligned(4096, 1 << 20, 1024), Caps::default(), NodeOptions::default());
    let rt = Runtime::new().unwrap();
    let done = Rc::new(Cell::new(0));
    // 64 writers, each owning 64 distinct bytes, all within the same 4 KiB blocks.
    for i in 0..64u64 {
        let n = node.clone();
        let done = done.clone();
        rt.spawn(async move {
            let w = Buf::new(64, i as u8 + 1, 64);
            n.write(100 + i * 128, &w.iov, WriteFlags::default()).await.unwrap();
            done.set(done.get() + 1);
        });
    }
    rt.drain();
    assert_eq!(done.get(), 64);
    let n = node.clone();
    let r = Buf::new(16 << 10, 0, 16 << 10);
    let (r, n) = rt.block_on(async move {
        n.read(0, &r.iov).await.unwrap();
        (r, n)
    });
    drop(n);
    for i in 0..64usize {
        let s = 100 + i * 128;
        assert!(r.bytes()[s..s + 64].iter().all(|&b| b == i as u8 + 1), "writer {i} was lost to a torn read-modify-write");
    }
    assert!(calls.writes.load(Ordering::SeqCst) >= 64);
}

#[test]
fn requests_are_split_at_max_transfer_and_max_iov() {
    let (node, calls) = mem_node(4 << 20, aligned(512, 64 << 10, 4), Caps::default(), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let w = Buf::new(1 << 20, 0x11, 4096);
        n.write(0, &w.iov, WriteFlags::default()).await.unwrap();
        let r = Buf::new(1 << 20, 0, 512);
        n.read(0, &r.iov).await.unwrap();
        assert!(r.bytes().iter().all(|&b| b == 0x11));
    });
    assert!(calls.max_len.load(Ordering::SeqCst) <= 64 << 10);
    assert!(calls.max_segs.load(Ordering::SeqCst) <= 4);
    assert!(calls.writes.load(Ordering::SeqCst) >= 16);
    let s = node.stats();
    assert_eq!((s.wr_operations, s.wr_bytes, s.rd_operations, s.rd_bytes), (1, 1 << 20, 1, 1 << 20), "stats count guest requests, not fragments");
}

#[test]
fn bounds_read_only_and_stats() {
    let (node, _) = mem_node(1 << 20, aligned(1, 1 << 20, 1024), Caps::default(), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let b = Buf::new(4096, 1, 4096);
        assert_eq!(n.read(1 << 20, &b.iov).await.unwrap_err().kind(), ErrorKind::OutOfRange);
        assert_eq!(n.write(u64::MAX - 10, &b.iov, WriteFlags::default()).await.unwrap_err().kind(), ErrorKind::OutOfRange);
        n.write(8192, &b.iov, WriteFlags::default()).await.unwrap();
        n.read(0, &b.iov).await.unwrap();
        n.flush().await.unwrap();
    });
    let s = node.stats();
    assert_eq!((s.invalid_rd_operations, s.invalid_wr_operations), (1, 1));
    assert_eq!((s.rd_operations, s.wr_operations, s.flush_operations), (1, 1, 1));
    assert_eq!(s.wr_highest_offset, 8192 + 4096);

    let (ro, _) = mem_node(1 << 20, aligned(1, 1 << 20, 1024), Caps::default(), NodeOptions { read_only: true, ..Default::default() });
    let n = ro.clone();
    run(async move {
        let b = Buf::new(512, 1, 512);
        assert_eq!(n.write(0, &b.iov, WriteFlags::default()).await.unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(n.write_zeroes(0, 512, false, WriteFlags::default()).await.unwrap_err().kind(), ErrorKind::ReadOnly);
        assert_eq!(n.discard(0, 512).await.unwrap_err().kind(), ErrorKind::ReadOnly);
        n.read(0, &b.iov).await.unwrap();
    });
    assert_eq!(ro.stats().invalid_wr_operations, 2);
}

fn now_node(len: usize, limits: Limits, opts: NodeOptions, fail_writes: bool) -> (Arc<BlockNode>, Arc<Calls>) {
    let calls = Arc::new(Calls::default());
    let d = MemDriver { data: Mutex::new(vec![0; len]), limits, caps: Caps::default(), calls: calls.clone(), fail_writes, now: true };
    (BlockNode::new("now".into(), false, Box::new(d), opts), calls)
}

#[test]
fn requests_served_now_keep_data_and_statistics() {
    let (node, calls) = now_node(1 << 20, aligned(1, 1 << 20, 1024), NodeOptions::default(), false);
    let w = Buf::new(8192, 0x5a, 3000);
    assert!(matches!(node.write_now(4096, &w.iov, WriteFlags::default()), Some(Ok(()))));
    let r = Buf::new(8192, 0, 8192);
    assert!(matches!(node.read_now(4096, &r.iov), Some(Ok(()))));
    assert!(r.bytes().iter().all(|&b| b == 0x5a));
    assert_eq!((calls.reads.load(Ordering::SeqCst), calls.writes.load(Ordering::SeqCst)), (1, 1));
    let s = node.stats();
    assert_eq!((s.rd_operations, s.wr_operations, s.rd_bytes, s.wr_bytes), (1, 1, 8192, 8192));
    assert_eq!(s.wr_highest_offset, 4096 + 8192);

    // A failure served now is the request's result, counted as failed.
    let (bad, _) = now_node(1 << 20, aligned(1, 1 << 20, 1024), NodeOptions::default(), true);
    assert_eq!(bad.write_now(0, &w.iov, WriteFlags::default()).unwrap().unwrap_err().kind(), ErrorKind::Io);
    let s = bad.stats();
    assert_eq!((s.failed_wr_operations, s.wr_operations, s.wr_highest_offset), (1, 0, 0));
}

#[test]
fn requests_that_need_the_generic_layer_are_not_served_now() {
    let (node, calls) = now_node(1 << 20, aligned(512, 64 << 10, 4), NodeOptions::default(), false);
    let aligned_buf = |len: usize, segs: usize| {
        let mut b = AlignedBuf::new(len, 4096).unwrap();
        let base = b.as_mut_slice().as_mut_ptr();
        let mut v = IoVecs::new();
        let seg = len / segs;
        for i in 0..segs {
            // SAFETY: inside `b`, which the caller keeps alive with `v`.
            unsafe { v.push_raw(base.add(i * seg), seg) };
        }
        (b, v)
    };
    let (_b, ok) = aligned_buf(4096, 1);
    let fua = WriteFlags { fua: true };
    // Out of range, past the end and overflowing: the async path reports it.
    assert!(node.read_now(1 << 20, &ok).is_none());
    assert!(node.write_now(u64::MAX - 100, &ok, WriteFlags::default()).is_none());
    // Unaligned offset, unaligned memory, too large, too many segments.
    assert!(node.read_now(100, &ok).is_none());
    let odd = Buf::new(4096, 1, 4096);
    assert!(node.write_now(0, &odd.iov, WriteFlags::default()).is_none());
    let (_big, big) = aligned_buf(128 << 10, 1);
    assert!(node.read_now(0, &big).is_none());
    let (_many, many) = aligned_buf(4096, 8);
    assert!(node.write_now(0, &many, WriteFlags::default()).is_none());
    // Empty requests and FUA writes.
    assert!(node.read_now(0, &IoVecs::new()).is_none());
    assert!(node.write_now(0, &ok, fua).is_none());
    assert_eq!((calls.reads.load(Ordering::SeqCst), calls.writes.load(Ordering::SeqCst)), (0, 0));
    let s = node.stats();
    assert_eq!((s.rd_operations, s.wr_operations, s.invalid_rd_operations, s.invalid_wr_operations), (0, 0, 0, 0));
    // The aligned request itself is served now.
    assert!(node.read_now(0, &ok).is_some());

    // Read-only nodes and detect-zeroes leave writes to the async path.
    let (ro, _) = now_node(1 << 20, aligned(512, 64 << 10, 4), NodeOptions { read_only: true, ..Default::default() }, false);
    assert!(ro.write_now(0, &ok, WriteFlags::default()).is_none());
    assert!(ro.read_now(0, &ok).is_some());
    let (dz, _) = now_node(1 << 20, aligned(512, 64 << 10, 4), NodeOptions { detect_zeroes: DetectZeroes::On, ..Default::default() }, false);
    assert!(dz.write_now(0, &ok, WriteFlags::default()).is_none());
}

#[test]
fn no_write_is_served_now_while_a_read_modify_write_is_in_flight() {
    // The driver's async read yields once, so the unaligned write below
    // stops inside its read-modify-write holding the serialising guard.
    let calls = Arc::new(Calls::default());
    let d = MemDriver { data: Mutex::new(vec![0; 1 << 20]), limits: aligned(512, 1 << 20, 1024), caps: Caps::default(), calls, fail_writes: false, now: true };
    let node = BlockNode::new("rmw".into(), false, Box::new(d), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let odd = Buf::new(100, 7, 100);
        let mut ok = AlignedBuf::new(4096, 4096).unwrap();
        let v = ok.iovecs();
        let mut rmw = std::pin::pin!(n.write(8200, &odd.iov, WriteFlags::default()));
        let mut cx = Context::from_waker(std::task::Waker::noop());
        assert!(rmw.as_mut().poll(&mut cx).is_pending());
        assert!(n.write_now(1 << 19, &v, WriteFlags::default()).is_none());
        // Reads do not serialise.
        assert!(n.read_now(1 << 19, &v).is_some());
        rmw.await.unwrap();
        assert!(n.write_now(1 << 19, &v, WriteFlags::default()).is_some());
    });
}

#[test]
fn failed_writes_are_counted() {
    let calls = Arc::new(Calls::default());
    let d = MemDriver { data: Mutex::new(vec![0; 1 << 20]), limits: aligned(1, 1 << 20, 1024), caps: Caps::default(), calls, fail_writes: true, now: false };
    let node = BlockNode::new("f".into(), false, Box::new(d), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let b = Buf::new(512, 1, 512);
        assert_eq!(n.write(0, &b.iov, WriteFlags::default()).await.unwrap_err().kind(), ErrorKind::Io);
    });
    let s = node.stats();
    assert_eq!((s.failed_wr_operations, s.wr_operations, s.wr_highest_offset), (1, 0, 0));
}

#[test]
fn fua_and_write_zeroes_are_emulated_without_driver_support() {
    let (node, calls) = mem_node(4 << 20, aligned(512, 1 << 20, 1024), Caps::default(), NodeOptions::default());
    let n = node.clone();
    run(async move {
        let w = Buf::new(3 << 20, 0x5a, 1 << 20);
        n.write(0, &w.iov, WriteFlags::default()).await.unwrap();
        n.write(0, &Buf::new(512, 0x5a, 512).iov, WriteFlags { fua: true }).await.unwrap();
        n.write_zeroes(100, (2 << 20) + 7, false, WriteFlags::default()).await.unwrap();
        let r = Buf::new(3 << 20, 1, 1 << 20);
        n.read(0, &r.iov).await.unwrap();
        assert!(r.bytes()[..100].iter().all(|&b| b == 0x5a));
        assert!(r.bytes()[100..100 + (2 << 20) + 7].iter().all(|&b| b == 0));
        assert!(r.bytes()[100 + (2 << 20) + 7..].iter().all(|&b| b == 0x5a));
    });
    assert_eq!(calls.flushes.load(Ordering::SeqCst), 1, "FUA was not emulated with a flush");
    assert_eq!(calls.zeroes.load(Ordering::SeqCst), 0);
    assert_eq!(calls.misaligned.load(Ordering::SeqCst), 0);
}

#[test]
fn detect_zeroes_turns_zero_writes_into_write_zeroes() {
    let caps = Caps { write_zeroes: true, ..Default::default() };
    let opts = NodeOptions { detect_zeroes: DetectZeroes::On, ..Default::default() };
    let (node, calls) = mem_node(1 << 20, aligned(512, 1 << 20, 1024), caps, opts);
    let n = node.clone();
    run(async move {
        n.write(0, &Buf::new(4096, 0, 4096).iov, WriteFlags::default()).await.unwrap();
        n.write(4096, &Buf::new(4096, 1, 4096).iov, WriteFlags::default()).await.unwrap();
    });
    assert_eq!(calls.zeroes.load(Ordering::SeqCst), 1);
    assert_eq!(calls.writes.load(Ordering::SeqCst), 1);
}

#[test]
fn discard_is_ignored_unless_discard_unmap() {
    let (node, _) = mem_node(1 << 20, aligned(512, 1 << 20, 1024), Caps::default(), NodeOptions::default());
    let n = node.clone();
    run(async move { n.discard(0, 4096).await.unwrap() });
    assert_eq!(node.stats().unmap_operations, 1);
}

#[test]
fn graph_refuses_duplicates_and_deleting_nodes_in_use() {
    let g = BlockGraph::new();
    let (a, _) = mem_node(4096, Limits::default(), Caps::default(), NodeOptions::default());
    g.insert(a.clone()).unwrap();
    let (dup, _) = mem_node(4096, Limits::default(), Caps::default(), NodeOptions::default());
    assert!(matches!(g.insert(dup), Err(GraphError::Duplicate(_))));
    a.attach("export0");
    assert!(matches!(g.remove("m"), Err(GraphError::InUse(..))));
    a.detach("export0");
    g.remove("m").unwrap();
    assert!(matches!(g.get("m"), Err(GraphError::NotFound(_))));
    assert!(matches!(graph::check_node_name("1abc"), Err(GraphError::InvalidName(_))));
}
