//! What waking a thread costs on this machine: two threads pass a token back
//! and forth through eventfds, the way a vhost-user frontend and a backend
//! that sleeps between batches notify each other (the "server" side waits
//! in `epoll_wait`, reads its eventfd and writes the other one; the
//! "client" side writes and then blocks in `read`). Measured with the two
//! threads pinned to two different CPUs, and to one CPU.
//!
//! The figures bound every backend that sleeps once per batch: a batch of
//! `iodepth` requests costs at least one round trip of wall time and one
//! server-side wake-up of CPU time, however little the backend does per
//! request. `blkstack bench compare` prints them beside the `null` row.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::thread;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::runtime::affinity;

/// One ping-pong measurement.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct PingPong {
    /// The client thread's CPU.
    pub client_cpu: u16,
    /// The server thread's CPU.
    pub server_cpu: u16,
    /// Round trips made.
    pub round_trips: u64,
    /// Wall time per round trip, microseconds.
    pub round_trip_us: f64,
    /// The server thread's CPU time per round trip (one sleep, one wake-up,
    /// one eventfd read and one write), microseconds.
    pub server_cpu_us: f64,
    /// The client thread's CPU time per round trip, microseconds.
    pub client_cpu_us: f64,
}

/// Both measurements.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct WakeProbe {
    /// Client and server on two CPUs (absent on a one-CPU machine).
    pub cross_cpu: Option<PingPong>,
    /// Client and server on one CPU.
    pub same_cpu: Option<PingPong>,
    /// Why a measurement is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    /// The cross-CPU round trip (µs) of every probe taken in the run, in
    /// order, when more than one was (see [`WakeProbe::calmest`]).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub taken_us: Vec<f64>,
}

impl WakeProbe {
    /// Of probes taken at different times, the one with the shortest
    /// cross-CPU round trip (host noise only ever lengthens it), with the
    /// round trips of all of them in `taken_us`. `None` for no probes.
    pub fn calmest(probes: Vec<WakeProbe>) -> Option<WakeProbe> {
        let taken: Vec<f64> = probes.iter().filter_map(|p| p.cross_cpu.map(|c| c.round_trip_us)).collect();
        let key = |p: &WakeProbe| p.cross_cpu.map_or(f64::INFINITY, |c| c.round_trip_us);
        let mut best = probes.into_iter().min_by(|a, b| key(a).total_cmp(&key(b)))?;
        if taken.len() > 1 {
            best.taken_us = taken;
        }
        Some(best)
    }
}

impl PingPong {
    /// The most IOPS a backend that sleeps once per batch of `iodepth`
    /// requests can serve (one round trip per batch).
    pub fn max_iops(&self, iodepth: u32) -> f64 {
        f64::from(iodepth) / (self.round_trip_us * 1e-6)
    }

    /// The most IOPS per backend CPU-second such a backend can reach (one
    /// server-side wake-up per batch, nothing else).
    pub fn max_iops_per_cpu_s(&self, iodepth: u32) -> f64 {
        f64::from(iodepth) / (self.server_cpu_us * 1e-6)
    }

    /// The most IOPS per backend CPU-second any backend can reach while it
    /// serves `iops` to a client that sleeps until it is signalled, doing
    /// no work per request, whether it sleeps after a batch or stays awake
    /// for the next one; `None` when no backend can serve `iops` at all.
    ///
    /// The client wakes at most once per batch of `iodepth` requests, and a
    /// wake-up takes half a round trip each way. A batch after which the
    /// backend sleeps takes a whole round trip of wall time and costs the
    /// backend one wake-up of CPU ([`Self::server_cpu_us`]); a batch it stays
    /// awake for takes at least the client's half and costs the backend all
    /// of that time on the CPU. Serving `iops` caps the share of sleeping
    /// batches; the best backend sleeps as often as that allows when its
    /// wake-up is the cheaper of the two, and never otherwise.
    pub fn max_iops_per_cpu_s_serving(&self, iodepth: u32, iops: f64) -> Option<f64> {
        let b = f64::from(iodepth);
        let half = self.round_trip_us / 2.0;
        if half.is_nan() || half <= 0.0 || iops.is_nan() || iops <= 0.0 {
            return None;
        }
        // Average batch time half·(1 + f) must not exceed b / iops.
        let f_max = 2.0 * b / (iops * 1e-6 * self.round_trip_us) - 1.0;
        if f_max < 0.0 {
            return None;
        }
        let f = if self.server_cpu_us < half { f_max.min(1.0) } else { 0.0 };
        let cpu_us = f * self.server_cpu_us + (1.0 - f) * half;
        Some(b / (cpu_us * 1e-6))
    }
}

/// Samples per placement: the probe reports the sample with the median
/// round trip, so a moment of host noise does not set the bounds.
const SAMPLES: u32 = 5;

