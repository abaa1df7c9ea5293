//! What `bench compare` runs: the workloads of issue 12 and, for each, the
//! backends (with their options) it runs them against.

use crate::bench::args::RwMode;

/// What the export sits on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// The page-cached image file.
    File,
    /// The same file opened with O_DIRECT (`cache.direct=on`, CH `direct=true`).
    Direct,
    /// A null node (`null-co`), no data.
    Null,
}

/// How the client reaches the export.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// vhost-user-blk, driven by this program's libblkio client.
    VhostUser,
    /// An NBD export on the same socket path, driven by `qemu-img bench`
    /// (`blkstack bench --nbd`): sequential requests, no latency figures.
    /// Not a target of issue 12; CH has no NBD server.
    Nbd,
}

/// qemu-storage-daemon's `aio=` engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Aio {
    /// `aio=io_uring`.
    IoUring,
    /// `aio=threads`.
    Threads,
    /// `aio=native` (Linux AIO; needs O_DIRECT).
    Native,
}

impl Aio {
    fn name(self) -> &'static str {
        match self {
            Aio::IoUring => "io_uring",
            Aio::Threads => "threads",
            Aio::Native => "native",
        }
    }
}

/// Which daemon serves a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Engine {
    /// `blkstack serve`.
    Blkstack,
    /// `qemu-storage-daemon` with an `aio=` engine.
    Qsd(Aio),
    /// cloud-hypervisor's `vhost_user_block`.
    Ch,
}

/// One backend configuration in a workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BackendSpec {
    /// Daemon and engine.
    pub engine: Engine,
    /// Backend-side polling (blkstack `poll-us`, CH `poll_queue`, QSD in an
    /// iothread, whose AioContext polls adaptively).
    pub poll: bool,
    /// blkstack with its default, adaptive polling (`poll-max-ns`); without
    /// this and `poll`, blkstack runs with `poll-max-ns=0` (no polling).
    pub adaptive: bool,
}

impl BackendSpec {
    /// Short stable id, used in file names and the report.
    pub fn id(&self) -> String {
        let base = match self.engine {
            Engine::Blkstack => "blkstack".to_string(),
            Engine::Qsd(Aio::IoUring) => "qsd".to_string(),
            Engine::Qsd(a) => format!("qsd-{}", a.name()),
            Engine::Ch => "ch".to_string(),
        };
        if self.poll {
            base + "-poll"
        } else {
            base
        }
    }

    /// Human-readable name for the report.
    pub fn title(&self) -> String {
        let base = match self.engine {
            Engine::Blkstack => "blkstack".to_string(),
            Engine::Qsd(a) => format!("QSD aio={}", a.name()),
            Engine::Ch => "CH".to_string(),
        };
        match (self.engine, self.poll) {
            (Engine::Blkstack, false) if self.adaptive => base + " adaptive polling",
            (_, false) => base,
            (Engine::Blkstack, true) => base + " poll-us",
            (Engine::Qsd(_), true) => base + " iothread",
            (Engine::Ch, true) => base + " poll_queue",
        }
    }

    /// Whether this is the blkstack row.
    pub fn is_blkstack(&self) -> bool {
        self.engine == Engine::Blkstack
    }
}

/// One workload and the backends it runs against.
#[derive(Debug, Clone)]
pub struct WorkloadSpec {
    /// Short stable id.
    pub id: &'static str,
    /// Title for the report.
    pub title: &'static str,
    /// Access pattern.
    pub rw: RwMode,
    /// Request size.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Queues.
    pub queues: u32,
    /// Backing.
    pub backing: Backing,
    /// Backend polling on.
    pub poll: bool,
    /// The headline figure is MiB/s rather than IOPS.
    pub throughput: bool,
    /// Part of `--quick`.
    pub quick: bool,
    /// Client and backend run on one CPU (the first this process may use):
    /// what a backend costs per request when waking the other side is cheap.
    pub one_cpu: bool,
    /// The client busy-polls its completions (`bench --poll`) instead of
    /// sleeping until the backend signals: neither side is woken from a
    /// halted CPU, so the backend's figures are its cost per request.
    pub client_poll: bool,
    /// vhost-user-blk or NBD.
    pub transport: Transport,
    /// Backends, blkstack first.
    pub backends: Vec<BackendSpec>,
}

const K4: u64 = 4096;
const M1: u64 = 1 << 20;

