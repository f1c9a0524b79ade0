//! A recording `Balancer` for testing modules (the SDK's own tests and `lodge module`'s): it
//! takes registrations and heartbeats, answers heartbeats with instructions the test queues,
//! answers the calls a module forwards, and reports everything it receives as [`Seen`] events.
//! Calls a module never makes answer UNIMPLEMENTED.
//!
//! Like a real node, it asks an instance it does not know to register again, so a module that
//! fails over to a fresh stub re-registers.

use std::collections::{BTreeMap, VecDeque};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::state::lock;
use crate::pb::balancer as pb;
use crate::pb::balancer::balancer_server::{Balancer, BalancerServer};

/// A call the stub received.
#[derive(Clone, Debug, PartialEq)]
pub enum Seen {
    Register(pb::RegisterModuleRequest),
    Heartbeat(pb::HeartbeatRequest),
    Unregister(pb::UnregisterModuleRequest),
    ListModules(pb::ListModulesRequest),
    SetTrafficWeight(pb::SetTrafficWeightRequest),
    GetActiveVersion(pb::GetActiveVersionRequest),
    PromoteVersion(pb::PromoteVersionRequest),
    Rollback(pb::RollbackRequest),
    SetScalingConfig(pb::ScalingConfig),
}

#[derive(Default)]
struct State {
    interval_ms: u32,
    /// Registrations by instance id.
    modules: BTreeMap<String, pb::RegisterModuleRequest>,
    /// Answers for the next heartbeats (the interval is filled in).
    answers: VecDeque<pb::HeartbeatResponse>,
    /// The status the next forwarded call fails with.
    fail_next: Option<Status>,
}

#[derive(Clone)]
struct Svc {
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedSender<Seen>,
}

impl Svc {
    fn seen(&self, e: Seen) {
        let _ = self.events.send(e);
    }

    fn forwarded<T>(&self, e: Seen, answer: T) -> Result<Response<T>, Status> {
        self.seen(e);
        match lock(&self.state).fail_next.take() {
            Some(s) => Err(s),
            None => Ok(Response::new(answer)),
        }
    }
}

fn traffic(module_type: i32, version: &str) -> pb::TrafficState {
    pb::TrafficState {
        module_type,
        active_version: version.to_string(),
        weights: vec![pb::VersionWeight {
            version: version.to_string(),
            weight: 100,
        }],
        revision: 1,
        ..Default::default()
    }
}

type NlbStream = Pin<Box<dyn Stream<Item = Result<pb::NlbMetrics, Status>> + Send>>;

fn unimplemented<T>(what: &str) -> Result<Response<T>, Status> {
    Err(Status::unimplemented(format!(
        "the stub balancer has no {what}"
    )))
}

#[tonic::async_trait]
impl Balancer for Svc {
    async fn register_module(
        &self,
        r: Request<pb::RegisterModuleRequest>,
    ) -> Result<Response<pb::RegisterModuleResponse>, Status> {
        let mut req = r.into_inner();
        let mut st = lock(&self.state);
        if req.instance_id.is_empty() {
            req.instance_id = format!("stub-{}", st.modules.len() + 1);
        }
        let replaced = st
            .modules
            .insert(req.instance_id.clone(), req.clone())
            .is_some();
        let answer = pb::RegisterModuleResponse {
            instance_id: req.instance_id.clone(),
            heartbeat_interval_ms: st.interval_ms,
            max_missed_heartbeats: 3,
            replaced,
        };
        drop(st);
        self.seen(Seen::Register(req));
        Ok(Response::new(answer))
    }

    async fn unregister_module(
        &self,
        r: Request<pb::UnregisterModuleRequest>,
    ) -> Result<Response<pb::UnregisterModuleResponse>, Status> {
        let req = r.into_inner();
        let known = lock(&self.state).modules.remove(&req.instance_id).is_some();
        self.seen(Seen::Unregister(req.clone()));
        if !known {
            return Err(Status::not_found(format!(
                "instance_id: {:?} is not registered",
                req.instance_id
            )));
        }
        Ok(Response::new(pb::UnregisterModuleResponse::default()))
    }

    async fn heartbeat(
        &self,
        r: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        let req = r.into_inner();
        let mut st = lock(&self.state);
        let interval = st.interval_ms;
        let answer = if st.modules.contains_key(&req.instance_id) {
            st.answers.pop_front().unwrap_or_default()
        } else {
            pb::HeartbeatResponse {
                re_register_required: true,
                ..Default::default()
            }
        };
        drop(st);
        self.seen(Seen::Heartbeat(req));
        Ok(Response::new(pb::HeartbeatResponse {
            heartbeat_interval_ms: interval,
            ..answer
        }))
    }

