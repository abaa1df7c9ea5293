//! `bench/report.md`: medians per workload and backend, ratios of blkstack to
//! QSD and CH for every figure, the targets of issue 12, the machine.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use super::limits;
use super::plan::{self, WorkloadSpec};
use super::{CompareOutput, RunRecord};
use crate::bench::result::fmt_size;

/// Medians over the rounds of one workload against one backend.
#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Runs with a result.
    pub n: usize,
    /// Runs that failed.
    pub failed: usize,
    /// IOPS.
    pub iops: f64,
    /// MiB/s.
    pub mib_s: f64,
    /// Median latency, µs.
    pub p50: f64,
    /// p99 latency, µs.
    pub p99: f64,
    /// p99.9 latency, µs.
    pub p999: f64,
    /// Whether the client measured latency (`qemu-img bench` does not:
    /// the three figures above are then zero and shown as "–").
    pub latency: bool,
    /// Backend CPU s/s.
    pub cpu: Option<f64>,
    /// IOPS per backend CPU-second.
    pub iops_per_cpu: Option<f64>,
    /// Backend RSS at the end, MiB.
    pub rss_mib: Option<f64>,
    /// Times the backend's threads went to sleep per 1000 requests.
    pub sleeps_per_kreq: Option<f64>,
    /// CPU-s/s the idle loops spent polling (see `Host::idle_poll_cpus`).
    pub idle_poll: Option<f64>,
    /// Host steal, %, median.
    pub steal: f64,
    /// Host steal, %, worst run.
    pub steal_max: f64,
}

/// The median (mean of the middle two for an even count); None when empty.
pub fn median(mut v: Vec<f64>) -> Option<f64> {
    v.retain(|x| x.is_finite());
    if v.is_empty() {
        return None;
    }
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    Some(if v.len() % 2 == 1 {
        v[m]
    } else {
        (v[m - 1] + v[m]) / 2.0
    })
}

fn stats(records: &[&RunRecord]) -> Stats {
    let rs: Vec<_> = records.iter().filter_map(|r| r.result.as_ref()).collect();
    let col = |f: &dyn Fn(&crate::bench::BenchResult) -> Option<f64>| {
        median(rs.iter().filter_map(|r| f(r)).collect())
    };
    let steals: Vec<f64> = rs.iter().filter_map(|r| r.host.steal_pct).collect();
    Stats {
        n: rs.len(),
        failed: records.len() - rs.len(),
        iops: col(&|r| Some(r.iops)).unwrap_or(0.0),
        mib_s: col(&|r| Some(r.mib_s)).unwrap_or(0.0),
        p50: col(&|r| Some(r.lat_us.p50)).unwrap_or(0.0),
        p99: col(&|r| Some(r.lat_us.p99)).unwrap_or(0.0),
        p999: col(&|r| Some(r.lat_us.p99_9)).unwrap_or(0.0),
        latency: rs.iter().all(|r| r.workload.client.has_latency()),
        cpu: col(&|r| r.backend.as_ref().and_then(|b| b.cpu_s_per_s)),
        iops_per_cpu: col(&|r| {
            let c = r.backend.as_ref().and_then(|b| b.cpu_s_per_s)?;
            (c > 0.0).then(|| r.iops / c)
        }),
        rss_mib: col(&|r| {
            r.backend
                .as_ref()
                .and_then(|b| b.rss_kib)
                .map(|k| k as f64 / 1024.0)
        }),
        sleeps_per_kreq: col(&|r| {
            let z = r.backend.as_ref().and_then(|b| b.sleeps_per_s)?;
            (r.iops > 0.0).then(|| z / r.iops * 1000.0)
        }),
        idle_poll: col(&|r| r.host.idle_poll_cpus),
        steal: median(steals.clone()).unwrap_or(0.0),
        steal_max: steals.iter().copied().fold(0.0, f64::max),
    }
}

/// Medians keyed by (workload id, backend id).
pub fn all_stats(out: &CompareOutput) -> BTreeMap<(String, String), Stats> {
    let mut groups: BTreeMap<(String, String), Vec<&RunRecord>> = BTreeMap::new();
    for r in &out.records {
        groups
            .entry((r.workload.clone(), r.backend.clone()))
            .or_default()
            .push(r);
    }
    groups.into_iter().map(|(k, v)| (k, stats(&v))).collect()
}

/// Compact number: 132456 → "132k", 2.5 → "2.50".
pub fn num(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.0}k", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0}")
    } else if v >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

