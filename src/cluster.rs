//! `lodge cluster`: membership and topology from a terminal. Changes fail over across the
//! `--endpoint` list and are forwarded to the leader by whichever member answers.

use clap::Subcommand;
use lodge_grpc::pb::cluster::{self as pb, cluster_client::ClusterClient};
use serde_json::{json, Value};

use crate::ctl::Connection;
use crate::failover;

#[derive(Subcommand, Debug)]
pub enum Cluster {
    /// The contacted member's raft state.
    Status,
    /// Members, roles, addresses and liveness as the contacted member sees them.
    Members {
        /// Only if the topology is newer than this version (else: "not modified").
        #[arg(long, default_value_t = 0)]
        min_version: u64,
    },
    /// Add a member (a voter, or a learner with --learner). A voter that would leave fewer live
    /// voters than a quorum (one not running yet, on a cluster with no live voter to spare) is
    /// refused unless --force.
    Add {
        id: u64,
        /// Its peer address, HOST:PORT (where members reach it: its peer.advertise).
        address: String,
        #[arg(long)]
        learner: bool,
        /// Skip the quorum guard (see docs/operations.md for undoing a change that lost quorum).
        #[arg(long)]
        force: bool,
    },
    /// Remove a member; refused unless --force when the live voters left would be fewer than a
    /// quorum.
    Remove {
        id: u64,
        /// Skip the quorum guard.
        #[arg(long)]
        force: bool,
    },
    /// Make a learner a voter (the same quorum guard as add).
    Promote {
        id: u64,
        /// Skip the quorum guard.
        #[arg(long)]
        force: bool,
    },
}

fn role(r: i32) -> &'static str {
    match pb::Role::try_from(r) {
        Ok(pb::Role::Voter) => "voter",
        Ok(pb::Role::Learner) => "learner",
        _ => "unknown",
    }
}

fn topology_json(t: &pb::Topology) -> Value {
    json!({
        "version": t.version,
        "leader_id": t.leader_id,
        "members": t.members.iter().map(|m| {
            let r = m.resources.unwrap_or_default();
            json!({
                "id": m.id,
                "address": m.address,
                "client_address": m.client_address,
                "role": role(m.role),
                "reachable": m.reachable,
                "last_heartbeat_ms_ago": m.last_heartbeat_ms_ago,
                "status": m.status,
                "memory_bytes": r.memory_bytes,
                "cpu_seconds": r.cpu_seconds,
                "actors": r.actors,
                "applied_index": r.applied_index,
            })
        }).collect::<Vec<_>>(),
    })
}

/// Runs a cluster subcommand; returns the exit code.
pub async fn run(conn: Connection, cmd: Cluster) -> i32 {
    let result = failover::call(&conn, |ch| call(ClusterClient::new(ch), &cmd)).await;
    match result {
        Ok(doc) => {
            print(&doc, conn.json);
            0
        }
        Err(e) => {
            eprintln!("lodge: {e}");
            1
        }
    }
}

async fn call(
    mut c: ClusterClient<lodge_grpc::client::Channel>,
    cmd: &Cluster,
) -> Result<Value, tonic::Status> {
    Ok(match cmd {
        Cluster::Status => {
            let s = c.status(pb::StatusRequest {}).await?.into_inner();
            json!({
                "id": s.id, "role": s.role, "term": s.term, "leader_id": s.leader_id,
                "commit": s.commit, "applied": s.applied, "voters": s.voters,
                "learners": s.learners, "voters_outgoing": s.voters_outgoing,
                "revision": s.revision, "snapshot_index": s.snapshot_index,
                "topology_version": s.topology_version,
            })
        }
        Cluster::Members { min_version } => {
            let r = c
                .get_topology(pb::GetTopologyRequest {
                    min_version: *min_version,
                })
                .await?
                .into_inner();
            if r.not_modified {
                json!({"not_modified": true, "version": r.version})
            } else {
                topology_json(&r.topology.unwrap_or_default())
            }
        }
        Cluster::Add {
            id,
            address,
            learner,
            force,
        } => {
            let role = if *learner {
                pb::Role::Learner
            } else {
                pb::Role::Voter
            };
            let r = c
                .register_node(pb::RegisterNodeRequest {
                    id: *id,
                    address: address.clone(),
                    role: role as i32,
                    force: *force,
                })
                .await?
                .into_inner();
            topology_json(&r.topology.unwrap_or_default())
        }
        Cluster::Remove { id, force } => {
            let r = c
                .deregister_node(pb::DeregisterNodeRequest {
                    id: *id,
                    force: *force,
                })
                .await?
                .into_inner();
            topology_json(&r.topology.unwrap_or_default())
        }
        Cluster::Promote { id, force } => {
            let r = c
                .promote_node(pb::PromoteNodeRequest {
                    id: *id,
                    force: *force,
                })
                .await?
                .into_inner();
            topology_json(&r.topology.unwrap_or_default())
        }
    })
}

fn print(doc: &Value, as_json: bool) {
    if as_json {
        println!("{doc}");
        return;
    }
    if doc["not_modified"] == true {
        println!("not modified (version {})", doc["version"]);
    } else if let Some(members) = doc["members"].as_array() {
        println!(
            "topology version {}, leader {}",
            doc["version"], doc["leader_id"]
        );
        println!(
            "{:<4} {:<22} {:<8} {:<22} {:<10} {:<12} {:>10} {:>10}",
            "ID", "ADDRESS", "ROLE", "PEER", "REACHABLE", "STATUS", "HEARD(ms)", "APPLIED"
        );
        for m in members {
            // Values' own Display ignores widths: format them as strings first.
            println!(
                "{:<4} {:<22} {:<8} {:<22} {:<10} {:<12} {:>10} {:>10}",
                m["id"].to_string(),
                // Where clients reach it ("-" until its first heartbeat reached this member).
                Some(m["client_address"].as_str().unwrap_or(""))
                    .filter(|a| !a.is_empty())
                    .unwrap_or("-"),
                m["role"].as_str().unwrap_or(""),
                m["address"].as_str().unwrap_or(""),
                m["reachable"].to_string(),
                m["status"].as_str().unwrap_or(""),
                m["last_heartbeat_ms_ago"].to_string(),
                m["applied_index"].to_string(),
            );
        }
    } else {
        for (k, v) in doc.as_object().into_iter().flatten() {
            println!("{k:<18} {v}");
        }
    }
}
