//! The identity cache: identifiers ProfileService has linked to a live profile, so a batch's
//! returning customers skip `BatchResolve` (pure data structure, no I/O).
//!
//! # Contract
//! - Keyed by each identifier *as the event carries it*: (type, namespace, raw value).
//!   ProfileService normalises and hashes; another raw spelling of the same email is simply a
//!   miss. The key is a SHA-256 of those three fields, so the cache holds no raw emails or
//!   phone numbers and every entry has the same size (bounded memory).
//! - A set is a **hit** only when every identifier of it is cached and all of them lead to
//!   the same profile (after following merges, below). That is exactly the case where
//!   BatchResolve is a pure read answering that profile: all identifiers in one group, nothing
//!   to merge, nothing to attach, nothing refused. Anything else (an unknown identifier,
//!   identifiers on different profiles, an empty set) is a **miss** and goes to BatchResolve.
//! - **Fill**: after BatchResolve, a set answered with a live profile (not erased, non-empty
//!   id) caches each of its identifiers except those in `refused_links` (the over-merge guard
//!   left them on another profile; they must never map to this one). Every other identifier of
//!   the set is on the answered profile: it was in the anchor group, in a merged group, or
//!   attached (see `crates/profiles/src/stitching.rs`).
//! - **Merges** (ProfileService's `WatchChanges`, applied by [`crate::erasure`], and the
//!   `merged_profile_ids` of this replica's own BatchResolve answers): the cache keeps an
//!   alias map `merged-away id → survivor` consulted at look-up, so entries filled before the
//!   merge answer the survivor without a scan of the entries (chosen over evicting the
//!   loser's entries, which would need a reverse index, and turn the person's next sets into
//!   misses). Chains (a → b, then b → c) are followed. The alias map is bounded like the
//!   entries: beyond the limit everything is dropped (a cleared cache is always correct, only
//!   slower).
//! - **Erasures** drop the whole cache. Erasures are rare, a scan for the erased profile's
//!   entries (and those of every id merged into it) would need a reverse index, and dropping
//!   everything is trivially complete.
//! - A fill races with an erasure (BatchResolve answered before the erasure, the fill lands
//!   after the cache was cleared): every clear bumps a generation, a fill carries the
//!   generation read *before* its BatchResolve and is discarded when it changed. Entries
//!   record their generation and only the current one's are hits, so a clear is exact
//!   whatever moka's clock says (`invalidate_all` only frees the memory).
//! - Entries also expire after a time to live: only the replica leading the ingest background
//!   jobs follows the change feed, so in the other replicas the TTL is what bounds staleness.
//!
//! # Why a stale hit is safe
//! A stale hit is the situation that already exists between BatchResolve's reply and the
//! batch's commit (a merge or an erasure landing in between), only for longer (at most the
//! feed lag in the leading replica, at most the TTL in the others):
//! - **Merged** profile: the event is stored under the merged-away id. ListProfileEvents
//!   reads the survivor's id and every id merged into it (from ProfileService's
//!   `merged_profile_ids`), so it is on the survivor's timeline; its aggregate delta is sent to
//!   ApplyAggregates under the merged-away id and ProfileService applies it to the merge head
//!   (the survivor); the feed consumers of other services map the id through their own
//!   alias tables. Identifiers never move between live profiles except by a merge (there is
//!   no unlink), so a stale entry can only name a merged-away profile of the same person,
//!   never another live person.
//! - **Erased** profile: its identifiers are tombstoned, so BatchResolve would answer
//!   `erased` and the event would be SUPPRESSED. With a stale hit the event goes to the store
//!   under the erased id: if the erasure consumer has already applied the erasure the store's
//!   `erased_profiles` check does not store it; otherwise it is stored and then deleted by the
//!   consumer (which deletes the erased id's and its merged ids' events); its aggregate delta,
//!   if forwarded before that, is ignored by ApplyAggregates (deltas for erased profiles are).
//!   Nothing of an erased person is kept and no live person gets the event (services
//!   following WatchEvents may see it first, exactly as an event committed just before an
//!   erasure today). What changes is the reported status: during the feed lag an event for a
//!   cached identifier of an erased person is reported ACCEPTED (and not kept) instead of
//!   SUPPRESSED.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use clientele_proto::v1 as pb;
use sha2::{Digest, Sha256};

