//! `blkstack serve` command lines: qemu-storage-daemon style lines are
//! accepted; each kind of bad line is refused with a message naming the key,
//! exit code 1, and nothing left behind (no socket, no pidfile, no lock).

mod common;

use std::path::Path;
use std::process::Command;

use common::*;

fn run_bad(dir: &Path, args: &[&str]) -> String {
    let pidfile = dir.join("bad.pid");
    let out = Command::new(env!("CARGO_BIN_EXE_blkstack")).arg("serve").args(args).arg("--pidfile").arg(&pidfile).output().expect("run blkstack");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    assert_eq!(out.status.code(), Some(1), "expected exit 1 for {args:?}; stderr: {stderr}");
    assert!(!pidfile.exists(), "a failed start left a pidfile");
    stderr
}

#[test]
fn qsd_style_lines_are_accepted() {
    let dir = scratch("cli-ok");
    let img = image(&dir, "disk.img", 8 << 20);
    let sock = dir.join("v.sock");
    let nbd = dir.join("nbd.sock");
    let args: Vec<String> = vec![
        "--blockdev".into(),
        format!("driver=file,node-name=f0,filename={},cache.direct=off,aio=io_uring,locking=on,discard=unmap,detect-zeroes=on", img.display()),
        "--blockdev".into(),
        r#"{"driver": "raw", "node-name": "r0", "file": "f0", "offset": 4096}"#.into(),
        "--nbd-server".into(),
        format!("addr.type=unix,addr.path={}", nbd.display()),
        "--export".into(),
        format!("type=vhost-user-blk,id=e0,node-name=r0,addr.type=unix,addr.path={},writable=on,num-queues=2,logical-block-size=512,queue-size=128,serial=blk0", sock.display()),
        "--export".into(),
        "type=nbd,id=n0,node-name=f0,name=disk".into(),
    ];
    let mut d = serve(&dir, &args);
    assert!(sock.exists() && nbd.exists());
    d.stop();
    assert!(!sock.exists(), "the vhost-user socket was not removed at exit");
}

#[test]
fn config_file_is_accepted() {
    let dir = scratch("cli-config");
    let img = image(&dir, "disk.img", 8 << 20);
    let sock = dir.join("v.sock");
    let cfg = serde_json::json!({
        "blockdev": [{"driver": "file", "node-name": "f0", "filename": img}],
        "export": [{"type": "vhost-user-blk", "id": "e0", "node-name": "f0", "addr": {"type": "unix", "path": sock}, "writable": true}]
    });
    let path = dir.join("cfg.json");
    std::fs::write(&path, cfg.to_string()).expect("write config");
    let mut d = serve(&dir, &["--config".into(), path.display().to_string()]);
    let c = connect(&sock, 1, 1 << 20);
    assert_eq!(c.capacity, 8 << 20);
    drop(c);
    d.stop();
}

#[test]
fn bad_lines_are_refused_naming_the_key() {
    let dir = scratch("cli-bad");
    let img = image(&dir, "disk.img", 8 << 20);
    let sock = dir.join("v.sock");
    let file = format!("driver=file,node-name=f0,filename={}", img.display());
    let exp = |extra: &str| format!("type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={}{extra}", sock.display());
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--blockdev".into(), format!("{file},bogus=1")], "bogus"),
        (vec!["--blockdev".into(), "driver=file,node-name=f0".into()], "filename"),
        (vec!["--blockdev".into(), format!("{file},cache.direct=perhaps")], "cache.direct"),
        (vec!["--blockdev".into(), "driver=qcow9,node-name=f0".into()], "driver"),
        (vec!["--blockdev".into(), "{not json".into()], "JSON"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",num-queues=0")], "num-queues"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",logical-block-size=1000")], "logical-block-size"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",writable=yesplease")], "writable"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",speed=fast")], "speed"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",cpu-affinity=3-1")], "cpu-affinity"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp(",cpu-affinity=1023")], "cpu-affinity"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), exp("").replace("node-name=f0", "node-name=nope")], "nope"),
        (vec!["--blockdev".into(), file.clone(), "--export".into(), "type=nbd,id=n0,node-name=f0".into()], "nbd-server"),
        (vec!["--blockdev".into(), file.clone(), "--monitor".into(), "chardev=m9".into()], "m9"),
        (vec!["--config".into(), dir.join("missing.json").display().to_string()], "missing.json"),
    ];
    for (args, key) in cases {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        let err = run_bad(&dir, &a);
        assert!(err.contains(key), "{args:?}: message does not name '{key}': {err}");
        assert!(!sock.exists(), "{args:?} left the socket behind");
    }
    // A failed start released its image lock: a good start works now.
    let mut d = serve(&dir, &["--blockdev".into(), file, "--export".into(), exp(",writable=on")]);
    d.stop();
}

