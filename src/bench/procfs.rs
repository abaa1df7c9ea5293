//! What the benchmark reads from `/proc`: a process's CPU time and resident
//! memory, the host's CPU times (for steal), the load average, and from
//! `/sys` how the CPUs idle (cpuidle, haltpoll) and how long they polled.
//!
//! Every reader returns an error string instead of panicking: the files can
//! vanish (the backend exited) or have an unexpected shape.

use std::fs;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// Clock ticks per second for `/proc/*/stat` times.
pub fn clock_ticks_per_second() -> u64 {
    // SAFETY: sysconf only reads a configuration value; it has no memory
    // safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as u64
    } else {
        100
    }
}

/// utime + stime, in clock ticks, from the text of `/proc/PID/stat`.
pub fn parse_stat_cpu_ticks(text: &str) -> Result<u64, String> {
    // The command name (field 2) is in parentheses and may hold spaces or ')'.
    let rest = text
        .rfind(')')
        .map(|i| &text[i + 1..])
        .ok_or("no ')' in stat")?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // fields[0] is field 3 (state); utime is field 14, stime field 15.
    let get = |i: usize| -> Result<u64, String> {
        fields
            .get(i)
            .ok_or_else(|| format!("stat has only {} fields", fields.len() + 2))?
            .parse::<u64>()
            .map_err(|e| format!("stat field {}: {e}", i + 3))
    };
    Ok(get(11)? + get(12)?)
}

/// CPU seconds (user + system, all threads) used so far by process `pid`.
pub fn process_cpu_seconds(pid: u32) -> Result<f64, String> {
    let path = format!("/proc/{pid}/stat");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    let ticks = parse_stat_cpu_ticks(&text).map_err(|e| format!("{path}: {e}"))?;
    Ok(ticks as f64 / clock_ticks_per_second() as f64)
}

/// The value of the `name:` line of `/proc/PID/status` text, trimmed.
fn status_field<'a>(text: &'a str, name: &str) -> Result<&'a str, String> {
    text.lines()
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
        .map(str::trim)
        .ok_or_else(|| format!("no {name} line"))
}

/// The `VmRSS` line of `/proc/PID/status` text, in KiB.
pub fn parse_vm_rss_kib(text: &str) -> Result<u64, String> {
    let mut it = status_field(text, "VmRSS")?.split_whitespace();
    let n = it.next().ok_or("empty VmRSS line")?;
    let v: u64 = n.parse().map_err(|e| format!("VmRSS '{n}': {e}"))?;
    match it.next() {
        Some("kB") | None => Ok(v),
        Some(u) => Err(format!("VmRSS unit '{u}'")),
    }
}

/// Resident memory of process `pid`, in KiB.
pub fn process_rss_kib(pid: u32) -> Result<u64, String> {
    let path = format!("/proc/{pid}/status");
    let text = fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
    parse_vm_rss_kib(&text).map_err(|e| format!("{path}: {e}"))
}

/// The `voluntary_ctxt_switches` line of `/proc/PID/task/TID/status` text.
pub fn parse_voluntary_switches(text: &str) -> Result<u64, String> {
    let n = status_field(text, "voluntary_ctxt_switches")?;
    n.parse().map_err(|e| format!("voluntary_ctxt_switches '{n}': {e}"))
}

/// How many times the threads of process `pid` have gone to sleep (their
/// voluntary context switches, summed over the threads alive now).
pub fn process_sleeps(pid: u32) -> Result<u64, String> {
    let dir = format!("/proc/{pid}/task");
    let mut sum = 0u64;
    for entry in fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
        let path = entry
            .map_err(|e| format!("{dir}: {e}"))?
            .path()
            .join("status");
        // A thread that exits while we look is skipped.
        let Ok(text) = fs::read_to_string(&path) else {
            continue;
        };
        sum += parse_voluntary_switches(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    }
    Ok(sum)
}

