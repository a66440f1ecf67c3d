//! The results table printed at the end of a run, PASS/MISS against the goals, and the JSON
//! lines appended to `--json-out` (one object per row) for `BENCHMARKS.md`.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use serde_json::json;

use crate::cpu::CpuPerCall;

/// One measured line of the table.
#[derive(Debug, Clone)]
pub struct Row {
    /// What was measured (`gRPC GetProfile (hot cache)`, `Redis GET 1 KB`, …).
    pub name: String,
    /// Successful calls per second.
    pub rps: f64,
    /// Median latency, milliseconds (when this tool timed the calls).
    pub p50_ms: Option<f64>,
    /// 99th percentile latency, milliseconds.
    pub p99_ms: Option<f64>,
    /// 99.9th percentile latency, milliseconds.
    pub p999_ms: Option<f64>,
    /// Throughput relative to the run's raw Redis GET baseline.
    pub ratio: Option<f64>,
    /// Failed calls inside the measured window.
    pub errors: u64,
    /// CPU microseconds per call, per process.
    pub cpu: CpuPerCall,
}

/// A goal and whether this run met it.
#[derive(Debug, Clone)]
pub struct Goal {
    /// What the goal asks, in words.
    pub description: String,
    /// Whether it was met.
    pub met: bool,
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or_else(|| "-".to_string(), |v| format!("{v:.digits$}"))
}

/// Prints `rows`, then each goal with PASS or MISS, then `notes`.
pub fn print(title: &str, rows: &[Row], goals: &[Goal], notes: &[String]) {
    println!();
    println!("== {title} ==");
    println!(
        "{:<38} {:>10} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6}",
        "benchmark",
        "req/s",
        "p50 ms",
        "p99 ms",
        "p999 ms",
        "x raw",
        "cli µs",
        "srv µs",
        "rds µs",
        "errors"
    );
    for r in rows {
        println!(
            "{:<38} {:>10.0} {:>8} {:>8} {:>8} {:>8} {:>7} {:>7} {:>7} {:>6}",
            r.name,
            r.rps,
            opt(r.p50_ms, 3),
            opt(r.p99_ms, 3),
            opt(r.p999_ms, 3),
            opt(r.ratio, 2),
            opt(r.cpu.client_us, 1),
            opt(r.cpu.server_us, 1),
            opt(r.cpu.redis_us, 1),
            r.errors,
        );
    }
    println!("(x raw: throughput / raw Redis GET baseline of this run; cli/srv/rds µs: CPU time");
    println!(" per call of this load generator, clienteled and redis-server)");
    for g in goals {
        println!("{}  {}", if g.met { "PASS" } else { "MISS" }, g.description);
    }
    for n in notes {
        println!("note: {n}");
    }
}

/// Appends one JSON object per row to `path` (creating it and its folder if needed).
pub fn append_json(
    path: &Path,
    suite: &str,
    context: &serde_json::Value,
    rows: &[Row],
    goals: &[Goal],
) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let goals: Vec<_> = goals
        .iter()
        .map(|g| json!({"goal": g.description, "status": if g.met { "PASS" } else { "MISS" }}))
        .collect();
    for r in rows {
        let line = json!({
            "suite": suite,
            "benchmark": r.name,
            "unix_time": unix_time,
            "rps": r.rps,
            "p50_ms": r.p50_ms,
            "p99_ms": r.p99_ms,
            "p999_ms": r.p999_ms,
            "ratio_to_raw_get": r.ratio,
            "errors": r.errors,
            "cpu_us_per_call": {
                "client": r.cpu.client_us,
                "server": r.cpu.server_us,
                "redis": r.cpu.redis_us,
            },
            "context": context,
            "goals": goals,
        });
        writeln!(f, "{line}").with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
