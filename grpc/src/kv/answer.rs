//! Building KV answers within a byte budget, so that no answer grows past what the transport
//! sends: a value that was accepted can always be read back, and many of them never make a
//! prefix, a transaction's answer or a watch unreadable.
//!
//! Range pages are cut by the raft member itself (only the page is copied); here are the answers
//! whose values the store has already produced: a delete's and a transaction's previous values and
//! gets (what does not fit is left out and marked), and a revision's watch events (split into
//! several messages, each marked `fragment` but the last).

use lodge_actors::cluster::kv::{ApplyResult, Event, KeyValue, OpResult};
use prost::Message;

use crate::pb::kv as pb;

/// A protobuf length-delimited field's tag and length, at most.
const FIELD_OVERHEAD: usize = 6;

/// What is left of an answer's byte budget. The first value always fits, so that an answer is
/// never empty for want of room (a value stored under a larger limit than today's).
struct Budget {
    max: usize,
    used: usize,
}

impl Budget {
    fn new(max: usize) -> Self {
        Self { max, used: 0 }
    }

    /// Takes room for `bytes` if there is some.
    fn take(&mut self, bytes: usize) -> bool {
        if self.used > 0 && self.used.saturating_add(bytes) > self.max {
            return false;
        }
        self.used = self.used.saturating_add(bytes);
        true
    }
}

/// A stored key as the protocol has it.
pub(crate) fn kv(k: KeyValue) -> pb::KeyValue {
    pb::KeyValue {
        key: k.key,
        value: k.value,
        create_revision: k.create_revision,
        mod_revision: k.mod_revision,
        version: k.version,
        lease: k.lease,
    }
}

fn event(e: Event) -> pb::Event {
    let kind = if e.deleted {
        pb::event::EventType::Delete
    } else {
        pb::event::EventType::Put
    };
    pb::Event {
        r#type: kind as i32,
        kv: Some(kv(e.kv)),
        prev_kv: e.prev.map(kv),
        prev_kv_omitted: false,
    }
}

/// Previous values within `budget`, in order; true when some were left out.
fn prev_within(prev: Vec<KeyValue>, budget: &mut Budget) -> (Vec<pb::KeyValue>, bool) {
    let mut out = Vec::new();
    for p in prev {
        if !budget.take(p.answer_bytes()) {
            return (out, true);
        }
        out.push(kv(p));
    }
    (out, false)
}

/// A delete's previous values (when asked for) within `max_bytes`, and whether some were left
/// out.
pub fn delete_prevs(
    prev: Vec<KeyValue>,
    asked: bool,
    max_bytes: usize,
) -> (Vec<pb::KeyValue>, bool) {
    if !asked {
        return (Vec::new(), false);
    }
    prev_within(prev, &mut Budget::new(max_bytes))
}

/// A lease's keys within `max_bytes`, in order; true when some were left out.
pub fn lease_keys(keys: Vec<Vec<u8>>, max_bytes: usize) -> (Vec<Vec<u8>>, bool) {
    let mut budget = Budget::new(max_bytes);
    let mut out = Vec::new();
    for k in keys {
        if !budget.take(k.len() + FIELD_OVERHEAD) {
            return (out, true);
        }
        out.push(k);
    }
    (out, false)
}

/// Whether an operation of a transaction asked for previous values.
fn asked_prev(o: Option<&pb::RequestOp>) -> bool {
    match o.and_then(|o| o.request.as_ref()) {
        Some(pb::request_op::Request::Put(p)) => p.prev_kv,
        Some(pb::request_op::Request::Delete(d)) => d.prev_kv,
        _ => false,
    }
}

