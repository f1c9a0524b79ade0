//! `lodge sessions`: list, inspect and terminate router sessions.

use clap::Subcommand;

use super::TunnelConn;

/// `lodge sessions` subcommands.
#[derive(Subcommand, Debug)]
pub enum Sessions {
    /// Sessions across the cluster.
    List,
}

/// Runs a `lodge sessions` subcommand.
pub async fn run(_conn: TunnelConn, _cmd: Sessions) -> i32 {
    eprintln!("lodge sessions: not built yet");
    2
}
