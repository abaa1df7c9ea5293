//! The libblkio side: connect to a vhost-user-blk socket, set up queues and the
//! I/O buffers, and drive one queue per thread.
//!
//! Every buffer lives in one memory region allocated and mapped through
//! libblkio (the backend can only reach memory it was told about with
//! ADD_MEM_REG). Each queue owns `iodepth` slots; a slot is a page-aligned
//! buffer of `bs` bytes (and, when the backend limits segment length, a fixed
//! iovec array) that stays valid until the worker has drained every request.
//! The hot loop does not allocate: completions are reaped into a preallocated
//! array, latency goes into a fixed histogram, and one clock read per batch
//! serves as both the completion time of the batch and the submission time of
//! the requests that replace it.

use std::mem::MaybeUninit;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};

use super::args::RwMode;
use super::hist::Histogram;

const PAGE: usize = 4096;
/// Largest virtqueue we ask for (QEMU and cloud-hypervisor accept 1024).
const MAX_QUEUE_SIZE: u32 = 1024;
/// A queue with requests in flight and no completion for this long has failed.
const STALL_LIMIT: Duration = Duration::from_secs(10);

/// What the backend told us at connect time.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct DeviceInfo {
    /// Capacity in bytes.
    pub capacity: u64,
    /// Largest number of queues offered.
    pub max_queues: u32,
    /// Required alignment of offsets and lengths.
    pub request_alignment: u32,
    /// Largest request in bytes (0: no limit advertised).
    pub max_transfer: u32,
    /// Largest data segment in bytes (0: no limit advertised).
    pub max_segment_len: u32,
    /// Largest number of data segments per request.
    pub max_segments: u32,
    /// Virtqueue size we asked for.
    pub queue_size: u32,
}

/// Geometry of the I/O the workers issue, fixed for the whole run.
#[derive(Debug, Clone, Copy)]
pub struct IoShape {
    /// Access pattern.
    pub rw: RwMode,
    /// Request size.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: usize,
    /// Addressed bytes, a multiple of `bs`.
    pub size: u64,
    /// Percent reads for randrw.
    pub rwmixread: u8,
    /// Busy-poll completions.
    pub poll: bool,
    /// Segment length when a request must be split (0: one segment).
    pub seg_len: usize,
}

impl IoShape {
    fn segments(&self) -> usize {
        if self.seg_len == 0 {
            1
        } else {
            (self.bs as usize).div_ceil(self.seg_len)
        }
    }

    fn slot_stride(&self) -> usize {
        (self.bs as usize).div_ceil(PAGE) * PAGE
    }
}

/// A connected, started device with its queues and buffer region.
pub struct Device {
    /// Kept alive until every queue is dropped: dropping it closes the socket.
    pub blkio: Blkio,
    /// Queues not yet handed to workers.
    pub queues: Vec<Blkioq>,
    /// The region that holds every slot buffer.
    pub region: MemoryRegion,
    /// What the backend told us.
    pub info: DeviceInfo,
}

fn blkio_err(what: &str) -> impl Fn(blkio::Error) -> String + '_ {
    move |e| format!("{what}: {e}")
}

fn connect(socket: &Path, timeout: Duration, read_only: bool) -> Result<Blkio, String> {
    let path = socket
        .to_str()
        .ok_or_else(|| format!("socket path {} is not UTF-8", socket.display()))?;
    let start = Instant::now();
    loop {
        let mut b = Blkio::new("virtio-blk-vhost-user").map_err(blkio_err("libblkio"))?;
        b.set_str("path", path).map_err(blkio_err("set path"))?;
        b.set_bool("read-only", read_only)
            .map_err(blkio_err("set read-only"))?;
        match b.connect() {
            Ok(()) => return Ok(b),
            Err(e) if start.elapsed() < timeout => {
                log::debug!("connect {path}: {e}; retrying");
                std::thread::sleep(Duration::from_millis(20));
            }
            Err(e) => return Err(format!("connect to {path}: {e}")),
        }
    }
}

