//! The peer port: what tells node-to-node calls apart from clients' calls.
//!
//! Members reach each other on their peer address (`peer.listen`/`peer.advertise`), never on the
//! client port: the raft transport, snapshot streams, forwarding to the leader, heartbeats and
//! the router's relays. On that port, with peer TLS on, every connection carries a certificate
//! from the peer CA naming the member it is (`member-<ID>` as a DNS SAN, or as the subject CN);
//! [`PeerLayer`] refuses a connection whose certificate names none, and puts [`FromPeer`] in
//! every request's extensions. Every peer call carries this cluster's id
//! ([`CLUSTER_ID`] metadata, stamped by [`PeerChannel`]); a call from another cluster is refused
//! with FAILED_PRECONDITION naming both ids.

use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};

use crate::client::Channel;
use http_body::Body;

use crate::client::{self, ClientTls};

/// Metadata key carrying the caller's cluster id (16 hex digits) on every peer call, and the
/// answering node's on every peer answer.
pub const CLUSTER_ID: &str = "lodge-cluster-id";

/// The calls a peer may make before it knows the cluster's id (a joining node asking who is
/// there and which cluster it is): read-only.
const WITHOUT_ID: &[&str] = &[
    "/lodge.cluster.v1.Cluster/Status",
    "/lodge.cluster.v1.Cluster/GetTopology",
];

/// Request extension: the call arrived on the peer port. `member` is the member its TLS
/// certificate names; `None` when peer TLS is off (the caller is not authenticated).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FromPeer {
    pub member: Option<u64>,
}

/// This node's cluster id, once known (a joining node learns it from the member it joins
/// through). Shared by everything that makes or takes peer calls.
#[derive(Clone, Default, Debug)]
pub struct ClusterId(Arc<OnceLock<u64>>);

impl ClusterId {
    /// A known id.
    pub fn known(id: u64) -> Self {
        let c = Self::default();
        let _ = c.0.set(id);
        c
    }

    /// The id, if known.
    pub fn get(&self) -> Option<u64> {
        self.0.get().copied()
    }

    /// Learns the id; an id known already stays (and is returned as the error when it differs).
    pub fn set(&self, id: u64) -> Result<(), u64> {
        match self.0.set(id) {
            Ok(()) => Ok(()),
            Err(_) if self.get() == Some(id) => Ok(()),
            Err(_) => Err(self.get().expect("set")),
        }
    }
}

/// How a cluster id is written: 16 lower-case hex digits.
pub fn format_id(id: u64) -> String {
    format!("{id:016x}")
}

/// Reads [`format_id`]'s form (any case, 1 to 16 digits); 0 is no id.
pub fn parse_id(text: &str) -> Option<u64> {
    let t = text.trim();
    if t.is_empty() || t.len() > 16 {
        return None;
    }
    u64::from_str_radix(t, 16).ok().filter(|id| *id != 0)
}

/// The cluster id an answer's metadata names, if any.
pub fn id_in(meta: &tonic::metadata::MetadataMap) -> Option<u64> {
    meta.get(CLUSTER_ID)
        .and_then(|v| v.to_str().ok())
        .and_then(parse_id)
}

/// How this node reaches other members: peer TLS and this cluster's id.
#[derive(Clone, Default, Debug)]
pub struct PeerLink {
    pub tls: ClientTls,
    pub cluster: ClusterId,
}

impl PeerLink {
    /// The same link without the cluster id: for the read-only questions a node asks before it
    /// may trust its id (who runs as a member, anywhere), which members of any cluster answer.
    pub fn anonymous(&self) -> Self {
        Self {
            tls: self.tls.clone(),
            cluster: ClusterId::default(),
        }
    }

    /// A channel to the peer address `addr`; its calls carry this cluster's id.
    pub async fn connect(&self, addr: &str) -> Result<PeerChannel, String> {
        let cluster = self.cluster.clone();
        Ok(client::connect(addr, &self.tls)
            .await?
            .stamped(move |headers| {
                if let Some(id) = cluster.get() {
                    headers.insert(
                        CLUSTER_ID,
                        http::HeaderValue::from_str(&format_id(id)).expect("hex digits"),
                    );
                }
            }))
    }
}

/// A channel to a member's peer port: every call is stamped with this cluster's id.
pub type PeerChannel = Channel;

