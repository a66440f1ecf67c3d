//! `clientele profiles …`: resolve identifiers, read, update, erase and export profiles.

use std::io::{BufRead as _, IsTerminal as _, Write as _};
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use clientele_proto::v1 as pb;

use crate::client::{ConnectionOptions, OutputFormat, emit, profile_client};
use crate::{json, render};

/// Profile commands.
#[derive(Debug, Subcommand)]
pub enum ProfilesCommand {
    /// Resolve identifiers seen together to one profile (creating or merging profiles).
    Resolve(ResolveArgs),
    /// Show one profile (a merged-away id shows the surviving profile).
    Get {
        /// Profile id (UUID).
        profile_id: String,
    },
    /// Set or remove traits.
    Traits(TraitsArgs),
    /// Record a consent decision.
    Consent(ConsentArgs),
    /// Erase a person: identifiers, traits, consent and aggregates. Cannot be undone.
    Erase(EraseArgs),
    /// Export everything held about a person as a JSON document.
    Export(ExportArgs),
}

/// Identifiers for `profiles resolve`; each option may be repeated, at least one is required.
#[derive(Debug, Default, Args)]
#[group(required = true, multiple = true)]
pub struct ResolveArgs {
    /// The retailer's customer / account id.
    #[arg(long = "customer-id", value_name = "ID")]
    pub customer_ids: Vec<String>,
    /// Email address (the server stores only a keyed hash).
    #[arg(long = "email", value_name = "EMAIL")]
    pub emails: Vec<String>,
    /// Phone number, ideally with +country (the server stores only a keyed hash).
    #[arg(long = "phone", value_name = "PHONE")]
    pub phones: Vec<String>,
    /// Device id (IDFA / GAID / installation id).
    #[arg(long = "device-id", value_name = "ID")]
    pub device_ids: Vec<String>,
    /// Anonymous web / app visitor id.
    #[arg(long = "anonymous-id", value_name = "ID")]
    pub anonymous_ids: Vec<String>,
    /// Custom identifier as NAMESPACE=VALUE (namespace like `pos.card`).
    #[arg(long = "custom", value_name = "NS=VALUE", value_parser = parse_custom)]
    pub custom: Vec<(String, String)>,
}

/// Arguments of `profiles traits`.
#[derive(Debug, Args)]
#[command(group(clap::ArgGroup::new("changes").args(["set", "remove"]).required(true).multiple(true)))]
pub struct TraitsArgs {
    /// Profile id (UUID).
    pub profile_id: String,
    /// Trait to set as KEY=VALUE; integers, decimals and true/false are typed, anything else
    /// is a string.
    #[arg(long = "set", value_name = "KEY=VALUE", value_parser = parse_trait_assignment)]
    pub set: Vec<(String, pb::Value)>,
    /// Trait name to remove.
    #[arg(long = "remove", value_name = "KEY")]
    pub remove: Vec<String>,
}

/// Consent purposes accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum PurposeArg {
    /// Marketing email.
    Email,
    /// Marketing SMS.
    Sms,
    /// Push notifications.
    Push,
    /// Personalised offers and content.
    Personalisation,
    /// Analytics and measurement.
    Analytics,
}

impl From<PurposeArg> for pb::ConsentPurpose {
    fn from(p: PurposeArg) -> Self {
        match p {
            PurposeArg::Email => Self::Email,
            PurposeArg::Sms => Self::Sms,
            PurposeArg::Push => Self::Push,
            PurposeArg::Personalisation => Self::Personalisation,
            PurposeArg::Analytics => Self::Analytics,
        }
    }
}

/// Consent statuses accepted on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StatusArg {
    /// The customer opted in.
    Granted,
    /// The customer declined when asked.
    Denied,
    /// The customer withdrew an earlier grant.
    Revoked,
}

impl From<StatusArg> for pb::ConsentStatus {
    fn from(s: StatusArg) -> Self {
        match s {
            StatusArg::Granted => Self::Granted,
            StatusArg::Denied => Self::Denied,
            StatusArg::Revoked => Self::Revoked,
        }
    }
}

/// Arguments of `profiles consent`.
#[derive(Debug, Args)]
pub struct ConsentArgs {
    /// Profile id (UUID).
    pub profile_id: String,
    /// What the consent is for.
    #[arg(long, value_enum)]
    pub purpose: PurposeArg,
    /// The decision.
    #[arg(long, value_enum)]
    pub status: StatusArg,
    /// Where the decision was captured ("web.signup", "pos", "preference-center").
    #[arg(long, default_value = "cli")]
    pub source: String,
}

