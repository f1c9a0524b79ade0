//! The module's link to the balancer: register, heartbeat with stats, follow the instructions in
//! the answers, and fail over between nodes. Also the calls the module forwards to the balancer.
//!
//! It runs on the registry client's loop ([`crate::reconnect`]), whose normal path is connect,
//! session, back off, next endpoint; the heartbeat interval is read from every
//! answer and used for the very next beat; status goes out on a `watch` channel and hooks run
//! with no lock held. Registrations are replicated across nodes, so after a failover the first
//! call on the new node is a heartbeat with the same id; a node that does not know the id says
//! `re_register_required` (or NOT_FOUND) and the module registers again.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use crate::client::Channel;
use slog::{info, warn};
use tokio::sync::watch;
use tonic::{Code, Status};

use super::state::{lock, Sampler, Shared, Snapshot};
use crate::outcome;
use crate::pb::balancer::balancer_client::BalancerClient;
use crate::pb::balancer::{
    HeartbeatRequest, HeartbeatResponse, RegisterModuleRequest, RegisterModuleResponse,
};
use crate::reconnect::{
    connect_bounded, connect_owned, member_failed, note_endpoint, Backoff, Beat, Conn, Failure,
    Reconnector, Session,
};
use crate::registry_client::{bounded, timed};

/// The heartbeat interval until a balancer grants one (and if it grants 0).
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(5);

/// Where the link stands; see [`super::ModuleHandle::link_status`].
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LinkStatus {
    /// The id the balancer registered (the one asked for, or one it picked); `None` before the
    /// first registration.
    pub instance_id: Option<String>,
    /// Registered right now: a registration or heartbeat succeeded since the last time a
    /// balancer said it does not know the instance.
    pub registered: bool,
    /// The last call to `endpoint` got an answer.
    pub connected: bool,
    /// The node the link talks to (or last tried).
    pub endpoint: Option<String>,
    /// The heartbeat interval granted last.
    pub interval: Duration,
    /// After how many missed heartbeats the balancer evicts the instance.
    pub max_missed_heartbeats: u32,
    /// Successful registrations (re-registrations included).
    pub registrations: u64,
    /// Successful heartbeats.
    pub heartbeats: u64,
    /// The instance count the balancer last asked for (`should_scale`); the deployment acts on
    /// it, not the module.
    pub desired_instances: Option<u32>,
    /// Reloads the balancer asked for (`should_reload`).
    pub reloads_requested: u64,
    /// Connections the balancer asked the module to shed, in total.
    pub shed_requested: u64,
    /// Instructions the module did not understand (logged and ignored).
    pub ignored_instructions: u64,
    /// The last failure (a registration refused, a node unreachable), for operators.
    pub last_error: Option<String>,
}

/// A heartbeat instruction, as the module understands it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Instruction {
    /// `shed-connections N`: close the N oldest connections.
    ShedConnections(u64),
    /// Anything else.
    Unknown(String),
}

impl Instruction {
    /// Parses one instruction string (words separated by white space).
    pub fn parse(s: &str) -> Self {
        let words: Vec<&str> = s.split_whitespace().collect();
        match words.as_slice() {
            ["shed-connections", n] => match n.parse() {
                Ok(n) => Instruction::ShedConnections(n),
                Err(_) => Instruction::Unknown(s.to_string()),
            },
            _ => Instruction::Unknown(s.to_string()),
        }
    }
}

/// The link's session (see [`crate::reconnect`], which connects, backs off and fails over); it
/// owns the working copy of the status and publishes it when it changes.
pub(crate) struct Worker {
    shared: Arc<Shared>,
    cur: LinkStatus,
    sampler: Sampler,
}

impl Worker {
    pub fn new(shared: Arc<Shared>) -> Self {
        let sampler = Sampler::new(Snapshot::take(&shared.tracker), Duration::ZERO);
        let cur = shared.link.borrow().clone();
        Worker {
            cur,
            shared,
            sampler,
        }
    }

    /// Registers, heartbeats and fails over until `stop` turns true or its sender is dropped.
    pub async fn run(mut self, stop: watch::Receiver<bool>) {
        let o = &self.shared.opts;
        let backoff = Backoff::new(o.backoff_initial, o.backoff_max);
        Reconnector::new(o.endpoints.clone(), backoff, stop)
            .run(&mut self)
            .await;
    }

    fn publish(&self) {
        self.shared.link.send_if_modified(|s| {
            if *s == self.cur {
                return false;
            }
            *s = self.cur.clone();
            true
        });
    }

    fn register_request(&self) -> RegisterModuleRequest {
        let o = &self.shared.opts;
        RegisterModuleRequest {
            instance_id: self
                .cur
                .instance_id
                .clone()
                .unwrap_or_else(|| o.instance_id.clone()),
            module_type: crate::balancer::convert::module_type_to_pb(o.module_type) as i32,
            version: o.version.clone(),
            control_address: o.control_address.clone(),
            data_address: o.data_address.clone(),
            protocols: o
                .protocols()
                .iter()
                .map(|p| crate::balancer::convert::protocol_to_pb(*p) as i32)
                .collect(),
            max_connections: self.shared.tracker.max_connections(),
            metadata: o.metadata.clone(),
            health_check: o.health_check,
            control_token: self.shared.control_token.clone(),
        }
    }

