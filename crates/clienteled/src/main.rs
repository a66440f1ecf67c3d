//! `clienteled`: the Clientele server binary. See the crate library for what it assembles.

use clap::Parser;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clienteled::run(clienteled::Args::parse()).await
}
