//! `clientele import`: loads historical transactions (CSV) or events (JSON Lines) and streams
//! them through `IngestService.IngestStream`.
//!
//! CSV rows are order lines. `--map FIELD=COLUMN` names the column of each field (unmapped
//! fields use the column named like the field, if any): `customer_id` and `occurred_at` are
//! required; `order_id` groups lines into one ORDER_COMPLETED event (rows without one are an
//! order each); `quantity` (default 1), `amount` (the price of ONE unit; or `line_total`, the
//! line's total), `currency` (or `--currency`), `sku`, `category`, `product_name`, `email`,
//! `channel` (web/app/pos, or `--channel`) and `store_id` fill the order. Dates are RFC 3339,
//! `YYYY-MM-DD[ HH:MM[:SS]]` or `--date-format` (chrono syntax); times without an offset are UTC.
//!
//! JSON Lines hold one event per line in the mapping of [`crate::event_json`]; a missing
//! `source` is `--source`, a missing `event_id` is derived from the line's content.
//!
//! Re-running an import changes nothing: event ids are derived from content (SHA-256 of the
//! order id and its rows' mapped values, never the file's path), so the server reports every
//! event as a duplicate. Resuming: the stream's producer id is derived from the file's absolute
//! path and size, and batches are numbered deterministically, so a restarted import continues
//! after the server's last durable batch; an import that finished before starts a new round of
//! sequence numbers (and is then all duplicates).
//!
//! Rows and events that cannot be imported, locally or by the server, go to a rejects file
//! (`<input>.rejects.csv`: line, field, message).

use std::collections::{BTreeMap, HashMap};
use std::io::IsTerminal as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use chrono::{DateTime, NaiveDate, NaiveDateTime};
use clap::{Args, ValueEnum};
use clientele_proto::Timestamp;
use clientele_proto::v1 as pb;
use clientele_proto::v1::ingest_service_client::IngestServiceClient;
use clientele_runtime::client::ClientInterceptor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use prost::Message as _;
use sha2::{Digest as _, Sha256};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::event_json::event_from_json;
use crate::money::minor_unit_digits;

/// Most events per stream batch (the server's limit).
pub const MAX_BATCH_EVENTS: usize = 500;
/// Most encoded bytes per stream batch (under the server's 4 MiB).
const MAX_BATCH_BYTES: usize = 3 * 1024 * 1024;
/// Reconnect attempts without progress before giving up.
const MAX_RETRIES: u32 = 12;

/// The IngestService client the importer uses.
pub type IngestClient = IngestServiceClient<InterceptedService<Channel, ClientInterceptor>>;

/// Input formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum InputFormat {
    /// Comma-separated order lines with a header row.
    Csv,
    /// One JSON event per line.
    Jsonl,
}

/// Arguments of `clientele import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// The CSV or JSON Lines file.
    pub input: PathBuf,
    /// Input format; by default from the extension (.csv, otherwise JSON Lines for
    /// .jsonl/.ndjson/.json).
    #[arg(long, value_enum)]
    pub format: Option<InputFormat>,
    /// CSV: the column holding a field, FIELD=COLUMN (repeatable). Fields: customer_id,
    /// occurred_at, order_id, quantity, amount (unit price), line_total, currency, sku,
    /// category, product_name, email, channel, store_id.
    #[arg(long = "map", value_name = "FIELD=COLUMN")]
    pub map: Vec<String>,
    /// CSV: currency of rows without a currency column (ISO 4217).
    #[arg(long)]
    pub currency: Option<String>,
    /// CSV: date format of occurred_at in chrono syntax, e.g. "%m/%d/%Y %H:%M" (UTC unless it
    /// has an offset).
    #[arg(long)]
    pub date_format: Option<String>,
    /// CSV: order channel of rows without a channel column.
    #[arg(long, default_value = "web", value_parser = ["web", "app", "pos"])]
    pub channel: String,
    /// CSV: field delimiter.
    #[arg(long, default_value_t = ',')]
    pub delimiter: char,
    /// The events' `source` (for JSON events without one).
    #[arg(long, default_value = "import")]
    pub source: String,
    /// Where to write rejected rows; default `<input>.rejects.csv`.
    #[arg(long, value_name = "PATH")]
    pub rejects: Option<PathBuf>,
    /// Events per stream batch (1..=500).
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(1..=500))]
    pub batch_size: u16,
}

// ---------------------------------------------------------------------------------------------
// Rejects
// ---------------------------------------------------------------------------------------------

/// One row or event that was not imported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    /// 1-based line number in the input (the header is line 1 of a CSV).
    pub line: u64,
    /// The field (a CSV field name, or the event field path).
    pub field: String,
    /// Why.
    pub message: String,
}

/// Writes `rejects` as CSV (`line,field,message`, sorted by line) to `path`.
pub fn write_rejects(path: &Path, rejects: &[Reject]) -> anyhow::Result<()> {
    let mut sorted: Vec<&Reject> = rejects.iter().collect();
    sorted.sort_by_key(|r| r.line);
    let mut w =
        csv::Writer::from_path(path).with_context(|| format!("creating {}", path.display()))?;
    w.write_record(["line", "field", "message"])?;
    for r in sorted {
        w.write_record([r.line.to_string().as_str(), &r.field, &r.message])?;
    }
    w.flush()?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Column mapping
// ---------------------------------------------------------------------------------------------

/// The fields a CSV column can be mapped to.
pub const FIELDS: [&str; 13] = [
    "customer_id",
    "occurred_at",
    "order_id",
    "quantity",
    "amount",
    "line_total",
    "currency",
    "sku",
    "category",
    "product_name",
    "email",
    "channel",
    "store_id",
];

/// Column index of each mapped field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ColumnMapping {
    columns: BTreeMap<&'static str, usize>,
}

