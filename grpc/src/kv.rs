//! `lodge.kv.v1.KV` → the raft member.
//!
//! Writes (and linearizable reads) that reach a follower are forwarded once to the leader it
//! names, marked so that a second follower does not forward them again; without a known leader
//! the caller gets UNAVAILABLE.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use lodge_actors::cluster::kv::{
    ApplyResult, Cmp, Command, Compare, KeyValue, Op, OpResult, Target,
};
use lodge_actors::cluster::raft::{Propose, Query, RaftError, RaftNode, Read, ReadAnswer};
use lodge_actors::ActorRef;
use tonic::transport::Channel;
use tonic::{Request, Response, Status};

use crate::client::{self, ClientTls};
use crate::deadline;
use crate::pb::kv::{self as pb, kv_client::KvClient, kv_server};

const FORWARDED: &str = "lodge-forwarded";

/// The KV adapter.
pub struct KvService {
    raft: ActorRef<RaftNode>,
    member_id: u64,
    /// Member id → client address, for forwarding to the leader.
    peers: Arc<HashMap<u64, String>>,
    tls: ClientTls,
    channels: Mutex<HashMap<u64, Channel>>,
    timeout: Duration,
}

impl KvService {
    pub fn new(
        raft: ActorRef<RaftNode>,
        member_id: u64,
        peers: Arc<HashMap<u64, String>>,
        tls: ClientTls,
        timeout: Duration,
    ) -> Self {
        Self {
            raft,
            member_id,
            peers,
            tls,
            channels: Mutex::new(HashMap::new()),
            timeout,
        }
    }

    fn header(&self, revision: i64) -> Option<pb::ResponseHeader> {
        Some(pb::ResponseHeader {
            revision,
            member_id: self.member_id,
        })
    }

    async fn propose<T>(&self, req: &Request<T>, cmd: Command) -> Result<ApplyResult, Failure> {
        self.raft
            .send_timeout(Propose(cmd), deadline::of(req, self.timeout))
            .await
            .map_err(|e| Failure::Status(deadline::send_status(e, "raft member")))?
            .map_err(Failure::Raft)
    }

    async fn read<T>(
        &self,
        req: &Request<T>,
        query: Query,
        linearizable: bool,
    ) -> Result<ReadAnswer, Failure> {
        self.raft
            .send_timeout(
                Read {
                    query,
                    linearizable,
                },
                deadline::of(req, self.timeout),
            )
            .await
            .map_err(|e| Failure::Status(deadline::send_status(e, "raft member")))?
            .map_err(Failure::Raft)
    }

    /// A client to the leader, if this request may be forwarded and the leader is known.
    async fn leader_client<T>(
        &self,
        req: &Request<T>,
        err: &RaftError,
    ) -> Result<KvClient<Channel>, Status> {
        let RaftError::NotLeader {
            leader: Some(leader),
        } = err
        else {
            return Err(raft_status(err, &self.peers));
        };
        if req.metadata().contains_key(FORWARDED) || *leader == self.member_id {
            return Err(raft_status(err, &self.peers));
        }
        let addr = self
            .peers
            .get(leader)
            .ok_or_else(|| raft_status(err, &self.peers))?;
        let cached = self.channels.lock().unwrap().get(leader).cloned();
        let channel = match cached {
            Some(c) => c,
            None => {
                let c = client::connect(addr, &self.tls)
                    .await
                    .map_err(Status::unavailable)?;
                self.channels.lock().unwrap().insert(*leader, c.clone());
                c
            }
        };
        Ok(KvClient::new(channel))
    }
}

enum Failure {
    Raft(RaftError),
    Status(Status),
}

