//! Tests of the comparison's results, report and chart (`CompareOutput`
//! round trip, medians, ratios, targets).

use super::*;
use crate::bench::client::DeviceInfo;
use crate::bench::result::{Backend as B, Host, Latency, Workload};
use crate::bench::RwMode;

fn result(iops: f64, p50: f64, cpu: f64, rss_kib: u64) -> BenchResult {
    BenchResult {
        schema: 1,
        label: None,
        socket: "s".into(),
        workload: Workload {
            rw: RwMode::Randread,
            bs: 4096,
            iodepth: 32,
            queues: 1,
            size: 1 << 30,
            poll: false,
            rwmixread: 50,
            seconds: 1.0,
            ramp_seconds: 0.0,
            client: Default::default(),
        },
        device: DeviceInfo::default(),
        elapsed_s: 1.0,
        ops: iops as u64,
        reads: iops as u64,
        writes: 0,
        bytes: iops as u64 * 4096,
        errors: 0,
        first_error: None,
        iops,
        mib_s: iops * 4096.0 / 1048576.0,
        lat_us: Latency {
            p50,
            p99: p50 * 2.0,
            ..Default::default()
        },
        backend: Some(B {
            pid: 1,
            cpu_s_per_s: Some(cpu),
            rss_kib: Some(rss_kib),
            sleeps_per_s: Some(iops / 32.0),
            notes: vec![],
        }),
        host: Host {
            steal_pct: Some(0.5),
            ..Default::default()
        },
    }
}

fn rec(wl: &str, backend: &str, round: usize, r: Option<BenchResult>) -> RunRecord {
    RunRecord {
        workload: wl.into(),
        backend: backend.into(),
        round,
        order: 0,
        attempts: 1,
        command: format!("{backend} --args"),
        error: r.is_none().then(|| "boom".to_string()),
        result: r,
    }
}

fn output() -> CompareOutput {
    let mut records = Vec::new();
    for round in 0..3 {
        let k = round as f64;
        records.push(rec(
            "rr32",
            "blkstack",
            round,
            Some(result(300_000.0 + k, 50.0, 1.0, 2048)),
        ));
        records.push(rec(
            "rr32",
            "qsd",
            round,
            Some(result(150_000.0 + k, 200.0, 1.0, 9000)),
        ));
        records.push(rec(
            "rr32",
            "ch",
            round,
            Some(result(200_000.0 + k, 100.0, 1.0, 2900)),
        ));
        records.push(rec("null", "blkstack", round, None));
        records.push(rec(
            "null",
            "qsd",
            round,
            Some(result(290_000.0, 90.0, 0.97, 9000)),
        ));
        records.push(rec(
            "rr1-poll",
            "blkstack-poll",
            round,
            Some(result(90_000.0, 10.0, 1.0, 2048)),
        ));
        records.push(rec(
            "rr1-poll",
            "qsd-poll",
            round,
            Some(result(50_000.0, 20.0, 1.0, 9000)),
        ));
        records.push(rec(
            "rr1-poll",
            "ch-poll",
            round,
            Some(result(90_000.0, 11.0, 1.0, 2900)),
        ));
    }
    CompareOutput {
        started: utc_now(),
        wall_s: 1.0,
        quick: false,
        rounds: 3,
        seconds: 1.0,
        ramp: 0.0,
        max_steal: 3.0,
        image: "img".into(),
        image_size: 1 << 30,
        poll_us: 50,
        socket: "s".into(),
        machine: Machine::default(),
        notes: vec![],
        workloads: vec!["rr32".into(), "null".into(), "rr1-poll".into()],
        records,
        retries_skipped: 0,
        profiles: vec![],
        options: vec![],
        warm_up: vec![],
    }
}

