//! `lodge sessions`: list, inspect and terminate router sessions. Tables for people, `--json`
//! for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::Subcommand;
use lodge_grpc::pb::router::SessionInfo;
use lodge_grpc::router_client::RouterClient;
use serde_json::{json, Value};
use tonic::{Code, Status};

use super::TunnelConn;
use crate::{ctl, failover};

/// How long one control call may take (an info is forwarded to the session's owner).
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

/// `lodge sessions` subcommands.
#[derive(Subcommand, Debug)]
pub enum Sessions {
    /// Sessions across the cluster.
    List {
        /// Only the sessions of this workflow.
        #[arg(long, default_value = "")]
        workflow_id: String,
    },
    /// One session's details.
    Info {
        /// The session's key.
        session_key: String,
    },
    /// End a session: both sides get ABORTED with the reason.
    Terminate {
        /// The session's key.
        session_key: String,
        /// Told to both sides.
        #[arg(long, default_value = "terminated by an operator")]
        reason: String,
    },
}

/// A control call's answer.
enum Answer {
    List(Vec<SessionInfo>),
    Info(SessionInfo),
    Terminated(String, bool),
}

/// Runs a `lodge sessions` subcommand; answers the exit code.
pub async fn run(conn: TunnelConn, cmd: Sessions) -> i32 {
    match call(&conn, &cmd).await {
        Ok(answer) => {
            print(&answer, conn.conn.json);
            // A terminate that ended nothing is a failure for scripts.
            i32::from(matches!(answer, Answer::Terminated(_, false)))
        }
        Err(e) => {
            eprintln!("lodge sessions: {e}");
            1
        }
    }
}

/// Makes the call, going round the endpoints while they are unreachable or have no leader.
async fn call(conn: &TunnelConn, cmd: &Sessions) -> Result<Answer, String> {
    let token = conn.token()?;
    // The outer error is what `failover::call` retries (UNAVAILABLE) or reports; the inner one
    // is final and already worded for people.
    let answer = failover::call(&conn.conn, |channel| {
        let token = token.clone();
        async move {
            let router = match RouterClient::new(channel, token.as_deref()) {
                Ok(r) => r,
                Err(e) => return Ok(Err(e)),
            };
            match ask(&router, cmd).await {
                Ok(a) => Ok(Ok(a)),
                Err(s) if s.code() == Code::Unavailable => Err(s),
                Err(s) => Ok(Err(explain(cmd, &s, token.is_some()))),
            }
        }
    })
    .await?;
    answer
}

async fn ask(router: &RouterClient, cmd: &Sessions) -> Result<Answer, Status> {
    Ok(match cmd {
        Sessions::List { workflow_id } => {
            Answer::List(router.list(workflow_id, CALL_TIMEOUT).await?)
        }
        Sessions::Info { session_key } => {
            Answer::Info(router.info(session_key, CALL_TIMEOUT).await?)
        }
        Sessions::Terminate {
            session_key,
            reason,
        } => Answer::Terminated(
            session_key.clone(),
            router.terminate(session_key, reason, CALL_TIMEOUT).await?,
        ),
    })
}

/// One line for a failed call.
fn explain(cmd: &Sessions, s: &Status, token_given: bool) -> String {
    match cmd {
        Sessions::Info { session_key } | Sessions::Terminate { session_key, .. }
            if s.code() == Code::NotFound =>
        {
            format!("session {session_key}: unknown session key")
        }
        _ => format!("{:?}: {}", s.code(), super::explain(s, token_given)),
    }
}

fn print(answer: &Answer, as_json: bool) {
    match answer {
        Answer::List(sessions) if as_json => println!(
            "{}",
            json!({ "sessions": sessions.iter().map(session_json).collect::<Vec<_>>() })
        ),
        Answer::List(sessions) => print_list(sessions),
        Answer::Info(s) if as_json => println!("{}", session_json(s)),
        Answer::Info(s) => print_info(s),
        Answer::Terminated(key, terminated) if as_json => {
            println!(
                "{}",
                json!({ "session_key": key, "terminated": terminated })
            )
        }
        Answer::Terminated(key, true) => println!("terminated session {key}"),
        Answer::Terminated(key, false) => {
            println!("session {key} was not terminated (it may have just ended)")
        }
    }
}

