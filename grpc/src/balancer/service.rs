//! `lodge.balancer.v1.Balancer`: decodes a request, calls the balancer with the caller's deadline,
//! and maps the answer. The balancer itself (`lodge_actors::balancer`) holds the rules.

use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use lodge_actors::balancer::handle::{
    check_id, BalancerHandle, RegisterModule, RoutingUpdate, SettingsUpdate,
};
use lodge_actors::balancer::model::LimitTarget;
use lodge_actors::balancer::report::Traffic;
use lodge_actors::balancer::scaler::Direction;
use lodge_actors::balancer::{now_ms, BalancerError, Flow, ModuleType};
use lodge_actors::cluster::raft::{GetStatus, RaftNode};
use lodge_actors::ActorRef;
use tokio_stream::Stream;
use tonic::{Request, Response, Status};

use super::convert::{
    module_type_from_pb, port, protocol_from_pb, required_module_type, route_from_pb, route_to_pb,
};
use super::wire::{
    decision_to_pb, health_check_from_pb, health_to_pb, instance_to_pb, limit_from_pb, limit_to_pb,
    load_info_to_pb, load_to_pb, module_traffic_to_pb, points_from_pb, points_to_pb,
    reported_health, scaling_from_pb, scaling_to_pb, settings_to_pb, stats_from_pb, stats_to_pb,
    status, traffic_to_pb,
};
use crate::deadline;
use crate::kv::stream_until_shutdown;
use crate::pb::balancer as pb;

/// What the Balancer service talks to.
#[derive(Clone)]
pub struct BalancerBackend {
    pub handle: BalancerHandle,
    /// For the leader's id in the status.
    pub raft: ActorRef<RaftNode>,
    /// The data plane's listening addresses on this node.
    pub listeners: Arc<RwLock<Vec<String>>>,
    pub started: Instant,
    /// Where a module may say its data address is (`auth.module_networks`); `None`: anywhere.
    /// Balancer operators and admins are not held to it.
    pub module_networks: Option<Arc<crate::listener::Networks>>,
}

/// The Balancer service.
pub struct BalancerService {
    b: BalancerBackend,
    timeout: Duration,
    shutdown: tokio::sync::watch::Receiver<bool>,
}