impl ColumnMapping {
    /// Resolves `--map FIELD=COLUMN` flags against the CSV `header`; fields not mapped use the
    /// column of the same name when there is one. Fails naming the problem: an unknown field,
    /// a column not in the header, or a missing required field.
    pub fn resolve(maps: &[String], header: &[&str]) -> anyhow::Result<Self> {
        let mut wanted: BTreeMap<&'static str, String> = BTreeMap::new();
        for m in maps {
            let Some((field, column)) = m.split_once('=') else {
                bail!("--map {m}: expected FIELD=COLUMN");
            };
            let Some(field) = FIELDS.iter().copied().find(|f| *f == field.trim()) else {
                bail!(
                    "--map {m}: unknown field `{}`; fields are {}",
                    field.trim(),
                    FIELDS.join(", ")
                );
            };
            wanted.insert(field, column.trim().to_string());
        }
        let mut columns = BTreeMap::new();
        for field in FIELDS {
            let find = |name: &str| header.iter().position(|h| h.trim() == name);
            match wanted.get(field) {
                Some(column) => match find(column) {
                    Some(i) => {
                        columns.insert(field, i);
                    }
                    None => bail!(
                        "--map {field}={column}: the file has no column `{column}`; its columns are {}",
                        header.join(", ")
                    ),
                },
                None => {
                    if let Some(i) = find(field) {
                        columns.insert(field, i);
                    }
                }
            }
        }
        for required in ["customer_id", "occurred_at"] {
            if !columns.contains_key(required) {
                bail!(
                    "no column for {required}: add --map {required}=COLUMN (columns: {})",
                    header.join(", ")
                );
            }
        }
        if columns.contains_key("amount") && columns.contains_key("line_total") {
            bail!("map either amount (unit price) or line_total, not both");
        }
        Ok(Self { columns })
    }

    /// The value of `field` in `row` (trimmed), `None` when unmapped or empty.
    pub fn get<'r>(&self, row: &'r csv::StringRecord, field: &str) -> Option<&'r str> {
        self.columns
            .get(field)
            .and_then(|&i| row.get(i))
            .map(str::trim)
            .filter(|v| !v.is_empty())
    }

    /// True when `field` is mapped to a column.
    pub fn has(&self, field: &str) -> bool {
        self.columns.contains_key(field)
    }
}

// ---------------------------------------------------------------------------------------------
// Values
// ---------------------------------------------------------------------------------------------

/// Parses a date: with `format`, as a date-time with offset, a naive date-time (UTC) or a date
/// (midnight UTC) in that chrono format; without, RFC 3339 or `YYYY-MM-DD[( |T)HH:MM[:SS]]`.
/// Returns seconds since the epoch.
pub fn parse_date(text: &str, format: Option<&str>) -> Result<i64, String> {
    let text = text.trim();
    let formats: Vec<&str> = match format {
        Some(f) => vec![f],
        None => {
            if let Ok(t) = DateTime::parse_from_rfc3339(text) {
                return Ok(t.timestamp());
            }
            vec![
                "%Y-%m-%d %H:%M:%S",
                "%Y-%m-%dT%H:%M:%S",
                "%Y-%m-%d %H:%M",
                "%Y-%m-%dT%H:%M",
                "%Y-%m-%d",
            ]
        }
    };
    for f in &formats {
        if let Ok(t) = DateTime::parse_from_str(text, f) {
            return Ok(t.timestamp());
        }
        if let Ok(t) = NaiveDateTime::parse_from_str(text, f) {
            return Ok(t.and_utc().timestamp());
        }
        if let Ok(d) = NaiveDate::parse_from_str(text, f) {
            return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc().timestamp());
        }
    }
    Err(match format {
        Some(f) => format!("`{text}` does not match the date format `{f}`"),
        None => format!(
            "`{text}` is not a date (RFC 3339 or YYYY-MM-DD[ HH:MM[:SS]]); pass --date-format"
        ),
    })
}

/// Parses a decimal amount in major units ("12.34", "-3", "0.5") into minor units of
/// `currency`, rounding half away from zero beyond the currency's decimals.
pub fn parse_amount(text: &str, currency: &str) -> Result<i64, String> {
    let t = text.trim();
    let (negative, digits) = match t.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let (whole, frac) = digits.split_once('.').unwrap_or((digits, ""));
    let is_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !is_digits(whole) || !is_digits(frac) {
        return Err(format!("`{text}` is not a decimal number"));
    }
    let places = minor_unit_digits(currency) as usize;
    let mut minor: i64 = if whole.is_empty() {
        0
    } else {
        whole
            .parse()
            .map_err(|_| format!("`{text}` is too large"))?
    };
    for i in 0..places {
        let d = frac.as_bytes().get(i).map_or(0, |b| i64::from(b - b'0'));
        minor = minor
            .checked_mul(10)
            .and_then(|m| m.checked_add(d))
            .ok_or_else(|| format!("`{text}` is too large"))?;
    }
    if frac.as_bytes().get(places).is_some_and(|b| *b >= b'5') {
        minor += 1;
    }
    Ok(if negative { -minor } else { minor })
}

fn hex_prefix(h: Sha256, len: usize) -> String {
    let digest = hex::encode(h.finalize());
    digest[..len].to_string()
}

// ---------------------------------------------------------------------------------------------
// CSV → order events
// ---------------------------------------------------------------------------------------------

/// An event read from the input, with the input lines it came from.
#[derive(Debug, Clone, PartialEq)]
pub struct SourcedEvent {
    /// The event.
    pub event: pb::Event,
    /// Input lines (1-based) that make it up.
    pub lines: Vec<u64>,
}