fn session_json(s: &SessionInfo) -> Value {
    json!({
        "session_key": s.session_key,
        "workflow_id": s.workflow_id,
        "active": s.active,
        "state": state(s),
        "created_at": s.created_at.as_ref().map(|t| t.seconds as f64 + f64::from(t.nanos) / 1e9),
        "operation_type": s.operation_type,
        "detail": s.detail,
        "owner": s.owner,
        "user_connected": s.user_connected,
        "agent_connected": s.agent_connected,
        "bytes_user_to_agent": s.bytes_user_to_agent,
        "bytes_agent_to_user": s.bytes_agent_to_user,
    })
}

fn state(s: &SessionInfo) -> &'static str {
    match (s.active, s.user_connected, s.agent_connected) {
        (true, _, _) => "active",
        (false, true, false) => "waiting-for-agent",
        (false, false, true) => "waiting-for-user",
        _ => "ending",
    }
}

fn print_list(sessions: &[SessionInfo]) {
    let mut rows = vec![[
        "SESSION",
        "WORKFLOW",
        "OPERATION",
        "DETAIL",
        "STATE",
        "AGE",
        "OWNER",
        "TO AGENT",
        "TO USER",
    ]
    .map(String::from)
    .to_vec()];
    for s in sessions {
        rows.push(vec![
            s.session_key.clone(),
            s.workflow_id.clone(),
            or_dash(&s.operation_type),
            or_dash(&s.detail),
            state(s).into(),
            age(s),
            s.owner.to_string(),
            bytes(s.bytes_user_to_agent),
            bytes(s.bytes_agent_to_user),
        ]);
    }
    ctl::print_table(&rows);
    println!("({} sessions)", sessions.len());
}

fn print_info(s: &SessionInfo) {
    let lines = [
        ("session_key", s.session_key.clone()),
        ("workflow_id", s.workflow_id.clone()),
        ("operation", or_dash(&s.operation_type)),
        ("detail", or_dash(&s.detail)),
        ("state", state(s).into()),
        ("age", age(s)),
        ("owner", s.owner.to_string()),
        ("user_connected", s.user_connected.to_string()),
        ("agent_connected", s.agent_connected.to_string()),
        ("bytes_user_to_agent", s.bytes_user_to_agent.to_string()),
        ("bytes_agent_to_user", s.bytes_agent_to_user.to_string()),
    ];
    for (k, v) in lines {
        println!("{k:<22} {v}");
    }
}

fn or_dash(s: &str) -> String {
    if s.is_empty() {
        "-".into()
    } else {
        s.into()
    }
}

/// Time since the session was created, in the two largest units ("3m12s").
fn age(s: &SessionInfo) -> String {
    let Some(created) = &s.created_at else {
        return "-".into();
    };
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    duration_words(u64::try_from(now - created.seconds).unwrap_or(0))
}

/// Seconds in the two largest units ("3m12s", "2h05m").
pub(crate) fn duration_words(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    match (d, h, m) {
        (0, 0, 0) => format!("{s}s"),
        (0, 0, _) => format!("{m}m{s:02}s"),
        (0, _, _) => format!("{h}h{m:02}m"),
        _ => format!("{d}d{h:02}h"),
    }
}

/// A byte count in binary units ("1.5 MiB").
pub(crate) fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_and_sizes_read_well() {
        assert_eq!(duration_words(7), "7s");
        assert_eq!(duration_words(192), "3m12s");
        assert_eq!(duration_words(2 * 3600 + 5 * 60 + 9), "2h05m");
        assert_eq!(duration_words(3 * 86_400 + 4 * 3600), "3d04h");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(1536), "1.5 KiB");
        assert_eq!(bytes(5 << 30), "5.0 GiB");
    }

    #[test]
    fn states_follow_the_connected_sides() {
        let mut s = SessionInfo {
            user_connected: true,
            ..Default::default()
        };
        assert_eq!(state(&s), "waiting-for-agent");
        s.agent_connected = true;
        s.active = true;
        assert_eq!(state(&s), "active");
        s.active = false;
        s.user_connected = false;
        assert_eq!(state(&s), "waiting-for-user");
    }
}
