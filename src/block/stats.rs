//! Per-node I/O statistics with QEMU's `BlockDeviceStats` field meanings.
//!
//! Counters are atomics updated once per request by the generic layer: bytes
//! and operations per kind, total time per kind, failed and invalid
//! operations, the highest written offset and the time of the last I/O.
//! Write-zeroes count as writes (as in QEMU); discards count as `unmap`.
//! Each thread updates its own copy ([`super::shard`]); a snapshot folds them.
//!
//! A request's time runs from [`start_time`] to its completion. Inside a
//! [`Burst`] (a queue thread serving one batch of guest requests) the start
//! is the thread's latest clock reading: the burst's first request reads
//! the clock, and every completion's reading starts the next request. The
//! time then also covers parsing the request after the one before it, which
//! the guest waited for too; it saves one of the two clock reads per
//! request (the clock was 7 % of a queue thread's CPU on null I/O).

use std::cell::Cell;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use serde::Serialize;

use super::shard::Sharded;

thread_local! {
    /// Whether this thread is in a [`Burst`], and its latest clock reading.
    static BURST: Cell<(bool, Option<Instant>)> = const { Cell::new((false, None)) };
}

/// A batch of requests served back to back on this thread; while it lives,
/// request times chain (see the module docs). Reads no clock by itself: a
/// burst that serves nothing (an empty poll pass) costs nothing.
pub struct Burst(());

impl Burst {
    /// Starts a burst on this thread (nested bursts end with the outermost).
    pub fn begin() -> Option<Burst> {
        let (active, _) = BURST.get();
        if active {
            return None;
        }
        BURST.set((true, None));
        Some(Burst(()))
    }
}

impl Drop for Burst {
    fn drop(&mut self) {
        BURST.set((false, None));
    }
}

/// When a request that starts now started, for its statistics: the
/// thread's latest reading inside a [`Burst`], the clock otherwise.
pub fn start_time() -> Instant {
    match BURST.get() {
        (true, Some(t)) => t,
        (true, None) => {
            let now = Instant::now();
            BURST.set((true, Some(now)));
            now
        }
        (false, _) => Instant::now(),
    }
}

/// Reads the clock for a completion; inside a burst the reading also
/// starts the next request.
fn end_time() -> Instant {
    let now = Instant::now();
    if BURST.get().0 {
        BURST.set((true, Some(now)));
    }
    now
}

/// The kind of operation a counter belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoKind {
    /// Reads.
    Read,
    /// Writes and write-zeroes.
    Write,
    /// Flushes.
    Flush,
    /// Discards.
    Unmap,
}

#[derive(Default)]
struct KindCounters {
    bytes: AtomicU64,
    ops: AtomicU64,
    time_ns: AtomicU64,
    failed: AtomicU64,
    invalid: AtomicU64,
}

/// One thread's copy of a node's counters (see [`shard`]).
#[derive(Default)]
struct Counters {
    kinds: [KindCounters; 4],
    wr_highest_offset: AtomicU64,
    /// Nanoseconds from the epoch to the last I/O, plus one; 0: none yet.
    last_io: AtomicU64,
}

/// A node's live counters, one copy per queue thread ([`Sharded`]): the
/// threads of a multi-queue export never write the same cache line.
pub struct Stats {
    counters: Sharded<Counters>,
    epoch: Instant,
}

impl Default for Stats {
    fn default() -> Self {
        Stats { counters: Sharded::default(), epoch: Instant::now() }
    }
}