/// The member a certificate's names claim: a DNS name (SAN) or common name `member-<ID>`.
pub fn member_in_names<'a>(names: impl IntoIterator<Item = &'a str>) -> Option<u64> {
    names.into_iter().find_map(|n| {
        n.strip_prefix("member-")
            .and_then(|id| id.parse::<u64>().ok())
            .filter(|id| *id > 0)
    })
}

/// The member a DER certificate names (see [`member_in_names`]): SANs first, then the CN.
pub fn member_of_cert(der: &[u8]) -> Result<Option<u64>, String> {
    use x509_parser::prelude::*;
    let (_, cert) = X509Certificate::from_der(der).map_err(|e| format!("certificate: {e}"))?;
    let mut names: Vec<String> = Vec::new();
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            if let GeneralName::DNSName(d) = n {
                names.push(d.to_string());
            }
        }
    }
    for cn in cert.subject().iter_common_name() {
        if let Ok(s) = cn.as_str() {
            names.push(s.to_string());
        }
    }
    Ok(member_in_names(names.iter().map(String::as_str)))
}

/// What the peer server checks on every call.
pub struct PeerGate {
    /// This node's cluster id.
    pub cluster: ClusterId,
    /// Peer TLS is on: every connection has a certificate the peer CA signed.
    pub tls: bool,
    /// Refusals are counted here (`lodge_limit_rejections_total{limit="peer_identity"|
    /// "peer_cluster_id"}`).
    pub rejections: lodge_actors::registry::RegistryMetrics,
}

impl PeerGate {
    /// The [`FromPeer`] of a call, or why it is refused.
    fn admit(
        &self,
        path: &str,
        headers: &http::HeaderMap,
        ext: &http::Extensions,
    ) -> Result<FromPeer, tonic::Status> {
        let member = if self.tls {
            let leaf = crate::listener::ConnInfo::peer_certs_of(ext)
                .and_then(|c| c.first().map(|d| d.as_ref().to_vec()));
            let named = leaf.as_deref().map(member_of_cert).transpose();
            match named {
                Ok(Some(Some(id))) => Some(id),
                _ => {
                    self.rejections.rejected("peer_identity");
                    return Err(tonic::Status::unauthenticated(
                        "peer certificate names no member: the peer port takes certificates from the peer CA (peer.tls.ca_file) naming member-<ID> as a DNS SAN or common name",
                    ));
                }
            }
        } else {
            None
        };
        let theirs = headers
            .get(CLUSTER_ID)
            .and_then(|v| v.to_str().ok())
            .map(|v| parse_id(v).ok_or(v.to_string()));
        match (self.cluster.get(), theirs) {
            (_, Some(Err(bad))) => {
                self.rejections.rejected("peer_cluster_id");
                return Err(tonic::Status::invalid_argument(format!(
                    "{CLUSTER_ID}: {} is not a cluster id (16 hex digits)",
                    lodge_actors::quote::echo(&bad)
                )));
            }
            (Some(ours), Some(Ok(theirs))) if ours != theirs => {
                self.rejections.rejected("peer_cluster_id");
                return Err(tonic::Status::failed_precondition(format!(
                    "cluster id mismatch: this node belongs to cluster {}, the caller to cluster {}; a node of another cluster (or with a stale data directory) is refused",
                    format_id(ours),
                    format_id(theirs)
                )));
            }
            (Some(ours), None) if !WITHOUT_ID.contains(&path) => {
                self.rejections.rejected("peer_cluster_id");
                return Err(tonic::Status::failed_precondition(format!(
                    "peer calls must carry the caller's cluster id ({CLUSTER_ID}); this node belongs to cluster {}",
                    format_id(ours)
                )));
            }
            _ => {}
        }
        Ok(FromPeer { member })
    }
}

/// Tower layer of the peer server: applies [`PeerGate`] to every call, and names this node's
/// cluster in every answer's headers. `None` (the client port) lets every call through as is.
#[derive(Clone)]
pub struct PeerLayer(pub Option<Arc<PeerGate>>);

impl<S> tower::Layer<S> for PeerLayer {
    type Service = PeerService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        PeerService {
            inner,
            gate: self.0.clone(),
        }
    }
}

/// See [`PeerLayer`].
#[derive(Clone)]
pub struct PeerService<S> {
    inner: S,
    gate: Option<Arc<PeerGate>>,
}

