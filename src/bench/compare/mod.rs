//! `blkstack bench compare` (what `make bench` runs): the same client against
//! blkstack, qemu-storage-daemon and cloud-hypervisor's `vhost_user_block`,
//! on the same backing, in alternating rounds, and a report with medians and
//! ratios (`bench/report.md`, `bench/report.svg`).
//!
//! Procedure, identical for every backend: a fresh backend process per run
//! (CH serves one connection and exits), started with a QSD-style command
//! line on the same 4 GiB image (written once with non-zero data so that
//! O_DIRECT reads reach the disk, and read once per round so it is page
//! cached); the client connects, ramps up, measures, disconnects; the
//! backend is stopped. Before round 1 the first workload runs once against
//! every backend, unmeasured (`warm_up`). Within a round each workload runs against every
//! backend back to back, the first one rotating with the round. A run whose
//! host steal exceeds `--max-steal` is repeated (up to `--retries` times,
//! keeping the least-stolen attempt; at most `--retry-budget` repeats in all,
//! so a stretch of steal cannot blow the time budget). The O_DIRECT row is
//! not repeated: its reads go to the virtual disk, and the hypervisor's work
//! for them shows up as steal (15–18 % here) on every attempt. After a run that wrote, the image is
//! synced so writeback does not spill into the next run. All raw results go
//! to `bench/out/results.json`; `--from` rebuilds the report from such a file.

mod limits;
pub mod plan;
pub mod profile;
pub mod report;
pub mod runner;
pub mod svg;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use super::args::{parse_seconds, parse_size};
use super::result::BenchResult;
use plan::{BackendSpec, Engine, LaunchParams, WorkloadSpec};
use runner::Backend;

/// Options of `blkstack bench compare`.
#[derive(Debug, Clone, clap::Args)]
pub struct CompareArgs {
    /// Iterate fast: one round, 2 s per run, the main workloads only.
    #[arg(long)]
    pub quick: bool,
    /// Rounds (default 3, quick 1).
    #[arg(long)]
    pub rounds: Option<usize>,
    /// Measured seconds per run (default 8, quick 2).
    #[arg(long, value_parser = parse_seconds)]
    pub seconds: Option<f64>,
    /// Ramp seconds per run (default 1, quick 0.5).
    #[arg(long, value_parser = parse_seconds)]
    pub ramp: Option<f64>,
    /// Only these workload ids (comma-separated, e.g. rr32,seq1m).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Only these backend ids (comma-separated: blkstack, qsd, ch, qsd-threads, ...;
    /// a `-poll` suffix is implied in polling rows).
    #[arg(long, value_delimiter = ',')]
    pub backends: Vec<String>,
    /// The image (created once, fully allocated).
    #[arg(long, default_value = "bench/out/bench.img")]
    pub image: PathBuf,
    /// Image size.
    #[arg(long, value_parser = parse_size, default_value = "4G")]
    pub image_size: u64,
    /// Directory for sockets, logs and raw results.
    #[arg(long, default_value = "bench/out")]
    pub out: PathBuf,
    /// The Markdown report.
    #[arg(long, default_value = "bench/report.md")]
    pub report: PathBuf,
    /// The SVG chart.
    #[arg(long, default_value = "bench/report.svg")]
    pub svg: PathBuf,
    /// qemu-storage-daemon binary.
    #[arg(long, default_value = "qemu-storage-daemon")]
    pub qsd: PathBuf,
    /// cloud-hypervisor's vhost_user_block (default: $BLKSTACK_CH_PEER, or
    /// ../shared/peers/vhost_user_block).
    #[arg(long)]
    pub ch: Option<PathBuf>,
    /// The blkstack binary to serve with (default: `blkstack` beside this program).
    #[arg(long)]
    pub blkstack: Option<PathBuf>,
    /// `poll-us` for blkstack in the polling rows.
    #[arg(long, default_value_t = 50)]
    pub poll_us: u32,
    /// Repeat a run whose host steal exceeds this percentage.
    #[arg(long, default_value_t = 3.0)]
    pub max_steal: f64,
    /// Repeats allowed per run for steal.
    #[arg(long, default_value_t = 2)]
    pub retries: u32,
    /// Repeats allowed in the whole comparison (default: one per six runs).
    #[arg(long)]
    pub retry_budget: Option<usize>,
    /// Skip the `perf` profile of blkstack (done after full runs when `perf` works).
    #[arg(long)]
    pub no_profile: bool,
    /// Rebuild the report from a results.json instead of running.
    #[arg(long, value_name = "RESULTS_JSON")]
    pub from: Option<PathBuf>,
}