/// Options for turning CSV rows into events.
#[derive(Debug, Clone)]
pub struct CsvOptions {
    /// `source` of the events.
    pub source: String,
    /// Currency when there is no currency column.
    pub currency: Option<String>,
    /// Date format of occurred_at.
    pub date_format: Option<String>,
    /// Channel ("web", "app", "pos") when there is no channel column.
    pub channel: String,
    /// Field delimiter.
    pub delimiter: u8,
}

/// One order being assembled from its lines.
#[derive(Debug)]
struct OrderBuilder {
    order_id: String,
    customer_id: String,
    customer_line: u64,
    email: Option<String>,
    occurred_at: i64,
    currency: String,
    channel: pb::Channel,
    store_id: String,
    items: Vec<pb::LineItem>,
    total: i64,
    lines: Vec<u64>,
    content: Sha256,
}

fn channel_of(text: &str) -> Option<pb::Channel> {
    match text.trim().to_ascii_lowercase().as_str() {
        "web" | "online" | "channel_web" => Some(pb::Channel::Web),
        "app" | "mobile" | "channel_app" => Some(pb::Channel::App),
        "pos" | "store" | "channel_pos" => Some(pb::Channel::Pos),
        _ => None,
    }
}

/// Reads CSV order lines and aggregates the lines of each order id into one ORDER_COMPLETED
/// event (in order of first appearance). Bad rows become rejects; the others still import.
pub fn read_csv(
    reader: impl std::io::Read,
    maps: &[String],
    options: &CsvOptions,
) -> anyhow::Result<(Vec<SourcedEvent>, Vec<Reject>, u64)> {
    let mut csv = csv::ReaderBuilder::new()
        .delimiter(options.delimiter)
        .flexible(true)
        .from_reader(reader);
    let header: Vec<String> = csv
        .headers()
        .context("reading the CSV header")?
        .iter()
        .map(str::to_string)
        .collect();
    let header_refs: Vec<&str> = header.iter().map(String::as_str).collect();
    let mapping = ColumnMapping::resolve(maps, &header_refs)?;
    if !mapping.has("currency") && options.currency.is_none() {
        bail!("the file has no currency column: pass --currency CODE or --map currency=COLUMN");
    }
    let default_channel = channel_of(&options.channel).unwrap_or(pb::Channel::Web);
    let mut orders: Vec<OrderBuilder> = Vec::new();
    let mut by_id: HashMap<String, usize> = HashMap::new();
    let mut rejects = Vec::new();
    let mut rows = 0u64;
    for (n, record) in csv.records().enumerate() {
        let line = n as u64 + 2;
        rows += 1;
        let reject = |field: &str, message: String| Reject {
            line,
            field: field.to_string(),
            message,
        };
        let row = match record {
            Ok(r) => r,
            Err(e) => {
                rejects.push(reject("", format!("unreadable row: {e}")));
                continue;
            }
        };
        let get = |f: &str| mapping.get(&row, f);
        let Some(customer_id) = get("customer_id") else {
            rejects.push(reject("customer_id", "is empty".into()));
            continue;
        };
        let occurred_at =
            match get("occurred_at").map(|t| parse_date(t, options.date_format.as_deref())) {
                None => {
                    rejects.push(reject("occurred_at", "is empty".into()));
                    continue;
                }
                Some(Err(e)) => {
                    rejects.push(reject("occurred_at", e));
                    continue;
                }
                Some(Ok(t)) => t,
            };
        let currency = match get("currency")
            .map(str::to_string)
            .or(options.currency.clone())
        {
            Some(c) if c.len() == 3 && c.bytes().all(|b| b.is_ascii_alphabetic()) => {
                c.to_ascii_uppercase()
            }
            Some(c) => {
                rejects.push(reject("currency", format!("`{c}` is not an ISO 4217 code")));
                continue;
            }
            None => {
                rejects.push(reject(
                    "currency",
                    "is empty and --currency is not set".into(),
                ));
                continue;
            }
        };
        let quantity = match get("quantity").map(str::parse::<i64>) {
            None => 1,
            Some(Ok(q)) if (1..=100_000).contains(&q) => q,
            Some(Ok(q)) => {
                rejects.push(reject(
                    "quantity",
                    format!("{q} is not 1..=100000 (returns and cancellations are not orders)"),
                ));
                continue;
            }
            Some(Err(_)) => {
                rejects.push(reject("quantity", "is not a whole number".into()));
                continue;
            }
        };
        let (unit_price, line_total) = if let Some(t) = get("line_total") {
            match parse_amount(t, &currency) {
                Ok(total) if total >= 0 => (total / quantity, total),
                Ok(_) => {
                    rejects.push(reject("line_total", "is negative".into()));
                    continue;
                }
                Err(e) => {
                    rejects.push(reject("line_total", e));
                    continue;
                }
            }
        } else if let Some(a) = get("amount") {
            match parse_amount(a, &currency) {
                Ok(price) if price >= 0 => (price, price * quantity),
                Ok(_) => {
                    rejects.push(reject("amount", "is negative".into()));
                    continue;
                }
                Err(e) => {
                    rejects.push(reject("amount", e));
                    continue;
                }
            }
        } else {
            rejects.push(reject(
                "amount",
                "no amount: map amount or line_total".into(),
            ));
            continue;
        };
        let channel = match get("channel") {
            None => default_channel,
            Some(c) => match channel_of(c) {
                Some(ch) => ch,
                None => {
                    rejects.push(reject("channel", format!("`{c}` is not web, app or pos")));
                    continue;
                }
            },
        };
        let store_id = get("store_id").unwrap_or_default().to_string();
        if channel == pb::Channel::Pos && store_id.is_empty() {
            rejects.push(reject("store_id", "a pos order needs a store_id".into()));
            continue;
        }
        // The row's content, by field name (independent of column order and file path).
        let mut content = Sha256::new();
        for f in FIELDS {
            content.update(f.as_bytes());
            content.update([0x1f]);
            content.update(get(f).unwrap_or_default().as_bytes());
            content.update([0x1e]);
        }
        let row_digest: [u8; 32] = content.finalize().into();
        let order_id = match get("order_id") {
            Some(id) => id.to_string(),
            None => format!("row-{}", &hex::encode(row_digest)[..24]),
        };
        let category = get("category").unwrap_or_default().to_string();
        let sku = get("sku")
            .map(str::to_string)
            .or_else(|| (!category.is_empty()).then(|| category.clone()))
            .unwrap_or_else(|| "item".to_string());
        let item = pb::LineItem {
            sku,
            category,
            quantity: i32::try_from(quantity).unwrap_or(1),
            unit_price: Some(pb::Money {
                amount_minor: unit_price,
                currency: currency.clone(),
            }),
            name: get("product_name").unwrap_or_default().to_string(),
        };
        match by_id.get(&order_id) {
            Some(&i) => {
                let o = &mut orders[i];
                if o.customer_id != customer_id {
                    rejects.push(reject(
                        "customer_id",
                        format!(
                            "order {order_id} belongs to customer {} (line {}), not {customer_id}",
                            o.customer_id, o.customer_line
                        ),
                    ));
                    continue;
                }
                if o.currency != currency {
                    rejects.push(reject(
                        "currency",
                        format!("order {order_id} is in {}, not {currency}", o.currency),
                    ));
                    continue;
                }
                o.occurred_at = o.occurred_at.min(occurred_at);
                o.total += line_total;
                o.items.push(item);
                o.lines.push(line);
                o.content.update(row_digest);
                if o.email.is_none() {
                    o.email = get("email").map(str::to_string);
                }
            }
            None => {
                let mut h = Sha256::new();
                h.update(order_id.as_bytes());
                h.update([0]);
                h.update(row_digest);
                by_id.insert(order_id.clone(), orders.len());
                orders.push(OrderBuilder {
                    order_id,
                    customer_id: customer_id.to_string(),
                    customer_line: line,
                    email: get("email").map(str::to_string),
                    occurred_at,
                    currency,
                    channel,
                    store_id,
                    items: vec![item],
                    total: line_total,
                    lines: vec![line],
                    content: h,
                });
            }
        }
    }
    let events = orders
        .into_iter()
        .map(|o| {
            let mut identifiers = vec![pb::Identifier {
                r#type: pb::IdentifierType::CustomerId as i32,
                value: o.customer_id.clone(),
                namespace: String::new(),
            }];
            if let Some(email) = &o.email {
                identifiers.push(pb::Identifier {
                    r#type: pb::IdentifierType::Email as i32,
                    value: email.clone(),
                    namespace: String::new(),
                });
            }
            let items = if o.items.len() > 500 {
                Vec::new() // more lines than an event may carry: keep the total only
            } else {
                o.items
            };
            SourcedEvent {
                event: pb::Event {
                    event_id: format!("imp-{}", hex_prefix(o.content, 40)),
                    source: options.source.clone(),
                    occurred_at: Some(Timestamp {
                        seconds: o.occurred_at,
                        nanos: 0,
                    }),
                    identifiers: Some(pb::IdentifierSet { identifiers }),
                    context: Some(pb::EventContext {
                        channel: o.channel as i32,
                        store_id: o.store_id.clone(),
                        ..Default::default()
                    }),
                    payload: Some(pb::event::Payload::OrderCompleted(pb::OrderCompleted {
                        order_id: o.order_id,
                        total: Some(pb::Money {
                            amount_minor: o.total,
                            currency: o.currency,
                        }),
                        line_items: items,
                        channel: o.channel as i32,
                        store_id: o.store_id,
                        ..Default::default()
                    })),
                },
                lines: o.lines,
            }
        })
        .collect();
    Ok((events, rejects, rows))
}

