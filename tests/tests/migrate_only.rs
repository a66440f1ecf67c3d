//! `clienteled --migrate-only`, as the Kubernetes migration Job runs it: applies every
//! service's schema migrations to an empty database and exits 0 without serving; a second run
//! finds nothing to do and also exits 0.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use clientele_e2e::{Deployment, TestDatabase, bin};
use sqlx::Connection;

#[tokio::test]
async fn migrate_only_creates_every_schema_and_can_run_again() {
    let db = TestDatabase::create().await;
    let deployment = Deployment::new(&db.url);
    for run in 1..=2 {
        let status = std::process::Command::new(bin("clienteled"))
            .args(["--target", "all", "--migrate-only"])
            .envs(deployment.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CLIENTELE_GRPC_ADDR", "127.0.0.1:1")
            .status()
            .expect("run clienteled");
        assert!(status.success(), "run {run}: {status}");
    }
    let mut conn = sqlx::PgConnection::connect(&db.url).await.unwrap();
    for schema in [
        "profiles",
        "ingest",
        "segmentation",
        "offers",
        "experiments",
    ] {
        let applied: i64 = sqlx::query_scalar(&format!(
            "SELECT count(*) FROM {schema}._sqlx_migrations WHERE success"
        ))
        .fetch_one(&mut conn)
        .await
        .unwrap_or_else(|e| panic!("schema {schema}: {e}"));
        assert!(applied > 0, "schema {schema} has no migrations applied");
    }
}