/// Arguments of `profiles erase`.
#[derive(Debug, Args)]
pub struct EraseArgs {
    /// Profile id (UUID).
    pub profile_id: String,
    /// Why (ticket id, "gdpr-art17"); kept with the tombstone.
    #[arg(long)]
    pub reason: String,
    /// Do not ask for confirmation.
    #[arg(long, short = 'y')]
    pub yes: bool,
}

/// Arguments of `profiles export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Profile id (UUID).
    pub profile_id: String,
    /// Write the document to FILE (mode 0600) instead of standard output.
    #[arg(short = 'o', long = "out", value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// Parses `NAMESPACE=VALUE` for `--custom`.
pub fn parse_custom(text: &str) -> Result<(String, String), String> {
    let (namespace, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected NAMESPACE=VALUE, got `{text}`"))?;
    if namespace.trim().is_empty() || value.trim().is_empty() {
        return Err(format!(
            "expected NAMESPACE=VALUE with both parts non-empty, got `{text}`"
        ));
    }
    Ok((namespace.trim().to_string(), value.to_string()))
}

/// Parses `KEY=VALUE` for `--set`, typing the value with [`parse_trait_value`].
pub fn parse_trait_assignment(text: &str) -> Result<(String, pb::Value), String> {
    let (key, value) = text
        .split_once('=')
        .ok_or_else(|| format!("expected KEY=VALUE, got `{text}`"))?;
    if key.trim().is_empty() {
        return Err(format!("the trait name is empty in `{text}`"));
    }
    Ok((key.trim().to_string(), parse_trait_value(value)))
}

/// Types a trait value typed on the command line: `true` / `false` → bool, an integer that
/// fits i64 → int, a finite decimal (`1.5`, `-2e3`) → double, anything else → string.
/// Numbers with leading zeros (`007`, postal codes) stay strings so no digits are lost.
pub fn parse_trait_value(text: &str) -> pb::Value {
    use pb::value::Kind;
    let kind = match text {
        "true" => Kind::BoolValue(true),
        "false" => Kind::BoolValue(false),
        _ if looks_like_integer(text) => text
            .parse::<i64>()
            .map_or_else(|_| Kind::StringValue(text.to_string()), Kind::IntValue),
        _ if looks_like_decimal(text) => match text.parse::<f64>() {
            Ok(d) if d.is_finite() => Kind::DoubleValue(d),
            _ => Kind::StringValue(text.to_string()),
        },
        _ => Kind::StringValue(text.to_string()),
    };
    pb::Value { kind: Some(kind) }
}

/// Optional sign and digits, without a leading zero unless the number is `0`.
fn looks_like_integer(text: &str) -> bool {
    let digits = text.strip_prefix(['-', '+']).unwrap_or(text);
    !digits.is_empty()
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'))
}

/// Digits with `.` and/or an exponent, and no leading zero before further integer digits.
fn looks_like_decimal(text: &str) -> bool {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    body.bytes().any(|b| b.is_ascii_digit())
        && body
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'.' | b'e' | b'E' | b'-' | b'+'))
        && !(body.len() > 1 && body.starts_with('0') && body.as_bytes()[1].is_ascii_digit())
}

impl ResolveArgs {
    /// The identifier set to send, in option order (customer ids, emails, phones, device ids,
    /// anonymous ids, custom ids). Fails when no identifier is given.
    pub fn identifier_set(&self) -> anyhow::Result<pb::IdentifierSet> {
        let plain = |kind: pb::IdentifierType, values: &[String]| {
            values
                .iter()
                .map(move |v| pb::Identifier {
                    r#type: kind as i32,
                    value: v.clone(),
                    namespace: String::new(),
                })
                .collect::<Vec<_>>()
        };
        let mut identifiers = Vec::new();
        identifiers.extend(plain(pb::IdentifierType::CustomerId, &self.customer_ids));
        identifiers.extend(plain(pb::IdentifierType::Email, &self.emails));
        identifiers.extend(plain(pb::IdentifierType::Phone, &self.phones));
        identifiers.extend(plain(pb::IdentifierType::DeviceId, &self.device_ids));
        identifiers.extend(plain(pb::IdentifierType::AnonymousId, &self.anonymous_ids));
        identifiers.extend(self.custom.iter().map(|(namespace, value)| pb::Identifier {
            r#type: pb::IdentifierType::Custom as i32,
            value: value.clone(),
            namespace: namespace.clone(),
        }));
        if identifiers.is_empty() {
            bail!(
                "give at least one identifier (--customer-id, --email, --phone, --device-id, --anonymous-id or --custom)"
            );
        }
        Ok(pb::IdentifierSet { identifiers })
    }
}

