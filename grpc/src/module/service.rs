//! `lodge.balancer.v1.Module`, as every module serves it. Calls about the module itself
//! (status, routes, limits, health, stats, settings) are answered here; calls about the module's
//! type as a whole (traffic weights, versions, scaling, instances) are forwarded to the
//! balancer, whose replicated state is the truth for them, with this module's type filled in.

use std::collections::{BTreeMap, HashMap};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Channel;
use lodge_actors::balancer::route::{protocol_matches, CompiledRoute};
use lodge_actors::balancer::{Flow, ModuleType, Protocol, Route, RoutingTable};
use lodge_actors::quote::echo;
use tokio::time::Instant;
use tokio_stream::wrappers::IntervalStream;
use tokio_stream::{Stream, StreamExt};
use tonic::{Request, Response, Status};

use super::link::call_balancer;
use super::state::{lock, unix_ms, Sampler, Shared, Snapshot};
use super::{ModuleHandle, DEFAULT_DRAIN_TIMEOUT};
use crate::balancer::convert::{module_type_to_pb, route_from_pb, route_to_pb};
use crate::pb::balancer as pb;
use crate::pb::balancer::balancer_client::BalancerClient;
use crate::pb::balancer::module_server::Module;
use crate::registry_client::timed;

/// StreamMetrics' interval when the caller gives none, and the shortest it accepts.
const STREAM_INTERVAL_DEFAULT: Duration = Duration::from_millis(1000);
const STREAM_INTERVAL_MIN: Duration = Duration::from_millis(100);

/// The Module service of one module; see the module documentation.
pub struct ModuleService {
    shared: Arc<Shared>,
}

impl ModuleService {
    pub(crate) fn new(shared: Arc<Shared>) -> Self {
        ModuleService { shared }
    }

    fn handle(&self) -> ModuleHandle {
        ModuleHandle::from_shared(self.shared.clone())
    }

    fn own_type(&self) -> i32 {
        module_type_to_pb(self.shared.opts.module_type) as i32
    }

    /// The module type a forwarded request may name: this module's, or none (filled in).
    fn type_field(&self, v: i32, field: &str) -> Result<i32, Status> {
        let own = self.own_type();
        if v == 0 || v == own {
            return Ok(own);
        }
        Err(Status::invalid_argument(format!(
            "{field}: this is a {} module; it answers for its own type only (got {v}; ask a \
             module of that type or the balancer)",
            self.shared.opts.module_type
        )))
    }

    /// Sends `req` to the balancer with `call` (its method), bounded by the call timeout and
    /// failing over across the balancer's endpoints: the type-wide calls are the cluster's.
    async fn forward<Req, T, F, Fut>(&self, req: Req, call: F) -> Result<T, Status>
    where
        Req: Clone,
        F: Fn(BalancerClient<Channel>, Request<Req>) -> Fut,
        Fut: std::future::Future<Output = Result<Response<T>, Status>>,
    {
        let t = self.shared.opts.call_timeout;
        call_balancer(&self.shared, t, |c| call(c, timed(req.clone(), t))).await
    }

    fn routes(&self) -> Vec<Route> {
        lock(&self.shared.routes)
            .routes()
            .iter()
            .map(|r| r.route.clone())
            .collect()
    }

    fn routes_response(&self) -> pb::GetRoutesResponse {
        pb::GetRoutesResponse {
            routes: self.routes().iter().map(route_to_pb).collect(),
        }
    }
}

/// Whether a route naming `route` sends this module flows of a protocol it serves. A route
/// naming `tcp` takes any TCP flow, so every module handles its share of it. HLS and DASH are
/// HTTP/1 told apart by their paths, so a module serving `http` serves them too.
pub fn serves(served: &[Protocol], route: Protocol) -> bool {
    route == Protocol::Tcp
        || served.iter().any(|&p| {
            let flow = Flow {
                protocol: p,
                ..Flow::default()
            };
            protocol_matches(route, &flow)
                || (p == Protocol::Http && matches!(route, Protocol::Hls | Protocol::Dash))
        })
}

