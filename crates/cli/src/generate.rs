//! `clientele generate`: a realistic synthetic customer base and event history, written as
//! JSON Lines of `clientele.v1.Event` (the mapping in [`crate::event_json`], which
//! `clientele import --format jsonl` reads) and/or a CSV of order lines (which
//! `clientele import --format csv` reads with no `--map` flags).
//!
//! The model, per customer (each drawing from its own ChaCha stream, so customer `i` is the
//! same whatever `--customers` is):
//! - acquisition on a uniform day of the period; some browse anonymously (a cookie id) for a
//!   few days before signing up, and signing up links the cookie to the account;
//! - a repeat-purchase process with churn, BG/NBD-like: a purchase rate λ ~ Gamma(0.9, 1/30)
//!   per day and a dropout probability p ~ Beta(1.2, 4) after each purchase; about a fifth of
//!   the sign-ups never buy;
//! - heavy-tailed spend: a Pareto(1.6) customer value multiplier times lognormal unit prices
//!   around each category's base price;
//! - a Dirichlet(0.6) mix over [`CATEGORIES`] that picks what they view and buy;
//! - behaviour correlated with purchasing: every order comes with product views and a cart
//!   update (and an app open for app users), browse-only sessions arrive at 1.5 λ while the
//!   customer is active (and fade out after they churn), some carts are abandoned, and weekly
//!   campaign emails are opened and clicked more by active customers;
//! - identity quirks: three customers in every 97 share a family tablet, about 8% change their
//!   email part-way through their history, app users carry their own device id, store orders
//!   carry only the customer id.
//!
//! Everything is a pure function of `(seed, customer index, days, end date, currency)`:
//! event ids are `gen-s<seed>-c<index>-<n>`, so generating again gives byte-identical files and
//! importing them again is all duplicates.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context as _, bail};
use chrono::{NaiveDate, TimeZone as _, Utc};
use clap::Args;
use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;
use rand::{Rng, SeedableRng as _};
use rand_chacha::ChaCha8Rng;
use rand_distr::{Beta, Dirichlet, Distribution as _, Exp, Gamma, LogNormal, Pareto};

use crate::event_json::{event_to_json, timestamp_text};
use crate::money::minor_unit_digits;

/// Product categories, with each one's typical unit price in hundredths of the currency's
/// major unit (scaled for currencies with other minor units).
pub const CATEGORIES: [(&str, i64); 8] = [
    ("apparel", 3_500),
    ("beauty", 2_200),
    ("electronics", 12_000),
    ("home", 4_500),
    ("grocery", 900),
    ("sports", 5_000),
    ("books", 1_500),
    ("toys", 2_500),
];
const DAY: i64 = 86_400;
/// Customers per family tablet block: customers `97k`, `97k+1`, `97k+2` share tablet `k`.
const TABLET_BLOCK: u32 = 97;
const TABLET_USERS: u32 = 3;
const STORES: u32 = 12;
/// The header of the generated CSV: exactly the field names `clientele import` maps by default.
pub const CSV_HEADER: [&str; 8] = [
    "customer_id",
    "occurred_at",
    "order_id",
    "sku",
    "category",
    "quantity",
    "amount",
    "currency",
];

/// Arguments of `clientele generate`.
#[derive(Debug, Args)]
pub struct GenerateArgs {
    /// Number of customers.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u32).range(1..=10_000_000))]
    pub customers: u32,
    /// Length of the history in days, ending at --end-date.
    #[arg(long, default_value_t = 365, value_parser = clap::value_parser!(u32).range(1..=3650))]
    pub days: u32,
    /// Seed; the same seed (and other flags) always produces identical files.
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// The (exclusive) last day of the history, YYYY-MM-DD (UTC). Fixed by default so that
    /// regenerating on another day gives the same files.
    #[arg(long, default_value = "2026-01-01")]
    pub end_date: NaiveDate,
    /// ISO 4217 currency of every price.
    #[arg(long, default_value = "USD")]
    pub currency: String,
    /// Write the events as JSON Lines to this file.
    #[arg(long, value_name = "PATH")]
    pub jsonl: Option<PathBuf>,
    /// Write the order lines (transactions) as CSV to this file.
    #[arg(long, value_name = "PATH")]
    pub csv: Option<PathBuf>,
}

/// What to generate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GeneratorConfig {
    /// The seed.
    pub seed: u64,
    /// Number of customers.
    pub customers: u32,
    /// Length of the history in days.
    pub days: u32,
    /// End of the history (exclusive), seconds since the epoch.
    pub end: i64,
    /// ISO 4217 code of every price.
    pub currency: String,
}