pub(super) fn opt(v: Option<f64>) -> String {
    v.map_or("–".into(), num)
}

pub(super) fn ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 && a.is_finite() => format!("{:.2}×", a / b),
        _ => "–".into(),
    }
}

type Col = (&'static str, fn(&Stats) -> Option<f64>);

const COLS: [Col; 10] = [
    ("IOPS", |s| Some(s.iops)),
    ("MiB/s", |s| Some(s.mib_s)),
    ("p50 µs", |s| s.latency.then_some(s.p50)),
    ("p99 µs", |s| s.latency.then_some(s.p99)),
    ("p99.9 µs", |s| s.latency.then_some(s.p999)),
    ("CPU s/s", |s| s.cpu),
    ("IOPS/CPU-s", |s| s.iops_per_cpu),
    ("RSS MiB", |s| s.rss_mib),
    ("sleeps/1k req", |s| s.sleeps_per_kreq),
    ("steal %", |s| Some(s.steal)),
];

fn backend_title(w: &WorkloadSpec, id: &str) -> String {
    w.backends
        .iter()
        .find(|b| b.id() == id)
        .map_or(id.to_string(), |b| b.title())
}

/// Reference backends of a workload: the first QSD row and the CH row.
fn refs(w: &WorkloadSpec) -> (Option<String>, Option<String>) {
    let qsd = w
        .backends
        .iter()
        .find(|b| matches!(b.engine, plan::Engine::Qsd(_)))
        .map(|b| b.id());
    let ch = w
        .backends
        .iter()
        .find(|b| b.engine == plan::Engine::Ch)
        .map(|b| b.id());
    (qsd, ch)
}

fn workload_table(s: &mut String, w: &WorkloadSpec, st: &BTreeMap<(String, String), Stats>) {
    let get = |b: &str| st.get(&(w.id.to_string(), b.to_string()));
    let _ = writeln!(
        s,
        "\n### {} (`{}`: {} bs={} iodepth={} {})\n",
        w.title,
        w.id,
        w.rw.name(),
        fmt_size(w.bs),
        w.iodepth,
        match w.transport {
            plan::Transport::VhostUser => format!("queues={}", w.queues),
            plan::Transport::Nbd => "over NBD".to_string(),
        }
    );
    let head: Vec<&str> = COLS.iter().map(|c| c.0).collect();
    let _ = writeln!(s, "| backend | {} | runs |", head.join(" | "));
    let _ = writeln!(s, "|---|{}---|", "---:|".repeat(COLS.len()));
    for b in &w.backends {
        let Some(x) = get(&b.id()) else { continue };
        let cells: Vec<String> = COLS.iter().map(|c| opt(c.1(x))).collect();
        let runs = if x.failed > 0 {
            format!("{} (+{} failed)", x.n, x.failed)
        } else {
            x.n.to_string()
        };
        let _ = writeln!(s, "| {} | {} | {runs} |", b.title(), cells.join(" | "));
    }
    let Some(bid) = w.backends.iter().find(|b| b.is_blkstack()).map(|b| b.id()) else {
        return;
    };
    let Some(bx) = get(&bid).filter(|x| x.n > 0) else {
        return;
    };
    let (qsd, ch) = refs(w);
    for r in [qsd, ch].into_iter().flatten() {
        let Some(rx) = get(&r).filter(|x| x.n > 0) else {
            continue;
        };
        let cells: Vec<String> = COLS.iter().map(|c| ratio(c.1(bx), c.1(rx))).collect();
        let _ = writeln!(
            s,
            "| *blkstack / {}* | {} | |",
            backend_title(w, &r),
            cells.join(" | ")
        );
    }
}

/// One target of issue 12 and how it came out.
pub struct Target {
    /// What is required.
    pub what: String,
    /// What was measured.
    pub measured: String,
    /// Met, not met, or unknown (no data).
    pub met: Option<bool>,
}

fn target_ratio(
    st: &BTreeMap<(String, String), Stats>,
    wl: &str,
    other: &str,
    field: fn(&Stats) -> Option<f64>,
    want: f64,
    higher_better: bool,
    what: String,
) -> Target {
    let ours = if other.ends_with("-poll") {
        "blkstack-poll"
    } else {
        "blkstack"
    };
    target_pair(st, wl, ours, other, field, want, higher_better, what)
}

/// [`target_ratio`] with blkstack's backend id given.
#[allow(clippy::too_many_arguments)]
fn target_pair(
    st: &BTreeMap<(String, String), Stats>,
    wl: &str,
    ours: &str,
    other: &str,
    field: fn(&Stats) -> Option<f64>,
    want: f64,
    higher_better: bool,
    what: String,
) -> Target {
    let get = |b: &str| {
        st.get(&(wl.to_string(), b.to_string()))
            .filter(|x| x.n > 0)
            .and_then(field)
    };
    match (get(ours), get(other)) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            let met = if higher_better { r >= want } else { r <= want };
            Target {
                what,
                measured: format!("{} vs {} = {r:.2}×", num(a), num(b)),
                met: Some(met),
            }
        }
        (a, b) => Target {
            what,
            measured: format!("no data (blkstack {}, {other} {})", opt(a), opt(b)),
            met: None,
        },
    }
}

