//! The store conformance suite: every test runs against PostgreSQL and against SQLite, so the
//! embedded default behaves exactly like production. The concurrency tests (overdraft, budget,
//! idempotency under contention) run on PostgreSQL, where writers really run in parallel.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod support;

use chrono::{Duration, Utc};
use clientele_offers::ledger::{LedgerCommand, LedgerError};
use clientele_offers::store::{
    EntryMeta, IssueRefusal, NewIssue, OfferRecord, OfferStore, RedeemCode, StoreError,
};
use clientele_proto::v1 as pb;
use clientele_runtime::time::{now_micros, timestamp};
use support::{CONTENTION, Engine, offer, profile_id, store, store_with_pool, with_budget};

fn record(o: pb::Offer) -> OfferRecord {
    let now = now_micros();
    OfferRecord {
        offer: o,
        status: pb::OfferStatus::Active as i32,
        version: 1,
        issued: 0,
        redeemed: 0,
        cost_booked: 0,
        created_at: now,
        updated_at: now,
    }
}

fn accrue(points: i64) -> LedgerCommand {
    LedgerCommand::Accrue {
        points,
        expires_at: None,
        order: None,
    }
}

fn redeem(points: i64) -> LedgerCommand {
    LedgerCommand::Redeem {
        points,
        reference: "reward".into(),
    }
}

fn new_issue(profile: &str, offer_id: &str, key: &str, cap: Option<i64>) -> NewIssue {
    let now = now_micros();
    NewIssue {
        issued: pb::IssuedOffer {
            issue_id: uuid::Uuid::now_v7().to_string(),
            code: clientele_offers::service::new_code(),
            offer_id: offer_id.into(),
            offer_version: 1,
            profile_id: profile.into(),
            status: pb::IssuedOfferStatus::Issued as i32,
            source: pb::IssueSource::Direct as i32,
            issued_at: Some(timestamp(now)),
            valid_until: Some(timestamp(now + 86_400_000_000)),
            ..Default::default()
        },
        idem_key: format!("issue:{key}"),
        fingerprint: format!("{profile}|{offer_id}"),
        per_profile_cap: cap,
        frequency_cap: None,
    }
}

async fn apply(
    s: &dyn OfferStore,
    profile: &str,
    key: &str,
    cmd: LedgerCommand,
) -> Result<clientele_offers::store::LedgerOutcome, StoreError> {
    s.apply_ledger(profile, key, cmd, Utc::now(), EntryMeta::default(), None)
        .await
}

async fn ledger_accrues_redeems_and_keeps_the_balance(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    let out = apply(&*f.store, &p, "a1", accrue(100)).await.unwrap();
    assert_eq!(out.available, 100);
    assert!(!out.replayed);
    let out = apply(&*f.store, &p, "r1", redeem(30)).await.unwrap();
    assert_eq!(out.available, 70);
    assert_eq!(out.entries[0].points, -30);
    assert_eq!(out.entries[0].balance_after, 70);
    let (ledger, stored) = f.store.ledger(&p).await.unwrap();
    assert_eq!(ledger.balance(Utc::now()), 70);
    assert_eq!(stored.len(), 2);
}

async fn replayed_key_returns_original_entry_and_writes_nothing(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    apply(&*f.store, &p, "a1", accrue(100)).await.unwrap();
    let first = apply(&*f.store, &p, "r1", redeem(40)).await.unwrap();
    let again = apply(&*f.store, &p, "r1", redeem(40)).await.unwrap();
    assert!(again.replayed);
    assert_eq!(again.entries[0].entry_id, first.entries[0].entry_id);
    assert_eq!(again.available, 60);
    let (_, stored) = f.store.ledger(&p).await.unwrap();
    assert_eq!(stored.len(), 2);
}

async fn same_key_with_different_payload_conflicts(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    apply(&*f.store, &p, "a1", accrue(100)).await.unwrap();
    apply(&*f.store, &p, "r1", redeem(40)).await.unwrap();
    let err = apply(&*f.store, &p, "r1", redeem(41)).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::Ledger(LedgerError::IdempotencyConflict { .. })
    ));
}

async fn overdraft_is_refused_and_nothing_written(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    apply(&*f.store, &p, "a1", accrue(10)).await.unwrap();
    let err = apply(&*f.store, &p, "r1", redeem(11)).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::Ledger(LedgerError::InsufficientBalance { .. })
    ));
    assert_eq!(f.store.ledger(&p).await.unwrap().1.len(), 1);
}