fn print_json(v: &serde_json::Value) -> anyhow::Result<()> {
    emit(&format!("{}\n", serde_json::to_string_pretty(v)?))
}

fn print_profile(p: Option<&pb::Profile>, output: OutputFormat) -> anyhow::Result<()> {
    let p = p.context("the server returned no profile")?;
    match output {
        OutputFormat::Human => emit(&render::profile(p))?,
        OutputFormat::Json => print_json(&json::profile(p))?,
    }
    Ok(())
}

/// Runs one `profiles` command.
pub async fn run(command: ProfilesCommand, options: &ConnectionOptions) -> anyhow::Result<()> {
    let mut client = profile_client(options)?;
    let output = options.output;
    match command {
        ProfilesCommand::Resolve(args) => {
            let set = args.identifier_set()?;
            let response = client
                .resolve(pb::ResolveRequest {
                    identifiers: Some(set.clone()),
                })
                .await?
                .into_inner();
            match output {
                OutputFormat::Human => emit(&render::resolve_response(&set, &response))?,
                OutputFormat::Json => print_json(&json::resolve_response(&response))?,
            }
        }
        ProfilesCommand::Get { profile_id } => {
            let response = client
                .get_profile(pb::GetProfileRequest { profile_id })
                .await?
                .into_inner();
            print_profile(response.profile.as_ref(), output)?;
        }
        ProfilesCommand::Traits(args) => {
            let response = client
                .update_traits(pb::UpdateTraitsRequest {
                    profile_id: args.profile_id,
                    set: args.set.into_iter().collect(),
                    remove: args.remove,
                })
                .await?
                .into_inner();
            print_profile(response.profile.as_ref(), output)?;
        }
        ProfilesCommand::Consent(args) => {
            let response = client
                .set_consent(pb::SetConsentRequest {
                    profile_id: args.profile_id,
                    consent: Some(pb::Consent {
                        purpose: pb::ConsentPurpose::from(args.purpose) as i32,
                        status: pb::ConsentStatus::from(args.status) as i32,
                        decided_at: None,
                        source: args.source,
                    }),
                })
                .await?
                .into_inner();
            print_profile(response.profile.as_ref(), output)?;
        }
        ProfilesCommand::Erase(args) => {
            if !args.yes && std::io::stdin().is_terminal() && !confirm_erase(&args.profile_id)? {
                bail!("aborted: nothing was erased");
            }
            let response = client
                .erase_profile(pb::EraseProfileRequest {
                    profile_id: args.profile_id.clone(),
                    reason: args.reason,
                })
                .await?
                .into_inner();
            match output {
                OutputFormat::Human => emit(&format!(
                    "erased profile {}: {} identifiers tombstoned at {}\n",
                    args.profile_id,
                    response.identifiers_tombstoned,
                    render::timestamp(response.erased_at.as_ref())
                ))?,
                OutputFormat::Json => {
                    print_json(&json::erase_response(&args.profile_id, &response))?;
                }
            }
        }
        ProfilesCommand::Export(args) => {
            let response = client
                .export_profile(pb::ExportProfileRequest {
                    profile_id: args.profile_id.clone(),
                })
                .await?
                .into_inner();
            let document = pretty_json(&response.json);
            match &args.out {
                None => emit(&format!("{document}\n"))?,
                Some(path) => {
                    write_private_file(path, document.as_bytes())
                        .with_context(|| format!("writing {}", path.display()))?;
                    eprintln!(
                        "wrote the export of profile {} to {} ({} bytes); it contains personal data",
                        args.profile_id,
                        path.display(),
                        document.len()
                    );
                }
            }
        }
    }
    Ok(())
}

/// `text` re-indented when it is JSON, unchanged otherwise.
fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|v| serde_json::to_string_pretty(&v).ok())
        .unwrap_or_else(|| text.to_string())
}

/// Writes `bytes` to `path`, readable only by the owner on Unix (exports hold personal data).
fn write_private_file(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt as _;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    file.write_all(bytes)?;
    file.write_all(b"\n")
}

