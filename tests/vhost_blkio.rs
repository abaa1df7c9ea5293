//! The vhost-user-blk export driven by a real frontend: libblkio's
//! `virtio-blk-vhost-user` driver against the real `blkstack serve` binary.

mod common;

use std::collections::VecDeque;
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::Duration;

use blkio::{Completion, ReqFlags};
use common::*;
use rand::{Rng, SeedableRng};

const MIB: u64 = 1 << 20;

fn file_node(img: &Path, extra: &str) -> String {
    format!("driver=file,node-name=f0,filename={}{extra}", img.display())
}

fn args(blockdevs: &[String], export: String, more: Vec<String>) -> Vec<String> {
    let mut a = Vec::new();
    for b in blockdevs {
        a.push("--blockdev".to_string());
        a.push(b.clone());
    }
    a.push("--export".into());
    a.push(export);
    a.extend(more);
    a
}

struct InFlight {
    q: usize,
    slot: usize,
    off: u64,
    len: usize,
    write: bool,
}

/// How the integrity run shapes its requests and its export.
#[derive(Clone, Copy)]
struct Mix {
    cache_direct: bool,
    /// Extra export options (e.g. `,poll-us=50`).
    export: &'static str,
    /// Request granularity in sectors and the largest request in units of it:
    /// 1 × 2048 gives 512 B – 1 MiB anywhere; 8 × 16 gives page-aligned
    /// 4–64 KiB requests, the ones buffered writes take inline.
    unit: u64,
    max_units: usize,
}

const MIXED: Mix = Mix { cache_direct: false, export: "", unit: 1, max_units: 2048 };

/// 4 queues × QD 32 of random reads and writes, checked against a model of
/// the disk; in-flight requests never overlap a write in flight, so the model
/// stays exact. Afterwards the whole disk and the image are checked.
fn integrity(mix: Mix) {
    let Mix { cache_direct, .. } = mix;
    let dir = scratch("integrity");
    let size = 64 * MIB;
    let img = image(&dir, "disk.img", size);
    let sock = dir.join("vhost.sock");
    let extra = if cache_direct { ",cache.direct=on" } else { "" };
    let export = format!("writable=on,num-queues=4{}", mix.export);
    let mut d = serve(&dir, &args(&[file_node(&img, extra)], vhost_export(&sock, "f0", &export), vec![]));
    let (queues, depth, slot) = (4usize, 32usize, MIB as usize);
    let mut c = connect(&sock, queues as i32, queues * depth * slot);
    assert_eq!(c.capacity, size);
    let mut model = vec![0u8; size as usize];
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xb1c5);
    let mut free: Vec<Vec<usize>> = (0..queues).map(|_| (0..depth).collect()).collect();
    let mut inflight: Vec<Option<InFlight>> = (0..queues * depth).map(|_| None).collect();
    let base = c.region.addr;
    let (mut submitted, mut completed, total) = (0usize, 0usize, 3000usize);
    let mut pending: VecDeque<usize> = VecDeque::new();
    while completed < total {
        for (q, free) in free.iter_mut().enumerate() {
            while submitted < total && !free.is_empty() {
                let unit = mix.unit * 512;
                let len = rng.gen_range(1..=mix.max_units) * unit as usize;
                let off = rng.gen_range(0..=(size - len as u64) / unit) * unit;
                let write = rng.gen_bool(0.5);
                let conflict = inflight.iter().flatten().any(|f| (write || f.write) && f.off < off + len as u64 && off < f.off + f.len as u64);
                if conflict {
                    break;
                }
                let s = free.pop().unwrap_or_default();
                let id = q * depth + s;
                let ptr = (base + id * slot) as *mut u8;
                if write {
                    // SAFETY: slot `id` of the mapped region is ours until completion.
                    let b = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
                    rng.fill(b);
                    model[off as usize..off as usize + len].copy_from_slice(b);
                    c.queues[q].write(off, ptr, len, id, ReqFlags::empty());
                } else {
                    c.queues[q].read(off, ptr, len, id, ReqFlags::empty());
                }
                inflight[id] = Some(InFlight { q, slot: s, off, len, write });
                submitted += 1;
            }
        }
        let mut comps = [const { MaybeUninit::<Completion>::uninit() }; 64];
        let mut any = 0;
        for q in 0..queues {
            let n = c.queues[q].do_io(&mut comps, 0, None, None).expect("do_io");
            any += n;
            for cm in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let cm = unsafe { cm.assume_init_read() };
                assert_eq!(cm.ret, 0, "request {} failed: {}", cm.user_data, cm.ret);
                pending.push_back(cm.user_data);
            }
        }
        if any == 0 {
            // Nothing completed yet: block on a queue that has requests in flight.
            let q = (0..queues).find(|&q| free[q].len() < depth).unwrap_or(0);
            let mut t = Duration::from_secs(30);
            let n = c.queues[q].do_io(&mut comps, 1, Some(&mut t), None).expect("do_io");
            assert!(n > 0, "no completion within 30 s");
            for cm in &comps[..n] {
                // SAFETY: do_io initialised the first n completions.
                let cm = unsafe { cm.assume_init_read() };
                assert_eq!(cm.ret, 0, "request {} failed: {}", cm.user_data, cm.ret);
                pending.push_back(cm.user_data);
            }
        }
        while let Some(id) = pending.pop_front() {
            let f = inflight[id].take().expect("completion for a request in flight");
            if !f.write {
                // SAFETY: the read into slot `id` has completed.
                let b = unsafe { std::slice::from_raw_parts((base + id * slot) as *const u8, f.len) };
                assert!(b == &model[f.off as usize..f.off as usize + f.len], "read of {} bytes at {} returned wrong data", f.len, f.off);
            }
            free[f.q].push(f.slot);
            completed += 1;
        }
    }
    for off in (0..size).step_by(MIB as usize) {
        assert_eq!(c.read(off, MIB as usize), 0);
        assert!(c.buf()[..MIB as usize] == model[off as usize..(off + MIB) as usize], "final read at {off}");
    }
    assert_eq!(c.flush(), 0);
    drop(c);
    d.stop();
    let data = std::fs::read(&img).expect("read image");
    assert!(data == model, "the image file differs from the model");
}

