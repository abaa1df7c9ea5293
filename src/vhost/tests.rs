//! Unit tests of the request pipeline on virtio-queue's mock split queues,
//! over a node backed by an in-memory test driver.
//!
//! Every malformed-request case checks the status byte (or the zero used
//! length for a chain without a status byte) and then that a valid request on
//! the same queue is still served.

use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering::SeqCst};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vhost_user_backend::VhostUserBackend;
use virtio_bindings::virtio_blk as vb;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddressSpace, Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use super::backend::BlkBackend;
use super::config::{VhostBlkConfig, CONFIG_SPACE_SIZE, WCE_OFFSET};
use super::device::Device;
use super::queue::QueueCtx;
use super::request::{S_IOERR, S_OK, S_UNSUPP};
use crate::block::driver::boxed;
use crate::block::{BlockDriver, BlockNode, BlockResult, Caps, IoFuture, IoVecs, NodeOptions};
use crate::runtime::Runtime;

const QSIZE: u16 = 256;
/// Guest memory: two adjacent 1 MiB regions (buffers may span both).
const REGION: u64 = 1 << 20;
/// Where test buffers start (the queue lives below).
const DATA: u64 = 0x1_0000;
/// An address outside guest memory.
const NOWHERE: u64 = 0x4000_0000;
const DISK: u64 = 1 << 20;
const T_IN: u32 = vb::VIRTIO_BLK_T_IN;
const T_OUT: u32 = vb::VIRTIO_BLK_T_OUT;
const T_DISCARD: u32 = vb::VIRTIO_BLK_T_DISCARD;
const T_WZ: u32 = vb::VIRTIO_BLK_T_WRITE_ZEROES;

/// An in-memory disk; requests at `slow_at` wait 30 ms first, every other
/// read and write is served at once (`read_now`/`write_now`), as page-cache
/// hits are.
pub(super) struct MemDisk {
    data: Mutex<Vec<u8>>,
    flushes: Arc<AtomicU64>,
    slow_at: Option<u64>,
}

impl MemDisk {
    pub(super) fn node(len: u64, read_only: bool, slow_at: Option<u64>) -> (Arc<BlockNode>, Arc<AtomicU64>) {
        let flushes = Arc::new(AtomicU64::new(0));
        let data = (0..len).map(|i| (i / 512) as u8 ^ (i % 251) as u8).collect();
        let disk = MemDisk { data: Mutex::new(data), flushes: flushes.clone(), slow_at };
        let opts = NodeOptions { read_only, discard_unmap: true, ..Default::default() };
        (BlockNode::new("mem0".into(), false, Box::new(disk), opts), flushes)
    }

    async fn maybe_wait(&self, offset: u64) {
        if self.slow_at == Some(offset) {
            crate::runtime::sleep(Duration::from_millis(30)).await;
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<u8>> {
        self.data.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl BlockDriver for MemDisk {
    fn format_name(&self) -> &'static str {
        "mem"
    }
    fn caps(&self) -> Caps {
        Caps { discard: true, write_zeroes: true, ..Default::default() }
    }
    fn length(&self) -> u64 {
        self.lock().len() as u64
    }
    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(async move {
            self.maybe_wait(offset).await;
            let d = self.lock();
            buf.copy_from(0, &d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }
    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, _fua: bool) -> IoFuture<'a, ()> {
        boxed(async move {
            self.maybe_wait(offset).await;
            let mut d = self.lock();
            buf.copy_to(0, &mut d[offset as usize..offset as usize + buf.len()]);
            Ok(())
        })
    }
    fn read_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if self.slow_at == Some(offset) {
            return None;
        }
        let d = self.lock();
        buf.copy_from(0, &d[offset as usize..offset as usize + buf.len()]);
        Some(Ok(()))
    }
    fn write_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if self.slow_at == Some(offset) {
            return None;
        }
        let mut d = self.lock();
        buf.copy_to(0, &mut d[offset as usize..offset as usize + buf.len()]);
        Some(Ok(()))
    }
    fn flush(&self) -> IoFuture<'_, ()> {
        self.flushes.fetch_add(1, SeqCst);
        boxed(async { Ok(()) })
    }
    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        self.write_zeroes(offset, len, true)
    }
    fn write_zeroes(&self, offset: u64, len: u64, _may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(async move {
            self.lock()[offset as usize..(offset + len) as usize].fill(0);
            Ok(())
        })
    }
}

/// One queue of a device, driven by hand.
struct Harness {
    mem: Arc<GuestMemoryMmap>,
    gm: GuestMemoryAtomic<GuestMemoryMmap>,
    queue: Queue,
    ctx: Rc<QueueCtx>,
    rt: Runtime,
    dev: Arc<Device>,
    flushes: Arc<AtomicU64>,
    next_desc: u16,
    next_addr: u64,
    used_seen: u16,
}

/// A descriptor: (guest address, length, device-writable).
type D = (u64, u32, bool);

fn cfg(writable: bool, lbs: u32) -> VhostBlkConfig {
    VhostBlkConfig {
        id: "e0".into(),
        path: "/nonexistent".into(),
        writable,
        logical_block_size: lbs,
        serial: Some("SERIAL-0123".into()),
        ..Default::default()
    }
}