/// One measured run (after steal repeats).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Workload id.
    pub workload: String,
    /// Backend id.
    pub backend: String,
    /// Round, from 0.
    pub round: usize,
    /// Position in the round's order for this workload, from 0.
    pub order: usize,
    /// Attempts made (more than 1 when steal was high).
    pub attempts: u32,
    /// The backend command line.
    pub command: String,
    /// What the client measured.
    pub result: Option<BenchResult>,
    /// Why there is no result.
    pub error: Option<String>,
}

/// Facts about the machine and the tools.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Machine {
    /// CPU model.
    pub cpu: String,
    /// Online CPUs.
    pub cpus: usize,
    /// MemTotal in MiB.
    pub mem_mib: u64,
    /// Kernel release.
    pub kernel: String,
    /// `qemu-storage-daemon --version`, first line.
    pub qsd: String,
    /// CH peer `--version`.
    pub ch: String,
    /// blkstack git commit.
    pub blkstack: String,
    /// 1-minute load average before the first run.
    pub load_before: f64,
    /// Same after the last run.
    pub load_after: f64,
    /// What waking a thread costs here (measured before the runs).
    #[serde(default)]
    pub wake: Option<crate::bench::wake::WakeProbe>,
    /// How the CPUs idle (cpuidle driver, haltpoll's poll limit), read
    /// before the first run.
    #[serde(default)]
    pub idle: Option<super::procfs::IdleConfig>,
    /// The machine's own `guest_halt_poll_ns` when `bench/compare.sh` set
    /// another for this comparison (`GUEST_HALT_POLL_NS`; it tells us
    /// through `BLKSTACK_HALT_POLL_WAS`).
    #[serde(default)]
    pub halt_poll_was: Option<u64>,
}

/// Everything a comparison produced (`bench/out/results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareOutput {
    /// Start, UTC.
    pub started: String,
    /// Wall time of the whole comparison, seconds.
    pub wall_s: f64,
    /// Quick mode.
    pub quick: bool,
    /// Rounds.
    pub rounds: usize,
    /// Measured seconds per run.
    pub seconds: f64,
    /// Ramp per run.
    pub ramp: f64,
    /// Steal limit.
    pub max_steal: f64,
    /// Image path and size.
    pub image: String,
    /// Image size.
    pub image_size: u64,
    /// blkstack poll-us in polling rows.
    pub poll_us: u32,
    /// The socket every backend listened on.
    pub socket: String,
    /// Machine facts.
    pub machine: Machine,
    /// Backends left out, and why.
    pub notes: Vec<String>,
    /// Workload ids run.
    pub workloads: Vec<String>,
    /// Every run.
    pub records: Vec<RunRecord>,
    /// Steal repeats skipped because the retry budget was spent.
    #[serde(default)]
    pub retries_skipped: usize,
    /// `perf` profiles of blkstack.
    #[serde(default)]
    pub profiles: Vec<profile::Profile>,
    /// The options `bench compare` ran with (empty: none, as `make bench`).
    #[serde(default)]
    pub options: Vec<String>,
    /// Unmeasured runs before round 1 (see `warm_up`).
    #[serde(default)]
    pub warm_up: Vec<RunRecord>,
}

/// The options after `compare` on this program's command line.
fn command_options() -> Vec<String> {
    std::env::args().skip_while(|a| a != "compare").skip(1).collect()
}

/// Runs `blkstack bench compare`.
pub fn main(args: CompareArgs) -> Result<(), String> {
    let out = match &args.from {
        Some(p) => {
            let text = fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()))?;
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", p.display()))?
        }
        None => run_all(&args)?,
    };
    let results = args
        .from
        .clone()
        .unwrap_or_else(|| args.out.join("results.json"));
    // A rebuilt report names the command that ran the benchmark.
    let options = if args.from.is_some() { out.options.clone() } else { command_options() };
    let md = report::markdown(
        &out,
        &report::Links::new(&options, &args.report, &args.svg, &results),
    );
    fs::write(&args.report, md).map_err(|e| format!("{}: {e}", args.report.display()))?;
    fs::write(&args.svg, svg::chart(&out)).map_err(|e| format!("{}: {e}", args.svg.display()))?;
    eprintln!(
        "compare: wrote {} and {}",
        args.report.display(),
        args.svg.display()
    );
    Ok(())
}

