//! Command-line options of `blkstack bench` (one run of the client).

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// The access pattern of a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RwMode {
    /// Random reads.
    Randread,
    /// Random writes.
    Randwrite,
    /// Sequential reads (one cursor per queue).
    Read,
    /// Sequential writes (one cursor per queue).
    Write,
    /// Random reads and writes, `--rwmixread` percent reads.
    Randrw,
}

impl RwMode {
    /// Whether offsets are drawn at random.
    pub fn is_random(self) -> bool {
        matches!(self, RwMode::Randread | RwMode::Randwrite | RwMode::Randrw)
    }

    /// Whether the run writes at all (the device must then be writable).
    pub fn writes(self) -> bool {
        !matches!(self, RwMode::Randread | RwMode::Read)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            RwMode::Randread => "randread",
            RwMode::Randwrite => "randwrite",
            RwMode::Read => "read",
            RwMode::Write => "write",
            RwMode::Randrw => "randrw",
        }
    }
}

/// Options of one benchmark run against one vhost-user-blk socket.
#[derive(Debug, Clone, clap::Args)]
pub struct RunArgs {
    /// The vhost-user-blk UNIX socket of the backend.
    #[arg(long, value_name = "PATH", conflicts_with = "nbd")]
    pub socket: Option<PathBuf>,

    /// An NBD export instead (`nbd+unix:///NAME?socket=PATH`, `nbd://HOST:PORT/NAME`),
    /// driven by `qemu-img bench`: sequential requests (`--rw read` or `write`),
    /// one connection, no latency figures.
    #[arg(long, value_name = "URI")]
    pub nbd: Option<String>,

    /// The `qemu-img` that drives `--nbd` runs.
    #[arg(long, value_name = "PATH", default_value = "qemu-img")]
    pub qemu_img: PathBuf,

    /// Access pattern.
    #[arg(long, value_enum, default_value = "randread")]
    pub rw: RwMode,

    /// Request size (bytes; suffixes k, M, G are powers of 1024).
    #[arg(long, value_parser = parse_size, default_value = "4k")]
    pub bs: u64,

    /// Requests kept in flight on each queue.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u32).range(1..=4096))]
    pub iodepth: u32,

    /// Number of virtqueues, each driven by its own thread.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub queues: u32,

    /// Measured duration in seconds (after the ramp).
    #[arg(long, default_value_t = 10.0, value_parser = parse_seconds)]
    pub seconds: f64,

    /// Warm-up before measuring, in seconds (I/O runs but is not counted).
    #[arg(long, default_value_t = 0.0, value_parser = parse_seconds)]
    pub ramp: f64,

    /// Bytes of the device to address, from offset 0 (default: its capacity).
    #[arg(long, value_parser = parse_size)]
    pub size: Option<u64>,

    /// Busy-poll completions (do_io with min_completions 0) instead of sleeping on the
    /// completion eventfd. The backend is told nothing.
    #[arg(long)]
    pub poll: bool,

    /// Percentage of reads for `--rw randrw`.
    #[arg(long, default_value_t = 50, value_parser = clap::value_parser!(u8).range(0..=100))]
    pub rwmixread: u8,

    /// Virtqueue size (power of two; default: enough descriptors for --iodepth, at least 256).
    #[arg(long)]
    pub queue_size: Option<u32>,

    /// PID of the backend, for its CPU time and resident memory.
    #[arg(long, value_name = "PID")]
    pub server_pid: Option<u32>,

    /// Also write the result as JSON to this file ("-" for stdout instead of the table).
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,

    /// Keep retrying the connection for this many seconds (the backend may still be starting).
    #[arg(long, default_value_t = 5.0, value_parser = parse_seconds)]
    pub connect_timeout: f64,

    /// A free-form name for the backend, copied into the JSON.
    #[arg(long)]
    pub label: Option<String>,

    /// No progress line on stderr.
    #[arg(long, short)]
    pub quiet: bool,
}

/// Parses a byte count such as `4096`, `4k`, `1M`, `4G`, `1MiB` (binary multiples).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    if digits == 0 {
        return Err(format!(
            "'{s}' is not a size (expected e.g. 4096, 4k, 1M, 4G)"
        ));
    }
    let n: u64 = t[..digits]
        .parse()
        .map_err(|_| format!("'{s}': number too large"))?;
    let shift = match t[digits..].to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kb" | "kib" => 10,
        "m" | "mb" | "mib" => 20,
        "g" | "gb" | "gib" => 30,
        "t" | "tb" | "tib" => 40,
        other => {
            return Err(format!(
                "'{s}': unknown suffix '{other}' (use k, M, G or T)"
            ))
        }
    };
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("'{s}': size too large"))
}

/// Parses a non-negative, finite number of seconds.
pub fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=86_400.0).contains(&v) {
        return Err(format!("'{s}': seconds must be between 0 and 86400"));
    }
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4K"), Ok(4096));
        assert_eq!(parse_size("1M"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4G"), Ok(4 << 30));
        assert!(parse_size("").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("4x").is_err());
        assert!(parse_size("-4k").is_err());
        assert!(parse_size("99999999999999999999").is_err());
        assert!(parse_size("99999999999T").is_err());
    }

    #[test]
    fn seconds() {
        assert_eq!(parse_seconds("1.5"), Ok(1.5));
        assert!(parse_seconds("-1").is_err());
        assert!(parse_seconds("nan").is_err());
        assert!(parse_seconds("inf").is_err());
    }
}
