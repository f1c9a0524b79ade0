//! `lodge lb`: the balancer (`lodge.balancer.v1.Balancer`) from a terminal. Tables for people,
//! `--json` for scripts (one document; one per line for `metrics --watch`).
//!
//! Every call goes through [`failover::call`], so `--endpoint` may list several nodes. A node's
//! refusal is printed as its status message after `lodge lb: ` (the node's messages name the
//! field at fault) and exits 1; argument errors are clap's and exit 2.

mod print;
mod request;

use std::future::Future;
use std::path::PathBuf;

use clap::{Args, Subcommand};
use lodge_actors::balancer::{ModuleType, Protocol};
use lodge_grpc::client::Channel;
use lodge_grpc::pb::balancer::{self as pb, balancer_client::BalancerClient};
use tokio_stream::StreamExt;
use tonic::{Code, Status};

use crate::ctl::Connection;
use crate::failover;

pub use request::Setting;

/// `lodge lb` subcommands.
#[derive(Subcommand, Debug)]
pub enum Lb {
    /// Module instances with their health and load.
    Modules {
        /// Only instances of this type (alb, dblb, ailb, rtmp, nlb).
        #[arg(long = "type", value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: Option<ModuleType>,
        /// Only instances of this version.
        #[arg(long, default_value = "")]
        version: String,
        /// Only healthy instances.
        #[arg(long)]
        healthy: bool,
    },
    /// One instance: its registration, its load, what it answered to CanHandle for each route,
    /// and the metrics it reported.
    Module {
        /// The instance's id.
        id: String,
    },
    /// End an instance's registration.
    Unregister {
        /// The instance's id.
        id: String,
        /// Stop new traffic at once, then wait for its connections to finish.
        #[arg(long)]
        graceful: bool,
        /// How long a graceful unregistration waits (default: the balancer's drain_timeout_ms).
        #[arg(long, value_name = "MS", requires = "graceful")]
        drain_timeout_ms: Option<u32>,
    },
    /// The routing table, in the order routes are tried.
    Routes {
        /// Only routes to this module type.
        #[arg(long, value_name = "TYPE", value_parser = request::parse_module_type)]
        target: Option<ModuleType>,
    },
    /// Change the routing table, or try a flow against it.
    Route {
        #[command(subcommand)]
        cmd: RouteCmd,
    },
    /// The traffic weights of a type's versions; with --version and --weight, set one.
    Weights {
        /// The module type.
        #[arg(value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: ModuleType,
        /// The version whose weight to set.
        #[arg(long, requires = "weight")]
        version: Option<String>,
        /// Its share of the type's traffic, in percent (the others share the rest).
        #[arg(long, requires = "version", value_parser = clap::value_parser!(u32).range(0..=100))]
        weight: Option<u32>,
    },
    /// Send a type's traffic to a version: at once, or step by step with --gradual.
    Promote {
        /// The module type.
        #[arg(value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: ModuleType,
        /// The version to promote.
        version: String,
        /// Move the traffic over in steps.
        #[arg(long)]
        gradual: bool,
        /// Percent added at every step (default 10).
        #[arg(long, value_name = "PERCENT", requires = "gradual",
              value_parser = clap::value_parser!(u32).range(1..=100))]
        step: Option<u32>,
        /// Time between steps (default 120000).
        #[arg(long, value_name = "MS", requires = "gradual")]
        interval_ms: Option<u32>,
    },
    /// Return a type's traffic to the version that served before the latest change.
    Rollback {
        /// The module type.
        #[arg(value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: ModuleType,
    },
    /// Rate limits: list them, or set or remove one.
    Limits {
        #[command(subcommand)]
        cmd: Option<LimitsCmd>,
    },
    /// The load of every instance and how evenly it is spread.
    Load {
        /// Only this module type.
        #[arg(long = "type", value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: Option<ModuleType>,
    },
    /// Ask instances loaded well above their type's mean to shed connections.
    Rebalance {
        /// Only this module type.
        #[arg(long = "type", value_name = "TYPE", value_parser = request::parse_module_type)]
        module_type: Option<ModuleType>,
        /// Say what would be shed, and ask nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// A type's scaling settings; scale it now (--up, --down, --auto, --to); or change the
    /// settings (--set with the flags to change).
    Scale(ScaleArgs),
    /// This node's balancer: members, modules, routes, listeners, traffic.
    Status,
    /// The balancer's health (exits 1 unless healthy).
    Health {
        /// Ask every module instance for its health too.
        #[arg(long)]
        deep: bool,
    },
    /// The balancer's settings; with --set, change some.
    Config {
        /// KEY=VALUE: one of BalancerConfig's fields (heartbeat_interval_ms,
        /// max_missed_heartbeats, drain_timeout_ms, can_handle_ttl_ms, autoscale_interval_ms,
        /// rebalance_threshold); several may follow one --set.
        #[arg(long, value_name = "KEY=VALUE", num_args = 1.., value_parser = request::parse_setting)]
        set: Vec<Setting>,
        /// Check the settings; write nothing.
        #[arg(long, requires = "set")]
        validate_only: bool,
    },
    /// This node's balancer figures; with --watch, a line at every update until interrupted.
    Metrics {
        /// Stream updates.
        #[arg(long)]
        watch: bool,
        /// Time between updates (default 1000).
        #[arg(long, value_name = "MS", requires = "watch")]
        interval_ms: Option<u32>,
    },
}

