//! Shared helpers for integration tests: starting the real `blkstack serve`
//! binary, a libblkio (virtio-blk-vhost-user) client, and a minimal QMP
//! exchange for reading statistics.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::mem::MaybeUninit;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use blkio::{Blkio, Blkioq, Completion, MemoryRegion, ReqFlags};
use serde_json::{json, Value};

/// A scratch directory on a disk-backed file system (O_DIRECT works there).
pub fn scratch(name: &str) -> PathBuf {
    let base = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
    let dir = tempfile::Builder::new().prefix(name).tempdir_in(base).expect("scratch dir").keep();
    dir
}

/// A sparse image of `len` bytes in `dir`.
pub fn image(dir: &Path, name: &str, len: u64) -> PathBuf {
    let p = dir.join(name);
    let f = std::fs::File::create(&p).expect("create image");
    f.set_len(len).expect("size image");
    p
}

/// A running `blkstack serve`, killed (SIGTERM) and reaped on drop.
pub struct Daemon {
    pub pid: i32,
    pub dir: PathBuf,
    stopped: bool,
}

/// Result of a `blkstack serve` that failed to start.
pub struct Failed {
    pub code: Option<i32>,
    pub stderr: String,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_blkstack")
}

/// Starts `blkstack serve ARGS --daemonize --pidfile ...`: returns once every
/// export is listening (the parent exits only then), or the failure.
pub fn try_serve(dir: &Path, args: &[String]) -> Result<Daemon, Failed> {
    let pidfile = dir.join("blkstack.pid");
    let _ = std::fs::remove_file(&pidfile);
    let logpath = dir.join("blkstack.log");
    let log = std::fs::File::create(&logpath).expect("log file");
    // The parent exits once every export is up (or with the error); the
    // daemonized child keeps logging to the same file.
    let status = Command::new(bin())
        .arg("serve")
        .args(args)
        .arg("--daemonize")
        .arg("--pidfile")
        .arg(&pidfile)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log)
        .status()
        .expect("run blkstack");
    if !status.success() {
        return Err(Failed { code: status.code(), stderr: std::fs::read_to_string(&logpath).unwrap_or_default() });
    }
    let pid: i32 = std::fs::read_to_string(&pidfile).expect("pidfile").trim().parse().expect("pid");
    Ok(Daemon { pid, dir: dir.to_path_buf(), stopped: false })
}

/// Like [`try_serve`] but panics with the daemon's message on failure.
pub fn serve(dir: &Path, args: &[String]) -> Daemon {
    match try_serve(dir, args) {
        Ok(d) => d,
        Err(f) => panic!("blkstack serve failed ({:?}): {}", f.code, f.stderr),
    }
}

