//! `clientele offers list|create|decide|issue|redeem` and
//! `clientele points balance|ledger|adjust|redeem`: the offer catalogue, decisions and codes,
//! and the loyalty points ledger, through OfferService.

use anyhow::{Context, bail};
use clientele_proto::v1 as pb;
use clientele_proto::v1::offer_service_client::OfferServiceClient;
use serde_json::json;

use crate::client::{ConnectionOptions, OutputFormat, authed_channel, emit};

/// Offer subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum OffersCommand {
    /// List the catalogue (ACTIVE and PAUSED unless `--all`).
    List {
        /// Include archived offers.
        #[arg(long)]
        all: bool,
    },
    /// Create an offer from flags.
    Create(Box<CreateArgs>),
    /// Rank the offers a profile is eligible for on a channel, with reasons.
    Decide {
        /// Profile id (UUID).
        profile_id: String,
        /// Channel: web, app, pos, email, sms, push.
        #[arg(long, default_value = "web", value_parser = parse_channel)]
        channel: i32,
        /// Store id (required for pos).
        #[arg(long, default_value = "")]
        store: String,
        /// Also show why the other offers were rejected.
        #[arg(long)]
        explain: bool,
        /// Request attribute for rule expressions, read there as `trait("KEY")`
        /// (repeatable), e.g. `--attr cart_value=4599`.
        #[arg(long = "attr", value_name = "KEY=VALUE", value_parser = crate::profiles::parse_trait_assignment)]
        attributes: Vec<(String, pb::Value)>,
    },
    /// Issue an offer to a profile with a unique code.
    Issue {
        /// Profile id (UUID).
        profile_id: String,
        /// Offer id.
        offer_id: String,
        /// Channel the offer is delivered on.
        #[arg(long, default_value = "web", value_parser = parse_channel)]
        channel: i32,
        /// Idempotency key (default: a new UUID).
        #[arg(long)]
        key: Option<String>,
    },
    /// Redeem a code once.
    Redeem {
        /// The code (case and hyphens ignored).
        code: String,
        /// Order id the code is used on.
        #[arg(long, default_value = "")]
        order: String,
        /// Channel.
        #[arg(long, default_value = "web", value_parser = parse_channel)]
        channel: i32,
        /// Idempotency key (default: a new UUID).
        #[arg(long)]
        key: Option<String>,
    },
}

/// Arguments of `offers create`.
#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// Offer id (`[a-z0-9][a-z0-9_-]*`).
    pub offer_id: String,
    /// Display name.
    #[arg(long)]
    pub name: String,
    /// Benefit: `percent:1500` (basis points), `fixed:1000:EUR`, `bonus:500`,
    /// `multiplier:20000`, `free-shipping`, `perk:TITLE` or `coupon:CODE`.
    #[arg(long, value_parser = parse_benefit)]
    pub benefit: pb::offer::Benefit,
    /// Only profiles in this segment (repeatable).
    #[arg(long = "segment")]
    pub segments: Vec<String>,
    /// Only profiles for which this rule expression is true, e.g.
    /// `orders >= 3 and trait("vip") == true` (checked by the server when created).
    #[arg(long)]
    pub rule: Option<String>,
    /// Ranking priority 0..=1000.
    #[arg(long, default_value_t = 0)]
    pub priority: i32,
    /// Expected value as `amount_minor:CUR`.
    #[arg(long, default_value = "0:EUR", value_parser = parse_money)]
    pub expected_value: pb::Money,
    /// Days an issued code stays valid.
    #[arg(long, default_value_t = 30)]
    pub validity_days: i64,
    /// Maximum codes per profile.
    #[arg(long)]
    pub per_profile_cap: Option<i32>,
    /// Maximum codes issued in total.
    #[arg(long)]
    pub budget: Option<i64>,
    /// A service offer that needs no marketing consent.
    #[arg(long)]
    pub transactional: bool,
    /// Deliver to profiles in the global holdout too.
    #[arg(long)]
    pub holdout_exempt: bool,
}