impl GeneratorConfig {
    /// `customers` customers over `days` days ending at 2026-01-01T00:00:00Z, in USD.
    pub fn new(seed: u64, customers: u32, days: u32) -> Self {
        Self {
            seed,
            customers,
            days,
            end: 1_767_225_600,
            currency: "USD".into(),
        }
    }

    fn start(&self) -> i64 {
        self.end - i64::from(self.days) * DAY
    }

    /// Unit price scale: category base prices are in hundredths of a major unit.
    fn price_scale(&self) -> f64 {
        10f64.powi(i32::try_from(minor_unit_digits(&self.currency)).unwrap_or(2)) / 100.0
    }
}

/// Summary figures of a generated data set.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct GeneratorStats {
    /// Customers generated.
    pub customers: u64,
    /// Events generated.
    pub events: u64,
    /// Completed orders.
    pub orders: u64,
    /// Refund events.
    pub refunds: u64,
    /// Customers with at least one order.
    pub buyers: u64,
    /// Customers with at least two orders.
    pub repeat_buyers: u64,
    /// Sum of order totals, minor units.
    pub revenue_minor: i64,
    /// Share of revenue held by the top 20% of customers by revenue (0..=1).
    pub top20_revenue_share: f64,
    /// Events per kind (payload field name).
    pub by_kind: BTreeMap<&'static str, u64>,
}

/// Accumulates [`GeneratorStats`] customer by customer.
#[derive(Debug, Default)]
pub struct StatsBuilder {
    stats: GeneratorStats,
    revenue_per_customer: Vec<i64>,
}

impl StatsBuilder {
    /// Adds one customer's events.
    pub fn add_customer(&mut self, events: &[pb::Event]) {
        let s = &mut self.stats;
        s.customers += 1;
        s.events += events.len() as u64;
        let mut orders = 0u64;
        let mut revenue = 0i64;
        for e in events {
            let kind = payload_name(e);
            *s.by_kind.entry(kind).or_default() += 1;
            match &e.payload {
                Some(pb::event::Payload::OrderCompleted(o)) => {
                    orders += 1;
                    revenue += o.total.as_ref().map_or(0, |m| m.amount_minor);
                }
                Some(pb::event::Payload::OrderRefunded(_)) => s.refunds += 1,
                _ => {}
            }
        }
        s.orders += orders;
        s.buyers += u64::from(orders >= 1);
        s.repeat_buyers += u64::from(orders >= 2);
        s.revenue_minor += revenue;
        self.revenue_per_customer.push(revenue);
    }

    /// The figures so far.
    pub fn finish(mut self) -> GeneratorStats {
        self.revenue_per_customer.sort_unstable_by(|a, b| b.cmp(a));
        let top = self.revenue_per_customer.len().div_ceil(5);
        let top_revenue: i64 = self.revenue_per_customer[..top].iter().sum();
        self.stats.top20_revenue_share = if self.stats.revenue_minor > 0 {
            top_revenue as f64 / self.stats.revenue_minor as f64
        } else {
            0.0
        };
        self.stats
    }
}

/// The payload field name of `event` ("order_completed"), "none" when unset.
pub fn payload_name(event: &pb::Event) -> &'static str {
    use pb::event::Payload as P;
    match &event.payload {
        Some(P::OrderCompleted(_)) => "order_completed",
        Some(P::OrderRefunded(_)) => "order_refunded",
        Some(P::ProductViewed(_)) => "product_viewed",
        Some(P::CartUpdated(_)) => "cart_updated",
        Some(P::CartAbandoned(_)) => "cart_abandoned",
        Some(P::Searched(_)) => "searched",
        Some(P::PageViewed(_)) => "page_viewed",
        Some(P::ScreenViewed(_)) => "screen_viewed",
        Some(P::AppOpened(_)) => "app_opened",
        Some(P::EmailOpened(_)) => "email_opened",
        Some(P::EmailClicked(_)) => "email_clicked",
        Some(P::PushClicked(_)) => "push_clicked",
        Some(P::ReviewSubmitted(_)) => "review_submitted",
        Some(P::SurveyResponded(_)) => "survey_responded",
        Some(P::Custom(_)) => "custom",
        None => "none",
    }
}

/// All events of all customers, customer by customer, each customer's in time order.
pub fn events(config: &GeneratorConfig) -> impl Iterator<Item = pb::Event> + '_ {
    (0..config.customers).flat_map(|i| customer_events(config, i))
}

/// The customer id of customer `index`.
pub fn customer_id(seed: u64, index: u32) -> String {
    format!("cust-s{seed}-{index:06}")
}