/// Measures both placements for about `each` of wall time apiece, in
/// [`SAMPLES`] alternating samples.
pub fn probe(each: Duration) -> WakeProbe {
    let mut out = WakeProbe::default();
    let cpus = match affinity::allowed_cpus() {
        Ok(c) => c.0,
        Err(e) => {
            out.notes.push(format!("cannot read the CPU affinity: {e}"));
            return out;
        }
    };
    let Some(&first) = cpus.first() else {
        out.notes.push("no CPU to run on".into());
        return out;
    };
    let second = cpus.get(1).copied();
    if second.is_none() {
        out.notes.push("one CPU only: no cross-CPU figure".into());
    }
    let slice = each / SAMPLES;
    let (mut cross, mut same) = (Vec::new(), Vec::new());
    for _ in 0..SAMPLES {
        if let Some(second) = second {
            match ping_pong(first, second, slice) {
                Ok(p) => cross.push(p),
                Err(e) => out.notes.push(format!("two CPUs: {e}")),
            }
        }
        match ping_pong(first, first, slice) {
            Ok(p) => same.push(p),
            Err(e) => out.notes.push(format!("one CPU: {e}")),
        }
    }
    out.cross_cpu = median_sample(cross);
    out.same_cpu = median_sample(same);
    out
}

/// The sample with the median round trip.
fn median_sample(mut v: Vec<PingPong>) -> Option<PingPong> {
    v.sort_by(|a, b| a.round_trip_us.total_cmp(&b.round_trip_us));
    v.get(v.len() / 2).copied()
}

fn eventfd(flags: i32) -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes no pointers.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn write_one(fd: i32) -> io::Result<()> {
    let v = 1u64.to_ne_bytes();
    // SAFETY: writes 8 bytes from a live local buffer.
    if unsafe { libc::write(fd, v.as_ptr().cast(), 8) } != 8 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn read_one(fd: i32) -> io::Result<u64> {
    let mut v = [0u8; 8];
    // SAFETY: reads at most 8 bytes into a live local buffer.
    if unsafe { libc::read(fd, v.as_mut_ptr().cast(), 8) } != 8 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from_ne_bytes(v))
}

fn thread_cpu_s() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 * 1e-9
}

/// The server: wait in epoll for the ping, read it, answer; until it reads
/// the stop value. Returns its CPU seconds and round trips.
fn server(cpu: u16, ping: &OwnedFd, pong: &OwnedFd) -> io::Result<(f64, u64)> {
    affinity::pin_current_thread(cpu)?;
    // SAFETY: epoll_create1 takes no pointers.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `ep` is a new descriptor nobody else owns.
    let ep = unsafe { OwnedFd::from_raw_fd(ep) };
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: 0,
    };
    // SAFETY: `ev` is a valid epoll_event; both fds are open.
    if unsafe {
        libc::epoll_ctl(
            ep.as_raw_fd(),
            libc::EPOLL_CTL_ADD,
            ping.as_raw_fd(),
            &mut ev,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    let t0 = thread_cpu_s();
    let mut n = 0u64;
    loop {
        // SAFETY: room for one event in `ev`.
        let r = unsafe { libc::epoll_wait(ep.as_raw_fd(), &mut ev, 1, 5000) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if r == 0 {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "no ping for 5 s"));
        }
        if read_one(ping.as_raw_fd())? > 1 {
            return Ok((thread_cpu_s() - t0, n));
        }
        n += 1;
        write_one(pong.as_raw_fd())?;
    }
}

