//! Lodge's gRPC layer: generated code, one thin adapter per service, the server assembly (TLS,
//! limits, health, reflection, metrics) and the client helpers used by the CLI.
//!
//! Adapters decode a request, send one message to an actor with the caller's deadline, and map the
//! answer to a `Status`. Business rules live in the actors.

pub mod admin;
pub mod auth;
pub mod balancer;
pub mod calls;
pub mod client;
pub mod cluster;
pub mod deadline;
pub mod kv;
pub mod leader_link;
pub mod listener;
pub mod members;
pub mod message_limit;
pub mod metrics;
pub mod module;
pub mod outcome;
pub mod peer;
pub mod raft;
mod reconnect;
pub mod registry;
pub mod registry_client;
pub mod router;
pub mod router_client;
pub mod secret;
pub mod served;
pub mod server;
pub mod status_limit;
pub mod tls;
pub mod translation;
pub mod watched_body;
pub mod workflow;

/// The future of the server's tower layers (metrics, call counts, status rewrites): boxed, since
/// each wraps whatever the routes answer.
pub(crate) type BoxFuture<T, E> =
    std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, E>> + Send>>;

/// Generated protobuf and gRPC code.
pub mod pb {
    /// `lodge.admin.v1`.
    pub mod admin {
        tonic::include_proto!("lodge.admin.v1");
    }

    /// `lodge.balancer.v1`.
    pub mod balancer {
        tonic::include_proto!("lodge.balancer.v1");
    }

    /// `lodge.cluster.v1`.
    pub mod cluster {
        tonic::include_proto!("lodge.cluster.v1");
    }

    /// `lodge.kv.v1`.
    pub mod kv {
        tonic::include_proto!("lodge.kv.v1");
    }

    /// `lodge.raft.v1`.
    pub mod raft {
        tonic::include_proto!("lodge.raft.v1");
    }

    /// `lodge.registry.v1`.
    pub mod registry {
        tonic::include_proto!("lodge.registry.v1");
    }

    /// `lodge.router.v1`.
    pub mod router {
        tonic::include_proto!("lodge.router.v1");
    }

    /// `lodge.workflow.v1`.
    pub mod workflow {
        tonic::include_proto!("lodge.workflow.v1");
    }

    /// etcd v3's KV (client side only), for comparing against etcd in `lodge bench kv`.
    pub mod etcd {
        tonic::include_proto!("etcdserverpb");
    }

    /// Encoded descriptors of every Lodge service, for server reflection.
    pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("lodge_descriptor");
}
