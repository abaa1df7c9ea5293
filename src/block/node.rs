//! `BlockNode`: a driver plus the generic layer every request passes through.
//!
//! The generic layer is the one place that checks and shapes requests before
//! a driver sees them: bounds against the node's length, the read-only flag,
//! alignment (unaligned reads go through a bounce buffer, unaligned writes
//! become serialised read-modify-writes), buffer alignment for O_DIRECT,
//! splitting at the driver's `max_transfer`, FUA and write-zeroes emulation,
//! the `discard` / `detect-zeroes` / `cache.no-flush` options, and the
//! statistics. Drivers stay small and only ever get aligned, bounded requests.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use super::driver::{BlockDriver, BlockStatus, Caps, ChildRole, Limits};
use super::error::{BlockError, BlockResult, ErrorKind};
use super::iovec::{AlignedBuf, IoVecs};
use super::request::{Tracker, WriteFlags};
use super::stats::{self, IoKind, Stats, StatsSnapshot};

/// Size of the zero buffer used to emulate write-zeroes.
const ZERO_CHUNK: u64 = 1 << 20;

/// QEMU's `detect-zeroes` option.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DetectZeroes {
    /// Writes are written as they are.
    #[default]
    Off,
    /// All-zero writes become write-zeroes.
    On,
    /// All-zero writes become write-zeroes that may unmap (with `discard=unmap`).
    Unmap,
}

/// Options of the generic layer, common to every driver.
#[derive(Debug, Clone, Default)]
pub struct NodeOptions {
    /// Refuse write-type requests.
    pub read_only: bool,
    /// `discard=unmap`: pass discards down and allow write-zeroes to unmap.
    pub discard_unmap: bool,
    /// `detect-zeroes`.
    pub detect_zeroes: DetectZeroes,
    /// `cache.no-flush`: flushes succeed without reaching the driver.
    pub no_flush: bool,
    /// `cache.direct` as given (or inherited); reported by QMP.
    pub direct: bool,
}

type ResizeHook = Box<dyn Fn(u64) + Send + Sync>;

/// A node of the block graph.
pub struct BlockNode {
    name: String,
    implicit: bool,
    driver: Box<dyn BlockDriver>,
    opts: NodeOptions,
    limits: Limits,
    caps: Caps,
    stats: Stats,
    tracker: Tracker,
    users: Mutex<Vec<String>>,
    resize_hooks: Mutex<Vec<(String, ResizeHook)>>,
}

fn round_down(x: u64, a: u64) -> u64 {
    x - x % a
}

fn round_up(x: u64, a: u64) -> Option<u64> {
    x.checked_add(a - 1).map(|v| round_down(v, a))
}

impl std::fmt::Debug for BlockNode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BlockNode").field("name", &self.name).field("driver", &self.format_name()).finish()
    }
}

impl BlockNode {
    /// Wraps `driver` as node `name`.
    pub fn new(name: String, implicit: bool, driver: Box<dyn BlockDriver>, opts: NodeOptions) -> Arc<Self> {
        let mut limits = driver.limits();
        limits.request_alignment = limits.request_alignment.max(1);
        limits.mem_alignment = limits.mem_alignment.max(1);
        let align = limits.request_alignment as u64;
        limits.max_transfer = round_down(limits.max_transfer.max(align), align).max(align);
        let caps = driver.caps();
        Arc::new(BlockNode {
            name,
            implicit,
            driver,
            opts,
            limits,
            caps,
            stats: Stats::default(),
            tracker: Tracker::default(),
            users: Mutex::new(Vec::new()),
            resize_hooks: Mutex::new(Vec::new()),
        })
    }

    /// The node-name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the node was created inline under another node (no user-given name).
    pub fn is_implicit(&self) -> bool {
        self.implicit
    }