/// The CanHandle answer for a valid `route`: (can handle, priority, reason).
pub fn can_handle(
    module_type: ModuleType,
    served: &[Protocol],
    draining: bool,
    local: &RoutingTable,
    route: &Route,
) -> (bool, i32, String) {
    if route.target != module_type {
        return (
            false,
            0,
            format!(
                "the route targets {} modules; this is a {module_type} module",
                route.target
            ),
        );
    }
    if !serves(served, route.protocol) {
        let names: Vec<&str> = served.iter().map(|p| p.as_str()).collect();
        return (
            false,
            0,
            format!(
                "this module does not serve {} (it serves {})",
                route.protocol,
                names.join(", ")
            ),
        );
    }
    if draining {
        return (false, 0, "draining: no new traffic".into());
    }
    if local.routes().is_empty() {
        return (true, 0, String::new());
    }
    match local.get(&route.route_id) {
        Some(r) => (true, r.route.priority, String::new()),
        None => (
            false,
            0,
            format!(
                "route {} is not one of this module's {} routes",
                echo(&route.route_id),
                local.routes().len()
            ),
        ),
    }
}

/// `ModuleStats` as named metric points.
fn stat_points(
    s: &pb::ModuleStats,
    labels: &HashMap<String, String>,
    at: i64,
) -> Vec<pb::MetricPoint> {
    [
        ("module_active_connections", s.active_connections as f64),
        ("module_connections_total", s.total_connections as f64),
        ("module_requests_per_second", s.requests_per_second),
        ("module_cpu_percent", s.cpu_percent),
        ("module_memory_percent", s.memory_percent),
        ("module_memory_bytes", s.memory_bytes as f64),
        ("module_latency_ms", s.latency_ms),
        ("module_queue_depth", s.queue_depth as f64),
        ("module_bytes_in", s.bytes_in as f64),
        ("module_bytes_out", s.bytes_out as f64),
        ("module_errors_total", s.errors_total as f64),
        ("module_uptime_ms", s.uptime_ms as f64),
    ]
    .into_iter()
    .map(|(name, value)| pb::MetricPoint {
        name: name.into(),
        value,
        labels: labels.clone(),
        timestamp_ms: at,
    })
    .collect()
}

type StatsStream = Pin<Box<dyn Stream<Item = Result<pb::ModuleStats, Status>> + Send>>;