/// Reads JSON Lines events (blank lines skipped). Events without `source` get `source`;
/// without `event_id`, `imp-` and the SHA-256 of the line.
pub fn read_jsonl(
    reader: impl std::io::BufRead,
    source: &str,
) -> anyhow::Result<(Vec<SourcedEvent>, Vec<Reject>, u64)> {
    let mut events = Vec::new();
    let mut rejects = Vec::new();
    let mut rows = 0;
    for (n, text) in reader.lines().enumerate() {
        let line = n as u64 + 1;
        let text = text.with_context(|| format!("reading line {line}"))?;
        if text.trim().is_empty() {
            continue;
        }
        rows += 1;
        let value: serde_json::Value = match serde_json::from_str(&text) {
            Ok(v) => v,
            Err(e) => {
                rejects.push(Reject {
                    line,
                    field: String::new(),
                    message: format!("not JSON: {e}"),
                });
                continue;
            }
        };
        match event_from_json(&value) {
            Ok(mut event) => {
                if event.source.is_empty() {
                    event.source = source.to_string();
                }
                if event.event_id.is_empty() {
                    let mut h = Sha256::new();
                    h.update(text.trim().as_bytes());
                    event.event_id = format!("imp-{}", hex_prefix(h, 40));
                }
                events.push(SourcedEvent {
                    event,
                    lines: vec![line],
                });
            }
            Err(e) => rejects.push(Reject {
                line,
                field: e.field,
                message: e.message,
            }),
        }
    }
    Ok((events, rejects, rows))
}

/// Splits events into stream batches of at most `max_events` events and 3 MiB.
pub fn batches(events: Vec<SourcedEvent>, max_events: usize) -> Vec<Vec<SourcedEvent>> {
    let max_events = max_events.clamp(1, MAX_BATCH_EVENTS);
    let mut out: Vec<Vec<SourcedEvent>> = Vec::new();
    let mut bytes = 0;
    for e in events {
        let size = e.event.encoded_len();
        let full = out
            .last()
            .is_none_or(|b| b.len() >= max_events || bytes + size > MAX_BATCH_BYTES);
        if full {
            out.push(Vec::new());
            bytes = 0;
        }
        bytes += size;
        if let Some(b) = out.last_mut() {
            b.push(e);
        }
    }
    out
}

