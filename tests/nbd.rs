//! The NBD server export driven by clients we did not write: `qemu-io` and
//! `qemu-img` from Debian's qemu-utils.
//!
//! Most tests start the real daemon (`blkstack serve --blockdev ...
//! --nbd-server ... --export type=nbd,...`); the last ones run `NbdServer`
//! in this process to check the export life cycle through its API.

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use blkstack::block::BlockGraph;
use blkstack::config::blockdev;
use blkstack::nbd::{NbdAddr, NbdExportConfig, NbdServer, NbdServerConfig};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A `blkstack serve` exporting a `file` node over an image as "disk".
struct Served {
    _daemon: common::Daemon,
    sock: PathBuf,
}

impl Served {
    /// `export_extra` and `server_extra` are appended to `--export` and `--nbd-server`.
    fn start(dir: &Path, img: &Path, export_extra: &str, server_extra: &str) -> Served {
        let sock = dir.join("nbd.sock");
        let args = vec![
            "--blockdev".to_string(),
            format!("driver=file,node-name=f0,filename={},discard=unmap", img.display()),
            "--nbd-server".to_string(),
            format!("addr.type=unix,addr.path={}{server_extra}", sock.display()),
            "--export".to_string(),
            format!("type=nbd,id=n0,node-name=f0,name=disk{export_extra}"),
        ];
        Served { _daemon: common::serve(dir, &args), sock }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }
}

/// A sparse image file of `len` bytes in a fresh scratch directory.
fn setup(tag: &str, len: u64) -> (PathBuf, PathBuf) {
    let dir = common::scratch(tag);
    let img = common::image(&dir, "disk.img", len);
    (dir, img)
}