/// The targets of issue 12, evaluated on the medians.
pub fn targets(st: &BTreeMap<(String, String), Stats>) -> Vec<Target> {
    let iops: fn(&Stats) -> Option<f64> = |s| Some(s.iops);
    let mut t = Vec::new();
    for (wl, ch, name) in [
        ("rr32", "ch", "4k randread QD32"),
        ("rr32-poll", "ch-poll", "4k randread QD32, polling"),
        ("rw32", "ch", "4k randwrite QD32"),
        ("rw32-poll", "ch-poll", "4k randwrite QD32, polling"),
    ] {
        t.push(target_ratio(
            st,
            wl,
            ch,
            iops,
            1.25,
            true,
            format!("{name}: IOPS ≥ 1.25× CH"),
        ));
    }
    for (wl, ch, qsd, name) in [
        ("rr1", "ch", "qsd", "QD1 4k randread"),
        (
            "rr1-poll",
            "ch-poll",
            "qsd-poll",
            "QD1 4k randread, polling",
        ),
    ] {
        t.push(target_ratio(
            st,
            wl,
            ch,
            |s| Some(s.p50),
            1.0,
            false,
            format!("{name}: p50 ≤ CH"),
        ));
        t.push(target_ratio(
            st,
            wl,
            qsd,
            |s| Some(s.p99),
            1.0,
            false,
            format!("{name}: p99 ≤ QSD"),
        ));
    }
    let mib: fn(&Stats) -> Option<f64> = |s| Some(s.mib_s);
    t.push(target_ratio(
        st,
        "seq1m",
        "qsd",
        mib,
        1.3,
        true,
        "1M read QD8: MiB/s ≥ 1.3× QSD io_uring".into(),
    ));
    t.push(target_ratio(
        st,
        "seq1m",
        "qsd-threads",
        mib,
        1.0,
        true,
        "1M read QD8: MiB/s ≥ QSD aio=threads".into(),
    ));
    t.push(target_ratio(
        st,
        "direct",
        "qsd-native",
        iops,
        1.0,
        true,
        "O_DIRECT 4k randread QD32: IOPS ≥ QSD aio=native".into(),
    ));
    // The issue names no client or polling mode for `null`: the sleeping
    // client with neither backend polling (as in every other polling-off
    // row), the polling client, and (below) each backend's polling default
    // are all judged.
    for (wl, name) in [
        ("null", "null 4k randread QD32"),
        ("null-cpoll", "null 4k randread QD32, client polling"),
    ] {
        t.push(target_ratio(
            st,
            wl,
            "qsd",
            |s| s.iops_per_cpu,
            2.0,
            true,
            format!("{name}: IOPS per CPU-s ≥ 2× QSD"),
        ));
        t.push(target_ratio(
            st,
            wl,
            "qsd",
            iops,
            1.0,
            true,
            format!("{name}: IOPS ≥ QSD"),
        ));
    }
    // Each backend's polling default: blkstack's adaptive window against
    // QSD's main loop and against an iothread (QEMU's adaptive polling).
    for (qsd, name) in [
        ("qsd", "null 4k randread QD32, polling defaults (QSD main loop)"),
        ("qsd-poll", "null 4k randread QD32, polling defaults (QSD iothread)"),
    ] {
        t.push(target_pair(
            st,
            "null-adaptive",
            "blkstack",
            qsd,
            |s| s.iops_per_cpu,
            2.0,
            true,
            format!("{name}: IOPS per CPU-s ≥ 2× QSD"),
        ));
        t.push(target_pair(
            st,
            "null-adaptive",
            "blkstack",
            qsd,
            iops,
            1.0,
            true,
            format!("{name}: IOPS ≥ QSD"),
        ));
    }
    t.push(target_ratio(
        st,
        "rr32",
        "ch",
        |s| s.rss_mib,
        1.0,
        false,
        "resident memory, one export (end of 4k randread QD32): ≤ CH".into(),
    ));
    t
}

