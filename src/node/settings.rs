//! The settings each part of a node is built with, read from the configuration.

use std::sync::Arc;

use lodge_actors::registry::{RegistryMetrics, RegistrySettings};
use lodge_actors::router::RouterSettings;
use lodge_actors::translate::gateway::GatewaySettings;
use lodge_actors::translate::BackendConfig;
use lodge_actors::{Backoff, RestartLimit, RuntimeConfig};
use lodge_grpc::server::ServerSettings;

use crate::config::NodeConfig;

/// The actor runtime: arbiters, mailboxes, restart limits and backoff.
pub fn runtime(c: &NodeConfig) -> RuntimeConfig {
    let s = &c.supervision;
    let workers = match c.runtime.worker_arbiters {
        0 => std::thread::available_parallelism().map_or(2, |n| n.get()),
        n => n,
    };
    RuntimeConfig {
        worker_arbiters: workers,
        mailbox_capacity: c.runtime.mailbox_capacity,
        restart_limit: RestartLimit {
            max_restarts: s.max_restarts,
            within: NodeConfig::duration(s.restart_window_ms),
        },
        backoff: Backoff {
            initial: NodeConfig::duration(s.backoff_initial_ms),
            max: NodeConfig::duration(s.backoff_max_ms),
            jitter: s.backoff_jitter,
        },
        shutdown_timeout: NodeConfig::duration(s.shutdown_timeout_ms),
    }
}

/// The gRPC servers (the peer port takes the same, with its own TLS).
pub fn server(
    c: &NodeConfig,
    tls: Option<Arc<lodge_grpc::tls::ReloadingTls>>,
    registry_metrics: RegistryMetrics,
    gate: Arc<lodge_grpc::auth::Gatekeeper>,
) -> ServerSettings {
    let s = &c.server;
    ServerSettings {
        tls,
        admission: lodge_grpc::listener::Admission {
            max_connections: s.max_connections,
            per_ip: lodge_grpc::listener::PerIpLimits {
                rate: s.per_ip_connection_rate,
                window: NodeConfig::duration(s.per_ip_window_ms),
                max_open: s.per_ip_max_connections,
                metrics: registry_metrics,
            },
            exempt: c.per_ip_exempt().expect("validated at load"),
            proxies: c.trusted_proxies().expect("validated at load"),
            handshake_timeout: NodeConfig::duration(s.handshake_timeout_ms),
            idle_timeout: (s.idle_timeout_ms > 0).then(|| NodeConfig::duration(s.idle_timeout_ms)),
        },
        max_concurrent_rpcs: s.max_concurrent_rpcs,
        max_concurrent_streams: s.max_concurrent_streams,
        max_message_bytes: s.max_message_bytes,
        request_timeout: NodeConfig::duration(s.request_timeout_ms),
        keepalive_interval: NodeConfig::duration(s.keepalive_interval_ms),
        keepalive_timeout: NodeConfig::duration(s.keepalive_timeout_ms),
        drain_timeout: NodeConfig::duration(s.drain_timeout_ms),
        stream_window: c.router.stream_window_bytes,
        connection_window: c.router.connection_window_bytes,
        gate,
    }
}

/// The router's timeouts and queues.
pub fn router(c: &NodeConfig) -> RouterSettings {
    let r = &c.router;
    RouterSettings {
        member_id: c.node.id,
        rendezvous_timeout: NodeConfig::duration(r.rendezvous_timeout_ms),
        idle_timeout: NodeConfig::duration(r.idle_timeout_ms),
        stall_timeout: NodeConfig::duration(r.stall_timeout_ms),
        queue_frames: r.queue_frames,
        owner_lease_ttl: NodeConfig::duration(r.owner_lease_ttl_ms),
        request_timeout: NodeConfig::duration(c.server.request_timeout_ms),
    }
}

/// The translation gateway's backend and probe.
pub fn gateway(c: &NodeConfig) -> GatewaySettings {
    let t = &c.translation;
    let timeout = NodeConfig::duration(t.request_timeout_ms);
    GatewaySettings {
        backend: (!t.backend_url.is_empty()).then(|| BackendConfig {
            url: t.backend_url.clone(),
            model: t.model.clone(),
            api_key: (!t.api_key.is_empty()).then(|| t.api_key.clone()),
            timeout,
            // A probe is a quick GET; a backend that needs longer is not ready.
            probe_timeout: NodeConfig::duration(t.probe_interval_ms).min(timeout),
        }),
        probe_interval: NodeConfig::duration(t.probe_interval_ms),
        chunk_chars: t.chunk_chars,
    }
}

/// The registry's heartbeat cadence and per-client job limits.
pub fn registry(c: &NodeConfig) -> RegistrySettings {
    let t = &c.translation;
    RegistrySettings {
        member_id: c.node.id,
        interval: NodeConfig::duration(c.registry.heartbeat_interval_ms),
        max_misses: c.registry.max_missed_heartbeats,
        max_jobs: t.max_jobs_per_client,
        queue: t.queue_per_client,
        rate_per_second: t.requests_per_second,
        rate_burst: t.burst,
        request_timeout: NodeConfig::duration(c.server.request_timeout_ms),
    }
}
