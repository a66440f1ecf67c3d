//! One leader per background job when a service runs several replicas (Kubernetes scales
//! every service horizontally). Feed consumers and outbox forwarders are idempotent, but two
//! replicas following the same feed would do every piece of work twice and race on their
//! cursors; so each such job runs only in the replica that holds a PostgreSQL session-level
//! advisory lock named after it, on a connection of its own.
//!
//! If the leader dies, PostgreSQL drops its session and the lock, and another replica takes
//! over within [`RETRY`]. A leader that loses its connection (network partition) notices on
//! the next [`HEARTBEAT`] and stops its job before another can have been running long. On
//! SQLite (one process by construction) the job simply runs.

use std::future::Future;
use std::time::Duration;

use sqlx::Connection as _;

use crate::db::DatabaseTarget;

/// How often a follower tries to take the lock.
pub const RETRY: Duration = Duration::from_secs(2);
/// How often the leader checks that its session (and so its lock) is alive.
pub const HEARTBEAT: Duration = Duration::from_secs(5);

/// The advisory lock key of job `name`: FNV-1a 64 of `clientele-leader:<name>`, so names are
/// the only thing to keep unique (include the service: `segmentation.profile-feed`).
pub fn lock_key(name: &str) -> i64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in "clientele-leader:".bytes().chain(name.bytes()) {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    i64::from_ne_bytes(h.to_ne_bytes())
}

/// Runs `job()` for as long as this process leads `name`; when leadership is lost the job's
/// future is dropped and the process goes back to waiting. `job` is called again on every new
/// term, so it must resume from durable state (a stored cursor), which is what feed consumers
/// do anyway. The lock is taken on a connection of its own to `target`'s server (not from the
/// service's pool, whose connections come and go). Never returns on PostgreSQL; on SQLite
/// returns when `job()` does.
pub async fn lead<F, Fut>(target: DatabaseTarget, name: &str, job: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    lead_or_follow(target, name, || {}, job).await;
}

/// [`lead`], calling `on_follow` each time the lock is found held by another replica.
pub async fn lead_or_follow<F, Fut, G>(
    target: DatabaseTarget,
    name: &str,
    mut on_follow: G,
    mut job: F,
) where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
    G: FnMut(),
{
    let DatabaseTarget::Postgres { url, .. } = target else {
        job().await;
        return;
    };
    sqlx::any::install_default_drivers();
    let key = lock_key(name);
    loop {
        match acquire(&url, key).await {
            Ok(Some(mut conn)) => {
                tracing::info!(job = name, "leading");
                tokio::select! {
                    () = job() => {
                        tracing::info!(job = name, "job ended; giving up leadership");
                    }
                    e = heartbeat(&mut conn) => {
                        tracing::warn!(job = name, error = %e, "lost the leader session; stopping the job");
                    }
                }
                // Closing the session releases the lock (if it is not already gone).
                drop(conn);
            }
            Ok(None) => on_follow(),
            Err(e) => tracing::warn!(job = name, error = %e, "cannot try the leader lock"),
        }
        tokio::time::sleep(RETRY).await;
    }
}

/// A dedicated session holding the lock, or `None` when another replica holds it.
async fn acquire(url: &str, key: i64) -> Result<Option<sqlx::AnyConnection>, sqlx::Error> {
    let mut conn = sqlx::AnyConnection::connect(url).await?;
    let got: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
        .bind(key)
        .fetch_one(&mut conn)
        .await?;
    if got {
        Ok(Some(conn))
    } else {
        conn.close().await?;
        Ok(None)
    }
}