    async fn list_modules(
        &self,
        r: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        let req = r.into_inner();
        let modules = lock(&self.state)
            .modules
            .values()
            .filter(|m| req.module_type == 0 || m.module_type == req.module_type)
            .map(|m| pb::ModuleInstance {
                instance_id: m.instance_id.clone(),
                module_type: m.module_type,
                version: m.version.clone(),
                control_address: m.control_address.clone(),
                data_address: m.data_address.clone(),
                protocols: m.protocols.clone(),
                max_connections: m.max_connections,
                metadata: m.metadata.clone(),
                ..Default::default()
            })
            .collect();
        self.forwarded(Seen::ListModules(req), pb::ListModulesResponse { modules })
    }

    async fn get_module_info(
        &self,
        _: Request<pb::GetModuleInfoRequest>,
    ) -> Result<Response<pb::GetModuleInfoResponse>, Status> {
        unimplemented("GetModuleInfo")
    }

    async fn update_routing(
        &self,
        _: Request<pb::UpdateRoutingRequest>,
    ) -> Result<Response<pb::UpdateRoutingResponse>, Status> {
        unimplemented("UpdateRouting")
    }

    async fn get_routing_table(
        &self,
        _: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<pb::GetRoutingTableResponse>, Status> {
        unimplemented("GetRoutingTable")
    }

    async fn route_request(
        &self,
        _: Request<pb::RouteQuery>,
    ) -> Result<Response<pb::RouteDecision>, Status> {
        unimplemented("RouteRequest")
    }

    async fn validate_route(
        &self,
        _: Request<pb::ValidateRouteRequest>,
    ) -> Result<Response<pb::ValidateRouteResponse>, Status> {
        unimplemented("ValidateRoute")
    }

    async fn report_metrics(
        &self,
        _: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        unimplemented("ReportMetrics")
    }

    async fn get_nlb_metrics(
        &self,
        _: Request<pb::GetNlbMetricsRequest>,
    ) -> Result<Response<pb::NlbMetrics>, Status> {
        unimplemented("GetNLBMetrics")
    }

    async fn get_module_metrics(
        &self,
        _: Request<pb::GetModuleMetricsRequest>,
    ) -> Result<Response<pb::ModuleMetrics>, Status> {
        unimplemented("GetModuleMetrics")
    }

    type StreamNLBMetricsStream = NlbStream;

    async fn stream_nlb_metrics(
        &self,
        _: Request<pb::StreamNlbMetricsRequest>,
    ) -> Result<Response<NlbStream>, Status> {
        unimplemented("StreamNLBMetrics")
    }

    async fn check_health(
        &self,
        _: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthResponse>, Status> {
        unimplemented("CheckHealth")
    }

    async fn get_nlb_status(
        &self,
        _: Request<pb::GetNlbStatusRequest>,
    ) -> Result<Response<pb::NlbStatus>, Status> {
        unimplemented("GetNLBStatus")
    }

    async fn update_nlb_config(
        &self,
        _: Request<pb::UpdateNlbConfigRequest>,
    ) -> Result<Response<pb::BalancerConfig>, Status> {
        unimplemented("UpdateNLBConfig")
    }

    async fn get_nlb_config(
        &self,
        _: Request<pb::GetNlbConfigRequest>,
    ) -> Result<Response<pb::BalancerConfig>, Status> {
        unimplemented("GetNLBConfig")
    }

    async fn rebalance_load(
        &self,
        _: Request<pb::RebalanceLoadRequest>,
    ) -> Result<Response<pb::RebalanceLoadResponse>, Status> {
        unimplemented("RebalanceLoad")
    }

    async fn get_load_distribution(
        &self,
        _: Request<pb::GetLoadDistributionRequest>,
    ) -> Result<Response<pb::LoadDistribution>, Status> {
        unimplemented("GetLoadDistribution")
    }

    async fn trigger_scaling(
        &self,
        _: Request<pb::TriggerScalingRequest>,
    ) -> Result<Response<pb::ScalingDecision>, Status> {
        unimplemented("TriggerScaling")
    }

    async fn set_traffic_weight(
        &self,
        r: Request<pb::SetTrafficWeightRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let req = r.into_inner();
        let answer = traffic(req.module_type, &req.version);
        self.forwarded(Seen::SetTrafficWeight(req), answer)
    }

    async fn get_active_version(
        &self,
        r: Request<pb::GetActiveVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let req = r.into_inner();
        let answer = traffic(req.module_type, "v1");
        self.forwarded(Seen::GetActiveVersion(req), answer)
    }

    async fn promote_version(
        &self,
        r: Request<pb::PromoteVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let req = r.into_inner();
        let answer = traffic(req.module_type, &req.version);
        self.forwarded(Seen::PromoteVersion(req), answer)
    }

    async fn rollback(
        &self,
        r: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let req = r.into_inner();
        let answer = traffic(req.module_type, "v0");
        self.forwarded(Seen::Rollback(req), answer)
    }

    async fn set_rate_limit(
        &self,
        _: Request<pb::SetRateLimitRequest>,
    ) -> Result<Response<pb::RateLimit>, Status> {
        unimplemented("SetRateLimit")
    }

    async fn get_rate_limits(
        &self,
        _: Request<pb::GetRateLimitsRequest>,
    ) -> Result<Response<pb::GetRateLimitsResponse>, Status> {
        unimplemented("GetRateLimits")
    }

    async fn remove_rate_limit(
        &self,
        _: Request<pb::RemoveRateLimitRequest>,
    ) -> Result<Response<pb::RemoveRateLimitResponse>, Status> {
        unimplemented("RemoveRateLimit")
    }

    async fn set_scaling_config(
        &self,
        r: Request<pb::SetScalingConfigRequest>,
    ) -> Result<Response<pb::ScalingConfig>, Status> {
        let config = r.into_inner().config.unwrap_or_default();
        self.forwarded(Seen::SetScalingConfig(config), config)
    }

    async fn get_scaling_config(
        &self,
        _: Request<pb::GetScalingConfigRequest>,
    ) -> Result<Response<pb::ScalingConfig>, Status> {
        unimplemented("GetScalingConfig")
    }
}

/// A running stub on a loopback port; stopped when dropped.
pub struct StubBalancer {
    /// `127.0.0.1:PORT`.
    pub addr: String,
    state: Arc<Mutex<State>>,
    events: mpsc::UnboundedReceiver<Seen>,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl StubBalancer {
    /// Serves a stub granting heartbeats every `interval_ms`.
    pub async fn start(interval_ms: u32) -> std::io::Result<StubBalancer> {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let state = Arc::new(Mutex::new(State {
            interval_ms,
            ..State::default()
        }));
        let (tx, events) = mpsc::unbounded_channel();
        let svc = Svc {
            state: state.clone(),
            events: tx,
        };
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let _ = tonic::transport::Server::builder()
                .add_service(BalancerServer::new(svc))
                .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(StubBalancer {
            addr,
            state,
            events,
            stop: Some(stop),
            task: Some(task),
        })
    }

    /// The next event `want` accepts, skipping others; `None` after `timeout`.
    pub async fn next(&mut self, timeout: Duration, want: impl Fn(&Seen) -> bool) -> Option<Seen> {
        tokio::time::timeout(timeout, async {
            loop {
                let e = self.events.recv().await?;
                if want(&e) {
                    return Some(e);
                }
            }
        })
        .await
        .ok()
        .flatten()
    }

    /// Answers the next heartbeat of a known instance with `answer` (its interval is the
    /// stub's). Answers queue up in order.
    pub fn answer_next_heartbeat(&self, answer: pb::HeartbeatResponse) {
        lock(&self.state).answers.push_back(answer);
    }

    /// Changes the interval granted from the next answer on.
    pub fn set_interval(&self, ms: u32) {
        lock(&self.state).interval_ms = ms;
    }

    /// Fails the next forwarded call (weights, versions, scaling, instances) with `status`.
    pub fn fail_next_forwarded(&self, status: Status) {
        lock(&self.state).fail_next = Some(status);
    }

    /// Forgets an instance, as a node that lost it would (its next heartbeat is asked to
    /// register again).
    pub fn forget(&self, instance_id: &str) {
        lock(&self.state).modules.remove(instance_id);
    }

    /// The registrations now.
    pub fn modules(&self) -> Vec<pb::RegisterModuleRequest> {
        lock(&self.state).modules.values().cloned().collect()
    }

    /// Stops serving and waits for the server to end (its connections are closed).
    pub async fn stop(mut self) {
        self.shutdown().await;
    }

    async fn shutdown(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(mut t) = self.task.take() {
            if tokio::time::timeout(Duration::from_secs(10), &mut t)
                .await
                .is_err()
            {
                t.abort();
            }
        }
    }
}

impl Drop for StubBalancer {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
    }
}
