//! What the machine's wake-up cost ([`crate::bench::wake`]) bounds, written
//! into the report: the probe's figures under "Machine and conditions", the
//! floor it puts under the QD1 rows without polling, and the most any
//! backend that sleeps between batches can do in the `null` row.

use std::collections::BTreeMap;
use std::fmt::Write as _;

use super::plan;
use super::report::{num, opt, ratio, Stats};
use super::CompareOutput;

fn ping_pong_line(p: &crate::bench::wake::PingPong) -> String {
    format!(
        "round trip {:.1} µs; CPU per round trip {:.1} µs (sleeping side: epoll_wait, read, write) and {:.1} µs (other side)",
        p.round_trip_us, p.server_cpu_us, p.client_cpu_us
    )
}

/// The kernel's default for haltpoll's `guest_halt_poll_ns`.
const HALT_POLL_DEFAULT_NS: u64 = 200_000;

/// How the CPUs idle, and how much the idle loops polled during the runs.
pub(super) fn idle_line(s: &mut String, i: &crate::bench::procfs::IdleConfig, out: &CompareOutput) {
    let polled: Vec<f64> = out
        .records
        .iter()
        .filter_map(|r| r.result.as_ref()?.host.idle_poll_cpus)
        .collect();
    let mut parts = vec![format!(
        "cpuidle driver {}, governor {}",
        i.driver.as_deref().unwrap_or("–"),
        i.governor.as_deref().unwrap_or("–")
    )];
    if let Some(ns) = i.guest_halt_poll_ns {
        parts.push(format!("haltpoll's `guest_halt_poll_ns` {ns} (the kernel's default is {HALT_POLL_DEFAULT_NS})"));
    }
    let mut line = format!("- Idle CPUs: {}", parts.join(", "));
    if i.halts_at_once() {
        line += ": an idle vCPU halts at once, so waking a thread that sleeps on it takes the hypervisor's wake-up of a halted vCPU";
    }
    if let Some(max) = polled.iter().copied().reduce(f64::max) {
        let _ = write!(
            line,
            "; the idle loops polled (cpuidle's `POLL` state, counted as idle by the kernel and so in no backend's CPU) \
             median {:.2}, max {:.2} CPU-s/s during runs",
            super::report::median(polled).unwrap_or(0.0),
            max
        );
    }
    let _ = writeln!(s, "{line}.");
}

pub(super) fn wake_lines(s: &mut String, w: &crate::bench::wake::WakeProbe) {
    let _ = writeln!(
        s,
        "- Wake-up cost (two threads passing a token through eventfds, as a vhost-user frontend and a backend that sleeps do):"
    );
    if let Some(p) = &w.cross_cpu {
        let _ = writeln!(
            s,
            "  - on CPUs {} and {}: {}.",
            p.client_cpu,
            p.server_cpu,
            ping_pong_line(p)
        );
    }
    if let Some(p) = &w.same_cpu {
        let _ = writeln!(
            s,
            "  - both on CPU {}: {}.",
            p.client_cpu,
            ping_pong_line(p)
        );
    }
    if w.taken_us.len() > 1 {
        let all: Vec<String> = w.taken_us.iter().map(|t| format!("{t:.1}")).collect();
        let _ = writeln!(
            s,
            "  - probed before and after the runs, cross-CPU round trips {} µs: the shortest is used (host noise only lengthens a round trip).",
            all.join(" and ")
        );
    }
    for n in &w.notes {
        let _ = writeln!(s, "  - {n}");
    }
}

