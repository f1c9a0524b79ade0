//! The agent's side of a UDP port-forward.
//!
//! All datagrams of one forward share one session; each frame's `peer` names the user-side
//! source. The agent gives every source its own socket connected to `127.0.0.1:PORT` (the proto
//! names no address family; a service on `::1` only is not reached over UDP), so the service sees
//! one client per source and its replies find their way back. A source that neither sends nor
//! receives for the idle timeout is forgotten, and the number of sources is bounded so that a
//! flood of spoofed sources cannot exhaust the agent's sockets.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use lodge_grpc::pb::router::{frame, Frame};
use tokio::net::UdpSocket;
use tokio::sync::mpsc::{self, error::TrySendError};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_stream::StreamExt;

use crate::tunnel::Link;

/// The largest UDP payload.
pub const MAX_DATAGRAM: usize = 65_535;

/// A `peer` longer than this is not an "ip:port" (the longest, a scoped IPv6 address, is ~65).
const MAX_PEER_LEN: usize = 96;

/// Datagrams waiting for one source's socket; past it they are dropped, as a full socket
/// buffer would.
const SOURCE_QUEUE: usize = 64;

/// Limits of the UDP forwards an agent serves.
#[derive(Clone, Copy, Debug)]
pub struct UdpOptions {
    /// A source silent both ways for this long is forgotten (its socket closed).
    pub idle: Duration,
    /// Sources one forward keeps at once; datagrams from further sources are dropped.
    pub max_sources: usize,
}

impl Default for UdpOptions {
    fn default() -> Self {
        Self {
            idle: Duration::from_secs(60),
            max_sources: 1024,
        }
    }
}

/// What a UDP forward did, for the agent's log line at its end.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct UdpStats {
    /// Sources given a socket.
    pub sources: u64,
    /// Sources forgotten after the idle timeout.
    pub reaped: u64,
    /// Datagrams dropped because the source table was full.
    pub over_limit: u64,
    /// Datagrams dropped because their source's queue was full.
    pub queue_full: u64,
}

/// Serves a UDP forward to `port` until the user ends it; answers what it did.
pub async fn serve_udp(link: Link, port: u16, opts: UdpOptions) -> Result<UdpStats, String> {
    let Link { tx, mut rx } = link;
    let mut table = SourceTable::new(port, opts, tx);
    loop {
        tokio::select! {
            frame = rx.next() => {
                let frame = match frame {
                    // The session is over (both sides finished).
                    None => break,
                    Some(Err(s)) => {
                        return Err(format!("session ended: {:?}: {}", s.code(), s.message()))
                    }
                    Some(Ok(f)) => f,
                };
                match frame.control {
                    None => table.deliver(frame.peer, frame.data).await,
                    // The user stopped forwarding; replies would have no one to go to.
                    Some(frame::Control::Eof(_)) => break,
                    Some(_) => {}
                }
            }
            Some(ended) = table.tasks.join_next(), if !table.tasks.is_empty() => {
                if let Ok(ended) = ended {
                    table.forget(ended);
                }
            }
        }
    }
    // Dropping the table aborts the sources' tasks, and with them the last senders of the link:
    // the user then gets `eof`.
    Ok(table.stats)
}

/// One source's entry: its task's queue, and which task it is (an entry may be replaced before
/// the old task's end is seen).
struct Source {
    id: u64,
    inbox: mpsc::Sender<Bytes>,
}

/// How a source's task ended.
enum SourceEnd {
    Idle,
    Closed,
}

struct SourceTable {
    target: SocketAddr,
    opts: UdpOptions,
    tx: mpsc::Sender<Frame>,
    sources: HashMap<String, Source>,
    tasks: JoinSet<(String, u64, SourceEnd)>,
    next_id: u64,
    stats: UdpStats,
}

impl SourceTable {
    fn new(port: u16, opts: UdpOptions, tx: mpsc::Sender<Frame>) -> Self {
        Self {
            target: SocketAddr::from((Ipv4Addr::LOCALHOST, port)),
            opts,
            tx,
            sources: HashMap::new(),
            tasks: JoinSet::new(),
            next_id: 0,
            stats: UdpStats::default(),
        }
    }

