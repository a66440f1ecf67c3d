//! A closed-loop load driver: `n` workers call as fast as answers come back; calls that start
//! after the warm-up and finish before the end of the window are counted and their latency is
//! recorded in an HDR histogram (nanoseconds).

use std::future::Future;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use tokio::task::JoinSet;

/// One caller. Each worker owns whatever connection state it needs.
pub trait Worker: Send + 'static {
    /// Issues one call and checks its answer.
    fn call(&mut self) -> impl Future<Output = anyhow::Result<()>> + Send;
}

/// How long to warm up and then measure.
#[derive(Debug, Clone, Copy)]
pub struct Window {
    /// Calls made during this leading period are not counted.
    pub warmup: Duration,
    /// Length of the measured period.
    pub duration: Duration,
}

/// What a load run measured.
#[derive(Debug)]
pub struct LoadResult {
    /// Successful calls inside the measured window.
    pub ops: u64,
    /// Failed calls inside the measured window.
    pub errors: u64,
    /// The first error seen, for the report.
    pub first_error: Option<String>,
    /// Length of the measured window.
    pub elapsed: Duration,
    /// Latency of the successful calls, nanoseconds.
    pub latency: Histogram<u64>,
}

impl LoadResult {
    /// Successful calls per second.
    pub fn rps(&self) -> f64 {
        self.ops as f64 / self.elapsed.as_secs_f64()
    }

    /// Latency at `quantile` (0..=1), milliseconds.
    pub fn ms(&self, quantile: f64) -> f64 {
        self.latency.value_at_quantile(quantile) as f64 / 1e6
    }

    /// The report row of this run: throughput, p50/p99/p999 and the ratio to `baseline_rps`
    /// (a baseline measured in the same run).
    pub fn row(
        &self,
        name: &str,
        cpu: crate::cpu::CpuPerCall,
        baseline_rps: f64,
    ) -> crate::report::Row {
        crate::report::Row {
            name: name.to_string(),
            rps: self.rps(),
            p50_ms: Some(self.ms(0.5)),
            p99_ms: Some(self.ms(0.99)),
            p999_ms: Some(self.ms(0.999)),
            ratio: Some(self.rps() / baseline_rps),
            errors: self.errors,
            cpu,
        }
    }

    /// Fails when nothing completed or more than 1% of the calls failed: a failing system is
    /// an error, not a slow one (a stray failure is only reported).
    pub fn check(&self, what: &str) -> anyhow::Result<()> {
        let total = self.ops + self.errors;
        anyhow::ensure!(
            total > 0,
            "{what}: no call completed in the measured period"
        );
        anyhow::ensure!(
            self.errors * 100 <= total,
            "{what}: {} of {} calls failed; first error: {}",
            self.errors,
            total,
            self.first_error.as_deref().unwrap_or("?")
        );
        Ok(())
    }
}

fn histogram() -> anyhow::Result<Histogram<u64>> {
    // 1 ns .. 60 s at 3 significant digits.
    Ok(Histogram::new_with_bounds(1, 60_000_000_000, 3)?)
}

/// Runs every worker concurrently for `window` and merges what they measured.
pub async fn drive<W: Worker>(workers: Vec<W>, window: Window) -> anyhow::Result<LoadResult> {
    let measure_from = Instant::now() + window.warmup;
    let until = measure_from + window.duration;
    let mut set = JoinSet::new();
    for mut worker in workers {
        set.spawn(async move {
            let mut latency = histogram()?;
            let (mut ops, mut errors, mut first_error) = (0u64, 0u64, None);
            loop {
                let started = Instant::now();
                if started >= until {
                    break;
                }
                let result = worker.call().await;
                let finished = Instant::now();
                if started < measure_from || finished > until {
                    continue;
                }
                match result {
                    Ok(()) => {
                        let ns = u64::try_from((finished - started).as_nanos()).unwrap_or(u64::MAX);
                        latency.saturating_record(ns.max(1));
                        ops += 1;
                    }
                    Err(e) => {
                        errors += 1;
                        first_error.get_or_insert_with(|| format!("{e:#}"));
                    }
                }
            }
            anyhow::Ok((ops, errors, first_error, latency))
        });
    }
    let mut total = LoadResult {
        ops: 0,
        errors: 0,
        first_error: None,
        elapsed: window.duration,
        latency: histogram()?,
    };
    while let Some(joined) = set.join_next().await {
        let (ops, errors, first_error, latency) = joined??;
        total.ops += ops;
        total.errors += errors;
        if total.first_error.is_none() {
            total.first_error = first_error;
        }
        total.latency.add(&latency)?;
    }
    Ok(total)
}
