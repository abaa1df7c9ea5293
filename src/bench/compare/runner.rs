//! Starting and stopping backends, and running the client against them.
//!
//! Each run gets a fresh backend process (cloud-hypervisor's serves one
//! connection and exits, so every backend is treated the same way). The
//! client runs as a child process (`blkstack bench ... --json`) so a crash in
//! one run cannot take the comparison down.

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use crate::bench::result::BenchResult;

/// Creates (if needed) a fully allocated image of `size` bytes with
/// non-zero data, so reads with O_DIRECT reach the disk.
pub fn prepare_image(path: &Path, size: u64) -> Result<(), String> {
    if let Ok(m) = fs::metadata(path) {
        if m.len() == size && m.blocks() * 512 >= size {
            return Ok(());
        }
    }
    eprintln!("compare: writing {} ({} MiB)", path.display(), size >> 20);
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let mut f = File::create(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let chunk: Vec<u8> = (0..1usize << 20)
        .map(|i| (i as u8).wrapping_mul(7) | 1)
        .collect();
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        f.write_all(&chunk[..n])
            .map_err(|e| format!("{}: {e}", path.display()))?;
        left -= n as u64;
    }
    f.sync_all()
        .map_err(|e| format!("{}: sync: {e}", path.display()))
}

/// Reads the whole image so it sits in the page cache, with readahead off
/// (`POSIX_FADV_RANDOM`): pages read back after the host reclaimed them come
/// in as 4 KiB folios, like the rest (see [`reset_page_cache`]).
pub fn preread(path: &Path) -> Result<(), String> {
    let mut f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    fadvise(&f, libc::POSIX_FADV_RANDOM, path)?;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        match f.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(_) => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
}

/// Drops the image from the page cache and reads it back in 4 KiB folios.
///
/// The folio size of the cached image decides what a 4 KiB buffered write
/// costs: ext4 walks every buffer head of the folio a write lands in. With
/// the image cached in 2 MiB folios (after it was written in 1 MiB chunks,
/// or read with large readahead) every backend wrote 13-22k IOPS at a full
/// core, 72 % of it in `ext4_block_write_begin`; in 4 KiB folios the same
/// run gives 120-170k. Holding the cache in one known state makes the write
/// rows measure the backends, and the same for every run.
pub fn reset_page_cache(path: &Path) -> Result<(), String> {
    // Dirty pages cannot be dropped: write them back first.
    sync_image(path)?;
    let f = File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    fadvise(&f, libc::POSIX_FADV_DONTNEED, path)?;
    preread(path)
}

fn fadvise(f: &File, advice: libc::c_int, path: &Path) -> Result<(), String> {
    // SAFETY: posix_fadvise on an fd we own; no memory is passed.
    let r = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, advice) };
    if r != 0 {
        return Err(format!(
            "{}: posix_fadvise: {}",
            path.display(),
            std::io::Error::from_raw_os_error(r)
        ));
    }
    Ok(())
}

/// Writes dirty pages of the image back so they do not disturb the next run.
pub fn sync_image(path: &Path) -> Result<(), String> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    f.sync_all()
        .map_err(|e| format!("{}: sync: {e}", path.display()))
}