    /// The driver's QEMU name.
    pub fn format_name(&self) -> &'static str {
        self.driver.format_name()
    }

    /// The driver's file name, if it has one.
    pub fn filename(&self) -> Option<String> {
        self.driver.filename()
    }

    /// Whether the node refuses writes.
    pub fn is_read_only(&self) -> bool {
        self.opts.read_only
    }

    /// The generic-layer options.
    pub fn options(&self) -> &NodeOptions {
        &self.opts
    }

    /// Current length in bytes.
    pub fn length(&self) -> u64 {
        self.driver.length()
    }

    /// The (normalised) request limits.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// What the driver does natively.
    pub fn caps(&self) -> Caps {
        self.caps
    }

    /// The driver's children.
    pub fn children(&self) -> Vec<(ChildRole, Arc<BlockNode>)> {
        self.driver.children()
    }

    /// The statistics.
    pub fn stats(&self) -> StatsSnapshot {
        self.stats.snapshot()
    }

    /// Records that `user` (a parent node or an export) uses this node.
    pub fn attach(&self, user: &str) {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).push(user.to_string());
    }

    /// Removes one record of `user`.
    pub fn detach(&self, user: &str) {
        let mut users = self.users.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(i) = users.iter().position(|u| u == user) {
            users.remove(i);
        }
    }

    /// Who uses this node.
    pub fn users(&self) -> Vec<String> {
        self.users.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Calls `hook` with the new length whenever the node is resized.
    pub fn on_resize(&self, owner: &str, hook: ResizeHook) {
        self.resize_hooks.lock().unwrap_or_else(|p| p.into_inner()).push((owner.to_string(), hook));
    }

    /// Removes the resize hooks registered by `owner`.
    pub fn remove_resize_hooks(&self, owner: &str) {
        self.resize_hooks.lock().unwrap_or_else(|p| p.into_inner()).retain(|(o, _)| o != owner);
    }

    fn check_range(&self, offset: u64, len: u64) -> BlockResult<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.length() => Ok(()),
            _ => Err(BlockError::new(
                ErrorKind::OutOfRange,
                format!("request at {offset}+{len} is past the end of node '{}' ({} bytes)", self.name, self.length()),
            )),
        }
    }

    fn check_writable(&self) -> BlockResult<()> {
        if self.opts.read_only {
            return Err(BlockError::new(ErrorKind::ReadOnly, format!("node '{}' is read-only", self.name)));
        }
        Ok(())
    }

    fn account<T>(&self, kind: IoKind, bytes: u64, start: Instant, r: &BlockResult<T>) {
        match r {
            Ok(_) => self.stats.done(kind, bytes, start),
            Err(_) => self.stats.failed(kind),
        }
    }

    fn bounce(&self, len: u64) -> BlockResult<AlignedBuf> {
        let align = (self.limits.mem_alignment as usize).max(self.limits.request_alignment as usize).max(512);
        usize::try_from(len)
            .ok()
            .and_then(|l| AlignedBuf::new(l, align))
            .ok_or_else(|| BlockError::new(ErrorKind::NoSpace, format!("cannot allocate a {len}-byte bounce buffer")))
    }

    /// Whether a request of `len` bytes at `offset` in `buf` reaches the
    /// driver as it is: in range, aligned, within `max_transfer` and
    /// `max_iov` (no bounce, no split, no read-modify-write).
    fn passes_through(&self, offset: u64, len: u64, buf: &IoVecs) -> bool {
        len != 0
            && len <= self.limits.max_transfer
            && buf.segments() <= self.limits.max_iov
            && self.is_aligned_range(offset, len)
            && buf.is_aligned(self.limits.mem_alignment as usize)
            && offset.checked_add(len).is_some_and(|end| end <= self.length())
    }

    /// [`Self::read`] done at once on this thread when the driver can
    /// ([`BlockDriver::read_now`]: a page-cache hit); `None` when the
    /// request must go through [`Self::read`]. Every check, error and
    /// statistic is `read`'s: requests that are out of range, unaligned or
    /// need splitting always return `None` and get them there.
    pub fn read_now(&self, offset: u64, buf: &IoVecs) -> Option<BlockResult<()>> {
        let len = buf.len() as u64;
        if !self.passes_through(offset, len, buf) {
            return None;
        }
        let start = stats::start_time();
        let r = self.driver.read_now(offset, buf)?;
        self.account(IoKind::Read, len, start, &r);
        Some(r)
    }

    /// [`Self::write`] done at once on this thread when the driver can
    /// ([`BlockDriver::write_now`]); `None` when the request must go through
    /// [`Self::write`]: FUA, `detect-zeroes`, a read-only node, anything
    /// [`Self::read_now`] leaves alone, and any write while a serialising
    /// (read-modify-write) write is in flight on the node.
    pub fn write_now(&self, offset: u64, buf: &IoVecs, flags: WriteFlags) -> Option<BlockResult<()>> {
        let len = buf.len() as u64;
        if flags.fua || self.opts.read_only || self.opts.detect_zeroes != DetectZeroes::Off || !self.passes_through(offset, len, buf) {
            return None;
        }
        let _guard = self.tracker.try_begin_fast()?;
        let start = stats::start_time();
        let r = self.driver.write_now(offset, buf)?;
        if r.is_ok() {
            self.stats.wrote_up_to(offset + len);
        }
        self.account(IoKind::Write, len, start, &r);
        Some(r)
    }

    /// Reads `buf.len()` bytes at `offset`.
    pub async fn read(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let start = stats::start_time();
        let len = buf.len() as u64;
        if let Err(e) = self.check_range(offset, len) {
            self.stats.invalid(IoKind::Read);
            return Err(e);
        }
        let r = self.read_padded(offset, buf).await;
        self.account(IoKind::Read, len, start, &r);
        r
    }

    async fn read_padded(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let align = self.limits.request_alignment as u64;
        let aligned = offset % align == 0 && len % align == 0;
        if aligned && buf.is_aligned(self.limits.mem_alignment as usize) {
            return self.read_split(offset, buf).await;
        }
        let head = round_down(offset, align);
        let end = round_up(offset + len, align).ok_or_else(|| BlockError::new(ErrorKind::OutOfRange, "offset overflow"))?;
        let mut bounce = self.bounce(end - head)?;
        self.read_split(head, &bounce.iovecs()).await?;
        let skip = (offset - head) as usize;
        buf.copy_from(0, &bounce.as_mut_slice()[skip..skip + len as usize]);
        Ok(())
    }

    async fn read_split(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let max = self.limits.max_transfer;
        let len = buf.len() as u64;
        if len <= max && buf.segments() <= self.limits.max_iov {
            return self.driver.read(offset, buf).await;
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(max);
            let part = buf.slice(done as usize, n as usize);
            if part.segments() > self.limits.max_iov {
                let mut b = self.bounce(n)?;
                self.driver.read(offset + done, &b.iovecs()).await?;
                part.copy_from(0, b.as_mut_slice());
            } else {
                self.driver.read(offset + done, &part).await?;
            }
            done += n;
        }
        Ok(())
    }

    /// Writes `buf` at `offset`.
    pub async fn write(&self, offset: u64, buf: &IoVecs, flags: WriteFlags) -> BlockResult<()> {
        let start = stats::start_time();
        let len = buf.len() as u64;
        if let Err(e) = self.check_writable().and_then(|_| self.check_range(offset, len)) {
            self.stats.invalid(IoKind::Write);
            return Err(e);
        }
        let r = if self.opts.detect_zeroes != DetectZeroes::Off && len > 0 && buf.is_zero() {
            let unmap = self.opts.detect_zeroes == DetectZeroes::Unmap;
            self.zeroes_tracked(offset, len, unmap).await
        } else {
            self.write_tracked(offset, buf).await
        };
        let r = match r {
            Ok(()) if flags.fua => self.flush_driver().await,
            other => other,
        };
        if r.is_ok() {
            self.stats.wrote_up_to(offset + len);
        }
        self.account(IoKind::Write, len, start, &r);
        r
    }

    fn is_aligned_range(&self, offset: u64, len: u64) -> bool {
        let align = self.limits.request_alignment as u64;
        offset % align == 0 && len % align == 0
    }

    async fn write_tracked(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let len = buf.len() as u64;
        if len == 0 {
            return Ok(());
        }
        let align = self.limits.request_alignment as u64;
        let rmw = !self.is_aligned_range(offset, len);
        let (head, end) = (round_down(offset, align), round_up(offset + len, align).unwrap_or(u64::MAX));
        let _guard = self.tracker.begin(head, end, rmw).await;
        if rmw {
            return self.write_rmw(offset, buf).await;
        }
        if !buf.is_aligned(self.limits.mem_alignment as usize) {
            let mut b = self.bounce(len)?;
            buf.copy_to(0, b.as_mut_slice());
            return self.write_split(offset, &b.iovecs()).await;
        }
        self.write_split(offset, buf).await
    }

    /// Read-modify-write of the blocks covering `[offset, offset+len)`.
    /// Runs with a serialising guard held.
    async fn write_rmw(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let align = self.limits.request_alignment as u64;
        let len = buf.len() as u64;
        let head = round_down(offset, align);
        let end = round_up(offset + len, align).ok_or_else(|| BlockError::new(ErrorKind::OutOfRange, "offset overflow"))?;
        let mut b = self.bounce(end - head)?;
        if head != offset {
            self.read_split(head, &b.iovecs().slice(0, align as usize)).await?;
        }
        let last = end - align;
        if end != offset + len && (last != head || head == offset) {
            self.read_split(last, &b.iovecs().slice((last - head) as usize, align as usize)).await?;
        }
        let skip = (offset - head) as usize;
        buf.copy_to(0, &mut b.as_mut_slice()[skip..skip + len as usize]);
        self.write_split(head, &b.iovecs()).await
    }

    async fn write_split(&self, offset: u64, buf: &IoVecs) -> BlockResult<()> {
        let max = self.limits.max_transfer;
        let len = buf.len() as u64;
        let fua = false;
        if len <= max && buf.segments() <= self.limits.max_iov {
            return self.driver.write(offset, buf, fua).await;
        }
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(max);
            let part = buf.slice(done as usize, n as usize);
            if part.segments() > self.limits.max_iov {
                let mut b = self.bounce(n)?;
                part.copy_to(0, b.as_mut_slice());
                self.driver.write(offset + done, &b.iovecs(), fua).await?;
            } else {
                self.driver.write(offset + done, &part, fua).await?;
            }
            done += n;
        }
        Ok(())
    }

    /// Makes `[offset, offset+len)` read as zeroes.
    pub async fn write_zeroes(&self, offset: u64, len: u64, may_unmap: bool, flags: WriteFlags) -> BlockResult<()> {
        let start = stats::start_time();
        if let Err(e) = self.check_writable().and_then(|_| self.check_range(offset, len)) {
            self.stats.invalid(IoKind::Write);
            return Err(e);
        }
        let mut r = self.zeroes_tracked(offset, len, may_unmap).await;
        if r.is_ok() && flags.fua {
            r = self.flush_driver().await;
        }
        if r.is_ok() {
            self.stats.wrote_up_to(offset + len);
        }
        self.account(IoKind::Write, len, start, &r);
        r
    }

    async fn zeroes_tracked(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        if len == 0 {
            return Ok(());
        }
        let align = self.limits.request_alignment as u64;
        let mid_start = round_up(offset, align).unwrap_or(u64::MAX).min(offset + len);
        let mid_end = round_down(offset + len, align).max(mid_start);
        for (s, e) in [(offset, mid_start), (mid_end, offset + len)] {
            if e > s {
                let mut z = self.bounce(e - s)?;
                self.write_tracked(s, &z.iovecs()).await?;
            }
        }
        if mid_end > mid_start {
            let _guard = self.tracker.begin(mid_start, mid_end, false).await;
            self.zeroes_aligned(mid_start, mid_end - mid_start, may_unmap && self.opts.discard_unmap).await?;
        }
        Ok(())
    }

    async fn zeroes_aligned(&self, offset: u64, len: u64, may_unmap: bool) -> BlockResult<()> {
        if self.caps.write_zeroes {
            match self.driver.write_zeroes(offset, len, may_unmap).await {
                Err(e) if e.kind() == ErrorKind::Unsupported => {}
                other => return other,
            }
        }
        let chunk = len.min(ZERO_CHUNK).min(self.limits.max_transfer);
        let mut z = self.bounce(chunk)?;
        let zv = z.iovecs();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(chunk);
            self.driver.write(offset + done, &zv.slice(0, n as usize), false).await?;
            done += n;
        }
        Ok(())
    }

    /// Discards `[offset, offset+len)` (advisory: with `discard=ignore`, or where
    /// the driver cannot, it succeeds without effect). Partial blocks at the
    /// ends are left alone.
    pub async fn discard(&self, offset: u64, len: u64) -> BlockResult<()> {
        let start = stats::start_time();
        if let Err(e) = self.check_writable().and_then(|_| self.check_range(offset, len)) {
            self.stats.invalid(IoKind::Unmap);
            return Err(e);
        }
        let r = self.discard_inner(offset, len).await;
        self.account(IoKind::Unmap, len, start, &r);
        r
    }

    async fn discard_inner(&self, offset: u64, len: u64) -> BlockResult<()> {
        if !self.opts.discard_unmap || !self.caps.discard {
            return Ok(());
        }
        let align = self.limits.request_alignment as u64;
        let s = round_up(offset, align).unwrap_or(u64::MAX);
        let e = round_down(offset + len, align);
        if e <= s {
            return Ok(());
        }
        let _guard = self.tracker.begin(s, e, false).await;
        match self.driver.discard(s, e - s).await {
            Err(e) if e.kind() == ErrorKind::Unsupported => Ok(()),
            other => other,
        }
    }

    /// Makes completed writes durable.
    pub async fn flush(&self) -> BlockResult<()> {
        let start = stats::start_time();
        let r = self.flush_driver().await;
        self.account(IoKind::Flush, 0, start, &r);
        r
    }

    async fn flush_driver(&self) -> BlockResult<()> {
        if self.opts.no_flush {
            return Ok(());
        }
        self.driver.flush().await
    }

    /// The allocation state at `offset`, for at most `len` bytes.
    pub async fn block_status(&self, offset: u64, len: u64) -> BlockResult<BlockStatus> {
        self.check_range(offset, len.max(1).min(self.length().saturating_sub(offset).max(1)))?;
        let len = len.min(self.length() - offset);
        let mut st = self.driver.block_status(offset, len).await?;
        st.len = st.len.clamp(1, len.max(1));
        Ok(st)
    }

    /// Empties the image (formats only; "unsupported" elsewhere).
    pub async fn make_empty(&self) -> BlockResult<()> {
        self.check_writable()?;
        self.driver.make_empty().await
    }

    /// Changes the length and tells the exports (resize hooks).
    pub async fn truncate(&self, len: u64) -> BlockResult<()> {
        self.check_writable()?;
        if !self.caps.truncate {
            return Err(BlockError::new(ErrorKind::Unsupported, format!("node '{}' ({}) cannot be resized", self.name, self.format_name())));
        }
        self.driver.truncate(len).await?;
        let new_len = self.length();
        for (_, hook) in self.resize_hooks.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            hook(new_len);
        }
        Ok(())
    }
}