/// A copy of the counters, serialised with QEMU's field names.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub struct StatsSnapshot {
    pub rd_bytes: u64,
    pub wr_bytes: u64,
    pub unmap_bytes: u64,
    pub rd_operations: u64,
    pub wr_operations: u64,
    pub flush_operations: u64,
    pub unmap_operations: u64,
    pub rd_total_time_ns: u64,
    pub wr_total_time_ns: u64,
    pub flush_total_time_ns: u64,
    pub unmap_total_time_ns: u64,
    pub wr_highest_offset: u64,
    pub failed_rd_operations: u64,
    pub failed_wr_operations: u64,
    pub failed_flush_operations: u64,
    pub failed_unmap_operations: u64,
    pub invalid_rd_operations: u64,
    pub invalid_wr_operations: u64,
    pub invalid_flush_operations: u64,
    pub invalid_unmap_operations: u64,
    pub rd_merged: u64,
    pub wr_merged: u64,
    pub unmap_merged: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_time_ns: Option<u64>,
    pub account_invalid: bool,
    pub account_failed: bool,
    pub timed_stats: Vec<serde_json::Value>,
}

impl Stats {
    fn kind(&self, k: IoKind) -> (&KindCounters, &Counters) {
        let c = self.counters.local();
        (&c.kinds[k as usize], c)
    }

    fn since_epoch(&self, t: Instant) -> u64 {
        t.saturating_duration_since(self.epoch).as_nanos() as u64
    }

    /// Records a completed operation that started at `start`.
    pub fn done(&self, k: IoKind, bytes: u64, start: Instant) {
        let (c, all) = self.kind(k);
        c.bytes.fetch_add(bytes, Relaxed);
        c.ops.fetch_add(1, Relaxed);
        // One clock read for both figures.
        let now = end_time();
        c.time_ns.fetch_add(now.saturating_duration_since(start).as_nanos() as u64, Relaxed);
        all.last_io.store(self.since_epoch(now) + 1, Relaxed);
    }

    /// Records a failed operation.
    pub fn failed(&self, k: IoKind) {
        let (c, all) = self.kind(k);
        c.failed.fetch_add(1, Relaxed);
        all.last_io.store(self.since_epoch(Instant::now()) + 1, Relaxed);
    }

    /// Records an operation rejected before it reached the driver.
    pub fn invalid(&self, k: IoKind) {
        let (c, all) = self.kind(k);
        c.invalid.fetch_add(1, Relaxed);
        all.last_io.store(self.since_epoch(Instant::now()) + 1, Relaxed);
    }

    /// Notes that bytes up to `end` have been written.
    pub fn wrote_up_to(&self, end: u64) {
        let c = &self.counters.local().wr_highest_offset;
        // Most writes do not raise it: a load instead of a locked operation.
        if c.load(Relaxed) < end {
            c.fetch_max(end, Relaxed);
        }
    }