fn prop_u32(b: &Blkio, name: &str) -> Result<u32, String> {
    let v = b.get_i32(name).map_err(blkio_err(name))?;
    u32::try_from(v).map_err(|_| format!("backend reports {name} = {v}"))
}

fn read_info(b: &Blkio) -> Result<DeviceInfo, String> {
    Ok(DeviceInfo {
        capacity: b.get_u64("capacity").map_err(blkio_err("capacity"))?,
        max_queues: prop_u32(b, "max-queues")?,
        request_alignment: prop_u32(b, "request-alignment")?,
        max_transfer: prop_u32(b, "max-transfer")?,
        max_segment_len: prop_u32(b, "max-segment-len")?,
        max_segments: prop_u32(b, "max-segments")?,
        queue_size: 0,
    })
}

/// Checks `shape` against the device limits and returns the segment length.
fn segment_len(info: &DeviceInfo, bs: u64) -> Result<usize, String> {
    let align = u64::from(info.request_alignment.max(1));
    if bs == 0 || bs % align != 0 {
        return Err(format!(
            "--bs {bs} is not a multiple of the device's {align}-byte alignment"
        ));
    }
    if info.max_transfer > 0 && bs > u64::from(info.max_transfer) {
        return Err(format!(
            "--bs {bs} exceeds the device's max-transfer {}",
            info.max_transfer
        ));
    }
    if bs > 1 << 30 {
        return Err(format!("--bs {bs} is too large (at most 1 GiB)"));
    }
    let seg = info.max_segment_len as u64;
    if seg == 0 || bs <= seg {
        return Ok(0);
    }
    let n = bs.div_ceil(seg);
    if info.max_segments > 0 && n > u64::from(info.max_segments) {
        return Err(format!(
            "--bs {bs} needs {n} segments of {seg} bytes; the device takes {}",
            info.max_segments
        ));
    }
    Ok(seg as usize)
}

/// Connects, configures `queues` queues for `shape` and maps the buffers.
/// `shape.seg_len` is filled in from the device limits.
pub fn open(
    socket: &Path,
    connect_timeout: Duration,
    queues: u32,
    queue_size: Option<u32>,
    shape: &mut IoShape,
) -> Result<Device, String> {
    let mut b = connect(socket, connect_timeout, !shape.rw.writes())?;
    let mut info = read_info(&b)?;
    if queues > info.max_queues {
        return Err(format!(
            "--queues {queues}: the backend offers {}",
            info.max_queues
        ));
    }
    shape.seg_len = segment_len(&info, shape.bs)?;
    let descs = (shape.iodepth * (2 + shape.segments())) as u32;
    let qs = match queue_size {
        Some(q) if q.is_power_of_two() && q <= 32768 => q,
        Some(q) => {
            return Err(format!(
                "--queue-size {q} must be a power of two up to 32768"
            ))
        }
        None => descs.next_power_of_two().clamp(256, MAX_QUEUE_SIZE),
    };
    if descs > qs {
        log::warn!(
            "iodepth {} needs {descs} descriptors; queue size {qs} limits it",
            shape.iodepth
        );
    }
    info.queue_size = qs;
    let nq = i32::try_from(queues).map_err(|_| "too many queues".to_string())?;
    b.set_i32("num-queues", nq)
        .map_err(blkio_err("num-queues"))?;
    b.set_i32("queue-size", qs as i32)
        .map_err(blkio_err("queue-size"))?;
    let started = b.start().map_err(blkio_err("start"))?;
    let region = map_buffers(&mut b, queues as usize, shape)?;
    Ok(Device {
        blkio: b,
        queues: started.queues,
        region,
        info,
    })
}

