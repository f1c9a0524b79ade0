//! A property test of the request checks: random requests whose fields are drawn within and
//! beyond their bounds. Whatever the request, the check never panics; an accepted request has
//! every size within its limit; a refusal is INVALID_ARGUMENT or RESOURCE_EXHAUSTED, its message
//! starts with the path of a field the request has, and a RESOURCE_EXHAUSTED one names the
//! configuration key of a limit that this very field is over (and is counted under a label).

use fastrand::Rng;

use super::*;

/// Small limits, so that sizes on both sides of them are cheap to make.
fn small() -> KvLimits {
    KvLimits {
        max_key_bytes: 16,
        max_value_bytes: 64,
        max_txn_ops: 4,
        range_page_bytes: 1024,
        watch_batch_bytes: 2048,
    }
}

/// A size near one of `max`'s edges, or anywhere up to twice it.
fn size(rng: &mut Rng, max: usize) -> usize {
    match rng.u8(..8) {
        0 => 0,
        1 => 1,
        2 => max - 1,
        3 => max,
        4 => max + 1,
        5 => max * 2,
        _ => rng.usize(..=max * 2),
    }
}

fn bytes(rng: &mut Rng, max: usize) -> Vec<u8> {
    // Random content where it is cheap; the checks look at sizes, not bytes.
    let mut b = vec![0; size(rng, max)];
    if b.len() <= 4096 {
        rng.fill(&mut b);
    }
    b
}

/// An integer field: small, negative, zero, or at an edge of the type.
fn int(rng: &mut Rng) -> i64 {
    match rng.u8(..8) {
        0 => 0,
        1 => -1,
        2 => i64::MIN,
        3 => i64::MAX,
        4 => MAX_CLIENT_LEASE_ID + rng.i64(-1..=1),
        5 => MAX_LEASE_TTL + rng.i64(-1..=1),
        _ => rng.i64(-5..1000),
    }
}

fn put(rng: &mut Rng, l: &KvLimits) -> pb::PutRequest {
    pb::PutRequest {
        key: bytes(rng, l.max_key_bytes),
        value: bytes(rng, l.max_value_bytes),
        prev_kv: rng.bool(),
        lease: int(rng),
    }
}

fn range_req(rng: &mut Rng, l: &KvLimits) -> pb::RangeRequest {
    pb::RangeRequest {
        key: bytes(rng, l.max_key_bytes),
        prefix: rng.bool(),
        limit: int(rng),
        serializable: rng.bool(),
        after: if rng.bool() {
            bytes(rng, l.max_key_bytes)
        } else {
            Vec::new()
        },
    }
}

fn request_op(rng: &mut Rng, l: &KvLimits) -> pb::RequestOp {
    use pb::request_op::Request as R;
    let request = match rng.u8(..4) {
        0 => None,
        1 => Some(R::Put(put(rng, l))),
        2 => Some(R::Delete(pb::DeleteRangeRequest {
            key: bytes(rng, l.max_key_bytes),
            prefix: rng.bool(),
            prev_kv: rng.bool(),
        })),
        _ => Some(R::Get(pb::RangeRequest {
            prefix: rng.u8(..4) == 0,
            after: if rng.u8(..4) == 0 {
                bytes(rng, l.max_key_bytes)
            } else {
                Vec::new()
            },
            ..range_req(rng, l)
        })),
    };
    pb::RequestOp { request }
}

fn compare_req(rng: &mut Rng, l: &KvLimits) -> pb::Compare {
    use pb::compare::Target as T;
    pb::Compare {
        result: rng.i32(-1..5),
        key: bytes(rng, l.max_key_bytes),
        target: match rng.u8(..5) {
            0 => None,
            1 => Some(T::Value(bytes(rng, l.max_value_bytes))),
            2 => Some(T::Version(int(rng))),
            3 => Some(T::CreateRevision(int(rng))),
            _ => Some(T::ModRevision(int(rng))),
        },
    }
}

fn txn_req(rng: &mut Rng, l: &KvLimits) -> pb::TxnRequest {
    let list = |rng: &mut Rng| size(rng, l.max_txn_ops);
    let (nc, ns, nf) = (list(rng), list(rng), list(rng));
    pb::TxnRequest {
        compare: (0..nc).map(|_| compare_req(rng, l)).collect(),
        success: (0..ns).map(|_| request_op(rng, l)).collect(),
        failure: (0..nf).map(|_| request_op(rng, l)).collect(),
    }
}

#[derive(Debug)]
enum Req {
    Put(pb::PutRequest),
    Range(pb::RangeRequest),
    Delete(pb::DeleteRangeRequest),
    Txn(pb::TxnRequest),
    Grant(pb::LeaseGrantRequest),
    LeaseId(i64),
    Watch(pb::WatchRequest),
}