/// The stable producer id of an import of `path` in batches of `batch_size`: derived from its
/// absolute path and size (and the batch size, which fixes how events map to sequence
/// numbers), so a restarted import of the same file resumes where the server's durable
/// batches end.
pub fn producer_id(path: &Path, batch_size: u16) -> anyhow::Result<String> {
    let absolute =
        std::fs::canonicalize(path).with_context(|| format!("resolving {}", path.display()))?;
    let size = std::fs::metadata(&absolute)?.len();
    let mut h = Sha256::new();
    h.update(absolute.as_os_str().as_encoded_bytes());
    h.update(b":");
    h.update(size.to_string().as_bytes());
    if batch_size != 500 {
        h.update(format!(":{batch_size}").as_bytes());
    }
    Ok(format!("import-{}", hex_prefix(h, 32)))
}

// ---------------------------------------------------------------------------------------------
// Streaming
// ---------------------------------------------------------------------------------------------

/// What the server reported for the batches of one import run.
#[derive(Debug, Clone, Default)]
pub struct StreamOutcome {
    /// Result of each batch, by index into the batches (0-based).
    pub results: BTreeMap<usize, pb::BatchResult>,
    /// Batches that were already durable when this run started (a resumed import).
    pub resumed_batches: usize,
    /// Times the stream was reconnected.
    pub reconnects: u32,
}

fn retryable(status: &tonic::Status) -> bool {
    use tonic::Code;
    matches!(
        status.code(),
        Code::Unavailable
            | Code::Aborted
            | Code::ResourceExhausted
            | Code::Internal
            | Code::Unknown
            | Code::Cancelled
            | Code::DeadlineExceeded
    )
}

/// Streams `batches` through IngestStream as `producer`, resuming after the server's last
/// durable batch and reconnecting (with backoff) after transient failures. Batch `i` of this
/// run is sequence `base + i + 1`, where `base` is the server's last durable sequence rounded
/// down to a whole run of `batches.len()` batches. `on_durable` is told how many batches of
/// this run are durable.
pub async fn stream_batches(
    client: &mut IngestClient,
    producer: &str,
    batches: &[Vec<pb::Event>],
    on_durable: &dyn Fn(usize),
) -> anyhow::Result<StreamOutcome> {
    let total = batches.len() as u64;
    let mut outcome = StreamOutcome::default();
    if total == 0 {
        return Ok(outcome);
    }
    let mut base: Option<u64> = None;
    let mut recorded_ack = 0u64;
    let mut failures = 0u32;
    loop {
        let (tx, rx) = tokio::sync::mpsc::channel::<pb::IngestStreamRequest>(64);
        let open = pb::IngestStreamRequest {
            kind: Some(pb::ingest_stream_request::Kind::Open(
                pb::IngestStreamOpen {
                    producer_id: producer.to_string(),
                    last_received_ack: recorded_ack,
                },
            )),
        };
        tx.send(open).await.ok();
        let attempt: Result<bool, tonic::Status> = async {
            let mut responses = client
                .ingest_stream(tokio_stream::wrappers::ReceiverStream::new(rx))
                .await?
                .into_inner();
            let opened = match responses.message().await?.and_then(|m| m.kind) {
                Some(pb::ingest_stream_response::Kind::Opened(o)) => o,
                _ => {
                    return Err(tonic::Status::internal(
                        "the server did not open the stream",
                    ));
                }
            };
            let durable_at_open = opened.last_durable_sequence;
            let run_base = *base.get_or_insert_with(|| {
                let b = durable_at_open - durable_at_open % total;
                outcome.resumed_batches = usize::try_from(durable_at_open - b).unwrap_or(0);
                b
            });
            let last = run_base + total;
            let mut durable = durable_at_open.max(run_base);
            let mut next = durable + 1;
            let window = u64::from(opened.max_unacked_batches.max(1));
            let mut tx = Some(tx);
            on_durable(usize::try_from(durable - run_base).unwrap_or(0));
            loop {
                while let Some(sender) = &tx {
                    if next > last {
                        tx = None; // half-close: the server finishes and ends the stream
                        break;
                    }
                    if next - durable > window {
                        break;
                    }
                    let index = usize::try_from(next - run_base - 1).unwrap_or(0);
                    let batch = pb::IngestStreamRequest {
                        kind: Some(pb::ingest_stream_request::Kind::Batch(
                            pb::IngestStreamBatch {
                                sequence: next,
                                events: batches[index].clone(),
                            },
                        )),
                    };
                    if sender.send(batch).await.is_err() {
                        return Err(tonic::Status::unavailable("the stream closed"));
                    }
                    next += 1;
                }
                match responses.message().await? {
                    Some(pb::IngestStreamResponse {
                        kind: Some(pb::ingest_stream_response::Kind::Ack(ack)),
                    }) => {
                        for b in ack.batches {
                            if b.sequence > run_base && b.sequence <= last {
                                let index = usize::try_from(b.sequence - run_base - 1).unwrap_or(0);
                                outcome.results.insert(index, b);
                            }
                        }
                        if ack.durable_through_sequence > durable {
                            durable = ack.durable_through_sequence;
                            recorded_ack = durable;
                            failures = 0;
                            on_durable(usize::try_from(durable.min(last) - run_base).unwrap_or(0));
                        }
                    }
                    Some(_) => {}
                    None => return Ok(durable >= last),
                }
            }
        }
        .await;
        match attempt {
            Ok(true) => return Ok(outcome),
            Ok(false) => failures += 1,
            Err(s) if retryable(&s) => failures += 1,
            Err(s) => return Err(s.into()),
        }
        if failures > MAX_RETRIES {
            bail!(
                "giving up after {MAX_RETRIES} failed reconnects; run the import again to resume"
            );
        }
        outcome.reconnects += 1;
        let wait = Duration::from_millis(200 * 2u64.pow(failures.min(5)));
        tokio::time::sleep(wait).await;
    }
}

