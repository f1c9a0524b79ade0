//! Who may control a module: its balancer only.
//!
//! A module makes a random secret at start ([`crate::secret::random_token`]) and gives it to the
//! balancer in its registration (`RegisterModuleRequest.control_token`); the balancer keeps it in
//! the module's replicated record, so whichever member calls the module (health checks and
//! CanHandle run on every member) sends it as `authorization: Bearer <token>`. The module's
//! Module service refuses every call without it with UNAUTHENTICATED, before any handler runs:
//! someone who merely reaches the control port cannot shut the module down, drain it or change
//! its settings.

use tonic::metadata::MetadataValue;
use tonic::{Request, Status};

/// Adds `token` to a call as its bearer (nothing when `token` is empty: an older module).
pub fn authorize<T>(req: &mut Request<T>, token: &str) {
    if token.is_empty() {
        return;
    }
    if let Ok(v) = MetadataValue::try_from(format!("Bearer {token}")) {
        req.metadata_mut().insert("authorization", v);
    }
}

/// The Module service's gate: lets through calls that carry the module's token.
#[derive(Clone)]
pub struct ControlAuth {
    token: std::sync::Arc<str>,
}

impl ControlAuth {
    /// A gate for `token`.
    pub fn new(token: &str) -> Self {
        Self {
            token: token.into(),
        }
    }
}

impl std::fmt::Debug for ControlAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ControlAuth(<redacted>)")
    }
}

impl tonic::service::Interceptor for ControlAuth {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        let given = req
            .metadata()
            .get("authorization")
            .map(|v| v.as_bytes())
            .and_then(|v| v.strip_prefix(b"Bearer "));
        match given {
            Some(t) if crate::secret::constant_time_eq(t, self.token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated(
                "this module takes control calls from its balancer only: the bearer token is not \
                 the one it registered with",
            )),
            None => Err(Status::unauthenticated(
                "this module takes control calls from its balancer only: \"authorization: Bearer \
                 <control token>\" is missing (the token is the one it registered with)",
            )),
        }
    }
}

/// A client-side interceptor adding a module's control token to every call
/// (`ModuleClient::with_interceptor(channel, Bearer::new(token))`).
#[derive(Clone)]
pub struct Bearer(std::sync::Arc<str>);

impl Bearer {
    /// Calls carrying `token`.
    pub fn new(token: &str) -> Self {
        Self(token.into())
    }
}

impl std::fmt::Debug for Bearer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Bearer(<redacted>)")
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut req: Request<()>) -> Result<Request<()>, Status> {
        authorize(&mut req, &self.0);
        Ok(req)
    }
}
