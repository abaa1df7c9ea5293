//! The NBD server export driven by clients we did not write: `qemu-io` and
//! `qemu-img` from Debian's qemu-utils.
//!
//! The server runs in this process (`NbdServer::start`) over a `file` node
//! built with the same `--blockdev` code the daemon uses.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use blkstack::block::{BlockGraph, BlockNode};
use blkstack::config::blockdev;
use blkstack::nbd::{NbdAddr, NbdExportConfig, NbdServer, NbdServerConfig};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// A scratch directory on the target's disk-backed file system.
fn scratch(tag: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(tag).tempdir_in(env!("CARGO_TARGET_TMPDIR")).expect("scratch dir")
}

/// A sparse image file of `len` bytes.
fn image(dir: &Path, len: u64) -> PathBuf {
    let p = dir.join("disk.img");
    std::fs::File::create(&p).and_then(|f| f.set_len(len)).expect("create image");
    p
}

/// A server exporting a `file` node over `img` as "disk".
struct Served {
    server: NbdServer,
    sock: PathBuf,
    node: Arc<BlockNode>,
    _graph: BlockGraph,
}

impl Served {
    fn start(dir: &Path, img: &Path, writable: bool, max_connections: u32) -> Served {
        let sock = dir.join("nbd.sock");
        let graph = BlockGraph::new();
        let spec = json!({"driver": "file", "node-name": "f0", "filename": img, "discard": "unmap", "read-only": !writable});
        let node = blockdev::add(&graph, spec).expect("open the image");
        let server =
            NbdServer::start(NbdServerConfig { addr: NbdAddr::Unix(sock.clone()), max_connections }).expect("start");
        let cfg = NbdExportConfig { id: "n0".into(), name: "disk".into(), description: None, writable };
        server.add_export(cfg, node.clone()).expect("add export");
        Served { server, sock, node, _graph: graph }
    }

    fn uri(&self) -> String {
        format!("nbd+unix:///disk?socket={}", self.sock.display())
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.server.stop();
        self.server.wait_idle(Duration::from_secs(30));
    }
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
    let dir = scratch("nbd-io");
    let img = image(dir.path(), 4 * MIB);
    let s = Served::start(dir.path(), &img, true, 0);
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
    qemu_io(&uri, &["write -P 0x77 1000 3", "read -P 0x77 1000 3", "read -P 0 1003 1"]);
    let data = std::fs::read(&img).expect("read image");
    assert!(data[64 << 10..192 << 10].iter().all(|&b| b == 0));
    assert!(data[1000..1003].iter().all(|&b| b == 0x77));
    assert!(data[192 << 10..MIB as usize].iter().all(|&b| b == 0xab));
    assert!(data[MIB as usize..2 * MIB as usize].iter().all(|&b| b == 0xcd));
}

#[test]
fn qemu_img_map_shows_holes_from_block_status() {
    let dir = scratch("nbd-map");
    let img = image(dir.path(), 8 * MIB);
    let s = Served::start(dir.path(), &img, true, 0);
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
    let dir = scratch("nbd-cmp");
    let img = image(dir.path(), 16 * MIB);
    // A source with data, holes and an unaligned tail region.
    let src = dir.path().join("src.img");
    let (ok, out) = run("qemu-img", &["create", "-f", "raw", src.to_str().expect("utf-8 path"), "16M"]);
    assert!(ok, "{out}");
    let src_s = src.to_str().expect("utf-8 path");
    let (ok, out) = run(
        "qemu-io",
        &["-f", "raw", src_s, "-c", "write -P 0x5a 0 3M", "-c", "write -P 0xa5 8M 1M", "-c", "write -P 0x3c 15M 333"],
    );
    assert!(ok, "{out}");
    let s = Served::start(dir.path(), &img, true, 0);
    let uri = s.uri();
    // Something to overwrite: the convert must zero it (fast-zero or write-zeroes).
    qemu_io(&uri, &["write -P 0xff 4M 1M"]);
    let (ok, out) = run("qemu-img", &["convert", "-n", "-f", "raw", "-O", "raw", src_s, &uri]);
    assert!(ok, "qemu-img convert failed:\n{out}");
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // The export and the file it serves agree (-U: the server holds the image lock).
    let (ok, out) = run("qemu-img", &["compare", "-U", "-f", "raw", "-F", "raw", img.to_str().expect("utf-8 path"), &uri]);
    assert!(ok && out.contains("Images are identical"), "{out}");
    // And a difference is noticed.
    qemu_io(&uri, &["write -P 0x01 12M 512"]);
    let (ok, out) = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src_s, &uri]);
    assert!(!ok && out.contains("Content mismatch at offset 12582912"), "{out}");
}