#[test]
fn data_integrity_four_queues_buffered() {
    integrity(MIXED);
}

#[test]
fn data_integrity_four_queues_o_direct() {
    integrity(Mix { cache_direct: true, ..MIXED });
}

#[test]
fn data_integrity_four_queues_page_aligned_buffered_writes() {
    integrity(Mix { unit: 8, max_units: 16, ..MIXED });
}

#[test]
fn data_integrity_four_queues_polling() {
    integrity(Mix { export: ",poll-us=50", ..MIXED });
    integrity(Mix { export: ",poll-us=50", unit: 8, max_units: 16, ..MIXED });
}

/// The other tests run with the default adaptive polling; these never poll,
/// and poll with a window that grows and shrinks in big steps.
#[test]
fn data_integrity_four_queues_without_and_with_coarse_adaptive_polling() {
    integrity(Mix { export: ",poll-max-ns=0", ..MIXED });
    integrity(Mix { export: ",poll-max-ns=1000000,poll-grow=16,poll-shrink=4", unit: 8, max_units: 16, ..MIXED });
}

#[test]
fn flush_reaches_the_backend() {
    let dir = scratch("flush");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let qmp = dir.join("qmp.sock");
    let _d = serve(&dir, &args(&[file_node(&img, "")], vhost_export(&sock, "f0", "writable=on"), monitor_args(&qmp)));
    let mut c = connect(&sock, 1, MIB as usize);
    assert_eq!(c.write_pattern(0, 4096, 0x5a), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.write_pattern(4096, 4096, 0x5b), 0);
    let mut q = Qmp::connect(&qmp);
    let s = q.stats("f0");
    assert_eq!(s["flush_operations"], 2, "{s}");
    assert_eq!(s["wr_operations"], 2, "{s}");
    assert_eq!(s["wr_bytes"], 8192, "{s}");
}

#[test]
fn fua_write_is_accepted_and_durable_in_the_file() {
    let dir = scratch("fua");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let mut d = serve(&dir, &args(&[file_node(&img, "")], vhost_export(&sock, "f0", "writable=on"), vec![]));
    let mut c = connect(&sock, 1, MIB as usize);
    c.buf()[..4096].fill(0x42);
    assert_eq!(c.write(8192, 4096, ReqFlags::FUA), 0);
    d.kill();
    let mut b = [0u8; 4096];
    std::fs::File::open(&img).expect("image").read_exact_at(&mut b, 8192).expect("read");
    assert!(b.iter().all(|&x| x == 0x42));
}

fn is_hole(img: &Path, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(img).expect("image");
    // SAFETY: lseek on a file we own.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as i64, libc::SEEK_DATA) };
    data < 0 || data as u64 >= off + len
}

