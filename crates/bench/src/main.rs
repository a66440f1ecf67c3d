//! `clientele-bench`: load generators behind `make bench` (see `scripts/bench.sh`).
//!
//! Each subcommand drives one service with a closed-loop load (a fixed number of concurrent
//! callers, each issuing its next call as soon as the previous one answers) and measures a raw
//! baseline on the same machine in the same run, so results are reported as ratios that stay
//! meaningful across machines. Missing a goal prints `MISS`; only errors exit non-zero.

mod assign;
mod baseline;
mod cpu;
mod decide;
mod ingest;
mod load;
mod profiles;
mod report;
mod segmentation;

use clap::Parser;

/// Command line of `clientele-bench`.
#[derive(Debug, Parser)]
#[command(name = "clientele-bench", version, about = "Clientele load generators")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, clap::Subcommand)]
enum Command {
    /// GetProfile over gRPC with a hot Redis cache, beside raw Redis GET throughput.
    Profiles(profiles::ProfilesArgs),
    /// A generated event stream through IngestStream, beside a raw PostgreSQL COPY.
    Ingest(ingest::IngestArgs),
    /// ExperimentService Assign / BatchAssign over gRPC, beside gRPC health Check.
    Assign(assign::AssignArgs),
    /// Segmentation batch recompute, real-time re-score and k-means beside scikit-learn.
    Segmentation(segmentation::SegmentationArgs),
    /// OfferService.Decide at a fixed rate and ledger accrual, beside baselines.
    Decide(decide::DecideArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    match cli.command {
        Command::Profiles(args) => runtime.block_on(profiles::run(args)),
        Command::Ingest(args) => runtime.block_on(ingest::run(args)),
        Command::Assign(args) => runtime.block_on(assign::run(args)),
        Command::Segmentation(args) => runtime.block_on(segmentation::run(args)),
        Command::Decide(args) => runtime.block_on(decide::run(args)),
    }
}
