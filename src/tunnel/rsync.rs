//! `lodge rsync`: the real rsync, with the router as its remote shell.
//!
//! `lodge rsync [lodge flags] [rsync options] SRC DEST` runs the local rsync with
//! `-e "<this lodge> rsync-shell <lodge flags>"` and the user's arguments unchanged; the remote
//! side is written WORKFLOW:PATH. rsync runs that shell as `SHELL WORKFLOW rsync --server ...`,
//! and `lodge rsync-shell` carries the command to the workflow's agent in an rsync session and
//! relays rsync's protocol on its stdin and stdout. The token reaches the shell as it reached
//! `lodge rsync`: `LODGE_TOKEN` is inherited, `--token-file` is passed on.
//!
//! Lodge's flags go before rsync's: the first argument that is not one of lodge's starts rsync's.
//! (So rsync's `-h` cannot come first, where it would ask for lodge's help: bundle it, `-avh`,
//! or write `--human-readable`.)
//! There is no shell on the agent's side, so remote paths are relative to the agent's working
//! directory (no `~`), and remote wildcards are expanded only with rsync's `-s`.

use std::path::Path;

use lodge_grpc::pb::router::{user_init, Rsync, UserInit};
use lodge_grpc::router_client::new_session_key;

use super::exec::session;
use super::TunnelConn;

/// Arguments of `lodge rsync`.
#[derive(clap::Args, Debug)]
pub struct RsyncArgs {
    /// rsync options, SRC and DEST; the remote side is written WORKFLOW:PATH.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub args: Vec<String>,
}

/// Runs `lodge rsync`; answers rsync's exit code.
pub async fn run(conn: TunnelConn, args: RsyncArgs) -> i32 {
    if let Some(flag) = remote_shell_flag(&args.args) {
        eprintln!("lodge rsync: {flag}: lodge gives rsync its remote shell itself; drop the flag");
        return 2;
    }
    let shell = match remote_shell(&conn) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("lodge rsync: {e}");
            return 2;
        }
    };
    let status = tokio::process::Command::new("rsync")
        .arg("-e")
        .arg(&shell)
        .args(&args.args)
        .status()
        .await;
    match status {
        Ok(status) => session::local_exit_code(status),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            eprintln!("lodge rsync: rsync: not found on PATH (install rsync)");
            127
        }
        Err(e) => {
            eprintln!("lodge rsync: running rsync: {e}");
            126
        }
    }
}

/// The first of the user's arguments that would set rsync's remote shell (`-e`, `--rsh`), which
/// would replace ours. Bundled short options (`-avze ssh`) are not looked into.
fn remote_shell_flag(args: &[String]) -> Option<&str> {
    args.iter()
        .take_while(|a| *a != "--")
        .map(String::as_str)
        .find(|a| a.starts_with("--rsh") || (a.starts_with("-e") && !a.starts_with("--")))
}

/// The `-e` value: this executable's `rsync-shell` with the flags that reach the router.
fn remote_shell(conn: &TunnelConn) -> Result<String, String> {
    let exe = std::env::current_exe().map_err(|e| format!("finding the lodge executable: {e}"))?;
    let mut words = vec![
        utf8(&exe, "the lodge executable's path")?,
        "rsync-shell".to_string(),
        "--endpoint".to_string(),
        conn.conn.endpoint.clone(),
    ];
    let files = [
        ("--tls-ca", &conn.conn.tls_ca),
        ("--tls-cert", &conn.conn.tls_cert),
        ("--tls-key", &conn.conn.tls_key),
        ("--token-file", &conn.conn.token_file),
    ];
    for (flag, path) in files {
        if let Some(path) = path {
            // Absolute, so that it means the same wherever rsync starts the shell.
            let path =
                std::path::absolute(path).map_err(|e| format!("{flag} {}: {e}", path.display()))?;
            words.push(flag.to_string());
            words.push(utf8(&path, flag)?);
        }
    }
    if let Some(domain) = &conn.conn.tls_domain {
        words.push("--tls-domain".to_string());
        words.push(domain.clone());
    }
    Ok(words
        .iter()
        .map(|w| rsh_quote(w))
        .collect::<Vec<_>>()
        .join(" "))
}

fn utf8(path: &Path, what: &str) -> Result<String, String> {
    path.to_str()
        .map(str::to_string)
        .ok_or_else(|| format!("{what}: {} is not UTF-8", path.display()))
}

/// `word` quoted for rsync's own splitting of `-e`: words are separated by spaces, and a
/// single-quoted word keeps everything but a single quote, which is written twice.
fn rsh_quote(word: &str) -> String {
    let plain = !word.is_empty() && !word.contains([' ', '\t', '\'', '"']);
    if plain {
        word.to_string()
    } else {
        format!("'{}'", word.replace('\'', "''"))
    }
}

/// Arguments of `lodge rsync-shell`, rsync's remote shell (see the module doc).
#[derive(clap::Args, Debug)]
pub struct RsyncShellArgs {
    /// rsync's `-l USER`, from USER@WORKFLOW:PATH; refused (a session has no login user).
    #[arg(short = 'l', hide = true)]
    pub login: Option<String>,
    /// The workflow (rsync's remote host).
    pub host: String,
    /// The command rsync runs remotely (`rsync --server ...`).
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
    pub command: Vec<String>,
}

/// Runs `lodge rsync-shell`; answers the remote rsync's exit code (255 if the session failed).
pub async fn run_shell(conn: TunnelConn, args: RsyncShellArgs) -> i32 {
    let fail = |why: &str| session::Outcome::Failed(why.to_string()).finish("lodge rsync");
    if let Some(user) = args.login {
        return fail(&format!(
            "{user}@{}: a user in the remote path is not supported; write WORKFLOW:PATH",
            args.host
        ));
    }
    let init = UserInit {
        session_key: new_session_key(),
        workflow_id: args.host,
        operation: Some(user_init::Operation::Rsync(Rsync {
            command: args.command,
        })),
    };
    match session::open(&conn, init, None, "lodge rsync").await {
        Ok((link, io)) => session::run(link, io).await,
        Err(e) => session::Outcome::Failed(e),
    }
    .finish("lodge rsync")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rsh_quote_follows_rsyncs_splitting() {
        assert_eq!(rsh_quote("/usr/bin/lodge"), "/usr/bin/lodge");
        assert_eq!(rsh_quote("/a b/lodge"), "'/a b/lodge'");
        assert_eq!(rsh_quote("it's"), "'it''s'");
        assert_eq!(rsh_quote(""), "''");
    }

    #[test]
    fn a_users_remote_shell_is_refused() {
        let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(remote_shell_flag(&args(&["-av", "src", "w:dst"])), None);
        assert_eq!(
            remote_shell_flag(&args(&["-e", "ssh", "src", "w:dst"])),
            Some("-e")
        );
        assert_eq!(
            remote_shell_flag(&args(&["--rsh=ssh", "s", "d"])),
            Some("--rsh=ssh")
        );
        assert_eq!(remote_shell_flag(&args(&["--exclude=x", "s", "d"])), None);
        assert_eq!(remote_shell_flag(&args(&["--", "-e", "d"])), None);
    }
}
