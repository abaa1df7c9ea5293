//! `blkstack bench --nbd URI`: a run against an NBD export, driven by
//! `qemu-img bench` (QEMU's own NBD client, a program we did not write).
//!
//! `qemu-img bench` sends a fixed number of requests at consecutive offsets
//! (`-S` = the request size, wrapping at the end of the image) with a fixed
//! number in flight, over one connection, and reports only the total time.
//! So a run here is:
//! - **ramp / calibration**: runs of growing request counts until one takes
//!   a quarter of a second, repeated until `--ramp` has passed; the last one
//!   gives the rate;
//! - **measured run**: one `qemu-img bench` sized to last `--seconds` at that
//!   rate. IOPS, MiB/s, the backend's CPU, sleeps and RSS and the host's
//!   steal are taken over its whole life (start-up and NBD handshake
//!   included: a few milliseconds), the client's CPU from the kernel's
//!   accounting of reaped children. The backend's sleeps are sampled every
//!   20 ms while the client runs, since a server with a thread per
//!   connection ends that thread (and its count) when the client leaves.
//!
//! There are no latency figures, and only `--rw read` and `write`.

use std::io::Read;
use std::process::{Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::args::{RunArgs, RwMode};
use super::client::DeviceInfo;
use super::procfs;
use super::result::{BenchResult, ClientKind, Latency, Workload};
use super::run::{backend_figures, host_figures, Snapshot};

/// What `qemu-img bench` is asked to do, apart from the request count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Shape {
    /// Writes (`-w`) rather than reads.
    pub write: bool,
    /// Request size.
    pub bs: u64,
    /// Requests in flight.
    pub depth: u32,
}

/// Checks that `args` describe a run `qemu-img bench` can do.
pub fn shape(args: &RunArgs) -> Result<Shape, String> {
    let write = match args.rw {
        RwMode::Read => false,
        RwMode::Write => true,
        other => {
            return Err(format!(
                "--nbd: qemu-img bench issues sequential requests only; --rw {} is not possible (use read or write)",
                other.name()
            ))
        }
    };
    if args.queues != 1 {
        return Err("--nbd: qemu-img bench uses one connection; --queues must be 1".into());
    }
    if args.poll {
        return Err("--nbd: qemu-img bench cannot poll; leave out --poll".into());
    }
    if args.size.is_some() {
        return Err("--nbd: qemu-img bench addresses the whole export (it wraps at its end); leave out --size".into());
    }
    if args.queue_size.is_some() {
        return Err("--nbd: there is no virtqueue; leave out --queue-size".into());
    }
    if args.bs == 0 || args.bs > 32 << 20 {
        return Err(format!("--nbd: --bs {} must be between 1 byte and 32 MiB (NBD's usual request limit)", args.bs));
    }
    Ok(Shape {
        write,
        bs: args.bs,
        depth: args.iodepth,
    })
}

/// Checks that `uri` is an NBD URI (and so cannot be taken for an option
/// or a local file by `qemu-img`).
pub fn check_uri(uri: &str) -> Result<(), String> {
    let scheme = uri.split_once("://").map(|(s, _)| s);
    match scheme {
        Some("nbd" | "nbd+unix" | "nbd+tcp") => Ok(()),
        _ => Err(format!(
            "--nbd: '{uri}' is not an NBD URI (nbd://HOST[:PORT]/NAME or nbd+unix:///NAME?socket=PATH)"
        )),
    }
}

/// The arguments of `qemu-img bench` for `count` requests.
pub fn bench_args(uri: &str, s: &Shape, count: u64) -> Vec<String> {
    let mut v: Vec<String> = vec![
        "bench".into(),
        "-f".into(),
        "raw".into(),
        "-c".into(),
        count.to_string(),
        "-d".into(),
        s.depth.to_string(),
        "-s".into(),
        s.bs.to_string(),
        "-S".into(),
        s.bs.to_string(),
        "-o".into(),
        "0".into(),
    ];
    if s.write {
        // Non-zero data: zeroes could be detected and stored as holes by a
        // backend configured to, and the image must stay allocated.
        v.extend(["-w".into(), "--pattern=90".into()]);
    }
    v.push(uri.to_string());
    v
}

