//! Raw Redis baselines: GET of a ~1 KB value from `concurrency` tasks that each own a
//! multiplexed connection (like `redis-benchmark`'s clients), and `redis-benchmark` itself
//! when it is installed.

use std::process::Stdio;

use anyhow::Context;

use crate::load::Worker;

/// One raw GET caller with its own connection.
#[derive(Debug)]
pub struct RawGet {
    conn: redis::aio::MultiplexedConnection,
    key: String,
    expect_len: usize,
}

impl RawGet {
    /// `concurrency` callers, each on a new connection, reading `key` (which holds
    /// `expect_len` bytes).
    pub async fn workers(
        client: &redis::Client,
        concurrency: usize,
        key: &str,
        expect_len: usize,
    ) -> anyhow::Result<Vec<Self>> {
        let mut out = Vec::with_capacity(concurrency);
        for _ in 0..concurrency {
            out.push(Self {
                conn: client
                    .get_multiplexed_async_connection()
                    .await
                    .context("connecting to Redis")?,
                key: key.to_string(),
                expect_len,
            });
        }
        Ok(out)
    }
}

impl Worker for RawGet {
    async fn call(&mut self) -> anyhow::Result<()> {
        let v: Vec<u8> = redis::cmd("GET")
            .arg(&self.key)
            .query_async(&mut self.conn)
            .await?;
        anyhow::ensure!(v.len() == self.expect_len, "GET returned {} bytes", v.len());
        Ok(())
    }
}

/// Host and port of a `redis://` URL, for `redis-benchmark`.
pub fn host_port(client: &redis::Client) -> Option<(String, u16)> {
    match &client.get_connection_info().addr {
        redis::ConnectionAddr::Tcp(host, port) => Some((host.clone(), *port)),
        _ => None,
    }
}

/// Requests per second `redis-benchmark` reports for `extra` (`-t get` or a literal
/// command), or `None` when the binary is not installed.
pub async fn redis_benchmark(
    host: &str,
    port: u16,
    concurrency: usize,
    requests: u64,
    extra: &[&str],
) -> anyhow::Result<Option<f64>> {
    let mut cmd = tokio::process::Command::new("redis-benchmark");
    cmd.args(["-h", host, "-p", &port.to_string()])
        .args(["-c", &concurrency.to_string(), "-n", &requests.to_string()])
        .args(["-q", "-d", "1024"])
        .args(extra)
        .stdin(Stdio::null())
        .stderr(Stdio::piped())
        .stdout(Stdio::piped());
    let out = match cmd.output().await {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).context("running redis-benchmark"),
    };
    let text = String::from_utf8_lossy(&out.stdout);
    anyhow::ensure!(
        out.status.success(),
        "redis-benchmark failed: {}{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    parse_rps(&text)
        .map(Some)
        .with_context(|| format!("unexpected redis-benchmark output: {text:?}"))
}

/// Parses the final `NAME: 68027.21 requests per second, p50=…` line of `redis-benchmark -q`
/// (progress updates are separated by carriage returns).
fn parse_rps(text: &str) -> Option<f64> {
    text.split(['\r', '\n'])
        .filter_map(|seg| {
            let (_, rest) = seg.split_once(": ")?;
            let (n, _) = rest.trim_start().split_once(" requests per second")?;
            n.trim().parse().ok()
        })
        .next_back()
}

#[cfg(test)]
mod tests {
    use super::parse_rps;

    #[test]
    fn parses_quiet_output_with_progress_lines() {
        let out = "GET: rps=0.0 (overall: nan) avg_msec=nan (overall: nan)\r\
                   GET: rps=65000.0 (overall: 65000.0) avg_msec=0.4\r\
                   GET: 68027.21 requests per second, p50=0.383 msec                    \n\n";
        assert_eq!(parse_rps(out), Some(68027.21));
    }

    #[test]
    fn parses_the_older_format() {
        assert_eq!(
            parse_rps("GET: 71428.57 requests per second\n"),
            Some(71428.57)
        );
        assert_eq!(parse_rps("garbage"), None);
    }
}
