//! The agent's side of exec and rsync: runs the command under a pseudo-terminal or with pipes
//! and carries its input, output and exit status over the link.

use lodge_grpc::pb::router::{Exec, Rsync};

use crate::tunnel::Link;

/// Serves an exec session until the command has exited and its output is sent.
pub async fn serve_exec(_link: Link, _exec: Exec) -> Result<(), String> {
    Err("exec: not built yet".into())
}

/// Serves an rsync session: runs `rsync --server ...` as the user's rsync asked.
pub async fn serve_rsync(_link: Link, _rsync: Rsync) -> Result<(), String> {
    Err("rsync: not built yet".into())
}