struct Tools {
    exe: PathBuf,
    blkstack: Option<PathBuf>,
    qsd: Option<PathBuf>,
    ch: Option<PathBuf>,
}

fn first_line(program: &Path, args: &[&str]) -> Option<String> {
    let o = Command::new(program).args(args).output().ok()?;
    if !o.status.success() {
        return None;
    }
    let text =
        String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    Some(text.lines().next().unwrap_or("").trim().to_string())
}

fn find_tools(args: &CompareArgs, notes: &mut Vec<String>) -> Result<Tools, String> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    let blkstack_bin = args
        .blkstack
        .clone()
        .unwrap_or_else(|| exe.with_file_name("blkstack"));
    let blkstack = match first_line(&blkstack_bin, &["serve", "--help"]) {
        Some(_) => Some(blkstack_bin),
        None => {
            notes.push(format!(
                "blkstack left out: `{} serve --help` failed",
                blkstack_bin.display()
            ));
            None
        }
    };
    let qsd = match first_line(&args.qsd, &["--version"]) {
        Some(_) => Some(args.qsd.clone()),
        None => {
            notes.push(format!(
                "qemu-storage-daemon left out: `{} --version` failed",
                args.qsd.display()
            ));
            None
        }
    };
    let ch_path = args
        .ch
        .clone()
        .or_else(|| std::env::var_os("BLKSTACK_CH_PEER").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/peers/vhost_user_block"));
    let ch = match first_line(&ch_path, &["--version"]) {
        Some(_) => Some(ch_path),
        None => {
            notes.push(format!(
                "cloud-hypervisor peer left out: `{} --version` failed",
                ch_path.display()
            ));
            None
        }
    };
    Ok(Tools {
        exe,
        blkstack,
        qsd,
        ch,
    })
}

fn machine(tools: &Tools) -> Machine {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let cpu = cpuinfo
        .lines()
        .find(|l| l.starts_with("model name"))
        .and_then(|l| l.split(':').nth(1))
        .unwrap_or("?")
        .trim()
        .to_string();
    let mem_mib = fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .map_or(0, |k| k / 1024);
    let commit = first_line(Path::new("git"), &["rev-parse", "--short", "HEAD"])
        .unwrap_or_else(|| "?".into());
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Machine {
        cpu,
        cpus: std::thread::available_parallelism().map_or(0, |n| n.get()),
        mem_mib,
        kernel: fs::read_to_string("/proc/sys/kernel/osrelease")
            .unwrap_or_default()
            .trim()
            .to_string(),
        qsd: tools
            .qsd
            .as_ref()
            .and_then(|q| first_line(q, &["--version"]))
            .unwrap_or_default(),
        ch: tools
            .ch
            .as_ref()
            .and_then(|c| first_line(c, &["--version"]))
            .unwrap_or_default(),
        blkstack: if dirty {
            format!("{commit} (with uncommitted changes)")
        } else {
            commit
        },
        load_before: super::procfs::loadavg_1m().unwrap_or(0.0),
        load_after: 0.0,
        wake: None,
        idle: Some(super::procfs::IdleConfig::read()),
        halt_poll_was: std::env::var("BLKSTACK_HALT_POLL_WAS").ok().and_then(|v| v.trim().parse().ok()),
    }
}

fn program<'a>(tools: &'a Tools, b: &BackendSpec) -> Option<&'a Path> {
    match b.engine {
        Engine::Blkstack => tools.blkstack.as_deref(),
        Engine::Qsd(_) => tools.qsd.as_deref(),
        Engine::Ch => tools.ch.as_deref(),
    }
}