/// `lodge lb route` subcommands.
#[derive(Subcommand, Debug)]
pub enum RouteCmd {
    /// Add a route, or replace the one with the same id.
    Add {
        #[command(flatten)]
        route: RouteArgs,
        /// Check the route against the table; write nothing.
        #[arg(long)]
        validate_only: bool,
        /// Write only if the table is still at this revision.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        expect_revision: Option<i64>,
    },
    /// Delete routes.
    Delete {
        /// The routes' ids.
        #[arg(required = true, value_name = "ID")]
        ids: Vec<String>,
        /// Write only if the table is still at this revision.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        expect_revision: Option<i64>,
    },
    /// Replace the whole table with the routes of a JSON file: an array of objects with the
    /// fields of a route (route_id, protocol, source_pattern, destination_pattern, source_port,
    /// destination_port, path_pattern, headers, priority, target), protocol and target as names
    /// ("http", "alb").
    Replace {
        /// The routes file ("-": standard input).
        #[arg(long, value_name = "FILE.json")]
        file: PathBuf,
        /// Check the table; write nothing.
        #[arg(long)]
        validate_only: bool,
        /// Write only if the table is still at this revision.
        #[arg(long, value_name = "N", value_parser = clap::value_parser!(i64).range(1..))]
        expect_revision: Option<i64>,
    },
    /// Decide where a flow would go (a dry run: no rate-limit tokens are spent and the version
    /// split does not advance, unless --commit).
    Test(TestArgs),
    /// Check a route and ask every instance of its target type whether it can handle it.
    Validate {
        #[command(flatten)]
        route: RouteArgs,
    },
}

/// A route as flags (`route add`, `route validate`).
#[derive(Args, Debug, Clone)]
pub struct RouteArgs {
    /// The route's id: 1 to 128 of A-Z, a-z, 0-9, '.', '_', '-'.
    #[arg(long)]
    pub id: String,
    /// The protocol it matches (tcp matches anything over TCP).
    #[arg(long, value_parser = request::parse_protocol)]
    pub protocol: Protocol,
    /// The module type that serves it (alb, dblb, ailb, rtmp, nlb).
    #[arg(long, value_name = "TYPE", value_parser = request::parse_module_type)]
    pub target: ModuleType,
    /// Source: an IP, a CIDR block or a domain glob (default: any).
    #[arg(long, value_name = "PATTERN", default_value = "")]
    pub source: String,
    /// Destination: an IP, a CIDR block or a domain glob such as *.example.com (default: any).
    #[arg(long, value_name = "PATTERN", default_value = "")]
    pub destination: String,
    /// Source port (default: any).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub source_port: u16,
    /// Destination port (default: any).
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub port: u16,
    /// Path glob starting with / or * (default: any).
    #[arg(long, value_name = "GLOB", default_value = "")]
    pub path: String,
    /// NAME=GLOB: a header that must match (repeatable; all must match).
    #[arg(long = "header", value_name = "NAME=GLOB", value_parser = request::parse_header)]
    pub headers: Vec<(String, String)>,
    /// Higher is tried first.
    #[arg(
        long,
        value_name = "N",
        default_value_t = 0,
        allow_negative_numbers = true
    )]
    pub priority: i32,
}

