//! Raft over gRPC: the member-to-member transport and its server side.
//!
//! Each peer gets a task that keeps one client stream (`Raft/Send`) open and feeds it batches (up
//! to 256 messages or 2 MiB) from a bounded queue, reconnecting with backoff. While a peer is not
//! connected, or its queue is full, messages to it are dropped and raft is told the peer is
//! unreachable (raft resends what matters). Snapshots travel on a stream of their own, in 1 MiB
//! chunks, so a large state is not bound by the message-size limit.
//!
//! The server side runs on the peer port only. A message whose `from` is not the member the
//! peer's certificate names is dropped and counted; a snapshot stream is capped
//! (`peer.max_snapshot_bytes`), one at a time per peer, and spooled to a file in the data
//! directory as it arrives: memory holds one chunk until the stream is complete (then raft,
//! which keeps a snapshot in memory, gets the whole of it).

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use lodge_actors::cluster::client::Client;
use lodge_actors::cluster::fault::Faults;
use lodge_actors::cluster::raft::{RaftNode, SnapshotSent, Step};
use lodge_actors::cluster::topology::Directory;
use lodge_actors::cluster::transport::{Delivery, Transport};
use lodge_actors::ActorRef;
use protobuf::Message as _;
use raft::eraftpb::{Message as RaftMessage, MessageType};
use slog::{debug, info, warn, Logger};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::pb::raft::{
    raft_client::RaftClient, raft_server, GroupAnswer, GroupCall, MessageBatch, SendAck,
    SnapshotAck, SnapshotChunk,
};
use crate::peer::{FromPeer, PeerLink};

const QUEUE: usize = 4096;
const BATCH_MESSAGES: usize = 256;
const BATCH_BYTES: usize = 2 << 20;
/// Largest batch or snapshot chunk the server decodes: a batch stops growing at BATCH_BYTES, plus
/// one message of at most raft's 1 MiB per message (or one entry as large as a client request).
pub const MAX_DECODE: usize = 64 << 20;
const SNAPSHOT_CHUNK: usize = 1 << 20;
/// Longest a snapshot transfer may take.
const SNAPSHOT_TIMEOUT: Duration = Duration::from_secs(300);
const BACKOFF_MIN: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(2);

struct Peer {
    addr: String,
    messages: mpsc::Sender<Vec<u8>>,
    snapshots: mpsc::Sender<Vec<u8>>,
    connected: Arc<AtomicBool>,
}

/// Sends raft messages to peers over gRPC.
pub struct GrpcTransport {
    raft: ActorRef<RaftNode>,
    faults: Faults,
    peers: RwLock<HashMap<u64, Peer>>,
    io: tokio::runtime::Handle,
    link: PeerLink,
    log: Logger,
}

impl GrpcTransport {
    /// A transport for member `self_id` (`raft`), running its tasks on `io`. Its peers are the
    /// members `directory` knows: it follows every change of the topology.
    pub fn new(
        io: tokio::runtime::Handle,
        self_id: u64,
        raft: ActorRef<RaftNode>,
        faults: Faults,
        directory: Directory,
        link: PeerLink,
        log: Logger,
    ) -> Arc<Self> {
        let t = Arc::new(Self {
            raft,
            faults,
            peers: RwLock::new(HashMap::new()),
            io: io.clone(),
            link,
            log,
        });
        let mut changes = directory.subscribe();
        let weak = Arc::downgrade(&t);
        t.sync_peers(self_id, &directory);
        io.spawn(async move {
            while changes.changed().await.is_ok() {
                let Some(t) = weak.upgrade() else { return };
                t.sync_peers(self_id, &directory);
            }
        });
        t
    }

    /// Starts streams to members new in the directory (or at a new address) and ends those to
    /// members gone from it.
    fn sync_peers(&self, self_id: u64, directory: &Directory) {
        let mut wanted = directory.addresses();
        wanted.remove(&self_id);
        let stale: Vec<u64> = {
            let peers = self.peers.read().unwrap();
            peers
                .iter()
                .filter(|(id, p)| wanted.get(id) != Some(&p.addr))
                .map(|(id, _)| *id)
                .collect()
        };
        for id in stale {
            // Dropping the queues ends the peer's tasks.
            self.peers.write().unwrap().remove(&id);
            info!(self.log, "peer removed"; "peer" => id);
        }
        for (id, addr) in wanted {
            if !self.peers.read().unwrap().contains_key(&id) {
                info!(self.log, "peer added"; "peer" => id, "addr" => &addr);
                self.add_peer(id, addr);
            }
        }
    }