/// How one session is identified and where it happens.
#[derive(Debug, Clone)]
struct Session {
    source: &'static str,
    channel: pb::Channel,
    identifiers: Vec<pb::Identifier>,
    device: Option<pb::Device>,
    session_id: String,
}

fn identifier(kind: pb::IdentifierType, value: &str) -> pb::Identifier {
    pb::Identifier {
        r#type: kind as i32,
        value: value.to_string(),
        namespace: String::new(),
    }
}

/// One customer's fixed traits.
#[derive(Debug)]
struct Customer {
    index: u32,
    id: String,
    email: String,
    /// (when, new email) for customers who change address.
    email_change: Option<(i64, String)>,
    own_device: Option<String>,
    tablet: Option<String>,
    anonymous_id: Option<String>,
    subscriber: bool,
    category_weights: Vec<f64>,
    value_multiplier: f64,
}

/// Builds one customer's events.
struct Builder<'a> {
    config: &'a GeneratorConfig,
    customer: Customer,
    rng: ChaCha8Rng,
    events: Vec<pb::Event>,
    sessions: u32,
    carts: u32,
}

impl Builder<'_> {
    fn push(&mut self, at: i64, session: &Session, payload: pb::event::Payload) {
        let n = self.events.len();
        self.events.push(pb::Event {
            event_id: format!(
                "gen-s{}-c{:06}-{n:05}",
                self.config.seed, self.customer.index
            ),
            source: session.source.to_string(),
            occurred_at: Some(Timestamp {
                seconds: at,
                nanos: 0,
            }),
            identifiers: Some(pb::IdentifierSet {
                identifiers: session.identifiers.clone(),
            }),
            context: Some(pb::EventContext {
                channel: session.channel as i32,
                device: session.device.clone(),
                session_id: session.session_id.clone(),
                ..Default::default()
            }),
            payload: Some(payload),
        });
    }

    fn email_at(&self, at: i64) -> &str {
        match &self.customer.email_change {
            Some((when, new)) if at >= *when => new,
            _ => &self.customer.email,
        }
    }

    fn next_session_id(&mut self) -> String {
        self.sessions += 1;
        format!(
            "sess-s{}-c{:06}-{}",
            self.config.seed, self.customer.index, self.sessions
        )
    }

    /// A logged-in web or app session at `at` (app users mostly use the app; tablet users
    /// sometimes the family tablet).
    fn logged_in_session(&mut self, at: i64) -> Session {
        let c = &self.customer;
        let mut ids = vec![
            identifier(pb::IdentifierType::CustomerId, &c.id),
            identifier(pb::IdentifierType::Email, self.email_at(at)),
        ];
        let on_tablet = c.tablet.is_some() && self.rng.gen_bool(0.4);
        let on_app = !on_tablet && c.own_device.is_some() && self.rng.gen_bool(0.75);
        let (source, channel, device) = if let (true, Some(t)) = (on_tablet, &c.tablet) {
            ids.push(identifier(pb::IdentifierType::DeviceId, t));
            (
                "app",
                pb::Channel::App,
                Some(pb::Device {
                    r#type: pb::DeviceType::Tablet as i32,
                    os_name: "iPadOS".into(),
                    model: "iPad13,18".into(),
                    ..Default::default()
                }),
            )
        } else if let (true, Some(d)) = (on_app, &c.own_device) {
            ids.push(identifier(pb::IdentifierType::DeviceId, d));
            (
                "app",
                pb::Channel::App,
                Some(pb::Device {
                    r#type: pb::DeviceType::Mobile as i32,
                    os_name: if c.index.is_multiple_of(2) {
                        "iOS"
                    } else {
                        "Android"
                    }
                    .into(),
                    ..Default::default()
                }),
            )
        } else {
            (
                "web",
                pb::Channel::Web,
                Some(pb::Device {
                    r#type: pb::DeviceType::Desktop as i32,
                    ..Default::default()
                }),
            )
        };
        Session {
            source,
            channel,
            identifiers: ids,
            device,
            session_id: self.next_session_id(),
        }
    }

    fn category(&mut self) -> usize {
        let roll: f64 = self.rng.r#gen();
        let mut acc = 0.0;
        for (i, w) in self.customer.category_weights.iter().enumerate() {
            acc += w;
            if roll < acc {
                return i;
            }
        }
        CATEGORIES.len() - 1
    }

    fn unit_price(&mut self, category: usize) -> i64 {
        let base = CATEGORIES[category].1 as f64 * self.config.price_scale();
        let noise = LogNormal::new(0.0, 0.55).map_or(1.0, |d| d.sample(&mut self.rng));
        ((base * self.customer.value_multiplier * noise).round() as i64).max(1)
    }

    fn money(&self, amount_minor: i64) -> Option<pb::Money> {
        Some(pb::Money {
            amount_minor,
            currency: self.config.currency.clone(),
        })
    }

    fn line(&mut self, category: usize) -> pb::LineItem {
        let sku_n = self.rng.gen_range(1..=400);
        let quantity = if self.rng.gen_bool(0.8) {
            1
        } else {
            self.rng.gen_range(2..=4)
        };
        let price = self.unit_price(category);
        pb::LineItem {
            sku: format!("sku-{}-{sku_n:03}", CATEGORIES[category].0),
            category: CATEGORIES[category].0.to_string(),
            quantity,
            unit_price: self.money(price),
            name: String::new(),
        }
    }

    /// Views a few products; returns the time after the last view.
    fn views(&mut self, mut at: i64, session: &Session, count: u32) -> i64 {
        for _ in 0..count {
            let c = self.category();
            let line = self.line(c);
            self.push(
                at,
                session,
                pb::event::Payload::ProductViewed(pb::ProductViewed {
                    sku: line.sku,
                    category: line.category,
                    price: line.unit_price,
                    name: String::new(),
                }),
            );
            at += self.rng.gen_range(20..240);
        }
        at
    }

    fn cart(&mut self, at: i64, session: &Session, lines: &[pb::LineItem]) -> String {
        self.carts += 1;
        let cart_id = format!(
            "cart-s{}-c{:06}-{}",
            self.config.seed, self.customer.index, self.carts
        );
        let value = lines_value(lines);
        self.push(
            at,
            session,
            pb::event::Payload::CartUpdated(pb::CartUpdated {
                cart_id: cart_id.clone(),
                line_items: lines.to_vec(),
                cart_value: self.money(value),
            }),
        );
        cart_id
    }

    /// A purchase session at `at`; returns the order (id, total) for refunds.
    fn order(&mut self, at: i64, number: u32) -> (String, i64) {
        let store_order = self.rng.gen_bool(0.15);
        let items = 1 + u32::from(self.rng.gen_bool(0.45)) + u32::from(self.rng.gen_bool(0.2));
        let lines: Vec<pb::LineItem> = (0..items)
            .map(|_| {
                let c = self.category();
                self.line(c)
            })
            .collect();
        let total = lines_value(&lines);
        let order_id = format!(
            "ord-s{}-c{:06}-{number}",
            self.config.seed, self.customer.index
        );
        if store_order {
            let store = format!("store-{:02}", self.rng.gen_range(1..=STORES));
            let session = Session {
                source: "pos",
                channel: pb::Channel::Pos,
                identifiers: vec![identifier(
                    pb::IdentifierType::CustomerId,
                    &self.customer.id,
                )],
                device: Some(pb::Device {
                    r#type: pb::DeviceType::PosTerminal as i32,
                    ..Default::default()
                }),
                session_id: String::new(),
            };
            let mut ev_session = session;
            ev_session.session_id = self.next_session_id();
            self.push(
                at,
                &ev_session,
                pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                    order_id: order_id.clone(),
                    total: self.money(total),
                    line_items: lines,
                    channel: pb::Channel::Pos as i32,
                    store_id: store.clone(),
                    ..Default::default()
                }),
            );
            if let Some(pb::EventContext { store_id, .. }) =
                self.events.last_mut().and_then(|e| e.context.as_mut())
            {
                *store_id = store;
            }
            return (order_id, total);
        }
        let session = self.logged_in_session(at);
        let mut t = at;
        if session.channel == pb::Channel::App {
            self.push(
                t,
                &session,
                pb::event::Payload::AppOpened(pb::AppOpened::default()),
            );
            t += self.rng.gen_range(5..60);
        }
        let extra_views = self.rng.gen_range(0..=3);
        t = self.views(t, &session, extra_views + 1);
        self.cart(t, &session, &lines);
        t += self.rng.gen_range(60..900);
        self.push(
            t,
            &session,
            pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                order_id: order_id.clone(),
                total: self.money(total),
                line_items: lines,
                channel: session.channel as i32,
                ..Default::default()
            }),
        );
        (order_id, total)
    }

    /// A session without a purchase; some end with an abandoned cart.
    fn browse(&mut self, at: i64) {
        let session = self.logged_in_session(at);
        let mut t = at;
        if session.channel == pb::Channel::App {
            self.push(
                t,
                &session,
                pb::event::Payload::AppOpened(pb::AppOpened::default()),
            );
            t += self.rng.gen_range(5..60);
        }
        let views = self.rng.gen_range(1..=6);
        t = self.views(t, &session, views);
        if self.rng.gen_bool(0.3) {
            let c = self.category();
            let lines = vec![self.line(c)];
            let cart_id = self.cart(t, &session, &lines);
            if self.rng.gen_bool(0.6) {
                t += self.rng.gen_range(3_600..7_200);
                let value = lines_value(&lines);
                self.push(
                    t,
                    &session,
                    pb::event::Payload::CartAbandoned(pb::CartAbandoned {
                        cart_id,
                        cart_value: self.money(value),
                        line_items: lines,
                    }),
                );
            }
        }
    }
}

