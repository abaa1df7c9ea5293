//! The `file` protocol driver: a regular file or a block device.
//!
//! I/O engines (`aio=`):
//! - `io_uring` (the default) and `native`: requests go to the worker
//!   thread's io_uring ([`crate::runtime::Op`]). `native` is accepted for
//!   command-line compatibility with QEMU (Linux AIO there) and is served by
//!   io_uring, which does everything Linux AIO does and more. Buffered reads
//!   first try `preadv2(RWF_NOWAIT)`, which completes a page-cache hit
//!   synchronously without a ring round trip, and fall back to the ring when
//!   the data is not cached; small buffered writes likewise try
//!   `pwritev2(RWF_NOWAIT)` until the file system has refused it 64 times in
//!   a row (XFS and btrfs accept them). Where the file system refuses them
//!   (ext4 refuses every buffered one), small page-aligned buffered writes
//!   are written inline with a plain `pwritev` while that stays fast: on the
//!   ring, io_uring would hand each of them to its worker pool, which
//!   serialises buffered writes to one file behind a single worker and costs
//!   two context switches per batch. An inline write that takes longer than
//!   [`INLINE_SLOW`] (4 ms: the page cache throttling dirty writers, a
//!   busy journal) pauses inline writes on that file for a while, so writes go
//!   back to the ring and the queue stays free for other requests; repeated
//!   slow writes double the pause up to half a minute. Buffered requests of
//!   128 KiB and more go straight to io_uring's worker pool (`IOSQE_ASYNC`)
//!   so that large copies run in parallel rather than one after another on
//!   the queue thread.
//! - `threads`: blocking `preadv`/`pwritev` on a thread pool (the `blocking`
//!   crate). The pool thread owns the request until the syscall returns: if
//!   the future is dropped first, its drop waits for the syscall, so the
//!   buffers are never freed under a running syscall.
//!
//! `cache.direct=on` opens with `O_DIRECT`; the driver probes the offset and
//! memory alignment the kernel requires and declares them as its limits, so
//! the generic layer bounces only buffers that are not aligned.
//!
//! `locking=on|auto` takes OFD byte-range locks compatible with QEMU's
//! `file-posix` scheme (bytes 100+perm for permissions held, 200+perm for
//! permissions not shared), so blkstack and QEMU processes see each other:
//! a second read-write opener gets "Failed to get "write" lock".

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Duration;

use serde::Deserialize;

use crate::block::{boxed, BlockDriver, BlockError, BlockResult, BlockStatus, Caps, ErrorKind, IoFuture, IoVecs, Limits};
use crate::block::shard::{self, SHARDS};
use crate::block::AlignedBuf;
use crate::runtime::Op;

/// The I/O engine (`aio=`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Aio {
    /// Blocking syscalls on a thread pool.
    Threads,
    /// QEMU's Linux AIO; served by io_uring here.
    Native,
    /// The worker thread's io_uring.
    #[default]
    IoUring,
}

/// `locking=`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Locking {
    /// Lock; fail if locking is impossible.
    On,
    /// No locks.
    Off,
    /// Lock where the file system supports OFD locks.
    #[default]
    Auto,
}

/// Options of the `file` driver (`--blockdev driver=file,...`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "kebab-case")]
pub struct FileOptions {
    /// Path of the file or block device.
    pub filename: String,
    /// I/O engine.
    #[serde(default)]
    pub aio: Aio,
    /// Image locking.
    #[serde(default)]
    pub locking: Locking,
}

/// The generic options the driver needs at open time.
#[derive(Debug, Clone, Copy, Default)]
pub struct OpenFlags {
    /// Open read-only.
    pub read_only: bool,
    /// `auto-read-only`: fall back to read-only if read-write is refused.
    pub auto_read_only: bool,
    /// `cache.direct`: open with O_DIRECT.
    pub direct: bool,
    /// `force-share`: share every permission with other processes.
    pub force_share: bool,
}

/// QEMU's permission bits as used in its lock byte layout.
const PERM_CONSISTENT_READ: u32 = 0;
const PERM_WRITE: u32 = 1;
const LOCK_PERM_BASE: i64 = 100;
const LOCK_SHARED_BASE: i64 = 200;

/// Buffered requests at least this large skip the synchronous page-cache
/// attempt and go straight to io_uring's worker pool, so several large copies
/// run in parallel instead of one after another on the queue thread.
const ASYNC_THRESHOLD: usize = 128 << 10;

/// After this many consecutive refused `RWF_NOWAIT` writes, stop trying.
const NOWAIT_WRITE_GIVE_UP: u32 = 64;

/// An inline buffered write slower than this pauses inline writes. The
/// stalls this is for (dirty throttling, journal commits) measured 20-30 ms
/// here; with a 1 ms threshold, a lone 1.06 ms write (most likely the thread
/// preempted on a busy 2-core VM) paused inline writes for nothing.
/// 4 ms keeps the first kind and ignores the second.
const INLINE_SLOW: Duration = Duration::from_millis(4);
/// The first pause after a slow inline write, in milliseconds.
const INLINE_PAUSE_MIN_MS: u64 = 100;
/// The longest pause, in milliseconds.
const INLINE_PAUSE_MAX_MS: u64 = 30_000;

/// Milliseconds on `CLOCK_MONOTONIC_COARSE`: the time of the last tick,
/// read from the vDSO without reading the TSC. The inline-write stall
/// detection reads the clock twice per write and needs only millisecond
/// precision; the fine clock cost about 1 % of a 4k write's CPU here.
fn coarse_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: `ts` is a valid out-pointer; CLOCK_MONOTONIC_COARSE exists on
    // every kernel this runs on (2.6.32+), so the call cannot fail.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    (ts.tv_sec as u64).saturating_mul(1000).saturating_add(ts.tv_nsec as u64 / 1_000_000)
}