    /// Follows the instructions of a heartbeat answer. Hooks run on their own task, so a slow
    /// reload never delays a heartbeat.
    fn follow(&mut self, r: &HeartbeatResponse) {
        let log = &self.shared.log;
        if r.should_reload {
            self.cur.reloads_requested += 1;
            info!(log, "the balancer asks for a reload");
            match self.shared.hooks.reload.clone() {
                Some(hook) => {
                    let log = log.clone();
                    tokio::spawn(async move {
                        match hook().await {
                            Ok(m) => info!(log, "reloaded"; "result" => m),
                            Err(e) => warn!(log, "reload failed"; "error" => e),
                        }
                    });
                }
                None => warn!(log, "no reload hook; nothing to reload"),
            }
        }
        if r.should_scale {
            self.cur.desired_instances = Some(r.desired_instances);
            info!(log, "the balancer wants a different number of instances";
                  "module_type" => self.shared.opts.module_type.as_str(),
                  "desired_instances" => r.desired_instances);
        }
        for s in &r.instructions {
            match Instruction::parse(s) {
                Instruction::ShedConnections(n) => {
                    let asked = self.shared.tracker.shed_oldest(n);
                    self.cur.shed_requested += n;
                    info!(log, "shedding connections"; "asked" => n, "closing" => asked);
                }
                Instruction::Unknown(s) => {
                    self.cur.ignored_instructions += 1;
                    warn!(log, "ignoring an instruction this module does not know";
                          "instruction" => s);
                }
            }
        }
    }
}

/// Registers when the link is not registered or the module asks for it (its registration's
/// fields changed); a node that does not know the id says `re_register_required` (or NOT_FOUND).
impl Session for Worker {
    type Conn = Channel;
    type Registered = Result<RegisterModuleResponse, Status>;
    type Beaten = Result<HeartbeatResponse, Status>;

    fn connect(
        &self,
        endpoint: &str,
    ) -> impl Future<Output = Result<Channel, String>> + Send + 'static {
        connect_owned(
            endpoint,
            &self.shared.opts.tls,
            self.shared.opts.call_timeout,
        )
    }

    fn on_endpoint(&mut self, endpoint: &str) {
        if note_endpoint(&mut self.cur.endpoint, endpoint) {
            self.publish();
        }
    }

    fn on_connected(&mut self, idx: usize, channel: &Channel) {
        Conn::store(&self.shared.conn, idx, channel);
    }

    fn needs_register(&mut self) -> bool {
        // The flag is taken whether or not a registration is due anyway: one registration
        // answers it.
        let asked = self.shared.reregister.swap(false, Ordering::SeqCst);
        !self.cur.registered || asked
    }

    fn register(
        &mut self,
        channel: &Channel,
    ) -> impl Future<Output = Self::Registered> + Send + 'static {
        // The drain unregisters; registering again would undo it, so wait for the stop instead.
        let draining = self.shared.is_draining();
        if draining {
            self.cur.registered = false;
            self.publish();
        }
        let req = self.register_request();
        let t = self.shared.opts.call_timeout;
        let mut g = BalancerClient::new(channel.clone());
        async move {
            if draining {
                std::future::pending::<()>().await;
            }
            bounded(t, g.register_module(timed(req, t))).await
        }
    }

    fn registered(&mut self, answer: Self::Registered) -> Result<(), Failure> {
        let r = match answer {
            Ok(r) => r,
            Err(s) => {
                let why = format!("RegisterModule: {:?}: {}", s.code(), s.message());
                self.cur.last_error = Some(why.clone());
                // A refusal from a node that answered is no reason to leave it: back off and
                // try again (it may be transient, e.g. no quorum yet).
                return Err(Failure {
                    switch: member_failed(&s),
                    why,
                });
            }
        };
        let id = if r.instance_id.is_empty() {
            self.register_request().instance_id
        } else {
            r.instance_id
        };
        info!(self.shared.log, "registered with the balancer";
              "instance" => &id, "replaced" => r.replaced,
              "interval_ms" => r.heartbeat_interval_ms,
              "endpoint" => self.cur.endpoint.clone().unwrap_or_default());
        self.cur.instance_id = Some(id);
        self.cur.registered = true;
        self.cur.connected = true;
        self.cur.registrations += 1;
        self.cur.max_missed_heartbeats = r.max_missed_heartbeats;
        self.cur.interval = granted(r.heartbeat_interval_ms, self.cur.interval);
        self.cur.last_error = None;
        self.publish();
        // The first beat reports the interval since registering.
        self.sampler = Sampler::new(Snapshot::take(&self.shared.tracker), Duration::ZERO);
        Ok(())
    }

    fn beat(&mut self, channel: &Channel) -> impl Future<Output = Self::Beaten> + Send + 'static {
        let req = HeartbeatRequest {
            instance_id: self.cur.instance_id.clone().unwrap_or_default(),
            stats: Some(self.shared.stats(&mut self.sampler)),
            health: self.shared.health().0 as i32,
        };
        let t = self.shared.opts.call_timeout;
        let mut g = BalancerClient::new(channel.clone());
        async move { bounded(t, g.heartbeat(timed(req, t))).await }
    }

    fn beaten(&mut self, answer: Self::Beaten) -> Beat {
        match answer {
            Ok(r) => {
                // Any answer may change the interval, and the next beat uses it.
                self.cur.interval = granted(r.heartbeat_interval_ms, self.cur.interval);
                self.cur.connected = true;
                if r.re_register_required {
                    info!(self.shared.log, "the balancer asks to register again");
                    self.cur.registered = false;
                    self.publish();
                    return Beat::Register;
                }
                self.cur.registered = true;
                self.cur.heartbeats += 1;
                self.cur.last_error = None;
                self.follow(&r);
                self.publish();
                Beat::Ok
            }
            Err(s) if s.code() == Code::NotFound => {
                self.cur.registered = false;
                self.publish();
                Beat::Register
            }
            Err(s) if member_failed(&s) => {
                let why = format!("Heartbeat: {:?}: {}", s.code(), s.message());
                self.cur.last_error = Some(why.clone());
                Beat::Fail(Failure { switch: true, why })
            }
            // The node is up but refused this beat: a missed beat, not a reason to leave.
            Err(s) => {
                warn!(self.shared.log, "heartbeat refused";
                      "code" => format!("{:?}", s.code()), "message" => s.message());
                self.cur.last_error = Some(format!("Heartbeat: {:?}: {}", s.code(), s.message()));
                self.publish();
                Beat::Missed
            }
        }
    }

    fn interval(&self) -> Duration {
        self.cur.interval
    }

    fn on_failure(&mut self, why: String) {
        warn!(self.shared.log, "balancer link: {why}";
              "endpoint" => self.cur.endpoint.clone().unwrap_or_default());
        self.cur.connected = false;
        self.cur.last_error = Some(why);
        self.publish();
    }
}