fn trio(poll: bool) -> Vec<BackendSpec> {
    [Engine::Blkstack, Engine::Qsd(Aio::IoUring), Engine::Ch]
        .into_iter()
        .map(|engine| BackendSpec { engine, poll, adaptive: false })
        .collect()
}

#[allow(clippy::too_many_arguments)]
fn wl(
    id: &'static str,
    title: &'static str,
    rw: RwMode,
    bs: u64,
    iodepth: u32,
    queues: u32,
    backing: Backing,
    poll: bool,
    quick: bool,
    backends: Vec<BackendSpec>,
) -> WorkloadSpec {
    WorkloadSpec {
        id,
        title,
        rw,
        bs,
        iodepth,
        queues,
        backing,
        poll,
        throughput: bs >= M1,
        quick,
        one_cpu: false,
        client_poll: false,
        transport: Transport::VhostUser,
        backends,
    }
}

/// The workloads of issue 12, in run order.
pub fn workloads() -> Vec<WorkloadSpec> {
    use Backing::*;
    use RwMode::*;
    let mut seq = trio(false);
    seq.push(BackendSpec {
        engine: Engine::Qsd(Aio::Threads),
        poll: false,
        adaptive: false,
    });
    let direct = vec![
        BackendSpec {
            engine: Engine::Blkstack,
            poll: false,
            adaptive: false,
        },
        BackendSpec {
            engine: Engine::Qsd(Aio::Native),
            poll: false,
            adaptive: false,
        },
        BackendSpec {
            engine: Engine::Ch,
            poll: false,
            adaptive: false,
        },
    ];
    // blkstack and QSD: `null-co` and NBD have no CH counterpart.
    let duo = vec![
        BackendSpec {
            engine: Engine::Blkstack,
            poll: false,
            adaptive: false,
        },
        BackendSpec {
            engine: Engine::Qsd(Aio::IoUring),
            poll: false,
            adaptive: false,
        },
    ];
    let null_row = wl(
        "null",
        "null 4k randread QD32",
        Randread,
        K4,
        32,
        1,
        Null,
        false,
        true,
        duo.clone(),
    );
    let null_one_cpu = WorkloadSpec {
        id: "null-1cpu",
        title: "null 4k randread QD32, client and backend on one CPU",
        quick: false,
        one_cpu: true,
        ..null_row.clone()
    };
    let nbd = |id, title, rw, bs, iodepth| WorkloadSpec {
        transport: Transport::Nbd,
        ..wl(id, title, rw, bs, iodepth, 1, File, false, false, duo.clone())
    };
    // Each backend as it polls by default: blkstack's adaptive window, QSD's
    // main loop (no polling) and an iothread (QEMU's adaptive polling).
    let null_adaptive = WorkloadSpec {
        id: "null-adaptive",
        title: "null 4k randread QD32, polling defaults",
        backends: vec![
            BackendSpec {
                engine: Engine::Blkstack,
                poll: false,
                adaptive: true,
            },
            BackendSpec {
                engine: Engine::Qsd(Aio::IoUring),
                poll: false,
                adaptive: false,
            },
            BackendSpec {
                engine: Engine::Qsd(Aio::IoUring),
                poll: true,
                adaptive: false,
            },
        ],
        ..null_row.clone()
    };
    let null_client_poll = WorkloadSpec {
        id: "null-cpoll",
        title: "null 4k randread QD32, client polling",
        quick: false,
        client_poll: true,
        ..null_row.clone()
    };
    vec![
        wl(
            "rr1",
            "4k randread QD1",
            Randread,
            K4,
            1,
            1,
            File,
            false,
            true,
            trio(false),
        ),
        wl(
            "rr32",
            "4k randread QD32",
            Randread,
            K4,
            32,
            1,
            File,
            false,
            true,
            trio(false),
        ),
        wl(
            "rw32",
            "4k randwrite QD32",
            Randwrite,
            K4,
            32,
            1,
            File,
            false,
            true,
            trio(false),
        ),
        wl(
            "seq1m",
            "1M read QD8",
            Read,
            M1,
            8,
            1,
            File,
            false,
            true,
            seq,
        ),
        wl(
            "rr1-poll",
            "4k randread QD1, polling",
            Randread,
            K4,
            1,
            1,
            File,
            true,
            false,
            trio(true),
        ),
        wl(
            "rr32-poll",
            "4k randread QD32, polling",
            Randread,
            K4,
            32,
            1,
            File,
            true,
            true,
            trio(true),
        ),
        wl(
            "rw32-poll",
            "4k randwrite QD32, polling",
            Randwrite,
            K4,
            32,
            1,
            File,
            true,
            false,
            trio(true),
        ),
        wl(
            "seq1m-poll",
            "1M read QD8, polling",
            Read,
            M1,
            8,
            1,
            File,
            true,
            false,
            trio(true),
        ),
        wl(
            "direct",
            "4k randread QD32, O_DIRECT",
            Randread,
            K4,
            32,
            1,
            Direct,
            false,
            true,
            direct,
        ),
        null_row,
        null_adaptive,
        null_client_poll,
        null_one_cpu,
        nbd("nbd-read4k", "4k read QD32 over NBD", Read, K4, 32),
        nbd("nbd-write4k", "4k write QD32 over NBD", Write, K4, 32),
        nbd("nbd-read1m", "1M read QD8 over NBD", Read, M1, 8),
        wl(
            "mq2",
            "4k randread QD32, 2 queues",
            Randread,
            K4,
            32,
            2,
            File,
            false,
            false,
            trio(false),
        ),
        wl(
            "mq4",
            "4k randread QD32, 4 queues",
            Randread,
            K4,
            32,
            4,
            File,
            false,
            false,
            trio(false),
        ),
        wl(
            "mq8",
            "4k randread QD32, 8 queues",
            Randread,
            K4,
            32,
            8,
            File,
            false,
            false,
            trio(false),
        ),
    ]
}

