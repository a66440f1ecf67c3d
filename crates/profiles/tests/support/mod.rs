//! Test fixtures: a store or service on a fresh PostgreSQL schema or SQLite file, and helpers
//! to build identifier keys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_profiles::identifiers::{IdentifierHasher, IdentifierKey};
use clientele_profiles::{POSTGRES_MIGRATIONS, ProfileServiceImpl, SQLITE_MIGRATIONS, SqlProfileStore};
use clientele_runtime::cache::{MemoryCache, VersionedCache};
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    Postgres,
    Sqlite,
}

pub struct Fixture {
    pub store: Arc<SqlProfileStore>,
    pub hasher: IdentifierHasher,
    _dir: Option<tempfile::TempDir>,
}

pub fn hasher() -> IdentifierHasher {
    IdentifierHasher::new(b"conformance-test-secret", "KR").unwrap()
}

pub async fn fixture(engine: Engine, cap: u32) -> Fixture {
    let (target, dir) = match engine {
        Engine::Postgres => (
            DatabaseTarget::Postgres {
                url: testing::postgres_url(),
                schema: testing::unique_schema("profiles"),
            },
            None,
        ),
        Engine::Sqlite => {
            let dir = tempfile::tempdir().unwrap();
            (
                DatabaseTarget::Sqlite {
                    path: dir.path().join("profiles.db"),
                },
                Some(dir),
            )
        }
    };
    let database = db::open(&target, 20, &POSTGRES_MIGRATIONS, &SQLITE_MIGRATIONS, "profiles")
        .await
        .expect("test database (is PostgreSQL running? see README)");
    let hasher = hasher();
    Fixture {
        store: Arc::new(SqlProfileStore::new(database, hasher.clone(), cap)),
        hasher,
        _dir: dir,
    }
}

impl Fixture {
    pub fn email(&self, v: &str) -> IdentifierKey {
        self.hasher.normalise(2, v, "").unwrap()
    }
    pub fn customer(&self, v: &str) -> IdentifierKey {
        self.hasher.normalise(1, v, "").unwrap()
    }
    pub fn device(&self, v: &str) -> IdentifierKey {
        self.hasher.normalise(4, v, "").unwrap()
    }
    pub fn anonymous(&self, v: &str) -> IdentifierKey {
        self.hasher.normalise(5, v, "").unwrap()
    }

    pub fn service_with(&self, cache: Arc<dyn VersionedCache>) -> ProfileServiceImpl {
        ProfileServiceImpl::new(self.store.clone(), self.hasher.clone(), cache)
    }

    pub fn service(&self) -> ProfileServiceImpl {
        self.service_with(Arc::new(MemoryCache::new(
            1000,
            std::time::Duration::from_secs(60),
            "test",
        )))
    }
}