#[test]
fn several_clients_at_once() {
    let dir = scratch("nbd-multi");
    let img = image(dir.path(), 8 * MIB);
    let s = Served::start(dir.path(), &img, true, 0);
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

#[test]
fn garbage_clients_are_dropped_while_another_keeps_working() {
    let dir = scratch("nbd-garbage");
    let img = image(dir.path(), 4 * MIB);
    let s = Served::start(dir.path(), &img, true, 0);
    let uri = s.uri();
    // A client that stalls mid-handshake holds a connection open.
    let mut stalled = UnixStream::connect(&s.sock).expect("connect");
    let mut greeting = [0u8; 18];
    stalled.read_exact(&mut greeting).expect("greeting");
    assert_eq!(&greeting[..8], b"NBDMAGIC");
    // Garbage instead of client flags and options.
    let mut garbage = UnixStream::connect(&s.sock).expect("connect");
    garbage.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    garbage.read_exact(&mut greeting).expect("greeting");
    garbage.write_all(&[0x5a; 4096]).expect("write garbage");
    let mut rest = Vec::new();
    let _ = garbage.read_to_end(&mut rest);
    assert!(rest.is_empty(), "no reply to garbage, just a closed connection");
    // An option claiming 4 GiB of data.
    let mut liar = UnixStream::connect(&s.sock).expect("connect");
    liar.set_read_timeout(Some(Duration::from_secs(30))).expect("timeout");
    liar.read_exact(&mut greeting).expect("greeting");
    let mut msg = 3u32.to_be_bytes().to_vec();
    msg.extend_from_slice(b"IHAVEOPT");
    msg.extend_from_slice(&7u32.to_be_bytes());
    msg.extend_from_slice(&u32::MAX.to_be_bytes());
    liar.write_all(&msg).expect("write");
    let mut b = [0u8; 1];
    assert!(matches!(liar.read(&mut b), Ok(0) | Err(_)), "dropped");
    // Meanwhile a real client works.
    qemu_io(&uri, &["write -P 0x42 0 1M", "read -P 0x42 0 1M"]);
    assert!(s.server.connections() >= 1, "the stalled client is still there");
    drop(stalled);
    qemu_io(&uri, &["read -P 0x42 512k 4k"]);
}

#[test]
fn read_only_export_and_max_connections() {
    let dir = scratch("nbd-ro");
    let img = image(dir.path(), 4 * MIB);
    std::fs::write(&img, vec![0x99u8; 4 * MIB as usize]).expect("fill image");
    let s = Served::start(dir.path(), &img, false, 1);
    let uri = s.uri();
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -P 0x99 0 4M"]);
    assert!(ok && out.contains("read 4194304/4194304"), "{out}");
    let (ok, out) = run("qemu-io", &["-f", "raw", &uri, "-c", "write -P 1 0 4k"]);
    // QEMU sees NBD_FLAG_READ_ONLY and refuses to open the export for writing.
    assert!(!ok && out.contains("Permission denied"), "{out}");
    assert!(std::fs::read(&img).expect("read image").iter().all(|&b| b == 0x99));
    // With max-connections=1 a second client is turned away while one is open.
    let mut first = UnixStream::connect(&s.sock).expect("connect");
    let mut g = [0u8; 18];
    first.read_exact(&mut g).expect("greeting");
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read 0 512"]);
    assert!(!ok, "a second client must be refused:\n{out}");
    drop(first);
    assert!(s.server.wait_idle(Duration::from_secs(30)));
    let (ok, out) = run("qemu-io", &["-r", "-f", "raw", &uri, "-c", "read -P 0x99 0 512"]);
    assert!(ok, "{out}");
    assert_eq!(s.node.users(), vec!["n0"]);
}

#[test]
fn tcp_export() {
    let dir = scratch("nbd-tcp");
    let img = image(dir.path(), 2 * MIB);
    let graph = BlockGraph::new();
    let node = blockdev::add(&graph, json!({"driver": "file", "node-name": "t0", "filename": img})).expect("open");
    let server = NbdServer::start(NbdServerConfig {
        addr: NbdAddr::Inet { host: "127.0.0.1".into(), port: 0 },
        max_connections: 0,
    })
    .expect("start");
    let cfg = NbdExportConfig { id: "e0".into(), name: "t0".into(), description: Some("tcp".into()), writable: true };
    server.add_export(cfg, node.clone()).expect("export");
    let port = server.inet_port().expect("port");
    let uri = format!("nbd://127.0.0.1:{port}/t0");
    qemu_io(&uri, &["write -P 0x10 0 2M", "read -P 0x10 0 2M"]);
    let (ok, out) = run("qemu-img", &["info", "--output=json", &uri]);
    assert!(ok && out.contains("\"virtual-size\": 2097152"), "{out}");
    // Removing the export detaches the node once no client is left.
    let (tx, rx) = std::sync::mpsc::channel();
    server.remove_export("t0", Box::new(move || tx.send(()).expect("send"))).expect("remove");
    rx.recv_timeout(Duration::from_secs(30)).expect("on_gone");
    assert!(node.users().is_empty());
    let (ok, _) = run("qemu-io", &["-f", "raw", &uri, "-c", "read 0 512"]);
    assert!(!ok, "the export is gone");
    server.stop();
}

