//! `clientele demo`: seeds demo customers through the public ProfileService API so a fresh
//! install has something to show — identity stitching (anonymous browsing merged at login),
//! the over-merge guard (a family tablet shared by several customers), traits, consent and
//! aggregates — and prints a short report.
//!
//! The data is a pure function of the seed ([`DemoPlan::generate`]); each customer draws from
//! their own ChaCha stream, so customer `i` is the same whatever `--customers` is. Running the
//! demo again changes nothing: resolving is idempotent, traits and consents are only written
//! when the profile differs, and every aggregate delta carries an idempotency key derived from
//! the seed, so the server ignores repeats.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt::Write as _;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::Args;
use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;
use rand::seq::SliceRandom as _;
use rand::{Rng, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use serde_json::json;
use tokio::task::JoinSet;

use crate::client::{ConnectionOptions, OutputFormat, ProfileClient, emit, profile_client};
use crate::{json, render};

/// How many customers share the family tablet (more than the server's default over-merge cap
/// of 5, so the guard has something to refuse).
const FAMILY_TABLET_USERS: usize = 7;
/// Identifier sets per BatchResolve call (the server accepts up to 1000).
const RESOLVE_BATCH: usize = 500;
/// Deltas per ApplyAggregates call (the server accepts up to 1000).
const DELTA_BATCH: usize = 1000;
/// Profiles per BatchGetProfiles call (the server accepts up to 500).
const GET_BATCH: usize = 500;
/// Trait and consent writes in flight at once.
const WRITES_IN_FLIGHT: usize = 8;
const DAY: i64 = 86_400;

const CATEGORIES: &[&str] = &[
    "beauty",
    "fashion",
    "electronics",
    "home",
    "grocery",
    "sports",
    "books",
    "kids",
];
const KR_FIRST: &[&str] = &[
    "minji", "seojun", "jiwoo", "hana", "doyun", "yuna", "jihoon",
];
const KR_LAST: &[&str] = &["kim", "lee", "park", "choi", "jung", "kang"];
const US_FIRST: &[&str] = &["emma", "liam", "olivia", "noah", "ava", "mason", "mia"];
const US_LAST: &[&str] = &["smith", "garcia", "johnson", "brown", "miller", "davis"];
const US_AREA_CODES: &[u32] = &[212, 312, 415, 617, 206];

/// Arguments of `clientele demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of demo customers.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=9_999))]
    pub customers: u32,
    /// Seed of the generated data; the same seed always produces the same customers.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
}

/// Where a demo customer shops; decides their currency and phone number format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Market {
    /// South Korea, spending KRW.
    Korea,
    /// United States, spending USD.
    UnitedStates,
}

impl Market {
    /// ISO 4217 code of the market's currency.
    pub fn currency(self) -> &'static str {
        match self {
            Self::Korea => "KRW",
            Self::UnitedStates => "USD",
        }
    }
}

/// One consent decision a demo customer makes.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoConsent {
    /// What it is for.
    pub purpose: pb::ConsentPurpose,
    /// The decision.
    pub status: pb::ConsentStatus,
    /// Where it was captured.
    pub source: &'static str,
    /// How long before "now" it was made.
    pub seconds_ago: i64,
}

/// One aggregate delta (an order, a refund or a session's engagement).
#[derive(Debug, Clone, PartialEq)]
pub struct DemoEvent {
    /// Idempotency key, unique per seed, customer and event.
    pub idempotency_key: String,
    /// How long before "now" it happened.
    pub seconds_ago: i64,
    /// Completed orders (0 or 1).
    pub orders: i64,
    /// Refunds (0 or 1).
    pub refunds: i64,
    /// Gross order value in minor units of the customer's currency.
    pub gross_minor: i64,
    /// Refunded value in minor units of the customer's currency.
    pub refunded_minor: i64,
    /// Engagement counter increments.
    pub engagement: Vec<(&'static str, i64)>,
}

/// One generated demo customer.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoCustomer {
    /// Position in the plan (0-based).
    pub index: u32,
    /// Where they shop.
    pub market: Market,
    /// Customer id.
    pub customer_id: String,
    /// Email address.
    pub email: String,
    /// Phone number (international format).
    pub phone: String,
    /// Their own device, for some customers.
    pub device_id: Option<String>,
    /// For customers who browse anonymously before they log in: the cookie id.
    pub anonymous_id: Option<String>,
    /// Trait `favourite_category`.
    pub favourite_category: &'static str,
    /// Trait `vip`.
    pub vip: bool,
    /// Trait `signup_channel` ("web", "app" or "pos").
    pub signup_channel: &'static str,
    /// Consent decisions, oldest first.
    pub consents: Vec<DemoConsent>,
    /// Engagement while anonymous (applied to the anonymous profile before login).
    pub browsing: Vec<DemoEvent>,
    /// Orders, refunds and engagement after signing up.
    pub events: Vec<DemoEvent>,
}

