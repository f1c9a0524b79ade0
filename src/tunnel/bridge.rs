//! Carrying one TCP connection over a link, used by both ends of a TCP port-forward.
//!
//! Half-close travels both ways: when the socket reads end-of-file the link's sending half is
//! dropped (the other side gets `eof`), and an `eof` from the other side shuts down the socket's
//! write half, while the opposite direction keeps flowing until it finishes too.

use std::time::Duration;

use bytes::BytesMut;
use lodge_grpc::pb::router::{frame, Frame};
use lodge_grpc::router_client::{abort, data, MAX_CHUNK};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_stream::StreamExt;

use super::{FrameRx, Link};

/// Bridges `stream` and `link` until both directions have finished, or until either fails.
///
/// An error (a reset socket, a session ended with a status) drops both halves of the link at
/// once and resets the socket, so that neither end mistakes a broken session for a clean end of
/// data.
pub async fn bridge_tcp(mut stream: TcpStream, link: Link) -> Result<(), String> {
    let result = pump(&mut stream, link).await;
    if result.is_err() {
        // Best effort: a socket that cannot take the option is closed normally instead.
        let _ = stream.set_zero_linger();
    }
    result
}

/// How long a bridge whose local connection broke keeps its call open for the router to end the
/// session: dropping the call at once can lose the queued abort before it is written.
const ABORT_LINGER: Duration = Duration::from_secs(5);

/// Why a bridge stopped early.
enum Broken {
    /// The local connection failed; the session was told with an abort frame.
    Local(String),
    /// The session ended with a status (the router already told both sides).
    Session(String),
}

async fn pump(stream: &mut TcpStream, link: Link) -> Result<(), String> {
    let (reader, writer) = stream.split();
    let Link { tx, mut rx } = link;
    match bridge_halves(reader, writer, tx, &mut rx).await {
        Ok(()) => Ok(()),
        Err(Broken::Session(e)) => Err(e),
        Err(Broken::Local(e)) => {
            // The router answers the abort by ending the session, which ends `rx`.
            let drain = async { while rx.next().await.is_some() {} };
            let _ = tokio::time::timeout(ABORT_LINGER, drain).await;
            Err(e)
        }
    }
}

async fn bridge_halves(
    reader: ReadHalf<'_>,
    writer: WriteHalf<'_>,
    tx: mpsc::Sender<Frame>,
    rx: &mut FrameRx,
) -> Result<(), Broken> {
    // Weak: it must not keep the sending half open past end-of-file (that is the half-close).
    let for_abort = tx.downgrade();
    let outbound = socket_to_link(reader, tx);
    let inbound = link_to_socket(rx, writer, for_abort);
    tokio::pin!(outbound, inbound);
    let mut outbound_done = false;
    loop {
        tokio::select! {
            r = &mut outbound, if !outbound_done => {
                r?;
                outbound_done = true;
            }
            // The link's end means both directions are over (or the session broke): whatever the
            // socket still sends has nowhere to go.
            r = &mut inbound => return r,
        }
    }
}

/// Socket to link; dropping `tx` at end-of-file is what tells the other side. A failed read
/// sends an abort first, so that a broken local connection fails the session instead of looking
/// like a finished one.
async fn socket_to_link(mut reader: ReadHalf<'_>, tx: mpsc::Sender<Frame>) -> Result<(), Broken> {
    let mut buf = BytesMut::new();
    loop {
        // Each frame takes the bytes it carries without a copy; a fresh buffer is made only when
        // the previous one has no room left for a full chunk.
        buf.reserve(MAX_CHUNK);
        let read = reader
            .read_buf(&mut bytes::BufMut::limit(&mut buf, MAX_CHUNK))
            .await;
        let n = match read {
            Ok(n) => n,
            Err(e) => {
                let e = format!("reading the local connection: {e}");
                let _ = tx.send(abort(e.clone())).await;
                return Err(Broken::Local(e));
            }
        };
        if n == 0 {
            return Ok(());
        }
        if tx.send(data(buf.split().freeze())).await.is_err() {
            // The other side stopped receiving: the session is ending, and the inbound half
            // reports how.
            return Ok(());
        }
    }
}

/// Link to socket, until the link ends.
/// A failed write sends an abort while this side still sends (after its end-of-file, the call's
/// end is the only signal left).
async fn link_to_socket(
    rx: &mut FrameRx,
    mut writer: WriteHalf<'_>,
    for_abort: mpsc::WeakSender<Frame>,
) -> Result<(), Broken> {
    while let Some(frame) = rx.next().await {
        let frame = frame.map_err(|s| {
            Broken::Session(format!("session ended: {:?}: {}", s.code(), s.message()))
        })?;
        let written = match frame.control {
            // Only the write half: the peer may still answer after reading end-of-file.
            Some(frame::Control::Eof(_)) => writer
                .shutdown()
                .await
                .map_err(|e| format!("half-closing the local connection: {e}")),
            None => writer
                .write_all(&frame.data)
                .await
                .map_err(|e| format!("writing the local connection: {e}")),
            // Nothing else belongs in a TCP session; ignoring it keeps the bytes flowing.
            Some(_) => Ok(()),
        };
        if let Err(e) = written {
            if let Some(tx) = for_abort.upgrade() {
                let _ = tx.send(abort(e.clone())).await;
            }
            return Err(Broken::Local(e));
        }
    }
    Ok(())
}