fn machine_section(s: &mut String, out: &CompareOutput) {
    let m = &out.machine;
    let steals: Vec<f64> = out
        .records
        .iter()
        .filter_map(|r| r.result.as_ref()?.host.steal_pct)
        .collect();
    let busy: Vec<f64> = out
        .records
        .iter()
        .filter_map(|r| r.result.as_ref()?.host.busy_cpus)
        .collect();
    let loads: Vec<f64> = out
        .records
        .iter()
        .filter_map(|r| r.result.as_ref()?.host.loadavg_1m)
        .collect();
    let repeated = out.records.iter().filter(|r| r.attempts > 1).count();
    let over = out
        .records
        .iter()
        .filter(|r| {
            r.result
                .as_ref()
                .and_then(|x| x.host.steal_pct)
                .unwrap_or(0.0)
                > out.max_steal
        })
        .count();
    let _ = writeln!(s, "\n## Machine and conditions\n");
    let _ = writeln!(
        s,
        "- CPU: {} × {} ({} MiB RAM), kernel {}",
        m.cpus, m.cpu, m.mem_mib, m.kernel
    );
    let _ = writeln!(
        s,
        "- {} ; CH peer: {} ; blkstack commit {}",
        m.qsd, m.ch, m.blkstack
    );
    let _ = writeln!(
        s,
        "- Run started {} UTC, took {:.0} s: {} round(s), {} s measured + {} s ramp per run, image {} ({}).",
        out.started,
        out.wall_s,
        out.rounds,
        out.seconds,
        out.ramp,
        out.image,
        fmt_size(out.image_size)
    );
    if !out.quick && out.seconds < 10.0 {
        let _ = writeln!(
            s,
            "- Runs measure {} s instead of the issue's 10 s so that the whole comparison (3 rounds, steal repeats, profile) \
             fits in about 25 minutes on this machine.",
            out.seconds
        );
    }
    let _ = writeln!(
        s,
        "- Host steal per run: median {:.2} %, max {:.2} %; {} run(s) repeated for steal > {} %, {} still above after repeats ({} repeat(s) skipped: retry budget spent).",
        median(steals.clone()).unwrap_or(0.0),
        steals.iter().copied().fold(0.0, f64::max),
        repeated,
        out.max_steal,
        over,
        out.retries_skipped
    );
    let _ = writeln!(
        s,
        "- Load average (1 min) {:.2} before, {:.2} after, at the end of each run median {:.2}, max {:.2}; busy CPUs during runs: \
         median {:.2} of {} (client + backend + anything else on the machine: a load above ~2 means other work shared the CPUs).",
        m.load_before,
        m.load_after,
        median(loads.clone()).unwrap_or(0.0),
        loads.iter().copied().fold(0.0, f64::max),
        median(busy).unwrap_or(0.0),
        m.cpus
    );
    if let Some(i) = &m.idle {
        limits::idle_line(s, i, out);
    }
    if let Some(w) = &m.wake {
        limits::wake_lines(s, w);
    }
    for n in &out.notes {
        let _ = writeln!(s, "- Note: {n}");
    }
}