async fn cursor_is_stored_with_the_ledger_write(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    f.store
        .apply_ledger(
            &p,
            "order:o1",
            accrue(5),
            Utc::now(),
            EntryMeta::default(),
            Some(("ingest", "cursor-7")),
        )
        .await
        .unwrap();
    assert_eq!(
        f.store.cursor("ingest").await.unwrap().as_deref(),
        Some("cursor-7")
    );
    // A refused command stores neither entry nor cursor.
    let err = f
        .store
        .apply_ledger(
            &p,
            "r",
            redeem(1_000),
            Utc::now(),
            EntryMeta::default(),
            Some(("ingest", "cursor-8")),
        )
        .await;
    assert!(err.is_err());
    assert_eq!(
        f.store.cursor("ingest").await.unwrap().as_deref(),
        Some("cursor-7")
    );
}

async fn expiry_written_off_oldest_first(engine: Engine) {
    let f = store(engine).await;
    let p = profile_id();
    let now = Utc::now();
    f.store
        .apply_ledger(
            &p,
            "a1",
            LedgerCommand::Accrue {
                points: 50,
                expires_at: Some(now + Duration::milliseconds(5)),
                order: None,
            },
            now,
            EntryMeta::default(),
            None,
        )
        .await
        .unwrap();
    apply(&*f.store, &p, "a2", accrue(20)).await.unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    let out = apply(&*f.store, &p, "expire-1", LedgerCommand::ExpireDue)
        .await
        .unwrap();
    assert_eq!(out.entries.len(), 1);
    assert_eq!(out.entries[0].points, -50);
    assert_eq!(out.available, 20);
}

async fn offer_create_is_idempotent_and_conflicts_on_a_different_body(engine: Engine) {
    let f = store(engine).await;
    let (a, created) = f.store.create_offer(&record(offer("o1"))).await.unwrap();
    assert!(created);
    let (b, created) = f.store.create_offer(&record(offer("o1"))).await.unwrap();
    assert!(!created);
    assert_eq!(a, b);
    let mut other = offer("o1");
    other.priority = 5;
    assert!(matches!(
        f.store.create_offer(&record(other)).await.unwrap_err(),
        StoreError::AlreadyExists(..)
    ));
}

async fn offer_update_is_compare_and_swap(engine: Engine) {
    let f = store(engine).await;
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    let mut o = offer("o1");
    o.priority = 9;
    let r = f
        .store
        .update_offer(&o, pb::OfferStatus::Paused as i32, 1, now_micros())
        .await
        .unwrap();
    assert_eq!(r.version, 2);
    assert_eq!(r.status, pb::OfferStatus::Paused as i32);
    assert!(matches!(
        f.store
            .update_offer(&o, pb::OfferStatus::Active as i32, 1, now_micros())
            .await
            .unwrap_err(),
        StoreError::VersionConflict { actual: 2, .. }
    ));
}

async fn issue_books_budget_and_refuses_when_exhausted(engine: Engine) {
    let f = store(engine).await;
    f.store
        .create_offer(&record(with_budget(offer("o1"), 2)))
        .await
        .unwrap();
    for i in 0..2 {
        f.store
            .issue(&new_issue(&profile_id(), "o1", &format!("k{i}"), None))
            .await
            .unwrap();
    }
    let err = f
        .store
        .issue(&new_issue(&profile_id(), "o1", "k9", None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(IssueRefusal::Budget)));
    assert_eq!(f.store.get_offer("o1").await.unwrap().issued, 2);
}

async fn issue_is_idempotent_by_key(engine: Engine) {
    let f = store(engine).await;
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    let p = profile_id();
    let (a, replayed) = f
        .store
        .issue(&new_issue(&p, "o1", "k", None))
        .await
        .unwrap();
    assert!(!replayed);
    let (b, replayed) = f
        .store
        .issue(&new_issue(&p, "o1", "k", None))
        .await
        .unwrap();
    assert!(replayed);
    assert_eq!(a.issue_id, b.issue_id);
    assert_eq!(f.store.get_offer("o1").await.unwrap().issued, 1);
    let err = f
        .store
        .issue(&new_issue(&profile_id(), "o1", "k", None))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::IdempotencyConflict(_)));
}