/// The coarse clock's resolution in whole milliseconds, at least 1 (one
/// tick: 1 ms at HZ=1000, 4 ms at HZ=250, 10 ms at HZ=100).
fn coarse_resolution_ms() -> u64 {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: as in `coarse_ms`.
    let r = unsafe { libc::clock_getres(libc::CLOCK_MONOTONIC_COARSE, &mut ts) };
    if r != 0 {
        return 10;
    }
    let ns = (ts.tv_sec as u64).saturating_mul(1_000_000_000).saturating_add(ts.tv_nsec as u64);
    ns.div_ceil(1_000_000).max(1)
}

/// When inline (synchronous, on the queue thread) buffered writes are
/// allowed: shared by every queue writing to the file, since throttling is
/// per file system, not per queue. Times are [`coarse_ms`] readings.
struct InlineWrites {
    /// An inline write whose coarse-clock duration exceeds this is slow:
    /// [`INLINE_SLOW`] plus one tick, so a fast write that happens to span
    /// a tick boundary never counts and every counted one really took
    /// longer than [`INLINE_SLOW`].
    slow_ms: u64,
    /// Coarse milliseconds before which writes go to the ring.
    paused_until: AtomicU64,
    /// The pause the next slow write starts.
    pause: AtomicU64,
    /// Pauses started so far (statistics and tests).
    pauses: AtomicU64,
}

impl InlineWrites {
    fn new() -> InlineWrites {
        let slow_ms = INLINE_SLOW.as_millis() as u64 + coarse_resolution_ms();
        InlineWrites { slow_ms, paused_until: AtomicU64::new(0), pause: AtomicU64::new(INLINE_PAUSE_MIN_MS), pauses: AtomicU64::new(0) }
    }

    /// Whether an inline write may start at `now` (a [`coarse_ms`] reading).
    fn allowed(&self, now: u64) -> bool {
        now >= self.paused_until.load(Ordering::Relaxed)
    }

    /// Records an inline write that ran from `start` to `end` (coarse
    /// milliseconds); a slow one starts a pause.
    fn finished(&self, start: u64, end: u64) {
        let took = end.saturating_sub(start);
        if took > self.slow_ms {
            self.slow(end, took);
        }
    }

    /// Records a slow inline write that ended at `now`: starts a pause. A
    /// slow write soon after the previous pause ended doubles the pause; one
    /// after a long fast stretch starts again from the shortest.
    fn slow(&self, now: u64, took_ms: u64) -> u64 {
        let last_end = self.paused_until.load(Ordering::Relaxed);
        let prev = self.pause.load(Ordering::Relaxed);
        let pause = if last_end != 0 && now.saturating_sub(last_end) < prev.saturating_mul(10) {
            prev.saturating_mul(2).min(INLINE_PAUSE_MAX_MS)
        } else {
            INLINE_PAUSE_MIN_MS
        };
        self.pause.store(pause, Ordering::Relaxed);
        self.paused_until.store(now.saturating_add(pause), Ordering::Relaxed);
        self.pauses.fetch_add(1, Ordering::Relaxed);
        log::debug!("inline write took about {took_ms} ms: writes go to io_uring for {pause} ms");
        pause
    }
}

const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;

/// The `file` driver.
pub struct FileDriver {
    file: File,
    /// Per-thread open file descriptions of the same file, for the reads
    /// and writes a thread issues itself (at [`shard::index`]; `None` when
    /// reopening failed, and the thread uses `file`): see [`Self::io_fd`].
    io_files: Box<[OnceLock<Option<File>>; SHARDS]>,
    filename: String,
    engine: Aio,
    direct: bool,
    blockdev: bool,
    read_only: bool,
    len: AtomicU64,
    /// Consecutive refused `RWF_NOWAIT` writes; past a limit the file system
    /// is taken not to support them (ext4 refuses every buffered one) and
    /// writes go straight to the ring.
    nowait_write_refusals: AtomicU32,
    inline: InlineWrites,
    align: u32,
    mem_align: u32,
}

fn os_err(e: &io::Error, what: &str, path: &str) -> String {
    format!("Could not {what} '{path}': {e}")
}

impl FileDriver {
    /// Opens `opts.filename`. Errors are complete user-facing messages.
    pub fn open(opts: &FileOptions, flags: OpenFlags) -> Result<(FileDriver, bool), String> {
        if opts.filename.is_empty() {
            return Err("Parameter 'filename' must not be empty".into());
        }
        if flags.force_share && !flags.read_only {
            return Err("force-share=on can only be used with read-only images".into());
        }
        let (file, read_only) = open_file(&opts.filename, flags)?;
        let meta = file.metadata().map_err(|e| os_err(&e, "stat", &opts.filename))?;
        let blockdev = meta.file_type().is_block_device();
        if !blockdev && !meta.is_file() {
            return Err(format!("'{}' is not a regular file or a block device", opts.filename));
        }
        let len = if blockdev { blockdev_size(file.as_raw_fd()).map_err(|e| os_err(&e, "get the size of", &opts.filename))? } else { meta.len() };
        lock_image(&file, &opts.filename, opts.locking, read_only, flags.force_share)?;
        let (align, mem_align) = if flags.direct { probe_alignment(file.as_raw_fd(), blockdev, len) } else { (1, 1) };
        let engine = if opts.aio == Aio::Threads { Aio::Threads } else { Aio::IoUring };
        let io_files = Box::new(std::array::from_fn(|_| OnceLock::new()));
        let d = FileDriver { file, io_files, filename: opts.filename.clone(), engine, direct: flags.direct, blockdev, read_only, len: AtomicU64::new(len), nowait_write_refusals: AtomicU32::new(0), inline: InlineWrites::new(), align, mem_align };
        Ok((d, read_only))
    }

