//! `clienteled`: the Clientele server binary. See the crate library for what it assembles.

use clap::Parser;

/// jemalloc instead of glibc malloc: under the ingest stream, glibc's `malloc`, `free` and
/// `malloc_consolidate` were about a third of the services' CPU samples (system-wide `perf`,
/// BENCHMARKS.md session 8). jemalloc does not build for MSVC; there the system allocator stays.
#[cfg(not(target_env = "msvc"))]
#[global_allocator]
static GLOBAL: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    clienteled::run(clienteled::Args::parse()).await
}