impl<S, ReqBody, ResBody> tower::Service<http::Request<ReqBody>> for PeerService<S>
where
    S: tower::Service<http::Request<ReqBody>, Response = http::Response<ResBody>>,
    S::Future: Send + 'static,
    ResBody: Body + Default,
{
    type Response = http::Response<ResBody>;
    type Error = S::Error;
    type Future = crate::BoxFuture<Self::Response, Self::Error>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<ReqBody>) -> Self::Future {
        let Some(gate) = &self.gate else {
            return Box::pin(self.inner.call(req));
        };
        let ours = gate.cluster.get();
        let stamp = move |resp: &mut http::Response<ResBody>| {
            if let Some(id) = ours {
                resp.headers_mut().insert(
                    CLUSTER_ID,
                    http::HeaderValue::from_str(&format_id(id)).expect("hex digits"),
                );
            }
        };
        match gate.admit(req.uri().path(), req.headers(), req.extensions()) {
            Ok(from) => {
                req.extensions_mut().insert(from);
                let fut = self.inner.call(req);
                Box::pin(async move {
                    let mut resp = fut.await?;
                    stamp(&mut resp);
                    Ok(resp)
                })
            }
            Err(status) => Box::pin(async move {
                let mut resp = status.into_http::<ResBody>();
                stamp(&mut resp);
                Ok(resp)
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_certificate_names_a_member_as_member_dash_id() {
        assert_eq!(member_in_names(["localhost", "member-7"]), Some(7));
        assert_eq!(member_in_names(["member-0", "member-x", "member-"]), None);
        assert_eq!(member_in_names(["node-3", "127.0.0.1"]), None);
        assert_eq!(member_in_names(["member-12", "member-13"]), Some(12));
    }

    #[test]
    fn cluster_ids_are_sixteen_hex_digits_and_never_zero() {
        assert_eq!(format_id(0xab), "00000000000000ab");
        assert_eq!(parse_id(&format_id(u64::MAX)), Some(u64::MAX));
        assert_eq!(parse_id(" 00000000000000AB\n"), Some(0xab));
        assert_eq!(parse_id("0000000000000000"), None);
        assert_eq!(parse_id("xyz"), None);
        assert_eq!(parse_id("00000000000000000001"), None);
    }

    #[test]
    fn a_known_cluster_id_stays() {
        let c = ClusterId::default();
        assert_eq!(c.get(), None);
        assert_eq!(c.set(5), Ok(()));
        assert_eq!(c.set(5), Ok(()));
        assert_eq!(c.set(6), Err(5));
        assert_eq!(ClusterId::known(9).get(), Some(9));
    }

    fn gate(cluster: Option<u64>) -> PeerGate {
        PeerGate {
            cluster: cluster.map(ClusterId::known).unwrap_or_default(),
            tls: false,
            rejections: Default::default(),
        }
    }

    fn headers(id: Option<&str>) -> http::HeaderMap {
        let mut h = http::HeaderMap::new();
        if let Some(id) = id {
            h.insert(CLUSTER_ID, id.parse().unwrap());
        }
        h
    }

    #[test]
    fn the_gate_refuses_another_cluster_and_calls_without_an_id() {
        let ext = http::Extensions::new();
        let g = gate(Some(1));
        let raft = "/lodge.raft.v1.Raft/Send";
        let refused = g
            .admit(raft, &headers(Some(&format_id(2))), &ext)
            .unwrap_err();
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
        assert!(
            refused.message().contains(&format_id(1)) && refused.message().contains(&format_id(2))
        );
        let missing = g.admit(raft, &headers(None), &ext).unwrap_err();
        assert_eq!(missing.code(), tonic::Code::FailedPrecondition);
        assert!(g.admit(raft, &headers(Some(&format_id(1))), &ext).is_ok());
        // A joining node asks who is there before it knows the id.
        assert!(g.admit(WITHOUT_ID[0], &headers(None), &ext).is_ok());
        // A node that does not know its cluster yet checks nothing.
        assert!(gate(None)
            .admit(raft, &headers(Some(&format_id(2))), &ext)
            .is_ok());
        assert_eq!(
            g.admit(raft, &headers(Some("nope")), &ext)
                .unwrap_err()
                .code(),
            tonic::Code::InvalidArgument
        );
    }
}