/// Points subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum PointsCommand {
    /// Balance, batches and tier of a profile.
    Balance {
        /// Profile id (UUID).
        profile_id: String,
    },
    /// Ledger entries, newest first.
    Ledger {
        /// Profile id (UUID).
        profile_id: String,
        /// At most this many entries.
        #[arg(long, default_value_t = 50)]
        limit: i32,
    },
    /// Credit (positive) or debit (negative) points with a reason.
    Adjust {
        /// Profile id (UUID).
        profile_id: String,
        /// Signed points.
        #[arg(allow_hyphen_values = true)]
        points: i64,
        /// Why, in words.
        #[arg(long)]
        note: String,
        /// Reason: goodwill, correction, migration, fraud, other.
        #[arg(long, default_value = "other", value_parser = parse_reason)]
        reason: i32,
        /// Who is adjusting.
        #[arg(long, default_value = "cli")]
        actor: String,
        /// Idempotency key (default: a new UUID).
        #[arg(long)]
        key: Option<String>,
    },
    /// Spend points.
    Redeem {
        /// Profile id (UUID).
        profile_id: String,
        /// Points to spend.
        points: i64,
        /// What they are spent on.
        #[arg(long)]
        reference: String,
        /// Idempotency key (default: a new UUID).
        #[arg(long)]
        key: Option<String>,
    },
}

/// A channel name → `pb::Channel`.
pub fn parse_channel(s: &str) -> Result<i32, String> {
    let c = match s.to_ascii_lowercase().as_str() {
        "web" => pb::Channel::Web,
        "app" => pb::Channel::App,
        "pos" => pb::Channel::Pos,
        "email" => pb::Channel::Email,
        "sms" => pb::Channel::Sms,
        "push" => pb::Channel::Push,
        _ => return Err(format!("`{s}`: expected web, app, pos, email, sms or push")),
    };
    Ok(c as i32)
}

fn parse_reason(s: &str) -> Result<i32, String> {
    let r = match s.to_ascii_lowercase().as_str() {
        "goodwill" => pb::AdjustmentReason::Goodwill,
        "correction" => pb::AdjustmentReason::Correction,
        "migration" => pb::AdjustmentReason::Migration,
        "fraud" => pb::AdjustmentReason::Fraud,
        "other" => pb::AdjustmentReason::Other,
        _ => {
            return Err(format!(
                "`{s}`: expected goodwill, correction, migration, fraud or other"
            ));
        }
    };
    Ok(r as i32)
}

/// `amount_minor:CUR` → money.
pub fn parse_money(s: &str) -> Result<pb::Money, String> {
    let (a, c) = s
        .split_once(':')
        .ok_or_else(|| format!("`{s}`: expected amount_minor:CURRENCY"))?;
    Ok(pb::Money {
        amount_minor: a.parse().map_err(|_| format!("`{a}` is not an integer"))?,
        currency: c.to_ascii_uppercase(),
    })
}

/// A benefit spec → the benefit.
pub fn parse_benefit(s: &str) -> Result<pb::offer::Benefit, String> {
    use pb::offer::Benefit as B;
    let (kind, rest) = s.split_once(':').unwrap_or((s, ""));
    let int = |v: &str| {
        v.parse::<i64>()
            .map_err(|_| format!("`{v}` is not an integer"))
    };
    Ok(match kind {
        "percent" => B::PercentageDiscount(pb::PercentageDiscount {
            percent_bps: i32::try_from(int(rest)?).map_err(|e| e.to_string())?,
            ..Default::default()
        }),
        "fixed" => B::FixedDiscount(pb::FixedDiscount {
            amount: Some(parse_money(rest)?),
            min_basket: None,
        }),
        "bonus" => B::BonusPoints(pb::BonusPoints { points: int(rest)? }),
        "multiplier" => B::PointsMultiplier(pb::PointsMultiplier {
            multiplier_bps: i32::try_from(int(rest)?).map_err(|e| e.to_string())?,
            max_bonus_points: 0,
        }),
        "free-shipping" => B::FreeShipping(pb::FreeShipping { min_basket: None }),
        "perk" if !rest.is_empty() => B::Perk(pb::Perk {
            title: rest.into(),
            fulfilment_instructions: String::new(),
        }),
        "coupon" if !rest.is_empty() => B::Coupon(pb::Coupon { code: rest.into() }),
        _ => return Err(format!("`{s}`: unknown benefit")),
    })
}