fn method_section(s: &mut String, out: &CompareOutput) {
    let _ = writeln!(s, "\n## Method\n");
    let polled: Vec<String> = plan::workloads()
        .into_iter()
        .filter(|w| w.client_poll && out.workloads.iter().any(|x| x == w.id))
        .map(|w| format!("`{}`", w.id))
        .collect();
    let _ = writeln!(
        s,
        "- Client: `blkstack bench` (libblkio 0.5, `virtio-blk-vhost-user`), one thread per queue, \
         `iodepth` requests always in flight, completions waited for on the eventfd{}. \
         Latency is from queueing in libblkio to reaping.",
        if polled.is_empty() {
            " (the client never polls here)".to_string()
        } else {
            format!(", except in {}, where the client busy-polls them (`--poll`) and so never sleeps", polled.join(", "))
        }
    );
    let nbd: Vec<String> = plan::workloads()
        .into_iter()
        .filter(|w| w.transport == plan::Transport::Nbd && out.workloads.iter().any(|x| x == w.id))
        .map(|w| format!("`{}`", w.id))
        .collect();
    if !nbd.is_empty() {
        let _ = writeln!(
            s,
            "- {} reach the same image through an NBD export on the same socket path instead, driven by `qemu-img bench` (QEMU's NBD client, one connection; `blkstack bench --nbd`): sequential requests wrapping at the image's end, a calibration run sized to the ramp, then one run sized to the measured time; figures over that run's whole life (start-up and handshake included). It reports no latency, and CH has no NBD server. Not targets of the issue.",
            nbd.join(", ")
        );
    }
    if let Some(first) = out.warm_up.first() {
        let _ = writeln!(
            s,
            "- Before round 1, `{}` ran once against each backend unmeasured (warm-up: the first measured run \
             would otherwise take whatever the host was still doing about the image's preparation and the wake-up \
             probe); those runs are listed first under every run below and count in no figure.",
            first.workload
        );
    }
    let _ = writeln!(
        s,
        "- Polling rows turn on polling in the backend only: blkstack `poll-us={}`, CH `poll_queue=true`, \
         QSD with the export in an iothread (adaptive AioContext polling, default `poll-max-ns`). The other rows \
         run without backend polling: blkstack with `poll-max-ns=0` (its default polls adaptively), CH with \
         `poll_queue=false`, QSD in its main loop; except `null-adaptive`, which runs each backend as it polls by \
         default: blkstack's adaptive window, QSD's main loop, and QSD with an iothread.",
        out.poll_us
    );
    let _ = writeln!(
        s,
        "- Each run gets a fresh backend process on the same image (page cached in 4 KiB folios: dropped and \
         read back with readahead off at the start, pre-read the same way before every run, since the folio \
         size decides what ext4 spends on a 4 KiB buffered write; the O_DIRECT row opens it with `cache.direct=on` / `direct=true`); backends alternate, the first \
         rotating each round; the image is synced after runs that write. Figures are medians over the rounds; \
         CPU is the backend's utime+stime per wall second; RSS is VmRSS at the end of the measured time; \
         sleeps are the backend threads' voluntary context switches (each one a wake-up it pays for) per 1000 requests."
    );
    let _ = writeln!(
        s,
        "- Runs with host steal above {} % were repeated (the least-stolen attempt is kept), except the O_DIRECT row, \
         whose disk reads are served by the hypervisor and show up as steal on every attempt.",
        out.max_steal
    );
    let _ = writeln!(s, "- Ratios are blkstack ÷ other for every column: above 1 is better for IOPS, MiB/s and IOPS/CPU-s; below 1 is better for latency, CPU and RSS.");
}

fn profiles(s: &mut String, out: &CompareOutput) {
    if out.profiles.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n## Profile of blkstack (`perf record -g`, self time)\n"
    );
    let _ = writeln!(s, "Separate runs under `perf` (not counted above), sampled at 1999 Hz during the measured part.");
    for p in &out.profiles {
        let _ = writeln!(
            s,
            "\n### `{}`: {} IOPS, backend CPU {} s/s\n\n```\n{}\n\n{}\n```",
            p.workload,
            num(p.iops),
            opt(p.cpu_s_per_s),
            p.dsos,
            p.symbols
        );
    }
}