#[test]
fn report_has_medians_ratios_and_targets() {
    let md = report::markdown(&output(), &report::Links::default());
    assert!(md.contains("Written by `blkstack bench compare` (`make bench`). Raw results: `bench/out/results.json`. Chart: [report.svg](report.svg)."), "{md}");
    assert!(
        md.contains("| 4k randread QD32: IOPS ≥ 1.25× CH | 300k vs 200k = 1.50× | yes |"),
        "{md}"
    );
    assert!(
        md.contains("| *blkstack / QSD aio=io_uring* | 2.00×"),
        "{md}"
    );
    assert!(md.contains("resident memory, one export (end of 4k randread QD32): ≤ CH | 2.00 vs 2.83 = 0.71× | yes"), "{md}");
    assert!(
        md.contains("null 4k randread QD32: IOPS ≥ QSD | no data"),
        "{md}"
    );
    assert!(
        md.contains("## Runs that failed") && md.contains("boom"),
        "{md}"
    );
    assert!(
        md.contains("| QD1 4k randread, polling: p50 ≤ CH | 10.0 vs 11.0 = 0.91× | yes |"),
        "{md}"
    );
    assert!(md.contains("| *blkstack / CH poll_queue* |"), "{md}");
    let svg = svg::chart(&output());
    assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
    assert_eq!(svg.matches("<rect x=").count(), 4 + 7, "{svg}"); // 4 legend swatches, 3 + 1 + 3 bars
}

#[test]
fn results_roundtrip_through_json() {
    let out = output();
    let text = serde_json::to_string(&out).expect("serialize");
    let back: CompareOutput = serde_json::from_str(&text).expect("parse");
    assert_eq!(back.records.len(), out.records.len());
    let links = report::Links::default();
    assert_eq!(
        report::markdown(&back, &links),
        report::markdown(&out, &links)
    );
}

#[test]
fn utc_format() {
    let s = utc_now();
    assert_eq!(s.len(), 16, "{s}");
    assert!(s.starts_with("20"), "{s}");
}

/// With the wake-up probe and both `null` rows, the report derives the
/// bounds a sleeping backend cannot pass; without the probe (an older
/// results.json) it says nothing about them.
#[test]
fn null_row_gets_the_wake_up_bounds() {
    let mut out = output();
    for r in out
        .records
        .iter_mut()
        .filter(|r| r.workload == "null" && r.backend == "blkstack")
    {
        r.error = None;
        r.result = Some(result(500_000.0, 60.0, 0.4, 2048));
    }
    let plain = report::markdown(&out, &report::Links::default());
    assert!(!plain.contains("What bounds"), "{plain}");
    let pp = |cpu: u16| crate::bench::wake::PingPong {
        client_cpu: 0,
        server_cpu: cpu,
        round_trips: 1000,
        round_trip_us: 64.0,
        server_cpu_us: 20.0,
        client_cpu_us: 19.0,
    };
    out.machine.wake = Some(crate::bench::wake::WakeProbe {
        cross_cpu: Some(pp(1)),
        same_cpu: Some(pp(0)),
        notes: vec![],
        taken_us: vec![64.0, 80.0],
    });
    let md = report::markdown(&out, &report::Links::default());
    // 32 / 64 µs = 500k IOPS; 32 / 20 µs = 1.6M IOPS per CPU-s; QSD's
    // 290k at 0.97 CPU is 299k per CPU-s, so the target is 598k.
    assert!(
        md.contains("at most 500k IOPS and 1600k IOPS per CPU-s"),
        "{md}"
    );
    assert!(
        md.contains("the targets ask for 290k IOPS and 598k IOPS per CPU-s"),
        "{md}"
    );
    // The test results sleep once per 32 requests.
    assert!(
        md.contains("blkstack slept 31.2 times per 1000 requests (once per 32.0 requests)"),
        "{md}"
    );
    assert!(
        md.contains("- Wake-up cost") && md.contains("on CPUs 0 and 1: round trip 64.0 µs"),
        "{md}"
    );
    assert!(md.contains("| backend | IOPS | MiB/s | p50 µs | p99 µs | p99.9 µs | CPU s/s | IOPS/CPU-s | RSS MiB | sleeps/1k req |"), "{md}");
    assert!(!md.contains("With client and backend on one CPU"), "{md}");
    // No rr1 row in this output: no QD1 floor line.
    assert!(!md.contains("wake-up floor"), "{md}");
    // The one-CPU row, when it ran, is set beside it.
    for (b, iops, cpu) in [("blkstack", 1_500_000.0, 0.5), ("qsd", 450_000.0, 0.6)] {
        out.records
            .push(rec("null-1cpu", b, 0, Some(result(iops, 20.0, cpu, 2048))));
    }
    out.workloads.push("null-1cpu".into());
    let md = report::markdown(&out, &report::Links::default());
    assert!(
        md.contains("With client and backend on one CPU (`null-1cpu`, where a wake-up costs 20.0 µs of CPU), blkstack did 1500k IOPS against QSD's 450k (3.33×) and 3000k IOPS per CPU-s against 750k (4.00×)."),
        "{md}"
    );
    assert!(
        md.contains("### null 4k randread QD32, client and backend on one CPU (`null-1cpu`"),
        "{md}"
    );
    assert!(md.contains("(the client never polls here)"), "{md}");
    // The client-polling row is judged against the same targets and set
    // beside the others, with each side's CPU per request.
    for (b, iops, cpu) in [("blkstack", 3_000_000.0, 0.96), ("qsd", 800_000.0, 0.98)] {
        out.records
            .push(rec("null-cpoll", b, 0, Some(result(iops, 8.0, cpu, 2048))));
    }
    out.workloads.push("null-cpoll".into());
    let md = report::markdown(&out, &report::Links::default());
    assert!(
        md.contains("| null 4k randread QD32, client polling: IOPS per CPU-s ≥ 2× QSD | 3125k vs 816k = 3.83× | yes |"),
        "{md}"
    );
    assert!(
        md.contains("| null 4k randread QD32, client polling: IOPS ≥ QSD | 3000k vs 800k = 3.75× | yes |"),
        "{md}"
    );
    assert!(
        md.contains("(`null-cpoll`), the client's vCPU never halts") && md.contains("0.32 µs of backend CPU per request against 1.22 µs."),
        "{md}"
    );
    assert!(md.contains("except in `null-cpoll`, where the client busy-polls them (`--poll`)"), "{md}");
    for (b, p50) in [("blkstack", 66.0), ("qsd", 70.0), ("ch", 64.0)] {
        out.records
            .push(rec("rr1", b, 0, Some(result(15_000.0, p50, 0.4, 2048))));
    }
    out.workloads.push("rr1".into());
    let md = report::markdown(&out, &report::Links::default());
    assert!(
        md.contains("64.0 µs here with no I/O at all; p50 over that floor: blkstack 66.0 µs (+2.0), QSD aio=io_uring 70.0 µs (+6.0), CH 64.0 µs (+0.0)."),
        "{md}"
    );
    assert!(md.contains("cross-CPU round trips 64.0 and 80.0 µs: the shortest is used"), "{md}");
    // A probe taken in a disturbed moment (longer than the QD1 p50 this
    // run measured) bounds nothing; the report says so once.
    if let Some(w) = out.machine.wake.as_mut() {
        w.cross_cpu = w.cross_cpu.map(|mut c| {
            c.round_trip_us = 289.4;
            c
        });
    }
    let md = report::markdown(&out, &report::Links::default());
    assert_eq!(md.matches("**The wake-up probe was disturbed.**").count(), 1, "{md}");
    assert!(
        md.contains("Its cross-CPU round trip, 289.4 µs, is contradicted by what this run measured (")
            && md.contains("blkstack's QD1 p50 of 66.0 µs")
            && md.contains("blkstack's 500k IOPS in `null`"),
        "{md}"
    );
    assert!(!md.contains("wake-up floor") && !md.contains("What bounds"), "{md}");
    assert!(
        md.contains("\n\nWith the client busy-polling") && md.contains("\nWith client and backend on one CPU"),
        "the client-polling and one-CPU comparisons stay: {md}"
    );
}