fn random(rng: &mut Rng, l: &KvLimits) -> Req {
    match rng.u8(..7) {
        0 => Req::Put(put(rng, l)),
        1 => Req::Range(range_req(rng, l)),
        2 => Req::Delete(pb::DeleteRangeRequest {
            key: bytes(rng, l.max_key_bytes),
            prefix: rng.bool(),
            prev_kv: rng.bool(),
        }),
        3 => Req::Txn(txn_req(rng, l)),
        4 => Req::Grant(pb::LeaseGrantRequest {
            ttl: int(rng),
            id: int(rng),
        }),
        5 => Req::LeaseId(int(rng)),
        _ => Req::Watch(pb::WatchRequest {
            key: bytes(rng, l.max_key_bytes),
            prefix: rng.bool(),
            start_revision: int(rng),
            prev_kv: rng.bool(),
        }),
    }
}

fn run(req: &Req, l: &KvLimits) -> Result<(), Refusal> {
    match req {
        Req::Put(r) => put_check(r, l),
        Req::Range(r) => range(r, l).map(drop),
        Req::Delete(r) => delete(r, l).map(drop),
        Req::Txn(r) => txn(r, l).map(drop),
        Req::Grant(r) => lease_grant(r).map(drop),
        Req::LeaseId(id) => lease_id(*id).map(drop),
        Req::Watch(r) => watch(r, l).map(drop),
    }
}

fn put_check(r: &pb::PutRequest, l: &KvLimits) -> Result<(), Refusal> {
    super::put(r, l).map(drop)
}

/// What a field path names in a request.
#[derive(Debug, PartialEq)]
enum Field {
    /// A key, prefix or cursor of this many bytes.
    Key(usize),
    /// A value of this many bytes.
    Value(usize),
    /// A transaction list of this many entries.
    Count(usize),
    /// Any other field the request has.
    Other,
}

fn op_field(o: &pb::RequestOp, rest: &str) -> Option<Field> {
    use pb::request_op::Request as R;
    Some(match (&o.request, rest) {
        (_, "request") => Field::Other,
        (Some(R::Put(p)), "put.key") => Field::Key(p.key.len()),
        (Some(R::Put(p)), "put.value") => Field::Value(p.value.len()),
        (Some(R::Put(_)), "put.lease") => Field::Other,
        (Some(R::Delete(d)), "delete.key") => Field::Key(d.key.len()),
        (Some(R::Get(g)), "get.key") => Field::Key(g.key.len()),
        (Some(R::Get(_)), "get.prefix" | "get.after") => Field::Other,
        _ => return None,
    })
}

/// `list[i].rest` → (list, i, rest).
fn indexed(path: &str) -> Option<(&str, usize, &str)> {
    let (list, tail) = path.split_once('[')?;
    let (i, rest) = tail.split_once("].")?;
    Some((list, i.parse().ok()?, rest))
}

/// The field `path` names in `req`, if it has one.
fn resolve(req: &Req, path: &str) -> Option<Field> {
    Some(match (req, path) {
        (Req::Put(r), "key") => Field::Key(r.key.len()),
        (Req::Put(r), "value") => Field::Value(r.value.len()),
        (Req::Put(_), "lease") => Field::Other,
        (Req::Range(r), "key") => Field::Key(r.key.len()),
        (Req::Range(r), "after") => Field::Key(r.after.len()),
        (Req::Range(_), "limit") => Field::Other,
        (Req::Delete(r), "key") => Field::Key(r.key.len()),
        (Req::Watch(r), "key") => Field::Key(r.key.len()),
        (Req::Watch(_), "start_revision") => Field::Other,
        (Req::Grant(_), "ttl" | "id") | (Req::LeaseId(_), "id") => Field::Other,
        (Req::Txn(r), "compare") => Field::Count(r.compare.len()),
        (Req::Txn(r), "success") => Field::Count(r.success.len()),
        (Req::Txn(r), "failure") => Field::Count(r.failure.len()),
        (Req::Txn(r), p) => {
            let (list, i, rest) = indexed(p)?;
            match list {
                "compare" => {
                    let c = r.compare.get(i)?;
                    match rest {
                        "key" => Field::Key(c.key.len()),
                        "value" => match &c.target {
                            Some(pb::compare::Target::Value(v)) => Field::Value(v.len()),
                            _ => return None,
                        },
                        "result" | "target" => Field::Other,
                        _ => return None,
                    }
                }
                "success" => op_field(r.success.get(i)?, rest)?,
                "failure" => op_field(r.failure.get(i)?, rest)?,
                _ => return None,
            }
        }
        _ => return None,
    })
}