    /// Starts talking to peer `id` at `addr`.
    fn add_peer(&self, id: u64, addr: String) {
        let (mtx, mrx) = mpsc::channel(QUEUE);
        let (stx, srx) = mpsc::channel(4);
        let connected = Arc::new(AtomicBool::new(false));
        let addr_for_peer = addr.clone();
        let log = self.log.new(slog::o!("peer" => id, "addr" => addr.clone()));
        self.io.spawn(stream_messages(
            id,
            addr.clone(),
            self.link.clone(),
            mrx,
            connected.clone(),
            self.faults.clone(),
            log.clone(),
        ));
        self.io.spawn(stream_snapshots(
            id,
            addr,
            self.link.clone(),
            srx,
            self.raft.clone(),
            log,
        ));
        self.peers.write().unwrap().insert(
            id,
            Peer {
                addr: addr_for_peer,
                messages: mtx,
                snapshots: stx,
                connected,
            },
        );
    }
}

impl Transport for GrpcTransport {
    fn send(&self, msgs: Vec<RaftMessage>) -> Vec<(u64, Delivery)> {
        let mut by_peer: HashMap<u64, Vec<RaftMessage>> = HashMap::new();
        for m in msgs {
            by_peer.entry(m.to).or_default().push(m);
        }
        let peers = self.peers.read().unwrap();
        by_peer
            .into_iter()
            .map(|(to, batch)| {
                let Some(peer) = peers.get(&to) else {
                    return (to, Delivery::Unreachable);
                };
                if self.faults.drops(to) {
                    // Injected partition: lost silently, as on a cut link.
                    return (to, Delivery::Delivered);
                }
                if !peer.connected.load(Ordering::Relaxed) {
                    return (to, Delivery::Unreachable);
                }
                let mut delivery = Delivery::Delivered;
                for m in batch {
                    let snapshot = m.get_msg_type() == MessageType::MsgSnapshot;
                    let Ok(bytes) = m.write_to_bytes() else {
                        return (to, Delivery::Unreachable);
                    };
                    let queue = if snapshot {
                        &peer.snapshots
                    } else {
                        &peer.messages
                    };
                    if queue.try_send(bytes).is_err() {
                        return (to, Delivery::Unreachable);
                    }
                    if snapshot {
                        // Reported to raft by the snapshot task when the transfer ends.
                        delivery = Delivery::InFlight;
                    }
                }
                (to, delivery)
            })
            .collect()
    }
}

async fn stream_messages(
    peer: u64,
    addr: String,
    link: PeerLink,
    mut rx: mpsc::Receiver<Vec<u8>>,
    connected: Arc<AtomicBool>,
    faults: Faults,
    log: Logger,
) {
    let mut backoff = BACKOFF_MIN;
    loop {
        let channel = match link.connect(&addr).await {
            Ok(c) => c,
            Err(e) => {
                if rx.is_closed() {
                    return;
                }
                debug!(log, "peer unreachable"; "error" => e);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(BACKOFF_MAX);
                continue;
            }
        };
        let (btx, brx) = mpsc::channel::<MessageBatch>(8);
        let mut client = RaftClient::new(channel);
        let mut call = Box::pin(async move { client.send(ReceiverStream::new(brx)).await });
        connected.store(true, Ordering::Relaxed);
        info!(log, "peer stream open");
        backoff = BACKOFF_MIN;
        loop {
            tokio::select! {
                first = rx.recv() => {
                    let Some(first) = first else { return };
                    let mut size = first.len();
                    let mut messages = vec![first];
                    while messages.len() < BATCH_MESSAGES && size < BATCH_BYTES {
                        match rx.try_recv() {
                            Ok(m) => {
                                size += m.len();
                                messages.push(m);
                            }
                            Err(_) => break,
                        }
                    }
                    if let Some(d) = faults.delay(peer) {
                        tokio::time::sleep(d).await;
                    }
                    if btx.send(MessageBatch { messages }).await.is_err() {
                        break;
                    }
                }
                r = &mut call => {
                    if let Err(e) = r {
                        warn!(log, "peer stream ended"; "error" => %e);
                    }
                    break;
                }
            }
        }
        connected.store(false, Ordering::Relaxed);
        if rx.is_closed() {
            return;
        }
        tokio::time::sleep(backoff).await;
    }
}