impl DemoCustomer {
    /// The traits the demo sets (no raw personal data).
    pub fn traits(&self) -> BTreeMap<String, pb::Value> {
        use pb::value::Kind;
        let value = |kind| pb::Value { kind: Some(kind) };
        BTreeMap::from([
            (
                "favourite_category".to_string(),
                value(Kind::StringValue(self.favourite_category.to_string())),
            ),
            ("vip".to_string(), value(Kind::BoolValue(self.vip))),
            (
                "signup_channel".to_string(),
                value(Kind::StringValue(self.signup_channel.to_string())),
            ),
        ])
    }

    /// Identifiers given at sign-up: customer id, email, phone and (if any) own device.
    pub fn signup_set(&self) -> pb::IdentifierSet {
        let mut ids = vec![
            identifier(pb::IdentifierType::CustomerId, &self.customer_id),
            identifier(pb::IdentifierType::Email, &self.email),
            identifier(pb::IdentifierType::Phone, &self.phone),
        ];
        if let Some(d) = &self.device_id {
            ids.push(identifier(pb::IdentifierType::DeviceId, d));
        }
        pb::IdentifierSet { identifiers: ids }
    }
}

/// All generated demo data for one seed.
#[derive(Debug, Clone, PartialEq)]
pub struct DemoPlan {
    /// The seed.
    pub seed: u64,
    /// The customers, by index.
    pub customers: Vec<DemoCustomer>,
    /// Device id of the family tablet.
    pub family_tablet: String,
    /// Indexes of the customers who log in on the family tablet, in the order they do.
    pub tablet_users: Vec<u32>,
}

fn identifier(kind: pb::IdentifierType, value: &str) -> pb::Identifier {
    pb::Identifier {
        r#type: kind as i32,
        value: value.to_string(),
        namespace: String::new(),
    }
}

fn pick<T: Copy>(rng: &mut ChaCha8Rng, items: &[T]) -> T {
    items[rng.gen_range(0..items.len())]
}

/// A random UUID-shaped id (deterministic for the generator's stream).
fn uuid_like(rng: &mut ChaCha8Rng) -> String {
    let n: u128 = rng.r#gen();
    let h = format!("{n:032x}");
    format!(
        "{}-{}-{}-{}-{}",
        &h[0..8],
        &h[8..12],
        &h[12..16],
        &h[16..20],
        &h[20..32]
    )
}

/// The idempotency key of event `kind`/`n` of customer `index` under `seed`.
pub fn idempotency_key(seed: u64, index: u32, kind: &str, n: usize) -> String {
    format!("demo-s{seed}-c{index:05}-{kind}-{n}")
}

impl DemoPlan {
    /// Generates `customers` customers from `seed` (pure and deterministic).
    pub fn generate(seed: u64, customers: u32) -> Self {
        let customers: Vec<DemoCustomer> = (0..customers)
            .map(|index| generate_customer(seed, index))
            .collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut order: Vec<u32> = (0..u32::try_from(customers.len()).unwrap_or(u32::MAX)).collect();
        order.shuffle(&mut rng);
        order.truncate(FAMILY_TABLET_USERS);
        Self {
            seed,
            customers,
            family_tablet: format!("family-tablet-s{seed}"),
            tablet_users: order,
        }
    }
}