/// A flow to decide for (`route test`).
#[derive(Args, Debug, Clone)]
pub struct TestArgs {
    /// The flow's protocol.
    #[arg(long, value_parser = request::parse_protocol)]
    pub protocol: Protocol,
    /// Source address or host name.
    #[arg(long, default_value = "")]
    pub source: String,
    /// Source port.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub source_port: u16,
    /// Destination address or host name.
    #[arg(long, default_value = "")]
    pub destination: String,
    /// Destination port.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub port: u16,
    /// Request path.
    #[arg(long, default_value = "")]
    pub path: String,
    /// NAME=VALUE: a request header (repeatable).
    #[arg(long = "header", value_name = "NAME=VALUE", value_parser = request::parse_header)]
    pub headers: Vec<(String, String)>,
    /// Decide for real: spend rate-limit tokens and advance the version split.
    #[arg(long)]
    pub commit: bool,
}

/// `lodge lb limits` subcommands.
#[derive(Subcommand, Debug)]
pub enum LimitsCmd {
    /// Set (add or replace) a target's limit; windows not given have no limit.
    Set {
        /// route:<route_id> or module:<type>.
        target: String,
        /// Requests per second.
        #[arg(long, value_name = "N", default_value_t = 0)]
        per_second: u32,
        /// Requests per minute.
        #[arg(long, value_name = "N", default_value_t = 0)]
        per_minute: u32,
        /// Requests per hour.
        #[arg(long, value_name = "N", default_value_t = 0)]
        per_hour: u32,
        /// Extra requests the per-second window lets through at once.
        #[arg(long, value_name = "N", default_value_t = 0)]
        burst: u32,
    },
    /// Remove a target's limit (exits 1 if it had none).
    Remove {
        /// route:<route_id> or module:<type>.
        target: String,
    },
}

/// `lodge lb scale`.
#[derive(Args, Debug)]
pub struct ScaleArgs {
    /// The module type.
    #[arg(value_name = "TYPE", value_parser = request::parse_module_type)]
    pub module_type: ModuleType,
    #[command(flatten)]
    pub trigger: TriggerFlags,
    /// Why (recorded with the decision).
    #[arg(long, value_name = "TEXT", requires = "trigger")]
    pub reason: Option<String>,
    #[command(flatten)]
    pub settings: ScaleSettings,
}

/// Scale now: at most one of these.
#[derive(Args, Debug)]
#[group(id = "trigger", multiple = false)]
pub struct TriggerFlags {
    /// One instance more (within max_instances).
    #[arg(long)]
    pub up: bool,
    /// One instance fewer (within min_instances).
    #[arg(long)]
    pub down: bool,
    /// As the autoscaler would decide now (cooldowns included).
    #[arg(long)]
    pub auto: bool,
    /// This many instances (within min_instances and max_instances).
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub to: Option<u32>,
}

/// A scaling trigger, from [`TriggerFlags`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Trigger {
    Up,
    Down,
    Auto,
    To(u32),
}

impl TriggerFlags {
    /// The trigger asked for, if any.
    pub fn to_trigger(&self) -> Option<Trigger> {
        if self.up {
            Some(Trigger::Up)
        } else if self.down {
            Some(Trigger::Down)
        } else if self.auto {
            Some(Trigger::Auto)
        } else {
            self.to.map(Trigger::To)
        }
    }
}