#[test]
fn second_daemon_on_the_same_image_gets_a_lock_error() {
    let dir = scratch("cli-lock");
    let img = image(&dir, "disk.img", 8 << 20);
    let file = format!("driver=file,node-name=f0,filename={}", img.display());
    let first_sock = dir.join("a.sock");
    let mut d = serve(&dir, &["--blockdev".into(), file.clone(), "--export".into(), vhost_export(&first_sock, "f0", "writable=on")]);
    let other = dir.join("other");
    std::fs::create_dir_all(&other).expect("dir");
    let err = run_bad(&other, &["--blockdev", &file]);
    assert!(err.contains("\"write\" lock"), "{err}");
    d.stop();
}

#[test]
fn help_documents_the_options() {
    let out = Command::new(env!("CARGO_BIN_EXE_blkstack")).args(["serve", "--help"]).output().expect("run");
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["--blockdev", "--export", "--nbd-server", "--chardev", "--monitor", "--pidfile", "--daemonize", "--config"] {
        assert!(text.contains(opt), "serve --help lacks {opt}");
    }
}

/// `blkstack bench` runs the `blkstack-bench` program built beside it, with
/// its arguments, and its own help reaches the user.
#[test]
fn bench_subcommand_runs_the_bench_program() {
    let out = Command::new(env!("CARGO_BIN_EXE_blkstack")).args(["bench", "--help"]).output().expect("run");
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    for opt in ["Usage: blkstack bench", "--socket", "--iodepth", "--server-pid", "compare"] {
        assert!(text.contains(opt), "bench --help lacks {opt}: {text}");
    }
    let out = Command::new(env!("CARGO_BIN_EXE_blkstack")).args(["bench", "--rw", "sideways"]).output().expect("run");
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("sideways"), "{err}");
}

/// `blkstack serve` of `img` over vhost-user-blk at `sock`, writing `pidfile`.
fn serve_cmd(img: &Path, sock: &Path, pidfile: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_blkstack"));
    cmd.args(["serve", "--blockdev", &format!("driver=file,node-name=f0,filename={}", img.display())])
        .args(["--export", &vhost_export(sock, "f0", "writable=on")])
        .arg("--pidfile")
        .arg(pidfile)
        .stderr(std::process::Stdio::null());
    cmd
}

/// Spawns `cmd` and waits until it has written `pidfile`, which `serve`
/// does once every export is listening.
fn spawn_serving(cmd: &mut Command, pidfile: &Path) -> std::process::Child {
    let mut child = cmd.spawn().expect("spawn");
    let mut waited = 0;
    while !pidfile.exists() {
        assert!(waited < 2000, "blkstack did not come up");
        assert!(child.try_wait().expect("try_wait").is_none(), "blkstack exited early");
        std::thread::sleep(std::time::Duration::from_millis(5));
        waited += 1;
    }
    child
}

#[test]
fn sigterm_drains_flushes_and_exits_zero() {
    let dir = scratch("cli-term");
    let img = image(&dir, "disk.img", 8 << 20);
    let sock = dir.join("v.sock");
    let pidfile = dir.join("p.pid");
    let mut child = spawn_serving(&mut serve_cmd(&img, &sock, &pidfile), &pidfile);
    let mut c = connect(&sock, 1, 1 << 20);
    assert_eq!(c.write_pattern(0, 65536, 0x6c), 0);
    drop(c);
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    assert_eq!(status.code(), Some(0), "blkstack did not exit 0 on SIGTERM");
    assert!(!pidfile.exists(), "pidfile left behind");
    let data = std::fs::read(&img).expect("image");
    assert!(data[..65536].iter().all(|&b| b == 0x6c));
}

/// `serve` raises its soft open-file limit to the hard one: every queue
/// holds several descriptors, and 1024 is soon spent.
#[test]
fn serve_raises_the_open_file_soft_limit() {
    use std::os::unix::process::CommandExt;
    let dir = scratch("cli-nofile");
    let img = image(&dir, "disk.img", 1 << 20);
    let sock = dir.join("v.sock");
    let pidfile = dir.join("p.pid");
    let mut cmd = serve_cmd(&img, &sock, &pidfile);
    // SAFETY: the closure only calls setrlimit, which is async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
            libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
            lim.rlim_cur = 256.min(lim.rlim_max);
            lim.rlim_max = lim.rlim_max.min(4096);
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = spawn_serving(&mut cmd, &pidfile);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", child.id())).expect("limits");
    let line = limits.lines().find(|l| l.starts_with("Max open files")).expect("open files line").to_string();
    // SAFETY: kill(2) on our child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(child.wait().expect("wait").code(), Some(0));
    let nums: Vec<&str> = line.split_whitespace().filter(|w| w.chars().all(|c| c.is_ascii_digit())).collect();
    assert_eq!(nums.len(), 2, "{line}");
    assert_eq!(nums[0], nums[1], "soft limit not raised to the hard one: {line}");
    let mut own = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: getrlimit writes the struct we pass.
    assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut own) }, 0);
    assert_eq!(nums[1].parse::<u64>().expect("number"), own.rlim_max.min(4096), "{line}");
}
