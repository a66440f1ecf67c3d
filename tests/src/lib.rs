//! Harness for end-to-end tests: starts `clienteled` processes exactly as deployed (one per
//! target, configured only through `CLIENTELE_*` environment variables) on free loopback
//! ports, against a fresh PostgreSQL database and a unique Redis key prefix per test.
//!
//! The binaries must be built first (`make test` does: `cargo build -p clienteled -p clientele`).

pub mod story;

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use clientele_runtime::client::{ClientInterceptor, lazy_channel};
use clientele_runtime::testing;
use sqlx::Connection;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

/// Token with every scope that the harness configures on every process.
pub const ADMIN_TOKEN: &str = "e2e-admin-token";

/// Where the workspace's binaries are.
pub fn bin(name: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let path = target.join("debug").join(name);
    assert!(
        path.exists(),
        "{} is missing: run `cargo build -p clienteled -p clientele` first (make test does)",
        path.display()
    );
    path
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A PostgreSQL database created for one test and dropped when this is dropped.
#[derive(Debug)]
pub struct TestDatabase {
    /// URL of the new database.
    pub url: String,
    admin_url: String,
    name: String,
}

impl TestDatabase {
    /// Creates `e2e_<unique>` on the test server.
    pub async fn create() -> Self {
        let admin_url = testing::postgres_url();
        let name = format!("e2e_{}", uuid::Uuid::new_v4().simple());
        let mut conn = sqlx::PgConnection::connect(&admin_url)
            .await
            .expect("PostgreSQL for tests (see README)");
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut conn)
            .await
            .expect("create test database");
        let base = admin_url
            .rsplit_once('/')
            .map_or(admin_url.as_str(), |(b, _)| b);
        Self {
            url: format!("{base}/{name}"),
            admin_url,
            name,
        }
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        let admin = self.admin_url.clone();
        let name = self.name.clone();
        // Best effort: a leftover database only costs disk.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok(mut c) = sqlx::PgConnection::connect(&admin).await {
                        let _ =
                            sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                                .execute(&mut c)
                                .await;
                    }
                });
            }
        })
        .join();
    }
}

/// One running `clienteled` process.
#[derive(Debug)]
pub struct Service {
    /// `http://127.0.0.1:<port>`
    pub endpoint: String,
    /// The gRPC port.
    pub port: u16,
    /// The metrics port.
    pub metrics_port: u16,
    target: String,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// Settings shared by every process of a test's deployment.
#[derive(Debug, Clone)]
pub struct Deployment {
    /// `CLIENTELE_*` variables every process gets.
    pub env: Vec<(String, String)>,
}

impl Deployment {
    /// PostgreSQL at `database_url`, Redis with a unique key prefix, one admin token.
    pub fn new(database_url: &str) -> Self {
        let env = vec![
            ("CLIENTELE_DATABASE_URL".into(), database_url.to_string()),
            ("CLIENTELE_REDIS_URL".into(), testing::redis_url()),
            (
                "CLIENTELE_REDIS_KEY_PREFIX".into(),
                testing::unique_prefix(),
            ),
            (
                "CLIENTELE_IDENTITY__HASH_SECRET".into(),
                "e2e-secret-0123456789abcdef".into(),
            ),
            (
                "CLIENTELE_TOKENS".into(),
                format!(r#"[{{client="e2e",token="{ADMIN_TOKEN}",scopes=["*"]}}]"#),
            ),
            ("CLIENTELE_SERVICE_TOKEN".into(), ADMIN_TOKEN.into()),
            ("CLIENTELE_LOG_FORMAT".into(), "json".into()),
            ("CLIENTELE_SHUTDOWN_GRACE_SECS".into(), "5".into()),
        ];
        Self { env }
    }

    /// Starts `clienteled --target <target>` on free ports and waits until it serves.
    pub async fn start(&self, target: &str, extra: &[(&str, &str)]) -> Service {
        let port = free_port();
        let metrics_port = free_port();
        let mut env = self.env.clone();
        env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let mut s = Service {
            endpoint: format!("http://127.0.0.1:{port}"),
            port,
            metrics_port,
            target: target.to_string(),
            env,
            child: None,
        };
        s.restart().await;
        s
    }
}

impl Service {
    /// (Re)starts the process on the same ports and waits until its health check serves.
    pub async fn restart(&mut self) {
        let child = Command::new(bin("clienteled"))
            .args(["--target", &self.target])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("CLIENTELE_GRPC_ADDR", format!("127.0.0.1:{}", self.port))
            .env(
                "CLIENTELE_METRICS_ADDR",
                format!("127.0.0.1:{}", self.metrics_port),
            )
            .stdout(if std::env::var_os("E2E_LOGS").is_some() {
                Stdio::inherit()
            } else {
                Stdio::null()
            })
            .stderr(Stdio::inherit())
            .spawn()
            .expect("start clienteled");
        self.child = Some(child);
        self.wait_serving(Duration::from_secs(30)).await;
    }

    async fn wait_serving(&mut self, limit: Duration) {
        let started = Instant::now();
        loop {
            if let Some(c) = self.child.as_mut()
                && let Ok(Some(status)) = c.try_wait()
            {
                panic!("clienteled --target {} exited early: {status}", self.target);
            }
            if let Ok(ch) = lazy_channel(&self.endpoint) {
                let mut h = tonic_health::pb::health_client::HealthClient::new(ch);
                let ok = h
                    .check(tonic_health::pb::HealthCheckRequest {
                        service: String::new(),
                    })
                    .await
                    .is_ok_and(|r| r.into_inner().status == 1);
                if ok {
                    return;
                }
            }
            assert!(
                started.elapsed() < limit,
                "clienteled --target {} did not become healthy",
                self.target
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Sends SIGTERM and waits for the exit status code.
    pub fn terminate(&mut self) -> Option<i32> {
        let mut child = self.child.take()?;
        let _ = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status();
        child.wait().ok().and_then(|s| s.code())
    }

    /// Kills the process at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// A channel to this process that adds the admin token.
    pub fn channel(&self) -> InterceptedChannel {
        let ch = lazy_channel(&self.endpoint).expect("valid endpoint");
        InterceptedService::new(
            ch,
            ClientInterceptor::new(Some(ADMIN_TOKEN)).expect("ascii token"),
        )
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A channel that authenticates as the harness's admin.
pub type InterceptedChannel = InterceptedService<Channel, ClientInterceptor>;
