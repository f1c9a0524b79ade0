//! Decoding a KV request into what the raft member is asked: every field checked against its
//! bounds first, so that nothing oversized reaches the log.
//!
//! A refusal's status message starts with the field it is about (`key`, `success[3].put.value`,
//! `compare`, ...) and, for a size or count limit, names the configuration key that sets it:
//! `value: 4194304 bytes is over kv.max_value_bytes (1048576)`. Size and count limits answer
//! RESOURCE_EXHAUSTED (the request may be fine under a larger limit), malformed fields
//! INVALID_ARGUMENT.

use lodge_actors::cluster::kv::{
    Cmp, Command, Compare, Op, Target, MAX_CLIENT_LEASE_ID, MAX_LEASE_TTL,
};
use lodge_actors::cluster::raft::Query;
use lodge_actors::cluster::watch::WatchSpec;
use tonic::Status;

use crate::pb::kv as pb;

/// The KV service's limits (the node's `[kv]` configuration section).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KvLimits {
    /// Longest key, and longest prefix or range cursor (`kv.max_key_bytes`).
    pub max_key_bytes: usize,
    /// Longest value, and longest value a compare may name (`kv.max_value_bytes`).
    pub max_value_bytes: usize,
    /// Compares, and operations in each branch, of one transaction (`kv.max_txn_ops`).
    pub max_txn_ops: usize,
    /// Bytes of keys and values in one range page, and in one transaction's or delete's answer
    /// (`kv.range_page_bytes`).
    pub range_page_bytes: usize,
    /// Bytes of events in one watch message (`kv.watch_batch_bytes`).
    pub watch_batch_bytes: usize,
}

impl Default for KvLimits {
    /// The defaults of `config/node.toml`.
    fn default() -> Self {
        Self {
            max_key_bytes: 4096,
            max_value_bytes: 1 << 20,
            max_txn_ops: 128,
            range_page_bytes: 3 << 20,
            watch_batch_bytes: 3 << 20,
        }
    }
}

/// A request refused before it reached the raft member.
#[derive(Debug)]
pub struct Refusal {
    /// What the caller is answered.
    pub status: Status,
    /// The `limit` label it is counted under in `lodge_limit_rejections_total`, for a refusal
    /// by a configured limit.
    pub limit: Option<&'static str>,
}

fn invalid(message: String) -> Refusal {
    Refusal {
        status: Status::invalid_argument(message),
        limit: None,
    }
}

/// A size or count over one of the configured limits.
fn over(field: &str, what: String, key: &str, max: usize, label: &'static str) -> Refusal {
    Refusal {
        status: Status::resource_exhausted(format!("{field}: {what} is over {key} ({max})")),
        limit: Some(label),
    }
}

type Checked<T> = Result<T, Refusal>;

/// A key that must be there, within `kv.max_key_bytes`.
fn key(k: &[u8], field: &str, l: &KvLimits) -> Checked<()> {
    if k.is_empty() {
        return Err(invalid(format!("{field}: required")));
    }
    key_size(k, field, l)
}

/// A key or prefix that may be empty, within `kv.max_key_bytes`.
fn key_size(k: &[u8], field: &str, l: &KvLimits) -> Checked<()> {
    if k.len() > l.max_key_bytes {
        return Err(over(
            field,
            format!("{} bytes", k.len()),
            "kv.max_key_bytes",
            l.max_key_bytes,
            "kv_key_bytes",
        ));
    }
    Ok(())
}

fn value(v: &[u8], field: &str, l: &KvLimits) -> Checked<()> {
    if v.len() > l.max_value_bytes {
        return Err(over(
            field,
            format!("{} bytes", v.len()),
            "kv.max_value_bytes",
            l.max_value_bytes,
            "kv_value_bytes",
        ));
    }
    Ok(())
}

/// A lease that a put names: 0 (none) or a positive id.
fn lease_ref(lease: i64, field: &str) -> Checked<()> {
    if lease < 0 {
        return Err(invalid(format!(
            "{field}: {lease} is not a lease id (0: none; ids are positive)"
        )));
    }
    Ok(())
}

/// `Put`.
pub fn put(r: &pb::PutRequest, l: &KvLimits) -> Checked<Command> {
    key(&r.key, "key", l)?;
    value(&r.value, "value", l)?;
    lease_ref(r.lease, "lease")?;
    Ok(Command::Put {
        key: r.key.clone(),
        value: r.value.clone(),
        lease: r.lease,
    })
}

/// `Range`: one key, or a page of a prefix.
pub fn range(r: &pb::RangeRequest, l: &KvLimits) -> Checked<Query> {
    if r.limit < 0 {
        return Err(invalid(format!(
            "limit: {} is negative (0: no limit)",
            r.limit
        )));
    }
    if !r.prefix {
        key(&r.key, "key", l)?;
        if !r.after.is_empty() {
            return Err(invalid(
                "after: only a prefix range reads after a key (set prefix)".into(),
            ));
        }
        return Ok(Query::Get(r.key.clone()));
    }
    key_size(&r.key, "key", l)?;
    key_size(&r.after, "after", l)?;
    Ok(Query::Range {
        prefix: r.key.clone(),
        after: (!r.after.is_empty()).then(|| r.after.clone()),
        limit: usize::try_from(r.limit).unwrap_or(usize::MAX),
        max_bytes: l.range_page_bytes,
    })
}

/// `DeleteRange`.
pub fn delete(r: &pb::DeleteRangeRequest, l: &KvLimits) -> Checked<Command> {
    key(&r.key, "key", l)?;
    Ok(Command::Delete {
        key: r.key.clone(),
        prefix: r.prefix,
    })
}

