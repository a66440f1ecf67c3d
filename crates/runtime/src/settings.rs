//! Layered settings: built-in defaults, then an optional TOML file (its path comes from the
//! `--config` flag or `CLIENTELE_CONFIG`, never from the current directory), then
//! `CLIENTELE_*` environment variables (`__` separates nested keys, so
//! `CLIENTELE_IDENTITY__HASH_SECRET` sets `identity.hash_secret`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Everything a Clientele process can be configured with. See the README's configuration
/// reference for each key, its environment variable and its default.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Settings {
    /// Address the gRPC server listens on. In `--target all` every service shares it.
    pub grpc_addr: SocketAddr,
    /// Address of the Prometheus `/metrics` HTTP endpoint.
    pub metrics_addr: SocketAddr,
    /// Folder for embedded SQLite databases and the development token.
    pub data_dir: PathBuf,
    /// `postgres://…` for PostgreSQL; unset means embedded SQLite files in `data_dir`.
    pub database_url: Option<String>,
    /// Connections per service pool.
    pub database_max_connections: u32,
    /// `redis://…`; unset means an in-process cache.
    pub redis_url: Option<String>,
    /// Prefix of every Redis key this deployment writes (lets tests and tenants share a Redis).
    pub redis_key_prefix: String,
    /// Time to live of cached entries, seconds.
    pub cache_ttl_secs: u64,
    /// How long a cache call may take before it is treated as a miss, milliseconds.
    pub cache_timeout_ms: u64,
    /// Entries held by the in-process cache.
    pub cache_capacity: u64,
    /// `human` or `json` log lines.
    pub log_format: LogFormat,
    /// `tracing` filter directive (`info`, `clientele_profiles=debug,info`, …).
    pub log_filter: String,
    /// Bearer tokens accepted by the services and their scopes.
    pub tokens: Vec<TokenConfig>,
    /// Token this process presents when it calls other Clientele services.
    pub service_token: Option<String>,
    /// Where other services are reached; unset means this process's own `grpc_addr`.
    pub endpoints: Endpoints,
    /// Identity resolution settings.
    pub identity: IdentitySettings,
    /// Event ingestion settings.
    pub ingest: IngestSettings,
    /// The global long-term holdout shared by experiments and offers.
    pub holdout: HoldoutSettings,
    /// Customer scoring and segmentation settings.
    pub segmentation: SegmentationSettings,
    /// Loyalty programme and offer settings.
    pub offers: OfferSettings,
    /// Experiment settings.
    pub experiments: ExperimentSettings,
    /// Seconds SIGTERM waits for in-flight calls before the process exits anyway.
    pub shutdown_grace_secs: u64,
}

/// The global long-term holdout: a fixed share of all units that no experiment treats and no
/// offer reaches, so the programme's total effect can be measured against them.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HoldoutSettings {
    /// Share of units held out, 0 to 0.5; 0 disables the holdout.
    pub fraction: f64,
    /// Hash seed; changing it reshuffles who is held out.
    pub seed: String,
}

impl Default for HoldoutSettings {
    fn default() -> Self {
        Self {
            fraction: 0.0,
            seed: "clientele-global-holdout".into(),
        }
    }
}

/// Loyalty programme and offer settings (OfferService).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OfferSettings {
    /// Catalogue-wide frequency cap: at most this many codes per profile within
    /// `frequency_window_hours`, across offers; 0 disables it.
    pub frequency_cap: u32,
    /// Rolling window of the frequency cap, in hours.
    pub frequency_window_hours: u32,
    /// Path of a TOML file with the programme (tiers, earning rules); unset uses the built-in
    /// programme (Bronze / Silver / Gold on points earned, 1 point per currency unit).
    pub program_file: Option<PathBuf>,
    /// Run the background consumers (order accrual, segment-entry and event triggers).
    pub consumers: bool,
    /// Profiles Decide keeps in each of its in-process read models (profile facts, segment
    /// facts, ledger views); 0 turns them off and every Decide reads through.
    pub decision_cache_profiles: u64,
    /// Longest life of cached profile and segment facts, seconds: the staleness bound for a
    /// replica that does not apply the feeds (the feed leader invalidates at once).
    pub decision_cache_ttl_secs: u64,
    /// Longest life of a cached ledger view, seconds: the staleness bound for another
    /// replica's ledger and code writes (this process's own writes invalidate at once).
    pub decision_cache_ledger_ttl_secs: u64,
    /// Longest wait, seconds, for the feed consumers to catch up with the feeds after a start
    /// before the OfferService reports SERVING on the health service anyway (with a warning).
    pub ready_timeout_secs: u64,
}