fn map_buffers(b: &mut Blkio, queues: usize, shape: &IoShape) -> Result<MemoryRegion, String> {
    let align = b
        .get_u64("mem-region-alignment")
        .map_err(blkio_err("mem-region-alignment"))?
        .max(1) as usize;
    let len = queues
        .checked_mul(shape.iodepth)
        .and_then(|n| n.checked_mul(shape.slot_stride()))
        .ok_or("buffer region too large")?;
    let len = len.div_ceil(align) * align;
    let region = b
        .alloc_mem_region(len)
        .map_err(blkio_err("alloc_mem_region"))?;
    // SAFETY: alloc_mem_region returned a fresh, writable shared mapping of
    // `region.len` bytes at `region.addr`; nothing else references it yet.
    let bytes = unsafe { std::slice::from_raw_parts_mut(region.addr as *mut u8, region.len) };
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = (i as u8) ^ 0x5a; // non-zero data for writes
    }
    b.map_mem_region(&region)
        .map_err(blkio_err("map_mem_region"))?;
    Ok(region)
}

/// Phase of the run, set by the main thread and read by the workers.
pub const PHASE_RAMP: u8 = 0;
/// Completions are counted.
pub const PHASE_MEASURE: u8 = 1;
/// Workers stop submitting and drain.
pub const PHASE_STOP: u8 = 2;

/// State shared between the main thread and the workers.
pub struct Shared {
    /// One of the PHASE_ constants.
    pub phase: AtomicU8,
    /// Set by a worker that failed, so the run ends early.
    pub failed: AtomicBool,
    /// Completed requests per queue (all phases), for the progress line.
    pub completed: Vec<AtomicU64>,
}

impl Shared {
    /// Shared state for `queues` workers.
    pub fn new(queues: usize) -> Arc<Shared> {
        Arc::new(Shared {
            phase: AtomicU8::new(PHASE_RAMP),
            failed: AtomicBool::new(false),
            completed: (0..queues).map(|_| AtomicU64::new(0)).collect(),
        })
    }
}

/// What one worker measured.
#[derive(Default)]
pub struct WorkerResult {
    /// Latency of the requests completed while measuring, in ns.
    pub hist: Histogram,
    /// Reads completed while measuring.
    pub reads: u64,
    /// Writes completed while measuring.
    pub writes: u64,
    /// Requests that completed with an error (any phase).
    pub errors: u64,
    /// The first error.
    pub first_error: Option<String>,
}

/// xorshift64* — enough for offsets, no dependency.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// Uniform in 0..n (n > 0), by multiply-shift.
    fn below(&mut self, n: u64) -> u64 {
        ((u128::from(self.next()) * u128::from(n)) >> 64) as u64
    }
}

/// One queue's worker.
pub struct Worker {
    q: Blkioq,
    shape: IoShape,
    index: usize,
    shared: Arc<Shared>,
    /// Address of this queue's first slot buffer.
    base: usize,
    /// Per-slot iovec arrays when requests are split; empty otherwise. They
    /// are never resized, so the pointers handed to libblkio stay valid.
    iovs: Vec<Box<[libc::iovec]>>,
    submitted_at: Vec<Instant>,
    is_write: Vec<bool>,
    rng: Rng,
    cursor: u64,
    blocks: u64,
    in_flight: usize,
    result: WorkerResult,
}

// SAFETY: the raw pointers inside `iovs` point into the libblkio memory
// region, which outlives every worker (the main thread keeps the `Blkio`
// until all workers are joined), and only this worker uses them.
unsafe impl Send for Worker {}

impl Worker {
    /// A worker for queue `index` of `queues`, whose slots start at slot
    /// `index * iodepth` of `region`.
    pub fn new(
        q: Blkioq,
        index: usize,
        queues: usize,
        shape: IoShape,
        region: &MemoryRegion,
        shared: Arc<Shared>,
    ) -> Worker {
        let stride = shape.slot_stride();
        let base = region.addr + index * shape.iodepth * stride;
        let iovs = if shape.seg_len == 0 {
            Vec::new()
        } else {
            (0..shape.iodepth)
                .map(|s| split_iovecs(base + s * stride, shape.bs as usize, shape.seg_len))
                .collect()
        };
        let blocks = shape.size / shape.bs;
        let seed =
            0x9e37_79b9_7f4a_7c15u64 ^ ((index as u64 + 1) << 32) ^ u64::from(std::process::id());
        Worker {
            q,
            shape,
            index,
            shared,
            base,
            iovs,
            submitted_at: vec![Instant::now(); shape.iodepth],
            is_write: vec![false; shape.iodepth],
            rng: Rng(seed | 1),
            cursor: (index as u64 * blocks) / queues as u64,
            blocks,
            in_flight: 0,
            result: WorkerResult::default(),
        }
    }

