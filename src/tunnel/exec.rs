//! `lodge exec`: runs a command on an agent through the router.

use super::TunnelConn;

/// Arguments of `lodge exec`.
#[derive(clap::Args, Debug)]
pub struct ExecArgs {
    /// Workflow whose agent runs the command.
    #[arg(long)]
    pub workflow_id: String,
    /// Command and arguments.
    #[arg(trailing_var_arg = true, required = true)]
    pub command: Vec<String>,
}

/// Runs `lodge exec`; answers the process exit code.
pub async fn run(_conn: TunnelConn, _args: ExecArgs) -> i32 {
    eprintln!("lodge exec: not built yet");
    2
}