fn lines_value(lines: &[pb::LineItem]) -> i64 {
    lines
        .iter()
        .map(|l| i64::from(l.quantity) * l.unit_price.as_ref().map_or(0, |m| m.amount_minor))
        .sum()
}

/// Customer `index`'s events in time order (pure: depends only on `config` and `index`).
pub fn customer_events(config: &GeneratorConfig, index: u32) -> Vec<pb::Event> {
    let mut rng = ChaCha8Rng::seed_from_u64(config.seed);
    rng.set_stream(u64::from(index) + 1);
    let start = config.start();
    let end = config.end;
    let span = end - start;
    let joined = start + rng.gen_range(0..span.max(1));
    let seed = config.seed;
    let email = format!("customer{index}.s{seed}@example.com");
    let email_change = rng.gen_bool(0.08).then(|| {
        let when = joined + rng.gen_range(0..(end - joined).max(1));
        (when, format!("customer{index}.new.s{seed}@example.org"))
    });
    let own_device = rng
        .gen_bool(0.45)
        .then(|| format!("device-s{seed}-{index:06}"));
    let tablet = (config.customers >= TABLET_USERS && index % TABLET_BLOCK < TABLET_USERS)
        .then(|| format!("family-tablet-s{seed}-{}", index / TABLET_BLOCK));
    let anonymous_id = rng
        .gen_bool(0.4)
        .then(|| format!("anon-s{seed}-{index:06}"));
    let subscriber = rng.gen_bool(0.6);
    let category_weights = Dirichlet::new(&[0.6; CATEGORIES.len()])
        .map_or_else(|_| vec![1.0 / 8.0; 8], |d| d.sample(&mut rng));
    let value_multiplier = Pareto::<f64>::new(1.0, 1.6)
        .map_or(1.0, |d| d.sample(&mut rng))
        .min(40.0);
    let buyer = rng.gen_bool(0.8);
    let rate_per_day: f64 = Gamma::<f64>::new(0.9, 1.0 / 30.0)
        .map_or(0.03, |d| d.sample(&mut rng))
        .clamp(0.000_5, 0.3);
    let dropout: f64 = Beta::new(1.2, 4.0).map_or(0.2, |d| d.sample(&mut rng));

    let mut b = Builder {
        config,
        customer: Customer {
            index,
            id: customer_id(seed, index),
            email,
            email_change,
            own_device,
            tablet,
            anonymous_id,
            subscriber,
            category_weights,
            value_multiplier,
        },
        rng,
        events: Vec::new(),
        sessions: 0,
        carts: 0,
    };

    // Anonymous browsing before signing up.
    if let Some(anon) = b.customer.anonymous_id.clone() {
        let sessions = b.rng.gen_range(1..=3);
        for _ in 0..sessions {
            let at = (joined - b.rng.gen_range(3_600..14 * DAY)).max(start);
            let session = Session {
                source: "web",
                channel: pb::Channel::Web,
                identifiers: vec![identifier(pb::IdentifierType::AnonymousId, &anon)],
                device: Some(pb::Device {
                    r#type: pb::DeviceType::Desktop as i32,
                    ..Default::default()
                }),
                session_id: b.next_session_id(),
            };
            let views = b.rng.gen_range(1..=4);
            b.views(at, &session, views);
        }
    }
    // Signing up: the welcome page carries the account and the cookie together.
    let mut signup = b.logged_in_session(joined);
    if let Some(anon) = &b.customer.anonymous_id {
        signup
            .identifiers
            .push(identifier(pb::IdentifierType::AnonymousId, anon));
    }
    b.push(
        joined,
        &signup,
        pb::event::Payload::PageViewed(pb::PageViewed {
            url: "https://shop.example.com/account/welcome".into(),
            title: "Welcome".into(),
            referrer: String::new(),
        }),
    );

    // Purchases: BG/NBD-like (first purchase at acquisition, then exponential gaps at the
    // customer's rate, dropping out with probability `dropout` after each purchase).
    let gap = Exp::new(rate_per_day).ok();
    let mut churned_at = end;
    if buyer {
        let mut at = joined + b.rng.gen_range(300..3_600);
        let mut number = 0;
        while at < end {
            number += 1;
            let (order_id, total) = b.order(at, number);
            if b.rng.gen_bool(0.06) {
                let refund_at = at + b.rng.gen_range(2..20) * DAY;
                if refund_at < end {
                    let full = b.rng.gen_bool(0.5);
                    let amount = if full { total } else { (total / 2).max(1) };
                    let session = Session {
                        source: "web",
                        channel: pb::Channel::Web,
                        identifiers: vec![identifier(
                            pb::IdentifierType::CustomerId,
                            &b.customer.id,
                        )],
                        device: None,
                        session_id: String::new(),
                    };
                    b.push(
                        refund_at,
                        &session,
                        pb::event::Payload::OrderRefunded(pb::OrderRefunded {
                            order_id: order_id.clone(),
                            refund: b.money(amount),
                            r#type: if full {
                                pb::RefundType::Full
                            } else {
                                pb::RefundType::Partial
                            } as i32,
                            line_items: Vec::new(),
                            refund_id: format!("ref-{order_id}"),
                        }),
                    );
                }
            }
            if b.rng.gen_bool(dropout) {
                churned_at = at;
                break;
            }
            let days = gap.map_or(30.0, |g| g.sample(&mut b.rng));
            at += ((days * DAY as f64) as i64).max(3_600);
        }
    } else {
        churned_at = joined + b.rng.gen_range(0..60) * DAY;
    }

    // Browse-only sessions while active, fading out over 45 days after churning.
    let browse_rate = 1.5 * rate_per_day + 0.005;
    if let Ok(browse_gap) = Exp::new(browse_rate) {
        let active_until = churned_at.saturating_add(45 * DAY).min(end);
        let mut at = joined;
        loop {
            at += ((browse_gap.sample(&mut b.rng) * DAY as f64) as i64).max(600);
            if at >= active_until {
                break;
            }
            let fade = if at > churned_at {
                1.0 - (at - churned_at) as f64 / (45 * DAY) as f64
            } else {
                1.0
            };
            if b.rng.gen_bool(fade.clamp(0.0, 1.0)) {
                b.browse(at);
            }
        }
    }

    // Weekly campaign emails (Tuesdays 09:00 from the start): active customers open and click
    // more; a click starts a session.
    if b.customer.subscriber {
        let engagement = (rate_per_day * 30.0).min(1.0);
        let mut at = start + 9 * 3_600;
        let mut campaign = 0;
        while at < end {
            campaign += 1;
            if at > joined {
                let active = if at <= churned_at { 1.0 } else { 0.2 };
                let p_open = 0.08 + 0.35 * active * engagement;
                if b.rng.gen_bool(p_open) {
                    let campaign_id = format!("camp-s{seed}-{campaign}");
                    let message_id = format!("msg-s{seed}-{campaign}-{index:06}");
                    let session = Session {
                        source: "esp",
                        channel: pb::Channel::Email,
                        identifiers: vec![identifier(pb::IdentifierType::Email, b.email_at(at))],
                        device: None,
                        session_id: String::new(),
                    };
                    let opened = at + b.rng.gen_range(600..2 * DAY);
                    if opened < end {
                        b.push(
                            opened,
                            &session,
                            pb::event::Payload::EmailOpened(pb::EmailOpened {
                                campaign_id: campaign_id.clone(),
                                message_id: message_id.clone(),
                            }),
                        );
                        if b.rng.gen_bool(0.25) {
                            let clicked = opened + b.rng.gen_range(5..300);
                            b.push(
                                clicked,
                                &session,
                                pb::event::Payload::EmailClicked(pb::EmailClicked {
                                    campaign_id,
                                    message_id,
                                    url: "https://shop.example.com/sale".into(),
                                }),
                            );
                            if clicked + 60 < end {
                                b.browse(clicked + 60);
                            }
                        }
                    }
                }
            }
            at += 7 * DAY;
        }
    }

    let mut events = b.events;
    events.retain(|e| e.occurred_at.as_ref().is_some_and(|t| t.seconds < end));
    events.sort_by_key(|e| e.occurred_at.as_ref().map_or(0, |t| t.seconds));
    events
}