fn raft_status(e: &RaftError, peers: &HashMap<u64, String>) -> Status {
    match e {
        RaftError::NotLeader { leader: Some(l) } => {
            let mut s = Status::unavailable(format!(
                "not the leader; the leader is member {l} at {}",
                peers.get(l).map_or("an unknown address", String::as_str)
            ));
            if let Some(addr) = peers.get(l).and_then(|a| a.parse().ok()) {
                s.metadata_mut().insert("lodge-leader", addr);
            }
            s
        }
        RaftError::NotLeader { leader: None } => {
            Status::unavailable("no leader is known; try again shortly")
        }
        // Not UNAVAILABLE: clients retry that blindly, and this write may have applied.
        RaftError::Unknown { .. } => Status::aborted(
            "leadership changed while the write was in flight; it may or may not have been applied: read before retrying",
        ),
        RaftError::Timeout => Status::unavailable("no leader could confirm the read in time"),
        RaftError::Rejected(m) => Status::unavailable(m.clone()),
        RaftError::Invalid(m) => Status::invalid_argument(m.clone()),
    }
}

/// The request to send to the leader: marked as forwarded, with what is left of the caller's
/// budget as its deadline.
fn forwarded<T>(msg: T, budget: Duration) -> Request<T> {
    let mut r = Request::new(msg);
    r.metadata_mut()
        .insert(FORWARDED, "1".parse().expect("static"));
    let ms = budget.as_millis().clamp(1, 99_999_999);
    r.metadata_mut().insert(
        "grpc-timeout",
        format!("{ms}m").parse().expect("digits and a unit"),
    );
    r
}

fn kv(k: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        value: k.value,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
    }
}

fn require_key(key: &[u8], field: &str) -> Result<(), Status> {
    if key.is_empty() {
        Err(Status::invalid_argument(format!("{field} is required")))
    } else {
        Ok(())
    }
}

fn compare(c: pb::Compare, i: usize) -> Result<Compare, Status> {
    require_key(&c.key, &format!("compare[{i}].key"))?;
    let cmp = match pb::compare::Result::try_from(c.result) {
        Ok(pb::compare::Result::Equal) => Cmp::Equal,
        Ok(pb::compare::Result::Greater) => Cmp::Greater,
        Ok(pb::compare::Result::Less) => Cmp::Less,
        Ok(pb::compare::Result::NotEqual) => Cmp::NotEqual,
        Err(_) => {
            return Err(Status::invalid_argument(format!(
                "compare[{i}].result: unknown value {}",
                c.result
            )))
        }
    };
    let target = match c.target {
        Some(pb::compare::Target::Value(v)) => Target::Value(v),
        Some(pb::compare::Target::Version(v)) => Target::Version(v),
        Some(pb::compare::Target::CreateRevision(v)) => Target::CreateRevision(v),
        Some(pb::compare::Target::ModRevision(v)) => Target::ModRevision(v),
        None => {
            return Err(Status::invalid_argument(format!(
                "compare[{i}].target is required"
            )))
        }
    };
    Ok(Compare {
        key: c.key,
        cmp,
        target,
    })
}

fn op(o: pb::RequestOp, field: &str) -> Result<Op, Status> {
    match o.request {
        Some(pb::request_op::Request::Put(p)) => {
            require_key(&p.key, &format!("{field}.put.key"))?;
            Ok(Op::Put {
                key: p.key,
                value: p.value,
            })
        }
        Some(pb::request_op::Request::Delete(d)) => {
            require_key(&d.key, &format!("{field}.delete.key"))?;
            Ok(Op::Delete {
                key: d.key,
                prefix: d.prefix,
            })
        }
        Some(pb::request_op::Request::Get(g)) => {
            require_key(&g.key, &format!("{field}.get.key"))?;
            if g.prefix {
                return Err(Status::invalid_argument(format!(
                    "{field}.get.prefix: only single-key reads are allowed in a transaction"
                )));
            }
            Ok(Op::Get { key: g.key })
        }
        None => Err(Status::invalid_argument(format!(
            "{field}.request is required"
        ))),
    }
}