async fn per_profile_cap_counts_non_cancelled_codes(engine: Engine) {
    let f = store(engine).await;
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    let p = profile_id();
    let (first, _) = f
        .store
        .issue(&new_issue(&p, "o1", "a", Some(1)))
        .await
        .unwrap();
    let err = f
        .store
        .issue(&new_issue(&p, "o1", "b", Some(1)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Refused(IssueRefusal::ProfileCap)));
    f.store
        .cancel(Some(&first.issue_id), None, "oops", now_micros())
        .await
        .unwrap();
    f.store
        .issue(&new_issue(&p, "o1", "c", Some(1)))
        .await
        .unwrap();
}

async fn redeem_once_replays_by_key_or_order_and_refuses_others(engine: Engine) {
    let f = store(engine).await;
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    let (issued, _) = f
        .store
        .issue(&new_issue(&profile_id(), "o1", "a", None))
        .await
        .unwrap();
    let r = |key: &str, order: &str| RedeemCode {
        code: issued.code.clone(),
        idem_key: key.into(),
        order_id: order.into(),
        redemption: pb::Redemption::default(),
        now: now_micros(),
    };
    let (a, replayed) = f.store.redeem(&r("k1", "order-1")).await.unwrap();
    assert!(!replayed);
    assert_eq!(a.status, pb::IssuedOfferStatus::Redeemed as i32);
    assert!(f.store.redeem(&r("k1", "")).await.unwrap().1);
    assert!(f.store.redeem(&r("k2", "order-1")).await.unwrap().1);
    assert!(matches!(
        f.store.redeem(&r("k3", "order-2")).await.unwrap_err(),
        StoreError::Precondition(_)
    ));
    assert_eq!(f.store.get_offer("o1").await.unwrap().redeemed, 1);
    // A redeemed code cannot be cancelled.
    assert!(matches!(
        f.store
            .cancel(None, Some(&issued.code), "x", now_micros())
            .await
            .unwrap_err(),
        StoreError::Precondition(_)
    ));
}

async fn cancel_gives_back_budget_and_is_idempotent(engine: Engine) {
    let f = store(engine).await;
    f.store
        .create_offer(&record(with_budget(offer("o1"), 1)))
        .await
        .unwrap();
    let (issued, _) = f
        .store
        .issue(&new_issue(&profile_id(), "o1", "a", None))
        .await
        .unwrap();
    f.store
        .cancel(None, Some(&issued.code), "r", now_micros())
        .await
        .unwrap();
    let again = f
        .store
        .cancel(Some(&issued.issue_id), None, "r", now_micros())
        .await
        .unwrap();
    assert_eq!(again.status, pb::IssuedOfferStatus::Cancelled as i32);
    assert_eq!(f.store.get_offer("o1").await.unwrap().issued, 0);
    f.store
        .issue(&new_issue(&profile_id(), "o1", "b", None))
        .await
        .unwrap();
}

async fn archive_cancels_outstanding_codes_on_request(engine: Engine) {
    let f = store(engine).await;
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    for k in ["a", "b"] {
        f.store
            .issue(&new_issue(&profile_id(), "o1", k, None))
            .await
            .unwrap();
    }
    let (rec, cancelled) = f
        .store
        .archive_offer("o1", true, now_micros())
        .await
        .unwrap();
    assert_eq!(cancelled, 2);
    assert_eq!(rec.status, pb::OfferStatus::Archived as i32);
    assert!(matches!(
        f.store
            .issue(&new_issue(&profile_id(), "o1", "c", None))
            .await
            .unwrap_err(),
        StoreError::Refused(IssueRefusal::NotActive)
    ));
}

async fn trigger_fires_once_per_source(engine: Engine) {
    let f = store(engine).await;
    let t = pb::Trigger {
        trigger_id: "t1".into(),
        offer_id: "o1".into(),
        channel: pb::Channel::Email as i32,
        ..Default::default()
    };
    let (stored, created) = f.store.create_trigger(&t).await.unwrap();
    assert!(created);
    assert!(stored.create_time.is_some());
    let p = profile_id();
    assert!(f.store.claim_firing("t1", "change-1", &p, 1).await.unwrap());
    assert!(!f.store.claim_firing("t1", "change-1", &p, 2).await.unwrap());
    f.store
        .finish_firing("t1", "change-1", Some("issue"))
        .await
        .unwrap();
    let listed = f.store.list_triggers("", "", 10).await.unwrap();
    assert_eq!(listed[0].issued_count, 1);
    f.store.delete_trigger("t1").await.unwrap();
    assert!(f.store.list_triggers("", "", 10).await.unwrap().is_empty());
    assert!(matches!(
        f.store.delete_trigger("never").await.unwrap_err(),
        StoreError::NotFound(..)
    ));
}