fn ping_pong(client_cpu: u16, server_cpu: u16, each: Duration) -> Result<PingPong, String> {
    let ping = eventfd(libc::EFD_NONBLOCK).map_err(|e| format!("eventfd: {e}"))?;
    let pong = eventfd(0).map_err(|e| format!("eventfd: {e}"))?;
    thread::scope(|s| {
        let srv = s.spawn(|| server(server_cpu, &ping, &pong));
        let run = || -> io::Result<(f64, f64, u64)> {
            affinity::pin_current_thread(client_cpu)?;
            // Warm up (both threads placed and running), then measure.
            for _ in 0..200 {
                write_one(ping.as_raw_fd())?;
                read_one(pong.as_raw_fd())?;
            }
            let (t0, c0) = (Instant::now(), thread_cpu_s());
            let mut n = 0u64;
            while t0.elapsed() < each {
                for _ in 0..100 {
                    write_one(ping.as_raw_fd())?;
                    read_one(pong.as_raw_fd())?;
                }
                n += 100;
            }
            Ok((t0.elapsed().as_secs_f64(), thread_cpu_s() - c0, n))
        };
        // The client runs in a thread of its own too: pinning the caller
        // would pin every process it starts afterwards (the backends).
        let client = s
            .spawn(run)
            .join()
            .map_err(|_| "the client thread panicked".to_string())?;
        // Stop the server whatever happened (a value above 1 means stop; a
        // pending ping adds to it, which still reads as stop).
        let stop = 2u64.to_ne_bytes();
        // SAFETY: writes 8 bytes from a live local buffer.
        unsafe { libc::write(ping.as_raw_fd(), stop.as_ptr().cast(), 8) };
        let server = srv
            .join()
            .map_err(|_| "the server thread panicked".to_string())?;
        let (wall, client_cpu_s, n) = client.map_err(|e| format!("client: {e}"))?;
        let (server_cpu_s, served) = server.map_err(|e| format!("server: {e}"))?;
        // The server's clock ran over the warm-up too: divide by every
        // round trip it served.
        let total = served.max(1);
        Ok(PingPong {
            client_cpu,
            server_cpu,
            round_trips: n,
            round_trip_us: wall / n.max(1) as f64 * 1e6,
            server_cpu_us: server_cpu_s / total as f64 * 1e6,
            client_cpu_us: client_cpu_s / n.max(1) as f64 * 1e6,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_calmest_probe_is_kept() {
        let pp = |rt: f64| PingPong { client_cpu: 0, server_cpu: 1, round_trips: 1, round_trip_us: rt, server_cpu_us: rt / 3.0, client_cpu_us: rt / 3.0 };
        let probe = |rt: Option<f64>| WakeProbe { cross_cpu: rt.map(pp), ..WakeProbe::default() };
        let best = WakeProbe::calmest(vec![probe(Some(289.4)), probe(None), probe(Some(60.2))]).expect("a probe");
        assert_eq!(best.cross_cpu.map(|c| c.round_trip_us), Some(60.2));
        assert_eq!(best.taken_us, vec![289.4, 60.2]);
        let one = WakeProbe::calmest(vec![probe(Some(57.0))]).expect("a probe");
        assert!(one.taken_us.is_empty(), "one probe lists nothing");
        assert_eq!(WakeProbe::calmest(Vec::new()), None);
    }

    #[test]
    fn ping_pong_measures_round_trips() {
        let before = affinity::allowed_cpus().expect("affinity");
        let p = probe(Duration::from_millis(250));
        assert_eq!(
            affinity::allowed_cpus().expect("affinity"),
            before,
            "the caller is not pinned"
        );
        let same = p.same_cpu.expect("one-CPU figure");
        assert!(same.round_trips >= 100, "{same:?}");
        assert!(
            same.round_trip_us > 0.0 && same.server_cpu_us > 0.0 && same.client_cpu_us > 0.0,
            "{same:?}"
        );
        assert_eq!(same.client_cpu, same.server_cpu);
        if let Some(cross) = p.cross_cpu {
            assert_ne!(cross.client_cpu, cross.server_cpu);
            assert!(cross.round_trips >= 100, "{cross:?}");
        }
        // The bounds follow from the figures.
        assert!((same.max_iops(32) - 32.0 / (same.round_trip_us * 1e-6)).abs() < 1e-6);
    }

    #[test]
    fn a_backend_serving_more_than_a_sleeper_can_pays_for_staying_awake() {
        let p = |rt: f64, cpu: f64| PingPong { client_cpu: 0, server_cpu: 1, round_trips: 1, round_trip_us: rt, server_cpu_us: cpu, client_cpu_us: cpu };
        let close = |a: Option<f64>, b: f64| a.is_some_and(|a| (a - b).abs() < 1.0);
        // Run R's probe: 45.6 µs round trips, 16.0 µs per wake-up. QSD's
        // 880k IOPS leave at most 59.5 % of batches to end in a sleep.
        let r = p(45.6, 16.0);
        let f = 2.0 * 32.0 / (0.880 * 45.6) - 1.0;
        assert!(close(r.max_iops_per_cpu_s_serving(32, 880e3), 32e6 / (f * 16.0 + (1.0 - f) * 22.8)));
        assert!(r.max_iops_per_cpu_s_serving(32, 880e3).is_some_and(|e| e < 1.79e6 && e > 1.6e6));
        // Slow enough to sleep after every batch: the sleeper's own bound.
        assert!(close(r.max_iops_per_cpu_s_serving(32, 600e3), r.max_iops_per_cpu_s(32)));
        // Faster than one client wake-up per batch allows: nobody can.
        assert_eq!(r.max_iops_per_cpu_s_serving(32, 32e6 / 22.0), None);
        // A wake-up dearer than waiting: staying awake is the best.
        assert!(close(p(40.0, 30.0).max_iops_per_cpu_s_serving(32, 500e3), 32e6 / 20.0));
        assert_eq!(p(0.0, 1.0).max_iops_per_cpu_s_serving(32, 1.0), None);
    }

    #[test]
    fn the_median_sample_is_kept() {
        let s = |rt: f64| PingPong {
            client_cpu: 0,
            server_cpu: 1,
            round_trips: 1,
            round_trip_us: rt,
            server_cpu_us: rt / 2.0,
            client_cpu_us: rt / 3.0,
        };
        let m = median_sample(vec![s(90.0), s(50.0), s(55.0), s(52.0), s(300.0)]);
        assert_eq!(m.map(|p| p.round_trip_us), Some(55.0));
        assert_eq!(median_sample(Vec::new()), None);
    }
}
