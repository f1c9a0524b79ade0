//! What a node serves on its gRPC port, named in one place. Health answers for exactly these
//! names, reflection lists exactly these, and the metrics label exactly their methods;
//! `server::node_services` refuses to start if its routes hold anything else. A service moved to
//! another port (or process) moves out of this list into that port's own.

use std::collections::HashSet;

/// The services a node answers on its client port, by their full gRPC names. A proto package may
/// define services a node does not serve (`lodge.balancer.v1.Module` is served by modules, and
/// called by nodes): those are not here, so nothing advertises them.
pub const NODE_SERVICES: &[&str] = &[
    HEALTH,
    REFLECTION_V1,
    REFLECTION_V1ALPHA,
    "lodge.admin.v1.Admin",
    "lodge.balancer.v1.Balancer",
    "lodge.cluster.v1.Cluster",
    "lodge.kv.v1.KV",
    "lodge.registry.v1.Registry",
    "lodge.registry.v1.Translation",
    "lodge.router.v1.RouterControl",
    "lodge.router.v1.Tunnel",
    "lodge.workflow.v1.Workflow",
];

/// The services a node answers on its peer port: the raft transport, and the node's own services
/// for node-to-node calls (forwarding to the leader, heartbeats, relays). No health or
/// reflection: nothing but members calls there.
pub const PEER_SERVICES: &[&str] = &[
    "lodge.admin.v1.Admin",
    "lodge.balancer.v1.Balancer",
    "lodge.cluster.v1.Cluster",
    "lodge.kv.v1.KV",
    RAFT,
    "lodge.registry.v1.Registry",
    "lodge.registry.v1.Translation",
    "lodge.router.v1.RouterControl",
    "lodge.router.v1.Tunnel",
];

/// Member-to-member raft traffic: on the peer port only.
pub const RAFT: &str = "lodge.raft.v1.Raft";

/// The standard health service.
pub const HEALTH: &str = "grpc.health.v1.Health";
/// Server reflection as current clients (grpcurl, Postman, tonic) ask for it.
pub const REFLECTION_V1: &str = "grpc.reflection.v1.ServerReflection";
/// The older reflection protocol, the only one some stock clients speak (Python's
/// `grpcio-reflection`, older grpcurl).
pub const REFLECTION_V1ALPHA: &str = "grpc.reflection.v1alpha.ServerReflection";

/// The encoded descriptor sets that describe every service in [`NODE_SERVICES`] (and more: a
/// set is a whole proto file, so it may describe services that are not served).
pub const DESCRIPTOR_SETS: &[&[u8]] = &[
    crate::pb::FILE_DESCRIPTOR_SET,
    tonic_health::pb::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET,
    tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET,
];

/// Every method path the node serves on its client port (`/package.Service/Method`), for
/// bounded metric labels.
pub fn node_methods() -> HashSet<String> {
    crate::metrics::known_methods(DESCRIPTOR_SETS, NODE_SERVICES)
}

/// Every method path the node serves on its peer port.
pub fn peer_methods() -> HashSet<String> {
    crate::metrics::known_methods(DESCRIPTOR_SETS, PEER_SERVICES)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_listed_service_is_described_and_nothing_else_is_counted() {
        let methods = node_methods();
        for service in NODE_SERVICES {
            assert!(
                methods
                    .iter()
                    .any(|m| m.starts_with(&format!("/{service}/"))),
                "{service} has no methods in the descriptor sets (misspelt?)"
            );
        }
        assert!(methods.contains("/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"));
        assert!(methods.contains("/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"));
        assert!(methods.contains("/grpc.health.v1.Health/Check"));
        assert!(methods.contains("/lodge.kv.v1.KV/Put"));
        assert!(
            !methods
                .iter()
                .any(|m| m.starts_with("/lodge.raft.v1.Raft/")),
            "raft is served on the peer port only"
        );
        let peer = peer_methods();
        assert!(peer.contains("/lodge.raft.v1.Raft/Send"));
        assert!(peer.contains("/lodge.kv.v1.KV/Put"));
        assert!(!peer.iter().any(|m| m.starts_with("/grpc.")));
        assert!(
            !methods
                .iter()
                .any(|m| m.starts_with("/lodge.balancer.v1.Module/")),
            "modules serve Module, nodes do not"
        );
    }
}
