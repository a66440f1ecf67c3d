//! Versioned read-through cache, in Redis or in process.
//!
//! Entries carry the version of the record they hold. A reader that loaded version `v` from the
//! database may only fill the cache if no newer version (or invalidation) is there, so a slow
//! reader can never put back a copy older than a write that happened meanwhile. Writers call
//! [`VersionedCache::invalidate`] with their new version; erasure invalidates with
//! `i64::MAX`, which no later fill can beat until the entry expires.
//!
//! The cache is an optimisation only: every error or time-out is a miss, logged and counted,
//! never an error for the caller.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_trait::async_trait;

use crate::metrics::METRICS;
use crate::settings::Settings;

/// A cache of versioned byte values.
#[async_trait]
pub trait VersionedCache: Send + Sync + std::fmt::Debug {
    /// The cached value, or `None` on a miss, an invalidation marker, an error or a time-out.
    async fn get(&self, key: &str) -> Option<Vec<u8>>;
    /// Stores `value` at `version` unless the entry already holds a version `>= version`.
    async fn put_if_newer(&self, key: &str, version: i64, value: &[u8]);
    /// Drops the value and blocks fills older than `version` until the entry expires.
    async fn invalidate(&self, key: &str, version: i64);
    /// [`VersionedCache::invalidate`] for each `(key, version)`; Redis does them all in one
    /// script call.
    async fn invalidate_many(&self, entries: &[(String, i64)]) {
        for (key, version) in entries {
            self.invalidate(key, *version).await;
        }
    }
}

fn count(cache: &str, result: &str) {
    METRICS
        .cache_requests
        .with_label_values(&[cache, result])
        .inc();
}

/// Builds the configured cache: Redis when `redis_url` is set, in-process otherwise.
/// `name` labels the metrics and namespaces the keys (`<prefix><name>:<key>`).
pub fn from_settings(settings: &Settings, name: &'static str) -> Arc<dyn VersionedCache> {
    let ttl = Duration::from_secs(settings.cache_ttl_secs.max(1));
    match &settings.redis_url {
        Some(url) => Arc::new(RedisCache::new(
            url,
            format!("{}{name}:", settings.redis_key_prefix),
            ttl,
            Duration::from_millis(settings.cache_timeout_ms.max(1)),
            name,
        )),
        None => Arc::new(MemoryCache::new(settings.cache_capacity, ttl, name)),
    }
}

/// An entry: the record version and its bytes (`None` for an invalidation marker).
type Versioned = (i64, Option<Arc<[u8]>>);

/// In-process cache (moka), for the embedded single-process mode.
#[derive(Debug)]
pub struct MemoryCache {
    inner: moka::future::Cache<String, Versioned>,
    name: &'static str,
}

impl MemoryCache {
    /// A cache of at most `capacity` entries, each living `ttl`.
    pub fn new(capacity: u64, ttl: Duration, name: &'static str) -> Self {
        Self {
            inner: moka::future::Cache::builder()
                .max_capacity(capacity)
                .time_to_live(ttl)
                .build(),
            name,
        }
    }

    /// Same rule as the Redis script: a fill needs an absent or older entry, or a marker of the
    /// same version; an invalidation (`value` = `None`) needs an entry that is not newer.
    async fn set_if_newer(&self, key: &str, version: i64, value: Option<Arc<[u8]>>) {
        self.inner
            .entry(key.to_string())
            .and_compute_with(|cur| {
                let keep = cur.is_some_and(|e| {
                    let (v, data) = e.value();
                    *v > version || (*v == version && data.is_some() && value.is_some())
                });
                let op = if keep {
                    moka::ops::compute::Op::Nop
                } else {
                    moka::ops::compute::Op::Put((version, value))
                };
                std::future::ready(op)
            })
            .await;
    }
}

#[async_trait]
impl VersionedCache for MemoryCache {
    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        match self.inner.get(key).await {
            Some((_, Some(v))) => {
                count(self.name, "hit");
                Some(v.to_vec())
            }
            _ => {
                count(self.name, "miss");
                None
            }
        }
    }

    async fn put_if_newer(&self, key: &str, version: i64, value: &[u8]) {
        self.set_if_newer(key, version, Some(Arc::from(value)))
            .await;
    }

    async fn invalidate(&self, key: &str, version: i64) {
        self.set_if_newer(key, version, None).await;
    }
}

/// A fill (ARGV[4] = 0) lands when the entry is absent, older, or an invalidation marker of the
/// same version; an invalidation (ARGV[4] = 1) replaces anything not newer with a data-less
/// marker.
const PUT_IF_NEWER: &str = r"
local cur = redis.call('HGET', KEYS[1], 'v')
if cur then
  local c, v = tonumber(cur), tonumber(ARGV[1])
  if c > v then return 0 end
  if ARGV[4] == '0' and c == v and redis.call('HEXISTS', KEYS[1], 'd') == 1 then return 0 end
