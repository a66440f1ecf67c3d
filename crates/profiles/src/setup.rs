//! Builds the ProfileService from settings: opens and migrates its database, loads the
//! identity hashing secret and picks the cache.

use std::path::Path;
use std::sync::Arc;

use clientele_runtime::Settings;
use clientele_runtime::db::{self, DatabaseTarget};

use crate::identifiers::IdentifierHasher;
use crate::{POSTGRES_MIGRATIONS, ProfileServiceImpl, SQLITE_MIGRATIONS, SqlProfileStore};

/// Why the service could not start.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// Database connection or migration failed.
    #[error(transparent)]
    Db(#[from] db::DbError),
    /// The hashing secret is missing or unusable.
    #[error("identity: {0}")]
    Secret(String),
}

/// Reads `identity.hash_secret`; on embedded SQLite without one, reads or creates a random
/// secret in `<data_dir>/identity-secret` (so a laptop install works with no settings). On
/// PostgreSQL a missing secret is an error: losing it makes every stored hash unmatchable.
pub fn hash_secret(settings: &Settings, target: &DatabaseTarget) -> Result<Vec<u8>, SetupError> {
    if let Some(s) = &settings.identity.hash_secret {
        if s.len() < 16 {
            return Err(SetupError::Secret(
                "identity.hash_secret must be at least 16 bytes".into(),
            ));
        }
        return Ok(s.as_bytes().to_vec());
    }
    match target {
        DatabaseTarget::Postgres { .. } => Err(SetupError::Secret(
            "identity.hash_secret (CLIENTELE_IDENTITY__HASH_SECRET) must be set with PostgreSQL"
                .into(),
        )),
        DatabaseTarget::Sqlite { .. } => {
            read_or_create_secret(&settings.data_dir.join("identity-secret"))
        }
    }
}

fn read_or_create_secret(path: &Path) -> Result<Vec<u8>, SetupError> {
    let err = |e: std::io::Error| SetupError::Secret(format!("{}: {e}", path.display()));
    if let Ok(s) = std::fs::read_to_string(path) {
        return Ok(s.trim().as_bytes().to_vec());
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).map_err(err)?;
    }
    let secret = format!(
        "{}{}",
        uuid::Uuid::new_v4().simple(),
        uuid::Uuid::new_v4().simple()
    );
    std::fs::write(path, &secret).map_err(err)?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(err)?;
    }
    Ok(secret.into_bytes())
}

/// Opens the service's database at `target` and builds the service.
pub async fn build(
    settings: &Settings,
    target: &DatabaseTarget,
) -> Result<ProfileServiceImpl, SetupError> {
    let secret = hash_secret(settings, target)?;
    let hasher = IdentifierHasher::new(&secret, &settings.identity.default_phone_region)
        .map_err(|e| SetupError::Secret(e.to_string()))?;
    let database = db::open(
        target,
        settings.database_max_connections,
        &POSTGRES_MIGRATIONS,
        &SQLITE_MIGRATIONS,
        "profiles",
    )
    .await?;
    let store = SqlProfileStore::new(
        database,
        hasher.clone(),
        settings.identity.max_profiles_per_identifier,
    );
    // On PostgreSQL the batch calls (BatchResolve, ApplyAggregates) run as server-side
    // functions over a small native pool.
    let store = match target {
        DatabaseTarget::Postgres { url, schema } => store
            .with_native_pool(url, schema, settings.database_max_connections.clamp(1, 8))
            .await
            .map_err(|e| SetupError::Db(db::DbError::Sqlx(store_sqlx(e))))?,
        DatabaseTarget::Sqlite { .. } => store,
    };
    let cache = clientele_runtime::cache::from_settings(settings, "profiles");
    Ok(ProfileServiceImpl::new(Arc::new(store), hasher, cache))
}

/// The database error inside a store error (opening the native pool fails only in the
/// database).
fn store_sqlx(e: crate::store::StoreError) -> sqlx::Error {
    match e {
        crate::store::StoreError::Db(e) => e,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}