fn selected(args: &CompareArgs) -> Result<Vec<WorkloadSpec>, String> {
    let all = plan::workloads();
    for id in &args.only {
        if !all.iter().any(|w| w.id == id) {
            let ids: Vec<&str> = all.iter().map(|w| w.id).collect();
            return Err(format!(
                "--only: unknown workload '{id}' (known: {})",
                ids.join(", ")
            ));
        }
    }
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let mut v: Vec<WorkloadSpec> = all
        .into_iter()
        .filter(|w| {
            if args.only.is_empty() {
                (!args.quick || w.quick) && plan::fits(w, cpus)
            } else {
                args.only.iter().any(|o| o == w.id)
            }
        })
        .collect();
    if !args.backends.is_empty() {
        for w in &mut v {
            w.backends.retain(|b| {
                let id = b.id();
                args.backends
                    .iter()
                    .any(|s| *s == id || format!("{s}-poll") == id)
            });
        }
    }
    Ok(v)
}

/// UTC time as `YYYY-MM-DD HH:MM`.
pub fn utc_now() -> String {
    let secs = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let (days, rem) = (secs / 86_400, secs % 86_400);
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60
    )
}

struct Ctx<'a> {
    args: &'a CompareArgs,
    retries_left: std::cell::Cell<usize>,
    retries_skipped: std::cell::Cell<usize>,
    tools: &'a Tools,
    seconds: f64,
    ramp: f64,
    socket: PathBuf,
    logs: PathBuf,
    image: String,
}