    /// Sends `data` from `peer` on to the service; never waits on one source, so that a slow or
    /// stuck source does not hold up the others.
    async fn deliver(&mut self, peer: String, data: Bytes) {
        if peer.is_empty() || peer.len() > MAX_PEER_LEN {
            return;
        }
        let data = match self.sources.get(&peer) {
            Some(source) => match source.inbox.try_send(data) {
                Ok(()) => return,
                Err(TrySendError::Full(_)) => {
                    self.stats.queue_full += 1;
                    return;
                }
                // Its task just ended (idle): the datagram starts a new source.
                Err(TrySendError::Closed(data)) => {
                    self.sources.remove(&peer);
                    data
                }
            },
            None => data,
        };
        if self.sources.len() >= self.opts.max_sources {
            if self.stats.over_limit == 0 {
                eprintln!(
                    "lodge agent: udp to port {}: {} sources open, datagrams from new sources \
                     are dropped (--udp-max-sources)",
                    self.target.port(),
                    self.sources.len()
                );
            }
            self.stats.over_limit += 1;
            return;
        }
        let socket = match self.open_socket().await {
            Ok(s) => s,
            Err(e) => {
                eprintln!("lodge agent: udp to {}: {e}", self.target);
                return;
            }
        };
        let (inbox, queue) = mpsc::channel(SOURCE_QUEUE);
        // Cannot fail: the queue is new and empty.
        let _ = inbox.try_send(data);
        let id = self.next_id;
        self.next_id += 1;
        self.stats.sources += 1;
        self.sources.insert(peer.clone(), Source { id, inbox });
        self.tasks.spawn(run_source(
            peer,
            id,
            socket,
            queue,
            self.tx.clone(),
            self.opts.idle,
        ));
    }

    async fn open_socket(&self) -> Result<UdpSocket, String> {
        let socket = UdpSocket::bind((Ipv4Addr::LOCALHOST, 0))
            .await
            .map_err(|e| format!("binding a socket: {e}"))?;
        socket
            .connect(self.target)
            .await
            .map_err(|e| format!("connecting a socket: {e}"))?;
        Ok(socket)
    }

    fn forget(&mut self, (peer, id, end): (String, u64, SourceEnd)) {
        if matches!(end, SourceEnd::Idle) {
            self.stats.reaped += 1;
        }
        if self.sources.get(&peer).is_some_and(|s| s.id == id) {
            self.sources.remove(&peer);
        }
    }
}

/// One source: datagrams from the user out through its socket, replies back as frames naming
/// it, until it idles out or the session ends.
async fn run_source(
    peer: String,
    id: u64,
    socket: UdpSocket,
    mut queue: mpsc::Receiver<Bytes>,
    tx: mpsc::Sender<Frame>,
    idle: Duration,
) -> (String, u64, SourceEnd) {
    // Datagrams are small and bounded: one reused buffer and a copy of each reply costs less
    // than a fresh 64 KiB buffer per datagram.
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let timer = tokio::time::sleep(idle);
    tokio::pin!(timer);
    let end = loop {
        tokio::select! {
            datagram = queue.recv() => {
                let Some(datagram) = datagram else { break SourceEnd::Closed };
                // UDP gives no delivery promise: a failed send is a lost datagram, not an error.
                let _ = socket.send(&datagram).await;
                timer.as_mut().reset(Instant::now() + idle);
            }
            reply = socket.recv(&mut buf) => {
                // An error is the ICMP answer to an earlier datagram (nothing listening yet); a
                // later one may succeed.
                let Ok(n) = reply else { continue };
                let frame = Frame {
                    data: Bytes::copy_from_slice(&buf[..n]),
                    peer: peer.clone(),
                    ..Default::default()
                };
                if tx.send(frame).await.is_err() {
                    break SourceEnd::Closed;
                }
                timer.as_mut().reset(Instant::now() + idle);
            }
            () = &mut timer => break SourceEnd::Idle,
        }
    };
    (peer, id, end)
}
