//! `blkstack bench`: a vhost-user-blk frontend on libblkio for benchmarks, and
//! `blkstack bench compare`, which runs it against blkstack,
//! qemu-storage-daemon and cloud-hypervisor's `vhost_user_block` side by side.
//!
//! One run (`blkstack bench --socket PATH ...`) connects with libblkio's
//! `virtio-blk-vhost-user` driver, drives one thread per virtqueue with
//! `--iodepth` requests always in flight, and reports IOPS, MiB/s, latency
//! percentiles, the backend's CPU time and resident memory (`--server-pid`)
//! and the host's CPU steal — as a table and, with `--json`, as JSON (schema
//! in [`result`]).
//!
//! Decisions:
//! - Latency is measured from the time the request was queued in libblkio to
//!   the time `do_io` returned it; one clock read per batch of completions is
//!   both the completion time of that batch and the submission time of the
//!   requests queued in its place (they are sent by the next `do_io`).
//! - Interrupt mode waits in `do_io(min_completions = 1)` on the completion
//!   eventfd (with a 200 ms timeout to notice the end of the run or a dead
//!   backend); `--poll` calls `do_io(min_completions = 0)` in a loop. The
//!   backend is not told; backend polling is a backend option.
//! - A run fails (non-zero exit) when the backend stalls for 10 s or a
//!   request fails; the JSON is still written when requests fail.

pub mod args;
pub mod client;
pub mod compare;
pub mod hist;
pub mod nbd;
pub mod procfs;
pub mod result;
pub mod run;
pub mod wake;

pub use args::{RunArgs, RwMode};
pub use result::BenchResult;

use std::fs;
use std::io::Write;

/// Writes to stdout; a closed pipe (`| head`) is not an error.
fn stdout(text: &str) -> Result<(), String> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(format!("stdout: {e}")),
        _ => Ok(()),
    }
}

/// Options of `blkstack bench`.
#[derive(Debug, clap::Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct BenchArgs {
    /// `compare`, or nothing for one run.
    #[command(subcommand)]
    pub command: Option<BenchCommand>,

    /// Options of one run.
    #[command(flatten)]
    pub run: RunArgs,
}

/// Subcommands of `blkstack bench`.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// Run the benchmark against blkstack, qemu-storage-daemon and cloud-hypervisor's
    /// vhost_user_block and write bench/report.md and bench/report.svg.
    Compare(compare::CompareArgs),
}

/// Runs `blkstack bench`.
pub fn main(args: BenchArgs) -> Result<(), String> {
    match args.command {
        Some(BenchCommand::Compare(c)) => compare::main(c),
        None => run_once(&args.run),
    }
}

fn run_once(args: &RunArgs) -> Result<(), String> {
    let r = run::run(args)?;
    let json = serde_json::to_string_pretty(&r).map_err(|e| format!("JSON: {e}"))?;
    match args.json.as_deref() {
        Some(p) if p.as_os_str() == "-" => stdout(&(json + "\n"))?,
        Some(p) => {
            fs::write(p, json + "\n").map_err(|e| format!("{}: {e}", p.display()))?;
            stdout(&r.table())?;
        }
        None => stdout(&r.table())?,
    }
    if r.errors > 0 {
        return Err(format!(
            "{} requests failed; first: {}",
            r.errors,
            r.first_error.as_deref().unwrap_or("?")
        ));
    }
    Ok(())
}