/// The CSV rows (order lines) of `event` if it is a completed order, in [`CSV_HEADER`] order;
/// amounts in major units of the currency.
pub fn csv_rows(event: &pb::Event, customer_id: &str) -> Vec<[String; 8]> {
    let Some(pb::event::Payload::OrderCompleted(order)) = &event.payload else {
        return Vec::new();
    };
    let at = event
        .occurred_at
        .as_ref()
        .map(timestamp_text)
        .unwrap_or_default();
    order
        .line_items
        .iter()
        .map(|l| {
            let price = l.unit_price.clone().unwrap_or_default();
            [
                customer_id.to_string(),
                at.clone(),
                order.order_id.clone(),
                l.sku.clone(),
                l.category.clone(),
                l.quantity.to_string(),
                major_units(price.amount_minor, &price.currency),
                price.currency.clone(),
            ]
        })
        .collect()
}

/// `1234` USD → `"12.34"`; `1500` KRW → `"1500"`.
pub fn major_units(amount_minor: i64, currency: &str) -> String {
    let digits = minor_unit_digits(currency);
    if digits == 0 {
        return amount_minor.to_string();
    }
    let scale = 10i64.pow(digits);
    let sign = if amount_minor < 0 { "-" } else { "" };
    let m = amount_minor.abs();
    format!(
        "{sign}{}.{:0width$}",
        m / scale,
        m % scale,
        width = digits as usize
    )
}

