//! Smoke test of `blkstack bench`: the real client for about a second against
//! a real backend, checking that the JSON is complete and sane. It never
//! fails on a performance number — benchmarks are not tests.
//!
//! Backends: qemu-storage-daemon with a `null-co` node, and `blkstack serve`
//! with one. A test whose backend is not installed (or, for blkstack, not
//! built into the binary yet) says so on stderr and passes.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blkstack")
}

fn scratch(name: &str) -> PathBuf {
    let dir =
        PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// A backend process, killed and reaped on drop.
struct Backend(Child);

impl Drop for Backend {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn start(program: &str, args: &[String], socket: &Path, log: &Path) -> Backend {
    let log = std::fs::File::create(log).expect("log");
    let child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("start backend");
    let mut b = Backend(child);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !socket.exists() {
        if let Ok(Some(st)) = b.0.try_wait() {
            panic!("{program} exited early: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{program} did not create {}",
            socket.display()
        );
        thread::sleep(Duration::from_millis(10));
    }
    b
}

fn works(program: &str, args: &[&str]) -> bool {
    Command::new(program)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

fn run_bench(args: &[String]) -> Output {
    let mut child = Command::new(bin())
        .arg("bench")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run blkstack bench");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().expect("wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("blkstack bench ran past 60 s");
        }
        thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().expect("output")
}

fn num(v: &Value, path: &[&str]) -> f64 {
    let mut cur = v;
    for p in path {
        cur = cur
            .get(p)
            .unwrap_or_else(|| panic!("JSON lacks {}: {v}", path.join(".")));
    }
    cur.as_f64()
        .unwrap_or_else(|| panic!("{} is not a number: {cur}", path.join(".")))
}

/// Runs the client and checks the result's shape; returns the JSON.
fn bench_and_check(socket: &Path, pid: u32, extra: &[&str], dir: &Path) -> Value {
    let json = dir.join("result.json");
    let mut args: Vec<String> = vec![
        "--socket".into(),
        socket.display().to_string(),
        "--seconds".into(),
        "1".into(),
        "--ramp".into(),
        "0.2".into(),
        "--server-pid".into(),
        pid.to_string(),
        "--json".into(),
        json.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = run_bench(&args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "bench failed: {stderr}");
    assert!(
        stdout.contains("IOPS") && stdout.contains("p99"),
        "table missing: {stdout}"
    );
    assert!(
        stderr.contains("bench:"),
        "no progress line on stderr: {stderr}"
    );
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json file"))
        .expect("valid JSON");

    assert_eq!(v["schema"], 1);
    assert!(num(&v, &["iops"]) > 0.0, "iops: {v}");
    assert!(num(&v, &["mib_s"]) > 0.0);
    assert!(num(&v, &["ops"]) > 0.0);
    assert_eq!(num(&v, &["errors"]), 0.0);
    assert_eq!(
        num(&v, &["reads"]) + num(&v, &["writes"]),
        num(&v, &["ops"])
    );
    let el = num(&v, &["elapsed_s"]);
    assert!((0.5..5.0).contains(&el), "elapsed {el}");
    let (min, p50, p99, p999, max) = (
        num(&v, &["lat_us", "min"]),
        num(&v, &["lat_us", "p50"]),
        num(&v, &["lat_us", "p99"]),
        num(&v, &["lat_us", "p99_9"]),
        num(&v, &["lat_us", "max"]),
    );
    assert!(
        min > 0.0 && min <= p50 && p50 <= p99 && p99 <= p999 && p999 <= max,
        "latency order: {}",
        v["lat_us"]
    );
    let mean = num(&v, &["lat_us", "mean"]);
    assert!(mean >= min && mean <= max);
    assert_eq!(num(&v, &["backend", "pid"]), f64::from(pid));
    assert!(num(&v, &["backend", "cpu_s_per_s"]) >= 0.0);
    assert!(num(&v, &["backend", "rss_kib"]) > 0.0);
    // How often the backend slept is measured for a real backend (a
    // number, not null: /proc/PID/task was readable).
    assert!(num(&v, &["backend", "sleeps_per_s"]) >= 0.0, "sleeps: {v}");
    let steal = num(&v, &["host", "steal_pct"]);
    assert!((0.0..=100.0).contains(&steal));
    assert!(num(&v, &["device", "capacity"]) > 0.0);
    v
}

#[test]
fn bench_against_qsd_null() {
    let qsd = "qemu-storage-daemon";
    if !works(qsd, &["--version"]) {
        eprintln!("SKIP: {qsd} not installed");
        return;
    }
    let dir = scratch("bench-qsd");
    let socket = dir.join("q.sock");
    let args = vec![
        "--blockdev".to_string(),
        "driver=null-co,node-name=n0,size=1073741824".to_string(),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=2",
            socket.display()
        ),
    ];
    let b = start(qsd, &args, &socket, &dir.join("qsd.log"));
    let v = bench_and_check(
        &socket,
        b.0.id(),
        &["--rw", "randrw", "--iodepth", "8", "--queues", "2"],
        &dir,
    );
    assert_eq!(v["workload"]["rw"], "randrw");
    assert_eq!(v["workload"]["queues"], 2);
    assert!(num(&v, &["reads"]) > 0.0 && num(&v, &["writes"]) > 0.0);
}

#[test]
fn bench_against_blkstack_null() {
    if !works(bin(), &["serve", "--help"]) {
        eprintln!("SKIP: `blkstack serve` is not available in this build");
        return;
    }
    let dir = scratch("bench-blkstack");
    let socket = dir.join("b.sock");
    let args = vec![
        "serve".to_string(),
        "--blockdev".to_string(),
        "driver=null-co,node-name=n0,size=1073741824".to_string(),
        "--export".to_string(),
        format!(
            "type=vhost-user-blk,id=e0,node-name=n0,addr.type=unix,addr.path={},writable=on,num-queues=1",
            socket.display()
        ),
    ];
    let b = start(bin(), &args, &socket, &dir.join("blkstack.log"));
    let v = bench_and_check(
        &socket,
        b.0.id(),
        &["--rw", "read", "--bs", "64k", "--iodepth", "4"],
        &dir,
    );
    assert_eq!(v["workload"]["bs"], 65536);
    assert!(num(&v, &["reads"]) > 0.0);
}

/// `--nbd`: qemu-img bench drives blkstack's NBD export; its writes land in
/// the image, and what qemu-img bench cannot do is refused up front.
#[test]
fn bench_over_nbd_with_qemu_img() {
    if !works("qemu-img", &["--version"]) || !works(bin(), &["serve", "--help"]) {
        eprintln!("SKIP: qemu-img or `blkstack serve` not available");
        return;
    }
    let dir = scratch("bench-nbd");
    let img = dir.join("disk.img");
    std::fs::write(&img, vec![0u8; 16 << 20]).expect("image");
    let socket = dir.join("n.sock");
    let args = vec![
        "serve".to_string(),
        "--blockdev".to_string(),
        format!("driver=file,node-name=f0,filename={}", img.display()),
        "--nbd-server".to_string(),
        format!("addr.type=unix,addr.path={}", socket.display()),
        "--export".to_string(),
        "type=nbd,id=n0,node-name=f0,name=disk,writable=on".to_string(),
    ];
    let b = start(bin(), &args, &socket, &dir.join("blkstack.log"));
    let uri = format!("nbd+unix:///disk?socket={}", socket.display());
    let json = dir.join("result.json");
    let out = run_bench(&[
        "--nbd".into(),
        uri.clone(),
        "--rw".into(),
        "write".into(),
        "--bs".into(),
        "64k".into(),
        "--iodepth".into(),
        "8".into(),
        "--seconds".into(),
        "1".into(),
        "--ramp".into(),
        "0.2".into(),
        "--server-pid".into(),
        b.0.id().to_string(),
        "--json".into(),
        json.display().to_string(),
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "bench failed: {}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("IOPS") && stdout.contains("latency     n/a"), "{stdout}");
    let v: Value = serde_json::from_str(&std::fs::read_to_string(&json).expect("json file")).expect("valid JSON");
    assert_eq!(v["workload"]["client"], "qemu-img-bench");
    assert_eq!(v["workload"]["rw"], "write");
    assert!(num(&v, &["iops"]) > 0.0, "{v}");
    assert_eq!(num(&v, &["writes"]), num(&v, &["ops"]));
    assert_eq!(num(&v, &["bytes"]), num(&v, &["ops"]) * 65536.0);
    assert_eq!(num(&v, &["device", "capacity"]), f64::from(16u32 << 20));
    let el = num(&v, &["elapsed_s"]);
    assert!(el > 0.0 && el < 30.0, "elapsed {el}");
    assert!(num(&v, &["backend", "cpu_s_per_s"]) >= 0.0);
    // Counted while the connection lived, so a number, not null.
    assert!(num(&v, &["backend", "sleeps_per_s"]) >= 0.0, "{v}");
    assert!(num(&v, &["host", "client_cpu_s_per_s"]) > 0.0, "{v}");
    // qemu-img bench wrote its pattern from offset 0 on.
    let data = std::fs::read(&img).expect("read image");
    assert!(data[..65536].iter().all(|&x| x == 90), "the writes did not reach the image");
    drop(b);
    for bad in [&["--rw", "randread"][..], &["--rw", "read", "--queues", "2"]] {
        let mut a = vec!["--nbd".to_string(), uri.clone()];
        a.extend(bad.iter().map(|x| x.to_string()));
        let out = run_bench(&a);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(err.contains("--nbd: qemu-img bench"), "{err}");
    }
}

#[test]
fn bench_reports_bad_input_without_panicking() {
    let out = run_bench(&[
        "--socket".into(),
        "/nonexistent/x.sock".into(),
        "--connect-timeout".into(),
        "0".into(),
    ]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{err}");
    assert!(err.contains("connect to /nonexistent/x.sock"), "{err}");
    assert!(!err.contains("panicked"), "{err}");

    let out = run_bench(&["--socket".into(), "x".into(), "--bs".into(), "4q".into()]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown suffix"));

    let out = run_bench(&[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--socket"));
}
