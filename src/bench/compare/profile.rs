//! A `perf` profile of the backend during one run: `perf record -g` attached
//! to the backend's PID for the measured part of the run, then the hottest
//! symbols from `perf report`, kept as text for the report.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::bench::result::BenchResult;

/// What one profiled run showed.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Profile {
    /// Workload id.
    pub workload: String,
    /// IOPS of the profiled run (perf itself costs a little).
    pub iops: f64,
    /// Backend CPU s/s of the profiled run.
    pub cpu_s_per_s: Option<f64>,
    /// Hottest symbols, flat (self time), as `perf report` prints them.
    pub symbols: String,
    /// Time split by shared object.
    pub dsos: String,
}

/// Runs `run` (one benchmark run that calls the hook with the backend PID,
/// ramp and seconds) under `perf record`, then summarises the samples.
pub fn run(
    logs: &Path,
    tag: &str,
    run: impl FnOnce(super::Hook) -> Result<BenchResult, String>,
) -> Result<Profile, String> {
    let data = logs.join(format!("{tag}.perf.data"));
    let data_s = data.to_string_lossy().into_owned();
    let mut start = |pid: u32, ramp: f64, seconds: f64| -> Option<Child> {
        // Sample the measured part only: start after the ramp, stop before the end.
        std::thread::sleep(Duration::from_secs_f64(ramp + 0.2));
        let secs = (seconds - 0.5).max(0.5);
        Command::new("perf")
            .args([
                "record",
                "-F",
                "1999",
                "-g",
                "-o",
                &data_s,
                "-p",
                &pid.to_string(),
                "--",
                "sleep",
            ])
            .arg(format!("{secs:.1}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
    };
    let r = run(&mut start)?;
    let report = |sort: &str, limit: &str| -> Result<String, String> {
        let o = Command::new("perf")
            .args([
                "report",
                "-i",
                &data_s,
                "--stdio",
                "--no-children",
                "-g",
                "none",
                "--sort",
                sort,
                "--percent-limit",
                limit,
            ])
            .stderr(Stdio::null())
            .output()
            .map_err(|e| format!("perf report: {e}"))?;
        let text = String::from_utf8_lossy(&o.stdout);
        Ok(text
            .lines()
            .filter(|l| {
                l.trim_start()
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_digit())
            })
            .map(|l| l.trim_end().to_string())
            .collect::<Vec<_>>()
            .join("\n"))
    };
    Ok(Profile {
        workload: tag.trim_start_matches("profile-").to_string(),
        iops: r.iops,
        cpu_s_per_s: r.backend.as_ref().and_then(|b| b.cpu_s_per_s),
        symbols: report("dso,sym", "0.8")?,
        dsos: report("dso", "0.5")?,
    })
}