#[test]
fn only_the_client_polling_row_gives_the_client_poll() {
    let ws = super::plan::workloads();
    let args = |id: &str| {
        let w = ws.iter().find(|w| w.id == id).expect(id);
        super::client_args(w, std::path::Path::new("/s"), 6.0, 1.0, 42, "t")
    };
    let polled = args("null-cpoll");
    assert!(polled.iter().any(|a| a == "--poll"), "{polled:?}");
    assert!(polled.windows(2).any(|p| p[0] == "--server-pid" && p[1] == "42"), "{polled:?}");
    for id in ["null", "rr32", "rr1-poll", "null-1cpu"] {
        assert!(!args(id).iter().any(|a| a == "--poll"), "{id}");
    }
    // Same workload otherwise.
    let plain = args("null");
    assert_eq!(&polled[..polled.len() - 1], &plain[..]);
}

#[test]
fn nbd_rows_run_qemu_img_bench_on_the_export() {
    let ws = super::plan::workloads();
    for w in ws.iter().filter(|w| w.transport == super::plan::Transport::Nbd) {
        let a = super::client_args(w, std::path::Path::new("/s"), 6.0, 1.0, 42, "t");
        assert_eq!(a[..2], ["--nbd", "nbd+unix:///disk?socket=/s"], "{}", w.id);
        // Nothing qemu-img bench cannot do (`--nbd` refuses it).
        assert!(!a.iter().any(|x| x == "--socket" || x == "--queues" || x == "--poll"), "{a:?}");
        assert!(!w.rw.is_random() && w.queues == 1 && !w.poll, "{}", w.id);
        assert!(w.backends.iter().all(|b| b.engine != super::plan::Engine::Ch), "{}", w.id);
    }
    let v = super::client_args(&ws[0], std::path::Path::new("/s"), 6.0, 1.0, 42, "t");
    assert_eq!(v[..2], ["--socket", "/s"]);
    assert!(v.windows(2).any(|p| p[0] == "--queues" && p[1] == "1"), "{v:?}");
}

