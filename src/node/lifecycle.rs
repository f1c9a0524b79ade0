//! A node's life once its parts are built: the tree starts, the servers serve, the start-up
//! checks pass, the node says it is ready; then it waits for a signal or a failure, and drains:
//! health goes NOT_SERVING, the servers refuse new calls and finish those under way, the actors
//! stop.

use std::sync::Arc;

use lodge_actors::balancer::metrics::BalancerMetrics;
use lodge_actors::supervision::Exit;
use lodge_actors::{Runtime, SupervisorSpec};
use lodge_grpc::server::{self, ServerSettings};
use slog::{error, info, warn, Logger};

use super::cluster::ClusterPlan;
use super::listen::Listeners;
use super::serve::{self as node_serve, Areas};
use super::tls::NodeTls;
use super::tree::ActorTableSlot;
use crate::config::NodeConfig;

/// Everything a node runs with, built before it starts.
pub struct Node {
    pub cfg: NodeConfig,
    pub plan: ClusterPlan,
    pub areas: Areas,
    pub actors: ActorTableSlot,
    pub balancer_metrics: Arc<BalancerMetrics>,
    pub tls: NodeTls,
    pub server_settings: ServerSettings,
    pub peer_settings: ServerSettings,
    pub io: tokio::runtime::Handle,
    pub log: Logger,
}

impl Node {
    /// Runs the node until it stops; answers the process's exit code.
    pub async fn live(self, root: SupervisorSpec, listeners: Listeners) -> i32 {
        let log = self.log.clone();
        let mut runtime = Runtime::start(super::settings::runtime(&self.cfg), log.clone(), root);
        let _ = self.actors.set(runtime.actor_table().clone());
        let tree_exit = runtime.wait_exit();
        tokio::pin!(tree_exit);
        // Serve (and say "ready") only once every actor is up: a call arriving earlier would find
        // /node/admin or the raft member not running yet.
        let started = runtime.wait_started();
        let failed_early = tokio::select! {
            _ = started => None,
            exit = &mut tree_exit => Some(exit),
        };
        if let Some(exit) = failed_early {
            error!(log, "the actor tree failed while starting"; "exit" => ?exit);
            runtime.stop_arbiters();
            return 1;
        }

        let servers = match self.serve(runtime.actor_table().clone(), listeners).await {
            Ok(s) => s,
            Err(e) => {
                error!(log, "cannot build services"; "error" => e);
                return 1;
            }
        };
        let Node {
            cfg,
            plan,
            areas,
            server_settings: settings,
            io,
            ..
        } = self;
        let node_serve::Servers {
            client: mut server_task,
            peer: mut peer_task,
            metrics: metrics_task,
            health,
            shutdown: shutdown_tx,
            stop: stop_tx,
            peer_stop: peer_stop_tx,
            peer_tls: gate_tls,
            local: (grpc_local, metrics_local, peer_local),
        } = servers;
        let mut sig_rx = signals(&io);
        let (join_failed_tx, join_failed) = tokio::sync::oneshot::channel::<String>();
        let raft = areas.cluster.raft.clone();
        let mut checks = io.spawn(start_up_checks(&cfg, &plan, raft, &log));
        // A join waits for the cluster as long as it takes: a signal meanwhile stops the node.
        let mut early_signal = None;
        let checked = tokio::select! {
            c = &mut checks => c.unwrap_or_else(|e| Err(format!("startup checks failed: {e}"))),
            sig = &mut sig_rx => {
                checks.abort();
                early_signal = Some(sig.unwrap_or("signal"));
                Ok(None)
            }
        };
        let refused = match checked {
            Ok(Some((join, registered))) => {
                io.spawn(async move {
                    if let Err(e) = join.finish(registered).await {
                        let _ = join_failed_tx.send(e);
                    }
                });
                None
            }
            Ok(None) => None,
            Err(e) => Some(e),
        };
        if refused.is_none() && early_signal.is_none() {
            info!(log, "node ready"; "grpc" => %grpc_local, "metrics" => %metrics_local, "peer" => %peer_local, "tls" => settings.tls.is_some(), "peer_tls" => gate_tls, "cluster_id" => plan.cluster.get().map(lodge_grpc::peer::format_id), "incarnation" => format!("{:016x}", plan.incarnation));
            if !gate_tls && !peer_local.ip().is_loopback() {
                warn!(log, "the peer port is not loopback and peer TLS is off (--insecure): anyone who reaches it can speak raft to this node"; "peer" => %peer_local);
            }
            // One machine-readable line on stdout: scripts and tests read the bound ports from it.
            println!(
                "lodge node ready grpc={grpc_local} metrics={metrics_local} peer={peer_local}"
            );
        }

        // A node that stops serving must not linger: the server ending on its own is a failure.
        let (failure, server_ended, tree_done) = if let Some(reason) = &refused {
            error!(log, "refusing to start"; "reason" => reason);
            eprintln!("lodge: {reason}");
            (Some(Exit::Failed(reason.clone())), None, false)
        } else if let Some(sig) = early_signal {
            info!(log, "shutting down before ready"; "signal" => sig);
            (None, None, false)
        } else {
            tokio::select! {
                sig = &mut sig_rx => {
                    info!(log, "shutting down"; "signal" => sig.unwrap_or("signal"));
                    (None, None, false)
                }
                exit = &mut tree_exit => (Some(exit), None, true),
                Ok(e) = join_failed => {
                    error!(log, "cannot join the cluster"; "error" => &e);
                    (Some(Exit::Failed(format!("cannot join the cluster: {e}"))), None, false)
                }
                ended = &mut server_task => {
                    let reason = format!("the gRPC server stopped on its own: {ended:?}");
                    (Some(Exit::Failed(reason)), Some(ended), false)
                }
                ended = &mut peer_task => {
                    let reason = format!("the peer server stopped on its own: {ended:?}");
                    (Some(Exit::Failed(reason)), None, false)
                }
            }
        };
        // 1. Health goes NOT_SERVING, 2. the workflows this member owns move to others (while
        // raft, whose messages come over the peer port, still runs), 3. the server refuses new
        // calls and drains, 4. actors stop.
        let _ = io
            .spawn(async move { server::set_not_serving(&health).await })
            .await;
        if refused.is_none() && !tree_done {
            hand_off_workflows(&areas, settings.drain_timeout, &log).await;
        }
        let _ = shutdown_tx.send(true);
        let _ = stop_tx.send(());
        let _ = peer_stop_tx.send(());
        let drained = match server_ended {
            Some(ended) => ended,
            None => server_task.await,
        };
        match drained {
            Ok(Ok(true)) => info!(log, "in-flight calls drained"),
            Ok(Ok(false)) => {
                warn!(log, "drain timeout reached; remaining calls cut"; "drain_timeout_ms" => settings.drain_timeout.as_millis() as u64)
            }
            Ok(Err(e)) => error!(log, "gRPC server error"; "error" => %e),
            Err(e) => error!(log, "gRPC server task failed"; "error" => %e),
        }
        metrics_task.abort();
        if !peer_task.is_finished() {
            // Its streams (raft, relays) are cut with the process; nothing waits on them.
            let _ = tokio::time::timeout(settings.drain_timeout, &mut peer_task).await;
            peer_task.abort();
        }
        let exit = if tree_done {
            failure.expect("tree_done implies a failure")
        } else {
            runtime.shutdown();
            let stopped = tree_exit.await;
            // A server that stopped on its own still makes this a failed run.
            failure.unwrap_or(stopped)
        };
        runtime.stop_arbiters();
        match exit {
            Exit::Normal => {
                info!(log, "stopped");
                0
            }
            Exit::Failed(reason) | Exit::Panicked(reason) => {
                error!(log, "exiting on a failure"; "reason" => reason);
                if refused.is_some() {
                    2
                } else {
                    1
                }
            }
        }
    }
}

