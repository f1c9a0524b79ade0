//! Which keys a KV call touches, checked against the caller's roles and prefixes before anything
//! is read or proposed (see [`crate::auth::Caller::require_keys`]). Runs on the member the
//! client called; a call forwarded to the leader was checked there already.

use tonic::Status;

use crate::auth::{Caller, Role};
use crate::pb::kv as pb;

/// A put of `r.key`.
pub fn put(c: &Caller, r: &pb::PutRequest) -> Result<(), Status> {
    c.require_keys(Role::KvWrite, &r.key, false, "key")
}

/// A read of `r.key` (or its prefix).
pub fn range(c: &Caller, r: &pb::RangeRequest) -> Result<(), Status> {
    c.require_keys(Role::KvRead, &r.key, r.prefix, "key")
}

/// A delete of `r.key` (or its prefix).
pub fn delete(c: &Caller, r: &pb::DeleteRangeRequest) -> Result<(), Status> {
    c.require_keys(Role::KvWrite, &r.key, r.prefix, "key")
}

/// A watch of `r.key` (or its prefix).
pub fn watch(c: &Caller, r: &pb::WatchRequest) -> Result<(), Status> {
    c.require_keys(Role::KvRead, &r.key, r.prefix, "key")
}

/// A transaction: kv-read for every key compared or read, kv-write for every key written, in
/// both branches (which one runs is known only when it is applied).
pub fn txn(c: &Caller, r: &pb::TxnRequest) -> Result<(), Status> {
    for (i, cmp) in r.compare.iter().enumerate() {
        c.require_keys(Role::KvRead, &cmp.key, false, &format!("compare[{i}].key"))?;
    }
    for (branch, ops) in [("success", &r.success), ("failure", &r.failure)] {
        for (i, op) in ops.iter().enumerate() {
            let field = format!("{branch}[{i}]");
            match &op.request {
                Some(pb::request_op::Request::Put(p)) => {
                    c.require_keys(Role::KvWrite, &p.key, false, &format!("{field}.put.key"))?
                }
                Some(pb::request_op::Request::Delete(d)) => c.require_keys(
                    Role::KvWrite,
                    &d.key,
                    d.prefix,
                    &format!("{field}.delete.key"),
                )?,
                Some(pb::request_op::Request::Get(g)) => {
                    c.require_keys(Role::KvRead, &g.key, g.prefix, &format!("{field}.get.key"))?
                }
                None => {}
            }
        }
    }
    Ok(())
}