fn eur_money(minor: i64) -> clientele_offers::money::Money {
    clientele_offers::money::Money::new(
        minor,
        clientele_offers::money::CurrencyCode::new("EUR").unwrap(),
    )
}

fn accrue_order(points: i64, order_id: &str, amount: i64) -> LedgerCommand {
    LedgerCommand::Accrue {
        points,
        expires_at: None,
        order: Some(clientele_offers::ledger::OrderRef {
            order_id: order_id.into(),
            amount: eur_money(amount),
        }),
    }
}

async fn merging_two_profiles_moves_points_to_the_survivor(engine: Engine) {
    let f = store(engine).await;
    let (loser, survivor) = (profile_id(), profile_id());
    let now = Utc::now();
    let expiry = now + Duration::days(30);
    // The loser's batch is the older one and expires; the survivor's is newer.
    f.store
        .apply_ledger(
            &loser,
            "l1",
            LedgerCommand::Accrue {
                points: 30,
                expires_at: Some(expiry),
                order: None,
            },
            now,
            EntryMeta::default(),
            None,
        )
        .await
        .unwrap();
    tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    apply(&*f.store, &survivor, "s1", accrue(50)).await.unwrap();
    let out = f
        .store
        .merge_profiles(
            &survivor,
            std::slice::from_ref(&loser),
            Some(("profiles", "7")),
        )
        .await
        .unwrap();
    assert_eq!((out.merged, out.batches, out.points), (1, 1, 30));
    assert_eq!(
        f.store.cursor("profiles").await.unwrap().as_deref(),
        Some("7")
    );

    let (l, l_entries) = f.store.ledger(&loser).await.unwrap();
    assert_eq!(l.balance(Utc::now()), 0);
    let last = l_entries.last().unwrap();
    assert_eq!((last.points, last.balance_after), (-30, 0));
    assert_eq!(last.meta.note, format!("merged into profile {survivor}"));
    let (_, s_entries) = f.store.ledger(&survivor).await.unwrap();
    let moved = s_entries.last().unwrap();
    assert_eq!((moved.points, moved.balance_after), (30, 80));
    assert_eq!(moved.kind, pb::LedgerEntryKind::Adjustment as i32);
    assert_eq!(l.book_balance(), 0);
    let (s, _) = f.store.ledger(&survivor).await.unwrap();
    assert_eq!(s.balance(Utc::now()), 80);
    let batches = s.batches(Utc::now());
    assert_eq!(
        batches[0].earned_at.timestamp_micros(),
        now.timestamp_micros()
    );
    assert_eq!(batches[0].expires_at, Some(expiry));
    // The loser's batch is older: a redemption spends it first.
    let r = apply(&*f.store, &survivor, "r1", redeem(40)).await.unwrap();
    assert_eq!(r.available, 40);
    let (s, _) = f.store.ledger(&survivor).await.unwrap();
    let remaining: Vec<i64> = s.batches(Utc::now()).iter().map(|b| b.remaining).collect();
    assert_eq!(remaining, vec![0, 40]);
    // The loser's ledger takes no new commands.
    let err = apply(&*f.store, &loser, "l2", accrue(5)).await.unwrap_err();
    assert!(matches!(
        err,
        StoreError::Ledger(LedgerError::MergedAway { .. })
    ));
    assert_eq!(
        f.store.survivor_of(&loser).await.unwrap().as_deref(),
        Some(survivor.as_str())
    );
}

