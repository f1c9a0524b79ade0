//! `lodge agent`: the workload side of the router. It listens for sessions of its workflow and
//! serves each one (exec, port-forward, rsync) on its own tunnel.

use super::TunnelConn;

pub mod exec;

/// Arguments of `lodge agent`.
#[derive(clap::Args, Debug)]
pub struct AgentArgs {
    /// Workflow this agent serves.
    #[arg(long)]
    pub workflow_id: String,
}

/// Runs the agent until interrupted.
pub async fn run(_conn: TunnelConn, _args: AgentArgs) -> i32 {
    eprintln!("lodge agent: not built yet");
    2
}
