//! The `kvmesh` command.

use std::path::PathBuf;

use anyhow::Result;
use clap::{Parser, Subcommand};

mod demo;
mod proxy;

use kvmesh::serve;

#[derive(Parser)]
#[command(
    name = "kvmesh",
    version,
    about = "KV-cache infrastructure for distributed LLM inference"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
// Parsed once at start: the size of the options does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Replays a request trace on simulated engines that publish vLLM KV events over ZMQ, routes
    /// every request by kvindex's scores, and compares the cluster's prefix-cache hit rate with
    /// round-robin and random routing on the same trace.
    Demo(DemoArgs),
    /// Runs the index as a daemon: ingests vLLM KV events over ZMQ and answers score requests
    /// over HTTP and gRPC.
    Serve(serve::ServeArgs),
    /// Disaggregated prefill/decode in front of vLLM engines running kvmesh's KV connector:
    /// prefill on one engine, then decode on another that pulls the KV blocks over kvtransfer.
    Proxy(proxy::ProxyArgs),
}

/// Options of `kvmesh demo`.
#[derive(clap::Args, Debug, Clone)]
pub struct DemoArgs {
    /// Trace in the Mooncake JSONL format.
    #[arg(
        long,
        default_value = "../shared/data/mooncake/conversation_trace.jsonl"
    )]
    pub trace: PathBuf,
    /// Simulated engines.
    #[arg(long, default_value_t = 8)]
    pub engines: usize,
    /// Prefix-cache capacity of each engine, in blocks.
    #[arg(long, default_value_t = 131_072)]
    pub capacity: usize,
    /// Tokens per block (a divisor of 512).
    #[arg(long, default_value_t = 16)]
    pub block_size: usize,
    /// Replay only the first N requests.
    #[arg(long)]
    pub requests: Option<usize>,
    /// Seed of the random-routing baseline.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    match Cli::parse().command {
        Command::Demo(a) => demo::run(&a),
        Command::Serve(a) => serve::run(&a),
        Command::Proxy(a) => proxy::run(&a),
    }
}