impl Harness {
    fn with(c: VhostBlkConfig, slow_at: Option<u64>) -> Self {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), REGION as usize), (GuestAddress(REGION), REGION as usize)])
            .expect("guest memory");
        let mem = Arc::new(mem);
        let queue: Queue = MockSplitQueue::create(&*mem, GuestAddress(0), QSIZE).create_queue().expect("queue");
        let (node, flushes) = MemDisk::node(DISK, !c.writable, slow_at);
        let dev = Arc::new(Device::new(c, node));
        let ctx = QueueCtx::new(dev.clone(), 0);
        let rt = Runtime::new().expect("runtime");
        let gm = GuestMemoryAtomic::new((*mem).clone());
        Harness { mem, gm, queue, ctx, rt, dev, flushes, next_desc: 0, next_addr: DATA, used_seen: 0 }
    }

    fn new(writable: bool) -> Self {
        Self::with(cfg(writable, 512), None)
    }

    /// A fresh buffer of `len` bytes in guest memory (512-aligned).
    fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_addr;
        self.next_addr = (a + len).div_ceil(512) * 512;
        a
    }

    fn header(&mut self, t: u32, sector: u64) -> u64 {
        let a = self.alloc(16);
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&t.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.mem.write_slice(&h, GuestAddress(a)).expect("header");
        a
    }

    /// A status byte pre-set to 0xff, so a test sees whether it was written.
    fn status(&mut self) -> u64 {
        let a = self.alloc(1);
        self.mem.write_obj(0xffu8, GuestAddress(a)).expect("status");
        a
    }

    fn segment(&mut self, sector: u64, num: u32, flags: u32) -> u64 {
        let a = self.alloc(16);
        let mut s = [0u8; 16];
        s[..8].copy_from_slice(&sector.to_le_bytes());
        s[8..12].copy_from_slice(&num.to_le_bytes());
        s[12..].copy_from_slice(&flags.to_le_bytes());
        self.mem.write_slice(&s, GuestAddress(a)).expect("segment");
        a
    }

    fn raw(descs: &[D], first: u16) -> Vec<RawDescriptor> {
        let n = descs.len();
        descs
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, w))| {
                let mut flags = if w { VRING_DESC_F_WRITE } else { 0 } as u16;
                let next = if i + 1 < n {
                    flags |= VRING_DESC_F_NEXT as u16;
                    first + i as u16 + 1
                } else {
                    0
                };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
            })
            .collect()
    }

    /// Makes `descs` available as one chain; returns its head index.
    fn chain(&mut self, descs: &[D]) -> u16 {
        let head = self.next_desc;
        for (i, r) in Self::raw(descs, head).into_iter().enumerate() {
            self.put_desc(head + i as u16, r);
        }
        self.next_desc += descs.len().max(1) as u16;
        self.publish(head);
        head
    }

    /// Writes descriptor `index` of the table.
    fn put_desc(&self, index: u16, d: RawDescriptor) {
        let at = self.queue.desc_table() + 16 * u64::from(index);
        self.mem.write_obj(d, GuestAddress(at)).expect("descriptor");
    }

    /// Adds `head` to the available ring (as a driver does; the mock's
    /// helpers re-initialise the rings, so the harness keeps its own index).
    fn publish(&self, head: u16) {
        let avail = self.queue.avail_ring();
        let idx: u16 = self.mem.read_obj(GuestAddress(avail + 2)).expect("avail idx");
        self.mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(idx % QSIZE))).expect("avail ring");
        self.mem.write_obj(idx.wrapping_add(1), GuestAddress(avail + 2)).expect("avail idx");
    }

    /// Pops, runs everything to completion, fills the used ring; returns
    /// the new used entries as (head, len).
    fn run(&mut self) -> Vec<(u32, u32)> {
        self.ctx.pop_and_start(Some(&self.rt), &mut self.queue, &self.gm, usize::MAX, true);
        self.rt.drain();
        self.ctx.complete(&mut self.queue, &self.mem);
        self.used()
    }

    fn used(&mut self) -> Vec<(u32, u32)> {
        let base = self.queue.used_ring();
        let idx: u16 = self.mem.read_obj(GuestAddress(base + 2)).expect("used idx");
        let mut out = Vec::new();
        while self.used_seen != idx {
            let e = base + 4 + u64::from(self.used_seen % QSIZE) * 8;
            let id: u32 = self.mem.read_obj(GuestAddress(e)).expect("used id");
            let len: u32 = self.mem.read_obj(GuestAddress(e + 4)).expect("used len");
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    fn byte(&self, addr: u64) -> u8 {
        self.mem.read_obj(GuestAddress(addr)).expect("byte")
    }

    fn bytes(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0u8; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).expect("bytes");
        v
    }

    fn disk(&mut self, offset: u64, len: usize) -> Vec<u8> {
        let d = self.alloc(len as u64);
        let h = self.header(T_IN, offset / 512);
        let s = self.status();
        let head = self.chain(&[(h, 16, false), (d, len as u32, true), (s, 1, true)]);
        assert_eq!(self.run(), vec![(u32::from(head), len as u32 + 1)]);
        assert_eq!(self.byte(s), S_OK);
        self.bytes(d, len)
    }

    /// Submits `descs` alone, expects one used entry of `len` and `status`
    /// at `s` (when given); then checks a valid read still works.
    fn expect(&mut self, descs: &[D], s: Option<u64>, status: u8, len: u32) {
        let head = self.chain(descs);
        assert_eq!(self.run(), vec![(u32::from(head), len)], "used entry");
        if let Some(s) = s {
            assert_eq!(self.byte(s), status, "status byte");
        }
        let refused = self.dev.refused();
        // A region no test writes to (past 512 KiB), one logical block long.
        let (at, len) = (DISK - 8192, self.dev.cfg.logical_block_size as usize);
        assert_eq!(self.disk(at, len), expected(at, len as u64), "the queue serves on");
        assert_eq!(self.dev.refused(), refused);
    }

    /// A request of type `t` at `sector` with `data`, expecting `status`.
    fn expect_status(&mut self, t: u32, sector: u64, data: &[D], status: u8) {
        let h = self.header(t, sector);
        let s = self.status();
        let mut descs = vec![(h, 16, false)];
        descs.extend_from_slice(data);
        descs.push((s, 1, true));
        let len = if status == S_OK && t == T_IN { 1 + data.iter().map(|d| d.1).sum::<u32>() } else { 1 };
        self.expect(&descs, Some(s), status, len);
    }
}

