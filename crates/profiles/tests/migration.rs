//! Migration 0004 (the built-in engagement counters moved into the profile row) carries the
//! counters of a store written by migrations 0001–0003 over, on PostgreSQL and SQLite: the
//! profile reads the same afterwards, only names outside the row stay in `engagement`, and
//! erasing the profile clears its row counters.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use clientele_profiles::row_engagement::ROW_ENGAGEMENT;
use clientele_profiles::{POSTGRES_MIGRATIONS, ProfileStore, SQLITE_MIGRATIONS, SqlProfileStore};
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;
use sqlx::Row;

const T0: i64 = 1_700_000_000_000_000;
const PID: &str = "00000000-0000-0000-0000-00000000000a";

async fn counters_move_into_the_profile_row(target: DatabaseTarget) {
    let old = db::open(
        &target,
        2,
        &testing::migrations_through(&POSTGRES_MIGRATIONS, 3),
        &testing::migrations_through(&SQLITE_MIGRATIONS, 3),
        "profiles",
    )
    .await
    .expect("test database (is PostgreSQL running?)");
    sqlx::query(
        "INSERT INTO profiles (id, created_at, updated_at, version) VALUES ($1, $2, $2, 3)",
    )
    .bind(PID)
    .bind(T0)
    .execute(&old.pool)
    .await
    .unwrap();
    for (kind, n) in [("page_viewed", 3), ("custom", 2), ("loyalty.quiz_done", 5)] {
        sqlx::query("INSERT INTO engagement (profile_id, kind, count) VALUES ($1, $2, $3)")
            .bind(PID)
            .bind(kind)
            .bind(n)
            .execute(&old.pool)
            .await
            .unwrap();
    }
    old.pool.close().await;

    let new = db::open(
        &target,
        2,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "profiles",
    )
    .await
    .unwrap();
    let store = SqlProfileStore::new(new.clone(), support::hasher(), 5);
    let p = store.get(PID).await.unwrap();
    let expected: Vec<(String, i64)> =
        [("custom", 2), ("loyalty.quiz_done", 5), ("page_viewed", 3)]
            .into_iter()
            .map(|(k, n)| (k.to_string(), n))
            .collect();
    assert_eq!(p.engagement.into_iter().collect::<Vec<_>>(), expected);
    let left: Vec<String> = sqlx::query("SELECT kind FROM engagement ORDER BY kind")
        .fetch_all(&new.pool)
        .await
        .unwrap()
        .iter()
        .map(|r| r.try_get(0).unwrap())
        .collect();
    assert_eq!(left, vec!["loyalty.quiz_done".to_string()]);

    store.erase(PID, "test", T0 + 1).await.unwrap();
    let sum = ROW_ENGAGEMENT
        .iter()
        .map(|(_, c)| c.to_string())
        .collect::<Vec<_>>()
        .join(" + ");
    let row = sqlx::query(&format!("SELECT {sum} FROM profiles WHERE id = $1"))
        .bind(PID)
        .fetch_one(&new.pool)
        .await
        .unwrap();
    assert_eq!(
        row.try_get::<i64, _>(0).unwrap(),
        0,
        "erasure clears the row counters"
    );
    let rows: i64 = sqlx::query("SELECT COUNT(*) FROM engagement")
        .fetch_one(&new.pool)
        .await
        .unwrap()
        .try_get(0)
        .unwrap();
    assert_eq!(rows, 0, "and the table counters");
}

#[tokio::test]
async fn postgres_counters_move_into_the_profile_row() {
    counters_move_into_the_profile_row(DatabaseTarget::Postgres {
        url: testing::postgres_url(),
        schema: testing::unique_schema("profiles"),
    })
    .await;
}

#[tokio::test]
async fn sqlite_counters_move_into_the_profile_row() {
    let dir = tempfile::tempdir().unwrap();
    counters_move_into_the_profile_row(DatabaseTarget::Sqlite {
        path: dir.path().join("profiles.db"),
    })
    .await;
}