/// Creates the output directories and the image; returns the output
/// directory, the log directory, the socket path and the image path.
fn prepare_paths(args: &CompareArgs) -> Result<(PathBuf, PathBuf, PathBuf, String), String> {
    fs::create_dir_all(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let out_dir =
        fs::canonicalize(&args.out).map_err(|e| format!("{}: {e}", args.out.display()))?;
    let logs = out_dir.join("logs");
    fs::create_dir_all(&logs).map_err(|e| format!("{}: {e}", logs.display()))?;
    let mut socket = out_dir.join("bench.sock");
    if socket.as_os_str().len() > 100 {
        socket = std::env::temp_dir().join(format!("blkstack-bench-{}.sock", std::process::id()));
    }
    runner::prepare_image(&args.image, args.image_size)?;
    runner::reset_page_cache(&args.image)?;
    let image = fs::canonicalize(&args.image)
        .map_err(|e| format!("{}: {e}", args.image.display()))?
        .to_string_lossy()
        .into_owned();
    Ok((out_dir, logs, socket, image))
}

/// All rounds: each workload against each backend, rotating who goes first.
/// Runs `run` for workload `w` with the image as every run finds it:
/// pre-read before (not once per round: the host may reclaim page cache that
/// has been cold for a while, DAMON_RECLAIM on this VM, so a random-read run
/// could otherwise find part of the image evicted and measure the disk), and
/// synced after a run that wrote, so writeback does not spill into the next.
fn with_image_ready(ctx: &Ctx, w: &WorkloadSpec, run: impl FnOnce() -> RunRecord) -> Result<RunRecord, String> {
    if w.backing != plan::Backing::Null {
        runner::preread(Path::new(&ctx.image))?;
    }
    let rec = run();
    if w.rw.writes() {
        runner::sync_image(Path::new(&ctx.image))?;
    }
    Ok(rec)
}

fn run_rounds(
    ctx: &Ctx,
    workloads: &[WorkloadSpec],
    rounds: usize,
    total: usize,
    t0: Instant,
) -> Result<Vec<RunRecord>, String> {
    let mut records = Vec::with_capacity(total);
    for round in 0..rounds {
        for (wi, w) in workloads.iter().enumerate() {
            for (order, b) in plan::rotated(w, wi, round).iter().enumerate() {
                let rec = with_image_ready(ctx, w, || run_with_retries(ctx, w, b, round, order))?;
                progress_line(&rec, records.len() + 1, total, t0);
                records.push(rec);
            }
        }
    }
    Ok(records)
}

fn run_all(args: &CompareArgs) -> Result<CompareOutput, String> {
    let t0 = Instant::now();
    let started = utc_now();
    let rounds = args.rounds.unwrap_or(if args.quick { 1 } else { 3 }).max(1);
    let seconds = args.seconds.unwrap_or(if args.quick { 2.0 } else { 8.0 });
    let ramp = args.ramp.unwrap_or(if args.quick { 0.5 } else { 1.0 });
    let mut notes = Vec::new();
    let tools = find_tools(args, &mut notes)?;
    let mut workloads = selected(args)?;
    for w in &mut workloads {
        w.backends.retain(|b| program(&tools, b).is_some());
    }
    workloads.retain(|w| !w.backends.is_empty());
    let (out_dir, logs, socket, image) = prepare_paths(args)?;
    let mut machine = machine(&tools);
    let each = if args.quick { Duration::from_millis(200) } else { Duration::from_secs(1) };
    // Probed before the runs and again after them: the report keeps the
    // calmer probe (a noisy moment made one read 289 µs against 60 µs).
    let first_probe = crate::bench::wake::probe(each);
    let total: usize = workloads.iter().map(|w| w.backends.len()).sum::<usize>() * rounds;
    let budget = args.retry_budget.unwrap_or(total.div_ceil(6));
    let ctx = Ctx {
        args,
        retries_left: std::cell::Cell::new(budget),
        retries_skipped: std::cell::Cell::new(0),
        tools: &tools,
        seconds,
        ramp,
        socket,
        logs,
        image,
    };
    eprintln!(
        "compare: {total} runs ({rounds} rounds x {} workloads), {seconds} s + {ramp} s ramp each",
        workloads.len()
    );
    let warm = if args.quick { Vec::new() } else { warm_up(&ctx, &workloads)? };
    let records = run_rounds(&ctx, &workloads, rounds, total, t0)?;
    machine.load_after = super::procfs::loadavg_1m().unwrap_or(0.0);
    machine.wake = crate::bench::wake::WakeProbe::calmest(vec![first_probe, crate::bench::wake::probe(each)]);
    let profiles = match (&tools.blkstack, args.quick || args.no_profile) {
        (Some(b), false) => profile_blkstack(&ctx, b, &workloads),
        _ => Vec::new(),
    };
    let out = CompareOutput {
        started,
        wall_s: t0.elapsed().as_secs_f64(),
        quick: args.quick,
        rounds,
        seconds,
        ramp,
        max_steal: args.max_steal,
        image: ctx.image.clone(),
        image_size: args.image_size,
        poll_us: args.poll_us,
        socket: ctx.socket.to_string_lossy().into_owned(),
        machine,
        notes,
        workloads: workloads.iter().map(|w| w.id.to_string()).collect(),
        records,
        retries_skipped: ctx.retries_skipped.get(),
        profiles,
        options: command_options(),
        warm_up: warm,
    };
    let path = out_dir.join("results.json");
    let json = serde_json::to_string_pretty(&out).map_err(|e| format!("JSON: {e}"))?;
    fs::write(&path, json).map_err(|e| format!("{}: {e}", path.display()))?;
    eprintln!("compare: raw results in {}", path.display());
    Ok(out)
}

/// A latency figure for the progress lines: "-" where the client measured none.
fn latency(r: &BenchResult, us: f64) -> String {
    if r.workload.client.has_latency() {
        format!("{us:.1}")
    } else {
        "-".to_string()
    }
}

fn progress_line(rec: &RunRecord, n: usize, total: usize, t0: Instant) {
    let el = t0.elapsed().as_secs_f64();
    let eta = el / n as f64 * (total - n) as f64;
    let what = match (&rec.result, &rec.error) {
        (Some(r), _) => format!(
            "{:>9.0} IOPS {:>8.1} MiB/s p50 {:>7} us p99 {:>8} us cpu {} steal {:.1}%",
            r.iops,
            r.mib_s,
            latency(r, r.lat_us.p50),
            latency(r, r.lat_us.p99),
            r.backend
                .as_ref()
                .and_then(|b| b.cpu_s_per_s)
                .map_or("n/a".into(), |c| format!("{c:.2}")),
            r.host.steal_pct.unwrap_or(0.0)
        ),
        (None, Some(e)) => format!("FAILED: {e}"),
        (None, None) => "no result".into(),
    };
    eprintln!(
        "[{n:>3}/{total}] r{} {:<10} {:<14} {what}  ({:.0} s left)",
        rec.round + 1,
        rec.workload,
        rec.backend,
        eta
    );
}

/// The backend's program and arguments for a run of `w`, and its record
/// with no result yet.
fn launch<'t>(
    ctx: &Ctx<'t>,
    w: &WorkloadSpec,
    b: &BackendSpec,
    round: usize,
    order: usize,
) -> (&'t Path, Vec<String>, RunRecord) {
    let params = LaunchParams {
        image: &ctx.image,
        size: ctx.args.image_size,
        socket: ctx.socket.to_str().unwrap_or("bench.sock"),
        poll_us: ctx.args.poll_us,
    };
    let bargs = plan::backend_args(b, w, &params);
    let prog = program(ctx.tools, b).unwrap_or(Path::new("?"));
    let rec = RunRecord {
        workload: w.id.to_string(),
        backend: b.id(),
        round,
        order,
        attempts: 0,
        command: format!("{} {}", prog.display(), bargs.join(" ")),
        result: None,
        error: None,
    };
    (prog, bargs, rec)
}