fn all_runs(s: &mut String, out: &CompareOutput) {
    let _ = writeln!(
        s,
        "\n<details><summary>Every run (in run order)</summary>\n"
    );
    let _ = writeln!(s, "| round | workload | backend | IOPS | MiB/s | p50 µs | p99 µs | CPU s/s | steal % | busy CPUs | idle-poll CPUs | load 1 min | attempts |");
    let _ = writeln!(
        s,
        "|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    let warm = out.warm_up.iter().map(|r| (true, r));
    for (warm_up, r) in warm.chain(out.records.iter().map(|r| (false, r))) {
        let cells = match &r.result {
            Some(x) => format!(
                "{} | {} | {} | {} | {} | {} | {} | {} | {}",
                num(x.iops),
                num(x.mib_s),
                opt(x.workload.client.has_latency().then_some(x.lat_us.p50)),
                opt(x.workload.client.has_latency().then_some(x.lat_us.p99)),
                opt(x.backend.as_ref().and_then(|b| b.cpu_s_per_s)),
                opt(x.host.steal_pct),
                opt(x.host.busy_cpus),
                opt(x.host.idle_poll_cpus),
                opt(x.host.loadavg_1m)
            ),
            None => "failed | | | | | | | |".to_string(),
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {cells} | {} |",
            if warm_up { "warm-up".to_string() } else { (r.round + 1).to_string() },
            r.workload,
            r.backend,
            r.attempts
        );
    }
    let _ = writeln!(s, "\n</details>");
}

fn failures(s: &mut String, out: &CompareOutput) {
    let failed: Vec<&RunRecord> = out.records.iter().filter(|r| r.result.is_none()).collect();
    if failed.is_empty() {
        return;
    }
    let _ = writeln!(s, "\n## Runs that failed\n");
    let mut seen = std::collections::BTreeSet::new();
    for r in failed {
        let e = r.error.as_deref().unwrap_or("?");
        if seen.insert((r.backend.clone(), e.to_string())) {
            let _ = writeln!(
                s,
                "- `{}` on `{}` (round {}): {}",
                r.backend,
                r.workload,
                r.round + 1,
                e.replace('\n', " ")
            );
        }
    }
}

/// How a report names the command that wrote it and its companion files.
pub struct Links {
    /// The comparison's options (after `compare`), empty for the default run.
    pub options: String,
    /// The raw results, as a path to show.
    pub results: String,
    /// The chart, as a link relative to the report.
    pub chart: String,
}

impl Links {
    /// Links for a report written to `report` beside a chart at `svg`, from
    /// the results at `results`.
    pub fn new(options: &[String], report: &Path, svg: &Path, results: &Path) -> Links {
        let chart = match (report.parent(), svg.parent(), svg.file_name()) {
            (Some(a), Some(b), Some(name)) if a == b => name.to_string_lossy().into_owned(),
            _ => svg.display().to_string(),
        };
        Links {
            options: options.join(" "),
            results: results.display().to_string(),
            chart,
        }
    }
}

impl Default for Links {
    /// The links of `make bench`'s report.
    fn default() -> Links {
        Links {
            options: String::new(),
            results: "bench/out/results.json".into(),
            chart: "report.svg".into(),
        }
    }
}

/// The whole report.
pub fn markdown(out: &CompareOutput, links: &Links) -> String {
    let st = all_stats(out);
    let ws: Vec<WorkloadSpec> = plan::workloads()
        .into_iter()
        .filter(|w| out.workloads.iter().any(|x| x == w.id))
        .collect();
    let mut s =
        String::from("# blkstack vs qemu-storage-daemon vs cloud-hypervisor vhost_user_block\n\n");
    let command = if links.options.is_empty() {
        "`blkstack bench compare` (`make bench`)".to_string()
    } else {
        format!("`blkstack bench compare {}`", links.options)
    };
    let changed = match (out.machine.halt_poll_was, out.machine.idle.as_ref().and_then(|i| i.guest_halt_poll_ns)) {
        (Some(was), Some(now)) if was != now => format!(
            ", run by `GUEST_HALT_POLL_NS={now} bash bench/compare.sh`: **not the machine as configured** (its idle \
             vCPUs {}; here they polled for up to {now} ns first)",
            if was == 0 { "halt at once".to_string() } else { format!("poll for up to {was} ns before they halt") }
        ),
        _ => String::new(),
    };
    let _ = writeln!(
        s,
        "Written by {command}{changed}{}. Raw results: `{}`. Chart: [{}]({}).",
        if out.quick {
            " in **quick mode** (not for conclusions)"
        } else {
            ""
        },
        links.results,
        links.chart,
        links.chart
    );
    let _ = writeln!(s, "\n## Targets (issue 12), from the medians of this run\n");
    let _ = writeln!(
        s,
        "| target | measured (blkstack vs other) | met |\n|---|---|---|"
    );
    for t in targets(&st) {
        let met = match t.met {
            Some(true) => "yes",
            Some(false) => "**no**",
            None => "–",
        };
        let _ = writeln!(s, "| {} | {} | {met} |", t.what, t.measured);
    }
    let _ = writeln!(s, "{}", scaling_target(&st, out.machine.cpus));
    limits::qd1_floor(&mut s, out, &st);
    limits::null_limits(&mut s, out, &st);
    let _ = writeln!(s, "\n## Results (medians of {} round(s))", out.rounds);
    for w in &ws {
        workload_table(&mut s, w, &st);
    }
    scaling(&mut s, &st);
    machine_section(&mut s, out);
    method_section(&mut s, out);
    profiles(&mut s, out);
    failures(&mut s, out);
    all_runs(&mut s, out);
    let _ = writeln!(s, "\n## Reproduce\n");
    let _ = writeln!(s, "```\nmake bench                     # = bash bench/compare.sh (full run, ~25 min on 2 cores)\nbash bench/compare.sh --quick  # 1 round, 2 s per run, main workloads\ntarget/release/blkstack bench compare --only rr32 --rounds 1\ntarget/release/blkstack bench compare --from bench/out/results.json  # rebuild this report\n```");
    if let Some(r) = out
        .records
        .iter()
        .find(|r| r.workload == "rr32" && r.backend == "blkstack")
    {
        let _ = writeln!(s, "\nOne run by hand (blkstack, 4k randread QD32):\n\n```\n{} &\ntarget/release/blkstack bench --socket {} --rw randread --bs 4k --iodepth 32 --seconds {} --server-pid $!\n```", r.command, out.socket, out.seconds);
    }
    s
}

fn iops_of(st: &BTreeMap<(String, String), Stats>, wl: &str, b: &str) -> Option<f64> {
    st.get(&(wl.to_string(), b.to_string()))
        .filter(|x| x.n > 0)
        .map(|x| x.iops)
}

fn iops_per_cpu_of(st: &BTreeMap<(String, String), Stats>, wl: &str, b: &str) -> Option<f64> {
    st.get(&(wl.to_string(), b.to_string()))
        .filter(|x| x.n > 0)
        .and_then(|x| x.iops_per_cpu)
}

/// What a machine too small for the scaling target can still show: how
/// much of one queue's work per backend CPU-second `n` queues keep (the
/// client shares the CPUs, so IOPS cannot scale there; per-CPU cost can).
fn per_cpu_kept(st: &BTreeMap<(String, String), Stats>, wl: &str) -> Option<f64> {
    let one = iops_per_cpu_of(st, "rr32", "blkstack").filter(|v| *v > 0.0)?;
    Some(iops_per_cpu_of(st, wl, "blkstack")? / one)
}

fn scaling_target(st: &BTreeMap<(String, String), Stats>, cpus: usize) -> String {
    use plan::SCALING_CPUS;
    let what = "| multi-queue 4k randread QD32: 8 queues ≥ 90 % of 8× one queue";
    if cpus < SCALING_CPUS {
        let had = if iops_of(st, "mq8", "blkstack").is_some() {
            " (the 8-queue run below shares them, so it says nothing about scaling)"
        } else {
            ""
        };
        let kept: Vec<String> = [("mq2", 2), ("mq4", 4)]
            .iter()
            .filter_map(|&(wl, n)| per_cpu_kept(st, wl).map(|k| format!("{n} queues {:.0} %", 100.0 * k)))
            .collect();
        let kept = if kept.is_empty() {
            String::new()
        } else {
            format!("; IOPS per backend CPU-s kept from one queue: {}", kept.join(", "))
        };
        return format!(
            "{what} | not measured: needs {SCALING_CPUS} CPUs (8 client + 8 backend threads), this machine has {cpus}{had}; 1/2/4-queue figures below{kept} | – |"
        );
    }
    match (
        iops_of(st, "rr32", "blkstack"),
        iops_of(st, "mq8", "blkstack"),
    ) {
        (Some(one), Some(eight)) if one > 0.0 => {
            let eff = eight / (8.0 * one);
            let met = if eff >= 0.9 { "yes" } else { "**no**" };
            format!(
                "{what} | {} vs 8 × {} = {:.0} % of linear on {cpus} CPUs | {met} |",
                num(eight),
                num(one),
                eff * 100.0
            )
        }
        _ => format!("{what} | no data | – |"),
    }
}

fn scaling(s: &mut String, st: &BTreeMap<(String, String), Stats>) {
    // Without the one-queue row (an `--only` run of other rows) there is
    // nothing to scale against.
    if !["blkstack", "qsd", "ch"].iter().any(|b| iops_of(st, "rr32", b).is_some()) {
        return;
    }
    let _ = writeln!(
        s,
        "\n### Queue scaling, 4k randread QD32 per queue (IOPS; % of linear)\n"
    );
    let _ = writeln!(
        s,
        "| backend | 1 queue | 2 queues | 4 queues | 8 queues |\n|---|---:|---:|---:|---:|"
    );
    for b in ["blkstack", "qsd", "ch"] {
        let Some(one) = iops_of(st, "rr32", b) else {
            continue;
        };
        let cell = |wl: &str, n: f64| {
            iops_of(st, wl, b).map_or("–".into(), |v| {
                format!("{} ({:.0} %)", num(v), 100.0 * v / (n * one))
            })
        };
        let _ = writeln!(
            s,
            "| {b} | {} | {} | {} | {} |",
            num(one),
            cell("mq2", 2.0),
            cell("mq4", 4.0),
            cell("mq8", 8.0)
        );
    }
    let _ = writeln!(
        s,
        "\nIOPS per backend CPU-second (% of one queue's): where the client and the backend share fewer CPUs than they have threads, IOPS cannot grow with queues, but the backend's cost per request should not either.\n"
    );
    let _ = writeln!(
        s,
        "| backend | 1 queue | 2 queues | 4 queues | 8 queues |\n|---|---:|---:|---:|---:|"
    );
    for b in ["blkstack", "qsd", "ch"] {
        let Some(one) = iops_per_cpu_of(st, "rr32", b).filter(|v| *v > 0.0) else {
            continue;
        };
        let cell = |wl: &str| {
            iops_per_cpu_of(st, wl, b).map_or("–".into(), |v| format!("{} ({:.0} %)", num(v), 100.0 * v / one))
        };
        let _ = writeln!(s, "| {b} | {} | {} | {} | {} |", num(one), cell("mq2"), cell("mq4"), cell("mq8"));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn links_name_the_files_written() {
        // (options, report, chart, results) -> (chart link, results, options)
        let cases: [(&[&str], [&str; 3], [&str; 3]); 2] = [
            (
                &[],
                [
                    "bench/report.md",
                    "bench/report.svg",
                    "bench/out/results.json",
                ],
                ["report.svg", "bench/out/results.json", ""],
            ),
            (
                &["--only", "rw32"],
                ["bench/report-rw.md", "/tmp/rw.svg", "/tmp/o/results.json"],
                ["/tmp/rw.svg", "/tmp/o/results.json", "--only rw32"],
            ),
        ];
        for (opts, [report, svg, results], want) in cases {
            let opts: Vec<String> = opts.iter().map(|o| o.to_string()).collect();
            let l = Links::new(&opts, Path::new(report), Path::new(svg), Path::new(results));
            assert_eq!(
                [l.chart.as_str(), l.results.as_str(), l.options.as_str()],
                want
            );
        }
    }

    #[test]
    fn scaling_is_judged_only_with_a_cpu_per_thread() {
        let mut st = BTreeMap::new();
        for (wl, iops) in [("rr32", 100_000.0), ("mq8", 760_000.0)] {
            st.insert(
                (wl.to_string(), "blkstack".to_string()),
                Stats {
                    n: 1,
                    iops,
                    ..Stats::default()
                },
            );
        }
        let on16 = scaling_target(&st, 16);
        assert!(
            on16.contains("= 95 % of linear on 16 CPUs | yes |"),
            "{on16}"
        );
        let on2 = scaling_target(&st, 2);
        assert!(
            on2.contains("not measured: needs 16 CPUs")
                && on2.contains("says nothing about scaling")
                && on2.ends_with("| – |"),
            "{on2}"
        );
        assert!(!on2.contains("kept"), "no CPU figures, no per-CPU line: {on2}");
        for (wl, iops_per_cpu) in [("rr32", 400_000.0), ("mq2", 380_000.0), ("mq4", 300_000.0)] {
            let e = st.entry((wl.to_string(), "blkstack".to_string())).or_insert(Stats { n: 1, ..Stats::default() });
            e.iops_per_cpu = Some(iops_per_cpu);
        }
        let on2 = scaling_target(&st, 2);
        assert!(on2.contains("IOPS per backend CPU-s kept from one queue: 2 queues 95 %, 4 queues 75 % | – |"), "{on2}");
        let mut table = String::new();
        scaling(&mut table, &st);
        assert!(table.contains("| blkstack | 400k | 380k (95 %) | 300k (75 %) | – |"), "{table}");
        st.clear();
        assert!(scaling_target(&st, 16).contains("no data"));
    }

    #[test]
    fn medians() {
        assert_eq!(median(vec![]), None);
        assert_eq!(median(vec![3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(vec![4.0, 1.0, 2.0, 3.0]), Some(2.5));
        assert_eq!(median(vec![f64::NAN, 1.0]), Some(1.0));
    }

    #[test]
    fn numbers() {
        assert_eq!(num(132_456.0), "132k");
        assert_eq!(num(2.5), "2.50");
        assert_eq!(num(250.4), "250");
        assert_eq!(ratio(Some(2.0), Some(1.0)), "2.00×");
        assert_eq!(ratio(Some(2.0), Some(0.0)), "–");
    }
}