/// Longest merge chain followed at look-up; longer chains count as a miss.
const MAX_ALIAS_HOPS: usize = 32;

/// The cache key of one identifier: SHA-256 of its type, namespace and raw value.
type Key = [u8; 32];

/// A snapshot of the cache's generation, taken before a BatchResolve and handed back with the
/// fill so that a fill racing with a clear is discarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Generation(u64);

/// Bounded map from identifiers (as events carry them) to the profile ProfileService linked
/// them to. Cheap to share: clone the `Arc` it lives in.
pub struct IdentityCache {
    /// `None` when disabled (0 entries).
    entries: Option<moka::sync::Cache<Key, Entry>>,
    /// Most aliases kept before everything is dropped.
    max_aliases: usize,
    state: Mutex<State>,
}

/// A cached profile id, valid only while the cache is at the generation it was filled in
/// (a clear bumps the generation, so it never depends on the timing of moka's
/// `invalidate_all`).
#[derive(Debug, Clone)]
struct Entry {
    generation: u64,
    profile: Arc<str>,
}

#[derive(Debug, Default)]
struct State {
    generation: u64,
    /// Merged-away profile id → the id it was merged into.
    aliases: HashMap<Arc<str>, Arc<str>>,
}

impl std::fmt::Debug for IdentityCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IdentityCache")
            .field("enabled", &self.entries.is_some())
            .field("entries", &self.entry_count())
            .finish_non_exhaustive()
    }
}