/// Customer `index` of `seed`, drawn from its own ChaCha stream (stream 0 is the plan's).
fn generate_customer(seed: u64, index: u32) -> DemoCustomer {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(u64::from(index) + 1);
    let market = if rng.gen_bool(0.6) {
        Market::Korea
    } else {
        Market::UnitedStates
    };
    let (first, last) = match market {
        Market::Korea => (pick(&mut rng, KR_FIRST), pick(&mut rng, KR_LAST)),
        Market::UnitedStates => (pick(&mut rng, US_FIRST), pick(&mut rng, US_LAST)),
    };
    // Phone numbers are unique per customer within a seed (index < 10 000).
    let phone = match market {
        Market::Korea => format!("+82 10-{:04}-{index:04}", 2000 + seed % 8000),
        Market::UnitedStates => format!(
            "+1 {} {}-{index:04}",
            US_AREA_CODES[usize::try_from(seed / 80).unwrap_or(0) % US_AREA_CODES.len()],
            220 + seed % 80
        ),
    };
    let device_id = rng.gen_bool(0.4).then(|| uuid_like(&mut rng));
    let anonymous_id = rng
        .gen_bool(0.35)
        .then(|| format!("anon-{:016x}", rng.r#gen::<u64>()));
    let signup_channel = pick(&mut rng, &["web", "web", "app", "app", "pos"]);
    let signup_days_ago = rng.gen_range(60..=365);
    let source = match signup_channel {
        "web" => "web.signup",
        "app" => "app.onboarding",
        _ => "pos",
    };
    let signed_up = signup_days_ago * DAY;
    let mut consents = Vec::new();
    let mut decide = |purpose, status, source, seconds_ago| {
        consents.push(DemoConsent {
            purpose,
            status,
            source,
            seconds_ago,
        });
    };
    use pb::ConsentPurpose as P;
    use pb::ConsentStatus as S;
    let email_roll: f64 = rng.r#gen();
    if email_roll < 0.6 {
        decide(P::Email, S::Granted, source, signed_up);
    } else if email_roll < 0.85 {
        decide(P::Email, S::Denied, source, signed_up);
    } else {
        decide(P::Email, S::Granted, source, signed_up);
        let later = rng.gen_range(1..signup_days_ago) * DAY;
        decide(P::Email, S::Revoked, "preference-center", later);
    }
    let sms = if rng.gen_bool(0.4) {
        S::Granted
    } else {
        S::Denied
    };
    decide(P::Sms, sms, source, signed_up);
    let personalisation = if rng.gen_bool(0.7) {
        S::Granted
    } else {
        S::Denied
    };
    decide(P::Personalisation, personalisation, source, signed_up);
    let analytics = if rng.gen_bool(0.8) {
        S::Granted
    } else {
        S::Denied
    };
    decide(P::Analytics, analytics, source, signed_up);
    let email_granted = email_roll < 0.6;

    let browsing = if anonymous_id.is_some() {
        (0..rng.gen_range(1..=3))
            .map(|n| DemoEvent {
                idempotency_key: idempotency_key(seed, index, "browse", n),
                seconds_ago: signed_up + rng.gen_range(1..=20) * DAY,
                orders: 0,
                refunds: 0,
                gross_minor: 0,
                refunded_minor: 0,
                engagement: vec![("product_viewed", rng.gen_range(1..=8))],
            })
            .collect()
    } else {
        Vec::new()
    };

    let vip = rng.gen_bool(0.1);
    let order_count = if vip {
        rng.gen_range(4..=9)
    } else if rng.gen_bool(0.2) {
        0
    } else {
        rng.gen_range(1..=4)
    };
    let mut events = Vec::new();
    for n in 0..order_count {
        let seconds_ago = rng.gen_range(1..signup_days_ago) * DAY + rng.gen_range(0..DAY);
        let gross_minor = match market {
            Market::Korea => rng.gen_range(150..=2_500) * 100,
            Market::UnitedStates => rng.gen_range(1_200..=18_000),
        };
        events.push(DemoEvent {
            idempotency_key: idempotency_key(seed, index, "order", n),
            seconds_ago,
            orders: 1,
            refunds: 0,
            gross_minor,
            refunded_minor: 0,
            engagement: Vec::new(),
        });
        if rng.gen_bool(0.12) {
            let refunded_minor = if rng.gen_bool(0.5) {
                gross_minor
            } else {
                gross_minor / 2
            };
            events.push(DemoEvent {
                idempotency_key: idempotency_key(seed, index, "refund", n),
                seconds_ago: (seconds_ago - 3 * DAY).max(60),
                orders: 0,
                refunds: 1,
                gross_minor: 0,
                refunded_minor,
                engagement: Vec::new(),
            });
        }
    }
    for n in 0..rng.gen_range(1..=5) {
        let mut engagement = vec![("product_viewed", rng.gen_range(1..=12))];
        if rng.gen_bool(0.3) {
            engagement.push(("added_to_cart", rng.gen_range(1..=3)));
        }
        if email_granted && rng.gen_bool(0.6) {
            engagement.push(("email_opened", 1));
        }
        events.push(DemoEvent {
            idempotency_key: idempotency_key(seed, index, "session", n),
            seconds_ago: rng.gen_range(0..signup_days_ago) * DAY + rng.gen_range(0..DAY),
            orders: 0,
            refunds: 0,
            gross_minor: 0,
            refunded_minor: 0,
            engagement,
        });
    }

    DemoCustomer {
        index,
        market,
        customer_id: format!("demo-s{seed}-{index:05}"),
        email: format!("{first}.{last}.{index}@demo{seed}.example.com"),
        phone,
        device_id,
        anonymous_id,
        favourite_category: pick(&mut rng, CATEGORIES),
        vip,
        signup_channel,
        consents,
        browsing,
        events,
    }
}

/// Converts a demo event of a customer in `currency` to a delta for `profile_id`.
fn delta(event: &DemoEvent, currency: &str, profile_id: &str, now: i64) -> pb::AggregateDelta {
    let money = |amount: i64| {
        (amount != 0).then(|| pb::Money {
            amount_minor: amount,
            currency: currency.to_string(),
        })
    };
    pb::AggregateDelta {
        idempotency_key: event.idempotency_key.clone(),
        profile_id: profile_id.to_string(),
        occurred_at: Some(Timestamp {
            seconds: now - event.seconds_ago,
            nanos: 0,
        }),
        orders: event.orders,
        refunds: event.refunds,
        gross: money(event.gross_minor),
        refunded: money(event.refunded_minor),
        engagement: event
            .engagement
            .iter()
            .map(|(k, n)| ((*k).to_string(), *n))
            .collect(),
        ..Default::default()
    }
}

/// What one demo run did.
#[derive(Debug, Default)]
struct Tally {
    created: usize,
    merges_at_login: usize,
    merges_on_tablet: usize,
    refused_links: usize,
    erased_skipped: usize,
    traits_written: usize,
    traits_unchanged: usize,
    consents_written: usize,
    consents_unchanged: usize,
    aggregates_applied: u64,
    aggregates_duplicate: u64,
    aggregates_unknown_profile: u64,
}

impl Tally {
    fn count(&mut self, r: &pb::ResolveResponse) -> usize {
        self.created += usize::from(r.created);
        self.refused_links += r.refused_links.len();
        self.erased_skipped += usize::from(r.erased);
        r.merged_profile_ids.len()
    }
}

/// Resolves `sets` with BatchResolve, in chunks, keeping the order.
async fn batch_resolve(
    client: &mut ProfileClient,
    sets: Vec<pb::IdentifierSet>,
) -> anyhow::Result<Vec<pb::ResolveResponse>> {
    let mut out = Vec::with_capacity(sets.len());
    for chunk in sets.chunks(RESOLVE_BATCH) {
        let results = client
            .batch_resolve(pb::BatchResolveRequest {
                sets: chunk.to_vec(),
            })
            .await?
            .into_inner()
            .results;
        anyhow::ensure!(
            results.len() == chunk.len(),
            "BatchResolve answered {} sets for {} requested",
            results.len(),
            chunk.len()
        );
        out.extend(results);
    }
    Ok(out)
}

/// Current profiles for `ids`, keyed by every id that leads to them (survivor and aliases).
async fn fetch_profiles(
    client: &mut ProfileClient,
    ids: impl IntoIterator<Item = String>,
) -> anyhow::Result<HashMap<String, pb::Profile>> {
    let ids: Vec<String> = ids
        .into_iter()
        .filter(|i| !i.is_empty())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    let mut out = HashMap::new();
    for chunk in ids.chunks(GET_BATCH) {
        let response = client
            .batch_get_profiles(pb::BatchGetProfilesRequest {
                profile_ids: chunk.to_vec(),
            })
            .await?
            .into_inner();
        for p in response.profiles {
            for alias in &p.merged_profile_ids {
                out.insert(alias.clone(), p.clone());
            }
            out.insert(p.profile_id.clone(), p);
        }
    }
    Ok(out)
}

/// Applies `deltas` in chunks, adding the outcome to `tally`.
async fn apply_aggregates(
    client: &mut ProfileClient,
    deltas: Vec<pb::AggregateDelta>,
    tally: &mut Tally,
) -> anyhow::Result<()> {
    for chunk in deltas.chunks(DELTA_BATCH) {
        let r = client
            .apply_aggregates(pb::ApplyAggregatesRequest {
                deltas: chunk.to_vec(),
                ..Default::default()
            })
            .await?
            .into_inner();
        tally.aggregates_applied += u64::from(r.applied);
        tally.aggregates_duplicate += u64::from(r.duplicates);
        tally.aggregates_unknown_profile += u64::from(r.unknown_profiles);
    }
    Ok(())
}

/// The consent decisions of `customer` still to send to `profile`: a purpose is skipped when
/// the profile's current decision already has the customer's final status.
fn pending_consents<'c>(customer: &'c DemoCustomer, profile: &pb::Profile) -> Vec<&'c DemoConsent> {
    let mut final_status: BTreeMap<i32, pb::ConsentStatus> = BTreeMap::new();
    for c in &customer.consents {
        final_status.insert(c.purpose as i32, c.status);
    }
    customer
        .consents
        .iter()
        .filter(|c| {
            !profile.consents.iter().any(|current| {
                current.purpose == c.purpose as i32
                    && Some(current.status) == final_status.get(&current.purpose).map(|s| *s as i32)
            })
        })
        .collect()
}

