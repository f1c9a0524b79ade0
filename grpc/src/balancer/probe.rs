//! The node's [`ModuleProbe`]: a module instance's Module service over gRPC, and TCP connects to
//! its data address.
//!
//! Control channels are plain gRPC (modules run next to the nodes, on the private network the
//! data plane forwards over); every call carries the module's control secret (see
//! [`crate::module::control`]). They are opened lazily and kept per address: a probe never waits for a
//! connection that an earlier call already made.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_actors::balancer::model::CheckKind;
use lodge_actors::balancer::probe::{CanHandle, ModuleProbe, ProbeFuture, Target};
use lodge_actors::balancer::Route;
use tonic::transport::{Channel, Endpoint};
use tonic::Request;

use super::convert::route_to_pb;
use crate::pb::balancer as pb;
use crate::pb::balancer::module_client::ModuleClient;

/// Asks module instances over gRPC.
#[derive(Clone, Default)]
pub struct GrpcModuleProbe {
    /// By instance id: its control address and the channel to it (dropped when it goes).
    channels: Arc<Mutex<HashMap<String, (String, Channel)>>>,
}

impl GrpcModuleProbe {
    /// A probe with no connections yet.
    pub fn new() -> Self {
        Self::default()
    }

    fn client(&self, t: &Target) -> Result<ModuleClient<Channel>, String> {
        let addr = &t.control;
        let mut channels = self.channels.lock().expect("channels");
        if let Some((a, c)) = channels.get(&t.instance_id) {
            if a == addr {
                return Ok(ModuleClient::new(c.clone()));
            }
        }
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .map_err(|e| format!("control_address {addr}: {e}"))?
            .connect_timeout(Duration::from_secs(2))
            .tcp_nodelay(true)
            .connect_lazy();
        channels.insert(t.instance_id.clone(), (addr.clone(), channel.clone()));
        Ok(ModuleClient::new(channel))
    }
}

/// A call to `t`'s Module service: bounded by `timeout`, and carrying the module's control
/// secret, without which the module refuses it.
fn timed<T>(t: &Target, msg: T, timeout: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.set_timeout(timeout);
    crate::module::control::authorize(&mut r, &t.control_token.0);
    r
}

async fn bounded<T>(
    timeout: Duration,
    f: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, String> {
    match tokio::time::timeout(timeout, f).await {
        Ok(Ok(r)) => Ok(r.into_inner()),
        Ok(Err(s)) => Err(format!("{:?}: {}", s.code(), s.message())),
        Err(_) => Err(format!("no answer within {} ms", timeout.as_millis())),
    }
}

impl ModuleProbe for GrpcModuleProbe {
    fn can_handle(&self, t: &Target, route: &Route, timeout: Duration) -> ProbeFuture<CanHandle> {
        let client = self.client(t);
        let req = timed(
            t,
            pb::CanHandleRequest {
                route: Some(route_to_pb(route)),
            },
            timeout,
        );
        Box::pin(async move {
            let mut client = client?;
            let a = bounded(timeout, client.can_handle(req)).await?;
            Ok(CanHandle {
                can_handle: a.can_handle,
                priority: a.priority,
                reason: a.reason,
            })
        })
    }

    fn health_check(
        &self,
        t: &Target,
        kind: CheckKind,
        deep: bool,
        timeout: Duration,
    ) -> ProbeFuture<()> {
        match kind {
            CheckKind::Tcp => {
                let data = t.data.clone();
                Box::pin(async move {
                    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(&data)).await
                    {
                        Ok(Ok(_)) => Ok(()),
                        Ok(Err(e)) => Err(format!("connecting to {data}: {e}")),
                        Err(_) => Err(format!(
                            "connecting to {data}: no answer within {} ms",
                            timeout.as_millis()
                        )),
                    }
                })
            }
            CheckKind::Grpc => {
                let client = self.client(t);
                let req = timed(t, pb::HealthCheckRequest { deep }, timeout);
                Box::pin(async move {
                    let mut client = client?;
                    let a = bounded(timeout, client.health_check(req)).await?;
                    match pb::HealthStatus::try_from(a.health) {
                        Ok(pb::HealthStatus::Healthy | pb::HealthStatus::Degraded) => Ok(()),
                        _ => Err(if a.message.is_empty() {
                            "the module reports itself unhealthy".into()
                        } else {
                            a.message
                        }),
                    }
                })
            }
        }
    }

    fn forget(&self, instance_id: &str) {
        self.channels.lock().expect("channels").remove(instance_id);
    }

    fn active_connections(&self, t: &Target, timeout: Duration) -> ProbeFuture<u64> {
        let client = self.client(t);
        let req = timed(t, pb::GetStatsRequest {}, timeout);
        Box::pin(async move {
            let mut client = client?;
            Ok(bounded(timeout, client.get_stats(req))
                .await?
                .active_connections)
        })
    }
}
