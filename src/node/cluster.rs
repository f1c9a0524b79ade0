//! Everything the raft member is started from: the data directory and its log, this member's
//! addresses and incarnation, the cluster's members and id, and the settings of raft and of the
//! membership actor.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use lodge_actors::cluster::disk::Disk;
use lodge_actors::cluster::force::ForceNewCluster;
use lodge_actors::cluster::members::MembershipSettings;
use lodge_actors::cluster::raft::RaftSettings;
use lodge_actors::cluster::topology::Directory;
use lodge_grpc::peer::{ClusterId, PeerLink};

use super::Refusal;
use crate::config::NodeConfig;

/// How this member takes part in its cluster.
pub struct ClusterPlan {
    pub disk: Disk,
    /// The client address others are told (the bound one unless `cluster.advertise`).
    pub advertise: String,
    /// The peer address others dial.
    pub peer_advertise: String,
    /// Tells this process apart from any other that runs (or ran) as the same member.
    pub incarnation: u64,
    /// Members to join through (empty: a founding member).
    pub join: Vec<String>,
    pub cluster: ClusterId,
    pub peer_link: PeerLink,
    /// Where snapshots being received are spooled.
    pub spool_dir: PathBuf,
    pub directory: Directory,
    pub raft_settings: RaftSettings,
    pub heartbeat_interval: Duration,
    pub membership_settings: MembershipSettings,
}

/// Opens the data directory and works out this member's place in its cluster.
pub fn plan(
    cfg: &NodeConfig,
    force_new_cluster: bool,
    grpc_local: SocketAddr,
    peer_local: SocketAddr,
) -> Result<ClusterPlan, Refusal> {
    std::fs::create_dir_all(&cfg.node.data_dir).map_err(|e| {
        Refusal::config(format!(
            "configuration error: node.data_dir: cannot create {}: {e}",
            cfg.node.data_dir.display()
        ))
    })?;
    let disk = open_log(cfg, force_new_cluster)?;
    let advertise = if cfg.cluster.advertise.is_empty() {
        grpc_local.to_string()
    } else {
        cfg.cluster.advertise.clone()
    };
    let peer_advertise = if cfg.peer.advertise.is_empty() {
        peer_local.to_string()
    } else {
        cfg.peer.advertise.clone()
    };
    let several =
        !cfg.cluster.initial_cluster.trim().is_empty() || !cfg.cluster.join.trim().is_empty();
    if several && peer_local.ip().is_unspecified() && cfg.peer.advertise.is_empty() {
        return Err(Refusal::config(format!(
            "configuration error: peer.advertise: required when peer.listen is a wildcard ({peer_local}) in a cluster: other members need an address they can dial"
        )));
    }
    crate::identity::check_own_entry(cfg, peer_local).map_err(Refusal::config)?;
    let incarnation = fastrand::u64(1..);
    let join = cfg.join_endpoints().expect("validated");
    let mut members = cfg.members().expect("validated");
    if cfg.cluster.initial_cluster.trim().is_empty() {
        // A one-member cluster: this node at the peer address it really listens on.
        members.insert(cfg.node.id, peer_advertise.clone());
    }
    let cluster = cluster_id(cfg, &join, &members).map_err(Refusal::config)?;
    let peer_link = PeerLink {
        tls: cfg.peer_client_tls(),
        cluster: cluster.clone(),
    };
    let spool_dir = cfg.node.data_dir.join("snapshots-in");
    // What a previous process left half received is of no use.
    let _ = std::fs::remove_dir_all(&spool_dir);
    std::fs::create_dir_all(&spool_dir).map_err(|e| {
        Refusal::config(format!(
            "node.data_dir: cannot create {}: {e}",
            spool_dir.display()
        ))
    })?;
    let directory = Directory::default();
    directory.set_client_address(cfg.node.id, &advertise);
    // Reachable before the raft member publishes the topology from its log.
    directory.hint(members.clone());
    let raft_settings = RaftSettings {
        id: cfg.node.id,
        // A joining node starts empty and waits for the leader's snapshot.
        initial_members: if join.is_empty() {
            members.clone().into_iter().collect()
        } else {
            Vec::new()
        },
        tick: NodeConfig::duration(cfg.cluster.tick_ms),
        election_ticks: cfg.cluster.election_ticks,
        heartbeat_ticks: cfg.cluster.heartbeat_ticks,
        snapshot_interval: cfg.cluster.snapshot_interval,
        read_timeout: NodeConfig::duration(cfg.server.request_timeout_ms),
        watch_history: cfg.cluster.watch_history,
        force_new_cluster: force_new_cluster.then(|| ForceNewCluster::new(peer_advertise.clone())),
    };
    let heartbeat_interval = NodeConfig::duration(cfg.cluster.heartbeat_interval_ms);
    let membership_settings = MembershipSettings {
        self_id: cfg.node.id,
        incarnation,
        heartbeat_interval,
        heartbeat_timeout: NodeConfig::duration(cfg.cluster.heartbeat_timeout_ms),
    };
    Ok(ClusterPlan {
        disk,
        advertise,
        peer_advertise,
        incarnation,
        join,
        cluster,
        peer_link,
        spool_dir,
        directory,
        raft_settings,
        heartbeat_interval,
        membership_settings,
    })
}

/// The raft log in the data directory; `--force-new-cluster` needs one to recover from.
fn open_log(cfg: &NodeConfig, force_new_cluster: bool) -> Result<Disk, Refusal> {
    let (disk, recovered) =
        Disk::open(&cfg.node.data_dir.join("raft")).map_err(|e| Refusal::failed(e.to_string()))?;
    if force_new_cluster
        && recovered
            .snapshot
            .get_metadata()
            .get_conf_state()
            .voters
            .is_empty()
    {
        return Err(Refusal::config(format!(
            "--force-new-cluster: {} holds no raft log; the flag recovers a member from its own data directory",
            cfg.node.data_dir.display()
        )));
    }
    Ok(disk)
}

/// This node's cluster id: the stored one; else, for a founding member, derived from the initial
/// members (or drawn for a one-member cluster) and stored; a joining node learns it in its join.
fn cluster_id(
    cfg: &NodeConfig,
    join: &[String],
    members: &BTreeMap<u64, String>,
) -> Result<ClusterId, String> {
    let dir = &cfg.node.data_dir;
    if let Some(id) = crate::cluster_id::load(dir)? {
        return Ok(ClusterId::known(id));
    }
    if !join.is_empty() {
        return Ok(Default::default());
    }
    let id = if cfg.cluster.initial_cluster.trim().is_empty() {
        crate::cluster_id::random()
    } else {
        crate::cluster_id::derive(members, &cfg.cluster.initial_cluster_token)
    };
    crate::cluster_id::store(dir, id)?;
    Ok(ClusterId::known(id))
}
