//! Database connections. PostgreSQL in production (each service in its own schema, created and
//! migrated at start), embedded SQLite otherwise (each service in its own file under the data
//! folder). Both go through `sqlx::Any`, so one store implementation serves both backends;
//! [`Backend`] tells the store which dialect-specific statements (locks) to use.

use std::str::FromStr;
use std::sync::Arc;

use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::migrate::Migrator;
use sqlx::{AnyPool, ConnectOptions, Executor};

use crate::metrics::METRICS;
use crate::settings::Settings;

/// Which database engine a pool talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// PostgreSQL: concurrent writers, serialised where needed with advisory locks.
    Postgres,
    /// SQLite: one writer at a time (the store serialises its write transactions).
    Sqlite,
}

/// A service's connection pool and its backend.
#[derive(Debug, Clone)]
pub struct Database {
    /// The pool.
    pub pool: AnyPool,
    /// The engine behind it.
    pub backend: Backend,
    /// Serialises write transactions on SQLite (one writer at a time).
    write_lock: Arc<tokio::sync::Mutex<()>>,
}

/// A write transaction; on SQLite it also holds the process-wide writer lock until dropped.
#[derive(Debug)]
pub struct WriteTx<'a> {
    /// The transaction. Commit it; dropping it rolls back.
    pub tx: sqlx::Transaction<'static, sqlx::Any>,
    _serial: Option<tokio::sync::MutexGuard<'a, ()>>,
}

impl Database {
    /// Begins a write transaction. On SQLite writers queue here rather than failing with
    /// SQLITE_BUSY; on PostgreSQL concurrency is left to row and advisory locks.
    ///
    /// On SQLite the transaction is `BEGIN IMMEDIATE`: it takes the database's write lock at
    /// once, where the busy timeout applies. A deferred transaction would take it only at its
    /// first write, after its first read, and SQLite refuses that upgrade with SQLITE_BUSY at
    /// once, without waiting, whenever another connection still holds the lock (as one does
    /// while the ROLLBACK of a dropped transaction is still in flight).
    pub async fn begin_write(&self) -> Result<WriteTx<'_>, sqlx::Error> {
        let (serial, tx) = match self.backend {
            Backend::Sqlite => {
                let serial = self.write_lock.lock().await;
                (Some(serial), self.pool.begin_with("BEGIN IMMEDIATE").await?)
            }
            Backend::Postgres => (None, self.pool.begin().await?),
        };
        Ok(WriteTx {
            tx,
            _serial: serial,
        })
    }

    /// Takes transaction-scoped PostgreSQL advisory locks on `keys` in one statement, ordered
    /// by the lock's hash, so two transactions never wait on each other in a cycle. A no-op
    /// on SQLite, where [`Database::begin_write`] already serialises writers.
    pub async fn lock_keys(
        &self,
        conn: &mut sqlx::AnyConnection,
        keys: impl IntoIterator<Item = String>,
    ) -> Result<(), sqlx::Error> {
        if self.backend != Backend::Postgres {
            return Ok(());
        }
        let keys: std::collections::BTreeSet<String> = keys.into_iter().collect();
        let keys: Vec<String> = keys.into_iter().collect();
        // Chunks keep the statement under PostgreSQL's 65 535 parameters. Only keys within a
        // chunk are ordered by hash, so callers should lock at most 10 000 keys at once
        // (they lock a few thousand at most); a rare cross-chunk cycle is still caught by
        // PostgreSQL's deadlock detector and retried by the stores.
        for chunk in keys.chunks(10_000) {
            let values: Vec<String> = (1..=chunk.len()).map(|i| format!("(${i})")).collect();
            let sql = format!(
                "SELECT COUNT(pg_advisory_xact_lock(h)) FROM (SELECT hashtextextended(k, 0) AS h \
                 FROM (VALUES {}) AS v(k) ORDER BY 1) AS s",
                values.join(", ")
            );
            let mut q = sqlx::query(&sql);
            for k in chunk {
                q = q.bind(k.as_str());
            }
            q.execute(&mut *conn).await?;
        }
        Ok(())
    }

    /// Takes the transaction-scoped PostgreSQL advisory lock `key` (a no-op on SQLite).
    pub async fn lock_id(
        &self,
        conn: &mut sqlx::AnyConnection,
        key: i64,
    ) -> Result<(), sqlx::Error> {
        if self.backend == Backend::Postgres {
            sqlx::query("SELECT 1 FROM pg_advisory_xact_lock($1)")
                .bind(key)
                .execute(&mut *conn)
                .await?;
        }
        Ok(())
    }
}