    fn fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }

    /// The descriptor this thread reads and writes through: its own open
    /// file description of the file, opened on its first request.
    ///
    /// Every read or write syscall takes and drops a reference to the
    /// `struct file` it names, an atomic on that structure's cache line. With
    /// one descriptor for all queue threads, that line moves between their
    /// CPUs on every request (with two queues on two CPUs, `fdget` and
    /// `fput` took 4.5 % of the backend's CPU against 2.1 % with one queue);
    /// with one description per thread it stays in the thread's cache. The
    /// page cache, locks and size belong to the inode and are shared as
    /// before; the image's OFD locks stay on `file`, which also serves
    /// flushes, so a write-back error is reported once, as with one
    /// descriptor. A thread whose reopen fails, or would take a descriptor
    /// in the upper half of the open-file limit, uses `file`.
    fn io_fd(&self) -> RawFd {
        match self.io_files[shard::index()].get_or_init(|| reopen(&self.file)) {
            Some(f) => f.as_raw_fd(),
            None => self.fd(),
        }
    }

    async fn rw(&self, write: bool, offset: u64, buf: &IoVecs, fua: bool) -> BlockResult<()> {
        let total = buf.len();
        let mut done = 0usize;
        let large = total >= ASYNC_THRESHOLD;
        if !(write && fua) && self.may_try_now(buf) {
            done = self.try_nowait(write, offset, buf);
        }
        while done < total {
            let n = match self.engine {
                Aio::Threads => self.rw_thread(write, offset + done as u64, &buf.slice(done, total - done), fua).await,
                _ => self.rw_uring(write, offset + done as u64, buf, done, fua, large).await,
            };
            match n {
                Ok(0) if !write => {
                    // End of file (the file shrank under us): reads past it see zeroes.
                    buf.slice(done, total - done).zero();
                    return Ok(());
                }
                Ok(0) => return Err(BlockError::new(ErrorKind::Io, format!("short write to '{}'", self.filename))),
                Ok(n) => done += n,
                Err(e) if e == libc::EINTR || e == libc::EAGAIN => {}
                Err(e) => return Err(BlockError::from_errno(e, format!("{} '{}'", if write { "write to" } else { "read from" }, self.filename))),
            }
        }
        Ok(())
    }

    /// Whether a request on `buf` may first try the page cache
    /// synchronously ([`Self::try_nowait`]): buffered, on the io_uring
    /// engine, smaller than [`ASYNC_THRESHOLD`].
    fn may_try_now(&self, buf: &IoVecs) -> bool {
        !self.direct && self.engine == Aio::IoUring && buf.len() < ASYNC_THRESHOLD
    }

    /// Tries a page-cache read or write without blocking; returns how much
    /// was done (0 when it would have blocked).
    fn try_nowait(&self, write: bool, offset: u64, buf: &IoVecs) -> usize {
        let iov = buf.as_iovecs();
        let Ok(off) = i64::try_from(offset) else { return 0 };
        if write && self.nowait_write_refusals.load(Ordering::Relaxed) >= NOWAIT_WRITE_GIVE_UP {
            return self.try_inline_write(off, buf);
        }
        let fd = self.io_fd();
        // SAFETY: the iovecs describe buffers valid for reads and writes for
        // the duration of the request (the caller's contract for `buf`).
        let n = unsafe {
            if write {
                libc::pwritev2(fd, iov.as_ptr(), iov.len() as i32, off, libc::RWF_NOWAIT)
            } else {
                libc::preadv2(fd, iov.as_ptr(), iov.len() as i32, off, libc::RWF_NOWAIT)
            }
        };
        if write {
            if n > 0 {
                // Only a change is stored: a store takes the line from every
                // other queue's cache even when the value stays 0.
                if self.nowait_write_refusals.load(Ordering::Relaxed) != 0 {
                    self.nowait_write_refusals.store(0, Ordering::Relaxed);
                }
            } else {
                self.nowait_write_refusals.fetch_add(1, Ordering::Relaxed);
            }
        }
        usize::try_from(n).unwrap_or(0)
    }

    /// Writes a small page-aligned buffered request synchronously when inline
    /// writes are not paused; returns how much was written (0: use the ring).
    fn try_inline_write(&self, off: i64, buf: &IoVecs) -> usize {
        let page = 4096u64;
        if off as u64 % page != 0 || buf.len() as u64 % page != 0 {
            return 0;
        }
        let start = coarse_ms();
        if !self.inline.allowed(start) {
            return 0;
        }
        let iov = buf.as_iovecs();
        let fd = self.io_fd();
        // SAFETY: as in `try_nowait`: the iovecs describe buffers valid for
        // the duration of the request, and the call returns before we do.
        // One segment (the usual 4k write) goes through `pwrite`, which
        // spares the kernel importing an iovec array.
        let n = unsafe {
            match iov {
                [one] => libc::pwrite(fd, one.iov_base, one.iov_len, off),
                _ => libc::pwritev(fd, iov.as_ptr(), iov.len() as i32, off),
            }
        };
        self.inline.finished(start, coarse_ms());
        usize::try_from(n).unwrap_or(0)
    }

    async fn rw_uring(&self, write: bool, offset: u64, buf: &IoVecs, done: usize, fua: bool, large: bool) -> Result<usize, i32> {
        let flags = if write && fua { libc::RWF_DSYNC } else { 0 };
        let rest;
        let iov = if done == 0 {
            buf.as_iovecs()
        } else {
            rest = buf.slice(done, buf.len() - done);
            rest.as_iovecs()
        };
        // SAFETY: `iov` (and `rest`, which owns it when sliced) and the
        // buffers it describes outlive the op: the op is awaited right here,
        // and dropping it waits for the completion.
        let op = unsafe { Op::rw_borrowed(self.io_fd(), write, iov.as_ptr(), iov.len() as u32, offset, flags) };
        let res = if large && !self.direct { op.force_async().await } else { op.await };
        usize::try_from(res).map_err(|_| -res)
    }

    async fn rw_thread(&self, write: bool, offset: u64, buf: &IoVecs, fua: bool) -> Result<usize, i32> {
        let fd = self.fd();
        let iov: Vec<(usize, usize)> = buf.as_iovecs().iter().map(|v| (v.iov_base as usize, v.iov_len)).collect();
        let off = i64::try_from(offset).map_err(|_| libc::EINVAL)?;
        let flags = if write && fua { libc::RWF_DSYNC } else { 0 };
        let n = on_thread(move || {
            let iov: Vec<libc::iovec> = iov.iter().map(|&(b, l)| libc::iovec { iov_base: b as *mut libc::c_void, iov_len: l }).collect();
            // SAFETY: the buffers stay valid until this closure returns:
            // `on_thread`'s guard keeps the caller waiting until then.
            let n = unsafe {
                if write {
                    libc::pwritev2(fd, iov.as_ptr(), iov.len() as i32, off, flags)
                } else {
                    libc::preadv2(fd, iov.as_ptr(), iov.len() as i32, off, 0)
                }
            };
            if n < 0 { -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize } else { n }
        })
        .await;
        usize::try_from(n).map_err(|_| (-n) as i32)
    }

    async fn fallocate(&self, mode: i32, offset: u64, len: u64) -> Result<(), i32> {
        let fd = self.fd();
        let res = match self.engine {
            Aio::Threads => {
                on_thread(move || {
                    // SAFETY: fallocate on an fd we own; no memory is passed.
                    let r = unsafe { libc::fallocate(fd, mode, offset as i64, len as i64) };
                    if r < 0 { -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize } else { 0 }
                })
                .await as i32
            }
            _ => {
                let e = io_uring::opcode::Fallocate::new(io_uring::types::Fd(fd), len).offset(offset).mode(mode).build();
                // SAFETY: the SQE refers to no memory.
                unsafe { Op::new(e) }.await
            }
        };
        if res < 0 { Err(-res) } else { Ok(()) }
    }

    fn err(&self, errno: i32, what: &str) -> BlockError {
        BlockError::from_errno(errno, format!("{what} on '{}'", self.filename))
    }

    fn status_at(&self, offset: u64, len: u64) -> BlockResult<BlockStatus> {
        let data = BlockStatus { allocated: true, zero: false, data: true, len };
        let Ok(off) = i64::try_from(offset) else { return Ok(data) };
        // SAFETY: lseek on an fd we own.
        let d = unsafe { libc::lseek(self.fd(), off, libc::SEEK_DATA) };
        if d < 0 {
            return match io::Error::last_os_error().raw_os_error() {
                // Past the last data: a hole to the end.
                Some(libc::ENXIO) => Ok(BlockStatus { allocated: false, zero: true, data: false, len }),
                _ => Ok(data),
            };
        }
        if d as u64 > offset {
            return Ok(BlockStatus { allocated: false, zero: true, data: false, len: (d as u64 - offset).min(len) });
        }
        // SAFETY: as above.
        let h = unsafe { libc::lseek(self.fd(), off, libc::SEEK_HOLE) };
        if h as u64 > offset {
            return Ok(BlockStatus { len: (h as u64 - offset).min(len), ..data });
        }
        Ok(data)
    }
}