/// A backend that is still busy when the next batch arrives (it sleeps far
/// less than once per batch) may pass the sleeping backend's bound without
/// casting doubt on the probe; one that sleeps once per batch may not.
#[test]
fn only_a_backend_that_sleeps_per_batch_can_contradict_the_probe() {
    let mut out = output();
    let cross = crate::bench::wake::PingPong {
        client_cpu: 0,
        server_cpu: 1,
        round_trips: 1000,
        round_trip_us: 64.0,
        server_cpu_us: 20.0,
        client_cpu_us: 19.0,
    };
    out.machine.wake = Some(crate::bench::wake::WakeProbe {
        cross_cpu: Some(cross),
        same_cpu: None,
        notes: vec![],
        taken_us: vec![64.0],
    });
    // 32 / 64 µs = 500k: 700k is over 1.2 times the bound.
    let set = |out: &mut CompareOutput, b: &str, sleeps_per_s: f64| {
        for r in out.records.iter_mut().filter(|r| r.workload == "null" && r.backend == b) {
            let mut x = result(700_000.0, 40.0, 0.97, 2048);
            if let Some(be) = x.backend.as_mut() {
                be.sleeps_per_s = Some(sleeps_per_s);
            }
            r.error = None;
            r.result = Some(x);
        }
    };
    for r in out.records.iter_mut().filter(|r| r.workload == "null" && r.backend == "blkstack") {
        r.error = None;
        r.result = Some(result(500_000.0, 60.0, 0.4, 2048));
    }
    set(&mut out, "qsd", 700.0);
    let md = report::markdown(&out, &report::Links::default());
    assert!(!md.contains("was disturbed") && md.contains("What bounds the `null` row"), "{md}");
    // QSD's 700k is over the sleeper's 500k: at most 42.9 % of batches may
    // end in a sleep, so at best 20 × 0.429 + 32 × 0.571 = 26.9 µs of CPU
    // per 32 requests, 1.19M IOPS per CPU-s against 2 × 722k.
    assert!(md.contains("reaches 1191k IOPS per CPU-s at that rate, below the 1443k"), "{md}");
    assert!(md.contains("no backend meets both `null` targets"), "{md}");
    set(&mut out, "qsd", 700_000.0 / 32.0);
    let md = report::markdown(&out, &report::Links::default());
    assert!(md.contains("was disturbed") && md.contains("QSD aio=io_uring's 700k IOPS in `null`"), "{md}");
}

/// Warm-up runs are listed but count in no median.
#[test]
fn warm_up_runs_are_shown_and_not_counted() {
    let mut out = output();
    let before = report::markdown(&out, &report::Links::default());
    assert!(!before.contains("warm-up"), "{before}");
    out.warm_up
        .push(rec("rr32", "blkstack", 0, Some(result(1.0, 5000.0, 1.0, 2048))));
    let md = report::markdown(&out, &report::Links::default());
    assert!(md.contains("- Before round 1, `rr32` ran once against each backend unmeasured"), "{md}");
    assert!(md.contains("| warm-up | rr32 | blkstack | 1.00 | 0.00 | 5000 |"), "{md}");
    let table = |m: &str| m.split("## Method").next().map(str::to_string);
    assert_eq!(table(&before), table(&md), "the figures above the method are unchanged");
}