/// One unmeasured run of the first workload against each of its backends,
/// in round 1's order, before round 1. The first measured run follows the
/// image's preparation (4 GiB read back from the virtual disk) and the
/// wake-up probe, and whichever backend went first absorbed what the host
/// was still doing about them: that was always blkstack's QD1 run (in one
/// full run its p50 was 64.3 µs there and 58.6 µs in round 3, at 0.23 and
/// 0.08 % steal, while the two backends right after it measured 56.6
/// and 53.0 µs).
fn warm_up(ctx: &Ctx, workloads: &[WorkloadSpec]) -> Result<Vec<RunRecord>, String> {
    let Some(w) = workloads.first() else {
        return Ok(Vec::new());
    };
    let mut v = Vec::new();
    for (order, b) in plan::rotated(w, 0, 0).iter().enumerate() {
        let rec = with_image_ready(ctx, w, || {
            let (prog, bargs, mut rec) = launch(ctx, w, b, 0, order);
            rec.attempts = 1;
            let tag = format!("warmup-{}-{}", w.id, b.id());
            match run_once(ctx, w, b, prog, &bargs, &tag) {
                Ok(r) => rec.result = Some(r),
                Err(e) => rec.error = Some(e),
            }
            rec
        })?;
        eprintln!("compare: warm-up {} {}: {}", w.id, b.id(), rec.result.as_ref().map_or("failed".to_string(), |r| format!("{:.0} IOPS, p50 {} us", r.iops, latency(r, r.lat_us.p50))));
        v.push(rec);
    }
    Ok(v)
}

fn run_with_retries(
    ctx: &Ctx,
    w: &WorkloadSpec,
    b: &BackendSpec,
    round: usize,
    order: usize,
) -> RunRecord {
    let (prog, bargs, mut rec) = launch(ctx, w, b, round, order);
    for attempt in 1..=ctx.args.retries + 1 {
        rec.attempts = attempt;
        let tag = format!("r{}-{}-{}-a{attempt}", round + 1, w.id, b.id());
        match run_once(ctx, w, b, prog, &bargs, &tag) {
            Ok(r) => {
                let steal = r.host.steal_pct.unwrap_or(0.0);
                let better = rec
                    .result
                    .as_ref()
                    .is_none_or(|old| steal < old.host.steal_pct.unwrap_or(0.0));
                if better {
                    rec.result = Some(r);
                    rec.error = None;
                }
                // O_DIRECT reads make the hypervisor do the disk I/O, which
                // shows up as steal on every attempt: repeating cannot help.
                let exempt = w.backing == plan::Backing::Direct;
                if steal <= ctx.args.max_steal || attempt > ctx.args.retries || exempt {
                    break;
                }
                if ctx.retries_left.get() == 0 {
                    ctx.retries_skipped.set(ctx.retries_skipped.get() + 1);
                    eprintln!("compare: {tag}: steal {steal:.1} % but the retry budget is spent");
                    break;
                }
                ctx.retries_left.set(ctx.retries_left.get() - 1);
                eprintln!(
                    "compare: {tag}: steal {steal:.1} % > {} %, repeating",
                    ctx.args.max_steal
                );
            }
            Err(e) => {
                if rec.result.is_none() {
                    rec.error = Some(e);
                }
                break;
            }
        }
    }
    rec
}

