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
    for n in &w.notes {
        let _ = writeln!(s, "  - {n}");
    }
}

/// The floor the machine's wake-up cost puts under the QD1 rows without
/// polling: one cross-CPU round trip per request, for every backend.
pub(super) fn qd1_floor(
    s: &mut String,
    out: &CompareOutput,
    st: &BTreeMap<(String, String), Stats>,
) {
    let Some(p) = out.machine.wake.as_ref().and_then(|w| w.cross_cpu) else {
        return;
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
    let Some(p) = out.machine.wake.as_ref().and_then(|w| w.cross_cpu) else {
        return;
    };
    let Some(w) = plan::workloads().into_iter().find(|w| w.id == "null") else {
        return;
    };
    if !out.workloads.iter().any(|x| x == w.id) {
        return;
    }
    let get = |b: &str| {
        st.get(&(w.id.to_string(), b.to_string()))
            .filter(|x| x.n > 0)
    };
    let (Some(bs), Some(q)) = (get("blkstack"), get("qsd")) else {
        return;
    };
    let _ = writeln!(
        s,
        "\n**What bounds the `null` row on this machine.** A backend that sleeps between batches pays, per batch of {qd}, \
         at least one cross-CPU round trip of wall time ({rt:.1} µs) and one wake-up of its own CPU time ({cpu:.1} µs), \
         however little it does per request: at most {max} IOPS and {maxc} IOPS per CPU-s with no work at all \
         (the targets ask for {q_iops} IOPS and {q_eff2} IOPS per CPU-s). blkstack slept {bz} times per 1000 requests \
         (once per {per} requests); QSD, at {qus:.2} µs of CPU per request, slept {qz} times per 1000: it is mostly \
         still busy when the next batch arrives and so rarely pays the wake-up.",
        qd = w.iodepth,
        rt = p.round_trip_us,
        cpu = p.server_cpu_us,
        max = num(p.max_iops(w.iodepth)),
        maxc = num(p.max_iops_per_cpu_s(w.iodepth)),
        q_iops = num(q.iops),
        q_eff2 = q.iops_per_cpu.map_or("–".into(), |e| num(2.0 * e)),
        bz = opt(bs.sleeps_per_kreq),
        per = bs.sleeps_per_kreq.filter(|z| *z > 0.0).map_or("–".into(), |z| num(1000.0 / z)),
        qz = opt(q.sleeps_per_kreq),
        qus = q.cpu.map_or(0.0, |c| c / q.iops.max(1.0) * 1e6),
    );
    let one = |b: &str| {
        st.get(&("null-1cpu".to_string(), b.to_string()))
            .filter(|x| x.n > 0)
    };
    if let (Some(bs1), Some(q1)) = (one("blkstack"), one("qsd")) {
        let same = out.machine.wake.as_ref().and_then(|w| w.same_cpu);
        let _ = writeln!(
            s,
            "With client and backend on one CPU (`null-1cpu`{}), blkstack did {} IOPS against QSD's {} ({}) and {} IOPS \
             per CPU-s against {} ({}).",
            same.map_or(String::new(), |p| format!(", where a wake-up costs {:.1} µs of CPU", p.server_cpu_us)),
            num(bs1.iops),
            num(q1.iops),
            ratio(Some(bs1.iops), Some(q1.iops)),
            opt(bs1.iops_per_cpu),
            opt(q1.iops_per_cpu),
            ratio(bs1.iops_per_cpu, q1.iops_per_cpu),
        );
    }
}
