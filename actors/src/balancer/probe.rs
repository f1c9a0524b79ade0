//! How the balancer asks module instances things: the node implements [`ModuleProbe`] with gRPC
//! calls to an instance's Module service (and TCP connects for TCP health checks); tests script it.

use std::future::Future;
use std::pin::Pin;
use std::time::Duration;

use super::model::CheckKind;
use super::route::Route;

/// A boxed future of the object-safe [`ModuleProbe`]; errors are a reason for people.
pub type ProbeFuture<T> = Pin<Box<dyn Future<Output = Result<T, String>> + Send>>;

/// An instance's answer to CanHandle.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CanHandle {
    pub can_handle: bool,
    pub priority: i32,
    pub reason: String,
}

/// Where an instance is reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    pub instance_id: String,
    /// Its Module service.
    pub control: String,
    /// Where it takes connections.
    pub data: String,
    /// Sent as a bearer on every call to its Module service (empty: none).
    pub control_token: super::model::ControlToken,
}

/// Questions to module instances.
pub trait ModuleProbe: Send + Sync + 'static {
    /// Asks whether the instance takes `route`.
    fn can_handle(
        &self,
        target: &Target,
        route: &Route,
        timeout: Duration,
    ) -> ProbeFuture<CanHandle>;
    /// An active health check: Ok when healthy.
    fn health_check(
        &self,
        target: &Target,
        kind: CheckKind,
        deep: bool,
        timeout: Duration,
    ) -> ProbeFuture<()>;
    /// The instance's active connections, as it counts them (for drains).
    fn active_connections(&self, target: &Target, timeout: Duration) -> ProbeFuture<u64>;
    /// The instance is gone: whatever is kept for it (a connection) can go.
    fn forget(&self, _instance_id: &str) {}
}