/// The test disk's initial content.
fn expected(offset: u64, len: u64) -> Vec<u8> {
    (offset..offset + len).map(|i| (i / 512) as u8 ^ (i % 251) as u8).collect()
}

#[test]
fn read_returns_disk_data_and_used_length() {
    let mut h = Harness::new(true);
    assert_eq!(h.disk(512 * 7, 4096), expected(512 * 7, 4096));
    assert_eq!(h.disk(DISK - 512, 512), expected(DISK - 512, 512));
}

#[test]
fn write_then_read_back() {
    let mut h = Harness::new(true);
    let d = h.alloc(2048);
    h.mem.write_slice(&[0x5a; 2048], GuestAddress(d)).expect("data");
    h.expect_status(T_OUT, 8, &[(d, 1024, false), (d + 1024, 1024, false)], S_OK);
    assert_eq!(h.disk(8 * 512, 2048), vec![0x5a; 2048]);
}

#[test]
fn flush_and_get_id() {
    let mut h = Harness::new(true);
    let before = h.flushes.load(SeqCst);
    h.expect_status(vb::VIRTIO_BLK_T_FLUSH, 0, &[], S_OK);
    assert_eq!(h.flushes.load(SeqCst), before + 1);
    let id = h.alloc(512);
    let hd = h.header(vb::VIRTIO_BLK_T_GET_ID, 0);
    let s = h.status();
    h.expect(&[(hd, 16, false), (id, 512, true), (s, 1, true)], Some(s), S_OK, 21);
    let mut want = b"SERIAL-0123".to_vec();
    want.resize(20, 0);
    assert_eq!(h.bytes(id, 20), want);
}

#[test]
fn get_id_with_a_short_buffer_is_ioerr() {
    let mut h = Harness::new(true);
    let id = h.alloc(19);
    h.expect_status(vb::VIRTIO_BLK_T_GET_ID, 0, &[(id, 19, true)], S_IOERR);
}

#[test]
fn discard_and_write_zeroes() {
    let mut h = Harness::new(true);
    let seg = h.segment(16, 8, 0);
    h.expect_status(T_DISCARD, 0, &[(seg, 16, false)], S_OK);
    assert_eq!(h.disk(16 * 512, 4096), vec![0; 4096]);
    let seg = h.segment(64, 2, vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_OK);
    assert_eq!(h.disk(64 * 512, 1024), vec![0; 1024]);
    assert_eq!(h.disk(66 * 512, 512), expected(66 * 512, 512));
}

#[test]
fn chain_too_short_for_a_header_is_ioerr() {
    let mut h = Harness::new(true);
    let hd = h.header(T_IN, 0);
    let s = h.status();
    h.expect(&[(hd, 8, false), (s, 1, true)], Some(s), S_IOERR, 1);
}

#[test]
fn chain_without_a_status_byte_goes_back_with_length_zero() {
    let mut h = Harness::new(true);
    let hd = h.header(T_IN, 0);
    let d = h.alloc(512);
    // The last descriptor is device-readable: no status byte.
    h.expect(&[(hd, 16, false), (d, 512, false)], None, 0, 0);
    // The last descriptor is writable but empty.
    h.expect(&[(hd, 16, false), (d, 512, true), (d, 0, true)], None, 0, 0);
    // The status byte is outside guest memory.
    h.expect(&[(hd, 16, false), (d, 512, true), (NOWHERE, 1, true)], None, 0, 0);
    // A status address that overflows.
    h.expect(&[(hd, 16, false), (u64::MAX, 2, true)], None, 0, 0);
    assert_eq!(h.dev.refused(), 4);
}

#[test]
fn header_or_data_outside_guest_memory_is_ioerr() {
    let mut h = Harness::new(true);
    let s = h.status();
    h.expect(&[(NOWHERE, 16, false), (s, 1, true)], Some(s), S_IOERR, 1);
    let s = h.status();
    let hd = h.header(T_IN, 0);
    h.expect(&[(hd, 16, false), (NOWHERE, 512, true), (s, 1, true)], Some(s), S_IOERR, 1);
    // Data that starts in memory and runs off its end.
    h.expect_status(T_OUT, 0, &[(2 * REGION - 512, 1024, false)], S_IOERR);
}

#[test]
fn wrong_direction_is_ioerr() {
    let mut h = Harness::new(true);
    let d = h.alloc(512);
    h.expect_status(T_IN, 0, &[(d, 512, false)], S_IOERR);
    h.expect_status(T_OUT, 0, &[(d, 512, true)], S_IOERR);
    let seg = h.segment(0, 1, 0);
    h.expect_status(T_DISCARD, 0, &[(seg, 16, false), (d, 512, true)], S_IOERR);
    // A readable descriptor after a writable one.
    let hd = h.header(T_OUT, 0);
    let s = h.status();
    h.expect(&[(hd, 16, false), (d, 512, true), (d, 512, false), (s, 1, true)], Some(s), S_IOERR, 1);
}

