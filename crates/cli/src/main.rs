//! `clientele`: the command-line tool for a Clientele server — resolve identifiers to
//! profiles, inspect and update them, erase and export a person's data, seed demo data,
//! generate a synthetic customer history and import historical data.

mod client;
mod demo;
mod experiments;
mod json;
mod money;
mod offers;
mod profiles;
mod render;
mod segments;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use clientele::{generate, import};

use crate::client::ConnectionOptions;

/// Command-line arguments of `clientele`.
#[derive(Debug, Parser)]
#[command(name = "clientele", version, about = "Clientele command-line tool")]
struct Cli {
    #[command(flatten)]
    connection: ConnectionOptions,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Customer profiles: resolve, get, traits, consent, erase, export.
    #[command(subcommand)]
    Profiles(profiles::ProfilesCommand),
    /// Seed demo customers through the public API and print a report.
    Demo(demo::DemoArgs),
    /// A/B experiments: create, start, stop, results.
    #[command(subcommand)]
    Experiments(experiments::ExperimentsCommand),
    /// Write a synthetic customer base and event history (JSON Lines and/or CSV).
    Generate(generate::GenerateArgs),
    /// Load historical transactions (CSV) or events (JSON Lines) through IngestStream.
    Import(import::ImportArgs),
    /// Offers: list, create, decide, issue, redeem.
    #[command(subcommand)]
    Offers(offers::OffersCommand),
    /// Loyalty points: balance, ledger, adjust, redeem.
    #[command(subcommand)]
    Points(offers::PointsCommand),
    /// Segments: list, show, members, flows between runs, recompute.
    #[command(subcommand)]
    Segments(segments::SegmentsCommand),
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Profiles(command) => profiles::run(command, &cli.connection).await,
        Command::Demo(args) => demo::run(args, &cli.connection).await,
        Command::Experiments(command) => experiments::run(command, &cli.connection).await,
        Command::Offers(command) => offers::run(command, &cli.connection).await,
        Command::Points(command) => offers::run_points(command, &cli.connection).await,
        Command::Segments(command) => segments::run(command, &cli.connection).await,
        Command::Generate(args) => {
            generate::run(args, cli.connection.output == client::OutputFormat::Json)
        }
        Command::Import(args) => match client::authed_channel(&cli.connection) {
            Ok(channel) => {
                import::run(
                    args,
                    channel,
                    cli.connection.output == client::OutputFormat::Json,
                )
                .await
            }
            Err(e) => Err(e),
        },
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {}", describe_error(&err, &cli.connection.endpoint));
            ExitCode::FAILURE
        }
    }
}

/// The text after `error: `: a gRPC status anywhere in the chain is shown as `CODE: message`
/// (with advice for unreachable servers and rejected tokens); anything else with its causes.
fn describe_error(err: &anyhow::Error, endpoint: &str) -> String {
    match err.chain().find_map(|e| e.downcast_ref::<tonic::Status>()) {
        Some(status) => client::describe_status(status, endpoint),
        None => format!("{err:#}"),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use clap::CommandFactory as _;

    use super::*;

    #[test]
    fn the_command_line_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn global_options_may_follow_the_subcommand() {
        let cli = Cli::try_parse_from([
            "clientele",
            "profiles",
            "get",
            "p-1",
            "--output",
            "json",
            "--endpoint",
            "http://h:1",
        ])
        .unwrap();
        assert_eq!(cli.connection.output, client::OutputFormat::Json);
        assert_eq!(cli.connection.endpoint, "http://h:1");
    }

    #[test]
    fn traits_need_something_to_set_or_remove() {
        assert!(Cli::try_parse_from(["clientele", "profiles", "traits", "p-1"]).is_err());
        assert!(
            Cli::try_parse_from(["clientele", "profiles", "traits", "p-1", "--remove", "x"])
                .is_ok()
        );
    }

    #[test]
    fn resolve_needs_at_least_one_identifier() {
        assert!(Cli::try_parse_from(["clientele", "profiles", "resolve"]).is_err());
        assert!(
            Cli::try_parse_from(["clientele", "profiles", "resolve", "--custom", "pos.card=1"])
                .is_ok()
        );
    }
}