/// Asks on the terminal whether to erase; true only for `y` / `yes`.
fn confirm_erase(profile_id: &str) -> anyhow::Result<bool> {
    eprint!(
        "Erase profile {profile_id} and everything held about this person? This cannot be undone. [y/N] "
    );
    std::io::stderr().flush()?;
    let mut answer = String::new();
    std::io::stdin().lock().read_line(&mut answer)?;
    Ok(matches!(
        answer.trim().to_ascii_lowercase().as_str(),
        "y" | "yes"
    ))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use pb::value::Kind;

    fn kind(text: &str) -> Kind {
        parse_trait_value(text).kind.unwrap()
    }

    #[test]
    fn integers_become_int_values() {
        assert_eq!(kind("42"), Kind::IntValue(42));
        assert_eq!(kind("-7"), Kind::IntValue(-7));
        assert_eq!(kind("0"), Kind::IntValue(0));
    }

    #[test]
    fn decimals_become_double_values() {
        assert_eq!(kind("1.5"), Kind::DoubleValue(1.5));
        assert_eq!(kind("-2e3"), Kind::DoubleValue(-2000.0));
        assert_eq!(kind("0.25"), Kind::DoubleValue(0.25));
    }

    #[test]
    fn true_and_false_become_bool_values() {
        assert_eq!(kind("true"), Kind::BoolValue(true));
        assert_eq!(kind("false"), Kind::BoolValue(false));
        assert_eq!(kind("True"), Kind::StringValue("True".into()));
    }

    #[test]
    fn everything_else_stays_a_string() {
        assert_eq!(kind("beauty"), Kind::StringValue("beauty".into()));
        assert_eq!(kind(""), Kind::StringValue(String::new()));
        assert_eq!(kind("nan"), Kind::StringValue("nan".into()));
        assert_eq!(kind("inf"), Kind::StringValue("inf".into()));
        assert_eq!(kind("1.2.3"), Kind::StringValue("1.2.3".into()));
        assert_eq!(kind("1e999"), Kind::StringValue("1e999".into()));
    }

    #[test]
    fn leading_zeros_and_overflowing_integers_stay_strings() {
        assert_eq!(kind("007"), Kind::StringValue("007".into()));
        assert_eq!(kind("04532"), Kind::StringValue("04532".into()));
        assert_eq!(
            kind("99999999999999999999"),
            Kind::StringValue("99999999999999999999".into())
        );
    }

    #[test]
    fn trait_assignments_split_at_the_first_equals_sign() {
        let (key, value) = parse_trait_assignment("note=a=b").unwrap();
        assert_eq!(key, "note");
        assert_eq!(value.kind.unwrap(), Kind::StringValue("a=b".into()));
        assert!(parse_trait_assignment("novalue").is_err());
        assert!(parse_trait_assignment("=1").is_err());
    }

    #[test]
    fn custom_identifiers_need_a_namespace_and_a_value() {
        assert_eq!(
            parse_custom("pos.card=1234").unwrap(),
            ("pos.card".to_string(), "1234".to_string())
        );
        assert!(parse_custom("pos.card").is_err());
        assert!(parse_custom("=1234").is_err());
        assert!(parse_custom("pos.card=").is_err());
    }

    #[test]
    fn resolve_args_become_typed_identifiers_in_order() {
        let args = ResolveArgs {
            customer_ids: vec!["c-1".into()],
            emails: vec!["a@example.com".into(), "b@example.com".into()],
            phones: vec!["+82 10-1234-5678".into()],
            device_ids: vec!["dev-1".into()],
            anonymous_ids: vec!["anon-1".into()],
            custom: vec![("pos.card".into(), "9".into())],
        };
        let set = args.identifier_set().unwrap();
        let kinds: Vec<_> = set
            .identifiers
            .iter()
            .map(|i| pb::IdentifierType::try_from(i.r#type).unwrap())
            .collect();
        assert_eq!(
            kinds,
            vec![
                pb::IdentifierType::CustomerId,
                pb::IdentifierType::Email,
                pb::IdentifierType::Email,
                pb::IdentifierType::Phone,
                pb::IdentifierType::DeviceId,
                pb::IdentifierType::AnonymousId,
                pb::IdentifierType::Custom,
            ]
        );
        assert_eq!(set.identifiers[6].namespace, "pos.card");
        assert_eq!(set.identifiers[6].value, "9");
        assert!(set.identifiers[..6].iter().all(|i| i.namespace.is_empty()));
    }

    #[test]
    fn resolve_without_identifiers_is_refused() {
        assert!(ResolveArgs::default().identifier_set().is_err());
    }

    #[test]
    fn exports_are_pretty_printed_when_they_are_json() {
        assert_eq!(pretty_json("{\"a\":1}"), "{\n  \"a\": 1\n}");
        assert_eq!(pretty_json("not json"), "not json");
    }
}