    fn next_offset(&mut self) -> u64 {
        let block = if self.shape.rw.is_random() {
            self.rng.below(self.blocks)
        } else {
            let b = self.cursor;
            self.cursor = if b + 1 >= self.blocks { 0 } else { b + 1 };
            b
        };
        block * self.shape.bs
    }

    fn next_is_write(&mut self) -> bool {
        match self.shape.rw {
            RwMode::Randread | RwMode::Read => false,
            RwMode::Randwrite | RwMode::Write => true,
            RwMode::Randrw => self.rng.below(100) >= u64::from(self.shape.rwmixread),
        }
    }

    fn submit(&mut self, slot: usize, now: Instant) {
        let offset = self.next_offset();
        let write = self.next_is_write();
        self.is_write[slot] = write;
        self.submitted_at[slot] = now;
        self.in_flight += 1;
        let flags = ReqFlags::empty();
        // The buffer is `bs` bytes inside the mapped region and belongs to
        // this slot alone until its completion is reaped; libblkio keeps the
        // pointer (and the iovec array) until then.
        if let Some(iov) = self.iovs.get(slot) {
            let (p, n) = (iov.as_ptr(), iov.len() as u32);
            if write {
                self.q.writev(offset, p, n, slot, flags);
            } else {
                self.q.readv(offset, p, n, slot, flags);
            }
        } else {
            let buf = (self.base + slot * self.shape.slot_stride()) as *mut u8;
            let len = self.shape.bs as usize;
            if write {
                self.q.write(offset, buf, len, slot, flags);
            } else {
                self.q.read(offset, buf, len, slot, flags);
            }
        }
    }

    /// Reaps completions: waits for at least one (interrupt mode, with a
    /// timeout so a stop or a dead backend is noticed) or takes what is there
    /// (poll mode). Returns how many entries of `out` are filled.
    fn reap(&mut self, out: &mut [MaybeUninit<Completion>]) -> Result<usize, String> {
        let r = if self.shape.poll {
            self.q.do_io(out, 0, None, None)
        } else {
            let mut timeout = Duration::from_millis(200);
            self.q.do_io(out, 1, Some(&mut timeout), None)
        };
        match r {
            Ok(n) => Ok(n),
            Err(e) if e.errno().raw_os_error() == libc::ETIME => Ok(0),
            Err(e) => Err(format!("queue {}: do_io: {e}", self.index)),
        }
    }

    fn complete(&mut self, c: &Completion, now: Instant, measuring: bool) -> Result<usize, String> {
        let slot = c.user_data;
        if slot >= self.shape.iodepth {
            return Err(format!(
                "queue {}: completion for unknown request {slot}",
                self.index
            ));
        }
        self.in_flight -= 1;
        if c.ret != 0 {
            self.result.errors += 1;
            if self.result.first_error.is_none() {
                let err = std::io::Error::from_raw_os_error(c.ret.saturating_neg());
                self.result.first_error =
                    Some(format!("queue {}: request failed: {err}", self.index));
            }
        } else if measuring {
            let ns = now
                .saturating_duration_since(self.submitted_at[slot])
                .as_nanos();
            self.result
                .hist
                .record(u64::try_from(ns).unwrap_or(u64::MAX));
            if self.is_write[slot] {
                self.result.writes += 1;
            } else {
                self.result.reads += 1;
            }
        }
        Ok(slot)
    }