async fn replayed_merge_moves_nothing_twice(engine: Engine) {
    let f = store(engine).await;
    let (loser, survivor) = (profile_id(), profile_id());
    apply(&*f.store, &loser, "l1", accrue(30)).await.unwrap();
    apply(&*f.store, &survivor, "s1", accrue(50)).await.unwrap();
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    f.store
        .issue(&new_issue(&loser, "o1", "a", Some(2)))
        .await
        .unwrap();
    f.store
        .merge_profiles(
            &survivor,
            std::slice::from_ref(&loser),
            Some(("profiles", "7")),
        )
        .await
        .unwrap();
    let (_, before) = f.store.ledger(&survivor).await.unwrap();
    let again = f
        .store
        .merge_profiles(
            &survivor,
            std::slice::from_ref(&loser),
            Some(("profiles", "8")),
        )
        .await
        .unwrap();
    assert_eq!(again, clientele_offers::store::MergeOutcome::default());
    let (s, after) = f.store.ledger(&survivor).await.unwrap();
    assert_eq!(before.len(), after.len());
    assert_eq!(s.balance(Utc::now()), 80);
    assert_eq!(f.store.ledger(&loser).await.unwrap().1.len(), 2);
    assert_eq!(
        f.store.cursor("profiles").await.unwrap().as_deref(),
        Some("8")
    );
    // The loser's code counts against the survivor's per-profile cap.
    let (per_offer, _) = f.store.profile_usage(&survivor).await.unwrap();
    assert_eq!(per_offer.get("o1"), Some(&1));
    f.store
        .issue(&new_issue(&survivor, "o1", "b", Some(2)))
        .await
        .unwrap();
    let refused = f
        .store
        .issue(&new_issue(&survivor, "o1", "c", Some(2)))
        .await
        .unwrap_err();
    assert!(matches!(
        refused,
        StoreError::Refused(IssueRefusal::ProfileCap)
    ));
}

async fn refund_of_the_losers_order_after_the_merge_reverses_its_points_from_the_survivor(
    engine: Engine,
) {
    let f = store(engine).await;
    let (loser, survivor) = (profile_id(), profile_id());
    apply(
        &*f.store,
        &loser,
        "order:o1",
        accrue_order(100, "o1", 10_000),
    )
    .await
    .unwrap();
    apply(
        &*f.store,
        &loser,
        "refund:a",
        LedgerCommand::ReverseOrder {
            order_id: "o1".into(),
            refund: eur_money(2_000),
        },
    )
    .await
    .unwrap();
    apply(&*f.store, &survivor, "s1", accrue(50)).await.unwrap();
    let activity = clientele_offers::program::EarnActivity {
        key: "order:o1".into(),
        at: Utc::now(),
        spend_minor: 10_000,
        points: 100,
    };
    f.store.record_activity(&loser, &activity).await.unwrap();
    f.store
        .merge_profiles(&survivor, std::slice::from_ref(&loser), None)
        .await
        .unwrap();
    let (s, _) = f.store.ledger(&survivor).await.unwrap();
    assert_eq!(s.balance(Utc::now()), 130);
    // The order is known to the survivor: it is never accrued again.
    assert!(s.has_order("o1"));
    assert_eq!(f.store.activity(&survivor).await.unwrap().len(), 1);
    assert!(!f.store.record_activity(&survivor, &activity).await.unwrap());
    // A later refund under the survivor continues the order's running total: 20 % + 30 %.
    let out = apply(
        &*f.store,
        &survivor,
        "refund:b",
        LedgerCommand::ReverseOrder {
            order_id: "o1".into(),
            refund: eur_money(3_000),
        },
    )
    .await
    .unwrap();
    assert_eq!(out.entries[0].points, -30);
    assert_eq!(out.available, 100);
    // The rest of the order is refundable, no more.
    let too_much = apply(
        &*f.store,
        &survivor,
        "refund:c",
        LedgerCommand::ReverseOrder {
            order_id: "o1".into(),
            refund: eur_money(5_001),
        },
    )
    .await
    .unwrap_err();
    assert!(matches!(
        too_much,
        StoreError::Ledger(LedgerError::RefundExceedsOrder { .. })
    ));
}