fn key(k: Option<String>) -> String {
    k.unwrap_or_else(uuid_like)
}

/// A random 32-hex-digit key (no uuid dependency in the CLI).
fn uuid_like() -> String {
    use rand::Rng;
    let mut rng = rand::thread_rng();
    (0..16)
        .map(|_| format!("{:02x}", rng.r#gen::<u8>()))
        .collect()
}

fn enum_name<E: TryFrom<i32>>(v: i32, name: impl Fn(&E) -> &'static str) -> String {
    E::try_from(v).map_or_else(|_| v.to_string(), |e| name(&e).to_string())
}

fn offer_json(o: &pb::Offer) -> serde_json::Value {
    json!({
        "offer_id": o.offer_id,
        "display_name": o.display_name,
        "kind": enum_name(o.kind, pb::OfferKind::as_str_name),
        "status": enum_name(o.status, pb::OfferStatus::as_str_name),
        "priority": o.priority,
        "version": o.version,
        "issued": o.usage.as_ref().map_or(0, |u| u.issued),
        "redeemed": o.usage.as_ref().map_or(0, |u| u.redeemed),
    })
}

fn issued_json(i: &pb::IssuedOffer) -> serde_json::Value {
    json!({
        "issue_id": i.issue_id,
        "code": i.code,
        "offer_id": i.offer_id,
        "profile_id": i.profile_id,
        "status": enum_name(i.status, pb::IssuedOfferStatus::as_str_name),
        "valid_until": crate::json::timestamp(i.valid_until.as_ref()),
    })
}

fn entry_json(e: &pb::LedgerEntry) -> serde_json::Value {
    json!({
        "entry_id": e.entry_id,
        "kind": enum_name(e.kind, pb::LedgerEntryKind::as_str_name),
        "points": e.points,
        "available_balance_after": e.available_balance_after,
        "created_at": crate::json::timestamp(e.created_at.as_ref()),
        "order_id": e.order_id,
        "note": e.note,
        "reference": e.reference,
    })
}

fn print(
    options: &ConnectionOptions,
    value: &serde_json::Value,
    human: String,
) -> anyhow::Result<()> {
    match options.output {
        OutputFormat::Json => emit(&format!("{}\n", serde_json::to_string_pretty(value)?)),
        OutputFormat::Human => emit(&human),
    }
}

/// Runs an offers subcommand.
pub async fn run(command: OffersCommand, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client = OfferServiceClient::new(authed_channel(options)?);
    match command {
        OffersCommand::List { all } => {
            let mut statuses = Vec::new();
            if all {
                statuses = vec![
                    pb::OfferStatus::Active as i32,
                    pb::OfferStatus::Paused as i32,
                    pb::OfferStatus::Archived as i32,
                ];
            }
            let mut offers = Vec::new();
            let mut token = String::new();
            loop {
                let r = client
                    .list_offers(pb::ListOffersRequest {
                        statuses: statuses.clone(),
                        page_size: 500,
                        page_token: token.clone(),
                        ..Default::default()
                    })
                    .await?
                    .into_inner();
                offers.extend(r.offers);
                if r.next_page_token.is_empty() {
                    break;
                }
                token = r.next_page_token;
            }
            let mut text = String::new();
            for o in &offers {
                let usage = o.usage.clone().unwrap_or_default();
                text.push_str(&format!(
                    "{:<24} {:<28} {:<20} prio {:>4}  issued {:>6}  redeemed {:>6}\n",
                    o.offer_id,
                    enum_name(o.kind, pb::OfferKind::as_str_name),
                    enum_name(o.status, pb::OfferStatus::as_str_name),
                    o.priority,
                    usage.issued,
                    usage.redeemed,
                ));
            }
            print(
                options,
                &json!(offers.iter().map(offer_json).collect::<Vec<_>>()),
                text,
            )
        }
        OffersCommand::Create(a) => {
            let offer = pb::Offer {
                offer_id: a.offer_id.clone(),
                display_name: a.name.clone(),
                benefit: Some(a.benefit.clone()),
                eligibility: (!a.segments.is_empty() || a.rule.is_some()).then(|| {
                    pb::Eligibility {
                        include_segments: a
                            .segments
                            .iter()
                            .map(|s| pb::SegmentRef {
                                segment_id: s.clone(),
                                cluster_index: None,
                            })
                            .collect(),
                        rule_expression: a.rule.clone().unwrap_or_default(),
                        ..Default::default()
                    }
                }),
                starts_at: Some(prost_types::Timestamp {
                    seconds: chrono::Utc::now().timestamp(),
                    nanos: 0,
                }),
                code_validity: Some(prost_types::Duration {
                    seconds: a.validity_days * 86_400,
                    nanos: 0,
                }),
                priority: a.priority,
                expected_value: Some(a.expected_value.clone()),
                per_profile_cap: a.per_profile_cap,
                budget: a.budget.map(|n| pb::Budget {
                    limit: Some(pb::budget::Limit::MaxIssued(n)),
                }),
                holdout_exempt: a.holdout_exempt,
                transactional: a.transactional,
                ..Default::default()
            };
            let o = client
                .create_offer(pb::CreateOfferRequest { offer: Some(offer) })
                .await?
                .into_inner()
                .offer
                .context("empty response")?;
            print(
                options,
                &offer_json(&o),
                format!("created offer {} (version {})\n", o.offer_id, o.version),
            )
        }
        OffersCommand::Decide {
            profile_id,
            channel,
            store,
            explain,
            attributes,
        } => {
            let d = client
                .decide(pb::DecideRequest {
                    profile_id,
                    channel,
                    store_id: store,
                    explain,
                    attributes: attributes.into_iter().collect(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut text = String::new();
            if d.in_holdout {
                text.push_str("profile is in the global holdout\n");
            }
            for r in &d.offers {
                let id = r
                    .offer
                    .as_ref()
                    .map(|o| o.offer_id.as_str())
                    .unwrap_or_default();
                let reasons: Vec<String> = r
                    .reasons
                    .iter()
                    .map(|x| {
                        let name = enum_name(x.code, pb::EligibilityReasonCode::as_str_name);
                        if x.detail.is_empty() {
                            name
                        } else {
                            format!("{name}: {}", x.detail)
                        }
                    })
                    .collect();
                text.push_str(&format!("{:>2}. {id}  ({})\n", r.rank, reasons.join(", ")));
            }
            if d.offers.is_empty() {
                text.push_str("no eligible offers\n");
            }
            for r in &d.rejected {
                let why: Vec<String> = r
                    .rejections
                    .iter()
                    .map(|x| {
                        format!(
                            "{}: {}",
                            enum_name(x.code, pb::RejectionCode::as_str_name),
                            x.detail
                        )
                    })
                    .collect();
                text.push_str(&format!("  rejected {}: {}\n", r.offer_id, why.join("; ")));
            }
            let value = json!({
                "decision_id": d.decision_id,
                "in_holdout": d.in_holdout,
                "offers": d.offers.iter().map(|r| json!({
                    "rank": r.rank,
                    "offer_id": r.offer.as_ref().map(|o| o.offer_id.clone()),
                    "reasons": r.reasons.iter().map(|x| enum_name(x.code, pb::EligibilityReasonCode::as_str_name)).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
                "rejected": d.rejected.iter().map(|r| json!({
                    "offer_id": r.offer_id,
                    "rejections": r.rejections.iter().map(|x| json!({
                        "code": enum_name(x.code, pb::RejectionCode::as_str_name),
                        "detail": x.detail,
                    })).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            });
            print(options, &value, text)
        }
        OffersCommand::Issue {
            profile_id,
            offer_id,
            channel,
            key: k,
        } => {
            let i = client
                .issue_offer(pb::IssueOfferRequest {
                    profile_id,
                    offer_id,
                    idempotency_key: key(k),
                    channel,
                    ..Default::default()
                })
                .await?
                .into_inner()
                .issued
                .context("empty response")?;
            print(
                options,
                &issued_json(&i),
                format!("issued {} code {}\n", i.offer_id, i.code),
            )
        }
        OffersCommand::Redeem {
            code,
            order,
            channel,
            key: k,
        } => {
            let r = client
                .redeem_offer(pb::RedeemOfferRequest {
                    code,
                    idempotency_key: key(k),
                    order_id: order,
                    channel,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let i = r.issued.context("empty response")?;
            let note = if r.replayed {
                " (already redeemed by this request)"
            } else {
                ""
            };
            print(
                options,
                &issued_json(&i),
                format!("redeemed {}{note}\n", i.code),
            )
        }
    }
}

/// Runs a points subcommand.
pub async fn run_points(command: PointsCommand, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client = OfferServiceClient::new(authed_channel(options)?);
    match command {
        PointsCommand::Balance { profile_id } => {
            let b = client
                .get_balance(pb::GetBalanceRequest { profile_id })
                .await?
                .into_inner();
            let tier = b.tier.clone().unwrap_or_default();
            let mut text = format!(
                "available {} points (earned {}, redeemed {}), tier {}",
                b.available_points,
                b.lifetime_earned_points,
                b.lifetime_redeemed_points,
                tier.tier_id
            );
            if !tier.next_tier_id.is_empty() {
                text.push_str(&format!(
                    ", {} to {}",
                    tier.value_to_next_tier, tier.next_tier_id
                ));
            }
            text.push('\n');
            for batch in &b.batches {
                text.push_str(&format!(
                    "  {:>8} of {:>8}  earned {}  expires {}\n",
                    batch.points_remaining,
                    batch.points_earned,
                    crate::render::timestamp(batch.earned_at.as_ref()),
                    crate::render::timestamp(batch.expires_at.as_ref()),
                ));
            }
            let value = json!({
                "profile_id": b.profile_id,
                "available_points": b.available_points,
                "lifetime_earned_points": b.lifetime_earned_points,
                "lifetime_redeemed_points": b.lifetime_redeemed_points,
                "points_expiring_30d": b.points_expiring_30d,
                "tier_id": tier.tier_id,
                "next_tier_id": tier.next_tier_id,
                "value_to_next_tier": tier.value_to_next_tier,
            });
            print(options, &value, text)
        }
        PointsCommand::Ledger { profile_id, limit } => {
            let r = client
                .list_ledger_entries(pb::ListLedgerEntriesRequest {
                    profile_id,
                    page_size: limit,
                    ..Default::default()
                })
                .await?
                .into_inner();
            let mut text = String::new();
            for e in &r.entries {
                text.push_str(&format!(
                    "{}  {:<32} {:>+9}  → {:>9}  {}{}\n",
                    crate::render::timestamp(e.created_at.as_ref()),
                    enum_name(e.kind, pb::LedgerEntryKind::as_str_name),
                    e.points,
                    e.available_balance_after,
                    e.order_id,
                    e.note,
                ));
            }
            print(
                options,
                &json!(r.entries.iter().map(entry_json).collect::<Vec<_>>()),
                text,
            )
        }
        PointsCommand::Adjust {
            profile_id,
            points,
            note,
            reason,
            actor,
            key: k,
        } => {
            if points == 0 {
                bail!("points must not be 0");
            }
            let r = client
                .adjust_points(pb::AdjustPointsRequest {
                    profile_id,
                    points,
                    reason,
                    note,
                    actor,
                    idempotency_key: key(k),
                    expires_at: None,
                })
                .await?
                .into_inner();
            let e = r.entry.context("empty response")?;
            print(
                options,
                &entry_json(&e),
                format!(
                    "adjusted {:+}; available {}\n",
                    e.points, r.available_points
                ),
            )
        }
        PointsCommand::Redeem {
            profile_id,
            points,
            reference,
            key: k,
        } => {
            let r = client
                .redeem_points(pb::RedeemPointsRequest {
                    profile_id,
                    points,
                    idempotency_key: key(k),
                    reference,
                    channel: pb::Channel::Web as i32,
                    actor: "cli".into(),
                    ..Default::default()
                })
                .await?
                .into_inner();
            let e = r.entry.context("empty response")?;
            print(
                options,
                &entry_json(&e),
                format!("redeemed {}; available {}\n", -e.points, r.available_points),
            )
        }
    }
}