/// Writes the data set of `config` to the given outputs, customer by customer (memory stays
/// bounded by one customer's history), and returns its figures.
pub fn write(
    config: &GeneratorConfig,
    mut jsonl: Option<&mut dyn Write>,
    csv: Option<&mut dyn Write>,
) -> anyhow::Result<GeneratorStats> {
    let mut stats = StatsBuilder::default();
    let mut csv = csv.map(csv::Writer::from_writer);
    if let Some(w) = csv.as_mut() {
        w.write_record(CSV_HEADER)?;
    }
    for index in 0..config.customers {
        let events = customer_events(config, index);
        stats.add_customer(&events);
        if let Some(w) = jsonl.as_mut() {
            for e in &events {
                serde_json::to_writer(&mut *w, &event_to_json(e))?;
                w.write_all(b"\n")?;
            }
        }
        if let Some(w) = csv.as_mut() {
            let id = customer_id(config.seed, index);
            for e in &events {
                for row in csv_rows(e, &id) {
                    w.write_record(&row)?;
                }
            }
        }
    }
    if let Some(w) = jsonl.as_mut() {
        w.flush()?;
    }
    if let Some(w) = csv.as_mut() {
        w.flush()?;
    }
    Ok(stats.finish())
}

/// Runs `clientele generate`: writes the files and prints the figures (JSON with `json`).
pub fn run(args: GenerateArgs, json: bool) -> anyhow::Result<()> {
    if args.jsonl.is_none() && args.csv.is_none() {
        bail!("nothing to write: pass --jsonl PATH and/or --csv PATH");
    }
    let currency = args.currency.trim().to_ascii_uppercase();
    if currency.len() != 3 || !currency.bytes().all(|b| b.is_ascii_uppercase()) {
        bail!("--currency must be an ISO 4217 code like USD");
    }
    let end = Utc
        .from_utc_datetime(&args.end_date.and_time(chrono::NaiveTime::MIN))
        .timestamp();
    let config = GeneratorConfig {
        seed: args.seed,
        customers: args.customers,
        days: args.days,
        end,
        currency,
    };
    let open = |p: &PathBuf| -> anyhow::Result<std::io::BufWriter<std::fs::File>> {
        Ok(std::io::BufWriter::new(
            std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
        ))
    };
    let mut jsonl = args.jsonl.as_ref().map(open).transpose()?;
    let mut csv = args.csv.as_ref().map(open).transpose()?;
    let stats = write(
        &config,
        jsonl.as_mut().map(|w| w as &mut dyn Write),
        csv.as_mut().map(|w| w as &mut dyn Write),
    )?;
    let text = if json {
        serde_json::to_string_pretty(&serde_json::json!({
            "customers": stats.customers,
            "events": stats.events,
            "orders": stats.orders,
            "refunds": stats.refunds,
            "buyers": stats.buyers,
            "repeat_buyers": stats.repeat_buyers,
            "revenue_minor": stats.revenue_minor,
            "currency": config.currency,
            "top20_revenue_share": stats.top20_revenue_share,
            "events_by_kind": stats.by_kind,
            "jsonl": args.jsonl,
            "csv": args.csv,
        }))? + "\n"
    } else {
        let mut t = format!(
            "generated {} customers, {} events ({} orders, {} refunds) over {} days to {}\n",
            stats.customers, stats.events, stats.orders, stats.refunds, args.days, args.end_date
        );
        t += &format!(
            "  buyers {} ({} repeat buyers, {:.1}% of buyers)\n",
            stats.buyers,
            stats.repeat_buyers,
            100.0 * stats.repeat_buyers as f64 / stats.buyers.max(1) as f64
        );
        t += &format!(
            "  revenue {} {} (top 20% of customers hold {:.1}%)\n",
            major_units(stats.revenue_minor, &config.currency),
            config.currency,
            100.0 * stats.top20_revenue_share
        );
        let kinds: Vec<String> = stats
            .by_kind
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        t += &format!("  events: {}\n", kinds.join(", "));
        for (what, path) in [("JSON Lines", &args.jsonl), ("CSV", &args.csv)] {
            if let Some(p) = path {
                t += &format!("  {what}: {}\n", p.display());
            }
        }
        t
    };
    print!("{text}");
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn render(config: &GeneratorConfig) -> (Vec<u8>, Vec<u8>) {
        let mut jsonl: Vec<u8> = Vec::new();
        let mut csv: Vec<u8> = Vec::new();
        write(config, Some(&mut jsonl), Some(&mut csv)).unwrap();
        (jsonl, csv)
    }

    #[test]
    fn the_same_seed_gives_identical_files() {
        let config = GeneratorConfig::new(11, 60, 200);
        assert_eq!(render(&config), render(&config));
        let other = GeneratorConfig::new(12, 60, 200);
        assert_ne!(render(&config).0, render(&other).0);
    }

    #[test]
    fn a_customer_is_the_same_whatever_the_number_of_customers() {
        let small = GeneratorConfig::new(3, 10, 120);
        let large = GeneratorConfig::new(3, 500, 120);
        assert_eq!(customer_events(&small, 7), customer_events(&large, 7));
    }

    #[test]
    fn event_ids_are_unique_and_times_within_the_period() {
        let config = GeneratorConfig::new(5, 300, 365);
        let mut ids = std::collections::HashSet::new();
        for e in events(&config) {
            let t = e.occurred_at.as_ref().unwrap().seconds;
            assert!(t >= config.start() - 14 * DAY && t < config.end);
            assert!(e.event_id.bytes().all(|b| (0x21..=0x7e).contains(&b)));
            assert!(ids.insert(e.event_id.clone()), "{}", e.event_id);
        }
    }

    #[test]
    fn spend_is_heavy_tailed_and_many_buyers_come_back() {
        let config = GeneratorConfig::new(7, 3000, 365);
        let mut stats = StatsBuilder::default();
        for i in 0..config.customers {
            stats.add_customer(&customer_events(&config, i));
        }
        let s = stats.finish();
        let buyer_share = s.buyers as f64 / s.customers as f64;
        assert!((0.7..0.9).contains(&buyer_share), "{s:?}");
        let repeat_share = s.repeat_buyers as f64 / s.buyers as f64;
        assert!((0.3..0.85).contains(&repeat_share), "{s:?}");
        assert!(s.top20_revenue_share > 0.6, "{s:?}");
        // behaviour outnumbers purchases, and every order has views before it
        assert!(s.by_kind["product_viewed"] > 3 * s.orders, "{s:?}");
        assert!(s.by_kind["cart_abandoned"] > 0 && s.by_kind["email_clicked"] > 0);
    }

    #[test]
    fn identity_quirks_are_present() {
        let config = GeneratorConfig::new(9, 200, 365);
        let all: Vec<pb::Event> = events(&config).collect();
        let has = |pred: &dyn Fn(&pb::Identifier) -> bool| {
            all.iter()
                .any(|e| e.identifiers.as_ref().unwrap().identifiers.iter().any(pred))
        };
        assert!(has(&|i| i.value.starts_with("family-tablet-")));
        assert!(has(&|i| i.value.contains(".new.")));
        assert!(has(&|i| i.r#type == pb::IdentifierType::AnonymousId as i32));
        // a tablet is shared by several customers
        let tablet_users: std::collections::HashSet<&str> = all
            .iter()
            .filter_map(|e| {
                let ids = &e.identifiers.as_ref().unwrap().identifiers;
                ids.iter()
                    .any(|i| i.value == "family-tablet-s9-0")
                    .then(|| ids[0].value.as_str())
            })
            .collect();
        assert!(tablet_users.len() >= 2, "{tablet_users:?}");
    }

    #[test]
    fn csv_rows_are_order_lines_in_major_units() {
        assert_eq!(major_units(1234, "USD"), "12.34");
        assert_eq!(major_units(1500, "KRW"), "1500");
        assert_eq!(major_units(5, "USD"), "0.05");
    }
}