    /// Reads all counters (sums over the copies; the highest offset and
    /// the last I/O are the latest of any copy).
    pub fn snapshot(&self) -> StatsSnapshot {
        let g = |k: IoKind| {
            let mut t = (0u64, 0u64, 0u64, 0u64, 0u64);
            for all in self.counters.iter() {
                let c = &all.kinds[k as usize];
                t.0 = t.0.wrapping_add(c.bytes.load(Relaxed));
                t.1 = t.1.wrapping_add(c.ops.load(Relaxed));
                t.2 = t.2.wrapping_add(c.time_ns.load(Relaxed));
                t.3 = t.3.wrapping_add(c.failed.load(Relaxed));
                t.4 = t.4.wrapping_add(c.invalid.load(Relaxed));
            }
            t
        };
        let (rb, ro, rt, rf, ri) = g(IoKind::Read);
        let (wb, wo, wt, wf, wi) = g(IoKind::Write);
        let (_, fo, ft, ff, fi) = g(IoKind::Flush);
        let (ub, uo, ut, uf, ui) = g(IoKind::Unmap);
        let highest = self.counters.iter().map(|c| c.wr_highest_offset.load(Relaxed)).max().unwrap_or(0);
        let last = self.counters.iter().map(|c| c.last_io.load(Relaxed)).max().unwrap_or(0);
        StatsSnapshot {
            rd_bytes: rb,
            wr_bytes: wb,
            unmap_bytes: ub,
            rd_operations: ro,
            wr_operations: wo,
            flush_operations: fo,
            unmap_operations: uo,
            rd_total_time_ns: rt,
            wr_total_time_ns: wt,
            flush_total_time_ns: ft,
            unmap_total_time_ns: ut,
            wr_highest_offset: highest,
            failed_rd_operations: rf,
            failed_wr_operations: wf,
            failed_flush_operations: ff,
            failed_unmap_operations: uf,
            invalid_rd_operations: ri,
            invalid_wr_operations: wi,
            invalid_flush_operations: fi,
            invalid_unmap_operations: ui,
            idle_time_ns: (last != 0).then(|| self.since_epoch(Instant::now()).saturating_sub(last - 1)),
            account_invalid: true,
            account_failed: true,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_land_in_qemu_fields() {
        let s = Stats::default();
        assert_eq!(s.snapshot().idle_time_ns, None);
        let t = Instant::now();
        s.done(IoKind::Read, 4096, t);
        s.done(IoKind::Write, 512, t);
        s.done(IoKind::Flush, 0, t);
        s.done(IoKind::Unmap, 1 << 20, t);
        s.failed(IoKind::Write);
        s.invalid(IoKind::Read);
        s.wrote_up_to(8192);
        s.wrote_up_to(4096);
        let snap = s.snapshot();
        assert_eq!((snap.rd_bytes, snap.rd_operations), (4096, 1));
        assert_eq!((snap.wr_bytes, snap.wr_operations, snap.failed_wr_operations), (512, 1, 1));
        assert_eq!((snap.flush_operations, snap.unmap_bytes, snap.invalid_rd_operations), (1, 1 << 20, 1));
        assert_eq!(snap.wr_highest_offset, 8192);
        assert!(snap.idle_time_ns.is_some());
        let json = serde_json::to_value(&snap).expect("serialise");
        assert_eq!(json["flush_operations"], 1);
    }

    #[test]
    fn threads_count_into_one_snapshot() {
        let s = Stats::default();
        let t = Instant::now();
        std::thread::scope(|sc| {
            for i in 1..=4u64 {
                let s = &s;
                sc.spawn(move || {
                    for _ in 0..i {
                        s.done(IoKind::Read, 4096, t);
                    }
                    s.wrote_up_to(i << 20);
                });
            }
        });
        std::thread::sleep(std::time::Duration::from_millis(20));
        let last = Instant::now();
        s.done(IoKind::Write, 512, t);
        let snap = s.snapshot();
        let since_last = last.elapsed().as_nanos() as u64;
        assert_eq!((snap.rd_operations, snap.rd_bytes), (10, 10 * 4096));
        assert_eq!((snap.wr_operations, snap.wr_bytes), (1, 512));
        assert_eq!(snap.wr_highest_offset, 4 << 20, "the highest of any thread");
        let idle = snap.idle_time_ns.expect("I/O happened");
        assert!(idle <= since_last, "idle time runs from the latest I/O of any thread: {idle} ns > {since_last} ns");
    }

    #[test]
    fn a_burst_chains_request_times() {
        // Outside a burst every start reads the clock.
        let a = start_time();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(start_time() > a);
        let s = Stats::default();
        {
            let burst = Burst::begin().expect("not nested");
            assert!(Burst::begin().is_none(), "a nested burst ends with the outer one");
            let first = start_time();
            std::thread::sleep(std::time::Duration::from_millis(2));
            // Later starts in the burst keep the first reading until a
            // completion reads the clock.
            assert_eq!(start_time(), first);
            s.done(IoKind::Read, 512, first);
            let next = start_time();
            assert!(next >= first + std::time::Duration::from_millis(2));
            let t = s.snapshot().rd_total_time_ns;
            assert_eq!(t, next.duration_since(first).as_nanos() as u64, "the completion's reading starts the next request");
            drop(burst);
        }
        let after = start_time();
        std::thread::sleep(std::time::Duration::from_millis(2));
        assert!(start_time() > after, "the burst ended");
    }
}