/// A transaction's per-operation results, their values within `max_bytes` in operation order.
/// `branch` is the branch of the request that was applied (its `prev_kv` flags say which
/// previous values to return); `header` is every result's header.
pub fn txn_results(
    a: ApplyResult,
    branch: &[pb::RequestOp],
    header: Option<pb::ResponseHeader>,
    max_bytes: usize,
) -> Vec<pb::ResponseOp> {
    let mut budget = Budget::new(max_bytes);
    a.ops
        .into_iter()
        .enumerate()
        .map(|(i, o)| {
            let asked = asked_prev(branch.get(i));
            let response = match o {
                OpResult::Put { prev } => {
                    let prev = prev.filter(|_| asked);
                    let fits = prev.as_ref().is_none_or(|p| budget.take(p.answer_bytes()));
                    pb::response_op::Response::Put(pb::PutResponse {
                        header,
                        prev_kv_omitted: !fits,
                        prev_kv: prev.filter(|_| fits).map(kv),
                    })
                }
                OpResult::Delete { deleted, prev } => {
                    let (prev_kvs, truncated) = if asked {
                        prev_within(prev, &mut budget)
                    } else {
                        (Vec::new(), false)
                    };
                    pb::response_op::Response::Delete(pb::DeleteRangeResponse {
                        header,
                        deleted: deleted as i64,
                        prev_kvs,
                        prev_kvs_truncated: truncated,
                    })
                }
                OpResult::Get(found) => {
                    let count = found.is_some() as i64;
                    let fits = found.as_ref().is_none_or(|f| budget.take(f.answer_bytes()));
                    pb::response_op::Response::Get(pb::RangeResponse {
                        header,
                        count,
                        more: !fits,
                        kvs: found.filter(|_| fits).map(kv).into_iter().collect(),
                    })
                }
            };
            pb::ResponseOp {
                response: Some(response),
            }
        })
        .collect()
}