/// The probe's cross-CPU figure, unless the run's own measurements
/// contradict it (a QD1 p50 well under its round trip, or `null` IOPS well
/// over the bound it implies for a backend that sleeps once per batch): then the probe caught a disturbed moment and
/// nothing is derived from it. `Err` says why.
fn usable_probe(
    out: &CompareOutput,
    st: &BTreeMap<(String, String), Stats>,
) -> Option<Result<crate::bench::wake::PingPong, String>> {
    let p = out.machine.wake.as_ref().and_then(|w| w.cross_cpu)?;
    let null_depth = plan::workloads().into_iter().find(|w| w.id == "null").map_or(32, |w| w.iodepth);
    let mut against = Vec::new();
    for ((wl, b), x) in st.iter().filter(|(_, x)| x.n > 0) {
        let title = plan::workloads()
            .into_iter()
            .flat_map(|w| w.backends)
            .find(|s| &s.id() == b)
            .map_or(b.clone(), |s| s.title());
        match wl.as_str() {
            "rr1" if x.p50 < 0.8 * p.round_trip_us => against.push(format!("{title}'s QD1 p50 of {:.1} µs", x.p50)),
            // The bound holds only for a backend that sleeps about once per
            // batch; one still busy when the next batch comes (QSD at over
            // 1 µs per request) may pass it.
            "null" if x.sleeps_per_kreq.is_some_and(|z| z >= 500.0 / f64::from(null_depth.max(1)))
                && x.iops > 1.2 * p.max_iops(null_depth) =>
            {
                against.push(format!("{title}'s {} IOPS in `null`", num(x.iops)))
            }
            _ => {}
        }
    }
    if against.is_empty() {
        return Some(Ok(p));
    }
    Some(Err(format!(
        "**The wake-up probe was disturbed.** Its cross-CPU round trip, {:.1} µs, is contradicted by what this run \
         measured ({}), so the report derives no floor or bound from it.",
        p.round_trip_us,
        against.join(", ")
    )))
}

/// The floor the machine's wake-up cost puts under the QD1 rows without
/// polling: one cross-CPU round trip per request, for every backend.
pub(super) fn qd1_floor(
    s: &mut String,
    out: &CompareOutput,
    st: &BTreeMap<(String, String), Stats>,
) {
    let p = match usable_probe(out, st) {
        None => return,
        Some(Ok(p)) => p,
        Some(Err(why)) => {
            let _ = writeln!(s, "\n{why}");
            return;
        }
    };
    let Some(w) = plan::workloads().into_iter().find(|w| w.id == "rr1") else {
        return;
    };
    let cells: Vec<String> = w
        .backends
        .iter()
        .filter_map(|b| {
            let x = st.get(&(w.id.to_string(), b.id())).filter(|x| x.n > 0)?;
            Some(format!(
                "{} {:.1} µs ({:+.1})",
                b.title(),
                x.p50,
                x.p50 - p.round_trip_us
            ))
        })
        .collect();
    if cells.is_empty() {
        return;
    }
    let _ = writeln!(
        s,
        "\n**The QD1 rows without polling sit on the machine's wake-up floor.** Each request is one cross-CPU round \
         trip between two sleeping threads, {:.1} µs here with no I/O at all; p50 over that floor: {}. Their p99 is \
         the tail of those wake-ups, which moves with the host from round to round (see every run below).",
        p.round_trip_us,
        cells.join(", ")
    );
}