impl Default for OfferSettings {
    fn default() -> Self {
        Self {
            frequency_cap: 0,
            frequency_window_hours: 24 * 7,
            program_file: None,
            consumers: true,
            decision_cache_profiles: 100_000,
            decision_cache_ttl_secs: 60,
            decision_cache_ledger_ttl_secs: 10,
            ready_timeout_secs: 30,
        }
    }
}

/// ExperimentService settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExperimentSettings {
    /// Run the background feed consumer: conversions of event-derived metrics from
    /// IngestService.WatchEvents (at `endpoints.ingest`) and merges and erasures from
    /// ProfileService.WatchChanges (at `endpoints.profiles`).
    pub consumers: bool,
    /// Staleness bound, ms, of the in-process cache of experiment definitions that Assign and
    /// BatchAssign read: a change made by another process is seen by every Assign that starts
    /// this long after it committed (a stopped experiment stops assigning within it); this
    /// process's own writes are seen at once. 0 reads the database on every Assign.
    pub definition_cache_ms: u64,
}

impl Default for ExperimentSettings {
    fn default() -> Self {
        Self {
            consumers: true,
            definition_cache_ms: 1000,
        }
    }
}

/// Customer scoring and segmentation settings (read-only through GetScoringConfig).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SegmentationSettings {
    /// ISO 4217 code every monetary feature and prediction is expressed in.
    pub reporting_currency: String,
    /// Fixed conversion rates into the reporting currency, by ISO 4217 code: an amount of `n`
    /// minor units of that currency counts as `n × rate` reporting minor units. Orders in a
    /// currency without a rate count for recency and frequency but not for spend.
    pub currency_rates: std::collections::BTreeMap<String, f64>,
    /// Orders older than this many days are ignored by RFM and clustering features.
    pub rfm_window_days: u32,
    /// Lifecycle: NEW while the first and only order is younger than this many days.
    pub lifecycle_new_days: f64,
    /// Lifecycle: AT_RISK after this many expected inter-purchase intervals without an order.
    pub lifecycle_at_risk_intervals: f64,
    /// Lifecycle: AT_RISK after this many silent days when the cadence is unknown.
    pub lifecycle_at_risk_days: f64,
    /// Lifecycle: LAPSED after this many days without an order.
    pub lifecycle_lapsed_days: f64,
    /// Lifecycle: CHURNED after this many days without an order.
    pub lifecycle_churned_days: f64,
    /// Lifecycle: CHURNED also when P(alive) is below this (0 disables).
    pub lifecycle_churned_p_alive: f64,
    /// Horizon of predicted CLV and expected purchases, days.
    pub prediction_horizon_days: u32,
    /// Annual discount rate applied to predicted CLV, 0..1.
    pub clv_annual_discount_rate: f64,
    /// Recompute runs whose per-run snapshots (members, scores) are kept.
    pub retained_runs: u32,
    /// The RFM name map: rectangles of the (R score × FM score) grid, first match wins, every
    /// one of the 25 cells covered. Empty means the standard 11-segment map.
    pub rfm_segments: Vec<RfmSegmentSetting>,
}

/// One rectangle of a configured RFM name map (`[[segmentation.rfm_segments]]`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RfmSegmentSetting {
    /// Segment name, 1..=64 bytes (e.g. `"Champions"`; a standard name maps to its
    /// `RfmSegment` value, any other to `RFM_SEGMENT_OTHER`).
    pub name: String,
    /// Inclusive R score range `[min, max]`, both in 1..=5.
    pub recency: [u8; 2],
    /// Inclusive FM score range `[min, max]` (FM = mean of F and M rounded up), both in 1..=5.
    pub frequency_monetary: [u8; 2],
}

impl Default for SegmentationSettings {
    fn default() -> Self {
        Self {
            reporting_currency: "USD".into(),
            currency_rates: std::collections::BTreeMap::new(),
            rfm_window_days: 730,
            lifecycle_new_days: 30.0,
            lifecycle_at_risk_intervals: 2.0,
            lifecycle_at_risk_days: 90.0,
            lifecycle_lapsed_days: 180.0,
            lifecycle_churned_days: 365.0,
            lifecycle_churned_p_alive: 0.0,
            prediction_horizon_days: 365,
            clv_annual_discount_rate: 0.1,
            retained_runs: 10,
            rfm_segments: Vec::new(),
        }
    }
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            grpc_addr: SocketAddr::from(([127, 0, 0, 1], 50051)),
            metrics_addr: SocketAddr::from(([127, 0, 0, 1], 9464)),
            data_dir: PathBuf::from("clientele-data"),
            database_url: None,
            database_max_connections: 10,
            redis_url: None,
            redis_key_prefix: "clientele:".into(),
            cache_ttl_secs: 300,
            cache_timeout_ms: 50,
            cache_capacity: 100_000,
            log_format: LogFormat::Human,
            log_filter: "info".into(),
            tokens: Vec::new(),
            service_token: None,
            endpoints: Endpoints::default(),
            identity: IdentitySettings::default(),
            ingest: IngestSettings::default(),
            holdout: HoldoutSettings::default(),
            segmentation: SegmentationSettings::default(),
            offers: OfferSettings::default(),
            experiments: ExperimentSettings::default(),
            shutdown_grace_secs: 30,
        }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Coloured, one event per line, for terminals.
    Human,
    /// One JSON object per line, for log shippers.
    Json,
}