/// CPUs the 8-queue workload needs: 8 client and 8 backend threads, each on
/// a CPU of its own.
pub const SCALING_CPUS: usize = 16;

/// Whether a workload makes sense on a machine with `cpus` CPUs: 8 queues
/// only with [`SCALING_CPUS`] or more.
pub fn fits(w: &WorkloadSpec, cpus: usize) -> bool {
    w.queues < 8 || cpus >= SCALING_CPUS
}

/// The backends of `w` in the order round `round` runs them: rotated by
/// round and workload index so each goes first in turn.
pub fn rotated(w: &WorkloadSpec, index: usize, round: usize) -> Vec<BackendSpec> {
    let mut v = w.backends.clone();
    if !v.is_empty() {
        let k = (index + round) % v.len();
        v.rotate_left(k);
    }
    v
}

/// Paths and options that turn a backend spec into a command line.
pub struct LaunchParams<'a> {
    /// The image file.
    pub image: &'a str,
    /// Its size in bytes (for null nodes).
    pub size: u64,
    /// The socket to listen on.
    pub socket: &'a str,
    /// blkstack `poll-us` in polling rows.
    pub poll_us: u32,
}

/// The name of the NBD export in the NBD rows.
pub const NBD_EXPORT: &str = "disk";

/// The URI of the NBD export on `socket`.
pub fn nbd_uri(socket: &str) -> String {
    format!("nbd+unix:///{NBD_EXPORT}?socket={socket}")
}

