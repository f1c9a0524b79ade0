//! `/node/balancer/scaler`: the autoscaler. Every `autoscale_interval_ms` the raft leader (one
//! node decides, and what it decided is in the store, so a new leader keeps the cooldowns) turns
//! each enabled type's pressure into a desired instance count and delivers what changes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::{Actor, ActorFutureExt, AsyncContext, Context, WrapFuture};
use serde::Serialize;
use slog::{info, warn, Logger};

use super::handle::BalancerHandle;
use crate::supervision::Managed;

/// Whether this node leads the cluster now.
pub type Leads = Arc<dyn Fn() -> bool + Send + Sync>;

/// The autoscaler actor.
pub struct Autoscaler {
    handle: BalancerHandle,
    leads: Leads,
    log: Logger,
    rounds: u64,
    delivered: u64,
    last_error: Option<String>,
    /// When the last round ran.
    last: Instant,
}

/// How often the autoscaler looks at its period and at whether this node leads.
const RECHECK: Duration = Duration::from_secs(1);

impl Autoscaler {
    /// The autoscaler of a node.
    pub fn new(handle: BalancerHandle, leads: Leads, log: &Logger) -> Self {
        Self {
            handle,
            leads,
            log: log.new(slog::o!("actor" => "autoscaler")),
            rounds: 0,
            delivered: 0,
            last_error: None,
            last: Instant::now(),
        }
    }

    /// The period is re-read at least every second, so a changed `autoscale_interval_ms`
    /// applies without waiting out the old one.
    fn schedule(&mut self, ctx: &mut Context<Self>) {
        let every = Duration::from_millis(self.every().into());
        ctx.run_later(every.min(RECHECK), |act, ctx| act.round(ctx));
    }

    fn every(&self) -> u32 {
        self.handle.view().settings.value.autoscale_interval_ms
    }

    fn round(&mut self, ctx: &mut Context<Self>) {
        let due = self.last.elapsed() >= Duration::from_millis(self.every().into());
        if !due || !(self.leads)() {
            self.schedule(ctx);
            return;
        }
        self.last = Instant::now();
        self.rounds += 1;
        let handle = self.handle.clone();
        ctx.spawn(
            async move { handle.autoscale().await }
                .into_actor(self)
                .map(|results, act, ctx| {
                    for (t, r) in results {
                        match r {
                            Ok((d, true)) => {
                                act.delivered += 1;
                                info!(act.log, "scaling decision"; "module_type" => %t,
                                    "direction" => &d.direction, "current" => d.current,
                                    "desired" => d.desired, "reason" => &d.reason);
                            }
                            Ok(_) => {}
                            Err(e) => {
                                warn!(act.log, "scaling decision not delivered"; "module_type" => %t, "error" => %e);
                                act.last_error = Some(e.to_string());
                            }
                        }
                    }
                    act.schedule(ctx);
                }),
        );
    }
}

impl Actor for Autoscaler {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        self.schedule(ctx);
    }
}

#[derive(Serialize)]
struct Dump {
    leads: bool,
    rounds: u64,
    delivered: u64,
    last_error: Option<String>,
}

impl Managed for Autoscaler {
    const KIND: &'static str = "balancer-autoscaler";

    fn dump_state(&self) -> serde_json::Value {
        serde_json::to_value(Dump {
            leads: (self.leads)(),
            rounds: self.rounds,
            delivered: self.delivered,
            last_error: self.last_error.clone(),
        })
        .unwrap_or_default()
    }
}