/// Profiles blkstack with `perf` on the QD32 and QD1 random reads, the QD32
/// random writes and the `null` row
/// (separate runs, not counted in the figures).
fn profile_blkstack(
    ctx: &Ctx,
    blkstack: &Path,
    workloads: &[WorkloadSpec],
) -> Vec<profile::Profile> {
    if first_line(Path::new("perf"), &["--version"]).is_none() {
        eprintln!("compare: perf not found, no profile");
        return Vec::new();
    }
    let mut v = Vec::new();
    for id in ["rr32", "rr1", "rw32", "null"] {
        let Some(w) = workloads.iter().find(|w| w.id == id) else {
            continue;
        };
        let Some(b) = w.backends.iter().find(|b| b.is_blkstack()) else {
            continue;
        };
        let params = LaunchParams {
            image: &ctx.image,
            size: ctx.args.image_size,
            socket: ctx.socket.to_str().unwrap_or("bench.sock"),
            poll_us: ctx.args.poll_us,
        };
        let bargs = plan::backend_args(b, w, &params);
        let tag = format!("profile-{id}");
        let r = profile::run(ctx.logs.as_path(), &tag, |hook| {
            run_once_with(ctx, w, b, blkstack, &bargs, &tag, Some(hook))
        });
        match r {
            Ok(p) => v.push(p),
            Err(e) => eprintln!("compare: profile of {id} failed: {e}"),
        }
        if w.rw.writes() {
            let _ = runner::sync_image(Path::new(&ctx.image));
        }
    }
    v
}

fn run_once(
    ctx: &Ctx,
    w: &WorkloadSpec,
    b: &BackendSpec,
    prog: &Path,
    bargs: &[String],
    tag: &str,
) -> Result<BenchResult, String> {
    run_once_with(ctx, w, b, prog, bargs, tag, None)
}

/// Called with the backend's PID and the client's ramp and measured seconds
/// once the client is running; returns what to wait for afterwards.
pub type Hook<'a> = &'a mut dyn FnMut(u32, f64, f64) -> Option<std::process::Child>;

fn run_once_with(
    ctx: &Ctx,
    w: &WorkloadSpec,
    b: &BackendSpec,
    prog: &Path,
    bargs: &[String],
    tag: &str,
    hook: Option<Hook>,
) -> Result<BenchResult, String> {
    let blog = ctx.logs.join(format!("{tag}.backend.log"));
    // One-CPU rows: the first CPU this process may run on.
    let cpu = if w.one_cpu {
        let cpus = crate::runtime::affinity::allowed_cpus().map_err(|e| format!("CPU affinity: {e}"))?;
        Some(*cpus.0.first().ok_or("no CPU to run on")?)
    } else {
        None
    };
    let mut backend = Backend::start(prog, bargs, &ctx.socket, &blog, cpu)?;
    let cargs = client_args(w, &ctx.socket, ctx.seconds, ctx.ramp, backend.pid(), tag);
    let json = ctx.logs.join(format!("{tag}.json"));
    let clog = ctx.logs.join(format!("{tag}.client.log"));
    let limit = Duration::from_secs_f64(ctx.seconds + ctx.ramp + 30.0);
    let r = runner::run_client(&ctx.tools.exe, &cargs, &json, limit, &clog, cpu, |_| {
        hook.map(|h| h(backend.pid(), ctx.ramp, ctx.seconds))
    });
    // CH exits by itself once the client is gone; the others are stopped.
    let grace = if b.engine == Engine::Ch {
        Duration::from_secs(2)
    } else {
        Duration::ZERO
    };
    backend.stop(grace);
    r.map_err(|e| format!("{e} [backend: {}]", backend.log_tail()))
}

/// The client's command line for one run of `w`.
fn client_args(w: &WorkloadSpec, socket: &Path, seconds: f64, ramp: f64, pid: u32, tag: &str) -> Vec<String> {
    let socket = socket.to_string_lossy().into_owned();
    let (how, to) = match w.transport {
        plan::Transport::VhostUser => ("--socket", socket),
        plan::Transport::Nbd => ("--nbd", plan::nbd_uri(&socket)),
    };
    let mut cargs: Vec<String> = vec![
        how.into(),
        to,
        "--rw".into(),
        w.rw.name().into(),
        "--bs".into(),
        w.bs.to_string(),
        "--iodepth".into(),
        w.iodepth.to_string(),
        "--seconds".into(),
        seconds.to_string(),
        "--ramp".into(),
        ramp.to_string(),
        "--server-pid".into(),
        pid.to_string(),
        "--label".into(),
        tag.into(),
        "--quiet".into(),
    ];
    if w.transport == plan::Transport::VhostUser {
        cargs.extend(["--queues".into(), w.queues.to_string()]);
    }
    if w.client_poll {
        cargs.push("--poll".into());
    }
    cargs
}

#[cfg(test)]
mod tests;