/// The interval an answer grants (`ms`), or `cur` when it grants none.
fn granted(ms: u32, cur: Duration) -> Duration {
    if ms > 0 {
        Duration::from_millis(ms.into())
    } else if cur.is_zero() {
        DEFAULT_HEARTBEAT_INTERVAL
    } else {
        cur
    }
}

/// Whether a failed call may be tried on another node: the node could not be reached, or it
/// answered UNAVAILABLE and the call certainly did nothing (see [`outcome::outcome_unknown`]).
fn try_elsewhere(s: &Status) -> bool {
    s.code() == Code::Unavailable && !outcome::outcome_unknown(s)
}

/// Calls the balancer on behalf of the module: on the link's node first, then on the other
/// endpoints in order while they are unreachable. `t` bounds each attempt. Any other failure
/// is the balancer's answer and is returned as it is.
pub(crate) async fn call_balancer<T, F, Fut>(
    shared: &Shared,
    t: Duration,
    f: F,
) -> Result<T, Status>
where
    F: Fn(BalancerClient<Channel>) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, Status>>,
{
    let eps = &shared.opts.endpoints;
    if eps.is_empty() {
        return Err(Status::failed_precondition(
            "this module has no balancer endpoint to forward the call to",
        ));
    }
    let current = lock(&shared.conn).clone();
    let mut last = Status::unavailable("no balancer endpoint answered");
    let (start, others) = match current {
        Some(c) => {
            match bounded(t, f(BalancerClient::new(c.channel))).await {
                Err(s) if try_elsewhere(&s) => last = s,
                r => return r,
            }
            (c.idx + 1, eps.len() - 1)
        }
        None => (0, eps.len()),
    };
    for i in 0..others {
        let ep = &eps[(start + i) % eps.len()];
        let ch = match connect_bounded(ep, &shared.opts.tls, t).await {
            Ok(ch) => ch,
            Err(e) => {
                last = Status::unavailable(e);
                continue;
            }
        };
        match bounded(t, f(BalancerClient::new(ch))).await {
            Err(s) if try_elsewhere(&s) => last = s,
            r => return r,
        }
    }
    Err(last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instructions_parse() {
        assert_eq!(
            Instruction::parse("shed-connections 12"),
            Instruction::ShedConnections(12)
        );
        assert_eq!(
            Instruction::parse("  shed-connections\t3 "),
            Instruction::ShedConnections(3)
        );
        for s in [
            "shed-connections",
            "shed-connections -1",
            "shed-connections 1 2",
            "drain",
            "",
        ] {
            assert_eq!(Instruction::parse(s), Instruction::Unknown(s.to_string()));
        }
    }

    #[test]
    fn the_interval_is_the_granted_one() {
        let five = Duration::from_millis(5);
        assert_eq!(granted(250, five), Duration::from_millis(250));
        assert_eq!(granted(0, five), five);
        assert_eq!(granted(0, Duration::ZERO), DEFAULT_HEARTBEAT_INTERVAL);
    }
}