/// Program arguments (without the program) to start `b` for `w`.
pub fn backend_args(b: &BackendSpec, w: &WorkloadSpec, p: &LaunchParams) -> Vec<String> {
    let q = w.queues;
    match b.engine {
        Engine::Ch => vec![
            "--block-backend".into(),
            format!(
                "path={},socket={},num_queues={q},queue_size=1024,readonly=false,direct={},poll_queue={}",
                p.image,
                p.socket,
                w.backing == Backing::Direct,
                b.poll
            ),
        ],
        Engine::Blkstack | Engine::Qsd(_) => {
            let node = match (w.backing, b.engine) {
                (Backing::Null, _) => format!("driver=null-co,node-name=f0,size={},read-zeroes=off", p.size),
                (backing, engine) => {
                    let mut s = format!("driver=file,node-name=f0,filename={}", p.image);
                    if let Engine::Qsd(aio) = engine {
                        s += &format!(",aio={}", aio.name());
                    }
                    if backing == Backing::Direct {
                        s += ",cache.direct=on";
                    }
                    s
                }
            };
            let mut export = format!(
                "type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path={},writable=on,num-queues={q}",
                p.socket
            );
            let mut args = Vec::new();
            if w.transport == Transport::Nbd {
                if b.engine == Engine::Blkstack {
                    args.push("serve".to_string());
                }
                args.extend([
                    "--blockdev".to_string(),
                    node,
                    "--nbd-server".to_string(),
                    format!("addr.type=unix,addr.path={}", p.socket),
                    "--export".to_string(),
                    format!("type=nbd,id=e0,node-name=f0,name={NBD_EXPORT},writable=on"),
                ]);
                return args;
            }
            if b.engine == Engine::Blkstack {
                args.push("serve".to_string());
                if b.poll {
                    export += &format!(",poll-us={}", p.poll_us);
                } else if !b.adaptive {
                    export += ",poll-max-ns=0";
                }
            } else if b.poll {
                args.extend(["--object".to_string(), "iothread,id=io0".to_string()]);
                export += ",iothread=io0";
            }
            args.extend(["--blockdev".to_string(), node, "--export".to_string(), export]);
            args
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rotation_puts_each_first() {
        let w = &workloads()[1];
        let firsts: Vec<String> = (0..3).map(|r| rotated(w, 1, r)[0].id()).collect();
        assert_eq!(firsts, ["qsd", "ch", "blkstack"]);
    }

    #[test]
    fn command_lines() {
        let ws = workloads();
        let p = LaunchParams {
            image: "/i.img",
            size: 4096,
            socket: "/s.sock",
            poll_us: 50,
        };
        let direct = ws.iter().find(|w| w.id == "direct").expect("direct");
        let qsd = backend_args(&direct.backends[1], direct, &p).join(" ");
        assert_eq!(
            qsd,
            "--blockdev driver=file,node-name=f0,filename=/i.img,aio=native,cache.direct=on --export \
             type=vhost-user-blk,id=e0,node-name=f0,addr.type=unix,addr.path=/s.sock,writable=on,num-queues=1"
        );
        let poll = ws.iter().find(|w| w.id == "rr1-poll").expect("rr1-poll");
        assert!(backend_args(&poll.backends[0], poll, &p)
            .join(" ")
            .ends_with(",poll-us=50"));
        assert!(
            backend_args(&poll.backends[2], poll, &p)[1].ends_with("direct=false,poll_queue=true")
        );
        let nbd = ws.iter().find(|w| w.id == "nbd-write4k").expect("nbd-write4k");
        assert_eq!(
            backend_args(&nbd.backends[0], nbd, &p).join(" "),
            "serve --blockdev driver=file,node-name=f0,filename=/i.img --nbd-server addr.type=unix,addr.path=/s.sock \
             --export type=nbd,id=e0,node-name=f0,name=disk,writable=on"
        );
        assert_eq!(
            backend_args(&nbd.backends[1], nbd, &p).join(" "),
            "--blockdev driver=file,node-name=f0,filename=/i.img,aio=io_uring --nbd-server addr.type=unix,addr.path=/s.sock \
             --export type=nbd,id=e0,node-name=f0,name=disk,writable=on"
        );
        assert_eq!(nbd_uri("/s.sock"), "nbd+unix:///disk?socket=/s.sock");
        let null = ws.iter().find(|w| w.id == "null").expect("null");
        assert!(backend_args(&null.backends[0], null, &p)[2].starts_with("driver=null-co"));
        // Polling off is explicit for blkstack (its default polls adaptively).
        let rr32 = ws.iter().find(|w| w.id == "rr32").expect("rr32");
        assert!(backend_args(&rr32.backends[0], rr32, &p).join(" ").ends_with(",num-queues=1,poll-max-ns=0"));
        assert!(backend_args(&null.backends[0], null, &p).join(" ").ends_with(",poll-max-ns=0"));
        let adaptive = ws.iter().find(|w| w.id == "null-adaptive").expect("null-adaptive");
        let ids: Vec<String> = adaptive.backends.iter().map(BackendSpec::id).collect();
        assert_eq!(ids, ["blkstack", "qsd", "qsd-poll"]);
        assert!(backend_args(&adaptive.backends[0], adaptive, &p).join(" ").ends_with(",num-queues=1"));
        assert!(backend_args(&adaptive.backends[2], adaptive, &p).join(" ").contains("iothread=io0"));
        assert_eq!(adaptive.backends[0].title(), "blkstack adaptive polling");
        for w in &ws {
            assert!(w.backends[0].is_blkstack(), "{}", w.id);
        }
    }
}
