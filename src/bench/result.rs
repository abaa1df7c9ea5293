//! The result of one run: the JSON schema (`--json`) and the table on stdout.
//!
//! Field names are stable; `blkstack bench compare` reads them back.

use serde::{Deserialize, Serialize};

use super::args::RwMode;
use super::client::DeviceInfo;
use super::hist::Histogram;

/// Version of the JSON layout.
pub const SCHEMA_VERSION: u32 = 1;

/// The workload as run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    /// Access pattern.
    pub rw: RwMode,
    /// Request size in bytes.
    pub bs: u64,
    /// Requests in flight per queue.
    pub iodepth: u32,
    /// Number of queues (one thread each).
    pub queues: u32,
    /// Addressed bytes from offset 0.
    pub size: u64,
    /// Client busy-polled completions.
    pub poll: bool,
    /// Percent reads (randrw).
    pub rwmixread: u8,
    /// Requested measuring time.
    pub seconds: f64,
    /// Warm-up before measuring.
    pub ramp_seconds: f64,
    /// The program that issued the requests.
    #[serde(default)]
    pub client: ClientKind,
}

/// The program that issued a run's requests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientKind {
    /// This program's libblkio frontend (vhost-user-blk): every figure.
    #[default]
    Libblkio,
    /// `qemu-img bench` over NBD: sequential requests, and no latency
    /// figures (it reports only the run's total time).
    QemuImgBench,
}

impl ClientKind {
    /// Whether the run measured per-request latency.
    pub fn has_latency(self) -> bool {
        self == ClientKind::Libblkio
    }
}

/// Latency figures in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Latency {
    /// Smallest.
    pub min: f64,
    /// Mean.
    pub mean: f64,
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// 99.9th percentile.
    pub p99_9: f64,
    /// Largest.
    pub max: f64,
}

impl Latency {
    /// Summarises a histogram in nanoseconds.
    pub fn from_hist(h: &Histogram) -> Latency {
        let us = |ns: u64| ns as f64 / 1000.0;
        Latency {
            min: us(h.min()),
            mean: h.mean() / 1000.0,
            p50: us(h.quantile(0.5)),
            p90: us(h.quantile(0.9)),
            p99: us(h.quantile(0.99)),
            p99_9: us(h.quantile(0.999)),
            max: us(h.max()),
        }
    }
}

/// The backend process, when `--server-pid` was given.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Backend {
    /// Its PID.
    pub pid: u32,
    /// CPU seconds (user + system, all threads) per second of the measured time.
    pub cpu_s_per_s: Option<f64>,
    /// VmRSS at the end of the measured time, KiB.
    pub rss_kib: Option<u64>,
    /// Times per second its threads went to sleep (voluntary context
    /// switches, all threads): each is a wake-up the backend paid for.
    #[serde(default)]
    pub sleeps_per_s: Option<f64>,
    /// Why a figure is missing.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
}

/// The host during the measured time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Host {
    /// CPU time stolen by the hypervisor, percent of all CPU time.
    pub steal_pct: Option<f64>,
    /// Average number of busy CPUs.
    pub busy_cpus: Option<f64>,
    /// Online CPUs.
    pub cpus: usize,
    /// 1-minute load average at the end.
    pub loadavg_1m: Option<f64>,
    /// CPU seconds per second used by this client.
    pub client_cpu_s_per_s: Option<f64>,
    /// CPU seconds per second the idle loops of all CPUs spent polling
    /// (cpuidle's `POLL` state) instead of halting: CPU time the host gives,
    /// counted as idle, so in neither the backend's nor the busy figure.
    #[serde(default)]
    pub idle_poll_cpus: Option<f64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BenchResult {
    /// Layout version.
    pub schema: u32,
    /// `--label`.
    pub label: Option<String>,
    /// The socket.
    pub socket: String,
    /// What was run.
    pub workload: Workload,
    /// What the backend offered.
    pub device: DeviceInfo,
    /// Measured wall time, seconds.
    pub elapsed_s: f64,
    /// Requests completed successfully while measuring.
    pub ops: u64,
    /// Of which reads.
    pub reads: u64,
    /// Of which writes.
    pub writes: u64,
    /// Bytes moved while measuring.
    pub bytes: u64,
    /// Requests that failed (any phase).
    pub errors: u64,
    /// The first failure.
    pub first_error: Option<String>,
    /// Requests per second.
    pub iops: f64,
    /// MiB per second.
    pub mib_s: f64,
    /// Latency, microseconds.
    pub lat_us: Latency,
    /// The backend process.
    pub backend: Option<Backend>,
    /// The host.
    pub host: Host,
}