/// Change the scaling settings (`--set` and the fields to change; the others are kept).
#[derive(Args, Debug)]
pub struct ScaleSettings {
    /// Change the settings: read them, apply the flags below, write them.
    #[arg(long, conflicts_with = "trigger")]
    pub set: bool,
    /// Let the autoscaler act on this type.
    #[arg(
        long,
        requires = "set",
        conflicts_with = "disable",
        help_heading = "Settings (with --set)"
    )]
    pub enable: bool,
    /// Stop the autoscaler acting on this type.
    #[arg(long, requires = "set", help_heading = "Settings (with --set)")]
    pub disable: bool,
    /// min_instances.
    #[arg(
        long,
        value_name = "N",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub min: Option<u32>,
    /// max_instances.
    #[arg(
        long,
        value_name = "N",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub max: Option<u32>,
    /// target_cpu_percent.
    #[arg(
        long,
        value_name = "PERCENT",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub target_cpu: Option<f64>,
    /// target_memory_percent.
    #[arg(
        long,
        value_name = "PERCENT",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub target_memory: Option<f64>,
    /// target_connections_per_instance.
    #[arg(
        long,
        value_name = "N",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub target_connections: Option<u32>,
    /// scale_up_threshold: the pressure at or above which to scale up.
    #[arg(
        long,
        value_name = "X",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub up_threshold: Option<f64>,
    /// scale_down_threshold: the pressure at or below which to scale down.
    #[arg(
        long,
        value_name = "X",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub down_threshold: Option<f64>,
    /// scale_up_cooldown_ms.
    #[arg(
        long,
        value_name = "MS",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub up_cooldown_ms: Option<u32>,
    /// scale_down_cooldown_ms.
    #[arg(
        long,
        value_name = "MS",
        requires = "set",
        help_heading = "Settings (with --set)"
    )]
    pub down_cooldown_ms: Option<u32>,
}

/// What a command got back, with what printing it needs besides.
// One answer per process: the size of the largest variant costs nothing worth a box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Answer {
    Modules(pb::ListModulesResponse),
    Module(pb::GetModuleInfoResponse),
    Unregistered(String, pb::UnregisterModuleResponse),
    Routes(pb::GetRoutingTableResponse),
    RoutingUpdated(pb::UpdateRoutingResponse),
    Decision(pb::RouteDecision),
    Validation(pb::ValidateRouteResponse),
    Traffic(pb::TrafficState),
    Limits(pb::GetRateLimitsResponse),
    Limit(pb::RateLimit),
    LimitRemoved(String, pb::RemoveRateLimitResponse),
    Load(pb::LoadDistribution),
    Rebalanced(pb::RebalanceLoadResponse),
    Scaling(pb::ScalingConfig),
    ScalingDecision(pb::ScalingDecision),
    Status(pb::NlbStatus),
    Health(pb::CheckHealthResponse),
    /// The settings, and whether they were only validated.
    Config(pb::BalancerConfig, bool),
    Metrics(pb::NlbMetrics),
}

impl Answer {
    /// The exit code: 1 where the answer is a "no" a script must see.
    pub fn exit_code(&self) -> i32 {
        let failed = match self {
            Self::LimitRemoved(_, r) => !r.removed,
            Self::Health(r) => r.status != pb::HealthStatus::Healthy as i32,
            Self::Validation(r) => !r.valid,
            _ => false,
        };
        i32::from(failed)
    }
}

/// Runs a `lodge lb` subcommand; answers the exit code.
pub async fn run(conn: Connection, cmd: Lb) -> i32 {
    let result = match cmd {
        Lb::Metrics {
            watch: true,
            interval_ms,
        } => watch_metrics(&conn, interval_ms.unwrap_or(0)).await,
        cmd => call(&conn, cmd).await.map(|answer| {
            print!("{}", print::render(&answer, conn.json));
            answer.exit_code()
        }),
    };
    result.unwrap_or_else(|e| {
        eprintln!("lodge lb: {e}");
        1
    })
}

/// Makes one call through [`failover::call`]: UNAVAILABLE goes round the endpoints (unless
/// `final_unavailable`), any other refusal is final and reported as the node's message.
async fn ask<T, F, Fut>(conn: &Connection, final_unavailable: bool, f: F) -> Result<T, String>
where
    F: Fn(BalancerClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    // The outer error is what `failover::call` retries (UNAVAILABLE) or reports; the inner one
    // is final, the node's own words.
    failover::call(conn, |channel| {
        let reply = f(BalancerClient::new(channel));
        async move {
            match reply.await {
                Ok(r) => Ok(Ok(r.into_inner())),
                Err(s) if s.code() == Code::Unavailable && !final_unavailable => Err(s),
                Err(s) => Ok(Err(status_message(&s))),
            }
        }
    })
    .await?
}

/// A refusal in the node's words (its code when it gave none).
fn status_message(s: &Status) -> String {
    if s.message().is_empty() {
        format!("{:?}", s.code())
    } else {
        s.message().to_string()
    }
}