impl BalancerService {
    /// Serves `b`; `timeout` bounds a call without its own deadline; streams end at `shutdown`.
    pub fn new(
        b: BalancerBackend,
        timeout: Duration,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Self {
        Self {
            b,
            timeout,
            shutdown,
        }
    }

    fn h(&self) -> &BalancerHandle {
        &self.b.handle
    }
}

/// Runs `f` within `budget`: DEADLINE_EXCEEDED after it, the balancer's status on failure.
async fn within<T>(
    budget: Duration,
    f: impl Future<Output = Result<T, BalancerError>>,
) -> Result<T, Status> {
    match tokio::time::timeout(budget, f).await {
        Ok(r) => r.map_err(status),
        Err(_) => Err(Status::deadline_exceeded(
            "the balancer did not answer before the deadline",
        )),
    }
}

fn optional_type(v: i32, field: &str) -> Result<Option<ModuleType>, Status> {
    if v == 0 {
        return Ok(None);
    }
    module_type_from_pb(v)
        .map(Some)
        .ok_or_else(|| Status::invalid_argument(format!("{field}: unknown module type {v}")))
}

fn id(field: &str, v: &str) -> Result<(), Status> {
    check_id(field, v).map_err(status)
}

type MetricsStream = Pin<Box<dyn Stream<Item = Result<pb::NlbMetrics, Status>> + Send>>;

/// This node's balancer figures.
pub fn nlb_metrics(h: &BalancerHandle) -> pb::NlbMetrics {
    let f = h.figures();
    pb::NlbMetrics {
        member_id: f.member,
        timestamp_ms: f.at_ms,
        decisions: f
            .decisions
            .iter()
            .map(|(o, n)| (o.to_string(), *n))
            .collect(),
        active_connections: f.total.active,
        connections_total: f.total.total,
        bytes_in: f.total.bytes_in,
        bytes_out: f.total.bytes_out,
        evictions: f.evictions,
        drains: f.drains,
        rate_limited: f.rate_limited,
        scaling_decisions: f.scaling_decisions,
        modules: f
            .by_health
            .iter()
            .map(|(h, n)| (h.to_string(), *n))
            .collect(),
        traffic: f.traffic.iter().map(module_traffic_to_pb).collect(),
    }
}

/// Requests that name the module instance they act for.
trait ForInstance {
    fn instance_id(&self) -> &str;
}

macro_rules! for_instance {
    ($($t:ty),*) => {$(
        impl ForInstance for $t {
            fn instance_id(&self) -> &str {
                &self.instance_id
            }
        }
    )*};
}

for_instance!(
    pb::RegisterModuleRequest,
    pb::UnregisterModuleRequest,
    pb::HeartbeatRequest,
    pb::ReportMetricsRequest
);

/// A module may act only as its own instance (see `Caller::require_instance`); the audit log
/// names the instance.
fn own_instance<T: ForInstance>(req: &Request<T>) -> Result<(), Status> {
    let id = req.get_ref().instance_id();
    crate::auth::audit::note_target(req, || {
        format!("instance {}", lodge_actors::quote::echo(id))
    });
    crate::auth::Caller::of(req.extensions()).require_instance(id, "instance_id")
}

impl BalancerService {
    /// Refuses a module's data address outside `auth.module_networks`: the data plane would
    /// send the public's connections there (an internal service behind the node, say).
    fn data_address_allowed(&self, req: &Request<pb::RegisterModuleRequest>) -> Result<(), Status> {
        let Some(allowed) = &self.b.module_networks else {
            return Ok(());
        };
        let caller = crate::auth::Caller::of(req.extensions());
        if caller.is_unrestricted() || caller.has(crate::auth::Role::BalancerOperator) {
            return Ok(());
        }
        let given = &req.get_ref().data_address;
        match given.parse::<std::net::SocketAddr>() {
            Ok(a) if allowed.contains(a.ip()) => Ok(()),
            Ok(a) => Err(Status::permission_denied(format!(
                "data_address: {a} is outside auth.module_networks, where modules may receive traffic"
            ))),
            Err(_) => Err(Status::permission_denied(format!(
                "data_address: {} must be an IP address and port within auth.module_networks",
                lodge_actors::quote::echo(given)
            ))),
        }
    }
}

#[tonic::async_trait]
impl pb::balancer_server::Balancer for BalancerService {
    async fn register_module(
        &self,
        req: Request<pb::RegisterModuleRequest>,
    ) -> Result<Response<pb::RegisterModuleResponse>, Status> {
        own_instance(&req)?;
        self.data_address_allowed(&req)?;
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let mut protocols = Vec::new();
        for (n, p) in m.protocols.iter().enumerate() {
            protocols.push(protocol_from_pb(*p).ok_or_else(|| {
                Status::invalid_argument(format!("protocols[{n}]: unknown protocol {p}"))
            })?);
        }
        let r = RegisterModule {
            instance_id: m.instance_id,
            module_type: Some(required_module_type(m.module_type, "module_type")?),
            version: m.version,
            control_address: m.control_address,
            data_address: m.data_address,
            protocols,
            max_connections: m.max_connections,
            metadata: m.metadata.into_iter().collect(),
            health_check: m.health_check.map(health_check_from_pb).transpose()?,
            control_token: lodge_actors::balancer::model::ControlToken(m.control_token),
        };
        let done = within(budget, self.h().register(r)).await?;
        Ok(Response::new(pb::RegisterModuleResponse {
            instance_id: done.instance_id,
            heartbeat_interval_ms: done.interval_ms,
            max_missed_heartbeats: done.max_missed,
            replaced: done.replaced,
        }))
    }

    async fn unregister_module(
        &self,
        req: Request<pb::UnregisterModuleRequest>,
    ) -> Result<Response<pb::UnregisterModuleResponse>, Status> {
        own_instance(&req)?;
        let m = req.get_ref();
        id("instance_id", &m.instance_id)?;
        let drain = if m.drain_timeout_ms > 0 {
            Duration::from_millis(m.drain_timeout_ms.into())
        } else {
            Duration::from_millis(self.h().view().settings.value.drain_timeout_ms.into())
        };
        // A drain may outlast the server's default budget; the caller's own deadline still
        // bounds it.
        let budget = deadline::of(&req, self.timeout.max(drain + Duration::from_secs(5)));
        // A caller in a hurry gets its answer: the drain ends a second before its deadline (the
        // instance is removed either way).
        let drain = drain
            .min(budget.saturating_sub(Duration::from_secs(1)))
            .max(Duration::from_millis(1));
        let m = req.into_inner();
        let d = within(
            budget,
            self.h().unregister(&m.instance_id, m.graceful, drain),
        )
        .await?;
        Ok(Response::new(pb::UnregisterModuleResponse {
            drained_connections: d.drained,
            remaining_connections: d.remaining,
            drain_ms: d.took.as_millis() as u64,
        }))
    }

