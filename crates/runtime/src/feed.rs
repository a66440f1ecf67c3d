//! Reading one page of another service's feed (WatchChanges, WatchEvents,
//! WatchMembershipChanges): every consumer reads "up to N messages, or until the feed is
//! quiet for `idle`, or until it ends", then applies the page with its cursor in one
//! transaction. The reading half is here; the applying half is each consumer's own.

use std::time::Duration;

use clientele_proto::v1 as pb;

/// Up to `max` messages from `stream`: stops early when none arrives within `idle` (the feed
/// is caught up) or the stream ends. An error of the stream is returned as it is, and the
/// messages read before it are dropped (the caller re-reads from its stored cursor).
pub async fn read_page<T>(
    stream: &mut tonic::Streaming<T>,
    max: usize,
    idle: Duration,
) -> Result<Vec<T>, tonic::Status> {
    let mut page = Vec::new();
    while page.len() < max {
        let Ok(next) = tokio::time::timeout(idle, stream.message()).await else {
            break;
        };
        let Some(message) = next? else { break };
        page.push(message);
    }
    Ok(page)
}

/// What a consumer that keeps no profile data of its own needs from ProfileService's changes
/// feed: merges (to count a person once) and erasures (to forget them).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum IdentityChange {
    /// `merged` ids now belong to `survivor`.
    Merged {
        /// The surviving profile id.
        survivor: String,
        /// The ids merged into it.
        merged: Vec<String>,
    },
    /// The profile was erased.
    Erased(String),
}

/// The kinds to ask WatchChanges for (`WatchChangesRequest.kinds`) when only
/// [`identity_changes`] are wanted: the stream then carries merges, erasures and progress
/// markers, not one message per aggregate update.
pub const IDENTITY_CHANGE_KINDS: [i32; 2] = [
    pb::ProfileChangeKind::Merged as i32,
    pb::ProfileChangeKind::Erased as i32,
];

/// The WatchChanges request of a consumer that needs only [`identity_changes`]: merges,
/// erasures and progress markers after `after_sequence`, not every aggregate update.
pub fn identity_changes_request(after_sequence: i64) -> pb::WatchChangesRequest {
    pb::WatchChangesRequest {
        after_sequence,
        kinds: IDENTITY_CHANGE_KINDS.to_vec(),
    }
}

/// The merges and erasures of a page of profile changes, in feed order, and the last sequence
/// read (`None` for an empty page; a progress marker's sequence counts).
pub fn identity_changes(page: Vec<pb::ProfileChange>) -> (Vec<IdentityChange>, Option<i64>) {
    let last = page.last().map(|c| c.sequence);
    let changes = page
        .into_iter()
        .filter_map(|c| {
            use pb::ProfileChangeKind as K;
            match K::try_from(c.kind).unwrap_or(K::Unspecified) {
                K::Merged => Some(IdentityChange::Merged {
                    survivor: c.profile_id,
                    merged: c.merged_profile_ids,
                }),
                K::Erased => Some(IdentityChange::Erased(c.profile_id)),
                _ => None,
            }
        })
        .collect();
    (changes, last)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn change(
        sequence: i64,
        kind: pb::ProfileChangeKind,
        id: &str,
        merged: &[&str],
    ) -> pb::ProfileChange {
        pb::ProfileChange {
            sequence,
            profile_id: id.into(),
            kind: kind as i32,
            merged_profile_ids: merged.iter().map(|m| (*m).to_string()).collect(),
            changed_at: None,
        }
    }

    #[test]
    fn identity_changes_keep_merges_and_erasures_in_order_and_the_last_sequence() {
        use pb::ProfileChangeKind as K;
        let (changes, last) = identity_changes(vec![
            change(3, K::Created, "a", &[]),
            change(4, K::Merged, "a", &["b", "c"]),
            change(5, K::Updated, "a", &[]),
            change(6, K::Erased, "a", &[]),
        ]);
        assert_eq!(
            changes,
            vec![
                IdentityChange::Merged {
                    survivor: "a".into(),
                    merged: vec!["b".into(), "c".into()]
                },
                IdentityChange::Erased("a".into()),
            ]
        );
        assert_eq!(last, Some(6));
        assert_eq!(identity_changes(Vec::new()), (Vec::new(), None));
    }
}
