//! `lodge port-forward`: forwards a local port to a port on the agent's loopback.

use super::TunnelConn;

/// Arguments of `lodge port-forward`.
#[derive(clap::Args, Debug)]
pub struct ForwardArgs {
    /// Workflow whose agent bridges the connections.
    #[arg(long)]
    pub workflow_id: String,
    /// LOCAL:REMOTE ports.
    pub ports: String,
}

/// Runs `lodge port-forward` until interrupted.
pub async fn run(_conn: TunnelConn, _args: ForwardArgs) -> i32 {
    eprintln!("lodge port-forward: not built yet");
    2
}