#[tonic::async_trait]
impl kv_server::Kv for KvService {
    async fn put(&self, req: Request<pb::PutRequest>) -> Result<Response<pb::PutResponse>, Status> {
        let r = req.get_ref();
        require_key(&r.key, "key")?;
        let cmd = Command::Put {
            key: r.key.clone(),
            value: r.value.clone(),
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::PutResponse {
                header: self.header(a.revision),
                prev_kv: if r.prev_kv {
                    a.prev.into_iter().next().map(kv)
                } else {
                    None
                },
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                self.leader_client(&req, &e)
                    .await?
                    .put(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }

    async fn range(
        &self,
        req: Request<pb::RangeRequest>,
    ) -> Result<Response<pb::RangeResponse>, Status> {
        let r = req.get_ref();
        if r.limit < 0 {
            return Err(Status::invalid_argument("limit must not be negative"));
        }
        if !r.prefix {
            require_key(&r.key, "key")?;
        }
        let query = if r.prefix {
            Query::Range {
                prefix: r.key.clone(),
                limit: r.limit as usize,
            }
        } else {
            Query::Get(r.key.clone())
        };
        match self.read(&req, query, !r.serializable).await {
            Ok(a) => Ok(Response::new(pb::RangeResponse {
                header: self.header(a.revision),
                count: a.count as i64,
                kvs: a.kvs.into_iter().map(kv).collect(),
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                self.leader_client(&req, &e)
                    .await?
                    .range(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }

    async fn delete_range(
        &self,
        req: Request<pb::DeleteRangeRequest>,
    ) -> Result<Response<pb::DeleteRangeResponse>, Status> {
        let r = req.get_ref();
        require_key(&r.key, "key")?;
        let cmd = Command::Delete {
            key: r.key.clone(),
            prefix: r.prefix,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => Ok(Response::new(pb::DeleteRangeResponse {
                header: self.header(a.revision),
                deleted: a.deleted as i64,
                prev_kvs: if r.prev_kv {
                    a.prev.into_iter().map(kv).collect()
                } else {
                    Vec::new()
                },
            })),
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                self.leader_client(&req, &e)
                    .await?
                    .delete_range(forwarded(r.clone(), deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }

    async fn txn(&self, req: Request<pb::TxnRequest>) -> Result<Response<pb::TxnResponse>, Status> {
        let r = req.get_ref().clone();
        let compares = r
            .compare
            .into_iter()
            .enumerate()
            .map(|(i, c)| compare(c, i))
            .collect::<Result<Vec<_>, _>>()?;
        let success = r
            .success
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, o)| op(o, &format!("success[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let failure = r
            .failure
            .iter()
            .cloned()
            .enumerate()
            .map(|(i, o)| op(o, &format!("failure[{i}]")))
            .collect::<Result<Vec<_>, _>>()?;
        let cmd = Command::Txn {
            compares,
            success,
            failure,
        };
        match self.propose(&req, cmd).await {
            Ok(a) => {
                let responses = a
                    .ops
                    .into_iter()
                    .map(|o| pb::ResponseOp {
                        response: Some(match o {
                            OpResult::Put { prev } => {
                                pb::response_op::Response::Put(pb::PutResponse {
                                    header: self.header(a.revision),
                                    prev_kv: prev.map(kv),
                                })
                            }
                            OpResult::Delete { deleted, prev } => {
                                pb::response_op::Response::Delete(pb::DeleteRangeResponse {
                                    header: self.header(a.revision),
                                    deleted: deleted as i64,
                                    prev_kvs: prev.into_iter().map(kv).collect(),
                                })
                            }
                            OpResult::Get(found) => {
                                pb::response_op::Response::Get(pb::RangeResponse {
                                    header: self.header(a.revision),
                                    count: found.is_some() as i64,
                                    kvs: found.into_iter().map(kv).collect(),
                                })
                            }
                        }),
                    })
                    .collect();
                Ok(Response::new(pb::TxnResponse {
                    header: self.header(a.revision),
                    succeeded: a.succeeded,
                    responses,
                }))
            }
            Err(Failure::Status(s)) => Err(s),
            Err(Failure::Raft(e)) => {
                let original = req.get_ref().clone();
                self.leader_client(&req, &e)
                    .await?
                    .txn(forwarded(original, deadline::of(&req, self.timeout)))
                    .await
            }
        }
    }
}
