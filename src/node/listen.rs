//! The node's sockets, bound before anything else starts so that a taken port fails the start.

use std::net::SocketAddr;

use lodge_actors::balancer::dataplane::{cannot_listen, ListenerSpec};
use lodge_grpc::server;
use tokio::net::TcpListener;

use super::Refusal;
use crate::config::NodeConfig;

/// The bound listeners and the addresses they really have (port 0 picks one).
pub struct Listeners {
    pub grpc: TcpListener,
    pub metrics: TcpListener,
    pub peer: TcpListener,
    pub grpc_local: SocketAddr,
    pub metrics_local: SocketAddr,
    pub peer_local: SocketAddr,
    /// The balancer's data plane: bound here, though a listener actor's later incarnations bind
    /// their address again (see `dataplane`).
    pub data: Vec<ListenerSpec>,
    /// Where the data plane listens, for the balancer's answers.
    pub data_addresses: Vec<String>,
}

/// Binds the client port, the metrics port, the peer port and the data plane's ports.
pub fn bind(cfg: &NodeConfig, rt: &tokio::runtime::Runtime) -> Result<Listeners, Refusal> {
    let grpc_addr = cfg.grpc_addr().expect("validated");
    let metrics_addr = cfg.metrics_addr().expect("validated");
    let peer_addr = cfg.peer_addr().expect("validated");
    let (grpc, metrics, peer) = rt
        .block_on(async {
            let grpc = server::bind(grpc_addr)
                .await
                .map_err(|e| cannot_listen(grpc_addr, "server.listen", &e))?;
            let metrics = server::bind(metrics_addr)
                .await
                .map_err(|e| cannot_listen(metrics_addr, "metrics.listen", &e))?;
            let peer = server::bind(peer_addr)
                .await
                .map_err(|e| cannot_listen(peer_addr, "peer.listen", &e))?;
            Ok::<_, String>((grpc, metrics, peer))
        })
        .map_err(Refusal::failed)?;
    let mut data = Vec::new();
    for (addr, protocol) in cfg.balancer_listeners().expect("validated") {
        match std::net::TcpListener::bind(addr).and_then(|s| ListenerSpec::new(s, protocol)) {
            Ok(spec) => data.push(spec),
            Err(e) => return Err(Refusal::failed(cannot_listen(addr, "balancer.listen", &e))),
        }
    }
    let data_addresses = data.iter().map(|l| l.address().to_string()).collect();
    Ok(Listeners {
        grpc_local: grpc.local_addr().expect("bound socket"),
        metrics_local: metrics.local_addr().expect("bound socket"),
        peer_local: peer.local_addr().expect("bound socket"),
        grpc,
        metrics,
        peer,
        data,
        data_addresses,
    })
}