/// Runs a blocking syscall on the thread pool. If the returned future is
/// dropped before the syscall returns, the drop waits for it.
async fn on_thread(f: impl FnOnce() -> isize + Send + 'static) -> isize {
    struct Pending(Arc<(Mutex<bool>, Condvar)>);
    impl Drop for Pending {
        fn drop(&mut self) {
            let (lock, cv) = &*self.0;
            let mut finished = lock.lock().unwrap_or_else(|p| p.into_inner());
            while !*finished {
                finished = cv.wait(finished).unwrap_or_else(|p| p.into_inner());
            }
        }
    }
    let state = Arc::new((Mutex::new(false), Condvar::new()));
    let guard = Pending(state.clone());
    let task = blocking::unblock(move || {
        let r = f();
        let (lock, cv) = &*state;
        *lock.lock().unwrap_or_else(|p| p.into_inner()) = true;
        cv.notify_all();
        r
    });
    let r = task.await;
    drop(guard);
    r
}

fn open_file(path: &str, flags: OpenFlags) -> Result<(File, bool), String> {
    let open = |ro: bool| {
        let mut o = OpenOptions::new();
        o.read(true).write(!ro);
        if flags.direct {
            o.custom_flags(libc::O_DIRECT);
        }
        o.open(path)
    };
    match open(flags.read_only) {
        Ok(f) => Ok((f, flags.read_only)),
        Err(e) if !flags.read_only && flags.auto_read_only && matches!(e.raw_os_error(), Some(libc::EACCES | libc::EROFS | libc::EPERM)) => {
            open(true).map(|f| (f, true)).map_err(|e| os_err(&e, "open", path))
        }
        Err(e) if flags.direct && e.raw_os_error() == Some(libc::EINVAL) => {
            Err(format!("Could not open '{path}': the file system does not support O_DIRECT (cache.direct=on)"))
        }
        Err(e) => Err(os_err(&e, "open", path)),
    }
}

/// Opens `file` again through `/proc/self/fd`: a new open file description
/// of the same inode (even if the file was renamed or unlinked since), with
/// the same access mode and `O_DIRECT`/`O_SYNC`/`O_DSYNC`/`O_NOATIME`. `None`
/// (logged) when that fails, reaches another file, or lands in the upper
/// half of the open-file limit; the caller then uses `file` itself.
fn reopen(file: &File) -> Option<File> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL on an fd we own.
    let fl = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if fl < 0 {
        log::debug!("cannot read the flags of fd {fd}: {}", io::Error::last_os_error());
        return None;
    }
    let keep = libc::O_ACCMODE | libc::O_DIRECT | libc::O_SYNC | libc::O_DSYNC | libc::O_NOATIME;
    let path = format!("/proc/self/fd/{fd}");
    let again = OpenOptions::new()
        .read(true)
        .write(fl & libc::O_ACCMODE != libc::O_RDONLY)
        .custom_flags((fl & keep & !libc::O_ACCMODE) | libc::O_NOCTTY)
        .open(&path);
    let again = match again {
        Ok(f) => f,
        Err(e) => {
            log::debug!("cannot reopen {path}: {e}; this thread shares the first descriptor");
            return None;
        }
    };
    if !within_half_of_the_fd_limit(again.as_raw_fd()) {
        log::debug!("{path} reopened as fd {}, past half the open-file limit: this thread shares the first descriptor", again.as_raw_fd());
        return None;
    }
    use std::os::unix::fs::MetadataExt;
    match (file.metadata(), again.metadata()) {
        (Ok(a), Ok(b)) if a.dev() == b.dev() && a.ino() == b.ino() => Some(again),
        _ => {
            log::debug!("{path} reopened another file; this thread shares the first descriptor");
            None
        }
    }
}