/// Connecting or migrating failed.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// Could not connect or run a statement.
    #[error("database: {0}")]
    Sqlx(#[from] sqlx::Error),
    /// A migration failed.
    #[error("migration: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    /// The data folder could not be created.
    #[error("data folder: {0}")]
    Io(#[from] std::io::Error),
    /// The schema name is not a plain identifier.
    #[error("invalid schema name `{0}`")]
    Schema(String),
}

/// Where a service's data lives.
#[derive(Debug, Clone)]
pub enum DatabaseTarget {
    /// PostgreSQL at `url`, in schema `schema`.
    Postgres {
        /// `postgres://…`
        url: String,
        /// Schema the service's tables live in.
        schema: String,
    },
    /// SQLite file at `path`.
    Sqlite {
        /// The database file.
        path: std::path::PathBuf,
    },
}

impl DatabaseTarget {
    /// The target for `service` under `settings`: its schema in `database_url`, or
    /// `<data_dir>/<service>.db`.
    pub fn for_service(settings: &Settings, service: &str) -> Self {
        match &settings.database_url {
            Some(url) if !url.starts_with("sqlite:") => DatabaseTarget::Postgres {
                url: url.clone(),
                schema: service.to_string(),
            },
            _ => DatabaseTarget::Sqlite {
                path: settings.data_dir.join(format!("{service}.db")),
            },
        }
    }
}

fn valid_schema(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && !s.starts_with(|c: char| c.is_ascii_digit())
}

/// `migrator` with `ignore_missing` set: a schema already migrated by a NEWER version of the
/// service (migrations this binary does not know) is accepted, so rolling back to the previous
/// image after an upgrade works. That is safe because migrations only ever add (README:
/// upgrades); a migration that changed or dropped something would have to say so.
fn rollback_tolerant(migrator: &Migrator) -> Migrator {
    // sqlx exposes no constructor from a static migrator's list; the fields are public (for
    // `migrate!`), which is what this relies on.
    let mut tolerant = Migrator::DEFAULT;
    tolerant.migrations = migrator.migrations.clone();
    tolerant.set_ignore_missing(true);
    tolerant
}

/// Pool options for a PostgreSQL pool of at most `max_connections`: every service's pools
/// (the generic one here and the native ones of the batch paths) use these.
///
/// Connections are not pinged before each acquire (sqlx's default): the ping is a round trip
/// per query or transaction, which in the ingest bench was 4 % of the ingest process's CPU
/// and latency on every batch's path. A connection PostgreSQL closed (a restart, an
/// administrator's `pg_terminate_backend`) fails at most the one call that uses it (a
/// database error to the caller, e.g. ingest's UNAVAILABLE) and the pool then opens a new one
/// (`db::tests::a_pool_replaces_a_connection_postgres_closed`).
pub fn pg_pool_options<DB: sqlx::Database>(max_connections: u32) -> sqlx::pool::PoolOptions<DB> {
    sqlx::pool::PoolOptions::<DB>::new()
        .max_connections(max_connections.max(1))
        .test_before_acquire(false)
}

/// Opens (creating if needed) and migrates a service database. `postgres` and `sqlite` are
/// the service's migrations for each engine. `service` labels the pool metrics.
pub async fn open(
    target: &DatabaseTarget,
    max_connections: u32,
    postgres: &Migrator,
    sqlite: &Migrator,
    service: &'static str,
) -> Result<Database, DbError> {
    sqlx::any::install_default_drivers();
    let db = match target {
        DatabaseTarget::Postgres { url, schema } => {
            if !valid_schema(schema) {
                return Err(DbError::Schema(schema.clone()));
            }
            let opts = AnyConnectOptions::from_str(url)?;
            let mut conn = opts.connect().await?;
            conn.execute(format!("CREATE SCHEMA IF NOT EXISTS {schema}").as_str())
                .await?;
            drop(conn);
            let set_path: Arc<str> = format!("SET search_path TO {schema}").into();
            let pool = pg_pool_options::<sqlx::Any>(max_connections)
                .after_connect(move |conn, _| {
                    let set_path = set_path.clone();
                    Box::pin(async move {
                        conn.execute(&*set_path).await?;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await?;
            rollback_tolerant(postgres).run(&pool).await?;
            Database {
                pool,
                backend: Backend::Postgres,
                write_lock: Arc::default(),
            }
        }
        DatabaseTarget::Sqlite { path } => {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)?;
            }
            let url = format!("sqlite://{}?mode=rwc", path.display());
            let opts = AnyConnectOptions::from_str(&url)?;
            let pool = AnyPoolOptions::new()
                .max_connections(max_connections.clamp(1, 8))
                .after_connect(|conn, _| {
                    Box::pin(async move {
                        // WAL lets readers run beside the writer; FULL makes every
                        // acknowledged commit survive power loss; the busy timeout waits for
                        // the writer instead of failing.
                        conn.execute(
                            "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; \
                             PRAGMA busy_timeout = 10000; PRAGMA foreign_keys = ON;",
                        )
                        .await?;
                        Ok(())
                    })
                })
                .connect_with(opts)
                .await?;
            rollback_tolerant(sqlite).run(&pool).await?;
            Database {
                pool,
                backend: Backend::Sqlite,
                write_lock: Arc::default(),
            }
        }
    };
    let pool = db.pool.clone();
    METRICS.on_scrape(Arc::new(move || {
        let idle = i64::try_from(pool.num_idle()).unwrap_or(i64::MAX);
        let size = i64::from(pool.size());
        METRICS
            .db_pool
            .with_label_values(&[service, "idle"])
            .set(idle);
        METRICS
            .db_pool
            .with_label_values(&[service, "in_use"])
            .set(size - idle);
    }));
    Ok(db)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    /// A migration only a newer release has.
    fn newer(migrator: &Migrator) -> Migrator {
        let mut m = Migrator::DEFAULT;
        let mut list = migrator.migrations.to_vec();
        list.push(sqlx::migrate::Migration::new(
            99_999,
            "from the future".into(),
            sqlx::migrate::MigrationType::Simple,
            "CREATE TABLE future_feature (id BIGINT PRIMARY KEY)".into(),
            false,
        ));
        m.migrations = list.into();
        m
    }

    #[tokio::test]
    async fn an_older_release_starts_on_a_schema_a_newer_one_migrated() {
        static OLD: Migrator = Migrator::DEFAULT;
        let new = newer(&OLD);
        let target = DatabaseTarget::Postgres {
            url: crate::testing::postgres_url(),
            schema: crate::testing::unique_schema("rollback"),
        };
        open(&target, 2, &new, &new, "rollback").await.unwrap();
        // the previous image, which lacks migration 99999, still opens the database
        open(&target, 2, &OLD, &OLD, "rollback").await.unwrap();
        let dir = tempfile::tempdir().unwrap();
        let target = DatabaseTarget::Sqlite {
            path: dir.path().join("r.db"),
        };
        open(&target, 1, &new, &new, "rollback").await.unwrap();
        open(&target, 1, &OLD, &OLD, "rollback").await.unwrap();
    }

    /// Pools do not ping before each acquire ([`pg_pool_options`]): a connection PostgreSQL
    /// closed fails at most the one call that uses it, and the pool then hands out a new one.
    #[tokio::test]
    async fn a_pool_replaces_a_connection_postgres_closed() {
        static NONE: Migrator = Migrator::DEFAULT;
        let target = DatabaseTarget::Postgres {
            url: crate::testing::postgres_url(),
            schema: crate::testing::unique_schema("killed"),
        };
        let db = open(&target, 1, &NONE, &NONE, "killed").await.unwrap();
        let pid: i32 = sqlx::query_scalar("SELECT pg_backend_pid()")
            .fetch_one(&db.pool)
            .await
            .unwrap();
        let admin = sqlx::PgPool::connect(&crate::testing::postgres_url())
            .await
            .unwrap();
        let killed: bool = sqlx::query_scalar("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .fetch_one(&admin)
            .await
            .unwrap();
        assert!(killed);
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        let mut failures = 0;
        let mut answered = None;
        for _ in 0..3 {
            match sqlx::query_scalar::<_, i32>("SELECT pg_backend_pid()")
                .fetch_one(&db.pool)
                .await
            {
                Ok(p) => {
                    answered = Some(p);
                    break;
                }
                Err(_) => failures += 1,
            }
        }
        assert!(failures <= 1, "{failures} calls failed after the kill");
        let new_pid = answered.expect("the pool answered again");
        assert_ne!(new_pid, pid, "served by a new connection");
    }

    /// The flake this pins down: a write transaction dropped on an error path rolls back
    /// asynchronously, so the next writer can start while another connection still holds
    /// SQLite's write lock. A deferred transaction then failed its first write after a read
    /// with "database is locked" at once, without waiting; an immediate one waits for the lock.
    #[tokio::test]
    async fn a_sqlite_writer_waits_for_a_write_lock_held_elsewhere() {
        static NONE: Migrator = Migrator::DEFAULT;
        let dir = tempfile::tempdir().unwrap();
        let target = DatabaseTarget::Sqlite {
            path: dir.path().join("w.db"),
        };
        let db = open(&target, 4, &NONE, &NONE, "writers").await.unwrap();
        sqlx::query("CREATE TABLE t (k INTEGER PRIMARY KEY)")
            .execute(&db.pool)
            .await
            .unwrap();
        // Another connection holds the write lock (as one does until its rollback runs) ...
        let mut holder = db.pool.acquire().await.unwrap();
        sqlx::query("BEGIN IMMEDIATE")
            .execute(&mut *holder)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (k) VALUES (-1)")
            .execute(&mut *holder)
            .await
            .unwrap();
        let release = tokio::spawn(async move {
            tokio::time::sleep(std::time::Duration::from_millis(300)).await;
            sqlx::query("ROLLBACK").execute(&mut *holder).await.unwrap();
        });
        // ... and a writer that reads before it writes still gets through once it is released.
        let mut w = db.begin_write().await.unwrap();
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM t")
            .fetch_one(&mut *w.tx)
            .await
            .unwrap();
        sqlx::query("INSERT INTO t (k) VALUES ($1)")
            .bind(n)
            .execute(&mut *w.tx)
            .await
            .expect("the writer waits for the lock instead of failing");
        w.tx.commit().await.unwrap();
        release.await.unwrap();
        let rows: Vec<i64> = sqlx::query_scalar("SELECT k FROM t")
            .fetch_all(&db.pool)
            .await
            .unwrap();
        assert_eq!(rows, vec![0], "the held transaction's row was rolled back");
    }

    #[test]
    fn schema_names_must_be_plain_identifiers() {
        assert!(valid_schema("profiles"));
        assert!(valid_schema("t_1234_profiles"));
        assert!(!valid_schema("Profiles"));
        assert!(!valid_schema("a;drop"));
        assert!(!valid_schema("1abc"));
    }
}