    /// Runs until the phase becomes STOP, then drains the queue.
    pub fn run(mut self) -> Result<WorkerResult, String> {
        let r = self.run_inner();
        if r.is_err() {
            self.shared.failed.store(true, Ordering::Release);
        }
        r.map(|()| self.result)
    }

    fn run_inner(&mut self) -> Result<(), String> {
        let depth = self.shape.iodepth;
        let mut out: Vec<MaybeUninit<Completion>> =
            (0..depth).map(|_| MaybeUninit::uninit()).collect();
        let now = Instant::now();
        for slot in 0..depth {
            self.submit(slot, now);
        }
        let mut last_progress = now;
        let mut done = 0u64;
        loop {
            let n = self.reap(&mut out)?;
            let phase = self.shared.phase.load(Ordering::Acquire);
            let now = Instant::now();
            if n == 0 {
                if phase == PHASE_STOP {
                    break;
                }
                if now.duration_since(last_progress) > STALL_LIMIT {
                    return Err(format!(
                        "queue {}: no completion for {:?}",
                        self.index, STALL_LIMIT
                    ));
                }
                continue;
            }
            last_progress = now;
            for c in &out[..n] {
                // SAFETY: do_io initialised the first `n` entries of `out`.
                let c = unsafe { c.assume_init_ref() };
                let slot = self.complete(c, now, phase == PHASE_MEASURE)?;
                if phase != PHASE_STOP {
                    self.submit(slot, now);
                }
            }
            done += n as u64;
            self.shared.completed[self.index].store(done, Ordering::Relaxed);
            if phase == PHASE_STOP {
                break;
            }
        }
        self.drain(&mut out)
    }

    fn drain(&mut self, out: &mut [MaybeUninit<Completion>]) -> Result<(), String> {
        let mut last_progress = Instant::now();
        while self.in_flight > 0 {
            let n = self.reap(out)?;
            let now = Instant::now();
            if n == 0 && now.duration_since(last_progress) > STALL_LIMIT {
                return Err(format!(
                    "queue {}: {} requests never completed",
                    self.index, self.in_flight
                ));
            }
            for c in &out[..n] {
                // SAFETY: do_io initialised the first `n` entries of `out`.
                let c = unsafe { c.assume_init_ref() };
                self.complete(c, now, false)?;
                last_progress = now;
            }
        }
        Ok(())
    }
}

fn split_iovecs(addr: usize, len: usize, seg: usize) -> Box<[libc::iovec]> {
    (0..len.div_ceil(seg))
        .map(|i| libc::iovec {
            iov_base: (addr + i * seg) as *mut libc::c_void,
            iov_len: seg.min(len - i * seg),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(max_transfer: u32, seg: u32, segs: u32) -> DeviceInfo {
        DeviceInfo {
            capacity: 1 << 30,
            max_queues: 1,
            request_alignment: 512,
            max_transfer,
            max_segment_len: seg,
            max_segments: segs,
            queue_size: 256,
        }
    }

    #[test]
    fn segments() {
        assert_eq!(segment_len(&info(0, 0, 1), 1 << 20), Ok(0));
        assert_eq!(segment_len(&info(0, 65536, 126), 1 << 20), Ok(65536));
        assert!(segment_len(&info(0, 4096, 126), 1 << 20).is_err());
        assert!(segment_len(&info(4096, 0, 1), 8192).is_err());
        assert!(segment_len(&info(0, 0, 1), 1000).is_err());
        let v = split_iovecs(0x1000, 10_000, 4096);
        assert_eq!(
            v.iter().map(|i| i.iov_len).collect::<Vec<_>>(),
            vec![4096, 4096, 1808]
        );
    }

    #[test]
    fn rng_range() {
        let mut r = Rng(1);
        let mut hits = [0u32; 10];
        for _ in 0..100_000 {
            hits[r.below(10) as usize] += 1;
        }
        assert!(
            hits.iter().all(|&h| (9_000..11_000).contains(&h)),
            "{hits:?}"
        );
    }
}