end
if ARGV[4] == '1' then
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[1], 'v', ARGV[1])
else
  redis.call('HSET', KEYS[1], 'v', ARGV[1], 'd', ARGV[2])
end
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// [`PUT_IF_NEWER`]'s invalidation for every key: KEYS are the entries, ARGV[i] the version
/// of KEYS[i], and ARGV[#KEYS + 1] the time to live in milliseconds.
const INVALIDATE_MANY: &str = r"
local ttl = ARGV[#KEYS + 1]
local n = 0
for i, key in ipairs(KEYS) do
  local cur = redis.call('HGET', key, 'v')
  if not cur or tonumber(cur) <= tonumber(ARGV[i]) then
    redis.call('DEL', key)
    redis.call('HSET', key, 'v', ARGV[i])
    redis.call('PEXPIRE', key, ttl)
    n = n + 1
  end
end
return n
";

/// Keys per [`INVALIDATE_MANY`] call.
const INVALIDATE_CHUNK: usize = 256;

/// Redis-backed cache shared by every replica. Connects lazily and reconnects after
/// failures, so the service starts and answers while Redis is down.
pub struct RedisCache {
    client: Option<redis::Client>,
    conn: Mutex<Option<redis::aio::ConnectionManager>>,
    last_attempt: Mutex<Option<Instant>>,
    script: redis::Script,
    invalidate_script: redis::Script,
    prefix: String,
    ttl: Duration,
    timeout: Duration,
    name: &'static str,
}

impl std::fmt::Debug for RedisCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisCache")
            .field("prefix", &self.prefix)
            .field("ttl", &self.ttl)
            .finish()
    }
}

impl RedisCache {
    /// A cache at `url` whose keys all start with `prefix`. Calls taking longer than
    /// `timeout` count as misses.
    pub fn new(
        url: &str,
        prefix: String,
        ttl: Duration,
        timeout: Duration,
        name: &'static str,
    ) -> Self {
        let client = match redis::Client::open(url) {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::error!(error = %e, "invalid redis_url; caching disabled");
                None
            }
        };
        Self {
            client,
            conn: Mutex::new(None),
            last_attempt: Mutex::new(None),
            script: redis::Script::new(PUT_IF_NEWER),
            invalidate_script: redis::Script::new(INVALIDATE_MANY),
            prefix,
            ttl,
            timeout,
            name,
        }
    }

    async fn connection(&self) -> Option<redis::aio::ConnectionManager> {
        if let Ok(c) = self.conn.lock()
            && let Some(c) = c.as_ref()
        {
            return Some(c.clone());
        }
        let client = self.client.clone()?;
        {
            let mut last = self.last_attempt.lock().ok()?;
            if last.is_some_and(|t| t.elapsed() < Duration::from_secs(1)) {
                return None;
            }
            *last = Some(Instant::now());
        }
        let config = redis::aio::ConnectionManagerConfig::new()
            .set_connection_timeout(self.timeout.max(Duration::from_millis(200)))
            .set_response_timeout(self.timeout)
            .set_number_of_retries(1);
        match tokio::time::timeout(
            Duration::from_secs(1),
            redis::aio::ConnectionManager::new_with_config(client, config),
        )
        .await
        {
            Ok(Ok(manager)) => {
                if let Ok(mut c) = self.conn.lock() {
                    *c = Some(manager.clone());
                }
                Some(manager)
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis unavailable; serving from the database");
                None
            }
            Err(_) => {
                tracing::warn!("redis connect timed out; serving from the database");
                None
            }
        }
    }

    async fn put(&self, key: &str, version: i64, value: &[u8], invalidation: bool) {
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let mut inv = self.script.prepare_invoke();
        inv.key(format!("{}{key}", self.prefix))
            .arg(version)
            .arg(value)
            .arg(u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX))
            .arg(if invalidation { "1" } else { "0" });
        let r: Result<Result<i64, _>, _> =
            tokio::time::timeout(self.timeout * 2, inv.invoke_async(&mut conn)).await;
        if !matches!(r, Ok(Ok(_))) {
            tracing::warn!(key, "redis write failed");
        }
    }
}

