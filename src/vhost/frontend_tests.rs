//! The whole export driven by a real vhost-user frontend (libblkio's
//! `virtio-blk-vhost-user` driver) over its unix socket: negotiation, memory
//! regions, several queue threads with their runtimes, a second frontend
//! refused, disconnect and reconnect, shutdown.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::Ordering::SeqCst;
use std::sync::mpsc;
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::tests::MemDisk;
use super::{VhostBlkConfig, VhostBlkExport};

const DISK: u64 = 4 << 20;
const REGION: usize = 1 << 20;

struct Client {
    queues: Vec<Blkioq>,
    region: MemoryRegion,
    capacity: u64,
    read_only: bool,
    _blkio: Blkio,
}

fn connect(sock: &Path, queues: i32) -> Result<Client, blkio::Error> {
    connect_as(sock, queues, false)
}

fn connect_as(sock: &Path, queues: i32, read_only: bool) -> Result<Client, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &sock.to_string_lossy())?;
    b.set_bool("read-only", read_only)?;
    b.connect()?;
    b.set_i32("num-queues", queues)?;
    let out = b.start()?;
    let capacity = b.get_u64("capacity")?;
    let read_only = b.get_bool("read-only")?;
    let region = b.alloc_mem_region(REGION)?;
    b.map_mem_region(&region)?;
    Ok(Client { queues: out.queues, region, capacity, read_only, _blkio: b })
}

impl Client {
    fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is REGION bytes of memory libblkio mapped for the
        // client's lifetime; no request is in flight while the slice is used.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn wait(&mut self, q: usize) -> i32 {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(30);
        let n = self.queues[q].do_io(&mut c, 1, Some(&mut t), None).unwrap_or(0);
        assert_eq!(n, 1, "no completion within 30 s");
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_read() }.ret
    }

    fn read(&mut self, q: usize, off: u64, len: usize) -> i32 {
        let p = self.region.addr as *mut u8;
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    fn write(&mut self, q: usize, off: u64, len: usize, byte: u8) -> i32 {
        self.buf()[..len].fill(byte);
        let p = self.region.addr as *const u8;
        self.queues[q].write(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    fn expect(&mut self, q: usize, off: u64, len: usize, byte: u8) {
        assert_eq!(self.read(q, off, len), 0, "read at {off}");
        assert!(self.buf()[..len].iter().all(|&b| b == byte), "data at {off} is not {byte:#x}");
    }
}

fn start(dir: &Path, writable: bool, queues: u16) -> (VhostBlkExport, std::sync::Arc<std::sync::atomic::AtomicU64>) {
    let (node, flushes) = MemDisk::node(DISK, !writable, None);
    let cfg = VhostBlkConfig { id: "e0".into(), path: dir.join("vhost.sock"), writable, num_queues: queues, ..Default::default() };
    match VhostBlkExport::start(cfg, node) {
        Ok(e) => (e, flushes),
        Err(e) => panic!("export did not start: {e}"),
    }
}

#[test]
fn libblkio_reads_writes_flushes_and_reconnects() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    let (export, flushes) = start(dir.path(), true, 2);
    assert_eq!(export.id(), "e0");
    assert_eq!(export.node_name(), "mem0");
    let mut c = connect(&sock, 2).expect("connect");
    assert!(export.has_client());
    assert_eq!((c.capacity, c.read_only), (DISK, false));
    for q in 0..2 {
        let b = 0x10 + q as u8;
        assert_eq!(c.write(q, 65536 * q as u64, 65536, b), 0);
        c.expect(1 - q, 65536 * q as u64, 65536, b);
    }
    let f0 = flushes.load(SeqCst);
    c.queues[0].flush(0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    assert_eq!(flushes.load(SeqCst), f0 + 1, "the flush reached the node");
    c.queues[0].discard(0, 4096, 0, ReqFlags::empty());
    assert_eq!(c.wait(0), 0);
    c.expect(0, 0, 4096, 0);
    c.queues[1].write_zeroes(65536, 8192, 0, ReqFlags::empty());
    assert_eq!(c.wait(1), 0);
    c.expect(1, 65536, 8192, 0);
    // Out of range: the request fails, the connection serves on.
    assert_ne!(c.read(0, DISK, 512), 0);
    c.expect(0, 65536 + 8192, 512, 0x11);

    // A second frontend is refused; the first is not disturbed.
    assert!(connect(&sock, 1).is_err(), "a second frontend must be refused");
    c.expect(1, 65536 + 8192, 512, 0x11);

    // Disconnect and reconnect: the data is still there.
    drop(c);
    let mut c = connect(&sock, 1).expect("reconnect");
    c.expect(0, 65536 + 8192, 4096, 0x11);
    assert_eq!(c.write(0, 3 << 20, 4096, 0x77), 0);
    drop(c);
    let mut c = connect(&sock, 2).expect("reconnect again");
    c.expect(1, 3 << 20, 4096, 0x77);

    // Shutdown with a client connected.
    let (tx, rx) = mpsc::channel();
    export.set_on_deleted(Box::new(move || {
        let _ = tx.send(());
    }));
    export.shutdown();
    assert!(rx.recv_timeout(Duration::from_secs(10)).is_ok(), "deleted hook ran");
    assert!(!export.has_client());
    assert!(!sock.exists(), "the socket file is removed");
    drop(c);
}

#[test]
fn read_only_export_offers_ro() {
    let _ = env_logger::builder().is_test(true).filter_level(log::LevelFilter::Debug).try_init();
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    let (export, _) = start(dir.path(), false, 1);
    // libblkio refuses a writable connection to a device that offers RO.
    assert!(connect(&sock, 1).is_err());
    let mut c = connect_as(&sock, 1, true).expect("connect read-only");
    assert!(c.read_only);
    assert_ne!(c.write(0, 0, 4096, 0x55), 0);
    assert_eq!(c.read(0, 0, 4096), 0);
    drop(c);
    export.shutdown();
}

#[test]
fn stale_socket_files_are_replaced_and_live_ones_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    // A stale socket: bound, then its listener closed.
    drop(std::os::unix::net::UnixListener::bind(&sock).expect("bind"));
    let (export, _) = start(dir.path(), true, 1);
    // The path is now live: a second export on it is refused.
    let (node, _) = MemDisk::node(DISK, false, None);
    let cfg = VhostBlkConfig { id: "e1".into(), path: sock.clone(), writable: true, ..Default::default() };
    match VhostBlkExport::start(cfg, node) {
        Err(e) => assert!(e.starts_with("addr.path:"), "{e}"),
        Ok(_) => panic!("a live socket was taken over"),
    }
    // A regular file is not removed.
    let file = dir.path().join("file");
    std::fs::write(&file, b"x").expect("file");
    let (node, _) = MemDisk::node(DISK, false, None);
    let cfg = VhostBlkConfig { id: "e2".into(), path: file.clone(), ..Default::default() };
    assert!(VhostBlkExport::start(cfg, node).is_err());
    assert!(file.exists());
    drop(export);
    assert!(!sock.exists());
}

#[test]
fn refused_requests_do_not_disturb_the_next_ones() {
    let dir = tempfile::tempdir().expect("tempdir");
    let sock = dir.path().join("vhost.sock");
    let (export, _) = start(dir.path(), true, 1);
    let mut c = connect(&sock, 1).expect("connect");
    for _ in 0..200 {
        assert_ne!(c.read(0, DISK, 512), 0);
        assert_eq!(c.read(0, 4096, 512), 0);
    }
    assert_eq!(export.refused_requests(), 200);
    drop(c);
    export.shutdown();
}