/// Counts the sleeps of a process whose threads come and go (an NBD server
/// with a thread per connection): [`process_sleeps`] sums the threads alive
/// when it looks, so a connection's thread that ended before the last look
/// is lost. Sampled often, this keeps each thread's last count; what a
/// thread does between the last sample and its exit is still missed.
#[derive(Debug, Default)]
pub struct SleepTracker {
    /// Per thread: its count when first seen, its latest.
    threads: std::collections::HashMap<u32, (u64, u64)>,
    /// Sleeps of threads whose ID was taken over by a new thread.
    retired: u64,
}

impl SleepTracker {
    /// Reads every thread of `pid`; a thread first seen now counts from
    /// zero unless `baseline` (the first sample: what it did before is not
    /// part of the run).
    pub fn sample(&mut self, pid: u32, baseline: bool) -> Result<(), String> {
        let dir = format!("/proc/{pid}/task");
        for entry in fs::read_dir(&dir).map_err(|e| format!("{dir}: {e}"))? {
            let entry = entry.map_err(|e| format!("{dir}: {e}"))?;
            let Some(tid) = entry.file_name().to_str().and_then(|t| t.parse::<u32>().ok()) else {
                continue;
            };
            let Ok(text) = fs::read_to_string(entry.path().join("status")) else {
                continue;
            };
            let n = parse_voluntary_switches(&text)?;
            self.record(tid, n, baseline);
        }
        Ok(())
    }

    fn record(&mut self, tid: u32, n: u64, baseline: bool) {
        match self.threads.get_mut(&tid) {
            // A lower count: the ID now names a new thread.
            Some((first, last)) if n < *last => {
                self.retired += *last - *first;
                *first = 0;
                *last = n;
            }
            Some((_, last)) => *last = n,
            None => {
                self.threads.insert(tid, (if baseline { n } else { 0 }, n));
            }
        }
    }

    /// Sleeps since the baseline.
    pub fn total(&self) -> u64 {
        self.retired + self.threads.values().map(|(first, last)| last - first).sum::<u64>()
    }
}

/// Aggregate host CPU times from the first line of `/proc/stat`, in ticks.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HostCpu {
    /// user+nice+system+idle+iowait+irq+softirq+steal (guest time is inside user).
    pub total: u64,
    /// Time stolen by the hypervisor.
    pub steal: u64,
    /// idle + iowait.
    pub idle: u64,
}

impl HostCpu {
    /// Parses the `cpu ` line of `/proc/stat` text.
    pub fn parse(text: &str) -> Result<HostCpu, String> {
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .ok_or("no 'cpu ' line")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|f| f.parse::<u64>().map_err(|e| format!("'{f}': {e}")))
            .collect::<Result<_, _>>()?;
        if v.len() < 8 {
            return Err(format!(
                "'cpu ' line has {} fields, expected 8 or more",
                v.len()
            ));
        }
        Ok(HostCpu {
            total: v[..8].iter().sum(),
            steal: v[7],
            idle: v[3] + v[4],
        })
    }

    /// Reads `/proc/stat`.
    pub fn read() -> Result<HostCpu, String> {
        let text = fs::read_to_string("/proc/stat").map_err(|e| format!("/proc/stat: {e}"))?;
        HostCpu::parse(&text).map_err(|e| format!("/proc/stat: {e}"))
    }

    /// Steal between `self` (earlier) and `later`, in percent of all CPU time.
    pub fn steal_pct(&self, later: &HostCpu) -> f64 {
        let total = later.total.saturating_sub(self.total);
        if total == 0 {
            return 0.0;
        }
        100.0 * later.steal.saturating_sub(self.steal) as f64 / total as f64
    }

    /// Busy (non-idle) CPUs on average between `self` and `later`.
    pub fn busy_cpus(&self, later: &HostCpu, seconds: f64) -> f64 {
        let total = later.total.saturating_sub(self.total);
        let idle = later.idle.saturating_sub(self.idle);
        if seconds <= 0.0 {
            return 0.0;
        }
        total.saturating_sub(idle) as f64 / clock_ticks_per_second() as f64 / seconds
    }
}