/// Runs `qemu-img ARGS` to completion (killed after `limit`); returns its
/// wall time, or its error output.
fn run_qemu_img(
    qemu_img: &std::path::Path,
    args: &[String],
    limit: Duration,
    mut each_tick: impl FnMut(),
) -> Result<Duration, String> {
    let t0 = Instant::now();
    let mut child = Command::new(qemu_img)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("start {}: {e}", qemu_img.display()))?;
    let mut next_tick = t0;
    let status = loop {
        if let Some(st) = child.try_wait().map_err(|e| format!("qemu-img: {e}"))? {
            break st;
        }
        if Instant::now() >= next_tick {
            each_tick();
            next_tick += Duration::from_millis(20);
        }
        if t0.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            return Err(format!("qemu-img {} ran past {} s", args.first().map_or("", |a| a.as_str()), limit.as_secs()));
        }
        thread::sleep(Duration::from_millis(2));
    };
    let took = t0.elapsed();
    if status.success() {
        return Ok(took);
    }
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    let last = err.lines().rfind(|l| !l.trim().is_empty()).unwrap_or("").trim().to_string();
    Err(format!("qemu-img {} failed ({status}): {last}", args.first().map_or("", |a| a.as_str())))
}

/// The export's size from `qemu-img info`, retried until `timeout` (the
/// server may still be starting).
fn export_size(qemu_img: &std::path::Path, uri: &str, timeout: Duration) -> Result<u64, String> {
    let t0 = Instant::now();
    let args: Vec<String> = ["info", "--output=json", "-f", "raw", uri].iter().map(|s| s.to_string()).collect();
    loop {
        let out = Command::new(qemu_img)
            .args(&args)
            .stdin(Stdio::null())
            .output()
            .map_err(|e| format!("start {}: {e}", qemu_img.display()))?;
        if out.status.success() {
            let v: serde_json::Value = serde_json::from_slice(&out.stdout)
                .map_err(|e| format!("qemu-img info: {e}"))?;
            return v
                .get("virtual-size")
                .and_then(serde_json::Value::as_u64)
                .ok_or_else(|| "qemu-img info: no virtual-size".to_string());
        }
        if t0.elapsed() >= timeout {
            let err = String::from_utf8_lossy(&out.stderr);
            return Err(format!("{uri}: {}", err.lines().last().unwrap_or("qemu-img info failed").trim()));
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// CPU seconds of this process's reaped children.
fn children_cpu_seconds() -> Result<f64, String> {
    // SAFETY: getrusage writes one struct we own.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: RUSAGE_CHILDREN with a valid pointer.
    if unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) } != 0 {
        return Err(format!("getrusage: {}", std::io::Error::last_os_error()));
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    Ok(secs(ru.ru_utime) + secs(ru.ru_stime))
}

/// The number of requests that should take `seconds` at the rate of `count`
/// requests in `took` (at least one full queue).
pub fn count_for(count: u64, took: Duration, seconds: f64, depth: u32) -> u64 {
    let rate = count as f64 / took.as_secs_f64().max(1e-6);
    ((rate * seconds).ceil() as u64).max(u64::from(depth))
}

/// One run against the NBD export `uri`.
pub fn run(args: &RunArgs, uri: &str) -> Result<BenchResult, String> {
    let s = shape(args)?;
    check_uri(uri)?;
    let qi = args.qemu_img.as_path();
    let capacity = export_size(qi, uri, Duration::from_secs_f64(args.connect_timeout))?;
    if capacity < s.bs {
        return Err(format!("{uri}: {capacity} bytes hold no {}-byte request", s.bs));
    }
    let limit = Duration::from_secs_f64(args.seconds * 4.0 + 30.0);
    // Calibration, which is also the ramp: grow the count until a run takes
    // a quarter of a second, and keep running until the ramp has passed.
    let ramp_until = Instant::now() + Duration::from_secs_f64(args.ramp);
    let mut count = u64::from(s.depth).max(64) * 16;
    let mut took = run_qemu_img(qi, &bench_args(uri, &s, count), limit, || {})?;
    while took < Duration::from_millis(250) && count < 1 << 40 {
        count *= 4;
        took = run_qemu_img(qi, &bench_args(uri, &s, count), limit, || {})?;
    }
    while Instant::now() < ramp_until {
        took = run_qemu_img(qi, &bench_args(uri, &s, count), limit, || {})?;
    }
    let n = count_for(count, took, args.seconds, s.depth);
    if !args.quiet {
        eprintln!("bench: {n} {} requests of {} bytes, {} in flight, over NBD", if s.write { "write" } else { "read" }, s.bs, s.depth);
    }

    let pid = args.server_pid;
    let cpu0 = children_cpu_seconds();
    let mut sleeps = procfs::SleepTracker::default();
    let mut sleeps_err = pid.and_then(|p| sleeps.sample(p, true).err());
    let start = Snapshot::take(pid);
    run_qemu_img(qi, &bench_args(uri, &s, n), limit, || {
        if let Some(p) = pid {
            // The backend's threads are read while the connection lives.
            let _ = sleeps.sample(p, false);
        }
    })?;
    let end = Snapshot::take(pid);
    if let Some(p) = pid {
        sleeps_err = sleeps_err.or(sleeps.sample(p, false).err());
    }
    let cpu1 = children_cpu_seconds();
    let secs = end.at.duration_since(start.at).as_secs_f64().max(1e-9);
    let bytes = n * s.bs;
    let (reads, writes) = if s.write { (0, n) } else { (n, 0) };
    Ok(BenchResult {
        schema: super::result::SCHEMA_VERSION,
        label: args.label.clone(),
        socket: uri.to_string(),
        workload: Workload {
            rw: args.rw,
            bs: s.bs,
            iodepth: s.depth,
            queues: 1,
            size: capacity,
            poll: false,
            rwmixread: args.rwmixread,
            seconds: args.seconds,
            ramp_seconds: args.ramp,
            client: ClientKind::QemuImgBench,
        },
        device: DeviceInfo {
            capacity,
            max_queues: 1,
            ..DeviceInfo::default()
        },
        elapsed_s: secs,
        ops: n,
        reads,
        writes,
        bytes,
        errors: 0,
        first_error: None,
        iops: n as f64 / secs,
        mib_s: bytes as f64 / secs / (1 << 20) as f64,
        lat_us: Latency::default(),
        backend: pid.map(|p| {
            let mut b = backend_figures(p, &start, &end, secs);
            // Not the figure of the threads alive at the end: the
            // connection's thread has gone by then.
            b.notes.retain(|n| !n.starts_with("sleeps:"));
            b.sleeps_per_s = match &sleeps_err {
                None => Some(sleeps.total() as f64 / secs),
                Some(e) => {
                    b.notes.push(format!("sleeps: {e}"));
                    None
                }
            };
            b
        }),
        host: host_figures(&start, &end, secs, match (cpu0, cpu1) {
            (Ok(a), Ok(b)) => Some((b - a).max(0.0)),
            _ => None,
        }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(clap::Parser)]
    struct T {
        #[command(flatten)]
        run: RunArgs,
    }

    fn parse(extra: &[&str]) -> RunArgs {
        let mut v = vec!["t", "--nbd", "nbd+unix:///d?socket=/s"];
        v.extend_from_slice(extra);
        T::try_parse_from(v).expect("parse").run
    }

    #[test]
    fn only_what_qemu_img_bench_can_do_is_accepted() {
        assert_eq!(shape(&parse(&["--rw", "read", "--bs", "1M", "--iodepth", "8"])), Ok(Shape { write: false, bs: 1 << 20, depth: 8 }));
        assert_eq!(shape(&parse(&["--rw", "write"])).map(|s| s.write), Ok(true));
        for bad in [
            &["--rw", "randread"][..],
            &["--rw", "randrw"],
            &["--rw", "read", "--queues", "2"],
            &["--rw", "read", "--poll"],
            &["--rw", "read", "--size", "1M"],
            &["--rw", "read", "--queue-size", "256"],
            &["--rw", "read", "--bs", "64M"],
        ] {
            let e = shape(&parse(bad)).expect_err("refused");
            assert!(e.starts_with("--nbd: "), "{bad:?}: {e}");
        }
        // --socket and --nbd name two different backends.
        assert!(T::try_parse_from(["t", "--nbd", "nbd://h/d", "--socket", "/s"]).is_err());
    }

    #[test]
    fn only_nbd_uris_are_passed_to_qemu_img() {
        for ok in ["nbd://h:10809/d", "nbd+unix:///d?socket=/s", "nbd+tcp://h/d"] {
            assert_eq!(check_uri(ok), Ok(()), "{ok}");
        }
        for bad in ["-h", "--help", "/tmp/disk.img", "file:///x", "nbds://h/d", "nbd:/x", ""] {
            assert!(check_uri(bad).is_err_and(|e| e.starts_with("--nbd: ")), "{bad}");
        }
    }

    #[test]
    fn qemu_img_bench_arguments() {
        let r = Shape { write: false, bs: 4096, depth: 32 };
        assert_eq!(
            bench_args("nbd+unix:///d?socket=/s", &r, 1000).join(" "),
            "bench -f raw -c 1000 -d 32 -s 4096 -S 4096 -o 0 nbd+unix:///d?socket=/s"
        );
        let w = Shape { write: true, ..r };
        let a = bench_args("u", &w, 5);
        assert_eq!(a[a.len() - 3..], ["-w", "--pattern=90", "u"]);
    }

    #[test]
    fn the_measured_count_follows_the_calibrated_rate() {
        assert_eq!(count_for(1000, Duration::from_millis(250), 8.0, 32), 32_000);
        // Never less than one full queue.
        assert_eq!(count_for(1, Duration::from_secs(10), 1.0, 32), 32);
    }
}