#[test]
fn bad_lengths_and_ranges_are_ioerr() {
    let mut h = Harness::new(true);
    let d = h.alloc(4096);
    h.expect_status(T_IN, 0, &[(d, 100, true)], S_IOERR);
    h.expect_status(T_OUT, 0, &[(d, 513, false)], S_IOERR);
    h.expect_status(T_IN, DISK / 512, &[(d, 512, true)], S_IOERR);
    h.expect_status(T_IN, DISK / 512 - 1, &[(d, 1024, true)], S_IOERR);
    h.expect_status(T_OUT, u64::MAX, &[(d, 512, false)], S_IOERR);
    h.expect_status(T_IN, u64::MAX / 512, &[(d, 512, true)], S_IOERR);
}

#[test]
fn writes_on_a_read_only_export_are_ioerr() {
    let mut h = Harness::new(false);
    let d = h.alloc(512);
    h.expect_status(T_OUT, 0, &[(d, 512, false)], S_IOERR);
    let seg = h.segment(0, 1, 0);
    h.expect_status(T_DISCARD, 0, &[(seg, 16, false)], S_IOERR);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_IOERR);
    // Reads and flushes still work.
    h.expect_status(vb::VIRTIO_BLK_T_FLUSH, 0, &[], S_OK);
}

#[test]
fn discard_and_write_zeroes_segment_rules() {
    let mut h = Harness::new(true);
    for t in [T_DISCARD, T_WZ] {
        let two = h.alloc(32);
        h.mem.write_slice(&[0u8; 32], GuestAddress(two)).expect("segs");
        h.expect_status(t, 0, &[(two, 32, false)], S_UNSUPP);
        let short = h.segment(0, 1, 0);
        h.expect_status(t, 0, &[(short, 8, false)], S_IOERR);
        h.expect_status(t, 0, &[], S_IOERR);
        let big = h.segment(0, 32769, 0);
        h.expect_status(t, 0, &[(big, 16, false)], S_IOERR);
        let past = h.segment(DISK / 512 - 1, 2, 0);
        h.expect_status(t, 0, &[(past, 16, false)], S_IOERR);
        let overflow = h.segment(u64::MAX, 1, 0);
        h.expect_status(t, 0, &[(overflow, 16, false)], S_IOERR);
        let flags = h.segment(0, 1, 2);
        h.expect_status(t, 0, &[(flags, 16, false)], S_UNSUPP);
    }
    let unmap = h.segment(0, 1, vb::VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
    h.expect_status(T_DISCARD, 0, &[(unmap, 16, false)], S_UNSUPP);
}

#[test]
fn unknown_types_are_unsupp() {
    let mut h = Harness::new(true);
    let d = h.alloc(512);
    for t in [2, 5, 10, vb::VIRTIO_BLK_T_SECURE_ERASE, 0xffff_ffff] {
        h.expect_status(t, 0, &[(d, 512, true)], S_UNSUPP);
    }
}

#[test]
fn large_logical_blocks_need_aligned_requests() {
    let mut h = Harness::with(cfg(true, 4096), None);
    let d = h.alloc(8192);
    h.expect_status(T_IN, 0, &[(d, 512, true)], S_IOERR);
    h.expect_status(T_IN, 1, &[(d, 4096, true)], S_IOERR);
    h.expect_status(T_IN, 8, &[(d, 4096, true)], S_OK);
    let seg = h.segment(8, 1, 0);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_IOERR);
    let seg = h.segment(3, 8, 0);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_IOERR);
    let seg = h.segment(8, 8, 0);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_OK);
}

#[test]
fn any_framing_is_accepted() {
    let mut h = Harness::new(true);
    // Header split over two descriptors; data and status in one descriptor.
    let hd = h.header(T_IN, 2);
    let buf = h.alloc(513);
    h.mem.write_obj(0xffu8, GuestAddress(buf + 512)).expect("status");
    let head = h.chain(&[(hd, 5, false), (hd + 5, 11, false), (buf, 513, true)]);
    assert_eq!(h.run(), vec![(u32::from(head), 513)]);
    assert_eq!(h.byte(buf + 512), S_OK);
    assert_eq!(h.bytes(buf, 512), expected(1024, 512));
    // A buffer spanning the two guest memory regions.
    let hd = h.header(T_IN, 0);
    let s = h.status();
    let head = h.chain(&[(hd, 16, false), (REGION - 1024, 2048, true), (s, 1, true)]);
    assert_eq!(h.run(), vec![(u32::from(head), 2049)]);
    assert_eq!(h.bytes(REGION - 1024, 2048), expected(0, 2048));
}

#[test]
fn indirect_chains_work() {
    let mut h = Harness::new(true);
    let hd = h.header(T_IN, 4);
    let d = h.alloc(1024);
    let s = h.status();
    let table = h.alloc(48);
    for (i, r) in Harness::raw(&[(hd, 16, false), (d, 1024, true), (s, 1, true)], 0).into_iter().enumerate() {
        h.mem.write_obj(r, GuestAddress(table + 16 * i as u64)).expect("indirect table");
    }
    let head = h.next_desc;
    h.put_desc(head, RawDescriptor::from(SplitDescriptor::new(table, 48, VRING_DESC_F_INDIRECT as u16, 0)));
    h.publish(head);
    h.next_desc += 1;
    assert_eq!(h.run(), vec![(u32::from(head), 1025)]);
    assert_eq!(h.byte(s), S_OK);
    assert_eq!(h.bytes(d, 1024), expected(2048, 1024));
}

#[test]
fn descriptor_loops_and_bad_heads_do_not_hang_or_crash() {
    let mut h = Harness::new(true);
    // A descriptor whose `next` points at itself: the chain ends after
    // `QSIZE` descriptors, all readable, so it has no status byte.
    let hd = h.header(T_IN, 0);
    let head = h.next_desc;
    h.put_desc(head, RawDescriptor::from(SplitDescriptor::new(hd, 16, VRING_DESC_F_NEXT as u16, head)));
    h.publish(head);
    h.next_desc += 1;
    assert_eq!(h.run(), vec![(u32::from(head), 0)]);
    // An available-ring entry naming a descriptor past the table: nothing
    // can be returned for it, and the queue serves on.
    h.publish(QSIZE + 7);
    assert_eq!(h.run(), vec![]);
    assert_eq!(h.disk(0, 512), expected(0, 512));
}

