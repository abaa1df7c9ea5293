//! One benchmark run: open the device, start one worker per queue, switch the
//! phases (ramp, measure, stop) on the clock, print progress, collect.

use std::io::{IsTerminal, Write};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::args::RunArgs;
use super::client::{self, IoShape, Shared, Worker, WorkerResult, PHASE_MEASURE, PHASE_STOP};
use super::hist::Histogram;
use super::procfs::{self, HostCpu};
use super::result::{Backend, BenchResult, Host, Latency, Workload};

/// Figures sampled at the start and the end of the measured time.
pub(super) struct Snapshot {
    pub(super) at: Instant,
    pub(super) host: Result<HostCpu, String>,
    idle_poll_us: Result<u64, String>,
    backend_cpu: Option<Result<f64, String>>,
    backend_rss_kib: Option<Result<u64, String>>,
    backend_sleeps: Option<Result<u64, String>>,
    client_cpu: Result<f64, String>,
}

impl Snapshot {
    pub(super) fn take(pid: Option<u32>) -> Snapshot {
        Snapshot {
            at: Instant::now(),
            host: HostCpu::read(),
            idle_poll_us: procfs::idle_poll_us(),
            backend_cpu: pid.map(procfs::process_cpu_seconds),
            backend_rss_kib: pid.map(procfs::process_rss_kib),
            backend_sleeps: pid.map(procfs::process_sleeps),
            client_cpu: procfs::process_cpu_seconds(std::process::id()),
        }
    }
}

/// Runs the benchmark described by `args` and returns what it measured.
pub fn run(args: &RunArgs) -> Result<BenchResult, String> {
    if let Some(uri) = &args.nbd {
        return super::nbd::run(args, uri);
    }
    let socket = args.socket.as_ref().ok_or("--socket PATH (or --nbd URI) is required")?;
    let mut shape = IoShape {
        rw: args.rw,
        bs: args.bs,
        iodepth: args.iodepth as usize,
        size: 0,
        rwmixread: args.rwmixread,
        poll: args.poll,
        seg_len: 0,
    };
    let timeout = Duration::from_secs_f64(args.connect_timeout);
    let mut dev = client::open(socket, timeout, args.queues, args.queue_size, &mut shape)?;
    let size = args.size.unwrap_or(dev.info.capacity);
    if size > dev.info.capacity {
        return Err(format!(
            "--size {size} exceeds the device capacity {}",
            dev.info.capacity
        ));
    }
    shape.size = size - size % shape.bs;
    if shape.size == 0 {
        return Err(format!("--size {size} holds no {}-byte block", shape.bs));
    }

    let nq = args.queues as usize;
    let shared = Shared::new(nq);
    let mut handles = Vec::with_capacity(nq);
    for (i, q) in dev.queues.drain(..).enumerate() {
        let w = Worker::new(q, i, nq, shape, &dev.region, Arc::clone(&shared));
        let h = thread::Builder::new()
            .name(format!("bench-q{i}"))
            .spawn(move || w.run())
            .map_err(|e| format!("spawn worker: {e}"))?;
        handles.push(h);
    }

    let clock = drive_phases(args, &shared);
    let mut results = Vec::with_capacity(nq);
    let mut first_err = None;
    for h in handles {
        match h.join() {
            Ok(Ok(r)) => results.push(r),
            Ok(Err(e)) => {
                first_err.get_or_insert(e);
            }
            Err(_) => {
                first_err.get_or_insert("a worker thread panicked".to_string());
            }
        }
    }
    let info = dev.info;
    drop(dev); // disconnects, after every queue is gone
    if let Some(e) = first_err {
        return Err(e);
    }
    let (start, end) = clock?;
    let mut r = assemble(
        args,
        &shape,
        &results,
        &start,
        &end,
        socket.display().to_string(),
    );
    r.device = info;
    Ok(r)
}

/// Switches phases on time and prints the progress line. Returns the
/// snapshots at the start and end of the measured time.
fn drive_phases(args: &RunArgs, shared: &Shared) -> Result<(Snapshot, Snapshot), String> {
    let pid = args.server_pid;
    let begin = Instant::now();
    let measure_at = begin + Duration::from_secs_f64(args.ramp);
    let stop_at = measure_at + Duration::from_secs_f64(args.seconds);
    let tick = Duration::from_secs(1);
    let mut next_tick = begin + tick;
    let mut start: Option<Snapshot> = None;
    let mut progress = Progress::new(args.quiet, shared);
    loop {
        let now = Instant::now();
        if shared.failed.load(Ordering::Acquire) {
            shared.phase.store(PHASE_STOP, Ordering::Release);
            progress.finish();
            return Err("a worker failed".into());
        }
        if start.is_none() && now >= measure_at {
            shared.phase.store(PHASE_MEASURE, Ordering::Release);
            start = Some(Snapshot::take(pid));
        }
        if now >= stop_at {
            let end = Snapshot::take(pid);
            shared.phase.store(PHASE_STOP, Ordering::Release);
            progress.finish();
            let start = start.ok_or("measuring never started")?;
            return Ok((start, end));
        }
        if now >= next_tick {
            let measuring = start.is_some();
            progress.print(now.duration_since(begin), args, measuring);
            next_tick += tick;
        }
        let deadline = if start.is_none() { measure_at } else { stop_at };
        let wake = next_tick.min(deadline);
        thread::sleep(wake.saturating_duration_since(Instant::now()));
    }
}

/// The once-a-second line on stderr.
struct Progress<'a> {
    quiet: bool,
    tty: bool,
    shared: &'a Shared,
    last_ops: u64,
    last_at: Instant,
    printed: bool,
}