/// Shorthand for one RPC through [`ask`]: `rpc!(conn, method, request)`.
macro_rules! rpc {
    ($conn:expr, $method:ident, $req:expr) => {{
        let req = $req;
        ask($conn, false, |mut c| {
            let req = req.clone();
            async move { c.$method(req).await }
        })
        .await?
    }};
}

async fn call(conn: &Connection, cmd: Lb) -> Result<Answer, String> {
    Ok(match cmd {
        Lb::Modules {
            module_type,
            version,
            healthy,
        } => Answer::Modules(rpc!(
            conn,
            list_modules,
            pb::ListModulesRequest {
                module_type: request::type_filter(module_type),
                version,
                healthy_only: healthy,
            }
        )),
        Lb::Module { id } => Answer::Module(rpc!(
            conn,
            get_module_info,
            pb::GetModuleInfoRequest { instance_id: id }
        )),
        Lb::Unregister {
            id,
            graceful,
            drain_timeout_ms,
        } => {
            let r = rpc!(
                conn,
                unregister_module,
                pb::UnregisterModuleRequest {
                    instance_id: id.clone(),
                    graceful,
                    drain_timeout_ms: drain_timeout_ms.unwrap_or(0),
                }
            );
            Answer::Unregistered(id, r)
        }
        Lb::Routes { target } => Answer::Routes(rpc!(
            conn,
            get_routing_table,
            pb::GetRoutingTableRequest {
                target: request::type_filter(target),
            }
        )),
        Lb::Route { cmd } => route(conn, cmd).await?,
        Lb::Weights {
            module_type,
            version: Some(version),
            weight: Some(weight),
        } => Answer::Traffic(rpc!(
            conn,
            set_traffic_weight,
            pb::SetTrafficWeightRequest {
                module_type: request::module_type(module_type),
                version,
                weight,
            }
        )),
        Lb::Weights { module_type, .. } => Answer::Traffic(rpc!(
            conn,
            get_active_version,
            pb::GetActiveVersionRequest {
                module_type: request::module_type(module_type),
            }
        )),
        Lb::Promote {
            module_type,
            version,
            gradual,
            step,
            interval_ms,
        } => Answer::Traffic(rpc!(
            conn,
            promote_version,
            pb::PromoteVersionRequest {
                module_type: request::module_type(module_type),
                version,
                gradual,
                step_percent: step.unwrap_or(0),
                interval_ms: interval_ms.unwrap_or(0),
            }
        )),
        Lb::Rollback { module_type } => Answer::Traffic(rpc!(
            conn,
            rollback,
            pb::RollbackRequest {
                module_type: request::module_type(module_type),
            }
        )),
        Lb::Limits { cmd: None } => {
            Answer::Limits(rpc!(conn, get_rate_limits, pb::GetRateLimitsRequest {}))
        }
        Lb::Limits {
            cmd:
                Some(LimitsCmd::Set {
                    target,
                    per_second,
                    per_minute,
                    per_hour,
                    burst,
                }),
        } => Answer::Limit(rpc!(
            conn,
            set_rate_limit,
            pb::SetRateLimitRequest {
                limit: Some(pb::RateLimit {
                    target,
                    requests_per_second: per_second,
                    requests_per_minute: per_minute,
                    requests_per_hour: per_hour,
                    burst,
                }),
            }
        )),
        Lb::Limits {
            cmd: Some(LimitsCmd::Remove { target }),
        } => {
            let r = rpc!(
                conn,
                remove_rate_limit,
                pb::RemoveRateLimitRequest {
                    target: target.clone()
                }
            );
            Answer::LimitRemoved(target, r)
        }
        Lb::Load { module_type } => Answer::Load(rpc!(
            conn,
            get_load_distribution,
            pb::GetLoadDistributionRequest {
                module_type: request::type_filter(module_type),
            }
        )),
        Lb::Rebalance {
            module_type,
            dry_run,
        } => Answer::Rebalanced(rpc!(
            conn,
            rebalance_load,
            pb::RebalanceLoadRequest {
                module_type: request::type_filter(module_type),
                dry_run,
            }
        )),
        Lb::Scale(a) => scale(conn, a).await?,
        Lb::Status => Answer::Status(rpc!(conn, get_nlb_status, pb::GetNlbStatusRequest {})),
        Lb::Health { deep } => {
            Answer::Health(rpc!(conn, check_health, pb::CheckHealthRequest { deep }))
        }
        Lb::Config { set, .. } if set.is_empty() => Answer::Config(
            rpc!(conn, get_nlb_config, pb::GetNlbConfigRequest {}),
            false,
        ),
        Lb::Config { set, validate_only } => Answer::Config(
            rpc!(
                conn,
                update_nlb_config,
                request::config_update(&set, validate_only)
            ),
            validate_only,
        ),
        Lb::Metrics { .. } => {
            Answer::Metrics(rpc!(conn, get_nlb_metrics, pb::GetNlbMetricsRequest {}))
        }
    })
}