/// Whether `fd` lies in the lower half of the soft open-file limit: the
/// per-thread descriptors only save CPU, so they never take the last
/// descriptors that opening another image or accepting a client needs.
fn within_half_of_the_fd_limit(fd: RawFd) -> bool {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    let soft = if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) } == 0 { lim.rlim_cur } else { 0 };
    fd_below_half(fd, soft)
}

fn fd_below_half(fd: RawFd, soft_limit: u64) -> bool {
    u64::try_from(fd).is_ok_and(|fd| fd < soft_limit / 2)
}

fn blockdev_size(fd: RawFd) -> io::Result<u64> {
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 to the pointer we pass.
    let r = unsafe { libc::ioctl(fd, BLKGETSIZE64, &mut size as *mut u64) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(size) }
}

/// Finds the offset/length and memory alignment O_DIRECT needs on `fd`.
fn probe_alignment(fd: RawFd, blockdev: bool, len: u64) -> (u32, u32) {
    if blockdev {
        let mut ssz: libc::c_int = 0;
        // SAFETY: BLKSSZGET writes one int to the pointer we pass.
        let r = unsafe { libc::ioctl(fd, BLKSSZGET, &mut ssz as *mut libc::c_int) };
        let s = if r == 0 && ssz >= 512 && (ssz as u32).is_power_of_two() { ssz as u32 } else { 4096 };
        return (s, s);
    }
    if len < 4096 {
        // An empty or tiny file cannot show which reads the kernel accepts.
        return (4096, 4096);
    }
    let Some(mut buf) = AlignedBuf::new(8192, 4096) else { return (4096, 4096) };
    let base = buf.as_mut_slice().as_mut_ptr();
    let try_read = |ptr: *mut u8, n: usize| {
        // SAFETY: `ptr..ptr+n` lies inside `buf` (n ≤ 4096, ptr ≤ base+4096).
        unsafe { libc::pread(fd, ptr.cast(), n, 0) >= 0 }
    };
    let sizes = [1u32, 512, 1024, 2048, 4096];
    let align = sizes.iter().copied().find(|&a| try_read(base, a as usize)).unwrap_or(4096);
    // SAFETY (for the pointer arithmetic below): every `a` is ≤ 4096 < 8192.
    let mem = sizes.iter().copied().find(|&a| try_read(base.wrapping_add(a as usize), align as usize)).unwrap_or(4096);
    (align.max(512), mem.max(1))
}

fn ofd_lock(fd: RawFd, cmd: libc::c_int, ty: libc::c_short, byte: i64) -> io::Result<libc::flock> {
    let mut fl = libc::flock { l_type: ty, l_whence: libc::SEEK_SET as libc::c_short, l_start: byte, l_len: 1, l_pid: 0 };
    // SAFETY: fcntl with a valid flock struct we own.
    let r = unsafe { libc::fcntl(fd, cmd, &mut fl as *mut libc::flock) };
    if r < 0 { Err(io::Error::last_os_error()) } else { Ok(fl) }
}

fn perm_name(p: u32) -> &'static str {
    if p == PERM_WRITE { "write" } else { "consistent read" }
}

/// Takes QEMU-compatible OFD locks for what this open holds and does not share.
fn lock_image(file: &File, path: &str, mode: Locking, read_only: bool, force_share: bool) -> Result<(), String> {
    if mode == Locking::Off {
        return Ok(());
    }
    let fd = file.as_raw_fd();
    let held: &[u32] = if read_only { &[PERM_CONSISTENT_READ] } else { &[PERM_CONSISTENT_READ, PERM_WRITE] };
    let unshared: &[u32] = if force_share { &[] } else { &[PERM_WRITE] };
    let locks = held.iter().map(|&p| LOCK_PERM_BASE + p as i64).chain(unshared.iter().map(|&p| LOCK_SHARED_BASE + p as i64));
    for byte in locks {
        if let Err(e) = ofd_lock(fd, libc::F_OFD_SETLK, libc::F_RDLCK as libc::c_short, byte) {
            if mode == Locking::Auto && matches!(e.raw_os_error(), Some(libc::EINVAL | libc::ENOTSUP | libc::ENOLCK)) {
                log::warn!("'{path}': the file system does not support OFD locks; opened without locking");
                return Ok(());
            }
            return Err(format!("Failed to lock '{path}': {e}"));
        }
    }
    let conflict = |byte: i64| matches!(ofd_lock(fd, libc::F_OFD_GETLK, libc::F_WRLCK as libc::c_short, byte), Ok(fl) if fl.l_type != libc::F_UNLCK as libc::c_short);
    for &p in held {
        if conflict(LOCK_SHARED_BASE + p as i64) {
            return Err(format!("Failed to get \"{}\" lock on '{path}': is another process using the image?", perm_name(p)));
        }
    }
    for &p in unshared {
        if conflict(LOCK_PERM_BASE + p as i64) {
            return Err(format!("Failed to get shared \"{}\" lock on '{path}': is another process using the image?", perm_name(p)));
        }
    }
    Ok(())
}