    async fn heartbeat(
        &self,
        req: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        own_instance(&req)?;
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        id("instance_id", &m.instance_id)?;
        let a = within(
            budget,
            self.h().heartbeat(
                &m.instance_id,
                stats_from_pb(m.stats),
                reported_health(m.health),
            ),
        )
        .await?;
        Ok(Response::new(pb::HeartbeatResponse {
            re_register_required: a.re_register,
            should_reload: a.should_reload,
            should_scale: a.desired_instances.is_some(),
            desired_instances: a.desired_instances.unwrap_or(0),
            instructions: a.instructions,
            heartbeat_interval_ms: a.interval_ms,
        }))
    }

    async fn list_modules(
        &self,
        req: Request<pb::ListModulesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        let m = req.into_inner();
        let t = optional_type(m.module_type, "module_type")?;
        let now = now_ms();
        let view = self.h().loaded_view().map_err(status)?;
        let modules = view
            .instances
            .values()
            .filter(|i| t.is_none_or(|t| i.record.module_type == t))
            .filter(|i| m.version.is_empty() || i.record.version == m.version)
            .filter(|i| !m.healthy_only || i.health(now).0.routable())
            .map(|i| instance_to_pb(i, now))
            .collect();
        Ok(Response::new(pb::ListModulesResponse { modules }))
    }

    async fn get_module_info(
        &self,
        req: Request<pb::GetModuleInfoRequest>,
    ) -> Result<Response<pb::GetModuleInfoResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let inst = within(budget, self.h().registered(&m.instance_id)).await?;
        let capabilities = inst
            .live
            .capabilities()
            .into_iter()
            .map(|(route_id, c)| pb::Capability {
                instance_id: m.instance_id.clone(),
                route_id,
                can_handle: c.can_handle,
                priority: c.priority,
                reason: c.reason,
            })
            .collect();
        let metrics = inst
            .report
            .as_ref()
            .map(|r| points_to_pb(&r.metrics))
            .unwrap_or_default();
        Ok(Response::new(pb::GetModuleInfoResponse {
            module: Some(instance_to_pb(&inst, now_ms())),
            capabilities,
            metrics,
        }))
    }