#[test]
fn discard_and_write_zeroes_read_back_zeroes() {
    let dir = scratch("discard");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let mut d = serve(&dir, &args(&[file_node(&img, ",discard=unmap")], vhost_export(&sock, "f0", "writable=on"), vec![]));
    let mut c = connect(&sock, 1, 4 * MIB as usize);
    assert_eq!(c.write_pattern(0, 4 * MIB as usize, 0xee), 0);
    assert_eq!(c.flush(), 0);
    assert_eq!(c.discard(MIB, MIB), 0);
    c.expect_pattern(MIB, MIB as usize, 0);
    c.expect_pattern(0, MIB as usize, 0xee);
    assert_eq!(c.write_zeroes(2 * MIB, 512 * 1024, false), 0);
    c.expect_pattern(2 * MIB, 512 * 1024, 0);
    assert_eq!(c.write_zeroes(3 * MIB, 512 * 1024, true), 0);
    c.expect_pattern(3 * MIB, 512 * 1024, 0);
    c.expect_pattern(3 * MIB + 512 * 1024, 512 * 1024, 0xee);
    drop(c);
    d.stop();
    assert!(is_hole(&img, MIB, MIB), "the discarded range is not a hole in the image");
    assert!(is_hole(&img, 3 * MIB, 512 * 1024), "write-zeroes with unmap left data");
}

#[test]
fn read_only_export_rejects_writes() {
    let dir = scratch("ro");
    let img = image(&dir, "disk.img", 16 * MIB);
    std::fs::OpenOptions::new().write(true).open(&img).expect("img").write_all_at(&[0x77; 4096], 0).expect("seed");
    let sock = dir.join("vhost.sock");
    let _d = serve(&dir, &args(&[file_node(&img, ",read-only=on")], vhost_export(&sock, "f0", "writable=off"), vec![]));
    // The device says it is read-only (VIRTIO_BLK_F_RO): libblkio refuses a
    // read-write connection. (The export's own refusal of write requests is
    // unit-tested on mock queues in src/vhost.)
    assert!(try_connect(&sock, 1, MIB as usize).is_err());
    let mut c = try_connect_opts(&sock, 1, MIB as usize, true).unwrap_or_else(|e| panic!("read-only connect: {e}"));
    assert!(c.read_only);
    c.expect_pattern(0, 4096, 0x77);
    assert!(c.write_pattern(0, 4096, 1) < 0, "a write to a read-only export succeeded");
    assert!(c.write_zeroes(0, 4096, false) < 0);
    c.expect_pattern(0, 4096, 0x77);
}

#[test]
fn out_of_range_requests_fail_and_the_connection_survives() {
    let dir = scratch("range");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let _d = serve(&dir, &args(&[file_node(&img, "")], vhost_export(&sock, "f0", "writable=on,num-queues=2"), vec![]));
    let mut c = connect(&sock, 2, MIB as usize);
    assert!(c.read(16 * MIB, 512) < 0);
    assert!(c.read(16 * MIB - 512, 1024) < 0);
    assert!(c.write_pattern(16 * MIB - 512, 4096, 1) < 0);
    assert!(c.discard(16 * MIB, 512) < 0);
    assert_eq!(c.write_pattern(16 * MIB - 4096, 4096, 9), 0);
    c.expect_pattern(16 * MIB - 4096, 4096, 9);
}

#[test]
fn reconnect_keeps_data_and_a_second_frontend_is_refused() {
    let dir = scratch("reconnect");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let _d = serve(&dir, &args(&[file_node(&img, "")], vhost_export(&sock, "f0", "writable=on,num-queues=2"), vec![]));
    let mut c = connect(&sock, 2, MIB as usize);
    assert_eq!(c.write_pattern(MIB, 8192, 0x31), 0);
    assert!(try_connect(&sock, 1, MIB as usize).is_err(), "a second frontend was accepted");
    c.expect_pattern(MIB, 8192, 0x31);
    drop(c);
    for round in 0..3u8 {
        let mut c = connect(&sock, 2, MIB as usize);
        c.expect_pattern(MIB, 8192, 0x31 + round);
        assert_eq!(c.write_pattern(MIB, 8192, 0x32 + round), 0);
    }
}