/// One accepted bearer token.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenConfig {
    /// Who holds the token (shown in logs and metrics instead of the token).
    pub client: String,
    /// The secret token itself. Never logged.
    pub token: String,
    /// Scopes granted, e.g. `profiles:read`, `ingest:write`, `profiles:*` or `*`.
    pub scopes: Vec<String>,
}

impl std::fmt::Debug for TokenConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenConfig")
            .field("client", &self.client)
            .field("token", &"<redacted>")
            .field("scopes", &self.scopes)
            .finish()
    }
}

/// Where each service is reached by the others (`http://host:port`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Endpoints {
    /// ProfileService endpoint.
    pub profiles: Option<String>,
    /// IngestService endpoint.
    pub ingest: Option<String>,
    /// SegmentationService endpoint.
    pub segmentation: Option<String>,
    /// OfferService endpoint.
    pub offers: Option<String>,
    /// ExperimentService endpoint.
    pub experiments: Option<String>,
}

/// Identity resolution settings.
#[derive(Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IdentitySettings {
    /// Secret key of the HMAC-SHA256 that emails, phones and tombstones are stored under.
    /// Changing it makes every stored hash unmatchable. Unset in production is refused;
    /// the embedded default generates one into `data_dir`.
    pub hash_secret: Option<String>,
    /// Over-merge guard: the most profiles one identifier value may link together.
    pub max_profiles_per_identifier: u32,
    /// Region assumed for phone numbers written without `+country` (ISO 3166 alpha-2).
    pub default_phone_region: String,
}

impl std::fmt::Debug for IdentitySettings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentitySettings")
            .field(
                "hash_secret",
                &self.hash_secret.as_ref().map(|_| "<redacted>"),
            )
            .field(
                "max_profiles_per_identifier",
                &self.max_profiles_per_identifier,
            )
            .field("default_phone_region", &self.default_phone_region)
            .finish()
    }
}

impl Default for IdentitySettings {
    fn default() -> Self {
        Self {
            hash_secret: None,
            max_profiles_per_identifier: 5,
            default_phone_region: "US".into(),
        }
    }
}

/// Event ingestion settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct IngestSettings {
    /// Days a (source, event_id) is remembered for deduplication; at least 30.
    pub dedup_window_days: u32,
    /// Seconds an event's `occurred_at` may lie in the future.
    pub max_future_skew_secs: u64,
    /// Days an event's `occurred_at` may lie in the past; 0 means back to 2000-01-01.
    pub max_event_age_days: u32,
    /// Batches (any RPC) processed at once; more wait up to `admission_timeout_ms`, then get
    /// RESOURCE_EXHAUSTED.
    pub max_in_flight_batches: u32,
    /// How long a batch waits for a processing slot, milliseconds.
    pub admission_timeout_ms: u64,
    /// Batches an IngestStream producer may have sent but not seen acknowledged.
    pub stream_max_unacked_batches: u32,
    /// Target interval between IngestStream acknowledgements, milliseconds.
    pub stream_ack_interval_ms: u32,
    /// Most aggregate deltas sent to ProfileService per ApplyAggregates call (1..=1000,
    /// ProfileService's limit). A page holds what the log has after the cursor, up to this:
    /// when the forwarder is caught up that is one commit's deltas; when it is behind, a larger
    /// page folds more deltas per profile row written, which is how it catches up.
    pub forward_batch_size: u32,
    /// Identifiers kept in the identity cache (identifier → profile id, so a set whose
    /// identifiers are all cached on one profile skips BatchResolve); 0 disables it.
    pub identity_cache_entries: u64,
    /// Longest life of an identity cache entry, seconds: the staleness bound in replicas that
    /// do not lead the change feed consumer (the leader applies merges and erasures at once).
    pub identity_cache_ttl_secs: u64,
}

impl Default for IngestSettings {
    fn default() -> Self {
        Self {
            dedup_window_days: 35,
            max_future_skew_secs: 300,
            max_event_age_days: 0,
            max_in_flight_batches: 32,
            admission_timeout_ms: 250,
            // Measured with `make bench` (BENCHMARKS.md): two batches in flight keep both
            // stages busy (one resolving, one committing) and, with prompt acknowledgements,
            // gave about half the acknowledgement p99 of 4 at events/s within the noise.
            stream_max_unacked_batches: 2,
            stream_ack_interval_ms: 5,
            // Measured with `make bench` (BENCHMARKS.md, session 10): with 30,000 customers
            // pages of 500 left the aggregates 1.8-2.5 s behind the stream's last
            // acknowledgement, pages of 1,000 0.2-0.3 s; events/s and the acknowledgement p99
            // did not move beyond the noise, with 3,000 or 30,000 customers.
            forward_batch_size: 1000,
            identity_cache_entries: 200_000,
            identity_cache_ttl_secs: 300,
        }
    }
}