/// `4096` → `4k`, `1048576` → `1M`.
pub fn fmt_size(b: u64) -> String {
    const UNITS: [(u32, &str); 4] = [(40, "T"), (30, "G"), (20, "M"), (10, "k")];
    for (shift, unit) in UNITS {
        if b >= 1 << shift && b % (1 << shift) == 0 {
            return format!("{}{unit}", b >> shift);
        }
    }
    b.to_string()
}

fn opt(v: Option<f64>, digits: usize, unit: &str) -> String {
    v.map_or_else(|| "n/a".to_string(), |v| format!("{v:.digits$}{unit}"))
}

impl BenchResult {
    /// The human-readable table.
    pub fn table(&self) -> String {
        let w = &self.workload;
        let l = &self.lat_us;
        let mut s = format!(
            "{} bs={} iodepth={} queues={} poll={} size={}  {:.1} s on {}{}\n",
            w.rw.name(),
            fmt_size(w.bs),
            w.iodepth,
            w.queues,
            if w.poll { "on" } else { "off" },
            fmt_size(w.size),
            self.elapsed_s,
            self.socket,
            self.label
                .as_ref()
                .map(|l| format!(" ({l})"))
                .unwrap_or_default(),
        );
        s += &format!(
            "  IOPS       {:>12.0}   MiB/s {:.1}   (reads {}, writes {}, errors {})\n",
            self.iops, self.mib_s, self.reads, self.writes, self.errors
        );
        if w.client.has_latency() {
            s += &format!(
                "  latency us  mean {:.1}  p50 {:.1}  p90 {:.1}  p99 {:.1}  p99.9 {:.1}  max {:.1}\n",
                l.mean, l.p50, l.p90, l.p99, l.p99_9, l.max
            );
        } else {
            s += "  latency     n/a (qemu-img bench reports only the run's total time)\n";
        }
        if let Some(b) = &self.backend {
            s += &format!(
                "  backend     pid {}  CPU {} s/s  RSS {}  sleeps {}\n",
                b.pid,
                opt(b.cpu_s_per_s, 2, ""),
                opt(b.rss_kib.map(|k| k as f64 / 1024.0), 1, " MiB"),
                opt(b.sleeps_per_s, 0, "/s"),
            );
            for n in &b.notes {
                s += &format!("  backend     {n}\n");
            }
        }
        let h = &self.host;
        s += &format!(
            "  host        steal {}  busy CPUs {} of {}  load {}  client CPU {} s/s  idle-poll {} s/s\n",
            opt(h.steal_pct, 2, " %"),
            opt(h.busy_cpus, 2, ""),
            h.cpus,
            opt(h.loadavg_1m, 2, ""),
            opt(h.client_cpu_s_per_s, 2, ""),
            opt(h.idle_poll_cpus, 2, ""),
        );
        if let Some(e) = &self.first_error {
            s += &format!("  first error {e}\n");
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(fmt_size(4096), "4k");
        assert_eq!(fmt_size(1 << 20), "1M");
        assert_eq!(fmt_size(4 << 30), "4G");
        assert_eq!(fmt_size(1536), "1536");
    }
}