// ---------------------------------------------------------------------------------------------
// The command
// ---------------------------------------------------------------------------------------------

/// The result of one import.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ImportSummary {
    /// Data rows (CSV) or non-blank lines (JSON Lines) read.
    pub rows: u64,
    /// Events sent.
    pub events: u64,
    /// Events stored.
    pub accepted: u64,
    /// Events the server already had.
    pub duplicates: u64,
    /// Rows rejected locally plus events the server rejected.
    pub rejected: u64,
    /// Events suppressed (erased customers, no analytics consent).
    pub suppressed: u64,
    /// Batches whose detailed results had expired (their events are counted nowhere).
    pub expired_batches: u64,
    /// Batches already durable before this run.
    pub resumed_batches: u64,
}

/// Runs `clientele import` over `channel`; prints the summary (JSON with `json`).
pub async fn run(
    args: ImportArgs,
    channel: InterceptedService<Channel, ClientInterceptor>,
    json: bool,
) -> anyhow::Result<()> {
    let path = &args.input;
    let format = args.format.unwrap_or_else(|| {
        match path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
        {
            Some(e) if e == "csv" || e == "tsv" => InputFormat::Csv,
            _ => InputFormat::Jsonl,
        }
    });
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let reader = std::io::BufReader::new(file);
    let (events, mut rejects, rows) = match format {
        InputFormat::Csv => {
            let delimiter = u8::try_from(args.delimiter)
                .ok()
                .filter(u8::is_ascii)
                .context("--delimiter must be one ASCII character")?;
            read_csv(
                reader,
                &args.map,
                &CsvOptions {
                    source: args.source.clone(),
                    currency: args.currency.clone(),
                    date_format: args.date_format.clone(),
                    channel: args.channel.clone(),
                    delimiter,
                },
            )?
        }
        InputFormat::Jsonl => {
            if !args.map.is_empty() {
                bail!("--map applies to CSV input only");
            }
            read_jsonl(reader, &args.source)?
        }
    };
    let mut summary = ImportSummary {
        rows,
        events: events.len() as u64,
        ..Default::default()
    };
    let batched = batches(events, usize::from(args.batch_size));
    let lines: Vec<Vec<Vec<u64>>> = batched
        .iter()
        .map(|b| b.iter().map(|e| e.lines.clone()).collect())
        .collect();
    let events_per_batch: Vec<u64> = batched.iter().map(|b| b.len() as u64).collect();
    let batches: Vec<Vec<pb::Event>> = batched
        .into_iter()
        .map(|b| b.into_iter().map(|e| e.event).collect())
        .collect();

    let progress = if std::io::stdout().is_terminal() {
        ProgressBar::new(summary.events)
    } else {
        ProgressBar::with_draw_target(Some(summary.events), ProgressDrawTarget::hidden())
    };
    progress.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} events  {per_sec}  eta {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let done_events = |durable_batches: usize| {
        progress.set_position(
            events_per_batch[..durable_batches.min(events_per_batch.len())]
                .iter()
                .sum(),
        );
    };
    let mut client = IngestServiceClient::new(channel).max_decoding_message_size(64 * 1024 * 1024);
    let producer = producer_id(path, args.batch_size)?;
    let outcome = stream_batches(&mut client, &producer, &batches, &done_events).await;
    progress.finish_and_clear();
    let outcome = outcome?;
    summary.resumed_batches = outcome.resumed_batches as u64;
    let local_rejects = rejects.len() as u64;

    for (index, b) in &outcome.results {
        if b.results_expired {
            summary.expired_batches += 1;
            continue;
        }
        summary.accepted += u64::from(b.accepted);
        summary.duplicates += u64::from(b.duplicates);
        summary.suppressed += u64::from(b.suppressed);
        summary.rejected += u64::from(b.rejected);
        for r in &b.non_accepted {
            if r.status != pb::EventStatus::Rejected as i32 {
                continue;
            }
            let event_lines = usize::try_from(r.index)
                .ok()
                .and_then(|i| lines.get(*index)?.get(i))
                .cloned()
                .unwrap_or_default();
            let (field, message) = r
                .error
                .as_ref()
                .map(|e| (e.field_path.clone(), e.message.clone()))
                .unwrap_or_default();
            for line in event_lines.iter().take(1) {
                rejects.push(Reject {
                    line: *line,
                    field: field.clone(),
                    message: message.clone(),
                });
            }
        }
    }
    summary.rejected += local_rejects;
    let rejects_path = args.rejects.clone().unwrap_or_else(|| {
        let mut p = path.clone().into_os_string();
        p.push(".rejects.csv");
        PathBuf::from(p)
    });
    if rejects.is_empty() {
        if args.rejects.is_none() && rejects_path.exists() {
            std::fs::remove_file(&rejects_path).ok();
        }
    } else {
        write_rejects(&rejects_path, &rejects)?;
    }

    let text = if json {
        serde_json::to_string_pretty(&serde_json::json!({
            "input": path,
            "producer_id": producer,
            "rows": summary.rows,
            "events": summary.events,
            "accepted": summary.accepted,
            "duplicates": summary.duplicates,
            "rejected": summary.rejected,
            "suppressed": summary.suppressed,
            "expired_batches": summary.expired_batches,
            "resumed_batches": summary.resumed_batches,
            "rejects_file": (!rejects.is_empty()).then_some(&rejects_path),
        }))? + "\n"
    } else {
        let mut t = format!(
            "imported {}: {} rows, {} events in {} batches{}\n",
            path.display(),
            summary.rows,
            summary.events,
            batches.len(),
            if summary.resumed_batches > 0 {
                format!(
                    " (resumed after {} durable batches)",
                    summary.resumed_batches
                )
            } else {
                String::new()
            }
        );
        t += &format!("  accepted    {}\n", summary.accepted);
        t += &format!("  duplicates  {}\n", summary.duplicates);
        t += &format!("  rejected    {}", summary.rejected);
        if !rejects.is_empty() {
            t += &format!(" (reasons in {})", rejects_path.display());
        }
        t += "\n";
        t += &format!("  suppressed  {}\n", summary.suppressed);
        if summary.expired_batches > 0 {
            t += &format!(
                "  {} batches were durable before this run but their results expired\n",
                summary.expired_batches
            );
        }
        t
    };
    print!("{text}");
    Ok(())
}

