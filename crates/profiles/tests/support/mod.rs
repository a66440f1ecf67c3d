//! Test fixtures: a store or service on a fresh PostgreSQL schema or SQLite file, and helpers
//! to build identifier keys.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use clientele_profiles::identifiers::{IdentifierHasher, IdentifierKey};
use clientele_profiles::{
    POSTGRES_MIGRATIONS, ProfileServiceImpl, SQLITE_MIGRATIONS, SqlProfileStore,
};
use clientele_runtime::cache::{MemoryCache, VersionedCache};
use clientele_runtime::db::{self, DatabaseTarget};
use clientele_runtime::testing;

/// Which database a fixture uses.
#[derive(Debug, Clone, Copy)]
pub enum Engine {
    /// PostgreSQL with the native pool: the batch calls run migration 0002's functions.
    Postgres,
    /// PostgreSQL through the generic `sqlx::Any` statements only.
    PostgresGeneric,
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
        Engine::Postgres | Engine::PostgresGeneric => (
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
    let database = db::open(
        &target,
        20,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "profiles",
    )
    .await
    .expect("test database (is PostgreSQL running? see README)");
    let hasher = hasher();
    let store = SqlProfileStore::new(database, hasher.clone(), cap);
    let store = match (&target, engine) {
        (DatabaseTarget::Postgres { url, schema }, Engine::Postgres) => store
            .with_native_pool(url, schema, 8)
            .await
            .expect("native pool"),
        _ => store,
    };
    Fixture {
        store: Arc::new(store),
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

/// A ProfileService served on an ephemeral loopback port with two tokens: `admin-token`
/// (every scope) and `reader-token` (`profiles:read`). Dropping the guard stops the server.
pub struct Served {
    pub endpoint: String,
    _stop: tokio::sync::oneshot::Sender<()>,
}

pub async fn serve(service: ProfileServiceImpl) -> Served {
    use clientele_runtime::settings::TokenConfig;
    let settings = clientele_runtime::Settings {
        tokens: vec![
            TokenConfig {
                client: "admin".into(),
                token: "admin-token".into(),
                scopes: vec!["*".into()],
            },
            TokenConfig {
                client: "reader".into(),
                token: "reader-token".into(),
                scopes: vec!["profiles:read".into()],
            },
        ],
        ..Default::default()
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let endpoint = format!("http://{}", listener.local_addr().unwrap());
    let mut mount = clientele_runtime::server::Mount::default();
    service.mount(&mut mount);
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        clientele_runtime::server::serve(&settings, mount, listener, async move {
            let _ = rx.await;
        })
        .await
        .unwrap();
    });
    Served {
        endpoint,
        _stop: tx,
    }
}

pub type Client = clientele_proto::v1::profile_service_client::ProfileServiceClient<
    tonic::service::interceptor::InterceptedService<
        tonic::transport::Channel,
        clientele_runtime::client::ClientInterceptor,
    >,
>;

pub fn client(endpoint: &str, token: Option<&str>) -> Client {
    let channel = clientele_runtime::client::lazy_channel(endpoint).unwrap();
    let interceptor = clientele_runtime::client::ClientInterceptor::new(token).unwrap();
    clientele_proto::v1::profile_service_client::ProfileServiceClient::with_interceptor(
        channel,
        interceptor,
    )
}

pub fn id(kind: i32, value: &str) -> clientele_proto::v1::Identifier {
    clientele_proto::v1::Identifier {
        r#type: kind,
        value: value.into(),
        namespace: String::new(),
    }
}

pub fn set(
    ids: Vec<clientele_proto::v1::Identifier>,
) -> Option<clientele_proto::v1::IdentifierSet> {
    Some(clientele_proto::v1::IdentifierSet { identifiers: ids })
}
