//! The owner records in the replicated store, through the node's store client: claims and
//! take-overs are transactions on the record's key, the owner's lease is renewed on the leader,
//! and changes come from this member's watch (every member applies the same changes).

use std::time::Duration;

use tokio::sync::mpsc;

use super::owner::{record_key, Claim, OwnerEvent, OwnerRecord, OwnerStore, StoreFuture, PREFIX};
use super::RouterError;
use crate::cluster::client::{Client, ClientError, Route, KV_GROUP};
use crate::cluster::kv::{Cmp, Command, Compare, Op, OpResult, Target};
use crate::cluster::raft::RaftError;
use crate::cluster::watch::{WatchSpec, WatchUpdate};

/// Updates the router's watch may fall behind by.
const WATCH_BUFFER: usize = 256;

/// The router's owner records, kept in the KV group.
pub struct StoredOwners {
    client: Client,
}

impl StoredOwners {
    /// Owner records through `client`.
    pub fn new(client: Client) -> Self {
        Self { client }
    }
}

fn unavailable(e: ClientError) -> RouterError {
    RouterError::Unavailable(format!("router store: {e}"))
}

fn put(record: &OwnerRecord, lease: i64) -> Op {
    Op::Put {
        key: record_key(&record.session_key),
        value: record.encode(),
        lease,
    }
}

/// The stored record is exactly `record` (records encode deterministically).
fn value_is(record: &OwnerRecord) -> Compare {
    Compare {
        key: record_key(&record.session_key),
        cmp: Cmp::Equal,
        target: Target::Value(record.encode()),
    }
}

/// Runs a claim-like transaction (its failure branch reads the key): `Won` if it applied, else
/// the record that holds the key.
async fn settle(
    client: &Client,
    compare: Compare,
    record: &OwnerRecord,
    lease: i64,
    timeout: Duration,
) -> Result<Claim, RouterError> {
    let cmd = Command::Txn {
        compares: vec![compare],
        success: vec![put(record, lease)],
        failure: vec![Op::Get {
            key: record_key(&record.session_key),
        }],
    };
    let applied = client
        .propose(KV_GROUP, cmd, timeout, Route::Leader)
        .await
        .map_err(unavailable)?
        .value;
    if let Some(e) = applied.error {
        return Err(RouterError::Unavailable(format!("router store: {e}")));
    }
    if applied.succeeded {
        return Ok(Claim::Won);
    }
    let held = applied.ops.into_iter().find_map(|o| match o {
        OpResult::Get(kv) => kv.and_then(|kv| OwnerRecord::decode(&kv.value)),
        _ => None,
    });
    match held {
        Some(h) => Ok(Claim::Held(h)),
        // Deleted between the compare and the read: a retry will win or see the holder.
        None => Err(RouterError::Unavailable(format!(
            "session {}: its owner changed while claiming; retry",
            record.session_key
        ))),
    }
}

impl OwnerStore for StoredOwners {
    fn claim(&self, record: OwnerRecord, lease: i64, timeout: Duration) -> StoreFuture<Claim> {
        let client = self.client.clone();
        Box::pin(async move {
            // Never written (or deleted since): create_revision is 0.
            let absent = Compare {
                key: record_key(&record.session_key),
                cmp: Cmp::Equal,
                target: Target::CreateRevision(0),
            };
            settle(&client, absent, &record, lease, timeout).await
        })
    }

    fn take_over(
        &self,
        record: OwnerRecord,
        held: OwnerRecord,
        lease: i64,
        timeout: Duration,
    ) -> StoreFuture<Claim> {
        let client = self.client.clone();
        Box::pin(async move { settle(&client, value_is(&held), &record, lease, timeout).await })
    }

    fn release(&self, record: OwnerRecord, timeout: Duration) -> StoreFuture<()> {
        let client = self.client.clone();
        Box::pin(async move {
            let cmd = Command::Txn {
                compares: vec![value_is(&record)],
                success: vec![Op::Delete {
                    key: record_key(&record.session_key),
                    prefix: false,
                }],
                failure: vec![],
            };
            client
                .propose(KV_GROUP, cmd, timeout, Route::Leader)
                .await
                .map_err(unavailable)?;
            Ok(())
        })
    }

    fn grant(&self, ttl: Duration, timeout: Duration) -> StoreFuture<i64> {
        let client = self.client.clone();
        Box::pin(async move {
            let cmd = Command::LeaseGrant {
                id: 0,
                ttl_secs: ttl.as_secs().max(1) as i64,
            };
            let applied = client
                .propose(KV_GROUP, cmd, timeout, Route::Leader)
                .await
                .map_err(unavailable)?
                .value;
            match applied.error {
                Some(e) => Err(RouterError::Unavailable(format!("router store: {e}"))),
                None => Ok(applied.lease),
            }
        })
    }

    fn renew(&self, lease: i64, timeout: Duration) -> StoreFuture<bool> {
        let client = self.client.clone();
        Box::pin(async move {
            match client.keep_alive(KV_GROUP, lease, timeout).await {
                Ok(_) => Ok(true),
                Err(ClientError::Raft {
                    error: RaftError::NotFound(_),
                    ..
                }) => Ok(false),
                Err(e) => Err(unavailable(e)),
            }
        })
    }

    fn get(&self, key: String, timeout: Duration) -> StoreFuture<Option<OwnerRecord>> {
        let client = self.client.clone();
        Box::pin(async move {
            Ok(client
                .get(KV_GROUP, record_key(&key), timeout)
                .await
                .map_err(unavailable)?
                .and_then(|kv| OwnerRecord::decode(&kv.value)))
        })
    }

    fn list(&self) -> StoreFuture<Vec<OwnerRecord>> {
        let client = self.client.clone();
        Box::pin(async move {
            let listing = client
                .list(
                    KV_GROUP,
                    PREFIX.as_bytes().to_vec(),
                    false,
                    client.timeout(),
                )
                .await
                .map_err(unavailable)?;
            Ok(listing
                .kvs
                .into_iter()
                .filter_map(|kv| OwnerRecord::decode(&kv.value))
                .collect())
        })
    }

    fn watch(&self, tx: mpsc::Sender<OwnerEvent>) -> StoreFuture<()> {
        let client = self.client.clone();
        Box::pin(async move {
            let (updates_tx, mut updates) = mpsc::channel(WATCH_BUFFER);
            let spec = WatchSpec {
                key: PREFIX.as_bytes().to_vec(),
                prefix: true,
                start_revision: 0,
                prev_kv: false,
            };
            client
                .watch(KV_GROUP, spec, updates_tx, client.timeout())
                .await
                .map_err(unavailable)?;
            tokio::spawn(async move {
                while let Some(u) = updates.recv().await {
                    let WatchUpdate::Events { events, .. } = u else {
                        break;
                    };
                    for e in events {
                        let ev = if e.deleted {
                            let key = String::from_utf8_lossy(&e.kv.key);
                            OwnerEvent::Deleted(key.trim_start_matches(PREFIX).to_string())
                        } else {
                            match OwnerRecord::decode(&e.kv.value) {
                                Some(r) => OwnerEvent::Put(r),
                                None => continue,
                            }
                        };
                        if tx.send(ev).await.is_err() {
                            return;
                        }
                    }
                }
            });
            Ok(())
        })
    }
}
