//! `jobcast bench`: measure a running jobcast over loopback.

use clap::Args;

/// `jobcast bench`.
#[derive(Debug, Args)]
pub(crate) struct BenchArgs {
    /// The server's base URL.
    #[arg(long, env = "JOBCAST_URL", default_value = "http://127.0.0.1:7700")]
    server: String,
}

/// Runs a benchmark.
pub(crate) async fn run(args: BenchArgs) -> anyhow::Result<()> {
    anyhow::bail!("bench against {}: not built yet", args.server)
}
