//! Wakes this process's `WatchChanges` streams when it writes to the changes feed, by kind.
//!
//! A stream that asked for some kinds only (ingest's identity followers want merges and
//! erasures) is woken only by writes that may contain one of them, not by every aggregates
//! fold, which writes hundreds of UPDATED rows a second under an ingest stream and would
//! otherwise cost each such stream a feed read and a progress marker per fold. Writes by other
//! replicas are not signalled here; streams still poll (see `watch_changes`).

use clientele_proto::v1 as pb;
use tokio::sync::watch;

/// A set of `ProfileChangeKind`s as a bit mask (bit n = kind number n).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindSet(u8);

impl KindSet {
    /// Every kind: what a writer that does not know which kinds it wrote signals, and what a
    /// stream without a kinds filter waits for.
    pub const ALL: KindSet = KindSet(u8::MAX);

    /// The kinds of a stream's filter (empty = every kind). Numbers outside the enum's range
    /// are rejected by the caller; here they make the set [`KindSet::ALL`], which only wakes
    /// more often.
    pub fn of_filter(kinds: &[i64]) -> KindSet {
        if kinds.is_empty() {
            return KindSet::ALL;
        }
        kinds
            .iter()
            .fold(KindSet(0), |set, &k| match u32::try_from(k) {
                Ok(k) if k < 8 => KindSet(set.0 | (1 << k)),
                _ => KindSet::ALL,
            })
    }

    /// The set holding `kinds`.
    pub fn of(kinds: &[pb::ProfileChangeKind]) -> KindSet {
        kinds
            .iter()
            .fold(KindSet(0), |set, &k| KindSet(set.0 | (1 << (k as u8))))
    }

    /// Whether the two sets share a kind.
    pub fn meets(self, other: KindSet) -> bool {
        self.0 & other.0 != 0
    }
}

/// Per-kind counts of this process's writes to the changes feed; streams wait for the counts
/// of their kinds to move.
#[derive(Debug)]
pub struct ChangeSignal {
    writes: watch::Sender<[u64; 8]>,
}

impl Default for ChangeSignal {
    fn default() -> Self {
        Self {
            writes: watch::Sender::new([0; 8]),
        }
    }
}

impl ChangeSignal {
    /// Records a committed write whose changes-feed rows have kinds within `kinds`, waking the
    /// streams that asked for any of them.
    pub fn wrote(&self, kinds: KindSet) {
        self.writes.send_modify(|counts| {
            for (bit, count) in counts.iter_mut().enumerate() {
                if kinds.0 & (1 << bit) != 0 {
                    *count = count.wrapping_add(1);
                }
            }
        });
    }

    /// A waiter for writes of `kinds`, counting from now.
    pub fn waiter(&self, kinds: KindSet) -> ChangeWaiter {
        let mut rx = self.writes.subscribe();
        let seen = *rx.borrow_and_update();
        ChangeWaiter { rx, kinds, seen }
    }
}

/// Waits for writes of some kinds (see [`ChangeSignal::waiter`]).
#[derive(Debug)]
pub struct ChangeWaiter {
    rx: watch::Receiver<[u64; 8]>,
    kinds: KindSet,
    seen: [u64; 8],
}

impl ChangeWaiter {
    /// Forgets the writes so far: call it before reading the feed, so that a write committed
    /// during the read still wakes the next [`ChangeWaiter::written`].
    pub fn mark_read(&mut self) {
        self.seen = *self.rx.borrow_and_update();
    }

    /// Returns once a write of one of the waiter's kinds was signalled since the last
    /// [`ChangeWaiter::mark_read`] (at once if one already was). Pending forever if the
    /// signal is gone.
    pub async fn written(&mut self) {
        loop {
            let now = *self.rx.borrow_and_update();
            let moved =
                (0..8).any(|bit| self.kinds.0 & (1 << bit) != 0 && now[bit] != self.seen[bit]);
            if moved {
                return;
            }
            if self.rx.changed().await.is_err() {
                std::future::pending::<()>().await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    async fn wakes(w: &mut ChangeWaiter) -> bool {
        tokio::time::timeout(Duration::from_millis(50), w.written())
            .await
            .is_ok()
    }

    #[tokio::test]
    async fn a_stream_for_merges_sleeps_through_aggregate_updates() {
        let signal = ChangeSignal::default();
        let kinds = KindSet::of_filter(&[
            pb::ProfileChangeKind::Merged as i64,
            pb::ProfileChangeKind::Erased as i64,
        ]);
        let mut w = signal.waiter(kinds);
        w.mark_read();
        signal.wrote(KindSet::of(&[pb::ProfileChangeKind::Updated]));
        assert!(!wakes(&mut w).await);
        signal.wrote(KindSet::of(&[
            pb::ProfileChangeKind::Updated,
            pb::ProfileChangeKind::Merged,
        ]));
        assert!(wakes(&mut w).await);
    }

    #[tokio::test]
    async fn a_write_during_the_read_is_not_missed() {
        let signal = ChangeSignal::default();
        let mut w = signal.waiter(KindSet::ALL);
        w.mark_read();
        // committed while the stream reads the feed, before it waits
        signal.wrote(KindSet::of(&[pb::ProfileChangeKind::Updated]));
        assert!(wakes(&mut w).await);
        // and once read, it no longer wakes
        w.mark_read();
        assert!(!wakes(&mut w).await);
    }

    #[tokio::test]
    async fn an_unfiltered_stream_and_an_unknown_write_wake_each_other() {
        let signal = ChangeSignal::default();
        let mut all = signal.waiter(KindSet::of_filter(&[]));
        let mut erasures = signal.waiter(KindSet::of_filter(&[4]));
        all.mark_read();
        erasures.mark_read();
        signal.wrote(KindSet::ALL);
        assert!(wakes(&mut all).await);
        assert!(wakes(&mut erasures).await);
    }
}