async fn route(conn: &Connection, cmd: RouteCmd) -> Result<Answer, String> {
    Ok(match cmd {
        RouteCmd::Add {
            route,
            validate_only,
            expect_revision,
        } => Answer::RoutingUpdated(rpc!(
            conn,
            update_routing,
            request::add_route(&route, validate_only, expect_revision)
        )),
        RouteCmd::Delete {
            ids,
            expect_revision,
        } => Answer::RoutingUpdated(rpc!(
            conn,
            update_routing,
            request::delete_routes(&ids, expect_revision)
        )),
        RouteCmd::Replace {
            file,
            validate_only,
            expect_revision,
        } => {
            let text = if file.as_os_str() == "-" {
                std::io::read_to_string(std::io::stdin())
            } else {
                std::fs::read_to_string(&file)
            }
            .map_err(|e| format!("{}: {e}", file.display()))?;
            let routes =
                request::routes_from_json(&text).map_err(|e| format!("{}: {e}", file.display()))?;
            Answer::RoutingUpdated(rpc!(
                conn,
                update_routing,
                request::replace_routes(routes, validate_only, expect_revision)
            ))
        }
        RouteCmd::Test(a) => {
            let query = request::route_query(&a);
            // The node decides from its own view: UNAVAILABLE here is its answer (no instance
            // can take the flow, with the reason), not a node that cannot serve, so it is
            // final rather than retried on the other endpoints.
            Answer::Decision(
                ask(conn, true, |mut c| {
                    let query = query.clone();
                    async move { c.route_request(query).await }
                })
                .await?,
            )
        }
        RouteCmd::Validate { route } => Answer::Validation(rpc!(
            conn,
            validate_route,
            pb::ValidateRouteRequest {
                route: Some(request::route(&route)),
            }
        )),
    })
}

async fn scale(conn: &Connection, a: ScaleArgs) -> Result<Answer, String> {
    let get = pb::GetScalingConfigRequest {
        module_type: request::module_type(a.module_type),
    };
    if let Some(trigger) = a.trigger.to_trigger() {
        let req = request::trigger_scaling(
            a.module_type,
            &trigger,
            a.reason.as_deref().unwrap_or_default(),
        );
        return Ok(Answer::ScalingDecision(rpc!(conn, trigger_scaling, req)));
    }
    let current = rpc!(conn, get_scaling_config, get);
    if !a.settings.set {
        return Ok(Answer::Scaling(current));
    }
    // Read, change, write: SetScalingConfig takes the whole config, and flags not given keep
    // their current values. (A concurrent change between the two calls is overwritten; the
    // scaling settings have no revision to guard with.)
    let config = pb::ScalingConfig {
        module_type: request::module_type(a.module_type),
        ..request::apply_scaling(current, &a.settings)
    };
    Ok(Answer::Scaling(rpc!(
        conn,
        set_scaling_config,
        pb::SetScalingConfigRequest {
            config: Some(config)
        }
    )))
}

/// `metrics --watch`: a line (a JSON document with --json) at every update until the stream
/// ends or the user interrupts.
async fn watch_metrics(conn: &Connection, interval_ms: u32) -> Result<i32, String> {
    let mut stream = ask(conn, false, |mut c| async move {
        c.stream_nlb_metrics(pb::StreamNlbMetricsRequest { interval_ms })
            .await
    })
    .await?;
    loop {
        tokio::select! {
            next = stream.next() => match next {
                Some(Ok(m)) => println!("{}", print::metrics_line(&m, conn.json)),
                Some(Err(s)) => return Err(status_message(&s)),
                None => return Ok(0),
            },
            _ = tokio::signal::ctrl_c() => return Ok(0),
        }
    }
}