fn compare(c: &pb::Compare, i: usize, l: &KvLimits) -> Checked<Compare> {
    key(&c.key, &format!("compare[{i}].key"), l)?;
    let cmp = match pb::compare::Result::try_from(c.result) {
        Ok(pb::compare::Result::Equal) => Cmp::Equal,
        Ok(pb::compare::Result::Greater) => Cmp::Greater,
        Ok(pb::compare::Result::Less) => Cmp::Less,
        Ok(pb::compare::Result::NotEqual) => Cmp::NotEqual,
        Err(_) => {
            return Err(invalid(format!(
                "compare[{i}].result: unknown value {}",
                c.result
            )))
        }
    };
    let target = match &c.target {
        Some(pb::compare::Target::Value(v)) => {
            value(v, &format!("compare[{i}].value"), l)?;
            Target::Value(v.clone())
        }
        Some(pb::compare::Target::Version(v)) => Target::Version(*v),
        Some(pb::compare::Target::CreateRevision(v)) => Target::CreateRevision(*v),
        Some(pb::compare::Target::ModRevision(v)) => Target::ModRevision(*v),
        None => return Err(invalid(format!("compare[{i}].target: required"))),
    };
    Ok(Compare {
        key: c.key.clone(),
        cmp,
        target,
    })
}

fn op(o: &pb::RequestOp, field: &str, l: &KvLimits) -> Checked<Op> {
    match &o.request {
        Some(pb::request_op::Request::Put(p)) => {
            key(&p.key, &format!("{field}.put.key"), l)?;
            value(&p.value, &format!("{field}.put.value"), l)?;
            lease_ref(p.lease, &format!("{field}.put.lease"))?;
            Ok(Op::Put {
                key: p.key.clone(),
                value: p.value.clone(),
                lease: p.lease,
            })
        }
        Some(pb::request_op::Request::Delete(d)) => {
            key(&d.key, &format!("{field}.delete.key"), l)?;
            Ok(Op::Delete {
                key: d.key.clone(),
                prefix: d.prefix,
            })
        }
        Some(pb::request_op::Request::Get(g)) => {
            key(&g.key, &format!("{field}.get.key"), l)?;
            if g.prefix {
                return Err(invalid(format!(
                    "{field}.get.prefix: only single-key reads are allowed in a transaction"
                )));
            }
            if !g.after.is_empty() {
                return Err(invalid(format!(
                    "{field}.get.after: only single-key reads are allowed in a transaction"
                )));
            }
            Ok(Op::Get { key: g.key.clone() })
        }
        None => Err(invalid(format!("{field}.request: required"))),
    }
}

/// The number of entries in a transaction's list, within `kv.max_txn_ops`.
fn txn_count(n: usize, field: &str, what: &str, l: &KvLimits) -> Checked<()> {
    if n > l.max_txn_ops {
        return Err(over(
            field,
            format!("{n} {what}"),
            "kv.max_txn_ops",
            l.max_txn_ops,
            "kv_txn_ops",
        ));
    }
    Ok(())
}

/// `Txn`. Counts are checked before any entry, so a huge list is refused without a walk.
pub fn txn(r: &pb::TxnRequest, l: &KvLimits) -> Checked<Command> {
    txn_count(r.compare.len(), "compare", "compares", l)?;
    txn_count(r.success.len(), "success", "operations", l)?;
    txn_count(r.failure.len(), "failure", "operations", l)?;
    let compares = r
        .compare
        .iter()
        .enumerate()
        .map(|(i, c)| compare(c, i, l))
        .collect::<Result<_, _>>()?;
    let branch = |ops: &[pb::RequestOp], name: &str| {
        ops.iter()
            .enumerate()
            .map(|(i, o)| op(o, &format!("{name}[{i}]"), l))
            .collect::<Result<Vec<_>, _>>()
    };
    Ok(Command::Txn {
        compares,
        success: branch(&r.success, "success")?,
        failure: branch(&r.failure, "failure")?,
    })
}

/// `LeaseGrant`.
pub fn lease_grant(r: &pb::LeaseGrantRequest) -> Checked<Command> {
    if !(1..=MAX_LEASE_TTL).contains(&r.ttl) {
        return Err(invalid(format!(
            "ttl: {} s; a lease lives at least 1 s and at most {MAX_LEASE_TTL} s",
            r.ttl
        )));
    }
    if !(0..=MAX_CLIENT_LEASE_ID).contains(&r.id) {
        return Err(invalid(format!(
            "id: {} is outside 1..={MAX_CLIENT_LEASE_ID}, the ids a client may ask for; ask for 0 and the store picks one",
            r.id
        )));
    }
    Ok(Command::LeaseGrant {
        id: r.id,
        ttl_secs: r.ttl,
    })
}

/// The lease a revoke, keep-alive or time-to-live names.
pub fn lease_id(id: i64) -> Checked<i64> {
    if id <= 0 {
        return Err(invalid(format!(
            "id: {id} is not a lease id (required; ids are positive)"
        )));
    }
    Ok(id)
}

/// `Watch`.
pub fn watch(r: &pb::WatchRequest, l: &KvLimits) -> Checked<WatchSpec> {
    if r.prefix {
        key_size(&r.key, "key", l)?;
    } else {
        key(&r.key, "key", l)?;
    }
    if r.start_revision < 0 {
        return Err(invalid(format!(
            "start_revision: {} is negative (0: changes from now on)",
            r.start_revision
        )));
    }
    Ok(WatchSpec {
        key: r.key.clone(),
        prefix: r.prefix,
        start_revision: r.start_revision,
        prev_kv: r.prev_kv,
    })
}

#[cfg(test)]
mod tests;