/// The `Cpus_allowed_list` of a /proc status file.
fn cpus_allowed(status: &Path) -> String {
    let text = std::fs::read_to_string(status).unwrap_or_default();
    text.lines().find_map(|l| l.strip_prefix("Cpus_allowed_list:")).unwrap_or("").trim().to_string()
}

#[test]
fn queue_threads_run_on_the_cpus_asked_for() {
    // This process's CPUs (the daemon inherits them): queue 0 asks for the
    // last, queue 1 for the first (the same CPU on a one-CPU machine).
    let mine = cpus_allowed(Path::new("/proc/self/status"));
    let first_and_last = |list: &str| -> Option<(u32, u32)> {
        let nums: Vec<u32> = list.split([',', '-']).map(|n| n.parse().ok()).collect::<Option<_>>()?;
        Some((*nums.first()?, *nums.last()?))
    };
    let (first, last) = first_and_last(&mine).unwrap_or_else(|| panic!("cannot read this process's CPUs: '{mine}'"));
    let dir = scratch("affinity");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    // The dotted form doubles a comma inside a value.
    let export = vhost_export(&sock, "f0", &format!("writable=on,num-queues=2,cpu-affinity={last},,{first}"));
    let d = serve(&dir, &args(&[file_node(&img, "")], export, vec![]));
    let mut c = connect(&sock, 2, MIB as usize);
    // A queue's thread sets itself up (and pins itself) on its first request.
    assert_eq!(c.read_on(0, 0, 4096), 0);
    assert_eq!(c.read_on(1, 4096, 4096), 0);
    let mut pinned: Vec<String> = std::fs::read_dir(format!("/proc/{}/task", d.pid))
        .expect("the daemon's threads")
        .filter_map(|t| t.ok().map(|t| t.path()))
        .filter(|t| std::fs::read_to_string(t.join("comm")).is_ok_and(|c| c.trim() == "vring_worker"))
        .map(|t| cpus_allowed(&t.join("status")))
        .collect();
    pinned.sort();
    let mut want = vec![last.to_string(), first.to_string()];
    want.sort();
    assert_eq!(pinned, want, "queue threads' CPUs (this process may use {mine})");
    // Every other thread keeps the daemon's CPUs.
    assert_eq!(cpus_allowed(Path::new(&format!("/proc/{}/status", d.pid))), mine);
}

#[test]
fn null_export_reads_zeroes() {
    let dir = scratch("null");
    let sock = dir.join("vhost.sock");
    let _d = serve(&dir, &args(&["driver=null-co,node-name=n0,size=64M,read-zeroes=on".into()], vhost_export(&sock, "n0", "writable=on"), vec![]));
    let mut c = connect(&sock, 1, MIB as usize);
    assert_eq!(c.capacity, 64 * MIB);
    assert_eq!(c.write_pattern(0, 4096, 0xff), 0);
    c.buf()[..4096].fill(0xff);
    c.expect_pattern(0, 4096, 0);
}

#[test]
fn raw_with_offset_maps_into_the_file() {
    let dir = scratch("raw");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let raw = format!("driver=raw,node-name=r0,offset=1M,size=8M,file.driver=file,file.filename={}", img.display());
    let mut d = serve(&dir, &args(&[raw], vhost_export(&sock, "r0", "writable=on"), vec![]));
    let mut c = connect(&sock, 1, MIB as usize);
    assert_eq!(c.capacity, 8 * MIB);
    assert_eq!(c.write_pattern(0, 4096, 0xab), 0);
    assert!(c.read(8 * MIB, 512) < 0);
    drop(c);
    d.stop();
    let mut b = [0u8; 4096];
    let f = std::fs::File::open(&img).expect("image");
    f.read_exact_at(&mut b, MIB).expect("read");
    assert!(b.iter().all(|&x| x == 0xab));
    f.read_exact_at(&mut b, 0).expect("read");
    assert!(b.iter().all(|&x| x == 0));
}

#[test]
fn logical_block_size_4k_is_advertised() {
    let dir = scratch("lbs");
    let img = image(&dir, "disk.img", 16 * MIB);
    let sock = dir.join("vhost.sock");
    let _d = serve(&dir, &args(&[file_node(&img, "")], vhost_export(&sock, "f0", "writable=on,logical-block-size=4096"), vec![]));
    let mut b = blkio::Blkio::new("virtio-blk-vhost-user").expect("blkio");
    b.set_str("path", &sock.to_string_lossy()).expect("path");
    b.connect().expect("connect");
    assert_eq!(b.get_i32("request-alignment").expect("request-alignment"), 4096);
}