/// Seeds the demo and prints the report.
pub async fn run(args: DemoArgs, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client = profile_client(options)?;
    let plan = DemoPlan::generate(args.seed, args.customers);
    let now = i64::try_from(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or(Duration::ZERO)
            .as_secs(),
    )
    .unwrap_or(i64::MAX);
    let mut tally = Tally::default();
    let customers = &plan.customers;

    // 1. Some customers browse anonymously first: a profile per cookie.
    let browsers: Vec<&DemoCustomer> = customers
        .iter()
        .filter(|c| c.anonymous_id.is_some())
        .collect();
    let anonymous_sets = browsers
        .iter()
        .filter_map(|c| c.anonymous_id.as_deref())
        .map(|a| pb::IdentifierSet {
            identifiers: vec![identifier(pb::IdentifierType::AnonymousId, a)],
        })
        .collect();
    let anonymous_results = batch_resolve(&mut client, anonymous_sets).await?;
    let mut deltas = Vec::new();
    for (c, r) in browsers.iter().zip(&anonymous_results) {
        tally.count(r);
        if !r.erased {
            for e in &c.browsing {
                deltas.push(delta(e, c.market.currency(), &r.profile_id, now));
            }
        }
    }
    if !deltas.is_empty() {
        apply_aggregates(&mut client, deltas, &mut tally).await?;
    }

    // 2. Everyone signs up with customer id, email, phone and maybe their own device.
    let signup_results = batch_resolve(
        &mut client,
        customers.iter().map(DemoCustomer::signup_set).collect(),
    )
    .await?;
    let mut profile_of: Vec<String> = Vec::with_capacity(customers.len());
    for r in &signup_results {
        tally.count(r);
        profile_of.push(r.profile_id.clone());
    }

    // 3. The browsers log in (anonymous id + email): their anonymous profiles merge.
    let login_sets = browsers
        .iter()
        .filter_map(|c| {
            Some(pb::IdentifierSet {
                identifiers: vec![
                    identifier(pb::IdentifierType::AnonymousId, c.anonymous_id.as_deref()?),
                    identifier(pb::IdentifierType::Email, &c.email),
                ],
            })
        })
        .collect();
    let login_results = batch_resolve(&mut client, login_sets).await?;
    for (c, r) in browsers.iter().zip(&login_results) {
        tally.merges_at_login += tally.count(r);
        if !r.erased {
            profile_of[c.index as usize] = r.profile_id.clone();
        }
    }

    // 4. A family tablet is used by several customers: the over-merge guard caps how many
    //    profiles one device may fuse and refuses the rest.
    let tablet_sets = plan
        .tablet_users
        .iter()
        .map(|&i| pb::IdentifierSet {
            identifiers: vec![
                identifier(
                    pb::IdentifierType::CustomerId,
                    &customers[i as usize].customer_id,
                ),
                identifier(pb::IdentifierType::DeviceId, &plan.family_tablet),
            ],
        })
        .collect();
    let tablet_results = batch_resolve(&mut client, tablet_sets).await?;
    let mut refused_tablet_users = Vec::new();
    for (&i, r) in plan.tablet_users.iter().zip(&tablet_results) {
        tally.merges_on_tablet += tally.count(r);
        if !r.erased {
            profile_of[i as usize] = r.profile_id.clone();
        }
        if !r.refused_links.is_empty() {
            refused_tablet_users.push(i);
        }
    }

    // Merges may have moved customers onto other survivors: look every profile up again.
    let profiles = fetch_profiles(&mut client, profile_of.iter().cloned()).await?;
    let survivor = |i: usize| profiles.get(&profile_of[i]).map(|p| p.profile_id.clone());

    // 5. Traits and consent, written once per profile (by its first customer) and only
    //    where they differ, so re-running records nothing new.
    let mut owner: BTreeMap<String, usize> = BTreeMap::new();
    for i in 0..customers.len() {
        if let Some(id) = survivor(i) {
            owner.entry(id).or_insert(i);
        }
    }
    let mut writes = JoinSet::new();
    for (profile_id, &i) in &owner {
        let c = &customers[i];
        let Some(current) = profiles.get(profile_id) else {
            continue;
        };
        let traits = c.traits();
        let traits_changed = traits.iter().any(|(k, v)| current.traits.get(k) != Some(v));
        let consents: Vec<DemoConsent> =
            pending_consents(c, current).into_iter().cloned().collect();
        tally.traits_written += usize::from(traits_changed);
        tally.traits_unchanged += usize::from(!traits_changed);
        tally.consents_written += consents.len();
        tally.consents_unchanged += c.consents.len() - consents.len();
        if !traits_changed && consents.is_empty() {
            continue;
        }
        let mut client = client.clone();
        let profile_id = profile_id.clone();
        writes.spawn(async move {
            if traits_changed {
                client
                    .update_traits(pb::UpdateTraitsRequest {
                        profile_id: profile_id.clone(),
                        set: traits.into_iter().collect(),
                        remove: Vec::new(),
                    })
                    .await?;
            }
            for d in consents {
                client
                    .set_consent(pb::SetConsentRequest {
                        profile_id: profile_id.clone(),
                        consent: Some(pb::Consent {
                            purpose: d.purpose as i32,
                            status: d.status as i32,
                            decided_at: Some(Timestamp {
                                seconds: now - d.seconds_ago,
                                nanos: 0,
                            }),
                            source: d.source.to_string(),
                        }),
                    })
                    .await?;
            }
            Ok::<(), tonic::Status>(())
        });
        while writes.len() >= WRITES_IN_FLIGHT {
            if let Some(done) = writes.join_next().await {
                done.context("a demo write task failed")??;
            }
        }
    }
    while let Some(done) = writes.join_next().await {
        done.context("a demo write task failed")??;
    }

    // 6. Orders, refunds and engagement, each exactly once thanks to the idempotency keys.
    let deltas: Vec<pb::AggregateDelta> = customers
        .iter()
        .filter_map(|c| Some((c, survivor(c.index as usize)?)))
        .flat_map(|(c, id)| {
            c.events
                .iter()
                .map(move |e| delta(e, c.market.currency(), &id, now))
        })
        .collect();
    apply_aggregates(&mut client, deltas, &mut tally).await?;

    // Report.
    let live: BTreeSet<String> = (0..customers.len()).filter_map(survivor).collect();
    let tablet = plan.tablet_users.first().and_then(|&i| {
        let p = profiles.get(&profile_of[i as usize])?;
        let customers_fused = p
            .identifiers
            .iter()
            .filter(|id| id.r#type == pb::IdentifierType::CustomerId as i32)
            .count();
        Some((p.profile_id.clone(), customers_fused))
    });
    let examples = pick_examples(&plan, &profile_of, &refused_tablet_users);
    let example_profiles = fetch_profiles(
        &mut client,
        examples.iter().map(|(_, i)| profile_of[*i].clone()),
    )
    .await?;
    let examples: Vec<(&str, &DemoCustomer, &pb::Profile)> = examples
        .iter()
        .filter_map(|(label, i)| {
            Some((
                *label,
                &customers[*i],
                example_profiles.get(&profile_of[*i])?,
            ))
        })
        .collect();
    let report = Report {
        plan: &plan,
        endpoint: &options.endpoint,
        tally: &tally,
        live_profiles: live.len(),
        tablet,
        examples,
    };
    match options.output {
        OutputFormat::Json => emit(&format!(
            "{}\n",
            serde_json::to_string_pretty(&report.to_json())?
        )),
        OutputFormat::Human => emit(&report.to_text()),
    }
}

/// What `clientele demo` prints.
struct Report<'a> {
    plan: &'a DemoPlan,
    endpoint: &'a str,
    tally: &'a Tally,
    live_profiles: usize,
    /// The family tablet's profile and how many customer ids it fused.
    tablet: Option<(String, usize)>,
    /// (label, customer, current profile).
    examples: Vec<(&'a str, &'a DemoCustomer, &'a pb::Profile)>,
}

impl Report<'_> {
    fn to_json(&self) -> serde_json::Value {
        let t = self.tally;
        json!({
            "seed": self.plan.seed,
            "customers": self.plan.customers.len(),
            "profiles_created": t.created,
            "live_profiles": self.live_profiles,
            "merges_at_login": t.merges_at_login,
            "merges_on_family_tablet": t.merges_on_tablet,
            "refused_links": t.refused_links,
            "skipped_erased": t.erased_skipped,
            "traits_written": t.traits_written,
            "consents_written": t.consents_written,
            "aggregates_applied": t.aggregates_applied,
            "aggregates_duplicate": t.aggregates_duplicate,
            "aggregates_unknown_profile": t.aggregates_unknown_profile,
            "family_tablet_profile_id": self.tablet.as_ref().map(|t| &t.0),
            "examples": self.examples.iter().map(|(label, c, p)| json!({
                "label": label,
                "customer_id": c.customer_id,
                "profile": json::profile(p),
            })).collect::<Vec<_>>(),
        })
    }

    fn to_text(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = self.write_text(&mut out);
        out
    }

    fn write_text(&self, out: &mut String) -> std::fmt::Result {
        let t = self.tally;
        writeln!(
            out,
            "Demo seeded: {} customers (seed {}) on {}",
            self.plan.customers.len(),
            self.plan.seed,
            self.endpoint
        )?;
        writeln!(out, "  profiles created     {}", t.created)?;
        writeln!(
            out,
            "  merges performed     {} ({} anonymous visitors merged at login, {} via the family tablet)",
            t.merges_at_login + t.merges_on_tablet,
            t.merges_at_login,
            t.merges_on_tablet
        )?;
        writeln!(
            out,
            "  refused links        {} (over-merge guard: the family tablet is shared by {} customers)",
            t.refused_links,
            self.plan.tablet_users.len()
        )?;
        if let Some((id, fused)) = &self.tablet {
            writeln!(
                out,
                "  family tablet        profile {id} holds {fused} customer ids; the guard refused the rest"
            )?;
        }
        writeln!(out, "  live demo profiles   {}", self.live_profiles)?;
        writeln!(
            out,
            "  traits written       {} profiles ({} already up to date)",
            t.traits_written, t.traits_unchanged
        )?;
        writeln!(
            out,
            "  consents recorded    {} ({} already current)",
            t.consents_written, t.consents_unchanged
        )?;
        writeln!(
            out,
            "  aggregates applied   {} ({} duplicates ignored by idempotency key)",
            t.aggregates_applied, t.aggregates_duplicate
        )?;
        if t.aggregates_unknown_profile > 0 || t.erased_skipped > 0 {
            writeln!(
                out,
                "  skipped              {} identifier sets and {} deltas of erased people",
                t.erased_skipped, t.aggregates_unknown_profile
            )?;
        }
        if t.created == 0 && t.aggregates_applied == 0 {
            writeln!(
                out,
                "  (this seed was already loaded: nothing was double counted)"
            )?;
        }
        for (label, c, p) in &self.examples {
            writeln!(out)?;
            writeln!(out, "— {label} ({})", c.customer_id)?;
            out.push_str(&render::profile(p));
        }
        if let Some((_, _, p)) = self.examples.first() {
            writeln!(out)?;
            writeln!(out, "Try: clientele profiles get {}", p.profile_id)?;
        }
        Ok(())
    }
}