impl BlockDriver for FileDriver {
    fn format_name(&self) -> &'static str {
        "file"
    }

    fn limits(&self) -> Limits {
        Limits { request_alignment: self.align, mem_alignment: self.mem_align, max_transfer: 1 << 30, max_iov: 1024 }
    }

    fn caps(&self) -> Caps {
        Caps { fua: true, discard: true, write_zeroes: true, block_status: !self.blockdev, truncate: true }
    }

    fn length(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    fn read<'a>(&'a self, offset: u64, buf: &'a IoVecs) -> IoFuture<'a, ()> {
        boxed(self.rw(false, offset, buf, false))
    }

    fn write<'a>(&'a self, offset: u64, buf: &'a IoVecs, fua: bool) -> IoFuture<'a, ()> {
        if self.read_only {
            return boxed(async { Err(BlockError::new(ErrorKind::ReadOnly, "the file is open read-only")) });
        }
        boxed(self.rw(true, offset, buf, fua))
    }

    fn read_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if !self.may_try_now(buf) {
            return None;
        }
        (self.try_nowait(false, offset, buf) == buf.len()).then_some(Ok(()))
    }

    fn write_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        if self.read_only || !self.may_try_now(buf) {
            return None;
        }
        (self.try_nowait(true, offset, buf) == buf.len()).then_some(Ok(()))
    }

    fn flush(&self) -> IoFuture<'_, ()> {
        boxed(async move {
            let fd = self.fd();
            let res = match self.engine {
                Aio::Threads => {
                    on_thread(move || {
                        // SAFETY: fdatasync on an fd we own.
                        let r = unsafe { libc::fdatasync(fd) };
                        if r < 0 { -io::Error::last_os_error().raw_os_error().unwrap_or(libc::EIO) as isize } else { 0 }
                    })
                    .await as i32
                }
                _ => {
                    let e = io_uring::opcode::Fsync::new(io_uring::types::Fd(fd)).flags(io_uring::types::FsyncFlags::DATASYNC).build();
                    // SAFETY: the SQE refers to no memory.
                    unsafe { Op::new(e) }.await
                }
            };
            if res < 0 { Err(self.err(-res, "flush")) } else { Ok(()) }
        })
    }

    fn discard(&self, offset: u64, len: u64) -> IoFuture<'_, ()> {
        boxed(async move {
            let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            self.fallocate(mode, offset, len).await.map_err(|e| self.err(e, "discard"))
        })
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool) -> IoFuture<'_, ()> {
        boxed(async move {
            if self.read_only {
                return Err(BlockError::new(ErrorKind::ReadOnly, "the file is open read-only"));
            }
            if may_unmap {
                let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
                if self.fallocate(mode, offset, len).await.is_ok() {
                    return Ok(());
                }
            }
            let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
            match self.fallocate(mode, offset, len).await {
                Ok(()) => Ok(()),
                Err(e) if e == libc::EOPNOTSUPP || e == libc::EINVAL || e == libc::ENODEV => Err(BlockError::unsupported("write-zeroes")),
                Err(e) => Err(self.err(e, "write-zeroes")),
            }
        })
    }

    fn block_status(&self, offset: u64, len: u64) -> IoFuture<'_, BlockStatus> {
        boxed(async move {
            if self.blockdev {
                return Ok(BlockStatus { allocated: true, zero: false, data: true, len });
            }
            self.status_at(offset, len)
        })
    }

    fn truncate(&self, len: u64) -> IoFuture<'_, ()> {
        boxed(async move {
            if self.blockdev {
                let cur = blockdev_size(self.fd()).map_err(|e| BlockError::from_io(&e, "get the device size"))?;
                self.len.store(cur, Ordering::Release);
                if cur != len {
                    return Err(BlockError::new(ErrorKind::Unsupported, format!("cannot resize block device '{}' ({cur} bytes)", self.filename)));
                }
                return Ok(());
            }
            if self.align > 1 && len % self.align as u64 != 0 {
                return Err(BlockError::new(ErrorKind::Invalid, format!("size must be a multiple of {} with cache.direct=on", self.align)));
            }
            self.file.set_len(len).map_err(|e| BlockError::from_io(&e, format!("resize '{}'", self.filename)))?;
            self.len.store(len, Ordering::Release);
            Ok(())
        })
    }

    fn filename(&self) -> Option<String> {
        Some(self.filename.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::block::{BlockNode, NodeOptions, WriteFlags};
    use crate::runtime::block_on;

    fn open(path: &std::path::Path, direct: bool, aio: Aio) -> Arc<BlockNode> {
        let opts = FileOptions { filename: path.to_string_lossy().into(), aio, locking: Locking::Auto };
        let (d, _) = FileDriver::open(&opts, OpenFlags { direct, ..Default::default() }).unwrap();
        BlockNode::new("f".into(), false, Box::new(d), NodeOptions { discard_unmap: true, ..Default::default() })
    }

    fn image(len: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new_in(std::env::temp_dir()).unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    fn roundtrip(direct: bool, aio: Aio) {
        let img = image(1 << 20);
        let node = open(img.path(), direct, aio);
        block_on(async move {
            let mut w = vec![0u8; 5000];
            for (i, b) in w.iter_mut().enumerate() {
                *b = (i % 251) as u8;
            }
            let mut wv = IoVecs::new();
            // SAFETY: `w` outlives the request.
            unsafe { wv.push_raw(w.as_mut_ptr(), w.len()) };
            node.write(1000, &wv, WriteFlags::default()).await.unwrap();
            node.flush().await.unwrap();
            let mut r = vec![0u8; 5000];
            let mut rv = IoVecs::new();
            // SAFETY: `r` outlives the request.
            unsafe { rv.push_raw(r.as_mut_ptr(), r.len()) };
            node.read(1000, &rv).await.unwrap();
            assert_eq!(r, w);
            let s = node.stats();
            assert_eq!(s.flush_operations, 1);
        })
        .unwrap();
        let data = std::fs::read(img.path()).unwrap();
        assert_eq!(data[1000], 0);
        assert_eq!(data[1001], 1);
    }

    #[test]
    fn buffered_io_uring_roundtrip() {
        roundtrip(false, Aio::IoUring);
    }

    #[test]
    fn slow_inline_writes_pause_and_back_off() {
        let iw = InlineWrites::new();
        let mut now = 3_600_000u64;
        assert!(iw.allowed(now));
        // A write that took `slow_ms` on the coarse clock is not slow.
        iw.finished(now, now + iw.slow_ms);
        assert!(iw.allowed(now + iw.slow_ms));
        assert_eq!(iw.pauses.load(Ordering::Relaxed), 0);
        // One tick more is.
        iw.finished(now, now + iw.slow_ms + 1);
        now += iw.slow_ms + 1;
        assert_eq!(iw.pause.load(Ordering::Relaxed), INLINE_PAUSE_MIN_MS);
        assert!(!iw.allowed(now));
        assert!(!iw.allowed(now + INLINE_PAUSE_MIN_MS - 1));
        assert!(iw.allowed(now + INLINE_PAUSE_MIN_MS));
        // A slow write right after the pause ended doubles the pause.
        now += INLINE_PAUSE_MIN_MS + 1;
        assert_eq!(iw.slow(now, 5), 2 * INLINE_PAUSE_MIN_MS);
        for _ in 0..20 {
            now = iw.paused_until.load(Ordering::Relaxed) + 1;
            iw.slow(now, 5);
        }
        assert_eq!(iw.pause.load(Ordering::Relaxed), INLINE_PAUSE_MAX_MS);
        // After a long fast stretch the next pause is the shortest again.
        now = iw.paused_until.load(Ordering::Relaxed) + 10 * INLINE_PAUSE_MAX_MS + 1;
        assert_eq!(iw.slow(now, 5), INLINE_PAUSE_MIN_MS);
        assert_eq!(iw.pauses.load(Ordering::Relaxed), 23);
    }

    #[test]
    fn the_coarse_clock_advances_in_milliseconds() {
        let res = coarse_resolution_ms();
        assert!((1..=10).contains(&res), "{res}");
        let a = coarse_ms();
        std::thread::sleep(Duration::from_millis(3 * res + 5));
        let b = coarse_ms();
        assert!(b >= a + 2 * res, "{a} {b} {res}");
        assert!(b < a + 10_000);
    }

    #[test]
    fn inline_writes_take_page_aligned_requests_unless_paused() {
        let img = image(64 << 10);
        let opts = FileOptions { filename: img.path().to_string_lossy().into(), aio: Aio::IoUring, locking: Locking::Off };
        let (d, _) = FileDriver::open(&opts, OpenFlags::default()).unwrap();
        let mut w = vec![0x5au8; 8192];
        let mut wv = IoVecs::new();
        // SAFETY: `w` outlives every call below.
        unsafe { wv.push_raw(w.as_mut_ptr(), w.len()) };
        assert_eq!(d.try_inline_write(4096, &wv), 8192);
        let data = std::fs::read(img.path()).unwrap();
        assert!(data[..4096].iter().all(|&b| b == 0) && data[4096..12288].iter().all(|&b| b == 0x5a));
        // Not page-aligned: left to the ring.
        assert_eq!(d.try_inline_write(512, &wv), 0);
        let odd = wv.slice(0, 4000);
        assert_eq!(d.try_inline_write(0, &odd), 0);
        // Paused after a stall: left to the ring.
        d.inline.slow(coarse_ms(), 10);
        assert_eq!(d.try_inline_write(4096, &wv), 0);
    }

    #[test]
    fn many_small_buffered_writes_land_in_order() {
        // Enough writes to get past the RWF_NOWAIT refusals on ext4 and
        // into the inline path, with overlapping rewrites of the same blocks.
        use rand::{Rng, SeedableRng};
        let img = image(256 << 10);
        let node = open(img.path(), false, Aio::IoUring);
        let model = block_on(async move {
            let mut model = vec![0u8; 256 << 10];
            let mut rng = rand::rngs::StdRng::seed_from_u64(7);
            for i in 0..400u32 {
                let blk = rng.gen_range(0..64usize);
                let pages = rng.gen_range(1..=2usize).min(64 - blk);
                let mut w: Vec<u8> = (0..pages * 4096).map(|j| (i as usize * 7 + j) as u8).collect();
                model[blk * 4096..(blk + pages) * 4096].copy_from_slice(&w);
                let mut wv = IoVecs::new();
                // SAFETY: `w` outlives the request.
                unsafe { wv.push_raw(w.as_mut_ptr(), w.len()) };
                node.write(blk as u64 * 4096, &wv, WriteFlags::default()).await.unwrap();
            }
            model
        })
        .unwrap();
        assert!(std::fs::read(img.path()).unwrap() == model);
    }

    #[test]
    fn threads_roundtrip() {
        roundtrip(false, Aio::Threads);
    }

    #[test]
    fn direct_roundtrip_with_unaligned_buffers() {
        // /tmp may be tmpfs without O_DIRECT support: skip only that case.
        let img = image(1 << 20);
        let opts = FileOptions { filename: img.path().to_string_lossy().into(), aio: Aio::IoUring, locking: Locking::Off };
        if FileDriver::open(&opts, OpenFlags { direct: true, ..Default::default() }).is_err() {
            eprintln!("O_DIRECT unsupported on the temp dir; skipped");
            return;
        }
        drop(img);
        roundtrip(true, Aio::IoUring);
    }

    #[test]
    fn second_writer_is_refused_by_the_lock() {
        let img = image(4096);
        let opts = FileOptions { filename: img.path().to_string_lossy().into(), aio: Aio::IoUring, locking: Locking::On };
        let _first = FileDriver::open(&opts, OpenFlags::default()).unwrap();
        let err = FileDriver::open(&opts, OpenFlags::default()).err().unwrap();
        assert!(err.contains("\"write\" lock"), "{err}");
        let ro = OpenFlags { read_only: true, ..Default::default() };
        assert!(FileDriver::open(&opts, ro).err().unwrap().contains("shared \"write\" lock"));
        let shared = OpenFlags { read_only: true, force_share: true, ..Default::default() };
        assert!(FileDriver::open(&opts, shared).is_ok());
        let off = FileOptions { locking: Locking::Off, ..opts };
        assert!(FileDriver::open(&off, OpenFlags::default()).is_ok());
    }

    #[test]
    fn discard_punches_and_status_sees_the_hole() {
        let img = image(0);
        std::fs::write(img.path(), vec![0xaau8; 1 << 20]).unwrap();
        let node = open(img.path(), false, Aio::IoUring);
        let n2 = node.clone();
        block_on(async move {
            n2.discard(0, 512 << 10).await.unwrap();
            let st = n2.block_status(0, 1 << 20).await.unwrap();
            assert!(!st.data && st.zero);
            assert_eq!(st.len, 512 << 10);
            let st = n2.block_status(512 << 10, 1 << 20).await.unwrap();
            assert!(st.data);
            n2.write_zeroes(600 << 10, 4096, false, WriteFlags::default()).await.unwrap();
            n2.truncate(2 << 20).await.unwrap();
            assert_eq!(n2.length(), 2 << 20);
        })
        .unwrap();
        let data = std::fs::read(img.path()).unwrap();
        assert!(data[..512 << 10].iter().all(|&b| b == 0));
        assert!(data[600 << 10..(600 << 10) + 4096].iter().all(|&b| b == 0));
        assert_eq!(data[(600 << 10) + 4096], 0xaa);
        assert_eq!(data.len(), 2 << 20);
    }

    fn fl(fd: RawFd) -> i32 {
        // SAFETY: F_GETFL on a descriptor the test holds open.
        unsafe { libc::fcntl(fd, libc::F_GETFL) }
    }

    #[test]
    fn each_thread_reads_and_writes_through_its_own_description() {
        let img = image(1 << 20);
        let opts = FileOptions { filename: img.path().to_string_lossy().into(), aio: Aio::IoUring, locking: Locking::On };
        let (d, _) = FileDriver::open(&opts, OpenFlags::default()).unwrap();
        // Unlinked after opening: the reopen must still reach this inode.
        let path = img.path().to_path_buf();
        drop(img);
        assert!(!path.exists());
        let fds: Vec<RawFd> = std::thread::scope(|s| {
            let t: Vec<_> = (0..2).map(|_| s.spawn(|| (d.io_fd(), d.io_fd()))).collect();
            t.into_iter().map(|h| h.join().unwrap()).map(|(a, b)| { assert_eq!(a, b, "a thread keeps its descriptor"); a }).collect()
        });
        assert_ne!(fds[0], fds[1]);
        let ino = |fd: RawFd| {
            use std::os::unix::fs::MetadataExt;
            // SAFETY: borrowed for the call; the driver keeps `fd` open.
            let f = std::mem::ManuallyDrop::new(unsafe { <File as std::os::fd::FromRawFd>::from_raw_fd(fd) });
            let m = f.metadata().unwrap();
            (m.dev(), m.ino())
        };
        for &fd in &fds {
            assert_ne!(fd, d.fd());
            assert_eq!(ino(fd), ino(d.fd()), "the same file");
            assert_eq!(fl(fd) & libc::O_ACCMODE, libc::O_RDWR);
        }
        // Separate open file descriptions (not dup()s): their offsets differ.
        // SAFETY: lseek on descriptors the driver holds open.
        unsafe {
            assert_eq!(libc::lseek(fds[0], 12345, libc::SEEK_SET), 12345);
            assert_eq!(libc::lseek(fds[1], 0, libc::SEEK_CUR), 0);
            assert_eq!(libc::lseek(d.fd(), 0, libc::SEEK_CUR), 0);
        }
        // What one thread writes, another reads, and both see the same file.
        let node = BlockNode::new("f".into(), false, Box::new(d), NodeOptions::default());
        let n2 = node.clone();
        std::thread::spawn(move || {
            block_on(async move {
                let mut w = vec![0x5au8; 8192];
                let mut wv = IoVecs::new();
                // SAFETY: `w` outlives the request.
                unsafe { wv.push_raw(w.as_mut_ptr(), w.len()) };
                n2.write(4096, &wv, WriteFlags::default()).await.unwrap();
            })
            .unwrap()
        })
        .join()
        .unwrap();
        block_on(async move {
            let mut r = vec![0u8; 16384];
            let mut rv = IoVecs::new();
            // SAFETY: `r` outlives the request.
            unsafe { rv.push_raw(r.as_mut_ptr(), r.len()) };
            node.read(0, &rv).await.unwrap();
            assert!(r[..4096].iter().all(|&b| b == 0));
            assert!(r[4096..12288].iter().all(|&b| b == 0x5a));
            assert!(r[12288..].iter().all(|&b| b == 0));
            node.flush().await.unwrap();
        })
        .unwrap();
    }

    #[test]
    fn per_thread_descriptors_keep_to_the_lower_half_of_the_fd_limit() {
        assert!(fd_below_half(10, 1024));
        assert!(fd_below_half(511, 1024));
        assert!(!fd_below_half(512, 1024));
        assert!(!fd_below_half(3, 0), "an unknown limit allows none");
        assert!(!fd_below_half(-1, 1024));
        assert!(fd_below_half(100_000, libc::RLIM_INFINITY));
    }

    #[test]
    fn reopened_descriptions_keep_read_only_and_direct() {
        let img = image(1 << 20);
        let opts = FileOptions { filename: img.path().to_string_lossy().into(), aio: Aio::IoUring, locking: Locking::Off };
        let (ro, _) = FileDriver::open(&opts, OpenFlags { read_only: true, ..Default::default() }).unwrap();
        let fd = std::thread::scope(|s| s.spawn(|| ro.io_fd()).join().unwrap());
        assert_ne!(fd, ro.fd());
        assert_eq!(fl(fd) & libc::O_ACCMODE, libc::O_RDONLY);
        assert_eq!(fl(fd) & libc::O_DIRECT, 0);
        // /tmp may be tmpfs without O_DIRECT support: skip only that part.
        let Ok((direct, _)) = FileDriver::open(&opts, OpenFlags { direct: true, ..Default::default() }) else {
            eprintln!("O_DIRECT unsupported on the temp dir; skipped");
            return;
        };
        let fd = std::thread::scope(|s| s.spawn(|| direct.io_fd()).join().unwrap());
        assert_ne!(fd, direct.fd());
        assert_eq!(fl(fd) & libc::O_DIRECT, libc::O_DIRECT);
        assert_eq!(fl(fd) & libc::O_ACCMODE, libc::O_RDWR);
    }

    #[test]
    fn missing_file_gives_a_clear_error() {
        let opts = FileOptions { filename: "/nonexistent/x.img".into(), aio: Aio::IoUring, locking: Locking::Auto };
        let err = FileDriver::open(&opts, OpenFlags::default()).err().unwrap();
        assert!(err.contains("Could not open '/nonexistent/x.img'"), "{err}");
    }
}