/// The messages of one revision's watch events: as few as fit in `max_bytes` each, all but the
/// last marked `fragment`. An event too large for a message of its own loses its previous value
/// (marked `prev_kv_omitted`); one still too large goes alone.
pub fn watch_messages(
    events: Vec<Event>,
    header: Option<pb::ResponseHeader>,
    max_bytes: usize,
) -> Vec<pb::WatchResponse> {
    let mut messages = Vec::new();
    let mut current: Vec<pb::Event> = Vec::new();
    let mut used = 0;
    for e in events {
        let mut e = event(e);
        let mut size = e.encoded_len() + FIELD_OVERHEAD;
        if size > max_bytes && e.prev_kv.is_some() {
            e.prev_kv = None;
            e.prev_kv_omitted = true;
            size = e.encoded_len() + FIELD_OVERHEAD;
        }
        if !current.is_empty() && used + size > max_bytes {
            messages.push(std::mem::take(&mut current));
            used = 0;
        }
        used += size;
        current.push(e);
    }
    if !current.is_empty() {
        messages.push(current);
    }
    let last = messages.len().saturating_sub(1);
    messages
        .into_iter()
        .enumerate()
        .map(|(i, events)| pb::WatchResponse {
            header,
            events,
            fragment: i < last,
            ..Default::default()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stored(key: &str, value_bytes: usize) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: vec![b'v'; value_bytes],
            create_revision: 1,
            mod_revision: 2,
            version: 1,
            lease: 0,
        }
    }

    fn put(key: &str, value_bytes: usize, prev_bytes: Option<usize>) -> Event {
        Event {
            deleted: false,
            kv: stored(key, value_bytes),
            prev: prev_bytes.map(|n| stored(key, n)),
            expired: false,
        }
    }

    #[test]
    fn a_revision_s_events_are_split_under_the_budget_and_none_is_lost() {
        let events: Vec<Event> = (0..10)
            .map(|i| put(&format!("k{i}"), 300, Some(300)))
            .collect();
        let header = Some(pb::ResponseHeader {
            revision: 7,
            member_id: 1,
        });
        let messages = watch_messages(events, header, 2000);
        assert!(messages.len() > 1, "{}", messages.len());
        for (i, m) in messages.iter().enumerate() {
            assert!(
                m.encoded_len() <= 2000 + 64,
                "message {i}: {}",
                m.encoded_len()
            );
            assert_eq!(m.fragment, i + 1 < messages.len());
            assert_eq!(m.header.unwrap().revision, 7);
        }
        let keys: Vec<Vec<u8>> = messages
            .iter()
            .flat_map(|m| m.events.iter().map(|e| e.kv.as_ref().unwrap().key.clone()))
            .collect();
        let want: Vec<Vec<u8>> = (0..10).map(|i| format!("k{i}").into_bytes()).collect();
        assert_eq!(keys, want);
        assert!(messages
            .iter()
            .flat_map(|m| &m.events)
            .all(|e| e.prev_kv.is_some() && !e.prev_kv_omitted));
    }

    #[test]
    fn an_event_too_large_for_a_message_goes_alone_without_its_previous_value() {
        // Without its previous value the large event still passes the budget: it goes alone.
        let events = vec![
            put("a", 10, None),
            put("big", 990, Some(990)),
            put("c", 10, None),
        ];
        let messages = watch_messages(events, None, 1000);
        assert_eq!(messages.len(), 3);
        let big = &messages[1].events[0];
        assert!(big.prev_kv.is_none() && big.prev_kv_omitted);
        assert_eq!(big.kv.as_ref().unwrap().value.len(), 990);
        // With room for it, it shares a message and keeps its previous value.
        let events = vec![put("a", 10, None), put("big", 400, Some(400))];
        let messages = watch_messages(events, None, 1000);
        assert_eq!(messages.len(), 1);
        assert!(messages[0].events[1].prev_kv.is_some());
        assert!(watch_messages(Vec::new(), None, 1000).is_empty());
    }

    #[test]
    fn a_txn_answer_keeps_to_its_budget_marks_what_it_left_out_and_honours_prev_kv() {
        let a = ApplyResult {
            ops: vec![
                OpResult::Get(Some(stored("g1", 600))),
                OpResult::Get(Some(stored("g2", 600))),
                OpResult::Put {
                    prev: Some(stored("p", 10)),
                },
                OpResult::Put {
                    prev: Some(stored("q", 10)),
                },
                OpResult::Delete {
                    deleted: 3,
                    prev: vec![stored("d1", 100), stored("d2", 100), stored("d3", 100)],
                },
                OpResult::Get(None),
            ],
            ..Default::default()
        };
        let put = |prev_kv| pb::RequestOp {
            request: Some(pb::request_op::Request::Put(pb::PutRequest {
                prev_kv,
                ..Default::default()
            })),
        };
        let get = pb::RequestOp {
            request: Some(pb::request_op::Request::Get(Default::default())),
        };
        let del = pb::RequestOp {
            request: Some(pb::request_op::Request::Delete(pb::DeleteRangeRequest {
                prev_kv: true,
                ..Default::default()
            })),
        };
        let branch = [get.clone(), get.clone(), put(true), put(false), del, get];
        let out = txn_results(a, &branch, None, 1100);
        use pb::response_op::Response as R;
        let Some(R::Get(g1)) = &out[0].response else {
            panic!()
        };
        assert_eq!((g1.kvs.len(), g1.count, g1.more), (1, 1, false));
        let Some(R::Get(g2)) = &out[1].response else {
            panic!()
        };
        assert_eq!(
            (g2.kvs.len(), g2.count, g2.more),
            (0, 1, true),
            "over the budget"
        );
        let Some(R::Put(p)) = &out[2].response else {
            panic!()
        };
        assert!(p.prev_kv.is_some() && !p.prev_kv_omitted);
        let Some(R::Put(q)) = &out[3].response else {
            panic!()
        };
        assert!(q.prev_kv.is_none() && !q.prev_kv_omitted, "not asked for");
        let Some(R::Delete(d)) = &out[4].response else {
            panic!()
        };
        assert_eq!(
            (d.deleted, d.prev_kvs.len(), d.prev_kvs_truncated),
            (3, 2, true)
        );
        let Some(R::Get(none)) = &out[5].response else {
            panic!()
        };
        assert_eq!((none.count, none.more), (0, false));
    }

    #[test]
    fn a_delete_returns_previous_values_only_when_asked_and_within_its_budget() {
        let prev = || vec![stored("a", 500), stored("b", 500)];
        assert_eq!(delete_prevs(prev(), false, 100), (Vec::new(), false));
        let (kept, truncated) = delete_prevs(prev(), true, 700);
        assert_eq!((kept.len(), truncated), (1, true), "the first always fits");
        let (kept, truncated) = delete_prevs(prev(), true, 2000);
        assert_eq!((kept.len(), truncated), (2, false));
    }

    #[test]
    fn a_lease_s_keys_stop_at_the_budget() {
        let keys: Vec<Vec<u8>> = (0..100).map(|i| format!("k{i:03}").into_bytes()).collect();
        let (kept, truncated) = lease_keys(keys.clone(), 100);
        assert_eq!((kept.len(), truncated), (10, true));
        assert_eq!(kept[..], keys[..10]);
        assert_eq!(lease_keys(keys.clone(), 10_000), (keys, false));
    }
}