fn key(id: &pb::Identifier) -> Key {
    let mut h = Sha256::new();
    h.update(id.r#type.to_le_bytes());
    h.update((id.namespace.len() as u64).to_le_bytes());
    h.update(id.namespace.as_bytes());
    h.update(id.value.as_bytes());
    h.finalize().into()
}

impl IdentityCache {
    /// A cache of at most `max_entries` identifiers (0 disables it: every set is a miss and
    /// nothing is stored), each kept at most `ttl`.
    pub fn new(max_entries: u64, ttl: Duration) -> Self {
        let entries = (max_entries > 0).then(|| {
            moka::sync::Cache::builder()
                .max_capacity(max_entries)
                .time_to_live(ttl)
                .build()
        });
        Self {
            entries,
            max_aliases: usize::try_from(max_entries).unwrap_or(usize::MAX),
            state: Mutex::new(State::default()),
        }
    }

    /// A disabled cache.
    pub fn disabled() -> Self {
        Self::new(0, Duration::ZERO)
    }

    /// Whether the cache stores anything.
    pub fn enabled(&self) -> bool {
        self.entries.is_some()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // The state stays consistent under a panic elsewhere (plain map and counter writes).
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The current generation; read it before the BatchResolve whose reply is then given to
    /// [`Self::fill`].
    pub fn generation(&self) -> Generation {
        Generation(self.state().generation)
    }

    /// For each set, the profile id it resolves to when it is a hit (every identifier cached,
    /// all leading to one profile after following merges), else `None`.
    pub fn lookup<'a>(
        &self,
        sets: impl IntoIterator<Item = &'a pb::IdentifierSet>,
    ) -> Vec<Option<String>> {
        let Some(entries) = &self.entries else {
            return sets.into_iter().map(|_| None).collect();
        };
        // A batch carries each returning customer's identifiers several times (a session's
        // events): each distinct identifier is hashed and looked up once per call.
        let mut seen: HashMap<(i32, &str, &str), Option<Entry>> = HashMap::new();
        let raw: Vec<Option<Vec<Entry>>> = sets
            .into_iter()
            .map(|set| {
                if set.identifiers.is_empty() {
                    return None;
                }
                set.identifiers
                    .iter()
                    .map(|id| {
                        seen.entry((id.r#type, id.namespace.as_str(), id.value.as_str()))
                            .or_insert_with(|| entries.get(&key(id)))
                            .clone()
                    })
                    .collect::<Option<Vec<_>>>()
            })
            .collect();
        let state = self.state();
        raw.into_iter()
            .map(|ids| {
                let mut heads = ids?.into_iter().map(|e| {
                    (e.generation == state.generation)
                        .then(|| follow(&state.aliases, e.profile))
                        .flatten()
                });
                let first = heads.next()??;
                for h in heads {
                    if h? != first {
                        return None;
                    }
                }
                Some(first.to_string())
            })
            .collect()
    }

    /// Caches what BatchResolve answered for `set`: each identifier not refused by the
    /// over-merge guard maps to `answer.profile_id`, and the profiles the call merged
    /// (`merged_profile_ids`) resolve to it from now on. Nothing is cached for an erased or
    /// empty answer, nor when the cache was cleared since `generation` was read.
    pub fn fill(
        &self,
        generation: Generation,
        set: &pb::IdentifierSet,
        answer: &pb::ResolveResponse,
    ) {
        self.fill_many(generation, std::iter::once((set, answer)));
    }

    /// [`Self::fill`] for many sets under one lock.
    pub fn fill_many<'a>(
        &self,
        generation: Generation,
        answers: impl IntoIterator<Item = (&'a pb::IdentifierSet, &'a pb::ResolveResponse)>,
    ) {
        let Some(entries) = &self.entries else {
            return;
        };
        let mut state = self.state();
        if state.generation != generation.0 {
            return;
        }
        for (set, answer) in answers {
            if answer.erased || answer.profile_id.is_empty() {
                continue;
            }
            let profile: Arc<str> = Arc::from(answer.profile_id.as_str());
            // The merges this call made are committed: entries of the merged-away profiles
            // (identifiers not in this set) answer the survivor without waiting for the feed.
            for m in answer.merged_profile_ids.iter().filter(|m| **m != *profile) {
                state.aliases.insert(Arc::from(m.as_str()), profile.clone());
            }
            let entry = Entry {
                generation: state.generation,
                profile,
            };
            for (i, id) in set.identifiers.iter().enumerate() {
                let refused = answer
                    .refused_links
                    .iter()
                    .any(|r| usize::try_from(r.identifier_index).ok() == Some(i));
                if !refused {
                    entries.insert(key(id), entry.clone());
                }
            }
        }
        if state.aliases.len() > self.max_aliases {
            self.clear_locked(&mut state);
        }
    }

    /// Records merges from ProfileService's change feed: each id of `merged` (other than
    /// `survivor`) now resolves to `survivor`.
    pub fn merged(&self, survivor: &str, merged: &[String]) {
        if self.entries.is_none() {
            return;
        }
        let mut state = self.state();
        let survivor: Arc<str> = Arc::from(survivor);
        for m in merged.iter().filter(|m| **m != *survivor) {
            state
                .aliases
                .insert(Arc::from(m.as_str()), survivor.clone());
        }
        if state.aliases.len() > self.max_aliases {
            self.clear_locked(&mut state);
        }
    }

    /// Records an erasure from ProfileService's change feed: drops every entry (see the
    /// module docs for why not only the erased profile's).
    pub fn erased(&self, _profile_id: &str) {
        if self.entries.is_none() {
            return;
        }
        let mut state = self.state();
        self.clear_locked(&mut state);
    }

    fn clear_locked(&self, state: &mut State) {
        state.generation += 1;
        state.aliases.clear();
        if let Some(entries) = &self.entries {
            entries.invalidate_all();
        }
    }

    /// Cached identifiers (approximate: moka counts lazily).
    pub fn entry_count(&self) -> u64 {
        self.entries.as_ref().map_or(0, |e| {
            e.run_pending_tasks();
            e.entry_count()
        })
    }
}

/// The merge head of `id` (itself when never merged); `None` for a chain longer than
/// [`MAX_ALIAS_HOPS`] (not expected: merges are acyclic).
fn follow(aliases: &HashMap<Arc<str>, Arc<str>>, mut id: Arc<str>) -> Option<Arc<str>> {
    for _ in 0..MAX_ALIAS_HOPS {
        match aliases.get(&id) {
            Some(next) => id = next.clone(),
            None => return Some(id),
        }
    }
    None
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn email(v: &str) -> pb::Identifier {
        pb::Identifier {
            r#type: pb::IdentifierType::Email as i32,
            value: v.into(),
            namespace: String::new(),
        }
    }

    fn device(v: &str) -> pb::Identifier {
        pb::Identifier {
            r#type: pb::IdentifierType::DeviceId as i32,
            value: v.into(),
            namespace: String::new(),
        }
    }

    fn set(ids: &[pb::Identifier]) -> pb::IdentifierSet {
        pb::IdentifierSet {
            identifiers: ids.to_vec(),
        }
    }

    fn answer(profile: &str) -> pb::ResolveResponse {
        pb::ResolveResponse {
            profile_id: profile.into(),
            ..Default::default()
        }
    }

    fn cache() -> IdentityCache {
        IdentityCache::new(1_000, Duration::from_secs(3_600))
    }

    fn one(c: &IdentityCache, s: &pb::IdentifierSet) -> Option<String> {
        c.lookup([s]).pop().unwrap()
    }

    #[test]
    fn a_set_whose_identifiers_all_map_to_one_profile_is_a_hit() {
        let c = cache();
        let s = set(&[email("a@x.com"), device("d1")]);
        c.fill(c.generation(), &s, &answer("p1"));
        assert_eq!(one(&c, &s).as_deref(), Some("p1"));
        // A subset is a hit too: every identifier in it is known on p1.
        assert_eq!(one(&c, &set(&[device("d1")])).as_deref(), Some("p1"));
    }

    #[test]
    fn one_call_answers_each_set_when_sets_repeat_identifiers() {
        let c = cache();
        let g = c.generation();
        c.fill(g, &set(&[email("a@x.com"), device("d1")]), &answer("p1"));
        c.fill(g, &set(&[email("b@x.com")]), &answer("p2"));
        let sets = [
            set(&[email("a@x.com"), device("d1")]),
            set(&[device("d1")]),
            set(&[email("b@x.com")]),
            set(&[device("d1"), email("b@x.com")]),
            set(&[email("a@x.com"), device("unknown")]),
            set(&[email("a@x.com")]),
        ];
        let answers = c.lookup(&sets);
        assert_eq!(
            answers,
            vec![
                Some("p1".to_string()),
                Some("p1".to_string()),
                Some("p2".to_string()),
                None,
                None,
                Some("p1".to_string()),
            ]
        );
        // The same answers as one call per set.
        let one_by_one: Vec<_> = sets.iter().map(|s| one(&c, s)).collect();
        assert_eq!(answers, one_by_one);
    }

    #[test]
    fn a_set_with_an_unknown_identifier_is_a_miss() {
        let c = cache();
        c.fill(c.generation(), &set(&[email("a@x.com")]), &answer("p1"));
        assert_eq!(one(&c, &set(&[email("a@x.com"), device("new")])), None);
        assert_eq!(
            one(&c, &set(&[email("A@x.com")])),
            None,
            "another raw spelling"
        );
        assert_eq!(one(&c, &set(&[])), None, "an empty set");
    }

    #[test]
    fn a_set_whose_identifiers_map_to_different_profiles_is_a_miss() {
        let c = cache();
        let g = c.generation();
        c.fill(g, &set(&[email("a@x.com")]), &answer("p1"));
        c.fill(g, &set(&[email("b@x.com")]), &answer("p2"));
        assert_eq!(one(&c, &set(&[email("a@x.com"), email("b@x.com")])), None);
    }

    #[test]
    fn identifiers_of_the_same_type_and_value_in_another_namespace_are_distinct() {
        let c = cache();
        let custom = |ns: &str| pb::Identifier {
            r#type: pb::IdentifierType::Custom as i32,
            value: "42".into(),
            namespace: ns.into(),
        };
        c.fill(c.generation(), &set(&[custom("pos.card")]), &answer("p1"));
        assert_eq!(one(&c, &set(&[custom("pos.card")])).as_deref(), Some("p1"));
        assert_eq!(one(&c, &set(&[custom("web.card")])), None);
    }

    #[test]
    fn identifiers_refused_by_the_over_merge_guard_are_not_cached() {
        let c = cache();
        let s = set(&[email("a@x.com"), device("shared-tablet")]);
        let a = pb::ResolveResponse {
            profile_id: "p1".into(),
            refused_links: vec![pb::RefusedLink {
                identifier_index: 1,
                reason: pb::LinkRefusal::OverMergeCap as i32,
            }],
            ..Default::default()
        };
        c.fill(c.generation(), &s, &a);
        assert_eq!(one(&c, &set(&[device("shared-tablet")])), None);
        assert_eq!(one(&c, &s), None, "the tablet is on another profile");
        assert_eq!(one(&c, &set(&[email("a@x.com")])).as_deref(), Some("p1"));
    }

    #[test]
    fn erased_or_empty_answers_are_not_cached() {
        let c = cache();
        let g = c.generation();
        let s = set(&[email("a@x.com")]);
        c.fill(
            g,
            &s,
            &pb::ResolveResponse {
                erased: true,
                ..Default::default()
            },
        );
        c.fill(g, &s, &answer(""));
        assert_eq!(one(&c, &s), None);
    }

    #[test]
    fn a_merge_redirects_entries_of_the_merged_away_profile_to_the_survivor() {
        let c = cache();
        let g = c.generation();
        c.fill(g, &set(&[email("a@x.com")]), &answer("loser"));
        c.fill(g, &set(&[email("b@x.com")]), &answer("survivor"));
        c.merged("survivor", &["loser".into(), "survivor".into()]);
        assert_eq!(
            one(&c, &set(&[email("a@x.com")])).as_deref(),
            Some("survivor")
        );
        // Both identifiers are on the survivor now: one set holding both is a hit.
        assert_eq!(
            one(&c, &set(&[email("a@x.com"), email("b@x.com")])).as_deref(),
            Some("survivor")
        );
        // Chains are followed.
        c.merged("head", &["survivor".into()]);
        assert_eq!(one(&c, &set(&[email("a@x.com")])).as_deref(), Some("head"));
    }

    #[test]
    fn merges_made_by_a_resolve_redirect_the_merged_away_profiles_entries() {
        let c = cache();
        let g = c.generation();
        c.fill(g, &set(&[device("phone")]), &answer("loser"));
        c.fill(g, &set(&[email("a@x.com")]), &answer("survivor"));
        let merging = pb::ResolveResponse {
            profile_id: "survivor".into(),
            merged_profile_ids: vec!["loser".into()],
            ..Default::default()
        };
        c.fill(g, &set(&[email("a@x.com"), device("tablet")]), &merging);
        assert_eq!(
            one(&c, &set(&[device("phone"), email("a@x.com")])).as_deref(),
            Some("survivor")
        );
    }

    #[test]
    fn an_erasure_evicts_the_erased_profile() {
        let c = cache();
        let before = c.generation();
        c.fill(before, &set(&[email("a@x.com")]), &answer("p1"));
        c.erased("p1");
        assert_eq!(one(&c, &set(&[email("a@x.com")])), None);
        // A BatchResolve answered before the erasure must not refill the cache after it.
        c.fill(before, &set(&[email("a@x.com")]), &answer("p1"));
        assert_eq!(one(&c, &set(&[email("a@x.com")])), None);
        c.fill(c.generation(), &set(&[email("b@x.com")]), &answer("p2"));
        assert_eq!(one(&c, &set(&[email("b@x.com")])).as_deref(), Some("p2"));
    }

    #[test]
    fn the_cache_stays_within_its_size() {
        let c = IdentityCache::new(100, Duration::from_secs(3_600));
        let g = c.generation();
        for i in 0..1_000 {
            c.fill(g, &set(&[email(&format!("{i}@x.com"))]), &answer("p"));
        }
        assert!(c.entry_count() <= 100, "{} entries", c.entry_count());
    }

    #[test]
    fn too_many_aliases_drop_everything() {
        let c = IdentityCache::new(2, Duration::from_secs(3_600));
        c.fill(c.generation(), &set(&[email("a@x.com")]), &answer("p1"));
        let g = c.generation();
        c.merged("s", &["l1".into(), "l2".into(), "l3".into()]);
        assert_eq!(one(&c, &set(&[email("a@x.com")])), None);
        assert_ne!(c.generation(), g);
    }

    #[test]
    fn a_disabled_cache_never_hits() {
        let c = IdentityCache::disabled();
        let s = set(&[email("a@x.com")]);
        c.fill(c.generation(), &s, &answer("p1"));
        assert!(!c.enabled());
        assert_eq!(one(&c, &s), None);
    }
}