async fn a_profile_merged_into_one_then_erased_is_erased_too(engine: Engine) {
    let f = store(engine).await;
    let (loser, survivor) = (profile_id(), profile_id());
    apply(
        &*f.store,
        &loser,
        "order:o1",
        accrue_order(100, "o1", 10_000),
    )
    .await
    .unwrap();
    apply(&*f.store, &loser, "r1", redeem(10)).await.unwrap();
    apply(&*f.store, &survivor, "s1", accrue(50)).await.unwrap();
    f.store.create_offer(&record(offer("o1"))).await.unwrap();
    f.store
        .issue(&new_issue(&loser, "o1", "a", None))
        .await
        .unwrap();
    f.store
        .merge_profiles(&survivor, std::slice::from_ref(&loser), None)
        .await
        .unwrap();
    let out = f.store.erase_profile(&survivor, None).await.unwrap();
    assert_eq!(out.issued_offers, 1);
    for p in [&loser, &survivor] {
        assert!(f.store.is_erased(p).await.unwrap());
        assert!(f.store.ledger(p).await.unwrap().1.is_empty());
        assert!(f.store.list_issued(p, 0, 100).await.unwrap().is_empty());
        assert!(f.store.activity(p).await.unwrap().is_empty());
    }
    assert_eq!(f.store.survivor_of(&loser).await.unwrap(), None);
    let again = f.store.erase_profile(&survivor, None).await.unwrap();
    assert_eq!(again, clientele_offers::store::ErasureOutcome::default());
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod postgres {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Engine::Postgres).await;
                }
            )*
        }
        mod sqlite {
            $(
                #[tokio::test]
                async fn $name() {
                    super::$name(super::Engine::Sqlite).await;
                }
            )*
        }
    };
}

conformance!(
    ledger_accrues_redeems_and_keeps_the_balance,
    replayed_key_returns_original_entry_and_writes_nothing,
    same_key_with_different_payload_conflicts,
    overdraft_is_refused_and_nothing_written,
    cursor_is_stored_with_the_ledger_write,
    expiry_written_off_oldest_first,
    offer_create_is_idempotent_and_conflicts_on_a_different_body,
    offer_update_is_compare_and_swap,
    issue_books_budget_and_refuses_when_exhausted,
    issue_is_idempotent_by_key,
    per_profile_cap_counts_non_cancelled_codes,
    redeem_once_replays_by_key_or_order_and_refuses_others,
    cancel_gives_back_budget_and_is_idempotent,
    archive_cancels_outstanding_codes_on_request,
    trigger_fires_once_per_source,
    merging_two_profiles_moves_points_to_the_survivor,
    replayed_merge_moves_nothing_twice,
    refund_of_the_losers_order_after_the_merge_reverses_its_points_from_the_survivor,
    a_profile_merged_into_one_then_erased_is_erased_too,
);