impl Daemon {
    /// SIGTERM, then waits for the process to exit (it drains and flushes).
    pub fn stop(&mut self) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        // SAFETY: kill(2) on the daemon's pid.
        unsafe { libc::kill(self.pid, libc::SIGTERM) };
        for _ in 0..2000 {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(self.pid, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        // SAFETY: as above.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        panic!("blkstack did not exit within 10 s of SIGTERM");
    }

    /// Kills the daemon without letting it drain (a crash).
    pub fn kill(&mut self) {
        self.stopped = true;
        // SAFETY: kill(2) on the daemon's pid.
        unsafe { libc::kill(self.pid, libc::SIGKILL) };
        for _ in 0..2000 {
            // SAFETY: signal 0 only checks that the process exists.
            if unsafe { libc::kill(self.pid, 0) } != 0 {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if !self.stopped {
            self.stopped = true;
            // SAFETY: kill(2) on the daemon's pid.
            unsafe { libc::kill(self.pid, libc::SIGTERM) };
        }
    }
}

/// The vhost-user-blk export arguments for a node.
pub fn vhost_export(sock: &Path, node: &str, extra: &str) -> String {
    format!("type=vhost-user-blk,id=e0,node-name={node},addr.type=unix,addr.path={},{extra}", sock.display())
}

/// A libblkio client with one mapped buffer region.
pub struct Client {
    pub queues: Vec<Blkioq>,
    pub region: MemoryRegion,
    pub capacity: u64,
    pub read_only: bool,
    blkio: Blkio,
}

/// Connects with `num_queues` queues and a `region_len`-byte buffer region.
pub fn try_connect(sock: &Path, num_queues: i32, region_len: usize) -> Result<Client, blkio::Error> {
    try_connect_opts(sock, num_queues, region_len, false)
}

/// Connects; with `read_only`, as a read-only client (libblkio refuses a
/// read-only device otherwise).
pub fn try_connect_opts(sock: &Path, num_queues: i32, region_len: usize, read_only: bool) -> Result<Client, blkio::Error> {
    let mut b = Blkio::new("virtio-blk-vhost-user")?;
    b.set_str("path", &sock.to_string_lossy())?;
    if read_only {
        b.set_bool("read-only", true)?;
    }
    b.connect()?;
    b.set_i32("num-queues", num_queues)?;
    let out = b.start()?;
    let capacity = b.get_u64("capacity")?;
    let read_only = b.get_bool("read-only")?;
    let region = b.alloc_mem_region(region_len)?;
    b.map_mem_region(&region)?;
    Ok(Client { queues: out.queues, region, capacity, read_only, blkio: b })
}

/// Like [`try_connect`], panicking on failure.
pub fn connect(sock: &Path, num_queues: i32, region_len: usize) -> Client {
    try_connect(sock, num_queues, region_len).unwrap_or_else(|e| panic!("libblkio connect to {}: {e}", sock.display()))
}

/// What one synchronous request returned: 0 or a negative errno.
pub type Ret = i32;

impl Client {
    /// The buffer region as a byte slice.
    pub fn buf(&mut self) -> &mut [u8] {
        // SAFETY: the region is `len` bytes of mapped memory owned by libblkio
        // for the client's lifetime; no request is in flight while the slice lives.
        unsafe { std::slice::from_raw_parts_mut(self.region.addr as *mut u8, self.region.len) }
    }

    fn wait(&mut self, q: usize) -> Ret {
        let mut c = [MaybeUninit::<Completion>::uninit()];
        let mut t = Duration::from_secs(30);
        let n = self.queues[q].do_io(&mut c, 1, Some(&mut t), None).expect("do_io");
        assert_eq!(n, 1, "no completion within 30 s");
        // SAFETY: do_io initialised one completion.
        unsafe { c[0].assume_init_read() }.ret
    }

    /// Reads `len` bytes at `off` into the region's start.
    pub fn read(&mut self, off: u64, len: usize) -> Ret {
        self.read_on(0, off, len)
    }

    /// Like [`Client::read`], on queue `q`.
    pub fn read_on(&mut self, q: usize, off: u64, len: usize) -> Ret {
        let p = self.region.addr as *mut u8;
        self.queues[q].read(off, p, len, 0, ReqFlags::empty());
        self.wait(q)
    }

    /// Writes the region's first `len` bytes at `off`.
    pub fn write(&mut self, off: u64, len: usize, flags: ReqFlags) -> Ret {
        let p = self.region.addr as *const u8;
        self.queues[0].write(off, p, len, 0, flags);
        self.wait(0)
    }

    /// Flush.
    pub fn flush(&mut self) -> Ret {
        self.queues[0].flush(0, ReqFlags::empty());
        self.wait(0)
    }

    /// Discard.
    pub fn discard(&mut self, off: u64, len: u64) -> Ret {
        self.queues[0].discard(off, len, 0, ReqFlags::empty());
        self.wait(0)
    }

    /// Write-zeroes (`unmap` allows deallocation).
    pub fn write_zeroes(&mut self, off: u64, len: u64, unmap: bool) -> Ret {
        let flags = if unmap { ReqFlags::empty() } else { ReqFlags::NO_UNMAP };
        self.queues[0].write_zeroes(off, len, 0, flags);
        self.wait(0)
    }

    /// Fills the region's first `len` bytes with `byte`, writes them at `off`.
    pub fn write_pattern(&mut self, off: u64, len: usize, byte: u8) -> Ret {
        self.buf()[..len].fill(byte);
        self.write(off, len, ReqFlags::empty())
    }

    /// Reads `len` bytes at `off` and checks they all equal `byte`.
    pub fn expect_pattern(&mut self, off: u64, len: usize, byte: u8) {
        assert_eq!(self.read(off, len), 0, "read at {off}");
        let bad = self.buf()[..len].iter().position(|&b| b != byte);
        assert!(bad.is_none(), "byte {} of the read at {off} is {:#x}, expected {byte:#x}", bad.unwrap_or(0), self.buf()[bad.unwrap_or(0)]);
    }
}

/// A QMP session over the daemon's monitor socket (raw JSON lines).
pub struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    /// Connects, reads the greeting and negotiates capabilities.
    pub fn connect(path: &Path) -> Qmp {
        let s = UnixStream::connect(path).expect("connect to QMP");
        s.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
        let mut q = Qmp { r: BufReader::new(s.try_clone().expect("clone")), w: s };
        let greeting = q.line();
        assert!(greeting.get("QMP").is_some(), "greeting: {greeting}");
        let r = q.execute("qmp_capabilities", json!({}));
        assert!(r.get("return").is_some(), "{r}");
        q
    }

    fn line(&mut self) -> Value {
        let mut l = String::new();
        self.r.read_line(&mut l).expect("QMP read");
        serde_json::from_str(&l).unwrap_or_else(|e| panic!("QMP sent non-JSON {l:?}: {e}"))
    }

    /// Executes a command; returns the reply (skipping events).
    pub fn execute(&mut self, cmd: &str, args: Value) -> Value {
        let msg = json!({ "execute": cmd, "arguments": args });
        writeln!(self.w, "{msg}").expect("QMP write");
        loop {
            let v = self.line();
            if v.get("event").is_none() {
                return v;
            }
        }
    }

    /// The statistics of `node` from `query-blockstats`.
    pub fn stats(&mut self, node: &str) -> Value {
        let r = self.execute("query-blockstats", json!({ "query-nodes": true }));
        let list = r["return"].as_array().unwrap_or_else(|| panic!("query-blockstats: {r}"));
        list.iter().find(|e| e["node-name"] == node).unwrap_or_else(|| panic!("no stats for {node}: {r}"))["stats"].clone()
    }
}

/// Monitor arguments for a QMP socket at `path`.
pub fn monitor_args(path: &Path) -> Vec<String> {
    vec!["--chardev".into(), format!("socket,id=m0,path={},server=on,wait=off", path.display()), "--monitor".into(), "chardev=m0".into()]
}
