//! Assembles the services a `--target` names into one gRPC host, in the manner of Grafana
//! Loki's monolithic (`all`) and microservices (one target per process) modes.

use std::path::PathBuf;

use anyhow::Context;
use clientele_runtime::Settings;
use clientele_runtime::db::DatabaseTarget;
use clientele_runtime::server::{self, Mount};
use clientele_runtime::settings::TokenConfig;

/// Which services a process runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// Every service in one process.
    All,
    /// IngestService.
    Ingest,
    /// ProfileService.
    Profiles,
    /// SegmentationService.
    Segmentation,
    /// OfferService.
    Offers,
    /// ExperimentService.
    Experiments,
}

/// Command-line arguments of `clienteled`.
#[derive(Debug, clap::Parser)]
#[command(name = "clienteled", version, about = "Clientele server")]
pub struct Args {
    /// Services to run.
    #[arg(long, value_enum, default_value = "all", env = "CLIENTELE_TARGET")]
    pub target: Target,
    /// Settings file (TOML). Also `CLIENTELE_CONFIG`.
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Apply the schema migrations of the targeted services and exit without serving (the
    /// Kubernetes migration Job). Idempotent: an up-to-date schema is left as it is.
    #[arg(long)]
    pub migrate_only: bool,
}

/// Opens (and so migrates) the database of every service `target` names, then closes it.
/// Each service's migrations run under sqlx's PostgreSQL advisory lock, so this may race with
/// starting replicas safely.
async fn migrate(settings: &Settings, target: Target) -> anyhow::Result<()> {
    use clientele_runtime::db;
    type Migrations = (
        Target,
        &'static str,
        &'static sqlx::migrate::Migrator,
        &'static sqlx::migrate::Migrator,
    );
    let all: [Migrations; 5] = [
        (
            Target::Profiles,
            "profiles",
            &clientele_profiles::POSTGRES_MIGRATIONS,
            &clientele_profiles::SQLITE_MIGRATIONS,
        ),
        (
            Target::Ingest,
            "ingest",
            &clientele_ingest::POSTGRES_MIGRATIONS,
            &clientele_ingest::SQLITE_MIGRATIONS,
        ),
        (
            Target::Segmentation,
            "segmentation",
            &clientele_segmentation::POSTGRES_MIGRATIONS,
            &clientele_segmentation::SQLITE_MIGRATIONS,
        ),
        (
            Target::Offers,
            "offers",
            &clientele_offers::POSTGRES_MIGRATIONS,
            &clientele_offers::SQLITE_MIGRATIONS,
        ),
        (
            Target::Experiments,
            "experiments",
            &clientele_experiments::POSTGRES_MIGRATIONS,
            &clientele_experiments::SQLITE_MIGRATIONS,
        ),
    ];
    for (t, name, postgres, sqlite) in all {
        if target != Target::All && target != t {
            continue;
        }
        let db_target = DatabaseTarget::for_service(settings, name);
        let database = db::open(&db_target, 1, postgres, sqlite, name)
            .await
            .with_context(|| format!("migrating the {name} schema"))?;
        database.pool.close().await;
        tracing::info!(service = name, "schema up to date");
    }
    Ok(())
}

/// With no tokens configured on the embedded default, creates a development token with every
/// scope in `<data_dir>/dev-token` (mode 0600) so a laptop install works out of the box. The
/// token itself is never logged. With PostgreSQL, tokens must be configured.
fn ensure_tokens(settings: &mut Settings) -> anyhow::Result<()> {
    if !settings.tokens.is_empty() {
        return Ok(());
    }
    if settings
        .database_url
        .as_deref()
        .is_some_and(|u| !u.starts_with("sqlite:"))
    {
        anyhow::bail!(
            "no tokens configured: set `tokens` in the settings file or CLIENTELE_TOKENS"
        );
    }
    let path = settings.data_dir.join("dev-token");
    let token = match std::fs::read_to_string(&path) {
        Ok(t) => t.trim().to_string(),
        Err(_) => {
            std::fs::create_dir_all(&settings.data_dir)?;
            let t = format!("dev-{}", uuid::Uuid::new_v4().simple());
            std::fs::write(&path, &t)?;
            #[cfg(unix)]
            {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            }
            t
        }
    };
    tracing::warn!(path = %path.display(), "no tokens configured; using a development token with every scope");
    settings.tokens.push(TokenConfig {
        client: "dev".into(),
        token: token.clone(),
        scopes: vec!["*".into()],
    });
    if settings.service_token.is_none() {
        settings.service_token = Some(token);
    }
    Ok(())
}

/// Runs the server until SIGTERM / Ctrl-C.
pub async fn run(args: Args) -> anyhow::Result<()> {
    let mut settings = Settings::load(args.config.as_deref())?;
    let _telemetry = clientele_runtime::telemetry::init(
        &settings,
        &format!("clientele-{:?}", args.target).to_lowercase(),
    )?;
    if args.migrate_only {
        return migrate(&settings, args.target).await;
    }
    ensure_tokens(&mut settings)?;
    // Bound before the services are built: their feed consumers start at once and may call
    // this very process (`--target all`); connections made before serving starts wait in the
    // listen backlog instead of being refused (and logged as failures).
    let listener = tokio::net::TcpListener::bind(settings.grpc_addr)
        .await
        .with_context(|| format!("binding {}", settings.grpc_addr))?;
    let mut mount = Mount::default();
    let wants = |t: Target| args.target == Target::All || args.target == t;
    if wants(Target::Profiles) {
        let target = DatabaseTarget::for_service(&settings, "profiles");
        clientele_profiles::setup::build(&settings, &target)
            .await
            .context("starting the profile service")?
            .mount(&mut mount);
    }
    if wants(Target::Ingest) {
        let target = DatabaseTarget::for_service(&settings, "ingest");
        clientele_ingest::setup::build(&settings, &target)
            .await
            .context("starting the ingest service")?
            .mount(&mut mount);
    }
    if wants(Target::Experiments) {
        let target = DatabaseTarget::for_service(&settings, "experiments");
        let holdout = clientele_experiments::holdout::HoldoutConfig {
            enabled: settings.holdout.fraction > 0.0,
            fraction: settings.holdout.fraction,
            seed: settings.holdout.seed.clone(),
            ..Default::default()
        };
        clientele_experiments::setup::build_with_holdout(&settings, &target, holdout)
            .await
            .context("starting the experiment service")?
            .mount(&mut mount);
    }
    if wants(Target::Offers) {
        let target = DatabaseTarget::for_service(&settings, "offers");
        clientele_offers::setup::build(&settings, &target)
            .await
            .context("starting the offer service")?
            .mount(&mut mount);
    }
    if wants(Target::Segmentation) {
        let target = DatabaseTarget::for_service(&settings, "segmentation");
        clientele_segmentation::setup::build(&settings, &target)
            .await
            .context("starting the segmentation service")?
            .mount(&mut mount);
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let metrics_addr = settings.metrics_addr;
    let mut metrics_stop = stop_rx.clone();
    let metrics = tokio::spawn(async move {
        clientele_runtime::metrics::serve(metrics_addr, async move {
            let _ = metrics_stop.wait_for(|s| *s).await;
        })
        .await
    });
    let shutdown = async move {
        server::termination_signal().await;
        let _ = stop_tx.send(true);
    };
    server::serve(&settings, mount, listener, shutdown).await?;
    metrics.abort();
    tracing::info!("stopped");
    Ok(())
}
