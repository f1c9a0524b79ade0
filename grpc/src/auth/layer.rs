//! The authentication layer: one tower layer in front of every service of a port. For each call
//! it finds the method's row in [`super::roles::TABLE`], identifies the caller (a bearer JWT, or
//! a client certificate; another member on the peer port), refuses what the row does not allow,
//! and hands the [`Caller`] to the handler in the request's extensions. Mutating calls are
//! written to the audit log with their outcome.

use crate::watched_body::{Watch, Watched};
use std::sync::Arc;
use std::task::{Context, Poll};

use http_body::{Body, Frame};
use tonic::Status;

use super::audit::{Audit, AuditRecord, Pending};
use super::caller::{Caller, Via};
use super::certs::CertificateRoles;
use super::jwt::Authenticator;
use super::roles::{rule_of, Access, Rule};

/// A port's side of the cluster: whose calls it takes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Port {
    /// Clients: tokens and client certificates.
    Client,
    /// Other members: every caller the peer port admitted (`crate::peer::PeerLayer`) is one.
    Peer,
}

/// What the layer checks calls with.
pub struct Gatekeeper {
    /// Bearer tokens (and whether auth is on at all).
    pub tokens: Authenticator,
    /// Client certificates' roles.
    pub certificates: CertificateRoles,
    /// Where mutating calls are recorded, if anywhere.
    pub audit: Audit,
    /// Refusals by reason (`lodge_auth_rejections_total{reason}`).
    pub rejections: lodge_actors::registry::RegistryMetrics,
}

impl Gatekeeper {
    /// The caller of a request on a client port.
    fn identify<B>(&self, req: &http::Request<B>) -> Result<Caller, Status> {
        if !self.tokens.enabled() {
            return Ok(Caller::open());
        }
        if let Some(header) = req.headers().get(http::header::AUTHORIZATION) {
            return self.tokens.authenticate_header(header);
        }
        if let Some(der) = client_certificate(req.extensions()) {
            return self.certificates.caller(&der);
        }
        Err(Status::unauthenticated(
            "no credentials: send \"authorization: Bearer <JWT>\" (lodge: --token-file FILE or LODGE_TOKEN) or connect with a client certificate",
        ))
    }
}

/// The certificate the client presented over TLS (verified against the client CA), if any.
fn client_certificate(ext: &http::Extensions) -> Option<Vec<u8>> {
    let certs = crate::listener::ConnInfo::peer_certs_of(ext)?;
    certs.first().map(|c| c.as_ref().to_vec())
}

/// Whether `caller` may make a call under `rule`; the refusal names what is missing.
fn allowed(rule: &Rule, caller: &Caller) -> Result<(), Status> {
    let method = rule.method.trim_start_matches('/');
    match rule.access {
        Access::Public => Ok(()),
        Access::Members if matches!(caller.via, Via::Peer | Via::Node | Via::Open) => Ok(()),
        Access::Members => Err(Status::permission_denied(format!(
            "{method} is for the cluster's members only, on their peer port"
        ))),
        Access::AnyOf(roles) if roles.iter().any(|r| caller.has(*r)) => Ok(()),
        Access::AnyOf(roles) => {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            Err(Status::permission_denied(format!(
                "{method} needs the {} role; {} has {}",
                names.join(" or "),
                caller.subject,
                caller.described_roles()
            )))
        }
    }
}

/// Tower layer applying a [`Gatekeeper`] to every call.
#[derive(Clone)]
pub struct AuthLayer {
    gate: Arc<Gatekeeper>,
    port: Port,
}

impl AuthLayer {
    /// The layer for a port of `port`'s kind.
    pub fn new(gate: Arc<Gatekeeper>, port: Port) -> Self {
        Self { gate, port }
    }
}

impl<S> tower::Layer<S> for AuthLayer {
    type Service = AuthService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        AuthService {
            inner,
            gate: self.gate.clone(),
            port: self.port,
        }
    }
}

/// See [`AuthLayer`].
#[derive(Clone)]
pub struct AuthService<S> {
    inner: S,
    gate: Arc<Gatekeeper>,
    port: Port,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for AuthService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Default + Unpin,
{
    type Response = http::Response<AuditedBody<ResBody>>;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let rule = rule_of(req.uri().path());
        if rule.is_some_and(|r| r.access == Access::Public) {
            let fut = self.inner.call(req);
            return Box::pin(async move {
                Ok(fut.await?.map(|b| Watched::new(b, AuditOutcome::default())))
            });
        }
        let identified = match self.port {
            Port::Peer => Ok(Caller::peer(
                req.extensions()
                    .get::<crate::peer::FromPeer>()
                    .and_then(|p| p.member),
            )),
            Port::Client => self.gate.identify(&req),
        };
        let audited = rule.filter(|r| r.mutates).and_then(|r| {
            let peer =
                crate::listener::ConnInfo::of(req.extensions()).and_then(|c| c.tcp.remote_addr());
            let pending = self.gate.audit.begin(r.method, peer)?;
            Some(match &identified {
                Ok(caller) => pending.with_caller(caller),
                Err(_) => pending,
            })
        });
        // Not a method of ours: an identified caller is told UNIMPLEMENTED by the routes.
        let checked = identified.and_then(|caller| match rule {
            Some(rule) => allowed(rule, &caller).map(|()| caller),
            None => Ok(caller),
        });
        let caller = match checked {
            Ok(caller) => caller,
            Err(status) => {
                self.gate.rejections.rejected(match status.code() {
                    tonic::Code::Unauthenticated => "unauthenticated",
                    _ => "permission_denied",
                });
                if let Some(pending) = audited {
                    pending.finish(AuditRecord::refused(&status));
                }
                return Box::pin(async move {
                    Ok(status
                        .into_http::<ResBody>()
                        .map(|b| Watched::new(b, AuditOutcome::default())))
                });
            }
        };
        if let Some(p) = &audited {
            req.extensions_mut().insert(p.target_slot());
        }
        req.extensions_mut().insert(caller);
        let fut = self.inner.call(req);
        Box::pin(async move {
            let resp = fut.await?;
            let early = tonic::Status::from_header_map(resp.headers());
            let outcome = AuditOutcome {
                pending: audited,
                early: early.map(|s| s.code()),
            };
            Ok(resp.map(|inner| Watched::new(inner, outcome)))
        })
    }
}

/// A response body that records its call's outcome in the audit log when the call ends.
pub type AuditedBody<B> = Watched<B, AuditOutcome>;

/// Writes the call's audit record with the status its trailers carry, or when dropped first.
#[derive(Default)]
pub struct AuditOutcome {
    pending: Option<Pending>,
    /// The status of a trailers-only answer (an error), already in the headers.
    early: Option<tonic::Code>,
}

impl Watch for AuditOutcome {
    fn frame<D>(&mut self, frame: &mut Frame<D>) {
        if let Some(trailers) = frame.trailers_ref() {
            let code = tonic::Status::from_header_map(trailers).map(|s| s.code());
            if let Some(p) = self.pending.take() {
                p.finish(AuditRecord::ended(code.unwrap_or(tonic::Code::Ok)));
            }
        }
    }
}

impl Drop for AuditOutcome {
    fn drop(&mut self) {
        if let Some(p) = self.pending.take() {
            // No trailers came: a trailers-only answer, or the client left first.
            p.finish(AuditRecord::ended(
                self.early.unwrap_or(tonic::Code::Cancelled),
            ));
        }
    }
}