/// Restricts the process `cmd` starts (and its threads) to `cpu`.
fn on_cpu(cmd: &mut Command, cpu: Option<u16>) {
    use std::os::unix::process::CommandExt;
    let Some(cpu) = cpu else { return };
    // SAFETY: the closure runs in the child between fork and exec and only
    // makes a system call on a local cpu_set_t (async-signal-safe).
    unsafe {
        cmd.pre_exec(move || {
            // CPU_SET would index past the set (a panic in the child).
            if usize::from(cpu) >= libc::CPU_SETSIZE as usize {
                return Err(std::io::Error::from_raw_os_error(libc::EINVAL));
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(usize::from(cpu), &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
}

/// A running backend.
pub struct Backend {
    child: Child,
    /// Where its output goes.
    pub log: PathBuf,
}

impl Backend {
    /// Starts `program args`, logging to `log`, and waits until `socket`
    /// exists (up to 10 s).
    pub fn start(
        program: &Path,
        args: &[String],
        socket: &Path,
        log: &Path,
        cpu: Option<u16>,
    ) -> Result<Backend, String> {
        match fs::remove_file(socket) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("{}: {e}", socket.display())),
        }
        let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
        let err = out
            .try_clone()
            .map_err(|e| format!("{}: {e}", log.display()))?;
        let mut cmd = Command::new(program);
        cmd.args(args).stdin(Stdio::null()).stdout(out).stderr(err);
        on_cpu(&mut cmd, cpu);
        let child = cmd
            .spawn()
            .map_err(|e| format!("start {}: {e}", program.display()))?;
        let mut b = Backend {
            child,
            log: log.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if fs::metadata(socket)
                .map(|m| m.file_type().is_socket())
                .unwrap_or(false)
            {
                return Ok(b);
            }
            if let Ok(Some(st)) = b.child.try_wait() {
                return Err(format!(
                    "{} exited ({st}) before listening: {}",
                    program.display(),
                    b.log_tail()
                ));
            }
            if Instant::now() > deadline {
                b.stop(Duration::ZERO);
                return Err(format!(
                    "{} did not create {} within 10 s",
                    program.display(),
                    socket.display()
                ));
            }
            thread::sleep(Duration::from_millis(5));
        }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// The last lines of its log.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().rev().take(5).collect();
        lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
    }

    /// Waits up to `grace` for it to exit by itself (CH does after the
    /// client disconnects), then sends SIGTERM, then SIGKILL after 5 s.
    pub fn stop(&mut self, grace: Duration) {
        if wait_for(&mut self.child, grace) {
            return;
        }
        if let Ok(pid) = libc::pid_t::try_from(self.child.id()) {
            // SAFETY: kill(2) has no memory-safety preconditions; `pid` is our
            // child, not yet reaped, so it cannot name another process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        if !wait_for(&mut self.child, Duration::from_secs(5)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

fn wait_for(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    loop {
        match child.try_wait() {
            Ok(Some(_)) | Err(_) => return true,
            Ok(None) if Instant::now() >= deadline => return false,
            Ok(None) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// Runs the client (`exe <args> --json <json>`, `exe` being `blkstack-bench`) with a time limit and
/// returns its parsed result. `started` is called once the client runs; a
/// process it returns (a profiler) is waited for after the client.
#[allow(clippy::too_many_arguments)]
pub fn run_client(
    exe: &Path,
    args: &[String],
    json: &Path,
    limit: Duration,
    log: &Path,
    cpu: Option<u16>,
    started: impl FnOnce(u32) -> Option<Option<Child>>,
) -> Result<BenchResult, String> {
    let _ = fs::remove_file(json);
    let out = File::create(log).map_err(|e| format!("{}: {e}", log.display()))?;
    let err = out
        .try_clone()
        .map_err(|e| format!("{}: {e}", log.display()))?;
    let mut cmd = Command::new(exe);
    cmd.args(args)
        .arg("--json")
        .arg(json)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err);
    on_cpu(&mut cmd, cpu);
    let mut child = cmd
        .spawn()
        .map_err(|e| format!("start client: {e}"))?;
    let helper = started(child.id()).flatten();
    let ok = wait_for(&mut child, limit);
    if let Some(mut h) = helper {
        if !wait_for(&mut h, Duration::from_secs(10)) {
            let _ = h.kill();
        }
        let _ = h.wait();
    }
    if !ok {
        let _ = child.kill();
        let _ = child.wait();
        return Err(format!("client ran past {} s", limit.as_secs()));
    }
    let status = child.wait().map_err(|e| format!("client: {e}"))?;
    let text = fs::read_to_string(json);
    match text {
        Ok(t) => {
            let r: BenchResult =
                serde_json::from_str(&t).map_err(|e| format!("{}: {e}", json.display()))?;
            if !status.success() && r.ops == 0 {
                return Err(format!("client failed ({status}): {}", tail(log)));
            }
            Ok(r)
        }
        Err(_) => Err(format!("client failed ({status}): {}", tail(log))),
    }
}

fn tail(log: &Path) -> String {
    let text = fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.starts_with("bench: ")).collect();
    lines[lines.len().saturating_sub(3)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn on_cpu_pins_the_child() {
        let allowed = crate::runtime::affinity::allowed_cpus().expect("affinity");
        let cpu = *allowed.0.last().expect("a CPU");
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        on_cpu(&mut cmd, Some(cpu));
        let out = cmd.output().expect("run grep");
        let text = String::from_utf8_lossy(&out.stdout);
        assert_eq!(text.split_whitespace().nth(1), Some(cpu.to_string().as_str()), "{text}");
        // Without a CPU the child keeps this process's set.
        let mut cmd = Command::new("grep");
        cmd.args(["Cpus_allowed_list", "/proc/self/status"]);
        on_cpu(&mut cmd, None);
        let out = cmd.output().expect("run grep");
        assert_eq!(out.status.code(), Some(0));
        // A CPU past the set is refused before exec, not a panic in the child.
        let mut cmd = Command::new("true");
        on_cpu(&mut cmd, Some(u16::MAX));
        assert_eq!(cmd.status().map_err(|e| e.raw_os_error()), Err(Some(libc::EINVAL)));
        if allowed.0.len() > 1 {
            assert_ne!(String::from_utf8_lossy(&out.stdout).split_whitespace().nth(1), Some(cpu.to_string().as_str()));
        }
    }

    /// Pages of `path` in the page cache (mincore over a mapping of it).
    fn resident_pages(path: &Path) -> (usize, usize) {
        let f = File::open(path).expect("open");
        let len = f.metadata().expect("stat").len() as usize;
        // SAFETY: a fresh read-only shared mapping of a file we opened, unmapped below.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                f.as_raw_fd(),
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        let pages = len.div_ceil(4096);
        let mut v = vec![0u8; pages];
        // SAFETY: `v` has one byte per page of the mapping.
        assert_eq!(unsafe { libc::mincore(p, len, v.as_mut_ptr()) }, 0);
        // SAFETY: unmaps the mapping made above.
        unsafe { libc::munmap(p, len) };
        (v.iter().filter(|&&b| b & 1 != 0).count(), pages)
    }

    /// Dirty data survives the drop (it is written back first), and the
    /// whole image is cached again afterwards.
    #[test]
    fn reset_page_cache_keeps_data_and_leaves_the_image_cached() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("img");
        let data: Vec<u8> = (0..4u32 << 20).map(|i| (i % 251) as u8).collect();
        fs::write(&img, &data).expect("write");
        reset_page_cache(&img).expect("reset");
        assert_eq!(fs::read(&img).expect("read"), data);
        let (cached, pages) = resident_pages(&img);
        assert_eq!(cached, pages, "image not fully cached after reset");
        assert!(reset_page_cache(&dir.path().join("missing")).is_err());
    }

    /// A fresh checkout has no `bench/out/`: the image's folder is made,
    /// and a second call finds the image already there.
    #[test]
    fn prepare_image_makes_its_folder() {
        let dir = tempfile::tempdir().expect("tempdir");
        let img = dir.path().join("out/sub/bench.img");
        prepare_image(&img, 3 << 20).expect("prepare");
        let m = fs::metadata(&img).expect("stat");
        assert_eq!(m.len(), 3 << 20);
        let before = m.modified().expect("mtime");
        prepare_image(&img, 3 << 20).expect("again");
        assert_eq!(fs::metadata(&img).expect("stat").modified().expect("mtime"), before);
    }
}
