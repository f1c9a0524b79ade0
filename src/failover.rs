//! Calling a cluster from the CLI: `--endpoint` is a comma-separated list.
//!
//! A call that cannot reach a node, or that a node answers UNAVAILABLE (no leader yet, an election
//! under way, a membership change in progress, shutting down), is tried on the next endpoint,
//! going round the list with a growing pause for up to [`RETRY_FOR`]. Nodes forward what only the
//! leader can do themselves. An UNAVAILABLE marked `lodge-outcome: unknown` (leadership changed
//! while the write was in flight, so it may have been applied) is never retried.

use std::future::Future;
use std::time::Duration;

use lodge_grpc::client::Channel;
use lodge_grpc::client::{self, ClientTls};
use lodge_grpc::outcome;
use tonic::{Code, Status};

use crate::ctl::Connection;

/// How long a call keeps trying endpoints that are unreachable or have no leader: about an
/// election or two.
pub const RETRY_FOR: Duration = Duration::from_secs(5);

/// How `conn` reaches a node: its TLS settings and its token.
pub fn tls(conn: &Connection) -> Result<ClientTls, String> {
    Ok(ClientTls {
        bearer: conn.token()?,
        ca: conn.tls_ca.clone(),
        cert: conn.tls_cert.clone(),
        key: conn.tls_key.clone(),
        domain: conn.tls_domain.clone(),
    })
}

/// The endpoints of `conn`, in order.
pub fn endpoints(conn: &Connection) -> Vec<String> {
    conn.endpoint
        .split(',')
        .map(str::trim)
        .filter(|e| !e.is_empty())
        .map(String::from)
        .collect()
}

/// Runs `call` on the endpoints in turn as described above; the error is one line for people.
pub async fn call<T, F, Fut>(conn: &Connection, call: F) -> Result<T, String>
where
    F: Fn(Channel) -> Fut,
    Fut: Future<Output = Result<T, Status>>,
{
    let tls = tls(conn)?;
    let mut endpoints = endpoints(conn);
    let mut last = String::from("no endpoint given");
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut pause = Duration::from_millis(50);
    let mut hops = 0;
    loop {
        let mut hint = None;
        for ep in &endpoints {
            let channel = match client::connect(ep, &tls).await {
                Ok(c) => c,
                Err(e) => {
                    last = e;
                    continue;
                }
            };
            match call(channel).await {
                Ok(v) => return Ok(v),
                Err(s) if s.code() == Code::Unavailable && !outcome::outcome_unknown(&s) => {
                    last = format!("{ep}: {:?}: {}", s.code(), s.message());
                    // A member that names the leader is followed at once.
                    hint = leader_hint(&s).filter(|l| l != ep);
                    if hint.is_some() {
                        break;
                    }
                }
                Err(s) => return Err(client::status_line(&s)),
            }
        }
        if let Some(leader) = hint {
            endpoints.retain(|e| *e != leader);
            endpoints.insert(0, leader);
            // Hints may chase each other during an election: follow a few, then pause.
            hops += 1;
            if hops <= 3 && tokio::time::Instant::now() < deadline {
                continue;
            }
        }
        hops = 0;
        if endpoints.is_empty() || tokio::time::Instant::now() + pause > deadline {
            return Err(last);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The leader's address a member put in an UNAVAILABLE answer (`lodge-leader`), if any.
fn leader_hint(s: &Status) -> Option<String> {
    s.metadata()
        .get("lodge-leader")
        .and_then(|v| v.to_str().ok())
        .map(String::from)
}

/// A channel to the first endpoint that accepts a connection (for streams, which are not
/// retried once open).
pub async fn first_channel(conn: &Connection) -> Result<(String, Channel), String> {
    let tls = tls(conn)?;
    let mut last = String::from("no endpoint given");
    for ep in endpoints(conn) {
        match client::connect(&ep, &tls).await {
            Ok(c) => return Ok((ep, c)),
            Err(e) => last = e,
        }
    }
    Err(last)
}