#[test]
fn a_corrupt_available_index_is_survived() {
    let mut h = Harness::new(true);
    let avail = h.queue.avail_ring();
    h.mem.write_obj(QSIZE + 10, GuestAddress(avail + 2)).expect("idx");
    assert_eq!(h.run(), vec![]);
    h.mem.write_obj(0u16, GuestAddress(avail + 2)).expect("idx");
    assert_eq!(h.disk(0, 512), expected(0, 512));
}

#[test]
fn requests_complete_out_of_order_without_blocking_the_queue() {
    let mut h = Harness::with(cfg(true, 512), Some(0));
    let (d1, d2) = (h.alloc(512), h.alloc(512));
    let (h1, h2) = (h.header(T_IN, 0), h.header(T_IN, 8));
    let (s1, s2) = (h.status(), h.status());
    let slow = h.chain(&[(h1, 16, false), (d1, 512, true), (s1, 1, true)]);
    let fast = h.chain(&[(h2, 16, false), (d2, 512, true), (s2, 1, true)]);
    h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true);
    // The fast one was served while popping, without a task; the slow one is a task.
    assert_eq!((h.ctx.pending_completions(), h.rt.live_tasks()), (1, 1));
    h.rt.turn();
    h.ctx.complete(&mut h.queue, &h.mem);
    assert_eq!(h.used(), vec![(u32::from(fast), 513)], "the fast request does not wait for the slow one");
    assert_eq!(h.rt.live_tasks(), 1);
    h.rt.drain();
    h.ctx.complete(&mut h.queue, &h.mem);
    assert_eq!(h.used(), vec![(u32::from(slow), 513)]);
    assert_eq!((h.byte(s1), h.byte(s2)), (S_OK, S_OK));
}

#[test]
fn requests_share_one_memory_snapshot_per_queue_until_it_changes() {
    let mut h = Harness::with(cfg(true, 512), Some(0));
    let first = h.gm.memory().into_inner();
    let base = Arc::strong_count(&first);
    for _ in 0..2 {
        let (hd, d, s) = (h.header(T_IN, 0), h.alloc(512), h.status());
        h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]);
    }
    h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true);
    assert_eq!(h.rt.live_tasks(), 2, "two slow reads in flight");
    assert_eq!(Arc::strong_count(&first), base + 1, "the queue and its requests hold one reference between them");
    // The frontend changes the memory table: the next pop parses against
    // the new map, and the old one lives on for the requests still in flight.
    h.gm.lock().expect("memory lock").replace((*h.mem).clone());
    let second = h.gm.memory().into_inner();
    let (hd, d, s) = (h.header(T_IN, 8), h.alloc(512), h.status());
    h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]);
    h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true);
    assert_eq!(Arc::strong_count(&second), base + 1);
    assert_eq!(Arc::strong_count(&first), 2, "kept for the requests in flight only");
    h.rt.drain();
    h.ctx.complete(&mut h.queue, &h.mem);
    assert_eq!(h.used().len(), 3);
    assert_eq!(Arc::strong_count(&first), 1, "released with its last request");
    h.ctx.release_memory();
    assert_eq!(Arc::strong_count(&second), base, "an idle queue holds no snapshot");
}

#[test]
fn a_batch_is_popped_at_once_with_event_idx() {
    let mut h = Harness::new(true);
    h.queue.set_event_idx(true);
    let mut heads = Vec::new();
    for i in 0..8u64 {
        let (hd, d, s) = (h.header(T_IN, i), h.alloc(512), h.status());
        heads.push(h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]));
    }
    assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true), 8);
    h.rt.drain();
    // used_event is 0: the first completion needs an interrupt.
    assert!(h.ctx.complete(&mut h.queue, &h.mem));
    let used: Vec<u32> = h.used().into_iter().map(|(id, _)| id).collect();
    assert_eq!(used, heads.iter().map(|&x| u32::from(x)).collect::<Vec<_>>());
}

#[test]
fn a_limited_pop_leaves_the_rest_for_the_next_chunk() {
    for event_idx in [false, true] {
        let mut h = Harness::new(true);
        h.queue.set_event_idx(event_idx);
        let mut heads = Vec::new();
        for i in 0..10u64 {
            let (hd, d, s) = (h.header(T_IN, i), h.alloc(512), h.status());
            heads.push(u32::from(h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)])));
        }
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, 4, true), 4);
        h.rt.drain();
        h.ctx.complete(&mut h.queue, &h.mem);
        assert_eq!(h.used().into_iter().map(|(id, _)| id).collect::<Vec<_>>(), heads[..4]);
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, 4, true), 4);
        // Fewer than the limit: the pop ends with notifications back on.
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, 4, true), 2);
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, 4, true), 0);
        h.rt.drain();
        h.ctx.complete(&mut h.queue, &h.mem);
        let mut used: Vec<u32> = h.used().into_iter().map(|(id, _)| id).collect();
        used.sort_unstable();
        let mut want = heads[4..].to_vec();
        want.sort_unstable();
        assert_eq!(used, want);
    }
}