/// Settings could not be read.
#[derive(Debug, thiserror::Error)]
#[error("invalid settings: {0}")]
pub struct SettingsError(#[from] Box<figment::Error>);

impl Settings {
    /// Loads defaults, then `file` (if given, or `CLIENTELE_CONFIG` if set), then the
    /// environment. A named file that does not exist is an error, not a silent default.
    pub fn load(file: Option<&Path>) -> Result<Self, SettingsError> {
        let from_env = std::env::var_os("CLIENTELE_CONFIG").map(PathBuf::from);
        let file = file.map(Path::to_path_buf).or(from_env);
        let mut figment = Figment::from(Serialized::defaults(Settings::default()));
        if let Some(path) = file {
            if !path.exists() {
                return Err(SettingsError(Box::new(figment::Error::from(format!(
                    "settings file {} does not exist",
                    path.display()
                )))));
            }
            figment = figment.merge(Toml::file(path));
        }
        figment = figment.merge(
            Env::prefixed("CLIENTELE_")
                .ignore(&[
                    "CONFIG",
                    "TARGET",
                    "TOKEN",
                    "ENDPOINT",
                    "TEST_DATABASE_URL",
                    "TEST_REDIS_URL",
                ])
                .split("__"),
        );
        figment.extract().map_err(|e| SettingsError(Box::new(e)))
    }

    /// The endpoint for a service: its configured address or this process's own server.
    pub fn endpoint(&self, configured: &Option<String>) -> String {
        configured
            .clone()
            .unwrap_or_else(|| format!("http://{}", self.grpc_addr))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::result_large_err)]
mod tests {
    use super::*;

    #[test]
    fn file_then_environment_override_defaults() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                redis_url = "redis://file"
                cache_ttl_secs = 9
                [identity]
                max_profiles_per_identifier = 3
                [[tokens]]
                client = "crm"
                token = "secret"
                scopes = ["profiles:read"]
                "#,
            )?;
            jail.set_env("CLIENTELE_REDIS_URL", "redis://env");
            jail.set_env("CLIENTELE_IDENTITY__DEFAULT_PHONE_REGION", "KR");
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(s.redis_url.as_deref(), Some("redis://env"));
            assert_eq!(s.cache_ttl_secs, 9);
            assert_eq!(s.identity.max_profiles_per_identifier, 3);
            assert_eq!(s.identity.default_phone_region, "KR");
            assert_eq!(s.tokens[0].scopes, vec!["profiles:read".to_string()]);
            assert_eq!(s.grpc_addr, Settings::default().grpc_addr);
            Ok(())
        });
    }

    #[test]
    fn the_rfm_segment_map_comes_from_the_file_or_the_environment_and_typos_fail() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "c.toml",
                r#"
                [[segmentation.rfm_segments]]
                name = "VIP"
                recency = [4, 5]
                frequency_monetary = [4, 5]
                [[segmentation.rfm_segments]]
                name = "Everyone else"
                recency = [1, 5]
                frequency_monetary = [1, 5]
                "#,
            )?;
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(s.segmentation.rfm_segments.len(), 2);
            assert_eq!(s.segmentation.rfm_segments[0].recency, [4, 5]);
            jail.set_env(
                "CLIENTELE_SEGMENTATION__RFM_SEGMENTS",
                r#"[{name="All",recency=[1,5],frequency_monetary=[1,5]}]"#,
            );
            let s = Settings::load(Some(Path::new("c.toml"))).unwrap();
            assert_eq!(s.segmentation.rfm_segments[0].name, "All");
            jail.clear_env();
            jail.create_file(
                "typo.toml",
                r#"
                [[segmentation.rfm_segments]]
                name = "VIP"
                recency = [4, 5]
                frequency = [4, 5]
                "#,
            )?;
            assert!(Settings::load(Some(Path::new("typo.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn a_named_settings_file_that_is_missing_is_an_error() {
        figment::Jail::expect_with(|_jail| {
            assert!(Settings::load(Some(Path::new("nope.toml"))).is_err());
            Ok(())
        });
    }

    #[test]
    fn debug_output_never_shows_secrets() {
        let t = TokenConfig {
            client: "c".into(),
            token: "hunter2".into(),
            scopes: vec![],
        };
        assert!(!format!("{t:?}").contains("hunter2"));
    }
}