/// The report names how the CPUs idle; where the VM halts an idle vCPU at
/// once it says so under the `null` bounds, and where the idle loops polled,
/// it charges that polling to the backend that ran before comparing.
#[test]
fn idle_polling_is_named_and_charged() {
    let mut out = output();
    for r in out.records.iter_mut().filter(|r| r.workload == "null") {
        let blk = r.backend == "blkstack";
        let mut x = result(if blk { 1_200_000.0 } else { 600_000.0 }, 20.0, if blk { 0.6 } else { 1.0 }, 2048);
        x.host.idle_poll_cpus = Some(if blk { 0.4 } else { 0.2 });
        r.error = None;
        r.result = Some(x);
    }
    out.machine.wake = Some(crate::bench::wake::WakeProbe {
        cross_cpu: Some(crate::bench::wake::PingPong {
            client_cpu: 0,
            server_cpu: 1,
            round_trips: 1000,
            round_trip_us: 10.0,
            server_cpu_us: 5.0,
            client_cpu_us: 5.0,
        }),
        same_cpu: None,
        notes: vec![],
        taken_us: vec![10.0],
    });
    let halting = crate::bench::procfs::IdleConfig {
        driver: Some("haltpoll".into()),
        governor: Some("haltpoll".into()),
        guest_halt_poll_ns: Some(0),
    };
    out.machine.idle = Some(halting.clone());
    let md = report::markdown(&out, &report::Links::default());
    assert!(md.contains("- Idle CPUs: cpuidle driver haltpoll, governor haltpoll, haltpoll's `guest_halt_poll_ns` 0"), "{md}");
    assert!(md.contains("an idle vCPU halts at once"), "{md}");
    assert!(md.contains("its idle vCPUs halt at once (`guest_halt_poll_ns` 0)"), "{md}");
    // blkstack 1200k / (0.6 + 0.4) = 1200k per CPU-s; QSD 600k / 1.2 = 500k.
    assert!(
        md.contains("blkstack's 1200k IOPS cost 1.00 CPU-s/s, 1200k IOPS per CPU-s, against QSD's 500k (2.40×)"),
        "{md}"
    );
    assert!(md.contains("| 0.40 |") && md.contains("idle-poll CPUs"), "{md}");
    assert!(!md.contains("not the machine as configured"), "{md}");
    out.machine.idle = Some(crate::bench::procfs::IdleConfig { guest_halt_poll_ns: Some(200_000), ..halting });
    out.machine.halt_poll_was = Some(0);
    let md = report::markdown(&out, &report::Links::default());
    assert!(!md.contains("an idle vCPU halts at once") && !md.contains("halt at once (`guest_halt_poll_ns` 0)"), "{md}");
    assert!(md.contains("`guest_halt_poll_ns` 200000"), "{md}");
    assert!(
        md.contains("run by `GUEST_HALT_POLL_NS=200000 bash bench/compare.sh`: **not the machine as configured** (its idle vCPUs halt at once; here they polled for up to 200000 ns first)"),
        "{md}"
    );
    // Older results have no idle figures: nothing is said or charged.
    out.machine.idle = None;
    for r in out.records.iter_mut() {
        if let Some(x) = r.result.as_mut() {
            x.host.idle_poll_cpus = None;
        }
    }
    let md = report::markdown(&out, &report::Links::default());
    assert!(!md.contains("Idle CPUs") && !md.contains("Charged in full"), "{md}");
}

#[test]
fn null_with_polling_defaults_is_judged_against_both_qsd_setups() {
    let mut out = output();
    for round in 0..3 {
        out.records.push(rec("null-adaptive", "blkstack", round, Some(result(1_500_000.0, 20.0, 0.95, 2048))));
        out.records.push(rec("null-adaptive", "qsd", round, Some(result(700_000.0, 40.0, 0.97, 9000))));
        out.records.push(rec("null-adaptive", "qsd-poll", round, Some(result(800_000.0, 40.0, 1.0, 9000))));
    }
    out.workloads.push("null-adaptive".into());
    let md = report::markdown(&out, &report::Links::default());
    for line in [
        "| null 4k randread QD32, polling defaults (QSD main loop): IOPS ≥ QSD | 1500k vs 700k = 2.14× | yes |",
        "| null 4k randread QD32, polling defaults (QSD iothread): IOPS ≥ QSD | 1500k vs 800k = 1.88× | yes |",
        "| null 4k randread QD32, polling defaults (QSD main loop): IOPS per CPU-s ≥ 2× QSD | 1579k vs 722k = 2.19× | yes |",
        "| null 4k randread QD32, polling defaults (QSD iothread): IOPS per CPU-s ≥ 2× QSD | 1579k vs 800k = 1.97× | **no** |",
        "With its default adaptive polling (`null-adaptive`",
        "| blkstack adaptive polling | 1500k |",
    ] {
        assert!(md.contains(line), "missing {line:?} in\n{md}");
    }
}
