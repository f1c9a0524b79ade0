//! Startup identity checks: a node must be where the cluster will look for it, and must not run
//! as a member that another live process already is. Both run before the node says it is ready;
//! a node that fails one exits 2 (a configuration problem, not a crash to restart from).
//!
//! Liveness is told by process incarnation: every process draws a random `u64` at start, answered
//! by `Cluster/Status` and carried in heartbeats. A member id answering at some address with
//! another incarnation than this process's is another process.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::time::Duration;

use lodge_actors::cluster::topology::Directory;
use lodge_grpc::cluster::probe;
use lodge_grpc::pb::cluster::{self as pb, cluster_client::ClusterClient};
use lodge_grpc::peer::PeerLink;
use slog::{warn, Logger};

use crate::config::NodeConfig;

/// The longest each round of questions to other members may take. A member that is down answers
/// at once (connection refused); this bounds only the silent ones.
const ASK_TIMEOUT: Duration = Duration::from_secs(1);

/// `cluster.initial_cluster`'s entry for this node must be an address its peer port is reached
/// at: the bound peer listen address or `peer.advertise`. Otherwise the others dial somewhere
/// else and it never hears from a leader.
pub fn check_own_entry(cfg: &NodeConfig, bound: SocketAddr) -> Result<(), String> {
    if cfg.cluster.initial_cluster.trim().is_empty() {
        return Ok(());
    }
    let members = cfg.members().map_err(|e| e.to_string())?;
    let Some(entry) = members.get(&cfg.node.id) else {
        return Ok(()); // refused by the configuration's validation already
    };
    let advertise = cfg.peer.advertise.trim();
    let same = |a: &str, b: &str| {
        a == b
            || matches!((a.parse::<SocketAddr>(), b.parse::<SocketAddr>()), (Ok(x), Ok(y)) if x == y)
    };
    if same(entry, &bound.to_string()) || (!advertise.is_empty() && same(entry, advertise)) {
        return Ok(());
    }
    let reached = if advertise.is_empty() {
        format!("its peer port listens on {bound} (peer.listen)")
    } else {
        format!(
            "its peer port listens on {bound} (peer.listen) and advertises {advertise} (peer.advertise)"
        )
    };
    Err(format!(
        "configuration error: cluster.initial_cluster: this node's entry {}={entry} is not where it is reached: {reached}; the other members would never reach it. Entries are peer addresses: make the entry this node's peer address (or set peer.advertise to it)",
        cfg.node.id
    ))
}

/// What [`check_unique`] needs.
pub struct Unique {
    pub id: u64,
    pub incarnation: u64,
    /// The peer address this node advertises.
    pub advertise: String,
    pub directory: Directory,
    /// `cluster.join`'s members, asked too.
    pub join: Vec<String>,
    pub link: PeerLink,
    pub log: Logger,
}

/// Refuses to go on when another live process runs as member `id`: every member this node
/// knows of (its topology, `cluster.join`) is asked where member `id` is, and each such address
/// is asked which member and which process answers there. Members that cannot be reached are
/// skipped: a cluster restarting as a whole must be able to start.
pub async fn check_unique(u: &Unique) -> Result<(), String> {
    let mut peers: BTreeSet<String> = u
        .directory
        .addresses()
        .into_iter()
        .filter(|(id, _)| *id != u.id)
        .map(|(_, a)| a)
        .collect();
    peers.extend(u.join.iter().cloned());
    // Asked all at once: the round takes ASK_TIMEOUT at most, however many are silent.
    let mut asked = tokio::task::JoinSet::new();
    for peer in peers {
        let (id, link) = (u.id, u.link.clone());
        asked.spawn(async move { (where_is(&peer, id, &link).await, peer) });
    }
    let mut places: Vec<(String, String)> = Vec::new();
    while let Some(answer) = asked.join_next().await {
        if let Ok((Some(addr), peer)) = answer {
            places.push((addr, format!("member at {peer}")));
        }
    }
    if let Some(own) = u.directory.address(u.id) {
        places.push((own, "this node's own log or configuration".into()));
    }
    let mut probed = BTreeSet::new();
    for (addr, source) in &places {
        if !probed.insert(addr.clone()) {
            continue;
        }
        match probe(addr, &u.link, ASK_TIMEOUT).await {
            Some((id, incarnation)) if id == u.id && incarnation != u.incarnation => {
                return Err(format!(
                    "node.id {id}: member {id} already runs at {addr} (another process, incarnation {incarnation:016x}); refusing to start a second process as member {id}. Give this node an unused id (and --join), or stop the other process first"
                ));
            }
            Some((id, incarnation)) if id == u.id && incarnation == u.incarnation => {}
            _ if *addr != u.advertise => {
                // Known somewhere this process is not reached: the others will not find it.
                warn!(u.log, "the cluster knows this member at another address than this node advertises; the other members will not reach it"; "member" => u.id, "known_at" => addr, "per" => source, "advertise" => &u.advertise);
            }
            _ => {}
        }
    }
    Ok(())
}

/// Asks the member at `peer` where member `id` is, per its topology.
async fn where_is(peer: &str, id: u64, link: &PeerLink) -> Option<String> {
    let call = async {
        let channel = link.connect(peer).await.ok()?;
        let mut req = tonic::Request::new(pb::GetTopologyRequest { min_version: 0 });
        req.set_timeout(ASK_TIMEOUT);
        let t = ClusterClient::new(channel)
            .get_topology(req)
            .await
            .ok()?
            .into_inner()
            .topology?;
        t.members
            .into_iter()
            .find(|m| m.id == id)
            .map(|m| m.address)
            .filter(|a| !a.is_empty())
    };
    tokio::time::timeout(ASK_TIMEOUT, call).await.ok().flatten()
}