/// Runs `pass` forever: after a successful pass waits `idle`; after a failure logs it and backs
/// off (1 s, doubling to 60 s). The loop body of every feed consumer and forwarder; run it
/// under [`lead`] so only one replica polls.
pub async fn poll_forever<F, Fut, T, E>(name: &str, idle: Duration, mut pass: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, E>>,
    E: std::fmt::Display,
{
    let mut backoff = Duration::from_secs(1);
    loop {
        match pass().await {
            Ok(_) => {
                backoff = Duration::from_secs(1);
                tokio::time::sleep(idle).await;
            }
            Err(e) => {
                tracing::warn!(job = name, error = %e, retry_in = ?backoff, "background job failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(60));
            }
        }
    }
}

/// Spawns the usual background job: `pass(state.clone())` run by [`poll_forever`] under
/// [`lead`] for `name`, so exactly one replica polls. `pass` is one catch-up pass of a feed
/// consumer (read a page, apply it with the cursor in the same transaction).
pub fn spawn_polling<C, F, Fut, T, E>(
    target: DatabaseTarget,
    name: &'static str,
    idle: Duration,
    state: C,
    pass: F,
) -> tokio::task::JoinHandle<()>
where
    C: Clone + Send + Sync + 'static,
    F: Fn(C) -> Fut + Clone + Send + Sync + 'static,
    Fut: Future<Output = Result<T, E>> + Send,
    T: Send,
    E: std::fmt::Display + Send,
{
    tokio::spawn(async move {
        lead(target, name, move || {
            let (state, pass) = (state.clone(), pass.clone());
            async move { poll_forever(name, idle, || pass(state.clone())).await }
        })
        .await;
    })
}

/// Returns (with the error) once the session stops answering.
async fn heartbeat(conn: &mut sqlx::AnyConnection) -> sqlx::Error {
    loop {
        tokio::time::sleep(HEARTBEAT).await;
        if let Err(e) = sqlx::query("SELECT 1").execute(&mut *conn).await {
            return e;
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    fn database() -> DatabaseTarget {
        DatabaseTarget::Postgres {
            url: crate::testing::postgres_url(),
            schema: crate::testing::unique_schema("leader"),
        }
    }

    /// A job that counts how many copies of it run at once, forever.
    /// `leader` records which replica started last.
    fn counting_job(
        replica: usize,
        leader: Arc<AtomicUsize>,
        running: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        started: Arc<AtomicUsize>,
    ) -> impl FnMut() -> std::pin::Pin<Box<dyn Future<Output = ()> + Send>> {
        move || {
            let (running, most, started) = (running.clone(), most.clone(), started.clone());
            leader.store(replica, Ordering::SeqCst);
            Box::pin(async move {
                started.fetch_add(1, Ordering::SeqCst);
                let now = running.fetch_add(1, Ordering::SeqCst) + 1;
                most.fetch_max(now, Ordering::SeqCst);
                struct Guard(Arc<AtomicUsize>);
                impl Drop for Guard {
                    fn drop(&mut self) {
                        self.0.fetch_sub(1, Ordering::SeqCst);
                    }
                }
                let _g = Guard(running);
                std::future::pending::<()>().await;
            })
        }
    }

    #[test]
    fn lock_keys_differ_by_name_and_are_stable() {
        assert_eq!(
            lock_key("segmentation.profile-feed"),
            lock_key("segmentation.profile-feed")
        );
        assert_ne!(
            lock_key("segmentation.profile-feed"),
            lock_key("offers.ingest-feed")
        );
    }

    #[tokio::test]
    async fn only_one_replica_runs_a_job_and_another_takes_over_when_it_dies() {
        let name = format!("test-{}", uuid::Uuid::new_v4());
        let running = Arc::new(AtomicUsize::new(0));
        let most = Arc::new(AtomicUsize::new(0));
        let started = Arc::new(AtomicUsize::new(0));
        let leader = Arc::new(AtomicUsize::new(usize::MAX));
        let mut replicas = Vec::new();
        for replica in 0..3 {
            let db = database();
            let job = counting_job(
                replica,
                leader.clone(),
                running.clone(),
                most.clone(),
                started.clone(),
            );
            let name = name.clone();
            replicas.push(tokio::spawn(async move { lead(db, &name, job).await }));
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while running.load(Ordering::SeqCst) == 0 {
            assert!(tokio::time::Instant::now() < deadline, "nobody leads");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Followers retry every 2 s: give them two chances to (wrongly) start a second copy.
        tokio::time::sleep(RETRY * 2 + Duration::from_millis(500)).await;
        assert_eq!(
            most.load(Ordering::SeqCst),
            1,
            "two replicas ran the job at once"
        );
        assert_eq!(started.load(Ordering::SeqCst), 1);

        // The leader dies (its task and session are dropped): another replica takes over.
        let first = leader.load(Ordering::SeqCst);
        replicas[first].abort();
        let deadline = tokio::time::Instant::now() + RETRY * 4;
        while started.load(Ordering::SeqCst) < 2 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "no replica took over"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_ne!(leader.load(Ordering::SeqCst), first);
        tokio::time::sleep(RETRY + Duration::from_millis(500)).await;
        assert_eq!(running.load(Ordering::SeqCst), 1);
        assert_eq!(most.load(Ordering::SeqCst), 1);
        for r in replicas {
            r.abort();
        }
    }

    #[tokio::test]
    async fn on_sqlite_the_job_just_runs() {
        let dir = tempfile::tempdir().unwrap();
        let db = DatabaseTarget::Sqlite {
            path: dir.path().join("x.db"),
        };
        let ran = Arc::new(AtomicUsize::new(0));
        let r = ran.clone();
        lead(db, "sqlite-job", move || {
            let r = r.clone();
            async move {
                r.fetch_add(1, Ordering::SeqCst);
            }
        })
        .await;
        assert_eq!(ran.load(Ordering::SeqCst), 1);
    }
}