#[test]
fn polling_pops_leave_notifications_off_until_rearmed() {
    for event_idx in [false, true] {
        let mut h = Harness::new(true);
        h.queue.set_event_idx(event_idx);
        let used = h.queue.used_ring();
        // What the guest reads to decide whether to kick: the used ring's
        // flags without EVENT_IDX, avail_event (after the used ring) with it.
        let kick_state = |h: &Harness| -> u16 {
            let at = if event_idx { used + 4 + 8 * u64::from(QSIZE) } else { used };
            h.mem.read_obj(GuestAddress(at)).expect("notification state")
        };
        let add = |h: &mut Harness, i: u64| {
            let (hd, d, s) = (h.header(T_IN, i), h.alloc(512), h.status());
            h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)])
        };
        add(&mut h, 0);
        add(&mut h, 1);
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, false), 2);
        // Still off: NO_NOTIFY set, or avail_event not moved past the chains.
        assert_eq!(kick_state(&h), if event_idx { 0 } else { 1 }, "notifications were turned back on while polling");
        // A chain added while the worker polls: rearming reports it, since
        // the guest may not have kicked for it.
        add(&mut h, 2);
        assert!(h.ctx.rearm(&mut h.queue, &h.gm));
        assert_eq!(kick_state(&h), if event_idx { 2 } else { 0 });
        assert_eq!(h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true), 1);
        // A normal pop ends with notifications on.
        assert_eq!(kick_state(&h), if event_idx { 3 } else { 0 });
        assert!(!h.ctx.rearm(&mut h.queue, &h.gm));
        h.rt.drain();
        h.ctx.complete(&mut h.queue, &h.mem);
        assert_eq!(h.used().len(), 3);
    }
}

#[test]
fn without_a_runtime_requests_fail_cleanly() {
    let mut h = Harness::new(true);
    let (hd, d, s) = (h.header(T_IN, 0), h.alloc(512), h.status());
    let head = h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]);
    h.ctx.pop_and_start(None, &mut h.queue, &h.gm, usize::MAX, true);
    h.ctx.complete(&mut h.queue, &h.mem);
    assert_eq!(h.used(), vec![(u32::from(head), 1)]);
    assert_eq!(h.byte(s), S_IOERR);
}

#[test]
fn after_detach_nothing_reaches_the_used_ring() {
    let mut h = Harness::new(true);
    let (hd, d, s) = (h.header(T_IN, 0), h.alloc(512), h.status());
    h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]);
    h.ctx.pop_and_start(Some(&h.rt), &mut h.queue, &h.gm, usize::MAX, true);
    h.ctx.detach();
    h.rt.drain();
    assert!(!h.ctx.complete(&mut h.queue, &h.mem));
    assert_eq!(h.used(), vec![]);
    assert_eq!(h.byte(s), S_OK, "the request itself still ran");
}

fn le32(b: &[u8], off: usize) -> u32 {
    u32::from_le_bytes([b[off], b[off + 1], b[off + 2], b[off + 3]])
}

#[test]
fn config_space_bytes() {
    let mut c = cfg(true, 4096);
    c.num_queues = 4;
    c.queue_size = 128;
    let h = Harness::with(c, None);
    let b = h.dev.config_space();
    assert_eq!(b.len(), CONFIG_SPACE_SIZE);
    assert_eq!(u64::from_le_bytes(b[0..8].try_into().unwrap_or_default()), DISK / 512, "capacity");
    assert_eq!(le32(&b, 12), 126, "seg_max: queue size - 2");
    assert_eq!(le32(&b, 8), (i32::MAX as u32 / 126) / 4096 * 4096, "size_max: as large as an int allows");
    assert_eq!(le32(&b, 20), 4096, "blk_size");
    assert_eq!((b[24], b[25]), (0, 0), "physical_block_exp, alignment_offset");
    assert_eq!(u16::from_le_bytes([b[26], b[27]]), 1, "min_io_size");
    assert_eq!(b[32], 1, "wce: write-back");
    assert_eq!(u16::from_le_bytes([b[34], b[35]]), 4, "num_queues");
    assert_eq!(le32(&b, 36), 32768, "max_discard_sectors");
    assert_eq!(le32(&b, 40), 1, "max_discard_seg");
    assert_eq!(le32(&b, 44), 8, "discard_sector_alignment");
    assert_eq!(le32(&b, 48), 32768, "max_write_zeroes_sectors");
    assert_eq!(le32(&b, 52), 1, "max_write_zeroes_seg");
    assert_eq!(b[56], 1, "write_zeroes_may_unmap");
    h.dev.set_capacity(DISK * 2);
    assert_eq!(h.dev.config_space()[0..8], (DISK * 2 / 512).to_le_bytes(), "capacity follows a resize");
}