#[tonic::async_trait]
impl Module for ModuleService {
    async fn get_status(
        &self,
        _: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::ModuleStatus>, Status> {
        let s = &self.shared;
        let link = s.link.borrow().clone();
        Ok(Response::new(pb::ModuleStatus {
            instance_id: s.instance_id(),
            module_type: self.own_type(),
            version: s.opts.version.clone(),
            health: s.health().0 as i32,
            uptime_ms: s.uptime_ms(),
            active_connections: s.tracker.active(),
            draining: s.is_draining(),
            registered: link.registered,
            data_address: s.opts.data_address.clone(),
        }))
    }

    async fn reload(
        &self,
        _: Request<pb::ReloadRequest>,
    ) -> Result<Response<pb::ReloadResponse>, Status> {
        let (reloaded, message) = match self.shared.hooks.reload.clone() {
            Some(hook) => match hook().await {
                Ok(m) => (true, m),
                Err(e) => (false, e),
            },
            None => (false, "this module has nothing to reload".into()),
        };
        Ok(Response::new(pb::ReloadResponse { reloaded, message }))
    }

    async fn shutdown(
        &self,
        r: Request<pb::ShutdownRequest>,
    ) -> Result<Response<pb::ShutdownResponse>, Status> {
        let r = r.into_inner();
        let h = self.handle();
        let report = if r.graceful {
            let t = match r.drain_timeout_ms {
                0 => DEFAULT_DRAIN_TIMEOUT,
                ms => Duration::from_millis(ms.into()),
            };
            h.drain(t).await
        } else {
            h.stop_now().await
        };
        // The process's server finishes this call before it stops.
        h.request_exit();
        Ok(Response::new(pb::ShutdownResponse {
            drained_connections: report.drained,
            remaining_connections: report.remaining,
        }))
    }

    async fn can_handle(
        &self,
        r: Request<pb::CanHandleRequest>,
    ) -> Result<Response<pb::CanHandleResponse>, Status> {
        let route = r
            .into_inner()
            .route
            .ok_or_else(|| Status::invalid_argument("route: required"))?;
        let route = route_from_pb(route, "route")?;
        let route = CompiledRoute::compile(route, "route")
            .map_err(Status::invalid_argument)?
            .route;
        let s = &self.shared;
        let (can, priority, reason) = can_handle(
            s.opts.module_type,
            s.opts.protocols(),
            s.is_draining(),
            &lock(&s.routes),
            &route,
        );
        Ok(Response::new(pb::CanHandleResponse {
            can_handle: can,
            priority,
            reason,
        }))
    }

    async fn get_routes(
        &self,
        _: Request<pb::GetRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        Ok(Response::new(self.routes_response()))
    }

    async fn update_routes(
        &self,
        r: Request<pb::UpdateRoutesRequest>,
    ) -> Result<Response<pb::GetRoutesResponse>, Status> {
        let r = r.into_inner();
        let given = r
            .routes
            .into_iter()
            .enumerate()
            .map(|(i, route)| route_from_pb(route, &format!("routes[{i}]")))
            .collect::<Result<Vec<Route>, Status>>()?;
        // Checked on their own first, so that errors name the request's own indices.
        let checked = RoutingTable::compile(given.clone()).map_err(Status::invalid_argument)?;
        let table = if r.replace_all {
            checked
        } else {
            let mut merged: BTreeMap<String, Route> = self
                .routes()
                .into_iter()
                .map(|r| (r.route_id.clone(), r))
                .collect();
            merged.extend(given.into_iter().map(|r| (r.route_id.clone(), r)));
            RoutingTable::compile(merged.into_values().collect())
                .map_err(Status::invalid_argument)?
        };
        *lock(&self.shared.routes) = table;
        Ok(Response::new(self.routes_response()))
    }

    async fn delete_route(
        &self,
        r: Request<pb::DeleteRouteRequest>,
    ) -> Result<Response<pb::DeleteRouteResponse>, Status> {
        let id = r.into_inner().route_id;
        if id.is_empty() {
            return Err(Status::invalid_argument("route_id: required"));
        }
        let mut routes = self.routes();
        let before = routes.len();
        routes.retain(|r| r.route_id != id);
        if routes.len() == before {
            return Err(Status::not_found(format!(
                "route_id: no route {} on this module",
                echo(&id)
            )));
        }
        // Every remaining route compiled before, so this cannot fail.
        *lock(&self.shared.routes) = RoutingTable::compile(routes).map_err(Status::internal)?;
        Ok(Response::new(pb::DeleteRouteResponse { deleted: true }))
    }

    async fn get_rate_limits(
        &self,
        _: Request<pb::GetRateLimitsRequest>,
    ) -> Result<Response<pb::GetRateLimitsResponse>, Status> {
        Ok(Response::new(pb::GetRateLimitsResponse {
            limits: self.shared.limits.list(),
        }))
    }

    async fn set_rate_limit(
        &self,
        r: Request<pb::SetRateLimitRequest>,
    ) -> Result<Response<pb::RateLimit>, Status> {
        let r = r.into_inner();
        Ok(Response::new(self.shared.limits.set(r.limit.as_ref())?))
    }

    async fn remove_rate_limit(
        &self,
        r: Request<pb::RemoveRateLimitRequest>,
    ) -> Result<Response<pb::RemoveRateLimitResponse>, Status> {
        let removed = self.shared.limits.remove(&r.into_inner().target);
        Ok(Response::new(pb::RemoveRateLimitResponse { removed }))
    }

    async fn get_metrics(
        &self,
        r: Request<pb::GetMetricsRequest>,
    ) -> Result<Response<pb::GetMetricsResponse>, Status> {
        let names = r.into_inner().names;
        let s = &self.shared;
        let at = unix_ms();
        let labels: HashMap<String, String> = [
            ("instance_id".to_string(), s.instance_id()),
            (
                "module_type".to_string(),
                s.opts.module_type.as_str().to_string(),
            ),
        ]
        .into();
        let mut points = stat_points(&s.stats_on_demand(), &labels, at);
        points.extend(
            lock(&s.metrics)
                .iter()
                .map(|((name, l), (value, ts))| pb::MetricPoint {
                    name: name.clone(),
                    value: *value,
                    labels: l.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
                    timestamp_ms: *ts,
                }),
        );
        if !names.is_empty() {
            points.retain(|p| names.contains(&p.name));
        }
        Ok(Response::new(pb::GetMetricsResponse { metrics: points }))
    }

    async fn scale(
        &self,
        r: Request<pb::ScaleRequest>,
    ) -> Result<Response<pb::ScaleResponse>, Status> {
        let mut config = r
            .into_inner()
            .config
            .ok_or_else(|| Status::invalid_argument("config: required"))?;
        config.module_type = self.type_field(config.module_type, "config.module_type")?;
        let req = pb::SetScalingConfigRequest {
            config: Some(config),
        };
        let config = self
            .forward(req, |mut c, r| async move { c.set_scaling_config(r).await })
            .await?;
        Ok(Response::new(pb::ScaleResponse {
            config: Some(config),
        }))
    }

    async fn get_instances(
        &self,
        _: Request<pb::GetInstancesRequest>,
    ) -> Result<Response<pb::ListModulesResponse>, Status> {
        let req = pb::ListModulesRequest {
            module_type: self.own_type(),
            ..Default::default()
        };
        let r = self
            .forward(req, |mut c, r| async move { c.list_modules(r).await })
            .await?;
        Ok(Response::new(r))
    }

    async fn set_traffic_weight(
        &self,
        r: Request<pb::SetTrafficWeightRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let mut req = r.into_inner();
        req.module_type = self.type_field(req.module_type, "module_type")?;
        let r = self
            .forward(req, |mut c, r| async move { c.set_traffic_weight(r).await })
            .await?;
        Ok(Response::new(r))
    }

    async fn get_active_version(
        &self,
        r: Request<pb::GetActiveVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let mut req = r.into_inner();
        req.module_type = self.type_field(req.module_type, "module_type")?;
        let r = self
            .forward(req, |mut c, r| async move { c.get_active_version(r).await })
            .await?;
        Ok(Response::new(r))
    }

    async fn rollback(
        &self,
        r: Request<pb::RollbackRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let mut req = r.into_inner();
        req.module_type = self.type_field(req.module_type, "module_type")?;
        let r = self
            .forward(req, |mut c, r| async move { c.rollback(r).await })
            .await?;
        Ok(Response::new(r))
    }

    async fn promote_version(
        &self,
        r: Request<pb::PromoteVersionRequest>,
    ) -> Result<Response<pb::TrafficState>, Status> {
        let mut req = r.into_inner();
        req.module_type = self.type_field(req.module_type, "module_type")?;
        let r = self
            .forward(req, |mut c, r| async move { c.promote_version(r).await })
            .await?;
        Ok(Response::new(r))
    }

    async fn health_check(
        &self,
        r: Request<pb::HealthCheckRequest>,
    ) -> Result<Response<pb::HealthCheckResponse>, Status> {
        let (mut health, mut message) = self.shared.health();
        let mut checks = Vec::new();
        if r.into_inner().deep {
            if let Some(hook) = self.shared.hooks.deep_check.clone() {
                checks = hook().await;
            }
            let failed: Vec<String> = checks
                .iter()
                .filter(|c| !c.ok)
                .map(|c| format!("{}: {}", c.name, c.message))
                .collect();
            // A module that is stopping says so, whatever its backend does.
            if !failed.is_empty()
                && !matches!(
                    health,
                    pb::HealthStatus::Stopping | pb::HealthStatus::Stopped
                )
            {
                health = pb::HealthStatus::Unhealthy;
                message = failed.join("; ");
            }
        }
        Ok(Response::new(pb::HealthCheckResponse {
            health: health as i32,
            message,
            checks,
        }))
    }

    async fn get_stats(
        &self,
        _: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::ModuleStats>, Status> {
        Ok(Response::new(self.shared.stats_on_demand()))
    }

    type StreamMetricsStream = StatsStream;

    async fn stream_metrics(
        &self,
        r: Request<pb::StreamMetricsRequest>,
    ) -> Result<Response<StatsStream>, Status> {
        let every = match r.into_inner().interval_ms {
            0 => STREAM_INTERVAL_DEFAULT,
            ms => Duration::from_millis(ms.into()).max(STREAM_INTERVAL_MIN),
        };
        let shared = self.shared.clone();
        // Each stream has its own window: its rates are over its own interval.
        let mut sampler = Sampler::new(Snapshot::take(&shared.tracker), Duration::ZERO);
        let ticks = IntervalStream::new(tokio::time::interval_at(Instant::now() + every, every));
        let stream = ticks.map(move |_| Ok(shared.stats(&mut sampler)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get_config(
        &self,
        _: Request<pb::GetConfigRequest>,
    ) -> Result<Response<pb::ModuleConfig>, Status> {
        Ok(Response::new(pb::ModuleConfig {
            settings: lock(&self.shared.settings).clone().into_iter().collect(),
        }))
    }

    async fn update_config(
        &self,
        r: Request<pb::UpdateConfigRequest>,
    ) -> Result<Response<pb::ModuleConfig>, Status> {
        let r = r.into_inner();
        let hooks = self.shared.hooks.settings.as_ref();
        // In name order, so that the first error named is the same every time.
        let given: BTreeMap<String, String> = r.settings.into_iter().collect();
        let mut merged = lock(&self.shared.settings).clone();
        for (key, value) in given {
            if !merged.contains_key(&key) {
                let known: Vec<&str> = merged.keys().map(String::as_str).collect();
                return Err(Status::invalid_argument(format!(
                    "settings[{}]: unknown setting (known: {})",
                    echo(&key),
                    if known.is_empty() {
                        "none".to_string()
                    } else {
                        known.join(", ")
                    }
                )));
            }
            if let Some(h) = hooks {
                (h.validate)(&key, &value).map_err(|e| {
                    Status::invalid_argument(format!("settings[{}]: {e}", echo(&key)))
                })?;
            }
            merged.insert(key, value);
        }
        if !r.validate_only {
            *lock(&self.shared.settings) = merged.clone();
            if let Some(apply) = hooks.and_then(|h| h.on_change.clone()) {
                apply(&self.handle(), &merged);
            }
        }
        Ok(Response::new(pb::ModuleConfig {
            settings: merged.into_iter().collect(),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(id: &str, protocol: Protocol, target: ModuleType, priority: i32) -> Route {
        Route {
            route_id: id.into(),
            protocol,
            source_pattern: String::new(),
            destination_pattern: String::new(),
            source_port: 0,
            destination_port: 0,
            path_pattern: String::new(),
            headers: BTreeMap::new(),
            priority,
            target,
        }
    }

    #[test]
    fn can_handle_table() {
        use ModuleType::*;
        use Protocol::*;
        let none = RoutingTable::default();
        let local = RoutingTable::compile(vec![route("web", Http, Alb, 7)]).unwrap();
        let (alb, dblb, nlb) = (Alb.protocols(), Dblb.protocols(), Nlb.protocols());
        let ask = |t, served: &[Protocol], draining, table: &RoutingTable, r: Route| {
            can_handle(t, served, draining, table, &r)
        };
        let yes = |(can, priority, why): (bool, i32, String), want: i32| {
            assert!(can && why.is_empty(), "{why}");
            assert_eq!(priority, want);
        };
        let no = |(can, priority, why): (bool, i32, String), reason: &str| {
            assert!(!can && priority == 0);
            assert!(why.contains(reason), "{why:?} lacks {reason:?}");
        };
        yes(ask(Alb, alb, false, &none, route("a", Http, Alb, 3)), 0);
        yes(ask(Alb, alb, false, &none, route("a", Grpc, Alb, 3)), 0);
        // http2 routes take gRPC flows and the other way round.
        yes(
            ask(Alb, &[Grpc], false, &none, route("a", Http2, Alb, 0)),
            0,
        );
        no(
            ask(Alb, alb, false, &none, route("a", Mysql, Alb, 0)),
            "does not serve mysql",
        );
        no(
            ask(Alb, alb, false, &none, route("a", Udp, Alb, 0)),
            "does not serve udp",
        );
        // tcp: every module handles its share.
        yes(ask(Dblb, dblb, false, &none, route("a", Tcp, Dblb, 0)), 0);
        yes(ask(Alb, &[Udp], false, &none, route("a", Tcp, Alb, 0)), 0);
        yes(ask(Nlb, nlb, false, &none, route("a", Redis, Nlb, 0)), 0);
        // HLS and DASH ride on HTTP/1.
        yes(ask(Alb, &[Http], false, &none, route("a", Hls, Alb, 0)), 0);
        yes(ask(Alb, &[Http], false, &none, route("a", Dash, Alb, 0)), 0);
        no(
            ask(Alb, &[Http], false, &none, route("a", Https, Alb, 0)),
            "does not serve https",
        );
        // Another type's route.
        no(
            ask(Alb, alb, false, &none, route("a", Http, Dblb, 0)),
            "targets dblb",
        );
        // Draining takes nothing new.
        no(
            ask(Alb, alb, true, &none, route("a", Http, Alb, 0)),
            "draining",
        );
        // With local routes: only those, at their priority.
        yes(ask(Alb, alb, false, &local, route("web", Http, Alb, 1)), 7);
        let other = ask(Alb, alb, false, &local, route("api", Http, Alb, 1));
        no(other, "not one of this module's 1 routes");
        no(
            ask(Alb, alb, true, &local, route("web", Http, Alb, 1)),
            "draining",
        );
    }
}