#[async_trait]
impl VersionedCache for RedisCache {
    async fn get(&self, key: &str) -> Option<Vec<u8>> {
        let Some(mut conn) = self.connection().await else {
            count(self.name, "error");
            return None;
        };
        let cmd = redis::cmd("HGET")
            .arg(format!("{}{key}", self.prefix))
            .arg("d")
            .to_owned();
        let r: Result<Result<Option<Vec<u8>>, _>, _> =
            tokio::time::timeout(self.timeout, cmd.query_async(&mut conn)).await;
        match r {
            Ok(Ok(Some(v))) if !v.is_empty() => {
                count(self.name, "hit");
                Some(v)
            }
            Ok(Ok(_)) => {
                count(self.name, "miss");
                None
            }
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "redis read failed; serving from the database");
                count(self.name, "error");
                None
            }
            Err(_) => {
                tracing::warn!("redis read timed out; serving from the database");
                count(self.name, "error");
                None
            }
        }
    }

    async fn put_if_newer(&self, key: &str, version: i64, value: &[u8]) {
        self.put(key, version, value, false).await;
    }

    async fn invalidate(&self, key: &str, version: i64) {
        self.put(key, version, b"", true).await;
    }

    async fn invalidate_many(&self, entries: &[(String, i64)]) {
        if entries.is_empty() {
            return;
        }
        let Some(mut conn) = self.connection().await else {
            return;
        };
        let ttl = u64::try_from(self.ttl.as_millis()).unwrap_or(u64::MAX);
        for chunk in entries.chunks(INVALIDATE_CHUNK) {
            let mut inv = self.invalidate_script.prepare_invoke();
            for (key, _) in chunk {
                inv.key(format!("{}{key}", self.prefix));
            }
            for (_, version) in chunk {
                inv.arg(*version);
            }
            inv.arg(ttl);
            let r: Result<Result<i64, _>, _> =
                tokio::time::timeout(self.timeout * 2, inv.invoke_async(&mut conn)).await;
            if !matches!(r, Ok(Ok(_))) {
                tracing::warn!(keys = chunk.len(), "redis write failed");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn contract(cache: &dyn VersionedCache, key: &str) {
        assert_eq!(cache.get(key).await, None);
        cache.put_if_newer(key, 2, b"v2").await;
        assert_eq!(cache.get(key).await.as_deref(), Some(&b"v2"[..]));
        cache.put_if_newer(key, 1, b"v1").await;
        assert_eq!(
            cache.get(key).await.as_deref(),
            Some(&b"v2"[..]),
            "older fill ignored"
        );
        cache.invalidate(key, 3).await;
        assert_eq!(cache.get(key).await, None);
        cache.put_if_newer(key, 2, b"v2").await;
        assert_eq!(
            cache.get(key).await,
            None,
            "fill older than the invalidation ignored"
        );
        cache.put_if_newer(key, 3, b"v3").await;
        assert_eq!(
            cache.get(key).await.as_deref(),
            Some(&b"v3"[..]),
            "fill at the invalidated version lands"
        );
        cache.put_if_newer(key, 3, b"other").await;
        assert_eq!(
            cache.get(key).await.as_deref(),
            Some(&b"v3"[..]),
            "same-version fill keeps the first"
        );
        cache.invalidate(key, i64::MAX).await;
        cache.put_if_newer(key, 4, b"v4").await;
        assert_eq!(cache.get(key).await, None, "erased entries never refill");

        // many at once: each as one invalidation
        let (a, b, c) = (format!("{key}-a"), format!("{key}-b"), format!("{key}-c"));
        cache.put_if_newer(&a, 5, b"a5").await;
        cache.put_if_newer(&b, 9, b"b9").await;
        cache
            .invalidate_many(&[(a.clone(), 6), (b.clone(), 7), (c.clone(), 2)])
            .await;
        assert_eq!(cache.get(&a).await, None);
        cache.put_if_newer(&a, 5, b"a5").await;
        assert_eq!(
            cache.get(&a).await,
            None,
            "fill older than the invalidation"
        );
        assert_eq!(
            cache.get(&b).await.as_deref(),
            Some(&b"b9"[..]),
            "a newer entry is kept"
        );
        cache.put_if_newer(&c, 2, b"c2").await;
        assert_eq!(cache.get(&c).await.as_deref(), Some(&b"c2"[..]));
        cache.invalidate_many(&[]).await;
    }

    #[tokio::test]
    async fn memory_cache_refuses_fills_older_than_what_it_holds() {
        let c = MemoryCache::new(100, Duration::from_secs(60), "test");
        contract(&c, "k").await;
    }

    #[tokio::test]
    async fn redis_cache_refuses_fills_older_than_what_it_holds() {
        let url = crate::testing::redis_url();
        let prefix = crate::testing::unique_prefix();
        let c = RedisCache::new(
            &url,
            prefix,
            Duration::from_secs(60),
            Duration::from_millis(500),
            "test",
        );
        contract(&c, "k").await;
    }

    #[tokio::test]
    async fn redis_down_is_a_miss_not_an_error() {
        let c = RedisCache::new(
            "redis://127.0.0.1:1",
            "x:".into(),
            Duration::from_secs(60),
            Duration::from_millis(50),
            "test",
        );
        c.put_if_newer("k", 1, b"v").await;
        assert_eq!(c.get("k").await, None);
    }
}