#[test]
fn get_config_and_set_config_through_the_backend() {
    let mut h = Harness::new(true);
    let backend = BlkBackend::new(h.dev.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new())).expect("backend");
    let all = backend.get_config(0, 256);
    assert_eq!(all.len(), 256, "any size is answered");
    assert_eq!(all[..CONFIG_SPACE_SIZE], h.dev.config_space());
    assert_eq!(backend.get_config(20, 4), 512u32.to_le_bytes());
    let d = h.alloc(512);
    // Write-back: a write does not flush.
    let f0 = h.flushes.load(SeqCst);
    h.expect_status(T_OUT, 0, &[(d, 512, false)], S_OK);
    assert_eq!(h.flushes.load(SeqCst), f0);
    // The guest turns the cache off: every write is durable on completion.
    backend.set_config(WCE_OFFSET as u32, &[0]).expect("set_config");
    assert_eq!(backend.get_config(WCE_OFFSET as u32, 1), vec![0]);
    h.expect_status(T_OUT, 0, &[(d, 512, false)], S_OK);
    assert_eq!(h.flushes.load(SeqCst), f0 + 1);
    let seg = h.segment(0, 1, 0);
    h.expect_status(T_WZ, 0, &[(seg, 16, false)], S_OK);
    assert_eq!(h.flushes.load(SeqCst), f0 + 2);
    // A driver without FLUSH gets a write-through device, whatever WCE says;
    // the latest SET_FEATURES counts (QEMU sends an early one without FLUSH).
    backend.set_config(WCE_OFFSET as u32, &[1]).expect("set_config");
    backend.acked_features(1 << vb::VIRTIO_BLK_F_CONFIG_WCE);
    assert!(h.dev.write_through());
    assert_eq!(backend.get_config(WCE_OFFSET as u32, 1), vec![1], "the WCE byte is the guest's");
    backend.acked_features(1 << vb::VIRTIO_BLK_F_CONFIG_WCE | 1 << vb::VIRTIO_BLK_F_FLUSH);
    assert!(!h.dev.write_through());
    // A new connection resets the cache to write-back.
    backend.set_config(WCE_OFFSET as u32, &[0]).expect("set_config");
    drop(BlkBackend::new(h.dev.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new())));
    assert!(!h.dev.write_through());
    backend.set_config(WCE_OFFSET as u32, &[0]).expect("set_config");
    // Read-only fields ignore writes; the WCE byte goes back on.
    backend.set_config(0, &[0xff; 8]).expect("set_config");
    assert_eq!(backend.get_config(0, 8), (DISK / 512).to_le_bytes());
    backend.set_config(WCE_OFFSET as u32 - 2, &[9, 9, 1]).expect("set_config");
    h.expect_status(T_OUT, 0, &[(d, 512, false)], S_OK);
    assert_eq!(h.flushes.load(SeqCst), f0 + 2);
}

#[test]
fn backend_offers_the_features_and_one_thread_per_queue() {
    let mut c = cfg(false, 512);
    c.num_queues = 3;
    let h = Harness::with(c, None);
    let backend = BlkBackend::new(h.dev.clone(), GuestMemoryAtomic::new(GuestMemoryMmap::new())).expect("backend");
    assert_eq!(backend.queues_per_thread(), vec![1, 2, 4]);
    assert_eq!(backend.num_queues(), 3);
    assert_ne!(backend.features() & 1 << vb::VIRTIO_BLK_F_RO, 0);
    let pf = backend.protocol_features();
    use vhost::vhost_user::message::VhostUserProtocolFeatures as P;
    assert!(pf.contains(P::CONFIG | P::MQ | P::REPLY_ACK | P::CONFIGURE_MEM_SLOTS));
    // No worker exists: stopping a vring returns at once.
    backend.stop_vring(0).expect("stop_vring");
    backend.stop_vring(99).expect("stop_vring of a queue that does not exist");
    backend.teardown();
}

/// The harness's queue as a vhost-user-backend vring with a backend on it,
/// and one 512-byte read made available: (vring, backend, head, status).
fn live_queue(h: &mut Harness) -> (super::backend::Vring, Arc<BlkBackend>, u16, u64) {
    use vhost_user_backend::VringT;
    let gm = h.gm.clone();
    let vring = super::backend::Vring::new(gm.clone(), QSIZE).expect("vring");
    vring.set_queue_size(QSIZE);
    vring.set_queue_info(h.queue.desc_table(), h.queue.avail_ring(), h.queue.used_ring()).expect("queue info");
    vring.set_queue_ready(true);
    vring.set_enabled(true);
    let backend = Arc::new(BlkBackend::new(h.dev.clone(), gm).expect("backend"));
    let (hd, d, s) = (h.header(T_IN, 0), h.alloc(512), h.status());
    let head = h.chain(&[(hd, 16, false), (d, 512, true), (s, 1, true)]);
    (vring, backend, head, s)
}

#[test]
fn stop_vring_waits_for_requests_in_flight() {
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::epoll::EventSet;

    let mut h = Harness::with(cfg(true, 512), Some(0));
    let (vring, backend, head, s) = live_queue(&mut h);

    // The queue thread: a kick, then wake-ups until told to quit.
    let stop = Arc::new(AtomicBool::new(false));
    let (started_tx, started_rx) = std::sync::mpsc::channel();
    let worker = {
        let (b, v, stop) = (backend.clone(), vring.clone(), stop.clone());
        std::thread::spawn(move || {
            let vrings = [v];
            let _ = b.handle_event(0, EventSet::IN, &vrings, 0);
            let _ = started_tx.send(());
            while !stop.load(SeqCst) {
                let _ = b.handle_event(b.wake_id(), EventSet::IN, &vrings, 0);
                std::thread::yield_now();
            }
            let _ = b.handle_event(b.quit_id(), EventSet::IN, &vrings, 0);
        })
    };
    started_rx.recv().expect("kick handled");
    assert_eq!(h.used(), vec![], "the slow read is in flight");
    backend.stop_vring(0).expect("stop_vring");
    assert_eq!(h.used(), vec![(u32::from(head), 513)], "stop_vring returned after the request completed");
    assert_eq!(h.byte(s), S_OK);
    stop.store(true, SeqCst);
    assert!(worker.join().is_ok());
    // The worker was torn down on its thread; teardown has nothing to wait for.
    backend.teardown();
}