/// Where the kernel describes CPU idling.
const CPU_SYSFS: &str = "/sys/devices/system/cpu";
/// The haltpoll governor's poll limit, in ns (0: an idle vCPU halts at once).
const HALT_POLL_NS: &str = "/sys/module/haltpoll/parameters/guest_halt_poll_ns";

/// Microseconds the CPUs under `root` (`cpuN/cpuidle/stateM/`) spent in
/// cpuidle's polling state (`POLL`), summed over CPUs. The idle loop spins
/// there before it halts; the kernel counts that as idle time, so it is in
/// no process's CPU time and in no busy figure. 0 where the CPUs have
/// cpuidle but no polling state; an error where there is no cpuidle at all.
pub fn idle_poll_us_in(root: &Path) -> Result<u64, String> {
    let cpus = fs::read_dir(root).map_err(|e| format!("{}: {e}", root.display()))?;
    let mut seen = false;
    let mut total = 0u64;
    for cpu in cpus.flatten() {
        let name = cpu.file_name();
        let name = name.to_string_lossy();
        if !name.strip_prefix("cpu").is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit())) {
            continue;
        }
        let Ok(states) = fs::read_dir(cpu.path().join("cpuidle")) else { continue };
        seen = true;
        for st in states.flatten() {
            let dir = st.path();
            if fs::read_to_string(dir.join("name")).is_ok_and(|n| n.trim() == "POLL") {
                let t = fs::read_to_string(dir.join("time")).map_err(|e| format!("{}: {e}", dir.display()))?;
                total += t.trim().parse::<u64>().map_err(|e| format!("{}/time '{}': {e}", dir.display(), t.trim()))?;
            }
        }
    }
    if seen {
        Ok(total)
    } else {
        Err("no cpuidle states".into())
    }
}

/// [`idle_poll_us_in`] for this machine's CPUs.
pub fn idle_poll_us() -> Result<u64, String> {
    idle_poll_us_in(Path::new(CPU_SYSFS))
}

/// How this machine's CPUs idle, which decides what waking a sleeping
/// thread on another CPU costs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdleConfig {
    /// The cpuidle driver (`haltpoll` in a KVM guest that has it).
    pub driver: Option<String>,
    /// The cpuidle governor.
    pub governor: Option<String>,
    /// haltpoll's `guest_halt_poll_ns`: how long an idle vCPU polls before
    /// it halts (the kernel's default is 200000; 0 halts at once).
    pub guest_halt_poll_ns: Option<u64>,
}

impl IdleConfig {
    /// Reads it from `/sys`; what is absent stays `None`.
    pub fn read() -> IdleConfig {
        let text = |p: &str| fs::read_to_string(p).ok().map(|t| t.trim().to_string()).filter(|t| !t.is_empty());
        IdleConfig {
            driver: text(&format!("{CPU_SYSFS}/cpuidle/current_driver")),
            governor: text(&format!("{CPU_SYSFS}/cpuidle/current_governor")),
            guest_halt_poll_ns: text(HALT_POLL_NS).and_then(|t| t.parse().ok()),
        }
    }

    /// Whether an idle vCPU halts without polling first under haltpoll.
    pub fn halts_at_once(&self) -> bool {
        self.driver.as_deref() == Some("haltpoll") && self.guest_halt_poll_ns == Some(0)
    }
}