/// What the machine's wake-up cost allows in the `null` row, under the
/// targets, when the row was run and the probe measured two CPUs.
pub(super) fn null_limits(
    s: &mut String,
    out: &CompareOutput,
    st: &BTreeMap<(String, String), Stats>,
) {
    let Some(w) = plan::workloads().into_iter().find(|w| w.id == "null") else {
        return;
    };
    let pair = |id: &str| {
        let get = |b: &str| st.get(&(id.to_string(), b.to_string())).filter(|x| x.n > 0);
        Some((get("blkstack")?, get("qsd")?))
    };
    // A disturbed probe is reported once, by `qd1_floor`; the comparisons
    // below do not depend on it.
    let mut bounded = false;
    if let (true, Some((bs, q)), Some(Ok(p))) = (
        out.workloads.iter().any(|x| x == w.id),
        pair(w.id),
        usable_probe(out, st),
    ) {
        null_bounds(s, &p, w.iodepth, bs, q, out.machine.idle.as_ref());
        bounded = true;
    }
    if let Some((bs, q)) = pair("null-adaptive") {
        let iothread = st.get(&("null-adaptive".to_string(), "qsd-poll".to_string())).filter(|x| x.n > 0);
        let _ = writeln!(
            s,
            "{}With its default adaptive polling (`null-adaptive`; the CPU it spends polling is in its CPU figure), \
             blkstack slept {} times per 1000 requests and did {}{}.",
            if bounded { "" } else { "\n" },
            opt(bs.sleeps_per_kreq),
            against_qsd(bs, q),
            iothread.map_or(String::new(), |qp| format!(
                "; against QSD in an iothread (QEMU's adaptive polling, which slept {} times per 1000 requests), {}",
                opt(qp.sleeps_per_kreq),
                against_qsd(bs, qp)
            )),
        );
        bounded = true;
    }
    if let Some((bs, q)) = pair("null-cpoll") {
        let us = |x: &Stats| x.cpu.map_or("–".into(), |c| format!("{:.2} µs", c / x.iops.max(1.0) * 1e6));
        let _ = writeln!(
            s,
            "{}With the client busy-polling its completions (`null-cpoll`), the client's vCPU never halts and new \
             requests keep arriving while the backend works: blkstack slept {} times per 1000 requests (QSD {}) and did \
             {}, {} of backend CPU per request against {}.",
            if bounded { "" } else { "\n" },
            opt(bs.sleeps_per_kreq),
            opt(q.sleeps_per_kreq),
            against_qsd(bs, q),
            us(bs),
            us(q),
        );
        bounded = true;
    }
    if let Some((bs, q)) = pair("null-1cpu") {
        let same = out.machine.wake.as_ref().and_then(|w| w.same_cpu);
        let _ = writeln!(
            s,
            "{}With client and backend on one CPU (`null-1cpu`{}), blkstack did {}.",
            if bounded { "" } else { "\n" },
            same.map_or(String::new(), |p| format!(", where a wake-up costs {:.1} µs of CPU", p.server_cpu_us)),
            against_qsd(bs, q),
        );
    }
}

/// "X IOPS against QSD's Y (r×) and X' IOPS per CPU-s against Y' (r'×)".
fn against_qsd(bs: &Stats, q: &Stats) -> String {
    format!(
        "{} IOPS against QSD's {} ({}) and {} IOPS per CPU-s against {} ({})",
        num(bs.iops),
        num(q.iops),
        ratio(Some(bs.iops), Some(q.iops)),
        opt(bs.iops_per_cpu),
        opt(q.iops_per_cpu),
        ratio(bs.iops_per_cpu, q.iops_per_cpu),
    )
}

