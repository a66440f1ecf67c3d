//! Identity stitching decisions (pure, no I/O): given an identifier set and which profile each
//! identifier already belongs to, decide which profile the set resolves to, which profiles
//! merge into it, and which links the over-merge guard refuses.
//!
//! Rules:
//! - Identifiers already on the same profile form a group. The *anchor* is the group holding
//!   the strongest identifier ([`IdKind::strength_rank`]; ties go to the older profile).
//! - Every other group joins the anchor through its own identifiers (the *bridging*
//!   identifiers). If any bridging identifier has already linked `cap` profiles, that group is
//!   refused: it stays as it is and its identifiers are reported as refused links. Otherwise
//!   the group merges and each bridging identifier's link count grows by one. So a shared
//!   tablet or POS device can fuse at most `cap` customers, while a customer's own email is
//!   never blamed for the devices that join it.
//! - Of the merging profiles the oldest (creation time, then id) survives; the others become
//!   aliases of it.
//! - Identifiers not yet known are attached to the survivor (or to a new profile when no
//!   identifier is known).

use std::collections::BTreeMap;

use crate::identifiers::IdKind;

/// What is known about one request identifier that already exists.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KnownIdentifier {
    /// The (surviving) profile it belongs to.
    pub profile_id: String,
    /// That profile's creation time (µs since the Unix epoch).
    pub profile_created_at: i64,
    /// How many profiles this identifier value has linked so far (1 when it never merged).
    pub links: i64,
}

/// The decision for one identifier set.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct StitchPlan {
    /// The surviving profile, or `None` when a new profile must be created.
    pub survivor: Option<String>,
    /// Profiles to merge into the survivor, each with the index of the identifier that
    /// linked it.
    pub merge: Vec<(String, usize)>,
    /// Indexes of identifiers refused by the over-merge guard.
    pub refused: Vec<usize>,
    /// Indexes of identifiers whose link count grows by one.
    pub bump_links: Vec<usize>,
    /// Indexes of identifiers to attach to the survivor (unknown so far).
    pub attach: Vec<usize>,
}

struct Group {
    created_at: i64,
    indexes: Vec<usize>,
    best_rank: u8,
}

/// Plans the resolution of one set. `kinds[i]` and `known[i]` describe identifier `i`;
/// `cap` is the most profiles one identifier value may link (at least 1).
pub fn plan(kinds: &[IdKind], known: &[Option<KnownIdentifier>], cap: i64) -> StitchPlan {
    let mut groups: BTreeMap<&str, Group> = BTreeMap::new();
    let mut attach = Vec::new();
    for (i, k) in known.iter().enumerate() {
        let rank = kinds.get(i).map_or(u8::MAX, |k| k.strength_rank());
        match k {
            None => attach.push(i),
            Some(k) => {
                let g = groups.entry(k.profile_id.as_str()).or_insert(Group {
                    created_at: k.profile_created_at,
                    indexes: Vec::new(),
                    best_rank: u8::MAX,
                });
                g.indexes.push(i);
                g.best_rank = g.best_rank.min(rank);
            }
        }
    }
    if groups.is_empty() {
        return StitchPlan {
            attach,
            ..StitchPlan::default()
        };
    }
    let anchor = groups
        .iter()
        .min_by(|a, b| {
            (a.1.best_rank, a.1.created_at, a.0).cmp(&(b.1.best_rank, b.1.created_at, b.0))
        })
        .map(|(id, _)| *id)
        .unwrap_or_default();

    let mut plan = StitchPlan {
        attach,
        ..StitchPlan::default()
    };
    let mut accepted: Vec<(&str, i64, usize)> = Vec::new();
    if let Some(g) = groups.get(anchor) {
        accepted.push((anchor, g.created_at, g.indexes[0]));
    }
    for (id, g) in &groups {
        if *id == anchor {
            continue;
        }
        let over_cap = g
            .indexes
            .iter()
            .any(|&i| known[i].as_ref().is_some_and(|k| k.links >= cap.max(1)));
        if over_cap {
            plan.refused.extend(&g.indexes);
        } else {
            plan.bump_links.extend(&g.indexes);
            accepted.push((id, g.created_at, g.indexes[0]));
        }
    }
    accepted.sort_by(|a, b| (a.1, a.0).cmp(&(b.1, b.0)));
    let survivor = accepted[0].0.to_string();
    // The identifier credited with a merge is the loser's own bridging identifier; when the
    // anchor itself is the loser it is the survivor's.
    let survivor_via = accepted[0].2;
    for (id, _, via) in accepted.iter().skip(1) {
        let via = if *id == anchor { survivor_via } else { *via };
        plan.merge.push(((*id).to_string(), via));
    }
    plan.survivor = Some(survivor);
    plan.refused.sort_unstable();
    plan.bump_links.sort_unstable();
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn known(p: &str, created: i64, links: i64) -> Option<KnownIdentifier> {
        Some(KnownIdentifier {
            profile_id: p.into(),
            profile_created_at: created,
            links,
        })
    }

    #[test]
    fn unknown_identifiers_create_a_new_profile() {
        let p = plan(&[IdKind::Email, IdKind::DeviceId], &[None, None], 5);
        assert_eq!(p.survivor, None);
        assert_eq!(p.attach, vec![0, 1]);
        assert!(p.merge.is_empty());
    }

    #[test]
    fn a_new_identifier_attaches_to_the_known_profile() {
        let p = plan(
            &[IdKind::Email, IdKind::DeviceId],
            &[known("a", 1, 1), None],
            5,
        );
        assert_eq!(p.survivor.as_deref(), Some("a"));
        assert_eq!(p.attach, vec![1]);
    }

    #[test]
    fn linking_two_profiles_keeps_the_oldest() {
        let p = plan(
            &[IdKind::Email, IdKind::DeviceId],
            &[known("new", 20, 1), known("old", 10, 1)],
            5,
        );
        assert_eq!(p.survivor.as_deref(), Some("old"));
        // the anchor (email's profile) merges into the older device profile, credited to the
        // device that bridged them
        assert_eq!(p.merge, vec![("new".to_string(), 1)]);
        assert_eq!(p.bump_links, vec![1]);
    }

    #[test]
    fn a_shared_device_at_the_cap_is_refused_and_blamed_not_the_email() {
        let p = plan(
            &[IdKind::Email, IdKind::DeviceId],
            &[known("b", 20, 1), known("a", 10, 3)],
            3,
        );
        assert_eq!(p.survivor.as_deref(), Some("b"));
        assert!(p.merge.is_empty());
        assert_eq!(p.refused, vec![1]);
    }

    #[test]
    fn the_strongest_identifier_picks_the_anchor_even_when_its_profile_is_younger() {
        let p = plan(
            &[IdKind::AnonymousId, IdKind::CustomerId],
            &[known("anon", 1, 9), known("cust", 2, 1)],
            3,
        );
        // the anonymous id is over the cap, so its group is refused
        assert_eq!(p.survivor.as_deref(), Some("cust"));
        assert_eq!(p.refused, vec![0]);
    }

    #[test]
    fn three_profiles_merge_into_the_oldest() {
        let p = plan(
            &[IdKind::CustomerId, IdKind::Email, IdKind::DeviceId],
            &[known("c", 30, 1), known("e", 20, 1), known("d", 10, 1)],
            5,
        );
        assert_eq!(p.survivor.as_deref(), Some("d"));
        let mut merged: Vec<_> = p.merge.iter().map(|m| m.0.as_str()).collect();
        merged.sort_unstable();
        assert_eq!(merged, vec!["c", "e"]);
    }
}
