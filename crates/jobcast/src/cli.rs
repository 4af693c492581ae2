//! Client commands: tail, publish, complete, fail, delete, streams.

use std::process::ExitCode;

use clap::{Args, Subcommand};

/// Where the server is and how to authenticate.
#[derive(Debug, Clone, Args)]
pub(crate) struct ServerArgs {
    /// The server's base URL.
    #[arg(long, env = "JOBCAST_URL", default_value = "http://127.0.0.1:7700")]
    pub(crate) server: String,
    /// A bearer token.
    #[arg(long, env = "JOBCAST_TOKEN", hide_env_values = true)]
    pub(crate) token: Option<String>,
}

/// The client subcommands.
#[derive(Debug, Subcommand)]
pub(crate) enum ClientCommand {
    /// Print a stream's events as they arrive; exit 0 when it completed, 1 when it failed, 2 on error.
    Tail(TailArgs),
}

/// `jobcast tail`.
#[derive(Debug, Args)]
pub(crate) struct TailArgs {
    /// The stream to follow.
    stream: String,
    #[command(flatten)]
    server: ServerArgs,
}

/// Runs a client command.
pub(crate) async fn run(cmd: ClientCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        ClientCommand::Tail(args) => {
            anyhow::bail!(
                "tail {} on {}: not built yet",
                args.stream,
                args.server.server
            )
        }
    }
}