impl<'a> Progress<'a> {
    fn new(quiet: bool, shared: &'a Shared) -> Self {
        let tty = std::io::stderr().is_terminal();
        Progress {
            quiet,
            tty,
            shared,
            last_ops: 0,
            last_at: Instant::now(),
            printed: false,
        }
    }

    fn print(&mut self, elapsed: Duration, args: &RunArgs, measuring: bool) {
        let ops: u64 = self
            .shared
            .completed
            .iter()
            .map(|c| c.load(Ordering::Relaxed))
            .sum();
        let now = Instant::now();
        let dt = now.duration_since(self.last_at).as_secs_f64().max(1e-6);
        let iops = (ops - self.last_ops.min(ops)) as f64 / dt;
        self.last_ops = ops;
        self.last_at = now;
        if self.quiet {
            return;
        }
        let total = args.ramp + args.seconds;
        let line = format!(
            "bench: {:>4.0}/{:.0} s {} {:>10.0} IOPS {:>9.1} MiB/s",
            elapsed.as_secs_f64(),
            total,
            if measuring { "run " } else { "ramp" },
            iops,
            iops * args.bs as f64 / (1 << 20) as f64,
        );
        let mut err = std::io::stderr().lock();
        let end = if self.tty { "\r" } else { "\n" };
        let _ = write!(err, "{line}{end}");
        let _ = err.flush();
        self.printed = true;
    }

    fn finish(&mut self) {
        if self.tty && self.printed && !self.quiet {
            eprintln!();
        }
    }
}

pub(super) fn cpu_rate(
    a: &Option<Result<f64, String>>,
    b: &Option<Result<f64, String>>,
    secs: f64,
) -> Option<Result<f64, String>> {
    match (a, b) {
        (Some(Ok(x)), Some(Ok(y))) => Some(Ok((y - x).max(0.0) / secs)),
        (Some(Err(e)), _) | (_, Some(Err(e))) => Some(Err(e.clone())),
        _ => None,
    }
}

fn assemble(
    args: &RunArgs,
    shape: &IoShape,
    results: &[WorkerResult],
    start: &Snapshot,
    end: &Snapshot,
    socket: String,
) -> BenchResult {
    let secs = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
    let mut hist = Histogram::new();
    let (mut reads, mut writes, mut errors) = (0, 0, 0);
    let mut first_error = None;
    for r in results {
        hist.merge(&r.hist);
        reads += r.reads;
        writes += r.writes;
        errors += r.errors;
        if first_error.is_none() {
            first_error.clone_from(&r.first_error);
        }
    }
    let ops = reads + writes;
    let bytes = ops * shape.bs;
    let backend = args
        .server_pid
        .map(|pid| backend_figures(pid, start, end, secs));
    let client_cpu = match (&start.client_cpu, &end.client_cpu) {
        (Ok(a), Ok(b)) => Some((b - a).max(0.0)),
        _ => None,
    };
    let host = host_figures(start, end, secs, client_cpu);
    BenchResult {
        schema: super::result::SCHEMA_VERSION,
        label: args.label.clone(),
        socket,
        workload: Workload {
            rw: shape.rw,
            bs: shape.bs,
            iodepth: args.iodepth,
            queues: args.queues,
            size: shape.size,
            poll: shape.poll,
            rwmixread: shape.rwmixread,
            seconds: args.seconds,
            ramp_seconds: args.ramp,
            client: super::result::ClientKind::Libblkio,
        },
        device: client::DeviceInfo::default(),
        elapsed_s: secs,
        ops,
        reads,
        writes,
        bytes,
        errors,
        first_error,
        iops: ops as f64 / secs,
        mib_s: bytes as f64 / secs / (1 << 20) as f64,
        lat_us: Latency::from_hist(&hist),
        backend,
        host,
    }
}

/// The host's figures between two snapshots; `client_cpu` is the client's
/// CPU seconds over them.
pub(super) fn host_figures(start: &Snapshot, end: &Snapshot, secs: f64, client_cpu: Option<f64>) -> Host {
    let (steal_pct, busy_cpus) = match (&start.host, &end.host) {
        (Ok(a), Ok(b)) => (Some(a.steal_pct(b)), Some(a.busy_cpus(b, secs))),
        _ => (None, None),
    };
    Host {
        steal_pct,
        busy_cpus,
        cpus: thread::available_parallelism().map_or(0, |n| n.get()),
        loadavg_1m: procfs::loadavg_1m().ok(),
        client_cpu_s_per_s: client_cpu.map(|c| c / secs),
        idle_poll_cpus: match (&start.idle_poll_us, &end.idle_poll_us) {
            (Ok(a), Ok(b)) if secs > 0.0 => Some(b.saturating_sub(*a) as f64 / 1e6 / secs),
            _ => None,
        },
    }
}

pub(super) fn backend_figures(pid: u32, start: &Snapshot, end: &Snapshot, secs: f64) -> Backend {
    let mut b = Backend {
        pid,
        ..Default::default()
    };
    match cpu_rate(&start.backend_cpu, &end.backend_cpu, secs) {
        Some(Ok(v)) => b.cpu_s_per_s = Some(v),
        Some(Err(e)) => b.notes.push(format!("CPU: {e}")),
        None => {}
    }
    match (&start.backend_sleeps, &end.backend_sleeps) {
        (Some(Ok(n0)), Some(Ok(n1))) => b.sleeps_per_s = Some(n1.saturating_sub(*n0) as f64 / secs),
        (Some(Err(e)), _) | (_, Some(Err(e))) => b.notes.push(format!("sleeps: {e}")),
        _ => {}
    }
    match &end.backend_rss_kib {
        Some(Ok(k)) => b.rss_kib = Some(*k),
        Some(Err(e)) => b.notes.push(format!("RSS: {e}")),
        None => {}
    }
    b
}