/// The first SIGTERM or SIGINT, by name. A second one means "now": the process exits without
/// finishing the drain.
/// Moves the workflows this member owns to other members, letting the steps under way end
/// within half of `drain`: a graceful stop hands its runs over at once instead of leaving them
/// to wait out the failure timeout.
async fn hand_off_workflows(areas: &Areas, drain: std::time::Duration, log: &Logger) {
    let wait = drain / 2;
    let sent = areas
        .workflows
        .table
        .send_timeout(lodge_actors::workflow::HandOff { wait }, drain)
        .await;
    match sent {
        Ok(0) => {}
        Ok(moved) => info!(log, "workflows handed off"; "moved" => moved),
        Err(e) => {
            warn!(log, "workflows not handed off; they move after the failure timeout"; "error" => ?e)
        }
    }
}

fn signals(io: &tokio::runtime::Handle) -> tokio::sync::oneshot::Receiver<&'static str> {
    let (sig_tx, sig_rx) = tokio::sync::oneshot::channel::<&'static str>();
    io.spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        let _ = sig_tx.send(name);
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        // Written directly: exit() skips the async logger's flush.
        eprintln!("lodge: second signal: exiting without finishing the drain");
        std::process::exit(1);
    });
    sig_rx
}

/// A registered join, to finish once the node serves.
type Registered = (crate::join::Join, crate::join::Registered);

/// Before "ready", while already serving (a probe of this node's own address must find this
/// process): no other process runs as this member, and a joining node is registered.
fn start_up_checks(
    cfg: &NodeConfig,
    plan: &ClusterPlan,
    raft: lodge_actors::ActorRef<lodge_actors::cluster::raft::RaftNode>,
    log: &Logger,
) -> impl std::future::Future<Output = Result<Option<Registered>, String>> + Send + 'static {
    let unique = crate::identity::Unique {
        id: cfg.node.id,
        incarnation: plan.incarnation,
        advertise: plan.peer_advertise.clone(),
        directory: plan.directory.clone(),
        join: plan.join.clone(),
        // Asked of any node, whatever its cluster: a duplicate is refused either way.
        link: plan.peer_link.anonymous(),
        log: log.clone(),
    };
    let joining = (!plan.join.is_empty()).then(|| crate::join::Join {
        id: cfg.node.id,
        advertise: plan.peer_advertise.clone(),
        endpoints: plan.join.clone(),
        as_voter: cfg.cluster.join_as == "voter",
        link: plan.peer_link.clone(),
        data_dir: cfg.node.data_dir.clone(),
        raft,
        directory: plan.directory.clone(),
        log: log.clone(),
    });
    async move {
        crate::identity::check_unique(&unique).await?;
        let Some(join) = joining else { return Ok(None) };
        Ok(join.register().await?.map(|r| (join, r)))
    }
}
