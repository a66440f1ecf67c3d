//! Helpers for tests that use the real PostgreSQL and Redis: each test gets its own schema and
//! its own Redis key prefix, so tests run in parallel without seeing each other's data.
//! `CLIENTELE_TEST_DATABASE_URL` and `CLIENTELE_TEST_REDIS_URL` override the local defaults.

use std::sync::atomic::{AtomicU64, Ordering};

/// PostgreSQL URL tests connect to.
pub fn postgres_url() -> String {
    std::env::var("CLIENTELE_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

/// Redis URL tests connect to.
pub fn redis_url() -> String {
    std::env::var("CLIENTELE_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

fn unique() -> String {
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let pid = std::process::id();
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    format!("{pid}_{nanos}_{n}")
}

/// A schema name no other test uses, e.g. `t_1234_56789_0_profiles`.
pub fn unique_schema(service: &str) -> String {
    format!("t_{}_{service}", unique())
}

/// A Redis key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test:{}:", unique())
}

/// The migrations of `migrator` up to and including `version`: opens a store as an older
/// release left it, so a test can write old-shaped data and check what a later migration makes
/// of it.
pub fn migrations_through(
    migrator: &sqlx::migrate::Migrator,
    version: i64,
) -> sqlx::migrate::Migrator {
    let mut old = sqlx::migrate::Migrator::DEFAULT;
    old.migrations = migrator
        .migrations
        .iter()
        .filter(|m| m.version <= version)
        .cloned()
        .collect::<Vec<_>>()
        .into();
    old
}