/// Reads a whole file into events, as `run` does (for tests and tools).
pub fn read_file(
    path: &Path,
    format: InputFormat,
    maps: &[String],
    options: &CsvOptions,
) -> anyhow::Result<(Vec<SourcedEvent>, Vec<Reject>, u64)> {
    let reader = std::io::BufReader::new(std::fs::File::open(path)?);
    match format {
        InputFormat::Csv => read_csv(reader, maps, options),
        InputFormat::Jsonl => read_jsonl(reader, &options.source),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn options() -> CsvOptions {
        CsvOptions {
            source: "import".into(),
            currency: Some("GBP".into()),
            date_format: Some("%m/%d/%Y %H:%M".into()),
            channel: "web".into(),
            delimiter: b',',
        }
    }

    fn retail_maps() -> Vec<String> {
        [
            "customer_id=Customer ID",
            "occurred_at=InvoiceDate",
            "order_id=Invoice",
            "amount=Price",
            "quantity=Quantity",
            "sku=StockCode",
            "product_name=Description",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }

    const RETAIL: &str = "Invoice,StockCode,Description,Quantity,InvoiceDate,Price,Customer ID,Country\n\
        489434,85048,LED CUSHION,12,12/1/2009 7:45,6.95,13085,United Kingdom\n\
        489434,79323P,PINK LIGHTS,12,12/1/2009 7:45,6.75,13085,United Kingdom\n\
        489435,22350,CAT BOWL,12,12/1/2009 7:46,2.55,13086,United Kingdom\n\
        C489449,22087,PAPER BUNTING,-12,12/1/2009 10:33,2.95,16321,Australia\n\
        489436,21523,DOORMAT,10,12/1/2009 9:06,5.95,,United Kingdom\n\
        489437,21524,DOORMAT,1,13/45/2009 9:06,5.95,13087,United Kingdom\n";

    #[test]
    fn column_mapping_uses_flags_then_same_named_columns() {
        let m = ColumnMapping::resolve(
            &["customer_id=CustomerID".into()],
            &["CustomerID", "occurred_at", "amount"],
        )
        .unwrap();
        assert_eq!(m.columns["customer_id"], 0);
        assert_eq!(m.columns["occurred_at"], 1);
        assert!(m.has("amount") && !m.has("currency"));
    }

    #[test]
    fn column_mapping_errors_name_the_problem() {
        let e = ColumnMapping::resolve(&["colour=X".into()], &["a"]).unwrap_err();
        assert!(e.to_string().contains("unknown field `colour`"), "{e}");
        let e = ColumnMapping::resolve(&["customer_id=Nope".into()], &["a", "b"]).unwrap_err();
        assert!(e.to_string().contains("no column `Nope`"), "{e}");
        let e = ColumnMapping::resolve(&[], &["customer_id"]).unwrap_err();
        assert!(e.to_string().contains("occurred_at"), "{e}");
    }

    #[test]
    fn dates_parse_in_default_and_custom_formats() {
        assert_eq!(parse_date("2009-12-01T07:45:00Z", None), Ok(1_259_653_500));
        assert_eq!(parse_date("2009-12-01 07:45:00", None), Ok(1_259_653_500));
        assert_eq!(parse_date("2009-12-01 07:45", None), Ok(1_259_653_500));
        assert_eq!(parse_date("2009-12-01", None), Ok(1_259_625_600));
        assert_eq!(
            parse_date("12/1/2009 7:45", Some("%m/%d/%Y %H:%M")),
            Ok(1_259_653_500)
        );
        assert_eq!(
            parse_date("01/12/2009", Some("%d/%m/%Y")),
            Ok(1_259_625_600)
        );
        assert!(
            parse_date("12/1/2009", None)
                .unwrap_err()
                .contains("--date-format")
        );
    }

    #[test]
    fn amounts_become_minor_units_of_the_currency() {
        assert_eq!(parse_amount("6.95", "GBP"), Ok(695));
        assert_eq!(parse_amount("6.9", "GBP"), Ok(690));
        assert_eq!(parse_amount("12", "USD"), Ok(1200));
        assert_eq!(parse_amount("0.005", "USD"), Ok(1));
        assert_eq!(parse_amount("1500", "KRW"), Ok(1500));
        assert_eq!(parse_amount("-2.5", "EUR"), Ok(-250));
        assert!(parse_amount("1,5", "EUR").is_err());
        assert!(parse_amount("", "EUR").is_err());
    }

    #[test]
    fn line_items_of_one_invoice_aggregate_into_one_order() {
        let (events, rejects, rows) =
            read_csv(RETAIL.as_bytes(), &retail_maps(), &options()).unwrap();
        assert_eq!(rows, 6);
        assert_eq!(events.len(), 2, "{events:?}");
        let first = &events[0];
        assert_eq!(first.lines, vec![2, 3]);
        let Some(pb::event::Payload::OrderCompleted(o)) = &first.event.payload else {
            panic!("not an order");
        };
        assert_eq!(o.order_id, "489434");
        assert_eq!(o.line_items.len(), 2);
        assert_eq!(o.total.as_ref().unwrap().amount_minor, 12 * 695 + 12 * 675);
        assert_eq!(o.total.as_ref().unwrap().currency, "GBP");
        assert_eq!(o.line_items[0].sku, "85048");
        assert_eq!(o.line_items[0].name, "LED CUSHION");
        assert_eq!(o.channel, pb::Channel::Web as i32);
        assert_eq!(
            first.event.occurred_at.as_ref().unwrap().seconds,
            1_259_653_500
        );
        let ids = &first.event.identifiers.as_ref().unwrap().identifiers;
        assert_eq!(ids[0].value, "13085");
        // the cancellation, the row without a customer and the bad date are rejected
        let mut fields: Vec<(u64, &str)> =
            rejects.iter().map(|r| (r.line, r.field.as_str())).collect();
        fields.sort_unstable();
        assert_eq!(
            fields,
            vec![(5, "quantity"), (6, "customer_id"), (7, "occurred_at")]
        );
    }

    #[test]
    fn event_ids_depend_on_content_not_on_row_position_or_path() {
        let (a, _, _) = read_csv(RETAIL.as_bytes(), &retail_maps(), &options()).unwrap();
        let (b, _, _) = read_csv(RETAIL.as_bytes(), &retail_maps(), &options()).unwrap();
        assert_eq!(a, b);
        // the same orders in a file with a different column order
        let reordered = "Customer ID,Invoice,InvoiceDate,Price,Quantity,StockCode,Description\n\
            13085,489434,12/1/2009 7:45,6.95,12,85048,LED CUSHION\n\
            13085,489434,12/1/2009 7:45,6.75,12,79323P,PINK LIGHTS\n";
        let (c, _, _) = read_csv(reordered.as_bytes(), &retail_maps(), &options()).unwrap();
        assert_eq!(c[0].event.event_id, a[0].event.event_id);
        assert!(a[0].event.event_id.starts_with("imp-"));
        assert_ne!(a[0].event.event_id, a[1].event.event_id);
    }

    #[test]
    fn a_missing_currency_is_an_error_before_anything_is_sent() {
        let mut o = options();
        o.currency = None;
        let e = read_csv(RETAIL.as_bytes(), &retail_maps(), &o).unwrap_err();
        assert!(e.to_string().contains("--currency"), "{e}");
    }

    #[test]
    fn rejects_are_written_sorted_by_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("in.csv.rejects.csv");
        write_rejects(
            &path,
            &[
                Reject {
                    line: 9,
                    field: "amount".into(),
                    message: "`x` is not a decimal number".into(),
                },
                Reject {
                    line: 3,
                    field: "customer_id".into(),
                    message: "is empty, really".into(),
                },
            ],
        )
        .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(
            text,
            "line,field,message\n3,customer_id,\"is empty, really\"\n9,amount,`x` is not a decimal number\n"
        );
    }

    #[test]
    fn jsonl_lines_become_events_and_bad_lines_rejects() {
        let input = "{\"event_id\":\"e1\",\"occurred_at\":\"2024-01-01T00:00:00Z\",\"identifiers\":[{\"type\":\"CUSTOMER_ID\",\"value\":\"c\"}],\"app_opened\":{}}\n\
            \n\
            not json\n\
            {\"occurred_at\":\"2024-01-01T00:00:00Z\",\"app_opened\":{}}\n";
        let (events, rejects, rows) = read_jsonl(input.as_bytes(), "import").unwrap();
        assert_eq!(rows, 3);
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].event.source, "import");
        assert_eq!(events[0].event.event_id, "e1");
        assert!(events[1].event.event_id.starts_with("imp-"));
        assert_eq!(events[1].lines, vec![4]);
        assert_eq!(rejects.len(), 1);
        assert_eq!(rejects[0].line, 3);
    }

    #[test]
    fn batches_respect_the_event_limit() {
        let events: Vec<SourcedEvent> = (0..1201)
            .map(|i| SourcedEvent {
                event: pb::Event {
                    event_id: format!("e{i}"),
                    ..Default::default()
                },
                lines: vec![i],
            })
            .collect();
        let b = batches(events, 500);
        assert_eq!(
            b.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![500, 500, 201]
        );
    }

    #[test]
    fn the_producer_id_is_stable_for_a_file_and_differs_between_files_and_batch_sizes() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a.csv");
        let b = dir.path().join("b.csv");
        std::fs::write(&a, "x").unwrap();
        std::fs::write(&b, "x").unwrap();
        assert_eq!(producer_id(&a, 500).unwrap(), producer_id(&a, 500).unwrap());
        assert_ne!(producer_id(&a, 500).unwrap(), producer_id(&b, 500).unwrap());
        assert_ne!(producer_id(&a, 500).unwrap(), producer_id(&a, 100).unwrap());
        assert!(producer_id(&a, 500).unwrap().len() <= 128);
    }

    #[test]
    fn generated_csv_imports_without_flags() {
        let config = crate::generate::GeneratorConfig::new(1, 40, 90);
        let mut csv: Vec<u8> = Vec::new();
        let stats = crate::generate::write(&config, None, Some(&mut csv)).unwrap();
        let mut o = options();
        o.date_format = None;
        o.currency = None;
        let (events, rejects, _) = read_csv(csv.as_slice(), &[], &o).unwrap();
        assert!(rejects.is_empty(), "{rejects:?}");
        assert_eq!(events.len() as u64, stats.orders);
        let total: i64 = events
            .iter()
            .map(|e| match &e.event.payload {
                Some(pb::event::Payload::OrderCompleted(o)) => {
                    o.total.as_ref().unwrap().amount_minor
                }
                _ => 0,
            })
            .sum();
        assert_eq!(total, stats.revenue_minor);
    }
}