/// The 1-minute load average.
pub fn loadavg_1m() -> Result<f64, String> {
    let text = fs::read_to_string("/proc/loadavg").map_err(|e| format!("/proc/loadavg: {e}"))?;
    let first = text
        .split_whitespace()
        .next()
        .ok_or("/proc/loadavg: empty")?;
    first
        .parse()
        .map_err(|e| format!("/proc/loadavg '{first}': {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_odd_comm() {
        let t = "1234 (a b) c) S 1 1 1 0 -1 4194304 100 0 0 0 250 50 0 0 20 0 3 0 5 100 200";
        assert_eq!(parse_stat_cpu_ticks(t), Ok(300));
        assert!(parse_stat_cpu_ticks("1234 (x) S 1").is_err());
        assert!(parse_stat_cpu_ticks("garbage").is_err());
    }

    #[test]
    fn status_rss() {
        let t = "Name:\tx\nVmPeak:\t  100 kB\nVmRSS:\t    2932 kB\nThreads:\t3\n";
        assert_eq!(parse_vm_rss_kib(t), Ok(2932));
        assert!(parse_vm_rss_kib("Name: x\n").is_err());
    }

    #[test]
    fn voluntary_switches() {
        // The nonvoluntary line is not taken for it, whichever comes first.
        let text = "Name:\tx\nnonvoluntary_ctxt_switches:\t5\nvoluntary_ctxt_switches:\t1234\n";
        assert_eq!(parse_voluntary_switches(text), Ok(1234));
        assert!(parse_voluntary_switches("Name:\tx\n").is_err());
        assert!(parse_voluntary_switches("voluntary_ctxt_switches:\tmany\n").is_err());
        // This process has at least the test thread, which has slept.
        assert!(process_sleeps(std::process::id()).is_ok());
    }

    #[test]
    fn host_steal() {
        let a = HostCpu::parse("cpu  100 0 50 800 10 0 5 35 0 0\ncpu0 1 2 3\n");
        let b = HostCpu::parse("cpu  200 0 100 1600 20 0 10 70 0 0\n");
        let (a, b) = (a.expect("a"), b.expect("b"));
        assert_eq!(a.total, 1000);
        assert!((a.steal_pct(&b) - 3.5).abs() < 1e-9);
        assert!(HostCpu::parse("cpu 1 2\n").is_err());
        assert!(HostCpu::parse("intr 1\n").is_err());
    }

    #[test]
    fn own_process() {
        let pid = std::process::id();
        assert!(process_cpu_seconds(pid).is_ok());
        assert!(process_rss_kib(pid).map(|k| k > 0).unwrap_or(false));
        assert!(HostCpu::read().is_ok());
    }

    #[test]
    fn idle_poll_time_sums_the_poll_states() {
        let root = std::env::temp_dir().join(format!("blkstack-cpuidle-{}", std::process::id()));
        let _ = fs::remove_dir_all(&root);
        let state = |cpu: &str, n: u32, name: &str, time: &str| {
            let d = root.join(cpu).join("cpuidle").join(format!("state{n}"));
            fs::create_dir_all(&d).expect("mkdir");
            fs::write(d.join("name"), format!("{name}\n")).expect("name");
            fs::write(d.join("time"), format!("{time}\n")).expect("time");
        };
        fs::create_dir_all(root.join("cpufreq")).expect("mkdir");
        assert!(idle_poll_us_in(&root).is_err(), "no cpuidle at all");
        state("cpu0", 0, "POLL", "1500");
        state("cpu0", 1, "haltpoll idle", "999999");
        state("cpu1", 0, "POLL", "250");
        state("cpu1", 1, "haltpoll idle", "5");
        // Not a CPU: ignored.
        state("cpuidle", 0, "POLL", "7");
        assert_eq!(idle_poll_us_in(&root), Ok(1750));
        state("cpu1", 0, "POLL", "many");
        assert!(idle_poll_us_in(&root).is_err());
        let _ = fs::remove_dir_all(&root);
        let halts = IdleConfig { driver: Some("haltpoll".into()), governor: None, guest_halt_poll_ns: Some(0) };
        assert!(halts.halts_at_once());
        assert!(!IdleConfig { guest_halt_poll_ns: Some(200000), ..halts.clone() }.halts_at_once());
        assert!(!IdleConfig { driver: Some("acpi_idle".into()), ..halts }.halts_at_once());
    }

    #[test]
    fn sleep_tracker_keeps_threads_that_left() {
        let mut t = SleepTracker::default();
        t.record(10, 100, true); // there before the run
        t.record(11, 5, false); // a connection's thread
        t.record(10, 130, false);
        t.record(11, 40, false);
        assert_eq!(t.total(), 30 + 40);
        // Thread 11 has gone and its ID names a new thread.
        t.record(11, 3, false);
        assert_eq!(t.total(), 30 + 40 + 3);
    }
}