    async fn update_routing(
        &self,
        req: Request<pb::UpdateRoutingRequest>,
    ) -> Result<Response<pb::UpdateRoutingResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let mut routes = Vec::with_capacity(m.routes.len());
        for (n, r) in m.routes.into_iter().enumerate() {
            routes.push(route_from_pb(r, &format!("routes[{n}]"))?);
        }
        let u = RoutingUpdate {
            routes,
            replace_all: m.replace_all,
            validate_only: m.validate_only,
            delete: m.delete_route_ids,
            expected_revision: m.expected_revision,
        };
        let (routes, revision, applied) = within(budget, self.h().update_routing(u)).await?;
        Ok(Response::new(pb::UpdateRoutingResponse {
            routes: routes.iter().map(route_to_pb).collect(),
            revision,
            applied,
        }))
    }

    async fn get_routing_table(
        &self,
        req: Request<pb::GetRoutingTableRequest>,
    ) -> Result<Response<pb::GetRoutingTableResponse>, Status> {
        let t = optional_type(req.get_ref().target, "target")?;
        let (entries, revision) = self.h().routing_entries(t).map_err(status)?;
        Ok(Response::new(pb::GetRoutingTableResponse {
            entries: entries
                .into_iter()
                .map(|e| pb::RoutingEntry {
                    route: Some(route_to_pb(&e.route)),
                    instances: e.instances,
                    decisions: e.decisions,
                })
                .collect(),
            revision,
        }))
    }

    async fn route_request(
        &self,
        req: Request<pb::RouteQuery>,
    ) -> Result<Response<pb::RouteDecision>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let protocol = protocol_from_pb(m.protocol).ok_or_else(|| {
            Status::invalid_argument(format!(
                "protocol: required: tcp, http, redis, ... (got {})",
                m.protocol
            ))
        })?;
        let flow = Flow {
            protocol,
            source: m.source,
            source_port: port(m.source_port, "source_port")?,
            destination: m.destination,
            destination_port: port(m.destination_port, "destination_port")?,
            path: m.path,
            headers: m
                .headers
                .into_iter()
                .map(|(k, v)| (k.to_ascii_lowercase(), v))
                .collect(),
        };
        let d = within(budget, self.h().decide(&flow, m.dry_run, &[])).await?;
        let r = &d.instance.record;
        Ok(Response::new(pb::RouteDecision {
            instance_id: r.instance_id.clone(),
            address: r.data_address.clone(),
            route_id: d.route.route.route_id.clone(),
            priority: d.route.route.priority,
            module_type: super::convert::module_type_to_pb(r.module_type) as i32,
            version: r.version.clone(),
            load_score: d.load_score,
            dry_run: d.dry_run,
        }))
    }

    async fn validate_route(
        &self,
        req: Request<pb::ValidateRouteRequest>,
    ) -> Result<Response<pb::ValidateRouteResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let route = req
            .into_inner()
            .route
            .ok_or_else(|| Status::invalid_argument("route: required"))?;
        let route = route_from_pb(route, "route")?;
        let route_id = route.route_id.clone();
        let answers = within(budget, self.h().validate_route(route)).await?;
        Ok(Response::new(pb::ValidateRouteResponse {
            valid: true,
            capable: answers
                .into_iter()
                .map(|(instance_id, c)| pb::Capability {
                    instance_id,
                    route_id: route_id.clone(),
                    can_handle: c.can_handle,
                    priority: c.priority,
                    reason: c.reason,
                })
                .collect(),
        }))
    }

    async fn report_metrics(
        &self,
        req: Request<pb::ReportMetricsRequest>,
    ) -> Result<Response<pb::ReportMetricsResponse>, Status> {
        own_instance(&req)?;
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        id("instance_id", &m.instance_id)?;
        let n = within(
            budget,
            self.h()
                .report_metrics(&m.instance_id, points_from_pb(m.metrics)),
        )
        .await?;
        Ok(Response::new(pb::ReportMetricsResponse {
            accepted: n as u32,
        }))
    }

    async fn get_nlb_metrics(
        &self,
        _: Request<pb::GetNlbMetricsRequest>,
    ) -> Result<Response<pb::NlbMetrics>, Status> {
        Ok(Response::new(nlb_metrics(self.h())))
    }

    async fn get_module_metrics(
        &self,
        req: Request<pb::GetModuleMetricsRequest>,
    ) -> Result<Response<pb::ModuleMetrics>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let inst = within(budget, self.h().registered(&m.instance_id)).await?;
        let report = inst.report.clone().unwrap_or_default();
        Ok(Response::new(pb::ModuleMetrics {
            instance_id: m.instance_id,
            stats: Some(stats_to_pb(&report.stats)),
            metrics: points_to_pb(&report.metrics),
            traffic: Some(module_traffic_to_pb(&Traffic::of(&inst))),
            load: Some(load_to_pb(&inst, now_ms())),
        }))
    }

    type StreamNLBMetricsStream = MetricsStream;

    async fn stream_nlb_metrics(
        &self,
        req: Request<pb::StreamNlbMetricsRequest>,
    ) -> Result<Response<Self::StreamNLBMetricsStream>, Status> {
        let every = match req.into_inner().interval_ms {
            0 => Duration::from_secs(1),
            ms if ms < 100 => {
                return Err(Status::invalid_argument(format!(
                    "interval_ms: {ms} is under the 100 ms minimum"
                )))
            }
            ms => Duration::from_millis(ms.into()),
        };
        let h = self.h().clone();
        let stream = stream_until_shutdown(self.shutdown.clone(), move |out| async move {
            let mut tick = tokio::time::interval(every);
            loop {
                tick.tick().await;
                if out.send(Ok(nlb_metrics(&h))).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn check_health(
        &self,
        req: Request<pb::CheckHealthRequest>,
    ) -> Result<Response<pb::CheckHealthResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let deep = req.into_inner().deep;
        let r = self.h().check_health(deep, budget).await;
        Ok(Response::new(pb::CheckHealthResponse {
            status: health_to_pb(r.status) as i32,
            message: r.message,
            modules: r
                .instances
                .into_iter()
                .map(|i| pb::ModuleHealth {
                    instance_id: i.instance_id,
                    health: health_to_pb(i.health) as i32,
                    reason: i.reason,
                })
                .collect(),
        }))
    }

    async fn get_nlb_status(
        &self,
        req: Request<pb::GetNlbStatusRequest>,
    ) -> Result<Response<pb::NlbStatus>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let view = self.h().loaded_view().map_err(status)?;
        let now = now_ms();
        let leader = match self.b.raft.send_timeout(GetStatus, budget).await {
            Ok(Ok(s)) => s.leader.unwrap_or(0),
            _ => 0,
        };
        let m = nlb_metrics(self.h());
        Ok(Response::new(pb::NlbStatus {
            member_id: self.h().member(),
            leader_id: leader,
            uptime_ms: self.b.started.elapsed().as_millis() as i64,
            modules_total: view.instances.len() as u32,
            modules_healthy: view
                .instances
                .values()
                .filter(|i| i.health(now).0.routable())
                .count() as u32,
            routes: view.routes.value.routes().len() as u32,
            routing_revision: view.routes.revision,
            listeners: self.b.listeners.read().expect("listeners").clone(),
            active_connections: m.active_connections,
            decisions_total: m.decisions.values().sum(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        }))
    }

    async fn update_nlb_config(
        &self,
        req: Request<pb::UpdateNlbConfigRequest>,
    ) -> Result<Response<pb::BalancerConfig>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let u = SettingsUpdate {
            heartbeat_interval_ms: m.heartbeat_interval_ms,
            max_missed_heartbeats: m.max_missed_heartbeats,
            drain_timeout_ms: m.drain_timeout_ms,
            can_handle_ttl_ms: m.can_handle_ttl_ms,
            autoscale_interval_ms: m.autoscale_interval_ms,
            rebalance_threshold: m.rebalance_threshold,
            validate_only: m.validate_only,
        };
        let (s, rev) = within(budget, self.h().update_settings(u)).await?;
        Ok(Response::new(settings_to_pb(&s, rev)))
    }

    async fn get_nlb_config(
        &self,
        _: Request<pb::GetNlbConfigRequest>,
    ) -> Result<Response<pb::BalancerConfig>, Status> {
        let s = self.h().loaded_view().map_err(status)?.settings.clone();
        Ok(Response::new(settings_to_pb(&s.value, s.revision)))
    }

    async fn rebalance_load(
        &self,
        req: Request<pb::RebalanceLoadRequest>,
    ) -> Result<Response<pb::RebalanceLoadResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let t = optional_type(m.module_type, "module_type")?;
        let (before, plan) = within(budget, self.h().rebalance(t, m.dry_run)).await?;
        Ok(Response::new(pb::RebalanceLoadResponse {
            balance_score_before: before,
            shed: plan
                .into_iter()
                .map(|(instance_id, connections)| pb::Shed {
                    instance_id,
                    connections,
                })
                .collect(),
            dry_run: m.dry_run,
        }))
    }

    async fn get_load_distribution(
        &self,
        req: Request<pb::GetLoadDistributionRequest>,
    ) -> Result<Response<pb::LoadDistribution>, Status> {
        let t = optional_type(req.get_ref().module_type, "module_type")?;
        let (infos, balance) = self.h().load(t);
        let now = now_ms();
        Ok(Response::new(pb::LoadDistribution {
            instances: infos.iter().map(|l| load_info_to_pb(l, now)).collect(),
            balance_score: balance,
        }))
    }

    async fn trigger_scaling(
        &self,
        req: Request<pb::TriggerScalingRequest>,
    ) -> Result<Response<pb::ScalingDecision>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let t = required_module_type(m.module_type, "module_type")?;
        let direction = match pb::ScalingDirection::try_from(m.direction) {
            Ok(pb::ScalingDirection::Up) => Some(Direction::Up),
            Ok(pb::ScalingDirection::Down) => Some(Direction::Down),
            Ok(pb::ScalingDirection::Auto) => None,
            _ if m.desired_instances > 0 => Some(Direction::None),
            _ => {
                return Err(Status::invalid_argument(
                    "direction: required: UP, DOWN or AUTO (or desired_instances)",
                ))
            }
        };
        let (d, delivered) = within(
            budget,
            self.h()
                .trigger_scaling(t, direction, m.desired_instances, &m.reason),
        )
        .await?;
        Ok(Response::new(decision_to_pb(t, &d, delivered)))
    }

    async fn set_traffic_weight(
        &self,
        req: Request<pb::SetTrafficWeightRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let t = required_module_type(m.module_type, "module_type")?;
        let v = within(budget, self.h().set_weight(t, &m.version, m.weight)).await?;
        Ok(Response::new(traffic_to_pb(t, &v)))
    }

    async fn get_active_version(
        &self,
        req: Request<pb::GetActiveVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let t = required_module_type(req.get_ref().module_type, "module_type")?;
        Ok(Response::new(traffic_to_pb(
            t,
            &self.h().loaded_view().map_err(status)?.traffic_of(t),
        )))
    }

    async fn promote_version(
        &self,
        req: Request<pb::PromoteVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let m = req.into_inner();
        let t = required_module_type(m.module_type, "module_type")?;
        let v = within(
            budget,
            self.h().promote(
                t,
                &m.version,
                m.gradual,
                m.step_percent,
                m.interval_ms.into(),
            ),
        )
        .await?;
        Ok(Response::new(traffic_to_pb(t, &v)))
    }

    async fn rollback(
        &self,
        req: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let t = required_module_type(req.get_ref().module_type, "module_type")?;
        let v = within(budget, self.h().rollback(t)).await?;
        Ok(Response::new(traffic_to_pb(t, &v)))
    }

    async fn set_rate_limit(
        &self,
        req: Request<pb::SetRateLimitRequest>,
    ) -> Result<Response<pb::RateLimit>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let l = req
            .into_inner()
            .limit
            .ok_or_else(|| Status::invalid_argument("limit: required"))?;
        let spec = within(budget, self.h().set_limit(limit_from_pb(l))).await?;
        Ok(Response::new(limit_to_pb(&spec)))
    }

    async fn get_rate_limits(
        &self,
        _: Request<pb::GetRateLimitsRequest>,
    ) -> Result<Response<pb::GetRateLimitsResponse>, Status> {
        let view = self.h().loaded_view().map_err(status)?;
        Ok(Response::new(pb::GetRateLimitsResponse {
            limits: view.limits.value.iter().map(limit_to_pb).collect(),
        }))
    }

    async fn remove_rate_limit(
        &self,
        req: Request<pb::RemoveRateLimitRequest>,
    ) -> Result<Response<pb::RemoveRateLimitResponse>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let target = req.into_inner().target;
        LimitTarget::parse(&target, "target").map_err(Status::invalid_argument)?;
        let removed = within(budget, self.h().remove_limit(&target)).await?;
        Ok(Response::new(pb::RemoveRateLimitResponse { removed }))
    }

    async fn set_scaling_config(
        &self,
        req: Request<pb::SetScalingConfigRequest>,
    ) -> Result<Response<pb::ScalingConfig>, Status> {
        let budget = deadline::of(&req, self.timeout);
        let c = req
            .into_inner()
            .config
            .ok_or_else(|| Status::invalid_argument("config: required"))?;
        let t = required_module_type(c.module_type, "config.module_type")?;
        let c = within(budget, self.h().set_scaling(t, scaling_from_pb(c))).await?;
        Ok(Response::new(scaling_to_pb(t, &c)))
    }

    async fn get_scaling_config(
        &self,
        req: Request<pb::GetScalingConfigRequest>,
    ) -> Result<Response<pb::ScalingConfig>, Status> {
        let t = required_module_type(req.get_ref().module_type, "module_type")?;
        let c = self
            .h()
            .loaded_view()
            .map_err(status)?
            .scaling_of(t)
            .value
            .config;
        Ok(Response::new(scaling_to_pb(t, &c)))
    }
}