/// Every size in `req` is within its limit.
fn within(req: &Req, l: &KvLimits) -> bool {
    let k = |b: &[u8]| b.len() <= l.max_key_bytes;
    let v = |b: &[u8]| b.len() <= l.max_value_bytes;
    let op = |o: &pb::RequestOp| match &o.request {
        Some(pb::request_op::Request::Put(p)) => k(&p.key) && v(&p.value),
        Some(pb::request_op::Request::Delete(d)) => k(&d.key),
        Some(pb::request_op::Request::Get(g)) => k(&g.key),
        None => true,
    };
    match req {
        Req::Put(r) => k(&r.key) && v(&r.value),
        Req::Range(r) => k(&r.key) && k(&r.after),
        Req::Delete(r) => k(&r.key),
        Req::Watch(r) => k(&r.key),
        Req::Grant(_) | Req::LeaseId(_) => true,
        Req::Txn(r) => {
            [r.compare.len(), r.success.len(), r.failure.len()]
                .iter()
                .all(|n| *n <= l.max_txn_ops)
                && r.compare.iter().all(|c| {
                    k(&c.key)
                        && match &c.target {
                            Some(pb::compare::Target::Value(x)) => v(x),
                            _ => true,
                        }
                })
                && r.success.iter().chain(&r.failure).all(op)
        }
    }
}

/// The property, for one request.
fn holds(req: &Req, l: &KvLimits) {
    let refusal = match run(req, l) {
        Ok(()) => {
            assert!(within(req, l), "accepted over a limit: {req:?}");
            return;
        }
        Err(r) => r,
    };
    let msg = refusal.status.message();
    let (path, rest) = msg
        .split_once(": ")
        .unwrap_or_else(|| panic!("{msg:?} does not start with a field"));
    let field =
        resolve(req, path).unwrap_or_else(|| panic!("{msg:?}: {path:?} is not a field of {req:?}"));
    match refusal.status.code() {
        tonic::Code::ResourceExhausted => {
            let (size, max, key) = match field {
                Field::Key(n) => (n, l.max_key_bytes, "kv.max_key_bytes"),
                Field::Value(n) => (n, l.max_value_bytes, "kv.max_value_bytes"),
                Field::Count(n) => (n, l.max_txn_ops, "kv.max_txn_ops"),
                Field::Other => panic!("{msg:?}: {path} has no size"),
            };
            assert!(size > max, "{msg:?}: {path} is {size}, within {max}");
            assert!(
                rest.ends_with(&format!("is over {key} ({max})")),
                "{msg:?} does not name {key}"
            );
            assert!(refusal.limit.is_some(), "{msg:?} is not counted");
        }
        tonic::Code::InvalidArgument => {
            assert!(refusal.limit.is_none(), "{msg:?}");
        }
        other => panic!("{msg:?}: {other:?}"),
    }
}

#[test]
fn random_requests_within_and_beyond_their_bounds_never_panic_and_refusals_name_the_field() {
    let l = small();
    let mut accepted = 0;
    let mut by_limit = 0;
    for seed in 0..20_000u64 {
        let mut rng = Rng::with_seed(seed);
        let req = random(&mut rng, &l);
        holds(&req, &l);
        match run(&req, &l) {
            Ok(()) => accepted += 1,
            Err(r) if r.limit.is_some() => by_limit += 1,
            Err(_) => {}
        }
    }
    // The draw reaches every outcome often, not just one of them.
    assert!(accepted > 2000 && by_limit > 2000, "{accepted} {by_limit}");
}

#[test]
fn the_default_limits_hold_too_at_their_edges() {
    let l = KvLimits::default();
    for seed in 0..200u64 {
        let mut rng = Rng::with_seed(seed);
        let req = random(&mut rng, &l);
        holds(&req, &l);
    }
}

#[test]
fn the_cases_of_the_issue_are_refused_naming_their_limit() {
    let l = KvLimits::default();
    let big_key = pb::PutRequest {
        key: vec![b'k'; 1 << 20],
        value: b"v".to_vec(),
        ..Default::default()
    };
    let e = super::put(&big_key, &l).unwrap_err();
    assert_eq!(e.status.code(), tonic::Code::ResourceExhausted);
    assert_eq!(
        e.status.message(),
        "key: 1048576 bytes is over kv.max_key_bytes (4096)"
    );
    assert_eq!(e.limit, Some("kv_key_bytes"));
    let big_value = pb::PutRequest {
        key: b"k".to_vec(),
        value: vec![0; (1 << 20) + 1],
        ..Default::default()
    };
    let e = super::put(&big_value, &l).unwrap_err();
    assert_eq!(
        e.status.message(),
        "value: 1048577 bytes is over kv.max_value_bytes (1048576)"
    );
    let e = lease_grant(&pb::LeaseGrantRequest {
        ttl: 10,
        id: i64::MAX,
    })
    .unwrap_err();
    assert_eq!(e.status.code(), tonic::Code::InvalidArgument);
    assert!(e
        .status
        .message()
        .starts_with("id: 9223372036854775807 is outside 1..=4611686018427387904"));
    assert!(lease_grant(&pb::LeaseGrantRequest {
        ttl: 10,
        id: MAX_CLIENT_LEASE_ID,
    })
    .is_ok());
    let many = pb::TxnRequest {
        success: vec![pb::RequestOp::default(); 129],
        ..Default::default()
    };
    assert_eq!(
        txn(&many, &l).unwrap_err().status.message(),
        "success: 129 operations is over kv.max_txn_ops (128)"
    );
}