/// The bounds a sleeping backend meets in the `null` row, from probe `p`.
fn null_bounds(
    s: &mut String,
    p: &crate::bench::wake::PingPong,
    iodepth: u32,
    bs: &Stats,
    q: &Stats,
    idle: Option<&crate::bench::procfs::IdleConfig>,
) {
    let _ = writeln!(
        s,
        "\n**What bounds the `null` row on this machine.** A backend that sleeps between batches pays, per batch of {qd}, \
         at least one cross-CPU round trip of wall time ({rt:.1} µs) and one wake-up of its own CPU time ({cpu:.1} µs), \
         however little it does per request: at most {max} IOPS and {maxc} IOPS per CPU-s with no work at all \
         (the targets ask for {q_iops} IOPS and {q_eff2} IOPS per CPU-s). blkstack slept {bz} times per 1000 requests \
         (once per {per} requests); QSD, at {qus:.2} µs of CPU per request, slept {qz} times per 1000: it is mostly \
         still busy when the next batch arrives and so rarely pays the wake-up.",
        qd = iodepth,
        rt = p.round_trip_us,
        cpu = p.server_cpu_us,
        max = num(p.max_iops(iodepth)),
        maxc = num(p.max_iops_per_cpu_s(iodepth)),
        q_iops = num(q.iops),
        q_eff2 = q.iops_per_cpu.map_or("–".into(), |e| num(2.0 * e)),
        bz = opt(bs.sleeps_per_kreq),
        per = bs.sleeps_per_kreq.filter(|z| *z > 0.0).map_or("–".into(), |z| num(1000.0 / z)),
        qz = opt(q.sleeps_per_kreq),
        qus = q.cpu.map_or(0.0, |c| c / q.iops.max(1.0) * 1e6),
    );
    if let Some(target) = q.iops_per_cpu.map(|e| 2.0 * e) {
        if q.iops > p.max_iops(iodepth) {
            let _ = writeln!(s, "{}", mix_line(p, iodepth, q.iops, target));
        }
    }
    if idle.is_some_and(|i| i.halts_at_once()) {
        let _ = writeln!(
            s,
            "The wake-up's cost is this VM's: its idle vCPUs halt at once (`guest_halt_poll_ns` 0), so each wake-up \
             is the hypervisor waking a halted vCPU, on the client's side as on the backend's. With the kernel's \
             default halt-polling ({HALT_POLL_DEFAULT_NS} ns) an idle vCPU spins briefly before it halts, and a \
             wake-up that comes within that time finds it still running: `GUEST_HALT_POLL_NS={HALT_POLL_DEFAULT_NS} bash \
             bench/compare.sh --only null` measures the row that way (the idle loops' polling is then shown per run, \
             since the kernel counts it as idle)."
        );
    }
    // Halt-polling spends CPU in the idle loop, where no backend's figure
    // sees it: say what each backend's IOPS per CPU-s are with all the
    // polling during its runs charged to it.
    if let (Some(poll), Some(cpu)) = (bs.idle_poll.filter(|x| *x >= 0.01), bs.cpu) {
        let charged = |x: &Stats| Some(x.iops / (x.cpu? + x.idle_poll.unwrap_or(0.0)).max(1e-9));
        let _ = writeln!(
            s,
            "The idle loops polled {poll:.2} CPU-s/s during blkstack's `null` runs and {} during QSD's (counted as \
             idle by the kernel, so in no backend's CPU figure). Charged in full to the backend that ran, blkstack's \
             {} IOPS cost {:.2} CPU-s/s, {} IOPS per CPU-s, against QSD's {} ({}).",
            opt(q.idle_poll),
            num(bs.iops),
            cpu + poll,
            opt(charged(bs)),
            opt(charged(q)),
            ratio(charged(bs), charged(q)),
        );
    }
}

/// Whether any backend, sleeping after some batches and staying awake for
/// the others, could meet both `null` targets (QSD's `iops`, `target` IOPS
/// per CPU-s) on this machine's wake-up figures.
fn mix_line(p: &crate::bench::wake::PingPong, iodepth: u32, iops: f64, target: f64) -> String {
    let half = p.round_trip_us / 2.0;
    match p.max_iops_per_cpu_s_serving(iodepth, iops) {
        None => format!(
            "Even a backend that never sleeps cannot serve {} IOPS here: the client wakes at most once per batch, \
             half a round trip ({half:.1} µs) each time, which allows {} IOPS.",
            num(iops),
            num(f64::from(iodepth) / (half * 1e-6)),
        ),
        Some(best) => format!(
            "Serving QSD's {} IOPS is more than a backend that sleeps after every batch can do, so some batches must \
             find it awake, and staying awake through the client's wake-up (half a round trip, {half:.1} µs) costs it \
             that time on the CPU: the best mix of sleeping and staying awake, with no work per request, reaches {} \
             IOPS per CPU-s at that rate, {} the {} the target asks for{}.",
            num(iops),
            num(best),
            if best < target { "below" } else { "not below" },
            num(target),
            if best < target { ": on this machine no backend meets both `null` targets with a sleeping client" } else { "" },
        ),
    }
}