/// Up to three customers worth showing: one who browsed anonymously and was merged at login,
/// a VIP, and a family-tablet user whose tablet link was refused.
fn pick_examples(
    plan: &DemoPlan,
    profile_of: &[String],
    refused_tablet_users: &[u32],
) -> Vec<(&'static str, usize)> {
    let has_profile = |i: usize| profile_of.get(i).is_some_and(|p| !p.is_empty());
    let on_tablet = |i: usize| plan.tablet_users.iter().any(|&t| t as usize == i);
    let mut examples = Vec::new();
    if let Some(c) = plan.customers.iter().find(|c| {
        c.anonymous_id.is_some() && has_profile(c.index as usize) && !on_tablet(c.index as usize)
    }) {
        examples.push((
            "browsed anonymously, then logged in: profiles merged",
            c.index as usize,
        ));
    }
    if let Some(c) = plan.customers.iter().find(|c| {
        c.vip
            && c.anonymous_id.is_none()
            && has_profile(c.index as usize)
            && !on_tablet(c.index as usize)
    }) {
        examples.push(("a VIP customer", c.index as usize));
    }
    if let Some(&i) = refused_tablet_users
        .iter()
        .find(|&&i| has_profile(i as usize))
    {
        examples.push((
            "logged in on the family tablet: link refused by the over-merge guard",
            i as usize,
        ));
    }
    examples
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_same_seed_generates_the_same_plan() {
        assert_eq!(DemoPlan::generate(7, 50), DemoPlan::generate(7, 50));
    }

    #[test]
    fn different_seeds_generate_different_customers() {
        let a = DemoPlan::generate(1, 20);
        let b = DemoPlan::generate(2, 20);
        assert_ne!(a.customers, b.customers);
        assert_ne!(a.customers[0].customer_id, b.customers[0].customer_id);
    }

    #[test]
    fn a_customer_is_the_same_whatever_the_customer_count() {
        let small = DemoPlan::generate(7, 10);
        let large = DemoPlan::generate(7, 300);
        assert_eq!(small.customers[..], large.customers[..10]);
    }

    #[test]
    fn idempotency_keys_are_unique_and_derived_from_the_seed() {
        let plan = DemoPlan::generate(42, 300);
        let keys: Vec<&str> = plan
            .customers
            .iter()
            .flat_map(|c| c.browsing.iter().chain(&c.events))
            .map(|e| e.idempotency_key.as_str())
            .collect();
        let unique: BTreeSet<&str> = keys.iter().copied().collect();
        assert_eq!(keys.len(), unique.len());
        assert!(
            keys.iter()
                .all(|k| k.starts_with("demo-s42-c") && k.len() <= 128)
        );
        assert_eq!(
            idempotency_key(42, 3, "order", 1),
            "demo-s42-c00003-order-1"
        );
    }

    #[test]
    fn identifiers_are_unique_per_customer() {
        let plan = DemoPlan::generate(7, 2_000);
        for field in [
            |c: &DemoCustomer| c.customer_id.clone(),
            |c: &DemoCustomer| c.email.clone(),
            |c: &DemoCustomer| c.phone.clone(),
        ] {
            let values: BTreeSet<String> = plan.customers.iter().map(field).collect();
            assert_eq!(values.len(), plan.customers.len());
        }
    }

    #[test]
    fn the_plan_exercises_merging_and_the_over_merge_guard() {
        let plan = DemoPlan::generate(7, 200);
        let browsers = plan
            .customers
            .iter()
            .filter(|c| c.anonymous_id.is_some())
            .count();
        assert!(browsers > 20, "{browsers} anonymous browsers");
        assert!(plan.customers.iter().any(|c| c.device_id.is_some()));
        assert_eq!(plan.tablet_users.len(), FAMILY_TABLET_USERS);
        let distinct: BTreeSet<u32> = plan.tablet_users.iter().copied().collect();
        assert_eq!(distinct.len(), FAMILY_TABLET_USERS);
        assert!(plan.tablet_users.iter().all(|&i| i < 200));
    }

    #[test]
    fn small_plans_share_the_tablet_among_everyone() {
        let plan = DemoPlan::generate(7, 3);
        let mut users = plan.tablet_users.clone();
        users.sort_unstable();
        assert_eq!(users, vec![0, 1, 2]);
    }

    #[test]
    fn traits_carry_no_raw_personal_data() {
        let plan = DemoPlan::generate(7, 20);
        for c in &plan.customers {
            let names: Vec<String> = c.traits().into_keys().collect();
            assert_eq!(names, vec!["favourite_category", "signup_channel", "vip"]);
        }
    }

    #[test]
    fn revocations_follow_an_earlier_grant() {
        let plan = DemoPlan::generate(7, 300);
        let mut revoked = 0;
        for c in &plan.customers {
            for (n, d) in c.consents.iter().enumerate() {
                if d.status == pb::ConsentStatus::Revoked {
                    revoked += 1;
                    let grant = &c.consents[n - 1];
                    assert_eq!(grant.purpose, d.purpose);
                    assert_eq!(grant.status, pb::ConsentStatus::Granted);
                    assert!(grant.seconds_ago > d.seconds_ago);
                }
            }
        }
        assert!(revoked > 0);
    }

    #[test]
    fn consents_already_current_are_not_sent_again() {
        let c = generate_customer(7, 0);
        let fresh = pb::Profile::default();
        assert_eq!(pending_consents(&c, &fresh).len(), c.consents.len());
        let mut final_state: BTreeMap<i32, i32> = BTreeMap::new();
        for d in &c.consents {
            final_state.insert(d.purpose as i32, d.status as i32);
        }
        let seeded = pb::Profile {
            consents: final_state
                .into_iter()
                .map(|(purpose, status)| pb::Consent {
                    purpose,
                    status,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        assert!(pending_consents(&c, &seeded).is_empty());
    }

    #[test]
    fn deltas_carry_money_in_the_customer_currency() {
        let event = DemoEvent {
            idempotency_key: "k".into(),
            seconds_ago: 10,
            orders: 1,
            refunds: 0,
            gross_minor: 15_000,
            refunded_minor: 0,
            engagement: vec![("product_viewed", 2)],
        };
        let d = delta(&event, "KRW", "p", 1_000);
        assert_eq!(d.occurred_at.unwrap().seconds, 990);
        assert_eq!(d.gross.unwrap().currency, "KRW");
        assert!(d.refunded.is_none());
        assert_eq!(d.engagement["product_viewed"], 2);
    }
}