/// Contention on real PostgreSQL: writers run in parallel on separate connections.
mod concurrency {
    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn a_merge_racing_redemptions_of_both_profiles_loses_and_doubles_no_point() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        let (loser, survivor) = (profile_id(), profile_id());
        apply(&*f.store, &loser, "l", accrue(200)).await.unwrap();
        apply(&*f.store, &survivor, "s", accrue(100)).await.unwrap();
        let mut tasks = Vec::new();
        for i in 0..30 {
            let s = f.store.clone();
            let p = if i % 2 == 0 {
                loser.clone()
            } else {
                survivor.clone()
            };
            tasks.push(tokio::spawn(async move {
                apply(&*s, &p, &format!("r{i}"), redeem(10)).await.is_ok()
            }));
        }
        let merger = {
            let s = f.store.clone();
            let (l, sv) = (loser.clone(), survivor.clone());
            tokio::spawn(async move { s.merge_profiles(&sv, &[l], None).await.unwrap() })
        };
        let mut spent = 0;
        for t in tasks {
            if t.await.unwrap() {
                spent += 10;
            }
        }
        let out = merger.await.unwrap();
        assert_eq!(out.merged, 1);
        let (l, _) = f.store.ledger(&loser).await.unwrap();
        let (s, _) = f.store.ledger(&survivor).await.unwrap();
        assert_eq!(l.balance(Utc::now()), 0);
        assert_eq!(s.balance(Utc::now()) + spent, 300);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_redemptions_never_overdraw_the_balance() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        let p = profile_id();
        apply(&*f.store, &p, "seed", accrue(1_000)).await.unwrap();
        // 50 × 30 points = 1 500 asked of 1 000 available: exactly 33 can succeed.
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = f.store.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    s.apply_ledger(
                        &p,
                        &format!("r{i}"),
                        redeem(30),
                        Utc::now(),
                        EntryMeta::default(),
                        None,
                    )
                    .await
                })
            })
            .collect();
        let mut ok = 0;
        let mut refused = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Ledger(LedgerError::InsufficientBalance { .. })) => refused += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!((ok, refused), (33, 17));
        let (ledger, stored) = f.store.ledger(&p).await.unwrap();
        assert_eq!(ledger.balance(Utc::now()), 10);
        assert_eq!(stored.len(), 34);
        assert!(stored.iter().all(|s| s.balance_after >= 0));
        println!("overdraft: {ok} of 50 redemptions succeeded, {refused} refused, balance 10");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn budget_of_ten_under_fifty_concurrent_issues_issues_exactly_ten() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        f.store
            .create_offer(&record(with_budget(offer("o1"), 10)))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = f.store.clone();
                tokio::spawn(async move {
                    s.issue(&new_issue(&profile_id(), "o1", &format!("k{i}"), None))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        let mut exhausted = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Refused(IssueRefusal::Budget)) => exhausted += 1,
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!((ok, exhausted), (10, 40));
        assert_eq!(f.store.get_offer("o1").await.unwrap().issued, 10);
        println!("budget: {ok} of 50 issues succeeded, {exhausted} refused as exhausted");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn per_profile_cap_holds_under_concurrent_issues_for_one_profile() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        f.store.create_offer(&record(offer("o1"))).await.unwrap();
        let p = profile_id();
        let tasks: Vec<_> = (0..20)
            .map(|i| {
                let s = f.store.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    s.issue(&new_issue(&p, "o1", &format!("k{i}"), Some(3)))
                        .await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            match t.await.unwrap() {
                Ok(_) => ok += 1,
                Err(StoreError::Refused(IssueRefusal::ProfileCap)) => {}
                Err(e) => panic!("unexpected error: {e}"),
            }
        }
        assert_eq!(ok, 3);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_retries_of_one_key_write_one_entry() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        let p = profile_id();
        apply(&*f.store, &p, "seed", accrue(100)).await.unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let s = f.store.clone();
                let p = p.clone();
                tokio::spawn(async move {
                    s.apply_ledger(
                        &p,
                        "same-key",
                        redeem(60),
                        Utc::now(),
                        EntryMeta::default(),
                        None,
                    )
                    .await
                })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        let mut replays = 0;
        for t in tasks {
            let out = t.await.unwrap().unwrap();
            replays += usize::from(out.replayed);
            ids.insert(out.entries[0].entry_id.clone());
        }
        assert_eq!(ids.len(), 1, "every retry returns the same entry");
        assert_eq!(replays, 49);
        let (ledger, stored) = f.store.ledger(&p).await.unwrap();
        assert_eq!(stored.len(), 2);
        assert_eq!(ledger.balance(Utc::now()), 40);
        println!("idempotency: 50 concurrent retries of one key → 1 entry, 49 replays");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_retries_of_one_issue_key_issue_one_code() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        f.store
            .create_offer(&record(with_budget(offer("o1"), 100)))
            .await
            .unwrap();
        let p = profile_id();
        let tasks: Vec<_> = (0..50)
            .map(|_| {
                let s = f.store.clone();
                let p = p.clone();
                tokio::spawn(async move { s.issue(&new_issue(&p, "o1", "same", None)).await })
            })
            .collect();
        let mut ids = std::collections::BTreeSet::new();
        for t in tasks {
            ids.insert(t.await.unwrap().unwrap().0.issue_id);
        }
        assert_eq!(ids.len(), 1);
        assert_eq!(f.store.get_offer("o1").await.unwrap().issued, 1);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn fifty_concurrent_redemptions_of_one_code_redeem_it_once() {
        let _serial = CONTENTION.lock().await;
        let f = store_with_pool(Engine::Postgres, 10).await;
        f.store.create_offer(&record(offer("o1"))).await.unwrap();
        let (issued, _) = f
            .store
            .issue(&new_issue(&profile_id(), "o1", "a", None))
            .await
            .unwrap();
        let tasks: Vec<_> = (0..50)
            .map(|i| {
                let s = f.store.clone();
                let code = issued.code.clone();
                tokio::spawn(async move {
                    s.redeem(&RedeemCode {
                        code,
                        idem_key: format!("k{i}"),
                        order_id: format!("order-{i}"),
                        redemption: pb::Redemption::default(),
                        now: now_micros(),
                    })
                    .await
                })
            })
            .collect();
        let mut ok = 0;
        for t in tasks {
            if let Ok((_, false)) = t.await.unwrap() {
                ok += 1;
            }
        }
        assert_eq!(ok, 1);
        assert_eq!(f.store.get_offer("o1").await.unwrap().redeemed, 1);
    }
}