async fn stream_snapshots(
    peer: u64,
    addr: String,
    link: PeerLink,
    mut rx: mpsc::Receiver<Vec<u8>>,
    raft: ActorRef<RaftNode>,
    log: Logger,
) {
    while let Some(bytes) = rx.recv().await {
        let total = bytes.len() as u64;
        let chunks: Vec<SnapshotChunk> = bytes
            .chunks(SNAPSHOT_CHUNK)
            .enumerate()
            .map(|(i, c)| SnapshotChunk {
                data: c.to_vec(),
                total_bytes: if i == 0 { total } else { 0 },
            })
            .collect();
        let result = async {
            let channel = link.connect(&addr).await.map_err(Status::unavailable)?;
            // Bounded, so that a peer gone silent mid-transfer does not hold raft's progress for
            // it in snapshot state forever: raft sends a new one when it fails.
            let mut req = Request::new(tokio_stream::iter(chunks));
            req.set_timeout(SNAPSHOT_TIMEOUT);
            RaftClient::new(channel).snapshot(req).await
        }
        .await;
        match &result {
            Ok(_) => info!(log, "snapshot sent"; "bytes" => total),
            // raft sends it again when the follower still lags.
            Err(e) => warn!(log, "snapshot not sent"; "error" => %e),
        }
        // Only now may raft probe the follower past the snapshot.
        let _ = raft
            .send(SnapshotSent {
                to: peer,
                ok: result.is_ok(),
            })
            .await;
    }
}

/// Where and how large snapshots from peers may be (the `[peer]` section).
#[derive(Clone, Debug)]
pub struct SnapshotSpool {
    /// Directory the streams are spooled in (emptied at start).
    pub dir: PathBuf,
    /// `peer.max_snapshot_bytes`.
    pub max_bytes: u64,
}

/// Server side: steps incoming messages into this member's raft actor.
pub struct RaftService {
    raft: ActorRef<RaftNode>,
    /// Serves the calls other members' store clients send to this member as their leader.
    store: Client,
    faults: Faults,
    spool: SnapshotSpool,
    /// Peers with a snapshot stream open (by member, or by address without peer TLS).
    streaming: Arc<Mutex<HashSet<String>>>,
    rejections: lodge_actors::registry::RegistryMetrics,
}

/// A peer's place in [`RaftService::streaming`] and its spool file, given back when dropped.
struct SpoolPlace {
    peers: Arc<Mutex<HashSet<String>>>,
    peer: String,
    file: PathBuf,
}

impl Drop for SpoolPlace {
    fn drop(&mut self) {
        self.peers.lock().unwrap().remove(&self.peer);
        let _ = std::fs::remove_file(&self.file);
    }
}

impl RaftService {
    pub fn new(
        raft: ActorRef<RaftNode>,
        store: Client,
        faults: Faults,
        spool: SnapshotSpool,
        rejections: lodge_actors::registry::RegistryMetrics,
    ) -> Self {
        Self {
            raft,
            store,
            faults,
            spool,
            streaming: Arc::default(),
            rejections,
        }
    }

    /// Drops the messages whose `from` is not the authenticated peer (counted).
    fn authentic(&self, peer: Option<FromPeer>, msgs: &mut Vec<RaftMessage>) {
        let Some(FromPeer {
            member: Some(member),
        }) = peer
        else {
            return;
        };
        msgs.retain(|m| {
            let ok = m.from == member;
            if !ok {
                self.rejections.rejected("peer_identity");
            }
            ok
        });
    }

    async fn step(&self, mut msgs: Vec<RaftMessage>) -> Result<(), Status> {
        msgs.retain(|m| !self.faults.drops(m.from));
        if msgs.is_empty() {
            return Ok(());
        }
        // Awaiting the actor gives the stream backpressure.
        self.raft
            .send(Step(msgs))
            .await
            .map_err(|e| Status::unavailable(format!("raft member: {e}")))
    }