/// A frontend that sends the next request as soon as the last completes
/// keeps a polling queue thread busy for ever; the teardown (a disconnect,
/// `block-export-del`, SIGTERM) still ends it.
#[test]
fn teardown_ends_a_queue_that_polls_a_never_idle_ring() {
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::epoll::EventSet;

    let mut c = cfg(true, 512);
    c.poll_us = crate::vhost::config::MAX_POLL_US;
    let mut h = Harness::with(c, None);
    let (vring, backend, head, _) = live_queue(&mut h);

    // The guest: the same request again whenever the last one completed.
    let stop = Arc::new(AtomicBool::new(false));
    let served = Arc::new(AtomicU64::new(0));
    let guest = {
        let (mem, stop, served) = (h.mem.clone(), stop.clone(), served.clone());
        let (avail, used) = (h.queue.avail_ring(), h.queue.used_ring());
        std::thread::spawn(move || {
            while !stop.load(SeqCst) {
                let a: u16 = mem.read_obj(GuestAddress(avail + 2)).expect("avail idx");
                let u: u16 = mem.read_obj(GuestAddress(used + 2)).expect("used idx");
                if a == u {
                    served.store(u64::from(u), SeqCst);
                    mem.write_obj(head, GuestAddress(avail + 4 + 2 * u64::from(a % QSIZE))).expect("avail ring");
                    mem.write_obj(a.wrapping_add(1), GuestAddress(avail + 2)).expect("avail idx");
                }
                std::hint::spin_loop();
            }
        })
    };
    // The queue thread: the first kick, then the quit event, as epoll would
    // deliver them.
    let worker = {
        let (b, v) = (backend.clone(), vring.clone());
        std::thread::spawn(move || {
            let vrings = [v];
            let _ = b.handle_event(0, EventSet::IN, &vrings, 0);
            let _ = b.handle_event(b.quit_id(), EventSet::IN, &vrings, 0);
        })
    };
    while served.load(SeqCst) < 100 {
        std::thread::yield_now();
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let b = backend.clone();
    std::thread::spawn(move || {
        b.teardown();
        let _ = tx.send(());
    });
    let ended = rx.recv_timeout(Duration::from_secs(30));
    stop.store(true, SeqCst);
    assert!(ended.is_ok(), "teardown did not end a queue thread that was polling a busy ring");
    assert!(worker.join().is_ok());
    assert!(guest.join().is_ok());
}

/// Random hostile chains (any type, sector, number, length, direction and
/// placement of descriptors, in or out of guest memory, across the region
/// boundary) each come back exactly once, never claim more bytes written
/// than the chain's writable descriptors hold, leave a status byte only
/// with a defined status, and the queue serves on.
#[test]
fn random_hostile_chains_complete_and_the_queue_serves_on() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x626c_6b73);
    let mut h = Harness::new(true);
    let types = [T_IN, T_OUT, vb::VIRTIO_BLK_T_FLUSH, vb::VIRTIO_BLK_T_GET_ID, T_DISCARD, T_WZ, 3, 0xdead_beef];
    for round in 0..2000 {
        h.next_desc = 0;
        h.next_addr = DATA;
        let t = types[rng.gen_range(0..types.len())];
        let sector = match rng.gen_range(0..4) {
            0 => rng.gen_range(0..DISK / 512),
            1 => DISK / 512 - rng.gen_range(0..4),
            2 => rng.gen(),
            _ => u64::MAX - rng.gen_range(0..4),
        };
        let mut descs: Vec<D> = Vec::new();
        if rng.gen_bool(0.9) {
            let hdr = h.header(t, sector);
            descs.push((hdr, [16, 16, 16, 15, 17, 0][rng.gen_range(0..6)], rng.gen_bool(0.05)));
        }
        for _ in 0..rng.gen_range(0..4) {
            let len: u32 = [0, 1, 16, 511, 512, 4096, 8192, 65536][rng.gen_range(0..8)];
            let addr = match rng.gen_range(0..6) {
                0 => NOWHERE,
                1 => REGION - u64::from(len / 2),
                2 => 2 * REGION - u64::from(len.min(64)),
                _ => {
                    let a = h.alloc(u64::from(len.max(1)));
                    if rng.gen_bool(0.5) {
                        // Discard/write-zeroes segments, sometimes sane.
                        h.segment(rng.gen_range(0..DISK / 512), rng.gen_range(0..64), rng.gen_range(0..3));
                    }
                    a
                }
            };
            descs.push((addr, len, rng.gen_bool(0.5)));
        }
        // The status is the last byte of the chain's last descriptor.
        let status = if rng.gen_bool(0.85) {
            let s = h.alloc(512);
            let len: u32 = [1, 1, 1, 0, 2, 512][rng.gen_range(0..6)];
            let at = s + u64::from(len.max(1)) - 1;
            h.mem.write_obj(0xffu8, GuestAddress(at)).expect("status");
            descs.push((s, len, rng.gen_bool(0.95)));
            Some(at)
        } else {
            None
        };
        if descs.is_empty() {
            continue;
        }
        let writable: u64 = descs.iter().filter(|d| d.2).map(|d| u64::from(d.1)).sum();
        let head = h.chain(&descs);
        let used = h.run();
        assert_eq!(used.len(), 1, "round {round}: {descs:?} -> {used:?}");
        assert_eq!(used[0].0, u32::from(head), "round {round}");
        assert!(u64::from(used[0].1) <= writable, "round {round}: {descs:?} -> {used:?}");
        if let Some(s) = status {
            let b = h.byte(s);
            assert!(
                [S_OK, S_IOERR, S_UNSUPP, 0xff].contains(&b),
                "round {round}: status {b:#x} for {descs:?}"
            );
            if used[0].1 > 0 && descs.last().is_some_and(|d| d.2 && d.1 >= 1 && d.0 + u64::from(d.1) - 1 == s) {
                assert_ne!(b, 0xff, "round {round}: a returned length but no status for {descs:?}");
            }
        }
        if round % 100 == 0 {
            h.next_desc = 0;
            h.next_addr = DATA;
            h.disk(0, 4096);
        }
    }
}
