//! `lodge client`: registrations from a terminal, and `lodge client run`, a live client built on
//! the registry client library (registers, heartbeats, fails over, unregisters on Ctrl-C).

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::Arc;
use std::time::Duration;

use clap::Subcommand;
use lodge_grpc::pb::registry::{self as pb, registry_client::RegistryClient as Stub};
use lodge_grpc::registry_client::{ClientOptions, ClientStatus, RegistryClient};
use serde_json::{json, Value};

use crate::ctl::Connection;
use crate::failover;

#[derive(Subcommand, Debug)]
pub enum Client {
    /// Register a client; prints its id and heartbeat interval.
    Register {
        #[command(flatten)]
        who: Identity,
    },
    /// Send one heartbeat for a client id.
    Heartbeat {
        client_id: String,
        /// Must match the registration if given.
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List registrations.
    List {
        #[arg(long, default_value = "")]
        namespace: String,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// One registration, with the answering member's view of its liveness.
    Get { client_id: String },
    /// End a registration.
    Unregister { client_id: String },
    /// Stay registered and heartbeating (failing over across --endpoint) until interrupted,
    /// then unregister. Prints a line at every status change.
    Run {
        #[command(flatten)]
        who: Identity,
    },
}

/// Who a client is.
#[derive(clap::Args, Debug)]
pub struct Identity {
    /// Client name.
    #[arg(long)]
    name: String,
    #[arg(long, default_value = "default")]
    namespace: String,
    #[arg(long = "client-version", default_value = env!("CARGO_PKG_VERSION"))]
    version: String,
    /// Instance identity (default for `run`: host and process id; for `register`: empty).
    #[arg(long)]
    instance: Option<String>,
    /// Metadata, KEY=VALUE (repeatable).
    #[arg(long = "meta", value_parser = parse_kv)]
    metadata: Vec<(String, String)>,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    s.split_once('=')
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .ok_or_else(|| format!("{s:?} is not KEY=VALUE"))
}

fn time(t: &Option<prost_types::Timestamp>) -> Value {
    t.as_ref().map_or(Value::Null, |t| {
        json!(t.seconds as f64 + f64::from(t.nanos) / 1e9)
    })
}

fn info_json(c: &pb::ClientInfo) -> Value {
    json!({
        "client_id": c.client_id,
        "client_name": c.client_name,
        "client_version": c.client_version,
        "namespace": c.namespace,
        "instance_id": c.instance_id,
        "metadata": c.metadata,
        "registered_at": time(&c.registered_at),
        "heartbeat_interval_ms": c.heartbeat_interval_ms,
        "lease_id": c.lease_id,
        "last_heartbeat": time(&c.last_heartbeat),
        "missed_heartbeats": c.missed_heartbeats,
        "jobs_in_flight": c.jobs_in_flight,
        "answered_by": c.answered_by,
    })
}

/// Runs a client subcommand; returns the exit code.
pub async fn run(conn: Connection, cmd: Client) -> i32 {
    if let Client::Run { who } = cmd {
        return run_client(&conn, who).await;
    }
    let result = failover::call(&conn, |ch| call(Stub::new(ch), &cmd)).await;
    match result {
        Ok(doc) => {
            print(&doc, conn.json);
            // A heartbeat the registry refused is a failure for scripts.
            i32::from(doc["re_register_required"] == true)
        }
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

async fn call(
    mut c: Stub<lodge_grpc::client::Channel>,
    cmd: &Client,
) -> Result<Value, tonic::Status> {
    Ok(match cmd {
        Client::Register { who } => {
            let r = c
                .register_client(pb::RegisterClientRequest {
                    client_name: who.name.clone(),
                    client_version: who.version.clone(),
                    namespace: who.namespace.clone(),
                    metadata: who.metadata.iter().cloned().collect(),
                    registered_at: Some(std::time::SystemTime::now().into()),
                    instance_id: who.instance.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            json!({
                "client_id": r.client_id,
                "success": r.success,
                "message": r.message,
                "heartbeat_interval_ms": r.heartbeat_interval_ms,
                "expires_at": time(&r.expires_at),
                "replaced_client_id": r.replaced_client_id,
            })
        }
        Client::Heartbeat { client_id, name } => {
            let r = c
                .heartbeat(pb::HeartbeatRequest {
                    client_id: client_id.clone(),
                    client_name: name.clone(),
                    sent_at: Some(std::time::SystemTime::now().into()),
                    metadata: HashMap::new(),
                })
                .await?
                .into_inner();
            json!({
                "success": r.success,
                "message": r.message,
                "heartbeat_interval_ms": r.heartbeat_interval_ms,
                "re_register_required": r.re_register_required,
            })
        }
        Client::List { namespace, name } => {
            let r = c
                .list_clients(pb::ListClientsRequest {
                    namespace: namespace.clone(),
                    client_name: name.clone(),
                })
                .await?
                .into_inner();
            json!({ "clients": r.clients.iter().map(info_json).collect::<Vec<_>>() })
        }
        Client::Get { client_id } => {
            let r = c
                .get_client(pb::GetClientRequest {
                    client_id: client_id.clone(),
                })
                .await?
                .into_inner();
            info_json(&r)
        }
        Client::Unregister { client_id } => {
            let r = c
                .unregister_client(pb::UnregisterClientRequest {
                    client_id: client_id.clone(),
                })
                .await?
                .into_inner();
            json!({ "success": r.success, "message": r.message })
        }
        Client::Run { .. } => unreachable!("handled by run_client"),
    })
}

fn print(doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    if let Some(clients) = doc["clients"].as_array() {
        println!(
            "{:<20} {:<20} {:<14} {:<10} {:>8} {:>6}",
            "CLIENT_ID", "NAME", "NAMESPACE", "VERSION", "MISSED", "JOBS"
        );
        for c in clients {
            println!(
                "{:<20} {:<20} {:<14} {:<10} {:>8} {:>6}",
                c["client_id"].as_str().unwrap_or(""),
                c["client_name"].as_str().unwrap_or(""),
                c["namespace"].as_str().unwrap_or(""),
                c["client_version"].as_str().unwrap_or(""),
                c["missed_heartbeats"].to_string(),
                c["jobs_in_flight"].to_string(),
            );
        }
        return;
    }
    for (k, v) in doc.as_object().into_iter().flatten() {
        println!("{k:<22} {v}");
    }
}

/// What `lodge client run` says the client is: `registering` until the first attempt fails,
/// `retrying` after that, and only once a registration exists its health (`healthy`, `warning`,
/// `error`), which measures heartbeats and so means nothing before.
fn state(s: &ClientStatus) -> String {
    match (&s.client_id, &s.last_error) {
        (None, None) => "registering".into(),
        (None, Some(_)) => "retrying".into(),
        (Some(_), _) => format!("{:?}", s.health).to_lowercase(),
    }
}

/// One status line of `lodge client run`.
fn status_line(s: &ClientStatus) -> String {
    let mut line = format!(
        "{:<11} client_id={} endpoint={} connected={} interval={}ms missed={}",
        state(s),
        s.client_id.as_deref().unwrap_or("-"),
        s.endpoint.as_deref().unwrap_or("-"),
        s.connected,
        s.interval.as_millis(),
        s.missed
    );
    if let Some(e) = &s.last_error {
        line.push_str(&format!(" error={e:?}"));
    }
    line
}

fn status_json(s: &ClientStatus) -> Value {
    json!({
        "state": state(s),
        // Health measures heartbeats: there is none before the first registration.
        "health": s.client_id.as_ref().map(|_| format!("{:?}", s.health).to_lowercase()),
        "error": s.last_error,
        "client_id": s.client_id,
        "endpoint": s.endpoint,
        "connected": s.connected,
        "interval_ms": s.interval.as_millis() as u64,
        "missed": s.missed,
        "registrations": s.registrations,
    })
}

/// Options for the registry client library from the CLI's connection flags and identity.
pub fn options(conn: &Connection, who: &Identity) -> Result<ClientOptions, String> {
    let mut opts = ClientOptions::new(failover::endpoints(conn), &who.name, &who.namespace);
    opts.tls = failover::tls(conn)?;
    opts.client_version = who.version.clone();
    if let Some(i) = &who.instance {
        opts.instance_id = i.clone();
    }
    opts.metadata = who.metadata.iter().cloned().collect();
    Ok(opts)
}

async fn run_client(conn: &Connection, who: Identity) -> i32 {
    let as_json = conn.json;
    // This command runs until stopped and must unregister before it exits, so it neither exits
    // (see `main`) nor panics when its reader has gone: its lines are just lost.
    let on_status = Arc::new(move |s: &ClientStatus| {
        let line = if as_json {
            status_json(s).to_string()
        } else {
            status_line(s)
        };
        let _ = writeln!(std::io::stdout(), "{line}");
    });
    let opts = match options(conn, &who) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("lodge: {e}");
            return 2;
        }
    };
    let client = RegistryClient::start(opts, Some(on_status));
    let mut term =
        tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).expect("SIGTERM");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
    let id = client.client_id();
    tokio::time::timeout(Duration::from_secs(10), client.shutdown())
        .await
        .ok();
    if !as_json {
        let _ = writeln!(
            std::io::stdout(),
            "stopped; unregistered {}",
            id.as_deref().unwrap_or("nothing")
        );
    }
    0
}

#[cfg(test)]
mod tests {
    use super::*;
    use lodge_grpc::registry_client::Health;

    #[test]
    fn health_is_claimed_only_once_registered() {
        let mut s = ClientStatus {
            endpoint: Some("127.0.0.1:1".into()),
            ..ClientStatus::default()
        };
        assert!(status_line(&s).starts_with("registering client_id=- "));
        assert_eq!(status_json(&s)["health"], Value::Null);
        s.last_error = Some("registering: Unavailable: connection refused".into());
        let line = status_line(&s);
        assert!(line.starts_with("retrying "), "{line}");
        assert!(
            line.ends_with("error=\"registering: Unavailable: connection refused\""),
            "{line}"
        );
        assert_eq!(status_json(&s)["state"], "retrying");
        s.client_id = Some("c-1".into());
        s.last_error = None;
        s.connected = true;
        assert!(status_line(&s).starts_with("healthy     client_id=c-1 "));
        assert_eq!(status_json(&s)["health"], "healthy");
        s.health = Health::Warning;
        assert_eq!(status_json(&s)["state"], "warning");
    }
}
