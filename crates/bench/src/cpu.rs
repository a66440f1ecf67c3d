//! CPU time used by the processes sharing the machine during a run: this load generator, the
//! server under test (by pid, from `/proc`) and Redis (from `INFO cpu`). Dividing by the calls
//! made gives CPU microseconds per call, which shows where the cores went.

use std::time::Duration;

/// Clock ticks per second of `/proc/<pid>/stat` times (`USER_HZ`, 100 on every Linux ABI).
const USER_HZ: f64 = 100.0;

/// User + system CPU time of process `pid` (`self` for this one), or `None` where `/proc`
/// is unavailable.
pub fn process(pid: &str) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name may contain spaces; fields after it are space separated, starting with
    // field 3 (state). utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: u64 = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_secs_f64(ticks as f64 / USER_HZ))
}

/// User + system CPU time of every process whose command name is `comm` (e.g. all of
/// PostgreSQL's backends, `postgres`), or `None` where `/proc` is unavailable. Processes that
/// exit between two readings take their time with them, so compare readings over a window in
/// which the processes that matter stay up (a benchmark's own connections).
pub fn processes_named(comm: &str) -> Option<Duration> {
    let mut total = Duration::ZERO;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .filter(|n| n.bytes().all(|b| b.is_ascii_digit()))
        else {
            continue;
        };
        let is_it = std::fs::read_to_string(format!("/proc/{pid}/comm"))
            .is_ok_and(|c| c.trim_end() == comm);
        if is_it && let Some(t) = process(pid) {
            total += t;
        }
    }
    Some(total)
}

/// User + system CPU time Redis reports for its whole process.
pub async fn redis(conn: &mut redis::aio::MultiplexedConnection) -> Option<Duration> {
    let info: String = redis::cmd("INFO").arg("cpu").query_async(conn).await.ok()?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .and_then(|v| v.trim().parse::<f64>().ok())
    };
    Some(Duration::from_secs_f64(
        field("used_cpu_user")? + field("used_cpu_sys")?,
    ))
}

/// CPU readings of every process involved, taken together.
#[derive(Debug, Clone, Copy, Default)]
pub struct Snapshot {
    /// This load generator.
    pub client: Option<Duration>,
    /// The server under test.
    pub server: Option<Duration>,
    /// Redis.
    pub redis: Option<Duration>,
}

impl Snapshot {
    /// Reads every process's CPU time now.
    pub async fn take(
        server_pid: Option<u32>,
        conn: &mut redis::aio::MultiplexedConnection,
    ) -> Self {
        Self {
            client: process("self"),
            server: server_pid.and_then(|p| process(&p.to_string())),
            redis: redis(conn).await,
        }
    }

    /// CPU microseconds per call between `self` and the later `end`, per process.
    pub fn per_call(&self, end: &Snapshot, calls: u64) -> CpuPerCall {
        let per = |a: Option<Duration>, b: Option<Duration>| {
            let (a, b) = (a?, b?);
            (calls > 0).then(|| b.saturating_sub(a).as_secs_f64() * 1e6 / calls as f64)
        };
        CpuPerCall {
            client_us: per(self.client, end.client),
            server_us: per(self.server, end.server),
            redis_us: per(self.redis, end.redis),
        }
    }
}

/// CPU microseconds each process spent per call.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuPerCall {
    /// This load generator.
    pub client_us: Option<f64>,
    /// The server under test.
    pub server_us: Option<f64>,
    /// Redis.
    pub redis_us: Option<f64>,
}