    /// Takes the peer's one snapshot place, or says who holds it.
    fn begin_snapshot<T>(&self, req: &Request<T>) -> Result<SpoolPlace, Status> {
        let peer = match req.extensions().get::<FromPeer>().and_then(|p| p.member) {
            Some(m) => format!("member {m}"),
            None => req
                .remote_addr()
                .map_or("an unknown address".into(), |a| a.ip().to_string()),
        };
        if !self.streaming.lock().unwrap().insert(peer.clone()) {
            self.rejections.rejected("peer_snapshot_streams");
            return Err(Status::resource_exhausted(format!(
                "a snapshot from {peer} is already streaming: one at a time per peer"
            )));
        }
        let file = self
            .spool
            .dir
            .join(format!("snapshot-{:016x}.part", fastrand::u64(..)));
        Ok(SpoolPlace {
            peers: self.streaming.clone(),
            peer,
            file,
        })
    }

    fn too_large(&self, bytes: u64) -> Status {
        self.rejections.rejected("peer_snapshot_bytes");
        Status::resource_exhausted(format!(
            "snapshot of {bytes} bytes or more is larger than peer.max_snapshot_bytes ({})",
            self.spool.max_bytes
        ))
    }
}

fn decode(bytes: &[u8]) -> Result<RaftMessage, Status> {
    RaftMessage::parse_from_bytes(bytes)
        .map_err(|e| Status::invalid_argument(format!("messages: not a raft message: {e}")))
}

#[tonic::async_trait]
impl raft_server::Raft for RaftService {
    async fn send(
        &self,
        req: Request<Streaming<MessageBatch>>,
    ) -> Result<Response<SendAck>, Status> {
        let peer = req.extensions().get::<FromPeer>().copied();
        let mut stream = req.into_inner();
        while let Some(batch) = stream.message().await? {
            let mut msgs = batch
                .messages
                .iter()
                .map(|b| decode(b))
                .collect::<Result<Vec<_>, _>>()?;
            self.authentic(peer, &mut msgs);
            self.step(msgs).await?;
        }
        Ok(Response::new(SendAck {}))
    }

    async fn snapshot(
        &self,
        req: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<SnapshotAck>, Status> {
        let place = self.begin_snapshot(&req)?;
        let peer = req.extensions().get::<FromPeer>().copied();
        let mut stream = req.into_inner();
        let io_error = |e: std::io::Error| Status::internal(format!("spooling the snapshot: {e}"));
        let mut file = tokio::fs::File::create(&place.file)
            .await
            .map_err(io_error)?;
        let (mut received, mut announced) = (0u64, None);
        while let Some(chunk) = stream.message().await? {
            if announced.is_none() {
                announced = Some(chunk.total_bytes);
            }
            received += chunk.data.len() as u64;
            if chunk.total_bytes > self.spool.max_bytes {
                return Err(self.too_large(chunk.total_bytes));
            }
            if received > self.spool.max_bytes {
                return Err(self.too_large(received));
            }
            tokio::io::AsyncWriteExt::write_all(&mut file, &chunk.data)
                .await
                .map_err(io_error)?;
        }
        if let Some(total) = announced.filter(|t| *t != 0 && *t != received) {
            return Err(Status::invalid_argument(format!(
                "snapshot ended after {received} of the {total} bytes announced (total_bytes)"
            )));
        }
        drop(file);
        // Complete: raft keeps a snapshot in memory, so it is read whole from here.
        let bytes = tokio::fs::read(&place.file).await.map_err(io_error)?;
        drop(place);
        let msg = decode(&bytes)?;
        if msg.get_msg_type() != MessageType::MsgSnapshot {
            return Err(Status::invalid_argument("data: not a snapshot message"));
        }
        let mut msgs = vec![msg];
        self.authentic(peer, &mut msgs);
        if msgs.is_empty() {
            return Err(Status::permission_denied(
                "from: a snapshot must come from the member the peer certificate names",
            ));
        }
        self.step(msgs).await?;
        Ok(Response::new(SnapshotAck {}))
    }

    async fn propose(&self, req: Request<GroupCall>) -> Result<Response<GroupAnswer>, Status> {
        let budget = crate::deadline::of(&req, self.store.timeout());
        crate::leader_link::serve_propose(&self.store, req.into_inner(), budget).await
    }

    async fn read(&self, req: Request<GroupCall>) -> Result<Response<GroupAnswer>, Status> {
        let budget = crate::deadline::of(&req, self.store.timeout());
        crate::leader_link::serve_read(&self.store, req.into_inner(), budget).await
    }
}