/// Runs a qemu-utils tool; returns (success, stdout + stderr).
fn run(tool: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(tool)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {tool} (install Debian's qemu-utils): {e}"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// Runs `qemu-io -f raw URI -c CMD...` and asserts every command succeeded.
fn qemu_io(uri: &str, cmds: &[&str]) -> String {
    let mut args = vec!["-f", "raw", uri];
    for c in cmds {
        args.extend(["-c", c]);
    }
    let (ok, out) = run("qemu-io", &args);
    let bad = ["fail", "error", "Error", "Pattern verification"].iter().any(|w| out.contains(w));
    assert!(ok && !bad, "qemu-io {cmds:?} failed:\n{out}");
    out
}

/// `qemu-img map --output=json` as (start, length, data, zero) tuples.
fn map(uri: &str) -> Vec<(u64, u64, bool, bool)> {
    let (ok, out) = run("qemu-img", &["map", "--output=json", "-f", "raw", uri]);
    assert!(ok, "qemu-img map failed:\n{out}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("bad map JSON ({e}):\n{out}"));
    let entries = v.as_array().expect("map is a JSON array");
    let field = |e: &Value, k: &str| e[k].clone();
    let mut out: Vec<(u64, u64, bool, bool)> = Vec::new();
    for e in entries {
        let item = (
            field(e, "start").as_u64().expect("start"),
            field(e, "length").as_u64().expect("length"),
            field(e, "data").as_bool().expect("data"),
            field(e, "zero").as_bool().expect("zero"),
        );
        // Merge neighbours with the same state (qemu-img splits at its own limits).
        match out.last_mut() {
            Some(l) if l.0 + l.1 == item.0 && l.2 == item.2 && l.3 == item.3 => l.1 += item.1,
            _ => out.push(item),
        }
    }
    out
}

#[test]
fn qemu_io_writes_reads_discards_and_zeroes() {
    let (dir, img) = setup("nbd-io", 4 * MIB);
    let s = Served::start(&dir, &img, ",writable=on", "");
    let uri = s.uri();
    qemu_io(&uri, &["write -P 0xab 0 1M", "read -P 0xab 0 1M"]);
    qemu_io(
        &uri,
        &[
            "write -P 0xcd 1M 1M",
            "discard 0 64k",
            "write -z 64k 64k",
            "write -z -u 128k 64k",
            "aio_write -P 0x11 2M 512",
            "aio_write -P 0x22 3M 4k",
            "aio_flush",
            "read -P 0 64k 128k",
            "read -P 0xab 192k 832k",
            "read -P 0xcd 1M 1M",
            "read -P 0x11 2M 512",
            "read -P 0x22 3M 4k",
            "flush",
        ],
    );
    // An unaligned read-modify-write through the block layer.
    qemu_io(&uri, &["write -P 0x77 1000 3", "read -P 0x77 1000 3", "read -P 0 1003 1", "flush"]);
    let data = std::fs::read(&img).expect("read image");
    assert!(data[64 << 10..192 << 10].iter().all(|&b| b == 0));
    assert!(data[1000..1003].iter().all(|&b| b == 0x77));
    assert!(data[192 << 10..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(data[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0xcd));
}

#[test]
fn qemu_img_map_shows_holes_from_block_status() {
    let (dir, img) = setup("nbd-map", 8 * MIB);
    let s = Served::start(&dir, &img, ",writable=on", "");
    let uri = s.uri();
    assert_eq!(map(&uri), vec![(0, 8 * MIB, false, true)], "a fresh sparse image is one hole");
    qemu_io(&uri, &["write -P 1 1M 1M", "write -P 2 4M 2M", "flush"]);
    assert_eq!(
        map(&uri),
        vec![
            (0, MIB, false, true),
            (MIB, MIB, true, false),
            (2 * MIB, 2 * MIB, false, true),
            (4 * MIB, 2 * MIB, true, false),
            (6 * MIB, 2 * MIB, false, true),
        ]
    );
    qemu_io(&uri, &["discard 4M 1M"]);
    assert_eq!(
        map(&uri),
        vec![
            (0, MIB, false, true),
            (MIB, MIB, true, false),
            (2 * MIB, 3 * MIB, false, true),
            (5 * MIB, MIB, true, false),
            (6 * MIB, 2 * MIB, false, true),
        ],
        "the discarded range is a hole again"
    );
}

#[test]
fn qemu_img_convert_and_compare_against_the_image_file() {
    let (dir, img) = setup("nbd-cmp", 16 * MIB);
    // A source with data, holes and a short unaligned piece.
    let src = common::image(&dir, "src.img", 16 * MIB);
    let src_s = src.to_str().expect("utf-8 path");
    let (ok, out) = run(
        "qemu-io",
        &["-f", "raw", src_s, "-c", "write -P 0x5a 0 3M", "-c", "write -P 0xa5 8M 1M", "-c", "write -P 0x3c 15M 333"],
    );
    assert!(ok, "{out}");
    let s = Served::start(&dir, &img, ",writable=on", "");
    let uri = s.uri();
    // Something to overwrite: the convert must zero it (fast-zero or write-zeroes).
    qemu_io(&uri, &["write -P 0xff 4M 1M"]);
    let (ok, out) = run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]);
    assert!(ok, "qemu-img convert failed:\n{out}");
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // The export and the file it serves agree (-U: the daemon holds the image lock).
    let (ok, out) = run("qemu-img", &["compare", "-U", "-f", "raw", "-F", "raw", img.to_str().expect("utf-8 path"), &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // And a difference is noticed.
    qemu_io(&uri, &["write -P 0x01 12M 512"]);
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert!(!ok && out.contains("Content mismatch at offset 12582912"), "{out}");
}

#[test]
fn several_clients_at_once() {
    let (dir, img) = setup("nbd-multi", 8 * MIB);
    let s = Served::start(&dir, &img, ",writable=on", "");
    let uri = s.uri();
    let handles: Vec<_> = (0..4u64)
        .map(|i| {
            let uri = uri.clone();
            std::thread::spawn(move || {
                let w = format!("write -P {} {}M 2M", i + 1, 2 * i);
                let r = format!("read -P {} {}M 2M", i + 1, 2 * i);
                qemu_io(&uri, &[&w, "flush", &r]);
            })
        })
        .collect();
    for h in handles {
        h.join().expect("client thread");
    }
    let data = std::fs::read(&img).expect("read image");
    for i in 0..4usize {
        let part = &data[2 * i * MIB as usize..2 * (i + 1) * MIB as usize];
        assert!(part.iter().all(|&b| b == i as u8 + 1), "region {i}");
    }
}

/// Connects and reads the 18-byte greeting.
fn greeted(sock: &Path) -> UnixStream {
    let mut c = UnixStream::connect(sock).expect("connect");
    c.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    let mut g = [0u8; 18];
    c.read_exact(&mut g).expect("greeting");
    assert_eq!(&g[..16], b"NBDMAGICIHAVEOPT");
    c
}

/// True once the server has closed the connection.
fn closed(c: &mut UnixStream) -> bool {
    let mut rest = Vec::new();
    matches!(c.read_to_end(&mut rest), Ok(0) | Err(_))
}

/// Sends client flags and `NBD_OPT_GO` for `name`; reads replies up to the ACK.
fn go(c: &mut UnixStream, name: &str) {
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32 + 6).to_be_bytes());
    msg.extend_from_slice(&(name.len() as u32).to_be_bytes());
    msg.extend_from_slice(name.as_bytes());
    msg.extend_from_slice(&0u16.to_be_bytes());
    c.write_all(&msg).expect("go");
    loop {
        let mut h = [0u8; 20];
        c.read_exact(&mut h).expect("option reply");
        let kind = u32::from_be_bytes([h[12], h[13], h[14], h[15]]);
        let len = u32::from_be_bytes([h[16], h[17], h[18], h[19]]) as usize;
        let mut data = vec![0u8; len];
        c.read_exact(&mut data).expect("option reply data");
        assert_eq!(kind & (1 << 31), 0, "GO failed: {}", String::from_utf8_lossy(&data));
        if kind == 1 {
            return;
        }
    }
}

/// Sends client flags and `NBD_OPT_ABORT`, expects the ACK and the close.
fn abort(c: &mut UnixStream) {
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&2u32.to_be_bytes());
    msg.extend_from_slice(&0u32.to_be_bytes());
    c.write_all(&msg).expect("abort");
    let mut r = [0u8; 20];
    c.read_exact(&mut r).expect("abort reply");
    assert_eq!(u32::from_be_bytes([r[12], r[13], r[14], r[15]]), 1, "NBD_REP_ACK");
    assert!(closed(c));
}

#[test]
fn garbage_clients_are_dropped_while_another_keeps_working() {
    let (dir, img) = setup("nbd-garbage", 4 * MIB);
    let s = Served::start(&dir, &img, ",writable=on", "");
    let uri = s.uri();
    // A client that stalls mid-handshake holds a connection open.
    let mut stalled = greeted(&s.sock);
    // Garbage instead of client flags and options.
    let mut garbage = greeted(&s.sock);
    garbage.write_all(&[0x5a; 4096]).expect("write garbage");
    assert!(closed(&mut garbage), "no reply to garbage, just a closed connection");
    // An option claiming 4 GiB of data.
    let mut liar = greeted(&s.sock);
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    liar.write_all(&msg).expect("write");
    assert!(closed(&mut liar));
    // A client that lies about a write's length after a real handshake.
    let mut big = greeted(&s.sock);
    go(&mut big, "disk");
    let mut req = 0x2560_9513u32.to_be_bytes().to_vec();
    req.extend_from_slice(&[0, 0, 0, 1]); // no flags, NBD_CMD_WRITE
    req.extend_from_slice(&[0; 16]); // cookie, offset
    req.extend_from_slice(&u32::MAX.to_be_bytes());
    big.write_all(&req).expect("request");
    assert!(closed(&mut big), "a 4 GiB write is not read, the client is dropped");
    qemu_io(&uri, &["write -P 0x42 0 1M", "read -P 0x42 0 1M"]);
    // Meanwhile the stalled client can still finish its handshake normally.
    abort(&mut stalled);
    qemu_io(&uri, &["read -P 0x42 512k 4k"]);
}

#[test]
fn read_only_export_and_max_connections() {
    let (dir, img) = setup("nbd-ro", 4 * MIB);
    std::fs::write(&img, vec![0x99u8; 4 * MIB as usize]).expect("fill image");
    let s = Served::start(&dir, &img, ",writable=off", ",max-connections=1");
    let uri = s.uri();
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -P 0x99 0 4M"]);
    assert!(ok && out.contains("read 4194304/4194304"), "{out}");
    let (ok, out) = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    // QEMU sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!ok && out.contains("Permission denied"), "{out}");
    assert!(std::fs::read(&img).expect("read image").iter().all(|&b| b == 0x99));
    // With max-connections=1 a second client is turned away while one is open.
    let mut first = greeted(&s.sock);
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read 0 512"]);
    assert!(!ok, "a second client must be refused:\n{out}");
    // Once the first one has gone (the server frees the slot before closing), a client gets in.
    abort(&mut first);
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -P 0x99 0 512"]);
    assert!(ok, "{out}");
}

#[test]
fn tcp_export() {
    let (dir, img) = setup("nbd-tcp", 2 * MIB);
    let port = std::net::TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).expect("free port").port();
    let args = vec![
        "--blockdev".to_string(),
        format!("driver=file,node-name=t0,filename={}", img.display()),
        "--nbd-server".to_string(),
        format!("addr.type=inet,addr.host=127.0.0.1,addr.port={port}"),
        "--export".to_string(),
        "type=nbd,id=e0,node-name=t0,writable=on,description=tcp".to_string(),
    ];
    let _daemon = common::serve(&dir, &args);
    // The export name defaults to the node-name.
    let uri = format!("nbd://127.0.0.1:{port}/t0");
    qemu_io(&uri, &["write -P 0x10 0 2M", "read -P 0x10 0 2M"]);
    let (ok, out) = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(ok && out.contains("\"virtual-size\": 2097152"), "{out}");
}

// ---- the export life cycle through the API, in this process -----------------

#[test]
fn removing_an_export_detaches_the_node_once_clients_are_gone() {
    let dir = common::scratch("nbd-api");
    let img = common::image(&dir, "disk.img", 2 * MIB);
    let sock = dir.join("api.sock");
    let graph = BlockGraph::new();
    let node = blockdev::add(&graph, json!({"driver": "file", "node-name": "a0", "filename": img})).expect("open");
    let server =
        NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(sock.clone()), max_connections: 0 }).expect("start");
    let cfg = NbdExportConfig { id: "e0".into(), name: "a0".into(), description: None, writable: true };
    server.add_export(cfg, node.clone()).expect("export");
    assert_eq!(node.users(), vec!["e0"]);
    let uri = format!("nbd+unix:///a0?socket={}", sock.display());
    qemu_io(&uri, &["write -P 0x10 0 1M", "read -P 0x10 0 1M"]);
    // A client in the middle of its handshake is not a client of the export.
    let mut pending = greeted(&sock);
    let (tx, rx) = std::sync::mpsc::channel();
    server.remove_export("a0", Box::new(move || tx.send(()).expect("send"))).expect("remove");
    rx.recv_timeout(Duration::from_secs(30)).expect("on_gone");
    assert!(node.users().is_empty());
    assert!(server.export_names().is_empty());
    let (ok, _) = run("qemu-io", &["-f", "raw", &uri, "-c", "read 0 512"]);
    assert!(!ok, "the export is gone");
    server.stop();
    assert!(closed(&mut pending), "stop closes connections still in the handshake");
    assert!(!sock.exists(), "stop removes the socket file");
    assert!(server.wait_idle(Duration::from_secs(30)));
}
